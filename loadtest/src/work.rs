//! The workload: writers, gRPC watch streams, APISIX-style HTTP/JSON watchers, cold-start
//! ranges, and the per-watcher correctness bookkeeping.
//!
//! Every written value carries `<seq:016x><send time ns:016x>` (then padding): `seq` counts
//! the writes of one prefix from 0, so each watcher can check that it saw every write of its
//! prefix exactly once and in order, and the fan-out latency is measured at receipt.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Buf;
use bytes::{Bytes, BytesMut};
use etcd_fanout::codec::{EtcdCodec, EtcdEncoder};
use etcd_fanout::proto::etcdserverpb::{
    kv_client::KvClient, watch_client::WatchClient, watch_request::RequestUnion,
    DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, WatchCreateRequest, WatchRequest,
    WatchResponse,
};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::client::Grpc;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use crate::http1::{self, BoxError};
use crate::layout::{Layout, Shape, Writes};
use crate::stats::Hist;

/// Phases of one target's run; latencies are kept per phase.
pub const CREATE: usize = 0;
pub const LIVE: usize = 1;
pub const STORM: usize = 2;
pub const COLD: usize = 3;
pub const PHASES: usize = 4;

/// Most error messages kept as samples.
const ERROR_SAMPLES: usize = 20;

/// State shared by every task of one target's run.
pub struct Shared {
    t0: Instant,
    pub phase: AtomicUsize,
    pub hists: Vec<Mutex<Hist>>,
    /// First-time deliveries of an event to a watcher (history and live).
    pub fresh: AtomicU64,
    /// First-time deliveries of live writes, per phase.
    pub fresh_live: Vec<AtomicU64>,
    /// Deliveries of an event a watcher had already seen on an earlier stream (replays).
    pub replayed: AtomicU64,
    /// Watchers whose first `created` arrived.
    pub created: AtomicUsize,
    /// Watchers re-created after a reconnect storm.
    pub recreated: AtomicUsize,
    /// HTTP watch reconnections completed (created again).
    pub http_reconnects: AtomicU64,
    pub errors: AtomicU64,
    pub error_samples: Mutex<Vec<String>>,
    /// The channels (prefixes or single keys) of [`Layout`], indexed by channel.
    pub prefixes: Vec<Bytes>,
    /// Who watches and writes what.
    pub layout: Layout,
    /// Writes per prefix before the watchers are created (replayed as history).
    pub history: u64,
    /// Revision of every write, per prefix, indexed by seq.
    pub revs: Vec<Mutex<Vec<i64>>>,
    /// Writes acknowledged per prefix.
    pub written: Vec<AtomicU64>,
}

impl Shared {
    pub fn new(layout: Layout, history: u64) -> Shared {
        let prefixes = layout.channels.clone();
        let n = prefixes.len();
        Shared {
            t0: Instant::now(),
            phase: AtomicUsize::new(CREATE),
            hists: (0..PHASES).map(|_| Mutex::new(Hist::default())).collect(),
            fresh: AtomicU64::new(0),
            fresh_live: (0..PHASES).map(|_| AtomicU64::new(0)).collect(),
            replayed: AtomicU64::new(0),
            created: AtomicUsize::new(0),
            recreated: AtomicUsize::new(0),
            http_reconnects: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            error_samples: Mutex::new(Vec::new()),
            prefixes,
            layout,
            history,
            revs: (0..n).map(|_| Mutex::new(Vec::new())).collect(),
            written: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The Unix time (ns) of this run's time origin, for clients with a clock of their own.
    pub fn t0_unix_ns(&self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        now.saturating_sub(self.t0.elapsed()).as_nanos() as i64
    }

    pub fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    pub fn error(&self, msg: impl Into<String>) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.note(msg);
    }

    /// Keeps `msg` as a sample (distinct messages only) without counting an error.
    pub fn note(&self, msg: impl Into<String>) {
        let msg = msg.into();
        let mut s = self.error_samples.lock().unwrap();
        if s.len() < ERROR_SAMPLES && !s.contains(&msg) {
            s.push(msg);
        }
    }

    pub fn rev_of(&self, prefix: usize, seq: u64) -> Option<i64> {
        self.revs[prefix].lock().unwrap().get(seq as usize).copied()
    }
}

/// The end of the range of all keys starting with `prefix` ([`etcd_fanout::keys::prefix_end`],
/// or `\0`, every key, when it has none).
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    etcd_fanout::keys::prefix_end(prefix).unwrap_or_else(|| Bytes::from_static(&[0]))
}

/// A value of `size` bytes (at least 40) carrying `seq` and the send time.
pub fn encode_value(seq: u64, t_ns: u64, size: usize) -> Bytes {
    let mut v = format!("{seq:016x}{t_ns:016x}").into_bytes();
    v.resize(size.max(40), b'.');
    Bytes::from(v)
}

/// `(seq, send time ns)` from a value made by [`encode_value`].
pub fn decode_value(v: &[u8]) -> Option<(u64, u64)> {
    if v.len() < 32 {
        return None;
    }
    let s = std::str::from_utf8(&v[..32]).ok()?;
    Some((
        u64::from_str_radix(&s[..16], 16).ok()?,
        u64::from_str_radix(&s[16..], 16).ok()?,
    ))
}

/// What one watcher saw, checked as it arrives.
pub struct Track {
    pub prefix: usize,
    /// Filter and `prev_kv` of this watcher's watch.
    pub shape: Shape,
    /// Which writes of the channel are deletes.
    writes: Writes,
    /// Deletes received, as (seq claimed at receipt, revision); checked against the
    /// writer's revisions once every write is known ([`Track::verify_claims`]).
    claims: Vec<(u64, i64)>,
    /// First seq this watcher must receive (0 with history replay, else the first live write).
    pub first: u64,
    bits: Vec<u64>,
    seg_first: u64,
    seg_next: u64,
    seg_last_rev: i64,
    pub last_seq: Option<u64>,
    pub last_rev: i64,
    last_header: i64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub bad: u64,
    /// Responses whose header.revision was lower than an earlier one of this watcher.
    pub header_regressions: u64,
    pub created: bool,
}

impl Track {
    pub fn new(prefix: usize, first: u64) -> Track {
        Track::shaped(
            prefix,
            first,
            Shape::PLAIN,
            Writes {
                delete_every: 0,
                keys: 1,
            },
        )
    }

    /// A watcher of `shape` on a channel whose writes are `writes`.
    pub fn shaped(prefix: usize, first: u64, shape: Shape, writes: Writes) -> Track {
        Track {
            prefix,
            shape,
            writes,
            claims: Vec::new(),
            first,
            bits: Vec::new(),
            seg_first: first,
            seg_next: first,
            seg_last_rev: 0,
            last_seq: None,
            last_rev: 0,
            last_header: 0,
            duplicated: 0,
            out_of_order: 0,
            bad: 0,
            header_regressions: 0,
            created: false,
        }
    }

    /// A new stream for this watcher, whose first event must be `first_seq`.
    pub fn begin_segment(&mut self, first_seq: u64) {
        self.seg_first = first_seq;
        self.seg_next = first_seq;
        self.seg_last_rev = 0;
    }

    fn seen(&self, seq: u64) -> bool {
        self.bits
            .get((seq / 64) as usize)
            .is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }

    /// Records one event; true when the watcher sees `seq` for the first time.
    pub fn on_event(&mut self, seq: u64, rev: i64) -> bool {
        if rev <= self.seg_last_rev {
            self.out_of_order += 1;
        }
        self.seg_last_rev = self.seg_last_rev.max(rev);
        if !self.writes.sees(self.shape.filter, seq) {
            // A write this watch's filter leaves out.
            self.bad += 1;
            return false;
        }
        if seq > self.writes.next_seen(self.shape.filter, self.seg_next) || seq < self.seg_first {
            self.out_of_order += 1;
        } else if seq < self.seg_next {
            self.duplicated += 1;
        }
        self.seg_next = self.seg_next.max(seq + 1);
        self.last_rev = self.last_rev.max(rev);
        if seq < self.first {
            return false;
        }
        self.last_seq = Some(self.last_seq.map_or(seq, |l| l.max(seq)));
        if self.seen(seq) {
            return false;
        }
        let w = (seq / 64) as usize;
        if self.bits.len() <= w {
            self.bits.resize(w + 1, 0);
        }
        self.bits[w] |= 1 << (seq % 64);
        true
    }

    /// header.revision must never go down along one watcher, across reconnects too (APISIX
    /// takes a lower one for an etcd restart and re-reads everything). Returns the earlier,
    /// higher revision when it went down.
    pub fn on_header(&mut self, rev: i64) -> Option<i64> {
        let prev = self.last_header;
        self.last_header = prev.max(rev);
        if rev < prev {
            self.header_regressions += 1;
            return Some(prev);
        }
        None
    }

    /// Writes of the channel (`[first, written)`) meant for this watcher.
    pub fn expected(&self, written: u64) -> u64 {
        self.writes
            .count_seen(self.shape.filter, self.first, written)
    }

    /// Writes of the prefix (`[first, written)`) this watcher never received.
    pub fn missing(&self, written: u64) -> u64 {
        (self.first..written)
            .filter(|s| self.writes.sees(self.shape.filter, *s) && !self.seen(*s))
            .count() as u64
    }

    /// The seq a delete event received now stands for: the next write this watcher expects,
    /// which must be a delete (a delete carries no value to read it from). Checked later by
    /// [`Track::verify_claims`].
    pub fn claim_delete(&mut self, rev: i64) -> Option<u64> {
        let seq = self.writes.next_seen(self.shape.filter, self.seg_next);
        if !self.writes.is_delete(seq) {
            return None;
        }
        self.claims.push((seq, rev));
        Some(seq)
    }

    /// Deletes whose claimed seq was not written at the revision they came with (each is
    /// a delete out of place: counted as out of order).
    pub fn verify_claims(&mut self, revs: &[i64]) -> u64 {
        let wrong = self
            .claims
            .iter()
            .filter(|(seq, rev)| revs.get(*seq as usize) != Some(rev))
            .count() as u64;
        self.out_of_order += wrong;
        self.claims.clear();
        wrong
    }
}

/// Per-response counters, added to [`Shared`] once per response.
#[derive(Default)]
struct Local {
    fresh: u64,
    fresh_live: u64,
    replayed: u64,
    lat: Vec<u32>,
    lat_phase: usize,
}

impl Local {
    fn flush(&mut self, sh: &Shared, force: bool) {
        if self.fresh > 0 {
            sh.fresh.fetch_add(self.fresh, Ordering::Relaxed);
            self.fresh = 0;
        }
        if self.fresh_live > 0 {
            sh.fresh_live[self.lat_phase].fetch_add(self.fresh_live, Ordering::Relaxed);
            self.fresh_live = 0;
        }
        if self.replayed > 0 {
            sh.replayed.fetch_add(self.replayed, Ordering::Relaxed);
            self.replayed = 0;
        }
        if !self.lat.is_empty() && (force || self.lat.len() >= 512) {
            let mut h = sh.hists[self.lat_phase].lock().unwrap();
            for v in self.lat.drain(..) {
                h.record(v as u64);
            }
        }
    }

    /// Accounts one event without a send time (a delete), already checked.
    fn untimed(&mut self, sh: &Shared, fresh: bool, seq: u64) {
        if !fresh {
            self.replayed += 1;
            return;
        }
        self.fresh += 1;
        if seq >= sh.history {
            let phase = sh.phase.load(Ordering::Relaxed);
            if phase != self.lat_phase {
                self.flush(sh, true);
                self.lat_phase = phase;
            }
            self.fresh_live += 1;
        }
    }

    /// Accounts one event already checked by `Track::on_event`.
    fn event(&mut self, sh: &Shared, fresh: bool, seq: u64, sent_ns: u64, now_ns: u64) {
        if !fresh {
            self.replayed += 1;
            return;
        }
        self.fresh += 1;
        if seq >= sh.history {
            let phase = sh.phase.load(Ordering::Relaxed);
            if phase != self.lat_phase {
                self.flush(sh, true);
                self.lat_phase = phase;
            }
            self.fresh_live += 1;
            let us = now_ns.saturating_sub(sent_ns) / 1000;
            self.lat.push(us.min(u32::MAX as u64) as u32);
        }
    }
}

/// A gRPC connection to `url` with generous HTTP/2 windows.
pub async fn connect(url: &str) -> Result<Channel, BoxError> {
    let mut ep = Endpoint::from_shared(url.to_string())?;
    if let Some(t) = crate::tls::get().filter(|_| url.starts_with("https://")) {
        ep = ep.tls_config(t.grpc())?;
    }
    let ch = ep
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_connection_window_size(16 << 20)
        .initial_stream_window_size(4 << 20)
        .connect()
        .await
        .map_err(|e| format!("connect {url}: {e}"))?;
    Ok(ch)
}

/// One watch of a stream: its prefix, start revision and first expected seq.
#[derive(Clone, Copy)]
pub struct Plan {
    pub prefix: usize,
    pub start_rev: i64,
    pub first: u64,
    pub shape: Shape,
}

/// The create request of `t`'s watch: its channel (a prefix, or one key), shape and start.
fn create_request(sh: &Shared, t: &Track, start_rev: i64) -> WatchRequest {
    let key = sh.prefixes[t.prefix].clone();
    let range_end = if sh.layout.single_key {
        Bytes::new()
    } else {
        prefix_end(&key)
    };
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key,
            range_end,
            start_revision: start_rev,
            filters: t.shape.filters(),
            prev_kv: t.shape.prev_kv,
            ..Default::default()
        })),
    }
}

/// Most streams one watch stream task opens (the first plus reconnect storms).
const MAX_SEGMENTS: usize = 64;

/// One gRPC watch stream carrying `plans.len()` watches, created one after another like
/// etcd's Go client does. On a storm signal the stream is dropped and every watch re-created
/// on a new stream from `storm_back` events before its last one.
pub async fn grpc_stream(
    ch: Channel,
    plans: Vec<Plan>,
    sh: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    mut storm: watch::Receiver<u64>,
    storm_back: u64,
) -> Vec<Track> {
    let mut tracks: Vec<Track> = plans
        .iter()
        .map(|p| Track::shaped(p.prefix, p.first, p.shape, sh.layout.writes))
        .collect();
    let mut starts: Vec<i64> = plans.iter().map(|p| p.start_rev).collect();
    let mut local = Local::default();
    let mut storm_round = false;
    'outer: for _ in 0..MAX_SEGMENTS {
        if *stop.borrow() {
            break;
        }
        let (tx, rx) = mpsc::channel::<WatchRequest>(4);
        let mut next = 0usize;
        if tx
            .send(create_request(&sh, &tracks[0], starts[0]))
            .await
            .is_err()
        {
            sh.error("watch request channel closed");
            break;
        }
        let mut client = WatchClient::new(ch.clone()).max_decoding_message_size(64 << 20);
        let mut stream = tokio::select! {
            r = client.watch(crate::auth::as_reader(ReceiverStream::new(rx))) => match r {
                Ok(resp) => resp.into_inner(),
                Err(status) => {
                    sh.error(format!("watch: {status}"));
                    break 'outer;
                }
            },
            _ = stop.changed() => break 'outer,
        };
        let mut ids: HashMap<i64, usize> = HashMap::with_capacity(tracks.len());
        // Bounded by the stop signal, which the driver always sends.
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break 'outer,
                r = storm.changed() => {
                    if r.is_err() {
                        // The driver is gone: stop.
                        break 'outer;
                    }
                    // Drop this stream; resume every watch `storm_back` events back.
                    for (i, t) in tracks.iter_mut().enumerate() {
                        let (seq, rev) = match t.last_seq {
                            Some(last) => {
                                let want = (last + 1).saturating_sub(storm_back).max(t.first);
                                match sh.rev_of(t.prefix, want) {
                                    Some(rev) if want <= last => (want, rev),
                                    _ => (last + 1, t.last_rev + 1),
                                }
                            }
                            None => (t.first, starts[i]),
                        };
                        starts[i] = rev;
                        t.begin_segment(seq);
                    }
                    storm_round = true;
                    continue 'outer;
                }
                m = stream.message() => match m {
                    Ok(Some(resp)) => {
                        if let Some(i) = handle_response(resp, &mut tracks, &mut ids, &mut next, &sh, &mut local, storm_round) {
                            if tx.send(create_request(&sh, &tracks[i], starts[i])).await.is_err() {
                                sh.error("watch request channel closed");
                                break 'outer;
                            }
                        }
                        local.flush(&sh, false);
                    }
                    Ok(None) => {
                        sh.error("watch stream ended by the server");
                        break 'outer;
                    }
                    Err(status) => {
                        sh.error(format!("watch stream error: {status}"));
                        break 'outer;
                    }
                },
            }
        }
    }
    local.flush(&sh, true);
    tracks
}

/// Applies one response; returns the index of the next watch to create, if any.
fn handle_response(
    resp: WatchResponse,
    tracks: &mut [Track],
    ids: &mut HashMap<i64, usize>,
    next: &mut usize,
    sh: &Shared,
    local: &mut Local,
    storm_round: bool,
) -> Option<usize> {
    let mut create_next = None;
    if resp.created {
        if *next < tracks.len() && !ids.contains_key(&resp.watch_id) {
            ids.insert(resp.watch_id, *next);
            let t = &mut tracks[*next];
            if storm_round {
                sh.recreated.fetch_add(1, Ordering::Relaxed);
            } else if !t.created {
                sh.created.fetch_add(1, Ordering::Relaxed);
            }
            t.created = true;
            *next += 1;
            if *next < tracks.len() {
                create_next = Some(*next);
            }
        } else {
            sh.error(format!(
                "unexpected created response for watch {}",
                resp.watch_id
            ));
        }
    }
    if resp.canceled {
        sh.error(format!(
            "watch {} canceled (compact_revision {}, reason {:?})",
            resp.watch_id, resp.compact_revision, resp.cancel_reason
        ));
    }
    let Some(&i) = ids.get(&resp.watch_id) else {
        if !resp.events.is_empty() {
            sh.error(format!("events for unknown watch id {}", resp.watch_id));
        }
        return create_next;
    };
    let t = &mut tracks[i];
    if let Some(h) = &resp.header {
        if let Some(prev) = t.on_header(h.revision) {
            sh.note(format!(
                "header.revision went down from {prev} to {} (watch {}, {} events, created {})",
                h.revision,
                resp.watch_id,
                resp.events.len(),
                resp.created
            ));
        }
    }
    if resp.events.is_empty() {
        return create_next;
    }
    let now = sh.now_ns();
    let layout = &sh.layout;
    for ev in resp.events {
        let Some(kv) = ev.kv else {
            t.bad += 1;
            continue;
        };
        if !layout.holds(t.prefix, &kv.key) {
            t.bad += 1;
            continue;
        }
        let (seq, sent) = match ev.r#type {
            0 => match decode_value(&kv.value) {
                Some((seq, sent)) => (seq, Some(sent)),
                None => {
                    t.bad += 1;
                    continue;
                }
            },
            1 if layout.writes.delete_every > 0 => match t.claim_delete(kv.mod_revision) {
                Some(seq) => (seq, None),
                None => {
                    // A delete where this watcher expects a put.
                    t.out_of_order += 1;
                    continue;
                }
            },
            _ => {
                t.bad += 1;
                continue;
            }
        };
        if kv.key != layout.key_of(t.prefix, seq) || !prev_kv_ok(t, seq, ev.prev_kv.as_ref()) {
            t.bad += 1;
        }
        let fresh = t.on_event(seq, kv.mod_revision);
        match sent {
            Some(sent) => local.event(sh, fresh, seq, sent, now),
            None => local.untimed(sh, fresh, seq),
        }
    }
    create_next
}

/// True when an event's `prev_kv` is what the watch asked for: absent without `prev_kv`,
/// else the value of the write this one replaced (absent when the key did not exist).
fn prev_kv_ok(t: &Track, seq: u64, prev: Option<&etcd_fanout::proto::mvccpb::KeyValue>) -> bool {
    if !t.shape.prev_kv {
        return prev.is_none();
    }
    let want = t.writes.prev_put(seq);
    let got = prev.and_then(|kv| decode_value(&kv.value)).map(|(s, _)| s);
    want == got
}

/// Makes `count` writes, rotating over the channels `chans`, at `rate` writes/s (unpaced
/// when rate is 0), stopping at `deadline`. Put values are stamped with their seq and send
/// time; with deletes in the layout, every `delete_every`-th write of a channel deletes the
/// key put just before it (and must delete exactly one key).
#[allow(clippy::too_many_arguments)]
pub async fn writer(
    ch: Channel,
    chans: Vec<usize>,
    sh: Arc<Shared>,
    rate: f64,
    first: Instant,
    count: u64,
    deadline: Instant,
    value_size: usize,
) {
    let mut kv = KvClient::new(ch);
    let mut tick = (rate > 0.0).then(|| {
        let mut t = tokio::time::interval_at(first.into(), Duration::from_secs_f64(1.0 / rate));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    for i in 0..count {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        if Instant::now() >= deadline || chans.is_empty() {
            break;
        }
        let p = chans[i as usize % chans.len()];
        let seq = sh.written[p].load(Ordering::Relaxed);
        let key = sh.layout.key_of(p, seq);
        let done = if sh.layout.writes.is_delete(seq) {
            let req = DeleteRangeRequest {
                key,
                ..Default::default()
            };
            tokio::time::timeout(
                Duration::from_secs(10),
                kv.delete_range(crate::auth::as_writer(req)),
            )
            .await
            .map(|r| {
                r.and_then(|resp| {
                    let resp = resp.into_inner();
                    if resp.deleted != 1 {
                        return Err(Status::internal(format!(
                            "delete of write {seq} removed {} keys, not 1",
                            resp.deleted
                        )));
                    }
                    Ok(resp.header.map_or(0, |h| h.revision))
                })
            })
        } else {
            let req = PutRequest {
                key,
                value: encode_value(seq, sh.now_ns(), value_size),
                ..Default::default()
            };
            tokio::time::timeout(Duration::from_secs(10), kv.put(crate::auth::as_writer(req)))
                .await
                .map(|r| r.map(|resp| resp.into_inner().header.map_or(0, |h| h.revision)))
        };
        match done {
            Ok(Ok(rev)) => {
                sh.revs[p].lock().unwrap().push(rev);
                sh.written[p].store(seq + 1, Ordering::Relaxed);
            }
            Ok(Err(s)) => {
                sh.error(format!("write: {s}"));
                break;
            }
            Err(_) => {
                sh.error("write timed out after 10s");
                break;
            }
        }
    }
}

// ---- HTTP/JSON (grpc-gateway), the way APISIX 3.x uses it -----------------------------

fn de_i64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    use serde::de::Error;
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => s.parse().map_err(D::Error::custom),
        serde_json::Value::Number(n) => n.as_i64().ok_or_else(|| D::Error::custom("not an i64")),
        serde_json::Value::Null => Ok(0),
        other => Err(D::Error::custom(format!("not an integer: {other}"))),
    }
}

#[derive(Deserialize, Default)]
struct JHeader {
    #[serde(default, deserialize_with = "de_i64")]
    revision: i64,
}

#[derive(Deserialize)]
struct JRange {
    header: Option<JHeader>,
    #[serde(default)]
    kvs: Vec<serde::de::IgnoredAny>,
    #[serde(default, deserialize_with = "de_i64")]
    count: i64,
    #[serde(default)]
    more: bool,
}

/// An int64 as etcd's gateway writes it (a JSON string), or a JSON number, read without a
/// `serde_json::Value`.
fn de_int<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    struct IntVisitor;
    impl serde::de::Visitor<'_> for IntVisitor {
        type Value = i64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an int64 as a JSON string or number")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<i64, E> {
            v.parse().map_err(E::custom)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v).map_err(E::custom)
        }
    }
    d.deserialize_any(IntVisitor)
}

#[derive(Deserialize, Default)]
struct LeanHeader {
    #[serde(default, deserialize_with = "de_int")]
    revision: i64,
}

/// A range answer read lean: the kvs are only skipped over (still parsed, so malformed JSON
/// is an error), nothing is allocated per key.
#[derive(Deserialize)]
struct LeanRange {
    #[serde(default)]
    header: LeanHeader,
    #[serde(default)]
    kvs: Vec<serde::de::IgnoredAny>,
    #[serde(default, deserialize_with = "de_int")]
    count: i64,
    #[serde(default)]
    more: bool,
}

#[derive(Deserialize)]
struct JLine {
    result: Option<JWatch>,
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct JWatch {
    header: Option<JHeader>,
    #[serde(default)]
    created: bool,
    #[serde(default)]
    canceled: bool,
    #[serde(default, deserialize_with = "de_i64")]
    compact_revision: i64,
    #[serde(default)]
    cancel_reason: String,
    #[serde(default)]
    events: Vec<JEvent>,
}

#[derive(Deserialize)]
struct JEvent {
    #[serde(rename = "type", default)]
    kind: Option<serde_json::Value>,
    kv: Option<JKv>,
}

#[derive(Deserialize)]
struct JKv {
    #[serde(default)]
    key: String,
    #[serde(default, deserialize_with = "de_i64")]
    mod_revision: i64,
    #[serde(default)]
    value: String,
}

/// `POST /v3/kv/range` of `prefix` over HTTP/JSON; returns (header.revision, number of kvs).
pub async fn http_range(
    addr: SocketAddr,
    prefix: &[u8],
    serializable: bool,
) -> Result<(i64, usize), BoxError> {
    let s = http_range_full(addr, prefix, serializable).await?;
    Ok((s.revision, s.kvs))
}

/// The JSON request of a full range of `prefix`.
fn http_range_request(prefix: &[u8], serializable: bool) -> String {
    format!(
        "{{\"key\":\"{}\",\"range_end\":\"{}\"{}}}",
        B64.encode(prefix),
        B64.encode(prefix_end(prefix)),
        if serializable {
            ",\"serializable\":true"
        } else {
            ""
        }
    )
}

/// Only status 200 is an answer.
fn http_range_status(status: u16, resp: &[u8]) -> Result<(), BoxError> {
    if status != 200 {
        return Err(format!(
            "POST /v3/kv/range: status {status}: {}",
            String::from_utf8_lossy(&resp[..resp.len().min(200)])
        )
        .into());
    }
    Ok(())
}

/// A range over HTTP/JSON read as loadgen always did (fresh buffers, int64 fields through
/// `serde_json::Value`).
async fn http_range_full(
    addr: SocketAddr,
    prefix: &[u8],
    serializable: bool,
) -> Result<RangeSummary, BoxError> {
    let body = http_range_request(prefix, serializable);
    let (status, resp) = http1::request(
        addr,
        "POST",
        "/v3/kv/range",
        body.as_bytes(),
        Duration::from_secs(30),
    )
    .await?;
    http_range_status(status, &resp)?;
    let r: JRange = serde_json::from_slice(&resp)?;
    Ok(RangeSummary {
        revision: r.header.unwrap_or_default().revision,
        kvs: r.kvs.len(),
        more: r.more,
        count: r.count,
    })
}

/// A range over HTTP/JSON read into the caller's reused buffers and parsed into
/// [`LeanRange`].
async fn http_range_lean(
    addr: SocketAddr,
    prefix: &[u8],
    serializable: bool,
    bufs: &mut http1::Bufs,
) -> Result<RangeSummary, BoxError> {
    let body = http_range_request(prefix, serializable);
    let status = http1::request_with(
        addr,
        "POST",
        "/v3/kv/range",
        body.as_bytes(),
        Duration::from_secs(30),
        bufs,
    )
    .await?;
    http_range_status(status, &bufs.body)?;
    let r: LeanRange = serde_json::from_slice(&bufs.body)?;
    Ok(RangeSummary {
        revision: r.header.revision,
        kvs: r.kvs.len(),
        more: r.more,
        count: r.count,
    })
}

/// How an HTTP watcher picks its start revision when it reconnects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Resume {
    /// Last seen revision + 1 (what APISIX 3.x does).
    Last,
    /// The start revision of its first watch, replaying everything since (worst case).
    First,
}

/// Settings of the HTTP watchers.
#[derive(Clone, Copy)]
pub struct HttpOpts {
    pub reconnect: Duration,
    pub resume: Resume,
    pub create_deadline: Instant,
}

/// One APISIX-style watcher: range the prefix, then `POST /v3/watch` from
/// header.revision + 1, reading the chunked stream, closing and reopening it every
/// `reconnect` (first one after a random part of it).
pub async fn http_watcher(
    addr: SocketAddr,
    prefix: usize,
    sh: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    opts: HttpOpts,
    gate: Arc<Semaphore>,
    first_offset: Duration,
) -> Track {
    let mut track = Track::new(prefix, sh.history);
    let pfx = sh.prefixes[prefix].clone();
    let range = {
        let _permit = gate.acquire().await;
        http_range(addr, &pfx, false).await
    };
    let rev = match range {
        Ok((rev, _)) => rev,
        Err(e) => {
            sh.error(format!("http range: {e}"));
            return track;
        }
    };
    let first_start = rev + 1;
    let mut start = first_start;
    track.begin_segment(track.first);
    let mut session_len = first_offset;
    let mut local = Local::default();
    // Bounded: at most 100,000 reconnections, and by the stop signal.
    for round in 0..100_000u32 {
        if *stop.borrow() {
            break;
        }
        let r = http_session(
            addr,
            &pfx,
            start,
            &mut track,
            &sh,
            &mut stop,
            &mut local,
            Instant::now() + session_len,
            round,
            &gate,
            opts.create_deadline,
        )
        .await;
        local.flush(&sh, true);
        if let Err(e) = r {
            sh.error(format!("http watch: {e}"));
            break;
        }
        session_len = opts.reconnect;
        match opts.resume {
            Resume::Last => {
                if let Some(last) = track.last_seq {
                    start = track.last_rev + 1;
                    track.begin_segment(last + 1);
                } else {
                    track.begin_segment(track.first);
                }
            }
            Resume::First => {
                start = first_start;
                track.begin_segment(track.first);
            }
        }
    }
    local.flush(&sh, true);
    track
}

/// One `/v3/watch` connection until `until` or the stop signal.
#[allow(clippy::too_many_arguments)]
async fn http_session(
    addr: SocketAddr,
    prefix: &Bytes,
    start: i64,
    track: &mut Track,
    sh: &Shared,
    stop: &mut watch::Receiver<bool>,
    local: &mut Local,
    until: Instant,
    round: u32,
    gate: &Semaphore,
    create_deadline: Instant,
) -> Result<(), BoxError> {
    let body = format!(
        "{{\"create_request\":{{\"key\":\"{}\",\"range_end\":\"{}\",\"start_revision\":\"{start}\"}}}}",
        B64.encode(prefix),
        B64.encode(prefix_end(prefix))
    );
    let mut s = {
        let _permit = gate.acquire().await;
        let mut s = tokio::time::timeout(Duration::from_secs(10), crate::tls::connect(addr))
            .await
            .map_err(|_| "connect timed out")??;
        s.write_all(&http1::request_bytes(
            "POST",
            addr,
            "/v3/watch",
            body.as_bytes(),
            false,
        ))
        .await?;
        s
    };
    let mut buf = BytesMut::with_capacity(8 << 10);
    let mut head = None;
    let mut chunked = http1::Chunked::default();
    let mut lines: Vec<u8> = Vec::with_capacity(4 << 10);
    let mut created = false;
    let head_deadline = if round == 0 {
        create_deadline
    } else {
        Instant::now() + Duration::from_secs(30)
    };
    // Bounded by `until` and the stop signal.
    loop {
        let deadline = if created { until } else { head_deadline };
        let n = tokio::select! {
            biased;
            _ = stop.changed() => return Ok(()),
            _ = tokio::time::sleep_until(deadline.into()) => {
                if created {
                    return Ok(());
                }
                return Err(format!("no created response within the time limit (start {start})").into());
            }
            r = s.read_buf(&mut buf) => r?,
        };
        if n == 0 {
            return Err("server closed the watch connection".into());
        }
        if head.is_none() {
            match http1::parse_head(&mut buf)? {
                None => continue,
                Some(h) => {
                    if h.status != 200 || !h.chunked {
                        return Err(format!(
                            "POST /v3/watch: status {}, chunked {}: {}",
                            h.status,
                            h.chunked,
                            String::from_utf8_lossy(&buf[..buf.len().min(200)])
                        )
                        .into());
                    }
                    head = Some(h);
                }
            }
        }
        chunked.decode(&mut buf, &mut lines)?;
        let mut consumed = 0;
        while let Some(nl) = lines[consumed..].iter().position(|b| *b == b'\n') {
            let line = &lines[consumed..consumed + nl];
            consumed += nl + 1;
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            let msg: JLine = serde_json::from_slice(line)
                .map_err(|e| format!("bad watch line ({e}): {}", String::from_utf8_lossy(line)))?;
            if let Some(err) = msg.error {
                return Err(format!("watch stream error: {err}").into());
            }
            let Some(w) = msg.result else {
                continue;
            };
            if w.created {
                if !created {
                    created = true;
                    if round == 0 {
                        track.created = true;
                        sh.created.fetch_add(1, Ordering::Relaxed);
                    } else {
                        sh.http_reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                }
                continue;
            }
            if w.canceled {
                return Err(format!(
                    "watch canceled (compact_revision {}, reason {:?})",
                    w.compact_revision, w.cancel_reason
                )
                .into());
            }
            if let Some(h) = &w.header {
                if let Some(prev) = track.on_header(h.revision) {
                    sh.note(format!(
                        "HTTP watch: header.revision went down from {prev} to {}",
                        h.revision
                    ));
                }
            }
            if w.events.is_empty() {
                // APISIX raises errors on a non-created response without events.
                track.bad += 1;
                continue;
            }
            let now = sh.now_ns();
            for ev in w.events {
                let Some(kv) = ev.kv else {
                    track.bad += 1;
                    continue;
                };
                let key_ok = B64
                    .decode(kv.key.as_bytes())
                    .is_ok_and(|k| k.starts_with(prefix));
                let put = ev.kind.as_ref().is_none_or(|k| k == "PUT" || k == 0);
                let val = kv.value.get(..44).and_then(|v| B64.decode(v).ok());
                match (key_ok && put, val.as_deref().and_then(decode_value)) {
                    (true, Some((seq, sent))) => {
                        let fresh = track.on_event(seq, kv.mod_revision);
                        local.event(sh, fresh, seq, sent, now);
                    }
                    _ => track.bad += 1,
                }
            }
            local.flush(sh, false);
        }
        lines.drain(..consumed);
        if chunked.done {
            return Err("server ended the watch stream".into());
        }
    }
}

// ---- Cold start: many full ranges of one prefix --------------------------------------

/// Result of the cold-start ranges.
pub struct ColdOutcome {
    pub hist: Hist,
    pub seconds: f64,
    pub ok: u64,
    pub errors: Vec<String>,
}

/// What a range answer says at its top level: all a cold-start range is checked against.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RangeSummary {
    /// header.revision (0 when absent).
    pub revision: i64,
    /// Entries of `kvs`.
    pub kvs: usize,
    pub more: bool,
    pub count: i64,
}

/// gRPC path of KV/Range.
const RANGE_PATH: &str = "/etcdserverpb.KV/Range";

/// Codec of the lean cold-start client: the RangeRequest is prost-encoded (etcd-fanout's
/// codec, as its generated `KvClient` does), the RangeResponse is kept as its raw bytes and
/// checked by [`walk_range_response`] without decoding the KeyValues.
#[derive(Debug, Clone, Copy, Default)]
struct RawRangeCodec;

/// Decoder half of [`RawRangeCodec`]: the whole message, without copying it.
#[derive(Debug, Clone, Copy, Default)]
struct RawDecoder;

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

impl Codec for RawRangeCodec {
    type Encode = RangeRequest;
    type Decode = Bytes;
    type Encoder = EtcdEncoder<RangeRequest>;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> EtcdEncoder<RangeRequest> {
        EtcdCodec::<RangeRequest, RangeResponse>::default().encoder()
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// One KV/Range call answered with the raw RangeResponse bytes.
async fn grpc_range_raw(grpc: &mut Grpc<Channel>, req: RangeRequest) -> Result<Bytes, Status> {
    grpc.ready()
        .await
        .map_err(|e| Status::unknown(format!("service was not ready: {e}")))?;
    grpc.unary(
        crate::auth::as_reader(req),
        PathAndQuery::from_static(RANGE_PATH),
        RawRangeCodec,
    )
    .await
    .map(|r| r.into_inner())
}

/// Reads a base-128 varint from the front of `b`.
fn read_varint(b: &mut &[u8]) -> Result<u64, String> {
    let mut v = 0u64;
    for i in 0..10 {
        let Some((&byte, rest)) = b.split_first() else {
            return Err("truncated varint".into());
        };
        *b = rest;
        if i == 9 && byte > 1 {
            return Err("varint overflows 64 bits".into());
        }
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes".into())
}

/// Reads a field key: (field number, wire type).
fn read_key(b: &mut &[u8]) -> Result<(u32, u8), String> {
    let k = read_varint(b)?;
    let field = u32::try_from(k >> 3).map_err(|_| format!("field number {} too large", k >> 3))?;
    if field == 0 {
        return Err("field number 0".into());
    }
    Ok((field, (k & 7) as u8))
}

/// Takes `n` bytes from the front of `b`.
fn take<'a>(b: &mut &'a [u8], n: u64) -> Result<&'a [u8], String> {
    let n = usize::try_from(n)
        .ok()
        .filter(|n| *n <= b.len())
        .ok_or_else(|| format!("truncated: {n} bytes announced, {} left", b.len()))?;
    let (head, rest) = b.split_at(n);
    *b = rest;
    Ok(head)
}

/// Takes a length-delimited field's payload from the front of `b`.
fn take_delimited<'a>(b: &mut &'a [u8]) -> Result<&'a [u8], String> {
    let n = read_varint(b)?;
    take(b, n)
}

/// Skips the value of field `field` of wire type `wire` (groups included, nested at most
/// 32 deep).
fn skip_field(b: &mut &[u8], field: u32, wire: u8, depth: u32) -> Result<(), String> {
    match wire {
        0 => read_varint(b).map(drop),
        1 => take(b, 8).map(drop),
        2 => take_delimited(b).map(drop),
        5 => take(b, 4).map(drop),
        3 => {
            if depth >= 32 {
                return Err("groups nested too deep".into());
            }
            // Bounded: every field read consumes at least one byte of `b`.
            loop {
                let (f, w) = read_key(b)?;
                if w == 4 {
                    if f == field {
                        return Ok(());
                    }
                    return Err(format!("group {field} closed by end group {f}"));
                }
                skip_field(b, f, w, depth + 1)?;
            }
        }
        4 => Err(format!("unexpected end group {field}")),
        _ => Err(format!("field {field} has invalid wire type {wire}")),
    }
}

/// header.revision (field 3) of an encoded ResponseHeader, when present.
fn header_revision(mut b: &[u8]) -> Result<Option<i64>, String> {
    let mut rev = None;
    while !b.is_empty() {
        match read_key(&mut b)? {
            (3, 0) => rev = Some(read_varint(&mut b)? as i64),
            (3, w) => return Err(format!("header.revision has wire type {w}")),
            (f, w) => skip_field(&mut b, f, w, 0)?,
        }
    }
    Ok(rev)
}

/// Walks the top-level fields of an encoded RangeResponse: header (1, only its revision is
/// read), kvs (2, entries counted, not decoded), more (3), count (4); unknown fields are
/// skipped. Malformed or truncated input is an error.
pub fn walk_range_response(mut b: &[u8]) -> Result<RangeSummary, String> {
    let mut s = RangeSummary::default();
    while !b.is_empty() {
        let (field, wire) = read_key(&mut b)?;
        match (field, wire) {
            (1, 2) => {
                // Repeated occurrences of a message field merge: a later revision wins.
                if let Some(rev) = header_revision(take_delimited(&mut b)?)? {
                    s.revision = rev;
                }
            }
            (2, 2) => {
                take_delimited(&mut b)?;
                s.kvs += 1;
            }
            (3, 0) => s.more = read_varint(&mut b)? != 0,
            (4, 0) => s.count = read_varint(&mut b)? as i64,
            (1..=4, _) => return Err(format!("field {field} has wire type {wire}")),
            _ => skip_field(&mut b, field, wire, 0)?,
        }
    }
    Ok(s)
}

/// The summary of a decoded RangeResponse.
fn summarize(r: &RangeResponse) -> RangeSummary {
    RangeSummary {
        revision: r.header.as_ref().map_or(0, |h| h.revision),
        kvs: r.kvs.len(),
        more: r.more,
        count: r.count,
    }
}

/// Checks one cold-start answer: `expect` keys, count = `expect`, no more, a positive
/// header.revision equal to that of every other answer of the run (`run_rev`, 0 until the
/// first one; the prefix does not change during the cold phase).
fn check_range(s: &RangeSummary, expect: usize, run_rev: &AtomicI64) -> Result<(), String> {
    if s.kvs != expect {
        return Err(format!("range returned {} keys, expected {expect}", s.kvs));
    }
    if s.count != expect as i64 {
        return Err(format!("range count {}, expected {expect}", s.count));
    }
    if s.more {
        return Err("range says more = true".into());
    }
    if s.revision <= 0 {
        return Err(format!("range header.revision {}", s.revision));
    }
    match run_rev.compare_exchange(0, s.revision, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => Ok(()),
        Err(first) if first == s.revision => Ok(()),
        Err(first) => Err(format!(
            "range header.revision {} differs from {first} of an earlier range",
            s.revision
        )),
    }
}

/// `n` full ranges of `prefix` with `conc` concurrent clients over `chans` (gRPC) or over
/// HTTP/JSON at `http` when given; each must return `expect` keys (see [`check_range`]).
///
/// By default the answers are checked lean: gRPC answers walked as raw protobuf
/// ([`walk_range_response`]), HTTP/JSON ones read into reused buffers and a struct that
/// skips over the kvs. With `full_decode`, gRPC answers are decoded into `RangeResponse`
/// (every KeyValue) and HTTP ones read as before ([`http_range_full`]), for older figures.
/// Both check the same things, identically for every target.
#[allow(clippy::too_many_arguments)]
pub async fn cold_ranges(
    chans: &[Channel],
    http: Option<SocketAddr>,
    prefix: Bytes,
    n: u64,
    conc: usize,
    expect: usize,
    serializable: bool,
    full_decode: bool,
    timeout: Duration,
) -> ColdOutcome {
    let next = Arc::new(AtomicU64::new(0));
    let run_rev = Arc::new(AtomicI64::new(0));
    let deadline = Instant::now() + timeout;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..conc.max(1) {
        let ch = chans[i % chans.len()].clone();
        let (next, run_rev, prefix) = (next.clone(), run_rev.clone(), prefix.clone());
        tasks.push(tokio::spawn(async move {
            let mut kv = KvClient::new(ch.clone()).max_decoding_message_size(256 << 20);
            let mut grpc = Grpc::new(ch).max_decoding_message_size(256 << 20);
            let req = RangeRequest {
                key: prefix.clone(),
                range_end: prefix_end(&prefix),
                serializable,
                ..Default::default()
            };
            let mut bufs = http1::Bufs::default();
            let mut h = Hist::default();
            let mut errs = Vec::new();
            let mut ok = 0u64;
            while next.fetch_add(1, Ordering::Relaxed) < n && Instant::now() < deadline {
                let t = Instant::now();
                let got: Result<RangeSummary, BoxError> = match (http, full_decode) {
                    (Some(addr), false) => {
                        http_range_lean(addr, &prefix, serializable, &mut bufs).await
                    }
                    (Some(addr), true) => http_range_full(addr, &prefix, serializable).await,
                    (None, false) => grpc_range_raw(&mut grpc, req.clone())
                        .await
                        .map_err(|s| s.to_string().into())
                        .and_then(|b| {
                            walk_range_response(&b)
                                .map_err(|e| format!("malformed RangeResponse: {e}").into())
                        }),
                    (None, true) => kv
                        .range(crate::auth::as_reader(req.clone()))
                        .await
                        .map(|r| summarize(&r.into_inner()))
                        .map_err(|s| s.to_string().into()),
                };
                match got {
                    Ok(s) => match check_range(&s, expect, &run_rev) {
                        Ok(()) => {
                            ok += 1;
                            h.record(t.elapsed().as_micros() as u64);
                        }
                        Err(e) => errs.push(e),
                    },
                    Err(e) => errs.push(format!("range: {e}")),
                }
                if errs.len() > 20 {
                    break;
                }
            }
            (h, ok, errs)
        }));
    }
    let mut out = ColdOutcome {
        hist: Hist::default(),
        seconds: 0.0,
        ok: 0,
        errors: Vec::new(),
    };
    for t in tasks {
        match t.await {
            Ok((h, ok, errs)) => {
                out.hist.merge(&h);
                out.ok += ok;
                out.errors.extend(errs);
            }
            Err(e) => out.errors.push(format!("range task: {e}")),
        }
    }
    out.seconds = t0.elapsed().as_secs_f64();
    if out.ok < n {
        out.errors
            .push(format!("only {} of {n} ranges completed", out.ok));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_round_trip() {
        let v = encode_value(42, 123_456_789, 256);
        assert_eq!(v.len(), 256);
        assert_eq!(decode_value(&v), Some((42, 123_456_789)));
        let b = B64.encode(&v);
        let back = B64.decode(&b[..44]).unwrap();
        assert_eq!(decode_value(&back), Some((42, 123_456_789)));
    }

    /// `resp` encoded by prost (etcd-fanout's encoder of range answers).
    fn encode_range(resp: RangeResponse) -> Vec<u8> {
        let mut buf = Vec::new();
        etcd_fanout::kv::RangeAnswer::Forwarded(resp)
            .encode_to(&mut buf)
            .unwrap();
        buf
    }

    #[test]
    fn walks_range_response_fields() {
        use etcd_fanout::proto::etcdserverpb::ResponseHeader;
        use etcd_fanout::proto::mvccpb::KeyValue;
        let kvs: Vec<KeyValue> = (0..3)
            .map(|i| KeyValue {
                key: Bytes::from(format!("/cold/{i}")),
                create_revision: 2 + i,
                mod_revision: 2 + i,
                version: 1,
                value: Bytes::from(vec![b'x'; 300]),
                lease: 0,
            })
            .collect();
        let resp = RangeResponse {
            header: Some(ResponseHeader {
                cluster_id: u64::MAX,
                member_id: 7,
                revision: 1004,
                raft_term: 2,
            }),
            kvs,
            more: true,
            count: 3,
        };
        let want = RangeSummary {
            revision: 1004,
            kvs: 3,
            more: true,
            count: 3,
        };
        let mut wire = encode_range(resp.clone());
        assert_eq!(walk_range_response(&wire), Ok(want));
        assert_eq!(summarize(&resp), want);

        // Unknown fields of every wire type, a group among them, are skipped.
        // Field numbers up to 15 keep each key one byte.
        wire.extend_from_slice(&[11 << 3, 0x96, 0x01]); // 11: varint 150
        wire.extend_from_slice(&[(12 << 3) | 2, 3, b'a', b'b', b'c']); // 12: 3 bytes
        wire.extend_from_slice(&[(13 << 3) | 5, 1, 2, 3, 4]); // 13: fixed32
        wire.extend_from_slice(&[(14 << 3) | 1, 1, 2, 3, 4, 5, 6, 7, 8]); // 14: fixed64
                                                                          // 15: a group holding field 1 (varint) and a nested, empty group 2; then its end.
        wire.extend_from_slice(&[(15 << 3) | 3, 1 << 3, 5, (2 << 3) | 3, (2 << 3) | 4]);
        wire.extend_from_slice(&[(15 << 3) | 4]);
        // A two-byte key: field 300, varint 1.
        wire.extend_from_slice(&[0xe0, 0x12, 1]);
        assert_eq!(walk_range_response(&wire), Ok(want));

        // A later header merges in: its revision wins; one without a revision keeps it.
        let mut twice = wire.clone();
        twice.extend_from_slice(&[(1 << 3) | 2, 3, 3 << 3, 0xee, 0x07]); // revision 1006
        twice.extend_from_slice(&[(1 << 3) | 2, 2, 1 << 3, 9]); // cluster_id only
        assert_eq!(walk_range_response(&twice).map(|s| s.revision), Ok(1006));

        // Defaults are not on the wire: no header, no kvs, more false, count 0.
        assert_eq!(
            walk_range_response(&encode_range(RangeResponse::default())),
            Ok(RangeSummary::default())
        );

        // Truncated anywhere: never a panic; inside a field, an error.
        for cut in 0..wire.len() {
            let _ = walk_range_response(&wire[..cut]);
        }
        assert!(walk_range_response(&wire[..wire.len() - 1]).is_err());
        assert!(walk_range_response(&wire[..wire.len() / 2]).is_err());
        let no_unknown = encode_range(resp);
        assert!(walk_range_response(&no_unknown[..no_unknown.len() - 1]).is_err());
        assert!(walk_range_response(&no_unknown[..5]).is_err());

        // Malformed input.
        let ff9 = [0xffu8; 9];
        let bad: Vec<(&str, Vec<u8>)> = vec![
            ("truncated length varint", vec![(2 << 3) | 2, 0x80]),
            ("huge length", [&[(2 << 3) | 2][..], &ff9, &[0x01]].concat()),
            (
                "varint over 64 bits",
                [&[10 << 3][..], &ff9, &[0x7f]].concat(),
            ),
            (
                "varint over 10 bytes",
                [&[10 << 3][..], &ff9, &[0x80, 0]].concat(),
            ),
            ("kvs as a varint", vec![2 << 3, 1]),
            ("count as bytes", vec![(4 << 3) | 2, 0]),
            (
                "header.revision as bytes",
                vec![(1 << 3) | 2, 2, (3 << 3) | 2, 0],
            ),
            ("wire type 6", vec![(10 << 3) | 6]),
            ("end group without start", vec![(10 << 3) | 4]),
            ("group never ended", vec![(10 << 3) | 3, 1 << 3, 1]),
            ("group ended by another", vec![(10 << 3) | 3, (9 << 3) | 4]),
            ("field number 0", vec![0x00, 0x00]),
        ];
        for (what, b) in bad {
            assert!(walk_range_response(&b).is_err(), "{what}");
        }
    }

    #[test]
    fn range_checks() {
        let rev = AtomicI64::new(0);
        let good = RangeSummary {
            revision: 1001,
            kvs: 1000,
            more: false,
            count: 1000,
        };
        assert_eq!(check_range(&good, 1000, &rev), Ok(()));
        assert_eq!(rev.load(Ordering::Relaxed), 1001);
        assert_eq!(check_range(&good, 1000, &rev), Ok(()));
        for s in [
            RangeSummary { kvs: 999, ..good },
            RangeSummary { count: 999, ..good },
            RangeSummary { more: true, ..good },
            RangeSummary {
                revision: 0,
                ..good
            },
            RangeSummary {
                revision: 1002,
                ..good
            },
        ] {
            assert!(check_range(&s, 1000, &rev).is_err(), "{s:?}");
        }
    }

    #[test]
    fn lean_json_range() {
        let body = br#"{"header":{"cluster_id":"1","member_id":"2","revision":"1001","raft_term":"2"},"kvs":[{"key":"YQ==","create_revision":"2","mod_revision":"2","version":"1","value":"Yg=="},{"key":"Yw==","value":"ZA=="}],"count":"2"}"#;
        let r: LeanRange = serde_json::from_slice(body).unwrap();
        assert_eq!(
            (r.header.revision, r.kvs.len(), r.count, r.more),
            (1001, 2, 2, false)
        );
        let r: LeanRange =
            serde_json::from_slice(br#"{"header":{"revision":7},"count":3,"more":true}"#).unwrap();
        assert_eq!(
            (r.header.revision, r.kvs.len(), r.count, r.more),
            (7, 0, 3, true)
        );
        assert!(serde_json::from_slice::<LeanRange>(br#"{"kvs":[{"key":"YQ=="}"#).is_err());
        assert!(serde_json::from_slice::<LeanRange>(br#"{"count":"x"}"#).is_err());
        let full: JRange = serde_json::from_slice(body).unwrap();
        assert_eq!((full.kvs.len(), full.count, full.more), (2, 2, false));
    }

    #[test]
    fn track_counts_gaps_duplicates_and_replays() {
        let mut t = Track::new(0, 0);
        assert!(t.on_event(0, 10));
        assert!(t.on_event(1, 11));
        assert!(!t.on_event(1, 11)); // duplicate, and revision not increasing
        assert_eq!(t.duplicated, 1);
        assert_eq!(t.out_of_order, 1);
        assert!(t.on_event(3, 13)); // skipped 2
        assert_eq!(t.out_of_order, 2);
        assert_eq!(t.missing(4), 1);
        // A new stream replaying from seq 1 is fine.
        t.begin_segment(1);
        assert!(!t.on_event(1, 11));
        assert!(t.on_event(2, 12));
        assert!(!t.on_event(3, 13));
        assert_eq!((t.duplicated, t.out_of_order), (1, 2));
        assert_eq!(t.missing(4), 0);
        // An event before the segment's start is out of order.
        t.begin_segment(4);
        t.on_event(3, 13);
        assert_eq!(t.out_of_order, 3);
    }

    #[test]
    fn filtered_tracks_skip_what_they_do_not_see() {
        use crate::layout::{Filter, Shape};
        let writes = Writes {
            delete_every: 3,
            keys: 10,
        };
        // NODELETE: writes 0, 1, 3, 4 (2 and 5 are deletes).
        let mut t = Track::shaped(
            0,
            0,
            Shape {
                filter: Filter::NoDelete,
                prev_kv: false,
            },
            writes,
        );
        assert!(t.on_event(0, 10));
        assert!(t.on_event(1, 11));
        assert!(t.on_event(3, 13));
        assert_eq!((t.out_of_order, t.bad), (0, 0));
        assert!(!t.on_event(5, 15)); // a delete it filtered out
        assert_eq!(t.bad, 1);
        assert_eq!(t.expected(6), 4);
        assert_eq!(t.missing(6), 1); // write 4
                                     // NOPUT: only the deletes, claimed in order and checked against the revisions.
        let mut d = Track::shaped(
            0,
            0,
            Shape {
                filter: Filter::NoPut,
                prev_kv: true,
            },
            writes,
        );
        assert_eq!(d.claim_delete(12), Some(2));
        assert!(d.on_event(2, 12));
        assert_eq!(d.claim_delete(15), Some(5));
        assert!(d.on_event(5, 15));
        assert_eq!(d.missing(6), 0);
        let revs = [10, 11, 12, 13, 14, 16];
        assert_eq!(d.verify_claims(&revs), 1); // write 5 was at revision 16
        assert_eq!(d.out_of_order, 1);
        // A put-only track never claims a delete.
        let mut p = Track::shaped(0, 0, Shape::PLAIN, writes);
        assert_eq!(p.claim_delete(10), None);
    }
}
