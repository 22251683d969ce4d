//! gRPC on the wire: the protobuf codec of every generated service, and the two routes served
//! with encoders of their own that share encoded bytes (`KV/Range`, `Watch/Watch`).

pub mod codec;
pub mod range;
