//! The Watch service: one session per downstream gRPC stream, many watches per session.
//!
//! A session reads create / cancel / progress requests in order and answers them in the same
//! order etcd would (each `created` before the next request is looked at). Each watch then runs
//! as its own task:
//! - inside a configured prefix, a [`watcher`] reads the prefix's cache (never etcd, unless it
//!   needs revisions older than the cache window, see [`relay`]);
//! - outside every prefix, a [`relay`] holds a dedicated upstream watch for it.
//!
//! All of a session's responses go through one bounded channel to the client, so a client that
//! stops reading only stops its own watches, and memory per session is bounded.

pub mod frame;
pub mod relay;
pub mod shape;
pub mod watcher;

use std::collections::HashMap;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::error::{WATCH_DUPLICATE_ID, WATCH_RANGE_EMPTY};
use crate::hub::Hub;
use crate::keys::KeyRange;
use crate::metrics;
use crate::passthrough::BoxStream;
use crate::proto::etcdserverpb::watch_create_request::FilterType;
use crate::proto::etcdserverpb::{
    watch_request::RequestUnion, watch_server, WatchCreateRequest, WatchRequest, WatchResponse,
};
use crate::upstream::has_credentials;
use frame::Frame;
use shape::{Shape, ShapeKey, SHAPES};

/// Responses a session may have queued for its client before watches wait.
const SESSION_BUFFER: usize = 256;

/// Status message of watch streams ended by a proxy shutdown (etcd's `ErrGRPCStopped`).
const SHUTDOWN_MESSAGE: &str = "etcdserver: server stopped";

/// etcd's `clientv3.InvalidWatchID`.
pub const INVALID_WATCH_ID: i64 = -1;

/// The sending half every watch of a session writes its responses to.
pub type Out = mpsc::Sender<Frame>;

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
}

impl WatchService {
    /// A watch service over `hub`.
    pub fn new(hub: Arc<Hub>) -> Self {
        WatchService { hub }
    }

    /// Runs a watch session over `requests`; the returned stream carries every response.
    /// The session lives until the returned stream is dropped (like etcd, a client that
    /// half-closes its request stream keeps receiving events).
    pub fn session<S>(&self, metadata: MetadataMap, requests: S) -> BoxStream<WatchResponse>
    where
        S: Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static,
    {
        Box::pin(
            self.session_frames(metadata, requests)
                .map(|r| r.and_then(Frame::into_response)),
        )
    }

    /// Like [`WatchService::session`], with events responses left as shared [`Frame`]s for
    /// encoders that write them once per shape.
    pub fn session_frames<S>(&self, metadata: MetadataMap, requests: S) -> BoxStream<Frame>
    where
        S: Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static,
    {
        let (tx, rx) = mpsc::channel(SESSION_BUFFER);
        let session = Session {
            hub: self.hub.clone(),
            metadata: Arc::new(metadata),
            out: tx,
            watches: HashMap::new(),
            next_id: 0,
        };
        tokio::spawn(session.run(requests));
        Box::pin(ReceiverStream::new(rx).map(Frame::into_item))
    }
}

#[tonic::async_trait]
impl watch_server::Watch for WatchService {
    type WatchStream = BoxStream<WatchResponse>;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (metadata, _, stream) = request.into_parts();
        Ok(Response::new(self.session(metadata, stream)))
    }
}

/// One downstream watch stream.
struct Session {
    /// Feeds and upstream.
    hub: Arc<Hub>,
    /// The stream's metadata (credentials for relayed watches), shared by its watches.
    metadata: Arc<MetadataMap>,
    /// Responses to the client.
    out: Out,
    /// Active watches by id.
    watches: HashMap<i64, JoinHandle<()>>,
    /// Next id to try for a server-assigned watch id.
    next_id: i64,
}

impl Session {
    async fn run<S>(mut self, mut requests: S)
    where
        S: Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static,
    {
        metrics::WATCH_STREAMS.inc();
        let mut shutdown = self.hub.shutdown_signal();
        loop {
            tokio::select! {
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                    // End the stream so the client reconnects (to another replica).
                    let _ = self.out.send(Frame::Error(Box::new(Status::unavailable(SHUTDOWN_MESSAGE)))).await;
                    break;
                }
                req = requests.next() => match req {
                    Some(Ok(req)) => {
                        if !self.handle(req).await {
                            break;
                        }
                    }
                    // An undecodable request ends the stream with etcd's error.
                    Some(Err(status)) => {
                        let _ = self.out.send(Frame::Error(Box::new(status))).await;
                        break;
                    }
                    // Request stream closed: keep serving until the client leaves.
                    None => {
                        self.out.closed().await;
                        break;
                    }
                },
                _ = self.out.closed() => break,
            }
        }
        for (_, h) in self.watches.drain() {
            h.abort();
        }
        metrics::WATCH_STREAMS.dec();
    }

    /// Handles one request; false when the client is gone.
    async fn handle(&mut self, req: WatchRequest) -> bool {
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(RequestUnion::CancelRequest(c)) => {
                // etcd 3.4 ignores a cancel for an unknown id.
                if let Some(h) = self.watches.remove(&c.watch_id) {
                    h.abort();
                    let resp = WatchResponse {
                        header: Some(self.hub.upstream.header(self.hub.revision())),
                        watch_id: c.watch_id,
                        canceled: true,
                        ..Default::default()
                    };
                    return self.out.send(Frame::msg(resp)).await.is_ok();
                }
                true
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                // etcd 3.4 answers at once with its current revision.
                let rev = self.hub.current_revision().await;
                let resp = WatchResponse {
                    header: Some(self.hub.upstream.header(rev)),
                    watch_id: INVALID_WATCH_ID,
                    ..Default::default()
                };
                self.out.send(Frame::msg(resp)).await.is_ok()
            }
            None => true,
        }
    }

    async fn create(&mut self, mut c: WatchCreateRequest) -> bool {
        if c.key.is_empty() {
            // etcd: "\x00 is the smallest key".
            c.key = bytes::Bytes::from_static(b"\0");
        }
        let range = KeyRange::new(&c.key, &c.range_end);
        // Callers with credentials, and watches before the prefix is loaded, are relayed to
        // etcd (see `upstream::has_credentials`).
        let feed = if has_credentials(&self.metadata) {
            None
        } else {
            self.hub.feed_for(&range).filter(|f| f.is_ready()).cloned()
        };
        let header_rev = self.hub.revision();
        if range.is_empty() {
            return self.refuse(header_rev, WATCH_RANGE_EMPTY).await;
        }
        let id = if c.watch_id == 0 {
            while self.watches.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        } else if self.watches.contains_key(&c.watch_id) {
            return self.refuse(header_rev, WATCH_DUPLICATE_ID).await;
        } else {
            c.watch_id
        };
        let shape = SHAPES.intern(ShapeKey {
            range,
            no_put: c.filters.contains(&(FilterType::Noput as i32)),
            no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
            prev_kv: c.prev_kv,
        });
        let spec = WatchSpec {
            id,
            shape,
            fragment: c.fragment,
            progress_notify: c.progress_notify,
            request: Box::new(c),
        };
        let handle = match feed {
            Some(feed) => {
                let created = watcher::created(&feed, &spec);
                if self
                    .out
                    .send(Frame::msg(created.response.clone()))
                    .await
                    .is_err()
                {
                    return false;
                }
                tokio::spawn(watcher::run(
                    feed,
                    spec,
                    created.start,
                    created.synced,
                    self.out.clone(),
                    self.metadata.clone(),
                    self.hub.config.clone(),
                ))
            }
            None => {
                let (created_tx, created_rx) = tokio::sync::oneshot::channel();
                let h = tokio::spawn(relay::run_uncached(
                    self.hub.clone(),
                    self.metadata.clone(),
                    spec,
                    self.out.clone(),
                    created_tx,
                ));
                // Answer creates in order: wait for etcd's `created` before the next request.
                let _ = created_rx.await;
                h
            }
        };
        self.watches.insert(id, handle);
        true
    }

    /// etcd's answer to a create it refuses: created and canceled at once, id -1.
    async fn refuse(&mut self, header_rev: i64, reason: &str) -> bool {
        let resp = WatchResponse {
            header: Some(self.hub.upstream.header(header_rev)),
            watch_id: INVALID_WATCH_ID,
            created: true,
            canceled: true,
            cancel_reason: reason.to_string(),
            ..Default::default()
        };
        self.out.send(Frame::msg(resp)).await.is_ok()
    }
}
