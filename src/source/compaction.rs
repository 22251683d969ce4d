//! What the proxy knows about etcd's compaction revision.
//!
//! etcd refuses a read at a revision below its compaction revision and cancels a watch that
//! starts below it. The cache may still hold those revisions, so to answer exactly as etcd
//! would the proxy must know the revision. It learns it three ways: from `Compact` requests it
//! forwards, from an upstream watch cancelled for compaction, and by polling (a one-key Range at
//! the oldest cached revision; only when that fails is the exact revision asked for with a
//! watch from revision 1, which etcd cancels with the compaction revision).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tonic::Code;

use crate::proto::etcdserverpb::{RangeRequest, WatchCreateRequest};
use crate::source::upstream::Upstream;

/// A key no one writes, used for compaction probes when no prefix is configured.
const PROBE_KEY: &[u8] = b"\0etcd-fanout/compaction-probe";

/// The highest compaction revision known to have happened in etcd.
#[derive(Debug)]
pub struct Compaction {
    /// Revisions below this are compacted: etcd's `compactMainRev`, which is -1 before the
    /// first compaction (so a watch from a negative revision is cancelled with -1, as by etcd).
    revision: AtomicI64,
    /// The key probes read: inside a cached prefix, so a proxy user with read permission on
    /// the prefixes only may read it.
    probe_key: Bytes,
}

impl Default for Compaction {
    fn default() -> Self {
        Compaction::with_probe_key(Bytes::from_static(PROBE_KEY))
    }
}

impl Compaction {
    /// Compaction tracking whose probes read `key` (an empty key means [`PROBE_KEY`]).
    pub fn with_probe_key(key: Bytes) -> Compaction {
        Compaction {
            revision: AtomicI64::new(-1),
            probe_key: if key.is_empty() {
                Bytes::from_static(PROBE_KEY)
            } else {
                key
            },
        }
    }

    /// The compaction revision as last known.
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Records that etcd compacted at `rev` (never moves backwards).
    pub fn observe(&self, rev: i64) {
        self.revision.fetch_max(rev, Ordering::AcqRel);
    }

    /// True when etcd no longer has revision `rev`.
    pub fn is_compacted(&self, rev: i64) -> bool {
        rev < self.revision()
    }

    /// Polls etcd every `interval`; `oldest` returns the oldest revision any cache serves.
    pub async fn poll(
        self: Arc<Self>,
        upstream: Arc<Upstream>,
        interval: Duration,
        oldest: impl Fn() -> Option<i64>,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(rev) = oldest() else { continue };
            if rev <= 0 || self.is_compacted(rev) {
                continue;
            }
            match self.probe_range(&upstream, rev).await {
                Ok(false) => {}
                Ok(true) => {
                    if let Err(e) = self.probe_watch(&upstream).await {
                        tracing::warn!("compaction probe watch failed: {}", upstream.describe(&e));
                    }
                }
                Err(e) => tracing::debug!("compaction probe failed: {}", upstream.describe(&e)),
            }
        }
    }

    /// True when revision `rev` is compacted in etcd.
    pub async fn probe_range(&self, upstream: &Upstream, rev: i64) -> Result<bool, tonic::Status> {
        let req = RangeRequest {
            key: self.probe_key.clone(),
            revision: rev,
            limit: 1,
            serializable: true,
            count_only: true,
            ..Default::default()
        };
        match upstream
            .own_range(crate::metrics::Upstream::CompactionProbe, req)
            .await
        {
            Ok(resp) => {
                // Also a cheap look at etcd's current revision.
                upstream.observe_header(resp.header.as_ref());
                Ok(false)
            }
            Err(s) if s.code() == Code::OutOfRange && s.message().contains("compacted") => Ok(true),
            Err(s) => Err(s),
        }
    }

    /// Learns the exact compaction revision: etcd cancels a watch from revision 1 with it.
    pub async fn probe_watch(&self, upstream: &Upstream) -> Result<i64, tonic::Status> {
        let create = WatchCreateRequest {
            key: self.probe_key.clone(),
            start_revision: 1,
            ..Default::default()
        };
        let mut up = upstream
            .own_watch(crate::metrics::Upstream::CompactionProbe, create)
            .await?;
        let deadline = tokio::time::sleep(Duration::from_secs(3));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return Ok(self.revision()),
                msg = up.message() => match msg? {
                    Some(r) if r.compact_revision > 0 => {
                        self.observe(r.compact_revision);
                        return Ok(r.compact_revision);
                    }
                    Some(_) => continue,
                    None => return Ok(self.revision()),
                }
            }
        }
    }
}
