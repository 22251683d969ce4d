//! The one place where the proxy's own failures become etcd's gRPC codes and messages.
//!
//! Errors that come back from etcd are passed through untouched (`Error::Upstream`), so a
//! client sees exactly what etcd said. Errors the proxy decides itself (answering from its
//! cache) use etcd's exact wording from `etcdserver/api/v3rpc/rpctypes`.

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
    /// Range at a revision after the current one.
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    /// Range at a revision etcd has compacted.
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    /// The proxy is shutting down or has no usable upstream.
    #[error("etcdserver: {0}")]
    Unavailable(String),
    /// A request without identity while etcd has auth enabled (`rpctypes.ErrGRPCUserEmpty`).
    #[error("etcdserver: user name is empty")]
    UserEmpty,
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::Upstream(s) => s,
            Error::EmptyKey | Error::UserEmpty => Status::new(Code::InvalidArgument, e.to_string()),
            Error::FutureRevision | Error::Compacted => {
                Status::new(Code::OutOfRange, e.to_string())
            }
            Error::Unavailable(_) => Status::new(Code::Unavailable, e.to_string()),
        }
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
            go_status_text(&Status::unauthenticated("etcdserver: invalid auth token")),
            "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token"
        );
    }
}
