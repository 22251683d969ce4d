//! Response bodies of the gateway: whole JSON answers, unary errors (chunked, with the
//! `Grpc-Trailer-Content-Type` trailer etcd's gateway sends), and the newline-delimited
//! streams of `/v3/watch`, `/v3/lease/keepalive` and `/v3/maintenance/snapshot`: one
//! `{"result":{...}}\n` per message, each its own HTTP/1.1 chunk, sent as soon as the message
//! exists; a failure ends the stream with one `{"error":{...}}` chunk.
//!
//! Encode once: an event's JSON is kept in [`EventJson`] (keyed by the identity of the shared
//! buffers it was decoded into), so a batch fanned out to many HTTP watchers is encoded once and
//! copied into each watcher's chunk; only the header and watch id are written per watcher.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::LazyLock;

use bytes::Bytes;
use dashmap::DashMap;
use futures::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use http_body_util::StreamBody;

use super::codec;
use super::errors;
use crate::proto::etcdserverpb::WatchResponse;
use crate::proto::mvccpb::{Event, KeyValue};

/// The body type every answer uses.
pub type Body = tonic::body::Body;

/// A body of one or more data frames and optional trailers, sent chunked.
pub fn frames(frames: Vec<Frame<Bytes>>) -> Body {
    Body::new(StreamBody::new(futures::stream::iter(
        frames.into_iter().map(Ok::<_, Infallible>),
    )))
}

/// The chunked body of a unary error, with etcd's `Grpc-Trailer-Content-Type` trailer.
pub fn error_with_trailer(body: Vec<u8>) -> Body {
    let mut trailers = HeaderMap::new();
    trailers.insert(
        "grpc-trailer-content-type",
        HeaderValue::from_static("application/grpc"),
    );
    frames(vec![
        Frame::data(Bytes::from(body)),
        Frame::trailers(trailers),
    ])
}

/// A streaming body: every item is one chunk; after an error chunk the stream ends.
pub fn chunked<S>(chunks: S) -> Body
where
    S: Stream<Item = Bytes> + Send + 'static,
{
    Body::new(StreamBody::new(
        chunks.map(|b| Ok::<_, Infallible>(Frame::data(b))),
    ))
}

/// `{"result":<json>}\n`.
pub fn result_chunk(json: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(json.len() + 12);
    out.extend_from_slice(b"{\"result\":");
    out.extend_from_slice(json);
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

/// The chunk of one watch response, events encoded through the shared cache.
pub fn watch_chunk(resp: &WatchResponse) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"{\"result\":");
    codec::write_watch_response_with(&mut out, resp, |out, ev| EVENTS.write(out, ev));
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

/// The final chunk of a failed stream.
pub fn error_chunk(status: &tonic::Status) -> Bytes {
    Bytes::from(errors::stream_body(status.code(), status.message()))
}

/// Identity of a key-value's shared buffers plus its revision fields.
type KvId = (usize, usize, usize, usize, i64, i64, i64, i64);

fn kv_id(kv: &KeyValue) -> KvId {
    (
        kv.key.as_ptr() as usize,
        kv.key.len(),
        kv.value.as_ptr() as usize,
        kv.value.len(),
        kv.create_revision,
        kv.mod_revision,
        kv.version,
        kv.lease,
    )
}

/// What identifies an event's JSON: its type and both key-values' identities.
type EventId = (i32, Option<KvId>, Option<KvId>);

/// Cached JSON of one event, holding the buffers its identity points into (so the addresses
/// cannot be reused by another event while the entry lives).
struct Entry {
    json: Bytes,
    _pins: [Bytes; 4],
}

/// Recently encoded events, shared by every HTTP watcher.
pub struct EventJson {
    map: DashMap<EventId, Entry>,
    bytes: AtomicUsize,
}

/// Most cached events / bytes before the cache starts over.
const EVENT_CACHE_ENTRIES: usize = 16_384;
const EVENT_CACHE_BYTES: usize = 64 << 20;

static EVENTS: LazyLock<EventJson> = LazyLock::new(|| EventJson {
    map: DashMap::new(),
    bytes: AtomicUsize::new(0),
});

impl EventJson {
    /// Appends the JSON of `ev` to `out`, encoding it only if no watcher did before.
    fn write(&self, out: &mut Vec<u8>, ev: &Event) {
        let id: EventId = (
            ev.r#type,
            ev.kv.as_ref().map(kv_id),
            ev.prev_kv.as_ref().map(kv_id),
        );
        if let Some(e) = self.map.get(&id) {
            out.extend_from_slice(&e.json);
            return;
        }
        let mut json = Vec::with_capacity(128);
        codec::write_event(&mut json, ev);
        out.extend_from_slice(&json);
        let size = json.len();
        if self.map.len() >= EVENT_CACHE_ENTRIES
            || self.bytes.load(Ordering::Relaxed) + size > EVENT_CACHE_BYTES
        {
            self.map.clear();
            self.bytes.store(0, Ordering::Relaxed);
        }
        let pin = |kv: &Option<KeyValue>| -> [Bytes; 2] {
            kv.as_ref()
                .map(|kv| [kv.key.clone(), kv.value.clone()])
                .unwrap_or_default()
        };
        let [a, b] = pin(&ev.kv);
        let [c, d] = pin(&ev.prev_kv);
        self.bytes.fetch_add(size, Ordering::Relaxed);
        self.map.insert(
            id,
            Entry {
                json: Bytes::from(json),
                _pins: [a, b, c, d],
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::ResponseHeader;

    #[test]
    fn chunks_are_one_line() {
        let resp = WatchResponse {
            header: Some(ResponseHeader {
                revision: 5,
                ..Default::default()
            }),
            events: vec![Event {
                r#type: 0,
                kv: Some(KeyValue {
                    key: Bytes::from_static(b"/apisix/routes/1"),
                    value: Bytes::from_static(b"{}"),
                    mod_revision: 5,
                    create_revision: 5,
                    version: 1,
                    lease: 0,
                }),
                prev_kv: None,
            }],
            ..Default::default()
        };
        let a = watch_chunk(&resp);
        let b = watch_chunk(&resp);
        assert_eq!(a, b);
        assert!(a.ends_with(b"}\n"));
        assert_eq!(a.iter().filter(|&&c| c == b'\n').count(), 1);
        let mut direct = b"{\"result\":".to_vec();
        codec::write_watch_response(&mut direct, &resp);
        direct.extend_from_slice(b"}\n");
        assert_eq!(&a[..], &direct[..]);
    }
}
