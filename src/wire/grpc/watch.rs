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
/// event bytes.
pub fn encode<B: BufMut>(reply: &Reply, buf: &mut B) -> Result<(), prost::EncodeError> {
    match reply {
        Reply::Msg(m) => m.encode(buf),
        Reply::Error(_) => Ok(()),
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
        let (metadata, extensions, stream) = request.into_parts();
        let ending = extensions.get::<ConnectionEnding>().cloned();
        std::future::ready(Ok(tonic::Response::new(
            self.0.session(metadata, ending, stream),
        )))
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
                // WatchResponse { header, watch_id } as prost writes it (fields in tag order,
                // the zero watch id left out), then the shared events field by field.
                let mut shared = 0;
                for b in &e.batches {
                    shared += e.shape.with_encoded(b, |x| x.proto.len());
                }
                let field = head.field(&e.header);
                let id_len = if e.watch_id != 0 {
                    prost::encoding::int64::encoded_len(WATCH_ID_FIELD, &e.watch_id)
                } else {
                    0
                };
                let len = field.len() + id_len + shared;
                let put_head = |buf: &mut bytes::BytesMut| {
                    buf.put_u8(0);
                    buf.put_u32(len as u32);
                    buf.put_slice(field);
                    if e.watch_id != 0 {
                        prost::encoding::int64::encode(WATCH_ID_FIELD, &e.watch_id, buf);
                    }
                };
                if shared < SPLIT_AT {
                    self.gathered.reserve(5 + len);
                    put_head(&mut self.gathered);
                    for b in &e.batches {
                        e.shape
                            .with_encoded(b, |x| self.gathered.put_slice(&x.proto));
                    }
                    return Ok(());
                }
                if !self.gathered.is_empty() {
                    self.ready.push_back(self.gathered.split().freeze());
                }
                let mut first = bytes::BytesMut::with_capacity(5 + len - shared);
                put_head(&mut first);
                self.ready.push_back(first.freeze());
                for b in &e.batches {
                    let part = e.shape.with_encoded(b, |x| x.proto.clone());
                    if !part.is_empty() {
                        self.ready.push_back(part);
                    }
                }
            }
        }
        Ok(())
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
