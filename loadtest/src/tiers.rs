//! Several etcd-fanout replicas as one target (issue 13): `fanout-x3` is three replicas in
//! front of etcd, `fanout-two-tier` one upper replica in front of etcd and three lower
//! replicas in front of it (`--endpoints` is the upper one). Clients reach the (lower)
//! replicas through a round-robin TCP balancer, one backend per accepted connection, as
//! through a Kubernetes Service, so the workload's connections spread over them.
//!
//! Kept apart from `main.rs` (the single-process targets), which only asks [`start`] for the
//! target's address and the replica it samples (the first lower one: the figures in the
//! "proxy" rows are one replica's).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::http1::BoxError;
use crate::procs::{self, Proc};

/// Lower replicas of both shapes.
const REPLICAS: usize = 3;

/// The replicas of a multi-replica target and the balancer in front of them; everything is
/// stopped when dropped.
pub struct Tier {
    /// The replicas not handed to the caller (the other lower ones, the upper one).
    pub procs: Vec<Proc>,
    /// The balancer (its connection tasks are owned by it and end with it).
    balancer: JoinHandle<()>,
}

impl Drop for Tier {
    fn drop(&mut self) {
        self.balancer.abort();
        for p in &mut self.procs {
            p.stop();
        }
    }
}

/// Starts one etcd-fanout replica with `endpoints` as its upstream and `args` (prefixes and
/// extra flags); returns it once `/readyz` answers 200.
async fn replica(
    bin: &Path,
    name: &str,
    endpoints: &str,
    args: &[String],
    dir: &Path,
) -> Result<(Proc, SocketAddr), BoxError> {
    let port = procs::free_ports(1)?[0];
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let mut cmd = Command::new(bin);
    cmd.args(["--endpoints", endpoints, "--listen", &listen.to_string()])
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        );
    let mut p = Proc::spawn(name, cmd, &dir.join(format!("{name}.log")))?;
    procs::wait_http_ok(&mut p, listen, "/readyz", 60).await?;
    Ok((p, listen))
}

/// Starts the target: three replicas in front of `etcd` (`two_tier`: in front of one upper
/// replica in front of `etcd`) and the balancer. Returns the replica to sample, the rest, and
/// the address clients use.
pub async fn start(
    bin: &Path,
    args: &[String],
    etcd: SocketAddr,
    two_tier: bool,
    dir: &Path,
) -> Result<(Proc, Tier, SocketAddr), BoxError> {
    let mut others = Vec::new();
    let mut upstream = format!("http://{etcd}");
    if two_tier {
        let (upper, addr) = replica(bin, "etcd-fanout-upper", &upstream, args, dir).await?;
        upstream = format!("http://{addr}");
        others.push(upper);
    }
    let mut lower = Vec::new();
    let mut backends = Vec::new();
    for i in 0..REPLICAS {
        let (p, addr) = replica(bin, &format!("etcd-fanout-{i}"), &upstream, args, dir).await?;
        lower.push(p);
        backends.push(addr);
    }
    let sampled = lower.remove(0);
    others.extend(lower);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let balancer = tokio::spawn(balance(listener, backends));
    Ok((
        sampled,
        Tier {
            procs: others,
            balancer,
        },
        addr,
    ))
}

/// Accepts connections and pipes each to the next backend in turn until either side closes.
async fn balance(listener: TcpListener, backends: Vec<SocketAddr>) {
    let mut conns = JoinSet::new();
    let mut next = 0usize;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((mut client, _)) = accepted else { continue };
                let backend = backends[next % backends.len()];
                next += 1;
                conns.spawn(async move {
                    let _ = client.set_nodelay(true);
                    if let Ok(mut server) = TcpStream::connect(backend).await {
                        let _ = server.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}
