//! The revision-indexed cache of one key range (a configured prefix).
//!
//! It holds the current state (key -> KeyValue) and a bounded history of event batches, one
//! batch per revision, oldest evicted first. Together they answer:
//! - the state at the head revision (a plain map lookup),
//! - the state at any revision in the window `[floor, head]` (current state with the newer
//!   batches undone, using each event's `prev_kv`),
//! - every batch after revision `r` for `r` in the window (binary search in the history).
//!
//! The cache is a plain data structure: [`crate::source::feed`] fills it from the upstream watch and
//! wakes watchers; readers take a short read lock and copy out reference-counted batches.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;

use crate::keys::KeyRange;
use crate::proto::mvccpb::{event::EventType, Event, KeyValue};

/// Bytes of bookkeeping counted per event on top of its keys and values.
const EVENT_OVERHEAD: usize = 96;

/// Every event of one revision, in etcd's order, shared by all watchers that read it.
#[derive(Debug)]
pub struct RevBatch {
    /// The revision all events share.
    pub revision: i64,
    /// Events in the order etcd sent them, each with `prev_kv` when it had one.
    pub events: Vec<Event>,
    /// Approximate memory held by the batch.
    pub bytes: usize,
    /// When the proxy received the etcd watch response carrying this revision (the start of
    /// `etcd_fanout_delivery_latency_seconds`).
    pub received: std::time::Instant,
    /// This batch's events encoded once per (watch shape, wire), shared by every watcher of
    /// that shape: the one home of encode-once (filled by the serving and wire layers).
    pub encoded: Encodings,
}

/// The encodings of one batch, one [`Slot`] per watch shape.
///
/// The dispatch index makes the slots of every shape registered when the batch is applied
/// and whose range holds one of its keys ([`Encodings::prepare`]); after that they are read
/// without a lock, and each encoding is made once by whoever needs it first (`OnceLock`). A
/// shape not prepared (a watch reading the batch as backlog, registered later) gets a slot in
/// a small locked overflow list: the cold path.
#[derive(Debug, Default)]
pub struct Encodings {
    /// Slots of the shapes known at dispatch, sorted by shape id.
    prepared: OnceLock<Box<[(u64, Slot)]>>,
    /// Slots made later, few.
    late: Mutex<Vec<(u64, Arc<Slot>)>>,
}

/// One shape's encodings of one batch, each made once.
#[derive(Debug, Default)]
pub struct Slot {
    /// Protobuf: the selected events as repeated `WatchResponse.events` fields.
    pub proto: OnceLock<Encoded>,
    /// JSON (grpc-gateway): the selected events as comma-separated objects.
    pub json: OnceLock<Bytes>,
}

/// A slot, either prepared (borrowed from the batch) or late (shared).
#[derive(Debug)]
pub enum SlotRef<'a> {
    /// Made at dispatch.
    Prepared(&'a Slot),
    /// Made on demand.
    Late(Arc<Slot>),
}

impl std::ops::Deref for SlotRef<'_> {
    type Target = Slot;
    fn deref(&self) -> &Slot {
        match self {
            SlotRef::Prepared(s) => s,
            SlotRef::Late(s) => s,
        }
    }
}

impl Encodings {
    /// Makes the slots of `shapes` (sorted, distinct ids); only the first call counts.
    pub fn prepare(&self, shapes: &[u64]) {
        let _ = self
            .prepared
            .set(shapes.iter().map(|id| (*id, Slot::default())).collect());
    }

    /// The slot of shape `id`.
    pub fn slot(&self, id: u64) -> SlotRef<'_> {
        if let Some(p) = self.prepared.get() {
            if let Ok(i) = p.binary_search_by_key(&id, |(k, _)| *k) {
                return SlotRef::Prepared(&p[i].1);
            }
        }
        let mut late = self.late.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, s)) = late.iter().find(|(k, _)| *k == id) {
            return SlotRef::Late(s.clone());
        }
        let s = Arc::new(Slot::default());
        late.push((id, s.clone()));
        SlotRef::Late(s)
    }
}

/// One batch's events selected and encoded for one watch shape.
#[derive(Debug, Clone, Default)]
pub struct Encoded {
    /// The selected events, encoded as repeated `WatchResponse.events` fields (tag included):
    /// appended to an encoded response header they form a complete WatchResponse.
    pub proto: Bytes,
    /// How many events were selected.
    pub count: usize,
}

impl RevBatch {
    /// Groups events of one revision into a batch.
    pub fn new(revision: i64, events: Vec<Event>) -> RevBatch {
        let bytes = events.iter().map(event_bytes).sum();
        RevBatch {
            revision,
            events,
            bytes,
            received: std::time::Instant::now(),
            encoded: Encodings::default(),
        }
    }

    /// The batch, received from etcd at `at`.
    pub fn received_at(mut self, at: std::time::Instant) -> RevBatch {
        self.received = at;
        self
    }

    /// The batch as etcd reads it back once its revision is the compaction revision: etcd's
    /// compaction keeps, for each key, its newest revision up to the compaction revision
    /// unless that is a deletion, so the deletions of that revision are gone; and an event's
    /// `prev_kv` (etcd reads it at the revision before) is compacted too.
    pub fn as_compacted(&self) -> RevBatch {
        let events = self
            .events
            .iter()
            .filter(|e| e.r#type != EventType::Delete as i32)
            .map(|e| Event {
                prev_kv: None,
                ..e.clone()
            })
            .collect();
        RevBatch::new(self.revision, events).received_at(self.received)
    }
}

fn kv_bytes(kv: &KeyValue) -> usize {
    kv.key.len() + kv.value.len() + 48
}

fn event_bytes(e: &Event) -> usize {
    EVENT_OVERHEAD + e.kv.as_ref().map_or(0, kv_bytes) + e.prev_kv.as_ref().map_or(0, kv_bytes)
}

/// Why a batch could not be applied.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ApplyError {
    /// The batch is not newer than the head: the upstream repeated or reordered revisions.
    #[error("batch at revision {got} is not after head {head}")]
    OutOfOrder {
        /// Revision of the rejected batch.
        got: i64,
        /// Current head.
        head: i64,
    },
}

/// The cached state and history of one key range.
#[derive(Debug)]
pub struct Cache {
    /// Current value of every live key in the range.
    state: BTreeMap<Bytes, KeyValue>,
    /// Batches with revisions in `(floor, head]`, oldest first.
    history: VecDeque<Arc<RevBatch>>,
    /// Sum of `bytes` over `history`.
    history_bytes: usize,
    /// Oldest revision whose state can be rebuilt; every batch after it is in `history`.
    floor: i64,
    /// Revision the cache is complete up to.
    head: i64,
    /// Most batches kept.
    max_revisions: usize,
    /// Most history bytes kept.
    max_bytes: usize,
}

impl Cache {
    /// An empty cache, with history bounded by count and bytes.
    pub fn new(max_revisions: usize, max_bytes: usize) -> Cache {
        Cache {
            state: BTreeMap::new(),
            history: VecDeque::new(),
            history_bytes: 0,
            floor: 0,
            head: 0,
            max_revisions: max_revisions.max(1),
            max_bytes,
        }
    }

    /// Revision the cache is complete up to (0 before the first load).
    pub fn head(&self) -> i64 {
        self.head
    }

    /// Oldest revision whose state and later events are all known.
    pub fn floor(&self) -> i64 {
        self.floor
    }

    /// Number of live keys.
    pub fn len(&self) -> usize {
        self.state.len()
    }

    /// Batches currently kept and their approximate bytes.
    pub fn history_size(&self) -> (usize, usize) {
        (self.history.len(), self.history_bytes)
    }

    /// The history bound in bytes (`--history-bytes`).
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Replaces everything with a fresh load of the range at `revision`.
    pub fn reset(&mut self, revision: i64, kvs: Vec<KeyValue>) {
        self.state = kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
        self.history.clear();
        self.history_bytes = 0;
        self.floor = revision;
        self.head = revision;
    }

    /// Applies one revision's events and records them in the history.
    pub fn apply(&mut self, batch: RevBatch) -> Result<Arc<RevBatch>, ApplyError> {
        if batch.revision <= self.head {
            return Err(ApplyError::OutOfOrder {
                got: batch.revision,
                head: self.head,
            });
        }
        for ev in &batch.events {
            let Some(kv) = &ev.kv else { continue };
            self.state.remove(&kv.key);
            if ev.r#type() == EventType::Put {
                self.state.insert(kv.key.clone(), kv.clone());
            }
        }
        self.head = batch.revision;
        let batch = Arc::new(batch);
        self.history_bytes += batch.bytes;
        self.history.push_back(batch.clone());
        self.evict();
        Ok(batch)
    }

    /// Extends the window back to `base` with older history: `batches` (oldest first) hold
    /// every event of the range in revisions `(base, upto]`, where `upto` must still be the
    /// floor. Returns false, changing nothing, when the window moved in the meantime.
    pub fn prepend(&mut self, base: i64, upto: i64, batches: Vec<RevBatch>) -> bool {
        if self.floor != upto || base >= upto {
            return false;
        }
        if batches
            .iter()
            .any(|b| b.revision <= base || b.revision > upto)
            || batches.windows(2).any(|w| w[0].revision >= w[1].revision)
        {
            return false;
        }
        for b in batches.into_iter().rev() {
            self.history_bytes += b.bytes;
            self.history.push_front(Arc::new(b));
        }
        self.floor = base;
        self.evict();
        true
    }

    /// Records that nothing changed in the range up to `revision` (e.g. an upstream progress
    /// notification), so reads at that revision can be answered.
    pub fn advance(&mut self, revision: i64) {
        if revision > self.head {
            self.head = revision;
        }
    }

    fn evict(&mut self) {
        while self.history.len() > self.max_revisions
            || (self.history_bytes > self.max_bytes && self.history.len() > 1)
        {
            let Some(old) = self.history.pop_front() else {
                break;
            };
            self.history_bytes -= old.bytes;
            self.floor = old.revision;
        }
    }

    /// Index of the first batch with a revision above `rev`.
    fn first_after(&self, rev: i64) -> usize {
        self.history.partition_point(|b| b.revision <= rev)
    }

    /// Up to `max` batches with revisions after `rev`, or `None` when `rev` is older than the
    /// window (some of those batches are gone).
    pub fn batches_after(&self, rev: i64, max: usize) -> Option<Vec<Arc<RevBatch>>> {
        if rev < self.floor {
            return None;
        }
        let i = self.first_after(rev);
        Some(self.history.range(i..).take(max).cloned().collect())
    }

    /// The batch of revision `rev`: `None` when `rev` is not after the floor (its batch is
    /// gone), `Some(None)` when the window has no batch at `rev` (nothing changed in the range).
    pub fn batch_at(&self, rev: i64) -> Option<Option<Arc<RevBatch>>> {
        if rev <= self.floor {
            return None;
        }
        let i = self.first_after(rev - 1);
        Some(self.history.get(i).filter(|b| b.revision == rev).cloned())
    }

    /// The live key-values of `range` at revision `rev` (0 or >= head: the head), sorted by
    /// key, or `None` when `rev` is older than the window.
    pub fn kvs_at(&self, range: &KeyRange, rev: i64) -> Option<Vec<KeyValue>> {
        if rev <= 0 || rev >= self.head {
            return Some(
                self.state
                    .range::<[u8], _>(range.bounds())
                    .map(|(_, kv)| kv.clone())
                    .collect(),
            );
        }
        if rev < self.floor {
            return None;
        }
        let mut kvs: BTreeMap<Bytes, KeyValue> = self
            .state
            .range::<[u8], _>(range.bounds())
            .map(|(k, kv)| (k.clone(), kv.clone()))
            .collect();
        let newer = self.first_after(rev);
        for batch in self.history.range(newer..).rev() {
            for ev in batch.events.iter().rev() {
                let Some(kv) = &ev.kv else { continue };
                if !range.contains_key(&kv.key) {
                    continue;
                }
                match (&ev.prev_kv, ev.r#type()) {
                    (Some(prev), _) => {
                        kvs.insert(prev.key.clone(), prev.clone());
                    }
                    (None, EventType::Put) if kv.create_revision == kv.mod_revision => {
                        kvs.remove(&kv.key);
                    }
                    // A delete or update without its previous value cannot be undone.
                    (None, _) => return None,
                }
            }
        }
        Some(kvs.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::proto::testing::kv;

    fn put(kv: KeyValue, prev: Option<KeyValue>) -> Event {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(kv),
            prev_kv: prev,
        }
    }

    fn del(key: &str, rev: i64, prev: KeyValue) -> Event {
        Event {
            r#type: EventType::Delete as i32,
            kv: Some(KeyValue {
                key: Bytes::from(key.to_string()),
                mod_revision: rev,
                ..Default::default()
            }),
            prev_kv: Some(prev),
        }
    }

    fn keys(kvs: &[KeyValue]) -> Vec<String> {
        kvs.iter()
            .map(|k| {
                format!(
                    "{}={}",
                    String::from_utf8_lossy(&k.key),
                    String::from_utf8_lossy(&k.value)
                )
            })
            .collect()
    }

    fn sample() -> Cache {
        let mut c = Cache::new(100, 1 << 20);
        c.reset(10, vec![kv("/a/1", "x", 5, 5, 1)]);
        // rev 11: create /a/2; rev 12: update /a/1; rev 13: delete /a/2
        c.apply(RevBatch::new(
            11,
            vec![put(kv("/a/2", "y", 11, 11, 1), None)],
        ))
        .unwrap();
        c.apply(RevBatch::new(
            12,
            vec![put(
                kv("/a/1", "z", 5, 12, 2),
                Some(kv("/a/1", "x", 5, 5, 1)),
            )],
        ))
        .unwrap();
        c.apply(RevBatch::new(
            13,
            vec![del("/a/2", 13, kv("/a/2", "y", 11, 11, 1))],
        ))
        .unwrap();
        c
    }

    #[test]
    fn state_at_revisions() {
        let c = sample();
        let all = KeyRange::prefix(b"/a/");
        assert_eq!(keys(&c.kvs_at(&all, 0).unwrap()), ["/a/1=z"]);
        assert_eq!(keys(&c.kvs_at(&all, 12).unwrap()), ["/a/1=z", "/a/2=y"]);
        assert_eq!(keys(&c.kvs_at(&all, 11).unwrap()), ["/a/1=x", "/a/2=y"]);
        assert_eq!(keys(&c.kvs_at(&all, 10).unwrap()), ["/a/1=x"]);
        assert!(c.kvs_at(&all, 9).is_none());
        let one = KeyRange::new(&Bytes::from_static(b"/a/2"), &Bytes::new());
        assert_eq!(keys(&c.kvs_at(&one, 11).unwrap()), ["/a/2=y"]);
    }

    #[test]
    fn history_window() {
        let c = sample();
        let revs = |v: Vec<Arc<RevBatch>>| v.iter().map(|b| b.revision).collect::<Vec<_>>();
        assert_eq!(revs(c.batches_after(10, 10).unwrap()), [11, 12, 13]);
        assert_eq!(revs(c.batches_after(11, 1).unwrap()), [12]);
        assert_eq!(revs(c.batches_after(13, 10).unwrap()), Vec::<i64>::new());
        assert!(c.batches_after(9, 10).is_none());
    }

    #[test]
    fn prepend_extends_the_window() {
        let mut c = Cache::new(100, 1 << 20);
        // State at 12: /a/1=z (created 5, updated 12). History before: created at 5, updated 12.
        c.reset(12, vec![kv("/a/1", "z", 5, 12, 2)]);
        c.apply(RevBatch::new(
            13,
            vec![put(kv("/a/2", "n", 13, 13, 1), None)],
        ))
        .unwrap();
        let older = vec![RevBatch::new(
            12,
            vec![put(
                kv("/a/1", "z", 5, 12, 2),
                Some(kv("/a/1", "x", 5, 5, 1)),
            )],
        )];
        assert!(!c.prepend(10, 11, vec![]), "upto must be the floor");
        assert!(c.prepend(10, 12, older));
        assert_eq!(c.floor(), 10);
        let all = KeyRange::prefix(b"/a/");
        assert_eq!(keys(&c.kvs_at(&all, 11).unwrap()), ["/a/1=x"]);
        let revs: Vec<i64> = c
            .batches_after(10, 10)
            .unwrap()
            .iter()
            .map(|b| b.revision)
            .collect();
        assert_eq!(revs, [12, 13]);
    }

    #[test]
    fn eviction_moves_floor() {
        let mut c = Cache::new(2, 1 << 20);
        c.reset(10, vec![]);
        for r in 11..=15 {
            c.apply(RevBatch::new(
                r,
                vec![put(kv("/a/k", "v", 11, r, r - 10), None)],
            ))
            .unwrap();
        }
        assert_eq!(c.floor(), 13);
        assert_eq!(c.history_size().0, 2);
        assert!(c.batches_after(12, 10).is_none());
        assert_eq!(c.batches_after(13, 10).unwrap().len(), 2);
        assert!(c.apply(RevBatch::new(15, vec![])).is_err());
    }
}
