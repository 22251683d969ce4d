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
//! reads, with one round of upstream requests shared by every read waiting at that moment.
//!
//! Its parts: [`watch_loop`] (the upstream watch, resume and reload), [`load`] (paging the
//! prefix at one revision), [`backfill`] (history before a load), [`sync`] (the
//! linearizability check).

mod backfill;
mod health;
mod load;
mod sync;
mod watch_loop;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, Weak};

use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::keys::KeyRange;
use crate::proto::mvccpb::Event;
use crate::source::cache::{Cache, RevBatch};
use crate::source::clock::Clock;
use crate::source::compaction::Compaction;
use crate::source::index::{Inbox, Index};
use crate::source::upstream::Upstream;
use crate::tasks::Tasks;

pub use health::{Health, UpstreamState};
use sync::SyncAsk;

/// How long after a feed's start watch creates wait for its first load (see
/// [`Feed::wait_ready`]); later, an unready feed is one etcd refuses to the proxy, and creates
/// go to etcd at once.
const LOAD_WAIT_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

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
    /// Which sessions each applied revision concerns.
    index: Index,
    /// True once the prefix is loaded and watched (it stays true: see [`Health`] for what
    /// holds now).
    ready: AtomicBool,
    /// Woken when the feed turns ready.
    ready_notify: tokio::sync::Notify,
    /// When the feed was started: a watch create waits for its first load only shortly after.
    started: tokio::time::Instant,
    /// Upstream watch state and currency of the cache.
    pub health: Health,
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
    /// Owner of the feed's tasks (watch loop, sync loop, backfills).
    tasks: Tasks,
    /// The prefix's metric handles (events in and out, watchers, catch-ups), labelled once
    /// here so the hot paths only add.
    pub counters: crate::metrics::PrefixCounters,
    /// Queue of linearizable reads and complete-revision waits for a sync check.
    sync_tx: mpsc::UnboundedSender<SyncAsk>,
    /// etcd's revision as a client may have seen it elsewhere (shared by every feed): the
    /// `created` header of a watch.
    clock: Arc<Clock>,
    /// The complete revision: every event of the prefix up to it is in the cache (the head, or
    /// a revision a sync check proved nothing in the prefix changed up to). Only grows.
    complete: AtomicI64,
    /// Sessions waiting for the complete revision to reach a revision (by inbox address: the
    /// lowest revision each waits for), woken through their inbox.
    complete_waiters: Mutex<HashMap<usize, (i64, Weak<Inbox>)>>,
}

/// The receiving end of a feed's queue of reads waiting for a sync check.
type SyncQueue = mpsc::UnboundedReceiver<SyncAsk>;

impl Feed {
    /// Creates the feed and starts its upstream watch and sync tasks.
    pub fn spawn(
        prefix: &str,
        upstream: Arc<Upstream>,
        compaction: Arc<Compaction>,
        clock: Arc<Clock>,
        config: &Config,
        tasks: &Tasks,
    ) -> Arc<Feed> {
        let cache = Cache::new(config.history_revisions, config.history_bytes);
        let (feed, sync_rx) = Feed::new(
            prefix,
            (upstream, compaction, clock),
            config,
            tasks,
            cache,
            0,
        );
        let feed = Arc::new(feed);
        tasks.spawn(feed.clone().run());
        tasks.spawn(feed.clone().sync_loop(sync_rx, config.sync_timeout));
        tasks.spawn(feed.clone().health_loop());
        feed
    }

    /// A feed over `cache` whose head is `head`, not ready, with no task yet, and the
    /// receiving end of its sync check queue.
    fn new(
        prefix: &str,
        (upstream, compaction, clock): (Arc<Upstream>, Arc<Compaction>, Arc<Clock>),
        config: &Config,
        tasks: &Tasks,
        cache: Cache,
        head: i64,
    ) -> (Feed, SyncQueue) {
        let (head_tx, _) = watch::channel(head);
        let (sync_tx, sync_rx) = mpsc::unbounded_channel();
        let feed = Feed {
            name: prefix.to_string(),
            cache: RwLock::new(cache),
            range: KeyRange::prefix(prefix.as_bytes()),
            head_tx,
            index: Index::default(),
            ready: AtomicBool::new(false),
            ready_notify: tokio::sync::Notify::new(),
            started: tokio::time::Instant::now(),
            health: Health::new(config.stale_after),
            upstream,
            compaction,
            page_size: config.load_page_size.max(1),
            backfill_revisions: config.backfill_revisions.min(config.history_revisions) as i64,
            verified: std::sync::Mutex::new((0, 0)),
            tasks: tasks.clone(),
            counters: crate::metrics::PrefixCounters::new(prefix),
            sync_tx,
            clock,
            complete: AtomicI64::new(0),
            complete_waiters: Mutex::new(HashMap::new()),
        };
        (feed, sync_rx)
    }

    /// A ready feed over an in-memory cache at revision 1 (etcd's first, no keys), with no
    /// task of its own: no upstream watch, no sync check (each answers "cannot tell" at once),
    /// no health loop. What happens upstream is told to it with [`Feed::apply_events`] and
    /// [`Feed::advance`]. Only for `crate::fuzzing`'s watch session target, which drives real
    /// sessions over it without any etcd.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn in_memory(
        prefix: &str,
        upstream: Arc<Upstream>,
        compaction: Arc<Compaction>,
        config: &Config,
        tasks: &Tasks,
    ) -> Arc<Feed> {
        let mut cache = Cache::new(config.history_revisions, config.history_bytes);
        // State known from revision 0 on: a watch from revision 1 reads the window.
        cache.reset(0, Vec::new());
        cache.advance(1);
        // The sync queue's receiver is dropped: every sync check answers "cannot tell".
        let clock = Clock::detached(upstream.clone());
        let (feed, _) = Feed::new(
            prefix,
            (upstream, compaction, clock),
            config,
            tasks,
            cache,
            1,
        );
        feed.ready.store(true, Ordering::Release);
        feed.health.set_state(UpstreamState::Watching);
        feed.health.mark_current();
        Arc::new(feed)
    }

    /// Read access to the cache (hold it briefly; never across an `.await`).
    pub fn cache(&self) -> RwLockReadGuard<'_, Cache> {
        self.cache.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes to head revision changes.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.head_tx.subscribe()
    }

    /// The dispatch index: sessions register their watch shapes here to be told of the
    /// revisions that concern them.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The head revision.
    pub fn head(&self) -> i64 {
        *self.head_tx.borrow()
    }

    /// True once the prefix has been loaded and its upstream watch established (whether it is
    /// still current is [`Feed::health`]'s).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Waits (at most `timeout`) for the feed's first load if the feed is still in its first
    /// moments ([`LOAD_WAIT_WINDOW`] after its start); true if it is ready. A watch created
    /// while its prefix loads (clients reconnecting to a restarted replica, a lower tier
    /// resuming on a restarted upper one) then joins the cache instead of holding an etcd watch
    /// of its own for its whole life.
    pub async fn wait_ready(&self, timeout: std::time::Duration) -> bool {
        let deadline = (tokio::time::Instant::now() + timeout).min(self.started + LOAD_WAIT_WINDOW);
        loop {
            let woken = self.ready_notify.notified();
            if self.is_ready() {
                return true;
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return self.is_ready();
            }
        }
    }

    /// Marks the feed ready (loaded and watched) and wakes creates waiting for it.
    fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
        self.ready_notify.notify_waiters();
    }

    /// etcd's compaction revision as known.
    pub fn compaction(&self) -> &Compaction {
        &self.compaction
    }

    /// The upstream.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// etcd's revision as a client may have seen it elsewhere (shared by every feed).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    fn publish(&self, head: i64) {
        self.head_tx.send_modify(|h| *h = head);
        self.advance_complete(head);
    }

    /// The complete revision: the cache holds every event of the prefix up to it (see
    /// [`Feed::complete`]'s field). A watch response may carry a header revision up to it.
    pub fn complete(&self) -> i64 {
        self.complete.load(Ordering::Acquire).max(self.head())
    }

    /// Every event of the prefix up to `rev` is in the cache: wakes the sessions waiting for
    /// that.
    fn advance_complete(&self, rev: i64) {
        if self.complete.fetch_max(rev, Ordering::AcqRel) >= rev {
            return;
        }
        let mut ready = Vec::new();
        {
            let mut waiters = self
                .complete_waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            waiters.retain(|_, (until, inbox)| {
                if *until > rev {
                    return inbox.strong_count() > 0;
                }
                ready.push(inbox.clone());
                false
            });
        }
        for inbox in ready.iter().filter_map(Weak::upgrade) {
            inbox.wake();
        }
    }

    /// True when the complete revision has reached `until`. Otherwise `inbox` is woken once it
    /// has, and a sync check is started so that it gets there even if the prefix stays idle
    /// (the revision may come from a write outside the prefix): the caller holds what it has
    /// to send after `until` and looks again when woken.
    pub fn complete_or_wake(&self, until: i64, inbox: &Arc<Inbox>) -> bool {
        if self.complete() >= until {
            return true;
        }
        {
            let mut waiters = self
                .complete_waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // Checked again under the lock: `advance_complete` raises the revision before it
            // takes the lock, so either this sees it or it sees this waiter.
            if self.complete() >= until {
                return true;
            }
            let key = Arc::as_ptr(inbox) as usize;
            if waiters.get(&key).is_some_and(|(w, _)| *w <= until) {
                // Already waiting for as much: its check was started then.
                return false;
            }
            waiters.insert(key, (until, Arc::downgrade(inbox)));
        }
        // A round proving the cache complete up to `until`, not waited for: its answer
        // arrives through `advance_complete` (a failed round is followed by the health loop's
        // periodic checks).
        let _ = self.sync_tx.send(SyncAsk::Complete(until));
        false
    }

    /// Forgets `inbox`'s wait (its session ended).
    pub fn forget_waiter(&self, inbox: &Arc<Inbox>) {
        let mut waiters = self
            .complete_waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        waiters.remove(&(Arc::as_ptr(inbox) as usize));
    }
}

/// Splits events (in etcd's order, received at `received`) into one batch per revision.
fn group_by_revision(events: Vec<Event>, received: std::time::Instant) -> Vec<RevBatch> {
    let mut batches: Vec<RevBatch> = Vec::new();
    let mut cur: Vec<Event> = Vec::new();
    let mut cur_rev = 0;
    for ev in events {
        let rev = ev.kv.as_ref().map_or(0, |kv| kv.mod_revision);
        if rev != cur_rev && !cur.is_empty() {
            batches.push(RevBatch::new(cur_rev, std::mem::take(&mut cur)).received_at(received));
        }
        cur_rev = rev;
        cur.push(ev);
    }
    if !cur.is_empty() {
        batches.push(RevBatch::new(cur_rev, cur).received_at(received));
    }
    batches
}
