//! The `KV/Range` gRPC route, answering with [`RangeAnswer`]s: a cached answer is written as
//! a fresh header followed by its shared, already encoded body, so a storm of identical full
//! ranges (every APISIX pod restarting) costs one encoding, not one per request.
//!
//! The other KV methods stay on tonic's generated `KvServer`; this route only swaps the
//! encoder, and speaks exactly the same protocol.

use tonic::body::Body;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::server::{Grpc, UnaryService};
use tonic::Status;

use crate::error::Error;
use crate::proto::etcdserverpb::{RangeRequest, RangeResponse};
use crate::serve::kv::{KvService, RangeAnswer};
use crate::wire::grpc::codec::{EtcdCodec, EtcdDecoder};

/// The gRPC path this route serves.
pub const PATH: &str = "/etcdserverpb.KV/Range";

/// Encodes range answers, decodes range requests (with etcd's error wording).
#[derive(Debug, Clone, Copy, Default)]
pub struct RangeCodec;

/// Encoding half of [`RangeCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct AnswerEncoder;

impl Encoder for AnswerEncoder {
    type Item = RangeAnswer;
    type Error = Status;

    fn encode(&mut self, item: RangeAnswer, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode_to(dst).map_err(|e| Error::Marshal(e).into())
    }
}

impl Codec for RangeCodec {
    type Encode = RangeAnswer;
    type Decode = RangeRequest;
    type Encoder = AnswerEncoder;
    type Decoder = EtcdDecoder<RangeRequest>;

    fn encoder(&mut self) -> AnswerEncoder {
        AnswerEncoder
    }

    fn decoder(&mut self) -> EtcdDecoder<RangeRequest> {
        EtcdCodec::<RangeResponse, RangeRequest>::default().decoder()
    }
}

/// Adapts [`KvService::range_answer`] to tonic's unary handler.
struct Handler(KvService);

impl UnaryService<RangeRequest> for Handler {
    type Response = RangeAnswer;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<tonic::Response<RangeAnswer>, Status>> + Send>,
    >;

    fn call(&mut self, request: tonic::Request<RangeRequest>) -> Self::Future {
        let kv = self.0.clone();
        Box::pin(async move {
            let (metadata, _, req) = request.into_parts();
            let answer = kv.range_answer(&metadata, req).await?;
            Ok(tonic::Response::new(answer))
        })
    }
}

/// Serves one `KV/Range` call with the answer encoder.
pub async fn serve<B>(
    kv: KvService,
    req: http::Request<B>,
    max_decoding: usize,
) -> http::Response<Body>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let mut grpc =
        Grpc::new(RangeCodec).apply_max_message_size_config(Some(max_decoding), Some(usize::MAX));
    grpc.unary(Handler(kv), req).await
}
