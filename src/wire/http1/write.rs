//! Writing an answer: the head in Go's canonical header case, `Content-Length` or chunked
//! framing with trailers, written straight from the body's chunks while the socket is watched
//! for the client leaving (or pipelining its next request).

use std::io::{self, IoSlice};
use std::time::SystemTime;

use bytes::BytesMut;
use futures::FutureExt;
use http::{HeaderMap, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::parse::has_token;
use super::{send, MAX_HEAD};
use crate::wire::transport::{readable, Transport};

/// How an answer's body is framed on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Out {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    /// As is: `Content-Length` set, or HTTP/1.0 close-delimited.
    Plain,
    /// Chunked.
    Chunked,
}

/// What the request asked of its answer.
#[derive(Clone, Copy)]
pub(super) struct Asked {
    /// A `HEAD` request: the head only.
    pub(super) head_only: bool,
    /// The request's HTTP version.
    pub(super) version: Version,
    /// The connection may serve another request after this one.
    pub(super) keep_alive: bool,
}

/// Writes `response`; while its body streams, watches the socket so that a client leaving
/// ends the answer (and the watch behind it) at once. Bytes of a pipelined next request that
/// arrive meanwhile are kept in `buf`. `Ok(true)`: the connection can serve another request.
pub(super) async fn write_response<S: Transport>(
    s: &mut S,
    buf: &mut BytesMut,
    response: Response<tonic::body::Body>,
    asked: Asked,
) -> io::Result<bool> {
    let (parts, mut body) = response.into_parts();
    let status = parts.status;
    let mut keep_alive = asked.keep_alive
        && !parts
            .headers
            .get(http::header::CONNECTION)
            .is_some_and(|v| has_token(v, "close"));
    let bodyless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(if asked.version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    let mut has_length = false;
    let mut has_date = false;
    for (name, value) in &parts.headers {
        if name == http::header::TRANSFER_ENCODING || name == http::header::CONNECTION {
            continue;
        }
        has_length |= name == http::header::CONTENT_LENGTH;
        has_date |= name == http::header::DATE;
        write_header(&mut head, name.as_str(), value.as_bytes());
    }
    let out = if bodyless {
        Out::None
    } else if has_length {
        Out::Plain
    } else if let Some(n) = body.size_hint().exact() {
        write_header(&mut head, "content-length", n.to_string().as_bytes());
        Out::Plain
    } else if asked.head_only {
        Out::None
    } else if asked.version == Version::HTTP_10 {
        // Close-delimited.
        keep_alive = false;
        Out::Plain
    } else {
        write_header(&mut head, "transfer-encoding", b"chunked");
        Out::Chunked
    };
    if !has_date {
        let date = httpdate::fmt_http_date(SystemTime::now());
        write_header(&mut head, "date", date.as_bytes());
    }
    match (asked.version, keep_alive) {
        // HTTP/1.0 closes unless told otherwise.
        (Version::HTTP_10, true) => write_header(&mut head, "connection", b"keep-alive"),
        (Version::HTTP_10, false) => {}
        (_, false) => write_header(&mut head, "connection", b"close"),
        (_, true) => {}
    }
    head.extend_from_slice(b"\r\n");
    // The head is written: its header map is not kept for the life of a streaming answer.
    drop(parts);
    if out == Out::None || asked.head_only {
        send(s, &head).await?;
        return Ok(keep_alive);
    }
    // Bytes waiting to be written, the head first (so a unary answer is one write). Frames
    // that are ready together are written together: a connection that fell behind catches up
    // in few system calls instead of one per frame.
    let mut pending = head;
    let mut trailers: Option<HeaderMap> = None;
    let mut reading = true;
    loop {
        let frame = if pending.is_empty() {
            tokio::select! {
                biased;
                f = body.frame() => f,
                r = readable(&*s), if reading => {
                    r?;
                    if !keep_pipelined(s, buf)? {
                        return Err(io::ErrorKind::ConnectionAborted.into());
                    }
                    reading = buf.len() < MAX_HEAD;
                    continue;
                }
            }
        } else {
            match body.frame().now_or_never() {
                Some(f) => f,
                None => {
                    send(s, &std::mem::take(&mut pending)).await?;
                    continue;
                }
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => {
                // The answer cannot be completed; the connection cannot be reused either.
                tracing::debug!(error = %e, "answer body failed");
                send(s, &pending).await?;
                return Err(io::ErrorKind::Other.into());
            }
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(f) => {
                    if let Ok(t) = f.into_trailers() {
                        trailers.get_or_insert_with(HeaderMap::new).extend(t);
                    }
                    continue;
                }
            },
        };
        if data.is_empty() {
            continue;
        }
        let chunked = out == Out::Chunked;
        if data.len() >= LARGE_FRAME {
            // Large: written from its own buffer, not copied.
            let size = chunked.then(|| format!("{:x}\r\n", data.len()));
            let size = size.as_deref().unwrap_or("").as_bytes();
            let crlf: &[u8] = if chunked { b"\r\n" } else { b"" };
            write_all(s, &[&pending, size, &data, crlf]).await?;
            pending = Vec::new();
            continue;
        }
        if chunked {
            write_chunk_size(&mut pending, data.len());
            pending.extend_from_slice(&data);
            pending.extend_from_slice(b"\r\n");
        } else {
            pending.extend_from_slice(&data);
        }
        if pending.len() >= LARGE_FRAME {
            send(s, &std::mem::take(&mut pending)).await?;
        }
    }
    if out == Out::Chunked {
        pending.extend_from_slice(b"0\r\n");
        for (name, value) in trailers.iter().flatten() {
            write_header(&mut pending, name.as_str(), value.as_bytes());
        }
        pending.extend_from_slice(b"\r\n");
    }
    if !pending.is_empty() {
        send(s, &pending).await?;
    }
    Ok(keep_alive)
}

/// Frames at least this large are written from their own buffer; smaller ones are gathered
/// into one write.
pub(super) const LARGE_FRAME: usize = 16 << 10;

/// Appends a chunk-size line (`1a2\r\n`, lower-case hex as Go writes it).
pub(super) fn write_chunk_size(out: &mut Vec<u8>, n: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// Reads what the client sent while an answer streams. `Ok(false)`: the client closed.
pub(super) fn keep_pipelined<S: Transport>(s: &mut S, buf: &mut BytesMut) -> io::Result<bool> {
    let mut scratch = [0u8; 1024];
    match s.read(&mut scratch).now_or_never() {
        Some(Ok(0)) => Ok(false),
        Some(Ok(n)) => {
            buf.extend_from_slice(&scratch[..n]);
            Ok(true)
        }
        None => Ok(true),
        Some(Err(e)) => Err(e),
    }
}

/// Appends `Name: value\r\n` with the name in Go's canonical case.
pub(super) fn write_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    let mut upper = true;
    for b in name.bytes() {
        out.push(if upper { b.to_ascii_uppercase() } else { b });
        upper = b == b'-';
    }
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes every slice (at most four), in as few system calls as the socket allows.
pub(super) async fn write_all<S: Transport>(s: &mut S, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices = [IoSlice::new(&[]); 4];
    let mut n = 0;
    for p in parts.iter().filter(|p| !p.is_empty()).take(slices.len()) {
        slices[n] = IoSlice::new(p);
        n += 1;
    }
    let mut rest = &mut slices[..n];
    while !rest.is_empty() {
        let n = s.write_vectored(rest).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    s.flush().await
}
