//! Bytes off the socket: filling the read buffer with what is ready, and why no request
//! could be read.

use std::io;

use bytes::BytesMut;
use http::StatusCode;
use tokio::net::tcp::ReadHalf;

use super::READ_CHUNK;

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
pub(super) async fn fill(rd: &mut ReadHalf<'_>, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.capacity() - buf.len() < READ_CHUNK / 2 {
        buf.reserve(READ_CHUNK);
    }
    loop {
        rd.readable().await?;
        match rd.try_read_buf(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}
