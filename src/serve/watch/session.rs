//! One downstream watch stream and every watch on it.
//!
//! The session is one task, with a request reader of its own ([`read_requests`]) that takes
//! requests off the stream as they arrive, whatever the session is doing, up to
//! [`MAX_QUEUED_REQUEST_BYTES`] waiting (then it stops reading and HTTP/2 flow control holds the
//! client back). The session handles create / cancel / progress requests in order and answers
//! them as etcd does; the plain answers of a run of requests are staged and queued together, so
//! a burst of creates goes out in a few large writes. It also serves all of
//! its cached watches itself: it registers each watch *shape* it uses in its feed's dispatch
//! index ([`crate::source::index`]) and sleeps on its [`Inbox`]. The feed leaves a note per
//! (shape, revision) that holds a key of the shape's range; the session then sends that
//! revision to the watches of that shape only. A revision costs nothing to a session whose
//! watches it does not concern, and a watch it does not concern is not touched: such a watch's
//! cursor is implicitly past every revision dispatched (notes arrive in revision order, so a
//! note for revision r proves the watch's shape had nothing between its cursor and r).
//!
//! A new watch, or one handed back by a catch-up, first reads its backlog from the cache
//! (registered beforehand, so revisions applied meanwhile are read or noted, never lost). One
//! whose `created` showed a revision the cache is not complete up to yet is held until it is
//! (see [`Session::serve_backlog`]).
//!
//! Watches etcd has to answer run as their own tasks and write to the same channel: relays for
//! watches outside every prefix (for their whole life), and catch-ups for cached watches that
//! fell behind the cache window (they hand the watch back when it reaches the window).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use std::time::Instant;

use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tonic::metadata::MetadataMap;
use tonic::Status;
use tracing::Instrument;

use super::reply::{LiveReplies, Reply};
use super::shape::{Shape, ShapeKey, SHAPES};
use super::watcher::{self, CachedWatch, Step};
use super::{relay, ConnectionEnding, Out, WatchSpec, INVALID_WATCH_ID};
use crate::error::{go_status_text, Error, WATCH_DUPLICATE_ID, WATCH_RANGE_EMPTY};
use crate::keys::KeyRange;
use crate::metrics;
use crate::proto::etcdserverpb::watch_create_request::FilterType;
use crate::proto::etcdserverpb::{
    watch_request::RequestUnion, ResponseHeader, WatchCreateRequest, WatchRequest, WatchResponse,
};
use crate::serve::access::{Access, Verdict};
use crate::source::cache::RevBatch;
use crate::source::feed::Feed;
use crate::source::hub::Hub;
use crate::source::index::{Inbox, Note};
use crate::source::upstream::requires_leader;

/// Completes when the connection asks its streams to end; never without a connection signal
/// (or when the connection's signal is gone, i.e. the connection itself ended).
async fn connection_ending(ending: &mut Option<ConnectionEnding>) {
    match ending {
        Some(ConnectionEnding(rx)) => {
            if rx.wait_for(|e| *e).await.is_err() {
                // The connection is gone; the stream ends with it.
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// A catch-up task's result: (watch id, generation, and the revision to resume at with the
/// highest header sent so far, or `None` if the watch ended).
type Handoff = (i64, u64, Option<(i64, i64)>);

/// A feed and the watches held on it until its cache is complete up to a revision:
/// (revision, watch id).
type Held = (Arc<Feed>, BTreeSet<(i64, i64)>);

/// One watch id on the stream.
enum Entry {
    /// Served by the session from a feed's cache.
    Cached(CachedWatch),
    /// Being replayed by etcd (older than the cache window); comes back as `Cached`.
    CatchingUp {
        /// The watch, as it will resume.
        watch: CachedWatch,
        /// The catch-up task.
        task: JoinHandle<()>,
        /// Tells this catch-up's handoff from an older one for a reused id.
        generation: u64,
    },
    /// Relayed to its own upstream watch for its whole life.
    Relayed(JoinHandle<()>),
    /// Ended by etcd (compacted); like etcd, the id stays taken until cancelled.
    Ended,
}

impl Entry {
    fn cached(&self) -> Option<&CachedWatch> {
        match self {
            Entry::Cached(w) | Entry::CatchingUp { watch: w, .. } => Some(w),
            _ => None,
        }
    }

    fn stop(&self) {
        match self {
            Entry::CatchingUp { task, .. } | Entry::Relayed(task) => task.abort(),
            _ => {}
        }
    }
}

/// The cached watches of one shape on a session.
struct ShapeWatches {
    /// The feed whose index holds the registration.
    feed: Arc<Feed>,
    /// The shape (kept for its range, to release the registration).
    shape: Arc<Shape>,
    /// Watch ids of this shape, ascending (a vector: read whole for every revision the shape
    /// is noted for, changed only on create and cancel).
    ids: Vec<i64>,
}

/// One downstream watch stream.
pub(super) struct Session {
    /// Feeds and upstream.
    hub: Arc<Hub>,
    /// etcd's decisions for this stream's creates.
    access: Arc<Access>,
    /// The stream's metadata (credentials for relayed watches), shared with its tasks.
    metadata: Arc<MetadataMap>,
    /// Responses to the client.
    out: Out,
    /// Every watch id in use.
    watches: HashMap<i64, Entry>,
    /// Next id to try for a server-assigned watch id.
    next_id: i64,
    /// Where the feeds leave notes of the revisions that concern this session's shapes.
    inbox: Arc<Inbox>,
    /// The cached watches (served or catching up) by shape id, with the shape's feed: one
    /// registration in that feed's index per shape.
    shapes: HashMap<u64, ShapeWatches>,
    /// Catch-up tasks report here: the channel (both ends) is made by the first catch-up, as
    /// most streams never need one and an idle stream should cost little.
    handoffs: Option<(
        mpsc::UnboundedSender<Handoff>,
        mpsc::UnboundedReceiver<Handoff>,
    )>,
    /// Source of catch-up generations.
    generation: u64,
    /// Notes taken from the inbox and not served yet (the session parked meanwhile).
    pending: VecDeque<Note>,
    /// Notes were dropped from the inbox from this revision on: once `pending` is served,
    /// every cached watch looks at the history from there.
    overflow_from: Option<i64>,
    /// Cached watches whose cursor must be stepped through the history (after an overflow).
    rescan: BTreeSet<i64>,
    /// The client fell behind by more than the byte budget: nothing more is queued for it
    /// until its queue drains.
    parked: bool,
    /// Its shapes' registrations are parked in their feeds' indexes (unparked on resume).
    parked_in_index: bool,
    /// Progress ticker, created with the first watch that asks for progress notifications
    /// (etcd has one per stream too).
    progress: Option<Pin<Box<tokio::time::Interval>>>,
    /// Cached watches held until their feed's cache is complete up to the header they have
    /// shown (a `created` at etcd's revision, ahead of the cache), by feed: (revision, id).
    /// Nothing is sent for them meanwhile, so no response carries a header above what the
    /// events sent so far imply.
    held: HashMap<usize, Held>,
    /// Plain responses (created, canceled, progress) not queued yet: queued together as one
    /// parcel, so a burst of creates is written in a few large DATA frames, not one each.
    staged: Vec<Reply>,
    /// The connection's request to end its streams (max connection age), if it can make one.
    ending: Option<ConnectionEnding>,
}

/// What the request reader hands the session.
enum Incoming {
    /// A request, when it was received, and the bytes it counts (see
    /// [`MAX_QUEUED_REQUEST_BYTES`]).
    Request(WatchRequest, Instant, usize),
    /// An undecodable request: the stream ends with etcd's error.
    Failed(Status),
    /// The client closed its request stream.
    End,
}

impl Session {
    /// A session writing to `out`.
    pub(super) fn new(
        hub: Arc<Hub>,
        access: Arc<Access>,
        metadata: MetadataMap,
        out: Out,
        ending: Option<ConnectionEnding>,
    ) -> Session {
        Session {
            hub,
            access,
            metadata: Arc::new(crate::source::upstream::credentials_only(metadata)),
            out,
            watches: HashMap::new(),
            next_id: 0,
            inbox: Arc::new(Inbox::default()),
            shapes: HashMap::new(),
            pending: VecDeque::new(),
            overflow_from: None,
            rescan: BTreeSet::new(),
            parked: false,
            parked_in_index: false,
            handoffs: None,
            generation: 0,
            progress: None,
            held: HashMap::new(),
            staged: Vec::new(),
            ending,
        }
    }

    /// Serves the stream until the client leaves, sends a bad request, or the proxy stops.
    ///
    /// The request reader is started here, outside the returned future: the request stream
    /// (tonic's `Streaming`, a few hundred bytes) then lives in the reader's task only, not
    /// also in the session's for its whole life.
    pub(super) fn run<S>(self, requests: S) -> impl std::future::Future<Output = ()> + Send
    where
        S: Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static,
    {
        // The request reader: takes requests off the stream as they arrive, whatever the
        // session is waiting for (HTTP/2 counts unread small DATA frames against a budget and
        // ends the connection with ENHANCE_YOUR_CALM when it runs out), up to
        // MAX_QUEUED_REQUEST_BYTES not handled yet; beyond that it stops reading and HTTP/2
        // flow control holds the client back.
        let room = Arc::new(Semaphore::new(MAX_QUEUED_REQUEST_BYTES));
        let (tx, incoming) = super::queue::channel(usize::MAX);
        let reader = self
            .hub
            .tasks
            .spawn(read_requests(requests, tx, room.clone()));
        self.serve(incoming, room, reader)
    }

    /// The session's loop over its requests (`incoming`, handed over by `reader` while `room`
    /// allows), notes, catch-ups, progress ticks and its client leaving.
    async fn serve(
        mut self,
        mut incoming: super::queue::Receiver<Incoming>,
        room: Arc<Semaphore>,
        reader: JoinHandle<()>,
    ) {
        metrics::WATCH_STREAMS.inc();
        let mut shutdown = self.hub.shutdown_signal();
        let mut requests_open = true;
        loop {
            tokio::select! {
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                    // End the stream so the client reconnects (to another replica).
                    let status = Status::from(Error::Stopped);
                    let _ = Box::pin(self.end(status)).await;
                    break;
                }
                _ = connection_ending(&mut self.ending) => {
                    // The connection was asked to go away (max age): end the stream after its
                    // last whole response, so the client resumes on a new connection.
                    let e = if *shutdown.borrow() { Error::Stopped } else { Error::Draining };
                    let _ = Box::pin(self.end(Status::from(e))).await;
                    break;
                }
                item = incoming.recv(), if requests_open => {
                    // This request and every one already received, then their answers go out
                    // together.
                    let mut item = item;
                    let mut handled = 0;
                    let stop = loop {
                        match item {
                            None | Some(Incoming::End) => {
                                // Request stream closed: keep serving until the client leaves.
                                requests_open = false;
                                break false;
                            }
                            // An undecodable request ends the stream with etcd's error.
                            Some(Incoming::Failed(status)) => {
                                let _ = Box::pin(self.end(status)).await;
                                break true;
                            }
                            Some(Incoming::Request(req, received, cost)) => {
                                // Boxed (as every rarely-live state below): the session's
                                // task holds only what an idle stream waits with.
                                let r = Box::pin(self.handle(req, received)).await;
                                room.add_permits(cost);
                                if r.is_err() {
                                    break true;
                                }
                            }
                        }
                        handled += 1;
                        if handled >= REQUESTS_PER_TURN {
                            break false;
                        }
                        match incoming.try_recv() {
                            Some(next) => item = Some(next),
                            None => break false,
                        }
                    };
                    if stop || Box::pin(self.flush()).await.is_err() {
                        break;
                    }
                }
                _ = self.inbox.wait(), if !self.parked => {
                    if self.drain().await.is_err() {
                        break;
                    }
                }
                _ = self.out.drained(), if self.parked => {
                    self.parked = false;
                    metrics::SESSIONS_PARKED.dec();
                    if std::mem::take(&mut self.parked_in_index) {
                        for (tag, u) in &self.shapes {
                            u.feed.index().unpark(*tag, &self.inbox);
                        }
                    }
                    if self.drain().await.is_err() {
                        break;
                    }
                }
                Some(handoff) = next_handoff(&mut self.handoffs) => {
                    if Box::pin(self.handoff(handoff)).await.is_err() {
                        break;
                    }
                }
                _ = tick(&mut self.progress) => {
                    if Box::pin(self.progress_tick()).await.is_err() {
                        break;
                    }
                }
                _ = self.out.closed() => break,
            }
        }
        reader.abort();
        for entry in self.watches.values() {
            entry.stop();
        }
        for (tag, u) in self.shapes.drain() {
            u.feed.index().release(tag, &self.inbox);
        }
        for (feed, _) in self.held.values() {
            feed.forget_waiter(&self.inbox);
        }
        if self.parked {
            metrics::SESSIONS_PARKED.dec();
        }
        metrics::WATCH_STREAMS.dec();
    }

    /// Handles one request; `Err` when the client is gone.
    async fn handle(&mut self, req: WatchRequest, received: Instant) -> Result<(), ()> {
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => self.create(c, received).await,
            Some(RequestUnion::CancelRequest(c)) => {
                // etcd 3.4 ignores a cancel for an unknown id.
                let Some(entry) = self.watches.remove(&c.watch_id) else {
                    return Ok(());
                };
                entry.stop();
                self.release(c.watch_id, &entry);
                let resp = WatchResponse {
                    header: Some(self.hub.upstream.header(self.hub.revision())),
                    watch_id: c.watch_id,
                    canceled: true,
                    ..Default::default()
                };
                self.send(resp).await
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                // etcd 3.4 answers at once with its current revision.
                let rev = self.hub.current_revision().await;
                let resp = WatchResponse {
                    header: Some(self.hub.upstream.header(rev)),
                    watch_id: INVALID_WATCH_ID,
                    ..Default::default()
                };
                self.send(resp).await
            }
            None => Ok(()),
        }
    }

    /// Stages a plain response; queued with the next [`Session::flush`] (at the latest when
    /// the requests received so far are handled).
    async fn send(&mut self, resp: WatchResponse) -> Result<(), ()> {
        self.staged.push(Reply::msg(resp));
        if self.staged.len() >= STAGED_REPLIES {
            return self.flush().await;
        }
        Ok(())
    }

    /// Queues the staged responses (before anything else is queued or handed to a task, so
    /// responses keep their order).
    async fn flush(&mut self) -> Result<(), ()> {
        if self.staged.is_empty() {
            return Ok(());
        }
        self.out.send_many(std::mem::take(&mut self.staged)).await
    }

    /// Ends the stream with `status` after what is staged.
    async fn end(&mut self, status: Status) -> Result<(), ()> {
        self.flush().await?;
        self.out.send(Reply::Error(Box::new(status))).await
    }

    async fn create(&mut self, mut c: WatchCreateRequest, received: Instant) -> Result<(), ()> {
        if c.key.is_empty() {
            // etcd: "\x00 is the smallest key".
            c.key = bytes::Bytes::from_static(b"\0");
        }
        let range = KeyRange::new(&c.key, &c.range_end);
        if let Some(feed) = self.hub.feed_for(&range).filter(|_| !range.is_empty()) {
            // A prefix still loading (this replica just started): wait for it, briefly.
            feed.wait_ready(self.hub.config.sync_timeout).await;
        }
        let cacheable = (!range.is_empty())
            .then(|| self.hub.feed_for(&range).filter(|f| f.is_ready()).cloned())
            .flatten();
        if cacheable
            .as_ref()
            .is_some_and(|f| f.health.is_stale() && requires_leader(&self.metadata))
        {
            // As etcd ends a require-leader stream on a member without a leader (its
            // interceptor, ahead of the permission check).
            let _ = self.end(Status::from(Error::NoLeader)).await;
            return Err(());
        }
        // etcd checks the caller's permission before anything else (range, id); the check
        // covers the whole range, also for `range_end` "\0" (see `access`).
        let duplicate = c.watch_id != 0 && self.watches.contains_key(&c.watch_id);
        let verdict = self
            .access
            .check(
                &self.metadata,
                &c.key,
                &c.range_end,
                cacheable.is_some() || duplicate || range.is_empty(),
                cacheable.as_ref().map(|f| &f.range),
            )
            .await;
        let feed = match verdict {
            Verdict::Serve => cacheable,
            Verdict::Refuse(e) => return self.refuse(&go_status_text(&e.into())).await,
            Verdict::Forward => None,
        };
        if range.is_empty() {
            return self.refuse(WATCH_RANGE_EMPTY).await;
        }
        let id = if c.watch_id == 0 {
            while self.watches.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        } else if self.watches.contains_key(&c.watch_id) {
            return self.refuse(WATCH_DUPLICATE_ID).await;
        } else {
            c.watch_id
        };
        let shape = SHAPES.intern(ShapeKey {
            range,
            no_put: c.filters.contains(&(FilterType::Noput as i32)),
            no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
            prev_kv: c.prev_kv,
        });
        if c.progress_notify && self.progress.is_none() {
            let every = self.hub.config.progress_interval;
            let first = tokio::time::Instant::now() + every;
            self.progress = Some(Box::pin(tokio::time::interval_at(first, every)));
        }
        let spec = WatchSpec {
            id,
            shape,
            fragment: c.fragment,
            progress_notify: c.progress_notify,
            request: Box::new(c),
        };
        let Some(feed) = feed else {
            self.flush().await?;
            return self.create_relayed(spec).await;
        };
        if !feed.clock().answered_since(received) {
            // Waits for a round: what is answered so far goes out first.
            self.flush().await?;
        }
        let learned = watcher::learn_revision(
            &feed,
            spec.request.start_revision,
            received,
            self.hub.config.sync_timeout,
        )
        .await;
        let created = watcher::created(&feed, &spec, learned);
        self.send(created.response.clone()).await?;
        let compacted = feed.compaction().revision();
        if created.start < compacted {
            let resp = watcher::compacted_response(&feed, &spec, compacted);
            self.watches.insert(id, Entry::Ended);
            return self.send(resp).await;
        }
        let watch = CachedWatch::new(feed, spec, &created);
        self.acquire(id, &watch);
        self.watches.insert(id, Entry::Cached(watch));
        // Registered first: whatever the feed applies from now on is noted; the backlog up
        // to now is read from the cache.
        self.serve_backlog(id).await
    }

    /// A watch the caches cannot serve (outside every prefix, or one only etcd can judge):
    /// its own upstream watch.
    async fn create_relayed(&mut self, spec: WatchSpec) -> Result<(), ()> {
        let id = spec.id;
        let (created_tx, created_rx) = tokio::sync::oneshot::channel();
        let task = self.hub.tasks.spawn(relay::run_uncached(
            self.hub.clone(),
            self.metadata.clone(),
            spec,
            self.out.clone(),
            created_tx,
        ));
        // Answer creates in order: wait for etcd's `created` before the next request.
        let _ = created_rx.await;
        self.watches.insert(id, Entry::Relayed(task));
        Ok(())
    }

    /// etcd's answer to a create it refuses: created and canceled at once, id -1.
    async fn refuse(&mut self, reason: &str) -> Result<(), ()> {
        let resp = WatchResponse {
            header: Some(self.hub.upstream.header(self.hub.revision())),
            watch_id: INVALID_WATCH_ID,
            created: true,
            canceled: true,
            cancel_reason: reason.to_string(),
            ..Default::default()
        };
        self.send(resp).await
    }

    /// Files watch `id` under its shape, registering the shape in its feed's index on the
    /// first watch of that shape.
    fn acquire(&mut self, id: i64, watch: &CachedWatch) {
        let shape = &watch.spec.shape;
        let u = self.shapes.entry(shape.id).or_insert_with(|| {
            watch
                .feed
                .index()
                .register(shape.id, &shape.key.range, &self.inbox);
            ShapeWatches {
                feed: watch.feed.clone(),
                shape: shape.clone(),
                ids: Vec::new(),
            }
        });
        if let Err(at) = u.ids.binary_search(&id) {
            u.ids.insert(at, id);
        }
    }

    /// Forgets watch `id` (`entry`) under its shape, releasing the registration after the last.
    fn release(&mut self, id: i64, entry: &Entry) {
        let Some(w) = entry.cached() else { return };
        let tag = w.spec.shape.id;
        if let Some(u) = self.shapes.get_mut(&tag) {
            if let Ok(at) = u.ids.binary_search(&id) {
                u.ids.remove(at);
            }
            if u.ids.is_empty() {
                u.feed.index().release(tag, &self.inbox);
                debug_assert_eq!(u.shape.id, tag);
                self.shapes.remove(&tag);
            }
        }
    }

    /// Brings cached watch `id` up to its feed's head from the cache: its backlog batched as
    /// etcd batches an unsynced watch's, then (synced) one response per revision. Ends synced,
    /// held, or handed to a catch-up when the cache no longer holds its next revision.
    ///
    /// A watch whose next revision is not above the highest header it has shown (a backlog
    /// under a `created` at etcd's revision) is held until the cache is complete up to that
    /// header: sent earlier, a response would carry that header with the events the cache has
    /// so far, and the events between would follow under it ("revision N again" for a client
    /// that resumes from a header, as APISIX does).
    async fn serve_backlog(&mut self, id: i64) -> Result<(), ()> {
        let config = self.hub.config.clone();
        if let Some(Entry::Cached(w)) = self.watches.get_mut(&id) {
            let until = w.highest_header;
            if w.next <= until && !w.feed.complete_or_wake(until, &self.inbox) {
                w.synced = false;
                let feed = w.feed.clone();
                self.held
                    .entry(Arc::as_ptr(&feed) as usize)
                    .or_insert_with(|| (feed.clone(), BTreeSet::new()))
                    .1
                    .insert((until, id));
                return Ok(());
            }
        }
        loop {
            let Some(Entry::Cached(w)) = self.watches.get_mut(&id) else {
                return Ok(());
            };
            let step = w.step(&w.feed.cache());
            match step {
                Step::Idle => {
                    w.synced = true;
                    return Ok(());
                }
                Step::Skip(head) => {
                    w.next = head + 1;
                    w.synced = true;
                    return Ok(());
                }
                Step::Send(batches, head) => {
                    if !self.staged.is_empty() {
                        self.flush().await?;
                    }
                    let Some(Entry::Cached(w)) = self.watches.get_mut(&id) else {
                        return Ok(());
                    };
                    w.deliver(batches, head, &self.out, &config).await?
                }
                Step::CatchUp => {
                    self.flush().await?;
                    self.start_catch_up(id);
                    return Ok(());
                }
            }
        }
    }

    /// Held watches whose feed's cache is now complete up to their header go to `rescan`
    /// (served from the cache); for the others the session asks to be woken.
    fn release_held(&mut self) {
        let (inbox, rescan) = (&self.inbox, &mut self.rescan);
        self.held.retain(|_, (feed, waiting)| {
            let complete = feed.complete();
            while let Some(&(until, id)) = waiting.first() {
                if until > complete {
                    break;
                }
                waiting.pop_first();
                rescan.insert(id);
            }
            match waiting.first() {
                None => false,
                Some(&(until, _)) => {
                    if feed.complete_or_wake(until, inbox) {
                        // Got there meanwhile: look again.
                        inbox.wake();
                    }
                    true
                }
            }
        });
    }

    /// Serves the notes the feeds left: each revision to the (synced) watches of the shape it
    /// concerns, one response per revision as etcd's synced watchers get them. Parks the
    /// session instead when its client is more than the byte budget behind: its registrations
    /// are parked in the feeds' indexes ([`crate::source::index::Index::park`]), so dispatch
    /// no longer tells it anything, and its inbox keeps no notes, only the revision from which
    /// the watches must look at the history again when it resumes
    /// ([`crate::source::index::Inbox::hold`]).
    async fn drain(&mut self) -> Result<(), ()> {
        let config = self.hub.config.clone();
        if !self.staged.is_empty() {
            Box::pin(self.flush()).await?;
        }
        loop {
            if self.out.over_budget() {
                // (Again after a take while parked: the inbox keeps nothing until the next.)
                self.inbox.hold();
                if !self.parked {
                    // Dispatch stops telling this session anything: a parked session costs
                    // no work per revision. Not for a session of many shapes (a burst of
                    // watches on distinct keys), where parking would cost more per park than
                    // the notes it saves; a shape registered while parked is told too (its
                    // notes are dropped by the held inbox).
                    if self.shapes.len() <= PARK_SHAPES_MAX {
                        for (tag, u) in &self.shapes {
                            u.feed.index().park(*tag, &self.inbox);
                        }
                        self.parked_in_index = true;
                    }
                    self.parked = true;
                    metrics::SESSIONS_PARKED.inc();
                    metrics::SESSION_PARKS.inc();
                }
                return Ok(());
            }
            let Some(note) = self.pending.pop_front() else {
                self.release_held();
                if let Some(from) = self.overflow_from.take() {
                    self.overflowed(from);
                    continue;
                }
                if let Some(id) = self.rescan.pop_first() {
                    Box::pin(self.serve_backlog(id)).await?;
                    continue;
                }
                let taken = self.inbox.take();
                if taken.notes.is_empty() && taken.overflow_from.is_none() {
                    return Ok(());
                }
                self.pending.extend(taken.notes);
                self.overflow_from = taken.overflow_from;
                continue;
            };
            let (tag, revision) = match note {
                Note::Events { tag, revision } => (tag, revision),
                Note::Reset { tag, from, to } => {
                    self.reset(tag, from, to);
                    continue;
                }
            };
            let Some(u) = self.shapes.get(&tag) else {
                continue;
            };
            let feed = u.feed.clone();
            let shape = u.shape.clone();
            let batch = feed.cache().batch_at(revision);
            let ids = u.ids.clone();
            // The live replies to this revision, queued together (one parcel, one wake-up of
            // the encoder) after the loop or before anything else is queued.
            let mut live = Live::default();
            // What every live reply to this revision shares: its events for the shape, and
            // the header (read once, not per watch).
            let shared = match &batch {
                Some(Some(b)) => Some((
                    shape.with_encoded(b, |e| e.count),
                    feed.upstream().header(revision),
                )),
                _ => None,
            };
            for id in ids {
                if self.out.over_budget_with(live.bytes) {
                    // Served again on resume; the watches already served skip it.
                    self.pending.push_front(note);
                    break;
                }
                let Some(Entry::Cached(w)) = self.watches.get_mut(&id) else {
                    continue;
                };
                if !w.synced || w.next > revision {
                    continue;
                }
                // Every earlier revision with a key of this shape was noted before.
                w.next = revision;
                match &batch {
                    Some(Some(b)) if w.is_live() => {
                        let Some((events, header)) = &shared else {
                            continue;
                        };
                        if let Some(header) = w.live_reply(revision, *events, header) {
                            live.push(id, header, *events, b, &shape);
                        }
                    }
                    Some(Some(b)) => {
                        live.send(&self.out, &feed).await?;
                        Box::pin(w.deliver(vec![b.clone()], revision, &self.out, &config)).await?
                    }
                    Some(None) => w.next = revision + 1,
                    // Out of the window already: etcd replays from here.
                    None => {
                        live.send(&self.out, &feed).await?;
                        self.start_catch_up(id)
                    }
                }
            }
            live.send(&self.out, &feed).await?;
        }
    }

    /// Notes from revision `from` on were dropped. When the session's watches are all on one
    /// feed whose history still holds `from`, the notes are rebuilt from that history, a chunk
    /// of revisions at a time (the rest stays in `overflow_from`); otherwise every cached watch
    /// steps its cursor through the shared history from there (the kept notes, all older, are
    /// served).
    fn overflowed(&mut self, from: i64) {
        let mut feeds = self.shapes.values().map(|u| &u.feed);
        if let Some(feed) = feeds.next().cloned() {
            if feeds.all(|f| Arc::ptr_eq(f, &feed)) {
                let batches = feed.cache().batches_after(from - 1, OVERFLOW_CHUNK);
                if let Some(batches) = batches {
                    if batches.len() == OVERFLOW_CHUNK {
                        self.overflow_from = batches.last().map(|b| b.revision + 1);
                    }
                    let mut notes = Vec::new();
                    let shapes = &self.shapes;
                    feed.index()
                        .notes_for(&batches, |t| shapes.contains_key(&t), &mut notes);
                    self.pending.extend(notes);
                    return;
                }
            }
        }
        for (id, e) in &mut self.watches {
            if let Entry::Cached(w) = e {
                if w.synced {
                    w.next = w.next.max(from);
                    self.rescan.insert(*id);
                }
            }
        }
    }

    /// The feed of shape `tag` was reloaded at `to`: its watches still expecting revisions
    /// up to `to` get them from etcd, from `from` at the earliest (nothing before concerned
    /// them, or it was noted and served).
    fn reset(&mut self, tag: u64, from: i64, to: i64) {
        let Some(u) = self.shapes.get(&tag) else {
            return;
        };
        let ids = u.ids.clone();
        for id in ids {
            let Some(Entry::Cached(w)) = self.watches.get_mut(&id) else {
                continue;
            };
            if w.synced && w.next <= to {
                w.next = w.next.max(from);
                self.start_catch_up(id);
            }
        }
    }

    /// Hands watch `id` to a catch-up task replaying from etcd.
    fn start_catch_up(&mut self, id: i64) {
        let Some(Entry::Cached(watch)) = self.watches.remove(&id) else {
            return;
        };
        self.generation += 1;
        let generation = self.generation;
        let (feed, spec, from) = (watch.feed.clone(), watch.spec.clone(), watch.next);
        let mut highest_header = watch.highest_header;
        let (out, metadata) = (self.out.clone(), self.metadata.clone());
        let (config, relays) = (self.hub.config.clone(), self.hub.relays.clone());
        let handoff = self
            .handoffs
            .get_or_insert_with(mpsc::unbounded_channel)
            .0
            .clone();
        let span = tracing::info_span!("catch_up", prefix = %feed.name, watch_id = spec.id, from);
        let task = self.hub.tasks.spawn(
            async move {
                let resume = relay::catch_up(
                    &relays,
                    &feed,
                    &spec,
                    from,
                    &mut highest_header,
                    &out,
                    &metadata,
                    &config,
                )
                .await;
                let _ = handoff.send((
                    spec.id,
                    generation,
                    resume.map(|next| (next, highest_header)),
                ));
            }
            .instrument(span),
        );
        self.watches.insert(
            id,
            Entry::CatchingUp {
                watch,
                task,
                generation,
            },
        );
    }

    /// A catch-up finished: the watch continues from the cache, or it ended.
    async fn handoff(&mut self, (id, generation, resume): Handoff) -> Result<(), ()> {
        self.flush().await?;
        let current = matches!(
            self.watches.get(&id),
            Some(Entry::CatchingUp { generation: g, .. }) if *g == generation
        );
        if !current {
            return Ok(());
        }
        let Some(Entry::CatchingUp { mut watch, .. }) = self.watches.remove(&id) else {
            return Ok(());
        };
        match resume {
            Some((next, highest_header)) => {
                watch.next = next;
                watch.highest_header = highest_header;
                watch.synced = true;
                self.watches.insert(id, Entry::Cached(watch));
                self.serve_backlog(id).await
            }
            None => {
                let entry = Entry::Cached(watch);
                self.release(id, &entry);
                self.watches.insert(id, Entry::Ended);
                Ok(())
            }
        }
    }

    /// A progress tick: notifications for the cached watches that are due one.
    async fn progress_tick(&mut self) -> Result<(), ()> {
        // The revision each feed has dispatched, read before serving the notes: once they are
        // served, every watch has had every event up to it, so that is its progress header.
        let mut dispatched: HashMap<usize, i64> = HashMap::new();
        for u in self.shapes.values() {
            dispatched
                .entry(Arc::as_ptr(&u.feed) as usize)
                .or_insert_with(|| u.feed.index().dispatched());
        }
        self.drain().await?;
        if self.parked || !self.pending.is_empty() || !self.rescan.is_empty() {
            // Not caught up: etcd sends no progress to a watcher that is behind either.
            return Ok(());
        }
        let due: Vec<WatchResponse> = self
            .watches
            .values_mut()
            .filter_map(|e| match e {
                Entry::Cached(w) => {
                    let rev = dispatched
                        .get(&(Arc::as_ptr(&w.feed) as usize))
                        .copied()
                        .unwrap_or_else(|| w.feed.index().dispatched());
                    w.progress_due(rev)
                }
                _ => None,
            })
            .collect();
        for resp in due {
            self.send(resp).await?;
        }
        self.flush().await
    }
}

/// Bytes of received requests a session holds before its reader stops reading the stream
/// (then the HTTP/2 flow-control window holds the client back; see `wire/server.rs` for why
/// h2's budget for small DATA frames is not reached first).
const MAX_QUEUED_REQUEST_BYTES: usize = 1 << 20;

/// Requests handled in one turn of the session before it looks at its other work (notes,
/// catch-ups, its client leaving).
const REQUESTS_PER_TURN: usize = 1024;

/// Most shapes a session parks in its feeds' indexes when its client falls behind (see
/// [`Session::drain`]); a session with more stays registered (its held inbox drops the notes).
const PARK_SHAPES_MAX: usize = 64;

/// Revisions of history read at a time to rebuild the notes an inbox dropped.
const OVERFLOW_CHUNK: usize = 64;

/// The live replies of one revision gathered by [`Session::drain`] before they are queued as
/// one parcel, and what they count: the watches of one shape, grouped by header (all of them,
/// unless a watch has shown a higher header before) into [`LiveReplies`].
#[derive(Default)]
struct Live {
    /// Groups made, in the order of their watches.
    replies: Vec<Reply>,
    /// The group being added to.
    group: Option<LiveReplies>,
    /// Their [`Reply::queued_bytes`].
    bytes: usize,
    /// Events they carry.
    events: usize,
}

impl Live {
    /// Adds watch `id`'s reply with `header` and `events` events of `batch` for `shape`.
    fn push(
        &mut self,
        id: i64,
        header: ResponseHeader,
        events: usize,
        batch: &Arc<RevBatch>,
        shape: &Arc<Shape>,
    ) {
        self.bytes += 32 + batch.bytes;
        self.events += events;
        if let Some(g) = &mut self.group {
            if g.header == header {
                g.ids.push(id);
                return;
            }
        }
        let group = LiveReplies {
            header,
            batch: batch.clone(),
            shape: shape.clone(),
            ids: smallvec::smallvec![id],
        };
        if let Some(done) = self.group.replace(group) {
            self.replies.push(Reply::Live(done));
        }
    }

    /// Queues what was gathered and counts its events (in the totals and `feed`'s).
    async fn send(&mut self, out: &super::Out, feed: &Feed) -> Result<(), ()> {
        if let Some(done) = self.group.take() {
            self.replies.push(Reply::Live(done));
        }
        if self.replies.is_empty() {
            return Ok(());
        }
        let events = std::mem::take(&mut self.events) as u64;
        self.bytes = 0;
        out.send_now(std::mem::take(&mut self.replies)).await?;
        metrics::EVENTS_SENT.inc_by(events);
        feed.counters.events_out.inc_by(events);
        Ok(())
    }
}

/// Plain responses staged before they are queued as one parcel.
const STAGED_REPLIES: usize = 64;

/// The memory a received request holds until it is handled: the decoded message and its
/// encoded size (keys share the receive buffer).
fn request_bytes(req: &WatchRequest) -> usize {
    std::mem::size_of::<Incoming>() + prost::Message::encoded_len(req)
}

/// The session's request reader: moves requests from the stream to the session as they
/// arrive, stamped with the time they were received, while the session has room for them
/// (`room`, in bytes); without room it waits, and the stream is not read.
async fn read_requests<S>(
    mut requests: S,
    to_session: super::queue::Sender<Incoming>,
    room: Arc<Semaphore>,
) where
    S: Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static,
{
    loop {
        let item = match requests.next().await {
            Some(Ok(req)) => {
                let received = Instant::now();
                let cost = request_bytes(&req).min(MAX_QUEUED_REQUEST_BYTES);
                let Ok(permits) = room.acquire_many(cost as u32).await else {
                    return;
                };
                permits.forget();
                Incoming::Request(req, received, cost)
            }
            Some(Err(status)) => Incoming::Failed(status),
            None => Incoming::End,
        };
        let last = !matches!(item, Incoming::Request(..));
        if to_session.try_send(item).is_err() || last {
            return;
        }
    }
}

/// The next report of a catch-up task; never, while the stream has had none.
async fn next_handoff(
    handoffs: &mut Option<(
        mpsc::UnboundedSender<Handoff>,
        mpsc::UnboundedReceiver<Handoff>,
    )>,
) -> Option<Handoff> {
    match handoffs {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The next progress tick, or never when no watch asked for progress.
async fn tick(progress: &mut Option<Pin<Box<tokio::time::Interval>>>) {
    match progress {
        Some(p) => {
            p.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::source::upstream::Upstream;
    use clap::Parser;

    /// Each downstream stream is one session task holding this future: keep it small (the
    /// states of creates, catch-up handoffs, backlogs and progress ticks are boxed; 3,136 bytes
    /// in a test build before they were, 1,840 after).
    #[tokio::test]
    async fn session_future_is_small() {
        let upstream = Arc::new(Upstream::new(&["http://127.0.0.1:1".to_string()]).unwrap());
        let config = Config::parse_from(["etcd-fanout"]);
        let tasks = crate::tasks::Tasks::new();
        let access = Access::start(&config, upstream.clone(), &tasks);
        let hub = Hub::start(config, upstream, tasks);
        let (tx, _rx, _) = Out::channel(1);
        let session = Session::new(hub, access, MetadataMap::new(), tx, None);
        let requests = futures::stream::empty::<Result<WatchRequest, Status>>();
        let fut = session.run(requests);
        let size = std::mem::size_of_val(&fut);
        assert!(size < 2048, "session future is {size} bytes");
    }
}
