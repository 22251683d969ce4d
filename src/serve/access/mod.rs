//! Access control in front of the shared cache: for every request the cache could answer,
//! etcd's own decision for the caller, so that no one reads through the proxy what etcd would
//! refuse them, and permitted callers with tokens share the cache (and the one upstream watch
//! per prefix) like anonymous ones.
//!
//! - [`identity`]: the caller's token, found as etcd finds it;
//! - [`state`]: whether auth is on, polled every second (nothing is served from the cache
//!   while it is unknown; with auth off a tokenless request is served without asking);
//! - [`decisions`]: per `(token, key, range_end)` decisions made by etcd (one probe, shared,
//!   remembered for a bounded time; a token allowed a whole cached prefix, or a directory in
//!   it, is allowed every range inside it, one probe for all).
//!
//! A tokenless request while auth is on gets etcd's refusal without asking etcd: `user name
//! is empty`, or, when the listener has `--client-cert-auth`, `permission denied`. etcd with
//! `--client-cert-auth` takes a tokenless request's client-certificate CommonName as its user;
//! a certificate with a CN is refused by the listener before this (`tls::identity`), so what
//! reaches here has a CN-less certificate, user "", which no permission check passes (etcd
//! 3.4.23 measured: gRPC Range `PermissionDenied`, Watch create canceled with that status, and
//! the same through its gateway for a request without an `Accept` header). A gateway request
//! with an `Accept` header carries `grpcgateway-accept` metadata, and etcd then ignores the
//! certificate: `user name is empty` (the proxy's gateway adds the same metadata and forwards
//! it, so etcd treats the proxy's CN-less certificate the same way). A request with a token
//! is decided by etcd (a probe) whether auth is on or off:
//! etcd 3.4.23 validates a token it is sent even with auth off (the fix that ignores it came
//! in 3.4.28), so a stale or bogus token is refused there too. Watches are checked when
//! created only, as etcd checks them.

pub mod decisions;
pub mod identity;
pub mod state;

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::config::Config;
use crate::error::Error;
use crate::keys::KeyRange;
use crate::metrics;
use crate::source::upstream::Upstream;
use crate::tasks::Tasks;
use decisions::{Decision, Decisions};
pub use state::AuthState;
use state::State;

/// What to do with a request the cache could answer.
#[derive(Debug)]
pub enum Verdict {
    /// Answer it from the cache.
    Serve,
    /// Refuse it with etcd's error.
    Refuse(Error),
    /// Only etcd can answer it: forward (or relay) it with the caller's credentials.
    Forward,
}

/// Auth state, decisions and the poll that keeps the state fresh.
#[derive(Debug)]
pub struct Access {
    /// Whether auth is on, and the decision epoch.
    state: State,
    /// Shared permission decisions.
    decisions: Decisions,
    /// Where probes and polls go.
    upstream: Arc<Upstream>,
    /// The listener's `--client-cert-auth`: etcd then takes a tokenless request's client
    /// certificate as its identity (see the module doc).
    client_cert_auth: bool,
    /// Longest a request waits for the state while it is unknown only because the poll is
    /// late (see [`State::settled`]); then it is forwarded.
    late_wait: Duration,
}

/// A request waits up to this many poll intervals (at least [`MIN_LATE_WAIT`]) for a late
/// poll before it is forwarded.
const LATE_WAIT_POLLS: u32 = 10;

/// The shortest wait for a late poll.
const MIN_LATE_WAIT: Duration = Duration::from_secs(5);

impl Access {
    /// Access control over `upstream`, with its auth poll running as one of `tasks` (it also
    /// ends when the `Access` is dropped).
    pub fn start(config: &Config, upstream: Arc<Upstream>, tasks: &Tasks) -> Arc<Access> {
        let access = Arc::new(Access {
            state: State::default(),
            decisions: Decisions::new(
                config.auth_decision_entries,
                config.auth_decision_ttl,
                config.auth_denial_ttl.min(config.auth_decision_ttl),
            ),
            upstream,
            client_cert_auth: config.tls.client_cert_auth,
            late_wait: (config.auth_poll * LATE_WAIT_POLLS).max(MIN_LATE_WAIT),
        });
        // The poll runs on a thread and a connection of its own: on the shared runtime, a
        // replica saturated by a create storm answered it late, its state went unknown, and
        // the creates were relayed to etcd one by one (39,102 of 1,000,000 watchers).
        let (weak, interval) = (Arc::downgrade(&access), config.auth_poll);
        let (endpoints, tls) = (
            access.upstream.endpoints().to_vec(),
            access.upstream.tls().cloned(),
        );
        let isolated = tasks.spawn_isolated("auth-poll", move || async move {
            match Upstream::with_tls(&endpoints, tls) {
                Ok(own) => poll(weak, Some(Arc::new(own)), interval).await,
                Err(e) => {
                    tracing::warn!(error = %e, "auth poll: no connection of its own");
                    poll(weak, None, interval).await
                }
            }
        });
        if let Err(e) = isolated {
            tracing::warn!(error = %e, "auth poll: no thread of its own, polling on the main runtime");
            tasks.spawn(poll(Arc::downgrade(&access), None, config.auth_poll));
        }
        access
    }

    /// Access control with a fixed auth state and no poll (`crate::fuzzing`'s watch session
    /// target, which has no etcd: only tokenless callers, decided by the state alone).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn fixed(config: &Config, upstream: Arc<Upstream>, state: AuthState) -> Arc<Access> {
        let access = Access {
            state: State::default(),
            decisions: Decisions::new(
                config.auth_decision_entries,
                config.auth_decision_ttl,
                config.auth_denial_ttl.min(config.auth_decision_ttl),
            ),
            upstream,
            client_cert_auth: config.tls.client_cert_auth,
            late_wait: (config.auth_poll * LATE_WAIT_POLLS).max(MIN_LATE_WAIT),
        };
        access.state.set(state);
        Arc::new(access)
    }

    /// The verdict for a Range or Watch create of `[key, range_end)` by the caller of
    /// `metadata`. `cacheable`: the cache could answer it (otherwise a caller with a token is
    /// left to etcd; a tokenless one is still refused, as etcd checks identity first).
    /// `cover`: the cached prefix the range lies in, whose decision (one probe per token)
    /// stands for every range inside it when etcd allows it (see [`decisions`]).
    pub async fn check(
        &self,
        metadata: &MetadataMap,
        key: &Bytes,
        range_end: &Bytes,
        cacheable: bool,
        cover: Option<&KeyRange>,
    ) -> Verdict {
        let mut state = self.state.get();
        if state == AuthState::Unknown {
            state = self.state.settled(self.late_wait).await;
        }
        if state == AuthState::Unknown {
            metrics::AUTH_UNKNOWN_FORWARDS.inc();
            return Verdict::Forward;
        }
        match identity::token(metadata) {
            None if state == AuthState::Off => Verdict::Serve,
            None => {
                metrics::AUTH_DENIALS.inc();
                Verdict::Refuse(self.tokenless_refusal(metadata))
            }
            Some(_) if !cacheable => Verdict::Forward,
            // Also while auth is off: etcd 3.4 (before 3.4.28) still validates a token it is
            // sent, and with auth off it knows no simple token (`invalid auth token`), while
            // a JWT passes. The probe gets whichever answer the fronted etcd gives.
            Some(token) => {
                let epoch = self.state.epoch();
                let decided = Box::pin(self.decisions.decide(
                    &self.upstream,
                    epoch,
                    token,
                    key,
                    range_end,
                    cover,
                ))
                .await;
                match decided {
                    Ok(Decision::Allow) => Verdict::Serve,
                    Ok(deny) => {
                        metrics::AUTH_DENIALS.inc();
                        match deny.status() {
                            Some(s) => {
                                self.state.observe(&s);
                                Verdict::Refuse(Error::Upstream(s))
                            }
                            None => Verdict::Forward,
                        }
                    }
                    Err(_) => Verdict::Forward,
                }
            }
        }
    }

    /// etcd's refusal of a tokenless request with `metadata` while auth is on, on this
    /// listener (see the module doc): with `--client-cert-auth` the certificate's empty
    /// CommonName is the user, unless etcd takes the request for its gateway's.
    fn tokenless_refusal(&self, metadata: &MetadataMap) -> Error {
        if self.client_cert_auth && !identity::via_gateway(metadata) {
            Error::PermissionDenied
        } else {
            Error::UserEmpty
        }
    }

    /// etcd's auth state as currently known.
    pub fn auth_state(&self) -> AuthState {
        self.state.get()
    }

    /// Learns from an error etcd returned to a forwarded request (`user name is empty` means
    /// auth is on).
    pub fn observe_status(&self, status: &Status) {
        self.state.observe(status);
    }

    /// Learns from a successful call forwarded to etcd: `method` is the gRPC method name in
    /// snake case (only Auth methods tell something). Enabling or disabling auth switches the state at once; any user or role
    /// change starts a new decision epoch (a permission granted or revoked through the proxy
    /// is seen by the next request).
    pub fn observe_auth_call(&self, method: &str) {
        match method {
            "auth_enable" => self.state.set(AuthState::On),
            "auth_disable" => self.state.set(AuthState::Off),
            "user_add"
            | "user_delete"
            | "user_change_password"
            | "user_grant_role"
            | "user_revoke_role"
            | "role_add"
            | "role_delete"
            | "role_grant_permission"
            | "role_revoke_permission" => {
                self.state.new_epoch();
                self.decisions.clear();
            }
            _ => {}
        }
    }
}

/// Polls etcd's auth state every `interval` over `own` (the poll's own connection), or the
/// shared upstream without one, until `access` is dropped.
async fn poll(access: Weak<Access>, own: Option<Arc<Upstream>>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(access) = access.upgrade() else {
            return;
        };
        // A loaded etcd (or proxy) may take longer than one interval to answer: waiting up to
        // three keeps the state known (and the fan-out on) through such hiccups, at the price
        // of a staler state while they last.
        let upstream = own.as_ref().unwrap_or(&access.upstream);
        access
            .state
            .poll_once(upstream, (interval * 3).max(Duration::from_secs(1)))
            .await;
    }
}
