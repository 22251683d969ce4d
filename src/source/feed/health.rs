//! One prefix's health: the state of its upstream watch and how long ago its cache last
//! advanced or was confirmed current by etcd. Every other part of the proxy asks this module
//! whether a prefix is *stale* (not confirmed current for `--stale-after`): `/health`, and the
//! requests that ask for a member with a leader (`hasleader`), answer from it.
//!
//! An idle prefix receives nothing from its upstream watch (etcd's own progress notifications
//! come every 10 minutes), so [`Feed::health_loop`] confirms it with the feed's shared sync
//! check (one `count_only` Range, see `sync.rs`) every third of `--stale-after`; the loop also
//! publishes the per-prefix metrics and logs each change of state once.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Feed;
use crate::metrics;

/// State of a prefix's upstream watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamState {
    /// Loading the prefix (at start, or after a compaction).
    Loading = 0,
    /// The upstream watch is established.
    Watching = 1,
    /// The upstream watch failed and is being re-created.
    Resuming = 2,
}

impl UpstreamState {
    fn from_u8(v: u8) -> UpstreamState {
        match v {
            1 => UpstreamState::Watching,
            2 => UpstreamState::Resuming,
            _ => UpstreamState::Loading,
        }
    }

    /// The name used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamState::Loading => "loading",
            UpstreamState::Watching => "watching",
            UpstreamState::Resuming => "resuming",
        }
    }
}

/// A timestamp that was never set.
const NEVER: u64 = u64::MAX;

/// The health of one prefix (lock-free: read on every request that asks for a leader).
#[derive(Debug)]
pub struct Health {
    /// Origin of the millisecond timestamps below.
    epoch: Instant,
    /// The upstream watch state ([`UpstreamState`] as a number).
    state: AtomicU8,
    /// Milliseconds after `epoch` when the cache last advanced or was confirmed current
    /// ([`NEVER`] before the first load).
    current_at: AtomicU64,
    /// `--stale-after`.
    stale_after: Duration,
}

impl Health {
    /// A prefix not loaded yet.
    pub fn new(stale_after: Duration) -> Health {
        Health {
            epoch: Instant::now(),
            state: AtomicU8::new(UpstreamState::Loading as u8),
            current_at: AtomicU64::new(NEVER),
            stale_after,
        }
    }

    /// Records the upstream watch state.
    pub fn set_state(&self, s: UpstreamState) {
        self.state.store(s as u8, Ordering::Release);
    }

    /// The upstream watch state.
    pub fn state(&self) -> UpstreamState {
        UpstreamState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// The cache advanced, or etcd confirmed it is current, now.
    pub fn mark_current(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let _ = self
            .current_at
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |at| {
                (at == NEVER || at < now).then_some(now)
            });
    }

    /// Time since the cache last advanced or was confirmed current (`None`: never loaded).
    pub fn age(&self) -> Option<Duration> {
        match self.current_at.load(Ordering::Acquire) {
            NEVER => None,
            at => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(at)),
            ),
        }
    }

    /// True when the cache has not been confirmed current for `--stale-after`.
    pub fn is_stale(&self) -> bool {
        self.age().is_none_or(|a| a > self.stale_after)
    }
}

impl Feed {
    /// Confirms an idle prefix current, publishes its metrics and logs each change of its
    /// state, forever.
    pub(super) async fn health_loop(self: Arc<Self>) {
        let stale_after = self.health.stale_after;
        let confirm_every = (stale_after / 3).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval(confirm_every.min(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let labels = [self.name.as_str()];
        let (mut logged_state, mut logged_stale) = (UpstreamState::Loading, true);
        loop {
            tick.tick().await;
            let due = self.health.age().is_some_and(|a| a >= confirm_every);
            if due && self.is_ready() {
                // Marks the prefix current when etcd confirms it (see `sync_loop`).
                let _ = self.linearize().await;
            }
            let state = self.health.state();
            let age = self.health.age();
            let stale = self.health.is_stale();
            metrics::PREFIX_UPSTREAM_STATE
                .with_label_values(&labels)
                .set(state as i64);
            metrics::PREFIX_CURRENCY_AGE
                .with_label_values(&labels)
                .set(age.map_or(f64::INFINITY, |a| a.as_secs_f64()));
            metrics::PREFIX_STALE
                .with_label_values(&labels)
                .set(i64::from(stale));
            if state != logged_state {
                tracing::info!(prefix = %self.name, from = logged_state.as_str(), to = state.as_str(), "upstream watch state changed");
                logged_state = state;
            }
            if stale != logged_stale && age.is_some() {
                if stale {
                    tracing::warn!(prefix = %self.name, age_s = age.map_or(0.0, |a| a.as_secs_f64()), state = state.as_str(),
                        "prefix cache is stale: not confirmed current by etcd; /health reports unhealthy");
                } else {
                    tracing::info!(prefix = %self.name, state = state.as_str(), "prefix cache is current again");
                }
                logged_stale = stale;
            }
        }
    }
}
