//! etcd's current revision as a client may have seen it elsewhere, learnt by shared rounds.
//!
//! A watch's `created` header must not be lower than any revision another replica (or etcd)
//! showed the client before it sent the create: replicas behave as one etcd. Every such
//! revision is at most etcd's revision when the create arrived, so a linearizable read that
//! *started after the arrival* gives a header that is high enough. This module makes those
//! reads cheap for a reconnect storm: one `count_only` Range (answered from etcd's index) per
//! round, at most one round in flight for the whole replica (etcd's revision is global, so
//! every prefix shares it), every ask that arrived before a round started answered by that
//! round, and an ask that arrived before the last successful round started answered at once.
//!
//! It only learns the revision. That the prefix's cache holds every event up to it is the
//! feed's concern (its complete revision, `feed/sync.rs`): a watch whose backlog reaches the
//! header is held until then.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::keys::KeyRange;
use crate::metrics;
use crate::proto::etcdserverpb::RangeRequest;
use crate::source::upstream::Upstream;
use crate::tasks::Tasks;

/// One ask: the key range to count (one the proxy's user may read) and where the answer goes.
type Ask = (KeyRange, oneshot::Sender<Option<i64>>);

/// etcd's revision, learnt by shared linearizable rounds.
#[derive(Debug)]
pub struct Clock {
    /// The asks waiting for a round (served by [`Clock::run`]; with no task, dropped at once).
    tx: mpsc::UnboundedSender<Ask>,
    /// When the last successful round started and the revision it learnt.
    last: Mutex<Option<(Instant, i64)>>,
    /// The etcd cluster.
    upstream: Arc<Upstream>,
}

impl Clock {
    /// A clock asking `upstream`, its round task owned by `tasks`; a round that takes longer
    /// than `timeout` answers "cannot tell".
    pub fn spawn(upstream: Arc<Upstream>, timeout: Duration, tasks: &Tasks) -> Arc<Clock> {
        let (clock, rx) = Clock::new(upstream);
        tasks.spawn(clock.clone().run(rx, timeout));
        clock
    }

    /// A clock with no task: every ask is answered "cannot tell" (in-memory feeds).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn detached(upstream: Arc<Upstream>) -> Arc<Clock> {
        Clock::new(upstream).0
    }

    fn new(upstream: Arc<Upstream>) -> (Arc<Clock>, mpsc::UnboundedReceiver<Ask>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let clock = Arc::new(Clock {
            tx,
            last: Mutex::new(None),
            upstream,
        });
        (clock, rx)
    }

    /// The last successful round's revision if it started at or after `received`.
    fn known_since(&self, received: Instant) -> Option<i64> {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .filter(|(started, _)| *started >= received)
            .map(|(_, rev)| rev)
    }

    /// True when [`Clock::revision_since`] answers `received` without waiting.
    pub fn answered_since(&self, received: Instant) -> bool {
        self.known_since(received).is_some()
    }

    /// etcd's revision at some moment after `received` (so at least any revision a client
    /// could have been shown before a request it sent then arrived), learnt by counting
    /// `range`; `None` when etcd could not tell in time.
    pub async fn revision_since(&self, received: Instant, range: &KeyRange) -> Option<i64> {
        if let Some(rev) = self.known_since(received) {
            return Some(rev);
        }
        let (tx, rx) = oneshot::channel();
        self.tx.send((range.clone(), tx)).ok()?;
        rx.await.ok().flatten()
    }

    /// Serves the asks: each round answers every ask queued before it started.
    async fn run(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Ask>, timeout: Duration) {
        while let Some((range, first)) = rx.recv().await {
            let mut waiting = vec![first];
            while let Ok((_, w)) = rx.try_recv() {
                waiting.push(w);
            }
            let started = Instant::now();
            let rev = tokio::time::timeout(timeout, self.round(&range))
                .await
                .ok()
                .flatten();
            if let Some(rev) = rev {
                let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
                if last.is_none_or(|(s, _)| s <= started) {
                    *last = Some((started, rev));
                }
            }
            for w in waiting {
                let _ = w.send(rev);
            }
        }
    }

    /// One linearizable `count_only` Range of `range`: its header is etcd's revision.
    async fn round(&self, range: &KeyRange) -> Option<i64> {
        let resp = self
            .upstream
            .own_range(
                metrics::Upstream::SyncCheck,
                RangeRequest {
                    key: range.start.clone(),
                    range_end: range.range_end(),
                    count_only: true,
                    ..Default::default()
                },
            )
            .await
            .ok()?;
        self.upstream.observe_header(resp.header.as_ref());
        resp.header.map(|h| h.revision).filter(|r| *r > 0)
    }
}
