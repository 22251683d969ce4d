//! A request body as the gateway reads it, whatever the HTTP version (HTTP/1.x bodies are read
//! by [`super::http1`], HTTP/2 ones by hyper), and why one could not be read.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Over [`MAX_BODY`]: not read.
    #[error("request body over the limit, not read")]
    TooLarge,
    /// Malformed chunked framing, worded as Go's chunked reader words it (etcd's gateway
    /// answers it as an invalid argument).
    #[error("{0}")]
    Malformed(&'static str),
    /// The connection failed while the body was read (HTTP/2).
    #[error("{0}")]
    Transport(String),
}

/// The body of a request handed to [`crate::wire::gateway::handle`], whatever the HTTP version.
pub type ReqBody = BoxBody<Bytes, BodyError>;

/// Largest request body read into memory (the gateway's limit: nothing larger can be a valid
/// etcd request).
pub const MAX_BODY: usize = 32 << 20;
