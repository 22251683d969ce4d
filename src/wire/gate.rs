//! Write turns: a connection that has not yet shown that its client reads makes its large
//! writes one connection at a time, so that a crowd of new connections cannot hold up the
//! clients that are reading.
//!
//! Why: a client's socket takes its receive window plus the unsent bound
//! (`--socket-unsent-bytes`) before its writer blocks, whether the client reads or not. When a
//! large event reaches thousands of fresh connections whose clients never read, each takes
//! that much in one kernel copy (3,000 non-readers and a 100 KB event: some 240 MB). Without
//! turns every one of those copies sat in the runtime's run queue, and a reading client's next
//! replies waited behind all of them (loadtest/RESULTS.md, "Slow readers").
//!
//! How: [`Gated`] wraps a connection's byte stream and knows one of three things about it.
//! - *Fresh*: each write of [`LARGE`] bytes or more first takes one of the process's turns
//!   ([`Turns`], a fair semaphore: waiters are served in order, outside the run queue) and
//!   gives it back as soon as that write returns. A turn is never held while a socket is
//!   full, so a client that does not read cannot keep one.
//! - *Stalled*: a write was cut short or would have blocked (the socket is full). The next
//!   write needs no turn: the runtime tries it only once the socket has room again.
//! - *Proven*: a write succeeded after a stall (the client made room by reading), a large
//!   write was taken whole, or [`PROVEN`] bytes went out. No write waits for a turn again.
//!
//! Turns order work; they never drop or reorder a connection's bytes.
//!
//! The same knowledge moves a connection between lanes (`wire::lanes`): a fresh connection's
//! large write first asks for the new-connection lane (the write waits until the connection
//! is there), and a proven client that has taken [`LANE_PROOF`] bytes, or a connection of
//! [`SETTLED`] small writes, leaves it.
//!
//! Limit: a client that never reads can look proven. After its socket filled, the kernel makes
//! some room in its receive buffer without the client reading (measured: a first 137 KB write
//! cut short at about 98 KB, a later 32 KiB taken whole, 128 KiB in all, the default buffer),
//! and a write that fits in a fresh buffer is taken whole. The turns accept that (the copy
//! was cheap); the lane asks for [`LANE_PROOF`] as well.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;

use crate::wire::lanes::Place;
use crate::wire::transport::Transport;

/// Bytes a connection may write without a stall before it counts as reading.
pub const PROVEN: u64 = 512 << 10;

/// Writes smaller than this never wait (answers, small events: cheap to copy).
pub const LARGE: usize = 16 << 10;

/// Bytes a proven client must have taken before its connection leaves the new-connection
/// lane (`wire::lanes`): more than a client that never reads can hold with a default
/// receive buffer (128 KiB) and the unsent bound.
pub const LANE_PROOF: u64 = 256 << 10;

/// Small writes (and no large one) after which a connection leaves the new-connection lane
/// although its client is not proven (`wire::lanes`): a watcher of small events. Low, because
/// a busy watcher's writes carry several events each (APISIX-style watchers at 100 puts/s made
/// about 10 writes a second, and with 64 spent most of their life in the lane, at twice the
/// latency: loadtest/RESULTS.md, "Slow readers, seventh pass").
pub const SETTLED: u32 = 8;

/// The turns shared by every connection of the process.
#[derive(Debug, Clone)]
pub struct Turns(Arc<Semaphore>);

impl Turns {
    /// `n` turns (at least one).
    pub fn new(n: usize) -> Turns {
        Turns(Arc::new(Semaphore::new(n.max(1))))
    }
}

/// What a [`Gated`] stream knows about its client (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// Nothing yet: large writes take a turn.
    Fresh,
    /// The socket was full; the next write that succeeds proves the client reads.
    Stalled,
    /// The client reads: no turns.
    Proven,
}

/// A connection's byte stream whose large writes take turns until its client is seen to
/// read (see the module doc).
pub struct Gated<S> {
    /// The connection.
    inner: S,
    /// What is known about the client.
    known: Known,
    /// Bytes written while not proven, up to [`PROVEN`].
    written: u64,
    /// Small writes taken whole while in a lane's care.
    small: u32,
    /// The process's turns; `None` without turns or once the client is proven.
    turns: Option<Turns>,
    /// This connection's place in the line, made the first time it has to wait.
    waiting: Option<Box<PollSemaphore>>,
    /// Where the connection is served (`wire::lanes`); `None` without a lane or once proven.
    place: Option<Arc<Place>>,
}

impl<S> Gated<S> {
    /// `inner`, taking `turns` (none: never waits) for its large writes until proven, and
    /// making them in the new-connection lane if it has a `place` (see the module doc).
    pub fn new(inner: S, turns: Option<Turns>, place: Option<Arc<Place>>) -> Gated<S> {
        Gated {
            inner,
            known: if turns.is_some() || place.is_some() {
                Known::Fresh
            } else {
                Known::Proven
            },
            written: 0,
            small: 0,
            turns,
            waiting: None,
            place,
        }
    }

    /// Whether a write of `len` bytes must wait for the connection to move to the lane (it
    /// has asked for it then).
    fn must_move(&self, len: usize) -> bool {
        self.known == Known::Fresh
            && len >= LARGE
            && self.place.as_ref().is_some_and(|p| p.ask_for_lane())
    }

    /// A turn for a write of `len` bytes: `Ready(None)` when none is needed.
    fn poll_turn(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
    ) -> Poll<Option<OwnedSemaphorePermit>> {
        if self.known != Known::Fresh || len < LARGE {
            return Poll::Ready(None);
        }
        let Some(turns) = &self.turns else {
            return Poll::Ready(None);
        };
        if self.waiting.is_none() {
            if let Ok(turn) = turns.0.clone().try_acquire_owned() {
                return Poll::Ready(Some(turn));
            }
        }
        let waiting = self
            .waiting
            .get_or_insert_with(|| Box::new(PollSemaphore::new(turns.0.clone())));
        Poll::Ready(ready!(waiting.poll_acquire(cx)))
    }

    /// Learns from a write of `len` bytes that returned `result`.
    fn wrote(&mut self, len: usize, result: &Poll<io::Result<usize>>) {
        if self.known == Known::Proven && self.place.is_none() {
            return;
        }
        let n = match result {
            Poll::Pending => {
                if self.known != Known::Proven {
                    self.known = Known::Stalled;
                }
                return;
            }
            Poll::Ready(Ok(n)) => *n,
            Poll::Ready(Err(_)) => return,
        };
        if n == 0 {
            return;
        }
        self.written = self.written.saturating_add(n as u64);
        if self.known != Known::Proven {
            self.known = match self.known {
                Known::Stalled => Known::Proven,
                _ if self.written >= PROVEN => Known::Proven,
                _ if n < len => Known::Stalled,
                _ if len >= LARGE => Known::Proven,
                known => known,
            };
            if self.known == Known::Proven {
                self.turns = None;
                self.waiting = None;
            }
        }
        let Some(place) = &self.place else {
            return;
        };
        // The lane asks for more than a first proof: a socket whose client never reads takes
        // its receive buffer (128 KiB by default) in more than one write, the kernel making
        // room in it after a stall, and a write taken whole may just have fit.
        let done = self.known == Known::Proven && self.written >= LANE_PROOF;
        if n == len && len < LARGE {
            self.small = self.small.saturating_add(1);
        }
        if done || (n == len && len < LARGE && self.small == SETTLED) {
            place.leave_lane();
        }
        if done {
            self.place = None;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Gated<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gated<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.must_move(buf.len()) {
            return Poll::Pending;
        }
        let turn = ready!(self.poll_turn(cx, buf.len()));
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        drop(turn);
        self.wrote(buf.len(), &result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        if self.must_move(len) {
            return Poll::Pending;
        }
        let turn = ready!(self.poll_turn(cx, len));
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        drop(turn);
        self.wrote(len, &result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: Transport> Transport for Gated<S> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_read_ready(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A large write of a fresh connection waits while another holds the turn; a small write
    /// does not; a large write taken whole proves the client.
    #[tokio::test]
    async fn a_fresh_connections_large_write_waits_for_the_turn() {
        let turns = Turns::new(1);
        let (a, _a_peer) = tokio::io::duplex(4 << 20);
        let mut a = Gated::new(a, Some(turns.clone()), None);
        let held = turns.0.clone().try_acquire_owned().expect("free turn");
        a.write_all(&[1u8; LARGE - 1]).await.expect("small write");
        let large = vec![2u8; LARGE];
        let blocked = tokio::time::timeout(Duration::from_millis(50), a.write_all(&large)).await;
        assert!(blocked.is_err(), "a large write went ahead of the turn");
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), a.write_all(&large))
            .await
            .expect("the turn came")
            .expect("large write");
        assert_eq!(a.known, Known::Proven);
        let _turn = turns
            .0
            .clone()
            .try_acquire_owned()
            .expect("turn given back");
        // Proven: a large write goes ahead while the turn is held elsewhere.
        tokio::time::timeout(Duration::from_secs(5), a.write_all(&large))
            .await
            .expect("a proven connection waited for a turn")
            .expect("large write");
    }

    /// A client that drains a full socket is proven and never waits again; one that never
    /// reads stays stalled and does not keep the turn.
    #[tokio::test]
    async fn reading_after_a_stall_proves_the_client() {
        let turns = Turns::new(1);
        // Room for 64 KiB: a 100 KiB write is cut short.
        let (a, mut reader) = tokio::io::duplex(64 << 10);
        let mut a = Gated::new(a, Some(turns.clone()), None);
        let (b, _never_read) = tokio::io::duplex(64 << 10);
        let mut b = Gated::new(b, Some(turns.clone()), None);
        let big = vec![7u8; 100 << 10];
        let stuck = tokio::time::timeout(Duration::from_millis(50), b.write_all(&big)).await;
        assert!(stuck.is_err(), "a full socket took everything");
        assert_eq!(b.known, Known::Stalled);
        drop(
            turns
                .0
                .clone()
                .try_acquire_owned()
                .expect("turn given back"),
        );
        let n = a.write(&big).await.expect("first write");
        assert!(n < big.len());
        assert_eq!(a.known, Known::Stalled);
        // It drains while the turn is held elsewhere: the rest needs no turn after the stall.
        let held = turns.0.clone().try_acquire_owned().expect("free turn");
        let read = tokio::spawn(async move {
            let mut got = vec![0u8; 200 << 10];
            reader.read_exact(&mut got).await.map(|_| got)
        });
        tokio::time::timeout(Duration::from_secs(5), async {
            a.write_all(&big[n..]).await?;
            a.write_all(&big).await
        })
        .await
        .expect("a reading client waited for a held turn")
        .expect("writes");
        assert_eq!(a.known, Known::Proven);
        let got = read.await.expect("reader").expect("read");
        assert!(got.iter().all(|&x| x == 7));
        drop(held);
    }

    /// A connection of small writes leaves the lane after [`SETTLED`] of them; back on the
    /// main runtime its large write (not a small one) first asks for the lane and waits; in
    /// the lane it is made, and taken whole it proves the client, who leaves the lane again.
    #[tokio::test]
    async fn large_writes_of_an_unproven_client_are_made_in_the_lane() {
        let place = Arc::new(Place::default());
        place.set_in_lane_for_tests(true);
        let (a, _peer) = tokio::io::duplex(4 << 20);
        let mut a = Gated::new(a, None, Some(place.clone()));
        for _ in 0..SETTLED - 1 {
            a.write_all(&[1u8; 1024]).await.expect("small write");
        }
        assert!(!place.to_main_told_for_tests(), "left the lane too early");
        a.write_all(&[1u8; 1024]).await.expect("small write");
        assert!(
            place.to_main_told_for_tests(),
            "a small writer stayed in the lane"
        );
        assert_eq!(a.known, Known::Fresh, "small writes prove nothing");
        place.set_in_lane_for_tests(false);
        assert!(!a.must_move(LARGE - 1));
        let large = vec![2u8; LARGE];
        let waited = tokio::time::timeout(Duration::from_millis(20), a.write_all(&large)).await;
        assert!(
            waited.is_err(),
            "a fresh large write went ahead outside the lane"
        );
        assert_eq!(a.known, Known::Fresh, "asking for the lane is not a stall");
        place.set_in_lane_for_tests(true);
        a.write_all(&large).await.expect("large write in the lane");
        assert_eq!(a.known, Known::Proven);
        assert!(
            !place.to_main_told_for_tests(),
            "left the lane on a first proof"
        );
        while a.written < LANE_PROOF {
            a.write_all(&large).await.expect("large write in the lane");
        }
        assert!(
            a.place.is_none(),
            "a proven connection asks for nothing more"
        );
        assert!(
            place.to_main_told_for_tests(),
            "the proven client was not sent back"
        );
    }

    /// Without turns nothing waits.
    #[tokio::test]
    async fn without_turns_nothing_waits() {
        let (a, _peer) = tokio::io::duplex(4 << 20);
        let mut a = Gated::new(a, None, None);
        a.write_all(&vec![1u8; 1 << 20]).await.expect("write");
        assert_eq!(a.known, Known::Proven);
    }
}
