//! The HTTP watch stream (`POST /v3/watch`): differential against etcd's gateway, framing
//! (one `{"result":..}\n` message per chunk), and clients that read slowly or vanish.

use std::time::{Duration, Instant};

use testkit::gateway::{b64, mask, IDENTITY};
use testkit::http::{post, Conn};
use testkit::{metric_value, Etcd, Proxy};

struct Pair {
    _a: Etcd,
    _b: Etcd,
    _proxy: Proxy,
    a: u16,
    p: u16,
}

fn pair() -> Pair {
    let a = Etcd::start();
    let b = Etcd::start();
    let proxy = Proxy::start(&b.url, &["/apisix/"]);
    Pair {
        a: a.port,
        p: proxy.port,
        _a: a,
        _b: b,
        _proxy: proxy,
    }
}

fn put(k: &str, v: &str) -> String {
    format!(r#"{{"key":"{}","value":"{}"}}"#, b64(k), b64(v))
}

/// Writes to both sides and checks they answer alike.
fn write_both(a: u16, p: u16, path: &str, body: &str) {
    let (ra, rp) = (post(a, path, body), post(p, path, body));
    assert_eq!(
        mask(&ra.text(), IDENTITY),
        mask(&rp.text(), IDENTITY),
        "{path} {body}"
    );
}

/// An open watch stream and the messages read so far.
struct Watch {
    conn: Conn,
    pending: Vec<u8>,
    /// Chunks that did not hold exactly one message.
    pub odd_chunks: usize,
}

impl Watch {
    fn open(port: u16, body: &str) -> Watch {
        let mut conn =
            Conn::send(port, "POST", "/v3/watch", &[], body.as_bytes()).expect("open watch");
        conn.read_head().expect("watch answer head");
        Watch {
            conn,
            pending: Vec::new(),
            odd_chunks: 0,
        }
    }

    /// Reads until `n` messages arrived (or the stream ends / a read times out).
    fn messages(&mut self, n: usize, timeout: Duration) -> Vec<String> {
        self.conn.set_timeout(timeout);
        let mut out = Vec::new();
        while out.len() < n {
            let Ok(Some(chunk)) = self.conn.next_chunk() else {
                break;
            };
            let lines = chunk.iter().filter(|&&c| c == b'\n').count();
            if lines != 1 || !chunk.ends_with(b"\n") {
                self.odd_chunks += 1;
            }
            self.pending.extend_from_slice(&chunk);
            while let Some(i) = self.pending.iter().position(|&c| c == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=i).collect();
                out.push(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
            }
        }
        out
    }
}

/// Opens the same watch on both sides, runs `writes` on both, compares `n` messages.
fn same_watch(t: &Pair, body: &str, writes: &[(&str, String)], n: usize) -> Vec<String> {
    let mut wa = Watch::open(t.a, body);
    let mut wp = Watch::open(t.p, body);
    let status = (wa.conn.status, wp.conn.status);
    assert_eq!(status.0, status.1, "watch status for {body}");
    for h in ["content-type", "grpc-metadata-content-type"] {
        let find = |c: &Conn| {
            c.headers
                .iter()
                .find(|(k, _)| k == h)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(find(&wa.conn), find(&wp.conn), "header {h} for {body}");
    }
    // Let both streams register before writing.
    std::thread::sleep(Duration::from_millis(300));
    for (path, w) in writes {
        write_both(t.a, t.p, path, w);
    }
    let ma = wa.messages(n, Duration::from_secs(5));
    let mp = wp.messages(n, Duration::from_secs(5));
    let ma: Vec<String> = ma.iter().map(|m| mask(m, IDENTITY)).collect();
    let mp: Vec<String> = mp.iter().map(|m| mask(m, IDENTITY)).collect();
    assert_eq!(ma, mp, "watch {body}");
    assert_eq!(
        ma.len(),
        n,
        "etcd sent {} of {n} messages for {body}",
        ma.len()
    );
    assert_eq!(wp.odd_chunks, 0, "proxy: one message per chunk");
    // Nothing more is pending on the proxy's side.
    assert!(
        wp.messages(1, Duration::from_millis(300)).is_empty(),
        "no extra message"
    );
    mp
}

#[test]
fn watch_streams_match_etcd() {
    let t = pair();
    let (a, p) = (t.a, t.p);
    for i in 0..3 {
        write_both(
            a,
            p,
            "/v3/kv/put",
            &put(&format!("/apisix/routes/{i}"), "v0"),
        );
    }
    let prefix = format!(
        r#""key":"{}","range_end":"{}""#,
        b64("/apisix/"),
        b64("/apisix0")
    );
    // Live events with prev_kv: put, overwrite, delete, a two-key transaction.
    let txn = format!(
        r#"{{"success":[{{"requestPut":{{"key":"{}","value":"{}"}}}},{{"request_delete_range":{{"key":"{}"}}}}]}}"#,
        b64("/apisix/routes/7"),
        b64("x"),
        b64("/apisix/routes/2")
    );
    same_watch(
        &t,
        &format!(r#"{{"create_request":{{{prefix},"prev_kv":true}}}}"#),
        &[
            ("/v3/kv/put", put("/apisix/routes/5", "a")),
            ("/v3/kv/put", put("/apisix/routes/5", "b")),
            (
                "/v3/kv/deleterange",
                format!(r#"{{"key":"{}"}}"#, b64("/apisix/routes/5")),
            ),
            ("/v3/kv/txn", txn),
        ],
        5,
    );
    // History from revision 2 (batched like etcd), then live.
    same_watch(
        &t,
        &format!(r#"{{"create_request":{{{prefix},"start_revision":"2"}}}}"#),
        &[("/v3/kv/put", put("/apisix/routes/8", "c"))],
        3,
    );
    // Filters, and several requests in one body (create, create, progress, cancel).
    same_watch(
        &t,
        &format!(r#"{{"create_request":{{{prefix},"filters":["NOPUT"]}}}}"#),
        &[
            ("/v3/kv/put", put("/apisix/routes/9", "d")),
            (
                "/v3/kv/deleterange",
                format!(r#"{{"key":"{}"}}"#, b64("/apisix/routes/9")),
            ),
        ],
        2,
    );
    same_watch(
        &t,
        &format!(
            r#"{{"create_request":{{{prefix}}}}} {{"create_request":{{"key":"{}","filters":[1]}}}}
               {{"progress_request":{{}}}} {{"cancel_request":{{"watch_id":"0"}}}}"#,
            b64("/apisix/routes/1")
        ),
        &[("/v3/kv/put", put("/apisix/routes/1", "e"))],
        5,
    );
    // Refused creates: an empty range, a duplicate watch id.
    same_watch(
        &t,
        &format!(
            r#"{{"create_request":{{"key":"{}","range_end":"{}"}}}}"#,
            b64("/apisix/z"),
            b64("/apisix/a")
        ),
        &[],
        1,
    );
    same_watch(
        &t,
        &format!(
            r#"{{"create_request":{{{prefix},"watch_id":5}}}} {{"create_request":{{{prefix},"watch_id":5}}}}"#
        ),
        &[],
        2,
    );
    // Compacted start revision: canceled with the compact revision.
    write_both(
        a,
        p,
        "/v3/kv/compaction",
        r#"{"revision":"4","physical":true}"#,
    );
    std::thread::sleep(Duration::from_millis(500));
    same_watch(
        &t,
        &format!(r#"{{"create_request":{{{prefix},"start_revision":2}}}}"#),
        &[],
        2,
    );
    // Outside every cached prefix (relayed to etcd).
    same_watch(
        &t,
        &format!(r#"{{"create_request":{{"key":"{}"}}}}"#, b64("/other/k")),
        &[("/v3/kv/put", put("/other/k", "o"))],
        2,
    );
}

#[test]
fn watch_bad_and_empty_bodies() {
    let t = pair();
    // A malformed first request: 500 (code Unknown), like etcd.
    for body in ["{bad", r#"{"create_request":{"key":"!!"}}"#, "[1]"] {
        testkit::gateway::same(t.a, t.p, "POST", "/v3/watch", body);
    }
    // An empty body: etcd never answers; neither does the proxy.
    for port in [t.a, t.p] {
        let mut c = Conn::send(port, "POST", "/v3/watch", &[], b"").expect("connect");
        c.set_timeout(Duration::from_millis(800));
        assert!(c.read_head().is_err(), "no answer to an empty watch body");
        c.close();
    }
}

/// etcd answers `created` with its current store revision; the proxy answers with the
/// prefix's cache head, which lags when the latest writes were outside the prefix.
#[test]

fn created_header_is_store_revision() {
    let t = pair();
    write_both(t.a, t.p, "/v3/kv/put", &put("/apisix/routes/1", "v"));
    write_both(t.a, t.p, "/v3/kv/put", &put("/other/1", "v"));
    same_watch(
        &t,
        &format!(
            r#"{{"create_request":{{"key":"{}","range_end":"{}"}}}}"#,
            b64("/apisix/"),
            b64("/apisix0")
        ),
        &[],
        1,
    );
}

fn gauge(proxy: &Proxy, name: &str) -> f64 {
    metric_value(&proxy.metrics(), name)
}

#[test]
fn vanishing_clients_free_their_sessions() {
    let etcd = Etcd::start();
    let proxy = Proxy::start(&etcd.url, &["/apisix/"]);
    let base_upstream = gauge(&proxy, "etcd_fanout_upstream_watches");
    let cached = format!(
        r#"{{"create_request":{{"key":"{}","range_end":"{}"}}}}"#,
        b64("/apisix/"),
        b64("/apisix0")
    );
    let relayed = format!(r#"{{"create_request":{{"key":"{}"}}}}"#, b64("/other/k"));
    let mut watches = Vec::new();
    for i in 0..30 {
        let body = if i % 5 == 0 { &relayed } else { &cached };
        let mut w = Watch::open(proxy.port, body);
        assert_eq!(w.messages(1, Duration::from_secs(5)).len(), 1, "created");
        watches.push(w);
    }
    assert!(testkit::wait_until(Duration::from_secs(5), || gauge(
        &proxy,
        "etcd_fanout_watch_streams"
    ) >= 30.0));
    // No event ever flows: the proxy must notice the closed connections by itself.
    for w in watches {
        w.conn.close();
    }
    assert!(
        testkit::wait_until(Duration::from_secs(10), || {
            gauge(&proxy, "etcd_fanout_watch_streams") == 0.0
                && gauge(&proxy, "etcd_fanout_watchers") == 0.0
                && gauge(&proxy, "etcd_fanout_upstream_watches") == base_upstream
        }),
        "sessions freed: {}",
        proxy.metrics()
    );
    // Vanishing in the middle of a busy stream.
    let mut w = Watch::open(proxy.port, &cached);
    w.messages(1, Duration::from_secs(5));
    let writer = {
        let port = proxy.port;
        std::thread::spawn(move || {
            for i in 0..200 {
                post(
                    port,
                    "/v3/kv/put",
                    &put(&format!("/apisix/routes/{i}"), "x"),
                );
            }
        })
    };
    assert!(!w.messages(3, Duration::from_secs(5)).is_empty());
    w.conn.close();
    writer.join().expect("writer");
    assert!(
        testkit::wait_until(Duration::from_secs(10), || gauge(
            &proxy,
            "etcd_fanout_watch_streams"
        ) == 0.0),
        "busy session freed"
    );
    let r = post(
        proxy.port,
        "/v3/kv/range",
        &format!(
            r#"{{"key":"{}","range_end":"{}","count_only":true}}"#,
            b64("/apisix/"),
            b64("/apisix0")
        ),
    );
    assert_eq!(r.json()["count"], "200");
}

#[test]
fn slow_reader_gets_a_well_formed_complete_stream() {
    let etcd = Etcd::start();
    let proxy = Proxy::start(&etcd.url, &["/apisix/"]);
    let body = format!(
        r#"{{"create_request":{{"key":"{}","range_end":"{}"}}}}"#,
        b64("/apisix/"),
        b64("/apisix0")
    );
    let start_rev: i64 = post(
        proxy.port,
        "/v3/kv/range",
        &format!(r#"{{"key":"{}"}}"#, b64("/x")),
    )
    .json()["header"]["revision"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("revision");
    let mut slow = Watch::open(proxy.port, &body);
    let mut fast = Watch::open(proxy.port, &body);
    assert_eq!(slow.messages(1, Duration::from_secs(5)).len(), 1);
    assert_eq!(fast.messages(1, Duration::from_secs(5)).len(), 1);
    // About 4 MB of events: far more than the socket buffers hold while nobody reads.
    const N: i64 = 1500;
    let value = "v".repeat(2000);
    let port = proxy.port;
    let writer = std::thread::spawn(move || {
        for i in 0..N {
            post(
                port,
                "/v3/kv/put",
                &put(&format!("/apisix/routes/{}", i % 50), &value),
            );
        }
    });
    let last = start_rev + N;
    // The fast sibling keeps up while the slow one reads nothing.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut fast_rev = 0;
    while fast_rev < last && Instant::now() < deadline {
        for m in fast.messages(50, Duration::from_secs(10)) {
            let v: serde_json::Value = serde_json::from_str(&m).expect("fast message JSON");
            for ev in v["result"]["events"].as_array().into_iter().flatten() {
                fast_rev = ev["kv"]["mod_revision"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
            }
        }
    }
    writer.join().expect("writer");
    assert_eq!(fast_rev, last, "the fast watcher saw every revision");
    assert_eq!(fast.odd_chunks, 0);
    // Now the slow reader drains: every revision exactly once, in order, each chunk one line.
    let mut next = start_rev + 1;
    let mut header_rev = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while next <= last && Instant::now() < deadline {
        for m in slow.messages(100, Duration::from_secs(10)) {
            let v: serde_json::Value = serde_json::from_str(&m).expect("slow message JSON");
            let h: i64 = v["result"]["header"]["revision"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("header revision");
            assert!(h >= header_rev, "header.revision never goes back");
            header_rev = h;
            for ev in v["result"]["events"].as_array().expect("events") {
                let r: i64 = ev["kv"]["mod_revision"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .expect("rev");
                assert_eq!(r, next, "revisions in order, none missing or repeated");
                assert!(r <= h, "never an event beyond the header revision");
                next += 1;
            }
        }
    }
    assert_eq!(next, last + 1, "the slow watcher got everything");
    assert_eq!(slow.odd_chunks, 0, "one message per chunk");
    drop(proxy);
}
