//! An APISIX fleet on the HTTP gateway (`testkit::apisix`): simulated APISIX 3.x workers, each
//! reading the whole `/apisix` prefix once (range `/apisix`..`/apisiy`), then watching
//! `/apisix/` over HTTP/1.1 from `header.revision + 1`, closing and re-opening the watch every
//! ~2 s with the revision it resumes from, while a writer changes routes (puts, deletes,
//! transactions, and writes outside the prefix). Every worker must see every revision of the
//! prefix exactly once and in order, never a header revision below its resume point, and end
//! with etcd's state.
//!
//! The second test is the same fleet against an etcd with auth on, as APISIX runs with
//! `deployment.etcd.user`/`password`: each worker authenticates through the proxy
//! (`/v3/auth/authenticate`), sends its token as the raw `Authorization` header on every range
//! and watch, and authenticates again every 4 to 5.3 s (etcd's simple tokens live 10 s here). The
//! refusals APISIX matches on (`etcdserver: user name is empty`, `etcdserver: permission
//! denied`) are diffed byte for byte against etcd's first.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use testkit::apisix::{run_fleet, seed, Client, Login, Pace};
use testkit::auth::{add_reader, enable_auth, ROOT_PASSWORD};
use testkit::gateway::{b64, first_difference, same_with, IDENTITY};
use testkit::http::Conn;
use testkit::{etcd_metric, Etcd, Proxy};

const WORKERS: usize = 50;
const WRITE_FOR: Duration = Duration::from_secs(8);
const PACE: Pace = Pace {
    reconnect_every: Duration::from_secs(2),
    deadline: Duration::from_secs(90),
};

#[test]
fn apisix_fleet_over_http_watch() {
    let etcd = Etcd::start();
    let proxy = Proxy::start(&etcd.url, &["/apisix/"]);
    let mut admin = Client::new(etcd.port, None);
    seed(&mut admin);
    let seen = run_fleet(proxy.port, WORKERS, None, PACE, &mut admin, WRITE_FOR);
    let reconnects: usize = seen.iter().map(|s| s.reconnects).sum();
    let low_created: usize = seen.iter().map(|s| s.low_created).sum();
    eprintln!(
        "{reconnects} watches opened; {low_created} `created` headers below the resume point"
    );
    assert!(
        reconnects >= WORKERS * 3,
        "the fleet reconnected ({reconnects} watches)"
    );
    drop(proxy);
}

/// Workers of the authenticated fleet (fewer than above: every login costs etcd a bcrypt
/// check, about 250 ms of a loaded 2-core machine, and this fleet logs in every few seconds).
const AUTH_WORKERS: usize = 10;
/// etcd's `--auth-token-ttl` in the authenticated fleet (seconds).
const TOKEN_TTL: &str = "10";
/// How often an authenticated worker logs in again, plus up to a third (lua-resty-etcd: every
/// 180 to 240 s).
const REFRESH: Duration = Duration::from_secs(4);

/// The first chunk of a `POST /v3/watch` of `/apisix/` with `headers` (the stream stays open,
/// as etcd keeps it after refusing a create).
fn first_watch_chunk(port: u16, headers: &[(&str, &str)]) -> String {
    let body = format!(
        r#"{{"create_request":{{"key":"{}","range_end":"{}"}}}}"#,
        b64("/apisix/"),
        b64("/apisix0")
    );
    let mut conn = Conn::send(port, "POST", "/v3/watch", headers, body.as_bytes())
        .unwrap_or_else(|e| panic!("watch on {port}: {e}"));
    conn.read_head()
        .unwrap_or_else(|e| panic!("watch on {port}: {e}"));
    let chunk = conn
        .next_chunk()
        .unwrap_or_else(|e| panic!("watch on {port}: {e}"))
        .unwrap_or_default();
    let text = format!("{} {}", conn.status, String::from_utf8_lossy(&chunk));
    conn.close();
    text
}

#[test]
fn authenticated_apisix_fleet_over_http_watch() {
    let etcd = Etcd::start_with(&["--auth-token-ttl", TOKEN_TTL]);
    add_reader(&etcd, None, "fanout", "fanout-pw", &["/apisix/"]);
    // APISIX reads `/apisix`..`/apisiy` at start: its role covers the prefix `/apisix`.
    add_reader(&etcd, None, "apisix", "apisix-pw", &["/apisix"]);
    add_reader(&etcd, None, "other", "other-pw", &["/other/"]);
    enable_auth(&etcd);
    let proxy = Proxy::start_unready(
        &etcd.url,
        &["/apisix/"],
        &[
            "--user",
            "fanout:fanout-pw",
            "--auth-token-ttl",
            "10s",
            // Below etcd's token TTL: requests answered from the cache do not renew a token.
            "--auth-decision-ttl",
            "1s",
        ],
        &[],
    );
    assert!(
        testkit::wait_until(Duration::from_secs(30), || proxy.readyz() == 200),
        "proxy never ready:\n{}",
        proxy.plain_log()
    );
    let root_login = |port| {
        Client::new(
            port,
            Some(Login {
                user: "root".into(),
                password: ROOT_PASSWORD.into(),
                refresh: REFRESH,
            }),
        )
    };
    let mut admin = root_login(etcd.port);
    seed(&mut admin);

    // The refusals APISIX matches on, as etcd words them (status, headers, JSON).
    let range = format!(
        r#"{{"key":"{}","range_end":"{}"}}"#,
        b64("/apisix"),
        b64("/apisiy")
    );
    let (r, _) = same_with(
        etcd.port,
        proxy.port,
        "POST",
        "/v3/kv/range",
        &[],
        &range,
        IDENTITY,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        r.json()["error"],
        "etcdserver: user name is empty",
        "{}",
        r.text()
    );
    let mut other = Client::new(
        etcd.port,
        Some(Login {
            user: "other".into(),
            password: "other-pw".into(),
            refresh: Duration::from_secs(60),
        }),
    );
    let other_headers = other.auth_headers().expect("authenticate other");
    let other_token = other_headers[0].1.as_str();
    let (r, _) = same_with(
        etcd.port,
        proxy.port,
        "POST",
        "/v3/kv/range",
        &[("Authorization", other_token)],
        &range,
        IDENTITY,
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(
        r.json()["error"],
        "etcdserver: permission denied",
        "{}",
        r.text()
    );
    for (what, headers) in [
        ("tokenless", vec![]),
        ("forbidden", vec![("Authorization", other_token)]),
    ] {
        let (a, b) = (
            first_watch_chunk(etcd.port, &headers),
            first_watch_chunk(proxy.port, &headers),
        );
        assert_eq!(a, b, "{what} watch:\n{}", first_difference(&a, &b));
        assert!(a.contains(r#""canceled":true"#), "{what} watch: {a}");
    }

    // The fleet, while etcd's watchers are sampled.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (sampling, port) = (sampling.clone(), etcd.port);
        std::thread::spawn(move || {
            let mut max = 0f64;
            while sampling.load(Ordering::SeqCst) {
                max = max.max(etcd_metric(port, "etcd_debugging_mvcc_watcher_total"));
                std::thread::sleep(Duration::from_millis(200));
            }
            max
        })
    };
    let probes_before = proxy.metric("etcd_fanout_auth_probes_total");
    let login = Login {
        user: "apisix".into(),
        password: "apisix-pw".into(),
        refresh: REFRESH,
    };
    let seen = run_fleet(
        proxy.port,
        AUTH_WORKERS,
        Some(login),
        Pace {
            reconnect_every: Duration::from_secs(2),
            deadline: Duration::from_secs(120),
        },
        &mut admin,
        Duration::from_secs(15),
    );
    sampling.store(false, Ordering::SeqCst);
    let max_watchers = sampler.join().expect("sampler");
    let probes = proxy.metric("etcd_fanout_auth_probes_total") - probes_before;
    let reconnects: usize = seen.iter().map(|s| s.reconnects).sum();
    let logins: usize = seen.iter().map(|s| s.logins).sum();
    eprintln!(
        "{AUTH_WORKERS} authenticated workers: {reconnects} watches opened, {logins} logins, \
         {probes} permission probes, at most {max_watchers} watchers on etcd"
    );
    assert!(
        seen.iter().all(|s| s.logins >= 2),
        "every worker re-authenticated: {:?}",
        seen.iter().map(|s| s.logins).collect::<Vec<_>>()
    );
    assert!(
        reconnects >= AUTH_WORKERS * 3,
        "the fleet reconnected ({reconnects} watches)"
    );
    // The fleet's watches share the proxy's one upstream watch (a compaction probe may add
    // a short-lived one).
    assert!(
        max_watchers <= 2.0,
        "etcd served {max_watchers} watchers for the fleet"
    );
    // A probe per token and key range, remembered for the decision TTL (1 s here, shorter
    // than the 2 s between a worker's watches): at most one per watch opened (the initial
    // ranges of `/apisix`..`/apisiy` lie outside the cached prefix and are forwarded).
    assert!(
        probes <= reconnects as f64,
        "{probes} probes for {reconnects} watches"
    );
}
