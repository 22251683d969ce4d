//! Watches etcd has to answer: dedicated upstream watches relayed to one downstream watch.
//!
//! Two cases use them:
//! - [`catch_up`]: a cached watch needs revisions older than its cache window. etcd replays
//!   them (or cancels with `compact_revision`, exactly what a direct client would get); as soon
//!   as the relayed stream reaches a revision the cache still holds, the upstream watch is
//!   dropped and the watcher continues from the cache.
//! - [`run_uncached`]: a watch on keys outside every configured prefix; the upstream watch
//!   lives as long as the downstream one.
//!
//! Either way, if the upstream watch breaks it is re-created from the first revision not yet
//! delivered, and its new `created` is swallowed: the client never sees a second one. If etcd
//! refuses the re-create (a token that died with an etcd restart), the client's watch ends
//! with etcd's `cancel_reason` under its own id.

use std::sync::Arc;

use tokio::sync::oneshot;
use tonic::metadata::MetadataMap;

use super::reply::Reply;
use super::watcher::{filter_into, send_events, WatcherGauge, RETRY_DELAY};
use super::{Out, WatchSpec};
use crate::config::Config;
use crate::metrics;
use crate::proto::etcdserverpb::{WatchCreateRequest, WatchResponse};
use crate::source::feed::Feed;
use crate::source::hub::Hub;

/// Tries to open an upstream watch before a relay gives up and cancels the downstream one.
const CREATE_ATTEMPTS: u32 = 10;

/// Relays etcd's replay of `spec` from revision `from` until it reaches the cache window.
/// Returns the revision to continue from in the cache, or `None` when the watch is over
/// (canceled by etcd, or the client left). `highest_header` is the highest header revision the watch
/// has sent; it is raised by etcd's headers and never undercut.
pub async fn catch_up(
    feed: &Feed,
    spec: &WatchSpec,
    mut from: i64,
    highest_header: &mut i64,
    out: &Out,
    metadata: &MetadataMap,
    config: &Config,
) -> Option<i64> {
    metrics::CATCHUPS.inc();
    feed.counters.catchups.inc();
    loop {
        let create = WatchCreateRequest {
            key: spec.shape.key.range.start.clone(),
            range_end: spec.shape.key.range.range_end(),
            start_revision: from,
            prev_kv: true,
            ..Default::default()
        };
        let mut up = match feed
            .upstream()
            .open_watch(metrics::Upstream::CatchUp, metadata, create)
            .await
        {
            Ok(up) => up,
            Err(e) => {
                tracing::debug!(error = %e, "catch-up watch failed to open");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_DELAY) => continue,
                    _ = out.closed() => return None,
                }
            }
        };
        loop {
            let msg = tokio::select! {
                m = up.responses.message() => m,
                _ = out.closed() => return None,
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) | Err(_) => break,
            };
            if resp.canceled {
                // Compacted (or refused): exactly what etcd tells a direct client.
                let _ = out
                    .send(Reply::msg(WatchResponse {
                        watch_id: spec.id,
                        created: false,
                        ..resp
                    }))
                    .await;
                return None;
            }
            if resp.events.is_empty() {
                continue;
            }
            let last = resp
                .events
                .iter()
                .filter_map(|e| e.kv.as_ref().map(|kv| kv.mod_revision))
                .max()
                .unwrap_or(from - 1);
            let mut events = Vec::new();
            filter_into(spec, &resp.events, &mut events);
            if !events.is_empty() {
                let mut header = resp.header.unwrap_or_default();
                header.revision = header.revision.max(*highest_header);
                *highest_header = header.revision;
                let n = events.len() as u64;
                if send_events(out, spec, header, events, config.fragment_threshold())
                    .await
                    .is_err()
                {
                    return None;
                }
                feed.counters.events_out.inc_by(n);
            }
            if resp.fragment {
                continue;
            }
            from = last + 1;
            if from > feed.cache().floor() {
                return Some(from);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY_DELAY) => {},
            _ = out.closed() => return None,
        }
    }
}

/// Serves a watch outside every configured prefix through its own upstream watch.
/// `created` fires once the downstream `created` response has been queued (or the watch failed).
pub async fn run_uncached(
    hub: Arc<Hub>,
    metadata: Arc<MetadataMap>,
    spec: WatchSpec,
    out: Out,
    created: oneshot::Sender<()>,
) {
    let _gauge = WatcherGauge::new(None);
    let mut created = Some(created);
    let mut request = WatchCreateRequest {
        watch_id: 0,
        ..(*spec.request).clone()
    };
    // First revision not yet delivered, once known.
    let mut next: Option<i64> = None;
    let mut failures = 0;
    loop {
        if let Some(n) = next {
            request.start_revision = n;
        }
        let mut up = match hub
            .upstream
            .open_watch(metrics::Upstream::Forwarded, &metadata, request.clone())
            .await
        {
            Ok(up) => up,
            Err(e) => {
                tracing::debug!(error = %e, "relayed watch failed to open");
                failures += 1;
                if created.is_some() && failures >= CREATE_ATTEMPTS {
                    let resp = WatchResponse {
                        header: Some(hub.upstream.header(hub.revision())),
                        watch_id: super::INVALID_WATCH_ID,
                        created: true,
                        canceled: true,
                        cancel_reason: e.message().to_string(),
                        ..Default::default()
                    };
                    let _ = out.send(Reply::msg(resp)).await;
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_DELAY * failures.min(10)) => continue,
                    _ = out.closed() => return,
                }
            }
        };
        loop {
            let msg = tokio::select! {
                m = up.responses.message() => m,
                _ = out.closed() => return,
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) | Err(_) => break,
            };
            hub.upstream.observe_header(resp.header.as_ref());
            tracing::trace!(?resp, "relayed watch response");
            if resp.created {
                if resp.canceled {
                    // etcd refused the create. The first time that is the client's answer as
                    // is; on a re-create after an upstream failure (e.g. the token died with
                    // an etcd restart) the client already has its `created`: its watch ends
                    // with etcd's reason under its own id, never a second `created`.
                    let resp = if created.is_some() {
                        resp
                    } else {
                        WatchResponse {
                            watch_id: spec.id,
                            created: false,
                            ..resp
                        }
                    };
                    let _ = out.send(Reply::msg(resp)).await;
                    return;
                }
                if let Some(c) = created.take() {
                    if next.is_none() {
                        let rev = resp.header.as_ref().map_or(0, |h| h.revision);
                        next = Some(if request.start_revision > 0 {
                            request.start_revision
                        } else {
                            rev + 1
                        });
                    }
                    let ok = out
                        .send(Reply::msg(WatchResponse {
                            watch_id: spec.id,
                            ..resp
                        }))
                        .await
                        .is_ok();
                    let _ = c.send(());
                    if !ok {
                        return;
                    }
                }
                continue;
            }
            if let Some(last) = resp
                .events
                .iter()
                .filter_map(|e| e.kv.as_ref().map(|kv| kv.mod_revision))
                .max()
            {
                if !resp.fragment {
                    next = Some(last + 1);
                }
            }
            let canceled = resp.canceled;
            if out
                .send(Reply::msg(WatchResponse {
                    watch_id: spec.id,
                    ..resp
                }))
                .await
                .is_err()
                || canceled
            {
                return;
            }
        }
        failures = 0;
        tokio::select! {
            _ = tokio::time::sleep(RETRY_DELAY) => {},
            _ = out.closed() => return,
        }
    }
}
