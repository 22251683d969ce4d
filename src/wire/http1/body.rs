//! Request bodies on an HTTP/1.x connection: their framing, chunked decoding with Go's
//! reader errors, and the body a handler sees when one could not be read.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;
use http_body::{Frame, SizeHint};

use super::socket::{fill, ReadError};
use super::MAX_HEAD;
use crate::wire::body::{BodyError, MAX_BODY};
use crate::wire::transport::Transport;

/// Longest chunk-size line of a chunked request body.
pub(super) const MAX_CHUNK_LINE: usize = 4096;

/// How the request's body is framed.
pub(super) enum Framing {
    /// No body.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked.
    Chunked,
}

/// Reads a chunked body: the body and whether its framing held to the end. `Ok(Err(_))`: the
/// body is over [`MAX_BODY`] or its framing is malformed before any data; the handler sees
/// that error (as Go's handlers do), and the connection closes. When the framing breaks after
/// a chunk's data (no CRLF after it, as from a client ending every line with a bare LF), the
/// data read so far is the body, as etcd's gateway decodes the JSON value it read before
/// Go's chunked reader failed; the connection closes after the answer.
pub(super) async fn read_chunked<S: Transport>(
    s: &mut S,
    buf: &mut BytesMut,
) -> Result<Result<(Bytes, bool), BodyError>, ReadError> {
    let mut body = BytesMut::new();
    loop {
        // The chunk-size line, ended by LF with or without CR (Go's `readChunkLine` trims
        // trailing whitespace, so bare-LF lines are accepted).
        let line_end = loop {
            if let Some(i) = buf.iter().position(|b| *b == b'\n') {
                break i;
            }
            if buf.len() > MAX_CHUNK_LINE {
                return Ok(Err(BodyError::Malformed("header line too long")));
            }
            if fill(s, buf).await? == 0 {
                return Err(ReadError::Io);
            }
        };
        let size = {
            let line = &buf[..line_end];
            let hex = line
                .split(|b| *b == b';')
                .next()
                .unwrap_or(&[])
                .trim_ascii();
            match parse_chunk_size(hex) {
                Ok(n) => n,
                Err(e) => return Ok(Err(e)),
            }
        };
        buf.advance(line_end + 1);
        if size == 0 {
            // Trailers, up to an empty line (LF or CRLF, as Go's textproto reads them).
            loop {
                let end = loop {
                    if let Some(i) = buf.iter().position(|b| *b == b'\n') {
                        break i;
                    }
                    if buf.len() > MAX_HEAD {
                        return Err(ReadError::Refuse(
                            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                            None,
                        ));
                    }
                    if fill(s, buf).await? == 0 {
                        return Err(ReadError::Io);
                    }
                };
                let blank = end == 0 || (end == 1 && buf[0] == b'\r');
                buf.advance(end + 1);
                if blank {
                    return Ok(Ok((body.freeze(), true)));
                }
            }
        }
        if size > (MAX_BODY - body.len()) as u64 {
            return Ok(Err(BodyError::TooLarge));
        }
        let size = size as usize;
        while buf.len() < size + 2 {
            if fill(s, buf).await? == 0 {
                return Err(ReadError::Io);
            }
        }
        body.extend_from_slice(&buf[..size]);
        if &buf[size..size + 2] != b"\r\n" {
            if body.is_empty() {
                return Ok(Err(BodyError::Malformed("malformed chunked encoding")));
            }
            return Ok(Ok((body.freeze(), false)));
        }
        buf.advance(size + 2);
    }
}

/// A chunk size in hex, with the errors of Go's chunked reader.
pub(super) fn parse_chunk_size(hex: &[u8]) -> Result<u64, BodyError> {
    if hex.is_empty() {
        return Err(BodyError::Malformed("empty hex number for chunk length"));
    }
    let mut n: u64 = 0;
    for (i, b) in hex.iter().enumerate() {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return Err(BodyError::Malformed("invalid byte in chunk length")),
        };
        if i == 16 {
            return Err(BodyError::Malformed("http chunk length too large"));
        }
        n = n << 4 | u64::from(d);
    }
    Ok(n)
}

/// A request body that could not be read (too large, or malformed): reading it fails with
/// why, and the handler answers as it does for any such body.
pub(super) struct Failed(pub(super) Option<BodyError>);

impl http_body::Body for Failed {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        Poll::Ready(self.0.take().map(Err))
    }

    fn size_hint(&self) -> SizeHint {
        match self.0 {
            Some(BodyError::TooLarge) => SizeHint::with_exact(MAX_BODY as u64 + 1),
            _ => SizeHint::default(),
        }
    }
}
