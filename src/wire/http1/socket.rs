//! Bytes off the connection (TCP or TLS, see [`Transport`]): filling the read buffer with what is ready, and why no request
//! could be read.

use std::io;

use bytes::BytesMut;
use futures::FutureExt;
use http::StatusCode;
use tokio::io::AsyncReadExt;

use super::READ_CHUNK;
use crate::wire::transport::{readable, Transport};

/// Why no request could be read.
pub(super) enum ReadError {
    /// The connection failed or closed in the middle of a request, or its first line is not
    /// HTTP/1.x (etcd's listener drops those unanswered): nothing to answer.
    Io,
    /// A malformed or oversized request: answered with this status (and Go's detail, as in
    /// `400 Bad Request: invalid header name`), then closed.
    Refuse(StatusCode, Option<&'static str>),
}

impl From<io::Error> for ReadError {
    fn from(_: io::Error) -> Self {
        ReadError::Io
    }
}

/// Reads bytes that are ready into `buf` (growing it by at least `READ_CHUNK`), waiting for
/// the socket if none are. `Ok(0)` is the end of the stream.
pub(super) async fn fill<S: Transport>(s: &mut S, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        readable(s).await?;
        if buf.capacity() - buf.len() < READ_CHUNK / 2 {
            buf.reserve(READ_CHUNK);
        }
        // One read attempt; `None`: nothing after all (a spurious wake-up, or TLS bytes that
        // completed no record yet), so wait again.
        if let Some(r) = s.read_buf(buf).now_or_never() {
            return r;
        }
    }
}
