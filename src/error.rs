//! The one place where the gRPC statuses the proxy makes itself are worded: etcd's codes and
//! messages for answers made from the cache, and grpc-go's for what the proxy's own gRPC
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
    /// Range at a revision after the current one.
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    /// Range at a revision etcd has compacted.
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    /// The proxy is shutting down: streams end so clients reconnect elsewhere (etcd's
    /// `ErrGRPCStopped`).
    #[error("etcdserver: server stopped")]
    Stopped,
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
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match e {
            Error::Upstream(s) => return s,
            Error::EmptyKey => Code::InvalidArgument,
            Error::FutureRevision | Error::Compacted => Code::OutOfRange,
            Error::Stopped => Code::Unavailable,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_etcds() {
        let s: Status = Error::Stopped.into();
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unavailable, "etcdserver: server stopped")
        );
        let s: Status = Error::MessageTooLarge { len: 3, max: 2 }.into();
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::ResourceExhausted,
                "grpc: received message larger than max (3 vs. 2)"
            )
        );
        let s: Status = Error::UnknownMethod {
            method: "Foo".into(),
            service: "etcdserverpb.KV".into(),
        }
        .into();
        assert_eq!(
            s.message(),
            "unknown method Foo for service etcdserverpb.KV"
        );
        let s: Status = Error::Upstream(Status::not_found("x")).into();
        assert_eq!((s.code(), s.message()), (Code::NotFound, "x"));
    }
}
