//! Whether authentication is enabled on etcd, as the proxy knows it, and the poll that keeps
//! that knowledge fresh.
//!
//! etcd 3.4 has no `AuthStatus` RPC, but a Range without a token fails with InvalidArgument
//! `etcdserver: user name is empty` exactly when auth is on (or, from an etcd with
//! `--client-cert-auth` that takes the proxy's CN-less certificate as user "", with
//! PermissionDenied `etcdserver: permission denied`); a successful answer means off. So
//! the proxy sends one tokenless, serializable, `count_only` Range of a key no one writes every
//! `--auth-poll` (1 s). A poll that fails, or gets no answer within three intervals, makes the
//! state *unknown*, and nothing is then served from the cache until a poll answers again: the
//! state the proxy acts on is never older than one poll interval plus the poll's round trip
//! (at most three intervals). While the state is unknown only because the poll is late (no
//! answer, no error: etcd, or this proxy under a burst of creates, too busy to answer in
//! time), a request waits for the next answer (up to a bound, then it is forwarded):
//! forwarding every watch create of a reconnect storm would turn each into an etcd watch of
//! its own and load etcd further, so the poll would come back later still. A poll that
//! failed (etcd answered with an error, or could not be reached) forwards at once, and the
//! client gets etcd's own answer. Forwarded
//! answers that reveal the state (`user name is empty`, a successful `AuthEnable` or
//! `AuthDisable` through the proxy) switch it at once.
//!
//! Every change of the known state (and every RBAC change the proxy sees) starts a new
//! *epoch*; permission decisions are keyed by epoch, so none outlives the state it was made in.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use bytes::Bytes;
use tonic::{Code, Status};

use crate::metrics;
use crate::proto::etcdserverpb::RangeRequest;
use crate::source::upstream::Upstream;

/// A key no one writes, read by the auth poll.
const POLL_KEY: &[u8] = b"\0etcd-fanout/auth-probe";

/// etcd's message for a request without identity when auth is on (`rpctypes.ErrUserEmpty`).
pub const USER_EMPTY: &str = "etcdserver: user name is empty";

/// etcd's message for a caller without the permission (`rpctypes.ErrPermissionDenied`).
const PERMISSION_DENIED: &str = "etcdserver: permission denied";

/// Authentication on etcd, as last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthState {
    /// Not known (proxy starting, or etcd not answering the poll): nothing is served from the
    /// cache, every request is forwarded.
    Unknown = 0,
    /// Disabled: tokens are ignored, as etcd ignores them.
    Off = 1,
    /// Enabled: every request served from the cache is checked.
    On = 2,
}

impl AuthState {
    fn from_u8(v: u8) -> AuthState {
        match v {
            1 => AuthState::Off,
            2 => AuthState::On,
            _ => AuthState::Unknown,
        }
    }
}

/// The auth state and the decision epoch.
#[derive(Debug)]
pub struct State {
    /// The state acted on ([`AuthState`] as a number).
    current: AtomicU8,
    /// The last *known* state (off or on), to tell a real change from an outage.
    last_known: AtomicU8,
    /// Bumped whenever earlier permission decisions must no longer be used.
    epoch: AtomicU64,
    /// The last poll got no answer in time (no error either): unknown, but etcd is not
    /// known to have failed.
    late: AtomicBool,
    /// Wakes the requests waiting on a late poll, at every answer.
    answered: Notify,
}

impl Default for State {
    fn default() -> Self {
        State {
            current: AtomicU8::new(AuthState::Unknown as u8),
            last_known: AtomicU8::new(AuthState::Unknown as u8),
            epoch: AtomicU64::new(0),
            late: AtomicBool::new(false),
            answered: Notify::new(),
        }
    }
}

impl State {
    /// The state requests are decided by.
    pub fn get(&self) -> AuthState {
        AuthState::from_u8(self.current.load(Ordering::Acquire))
    }

    /// The current decision epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Starts a new epoch: decisions made so far are not used again.
    pub fn new_epoch(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// The state, after waiting up to `wait` while it is unknown only because the poll is
    /// late. Unknown when the poll failed, or stayed late for all of `wait`.
    pub async fn settled(&self, wait: Duration) -> AuthState {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Made before the check, so an answer between the check and the wait is seen.
            let answered = self.answered.notified();
            let state = self.get();
            if state != AuthState::Unknown || !self.late.load(Ordering::Acquire) {
                return state;
            }
            if tokio::time::timeout_at(deadline, answered).await.is_err() {
                return self.get();
            }
        }
    }

    /// Records that the poll got no answer in time.
    fn set_late(&self) {
        self.late.store(true, Ordering::Release);
        self.set(AuthState::Unknown);
    }

    /// Records what the poll or a forwarded answer showed.
    pub fn set(&self, state: AuthState) {
        // A change of the known state starts a new epoch *before* it is acted on, so no
        // decision of the old state is used under the new one.
        if state != AuthState::Unknown {
            let before = self.last_known.swap(state as u8, Ordering::AcqRel);
            if before != state as u8 {
                self.new_epoch();
                tracing::info!(auth = ?state, "etcd authentication state");
            }
        }
        let before = self.current.swap(state as u8, Ordering::AcqRel);
        if before != state as u8 {
            metrics::AUTH_STATE.set(match state {
                AuthState::Unknown => -1,
                AuthState::Off => 0,
                AuthState::On => 1,
            });
            if state == AuthState::Unknown && self.late.load(Ordering::Acquire) {
                tracing::warn!(
                    "etcd authentication state unknown (the poll got no answer in time): \
                     requests wait for the next answer, then are forwarded"
                );
            } else if state == AuthState::Unknown {
                tracing::warn!("etcd authentication state unknown: forwarding every request");
            }
        }
        self.answered.notify_waiters();
    }

    /// What a status etcd returned says about the auth state, if anything.
    pub fn observe(&self, status: &Status) {
        if status.code() == Code::InvalidArgument && status.message() == USER_EMPTY {
            self.set(AuthState::On);
        }
    }

    /// One poll: a tokenless read etcd refuses exactly when auth is on.
    pub async fn poll_once(&self, upstream: &Upstream, timeout: Duration) {
        let req = RangeRequest {
            key: Bytes::from_static(POLL_KEY),
            serializable: true,
            count_only: true,
            limit: 1,
            ..Default::default()
        };
        crate::metrics::Upstream::AuthPoll.inc();
        let state = match tokio::time::timeout(timeout, upstream.kv().range(req)).await {
            // The header is not recorded as etcd's revision: a revision newer than the cache
            // head would become the header of cached watches' `created` and, through their
            // header floor, of backlog responses that do not hold its events yet.
            Ok(Ok(_)) => AuthState::Off,
            Ok(Err(s)) if s.code() == Code::InvalidArgument && s.message() == USER_EMPTY => {
                AuthState::On
            }
            // An etcd with `--client-cert-auth` takes the CommonName of the proxy's client
            // certificate as the poll's user: empty, a user that does not exist, so with
            // auth on the poll is denied instead (etcd 3.4.23); with auth off no read is
            // ever denied.
            Ok(Err(s))
                if s.code() == Code::PermissionDenied && s.message() == PERMISSION_DENIED =>
            {
                AuthState::On
            }
            Ok(Err(s)) => {
                tracing::debug!(error = %s, "auth poll failed");
                AuthState::Unknown
            }
            Err(_) => {
                tracing::debug!("auth poll timed out");
                self.set_late();
                return;
            }
        };
        self.late.store(false, Ordering::Release);
        self.set(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_change_with_the_known_state_only() {
        let s = State::default();
        assert_eq!(s.get(), AuthState::Unknown);
        s.set(AuthState::Off);
        let e = s.epoch();
        s.set(AuthState::Unknown);
        assert_eq!(s.get(), AuthState::Unknown);
        s.set(AuthState::Off);
        assert_eq!(s.epoch(), e, "an outage alone keeps the decisions");
        s.observe(&Status::invalid_argument(USER_EMPTY));
        assert_eq!(s.get(), AuthState::On);
        assert!(s.epoch() > e);
        s.observe(&Status::permission_denied("etcdserver: permission denied"));
        assert_eq!(s.get(), AuthState::On);
    }

    /// A late poll holds requests until it answers (bounded); a failed one does not.
    #[tokio::test(start_paused = true)]
    async fn a_late_poll_holds_requests_until_it_answers() {
        let s = std::sync::Arc::new(State::default());
        s.set(AuthState::Off);
        s.set_late();
        assert_eq!(s.get(), AuthState::Unknown);
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.settled(Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!waiter.is_finished(), "answered while the poll is late");
        s.late.store(false, Ordering::Release);
        s.set(AuthState::On);
        assert_eq!(waiter.await.ok(), Some(AuthState::On));

        s.set_late();
        let started = tokio::time::Instant::now();
        assert_eq!(s.settled(Duration::from_secs(10)).await, AuthState::Unknown);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(10),
            "bounded by the wait"
        );

        s.late.store(false, Ordering::Release);
        s.set(AuthState::Unknown);
        let started = tokio::time::Instant::now();
        assert_eq!(s.settled(Duration::from_secs(10)).await, AuthState::Unknown);
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "a failed poll forwards at once"
        );
    }
}
