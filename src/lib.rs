//! etcd-fanout: an etcd v3 proxy that keeps one upstream watch per configured prefix and
//! serves every downstream reader and watcher from a revision-indexed cache.
//!
//! Data flows one way: [`source`] (upstream watch -> cache -> hub) -> [`serve`] (KV and Watch
//! sessions, pass-through services) -> [`wire`] (the listener, gRPC and HTTP/JSON encoders).
//! Writes and the non-KV services go straight to etcd through [`source::upstream`] and
//! [`serve::passthrough`].

pub mod config;
pub mod error;
pub mod keys;
pub mod metrics;
pub mod proto;
pub mod serve;
pub mod source;
pub mod tls;
pub mod wire;

pub use serve::kv;
pub use wire::grpc::codec;
