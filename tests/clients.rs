//! Real clients against the proxy, differentially: `etcdctl` (v3 API, the Go clientv3) and the
//! `etcd-client` crate run the same session against a reference etcd and against etcd-fanout in
//! front of a second fresh etcd; their outputs must be identical after normalising endpoints,
//! cluster/member ids, raft terms and random lease ids.
//!
//! `ETCD_FANOUT_DIFF_SELFCHECK=1` replaces the proxy with a plain etcd (validates the tests).

use std::process::Stdio;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, LeaseGrantOptions,
    LeaseTimeToLiveOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, WatchOptions,
};
use std::io::{Read, Write};
use std::process::Command;
use testkit::diff::*;

/// Replaces `"cluster_id":N`, `"member_id":N`, `"raft_term":N` in etcdctl JSON output.
fn normalize_json(s: &str) -> String {
    let mut out = s.to_string();
    for f in [
        "\"cluster_id\":",
        "\"member_id\":",
        "\"raft_term\":",
        "\"ClusterID\" : ",
        "\"MemberID\" : ",
        "\"RaftTerm\" : ",
    ] {
        let mut from = 0;
        while let Some(p) = out[from..].find(f) {
            let start = from + p + f.len();
            let end = out[start..]
                .find(|c: char| !c.is_ascii_digit())
                .map(|e| start + e)
                .unwrap_or(out.len());
            out.replace_range(start..end, "<n>");
            from = start;
        }
    }
    out
}

fn host_port(url: &str) -> &str {
    url.trim_start_matches("http://")
}

/// Runs etcdctl against `url`; returns "exit=N\nstdout...\nstderr..." normalised.
/// (std::process in a blocking task: tokio's `process` feature is not enabled here.)
async fn etcdctl(
    url: &str,
    args: &[&str],
    stdin: Option<&str>,
    repl: &[(String, String)],
) -> String {
    let url2 = url.to_string();
    let args2: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let input = stdin.map(str::to_string);
    let run = tokio::task::spawn_blocking(move || {
        let mut child = Command::new("timeout")
            .arg("15")
            .arg("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(&url2)
            .arg("--dial-timeout=3s")
            .arg("--command-timeout=5s")
            .args(testkit::tls::etcdctl_flags())
            .args(&args2)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn etcdctl");
        if let Some(i) = input {
            let mut si = child.stdin.take().unwrap();
            let _ = si.write_all(i.as_bytes());
        }
        child.wait_with_output()
    });
    let out = match run.await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return format!("etcdctl failed to run: {e}"),
        Err(e) => return format!("etcdctl task failed: {e}"),
    };
    clean(
        &format!(
            "etcdctl {}\nexit={}\n--stdout--\n{}--stderr--\n{}",
            args.join(" "),
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout),
            // clientv3's retry warnings are JSON log lines with timestamps: keep only the rest
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .filter(|l| !l.starts_with("{\"level\""))
                .map(|l| format!("{l}\n"))
                .collect::<String>()
        ),
        url,
        repl,
    )
}

fn clean(s: &str, url: &str, repl: &[(String, String)]) -> String {
    let mut s = normalize_json(s).replace(host_port(url), "<endpoint>");
    for (a, b) in repl {
        s = s.replace(a, b);
    }
    s
}

/// A background `etcdctl watch ARGS` (at most 30 s); stdout is collected by a thread.
struct BgWatch {
    child: std::process::Child,
    reader: Option<std::thread::JoinHandle<String>>,
}

impl Drop for BgWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn etcdctl_watch(url: &str, args: &[&str]) -> BgWatch {
    // stderr merged into stdout (a canceled watch is reported on stderr)
    let mut child = Command::new("timeout")
        .arg("30")
        .arg("sh")
        .arg("-c")
        .arg("exec etcdctl \"$@\" 2>&1")
        .arg("sh")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(url)
        .args(testkit::tls::etcdctl_flags())
        .arg("watch")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn etcdctl watch");
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    BgWatch {
        child,
        reader: Some(reader),
    }
}

async fn stop_and_read(mut w: BgWatch) -> String {
    // SIGTERM to `timeout` is forwarded to etcdctl; closing its stdout ends the reader
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(w.child.id().to_string())
        .status();
    let reader = w.reader.take().unwrap();
    tokio::task::spawn_blocking(move || reader.join().unwrap_or_default())
        .await
        .unwrap_or_default()
}

/// A whole etcdctl session: put/get (all flavours)/del/txn/compaction/lease/watch.
#[tokio::test(flavor = "multi_thread")]
async fn etcdctl_session() {
    let r = differential("etcdctl_session", Opts::default(), |side, rec| async move {
        let url = side.url.clone();
        let mut repl: Vec<(String, String)> = Vec::new();
        macro_rules! ctl {
            ($($a:expr),*) => {{
                let out = etcdctl(&url, &[$($a),*], None, &repl).await;
                rec.note(out);
            }};
        }
        // background watch from now, started first
        let w_now = etcdctl_watch(&url, &["--prefix", "/apisix/"]);
        let w_prev = etcdctl_watch(&url, &["--prev-kv", "/apisix/routes/1"]);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        ctl!("put", "/apisix/routes/1", "v1");
        ctl!("put", "/apisix/routes/2", "v2");
        ctl!("put", "/apisix/upstreams/1", "u1");
        ctl!("put", "/other/x", "ox");
        ctl!("put", "--prev-kv", "/apisix/routes/1", "v1b");
        ctl!("get", "/apisix/routes/1");
        ctl!("get", "/apisix/missing");
        ctl!("get", "--prefix", "/apisix/");
        ctl!("get", "--prefix", "--keys-only", "/apisix/");
        ctl!("get", "--prefix", "--print-value-only", "/apisix/");
        ctl!("get", "--prefix", "-w", "json", "/apisix/");
        ctl!("get", "--prefix", "-w", "fields", "/apisix/routes/");
        ctl!("get", "--prefix", "--limit", "1", "-w", "json", "/apisix/");
        ctl!("get", "--prefix", "--count-only", "-w", "json", "/apisix/");
        ctl!("get", "--prefix", "--sort-by=MODIFY", "--order=DESCEND", "/apisix/");
        ctl!("get", "--prefix", "--sort-by=VALUE", "--order=ASCEND", "/");
        ctl!("get", "--from-key", "/apisix/routes/2");
        ctl!("get", "--rev=2", "--prefix", "/apisix/");
        ctl!("get", "--rev=3", "-w", "json", "/apisix/routes/1");
        ctl!("get", "--rev=100", "/apisix/routes/1");
        ctl!("get", "--consistency=s", "--prefix", "/apisix/");
        ctl!("get", "/apisix/routes/", "/apisix/routes/3");
        ctl!("get", "");
        let txn = "mod(\"/apisix/routes/1\") > \"0\"\n\nput /apisix/routes/1 \"from-txn\"\nget /apisix/routes/2\n\nput /apisix/routes/9 \"failure\"\n\n";
        rec.note(etcdctl(&url, &["txn"], Some(txn), &repl).await);
        rec.note(etcdctl(&url, &["txn", "-w", "json"], Some("value(\"/apisix/routes/1\") = \"nope\"\n\n\nget /apisix/routes/1\n\n"), &repl).await);
        ctl!("del", "/apisix/routes/2");
        ctl!("del", "--prev-kv", "--prefix", "/apisix/upstreams/");
        ctl!("del", "/apisix/nothing");
        // lease: etcdctl picks a random ID; normalise it
        let grant = etcdctl(&url, &["lease", "grant", "60"], None, &repl).await;
        let id = grant
            .lines()
            .find(|l| l.starts_with("lease ") && l.contains("granted"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("none")
            .to_string();
        repl.push((id.clone(), "<lease>".into()));
        rec.note(clean(&grant, &url, &repl));
        ctl!("put", "--lease", &id, "/apisix/leased", "l");
        let ttl = etcdctl(&url, &["lease", "timetolive", "--keys", &id], None, &repl).await;
        // "remaining(59s)" depends on timing
        let ttl = ttl
            .split("remaining(")
            .enumerate()
            .map(|(i, p)| if i == 0 { p.to_string() } else { format!("remaining(<s>{}", &p[p.find(')').unwrap_or(0)..]) })
            .collect::<String>();
        rec.note(ttl);
        ctl!("lease", "list");
        ctl!("lease", "revoke", &id);
        ctl!("get", "--prefix", "/apisix/");
        ctl!("compaction", "3");
        ctl!("get", "--rev=2", "/apisix/routes/1");
        ctl!("get", "--rev=3", "/apisix/routes/1");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        rec.note(format!("watch --prefix /apisix/ output:\n{}", stop_and_read(w_now).await));
        rec.note(format!("watch --prev-kv /apisix/routes/1 output:\n{}", stop_and_read(w_prev).await));
        // replay from a past revision and a compacted one
        let w_rev = etcdctl_watch(&url, &["--rev=4", "--prefix", "/apisix/"]);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        rec.note(format!("watch --rev=4 output:\n{}", stop_and_read(w_rev).await));
        let w_old = etcdctl_watch(&url, &["--rev=2", "--prefix", "/apisix/"]);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        rec.note(format!("watch --rev=2 (compacted) output:\n{}", stop_and_read(w_old).await));
    })
    .await;
    assert!(
        r.contains("PUT\n/apisix/routes/1\nv1"),
        "see /tmp/etcd-fanout-diff/etcdctl_session.reference.txt"
    );
    assert!(r.contains("exit=0"));
}

/// The `etcd-client` crate (tonic): KV, txn, watch (from now, from the past, prev_kv) and
/// leases with client-chosen ids.
#[tokio::test(flavor = "multi_thread")]
async fn etcd_client_crate_session() {
    let r = differential(
        "etcd_client_crate_session",
        Opts::default(),
        |side, rec| async move {
            let mut c =
                match Client::connect([side.url.as_str()], testkit::tls::etcd_client_options())
                    .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        rec.note(format!("connect failed: {e}"));
                        return;
                    }
                };
            macro_rules! log {
                ($label:expr, $e:expr) => {{
                    match $e {
                        Ok(v) => rec.push($label, &v),
                        Err(e) => rec.note(format!("{}: error {}", $label, e)),
                    }
                }};
            }
            let mut ws = c
                .watch(
                    "/apisix/",
                    Some(WatchOptions::new().with_prefix().with_prev_key()),
                )
                .await
                .expect("watch");
            log!(
                "watch created",
                tokio::time::timeout(Duration::from_secs(5), ws.message())
                    .await
                    .map_err(|_| "timeout")
                    .map(|m| m.ok().flatten())
            );
            log!("put 1", c.put("/apisix/ec/1", "v1", None).await);
            log!("put 2", c.put("/apisix/ec/2", "v2", None).await);
            log!(
                "put 1 prev",
                c.put(
                    "/apisix/ec/1",
                    "v1b",
                    Some(PutOptions::new().with_prev_key())
                )
                .await
            );
            log!("put outside", c.put("/outside/1", "o", None).await);
            log!("get 1", c.get("/apisix/ec/1", None).await);
            log!(
                "get prefix",
                c.get("/apisix/", Some(GetOptions::new().with_prefix()))
                    .await
            );
            log!(
                "get prefix limit 1 sorted desc",
                c.get(
                    "/apisix/",
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_limit(1)
                            .with_sort(SortTarget::Key, SortOrder::Descend)
                    )
                )
                .await
            );
            log!(
                "get at rev 2",
                c.get(
                    "/apisix/",
                    Some(GetOptions::new().with_prefix().with_revision(2))
                )
                .await
            );
            log!(
                "get count only",
                c.get(
                    "/apisix/",
                    Some(GetOptions::new().with_prefix().with_count_only())
                )
                .await
            );
            log!(
                "get future rev",
                c.get(
                    "/apisix/",
                    Some(GetOptions::new().with_prefix().with_revision(99))
                )
                .await
            );
            log!(
                "txn",
                c.txn(
                    Txn::new()
                        .when([Compare::version("/apisix/ec/1", CompareOp::Greater, 0)])
                        .and_then([
                            TxnOp::put("/apisix/ec/3", "t", None),
                            TxnOp::delete("/apisix/ec/2", None)
                        ])
                        .or_else([TxnOp::get("/apisix/ec/1", None)])
                )
                .await
            );
            log!(
                "delete prefix prev",
                c.delete(
                    "/apisix/ec/",
                    Some(DeleteOptions::new().with_prefix().with_prev_key())
                )
                .await
            );
            for i in 0..5 {
                match tokio::time::timeout(Duration::from_secs(5), ws.message()).await {
                    Ok(Ok(Some(m))) => rec.push(&format!("watch event {i}"), &m),
                    other => {
                        rec.note(format!(
                            "watch event {i}: {:?}",
                            other.map(|r| r.map(|_| ()))
                        ));
                        break;
                    }
                }
            }
            // replay from revision 2 on a new stream
            let mut ws2 = c
                .watch(
                    "/apisix/",
                    Some(WatchOptions::new().with_prefix().with_start_revision(2)),
                )
                .await
                .expect("watch 2");
            for i in 0..2 {
                match tokio::time::timeout(Duration::from_secs(5), ws2.message()).await {
                    Ok(Ok(Some(m))) => rec.push(&format!("replay {i}"), &m),
                    other => rec.note(format!("replay {i}: {:?}", other.map(|r| r.map(|_| ())))),
                }
            }
            // leases with a fixed id
            log!(
                "lease grant",
                c.lease_grant(30, Some(LeaseGrantOptions::new().with_id(0x4242)))
                    .await
            );
            log!(
                "put leased",
                c.put(
                    "/apisix/ec/leased",
                    "l",
                    Some(PutOptions::new().with_lease(0x4242))
                )
                .await
            );
            match c.lease_keep_alive(0x4242).await {
                Ok((mut keeper, mut stream)) => {
                    let _ = keeper.keep_alive().await;
                    match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
                        Ok(Ok(Some(m))) => {
                            rec.note(format!("keepalive: id={} ttl={}", m.id(), m.ttl()))
                        }
                        other => rec.note(format!("keepalive: {:?}", other.map(|r| r.map(|_| ())))),
                    }
                }
                Err(e) => rec.note(format!("keepalive error: {e}")),
            }
            match c
                .lease_time_to_live(0x4242, Some(LeaseTimeToLiveOptions::new().with_keys()))
                .await
            {
                Ok(t) => rec.note(format!(
                    "ttl: id={} granted={} keys={:?}",
                    t.id(),
                    t.granted_ttl(),
                    t.keys()
                        .iter()
                        .map(|k| String::from_utf8_lossy(k).to_string())
                        .collect::<Vec<_>>()
                )),
                Err(e) => rec.note(format!("ttl error: {e}")),
            }
            match c.leases().await {
                Ok(l) => rec.note(format!(
                    "leases: {:?}",
                    l.leases().iter().map(|l| l.id()).collect::<Vec<_>>()
                )),
                Err(e) => rec.note(format!("leases error: {e}")),
            }
            log!("lease revoke", c.lease_revoke(0x4242).await);
            match tokio::time::timeout(Duration::from_secs(5), ws.message()).await {
                Ok(Ok(Some(m))) => rec.push("watch after revoke", &m),
                other => rec.note(format!(
                    "watch after revoke: {:?}",
                    other.map(|r| r.map(|_| ()))
                )),
            }
            log!("lease revoke again", c.lease_revoke(0x4242).await);
        },
    )
    .await;
    assert!(
        r.contains("leases: [16962]") && r.contains("/apisix/ec/leased"),
        "see /tmp/etcd-fanout-diff/etcd_client_crate_session.reference.txt"
    );
}
