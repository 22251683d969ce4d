//! etcd with auth on, for tests: users and roles made with the real `etcdctl`, tokens from
//! etcd's `Authenticate`, requests carrying a token, and proxies started without waiting for
//! readiness (a proxy that cannot log in never becomes ready).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use etcd_fanout::proto::etcdserverpb::{
    auth_client::AuthClient, AuthenticateRequest, PutRequest, RangeRequest, RangeResponse,
};
use tonic::Request;

use crate::{channel, http_get, Clients, Etcd, Proxy};

/// Password of etcd's `root` user in these tests.
pub const ROOT_PASSWORD: &str = "root-pw";

/// Runs `etcdctl` against `etcd` as `user` (`NAME:PASSWORD`, or none); panics on failure.
pub fn etcdctl(etcd: &Etcd, user: Option<&str>, args: &[&str]) -> String {
    let mut cmd = Command::new("timeout");
    cmd.arg("20")
        .arg("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(&etcd.url)
        .arg("--dial-timeout=3s")
        .arg("--command-timeout=10s")
        .args(crate::tls::etcdctl_flags());
    if let Some(u) = user {
        cmd.arg("--user").arg(u);
    }
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run etcdctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "etcdctl {args:?}: {text}");
    text
}

/// `root:ROOT_PASSWORD`, for [`etcdctl`].
pub fn root() -> String {
    format!("root:{ROOT_PASSWORD}")
}

/// Creates user `name` with `password` and a role of the same name holding `read` on each
/// of `prefixes` (with auth still disabled, or as root).
pub fn add_reader(
    etcd: &Etcd,
    as_user: Option<&str>,
    name: &str,
    password: &str,
    prefixes: &[&str],
) {
    etcdctl(
        etcd,
        as_user,
        &["user", "add", &format!("{name}:{password}")],
    );
    etcdctl(etcd, as_user, &["role", "add", name]);
    for p in prefixes {
        etcdctl(
            etcd,
            as_user,
            &["role", "grant-permission", name, "--prefix=true", "read", p],
        );
    }
    etcdctl(etcd, as_user, &["user", "grant-role", name, name]);
}

/// An RSA key pair for etcd's `--auth-token jwt`, made with `openssl` in `dir`.
pub fn jwt_keys(dir: &std::path::Path) -> (String, String) {
    let private = dir.join("jwt.key");
    let public = dir.join("jwt.pub");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    let (private, public) = (
        private.to_str().expect("path").to_string(),
        public.to_str().expect("path").to_string(),
    );
    run(&["genrsa", "-out", &private, "2048"]);
    run(&["rsa", "-in", &private, "-pubout", "-out", &public]);
    (private, public)
}

/// Creates `root` (with the root role) and enables auth.
pub fn enable_auth(etcd: &Etcd) {
    etcdctl(etcd, None, &["user", "add", &root()]);
    etcdctl(etcd, None, &["user", "grant-role", "root", "root"]);
    etcdctl(etcd, None, &["auth", "enable"]);
}

/// A token of `user` from etcd's `Authenticate` at `url`.
pub async fn token(url: &str, user: &str, password: &str) -> String {
    AuthClient::new(channel(url).await)
        .authenticate(AuthenticateRequest {
            name: user.into(),
            password: password.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("authenticate {user}: {e}"))
        .into_inner()
        .token
}

/// `msg` as a request carrying `token` (none: tokenless).
pub fn with_token<T>(token: Option<&str>, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(t) = token {
        req.metadata_mut()
            .insert("token", t.parse().expect("ascii token"));
    }
    req
}

/// A Range of every key under `prefix` at `url`, with `token`.
pub async fn range_prefix(
    url: &str,
    token: Option<&str>,
    prefix: &str,
    serializable: bool,
) -> Result<RangeResponse, tonic::Status> {
    let mut c = Clients::connect(url).await;
    c.kv.range(with_token(
        token,
        RangeRequest {
            key: prefix.to_string().into(),
            range_end: crate::range_end(prefix),
            serializable,
            ..Default::default()
        },
    ))
    .await
    .map(|r| r.into_inner())
}

/// Puts `key = value` at `url` with `token`; returns the write's revision.
pub async fn put(url: &str, token: &str, key: &str, value: &str) -> i64 {
    put_as(url, Some(token), key, value).await
}

/// Puts `key = value` at `url` with `token` if given; returns the write's revision.
pub async fn put_as(url: &str, token: Option<&str>, key: &str, value: &str) -> i64 {
    let mut c = Clients::connect(url).await;
    c.kv.put(with_token(
        token,
        PutRequest {
            key: key.to_string().into(),
            value: value.to_string().into(),
            ..Default::default()
        },
    ))
    .await
    .unwrap_or_else(|e| panic!("put {key}: {e}"))
    .into_inner()
    .header
    .map_or(0, |h| h.revision)
}

impl Proxy {
    /// Starts etcd-fanout without waiting for `/readyz` (a proxy that cannot read its
    /// prefixes never gets ready), with extra flags and environment.
    pub fn start_unready(
        endpoints: &str,
        prefixes: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Proxy {
        let port = crate::free_port();
        let mut args = vec![
            "--endpoints".to_string(),
            endpoints.to_string(),
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
        ];
        for p in prefixes {
            args.push("--prefix".into());
            args.push(p.to_string());
        }
        // TLS mode: the harness's certificates on both sides, as `Proxy::start_on` does.
        if crate::tls::enabled() {
            if endpoints.starts_with("https://") {
                args.extend(crate::tls::proxy_upstream_flags());
            }
            args.extend(crate::tls::proxy_listen_flags());
            crate::tls::mark_tls_port(port);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let dir = tempfile::tempdir().expect("tempdir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("proxy.log"))
            .expect("proxy log");
        let child = Command::new(crate::proxy_bin())
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd-fanout");
        let p = Proxy {
            child: Some(child),
            url: crate::tls::url(port),
            port,
            dir,
            args,
        };
        // Wait until it listens (any HTTP answer).
        let start = Instant::now();
        while http_get(p.port, "/readyz").is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "proxy did not listen:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    /// The proxy's log without terminal colour codes.
    pub fn plain_log(&self) -> String {
        let log = self.log();
        let mut out = String::with_capacity(log.len());
        let mut rest = log.as_str();
        while let Some(i) = rest.find('\x1b') {
            out.push_str(&rest[..i]);
            rest = &rest[i..];
            match rest.find('m') {
                Some(m) => rest = &rest[m + 1..],
                None => rest = "",
            }
        }
        out.push_str(rest);
        out
    }

    /// Waits until the proxy's log contains `text`; panics with the log after `timeout`.
    pub fn wait_log(&self, text: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.plain_log().contains(text) {
            assert!(
                start.elapsed() < timeout,
                "proxy log never showed {text:?}:\n{}",
                self.plain_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Status of `GET /readyz`.
    pub fn readyz(&self) -> u16 {
        http_get(self.port, "/readyz").map_or(0, |(s, _)| s)
    }

    /// Value of one of the proxy's own metrics.
    pub fn metric(&self, name: &str) -> f64 {
        crate::metric_value(&self.metrics(), name)
    }
}
