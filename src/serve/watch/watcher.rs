//! One downstream watch served from a prefix's cache.
//!
//! A [`CachedWatch`] is a cursor (`next`: the first revision it has not delivered), not a
//! task: its session wakes when the feed's head moves and asks each of its watches what to do
//! ([`CachedWatch::step`], under one short read lock of the cache), then sends the
//! reference-counted batches, encoded once per shape. Like etcd:
//! - a watch that starts in the past first gets its backlog batched, up to 1,000 revisions per
//!   response, with the header at the revision the cache had reached;
//! - once caught up, it gets one response per revision, header at that revision;
//! - a revision with no matching event sends nothing.
//!
//! A watch never blocks the feed or other sessions: if its client is slow it simply falls
//! behind; if it falls behind the cache window it is caught up from etcd ([`super::relay`]).

use std::sync::Arc;
use std::time::Duration;

use prost::Message;

use super::reply::{EventsReply, Reply};
use super::{Out, WatchSpec};
use crate::config::Config;
use crate::metrics::{self, PrefixCounters};
use crate::proto::etcdserverpb::{ResponseHeader, WatchResponse};
use crate::proto::mvccpb::Event;
use crate::source::cache::{Cache, RevBatch};
use crate::source::feed::Feed;

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

/// The newest revision etcd is known to have reached, as far as `feed` can tell.
fn known_revision(feed: &Feed) -> i64 {
    feed.verified_revision(feed.cache().head())
        .max(feed.upstream().observed_revision())
}

/// Called before a `created` is built: learns the revision it carries, etcd's current one as
/// one etcd's would be, so that a client moving between replicas is never shown a `created`
/// header lower than one another replica showed it (issue: a replica tier that behaves as
/// one etcd). The revision comes from the replica's shared clock ([`Clock::revision_since`]:
/// a linearizable round that started after the request was received, shared by every create
/// of every prefix waiting at that moment), raised to the feed's complete revision. The cache
/// may not be complete up to it yet: the session then holds the watch's backlog until it is
/// ([`Feed::complete_or_wake`]), so the `created` itself waits for one round trip only.
/// `None` when etcd could not be asked (or the prefix is stale): then [`created`] answers with
/// the newest revision the proxy knows, as a member without a leader would, after waiting up
/// to `wait` for the cache to reach the client's `start_revision` - 1 (a revision it has seen)
/// when that is beyond what is known.
///
/// [`Clock::revision_since`]: crate::source::clock::Clock::revision_since
pub async fn learn_revision(
    feed: &Feed,
    start_revision: i64,
    received: std::time::Instant,
    wait: std::time::Duration,
) -> Option<i64> {
    if feed.health.is_stale() {
        return None;
    }
    if let Some(rev) = feed.clock().revision_since(received, &feed.range).await {
        return Some(rev.max(feed.complete()));
    }
    let seen = start_revision - 1;
    if known_revision(feed) < seen {
        let mut head = feed.subscribe();
        let _ = tokio::time::timeout(wait, head.wait_for(|h| *h >= seen)).await;
    }
    None
}

/// Builds the `created` response for `spec` on `feed`: header at etcd's revision as learnt
/// (`learned`, see [`learn_revision`]) or else as far as the proxy knows it, start at
/// `start_revision` or, when 0, right after that revision.
pub fn created(feed: &Feed, spec: &WatchSpec, learned: Option<i64>) -> Created {
    // Without a check, "now" is the newest revision etcd is known to have reached: the cache
    // head, a revision a sync check proved has the cached state, or any header etcd sent
    // (writes through the proxy). It may be ahead of the cache: the session then holds the
    // watch's next response until the cache is complete up to it. A watch from now starts
    // after it, as etcd's would.
    let head = learned.unwrap_or_else(|| known_revision(feed));
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

/// A cached watch's position: what it has delivered and how it wants the rest.
#[derive(Debug)]
pub struct CachedWatch {
    /// What the client asked for.
    pub spec: WatchSpec,
    /// The feed whose cache serves it.
    pub feed: Arc<Feed>,
    /// First revision not delivered yet.
    pub next: i64,
    /// Caught up: one response per revision from now on (before: backlog batched).
    pub synced: bool,
    /// No event sent since the last progress tick.
    pub quiet: bool,
    /// Highest header revision sent so far: headers never go backwards for a watch (a
    /// `created` at etcd's revision may be ahead of the cache head it then reads from).
    pub highest_header: i64,
    /// Counts the watch in the watcher gauge.
    _gauge: WatcherGauge,
}

/// What a cached watch has to do, decided under the cache's read lock.
#[derive(Debug)]
pub enum Step {
    /// Nothing new for it.
    Idle,
    /// Send these batches (read when the cache head was `head`).
    Send(Vec<Arc<RevBatch>>, i64),
    /// The head moved without events (upstream progress): skip to after `head`.
    Skip(i64),
    /// Its next revision is older than the cache window: etcd has to replay it.
    CatchUp,
}

impl CachedWatch {
    /// A watch on `feed` starting as `created` says.
    pub fn new(feed: Arc<Feed>, spec: WatchSpec, created: &Created) -> CachedWatch {
        CachedWatch {
            spec,
            next: created.start,
            synced: created.synced,
            quiet: true,
            highest_header: created.response.header.map_or(0, |h| h.revision),
            _gauge: WatcherGauge::new(Some(&feed.counters.watchers)),
            feed,
        }
    }

    /// What to do next, given the feed's cache (locked by the caller, briefly).
    pub fn step(&self, cache: &Cache) -> Step {
        let head = cache.head();
        if head < self.next {
            return Step::Idle;
        }
        let max = if self.synced {
            LIVE_READ_BATCHES
        } else {
            MAX_REVS_PER_RESPONSE
        };
        match cache.batches_after(self.next - 1, max) {
            None => Step::CatchUp,
            Some(b) if b.is_empty() => Step::Skip(head),
            Some(b) => Step::Send(b, head),
        }
    }

    /// Sends what [`CachedWatch::step`] found, as etcd batches it: a backlog in one response
    /// with the header at the head, a caught-up watch one response per revision.
    pub async fn deliver(
        &mut self,
        batches: Vec<Arc<RevBatch>>,
        head: i64,
        out: &Out,
        config: &Config,
    ) -> Result<(), ()> {
        let Some(last) = batches.last().map(|b| b.revision) else {
            return Ok(());
        };
        let counters = &self.feed.counters;
        if self.synced {
            // A current watch: live fan-out, its delivery latency is observed.
            for b in batches {
                let header = self.header(b.revision);
                if send_batches(out, &self.spec, header, vec![b], config, counters, true).await? > 0
                {
                    self.quiet = false;
                    self.highest_header = header.revision;
                }
            }
        } else {
            let batches = as_etcd_reads_back(batches, self.feed.compaction().revision());
            let header = self.header(head);
            if send_batches(out, &self.spec, header, batches, config, counters, false).await? > 0 {
                self.quiet = false;
                self.highest_header = header.revision;
            }
            self.synced = last >= head;
        }
        self.next = last + 1;
        Ok(())
    }

    /// The live reply of a current watch (synced, not fragmenting) to revision `revision`,
    /// whose batch has `events` events for the watch's shape, made without queueing it, so
    /// that a session queues its replies to one revision together
    /// ([`super::reply::LiveReplies`]): `Some(header)` of the reply, `None` when the batch has
    /// nothing for the watch. `header` is the feed's header at `revision`, read once for every
    /// watch the revision goes to. Advances the cursor past the batch as
    /// [`CachedWatch::deliver`] does. A watch that is not current or fragments its responses
    /// goes through [`CachedWatch::deliver`] instead ([`CachedWatch::is_live`]).
    pub fn live_reply(
        &mut self,
        revision: i64,
        events: usize,
        header: &ResponseHeader,
    ) -> Option<ResponseHeader> {
        self.next = revision + 1;
        if events == 0 {
            return None;
        }
        // As `header`: never below a header this watch has shown.
        let header = ResponseHeader {
            revision: header.revision.max(self.highest_header),
            ..*header
        };
        self.quiet = false;
        self.highest_header = header.revision;
        Some(header)
    }

    /// True when [`CachedWatch::live_reply`] serves this watch's next revision.
    pub fn is_live(&self) -> bool {
        self.synced && !self.spec.fragment
    }

    /// etcd's progress notification for this watch, when one is due at a tick: the watch asked
    /// for them, is caught up, and sent nothing since the last tick. Resets the tick state.
    /// `revision` is the feed's head as far as the session has served it.
    pub fn progress_due(&mut self, revision: i64) -> Option<WatchResponse> {
        let due = self.spec.progress_notify && self.quiet && self.synced;
        self.quiet = true;
        if !due {
            return None;
        }
        let header = self.header(revision);
        self.highest_header = header.revision;
        Some(WatchResponse {
            header: Some(header),
            watch_id: self.spec.id,
            ..Default::default()
        })
    }

    /// A response header at `revision`, or at the highest header sent if that is higher.
    fn header(&self, revision: i64) -> ResponseHeader {
        self.feed
            .upstream()
            .header(revision.max(self.highest_header))
    }
}

/// Counts a downstream watch in the watcher gauge (and its prefix's, if it has one) for as
/// long as it lives.
#[derive(Debug)]
pub struct WatcherGauge(Option<prometheus::IntGauge>);

impl WatcherGauge {
    /// Increments the gauges; dropping the value decrements them.
    pub fn new(prefix: Option<&prometheus::IntGauge>) -> Self {
        metrics::WATCHERS.inc();
        if let Some(g) = prefix {
            g.inc();
        }
        WatcherGauge(prefix.cloned())
    }
}

impl Drop for WatcherGauge {
    fn drop(&mut self) {
        metrics::WATCHERS.dec();
        if let Some(g) = &self.0 {
            g.dec();
        }
    }
}

/// A backlog as etcd replays it from its store when `compacted` is its compaction revision:
/// a watch may start at that revision (not below), and etcd's compaction dropped the
/// deletions made at it and the values before it, so the batch at that revision goes out
/// without its deletions and without `prev_kv` ([`RevBatch::as_compacted`]). A live watch
/// got the batch before the compaction, in full, as from etcd.
fn as_etcd_reads_back(mut batches: Vec<Arc<RevBatch>>, compacted: i64) -> Vec<Arc<RevBatch>> {
    for b in batches.iter_mut().take_while(|b| b.revision <= compacted) {
        *b = Arc::new(b.as_compacted());
    }
    batches
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
/// (0: nothing was sent), counted in the totals and the prefix's `counters`. `live`: the
/// watch is current, so the wire encoder observes the delivery latency.
pub async fn send_batches(
    out: &Out,
    spec: &WatchSpec,
    header: ResponseHeader,
    mut batches: Vec<Arc<RevBatch>>,
    config: &Config,
    counters: &PrefixCounters,
    live: bool,
) -> Result<usize, ()> {
    let mut count = 0;
    batches.retain(|b| {
        let n = spec.shape.with_encoded(b, |e| e.count);
        count += n;
        n > 0
    });
    if count == 0 {
        return Ok(0);
    }
    let reply = EventsReply {
        header,
        watch_id: spec.id,
        batches: batches.into(),
        shape: spec.shape.clone(),
        live,
    };
    if spec.fragment {
        let resp = reply.to_response();
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
        out.send(Reply::Events(reply)).await?;
        metrics::EVENTS_SENT.inc_by(count as u64);
    }
    counters.events_out.inc_by(count as u64);
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
        out.send(Reply::msg(p)).await?;
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

    /// An idle watch is just this struct in its session: keep it small.
    #[test]
    fn cached_watch_is_small() {
        let size = std::mem::size_of::<CachedWatch>();
        assert!(size <= 104, "CachedWatch is {size} bytes");
    }
}
