//! Response bodies of the gateway: whole JSON answers, unary errors (chunked, with the
//! `Grpc-Trailer-Content-Type` trailer etcd's gateway sends), and the newline-delimited
//! streams of `/v3/watch`, `/v3/lease/keepalive` and `/v3/maintenance/snapshot`: one
//! `{"result":{...}}\n` per message, each its own HTTP/1.1 chunk (a watch response with 16 KiB
//! or more of events: several, see [`reply_chunks`]), sent as soon as the message exists; a
//! failure ends the stream with one `{"error":{...}}` chunk.
//!
//! Encode once: the watch session hands over events responses as shared [`Reply`]s (revision
//! batches plus the watch's interned shape). The JSON of one batch's events for one shape is
//! made once and kept in the batch's slot for that shape
//! ([`crate::source::cache::Encodings`], next to the protobuf encoding), so a batch fanned out
//! to many HTTP watchers of the same shape is encoded once; per watcher only the header and
//! watch id are written, and the shared bytes copied (small replies) or written from their
//! shared buffers (large ones).

use std::convert::Infallible;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use http_body_util::StreamBody;

use super::errors;
use super::jsonpb;
use crate::proto::etcdserverpb::WatchResponse;
use crate::serve::watch::reply::Reply;
use crate::serve::watch::shape::Shape;
use crate::source::cache::RevBatch;

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

/// The chunk of one watch response.
pub fn watch_chunk(resp: &WatchResponse) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"{\"result\":");
    jsonpb::write_watch_response(&mut out, resp);
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

/// The chunk of one watch session reply, whole (tests compare it with the message's JSON).
#[cfg(test)]
pub fn reply_chunk(reply: &Reply) -> Bytes {
    let parts = reply_chunks(reply);
    if parts.len() == 1 {
        return parts.into_iter().next().unwrap_or_default();
    }
    Bytes::from(parts.concat())
}

/// The body frames of one watch session reply; events replies reuse the shared batch
/// encodings. Called as the connection's writer polls the response body: a live reply's
/// delivery latency is observed here.
///
/// A reply under [`SPLIT_AT`] is one frame (one HTTP/1.1 chunk). A larger one is the frames
/// of its header and its shared batch encodings, not copied: a connection whose client does
/// not read holds the shared bytes of the reply it is writing, not a copy of them (2,000 such
/// HTTP watchers and 100 KB values would otherwise hold 270 MB). Its HTTP/1.1 chunks then
/// split the JSON line, as etcd's gateway splits every line of 2 KiB or more from its
/// newline.
pub fn reply_chunks(reply: &Reply) -> Vec<Bytes> {
    let f = match reply {
        Reply::Msg(resp) => return vec![watch_chunk(resp)],
        Reply::Events(f) => {
            if let Some(at) = f.live_since() {
                crate::metrics::delivered(crate::metrics::Wire::Json, at);
            }
            f
        }
        // One response per watch, each as its own reply would be.
        Reply::Live(l) => {
            return l
                .each()
                .flat_map(|e| reply_chunks(&Reply::Events(e)))
                .collect()
        }
        // Session streams turn error replies into stream errors; none reaches an encoder.
        Reply::Error(_) => return vec![Bytes::new()],
    };
    let parts: Vec<Bytes> = f
        .batches
        .iter()
        .map(|b| batch_json(b, &f.shape))
        .filter(|j| !j.is_empty())
        .collect();
    let shared: usize = parts.iter().map(|p| p.len() + 1).sum();
    let mut out = Vec::with_capacity(160 + if shared < SPLIT_AT { shared } else { 0 });
    out.extend_from_slice(b"{\"result\":");
    let resp = WatchResponse {
        header: Some(f.header),
        watch_id: f.watch_id,
        ..Default::default()
    };
    // Header and watch id, then the shared events (`events` is the last field written).
    jsonpb::write_watch_response(&mut out, &resp);
    out.pop();
    if parts.is_empty() {
        out.extend_from_slice(b"}}\n");
        return vec![Bytes::from(out)];
    }
    out.extend_from_slice(b",\"events\":[");
    if shared < SPLIT_AT {
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(p);
        }
        out.extend_from_slice(b"]}}\n");
        return vec![Bytes::from(out)];
    }
    let mut frames = Vec::with_capacity(parts.len() * 2 + 1);
    frames.push(Bytes::from(out));
    for (i, p) in parts.into_iter().enumerate() {
        if i > 0 {
            frames.push(Bytes::from_static(b","));
        }
        frames.push(p);
    }
    frames.push(Bytes::from_static(b"]}}\n"));
    frames
}

/// Events replies whose shared encodings reach this size are written as several frames
/// (see [`reply_chunks`]).
pub const SPLIT_AT: usize = 16 << 10;

/// The final chunk of a failed stream.
pub fn error_chunk(status: &tonic::Status) -> Bytes {
    Bytes::from(errors::stream_body(status.code(), status.message()))
}

/// The JSON of `batch`'s events that `shape` selects (comma-separated event objects), made
/// by the first caller and kept in the batch's slot for the shape.
fn batch_json(batch: &RevBatch, shape: &Shape) -> Bytes {
    if !shape.wants_any(batch) {
        return Bytes::new();
    }
    batch
        .encoded
        .slot(shape.id)
        .json
        .get_or_init(|| {
            let mut json = Vec::with_capacity(128);
            for ev in batch.events.iter().filter(|e| shape.wants(e)) {
                if !json.is_empty() {
                    json.push(b',');
                }
                jsonpb::write_event(&mut json, &shape.view(ev));
            }
            Bytes::from(json)
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyRange;
    use crate::proto::etcdserverpb::ResponseHeader;
    use crate::proto::mvccpb::{Event, KeyValue};
    use crate::serve::watch::reply::EventsReply;
    use crate::serve::watch::shape::{ShapeKey, SHAPES};
    use std::sync::Arc;

    fn ev(key: &'static [u8], rev: i64, t: i32) -> Event {
        Event {
            r#type: t,
            kv: Some(KeyValue {
                key: Bytes::from_static(key),
                value: Bytes::from_static(b"{}"),
                mod_revision: rev,
                create_revision: rev,
                version: 1,
                lease: 0,
            }),
            prev_kv: Some(KeyValue {
                key: Bytes::from_static(key),
                value: Bytes::from_static(b"old"),
                mod_revision: 1,
                create_revision: 1,
                version: 1,
                lease: 0,
            }),
        }
    }

    #[test]
    fn shared_replies_match_messages() {
        let batches: Vec<Arc<RevBatch>> = vec![
            Arc::new(RevBatch {
                revision: 5,
                events: vec![ev(b"/apisix/routes/1", 5, 0), ev(b"/other", 5, 0)],
                bytes: 0,
                received: std::time::Instant::now(),
                encoded: Default::default(),
            }),
            Arc::new(RevBatch {
                revision: 6,
                events: vec![ev(b"/apisix/routes/1", 6, 1)],
                bytes: 0,
                received: std::time::Instant::now(),
                encoded: Default::default(),
            }),
        ];
        for prev_kv in [false, true] {
            let shape = SHAPES.intern(ShapeKey {
                range: KeyRange::prefix(b"/apisix/"),
                no_put: false,
                no_delete: false,
                prev_kv,
            });
            let reply = EventsReply {
                header: ResponseHeader {
                    revision: 6,
                    cluster_id: 1,
                    ..Default::default()
                },
                watch_id: 2,
                batches: batches.iter().cloned().collect(),
                shape,
                live: false,
            };
            let a = reply_chunk(&Reply::Events(reply.clone()));
            let b = reply_chunk(&Reply::Events(reply.clone()));
            assert_eq!(a, b);
            assert_eq!(a, watch_chunk(&reply.to_response()));
            assert!(a.ends_with(b"}\n"));
            assert_eq!(a.iter().filter(|&&c| c == b'\n').count(), 1);
        }
    }

    /// A reply with large events is several frames: its header, the shared batch encodings
    /// themselves (the same buffers, not copies), the end; together the message's JSON line.
    #[test]
    fn large_replies_share_the_batch_encodings() {
        let big = Bytes::from(vec![b'v'; SPLIT_AT]);
        let ev = |key: &'static [u8], rev: i64| Event {
            r#type: 0,
            kv: Some(KeyValue {
                key: Bytes::from_static(key),
                value: big.clone(),
                mod_revision: rev,
                create_revision: rev,
                version: 1,
                lease: 0,
            }),
            prev_kv: None,
        };
        let batches: Vec<Arc<RevBatch>> = [(7, b"/big/a" as &'static [u8]), (8, b"/big/b")]
            .into_iter()
            .map(|(rev, key)| {
                Arc::new(RevBatch {
                    revision: rev,
                    events: vec![ev(key, rev)],
                    bytes: 0,
                    received: std::time::Instant::now(),
                    encoded: Default::default(),
                })
            })
            .collect();
        let shape = SHAPES.intern(ShapeKey {
            range: KeyRange::prefix(b"/big/"),
            no_put: false,
            no_delete: false,
            prev_kv: false,
        });
        let reply = EventsReply {
            header: ResponseHeader {
                revision: 8,
                ..Default::default()
            },
            watch_id: 3,
            batches: batches.iter().cloned().collect(),
            shape: shape.clone(),
            live: false,
        };
        let frames = reply_chunks(&Reply::Events(reply.clone()));
        assert_eq!(frames.len(), 5, "header, batch, comma, batch, end");
        for (frame, batch) in [(&frames[1], &batches[0]), (&frames[3], &batches[1])] {
            let shared = batch_json(batch, &shape);
            assert_eq!(
                frame.as_ptr(),
                shared.as_ptr(),
                "a copy, not the shared encoding"
            );
        }
        assert_eq!(
            Bytes::from(frames.concat()),
            watch_chunk(&reply.to_response())
        );
    }
}
