//! Fan-out demo: many watchers on one prefix through etcd-fanout, checked event by event.
//!
//! Opens `--watchers` Watch streams on `--prefix` through the proxy (spread over
//! `--connections` gRPC connections), writes `--writes` keys through the proxy, and checks
//! that every watcher received every write exactly once, in revision order. With `--etcd`,
//! it also reads etcd's own `/metrics` to show how many watchers etcd itself is serving.
//!
//! ```text
//! cargo run --release --example fanout_demo -- \
//!     --proxy http://127.0.0.1:23790 --etcd http://127.0.0.1:2379 --watchers 200 --writes 20
//! ```
//!
//! Pointing `--proxy` at etcd itself runs the same clients without the proxy, for comparison.
//! Exits non-zero on any error, missing, duplicated, out-of-order or unexpected event.

use std::collections::{HashMap, HashSet};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use etcd_fanout::proto::etcdserverpb::{
    kv_client::KvClient, watch_client::WatchClient, watch_request, PutRequest, RangeRequest,
    WatchCreateRequest, WatchRequest,
};
use etcd_fanout::proto::mvccpb::event::EventType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(about = "Many watchers through etcd-fanout, checked event by event")]
struct Args {
    /// gRPC URL of the proxy (or of etcd itself, for comparison).
    #[arg(long, default_value = "http://127.0.0.1:23790")]
    proxy: String,
    /// etcd client URL; when given, etcd's /metrics is read to count etcd's own watchers.
    #[arg(long)]
    etcd: Option<String>,
    /// Number of concurrent watchers (one Watch stream each).
    #[arg(long, default_value_t = 200)]
    watchers: usize,
    /// Number of keys written through the proxy while the watchers are open.
    #[arg(long, default_value_t = 20)]
    writes: usize,
    /// Number of gRPC connections the watchers are spread over.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// The watched prefix (must be one the proxy caches).
    #[arg(long, default_value = "/apisix/")]
    prefix: String,
    /// Fail if etcd reports more watchers than this while the demo's watchers are open.
    #[arg(long)]
    max_upstream_watchers: Option<f64>,
    /// Time limit in seconds for creating the watchers, writing, and receiving all events.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

/// What one watcher saw: (key, mod_revision) of each PUT event, in arrival order.
#[derive(Default)]
struct Seen {
    events: Vec<(Bytes, i64)>,
    /// Events on the demo's keys that are not PUTs (the demo only writes).
    unexpected: usize,
    /// Events on other keys under the prefix (someone else's writes; reported, not an error).
    other: usize,
    /// Revisions that did not increase strictly along the stream.
    out_of_order: usize,
    /// Protocol-level problems (cancel, compaction, stream error).
    errors: Vec<String>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("fanout_demo: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The end of the range of all keys starting with `prefix` (etcd's `--prefix`):
/// [`etcd_fanout::keys::prefix_end`], or `\0`, every key, when it has none.
fn prefix_end(prefix: &[u8]) -> Bytes {
    etcd_fanout::keys::prefix_end(prefix).unwrap_or_else(|| Bytes::from_static(&[0]))
}

async fn connect(url: &str) -> Result<Channel, BoxError> {
    let ch = Channel::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect {url}: {e}"))?;
    Ok(ch)
}

/// A plain HTTP/1.0 GET on an `http://host:port` base URL; returns the body.
async fn http_get(base: &str, path: &str) -> Result<String, BoxError> {
    let hostport = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("only http:// URLs are supported: {base}"))?
        .trim_end_matches('/');
    let mut s = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(hostport),
    )
    .await
    .map_err(|_| format!("connect {hostport}: timed out"))??;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {hostport}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .map_err(|_| format!("GET {base}{path}: timed out"))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET {base}{path}: malformed response"))?;
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("GET {base}{path}: status {status:?}").into());
    }
    Ok(body.to_string())
}

/// Sum of every sample of metric `name` in a Prometheus text exposition (None if absent).
fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((head, val)) = line.rsplit_once(' ') else {
            continue;
        };
        if head.split('{').next() == Some(name) {
            if let Ok(v) = val.parse::<f64>() {
                *found.get_or_insert(0.0) += v;
            }
        }
    }
    found
}

/// etcd's count of its own watchers (and watch streams), from its /metrics.
async fn etcd_watchers(etcd: &str) -> Result<(f64, f64), BoxError> {
    let text = http_get(etcd, "/metrics").await?;
    let watchers = metric(&text, "etcd_debugging_mvcc_watcher_total")
        .ok_or("etcd /metrics has no etcd_debugging_mvcc_watcher_total")?;
    let streams = metric(&text, "etcd_debugging_mvcc_watch_stream_total").unwrap_or(f64::NAN);
    Ok((watchers, streams))
}

/// One watcher: opens a Watch stream on the prefix, reports creation, records events until
/// `stop` flips to true.
async fn watcher(
    ch: Channel,
    prefix: Bytes,
    ours: Bytes,
    created: Arc<AtomicUsize>,
    progress: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) -> Seen {
    let mut seen = Seen::default();
    let (tx, rx) = mpsc::channel(1);
    let create = WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                range_end: prefix_end(&prefix),
                key: prefix,
                ..Default::default()
            },
        )),
    };
    // `tx` stays alive for the whole loop so the client never half-closes its stream.
    if tx.send(create).await.is_err() {
        seen.errors.push("request channel closed".into());
        return seen;
    }
    let mut client = WatchClient::new(ch);
    let mut stream = tokio::select! {
        r = client.watch(ReceiverStream::new(rx)) => match r {
            Ok(resp) => resp.into_inner(),
            Err(status) => {
                seen.errors.push(format!("watch: {status}"));
                return seen;
            }
        },
        _ = stop.changed() => {
            seen.errors.push("watch stream not opened in time".into());
            return seen;
        }
    };
    let mut is_created = false;
    let mut last_rev = 0i64;
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = stop.changed() => break,
        };
        let resp = match msg {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                seen.errors.push("watch stream ended by the server".into());
                break;
            }
            Err(status) => {
                seen.errors.push(format!("watch stream error: {status}"));
                break;
            }
        };
        if resp.created && !is_created {
            is_created = true;
            created.fetch_add(1, Ordering::SeqCst);
        }
        if resp.canceled {
            seen.errors.push(format!(
                "watch canceled (compact_revision={}, reason={:?})",
                resp.compact_revision, resp.cancel_reason
            ));
            break;
        }
        for ev in resp.events {
            let Some(kv) = ev.kv else {
                seen.errors.push("event without kv".into());
                continue;
            };
            if kv.mod_revision <= last_rev {
                seen.out_of_order += 1;
            }
            last_rev = last_rev.max(kv.mod_revision);
            if !kv.key.starts_with(&ours) {
                // Someone else's write under the prefix: fine, but not counted.
                seen.other += 1;
            } else if ev.r#type == EventType::Put as i32 {
                seen.events.push((kv.key, kv.mod_revision));
                progress.fetch_add(1, Ordering::SeqCst);
            } else {
                seen.unexpected += 1;
            }
        }
    }
    if !is_created {
        seen.errors.push("no created response".into());
    }
    drop(tx);
    seen
}

async fn run(args: Args) -> Result<bool, BoxError> {
    if args.watchers == 0 || args.connections == 0 {
        return Err("--watchers and --connections must be at least 1".into());
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    // Pointing --proxy at etcd itself runs the same clients without the proxy.
    let via = if args.etcd.as_deref() == Some(args.proxy.as_str()) {
        "etcd directly"
    } else {
        "the proxy"
    };
    let run_id = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let prefix = Bytes::from(args.prefix.clone().into_bytes());
    let ours = Bytes::from(format!("{}demo/{run_id}/", args.prefix).into_bytes());
    println!(
        "fanout_demo: {} watchers on {} over {} gRPC connection(s) to {}; {} writes under {}",
        args.watchers,
        args.prefix,
        args.connections,
        args.proxy,
        args.writes,
        String::from_utf8_lossy(&ours)
    );

    let before = match &args.etcd {
        Some(e) => Some(etcd_watchers(e).await?),
        None => None,
    };

    // Open every watcher and wait until each one has its `created` response.
    let mut channels = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        channels.push(connect(&args.proxy).await?);
    }
    let created = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(args.watchers);
    for i in 0..args.watchers {
        tasks.push(tokio::spawn(watcher(
            channels[i % channels.len()].clone(),
            prefix.clone(),
            ours.clone(),
            created.clone(),
            progress.clone(),
            stop_rx.clone(),
        )));
    }
    while created.load(Ordering::SeqCst) < args.watchers {
        if Instant::now() > deadline {
            let _ = stop_tx.send(true);
            return Err(format!(
                "only {} of {} watchers were created before the timeout",
                created.load(Ordering::SeqCst),
                args.watchers
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "  {} watchers created in {:.2?}",
        args.watchers,
        t0.elapsed()
    );

    // etcd's view while all of the demo's watchers are open.
    let during = match &args.etcd {
        Some(e) => Some(etcd_watchers(e).await?),
        None => None,
    };

    // Write through the proxy; remember the revision of each write.
    let mut kv = KvClient::new(channels[0].clone());
    let mut expected: Vec<(Bytes, i64)> = Vec::with_capacity(args.writes);
    let t1 = Instant::now();
    for i in 0..args.writes {
        if Instant::now() > deadline {
            let _ = stop_tx.send(true);
            return Err(
                format!("only {i} of {} writes done before the timeout", args.writes).into(),
            );
        }
        let key =
            Bytes::from(format!("{}route-{i:05}", String::from_utf8_lossy(&ours)).into_bytes());
        let value = Bytes::from(format!("{{\"id\":\"{i}\",\"uri\":\"/demo/{i}\"}}").into_bytes());
        let resp = kv
            .put(PutRequest {
                key: key.clone(),
                value,
                ..Default::default()
            })
            .await
            .map_err(|s| format!("put via {via}: {s}"))?
            .into_inner();
        let rev = resp.header.ok_or("put response without header")?.revision;
        expected.push((key, rev));
    }
    let revs: Vec<i64> = expected.iter().map(|(_, r)| *r).collect();
    if revs.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!("write revisions are not increasing: {revs:?}").into());
    }
    println!(
        "  {} writes via {via} in {:.2?} (revisions {}..={})",
        args.writes,
        t1.elapsed(),
        revs.first().copied().unwrap_or(0),
        revs.last().copied().unwrap_or(0)
    );

    // Wait until every watcher has seen every write (or the deadline), then a short grace
    // period so that late duplicates would be caught too.
    let total = args.watchers * args.writes;
    while progress.load(Ordering::SeqCst) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let delivered_in = t1.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(true);

    let mut seen_all = Vec::with_capacity(tasks.len());
    for t in tasks {
        seen_all.push(t.await?);
    }

    // Check every watcher against the expected writes.
    let want: HashMap<&Bytes, i64> = expected.iter().map(|(k, r)| (k, *r)).collect();
    let (mut delivered, mut missing, mut duplicated) = (0usize, 0usize, 0usize);
    let (mut out_of_order, mut unexpected, mut wrong_rev) = (0usize, 0usize, 0usize);
    let mut errors: Vec<String> = Vec::new();
    let mut bad_watchers = 0usize;
    let other: usize = seen_all.iter().map(|s| s.other).sum();
    for (i, s) in seen_all.iter().enumerate() {
        let mut distinct: HashSet<&Bytes> = HashSet::new();
        let (mut dup, mut wrong) = (0usize, 0usize);
        for (k, rev) in &s.events {
            if !distinct.insert(k) {
                dup += 1;
            }
            match want.get(k) {
                Some(r) if r == rev => {}
                _ => wrong += 1,
            }
        }
        let miss = expected
            .iter()
            .filter(|(k, _)| !distinct.contains(k))
            .count();
        delivered += s.events.len();
        missing += miss;
        duplicated += dup;
        wrong_rev += wrong;
        out_of_order += s.out_of_order;
        unexpected += s.unexpected;
        if miss + dup + wrong + s.out_of_order + s.unexpected > 0 || !s.errors.is_empty() {
            bad_watchers += 1;
            if errors.len() < 10 {
                errors.push(format!(
                    "watcher {i}: {} events, {miss} missing, {dup} duplicated, {wrong} wrong \
                     revision, {} out of order, {} unexpected; {}",
                    s.events.len(),
                    s.out_of_order,
                    s.unexpected,
                    s.errors.join("; ")
                ));
            }
        }
    }
    println!(
        "  {} of {} events delivered in {:.2?}",
        delivered, total, delivered_in
    );
    if other > 0 {
        println!("  (plus {other} events on other keys under the prefix, not counted)");
    }

    // The proxy also serves reads: the demo's keys must be there.
    let range = kv
        .range(RangeRequest {
            range_end: prefix_end(&ours),
            key: ours.clone(),
            count_only: true,
            ..Default::default()
        })
        .await
        .map_err(|s| format!("range via {via}: {s}"))?
        .into_inner();
    println!(
        "  range via {via}: {} keys under the demo prefix",
        range.count
    );
    if range.count != args.writes as i64 {
        errors.push(format!(
            "range via {via} counted {} keys, expected {}",
            range.count, args.writes
        ));
    }

    let mut upstream = String::from("an unknown number of etcd watchers (no --etcd given)");
    if let (Some((wb, sb)), Some((wd, sd))) = (before, during) {
        println!(
            "  etcd's own metrics: etcd_debugging_mvcc_watcher_total {wb} before, {wd} with \
             the demo's watchers open (watch streams: {sb} before, {sd} during)"
        );
        upstream = format!("{wd} etcd watcher{}", if wd == 1.0 { "" } else { "s" });
        if wb > 0.0 && wd != wb {
            upstream.push_str(&format!(" ({wb} of them open before the demo)"));
        }
        if let Some(max) = args.max_upstream_watchers {
            if wd > max {
                errors.push(format!(
                    "etcd serves {wd} watchers, more than --max-upstream-watchers {max}"
                ));
            }
        }
    }

    println!(
        "{} watchers served by {upstream}; {delivered} events delivered, {missing} missing, \
         {duplicated} duplicated, {out_of_order} out of order, {unexpected} unexpected, \
         {wrong_rev} with a wrong revision",
        args.watchers
    );
    let ok = errors.is_empty()
        && bad_watchers == 0
        && missing == 0
        && duplicated == 0
        && out_of_order == 0
        && unexpected == 0
        && wrong_rev == 0
        && delivered == total;
    if !ok {
        eprintln!("fanout_demo: FAILED ({bad_watchers} watcher(s) with problems)");
        for e in &errors {
            eprintln!("  {e}");
        }
    } else {
        println!("fanout_demo: OK");
    }
    Ok(ok)
}
