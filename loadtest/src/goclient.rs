//! The Go watcher (`loadtest/go/gowatch`, etcd's own clientv3) as loadgen's gRPC client
//! (`--go-client`): built once per loadgen run into a temporary directory with
//! `loadtest/go/build.sh` (or taken from `--go-bin`), started for each target, told to
//! start and stop over its stdin; its progress lines feed the run's counters in [`Shared`]
//! (so loadgen's phases, drain and timeouts work as with its own client), and its final
//! line brings every watcher's exactly-once / in-order result and the latency histogram.
//! With `--go-raw` gowatch runs its raw mode (etcd's generated Watch stubs, no clientv3).
//!
//! Why a Go program: the proxy's cost depends on how the client drives HTTP/2 (window
//! updates, pings, read sizes), and grpc-go drives it differently from tonic; measuring
//! with the client most etcd users run is the honest figure.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::task::JoinHandle;

use crate::http1::BoxError;
use crate::work::{Shared, LIVE};

/// The Go sources and their build script.
const GO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/go");

/// A gowatch binary: built here (and removed with its temporary directory) or given.
pub struct GoBinary {
    pub path: PathBuf,
    /// The temporary directory of a binary built here.
    _dir: Option<tempfile::TempDir>,
}

/// Builds gowatch with `loadtest/go/build.sh` unless `given` names a binary.
pub fn build(given: Option<&Path>) -> Result<GoBinary, BoxError> {
    if let Some(p) = given {
        return Ok(GoBinary {
            path: p.to_path_buf(),
            _dir: None,
        });
    }
    let dir = tempfile::Builder::new().prefix("loadgen-go-").tempdir()?;
    let path = dir.path().join("gowatch");
    eprintln!("loadgen: building the Go watcher (GOPATH mode, Debian's golang-etcd-server-dev)");
    let status = std::process::Command::new("bash")
        .arg(Path::new(GO_DIR).join("build.sh"))
        .arg(&path)
        .status()
        .map_err(|e| format!("cannot run loadtest/go/build.sh: {e}"))?;
    if !status.success() {
        return Err(format!(
            "loadtest/go/build.sh failed ({status}): apt-get install -y golang-go golang-etcd-server-dev"
        )
        .into());
    }
    Ok(GoBinary {
        path,
        _dir: Some(dir),
    })
}

/// A list gowatch may write as `null` (a nil Go slice; older builds did for an empty
/// histogram) read as empty.
fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// One watcher's result as gowatch reports it.
#[derive(Debug, Deserialize)]
pub struct GoWatcher {
    pub created: bool,
    pub expected: u64,
    pub missing: u64,
    pub dup: u64,
    pub ooo: u64,
    pub bad: u64,
    pub head_down: u64,
}

/// gowatch's last line.
#[derive(Debug, Deserialize)]
pub struct GoFinal {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub watchers: Vec<GoWatcher>,
    /// Latency histogram as (bucket of `stats::Hist`, count), µs.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub hist: Vec<(usize, u64)>,
    pub max: u64,
    pub sum: u64,
    pub errors: u64,
    #[serde(default)]
    pub samples: Option<Vec<String>>,
    /// Latency histogram at grpc-go's receipt of each WatchResponse (before clientv3's
    /// dispatch to the watchers' goroutines), same buckets, µs; empty in raw mode.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub recv_hist: Vec<(usize, u64)>,
    #[serde(default)]
    pub recv_max: u64,
    #[serde(default)]
    pub recv_sum: u64,
    /// The Go runtime's GOMAXPROCS.
    #[serde(default)]
    pub gomaxprocs: usize,
}

#[derive(Deserialize)]
struct Progress {
    created: usize,
    fresh: u64,
    errors: u64,
}

/// A running gowatch process.
pub struct GoClient {
    child: Child,
    stdin: ChildStdin,
    /// Reads stdout: progress into [`Shared`], then the final line.
    reader: JoinHandle<Option<GoFinal>>,
}

impl GoClient {
    /// Starts gowatch against `endpoint` (it connects once told to [`GoClient::start`]).
    pub fn spawn(
        bin: &Path,
        endpoint: &str,
        conns: usize,
        watchers: usize,
        raw: bool,
        sh: Arc<Shared>,
        log: &Path,
    ) -> Result<GoClient, BoxError> {
        let prefixes: Vec<String> = sh
            .prefixes
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        let mut cmd = Command::new(bin);
        if raw {
            cmd.arg("-raw");
        }
        let mut child = cmd
            .arg(format!("-endpoint={endpoint}"))
            .arg(format!("-conns={conns}"))
            .arg(format!("-watchers={watchers}"))
            .arg(format!("-prefixes={}", prefixes.join(",")))
            .arg(format!("-t0={}", sh.t0_unix_ns()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let stdin = child.stdin.take().ok_or("gowatch: no stdin")?;
        let stdout = child.stdout.take().ok_or("gowatch: no stdout")?;
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            // Bounded by the process: its stdout ends when it exits.
            while let Ok(Some(line)) = lines.next_line().await {
                if line.starts_with("{\"final\"") {
                    return match serde_json::from_str::<GoFinal>(&line) {
                        Ok(f) => Some(f),
                        Err(e) => {
                            sh.error(format!("gowatch final line: {e}"));
                            None
                        }
                    };
                }
                match serde_json::from_str::<Progress>(&line) {
                    Ok(p) => {
                        sh.created.store(p.created, Ordering::Relaxed);
                        // gowatch's watchers only see live writes (no history).
                        sh.fresh.store(p.fresh, Ordering::Relaxed);
                        sh.fresh_live[LIVE].store(p.fresh, Ordering::Relaxed);
                        sh.errors.fetch_max(p.errors, Ordering::Relaxed);
                    }
                    Err(e) => sh.note(format!("gowatch: unreadable line ({e}): {line}")),
                }
            }
            None
        });
        Ok(GoClient {
            child,
            stdin,
            reader,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id().map_or(0, |p| p as i32)
    }

    /// Connects the clients and creates the watchers.
    pub async fn start(&mut self) -> Result<(), BoxError> {
        self.stdin.write_all(b"start\n").await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// Stops the watchers; `written` is the number of writes per prefix. Returns the final
    /// results (`None` when gowatch did not give them within `limit`).
    pub async fn stop(mut self, written: &[u64], limit: Duration) -> Option<GoFinal> {
        let line = format!(
            "stop {}\n",
            written
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        );
        if self.stdin.write_all(line.as_bytes()).await.is_err() {
            return None;
        }
        let _ = self.stdin.flush().await;
        let out = match tokio::time::timeout(limit, &mut self.reader).await {
            Ok(Ok(f)) => f,
            _ => None,
        };
        // It exits after its final line; if not, it is ended (by its own pid, through its
        // handle).
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::GoFinal;

    #[test]
    fn final_line_reads_null_lists_as_empty() {
        let line = r#"{"final":true,"watchers":[{"p":0,"created":false,"expected":0,"missing":0,"dup":0,"ooo":0,"bad":0,"head_down":0}],"hist":null,"max":0,"sum":0,"errors":2,"samples":null,"recv_hist":null,"recv_max":0,"recv_sum":0,"gomaxprocs":2}"#;
        let f: GoFinal = serde_json::from_str(line).unwrap();
        assert_eq!(f.watchers.len(), 1);
        assert!(!f.watchers[0].created);
        assert!(f.hist.is_empty() && f.recv_hist.is_empty());
        assert_eq!(f.errors, 2);
        assert_eq!(f.gomaxprocs, 2);
        let f: GoFinal = serde_json::from_str(
            r#"{"final":true,"watchers":null,"hist":[[5,3]],"max":5,"sum":15,"errors":0}"#,
        )
        .unwrap();
        assert!(f.watchers.is_empty());
        assert_eq!(f.hist, vec![(5, 3)]);
    }
}
