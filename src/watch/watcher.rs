//! One downstream watch served from a prefix's cache.
//!
//! The watcher keeps a cursor (`next`: the first revision it has not delivered) and sleeps on
//! the feed's head revision. When the head passes the cursor it copies the new batches out of
//! the cache (reference-counted, under a short read lock), keeps the events in its own key range
//! that its filters let through, and sends them. Like etcd:
//! - a watch that starts in the past first gets its backlog batched, up to 1,000 revisions per
//!   response, with the header at the revision the cache had reached;
//! - once caught up, it gets one response per revision, header at that revision;
//! - a revision with no matching event sends nothing.
//!
//! A watcher never blocks the feed or other watchers: if its client is slow it simply falls
//! behind; if it falls behind the cache window it is caught up from etcd ([`super::relay`]).

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tonic::metadata::MetadataMap;

use super::frame::{EventsFrame, Frame};
use super::{relay, Out, WatchSpec};
use crate::cache::RevBatch;
use crate::config::Config;
use crate::feed::Feed;
use crate::metrics;
use crate::proto::etcdserverpb::{ResponseHeader, WatchResponse};
use crate::proto::mvccpb::Event;

/// etcd's `watchBatchMaxRevs`: most revisions in one catch-up response.
pub const MAX_REVS_PER_RESPONSE: usize = 1000;

/// Batches read from the cache at a time by a caught-up watcher.
const LIVE_READ_BATCHES: usize = 64;

/// The `created` answer of a new cached watch and where the watch starts.
#[derive(Debug, Clone)]
pub struct Created {
    /// The response to send.
    pub response: WatchResponse,
    /// First revision to deliver.
    pub start: i64,
    /// True when the start is after the head (nothing to replay).
    pub synced: bool,
}

/// Builds the `created` response for `spec` on `feed`: header at etcd's revision as far as
/// the proxy knows it, start at `start_revision` or, when 0, right after that revision.
pub fn created(feed: &Feed, spec: &WatchSpec) -> Created {
    // "Now" is the newest revision etcd is known to have reached: the cache head, a revision
    // a sync check proved has the cached state, or any header etcd sent (writes through the
    // proxy). A watch from now starts after it, as etcd's would; it waits for the cache to
    // get there.
    let head = feed
        .verified_revision(feed.cache().head())
        .max(feed.upstream().observed_revision());
    // Only 0 means "now"; a negative start is kept (etcd cancels it as compacted).
    let start = match spec.request.start_revision {
        0 => head + 1,
        r => r,
    };
    Created {
        response: WatchResponse {
            header: Some(feed.upstream().header(head)),
            watch_id: spec.id,
            created: true,
            ..Default::default()
        },
        start,
        synced: start > head,
    }
}

/// Serves one cached watch until it is cancelled (its task aborted) or the client leaves.
pub async fn run(
    feed: Arc<Feed>,
    spec: WatchSpec,
    start: i64,
    synced: bool,
    out: Out,
    metadata: Arc<MetadataMap>,
    config: Arc<Config>,
) {
    let _gauge = WatcherGauge::new();
    let compacted = feed.compaction().revision();
    if start < compacted {
        let resp = Frame::msg(compacted_response(&feed, &spec, compacted));
        let _ = Box::pin(out.send(resp)).await;
        return;
    }
    let mut head_rx = feed.subscribe();
    let mut next = start;
    let mut synced = synced;
    // Boxed and only for watches that asked: idle watchers stay small.
    let mut progress = spec.progress_notify.then(|| {
        Box::pin(tokio::time::interval_at(
            tokio::time::Instant::now() + config.progress_interval,
            config.progress_interval,
        ))
    });
    // etcd sends a progress notification only if no event went out since the last tick.
    let mut quiet = true;
    loop {
        let head = *head_rx.borrow_and_update();
        if head < next {
            tokio::select! {
                changed = head_rx.changed() => if changed.is_err() { return },
                _ = out.closed() => return,
                _ = tick(&mut progress) => {
                    if quiet && synced {
                        let resp = WatchResponse {
                            header: Some(feed.upstream().header(head)),
                            watch_id: spec.id,
                            ..Default::default()
                        };
                        if Box::pin(out.send(Frame::msg(resp))).await.is_err() {
                            return;
                        }
                    }
                    quiet = true;
                }
            }
            continue;
        }
        let max = if synced {
            LIVE_READ_BATCHES
        } else {
            MAX_REVS_PER_RESPONSE
        };
        let (batches, head) = {
            let c = feed.cache();
            (c.batches_after(next - 1, max), c.head())
        };
        let Some(batches) = batches else {
            // Older than the window: etcd has to replay it.
            // Boxed: the catch-up state is large and rarely needed; idle watchers stay small.
            match Box::pin(relay::catch_up(
                &feed, &spec, next, &out, &metadata, &config,
            ))
            .await
            {
                Some(resume) => {
                    next = resume;
                    synced = true;
                    continue;
                }
                None => return,
            }
        };
        let Some(last) = batches.last().map(|b| b.revision) else {
            // The head moved without events (upstream progress): nothing to send.
            next = head + 1;
            continue;
        };
        if synced {
            for b in batches {
                let header = feed.upstream().header(b.revision);
                match send_batches(&out, &spec, header, vec![b], &config).await {
                    Ok(0) => {}
                    Ok(_) => quiet = false,
                    Err(()) => return,
                }
            }
        } else {
            let header = feed.upstream().header(head);
            match send_batches(&out, &spec, header, batches, &config).await {
                Ok(0) => {}
                Ok(_) => quiet = false,
                Err(()) => return,
            }
            synced = last >= head;
        }
        next = last + 1;
    }
}

/// The next progress tick, or never when the watch did not ask for progress.
async fn tick(progress: &mut Option<std::pin::Pin<Box<tokio::time::Interval>>>) {
    match progress {
        Some(p) => {
            p.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Counts a downstream watch in the watcher gauge for as long as it lives.
pub struct WatcherGauge(());

impl WatcherGauge {
    /// Increments the gauge; dropping the value decrements it.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        metrics::WATCHERS.inc();
        WatcherGauge(())
    }
}

impl Drop for WatcherGauge {
    fn drop(&mut self) {
        metrics::WATCHERS.dec();
    }
}

/// etcd's answer to a watch that starts below the compaction revision: canceled, with the
/// compaction revision, and a header without revision.
pub fn compacted_response(feed: &Feed, spec: &WatchSpec, compacted: i64) -> WatchResponse {
    WatchResponse {
        header: Some(feed.upstream().header(0)),
        watch_id: spec.id,
        canceled: true,
        compact_revision: compacted,
        ..Default::default()
    }
}

/// Appends the events of `events` that `spec` wants to `out`, as it wants them.
pub fn filter_into(spec: &WatchSpec, events: &[Event], out: &mut Vec<Event>) {
    out.extend(
        events
            .iter()
            .filter(|e| spec.shape.wants(e))
            .map(|e| spec.shape.view(e)),
    );
}

/// Sends the events `spec` wants from `batches` in one response (encoded once per shape and
/// shared), or in fragments when the watch asked for them. Returns how many events went out
/// (0: nothing was sent).
pub async fn send_batches(
    out: &Out,
    spec: &WatchSpec,
    header: ResponseHeader,
    mut batches: Vec<Arc<RevBatch>>,
    config: &Config,
) -> Result<usize, ()> {
    let mut count = 0;
    batches.retain(|b| {
        let n = spec.shape.encode(b).count;
        count += n;
        n > 0
    });
    if count == 0 {
        return Ok(0);
    }
    let frame = EventsFrame {
        header,
        watch_id: spec.id,
        batches,
        shape: spec.shape.clone(),
    };
    if spec.fragment {
        let resp = frame.to_response();
        // Rare: boxed so that it does not grow every watcher's future.
        Box::pin(send_events(
            out,
            spec,
            header,
            resp.events,
            config.fragment_threshold(),
        ))
        .await?;
    } else {
        out.send(Frame::Events(frame)).await.map_err(|_| ())?;
        metrics::EVENTS_SENT.inc_by(count as u64);
    }
    Ok(count)
}

/// Sends one response (or its fragments, when the watch asked for them) carrying `events`.
pub async fn send_events(
    out: &Out,
    spec: &WatchSpec,
    header: ResponseHeader,
    events: Vec<Event>,
    max_request_bytes: usize,
) -> Result<(), ()> {
    let n = events.len() as u64;
    let resp = WatchResponse {
        header: Some(header),
        watch_id: spec.id,
        events,
        ..Default::default()
    };
    let parts = if spec.fragment {
        fragment(resp, max_request_bytes)
    } else {
        vec![resp]
    };
    for p in parts {
        out.send(Frame::msg(p)).await.map_err(|_| ())?;
    }
    metrics::EVENTS_SENT.inc_by(n);
    Ok(())
}

/// etcd's `sendFragments`: a response of at least `max` bytes with two or more events is split
/// into responses under `max` (at least one event each), all but the last marked `fragment`.
pub fn fragment(resp: WatchResponse, max: usize) -> Vec<WatchResponse> {
    if resp.encoded_len() < max || resp.events.len() < 2 {
        return vec![resp];
    }
    let mut parts = Vec::new();
    let template = WatchResponse {
        events: Vec::new(),
        fragment: true,
        ..resp.clone()
    };
    let mut events = resp.events.into_iter().peekable();
    while events.peek().is_some() {
        let mut cur = template.clone();
        while let Some(ev) = events.peek() {
            cur.events.push(ev.clone());
            if cur.events.len() > 1 && cur.encoded_len() >= max {
                cur.events.pop();
                break;
            }
            events.next();
        }
        if events.peek().is_none() {
            cur.fragment = false;
        }
        parts.push(cur);
    }
    parts
}

/// How long a watcher waits before retrying a failed catch-up.
pub const RETRY_DELAY: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::mvccpb::KeyValue;
    use bytes::Bytes;

    fn ev(key: &str, value_len: usize) -> Event {
        Event {
            r#type: 0,
            kv: Some(KeyValue {
                key: Bytes::from(key.to_string()),
                value: Bytes::from(vec![b'x'; value_len]),
                ..Default::default()
            }),
            prev_kv: None,
        }
    }

    #[test]
    fn fragments_split_and_flag() {
        let resp = WatchResponse {
            watch_id: 3,
            events: (0..10).map(|i| ev(&format!("k{i}"), 100)).collect(),
            ..Default::default()
        };
        let parts = fragment(resp.clone(), 350);
        assert!(parts.len() > 1);
        assert!(parts[..parts.len() - 1].iter().all(|p| p.fragment));
        assert!(!parts.last().unwrap().fragment);
        let total: usize = parts.iter().map(|p| p.events.len()).sum();
        assert_eq!(total, 10);
        assert!(parts
            .iter()
            .all(|p| p.encoded_len() < 350 || p.events.len() == 1));
        assert_eq!(fragment(resp, 1 << 20).len(), 1);
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;
    use crate::compaction::Compaction;
    use crate::keys::KeyRange;
    use crate::upstream::Upstream;
    use crate::watch::shape::{ShapeKey, SHAPES};
    use clap::Parser;

    /// An idle watcher is one task holding this future: it must stay small (the catch-up
    /// state is boxed).
    #[tokio::test]
    async fn watcher_future_is_small() {
        let upstream = Arc::new(Upstream::new(&["http://127.0.0.1:1".to_string()]).unwrap());
        let config = Arc::new(Config::parse_from(["etcd-fanout"]));
        let feed = Feed::spawn("/a/", upstream, Arc::new(Compaction::default()), &config);
        let spec = WatchSpec {
            id: 0,
            shape: SHAPES.intern(ShapeKey {
                range: KeyRange::prefix(b"/a/"),
                no_put: false,
                no_delete: false,
                prev_kv: false,
            }),
            fragment: false,
            progress_notify: false,
            request: Box::default(),
        };
        let created = created(&feed, &spec);
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let fut = run(
            feed,
            spec,
            created.start,
            created.synced,
            tx,
            Arc::new(MetadataMap::new()),
            config,
        );
        let size = std::mem::size_of_val(&fut);
        assert!(size < 1024, "watcher future is {size} bytes");
    }
}
