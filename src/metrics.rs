//! Prometheus metrics of the proxy, served on `GET /metrics`.
//!
//! Counters and gauges live in one registry so every module reports through one name space
//! (`etcd_fanout_*`).

use std::sync::LazyLock;

use prometheus::{IntCounter, IntGauge, Registry, TextEncoder};

/// The registry every metric below is registered in.
pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

fn counter(name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    let _ = REGISTRY.register(Box::new(c.clone()));
    c
}

fn gauge(name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    let _ = REGISTRY.register(Box::new(g.clone()));
    g
}

/// Upstream etcd watches currently open (one per prefix when healthy).
pub static UPSTREAM_WATCHES: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "etcd_fanout_upstream_watches",
        "Watches the proxy holds open on etcd.",
    )
});
/// Upstream watch restarts after failures.
pub static UPSTREAM_WATCH_RESTARTS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_fanout_upstream_watch_restarts_total",
        "Upstream watches resumed after a failure.",
    )
});
/// Events received from etcd.
pub static UPSTREAM_EVENTS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_fanout_upstream_events_total",
        "Events received from upstream watches.",
    )
});
/// Downstream watches currently active.
pub static WATCHERS: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "etcd_fanout_watchers",
        "Downstream watches currently active.",
    )
});
/// Downstream watch streams currently open.
pub static WATCH_STREAMS: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "etcd_fanout_watch_streams",
        "Downstream watch streams currently open.",
    )
});
/// Events delivered to downstream watchers.
pub static EVENTS_SENT: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_fanout_events_sent_total",
        "Events delivered to downstream watchers.",
    )
});
/// Watchers that needed revisions older than the cache window and were caught up from etcd.
pub static CATCHUPS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_fanout_watch_catchups_total",
        "Watches caught up from etcd (older than the window).",
    )
});
/// Ranges answered from the cache.
pub static RANGES_CACHED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_fanout_ranges_cached_total",
        "Range requests answered from the cache.",
    )
});
/// Ranges forwarded to etcd.
pub static RANGES_FORWARDED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_fanout_ranges_forwarded_total",
        "Range requests forwarded to etcd.",
    )
});
/// Shared linearizability checks sent to etcd.
pub static SYNC_CHECKS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_fanout_sync_checks_total",
        "Shared upstream checks made for linearizable reads.",
    )
});
/// Auth state as known: -1 unknown, 0 disabled, 1 enabled.
pub static AUTH_STATE: LazyLock<IntGauge> = LazyLock::new(|| {
    let g = gauge(
        "etcd_fanout_auth_enabled",
        "etcd authentication as known: -1 unknown, 0 disabled, 1 enabled.",
    );
    g.set(-1);
    g
});
/// Permission probes sent to etcd.
pub static AUTH_PROBES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_fanout_auth_probes_total",
        "Permission probes (count-only ranges with a caller's token) sent to etcd.",
    )
});
/// Permission decisions answered from the decision table (or by a probe already in flight).
pub static AUTH_DECISION_HITS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_fanout_auth_decision_hits_total",
        "Permission decisions taken from the shared table or an in-flight probe.",
    )
});
/// Requests refused with etcd's auth error.
pub static AUTH_DENIALS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_fanout_auth_denials_total",
        "Requests the cache could serve, refused with etcd's auth error.",
    )
});
/// Requests forwarded because the auth state was unknown.
pub static AUTH_UNKNOWN_FORWARDS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_fanout_auth_unknown_forwards_total",
        "Requests forwarded to etcd because its auth state was unknown.",
    )
});

/// Logins of the proxy's own etcd user that returned a token.
pub static UPSTREAM_LOGINS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_fanout_upstream_logins_total",
        "Logins of the proxy's own etcd user that returned a token (first login and renewals).",
    )
});
/// Logins of the proxy's own etcd user that failed.
pub static UPSTREAM_LOGIN_FAILURES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_fanout_upstream_login_failures_total",
        "Logins of the proxy's own etcd user that failed (wrong credentials, etcd unreachable).",
    )
});

/// Log lines dropped because the log output refused them or was too slow.
pub static LOG_DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_fanout_log_dropped_total",
        "Log lines dropped because the log output failed or fell behind",
    )
});

/// Failed accepts on the listener (e.g. at the file-descriptor limit).
pub static ACCEPT_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_fanout_accept_errors_total",
        "Failed accepts on the listener",
    )
});

/// Forces registration of every metric (so they appear at zero).
pub fn init() {
    let _ = (
        &*UPSTREAM_WATCHES,
        &*UPSTREAM_WATCH_RESTARTS,
        &*UPSTREAM_EVENTS,
        &*WATCHERS,
        &*WATCH_STREAMS,
        &*EVENTS_SENT,
        &*CATCHUPS,
        &*RANGES_CACHED,
        &*RANGES_FORWARDED,
        &*SYNC_CHECKS,
        &*AUTH_STATE,
        &*AUTH_PROBES,
        &*AUTH_DECISION_HITS,
        &*AUTH_DENIALS,
        &*AUTH_UNKNOWN_FORWARDS,
        &*UPSTREAM_LOGINS,
        &*UPSTREAM_LOGIN_FAILURES,
        &*LOG_DROPPED,
        &*ACCEPT_ERRORS,
    );
}

/// The text exposition of every metric.
pub fn render() -> String {
    TextEncoder::new()
        .encode_to_string(&REGISTRY.gather())
        .unwrap_or_default()
}
