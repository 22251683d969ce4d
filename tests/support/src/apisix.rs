//! A simulated APISIX 3.x worker on the HTTP gateway, driving etcd as lua-resty-etcd does:
//! one range of the whole `/apisix` prefix (`/apisix`..`/apisiy`), then a watch of `/apisix/`
//! over HTTP/1.1 from `header.revision + 1`, closed and re-opened every few seconds with the
//! revision it resumes from. With a [`Login`] it first authenticates through
//! `POST /v3/auth/authenticate`, sends the token as the raw `Authorization` header on every
//! range and watch, and authenticates again when its token is older than the login's
//! `refresh` (lua-resty-etcd: 180 s plus up to 60 s; tests use seconds).
//!
//! The worker records what it saw ([`Seen`]) and fails on anything APISIX would misread: more
//! than one message per chunk, a header revision below its resume point or going backwards, a
//! non-created answer without events, a cancel, a revision repeated or out of order.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::gateway::{b64, unb64};
use crate::http::{request, Conn};

/// Keys of the prefix with (value, mod_revision).
pub type State = BTreeMap<String, (String, i64)>;

/// An int64 as the gateway writes it (a JSON string).
pub fn rev(v: &serde_json::Value) -> i64 {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// A base64 bytes field as text.
pub fn text(v: &serde_json::Value) -> String {
    String::from_utf8_lossy(&unb64(v.as_str().unwrap_or(""))).into_owned()
}

/// APISIX's etcd credentials (`deployment.etcd.user` / `password`).
#[derive(Clone, Debug)]
pub struct Login {
    /// etcd user.
    pub user: String,
    /// Its password.
    pub password: String,
    /// Authenticate again when the token is this old, plus a random third of it
    /// (lua-resty-etcd: 180 s plus up to 60 s, so a fleet does not log in all at once).
    pub refresh: Duration,
}

/// One worker's connection settings and its current token.
#[derive(Debug)]
pub struct Client {
    /// Gateway port (etcd or the proxy).
    pub port: u16,
    /// Credentials, if etcd has auth on.
    login: Option<Login>,
    /// The token and when it was obtained.
    token: Option<(String, Instant)>,
    /// `/v3/auth/authenticate` calls made.
    pub logins: usize,
}

impl Client {
    /// A client of the gateway on `port`, logging in with `login` if given.
    pub fn new(port: u16, login: Option<Login>) -> Client {
        Client {
            port,
            login,
            token: None,
            logins: 0,
        }
    }

    /// The `Authorization` header to send: the current token, authenticating first when
    /// there is none or it is older than the login's `refresh`.
    pub fn auth_headers(&mut self) -> Result<Vec<(String, String)>, String> {
        let Some(login) = &self.login else {
            return Ok(Vec::new());
        };
        let fresh = self
            .token
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < login.refresh + jitter(login.refresh / 3));
        if !fresh {
            let body = format!(
                r#"{{"name":"{}","password":"{}"}}"#,
                login.user, login.password
            );
            // lua-resty-etcd's auth request is not kept alive.
            let r = request(
                self.port,
                "POST",
                "/v3/auth/authenticate",
                &[],
                body.as_bytes(),
            )?;
            if r.status != 200 {
                return Err(format!("authenticate: {} {}", r.status, r.text()));
            }
            let token = r.json()["token"]
                .as_str()
                .ok_or_else(|| format!("authenticate: no token in {}", r.text()))?
                .to_string();
            self.logins += 1;
            self.token = Some((token, Instant::now()));
        }
        Ok(self
            .token
            .iter()
            .map(|(t, _)| ("Authorization".to_string(), t.clone()))
            .collect())
    }

    /// `POST path` with the worker's credentials.
    pub fn post(&mut self, path: &str, body: &str) -> Result<crate::http::Resp, String> {
        let headers = self.auth_headers()?;
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        request(self.port, "POST", path, &h, body.as_bytes())
    }

    /// `/apisix`..`/apisiy` as APISIX reads it at start: (state, header revision).
    pub fn full_range(&mut self) -> Result<(State, i64), String> {
        let r = self.post(
            "/v3/kv/range",
            &format!(
                r#"{{"key":"{}","range_end":"{}"}}"#,
                b64("/apisix"),
                b64("/apisiy")
            ),
        )?;
        if r.status != 200 {
            return Err(format!("range: {} {}", r.status, r.text()));
        }
        let v = r.json();
        let mut state = State::new();
        for kv in v["kvs"].as_array().into_iter().flatten() {
            state.insert(
                text(&kv["key"]),
                (text(&kv["value"]), rev(&kv["mod_revision"])),
            );
        }
        Ok((state, rev(&v["header"]["revision"])))
    }
}

/// A random duration up to `max`.
fn jitter(max: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    max.mul_f64((r % 1000) as f64 / 1000.0)
}

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct Pace {
    /// Close and re-open the watch this often.
    pub reconnect_every: Duration,
    /// Give up (an error) after this long.
    pub deadline: Duration,
}

/// What one worker observed.
#[derive(Debug)]
pub struct Seen {
    /// The prefix as the worker's events left it.
    pub state: State,
    /// Every revision it received an event of, in order.
    pub revisions: Vec<i64>,
    /// The revision of its initial range.
    pub start: i64,
    /// Watches it opened.
    pub reconnects: usize,
    /// `created` answers whose header was below the resume point.
    pub low_created: usize,
    /// Logins made.
    pub logins: usize,
}

/// Runs one worker until `stop` is set and it has seen `final_rev` (or its deadline).
pub fn worker(
    mut client: Client,
    pace: Pace,
    stop: Arc<AtomicBool>,
    final_rev: Arc<AtomicI64>,
) -> Result<Seen, String> {
    let (mut state, start) = client.full_range()?;
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
        if begin.elapsed() > pace.deadline {
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
        let headers = client.auth_headers()?;
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut conn = Conn::send(client.port, "POST", "/v3/watch", &h, body.as_bytes())?;
        conn.set_timeout(Duration::from_secs(10));
        conn.read_head()?;
        if conn.status != 200 {
            return Err(format!("watch answered {}", conn.status));
        }
        reconnects += 1;
        let opened = Instant::now();
        let resume = last + 1;
        conn.set_timeout(Duration::from_millis(200));
        while opened.elapsed() < pace.reconnect_every {
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
                if r["canceled"] == true {
                    return Err(format!("watch refused: {v}"));
                }
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
            // would make it skip revisions (caught by the exact revision list).
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
        logins: client.logins,
    })
}

/// The admin side of a fleet test: what APISIX's Admin API and control planes write (puts,
/// deletes and two-key transactions of `/apisix/routes/N`, plus writes outside the prefix
/// that no worker sees), through `client` (etcd directly), for `duration`, 15 ms apart.
/// Returns the revisions of the writes inside the prefix, in order.
pub fn admin_writes(client: &mut Client, duration: Duration) -> Vec<i64> {
    let mut written = Vec::new();
    let mut live: Vec<bool> = (0..40).map(|i| i < 20).collect();
    let begin = Instant::now();
    let mut n = 0u64;
    while begin.elapsed() < duration {
        n += 1;
        let i = (n * 7919 % 40) as usize;
        let key = format!("/apisix/routes/{i}");
        let (path, body, inside) = match n % 6 {
            0 if live[i] => {
                live[i] = false;
                (
                    "/v3/kv/deleterange",
                    format!(r#"{{"key":"{}"}}"#, b64(&key)),
                    true,
                )
            }
            // Outside the prefix: a revision no worker sees.
            1 => (
                "/v3/kv/put",
                format!(r#"{{"key":"{}","value":"{}"}}"#, b64("/other/k"), b64("x")),
                false,
            ),
            2 => {
                let j = (i + 1) % 40;
                live[i] = true;
                live[j] = true;
                (
                    "/v3/kv/txn",
                    format!(
                        r#"{{"success":[{{"requestPut":{{"key":"{}","value":"{}"}}}},{{"requestPut":{{"key":"{}","value":"{}"}}}}]}}"#,
                        b64(&key),
                        b64(&format!(r#"{{"uri":"/t{n}"}}"#)),
                        b64(&format!("/apisix/routes/{j}")),
                        b64(&format!(r#"{{"uri":"/u{n}"}}"#))
                    ),
                    true,
                )
            }
            _ => {
                live[i] = true;
                (
                    "/v3/kv/put",
                    format!(
                        r#"{{"key":"{}","value":"{}"}}"#,
                        b64(&key),
                        b64(&format!(r#"{{"uri":"/r{i}","v":{n}}}"#))
                    ),
                    true,
                )
            }
        };
        let r = client
            .post(path, &body)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        if inside {
            written.push(rev(&r.json()["header"]["revision"]));
        }
        std::thread::sleep(Duration::from_millis(15));
    }
    written
}

/// The routes and upstream a fleet test starts with, written through `client`.
pub fn seed(client: &mut Client) {
    for i in 0..20 {
        let r = client
            .post(
                "/v3/kv/put",
                &format!(
                    r#"{{"key":"{}","value":"{}"}}"#,
                    b64(&format!("/apisix/routes/{i}")),
                    b64(&format!(r#"{{"uri":"/r{i}","v":0}}"#))
                ),
            )
            .unwrap_or_else(|e| panic!("seed: {e}"));
        assert_eq!(r.status, 200, "seed: {}", r.text());
    }
    let r = client
        .post(
            "/v3/kv/put",
            &format!(
                r#"{{"key":"{}","value":"{}"}}"#,
                b64("/apisix/upstreams/1"),
                b64(r#"{"nodes":{"127.0.0.1:80":1}}"#)
            ),
        )
        .unwrap_or_else(|e| panic!("seed: {e}"));
    assert_eq!(r.status, 200, "seed: {}", r.text());
}

/// Runs `workers` workers against `port` (each with `login`) while [`admin_writes`] writes
/// through `admin` for `write_for`; checks that every worker saw every revision of the prefix
/// written after its initial range exactly once, in order, and ends with `admin`'s view of the
/// prefix. Returns every worker's [`Seen`].
pub fn run_fleet(
    port: u16,
    workers: usize,
    login: Option<Login>,
    pace: Pace,
    admin: &mut Client,
    write_for: Duration,
) -> Vec<Seen> {
    let stop = Arc::new(AtomicBool::new(false));
    let final_rev = Arc::new(AtomicI64::new(i64::MAX));
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            let (stop, final_rev) = (stop.clone(), final_rev.clone());
            let (client, pace) = (Client::new(port, login.clone()), pace.clone());
            std::thread::spawn(move || worker(client, pace, stop, final_rev))
        })
        .collect();
    let written = admin_writes(admin, write_for);
    let last = *written.last().expect("writes happened");
    final_rev.store(last, Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);

    let (expected, _) = admin.full_range().expect("admin range");
    let mut seen = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        let s = h
            .join()
            .expect("worker thread")
            .unwrap_or_else(|err| panic!("worker {i}: {err}"));
        let want: Vec<i64> = written.iter().copied().filter(|r| *r > s.start).collect();
        assert_eq!(s.revisions, want, "worker {i}: every revision exactly once");
        assert!(s.state == expected, "worker {i}: final state equals etcd's");
        seen.push(s);
    }
    seen
}
