//! Prometheus metrics of the proxy, served on `GET /metrics`.
//!
//! Counters and gauges live in one registry so every module reports through one name space
//! (`etcd_fanout_*`), next to the process metrics (`process_*`, Linux) and the build info.
//!
//! Per-prefix state (keys, head, window, lag) is read from the caches when `/metrics` is
//! scraped ([`PrefixGauges`], set by the hub), so the hot paths pay nothing for it. What the
//! hot paths count (events in and out, watchers, catch-ups, delivery latency, requests) goes
//! through handles resolved once: per prefix held by its feed ([`PrefixCounters`]), per
//! upstream request kind, gRPC method and gateway route in tables made at first use
//! ([`RequestHandles`]). Counting an event or a request is then an atomic add, never a label
//! lookup, a lock or an allocation.

use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
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

/// Moves of downstream connections between the main runtime and the new-connection lane
/// (`wire::lanes`), by protocol and destination (`lane`: a large write of a client not yet
/// seen to read; `main`: the client reads).
pub static CONNECTION_MOVES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "etcd_fanout_connection_moves_total",
        "Moves of downstream connections, by protocol and destination: to the new-connection lane (to=lane) for the large writes of a client not yet seen to read, back to the main runtime (to=main) once it reads.",
        &["protocol", "to"],
    )
});

/// Downstream connections asked to go away at `--max-connection-age`, by protocol.
pub static CONNECTIONS_AGED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "etcd_fanout_connections_aged_total",
        "Downstream connections asked to go away at --max-connection-age (HTTP/2 GOAWAY, HTTP/1.x close after the current answer), by protocol.",
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

/// Buckets (seconds) of the request and delivery latency histograms: 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

fn histogram_vec(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid metric");
    let _ = REGISTRY.register(Box::new(h.clone()));
    h
}

/// What the proxy asks etcd, by kind (label `kind`): the etcd load the proxy causes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    /// Watch streams the proxy opens for its prefixes: the upstream watch (and every resume)
    /// and the history backfill after a load.
    Watch,
    /// Watch streams replaying revisions older than a cache window for a client (catch-ups).
    CatchUp,
    /// Range pages loading a prefix.
    Load,
    /// Ranges of the shared sync checks (linearizable reads, idle-prefix confirmation).
    SyncCheck,
    /// Compaction probes (the compaction poll).
    CompactionProbe,
    /// Polls of etcd's auth state.
    AuthPoll,
    /// Permission probes (a caller's token on a count-only range).
    PermissionProbe,
    /// Logins of the proxy's own user.
    Login,
    /// Client requests forwarded to etcd unchanged (writes, ranges the cache does not answer,
    /// Lease, Cluster, Maintenance, Auth, watches outside every prefix).
    Forwarded,
    /// Requests relayed to etcd's HTTP server (`/version`, `/health`, lock, election).
    Http,
    /// Discovery (`--resolver-prefix`): the registration's lease grant, put, keep-alive
    /// stream and revoke, and the range and watch of every replica's registration.
    Registry,
}

impl Upstream {
    /// Every kind, in label order.
    const ALL: [Upstream; 11] = [
        Upstream::Watch,
        Upstream::CatchUp,
        Upstream::Load,
        Upstream::SyncCheck,
        Upstream::CompactionProbe,
        Upstream::AuthPoll,
        Upstream::PermissionProbe,
        Upstream::Login,
        Upstream::Forwarded,
        Upstream::Http,
        Upstream::Registry,
    ];

    /// The `kind` label.
    pub fn label(self) -> &'static str {
        match self {
            Upstream::Watch => "watch",
            Upstream::CatchUp => "catchup_watch",
            Upstream::Load => "load",
            Upstream::SyncCheck => "sync_check",
            Upstream::CompactionProbe => "compaction_probe",
            Upstream::AuthPoll => "auth_poll",
            Upstream::PermissionProbe => "permission_probe",
            Upstream::Login => "login",
            Upstream::Forwarded => "forwarded",
            Upstream::Http => "http",
            Upstream::Registry => "registry",
        }
    }

    /// Counts one request of this kind sent to etcd.
    pub fn inc(self) {
        UPSTREAM_REQUESTS[self as usize].inc();
    }
}

/// `etcd_fanout_upstream_requests_total{kind}`, one handle per [`Upstream`] kind.
static UPSTREAM_REQUESTS: LazyLock<[IntCounter; 11]> = LazyLock::new(|| {
    let v = counter_vec(
        "etcd_fanout_upstream_requests_total",
        "Requests the proxy sent to etcd, by kind: watch (upstream watch streams of the \
         prefixes, resumes, backfill), catchup_watch, load (range pages), sync_check, \
         compaction_probe, auth_poll, permission_probe, login, forwarded (client requests \
         passed through), http (etcd's HTTP endpoints), registry (discovery registrations).",
        &["kind"],
    );
    Upstream::ALL.map(|k| v.with_label_values(&[k.label()]))
});

/// Per prefix, what the hot paths count: resolved once when the feed is made and held by it.
#[derive(Debug, Clone)]
pub struct PrefixCounters {
    /// `etcd_fanout_prefix_events_received_total{prefix}`.
    pub events_in: IntCounter,
    /// `etcd_fanout_prefix_events_sent_total{prefix}`.
    pub events_out: IntCounter,
    /// `etcd_fanout_prefix_watchers{prefix}`.
    pub watchers: IntGauge,
    /// `etcd_fanout_prefix_catchups_total{prefix}`.
    pub catchups: IntCounter,
}

impl PrefixCounters {
    /// The handles of `prefix` (its series appear at zero).
    pub fn new(prefix: &str) -> PrefixCounters {
        let l = &[prefix];
        PrefixCounters {
            events_in: PREFIX_EVENTS_RECEIVED.with_label_values(l),
            events_out: PREFIX_EVENTS_SENT.with_label_values(l),
            watchers: PREFIX_WATCHERS.with_label_values(l),
            catchups: PREFIX_CATCHUPS.with_label_values(l),
        }
    }
}

/// Events delivered to downstream watchers per prefix (cached watches and their catch-ups).
pub static PREFIX_EVENTS_SENT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "etcd_fanout_prefix_events_sent_total",
        "Events delivered to downstream watches of the prefix (from its cache and catch-ups).",
        &["prefix"],
    )
});

/// Downstream watches per prefix.
pub static PREFIX_WATCHERS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge_vec(
        "etcd_fanout_prefix_watchers",
        "Downstream watches currently served from the prefix's cache (or catching up).",
        &["prefix"],
    )
});

/// Catch-ups per prefix.
pub static PREFIX_CATCHUPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "etcd_fanout_prefix_catchups_total",
        "Watches of the prefix caught up from etcd (they needed revisions older than the window).",
        &["prefix"],
    )
});

/// Fan-out delivery latency by wire (`grpc`, `json`): see [`delivered`].
static DELIVERY: LazyLock<[Histogram; 2]> = LazyLock::new(|| {
    let v = histogram_vec(
        "etcd_fanout_delivery_latency_seconds",
        "Fan-out delivery latency of live events: from the moment the proxy received etcd's \
         watch response carrying the revision to the moment the response to a watch that was \
         current (synced) is taken by the downstream connection for writing (gRPC: encoded \
         into the HTTP/2 stream; JSON: the chunk handed to the connection's writer). \
         Backlogs replayed to watches behind the head are not counted.",
        &["wire"],
    );
    [
        v.with_label_values(&["grpc"]),
        v.with_label_values(&["json"]),
    ]
});

/// The wire a watch response is written on.
#[derive(Debug, Clone, Copy)]
pub enum Wire {
    /// gRPC (protobuf over HTTP/2).
    Grpc = 0,
    /// The JSON gateway (HTTP/1.x or h2c).
    Json = 1,
}

/// A live events response whose oldest revision was received from etcd at `received` is
/// being written on `wire` now.
pub fn delivered(wire: Wire, received: std::time::Instant) {
    delivered_at(wire, received, std::time::Instant::now());
}

/// [`delivered`] with the time of writing given: an encoder writing many responses at once
/// reads the clock once.
pub fn delivered_at(wire: Wire, received: std::time::Instant, now: std::time::Instant) {
    delivered_many(wire, received, now, 1);
}

/// [`delivered_at`] for `n` responses written together: one observation each, counted
/// locally and added to the shared histogram at once (a few atomic operations per call, not
/// per response).
pub fn delivered_many(wire: Wire, received: std::time::Instant, now: std::time::Instant, n: usize) {
    let h = &DELIVERY[wire as usize];
    let latency = now.saturating_duration_since(received).as_secs_f64();
    if n == 1 {
        h.observe(latency);
        return;
    }
    let local = h.local();
    for _ in 0..n {
        local.observe(latency);
    }
    local.flush();
}

/// Watch sessions currently waiting on a full queue (their client reads slower than the
/// proxy sends, and the reply-count backstop was reached before the byte budget).
pub static SESSIONS_BLOCKED: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "etcd_fanout_watch_sessions_blocked",
        "Watch sessions currently waiting for room in their full response queue.",
    )
});

/// Times a watch session waited on a full queue.
pub static SESSION_BLOCKS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_fanout_watch_session_blocks_total",
        "Times a watch session had to wait for room in its full response queue.",
    )
});

/// Times a watch session was parked.
pub static SESSION_PARKS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_fanout_watch_session_parks_total",
        "Times a watch session was parked because its client fell behind by the byte budget.",
    )
});

/// A family of request metrics: requests by name and code, and a latency histogram by name.
#[derive(Debug)]
pub struct RequestFamily {
    /// `..._requests_total{NAME, code}`.
    requests: IntCounterVec,
    /// `..._request_duration_seconds{NAME}`.
    duration: HistogramVec,
}

/// gRPC requests (label `method`: the full method path).
pub static GRPC: LazyLock<RequestFamily> = LazyLock::new(|| RequestFamily {
    requests: counter_vec(
        "etcd_fanout_grpc_requests_total",
        "gRPC calls answered, by method (full path, `unknown` for methods etcd does not serve) \
         and gRPC status code (Go's names), counted when the call ends (streams too).",
        &["method", "code"],
    ),
    duration: histogram_vec(
        "etcd_fanout_grpc_request_duration_seconds",
        "Duration of unary gRPC calls, by method: from the request's arrival to the end of the \
         answer (its trailers handed to the connection). Streaming methods are not observed.",
        &["method"],
    ),
});

/// Gateway (HTTP) requests (label `route`: a gateway route, or one of the proxy's paths).
pub static HTTP: LazyLock<RequestFamily> = LazyLock::new(|| RequestFamily {
    requests: counter_vec(
        "etcd_fanout_http_requests_total",
        "HTTP requests answered (JSON gateway and the proxy's endpoints), by route (`other` \
         for unknown paths) and HTTP status code.",
        &["route", "code"],
    ),
    duration: histogram_vec(
        "etcd_fanout_http_request_duration_seconds",
        "Duration of HTTP requests by route: from the request head's arrival to the answer's \
         head being ready (the body is in memory by then). Streams (watch, keepalive, \
         snapshot) are not observed.",
        &["route"],
    ),
});

/// One gRPC method's or HTTP route's handles: the histogram and one counter per code slot,
/// each resolved on first use (so series exist only for codes that happened) and read
/// without a lock afterwards.
#[derive(Debug)]
pub struct RequestHandles {
    /// The family.
    family: &'static RequestFamily,
    /// The method or route label.
    name: String,
    /// Whether calls are observed in the latency histogram (not for streams).
    timed: bool,
    /// The histogram, made on first use.
    duration: OnceLock<Histogram>,
    /// Counters per code slot (the caller maps codes to slots), made on first use.
    codes: Box<[OnceLock<IntCounter>]>,
}

impl RequestHandles {
    /// Handles of `name` in `family` with `slots` code slots; `timed` false for streams.
    pub fn new(family: &'static RequestFamily, name: &str, slots: usize, timed: bool) -> Self {
        RequestHandles {
            family,
            name: name.to_string(),
            timed,
            duration: OnceLock::new(),
            codes: (0..slots).map(|_| OnceLock::new()).collect(),
        }
    }

    /// One request ended with `code` (in slot `slot`, or none: looked up, the cold path)
    /// after `elapsed`.
    pub fn done(&self, slot: Option<usize>, code: &str, elapsed: Duration) {
        match slot.and_then(|i| self.codes.get(i)) {
            Some(c) => c
                .get_or_init(|| self.family.requests.with_label_values(&[&self.name, code]))
                .inc(),
            None => self
                .family
                .requests
                .with_label_values(&[&self.name, code])
                .inc(),
        }
        if self.timed {
            self.duration
                .get_or_init(|| self.family.duration.with_label_values(&[&self.name]))
                .observe(elapsed.as_secs_f64());
        }
    }
}

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
    /// Revisions etcd is known to have reached beyond what the cache is proven to hold.
    pub lag_revisions: IntGaugeVec,
    /// Seconds since the cache was last known current.
    pub lag_seconds: GaugeVec,
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
        lag_revisions: gauge_vec(
            "etcd_fanout_prefix_upstream_lag_revisions",
            "Revisions etcd is known to be at (the newest response header the proxy saw from \
             etcd: events, sync checks, forwarded calls, the compaction poll) beyond the newest \
             revision the prefix's cache is proven to hold (its head, or the revision a sync \
             check proved the cached state current at). Writes outside the prefix count here \
             until the next sync check (at most a third of --stale-after).",
            l,
        ),
        lag_seconds: {
            let g = GaugeVec::new(
                Opts::new(
                    "etcd_fanout_prefix_upstream_lag_seconds",
                    "Seconds since the prefix's cache was last known current: its last event or \
                     progress notification from etcd, or the last sync check proving it current \
                     (+Inf before the first load). Stale above --stale-after.",
                ),
                l,
            )
            .expect("valid metric");
            let _ = REGISTRY.register(Box::new(g.clone()));
            g
        },
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
    let _ = (
        &*READY,
        &*PREFIX,
        &*PREFIX_EVENTS_RECEIVED,
        &*PREFIX_EVENTS_SENT,
        &*PREFIX_WATCHERS,
        &*PREFIX_CATCHUPS,
        &*UPSTREAM_REQUESTS,
        &*DELIVERY,
        &*GRPC,
        &*HTTP,
        &*SESSIONS_BLOCKED,
        &*SESSION_BLOCKS,
        &*SESSION_PARKS,
    );
    for protocol in ["http1", "http2"] {
        CONNECTIONS_ACCEPTED.with_label_values(&[protocol]);
        CONNECTIONS_OPEN.with_label_values(&[protocol]);
        CONNECTIONS_AGED.with_label_values(&[protocol]);
        for to in ["lane", "main"] {
            CONNECTION_MOVES.with_label_values(&[protocol, to]);
        }
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
