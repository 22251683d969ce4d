//! Child processes (etcd, etcd grpc-proxy, etcd-fanout), free loopback ports, the
//! file-descriptor limit and per-phase CPU / RSS accounting from `/proc`.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::http1::{self, BoxError};

/// `n` distinct free TCP ports on 127.0.0.1 (all held open until every one is chosen).
pub fn free_ports(n: usize) -> Result<Vec<u16>, BoxError> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(TcpListener::bind("127.0.0.1:0")?);
    }
    Ok(held
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()).unwrap_or(0))
        .collect())
}

/// Raises RLIMIT_NOFILE as far as allowed (children inherit it); returns the soft limit.
// `rlim_t` is not u64 everywhere.
#[allow(clippy::unnecessary_cast)]
pub fn raise_nofile() -> u64 {
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(1 << 20);
        let want = nr_open.min(1 << 20);
        let bigger = libc::rlimit {
            rlim_cur: want as libc::rlim_t,
            rlim_max: want.max(lim.rlim_max as u64) as libc::rlim_t,
        };
        if want > lim.rlim_cur as u64 && libc::setrlimit(libc::RLIMIT_NOFILE, &bigger) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur as u64
    }
}

/// A child process, stopped (TERM, then KILL) when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc, BoxError> {
        let out = File::create(log)?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} ({cmd:?}): {e}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> Result<(), BoxError> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Err(format!(
                "{} exited ({st}); last log lines:\n{}",
                self.name,
                tail(&self.log, 15)
            )
            .into());
        }
        Ok(())
    }

    /// TERM, up to 5 s, then KILL; reaps the child.
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: signalling our own child by PID.
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Polls `GET url` until it answers 200 (bounded by `secs`), checking the process is alive.
pub async fn wait_http_ok(
    proc_: &mut Proc,
    addr: SocketAddr,
    path: &str,
    secs: u64,
) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = String::new();
    while Instant::now() < deadline {
        proc_.check_alive()?;
        match http1::request(addr, "GET", path, b"", Duration::from_secs(2)).await {
            Ok((200, _)) => return Ok(()),
            Ok((s, _)) => last = format!("status {s}"),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "{}: GET {}{path} not 200 within {secs}s ({last}); last log lines:\n{}",
        proc_.name,
        crate::tls::url(addr),
        tail(&proc_.log, 15)
    )
    .into())
}

/// Sets ETCD_UNSUPPORTED_ARCH where etcd needs it (anything but amd64).
pub fn etcd_env(cmd: &mut Command) {
    let goarch = match std::env::consts::ARCH {
        "x86_64" => return,
        "aarch64" => "arm64",
        "arm" => "arm",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    if std::env::var_os("ETCD_UNSUPPORTED_ARCH").is_none() {
        cmd.env("ETCD_UNSUPPORTED_ARCH", goarch);
    }
}

/// Resident set size of `pid`, bytes.
pub fn rss_bytes(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// user + system CPU time of `pid`, seconds.
pub fn cpu_seconds(pid: i32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted from 1, are utime and stime; `rest` starts at 3.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((utime + stime) as f64 / hz)
}

const MIB: f64 = 1024.0 * 1024.0;

/// Samples the RSS of a set of processes every 50 ms and keeps each one's peak per phase.
pub struct Sampler {
    pub names: Vec<String>,
    pids: Vec<i32>,
    peaks: Arc<Vec<AtomicU64>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Where a phase started.
pub struct Mark {
    cpu: Vec<f64>,
    rss: Vec<u64>,
    at: Instant,
}

/// One process over one phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcPhase {
    pub name: String,
    pub cpu_s: f64,
    pub peak_rss_mb: f64,
    /// RSS when the phase started and when it ended.
    pub start_rss_mb: f64,
    pub end_rss_mb: f64,
}

/// Every process over one phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseUsage {
    pub seconds: f64,
    pub procs: Vec<ProcPhase>,
}

impl PhaseUsage {
    pub fn get(&self, name: &str) -> Option<&ProcPhase> {
        self.procs.iter().find(|p| p.name == name)
    }

    /// CPU seconds of `name` as a table cell ("-" when it did not run).
    pub fn cpu_cell(&self, name: &str) -> String {
        self.get(name)
            .map_or("-".into(), |u| format!("{:.1}", u.cpu_s))
    }
}

impl Sampler {
    pub fn start(procs: Vec<(String, i32)>) -> Sampler {
        let (names, pids): (Vec<String>, Vec<i32>) = procs.into_iter().unzip();
        let peaks: Arc<Vec<AtomicU64>> = Arc::new(pids.iter().map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let (p2, s2, pids2) = (peaks.clone(), stop.clone(), pids.clone());
        let thread = std::thread::spawn(move || {
            // Bounded: at most 24 h of samples.
            for _ in 0..(24 * 3600 * 20) {
                if s2.load(Ordering::Relaxed) {
                    break;
                }
                for (i, pid) in pids2.iter().enumerate() {
                    if let Some(r) = rss_bytes(*pid) {
                        p2[i].fetch_max(r, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Sampler {
            names,
            pids,
            peaks,
            stop,
            thread: Some(thread),
        }
    }

    /// Starts a phase: CPU baseline, peaks reset to the current RSS.
    pub fn mark(&self) -> Mark {
        let rss: Vec<u64> = self
            .pids
            .iter()
            .map(|p| rss_bytes(*p).unwrap_or(0))
            .collect();
        for (i, r) in rss.iter().enumerate() {
            self.peaks[i].store(*r, Ordering::Relaxed);
        }
        Mark {
            rss,
            cpu: self
                .pids
                .iter()
                .map(|p| cpu_seconds(*p).unwrap_or(0.0))
                .collect(),
            at: Instant::now(),
        }
    }

    /// The current RSS of `name` in MB.
    pub fn rss_mb(&self, name: &str) -> Option<f64> {
        let i = self.names.iter().position(|n| n == name)?;
        rss_bytes(self.pids[i]).map(|r| r as f64 / MIB)
    }

    /// Ends a phase begun at `m`.
    pub fn usage(&self, m: &Mark) -> PhaseUsage {
        let procs = self
            .pids
            .iter()
            .enumerate()
            .map(|(i, pid)| {
                let rss = rss_bytes(*pid).unwrap_or(0);
                let peak = self.peaks[i].load(Ordering::Relaxed).max(rss);
                ProcPhase {
                    name: self.names[i].clone(),
                    cpu_s: cpu_seconds(*pid).unwrap_or(0.0) - m.cpu[i],
                    peak_rss_mb: peak as f64 / MIB,
                    start_rss_mb: m.rss[i] as f64 / MIB,
                    end_rss_mb: rss as f64 / MIB,
                }
            })
            .collect();
        PhaseUsage {
            seconds: m.at.elapsed().as_secs_f64(),
            procs,
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
