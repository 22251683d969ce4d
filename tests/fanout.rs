//! Fan-out: 1,000 watchers through the proxy on one prefix must all receive every event
//! exactly once and in order, while etcd itself sees only the proxy's own upstream watch.
//!
//! In self-check mode (`ETCD_FANOUT_DIFF_SELFCHECK=1`) the watchers talk to etcd directly: the
//! delivery checks still run (validating the test), the upstream-watcher bound is only printed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use etcd_fanout::proto::etcdserverpb::{
    watch_client::WatchClient, watch_request::RequestUnion, DeleteRangeRequest, PutRequest,
    WatchCreateRequest, WatchRequest, WatchResponse,
};
use testkit::diff::*;
use testkit::{etcd_metric, Etcd, Proxy};
use tokio::sync::mpsc;
use tonic::transport::Channel;

const CONNS: usize = 10;
const STREAMS_PER_CONN: usize = 5;

/// (type, key, value, mod_revision) of one event.
type Ev = (i32, Vec<u8>, Vec<u8>, i64);

struct Setup {
    etcd: Etcd,
    proxy: Option<Proxy>,
    url: String,
}

async fn setup() -> Setup {
    let etcd = start_etcd(&[]).await;
    let proxy = if selfcheck() {
        None
    } else {
        Some(start_proxy(&etcd.url, &["/apisix/".to_string()], &[]).await)
    };
    let url = proxy
        .as_ref()
        .map(|p| p.url.clone())
        .unwrap_or_else(|| etcd.url.clone());
    eprintln!(
        "fanout target: {url} (etcd {}, proxy: {})",
        etcd.url,
        proxy.is_some()
    );
    Setup { etcd, proxy, url }
}

fn watchers_on_etcd(s: &Setup) -> (f64, f64) {
    (
        etcd_metric(s.etcd.port, "etcd_debugging_mvcc_watcher_total"),
        etcd_metric(s.etcd.port, "etcd_debugging_mvcc_watch_stream_total"),
    )
}

/// One stream task: creates `n` watches from `start`, reports once all are created, then
/// collects the events per watch id until every watch has `want` events (or the deadline).
async fn stream_task(
    mut client: WatchClient<Channel>,
    n: usize,
    start: i64,
    want: usize,
    created_tx: mpsc::UnboundedSender<usize>,
    deadline: Instant,
) -> Result<HashMap<i64, Vec<Ev>>, String> {
    let (tx, rx) = mpsc::unbounded_channel::<WatchRequest>();
    for _ in 0..n {
        let _ = tx.send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: b("/apisix/"),
                range_end: b("/apisix0"),
                start_revision: start,
                ..Default::default()
            })),
        });
    }
    let mut s = tokio::time::timeout(
        Duration::from_secs(15),
        client.watch(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)),
    )
    .await
    .map_err(|_| "watch call timed out".to_string())?
    .map_err(|e| status_str(&e))?
    .into_inner();
    let mut created = 0;
    let mut got: HashMap<i64, Vec<Ev>> = HashMap::new();
    let mut complete = 0;
    loop {
        if created == n && complete == n {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let m: WatchResponse = match tokio::time::timeout(left, s.message()).await {
            Err(_) => break,
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => return Err("stream ended".into()),
            Ok(Err(e)) => return Err(status_str(&e)),
        };
        if m.created {
            if m.canceled {
                return Err(format!("watch creation failed: {m:?}"));
            }
            created += 1;
            got.entry(m.watch_id).or_default();
            if created == n {
                let _ = created_tx.send(n);
            }
            continue;
        }
        if m.canceled {
            return Err(format!("watch canceled: {m:?}"));
        }
        let v = got.entry(m.watch_id).or_default();
        let before = v.len();
        for e in &m.events {
            let kv = e.kv.clone().unwrap_or_default();
            v.push((
                e.r#type,
                kv.key.to_vec(),
                kv.value.to_vec(),
                kv.mod_revision,
            ));
        }
        if before < want && v.len() >= want {
            complete += 1;
        }
    }
    // anything extra (duplicates) arriving shortly after is a failure
    if let Ok(Ok(Some(m))) = tokio::time::timeout(Duration::from_millis(300), s.message()).await {
        if !m.events.is_empty() {
            let v = got.entry(m.watch_id).or_default();
            for e in &m.events {
                let kv = e.kv.clone().unwrap_or_default();
                v.push((
                    e.r#type,
                    kv.key.to_vec(),
                    kv.value.to_vec(),
                    kv.mod_revision,
                ));
            }
        }
    }
    drop(tx);
    Ok(got)
}

/// Opens `CONNS` connections x `STREAMS_PER_CONN` streams with `total` watches in all and
/// waits until every watch is created. Returns the join handles.
async fn open_watchers(
    url: &str,
    total: usize,
    start: i64,
    want: usize,
    deadline: Instant,
) -> Vec<tokio::task::JoinHandle<Result<HashMap<i64, Vec<Ev>>, String>>> {
    let streams = CONNS * STREAMS_PER_CONN;
    let per = total / streams;
    assert_eq!(per * streams, total);
    let (ctx, mut crx) = mpsc::unbounded_channel();
    let mut handles = Vec::new();
    for _ in 0..CONNS {
        let ch = testkit::channel(url).await;
        for _ in 0..STREAMS_PER_CONN {
            let client = WatchClient::new(ch.clone()).max_decoding_message_size(usize::MAX);
            handles.push(tokio::spawn(stream_task(
                client,
                per,
                start,
                want,
                ctx.clone(),
                deadline,
            )));
        }
    }
    drop(ctx);
    let mut created = 0;
    while created < total {
        match tokio::time::timeout(Duration::from_secs(20), crx.recv()).await {
            Ok(Some(n)) => created += n,
            _ => break,
        }
    }
    assert_eq!(created, total, "not all watches were created in time");
    handles
}

/// Writes number `from..from+n` of a fixed pattern (puts, overwrites and deletes over 7 keys
/// under /apisix/routes/, plus a write outside the prefix every 10), alternately through `url`
/// and directly on etcd. Returns the events a /apisix/ watcher must see.
async fn do_writes_from(url: &str, etcd_url: &str, from: usize, n: usize) -> Vec<Ev> {
    let mut via = testkit::Clients::connect(url).await.kv;
    let mut direct = testkit::Clients::connect(etcd_url).await.kv;
    let mut expected = Vec::new();
    for i in from..from + n {
        let kv = if i % 2 == 0 { &mut via } else { &mut direct };
        let key = format!("/apisix/routes/{}", i % 7);
        if i % 5 == 4 {
            let r = kv
                .delete_range(DeleteRangeRequest {
                    key: b(&key),
                    ..Default::default()
                })
                .await
                .expect("delete")
                .into_inner();
            if r.deleted > 0 {
                expected.push((1, key.into_bytes(), vec![], r.header.unwrap().revision));
            }
        } else {
            let val = format!("value-{i}");
            let r = kv
                .put(PutRequest {
                    key: b(&key),
                    value: b(&val),
                    ..Default::default()
                })
                .await
                .expect("put")
                .into_inner();
            expected.push((
                0,
                key.into_bytes(),
                val.into_bytes(),
                r.header.unwrap().revision,
            ));
        }
        if i % 10 == 9 {
            kv.put(PutRequest {
                key: b("/other/noise"),
                value: b("x"),
                ..Default::default()
            })
            .await
            .expect("put");
        }
    }
    expected
}

fn check_all(results: Vec<Result<HashMap<i64, Vec<Ev>>, String>>, expected: &[Ev], total: usize) {
    let mut watches = 0;
    let mut bad = Vec::new();
    for (si, r) in results.into_iter().enumerate() {
        match r {
            Err(e) => bad.push(format!("stream {si}: {e}")),
            Ok(m) => {
                for (id, evs) in m {
                    watches += 1;
                    if evs != expected {
                        let first = evs.iter().zip(expected).position(|(a, b)| a != b);
                        bad.push(format!(
                            "stream {si} watch {id}: got {} events, want {}; first difference at {:?}: got {:?} want {:?}",
                            evs.len(),
                            expected.len(),
                            first,
                            first.and_then(|i| evs.get(i)),
                            first.and_then(|i| expected.get(i)),
                        ));
                    }
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {total} watchers wrong:\n{}",
        bad.len(),
        bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    assert_eq!(watches, total, "watch count");
}

/// 1,000 watchers from "now" on one prefix, 50 writes: all events, exactly once, in order;
/// etcd sees at most 2 watchers (the proxy's upstream watch, plus at most one internal one).
#[tokio::test(flavor = "multi_thread")]
async fn thousand_watchers_one_upstream_watch() {
    within(Duration::from_secs(60), "fan-out test", async {
        let s = setup().await;
        let (w0, st0) = watchers_on_etcd(&s);
        eprintln!("etcd before downstream watchers: watcher_total={w0} watch_stream_total={st0}");
        let total = 1000;
        let writes = 50;
        let deadline = Instant::now() + Duration::from_secs(45);
        let expected_count = expected_event_count_from(0, writes);
        let handles = open_watchers(&s.url, total, 0, expected_count, deadline).await;
        let (w1, st1) = watchers_on_etcd(&s);
        eprintln!(
            "etcd with {total} downstream watchers active: watcher_total={w1} watch_stream_total={st1}"
        );
        let expected = do_writes_from(&s.url, &s.etcd.url, 0, writes).await;
        assert_eq!(expected.len(), expected_count);
        let mut results = Vec::new();
        for h in handles {
            results.push(h.await.expect("stream task"));
        }
        check_all(results, &expected, total);
        let (w2, st2) = watchers_on_etcd(&s);
        eprintln!("etcd after: watcher_total={w2} watch_stream_total={st2}");
        if s.proxy.is_some() {
            assert!(
                w1 <= 2.0,
                "etcd has {w1} watchers while {total} downstream watchers are active through the proxy (want <= 2)"
            );
            assert!(w1 >= 1.0, "etcd shows no watcher at all: is the watcher metric readable? ({w1})");
        } else {
            eprintln!("self-check mode: upstream bound not asserted (plain etcd has {w1} watchers)");
            assert!(w1 >= total as f64, "metric sanity: etcd should count {total} watchers, shows {w1}");
        }
    })
    .await;
}

/// APISIX's reconnect storm: 500 watchers (spread over 10 connections) all resuming from an
/// old revision get the same replay, then live events; still one upstream watch on etcd.
#[tokio::test(flavor = "multi_thread")]
async fn five_hundred_watchers_resuming_from_history() {
    within(Duration::from_secs(60), "fan-out replay test", async {
        let s = setup().await;
        let first = do_writes_from(&s.url, &s.etcd.url, 0, 30).await;
        let start = first[5].3; // resume from the 6th event's revision
        let replay: Vec<Ev> = first.iter().filter(|e| e.3 >= start).cloned().collect();
        let total = 500;
        let more = 20;
        let want = replay.len() + expected_event_count_from(30, more);
        let deadline = Instant::now() + Duration::from_secs(40);
        let handles = open_watchers(&s.url, total, start, want, deadline).await;
        let (w1, st1) = watchers_on_etcd(&s);
        eprintln!(
            "etcd with {total} resumed watchers: watcher_total={w1} watch_stream_total={st1}"
        );
        let live = do_writes_from(&s.url, &s.etcd.url, 30, more).await;
        let mut expected = replay.clone();
        expected.extend(live);
        assert_eq!(expected.len(), want);
        let mut results = Vec::new();
        for h in handles {
            results.push(h.await.expect("stream task"));
        }
        check_all(results, &expected, total);
        if s.proxy.is_some() {
            assert!(
                w1 <= 2.0,
                "etcd has {w1} watchers while {total} resumed watchers are active (want <= 2)"
            );
        } else {
            assert!(
                w1 >= total as f64,
                "metric sanity: etcd should count {total} watchers, shows {w1}"
            );
        }
    })
    .await;
}

fn expected_event_count_from(from: usize, n: usize) -> usize {
    let mut live = std::collections::HashSet::new();
    let mut c = 0;
    for i in 0..from + n {
        let key = i % 7;
        if i % 5 == 4 {
            if live.remove(&key) && i >= from {
                c += 1;
            }
        } else {
            live.insert(key);
            if i >= from {
                c += 1;
            }
        }
    }
    c
}
