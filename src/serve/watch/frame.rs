//! What a watch session sends, and its gRPC wire encoder.
//!
//! A [`Frame`] is either a plain [`WatchResponse`] (created, canceled, progress, relayed
//! responses) or an events response whose event bytes are shared: [`EventsFrame`] points at the
//! revision batches and the watch's [`Shape`], whose per-batch encodings were made once for all
//! watchers of that shape. The encoder writes the header and watch id, then copies the shared
//! bytes: per-watcher work is a few bytes of framing and one copy into the connection's buffer.
//!
//! The Watch gRPC method is served here ([`serve`], instead of tonic's generated
//! `WatchServer`) only to use this encoder; it speaks exactly the same protocol.

use std::sync::Arc;

use bytes::BufMut;
use prost::Message;
use tonic::body::Body;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{Grpc, StreamingService};
use tonic::{Status, Streaming};

use super::shape::Shape;
use super::WatchService;
use crate::proto::etcdserverpb::{ResponseHeader, WatchRequest, WatchResponse};
use crate::serve::passthrough::BoxStream;
use crate::source::cache::RevBatch;

/// One response of a watch session.
#[derive(Debug, Clone)]
pub enum Frame {
    /// A response built as a message (boxed: frames wait in channels, keep them small).
    Msg(Box<WatchResponse>),
    /// An events response with shared, pre-encoded events.
    Events(EventsFrame),
    /// The stream ends with this error.
    Error(Box<Status>),
}

/// An events response: header, watch id, and the batches whose shared encodings for `shape`
/// make up its events.
#[derive(Debug, Clone)]
pub struct EventsFrame {
    /// Response header.
    pub header: ResponseHeader,
    /// Watch id.
    pub watch_id: i64,
    /// Batches (in revision order) with at least one event for `shape`.
    pub batches: Vec<Arc<RevBatch>>,
    /// The watch's shape.
    pub shape: Arc<Shape>,
}

impl EventsFrame {
    /// The same response as a message.
    pub fn to_response(&self) -> WatchResponse {
        WatchResponse {
            header: Some(self.header),
            watch_id: self.watch_id,
            events: self.shape.select(&self.batches),
            ..Default::default()
        }
    }
}

impl Frame {
    /// A frame for a response built as a message.
    pub fn msg(resp: WatchResponse) -> Frame {
        Frame::Msg(Box::new(resp))
    }

    /// The frame as a message (for consumers that need one, e.g. the JSON gateway), or the
    /// error that ends the stream.
    pub fn into_response(self) -> Result<WatchResponse, Status> {
        match self {
            Frame::Msg(m) => Ok(*m),
            Frame::Events(e) => Ok(e.to_response()),
            Frame::Error(s) => Err(*s),
        }
    }

    /// The frame as a stream item: errors end the stream.
    pub fn into_item(self) -> Result<Frame, Status> {
        match self {
            Frame::Error(s) => Err(*s),
            f => Ok(f),
        }
    }

    /// Writes the frame as an encoded WatchResponse.
    pub fn encode_to<B: BufMut>(&self, buf: &mut B) -> Result<(), prost::EncodeError> {
        match self {
            Frame::Msg(m) => m.encode(buf),
            Frame::Error(_) => Ok(()),
            Frame::Events(e) => {
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
}

/// Encodes frames, decodes WatchRequests.
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameCodec;

/// The encoding half of [`FrameCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameEncoder;

impl Encoder for FrameEncoder {
    type Item = Frame;
    type Error = Status;

    fn encode(&mut self, item: Frame, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode_to(dst)
            .map_err(|e| Status::internal(format!("encoding watch response: {e}")))
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

/// The decoding half of [`FrameCodec`] (plain protobuf).
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

impl Codec for FrameCodec {
    type Encode = Frame;
    type Decode = WatchRequest;
    type Encoder = FrameEncoder;
    type Decoder = RequestDecoder;

    fn encoder(&mut self) -> FrameEncoder {
        FrameEncoder
    }

    fn decoder(&mut self) -> RequestDecoder {
        RequestDecoder
    }
}

/// Adapts the session to tonic's streaming handler.
struct Handler(WatchService);

impl StreamingService<WatchRequest> for Handler {
    type Response = Frame;
    type ResponseStream = BoxStream<Frame>;
    type Future = std::future::Ready<Result<tonic::Response<BoxStream<Frame>>, Status>>;

    fn call(&mut self, request: tonic::Request<Streaming<WatchRequest>>) -> Self::Future {
        let (metadata, _, stream) = request.into_parts();
        std::future::ready(Ok(tonic::Response::new(
            self.0.session_frames(metadata, stream),
        )))
    }
}

/// The gRPC path of the Watch method.
pub const PATH: &str = "/etcdserverpb.Watch/Watch";

/// Serves one `Watch` call (a whole stream) with the frame encoder.
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
        Grpc::new(FrameCodec).apply_max_message_size_config(Some(max_decoding), Some(usize::MAX));
    grpc.streaming(Handler(svc), req).await
}
