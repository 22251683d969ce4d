//! The protobuf codec of every generated etcd service: prost underneath, with decode errors
//! worded as etcd's Go server words them (`grpc: error unmarshalling request: unexpected EOF`,
//! `proto: wrong wireType = 0 for field Key`, ...), so malformed requests get etcd's answer.

use std::any::TypeId;
use std::marker::PhantomData;

use bytes::Buf;

use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

use crate::error::Error;
use crate::proto::etcdserverpb::TxnRequest;

/// Prefix of etcd's (grpc-go's) error for an undecodable unary request.
pub const UNARY_DECODE_PREFIX: &str = "grpc: error unmarshalling request: ";
/// Prefix of grpc-go's error for an undecodable message on a request stream.
pub const STREAM_DECODE_PREFIX: &str = "grpc: failed to unmarshal the received message ";

/// Codec for messages `T` (encoded) and `U` (decoded).
#[derive(Debug)]
pub struct EtcdCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for EtcdCodec<T, U> {
    fn default() -> Self {
        EtcdCodec(PhantomData)
    }
}

/// Encoder half of [`EtcdCodec`].
#[derive(Debug)]
pub struct EtcdEncoder<T>(PhantomData<T>);

/// Decoder half of [`EtcdCodec`].
#[derive(Debug)]
pub struct EtcdDecoder<U>(PhantomData<U>);

impl<T: Message + Send + 'static, U: Message + Default + Send + 'static> Codec for EtcdCodec<T, U> {
    type Encode = T;
    type Decode = U;
    type Encoder = EtcdEncoder<T>;
    type Decoder = EtcdDecoder<U>;

    fn encoder(&mut self) -> EtcdEncoder<T> {
        EtcdEncoder(PhantomData)
    }

    fn decoder(&mut self) -> EtcdDecoder<U> {
        EtcdDecoder(PhantomData)
    }
}

impl<T: Message> Encoder for EtcdEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| crate::error::Error::Marshal(e).into())
    }
}

impl<U: Message + Default + 'static> Decoder for EtcdDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        if TypeId::of::<U>() == TypeId::of::<TxnRequest>() {
            let bytes = buf.copy_to_bytes(buf.remaining());
            if txn_depth(&bytes) > MAX_TXN_DEPTH {
                // etcd's answer with its default `--max-txn-ops` (128): every level counts one
                // operation, so anything deeper than 128 is refused so.
                return Err(Error::TooManyOps.into());
            }
            return U::decode(bytes)
                .map(Some)
                .map_err(|e| Status::internal(format!("{UNARY_DECODE_PREFIX}{}", go_error(&e))));
        }
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(format!("{UNARY_DECODE_PREFIX}{}", go_error(&e))))
    }
}

/// Deepest Txn nesting decoded. etcd decodes any depth and refuses more than 128 levels with
/// its default `--max-txn-ops` ("too many operations in txn request"); prost's default limit
/// of 100 nested messages refused Txns nested 50 deep (two messages a level), so prost's limit
/// is off (`no-recursion-limit`) and this bound, checked without recursion before decoding,
/// keeps every recursive walk of a Txn (decode, checks, encode, drop) inside half a task's
/// stack in a debug build. Deeper Txns get etcd's too-many-operations answer.
pub const MAX_TXN_DEPTH: usize = 256;

/// How deep Txns nest in an encoded `TxnRequest` (1 for a flat one), read without recursion
/// and without decoding; malformed input stops the walk (the decoder reports it).
pub fn txn_depth(buf: &[u8]) -> usize {
    // Each entry: the unread rest of a message, and whether it is a Txn (else a RequestOp).
    let mut stack: Vec<(&[u8], bool)> = vec![(buf, true)];
    let mut txns = 1;
    let mut deepest = 1;
    while let Some((mut rest, is_txn)) = stack.pop() {
        let Some((field, wire, value)) = next_field(&mut rest) else {
            if is_txn {
                txns -= 1;
            }
            continue;
        };
        stack.push((rest, is_txn));
        let nested = match (is_txn, field, wire) {
            // TxnRequest.success / .failure: RequestOp.
            (true, 2 | 3, 2) => Some(false),
            // RequestOp.request_txn: TxnRequest.
            (false, 4, 2) => Some(true),
            _ => None,
        };
        if let Some(child_is_txn) = nested {
            if child_is_txn {
                txns += 1;
                deepest = deepest.max(txns);
            }
            stack.push((value, child_is_txn));
        }
    }
    deepest
}

/// Reads one field: (number, wire type, length-delimited payload or empty); `None` at the end
/// or on malformed input.
fn next_field<'a>(rest: &mut &'a [u8]) -> Option<(u64, u8, &'a [u8])> {
    if rest.is_empty() {
        return None;
    }
    let key = prost::encoding::decode_varint(rest).ok()?;
    let (field, wire) = (key >> 3, (key & 7) as u8);
    let skip = match wire {
        0 => {
            prost::encoding::decode_varint(rest).ok()?;
            0
        }
        1 => 8,
        5 => 4,
        2 => {
            let len = usize::try_from(prost::encoding::decode_varint(rest).ok()?).ok()?;
            if len > rest.len() {
                return None;
            }
            let (value, tail) = rest.split_at(len);
            *rest = tail;
            return Some((field, wire, value));
        }
        _ => return None,
    };
    if skip > rest.len() {
        return None;
    }
    *rest = &rest[skip..];
    Some((field, wire, &[]))
}

/// etcd's (gogoproto's) wording of a protobuf decode error.
pub fn go_error(e: &prost::DecodeError) -> String {
    // prost: "failed to decode Protobuf message: Msg.field: description".
    let text = e.to_string();
    let rest = text
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(&text);
    // Strip the "Message.field: " location segments, remembering the innermost field.
    let mut description = rest;
    let mut field = "";
    while let Some((head, tail)) = description.split_once(": ") {
        let is_location = head.split_once('.').is_some_and(|(m, f)| {
            !m.is_empty()
                && !f.is_empty()
                && head
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._#".contains(c))
        });
        if !is_location {
            break;
        }
        field = head.rsplit_once('.').map_or("", |(_, f)| f);
        description = tail;
    }
    if let Some(wire) = description
        .strip_prefix("invalid wire type: ")
        .and_then(|d| d.split(' ').next())
    {
        return format!(
            "proto: wrong wireType = {} for field {}",
            wire_number(wire),
            go_field_name(field)
        );
    }
    if let Some(n) = description.strip_prefix("invalid wire type value: ") {
        return format!("proto: illegal wireType {n}");
    }
    if description.starts_with("invalid varint") && !description.contains("underflow") {
        // prost reports truncated and overlong varints alike; truncation is the common case.
        return "unexpected EOF".to_string();
    }
    if description.contains("buffer underflow") || description.contains("delimited length exceeded")
    {
        return "unexpected EOF".to_string();
    }
    description.to_string()
}

/// prost's wire type name to its number.
fn wire_number(name: &str) -> u8 {
    match name {
        "Varint" => 0,
        "SixtyFourBit" => 1,
        "LengthDelimited" => 2,
        "StartGroup" => 3,
        "EndGroup" => 4,
        "ThirtyTwoBit" => 5,
        _ => 7,
    }
}

/// `range_end` -> `RangeEnd`, `r#type` -> `Type`.
fn go_field_name(field: &str) -> String {
    field
        .trim_start_matches("r#")
        .split('_')
        .map(|part| {
            let mut c = part.chars();
            match c.next() {
                Some(f) => f.to_uppercase().chain(c).collect::<String>(),
                None => String::new(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::request_op::Request as Op;
    use crate::proto::etcdserverpb::{RangeRequest, RequestOp};

    fn nested(depth: usize) -> TxnRequest {
        let mut t = TxnRequest {
            success: vec![RequestOp {
                request: Some(Op::RequestRange(RangeRequest {
                    key: "k".into(),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        for _ in 1..depth {
            t = TxnRequest {
                failure: vec![RequestOp {
                    request: Some(Op::RequestTxn(t)),
                }],
                ..Default::default()
            };
        }
        t
    }

    #[test]
    fn txn_depth_is_measured_without_recursion() {
        for depth in [1, 2, 50, 128, 256, 1000] {
            assert_eq!(txn_depth(&nested(depth).encode_to_vec()), depth);
        }
        assert_eq!(txn_depth(&[0x12, 0x05, 0x22]), 1);
    }

    #[test]
    fn deepest_accepted_txn_fits_a_task_stack() {
        // Half a tokio worker's stack (2 MiB), in a debug build: decode, encode, drop.
        let bytes = nested(MAX_TXN_DEPTH).encode_to_vec();
        let t = std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(move || {
                let txn = TxnRequest::decode(&bytes[..]).map_err(|e| e.to_string())?;
                let again = txn.encode_to_vec();
                drop(txn);
                Ok::<_, String>(again == bytes)
            })
            .map_err(|e| e.to_string())
            .and_then(|h| h.join().map_err(|_| "stack overflow".to_string()));
        assert_eq!(t, Ok(Ok(true)));
    }

    #[test]
    fn errors_read_like_etcd() {
        // Field 1 (key) announced as a varint.
        let e = RangeRequest::decode(&[0x08u8, 0x01][..]).unwrap_err();
        assert_eq!(go_error(&e), "proto: wrong wireType = 0 for field Key");
        // Key of length 5 with 2 bytes.
        let e = RangeRequest::decode(&[0x0au8, 0x05, b'a', b'b'][..]).unwrap_err();
        assert_eq!(go_error(&e), "unexpected EOF");
        // A truncated varint.
        let e = RangeRequest::decode(&[0x18u8, 0xff][..]).unwrap_err();
        assert_eq!(go_error(&e), "unexpected EOF");
        assert_eq!(go_field_name("range_end"), "RangeEnd");
    }
}
