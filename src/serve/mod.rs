//! The serving layer: the etcd services as downstream clients see them, whatever the wire:
//! KV (cached ranges, forwarded writes), Watch (sessions of cursors over the caches) and the
//! services passed through to etcd.

pub mod kv;
pub mod passthrough;
pub mod watch;
