//! One configured prefix: its single upstream etcd watch and the cache it fills.
//!
//! Data flow: `load` pages the prefix out of etcd at one revision R, then one watch from R+1
//! (with `prev_kv`) streams every change; each revision's events become one [`RevBatch`] applied
//! to the [`Cache`], and the new head revision is published on a `watch` channel that wakes the
//! downstream watchers (they pull what they need from the cache; nothing is pushed per watcher).
//!
//! After any upstream failure the watch resumes from head+1, so nothing is lost or repeated.
//! If etcd compacted past that point the prefix is loaded again; watchers that still needed
//! the missing revisions then fall back to etcd, which answers them exactly as it would have.
//!
//! The feed also answers "is the cache at least as new as etcd right now?" for linearizable
//! reads, with one upstream request shared by every read waiting at that moment.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::Config;
use crate::keys::KeyRange;
use crate::metrics;
use crate::proto::etcdserverpb::{RangeRequest, WatchCreateRequest};
use crate::proto::mvccpb::Event;
use crate::source::cache::{Cache, RevBatch};
use crate::source::compaction::Compaction;
use crate::source::upstream::Upstream;

/// How a linearizable read may be answered from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncPoint {
    /// Read the cache at this revision (0: at its head).
    pub read_at: i64,
    /// Revision to report in the response header.
    pub report: i64,
}

/// A configured prefix, its cache and its upstream watch.
#[derive(Debug)]
pub struct Feed {
    /// The prefix as configured (for logs and metrics).
    pub name: String,
    /// Keys held.
    pub range: KeyRange,
    /// State and history.
    cache: RwLock<Cache>,
    /// Publishes the head revision after every change (also after reloads).
    head_tx: watch::Sender<i64>,
    /// True once the prefix is loaded and watched.
    ready: AtomicBool,
    /// The etcd cluster.
    upstream: Arc<Upstream>,
    /// etcd's compaction revision as known.
    compaction: Arc<Compaction>,
    /// Keys per load page.
    page_size: i64,
    /// Revisions of history fetched back from etcd after each load.
    backfill_revisions: i64,
    /// The last sync check's finding `(h, x)`: the cached state at head `h` is etcd's state at
    /// revision `x` (serializable reads at head `h` report `x`, as etcd would).
    verified: std::sync::Mutex<(i64, i64)>,
    /// Queue of linearizable reads waiting for a sync check.
    sync_tx: mpsc::UnboundedSender<oneshot::Sender<Option<SyncPoint>>>,
}

impl Feed {
    /// Creates the feed and starts its upstream watch and sync tasks.
    pub fn spawn(
        prefix: &str,
        upstream: Arc<Upstream>,
        compaction: Arc<Compaction>,
        config: &Config,
    ) -> Arc<Feed> {
        let range = KeyRange::prefix(prefix.as_bytes());
        let (head_tx, _) = watch::channel(0);
        let (sync_tx, sync_rx) = mpsc::unbounded_channel();
        let feed = Arc::new(Feed {
            name: prefix.to_string(),
            cache: RwLock::new(Cache::new(
                range.clone(),
                config.history_revisions,
                config.history_bytes,
            )),
            range,
            head_tx,
            ready: AtomicBool::new(false),
            upstream,
            compaction,
            page_size: config.load_page_size.max(1),
            backfill_revisions: config.backfill_revisions.min(config.history_revisions) as i64,
            verified: std::sync::Mutex::new((0, 0)),
            sync_tx,
        });
        tokio::spawn(feed.clone().run());
        tokio::spawn(feed.clone().sync_loop(sync_rx, config.sync_timeout));
        feed
    }

    /// Read access to the cache (hold it briefly; never across an `.await`).
    pub fn cache(&self) -> RwLockReadGuard<'_, Cache> {
        self.cache.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes to head revision changes.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.head_tx.subscribe()
    }

    /// The head revision.
    pub fn head(&self) -> i64 {
        *self.head_tx.borrow()
    }

    /// True once the prefix is loaded and its upstream watch is established.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// etcd's compaction revision as known.
    pub fn compaction(&self) -> &Compaction {
        &self.compaction
    }

    /// The upstream.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    fn publish(&self, head: i64) {
        self.head_tx.send_modify(|h| *h = head);
    }

    /// Keeps the cache loaded and watched, forever.
    async fn run(self: Arc<Self>) {
        let mut need_load = true;
        let mut backoff = Duration::from_millis(100);
        loop {
            if need_load {
                match self.load().await {
                    Ok(revision) => {
                        need_load = false;
                        tokio::spawn(self.clone().backfill(revision));
                    }
                    Err(e) => {
                        tracing::warn!(prefix = %self.name, error = %e, "loading prefix failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
            match self.watch_once(&mut backoff).await {
                Ok(compact) => {
                    tracing::warn!(prefix = %self.name, compact, "upstream watch compacted; reloading");
                    self.compaction.observe(compact);
                    need_load = true;
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    tracing::warn!(prefix = %self.name, error = %e, "upstream watch failed; resuming");
                    metrics::UPSTREAM_WATCH_RESTARTS.inc();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Pages the whole prefix out of etcd at one revision and resets the cache to it; returns
    /// that revision.
    async fn load(&self) -> Result<i64, tonic::Status> {
        let mut kv = self.upstream.kv();
        let end = self.range.range_end();
        let mut key = self.range.start.clone();
        let mut revision = 0;
        let mut kvs = Vec::new();
        loop {
            let resp = kv
                .range(RangeRequest {
                    key: key.clone(),
                    range_end: end.clone(),
                    limit: self.page_size,
                    revision,
                    ..Default::default()
                })
                .await?
                .into_inner();
            self.upstream.observe_header(resp.header.as_ref());
            if revision == 0 {
                revision = resp.header.as_ref().map_or(0, |h| h.revision);
            }
            let more = resp.more;
            if let Some(last) = resp.kvs.last() {
                let mut next = last.key.to_vec();
                next.push(0);
                key = Bytes::from(next);
            }
            kvs.extend(resp.kvs);
            if !more {
                break;
            }
        }
        let n = kvs.len();
        {
            let mut c = self.cache.write().unwrap_or_else(|e| e.into_inner());
            c.reset(revision, kvs);
        }
        tracing::info!(prefix = %self.name, keys = n, revision, "prefix loaded");
        self.publish(revision);
        Ok(revision)
    }

    /// Fetches the history before a load at `upto` back from etcd, so that clients resuming
    /// from a revision shortly before it are served from memory. It watches the whole keyspace
    /// from `upto - backfill_revisions`: every revision has at least one event somewhere, so the
    /// event at `upto` itself proves everything before it was delivered. Events of this prefix
    /// are kept; the cache takes them only if its window has not moved meanwhile.
    async fn backfill(self: Arc<Self>, upto: i64) {
        if self.backfill_revisions <= 0 || upto <= 1 {
            return;
        }
        let mut base = (upto - self.backfill_revisions)
            .max(self.compaction.revision() - 1)
            .max(1);
        for _ in 0..3 {
            if base >= upto {
                return;
            }
            match tokio::time::timeout(BACKFILL_TIMEOUT, self.replay(base, upto)).await {
                Ok(Ok(batches)) => {
                    let n = batches.len();
                    let ok = self
                        .cache
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .prepend(base, upto, batches);
                    tracing::info!(prefix = %self.name, from = base, to = upto, batches = n, applied = ok, "history backfilled");
                    return;
                }
                Ok(Err(Replay::Compacted(c))) => {
                    self.compaction.observe(c);
                    base = c - 1;
                }
                Ok(Err(Replay::Failed(e))) => {
                    tracing::debug!(prefix = %self.name, error = %e, "backfill failed");
                    return;
                }
                Err(_) => return,
            }
        }
    }

    /// The batches of this prefix in revisions `(base, upto]`, from a whole-keyspace watch.
    async fn replay(&self, base: i64, upto: i64) -> Result<Vec<RevBatch>, Replay> {
        let create = WatchCreateRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            start_revision: base + 1,
            prev_kv: true,
            ..Default::default()
        };
        let mut up = self
            .upstream
            .open_watch(&Default::default(), create)
            .await
            .map_err(Replay::Failed)?;
        let mut events = Vec::new();
        loop {
            let resp = up
                .responses
                .message()
                .await
                .map_err(Replay::Failed)?
                .ok_or_else(|| Replay::Failed(tonic::Status::unavailable("stream ended")))?;
            if resp.compact_revision > 0 {
                return Err(Replay::Compacted(resp.compact_revision));
            }
            if resp.canceled {
                return Err(Replay::Failed(tonic::Status::unavailable(
                    resp.cancel_reason,
                )));
            }
            let mut done = false;
            for ev in resp.events {
                let Some(kv) = &ev.kv else { continue };
                done |= kv.mod_revision >= upto;
                if kv.mod_revision <= upto && self.range.contains_key(&kv.key) {
                    events.push(ev);
                }
            }
            if done {
                return Ok(group_by_revision(events));
            }
        }
    }

    /// Runs one upstream watch from head+1 until it fails (`Err`) or etcd says the resume
    /// revision is compacted (`Ok(compact_revision)`).
    async fn watch_once(&self, backoff: &mut Duration) -> Result<i64, tonic::Status> {
        let start = self.cache().head() + 1;
        let create = WatchCreateRequest {
            key: self.range.start.clone(),
            range_end: self.range.range_end(),
            start_revision: start,
            prev_kv: true,
            progress_notify: true,
            ..Default::default()
        };
        let mut up = self
            .upstream
            .open_watch(&Default::default(), create)
            .await?;
        metrics::UPSTREAM_WATCHES.inc();
        let _gauge = scopeguard(|| metrics::UPSTREAM_WATCHES.dec());
        while let Some(resp) = up.responses.message().await? {
            self.upstream.observe_header(resp.header.as_ref());
            if resp.canceled {
                if resp.compact_revision > 0 {
                    return Ok(resp.compact_revision);
                }
                return Err(tonic::Status::unavailable(format!(
                    "upstream watch canceled: {}",
                    resp.cancel_reason
                )));
            }
            if resp.created {
                tracing::info!(prefix = %self.name, start, "upstream watch established");
                // A healthy watch: the next failure retries quickly again.
                *backoff = Duration::from_millis(100);
                self.ready.store(true, Ordering::Release);
                continue;
            }
            if resp.events.is_empty() {
                // A progress notification: every event up to this revision was delivered.
                let rev = resp.header.as_ref().map_or(0, |h| h.revision);
                let head = {
                    let mut c = self.cache.write().unwrap_or_else(|e| e.into_inner());
                    c.advance(rev);
                    c.head()
                };
                self.publish(head);
                continue;
            }
            self.apply_events(resp.events);
        }
        Err(tonic::Status::unavailable("upstream watch stream ended"))
    }

    /// Groups events by revision and applies each group as one batch.
    fn apply_events(&self, events: Vec<Event>) {
        let batches = group_by_revision(events);
        let n: usize = batches.iter().map(|b| b.events.len()).sum();
        let head = {
            let mut c = self.cache.write().unwrap_or_else(|e| e.into_inner());
            for b in batches {
                if let Err(e) = c.apply(b) {
                    // Already applied before a reconnect: skip, never apply twice.
                    tracing::debug!(prefix = %self.name, error = %e, "skipping batch");
                }
            }
            c.head()
        };
        metrics::UPSTREAM_EVENTS.inc_by(n as u64);
        self.publish(head);
    }

    /// The revision etcd was at when it last had exactly the state cached at `head`
    /// (`head` itself unless a sync check proved more).
    pub fn verified_revision(&self, head: i64) -> i64 {
        match self.verified.lock() {
            Ok(v) if v.0 == head => v.1.max(head),
            _ => head,
        }
    }

    /// Waits until the cache can answer a linearizable read: returns where to read and which
    /// revision to report, or `None` when it cannot tell in time (the caller forwards).
    pub async fn linearize(&self) -> Option<SyncPoint> {
        let (tx, rx) = oneshot::channel();
        self.sync_tx.send(tx).ok()?;
        rx.await.ok().flatten()
    }

    /// Serves [`Feed::linearize`]: each round answers every read queued before it started.
    async fn sync_loop(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<oneshot::Sender<Option<SyncPoint>>>,
        timeout: Duration,
    ) {
        while let Some(first) = rx.recv().await {
            let mut waiting = vec![first];
            while let Ok(w) = rx.try_recv() {
                waiting.push(w);
            }
            let point = tokio::time::timeout(timeout, self.sync_check())
                .await
                .ok()
                .flatten();
            metrics::SYNC_CHECKS.inc();
            for w in waiting {
                let _ = w.send(point);
            }
        }
    }

    /// One shared check against etcd.
    ///
    /// 1. A linearizable `count_only` Range of the prefix (answered from etcd's in-memory
    ///    index, no values read) gives etcd's current revision X. If the cache head reached X,
    ///    read at the head.
    /// 2. Otherwise give the upstream watch a moment to deliver what is in flight.
    /// 3. If the head is still below X (typically: writes outside the prefix), ask whether
    ///    anything in the prefix changed after the head H: a Range at X of keys with
    ///    `mod_revision > H`. None, and the same number of keys (so no delete either), means
    ///    the state at X is the cached state at H: read at H and report X. Otherwise wait for
    ///    the watch and start over.
    async fn sync_check(&self) -> Option<SyncPoint> {
        if !self.is_ready() {
            return None;
        }
        let at_head = SyncPoint {
            read_at: 0,
            report: 0,
        };
        let mut head_rx = self.subscribe();
        loop {
            let resp = self
                .upstream
                .kv()
                .range(RangeRequest {
                    key: self.range.start.clone(),
                    range_end: self.range.range_end(),
                    count_only: true,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            self.upstream.observe_header(resp.header.as_ref());
            let x = resp.header.as_ref().map_or(0, |h| h.revision);
            let in_flight = head_rx.wait_for(|h| *h >= x);
            if let Ok(r) = tokio::time::timeout(IN_FLIGHT_WAIT, in_flight).await {
                return r.ok().map(|_| at_head);
            }
            let (h1, count1) = {
                let c = self.cache();
                (c.head(), c.len() as i64)
            };
            if h1 >= x {
                return Some(at_head);
            }
            let changed = self
                .upstream
                .kv()
                .range(RangeRequest {
                    key: self.range.start.clone(),
                    range_end: self.range.range_end(),
                    revision: x,
                    min_mod_revision: h1 + 1,
                    keys_only: true,
                    limit: 1,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            if changed.kvs.is_empty() && changed.count == count1 {
                if let Ok(mut v) = self.verified.lock() {
                    *v = (h1, x);
                }
                return Some(SyncPoint {
                    read_at: h1,
                    report: x,
                });
            }
            // The watch has not delivered everything yet: wait for it, then check again.
            let wait = head_rx.wait_for(|h| *h >= x);
            match tokio::time::timeout(Duration::from_millis(200), wait).await {
                Ok(Ok(_)) => return Some(at_head),
                Ok(Err(_)) => return None,
                Err(_) => continue,
            }
        }
    }
}

/// How long a linearizable read waits for events already in flight on the upstream watch
/// before asking etcd whether the prefix changed at all.
const IN_FLIGHT_WAIT: Duration = Duration::from_millis(10);

/// Longest a history backfill may take before it is abandoned.
const BACKFILL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a backfill replay stopped.
#[derive(Debug)]
enum Replay {
    /// etcd compacted past the start: retry from this revision.
    Compacted(i64),
    /// Anything else: give up (the cache works without the backfill).
    Failed(tonic::Status),
}

/// Splits events (in etcd's order) into one batch per revision.
fn group_by_revision(events: Vec<Event>) -> Vec<RevBatch> {
    let mut batches: Vec<RevBatch> = Vec::new();
    let mut cur: Vec<Event> = Vec::new();
    let mut cur_rev = 0;
    for ev in events {
        let rev = ev.kv.as_ref().map_or(0, |kv| kv.mod_revision);
        if rev != cur_rev && !cur.is_empty() {
            batches.push(RevBatch::new(cur_rev, std::mem::take(&mut cur)));
        }
        cur_rev = rev;
        cur.push(ev);
    }
    if !cur.is_empty() {
        batches.push(RevBatch::new(cur_rev, cur));
    }
    batches
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
