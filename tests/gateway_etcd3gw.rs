//! A real third-party client of etcd's HTTP/JSON gateway, PyPI's `etcd3gw`, driven by
//! `tests/etcd3gw_client.py` against a plain etcd and against etcd-fanout (in front of its own
//! fresh etcd): put, get, prefix get, watch (live and from history), transactions, leases
//! (grant, attach, TTL, keepalive, keys, revoke). Both runs must observe the same thing.
//!
//! `.ci/install --test` installs etcd3gw; without it this test fails and says so.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::{Etcd, Proxy};

/// Runs the client script against `port` (over TLS with the CN-less client certificate in
/// the harness's TLS mode), bounded in time; returns its output lines.
fn run_client(port: u16) -> Vec<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/etcd3gw_client.py");
    let tls_args: Vec<String> = if testkit::tls::enabled() {
        let c = testkit::tls::certs();
        [&c.ca, &c.client.cert, &c.client.key]
            .iter()
            .map(|p| p.display().to_string())
            .collect()
    } else {
        Vec::new()
    };
    let mut child = Command::new("python3")
        .arg(script)
        .arg(port.to_string())
        .args(tls_args)
        // `requests` lets these override a session's own CA bundle (etcd3gw's `ca_cert`).
        .env_remove("REQUESTS_CA_BUNDLE")
        .env_remove("CURL_CA_BUNDLE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let start = Instant::now();
    loop {
        match child.try_wait().expect("wait") {
            Some(_) => break,
            None if start.elapsed() > Duration::from_secs(90) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("etcd3gw client timed out against port {port}");
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains("No module named 'etcd3gw'"),
        "etcd3gw is not installed: run `bash .ci/install --test` (pip install etcd3gw)"
    );
    assert!(
        out.status.success(),
        "etcd3gw client failed on port {port}:\n{stdout}\n{stderr}"
    );
    stdout.lines().map(str::to_string).collect()
}

#[test]
fn etcd3gw_sees_the_proxy_as_etcd() {
    let a = Etcd::start();
    let b = Etcd::start();
    let proxy = Proxy::start(&b.url, &["/apisix/"]);
    let reference = run_client(a.port);
    let proxied = run_client(proxy.port);
    assert_eq!(reference.len(), 26, "every step ran: {reference:#?}");
    for (r, p) in reference.iter().zip(&proxied) {
        assert_eq!(r, p);
    }
    assert_eq!(reference.len(), proxied.len());
    let step = |name: &str| -> serde_json::Value {
        proxied
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
            .find(|v| v["step"] == name)
            .map(|v| v["value"].clone())
            .unwrap_or_else(|| panic!("no step {name}"))
    };
    assert_eq!(step("api_path"), "/v3/");
    assert_eq!(step("get1"), serde_json::json!([r#"{"uri":"/a"}"#]));
    assert_eq!(
        step("watch_events"),
        serde_json::json!([
            ["PUT", "/apisix/routes/3", r#"{"uri":"/c"}"#, "5"],
            ["DELETE", "/apisix/routes/2", "", "6"]
        ])
    );
    assert_eq!(
        step("lease_keys"),
        serde_json::json!(["/apisix/data_plane/server_info/1"])
    );
    assert_eq!(step("after_revoke"), serde_json::json!([]));
}
