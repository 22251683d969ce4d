//! Command-line configuration: where etcd is, which prefixes to cache, how much history to
//! keep, where to listen. Every flag also reads an `ETCD_FANOUT_*` environment variable so the
//! same binary is configured the same way from a shell or a Kubernetes manifest.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};

/// etcd-fanout: one etcd watch per prefix, shared by every downstream watcher.
#[derive(Parser, Debug, Clone)]
#[command(name = "etcd-fanout", version, about)]
pub struct Config {
    /// etcd client URLs (comma-separated); requests fail over between them.
    #[arg(
        long,
        env = "ETCD_FANOUT_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379",
        value_parser = parse_endpoint
    )]
    pub endpoints: Vec<String>,

    /// A key prefix to cache (repeatable, or comma-separated), e.g. `--prefix /apisix/`.
    /// Reads and watches inside a prefix are served from its cache.
    /// A prefix inside another configured prefix is merged into it (one upstream watch; a
    /// warning is logged).
    #[arg(
        long = "prefix",
        env = "ETCD_FANOUT_PREFIXES",
        value_delimiter = ',',
        value_parser = parse_prefix
    )]
    pub prefixes: Vec<String>,

    /// Address serving the etcd v3 gRPC API (and the HTTP endpoints) to clients.
    #[arg(long, env = "ETCD_FANOUT_LISTEN", default_value = "127.0.0.1:23790")]
    pub listen: SocketAddr,

    /// Most revisions of event history kept per prefix (oldest evicted first).
    #[arg(long, env = "ETCD_FANOUT_HISTORY_REVISIONS", default_value_t = 100_000)]
    pub history_revisions: usize,

    /// Most bytes of event history kept per prefix (oldest evicted first).
    #[arg(long, env = "ETCD_FANOUT_HISTORY_BYTES", default_value_t = 256 << 20)]
    pub history_bytes: usize,

    /// Revisions of event history fetched back from etcd after a prefix is loaded, so that
    /// clients resuming from a recent revision (after a proxy restart) are served from memory.
    #[arg(long, env = "ETCD_FANOUT_BACKFILL_REVISIONS", default_value_t = 1000)]
    pub backfill_revisions: usize,

    /// Keys per page when loading a prefix from etcd.
    #[arg(long, env = "ETCD_FANOUT_LOAD_PAGE_SIZE", default_value_t = 1000)]
    pub load_page_size: i64,

    /// How often etcd's compaction revision is re-checked (e.g. `5s`, `500ms`).
    #[arg(long, env = "ETCD_FANOUT_COMPACTION_POLL", default_value = "1s", value_parser = parse_duration)]
    pub compaction_poll: Duration,

    /// How long a linearizable read waits for the cache to catch up before it is forwarded.
    #[arg(long, env = "ETCD_FANOUT_SYNC_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub sync_timeout: Duration,

    /// etcd's `--max-request-bytes` (default 1.5 MiB). Like etcd, watch responses of at least
    /// this plus 512 KiB of gRPC overhead are split when the watch asked for `fragment`.
    #[arg(
        long,
        env = "ETCD_FANOUT_MAX_REQUEST_BYTES",
        default_value_t = 1_572_864
    )]
    pub max_request_bytes: usize,

    /// Interval of progress notifications for watches that set `progress_notify`
    /// (etcd's default is 10 minutes).
    #[arg(long, env = "ETCD_FANOUT_PROGRESS_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub progress_interval: Duration,

    /// After SIGTERM, how long the replica keeps serving and accepting while `/readyz`
    /// answers 503, so that load balancers remove it before its streams end (Kubernetes
    /// removes a terminating pod from its Service endpoints a few seconds after SIGTERM).
    /// A second SIGTERM or Ctrl-C skips the rest of the delay.
    #[arg(long, env = "ETCD_FANOUT_SHUTDOWN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,

    /// After the shutdown delay, the longest time open connections get to finish once their
    /// watch streams have been ended; the process exits at most `--shutdown-delay` plus this
    /// after SIGTERM.
    #[arg(long, env = "ETCD_FANOUT_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// A client connection older than this (plus or minus 10 % jitter, as grpc-go's
    /// `MaxConnectionAge`) is asked to go away so that long-lived clients spread over the
    /// replicas after a scale-out: HTTP/2 gets a graceful GOAWAY and its watch streams end
    /// with `Unavailable` (clients resume elsewhere from their next revision), HTTP/1.x closes
    /// after its current answer (a watch stream ends at a revision boundary). `0`: never.
    #[arg(long, env = "ETCD_FANOUT_MAX_CONNECTION_AGE", default_value = "0", value_parser = parse_duration)]
    pub max_connection_age: Duration,

    /// After `--max-connection-age`, how long the connection's other calls (unary calls in
    /// flight, lease keep-alive streams) get to finish before it is closed (grpc-go's
    /// `MaxConnectionAgeGrace`).
    #[arg(long, env = "ETCD_FANOUT_MAX_CONNECTION_AGE_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub max_connection_age_grace: Duration,

    /// The client URL this replica is reached at (`etcd grpc-proxy start`'s flag). With
    /// `--resolver-prefix`, registered in etcd; `MemberList` then answers the live replicas'
    /// URLs instead of etcd's members, so clients that sync their endpoints stay on the proxy
    /// tier (without `--resolver-prefix`: this URL alone).
    #[arg(long, env = "ETCD_FANOUT_ADVERTISE_CLIENT_URL")]
    pub advertise_client_url: Option<String>,

    /// Key prefix under which replicas register `--advertise-client-url` in etcd (as
    /// `etcd grpc-proxy`: key `PREFIX/URL`, under a lease kept alive, revoked at shutdown).
    #[arg(
        long,
        env = "ETCD_FANOUT_RESOLVER_PREFIX",
        requires = "advertise_client_url"
    )]
    pub resolver_prefix: Option<String>,

    /// TTL in seconds of the registration's lease: a replica that dies without deregistering
    /// drops out of `MemberList` after this long.
    #[arg(long, env = "ETCD_FANOUT_RESOLVER_TTL", default_value_t = 60, value_parser = clap::value_parser!(i64).range(1..))]
    pub resolver_ttl: i64,

    /// A prefix whose cache has neither advanced nor been confirmed current by etcd for this
    /// long is stale: `/health` reports it unhealthy and it is served as an etcd member that
    /// lost its leader serves (see ARCHITECTURE.md, "Health"). Idle prefixes are confirmed
    /// with a sync check every third of this.
    #[arg(long, env = "ETCD_FANOUT_STALE_AFTER", default_value = "10s", value_parser = parse_duration)]
    pub stale_after: Duration,

    /// How often the proxy checks whether etcd has authentication enabled (etcd 3.4 has no
    /// status call: a tokenless read tells). Nothing is served from the cache while unknown.
    #[arg(long, env = "ETCD_FANOUT_AUTH_POLL", default_value = "1s", value_parser = parse_duration)]
    pub auth_poll: Duration,

    /// How long etcd's "allowed" for a (token, key range) is remembered: the longest a range
    /// stays readable through the proxy after its permission is revoked on etcd. Keep it well
    /// below etcd's `--auth-token-ttl` (300 s): reads served from the cache do not renew a
    /// simple token at etcd.
    #[arg(long, env = "ETCD_FANOUT_AUTH_DECISION_TTL", default_value = "5s", value_parser = parse_duration)]
    pub auth_decision_ttl: Duration,

    /// How long etcd's refusal for a (token, key range) is remembered (at most the decision
    /// TTL): the longest a newly granted permission stays refused through the proxy.
    #[arg(long, env = "ETCD_FANOUT_AUTH_DENIAL_TTL", default_value = "1s", value_parser = parse_duration)]
    pub auth_denial_ttl: Duration,

    /// Most permission decisions remembered (least used dropped first).
    #[arg(
        long,
        env = "ETCD_FANOUT_AUTH_DECISION_ENTRIES",
        default_value_t = 65_536
    )]
    pub auth_decision_entries: u64,

    /// etcd user the proxy logs in as for its own reads and watches (etcdctl's
    /// `--user NAME[:PASSWORD]`). Needs read permission on the cached prefixes only.
    #[arg(long, env = "ETCD_FANOUT_USER", hide_env_values = true)]
    pub user: Option<Secret>,

    /// Password of `--user` (then `--user` is the name as is, like etcdctl).
    #[arg(
        long,
        env = "ETCD_FANOUT_PASSWORD",
        conflicts_with = "password_file",
        hide_env_values = true
    )]
    pub password: Option<Secret>,

    /// File holding the password of `--user` (e.g. a mounted Kubernetes Secret); re-read at
    /// every login, trailing newlines trimmed.
    #[arg(long, env = "ETCD_FANOUT_PASSWORD_FILE")]
    pub password_file: Option<std::path::PathBuf>,

    /// etcd's `--auth-token-ttl` (simple tokens): the proxy renews its own simple token every
    /// half of it. JWTs are renewed from their `exp` claim.
    #[arg(long, env = "ETCD_FANOUT_AUTH_TOKEN_TTL", default_value = "300s", value_parser = parse_duration)]
    pub auth_token_ttl: Duration,
    /// Longest time an HTTP/1.x request head may take to arrive, from its first byte (from
    /// the accept for a connection's first request, which also bounds a connection that sends
    /// nothing); a connection that has not sent a whole head by then is closed unanswered.
    /// etcd (Go's server without `ReadHeaderTimeout`) has none.
    #[arg(long, env = "ETCD_FANOUT_REQUEST_HEADER_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub request_header_timeout: Duration,

    /// Longest time a kept-alive HTTP/1.x connection may wait between requests before the
    /// proxy closes it. Well above the idle time of client pools (APISIX/nginx keep idle
    /// connections 60 s); etcd keeps idle connections open for ever.
    #[arg(long, env = "ETCD_FANOUT_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_positive_duration)]
    pub idle_timeout: Duration,

    /// etcd's `--grpc-keepalive-interval`: how often the proxy PINGs an HTTP/2 client
    /// connection to check that the client is alive (etcd's default: 2 hours).
    #[arg(long, env = "ETCD_FANOUT_GRPC_KEEPALIVE_INTERVAL", default_value = "2h", value_parser = parse_positive_duration)]
    pub grpc_keepalive_interval: Duration,

    /// etcd's `--grpc-keepalive-timeout`: how long the proxy waits for the answer to its PING
    /// before it closes the connection (etcd's default: 20 s). A client whose runtime is busy
    /// for longer than this (a large backlog to decode) loses its connection.
    #[arg(long, env = "ETCD_FANOUT_GRPC_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = parse_positive_duration)]
    pub grpc_keepalive_timeout: Duration,

    /// Bytes an accepted connection's socket may hold that the client has not yet
    /// acknowledged room for (`TCP_NOTSENT_LOWAT`): beyond them a write waits until the client
    /// reads. Bounds what a client that stops reading takes from the process (its kernel
    /// buffers' worth of every reply it is sent: with thousands of them, a burst of large
    /// events would otherwise be copied into each socket until its buffers fill) without
    /// limiting a reading client's throughput (bytes in flight are not counted). 16 KiB, as
    /// HTTP/2 servers commonly use; 0: the kernel's default (no limit).
    #[arg(long, env = "ETCD_FANOUT_SOCKET_UNSENT_BYTES", default_value_t = 16 << 10)]
    pub socket_unsent_bytes: u32,

    /// `SO_SNDBUF` of accepted connections, in bytes (the kernel doubles it for its
    /// bookkeeping); 0: the kernel's autotuning. A small buffer also bounds a non-reading
    /// client's share, but limits every client's throughput to about the buffer per round
    /// trip: prefer `--socket-unsent-bytes`.
    #[arg(long, env = "ETCD_FANOUT_SOCKET_SEND_BUFFER", default_value_t = 0)]
    pub socket_send_buffer: usize,

    /// Write turns for connections whose clients have not yet been seen to read (0: none,
    /// the default). With N turns, such a connection's writes of 16 KiB or more are made N at
    /// a time, in order of arrival; a connection counts as reading once a large write was
    /// taken whole, or its socket filled and then drained, or after 512 KiB. Protects clients
    /// that are reading when thousands of new clients that never read arrive (measured:
    /// established watchers' worst delay 89 ms instead of 506 ms with 3,000 non-readers and
    /// 100 KB events), but a new client arriving with that crowd waits for its first large
    /// answer behind the crowd's first copies (up to about 1 s instead of 0.4 s): see
    /// loadtest/RESULTS.md, "Slow readers, sixth pass".
    #[arg(long, env = "ETCD_FANOUT_UNPROVEN_WRITE_TURNS", default_value_t = 0)]
    pub unproven_write_turns: usize,

    /// Threads of the new-connection lane (0: no lane, every connection on the main
    /// runtime). A connection starts in this lane, a runtime of its own, and moves to the
    /// main runtime once its client has been seen to read and 256 KiB have gone out, or after
    /// 8 small writes; one whose client is not yet proven comes back for a large write. A
    /// crowd of new clients that never read cannot queue its socket copies ahead of clients
    /// that do (src/wire/lanes.rs). Default: one per core.
    #[arg(long, env = "ETCD_FANOUT_NEW_CONNECTION_THREADS")]
    pub new_connection_threads: Option<usize>,

    /// Log format: `text` (colour only when standard output is a terminal) or `json` (one
    /// JSON object per line: `timestamp`, `level`, `target`, `message` and the event's fields).
    #[arg(
        long,
        env = "ETCD_FANOUT_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// TLS to etcd and on the listen address.
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,

    /// Every effective setting as `--flag=value` (defaults included, secrets masked), for the
    /// startup log line; filled by [`Config::from_command_line`].
    #[arg(skip)]
    pub settings: String,
}

/// How log lines are written.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (ANSI colour only on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags whose values are secret: masked in [`Config::settings`] (`--user` may be
/// `NAME:PASSWORD`: its name is kept).
const SECRET_FLAGS: [&str; 2] = ["password", "user"];

impl Config {
    /// The new-connection lane's threads: `--new-connection-threads`, or one per core (as the
    /// main runtime has).
    pub fn new_connection_lane_threads(&self) -> usize {
        self.new_connection_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Parses the command line and the environment (exiting with clap's message and code 2
    /// on a bad value) and records every effective setting in [`Config::settings`].
    pub fn from_command_line() -> Config {
        let matches = Config::command().get_matches();
        let mut config = Config::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        config.settings = settings(&matches);
        config
    }
}

/// Every flag's effective value (as given, from the environment, or the default) as
/// `--flag=value`, comma-joined values, `--flag=` when unset; secrets masked.
fn settings(matches: &clap::ArgMatches) -> String {
    let cmd = Config::command();
    let mut out = Vec::new();
    for arg in cmd.get_arguments() {
        let (id, Some(long)) = (arg.get_id().as_str(), arg.get_long()) else {
            continue;
        };
        if id == "help" || id == "version" {
            continue;
        }
        let values: Vec<String> = matches
            .get_raw(id)
            .into_iter()
            .flatten()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let mut value = values.join(",");
        if SECRET_FLAGS.contains(&long) && !value.is_empty() {
            value = match (long, value.split_once(':')) {
                ("user", Some((name, _))) => format!("{name}:***"),
                ("user", None) => value,
                _ => "***".to_string(),
            };
        }
        out.push(format!("--{long}={value}"));
    }
    out.join(" ")
}

/// etcd's `grpcOverheadBytes`: added to `--max-request-bytes` for gRPC message limits.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

impl Config {
    /// Size from which a watch response is fragmented (etcd's `maxRequestBytes` of a watch
    /// stream).
    pub fn fragment_threshold(&self) -> usize {
        self.max_request_bytes + GRPC_OVERHEAD_BYTES
    }
}

/// Parses a Go-style duration as etcd's flags take them (`time.ParseDuration`): a sequence of
/// decimal numbers each with a unit, `ns`, `us` (or `µs`), `ms`, `s`, `m`, `h`, e.g. `1m30s`,
/// `500ms`, `1h2m3.5s`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("invalid duration {s:?} (examples: 500ms, 5s, 1m30s, 1h)");
    if s.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(n).map_err(|_| bad());
    }
    let mut secs = 0.0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(bad)?;
        let n: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        secs += n * scale;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

/// Checks one `--endpoints` URL: `http://` or `https://` with a host (etcd's client URLs).
pub fn parse_endpoint(s: &str) -> Result<String, String> {
    let s = s.trim();
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| {
            format!("invalid etcd endpoint {s:?}: expected http://HOST:PORT or https://HOST:PORT")
        })?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() || authority.starts_with(':') {
        return Err(format!("invalid etcd endpoint {s:?}: no host"));
    }
    s.parse::<http::Uri>()
        .map_err(|e| format!("invalid etcd endpoint {s:?}: {e}"))?;
    Ok(s.to_string())
}

/// Checks one `--prefix`: an empty prefix would be the whole keyspace, which the proxy does
/// not cache (point clients at etcd for that).
pub fn parse_prefix(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("a prefix must not be empty (the whole keyspace is not cached)".into());
    }
    Ok(s.to_string())
}

/// The prefixes to watch: duplicates removed and every prefix that lies inside another one
/// merged into it (the outer prefix's cache serves it), longest first. Returns the merged
/// `(inner, outer)` pairs so the caller can warn.
pub fn merge_prefixes(prefixes: &[String]) -> (Vec<String>, Vec<(String, String)>) {
    let mut sorted: Vec<String> = prefixes.to_vec();
    sorted.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
    sorted.dedup();
    let mut kept: Vec<String> = Vec::new();
    let mut merged = Vec::new();
    for p in sorted {
        match kept.iter().find(|k| p.starts_with(k.as_str())) {
            Some(outer) => merged.push((p, outer.clone())),
            None => kept.push(p),
        }
    }
    kept.sort_by_key(|p| std::cmp::Reverse(p.len()));
    (kept, merged)
}

/// [`parse_duration`], refusing zero.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("duration {s:?} must be more than zero")),
        d => Ok(d),
    }
}

/// A secret string (a password, or `--user`, which may hold one): its `Debug` and `Display`
/// never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `secret`.
    pub(crate) fn new(secret: String) -> Secret {
        Secret(secret)
    }

    /// The secret itself, for the one place that sends it (the login to etcd).
    pub(crate) fn expose(&self) -> &str {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_list_every_flag_with_secrets_masked() {
        let m = Config::command().get_matches_from([
            "etcd-fanout",
            "--prefix",
            "/a/,/b/",
            "--user",
            "root:pw1",
            "--password",
            "pw2",
        ]);
        let s = settings(&m);
        for want in [
            "--prefix=/a/,/b/",
            "--user=root:***",
            "--password=***",
            "--listen=127.0.0.1:23790",
            "--log-format=text",
            "--cacert= ",
            "--client-cert-auth=false",
        ] {
            assert!(s.contains(want), "{want} not in {s}");
        }
        assert!(!s.contains("pw1") && !s.contains("pw2"), "{s}");
        let flags = Config::command()
            .get_arguments()
            .filter(|a| a.get_long().is_some_and(|l| l != "help" && l != "version"))
            .count();
        assert_eq!(s.matches(" --").count() + 1, flags, "{s}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(
            parse_duration("1h2m3.5s"),
            Ok(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert!(parse_duration("1m30").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn endpoints_and_prefixes() {
        assert!(parse_endpoint("http://127.0.0.1:2379").is_ok());
        assert!(parse_endpoint("https://etcd-0.etcd:2379").is_ok());
        assert!(parse_endpoint("foo").is_err());
        assert!(parse_endpoint("ftp://etcd:2379").is_err());
        assert!(parse_endpoint("http://").is_err());
        assert!(parse_endpoint("http://:2379").is_err());
        assert!(parse_prefix("").is_err());
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let (kept, merged) = merge_prefixes(&s(&["/a/b/", "/a/", "/c/", "/a/", "/ab"]));
        assert_eq!(kept, s(&["/a/", "/ab", "/c/"]));
        assert_eq!(merged, vec![("/a/b/".to_string(), "/a/".to_string())]);
    }
}
