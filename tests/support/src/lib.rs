//! The shared harness of etcd-fanout's integration tests (`tests/*.rs`), compiled once as a
//! library instead of once per test target: real etcd processes and real etcd-fanout
//! processes on free loopback ports, gRPC clients to them, and the helpers the tests share.
//!
//! Every process is started with its own temporary data directory and killed by PID when its
//! handle drops, so a failing test never leaves a server behind.
//!
//! | module | owns |
//! |---|---|
//! | (root) | [`Etcd`], [`Proxy`] processes, gRPC [`Clients`], [`range_end`], metrics text |
//! | [`http`] | the one HTTP/1.1 test client (whole and streamed answers, chunk by chunk) |
//! | [`gateway`] | JSON gateway comparisons: base64, identity masking, etcd-vs-proxy answers |
//! | [`diff`] | differential gRPC transcripts: reference etcd vs proxy, compared with a diff |
//! | [`checker`] | the watch history checker: every revision once, in order, or an error |
//! | [`watchers`] | load: writers and many watch streams recorded for the checker |
//! | [`cluster`] | a multi-member etcd cluster for the fault tests |
//! | [`fault`] | fault injection: a controllable TCP relay, process helpers |
//! | [`tls`] | TLS mode (`ETCD_FANOUT_TEST_TLS=1`): certificates, TLS flags, TLS client connections |
//! | [`auth`] | etcd with auth on: users and roles by `etcdctl`, tokens, unready proxies |

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_fanout::proto::etcdserverpb::{
    kv_client::KvClient, lease_client::LeaseClient, watch_client::WatchClient,
};
use tonic::transport::Channel;

pub use http::http_get;

/// A free TCP port on 127.0.0.1 (bound then released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// One real etcd server process.
pub struct Etcd {
    /// The child process (killed on drop).
    child: Option<Child>,
    /// Client URL, e.g. `http://127.0.0.1:23456`.
    pub url: String,
    /// Client port.
    pub port: u16,
    /// Peer port.
    pub peer_port: u16,
    /// Data directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// Extra flags the server was started with (kept for restarts).
    extra: Vec<String>,
}

impl Etcd {
    /// Starts a single-member etcd on free loopback ports and waits until it is healthy.
    pub fn start() -> Etcd {
        Self::start_with(&[])
    }

    /// Like [`Etcd::start`] with extra command line flags.
    pub fn start_with(extra: &[&str]) -> Etcd {
        let dir = etcd_data_dir();
        let port = free_port();
        let peer_port = free_port();
        let mut e = Etcd {
            child: None,
            url: tls::url(port),
            port,
            peer_port,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        e.spawn();
        e
    }

    fn spawn(&mut self) {
        let data = self.dir.path().join("data");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(etcd_bin());
        cmd.arg("--name")
            .arg("t")
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(&self.url)
            .arg("--advertise-client-urls")
            .arg(&self.url)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("t={peer}"))
            .args(if tls::enabled() {
                tls::etcd_flags()
            } else {
                Vec::new()
            })
            .args(&self.extra)
            .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH);
        self.child = Some(spawn_logged(
            &mut cmd,
            &self.dir.path().join("etcd.log"),
            "start etcd (is etcd-server installed?)",
        ));
        wait_http_ok(self.port, "/health", Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("etcd did not become healthy: {e}\n{}", self.log()));
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// PID of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILLs the server (data dir kept).
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    /// Starts the server again on the same ports and data dir.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A gRPC channel to this etcd.
    pub async fn channel(&self) -> Channel {
        channel(&self.url).await
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sum of every sample of metric `name` in a Prometheus text exposition.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (head, val) = l.rsplit_once(' ')?;
            let metric = head.split('{').next()?;
            (metric == name).then(|| val.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// A metric of the etcd on `port` (sum of all samples); 0 when etcd does not answer.
pub fn etcd_metric(port: u16, name: &str) -> f64 {
    let text = http_get(port, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default();
    metric_value(&text, name)
}

fn etcd_bin() -> PathBuf {
    std::env::var_os("ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

/// The etcd-fanout binary under test. Cargo builds it for every integration test of the root
/// package and names it in `CARGO_BIN_EXE_etcd-fanout` when it runs them; older cargos set
/// that variable only at compile time, so the fallback is where cargo puts it: the profile
/// directory above the test executable's `deps/`.
fn proxy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CARGO_BIN_EXE_etcd-fanout") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current test executable");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable inside target/<profile>/deps");
    profile_dir.join(format!("etcd-fanout{}", std::env::consts::EXE_SUFFIX))
}

/// One etcd-fanout process.
pub struct Proxy {
    /// The child process (killed on drop).
    child: Option<Child>,
    /// Client URL, e.g. `http://127.0.0.1:23790`.
    pub url: String,
    /// Listen port.
    pub port: u16,
    /// Log file directory.
    dir: tempfile::TempDir,
    /// Arguments used (kept for restarts).
    args: Vec<String>,
}

impl Proxy {
    /// Starts etcd-fanout in front of `endpoints` caching `prefixes`, waits until ready.
    pub fn start(endpoints: &str, prefixes: &[&str]) -> Proxy {
        Self::start_with(endpoints, prefixes, &[])
    }

    /// Like [`Proxy::start`] with extra flags.
    pub fn start_with(endpoints: &str, prefixes: &[&str], extra: &[&str]) -> Proxy {
        Self::start_on(free_port(), endpoints, prefixes, extra)
    }

    /// Like [`Proxy::start_with`] on a given port (for flags that name the proxy's own URL,
    /// such as `--advertise-client-url`).
    pub fn start_on(port: u16, endpoints: &str, prefixes: &[&str], extra: &[&str]) -> Proxy {
        let mut args = vec![
            "--endpoints".to_string(),
            endpoints.to_string(),
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
        ];
        for p in prefixes {
            args.push("--prefix".into());
            args.push(p.to_string());
        }
        // TLS mode: the harness's certificates, unless the caller gives its own.
        let given = |flag: &str| extra.iter().any(|a| a.starts_with(flag));
        if tls::enabled() {
            if endpoints.starts_with("https://")
                && !given("--cacert")
                && !given("--insecure-skip-tls-verify")
            {
                args.extend(tls::proxy_upstream_flags());
            }
            if !given("--cert-file") {
                args.extend(tls::proxy_listen_flags());
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        if given("--cert-file") {
            tls::mark_tls_port(port);
        }
        let mut p = Proxy {
            child: None,
            url: if tls::is_tls_port(port) {
                format!("https://127.0.0.1:{port}")
            } else {
                tls::url(port)
            },
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            args,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(proxy_bin());
        cmd.args(&self.args).env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        self.child = Some(spawn_logged(
            &mut cmd,
            &self.dir.path().join("proxy.log"),
            "start etcd-fanout",
        ));
        wait_http_ok(self.port, "/readyz", Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("proxy did not become ready: {e}\n{}", self.log()));
    }

    /// The proxy's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    /// PID of the running proxy.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILLs the proxy.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    /// Restarts the proxy on the same port with the same flags.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A gRPC channel to the proxy.
    pub async fn channel(&self) -> Channel {
        channel(&self.url).await
    }

    /// The proxy's own Prometheus metrics.
    pub fn metrics(&self) -> String {
        http_get(self.port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Connects a tonic channel to `url` (over TLS with the CN-less client certificate for
/// `https://` URLs).
pub async fn channel(url: &str) -> Channel {
    let mut ep = Channel::from_shared(url.to_string()).expect("url");
    if url.starts_with("https://") {
        ep = ep
            .tls_config(tls::tonic_tls(&tls::certs().client))
            .expect("tls config");
    }
    ep.connect().await.expect("connect")
}

/// KV, Watch and Lease clients on one channel.
pub struct Clients {
    pub kv: KvClient<Channel>,
    pub watch: WatchClient<Channel>,
    pub lease: LeaseClient<Channel>,
}

impl Clients {
    pub async fn connect(url: &str) -> Clients {
        let ch = channel(url).await;
        Clients {
            kv: KvClient::new(ch.clone()).max_decoding_message_size(usize::MAX),
            watch: WatchClient::new(ch.clone()).max_decoding_message_size(usize::MAX),
            lease: LeaseClient::new(ch),
        }
    }
}

/// Opens a Watch stream on `client` whose first request creates a watch of `[key,
/// range_end)`. Returns the sender of further requests (the stream's request side ends when
/// it is dropped) and the server's answer to the call.
pub async fn open_watch(
    client: &mut WatchClient<Channel>,
    key: &str,
    range_end: &str,
) -> (
    tokio::sync::mpsc::Sender<etcd_fanout::proto::etcdserverpb::WatchRequest>,
    Result<tonic::Streaming<etcd_fanout::proto::etcdserverpb::WatchResponse>, tonic::Status>,
) {
    use etcd_fanout::proto::etcdserverpb::{
        watch_request::RequestUnion, WatchCreateRequest, WatchRequest,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.to_string().into(),
            range_end: range_end.to_string().into(),
            ..Default::default()
        })),
    })
    .await
    .expect("send");
    let answer = client
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(|r| r.into_inner());
    (tx, answer)
}

/// Puts `key = value` at `url` without a token; returns the write's revision.
pub async fn put(url: &str, key: &str, value: &str) -> i64 {
    auth::put_as(url, None, key, value).await
}

/// Puts `key = value` (any bytes) with `kv`, a client kept across puts; returns the write's
/// revision.
pub async fn put_value(kv: &mut KvClient<Channel>, key: String, value: &Bytes) -> i64 {
    kv.put(etcd_fanout::proto::etcdserverpb::PutRequest {
        key: key.into_bytes().into(),
        value: value.clone(),
        ..Default::default()
    })
    .await
    .expect("put")
    .into_inner()
    .header
    .map_or(0, |h| h.revision)
}

/// A two-worker tokio runtime, for tests that run blocking waits next to async clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Polls `GET path` until it answers 200 or `timeout` passes.
pub fn wait_http_ok(port: u16, path: &str, timeout: Duration) -> Result<(), String> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < timeout {
        match http_get(port, path) {
            Ok((200, _)) => return Ok(()),
            Ok((s, b)) => last = format!("{s} {b}"),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("GET {path} on port {port}: {last}"))
}

/// The range end that selects every key starting with `prefix` (etcd's `GetPrefixRangeEnd`):
/// [`etcd_fanout::keys::prefix_end`], or `"\0"` (every key) when `prefix` has no end.
pub fn range_end(prefix: impl AsRef<[u8]>) -> Bytes {
    etcd_fanout::keys::prefix_end(prefix.as_ref()).unwrap_or_else(|| Bytes::from_static(b"\0"))
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

pub mod apisix;
pub mod auth;
pub mod checker;
pub mod cluster;
pub mod diff;
pub mod fault;
pub mod gateway;
pub mod http;
pub mod tls;
pub mod watchers;

/// A temporary directory for an etcd member's data and log. On tmpfs (`/dev/shm`) when the
/// machine has one, so that etcd's fsyncs do not wait behind the disk traffic of parallel
/// builds: tests measure the proxy, not the disk. `ETCD_FANOUT_TEST_DATA_ON_DISK=1` keeps
/// the data on the default temp dir.
pub fn etcd_data_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if std::env::var_os("ETCD_FANOUT_TEST_DATA_ON_DISK").is_none() && shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new()
            .prefix("etcd-fanout-test")
            .tempdir_in(shm)
        {
            return dir;
        }
    }
    tempfile::tempdir().expect("tempdir")
}

/// Starts `cmd` with stdin closed and stdout and stderr appended to the log file at `log`.
fn spawn_logged(cmd: &mut Command, log: &std::path::Path, what: &str) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("server log");
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect(what)
}

/// SIGKILLs and reaps a server process, if it runs.
fn kill_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}
