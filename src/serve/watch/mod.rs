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
//! session's responses go through one bounded channel to the client, so a client that stops
//! reading only stops its own watches, and memory per session is bounded.

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

/// Responses a session may have queued for its client before watches wait.
const SESSION_BUFFER: usize = 256;

/// etcd's `clientv3.InvalidWatchID`.
pub const INVALID_WATCH_ID: i64 = -1;

/// The sending half every watch of a session writes its responses to.
pub type Out = mpsc::Sender<Reply>;

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
    pub fn session<S>(&self, metadata: MetadataMap, requests: S) -> BoxStream<Reply>
    where
        S: Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static,
    {
        let (tx, rx) = mpsc::channel(SESSION_BUFFER);
        let session = Session::new(self.hub.clone(), self.access.clone(), metadata, tx);
        self.hub.tasks.spawn(session.run(requests));
        Box::pin(ReceiverStream::new(rx).map(Reply::into_item))
    }
}
