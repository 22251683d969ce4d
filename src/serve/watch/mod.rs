//! The Watch service: one [`session`] per downstream stream (gRPC or the JSON gateway), many
//! watches per session.
//!
//! - Inside a configured prefix a watch is a [`watcher::CachedWatch`], a cursor the session
//!   advances over the prefix's cache (never etcd, unless it needs revisions older than the
//!   cache window: then [`relay::catch_up`] replays them from etcd);
//! - outside every prefix (or while etcd's auth state is unknown, or when a permission probe
//!   could not decide) [`relay::run_uncached`] holds a dedicated upstream watch for it.
//!
//! Events are encoded once per watch [`shape`] and revision and shared ([`reply`]). All of a
//! session's responses go through one queue to the client, bounded in bytes and in replies: a
//! client that falls behind parks its own session (nothing more is queued; its watches keep
//! only their cursors and catch up from the shared history when it drains), and memory per
//! session is bounded.

pub mod queue;
pub mod relay;
pub mod reply;
pub mod session;
pub mod shape;
pub mod watcher;

use std::sync::Arc;

use futures::Stream;
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::metrics;
use crate::proto::etcdserverpb::{WatchCreateRequest, WatchRequest};
use crate::serve::access::Access;
use crate::serve::passthrough::BoxStream;
use crate::source::hub::Hub;
use reply::Reply;
use session::Session;
use shape::Shape;

/// Responses a session may have queued for its client before it waits (a backstop: the byte
/// budget below usually parks the session first).
const SESSION_BUFFER: usize = 256;

/// Bytes of responses a session may have queued for its client; beyond it the session is
/// parked: it queues nothing more (answers to its requests wait for the drain) until the
/// queue drains to [`SESSION_RESUME_BYTES`], then its watches catch up from the shared
/// history.
pub const SESSION_BUDGET_BYTES: usize = 256 << 10;

/// Queued bytes under which a parked session resumes.
pub const SESSION_RESUME_BYTES: usize = 64 << 10;

/// etcd's `clientv3.InvalidWatchID`.
pub const INVALID_WATCH_ID: i64 = -1;

/// What a session's queue carries: one reply, or several queued together (a burst of
/// `created` answers) so that the encoder writes them into one buffer, not one DATA frame
/// each.
#[derive(Debug)]
pub enum Parcel {
    /// One reply.
    One(Reply),
    /// Replies in order.
    Many(Vec<Reply>),
}

impl Parcel {
    fn queued_bytes(&self) -> usize {
        match self {
            Parcel::One(r) => r.queued_bytes(),
            Parcel::Many(v) => v.iter().map(Reply::queued_bytes).sum(),
        }
    }
}

/// The sending half every watch of a session writes its responses to, counting the bytes
/// queued for the client (see [`SESSION_BUDGET_BYTES`]).
#[derive(Debug, Clone)]
pub struct Out {
    /// The session's queue (no buffer while empty, see [`queue`]).
    tx: queue::Sender<Parcel>,
    /// Bytes queued, shared with the receiving end.
    queued: Arc<Queued>,
}

/// The byte count of a session's queue, and the wake-up when it drains.
#[derive(Debug, Default)]
pub struct Queued {
    /// Bytes of the replies in the queue ([`Reply::queued_bytes`]).
    bytes: std::sync::atomic::AtomicUsize,
    /// Woken when `bytes` falls under [`SESSION_RESUME_BYTES`].
    drained: tokio::sync::Notify,
}

impl Queued {
    /// A reply left the queue (taken by the wire encoder).
    fn taken(&self, n: usize) {
        let before = self.bytes.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
        if before >= SESSION_RESUME_BYTES && before - n < SESSION_RESUME_BYTES {
            self.drained.notify_waiters();
        }
    }

    fn bytes(&self) -> usize {
        self.bytes.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Out {
    /// A queue of `replies` parcels at most and its receiving end.
    pub fn channel(replies: usize) -> (Out, queue::Receiver<Parcel>, Arc<Queued>) {
        let (tx, rx) = queue::channel(replies);
        let queued = Arc::new(Queued::default());
        (
            Out {
                tx,
                queued: queued.clone(),
            },
            rx,
            queued,
        )
    }

    /// Queues `reply`; `Err` when the client is gone. A full queue (the reply-count
    /// backstop) blocks the session until its client reads, counted in
    /// `etcd_fanout_watch_sessions_blocked` and `..._session_blocks_total`.
    pub async fn send(&self, reply: Reply) -> Result<(), ()> {
        self.send_parcel(Parcel::One(reply)).await
    }

    /// Queues `replies` together, once the queue is within the session's byte budget (a
    /// client that does not read them holds the sender back); `Err` when the client is gone.
    pub async fn send_many(&self, replies: Vec<Reply>) -> Result<(), ()> {
        if self.over_budget() {
            tokio::select! {
                _ = self.drained() => {}
                _ = self.closed() => return Err(()),
            }
        }
        self.send_now(replies).await
    }

    /// Queues `replies` together now, whatever the byte budget (the caller checked it with
    /// [`Out::over_budget_with`]); `Err` when the client is gone.
    pub async fn send_now(&self, mut replies: Vec<Reply>) -> Result<(), ()> {
        match replies.len() {
            0 => Ok(()),
            1 => match replies.pop() {
                Some(r) => self.send(r).await,
                None => Ok(()),
            },
            _ => self.send_parcel(Parcel::Many(replies)).await,
        }
    }

    async fn send_parcel(&self, parcel: Parcel) -> Result<(), ()> {
        let n = parcel.queued_bytes();
        self.queued
            .bytes
            .fetch_add(n, std::sync::atomic::Ordering::AcqRel);
        let sent = match self.tx.try_send(parcel) {
            Ok(()) => Ok(()),
            Err(queue::TrySendError::Closed(_)) => Err(()),
            Err(queue::TrySendError::Full(parcel)) => {
                metrics::SESSION_BLOCKS.inc();
                // Boxed: the rare wait is no part of every sender's state.
                Box::pin(async {
                    let _blocked = Blocked::new();
                    self.tx.send(parcel).await.map_err(|_| ())
                })
                .await
            }
        };
        if sent.is_err() {
            self.queued.taken(n);
        }
        sent
    }

    /// True when the queue holds more than the session's byte budget.
    pub fn over_budget(&self) -> bool {
        self.queued.bytes() > SESSION_BUDGET_BYTES
    }

    /// True when the queue and `extra` bytes about to be queued hold more than the session's
    /// byte budget.
    pub fn over_budget_with(&self, extra: usize) -> bool {
        self.queued.bytes() + extra > SESSION_BUDGET_BYTES
    }

    /// Waits until the queue has drained under [`SESSION_RESUME_BYTES`].
    pub async fn drained(&self) {
        loop {
            let wait = self.queued.drained.notified();
            if self.queued.bytes() < SESSION_RESUME_BYTES {
                return;
            }
            wait.await;
        }
    }

    /// Completes when the client is gone.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// Counts a session in `etcd_fanout_watch_sessions_blocked` while it lives (also when the
/// waiting send is dropped).
struct Blocked;

impl Blocked {
    fn new() -> Blocked {
        metrics::SESSIONS_BLOCKED.inc();
        Blocked
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        metrics::SESSIONS_BLOCKED.dec();
    }
}

/// A connection's request that its watch streams end (its `--max-connection-age` passed and
/// it was sent a GOAWAY, or it is closing after its current HTTP/1.x answer): the listener
/// attaches it to every request as an extension. A session ends its stream with `Unavailable`
/// "the connection is draining" after its last whole response once it turns true (an HTTP
/// watch stream then ends cleanly), and the client resumes on a new connection from its next
/// revision.
#[derive(Debug, Clone)]
pub struct ConnectionEnding(pub tokio::sync::watch::Receiver<bool>);

/// What one downstream watch asked for.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    /// The watch id on its stream.
    pub id: i64,
    /// Which events it gets and how they look (shared by identical watches).
    pub shape: Arc<Shape>,
    /// Split responses larger than the max request size.
    pub fragment: bool,
    /// Send periodic progress notifications.
    pub progress_notify: bool,
    /// The request as the client sent it (relayed as is when etcd must answer).
    pub request: Box<WatchCreateRequest>,
}

/// Serves the Watch service.
#[derive(Debug, Clone)]
pub struct WatchService {
    /// Feeds and upstream.
    hub: Arc<Hub>,
    /// etcd's decisions for watch creates the caches could serve.
    access: Arc<Access>,
}

impl WatchService {
    /// A watch service over `hub`, checking creates with `access`.
    pub fn new(hub: Arc<Hub>, access: Arc<Access>) -> Self {
        WatchService { hub, access }
    }

    /// Like [`WatchService::session`], with events responses left as shared [`Reply`]s for
    /// encoders that write them once per shape.
    /// The stream ends when `ending` (its connection's) turns true.
    pub fn session<S>(
        &self,
        metadata: MetadataMap,
        ending: Option<ConnectionEnding>,
        requests: S,
    ) -> BoxStream<Reply>
    where
        S: Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static,
    {
        let (tx, rx, queued) = Out::channel(SESSION_BUFFER);
        let session = Session::new(self.hub.clone(), self.access.clone(), metadata, tx, ending);
        self.hub.tasks.spawn(session.run(requests));
        Box::pin(Replies {
            rx,
            queued,
            parcel: Vec::new().into_iter(),
        })
    }
}

/// A session's responses as a stream: parcels taken from its queue (their bytes leave the
/// budget) and unpacked in order. Every reply of a parcel is ready at once, so the encoder
/// writes them into one buffer.
struct Replies {
    /// The session's queue.
    rx: queue::Receiver<Parcel>,
    /// Its byte count.
    queued: Arc<Queued>,
    /// What is left of the parcel being unpacked.
    parcel: std::vec::IntoIter<Reply>,
}

impl Stream for Replies {
    type Item = Result<Reply, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        loop {
            if let Some(r) = self.parcel.next() {
                return Poll::Ready(Some(r.into_item()));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(p)) => {
                    self.queued.taken(p.queued_bytes());
                    match p {
                        Parcel::One(r) => return Poll::Ready(Some(r.into_item())),
                        Parcel::Many(v) => self.parcel = v.into_iter(),
                    }
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
