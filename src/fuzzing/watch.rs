//! The watch session fuzz target: a real watch session (`serve::watch`, the hub, the feed's
//! cache and dispatch index, the gRPC reply encoder) over an in-memory feed, driven by an
//! arbitrary sequence of creates, cancels, progress requests, writes (small values or large
//! ones), writes outside the prefix, compactions and pauses of the client's reading, and
//! checked against a model of etcd 3.4's rules. No etcd: the
//! target plays etcd's part itself (its store, revisions and events) and tells the feed what
//! an upstream watch would; time is a paused tokio clock.
//!
//! The model (etcd 3.4's `v3rpc/watch.go` and `mvcc/watcher.go`):
//! - a create is answered `created` with etcd's current revision; watch id 0 takes the next
//!   free id from a counter that never goes back, an explicit id is used as is;
//! - a refused create gets `created` + `canceled`, id -1, etcd's reason, checked in etcd's
//!   order: identity (auth on, no token: `user name is empty`), empty range, duplicate id;
//! - a start below the compaction revision: `created`, then `canceled` with
//!   `compact_revision`, and the id stays taken until cancelled; a start at it replays that
//!   revision as the compacted store holds it: no deletions, no `prev_kv`;
//! - a cancel of a known id answers `canceled` under that id and frees it; of an unknown id,
//!   nothing;
//! - a progress request answers id -1 with the current revision;
//! - every event of a watch's range (with its filters, `prev_kv` only when asked) from its
//!   start on is delivered exactly once, in order, never a revision split over two
//!   responses, with headers that never go backwards and lie between the response's last
//!   event and the current revision; a progress notification (only for watches that asked)
//!   promises every event up to its revision was delivered;
//! - after each step the session settles: every answer arrived and every watch is caught up;
//!   while the client's reading is paused, writes and compactions go on (no requests) and
//!   nothing is read or checked until it reads again (at the latest after the last step).
//!   Large values then fill the session's queue beyond its byte budget: the session parks,
//!   and once the queue drains it must catch up from the shared history as if nothing had
//!   happened.
//!
//! Out of scope (they need etcd): keys outside the prefix and from-key ranges (relayed to
//! etcd), starts older than the cache window (caught up from etcd), negative start
//! revisions, tokens.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use futures::{FutureExt, StreamExt};
use prost::Message;
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::config::Config;
use crate::proto::etcdserverpb::watch_request::RequestUnion;
use crate::proto::etcdserverpb::{
    WatchCancelRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use crate::proto::mvccpb::{event::EventType, Event, KeyValue};
use crate::serve::access::{Access, AuthState};
use crate::serve::passthrough::BoxStream;
use crate::serve::watch::reply::Reply;
use crate::serve::watch::WatchService;
use crate::source::compaction::Compaction;
use crate::source::feed::Feed;
use crate::source::hub::Hub;
use crate::source::upstream::Upstream;
use crate::tasks::Tasks;

/// The cached prefix.
const PREFIX: &str = "/p/";

/// Keys the steps use, all inside [`PREFIX`].
const KEYS: [&[u8]; 6] = [b"/p/", b"/p/a", b"/p/a/1", b"/p/ab", b"/p/b", b"/p/c"];

/// Watch ids a create asks for (0: let the server pick) or a cancel names. Not -1: a response
/// under id -1 would be a progress response or a refusal to the model.
const IDS: [i64; 8] = [0, 0, 0, 1, 2, 3, 5, -7];

/// Most steps per input, and most creates (bounds a run and the session's queue).
const MAX_STEPS: usize = 96;
const MAX_CREATES: usize = 48;

/// Unit of a large value: a write of large values puts 1 to 4 of these per key, so that a
/// few of them fill a paused client's queue beyond the session's byte budget
/// (`serve::watch::SESSION_BUDGET_BYTES`).
const LARGE_VALUE: usize = 24 << 10;

/// etcd's refusals.
const RANGE_EMPTY: &str = "mvcc: watcher range is empty";
const DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
const USER_EMPTY: &str = "rpc error: code = InvalidArgument desc = etcdserver: user name is empty";

/// The input, read a byte at a time (zeros once it runs out).
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// etcd's store as the target plays it: revisions, live keys and every event.
struct Store {
    /// Current revision (1: a fresh etcd).
    rev: i64,
    /// Live keys.
    kvs: BTreeMap<Bytes, KeyValue>,
    /// Every event so far, in order.
    log: Vec<Event>,
    /// Compaction revision (-1: never compacted, as etcd's `compactMainRev`).
    compacted: i64,
}

/// One watch as the model knows it.
struct ModelWatch {
    /// First key.
    key: Bytes,
    /// `range_end` (empty: the single key).
    end: Bytes,
    /// First revision it gets events of.
    start: i64,
    /// Filters.
    no_put: bool,
    no_delete: bool,
    /// Events carry their previous value.
    prev_kv: bool,
    /// Starts at the compaction revision: etcd replays that revision from its compacted
    /// store, without its deletions and without `prev_kv`.
    replays_compacted: bool,
    /// Asked for progress notifications.
    progress_notify: bool,
    /// Its `created` (and compaction cancel) arrived.
    created: bool,
    /// Ended by a compaction: gets nothing more, the id stays taken.
    ended: bool,
    /// Its cancel was sent and not answered yet: a progress notification may still come
    /// (etcd's ticker races the cancel too), events may not.
    canceling: bool,
    /// Events delivered so far.
    delivered: usize,
    /// Highest header revision sent.
    last_header: i64,
    /// Revision of the last event delivered.
    last_event: i64,
}

impl ModelWatch {
    fn holds(&self, key: &[u8]) -> bool {
        if self.end.is_empty() {
            key == self.key.as_ref()
        } else {
            self.key.as_ref() <= key && key < self.end.as_ref()
        }
    }

    /// The events this watch must get out of `log`, as it must see them.
    fn expected<'a>(&'a self, log: &'a [Event]) -> impl Iterator<Item = Event> + 'a {
        log.iter()
            .filter(move |e| {
                let kv = e.kv.as_ref();
                let rev = kv.map_or(0, |kv| kv.mod_revision);
                let put = e.r#type() == EventType::Put;
                let compacted = self.replays_compacted && rev == self.start;
                rev >= self.start
                    && kv.is_some_and(|kv| self.holds(&kv.key))
                    && !(put && self.no_put)
                    && (put || !self.no_delete)
                    && (put || !compacted)
            })
            .map(move |e| {
                let mut e = e.clone();
                let rev = e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
                if !self.prev_kv || (self.replays_compacted && rev == self.start) {
                    e.prev_kv = None;
                }
                e
            })
    }
}

/// A control answer the session owes, in order.
#[derive(Debug)]
enum Owed {
    /// `created` for a watch, at etcd's revision.
    Created { id: i64, rev: i64 },
    /// A refused create.
    Refused { reason: &'static str, rev: i64 },
    /// The compaction cancel of a new watch.
    Compacted { id: i64, compact: i64 },
    /// A cancel's answer.
    Canceled { id: i64, rev: i64 },
    /// A progress request's answer.
    Progress { rev: i64 },
}

/// The session as the model sees it.
struct Model {
    store: Store,
    /// Watches by id (an id here is taken).
    watches: HashMap<i64, ModelWatch>,
    /// etcd's `nextID`.
    next_id: i64,
    /// Answers owed, oldest first.
    owed: VecDeque<Owed>,
    /// Auth on: every create from this tokenless stream is refused.
    auth_on: bool,
}

impl Model {
    /// Checks one response from the session.
    fn observe(&mut self, r: WatchResponse) {
        let rev = r.header.as_ref().map_or(0, |h| h.revision);
        if r.created || r.canceled {
            let owed = self.owed.pop_front();
            match owed {
                Some(Owed::Created { id, rev: want }) => {
                    assert!(r.created && !r.canceled, "{r:?}: owed created {id}");
                    assert_eq!((r.watch_id, rev), (id, want), "created");
                    assert!(r.events.is_empty() && r.cancel_reason.is_empty());
                    if let Some(w) = self.watches.get_mut(&id) {
                        w.created = true;
                        w.last_header = rev;
                    }
                }
                Some(Owed::Refused { reason, rev: want }) => {
                    assert!(r.created && r.canceled, "{r:?}: owed refusal {reason}");
                    assert_eq!(r.watch_id, -1, "refusal id");
                    assert_eq!(r.cancel_reason, reason);
                    assert_eq!(rev, want, "refusal header");
                }
                Some(Owed::Compacted { id, compact }) => {
                    assert!(r.canceled && !r.created, "{r:?}: owed compaction of {id}");
                    assert_eq!((r.watch_id, r.compact_revision), (id, compact));
                    assert!(r.events.is_empty());
                }
                Some(Owed::Canceled { id, rev: want }) => {
                    assert!(r.canceled && !r.created, "{r:?}: owed cancel of {id}");
                    assert_eq!((r.watch_id, r.compact_revision), (id, 0));
                    assert_eq!(rev, want, "cancel header");
                    assert!(r.events.is_empty() && r.cancel_reason.is_empty());
                    self.watches.remove(&id);
                }
                other => panic!("unexpected {r:?}, owed {other:?}"),
            }
            return;
        }
        assert_eq!(r.compact_revision, 0, "{r:?}");
        if r.watch_id == -1 && r.events.is_empty() {
            match self.owed.pop_front() {
                Some(Owed::Progress { rev: want }) => assert_eq!(rev, want, "progress response"),
                other => panic!("unexpected {r:?}, owed {other:?}"),
            }
            return;
        }
        let log = &self.store.log;
        let now = self.store.rev;
        let w = self
            .watches
            .get_mut(&r.watch_id)
            .unwrap_or_else(|| panic!("response for an unknown watch: {r:?}"));
        assert!(w.created, "response before created: {r:?}");
        assert!(
            rev >= w.last_header,
            "header went back: {r:?}, had {}",
            w.last_header
        );
        assert!(rev <= now, "header {rev} ahead of etcd's {now}");
        w.last_header = rev;
        if r.events.is_empty() {
            assert!(!w.ended, "progress notification after the end: {r:?}");
            assert!(
                w.progress_notify,
                "progress notification not asked for: {r:?}"
            );
            let owed = w
                .expected(log)
                .filter(|e| e.kv.as_ref().map_or(0, |kv| kv.mod_revision) <= rev)
                .count();
            assert!(
                w.delivered >= owed,
                "progress at {rev} before its events: {r:?}"
            );
            return;
        }
        assert!(!w.ended && !w.canceling, "events after the end: {r:?}");
        let first = r.events[0].kv.as_ref().map_or(0, |kv| kv.mod_revision);
        assert!(
            first > w.last_event,
            "revision {first} split or repeated: {r:?}"
        );
        let want: Vec<Event> = w
            .expected(log)
            .skip(w.delivered)
            .take(r.events.len())
            .collect();
        assert_eq!(r.events, want, "events of watch {}", r.watch_id);
        w.delivered += r.events.len();
        w.last_event = r
            .events
            .last()
            .and_then(|e| e.kv.as_ref())
            .map_or(0, |kv| kv.mod_revision);
        assert!(rev >= w.last_event, "header {rev} below its events: {r:?}");
    }

    /// True when nothing is owed and every watch has every event up to now.
    fn settled(&self) -> bool {
        self.owed.is_empty()
            && self
                .watches
                .values()
                .filter(|w| !w.ended)
                .all(|w| w.delivered == w.expected(&self.store.log).count())
    }
}

/// What the target drives: the feed (playing etcd's part), the compaction knowledge, the
/// session's request sender and reply stream.
struct Rig {
    feed: Arc<Feed>,
    compaction: Arc<Compaction>,
    requests: tokio::sync::mpsc::UnboundedSender<Result<WatchRequest, Status>>,
    replies: BoxStream<Reply>,
    /// Print every request and response (`ETCD_FANOUT_FUZZ_TRACE` set).
    trace: bool,
    /// The client has stopped reading: replies pile up in the session's queue.
    paused: bool,
}

impl Rig {
    fn start(auth: AuthState) -> Rig {
        let config = Config::parse_from([
            "etcd-fanout",
            "--prefix",
            PREFIX,
            "--progress-interval",
            "1s",
            "--stale-after",
            "100000s",
        ]);
        let upstream = match Upstream::with_tls(&["http://127.0.0.1:1".to_string()], None) {
            Ok(u) => Arc::new(u),
            Err(e) => panic!("upstream: {e}"),
        };
        let tasks = Tasks::new();
        let compaction = Arc::new(Compaction::default());
        let feed = Feed::in_memory(
            PREFIX,
            upstream.clone(),
            compaction.clone(),
            &config,
            &tasks,
        );
        let access = Access::fixed(&config, upstream.clone(), auth);
        let hub = Hub::with_feeds(
            config,
            upstream,
            compaction.clone(),
            vec![feed.clone()],
            tasks,
        );
        let (requests, rx) = tokio::sync::mpsc::unbounded_channel();
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        let replies = WatchService::new(hub, access).session(MetadataMap::new(), None, stream);
        Rig {
            feed,
            compaction,
            requests,
            replies,
            trace: std::env::var_os("ETCD_FANOUT_FUZZ_TRACE").is_some(),
            paused: false,
        }
    }

    fn send(&self, req: RequestUnion) {
        if self.trace {
            eprintln!("-> {req:?}");
        }
        let _ = self.requests.send(Ok(WatchRequest {
            request_union: Some(req),
        }));
    }

    /// Lets the session run until it owes nothing and every watch is caught up, checking
    /// every response on the way; while the client's reading is paused, only lets time pass.
    async fn settle(&mut self, model: &mut Model) {
        if self.paused {
            tokio::time::sleep(Duration::from_secs(3)).await;
            return;
        }
        // A session that parked resumes each time its queue drains, a budget's worth at a
        // time: it may take many rounds, each of which must bring something.
        let mut idle = 0;
        for _ in 0..512 {
            if idle == 8 {
                break;
            }
            idle += 1;
            tokio::time::sleep(Duration::from_secs(3)).await;
            while let Some(Some(item)) = self.replies.next().now_or_never() {
                idle = 0;
                let reply = match item {
                    Ok(r) => r,
                    Err(s) => panic!("stream ended: {s:?}"),
                };
                for reply in reply.singles() {
                    let mut buf = Vec::new();
                    if let Err(e) = crate::wire::grpc::watch::encode(&reply, &mut buf) {
                        panic!("encode: {e}");
                    }
                    match WatchResponse::decode(buf.as_slice()) {
                        Ok(r) => {
                            if self.trace {
                                eprintln!("<- {r:?}");
                            }
                            model.observe(r)
                        }
                        Err(e) => panic!("decode: {e}"),
                    }
                }
            }
            if model.settled() {
                return;
            }
        }
        panic!(
            "session stalled: owed {:?}, watches behind {:?}",
            model.owed,
            model
                .watches
                .iter()
                .filter(|(_, w)| !w.ended && w.delivered != w.expected(&model.store.log).count())
                .map(|(id, _)| id)
                .collect::<Vec<_>>()
        );
    }
}

/// The entry point.
pub fn watch_session(data: &[u8]) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
    else {
        return;
    };
    rt.block_on(run(Input(data)));
}

async fn run(mut input: Input<'_>) {
    let auth_on = input.byte() == 0xA5;
    let mut rig = Rig::start(if auth_on {
        AuthState::On
    } else {
        AuthState::Off
    });
    let mut model = Model {
        store: Store {
            rev: 1,
            kvs: BTreeMap::new(),
            log: Vec::new(),
            compacted: -1,
        },
        watches: HashMap::new(),
        next_id: 0,
        owed: VecDeque::new(),
        auth_on,
    };
    let mut creates = 0;
    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        match input.byte() % 10 {
            // No requests while the client is not reading: the session may then answer
            // them late, with later revisions (as etcd does once its buffers are full), which
            // the model does not follow.
            0..=3 if rig.paused => {}
            0 | 1 if creates < MAX_CREATES => {
                creates += 1;
                create(&mut rig, &mut model, &mut input);
            }
            2 => cancel(&mut rig, &mut model, &mut input),
            3 => {
                model.owed.push_back(Owed::Progress {
                    rev: model.store.rev,
                });
                rig.send(RequestUnion::ProgressRequest(WatchProgressRequest {}));
            }
            4 | 5 => write(&rig, &mut model.store, &mut input, false),
            8 => write(&rig, &mut model.store, &mut input, true),
            9 => {
                rig.paused = !rig.paused;
                if rig.trace {
                    eprintln!(
                        "-- reading {}",
                        if rig.paused { "paused" } else { "resumed" }
                    );
                }
            }
            6 => {
                // A write outside the prefix: etcd's revision moves, the feed hears of it (as
                // from a progress notification).
                model.store.rev += 1;
                rig.feed.advance(model.store.rev);
            }
            _ => {
                let to = 1 + i64::from(input.byte()) % model.store.rev;
                if to > model.store.compacted {
                    model.store.compacted = to;
                    rig.compaction.observe(to);
                }
            }
        }
        rig.settle(&mut model).await;
    }
    // The client reads again: everything owed arrives.
    rig.paused = false;
    rig.settle(&mut model).await;
    drop(rig);
}

fn create(rig: &mut Rig, model: &mut Model, input: &mut Input<'_>) {
    let key = KEYS[usize::from(input.byte()) % KEYS.len()];
    let end: Bytes = match input.byte() % 4 {
        0 => Bytes::new(),
        1 => crate::keys::prefix_end(key).unwrap_or_default(),
        2 => Bytes::from_static(KEYS[usize::from(input.byte()) % KEYS.len()]),
        _ => Bytes::from_static(b"/p0"),
    };
    let asked_id = IDS[usize::from(input.byte()) % IDS.len()];
    let rev = model.store.rev;
    let start = match input.byte() % 3 {
        0 => 0,
        _ => 1 + i64::from(input.byte()) % (rev + 3),
    };
    let flags = input.byte();
    let mut filters = Vec::new();
    if flags & 4 != 0 {
        filters.push(0);
    }
    if flags & 8 != 0 {
        filters.push(1);
    }
    if flags & 16 != 0 {
        filters.push(7);
    }
    let req = WatchCreateRequest {
        key: Bytes::from_static(key),
        range_end: end.clone(),
        start_revision: start,
        progress_notify: flags & 2 != 0,
        filters,
        prev_kv: flags & 1 != 0,
        watch_id: asked_id,
        fragment: flags & 32 != 0,
    };
    rig.send(RequestUnion::CreateRequest(req));
    // etcd's order: identity, range, id.
    let refused = if model.auth_on {
        Some(USER_EMPTY)
    } else if !end.is_empty() && key >= end.as_ref() {
        Some(RANGE_EMPTY)
    } else if asked_id != 0 && model.watches.contains_key(&asked_id) {
        Some(DUPLICATE_ID)
    } else {
        None
    };
    if let Some(reason) = refused {
        model.owed.push_back(Owed::Refused { reason, rev });
        return;
    }
    let id = if asked_id == 0 {
        while model.watches.contains_key(&model.next_id) {
            model.next_id += 1;
        }
        model.next_id += 1;
        model.next_id - 1
    } else {
        asked_id
    };
    let start = if start == 0 { rev + 1 } else { start };
    model.owed.push_back(Owed::Created { id, rev });
    let compacted = start < model.store.compacted;
    if compacted {
        model.owed.push_back(Owed::Compacted {
            id,
            compact: model.store.compacted,
        });
    }
    model.watches.insert(
        id,
        ModelWatch {
            key: Bytes::from_static(key),
            end,
            start,
            no_put: flags & 4 != 0,
            no_delete: flags & 8 != 0,
            prev_kv: flags & 1 != 0,
            replays_compacted: start == model.store.compacted && start <= rev,
            progress_notify: flags & 2 != 0,
            created: false,
            ended: compacted,
            canceling: false,
            delivered: 0,
            last_header: 0,
            last_event: 0,
        },
    );
}

fn cancel(rig: &mut Rig, model: &mut Model, input: &mut Input<'_>) {
    let b = input.byte();
    let id = if b % 2 == 0 && !model.watches.is_empty() {
        let mut ids: Vec<i64> = model.watches.keys().copied().collect();
        ids.sort_unstable();
        ids[usize::from(b / 2) % ids.len()]
    } else {
        [0, 1, 2, 3, 5, -7, 99][usize::from(b / 2) % 7]
    };
    rig.send(RequestUnion::CancelRequest(WatchCancelRequest {
        watch_id: id,
    }));
    // etcd 3.4 ignores a cancel of an unknown id.
    if let Some(w) = model.watches.get_mut(&id) {
        w.canceling = true;
        model.owed.push_back(Owed::Canceled {
            id,
            rev: model.store.rev,
        });
    }
}

/// One transaction of up to three puts and deletes on distinct keys, of small or `large`
/// values; a revision only if something changed (a delete of a missing key changes nothing,
/// as in etcd).
fn write(rig: &Rig, store: &mut Store, input: &mut Input<'_>, large: bool) {
    let n = 1 + input.byte() % 3;
    let rev = store.rev + 1;
    let mut events = Vec::new();
    let mut touched: Vec<&[u8]> = Vec::new();
    for _ in 0..n {
        let b = input.byte();
        let key = KEYS[usize::from(b) % KEYS.len()];
        if touched.contains(&key) {
            continue;
        }
        touched.push(key);
        let key_bytes = Bytes::from_static(key);
        let prev = store.kvs.get(&key_bytes).cloned();
        if b & 0x80 == 0 {
            let kv = KeyValue {
                key: key_bytes.clone(),
                create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                mod_revision: rev,
                version: prev.as_ref().map_or(1, |p| p.version + 1),
                value: Bytes::from(vec![
                    b'v';
                    if large {
                        LARGE_VALUE * (1 + usize::from(b % 4))
                    } else {
                        usize::from(b % 5)
                    }
                ]),
                lease: 0,
            };
            store.kvs.insert(key_bytes, kv.clone());
            events.push(Event {
                r#type: EventType::Put as i32,
                kv: Some(kv),
                prev_kv: prev,
            });
        } else if let Some(prev) = prev {
            store.kvs.remove(&key_bytes);
            events.push(Event {
                r#type: EventType::Delete as i32,
                kv: Some(KeyValue {
                    key: key_bytes,
                    mod_revision: rev,
                    ..Default::default()
                }),
                prev_kv: Some(prev),
            });
        }
    }
    if events.is_empty() {
        return;
    }
    store.rev = rev;
    if rig.trace {
        let keys: Vec<String> = events
            .iter()
            .filter_map(|e| e.kv.as_ref())
            .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
            .collect();
        eprintln!("== revision {rev}: {keys:?}");
    }
    store.log.extend(events.iter().cloned());
    rig.feed.apply_events(events, std::time::Instant::now());
}
