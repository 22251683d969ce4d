//! The proxy's own identity towards etcd: the user it logs in as, the token it holds, and the
//! calls it makes on its own behalf under that token.
//!
//! The proxy reads and watches its prefixes for itself (feed loads, upstream watches, history
//! backfill, sync checks, compaction polls and probes). Against an etcd with auth enabled those
//! calls need a token of a user with read permission on the prefixes. This module logs in with
//! `Authenticate`, keeps the current token, and attaches it to those calls only: a client's
//! forwarded call always carries the client's own credentials (`upstream::forward`), never the
//! proxy's, so no client ever acts as the proxy.
//!
//! Token life (see `shared/docs/etcd-auth-tls.md` §1.2, §3):
//! * simple tokens die after `--auth-token-ttl` of non-use on each member (sliding), on an etcd
//!   restart, a password change or `auth disable`; JWTs at their `exp` claim and on any auth
//!   revision bump. The proxy renews a simple token every half TTL and a JWT at three quarters
//!   of its lifetime (half of it when that would leave less than 2 s), at its first call after
//!   that point, and logs in again (then retries the call once) whenever etcd answers
//!   `invalid auth token`, `revision of auth store is old` or `user name is empty` (or, to a
//!   tokenless call, `permission denied`: an etcd with `--client-cert-auth`).
//! * Logins are single flight: one `Authenticate` at a time; calls needing a first token wait
//!   for it, calls holding a token that is merely due for renewal keep using it meanwhile.
//! * When etcd answers `authentication is not enabled` the proxy runs without a token and logs
//!   in as soon as etcd starts refusing tokenless calls (auth enabled later).
//! * Open upstream watches are never touched: etcd checks a watch's token at create only, so a
//!   watch keeps running on its stream; a watch re-created after a failure gets the token of
//!   that moment.
//!
//! Failures are loud: a refused login, or a prefix the user may not read, is logged at error
//! level naming the user, the prefix and the missing permission (throttled to one line a
//! minute per prefix while it lasts). The password never appears in a log or `Debug` output.
//!
//! Parts: [`login`] (the flags, the password), `jwt` (a JWT's `exp`), `complaints` (the loud
//! failures), `own_calls` (the Range and Watch the proxy makes for itself, on [`Upstream`]).

mod complaints;
mod jwt;
pub mod login;
mod own_calls;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::{Code, Request, Status};

use crate::config::Config;
use crate::metrics;
use crate::proto::etcdserverpb::AuthenticateRequest;
use crate::source::upstream::Upstream;

pub use login::Login;

/// Longest a login may take before it counts as failed.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Least time between two logins, and the first retry delay after a failed one.
const MIN_LOGIN_INTERVAL: Duration = Duration::from_secs(1);
/// Longest delay between login attempts while they keep failing.
const MAX_LOGIN_BACKOFF: Duration = Duration::from_secs(30);
/// Least time between a JWT's renewal and its `exp`, lifetime permitting.
const JWT_MARGIN: Duration = Duration::from_secs(2);

/// etcd's answer to `Authenticate` when auth is off.
const AUTH_NOT_ENABLED: &str = "etcdserver: authentication is not enabled";

/// Why a login failed.
#[derive(Debug)]
enum Failure {
    /// etcd could not be reached or did not answer: not the credentials' fault.
    Unreachable(String),
    /// etcd (or the password file) refused: wrong user or password, unreadable file.
    Refused(String),
}

/// True for failures of the connection rather than answers of etcd.
fn is_transport(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

/// The token attached to one call, and which login produced it.
#[derive(Debug, Clone, Default)]
pub struct Ticket {
    /// `token` metadata value; `None`: the call goes without a token.
    token: Option<AsciiMetadataValue>,
    /// Login generation the token belongs to (see [`State::generation`]).
    generation: u64,
}

impl Ticket {
    /// `msg` as a request carrying this ticket's token.
    pub(crate) fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        self.insert(req.metadata_mut());
        req
    }

    pub(crate) fn insert(&self, md: &mut MetadataMap) {
        if let Some(t) = &self.token {
            md.insert("token", t.clone());
        }
    }
}

/// What the last login attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// No attempt yet.
    Never,
    /// Logged in: a token is held.
    LoggedIn,
    /// etcd has auth disabled: calls go without a token.
    AuthDisabled,
    /// The attempt failed with this message (wrong password, unknown user, etcd unreachable).
    Failed(String),
}

/// The current token and login bookkeeping; changed only by a login (under `flight`).
#[derive(Debug)]
struct State {
    /// The token to attach, and when to renew it.
    token: Option<(AsciiMetadataValue, Instant)>,
    /// Bumped by every completed login attempt: a call that failed with generation `g` needs
    /// a new login only if the generation is still `g`.
    generation: u64,
    /// The last attempt's result.
    outcome: Outcome,
    /// Earliest time of the next attempt (limits logins after failures).
    retry_at: Instant,
    /// Consecutive failed attempts (for the backoff).
    failures: u32,
    /// The last attempt failed because etcd was unreachable: a refusal etcd sends later
    /// proves it reachable again, so the backoff does not hold a new login back.
    unreachable: bool,
}

/// The proxy's credentials towards etcd (see the module doc).
pub struct Credentials {
    /// Who to log in as; `None`: the proxy never sends a token.
    login: Option<Login>,
    /// etcd's `--auth-token-ttl`: simple tokens are renewed every half of it.
    simple_ttl: Duration,
    /// The token (short critical sections, never held across an `.await`).
    state: Mutex<State>,
    /// Held while a login runs: one `Authenticate` at a time.
    flight: tokio::sync::Mutex<()>,
    /// Last complaint logged per prefix and when, to log a lasting failure once a minute.
    complaints: Mutex<HashMap<String, (String, Instant)>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user())
            .finish_non_exhaustive()
    }
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials::new(None, Duration::from_secs(300))
    }
}

impl Credentials {
    /// Credentials logging in as `login` (none: tokenless).
    pub fn new(login: Option<Login>, simple_ttl: Duration) -> Credentials {
        Credentials {
            login,
            simple_ttl: simple_ttl.max(Duration::from_secs(1)),
            state: Mutex::new(State {
                token: None,
                generation: 0,
                outcome: Outcome::Never,
                retry_at: Instant::now(),
                failures: 0,
                unreachable: false,
            }),
            flight: tokio::sync::Mutex::new(()),
            complaints: Mutex::new(HashMap::new()),
        }
    }

    /// Credentials from the command line (see [`Login::from_config`]).
    pub fn from_config(config: &Config) -> Result<Credentials, String> {
        Ok(Credentials::new(
            Login::from_config(config)?,
            config.auth_token_ttl,
        ))
    }

    /// The configured user name.
    pub fn user(&self) -> Option<&str> {
        self.login.as_ref().map(|l| l.user.as_str())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The ticket for a call made now: logs in first when no token is held yet (or a failed
    /// login may be retried), renews a token that is due (single flight).
    pub async fn ticket(&self, upstream: &Upstream) -> Ticket {
        if self.login.is_none() {
            return Ticket::default();
        }
        let (ticket, due, have) = self.peek();
        if !due {
            return ticket;
        }
        if have {
            // Due for renewal: one caller renews, the others keep the current token.
            if let Ok(_guard) = self.flight.try_lock() {
                if self.state().generation == ticket.generation {
                    self.login_now(upstream).await;
                }
            }
        } else {
            let _guard = self.flight.lock().await;
            let (_, due, _) = self.peek();
            if due && self.state().generation == ticket.generation {
                self.login_now(upstream).await;
            }
        }
        self.peek().0
    }

    /// The current ticket, whether a login is due, and whether a token is held.
    fn peek(&self) -> (Ticket, bool, bool) {
        let st = self.state();
        let now = Instant::now();
        let ticket = Ticket {
            token: st.token.as_ref().map(|(t, _)| t.clone()),
            generation: st.generation,
        };
        let (due, have) = match (&st.token, &st.outcome) {
            (Some((_, renew_at)), _) => (now >= *renew_at && now >= st.retry_at, true),
            (None, Outcome::Never) => (true, false),
            (None, Outcome::AuthDisabled) => (false, false),
            // A failed login, or a token etcd refused: try again once the backoff allows.
            (None, _) => (now >= st.retry_at, false),
        };
        (ticket, due, have)
    }

    /// After etcd refused a call made with `failed` (see [`needs_login`]): logs in again unless
    /// another call already did, or the last attempt was too recent. True when a new ticket is
    /// available to retry with.
    pub async fn renew_after(&self, upstream: &Upstream, failed: &Ticket) -> bool {
        if self.login.is_none() {
            return false;
        }
        let _guard = self.flight.lock().await;
        {
            let st = self.state();
            if st.generation != failed.generation {
                return true;
            }
            if Instant::now() < st.retry_at && !st.unreachable {
                return false;
            }
        }
        self.login_now(upstream).await;
        self.state().generation != failed.generation
    }

    /// One `Authenticate` (the caller holds `flight`); records the outcome.
    async fn login_now(&self, upstream: &Upstream) {
        let Some(login) = &self.login else { return };
        let result = match login.password() {
            Err(e) => Err(Failure::Refused(e)),
            Ok(password) => {
                let req = AuthenticateRequest {
                    name: login.user.clone(),
                    password: password.expose().to_string(),
                };
                metrics::Upstream::Login.inc();
                match tokio::time::timeout(LOGIN_TIMEOUT, upstream.auth().authenticate(req)).await {
                    Err(_) => Err(Failure::Unreachable(format!(
                        "etcd at {} did not answer the login in time",
                        upstream.endpoints().join(",")
                    ))),
                    Ok(Err(s)) if s.message() == AUTH_NOT_ENABLED => Ok(None),
                    Ok(Err(s)) if is_transport(&s) => {
                        Err(Failure::Unreachable(upstream.describe(&s)))
                    }
                    Ok(Err(s)) => Err(Failure::Refused(s.message().to_string())),
                    Ok(Ok(resp)) => {
                        let resp = resp.into_inner();
                        upstream.observe_header(resp.header.as_ref());
                        AsciiMetadataValue::try_from(resp.token.as_str())
                            .map(|v| Some((v, resp.token)))
                            .map_err(|_| {
                                Failure::Refused("etcd sent a token that is not ASCII".into())
                            })
                    }
                }
            }
        };
        let now = Instant::now();
        let mut st = self.state();
        st.generation += 1;
        st.unreachable = matches!(result, Err(Failure::Unreachable(_)));
        match result {
            Ok(Some((value, raw))) => {
                let renew_in = self.renewal_period(&raw);
                if st.outcome != Outcome::LoggedIn {
                    tracing::info!(user = %login.user, renew_in = ?renew_in, "logged in to etcd");
                } else {
                    tracing::debug!(user = %login.user, renew_in = ?renew_in, "etcd token renewed");
                }
                metrics::UPSTREAM_LOGINS.inc();
                st.token = Some((value, now + renew_in));
                st.outcome = Outcome::LoggedIn;
                st.failures = 0;
                st.retry_at = now + MIN_LOGIN_INTERVAL;
            }
            Ok(None) => {
                if st.outcome != Outcome::AuthDisabled {
                    tracing::info!(user = %login.user, "etcd has auth disabled: the proxy reads without a token and logs in once etcd asks for one");
                }
                st.token = None;
                st.outcome = Outcome::AuthDisabled;
                st.failures = 0;
                st.retry_at = now + MIN_LOGIN_INTERVAL;
            }
            Err(failure) => {
                metrics::UPSTREAM_LOGIN_FAILURES.inc();
                let again = MIN_LOGIN_INTERVAL
                    .saturating_mul(1 << st.failures.min(5))
                    .min(MAX_LOGIN_BACKOFF);
                let message = match failure {
                    Failure::Unreachable(m) => {
                        tracing::warn!(user = %login.user, retry_in = ?again, "etcd login failed: {m}");
                        m
                    }
                    Failure::Refused(m) => {
                        if st.outcome != Outcome::Failed(m.clone()) {
                            tracing::error!(user = %login.user, error = %m, retry_in = ?again, "etcd login failed: the prefixes cannot be loaded under this user; their requests are forwarded to etcd");
                        }
                        m
                    }
                };
                // A token that etcd still accepts stays in use (e.g. etcd briefly unreachable);
                // one it refused was dropped by the caller's failure already.
                st.outcome = Outcome::Failed(message);
                st.failures = st.failures.saturating_add(1);
                st.retry_at = now + again;
            }
        }
    }

    /// How long a fresh token is used before it is renewed.
    fn renewal_period(&self, token: &str) -> Duration {
        match jwt::expiry(token) {
            Some(exp) => {
                let left = exp
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                // Three quarters of the lifetime, but at least 2 s before `exp` (whole
                // seconds, etcd's clock) when the lifetime is short.
                let renew = left * 3 / 4;
                let renew = if left.saturating_sub(renew) < JWT_MARGIN {
                    left / 2
                } else {
                    renew
                };
                renew.max(MIN_LOGIN_INTERVAL)
            }
            None => (self.simple_ttl / 2).max(MIN_LOGIN_INTERVAL),
        }
    }

    /// Forgets a token etcd refused, so that no further call uses it while a new login is
    /// pending or failing.
    fn drop_token(&self, failed: &Ticket) {
        let mut st = self.state();
        if st.generation == failed.generation {
            st.token = None;
        }
    }
}

/// True when etcd refused a call for its token (or lack of one), so that a new login may
/// help: `invalid auth token`, `revision of auth store is old`, `user name is empty`; and,
/// for a call made without a token (`tokenless`), `permission denied`: etcd with
/// `--client-cert-auth` and auth on takes the proxy's CN-less certificate as user "" and
/// answers that instead of `user name is empty`.
pub fn needs_login(status: &Status, tokenless: bool) -> bool {
    (matches!(status.code(), Code::Unauthenticated | Code::InvalidArgument)
        && is_auth_message(status.message()))
        || (tokenless
            && status.code() == Code::PermissionDenied
            && status.message() == "etcdserver: permission denied")
}

fn is_auth_message(m: &str) -> bool {
    matches!(
        m,
        "etcdserver: invalid auth token"
            | "etcdserver: revision of auth store is old"
            | "etcdserver: user name is empty"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use std::time::UNIX_EPOCH;

    #[test]
    fn renewal_follows_the_token_kind() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let c = Credentials::new(None, Duration::from_secs(300));
        assert_eq!(
            c.renewal_period("ZRsUWgrPWyjCbTyJ.12"),
            Duration::from_secs(150)
        );
        let soon = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 400;
        let jwt = format!("{}.{}.sig", b64("{}"), b64(&format!(r#"{{"exp":{soon}}}"#)));
        let p = c.renewal_period(&jwt);
        assert!(
            p > Duration::from_secs(290) && p <= Duration::from_secs(300),
            "{p:?}"
        );
        let short = format!(
            "{}.{}.sig",
            b64("{}"),
            b64(&format!(r#"{{"exp":{}}}"#, soon - 394))
        );
        let p = c.renewal_period(&short);
        assert!(p <= Duration::from_secs(3), "{p:?}");
    }
}
