//! The byte streams a downstream connection is served over (plain TCP, or TLS over TCP) and the
//! one thing the HTTP/1.x server needs beyond reading and writing: waiting until a read would
//! make progress *without a buffer*, so an idle or streaming connection holds none.
//!
//! For TCP that is the socket's readiness. For TLS it is the same, unless rustls already holds
//! decrypted bytes (then a read returns at once): rustls reads the socket only into its own
//! record buffer, so waiting on the socket is right exactly when that plaintext is empty.
//! Writes to a TLS stream are encrypted into rustls' buffer, so a writer must `flush`.

use std::io;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A connection's byte stream.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {
    /// Ready when a read would make progress (bytes buffered, the socket readable, or its
    /// end); registers `cx` otherwise. Allocates nothing.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Transport for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

impl Transport for tokio_rustls::server::TlsStream<TcpStream> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (tcp, conn) = self.get_ref();
        // `wants_read` is false while decrypted bytes wait to be read (or after the peer's
        // close_notify, when a read returns the end at once).
        if !conn.wants_read() {
            return Poll::Ready(Ok(()));
        }
        tcp.poll_read_ready(cx)
    }
}

/// Waits until a read on `stream` would make progress (see [`Transport::poll_read_ready`]).
pub async fn readable<S: Transport>(stream: &S) -> io::Result<()> {
    std::future::poll_fn(|cx| stream.poll_read_ready(cx)).await
}
