//! The feed's upstream watch loop: load, watch from head+1, apply each revision's events as
//! one batch and publish the head; resume after a failure, reload after a compaction.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use super::{group_by_revision, Feed, UpstreamState};
use crate::metrics;
use crate::proto::etcdserverpb::WatchCreateRequest;
use crate::proto::mvccpb::Event;
use crate::throttle::Throttle;

/// While a feed keeps failing, its warning is repeated at most this often (with the count of
/// failures not logged in between).
const RETRY_WARN_EVERY: Duration = Duration::from_secs(60);

impl Feed {
    /// Keeps the cache loaded and watched, forever.
    pub(super) async fn run(self: Arc<Self>) {
        let mut need_load = true;
        let mut backoff = Duration::from_millis(100);
        // Failures in a row, and their warnings: the first of a run, then one every
        // `RETRY_WARN_EVERY` with the count of those not logged (the rest are debug lines).
        let mut failures = 0u64;
        let mut warn = Throttle::new(RETRY_WARN_EVERY);
        loop {
            if need_load {
                self.health.set_state(UpstreamState::Loading);
                let span = tracing::info_span!("load", prefix = %self.name);
                match self.load().instrument(span).await {
                    Ok(revision) => {
                        need_load = false;
                        self.health.mark_current();
                        let span =
                            tracing::info_span!("backfill", prefix = %self.name, upto = revision);
                        self.tasks
                            .spawn(self.clone().backfill(revision).instrument(span));
                    }
                    Err(e) => {
                        failures += 1;
                        if !self.complain(&e) {
                            let error = self.upstream.describe(&e);
                            match warn.allow() {
                                Some(repeats) => {
                                    tracing::warn!(prefix = %self.name, failures, repeats_not_logged = repeats, "loading prefix failed; retrying: {error}")
                                }
                                None => {
                                    tracing::debug!(prefix = %self.name, failures, "loading prefix failed: {error}")
                                }
                            }
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
            match self
                .watch_once(&mut backoff, &mut failures, &mut warn)
                .await
            {
                Ok(compact) => {
                    tracing::warn!(prefix = %self.name, compact, "upstream watch compacted; reloading");
                    self.compaction.observe(compact);
                    need_load = true;
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    self.health.set_state(UpstreamState::Resuming);
                    failures += 1;
                    if !self.complain(&e) {
                        let error = self.upstream.describe(&e);
                        match warn.allow() {
                            Some(repeats) => {
                                tracing::warn!(prefix = %self.name, failures, repeats_not_logged = repeats, "upstream watch failed; resuming: {error}")
                            }
                            None => {
                                tracing::debug!(prefix = %self.name, failures, "upstream watch failed again: {error}")
                            }
                        }
                    }
                    metrics::UPSTREAM_WATCH_RESTARTS.inc();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Logs a refusal of the proxy's own read (identity or permission) loudly; true if it was
    /// one. A permission refusal also ends readiness: the cache can no longer be kept
    /// current, so requests for the prefix go to etcd until the proxy may read it again.
    fn complain(&self, e: &tonic::Status) -> bool {
        if e.code() == tonic::Code::PermissionDenied {
            self.ready.store(false, Ordering::Release);
        }
        self.upstream
            .credentials()
            .complain(&self.name, &self.range, e)
    }

    /// Runs one upstream watch from head+1 until it fails (`Err`) or etcd says the resume
    /// revision is compacted (`Ok(compact_revision)`).
    async fn watch_once(
        &self,
        backoff: &mut Duration,
        failures: &mut u64,
        warn: &mut Throttle,
    ) -> Result<i64, tonic::Status> {
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
            .own_watch(metrics::Upstream::Watch, create)
            .await?;
        metrics::UPSTREAM_WATCHES.inc();
        let _gauge = scopeguard(|| metrics::UPSTREAM_WATCHES.dec());
        while let Some(resp) = up.message().await? {
            let received = std::time::Instant::now();
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
                tracing::info!(prefix = %self.name, start, after_failures = *failures, "upstream watch established");
                self.upstream.credentials().resolved(&self.name);
                // A healthy watch: the next failure retries quickly again.
                *backoff = Duration::from_millis(100);
                *failures = 0;
                warn.reset();
                self.set_ready();
                self.health.set_state(UpstreamState::Watching);
                if resp.header.as_ref().is_some_and(|h| h.revision < start) {
                    // etcd is at the cached head: the cache is current.
                    self.health.mark_current();
                }
                continue;
            }
            // Events (the cache advances) or a progress notification (it is current).
            self.health.mark_current();
            if resp.events.is_empty() {
                // A progress notification: every event up to this revision was delivered.
                self.advance(resp.header.as_ref().map_or(0, |h| h.revision));
                continue;
            }
            self.apply_events(resp.events, received);
        }
        Err(tonic::Status::unavailable("upstream watch stream ended"))
    }

    /// Records that etcd reached `rev` with nothing more in the prefix (a progress
    /// notification): the head moves, watchers are told.
    pub(crate) fn advance(&self, rev: i64) {
        let head = {
            let mut c = self.cache.write().unwrap_or_else(|e| e.into_inner());
            c.advance(rev);
            c.head()
        };
        self.index.dispatch(&[], head);
        self.publish(head);
    }

    /// Groups events by revision and applies each group as one batch.
    pub(crate) fn apply_events(&self, events: Vec<Event>, received: std::time::Instant) {
        let batches = group_by_revision(events, received);
        let n: usize = batches.iter().map(|b| b.events.len()).sum();
        let mut applied = Vec::with_capacity(batches.len());
        let head = {
            let mut c = self.cache.write().unwrap_or_else(|e| e.into_inner());
            for b in batches {
                match c.apply(b) {
                    Ok(b) => applied.push(b),
                    // Already applied before a reconnect: skip, never apply twice.
                    Err(e) => tracing::debug!(prefix = %self.name, error = %e, "skipping batch"),
                }
            }
            c.head()
        };
        metrics::UPSTREAM_EVENTS.inc_by(n as u64);
        self.counters.events_in.inc_by(n as u64);
        // Sessions registered before the cache lock was released read these revisions from
        // the cache or get a note (or both: their cursors skip what they already have).
        self.index.dispatch(&applied, head);
        self.publish(head);
    }
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
