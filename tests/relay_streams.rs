//! Relayed watches with a token share upstream streams per identity (real etcd with auth on,
//! real etcd-fanout; no mocks).
//!
//! 2,000 watches of 4 users on ranges outside every configured prefix, over 8 client streams
//! (2 per user, 250 watches each): etcd must count one upstream watch stream per user (plus
//! the proxy's own), not one per watch. Then etcd restarts:
//!
//! * with JWTs (stateless: still valid after the restart) every watch resumes on a new shared
//!   stream and receives every revision exactly once;
//! * with simple tokens (they die with the restart) etcd refuses every re-create, and every
//!   watch ends under its own watch id with etcd's `cancel_reason` (never a second `created`),
//!   after an exact prefix of its events.

use std::time::Duration;

use bytes::Bytes;
use testkit::auth::*;
use testkit::checker::{check, Ev, History, WatchLog};
use testkit::watchers::{lazy_channel, Log, Spec, Stream};
use testkit::{etcd_metric, Etcd, Proxy};

/// The cached prefix (the watches below are all outside it).
const PREFIX: &str = "/apisix/";
/// The relayed range every watch watches.
const OTHER: &str = "/other/";
const USERS: usize = 4;
const STREAMS_PER_USER: usize = 2;
const WATCHES_PER_STREAM: usize = 250;
/// Writes before and after the restart.
const WRITES: usize = 15;
/// etcd's gauge of open watch streams.
const ETCD_STREAMS: &str = "etcd_debugging_mvcc_watch_stream_total";
/// etcd's cancel reason for a dead simple token.
const INVALID_TOKEN: &str =
    "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token";

/// etcd with auth on (`extra` flags), the proxy's user `fanout` (read on `PREFIX`), and users
/// `u0`.. with read on `OTHER`; the proxy started and ready.
fn setup(extra: &[&str]) -> (Etcd, Proxy) {
    let etcd = Etcd::start_with(extra);
    add_reader(&etcd, None, "fanout", "fanout-pw", &[PREFIX]);
    for u in 0..USERS {
        add_reader(&etcd, None, &format!("u{u}"), "pw", &[OTHER]);
    }
    enable_auth(&etcd);
    let proxy = Proxy::start_unready(&etcd.url, &[PREFIX], &["--user", "fanout:fanout-pw"], &[]);
    assert!(
        testkit::wait_until(Duration::from_secs(30), || proxy.readyz() == 200),
        "proxy never ready:\n{}",
        proxy.plain_log()
    );
    (etcd, proxy)
}

/// Opens every user's streams through the proxy and waits for every `created`.
async fn open_watches(etcd: &Etcd, proxy: &Proxy) -> (Vec<Stream>, Vec<Log>) {
    let mut streams = Vec::new();
    let mut logs = Vec::new();
    for u in 0..USERS {
        let token = token(&etcd.url, &format!("u{u}"), "pw").await;
        for s in 0..STREAMS_PER_USER {
            let specs: Vec<Spec> = (0..WATCHES_PER_STREAM)
                .map(|w| Spec::prefix(format!("u{u}/s{s}/w{w}"), OTHER, 0))
                .collect();
            let l: Vec<Log> = specs.iter().map(Spec::log).collect();
            logs.extend(l.iter().cloned());
            streams.push(Stream::spawn_as(
                lazy_channel(&proxy.url),
                Some(token.clone()),
                specs,
                l,
                false,
            ));
        }
    }
    let all = streams.len() as u64;
    let created = testkit::wait_until(Duration::from_secs(120), || {
        streams
            .iter()
            .map(|s| s.established.load(std::sync::atomic::Ordering::Relaxed))
            .sum::<u64>()
            == all
    });
    assert!(
        created,
        "not every watch was created:\n{}",
        proxy.plain_log()
    );
    (streams, logs)
}

/// `n` puts under `OTHER` made directly on etcd as root; their events, in order.
async fn write(etcd: &Etcd, round: &str, n: usize) -> Vec<Ev> {
    let root_token = token(&etcd.url, "root", ROOT_PASSWORD).await;
    let mut events = Vec::new();
    for i in 0..n {
        let (key, value) = (format!("{OTHER}{round}{i}"), format!("v{i}"));
        let rev = put(&etcd.url, &root_token, &key, &value).await;
        events.push(Ev {
            rev,
            key: Bytes::from(key),
            put: true,
            value: Bytes::from(value),
        });
    }
    events
}

/// Waits until every log has every event up to `until` or is cancelled.
async fn wait_all(logs: &[Log], hist: &History, until: i64, proxy: &Proxy) {
    if let Err(e) = testkit::checker::wait_done(logs, hist, until, Duration::from_secs(120)).await {
        panic!("{e}\n{}", proxy.plain_log());
    }
}

/// The open watch streams etcd counts (polled until it settles at or under `at_most`).
fn etcd_streams_settle(etcd: &Etcd, at_most: f64) -> f64 {
    let mut n = etcd_metric(etcd.port, ETCD_STREAMS);
    testkit::wait_until(Duration::from_secs(20), || {
        n = etcd_metric(etcd.port, ETCD_STREAMS);
        n <= at_most
    });
    n
}

/// Opens every user's watches and checks that etcd counts one shared stream per user (250 x 2
/// watches fit in one) next to the proxy's own; writes a round, restarts etcd, writes a
/// second round, and waits until every watch has what it will get of both. Returns the
/// streams (to keep them open), their logs, what was written, and etcd's stream count before.
async fn watch_across_restart(
    etcd: &mut Etcd,
    proxy: &Proxy,
) -> (Vec<Stream>, Vec<Log>, History, f64) {
    let baseline = etcd_metric(etcd.port, ETCD_STREAMS);
    let (streams, logs) = open_watches(etcd, proxy).await;
    let open = etcd_streams_settle(etcd, baseline + USERS as f64);
    println!(
        "{} token watches through the proxy: etcd watch streams {baseline} -> {open}",
        logs.len()
    );
    assert!(
        open <= baseline + USERS as f64,
        "etcd counts {open} watch streams (baseline {baseline})"
    );
    assert_eq!(proxy.metric("etcd_fanout_relay_streams"), USERS as f64);

    let mut hist = History::default();
    hist.events.extend(write(etcd, "a", WRITES).await);
    wait_all(&logs, &hist, hist.last_rev(), proxy).await;
    etcd.restart();
    hist.events.extend(write(etcd, "b", WRITES).await);
    wait_all(&logs, &hist, hist.last_rev(), proxy).await;
    (streams, logs, hist, baseline)
}

#[tokio::test(flavor = "multi_thread")]
async fn token_watches_share_streams_and_resume_after_restart_with_jwts() {
    let keys = tempfile::tempdir().expect("tempdir");
    let (private, public) = jwt_keys(keys.path());
    let flag = format!("jwt,pub-key={public},priv-key={private},sign-method=RS256,ttl=1h");
    let (mut etcd, proxy) = setup(&["--auth-token", &flag]);
    // JWTs outlive the restart: every watch resumes from its next revision.
    let (_streams, logs, hist, baseline) = watch_across_restart(&mut etcd, &proxy).await;
    let mut failures = Vec::new();
    for l in &logs {
        let l = l.lock().unwrap();
        if let Err(e) = check(&l, &hist, hist.last_rev()) {
            failures.push(e);
        }
        assert!(l.cancel.is_none(), "{}: cancelled {:?}", l.name, l.cancel);
    }
    assert!(
        failures.is_empty(),
        "{} of {} watches wrong, e.g. {:?}",
        failures.len(),
        logs.len(),
        &failures[..failures.len().min(3)]
    );
    let after = etcd_streams_settle(&etcd, baseline + USERS as f64);
    println!("after the restart: etcd watch streams {after}");
    assert!(
        after <= baseline + USERS as f64,
        "{after} streams after the restart"
    );
    assert_eq!(proxy.metric("etcd_fanout_relay_streams"), USERS as f64);
}

#[tokio::test(flavor = "multi_thread")]
async fn token_watches_end_with_etcds_cancel_when_the_restart_kills_simple_tokens() {
    let (mut etcd, proxy) = setup(&[]);
    // Simple tokens die with etcd: every re-create is refused and the watch ends with
    // etcd's reason under its own id.
    let (_streams, logs, hist, baseline) = watch_across_restart(&mut etcd, &proxy).await;
    let mut failures = Vec::new();
    for l in &logs {
        let l = l.lock().unwrap();
        let Some(c) = &l.cancel else {
            failures.push(format!("{}: not cancelled", l.name));
            continue;
        };
        if c.reason != INVALID_TOKEN || c.created || c.compact_revision != 0 {
            failures.push(format!("{}: cancel {c:?}", l.name));
        }
        // Everything before the cancel: exactly etcd's events, each once (an exact prefix,
        // all of the first round at least).
        let mut before: WatchLog = l.clone();
        before.cancel = None;
        before.left = true;
        if let Err(e) = check(&before, &hist, hist.last_rev()) {
            failures.push(e);
        }
        if l.events.len() < WRITES || l.after_cancel > 0 || l.segments != 1 {
            failures.push(format!(
                "{}: {} events, {} responses after the cancel, {} created",
                l.name,
                l.events.len(),
                l.after_cancel,
                l.segments
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} watches wrong, e.g. {:?}",
        failures.len(),
        logs.len(),
        &failures[..failures.len().min(3)]
    );
    // Every watch ended: no upstream stream is left for them.
    let after = etcd_streams_settle(&etcd, baseline);
    assert!(
        after <= baseline,
        "{after} streams left after every watch ended"
    );
    assert_eq!(proxy.metric("etcd_fanout_relay_streams"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relayed_watch_whose_client_stops_reading_is_detached_and_resumed() {
    use etcd_fanout::proto::etcdserverpb::{
        kv_client::KvClient, watch_client::WatchClient, watch_request::RequestUnion, PutRequest,
        WatchCreateRequest, WatchRequest,
    };
    let (etcd, proxy) = setup(&[]);
    let user_token = token(&etcd.url, "u0", "pw").await;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: OTHER.into(),
            range_end: testkit::range_end(OTHER),
            ..Default::default()
        })),
    })
    .expect("send create");
    // Small HTTP/2 windows (hyper's client defaults are 2 and 5 MiB): a stalled reader
    // holds the proxy back after 64 KiB.
    let channel = tonic::transport::Endpoint::from_shared(proxy.url.clone())
        .expect("url")
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(65_535))
        .connect_lazy();
    let mut stream = WatchClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .watch(with_token(
            Some(&user_token),
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        ))
        .await
        .expect("watch")
        .into_inner();
    let created = stream.message().await.expect("created").expect("created");
    assert!(created.created && !created.canceled, "{created:?}");

    // The client stops reading while 1,000 revisions of 2 KiB arrive: more than the HTTP/2
    // windows, the session's queue (256 responses) and the relay's buffer (32) hold.
    let root_token = token(&etcd.url, "root", ROOT_PASSWORD).await;
    let mut kv = KvClient::new(etcd.channel().await);
    let value = "x".repeat(2048);
    let mut want = Vec::new();
    for i in 0..1000 {
        let r = kv
            .put(with_token(
                Some(&root_token),
                PutRequest {
                    key: format!("{OTHER}slow{}", i % 10).into(),
                    value: value.clone().into(),
                    ..Default::default()
                },
            ))
            .await
            .expect("put")
            .into_inner();
        want.push(r.header.map_or(0, |h| h.revision));
    }
    assert!(
        testkit::wait_until(Duration::from_secs(60), || proxy
            .metric("etcd_fanout_relay_detached_total")
            >= 1.0),
        "the stalled watch was never detached"
    );

    // Reading again: every revision exactly once, in order, and no second `created`.
    let mut got = Vec::new();
    let last = *want.last().expect("writes");
    while got.last() != Some(&last) {
        let resp = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .expect("events keep coming")
            .expect("stream")
            .expect("open");
        assert!(!resp.created && !resp.canceled, "{resp:?}");
        assert_eq!(resp.watch_id, created.watch_id);
        got.extend(
            resp.events
                .iter()
                .filter_map(|e| e.kv.as_ref().map(|kv| kv.mod_revision)),
        );
    }
    assert_eq!(got, want, "every revision exactly once after the detach");
}
