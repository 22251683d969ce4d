//! An APISIX fleet on the HTTP gateway: 50 simulated APISIX 3.x workers, each reading the
//! whole `/apisix` prefix once (range `/apisix`..`/apisiy`), then watching `/apisix/` over
//! HTTP/1.1 from `header.revision + 1`, closing and re-opening the watch every ~2 s with the
//! revision it resumes from, while a writer changes routes (puts, deletes, transactions, and
//! writes outside the prefix). Every worker must see every revision of the prefix exactly once
//! and in order, never a header revision below its resume point, and end with etcd's state.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testkit::gateway::{b64, unb64};
use testkit::http::{post, Conn};
use testkit::{Etcd, Proxy};

const WORKERS: usize = 50;
const WRITE_FOR: Duration = Duration::from_secs(8);
const RECONNECT_EVERY: Duration = Duration::from_secs(2);
const DEADLINE: Duration = Duration::from_secs(90);

type State = BTreeMap<String, (String, i64)>;

fn rev(v: &serde_json::Value) -> i64 {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn text(v: &serde_json::Value) -> String {
    String::from_utf8_lossy(&unb64(v.as_str().unwrap_or(""))).into_owned()
}

/// `/apisix`..`/apisiy` as APISIX reads it at start: (state, header revision).
fn full_range(port: u16) -> (State, i64) {
    let r = post(
        port,
        "/v3/kv/range",
        &format!(
            r#"{{"key":"{}","range_end":"{}"}}"#,
            b64("/apisix"),
            b64("/apisiy")
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let mut state = State::new();
    for kv in v["kvs"].as_array().into_iter().flatten() {
        state.insert(
            text(&kv["key"]),
            (text(&kv["value"]), rev(&kv["mod_revision"])),
        );
    }
    (state, rev(&v["header"]["revision"]))
}

/// What one worker observed.
struct Seen {
    state: State,
    revisions: Vec<i64>,
    start: i64,
    reconnects: usize,
    /// `created` answers whose header was below the resume point.
    low_created: usize,
}

fn worker(port: u16, stop: Arc<AtomicBool>, final_rev: Arc<AtomicI64>) -> Result<Seen, String> {
    let (mut state, start) = full_range(port);
    let mut last = start;
    let mut revisions = Vec::new();
    let mut reconnects = 0;
    let begin = Instant::now();
    let mut header_floor = 0;
    let mut low_created = 0usize;
    loop {
        if stop.load(Ordering::SeqCst) && last >= final_rev.load(Ordering::SeqCst) {
            break;
        }
        if begin.elapsed() > DEADLINE {
            return Err(format!(
                "deadline: at revision {last}, final {}",
                final_rev.load(Ordering::SeqCst)
            ));
        }
        let body = format!(
            r#"{{"create_request":{{"key":"{}","range_end":"{}","start_revision":{}}}}}"#,
            b64("/apisix/"),
            b64("/apisix0"),
            last + 1
        );
        let mut conn = Conn::send(port, "POST", "/v3/watch", &[], body.as_bytes())?;
        conn.set_timeout(Duration::from_secs(10));
        conn.read_head()?;
        if conn.status != 200 {
            return Err(format!("watch answered {}", conn.status));
        }
        reconnects += 1;
        let opened = Instant::now();
        let resume = last + 1;
        conn.set_timeout(Duration::from_millis(200));
        while opened.elapsed() < RECONNECT_EVERY {
            if stop.load(Ordering::SeqCst) && last >= final_rev.load(Ordering::SeqCst) {
                break;
            }
            let chunk = match conn.next_chunk() {
                Ok(Some(c)) => c,
                Ok(None) => return Err("watch stream ended".into()),
                Err(e) if e.contains("timed out") || e.contains("temporarily") => continue,
                Err(e) => return Err(e),
            };
            if chunk.iter().filter(|&&c| c == b'\n').count() != 1 || !chunk.ends_with(b"\n") {
                return Err(format!(
                    "not one message per chunk: {:?}",
                    String::from_utf8_lossy(&chunk)
                ));
            }
            let v: serde_json::Value =
                serde_json::from_slice(&chunk).map_err(|e| format!("bad JSON chunk: {e}"))?;
            let r = &v["result"];
            if r.is_null() {
                return Err(format!("error chunk: {v}"));
            }
            let header = rev(&r["header"]["revision"]);
            if r["created"] == true {
                // APISIX skips `created` (its header is checked by the watch differential
                // tests, see `created_header_is_store_revision`).
                if header < resume - 1 {
                    low_created += 1;
                }
                continue;
            }
            // APISIX takes a header revision below its resume point for an etcd restart.
            if header < resume - 1 || header < header_floor {
                return Err(format!(
                    "header revision {header} below resume point {resume} / previous {header_floor}"
                ));
            }
            header_floor = header;
            if r["canceled"] == true {
                return Err(format!("watch canceled: {v}"));
            }
            let events = r["events"]
                .as_array()
                .ok_or_else(|| format!("a non-created answer without events: {v}"))?;
            for ev in events {
                let kv = &ev["kv"];
                let mod_rev = rev(&kv["mod_revision"]);
                if mod_rev > header {
                    return Err(format!("event {mod_rev} beyond header {header}"));
                }
                if mod_rev < last || (mod_rev == last && revisions.last() != Some(&mod_rev)) {
                    return Err(format!(
                        "revision {mod_rev} again or out of order (at {last})"
                    ));
                }
                if revisions.last() != Some(&mod_rev) {
                    revisions.push(mod_rev);
                }
                last = mod_rev;
                let key = text(&kv["key"]);
                if ev["type"] == "DELETE" {
                    state.remove(&key);
                } else {
                    state.insert(key, (text(&kv["value"]), mod_rev));
                }
            }
            // APISIX resumes from `header.revision + 1`: a header beyond what was delivered
            // would make it skip revisions (caught by the exact revision list below).
            last = last.max(header);
        }
        conn.close();
    }
    Ok(Seen {
        state,
        revisions,
        start,
        reconnects,
        low_created,
    })
}

#[test]
fn apisix_fleet_over_http_watch() {
    let etcd = Etcd::start();
    let proxy = Proxy::start(&etcd.url, &["/apisix/"]);
    let (e, p) = (etcd.port, proxy.port);
    let put = |k: &str, v: &str| -> i64 {
        let r = post(
            e,
            "/v3/kv/put",
            &format!(r#"{{"key":"{}","value":"{}"}}"#, b64(k), b64(v)),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        rev(&r.json()["header"]["revision"])
    };
    for i in 0..20 {
        put(
            &format!("/apisix/routes/{i}"),
            &format!(r#"{{"uri":"/r{i}","v":0}}"#),
        );
    }
    put("/apisix/upstreams/1", r#"{"nodes":{"127.0.0.1:80":1}}"#);

    let stop = Arc::new(AtomicBool::new(false));
    let final_rev = Arc::new(AtomicI64::new(i64::MAX));
    let handles: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (stop, final_rev) = (stop.clone(), final_rev.clone());
            std::thread::spawn(move || worker(p, stop, final_rev))
        })
        .collect();

    // The admin side: what APISIX's Admin API and control planes write, plus unrelated keys.
    let written: Arc<Mutex<Vec<i64>>> = Arc::new(Mutex::new(Vec::new()));
    let mut live: Vec<bool> = vec![true; 40];
    for flag in live.iter_mut().skip(20) {
        *flag = false;
    }
    let begin = Instant::now();
    let mut n = 0u64;
    while begin.elapsed() < WRITE_FOR {
        n += 1;
        let i = (n * 7919 % 40) as usize;
        let key = format!("/apisix/routes/{i}");
        let r = match n % 6 {
            0 if live[i] => {
                let r = post(
                    e,
                    "/v3/kv/deleterange",
                    &format!(r#"{{"key":"{}"}}"#, b64(&key)),
                );
                live[i] = false;
                Some(r)
            }
            1 => {
                // Outside the prefix: a revision no worker sees.
                post(
                    e,
                    "/v3/kv/put",
                    &format!(r#"{{"key":"{}","value":"{}"}}"#, b64("/other/k"), b64("x")),
                );
                None
            }
            2 => {
                let j = (i + 1) % 40;
                let txn = format!(
                    r#"{{"success":[{{"requestPut":{{"key":"{}","value":"{}"}}}},{{"requestPut":{{"key":"{}","value":"{}"}}}}]}}"#,
                    b64(&key),
                    b64(&format!(r#"{{"uri":"/t{n}"}}"#)),
                    b64(&format!("/apisix/routes/{j}")),
                    b64(&format!(r#"{{"uri":"/u{n}"}}"#))
                );
                live[i] = true;
                live[j] = true;
                Some(post(e, "/v3/kv/txn", &txn))
            }
            _ => {
                live[i] = true;
                Some(post(
                    e,
                    "/v3/kv/put",
                    &format!(
                        r#"{{"key":"{}","value":"{}"}}"#,
                        b64(&key),
                        b64(&format!(r#"{{"uri":"/r{i}","v":{n}}}"#))
                    ),
                ))
            }
        };
        if let Some(r) = r {
            assert_eq!(r.status, 200, "{}", r.text());
            if let Ok(mut w) = written.lock() {
                w.push(rev(&r.json()["header"]["revision"]));
            }
        }
        std::thread::sleep(Duration::from_millis(15));
    }
    let written = written.lock().map(|w| w.clone()).unwrap_or_default();
    let last = *written.last().expect("writes happened");
    final_rev.store(last, Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);

    let (expected, _) = full_range(e);
    let mut reconnects = 0;
    let mut low_created = 0;
    for (i, h) in handles.into_iter().enumerate() {
        let seen = h
            .join()
            .expect("worker thread")
            .unwrap_or_else(|err| panic!("worker {i}: {err}"));
        let want: Vec<i64> = written
            .iter()
            .copied()
            .filter(|r| *r > seen.start)
            .collect();
        assert_eq!(
            seen.revisions, want,
            "worker {i}: every revision exactly once"
        );
        assert!(
            seen.state == expected,
            "worker {i}: final state equals etcd's"
        );
        reconnects += seen.reconnects;
        low_created += seen.low_created;
    }
    eprintln!(
        "{reconnects} watches opened; {low_created} `created` headers below the resume point"
    );
    assert!(
        reconnects >= WORKERS * 3,
        "the fleet reconnected ({reconnects} watches)"
    );
    drop(proxy);
}
