//! One downstream watch stream and every watch on it.
//!
//! The session is one task. It reads create / cancel / progress requests in order and answers
//! them as etcd does (each `created` before the next request is read). It also serves all of
//! its cached watches itself: it sleeps on the head revision of the feeds they use, and when a
//! head moves it steps every watch of that feed under one read lock of the cache and sends
//! what they need. A feed change therefore costs one wake-up per stream, not one per watch,
//! and a stream's responses for one revision leave together.
//!
//! Watches etcd has to answer run as their own tasks and write to the same channel: relays for
//! watches outside every prefix (for their whole life), and catch-ups for cached watches that
//! fell behind the cache window (they hand the watch back when it reaches the window).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamMap;
use tonic::metadata::MetadataMap;
use tonic::Status;

use super::reply::Reply;
use super::shape::{ShapeKey, SHAPES};
use super::watcher::{self, CachedWatch, Step};
use super::{relay, Out, WatchSpec, INVALID_WATCH_ID};
use crate::error::{go_status_text, Error, WATCH_DUPLICATE_ID, WATCH_RANGE_EMPTY};
use crate::keys::KeyRange;
use crate::metrics;
use crate::proto::etcdserverpb::watch_create_request::FilterType;
use crate::proto::etcdserverpb::{
    watch_request::RequestUnion, WatchCreateRequest, WatchRequest, WatchResponse,
};
use crate::serve::access::{Access, Verdict};
use crate::source::feed::Feed;
use crate::source::hub::Hub;

/// A feed, identified by the address of its (never freed) `Arc`.
type FeedKey = usize;

fn feed_key(feed: &Arc<Feed>) -> FeedKey {
    Arc::as_ptr(feed) as usize
}

/// A catch-up task's result: (watch id, generation, and the revision to resume at with the
/// highest header sent so far, or `None` if the watch ended).
type Handoff = (i64, u64, Option<(i64, i64)>);

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
    fn feed(&self) -> Option<&Arc<Feed>> {
        match self {
            Entry::Cached(w) | Entry::CatchingUp { watch: w, .. } => Some(&w.feed),
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
    /// Head revisions of the feeds the cached watches use.
    heads: StreamMap<FeedKey, WatchStream<i64>>,
    /// The feeds in `heads`, with how many watches use each.
    feeds: HashMap<FeedKey, (Arc<Feed>, usize)>,
    /// Catch-up tasks report here: the channel (both ends) is made by the first catch-up, as
    /// most streams never need one and an idle stream should cost little.
    handoffs: Option<(
        mpsc::UnboundedSender<Handoff>,
        mpsc::UnboundedReceiver<Handoff>,
    )>,
    /// Source of catch-up generations.
    generation: u64,
    /// Progress ticker, created with the first watch that asks for progress notifications
    /// (etcd has one per stream too).
    progress: Option<Pin<Box<tokio::time::Interval>>>,
}

impl Session {
    /// A session writing to `out`.
    pub(super) fn new(
        hub: Arc<Hub>,
        access: Arc<Access>,
        metadata: MetadataMap,
        out: Out,
    ) -> Session {
        Session {
            hub,
            access,
            metadata: Arc::new(metadata),
            out,
            watches: HashMap::new(),
            next_id: 0,
            heads: StreamMap::new(),
            feeds: HashMap::new(),
            handoffs: None,
            generation: 0,
            progress: None,
        }
    }

    /// Serves the stream until the client leaves, sends a bad request, or the proxy stops.
    pub(super) async fn run<S>(mut self, mut requests: S)
    where
        S: Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static,
    {
        metrics::WATCH_STREAMS.inc();
        let mut shutdown = self.hub.shutdown_signal();
        let mut requests_open = true;
        loop {
            tokio::select! {
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                    // End the stream so the client reconnects (to another replica).
                    let status = Status::from(Error::Stopped);
                    let _ = self.out.send(Reply::Error(Box::new(status))).await;
                    break;
                }
                req = requests.next(), if requests_open => match req {
                    Some(Ok(req)) => {
                        if self.handle(req).await.is_err() {
                            break;
                        }
                    }
                    // An undecodable request ends the stream with etcd's error.
                    Some(Err(status)) => {
                        let _ = self.out.send(Reply::Error(Box::new(status))).await;
                        break;
                    }
                    // Request stream closed: keep serving until the client leaves.
                    None => requests_open = false,
                },
                Some((key, _)) = self.heads.next() => {
                    if self.deliver(key).await.is_err() {
                        break;
                    }
                }
                Some(handoff) = next_handoff(&mut self.handoffs) => {
                    if self.handoff(handoff).await.is_err() {
                        break;
                    }
                }
                _ = tick(&mut self.progress) => {
                    if self.progress_tick().await.is_err() {
                        break;
                    }
                }
                _ = self.out.closed() => break,
            }
        }
        for entry in self.watches.values() {
            entry.stop();
        }
        metrics::WATCH_STREAMS.dec();
    }

    /// Handles one request; `Err` when the client is gone.
    async fn handle(&mut self, req: WatchRequest) -> Result<(), ()> {
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(RequestUnion::CancelRequest(c)) => {
                // etcd 3.4 ignores a cancel for an unknown id.
                let Some(entry) = self.watches.remove(&c.watch_id) else {
                    return Ok(());
                };
                entry.stop();
                self.release(&entry);
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

    async fn send(&self, resp: WatchResponse) -> Result<(), ()> {
        self.out.send(Reply::msg(resp)).await.map_err(|_| ())
    }

    async fn create(&mut self, mut c: WatchCreateRequest) -> Result<(), ()> {
        if c.key.is_empty() {
            // etcd: "\x00 is the smallest key".
            c.key = bytes::Bytes::from_static(b"\0");
        }
        let range = KeyRange::new(&c.key, &c.range_end);
        let cacheable = (!range.is_empty())
            .then(|| self.hub.feed_for(&range).filter(|f| f.is_ready()).cloned())
            .flatten();
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
            return self.create_relayed(spec).await;
        };
        let created = watcher::created(&feed, &spec);
        self.send(created.response.clone()).await?;
        let compacted = feed.compaction().revision();
        if created.start < compacted {
            let resp = watcher::compacted_response(&feed, &spec, compacted);
            self.watches.insert(id, Entry::Ended);
            return self.send(resp).await;
        }
        let key = feed_key(&feed);
        let watch = CachedWatch::new(feed.clone(), spec, &created);
        self.acquire(&feed);
        self.watches.insert(id, Entry::Cached(watch));
        // A feed already subscribed does not wake the session for a new watch: serve its
        // backlog now.
        self.deliver(key).await
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

    /// Counts one more watch on `feed`, subscribing to its head on the first.
    fn acquire(&mut self, feed: &Arc<Feed>) {
        let key = feed_key(feed);
        let users = &mut self.feeds.entry(key).or_insert_with(|| (feed.clone(), 0)).1;
        *users += 1;
        if *users == 1 {
            self.heads.insert(key, WatchStream::new(feed.subscribe()));
        }
    }

    /// Forgets `entry`'s use of its feed, unsubscribing after the last watch.
    fn release(&mut self, entry: &Entry) {
        let Some(feed) = entry.feed() else { return };
        let key = feed_key(feed);
        if let Some((_, users)) = self.feeds.get_mut(&key) {
            *users -= 1;
            if *users == 0 {
                self.feeds.remove(&key);
                self.heads.remove(&key);
            }
        }
    }

    /// Brings every cached watch of feed `key` up to the feed's head.
    async fn deliver(&mut self, key: FeedKey) -> Result<(), ()> {
        let Some(feed) = self.feeds.get(&key).map(|(f, _)| f.clone()) else {
            return Ok(());
        };
        let config = self.hub.config.clone();
        loop {
            let work: Vec<(i64, Step)> = {
                let cache = feed.cache();
                self.watches
                    .iter()
                    .filter_map(|(id, e)| match e {
                        Entry::Cached(w) if feed_key(&w.feed) == key => Some((*id, w.step(&cache))),
                        _ => None,
                    })
                    .filter(|(_, step)| !matches!(step, Step::Idle))
                    .collect()
            };
            if work.is_empty() {
                return Ok(());
            }
            for (id, step) in work {
                match step {
                    Step::Idle => {}
                    Step::Skip(head) => {
                        if let Some(Entry::Cached(w)) = self.watches.get_mut(&id) {
                            w.next = head + 1;
                        }
                    }
                    Step::Send(batches, head) => {
                        if let Some(Entry::Cached(w)) = self.watches.get_mut(&id) {
                            w.deliver(batches, head, &self.out, &config).await?;
                        }
                    }
                    Step::CatchUp => self.start_catch_up(id),
                }
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
        let config = self.hub.config.clone();
        let handoff = self
            .handoffs
            .get_or_insert_with(mpsc::unbounded_channel)
            .0
            .clone();
        let task = self.hub.tasks.spawn(async move {
            let resume = relay::catch_up(
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
        });
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
                let key = feed_key(&watch.feed);
                self.watches.insert(id, Entry::Cached(watch));
                self.deliver(key).await
            }
            None => {
                let entry = Entry::Cached(watch);
                self.release(&entry);
                self.watches.insert(id, Entry::Ended);
                Ok(())
            }
        }
    }

    /// A progress tick: notifications for the cached watches that are due one.
    async fn progress_tick(&mut self) -> Result<(), ()> {
        let due: Vec<WatchResponse> = self
            .watches
            .values_mut()
            .filter_map(|e| match e {
                Entry::Cached(w) => w.progress_due(),
                _ => None,
            })
            .collect();
        for resp in due {
            self.send(resp).await?;
        }
        Ok(())
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

    /// Each downstream stream is one session task holding this future: keep it small.
    #[tokio::test]
    async fn session_future_is_small() {
        let upstream = Arc::new(Upstream::new(&["http://127.0.0.1:1".to_string()]).unwrap());
        let config = Config::parse_from(["etcd-fanout"]);
        let tasks = crate::tasks::Tasks::new();
        let access = Access::start(&config, upstream.clone(), &tasks);
        let hub = Hub::start(config, upstream, tasks);
        let (tx, _rx) = mpsc::channel(1);
        let session = Session::new(hub, access, MetadataMap::new(), tx);
        let requests = futures::stream::empty::<Result<WatchRequest, Status>>();
        let fut = session.run(requests);
        let size = std::mem::size_of_val(&fut);
        assert!(size < 4096, "session future is {size} bytes");
    }
}
