//! The fan-out hub: every configured prefix's [`Feed`], and the routing of a request's key
//! range to the feed whose cache covers it. Requests no feed covers go to etcd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Config;
use crate::keys::KeyRange;
use crate::source::clock::Clock;
use crate::source::compaction::Compaction;
use crate::source::feed::Feed;
use crate::source::registry::Registry;
use crate::source::relay_streams::RelayStreams;
use crate::source::upstream::Upstream;
use crate::tasks::Tasks;

/// All feeds and the shared upstream.
#[derive(Debug)]
pub struct Hub {
    /// One feed per configured prefix, most specific (longest) prefix first.
    feeds: Vec<Arc<Feed>>,
    /// The etcd cluster.
    pub upstream: Arc<Upstream>,
    /// etcd's compaction revision as known.
    pub compaction: Arc<Compaction>,
    /// The upstream watch streams relayed watches and catch-ups share, per identity.
    pub relays: Arc<RelayStreams>,
    /// Configuration the hub was built from.
    pub config: Arc<Config>,
    /// The owner of every background task (made and stopped by `main`): the feeds' and the
    /// compaction poll's, and every task spawned below the listener.
    pub tasks: Tasks,
    /// Turns true when the proxy shuts down: sessions end their streams so clients reconnect
    /// to another replica.
    shutdown: watch::Sender<bool>,
    /// True from SIGTERM on: `/readyz` fails while everything is still served, so load
    /// balancers stop sending new clients before the streams end.
    draining: AtomicBool,
    /// Discovery (`--advertise-client-url`): this replica's registration and everyone's.
    pub registry: Option<Arc<Registry>>,
}

impl Hub {
    /// Starts a feed per configured prefix and the compaction poller, owned by `tasks`.
    pub fn start(config: Config, upstream: Arc<Upstream>, tasks: Tasks) -> Arc<Hub> {
        let (prefixes, merged) = crate::config::merge_prefixes(&config.prefixes);
        for (inner, outer) in merged {
            tracing::warn!(
                prefix = %inner,
                within = %outer,
                "prefix lies inside another configured prefix: served from that one's cache \
                 (one upstream watch)"
            );
        }
        let probe_key = prefixes
            .first()
            .map(|p| KeyRange::prefix(p.as_bytes()).start);
        let compaction = Arc::new(Compaction::with_probe_key(probe_key.unwrap_or_default()));
        let clock = Clock::spawn(upstream.clone(), config.sync_timeout, &tasks);
        let feeds: Vec<Arc<Feed>> = prefixes
            .iter()
            .map(|p| {
                let (u, c) = (upstream.clone(), compaction.clone());
                Feed::spawn(p, u, c, clock.clone(), &config, &tasks)
            })
            .collect();
        let hub = Hub::with_feeds(
            config.clone(),
            upstream.clone(),
            compaction.clone(),
            feeds,
            tasks.clone(),
        );
        if let Some(r) = &hub.registry {
            r.spawn(upstream.clone(), &tasks);
        }
        let weak = Arc::downgrade(&hub);
        tasks.spawn(compaction.poll(upstream, config.compaction_poll, move || {
            let hub = weak.upgrade()?;
            hub.feeds
                .iter()
                .filter(|f| f.is_ready())
                .map(|f| f.cache().floor())
                .min()
        }));
        hub
    }

    /// A hub over `feeds` (most specific prefix first) with no task of its own (no compaction
    /// poll): [`Hub::start`]'s, and `crate::fuzzing`'s over in-memory feeds.
    pub(crate) fn with_feeds(
        config: Config,
        upstream: Arc<Upstream>,
        compaction: Arc<Compaction>,
        feeds: Vec<Arc<Feed>>,
        tasks: Tasks,
    ) -> Arc<Hub> {
        Arc::new(Hub {
            feeds,
            relays: RelayStreams::new(upstream.clone(), tasks.clone()),
            upstream,
            compaction,
            registry: Registry::from_config(&config),
            config: Arc::new(config),
            tasks,
            shutdown: watch::channel(false).0,
            draining: AtomicBool::new(false),
        })
    }

    /// The feed whose prefix contains all of `range`, if any.
    pub fn feed_for(&self, range: &KeyRange) -> Option<&Arc<Feed>> {
        self.feeds.iter().find(|f| f.range.covers(range))
    }

    /// All feeds.
    pub fn feeds(&self) -> &[Arc<Feed>] {
        &self.feeds
    }

    /// Readiness (`/readyz`): every feed has been loaded, and the proxy is neither draining
    /// nor shutting down. A prefix that went stale later does *not* make a replica unready:
    /// every replica shares the same etcd, so a lost etcd would take every replica out of the
    /// Service at once (see ARCHITECTURE.md, "Health"); `/health` tells that instead.
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Acquire) && !*self.shutdown.borrow() && self.is_loaded()
    }

    /// True when every feed has been loaded and watched at least once.
    pub fn is_loaded(&self) -> bool {
        self.feeds.iter().all(|f| f.is_ready())
    }

    /// The prefixes whose caches are stale (not confirmed current for `--stale-after`).
    pub fn stale_prefixes(&self) -> Vec<&str> {
        self.feeds
            .iter()
            .filter(|f| f.health.is_stale())
            .map(|f| f.name.as_str())
            .collect()
    }

    /// True from the start of a drain (SIGTERM) on.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Starts a drain: readiness fails at once, everything else is still served, and the
    /// replica's discovery registration is revoked (it leaves `MemberList` at once).
    pub async fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
        if let Some(r) = &self.registry {
            r.deregister(&self.upstream).await;
        }
    }

    /// Sets the gauges read at scrape time: readiness, each prefix's cache and window, and
    /// its lag behind etcd.
    pub fn observe_metrics(&self) {
        crate::metrics::READY.set(i64::from(self.is_ready()));
        let g = &*crate::metrics::PREFIX;
        let etcd_at = self.upstream.observed_revision();
        for feed in &self.feeds {
            let l = &[feed.name.as_str()];
            g.ready.with_label_values(l).set(i64::from(feed.is_ready()));
            g.lag_seconds
                .with_label_values(l)
                .set(feed.health.age().map_or(f64::INFINITY, |a| a.as_secs_f64()));
            let cache = feed.cache();
            let proven = feed.verified_revision(cache.head());
            g.lag_revisions
                .with_label_values(l)
                .set((etcd_at - proven).max(0));
            let (revisions, bytes) = cache.history_size();
            g.keys.with_label_values(l).set(cache.len() as i64);
            g.head_revision.with_label_values(l).set(cache.head());
            g.oldest_revision.with_label_values(l).set(cache.floor());
            g.history_revisions
                .with_label_values(l)
                .set(revisions as i64);
            g.history_bytes.with_label_values(l).set(bytes as i64);
            g.history_bytes_limit
                .with_label_values(l)
                .set(cache.max_bytes() as i64);
        }
    }

    /// Starts shutting down: no new work, watch sessions end.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Subscribes to the shutdown flag.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// The newest revision the proxy has seen from etcd: the feeds' heads and every response
    /// header etcd sent (a lower bound of etcd's current revision).
    pub fn revision(&self) -> i64 {
        self.feeds
            .iter()
            .map(|f| f.head())
            .max()
            .unwrap_or(0)
            .max(self.upstream.observed_revision())
    }

    /// etcd's current revision, as far as the caches can vouch for it: one shared
    /// linearizable check (see [`Feed::linearize`]) on the first feed; falls back to the
    /// newest revision seen when etcd cannot be asked.
    pub async fn current_revision(&self) -> i64 {
        if let Some(feed) = self.feeds.iter().find(|f| f.is_ready()) {
            if let Some(p) = feed.linearize().await {
                return if p.read_at > 0 {
                    p.report.max(self.revision())
                } else {
                    self.revision()
                };
            }
        }
        self.revision()
    }
}
