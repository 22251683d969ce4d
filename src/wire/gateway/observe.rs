//! Request metrics of the HTTP side (the JSON gateway and the proxy's own endpoints): every
//! request counted by route and HTTP status, non-streaming ones timed
//! (`etcd_fanout_http_requests_total`, `etcd_fanout_http_request_duration_seconds`).
//!
//! The `route` label is always one of a fixed set (a `/v3/` route of [`routes::ROUTES`], a
//! relayed prefix, one of the fixed endpoints, or `other`): a client's path never becomes a
//! label value. Each route's handles are made once ([`handles`]).

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Instant;

use super::routes;
use crate::metrics::{RequestHandles, HTTP};

/// Statuses with a handle slot of their own (others take the cold path).
const STATUSES: [u16; 15] = [
    200, 301, 400, 401, 403, 404, 405, 408, 413, 429, 500, 501, 502, 503, 504,
];

/// Fixed paths outside `/v3/`.
const ENDPOINTS: [&str; 7] = [
    "/version",
    "/health",
    "/debug/vars",
    "/config/local/log",
    "/metrics",
    "/readyz",
    "/livez",
];

/// Streaming routes: counted (when their head is ready), not timed.
const STREAMING: [&str; 3] = [
    "/v3/watch",
    "/v3/lease/keepalive",
    "/v3/maintenance/snapshot",
];

/// Label of paths outside every known route.
const OTHER: &str = "other";

/// The handles of every route label.
static ROUTES: LazyLock<HashMap<&'static str, RequestHandles>> = LazyLock::new(|| {
    routes::route_paths()
        .chain(routes::RELAYED_PREFIXES.iter().copied())
        .chain(ENDPOINTS)
        .chain([OTHER])
        .map(|r| {
            let timed = !STREAMING.contains(&r);
            (r, RequestHandles::new(&HTTP, r, STATUSES.len(), timed))
        })
        .collect()
});

/// The route label of a request path (`/v3beta/` is `/v3/`).
fn label(path: &str) -> &'static str {
    let v3;
    let path = match path.strip_prefix("/v3beta/") {
        Some(rest) => {
            v3 = format!("/v3/{rest}");
            v3.as_str()
        }
        None => path,
    };
    if let Some((k, _)) = ROUTES.get_key_value(path) {
        return k;
    }
    routes::RELAYED_PREFIXES
        .iter()
        .find(|p| path.starts_with(**p))
        .copied()
        .unwrap_or(OTHER)
}

/// The handles of the route `path` belongs to.
pub(super) fn handles(path: &str) -> &'static RequestHandles {
    let l = label(path);
    match ROUTES.get(l) {
        Some(h) => h,
        None => &ROUTES[OTHER],
    }
}

/// A request of `route` that arrived at `start` is answered with `status`.
pub(super) fn answered(route: &RequestHandles, status: http::StatusCode, start: Instant) {
    let code = status.as_u16();
    let slot = STATUSES.iter().position(|s| *s == code);
    route.done(slot, status.as_str(), start.elapsed());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_a_fixed_set() {
        assert_eq!(label("/v3/kv/range"), "/v3/kv/range");
        assert_eq!(label("/v3beta/kv/range"), "/v3/kv/range");
        assert_eq!(label("/v3/lock/lock"), "/v3/lock/");
        assert_eq!(label("/metrics"), "/metrics");
        assert_eq!(label("/v3/kv/nothing"), OTHER);
        assert_eq!(label("/anything/../else"), OTHER);
    }
}
