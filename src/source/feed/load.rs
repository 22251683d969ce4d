//! Loading a prefix: paged out of etcd at one revision, the cache reset to it.

use bytes::Bytes;

use super::Feed;
use crate::proto::etcdserverpb::RangeRequest;

impl Feed {
    /// Pages the whole prefix out of etcd at one revision and resets the cache to it; returns
    /// that revision.
    pub(super) async fn load(&self) -> Result<i64, tonic::Status> {
        let end = self.range.range_end();
        let mut key = self.range.start.clone();
        let mut revision = 0;
        let mut kvs = Vec::new();
        loop {
            let resp = self
                .upstream
                .own_range(
                    crate::metrics::Upstream::Load,
                    RangeRequest {
                        key: key.clone(),
                        range_end: end.clone(),
                        limit: self.page_size,
                        revision,
                        ..Default::default()
                    },
                )
                .await?;
            self.upstream.observe_header(resp.header.as_ref());
            if revision == 0 {
                revision = resp.header.as_ref().map_or(0, |h| h.revision);
            }
            let more = resp.more;
            if let Some(last) = resp.kvs.last() {
                let mut next = last.key.to_vec();
                next.push(0);
                key = Bytes::from(next);
            }
            kvs.extend(resp.kvs);
            if !more {
                break;
            }
        }
        let n = kvs.len();
        let old_head = {
            let mut c = self.cache.write().unwrap_or_else(|e| e.into_inner());
            let old = c.head();
            c.reset(revision, kvs);
            old
        };
        // Revisions between the old head and the load are in no history: watches still
        // expecting them get them from etcd.
        if old_head > 0 && revision > old_head {
            self.index.reset(old_head + 1, revision);
        } else {
            self.index.dispatch(&[], revision);
        }
        tracing::info!(prefix = %self.name, keys = n, revision, "prefix loaded");
        self.publish(revision);
        Ok(revision)
    }
}
