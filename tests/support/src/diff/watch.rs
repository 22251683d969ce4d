//! Watch streams of a scenario: a bidirectional gRPC watch whose answers are recorded
//! message by message, with the outcome of each expected batch (messages, timeout, end, error).

use std::fmt::Debug;
use std::time::Duration;

use etcd_fanout::proto::etcdserverpb::{
    watch_client::WatchClient, watch_request::RequestUnion, WatchCancelRequest, WatchCreateRequest,
    WatchProgressRequest, WatchRequest, WatchResponse,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::transcript::{status_str, Rec};
use super::{b, range_end, MSG_TIMEOUT, SETTLE};

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

    /// Like [`WatchConn::open`], the stream carrying `metadata` (e.g. a `token`).
    pub fn open_with(
        client: &mut WatchClient<Channel>,
        metadata: tonic::metadata::MetadataMap,
    ) -> WatchConn {
        let (tx, rx) = mpsc::unbounded_channel::<WatchRequest>();
        let mut c = client.clone();
        let h = tokio::spawn(async move {
            let s = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
            let mut req = tonic::Request::new(s);
            *req.metadata_mut() = metadata;
            c.watch(req).await.map(|r| r.into_inner())
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

    /// Creates a prefix watch from `start` (0 = now).
    pub fn create_prefix(&self, prefix: &str, start: i64) {
        self.create(WatchCreateRequest {
            key: b(prefix),
            range_end: range_end(prefix),
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

    /// Expects `n` messages, then nothing more for a moment: an answer (a replay, a
    /// cancel) must come whole.
    pub async fn expect_only(&mut self, rec: &Rec, label: &str, n: usize) -> Vec<WatchResponse> {
        let got = self.expect(rec, label, n).await;
        self.quiet(rec, &format!("{label}: nothing more"), SETTLE)
            .await;
        got
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
