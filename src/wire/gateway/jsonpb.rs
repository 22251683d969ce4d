//! The JSON <-> protobuf mapping of etcd's gateway, driven by the etcd descriptors that
//! `build.rs` embeds. It reproduces golang/protobuf 1.3 `jsonpb` as grpc-gateway v1 configures
//! it (`OrigName: true`, `EmitDefaults: false`, unknown fields allowed):
//!
//! Reading (any request message):
//! - field names: proto name or lowerCamelCase; when both are present the camelCase one wins;
//!   a repeated key: the last one wins; unknown keys are ignored;
//! - integers: a JSON number, or a string whose raw inner text is then parsed as JSON (so
//!   `"1"` and `" 1"` are accepted, `"x"` fails with Go's syntax error);
//! - enums: a name (raw, not unescaped) or a number;
//! - bytes: standard padded base64 ([`super::gobase64`]);
//! - `null`: the field is left unset;
//! - every error worded as Go words it (`json: cannot unmarshal ... into Go value of type ...`).
//!
//! Writing (any response message): proto field names in declaration order, 64-bit integers as
//! strings, bytes as base64, known enums by name, zero scalars / empty lists / absent messages
//! omitted, a set oneof member always written. [`write_range_response`] and
//! [`write_watch_response`] write the two hot messages straight from the prost structs; unit
//! tests check them against the generic writer.

use std::collections::HashMap;
use std::sync::LazyLock;

use base64::Engine as _;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage,
    Value as PValue,
};

use super::gobase64;
use super::json::{check_valid, go_quote_bytes, unquote, write_string, Value};
use crate::proto::etcdserverpb::{RangeResponse, ResponseHeader, WatchResponse};
use crate::proto::mvccpb::{Event, KeyValue};

/// A request body that etcd's gateway would refuse; the text is Go's error message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// The etcd descriptors and, per message, its fields in declaration order.
struct Registry {
    pool: DescriptorPool,
    fields: HashMap<String, Vec<FieldDescriptor>>,
}

static REGISTRY: LazyLock<Option<Registry>> = LazyLock::new(|| {
    let bytes: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/etcd_descriptor.bin"));
    let pool = DescriptorPool::decode(bytes).ok()?;
    let mut fields = HashMap::new();
    for m in pool.all_messages() {
        let ordered: Vec<FieldDescriptor> = m
            .descriptor_proto()
            .field
            .iter()
            .filter_map(|f| f.number.and_then(|n| m.get_field(n as u32)))
            .collect();
        fields.insert(m.full_name().to_string(), ordered);
    }
    Some(Registry { pool, fields })
});

fn registry() -> Result<&'static Registry, DecodeError> {
    REGISTRY
        .as_ref()
        .ok_or_else(|| DecodeError("gateway: etcd descriptors unavailable".into()))
}

/// The descriptor of message `full_name` (e.g. `etcdserverpb.RangeRequest`).
fn message(full_name: &str) -> Result<MessageDescriptor, DecodeError> {
    registry()?
        .pool
        .get_message_by_name(full_name)
        .ok_or_else(|| DecodeError(format!("gateway: unknown message {full_name}")))
}

fn ordered_fields(desc: &MessageDescriptor) -> &'static [FieldDescriptor] {
    REGISTRY
        .as_ref()
        .and_then(|r| r.fields.get(desc.full_name()))
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// Go's type name for a proto type (`etcdserverpb.RangeRequest_SortOrder`).
fn go_type_name(full_name: &str, package: &str) -> String {
    match full_name
        .strip_prefix(package)
        .and_then(|r| r.strip_prefix('.'))
    {
        Some(rest) => format!("{package}.{}", rest.replace('.', "_")),
        None => full_name.to_string(),
    }
}

fn type_error(kind: &str, go_type: &str) -> DecodeError {
    DecodeError(format!(
        "json: cannot unmarshal {kind} into Go value of type {go_type}"
    ))
}

/// Decodes one request message of type `full_name` from a parsed JSON value.
pub fn decode<T: prost::Message + Default>(
    full_name: &str,
    value: &Value<'_>,
) -> Result<T, DecodeError> {
    let desc = message(full_name)?;
    let dynamic = decode_message(&desc, value)?;
    let bytes = prost::Message::encode_to_vec(&dynamic);
    T::decode(bytes.as_slice()).map_err(|e| DecodeError(e.to_string()))
}

fn decode_message(
    desc: &MessageDescriptor,
    value: &Value<'_>,
) -> Result<DynamicMessage, DecodeError> {
    let mut msg = DynamicMessage::new(desc.clone());
    let members = match value {
        Value::Null => return Ok(msg),
        Value::Object(m) => m,
        other => return Err(type_error(other.kind_name(), "map[string]json.RawMessage")),
    };
    // Keys decoded once; for each name the last occurrence wins (Go map semantics).
    let keys: Vec<Vec<u8>> = members.iter().map(|(k, _)| unquote(k)).collect();
    let lookup = |name: &str| -> Option<&Value<'_>> {
        keys.iter()
            .rposition(|k| k.as_slice() == name.as_bytes())
            .map(|i| &members[i].1)
    };
    let fields = ordered_fields(desc);
    // Regular fields first, then oneof members (jsonpb's order).
    for pass_oneof in [false, true] {
        for field in fields {
            if field.containing_oneof().is_some() != pass_oneof {
                continue;
            }
            let camel = lookup(field.json_name());
            let orig = lookup(field.name());
            let Some(v) = camel.or(orig) else { continue };
            if let Some(pv) = decode_field(field, v)? {
                msg.set_field(field, pv);
            } else if pass_oneof {
                // jsonpb sets the oneof wrapper even for `null`: the member is present, zero.
                if let Some(zero) = zero_for_oneof(field) {
                    msg.set_field(field, zero);
                }
            }
        }
    }
    Ok(msg)
}

/// The value a oneof member gets when its JSON is `null` (jsonpb still sets the member).
fn zero_for_oneof(field: &FieldDescriptor) -> Option<PValue> {
    Some(match field.kind() {
        Kind::Message(_) => return None,
        k => PValue::default_value(&k),
    })
}

fn decode_field(field: &FieldDescriptor, v: &Value<'_>) -> Result<Option<PValue>, DecodeError> {
    if field.is_list() {
        let items = match v {
            Value::Null => return Ok(None),
            Value::Array(items) => items,
            other => return Err(type_error(other.kind_name(), "[]json.RawMessage")),
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match decode_single(field, item)? {
                Some(pv) => out.push(pv),
                // A `null` element: zero value (Go keeps a nil entry).
                None => out.push(default_single(field)),
            }
        }
        return Ok(Some(PValue::List(out)));
    }
    decode_single(field, v)
}

fn default_single(field: &FieldDescriptor) -> PValue {
    match field.kind() {
        Kind::Message(m) => PValue::Message(DynamicMessage::new(m)),
        k => PValue::default_value(&k),
    }
}

fn decode_single(field: &FieldDescriptor, v: &Value<'_>) -> Result<Option<PValue>, DecodeError> {
    match field.kind() {
        Kind::Message(m) => match v {
            Value::Null => Ok(None),
            v => Ok(Some(PValue::Message(decode_message(&m, v)?))),
        },
        Kind::Enum(e) => {
            let go_name = go_type_name(e.full_name(), e.package_name());
            if let Value::String(raw) = v {
                let name = std::str::from_utf8(raw).unwrap_or("");
                return match e.get_value_by_name(name) {
                    Some(ev) => Ok(Some(PValue::EnumNumber(ev.number()))),
                    None => Err(DecodeError(format!(
                        "unknown value {} for enum {go_name}",
                        go_quote_bytes(raw)
                    ))),
                };
            }
            Ok(decode_int(v, IntType::I32, &go_name)?.map(|n| PValue::EnumNumber(n as i32)))
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Ok(decode_number(v, IntType::I64, "int64")?.map(|n| PValue::I64(n as i64)))
        }
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            Ok(decode_number(v, IntType::I32, "int32")?.map(|n| PValue::I32(n as i32)))
        }
        Kind::Uint64 | Kind::Fixed64 => {
            Ok(decode_number(v, IntType::U64, "uint64")?.map(|n| PValue::U64(n as u64)))
        }
        Kind::Uint32 | Kind::Fixed32 => {
            Ok(decode_number(v, IntType::U32, "uint32")?.map(|n| PValue::U32(n as u32)))
        }
        Kind::Bool => match v {
            Value::Null => Ok(None),
            Value::Bool(b) => Ok(Some(PValue::Bool(*b))),
            other => Err(type_error(other.kind_name(), "bool")),
        },
        Kind::String => match v {
            Value::Null => Ok(None),
            Value::String(raw) => Ok(Some(PValue::String(
                String::from_utf8_lossy(&unquote(raw)).into_owned(),
            ))),
            other => Err(type_error(other.kind_name(), "string")),
        },
        Kind::Bytes => match v {
            Value::Null => Ok(None),
            Value::String(raw) => {
                let decoded =
                    gobase64::decode(&unquote(raw)).map_err(|e| DecodeError(e.to_string()))?;
                Ok(Some(PValue::Bytes(decoded.into())))
            }
            other => Err(type_error(other.kind_name(), "[]uint8")),
        },
        // etcd's API has no floating point fields.
        Kind::Double | Kind::Float => Err(DecodeError(
            "gateway: floating point fields are not supported".into(),
        )),
    }
}

#[derive(Clone, Copy)]
enum IntType {
    I64,
    I32,
    U64,
    U32,
}

/// jsonpb's integer rule: a quoted number loses its quotes (raw, unescaped) and is parsed again.
fn decode_number(v: &Value<'_>, t: IntType, go_type: &str) -> Result<Option<i128>, DecodeError> {
    if let Value::String(raw) = v {
        let inner = check_valid(raw).map_err(|e| DecodeError(e.0))?;
        return decode_int(&inner, t, go_type);
    }
    decode_int(v, t, go_type)
}

/// Go's `json.Unmarshal` of a literal into an integer type.
fn decode_int(v: &Value<'_>, t: IntType, go_type: &str) -> Result<Option<i128>, DecodeError> {
    match v {
        Value::Null => Ok(None),
        Value::Number(text) => {
            let s = std::str::from_utf8(text).unwrap_or("");
            let parsed: Option<i128> = match t {
                IntType::I64 => s.parse::<i64>().ok().map(i128::from),
                IntType::I32 => s.parse::<i32>().ok().map(i128::from),
                IntType::U64 => s.parse::<u64>().ok().map(i128::from),
                IntType::U32 => s.parse::<u32>().ok().map(i128::from),
            };
            parsed
                .map(Some)
                .ok_or_else(|| type_error(&format!("number {s}"), go_type))
        }
        other => Err(type_error(other.kind_name(), go_type)),
    }
}

// ------------------------------------------------------------------------------------------
// Writing
// ------------------------------------------------------------------------------------------

fn write_b64(out: &mut Vec<u8>, b: &[u8]) {
    out.push(b'"');
    let start = out.len();
    out.resize(start + b.len().div_ceil(3) * 4, 0);
    let n = base64::engine::general_purpose::STANDARD
        .encode_slice(b, &mut out[start..])
        .unwrap_or(0);
    out.truncate(start + n);
    out.push(b'"');
}

fn write_quoted_int(out: &mut Vec<u8>, n: impl std::fmt::Display) {
    use std::io::Write as _;
    let _ = write!(out, "\"{n}\"");
}

fn write_int(out: &mut Vec<u8>, n: impl std::fmt::Display) {
    use std::io::Write as _;
    let _ = write!(out, "{n}");
}

/// Encodes any response message as etcd's gateway does.
pub fn encode<T: prost::Message>(full_name: &str, msg: &T) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(&mut out, full_name, msg);
    out
}

/// Appends the JSON of `msg` to `out`.
pub fn encode_into<T: prost::Message>(out: &mut Vec<u8>, full_name: &str, msg: &T) {
    let dynamic = message(full_name)
        .ok()
        .and_then(|d| DynamicMessage::decode(d, msg.encode_to_vec().as_slice()).ok());
    match dynamic {
        Some(m) => write_dynamic(out, &m),
        None => out.extend_from_slice(b"{}"),
    }
}

fn write_dynamic(out: &mut Vec<u8>, msg: &DynamicMessage) {
    out.push(b'{');
    let mut first = true;
    for field in ordered_fields(&msg.descriptor()) {
        let in_oneof = field.containing_oneof().is_some();
        let presence = in_oneof || (matches!(field.kind(), Kind::Message(_)) && !field.is_list());
        if presence && !msg.has_field(field) {
            continue;
        }
        let value = msg.get_field(field);
        if !in_oneof && is_zero(&value) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        out.push(b'"');
        out.extend_from_slice(field.name().as_bytes());
        out.extend_from_slice(b"\":");
        write_value(out, field, &value);
    }
    out.push(b'}');
}

fn is_zero(v: &PValue) -> bool {
    match v {
        PValue::Bool(b) => !b,
        PValue::I32(n) | PValue::EnumNumber(n) => *n == 0,
        PValue::I64(n) => *n == 0,
        PValue::U32(n) => *n == 0,
        PValue::U64(n) => *n == 0,
        PValue::F32(f) => *f == 0.0,
        PValue::F64(f) => *f == 0.0,
        PValue::String(s) => s.is_empty(),
        PValue::Bytes(b) => b.is_empty(),
        PValue::List(l) => l.is_empty(),
        PValue::Map(m) => m.is_empty(),
        PValue::Message(_) => false,
    }
}

fn write_value(out: &mut Vec<u8>, field: &FieldDescriptor, v: &PValue) {
    match v {
        PValue::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        PValue::I32(n) => write_int(out, n),
        PValue::U32(n) => write_int(out, n),
        PValue::I64(n) => write_quoted_int(out, n),
        PValue::U64(n) => write_quoted_int(out, n),
        PValue::F32(f) => write_int(out, f),
        PValue::F64(f) => write_int(out, f),
        PValue::String(s) => write_string(out, s),
        PValue::Bytes(b) => write_b64(out, b),
        PValue::EnumNumber(n) => {
            let name = match field.kind() {
                Kind::Enum(e) => e.get_value(*n).map(|v| v.name().to_string()),
                _ => None,
            };
            match name {
                Some(name) => write_string(out, &name),
                None => write_int(out, n),
            }
        }
        PValue::Message(m) => write_dynamic(out, m),
        PValue::List(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, field, item);
            }
            out.push(b']');
        }
        // etcd's API has no map fields.
        PValue::Map(_) => out.extend_from_slice(b"{}"),
    }
}

// ------------------------------------------------------------------------------------------
// Hot paths: ranges and watch responses, written straight from the prost structs.
// ------------------------------------------------------------------------------------------

/// Writes `"name":` with the separating comma when needed.
fn key(out: &mut Vec<u8>, first: &mut bool, name: &str) {
    if !*first {
        out.push(b',');
    }
    *first = false;
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

/// `ResponseHeader` JSON.
pub fn write_header(out: &mut Vec<u8>, h: &ResponseHeader) {
    out.push(b'{');
    let mut first = true;
    if h.cluster_id != 0 {
        key(out, &mut first, "cluster_id");
        write_quoted_int(out, h.cluster_id);
    }
    if h.member_id != 0 {
        key(out, &mut first, "member_id");
        write_quoted_int(out, h.member_id);
    }
    if h.revision != 0 {
        key(out, &mut first, "revision");
        write_quoted_int(out, h.revision);
    }
    if h.raft_term != 0 {
        key(out, &mut first, "raft_term");
        write_quoted_int(out, h.raft_term);
    }
    out.push(b'}');
}

/// `mvccpb.KeyValue` JSON.
pub fn write_kv(out: &mut Vec<u8>, kv: &KeyValue) {
    out.push(b'{');
    let mut first = true;
    if !kv.key.is_empty() {
        key(out, &mut first, "key");
        write_b64(out, &kv.key);
    }
    if kv.create_revision != 0 {
        key(out, &mut first, "create_revision");
        write_quoted_int(out, kv.create_revision);
    }
    if kv.mod_revision != 0 {
        key(out, &mut first, "mod_revision");
        write_quoted_int(out, kv.mod_revision);
    }
    if kv.version != 0 {
        key(out, &mut first, "version");
        write_quoted_int(out, kv.version);
    }
    if !kv.value.is_empty() {
        key(out, &mut first, "value");
        write_b64(out, &kv.value);
    }
    if kv.lease != 0 {
        key(out, &mut first, "lease");
        write_quoted_int(out, kv.lease);
    }
    out.push(b'}');
}

/// `mvccpb.Event` JSON.
pub fn write_event(out: &mut Vec<u8>, ev: &Event) {
    out.push(b'{');
    let mut first = true;
    if ev.r#type != 0 {
        key(out, &mut first, "type");
        match ev.r#type {
            1 => out.extend_from_slice(b"\"DELETE\""),
            n => write_int(out, n),
        }
    }
    if let Some(kv) = &ev.kv {
        key(out, &mut first, "kv");
        write_kv(out, kv);
    }
    if let Some(kv) = &ev.prev_kv {
        key(out, &mut first, "prev_kv");
        write_kv(out, kv);
    }
    out.push(b'}');
}

/// `RangeResponse` JSON.
pub fn write_range_response(out: &mut Vec<u8>, r: &RangeResponse) {
    out.reserve(
        128 + r
            .kvs
            .iter()
            .map(|kv| 120 + (kv.key.len() + kv.value.len()) * 4 / 3)
            .sum::<usize>(),
    );
    match &r.header {
        Some(h) => {
            write_range_head(out, h);
            write_range_fields(out, r, false);
        }
        None => {
            out.push(b'{');
            write_range_fields(out, r, true);
        }
    }
}

/// The start of a `RangeResponse` JSON with a header: `{"header":{...}`; the rest is
/// [`write_range_tail`].
pub fn write_range_head(out: &mut Vec<u8>, h: &ResponseHeader) {
    out.push(b'{');
    let mut first = true;
    key(out, &mut first, "header");
    write_header(out, h);
}

/// The rest of a `RangeResponse` JSON after [`write_range_head`] (`r`'s own header ignored):
/// what is shared by every answer with the same kvs.
pub fn write_range_tail(out: &mut Vec<u8>, r: &RangeResponse) {
    write_range_fields(out, r, false);
}

/// `kvs`, `more` and `count`, then the closing brace; `first`: nothing written before them.
fn write_range_fields(out: &mut Vec<u8>, r: &RangeResponse, mut first: bool) {
    if !r.kvs.is_empty() {
        key(out, &mut first, "kvs");
        out.push(b'[');
        for (i, kv) in r.kvs.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_kv(out, kv);
        }
        out.push(b']');
    }
    if r.more {
        key(out, &mut first, "more");
        out.extend_from_slice(b"true");
    }
    if r.count != 0 {
        key(out, &mut first, "count");
        write_quoted_int(out, r.count);
    }
    out.push(b'}');
}

/// `WatchResponse` JSON; each event's JSON comes from `event_json` (which may share it
/// between watchers).
pub fn write_watch_response_with(
    out: &mut Vec<u8>,
    w: &WatchResponse,
    mut event_json: impl FnMut(&mut Vec<u8>, &Event),
) {
    out.push(b'{');
    let mut first = true;
    if let Some(h) = &w.header {
        key(out, &mut first, "header");
        write_header(out, h);
    }
    if w.watch_id != 0 {
        key(out, &mut first, "watch_id");
        write_quoted_int(out, w.watch_id);
    }
    if w.created {
        key(out, &mut first, "created");
        out.extend_from_slice(b"true");
    }
    if w.canceled {
        key(out, &mut first, "canceled");
        out.extend_from_slice(b"true");
    }
    if w.compact_revision != 0 {
        key(out, &mut first, "compact_revision");
        write_quoted_int(out, w.compact_revision);
    }
    if !w.cancel_reason.is_empty() {
        key(out, &mut first, "cancel_reason");
        write_string(out, &w.cancel_reason);
    }
    if w.fragment {
        key(out, &mut first, "fragment");
        out.extend_from_slice(b"true");
    }
    if !w.events.is_empty() {
        key(out, &mut first, "events");
        out.push(b'[');
        for (i, ev) in w.events.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            event_json(out, ev);
        }
        out.push(b']');
    }
    out.push(b'}');
}

/// `WatchResponse` JSON.
pub fn write_watch_response(out: &mut Vec<u8>, w: &WatchResponse) {
    write_watch_response_with(out, w, write_event);
}

#[cfg(test)]
mod tests {
    use super::super::json::{Decoder, Next};
    use super::*;
    use crate::proto::etcdserverpb::{
        range_request::SortOrder, RangeRequest, TxnRequest, WatchRequest,
    };
    use bytes::Bytes;

    #[test]
    fn range_head_and_shared_tail_make_the_whole_answer() {
        use crate::proto::mvccpb::KeyValue;
        let kv = |k: &str| KeyValue {
            key: Bytes::from(k.to_string()),
            value: Bytes::from_static(b"v"),
            create_revision: 2,
            mod_revision: 3,
            version: 1,
            lease: 0,
        };
        let header = ResponseHeader {
            cluster_id: 1,
            member_id: 2,
            revision: 9,
            raft_term: 3,
        };
        for (kvs, more, count) in [
            (vec![kv("/a"), kv("/b")], true, 5),
            (vec![], false, 0),
            (vec![], false, 7),
        ] {
            let r = RangeResponse {
                header: Some(header),
                kvs,
                more,
                count,
            };
            let mut whole = Vec::new();
            write_range_response(&mut whole, &r);
            let mut split = Vec::new();
            write_range_head(&mut split, &header);
            write_range_tail(&mut split, &r);
            assert_eq!(String::from_utf8(split), String::from_utf8(whole));
        }
    }

    fn parse(s: &str) -> Value<'_> {
        match Decoder::new(s.as_bytes()).next_value() {
            Ok(Next::Value(v)) => v,
            other => panic!("{other:?}"),
        }
    }

    fn range(s: &str) -> Result<RangeRequest, DecodeError> {
        decode("etcdserverpb.RangeRequest", &parse(s))
    }

    fn err(s: &str) -> String {
        range(s).unwrap_err().0
    }

    #[test]
    fn request_names_numbers_enums() {
        let r = range(
            r#"{"key":"YQ==","rangeEnd":"ZA==","limit":"2","sort_order":"DESCEND","keysOnly":true}"#,
        )
        .unwrap();
        assert_eq!(&r.key[..], b"a");
        assert_eq!(&r.range_end[..], b"d");
        assert_eq!(r.limit, 2);
        assert_eq!(r.sort_order, SortOrder::Descend as i32);
        assert!(r.keys_only);
        let r = range(r#"{"key":"YQ==","sort_order":2,"limit":" 1","revision":null}"#).unwrap();
        assert_eq!(r.sort_order, 2);
        assert_eq!(r.limit, 1);
        // camelCase wins over the proto name; the last duplicate wins.
        let r = range(r#"{"keys_only":true,"keysOnly":false,"key":"YQ==","key":"Yg=="}"#).unwrap();
        assert!(!r.keys_only);
        assert_eq!(&r.key[..], b"b");
        assert_eq!(range("null").unwrap(), RangeRequest::default());
    }

    #[test]
    fn request_errors_worded_like_go() {
        // Every message below was read from etcd 3.4.23's gateway.
        assert_eq!(
            err(r#"{"limit":1.5}"#),
            "json: cannot unmarshal number 1.5 into Go value of type int64"
        );
        assert_eq!(
            err(r#"{"limit":"x"}"#),
            "invalid character 'x' looking for beginning of value"
        );
        assert_eq!(
            err(r#"{"limit":true}"#),
            "json: cannot unmarshal bool into Go value of type int64"
        );
        assert_eq!(
            err(r#"{"keys_only":"true"}"#),
            "json: cannot unmarshal string into Go value of type bool"
        );
        assert_eq!(
            err(r#"{"keys_only":1}"#),
            "json: cannot unmarshal number into Go value of type bool"
        );
        assert_eq!(
            err(r#"{"key":5}"#),
            "json: cannot unmarshal number into Go value of type []uint8"
        );
        assert_eq!(
            err("[1]"),
            "json: cannot unmarshal array into Go value of type map[string]json.RawMessage"
        );
        assert_eq!(
            err(r#"{"sort_order":"FOO"}"#),
            "unknown value \"FOO\" for enum etcdserverpb.RangeRequest_SortOrder"
        );
        assert_eq!(
            err(r#"{"key":"YQ="}"#),
            "illegal base64 data at input byte 3"
        );
        assert_eq!(
            err(r#"{"limit":99999999999999999999}"#),
            "json: cannot unmarshal number 99999999999999999999 into Go value of type int64"
        );
    }

    #[test]
    fn oneofs_and_nested() {
        let t: TxnRequest = decode(
            "etcdserverpb.TxnRequest",
            &parse(
                r#"{"compare":[{"key":"YQ==","result":"EQUAL","target":"MOD","mod_revision":"0"}],
                   "success":[{"requestPut":{"key":"YQ==","value":"MQ=="}}]}"#,
            ),
        )
        .unwrap();
        assert_eq!(t.compare.len(), 1);
        assert!(
            t.compare[0].target_union.is_some(),
            "oneof member set even when zero"
        );
        assert_eq!(t.success.len(), 1);
        let w: WatchRequest = decode(
            "etcdserverpb.WatchRequest",
            &parse(r#"{"create_request":{"key":"L2FwaXNpeC8=","range_end":"L2FwaXNpeDA=","start_revision":5}}"#),
        )
        .unwrap();
        assert!(w.request_union.is_some());
    }

    fn kv(k: &str, v: &str, rev: i64) -> KeyValue {
        KeyValue {
            key: Bytes::from(k.to_string()),
            value: Bytes::from(v.to_string()),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: 0,
        }
    }

    #[test]
    fn fast_writers_match_generic() {
        let header = ResponseHeader {
            cluster_id: 12101053776118486841,
            member_id: 1,
            revision: 9,
            raft_term: 2,
        };
        for r in [
            RangeResponse::default(),
            RangeResponse {
                header: Some(header),
                kvs: vec![kv("a", "1", 2), kv("b", "", 3)],
                more: true,
                count: 7,
            },
            RangeResponse {
                header: Some(ResponseHeader::default()),
                ..Default::default()
            },
        ] {
            let mut fast = Vec::new();
            write_range_response(&mut fast, &r);
            assert_eq!(
                String::from_utf8(fast).unwrap(),
                String::from_utf8(encode("etcdserverpb.RangeResponse", &r)).unwrap()
            );
        }
        for w in [
            WatchResponse {
                header: Some(header),
                watch_id: -1,
                created: true,
                canceled: true,
                cancel_reason: "mvcc: <x> & \"y\"".into(),
                ..Default::default()
            },
            WatchResponse {
                header: Some(header),
                watch_id: 3,
                compact_revision: 4,
                fragment: true,
                events: vec![
                    Event {
                        r#type: 0,
                        kv: Some(kv("a", "1", 2)),
                        prev_kv: None,
                    },
                    Event {
                        r#type: 1,
                        kv: Some(KeyValue {
                            key: Bytes::from_static(b"a"),
                            mod_revision: 3,
                            ..Default::default()
                        }),
                        prev_kv: Some(kv("a", "1", 2)),
                    },
                    Event {
                        r#type: 7,
                        kv: None,
                        prev_kv: None,
                    },
                ],
                ..Default::default()
            },
        ] {
            let mut fast = Vec::new();
            write_watch_response(&mut fast, &w);
            assert_eq!(
                String::from_utf8(fast).unwrap(),
                String::from_utf8(encode("etcdserverpb.WatchResponse", &w)).unwrap()
            );
        }
    }

    #[test]
    fn generic_writer_shapes() {
        let r = RangeResponse {
            header: Some(ResponseHeader {
                revision: 9,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            String::from_utf8(encode("etcdserverpb.RangeResponse", &r)).unwrap(),
            r#"{"header":{"revision":"9"}}"#
        );
    }
}
