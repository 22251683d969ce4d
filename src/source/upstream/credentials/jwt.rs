//! The `exp` claim of a JWT, to schedule the renewal of the proxy's own token.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;

/// The `exp` claim of a JWT (etcd's `--auth-token jwt`); `None` for anything else (etcd's
/// simple tokens are `<16 letters>.<index>`). Only the payload is read, not verified: the
/// proxy uses it to schedule its own renewal, etcd verifies.
pub(super) fn expiry(token: &str) -> Option<SystemTime> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_exp_is_read_simple_tokens_are_not() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let jwt = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256","typ":"JWT"}"#),
            b64(r#"{"exp":1900000000,"revision":3,"username":"fanout"}"#)
        );
        assert_eq!(
            expiry(&jwt),
            Some(UNIX_EPOCH + Duration::from_secs(1_900_000_000))
        );
        assert_eq!(expiry("ZRsUWgrPWyjCbTyJ.12"), None);
        assert_eq!(expiry("a.b.c"), None);
    }
}
