//! The slow-reader workload (`--slow-readers`, issue 15 item 1): does a client that never
//! reads cost the other clients anything?
//!
//! Per target, in one session (one etcd, one proxy), two rounds of the same measured work:
//! first without, then with `--slow-http` HTTP/JSON watches and `--slow-grpc` gRPC watches
//! whose sockets are never read (connection open, watch created, not one byte read back).
//! The measured work: a writer putting `--slow-puts` values of `--value-size` bytes straight
//! to etcd at `--rate`, a well-behaved gRPC watcher and (where there is a gateway) a
//! well-behaved HTTP/JSON watcher on the written prefix, whose event latency (send time in
//! the value to receipt) is recorded, and a linearizable get of a written key every 250 ms
//! over gRPC and over HTTP/JSON. The rounds' CPU and RSS of etcd and the proxy are sampled;
//! the proxy's RSS growth is its peak in the second round over its RSS when that round began,
//! split into (a) opening the non-readers (idle connections, before any put) and (b) the puts
//! with them open. Each victim's latency is kept per put, so the report can say which puts
//! were slow (the first, copied into thousands of fresh sockets, or spread over the round).
//!
//! `--slow-rounds N` runs N (without, with) pairs alternating in the same session, so one
//! noisy round on a shared machine does not decide: the report gives every pair's ratio and
//! their median.
//!
//! The gRPC non-readers speak HTTP/2 by hand over a raw socket (preface, an empty SETTINGS,
//! so the default 64 KiB windows, then HEADERS and one DATA frame carrying the create) and
//! then never read: no SETTINGS ack, no window update, no PING answer, as a peer whose
//! process is stuck. The HTTP ones write `POST /v3/watch` and never read.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::{Bytes, BytesMut};
use etcd_fanout::proto::etcdserverpb::{
    kv_client::KvClient, watch_client::WatchClient, watch_request::RequestUnion, PutRequest,
    RangeRequest, WatchCreateRequest, WatchRequest,
};
use prost::Message;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::http1::{self, BoxError};
use crate::procs::{PhaseUsage, Sampler};
use crate::stats::{metric, Hist, LatencySummary};
use crate::work::{self, decode_value, encode_value, prefix_end};
use crate::{auth, Args, Target};

/// One round: the measured work, with or without the non-readers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Round {
    /// Which (without, with) pair of `--slow-rounds` the round belongs to (from 0).
    pub pair: usize,
    pub with_slow: bool,
    /// Non-reading HTTP/JSON watch requests and gRPC watches open during the round.
    pub slow_http: usize,
    pub slow_grpc: usize,
    /// Seconds to open the non-readers, and the target's watcher gauge then
    /// (`etcd_debugging_mvcc_watcher_total` for etcd, `etcd_fanout_watchers` for the proxy).
    pub slow_setup_s: f64,
    pub watchers_gauge: Option<f64>,
    pub puts: u64,
    pub grpc_victim: LatencySummary,
    pub grpc_victim_missing: u64,
    pub http_victim: Option<LatencySummary>,
    pub http_victim_missing: u64,
    /// Each victim's latency per put (index = the put's sequence number in the round), ms;
    /// `None` for a put it never saw.
    pub grpc_victim_ms_by_put: Vec<Option<f64>>,
    pub http_victim_ms_by_put: Vec<Option<f64>>,
    /// The proxy's RSS (MB) when the round began and once the non-readers were open (before
    /// any put; `None` without them): (a) the idle connections' growth is the difference, (b)
    /// the puts' growth with them open is the round's peak over it.
    pub proxy_rss_start_mb: Option<f64>,
    pub proxy_rss_connected_mb: Option<f64>,
    pub grpc_gets: LatencySummary,
    pub http_gets: Option<LatencySummary>,
    /// Gets (both kinds) that took over a second, and that failed.
    pub gets_over_1s: u64,
    pub get_errors: u64,
    pub errors: Vec<String>,
    pub usage: PhaseUsage,
}

/// One target's two rounds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SlowResult {
    pub target: String,
    pub rounds: Vec<Round>,
    pub failure: Option<String>,
}

fn now_ns() -> u64 {
    static T0: OnceLock<Instant> = OnceLock::new();
    T0.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn errors_push(errors: &Mutex<Vec<String>>, e: impl Into<String>) {
    let mut v = errors.lock().unwrap();
    if v.len() < 10 {
        v.push(e.into());
    }
}

/// Runs the slow-reader workload against every target of `a`.
pub async fn run(a: &Args) -> Vec<SlowResult> {
    let mut out = Vec::new();
    for t in &a.targets {
        eprintln!("loadgen: ===== slow readers, target {} =====", t.name());
        let r = match run_target(a, *t).await {
            Ok(r) => r,
            Err(e) => SlowResult {
                target: t.name().into(),
                failure: Some(e.to_string()),
                ..Default::default()
            },
        };
        if let Some(f) = &r.failure {
            eprintln!("loadgen: {} FAILED: {f}", t.name());
        }
        out.push(r);
    }
    out
}

async fn run_target(a: &Args, t: Target) -> Result<SlowResult, BoxError> {
    if !matches!(t, Target::Etcd | Target::GrpcProxy | Target::Fanout) {
        return Err("--slow-readers runs against etcd, grpc-proxy and fanout only".into());
    }
    let dir = tempfile::Builder::new()
        .prefix(&format!("loadgen-slow-{}-", t.name()))
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())?;
    let (mut etcd, etcd_addr) = crate::start_etcd(a, dir.path()).await?;
    auth::disable();
    let (mut proxy, addr) = crate::start_proxy(a, t, etcd_addr, dir.path()).await?;
    let mut watched = vec![("etcd".to_string(), etcd.pid())];
    if let Some(p) = &proxy {
        watched.push(("proxy".to_string(), p.pid()));
    }
    watched.push(("loadgen".to_string(), std::process::id() as i32));
    let sampler = Sampler::start(watched);
    let prefix = crate::layout(a).channels[0].clone();
    let gateway = t != Target::GrpcProxy;
    let mut res = SlowResult {
        target: t.name().into(),
        ..Default::default()
    };
    'pairs: for pair in 0..a.slow_rounds.max(1) {
        for with_slow in [false, true] {
            let site = Site {
                a,
                t,
                etcd_addr,
                addr,
                prefix: &prefix,
                gateway,
                sampler: &sampler,
            };
            let r = round(site, with_slow).await;
            match r {
                Ok(mut r) => {
                    r.pair = pair;
                    res.rounds.push(r)
                }
                Err(e) => {
                    res.failure = Some(e.to_string());
                    break 'pairs;
                }
            }
            for p in proxy.iter_mut().chain(std::iter::once(&mut etcd)) {
                if let Err(e) = p.check_alive() {
                    res.failure.get_or_insert(e.to_string());
                }
            }
            if res.failure.is_some() {
                break 'pairs;
            }
        }
    }
    drop(sampler);
    if let Some(p) = proxy.as_mut() {
        p.stop();
    }
    etcd.stop();
    if a.keep {
        eprintln!("loadgen: kept {}", dir.keep().display());
    }
    Ok(res)
}

/// What every round of one target runs against.
#[derive(Clone, Copy)]
struct Site<'s> {
    /// The command line.
    a: &'s Args,
    /// The target.
    t: Target,
    /// etcd's address (the writes go there directly).
    etcd_addr: SocketAddr,
    /// The target's address (etcd's itself for `etcd`).
    addr: SocketAddr,
    /// The watched prefix.
    prefix: &'s Bytes,
    /// The target has the HTTP/JSON gateway (all but grpc-proxy).
    gateway: bool,
    /// The RSS and CPU sampler of the processes.
    sampler: &'s Sampler,
}

async fn round(site: Site<'_>, with_slow: bool) -> Result<Round, BoxError> {
    let Site {
        a,
        t,
        etcd_addr,
        addr,
        prefix,
        gateway,
        sampler,
    } = site;
    let mark = sampler.mark();
    let mut r = Round {
        with_slow,
        proxy_rss_start_mb: sampler.rss_mb("proxy"),
        ..Default::default()
    };
    let errors = Arc::new(Mutex::new(Vec::new()));

    let mut held: Vec<TcpStream> = Vec::new();
    if with_slow && a.slow_warm_puts == 0 {
        held = open_nonreaders(site, &mut r, &errors).await?;
    }

    // ---- the victims ----------------------------------------------------------------------
    let url = format!("http://{addr}");
    let (stop_tx, stop_rx) = watch::channel(false);
    let puts = a.slow_puts;
    let created = Arc::new(AtomicU64::new(0));
    let grpc_hist = Arc::new(Mutex::new(Hist::default()));
    let grpc_by_put = Arc::new(Mutex::new(vec![None; puts as usize]));
    let grpc_seen = Arc::new(AtomicU64::new(0));
    let grpc_victim = tokio::spawn(grpc_victim(
        url.clone(),
        prefix.clone(),
        (grpc_hist.clone(), grpc_by_put.clone()),
        grpc_seen.clone(),
        created.clone(),
        stop_rx.clone(),
        errors.clone(),
    ));
    let http_hist = Arc::new(Mutex::new(Hist::default()));
    let http_by_put = Arc::new(Mutex::new(vec![None; puts as usize]));
    let http_seen = Arc::new(AtomicU64::new(0));
    let http_victim = gateway.then(|| {
        tokio::spawn(http_victim(
            addr,
            prefix.clone(),
            (http_hist.clone(), http_by_put.clone()),
            http_seen.clone(),
            created.clone(),
            stop_rx.clone(),
            errors.clone(),
        ))
    });
    // Both victims created before the writes start (at most 30 s).
    let victims = if gateway { 2 } else { 1 };
    let deadline = Instant::now() + Duration::from_secs(30);
    while created.load(Ordering::Relaxed) < victims && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if created.load(Ordering::Relaxed) < victims {
        errors_push(&errors, "a victim watch was not created within 30 s");
    }

    let key = Bytes::from([prefix.as_ref(), b"k0000"].concat());
    let get_hist = Arc::new(Mutex::new(Hist::default()));
    let http_get_hist = Arc::new(Mutex::new(Hist::default()));
    let slow_gets = Arc::new(AtomicU64::new(0));
    let get_errors = Arc::new(AtomicU64::new(0));
    let getter = tokio::spawn(getter(
        url.clone(),
        gateway.then_some(addr),
        key.clone(),
        get_hist.clone(),
        http_get_hist.clone(),
        slow_gets.clone(),
        get_errors.clone(),
        stop_rx.clone(),
    ));

    let etcd_url = format!("http://{etcd_addr}");
    let ch = work::connect(&etcd_url).await?;
    let mut kv = KvClient::new(ch);
    if a.slow_warm_puts > 0 {
        // Warm victims: they read large events before the non-readers arrive. The values do
        // not decode as a measured put's, so the victims skip them.
        for i in 0..a.slow_warm_puts {
            let req = PutRequest {
                key: Bytes::from(format!("{}warm{i}", String::from_utf8_lossy(prefix))),
                value: Bytes::from(vec![b'w'; a.value_size.max(32)]),
                ..Default::default()
            };
            match tokio::time::timeout(Duration::from_secs(10), kv.put(auth::as_writer(req))).await
            {
                Ok(Ok(_)) => {}
                Ok(Err(s)) => return Err(format!("warm-up put {i}: {s}").into()),
                Err(_) => return Err(format!("warm-up put {i} timed out").into()),
            }
            tokio::time::sleep(Duration::from_secs_f64(1.0 / a.rate.max(0.1))).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        if with_slow {
            held = open_nonreaders(site, &mut r, &errors).await?;
        }
    }

    // ---- the writes -----------------------------------------------------------------------
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / a.rate.max(0.1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let keys = a.keys.max(1);
    for seq in 0..puts {
        tick.tick().await;
        let k = Bytes::from(format!(
            "{}k{:04}",
            String::from_utf8_lossy(prefix),
            seq % keys
        ));
        let req = PutRequest {
            key: k,
            value: encode_value(seq, now_ns(), a.value_size),
            ..Default::default()
        };
        match tokio::time::timeout(Duration::from_secs(10), kv.put(auth::as_writer(req))).await {
            Ok(Ok(_)) => r.puts += 1,
            Ok(Err(s)) => return Err(format!("put {seq}: {s}").into()),
            Err(_) => return Err(format!("put {seq} timed out").into()),
        }
    }
    // Every event to both victims, at most 60 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let http_done = !gateway || http_seen.load(Ordering::Relaxed) >= puts;
        if grpc_seen.load(Ordering::Relaxed) >= puts && http_done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    for task in [Some(grpc_victim), http_victim, Some(getter)]
        .into_iter()
        .flatten()
    {
        if tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .is_err()
        {
            errors_push(&errors, "a victim task did not stop within 10 s");
        }
    }
    r.usage = sampler.usage(&mark);
    r.grpc_victim = grpc_hist.lock().unwrap().summary();
    r.grpc_victim_ms_by_put = grpc_by_put.lock().unwrap().clone();
    if gateway {
        r.http_victim_ms_by_put = http_by_put.lock().unwrap().clone();
    }
    r.grpc_victim_missing = puts.saturating_sub(grpc_seen.load(Ordering::Relaxed));
    if gateway {
        r.http_victim = Some(http_hist.lock().unwrap().summary());
        r.http_victim_missing = puts.saturating_sub(http_seen.load(Ordering::Relaxed));
        r.http_gets = Some(http_get_hist.lock().unwrap().summary());
    }
    r.grpc_gets = get_hist.lock().unwrap().summary();
    r.gets_over_1s = slow_gets.load(Ordering::Relaxed);
    r.get_errors = get_errors.load(Ordering::Relaxed);
    r.errors = errors.lock().unwrap().clone();
    eprintln!(
        "loadgen: round with_slow={with_slow}: victim gRPC p99 {:.1} ms (missing {}), HTTP p99 {:?} ms (missing {}), gets p99 {:.1} ms, >1s {}",
        r.grpc_victim.p99_ms,
        r.grpc_victim_missing,
        r.http_victim.as_ref().map(|h| h.p99_ms),
        r.http_victim_missing,
        r.grpc_gets.p99_ms,
        r.gets_over_1s
    );
    eprintln!(
        "loadgen: slowest puts for the victims: gRPC {}; HTTP {}",
        slowest(&r.grpc_victim_ms_by_put, 5),
        slowest(&r.http_victim_ms_by_put, 5)
    );
    let had = held.len();
    drop(held);
    if had > 0 && t == Target::Fanout {
        // The next round starts once the proxy has let the non-readers go (at most 30 s).
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match watchers_gauge(t, etcd_addr, addr).await {
                Some(g) if g < 10.0 => break,
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
    Ok(r)
}

/// Opens the non-readers (`--slow-http` HTTP/JSON watch connections, `--slow-grpc` gRPC
/// watches) and waits until the target counts them; records what it took in `r`.
async fn open_nonreaders(
    site: Site<'_>,
    r: &mut Round,
    errors: &Arc<Mutex<Vec<String>>>,
) -> Result<Vec<TcpStream>, BoxError> {
    let Site {
        a,
        t,
        etcd_addr,
        addr,
        prefix,
        gateway,
        sampler,
    } = site;
    let mut held: Vec<TcpStream> = Vec::new();
    let t0 = Instant::now();
    let http_n = if gateway { a.slow_http } else { 0 };
    let per_conn = a.slow_grpc_streams.max(1);
    let conns = a.slow_grpc.div_ceil(per_conn);
    let mut tasks = Vec::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(128));
    for i in 0..(http_n + conns) {
        let prefix = prefix.clone();
        let gate = gate.clone();
        let streams = if i < http_n {
            0
        } else {
            per_conn.min(a.slow_grpc - (i - http_n) * per_conn)
        };
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire().await;
            let fut = async {
                if streams == 0 {
                    open_http_nonreader(addr, &prefix).await
                } else {
                    open_grpc_nonreader(addr, &prefix, streams).await
                }
            };
            tokio::time::timeout(Duration::from_secs(20), fut)
                .await
                .map_err(|_| BoxError::from("opening a non-reader timed out"))?
        }));
    }
    for task in tasks {
        match task.await? {
            Ok(s) => held.push(s),
            Err(e) => errors_push(errors, format!("non-reader: {e}")),
        }
    }
    r.slow_http = held.len().min(http_n);
    r.slow_grpc = held.len().saturating_sub(http_n) * per_conn;
    // Until the target shows them (or 60 s).
    let want = (http_n + a.slow_grpc) as f64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        r.watchers_gauge = watchers_gauge(t, etcd_addr, addr).await;
        let enough = match (t, r.watchers_gauge) {
            (Target::GrpcProxy, _) => true,
            (_, Some(g)) => g >= want,
            _ => false,
        };
        if enough || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if t == Target::GrpcProxy {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    r.slow_setup_s = t0.elapsed().as_secs_f64();
    r.proxy_rss_connected_mb = sampler.rss_mb("proxy");
    eprintln!(
        "loadgen: {} non-readers open ({} HTTP, {} gRPC watches) in {:.1}s; watcher gauge {:?}",
        held.len(),
        r.slow_http,
        r.slow_grpc,
        r.slow_setup_s,
        r.watchers_gauge
    );
    Ok(held)
}

/// The `n` slowest puts of a per-put latency series, as "#seq ms" (slowest first), and how
/// many were never seen.
fn slowest(by_put: &[Option<f64>], n: usize) -> String {
    if by_put.is_empty() {
        return "-".into();
    }
    let mut v: Vec<(usize, f64)> = by_put
        .iter()
        .enumerate()
        .filter_map(|(i, ms)| ms.map(|ms| (i, ms)))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut s = v
        .iter()
        .take(n)
        .map(|(i, ms)| format!("#{i} {ms:.0}"))
        .collect::<Vec<_>>()
        .join(", ");
    let unseen = by_put.len() - v.len();
    if unseen > 0 {
        s.push_str(&format!(" ({unseen} unseen)"));
    }
    s
}

/// A victim's latency record: the histogram, and the latency per put (ms) by sequence.
type VictimRecord = (Arc<Mutex<Hist>>, Arc<Mutex<Vec<Option<f64>>>>);

fn record_event(rec: &VictimRecord, seq: u64, us: u64) {
    rec.0.lock().unwrap().record(us);
    if let Some(slot) = rec.1.lock().unwrap().get_mut(seq as usize) {
        *slot = Some(us as f64 / 1000.0);
    }
}

async fn watchers_gauge(t: Target, etcd: SocketAddr, addr: SocketAddr) -> Option<f64> {
    let (at, name) = match t {
        Target::Etcd => (etcd, "etcd_debugging_mvcc_watcher_total"),
        Target::Fanout => (addr, "etcd_fanout_watchers"),
        _ => return None,
    };
    let text = http1::get_text(at, "/metrics", Duration::from_secs(10))
        .await
        .ok()?;
    metric(&text, name, &[])
}

/// `POST /v3/watch` of `prefix` on a fresh connection that is never read.
async fn open_http_nonreader(addr: SocketAddr, prefix: &Bytes) -> Result<TcpStream, BoxError> {
    let mut s = TcpStream::connect(addr).await?;
    let body = format!(
        "{{\"create_request\":{{\"key\":\"{}\",\"range_end\":\"{}\"}}}}",
        B64.encode(prefix),
        B64.encode(prefix_end(prefix))
    );
    s.write_all(&http1::request_bytes(
        "POST",
        addr,
        "/v3/watch",
        body.as_bytes(),
        false,
    ))
    .await?;
    Ok(s)
}

/// One HTTP/2 frame.
fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// An HPACK string length (7-bit prefix, no Huffman coding).
fn hpack_len(out: &mut Vec<u8>, n: usize) {
    if n < 127 {
        out.push(n as u8);
        return;
    }
    out.push(127);
    let mut rest = n - 127;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// The header block of a gRPC Watch call: literals without indexing, new names.
pub fn grpc_watch_headers(authority: &str) -> Vec<u8> {
    let mut block = Vec::new();
    for (k, v) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/etcdserverpb.Watch/Watch"),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        block.push(0);
        hpack_len(&mut block, k.len());
        block.extend_from_slice(k.as_bytes());
        hpack_len(&mut block, v.len());
        block.extend_from_slice(v.as_bytes());
    }
    block
}

/// A gRPC message (uncompressed) carrying `msg`.
pub fn grpc_message(msg: &impl Message) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut out = vec![0];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// An HTTP/2 connection with `streams` Watch calls each creating a watch of `prefix`, written
/// by hand and then never read.
async fn open_grpc_nonreader(
    addr: SocketAddr,
    prefix: &Bytes,
    streams: usize,
) -> Result<TcpStream, BoxError> {
    let mut s = TcpStream::connect(addr).await?;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 4, 0, 0, &[]);
    let headers = grpc_watch_headers(&addr.to_string());
    let create = grpc_message(&WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: prefix.clone(),
            range_end: prefix_end(prefix),
            ..Default::default()
        })),
    });
    for i in 0..streams {
        let id = 1 + 2 * i as u32;
        frame(&mut out, 1, 0x4, id, &headers);
        frame(&mut out, 0, 0, id, &create);
    }
    s.write_all(&out).await?;
    Ok(s)
}

/// The well-behaved gRPC watcher: every event's latency, and how many distinct puts it saw.
async fn grpc_victim(
    url: String,
    prefix: Bytes,
    hist: VictimRecord,
    seen: Arc<AtomicU64>,
    created: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
    errors: Arc<Mutex<Vec<String>>>,
) {
    let res = async {
        let ch = work::connect(&url).await?;
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: prefix.clone(),
                range_end: prefix_end(&prefix),
                ..Default::default()
            })),
        };
        let reqs = tokio_stream::StreamExt::chain(
            tokio_stream::iter(vec![create]),
            tokio_stream::pending(),
        );
        let mut stream = WatchClient::new(ch)
            .watch(auth::as_reader(reqs))
            .await?
            .into_inner();
        let mut got = std::collections::HashSet::new();
        loop {
            let msg = tokio::select! {
                _ = stop.changed() => return Ok::<(), BoxError>(()),
                m = stream.message() => m?,
            };
            let Some(resp) = msg else {
                return Err("the victim's watch stream ended".into());
            };
            let now = now_ns();
            if resp.created {
                created.fetch_add(1, Ordering::Relaxed);
            }
            for ev in &resp.events {
                if let Some((seq, t)) = ev.kv.as_ref().and_then(|kv| decode_value(&kv.value)) {
                    if got.insert(seq) {
                        record_event(&hist, seq, now.saturating_sub(t) / 1000);
                        seen.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    .await;
    if let Err(e) = res {
        errors_push(&errors, format!("gRPC victim: {e}"));
    }
}

/// The well-behaved HTTP/JSON watcher (APISIX's kind): reads the chunked stream as it comes.
async fn http_victim(
    addr: SocketAddr,
    prefix: Bytes,
    hist: VictimRecord,
    seen: Arc<AtomicU64>,
    created: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
    errors: Arc<Mutex<Vec<String>>>,
) {
    let res = async {
        let mut s = open_http_nonreader(addr, &prefix).await?;
        let mut buf = BytesMut::with_capacity(256 << 10);
        let mut head = false;
        let mut chunked = http1::Chunked::default();
        let mut lines: Vec<u8> = Vec::new();
        let mut got = std::collections::HashSet::new();
        loop {
            let n = tokio::select! {
                _ = stop.changed() => return Ok::<(), BoxError>(()),
                r = s.read_buf(&mut buf) => r?,
            };
            if n == 0 {
                return Err("the victim's watch connection closed".into());
            }
            let now = now_ns();
            if !head {
                match http1::parse_head(&mut buf)? {
                    None => continue,
                    Some(h) if h.status == 200 => head = true,
                    Some(h) => return Err(format!("watch status {}", h.status).into()),
                }
            }
            chunked.decode(&mut buf, &mut lines)?;
            let mut consumed = 0;
            while let Some(nl) = lines[consumed..].iter().position(|b| *b == b'\n') {
                let line = &lines[consumed..consumed + nl];
                consumed += nl + 1;
                let v: serde_json::Value = serde_json::from_slice(line)?;
                if v["result"]["created"].as_bool() == Some(true) {
                    created.fetch_add(1, Ordering::Relaxed);
                }
                let events = v["result"]["events"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                for ev in events {
                    let Some(b64) = ev["kv"]["value"].as_str() else {
                        continue;
                    };
                    let value = B64.decode(b64)?;
                    if let Some((seq, t)) = decode_value(&value) {
                        if got.insert(seq) {
                            record_event(&hist, seq, now.saturating_sub(t) / 1000);
                            seen.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            lines.drain(..consumed);
        }
    }
    .await;
    if let Err(e) = res {
        errors_push(&errors, format!("HTTP victim: {e}"));
    }
}

/// A linearizable get of `key` every 250 ms over gRPC, and over HTTP/JSON when `http` is
/// set, until stopped.
#[allow(clippy::too_many_arguments)]
async fn getter(
    url: String,
    http: Option<SocketAddr>,
    key: Bytes,
    hist: Arc<Mutex<Hist>>,
    http_hist: Arc<Mutex<Hist>>,
    over_1s: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(ch) = work::connect(&url).await else {
        failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut kv = KvClient::new(ch);
    let body = format!("{{\"key\":\"{}\"}}", B64.encode(&key));
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Bounded: the stop signal comes after the writes (at most a few minutes).
    for _ in 0..4800 {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let t0 = Instant::now();
        let req = RangeRequest {
            key: key.clone(),
            ..Default::default()
        };
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(10), kv.range(auth::as_reader(req))).await,
            Ok(Ok(_))
        );
        record_get(&hist, &over_1s, &failed, t0, ok);
        if let Some(addr) = http {
            let t0 = Instant::now();
            let ok = matches!(
                http1::request(
                    addr,
                    "POST",
                    "/v3/kv/range",
                    body.as_bytes(),
                    Duration::from_secs(10)
                )
                .await,
                Ok((200, _))
            );
            record_get(&http_hist, &over_1s, &failed, t0, ok);
        }
    }
}

fn record_get(hist: &Mutex<Hist>, over: &AtomicU64, failed: &AtomicU64, t0: Instant, ok: bool) {
    let d = t0.elapsed();
    if !ok {
        failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if d > Duration::from_secs(1) {
        over.fetch_add(1, Ordering::Relaxed);
    }
    hist.lock().unwrap().record(d.as_micros() as u64);
}

/// The markdown report of the slow-reader runs.
pub fn render(a: &Args, results: &[SlowResult]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    crate::report::table_head(
        &mut s,
        &format!(
            "Slow readers: {} HTTP + {} gRPC ({} per connection) non-reading watchers, {} puts of {} B at {}/s, {} round pair(s)",
            a.slow_http,
            a.slow_grpc,
            a.slow_grpc_streams,
            a.slow_puts,
            a.value_size,
            a.rate,
            a.slow_rounds.max(1)
        ),
        &a.note,
        &[
            "target",
            "pair",
            "non-readers (HTTP / gRPC)",
            "victim gRPC p50 / p99 / max ms",
            "victim HTTP p50 / p99 / max ms",
            "missed events",
            "gets gRPC p99 / max ms",
            "gets HTTP p99 / max ms",
            "gets > 1 s",
            "proxy RSS start -> peak MB (growth)",
            "proxy RSS growth (a) connecting / (b) puts MB",
            "etcd RSS start -> peak MB",
            "proxy CPU s",
            "etcd CPU s",
        ],
    );
    for res in results {
        for r in &res.rounds {
            let lat =
                |l: &LatencySummary| format!("{:.1} / {:.1} / {:.1}", l.p50_ms, l.p99_ms, l.max_ms);
            let proc_rss = |who: &str| {
                r.usage.get(who).map_or("-".to_string(), |u| {
                    format!(
                        "{:.0} -> {:.0} ({:+.0})",
                        u.start_rss_mb,
                        u.peak_rss_mb,
                        u.peak_rss_mb - u.start_rss_mb
                    )
                })
            };
            let split = match split_growth(r) {
                Some((Some(c), p)) => format!("{c:+.0} / {p:+.0}"),
                Some((None, p)) => format!("- / {p:+.0}"),
                None => "-".into(),
            };
            let cpu = |who: &str| r.usage.cpu_cell(who);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} / {} | {:.1} / {:.1} | {} | {} (+{} failed) | {} | {} | {} | {} | {} |",
                res.target,
                r.pair,
                if r.with_slow {
                    format!("{} / {}", r.slow_http, r.slow_grpc)
                } else {
                    "none".into()
                },
                lat(&r.grpc_victim),
                r.http_victim.as_ref().map_or("-".into(), lat),
                r.grpc_victim_missing,
                r.http_victim_missing,
                r.grpc_gets.p99_ms,
                r.grpc_gets.max_ms,
                r.http_gets
                    .as_ref()
                    .map_or("-".into(), |l| format!("{:.1} / {:.1}", l.p99_ms, l.max_ms)),
                r.gets_over_1s,
                r.get_errors,
                proc_rss("proxy"),
                split,
                proc_rss("etcd"),
                cpu("proxy"),
                cpu("etcd"),
            );
        }
        if let Some(f) = &res.failure {
            let _ = writeln!(s, "| {} | FAILED: {} |", res.target, f.replace('\n', " "));
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "Slowest puts per round (put #, victim latency ms):\n");
    for res in results {
        for r in &res.rounds {
            let _ = writeln!(
                s,
                "- {} pair {} {}: gRPC {}; HTTP {}",
                res.target,
                r.pair,
                if r.with_slow { "with" } else { "without" },
                slowest(&r.grpc_victim_ms_by_put, 5),
                slowest(&r.http_victim_ms_by_put, 5)
            );
        }
    }
    let _ = writeln!(s);
    for res in results {
        let ratio = |w: f64, wo: f64| if wo > 0.0 { w / wo } else { f64::NAN };
        let (mut grpc, mut http) = (Vec::new(), Vec::new());
        for pair in res.rounds.chunks(2) {
            let [without, with] = pair else { continue };
            let g = ratio(with.grpc_victim.p99_ms, without.grpc_victim.p99_ms);
            grpc.push(g);
            let _ = write!(
                s,
                "- {} pair {}: victim gRPC p99 {:.1} -> {:.1} ms = {:.2}x",
                res.target, with.pair, without.grpc_victim.p99_ms, with.grpc_victim.p99_ms, g
            );
            if let (Some(w), Some(wo)) = (&with.http_victim, &without.http_victim) {
                let h = ratio(w.p99_ms, wo.p99_ms);
                http.push(h);
                let _ = write!(
                    s,
                    ", HTTP {:.1} -> {:.1} ms = {:.2}x",
                    wo.p99_ms, w.p99_ms, h
                );
            }
            if let Some(u) = with.usage.get("proxy") {
                let _ = write!(
                    s,
                    "; proxy RSS growth with the non-readers {:+.0} MB",
                    u.peak_rss_mb - u.start_rss_mb
                );
                if let (Some((Some(c), p)), Some((_, p0))) =
                    (split_growth(with), split_growth(without))
                {
                    let _ = write!(
                        s,
                        " = (a) connecting {c:+.0} + (b) puts {p:+.0} (without them the puts grew it {p0:+.0}: the cache)"
                    );
                }
            }
            let _ = writeln!(s);
        }
        if grpc.len() > 1 {
            let _ = write!(
                s,
                "- {}: median over {} pairs: victim gRPC p99 ratio {:.2}x",
                res.target,
                grpc.len(),
                median(&mut grpc)
            );
            if !http.is_empty() {
                let _ = write!(s, ", HTTP {:.2}x", median(&mut http));
            }
            let _ = writeln!(s);
        }
        if grpc.len() > 1 {
            // Every put of every pair in one sample per side: the p99 of 300 puts is the
            // fourth-worst put of one round, of 900 the ninth-worst of three.
            let pooled = |with: bool, pick: fn(&Round) -> &[Option<f64>]| {
                let mut all: Vec<f64> = res
                    .rounds
                    .iter()
                    .filter(|r| r.with_slow == with)
                    .flat_map(|r| pick(r).iter().flatten().copied())
                    .collect();
                nearest_rank(&mut all, 0.99)
            };
            let (g0, g1) = (pooled(false, grpc_of), pooled(true, grpc_of));
            let _ = write!(
                s,
                "- {}: pooled over {} pairs (every put of the rounds without, of the rounds with): victim gRPC p99 {g0:.1} -> {g1:.1} ms = {:.2}x",
                res.target,
                grpc.len(),
                ratio(g1, g0)
            );
            let (h0, h1) = (pooled(false, http_of), pooled(true, http_of));
            if h0.is_finite() && h1.is_finite() {
                let _ = write!(s, ", HTTP {h0:.1} -> {h1:.1} ms = {:.2}x", ratio(h1, h0));
            }
            let _ = writeln!(s);
        }
        for r in &res.rounds {
            for e in &r.errors {
                let _ = writeln!(
                    s,
                    "  - {} (pair {}, with_slow={}): {e}",
                    res.target, r.pair, r.with_slow
                );
            }
        }
    }
    s
}

/// A round's proxy RSS growth split into (a) opening the non-readers (`None` without them)
/// and (b) the puts (peak over the RSS once they were open, or over the round's start).
fn split_growth(r: &Round) -> Option<(Option<f64>, f64)> {
    let u = r.usage.get("proxy")?;
    let start = r.proxy_rss_start_mb.unwrap_or(u.start_rss_mb);
    match r.proxy_rss_connected_mb {
        Some(c) => Some((Some(c - start), u.peak_rss_mb - c)),
        None => Some((None, u.peak_rss_mb - start)),
    }
}

/// A round's gRPC victim latency per put.
fn grpc_of(r: &Round) -> &[Option<f64>] {
    &r.grpc_victim_ms_by_put
}

/// A round's HTTP victim latency per put.
fn http_of(r: &Round) -> &[Option<f64>] {
    &r.http_victim_ms_by_put
}

/// The `q` quantile of `v` by nearest rank (NaN when empty).
fn nearest_rank(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// The median of `v` (NaN when empty).
fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
