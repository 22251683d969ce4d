//! The proxy's log as an operator reads it, from the real binary with its output in a file
//! (as a container runtime or a log shipper takes it):
//! - `--log-format json`: every line is one JSON object, through startup, requests (debug),
//!   etcd going away and shutdown;
//! - text on a file or pipe: no ANSI colour codes;
//! - both: one startup line with the version and every setting, the password masked;
//! - etcd down: the warning says it is etcd, and at which endpoint, that cannot be reached,
//!   and repeats of it are rate-limited (the count of the ones not logged is given).

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use etcd_fanout::proto::etcdserverpb::{PutRequest, RangeRequest};
use serde_json::Value;
use testkit::{fault, wait_http_ok, wait_until, Clients, Etcd};

/// A password that must never appear in a log.
const PASSWORD: &str = "pw-never-logged-7f3a";

/// Starts the proxy with `args`, its stdout and stderr into `log`.
fn start(log: &Path, endpoints: &str, port: u16, args: &[&str]) -> Child {
    let out = File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_etcd-fanout"));
    cmd.args(["--endpoints", endpoints, "--prefix", "/apisix/"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--user", "fanout", "--password", PASSWORD])
        .args(args)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    if testkit::tls::enabled() {
        cmd.args(testkit::tls::proxy_upstream_flags());
    }
    cmd.spawn().expect("start etcd-fanout")
}

/// SIGTERMs the proxy and waits for it to exit (SIGKILL if it does not).
fn stop(mut child: Child) {
    fault::signal(child.id(), "TERM");
    let exited = wait_until(Duration::from_secs(30), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = child.kill();
    }
    let _ = child.wait();
    assert!(exited, "the proxy did not exit after SIGTERM");
}

fn read(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Waits until the log holds `needle`.
fn wait_for(log: &Path, needle: &str) -> bool {
    wait_until(Duration::from_secs(30), || read(log).contains(needle))
}

#[tokio::test(flavor = "multi_thread")]
async fn json_lines_startup_settings_and_etcd_down() {
    let mut etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("proxy.log");
    let port = testkit::free_port();
    let child = start(&log, &etcd.url, port, &["--log-format", "json"]);
    wait_http_ok(port, "/readyz", Duration::from_secs(30)).expect("proxy ready");

    // Requests (debug lines), then etcd goes away.
    let mut c = Clients::connect(&format!("http://127.0.0.1:{port}")).await;
    c.kv.put(PutRequest {
        key: "/apisix/a".into(),
        value: "1".into(),
        ..Default::default()
    })
    .await
    .expect("put");
    c.kv.range(RangeRequest {
        key: "/apisix/a".into(),
        ..Default::default()
    })
    .await
    .expect("range");
    etcd.kill();
    let down = format!("etcd at {} unreachable", etcd.url);
    let logged = wait_for(&log, &down);
    stop(child);

    let text = read(&log);
    assert!(logged, "no {down:?} in the log:\n{text}");
    assert!(!text.contains(PASSWORD), "password in the log:\n{text}");
    let mut lines = Vec::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}\n\n{text}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string() && v["target"].is_string(),
            "{line}"
        );
        lines.push(v);
    }
    assert!(lines.len() >= 5, "{text}");

    let starts: Vec<&Value> = lines
        .iter()
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("etcd-fanout ") && m.ends_with(" starting"))
        })
        .collect();
    assert_eq!(starts.len(), 1, "one startup line:\n{text}");
    let start = starts[0];
    assert_eq!(start["version"], env!("CARGO_PKG_VERSION"), "{start}");
    let settings = start["settings"].as_str().expect("settings");
    for want in [
        &format!("--endpoints={}", etcd.url)[..],
        "--prefix=/apisix/",
        &format!("--listen=127.0.0.1:{port}"),
        "--user=fanout",
        "--password=***",
        "--history-revisions=100000",
        "--log-format=json",
        "--stale-after=10s",
    ] {
        assert!(settings.contains(want), "{want} not in {settings}");
    }

    let warning = lines
        .iter()
        .find(|v| v["level"] == "WARN" && v["message"].as_str().is_some_and(|m| m.contains(&down)))
        .unwrap_or_else(|| panic!("no warning saying {down:?}:\n{text}"));
    assert_eq!(warning["prefix"], "/apisix/", "{warning}");
}

#[test]
fn text_on_a_file_has_no_colour_and_names_the_unreachable_etcd() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("proxy.log");
    // Nothing listens there: etcd is down from the start.
    let etcd_port = testkit::free_port();
    let endpoint = format!("http://127.0.0.1:{etcd_port}");
    let port = testkit::free_port();
    let child = start(
        &log,
        &endpoint,
        port,
        // Retries come every few hundred ms: within 3 s several are due, and the warning
        // is not repeated for each of them.
        &["--log-format", "text"],
    );
    let down = format!("etcd at {endpoint} unreachable");
    let logged = wait_for(&log, &down);
    std::thread::sleep(Duration::from_secs(3));
    stop(child);

    let text = read(&log);
    assert!(logged, "no {down:?} in the log:\n{text}");
    assert!(!text.contains('\x1b'), "ANSI escape in a file:\n{text}");
    assert!(!text.contains(PASSWORD), "password in the log:\n{text}");
    let start: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains(concat!(
                "etcd-fanout ",
                env!("CARGO_PKG_VERSION"),
                " starting"
            ))
        })
        .collect();
    assert_eq!(start.len(), 1, "{text}");
    assert!(
        start[0].contains(env!("CARGO_PKG_VERSION"))
            && start[0].contains("--password=***")
            && start[0].contains("--log-format=text"),
        "{}",
        start[0]
    );
    // The feed's retries: the first failure is a warning, the following ones (every 100 ms
    // to 2 s) are debug lines until the next warning is due.
    let warnings = text
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("loading prefix failed"))
        .count();
    let retries = text
        .lines()
        .filter(|l| l.contains("loading prefix failed"))
        .count();
    assert_eq!(warnings, 1, "{text}");
    assert!(retries > warnings, "{text}");
}

#[test]
fn a_bad_log_format_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_etcd-fanout"))
        .args(["--prefix", "/apisix/", "--log-format", "xml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("xml") && err.contains("--log-format"), "{err}");
}
