//! etcd-fanout: an etcd v3 proxy that keeps one upstream watch per configured prefix and
//! serves every downstream reader and watcher from a revision-indexed cache.
//!
//! Data flows one way: [`feed`] (upstream watch) -> [`cache`] -> [`hub`] (routing to feeds)
//! -> [`watch`] / [`kv`] (downstream sessions) -> [`server`] (wire). Writes and the non-KV
//! services go straight to etcd through [`upstream`] and [`passthrough`].

pub mod cache;
pub mod codec;
pub mod compaction;
pub mod config;
pub mod error;
pub mod feed;
pub mod gateway;
pub mod http;
pub mod http1;
pub mod hub;
pub mod keys;
pub mod kv;
pub mod metrics;
pub mod passthrough;
pub mod proto;
pub mod range_wire;
pub mod server;
pub mod tls;
pub mod transport;
pub mod upstream;
pub mod watch;
