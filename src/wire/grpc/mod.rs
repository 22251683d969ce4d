//! gRPC on the wire: the protobuf codec of every generated service, the two routes served
//! with encoders of their own that share encoded bytes (`KV/Range`, `Watch/Watch`), and the
//! request metrics of every call ([`observe`]).

pub mod codec;
pub mod observe;
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

/// A gRPC answer with tonic's own statuses worded as grpc-go words them, in its head
/// (trailers-only) or its trailers: a request message over the limit is
/// `RESOURCE_EXHAUSTED` "grpc: received message larger than max (N vs. M)" from etcd, where
/// tonic says `OUT_OF_RANGE` "Error, decoded message length too large: found N bytes, the
/// limit is: M bytes".
pub fn go_status(resp: http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> {
    use http_body_util::BodyExt;
    let (mut parts, body) = resp.into_parts();
    rewrite_status(&mut parts.headers);
    let body = body.map_frame(|frame| match frame.into_trailers() {
        Ok(mut trailers) => {
            rewrite_status(&mut trailers);
            http_body::Frame::trailers(trailers)
        }
        Err(frame) => frame,
    });
    http::Response::from_parts(parts, tonic::body::Body::new(body))
}

/// Rewrites a tonic status in `headers` (see [`go_status`]); others are left as they are.
fn rewrite_status(headers: &mut http::HeaderMap) {
    if headers.get("grpc-status").map(|v| v.as_bytes()) != Some(b"11") {
        return;
    }
    let Some(status) = tonic::Status::from_header_map(headers) else {
        return;
    };
    let Some(sizes) = status
        .message()
        .strip_prefix("Error, decoded message length too large: found ")
    else {
        return;
    };
    let mut numbers = sizes
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let (Some(found), Some(limit)) = (numbers.next(), numbers.next()) else {
        return;
    };
    let go = tonic::Status::resource_exhausted(format!(
        "grpc: received message larger than max ({found} vs. {limit})"
    ));
    headers.remove("grpc-message");
    let _ = go.add_header(headers);
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
