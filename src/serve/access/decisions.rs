//! etcd's permission decisions for tokens, asked of etcd itself and shared.
//!
//! etcd decides a Range or a Watch create from `(identity, key, range_end)` only (options such
//! as `limit`, `revision` or `serializable` play no part, `auth/store.go` `IsRangePermitted`).
//! So on a miss the proxy forwards one probe, `Range{key, range_end, count_only, limit: 1}`
//! (linearizable, as a default read) carrying the caller's token, and etcd's answer *is* the
//! decision: allowed, or etcd's exact error (`permission denied`, `invalid auth token`, ...).
//! Root, role unions, adjacent grants and inverted ranges are all etcd's own evaluation.
//!
//! The table is keyed by `(epoch, token, key, range_end)`, bounded in entries (least useful
//! dropped first) and each answer is remembered for a bounded time: allows for
//! `--auth-decision-ttl`, denials for `--auth-denial-ttl`, `revision of auth store is old`
//! (a race on etcd, or a JWT the caller must renew) not at all. Concurrent requests for the same
//! key wait for one probe (single flight): a storm of watch creates by one identity costs etcd
//! one Range. A probe that fails otherwise (etcd unreachable, timeout) decides nothing: the
//! caller forwards its request and etcd answers it.
//!
//! **One probe per configured prefix.** A request the cache answers lies inside one cached
//! prefix, and the caller passes that prefix as the request's *cover*. The cover is decided
//! first (the same table, the same single flight): when etcd allows the token the whole
//! prefix, every non-empty range and key inside it is allowed too, by etcd's own rule (etcd
//! 3.4 `auth/range_perm_cache.go`: a range is permitted when the union of the user's
//! permission intervals `Contains` it, a key when a permission interval `Intersects` it; a
//! union that covers the prefix covers each part of it), so a burst of creates on distinct
//! keys costs one probe per token and prefix instead of one per key. A token etcd refuses as
//! such (`invalid auth token`, `user name is empty`) is refused whatever the key, so that
//! answer stands for every key too. When the prefix is only `permission denied` (a user
//! allowed part of it, or nothing), the request's own range is probed as before: a prefix
//! denial never denies a key. Empty (inverted) ranges are always probed as they are. The
//! cover's decision expires and is dropped with the epoch like any other, so a revocation
//! takes effect within `--auth-decision-ttl` as before.
//!
//! **Then one probe per directory.** Users are usually granted directories (`/apisix/routes/`
//! as a prefix permission), not the whole cached prefix. When the cover is `permission
//! denied`, the deepest directory inside it that holds the request (the longest prefix of the
//! key ending in `/`, see [`directory`]) is decided next, by the same rule: allowed, it stands
//! for every key and range in it. Denied, the request's own range is probed, so a key granted
//! alone inside a denied directory is still allowed. A sub-prefix user's burst of creates on
//! distinct keys costs one probe per directory it reads, not one per key; keys it may not
//! read still cost one probe each (no denial is inferred from a wider one).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::future::Cache;
use moka::Expiry;
use tonic::metadata::AsciiMetadataValue;
use tonic::{Code, Request, Status};

use super::identity::TOKEN;
use crate::keys::KeyRange;
use crate::metrics;
use crate::proto::etcdserverpb::RangeRequest;
use crate::source::upstream::Upstream;

/// Longest wait for a probe's answer before the request is forwarded instead.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// etcd's refusals a probe can get (`rpctypes`), and whether to remember them.
const REFUSALS: [(&str, bool); 4] = [
    ("etcdserver: permission denied", true),
    ("etcdserver: invalid auth token", true),
    ("etcdserver: user name is empty", true),
    ("etcdserver: revision of auth store is old", false),
];

/// etcd's refusals that do not depend on the key: the token itself is refused (etcd reads the
/// caller's identity before it looks at any permission).
const TOKEN_REFUSALS: [&str; 2] = [
    "etcdserver: invalid auth token",
    "etcdserver: user name is empty",
];

/// What the table is keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    /// Decision epoch (see `state.rs`): a decision never outlives an auth state change.
    epoch: u64,
    /// The caller's token, as etcd reads it.
    token: Bytes,
    /// Start of the requested range.
    key: Bytes,
    /// End of the requested range (empty: one key; `\0`: to the end of the keyspace).
    range_end: Bytes,
}

/// etcd's decision for one key.
#[derive(Debug, Clone)]
pub enum Decision {
    /// etcd answered the probe: the caller may read the range.
    Allow,
    /// etcd refused the probe with this status.
    Deny {
        /// gRPC code etcd used.
        code: Code,
        /// etcd's message.
        message: Arc<str>,
        /// Remembered for the denial TTL (false: used by the waiters of this probe only).
        remember: bool,
    },
}

impl Decision {
    /// etcd's status of a denial.
    pub fn status(&self) -> Option<Status> {
        match self {
            Decision::Allow => None,
            Decision::Deny { code, message, .. } => Some(Status::new(*code, &**message)),
        }
    }
}

/// How long each decision is remembered.
#[derive(Debug)]
struct Ttl {
    /// Allows.
    allow: Duration,
    /// Remembered denials.
    deny: Duration,
}

impl Expiry<Key, Decision> for Ttl {
    fn expire_after_create(&self, _: &Key, d: &Decision, _: Instant) -> Option<Duration> {
        Some(match d {
            Decision::Allow => self.allow,
            Decision::Deny { remember: true, .. } => self.deny,
            Decision::Deny {
                remember: false, ..
            } => Duration::ZERO,
        })
    }
}

/// A probe that decided nothing (etcd unreachable, timeout, an unexpected error).
#[derive(Debug)]
pub struct Undecided;

/// The shared decision table.
pub struct Decisions {
    /// `(epoch, token, key, range_end)` -> decision; bounded, expiring, single flight.
    table: Cache<Key, Decision>,
}

impl std::fmt::Debug for Decisions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decisions")
            .field("entries", &self.table.entry_count())
            .finish()
    }
}

impl Decisions {
    /// A table of at most `entries` decisions, remembered for `allow` / `deny`.
    pub fn new(entries: u64, allow: Duration, deny: Duration) -> Decisions {
        Decisions {
            table: Cache::builder()
                .max_capacity(entries)
                .expire_after(Ttl { allow, deny })
                .build(),
        }
    }

    /// etcd's decision for `token` on `[key, range_end)`, probing etcd on a miss. `cover`: the
    /// cached prefix the range lies in, decided first (see the module doc).
    pub async fn decide(
        &self,
        upstream: &Upstream,
        epoch: u64,
        token: &AsciiMetadataValue,
        key: &Bytes,
        range_end: &Bytes,
        cover: Option<&KeyRange>,
    ) -> Result<Decision, Undecided> {
        let requested = KeyRange::new(key, range_end);
        if let Some(cover) = cover.filter(|c| !requested.is_empty() && c.covers(&requested)) {
            let whole = self.decide_range(upstream, epoch, token, cover).await?;
            let same = cover.start == *key && cover.range_end() == *range_end;
            match &whole {
                Decision::Allow => return Ok(whole),
                Decision::Deny { message, .. } if TOKEN_REFUSALS.contains(&&**message) => {
                    return Ok(whole)
                }
                // The request is the prefix itself: etcd has answered it.
                Decision::Deny { .. } if same => return Ok(whole),
                Decision::Deny { .. } => {}
            }
            if let Some(dir) = directory(cover, &requested) {
                let decided = self.decide_range(upstream, epoch, token, &dir).await?;
                if let Decision::Allow = decided {
                    return Ok(decided);
                }
            }
        }
        self.decide_exactly(upstream, epoch, token, key, range_end)
            .await
    }

    /// etcd's decision for `token` on exactly `range` (a cover or a directory).
    async fn decide_range(
        &self,
        upstream: &Upstream,
        epoch: u64,
        token: &AsciiMetadataValue,
        range: &KeyRange,
    ) -> Result<Decision, Undecided> {
        self.decide_exactly(upstream, epoch, token, &range.start, &range.range_end())
            .await
    }

    /// etcd's decision for `token` on exactly `[key, range_end)`.
    async fn decide_exactly(
        &self,
        upstream: &Upstream,
        epoch: u64,
        token: &AsciiMetadataValue,
        key: &Bytes,
        range_end: &Bytes,
    ) -> Result<Decision, Undecided> {
        let k = Key {
            epoch,
            token: Bytes::copy_from_slice(token.as_bytes()),
            key: key.clone(),
            range_end: range_end.clone(),
        };
        let entry = self
            .table
            .entry(k)
            .or_try_insert_with(probe(upstream, token, key, range_end))
            .await
            .map_err(|_| Undecided)?;
        if !entry.is_fresh() {
            metrics::AUTH_DECISION_HITS.inc();
        }
        Ok(entry.into_value())
    }

    /// Forgets every decision (their epochs already keep them from being used).
    pub fn clear(&self) {
        self.table.invalidate_all();
    }
}

/// The deepest directory strictly inside `cover` that holds all of `requested` and is not
/// `requested` itself: the keys starting with the longest prefix of `requested`'s start that
/// ends in `/` and is longer than the cover's own start. `None` when there is none (a range
/// across directories, a key right under the cover).
fn directory(cover: &KeyRange, requested: &KeyRange) -> Option<KeyRange> {
    let key = &requested.start;
    let inside = key.get(cover.start.len()..)?;
    let mut ends = inside.iter().enumerate().rev().filter(|(_, &c)| c == b'/');
    ends.find_map(|(i, _)| {
        let dir = KeyRange::prefix(&key[..cover.start.len() + i + 1]);
        (dir.covers(requested) && dir != *requested && cover.covers(&dir)).then_some(dir)
    })
}

/// Asks etcd: one `count_only` Range of the whole requested range with the caller's token.
async fn probe(
    upstream: &Upstream,
    token: &AsciiMetadataValue,
    key: &Bytes,
    range_end: &Bytes,
) -> Result<Decision, Undecided> {
    metrics::AUTH_PROBES.inc();
    metrics::Upstream::PermissionProbe.inc();
    let mut req = Request::new(RangeRequest {
        key: key.clone(),
        range_end: range_end.clone(),
        count_only: true,
        limit: 1,
        ..Default::default()
    });
    req.metadata_mut().insert(TOKEN, token.clone());
    req.set_timeout(PROBE_TIMEOUT);
    match tokio::time::timeout(PROBE_TIMEOUT, upstream.kv().range(req)).await {
        // (Its header is not recorded as etcd's revision, for the reason given in `state.rs`.)
        Ok(Ok(_)) => Ok(Decision::Allow),
        Ok(Err(s)) => match REFUSALS.iter().find(|(m, _)| *m == s.message()) {
            Some((_, remember)) => Ok(Decision::Deny {
                code: s.code(),
                message: s.message().into(),
                remember: *remember,
            }),
            None => {
                tracing::debug!(error = %s, "permission probe failed");
                Err(Undecided)
            }
        },
        Err(_) => Err(Undecided),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(k: &str, e: &str) -> KeyRange {
        KeyRange::new(&Bytes::from(k.to_string()), &Bytes::from(e.to_string()))
    }

    fn dir_of(k: &str, e: &str) -> Option<(String, String)> {
        directory(&KeyRange::prefix(b"/apisix/"), &r(k, e)).map(|d| {
            (
                String::from_utf8_lossy(&d.start).into_owned(),
                String::from_utf8_lossy(&d.range_end()).into_owned(),
            )
        })
    }

    fn some(k: &str, e: &str) -> Option<(String, String)> {
        Some((k.to_string(), e.to_string()))
    }

    #[test]
    fn the_deepest_directory_holding_the_request() {
        assert_eq!(
            dir_of("/apisix/routes/1", ""),
            some("/apisix/routes/", "/apisix/routes0")
        );
        assert_eq!(
            dir_of("/apisix/a/b/c", ""),
            some("/apisix/a/b/", "/apisix/a/b0")
        );
        // A range inside one directory; one reaching out of the deepest takes the next.
        assert_eq!(
            dir_of("/apisix/routes/1", "/apisix/routes/3"),
            some("/apisix/routes/", "/apisix/routes0")
        );
        assert_eq!(
            dir_of("/apisix/a/b/c", "/apisix/a/c"),
            some("/apisix/a/", "/apisix/a0")
        );
        // A key ending in `/` is held by its own directory.
        assert_eq!(
            dir_of("/apisix/routes/", ""),
            some("/apisix/routes/", "/apisix/routes0")
        );
    }

    #[test]
    fn no_directory_for_the_directory_itself_or_across_directories() {
        assert_eq!(dir_of("/apisix/routes/", "/apisix/routes0"), None);
        assert_eq!(dir_of("/apisix/x", ""), None);
        assert_eq!(dir_of("/apisix/a", "/apisix/m"), None);
        assert_eq!(dir_of("/apisix/routes/1", "\0"), None);
        assert_eq!(dir_of("/apisix/routes/1", "/apisix/upstreams/"), None);
    }
}
