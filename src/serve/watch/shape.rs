//! Watch shapes and encode-once.
//!
//! A *shape* is what decides which events of a revision a watch receives and how they look:
//! its key range, its filters and `prev_kv`. Thousands of APISIX workers watching `/apisix/`
//! share one shape. Shapes are interned per feed, and for each revision batch the selected
//! events are encoded once per shape and wire (protobuf here, as the `events` field of a
//! WatchResponse; JSON by the gateway) in the batch's slot for the shape; every watcher of that shape reuses those bytes and only adds the few
//! bytes that differ (header, watch id).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::BytesMut;

use crate::keys::KeyRange;
use crate::proto::mvccpb::{event::EventType, Event};
use crate::source::cache::{Encoded, RevBatch};

/// Field number of `WatchResponse.events`.
const EVENTS_FIELD: u32 = 11;

/// Source of shape ids (unique for the life of the process).
static NEXT_SHAPE_ID: AtomicU64 = AtomicU64::new(1);

/// What selects and shapes a watch's events.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShapeKey {
    /// Keys watched.
    pub range: KeyRange,
    /// Drop PUT events.
    pub no_put: bool,
    /// Drop DELETE events.
    pub no_delete: bool,
    /// Keep `prev_kv` on events.
    pub prev_kv: bool,
}

/// An interned shape: its key and a process-unique id used to find its encodings.
#[derive(Debug)]
pub struct Shape {
    /// Unique id (never reused, so a memo entry can never be mistaken for another shape's).
    pub id: u64,
    /// The selection rules.
    pub key: ShapeKey,
}

impl Shape {
    /// True when this shape wants `ev`.
    pub fn wants(&self, ev: &Event) -> bool {
        let Some(kv) = &ev.kv else { return false };
        if !self.key.range.contains_key(&kv.key) {
            return false;
        }
        let is_put = ev.r#type() == EventType::Put;
        !((is_put && self.key.no_put) || (!is_put && self.key.no_delete))
    }

    /// `ev` as this shape delivers it (without `prev_kv` unless asked for).
    pub fn view(&self, ev: &Event) -> Event {
        if self.key.prev_kv {
            ev.clone()
        } else {
            Event {
                r#type: ev.r#type,
                kv: ev.kv.clone(),
                prev_kv: None,
            }
        }
    }

    /// The events of `batches` this shape selects, as messages.
    pub fn select(&self, batches: &[Arc<RevBatch>]) -> Vec<Event> {
        batches
            .iter()
            .flat_map(|b| b.events.iter())
            .filter(|e| self.wants(e))
            .map(|e| self.view(e))
            .collect()
    }

    /// True when `batch` holds an event this shape wants.
    pub fn wants_any(&self, batch: &RevBatch) -> bool {
        batch.events.iter().any(|e| self.wants(e))
    }

    /// This shape's protobuf encoding of `batch`, made by the first watcher that needs it and
    /// read without a lock after that (see [`crate::source::cache::Encodings`]).
    pub fn encode(&self, batch: &RevBatch) -> Encoded {
        self.with_encoded(batch, Encoded::clone)
    }

    /// `f` of this shape's protobuf encoding of `batch` (see [`Shape::encode`]), read in place:
    /// no reference count is touched, so many encoders reading one encoding do not contend.
    pub fn with_encoded<R>(&self, batch: &RevBatch, f: impl FnOnce(&Encoded) -> R) -> R {
        if !self.wants_any(batch) {
            return f(&Encoded::default());
        }
        let slot = batch.encoded.slot(self.id);
        let encoded = slot.proto.get_or_init(|| {
            let mut buf = BytesMut::new();
            let mut count = 0;
            for ev in batch.events.iter().filter(|e| self.wants(e)) {
                prost::encoding::message::encode(EVENTS_FIELD, &self.view(ev), &mut buf);
                count += 1;
            }
            Encoded {
                proto: buf.freeze(),
                count,
            }
        });
        f(encoded)
    }
}

/// Every live shape of the process.
pub static SHAPES: std::sync::LazyLock<Shapes> = std::sync::LazyLock::new(Shapes::default);

/// Interns shapes so identical watches share one [`Shape`] (and so one encoding per batch).
#[derive(Debug, Default)]
pub struct Shapes {
    table: Mutex<Table>,
}

/// The interning table and when to sweep it next.
#[derive(Debug, Default)]
struct Table {
    /// Live shapes by key; dead entries are swept when the table has grown enough.
    shapes: HashMap<ShapeKey, Weak<Shape>>,
    /// Size at which the next sweep runs: twice the size left by the last sweep (at least
    /// [`MIN_SWEEP`]), so sweeping costs O(1) per intern amortized even when every watch
    /// has a shape of its own (single-key watchers); sweeping at a fixed size made each
    /// create O(shapes) past it.
    sweep_at: usize,
    /// Sweeps made (for the tests).
    sweeps: u64,
}

/// Smallest table size that triggers a sweep of dead shapes.
const MIN_SWEEP: usize = 1024;

impl Shapes {
    /// The shared shape for `key`.
    pub fn intern(&self, key: ShapeKey) -> Arc<Shape> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = table.shapes.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        if table.shapes.len() >= table.sweep_at.max(MIN_SWEEP) {
            table.shapes.retain(|_, w| w.strong_count() > 0);
            table.sweep_at = (2 * table.shapes.len()).max(MIN_SWEEP);
            table.sweeps += 1;
        }
        let shape = Arc::new(Shape {
            id: NEXT_SHAPE_ID.fetch_add(1, Ordering::Relaxed),
            key: key.clone(),
        });
        table.shapes.insert(key, Arc::downgrade(&shape));
        shape
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::WatchResponse;
    use crate::proto::mvccpb::KeyValue;
    use bytes::Bytes;
    use prost::Message;

    /// Encoded length of the `events` of a message built by [`Shape::select`].
    fn encoded_events_len(events: &[Event]) -> usize {
        events
            .iter()
            .map(|e| prost::encoding::message::encoded_len(EVENTS_FIELD, e))
            .sum()
    }

    fn put(key: &str, rev: i64) -> Event {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(KeyValue {
                key: Bytes::from(key.to_string()),
                value: Bytes::from_static(b"v"),
                mod_revision: rev,
                create_revision: rev,
                version: 1,
                lease: 0,
            }),
            prev_kv: Some(KeyValue::default()),
        }
    }

    #[test]
    fn encoding_matches_prost_and_is_shared() {
        let shapes = Shapes::default();
        let key = ShapeKey {
            range: KeyRange::prefix(b"/a/"),
            no_put: false,
            no_delete: false,
            prev_kv: false,
        };
        let s1 = shapes.intern(key.clone());
        let s2 = shapes.intern(key);
        assert_eq!(s1.id, s2.id);
        let batch = Arc::new(RevBatch::new(
            5,
            vec![put("/a/1", 5), put("/b/1", 5), put("/a/2", 5)],
        ));
        let enc = s1.encode(&batch);
        assert_eq!(enc.count, 2);
        assert_eq!(enc.proto.as_ptr(), s2.encode(&batch).proto.as_ptr());
        // header + id + shared events == prost's encoding of the whole message.
        let want = WatchResponse {
            watch_id: 7,
            events: s1.select(std::slice::from_ref(&batch)),
            ..Default::default()
        };
        let mut got = WatchResponse {
            watch_id: 7,
            ..Default::default()
        }
        .encode_to_vec();
        got.extend_from_slice(&enc.proto);
        assert_eq!(got, want.encode_to_vec());
        assert_eq!(encoded_events_len(&want.events), enc.proto.len());
    }

    fn single_key(i: usize) -> ShapeKey {
        ShapeKey {
            range: KeyRange::new(&Bytes::from(format!("/k/{i}")), &Bytes::new()),
            no_put: false,
            no_delete: false,
            prev_kv: false,
        }
    }

    #[test]
    fn interning_many_distinct_shapes_sweeps_rarely_and_drops_dead_ones() {
        let shapes = Shapes::default();
        // 20,000 single-key watches alive at once: a shape each.
        let live: Vec<Arc<Shape>> = (0..20_000).map(|i| shapes.intern(single_key(i))).collect();
        let sweeps = shapes.table.lock().unwrap().sweeps;
        // Sweeps at 1024, 2048, 4096, ... entries, not at every create past 1024.
        assert!(sweeps <= 6, "{sweeps} sweeps for 20,000 live shapes");
        // Identical watches still share their shape.
        assert_eq!(shapes.intern(single_key(7)).id, live[7].id);
        // Once they are gone, their entries are swept as new shapes come.
        drop(live);
        let again: Vec<Arc<Shape>> = (0..50_000)
            .map(|i| shapes.intern(single_key(100_000 + i)))
            .collect();
        let t = shapes.table.lock().unwrap();
        assert!(
            t.shapes.len() <= 2 * again.len() + MIN_SWEEP,
            "{} entries for {} live shapes",
            t.shapes.len(),
            again.len()
        );
        assert!(t.sweeps <= 12, "{} sweeps", t.sweeps);
    }
}
