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
        let (etcd, proxy) = etcd_and_proxy("/burst/").await;
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
/// back by HTTP/2 flow control (the session stops reading its requests once 1 MiB of them
/// wait), not cut off by h2's small-frame budget (GOAWAY ENHANCE_YOUR_CALM): when it starts
/// reading, every create is answered.
#[test]
fn unread_create_burst_is_held_back_not_cut_off() {
    let n = env_or("ETCD_FANOUT_BURST_CREATES", 100_000) as usize;
    runtime().block_on(async {
        let (_etcd, proxy) = etcd_and_proxy("/held/").await;
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
    slow_readers_case(&[]);
}

/// The same with write turns for connections not yet seen to read (`--unproven-write-turns`):
/// the non-readers' first copies wait in the line, the victim and the bounds are unchanged.
#[test]
fn slow_readers_with_write_turns() {
    slow_readers_case(&["--unproven-write-turns", "1"]);
}

fn slow_readers_case(extra: &'static [&'static str]) {
    let http_n = env_or("ETCD_FANOUT_SLOW_HTTP", 300) as usize;
    let grpc_n = env_or("ETCD_FANOUT_SLOW_GRPC", 150) as usize;
    let puts = env_or("ETCD_FANOUT_SLOW_PUTS", 60) as usize;
    const VALUE: usize = 100 * 1024;
    runtime().block_on(async {
        let prefix = "/slow/";
        let (etcd, proxy) = etcd_and_proxy_with(prefix, extra).await;
        let pid = proxy_pid(proxy.port).expect("proxy pid");
        // The victim: one gRPC watch that reads everything, noting when each revision came.
        let mut victim =
            WatchClient::new(proxy.channel().await).max_decoding_message_size(usize::MAX);
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
        let first = vstream
            .message()
            .await
            .expect("victim created")
            .expect("created");
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
            http.push(send_http_watch(proxy.port, body).await);
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
                idle.push(
                    IdleStream::open(ch.clone(), &[spec])
                        .await
                        .expect("idle stream"),
                );
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
            let rev = testkit::put_value(&mut kv, format!("{prefix}k{}", i % 10), &value).await;
            acked.push((rev, Instant::now()));
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
        // The new-connection lane (`wire/lanes.rs`, on by default): connections start
        // there; the victim's, whose client reads, moved to the main runtime; the HTTP
        // watchers that never read stayed (their sockets took their receive buffers and
        // never drained).
        let moves = |protocol: &str, to: &str| {
            let head = format!(
                "etcd_fanout_connection_moves_total{{protocol=\"{protocol}\",to=\"{to}\"}} "
            );
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(head.as_str()))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        assert_eq!(
            moves("http1", "main"),
            0.0,
            "a non-reading HTTP watcher's connection left the lane"
        );
        assert!(
            moves("http2", "main") >= 1.0,
            "the victim's connection did not leave the lane:\n{metrics}"
        );
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

/// Bytes queued in the kernel for the proxy's side of the connection from `client_port` to
/// the proxy's `port` (`tx_queue` of /proc/net/tcp: sent and not acknowledged, plus not yet
/// sent), if the socket is listed.
fn proxy_tx_queue(port: u16, client_port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port_of = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 || port_of(f[1]) != Some(port) || port_of(f[2]) != Some(client_port) {
            return None;
        }
        let tx = f[4].split_once(':')?.0;
        u64::from_str_radix(tx, 16).ok()
    })
}

/// The body of a chunked HTTP/1.1 response read so far (head skipped, chunk framing removed;
/// an incomplete last chunk as far as it goes).
fn dechunk(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return out;
    };
    let mut rest = &raw[head_end + 4..];
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&rest[..eol])
            .ok()
            .and_then(|h| usize::from_str_radix(h.trim(), 16).ok());
        let Some(size) = size else { break };
        rest = &rest[eol + 2..];
        let take = size.min(rest.len());
        out.extend_from_slice(&rest[..take]);
        if take < size || rest.len() < size + 2 {
            break;
        }
        rest = &rest[size + 2..];
    }
    out
}

/// A client that stops reading takes at most `--socket-unsent-bytes` (16 KiB by default)
/// beyond what its own receive buffer accepted, not the kernel's autotuned send buffer (up to
/// 4 MiB, copied into the socket for each of thousands of such clients while the others
/// wait); once it reads, it gets every event.
#[test]
fn a_non_reader_takes_bounded_socket_bytes() {
    non_reader_case(&[]);
}

/// The same with write turns: the non-reader's first large write takes the turn, its socket
/// fills, and once it reads it is proven and gets every revision once.
#[test]
fn a_non_reader_with_write_turns_gets_everything_once_it_reads() {
    non_reader_case(&["--unproven-write-turns", "1"]);
}

fn non_reader_case(extra: &'static [&'static str]) {
    let puts = env_or("ETCD_FANOUT_UNSENT_PUTS", 30) as usize;
    const VALUE: usize = 100 * 1024;
    // TCP_NOTSENT_LOWAT stops a write once the unsent bytes pass it, at most one segment
    // (64 KiB on loopback) later; generous, as the kernel's autotuned buffer takes megabytes.
    const BOUND: u64 = 256 << 10;
    runtime().block_on(async {
        let prefix = "/unsent/";
        let (etcd, proxy) = etcd_and_proxy_with(prefix, extra).await;
        // prefix "/unsent/", range_end "/unsent0".
        let body = r#"{"create_request":{"key":"L3Vuc2VudC8=","range_end":"L3Vuc2VudDA="}}"#;
        let mut s = send_http_watch(proxy.port, body).await;
        let client_port = s.local_addr().expect("local addr").port();
        let deadline = Instant::now() + Duration::from_secs(20);
        while testkit::metric_value(&proxy.metrics(), "etcd_fanout_watchers") < 1.0 {
            assert!(Instant::now() < deadline, "the watch was not created");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut kv = KvClient::new(testkit::channel(&etcd.url).await);
        let value = bytes::Bytes::from(vec![b'u'; VALUE]);
        let mut revisions = Vec::new();
        for i in 0..puts {
            revisions
                .push(testkit::put_value(&mut kv, format!("{prefix}k{}", i % 5), &value).await);
        }
        // The proxy's writer blocks on the socket once it holds its bound: sample it for three
        // seconds after the last put (without the bound the socket takes megabytes, every
        // put's reply, and the session never parks).
        let mut most = 0;
        for _ in 0..30 {
            let q = proxy_tx_queue(proxy.port, client_port).expect("the proxy's socket");
            most = most.max(q);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let parked = testkit::metric_value(&proxy.metrics(), "etcd_fanout_watch_sessions_parked");
        eprintln!(
            "non-reader: {puts} puts of {VALUE} B, the proxy's socket holds at most {most} B \
             unacknowledged (bound {BOUND}); sessions parked {parked}"
        );
        assert!(
            most <= BOUND,
            "the proxy's socket holds {most} B for a client that does not read (bound {BOUND})"
        );
        // Reading now, the client gets every revision.
        let mut got = Vec::new();
        let mut buf = vec![0u8; 256 << 10];
        let deadline = Instant::now() + Duration::from_secs(60);
        let last = *revisions.last().expect("a put");
        let needle = format!("\"mod_revision\":\"{last}\"");
        while !dechunk(&got)
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
        {
            let left = deadline.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, tokio::io::AsyncReadExt::read(&mut s, &mut buf))
                .await
                .expect("every event within 60 s of reading")
                .expect("read");
            assert!(n > 0, "the proxy closed the watch");
            got.extend_from_slice(&buf[..n]);
        }
        let body = dechunk(&got);
        let text = String::from_utf8_lossy(&body);
        for rev in &revisions {
            let one = format!("\"mod_revision\":\"{rev}\"");
            assert_eq!(
                text.matches(&one).count(),
                1,
                "revision {rev} not exactly once"
            );
        }
        drop((s, proxy));
    });
}

// ---- HTTP/2: several streams flooding without reading, and real floods ---------------------

/// `msg` as one gRPC message (no compression).
fn grpc_message(msg: &impl prost::Message) -> bytes::Bytes {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.into()
}

/// Sends `msg` as one DATA frame once the peer's flow-control windows allow it.
async fn send_when_allowed(
    send: &mut h2::SendStream<bytes::Bytes>,
    msg: bytes::Bytes,
) -> Result<(), String> {
    send.reserve_capacity(msg.len());
    while send.capacity() < msg.len() {
        match futures::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("waiting for window: {e}")),
            None => return Err("stream closed while waiting for window".into()),
        }
    }
    send.send_data(msg, false).map_err(|e| format!("send: {e}"))
}

/// `streams` Watch streams on one HTTP/2 connection to `addr`, each writing `n` creates (one
/// DATA frame each, within the server's flow-control windows) while the client reads nothing
/// (64 KiB stream windows it never reopens); once every writer is held back or done, every
/// stream is read: each must get `n` `created`. Returns how many creates each stream had sent
/// when the client started reading, or what ended the connection.
async fn unread_flood(
    addr: &str,
    streams: usize,
    n: usize,
    prefix: &str,
) -> Result<Vec<u64>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(65_535)
        // Large, so the client's own small-frame budget (half of it) never ends the test.
        .initial_connection_window_size(1 << 30)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let conn_task = tokio::spawn(conn);
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..streams).map(|_| AtomicU64::new(0)).collect());
    let mut writers = Vec::new();
    let mut responses = Vec::new();
    for s in 0..streams {
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/etcdserverpb.Watch/Watch"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let mut c = client
            .clone()
            .ready()
            .await
            .map_err(|e| format!("ready: {e}"))?;
        let (resp, mut send) = c
            .send_request(req, false)
            .map_err(|e| format!("request: {e}"))?;
        responses.push(resp);
        let (sent, prefix) = (sent.clone(), prefix.to_string());
        writers.push(tokio::spawn(async move {
            for i in 0..n {
                let msg = grpc_message(&create(key(&prefix, s * n + i)));
                send_when_allowed(&mut send, msg).await?;
                sent[s].fetch_add(1, Ordering::Relaxed);
            }
            // Keep the request stream open: the watches stay.
            Ok::<_, String>(send)
        }));
    }
    // Not reading until every writer is done or has stopped moving for a second.
    let total = |sent: &[AtomicU64]| sent.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u64>();
    let mut before = total(&sent);
    for _ in 0..240 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let now = total(&sent);
        if now == before || now == (streams * n) as u64 {
            break;
        }
        before = now;
    }
    let held: Vec<u64> = sent.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let deadline = Instant::now() + Duration::from_secs(env_or("ETCD_FANOUT_BURST_SECS", 300));
    let mut readers = Vec::new();
    for (s, resp) in responses.into_iter().enumerate() {
        readers.push(tokio::spawn(async move {
            let mut body = tokio::time::timeout_at(deadline.into(), resp)
                .await
                .map_err(|_| format!("stream {s}: no response headers"))?
                .map_err(|e| format!("stream {s}: {e}"))?
                .into_body();
            let mut buf = bytes::BytesMut::new();
            let mut created = 0;
            while created < n {
                let chunk = match tokio::time::timeout_at(deadline.into(), body.data()).await {
                    Ok(Some(Ok(c))) => c,
                    Ok(Some(Err(e))) => return Err(format!("stream {s} after {created} created: {e}")),
                    Ok(None) => return Err(format!("stream {s} ended after {created} created")),
                    Err(_) => return Err(format!("stream {s}: only {created} of {n} created in time")),
                };
                let _ = body.flow_control().release_capacity(chunk.len());
                buf.extend_from_slice(&chunk);
                while buf.len() >= 5 {
                    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                    if buf.len() < 5 + len {
                        break;
                    }
                    let msg = buf.split_to(5 + len);
                    let resp = <etcd_fanout::proto::etcdserverpb::WatchResponse as prost::Message>::decode(&msg[5..])
                        .map_err(|e| format!("stream {s}: {e}"))?;
                    if !resp.created || resp.canceled {
                        return Err(format!("stream {s}: unexpected {resp:?}"));
                    }
                    created += 1;
                }
            }
            Ok::<_, String>(())
        }));
    }
    let mut result = Ok(held);
    for r in readers {
        match r.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = result.and(Err(e)),
            Err(e) => result = result.and(Err(e.to_string())),
        }
    }
    for w in writers {
        match tokio::time::timeout(Duration::from_secs(30), w).await {
            Ok(Ok(Ok(_send))) => {}
            Ok(Ok(Err(e))) => result = result.and(Err(format!("writer: {e}"))),
            _ => result = result.and(Err("a writer did not finish".into())),
        }
    }
    conn_task.abort();
    result
}

/// Several streams of one connection flooding creates without reading their answers (what
/// etcd's Go server takes: it holds each stream back by its flow-control window) are held
/// back by flow control, not cut off by h2's budget for small DATA frames (GOAWAY
/// ENHANCE_YOUR_CALM); once the client reads, every create of every stream is answered.
/// etcd first, as the oracle.
#[test]
fn unread_creates_on_several_streams_are_held_back() {
    // Short keys: 19-byte DATA frames, 237 bytes of h2's budget each while unread.
    let streams = env_or("ETCD_FANOUT_FLOOD_STREAMS", 4) as usize;
    let n = env_or("ETCD_FANOUT_FLOOD_CREATES", 30_000) as usize;
    runtime().block_on(async {
        let (etcd, proxy) = etcd_and_proxy("/f/").await;
        let etcd_addr = etcd.url.trim_start_matches("http://").to_string();
        let t0 = Instant::now();
        let held = unread_flood(&etcd_addr, streams, n, "/f/e").await;
        eprintln!("unread flood, etcd: {streams} x {n} creates: held back at {held:?}, all answered in {:.2?}", t0.elapsed());
        held.expect("etcd answers every create of every stream");
        let proxy_addr = format!("127.0.0.1:{}", proxy.port);
        let t0 = Instant::now();
        let held = unread_flood(&proxy_addr, streams, n, "/f/p").await;
        eprintln!("unread flood, proxy: {streams} x {n} creates: held back at {held:?}, all answered in {:.2?}", t0.elapsed());
        let held = held.unwrap_or_else(|e| panic!("proxy: {e}\n{}", tail(&proxy.log(), 30)));
        assert!(
            held.iter().any(|&h| (h as usize) < n),
            "no stream was held back ({held:?} of {n}): the flood did not fill the windows"
        );
        drop(proxy);
    });
}

/// Raw HTTP/2 frames.
fn h2_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// The header block of a gRPC Range call (HPACK literals without indexing).
fn range_headers() -> Vec<u8> {
    let mut block = Vec::new();
    for (k, v) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/etcdserverpb.KV/Range"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        block.push(0);
        block.push(k.len() as u8);
        block.extend_from_slice(k.as_bytes());
        block.push(v.len() as u8);
        block.extend_from_slice(v.as_bytes());
    }
    block
}

/// Writes `flood` after the preface and an empty SETTINGS, then reads frames until a GOAWAY
/// (its error code) or the end of the connection (`None`), at most `within`.
async fn flood_until_goaway(
    port: u16,
    flood: &[u8],
    within: Duration,
) -> Result<Option<u32>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2_frame(&mut out, 4, 0, 0, &[]);
    out.extend_from_slice(flood);
    let (mut rd, mut wr) = s.split();
    let write = async {
        // The server may close before everything is written.
        let _ = wr.write_all(&out).await;
        std::future::pending::<()>().await;
    };
    let read = async {
        let mut buf = Vec::new();
        let mut tmp = vec![0u8; 64 << 10];
        loop {
            let k = rd.read(&mut tmp).await.map_err(|e| e.to_string())?;
            if k == 0 {
                return Ok(None);
            }
            buf.extend_from_slice(&tmp[..k]);
            while buf.len() >= 9 {
                let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                if buf.len() < 9 + len {
                    break;
                }
                if buf[3] == 7 && len >= 8 {
                    return Ok(Some(u32::from_be_bytes([
                        buf[13], buf[14], buf[15], buf[16],
                    ])));
                }
                buf.drain(..9 + len);
            }
        }
    };
    tokio::time::timeout(within, async {
        tokio::select! {
            r = read => r,
            _ = write => unreachable!(),
        }
    })
    .await
    .map_err(|_| format!("neither GOAWAY nor close within {within:?}"))?
}

/// h2's flood protections still end a flooding connection with GOAWAY `ENHANCE_YOUR_CALM`
/// (rapid reset: HEADERS + RST_STREAM pairs; empty DATA frames; a header block cut into
/// CONTINUATION frames without end), while the process keeps serving its other clients: a
/// watch opened before the floods gets its event after them, and new clients are served.
/// etcd's answers to the same floods are printed for comparison (not asserted).
#[test]
fn h2_floods_trip_the_protections_and_spare_other_clients() {
    const ENHANCE_YOUR_CALM: u32 = 11;
    runtime().block_on(async {
        let (etcd, proxy) = etcd_and_proxy("/flood/").await;
        // The bystander: a watch opened before the floods.
        let mut bystander = WatchClient::new(proxy.channel().await);
        let (btx, brx) = tokio::sync::mpsc::unbounded_channel();
        let _ = btx.send(create("/flood/bystander".into()));
        let mut bstream = bystander
            .watch(tokio_stream::wrappers::UnboundedReceiverStream::new(brx))
            .await
            .expect("bystander watch")
            .into_inner();
        assert!(bstream.message().await.expect("created").expect("created").created);

        let headers = range_headers();
        let mut rapid_reset = Vec::new();
        for i in 0..20_000u32 {
            let id = 1 + 2 * i;
            h2_frame(&mut rapid_reset, 1, 0x4, id, &headers);
            h2_frame(&mut rapid_reset, 3, 0, id, &8u32.to_be_bytes());
        }
        let mut empty_data = Vec::new();
        h2_frame(&mut empty_data, 1, 0x4, 1, &headers);
        for _ in 0..1_000 {
            h2_frame(&mut empty_data, 0, 0, 1, &[]);
        }
        let mut continuations = Vec::new();
        h2_frame(&mut continuations, 1, 0, 1, &headers);
        for _ in 0..10_000 {
            h2_frame(&mut continuations, 9, 0, 1, &[]);
        }
        let etcd_port: u16 = etcd.url.rsplit(':').next().unwrap().parse().unwrap();
        for (name, flood) in [
            ("rapid reset (20,000 HEADERS + RST_STREAM)", &rapid_reset),
            ("1,000 empty DATA frames", &empty_data),
            ("10,000 empty CONTINUATION frames", &continuations),
        ] {
            let at_etcd = flood_until_goaway(etcd_port, flood, Duration::from_secs(5)).await;
            let at_proxy = flood_until_goaway(proxy.port, flood, Duration::from_secs(30)).await;
            eprintln!("flood {name}: etcd {at_etcd:?}, proxy {at_proxy:?} (Some(11) = GOAWAY ENHANCE_YOUR_CALM)");
            assert_eq!(
                at_proxy,
                Ok(Some(ENHANCE_YOUR_CALM)),
                "{name}: the proxy did not answer GOAWAY ENHANCE_YOUR_CALM\n{}",
                tail(&proxy.log(), 20)
            );
        }
        // The process still serves: the bystander gets its event, a new client its answer.
        let mut kv = KvClient::new(testkit::channel(&proxy.url).await);
        let put = kv
            .put(PutRequest {
                key: "/flood/bystander".into(),
                value: "after".into(),
                ..Default::default()
            })
            .await
            .expect("put through the proxy after the floods")
            .into_inner();
        let resp = tokio::time::timeout(Duration::from_secs(30), bstream.message())
            .await
            .expect("bystander event in time")
            .expect("bystander stream alive")
            .expect("bystander event");
        assert_eq!(resp.events.len(), 1, "{resp:?}");
        assert_eq!(
            resp.events[0].kv.as_ref().map(|kv| kv.mod_revision),
            put.header.map(|h| h.revision)
        );
        let range = kv
            .range(etcd_fanout::proto::etcdserverpb::RangeRequest {
                key: "/flood/bystander".into(),
                ..Default::default()
            })
            .await
            .expect("range after the floods")
            .into_inner();
        assert_eq!(range.kvs.len(), 1);
        drop(btx);
        drop(proxy);
    });
}

/// A real etcd and a proxy of `prefix` in front of it, started off the async workers (both
/// block while they wait for their process to answer).
async fn etcd_and_proxy(prefix: &'static str) -> (Etcd, Proxy) {
    etcd_and_proxy_with(prefix, &[]).await
}

/// [`etcd_and_proxy`] with `extra` proxy flags.
async fn etcd_and_proxy_with(
    prefix: &'static str,
    extra: &'static [&'static str],
) -> (Etcd, Proxy) {
    let etcd = tokio::task::spawn_blocking(Etcd::start)
        .await
        .expect("etcd start");
    let url = etcd.url.clone();
    let proxy = tokio::task::spawn_blocking(move || Proxy::start_with(&url, &[prefix], extra))
        .await
        .expect("proxy start");
    (etcd, proxy)
}

/// Opens a connection to the proxy on `port` and sends `POST /v3/watch` with `body` as APISIX
/// does; nothing is read.
async fn send_http_watch(port: u16, body: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let req = format!(
        "POST /v3/watch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes())
        .await
        .expect("send watch");
    s
}
