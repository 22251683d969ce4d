//! loadgen: one etcd watch workload against etcd, `etcd grpc-proxy` and etcd-fanout in turn,
//! each in front of a fresh etcd started here, then one table with the ratios.
//!
//! ```text
//! cargo build --release --bin etcd-fanout -p etcd-fanout-loadtest
//! target/release/loadgen --watchers 1000 --connections 10 --prefixes 1 --rate 100 --duration 20
//! ```
//!
//! See loadtest/README.md for every knob. Exits non-zero when any target had a correctness
//! error (missing, duplicated or out-of-order event, stream error) or could not run.

mod auth;
mod burst;
mod goclient;
mod http1;
mod layout;
mod procs;
mod report;
mod slow;
mod stats;
mod tiers;
mod tls;
mod work;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use etcd_fanout::proto::etcdserverpb::{kv_client::KvClient, PutRequest, RangeRequest};
use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tonic::transport::Channel;

use http1::BoxError;
use layout::{Layout, LayoutArgs};
use procs::{PhaseUsage, Proc, Sampler};
use stats::{CounterDelta, EtcdCounters, LatencySummary};
use work::{Plan, Resume, Shared, Track};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Target {
    /// Clients talk to etcd itself.
    Etcd,
    /// `etcd grpc-proxy start` in front of etcd.
    GrpcProxy,
    /// etcd-fanout in front of etcd.
    Fanout,
    /// Three etcd-fanout replicas in front of etcd, behind a round-robin TCP balancer
    /// (`tiers.rs`).
    FanoutX3,
    /// Three etcd-fanout replicas in front of one etcd-fanout replica in front of etcd,
    /// behind a round-robin TCP balancer (`tiers.rs`).
    FanoutTwoTier,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Etcd => "etcd",
            Target::GrpcProxy => "grpc-proxy",
            Target::Fanout => "etcd-fanout",
            Target::FanoutX3 => "etcd-fanout-x3",
            Target::FanoutTwoTier => "etcd-fanout-2tier",
        }
    }
}

/// One etcd watch workload against several targets, side by side.
#[derive(Parser, Debug, Clone, Serialize)]
#[command(name = "loadgen", version, about)]
struct Args {
    /// Targets, run one after another, each in front of a fresh etcd.
    #[arg(long, value_delimiter = ',', default_value = "etcd,grpc-proxy,fanout")]
    targets: Vec<Target>,
    /// etcd binary (3.4+; also runs `etcd grpc-proxy start`).
    #[arg(long, default_value = "etcd")]
    etcd_bin: PathBuf,
    /// etcd-fanout binary (build with `cargo build --release`).
    #[arg(long, default_value = "target/release/etcd-fanout")]
    fanout_bin: PathBuf,
    /// Extra argument passed to etcd-fanout (repeatable), e.g. `--fanout-arg=--history-revisions=5000`.
    #[arg(long, allow_hyphen_values = true)]
    fanout_arg: Vec<String>,

    /// gRPC watchers in total (0 for none).
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// gRPC connections (HTTP/2) the watch streams are spread over.
    #[arg(long, default_value_t = 10)]
    connections: usize,
    /// gRPC watch streams in total (default: one per connection, like etcd's Go client);
    /// the watchers are spread over them, several watches per stream.
    #[arg(long)]
    streams: Option<usize>,
    /// APISIX-style HTTP/JSON watchers (one TCP connection each); only run against etcd and
    /// etcd-fanout (grpc-proxy has no HTTP gateway).
    #[arg(long, default_value_t = 0)]
    http_watchers: usize,
    /// Seconds an HTTP watcher keeps a watch before closing and reopening it (APISIX: 50).
    #[arg(long, default_value_t = 10.0)]
    http_reconnect: f64,
    /// Start revision of a reopened HTTP watch.
    #[arg(long, value_enum, default_value = "last")]
    http_resume: Resume,
    /// Most HTTP connections being opened (or ranges in flight) at once.
    #[arg(long, default_value_t = 256)]
    http_concurrency: usize,

    /// Watched prefixes; watcher i watches prefix i % N.
    #[arg(long, default_value_t = 1)]
    prefixes: usize,
    /// etcd-fanout is configured with one prefix covering every watched one (`--prefix
    /// <base>`) instead of one `--prefix` per watched prefix.
    #[arg(long)]
    covering_prefix: bool,
    /// APISIX 2.x-style workers: each holds one stream with one watch per resource directory
    /// (`<base>routes/`, `upstreams/`, ... ten in all); sets --watchers to 10 per worker,
    /// --streams to one per worker and --prefixes to the ten directories.
    #[arg(long)]
    apisix_workers: Option<usize>,
    /// Single-key watchers: watcher i watches the one key `<base>key/kNNNNNN` and the writes
    /// rotate over the keys, so each put concerns one watcher (etcd-fanout gets the covering
    /// prefix `<base>`).
    #[arg(long)]
    single_key: bool,
    /// Mixed watch shapes: watchers rotate over plain, prev_kv, NODELETE and NOPUT+prev_kv,
    /// and every --delete-every-th write of a prefix is a delete of the key put just before.
    #[arg(long)]
    mixed: bool,
    /// With --mixed: every Nth write of a prefix is a delete (at least 2).
    #[arg(long, default_value_t = 5)]
    delete_every: u64,
    /// The gRPC watchers are run by the Go watcher in loadtest/go/ (etcd's clientv3: one
    /// client per connection, watcher i on client i % connections), built with the Go
    /// toolchain into a temporary directory, instead of by loadgen's own client.
    #[arg(long)]
    go_client: bool,
    /// A gowatch binary built before (`bash loadtest/go/build.sh OUT`) for --go-client.
    #[arg(long)]
    go_bin: Option<PathBuf>,
    /// With --go-client: the Go watcher uses etcd's generated etcdserverpb Watch stubs (one
    /// grpc.ClientConn and one stream per connection, one receiving goroutine per stream)
    /// instead of clientv3.
    #[arg(long)]
    go_raw: bool,
    /// Prefixes are `<base>pNN/`; the cold-start prefix is `<base>cold/`.
    #[arg(long, default_value = "/loadgen/")]
    prefix_base: String,
    /// Puts per second in total, spread evenly over the prefixes (written to etcd directly).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Spread the writers' puts evenly over time (writer i starts i / --rate seconds after
    /// the first) instead of in phase (each writer writes one prefix at --rate / --prefixes
    /// puts/s, all ticking at the same moments, so the prefixes' puts arrive as bursts).
    #[arg(long)]
    stagger_writes: bool,
    /// Bytes per value (at least 40).
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Distinct keys written per prefix (written round-robin).
    #[arg(long, default_value_t = 100)]
    keys: u64,
    /// Seconds of writing.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Writes per prefix made before the watchers are created; the gRPC watchers then start
    /// at the first of them (history replay).
    #[arg(long, default_value_t = 0)]
    history: u64,

    /// Reconnect storm: at `--storm-at` of the writing time, every gRPC watch stream is
    /// dropped and every watch re-created from `--storm-back` events before its last one.
    #[arg(long)]
    storm: bool,
    /// Events each watcher replays after the storm.
    #[arg(long, default_value_t = 50)]
    storm_back: u64,
    /// When the storm hits, as a fraction of `--duration`.
    #[arg(long, default_value_t = 0.5)]
    storm_at: f64,

    /// Cold start: this many full ranges of a prefix of `--cold-keys` keys (0: none),
    /// after the watch phases.
    #[arg(long, default_value_t = 0)]
    cold: u64,
    /// Keys of the cold-start prefix (loaded before the proxy starts).
    #[arg(long, default_value_t = 1000)]
    cold_keys: usize,
    /// Bytes per value of the cold-start prefix.
    #[arg(long, default_value_t = 1000)]
    cold_value_size: usize,
    /// Concurrent cold-start ranges.
    #[arg(long, default_value_t = 16)]
    cold_concurrency: usize,
    /// Cold-start ranges over HTTP/JSON (`POST /v3/kv/range`, like APISIX) instead of gRPC;
    /// skipped for grpc-proxy.
    #[arg(long)]
    cold_http: bool,
    /// Cold-start ranges with `serializable: true` (default: linearizable, as APISIX and
    /// etcd's clients do).
    #[arg(long)]
    cold_serializable: bool,
    /// Read cold-start answers as loadgen did before (gRPC: decoded into `RangeResponse`,
    /// every KeyValue; HTTP/JSON: fresh buffers per request, int64 fields through
    /// `serde_json::Value`). Default: lean (gRPC: the answer's top-level protobuf fields
    /// walked, KeyValues counted, not decoded; HTTP/JSON: reused buffers). Both check the
    /// same things: key count, count, more, one positive header.revision for the run.
    #[arg(long)]
    cold_full_decode: bool,

    /// Seconds allowed to create every watcher (and replay history).
    #[arg(long, default_value_t = 120)]
    create_timeout: u64,
    /// Seconds allowed, after the last write, for every event to arrive.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    /// Where the temporary etcd data dirs go (default /dev/shm when present).
    #[arg(long)]
    data_root: Option<PathBuf>,
    /// Keep data dirs and logs.
    #[arg(long)]
    keep: bool,
    /// Also write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run against an etcd with auth on: writes as root, every watch and range with the
    /// token of a user that may read `--prefix-base` only, etcd-fanout with its own `--user`
    /// (see `auth.rs`).
    #[arg(long)]
    auth: bool,
    /// Every target over TLS with client certificates (see `tls.rs`): etcd on `https://`
    /// with `--client-cert-auth`, grpc-proxy and etcd-fanout with TLS toward etcd and toward
    /// their clients, every loadgen client presenting a certificate without CommonName.
    #[arg(long)]
    tls: bool,

    /// The slow-reader workload instead of the watch workload (`slow.rs`): per target, a
    /// victim watcher and gets measured without, then with, watchers that never read.
    #[arg(long)]
    slow_readers: bool,
    /// With --slow-readers: non-reading HTTP/JSON watchers (one connection each; skipped for
    /// grpc-proxy).
    #[arg(long, default_value_t = 2000)]
    slow_http: usize,
    /// With --slow-readers: non-reading gRPC watches in total.
    #[arg(long, default_value_t = 1000)]
    slow_grpc: usize,
    /// With --slow-readers: Watch streams (one watch each) per non-reading HTTP/2 connection.
    #[arg(long, default_value_t = 1)]
    slow_grpc_streams: usize,
    /// With --slow-readers: puts of `--value-size` bytes per round, at `--rate`.
    #[arg(long, default_value_t = 300)]
    slow_puts: u64,
    /// With --slow-readers: (without, with) round pairs per target, alternating in one session,
    /// so that one noisy round does not decide the ratio (the report gives every pair and the
    /// median ratio).
    #[arg(long, default_value_t = 1)]
    slow_rounds: usize,
    /// With --slow-readers: the victims (and the getter) connect first and receive this many
    /// puts of `--value-size` bytes (not measured) before the non-readers connect: watchers
    /// that were reading when the non-readers arrived. 0: the victims connect after the
    /// non-readers, just before the measured puts.
    #[arg(long, default_value_t = 0)]
    slow_warm_puts: u64,
    /// Instead of the watch workload: this many watch creates written at once on one gRPC
    /// stream (`burst.rs`), per target.
    #[arg(long)]
    create_burst: Option<usize>,
    /// Free-text note printed with the results (e.g. machine load).
    #[arg(long, default_value = "")]
    note: String,
}

/// One process's resources over a phase, with etcd's request counters.
#[derive(Debug, Clone, Default, Serialize)]
struct Phase {
    usage: PhaseUsage,
    etcd_requests: CounterDelta,
    latency: LatencySummary,
    /// Live events delivered for the first time to a watcher in this phase.
    delivered: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
struct Correctness {
    watchers_checked: usize,
    not_created: usize,
    expected: u64,
    delivered: u64,
    missing: u64,
    duplicated: u64,
    out_of_order: u64,
    bad: u64,
    /// Not counted as an error: header.revision lower than an earlier one on one watcher.
    header_regressions: u64,
    stream_errors: u64,
    error_samples: Vec<String>,
}

impl Correctness {
    fn ok(&self) -> bool {
        self.not_created
            + (self.missing + self.duplicated + self.out_of_order + self.bad + self.stream_errors)
                as usize
            == 0
    }
}

#[derive(Debug, Clone, Default, Serialize)]
struct StormOut {
    /// Seconds from the storm until every gRPC watcher was created again.
    recreate_s: Option<f64>,
    recreated: usize,
    replayed: u64,
    phase: Phase,
    etcd_after: EtcdCounters,
}

#[derive(Debug, Clone, Default, Serialize)]
struct ColdOut {
    ranges: u64,
    over_http: bool,
    seconds: f64,
    ranges_per_s: f64,
    phase: Phase,
    errors: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
struct TargetResult {
    target: String,
    ok: bool,
    failure: Option<String>,
    grpc_watchers: usize,
    grpc_streams: usize,
    http_watchers: usize,
    /// Seconds until every watcher had its `created` response.
    create_s: Option<f64>,
    /// Seconds until every gRPC watcher had replayed the history.
    replay_s: Option<f64>,
    create: Phase,
    /// etcd's gauges with every watcher open.
    etcd_during: EtcdCounters,
    writes: u64,
    write_rate: f64,
    live: Phase,
    /// With the Go watcher: the live latency at grpc-go's receipt of each response (before
    /// clientv3's dispatch to the watchers' goroutines), and the watcher's GOMAXPROCS.
    go_receipt: Option<stats::LatencySummary>,
    go_procs: Option<usize>,
    live_events_per_s: f64,
    drain_s: f64,
    http_reconnects: u64,
    storm: Option<StormOut>,
    cold: Option<ColdOut>,
    correctness: Correctness,
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = Args::parse();
    if let Some(w) = args.apisix_workers {
        args.watchers = w * layout::APISIX_DIRS.len();
        args.streams.get_or_insert(w);
        args.prefixes = layout::APISIX_DIRS.len();
    }
    if args.single_key {
        args.prefixes = args.watchers.max(1);
    }
    if let Err(e) = validate(&args) {
        eprintln!("loadgen: {e}");
        return ExitCode::from(2);
    }
    let nofile = procs::raise_nofile();
    let needed = args.http_watchers * 2 + args.connections + 1000;
    eprintln!("loadgen: RLIMIT_NOFILE {nofile}");
    if (nofile as usize) < needed {
        eprintln!("loadgen: warning: the file-descriptor limit {nofile} is below the ~{needed} this run needs");
    }
    let go = if args.go_client {
        match goclient::build(args.go_bin.as_deref()) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("loadgen: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    // The certificates live as long as the run (`--keep` keeps them).
    let _certs = if args.tls {
        let made = tempfile::Builder::new()
            .prefix("loadgen-tls-")
            .tempdir()
            .map_err(BoxError::from)
            .and_then(|d| tls::setup(d.path()).map(|()| d));
        match made {
            Ok(d) if args.keep => {
                eprintln!("loadgen: TLS certificates kept in {}", d.keep().display());
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("loadgen: cannot generate the TLS certificates: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    if special_run(&args) {
        return run_special(&args).await;
    }
    let started = std::time::SystemTime::now();
    let mut results = Vec::new();
    for t in &args.targets {
        eprintln!("loadgen: ===== target {} =====", t.name());
        let r = match run_target(&args, *t, go.as_ref().map(|g| g.path.as_path())).await {
            Ok(r) => r,
            Err(e) => TargetResult {
                target: t.name().into(),
                failure: Some(e.to_string()),
                ..Default::default()
            },
        };
        if let Some(f) = &r.failure {
            eprintln!("loadgen: {} FAILED: {f}", t.name());
        }
        results.push(r);
    }
    let text = report::render(&args, &results, started);
    println!("{text}");
    if let Some(path) = &args.json {
        let doc = serde_json::json!({ "args": args, "results": results });
        if let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default())
        {
            eprintln!("loadgen: cannot write {}: {e}", path.display());
        }
    }
    if results.iter().all(|r| r.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// True when `a` asks for one of the workloads of their own (`--slow-readers`,
/// `--create-burst`).
fn special_run(a: &Args) -> bool {
    a.slow_readers || a.create_burst.is_some()
}

/// Runs `--slow-readers` or `--create-burst` and prints its table.
async fn run_special(a: &Args) -> ExitCode {
    let (text, doc, ok) = if let Some(n) = a.create_burst {
        let rs = burst::run(a, n).await;
        let ok = rs.iter().all(|r| r.error.is_none() && r.created == n);
        (
            burst::render(a, &rs),
            serde_json::json!({ "args": a, "bursts": rs }),
            ok,
        )
    } else {
        let rs = slow::run(a).await;
        let ok = rs
            .iter()
            .all(|r| r.failure.is_none() && r.rounds.len() == 2 * a.slow_rounds.max(1));
        (
            slow::render(a, &rs),
            serde_json::json!({ "args": a, "slow_readers": rs }),
            ok,
        )
    };
    println!("{text}");
    if let Some(path) = &a.json {
        if let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default())
        {
            eprintln!("loadgen: cannot write {}: {e}", path.display());
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn validate(a: &Args) -> Result<(), String> {
    if a.prefixes == 0 || a.connections == 0 {
        return Err("--prefixes and --connections must be at least 1".into());
    }
    if a.value_size < 40 {
        return Err("--value-size must be at least 40".into());
    }
    if !(a.rate > 0.0 && a.duration > 0.0) {
        return Err("--rate and --duration must be positive".into());
    }
    if a.slow_readers && a.create_burst.is_some() {
        return Err("--slow-readers and --create-burst are separate runs".into());
    }
    if a.watchers == 0 && a.http_watchers == 0 && a.cold == 0 && !special_run(a) {
        return Err("nothing to do: no watchers and no cold-start ranges".into());
    }
    if (a.single_key || a.mixed) && a.http_watchers > 0 {
        return Err("--single-key and --mixed are gRPC workloads: no --http-watchers".into());
    }
    if a.single_key && a.history > 0 {
        return Err("--single-key does not take --history".into());
    }
    if a.mixed && a.delete_every < 2 {
        return Err("--delete-every must be at least 2".into());
    }
    if a.go_client && (a.mixed || a.single_key || a.storm || a.history > 0 || a.http_watchers > 0) {
        return Err(
            "--go-client runs plain prefix watchers only (no --mixed, --single-key, --storm, --history, --http-watchers)"
                .into(),
        );
    }
    if a.go_raw && !a.go_client {
        return Err("--go-raw is a mode of --go-client".into());
    }
    if a.tls
        && (a.go_client
            || a.targets
                .iter()
                .any(|t| matches!(t, Target::FanoutX3 | Target::FanoutTwoTier)))
    {
        return Err(
            "--tls runs the etcd, grpc-proxy and fanout targets with loadgen's own clients (no --go-client, no multi-replica targets)"
                .into(),
        );
    }
    if !(0.05..=0.95).contains(&a.storm_at) {
        return Err("--storm-at must be between 0.05 and 0.95".into());
    }
    let fanouts = [Target::Fanout, Target::FanoutX3, Target::FanoutTwoTier];
    if a.targets.iter().any(|t| fanouts.contains(t)) && !a.fanout_bin.exists() {
        return Err(format!(
            "{} not found: run `cargo build --release` first or pass --fanout-bin",
            a.fanout_bin.display()
        ));
    }
    Ok(())
}

fn layout(a: &Args) -> Layout {
    Layout::new(&LayoutArgs {
        base: &a.prefix_base,
        prefixes: a.prefixes,
        watchers: a.watchers,
        keys: a.keys,
        apisix: a.apisix_workers.is_some(),
        single_key: a.single_key,
        covering: a.covering_prefix,
        mixed: a.mixed,
        delete_every: a.delete_every,
    })
}

/// etcd-fanout's arguments besides its endpoints and listen address: the prefixes and
/// `--fanout-arg`s.
fn fanout_args(a: &Args) -> Vec<String> {
    let mut args = Vec::new();
    let lay = layout(a);
    for p in &lay.proxy_prefixes {
        args.extend(["--prefix".to_string(), p.clone()]);
    }
    // Under a covering prefix the cold-start prefix is cached already.
    if a.cold > 0 && !lay.proxy_prefixes.contains(&a.prefix_base) {
        args.extend(["--prefix".to_string(), cold_prefix(a)]);
    }
    args.extend(auth::fanout_args());
    args.extend(a.fanout_arg.iter().cloned());
    args
}

fn cold_prefix(a: &Args) -> String {
    format!("{}cold/", a.prefix_base)
}

async fn etcd_counters(addr: SocketAddr) -> EtcdCounters {
    match http1::get_text(addr, "/metrics", Duration::from_secs(10)).await {
        Ok(t) => EtcdCounters::parse(&t),
        Err(e) => {
            eprintln!("loadgen: etcd /metrics: {e}");
            EtcdCounters::default()
        }
    }
}

/// Waits until `cond` holds, polling every 5 ms, at most `limit`; returns the elapsed time.
async fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if cond() {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cond().then(|| t0.elapsed())
}

/// etcd on free loopback ports with its data in `dir`.
async fn start_etcd(a: &Args, dir: &std::path::Path) -> Result<(Proc, SocketAddr), BoxError> {
    let ports = procs::free_ports(2)?;
    let addr: SocketAddr = format!("127.0.0.1:{}", ports[0]).parse()?;
    let client = tls::url(addr);
    let peer = format!("http://127.0.0.1:{}", ports[1]);
    let mut cmd = Command::new(&a.etcd_bin);
    cmd.args(["--name", "loadgen", "--data-dir"])
        .arg(dir.join("etcd"))
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("loadgen={peer}")])
        .args(["--logger", "zap", "--log-level", "warn"]);
    if let Some(t) = tls::get() {
        cmd.args(t.etcd_flags());
    }
    procs::etcd_env(&mut cmd);
    let mut p = Proc::spawn("etcd", cmd, &dir.join("etcd.log"))?;
    procs::wait_http_ok(&mut p, addr, "/health", 30).await?;
    Ok((p, addr))
}

/// The proxy of target `t` in front of etcd at `etcd`; returns it and the client address.
async fn start_proxy(
    a: &Args,
    t: Target,
    etcd: SocketAddr,
    dir: &std::path::Path,
) -> Result<(Option<Proc>, SocketAddr), BoxError> {
    let port = procs::free_ports(1)?[0];
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let ep = tls::url(etcd);
    match t {
        Target::Etcd => Ok((None, etcd)),
        Target::GrpcProxy => {
            let mut cmd = Command::new(&a.etcd_bin);
            cmd.args(["grpc-proxy", "start"])
                .arg(format!("--endpoints={ep}"))
                .arg(format!("--listen-addr={listen}"));
            if let Some(t) = tls::get() {
                cmd.args(t.grpc_proxy_flags());
            }
            procs::etcd_env(&mut cmd);
            let mut p = Proc::spawn("grpc-proxy", cmd, &dir.join("grpc-proxy.log"))?;
            // Ready when a Range through it succeeds.
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut last = String::new();
            while Instant::now() < deadline {
                p.check_alive()?;
                match probe_range(&tls::url(listen)).await {
                    Ok(()) => return Ok((Some(p), listen)),
                    Err(e) => last = e.to_string(),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(format!("grpc-proxy not ready within 30s: {last}").into())
        }
        Target::FanoutX3 | Target::FanoutTwoTier => {
            Err("multi-replica targets are started by tiers::start".into())
        }
        Target::Fanout => {
            let mut cmd = Command::new(&a.fanout_bin);
            cmd.args(["--endpoints", &ep, "--listen", &listen.to_string()]);
            if let Some(t) = tls::get() {
                cmd.args(t.fanout_flags());
            }
            cmd.args(fanout_args(a));
            cmd.env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            );
            let mut p = Proc::spawn("etcd-fanout", cmd, &dir.join("etcd-fanout.log"))?;
            procs::wait_http_ok(&mut p, listen, "/readyz", 60).await?;
            Ok((Some(p), listen))
        }
    }
}

/// `n` gRPC connections to `url`, opened in parallel (at most 64 at a time).
async fn connect_all(url: &str, n: usize) -> Result<Vec<Channel>, BoxError> {
    let gate = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (url, gate) = (url.to_string(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await;
            work::connect(&url).await
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

async fn probe_range(url: &str) -> Result<(), BoxError> {
    let ch = tokio::time::timeout(Duration::from_secs(3), work::connect(url))
        .await
        .map_err(|_| "connect timed out")??;
    let mut kv = KvClient::new(ch);
    tokio::time::timeout(
        Duration::from_secs(3),
        kv.range(auth::as_writer(RangeRequest {
            key: Bytes::from_static(b"/loadgen-probe"),
            ..Default::default()
        })),
    )
    .await
    .map_err(|_| "range timed out")??;
    Ok(())
}

/// Writes the cold-start prefix: `n` keys of `size` bytes, 8 writers in parallel.
async fn load_cold(etcd_url: &str, prefix: &str, n: usize, size: usize) -> Result<(), BoxError> {
    let ch = work::connect(etcd_url).await?;
    let mut tasks = Vec::new();
    for w in 0..8usize {
        let mut kv = KvClient::new(ch.clone());
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(8) {
                let mut value = format!("{{\"id\":\"{i}\",\"uri\":\"/cold/{i}\"}}").into_bytes();
                value.resize(size, b' ');
                kv.put(auth::as_writer(PutRequest {
                    key: Bytes::from(format!("{prefix}route-{i:05}")),
                    value: Bytes::from(value),
                    ..Default::default()
                }))
                .await
                .map_err(|s| format!("cold load put: {s}"))?;
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn run_target(
    a: &Args,
    t: Target,
    go: Option<&std::path::Path>,
) -> Result<TargetResult, BoxError> {
    let root = a.data_root.clone().unwrap_or_else(|| {
        let shm = PathBuf::from("/dev/shm");
        if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        }
    });
    let dir = tempfile::Builder::new()
        .prefix(&format!("loadgen-{}-", t.name()))
        .tempdir_in(&root)?;
    let res = run_target_in(a, t, dir.path(), go).await;
    if a.keep {
        let kept = dir.keep();
        eprintln!("loadgen: kept {}", kept.display());
    }
    res
}

async fn run_target_in(
    a: &Args,
    t: Target,
    dir: &std::path::Path,
    go: Option<&std::path::Path>,
) -> Result<TargetResult, BoxError> {
    let http_watchers = if t == Target::GrpcProxy {
        0
    } else {
        a.http_watchers
    };
    let grpc_streams = if a.watchers == 0 {
        0
    } else {
        a.streams.unwrap_or(a.connections).clamp(1, a.watchers)
    };
    let mut r = TargetResult {
        target: t.name().into(),
        grpc_watchers: a.watchers,
        grpc_streams,
        http_watchers,
        ..Default::default()
    };

    // ---- etcd, the cold-start prefix, the proxy -------------------------------------------
    let (mut etcd, etcd_addr) = start_etcd(a, dir).await?;
    let etcd_url = tls::url(etcd_addr);
    auth::disable();
    if a.auth {
        auth::enable(&etcd_url, &a.prefix_base).await?;
    }
    if a.cold > 0 {
        load_cold(&etcd_url, &cold_prefix(a), a.cold_keys, a.cold_value_size).await?;
    }
    // Multi-replica targets (tiers.rs): `proxy` is the replica sampled, `tier` the others.
    let (mut proxy, addr, tier) = match t {
        Target::FanoutX3 | Target::FanoutTwoTier => {
            let two_tier = t == Target::FanoutTwoTier;
            let (p, tier, addr) =
                tiers::start(&a.fanout_bin, &fanout_args(a), etcd_addr, two_tier, dir).await?;
            (Some(p), addr, Some(tier))
        }
        _ => {
            let (p, addr) = start_proxy(a, t, etcd_addr, dir).await?;
            (p, addr, None)
        }
    };
    let url = tls::url(addr);
    eprintln!(
        "loadgen: {} ready at {url} (etcd {etcd_url}, pid {}{})",
        t.name(),
        etcd.pid(),
        proxy
            .as_ref()
            .map(|p| format!(", proxy pid {}", p.pid()))
            .unwrap_or_default()
    );
    let lay = layout(a);
    let groups = lay.writer_groups();
    let sh = Arc::new(Shared::new(lay, a.history));
    // The Go watcher runs the gRPC watchers instead of loadgen's own client.
    let mut goc = match go {
        Some(bin) if a.watchers > 0 => Some(goclient::GoClient::spawn(
            bin,
            &url,
            a.connections,
            a.watchers,
            a.go_raw,
            sh.clone(),
            &dir.join("gowatch.log"),
        )?),
        _ => None,
    };

    let mut watched = vec![("etcd".to_string(), etcd.pid())];
    if let Some(p) = &proxy {
        watched.push(("proxy".to_string(), p.pid()));
    }
    watched.push(("loadgen".to_string(), std::process::id() as i32));
    if let Some(g) = &goc {
        watched.push(("client".to_string(), g.pid()));
    }
    let sampler = Sampler::start(watched);
    let writer_ch = work::connect(&etcd_url).await?;

    // ---- history: writes the watchers will replay ----------------------------------------
    if a.history > 0 {
        let mut ws = Vec::new();
        for p in 0..a.prefixes {
            ws.push(tokio::spawn(work::writer(
                writer_ch.clone(),
                vec![p],
                sh.clone(),
                0.0,
                Instant::now(),
                a.history,
                Instant::now() + Duration::from_secs(120),
                a.value_size,
            )));
        }
        for w in ws {
            w.await?;
        }
        for p in 0..a.prefixes {
            let n = sh.written[p].load(Ordering::Relaxed);
            if n != a.history {
                return Err(
                    format!("history: only {n} of {} writes on prefix {p}", a.history).into(),
                );
            }
        }
    }

    // ---- create phase ---------------------------------------------------------------------
    let (stop_tx, stop_rx) = watch::channel(false);
    let (storm_tx, storm_rx) = watch::channel(0u64);
    let before_create = etcd_counters(etcd_addr).await;
    let mark = sampler.mark();
    sh.phase.store(work::CREATE, Ordering::Relaxed);
    let t_create = Instant::now();
    // Connections are opened in parallel, like independent clients; their setup counts in
    // the creation time.
    if let Some(g) = goc.as_mut() {
        g.start().await?;
    }
    let chans: Vec<Channel> = if a.watchers > 0 && goc.is_none() {
        connect_all(&url, a.connections).await?
    } else {
        Vec::new()
    };
    let mut plans: Vec<Vec<Plan>> = vec![Vec::new(); grpc_streams];
    for i in 0..a.watchers {
        let prefix = sh.layout.channel_of(i);
        let (start_rev, first) = if a.history > 0 {
            (sh.revs[prefix].lock().unwrap()[0], 0)
        } else {
            (0, 0)
        };
        plans[sh.layout.stream_of(i, grpc_streams)].push(Plan {
            prefix,
            start_rev,
            first,
            shape: sh.layout.shape_of(i),
        });
    }
    let mut grpc_tasks = Vec::with_capacity(grpc_streams);
    if goc.is_some() {
        plans.clear();
    }
    for (s, pl) in plans.into_iter().enumerate() {
        grpc_tasks.push(tokio::spawn(work::grpc_stream(
            chans[s % chans.len()].clone(),
            pl,
            sh.clone(),
            stop_rx.clone(),
            storm_rx.clone(),
            a.storm_back,
        )));
    }
    let gate = Arc::new(Semaphore::new(a.http_concurrency.max(1)));
    let opts = work::HttpOpts {
        reconnect: Duration::from_secs_f64(a.http_reconnect.max(0.1)),
        resume: a.http_resume,
        create_deadline: Instant::now() + Duration::from_secs(a.create_timeout),
    };
    let mut http_tasks = Vec::with_capacity(http_watchers);
    for i in 0..http_watchers {
        // Spread the first reconnection of each watcher evenly over one period.
        let offset = opts
            .reconnect
            .mul_f64((i as f64 + 0.5) / http_watchers as f64);
        http_tasks.push(tokio::spawn(work::http_watcher(
            addr,
            sh.layout.channel_of(i),
            sh.clone(),
            stop_rx.clone(),
            opts,
            gate.clone(),
            offset + Duration::from_secs(2),
        )));
    }
    let total_watchers = a.watchers + http_watchers;
    let limit = Duration::from_secs(a.create_timeout);
    let created = wait_for(limit, || {
        sh.created.load(Ordering::Relaxed) >= total_watchers
            || sh.errors.load(Ordering::Relaxed) > 0
    })
    .await;
    // From the first connection attempt to the last `created`.
    let create_s = t_create.elapsed().as_secs_f64();
    if created.is_some() && sh.created.load(Ordering::Relaxed) >= total_watchers {
        r.create_s = Some(create_s);
    }
    if a.history > 0 && a.watchers > 0 {
        let want = a.watchers as u64 * a.history;
        r.replay_s = wait_for(limit.saturating_sub(t_create.elapsed()), || {
            sh.fresh.load(Ordering::Relaxed) >= want || sh.errors.load(Ordering::Relaxed) > 0
        })
        .await
        .map(|_| t_create.elapsed().as_secs_f64());
    }
    r.create.usage = sampler.usage(&mark);
    let during = etcd_counters(etcd_addr).await;
    r.create.etcd_requests = during.delta(&before_create);
    r.etcd_during = during.clone();
    eprintln!(
        "loadgen: {} of {total_watchers} watchers created in {:.2}s; etcd watchers {} streams {}",
        sh.created.load(Ordering::Relaxed),
        t_create.elapsed().as_secs_f64(),
        during.watchers,
        during.watch_streams
    );
    let setup_ok =
        r.create_s.is_some() && (a.history == 0 || a.watchers == 0 || r.replay_s.is_some());

    // ---- live phase (and the storm inside it) ---------------------------------------------
    if setup_ok && total_watchers > 0 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before_live = etcd_counters(etcd_addr).await;
        let mark = sampler.mark();
        sh.phase.store(work::LIVE, Ordering::Relaxed);
        let t_live = Instant::now();
        let duration = Duration::from_secs_f64(a.duration);
        let per_writer_rate = a.rate / groups.len() as f64;
        let per_writer_count = (a.rate * a.duration / groups.len() as f64).round().max(1.0) as u64;
        let mut ws = Vec::new();
        for (i, g) in groups.iter().enumerate() {
            // In phase (every writer's first put at once), or each writer's first put
            // i / rate later so that the puts are evenly spaced.
            let first = if a.stagger_writes {
                t_live + Duration::from_secs_f64(i as f64 / a.rate)
            } else {
                t_live
            };
            ws.push(tokio::spawn(work::writer(
                writer_ch.clone(),
                g.clone(),
                sh.clone(),
                per_writer_rate,
                first,
                per_writer_count,
                t_live + duration + Duration::from_secs(1),
                a.value_size,
            )));
        }
        let mut storm_state = None;
        if a.storm && a.watchers > 0 {
            tokio::time::sleep_until((t_live + duration.mul_f64(a.storm_at)).into()).await;
            r.live.usage = sampler.usage(&mark);
            let after_live = etcd_counters(etcd_addr).await;
            r.live.etcd_requests = after_live.delta(&before_live);
            let smark = sampler.mark();
            sh.phase.store(work::STORM, Ordering::Relaxed);
            let replayed0 = sh.replayed.load(Ordering::Relaxed);
            let t_storm = Instant::now();
            let _ = storm_tx.send(1);
            let rec = wait_for(Duration::from_secs(60), || {
                sh.recreated.load(Ordering::Relaxed) >= a.watchers
            })
            .await;
            eprintln!(
                "loadgen: storm: {} of {} watchers re-created in {:.2}s",
                sh.recreated.load(Ordering::Relaxed),
                a.watchers,
                t_storm.elapsed().as_secs_f64()
            );
            storm_state = Some((smark, after_live, replayed0, rec));
        }
        for w in ws {
            w.await?;
        }
        let t_writes_done = Instant::now();
        let writes: u64 = sh
            .written
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .sum::<u64>()
            - a.history * a.prefixes as u64;
        r.writes = writes;
        r.write_rate = writes as f64 / t_live.elapsed().as_secs_f64();
        // Every watcher must get every write of its prefix from its first seq on.
        let expected = expected_deliveries(a, &sh, http_watchers);
        wait_for(Duration::from_secs(a.drain_timeout), || {
            sh.fresh.load(Ordering::Relaxed) >= expected
        })
        .await;
        r.drain_s = t_writes_done.elapsed().as_secs_f64();
        let live_end = t_live.elapsed().as_secs_f64();
        match storm_state {
            None => {
                r.live.usage = sampler.usage(&mark);
                r.live.etcd_requests = etcd_counters(etcd_addr).await.delta(&before_live);
            }
            Some((smark, after_live, replayed0, rec)) => {
                let mut s = StormOut {
                    recreate_s: rec.map(|d| d.as_secs_f64()),
                    recreated: sh.recreated.load(Ordering::Relaxed),
                    replayed: sh.replayed.load(Ordering::Relaxed) - replayed0,
                    ..Default::default()
                };
                s.phase.usage = sampler.usage(&smark);
                s.etcd_after = etcd_counters(etcd_addr).await;
                s.phase.etcd_requests = s.etcd_after.delta(&after_live);
                s.phase.delivered = sh.fresh_live[work::STORM].load(Ordering::Relaxed);
                r.storm = Some(s);
            }
        }
        r.live.delivered = sh.fresh_live[work::LIVE].load(Ordering::Relaxed);
        let live_secs = if a.storm && a.watchers > 0 {
            r.live.usage.seconds
        } else {
            live_end
        };
        r.live_events_per_s = r.live.delivered as f64 / live_secs.max(1e-9);
        // A short grace period so late duplicates are caught too.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // ---- stop the watchers and check them -------------------------------------------------
    let _ = stop_tx.send(true);
    let mut tracks: Vec<Track> = Vec::with_capacity(total_watchers);
    for task in grpc_tasks {
        match tokio::time::timeout(Duration::from_secs(30), task).await {
            Ok(Ok(ts)) => tracks.extend(ts),
            Ok(Err(e)) => sh.error(format!("watch task: {e}")),
            Err(_) => sh.error("watch task did not stop within 30s"),
        }
    }
    for task in http_tasks {
        match tokio::time::timeout(Duration::from_secs(30), task).await {
            Ok(Ok(tr)) => tracks.push(tr),
            Ok(Err(e)) => sh.error(format!("http watch task: {e}")),
            Err(_) => sh.error("http watch task did not stop within 30s"),
        }
    }
    let go_final = match goc.take() {
        Some(g) => {
            let written: Vec<u64> = sh
                .written
                .iter()
                .map(|w| w.load(Ordering::Relaxed))
                .collect();
            let f = g.stop(&written, Duration::from_secs(60)).await;
            if f.is_none() {
                sh.error("the Go watcher gave no final results");
            }
            f
        }
        None => None,
    };
    if let Some(f) = &go_final {
        sh.hists[work::LIVE]
            .lock()
            .unwrap()
            .add_counts(&f.hist, f.max, f.sum);
        sh.errors.fetch_max(f.errors, Ordering::Relaxed);
        if !f.recv_hist.is_empty() {
            let mut h = stats::Hist::default();
            h.add_counts(&f.recv_hist, f.recv_max, f.recv_sum);
            r.go_receipt = Some(h.summary());
        }
        r.go_procs = (f.gomaxprocs > 0).then_some(f.gomaxprocs);
        for m in f.samples.iter().flatten() {
            sh.note(format!("gowatch: {m}"));
        }
    }
    r.http_reconnects = sh.http_reconnects.load(Ordering::Relaxed);
    r.live.latency = sh.hists[work::LIVE].lock().unwrap().summary();
    if let Some(s) = r.storm.as_mut() {
        s.phase.latency = sh.hists[work::STORM].lock().unwrap().summary();
    }
    let c = &mut r.correctness;
    c.watchers_checked = tracks.len();
    let go_created = go_final
        .iter()
        .flat_map(|f| &f.watchers)
        .filter(|w| w.created)
        .count();
    c.not_created =
        total_watchers.saturating_sub(tracks.iter().filter(|t| t.created).count() + go_created);
    for w in go_final.iter().flat_map(|f| &f.watchers) {
        c.watchers_checked += 1;
        c.expected += w.expected;
        c.missing += w.missing;
        c.duplicated += w.dup;
        c.out_of_order += w.ooo;
        c.bad += w.bad;
        c.header_regressions += w.head_down;
    }
    for tr in tracks.iter_mut() {
        let written = sh.written[tr.prefix].load(Ordering::Relaxed);
        tr.verify_claims(&sh.revs[tr.prefix].lock().unwrap());
        c.expected += tr.expected(written);
        c.missing += tr.missing(written);
        c.duplicated += tr.duplicated;
        c.out_of_order += tr.out_of_order;
        c.bad += tr.bad;
        c.header_regressions += tr.header_regressions;
    }
    c.delivered = sh.fresh.load(Ordering::Relaxed);
    c.stream_errors = sh.errors.load(Ordering::Relaxed);
    c.error_samples = sh.error_samples.lock().unwrap().clone();
    if !setup_ok {
        r.failure = Some(format!(
            "setup incomplete: {} of {total_watchers} watchers created{}",
            sh.created.load(Ordering::Relaxed),
            if a.history > 0 {
                " (or history not replayed)"
            } else {
                ""
            }
        ));
    }

    // ---- cold start -----------------------------------------------------------------------
    if a.cold > 0 && !(a.cold_http && t == Target::GrpcProxy) {
        let before = etcd_counters(etcd_addr).await;
        let mark = sampler.mark();
        sh.phase.store(work::COLD, Ordering::Relaxed);
        let conns = a.connections.min(a.cold_concurrency).max(1);
        let cold_chans = connect_all(&url, conns).await?;
        let out = work::cold_ranges(
            &cold_chans,
            a.cold_http.then_some(addr),
            Bytes::from(cold_prefix(a).into_bytes()),
            a.cold,
            a.cold_concurrency,
            a.cold_keys,
            a.cold_serializable,
            a.cold_full_decode,
            Duration::from_secs(300),
        )
        .await;
        let mut co = ColdOut {
            ranges: out.ok,
            over_http: a.cold_http,
            seconds: out.seconds,
            ranges_per_s: out.ok as f64 / out.seconds.max(1e-9),
            errors: out.errors,
            ..Default::default()
        };
        co.phase.usage = sampler.usage(&mark);
        co.phase.etcd_requests = etcd_counters(etcd_addr).await.delta(&before);
        co.phase.latency = out.hist.summary();
        co.phase.delivered = out.ok;
        r.cold = Some(co);
    }

    // ---- the end --------------------------------------------------------------------------
    if let Some(p) = proxy.as_mut() {
        if let Err(e) = p.check_alive() {
            r.failure.get_or_insert(e.to_string());
        }
    }
    etcd.check_alive().ok();
    drop(sampler);
    if let Some(mut p) = proxy.take() {
        p.stop();
    }
    drop(tier);
    etcd.stop();
    let cold_ok = r.cold.as_ref().is_none_or(|c| c.errors.is_empty());
    r.ok = r.failure.is_none() && r.correctness.ok() && cold_ok;
    if !r.correctness.ok() {
        eprintln!(
            "loadgen: {}: correctness errors: {:?}",
            t.name(),
            r.correctness
        );
    }
    Ok(r)
}

/// First-time deliveries expected once every write is acknowledged: the gRPC watchers get
/// every write of their prefix (history included), the HTTP ones every write after it.
fn expected_deliveries(a: &Args, sh: &Shared, http_watchers: usize) -> u64 {
    let written: Vec<u64> = sh
        .written
        .iter()
        .map(|w| w.load(Ordering::Relaxed))
        .collect();
    let lay = &sh.layout;
    let grpc: u64 = (0..a.watchers)
        .map(|i| {
            let f = lay.shape_of(i).filter;
            lay.writes.count_seen(f, 0, written[lay.channel_of(i)])
        })
        .sum();
    let http: u64 = (0..http_watchers)
        .map(|i| written[i % a.prefixes].saturating_sub(a.history))
        .sum();
    grpc + http
}
