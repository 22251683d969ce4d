//! The `Watch/Watch` gRPC route, with an encoder that shares encoded event bytes.
//!
//! A session's [`Reply`]s are written as WatchResponses: the header and watch id, then the
//! bytes the watch's shape encoded once per batch for every watcher of that shape: per-watcher
//! work is a few bytes of framing and one copy into the connection's buffer, or, for replies
//! with 16 KiB or more of events, none (the shared bytes are frames of their own).
//!
//! The Watch gRPC method is served here ([`serve`], instead of tonic's generated
//! `WatchServer`) only to use this encoder and body ([`ReplyBody`]); it speaks exactly the
//! same protocol.

use bytes::BufMut;
use prost::Message;
use tonic::body::Body;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{Grpc, StreamingService};
use tonic::{Status, Streaming};

use crate::proto::etcdserverpb::{ResponseHeader, WatchRequest, WatchResponse};
use crate::serve::passthrough::BoxStream;
use crate::serve::watch::reply::Reply;
use crate::serve::watch::{ConnectionEnding, WatchService};

/// Writes `reply` as an encoded WatchResponse: the header and watch id, then the shared
/// event bytes. A [`Reply::Live`] stands for one response per watch: split it first
/// ([`Reply::singles`]); its responses would be written one after the other.
pub fn encode<B: BufMut>(reply: &Reply, buf: &mut B) -> Result<(), prost::EncodeError> {
    match reply {
        Reply::Msg(m) => m.encode(buf),
        Reply::Error(_) => Ok(()),
        Reply::Live(l) => {
            for e in l.each() {
                encode(&Reply::Events(e), buf)?;
            }
            Ok(())
        }
        Reply::Events(e) => {
            let head = WatchResponse {
                header: Some(e.header),
                watch_id: e.watch_id,
                ..Default::default()
            };
            head.encode(buf)?;
            for b in &e.batches {
                buf.put_slice(&e.shape.encode(b).proto);
            }
            Ok(())
        }
    }
}

/// Encodes replies, decodes WatchRequests.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplyCodec;

/// The encoding half of [`ReplyCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplyEncoder;

impl Encoder for ReplyEncoder {
    type Item = Reply;
    type Error = Status;

    /// Called as hyper's HTTP/2 connection polls the response stream for data to send: a
    /// live reply's delivery latency is observed here.
    fn encode(&mut self, item: Reply, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        if let Reply::Events(e) = &item {
            if let Some(at) = e.live_since() {
                crate::metrics::delivered(crate::metrics::Wire::Grpc, at);
            }
        }
        encode(&item, dst).map_err(|e| crate::error::Error::Marshal(e).into())
    }

    /// Small buffers: a stream is mostly idle, and tonic's 8 KiB default per stream dominates
    /// the memory of an idle watch stream. Buffers grow when responses need it.
    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(STREAM_BUFFER, YIELD_THRESHOLD)
    }
}

/// Initial encode and decode buffer of a watch stream.
const STREAM_BUFFER: usize = 512;
/// Encoded bytes after which the encoder yields to the connection (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// The decoding half of [`ReplyCodec`] (plain protobuf).
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestDecoder;

impl Decoder for RequestDecoder {
    type Item = WatchRequest;
    type Error = Status;

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(STREAM_BUFFER, YIELD_THRESHOLD)
    }

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<WatchRequest>, Status> {
        WatchRequest::decode(buf).map(Some).map_err(|e| {
            Status::internal(format!(
                "{}{}",
                crate::wire::grpc::codec::STREAM_DECODE_PREFIX,
                crate::wire::grpc::codec::go_error(&e)
            ))
        })
    }
}

impl Codec for ReplyCodec {
    type Encode = Reply;
    type Decode = WatchRequest;
    type Encoder = ReplyEncoder;
    type Decoder = RequestDecoder;

    fn encoder(&mut self) -> ReplyEncoder {
        ReplyEncoder
    }

    fn decoder(&mut self) -> RequestDecoder {
        RequestDecoder
    }
}

/// Adapts the session to tonic's streaming handler.
struct Handler(WatchService);

impl StreamingService<WatchRequest> for Handler {
    type Response = Reply;
    type ResponseStream = BoxStream<Reply>;
    type Future = std::future::Ready<Result<tonic::Response<BoxStream<Reply>>, Status>>;

    fn call(&mut self, request: tonic::Request<Streaming<WatchRequest>>) -> Self::Future {
        use futures::StreamExt;
        let (metadata, extensions, stream) = request.into_parts();
        let ending = extensions.get::<ConnectionEnding>().cloned();
        // tonic's encoder writes one message per item: live replies one by one.
        let replies = self
            .0
            .session(metadata, ending, stream)
            .flat_map(|item| {
                let items: smallvec::SmallVec<[Result<Reply, Status>; 1]> = match item {
                    Ok(r) => r.singles().into_iter().map(Ok).collect(),
                    Err(s) => smallvec::smallvec![Err(s)],
                };
                futures::stream::iter(items)
            })
            .boxed();
        std::future::ready(Ok(tonic::Response::new(replies)))
    }
}

/// The gRPC path of the Watch method.
pub const PATH: &str = "/etcdserverpb.Watch/Watch";

/// Serves one `Watch` call (a whole stream): requests decoded by tonic, replies written by
/// [`ReplyBody`]. A compressed request stream (which the proxy does not take) goes through
/// tonic's handler for its refusal.
pub async fn serve<B>(
    svc: WatchService,
    req: http::Request<B>,
    max_decoding: usize,
) -> http::Response<Body>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let compressed = req
        .headers()
        .get("grpc-encoding")
        .is_some_and(|v| v.as_bytes() != b"identity");
    if compressed {
        let mut grpc = Grpc::new(ReplyCodec)
            .apply_max_message_size_config(Some(max_decoding), Some(usize::MAX));
        return grpc.streaming(Handler(svc), req).await;
    }
    let (parts, body) = req.into_parts();
    let requests = Streaming::new_request(RequestDecoder, body, None, Some(max_decoding));
    let ending = parts.extensions.get::<ConnectionEnding>().cloned();
    let metadata = tonic::metadata::MetadataMap::from_headers(parts.headers);
    let replies = svc.session(metadata, ending, requests);
    let mut resp = http::Response::new(Body::new(ReplyBody::new(replies)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// `WatchResponse.header`'s field number.
const HEADER_FIELD: u32 = 1;
/// `WatchResponse.watch_id`'s field number.
const WATCH_ID_FIELD: u32 = 2;

/// The encoded `header` field of the events replies written in one poll of a [`ReplyBody`]:
/// the replies to one revision share their header, which is then encoded once (kept only for
/// the poll: an idle stream holds none).
#[derive(Default)]
struct HeadMemo {
    /// The header `field` encodes.
    header: Option<ResponseHeader>,
    /// Field key, length and message.
    field: Vec<u8>,
}

impl HeadMemo {
    /// `header` as an encoded `WatchResponse.header` field.
    fn field(&mut self, header: &ResponseHeader) -> &[u8] {
        if self.header.as_ref() != Some(header) {
            self.field.clear();
            prost::encoding::message::encode(HEADER_FIELD, header, &mut self.field);
            self.header = Some(*header);
        }
        &self.field
    }
}

/// The encoded length of `WatchResponse.watch_id` (prost leaves the zero id out).
fn id_len(watch_id: i64) -> usize {
    if watch_id != 0 {
        prost::encoding::int64::encoded_len(WATCH_ID_FIELD, &watch_id)
    } else {
        0
    }
}

/// Writes a WatchResponse's gRPC message prefix (uncompressed, `len` bytes), its encoded
/// `header` field and its watch id as prost writes them (fields in tag order, the zero watch
/// id left out); its events follow.
fn put_head(buf: &mut bytes::BytesMut, len: usize, header_field: &[u8], watch_id: i64) {
    buf.put_u8(0);
    buf.put_u32(len as u32);
    buf.put_slice(header_field);
    if watch_id != 0 {
        prost::encoding::int64::encode(WATCH_ID_FIELD, &watch_id, buf);
    }
}

/// Events replies whose shared encodings reach this size are written as frames of their own
/// (see [`ReplyBody`]).
const SPLIT_AT: usize = 16 << 10;

/// The response body of a Watch call: the session's replies as gRPC messages, then its
/// status in the trailers (tonic's `EncodeBody` for this stream, without its copy of large
/// replies).
///
/// Replies ready together are gathered into one DATA frame of up to [`YIELD_THRESHOLD`]
/// bytes (a burst of `created` answers goes out in a few large frames). An events reply with
/// [`SPLIT_AT`] or more of shared event bytes is written as its own frames: its length prefix
/// and header, then the batches' shared protobuf encodings themselves, not a copy. A stream
/// whose client does not read holds, in HTTP/2's send buffer, the shared bytes of the reply
/// it is stuck on rather than a copy of them (1,000 such gRPC watchers and 100 KB values
/// would otherwise hold 100 MB or more).
struct ReplyBody {
    /// The session's replies.
    replies: BoxStream<Reply>,
    /// Frames ready to be sent, in order.
    ready: std::collections::VecDeque<bytes::Bytes>,
    /// Small replies gathered for the next frame.
    gathered: bytes::BytesMut,
    /// The trailers, once the session ended; sent after every frame.
    trailers: Option<http::HeaderMap>,
    /// The trailers were sent.
    done: bool,
}

impl ReplyBody {
    fn new(replies: BoxStream<Reply>) -> ReplyBody {
        ReplyBody {
            replies,
            ready: std::collections::VecDeque::new(),
            gathered: bytes::BytesMut::new(),
            trailers: None,
            done: false,
        }
    }

    /// Adds `reply` after everything taken so far; `now` is the time of this write (read once
    /// per write, for the delivery latency).
    fn push(
        &mut self,
        reply: Reply,
        now: &mut Option<std::time::Instant>,
        head: &mut HeadMemo,
    ) -> Result<(), Status> {
        let marshal = |e: prost::EncodeError| Status::from(crate::error::Error::Marshal(e));
        match reply {
            Reply::Error(_) => {}
            Reply::Msg(m) => {
                self.gathered.reserve(5 + m.encoded_len());
                self.gathered.put_u8(0);
                self.gathered.put_u32(m.encoded_len() as u32);
                m.encode(&mut self.gathered).map_err(marshal)?;
            }
            Reply::Events(e) => {
                if let Some(at) = e.live_since() {
                    let now = *now.get_or_insert_with(std::time::Instant::now);
                    crate::metrics::delivered_at(crate::metrics::Wire::Grpc, at, now);
                }
                let mut shared = 0;
                for b in &e.batches {
                    shared += e.shape.with_encoded(b, |x| x.proto.len());
                }
                let field = head.field(&e.header);
                let len = field.len() + id_len(e.watch_id) + shared;
                if shared < SPLIT_AT {
                    self.gathered.reserve(5 + len);
                    put_head(&mut self.gathered, len, field, e.watch_id);
                    for b in &e.batches {
                        e.shape
                            .with_encoded(b, |x| self.gathered.put_slice(&x.proto));
                    }
                    return Ok(());
                }
                self.take_gathered();
                let mut first = bytes::BytesMut::with_capacity(5 + len - shared);
                put_head(&mut first, len, field, e.watch_id);
                self.ready.push_back(first.freeze());
                for b in &e.batches {
                    let part = e.shape.with_encoded(b, |x| x.proto.clone());
                    if !part.is_empty() {
                        self.ready.push_back(part);
                    }
                }
            }
            Reply::Live(l) => {
                let now = *now.get_or_insert_with(std::time::Instant::now);
                crate::metrics::delivered_many(
                    crate::metrics::Wire::Grpc,
                    l.live_since(),
                    now,
                    l.ids.len(),
                );
                let field = head.field(&l.header);
                l.shape.with_encoded(&l.batch, |x| {
                    let shared = x.proto.len();
                    if shared < SPLIT_AT {
                        // Every response into the one buffer: framing, header, id, events.
                        let each = 5 + field.len() + shared;
                        let ids: usize = l.ids.iter().map(|&id| each + id_len(id)).sum();
                        self.gathered.reserve(ids);
                        for &id in &l.ids {
                            put_head(&mut self.gathered, each - 5 + id_len(id), field, id);
                            self.gathered.put_slice(&x.proto);
                        }
                        return;
                    }
                    if !self.gathered.is_empty() {
                        self.ready.push_back(self.gathered.split().freeze());
                    }
                    for &id in &l.ids {
                        let len = field.len() + id_len(id) + shared;
                        let mut first = bytes::BytesMut::with_capacity(5 + len - shared);
                        put_head(&mut first, len, field, id);
                        self.ready.push_back(first.freeze());
                        self.ready.push_back(x.proto.clone());
                    }
                });
            }
        }
        Ok(())
    }

    /// Moves what was gathered to the frames ready to be sent.
    fn take_gathered(&mut self) {
        if !self.gathered.is_empty() {
            self.ready.push_back(self.gathered.split().freeze());
        }
    }

    /// The trailers of a stream ending with `status`.
    fn trailers_of(status: &Status) -> http::HeaderMap {
        let mut trailers = http::HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            trailers.insert("grpc-status", http::HeaderValue::from_static("13"));
        }
        trailers
    }
}

impl http_body::Body for ReplyBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
        use std::task::Poll;
        let this = &mut *self;
        loop {
            if let Some(frame) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(http_body::Frame::data(frame))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(trailers) = this.trailers.take() {
                this.done = true;
                return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
            }
            // Every reply ready now, up to a frame's worth.
            let mut pending = false;
            let mut now = None;
            let mut head = HeadMemo::default();
            while this.ready.is_empty() && this.gathered.len() < YIELD_THRESHOLD {
                match this.replies.as_mut().poll_next(cx) {
                    Poll::Ready(Some(Ok(reply))) => {
                        if let Err(status) = this.push(reply, &mut now, &mut head) {
                            this.trailers = Some(Self::trailers_of(&status));
                            break;
                        }
                    }
                    Poll::Ready(Some(Err(status))) => {
                        this.trailers = Some(Self::trailers_of(&status));
                        break;
                    }
                    Poll::Ready(None) => {
                        this.trailers = Some(Self::trailers_of(&Status::ok("")));
                        break;
                    }
                    Poll::Pending => {
                        pending = true;
                        break;
                    }
                }
            }
            if !this.gathered.is_empty() {
                // `ready` is empty here: a large reply moves what was gathered before it.
                let frame = this.gathered.split().freeze();
                this.ready.push_back(frame);
            }
            if pending && this.ready.is_empty() && this.trailers.is_none() {
                return Poll::Pending;
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyRange;
    use crate::proto::mvccpb::{Event, KeyValue};
    use crate::serve::watch::reply::LiveReplies;
    use crate::serve::watch::shape::{ShapeKey, SHAPES};
    use crate::source::cache::RevBatch;
    use http_body_util::BodyExt;
    use std::sync::Arc;

    fn batch(revision: i64, value_len: usize) -> Arc<RevBatch> {
        let kv = |key: &'static [u8]| KeyValue {
            key: bytes::Bytes::from_static(key),
            value: vec![b'v'; value_len].into(),
            mod_revision: revision,
            create_revision: 2,
            version: 3,
            lease: 0,
        };
        Arc::new(RevBatch::new(
            revision,
            vec![
                Event {
                    r#type: 0,
                    kv: Some(kv(b"/apisix/routes/1")),
                    prev_kv: None,
                },
                Event {
                    r#type: 0,
                    kv: Some(kv(b"/other")),
                    prev_kv: None,
                },
            ],
        ))
    }

    /// The body's bytes for `replies`, and its frames.
    async fn body(replies: Vec<Reply>) -> (Vec<u8>, usize) {
        let stream = futures::stream::iter(replies.into_iter().map(Ok));
        let mut body = ReplyBody::new(Box::pin(stream));
        let (mut bytes, mut frames) = (Vec::new(), 0);
        while let Some(frame) = body.frame().await {
            match frame.map(|f| f.into_data()) {
                Ok(Ok(data)) => {
                    bytes.extend_from_slice(&data);
                    frames += 1;
                }
                Ok(Err(_trailers)) => {}
                Err(status) => panic!("body: {status:?}"),
            }
        }
        (bytes, frames)
    }

    /// gRPC messages as tonic frames them: an uncompressed flag, the length, the message.
    fn framed(responses: &[WatchResponse]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in responses {
            out.push(0);
            out.extend_from_slice(&(r.encoded_len() as u32).to_be_bytes());
            r.encode(&mut out).unwrap_or_default();
        }
        out
    }

    #[tokio::test]
    async fn live_replies_are_written_as_their_responses() {
        let shape = SHAPES.intern(ShapeKey {
            range: KeyRange::prefix(b"/apisix/"),
            no_put: false,
            no_delete: false,
            prev_kv: false,
        });
        let header = ResponseHeader {
            cluster_id: 7,
            member_id: 8,
            revision: 9,
            raft_term: 2,
        };
        // Small events (gathered into one buffer) and events over SPLIT_AT (frames of their
        // own); ids with varints of different lengths, and the zero id prost leaves out.
        for value_len in [10, SPLIT_AT] {
            let b = batch(9, value_len);
            let live = LiveReplies {
                header,
                batch: b.clone(),
                shape: shape.clone(),
                ids: [0, 1, 300, 1 << 40].into_iter().collect(),
            };
            let expected: Vec<WatchResponse> = live.each().map(|e| e.to_response()).collect();
            assert!(expected.iter().all(|r| r.events.len() == 1));
            let (bytes, frames) = body(vec![Reply::Live(live.clone())]).await;
            assert_eq!(bytes, framed(&expected), "value of {value_len} bytes");
            if value_len < SPLIT_AT {
                assert_eq!(frames, 1, "one buffer for the revision");
            }
            // The same as the replies one by one.
            let singles: Vec<Reply> = live.each().map(Reply::Events).collect();
            assert_eq!(body(singles).await.0, bytes);
            // And as `encode` writes each (the fuzzing and compressed paths).
            for (single, resp) in Reply::Live(live).singles().iter().zip(&expected) {
                let mut buf = Vec::new();
                encode(single, &mut buf).unwrap_or_default();
                assert_eq!(buf, resp.encode_to_vec());
            }
        }
    }
}
