//! Bad flag values stop the binary at startup with a clear message and exit code 2, before it
//! touches etcd: an empty prefix, endpoints that are not etcd client URLs, bad durations and a
//! busy listen address (named in the message). Go-style durations (`1m30s`) are accepted.

use std::net::TcpListener;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn run(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_etcd-fanout"))
        .args(args)
        .env_remove("ETCD_FANOUT_PREFIXES")
        .env_remove("ETCD_FANOUT_ENDPOINTS")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start etcd-fanout");
    // Every case here must end on its own: a bounded wait, then kill.
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("etcd-fanout {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

fn assert_rejected(args: &[&str], needle: &str) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: {needle:?} not in:\n{err}");
}

#[test]
fn bad_values_exit_2_with_a_message() {
    assert_rejected(&["--prefix", ""], "a prefix must not be empty");
    assert_rejected(
        &["--prefix", "/a/", "--endpoints", "foo"],
        "invalid etcd endpoint \"foo\"",
    );
    assert_rejected(
        &["--prefix", "/a/", "--endpoints", "ftp://127.0.0.1:2379"],
        "expected http://HOST:PORT",
    );
    assert_rejected(
        &["--prefix", "/a/", "--sync-timeout", "5x"],
        "invalid duration \"5x\"",
    );
    assert_rejected(
        &["--prefix", "/a/", "--listen", "not-an-address"],
        "--listen",
    );
}

#[test]
fn busy_listen_port_names_the_address() {
    let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr").to_string();
    // Go-style durations are accepted on the way (the failure is the port, not the flags).
    assert_rejected(
        &[
            "--prefix",
            "/a/",
            "--endpoints",
            "http://127.0.0.1:9",
            "--listen",
            &addr,
            "--compaction-poll",
            "1m30s",
            "--sync-timeout",
            "1h2m3.5s",
            "--progress-interval",
            "500ms",
        ],
        &format!("cannot listen on {addr} (--listen)"),
    );
    drop(busy);
}

/// `(flag, env, default)` of each option in `--help`.
fn help_options() -> Vec<(String, String, Option<String>)> {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut opts: Vec<(String, String, Option<String>)> = Vec::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("--") && line.starts_with("      --") {
            let flag = t.split_whitespace().next().unwrap_or("").to_string();
            opts.push((flag, String::new(), None));
        } else if let Some(last) = opts.last_mut() {
            if let Some(i) = t.find("[env: ") {
                let env = &t[i + 6..];
                let end = env.find([']', '=']).unwrap_or(env.len());
                last.1 = env[..end].to_string();
            }
            if let Some(i) = t.find("[default: ") {
                let d = &t[i + 10..];
                last.2 = Some(d[..d.find(']').unwrap_or(d.len())].to_string());
            }
        }
    }
    opts.retain(|(f, _, _)| f != "--help" && f != "--version");
    opts
}

#[test]
fn readme_flag_table_matches_help() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    // Rows `| `--flag` | `ENV` | default | what |`.
    let rows: Vec<Vec<String>> = readme
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .map(|l| l.split('|').map(|c| c.trim().to_string()).collect())
        .collect();
    let help = help_options();
    assert!(help.len() >= 10, "{help:?}");
    let mut problems = Vec::new();
    for (flag, env, default) in &help {
        let Some(row) = rows.iter().find(|r| r[1] == format!("`{flag}`")) else {
            problems.push(format!(
                "{flag} is in --help but not in README's flag table"
            ));
            continue;
        };
        if row[2] != format!("`{env}`") {
            problems.push(format!("{flag}: README env {} but --help {env}", row[2]));
        }
        match default {
            Some(d) => {
                if !row[3].starts_with(&format!("`{d}`")) {
                    problems.push(format!("{flag}: README default {} but --help {d}", row[3]));
                }
            }
            None => {
                if row[3] != "none" && !row[3].starts_with("none") {
                    problems.push(format!("{flag}: README default {} but --help none", row[3]));
                }
            }
        }
    }
    for row in &rows {
        if !help.iter().any(|(f, _, _)| row[1] == format!("`{f}`")) {
            problems.push(format!(
                "README documents {} which --help does not have",
                row[1]
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
