//! gRPC limits as etcd has them: an oversized request message gets grpc-go's
//! `RESOURCE_EXHAUSTED` "grpc: received message larger than max (N vs. M)" on every route
//! (unary, the cached Range route, the Watch stream), and a Txn nested 50 to 128 deep is
//! accepted as etcd accepts it (prost's recursion limit refused it from 50 on); deeper ones
//! get etcd's "too many operations" answer. HTTP/2 PING floods are acked in bounded memory
//! (etcd ends them with GOAWAY "too_many_pings"), and clients' keepalive pings never trip
//! anything.

use etcd_fanout::proto::etcdserverpb::request_op::Request as Op;
use etcd_fanout::proto::etcdserverpb::response_op::Response as OpResp;
use etcd_fanout::proto::etcdserverpb::{
    watch_request::RequestUnion, PutRequest, RangeRequest, RequestOp, TxnRequest, TxnResponse,
    WatchCreateRequest, WatchRequest,
};
use std::time::{Duration, Instant};

use testkit::{Clients, Etcd, Proxy};
use tonic::Code;

fn nested(depth: usize) -> TxnRequest {
    let mut t = TxnRequest {
        success: vec![RequestOp {
            request: Some(Op::RequestRange(RangeRequest {
                key: "/apisix/a".into(),
                ..Default::default()
            })),
        }],
        ..Default::default()
    };
    for _ in 1..depth {
        t = TxnRequest {
            success: vec![RequestOp {
                request: Some(Op::RequestTxn(t)),
            }],
            ..Default::default()
        };
    }
    t
}

/// A `TxnRequest` nested `depth` deep, encoded from the inside out without recursion: each
/// level is `TxnRequest { success (2): RequestOp { request_txn (4): inner } }`.
fn deep_bytes(depth: usize) -> Vec<u8> {
    use prost::Message;
    let inner = nested(1).encode_to_vec();
    let mut prefixes = Vec::with_capacity(depth);
    let mut len = inner.len();
    for _ in 1..depth {
        let mut op = vec![4 << 3 | 2];
        prost::encoding::encode_varint(len as u64, &mut op);
        let op_len = op.len() + len;
        let mut prefix = vec![2 << 3 | 2];
        prost::encoding::encode_varint(op_len as u64, &mut prefix);
        prefix.extend_from_slice(&op);
        len += prefix.len();
        prefixes.push(prefix);
    }
    let mut out = Vec::with_capacity(len);
    for p in prefixes.iter().rev() {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(&inner);
    out
}

fn response_depth(r: &TxnResponse) -> usize {
    let mut depth = 1;
    let mut cur = r;
    while let Some(OpResp::ResponseTxn(inner)) =
        cur.responses.first().and_then(|o| o.response.as_ref())
    {
        depth += 1;
        cur = inner;
    }
    depth
}

async fn clients(url: &str) -> Clients {
    let mut c = Clients::connect(url).await;
    c.kv = c.kv.max_encoding_message_size(usize::MAX);
    c.watch = c.watch.max_encoding_message_size(usize::MAX);
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_messages_and_deep_txns_as_etcd() {
    let etcd = Etcd::start();
    let proxy = Proxy::start(&etcd.url, &["/apisix/"]);
    let mut sides = [
        ("etcd", clients(&etcd.url).await),
        ("proxy", clients(&proxy.url).await),
    ];
    let big = vec![b'x'; 3 << 20];
    let mut answers = Vec::new();
    for (who, c) in sides.iter_mut() {
        let put =
            c.kv.put(PutRequest {
                key: "/apisix/big".into(),
                value: big.clone().into(),
                ..Default::default()
            })
            .await
            .map(|_| ());
        let range =
            c.kv.range(RangeRequest {
                key: big.clone().into(),
                ..Default::default()
            })
            .await
            .map(|_| ());
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: big.clone().into(),
                ..Default::default()
            })),
        };
        let watch = match c.watch.watch(tokio_stream::iter(vec![create])).await {
            Ok(resp) => {
                let mut s = resp.into_inner();
                s.message().await.map(|_| ())
            }
            Err(e) => Err(e),
        };
        let show = |r: Result<(), tonic::Status>| match r {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("{:?}: {}", e.code(), e.message()),
        };
        answers.push((*who, show(put), show(range), show(watch)));
    }
    assert_eq!(answers[0].1, answers[1].1, "put: {answers:?}");
    assert_eq!(answers[0].2, answers[1].2, "range: {answers:?}");
    assert_eq!(answers[0].3, answers[1].3, "watch: {answers:?}");
    assert!(
        answers[1]
            .1
            .starts_with("ResourceExhausted: grpc: received message larger than max ("),
        "{answers:?}"
    );

    // Deep Txns: etcd accepts them, so does the proxy (and the answer nests as deep).
    for depth in [50, 100, 128] {
        for (who, c) in sides.iter_mut() {
            let r =
                c.kv.txn(nested(depth))
                    .await
                    .unwrap_or_else(|e| panic!("{who}: txn nested {depth} deep refused: {e:?}"));
            assert_eq!(response_depth(r.get_ref()), depth, "{who} {depth}");
        }
    }
    // Deeper: etcd's own refusal (forwarded, or the proxy's above its decoding bound).
    for depth in [129, 256, 400] {
        for (who, c) in sides.iter_mut() {
            let e = c.kv.txn(nested(depth)).await.expect_err("too deep");
            assert_eq!(e.code(), Code::InvalidArgument, "{who} {depth}: {e:?}");
            assert_eq!(
                e.message(),
                "etcdserver: too many operations in txn request",
                "{who} {depth}"
            );
        }
    }
    // Far deeper (encoded without recursion, 1.5 MiB): no stack is spent on it.
    for (who, url) in [("etcd", &etcd.url), ("proxy", &proxy.url)] {
        let e = testkit::diff::raw_unary(url, "/etcdserverpb.KV/Txn", deep_bytes(200_000))
            .await
            .expect_err("too deep");
        assert_eq!(e.code(), Code::InvalidArgument, "{who}: {e:?}");
        assert_eq!(
            e.message(),
            "etcdserver: too many operations in txn request",
            "{who}"
        );
    }
    sides[1]
        .1
        .kv
        .txn(nested(10))
        .await
        .expect("the proxy still serves");
}

// ------------------------------------------------------------------------------------------
// HTTP/2 PING floods
// ------------------------------------------------------------------------------------------

/// A PING frame (8-byte payload `n`) on stream 0.
fn ping_frame(n: u64) -> [u8; 17] {
    let mut f = [0u8; 17];
    f[2] = 8; // length
    f[3] = 0x6; // PING
    f[9..].copy_from_slice(&n.to_be_bytes());
    f
}

/// What a server answered a PING flood with, as read from the raw connection.
#[derive(Debug, Default)]
struct Answer {
    /// PING ACKs received.
    acks: u64,
    /// GOAWAY error code and debug data, if one came.
    goaway: Option<(u32, String)>,
    /// The server closed the connection.
    closed: bool,
}

/// Reads HTTP/2 frames from `s` until `want` PING ACKs, a GOAWAY (then until the close), the
/// close, or `deadline`.
fn read_answer(mut s: std::net::TcpStream, want: u64, deadline: Instant) -> Answer {
    use std::io::Read;
    let mut a = Answer::default();
    let mut head = [0u8; 9];
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    while Instant::now() < deadline && (a.acks < want || a.goaway.is_some()) {
        match s.read(&mut chunk) {
            Ok(0) => {
                a.closed = true;
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(_) => {
                a.closed = true;
                break;
            }
        }
        let mut at = 0;
        while buf.len() >= at + 9 {
            head.copy_from_slice(&buf[at..at + 9]);
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            if buf.len() < at + 9 + len {
                break;
            }
            let payload = &buf[at + 9..at + 9 + len];
            match head[3] {
                0x6 if head[4] & 1 == 1 => a.acks += 1,
                0x7 if len >= 8 => {
                    let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                    a.goaway = Some((code, String::from_utf8_lossy(&payload[8..]).into_owned()));
                }
                _ => {}
            }
            at += 9 + len;
        }
        buf.drain(..at);
    }
    a
}

/// Opens a prior-knowledge HTTP/2 connection (preface and empty SETTINGS, as a gRPC client
/// starts) to `port`.
fn h2_connect(port: u16) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .expect("preface");
    s
}

/// Sends `count` PINGs in batches of 1,000, stopping at the first failed or blocked write
/// (a server that stopped reading); returns how many were written.
fn flood(s: &mut std::net::TcpStream, count: u64, deadline: Instant) -> u64 {
    use std::io::Write;
    s.set_write_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut sent = 0;
    while sent < count && Instant::now() < deadline {
        let batch: Vec<u8> = (sent..(sent + 1_000).min(count))
            .flat_map(ping_frame)
            .collect();
        if s.write_all(&batch).is_err() {
            break;
        }
        sent += batch.len() as u64 / 17;
    }
    sent
}

/// A reading PING flood (`count` pings, the acks read as they come) against `port`.
fn reading_flood(port: u16, count: u64) -> (u64, Answer) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut s = h2_connect(port);
    let r = s.try_clone().expect("clone");
    let reader = std::thread::spawn(move || read_answer(r, count, deadline));
    let sent = flood(&mut s, count, deadline);
    let answer = reader.join().expect("reader");
    (sent, answer)
}

/// Round trips of a well-behaved client (a Range on its own connection every 50 ms) until
/// `stop`: the worst one, and the failures.
async fn victim(
    url: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (Duration, u32) {
    let mut c = Clients::connect(&url).await;
    let (mut worst, mut failed) = (Duration::ZERO, 0);
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        let t = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            c.kv.range(RangeRequest {
                key: "/apisix/k".into(),
                ..Default::default()
            }),
        )
        .await;
        if !matches!(r, Ok(Ok(_))) {
            failed += 1;
        }
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (worst, failed)
}

/// Puts `/apisix/k`.
async fn put_k(c: &mut Clients, value: &str) {
    c.kv.put(PutRequest {
        key: "/apisix/k".into(),
        value: value.to_string().into(),
        ..Default::default()
    })
    .await
    .expect("put");
}

/// A PING flood gets what h2 (hyper's HTTP/2 server) gives it: every ping acked, one pending
/// ack at a time (h2 reads the next frame only once the previous ack is written), so a flood
/// that reads is answered at the speed it reads and one that does not read is stopped by TCP
/// flow control, memory unchanged either way; the proxy stays up and another client's reads
/// stay fast. etcd 3.4.23 (grpc-go's keepalive enforcement, `--grpc-keepalive-min-time` 5 s)
/// instead sends GOAWAY `ENHANCE_YOUR_CALM` "too_many_pings" after the third ping and closes
/// the connection: measured here too. Clients that ping as etcd's clients do (tonic at 100 ms,
/// far more often than grpc-go's 10 s floor, and `etcdctl --keepalive-time 1s`) keep their
/// streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_floods_are_acked_in_bounded_memory_and_keepalives_never_trip() {
    const PINGS: u64 = 100_000;
    let etcd = Etcd::start();
    let proxy = Proxy::start(&etcd.url, &["/apisix/"]);
    let pid = proxy.pid().expect("proxy pid");
    let mut c = Clients::connect(&proxy.url).await;
    put_k(&mut c, "v").await;

    // etcd itself, for the record.
    let etcd_port = etcd.port;
    let (etcd_sent, etcd_answer) =
        tokio::task::spawn_blocking(move || reading_flood(etcd_port, 1_000))
            .await
            .expect("etcd flood");
    eprintln!("etcd: {etcd_sent} pings sent, answer {etcd_answer:?}");
    assert_eq!(
        etcd_answer.goaway.as_ref().map(|(c, d)| (*c, d.as_str())),
        Some((11, "too_many_pings")),
        "etcd 3.4.23 answers a ping flood with GOAWAY ENHANCE_YOUR_CALM"
    );

    let rss_before = testkit::fault::rss_kib(pid).expect("rss");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = tokio::spawn(victim(proxy.url.clone(), stop.clone()));

    // A flood that reads its acks: every ping acked, no GOAWAY.
    let port = proxy.port;
    let started = Instant::now();
    let (sent, answer) = tokio::task::spawn_blocking(move || reading_flood(port, PINGS))
        .await
        .expect("flood");
    let took = started.elapsed();
    eprintln!("proxy, reading flood: {sent} pings sent in {took:?}, answer {answer:?}");
    assert_eq!(sent, PINGS);
    assert_eq!(answer.acks, PINGS, "{answer:?}");
    assert!(answer.goaway.is_none() && !answer.closed, "{answer:?}");

    // A flood that never reads: the proxy stops reading it once its acks fill the socket.
    let blocked = tokio::task::spawn_blocking(move || {
        let mut s = h2_connect(port);
        let sent = flood(&mut s, 5_000_000, Instant::now() + Duration::from_secs(60));
        (sent, s)
    })
    .await
    .expect("flood");
    let rss_after = testkit::fault::rss_kib(pid).expect("rss");
    eprintln!(
        "proxy, non-reading flood: {} pings written before the proxy stopped reading; RSS \
         {rss_before} -> {rss_after} KiB",
        blocked.0
    );
    assert!(
        blocked.0 < 5_000_000,
        "the proxy read 5,000,000 pings whose acks no one read"
    );
    assert!(
        rss_after < rss_before + 50 * 1024,
        "RSS {rss_before} -> {rss_after} KiB"
    );
    drop(blocked);

    stop.store(true, std::sync::atomic::Ordering::Release);
    let (worst, failed) = watcher.await.expect("victim");
    eprintln!("victim during the floods: worst round trip {worst:?}, {failed} failed");
    assert_eq!(failed, 0);
    assert!(worst < Duration::from_secs(5), "worst round trip {worst:?}");

    // Keepalive pings as clients send them never trip anything: tonic every 100 ms (with a
    // watch open) and etcdctl's own (grpc-go raises `--keepalive-time 1s` to its 10 s floor).
    let ch = tonic::transport::Endpoint::from_shared(proxy.url.clone())
        .expect("url")
        .http2_keep_alive_interval(Duration::from_millis(100))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .expect("connect");
    let etcdctl = std::process::Command::new("etcdctl")
        .args([
            "--endpoints",
            &proxy.url,
            "--keepalive-time",
            "1s",
            "--keepalive-timeout",
            "3s",
            "watch",
            "/apisix/k",
        ])
        .env("ETCDCTL_API", "3")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("etcdctl");
    let mut kv = etcd_fanout::proto::etcdserverpb::kv_client::KvClient::new(ch.clone());
    let mut watch = etcd_fanout::proto::etcdserverpb::watch_client::WatchClient::new(ch);
    let (tx, stream) = testkit::open_watch(&mut watch, "/apisix/k", "").await;
    let mut stream = stream.expect("watch");
    assert!(stream
        .message()
        .await
        .expect("created")
        .is_some_and(|m| m.created));
    // Past etcdctl's first keepalive ping (10 s) and a hundred of tonic's.
    tokio::time::sleep(Duration::from_secs(12)).await;
    put_k(&mut c, "after").await;
    let ev = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("event in time")
        .expect("stream alive")
        .expect("a message");
    assert_eq!(ev.events.len(), 1);
    kv.range(RangeRequest {
        key: "/apisix/k".into(),
        ..Default::default()
    })
    .await
    .expect("keepalive connection still serves");
    drop(tx);
    // etcdctl printed the event by now (its watch never ends on its own): stop it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut etcdctl = etcdctl;
    let _ = etcdctl.kill();
    let out = etcdctl.wait_with_output().expect("etcdctl output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("PUT") && stdout.contains("after"),
        "etcdctl watch through 12 s of keepalives: stdout {stdout:?} stderr {stderr:?}"
    );
    assert!(
        !stderr.contains("too_many_pings") && !stderr.contains("ENHANCE_YOUR_CALM"),
        "{stderr}"
    );
}
