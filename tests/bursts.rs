//! Bursts and slow readers against a real etcd and a real proxy process: a flood of watch
//! creates on one gRPC stream (each in its own HTTP/2 DATA frame, as a client that writes every
//! request at once sends them), and clients that stop reading while large values are written.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;

use etcd_fanout::proto::etcdserverpb::{
    kv_client::KvClient, watch_client::WatchClient, watch_request::RequestUnion, PutRequest,
    WatchCreateRequest, WatchRequest,
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

fn create(key: String) -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.into_bytes().into(),
            ..Default::default()
        })),
    }
}

/// 100,000 creates written at once on one stream, each request its own DATA frame (the
/// request stream yields between requests, so the client's HTTP/2 layer cannot coalesce them):
/// every one is answered `created` and the connection survives (no GOAWAY), and the watches
/// then deliver.
#[test]
#[ignore = "known gap (ARCHITECTURE.md, Limits): a client writing creates faster than it reads \
            their answers fills the session's 256-response queue; the session then blocks and \
            the unread small DATA frames reach h2's budget (ENHANCE_YOUR_CALM) after a few \
            thousand creates. Run with --ignored to see it."]
fn create_burst_on_one_stream() {
    let n = env_or("ETCD_FANOUT_BURST_CREATES", 100_000) as usize;
    runtime().block_on(async {
        let prefix = "/burst/";
        let etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
        let url = etcd.url.clone();
        let proxy = tokio::task::spawn_blocking(move || Proxy::start(&url, &[prefix]))
            .await
            .unwrap();
        // The client reads its answers as fast as it can, but its own HTTP/2 layer holds the
        // small DATA frames it has not read yet against the same kind of budget (half its
        // connection window): give it the windows etcd's Go client uses at most.
        let channel = Endpoint::from_shared(proxy.url.clone())
            .unwrap()
            .initial_stream_window_size(Some(16 << 20))
            .initial_connection_window_size(Some(64 << 20))
            .connect()
            .await
            .expect("connect");
        let mut watch = WatchClient::new(channel);
        let requests = futures::stream::iter(0..n).then(move |i| async move {
            tokio::task::yield_now().await;
            create(format!("{prefix}k{i}"))
        });
        let t0 = Instant::now();
        let mut responses = tokio::time::timeout(Duration::from_secs(30), watch.watch(requests))
            .await
            .expect("stream opened in time")
            .expect("stream opened")
            .into_inner();
        let mut created = 0usize;
        let mut ids = std::collections::HashSet::new();
        let bound = Duration::from_secs(env_or("ETCD_FANOUT_BURST_SECS", 240));
        while created < n {
            let resp = match tokio::time::timeout_at((t0 + bound).into(), responses.message()).await
            {
                Ok(Ok(Some(r))) => r,
                Ok(Ok(None)) => panic!("stream ended after {created} of {n} creates"),
                Ok(Err(e)) => panic!(
                    "stream failed after {created} of {n} creates: {e}\n{}",
                    tail(&proxy.log(), 30)
                ),
                Err(_) => panic!("only {created} of {n} creates answered within {bound:?}"),
            };
            assert!(
                resp.created && !resp.canceled,
                "unexpected response {resp:?}"
            );
            assert!(
                ids.insert(resp.watch_id),
                "watch id {} twice",
                resp.watch_id
            );
            created += 1;
        }
        let took = t0.elapsed();
        eprintln!("{n} creates on one stream answered in {took:?}");
        // The watches work: a put to one key reaches exactly its watch.
        let mut kv = KvClient::new(testkit::channel(&etcd.url).await);
        kv.put(PutRequest {
            key: format!("{prefix}k{}", n - 1).into_bytes().into(),
            value: "v".into(),
            ..Default::default()
        })
        .await
        .expect("put");
        let resp = tokio::time::timeout(Duration::from_secs(30), responses.message())
            .await
            .expect("event in time")
            .expect("stream alive")
            .expect("an event");
        assert_eq!(resp.events.len(), 1, "{resp:?}");
        assert_eq!(resp.watch_id, (n - 1) as i64);
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
