//! The proxy's own identity against an etcd with auth on (real etcd, real `etcdctl` for the
//! users and roles; no mocks): it logs in with `--user`/`--password`/`--password-file` or the
//! `ETCD_FANOUT_*` environment, fills its cache through auth, renews its token (etcd started
//! with a 3 s `--auth-token-ttl`), re-creates its watch after an etcd restart with a fresh
//! token, follows auth being enabled after it started, and fails loudly and safely with wrong
//! credentials or without read permission (error in the log, `/readyz` 503, requests
//! forwarded so the client gets etcd's own answer).
//!
//! Client requests here carry a token of their own (a `reader` user): with auth on, that is
//! how clients talk to etcd, and the proxy must answer them as etcd would.

use std::time::{Duration, Instant};

use etcd_fanout::proto::etcdserverpb::{
    watch_client::WatchClient, watch_request::RequestUnion, WatchCreateRequest, WatchRequest,
};
use testkit::auth::*;
use testkit::fault::Relay;
use testkit::{Etcd, Proxy};

const PREFIX: &str = "/apisix/";

/// etcd with auth on: `root`, `fanout` (the proxy: read on `/apisix/`), `reader` (a client:
/// read on `/apisix/`) and `other` (read on `/other/` only).
fn etcd_with_auth(extra: &[&str]) -> Etcd {
    let etcd = Etcd::start_with(extra);
    add_reader(&etcd, None, "fanout", "fanout-pw", &[PREFIX]);
    add_reader(&etcd, None, "reader", "reader-pw", &[PREFIX]);
    add_reader(&etcd, None, "other", "other-pw", &["/other/"]);
    enable_auth(&etcd);
    etcd
}

/// Opens a watch on `PREFIX` from `start` at `url` with `token` and returns the revision of
/// every event it receives, in order, once `want` events arrived (plus a short grace period
/// that would reveal a repeated event) or `timeout` passed.
async fn watch_revisions(
    url: &str,
    token: Option<&str>,
    start: i64,
    want: usize,
    timeout: Duration,
) -> Vec<i64> {
    let (tx, mut stream) = open_prefix_watch(url, token, start).await;
    let mut revs = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut grace: Option<Instant> = None;
    loop {
        let until = grace.unwrap_or(deadline).min(deadline);
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.message()).await {
            Err(_) => break,
            Ok(Err(e)) => panic!("watch through {url} failed: {e}"),
            Ok(Ok(None)) => panic!("watch through {url} ended"),
            Ok(Ok(Some(resp))) => {
                assert!(
                    !resp.canceled,
                    "watch through {url} canceled: {}",
                    resp.cancel_reason
                );
                revs.extend(
                    resp.events
                        .iter()
                        .map(|e| e.kv.as_ref().map_or(0, |kv| kv.mod_revision)),
                );
                if revs.len() >= want && grace.is_none() {
                    grace = Some(Instant::now() + Duration::from_millis(500));
                }
            }
        }
    }
    drop(tx);
    revs
}

/// Opens a watch stream at `url` (with `token`) and creates one watch of `PREFIX` from
/// `start`; the request sender keeps the stream open.
async fn open_prefix_watch(
    url: &str,
    token: Option<&str>,
    start: i64,
) -> (
    tokio::sync::mpsc::Sender<WatchRequest>,
    tonic::Streaming<etcd_fanout::proto::etcdserverpb::WatchResponse>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: PREFIX.into(),
            range_end: testkit::range_end(PREFIX),
            start_revision: start,
            ..Default::default()
        })),
    })
    .await
    .expect("send create");
    let stream = WatchClient::new(testkit::channel(url).await)
        .watch(with_token(
            token,
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .await
        .expect("watch stream")
        .into_inner();
    (tx, stream)
}

/// The first response to a watch of `PREFIX` at `url` (with `token`).
async fn first_watch_response(
    url: &str,
    token: Option<&str>,
) -> etcd_fanout::proto::etcdserverpb::WatchResponse {
    let (tx, mut stream) = open_prefix_watch(url, token, 0).await;
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a watch response in time")
        .expect("watch stream")
        .expect("a watch response");
    drop(tx);
    first
}

/// The keys, values and revisions of a Range answer (what a client reads).
fn kvs(r: &etcd_fanout::proto::etcdserverpb::RangeResponse) -> Vec<(Vec<u8>, Vec<u8>, i64)> {
    r.kvs
        .iter()
        .map(|kv| (kv.key.to_vec(), kv.value.to_vec(), kv.mod_revision))
        .collect()
}

/// Waits until metric `name` of `proxy` reaches `want`.
async fn wait_metric(proxy: &Proxy, name: &str, want: f64, timeout: Duration) {
    let start = Instant::now();
    while proxy.metric(name) < want {
        assert!(
            start.elapsed() < timeout,
            "{name} stayed at {} (< {want}):\n{}",
            proxy.metric(name),
            proxy.plain_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Three tokenless puts (`/apisix/{tag}0..2`) recorded in `want`, waited for until the
/// proxy's upstream watch has seen every write in `want`; returns that count.
async fn put_three_seen(etcd: &Etcd, proxy: &Proxy, tag: &str, want: &mut Vec<i64>) -> f64 {
    for i in 0..3 {
        want.push(testkit::put(&etcd.url, &format!("/apisix/{tag}{i}"), "0").await);
    }
    let writes = want.len() as f64;
    wait_metric(
        proxy,
        "etcd_fanout_upstream_events_total",
        writes,
        Duration::from_secs(30),
    )
    .await;
    writes
}

/// A Range request of `PREFIX` through the gateway, as APISIX sends it (no token): status,
/// whether chunked, and the body chunks.
fn gateway_range(port: u16) -> (u16, bool, Vec<Vec<u8>>) {
    let body = r#"{"key":"L2FwaXNpeC8=","range_end":"L2FwaXNpeDA="}"#;
    let r = testkit::http::post(port, "/v3/kv/range", body);
    (r.status, r.chunked, r.chunks)
}

/// The `reader` user, logged in through the proxy, watches `PREFIX` from `first` and gets
/// exactly `want`, and reads the prefix through the proxy as it reads it on etcd.
async fn assert_reader_served(etcd: &Etcd, proxy: &Proxy, first: i64, want: &[i64]) {
    let reader = token(&proxy.url, "reader", "reader-pw").await;
    let revs = watch_revisions(
        &proxy.url,
        Some(&reader),
        first,
        want.len(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(revs, want);
    let direct = range_prefix(&etcd.url, Some(&reader), PREFIX, false)
        .await
        .expect("etcd");
    let via = range_prefix(&proxy.url, Some(&reader), PREFIX, false)
        .await
        .expect("proxy");
    assert_eq!(kvs(&via), kvs(&direct));
}

/// With a failed identity the proxy must not be ready and must forward every request for
/// the prefix, so clients get exactly etcd's answers.
async fn assert_forwarded_as_etcd(etcd: &Etcd, proxy: &Proxy) {
    for _ in 0..3 {
        assert_eq!(proxy.readyz(), 503, "/readyz:\n{}", proxy.plain_log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let reader = token(&etcd.url, "reader", "reader-pw").await;
    for serializable in [false, true] {
        let direct = range_prefix(&etcd.url, Some(&reader), PREFIX, serializable)
            .await
            .expect("range on etcd");
        let via = range_prefix(&proxy.url, Some(&reader), PREFIX, serializable)
            .await
            .expect("range through the proxy");
        assert_eq!(kvs(&via), kvs(&direct));
        assert_eq!(via.count, direct.count);
        assert!(!direct.kvs.is_empty());
    }
    // Without a token, etcd's refusal, word for word.
    let direct = range_prefix(&etcd.url, None, PREFIX, true)
        .await
        .expect_err("tokenless range on etcd");
    let via = range_prefix(&proxy.url, None, PREFIX, true)
        .await
        .expect_err("tokenless range through the proxy");
    assert_eq!(
        (via.code(), via.message()),
        (direct.code(), direct.message())
    );
    assert_eq!(gateway_range(proxy.port), gateway_range(etcd.port));
    // A tokenless watch: etcd's refusal too, not the cache.
    let direct = first_watch_response(&etcd.url, None).await;
    let via = first_watch_response(&proxy.url, None).await;
    assert!(direct.canceled, "{direct:?}");
    assert_eq!(
        (via.created, via.canceled, via.watch_id, via.cancel_reason),
        (
            direct.created,
            direct.canceled,
            direct.watch_id,
            direct.cancel_reason
        )
    );
    assert_eq!(proxy.metric("etcd_fanout_ranges_cached_total"), 0.0);
    assert!(proxy.metric("etcd_fanout_ranges_forwarded_total") >= 3.0);
    assert_eq!(proxy.metric("etcd_fanout_upstream_watches"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn good_credentials_fill_the_cache_through_auth() {
    let etcd = etcd_with_auth(&[]);
    let root_token = token(&etcd.url, "root", ROOT_PASSWORD).await;
    let first = put(&etcd.url, &root_token, "/apisix/routes/0", "v0").await;
    put(&etcd.url, &root_token, "/outside", "x").await;

    // The password from a mounted-Secret-like file, with its trailing newline.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("password");
    std::fs::write(&file, "fanout-pw\n").expect("password file");
    let proxy = Proxy::start_with(
        &etcd.url,
        &[PREFIX],
        &[
            "--user",
            "fanout",
            "--password-file",
            file.to_str().expect("path"),
        ],
    );
    assert!(
        proxy.plain_log().contains("logged in to etcd"),
        "{}",
        proxy.plain_log()
    );

    // A client logs in through the proxy (Authenticate is forwarded) and watches.
    let reader = token(&proxy.url, "reader", "reader-pw").await;
    let mut watchers = Vec::new();
    const WRITES: usize = 20;
    for _ in 0..4 {
        let (url, reader) = (proxy.url.clone(), reader.clone());
        watchers.push(tokio::spawn(async move {
            watch_revisions(
                &url,
                Some(&reader),
                first,
                WRITES + 1,
                Duration::from_secs(60),
            )
            .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut want = vec![first];
    for i in 0..WRITES {
        // Root writes directly on etcd; some writes outside the prefix in between.
        want.push(
            put(
                &etcd.url,
                &root_token,
                &format!("/apisix/routes/{i}"),
                &format!("v{i}"),
            )
            .await,
        );
        if i % 5 == 0 {
            put(&etcd.url, &root_token, "/outside", &format!("{i}")).await;
        }
    }
    for w in watchers {
        assert_eq!(
            w.await.expect("watcher"),
            want,
            "every revision once, in order"
        );
    }
    // The proxy's own upstream watch got every event once.
    wait_metric(
        &proxy,
        "etcd_fanout_upstream_events_total",
        WRITES as f64,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        proxy.metric("etcd_fanout_upstream_events_total"),
        WRITES as f64
    );
    assert_eq!(proxy.metric("etcd_fanout_upstream_watches"), 1.0);
    for serializable in [false, true] {
        let direct = range_prefix(&etcd.url, Some(&reader), PREFIX, serializable)
            .await
            .expect("etcd");
        let via = range_prefix(&proxy.url, Some(&reader), PREFIX, serializable)
            .await
            .expect("proxy");
        assert_eq!(kvs(&via), kvs(&direct));
    }
    // Read permission on the prefix only: the history backfill replays the prefix alone and
    // completes with the first write after the load.
    proxy.wait_log("history backfilled", Duration::from_secs(40));
    let log = proxy.plain_log();
    assert!(log.contains("applied=true"), "{log}");
    assert!(
        !log.contains("fanout-pw"),
        "the password must never be logged:\n{log}"
    );
    assert!(!log.contains("cannot read the prefix"), "{log}");
    assert!(!log.contains("compaction probe"), "{log}");
    assert_eq!(proxy.readyz(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_is_loud_and_nothing_is_served_from_the_cache() {
    let etcd = etcd_with_auth(&[]);
    let root_token = token(&etcd.url, "root", ROOT_PASSWORD).await;
    for i in 0..3 {
        put(&etcd.url, &root_token, &format!("/apisix/routes/{i}"), "v").await;
    }
    let proxy = Proxy::start_unready(
        &etcd.url,
        &[PREFIX],
        &["--user", "fanout:wrong-secret-42"],
        &[],
    );
    proxy.wait_log("etcd login failed", Duration::from_secs(20));
    proxy.wait_log("cannot read the prefix", Duration::from_secs(20));
    assert_forwarded_as_etcd(&etcd, &proxy).await;
    let log = proxy.plain_log();
    assert!(
        log.contains("authentication failed, invalid user ID or password"),
        "{log}"
    );
    assert!(log.contains(r#"prefix="/apisix/""#), "{log}");
    assert!(
        log.contains("the proxy cannot log in to etcd as user fanout"),
        "{log}"
    );
    assert!(
        !log.contains("wrong-secret-42"),
        "the password must never be logged:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn user_without_read_on_the_prefix_is_loud_and_nothing_is_served() {
    let etcd = etcd_with_auth(&[]);
    let root_token = token(&etcd.url, "root", ROOT_PASSWORD).await;
    for i in 0..3 {
        put(&etcd.url, &root_token, &format!("/apisix/routes/{i}"), "v").await;
    }
    // Credentials from the environment this time.
    let proxy = Proxy::start_unready(
        &etcd.url,
        &[PREFIX],
        &[],
        &[
            ("ETCD_FANOUT_USER", "other"),
            ("ETCD_FANOUT_PASSWORD", "other-pw"),
        ],
    );
    proxy.wait_log("lacks read permission", Duration::from_secs(20));
    assert_forwarded_as_etcd(&etcd, &proxy).await;
    let log = proxy.plain_log();
    assert!(log.contains("logged in to etcd"), "{log}");
    assert!(log.contains(r#"etcd user other lacks read permission on the prefix: grant it read on ["/apisix/", "/apisix0")"#), "{log}");
    assert!(log.contains("etcdserver: permission denied"), "{log}");
    assert!(!log.contains("other-pw"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn token_expiry_and_etcd_restart_lose_nothing() {
    // Simple tokens die after 3 s without use, and on an etcd restart (etcd 3.4 revives the
    // tokens its WAL replay re-applies, for one TTL: the relay keeps the proxies away from the
    // restarted etcd for longer than that, so every token they hold is dead when they return).
    let mut etcd = etcd_with_auth(&["--auth-token-ttl", "3"]);
    let relay = Relay::start(etcd.port);
    let first = put(
        &etcd.url,
        &token(&etcd.url, "root", ROOT_PASSWORD).await,
        "/apisix/a",
        "0",
    )
    .await;
    // A: default renewal (300 s) and a 10 s compaction poll, so its token idles out at etcd
    // and is replaced after etcd's `invalid auth token`. B: renews every 1.5 s (told etcd's
    // TTL), before etcd can expire it.
    let a = Proxy::start_with(
        &relay.url,
        &[PREFIX],
        &["--user", "fanout:fanout-pw", "--compaction-poll", "10s"],
    );
    let b = Proxy::start_with(
        &relay.url,
        &[PREFIX],
        &["--user", "fanout:fanout-pw", "--auth-token-ttl", "3s"],
    );
    let mut want = vec![first];
    for i in 0..3 {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let root_token = token(&etcd.url, "root", ROOT_PASSWORD).await;
        want.push(put(&etcd.url, &root_token, &format!("/apisix/b{i}"), "1").await);
    }
    wait_metric(
        &a,
        "etcd_fanout_upstream_logins_total",
        2.0,
        Duration::from_secs(30),
    )
    .await;
    wait_metric(
        &b,
        "etcd_fanout_upstream_logins_total",
        4.0,
        Duration::from_secs(30),
    )
    .await;
    for p in [&a, &b] {
        assert_eq!(p.readyz(), 200);
        wait_metric(
            p,
            "etcd_fanout_upstream_events_total",
            3.0,
            Duration::from_secs(20),
        )
        .await;
    }

    // kill -9, restart, and writes while the proxies cannot reach etcd.
    let logins = [&a, &b].map(|p| p.metric("etcd_fanout_upstream_logins_total"));
    relay.refuse();
    etcd.kill();
    relay.drop_all();
    etcd.restart();
    let root_token = token(&etcd.url, "root", ROOT_PASSWORD).await;
    for i in 0..3 {
        want.push(put(&etcd.url, &root_token, &format!("/apisix/c{i}"), "2").await);
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    relay.pass();
    let root_token = token(&etcd.url, "root", ROOT_PASSWORD).await;
    for i in 0..3 {
        want.push(put(&etcd.url, &root_token, &format!("/apisix/d{i}"), "3").await);
    }
    let writes = (want.len() - 1) as f64;
    for (p, before) in [&a, &b].into_iter().zip(logins) {
        wait_metric(
            p,
            "etcd_fanout_upstream_events_total",
            writes,
            Duration::from_secs(40),
        )
        .await;
        wait_metric(
            p,
            "etcd_fanout_upstream_watch_restarts_total",
            1.0,
            Duration::from_secs(5),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        // No event lost or repeated on the proxy's own watch, re-created under a new token.
        assert_eq!(
            p.metric("etcd_fanout_upstream_events_total"),
            writes,
            "{}",
            p.plain_log()
        );
        assert_eq!(p.metric("etcd_fanout_upstream_watches"), 1.0);
        assert!(
            p.metric("etcd_fanout_upstream_logins_total") > before,
            "{}",
            p.plain_log()
        );
        assert_eq!(p.readyz(), 200);
        assert_reader_served(&etcd, p, first, &want).await;
        let log = p.plain_log();
        assert!(!log.contains("cannot read the prefix"), "{log}");
        assert!(!log.contains(" ERROR "), "{log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_enabled_after_the_proxy_started() {
    let mut etcd = Etcd::start();
    add_reader(&etcd, None, "fanout", "fanout-pw", &[PREFIX]);
    add_reader(&etcd, None, "reader", "reader-pw", &[PREFIX]);
    let proxy = Proxy::start_with(&etcd.url, &[PREFIX], &["--user", "fanout:fanout-pw"]);
    proxy.wait_log("etcd has auth disabled", Duration::from_secs(10));
    assert_eq!(proxy.metric("etcd_fanout_upstream_logins_total"), 0.0);
    let mut want = Vec::new();
    // Auth is off: writes need no token (etcd ignores none).
    for i in 0..3 {
        want.push(testkit::put(&etcd.url, &format!("/apisix/a{i}"), "0").await);
    }
    enable_auth(&etcd);
    let root_token = token(&etcd.url, "root", ROOT_PASSWORD).await;
    for i in 0..3 {
        want.push(put(&etcd.url, &root_token, &format!("/apisix/b{i}"), "1").await);
    }
    // The first tokenless call etcd refuses (a compaction poll, every second) makes it log in.
    wait_metric(
        &proxy,
        "etcd_fanout_upstream_logins_total",
        1.0,
        Duration::from_secs(20),
    )
    .await;
    etcd.restart();
    let root_token = token(&etcd.url, "root", ROOT_PASSWORD).await;
    for i in 0..3 {
        want.push(put(&etcd.url, &root_token, &format!("/apisix/c{i}"), "2").await);
    }
    let writes = want.len() as f64;
    wait_metric(
        &proxy,
        "etcd_fanout_upstream_events_total",
        writes,
        Duration::from_secs(30),
    )
    .await;
    wait_metric(
        &proxy,
        "etcd_fanout_upstream_watch_restarts_total",
        1.0,
        Duration::from_secs(5),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(proxy.metric("etcd_fanout_upstream_events_total"), writes);
    assert_eq!(proxy.metric("etcd_fanout_upstream_watches"), 1.0);
    assert_eq!(proxy.readyz(), 200);
    assert_reader_served(&etcd, &proxy, want[0], &want).await;
    let log = proxy.plain_log();
    assert!(log.contains("logged in to etcd"), "{log}");

    // And disabled again: the proxy's token is refused or ignored, its login answered with
    // `authentication is not enabled`, and it goes on without a token.
    etcdctl(&etcd, Some(&root()), &["auth", "disable"]);
    put_three_seen(&etcd, &proxy, "d", &mut want).await;
    etcd.restart();
    let writes = put_three_seen(&etcd, &proxy, "e", &mut want).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(proxy.metric("etcd_fanout_upstream_events_total"), writes);
    assert_eq!(proxy.readyz(), 200);
    // Auth is off: a tokenless watcher (etcd 3.4.23 refuses the reader's old token after
    // `auth disable` with `invalid auth token`; 3.4.28+ would ignore it).
    let revs = watch_revisions(
        &proxy.url,
        None,
        want[0],
        want.len(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(revs, want);
    let log = proxy.plain_log();
    assert!(log.matches("etcd has auth disabled").count() >= 2, "{log}");
    assert!(!log.contains("cannot read the prefix"), "{log}");
    assert!(!log.contains(" ERROR "), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_renewed_before_exp_and_after_an_auth_revision_bump() {
    // JWTs live 6 s, fixed (not extended by use), and die with any auth revision bump.
    let keys = tempfile::tempdir().expect("tempdir");
    let (private, public) = jwt_keys(keys.path());
    let token_flag = format!("jwt,pub-key={public},priv-key={private},sign-method=RS256,ttl=6s");
    let mut etcd = etcd_with_auth(&["--auth-token", &token_flag]);
    let root_token = token(&etcd.url, "root", ROOT_PASSWORD).await;
    assert_eq!(root_token.split('.').count(), 3, "a JWT: {root_token}");
    let first = put(&etcd.url, &root_token, "/apisix/a", "0").await;
    let proxy = Proxy::start_unready(
        &etcd.url,
        &[PREFIX],
        &["--user", "fanout:fanout-pw"],
        &[("RUST_LOG", "info,etcd_fanout=debug")],
    );
    proxy.wait_log("upstream watch established", Duration::from_secs(30));
    // Renewed from the `exp` claim (half way through a lifetime this short), before etcd
    // refuses it: over 10 s at least 3 logins, none after a refusal.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        proxy.metric("etcd_fanout_upstream_logins_total") >= 3.0,
        "{}",
        proxy.plain_log()
    );
    let log = proxy.plain_log();
    assert!(!log.contains("refused the proxy's token"), "{log}");
    assert!(log.contains("etcd token renewed"), "{log}");

    // Any auth change makes every JWT issued before it fail with `revision of auth store is
    // old`: the proxy logs in again and retries.
    etcdctl(&etcd, Some(&root()), &["role", "add", "unrelated"]);
    proxy.wait_log(
        "etcd refused the proxy's token; logging in again error=etcdserver: revision of auth store is old",
        Duration::from_secs(20),
    );
    let mut want = vec![first];
    let root_token = token(&etcd.url, "root", ROOT_PASSWORD).await;
    for i in 0..3 {
        want.push(put(&etcd.url, &root_token, &format!("/apisix/b{i}"), "1").await);
    }
    // JWTs survive an etcd restart (stateless): the watch is re-created under the current one.
    etcd.restart();
    let root_token = token(&etcd.url, "root", ROOT_PASSWORD).await;
    for i in 0..3 {
        want.push(put(&etcd.url, &root_token, &format!("/apisix/c{i}"), "2").await);
    }
    let writes = (want.len() - 1) as f64;
    wait_metric(
        &proxy,
        "etcd_fanout_upstream_events_total",
        writes,
        Duration::from_secs(30),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(proxy.metric("etcd_fanout_upstream_events_total"), writes);
    assert_eq!(proxy.metric("etcd_fanout_upstream_watches"), 1.0);
    assert_eq!(proxy.readyz(), 200);
    let reader = token(&proxy.url, "reader", "reader-pw").await;
    let revs = watch_revisions(
        &proxy.url,
        Some(&reader),
        first,
        want.len(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(revs, want);
    let log = proxy.plain_log();
    assert!(!log.contains("cannot read the prefix"), "{log}");
    assert!(!log.contains(" ERROR "), "{log}");
}
