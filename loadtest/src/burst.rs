//! Create bursts (`--create-burst N`, issue 15 item 2): N watch creates written at once on
//! one gRPC stream, each on a key of its own, every `created` read; how long until all are
//! created and what it costs etcd and the proxy. With `--auth` the stream carries a token.
//!
//! The creates are queued before the call starts, so tonic writes them as fast as HTTP/2
//! flow control lets it (a client that sends everything at once and reads as it goes).

use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_fanout::proto::etcdserverpb::{
    watch_client::WatchClient, watch_request::RequestUnion, WatchCreateRequest, WatchRequest,
};
use serde::Serialize;

use crate::http1::BoxError;
use crate::procs::{PhaseUsage, Sampler};
use crate::{auth, work, Args, Target};

/// One target's burst.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BurstResult {
    pub target: String,
    pub auth: bool,
    pub creates: usize,
    /// `created` answers, and among them refusals (`canceled` too).
    pub created: usize,
    pub canceled: usize,
    /// Seconds from the call to the last `created`, when every create was answered.
    pub seconds: Option<f64>,
    /// Seconds until half of them were answered.
    pub half_s: Option<f64>,
    pub error: Option<String>,
    pub usage: PhaseUsage,
}

/// Runs the burst against every target of `a`.
pub async fn run(a: &Args, n: usize) -> Vec<BurstResult> {
    let mut out = Vec::new();
    for t in &a.targets {
        eprintln!("loadgen: ===== create burst, target {} =====", t.name());
        let r = match run_target(a, *t, n).await {
            Ok(r) => r,
            Err(e) => BurstResult {
                target: t.name().into(),
                error: Some(e.to_string()),
                ..Default::default()
            },
        };
        eprintln!(
            "loadgen: {}: {} of {n} created ({} canceled) in {:?} s; error {:?}",
            r.target, r.created, r.canceled, r.seconds, r.error
        );
        out.push(r);
    }
    out
}

async fn run_target(a: &Args, t: Target, n: usize) -> Result<BurstResult, BoxError> {
    if !matches!(t, Target::Etcd | Target::GrpcProxy | Target::Fanout) {
        return Err("--create-burst runs against etcd, grpc-proxy and fanout only".into());
    }
    let dir = tempfile::Builder::new()
        .prefix(&format!("loadgen-burst-{}-", t.name()))
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())?;
    let (mut etcd, etcd_addr) = crate::start_etcd(a, dir.path()).await?;
    auth::disable();
    if a.auth {
        auth::enable(&format!("http://{etcd_addr}"), &a.prefix_base).await?;
    }
    let (mut proxy, addr) = crate::start_proxy(a, t, etcd_addr, dir.path()).await?;
    let mut watched = vec![("etcd".to_string(), etcd.pid())];
    if let Some(p) = &proxy {
        watched.push(("proxy".to_string(), p.pid()));
    }
    watched.push(("loadgen".to_string(), std::process::id() as i32));
    let sampler = Sampler::start(watched);
    let prefix = crate::layout(a).channels[0].clone();
    let reqs: Vec<WatchRequest> = (0..n)
        .map(|i| WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: Bytes::from([prefix.as_ref(), format!("b{i:07}").as_bytes()].concat()),
                ..Default::default()
            })),
        })
        .collect();
    let mut r = BurstResult {
        target: t.name().into(),
        auth: a.auth,
        creates: n,
        ..Default::default()
    };
    let ch = work::connect(&format!("http://{addr}")).await?;
    let mark = sampler.mark();
    let t0 = Instant::now();
    let limit = Duration::from_secs(a.create_timeout);
    let res = async {
        let reqs =
            tokio_stream::StreamExt::chain(tokio_stream::iter(reqs), tokio_stream::pending());
        let mut stream = WatchClient::new(ch)
            .watch(auth::as_reader(reqs))
            .await?
            .into_inner();
        while r.created < n {
            let Some(resp) = stream.message().await? else {
                return Err::<(), BoxError>("the watch stream ended".into());
            };
            if resp.created {
                r.created += 1;
                if resp.canceled {
                    r.canceled += 1;
                }
                if r.created == n / 2 {
                    r.half_s = Some(t0.elapsed().as_secs_f64());
                }
            }
        }
        Ok(())
    };
    match tokio::time::timeout(limit, res).await {
        Ok(Ok(())) => r.seconds = Some(t0.elapsed().as_secs_f64()),
        Ok(Err(e)) => r.error = Some(e.to_string()),
        Err(_) => r.error = Some(format!("not every create answered within {limit:?}")),
    }
    r.usage = sampler.usage(&mark);
    for p in proxy.iter_mut().chain(std::iter::once(&mut etcd)) {
        if let Err(e) = p.check_alive() {
            r.error.get_or_insert(e.to_string());
        }
    }
    drop(sampler);
    if let Some(p) = proxy.as_mut() {
        p.stop();
    }
    etcd.stop();
    Ok(r)
}

/// The markdown table of the bursts.
pub fn render(a: &Args, results: &[BurstResult]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let n = results.first().map_or(0, |r| r.creates);
    crate::report::table_head(
        &mut s,
        &format!(
            "Create burst: {n} watch creates written at once on one gRPC stream{}",
            if a.auth { ", with a token" } else { "" }
        ),
        &a.note,
        &[
            "target",
            "created (refused)",
            "half answered s",
            "all answered s",
            "creates/s",
            "etcd CPU s",
            "proxy CPU s",
            "loadgen CPU s",
            "etcd peak RSS MB",
            "proxy peak RSS MB",
            "error",
        ],
    );
    for r in results {
        let cpu = |who: &str| r.usage.cpu_cell(who);
        let rss = |who: &str| {
            r.usage
                .get(who)
                .map_or("-".into(), |u| format!("{:.0}", u.peak_rss_mb))
        };
        let _ = writeln!(
            s,
            "| {} | {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.target,
            r.created,
            r.canceled,
            r.half_s.map_or("-".into(), |v| format!("{v:.2}")),
            r.seconds.map_or("-".into(), |v| format!("{v:.2}")),
            r.seconds
                .map_or("-".into(), |v| format!("{:.0}", r.creates as f64 / v)),
            cpu("etcd"),
            cpu("proxy"),
            cpu("loadgen"),
            rss("etcd"),
            rss("proxy"),
            r.error.as_deref().unwrap_or("").replace('\n', " "),
        );
    }
    s
}
