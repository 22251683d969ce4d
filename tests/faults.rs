//! Fault-injection tests (issue 4): a watcher through etcd-fanout sees every revision exactly
//! once, in order, or an etcd-legal cancel, whatever happens upstream or to the proxy.
//!
//! Every test runs real etcd and etcd-fanout processes on loopback, injects faults (SIGKILL of
//! etcd, of a cluster's leader, of the proxy; a TCP relay between proxy and etcd that stalls,
//! drops, resets or refuses; compaction while the proxy is cut off; clients that never read;
//! SIGTERM), then compares what every downstream watcher received with etcd's own history
//! using `testkit::checker`. The tests take a global lock and run one at a time (they are
//! timing-sensitive and the CI machine has two cores); each is bounded to 60 s once it runs.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_fanout::proto::etcdserverpb::{
    kv_client::KvClient, watch_client::WatchClient, watch_request::RequestUnion, CompactionRequest,
    PutRequest, RangeRequest, WatchCreateRequest, WatchRequest, WatchResponse,
};
use testkit::checker::{check, check_all, etcd_revision, wait_done, History, Outcome, Recorder};
use testkit::cluster::Cluster;
use testkit::fault::{is_alive, proxy_pid, proxy_port_for_endpoint, rss_kib, signal, Relay};
use testkit::watchers::{lazy_channel, IdleStream, Log, Spec, Stream, Writer, WriterOpts};
use testkit::{metric_value, Etcd, Proxy};
use tonic::transport::{Channel, Endpoint};

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs one fault test: one at a time (a global lock), on its own runtime, within the bound.
fn serial_test(name: &str, body: impl Future<Output = ()>) {
    let _serial: MutexGuard<'static, ()> = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(bounded(name, body));
}

/// Upper bound of every test once it holds the lock.
const TEST_BOUND: Duration = Duration::from_secs(60);

/// Runs a test body within [`TEST_BOUND`] (`ETCD_FANOUT_TEST_BOUND_SECS` overrides it for
/// longer manual runs).
async fn bounded<T>(name: &str, f: impl Future<Output = T>) -> T {
    let bound = Duration::from_secs(env_or("ETCD_FANOUT_TEST_BOUND_SECS", TEST_BOUND.as_secs()));
    match tokio::time::timeout(bound, f).await {
        Ok(v) => v,
        Err(_) => panic!("{name}: exceeded its {bound:?} bound"),
    }
}

/// Runs a blocking harness call (process start, kill, restart) off the runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

fn restarts(proxy: &Proxy) -> f64 {
    metric_value(
        &proxy.metrics(),
        "etcd_fanout_upstream_watch_restarts_total",
    )
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// The usual mix of watches on `prefix`, spread over `streams` streams (several watches per
/// stream, as clientv3 multiplexes them): the whole prefix from now, the whole prefix from
/// revision `past` (a replay), one key, and a sub-range.
fn watch_mix(prefix: &str, past: i64, streams: usize) -> Vec<Vec<Spec>> {
    let mut out = Vec::new();
    for s in 0..streams {
        let mut specs = vec![
            Spec::prefix(format!("s{s}/prefix-now"), prefix, 0),
            Spec::range(
                format!("s{s}/key"),
                &format!("{prefix}k{:03}", s % 10),
                "",
                0,
            ),
        ];
        if s % 2 == 0 {
            specs.push(Spec::prefix(
                format!("s{s}/prefix-from-{past}"),
                prefix,
                past,
            ));
        } else {
            specs.push(Spec::range(
                format!("s{s}/sub"),
                &format!("{prefix}k000"),
                &format!("{prefix}k010"),
                0,
            ));
        }
        out.push(specs);
    }
    out
}

/// [`watch_mix`] for watchers that join after the faults (names start with `late/`).
fn late_mix(prefix: &str, past: i64, streams: usize) -> Vec<Vec<Spec>> {
    let mut mix = watch_mix(prefix, past, streams);
    for specs in &mut mix {
        for s in specs {
            s.name = format!("late/{}", s.name);
        }
    }
    mix
}

/// Opens every stream of `mix` over a few channels to `url`; waits until all are created.
async fn open_streams(url: &str, mix: Vec<Vec<Spec>>, reconnect: bool) -> Vec<Stream> {
    let channels: Vec<Channel> = (0..4).map(|_| lazy_channel(url)).collect();
    let streams: Vec<Stream> = mix
        .into_iter()
        .enumerate()
        .map(|(i, specs)| Stream::spawn(channels[i % channels.len()].clone(), specs, reconnect))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    while streams
        .iter()
        .any(|s| s.established.load(std::sync::atomic::Ordering::Relaxed) == 0)
    {
        assert!(
            Instant::now() < deadline,
            "watch streams not established in 15 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    streams
}

fn logs_of(streams: &[Stream]) -> Vec<Log> {
    streams
        .iter()
        .flat_map(|s| s.logs.iter().cloned())
        .collect()
}

/// Waits for every watch to have etcd's history up to etcd's current revision, then checks
/// each one. `history` is fetched from `etcd_url` with a watch from revision 1 unless given.
/// `strict_streams`: the downstream streams must never have broken (faults upstream must be
/// invisible to clients).
async fn verify(
    what: &str,
    etcd_url: &str,
    logs: &[Log],
    history: Option<History>,
    wait: Duration,
    strict_streams: bool,
    proxy_log: impl Fn() -> String,
) -> (History, i64, Duration) {
    let until = etcd_revision(etcd_url).await.expect("etcd revision");
    let hist = match history {
        Some(h) => h,
        None => History::fetch(etcd_url, until).await.expect("etcd history"),
    };
    let waited = wait_done(logs, &hist, until, wait).await;
    let (mut errs, _) = check_all(logs, &hist, until);
    if strict_streams {
        for l in logs {
            let l = l.lock().unwrap();
            if !l.errors.is_empty() {
                errs.push(format!(
                    "{}: downstream stream broke although only upstream failed: {:?}",
                    l.name,
                    &l.errors[..l.errors.len().min(3)]
                ));
            }
        }
    }
    if let Err(e) = &waited {
        errs.insert(0, e.clone());
    }
    if !errs.is_empty() {
        panic!(
            "{what}: {} of {} watches failed (etcd revision {until}, {} events in history):\n  {}\n--- proxy log (tail) ---\n{}",
            errs.len(),
            logs.len(),
            hist.events.len(),
            errs.iter().take(12).cloned().collect::<Vec<_>>().join("\n  "),
            tail(&proxy_log(), 40)
        );
    }
    let events: usize = logs.iter().map(|l| l.lock().unwrap().events.len()).sum();
    let took = waited.unwrap_or_default();
    eprintln!(
        "{what}: {} watches verified up to revision {until}: {events} events delivered, last \
         delivered {took:?} after the check started",
        logs.len()
    );
    (hist, until, took)
}

async fn start_etcd() -> Etcd {
    blocking(Etcd::start).await
}

async fn start_proxy(endpoints: &str, prefixes: &[&str], extra: &[&str]) -> Proxy {
    let endpoints = endpoints.to_string();
    let prefixes: Vec<String> = prefixes.iter().map(|s| s.to_string()).collect();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    blocking(move || {
        let p: Vec<&str> = prefixes.iter().map(String::as_str).collect();
        let e: Vec<&str> = extra.iter().map(String::as_str).collect();
        Proxy::start_with(&endpoints, &p, &e)
    })
    .await
}

async fn wait_acked(w: &Writer, n: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while w.acked() < n {
        assert!(
            Instant::now() < deadline,
            "writer stuck at {} of {n} writes",
            w.acked()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A seeded etcd behind a fault-injecting relay, the proxy in front of the relay, 12 watches
/// on 2 streams, and a writer (one put every `pace`) that already had 50 puts acknowledged.
struct RelayRig {
    etcd: Etcd,
    relay: Relay,
    proxy: Proxy,
    streams: Vec<Stream>,
    writer: Writer,
}

async fn relay_rig(prefix: &str, pace: Duration) -> RelayRig {
    let etcd = start_etcd().await;
    seed(&etcd.url, prefix, 20).await;
    let relay = Relay::start(etcd.port);
    let proxy = start_proxy(&relay.url, &[prefix], &[]).await;
    let streams = open_streams(&proxy.url, watch_mix(prefix, 2, 6), false).await;
    let writer = Writer::spawn(vec![etcd.url.clone()], WriterOpts::new(prefix, 30, pace));
    wait_acked(&writer, 50, Duration::from_secs(10)).await;
    RelayRig {
        etcd,
        relay,
        proxy,
        streams,
        writer,
    }
}

async fn seed(url: &str, prefix: &str, n: usize) {
    let mut kv = KvClient::new(lazy_channel(url));
    for i in 0..n {
        kv.put(PutRequest {
            key: Bytes::from(format!("{prefix}k{i:03}")),
            value: Bytes::from(format!("seed-{i}")),
            ..Default::default()
        })
        .await
        .expect("seed put");
    }
}

// ---------------------------------------------------------------------------------------------

/// etcd SIGKILLed and restarted twice under write load: every watcher ends with every revision
/// exactly once and its stream never breaks; the proxy counts its upstream watch restarts.
#[test]
fn etcd_sigkill_restart_under_load() {
    serial_test("etcd_sigkill_restart_under_load", async {
        let prefix = "/kill/";
        let mut etcd = start_etcd().await;
        seed(&etcd.url, prefix, 20).await;
        let proxy = start_proxy(&etcd.url, &[prefix], &[]).await;
        let streams = open_streams(&proxy.url, watch_mix(prefix, 2, 8), false).await;
        let writer = Writer::spawn(
            vec![etcd.url.clone()],
            WriterOpts::new(prefix, 30, Duration::from_millis(5)),
        );
        wait_acked(&writer, 100, Duration::from_secs(10)).await;
        for round in 0..2 {
            etcd = blocking(move || {
                etcd.kill();
                etcd
            })
            .await;
            let acked = writer.acked();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            etcd = blocking(move || {
                etcd.restart();
                etcd
            })
            .await;
            eprintln!("round {round}: etcd restarted ({acked} writes acked before the kill)");
            wait_acked(&writer, acked + 100, Duration::from_secs(15)).await;
        }
        // New watchers after the faults: no dead upstream watch may swallow them.
        let late = open_streams(&proxy.url, late_mix(prefix, 2, 2), false).await;
        let acked = writer.acked();
        wait_acked(&writer, acked + 50, Duration::from_secs(10)).await;
        let acked = writer.stop().await;
        let mut logs = logs_of(&streams);
        logs.extend(logs_of(&late));
        verify(
            "etcd kill",
            &etcd.url,
            &logs,
            None,
            Duration::from_secs(15),
            true,
            || proxy.log(),
        )
        .await;
        let r = restarts(&proxy);
        eprintln!("etcd kill: {acked} writes, upstream watch restarts {r}");
        assert!(
            r > 0.0,
            "etcd_fanout_upstream_watch_restarts_total is {r} after two etcd kills"
        );
    });
}

/// A 3-member cluster, proxy on all three endpoints: the leader is killed, restarted, the new
/// leader killed, restarted, then the member never killed yet, while a writer keeps writing
/// through whichever member answers. Watchers see every revision once; streams never break.
#[test]
fn cluster_leader_kills() {
    serial_test("cluster_leader_kills", async {
        let prefix = "/cl/";
        let mut cluster = blocking(|| Cluster::start(3)).await;
        seed(&cluster.members[0].url, prefix, 20).await;
        let proxy = start_proxy(&cluster.endpoints(), &[prefix], &[]).await;
        let streams = open_streams(&proxy.url, watch_mix(prefix, 2, 6), false).await;
        let leader = cluster
            .leader(Duration::from_secs(5))
            .await
            .expect("leader");
        // Write through the followers first.
        let mut urls: Vec<String> = (0..3)
            .filter(|&i| i != leader)
            .map(|i| cluster.members[i].url.clone())
            .collect();
        urls.push(cluster.members[leader].url.clone());
        let writer = Writer::spawn(urls, WriterOpts::new(prefix, 30, Duration::from_millis(5)));
        wait_acked(&writer, 100, Duration::from_secs(10)).await;
        let mut killed = Vec::new();
        for round in 0..3 {
            let leader = cluster
                .leader(Duration::from_secs(10))
                .await
                .expect("a leader");
            let victim = if round < 2 || !killed.contains(&leader) {
                leader
            } else {
                (0..3).find(|i| !killed.contains(i)).unwrap_or(leader)
            };
            killed.push(victim);
            cluster = blocking(move || {
                cluster.kill(victim);
                cluster
            })
            .await;
            let acked = writer.acked();
            eprintln!("round {round}: killed m{victim} (leader m{leader}) after {acked} writes");
            wait_acked(&writer, acked + 100, Duration::from_secs(15)).await;
            cluster = blocking(move || {
                cluster.restart(victim);
                cluster
            })
            .await;
            let acked = writer.acked();
            wait_acked(&writer, acked + 50, Duration::from_secs(15)).await;
        }
        let acked = writer.stop().await;
        let url = cluster.running_urls()[0].clone();
        let logs = logs_of(&streams);
        verify(
            "cluster leader kills",
            &url,
            &logs,
            None,
            Duration::from_secs(15),
            true,
            || proxy.log(),
        )
        .await;
        eprintln!(
            "cluster: {acked} writes, killed {killed:?}, upstream watch restarts {}",
            restarts(&proxy)
        );
    });
}

/// Relay stalls every byte for 15 s (connections stay open), then resumes: the proxy's HTTP/2
/// keepalive (5 s + 5 s) notices, the upstream watch restarts, and watchers get everything.
#[test]
fn relay_stall_then_resume() {
    serial_test("relay_stall_then_resume", async {
        let prefix = "/stall/";
        let RelayRig {
            etcd,
            relay,
            proxy,
            streams,
            writer,
        } = relay_rig(prefix, Duration::from_millis(10)).await;
        let before = restarts(&proxy);
        relay.stall();
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(15)).await;
        let during = restarts(&proxy);
        relay.pass();
        eprintln!(
            "stall: {:?}, restarts before {before}, at resume {during}, {} writes acked",
            t0.elapsed(),
            writer.acked()
        );
        let acked = writer.acked();
        wait_acked(&writer, acked + 50, Duration::from_secs(10)).await;
        writer.stop().await;
        let logs = logs_of(&streams);
        verify(
            "relay stall",
            &etcd.url,
            &logs,
            None,
            Duration::from_secs(20),
            true,
            || proxy.log(),
        )
        .await;
        assert!(
            during > before,
            "a 15 s stall went unnoticed: upstream watch restarts {before} -> {during} \
             (keepalive should end the stalled connection after ~10 s)"
        );
    });
}

/// The connections open now are black-holed for good (bytes never pass again, nothing is
/// closed) while new connections work: only a proxy that detects the dead connection and
/// reconnects can deliver the writes made meanwhile. Bound: 30 s after the stall began.
#[test]
fn relay_blackholed_connection_is_detected() {
    serial_test("relay_blackholed_connection_is_detected", async {
        let prefix = "/hole/";
        let RelayRig {
            etcd,
            relay,
            proxy,
            streams,
            writer,
        } = relay_rig(prefix, Duration::from_millis(10)).await;
        let accepted = relay.accepted();
        relay.stall_existing();
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        writer.stop().await;
        let logs = logs_of(&streams);
        let (_, _, took) = verify(
            "black hole",
            &etcd.url,
            &logs,
            None,
            Duration::from_secs(27),
            true,
            || proxy.log(),
        )
        .await;
        eprintln!(
            "black hole: delivered {:?} after the stall began ({took:?} after the last write), \
             relay connections {accepted} -> {}, restarts {}",
            t0.elapsed(),
            relay.accepted(),
            restarts(&proxy)
        );
    });
}

/// Every upstream connection closed (FIN), then reset (RST), then refused for 3 s, while a
/// writer keeps writing to etcd: watchers get everything; streams never break.
#[test]
fn relay_drop_reset_refuse() {
    serial_test("relay_drop_reset_refuse", async {
        let prefix = "/drop/";
        let RelayRig {
            etcd,
            relay,
            proxy,
            streams,
            writer,
        } = relay_rig(prefix, Duration::from_millis(5)).await;
        let r0 = restarts(&proxy);
        relay.drop_all();
        let a = writer.acked();
        wait_acked(&writer, a + 100, Duration::from_secs(10)).await;
        let r1 = restarts(&proxy);
        relay.reset_all();
        let a = writer.acked();
        wait_acked(&writer, a + 100, Duration::from_secs(10)).await;
        let r2 = restarts(&proxy);
        relay.refuse();
        relay.reset_all();
        tokio::time::sleep(Duration::from_secs(3)).await;
        relay.pass();
        let a = writer.acked();
        wait_acked(&writer, a + 100, Duration::from_secs(10)).await;
        // New watchers after the faults: no dead upstream watch may swallow them.
        let late = open_streams(&proxy.url, late_mix(prefix, 2, 2), false).await;
        let a = writer.acked();
        wait_acked(&writer, a + 50, Duration::from_secs(10)).await;
        writer.stop().await;
        let mut logs = logs_of(&streams);
        logs.extend(logs_of(&late));
        // Once etcd is reachable again at once, how long does a drop delay delivery?
        let latency = drop_latency(&relay, &etcd.url, prefix, &logs).await;
        verify(
            "drop/reset/refuse",
            &etcd.url,
            &logs,
            None,
            Duration::from_secs(15),
            true,
            || proxy.log(),
        )
        .await;
        let r3 = restarts(&proxy);
        eprintln!(
            "drop/reset/refuse: restarts {r0} -> drop {r1} -> reset {r2} -> refuse {r3}; a \
             write made right after a final drop reached every watcher in {latency:?}"
        );
        assert!(
            r1 > r0,
            "no upstream watch restart after dropping connections"
        );
        assert!(
            r2 > r1,
            "no upstream watch restart after resetting connections"
        );
        assert!(
            r3 > r2,
            "no upstream watch restart after refusing connections"
        );
    });
}

/// Drops every upstream connection, writes one key under `prefix` directly to etcd and
/// returns how long until every prefix-wide watch in `logs` has it (bounded to 10 s).
async fn drop_latency(relay: &Relay, etcd_url: &str, prefix: &str, logs: &[Log]) -> Duration {
    relay.drop_all();
    let t0 = Instant::now();
    let mut kv = KvClient::new(lazy_channel(etcd_url));
    let rev = kv
        .put(PutRequest {
            key: Bytes::from(format!("{prefix}marker")),
            value: Bytes::from_static(b"m"),
            ..Default::default()
        })
        .await
        .expect("marker put")
        .into_inner()
        .header
        .map_or(0, |h| h.revision);
    let end = testkit::range_end(prefix);
    let wide: Vec<&Log> = logs
        .iter()
        .filter(|l| l.lock().unwrap().range_end == end)
        .collect();
    while t0.elapsed() < Duration::from_secs(10)
        && wide.iter().any(|l| l.lock().unwrap().last_rev() < rev)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    t0.elapsed()
}

fn watch_create(key: &str, end: &[u8], start: i64) -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: Bytes::from(key.to_string()),
            range_end: Bytes::copy_from_slice(end),
            start_revision: start,
            ..Default::default()
        })),
    }
}

/// First two responses (created, then the next one) of a watch on `url` from `start`.
async fn first_responses(url: &str, key: &str, end: &[u8], start: i64) -> Vec<WatchResponse> {
    let ch = Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let mut client = WatchClient::new(ch);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let _ = tx.send(watch_create(key, end, start));
    let mut s = client
        .watch(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .expect("watch")
        .into_inner();
    let mut out = Vec::new();
    while out.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), s.message()).await {
            Ok(Ok(Some(r))) => {
                let done = r.canceled;
                out.push(r);
                if done {
                    break;
                }
            }
            other => panic!("watch on {url} from {start}: {other:?} after {out:?}"),
        }
    }
    drop(tx);
    out
}

/// The fields of a cancel that a client looks at.
fn cancel_shape(r: &WatchResponse) -> (bool, bool, i64, usize, i64, String) {
    (
        r.created,
        r.canceled,
        r.compact_revision,
        r.events.len(),
        r.header.as_ref().map_or(0, |h| h.revision),
        r.cancel_reason.clone(),
    )
}

/// Compaction while the proxy is cut off from etcd.
///
/// Phase 1: cut off, writes, compaction exactly at the proxy's resume revision (etcd still has
/// it): the proxy resumes, every watcher continues with no loss.
/// Phase 2: cut off, writes, compaction past the resume revision: the proxy reloads the prefix.
/// Watchers that still needed the compacted revisions get `canceled` + `compact_revision`,
/// field for field what etcd answers to the same watch; a watcher waiting for a future
/// revision and every watcher created afterwards from an available revision continue with
/// no loss; a new watcher from a compacted revision gets etcd's cancel.
#[test]
fn compaction_while_disconnected() {
    serial_test("compaction_while_disconnected", async {
        let prefix = "/cmp/";
        let end = testkit::range_end(prefix);
        let etcd = start_etcd().await;
        let recorder = Recorder::spawn(vec![etcd.url.clone()]);
        seed(&etcd.url, prefix, 10).await;
        let relay = Relay::start(etcd.port);
        let proxy = start_proxy(&relay.url, &[prefix], &[]).await;
        let mut kv = KvClient::new(lazy_channel(&etcd.url));
        let put = |kv: &mut KvClient<Channel>, i: usize| {
            let mut kv = kv.clone();
            async move {
                kv.put(PutRequest {
                    key: Bytes::from(format!("{prefix}k{:03}", i % 10)),
                    value: Bytes::from(format!("v{i}")),
                    ..Default::default()
                })
                .await
                .expect("put")
                .into_inner()
                .header
                .unwrap()
                .revision
            }
        };
        let h0 = etcd_revision(&etcd.url).await.unwrap();
        // Watchers at the head, on a key, and one waiting for a revision far ahead.
        let future = h0 + 35;
        let mut mix = watch_mix(prefix, 2, 4);
        mix.push(vec![Spec::prefix("future", prefix, future)]);
        let streams = open_streams(&proxy.url, mix, false).await;
        // Everyone caught up (the replays from revision 2 included) before the cut.
        recorder
            .wait_for(h0, Duration::from_secs(10))
            .await
            .unwrap();
        wait_done(
            &logs_of(&streams),
            &recorder.history(),
            h0,
            Duration::from_secs(10),
        )
        .await
        .expect("initial delivery");

        // Phase 1: compaction at the resume revision.
        relay.refuse();
        relay.reset_all();
        let mut last = 0;
        for i in 0..10 {
            last = put(&mut kv, i).await;
        }
        let c1 = h0 + 1;
        recorder
            .wait_for(last, Duration::from_secs(10))
            .await
            .unwrap();
        kv.compact(CompactionRequest {
            revision: c1,
            physical: true,
        })
        .await
        .expect("compact 1");
        recorder.compacted(c1);
        tokio::time::sleep(Duration::from_millis(500)).await;
        relay.pass();
        let logs = logs_of(&streams);
        let hist = {
            recorder
                .wait_for(last, Duration::from_secs(10))
                .await
                .unwrap();
            recorder.history()
        };
        wait_done(&logs, &hist, last, Duration::from_secs(15))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "phase 1 (compaction at the resume revision {c1}): {e}\n{}",
                    tail(&proxy.log(), 30)
                )
            });
        let (errs, outs) = check_all(&logs, &hist, last);
        assert!(errs.is_empty(), "phase 1: {errs:#?}");
        assert!(
            outs.iter().all(|o| *o == Outcome::Complete),
            "phase 1: a watcher was cancelled although etcd still had its next revision: {outs:?}"
        );

        // Phase 2: compaction past the resume revision.
        let h1 = last;
        relay.refuse();
        relay.reset_all();
        for i in 0..20 {
            last = put(&mut kv, i).await;
        }
        let c2 = h1 + 10;
        recorder
            .wait_for(last, Duration::from_secs(10))
            .await
            .unwrap();
        kv.compact(CompactionRequest {
            revision: c2,
            physical: true,
        })
        .await
        .expect("compact 2");
        recorder.compacted(c2);
        // What etcd tells a watch that needs revision h1 + 1.
        let etcd_cancel = first_responses(&etcd.url, prefix, &end, h1 + 1).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        relay.pass();
        // After the reload: more writes, then new watchers.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in 0..10 {
            last = put(&mut kv, i).await;
        }
        let late = open_streams(
            &proxy.url,
            vec![
                vec![Spec::prefix("late/now", prefix, 0)],
                vec![Spec::prefix(format!("late/from-c2={c2}"), prefix, c2)],
                vec![Spec::prefix(
                    format!("late/from-{}", c2 + 3),
                    prefix,
                    c2 + 3,
                )],
                vec![Spec::prefix(
                    format!("late/from-{}", h1 + 2),
                    prefix,
                    h1 + 2,
                )],
            ],
            false,
        )
        .await;
        let proxy_cancel = first_responses(&proxy.url, prefix, &end, h1 + 1).await;
        for i in 0..5 {
            last = put(&mut kv, i).await;
        }
        recorder
            .wait_for(last, Duration::from_secs(10))
            .await
            .unwrap();
        let hist = recorder.history();
        let mut all = logs_of(&streams);
        all.extend(logs_of(&late));
        verify(
            "compaction",
            &etcd.url,
            &all,
            Some(hist.clone()),
            Duration::from_secs(20),
            true,
            || proxy.log(),
        )
        .await;
        // Who had to be cancelled and who not: every watcher that was live when the proxy
        // was cut off needed revision h1 + 1 < c2 (except the one waiting for a future
        // revision); of the late ones, those that asked for a revision below c2.
        let early = logs_of(&streams).len();
        for (i, l) in all.iter().enumerate() {
            let l = l.lock().unwrap();
            let outcome = check(&l, &hist, last).unwrap();
            let expect_cancel = if i < early {
                l.name != "future"
            } else {
                l.start < c2
            };
            let expected = if expect_cancel {
                Outcome::Canceled {
                    compact_revision: c2,
                }
            } else {
                Outcome::Complete
            };
            assert_eq!(
                outcome,
                expected,
                "{}: start {}, next {}, compaction {c2}, cut off at {h1}",
                l.name,
                l.start,
                l.next()
            );
        }
        let future_log = streams.last().unwrap().logs[0].lock().unwrap().clone();
        assert_eq!(future_log.cancel, None, "the future watcher must continue");
        assert_eq!(
            etcd_cancel.len(),
            2,
            "etcd's answer to a compacted watch: {etcd_cancel:?}"
        );
        assert_eq!(
            proxy_cancel.len(),
            2,
            "proxy's answer to a compacted watch: {proxy_cancel:?}"
        );
        assert_eq!(
            cancel_shape(&proxy_cancel[1]),
            cancel_shape(&etcd_cancel[1]),
            "cancel of a watch from compacted revision {}: proxy vs etcd\nproxy {:?}\netcd {:?}",
            h1 + 1,
            proxy_cancel[1],
            etcd_cancel[1]
        );
        let canceled = all
            .iter()
            .filter(|l| l.lock().unwrap().is_canceled())
            .count();
        eprintln!(
            "compaction: c1 {c1} (resume revision), c2 {c2} (past resume {}), {canceled} of {} \
             watchers cancelled with compact_revision {c2}, others complete up to {last}",
            h1 + 1,
            all.len()
        );
    });
}

/// 250 watchers, 100 of which never read their stream, while 2,000 puts of 2 KiB go
/// through: the 150 readers get everything in order and promptly, and the proxy's memory
/// stays bounded (unbounded queues would hold 4 MB per idle watcher, 400 MB in all).
#[test]
fn slow_watchers_bounded_memory() {
    const READERS: usize = 150;
    let puts: u64 = env_or("ETCD_FANOUT_SLOW_PUTS", 2000);
    // Ten puts per txn: 200 revisions of 20 KiB. One revision per put, or more readers, would
    // make this a test of the debug build's speed on a shared two-core machine.
    let batch: u64 = env_or("ETCD_FANOUT_SLOW_BATCH", 10);
    #[allow(non_snake_case)]
    let IDLE = env_or("ETCD_FANOUT_SLOW_IDLE", 100) as usize;
    // Growth of the proxy's RSS over the run.
    const RSS_GROWTH_KIB: u64 = 150 * 1024;
    serial_test("slow_watchers_bounded_memory", async {
        let prefix = "/slow/";
        let etcd = start_etcd().await;
        seed(&etcd.url, prefix, 10).await;
        let proxy = start_proxy(&etcd.url, &[prefix], &[]).await;
        let pid = proxy_pid(proxy.port).expect("proxy pid");
        // Readers: one watch per stream, 30 streams per connection.
        let channels: Vec<Channel> = (0..READERS / 30)
            .map(|_| lazy_channel(&proxy.url))
            .collect();
        let readers: Vec<Stream> = (0..READERS)
            .map(|i| {
                Stream::spawn(
                    channels[i % channels.len()].clone(),
                    vec![Spec::prefix(format!("reader{i}"), prefix, 0)],
                    false,
                )
            })
            .collect();
        // Idle clients on their own connections with small flow-control windows: what they
        // do not read stays in the proxy.
        let mut idle = Vec::new();
        for i in 0..IDLE {
            let ch = Endpoint::from_shared(proxy.url.clone())
                .unwrap()
                .initial_stream_window_size(Some(65_535))
                .initial_connection_window_size(Some(65_535))
                .connect()
                .await
                .expect("connect");
            let spec = Spec::prefix(format!("idle{i}"), prefix, 0);
            idle.push(IdleStream::open(ch, &[spec]).await.expect("idle stream"));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while readers
            .iter()
            .any(|s| s.established.load(std::sync::atomic::Ordering::Relaxed) == 0)
        {
            assert!(Instant::now() < deadline, "readers not established");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let rss_start = rss_kib(pid).unwrap_or(0);
        // Sample the proxy's RSS while the load runs.
        let peak = Arc::new(std::sync::atomic::AtomicU64::new(rss_start));
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    if let Some(r) = rss_kib(pid) {
                        peak.fetch_max(r, std::sync::atomic::Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let t0 = Instant::now();
        let writers: Vec<Writer> = (0..4)
            .map(|id| {
                let mut o = WriterOpts::new(prefix, 200, Duration::ZERO);
                o.value_len = 2048;
                o.puts_only = true;
                o.batch = batch as usize;
                o.limit = Some(puts / 4 / batch);
                o.id = id;
                Writer::spawn(vec![etcd.url.clone()], o)
            })
            .collect();
        for w in writers {
            w.join(Duration::from_secs(env_or(
                "ETCD_FANOUT_SLOW_WRITE_SECS",
                40,
            )))
            .await
            .expect("writer");
        }
        let write_time = t0.elapsed();
        let logs = logs_of(&readers);
        let (_, until, took) = verify(
            "slow watchers",
            &etcd.url,
            &logs,
            None,
            Duration::from_secs(25),
            true,
            || proxy.log(),
        )
        .await;
        sampler.abort();
        let rss_end = rss_kib(pid).unwrap_or(0);
        let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "slow watchers: {READERS} readers + {IDLE} idle, {puts} puts of 2 KiB ({batch} per revision) in \
             {write_time:?} (to revision {until}); readers complete {took:?} after the last \
             write; proxy RSS start {} MiB, peak {} MiB, end {} MiB (growth bound {} MiB)",
            rss_start / 1024,
            peak / 1024,
            rss_end / 1024,
            RSS_GROWTH_KIB / 1024
        );
        assert!(
            took < Duration::from_secs(15),
            "readers took {took:?} after the last write to get everything"
        );
        assert!(
            peak.saturating_sub(rss_start) < RSS_GROWTH_KIB,
            "proxy RSS grew from {} to {} MiB with {IDLE} idle watchers (growth bound {} MiB)",
            rss_start / 1024,
            peak / 1024,
            RSS_GROWTH_KIB / 1024
        );
        drop(idle);
    });
}

/// A watch from a revision older than the cache window is caught up from etcd, which replays
/// at most 1,000 revisions per response with the header at its current revision X; when the
/// rest is in the window the proxy continues from its cache. The client must never see a
/// header revision lower than one it already saw (APISIX reads a lower one as "etcd
/// restarted" and reloads everything).
#[test]
fn catch_up_from_etcd_keeps_headers_monotonic() {
    serial_test("catch_up_from_etcd_keeps_headers_monotonic", async {
        let prefix = "/cu/";
        let etcd = start_etcd().await;
        let proxy = start_proxy(&etcd.url, &[prefix], &["--history-revisions", "300"]).await;
        let writers: Vec<Writer> = (0..4)
            .map(|id| {
                let mut o = WriterOpts::new(prefix, 50, Duration::ZERO);
                o.puts_only = true;
                o.limit = Some(500);
                o.id = id;
                Writer::spawn(vec![etcd.url.clone()], o)
            })
            .collect();
        for w in writers {
            w.join(Duration::from_secs(40)).await.expect("writer");
        }
        let x = etcd_revision(&etcd.url).await.unwrap();
        // Starts below the window (x - 300) whose first 1,000 revisions end inside it.
        let mix: Vec<Vec<Spec>> = [1050, 1150, 1250]
            .iter()
            .map(|back| vec![Spec::prefix(format!("from-x-{back}"), prefix, x - back)])
            .collect();
        let streams = open_streams(&proxy.url, mix, false).await;
        let logs = logs_of(&streams);
        verify(
            "catch-up headers",
            &etcd.url,
            &logs,
            None,
            Duration::from_secs(15),
            true,
            || proxy.log(),
        )
        .await;
    });
}

/// The proxy is SIGKILLed and restarted twice under write load; clients reconnect with
/// start_revision = last seen + 1 and get exactly the missing revisions, and no response
/// header ever shows a revision lower than one they already saw.
#[test]
fn proxy_restart_clients_resume() {
    serial_test("proxy_restart_clients_resume", async {
        let prefix = "/pr/";
        let etcd = start_etcd().await;
        seed(&etcd.url, prefix, 20).await;
        let mut proxy = start_proxy(&etcd.url, &[prefix], &[]).await;
        let streams = open_streams(&proxy.url, watch_mix(prefix, 2, 8), true).await;
        let writer = Writer::spawn(
            vec![etcd.url.clone()],
            WriterOpts::new(prefix, 30, Duration::from_millis(5)),
        );
        wait_acked(&writer, 100, Duration::from_secs(10)).await;
        for round in 0..2 {
            proxy = blocking(move || {
                proxy.kill();
                proxy
            })
            .await;
            let a = writer.acked();
            wait_acked(&writer, a + 100, Duration::from_secs(10)).await;
            proxy = blocking(move || {
                proxy.restart();
                proxy
            })
            .await;
            eprintln!("round {round}: proxy restarted");
            let a = writer.acked();
            wait_acked(&writer, a + 100, Duration::from_secs(10)).await;
        }
        writer.stop().await;
        let logs = logs_of(&streams);
        verify(
            "proxy restart",
            &etcd.url,
            &logs,
            None,
            Duration::from_secs(15),
            false,
            || proxy.log(),
        )
        .await;
        for l in &logs {
            let l = l.lock().unwrap();
            assert!(
                l.segments >= 3,
                "{}: {} segments, expected a reconnection after each restart",
                l.name,
                l.segments
            );
        }
    });
}

/// The proxy started while etcd is unreachable is not ready (`/readyz` 503) until it has
/// loaded and watched its prefixes; then it is.
#[test]
fn readiness_waits_for_upstream() {
    serial_test("readiness_waits_for_upstream", async {
        let prefix = "/ready/";
        let etcd = start_etcd().await;
        seed(&etcd.url, prefix, 5).await;
        let relay = Relay::start(etcd.port);
        relay.refuse();
        let relay_url = relay.url.clone();
        let starting = tokio::task::spawn_blocking(move || Proxy::start(&relay_url, &[prefix]));
        // Find the process and its port while `Proxy::start` waits for readiness.
        let deadline = Instant::now() + Duration::from_secs(10);
        let port = loop {
            if let Some(p) = proxy_port_for_endpoint(&relay.url) {
                break p;
            }
            assert!(Instant::now() < deadline, "proxy process not found");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut statuses = Vec::new();
        for _ in 0..20 {
            if let Ok((status, _)) = testkit::http_get(port, "/readyz") {
                statuses.push(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            !statuses.is_empty() && statuses.iter().all(|s| *s == 503),
            "/readyz while etcd is unreachable: {statuses:?} (want only 503)"
        );
        relay.pass();
        let proxy = starting.await.expect("proxy became ready");
        assert_eq!(
            testkit::http_get(proxy.port, "/readyz").map(|(s, _)| s),
            Ok(200)
        );
        eprintln!(
            "readiness: {} answers 503 while etcd was unreachable, 200 once loaded",
            statuses.len()
        );
    });
}

/// SIGTERM while a forwarded write is waiting for etcd: the write still completes (drain lets
/// in-flight unary calls finish) and the process then exits well within the drain bound.
#[test]
fn sigterm_lets_inflight_unary_finish() {
    serial_test("sigterm_lets_inflight_unary_finish", async {
        let prefix = "/term2/";
        let etcd = start_etcd().await;
        let relay = Relay::start(etcd.port);
        // No shutdown delay: this test is about the drain (tests/rollout.rs has the delay).
        let proxy = start_proxy(&relay.url, &[prefix], &["--shutdown-delay", "0s"]).await;
        let pid = proxy_pid(proxy.port).expect("proxy pid");
        let mut kv = KvClient::new(lazy_channel(&proxy.url));
        kv.put(PutRequest {
            key: Bytes::from(format!("{prefix}warm")),
            value: Bytes::from_static(b"1"),
            ..Default::default()
        })
        .await
        .expect("warm-up put");
        relay.stall();
        let inflight = tokio::spawn(async move {
            tokio::time::timeout(
                Duration::from_secs(8),
                kv.put(PutRequest {
                    key: Bytes::from(format!("{prefix}inflight")),
                    value: Bytes::from_static(b"2"),
                    ..Default::default()
                }),
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = Instant::now();
        signal(pid, "TERM");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        relay.pass();
        let put = inflight.await.unwrap();
        let put_done = t0.elapsed();
        while is_alive(pid) && t0.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let exited = t0.elapsed();
        eprintln!(
            "sigterm with a write in flight: write {:?} after {put_done:?}, exit after {exited:?}",
            put.as_ref()
                .map(|r| r.as_ref().map(|_| "ok").map_err(|e| e.code()))
        );
        assert!(
            matches!(put, Ok(Ok(_))),
            "the write in flight at SIGTERM must complete: {put:?}"
        );
        assert!(
            exited < Duration::from_secs(5),
            "no client left after the write, yet the proxy took {exited:?} to exit"
        );
    });
}

/// SIGTERM: watch streams end at once with an error status (clients reconnect elsewhere),
/// new connections are not left hanging, and the process exits within the drain bound (10 s)
/// even with a client that stopped reading.
#[test]
fn sigterm_drains_within_bound() {
    const EXIT_BOUND: Duration = Duration::from_millis(11_500);
    serial_test("sigterm_drains_within_bound", async {
        let prefix = "/term/";
        let etcd = start_etcd().await;
        seed(&etcd.url, prefix, 20).await;
        // No shutdown delay: this test is about the drain (tests/rollout.rs has the delay).
        let proxy = start_proxy(&etcd.url, &[prefix], &["--shutdown-delay", "0s"]).await;
        let pid = proxy_pid(proxy.port).expect("proxy pid");
        let streams = open_streams(&proxy.url, watch_mix(prefix, 2, 6), false).await;
        let ch = Endpoint::from_shared(proxy.url.clone())
            .unwrap()
            .initial_stream_window_size(Some(65_535))
            .initial_connection_window_size(Some(65_535))
            .connect()
            .await
            .unwrap();
        let idle = IdleStream::open(ch, &[Spec::prefix("idle", prefix, 0)])
            .await
            .unwrap();
        // Fill the idle client's windows and its session buffer.
        let mut o = WriterOpts::new(prefix, 50, Duration::ZERO);
        o.value_len = 1024;
        o.puts_only = true;
        o.limit = Some(1500);
        Writer::spawn(vec![etcd.url.clone()], o)
            .join(Duration::from_secs(30))
            .await
            .unwrap();
        let logs = logs_of(&streams);
        let until = etcd_revision(&etcd.url).await.unwrap();
        let hist = History::fetch(&etcd.url, until).await.unwrap();
        wait_done(&logs, &hist, until, Duration::from_secs(15))
            .await
            .expect("delivery before SIGTERM");

        let t0 = Instant::now();
        signal(pid, "TERM");
        // Streams end with an error status.
        let deadline = t0 + Duration::from_secs(5);
        while streams.iter().any(|s| !s.finished()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let streams_ended = t0.elapsed();
        // A new client during the drain must not hang.
        let fresh = tokio::time::timeout(Duration::from_secs(3), async {
            let mut kv = KvClient::new(
                Endpoint::from_shared(proxy.url.clone())
                    .unwrap()
                    .connect_timeout(Duration::from_secs(1))
                    .connect_lazy(),
            );
            kv.range(etcd_fanout::proto::etcdserverpb::RangeRequest {
                key: Bytes::from(format!("{prefix}k001")),
                ..Default::default()
            })
            .await
        })
        .await;
        let fresh_took = t0.elapsed() - streams_ended;
        while is_alive(pid) && t0.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let exited = t0.elapsed();
        drop(idle);
        eprintln!(
            "sigterm: streams ended after {streams_ended:?}, a new call during the drain \
             answered {:?} after {fresh_took:?}, process exited after {exited:?}",
            fresh
                .as_ref()
                .map(|r| r.as_ref().map(|_| "ok").map_err(|e| e.code()))
        );
        let mut problems = Vec::new();
        for l in &logs {
            let l = l.lock().unwrap();
            match l.errors.last() {
                Some(e) if e.contains("Unavailable") => {}
                other => problems.push(format!("{}: stream ended with {other:?}", l.name)),
            }
        }
        assert!(
            problems.is_empty(),
            "watch streams must end with Unavailable at SIGTERM:\n{}",
            problems.join("\n")
        );
        assert!(
            streams_ended < Duration::from_secs(3),
            "watch streams took {streams_ended:?} to end after SIGTERM"
        );
        assert!(
            exited < EXIT_BOUND,
            "proxy took {exited:?} to exit after SIGTERM (bound {EXIT_BOUND:?})"
        );
        assert!(
            fresh.is_ok(),
            "a new connection during the drain hung for 3 s: the proxy still accepts \
             connections it never serves (listener kept open while draining)"
        );
    });
}

/// etcd's watchers (`etcd_debugging_mvcc_watcher_total`), the proxy's downstream watch
/// streams and its cached downstream watches.
fn watcher_counts(etcd: &Etcd, proxy: &Proxy) -> (f64, f64, f64) {
    let m = proxy.metrics();
    (
        testkit::etcd_metric(etcd.port, "etcd_debugging_mvcc_watcher_total"),
        metric_value(&m, "etcd_fanout_watch_streams"),
        metric_value(&m, "etcd_fanout_watchers"),
    )
}

/// Two tiers (issue 13 item 2): etcd <- replica A <- replica B (`--endpoints` is A), 24
/// watches on B, a writer on etcd. A is SIGKILLed and restarted mid-stream, then etcd is
/// compacted. B's streams never break and every watch sees every revision exactly once; a new
/// watch on B from a compacted revision gets etcd's cancel; B holds exactly one watch on A for
/// its prefix and etcd one watcher (A's) once backfills are done; a linearizable range through
/// B reports etcd's revision and etcd's keys.
#[test]
fn two_tiers_upper_sigkill_and_compaction() {
    serial_test("two_tiers_upper_sigkill_and_compaction", async {
        let prefix = "/tt/";
        let end = testkit::range_end(prefix);
        let etcd = start_etcd().await;
        let recorder = Recorder::spawn(vec![etcd.url.clone()]);
        seed(&etcd.url, prefix, 20).await;
        let mut a = start_proxy(&etcd.url, &[prefix], &[]).await;
        let b = start_proxy(&a.url, &[prefix], &[]).await;
        let streams = open_streams(&b.url, watch_mix(prefix, 2, 8), false).await;
        let writer = Writer::spawn(
            vec![etcd.url.clone()],
            WriterOpts::new(prefix, 30, Duration::from_millis(5)),
        );
        wait_acked(&writer, 100, Duration::from_secs(10)).await;

        a = blocking(move || {
            a.kill();
            a
        })
        .await;
        let acked = writer.acked();
        wait_acked(&writer, acked + 50, Duration::from_secs(10)).await;
        a = blocking(move || {
            a.restart();
            a
        })
        .await;
        eprintln!("two tiers: upper replica restarted");
        let acked = writer.acked();
        wait_acked(&writer, acked + 100, Duration::from_secs(15)).await;

        // Compaction on etcd at a revision every watcher has passed.
        let c = etcd_revision(&etcd.url).await.expect("etcd revision");
        recorder.wait_for(c, Duration::from_secs(10)).await.unwrap();
        wait_done(
            &logs_of(&streams),
            &recorder.history(),
            c,
            Duration::from_secs(15),
        )
        .await
        .unwrap_or_else(|e| panic!("before compaction: {e}\n{}", tail(&b.log(), 30)));
        let mut kv = KvClient::new(lazy_channel(&etcd.url));
        kv.compact(CompactionRequest {
            revision: c,
            physical: true,
        })
        .await
        .expect("compact");
        recorder.compacted(c);
        let acked = writer.acked();
        wait_acked(&writer, acked + 100, Duration::from_secs(10)).await;
        writer.stop().await;

        let last = etcd_revision(&etcd.url).await.expect("etcd revision");
        recorder
            .wait_for(last, Duration::from_secs(10))
            .await
            .unwrap();
        let logs = logs_of(&streams);
        verify(
            "two tiers",
            &etcd.url,
            &logs,
            Some(recorder.history()),
            Duration::from_secs(20),
            true,
            || format!("--- A ---\n{}\n--- B ---\n{}", tail(&a.log(), 20), b.log()),
        )
        .await;

        // A new watch on B from a compacted revision: etcd's cancel, within the compaction
        // poll (B learns it through A).
        let want = first_responses(&etcd.url, prefix, &end, 2).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = first_responses(&b.url, prefix, &end, 2).await;
            let shape = |r: &[WatchResponse]| {
                r.iter()
                    .map(|r| {
                        (
                            r.created,
                            r.canceled,
                            r.compact_revision,
                            r.cancel_reason.clone(),
                        )
                    })
                    .collect::<Vec<_>>()
            };
            if shape(&got) == shape(&want) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "watch from a compacted revision through two tiers: {got:?}, etcd: {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }

        // A linearizable range through B: etcd's revision and keys.
        let range = |url: String| {
            let end = end.clone();
            async move {
                let mut kv = KvClient::new(lazy_channel(&url));
                let r = kv
                    .range(RangeRequest {
                        key: Bytes::from(prefix),
                        range_end: end,
                        ..Default::default()
                    })
                    .await
                    .expect("range")
                    .into_inner();
                let kvs: Vec<_> = r
                    .kvs
                    .iter()
                    .map(|kv| (kv.key.clone(), kv.mod_revision))
                    .collect();
                (r.header.map_or(0, |h| h.revision), kvs)
            }
        };
        let (b_rev, b_kvs) = range(b.url.clone()).await;
        let (e_rev, e_kvs) = range(etcd.url.clone()).await;
        assert_eq!(
            (b_rev, &b_kvs),
            (e_rev, &e_kvs),
            "linearizable range through two tiers"
        );

        // One watch of B on A, one watcher on etcd (A's), once backfills and probes are over
        // (and the test's own history recorder, a direct etcd watcher, has stopped).
        drop(recorder);
        let settled = |etcd: &Etcd, a: &Proxy| watcher_counts(etcd, a) == (1.0, 1.0, 1.0);
        let deadline = Instant::now() + Duration::from_secs(40);
        while !settled(&etcd, &a) {
            assert!(
                Instant::now() < deadline,
                "watchers (etcd, A's streams, A's cached watches) = {:?}: expected (1, 1, 1)\n--- A ---\n{}",
                watcher_counts(&etcd, &a),
                tail(&a.log(), 30)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}
