//! Write coalescing under hyper's HTTP/2 connections: the frames h2 writes during one poll of a
//! connection go to the socket in one `write`, not one `writev` per DATA frame.
//!
//! h2 writes a DATA payload of 256 bytes or more by chaining it behind the frame header and
//! flushing the socket before it encodes the next frame, so a connection's replies for one
//! revision (tonic hands them to h2 as one buffer, cut into frames of the client's
//! `SETTINGS_MAX_FRAME_SIZE`, 16 KiB for etcd's Go client) cost one syscall per frame, plus one
//! for each PING ack and WINDOW_UPDATE, and the client reads as many times. etcd's own server
//! (grpc-go) writes through a buffer flushed when its frame queue is empty: one `write` per
//! revision per connection. [`Coalesced`] does the same for h2: writes are copied into a
//! buffer and reported done; h2's flushes are recorded, not performed; the connection's owner
//! calls [`Drain::poll_drain`] after every poll of hyper's connection future (the poll in which
//! h2 did all the work it could), which writes the buffer in one go and flushes the transport.
//!
//! Bounds: the buffer holds at most [`LIMIT`] bytes (a write that would pass it first drains
//! the buffer, and a write of `LIMIT` or more with an empty buffer goes to the socket as is),
//! so a client that does not read makes h2 wait on the socket as before. An idle connection
//! holds no buffer: it is freed as soon as it has been written.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes held for one drain. Larger bursts are written in pieces of about this size
/// (grpc-go's server buffers 32 KiB; twice that holds a revision's replies for 100 watches of
/// 256-byte values in one write).
pub const LIMIT: usize = 64 << 10;

/// A connection's byte stream and the bytes written to it but not yet sent.
struct Shared<S> {
    /// The connection.
    io: S,
    /// Bytes h2 wrote that are not on the socket yet; empty (no allocation) when drained.
    pending: Vec<u8>,
    /// How much of `pending` the socket has taken.
    sent: usize,
}

impl<S: AsyncWrite + Unpin> Shared<S> {
    /// Writes `pending` to the socket until it is all sent, then frees it and flushes the
    /// transport (TLS encrypts into its own buffer).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.pending.len() {
            let n = match Pin::new(&mut self.io).poll_write(cx, &self.pending[self.sent..]) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        if !self.pending.is_empty() {
            self.pending = Vec::new();
            self.sent = 0;
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }
}

/// The stream hyper's HTTP/2 connection reads and writes: reads go to the connection, writes
/// into the shared buffer that [`Drain`] sends.
pub struct Coalesced<S> {
    /// Shared with the connection's [`Drain`] (the same task: the lock is never contended).
    shared: Arc<Mutex<Shared<S>>>,
}

/// The owner's handle on a [`Coalesced`] stream: sends what h2 wrote.
pub struct Drain<S> {
    /// Shared with the [`Coalesced`] stream.
    shared: Arc<Mutex<Shared<S>>>,
}

/// Wraps `io`: the stream to give hyper and the handle that sends its writes.
pub fn coalesce<S>(io: S) -> (Coalesced<S>, Drain<S>) {
    let shared = Arc::new(Mutex::new(Shared {
        io,
        pending: Vec::new(),
        sent: 0,
    }));
    (
        Coalesced {
            shared: shared.clone(),
        },
        Drain { shared },
    )
}

/// Locks `shared`; a poisoned lock (a panic while writing) still holds a usable stream.
fn lock<S>(shared: &Mutex<Shared<S>>) -> MutexGuard<'_, Shared<S>> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

impl<S: AsyncWrite + Unpin> Drain<S> {
    /// Sends every byte written so far and flushes the transport; pending while the socket
    /// is full (registers `cx`).
    pub fn poll_drain(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        lock(&self.shared).poll_drain(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesced<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.shared).io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesced<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut shared = lock(&self.shared);
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if shared.pending.len() + len > LIMIT {
            match shared.poll_drain(cx) {
                Poll::Ready(Ok(())) => {}
                other => return other.map_ok(|()| 0),
            }
            if len >= LIMIT {
                // Already one large write: no copy.
                return Pin::new(&mut shared.io).poll_write_vectored(cx, bufs);
            }
        }
        shared.pending.reserve(len);
        for b in bufs {
            shared.pending.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Recorded, not performed: the owner drains once h2 has done all it could this poll.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.shared);
        match shared.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut shared.io).poll_shutdown(cx),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Writes are held until drained, come out in order and in one piece, and the buffer is
    /// freed once sent.
    #[tokio::test]
    async fn holds_until_drained_then_frees() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let (mut io, drain) = coalesce(a);
        io.write_all(b"frame-1 ").await.unwrap();
        io.write_all(b"frame-2 ").await.unwrap();
        io.flush().await.unwrap();
        let mut got = [0u8; 16];
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(50), b.read(&mut got)).await;
        assert!(
            early.is_err(),
            "nothing may reach the socket before the drain"
        );
        std::future::poll_fn(|cx| drain.poll_drain(cx))
            .await
            .unwrap();
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"frame-1 frame-2 ");
        let shared = lock(&drain.shared);
        assert_eq!(
            shared.pending.capacity(),
            0,
            "a drained stream holds no buffer"
        );
    }

    /// A burst larger than the bound is written in pieces, never held beyond [`LIMIT`], and
    /// arrives whole and in order; a peer that does not read holds the writer back.
    #[tokio::test]
    async fn bounded_and_in_order() {
        let (a, mut b) = tokio::io::duplex(LIMIT);
        let (mut io, drain) = coalesce(a);
        let data: Vec<u8> = (0..(5 * LIMIT + 123)).map(|i| (i % 251) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = vec![0u8; 4096];
            while got.len() < 5 * LIMIT + 123 {
                let n = b.read(&mut chunk).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&chunk[..n]);
            }
            got
        });
        for piece in data.chunks(1000) {
            io.write_all(piece).await.unwrap();
            assert!(lock(&drain.shared).pending.len() <= LIMIT);
        }
        std::future::poll_fn(|cx| drain.poll_drain(cx))
            .await
            .unwrap();
        assert_eq!(reader.await.unwrap(), data);
    }

    /// Shutdown sends what is held first.
    #[tokio::test]
    async fn shutdown_drains_first() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let (mut io, _drain) = coalesce(a);
        io.write_all(b"goaway").await.unwrap();
        io.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"goaway");
    }
}
