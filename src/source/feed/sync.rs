//! The shared linearizability check: "is the cache at least as new as etcd right now?",
//! answered for every linearizable read waiting at that moment with one round of upstream
//! requests (see [`Feed::linearize`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::Feed;
use crate::metrics;
use crate::proto::etcdserverpb::RangeRequest;

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
        self.sync_tx.send(tx).ok()?;
        rx.await.ok().flatten()
    }

    /// True when a successful sync check started after `received`: [`Feed::linearize_since`]
    /// answers at once.
    pub fn checked_since(&self, received: std::time::Instant) -> bool {
        self.last_check
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|(started, _)| started >= received)
    }

    /// [`Feed::linearize`] for a request received at `received`: a successful check that
    /// started after that answers it at once (etcd's revision at that start is at least any
    /// revision the client could have seen before it sent the request), so requests received
    /// together (a burst of watch creates on one stream) share one round.
    pub async fn linearize_since(&self, received: std::time::Instant) -> Option<SyncPoint> {
        let last = *self.last_check.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((started, point)) = last {
            if started >= received {
                return Some(point);
            }
        }
        self.linearize().await
    }

    /// Serves [`Feed::linearize`]: each round answers every read queued before it started.
    pub(super) async fn sync_loop(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<oneshot::Sender<Option<SyncPoint>>>,
        timeout: Duration,
    ) {
        while let Some(first) = rx.recv().await {
            let mut waiting = vec![first];
            while let Ok(w) = rx.try_recv() {
                waiting.push(w);
            }
            let started = std::time::Instant::now();
            let point = tokio::time::timeout(timeout, self.sync_check())
                .await
                .ok()
                .flatten();
            metrics::SYNC_CHECKS.inc();
            if let Some(p) = point {
                self.health.mark_current();
                *self.last_check.lock().unwrap_or_else(|e| e.into_inner()) = Some((started, p));
            }
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
            let changed = self
                .upstream
                .own_range(
                    metrics::Upstream::SyncCheck,
                    RangeRequest {
                        key: self.range.start.clone(),
                        range_end: self.range.range_end(),
                        revision: x,
                        min_mod_revision: h1 + 1,
                        keys_only: true,
                        limit: 1,
                        ..Default::default()
                    },
                )
                .await
                .ok()?;
            if changed.kvs.is_empty() && changed.count == count1 {
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
