//! What an idle downstream connection costs the proxy over TLS, against plaintext: the proxy's
//! RSS before and after opening N connections of one kind, divided by N. Kinds: an HTTP/1.1
//! keep-alive connection waiting for its next request, an HTTP/1.1 `/v3/watch` stream waiting
//! for events (APISIX's), and a gRPC connection with one Watch stream (etcd's Go client's).
//!
//! A measurement, bounded and asserted but slow, so not in the normal run:
//!
//! ```sh
//! ETCD_FANOUT_MEM_CONNS=2000 cargo test --test tls_memory -- --ignored --nocapture
//! ```

use std::io::{Read, Write};
use std::time::Duration;

use etcd_fanout::proto::etcdserverpb::watch_client::WatchClient;
use testkit::fault::rss_kib;
use testkit::tls::{self, Stream};
use testkit::{Etcd, Proxy};

/// Connections per kind.
fn conns() -> usize {
    std::env::var("ETCD_FANOUT_MEM_CONNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000)
}

/// A proxy in front of `etcd`, with a TLS listener (client certificates required) or without.
fn proxy(etcd: &Etcd, tls_on: bool) -> Proxy {
    let c = tls::certs();
    let s = |p: &std::path::Path| p.display().to_string();
    let flags: Vec<String> = if tls_on {
        vec![
            "--cert-file".into(),
            s(&c.server.cert),
            "--key-file".into(),
            s(&c.server.key),
            "--trusted-ca-file".into(),
            s(&c.ca),
        ]
    } else {
        Vec::new()
    };
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Proxy::start_with(&etcd.url, &["/apisix/"], &flags)
}

fn open_http(port: u16, tls_on: bool) -> Stream {
    if tls_on {
        tls::connect_tls(port, Some(&tls::certs().client), &[b"http/1.1"]).expect("connect")
    } else {
        Stream::Plain(std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect"))
    }
}

/// Reads until `needle` has arrived.
fn read_until(s: &mut Stream, needle: &[u8]) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(needle.len()).any(|w| w == needle) {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed before {:?}", String::from_utf8_lossy(needle));
        got.extend_from_slice(&buf[..n]);
    }
}

/// Idle keep-alive connections after one `GET /version` each.
fn http_idle(port: u16, tls_on: bool, n: usize) -> Vec<Stream> {
    (0..n)
        .map(|_| {
            let mut s = open_http(port, tls_on);
            s.write_all(b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                .expect("write");
            read_until(&mut s, b"etcdcluster");
            s
        })
        .collect()
}

/// `/v3/watch` streams of the prefix, each past its `created` message.
fn http_watching(port: u16, tls_on: bool, n: usize) -> Vec<Stream> {
    let body = r#"{"create_request":{"key":"L2FwaXNpeC8=","range_end":"L2FwaXNpeDA="}}"#;
    (0..n)
        .map(|_| {
            let mut s = open_http(port, tls_on);
            let req = format!(
                "POST /v3/watch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(req.as_bytes()).expect("write");
            read_until(&mut s, b"\"created\":true");
            s
        })
        .collect()
}

/// gRPC connections with one open Watch stream each.
async fn grpc_watching(url: &str, n: usize) -> Vec<Box<dyn std::any::Any + Send>> {
    let mut held: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    for _ in 0..n {
        let ch = testkit::channel(url).await;
        let (tx, stream) =
            testkit::open_watch(&mut WatchClient::new(ch.clone()), "/apisix/", "/apisix0").await;
        let mut stream = stream.expect("watch");
        let created = stream.message().await.expect("stream").expect("created");
        assert!(created.created);
        held.push(Box::new((ch, tx, stream)));
    }
    held
}

/// Bytes of RSS per connection that opening them added to `pid`.
fn per_conn(pid: u32, before_kib: u64, n: usize) -> u64 {
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_kib(pid).expect("rss");
    after.saturating_sub(before_kib) * 1024 / n as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored (ETCD_FANOUT_MEM_CONNS connections per kind)"]
async fn idle_connection_memory_tls_vs_plaintext() {
    let n = conns();
    let etcd = Etcd::start();
    let mut table = Vec::new();
    for tls_on in [false, true] {
        let mode = if tls_on { "TLS" } else { "plaintext" };
        // One proxy per kind, so that each delta starts from a fresh process.
        let p = proxy(&etcd, tls_on);
        let pid = p.pid().expect("pid");
        let before = rss_kib(pid).expect("rss");
        let held = tokio::task::block_in_place(|| http_idle(p.port, tls_on, n));
        table.push((mode, "HTTP/1.1 keep-alive, idle", per_conn(pid, before, n)));
        drop(held);

        let p = proxy(&etcd, tls_on);
        let pid = p.pid().expect("pid");
        let before = rss_kib(pid).expect("rss");
        let held = tokio::task::block_in_place(|| http_watching(p.port, tls_on, n));
        table.push((mode, "HTTP/1.1 /v3/watch, idle", per_conn(pid, before, n)));
        drop(held);

        let p = proxy(&etcd, tls_on);
        let pid = p.pid().expect("pid");
        let before = rss_kib(pid).expect("rss");
        let held = grpc_watching(&p.url, n).await;
        table.push((
            mode,
            "gRPC, one Watch stream, idle",
            per_conn(pid, before, n),
        ));
        drop(held);
    }
    println!("idle connections: {n} per kind; proxy RSS delta per connection");
    for (mode, kind, bytes) in &table {
        println!("  {mode:<9} {kind:<30} {bytes:>6} B");
    }
    let get = |mode: &str, kind: &str| {
        table
            .iter()
            .find(|(m, k, _)| *m == mode && k.starts_with(kind))
            .map(|(_, _, b)| *b)
            .unwrap_or(u64::MAX)
    };
    // TLS must not undo the HTTP/1.x server's no-buffer-while-idle design: rustls keeps a
    // 4 KiB record buffer and its session state per connection, nothing near hyper's 24 KiB.
    for kind in ["HTTP/1.1 keep-alive", "HTTP/1.1 /v3/watch", "gRPC"] {
        let (plain, tls) = (get("plaintext", kind), get("TLS", kind));
        assert!(
            tls <= plain + 12 * 1024,
            "{kind}: TLS {tls} B against plaintext {plain} B per connection"
        );
    }
}
