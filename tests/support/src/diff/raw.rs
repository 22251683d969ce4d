//! Raw gRPC calls with arbitrary request bytes (malformed protobuf, unknown fields): a codec
//! that passes bytes through, for unary and bidirectional calls.

use std::time::Duration;

use tokio::sync::mpsc;

/// Raw gRPC unary call with an arbitrary request body (for malformed protobuf tests).
pub async fn raw_unary(
    url: &str,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let ch = crate::channel(url).await;
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("not ready: {e}")))?;
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(|r| r.into_inner())
}

/// Raw gRPC bidi call: sends the given frames (keeping the request side open), returns the
/// raw response frames received within `t` and the final error status, if any.
pub async fn raw_streaming(
    url: &str,
    path: &'static str,
    frames: Vec<Vec<u8>>,
    t: Duration,
) -> (Vec<Vec<u8>>, Option<tonic::Status>) {
    let ch = crate::channel(url).await;
    let mut grpc = tonic::client::Grpc::new(ch);
    if let Err(e) = grpc.ready().await {
        return (
            vec![],
            Some(tonic::Status::unavailable(format!("not ready: {e}"))),
        );
    }
    let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
    for f in frames {
        let _ = tx.send(f);
    }
    let fut = grpc.streaming(
        tonic::Request::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    );
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + t;
    let mut s = match tokio::time::timeout_at(deadline, fut).await {
        Err(_) => return (out, None),
        Ok(Err(st)) => return (out, Some(st)),
        Ok(Ok(r)) => r.into_inner(),
    };
    let mut status = None;
    loop {
        match tokio::time::timeout_at(deadline, s.message()).await {
            Err(_) => break,
            Ok(Ok(Some(m))) => out.push(m),
            Ok(Ok(None)) => break,
            Ok(Err(st)) => {
                status = Some(st);
                break;
            }
        }
    }
    drop(tx);
    (out, status)
}

/// A codec passing raw bytes through.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;
pub struct RawEnc;
pub struct RawDec;

impl tonic::codec::Encoder for RawEnc {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let mut v = vec![0u8; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEnc;
    type Decoder = RawDec;
    fn encoder(&mut self) -> RawEnc {
        RawEnc
    }
    fn decoder(&mut self) -> RawDec {
        RawDec
    }
}
