//! The delivery checker of the fault tests.
//!
//! Every downstream watch a test opens through the proxy records what it received in a
//! [`WatchLog`] (events as `(revision, key, type, value)`, cancels, stream errors and protocol
//! violations noticed on the way: a second `created`, a header revision going backwards, a
//! revision split over two responses, an unsolicited empty response, anything after a cancel).
//! After the run, [`check`] compares each log with etcd's own history for the watch's key
//! range ([`History`]: recorded by a direct etcd watch from revision 1 that runs for the whole
//! test, see [`Recorder`], or fetched once at the end when nothing was compacted). The rule:
//!
//! * the events received are exactly etcd's events for the range from the watch's start
//!   revision, in etcd's order, each once, with no gap: a prefix of the expected list;
//! * and either the list is complete up to the revision the test waited for, or the watch was
//!   cancelled the way etcd cancels: `canceled` with `compact_revision` C > 0 where the next
//!   revision the watch needed is below C and C is a compaction the test made, and nothing
//!   arrived for that watch afterwards.
//!
//! A logical watch may span several downstream watches (a client reconnecting with
//! `start_revision` = last seen + 1): the log concatenates them and the same rule applies. A
//! watch the client closed early ([`WatchLog::left`]) must be an exact prefix, not complete.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_fanout::proto::etcdserverpb::{
    watch_client::WatchClient, watch_request::RequestUnion, RangeRequest, WatchCreateRequest,
    WatchRequest, WatchResponse,
};
use etcd_fanout::proto::mvccpb::Event;
use tokio::sync::watch;

/// One event as the checker compares it.
#[derive(Clone, PartialEq, Eq)]
pub struct Ev {
    /// mod_revision.
    pub rev: i64,
    /// Key.
    pub key: Bytes,
    /// True for PUT, false for DELETE.
    pub put: bool,
    /// Value (empty for DELETE).
    pub value: Bytes,
}

impl Ev {
    /// From a wire event.
    pub fn from_proto(e: &Event) -> Ev {
        let kv = e.kv.clone().unwrap_or_default();
        Ev {
            rev: kv.mod_revision,
            key: kv.key,
            put: e.r#type == 0,
            value: kv.value,
        }
    }
}

impl fmt::Debug for Ev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = String::from_utf8_lossy(&self.value);
        let v: String = v.chars().take(24).collect();
        write!(
            f,
            "{}:{} {}={}",
            self.rev,
            if self.put { "PUT" } else { "DEL" },
            String::from_utf8_lossy(&self.key),
            v
        )
    }
}

/// True when `key` is in etcd's range `[start, end)` (`end` empty: the single key `start`;
/// `end` = `\0`: every key from `start`).
pub fn in_range(start: &[u8], end: &[u8], key: &[u8]) -> bool {
    if end.is_empty() {
        key == start
    } else if end == [0] {
        key >= start
    } else {
        key >= start && key < end
    }
}

/// etcd's history: every event in order, and the compactions the test made.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// All events of every key, in etcd's order (revision, then position in the txn).
    pub events: Vec<Ev>,
    /// Compaction revisions the test asked for.
    pub compactions: Vec<i64>,
}

impl History {
    /// etcd's events in `[key, range_end)` with revision in `[from, until]`.
    pub fn expected(&self, key: &[u8], range_end: &[u8], from: i64, until: i64) -> Vec<Ev> {
        self.events
            .iter()
            .filter(|e| e.rev >= from && e.rev <= until && in_range(key, range_end, &e.key))
            .cloned()
            .collect()
    }

    /// The newest revision in the history.
    pub fn last_rev(&self) -> i64 {
        self.events.last().map_or(0, |e| e.rev)
    }

    /// Reads the whole history of etcd at `url` with a watch from revision 1 on every key,
    /// up to revision `until` (call before anything is compacted).
    pub async fn fetch(url: &str, until: i64) -> Result<History, String> {
        let ch = tonic::transport::Endpoint::from_shared(url.to_string())
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("history: connect {url}: {e}"))?;
        let mut client = WatchClient::new(ch).max_decoding_message_size(usize::MAX);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let _ = tx.send(create_all(1));
        let mut stream = client
            .watch(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
            .map_err(|e| format!("history: watch: {e}"))?
            .into_inner();
        let mut events = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while events.last().map_or(0, |e: &Ev| e.rev) < until && until > 1 {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, stream.message())
                .await
                .map_err(|_| format!("history: timed out at {} of {until}", events.len()))?
                .map_err(|e| format!("history: {e}"))?
                .ok_or("history: stream ended")?;
            if msg.canceled {
                return Err(format!(
                    "history: watch from 1 canceled (compact_revision {})",
                    msg.compact_revision
                ));
            }
            events.extend(msg.events.iter().map(Ev::from_proto));
        }
        events.retain(|e| e.rev <= until);
        Ok(History {
            events,
            compactions: Vec::new(),
        })
    }
}

fn create_all(start: i64) -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            start_revision: start,
            ..Default::default()
        })),
    }
}

/// etcd's current revision (a linearizable Range on `url`), retried for up to 20 s.
pub async fn etcd_revision(url: &str) -> Result<i64, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    while Instant::now() < deadline {
        let attempt = async {
            let ch = tonic::transport::Endpoint::from_shared(url.to_string())
                .map_err(|e| e.to_string())?
                .connect_timeout(Duration::from_secs(1))
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            let mut kv = etcd_fanout::proto::etcdserverpb::kv_client::KvClient::new(ch);
            let r = kv
                .range(RangeRequest {
                    key: Bytes::from_static(b"\0etcd-fanout-test/rev"),
                    count_only: true,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(r.into_inner().header.map_or(0, |h| h.revision))
        };
        match tokio::time::timeout(Duration::from_secs(3), attempt).await {
            Ok(Ok(r)) => return Ok(r),
            Ok(Err(e)) => last = e,
            Err(_) => last = "timeout".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("etcd revision on {url}: {last}"))
}

/// A direct etcd watch on every key from revision 1 that runs for the whole test and records
/// etcd's history, resuming from the next revision after any failure (on any of `urls`).
/// Before the test compacts at C it waits for the recorder to reach C, so nothing it still
/// needs is ever compacted.
pub struct Recorder {
    events: Arc<Mutex<Vec<Ev>>>,
    compactions: Arc<Mutex<Vec<i64>>>,
    stop: watch::Sender<bool>,
}

impl Recorder {
    /// Starts recording from revision 1.
    pub fn spawn(urls: Vec<String>) -> Recorder {
        let events = Arc::new(Mutex::new(Vec::<Ev>::new()));
        let (stop, mut stop_rx) = watch::channel(false);
        let ev = events.clone();
        tokio::spawn(async move {
            let mut attempt = 0usize;
            loop {
                if *stop_rx.borrow() {
                    return;
                }
                let url = urls[attempt % urls.len()].clone();
                attempt += 1;
                let from = ev.lock().unwrap().last().map_or(1, |e| e.rev + 1);
                let run = async {
                    let ch = tonic::transport::Endpoint::from_shared(url)
                        .map_err(|e| e.to_string())?
                        .connect_timeout(Duration::from_secs(1))
                        .connect()
                        .await
                        .map_err(|e| e.to_string())?;
                    let mut client = WatchClient::new(ch).max_decoding_message_size(usize::MAX);
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    let _ = tx.send(create_all(from));
                    let mut stream = client
                        .watch(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
                        .await
                        .map_err(|e| e.to_string())?
                        .into_inner();
                    while let Some(msg) = stream.message().await.map_err(|e| e.to_string())? {
                        if msg.canceled {
                            // Never expected: the test compacts only what was recorded.
                            panic!(
                                "history recorder canceled (compact_revision {}): the test \
                                 compacted history it had not recorded yet",
                                msg.compact_revision
                            );
                        }
                        let mut ev = ev.lock().unwrap();
                        let last = ev.last().map_or(0, |e| e.rev);
                        ev.extend(
                            msg.events
                                .iter()
                                .map(Ev::from_proto)
                                .filter(|e| e.rev > last),
                        );
                    }
                    drop(tx);
                    Ok::<(), String>(())
                };
                tokio::select! {
                    _ = run => {}
                    _ = stop_rx.changed() => return,
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Recorder {
            events,
            compactions: Arc::new(Mutex::new(Vec::new())),
            stop,
        }
    }

    /// The newest revision recorded.
    pub fn last_rev(&self) -> i64 {
        self.events.lock().unwrap().last().map_or(0, |e| e.rev)
    }

    /// Waits until the recorder has every event up to `rev`.
    pub async fn wait_for(&self, rev: i64, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while rev > 1 && self.last_rev() < rev {
            if Instant::now() > deadline {
                return Err(format!(
                    "history recorder at {} after {timeout:?}, wanted {rev}",
                    self.last_rev()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Notes a compaction the test made.
    pub fn compacted(&self, rev: i64) {
        self.compactions.lock().unwrap().push(rev);
    }

    /// The history recorded so far.
    pub fn history(&self) -> History {
        History {
            events: self.events.lock().unwrap().clone(),
            compactions: self.compactions.lock().unwrap().clone(),
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// How a watch ended with a cancel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cancel {
    /// `compact_revision` of the cancel response.
    pub compact_revision: i64,
    /// `cancel_reason`.
    pub reason: String,
    /// The revision the watch needed next when it was cancelled.
    pub next: i64,
    /// The cancel response's header revision.
    pub header_revision: i64,
    /// Whether it was a refusal (`created` and `canceled` at once).
    pub created: bool,
}

/// Everything one logical downstream watch received.
#[derive(Clone, Debug, Default)]
pub struct WatchLog {
    /// Name for messages.
    pub name: String,
    /// Watched range.
    pub key: Bytes,
    /// Watched range end.
    pub range_end: Bytes,
    /// True when the watch asked for progress notifications.
    pub progress_notify: bool,
    /// The first revision this watch wants (set at its first `created` when it asked for 0).
    pub start: i64,
    /// Events received, in arrival order (over every reconnection).
    pub events: Vec<Ev>,
    /// Downstream watches created (1 + reconnections).
    pub segments: u32,
    /// The cancel that ended it, if any.
    pub cancel: Option<Cancel>,
    /// Responses received for the watch after its cancel.
    pub after_cancel: u32,
    /// Stream errors and ends (expected around faults; the client reconnects).
    pub errors: Vec<String>,
    /// Protocol violations seen while receiving (the first few).
    pub violations: Vec<String>,
    /// Protocol violations seen in total.
    pub violations_total: u64,
    /// Highest header revision seen (over every reconnection).
    pub max_header: i64,
    /// Responses received.
    pub responses: u64,
    /// Empty, non-created responses received (progress notifications).
    pub progress: u64,
    /// When the newest event arrived.
    pub last_event_at: Option<Instant>,
    /// The client closed the watch before the end of the test: it need not be complete.
    pub left: bool,
}

impl WatchLog {
    /// A log for a watch on `[key, range_end)` from `start` (0: from now).
    pub fn new(name: impl Into<String>, key: Bytes, range_end: Bytes, start: i64) -> WatchLog {
        WatchLog {
            name: name.into(),
            key,
            range_end,
            start,
            ..Default::default()
        }
    }

    /// The revision the watch needs next (0 while unknown: start 0 and not created yet).
    pub fn next(&self) -> i64 {
        self.events.last().map_or(self.start, |e| e.rev + 1)
    }

    /// True once cancelled.
    pub fn is_canceled(&self) -> bool {
        self.cancel.is_some()
    }

    /// Revision of the newest event received (0 if none).
    pub fn last_rev(&self) -> i64 {
        self.events.last().map_or(0, |e| e.rev)
    }

    /// Records a protocol violation (the first few verbatim, then only counted).
    pub fn violation(&mut self, what: String) {
        self.violations_total += 1;
        if self.violations.len() < 3 {
            self.violations.push(what);
        }
    }

    fn header_rev(resp: &WatchResponse) -> i64 {
        resp.header.as_ref().map_or(0, |h| h.revision)
    }

    /// Records a `created` response (`seen_created`: this downstream watch already had one).
    pub fn on_created(&mut self, resp: &WatchResponse, seen_created: bool) {
        self.responses += 1;
        if self.cancel.is_some() {
            self.after_cancel += 1;
            return;
        }
        let h = Self::header_rev(resp);
        if seen_created {
            self.violation(format!(
                "second `created` for watch id {} (header {h})",
                resp.watch_id
            ));
            return;
        }
        self.segments += 1;
        if resp.canceled {
            self.cancel = Some(Cancel {
                compact_revision: resp.compact_revision,
                reason: resp.cancel_reason.clone(),
                next: self.next(),
                header_revision: h,
                created: true,
            });
            return;
        }
        if h < self.max_header {
            self.violation(format!(
                "`created` (segment {}) has header.revision {h} below {} already seen",
                self.segments, self.max_header
            ));
        }
        self.max_header = self.max_header.max(h);
        if self.start == 0 {
            self.start = h + 1;
        }
        if !resp.events.is_empty() {
            self.violation(format!("`created` carries {} events", resp.events.len()));
        }
    }

    /// Records any other response for this watch.
    pub fn on_response(&mut self, resp: &WatchResponse) {
        self.responses += 1;
        if self.cancel.is_some() {
            self.after_cancel += 1;
            return;
        }
        let h = Self::header_rev(resp);
        if resp.canceled {
            self.cancel = Some(Cancel {
                compact_revision: resp.compact_revision,
                reason: resp.cancel_reason.clone(),
                next: self.next(),
                header_revision: h,
                created: false,
            });
            return;
        }
        if h < self.max_header {
            self.violation(format!(
                "header.revision went back from {} to {h} (response with {} events)",
                self.max_header,
                resp.events.len()
            ));
        }
        self.max_header = self.max_header.max(h);
        if resp.events.is_empty() {
            self.progress += 1;
            if !self.progress_notify && !resp.fragment {
                self.violation(format!(
                    "unsolicited empty response (header {h}) on a watch without progress_notify"
                ));
            }
            return;
        }
        let first = resp.events[0].kv.as_ref().map_or(0, |kv| kv.mod_revision);
        let max = resp
            .events
            .iter()
            .filter_map(|e| e.kv.as_ref().map(|kv| kv.mod_revision))
            .max()
            .unwrap_or(0);
        if h < max {
            self.violation(format!(
                "header.revision {h} below the event revision {max} it carries"
            ));
        }
        if first == self.last_rev() && !resp.fragment {
            self.violation(format!(
                "events of revision {first} split over two responses"
            ));
        }
        self.events.extend(resp.events.iter().map(Ev::from_proto));
        self.last_event_at = Some(Instant::now());
    }

    /// Records a stream error or end.
    pub fn on_error(&mut self, what: String) {
        if self.errors.len() < 50 {
            self.errors.push(what);
        }
    }
}

/// How a checked watch ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every revision up to the target, exactly once, in order.
    Complete,
    /// A legal compaction cancel after an exact prefix.
    Canceled {
        /// The compact_revision reported.
        compact_revision: i64,
    },
}

/// Checks one log against `hist`: exact in-order prefix of etcd's events for its range from
/// its start, complete up to `until` unless cancelled the way etcd cancels (see module doc).
pub fn check(log: &WatchLog, hist: &History, until: i64) -> Result<Outcome, String> {
    let name = &log.name;
    let mut problems = Vec::new();
    for v in &log.violations {
        problems.push(format!("protocol: {v}"));
    }
    if log.violations_total > log.violations.len() as u64 {
        problems.push(format!(
            "{} protocol violations in total",
            log.violations_total
        ));
    }
    if log.start <= 0 && log.left && log.events.is_empty() && problems.is_empty() {
        // The client left before its `created` arrived (e.g. while the proxy restarted).
        return Ok(Outcome::Complete);
    }
    if log.start <= 0 {
        return Err(format!(
            "{name}: never created (errors: {:?})",
            &log.errors[..log.errors.len().min(3)]
        ));
    }
    let mut all = hist.expected(&log.key, &log.range_end, log.start, i64::MAX);
    let got = &log.events;
    if hist.compactions.contains(&log.start) {
        // A compaction at C removes the tombstones of deletes made at C, so etcd 3.4.23's watch
        // from C has C's puts but not its deletes (checked with etcdctl: put, del at 4, compact
        // 4, `watch --rev 4` shows only the put). etcd removes them in the background, so right
        // after a non-physical compaction (or before the proxy has learnt of a compaction made
        // on etcd directly) the deletes are still replayed: either is accepted.
        let served_delete = got.iter().any(|e| e.rev == log.start && !e.put);
        if !served_delete {
            all.retain(|e| e.rev != log.start || e.put);
        }
    }
    if let Some(i) = (0..got.len()).find(|&i| all.get(i) != Some(&got[i])) {
        problems.push(describe_mismatch(&all, got, i));
    }
    let outcome = match &log.cancel {
        Some(c) => {
            let known: BTreeSet<i64> = hist.compactions.iter().copied().collect();
            if c.compact_revision <= 0 {
                problems.push(format!(
                    "cancelled without compact_revision (reason {:?}, created {}): etcd never \
                     cancels a valid watch on its own",
                    c.reason, c.created
                ));
            } else {
                if c.next >= c.compact_revision {
                    problems.push(format!(
                        "cancelled with compact_revision {} although the next revision it needed \
                         ({}) is not compacted (etcd cancels only when next < compact_revision)",
                        c.compact_revision, c.next
                    ));
                }
                if !known.contains(&c.compact_revision) {
                    problems.push(format!(
                        "compact_revision {} is no compaction the test made ({known:?})",
                        c.compact_revision
                    ));
                }
            }
            if log.after_cancel > 0 {
                problems.push(format!(
                    "{} responses arrived after the cancel",
                    log.after_cancel
                ));
            }
            Outcome::Canceled {
                compact_revision: c.compact_revision,
            }
        }
        None => {
            let want = all.iter().filter(|e| e.rev <= until).count();
            if got.len() < want && problems.is_empty() && !log.left {
                let missing: Vec<&Ev> = all[got.len()..want].iter().take(3).collect();
                problems.push(format!(
                    "incomplete: {} of {want} events up to revision {until} (next needed {}, \
                     first missing {missing:?}; stream errors: {:?})",
                    got.len(),
                    log.next(),
                    &log.errors[log.errors.len().saturating_sub(3)..]
                ));
            }
            Outcome::Complete
        }
    };
    if problems.is_empty() {
        Ok(outcome)
    } else {
        Err(format!(
            "{name} [{}..{}) from {} ({} segments, {} events): {}",
            String::from_utf8_lossy(&log.key),
            String::from_utf8_lossy(&log.range_end).escape_debug(),
            log.start,
            log.segments,
            got.len(),
            problems.join("; ")
        ))
    }
}

fn describe_mismatch(want: &[Ev], got: &[Ev], i: usize) -> String {
    let lo = i.saturating_sub(2);
    let w: Vec<&Ev> = want.iter().skip(lo).take(5).collect();
    let g: Vec<&Ev> = got.iter().skip(lo).take(5).collect();
    let kind = match (want.get(i), got.get(i)) {
        (None, Some(_)) => "an event etcd does not have for this range".to_string(),
        (Some(w), Some(g)) if g.rev < w.rev => {
            if got[..i].iter().any(|e| e == g) {
                format!("duplicate: revision {} delivered again", g.rev)
            } else {
                format!(
                    "out of order or foreign: got revision {} before {}",
                    g.rev, w.rev
                )
            }
        }
        (Some(w), Some(g)) if g.rev > w.rev => {
            format!("gap: revision {} skipped (got {} instead)", w.rev, g.rev)
        }
        _ => "different content at the same revision".to_string(),
    };
    format!("mismatch at event #{i}: {kind}; expected {w:?}, received {g:?}")
}

/// Checks every log and returns one line per failing log (empty when all pass), plus the
/// outcomes.
pub fn check_all(
    logs: &[Arc<Mutex<WatchLog>>],
    hist: &History,
    until: i64,
) -> (Vec<String>, Vec<Outcome>) {
    let mut errs = Vec::new();
    let mut outs = Vec::new();
    for l in logs {
        let l = l.lock().unwrap();
        match check(&l, hist, until) {
            Ok(o) => outs.push(o),
            Err(e) => errs.push(e),
        }
    }
    (errs, outs)
}

/// True when `log` has everything up to `until` in its range, or is cancelled.
pub fn is_done(log: &WatchLog, hist: &History, until: i64) -> bool {
    if log.cancel.is_some() || log.left {
        return true;
    }
    if log.start <= 0 {
        return false;
    }
    let want = hist
        .expected(&log.key, &log.range_end, log.start, until)
        .last()
        .map_or(0, |e| e.rev);
    log.last_rev() >= want
}

/// Waits until every log [`is_done`] or `timeout` passes; returns how long it took or the
/// names of the laggards.
pub async fn wait_done(
    logs: &[Arc<Mutex<WatchLog>>],
    hist: &History,
    until: i64,
    timeout: Duration,
) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let pending: Vec<String> = logs
            .iter()
            .filter_map(|l| {
                let l = l.lock().unwrap();
                (!is_done(&l, hist, until)).then(|| format!("{} (next {})", l.name, l.next()))
            })
            .collect();
        if pending.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "{} watches not done after {timeout:?}, e.g. {:?}",
                pending.len(),
                &pending[..pending.len().min(5)]
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
