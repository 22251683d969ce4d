//! The HTTP/1.x connection fuzz target: request bytes (heads and bodies, by `Content-Length`
//! or chunked) fed to the real connection loop (`wire::http1::serve`) over an in-memory
//! transport, whole and in pieces.
//!
//! Properties: nothing panics or hangs (the loop ends at the end of the input, deadlines
//! run on a paused clock); what the handler sees (each request's method, target and body, or
//! why its body could not be read) and what is written back (minus `Date`) are the same
//! whatever the read sizes; and a well-formed chunked body built from the input (arbitrary
//! chunk sizes, extensions, trailers) reads back as the bytes it encodes, with the pipelined
//! request after it intact.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::wire::body::ReqBody;
use crate::wire::http1::{serve, Timeouts};
use crate::wire::transport::Transport;

/// A client connection: `data` delivered at most `piece` bytes per read, then the end of the
/// stream; what the server writes is kept.
struct Pieces {
    /// Everything the client sends.
    data: Vec<u8>,
    /// Bytes delivered so far.
    pos: usize,
    /// Most bytes per read.
    piece: usize,
    /// What the server wrote.
    written: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Pieces {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let n = this
            .piece
            .min(this.data.len() - this.pos)
            .min(buf.remaining());
        buf.put_slice(&this.data[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Pieces {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Ok(mut w) = self.written.lock() {
            w.extend_from_slice(buf);
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Transport for Pieces {
    fn poll_read_ready(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// What the handler saw of one request: method, target, and the body or why it failed.
type Seen = (String, String, Result<Vec<u8>, String>);

/// Serves `data` as one connection read `piece` bytes at a time: the requests the handler
/// saw and the bytes written back, `Date` lines removed.
fn serve_all(data: &[u8], piece: usize) -> (Vec<Seen>, Vec<u8>) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
    else {
        return (Vec::new(), Vec::new());
    };
    let seen: Rc<RefCell<Vec<Seen>>> = Rc::default();
    let written: Arc<Mutex<Vec<u8>>> = Arc::default();
    rt.block_on(async {
        let conn = Pieces {
            data: data.to_vec(),
            pos: 0,
            piece,
            written: written.clone(),
        };
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let log = seen.clone();
        let handler = move |req: Request<ReqBody>| {
            let log = log.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|c| c.to_bytes().to_vec())
                    .map_err(|e| e.to_string());
                let echo = body.clone().unwrap_or_default();
                log.borrow_mut()
                    .push((parts.method.to_string(), parts.uri.to_string(), body));
                Response::new(tonic::body::Body::new(Full::new(Bytes::from(echo))))
            }
        };
        let timeouts = Timeouts {
            header: Duration::from_secs(30),
            idle: Duration::from_secs(300),
        };
        serve(
            conn,
            BytesMut::new(),
            handler,
            shutdown,
            timeouts,
            tokio::time::Instant::now(),
        )
        .await;
    });
    let written = written.lock().map(|w| w.clone()).unwrap_or_default();
    let kept: Vec<u8> = written
        .split_inclusive(|b| *b == b'\n')
        .filter(|line| !line.starts_with(b"Date: "))
        .flatten()
        .copied()
        .collect();
    let seen = seen.borrow().clone();
    (seen, kept)
}

/// A request with a well-formed chunked body encoding `body` in chunks whose sizes, size
/// spellings and extensions come from `shape`, with a trailer, followed by a pipelined
/// `GET /version`.
fn chunked_request(body: &[u8], shape: &[u8]) -> Vec<u8> {
    let mut out =
        b"POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let mut rest = body;
    let mut shape = shape.iter().copied().cycle();
    while !rest.is_empty() {
        let s = shape.next().unwrap_or(7);
        let n = (usize::from(s % 16) + 1).min(rest.len());
        match s >> 6 {
            0 => out.extend_from_slice(format!("{n:x}").as_bytes()),
            1 => out.extend_from_slice(format!("{n:X}").as_bytes()),
            2 => out.extend_from_slice(format!("000{n:x}").as_bytes()),
            _ => out.extend_from_slice(format!("{n:x};ext=\"v\"").as_bytes()),
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    out.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\nGET /version HTTP/1.1\r\nHost: x\r\n\r\n");
    out
}

/// The entry point: the first byte picks the read size and the mode (raw bytes, raw bytes
/// after a chunked or a `Content-Length` head, or a well-formed chunked body).
pub fn http1_body(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let piece = usize::from(mode & 0x1f) + 1;
    let input = match mode >> 5 {
        0 | 1 => rest.to_vec(),
        2 | 3 => {
            let mut v = b"POST /v3/watch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec();
            v.extend_from_slice(rest);
            v
        }
        4 | 5 => {
            let (&n, rest) = rest.split_first().unwrap_or((&0, &[]));
            let mut v =
                format!("POST /v3/kv/put HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n")
                    .into_bytes();
            v.extend_from_slice(rest);
            v
        }
        _ => {
            let split = rest.len() / 4;
            let (shape, body) = rest.split_at(split);
            let input = chunked_request(body, shape);
            let (seen, _) = serve_all(&input, piece);
            assert_eq!(seen.len(), 2, "a chunked request and the one after it");
            assert_eq!(seen[0].2.as_deref(), Ok(body), "a chunked body reads back");
            assert_eq!(
                (seen[1].0.as_str(), seen[1].1.as_str()),
                ("GET", "/version")
            );
            input
        }
    };
    let whole = serve_all(&input, input.len().max(1));
    let pieces = serve_all(&input, piece);
    assert_eq!(whole, pieces, "read sizes changed what was served");
}
