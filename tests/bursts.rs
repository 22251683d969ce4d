//! Bursts and slow readers against a real etcd and a real proxy process: a flood of watch
//! creates on one gRPC stream (each in its own HTTP/2 DATA frame, as a client that writes every
//! request at once sends them), and clients that stop reading while large values are written.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;

use etcd_fanout::proto::etcdserverpb::{
    kv_client::KvClient, request_op, watch_client::WatchClient, watch_request::RequestUnion,
    PutRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchRequest,
};
use testkit::fault::{proxy_pid, rss_kib};
use testkit::watchers::{IdleStream, Spec};
use testkit::{Etcd, Proxy};
use tonic::transport::Endpoint;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The key burst watch `i` is on.
fn key(prefix: &str, i: usize) -> String {
    format!("{prefix}k{i:06}")
}

fn create(key: String) -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.into_bytes().into(),
            ..Default::default()
        })),
    }
}

/// CPU time (user + system) of process `pid` so far, from /proc (clock ticks of 10 ms, the
/// Linux default `CLK_TCK`).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// What one burst cost.
struct Burst {
    /// From the first create sent to the last `created` received.
    created: Duration,
    /// From the first write to the last watch's event.
    delivered: Duration,
    /// CPU seconds of the server process (etcd, or the proxy) over the burst and delivery.
    cpu: f64,
}

/// `n` creates written at once on one stream of `url` (each its own DATA frame: the request
/// stream yields between requests, so the client's HTTP/2 layer cannot coalesce them), every
/// one answered `created` with a distinct id, the connection alive (no GOAWAY); then every
/// watched key is written (transactions of 128 puts, on etcd at `etcd_url`) and each watch
/// gets its key's event, once.
async fn burst(url: &str, etcd_url: &str, pid: u32, n: usize, prefix: &'static str) -> Burst {
    // The client reads its answers as fast as it can, but its own HTTP/2 layer holds the
    // small DATA frames it has not read yet against the same kind of budget (half its
    // connection window): give it the windows etcd's Go client uses at most.
    let channel = Endpoint::from_shared(url.to_string())
        .unwrap()
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(64 << 20))
        .connect()
        .await
        .expect("connect");
    let mut watch = WatchClient::new(channel);
    // Watch i is on key k{i}: all distinct (one shape each).
    let requests = futures::stream::iter(0..n).then(move |i| async move {
        tokio::task::yield_now().await;
        create(key(prefix, i))
    });
    let cpu0 = cpu_secs(pid);
    let t0 = Instant::now();
    let mut responses = tokio::time::timeout(Duration::from_secs(30), watch.watch(requests))
        .await
        .expect("stream opened in time")
        .expect("stream opened")
        .into_inner();
    let bound = Duration::from_secs(env_or("ETCD_FANOUT_BURST_SECS", 300));
    let deadline = t0 + bound;
    let mut next = async |what: &str, done: usize| match tokio::time::timeout_at(
        deadline.into(),
        responses.message(),
    )
    .await
    {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => panic!("{url}: stream ended after {done} of {n} {what}"),
        Ok(Err(e)) => panic!("{url}: stream failed after {done} of {n} {what}: {e}"),
        Err(_) => panic!("{url}: only {done} of {n} {what} within {bound:?}"),
    };
    let mut ids = std::collections::HashSet::new();
    while ids.len() < n {
        let resp = next("creates answered", ids.len()).await;
        assert!(
            resp.created && !resp.canceled && resp.events.is_empty(),
            "{url}: unexpected response {resp:?}"
        );
        assert!(
            ids.insert(resp.watch_id),
            "{url}: watch id {} twice",
            resp.watch_id
        );
    }
    let created = t0.elapsed();
    let mut kv = KvClient::new(testkit::channel(etcd_url).await);
    let t1 = Instant::now();
    let mut revs = std::collections::HashMap::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(128) {
        let txn = TxnRequest {
            success: chunk
                .iter()
                .map(|&i| RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: key(prefix, i).into_bytes().into(),
                        value: "v".into(),
                        ..Default::default()
                    })),
                })
                .collect(),
            ..Default::default()
        };
        let r = kv.txn(txn).await.expect("txn").into_inner();
        let rev = r.header.expect("header").revision;
        for &i in chunk {
            revs.insert(key(prefix, i), rev);
        }
    }
    let mut got = std::collections::HashSet::new();
    while got.len() < n {
        let resp = next("events delivered", got.len()).await;
        assert_eq!(resp.events.len(), 1, "{url}: {resp:?}");
        let kv = resp.events[0].kv.as_ref().expect("kv");
        let k = String::from_utf8_lossy(&kv.key).to_string();
        assert_eq!(Some(&kv.mod_revision), revs.get(&k), "{url}: {resp:?}");
        assert!(ids.contains(&resp.watch_id), "{url}: unknown id {resp:?}");
        assert!(got.insert(resp.watch_id), "{url}: event twice {resp:?}");
    }
    Burst {
        created,
        delivered: t1.elapsed(),
        cpu: cpu_secs(pid) - cpu0,
    }
}

/// 100,000 creates written at once on one stream, as fast as the client sends them: every one
/// is answered `created` and the connection survives (no GOAWAY), then an event reaches every
/// watch; the same burst against etcd directly for comparison (figures printed, not asserted:
/// the machine is shared).
#[test]
fn create_burst_on_one_stream() {
    let n = env_or("ETCD_FANOUT_BURST_CREATES", 100_000) as usize;
    runtime().block_on(async {
        let etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
        let url = etcd.url.clone();
        let proxy = tokio::task::spawn_blocking(move || Proxy::start(&url, &["/burst/"]))
            .await
            .unwrap();
        let etcd_pid = etcd.pid().expect("etcd pid");
        let proxy_pid = proxy_pid(proxy.port).expect("proxy pid");
        let direct = burst(&etcd.url, &etcd.url, etcd_pid, n, "/direct/").await;
        let cpu_etcd0 = cpu_secs(etcd_pid);
        let proxied = std::panic::AssertUnwindSafe(burst(
            &proxy.url, &etcd.url, proxy_pid, n, "/burst/",
        ));
        let proxied = match futures::FutureExt::catch_unwind(proxied).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("proxy log:\n{}", tail(&proxy.log(), 30));
                std::panic::resume_unwind(e)
            }
        };
        let etcd_behind_proxy = cpu_secs(etcd_pid) - cpu_etcd0;
        eprintln!(
            "create burst, {n} creates on one stream (debug build, shared machine):\n  \
             etcd direct: all created in {:.2?}, every key written and its event received in {:.2?}, etcd CPU {:.2} s\n  \
             etcd-fanout: all created in {:.2?}, every key written and its event received in {:.2?}, proxy CPU {:.2} s \
             (etcd behind it {:.2} s)",
            direct.created,
            direct.delivered,
            direct.cpu,
            proxied.created,
            proxied.delivered,
            proxied.cpu,
            etcd_behind_proxy,
        );
        drop(proxy);
    });
}

/// A client that writes 100,000 creates on one stream and reads nothing for a while is held
/// back by HTTP/2 flow control (the session stops reading its requests once 4 MiB of them
/// wait), not cut off by h2's small-frame budget (GOAWAY ENHANCE_YOUR_CALM): when it starts
/// reading, every create is answered.
#[test]
fn unread_create_burst_is_held_back_not_cut_off() {
    let n = env_or("ETCD_FANOUT_BURST_CREATES", 100_000) as usize;
    runtime().block_on(async {
        let etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
        let url = etcd.url.clone();
        let proxy = tokio::task::spawn_blocking(move || Proxy::start(&url, &["/held/"]))
            .await
            .unwrap();
        // HTTP/2's default windows (64 KiB): the client stops taking answers at once.
        let channel = Endpoint::from_shared(proxy.url.clone())
            .unwrap()
            .initial_stream_window_size(Some(65_535))
            .initial_connection_window_size(Some(65_535))
            .connect()
            .await
            .expect("connect");
        let mut watch = WatchClient::new(channel);
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        let requests = futures::stream::iter(0..n).then(move |i| {
            let counter = counter.clone();
            async move {
                tokio::task::yield_now().await;
                counter.fetch_add(1, Ordering::Relaxed);
                create(key("/held/", i))
            }
        });
        let mut responses = tokio::time::timeout(Duration::from_secs(30), watch.watch(requests))
            .await
            .expect("stream opened in time")
            .expect("stream opened")
            .into_inner();
        // Not reading: the writer is held back once the windows and the session's queue are
        // full.
        let mut before = sent.load(Ordering::Relaxed);
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = sent.load(Ordering::Relaxed);
            if now == before {
                break;
            }
            before = now;
        }
        let held_at = sent.load(Ordering::Relaxed);
        eprintln!("unread burst: the client was held back after {held_at} of {n} creates");
        let t0 = Instant::now();
        let mut ids = std::collections::HashSet::new();
        while ids.len() < n {
            let resp =
                match tokio::time::timeout(Duration::from_secs(60), responses.message()).await {
                    Ok(Ok(Some(r))) => r,
                    Ok(Ok(None)) => panic!("stream ended after {} of {n} creates", ids.len()),
                    Ok(Err(e)) => panic!(
                        "stream failed after {} of {n} creates: {e}\n{}",
                        ids.len(),
                        tail(&proxy.log(), 30)
                    ),
                    Err(_) => panic!("only {} of {n} creates answered", ids.len()),
                };
            assert!(resp.created && !resp.canceled, "unexpected {resp:?}");
            assert!(
                ids.insert(resp.watch_id),
                "watch id {} twice",
                resp.watch_id
            );
        }
        eprintln!(
            "unread burst: all {n} created {:.2?} after the client started reading",
            t0.elapsed()
        );
        assert!(
            (held_at as usize) < n,
            "the client was never held back: {held_at} of {n} sent without reading"
        );
        drop(proxy);
    });
}

/// Clients that stop reading while 100 KB values are written: non-reading HTTP/1.1 watchers
/// (`POST /v3/watch`, never read) and non-reading gRPC streams (small flow-control windows).
/// Their sessions park at the byte budget (metric), a well-behaved gRPC watcher on the same
/// proxy still gets every event promptly, and the proxy's RSS grows by a bounded amount.
#[test]
fn slow_readers_park_and_cost_little() {
    let http_n = env_or("ETCD_FANOUT_SLOW_HTTP", 300) as usize;
    let grpc_n = env_or("ETCD_FANOUT_SLOW_GRPC", 150) as usize;
    let puts = env_or("ETCD_FANOUT_SLOW_PUTS", 60) as usize;
    const VALUE: usize = 100 * 1024;
    runtime().block_on(async {
        let prefix = "/slow/";
        let etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
        let url = etcd.url.clone();
        let proxy = tokio::task::spawn_blocking(move || Proxy::start(&url, &[prefix]))
            .await
            .unwrap();
        let pid = proxy_pid(proxy.port).expect("proxy pid");
        // The victim: one gRPC watch that reads everything, noting when each revision came.
        let mut victim = WatchClient::new(proxy.channel().await)
            .max_decoding_message_size(usize::MAX);
        let (vtx, vrx) = tokio::sync::mpsc::unbounded_channel();
        let _ = vtx.send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: prefix.as_bytes().to_vec().into(),
                range_end: "/slow0".into(),
                ..Default::default()
            })),
        });
        let mut vstream = victim
            .watch(tokio_stream::wrappers::UnboundedReceiverStream::new(vrx))
            .await
            .expect("victim watch")
            .into_inner();
        let first = vstream.message().await.expect("victim created").expect("created");
        assert!(first.created);
        let seen: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
        let victim_task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Ok(Some(resp)) = vstream.message().await {
                    let now = Instant::now();
                    let mut seen = seen.lock().unwrap();
                    for ev in &resp.events {
                        if let Some(kv) = &ev.kv {
                            seen.insert(kv.mod_revision, now);
                        }
                    }
                }
                drop(vtx);
            })
        };
        // Non-reading HTTP watchers: the request is sent, nothing is ever read.
        let body = r#"{"create_request":{"key":"L3Nsb3cv","range_end":"L3Nsb3cw"}}"#;
        let mut http = Vec::new();
        for _ in 0..http_n {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
                .await
                .expect("connect");
            let req = format!(
                "POST /v3/watch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes())
                .await
                .expect("send watch");
            http.push(s);
        }
        // Non-reading gRPC streams, 10 per connection, small windows.
        let mut idle = Vec::new();
        for c in 0..grpc_n.div_ceil(10) {
            let ch = Endpoint::from_shared(proxy.url.clone())
                .unwrap()
                .initial_stream_window_size(Some(65_535))
                .initial_connection_window_size(Some(65_535))
                .connect()
                .await
                .expect("connect");
            for i in 0..10.min(grpc_n - c * 10) {
                let spec = Spec::prefix(format!("idle{c}-{i}"), prefix, 0);
                idle.push(IdleStream::open(ch.clone(), &[spec]).await.expect("idle stream"));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_start = rss_kib(pid).unwrap_or(0);
        let peak = Arc::new(AtomicU64::new(rss_start));
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    if let Some(r) = rss_kib(pid) {
                        peak.fetch_max(r, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        // Writes straight to etcd, paced, each noting when etcd acknowledged it.
        let mut kv = KvClient::new(testkit::channel(&etcd.url).await);
        let mut acked = Vec::new();
        let value = bytes::Bytes::from(vec![b'x'; VALUE]);
        for i in 0..puts {
            let resp = kv
                .put(PutRequest {
                    key: format!("{prefix}k{}", i % 10).into_bytes().into(),
                    value: value.clone(),
                    ..Default::default()
                })
                .await
                .expect("put")
                .into_inner();
            acked.push((resp.header.map_or(0, |h| h.revision), Instant::now()));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Every revision reaches the victim, each within the (generous) bound.
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen.lock().unwrap().len() < puts {
            assert!(
                Instant::now() < deadline,
                "victim got {} of {puts} events",
                seen.lock().unwrap().len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sampler.abort();
        let mut lat: Vec<Duration> = {
            let seen = seen.lock().unwrap();
            acked
                .iter()
                .map(|(rev, at)| seen[rev].saturating_duration_since(*at))
                .collect()
        };
        lat.sort();
        let p99 = lat[lat.len() * 99 / 100];
        let max = lat[lat.len() - 1];
        let metrics = proxy.metrics();
        let parked = testkit::metric_value(&metrics, "etcd_fanout_watch_sessions_parked");
        let peak = peak.load(Ordering::Relaxed);
        eprintln!(
            "slow readers: {http_n} HTTP + {grpc_n} gRPC non-reading watchers, {puts} puts of \
             {VALUE} B; victim p50 {:?} p99 {p99:?} max {max:?}; sessions parked {parked}; \
             proxy RSS {} MiB -> peak {} MiB",
            lat[lat.len() / 2],
            rss_start / 1024,
            peak / 1024
        );
        assert!(parked > 0.0, "no session parked:\n{metrics}");
        assert!(max < Duration::from_secs(5), "victim event {max:?} late");
        // Each parked session holds at most its byte budget of shared batches plus one
        // response in its connection's writer; 64 MiB of slack for allocator and history.
        let bound_kib = 64 * 1024 + ((http_n + grpc_n) * 3 * VALUE / 2) as u64 / 1024;
        assert!(
            peak.saturating_sub(rss_start) < bound_kib,
            "proxy RSS grew by {} MiB (bound {} MiB)",
            (peak - rss_start) / 1024,
            bound_kib / 1024
        );
        victim_task.abort();
        drop((http, idle, proxy));
    });
}
