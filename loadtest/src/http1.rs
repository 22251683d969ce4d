//! A minimal HTTP/1.1 client over raw TCP: one-shot requests and a chunked-stream reader.
//!
//! Enough for etcd's grpc-gateway (`/v3/kv/range`, `/v3/watch`), `/metrics`, `/health` and
//! `/readyz`, over TLS with `--tls` (`crate::tls::connect`). Every read is bounded in time by
//! the caller.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Largest response or header block accepted.
const MAX_BODY: usize = 256 << 20;

/// The request bytes of `method path` with an optional body.
pub fn request_bytes(
    method: &str,
    addr: SocketAddr,
    path: &str,
    body: &[u8],
    close: bool,
) -> Vec<u8> {
    let mut out =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: etcd-fanout-loadgen\r\n");
    if !body.is_empty() || method == "POST" {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str(&crate::auth::http_header());
    out.push_str("\r\n");
    let mut v = out.into_bytes();
    v.extend_from_slice(body);
    v
}

/// Response head: status code and whether the body is chunked, and the content length.
pub struct Head {
    pub status: u16,
    pub chunked: bool,
    pub content_length: Option<usize>,
}

/// Parses a response head from the front of `buf` (consuming it) once it is complete.
pub fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, BoxError> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > 64 << 10 {
            return Err("response head too large".into());
        }
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&buf[..end]).to_string();
    buf.advance(end + 4);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("malformed status line {status_line:?}"))?;
    let mut chunked = false;
    let mut content_length = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            let v = v.trim();
            if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            } else if k == "content-length" {
                content_length = v.parse().ok();
            }
        }
    }
    Ok(Some(Head {
        status,
        chunked,
        content_length,
    }))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Incremental decoder of a chunked body.
#[derive(Default)]
pub struct Chunked {
    /// Bytes of the current chunk still to come.
    remaining: usize,
    /// Expecting the CRLF after a chunk's data.
    need_crlf: bool,
    /// The terminating zero-size chunk was seen.
    pub done: bool,
}

impl Chunked {
    /// Moves every decodable body byte from `buf` to `out`.
    pub fn decode(&mut self, buf: &mut BytesMut, out: &mut Vec<u8>) -> Result<(), BoxError> {
        loop {
            if self.done {
                return Ok(());
            }
            if self.remaining > 0 {
                let n = self.remaining.min(buf.len());
                if n == 0 {
                    return Ok(());
                }
                out.extend_from_slice(&buf[..n]);
                buf.advance(n);
                self.remaining -= n;
                if self.remaining == 0 {
                    self.need_crlf = true;
                }
                continue;
            }
            if self.need_crlf {
                if buf.len() < 2 {
                    return Ok(());
                }
                if &buf[..2] != b"\r\n" {
                    return Err("chunk not followed by CRLF".into());
                }
                buf.advance(2);
                self.need_crlf = false;
                continue;
            }
            let Some(eol) = find(buf, b"\r\n") else {
                if buf.len() > 1024 {
                    return Err("chunk size line too long".into());
                }
                return Ok(());
            };
            let line = String::from_utf8_lossy(&buf[..eol]).to_string();
            buf.advance(eol + 2);
            let hex = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(hex, 16)
                .map_err(|_| format!("bad chunk size line {line:?}"))?;
            if size == 0 {
                self.done = true;
                return Ok(());
            }
            if size > MAX_BODY {
                return Err("chunk too large".into());
            }
            self.remaining = size;
        }
    }
}

/// One request on a fresh connection (`Connection: close`); returns status and body.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, Vec<u8>), BoxError> {
    let mut buf = BytesMut::with_capacity(16 << 10);
    let mut out = Vec::new();
    let status = tokio::time::timeout(
        timeout,
        request_inner(addr, method, path, body, &mut buf, &mut out),
    )
    .await
    .map_err(|_| {
        format!(
            "{method} {}{path}: timed out after {timeout:?}",
            crate::tls::url(addr)
        )
    })??;
    Ok((status, out))
}

/// Read and body buffers kept across the requests of one caller, so a large body does not
/// cost fresh allocations (and their page faults) every time.
#[derive(Default)]
pub struct Bufs {
    read: BytesMut,
    /// The body of the last response.
    pub body: Vec<u8>,
}

/// [`request`] with the caller's buffers: returns the status, the body is in `bufs.body`.
pub async fn request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
    bufs: &mut Bufs,
) -> Result<u16, BoxError> {
    bufs.read.clear();
    bufs.read.reserve(16 << 10);
    bufs.body.clear();
    tokio::time::timeout(
        timeout,
        request_inner(addr, method, path, body, &mut bufs.read, &mut bufs.body),
    )
    .await
    .map_err(|_| {
        format!(
            "{method} {}{path}: timed out after {timeout:?}",
            crate::tls::url(addr)
        )
    })?
}

/// Sends the request and reads the response through `buf`; the body goes to `out`.
async fn request_inner(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
) -> Result<u16, BoxError> {
    let mut s = crate::tls::connect(addr).await?;
    s.write_all(&request_bytes(method, addr, path, body, true))
        .await?;
    let head = loop {
        if let Some(h) = parse_head(buf)? {
            break h;
        }
        if s.read_buf(buf).await? == 0 {
            return Err(
                format!("{method} {path}: connection closed before the response head").into(),
            );
        }
    };
    if head.chunked {
        let mut ch = Chunked::default();
        loop {
            ch.decode(buf, out)?;
            if ch.done {
                break;
            }
            if out.len() > MAX_BODY {
                return Err("response too large".into());
            }
            if s.read_buf(buf).await? == 0 {
                return Err(
                    format!("{method} {path}: connection closed inside a chunked body").into(),
                );
            }
        }
    } else {
        let want = head.content_length;
        loop {
            if let Some(n) = want {
                if buf.len() >= n {
                    out.extend_from_slice(&buf[..n]);
                    break;
                }
            }
            if buf.len() > MAX_BODY {
                return Err("response too large".into());
            }
            if s.read_buf(buf).await? == 0 {
                if want.is_some() {
                    return Err(format!("{method} {path}: body shorter than Content-Length").into());
                }
                out.extend_from_slice(buf);
                break;
            }
        }
    }
    Ok(head.status)
}

/// `GET path`, expecting 200; the body as text.
pub async fn get_text(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, BoxError> {
    let (status, body) = request(addr, "GET", path, b"", timeout).await?;
    if status != 200 {
        return Err(format!("GET {}{path}: status {status}", crate::tls::url(addr)).into());
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_decoding_across_splits() {
        let wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7;x=y\r\n, world\r\n0\r\n\r\n";
        for split in 1..wire.len() {
            let mut buf = BytesMut::new();
            let mut head = None;
            let mut out = Vec::new();
            let mut ch = Chunked::default();
            for part in [&wire[..split], &wire[split..]] {
                buf.extend_from_slice(part);
                if head.is_none() {
                    head = parse_head(&mut buf).unwrap();
                }
                if head.is_some() {
                    ch.decode(&mut buf, &mut out).unwrap();
                }
            }
            let head = head.unwrap();
            assert_eq!(head.status, 200);
            assert!(head.chunked);
            assert!(ch.done);
            assert_eq!(out, b"hello, world");
        }
    }
}
