//! The differential environment: a reference etcd and a target (etcd-fanout in front of a
//! second fresh etcd, or a plain etcd in self-check mode), a scenario run on both concurrently
//! under a backstop timeout, and the transcripts compared.

use std::fmt::Debug;
use std::future::Future;

use etcd_fanout::proto::etcdserverpb::{kv_client::KvClient, watch_client::WatchClient};
use tonic::transport::Channel;

use crate::{Etcd, Proxy};

use super::compare::assert_same;
use super::transcript::Rec;
use super::watch::WatchConn;
use super::{selfcheck, SCENARIO_TIMEOUT};

/// Options of a differential environment.
#[derive(Clone)]
pub struct Opts {
    /// Prefixes the proxy caches.
    pub prefixes: Vec<String>,
    /// Extra proxy flags.
    pub proxy_args: Vec<String>,
    /// Extra etcd flags (both etcds).
    pub etcd_args: Vec<String>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            prefixes: vec!["/apisix/".into()],
            proxy_args: vec![],
            etcd_args: vec![],
        }
    }
}

impl Opts {
    pub fn proxy_args(mut self, a: &[&str]) -> Self {
        self.proxy_args.extend(a.iter().map(|s| s.to_string()));
        self
    }
    pub fn prefixes(mut self, p: &[&str]) -> Self {
        self.prefixes = p.iter().map(|s| s.to_string()).collect();
        self
    }
}

/// One side of a differential run.
#[derive(Clone, Debug)]
pub struct Side {
    /// "reference" or "target".
    pub name: &'static str,
    /// Where the scenario sends its requests.
    pub url: String,
    /// The etcd behind `url` (equal to `url` for the reference), for direct writes.
    pub etcd_url: String,
    /// Client port of that etcd (for /metrics).
    pub etcd_port: u16,
}

impl Side {
    pub async fn kv(&self) -> KvClient<Channel> {
        KvClient::new(crate::channel(&self.url).await).max_decoding_message_size(usize::MAX)
    }
    pub async fn watch_client(&self) -> WatchClient<Channel> {
        WatchClient::new(crate::channel(&self.url).await).max_decoding_message_size(usize::MAX)
    }
    /// KV client straight to the backing etcd.
    pub async fn etcd_kv(&self) -> KvClient<Channel> {
        KvClient::new(crate::channel(&self.etcd_url).await).max_decoding_message_size(usize::MAX)
    }
    pub async fn clients(&self) -> crate::Clients {
        crate::Clients::connect(&self.url).await
    }
    /// A new watch stream on a new connection.
    pub async fn watch(&self) -> WatchConn {
        WatchConn::open(&mut self.watch_client().await)
    }
}

fn panic_text(e: tokio::task::JoinError) -> String {
    if e.is_panic() {
        let p = e.into_panic();
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    } else {
        e.to_string()
    }
}

/// Starts an etcd, retrying (up to 3 attempts) when its free port was taken by another process
/// in the meantime (`free_port` binds then releases; other suites run concurrently).
pub async fn start_etcd(args: &[String]) -> Etcd {
    let mut last = String::new();
    for _ in 0..3 {
        let a = args.to_vec();
        match tokio::task::spawn_blocking(move || {
            Etcd::start_with(&a.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        {
            Ok(e) => return e,
            Err(e) => {
                last = panic_text(e);
                eprintln!(
                    "etcd start failed, retrying: {}",
                    last.lines().next().unwrap_or("")
                );
            }
        }
    }
    panic!("etcd did not start in 3 attempts: {last}");
}

/// Starts etcd-fanout; retries only when its listen port was taken meanwhile.
pub async fn start_proxy(etcd_url: &str, prefixes: &[String], extra: &[String]) -> Proxy {
    let mut last = String::new();
    for _ in 0..3 {
        let (u, p, x) = (etcd_url.to_string(), prefixes.to_vec(), extra.to_vec());
        match tokio::task::spawn_blocking(move || {
            let p: Vec<&str> = p.iter().map(String::as_str).collect();
            let x: Vec<&str> = x.iter().map(String::as_str).collect();
            Proxy::start_with(&u, &p, &x)
        })
        .await
        {
            Ok(p) => return p,
            Err(e) => {
                last = panic_text(e);
                if !last.to_lowercase().contains("in use") {
                    break;
                }
                eprintln!("proxy port taken, retrying");
            }
        }
    }
    panic!("proxy did not start: {last}");
}

/// Two-tier mode (`ETCD_FANOUT_TEST_TIERS=2`): the target proxy's upstream is another
/// etcd-fanout replica (the upper tier) in front of the second etcd, so every differential
/// suite runs through two tiers.
pub fn two_tiers() -> bool {
    std::env::var("ETCD_FANOUT_TEST_TIERS").is_ok_and(|v| v.trim() == "2")
}

/// Two fresh etcds and, unless in self-check mode, a proxy in front of the second (in
/// two-tier mode, a proxy in front of a proxy in front of the second).
pub struct Env {
    pub a: Etcd,
    pub b: Etcd,
    /// The upper replica in two-tier mode.
    pub upper: Option<Proxy>,
    pub proxy: Option<Proxy>,
}

impl Env {
    pub async fn start(opts: Opts) -> Env {
        let (a, b) = tokio::join!(start_etcd(&opts.etcd_args), start_etcd(&opts.etcd_args));
        let upper = if !selfcheck() && two_tiers() {
            Some(start_proxy(&b.url, &opts.prefixes, &opts.proxy_args).await)
        } else {
            None
        };
        let upstream = upper.as_ref().map_or(b.url.clone(), |u| u.url.clone());
        let proxy = if selfcheck() {
            None
        } else {
            Some(start_proxy(&upstream, &opts.prefixes, &opts.proxy_args).await)
        };
        eprintln!(
            "differential env: reference etcd {} | target {}",
            a.url,
            match &proxy {
                Some(p) => format!("etcd-fanout {} -> {upstream} -> etcd {}", p.url, b.url),
                None => format!("plain etcd {} (self-check)", b.url),
            }
        );
        Env { a, b, upper, proxy }
    }

    pub fn reference(&self) -> Side {
        Side {
            name: "reference",
            url: self.a.url.clone(),
            etcd_url: self.a.url.clone(),
            etcd_port: self.a.port,
        }
    }

    pub fn target(&self) -> Side {
        Side {
            name: "target",
            url: self
                .proxy
                .as_ref()
                .map(|p| p.url.clone())
                .unwrap_or_else(|| self.b.url.clone()),
            etcd_url: self.b.url.clone(),
            etcd_port: self.b.port,
        }
    }

    pub fn target_log(&self) -> String {
        let upper = self
            .upper
            .as_ref()
            .map(|u| format!("--- upper tier ---\n{}\n--- lower tier ---\n", u.log()))
            .unwrap_or_default();
        upper + &self.proxy.as_ref().map(|p| p.log()).unwrap_or_default()
    }
}

/// Runs `f` on one side with a backstop timeout; records panics/timeouts in the transcript.
pub async fn run_side<F, Fut>(side: Side, f: F) -> Vec<String>
where
    F: FnOnce(Side, Rec) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let rec = Rec::new();
    let h = tokio::spawn(f(side, rec.clone()));
    match tokio::time::timeout(SCENARIO_TIMEOUT, h).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let msg = if e.is_panic() {
                let p = e.into_panic();
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            } else {
                e.to_string()
            };
            rec.note(format!("SCENARIO PANICKED: {msg}"));
        }
        Err(_) => rec.note(format!("SCENARIO TIMED OUT after {SCENARIO_TIMEOUT:?}")),
    }
    rec.lines()
}

/// Runs `scenario` on the reference and the target concurrently, compares the transcripts
/// (panicking with a diff on mismatch) and returns the reference transcript for extra
/// sanity assertions.
pub async fn differential<F, Fut>(name: &str, opts: Opts, scenario: F) -> Rec
where
    F: Fn(Side, Rec) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let env = Env::start(opts).await;
    let (r, t) = tokio::join!(
        run_side(env.reference(), scenario.clone()),
        run_side(env.target(), scenario)
    );
    assert_same(name, &r, &t, &env.target_log());
    let rec = Rec::new();
    for l in r {
        rec.note(l);
    }
    rec
}
