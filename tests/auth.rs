//! Identity: etcd's decisions for every request the proxy serves from its cache, against a
//! real etcd 3.4 with auth enabled (no mock).
//!
//! The differential tests run one scenario on a reference etcd and on etcd-fanout in front of a
//! second etcd, with the same users, roles, keys and writes on both: every answer (ranges,
//! watch creates and refusals, events) must be the same. The proxy is started while auth is
//! off (it has no credentials of its own yet), then auth is enabled on its etcd: etcd does not
//! re-check open watches, so the proxy's upstream watch keeps feeding the cache.
//!
//! A leak checker then replays, for every identity, each key-value it received through the
//! proxy as a direct read on etcd with the same identity: etcd must give it the same bytes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etcd_fanout::proto::etcdserverpb::{
    auth_client::AuthClient, kv_client::KvClient, request_op, watch_client::WatchClient,
    AuthEnableRequest, AuthRoleAddRequest, AuthRoleGrantPermissionRequest, AuthUserAddRequest,
    AuthUserGrantRoleRequest, AuthenticateRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
    WatchCreateRequest, WatchResponse,
};
use etcd_fanout::proto::{authpb, mvccpb::KeyValue};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::Channel;

use testkit::diff::{self, b, status_str, Next, Opts, Rec, Side, WatchConn};
use testkit::{gateway, http};

/// Backstop of one scenario run (many identities, streams and quiet periods).
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(180);

/// Password of every test user.
const PASSWORD: &str = "pw";

/// Keys written before auth is enabled (revisions 2..=9 on a fresh etcd).
const KEYS: [&str; 8] = [
    "/apisix/a1",
    "/apisix/b1",
    "/apisix/c1",
    "/apisix/d1",
    "/apisix/f1",
    "/apisix/routes/1",
    "/apisix/routes/2",
    "/apisix/x",
];

/// Keys written while the watches are open.
const LATER: [&str; 4] = ["/apisix/a2", "/apisix/d2", "/apisix/routes/3", "/apisix/x2"];

/// One role's permission: key, range end, `r`ead or `w`rite.
type Perm = (&'static str, &'static str, char);

/// Users and the key ranges of their roles (one role per permission).
const USERS: &[(&str, &[Perm])] = &[
    ("pre", &[("/apisix/routes/", "/apisix/routes0", 'r')]),
    ("rng", &[("/apisix/a", "/apisix/m", 'r')]),
    (
        "adj",
        &[
            ("/apisix/a", "/apisix/c", 'r'),
            ("/apisix/c", "/apisix/e", 'r'),
        ],
    ),
    ("ro", &[("/apisix/", "/apisix0", 'r')]),
    ("wo", &[("/apisix/", "/apisix0", 'w')]),
    ("pt", &[("/apisix/b1", "", 'r')]),
];

/// The key ranges every identity tries: whole prefix, a sub-prefix, a key range, ranges
/// covered by two adjacent grants or only partly, single keys, an inverted range.
const RANGES: &[(&str, &str)] = &[
    ("/apisix/", "/apisix0"),
    ("/apisix/routes/", "/apisix/routes0"),
    ("/apisix/a", "/apisix/m"),
    ("/apisix/a", "/apisix/e"),
    ("/apisix/a", "/apisix/f"),
    ("/apisix/routes/1", ""),
    ("/apisix/b1", ""),
    ("/apisix/c", "/apisix/b"),
];

/// Who sends a request.
#[derive(Debug, Clone)]
enum Who {
    /// No token.
    Nobody,
    /// A token etcd never issued.
    Bogus,
    /// A user (token from `Authenticate`).
    User(&'static str),
}

impl Who {
    fn all() -> Vec<Who> {
        let mut v = vec![Who::Nobody, Who::Bogus, Who::User("root")];
        v.extend(USERS.iter().map(|(u, _)| Who::User(u)));
        v
    }

    fn label(&self) -> String {
        match self {
            Who::Nobody => "nobody".into(),
            Who::Bogus => "bogus".into(),
            Who::User(u) => (*u).into(),
        }
    }
}

/// gRPC metadata carrying `token` (or nothing).
fn md(token: Option<&str>) -> MetadataMap {
    let mut m = MetadataMap::new();
    if let Some(t) = token {
        m.insert(
            "token",
            AsciiMetadataValue::try_from(t).expect("ascii token"),
        );
    }
    m
}

fn req<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    *r.metadata_mut() = md(token);
    r
}

async fn channel(url: &str) -> Channel {
    testkit::channel(url).await
}

/// Users, roles (and root) on the etcd at `url`, auth still off.
async fn create_users(url: &str) {
    let mut auth = AuthClient::new(channel(url).await);
    for (user, perms) in USERS.iter().copied().chain([("root", &[][..])]) {
        auth.user_add(AuthUserAddRequest {
            name: user.into(),
            password: PASSWORD.into(),
            ..Default::default()
        })
        .await
        .expect("user add");
        for (i, (k, e, rw)) in perms.iter().enumerate() {
            let role = format!("{user}{i}");
            auth.role_add(AuthRoleAddRequest { name: role.clone() })
                .await
                .expect("role add");
            let perm_type = if *rw == 'r' {
                authpb::permission::Type::Read
            } else {
                authpb::permission::Type::Write
            };
            auth.role_grant_permission(AuthRoleGrantPermissionRequest {
                name: role.clone(),
                perm: Some(authpb::Permission {
                    perm_type: perm_type as i32,
                    key: b(k),
                    range_end: b(e),
                }),
            })
            .await
            .expect("grant");
            auth.user_grant_role(AuthUserGrantRoleRequest {
                user: user.into(),
                role,
            })
            .await
            .expect("user grant");
        }
    }
    auth.user_grant_role(AuthUserGrantRoleRequest {
        user: "root".into(),
        role: "root".into(),
    })
    .await
    .expect("grant root");
}

async fn enable_auth(url: &str) {
    AuthClient::new(channel(url).await)
        .auth_enable(AuthEnableRequest {})
        .await
        .expect("auth enable");
}

/// A token for `user` from the server at `url`.
async fn login(url: &str, user: &str) -> String {
    AuthClient::new(channel(url).await)
        .authenticate(AuthenticateRequest {
            name: user.into(),
            password: PASSWORD.into(),
        })
        .await
        .expect("authenticate")
        .into_inner()
        .token
}

/// The token `who` sends to the server at `url`.
async fn token_of(url: &str, who: &Who) -> Option<String> {
    match who {
        Who::Nobody => None,
        Who::Bogus => Some("bogus".into()),
        Who::User(u) => Some(login(url, u).await),
    }
}

async fn put_as(url: &str, token: Option<&str>, k: &str, v: &str) {
    KvClient::new(channel(url).await)
        .put(req(
            PutRequest {
                key: b(k),
                value: b(v),
                ..Default::default()
            },
            token,
        ))
        .await
        .unwrap_or_else(|e| panic!("put {k}: {e}"));
}

/// Waits (bounded) until tokenless reads through `url` get etcd's refusal (`on`) or an answer.
async fn wait_auth(url: &str, on: bool) {
    let mut kv = KvClient::new(channel(url).await);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        let r = kv
            .range(RangeRequest {
                key: b("/apisix/a1"),
                serializable: true,
                ..Default::default()
            })
            .await;
        if r.is_err() == on {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("auth state {on} not seen through {url}");
}

/// A range answer, recorded with its keys and values.
fn show_range(
    r: Result<tonic::Response<etcd_fanout::proto::etcdserverpb::RangeResponse>, tonic::Status>,
) -> String {
    match r {
        Ok(r) => {
            let r = r.into_inner();
            let kvs: Vec<String> = r
                .kvs
                .iter()
                .map(|kv| format!("{}@{}", String::from_utf8_lossy(&kv.key), kv.mod_revision))
                .collect();
            format!(
                "rev={} count={} more={} kvs={kvs:?}",
                r.header.map_or(0, |h| h.revision),
                r.count,
                r.more
            )
        }
        Err(s) => status_str(&s),
    }
}

fn show_watch(m: &WatchResponse) -> String {
    let evs: Vec<String> = m
        .events
        .iter()
        .map(|e| {
            let kv = e.kv.clone().unwrap_or_default();
            format!(
                "{}:{}@{}",
                e.r#type,
                String::from_utf8_lossy(&kv.key),
                kv.mod_revision
            )
        })
        .collect();
    format!(
        "id={} rev={} created={} canceled={} reason={:?} compact={} events={evs:?}",
        m.watch_id,
        m.header.map_or(0, |h| h.revision),
        m.created,
        m.canceled,
        m.cancel_reason,
        m.compact_revision
    )
}

/// Reads a watch stream until it stays quiet for `quiet`, grouped by watch id (etcd sends the
/// responses of different watches in map order), each watch's messages in arrival order.
async fn drain(conn: &mut WatchConn, quiet: Duration, got: &mut Vec<WatchResponse>) -> Vec<String> {
    drain_creates(conn, 0, quiet, got).await
}

/// [`drain`], but first waits (up to 20 s a message, so a loaded machine or a slow permission
/// probe cannot end it early) until `creates` `created` responses have arrived.
async fn drain_creates(
    conn: &mut WatchConn,
    creates: usize,
    quiet: Duration,
    got: &mut Vec<WatchResponse>,
) -> Vec<String> {
    let mut by_id: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    let mut created = 0;
    loop {
        let wait = if created < creates {
            Duration::from_secs(20)
        } else {
            quiet
        };
        match conn.next(wait).await {
            Next::Msg(m) => {
                if m.created {
                    created += 1;
                }
                by_id.entry(m.watch_id).or_default().push(show_watch(&m));
                got.push(m);
            }
            Next::Timeout => break,
            other => {
                by_id
                    .entry(i64::MAX)
                    .or_default()
                    .push(format!("{other:?}"));
                break;
            }
        }
    }
    by_id.into_values().flatten().collect()
}

/// Everything an identity received through one side, for the leak checker.
type Received = Vec<(Option<String>, KeyValue)>;

/// Populates, creates users, enables auth, then every identity ranges and watches every range;
/// later writes reach the watches. Returns what each identity received.
async fn scenario(side: Side, rec: Rec, received: std::sync::Arc<std::sync::Mutex<Received>>) {
    for (i, k) in KEYS.iter().enumerate() {
        put_as(&side.etcd_url, None, k, &format!("v{i}")).await;
    }
    create_users(&side.etcd_url).await;
    enable_auth(&side.etcd_url).await;
    wait_auth(&side.url, true).await;
    let root = login(&side.etcd_url, "root").await;

    let mut streams = Vec::new();
    for who in Who::all() {
        let token = token_of(&side.url, &who).await;
        let mut kv = KvClient::new(channel(&side.url).await);
        for (k, e) in RANGES {
            for (how, serializable, revision) in
                [("lin", false, 0), ("ser", true, 0), ("at4", true, 4)]
            {
                let r = kv
                    .range(req(
                        RangeRequest {
                            key: b(k),
                            range_end: b(e),
                            serializable,
                            revision,
                            ..Default::default()
                        },
                        token.as_deref(),
                    ))
                    .await;
                if let Ok(ok) = &r {
                    let mut got = received.lock().unwrap();
                    for kv in &ok.get_ref().kvs {
                        got.push((token.clone(), kv.clone()));
                    }
                }
                rec.note(format!(
                    "{} range {how} [{k}, {e}): {}",
                    who.label(),
                    show_range(r)
                ));
            }
        }
        // Writes and transactions are forwarded: etcd's answers, whoever asks.
        let put = kv
            .put(req(
                PutRequest {
                    key: b(&format!("/apisix/w/{}", who.label())),
                    value: b("w"),
                    ..Default::default()
                },
                token.as_deref(),
            ))
            .await
            .map(|r| r.into_inner().header.map_or(0, |h| h.revision));
        rec.note(format!(
            "{} put: {:?}",
            who.label(),
            put.map_err(|s| status_str(&s))
        ));
        let txn = kv
            .txn(req(
                TxnRequest {
                    success: vec![RequestOp {
                        request: Some(request_op::Request::RequestRange(RangeRequest {
                            key: b("/apisix/b1"),
                            ..Default::default()
                        })),
                    }],
                    ..Default::default()
                },
                token.as_deref(),
            ))
            .await
            .map(|r| r.into_inner().responses.len());
        rec.note(format!(
            "{} txn: {:?}",
            who.label(),
            txn.map_err(|s| status_str(&s))
        ));
        // One stream of watches from now, one from a past revision.
        for start in [0, 3] {
            let mut conn = WatchConn::open_with(
                &mut WatchClient::new(channel(&side.url).await),
                md(token.as_deref()),
            );
            for (k, e) in RANGES {
                conn.create(WatchCreateRequest {
                    key: b(k),
                    range_end: b(e),
                    start_revision: start,
                    ..Default::default()
                });
            }
            let mut got = Vec::new();
            let quiet = Duration::from_millis(if start == 0 { 400 } else { 800 });
            for line in drain_creates(&mut conn, RANGES.len(), quiet, &mut got).await {
                rec.note(format!("{} watch from {start} create: {line}", who.label()));
            }
            collect(&received, &token, &got);
            streams.push((who.clone(), start, token.clone(), conn));
        }
    }
    for (i, k) in LATER.iter().enumerate() {
        put_as(&side.etcd_url, Some(&root), k, &format!("later{i}")).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (who, start, token, conn) in &mut streams {
        let mut got = Vec::new();
        for line in drain(conn, Duration::from_millis(300), &mut got).await {
            rec.note(format!("{} watch from {start} events: {line}", who.label()));
        }
        collect(&received, token, &got);
    }
}

fn collect(received: &std::sync::Mutex<Received>, token: &Option<String>, msgs: &[WatchResponse]) {
    let mut r = received.lock().unwrap();
    for m in msgs {
        for e in &m.events {
            if let Some(kv) = &e.kv {
                r.push((token.clone(), kv.clone()));
            }
        }
    }
}

/// Runs `f` on one side with a backstop of [`SCENARIO_TIMEOUT`]; a panic or a timeout is
/// recorded in the transcript (and so fails the comparison).
async fn run_side<F, Fut>(side: Side, f: F) -> Vec<String>
where
    F: FnOnce(Side, Rec) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let rec = Rec::new();
    let task = tokio::spawn(f(side, rec.clone()));
    match tokio::time::timeout(SCENARIO_TIMEOUT, task).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => rec.note(format!("SCENARIO FAILED: {e}")),
        Err(_) => rec.note(format!("SCENARIO TIMED OUT after {SCENARIO_TIMEOUT:?}")),
    }
    rec.lines()
}

/// The leak checker: each key-value an identity received through the proxy must be what etcd
/// itself gives that identity (a direct read at its revision with the same token).
async fn check_no_leak(etcd_url: &str, received: &Received) -> usize {
    let mut kv = KvClient::new(channel(etcd_url).await);
    let mut checked = 0;
    for (token, got) in received {
        let direct = kv
            .range(req(
                RangeRequest {
                    key: got.key.clone(),
                    revision: got.mod_revision,
                    serializable: true,
                    ..Default::default()
                },
                token.as_deref(),
            ))
            .await;
        match direct {
            Ok(r) => {
                let r = r.into_inner();
                assert!(
                    r.kvs.iter().any(|kv| kv == got),
                    "LEAK: {:?} was sent {:?} rev {} which etcd reads as {:?}",
                    token,
                    String::from_utf8_lossy(&got.key),
                    got.mod_revision,
                    r.kvs
                );
            }
            Err(s) => panic!(
                "LEAK: {:?} was sent {:?} rev {} which etcd refuses it: {}",
                token,
                String::from_utf8_lossy(&got.key),
                got.mod_revision,
                status_str(&s)
            ),
        }
        checked += 1;
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decisions_match_etcd_and_nothing_leaks() {
    let received = std::sync::Arc::new(std::sync::Mutex::new(Received::new()));
    let target_received = received.clone();
    let env = diff::Env::start(Opts::default()).await;
    let reference_received = std::sync::Arc::new(std::sync::Mutex::new(Received::new()));
    let rr = reference_received.clone();
    let (r, t) = tokio::join!(
        run_side(env.reference(), move |s, rec| scenario(s, rec, rr)),
        run_side(env.target(), move |s, rec| scenario(
            s,
            rec,
            target_received
        ))
    );
    diff::assert_same("auth decisions", &r, &t, &env.target_log());
    let text = r.join("\n");
    // The scenario saw every kind of answer (it is not vacuous).
    for needle in [
        "etcdserver: user name is empty",
        "etcdserver: permission denied",
        "etcdserver: invalid auth token",
        "rpc error: code = InvalidArgument desc = etcdserver: user name is empty",
        "rpc error: code = PermissionDenied desc = etcdserver: permission denied",
        "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token",
        "adj range ser [/apisix/a, /apisix/e): rev=",
        "pre watch from 0 events: id=",
    ]
    .into_iter()
    .filter(|n| tokenless_refusal_shown(n))
    {
        assert!(text.contains(needle), "no {needle:?} in the transcript");
    }
    let received = received.lock().unwrap().clone();
    let checked = check_no_leak(&env.b.url, &received).await;
    assert!(checked > 50, "only {checked} key-values checked");
    eprintln!("leak checker: {checked} key-values received through the proxy, all etcd's");
    if let Some(p) = &env.proxy {
        let m = p.metrics();
        eprintln!(
            "proxy: probes {} hits {} denials {}; etcd watchers {}",
            testkit::metric_value(&m, "etcd_fanout_auth_probes_total"),
            testkit::metric_value(&m, "etcd_fanout_auth_decision_hits_total"),
            testkit::metric_value(&m, "etcd_fanout_auth_denials_total"),
            testkit::etcd_metric(env.b.port, "etcd_debugging_mvcc_watcher_total")
        );
    }
}

/// Whether a transcript can hold `needle`: in the harness's TLS mode
/// (`ETCD_FANOUT_TEST_TLS=1`) etcd runs with `--client-cert-auth` and every client presents a
/// certificate without CommonName, so etcd (and the proxy, diffed above) refuses a tokenless
/// request `permission denied` (gateway: 403), never `user name is empty` (gateway: 400).
fn tokenless_refusal_shown(needle: &str) -> bool {
    !testkit::tls::enabled() || !(needle.contains("user name is empty") || needle == "status 400")
}

// ------------------------------------------------------------------------------------------
// The HTTP/JSON gateway
// ------------------------------------------------------------------------------------------

/// A token from the gateway at `port` (`POST /v3/auth/authenticate`, as APISIX logs in).
fn gw_login(port: u16, user: &str) -> String {
    let r = http::post(
        port,
        "/v3/auth/authenticate",
        &format!(r#"{{"name":"{user}","password":"{PASSWORD}"}}"#),
    );
    r.json()["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {}", r.text()))
        .to_string()
}

/// How a gateway client presents its token (`{t}` is replaced by the token).
const CARRIERS: &[&[(&str, &str)]] = &[
    &[("Authorization", "{t}")],
    &[("Grpc-Metadata-Token", "{t}")],
    &[("Grpc-Metadata-Token", "{t}"), ("Authorization", "bogus")],
    &[("Authorization", "{t}"), ("Grpc-Metadata-Token", "bogus")],
    &[("Authorization", "Bearer {t}")],
];

fn headers(carrier: &[(&'static str, &'static str)], token: &str) -> Vec<(&'static str, String)> {
    carrier
        .iter()
        .map(|(k, v)| (*k, v.replace("{t}", token)))
        .collect()
}

/// The first message of a watch stream opened with `headers` (and the stream, kept open).
fn gw_watch(port: u16, headers: &[(&str, String)], body: &str) -> (http::Conn, String) {
    let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut c = http::Conn::send(port, "POST", "/v3/watch", &h, body.as_bytes()).expect("watch");
    c.set_timeout(Duration::from_secs(10));
    c.read_head().expect("watch head");
    let first = c.next_chunk().ok().flatten().unwrap_or_default();
    let text = format!(
        "status {} {}",
        c.status,
        gateway::mask(&String::from_utf8_lossy(&first), gateway::IDENTITY)
    );
    (c, text)
}

#[test]
fn gateway_decisions_match_etcd() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let a = testkit::Etcd::start();
    let b = testkit::Etcd::start();
    let proxy = testkit::Proxy::start(&b.url, &["/apisix/"]);
    rt.block_on(async {
        for url in [&a.url, &b.url] {
            for (i, k) in KEYS.iter().enumerate() {
                put_as(url, None, k, &format!("v{i}")).await;
            }
            create_users(url).await;
            enable_auth(url).await;
        }
        wait_auth(&proxy.url, true).await;
    });
    let (ea, pp) = (a.port, proxy.port);
    let mut compared = 0;
    let mut seen = String::new();
    let mut open = Vec::new();
    for who in ["", "bogus", "root", "pre", "adj", "wo", "pt"] {
        let (ta, tp) = match who {
            "" | "bogus" => (who.to_string(), who.to_string()),
            u => (gw_login(ea, u), gw_login(pp, u)),
        };
        let carriers: Vec<&[(&str, &str)]> = if who.is_empty() {
            vec![&[]]
        } else {
            CARRIERS.to_vec()
        };
        for carrier in carriers {
            let (ha, hp) = (headers(carrier, &ta), headers(carrier, &tp));
            let ha_ref: Vec<(&str, &str)> = ha.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let hp_ref: Vec<(&str, &str)> = hp.iter().map(|(k, v)| (*k, v.as_str())).collect();
            for (k, e) in RANGES {
                for extra in ["", r#","serializable":true"#] {
                    let body = format!(
                        r#"{{"key":"{}","range_end":"{}"{extra}}}"#,
                        gateway::b64(k),
                        gateway::b64(e)
                    );
                    let ra = http::request(ea, "POST", "/v3/kv/range", &ha_ref, body.as_bytes())
                        .expect("etcd range");
                    let rp = http::request(pp, "POST", "/v3/kv/range", &hp_ref, body.as_bytes())
                        .expect("proxy range");
                    let (sa, sp) = (
                        gateway::render(&ra, gateway::IDENTITY),
                        gateway::render(&rp, gateway::IDENTITY),
                    );
                    assert_eq!(sa, sp, "{who} {carrier:?} range {body}");
                    seen.push_str(&sa);
                    compared += 1;
                }
                let body = format!(
                    r#"{{"create_request":{{"key":"{}","range_end":"{}"}}}}"#,
                    gateway::b64(k),
                    gateway::b64(e)
                );
                let (ca, wa) = gw_watch(ea, &ha, &body);
                let (cp, wp) = gw_watch(pp, &hp, &body);
                assert_eq!(wa, wp, "{who} {carrier:?} watch {body}");
                seen.push_str(&wa);
                compared += 1;
                if wa.contains(r#""created":true"#) && !wa.contains("canceled") {
                    open.push((format!("{who} {carrier:?} {k} {e}"), ca, cp));
                }
            }
        }
    }
    // The permitted watches get the same events.
    rt.block_on(async {
        for url in [&a.url, &b.url] {
            let root = login(url, "root").await;
            put_as(url, Some(&root), "/apisix/b1", "new").await;
        }
    });
    let mut events = 0;
    for (what, mut ca, mut cp) in open {
        let (mut xa, mut xp) = (String::new(), String::new());
        for (c, x) in [(&mut ca, &mut xa), (&mut cp, &mut xp)] {
            c.set_timeout(Duration::from_millis(700));
            if let Ok(Some(chunk)) = c.next_chunk() {
                *x = gateway::mask(&String::from_utf8_lossy(&chunk), gateway::IDENTITY);
            }
        }
        assert_eq!(xa, xp, "events of {what}");
        events += usize::from(!xa.is_empty());
    }
    assert!(
        compared > 500 && events > 5,
        "{compared} answers, {events} events"
    );
    for needle in [
        "status 400",
        "status 401",
        "status 403",
        "etcdserver: user name is empty",
        r#""cancel_reason":"rpc error: code = PermissionDenied desc = etcdserver: permission denied""#,
        r#""cancel_reason":"rpc error: code = Unauthenticated desc = etcdserver: invalid auth token""#,
        r#""cancel_reason":"rpc error: code = InvalidArgument desc = etcdserver: user name is empty""#,
    ]
    .into_iter()
    .filter(|n| tokenless_refusal_shown(n))
    {
        assert!(
            seen.contains(needle),
            "no {needle} among the answers: {}",
            &seen[..2000.min(seen.len())]
        );
    }
    eprintln!("gateway: {compared} answers and {events} event messages equal to etcd's");
}

// ------------------------------------------------------------------------------------------
// Auth turned on and off under open watches
// ------------------------------------------------------------------------------------------

async fn disable_auth(url: &str, root: &str) {
    AuthClient::new(channel(url).await)
        .auth_disable(req(
            etcd_fanout::proto::etcdserverpb::AuthDisableRequest {},
            Some(root),
        ))
        .await
        .expect("auth disable");
}

fn prefix_watch(prefix: &str) -> WatchCreateRequest {
    WatchCreateRequest {
        key: b(prefix),
        range_end: testkit::range_end(prefix),
        ..Default::default()
    }
}

/// Open watches live through `auth enable` and `auth disable` (etcd never re-checks them);
/// new creates get etcd's answer for the state of the moment, noticed within the poll. With
/// auth off again, etcd 3.4.23 still refuses a token it does not know.
async fn enable_disable(side: Side, rec: Rec) {
    for (i, k) in KEYS.iter().enumerate() {
        put_as(&side.etcd_url, None, k, &format!("v{i}")).await;
    }
    create_users(&side.etcd_url).await;
    let quiet = Duration::from_millis(600);
    let mut got = Vec::new();
    let mut anon = WatchConn::open_with(&mut WatchClient::new(channel(&side.url).await), md(None));
    anon.create(prefix_watch("/apisix/"));
    for l in drain(&mut anon, quiet, &mut got).await {
        rec.note(format!("auth off, tokenless create: {l}"));
    }

    enable_auth(&side.etcd_url).await;
    wait_auth(&side.url, true).await;
    let root = login(&side.etcd_url, "root").await;
    anon.create(prefix_watch("/apisix/routes/"));
    for l in drain(&mut anon, quiet, &mut got).await {
        rec.note(format!("auth on, tokenless create: {l}"));
    }
    let pre = login(&side.url, "pre").await;
    let mut user = WatchConn::open_with(
        &mut WatchClient::new(channel(&side.url).await),
        md(Some(&pre)),
    );
    user.create(prefix_watch("/apisix/routes/"));
    user.create(prefix_watch("/apisix/"));
    for l in drain(&mut user, quiet, &mut got).await {
        rec.note(format!("auth on, pre creates: {l}"));
    }
    put_as(&side.etcd_url, Some(&root), "/apisix/routes/9", "on").await;
    for (name, c) in [("tokenless", &mut anon), ("pre", &mut user)] {
        for l in drain(c, quiet, &mut got).await {
            rec.note(format!("auth on, {name} stream gets: {l}"));
        }
    }

    disable_auth(&side.etcd_url, &root).await;
    wait_auth(&side.url, false).await;
    anon.create(prefix_watch("/apisix/routes/"));
    user.create(prefix_watch("/apisix/"));
    let mut bogus = WatchConn::open_with(
        &mut WatchClient::new(channel(&side.url).await),
        md(Some("bogus")),
    );
    bogus.create(prefix_watch("/apisix/"));
    for (name, c) in [
        ("tokenless", &mut anon),
        ("pre", &mut user),
        ("bogus", &mut bogus),
    ] {
        for l in drain(c, quiet, &mut got).await {
            rec.note(format!("auth off again, {name} creates: {l}"));
        }
    }
    put_as(&side.etcd_url, None, "/apisix/routes/10", "off").await;
    for (name, c) in [
        ("tokenless", &mut anon),
        ("pre", &mut user),
        ("bogus", &mut bogus),
    ] {
        for l in drain(c, quiet, &mut got).await {
            rec.note(format!("auth off again, {name} stream gets: {l}"));
        }
    }
    let mut kv = KvClient::new(channel(&side.url).await);
    let r = kv
        .range(req(
            RangeRequest {
                key: b("/apisix/"),
                range_end: testkit::range_end("/apisix/"),
                serializable: true,
                keys_only: true,
                ..Default::default()
            },
            Some("bogus"),
        ))
        .await;
    rec.note(format!(
        "auth off again, bogus token range: {}",
        show_range(r)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auth_enabled_and_disabled_under_open_watches() {
    let env = diff::Env::start(Opts::default()).await;
    let (r, t) = tokio::join!(
        run_side(env.reference(), enable_disable),
        run_side(env.target(), enable_disable)
    );
    diff::assert_same("auth on and off", &r, &t, &env.target_log());
    let text = r.join("\n");
    for needle in [
        "auth on, tokenless create: id=-1",
        "auth on, tokenless stream gets: id=0",
        "auth on, pre creates: id=0 rev=9 created=true canceled=false",
        // etcd 3.4.23 still validates tokens with auth off (ignored only from 3.4.28 on).
        "auth off again, bogus creates: id=-1 rev=10 created=true canceled=true",
        "auth off again, bogus token range: ERR code=Unauthenticated",
        "auth off again, tokenless stream gets: id=1",
    ] {
        assert!(text.contains(needle), "no {needle:?} in the transcript");
    }
}

// ------------------------------------------------------------------------------------------
// Revocation
// ------------------------------------------------------------------------------------------

/// A permission revoked directly on etcd is refused through the proxy within the decision TTL
/// (plus one poll); one revoked through the proxy at once. Open watches keep running, as on
/// etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoked_permission_is_refused_within_the_decision_ttl() {
    const TTL: Duration = Duration::from_secs(2);
    let etcd = diff::start_etcd(&[]).await;
    let proxy = diff::start_proxy(
        &etcd.url,
        &["/apisix/".into()],
        &["--auth-decision-ttl".into(), "2s".into()],
    )
    .await;
    for (i, k) in KEYS.iter().enumerate() {
        put_as(&etcd.url, None, k, &format!("v{i}")).await;
    }
    create_users(&etcd.url).await;
    enable_auth(&etcd.url).await;
    wait_auth(&proxy.url, true).await;
    let root = login(&etcd.url, "root").await;
    let ro = login(&proxy.url, "ro").await;
    let read = |url: String, token: String| async move {
        KvClient::new(channel(&url).await)
            .range(req(
                RangeRequest {
                    key: b("/apisix/"),
                    range_end: testkit::range_end("/apisix/"),
                    serializable: true,
                    ..Default::default()
                },
                Some(&token),
            ))
            .await
    };
    read(proxy.url.clone(), ro.clone()).await.expect("ro reads");
    let mut open = WatchConn::open_with(
        &mut WatchClient::new(channel(&proxy.url).await),
        md(Some(&ro)),
    );
    open.create(prefix_watch("/apisix/"));
    let mut got = Vec::new();
    drain(&mut open, Duration::from_millis(500), &mut got).await;
    assert!(got.iter().any(|m| m.created && !m.canceled), "{got:?}");

    // Revoke on etcd directly (the proxy does not see it).
    let revoke = |url: String, root: String| async move {
        AuthClient::new(channel(&url).await)
            .role_revoke_permission(req(
                etcd_fanout::proto::etcdserverpb::AuthRoleRevokePermissionRequest {
                    role: "ro0".into(),
                    key: b("/apisix/"),
                    range_end: b("/apisix0"),
                },
                Some(&root),
            ))
            .await
            .expect("revoke")
    };
    let grant = |url: String, root: String| async move {
        AuthClient::new(channel(&url).await)
            .role_grant_permission(req(
                AuthRoleGrantPermissionRequest {
                    name: "ro0".into(),
                    perm: Some(authpb::Permission {
                        perm_type: authpb::permission::Type::Read as i32,
                        key: b("/apisix/"),
                        range_end: b("/apisix0"),
                    }),
                },
                Some(&root),
            ))
            .await
            .expect("grant")
    };
    read(proxy.url.clone(), ro.clone())
        .await
        .expect("still allowed");
    revoke(etcd.url.clone(), root.clone()).await;
    let revoked = Instant::now();
    let direct = read(etcd.url.clone(), ro.clone()).await;
    assert_eq!(
        direct.expect_err("etcd refuses at once").message(),
        "etcdserver: permission denied"
    );
    let delay = loop {
        match read(proxy.url.clone(), ro.clone()).await {
            Ok(_) => {
                assert!(
                    revoked.elapsed() < TTL + Duration::from_secs(2),
                    "still served {:?} after the revocation",
                    revoked.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => {
                assert_eq!(s.message(), "etcdserver: permission denied");
                break revoked.elapsed();
            }
        }
    };
    eprintln!("revoked on etcd: refused through the proxy after {delay:?} (TTL {TTL:?})");
    // A new watch is refused too; the open one keeps its events (etcd does not re-check).
    let mut late = WatchConn::open_with(
        &mut WatchClient::new(channel(&proxy.url).await),
        md(Some(&ro)),
    );
    late.create(prefix_watch("/apisix/"));
    let mut refused = Vec::new();
    drain(&mut late, Duration::from_millis(500), &mut refused).await;
    assert!(
        refused.iter().any(|m| m.canceled
            && m.cancel_reason
                == "rpc error: code = PermissionDenied desc = etcdserver: permission denied"),
        "{refused:?}"
    );
    put_as(&etcd.url, Some(&root), "/apisix/a9", "after").await;
    got.clear();
    drain(&mut open, Duration::from_millis(700), &mut got).await;
    assert!(
        got.iter().any(|m| !m.events.is_empty()),
        "open watch: {got:?}"
    );

    // Granted and revoked through the proxy: seen by the next request.
    grant(proxy.url.clone(), root.clone()).await;
    read(proxy.url.clone(), ro.clone())
        .await
        .expect("granted through the proxy: allowed at once");
    revoke(proxy.url.clone(), root.clone()).await;
    let s = read(proxy.url.clone(), ro.clone())
        .await
        .expect_err("revoked through the proxy: refused at once");
    assert_eq!(s.message(), "etcdserver: permission denied");
}

// ------------------------------------------------------------------------------------------
// One probe per token and prefix
// ------------------------------------------------------------------------------------------

/// Creates a watch for each of `ranges` on one stream of the server at `url` with `token`, and
/// returns what each create got (created / canceled and the reason), in order.
async fn create_outcomes(url: &str, token: &str, ranges: &[(String, String)]) -> Vec<String> {
    let mut conn = WatchConn::open_with(&mut WatchClient::new(channel(url).await), md(Some(token)));
    for (k, e) in ranges {
        conn.create(WatchCreateRequest {
            key: b(k),
            range_end: b(e),
            ..Default::default()
        });
    }
    let mut out = Vec::new();
    while out.len() < ranges.len() {
        match conn.next(Duration::from_secs(30)).await {
            Next::Msg(m) if m.created || m.canceled => out.push(format!(
                "created={} canceled={} reason={:?}",
                m.created, m.canceled, m.cancel_reason
            )),
            Next::Msg(_) => {}
            other => panic!("creates on {url}: {other:?} after {} answers", out.len()),
        }
    }
    out
}

/// Users allowed only part of the prefix (a sub-prefix, one key, two adjacent ranges, a key
/// range) get etcd's own answer for every key and range inside and outside their permissions,
/// although the proxy first asks etcd about the whole prefix; a user allowed the whole prefix
/// creates 2,000 watches on distinct keys for one permission probe, and a sub-prefix user's
/// burst inside its directory costs the directory's probe (keys outside it one probe each).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_probe_per_prefix_or_directory_and_every_answer_etcds() {
    const BURST: usize = 2_000;
    const SUB_BURST: usize = 1_000;
    let etcd = diff::start_etcd(&[]).await;
    // With its own user (root, once auth is on) the proxy's sync checks succeed and are
    // shared by the burst's creates; without, every create would retry a refused one.
    let proxy = diff::start_proxy(
        &etcd.url,
        &["/apisix/".into()],
        &["--user".into(), format!("root:{PASSWORD}")],
    )
    .await;
    for (i, k) in KEYS.iter().enumerate() {
        put_as(&etcd.url, None, k, &format!("v{i}")).await;
    }
    create_users(&etcd.url).await;
    enable_auth(&etcd.url).await;
    wait_auth(&proxy.url, true).await;
    let probes = || testkit::metric_value(&proxy.metrics(), "etcd_fanout_auth_probes_total");

    // Keys and ranges inside and outside each user's permissions (all inside the prefix).
    let spots: Vec<(String, String)> = [
        ("/apisix/routes/1", ""),
        ("/apisix/routes/9", ""),
        ("/apisix/routes/", "/apisix/routes0"),
        ("/apisix/routes/1", "/apisix/routes/3"),
        ("/apisix/b1", ""),
        ("/apisix/b1", "/apisix/b2"),
        ("/apisix/a1", ""),
        ("/apisix/c1", ""),
        ("/apisix/a", "/apisix/e"),
        ("/apisix/a", "/apisix/f"),
        ("/apisix/b", "/apisix/d"),
        ("/apisix/l", "/apisix/n"),
        ("/apisix/x", ""),
        ("/apisix/", "/apisix0"),
        ("/apisix/c", "/apisix/b"),
        ("/apisix/routes/a/b", ""),
        ("/apisix/routes/", ""),
        ("/apisix/b1/x", ""),
    ]
    .iter()
    .map(|(k, e)| ((*k).to_string(), (*e).to_string()))
    .collect();
    for user in ["pre", "pt", "adj", "rng", "ro", "wo", "root"] {
        // A simple token works on both (the proxy's etcd is the reference).
        let token = login(&etcd.url, user).await;
        // Watch creates first: the first request of each user finds nothing decided.
        let through = create_outcomes(&proxy.url, &token, &spots).await;
        let direct = create_outcomes(&etcd.url, &token, &spots).await;
        for (i, (t, d)) in through.iter().zip(&direct).enumerate() {
            assert_eq!(t, d, "{user}: watch create of {:?}", spots[i]);
        }
        for (k, e) in &spots {
            let rr = RangeRequest {
                key: b(k),
                range_end: b(e),
                serializable: true,
                ..Default::default()
            };
            let t = KvClient::new(channel(&proxy.url).await)
                .range(req(rr.clone(), Some(&token)))
                .await;
            let d = KvClient::new(channel(&etcd.url).await)
                .range(req(rr, Some(&token)))
                .await;
            assert_eq!(show_range(t), show_range(d), "{user}: range {k:?}..{e:?}");
        }
    }

    // A burst on distinct keys by a user allowed the whole prefix: one probe (the prefix's).
    let ro = login(&proxy.url, "ro").await;
    let etcd_ranges = || {
        metric_with(
            &testkit::http_get(etcd.port, "/metrics").expect("metrics").1,
            "grpc_server_handled_total",
            r#"grpc_method="Range""#,
        )
    };
    let ranges_before = etcd_ranges();
    let before = probes();
    let started = Instant::now();
    let burst: Vec<(String, String)> = (0..BURST)
        .map(|i| (format!("/apisix/burst/{i}"), String::new()))
        .collect();
    let got = create_outcomes(&proxy.url, &ro, &burst).await;
    let ro_probes = probes() - before;
    let ro_time = started.elapsed();
    // etcd's own count: the probe, a few shared sync checks, the proxy's auth and compaction
    // polls (one a second each).
    let ro_ranges = etcd_ranges() - ranges_before;
    assert!(
        got.iter()
            .all(|g| g.starts_with("created=true canceled=false")),
        "{:?}",
        got.iter()
            .find(|g| !g.starts_with("created=true canceled=false"))
    );
    // One per decision TTL (5 s) the burst lasts.
    let ttls = (ro_time.as_secs_f64() / 5.0).floor() + 1.0;
    assert!(
        ro_probes <= ttls,
        "{ro_probes} probes for {BURST} creates in {ro_time:?}"
    );
    assert!(
        ro_ranges <= 20.0 + 3.0 * ro_time.as_secs_f64(),
        "etcd served {ro_ranges} Ranges for {BURST} creates in {ro_time:?}"
    );

    // A user allowed a sub-prefix only: the prefix is denied, so the key's directory is
    // decided next (one probe for the whole burst inside it); keys outside it are probed one
    // by one. Every answer is etcd's.
    let pre = login(&proxy.url, "pre").await;
    let inside: Vec<(String, String)> = (0..SUB_BURST)
        .map(|i| (format!("/apisix/routes/b{i}"), String::new()))
        .collect();
    let outside: Vec<(String, String)> = (0..SUB_BURST / 50)
        .map(|i| (format!("/apisix/upstreams/b{i}"), String::new()))
        .collect();
    let before = probes();
    let started = Instant::now();
    let got = create_outcomes(&proxy.url, &pre, &inside).await;
    let pre_probes = probes() - before;
    let pre_time = started.elapsed();
    assert_eq!(got, create_outcomes(&etcd.url, &pre, &inside).await);
    assert!(
        got.iter()
            .all(|g| g.starts_with("created=true canceled=false")),
        "{got:?}"
    );
    // The prefix (denied) and the directory (allowed), once per decision TTL.
    let ttls = (pre_time.as_secs_f64() / 5.0).floor() + 1.0;
    assert!(
        pre_probes <= 2.0 * ttls + 1.0,
        "{pre_probes} probes for {SUB_BURST} creates in a sub-prefix user's directory"
    );
    let before = probes();
    let got = create_outcomes(&proxy.url, &pre, &outside).await;
    let out_probes = probes() - before;
    assert_eq!(got, create_outcomes(&etcd.url, &pre, &outside).await);
    assert!(
        got.iter().all(|g| g.contains("permission denied")),
        "{got:?}"
    );
    assert!(
        out_probes >= outside.len() as f64,
        "{out_probes} probes for {} keys outside the user's directory: a denial was inferred",
        outside.len()
    );
    eprintln!(
        "whole-prefix user: {BURST} creates in {ro_time:?}, {ro_probes} probe(s), {ro_ranges} \
         Ranges on etcd; sub-prefix user: {SUB_BURST} creates in its directory in {pre_time:?}, \
         {pre_probes} probes; {} outside it, {out_probes} probes",
        outside.len()
    );
}

// ------------------------------------------------------------------------------------------
// Fan-out for authenticated clients
// ------------------------------------------------------------------------------------------

/// Sum of the samples of `name` whose labels contain `label` in a Prometheus text.
fn metric_with(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// 1,000 watchers of 10 users through the proxy: etcd serves one watcher (the proxy's), and
/// the permission checks cost etcd one probe per user and key range.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn authenticated_watchers_share_one_upstream_watch() {
    const USERS_N: usize = 10;
    const STREAMS: usize = 4;
    const PER_STREAM: usize = 25;
    const WRITES: usize = 20;
    let etcd = diff::start_etcd(&[]).await;
    let proxy = diff::start_proxy(&etcd.url, &["/apisix/".into()], &[]).await;
    let mut auth = AuthClient::new(channel(&etcd.url).await);
    auth.role_add(AuthRoleAddRequest { name: "rd".into() })
        .await
        .expect("role");
    auth.role_grant_permission(AuthRoleGrantPermissionRequest {
        name: "rd".into(),
        perm: Some(authpb::Permission {
            perm_type: authpb::permission::Type::Read as i32,
            key: b("/apisix/"),
            range_end: b("/apisix0"),
        }),
    })
    .await
    .expect("grant");
    for i in 0..USERS_N {
        let user = format!("u{i}");
        auth.user_add(AuthUserAddRequest {
            name: user.clone(),
            password: PASSWORD.into(),
            ..Default::default()
        })
        .await
        .expect("user");
        auth.user_grant_role(AuthUserGrantRoleRequest {
            user,
            role: "rd".into(),
        })
        .await
        .expect("user grant");
    }
    create_users(&etcd.url).await; // root and the test roles
    enable_auth(&etcd.url).await;
    wait_auth(&proxy.url, true).await;
    let ranges_before = metric_with(
        &testkit::http_get(etcd.port, "/metrics").expect("metrics").1,
        "grpc_server_handled_total",
        r#"grpc_method="Range""#,
    );
    let probes_before = testkit::metric_value(&proxy.metrics(), "etcd_fanout_auth_probes_total");
    let started = Instant::now();

    let mut conns = Vec::new();
    for i in 0..USERS_N {
        let token = login(&proxy.url, &format!("u{i}")).await;
        let ch = channel(&proxy.url).await;
        for _ in 0..STREAMS {
            let c = WatchConn::open_with(&mut WatchClient::new(ch.clone()), md(Some(&token)));
            for _ in 0..PER_STREAM {
                c.create(prefix_watch("/apisix/"));
            }
            conns.push(c);
        }
    }
    let mut created = 0;
    for c in &mut conns {
        for _ in 0..PER_STREAM {
            match c.next(Duration::from_secs(20)).await {
                Next::Msg(m) if m.created && !m.canceled => created += 1,
                other => panic!("create: {other:?}"),
            }
        }
    }
    let create_time = started.elapsed();
    assert_eq!(created, USERS_N * STREAMS * PER_STREAM);
    let root = login(&etcd.url, "root").await;
    for i in 0..WRITES {
        put_as(&etcd.url, Some(&root), &format!("/apisix/routes/{i}"), "v").await;
    }
    let mut delivered = 0;
    for c in &mut conns {
        let mut events = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while events < PER_STREAM * WRITES && Instant::now() < deadline {
            match c.next(Duration::from_secs(10)).await {
                Next::Msg(m) => events += m.events.len(),
                other => panic!("events: {other:?}"),
            }
        }
        assert_eq!(events, PER_STREAM * WRITES);
        delivered += events;
    }
    let etcd_metrics = testkit::http_get(etcd.port, "/metrics").expect("metrics").1;
    let watchers = testkit::metric_value(&etcd_metrics, "etcd_debugging_mvcc_watcher_total");
    let ranges = metric_with(
        &etcd_metrics,
        "grpc_server_handled_total",
        r#"grpc_method="Range""#,
    ) - ranges_before;
    let probes =
        testkit::metric_value(&proxy.metrics(), "etcd_fanout_auth_probes_total") - probes_before;
    eprintln!(
        "fan-out under auth: {created} watchers of {USERS_N} users created in {create_time:?}, \
         {delivered} events delivered; etcd: {watchers} watcher(s), {ranges} Range calls in \
         {:?} (permission probes {probes}, the rest the proxy's polls)",
        started.elapsed()
    );
    assert_eq!(watchers, 1.0, "etcd serves only the proxy's watch");
    assert!(
        probes >= USERS_N as f64 && probes <= (2 * USERS_N) as f64,
        "{probes} probes for {USERS_N} users"
    );
}

// ------------------------------------------------------------------------------------------
// Relayed watches with a token across an etcd restart
// ------------------------------------------------------------------------------------------

/// A token watch etcd must answer (outside every prefix) is relayed; when its token dies (a
/// password change) and etcd restarts, etcd refuses the relay's re-create: the client's watch
/// ends with etcd's reason under its own id, and no second `created` ever reaches it. (A simple
/// token itself survives a restart: etcd replays its `Authenticate` from the WAL.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relayed_token_watch_ends_once_when_its_token_dies() {
    let mut etcd = diff::start_etcd(&[]).await;
    let proxy = diff::start_proxy(&etcd.url, &["/apisix/".into()], &[]).await;
    put_as(&etcd.url, None, "/other/k", "v").await;
    create_users(&etcd.url).await;
    enable_auth(&etcd.url).await;
    wait_auth(&proxy.url, true).await;
    let root = login(&etcd.url, "root").await;
    let mut auth = AuthClient::new(channel(&etcd.url).await);
    auth.user_add(req(
        AuthUserAddRequest {
            name: "tmp".into(),
            password: PASSWORD.into(),
            ..Default::default()
        },
        Some(&root),
    ))
    .await
    .expect("user add");
    auth.user_grant_role(req(
        AuthUserGrantRoleRequest {
            user: "tmp".into(),
            role: "root".into(),
        },
        Some(&root),
    ))
    .await
    .expect("grant");
    let tmp = login(&proxy.url, "tmp").await;
    let mut conn = WatchConn::open_with(
        &mut WatchClient::new(channel(&proxy.url).await),
        md(Some(&tmp)),
    );
    conn.create(prefix_watch("/other/"));
    let mut got = Vec::new();
    drain(&mut conn, Duration::from_millis(800), &mut got).await;
    assert!(
        matches!(got.as_slice(), [m] if m.created && !m.canceled && m.watch_id == 0),
        "{got:?}"
    );
    // The password change kills the token (etcd does not re-check the open watch); a restart
    // breaks the relay's upstream stream, and etcd refuses its re-create.
    auth.user_change_password(req(
        etcd_fanout::proto::etcdserverpb::AuthUserChangePasswordRequest {
            name: "tmp".into(),
            password: "new".into(),
        },
        Some(&root),
    ))
    .await
    .expect("change password");
    let _etcd = tokio::task::spawn_blocking(move || {
        etcd.restart();
        etcd
    })
    .await
    .expect("restart");
    got.clear();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !got.iter().any(|m| m.canceled) {
        if let Next::Msg(m) = conn.next(Duration::from_secs(1)).await {
            got.push(m);
        }
    }
    assert!(
        got.iter().all(|m| !m.created),
        "a second created reached the client: {got:?}"
    );
    let end = got
        .iter()
        .find(|m| m.canceled)
        .unwrap_or_else(|| panic!("the watch did not end: {got:?}\n{}", proxy.log()));
    assert_eq!(end.watch_id, 0);
    assert_eq!(
        end.cancel_reason,
        "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token"
    );
}

// ------------------------------------------------------------------------------------------
// Auth on from the start (the proxy logs in with its own user)
// ------------------------------------------------------------------------------------------

/// etcd has auth on before the proxy starts; the proxy loads and watches with its own user
/// (root here), and clients' decisions are still each client's: same answers as etcd for every
/// identity, ranges (linearizable ones too) and watches served from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auth_on_from_the_start_with_the_proxys_own_user() {
    let etcd = diff::start_etcd(&[]).await;
    for (i, k) in KEYS.iter().enumerate() {
        put_as(&etcd.url, None, k, &format!("v{i}")).await;
    }
    create_users(&etcd.url).await;
    enable_auth(&etcd.url).await;
    let proxy = diff::start_proxy(
        &etcd.url,
        &["/apisix/".into()],
        &["--user".into(), format!("root:{PASSWORD}")],
    )
    .await;
    wait_auth(&proxy.url, true).await;
    let cached_before = testkit::metric_value(&proxy.metrics(), "etcd_fanout_ranges_cached_total");
    let mut compared = 0;
    for who in Who::all() {
        let (te, tp) = match &who {
            Who::User(u) => (
                Some(login(&etcd.url, u).await),
                Some(login(&proxy.url, u).await),
            ),
            other => (
                token_of(&etcd.url, other).await,
                token_of(&proxy.url, other).await,
            ),
        };
        for (k, e) in RANGES {
            let mut answers = Vec::new();
            for (url, token) in [(&etcd.url, &te), (&proxy.url, &tp)] {
                let r = KvClient::new(channel(url).await)
                    .range(req(
                        RangeRequest {
                            key: b(k),
                            range_end: b(e),
                            ..Default::default()
                        },
                        token.as_deref(),
                    ))
                    .await;
                answers.push(show_range(r));
            }
            assert_eq!(answers[0], answers[1], "{} range [{k}, {e})", who.label());
            compared += 1;
        }
        let mut firsts = Vec::new();
        for (url, token) in [(&etcd.url, &te), (&proxy.url, &tp)] {
            let mut c = WatchConn::open_with(
                &mut WatchClient::new(channel(url).await),
                md(token.as_deref()),
            );
            c.create(prefix_watch("/apisix/"));
            let mut got = Vec::new();
            firsts.push(drain(&mut c, Duration::from_millis(500), &mut got).await);
        }
        assert_eq!(firsts[0], firsts[1], "{} watch", who.label());
    }
    let cached =
        testkit::metric_value(&proxy.metrics(), "etcd_fanout_ranges_cached_total") - cached_before;
    eprintln!("auth on from the start: {compared} ranges equal to etcd's, {cached} from the cache");
    assert!(
        cached > 10.0,
        "permitted linearizable ranges served from the cache: {cached}"
    );
}
