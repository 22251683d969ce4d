//! A multi-member etcd cluster on loopback for the fault tests: every member on its own free
//! client and peer ports with its own data directory, killed (SIGKILL) and restarted one at a
//! time; the leader found through Maintenance Status.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use etcd_fanout::proto::etcdserverpb::{maintenance_client::MaintenanceClient, StatusRequest};

use crate::{free_port, http_get};

/// One member process.
pub struct Member {
    /// Member name (`m0`, `m1`, ...).
    pub name: String,
    /// Client URL.
    pub url: String,
    /// Client port.
    pub port: u16,
    /// Peer port.
    pub peer_port: u16,
    /// Data directory and log (removed on drop).
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Member {
    /// True while the process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The member's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }
}

/// A cluster of etcd members on loopback.
pub struct Cluster {
    /// The members, in start order.
    pub members: Vec<Member>,
    initial_cluster: String,
    token: String,
}

impl Cluster {
    /// Starts an `n`-member cluster and waits until every member reports healthy (a leader).
    pub fn start(n: usize) -> Cluster {
        let mut members = Vec::new();
        for i in 0..n {
            let port = free_port();
            let peer_port = free_port();
            members.push(Member {
                name: format!("m{i}"),
                url: super::tls::url(port),
                port,
                peer_port,
                dir: crate::etcd_data_dir(),
                child: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("fanout-test-{}", members[0].port);
        let mut c = Cluster {
            members,
            initial_cluster,
            token,
        };
        for i in 0..n {
            c.spawn(i);
        }
        for i in 0..n {
            c.wait_healthy(i, Duration::from_secs(30));
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let data = m.dir.path().join("data");
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new(etcd_bin());
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &m.url])
            .args(["--advertise-client-urls", &m.url])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            // Quick elections on loopback; well above the loopback round trip.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(if super::tls::enabled() {
                super::tls::etcd_flags()
            } else {
                Vec::new()
            })
            .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH);
        let child = crate::spawn_logged(
            &mut cmd,
            &m.dir.path().join("etcd.log"),
            "start etcd (is etcd-server installed?)",
        );
        self.members[i].child = Some(child);
    }

    /// Waits until member `i` answers `/health` with `true` (it has a leader).
    pub fn wait_healthy(&self, i: usize, timeout: Duration) {
        let m = &self.members[i];
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < timeout {
            match http_get(m.port, "/health") {
                Ok((200, body)) if body.contains("true") => return,
                Ok((s, body)) => last = format!("{s} {body}"),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "member {} not healthy after {timeout:?}: {last}\n{}",
            m.name,
            m.log()
        );
    }

    /// Comma-separated client URLs of every member.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Client URLs of the members running now.
    pub fn running_urls(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.is_running())
            .map(|m| m.url.clone())
            .collect()
    }

    /// SIGKILLs member `i` (data kept).
    pub fn kill(&mut self, i: usize) {
        crate::kill_child(&mut self.members[i].child);
    }

    /// Starts member `i` again from its data directory and waits until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_healthy(i, Duration::from_secs(30));
    }

    /// Index of the current leader, asked of the running members (Maintenance Status: a
    /// member whose `leader` equals its own `member_id` leads). Retries for up to `timeout`
    /// (an election may be in progress).
    pub async fn leader(&self, timeout: Duration) -> Option<usize> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            for (i, m) in self.members.iter().enumerate() {
                if !m.is_running() {
                    continue;
                }
                let Ok(ep) = tonic::transport::Endpoint::from_shared(m.url.clone()) else {
                    continue;
                };
                let Ok(Ok(ch)) = tokio::time::timeout(
                    Duration::from_secs(1),
                    ep.connect_timeout(Duration::from_secs(1)).connect(),
                )
                .await
                else {
                    continue;
                };
                let mut mc = MaintenanceClient::new(ch);
                let Ok(Ok(resp)) =
                    tokio::time::timeout(Duration::from_secs(1), mc.status(StatusRequest {})).await
                else {
                    continue;
                };
                let s = resp.into_inner();
                let me = s.header.map_or(0, |h| h.member_id);
                if me != 0 && s.leader == me {
                    return Some(i);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

fn etcd_bin() -> PathBuf {
    std::env::var_os("ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}
