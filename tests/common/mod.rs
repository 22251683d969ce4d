//! Test harness: real etcd processes and real etcd-fanout processes on free loopback ports.
//!
//! Every process is started with its own temporary data directory and killed by PID when its
//! handle drops, so a failing test never leaves a server behind.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_fanout::proto::etcdserverpb::{
    kv_client::KvClient, lease_client::LeaseClient, watch_client::WatchClient,
};
use tonic::transport::Channel;

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
        let dir = tempfile::tempdir().expect("tempdir");
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
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("etcd log");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(etcd_bin())
            .arg("--name")
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
            .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd (is etcd-server installed?)");
        self.child = Some(child);
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
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
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

    /// etcd's Prometheus metrics text (served on the client port).
    pub fn metrics(&self) -> String {
        http_get(self.port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// Sum of the values of a metric family in [`Etcd::metrics`].
    pub fn metric(&self, name: &str) -> f64 {
        metric_value(&self.metrics(), name)
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

fn etcd_bin() -> PathBuf {
    std::env::var_os("ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
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
        let port = free_port();
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
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("proxy.log"))
            .expect("proxy log");
        let child = Command::new(env!("CARGO_BIN_EXE_etcd-fanout"))
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd-fanout");
        self.child = Some(child);
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
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
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

/// A blocking HTTP/1.1 GET on loopback: (status, body). Small and dependency-free.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    http_request(port, "GET", path, None)
}

/// A blocking HTTP/1.1 request on loopback without Content-Type (as APISIX sends it).
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    let mut s = tls::connect(port).map_err(|e| e.to_string())?;
    s.tcp().set_read_timeout(Some(Duration::from_secs(10))).ok();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad response: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
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
pub mod checker;
pub mod cluster;
pub mod diff;
pub mod fault;
pub mod tls;
pub mod watchers;
