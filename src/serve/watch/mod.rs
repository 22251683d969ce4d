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

pub mod relay;
pub mod reply;
pub mod session;
pub mod shape;
pub mod watcher;

use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::Status;

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
/// parked: it queues nothing more (but `created`/cancel answers) until the queue drains to
/// [`SESSION_RESUME_BYTES`], then its watches catch up from the shared history.
pub const SESSION_BUDGET_BYTES: usize = 256 << 10;

/// Queued bytes under which a parked session resumes.
pub const SESSION_RESUME_BYTES: usize = 64 << 10;

/// etcd's `clientv3.InvalidWatchID`.
pub const INVALID_WATCH_ID: i64 = -1;

/// The sending half every watch of a session writes its responses to, counting the bytes
/// queued for the client (see [`SESSION_BUDGET_BYTES`]).
#[derive(Debug, Clone)]
pub struct Out {
    /// The session's queue.
    tx: mpsc::Sender<Reply>,
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
    /// A queue of `replies` replies at most and its receiving end.
    pub fn channel(replies: usize) -> (Out, mpsc::Receiver<Reply>, Arc<Queued>) {
        let (tx, rx) = mpsc::channel(replies);
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

    /// Queues `reply`; `Err` when the client is gone.
    pub async fn send(&self, reply: Reply) -> Result<(), ()> {
        let n = reply.queued_bytes();
        self.queued
            .bytes
            .fetch_add(n, std::sync::atomic::Ordering::AcqRel);
        if self.tx.send(reply).await.is_err() {
            self.queued.taken(n);
            return Err(());
        }
        Ok(())
    }

    /// True when the queue holds more than the session's byte budget.
    pub fn over_budget(&self) -> bool {
        self.queued.bytes() > SESSION_BUDGET_BYTES
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
        Box::pin(ReceiverStream::new(rx).map(move |r| {
            queued.taken(r.queued_bytes());
            Reply::into_item(r)
        }))
    }
}
