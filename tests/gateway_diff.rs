//! Differential tests of the HTTP/JSON gateway: the same HTTP requests go to a real etcd's
//! gateway (etcd serves it on its client port) and to etcd-fanout in front of a second, fresh
//! etcd; the same writes give the same revisions, so status, the headers that matter and the
//! exact JSON text must match once cluster id, member id and raft term are masked.

use testkit::gateway::{b64, mask, same, same_with, IDENTITY};
use testkit::http::{post, request};
use testkit::{Etcd, Proxy};

/// etcd (reference), and the proxy in front of its own etcd.
struct Pair {
    _a: Etcd,
    _b: Etcd,
    proxy: Proxy,
    a: u16,
    p: u16,
}

fn pair() -> Pair {
    pair_with(&[])
}

fn pair_with(etcd_flags: &[&str]) -> Pair {
    let a = Etcd::start_with(etcd_flags);
    let b = Etcd::start_with(etcd_flags);
    let proxy = Proxy::start(&b.url, &["/apisix/"]);
    Pair {
        a: a.port,
        p: proxy.port,
        _a: a,
        _b: b,
        proxy,
    }
}

fn put(k: &str, v: &str) -> String {
    format!(r#"{{"key":"{}","value":"{}"}}"#, b64(k), b64(v))
}

fn range(k: &str, end: &str, extra: &str) -> String {
    let mut s = format!(r#"{{"key":"{}""#, b64(k));
    if !end.is_empty() {
        s.push_str(&format!(r#","range_end":"{}""#, b64(end)));
    }
    if !extra.is_empty() {
        s.push(',');
        s.push_str(extra);
    }
    s.push('}');
    s
}

#[test]
fn kv_reads_writes_and_txn() {
    let t = pair();
    let (a, p) = (t.a, t.p);
    for (k, v) in [
        ("/apisix/routes/1", r#"{"uri":"/a"}"#),
        ("/apisix/routes/2", r#"{"uri":"/b"}"#),
        ("/apisix/upstreams/1", r#"{"nodes":{}}"#),
        ("/other/x", "o"),
        ("/apisix/routes/3", ""),
    ] {
        same(a, p, "POST", "/v3/kv/put", &put(k, v));
    }
    same(
        a,
        p,
        "POST",
        "/v3/kv/put",
        &format!(
            r#"{{"key":"{}","value":"{}","prev_kv":true}}"#,
            b64("/apisix/routes/1"),
            b64("v2")
        ),
    );
    // Ranges served from the cache, in every shape APISIX and etcdctl use.
    for body in [
        range("/apisix/routes/1", "", ""),
        range("/apisix/routes/3", "", ""),
        range("/apisix/routes/9", "", ""),
        range("/apisix", "/apisiy", ""),
        range("/apisix/", "/apisix0", ""),
        range("/apisix/", "/apisix0", r#""limit":1"#),
        range("/apisix/", "/apisix0", r#""limit":"2","keys_only":true"#),
        range("/apisix/", "/apisix0", r#""countOnly":true"#),
        range(
            "/apisix/",
            "/apisix0",
            r#""sort_order":"DESCEND","sort_target":"MOD""#,
        ),
        range(
            "/apisix/",
            "/apisix0",
            r#""sortOrder":2,"sortTarget":"KEY""#,
        ),
        range("/apisix/", "/apisix0", r#""revision":3"#),
        range(
            "/apisix/",
            "/apisix0",
            r#""revision":"4","serializable":true"#,
        ),
        range(
            "/apisix/",
            "/apisix0",
            r#""min_mod_revision":"3","max_create_revision":4"#,
        ),
        range("/apisix/", "/apisix0", r#""revision":99"#),
        range("/other/", "/other0", ""),
        range("\u{0}", "\u{0}", ""),
        format!(r#"{{"key":"{}","range_end":"AA=="}}"#, b64("/apisix/")),
    ] {
        same(a, p, "POST", "/v3/kv/range", &body);
    }
    // Deletes and transactions (APISIX's admin writes: txn with camelCase `requestPut`).
    same(
        a,
        p,
        "POST",
        "/v3/kv/deleterange",
        &range("/apisix/upstreams/1", "", r#""prev_kv":true"#),
    );
    same(
        a,
        p,
        "POST",
        "/v3/kv/deleterange",
        &range("/apisix/nothing", "", ""),
    );
    let txn = format!(
        r#"{{"compare":[{{"key":"{k}","result":"EQUAL","target":"MOD","mod_revision":"7"}}],
            "success":[{{"requestPut":{{"key":"{k}","value":"{v}","prevKv":true}}}},
                       {{"requestRange":{{"key":"{k}"}}}}],
            "failure":[{{"request_range":{{"key":"{k}"}}}}]}}"#,
        k = b64("/apisix/routes/2"),
        v = b64("v3")
    );
    same(a, p, "POST", "/v3/kv/txn", &txn);
    same(a, p, "POST", "/v3/kv/txn", &txn);
    same(
        a,
        p,
        "POST",
        "/v3/kv/txn",
        &format!(
            r#"{{"compare":[{{"key":"{k}","target":"VALUE","result":"NOT_EQUAL","value":"{v}"}}],
                "success":[{{"request_delete_range":{{"key":"{k}","prev_kv":true}}}}]}}"#,
            k = b64("/apisix/routes/3"),
            v = b64("x")
        ),
    );
    for body in [
        range("/apisix", "/apisiy", ""),
        range("/apisix/", "/apisix0", r#""revision":6"#),
    ] {
        same(a, p, "POST", "/v3/kv/range", &body);
    }
    // Compaction, then reads below it.
    same(
        a,
        p,
        "POST",
        "/v3/kv/compaction",
        r#"{"revision":"5","physical":true}"#,
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    for body in [
        range("/apisix/", "/apisix0", r#""revision":4"#),
        range("/apisix/", "/apisix0", r#""revision":5"#),
        range("/apisix/", "/apisix0", ""),
    ] {
        same(a, p, "POST", "/v3/kv/range", &body);
    }
    same(a, p, "POST", "/v3/kv/compaction", r#"{"revision":"3"}"#);
    same(a, p, "POST", "/v3/kv/compaction", r#"{"revision":"999"}"#);
}

/// `range_end` before `key` inside a cached prefix: etcd answers an empty range.
#[test]

fn range_end_before_key() {
    let t = pair();
    let (a, p) = (t.a, t.p);
    same(a, p, "POST", "/v3/kv/put", &put("/apisix/routes/1", "v"));
    same(
        a,
        p,
        "POST",
        "/v3/kv/range",
        &range("/apisix/z", "/apisix/a", ""),
    );
    same(
        a,
        p,
        "POST",
        "/v3/kv/range",
        &range("/apisix/a", "/apisix/a", ""),
    );
}

#[test]
fn malformed_requests_and_http_edges() {
    let t = pair();
    let (a, p) = (t.a, t.p);
    same(a, p, "POST", "/v3/kv/put", &put("/apisix/routes/1", "v"));
    let k = b64("/apisix/routes/1");
    for body in [
        "{bad".to_string(),
        "".to_string(),
        "   ".to_string(),
        "null".to_string(),
        "[1]".to_string(),
        "\"x\"".to_string(),
        "1".to_string(),
        format!(r#"{{"key":"{k}","#),
        format!(r#"{{"key":"{k}"}} trailing garbage"#),
        r#"{"key":"!!"}"#.to_string(),
        r#"{"key":"YQ"}"#.to_string(),
        r#"{"key":"YQ="}"#.to_string(),
        r#"{"key":"Y-Q="}"#.to_string(),
        r#"{"key":"Y\nQ=="}"#.to_string(),
        r#"{"key":5}"#.to_string(),
        r#"{"key":null}"#.to_string(),
        format!(r#"{{"key":"{k}","limit":1.5}}"#),
        format!(r#"{{"key":"{k}","limit":"x"}}"#),
        format!(r#"{{"key":"{k}","limit":""}}"#),
        format!(r#"{{"key":"{k}","limit":"-"}}"#),
        format!(r#"{{"key":"{k}","limit":" 1"}}"#),
        format!(r#"{{"key":"{k}","limit":"1 2"}}"#),
        format!(r#"{{"key":"{k}","limit":true}}"#),
        format!(r#"{{"key":"{k}","limit":{{}}}}"#),
        format!(r#"{{"key":"{k}","limit":99999999999999999999}}"#),
        format!(r#"{{"key":"{k}","keys_only":"true"}}"#),
        format!(r#"{{"key":"{k}","keys_only":1}}"#),
        format!(r#"{{"key":"{k}","keys_only":true,"keysOnly":false}}"#),
        format!(r#"{{"key":"{k}","sort_order":"FOO"}}"#),
        format!(r#"{{"key":"{k}","sort_order":"2"}}"#),
        format!(r#"{{"key":"{k}","sort_order":2.5}}"#),
        format!(r#"{{"key":"{k}","sort_order":7}}"#),
        format!(r#"{{"key":"{k}","unknown_field":[1,2,{{}}]}}"#),
        format!(r#"{{"key":"{k}","a":tru}}"#),
        format!(r#"{{"key":"{k}","a":01}}"#),
        format!(r#"{{"key":"{k}" "a":1}}"#),
        r#"{"key":"\u0059\u0051==","x":"\ud83d"}"#.to_string(),
    ] {
        same(a, p, "POST", "/v3/kv/range", &body);
    }
    for body in [
        r#"{"compare":{}}"#,
        r#"{"compare":[{"target":"FOO"}]}"#,
        r#"{"success":[{"request_put":5}]}"#,
        r#"{"success":[{"request_put":{"key":"YQ==","lease":"abc"}}]}"#,
    ] {
        same(a, p, "POST", "/v3/kv/txn", body);
    }
    // Routing: methods, unknown paths, redirects, CORS pre-flight, /v3beta.
    let body = range("/apisix/routes/1", "", "");
    for (method, path) in [
        ("GET", "/v3/kv/range"),
        ("PUT", "/v3/kv/range"),
        ("GET", "/v3/watch"),
        ("POST", "/v3/kv/nothing"),
        ("POST", "/v3/kv/range/"),
        ("POST", "/v3/kv/range:verb"),
        ("POST", "/v3/"),
        ("GET", "/v3"),
        ("POST", "/v3"),
        ("POST", "//v3/kv/range"),
        ("POST", "/v3/./kv/range?x=1"),
        ("POST", "/v3beta/kv/range"),
        ("POST", "/v3alpha/kv/range"),
        ("POST", "/v3/kv/range?x=1"),
        ("OPTIONS", "/v3/kv/range"),
        ("OPTIONS", "/anything"),
        ("GET", "/nothing"),
        ("GET", "/version"),
        ("POST", "/version"),
        ("GET", "/health"),
        ("POST", "/health"),
        ("GET", "/version/"),
    ] {
        same(a, p, method, path, &body);
    }
    same_with(
        a,
        p,
        "POST",
        "/v3/kv/range",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &body,
        IDENTITY,
    );
    same_with(
        a,
        p,
        "POST",
        "/v3/kv/range",
        &[("Content-Type", "application/json"), ("Origin", "http://x")],
        &body,
        IDENTITY,
    );
    // A token while auth is off is ignored.
    same_with(
        a,
        p,
        "POST",
        "/v3/kv/range",
        &[("Authorization", "not-a-token")],
        &body,
        IDENTITY,
    );
}

#[test]
fn oversized_requests() {
    let t = pair();
    let (a, p) = (t.a, t.p);
    // Over etcd's max request (1.5 MiB): etcd refuses; over its gRPC limit (2 MiB): 429.
    let value = "x".repeat(1_600_000);
    same(a, p, "POST", "/v3/kv/put", &put("/apisix/big", &value));
    let value = "x".repeat(3_000_000);
    same(a, p, "POST", "/v3/kv/put", &put("/apisix/big", &value));
    same(
        a,
        p,
        "POST",
        "/v3/kv/range",
        &range(&format!("/apisix/{}", "k".repeat(3_000_000)), "", ""),
    );
}

/// 10,000 keys, 8 MB of protobuf (about 10.8 MB of JSON) in one range answer.
#[test]
fn big_range_in_one_answer() {
    let t = pair();
    let (a, p) = (t.a, t.p);
    let value = "v".repeat(780);
    for batch in 0..100 {
        let ops: Vec<String> = (0..100)
            .map(|i| {
                let k = format!("/apisix/routes/{:05}", batch * 100 + i);
                format!(
                    r#"{{"request_put":{{"key":"{}","value":"{}"}}}}"#,
                    b64(&k),
                    b64(&value)
                )
            })
            .collect();
        let txn = format!(r#"{{"success":[{}]}}"#, ops.join(","));
        let ra = post(a, "/v3/kv/txn", &txn);
        let rp = post(p, "/v3/kv/txn", &txn);
        assert_eq!((ra.status, rp.status), (200, 200), "{}", rp.text());
    }
    let body = range("/apisix", "/apisiy", "");
    let (ra, rp) = same(a, p, "POST", "/v3/kv/range", &body);
    assert!(rp.body.len() > 10_000_000, "{} bytes", rp.body.len());
    let json = rp.json();
    assert_eq!(json["count"], "10000");
    assert_eq!(json["kvs"].as_array().map(|v| v.len()), Some(10_000));
    assert!(
        mask(&ra.text(), IDENTITY) == mask(&rp.text(), IDENTITY),
        "identical bytes"
    );
    // Limits and keys-only over the same data.
    same(
        a,
        p,
        "POST",
        "/v3/kv/range",
        &range("/apisix", "/apisiy", r#""limit":500,"keys_only":true"#),
    );
}

#[test]
fn lease_endpoints() {
    let t = pair();
    let (a, p) = (t.a, t.p);
    same(a, p, "POST", "/v3/lease/grant", r#"{"TTL":60,"ID":"4242"}"#);
    same(a, p, "POST", "/v3/lease/grant", r#"{"TTL":"30","ID":4243}"#);
    same(a, p, "POST", "/v3/lease/grant", r#"{"TTL":60,"ID":"4242"}"#);
    same(a, p, "POST", "/v3/lease/grant", r#"{"TTL":"x"}"#);
    same(
        a,
        p,
        "POST",
        "/v3/kv/put",
        &format!(
            r#"{{"key":"{}","value":"{}","lease":"4242"}}"#,
            b64("/apisix/data_plane/server_info/1"),
            b64("{}")
        ),
    );
    same(
        a,
        p,
        "POST",
        "/v3/kv/range",
        &range("/apisix/data_plane/", "/apisix/data_plane0", ""),
    );
    // TTLs tick: the remaining TTL may differ by a second between the two clusters.
    let ttl_masked = ["cluster_id", "member_id", "raft_term", "TTL"];
    for path in ["/v3/lease/timetolive", "/v3/kv/lease/timetolive"] {
        same_with(
            a,
            p,
            "POST",
            path,
            &[],
            r#"{"ID":"4242","keys":true}"#,
            &ttl_masked,
        );
        same_with(a, p, "POST", path, &[], r#"{"ID":"1"}"#, &ttl_masked);
    }
    for path in ["/v3/lease/leases", "/v3/kv/lease/leases"] {
        same(a, p, "POST", path, "{}");
    }
    // Keepalive: one answer per request in the body, then the stream ends.
    let (ra, rp) = same_with(
        a,
        p,
        "POST",
        "/v3/lease/keepalive",
        &[],
        r#"{"ID":"4242"} {"ID":"4243"} {"ID":"1"}"#,
        &ttl_masked,
    );
    assert_eq!(ra.chunks.len(), 3);
    assert_eq!(rp.chunks.len(), 3, "one message per chunk");
    for c in &rp.chunks {
        assert!(c.starts_with(b"{\"result\":") && c.ends_with(b"}\n"));
    }
    same(a, p, "POST", "/v3/lease/keepalive", "");
    same(a, p, "POST", "/v3/lease/keepalive", "{bad");
    same(a, p, "POST", "/v3/lease/revoke", r#"{"ID":"4243"}"#);
    same(a, p, "POST", "/v3/kv/lease/revoke", r#"{"ID":"4242"}"#);
    same(a, p, "POST", "/v3/lease/revoke", r#"{"ID":"4242"}"#);
    same(
        a,
        p,
        "POST",
        "/v3/kv/range",
        &range("/apisix/data_plane/", "/apisix/data_plane0", ""),
    );
    same(a, p, "POST", "/v3/lease/leases", "{}");
}

#[test]
fn cluster_maintenance_endpoints() {
    let t = pair();
    let (a, p) = (t.a, t.p);
    same(a, p, "POST", "/v3/kv/put", &put("/apisix/routes/1", "v"));
    let member = [
        "cluster_id",
        "member_id",
        "raft_term",
        "ID",
        "peerURLs",
        "clientURLs",
        "leader",
    ];
    same_with(a, p, "POST", "/v3/cluster/member/list", &[], "{}", &member);
    for (path, body) in [
        ("/v3/cluster/member/remove", r#"{"ID":"1"}"#),
        (
            "/v3/cluster/member/update",
            r#"{"ID":"1","peerURLs":["http://127.0.0.1:1"]}"#,
        ),
        ("/v3/cluster/member/promote", r#"{"ID":"1"}"#),
        ("/v3/cluster/member/add", r#"{"peerURLs":["not a url"]}"#),
        ("/v3/cluster/member/add", r#"{"peerURLs":"x"}"#),
        ("/v3/maintenance/alarm", "{}"),
        (
            "/v3/maintenance/alarm",
            r#"{"action":"GET","alarm":"NONE"}"#,
        ),
        (
            "/v3/maintenance/alarm",
            r#"{"action":"ACTIVATE","alarm":"NOSPACE"}"#,
        ),
        ("/v3/maintenance/alarm", "{}"),
        (
            "/v3/maintenance/alarm",
            r#"{"action":"DEACTIVATE","alarm":"NOSPACE"}"#,
        ),
        ("/v3/maintenance/alarm", r#"{"action":"NOPE"}"#),
        ("/v3/maintenance/defragment", "{}"),
        ("/v3/maintenance/transfer-leadership", r#"{"targetID":"1"}"#),
    ] {
        same_with(a, p, "POST", path, &[], body, &member);
    }
    // The alarm above carried the member id: ask again masked.
    let status = [
        "cluster_id",
        "member_id",
        "raft_term",
        "leader",
        "dbSize",
        "dbSizeInUse",
        "raftIndex",
        "raftAppliedIndex",
        "raftTerm",
    ];
    same_with(a, p, "POST", "/v3/maintenance/status", &[], "{}", &status);
    same_with(
        a,
        p,
        "POST",
        "/v3/maintenance/hash",
        &[],
        "{}",
        &["cluster_id", "member_id", "raft_term", "hash"],
    );
    // Snapshot: a stream of base64 blobs; the first chunk's shape is compared.
    let sa = request(a, "POST", "/v3/maintenance/snapshot", &[], b"{}").expect("etcd snapshot");
    let sp = request(p, "POST", "/v3/maintenance/snapshot", &[], b"{}").expect("proxy snapshot");
    assert_eq!(sa.status, sp.status);
    assert_eq!(sa.header("content-type"), sp.header("content-type"));
    assert!(sp.chunks.len() > 1, "snapshot streamed in chunks");
    // etcd writes a message over 2 KiB as one chunk and its newline as another; the proxy
    // sends one message per chunk. Compare the messages.
    for c in &sp.chunks {
        assert!(c.starts_with(b"{\"result\":{") && c.ends_with(b"}\n"));
    }
    let messages = |body: &[u8]| -> Vec<Vec<u8>> {
        body.split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(<[u8]>::to_vec)
            .collect()
    };
    let (ma, mp) = (messages(&sa.body), messages(&sp.body));
    assert_eq!(mp.len(), sp.chunks.len());
    let keys = |c: &[u8]| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(c).expect("snapshot chunk");
        v["result"]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    assert_eq!(keys(&ma[0]), keys(&mp[0]));
    assert_eq!(keys(&ma[ma.len() - 1]), keys(&mp[mp.len() - 1]));
}

#[test]
fn auth_endpoints_and_tokens() {
    let t = pair();
    let (a, p) = (t.a, t.p);
    let masked = ["cluster_id", "member_id", "raft_term", "token"];
    same(a, p, "POST", "/v3/kv/put", &put("/apisix/routes/1", "v"));
    for (path, body) in [
        (
            "/v3/auth/authenticate",
            r#"{"name":"root","password":"pw"}"#,
        ),
        ("/v3/auth/user/add", r#"{"name":"root","password":"pw"}"#),
        ("/v3/auth/user/add", r#"{"name":"apisix","password":"pw2"}"#),
        ("/v3/auth/user/add", r#"{"name":"apisix","password":"pw2"}"#),
        ("/v3/auth/role/add", r#"{"name":"root"}"#),
        ("/v3/auth/role/add", r#"{"name":"gw"}"#),
        (
            "/v3/auth/role/grant",
            r#"{"name":"gw","perm":{"permType":"READWRITE","key":"L2FwaXNpeC8=","range_end":"L2FwaXNpeDA="}}"#,
        ),
        ("/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#),
        ("/v3/auth/user/grant", r#"{"user":"apisix","role":"gw"}"#),
        ("/v3/auth/user/get", r#"{"name":"apisix"}"#),
        ("/v3/auth/user/list", "{}"),
        ("/v3/auth/role/get", r#"{"role":"gw"}"#),
        ("/v3/auth/role/list", "{}"),
        (
            "/v3/auth/user/changepw",
            r#"{"name":"apisix","password":"pw3"}"#,
        ),
        ("/v3/auth/user/revoke", r#"{"name":"apisix","role":"nope"}"#),
        ("/v3/auth/role/revoke", r#"{"role":"gw","key":"eA=="}"#),
        ("/v3/auth/role/delete", r#"{"role":"nope"}"#),
        ("/v3/auth/user/delete", r#"{"name":"nope"}"#),
        ("/v3/auth/enable", "{}"),
        (
            "/v3/auth/authenticate",
            r#"{"name":"apisix","password":"bad"}"#,
        ),
    ] {
        same_with(a, p, "POST", path, &[], body, &masked);
    }
    let token = |port: u16| -> String {
        let r = post(
            port,
            "/v3/auth/authenticate",
            r#"{"name":"apisix","password":"pw3"}"#,
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["token"].as_str().expect("token").to_string()
    };
    let (ta, tp) = (token(a), token(p));
    let body = range("/apisix/", "/apisix0", "");
    let ask = |port: u16, tok: &str| {
        request(
            port,
            "POST",
            "/v3/kv/range",
            &[("Authorization", tok)],
            body.as_bytes(),
        )
        .expect("range")
    };
    let (ra, rp) = (ask(a, &ta), ask(p, &tp));
    assert_eq!(
        testkit::gateway::render(&ra, &masked),
        testkit::gateway::render(&rp, &masked),
        "range with a token"
    );
    // No token, a bad token, a key outside the role's permission.
    for tok in ["", "garbage"] {
        let h: Vec<(&str, &str)> = if tok.is_empty() {
            vec![]
        } else {
            vec![("Authorization", tok)]
        };
        same_with(a, p, "POST", "/v3/kv/range", &h, &body, &masked);
    }
    let outside = range("/other", "", "");
    let (ra, rp) = (
        request(
            a,
            "POST",
            "/v3/kv/range",
            &[("Authorization", &ta)],
            outside.as_bytes(),
        ),
        request(
            p,
            "POST",
            "/v3/kv/range",
            &[("Authorization", &tp)],
            outside.as_bytes(),
        ),
    );
    assert_eq!(
        testkit::gateway::render(&ra.expect("etcd"), &masked),
        testkit::gateway::render(&rp.expect("proxy"), &masked)
    );
    let root = |port: u16| -> String {
        let r = post(
            port,
            "/v3/auth/authenticate",
            r#"{"name":"root","password":"pw"}"#,
        );
        r.json()["token"].as_str().expect("root token").to_string()
    };
    let (ra, rp) = (
        request(
            a,
            "POST",
            "/v3/auth/disable",
            &[("Authorization", &root(a))],
            b"{}",
        ),
        request(
            p,
            "POST",
            "/v3/auth/disable",
            &[("Authorization", &root(p))],
            b"{}",
        ),
    );
    assert_eq!(
        testkit::gateway::render(&ra.expect("etcd"), &masked),
        testkit::gateway::render(&rp.expect("proxy"), &masked)
    );
    same(a, p, "POST", "/v3/kv/range", &body);
    drop(t.proxy);
}
