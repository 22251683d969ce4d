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
//!   `invalid auth token`, `revision of auth store is old` or `user name is empty`.
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

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::{Code, Request, Status};

use crate::config::Config;
use crate::keys::KeyRange;
use crate::metrics;
use crate::proto::etcdserverpb::{
    AuthenticateRequest, RangeRequest, RangeResponse, WatchCreateRequest,
};
use crate::source::upstream::{Upstream, UpstreamWatch};

/// Longest a login may take before it counts as failed.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Least time between two logins, and the first retry delay after a failed one.
const MIN_LOGIN_INTERVAL: Duration = Duration::from_secs(1);
/// Longest delay between login attempts while they keep failing.
const MAX_LOGIN_BACKOFF: Duration = Duration::from_secs(30);
/// Least time between a JWT's renewal and its `exp`, lifetime permitting.
const JWT_MARGIN: Duration = Duration::from_secs(2);
/// How often an unchanged complaint is logged again while it lasts.
const COMPLAINT_INTERVAL: Duration = Duration::from_secs(60);

/// etcd's answer to `Authenticate` when auth is off.
const AUTH_NOT_ENABLED: &str = "etcdserver: authentication is not enabled";

/// A secret string (a password, or `--user`, which may hold one): its `Debug` and `Display`
/// never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that sends it.
    fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// Where the password comes from.
#[derive(Debug, Clone)]
enum Password {
    /// Given on the command line or in the environment.
    Inline(Secret),
    /// Read from this file at every login (a mounted Secret may be rotated).
    File(PathBuf),
}

/// The user the proxy logs in as.
#[derive(Debug, Clone)]
pub struct Login {
    /// etcd user name.
    user: String,
    /// Its password.
    password: Password,
}

impl Login {
    /// The login configured by `--user`, `--password` and `--password-file` (etcdctl's rules:
    /// `--user NAME:PASSWORD` unless a password is given separately, then `--user` is the name
    /// as is). `None` when no user is configured. The password file must be readable now.
    pub fn from_config(config: &Config) -> Result<Option<Login>, String> {
        let login = match (&config.user, &config.password, &config.password_file) {
            (None, None, None) => return Ok(None),
            (None, _, _) => return Err("--password and --password-file need --user".into()),
            (Some(user), Some(p), _) => Login {
                user: user.expose().to_string(),
                password: Password::Inline(p.clone()),
            },
            (Some(user), None, Some(path)) => Login {
                user: user.expose().to_string(),
                password: Password::File(path.clone()),
            },
            (Some(user), None, None) => match user.expose().split_once(':') {
                Some((name, password)) => Login {
                    user: name.to_string(),
                    password: Password::Inline(Secret(password.to_string())),
                },
                None => {
                    return Err(format!(
                        "--user {} has no password: use --user NAME:PASSWORD, --password or --password-file",
                        user.expose()
                    ))
                }
            },
        };
        if login.user.is_empty() {
            return Err("--user: empty user name".into());
        }
        login.password()?;
        Ok(Some(login))
    }

    /// The password as of now (a file is read again, trailing newlines trimmed).
    fn password(&self) -> Result<Secret, String> {
        match &self.password {
            Password::Inline(p) => Ok(p.clone()),
            Password::File(path) => std::fs::read_to_string(path)
                .map(|s| Secret(s.trim_end_matches(['\n', '\r']).to_string()))
                .map_err(|e| format!("--password-file {}: {e}", path.display())),
        }
    }
}

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
    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        self.insert(req.metadata_mut());
        req
    }

    fn insert(&self, md: &mut MetadataMap) {
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
                match tokio::time::timeout(LOGIN_TIMEOUT, upstream.auth().authenticate(req)).await {
                    Err(_) => Err(Failure::Unreachable(
                        "etcd did not answer the login in time".to_string(),
                    )),
                    Ok(Err(s)) if s.message() == AUTH_NOT_ENABLED => Ok(None),
                    Ok(Err(s)) if is_transport(&s) => {
                        Err(Failure::Unreachable(s.message().to_string()))
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
                        tracing::warn!(user = %login.user, error = %m, retry_in = ?again, "etcd login failed: etcd unreachable");
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
        match jwt_expiry(token) {
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

    /// Logs a failure of the proxy's own read of `prefix` at error level when it is about
    /// identity or permission (then returns true; other failures are the caller's to log).
    /// The same complaint is repeated at most once a minute.
    pub fn complain(&self, prefix: &str, range: &KeyRange, status: &Status) -> bool {
        let what = match (status.code(), status.message()) {
            (Code::PermissionDenied, _) => format!(
                "etcd user {} lacks read permission on the prefix: grant it read on [{}, {}) (README: Running against etcd with auth)",
                self.user().unwrap_or("(none)"),
                show(&range.start),
                show(&range.range_end()),
            ),
            (_, m) if is_auth_message(m) => match (self.user(), &self.state().outcome) {
                (None, _) => "etcd has auth enabled and the proxy has no credentials: set --user and --password (or --password-file)".to_string(),
                (Some(user), Outcome::Failed(e)) => {
                    format!("the proxy cannot log in to etcd as user {user}: {e}")
                }
                (Some(user), _) => {
                    format!("etcd refused the proxy's token of user {user}; logging in again")
                }
            },
            _ => return false,
        };
        let now = Instant::now();
        let mut seen = self.complaints.lock().unwrap_or_else(|e| e.into_inner());
        let repeat = matches!(seen.get(prefix), Some((w, at)) if *w == what && now.duration_since(*at) < COMPLAINT_INTERVAL);
        if !repeat {
            tracing::error!(prefix, error = %status.message(), "cannot read the prefix from etcd: {what}; until it can, /readyz answers 503 and requests for this prefix are forwarded to etcd");
            seen.insert(prefix.to_string(), (what, now));
        }
        true
    }

    /// Forgets the complaint about `prefix` (it can be read again).
    pub fn resolved(&self, prefix: &str) {
        let mut seen = self.complaints.lock().unwrap_or_else(|e| e.into_inner());
        if seen.remove(prefix).is_some() {
            tracing::info!(prefix, "the prefix can be read from etcd again");
        }
    }
}

/// True when etcd refused a call for its token (or lack of one), so that a new login may
/// help: `invalid auth token`, `revision of auth store is old`, `user name is empty`.
pub fn needs_login(status: &Status) -> bool {
    matches!(status.code(), Code::Unauthenticated | Code::InvalidArgument)
        && is_auth_message(status.message())
}

fn is_auth_message(m: &str) -> bool {
    matches!(
        m,
        "etcdserver: invalid auth token"
            | "etcdserver: revision of auth store is old"
            | "etcdserver: user name is empty"
    )
}

/// A key for a log line: text when it is UTF-8, else escaped.
fn show(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) => format!("{s:?}"),
        Err(_) => format!("{:?}", bytes::Bytes::copy_from_slice(key)),
    }
}

/// The `exp` claim of a JWT (etcd's `--auth-token jwt`); `None` for anything else (etcd's
/// simple tokens are `<16 letters>.<index>`). Only the payload is read, not verified: the
/// proxy uses it to schedule its own renewal, etcd verifies.
fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
    let exp = claims.get("exp")?.as_f64()?;
    if !exp.is_finite() || exp < 0.0 {
        return None;
    }
    UNIX_EPOCH.checked_add(Duration::try_from_secs_f64(exp).ok()?)
}

/// The gRPC status a watch refusal's `cancel_reason` stands for: etcd words it as Go's
/// `rpc error: code = X desc = Y` (3.4.22+); older servers send the bare message.
fn cancel_status(reason: &str) -> Status {
    let parsed = reason
        .strip_prefix("rpc error: code = ")
        .and_then(|r| r.split_once(" desc = "));
    match parsed {
        Some((code, desc)) => Status::new(go_code(code), desc),
        None if reason == "etcdserver: permission denied" => {
            Status::permission_denied(reason.to_string())
        }
        None => Status::unknown(reason.to_string()),
    }
}

/// A gRPC code from its Go name.
fn go_code(name: &str) -> Code {
    match name {
        "OK" => Code::Ok,
        "Canceled" => Code::Cancelled,
        "InvalidArgument" => Code::InvalidArgument,
        "DeadlineExceeded" => Code::DeadlineExceeded,
        "NotFound" => Code::NotFound,
        "AlreadyExists" => Code::AlreadyExists,
        "PermissionDenied" => Code::PermissionDenied,
        "ResourceExhausted" => Code::ResourceExhausted,
        "FailedPrecondition" => Code::FailedPrecondition,
        "Aborted" => Code::Aborted,
        "OutOfRange" => Code::OutOfRange,
        "Unimplemented" => Code::Unimplemented,
        "Internal" => Code::Internal,
        "Unavailable" => Code::Unavailable,
        "DataLoss" => Code::DataLoss,
        "Unauthenticated" => Code::Unauthenticated,
        _ => Code::Unknown,
    }
}

/// The proxy's own calls: each carries the proxy's token and is retried once after a new
/// login when etcd refuses the token.
impl Upstream {
    /// A Range made for the proxy itself.
    pub async fn own_range(&self, req: RangeRequest) -> Result<RangeResponse, Status> {
        let creds = self.credentials();
        let ticket = creds.ticket(self).await;
        match self.kv().range(ticket.request(req.clone())).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) if needs_login(&s) => {
                tracing::debug!(error = %s.message(), "etcd refused the proxy's token; logging in again");
                creds.drop_token(&ticket);
                if !creds.renew_after(self, &ticket).await {
                    return Err(s);
                }
                let ticket = creds.ticket(self).await;
                self.kv()
                    .range(ticket.request(req))
                    .await
                    .map(|r| r.into_inner())
            }
            Err(s) => Err(s),
        }
    }

    /// A watch made for the proxy itself, on its own stream. Returns once etcd accepted it;
    /// a refusal becomes the matching error (e.g. `PermissionDenied`).
    pub async fn own_watch(&self, create: WatchCreateRequest) -> Result<UpstreamWatch, Status> {
        let creds = self.credentials();
        let ticket = creds.ticket(self).await;
        match self.try_own_watch(&ticket, create.clone()).await {
            Err(s) if needs_login(&s) => {
                tracing::debug!(error = %s.message(), "etcd refused the proxy's token; logging in again");
                creds.drop_token(&ticket);
                if !creds.renew_after(self, &ticket).await {
                    return Err(s);
                }
                let ticket = creds.ticket(self).await;
                self.try_own_watch(&ticket, create).await
            }
            r => r,
        }
    }

    async fn try_own_watch(
        &self,
        ticket: &Ticket,
        create: WatchCreateRequest,
    ) -> Result<UpstreamWatch, Status> {
        let mut metadata = MetadataMap::new();
        ticket.insert(&mut metadata);
        let mut up = self.open_watch(&metadata, create).await?;
        match up.responses.message().await? {
            None => Err(Status::unavailable("upstream watch stream ended")),
            Some(first) if first.canceled && first.compact_revision == 0 => {
                self.observe_header(first.header.as_ref());
                Err(cancel_status(&first.cancel_reason))
            }
            Some(first) => {
                up.push_back(first);
                Ok(up)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn login(args: &[&str]) -> Result<Option<Login>, String> {
        let mut argv = vec!["etcd-fanout"];
        argv.extend_from_slice(args);
        Login::from_config(&Config::parse_from(argv))
    }

    fn parts(l: Option<Login>) -> Option<(String, String)> {
        let l = l?;
        let p = l.password().ok()?;
        Some((l.user, p.expose().to_string()))
    }

    #[test]
    fn flags_follow_etcdctl() {
        assert!(login(&[]).unwrap().is_none());
        assert_eq!(
            parts(login(&["--user", "fanout:s3:cr"]).unwrap()),
            Some(("fanout".into(), "s3:cr".into()))
        );
        assert_eq!(
            parts(login(&["--user", "a:b", "--password", "pw"]).unwrap()),
            Some(("a:b".into(), "pw".into()))
        );
        assert!(login(&["--user", "fanout"]).is_err());
        assert!(login(&["--password", "pw"]).is_err());
        assert!(login(&["--user", ":pw"]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "from file\n").unwrap();
        let f = file.to_str().unwrap();
        assert_eq!(
            parts(login(&["--user", "fanout", "--password-file", f]).unwrap()),
            Some(("fanout".into(), "from file".into()))
        );
        assert!(login(&["--user", "fanout", "--password-file", "/nonexistent/pw"]).is_err());
    }

    #[test]
    fn password_is_never_shown() {
        let l = login(&["--user", "fanout:hunter2"]).unwrap();
        assert!(!format!("{l:?}").contains("hunter2"));
        let c = Credentials::new(l, Duration::from_secs(300));
        assert!(!format!("{c:?}").contains("hunter2"));
        for args in [
            ["etcd-fanout", "--user", "u", "--password", "hunter2"].as_slice(),
            ["etcd-fanout", "--user", "u:hunter2"].as_slice(),
        ] {
            let config = Config::parse_from(args);
            assert!(!format!("{config:?}").contains("hunter2"));
        }
    }

    #[test]
    fn jwt_exp_is_read_simple_tokens_are_not() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let jwt = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256","typ":"JWT"}"#),
            b64(r#"{"exp":1900000000,"revision":3,"username":"fanout"}"#)
        );
        assert_eq!(
            jwt_expiry(&jwt),
            Some(UNIX_EPOCH + Duration::from_secs(1_900_000_000))
        );
        assert_eq!(jwt_expiry("ZRsUWgrPWyjCbTyJ.12"), None);
        assert_eq!(jwt_expiry("a.b.c"), None);
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
    }

    #[test]
    fn cancel_reasons_become_statuses() {
        let s = cancel_status(
            "rpc error: code = PermissionDenied desc = etcdserver: permission denied",
        );
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(s.message(), "etcdserver: permission denied");
        let s = cancel_status(
            "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token",
        );
        assert!(needs_login(&s));
        let s = cancel_status(
            "rpc error: code = InvalidArgument desc = etcdserver: user name is empty",
        );
        assert!(needs_login(&s));
        assert_eq!(
            cancel_status("etcdserver: permission denied").code(),
            Code::PermissionDenied
        );
        assert!(!needs_login(&Status::invalid_argument(
            "etcdserver: key is not provided"
        )));
    }
}
