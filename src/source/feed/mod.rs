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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use tokio::sync::{mpsc, oneshot, watch};

use crate::config::Config;
use crate::keys::KeyRange;
use crate::proto::mvccpb::Event;
use crate::source::cache::{Cache, RevBatch};
use crate::source::compaction::Compaction;
use crate::source::index::Index;
use crate::source::upstream::Upstream;
use crate::tasks::Tasks;

pub use health::{Health, UpstreamState};
pub use sync::SyncPoint;

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
    /// `etcd_fanout_prefix_events_received_total{prefix}`, labelled once here.
    events_received: prometheus::IntCounter,
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
        tasks: &Tasks,
    ) -> Arc<Feed> {
        let range = KeyRange::prefix(prefix.as_bytes());
        let (head_tx, _) = watch::channel(0);
        let (sync_tx, sync_rx) = mpsc::unbounded_channel();
        let feed = Arc::new(Feed {
            name: prefix.to_string(),
            cache: RwLock::new(Cache::new(config.history_revisions, config.history_bytes)),
            range,
            head_tx,
            index: Index::default(),
            ready: AtomicBool::new(false),
            health: Health::new(config.stale_after),
            upstream,
            compaction,
            page_size: config.load_page_size.max(1),
            backfill_revisions: config.backfill_revisions.min(config.history_revisions) as i64,
            verified: std::sync::Mutex::new((0, 0)),
            tasks: tasks.clone(),
            events_received: crate::metrics::PREFIX_EVENTS_RECEIVED.with_label_values(&[prefix]),
            sync_tx,
        });
        tasks.spawn(feed.clone().run());
        tasks.spawn(feed.clone().sync_loop(sync_rx, config.sync_timeout));
        tasks.spawn(feed.clone().health_loop());
        feed
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
        let (head_tx, _) = watch::channel(1);
        let (sync_tx, _) = mpsc::unbounded_channel();
        let mut cache = Cache::new(config.history_revisions, config.history_bytes);
        // State known from revision 0 on: a watch from revision 1 reads the window.
        cache.reset(0, Vec::new());
        cache.advance(1);
        let feed = Feed {
            name: prefix.to_string(),
            cache: RwLock::new(cache),
            range: KeyRange::prefix(prefix.as_bytes()),
            head_tx,
            index: Index::default(),
            ready: AtomicBool::new(true),
            health: Health::new(config.stale_after),
            upstream,
            compaction,
            page_size: config.load_page_size.max(1),
            backfill_revisions: 0,
            verified: std::sync::Mutex::new((0, 0)),
            tasks: tasks.clone(),
            events_received: crate::metrics::PREFIX_EVENTS_RECEIVED.with_label_values(&[prefix]),
            sync_tx,
        };
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
