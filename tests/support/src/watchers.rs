//! Load and clients for the fault tests: watch streams that record into [`WatchLog`]s and
//! reconnect like real clients (start_revision = last seen + 1), streams that never read, and
//! a writer that keeps writing (and retrying) across faults.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use etcd_fanout::proto::etcdserverpb::{
    compare, kv_client::KvClient, request_op, watch_client::WatchClient,
    watch_request::RequestUnion, Compare, DeleteRangeRequest, PutRequest, RequestOp, TxnRequest,
    WatchCreateRequest, WatchRequest, WatchResponse,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::checker::WatchLog;

/// A shared watch log.
pub type Log = Arc<Mutex<WatchLog>>;

/// A lazily connecting channel to `url` (reconnects by itself after failures).
pub fn lazy_channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_string())
        .expect("url")
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect_lazy()
}

/// What one watch of a stream asks for.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Name for messages.
    pub name: String,
    /// Range start.
    pub key: Bytes,
    /// Range end (empty: single key).
    pub range_end: Bytes,
    /// First revision (0: from now).
    pub start_revision: i64,
    /// Ask for progress notifications.
    pub progress_notify: bool,
}

impl Spec {
    /// A watch on every key under `prefix` from `start`.
    pub fn prefix(name: impl Into<String>, prefix: &str, start: i64) -> Spec {
        Spec {
            name: name.into(),
            key: Bytes::from(prefix.to_string()),
            range_end: crate::range_end(prefix),
            start_revision: start,
            progress_notify: false,
        }
    }

    /// A watch on `[key, end)` from `start`.
    pub fn range(name: impl Into<String>, key: &str, end: &str, start: i64) -> Spec {
        Spec {
            name: name.into(),
            key: Bytes::from(key.to_string()),
            range_end: Bytes::from(end.to_string()),
            start_revision: start,
            progress_notify: false,
        }
    }

    /// A new log for this spec.
    pub fn log(&self) -> Log {
        let mut l = WatchLog::new(
            self.name.clone(),
            self.key.clone(),
            self.range_end.clone(),
            self.start_revision,
        );
        l.progress_notify = self.progress_notify;
        Arc::new(Mutex::new(l))
    }
}

/// One client watch stream carrying one or more watches, each with its log.
pub struct Stream {
    /// One log per watch, in creation order.
    pub logs: Vec<Log>,
    /// Downstream watch streams opened (1 + reconnections).
    pub opened: Arc<AtomicU64>,
    /// Streams whose every `created` arrived.
    pub established: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Stream {
    /// Opens a watch stream on `channel` creating every watch of `specs`. With `reconnect`,
    /// a stream that breaks is opened again and each watch re-created from its next revision
    /// (cancelled watches stay cancelled), as clientv3 and APISIX do.
    pub fn spawn(channel: Channel, specs: Vec<Spec>, reconnect: bool) -> Stream {
        let logs: Vec<Log> = specs.iter().map(Spec::log).collect();
        Self::spawn_logs(channel, specs, logs, reconnect)
    }

    /// Like [`Stream::spawn`] recording into the given logs (one per spec; e.g. with
    /// `max_header` carried over from the client's previous watch).
    pub fn spawn_logs(
        channel: Channel,
        specs: Vec<Spec>,
        logs: Vec<Log>,
        reconnect: bool,
    ) -> Stream {
        Self::spawn_as(channel, None, specs, logs, reconnect)
    }

    /// Like [`Stream::spawn_logs`] with `token` in the stream's `token` metadata (each
    /// reconnection sends it again), as a client of an etcd with auth on.
    pub fn spawn_as(
        channel: Channel,
        token: Option<String>,
        specs: Vec<Spec>,
        logs: Vec<Log>,
        reconnect: bool,
    ) -> Stream {
        assert_eq!(specs.len(), logs.len());
        let (stop, stop_rx) = watch::channel(false);
        let opened = Arc::new(AtomicU64::new(0));
        let established = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run_stream(
            channel,
            token,
            specs,
            logs.clone(),
            reconnect,
            stop_rx,
            opened.clone(),
            established.clone(),
        ));
        Stream {
            logs,
            opened,
            established,
            stop,
            task,
        }
    }

    /// Closes the stream (the client leaves); its logs are marked [`WatchLog::left`].
    pub async fn close(self) -> Vec<Log> {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        for l in &self.logs {
            l.lock().unwrap().left = true;
        }
        self.logs
    }

    /// True when the stream task has ended (not reconnecting, or every watch cancelled).
    pub fn finished(&self) -> bool {
        self.task.is_finished()
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_stream(
    channel: Channel,
    token: Option<String>,
    specs: Vec<Spec>,
    logs: Vec<Log>,
    reconnect: bool,
    mut stop: watch::Receiver<bool>,
    opened: Arc<AtomicU64>,
    established: Arc<AtomicU64>,
) {
    let mut client = WatchClient::new(channel).max_decoding_message_size(usize::MAX);
    loop {
        if *stop.borrow() {
            return;
        }
        // Re-create every live watch from its next revision.
        let live: Vec<usize> = (0..logs.len())
            .filter(|&i| !logs[i].lock().unwrap().is_canceled())
            .collect();
        if live.is_empty() {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        for &i in &live {
            let start = logs[i].lock().unwrap().next();
            let _ = tx.send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key: specs[i].key.clone(),
                    range_end: specs[i].range_end.clone(),
                    start_revision: start,
                    progress_notify: specs[i].progress_notify,
                    ..Default::default()
                })),
            });
        }
        opened.fetch_add(1, Ordering::Relaxed);
        let call = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(5), client.watch(crate::auth::with_token(token.as_deref(), UnboundedReceiverStream::new(rx)))) => r,
            _ = stop.changed() => return,
        };
        let err = match call {
            Ok(Ok(resp)) => {
                let mut s = resp.into_inner();
                let mut pending: VecDeque<usize> = live.iter().copied().collect();
                let mut ids: HashMap<i64, usize> = HashMap::new();
                let all = live.len();
                loop {
                    let msg = tokio::select! {
                        m = s.message() => m,
                        _ = stop.changed() => { drop(tx); return }
                    };
                    match msg {
                        Ok(Some(resp)) => {
                            route(&resp, &logs, &mut pending, &mut ids);
                            if resp.created && pending.is_empty() && ids.len() == all {
                                established.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(None) => break "stream ended (EOF, no status)".to_string(),
                        Err(st) => {
                            break format!("status {:?}: {}", st.code(), st.message());
                        }
                    }
                }
            }
            Ok(Err(st)) => format!("watch call failed: {:?}: {}", st.code(), st.message()),
            Err(_) => "watch call timed out".to_string(),
        };
        drop(tx);
        for &i in &live {
            logs[i].lock().unwrap().on_error(err.clone());
        }
        if !reconnect {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.changed() => return,
        }
    }
}

fn route(
    resp: &WatchResponse,
    logs: &[Log],
    pending: &mut VecDeque<usize>,
    ids: &mut HashMap<i64, usize>,
) {
    if resp.created {
        if let Some(&i) = ids.get(&resp.watch_id) {
            if !resp.canceled {
                logs[i].lock().unwrap().on_created(resp, true);
                return;
            }
        }
        // etcd answers creates in order.
        match pending.pop_front() {
            Some(i) => {
                if !resp.canceled {
                    ids.insert(resp.watch_id, i);
                }
                logs[i].lock().unwrap().on_created(resp, false);
            }
            None => logs[0].lock().unwrap().violation(format!(
                "`created` for watch id {} that no create asked for",
                resp.watch_id
            )),
        }
        return;
    }
    match ids.get(&resp.watch_id) {
        Some(&i) => logs[i].lock().unwrap().on_response(resp),
        None => logs[0].lock().unwrap().violation(format!(
            "response for unknown watch id {} ({} events, canceled {})",
            resp.watch_id,
            resp.events.len(),
            resp.canceled
        )),
    }
}

/// A watch stream that is opened, gets its watches created, and is then never read: the
/// proxy's responses pile up in flow-control windows and its own buffers.
pub struct IdleStream {
    _requests: mpsc::UnboundedSender<WatchRequest>,
    _responses: tonic::Streaming<WatchResponse>,
}

impl IdleStream {
    /// Opens the stream and sends the creates; returns without reading anything.
    pub async fn open(channel: Channel, specs: &[Spec]) -> Result<IdleStream, String> {
        let mut client = WatchClient::new(channel).max_decoding_message_size(usize::MAX);
        let (tx, rx) = mpsc::unbounded_channel();
        for s in specs {
            let _ = tx.send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key: s.key.clone(),
                    range_end: s.range_end.clone(),
                    start_revision: s.start_revision,
                    ..Default::default()
                })),
            });
        }
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            client.watch(UnboundedReceiverStream::new(rx)),
        )
        .await
        .map_err(|_| "idle watch call timed out".to_string())?
        .map_err(|e| e.to_string())?;
        Ok(IdleStream {
            _requests: tx,
            _responses: resp.into_inner(),
        })
    }
}

/// Counters of a writer.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Writes acknowledged.
    pub acked: AtomicU64,
    /// Writes that failed (and were retried).
    pub failed: AtomicU64,
    /// Header revision of the newest acknowledged write.
    pub last_rev: AtomicI64,
}

/// A writer that keeps changing keys under a prefix: puts, deletes and two-key txns (several
/// events in one revision), each retried on the next endpoint until acknowledged.
pub struct Writer {
    /// Counters.
    pub stats: Arc<WriterStats>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Writer settings.
#[derive(Clone, Debug)]
pub struct WriterOpts {
    /// Key prefix.
    pub prefix: String,
    /// Distinct keys written.
    pub keys: usize,
    /// Value size in bytes.
    pub value_len: usize,
    /// Pause between writes.
    pub pace: Duration,
    /// Stop after this many acknowledged writes.
    pub limit: Option<u64>,
    /// Only puts (no deletes or txns).
    pub puts_only: bool,
    /// With `puts_only`: puts per write (more than one: a txn of that many puts, on distinct
    /// keys, all in one revision). Counted as one write.
    pub batch: usize,
    /// Distinguishes writers sharing a prefix.
    pub id: u32,
}

impl WriterOpts {
    /// Mixed writes on `keys` keys under `prefix` every `pace`.
    pub fn new(prefix: &str, keys: usize, pace: Duration) -> WriterOpts {
        WriterOpts {
            prefix: prefix.to_string(),
            keys,
            value_len: 16,
            pace,
            limit: None,
            puts_only: false,
            batch: 1,
            id: 0,
        }
    }
}

impl Writer {
    /// Starts writing to `urls` (failing over between them).
    pub fn spawn(urls: Vec<String>, opts: WriterOpts) -> Writer {
        let stats = Arc::new(WriterStats::default());
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run_writer(urls, opts, stats.clone(), stop_rx));
        Writer { stats, stop, task }
    }

    /// Stops writing and waits for the write in flight; returns the acknowledged count.
    pub async fn stop(self) -> u64 {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        self.stats.acked.load(Ordering::SeqCst)
    }

    /// Waits until the writer stops by itself (its limit) or `timeout`.
    pub async fn join(self, timeout: Duration) -> Result<u64, String> {
        let stats = self.stats.clone();
        match tokio::time::timeout(timeout, self.task).await {
            Ok(_) => Ok(stats.acked.load(Ordering::SeqCst)),
            Err(_) => {
                let _ = self.stop.send(true);
                Err(format!(
                    "writer not done after {timeout:?}: {} acked, {} failed",
                    stats.acked.load(Ordering::SeqCst),
                    stats.failed.load(Ordering::SeqCst)
                ))
            }
        }
    }

    /// Acknowledged writes so far.
    pub fn acked(&self) -> u64 {
        self.stats.acked.load(Ordering::SeqCst)
    }
}

async fn run_writer(
    urls: Vec<String>,
    o: WriterOpts,
    stats: Arc<WriterStats>,
    mut stop: watch::Receiver<bool>,
) {
    let clients: Vec<KvClient<Channel>> = urls
        .iter()
        .map(|u| KvClient::new(lazy_channel(u)))
        .collect();
    let mut which = 0usize;
    let mut seq = 0u64;
    loop {
        if *stop.borrow()
            || o.limit
                .is_some_and(|l| stats.acked.load(Ordering::SeqCst) >= l)
        {
            return;
        }
        let n = seq as usize;
        let key = |i: usize| Bytes::from(format!("{}k{:03}", o.prefix, i % o.keys.max(1)));
        let mut value = format!("w{}-{seq}-", o.id).into_bytes();
        value.resize(o.value_len.max(value.len()), b'x');
        let value = Bytes::from(value);
        let mut kv = clients[which % clients.len()].clone();
        let op = match (o.puts_only, o.batch) {
            (true, b) if b > 1 => 100,
            (true, _) => 0,
            _ => n % 10,
        };
        let fut = async {
            let rev = match op {
                // A delete (of a key that may or may not exist).
                7 => {
                    kv.delete_range(DeleteRangeRequest {
                        key: key(n * 7 + 3),
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .header
                }
                // A batch of puts in one revision.
                100 => {
                    kv.txn(TxnRequest {
                        success: (0..o.batch)
                            .map(|j| put_op(key(n * o.batch + j), value.clone()))
                            .collect(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .header
                }
                // Two puts in one revision.
                9 => {
                    kv.txn(TxnRequest {
                        compare: vec![Compare {
                            result: compare::CompareResult::Greater as i32,
                            target: compare::CompareTarget::Version as i32,
                            key: key(n + 1),
                            target_union: Some(compare::TargetUnion::Version(-1)),
                            ..Default::default()
                        }],
                        success: vec![
                            put_op(key(n), value.clone()),
                            put_op(key(n + 1), value.clone()),
                        ],
                        failure: vec![],
                    })
                    .await?
                    .into_inner()
                    .header
                }
                _ => {
                    kv.put(PutRequest {
                        key: key(n),
                        value: value.clone(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .header
                }
            };
            Ok::<_, tonic::Status>(rev.map_or(0, |h| h.revision))
        };
        match tokio::time::timeout(Duration::from_secs(3), fut).await {
            Ok(Ok(rev)) => {
                stats.acked.fetch_add(1, Ordering::SeqCst);
                stats.last_rev.fetch_max(rev, Ordering::SeqCst);
                seq += 1;
                if !o.pace.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(o.pace) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
            _ => {
                stats.failed.fetch_add(1, Ordering::SeqCst);
                which += 1;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

fn put_op(key: Bytes, value: Bytes) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key,
            value,
            ..Default::default()
        })),
    }
}
