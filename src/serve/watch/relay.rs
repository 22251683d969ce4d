//! Watches etcd has to answer: upstream watches relayed to one downstream watch each.
//!
//! Two cases use them:
//! - [`catch_up`]: a cached watch needs revisions older than its cache window. etcd replays
//!   them (or cancels with `compact_revision`, exactly what a direct client would get); as soon
//!   as the relayed stream reaches a revision the cache still holds, the upstream watch is
//!   dropped and the watcher continues from the cache.
//! - [`run_uncached`]: a watch on keys outside every configured prefix; the upstream watch
//!   lives as long as the downstream one.
//!
//! The upstream watches are not streams of their own: they share the upstream streams of
//! their caller's identity ([`crate::source::relay_streams`]), so 10,000 relayed watches with
//! one token cost etcd ten streams, not 10,000.
//!
//! Either way, if the upstream watch breaks (its stream failed, or it was detached because its
//! client stopped reading) it is re-created from the first revision not yet delivered, and its
//! new `created` is swallowed: the client never sees a second one. If etcd refuses the
//! re-create (a token that died with an etcd restart), the client's watch ends with etcd's
//! `cancel_reason` under its own id.

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
use crate::source::relay_streams::RelayStreams;

/// Upstream attempts that end without a response from etcd before a relay gives up on a
/// watch etcd never answered and cancels the downstream one.
const CREATE_ATTEMPTS: u32 = 10;

/// Relays etcd's replay of `spec` from revision `from` until it reaches the cache window.
/// Returns the revision to continue from in the cache, or `None` when the watch is over
/// (canceled by etcd, or the client left). `highest_header` is the highest header revision the watch
/// has sent; it is raised by etcd's headers and never undercut.
#[allow(clippy::too_many_arguments)]
pub async fn catch_up(
    relays: &Arc<RelayStreams>,
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
        metrics::Upstream::CatchUp.inc();
        let mut up = relays.watch(metadata, create);
        loop {
            let msg = tokio::select! {
                m = up.message() => m,
                _ = out.closed() => return None,
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "catch-up watch failed");
                    break;
                }
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

/// Serves a watch outside every configured prefix through an upstream watch on its identity's
/// shared stream. `created` fires once the downstream `created` response has been queued (or
/// the watch failed).
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
    // Upstream attempts in a row that ended without any response from etcd.
    let mut failures = 0;
    loop {
        if let Some(n) = next {
            request.start_revision = n;
        }
        metrics::Upstream::Forwarded.inc();
        let mut up = hub.relays.watch(&metadata, request.clone());
        let mut answered = false;
        let mut error = None;
        loop {
            let msg = tokio::select! {
                m = up.message() => m,
                _ = out.closed() => return,
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            };
            answered = true;
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
        drop(up);
        if answered {
            failures = 0;
        } else {
            failures += 1;
        }
        if let Some(e) = &error {
            tracing::debug!(error = %e, "relayed watch failed");
        }
        if created.is_some() && failures >= CREATE_ATTEMPTS {
            // etcd never answered the create: the client gets the failure as a refusal.
            let reason = error.map_or_else(
                || "upstream watch stream ended".to_string(),
                |e| e.message().to_string(),
            );
            let resp = WatchResponse {
                header: Some(hub.upstream.header(hub.revision())),
                watch_id: super::INVALID_WATCH_ID,
                created: true,
                canceled: true,
                cancel_reason: reason,
                ..Default::default()
            };
            let _ = out.send(Reply::msg(resp)).await;
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY_DELAY * failures.clamp(1, 10)) => {},
            _ = out.closed() => return,
        }
    }
}
