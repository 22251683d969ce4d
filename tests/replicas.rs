//! The replica tier behaves as one etcd for a client that moves between replicas (issue 13
//! item 1): an APISIX-style HTTP client sends every request to the next of three replicas in
//! turn (lua-resty-etcd round-robins per request), one replica is held behind etcd by a
//! fault-injecting relay that stalls its upstream connection again and again, and a writer
//! keeps etcd moving (also outside the prefix, so header revisions run ahead of the events).
//! Every revision of the prefix must reach the client exactly once, in order, and no header
//! revision (watch `created`, events, linearizable ranges) may be lower than one the client
//! was already shown by any replica (APISIX >= 3.12 takes that as an etcd restart and
//! resyncs everything). Serializable ranges may be stale, as on an etcd follower: not checked.
//!
//! Real etcd and etcd-fanout processes on loopback; bounded in count and time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_fanout::proto::etcdserverpb::{
    kv_client::KvClient, watch_client::WatchClient, watch_request::RequestUnion, PutRequest,
    WatchCreateRequest, WatchRequest, WatchResponse,
};
use testkit::fault::Relay;
use testkit::gateway::b64;
use testkit::http::{request, Conn};
use testkit::{range_end, Etcd, Proxy};

/// Writes the writer makes; every third lands outside the prefix.
const WRITES: usize = 150;

fn header_revision(v: &serde_json::Value) -> i64 {
    v["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// What the client saw.
#[derive(Default)]
struct Client {
    /// Highest header revision any replica has shown.
    max_seen: i64,
    /// Revisions of every event received, in order.
    events: Vec<i64>,
    /// Headers lower than one already shown: (what, port, header, max seen before).
    regressions: Vec<String>,
    /// Requests made.
    requests: usize,
}

impl Client {
    fn header(&mut self, what: &str, port: u16, rev: i64) {
        if rev < self.max_seen {
            self.regressions.push(format!(
                "{what} on :{port}: header {rev} < {} already seen",
                self.max_seen
            ));
        }
        self.max_seen = self.max_seen.max(rev);
    }

    /// A linearizable range of the prefix, as APISIX's readdir sends it.
    fn range(&mut self, port: u16, prefix: &str) -> Result<(), String> {
        let body = format!(
            r#"{{"key":"{}","range_end":"{}"}}"#,
            b64(prefix),
            b64(&String::from_utf8_lossy(&range_end(prefix)))
        );
        let r = request(port, "POST", "/v3/kv/range", &[], body.as_bytes())?;
        self.requests += 1;
        if r.status != 200 {
            return Err(format!(
                "range on :{port}: status {} {}",
                r.status,
                r.text()
            ));
        }
        let rev = header_revision(&r.json());
        self.header("linearizable range", port, rev);
        Ok(())
    }

    /// A watch from the last revision received + 1, read for at most `window` or until an
    /// event arrived, then closed (the next request goes to the next replica).
    fn watch(
        &mut self,
        port: u16,
        prefix: &str,
        start: i64,
        window: Duration,
    ) -> Result<(), String> {
        let body = format!(
            r#"{{"create_request":{{"key":"{}","range_end":"{}","start_revision":"{start}"}}}}"#,
            b64(prefix),
            b64(&String::from_utf8_lossy(&range_end(prefix)))
        );
        let mut c = Conn::send(port, "POST", "/v3/watch", &[], body.as_bytes())?;
        self.requests += 1;
        c.set_timeout(Duration::from_secs(10));
        c.read_head()?;
        if c.status != 200 {
            return Err(format!("watch on :{port}: status {}", c.status));
        }
        c.set_timeout(Duration::from_millis(100));
        let until = Instant::now() + window;
        let mut created = false;
        while Instant::now() < until || !created {
            match c.next_chunk() {
                Ok(None) => return Err(format!("watch on :{port} ended")),
                Ok(Some(ch)) => {
                    let v: serde_json::Value =
                        serde_json::from_slice(&ch).map_err(|e| format!("bad chunk: {e}"))?;
                    let res = &v["result"];
                    if res.is_null() {
                        return Err(format!("watch on :{port}: {v}"));
                    }
                    let what = if res["created"] == true {
                        "watch created"
                    } else {
                        "watch response"
                    };
                    created = true;
                    self.header(what, port, header_revision(res));
                    let events = res["events"].as_array().cloned().unwrap_or_default();
                    for e in &events {
                        let rev = e["kv"]["mod_revision"]
                            .as_str()
                            .and_then(|r| r.parse().ok())
                            .unwrap_or(-1);
                        self.events.push(rev);
                    }
                    if !events.is_empty() {
                        break;
                    }
                }
                Err(e) if e.contains("timed out") || e.contains("temporarily unavailable") => {
                    if !created && Instant::now() > until + Duration::from_secs(10) {
                        return Err(format!("watch on :{port}: no created in 10 s"));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        c.close();
        Ok(())
    }
}

#[test]
fn round_robin_client_never_sees_a_revision_go_back() {
    let rt = testkit::runtime();
    rt.block_on(async {
        let prefix = "/rr/";
        let etcd = Etcd::start();
        let mut kv = KvClient::new(testkit::channel(&etcd.url).await);
        let base = kv
            .put(PutRequest {
                key: Bytes::from_static(b"/rr/seed"),
                value: Bytes::from_static(b"0"),
                ..Default::default()
            })
            .await
            .expect("seed")
            .into_inner()
            .header
            .map_or(0, |h| h.revision);
        let relay = Arc::new(Relay::start(etcd.port));
        let a = Proxy::start(&etcd.url, &[prefix]);
        let b = Proxy::start(&etcd.url, &[prefix]);
        let c = Proxy::start(&relay.url, &[prefix]);
        let ports = [a.port, b.port, c.port];

        let done = Arc::new(AtomicBool::new(false));
        // Holds replica C behind: its upstream stalls 1.2 s out of every 2 s.
        let faults = {
            let (relay, done) = (relay.clone(), done.clone());
            tokio::spawn(async move {
                let mut stalls = 0;
                while !done.load(Ordering::Acquire) && stalls < 30 {
                    relay.stall();
                    stalls += 1;
                    tokio::time::sleep(Duration::from_millis(1200)).await;
                    relay.pass();
                    tokio::time::sleep(Duration::from_millis(800)).await;
                }
                relay.pass();
                stalls
            })
        };
        let writer = tokio::spawn(async move {
            let mut in_prefix = Vec::new();
            for i in 0..WRITES {
                let key = if i % 3 == 2 {
                    format!("/other/{i}")
                } else {
                    format!("/rr/k{}", i % 11)
                };
                let r = kv
                    .put(PutRequest {
                        key: Bytes::from(key.clone()),
                        value: Bytes::from(format!("v{i}")),
                        ..Default::default()
                    })
                    .await
                    .expect("writer put");
                if key.starts_with("/rr/") {
                    in_prefix.push(r.into_inner().header.map_or(0, |h| h.revision));
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            in_prefix
        });
        let want = WRITES - WRITES / 3;
        let client = tokio::task::spawn_blocking(move || {
            let mut cl = Client::default();
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut errors = Vec::new();
            let mut i = 0;
            while cl.events.len() < want && Instant::now() < deadline && errors.len() < 5 {
                let port = ports[i % ports.len()];
                let r = if i % 4 == 3 {
                    cl.range(port, prefix)
                } else {
                    let start = cl.events.last().copied().unwrap_or(base) + 1;
                    cl.watch(port, prefix, start, Duration::from_millis(300))
                };
                if let Err(e) = r {
                    errors.push(e);
                }
                i += 1;
            }
            (cl, errors)
        });
        let written = writer.await.expect("writer");
        let (cl, errors) = client.await.expect("client");
        done.store(true, Ordering::Release);
        let stalls = faults.await.expect("faults");
        eprintln!(
            "round robin over 3 replicas (one stalled {stalls} times): {} requests, {} events, \
             max header {}, {} regressions, errors {errors:?}",
            cl.requests,
            cl.events.len(),
            cl.max_seen,
            cl.regressions.len()
        );
        assert!(errors.is_empty(), "client errors: {errors:?}");
        assert!(
            cl.regressions.is_empty(),
            "header revisions went backwards:\n{}",
            cl.regressions.join("\n")
        );
        assert_eq!(
            cl.events, written,
            "every revision of the prefix exactly once, in order"
        );
    });
}

/// One watch's responses, checked as a client that resumes from headers (APISIX) relies on
/// them: after `created`, headers never go down nor below `created`'s, no response carries
/// an event at or below a header an earlier (non-`created`) response showed, every event is
/// at or below its own response's header, and the events are exactly etcd's revisions of the
/// prefix from the watch's start, in order. Returns the violations.
fn check_watch(name: &str, responses: &[WatchResponse], start: i64, want: &[i64]) -> Vec<String> {
    let mut bad = Vec::new();
    let Some(first) = responses.first() else {
        return vec![format!("{name}: no response")];
    };
    if !first.created {
        bad.push(format!("{name}: first response not created: {first:?}"));
    }
    let created = first.header.map_or(0, |h| h.revision);
    let mut shown = 0;
    let mut got = Vec::new();
    for (i, r) in responses.iter().enumerate().skip(1) {
        let header = r.header.map_or(0, |h| h.revision);
        if header < created || header < shown {
            bad.push(format!(
                "{name}: response {i} header {header} below created {created} / earlier {shown}"
            ));
        }
        for ev in &r.events {
            let rev = ev.kv.as_ref().map_or(0, |kv| kv.mod_revision);
            if rev <= shown {
                bad.push(format!(
                    "{name}: response {i} event at {rev} after a header at {shown} (revision again)"
                ));
            }
            if rev > header {
                bad.push(format!(
                    "{name}: response {i} event at {rev} above its header {header}"
                ));
            }
            if got.last() != Some(&rev) {
                got.push(rev);
            }
        }
        shown = shown.max(header);
    }
    let want: Vec<i64> = want.iter().copied().filter(|r| *r >= start).collect();
    if got != want {
        bad.push(format!("{name}: events at {got:?}, etcd has {want:?}"));
    }
    bad
}

/// A cached watch's `created` carries etcd's current revision, which can be ahead of the
/// cache: its next responses must wait for the cache to get there, or a response would carry
/// that header before the events up to it ("revision N again" for a client resuming from the
/// header). Reproduced deterministically: the proxy has two etcd endpoints (relays), the one
/// carrying its upstream watch is stalled while etcd is written directly, so the proxy learns
/// etcd's revision through the other endpoint (sync checks, the compaction poll) while its
/// cache stays behind; watches from a past revision are created then. The same watches made on
/// etcd directly are checked the same way (the oracle).
#[test]
fn responses_after_created_wait_for_the_cache() {
    let rt = testkit::runtime();
    rt.block_on(async {
        let prefix = "/hw/";
        let etcd = Etcd::start();
        let mut kv = KvClient::new(testkit::channel(&etcd.url).await);
        let value = Bytes::from(vec![b'v'; 20_000]);
        let mut put =
            async |i: usize| testkit::put_value(&mut kv, format!("/hw/k{}", i % 7), &value).await;
        let base = put(0).await;
        let (r1, r2) = (Relay::start(etcd.port), Relay::start(etcd.port));
        let endpoints = format!("{},{}", r1.url, r2.url);
        let proxy = Proxy::start_with(&endpoints, &[prefix], &["--sync-timeout", "500ms"]);
        // Which relay carries the upstream watch: the one the events flow through.
        let down = |r: &Relay| r.stats.down_bytes.load(Ordering::Relaxed);
        let (d1, d2) = (down(&r1), down(&r2));
        let mut revs = vec![base];
        for i in 1..=20 {
            revs.push(put(i).await);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (g1, g2) = (down(&r1) - d1, down(&r2) - d2);
        assert!(
            g1.max(g2) > 400_000,
            "no relay carried the events ({g1}, {g2})"
        );
        let watch_relay = if g1 > g2 { &r1 } else { &r2 };

        let stalled_at = *revs.last().unwrap_or(&0);
        watch_relay.stall();
        for i in 21..=30 {
            revs.push(put(i).await);
        }
        let start = revs[5];
        static FINAL: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(-1);
        let open = |url: String, name: String| async move {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let _ = tx.send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key: Bytes::from_static(b"/hw/"),
                    range_end: range_end("/hw/"),
                    start_revision: start,
                    ..Default::default()
                })),
            });
            let mut w = WatchClient::new(testkit::channel(&url).await);
            let stream = w
                .watch(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
                .await
                .expect("watch")
                .into_inner();
            (name, tx, stream)
        };
        // Reads a watch until it has FINAL (once set), for 30 s at most.
        let collect = |(name, tx, mut stream): (
            String,
            tokio::sync::mpsc::UnboundedSender<WatchRequest>,
            tonic::Streaming<WatchResponse>,
        )| {
            tokio::spawn(async move {
                let _tx = tx;
                let mut got: Vec<WatchResponse> = Vec::new();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                let mut last = 0;
                while tokio::time::Instant::now() < deadline {
                    let fin = FINAL.load(Ordering::Acquire);
                    if fin > 0 && last >= fin {
                        break;
                    }
                    match tokio::time::timeout(Duration::from_millis(200), stream.message()).await {
                        Ok(Ok(Some(r))) => {
                            last = r
                                .events
                                .iter()
                                .filter_map(|e| e.kv.as_ref().map(|kv| kv.mod_revision))
                                .fold(last, i64::max);
                            got.push(r);
                        }
                        Ok(_) => break,
                        Err(_) => {}
                    }
                }
                (name, got)
            })
        };
        let mut watchers = vec![collect(
            open(etcd.url.clone(), "etcd watch".to_string()).await,
        )];
        // Creates spread over the stall, with writes between them: the proxy learns etcd's
        // revision through the other endpoint meanwhile (sync checks, its one-second
        // compaction poll) while its cache stays behind.
        for i in 0..8 {
            watchers.push(collect(
                open(proxy.url.clone(), format!("proxy watch {i}")).await,
            ));
            revs.push(put(31 + i).await);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        watch_relay.pass();
        for i in 41..=50 {
            revs.push(put(i).await);
        }
        FINAL.store(*revs.last().unwrap_or(&0), Ordering::Release);
        let mut bad = Vec::new();
        // The scenario happened: some proxy watch was created at a revision its cache (stalled
        // after `stalled_at`) did not have yet.
        let mut ahead = 0;
        for w in watchers {
            let (name, got) = w.await.expect("watcher");
            let created = got.first().and_then(|r| r.header).map_or(0, |h| h.revision);
            if name.starts_with("proxy") && created > stalled_at {
                ahead += 1;
            }
            bad.extend(check_watch(&name, &got, start, &revs));
        }
        assert!(ahead > 0, "no proxy watch was created ahead of its cache");
        assert!(
            bad.is_empty(),
            "watch responses after created:\n{}",
            bad.join("\n")
        );
        drop(proxy);
    });
}

/// `etcdctl` (etcd's Go client) with `args` against `endpoints`; its standard output.
fn etcdctl(endpoints: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoints, "--command-timeout", "5s"])
        .args(args)
        .output()
        .map_err(|e| format!("run etcdctl: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The client URLs `etcdctl member list` shows through `endpoint`, sorted, and whether the
/// answer carried a header.
fn member_urls(endpoint: &str) -> Result<(Vec<String>, bool), String> {
    let out = etcdctl(endpoint, &["member", "list", "-w", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
    let mut urls: Vec<String> = v["members"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|m| m["clientURLs"].as_array().cloned().unwrap_or_default())
        .filter_map(|u| u.as_str().map(str::to_string))
        .collect();
    urls.sort();
    Ok((urls, v.get("header").is_some()))
}

/// An `etcd grpc-proxy start` process, killed on drop.
struct GrpcProxy(std::process::Child);

impl Drop for GrpcProxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (at most `within`) until `member list` through `endpoint` shows exactly `want`.
fn wait_members(endpoint: &str, want: &[&str], within: Duration) -> Result<Duration, String> {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    let t0 = Instant::now();
    loop {
        let got = member_urls(endpoint);
        if got.as_ref().is_ok_and(|(urls, _)| *urls == want) {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > within {
            return Err(format!(
                "member list through {endpoint}: {got:?}, want {want:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Discovery as `etcd grpc-proxy` does it (issue 13 item 3): two replicas and a real
/// `etcd grpc-proxy` register under one `--resolver-prefix`; `etcdctl member list` through
/// either replica lists the three proxies (not etcd), and the grpc-proxy lists the replicas
/// too (same registration format). A replica killed with SIGKILL drops out after its lease
/// TTL; one sent SIGTERM drops out at once (its lease is revoked when it starts draining).
#[test]
fn discovery_lists_the_replicas() {
    let etcd = Etcd::start();
    let (pa, pb, pg) = (
        testkit::free_port(),
        testkit::free_port(),
        testkit::free_port(),
    );
    let (ua, ub, ug) = (
        format!("http://127.0.0.1:{pa}"),
        format!("http://127.0.0.1:{pb}"),
        format!("http://127.0.0.1:{pg}"),
    );
    let flags = |url: &str, ttl: &'static str| {
        vec![
            "--advertise-client-url".to_string(),
            url.to_string(),
            "--resolver-prefix".to_string(),
            "/fanout-replicas".to_string(),
            "--resolver-ttl".to_string(),
            ttl.to_string(),
            "--shutdown-delay".to_string(),
            "2s".to_string(),
        ]
    };
    let fa = flags(&ua, "30");
    let fb = flags(&ub, "3");
    let a = Proxy::start_on(
        pa,
        &etcd.url,
        &["/d/"],
        &fa.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut b = Proxy::start_on(
        pb,
        &etcd.url,
        &["/d/"],
        &fb.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let _g = GrpcProxy(
        std::process::Command::new("etcd")
            .args(["grpc-proxy", "start", "--endpoints", &etcd.url])
            .args(["--listen-addr", &format!("127.0.0.1:{pg}")])
            .args(["--advertise-client-url", &ug])
            .args([
                "--resolver-prefix",
                "/fanout-replicas",
                "--resolver-ttl",
                "30",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start etcd grpc-proxy"),
    );
    let all = [ua.as_str(), ub.as_str(), ug.as_str()];
    for through in [&a.url, &b.url] {
        wait_members(through, &all, Duration::from_secs(15)).unwrap();
    }
    // grpc-proxy reads the replicas' registrations as its own kind.
    wait_members(&ug, &all, Duration::from_secs(15)).unwrap();
    let (_, header) = member_urls(&a.url).unwrap();
    assert!(
        header,
        "the replica's MemberList answer must carry a header, as etcd's"
    );
    // etcd itself still lists its own member only.
    let (etcd_urls, _) = member_urls(&etcd.url).unwrap();
    assert_eq!(etcd_urls, vec![etcd.url.clone()]);

    // SIGKILL: B drops out after its lease TTL (3 s).
    b.kill();
    let took = wait_members(&a.url, &[&ua, &ug], Duration::from_secs(15)).unwrap();
    eprintln!("discovery: a killed replica left the member list after {took:?} (TTL 3 s)");

    // SIGTERM: A deregisters at once (its TTL is 30 s), while it still serves during the delay.
    let pid = testkit::fault::proxy_pid(a.port).expect("proxy pid");
    testkit::fault::signal(pid, "TERM");
    let t0 = Instant::now();
    let left = testkit::wait_until(Duration::from_secs(5), || {
        etcdctl(
            &etcd.url,
            &["get", "--prefix", "/fanout-replicas/", "--keys-only"],
        )
        .is_ok_and(|out| !out.contains(&ua))
    });
    assert!(left, "a draining replica must deregister at once");
    eprintln!(
        "discovery: a terminating replica deregistered after {:?}",
        t0.elapsed()
    );
    // (etcd 3.4's grpc-proxy itself keeps listing replicas whose registrations are gone: it
    // misses deletes. Not checked through it.)
}

/// etcd-fanout's `sync_check` requests to etcd so far.
fn sync_checks(proxy: &Proxy) -> f64 {
    proxy
        .metrics()
        .lines()
        .filter(|l| {
            l.starts_with("etcd_fanout_upstream_requests_total{") && l.contains("\"sync_check\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// A reconnect storm as etcd's Go client makes it: streams that each create their watches one
/// after another (the next create sent once the previous `created` arrived) on four prefixes,
/// while a writer keeps moving etcd outside every prefix, so every cache head lags etcd's
/// revision and every backlog has to be proven complete before it is sent. Each `created`
/// header is at least the revision the writer last got from etcd before the create was sent
/// (one the client could have been shown by another replica); every watch gets its prefix's
/// events exactly once, in order, after its `created`; and the creates share the replica's
/// clock rounds (one in flight for all prefixes): fewer sync-check requests to etcd than
/// creates.
#[test]
fn sequential_creates_share_rounds_and_keep_the_header_rule() {
    sequential_creates(false);
}

/// The same storm through two tiers (etcd <- one upper replica <- three lower replicas, the
/// streams spread over the lower ones): the same header rule and events, and fewer sync-check
/// requests from the lower replicas than creates. The Range requests etcd answered are
/// printed, not bounded: each lower clock round and backlog probe still costs etcd about one
/// (the upper replica forwards the rounds and answers the probes after a check of its own).
#[test]
fn two_tier_creates_keep_the_header_rule() {
    sequential_creates(true);
}

/// [`sequential_creates_share_rounds_and_keep_the_header_rule`], on one replica or through
/// two tiers (`tiers`).
fn sequential_creates(tiers: bool) {
    const STREAMS: usize = 16;
    const PER_STREAM: usize = 20;
    let rt = testkit::runtime();
    rt.block_on(async {
        let prefixes = ["/st0/", "/st1/", "/st2/", "/st3/"];
        let etcd = Etcd::start();
        let mut kv = KvClient::new(testkit::channel(&etcd.url).await);
        let mut revs: Vec<Vec<i64>> = vec![Vec::new(); prefixes.len()];
        for i in 0..5 {
            for (p, prefix) in prefixes.iter().enumerate() {
                let r = kv
                    .put(PutRequest {
                        key: Bytes::from(format!("{prefix}k{i}")),
                        value: Bytes::from_static(b"v"),
                        ..Default::default()
                    })
                    .await
                    .expect("put")
                    .into_inner();
                revs[p].push(r.header.map_or(0, |h| h.revision));
            }
        }
        let upper = tiers.then(|| Proxy::start(&etcd.url, &prefixes));
        let proxies: Vec<Proxy> = match &upper {
            None => vec![Proxy::start(&etcd.url, &prefixes)],
            Some(u) => (0..3).map(|_| Proxy::start(&u.url, &prefixes)).collect(),
        };
        let checks_before: f64 = proxies.iter().map(sync_checks).sum();
        let etcd_ranges = || {
            let text = testkit::http_get(etcd.port, "/metrics").map_or(String::new(), |r| r.1);
            text.lines()
                .filter(|l| {
                    l.starts_with("grpc_server_handled_total{")
                        && l.contains("grpc_method=\"Range\"")
                })
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum::<f64>()
        };
        let ranges_before = etcd_ranges();
        let seen = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (seen, stop, mut kv) = (seen.clone(), stop.clone(), kv.clone());
            tokio::spawn(async move {
                for i in 0..5_000 {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    if let Ok(r) = kv
                        .put(PutRequest {
                            key: Bytes::from(format!("/outside/k{}", i % 10)),
                            value: Bytes::from_static(b"v"),
                            ..Default::default()
                        })
                        .await
                    {
                        let rev = r.into_inner().header.map_or(0, |h| h.revision);
                        seen.fetch_max(rev, Ordering::AcqRel);
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        };
        while seen.load(Ordering::Acquire) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let started = Instant::now();
        let mut tasks = Vec::new();
        for s in 0..STREAMS {
            let (seen, url) = (seen.clone(), proxies[s % proxies.len()].url.clone());
            let p = s % prefixes.len();
            let (prefix, want) = (prefixes[p], revs[p].clone());
            tasks.push(tokio::spawn(async move {
                let mut bad = Vec::new();
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                let mut w = WatchClient::new(testkit::channel(&url).await);
                let mut stream = w
                    .watch(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
                    .await
                    .expect("watch")
                    .into_inner();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                let mut events: std::collections::BTreeMap<i64, Vec<i64>> = Default::default();
                let mut created = 0;
                let next = async |stream: &mut tonic::Streaming<WatchResponse>| {
                    match tokio::time::timeout_at(deadline, stream.message()).await {
                        Ok(Ok(Some(r))) => Some(r),
                        _ => None,
                    }
                };
                for _ in 0..PER_STREAM {
                    let shown = seen.load(Ordering::Acquire);
                    let _ = tx.send(WatchRequest {
                        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                            key: Bytes::from(prefix),
                            range_end: range_end(prefix),
                            start_revision: want[0],
                            ..Default::default()
                        })),
                    });
                    loop {
                        let Some(r) = next(&mut stream).await else {
                            bad.push(format!("{prefix}: stream ended or timed out"));
                            return bad;
                        };
                        let ev = r.events.iter().filter_map(|e| e.kv.as_ref());
                        events
                            .entry(r.watch_id)
                            .or_default()
                            .extend(ev.map(|kv| kv.mod_revision));
                        if r.created {
                            created += 1;
                            let h = r.header.map_or(0, |h| h.revision);
                            if h < shown {
                                bad.push(format!(
                                    "{prefix}: created header {h} below {shown}, shown before"
                                ));
                            }
                            break;
                        }
                    }
                }
                while events.values().filter(|e| e.len() >= want.len()).count() < created {
                    let Some(r) = next(&mut stream).await else {
                        break;
                    };
                    let ev = r.events.iter().filter_map(|e| e.kv.as_ref());
                    events
                        .entry(r.watch_id)
                        .or_default()
                        .extend(ev.map(|kv| kv.mod_revision));
                }
                if events.len() != PER_STREAM {
                    bad.push(format!(
                        "{prefix}: {} watches, want {PER_STREAM}",
                        events.len()
                    ));
                }
                for (id, got) in events {
                    if got != want {
                        bad.push(format!(
                            "{prefix} watch {id}: events {got:?}, want {want:?}"
                        ));
                    }
                }
                drop(tx);
                bad
            }));
        }
        let mut bad = Vec::new();
        for t in tasks {
            bad.extend(t.await.expect("stream task"));
        }
        let took = started.elapsed();
        stop.store(true, Ordering::Release);
        let _ = writer.await;
        let checks = proxies.iter().map(sync_checks).sum::<f64>() - checks_before;
        let ranges = etcd_ranges() - ranges_before;
        let creates = STREAMS * PER_STREAM;
        eprintln!(
            "{creates} sequential creates on {} replica(s) in {took:?}: {checks} sync-check \
             requests from them, {ranges} Range requests answered by etcd",
            proxies.len()
        );
        assert!(bad.is_empty(), "{}", bad.join("\n"));
        assert!(
            checks < creates as f64,
            "{checks} sync-check requests for {creates} creates"
        );
    });
}
