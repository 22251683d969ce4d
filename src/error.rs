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
    /// A caller that requires a leader (clientv3's `hasleader` metadata) asked for a stale
    /// prefix: etcd's `ErrGRPCNoLeader`, as from a member cut off from its cluster.
    #[error("etcdserver: no leader")]
    NoLeader,
    /// The proxy is shutting down or has no usable upstream.
    #[error("etcdserver: {0}")]
    Unavailable(String),
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::Upstream(s) => s,
            Error::EmptyKey => Status::new(Code::InvalidArgument, e.to_string()),
            Error::FutureRevision | Error::Compacted => {
                Status::new(Code::OutOfRange, e.to_string())
            }
            Error::Unavailable(_) | Error::NoLeader => {
                Status::new(Code::Unavailable, e.to_string())
            }
        }
    }
}

/// etcd's watch `cancel_reason` for a create request whose key range is empty.
pub const WATCH_RANGE_EMPTY: &str = "mvcc: watcher range is empty";
/// etcd's watch `cancel_reason` for a create request reusing an active watch id.
pub const WATCH_DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
