//! History backfill after a load: the revisions just before the load revision replayed from
//! a whole-keyspace etcd watch, so clients resuming from shortly before are served from memory.
//! A proxy user that may read its prefixes only cannot watch the whole keyspace: then the
//! prefix alone is replayed, which completes only once the prefix changes after the load.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{group_by_revision, Feed};
use crate::proto::etcdserverpb::WatchCreateRequest;
use crate::source::cache::RevBatch;

impl Feed {
    /// Fetches the history before a load at `upto` back from etcd, so that clients resuming
    /// from a revision shortly before it are served from memory. It watches the whole keyspace
    /// from `upto - backfill_revisions`: every revision has at least one event somewhere, so the
    /// event at `upto` itself proves everything before it was delivered. Events of this prefix
    /// are kept; the cache takes them only if its window has not moved meanwhile.
    pub(super) async fn backfill(self: Arc<Self>, upto: i64) {
        if self.backfill_revisions <= 0 || upto <= 1 {
            return;
        }
        let mut base = (upto - self.backfill_revisions)
            .max(self.compaction.revision() - 1)
            .max(1);
        let mut whole_keyspace = true;
        for _ in 0..3 {
            if base >= upto {
                return;
            }
            let replay = self.replay(base, upto, whole_keyspace);
            match tokio::time::timeout(BACKFILL_TIMEOUT, replay).await {
                Ok(Err(Replay::Failed(e)))
                    if whole_keyspace && e.code() == tonic::Code::PermissionDenied =>
                {
                    tracing::info!(prefix = %self.name, "history backfill: the proxy's etcd user may not watch the whole keyspace; replaying the prefix alone, which completes only if the prefix changes within 30 s");
                    whole_keyspace = false;
                }
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
                Err(_) => {
                    tracing::debug!(prefix = %self.name, "backfill timed out");
                    return;
                }
            }
        }
    }

    /// The batches of this prefix in revisions `(base, upto]`, from a whole-keyspace watch
    /// (or a watch of the prefix alone, which proves completeness only once it delivers an
    /// event at or after `upto`).
    async fn replay(
        &self,
        base: i64,
        upto: i64,
        whole_keyspace: bool,
    ) -> Result<Vec<RevBatch>, Replay> {
        let (key, range_end) = if whole_keyspace {
            (Bytes::from_static(b"\0"), Bytes::from_static(b"\0"))
        } else {
            (self.range.start.clone(), self.range.range_end())
        };
        let create = WatchCreateRequest {
            key,
            range_end,
            start_revision: base + 1,
            prev_kv: true,
            ..Default::default()
        };
        let mut up = self
            .upstream
            .own_watch(crate::metrics::Upstream::Watch, create)
            .await
            .map_err(Replay::Failed)?;
        let mut events = Vec::new();
        loop {
            let resp = up
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
                return Ok(group_by_revision(events, std::time::Instant::now()));
            }
        }
    }
}

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
