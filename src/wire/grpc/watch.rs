//! The `Watch/Watch` gRPC route, with an encoder that shares encoded event bytes.
//!
//! A session's [`Reply`]s are written as WatchResponses: the header and watch id, then the
//! bytes the watch's shape encoded once per batch for every watcher of that shape: per-watcher
//! work is a few bytes of framing and one copy into the connection's buffer.
//!
//! The Watch gRPC method is served here ([`serve`], instead of tonic's generated
//! `WatchServer`) only to use this encoder; it speaks exactly the same protocol.

use bytes::BufMut;
use prost::Message;
use tonic::body::Body;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{Grpc, StreamingService};
use tonic::{Status, Streaming};

use crate::proto::etcdserverpb::{WatchRequest, WatchResponse};
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

/// Serves one `Watch` call (a whole stream) with the reply encoder.
pub async fn serve<B>(
    svc: WatchService,
    req: http::Request<B>,
    max_decoding: usize,
) -> http::Response<Body>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let mut grpc =
        Grpc::new(ReplyCodec).apply_max_message_size_config(Some(max_decoding), Some(usize::MAX));
    grpc.streaming(Handler(svc), req).await
}
