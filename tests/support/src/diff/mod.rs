//! Differential testing helpers: run one scenario against a reference etcd (direct) and against
//! a target (etcd-fanout in front of a second, fresh etcd), record everything each side answers
//! in a [`Rec`] transcript, normalise the fields that legitimately differ between two etcd
//! clusters (`cluster_id`, `member_id`, `raft_term`) and compare with a readable line diff.
//!
//! Self-check mode: with `ETCD_FANOUT_DIFF_SELFCHECK=1` the target side is a second plain etcd
//! (no proxy). Every test must pass in that mode; it validates that the scenarios themselves are
//! deterministic.
//!
//! Watch transcripts are recorded message by message. Inside one `expect` batch the messages
//! are stable-sorted by watch id, because etcd itself delivers the responses of different
//! watches on one stream in map order (random) when one revision touches several watches;
//! the order of the messages of one watch is kept as received.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

pub use crate::range_end;

mod compare;
mod env;
mod kv;
mod raw;
mod transcript;
mod watch;

pub use compare::*;
pub use env::*;
pub use kv::*;
pub use raw::*;
pub use transcript::*;
pub use watch::*;

/// Default per-message timeout while waiting for an expected answer.
pub const MSG_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stream must stay quiet after an answer for the answer to count as whole.
pub const SETTLE: Duration = Duration::from_millis(250);
/// Default backstop for one scenario run.
pub const SCENARIO_TIMEOUT: Duration = Duration::from_secs(45);

/// True when the target side must be a plain etcd (validates the tests themselves).
pub fn selfcheck() -> bool {
    matches!(
        std::env::var("ETCD_FANOUT_DIFF_SELFCHECK").as_deref(),
        Ok("1") | Ok("true") | Ok("yes")
    )
}

/// `Bytes` from a str.
pub fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// Runs a future with a timeout, panicking with `what` on expiry.
pub async fn within<T>(d: Duration, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(d, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {d:?}: {what}"),
    }
}
