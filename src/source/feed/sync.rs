//! The shared linearizability check: "is the cache at least as new as etcd right now?",
//! answered for every linearizable read waiting at that moment with one round of upstream
//! requests (see [`Feed::linearize`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::{Feed, SyncQueue};
use crate::metrics;
use crate::proto::etcdserverpb::RangeRequest;

/// What waits for a feed's sync round.
#[derive(Debug)]
pub enum SyncAsk {
    /// A linearizable read (and the health loop's confirmation): the whole check.
    Linearize(oneshot::Sender<Option<SyncPoint>>),
    /// A held watch: the cache complete up to this revision (answered through
    /// [`Feed::complete_or_wake`]'s wake-up).
    Complete(i64),
}

/// How a linearizable read may be answered from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncPoint {
    /// Read the cache at this revision (0: at its head).
    pub read_at: i64,
    /// Revision to report in the response header.
    pub report: i64,
}

impl Feed {
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
        self.sync_tx.send(SyncAsk::Linearize(tx)).ok()?;
        rx.await.ok().flatten()
    }

    /// Serves [`Feed::linearize`] and the complete-revision waits of held watches (see
    /// [`Feed::complete_or_wake`]): each round answers every ask queued before it started.
    /// A round with a linearizable read runs the whole check (which also proves the cache
    /// complete up to etcd's revision); a round of complete-revision waits only proves the
    /// highest revision waited for ([`Feed::prove_complete`]: usually one probe, often none).
    pub(super) async fn sync_loop(self: Arc<Self>, mut rx: SyncQueue, timeout: Duration) {
        while let Some(first) = rx.recv().await {
            let mut waiting = vec![first];
            while let Ok(w) = rx.try_recv() {
                waiting.push(w);
            }
            let until = waiting
                .iter()
                .map(|w| match w {
                    SyncAsk::Complete(r) => *r,
                    SyncAsk::Linearize(_) => 0,
                })
                .max()
                .unwrap_or(0);
            let reads: Vec<_> = waiting
                .into_iter()
                .filter_map(|w| match w {
                    SyncAsk::Linearize(tx) => Some(tx),
                    SyncAsk::Complete(_) => None,
                })
                .collect();
            if reads.is_empty() {
                let _ = tokio::time::timeout(timeout, self.prove_complete(until)).await;
                continue;
            }
            let point = tokio::time::timeout(timeout, self.sync_check())
                .await
                .ok()
                .flatten();
            metrics::SYNC_CHECKS.inc();
            if point.is_some() {
                self.health.mark_current();
            }
            for w in reads {
                let _ = w.send(point);
            }
        }
    }

    /// Proves the cache complete up to `until` (a revision etcd has reached, e.g. a `created`
    /// header): at once if the head is there or gets there within [`IN_FLIGHT_WAIT`] (events
    /// in flight); otherwise one probe at `until` of the keys changed after the head H (none,
    /// and the same key count, means the cached state at H is etcd's state at `until`),
    /// waiting for the upstream watch and probing again while the prefix did change.
    async fn prove_complete(&self, until: i64) {
        if !self.is_ready() || self.complete() >= until {
            return;
        }
        let mut head_rx = self.subscribe();
        let in_flight = head_rx.wait_for(|h| *h >= until);
        if tokio::time::timeout(IN_FLIGHT_WAIT, in_flight)
            .await
            .is_ok()
        {
            return;
        }
        loop {
            let (h, count) = {
                let c = self.cache();
                (c.head(), c.len() as i64)
            };
            if h >= until || self.complete() >= until {
                return;
            }
            let Some(unchanged) = self.unchanged_after(h, count, until).await else {
                return;
            };
            if unchanged {
                if let Ok(mut v) = self.verified.lock() {
                    if v.0 < h || (v.0 == h && v.1 < until) {
                        *v = (h, until);
                    }
                }
                self.advance_complete(until);
                return;
            }
            let wait = head_rx.wait_for(|h| *h >= until);
            match tokio::time::timeout(Duration::from_millis(200), wait).await {
                Ok(_) => return,
                Err(_) => continue,
            }
        }
    }

    /// Whether etcd's state of the prefix at revision `at` is the cached state at head `h`
    /// (`count` keys): no key modified after `h` and the same key count (so no delete
    /// either). `None` when etcd cannot tell (unreachable, `at` compacted).
    async fn unchanged_after(&self, h: i64, count: i64, at: i64) -> Option<bool> {
        let changed = self
            .upstream
            .own_range(
                metrics::Upstream::SyncCheck,
                RangeRequest {
                    key: self.range.start.clone(),
                    range_end: self.range.range_end(),
                    revision: at,
                    min_mod_revision: h + 1,
                    keys_only: true,
                    limit: 1,
                    ..Default::default()
                },
            )
            .await
            .ok()?;
        Some(changed.kvs.is_empty() && changed.count == count)
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
                .own_range(
                    metrics::Upstream::SyncCheck,
                    RangeRequest {
                        key: self.range.start.clone(),
                        range_end: self.range.range_end(),
                        count_only: true,
                        ..Default::default()
                    },
                )
                .await
                .ok()?;
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
            if self.unchanged_after(h1, count1, x).await? {
                if let Ok(mut v) = self.verified.lock() {
                    *v = (h1, x);
                }
                // Nothing in the prefix changed after the head up to `x`.
                self.advance_complete(x);
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
