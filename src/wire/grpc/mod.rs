//! gRPC on the wire: the protobuf codec of every generated service, and the two routes served
//! with encoders of their own that share encoded bytes (`KV/Range`, `Watch/Watch`).

pub mod codec;
pub mod range;
pub mod watch;

use tonic::service::Routes;

use crate::error::Error;
use crate::proto::etcdserverpb::{
    auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer,
    lease_server::LeaseServer, maintenance_server::MaintenanceServer,
};
use crate::serve::Services;

/// etcd's largest accepted request (`--max-request-bytes` 1.5 MiB plus 512 KiB gRPC overhead).
pub const MAX_DECODING_MESSAGE: usize = 2 << 20;

/// The tonic routes of the etcd services (`Watch` and `KV/Range` are served by
/// [`watch::serve`] and [`range::serve`], with encoders that share encoded bytes).
pub fn routes(services: &Services) -> Routes {
    let p = services.passthrough.clone();
    Routes::new(
        KvServer::new(services.kv.clone())
            .max_decoding_message_size(MAX_DECODING_MESSAGE)
            .max_encoding_message_size(usize::MAX),
    )
    .add_service(LeaseServer::new(p.clone()).max_decoding_message_size(MAX_DECODING_MESSAGE))
    .add_service(ClusterServer::new(p.clone()).max_decoding_message_size(MAX_DECODING_MESSAGE))
    .add_service(
        MaintenanceServer::new(p.clone())
            .max_decoding_message_size(MAX_DECODING_MESSAGE)
            .max_encoding_message_size(usize::MAX),
    )
    .add_service(AuthServer::new(p).max_decoding_message_size(MAX_DECODING_MESSAGE))
}

/// Every gRPC method etcd 3.4 serves, by service.
const GRPC_METHODS: [(&str, &[&str]); 6] = [
    (
        "etcdserverpb.KV",
        &["Range", "Put", "DeleteRange", "Txn", "Compact"],
    ),
    ("etcdserverpb.Watch", &["Watch"]),
    (
        "etcdserverpb.Lease",
        &[
            "LeaseGrant",
            "LeaseRevoke",
            "LeaseKeepAlive",
            "LeaseTimeToLive",
            "LeaseLeases",
        ],
    ),
    (
        "etcdserverpb.Cluster",
        &[
            "MemberAdd",
            "MemberRemove",
            "MemberUpdate",
            "MemberList",
            "MemberPromote",
        ],
    ),
    (
        "etcdserverpb.Maintenance",
        &[
            "Alarm",
            "Status",
            "Defragment",
            "Hash",
            "HashKV",
            "Snapshot",
            "MoveLeader",
        ],
    ),
    (
        "etcdserverpb.Auth",
        &[
            "AuthEnable",
            "AuthDisable",
            "Authenticate",
            "UserAdd",
            "UserGet",
            "UserList",
            "UserDelete",
            "UserChangePassword",
            "UserGrantRole",
            "UserRevokeRole",
            "RoleAdd",
            "RoleGet",
            "RoleList",
            "RoleDelete",
            "RoleGrantPermission",
            "RoleRevokePermission",
        ],
    ),
];

/// grpc-go's answer to a path no service serves, or `None` when the method exists.
pub fn unknown_method(path: &str) -> Option<tonic::Status> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    match GRPC_METHODS.iter().find(|(s, _)| *s == service) {
        None => Some(Error::UnknownService(service.into()).into()),
        Some((_, methods)) if !methods.contains(&method) => Some(
            Error::UnknownMethod {
                method: method.into(),
                service: service.into(),
            }
            .into(),
        ),
        Some(_) => None,
    }
}
