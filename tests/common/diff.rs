//! Differential testing helpers: run one scenario against a reference etcd (direct) and against
//! a target (etcd-fanout in front of a second, fresh etcd), record everything each side answers
//! in a [`Rec`] transcript, normalise the fields that legitimately differ between two etcd
//! clusters (`cluster_id`, `member_id`, `raft_term`) and compare with a readable line diff.
//!
//! Self-check mode: with `ETCD_FANOUT_DIFF_SELFCHECK=1` the target side is a second plain etcd
//! (no proxy). Every test must pass in that mode; it validates that the scenarios themselves are
//! deterministic.
//!
//! Watch transcripts are recorded message by message. Inside one `expect` batch the messages
//! are stable-sorted by watch id, because etcd itself delivers the responses of different
//! watches on one stream in map order (random) when one revision touches several watches;
//! the order of the messages of one watch is kept as received.
#![allow(dead_code)]

use std::fmt::Debug;
use std::future::Future;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use etcd_fanout::proto::etcdserverpb::{
    kv_client::KvClient, watch_client::WatchClient, watch_request::RequestUnion,
    WatchCancelRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::{Etcd, Proxy};

/// Default per-message timeout while waiting for an expected answer.
pub const MSG_TIMEOUT: Duration = Duration::from_secs(5);
/// Default backstop for one scenario run.
pub const SCENARIO_TIMEOUT: Duration = Duration::from_secs(45);

/// True when the target side must be a plain etcd (validates the tests themselves).
pub fn selfcheck() -> bool {
    matches!(
        std::env::var("ETCD_FANOUT_DIFF_SELFCHECK").as_deref(),
        Ok("1") | Ok("true") | Ok("yes")
    )
}

/// `Bytes` from a str.
pub fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// The range end that selects every key starting with `prefix` (etcd's `GetPrefixRangeEnd`).
pub fn prefix_end(prefix: &str) -> Bytes {
    let mut v = prefix.as_bytes().to_vec();
    while let Some(last) = v.pop() {
        if last < 0xff {
            v.push(last + 1);
            return Bytes::from(v);
        }
    }
    Bytes::from_static(b"\0")
}

// ------------------------------------------------------------------------------------------
// Transcript
// ------------------------------------------------------------------------------------------

/// A shared, append-only transcript of one scenario run. Clone freely (one Arc inside).
#[derive(Clone, Default)]
pub struct Rec {
    entries: Arc<Mutex<Vec<String>>>,
}

impl Rec {
    pub fn new() -> Rec {
        Rec::default()
    }

    /// Records a value (pretty Debug, normalised).
    pub fn push<T: Debug + ?Sized>(&self, label: &str, v: &T) {
        let s = normalize(&format!("{label}: {v:#?}"));
        self.entries.lock().unwrap().push(s);
    }

    /// Records a free-form note.
    pub fn note(&self, s: impl Into<String>) {
        self.entries.lock().unwrap().push(s.into());
    }

    /// Records a gRPC unary result (the message, or the status code and message).
    pub fn res<T: Debug>(
        &self,
        label: &str,
        r: Result<tonic::Response<T>, tonic::Status>,
    ) -> Option<T> {
        match r {
            Ok(resp) => {
                let m = resp.into_inner();
                self.push(label, &m);
                Some(m)
            }
            Err(s) => {
                self.note(format!("{label}: {}", status_str(&s)));
                None
            }
        }
    }

    /// A snapshot of the entries so far.
    pub fn lines(&self) -> Vec<String> {
        self.entries.lock().unwrap().clone()
    }

    /// The whole transcript as one string.
    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// Number of occurrences of `needle` in the transcript.
    pub fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }

    pub fn contains(&self, needle: &str) -> bool {
        self.text().contains(needle)
    }
}

/// `ERR code=... message="..."` for a status.
pub fn status_str(s: &tonic::Status) -> String {
    format!("ERR code={:?} message={:?}", s.code(), s.message())
}

/// Replaces the values that differ between two fresh single-member clusters, and folds the
/// pretty-printed `header: Some(ResponseHeader {..})` block into one line
/// (`header: Some(ResponseHeader { revision: N, <ids normalised> })`).
pub fn normalize(s: &str) -> String {
    let lines: Vec<String> = s.split('\n').map(normalize_line).collect();
    let mut out: Vec<String> = Vec::with_capacity(lines.len());
    let mut i = 0;
    while i < lines.len() {
        let l = &lines[i];
        if l.trim() == "header: Some(" && i + 7 < lines.len() {
            let t: Vec<&str> = lines[i + 1..i + 8].iter().map(|x| x.trim()).collect();
            if t[0] == "ResponseHeader {"
                && t[1] == "cluster_id: <n>,"
                && t[2] == "member_id: <n>,"
                && t[3].starts_with("revision: ")
                && t[4] == "raft_term: <n>,"
                && t[5] == "},"
                && t[6] == "),"
            {
                let indent = &l[..l.len() - l.trim_start().len()];
                let rev = t[3].trim_start_matches("revision: ").trim_end_matches(',');
                out.push(format!(
                    "{indent}header: Some(ResponseHeader {{ revision: {rev}, .. }}),"
                ));
                i += 8;
                continue;
            }
        }
        out.push(l.clone());
        i += 1;
    }
    out.join("\n")
}

fn normalize_line(line: &str) -> String {
    let mut l = line.to_string();
    for field in ["cluster_id: ", "member_id: ", "raft_term: "] {
        let mut from = 0;
        while let Some(pos) = l[from..].find(field) {
            let start = from + pos + field.len();
            let end = l[start..]
                .find(|c: char| !c.is_ascii_digit())
                .map(|e| start + e)
                .unwrap_or(l.len());
            if end > start {
                l.replace_range(start..end, "<n>");
            }
            from = start;
        }
    }
    l
}

// ------------------------------------------------------------------------------------------
// Line diff
// ------------------------------------------------------------------------------------------

/// A unified-style diff of two line sequences (LCS), with `ctx` lines of context.
/// Returns None when equal.
pub fn line_diff(a: &[String], b: &[String], ctx: usize) -> Option<String> {
    if a == b {
        return None;
    }
    // Trim the common prefix/suffix to keep the LCS table small.
    let mut pre = 0;
    while pre < a.len() && pre < b.len() && a[pre] == b[pre] {
        pre += 1;
    }
    let mut suf = 0;
    while suf < a.len() - pre && suf < b.len() - pre && a[a.len() - 1 - suf] == b[b.len() - 1 - suf]
    {
        suf += 1;
    }
    let am = &a[pre..a.len() - suf];
    let bm = &b[pre..b.len() - suf];
    // ops over the middle: ' ' same, '-' only a, '+' only b
    let mut ops: Vec<(char, String)> = Vec::new();
    if am.len() * bm.len() <= 40_000_000 {
        let (n, m) = (am.len(), bm.len());
        let mut t = vec![0u32; (n + 1) * (m + 1)];
        for i in (0..n).rev() {
            for j in (0..m).rev() {
                t[i * (m + 1) + j] = if am[i] == bm[j] {
                    t[(i + 1) * (m + 1) + j + 1] + 1
                } else {
                    t[(i + 1) * (m + 1) + j].max(t[i * (m + 1) + j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < n || j < m {
            if i < n && j < m && am[i] == bm[j] {
                ops.push((' ', am[i].clone()));
                i += 1;
                j += 1;
            } else if j < m && (i == n || t[i * (m + 1) + j + 1] >= t[(i + 1) * (m + 1) + j]) {
                ops.push(('+', bm[j].clone()));
                j += 1;
            } else {
                ops.push(('-', am[i].clone()));
                i += 1;
            }
        }
    } else {
        ops.extend(am.iter().map(|l| ('-', l.clone())));
        ops.extend(bm.iter().map(|l| ('+', l.clone())));
    }
    let mut all: Vec<(char, String)> = a[..pre].iter().map(|l| (' ', l.clone())).collect();
    all.extend(ops);
    all.extend(a[a.len() - suf..].iter().map(|l| (' ', l.clone())));
    // print with context
    let changed: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(_, (c, _))| *c != ' ')
        .map(|(i, _)| i)
        .collect();
    let mut show = vec![false; all.len()];
    for &i in &changed {
        let lo = i.saturating_sub(ctx);
        let hi = (i + ctx + 1).min(all.len());
        for s in show.iter_mut().take(hi).skip(lo) {
            *s = true;
        }
    }
    let mut out = String::new();
    let mut skipping = false;
    let (mut la, mut lb) = (0usize, 0usize);
    for (i, (c, l)) in all.iter().enumerate() {
        match c {
            ' ' => {
                la += 1;
                lb += 1;
            }
            '-' => la += 1,
            _ => lb += 1,
        }
        if show[i] {
            if skipping {
                out.push_str(&format!("@@ reference line {la}, target line {lb} @@\n"));
                skipping = false;
            }
            out.push(*c);
            out.push(' ');
            out.push_str(l);
            out.push('\n');
        } else {
            skipping = true;
        }
    }
    Some(out)
}

/// Diff at entry granularity (LCS over whole entries); replaced entries are shown as a line
/// diff of the pair, extra entries in full; one entry label of context around each hunk.
pub fn entry_diff(a: &[String], b: &[String]) -> String {
    let (n, m) = (a.len(), b.len());
    let mut ops: Vec<(char, usize, usize)> = Vec::new(); // (' '|'-'|'+', ai, bi)
    if n * m <= 25_000_000 {
        let mut t = vec![0u32; (n + 1) * (m + 1)];
        for i in (0..n).rev() {
            for j in (0..m).rev() {
                t[i * (m + 1) + j] = if a[i] == b[j] {
                    t[(i + 1) * (m + 1) + j + 1] + 1
                } else {
                    t[(i + 1) * (m + 1) + j].max(t[i * (m + 1) + j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < n || j < m {
            if i < n && j < m && a[i] == b[j] {
                ops.push((' ', i, j));
                i += 1;
                j += 1;
            } else if i < n && (j == m || t[(i + 1) * (m + 1) + j] >= t[i * (m + 1) + j + 1]) {
                ops.push(('-', i, j));
                i += 1;
            } else {
                ops.push(('+', i, j));
                j += 1;
            }
        }
    } else {
        ops.extend((0..n).map(|i| ('-', i, 0)));
        ops.extend((0..m).map(|j| ('+', 0, j)));
    }
    let first_line = |s: &str| s.lines().next().unwrap_or("").to_string();
    let mut out = String::new();
    let mut k = 0;
    let mut hunks = 0;
    while k < ops.len() {
        if ops[k].0 == ' ' {
            k += 1;
            continue;
        }
        hunks += 1;
        if hunks > 30 {
            out.push_str("... (more differences, see the transcript files)\n");
            break;
        }
        let start = k;
        while k < ops.len() && ops[k].0 != ' ' {
            k += 1;
        }
        let (ai, bi) = (ops[start].1, ops[start].2);
        out.push_str(&format!(
            "@@ entry #{ai} of reference, #{bi} of target @@\n"
        ));
        if start > 0 {
            out.push_str(&format!("  {}  [...]\n", first_line(&a[ops[start - 1].1])));
        }
        let dels: Vec<usize> = ops[start..k]
            .iter()
            .filter(|o| o.0 == '-')
            .map(|o| o.1)
            .collect();
        let adds: Vec<usize> = ops[start..k]
            .iter()
            .filter(|o| o.0 == '+')
            .map(|o| o.2)
            .collect();
        let pairs = dels.len().min(adds.len());
        for p in 0..pairs {
            let al: Vec<String> = a[dels[p]].split('\n').map(str::to_string).collect();
            let bl: Vec<String> = b[adds[p]].split('\n').map(str::to_string).collect();
            out.push_str(&format!("~ entry changed: {}\n", first_line(&a[dels[p]])));
            if let Some(d) = line_diff(&al, &bl, 4) {
                out.push_str(&d);
            }
        }
        for &d in &dels[pairs..] {
            out.push_str("- (entry only in reference)\n");
            for l in a[d].split('\n') {
                out.push_str(&format!("- {l}\n"));
            }
        }
        for &d in &adds[pairs..] {
            out.push_str("+ (entry only in target)\n");
            for l in b[d].split('\n') {
                out.push_str(&format!("+ {l}\n"));
            }
        }
        if k < ops.len() {
            out.push_str(&format!("  {}  [...]\n", first_line(&a[ops[k].1])));
        }
    }
    out
}

fn flatten(entries: &[String]) -> Vec<String> {
    entries
        .iter()
        .flat_map(|e| e.split('\n').map(str::to_string))
        .collect()
}

/// Panics with a readable diff when the two transcripts differ.
pub fn assert_same(name: &str, reference: &[String], target: &[String], target_log: &str) {
    assert!(
        !reference.is_empty(),
        "{name}: empty reference transcript (the test asserts nothing)"
    );
    let a = flatten(reference);
    let bl = flatten(target);
    let dir = std::env::temp_dir().join("etcd-fanout-diff");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("{name}.reference.txt")), a.join("\n"));
    let _ = std::fs::write(dir.join(format!("{name}.target.txt")), bl.join("\n"));
    if a != bl {
        let d = entry_diff(reference, target);
        let first = reference
            .iter()
            .zip(target.iter())
            .position(|(x, y)| x != y)
            .unwrap_or(reference.len().min(target.len()));
        // the log tail without backtrace frames, panics first
        let is_frame = |l: &str| {
            let t = l.trim_start();
            t.starts_with("at ")
                || (l.starts_with(' ')
                    && t.split(':')
                        .next()
                        .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit())))
        };
        let useful: Vec<&str> = target_log.lines().filter(|l| !is_frame(l)).collect();
        let panics: Vec<&str> = useful
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains("panicked at"))
            .take(3)
            .flat_map(|(i, _)| useful[i..(i + 2).min(useful.len())].iter().copied())
            .collect();
        let mut tail: Vec<&str> = panics;
        tail.push("...");
        tail.extend(
            useful
                .iter()
                .rev()
                .take(25)
                .collect::<Vec<_>>()
                .into_iter()
                .rev(),
        );
        panic!(
            "\n===== {name}: target differs from reference etcd =====\n\
             (- reference etcd, + target{}) first differing entry #{first}: {:?}\n\
             full transcripts: {}/{name}.{{reference,target}}.txt\n\n{d}\n\
             ----- target log tail -----\n{}\n",
            if selfcheck() {
                " = plain etcd (self-check)"
            } else {
                " = etcd-fanout"
            },
            target
                .get(first)
                .or(reference.get(first))
                .map(|s| s.lines().next().unwrap_or("")),
            dir.display(),
            tail.join("\n"),
        );
    }
}

// ------------------------------------------------------------------------------------------
// Environment: reference etcd, target (proxy + etcd, or plain etcd in self-check mode)
// ------------------------------------------------------------------------------------------

/// Options of a differential environment.
#[derive(Clone)]
pub struct Opts {
    /// Prefixes the proxy caches.
    pub prefixes: Vec<String>,
    /// Extra proxy flags.
    pub proxy_args: Vec<String>,
    /// Extra etcd flags (both etcds).
    pub etcd_args: Vec<String>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            prefixes: vec!["/apisix/".into()],
            proxy_args: vec![],
            etcd_args: vec![],
        }
    }
}

impl Opts {
    pub fn proxy_args(mut self, a: &[&str]) -> Self {
        self.proxy_args.extend(a.iter().map(|s| s.to_string()));
        self
    }
    pub fn prefixes(mut self, p: &[&str]) -> Self {
        self.prefixes = p.iter().map(|s| s.to_string()).collect();
        self
    }
}

/// One side of a differential run.
#[derive(Clone, Debug)]
pub struct Side {
    /// "reference" or "target".
    pub name: &'static str,
    /// Where the scenario sends its requests.
    pub url: String,
    /// The etcd behind `url` (equal to `url` for the reference), for direct writes.
    pub etcd_url: String,
    /// Client port of that etcd (for /metrics).
    pub etcd_port: u16,
}

impl Side {
    pub async fn kv(&self) -> KvClient<Channel> {
        KvClient::new(super::channel(&self.url).await).max_decoding_message_size(usize::MAX)
    }
    pub async fn watch_client(&self) -> WatchClient<Channel> {
        WatchClient::new(super::channel(&self.url).await).max_decoding_message_size(usize::MAX)
    }
    /// KV client straight to the backing etcd.
    pub async fn etcd_kv(&self) -> KvClient<Channel> {
        KvClient::new(super::channel(&self.etcd_url).await).max_decoding_message_size(usize::MAX)
    }
    pub async fn clients(&self) -> super::Clients {
        super::Clients::connect(&self.url).await
    }
    /// A new watch stream on a new connection.
    pub async fn watch(&self) -> WatchConn {
        WatchConn::open(&mut self.watch_client().await)
    }
}

fn panic_text(e: tokio::task::JoinError) -> String {
    if e.is_panic() {
        let p = e.into_panic();
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    } else {
        e.to_string()
    }
}

/// Starts an etcd, retrying (up to 3 attempts) when its free port was taken by another process
/// in the meantime (`free_port` binds then releases; other suites run concurrently).
pub async fn start_etcd(args: &[String]) -> Etcd {
    let mut last = String::new();
    for _ in 0..3 {
        let a = args.to_vec();
        match tokio::task::spawn_blocking(move || {
            Etcd::start_with(&a.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        {
            Ok(e) => return e,
            Err(e) => {
                last = panic_text(e);
                eprintln!(
                    "etcd start failed, retrying: {}",
                    last.lines().next().unwrap_or("")
                );
            }
        }
    }
    panic!("etcd did not start in 3 attempts: {last}");
}

/// Starts etcd-fanout; retries only when its listen port was taken meanwhile.
pub async fn start_proxy(etcd_url: &str, prefixes: &[String], extra: &[String]) -> Proxy {
    let mut last = String::new();
    for _ in 0..3 {
        let (u, p, x) = (etcd_url.to_string(), prefixes.to_vec(), extra.to_vec());
        match tokio::task::spawn_blocking(move || {
            let p: Vec<&str> = p.iter().map(String::as_str).collect();
            let x: Vec<&str> = x.iter().map(String::as_str).collect();
            Proxy::start_with(&u, &p, &x)
        })
        .await
        {
            Ok(p) => return p,
            Err(e) => {
                last = panic_text(e);
                if !last.to_lowercase().contains("in use") {
                    break;
                }
                eprintln!("proxy port taken, retrying");
            }
        }
    }
    panic!("proxy did not start: {last}");
}

/// Two fresh etcds and, unless in self-check mode, a proxy in front of the second.
pub struct Env {
    pub a: Etcd,
    pub b: Etcd,
    pub proxy: Option<Proxy>,
}

impl Env {
    pub async fn start(opts: Opts) -> Env {
        let (a, b) = tokio::join!(start_etcd(&opts.etcd_args), start_etcd(&opts.etcd_args));
        let proxy = if selfcheck() {
            None
        } else {
            Some(start_proxy(&b.url, &opts.prefixes, &opts.proxy_args).await)
        };
        eprintln!(
            "differential env: reference etcd {} | target {}",
            a.url,
            match &proxy {
                Some(p) => format!("etcd-fanout {} -> etcd {}", p.url, b.url),
                None => format!("plain etcd {} (self-check)", b.url),
            }
        );
        Env { a, b, proxy }
    }

    pub fn reference(&self) -> Side {
        Side {
            name: "reference",
            url: self.a.url.clone(),
            etcd_url: self.a.url.clone(),
            etcd_port: self.a.port,
        }
    }

    pub fn target(&self) -> Side {
        Side {
            name: "target",
            url: self
                .proxy
                .as_ref()
                .map(|p| p.url.clone())
                .unwrap_or_else(|| self.b.url.clone()),
            etcd_url: self.b.url.clone(),
            etcd_port: self.b.port,
        }
    }

    pub fn target_log(&self) -> String {
        self.proxy.as_ref().map(|p| p.log()).unwrap_or_default()
    }
}

/// Runs `f` on one side with a backstop timeout; records panics/timeouts in the transcript.
pub async fn run_side<F, Fut>(side: Side, f: F) -> Vec<String>
where
    F: FnOnce(Side, Rec) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let rec = Rec::new();
    let h = tokio::spawn(f(side, rec.clone()));
    match tokio::time::timeout(SCENARIO_TIMEOUT, h).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let msg = if e.is_panic() {
                let p = e.into_panic();
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            } else {
                e.to_string()
            };
            rec.note(format!("SCENARIO PANICKED: {msg}"));
        }
        Err(_) => rec.note(format!("SCENARIO TIMED OUT after {SCENARIO_TIMEOUT:?}")),
    }
    rec.lines()
}

/// Runs `scenario` on the reference and the target concurrently, compares the transcripts
/// (panicking with a diff on mismatch) and returns the reference transcript for extra
/// sanity assertions.
pub async fn differential<F, Fut>(name: &str, opts: Opts, scenario: F) -> Rec
where
    F: Fn(Side, Rec) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let env = Env::start(opts).await;
    let (r, t) = tokio::join!(
        run_side(env.reference(), scenario.clone()),
        run_side(env.target(), scenario)
    );
    assert_same(name, &r, &t, &env.target_log());
    let rec = Rec::new();
    for l in r {
        rec.note(l);
    }
    rec
}

// ------------------------------------------------------------------------------------------
// Watch streams
// ------------------------------------------------------------------------------------------

/// One message-level outcome of reading a watch stream.
#[derive(Debug)]
pub enum Next {
    Msg(WatchResponse),
    Err(tonic::Status),
    End,
    Timeout,
}

enum RxState {
    Pending(JoinHandle<Result<tonic::Streaming<WatchResponse>, tonic::Status>>),
    Ready(Box<tonic::Streaming<WatchResponse>>),
    Done,
}

/// A bidirectional watch stream. Requests are queued on an unbounded channel, so sending never
/// blocks; the stream is opened in the background (gRPC servers send the response headers
/// only with the first message, so awaiting the call before sending would deadlock).
pub struct WatchConn {
    tx: Option<mpsc::UnboundedSender<WatchRequest>>,
    rx: RxState,
}

impl WatchConn {
    pub fn open(client: &mut WatchClient<Channel>) -> WatchConn {
        let (tx, rx) = mpsc::unbounded_channel::<WatchRequest>();
        let mut c = client.clone();
        let h = tokio::spawn(async move {
            let s = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
            c.watch(s).await.map(|r| r.into_inner())
        });
        WatchConn {
            tx: Some(tx),
            rx: RxState::Pending(h),
        }
    }

    pub fn send(&self, r: RequestUnion) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(WatchRequest {
                request_union: Some(r),
            });
        }
    }

    pub fn create(&self, c: WatchCreateRequest) {
        self.send(RequestUnion::CreateRequest(c));
    }

    /// Creates a watch on `[key, end)` from `start`.
    pub fn create_range(&self, key: &str, end: &[u8], start: i64) {
        self.create(WatchCreateRequest {
            key: b(key),
            range_end: Bytes::copy_from_slice(end),
            start_revision: start,
            ..Default::default()
        });
    }

    /// Creates a prefix watch from `start` (0 = now).
    pub fn create_prefix(&self, prefix: &str, start: i64) {
        self.create(WatchCreateRequest {
            key: b(prefix),
            range_end: prefix_end(prefix),
            start_revision: start,
            ..Default::default()
        });
    }

    pub fn cancel(&self, id: i64) {
        self.send(RequestUnion::CancelRequest(WatchCancelRequest {
            watch_id: id,
        }));
    }

    pub fn progress(&self) {
        self.send(RequestUnion::ProgressRequest(WatchProgressRequest {}));
    }

    /// Half-closes the request side.
    pub fn close_send(&mut self) {
        self.tx = None;
    }

    /// Next message within `t`.
    pub async fn next(&mut self, t: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            match &mut self.rx {
                RxState::Done => return Next::End,
                RxState::Pending(h) => match tokio::time::timeout_at(deadline, h).await {
                    Err(_) => return Next::Timeout,
                    Ok(Ok(Ok(s))) => self.rx = RxState::Ready(Box::new(s)),
                    Ok(Ok(Err(st))) => {
                        self.rx = RxState::Done;
                        return Next::Err(st);
                    }
                    Ok(Err(e)) => {
                        self.rx = RxState::Done;
                        return Next::Err(tonic::Status::internal(format!("join: {e}")));
                    }
                },
                RxState::Ready(s) => {
                    return match tokio::time::timeout_at(deadline, s.message()).await {
                        Err(_) => Next::Timeout,
                        Ok(Ok(Some(m))) => Next::Msg(m),
                        Ok(Ok(None)) => {
                            self.rx = RxState::Done;
                            Next::End
                        }
                        Ok(Err(st)) => {
                            self.rx = RxState::Done;
                            Next::Err(st)
                        }
                    }
                }
            }
        }
    }

    /// Receives exactly `n` messages (each within [`MSG_TIMEOUT`]) and records them, sorted by
    /// watch id (stable). A timeout/error/end is recorded in their place and stops the batch.
    pub async fn expect(&mut self, rec: &Rec, label: &str, n: usize) -> Vec<WatchResponse> {
        self.expect_within(rec, label, n, MSG_TIMEOUT).await
    }

    pub async fn expect_within(
        &mut self,
        rec: &Rec,
        label: &str,
        n: usize,
        t: Duration,
    ) -> Vec<WatchResponse> {
        let mut msgs = Vec::new();
        let mut tail = None;
        while msgs.len() < n {
            match self.next(t).await {
                Next::Msg(m) => msgs.push(m),
                other => {
                    tail = Some(other);
                    break;
                }
            }
        }
        msgs.sort_by_key(|m| m.watch_id);
        for m in &msgs {
            rec.push(label, m);
        }
        if let Some(x) = tail {
            record_abnormal(rec, label, x, msgs.len(), n);
        }
        msgs
    }

    /// Receives messages until `events` events in total arrived (each message within
    /// [`MSG_TIMEOUT`]) and records them. Messages without events are recorded too.
    pub async fn expect_events(
        &mut self,
        rec: &Rec,
        label: &str,
        events: usize,
    ) -> Vec<WatchResponse> {
        let mut msgs = Vec::new();
        let mut got = 0;
        let mut tail = None;
        while got < events {
            match self.next(MSG_TIMEOUT).await {
                Next::Msg(m) => {
                    got += m.events.len();
                    msgs.push(m);
                }
                other => {
                    tail = Some(other);
                    break;
                }
            }
        }
        msgs.sort_by_key(|m| m.watch_id);
        for m in &msgs {
            rec.push(label, m);
        }
        if let Some(x) = tail {
            rec.note(format!("{label}: (got {got} of {events} events)"));
            record_abnormal(rec, label, x, msgs.len(), usize::MAX);
        }
        msgs
    }

    /// Records whatever arrives within `d` (expected: nothing).
    pub async fn quiet(&mut self, rec: &Rec, label: &str, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return;
            }
            match self.next(deadline - now).await {
                Next::Timeout => return,
                Next::Msg(m) => rec.push(&format!("{label}: UNEXPECTED"), &m),
                other => {
                    record_abnormal(rec, label, other, 0, 0);
                    return;
                }
            }
        }
    }
}

fn record_abnormal(rec: &Rec, label: &str, x: Next, got: usize, want: usize) {
    let what = match x {
        Next::Timeout => "TIMEOUT".to_string(),
        Next::End => "STREAM ENDED".to_string(),
        Next::Err(s) => format!("STREAM {}", status_str(&s)),
        Next::Msg(_) => unreachable!(),
    };
    if want == usize::MAX || want == 0 {
        rec.note(format!("{label}: {what}"));
    } else {
        rec.note(format!("{label}: {what} after {got} of {want} messages"));
    }
}

// ------------------------------------------------------------------------------------------
// Misc
// ------------------------------------------------------------------------------------------

/// Runs a future with a timeout, panicking with `what` on expiry.
pub async fn within<T>(d: Duration, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(d, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {d:?}: {what}"),
    }
}

/// GET over HTTP/1.1 on loopback, decoding `Transfer-Encoding: chunked` (Go's net/http chunks
/// large bodies such as /metrics, and a chunk header may split a metric line).
pub fn http_get_body(port: u16, path: &str) -> Result<(u16, String), String> {
    let mut s = super::tls::connect(port).map_err(|e| e.to_string())?;
    s.tcp().set_read_timeout(Some(Duration::from_secs(10))).ok();
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| "no header end".to_string())?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut body = raw[split + 4..].to_vec();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad response: {head:?}"))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        let mut i = 0;
        while let Some(eol) = body[i..].windows(2).position(|w| w == b"\r\n") {
            let size_s = String::from_utf8_lossy(&body[i..i + eol]).to_string();
            let size = usize::from_str_radix(size_s.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|e| format!("chunk size {size_s:?}: {e}"))?;
            i += eol + 2;
            if size == 0 || i + size > body.len() {
                break;
            }
            out.extend_from_slice(&body[i..i + size]);
            i += size + 2;
        }
        body = out;
    }
    Ok((status, String::from_utf8_lossy(&body).to_string()))
}

/// A metric of an etcd on `port` (sum of all samples), with chunked decoding.
pub fn etcd_metric(port: u16, name: &str) -> f64 {
    let text = http_get_body(port, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default();
    super::metric_value(&text, name)
}

/// Raw gRPC unary call with an arbitrary request body (for malformed protobuf tests).
pub async fn raw_unary(
    url: &str,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let ch = super::channel(url).await;
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("not ready: {e}")))?;
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(|r| r.into_inner())
}

/// Raw gRPC bidi call: sends the given frames (keeping the request side open), returns the
/// raw response frames received within `t` and the final error status, if any.
pub async fn raw_streaming(
    url: &str,
    path: &'static str,
    frames: Vec<Vec<u8>>,
    t: Duration,
) -> (Vec<Vec<u8>>, Option<tonic::Status>) {
    let ch = super::channel(url).await;
    let mut grpc = tonic::client::Grpc::new(ch);
    if let Err(e) = grpc.ready().await {
        return (
            vec![],
            Some(tonic::Status::unavailable(format!("not ready: {e}"))),
        );
    }
    let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
    for f in frames {
        let _ = tx.send(f);
    }
    let fut = grpc.streaming(
        tonic::Request::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    );
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + t;
    let mut s = match tokio::time::timeout_at(deadline, fut).await {
        Err(_) => return (out, None),
        Ok(Err(st)) => return (out, Some(st)),
        Ok(Ok(r)) => r.into_inner(),
    };
    let mut status = None;
    loop {
        match tokio::time::timeout_at(deadline, s.message()).await {
            Err(_) => break,
            Ok(Ok(Some(m))) => out.push(m),
            Ok(Ok(None)) => break,
            Ok(Err(st)) => {
                status = Some(st);
                break;
            }
        }
    }
    drop(tx);
    (out, status)
}

/// A codec passing raw bytes through.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;
pub struct RawEnc;
pub struct RawDec;

impl tonic::codec::Encoder for RawEnc {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let mut v = vec![0u8; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEnc;
    type Decoder = RawDec;
    fn encoder(&mut self) -> RawEnc {
        RawEnc
    }
    fn decoder(&mut self) -> RawDec {
        RawDec
    }
}

// ------------------------------------------------------------------------------------------
// KV helpers (every answer is recorded)
// ------------------------------------------------------------------------------------------

use etcd_fanout::proto::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};

pub type Kv = KvClient<Channel>;

pub async fn put(kv: &mut Kv, rec: &Rec, k: &str, v: &str) -> Option<PutResponse> {
    let r = kv
        .put(PutRequest {
            key: b(k),
            value: b(v),
            ..Default::default()
        })
        .await;
    rec.res(&format!("put {k}={v}"), r)
}

pub async fn put_req(kv: &mut Kv, rec: &Rec, label: &str, req: PutRequest) -> Option<PutResponse> {
    let r = kv.put(req).await;
    rec.res(label, r)
}

/// Deletes `[k, end)` (`end` empty = the single key).
pub async fn del(
    kv: &mut Kv,
    rec: &Rec,
    k: &str,
    end: &[u8],
    prev_kv: bool,
) -> Option<DeleteRangeResponse> {
    let r = kv
        .delete_range(DeleteRangeRequest {
            key: b(k),
            range_end: Bytes::copy_from_slice(end),
            prev_kv,
        })
        .await;
    rec.res(
        &format!("delete {k}..{:?}", String::from_utf8_lossy(end)),
        r,
    )
}

pub async fn range(
    kv: &mut Kv,
    rec: &Rec,
    label: &str,
    req: RangeRequest,
) -> Option<RangeResponse> {
    let r = kv.range(req).await;
    rec.res(label, r)
}

/// Range of a single key or `[k, end)`.
pub fn rr(k: &str, end: &[u8]) -> RangeRequest {
    RangeRequest {
        key: b(k),
        range_end: Bytes::copy_from_slice(end),
        ..Default::default()
    }
}

/// Range of every key under `prefix`.
pub fn rp(prefix: &str) -> RangeRequest {
    RangeRequest {
        key: b(prefix),
        range_end: prefix_end(prefix),
        ..Default::default()
    }
}

pub async fn txn(kv: &mut Kv, rec: &Rec, label: &str, req: TxnRequest) -> Option<TxnResponse> {
    let r = kv.txn(req).await;
    rec.res(label, r)
}

pub async fn compact(kv: &mut Kv, rec: &Rec, rev: i64, physical: bool) {
    let r = kv
        .compact(CompactionRequest {
            revision: rev,
            physical,
        })
        .await;
    rec.res(&format!("compact {rev} physical={physical}"), r);
}

/// The current store revision (from a range answer, not recorded).
pub async fn current_rev(kv: &mut Kv) -> i64 {
    kv.range(RangeRequest {
        key: b("\0"),
        count_only: true,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().header.map(|h| h.revision).unwrap_or(-1))
    .unwrap_or(-1)
}

/// The standard data set: a few APISIX-like keys, some rewritten, one deleted and recreated,
/// plus keys just outside `/apisix/`. 15 writes: ends at revision 16 on a fresh etcd.
pub async fn populate(kv: &mut Kv, rec: &Rec) {
    for (k, v) in [
        ("/apisix/routes/1", "r1"),
        ("/apisix/routes/2", "r2"),
        ("/apisix/routes/3", "r3"),
        ("/apisix/upstreams/1", "u1"),
        ("/apisix/routes/2", "r2-v2"),
        ("/apisix/services/1", "s1"),
        ("/other/x", "ox"),
        ("/apisix/routes/10", "r10"),
        ("/apisix/routes/1", "r1-v2"),
    ] {
        put(kv, rec, k, v).await;
    }
    del(kv, rec, "/apisix/routes/3", b"", false).await;
    for (k, v) in [
        ("/apisix/routes/3", "r3-new"),
        ("/apisix/consumers/a", "zzz"),
        ("/apisix0", "just past the prefix"),
        ("/apisix", "the prefix without slash"),
        ("/apisix/routes/1", "r1-v3"),
    ] {
        put(kv, rec, k, v).await;
    }
}

impl WatchConn {
    /// Sends a WatchRequest with no request set (etcd ignores it).
    pub fn send_raw_empty(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(WatchRequest {
                request_union: None,
            });
        }
    }
}
