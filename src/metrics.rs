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
/// Watch sessions parked: their client fell behind by more than the session's byte budget,
/// so nothing more is queued for it until it drains.
pub static SESSIONS_PARKED: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "etcd_fanout_watch_sessions_parked",
        "Watch sessions parked because their client fell behind (byte budget exceeded).",
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

/// Forces registration of every metric (so they appear at zero).
pub fn init() {
    let _ = (
        &*UPSTREAM_WATCHES,
        &*UPSTREAM_WATCH_RESTARTS,
        &*UPSTREAM_EVENTS,
        &*WATCHERS,
        &*WATCH_STREAMS,
        &*SESSIONS_PARKED,
        &*EVENTS_SENT,
        &*CATCHUPS,
        &*RANGES_CACHED,
        &*RANGES_FORWARDED,
        &*SYNC_CHECKS,
        &*UPSTREAM_LOGINS,
        &*UPSTREAM_LOGIN_FAILURES,
    );
}

/// The text exposition of every metric.
pub fn render() -> String {
    TextEncoder::new()
        .encode_to_string(&REGISTRY.gather())
        .unwrap_or_default()
}
