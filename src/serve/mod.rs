//! The serving layer: the etcd services as downstream clients see them, whatever the wire:
//! KV (cached ranges, forwarded writes), Watch (sessions of cursors over the caches) and the
//! services passed through to etcd.

pub mod access;
pub mod kv;
pub mod passthrough;
pub mod shield;
pub mod watch;

use std::sync::Arc;

use crate::source::hub::Hub;
use access::Access;
use kv::KvService;
use passthrough::PassThrough;
use watch::WatchService;

/// Every service implementation, shared by the gRPC routes and the HTTP gateway.
#[derive(Debug, Clone)]
pub struct Services {
    /// Feeds and upstream.
    pub hub: Arc<Hub>,
    /// KV (cached ranges, forwarded writes).
    pub kv: KvService,
    /// Watch (cached fan-out).
    pub watch: WatchService,
    /// Lease, Cluster, Maintenance, Auth (forwarded).
    pub passthrough: PassThrough,
    /// etcd's auth state and decisions (the listener's client-certificate policy reads the
    /// state too).
    pub access: Arc<Access>,
}

impl Services {
    /// Builds the services over `hub`.
    pub fn new(hub: Arc<Hub>) -> Self {
        let access = Access::start(&hub.config, hub.upstream.clone(), &hub.tasks);
        Services {
            kv: KvService::new(hub.clone(), access.clone()),
            watch: WatchService::new(hub.clone(), access.clone()),
            passthrough: PassThrough::new(
                hub.upstream.clone(),
                access.clone(),
                hub.registry.clone(),
            ),
            access,
            hub,
        }
    }
}
