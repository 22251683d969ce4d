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
