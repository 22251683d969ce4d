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

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Buf, Bytes, BytesMut};
use futures::FutureExt;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::wire::transport::{readable, Transport};

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

/// Largest request head (request line and headers), as Go's `DefaultMaxHeaderBytes`.
pub const MAX_HEAD: usize = 1 << 20;

/// Largest request body read into memory (the gateway's limit: nothing larger can be a valid
/// etcd request).
pub const MAX_BODY: usize = 32 << 20;

/// Most header lines in one request.
const MAX_HEADERS: usize = 128;

/// Longest chunk-size line of a chunked request body.
const MAX_CHUNK_LINE: usize = 4096;

/// First read buffer of a request: enough for a typical APISIX request in one read.
const READ_CHUNK: usize = 2048;

/// Serves HTTP/1.x requests on `stream` until the client leaves, a request is malformed, or
/// `shutdown` turns true. `buffered` holds bytes already read from the stream (the start of
/// the first request). Every request goes to `handler`, whose future should be boxed so that
/// the connection's own state stays small however large the handler is.
pub async fn serve<S, F, Fut>(
    mut stream: S,
    buffered: BytesMut,
    handler: F,
    mut shutdown: watch::Receiver<bool>,
) where
    S: Transport,
    F: Fn(Request<ReqBody>) -> Fut,
    Fut: Future<Output = Response<tonic::body::Body>>,
{
    let s = &mut stream;
    let mut buf = buffered;
    loop {
        if *shutdown.borrow() {
            return;
        }
        if buf.is_empty() {
            // Wait for the next request holding no buffer at all.
            buf = BytesMut::new();
            tokio::select! {
                r = readable(s) => if r.is_err() { return },
                _ = shutdown.changed() => return,
            }
        }
        let incoming = match read_request(s, &mut buf).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(ReadError::Io) => return,
            Err(ReadError::Refuse(status, detail)) => {
                let _ = send(s, &go_error(status, detail)).await;
                return;
            }
        };
        let asked = Asked {
            head_only: incoming.request.method() == Method::HEAD,
            version: incoming.request.version(),
            keep_alive: incoming.keep_alive && incoming.body_consumed && !*shutdown.borrow(),
        };
        let response = handler(incoming.request).await;
        match write_response(s, &mut buf, response, asked).await {
            Ok(true) => {}
            _ => return,
        }
    }
}

/// A parsed request and what the connection must do after answering it.
struct Received {
    /// The request, its body read whole.
    request: Request<ReqBody>,
    /// The client allows another request on this connection.
    keep_alive: bool,
    /// The body was read to its end (false for one too large or malformed: the connection
    /// closes after the answer).
    body_consumed: bool,
}

/// Why no request could be read.
enum ReadError {
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

/// How the request's body is framed.
enum Framing {
    /// No body.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked.
    Chunked,
}

/// Reads bytes that are ready into `buf` (growing it by at least `READ_CHUNK`), waiting for
/// the socket if none are. `Ok(0)` is the end of the stream.
async fn fill<S: Transport>(s: &mut S, buf: &mut BytesMut) -> io::Result<usize> {
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

/// Writes `bytes` and flushes them (a TLS stream holds written bytes until flushed).
async fn send<S: Transport>(s: &mut S, bytes: &[u8]) -> io::Result<()> {
    s.write_all(bytes).await?;
    s.flush().await
}

/// Reads the next request; `Ok(None)` when the client closed the connection between requests.
async fn read_request<S: Transport>(
    s: &mut S,
    buf: &mut BytesMut,
) -> Result<Option<Received>, ReadError> {
    let head = loop {
        if !buf.is_empty() {
            if let Some(head) = parse_head(buf)? {
                break head;
            }
        }
        if buf.len() >= MAX_HEAD {
            return Err(ReadError::Refuse(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                None,
            ));
        }
        if fill(s, buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(ReadError::Io)
            };
        }
    };
    let Head {
        consumed,
        parts,
        framing,
        keep_alive,
        expect_continue,
    } = head;
    buf.advance(consumed);
    let too_large = match framing {
        Framing::Length(n) => n > MAX_BODY as u64,
        _ => false,
    };
    if expect_continue && !too_large && !matches!(framing, Framing::Empty) {
        send(s, b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }
    let (body, consumed) = match framing {
        Framing::Empty => (Ok(Bytes::new()), true),
        Framing::Length(_) if too_large => (Err(BodyError::TooLarge), false),
        Framing::Length(n) => {
            // `n` is at most MAX_BODY here.
            let n = n as usize;
            if buf.len() < n {
                // Grow with what arrives: a declared length alone reserves little.
                buf.reserve((n - buf.len()).min(64 << 10));
            }
            while buf.len() < n {
                if fill(s, buf).await? == 0 {
                    return Err(ReadError::Io);
                }
            }
            (Ok(buf.split_to(n).freeze()), true)
        }
        Framing::Chunked => match read_chunked(s, buf).await? {
            Ok(b) => (Ok(b), true),
            Err(e) => (Err(e), false),
        },
    };
    if buf.is_empty() {
        // Free the read buffer: the body (if any) keeps only what it shares with it.
        *buf = BytesMut::new();
    }
    let body = match body {
        Ok(b) => Full::new(b).map_err(|never| match never {}).boxed(),
        Err(e) => Failed(Some(e)).boxed(),
    };
    Ok(Some(Received {
        request: Request::from_parts(parts, body),
        keep_alive,
        body_consumed: consumed,
    }))
}

/// A parsed request head.
struct Head {
    /// Bytes of the head in the buffer.
    consumed: usize,
    /// Method, target, version, headers.
    parts: http::request::Parts,
    /// How the body follows.
    framing: Framing,
    /// The client allows another request after this one.
    keep_alive: bool,
    /// The client waits for `100 Continue` before sending the body.
    expect_continue: bool,
}

/// Parses a complete request head at the start of `buf` (`None`: not complete yet).
fn parse_head(buf: &[u8]) -> Result<Option<Head>, ReadError> {
    let bad = || ReadError::Refuse(StatusCode::BAD_REQUEST, None);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ReadError::Refuse(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                None,
            ))
        }
        Err(httparse::Error::HeaderName) => return Err(bad_because("invalid header name")),
        Err(httparse::Error::HeaderValue) => return Err(bad_because("invalid header value")),
        // Not an HTTP/1.x request line.
        Err(httparse::Error::Token | httparse::Error::Version) => return Err(ReadError::Io),
        Err(_) => return Err(bad()),
    };
    if consumed > MAX_HEAD {
        return Err(ReadError::Refuse(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            None,
        ));
    }
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes()).map_err(|_| bad())?;
    let uri: http::Uri = req.path.unwrap_or("").parse().map_err(|_| bad())?;
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut map = HeaderMap::with_capacity(req.headers.len());
    let (mut length, mut chunked, mut close, mut keep_alive_token) = (None, false, false, false);
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad())?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| bad())?;
        if name == http::header::CONTENT_LENGTH {
            let n: u64 = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(bad)?;
            if length.is_some_and(|l| l != n) {
                return Err(bad());
            }
            length = Some(n);
        } else if name == http::header::TRANSFER_ENCODING {
            if !has_token(&value, "chunked") || version == Version::HTTP_10 {
                return Err(ReadError::Refuse(StatusCode::NOT_IMPLEMENTED, None));
            }
            chunked = true;
        } else if name == http::header::CONNECTION {
            close |= has_token(&value, "close");
            keep_alive_token |= has_token(&value, "keep-alive");
        } else if name == http::header::EXPECT {
            expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
        }
        map.append(name, value);
    }
    if chunked && length.is_some() {
        // Go refuses a request with both.
        return Err(bad());
    }
    // Go's checks of the Host header.
    let hosts = map.get_all(http::header::HOST).iter().count();
    if version == Version::HTTP_11 && hosts == 0 && method != Method::CONNECT {
        return Err(bad_because("missing required Host header"));
    }
    if hosts > 1 {
        return Err(bad());
    }
    let framing = match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) if n > 0 => Framing::Length(n),
        _ => Framing::Empty,
    };
    let keep_alive = match version {
        Version::HTTP_10 => keep_alive_token && !close,
        _ => !close,
    };
    let mut builder = Request::builder().method(method).uri(uri).version(version);
    if let Some(h) = builder.headers_mut() {
        *h = map;
    }
    let parts = builder.body(()).map_err(|_| bad())?.into_parts().0;
    Ok(Some(Head {
        consumed,
        parts,
        framing,
        keep_alive,
        expect_continue,
    }))
}

/// Go's `400 Bad Request: <detail>`.
fn bad_because(detail: &'static str) -> ReadError {
    ReadError::Refuse(StatusCode::BAD_REQUEST, Some(detail))
}

/// Reads a chunked body. `Ok(Err(_))`: the body is over [`MAX_BODY`] or its framing is
/// malformed; the handler sees that error (as Go's handlers do), and the connection closes.
async fn read_chunked<S: Transport>(
    s: &mut S,
    buf: &mut BytesMut,
) -> Result<Result<Bytes, BodyError>, ReadError> {
    let mut body = BytesMut::new();
    loop {
        // The chunk-size line.
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
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
        buf.advance(line_end + 2);
        if size == 0 {
            // Trailers, up to an empty line.
            loop {
                let end = loop {
                    if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
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
                buf.advance(end + 2);
                if end == 0 {
                    return Ok(Ok(body.freeze()));
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
            return Ok(Err(BodyError::Malformed("malformed chunked encoding")));
        }
        buf.advance(size + 2);
    }
}

/// A chunk size in hex, with the errors of Go's chunked reader.
fn parse_chunk_size(hex: &[u8]) -> Result<u64, BodyError> {
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
struct Failed(Option<BodyError>);

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

/// Whether a comma-separated header value holds `token` (case-insensitive).
fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .as_bytes()
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Go's answer to a request it cannot serve (`http.Server`'s `400 Bad Request` and kin: the
/// detail goes into the status line too).
fn go_error(status: StatusCode, detail: Option<&str>) -> Vec<u8> {
    let mut line = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    if let Some(d) = detail {
        line = format!("{line}: {d}");
    }
    let text = match status {
        StatusCode::NOT_IMPLEMENTED => "Unsupported transfer encoding",
        _ => line.as_str(),
    };
    format!(
        "HTTP/1.1 {line}\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n{text}"
    )
    .into_bytes()
}

/// How an answer's body is framed on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Out {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    /// As is: `Content-Length` set, or HTTP/1.0 close-delimited.
    Plain,
    /// Chunked.
    Chunked,
}

/// What the request asked of its answer.
#[derive(Clone, Copy)]
struct Asked {
    /// A `HEAD` request: the head only.
    head_only: bool,
    /// The request's HTTP version.
    version: Version,
    /// The connection may serve another request after this one.
    keep_alive: bool,
}

/// Writes `response`; while its body streams, watches the socket so that a client leaving
/// ends the answer (and the watch behind it) at once. Bytes of a pipelined next request that
/// arrive meanwhile are kept in `buf`. `Ok(true)`: the connection can serve another request.
async fn write_response<S: Transport>(
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
            let size = chunked.then(|| format!("{:X}\r\n", data.len()));
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
const LARGE_FRAME: usize = 16 << 10;

/// Appends a chunk-size line (`1A2\r\n`).
fn write_chunk_size(out: &mut Vec<u8>, n: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b"0123456789ABCDEF"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// Reads what the client sent while an answer streams. `Ok(false)`: the client closed.
fn keep_pipelined<S: Transport>(s: &mut S, buf: &mut BytesMut) -> io::Result<bool> {
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
fn write_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
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
async fn write_all<S: Transport>(s: &mut S, parts: &[&[u8]]) -> io::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
            assert_eq!(out, format!("{n:X}\r\n").into_bytes());
        }
    }

    #[test]
    fn canonical_header_case() {
        let mut out = Vec::new();
        write_header(&mut out, "grpc-metadata-content-type", b"application/grpc");
        assert_eq!(out, b"Grpc-Metadata-Content-Type: application/grpc\r\n");
    }
}
