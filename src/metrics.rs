//! Prometheus metrics of the proxy, served on `GET /metrics`.
//!
//! Counters and gauges live in one registry so every module reports through one name space
//! (`etcd_fanout_*`).

use std::sync::LazyLock;

use prometheus::{GaugeVec, IntCounter, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

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
/// Per prefix: state of its upstream watch (0 loading, 1 watching, 2 resuming after a
/// failure).
pub static PREFIX_UPSTREAM_STATE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    let g = IntGaugeVec::new(
        Opts::new(
            "etcd_fanout_prefix_upstream_state",
            "Upstream watch state per prefix: 0 loading, 1 watching, 2 resuming after a failure.",
        ),
        &["prefix"],
    )
    .expect("valid metric");
    let _ = REGISTRY.register(Box::new(g.clone()));
    g
});
/// Per prefix: seconds since the cache last advanced or was confirmed current by etcd.
pub static PREFIX_CURRENCY_AGE: LazyLock<GaugeVec> = LazyLock::new(|| {
    let g = GaugeVec::new(
        Opts::new(
            "etcd_fanout_prefix_currency_age_seconds",
            "Seconds since the prefix's cache last advanced or was confirmed current by etcd.",
        ),
        &["prefix"],
    )
    .expect("valid metric");
    let _ = REGISTRY.register(Box::new(g.clone()));
    g
});
/// Per prefix: 1 while the cache is stale (not confirmed current for `--stale-after`).
pub static PREFIX_STALE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    let g = IntGaugeVec::new(
        Opts::new(
            "etcd_fanout_prefix_stale",
            "1 while the prefix's cache has not been confirmed current for --stale-after.",
        ),
        &["prefix"],
    )
    .expect("valid metric");
    let _ = REGISTRY.register(Box::new(g.clone()));
    g
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
        &*PREFIX_UPSTREAM_STATE,
        &*PREFIX_CURRENCY_AGE,
        &*PREFIX_STALE,
    );
}

/// The text exposition of every metric.
pub fn render() -> String {
    TextEncoder::new()
        .encode_to_string(&REGISTRY.gather())
        .unwrap_or_default()
}
