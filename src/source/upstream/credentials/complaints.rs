//! Loud failures: a refusal of the proxy's own read of a prefix (no permission, no usable
//! token) logged at error level, naming the user, the prefix and the range to grant, and
//! repeated at most once a minute while it lasts.

use std::time::{Duration, Instant};

use tonic::{Code, Status};

use super::{is_auth_message, Credentials, Outcome};
use crate::keys::KeyRange;

/// How often an unchanged complaint is logged again while it lasts.
const COMPLAINT_INTERVAL: Duration = Duration::from_secs(60);

impl Credentials {
    /// Logs a failure of the proxy's own read of `prefix` at error level when it is about
    /// identity or permission (then returns true; other failures are the caller's to log).
    /// The same complaint is repeated at most once a minute.
    pub fn complain(&self, prefix: &str, range: &KeyRange, status: &Status) -> bool {
        // etcd with `--client-cert-auth` answers a tokenless call `permission denied` (the
        // proxy's CN-less certificate is user ""): then the token is what is missing.
        let tokenless = self.state().token.is_none();
        let what = match (status.code(), status.message()) {
            (Code::PermissionDenied, _) if !tokenless => format!(
                "etcd user {} lacks read permission on the prefix: grant it read on [{}, {}) (README: Running against etcd with auth)",
                self.user().unwrap_or("(none)"),
                show(&range.start),
                show(&range.range_end()),
            ),
            (c, m) if c == Code::PermissionDenied || is_auth_message(m) => match (
                self.user(),
                &self.state().outcome,
            ) {
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

/// A key for a log line: text when it is UTF-8, else escaped.
fn show(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) => format!("{s:?}"),
        Err(_) => format!("{:?}", bytes::Bytes::copy_from_slice(key)),
    }
}
