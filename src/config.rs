//! Command-line configuration: where etcd is, which prefixes to cache, how much history to
//! keep, where to listen. Every flag also reads an `ETCD_FANOUT_*` environment variable so the
//! same binary is configured the same way from a shell or a Kubernetes manifest.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// etcd-fanout: one etcd watch per prefix, shared by every downstream watcher.
#[derive(Parser, Debug, Clone)]
#[command(name = "etcd-fanout", version, about)]
pub struct Config {
    /// etcd client URLs (comma-separated); requests fail over between them.
    #[arg(
        long,
        env = "ETCD_FANOUT_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub endpoints: Vec<String>,

    /// A key prefix to cache (repeatable, or comma-separated), e.g. `--prefix /apisix/`.
    /// Reads and watches inside a prefix are served from its cache.
    #[arg(long = "prefix", env = "ETCD_FANOUT_PREFIXES", value_delimiter = ',')]
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
    pub user: Option<crate::source::credentials::Secret>,

    /// Password of `--user` (then `--user` is the name as is, like etcdctl).
    #[arg(
        long,
        env = "ETCD_FANOUT_PASSWORD",
        conflicts_with = "password_file",
        hide_env_values = true
    )]
    pub password: Option<crate::source::credentials::Secret>,

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

    /// TLS to etcd and on the listen address.
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
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

/// Parses `250ms`, `5s`, `10m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in {s:?}")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

/// [`parse_duration`], refusing zero.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("duration {s:?} must be more than zero")),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
    }
}
