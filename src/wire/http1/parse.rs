//! Reading and parsing a request: the head (`httparse`), its framing and connection options,
//! Go's answers to malformed requests; the body is read by [`super::body`].

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;

use super::body::{read_chunked, Failed, Framing};
use super::socket::{fill, ReadError};
use super::{send, MAX_HEAD, MAX_HEADERS};
use crate::wire::body::{BodyError, ReqBody, MAX_BODY};
use crate::wire::transport::Transport;

/// A parsed request and what the connection must do after answering it.
pub(super) struct Received {
    /// The request, its body read whole.
    pub(super) request: Request<ReqBody>,
    /// The client allows another request on this connection.
    pub(super) keep_alive: bool,
    /// The body was read to its end (false for one too large or malformed: the connection
    /// closes after the answer).
    pub(super) body_consumed: bool,
}

/// Reads the next request; `Ok(None)` when the client closed the connection between requests.
/// The head must be complete by `head_deadline` (`--request-header-timeout`): a client that
/// sends part of a head and stalls (slowloris) is closed unanswered then, as Go closes a
/// connection whose `ReadHeaderTimeout` passed.
pub(super) async fn read_request<S: Transport>(
    s: &mut S,
    buf: &mut BytesMut,
    head_deadline: Instant,
) -> Result<Option<Received>, ReadError> {
    // A head arriving in small pieces is parsed only when a new complete line may change the
    // verdict (see `HeadScan`), not on every read.
    let mut scan = HeadScan::default();
    let head = loop {
        if let Some(lines) = scan.check(buf) {
            if let Some(head) = parse_head(&buf[..lines])? {
                break head;
            }
        }
        if buf.len() >= MAX_HEAD {
            return Err(ReadError::Refuse(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                None,
            ));
        }
        let n = match tokio::time::timeout_at(head_deadline, fill(s, buf)).await {
            Ok(r) => r?,
            Err(_) => return Err(ReadError::Io),
        };
        if n == 0 {
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
            Ok((b, intact)) => (Ok(b), intact),
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

/// What has been looked at of a request head arriving in pieces. Like Go's reader, a head is
/// judged line by line as its lines complete, and never on a line still arriving: the head
/// (up to its last complete line) is parsed when the request line arrives, when a new header
/// line is one `httparse` refuses (so a malformed line is answered at once, as Go answers it,
/// not when the head ends), when there are more lines than [`MAX_HEADERS`], and when the blank
/// line ending the head arrives. Each byte is scanned once, and each new line parsed once on
/// its own: a head trickled in small pieces costs no re-parse per read.
#[derive(Debug, Default)]
pub(super) struct HeadScan {
    /// Bytes of the buffer scanned so far.
    scanned: usize,
    /// Start of the first line not complete yet.
    line_start: usize,
    /// Complete lines so far.
    lines: usize,
    /// A non-empty line (the request line) is complete: until then every new line is parsed
    /// with the whole head (`httparse` skips empty lines before the request line).
    request_line: bool,
}

impl HeadScan {
    /// With the bytes of `buf` after those seen before: the end of its last complete line
    /// when the head should be parsed up to there now.
    pub(super) fn check(&mut self, buf: &[u8]) -> Option<usize> {
        let from = self.scanned.min(buf.len());
        self.scanned = buf.len();
        let end = from + buf[from..].iter().rposition(|b| *b == b'\n')? + 1;
        let new_lines = &buf[self.line_start..end];
        self.line_start = end;
        self.lines += new_lines.iter().filter(|b| **b == b'\n').count();
        if !self.request_line {
            self.request_line = new_lines
                .split(|b| *b == b'\n')
                .any(|l| !l.is_empty() && l != b"\r");
            return Some(end);
        }
        if self.lines > MAX_HEADERS + 1 {
            return Some(end);
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match httparse::parse_headers(new_lines, &mut headers) {
            // Valid header lines, and the head goes on.
            Ok(httparse::Status::Partial) => None,
            // The blank line (the head is complete) or a refused line.
            _ => Some(end),
        }
    }
}

/// A parsed request head.
pub(super) struct Head {
    /// Bytes of the head in the buffer.
    pub(super) consumed: usize,
    /// Method, target, version, headers.
    pub(super) parts: http::request::Parts,
    /// How the body follows.
    pub(super) framing: Framing,
    /// The client allows another request after this one.
    pub(super) keep_alive: bool,
    /// The client waits for `100 Continue` before sending the body.
    pub(super) expect_continue: bool,
}

/// Parses a complete request head at the start of `buf` (`None`: not complete yet).
pub(super) fn parse_head(buf: &[u8]) -> Result<Option<Head>, ReadError> {
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
        Err(httparse::Error::HeaderName) => {
            return Err(match missing_colon(buf) {
                // Go's textproto: "malformed MIME header line", a plain 400.
                true => bad(),
                false => bad_because("invalid header name"),
            });
        }
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

/// Whether the first refused header line of `buf` is one without a colon (Go's textproto
/// refuses it as a malformed line, before looking at any name): the lines before it are
/// valid, so it is the first line after the request line with no colon, unless a line with a
/// colon and an invalid name comes first.
fn missing_colon(buf: &[u8]) -> bool {
    let token = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    for line in buf.split(|b| *b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        match line.iter().position(|b| *b == b':') {
            None => return true,
            Some(i) if i == 0 || !line[..i].iter().all(token) => return false,
            Some(_) => {}
        }
    }
    false
}

/// Go's `400 Bad Request: <detail>`.
pub(super) fn bad_because(detail: &'static str) -> ReadError {
    ReadError::Refuse(StatusCode::BAD_REQUEST, Some(detail))
}

/// Whether a comma-separated header value holds `token` (case-insensitive).
pub(super) fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .as_bytes()
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Go's answer to a request it cannot serve (`http.Server`'s `400 Bad Request` and kin: the
/// detail goes into the status line too).
pub(super) fn go_error(status: StatusCode, detail: Option<&str>) -> Vec<u8> {
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
