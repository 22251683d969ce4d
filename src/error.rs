//! The one place where the gRPC statuses the proxy makes itself are worded: etcd's codes and
//! messages for answers made from the cache (auth refusals included), and grpc-go's for what the proxy's own gRPC
//! routes refuse.
//!
//! Errors that come back from etcd are passed through untouched (`Error::Upstream`), so a
//! client sees exactly what etcd said. Errors the proxy decides itself (answering from its
//! cache) use etcd's exact wording from `etcdserver/api/v3rpc/rpctypes`; transport errors of
//! its own gRPC routes use grpc-go's.
//!
//! Texts that are not gRPC statuses live with the code that reproduces them: Go's protobuf
//! decode errors with the codec (`wire::grpc::codec`), Go's answers to malformed HTTP/1.x
//! requests with the parser (`wire::http1::parse`), Go's JSON decode errors with the gateway's
//! JSON reader (`wire::gateway::json`, `wire::gateway::jsonpb`), and the gateway's JSON shape of
//! an error with `wire::gateway::errors`.

use tonic::{Code, Status};

/// Everything that can go wrong while serving a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// etcd answered with an error: forwarded as is.
    #[error("{0}")]
    Upstream(#[from] Status),
    /// Range without a key.
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    /// A range's `sort_order` or `sort_target` names no value (etcd 3.5's check).
    #[error("etcdserver: invalid sort option")]
    InvalidSortOption,
    /// A Txn with more operations than `--max-txn-ops`.
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    /// A put with `ignore_value` and a value.
    #[error("etcdserver: value is provided")]
    ValueProvided,
    /// A put with `ignore_lease` and a lease.
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    /// A Txn operation that names no request.
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// Range at a revision after the current one.
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    /// Range at a revision etcd has compacted.
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    /// A caller that requires a leader (clientv3's `hasleader` metadata) asked for a stale
    /// prefix: etcd's `ErrGRPCNoLeader`, as from a member cut off from its cluster.
    #[error("etcdserver: no leader")]
    NoLeader,
    /// The proxy is shutting down: streams end so clients reconnect elsewhere (etcd's
    /// `ErrGRPCStopped`).
    #[error("etcdserver: server stopped")]
    Stopped,
    /// The stream's connection reached `--max-connection-age` and was sent a GOAWAY: its
    /// watch streams end so the client resumes on a new connection (grpc-go's wording for a
    /// stream on a draining connection, `errStreamDrain`).
    #[error("the connection is draining")]
    Draining,
    /// A request larger than the server accepts (grpc-go's wording).
    #[error("grpc: received message larger than max ({len} vs. {max})")]
    MessageTooLarge {
        /// Size of the request.
        len: usize,
        /// Largest size accepted.
        max: usize,
    },
    /// A gRPC path naming no service etcd has (grpc-go's wording).
    #[error("unknown service {0}")]
    UnknownService(String),
    /// A gRPC path naming no method of an existing service (grpc-go's wording).
    #[error("unknown method {method} for service {service}")]
    UnknownMethod {
        /// The method asked for.
        method: String,
        /// Its service.
        service: String,
    },
    /// An answer could not be encoded (grpc-go's wording).
    #[error("grpc: error while marshaling: {0}")]
    Marshal(#[source] prost::EncodeError),
    /// A request without identity while etcd has auth enabled (`rpctypes.ErrGRPCUserEmpty`).
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    /// A caller without the permission (`rpctypes.ErrGRPCPermissionDenied`): what etcd with
    /// `--client-cert-auth` answers a tokenless request while auth is on, since it takes the
    /// client certificate's CommonName as the user, and an empty one is no user's.
    #[error("etcdserver: permission denied")]
    PermissionDenied,
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match e {
            Error::Upstream(s) => return s,
            Error::EmptyKey
            | Error::UserEmpty
            | Error::InvalidSortOption
            | Error::TooManyOps
            | Error::ValueProvided
            | Error::LeaseProvided
            | Error::KeyNotFound => Code::InvalidArgument,
            Error::FutureRevision | Error::Compacted => Code::OutOfRange,
            Error::PermissionDenied => Code::PermissionDenied,
            Error::Stopped | Error::NoLeader | Error::Draining => Code::Unavailable,
            Error::MessageTooLarge { .. } => Code::ResourceExhausted,
            Error::UnknownService(_) | Error::UnknownMethod { .. } => Code::Unimplemented,
            Error::Marshal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

/// etcd's watch `cancel_reason` for a create request whose key range is empty.
pub const WATCH_RANGE_EMPTY: &str = "mvcc: watcher range is empty";
/// etcd's watch `cancel_reason` for a create request reusing an active watch id.
pub const WATCH_DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";

/// A status as Go's gRPC prints it (`status.Error(...).Error()`): etcd's watch refusals carry
/// this text as their `cancel_reason`, e.g.
/// `rpc error: code = PermissionDenied desc = etcdserver: permission denied`.
pub fn go_status_text(status: &Status) -> String {
    let code = match status.code() {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    };
    format!("rpc error: code = {code} desc = {}", status.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_cancel_reasons_read_as_go_prints_them() {
        assert_eq!(
            go_status_text(&Error::UserEmpty.into()),
            "rpc error: code = InvalidArgument desc = etcdserver: user name is empty"
        );
        assert_eq!(
            go_status_text(&Error::PermissionDenied.into()),
            "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
        );
        assert_eq!(
            go_status_text(&Status::unauthenticated("etcdserver: invalid auth token")),
            "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token"
        );
    }
}
