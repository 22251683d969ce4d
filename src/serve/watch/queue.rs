//! A session's queues (its replies to the client, its requests from the reader): many senders,
//! one receiver, optionally bounded in items, holding no buffer while empty.
//!
//! tokio's mpsc channels allocate a block of 32 slots when they are made and keep at least one
//! block for their whole life (a session's reply queue ended up holding two, 5 KB, its request
//! queue one of 4.4 KB), so an idle watch stream paid about 10 KB for queues it hardly used. Here
//! the items wait in a `VecDeque` behind a short std mutex, and the deque's buffer is freed
//! whenever the receiver takes the last item: an idle session's queues cost their shared state
//! only (about 200 bytes each). A burst allocates what it needs and gives it back once drained.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::sync::Notify;

/// What the senders and the receiver share.
struct Shared<T> {
    /// The items and who is still there.
    state: Mutex<State<T>>,
    /// Most items the queue holds (`usize::MAX`: unbounded).
    bound: usize,
    /// Woken when an item leaves a full queue (or the receiver goes): waiting senders retry.
    space: Notify,
    /// Woken when the receiver goes.
    closed: Notify,
}

/// The queue proper, under the mutex.
struct State<T> {
    /// Items in order; no buffer while empty.
    items: VecDeque<T>,
    /// Live senders; the receiver sees the end of the queue once they are all gone.
    senders: usize,
    /// The receiver is still there.
    open: bool,
    /// The receiver waiting for an item.
    waker: Option<Waker>,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A new queue of at most `bound` items (`usize::MAX`: unbounded).
pub fn channel<T>(bound: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            senders: 1,
            open: true,
            waker: None,
        }),
        bound: bound.max(1),
        space: Notify::new(),
        closed: Notify::new(),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

/// Why [`Sender::try_send`] did not queue its item.
#[derive(Debug)]
pub enum TrySendError<T> {
    /// The queue holds its bound.
    Full(T),
    /// The receiver is gone.
    Closed(T),
}

/// The sending half (clonable).
pub struct Sender<T> {
    /// The queue.
    shared: Arc<Shared<T>>,
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut s = self.shared.lock();
            s.senders -= 1;
            if s.senders == 0 {
                s.waker.take()
            } else {
                None
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Sender<T> {
    /// Queues `item` now, unless the queue is full or the receiver gone.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let waker = {
            let mut s = self.shared.lock();
            if !s.open {
                return Err(TrySendError::Closed(item));
            }
            if s.items.len() >= self.shared.bound {
                return Err(TrySendError::Full(item));
            }
            s.items.push_back(item);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Queues `item`, waiting for room; `Err` with the item when the receiver is gone.
    pub async fn send(&self, mut item: T) -> Result<(), T> {
        loop {
            let room = self.shared.space.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_send(item) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(i)) => return Err(i),
                Err(TrySendError::Full(i)) => item = i,
            }
            room.await;
        }
    }

    /// Completes when the receiver is gone.
    pub async fn closed(&self) {
        loop {
            let gone = self.shared.closed.notified();
            tokio::pin!(gone);
            gone.as_mut().enable();
            if !self.shared.lock().open {
                return;
            }
            gone.await;
        }
    }
}

/// The receiving half.
pub struct Receiver<T> {
    /// The queue.
    shared: Arc<Shared<T>>,
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

impl<T> Receiver<T> {
    /// The next item; `None` once every sender is gone and the queue is empty.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut s = self.shared.lock();
        match self.take(&mut s) {
            Some(item) => Poll::Ready(Some(item)),
            None if s.senders == 0 => Poll::Ready(None),
            None => {
                if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    s.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    /// The next item, waiting for one; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next item if one is queued.
    pub fn try_recv(&mut self) -> Option<T> {
        let mut s = self.shared.lock();
        self.take(&mut s)
    }

    /// Pops the first item; frees the buffer when it was the last, and lets waiting senders
    /// retry when the queue was full.
    fn take(&self, s: &mut MutexGuard<'_, State<T>>) -> Option<T> {
        let was_full = s.items.len() >= self.shared.bound;
        let item = s.items.pop_front()?;
        if s.items.is_empty() && s.items.capacity() > 0 {
            s.items = VecDeque::new();
        }
        if was_full {
            self.shared.space.notify_waiters();
        }
        Some(item)
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let items = {
            let mut s = self.shared.lock();
            s.open = false;
            std::mem::take(&mut s.items)
        };
        // The queued items are dropped outside the lock.
        drop(items);
        self.shared.closed.notify_waiters();
        self.shared.space.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn order_bound_and_end() {
        let (tx, mut rx) = channel::<u32>(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert!(matches!(tx.try_send(3), Err(TrySendError::Full(3))));
        // A sender waiting for room gets it when the receiver takes an item.
        let tx2 = tx.clone();
        let waiting = tokio::spawn(async move { tx2.send(3).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(rx.recv().await, Some(1));
        assert!(waiting.await.unwrap().is_ok());
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(3));
        assert_eq!(rx.try_recv(), None);
        // Drained: no buffer is kept.
        assert_eq!(rx.shared.lock().items.capacity(), 0);
        drop(tx);
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn receiver_waits_then_wakes() {
        let (tx, mut rx) = channel::<u32>(usize::MAX);
        let got = tokio::spawn(async move { (rx.recv().await, rx.recv().await) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.try_send(7).unwrap();
        drop(tx);
        assert_eq!(got.await.unwrap(), (Some(7), None));
    }

    #[tokio::test]
    async fn a_gone_receiver_closes_and_frees_senders() {
        let (tx, rx) = channel::<u32>(1);
        tx.try_send(1).unwrap();
        let tx2 = tx.clone();
        let blocked = tokio::spawn(async move { tx2.send(2).await });
        let tx3 = tx.clone();
        let closed = tokio::spawn(async move { tx3.closed().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(rx);
        assert_eq!(blocked.await.unwrap(), Err(2));
        closed.await.unwrap();
        assert!(matches!(tx.try_send(3), Err(TrySendError::Closed(3))));
    }
}
