//! The protobuf codec of every generated etcd service: prost underneath, with decode errors
//! worded as etcd's Go server words them (`grpc: error unmarshalling request: unexpected EOF`,
//! `proto: wrong wireType = 0 for field Key`, ...), so malformed requests get etcd's answer.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

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

impl<U: Message + Default> Decoder for EtcdDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(format!("{UNARY_DECODE_PREFIX}{}", go_error(&e))))
    }
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
    use crate::proto::etcdserverpb::RangeRequest;

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
