//! Fault injection for the fault tests: a TCP relay on loopback between the proxy and etcd
//! that the test controls, plus process helpers (find the proxy's PID, read its RSS, send it a
//! signal) that do not need anything from the `Proxy` handle beyond its port.
//!
//! The relay runs on its own thread and tokio runtime, so a test runtime that is busy (or
//! blocked in a harness call) never delays the faults it injects. Faults:
//! - [`Relay::stall`]: stop forwarding bytes in both directions on every connection, old and
//!   new, without closing anything (the peer's TCP buffers fill; no FIN, no RST, no pings
//!   answered). [`Relay::stall_existing`] stalls only the connections open now, for good,
//!   while new connections pass: only a client that detects the dead connection recovers.
//! - [`Relay::drop_all`]: close every open connection (FIN).
//! - [`Relay::reset_all`]: reset every open connection (RST, via `SO_LINGER 0`).
//! - [`Relay::refuse`]: close the listening socket, so new connections are refused.
//! - [`Relay::pass`]: back to forwarding everything (and listening again).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

/// What the relay does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward bytes both ways.
    Pass,
    /// Forward nothing on any connection (new ones are accepted, then stalled too).
    Stall,
    /// Refuse new connections (listener closed); open ones keep forwarding.
    Refuse,
}

#[derive(Debug, Clone, Copy)]
struct Ctl {
    mode: Mode,
    /// Bumped by `drop_all`: connections born before close with FIN.
    drop_epoch: u64,
    /// Bumped by `reset_all`: connections born before close with RST.
    reset_epoch: u64,
    /// Connections with an id below this are stalled (`stall_existing`).
    stall_below: u64,
}

impl Ctl {
    fn stalled(&self, id: u64) -> bool {
        self.mode == Mode::Stall || id < self.stall_below
    }
}

/// Counters of a relay.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Connections accepted so far.
    pub accepted: AtomicU64,
    /// Connections currently open.
    pub open: AtomicU64,
    /// Bytes forwarded client -> target.
    pub up_bytes: AtomicU64,
    /// Bytes forwarded target -> client.
    pub down_bytes: AtomicU64,
}

/// A controllable TCP relay `127.0.0.1:port` -> `target`.
pub struct Relay {
    /// Listening port.
    pub port: u16,
    /// `http://127.0.0.1:port`, to give the proxy as its etcd endpoint.
    pub url: String,
    ctl: watch::Sender<Ctl>,
    next_id: Arc<AtomicU64>,
    /// Counters.
    pub stats: Arc<RelayStats>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay on a free loopback port forwarding to `127.0.0.1:target_port`.
    pub fn start(target_port: u16) -> Relay {
        let target: SocketAddr = ([127, 0, 0, 1], target_port).into();
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("relay bind");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let port = std_listener.local_addr().expect("addr").port();
        let (ctl, ctl_rx) = watch::channel(Ctl {
            mode: Mode::Pass,
            drop_epoch: 0,
            reset_epoch: 0,
            stall_below: 0,
        });
        let stats = Arc::new(RelayStats::default());
        let next_id = Arc::new(AtomicU64::new(0));
        let (stop, stop_rx) = oneshot::channel();
        let (s2, n2) = (stats.clone(), next_id.clone());
        let thread = std::thread::Builder::new()
            .name(format!("relay-{port}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("relay runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("listener");
                    tokio::select! {
                        _ = accept_loop(listener, port, target, ctl_rx, s2, n2) => {}
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime drops every connection task and its sockets.
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .expect("relay thread");
        Relay {
            port,
            url: super::tls::url(port),
            ctl,
            next_id,
            stats,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Forward everything again (and accept new connections).
    pub fn pass(&self) {
        self.ctl.send_modify(|c| {
            c.mode = Mode::Pass;
            c.stall_below = 0;
        });
    }

    /// Stop forwarding bytes on every connection, including new ones; nothing is closed.
    pub fn stall(&self) {
        self.ctl.send_modify(|c| c.mode = Mode::Stall);
    }

    /// Stall the connections open now until [`Relay::pass`]; new connections forward.
    pub fn stall_existing(&self) {
        let below = self.next_id.load(Ordering::SeqCst);
        self.ctl.send_modify(|c| c.stall_below = below);
    }

    /// Refuse new connections (the listening socket is closed until [`Relay::pass`]).
    pub fn refuse(&self) {
        self.ctl.send_modify(|c| c.mode = Mode::Refuse);
    }

    /// Close every open connection with FIN.
    pub fn drop_all(&self) {
        self.ctl.send_modify(|c| c.drop_epoch += 1);
    }

    /// Reset every open connection (RST).
    pub fn reset_all(&self) {
        self.ctl.send_modify(|c| c.reset_epoch += 1);
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.ctl.borrow().mode
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.stats.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.stats.open.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    port: u16,
    target: SocketAddr,
    mut ctl: watch::Receiver<Ctl>,
    stats: Arc<RelayStats>,
    next_id: Arc<AtomicU64>,
) {
    let mut listener = Some(listener);
    loop {
        if ctl.borrow_and_update().mode == Mode::Refuse {
            listener = None;
            if ctl.wait_for(|c| c.mode != Mode::Refuse).await.is_err() {
                return;
            }
            continue;
        }
        let l = match &listener {
            Some(l) => l,
            None => {
                // Listen again on the same port (tokio sets SO_REUSEADDR).
                match TcpListener::bind(("127.0.0.1", port)).await {
                    Ok(l) => listener = Some(l),
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
                continue;
            }
        };
        let accepted = tokio::select! {
            r = l.accept() => r,
            r = ctl.changed() => { if r.is_err() { return } continue }
        };
        let Ok((client, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let id = next_id.fetch_add(1, Ordering::SeqCst);
        stats.accepted.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(connection(client, target, id, ctl.clone(), stats.clone()));
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kill {
    Drop,
    Reset,
}

async fn connection(
    mut client: TcpStream,
    target: SocketAddr,
    id: u64,
    mut ctl: watch::Receiver<Ctl>,
    stats: Arc<RelayStats>,
) {
    let born = *ctl.borrow_and_update();
    let Ok(mut server) = TcpStream::connect(target).await else {
        // Target down: the client sees its connection reset, as if etcd refused it.
        reset_on_drop(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    stats.open.fetch_add(1, Ordering::SeqCst);
    let kill = {
        let (cr, cw) = client.split();
        let (sr, sw) = server.split();
        let up = pump(cr, sw, id, ctl.clone(), &stats.up_bytes);
        let down = pump(sr, cw, id, ctl.clone(), &stats.down_bytes);
        let killed = async {
            let c = ctl
                .wait_for(|c| c.drop_epoch > born.drop_epoch || c.reset_epoch > born.reset_epoch)
                .await
                .map(|c| *c);
            match c {
                Ok(c) if c.reset_epoch > born.reset_epoch => Kill::Reset,
                _ => Kill::Drop,
            }
        };
        tokio::select! {
            _ = async { tokio::join!(up, down) } => None,
            k = killed => Some(k),
        }
    };
    if kill == Some(Kill::Reset) {
        reset_on_drop(&client);
        reset_on_drop(&server);
    }
    drop(client);
    drop(server);
    stats.open.fetch_sub(1, Ordering::SeqCst);
}

/// `SO_LINGER 0`: closing the socket sends RST at once (tokio deprecates `set_linger` because
/// a non-zero linger blocks on drop; a zero linger never does).
#[allow(deprecated)]
fn reset_on_drop(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}

/// Copies `r` to `w` while the connection is not stalled; half-closes `w` at EOF.
async fn pump(
    mut r: tokio::net::tcp::ReadHalf<'_>,
    mut w: tokio::net::tcp::WriteHalf<'_>,
    id: u64,
    mut ctl: watch::Receiver<Ctl>,
    bytes: &AtomicU64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if ctl.wait_for(|c| !c.stalled(id)).await.is_err() {
            return;
        }
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = w.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        // A stall that began during the read holds these bytes back too.
        if ctl.wait_for(|c| !c.stalled(id)).await.is_err() {
            return;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
        bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// Process helpers (Linux /proc).

/// PID of the etcd-fanout process started with `--listen 127.0.0.1:<port>` (found in /proc,
/// so the harness's `Proxy` needs no accessor). Zombies (exited, not yet reaped) are skipped.
pub fn proxy_pid(port: u16) -> Option<u32> {
    let listen = format!("127.0.0.1:{port}");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_proxy = args.first().is_some_and(|a| a.ends_with(b"etcd-fanout"));
        let listens = args
            .windows(2)
            .any(|w| w[0] == b"--listen" && w[1] == listen.as_bytes());
        if is_proxy && listens && is_alive(pid) {
            return Some(pid);
        }
    }
    None
}

/// The `--listen` port of the running etcd-fanout process whose `--endpoints` is exactly
/// `endpoints` (for a proxy that is still starting, before `Proxy::start` returns).
pub fn proxy_port_for_endpoint(endpoints: &str) -> Option<u16> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if !args.first().is_some_and(|a| a.ends_with(b"etcd-fanout")) || !is_alive(pid) {
            continue;
        }
        let arg = |name: &[u8]| {
            args.windows(2)
                .find(|w| w[0] == name)
                .map(|w| String::from_utf8_lossy(w[1]).to_string())
        };
        if arg(b"--endpoints").as_deref() == Some(endpoints) {
            return arg(b"--listen")?.rsplit(':').next()?.parse().ok();
        }
    }
    None
}

/// True while `pid` exists and has not exited (a zombie counts as exited).
pub fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3, after the parenthesised command name, is the state.
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Resident set size of `pid` in KiB (`VmRSS` in /proc/PID/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Sends signal `sig` (e.g. `"TERM"`) to `pid` with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -{sig} {pid} failed");
}
