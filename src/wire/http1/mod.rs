//! HTTP/1.x connections: the wire of the JSON gateway (APISIX, etcd3gw, curl).
//!
//! A small server of its own instead of hyper's HTTP/1 server, for memory: hyper keeps an
//! 8 KiB header write buffer and an 8 to 16 KiB read buffer for as long as a connection is open,
//! which was two thirds of what an open APISIX watch connection cost (37 KB allocated, 24 KB of
//! it hyper's buffers), and a fleet of sidecars holds tens of thousands of them. Here a
//! connection owns no buffer while it waits: a request is read into a buffer dropped once the
//! request is parsed (the body keeps only its own bytes), an answer is written straight from its
//! body's chunks, and while an answer streams (a watch) the connection only waits for the socket
//! to turn readable, to notice the client leaving. Parsing is `httparse`'s (hyper's parser).
//!
//! What it speaks, as Go's `net/http` server does for etcd's gateway:
//! - keep-alive, pipelined requests answered in order; HTTP/1.0 requests answered, then closed
//!   unless they ask for keep-alive;
//! - request bodies by `Content-Length` or chunked, up to [`MAX_BODY`] (a larger one is not read,
//!   and a malformed chunked one not further: the handler sees a body that fails with Go's
//!   words, answers, and the connection closes), and `Expect: 100-continue`;
//! - answers framed by `Content-Length` when their size is known and chunked otherwise, with
//!   trailers when the body has some (Go sends declared trailers to every client); `Date` added;
//!   header names written in Go's canonical case (`Content-Type`); nothing after the head of a
//!   `HEAD` answer, a 1xx, 204 or 304;
//! - a malformed request gets Go's `400 Bad Request` (`431 Request Header Fields Too Large` for
//!   a head over [`MAX_HEAD`]) and the connection is closed.
//!
//! Over plain TCP or TLS ([`Transport`]): reads wait for readiness first and only then take a
//! buffer; over TLS rustls keeps its own record buffer (see ARCHITECTURE.md for the cost).

mod body;
mod parse;
mod socket;
mod write;

use std::future::Future;
use std::time::Duration;

use bytes::BytesMut;
use futures::FutureExt;
use http::{Method, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::wire::body::ReqBody;
use crate::wire::transport::{readable, Transport};
use parse::{go_error, read_request};
use socket::ReadError;
use write::{write_response, Asked};

/// Largest request head (request line and headers), as Go's `DefaultMaxHeaderBytes`.
pub const MAX_HEAD: usize = 1 << 20;

/// Most header lines in one request.
pub(crate) const MAX_HEADERS: usize = 128;

/// First read buffer of a request: enough for a typical APISIX request in one read.
pub(crate) const READ_CHUNK: usize = 2048;

/// The deadlines of an HTTP/1.x connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// A request head must be complete this long after its first byte arrived (after the
    /// connection was accepted, for the first request): `--request-header-timeout`.
    pub header: Duration,
    /// A kept-alive connection may wait this long for its next request: `--idle-timeout`.
    pub idle: Duration,
}

/// Serves HTTP/1.x requests on `stream` until the client leaves, a request is malformed, a
/// deadline of `timeouts` passes, or `shutdown` turns true. `buffered` holds bytes already
/// read from the stream (the start of the first request) and `accepted` is when the
/// connection was accepted. Every request goes to `handler`, whose future should be boxed so
/// that the connection's own state stays small however large the handler is; it is dropped
/// as soon as the client leaves.
pub async fn serve<S, F, Fut>(
    mut stream: S,
    buffered: BytesMut,
    handler: F,
    mut shutdown: watch::Receiver<bool>,
    timeouts: Timeouts,
    accepted: Instant,
) where
    S: Transport,
    F: Fn(Request<ReqBody>) -> Fut,
    Fut: Future<Output = Response<tonic::body::Body>>,
{
    let s = &mut stream;
    let mut buf = buffered;
    let mut first = true;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let head_deadline = if first {
            // The first request's head is due from the accept, bytes or not.
            accepted + timeouts.header
        } else {
            if buf.is_empty() {
                // Wait for the next request holding no buffer at all.
                buf = BytesMut::new();
                tokio::select! {
                    r = readable(s) => if r.is_err() { return },
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(timeouts.idle) => return,
                }
            }
            Instant::now() + timeouts.header
        };
        first = false;
        // Boxed: a connection streaming an answer (a watch) keeps no room for the parser's
        // state and deadline.
        let incoming = match Box::pin(read_request(s, &mut buf, head_deadline)).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(ReadError::Io) => return,
            Err(ReadError::Refuse(status, detail)) => {
                let _ = send(s, &go_error(status, detail)).await;
                return;
            }
        };
        // Taken apart whole: a partly moved `incoming` would keep its request's room in this
        // future for the life of the answer.
        let parse::Received {
            request,
            keep_alive,
            body_consumed,
        } = incoming;
        let asked = Asked {
            head_only: request.method() == Method::HEAD,
            version: request.version(),
            keep_alive: keep_alive && body_consumed && !*shutdown.borrow(),
        };
        let response = {
            let answer = handler(request);
            tokio::pin!(answer);
            loop {
                if buf.len() >= MAX_HEAD {
                    // Enough pipelined bytes are waiting: read no more until they are used.
                    break answer.await;
                }
                tokio::select! {
                    biased;
                    r = &mut answer => break r,
                    left = client_left(s, &mut buf) => if left {
                        // The client is gone: drop its handler now and close (no CLOSE-WAIT).
                        return;
                    },
                }
            }
        };
        // Asked to end meanwhile (max connection age, shutdown): this answer is the last one
        // (`Connection: close`).
        let asked = Asked {
            keep_alive: asked.keep_alive && !*shutdown.borrow(),
            ..asked
        };
        match write_response(s, &mut buf, response, asked).await {
            Ok(true) => {}
            _ => return,
        }
    }
}

/// Writes `bytes` and flushes them (a TLS stream holds written bytes until flushed).
pub(super) async fn send<S: Transport>(s: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(bytes).await?;
    s.flush().await
}

/// The head parser as the fuzz targets drive it (`crate::fuzzing`): `data` parsed whole (up
/// to its last complete line, as a connection parses it), and fed in pieces of `piece` bytes
/// the way a connection reads it (parsed only when [`parse::HeadScan`] says so). Both must
/// agree on the outcome: the same head end, or the same refusal; a chunk size line is parsed
/// from the same bytes.
pub(crate) fn fuzz_head(data: &[u8], piece: usize) {
    let outcome = |r: Result<Option<parse::Head>, ReadError>| match r {
        Ok(Some(h)) => Ok(Some(h.consumed)),
        Ok(None) => Ok(None),
        Err(ReadError::Io) => Err(None),
        Err(ReadError::Refuse(status, detail)) => Err(Some((status, detail))),
    };
    let lines = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let whole = outcome(parse::parse_head(&data[..lines]));
    let mut scan = parse::HeadScan::default();
    let mut incremental = Ok(None);
    let mut end = 0;
    while end < data.len() {
        end = (end + piece.max(1)).min(data.len());
        if let Some(lines) = scan.check(&data[..end]) {
            incremental = outcome(parse::parse_head(&data[..lines]));
            if incremental != Ok(None) {
                break;
            }
        }
    }
    assert_eq!(
        whole, incremental,
        "a head read in pieces differs from the whole"
    );
    let _ = body::parse_chunk_size(data);
}

/// Waits until the socket is readable, then keeps what arrived (a pipelined request) and
/// says whether the client has gone (end of stream or error). Holds no buffer while waiting.
async fn client_left<S: Transport>(s: &mut S, buf: &mut BytesMut) -> bool {
    if readable(s).await.is_err() {
        return true;
    }
    if buf.capacity() - buf.len() < READ_CHUNK / 2 {
        buf.reserve(READ_CHUNK);
    }
    // One read attempt; `None`: nothing after all (a spurious wake-up, or TLS bytes that
    // completed no record yet).
    match s.read_buf(buf).now_or_never() {
        None => false,
        Some(Ok(0)) | Some(Err(_)) => true,
        Some(Ok(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::body::{parse_chunk_size, Framing};
    use super::parse::{parse_head, Head};
    use super::write::{write_chunk_size, write_header};
    use super::*;
    use http::StatusCode;

    fn head(text: &str) -> Result<Option<Head>, StatusCode> {
        parse_head(text.as_bytes()).map_err(|e| match e {
            ReadError::Refuse(s, _) => s,
            ReadError::Io => StatusCode::IM_A_TEAPOT,
        })
    }

    #[test]
    fn parses_heads_and_framing() {
        let text = "POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n{}";
        let h = head(text).unwrap().unwrap();
        assert!(matches!(h.framing, Framing::Length(12)));
        assert!(h.keep_alive);
        assert_eq!(h.parts.uri.path(), "/v3/kv/range");
        assert_eq!(h.consumed, text.len() - 2);
        let h = head("POST /v3/watch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(matches!(h.framing, Framing::Chunked));
        assert!(!h.keep_alive);
        let h = head("GET /version HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        assert!(matches!(h.framing, Framing::Empty));
        let h = head("GET /version HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        assert!(head("GET /version HTTP/1.1\r\nHost: x\r\n")
            .unwrap()
            .is_none());
    }

    #[test]
    fn refuses_malformed_heads() {
        for bad in [
            "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST /x HTTP/1.1\r\nBad Header: 1\r\n\r\n",
        ] {
            assert_eq!(head(bad).err(), Some(StatusCode::BAD_REQUEST), "{bad:?}");
        }
        assert_eq!(head("GARBAGE\r\n\r\n").err(), Some(StatusCode::IM_A_TEAPOT));
        assert_eq!(
            head("GET / HTTP/1.1\r\n\r\n").err(),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            head("POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n").err(),
            Some(StatusCode::NOT_IMPLEMENTED)
        );
        let many: String = (0..200).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(
            head(&format!("GET / HTTP/1.1\r\n{many}\r\n")).err(),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_parser() {
        // Every prefix of valid requests, and pseudo-random mutations of them.
        let seeds: [&[u8]; 3] = [
            b"POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n{}",
            b"POST /v3/watch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
            b"GET /version HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for seed in seeds {
            for cut in 0..=seed.len() {
                let _ = parse_head(&seed[..cut]);
            }
            for _ in 0..2000 {
                let mut bytes = seed.to_vec();
                for _ in 0..1 + next() % 4 {
                    let i = (next() as usize) % bytes.len();
                    bytes[i] = next() as u8;
                }
                let _ = parse_head(&bytes);
            }
        }
    }

    /// Found by the `http1_body` fuzz target: a malformed header line was judged only once
    /// the head's blank line arrived (never, from a client that then waits), where Go answers
    /// it as soon as the line is complete; and a line still arriving must not be judged.
    #[test]
    fn header_lines_are_judged_as_they_complete() {
        let text = b"POST /v3/kv/range HTTP/1.1\r\nHost: x\r\n{}\r\nX: 1\r";
        let mut scan = parse::HeadScan::default();
        let mut verdict = None;
        for end in 1..=text.len() {
            if let Some(lines) = scan.check(&text[..end]) {
                match parse_head(&text[..lines]) {
                    Ok(None) => {}
                    Ok(Some(_)) => panic!("a head without its end parsed"),
                    Err(ReadError::Refuse(status, detail)) => {
                        verdict = Some((end, status, detail));
                        break;
                    }
                    Err(ReadError::Io) => panic!("refused unanswered"),
                }
            }
        }
        let bad_line_end = text.windows(4).position(|w| w == b"{}\r\n").map(|i| i + 4);
        assert_eq!(
            verdict,
            // Go's plain 400 for a line without a colon (tests/gateway_wire.rs diffs it).
            Some((bad_line_end.unwrap_or(0), StatusCode::BAD_REQUEST, None))
        );
        // A valid head in one-byte pieces is parsed when its request line and its end arrive
        // only (and at each header line on its own, not the whole head).
        let text = b"GET /version HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\n";
        let mut scan = parse::HeadScan::default();
        let parses: Vec<usize> = (1..=text.len())
            .filter_map(|end| scan.check(&text[..end]))
            .collect();
        assert_eq!(parses, [23, text.len()]);
        // Found by `http1_head`: after an empty first line, the next line is the request line
        // (httparse skips empty lines before it), not a header line.
        let text = b"\nvio:n: x\n";
        let mut scan = parse::HeadScan::default();
        let judged: Vec<bool> = (1..=text.len())
            .filter_map(|end| scan.check(&text[..end]))
            .map(|lines| matches!(parse_head(&text[..lines]), Err(ReadError::Io)))
            .collect();
        assert_eq!(
            judged,
            [false, true],
            "a bad request line after an empty line"
        );
    }

    #[test]
    fn chunk_sizes_parse_as_go_reads_them() {
        assert_eq!(parse_chunk_size(b"1a").ok(), Some(26));
        assert_eq!(parse_chunk_size(b"FFFFFFFFFFFFFFFF").ok(), Some(u64::MAX));
        for (bad, why) in [
            (&b""[..], "empty hex number for chunk length"),
            (b"zz", "invalid byte in chunk length"),
            (b"-1", "invalid byte in chunk length"),
            (b"10000000000000000", "http chunk length too large"),
        ] {
            assert_eq!(
                parse_chunk_size(bad).err().map(|e| e.to_string()),
                Some(why.into())
            );
        }
    }

    #[test]
    fn chunk_size_lines() {
        for n in [1usize, 15, 16, 255, 4096, 0x1A2B3C] {
            let mut out = Vec::new();
            write_chunk_size(&mut out, n);
            assert_eq!(out, format!("{n:x}\r\n").into_bytes());
        }
    }

    #[test]
    fn canonical_header_case() {
        let mut out = Vec::new();
        write_header(&mut out, "grpc-metadata-content-type", b"application/grpc");
        assert_eq!(out, b"Grpc-Metadata-Content-Type: application/grpc\r\n");
    }
}
