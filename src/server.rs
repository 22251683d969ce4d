//! The listener: one TCP port serving the etcd v3 gRPC API and plain HTTP on every
//! connection. hyper detects HTTP/1.1 or HTTP/2 per connection; each request then goes to
//! tonic when it is gRPC (`content-type: application/grpc...`) and to [`crate::http`]
//! otherwise (health, readiness, metrics, and the JSON gateway).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::Routes;
use tower::ServiceExt;

use crate::hub::Hub;
use crate::kv::KvService;
use crate::passthrough::PassThrough;
use crate::proto::etcdserverpb::{
    auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer,
    lease_server::LeaseServer, maintenance_server::MaintenanceServer,
};
use crate::range_wire;
use crate::watch::frame;
use crate::watch::WatchService;

/// etcd's largest accepted request (`--max-request-bytes` 1.5 MiB plus 512 KiB gRPC overhead).
pub const MAX_DECODING_MESSAGE: usize = 2 << 20;

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
}

impl Services {
    /// Builds the services over `hub`.
    pub fn new(hub: Arc<Hub>) -> Self {
        Services {
            kv: KvService::new(hub.clone()),
            watch: WatchService::new(hub.clone()),
            passthrough: PassThrough::new(hub.upstream.clone()),
            hub,
        }
    }

    /// The tonic routes of the etcd services (`Watch` and `KV/Range` are served by
    /// [`frame::serve`] and [`range_wire::serve`], with encoders that share encoded bytes).
    pub fn grpc_routes(&self) -> Routes {
        let p = self.passthrough.clone();
        Routes::new(
            KvServer::new(self.kv.clone())
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
fn unknown_grpc_method(path: &str) -> Option<tonic::Status> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    match GRPC_METHODS.iter().find(|(s, _)| *s == service) {
        None => Some(tonic::Status::unimplemented(format!(
            "unknown service {service}"
        ))),
        Some((_, methods)) if !methods.contains(&method) => Some(tonic::Status::unimplemented(
            format!("unknown method {method} for service {service}"),
        )),
        Some(_) => None,
    }
}

fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Accepts connections until `shutdown` turns true, then stops accepting and lets open
/// connections finish gracefully for at most `drain`.
pub async fn serve(
    listener: TcpListener,
    services: Services,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let routes = services.grpc_routes();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .max_concurrent_streams(u32::MAX)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(8 << 20)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10))
        .timer(TokioTimer::new());
    // Go's net/http writes canonical header case (`Content-Type`); so does etcd's gateway.
    builder
        .http1()
        .title_case_headers(true)
        .timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let (conn_shutdown_tx, _) = watch::channel(false);
    let conn_shutdown_tx = Arc::new(conn_shutdown_tx);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
        };
        let _ = stream.set_nodelay(true);
        let routes = routes.clone();
        let services = services.clone();
        let builder = builder.clone();
        let mut conn_shutdown = conn_shutdown_tx.subscribe();
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let routes = routes.clone();
                let services = services.clone();
                async move {
                    if is_grpc(&req) {
                        if let Some(status) = unknown_grpc_method(req.uri().path()) {
                            return Ok(status.into_http());
                        }
                        // Boxed here and below: hyper keeps one allocation the size of this
                        // future per HTTP/1.1 connection for as long as it is open, so it
                        // must stay small however large the handlers' futures are.
                        let max = MAX_DECODING_MESSAGE;
                        match req.uri().path() {
                            range_wire::PATH => {
                                let kv = services.kv.clone();
                                Ok(Box::pin(range_wire::serve(kv, req, max)).await)
                            }
                            frame::PATH => {
                                let watch = services.watch.clone();
                                Ok(Box::pin(frame::serve(watch, req, max)).await)
                            }
                            _ => Box::pin(routes.oneshot(req)).await,
                        }
                    } else {
                        Ok::<_, Infallible>(Box::pin(crate::http::handle(req, &services)).await)
                    }
                }
            });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => { if let Err(e) = r { tracing::debug!(error = %e, "connection ended"); } }
                _ = async { let _ = conn_shutdown.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
        while conns.try_join_next().is_some() {}
    }
    // Refuse new connections at once (clients go to another replica) while the open ones
    // drain.
    drop(listener);
    let _ = conn_shutdown_tx.send(true);
    let _ = tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} }).await;
}
