//! A closed log pipe must not take any of the proxy's tasks down: started with stdout and
//! stderr on pipes whose reader has gone (a log shipper restarting, `| head`), the proxy
//! keeps serving, resumes its upstream watch after etcd restarts, counts the lines it could
//! not write, and still drains and exits on SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use etcd_fanout::proto::etcdserverpb::{PutRequest, RangeRequest};
use testkit::{fault, metric_value, wait_http_ok, wait_until, Clients, Etcd};

#[tokio::test(flavor = "multi_thread")]
async fn closed_log_pipe_neither_stops_tasks_nor_shutdown() {
    let mut etcd = Etcd::start();
    let port = testkit::free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_etcd-fanout"))
        .args(["--endpoints", &etcd.url, "--prefix", "/apisix/"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start etcd-fanout");
    // The reader goes away: every later write to either stream fails with EPIPE.
    drop(child.stdout.take());
    drop(child.stderr.take());
    let guard = KillOnDrop(child.id());
    wait_http_ok(port, "/readyz", Duration::from_secs(30)).expect("proxy ready");
    let url = format!("http://127.0.0.1:{port}");

    // Requests log (debug) and must keep being answered.
    let mut c = Clients::connect(&url).await;
    c.kv.put(PutRequest {
        key: "/apisix/a".into(),
        value: "1".into(),
        ..Default::default()
    })
    .await
    .expect("put through the proxy");

    // An upstream failure: the feed logs it (warnings every retry) and must resume.
    etcd.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    etcd.restart();
    let mut direct = Clients::connect(&etcd.url).await;
    direct
        .kv
        .put(PutRequest {
            key: "/apisix/a".into(),
            value: "2".into(),
            ..Default::default()
        })
        .await
        .expect("put on etcd");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r =
            c.kv.range(RangeRequest {
                key: "/apisix/a".into(),
                serializable: true,
                ..Default::default()
            })
            .await
            .expect("serializable range");
        if r.get_ref().kvs.first().map(|kv| kv.value.as_ref()) == Some(&b"2"[..]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cache did not resume after etcd restarted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (_, metrics) = testkit::http_get(port, "/metrics").expect("metrics");
    let dropped = metric_value(&metrics, "etcd_fanout_log_dropped_total");
    assert!(dropped > 0.0, "no dropped log line counted:\n{metrics}");

    // SIGTERM still drains and exits.
    fault::signal(child.id(), "TERM");
    let exited = wait_until(Duration::from_secs(30), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    assert!(
        exited,
        "the proxy did not exit after SIGTERM with its log pipe closed"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "listener still open after exit"
    );
    drop(guard);
}

/// SIGKILLs the proxy if the test fails before it exits.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if fault::is_alive(self.0) {
            fault::signal(self.0, "KILL");
        }
    }
}
