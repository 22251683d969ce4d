//! The fan-out hub: every configured prefix's [`Feed`], and the routing of a request's key
//! range to the feed whose cache covers it. Requests no feed covers go to etcd.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Config;
use crate::keys::KeyRange;
use crate::source::compaction::Compaction;
use crate::source::feed::Feed;
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
    /// Configuration the hub was built from.
    pub config: Arc<Config>,
    /// The owner of every background task (made and stopped by `main`): the feeds' and the
    /// compaction poll's, and every task spawned below the listener.
    pub tasks: Tasks,
    /// Turns true when the proxy shuts down: sessions end their streams so clients reconnect
    /// to another replica.
    shutdown: watch::Sender<bool>,
}

impl Hub {
    /// Starts a feed per configured prefix and the compaction poller, owned by `tasks`.
    pub fn start(config: Config, upstream: Arc<Upstream>, tasks: Tasks) -> Arc<Hub> {
        let mut prefixes = config.prefixes.clone();
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.len()));
        prefixes.dedup();
        let probe_key = prefixes
            .first()
            .map(|p| KeyRange::prefix(p.as_bytes()).start);
        let compaction = Arc::new(Compaction::with_probe_key(probe_key.unwrap_or_default()));
        let feeds: Vec<Arc<Feed>> = prefixes
            .iter()
            .map(|p| Feed::spawn(p, upstream.clone(), compaction.clone(), &config, &tasks))
            .collect();
        let hub = Arc::new(Hub {
            feeds,
            upstream: upstream.clone(),
            compaction: compaction.clone(),
            config: Arc::new(config.clone()),
            tasks: tasks.clone(),
            shutdown: watch::channel(false).0,
        });
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

    /// The feed whose prefix contains all of `range`, if any.
    pub fn feed_for(&self, range: &KeyRange) -> Option<&Arc<Feed>> {
        self.feeds.iter().find(|f| f.range.covers(range))
    }

    /// All feeds.
    pub fn feeds(&self) -> &[Arc<Feed>] {
        &self.feeds
    }

    /// True when every feed is loaded and watched, and the proxy is not shutting down.
    pub fn is_ready(&self) -> bool {
        !*self.shutdown.borrow() && self.feeds.iter().all(|f| f.is_ready())
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
