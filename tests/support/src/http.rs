//! The one HTTP/1.1 client of the tests: whole answers (chunked bodies decoded, chunk
//! boundaries kept), streaming answers read chunk by chunk, and plain GETs for health checks
//! and metrics. Requests carry no Content-Type, as APISIX sends them.
//!
//! Written on std sockets on purpose (every read bounded by a timeout): the tests check the
//! wire framing itself (one JSON message per chunk, trailers, status lines), which a client
//! library would hide. Tests that must send malformed bytes keep their own raw socket
//! (`tests/gateway_wire.rs`).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use crate::tls::{self, Stream};

/// Default bound of one blocking read.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// One HTTP answer.
#[derive(Debug, Clone)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Header names lowercased, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body (chunked bodies joined).
    pub body: Vec<u8>,
    /// The chunks of a chunked body.
    pub chunks: Vec<Vec<u8>>,
    /// True when the body was sent chunked.
    pub chunked: bool,
}

impl Resp {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

fn request_bytes(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut out = req.into_bytes();
    out.extend_from_slice(body);
    out
}

/// A connection reading an answer incrementally.
pub struct Conn {
    sock: Stream,
    buf: Vec<u8>,
    /// Status of the answer (after [`Conn::read_head`]).
    pub status: u16,
    /// Headers of the answer.
    pub headers: Vec<(String, String)>,
    /// True when the answer is chunked.
    pub chunked: bool,
    content_length: Option<usize>,
    done: bool,
}

impl Conn {
    /// Connects and sends one request (without `Connection: close` unless in `headers`).
    pub fn send(
        port: u16,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Conn, String> {
        let mut sock = tls::connect(port).map_err(|e| e.to_string())?;
        sock.tcp().set_read_timeout(Some(READ_TIMEOUT)).ok();
        sock.tcp().set_nodelay(true).ok();
        sock.write_all(&request_bytes(method, path, headers, body))
            .map_err(|e| e.to_string())?;
        Ok(Conn {
            sock,
            buf: Vec::new(),
            status: 0,
            headers: Vec::new(),
            chunked: false,
            content_length: None,
            done: false,
        })
    }

    /// Sets the bound of each following read.
    pub fn set_timeout(&self, t: Duration) {
        self.sock.tcp().set_read_timeout(Some(t)).ok();
    }

    fn fill(&mut self) -> Result<usize, String> {
        let mut tmp = [0u8; 65536];
        match self.sock.read(&mut tmp) {
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                Ok(n)
            }
            Err(e) => Err(format!("read: {e}")),
        }
    }

    /// Reads the status line and headers.
    pub fn read_head(&mut self) -> Result<(), String> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                let mut lines = head.split("\r\n");
                let status_line = lines.next().unwrap_or_default();
                self.status = status_line
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| format!("bad status line {status_line:?}"))?;
                for l in lines {
                    if let Some((k, v)) = l.split_once(':') {
                        self.headers
                            .push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                    }
                }
                // 1xx: read the real answer.
                if (100..200).contains(&self.status) {
                    self.headers.clear();
                    continue;
                }
                self.chunked = self
                    .headers
                    .iter()
                    .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
                self.content_length = self
                    .headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .and_then(|(_, v)| v.parse().ok());
                return Ok(());
            }
            if self.fill()? == 0 {
                return Err(format!(
                    "connection closed before the answer head ({} bytes)",
                    self.buf.len()
                ));
            }
        }
    }

    /// The next chunk of a chunked body (`None` at its end), or the rest of a plain body.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, String> {
        if self.done {
            return Ok(None);
        }
        if !self.chunked {
            match self.content_length {
                Some(n) => {
                    while self.buf.len() < n {
                        if self.fill()? == 0 {
                            return Err("closed inside the body".into());
                        }
                    }
                    self.done = true;
                    return Ok(Some(self.buf.drain(..n).collect()));
                }
                None => {
                    while self.fill()? > 0 {}
                    self.done = true;
                    return Ok(Some(std::mem::take(&mut self.buf)));
                }
            }
        }
        loop {
            if let Some(eol) = find(&self.buf, b"\r\n") {
                let size_line = String::from_utf8_lossy(&self.buf[..eol]).into_owned();
                let size =
                    usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| format!("bad chunk size line {size_line:?}"))?;
                if size == 0 {
                    // Trailers until an empty line.
                    loop {
                        if let Some(end) = find(&self.buf[eol + 2..], b"\r\n") {
                            if end == 0 {
                                self.done = true;
                                return Ok(None);
                            }
                            self.buf.drain(eol + 2..eol + 2 + end + 2);
                            continue;
                        }
                        if self.fill()? == 0 {
                            self.done = true;
                            return Ok(None);
                        }
                    }
                }
                while self.buf.len() < eol + 2 + size + 2 {
                    if self.fill()? == 0 {
                        return Err("closed inside a chunk".into());
                    }
                }
                let chunk: Vec<u8> = self.buf[eol + 2..eol + 2 + size].to_vec();
                self.buf.drain(..eol + 2 + size + 2);
                return Ok(Some(chunk));
            }
            if self.fill()? == 0 {
                return Err("connection closed inside a chunked body".into());
            }
        }
    }

    /// Closes both directions (the client "vanishes").
    pub fn close(self) {
        let _ = self.sock.tcp().shutdown(Shutdown::Both);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One complete request/answer on a fresh connection.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Resp, String> {
    let mut h: Vec<(&str, &str)> = headers.to_vec();
    h.push(("Connection", "close"));
    let mut c = Conn::send(port, method, path, &h, body)?;
    c.read_head()?;
    let mut chunks = Vec::new();
    let mut body = Vec::new();
    if method != "HEAD" {
        while let Some(ch) = c.next_chunk()? {
            body.extend_from_slice(&ch);
            chunks.push(ch);
        }
    }
    Ok(Resp {
        status: c.status,
        headers: c.headers,
        body,
        chunks,
        chunked: c.chunked,
    })
}

/// `POST path` with a JSON body (no Content-Type, as APISIX sends it).
pub fn post(port: u16, path: &str, body: &str) -> Resp {
    request(port, "POST", path, &[], body.as_bytes())
        .unwrap_or_else(|e| panic!("POST {path} {body}: {e}"))
}

/// A `GET path` on a fresh connection: (status, body), the body de-chunked.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    request(port, "GET", path, &[], b"").map(|r| (r.status, r.text()))
}
