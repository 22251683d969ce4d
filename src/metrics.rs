//! Prometheus metrics of the proxy, served on `GET /metrics`.
//!
//! Counters and gauges live in one registry so every module reports through one name space
//! (`etcd_fanout_*`), next to the process metrics (`process_*`, Linux) and the build info.
//!
//! Per-prefix state (keys, head, window) is read from the caches when `/metrics` is scraped
//! ([`PrefixGauges`], set by the hub), so the hot paths pay nothing for it.

use std::sync::LazyLock;

use prometheus::{
    GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

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
/// Upstream watch streams shared by relayed watches and catch-ups (per caller identity).
pub static RELAY_STREAMS: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "etcd_fanout_relay_streams",
        "Upstream watch streams open for relayed watches and catch-ups (shared per identity).",
    )
});
/// Relayed watches detached from their shared stream because their client stopped reading.
pub static RELAY_DETACHED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_fanout_relay_detached_total",
        "Relayed watches detached from their shared upstream stream (client not reading) and re-created later.",
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

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    let _ = REGISTRY.register(Box::new(g.clone()));
    g
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    let _ = REGISTRY.register(Box::new(c.clone()));
    c
}

/// Events received from etcd per prefix (label `prefix`). Feeds keep their labelled handle.
pub static PREFIX_EVENTS_RECEIVED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "etcd_fanout_prefix_events_received_total",
        "Events received from the prefix's upstream etcd watch.",
        &["prefix"],
    )
});

/// Downstream connections accepted, by protocol (`http1`, `http2`).
pub static CONNECTIONS_ACCEPTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "etcd_fanout_connections_accepted_total",
        "Downstream connections accepted, by protocol (http2: gRPC and h2c JSON; http1: JSON).",
        &["protocol"],
    )
});

/// Downstream connections open, by protocol.
pub static CONNECTIONS_OPEN: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge_vec(
        "etcd_fanout_connections",
        "Downstream connections currently open, by protocol.",
        &["protocol"],
    )
});

/// 1 while the proxy is ready (every prefix loaded and watched, not shutting down).
pub static READY: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "etcd_fanout_ready",
        "1 when every prefix is loaded and watched and the proxy is not shutting down.",
    )
});

/// The running build: always 1, labelled with the version.
pub static BUILD_INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge_vec(
        "etcd_fanout_build_info",
        "Build information of the running proxy (always 1).",
        &["version"],
    )
});

/// Per-prefix state of the caches, labelled `prefix`, set at scrape time.
pub struct PrefixGauges {
    /// 1 when the prefix is loaded and its upstream watch established.
    pub ready: IntGaugeVec,
    /// Live keys cached.
    pub keys: IntGaugeVec,
    /// Newest revision applied to the cache.
    pub head_revision: IntGaugeVec,
    /// Oldest revision of the history window.
    pub oldest_revision: IntGaugeVec,
    /// Revisions (batches) kept in the history window.
    pub history_revisions: IntGaugeVec,
    /// Approximate bytes of the history window.
    pub history_bytes: IntGaugeVec,
    /// The history bound in bytes (`--history-bytes`).
    pub history_bytes_limit: IntGaugeVec,
}

/// The per-prefix gauges.
pub static PREFIX: LazyLock<PrefixGauges> = LazyLock::new(|| {
    let l = &["prefix"];
    PrefixGauges {
        ready: gauge_vec(
            "etcd_fanout_prefix_ready",
            "1 when the prefix is loaded and watched on etcd.",
            l,
        ),
        keys: gauge_vec("etcd_fanout_cache_keys", "Keys cached for the prefix.", l),
        head_revision: gauge_vec(
            "etcd_fanout_cache_head_revision",
            "Newest etcd revision applied to the prefix's cache.",
            l,
        ),
        oldest_revision: gauge_vec(
            "etcd_fanout_history_oldest_revision",
            "Oldest revision from which the prefix's history window can answer.",
            l,
        ),
        history_revisions: gauge_vec(
            "etcd_fanout_history_revisions",
            "Revisions kept in the prefix's history window.",
            l,
        ),
        history_bytes: gauge_vec(
            "etcd_fanout_history_bytes",
            "Approximate bytes of the prefix's history window.",
            l,
        ),
        history_bytes_limit: gauge_vec(
            "etcd_fanout_history_bytes_limit",
            "Bound on the prefix's history window in bytes (--history-bytes).",
            l,
        ),
    }
});

/// Forces registration of every metric (so they appear at zero), the build info and, on
/// Linux, the process collector.
pub fn init() {
    #[cfg(target_os = "linux")]
    {
        static PROCESS: std::sync::Once = std::sync::Once::new();
        PROCESS.call_once(|| {
            let _ = REGISTRY.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        });
    }
    BUILD_INFO
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    let _ = (&*READY, &*PREFIX, &*PREFIX_EVENTS_RECEIVED);
    for protocol in ["http1", "http2"] {
        CONNECTIONS_ACCEPTED.with_label_values(&[protocol]);
        CONNECTIONS_OPEN.with_label_values(&[protocol]);
    }
    let _ = (
        &*UPSTREAM_WATCHES,
        &*RELAY_STREAMS,
        &*RELAY_DETACHED,
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
        &*PREFIX_UPSTREAM_STATE,
        &*PREFIX_CURRENCY_AGE,
        &*PREFIX_STALE,
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
