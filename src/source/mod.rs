//! The source layer: the upstream etcd channel with the proxy's own identity on it, one feed
//! per configured prefix (load, watch, backfill, sync check), etcd's current revision learnt
//! by shared rounds (the `created` header), the revision-indexed cache it fills, etcd's
//! compaction revision as known, the dispatch index that tells sessions which revisions
//! concern their watches, the upstream watch streams relayed watches share per identity, and
//! the hub that routes a key range to its feed.

pub mod cache;
pub mod clock;
pub mod compaction;
pub mod feed;
pub mod hub;
pub mod index;
pub mod registry;
pub mod relay_streams;
pub mod upstream;
