//! Every HTTP/1.x socket has a deadline or an owner:
//! - a handler whose client leaves is dropped at once: no `CLOSE-WAIT` socket stays behind
//!   (an empty-body `POST /v3/watch`, which etcd 3.4.23 answers with nothing until the client
//!   leaves, was held for ever);
//! - a request head must arrive within `--request-header-timeout` (slowloris: partial heads,
//!   heads trickled byte by byte, connections that send nothing), while a kept-alive
//!   connection may stay idle between requests for longer;
//! - at the file-descriptor limit, failed accepts back off and are logged once per second.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::{fault, wait_http_ok, wait_until, Etcd, Proxy};

/// Sockets in `CLOSE-WAIT` whose local port is `port` (IPv4 and IPv6).
fn close_wait(port: u16) -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    let local_port = cols
                        .get(1)
                        .and_then(|a| a.rsplit(':').next())
                        .and_then(|p| u16::from_str_radix(p, 16).ok());
                    local_port == Some(port) && cols.get(3) == Some(&"08")
                })
                .map(|_| ())
                .collect::<Vec<_>>()
        })
        .count()
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
    s
}

/// True once the server has closed `s` (end of stream or reset), within `within`.
fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).ok();
    let mut b = [0u8; 256];
    let start = Instant::now();
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
        if start.elapsed() > within {
            return false;
        }
    }
}

const EMPTY_WATCHES: [&str; 2] = [
    "POST /v3/watch HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    "POST /v3/watch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
];

#[test]
fn vanished_clients_leave_no_close_wait() {
    let etcd = Etcd::start();
    let proxy = Proxy::start(&etcd.url, &["/apisix/"]);
    // etcd's answer to an empty-body watch: nothing at all while the client waits.
    for (port, who) in [(etcd.port, "etcd"), (proxy.port, "proxy")] {
        for req in EMPTY_WATCHES {
            let mut s = connect(port);
            s.write_all(req.as_bytes()).expect("send");
            s.set_read_timeout(Some(Duration::from_secs(2))).ok();
            let mut b = [0u8; 64];
            let r = s.read(&mut b);
            assert!(
                matches!(&r, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
                "{who} answered an empty-body watch: {r:?} {:?}",
                r.as_ref()
                    .ok()
                    .map(|n| String::from_utf8_lossy(&b[..*n]).to_string())
            );
        }
    }
    // 20 clients send such a request and vanish.
    let mut socks = Vec::new();
    for i in 0..20 {
        let mut s = connect(proxy.port);
        s.write_all(EMPTY_WATCHES[i % 2].as_bytes()).expect("send");
        socks.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    drop(socks);
    let clean = wait_until(Duration::from_secs(5), || close_wait(proxy.port) == 0);
    assert!(
        clean,
        "{} CLOSE-WAIT sockets on the proxy 5 s after their clients left",
        close_wait(proxy.port)
    );
    // The proxy still serves.
    wait_http_ok(proxy.port, "/readyz", Duration::from_secs(5)).expect("proxy still serves");
}

#[test]
fn partial_heads_are_closed_after_the_header_timeout() {
    let etcd = Etcd::start();
    let proxy = Proxy::start_with(
        &etcd.url,
        &["/apisix/"],
        &["--request-header-timeout", "2s"],
    );
    // A kept-alive connection may idle between requests for longer than the head timeout.
    let mut idle = connect(proxy.port);
    let get = b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n";
    idle.write_all(get).expect("send");
    let mut b = [0u8; 1024];
    assert!(idle.read(&mut b).expect("answer") > 0);

    let start = Instant::now();
    let mut slow: Vec<(TcpStream, &str)> = Vec::new();
    for i in 0..50 {
        let mut s = connect(proxy.port);
        let partial = if i % 2 == 0 {
            "POST /v3/kv/range HTTP/1.1\r\nHost: x\r\n"
        } else {
            "GET /ver"
        };
        s.write_all(partial.as_bytes()).expect("send");
        slow.push((s, "partial head"));
    }
    for _ in 0..10 {
        slow.push((connect(proxy.port), "nothing sent"));
    }
    // One more trickles a head a byte at a time, each well inside the deadline.
    let mut trickle = connect(proxy.port);
    let head = b"POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let mut trickle_closed = false;
    for &byte in head.iter() {
        if trickle.write_all(&[byte]).is_err() {
            trickle_closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if start.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    assert!(
        trickle_closed || closed_by_server(&mut trickle, Duration::from_secs(5)),
        "a head trickled byte by byte was held past its deadline"
    );
    for (i, (s, what)) in slow.iter_mut().enumerate() {
        assert!(
            closed_by_server(s, Duration::from_secs(8)),
            "connection {i} ({what}) still open {:?} after it connected",
            start.elapsed()
        );
    }

    // The idle keep-alive connection still works (idle ~5 s > 2 s head timeout).
    idle.write_all(get).expect("send after idling");
    let n = idle.read(&mut b).expect("answer after idling");
    assert!(
        String::from_utf8_lossy(&b[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&b[..n])
    );
}

#[test]
fn accept_errors_back_off_and_log_once_a_second() {
    let etcd = Etcd::start();
    let port = testkit::free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("proxy.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut child = Command::new("prlimit")
        .args(["--nofile=64:64", "--"])
        .arg(env!("CARGO_BIN_EXE_etcd-fanout"))
        .args(["--endpoints", &etcd.url, "--prefix", "/apisix/"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start etcd-fanout under prlimit");
    let pid = child.id();
    let guard = scopeguard(pid);
    wait_http_ok(port, "/readyz", Duration::from_secs(30)).expect("proxy ready");
    // Hold more connections than descriptors: the rest wait in the listen backlog and every
    // accept fails with EMFILE.
    let held: Vec<TcpStream> = (0..100)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    let held_for = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let lines = text.lines().filter(|l| l.contains("accept failed")).count();
    let seconds = held_for.elapsed().as_secs_f64();
    assert!(
        lines > 0,
        "no accept failure logged with {} held\n{text}",
        held.len()
    );
    assert!(
        (lines as f64) <= seconds + 2.0,
        "{lines} accept-failure lines in {seconds:.1} s\n{text}"
    );
    assert!(
        text.contains("failures"),
        "no failure count in the log\n{text}"
    );
    // Once descriptors are free again, the proxy serves.
    drop(held);
    wait_http_ok(port, "/readyz", Duration::from_secs(15)).expect("accepts again");
    let _ = child.kill();
    let _ = child.wait();
    drop(guard);
}

/// Kills `pid` when dropped (a failed assertion must not leave the proxy behind).
fn scopeguard(pid: u32) -> impl Drop {
    struct G(u32);
    impl Drop for G {
        fn drop(&mut self) {
            if fault::is_alive(self.0) {
                fault::signal(self.0, "KILL");
            }
        }
    }
    G(pid)
}

/// HTTP/2 keepalive as etcd's server (`--grpc-keepalive-interval`/`-timeout`): a connection
/// whose client never answers the server's PING is closed once the timeout has passed after
/// the interval, while a live client (etcd-client's, whose HTTP/2 layer answers PINGs) keeps
/// its watch across many intervals and gets its events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_keepalive_pings_close_the_connection() {
    let etcd = Etcd::start();
    let proxy = Proxy::start_with(
        &etcd.url,
        &["/apisix/"],
        &[
            "--grpc-keepalive-interval",
            "1s",
            "--grpc-keepalive-timeout",
            "2s",
        ],
    );
    let mut live = etcd_client::Client::connect([proxy.url.as_str()], None)
        .await
        .expect("connect");
    let mut events = live
        .watch(
            "/apisix/",
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await
        .expect("watch");

    // The HTTP/2 preface and an empty SETTINGS frame, then nothing: no SETTINGS ack, no PING
    // ack.
    let port = proxy.port;
    let stalled = tokio::task::spawn_blocking(move || {
        let mut s = connect(port);
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .expect("preface");
        let start = Instant::now();
        let closed = closed_by_server(&mut s, Duration::from_secs(30));
        (closed, start.elapsed())
    });
    let (closed, after) = stalled.await.expect("stalled client");
    assert!(
        closed,
        "a client that never answers PINGs kept its connection for 30 s"
    );
    assert!(
        after >= Duration::from_millis(2500),
        "closed after {after:?}, before interval + timeout"
    );

    // The live client's watch outlived several intervals.
    let mut direct = etcd_client::Client::connect([etcd.url.as_str()], None)
        .await
        .expect("connect etcd");
    direct.put("/apisix/k", "v", None).await.expect("put");
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let r = events
                .message()
                .await
                .expect("watch stream alive")
                .expect("a response");
            if !r.events().is_empty() {
                return r;
            }
        }
    })
    .await
    .expect("an event within 10 s");
    assert_eq!(got.events().len(), 1, "{got:?}");
}
