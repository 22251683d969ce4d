//! Upstream watch streams shared by the watches etcd itself must answer (relayed watches and
//! catch-ups), one set of streams per caller identity.
//!
//! etcd checks a watch's permission with the identity of the gRPC stream it is created on
//! (the stream's `token` / `authorization` metadata), so watches of different identities can
//! never share a stream, and watches of one identity always can: etcd numbers the watches of
//! a stream and tags every response with the watch id. This module keeps, per identity (the
//! credential metadata a request carries, tokenless being one identity), streams each
//! carrying up to [`MAX_WATCHES_PER_STREAM`] upstream watches, and routes etcd's responses to
//! them by watch id. clientv3 (which etcd's grpc-proxy uses upstream) multiplexes every watch
//! of one context on one stream without a bound; here a stream holds a bounded number, so an
//! upstream failure, a stalled stream, or a burst of creates (answered in order on a stream)
//! concerns that many watches at most.
//!
//! etcd answers the creates of a stream in the order it received them, through the same
//! ordered control queue whether it accepts (`created`, its new watch id) or refuses one
//! (`created` + `canceled`, watch id -1), and holds back a new watch's events until its
//! `created` is sent. So the creates are matched to their answers in order, and from then on
//! responses are routed by id.
//!
//! A [`RelayWatch`] receives its watch's responses through a small buffer. The stream's reader
//! never waits for one watch: a watch whose buffer is full (its client is not reading) is
//! detached, its upstream watch cancelled, and its owner sees the end of its responses and
//! re-creates it from the first revision it has not delivered, exactly as after an upstream
//! failure. When the stream fails (etcd restarted, connection lost), every watch on it gets
//! the error and resumes the same way on a new stream. A stream closes when its last watch
//! leaves.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::metrics;
use crate::proto::etcdserverpb::{
    watch_request::RequestUnion, WatchCancelRequest, WatchCreateRequest, WatchRequest,
    WatchResponse,
};
use crate::source::upstream::{watch_stream, Upstream};
use crate::tasks::Tasks;

/// Most upstream watches carried by one upstream stream.
pub const MAX_WATCHES_PER_STREAM: usize = 1000;

/// etcd responses buffered per relayed watch; a watch whose owner lets more pile up is
/// detached from its stream (and re-created by its owner when it reads again).
pub const WATCH_BUFFER: usize = 32;

/// What a relayed watch receives: etcd's responses, or the failure of its stream.
type Item = Result<WatchResponse, Status>;

/// The identity a stream is opened with: the credential metadata etcd reads a caller's
/// identity from (the first `token` value, else the first `authorization` value).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Identity {
    /// The `token` metadata.
    token: Option<Bytes>,
    /// The `authorization` metadata (the gateway's `Authorization` header).
    authorization: Option<Bytes>,
}

impl Identity {
    fn of(metadata: &MetadataMap) -> Identity {
        let get = |key: &str| {
            metadata
                .get(key)
                .map(|v| Bytes::copy_from_slice(v.as_bytes()))
        };
        Identity {
            token: get("token"),
            authorization: get("authorization"),
        }
    }
}

/// Every shared stream, by identity.
#[derive(Debug)]
pub struct RelayStreams {
    /// The etcd cluster.
    upstream: Arc<Upstream>,
    /// Owner of the streams' reader tasks.
    tasks: Tasks,
    /// Open streams per identity (each with room or full); a stream leaves the list when it
    /// closes or fails. Locked before any stream's state, never after.
    streams: Mutex<HashMap<Identity, Vec<Arc<SharedStream>>>>,
}

impl RelayStreams {
    /// No streams yet; readers are spawned through `tasks`.
    pub fn new(upstream: Arc<Upstream>, tasks: Tasks) -> Arc<RelayStreams> {
        Arc::new(RelayStreams {
            upstream,
            tasks,
            streams: Mutex::new(HashMap::new()),
        })
    }

    /// Creates `create` upstream with `metadata`'s credentials, on a stream of that identity
    /// with room (a new one if none has). The first response is etcd's answer to the create.
    pub fn watch(
        self: &Arc<Self>,
        metadata: &MetadataMap,
        create: WatchCreateRequest,
    ) -> RelayWatch {
        let identity = Identity::of(metadata);
        let mut streams = lock(&self.streams);
        let list = streams.entry(identity.clone()).or_default();
        for stream in list.iter() {
            if let Some(member) = stream.join(&create) {
                return RelayWatch::new(self.clone(), stream.clone(), member);
            }
        }
        let (requests, rx) = mpsc::unbounded_channel();
        let stream = Arc::new(SharedStream {
            identity,
            state: Mutex::new(StreamState {
                requests: Some(requests),
                creates: VecDeque::new(),
                routes: HashMap::new(),
                members: HashMap::new(),
                next_member: 0,
                closed: false,
            }),
            stop: CancellationToken::new(),
        });
        metrics::RELAY_STREAMS.inc();
        // A new stream is open and empty: the join succeeds (its reader starts only below).
        let member = stream.join(&create);
        list.push(stream.clone());
        drop(streams);
        self.tasks.spawn(stream.clone().read(
            self.clone(),
            watch_stream(
                metadata,
                tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
            ),
        ));
        match member {
            Some(member) => RelayWatch::new(self.clone(), stream, member),
            // Unreachable in practice; an ended watch makes its owner try again.
            None => RelayWatch::ended(self.clone(), stream),
        }
    }

    /// Removes a closed `stream` from its identity's list.
    fn forget(&self, stream: &Arc<SharedStream>) {
        let mut streams = lock(&self.streams);
        if let Some(list) = streams.get_mut(&stream.identity) {
            list.retain(|s| !Arc::ptr_eq(s, stream));
            if list.is_empty() {
                streams.remove(&stream.identity);
            }
        }
    }
}

/// One upstream watch stream and the watches it carries.
#[derive(Debug)]
struct SharedStream {
    /// Whose credentials the stream was opened with.
    identity: Identity,
    /// Routing state, locked briefly by the reader and by joining / leaving watches.
    state: Mutex<StreamState>,
    /// Stops the reader when the stream closes.
    stop: CancellationToken,
}

/// The routing state of a stream.
#[derive(Debug)]
struct StreamState {
    /// Requests to etcd (creates and cancels; at most one of each per member, so bounded by
    /// [`MAX_WATCHES_PER_STREAM`]); `None` once closed, which half-closes the stream.
    requests: Option<mpsc::UnboundedSender<WatchRequest>>,
    /// Members whose create etcd has not answered yet, in the order the creates were sent.
    creates: VecDeque<u64>,
    /// etcd's watch id -> member.
    routes: HashMap<i64, u64>,
    /// The watches on the stream, by member number.
    members: HashMap<u64, Member>,
    /// Next member number.
    next_member: u64,
    /// Closed (failed, or its last watch left): no new member joins.
    closed: bool,
}

/// One watch on a stream.
#[derive(Debug)]
struct Member {
    /// Its responses.
    tx: mpsc::Sender<Item>,
    /// etcd's id for it, once created.
    watch_id: Option<i64>,
}

impl SharedStream {
    /// Sends `create` on this stream as a new member, unless it is closed or full.
    fn join(&self, create: &WatchCreateRequest) -> Option<(u64, mpsc::Receiver<Item>)> {
        let mut st = lock(&self.state);
        if st.closed || st.members.len() >= MAX_WATCHES_PER_STREAM {
            return None;
        }
        let request = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                // etcd assigns the id (unique on the stream, never reused).
                watch_id: 0,
                ..create.clone()
            })),
        };
        st.requests.as_ref()?.send(request).ok()?;
        let member = st.next_member;
        st.next_member += 1;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        st.creates.push_back(member);
        st.members.insert(member, Member { tx, watch_id: None });
        Some((member, rx))
    }

    /// `member` leaves (its owner dropped it): its upstream watch is cancelled; the stream
    /// closes after its last member. True when this closed the stream.
    fn leave(&self, member: u64) -> bool {
        let mut st = lock(&self.state);
        if let Some(m) = st.members.remove(&member) {
            if let Some(id) = m.watch_id {
                st.routes.remove(&id);
                st.cancel(id);
            }
        }
        st.members.is_empty() && self.close(&mut st)
    }

    /// Marks the stream closed (half-closing it, stopping its reader); true the first time.
    fn close(&self, st: &mut StreamState) -> bool {
        if st.closed {
            return false;
        }
        st.closed = true;
        st.requests = None;
        self.stop.cancel();
        metrics::RELAY_STREAMS.dec();
        true
    }

    /// The stream failed: every member gets `status` (or, with a full buffer, just the end).
    fn fail(&self, status: &Status) -> bool {
        let mut st = lock(&self.state);
        for (_, m) in st.members.drain() {
            let _ = m.tx.try_send(Err(status.clone()));
        }
        st.routes.clear();
        st.creates.clear();
        self.close(&mut st)
    }

    /// Reads etcd's responses and routes them until the stream fails or closes.
    async fn read<S>(self: Arc<Self>, owner: Arc<RelayStreams>, request: tonic::Request<S>)
    where
        S: futures::Stream<Item = WatchRequest> + Send + 'static,
    {
        let mut client = owner.upstream.watch();
        let opened = tokio::select! {
            r = client.watch(request) => r,
            _ = self.stop.cancelled() => return,
        };
        let status = match opened {
            Ok(responses) => {
                let mut responses = responses.into_inner();
                loop {
                    let msg = tokio::select! {
                        m = responses.message() => m,
                        _ = self.stop.cancelled() => return,
                    };
                    match msg {
                        Ok(Some(resp)) => {
                            owner.upstream.observe_header(resp.header.as_ref());
                            if self.route(resp) {
                                owner.forget(&self);
                                return;
                            }
                        }
                        Ok(None) => break Status::unavailable("upstream watch stream ended"),
                        Err(status) => break status,
                    }
                }
            }
            Err(status) => status,
        };
        tracing::debug!(error = %status, "shared relay stream failed");
        if self.fail(&status) {
            owner.forget(&self);
        }
    }

    /// Hands `resp` to its member. True when that closed the stream (its last member left).
    fn route(&self, resp: WatchResponse) -> bool {
        let mut st = lock(&self.state);
        let member = if resp.created {
            // etcd answers creates in the order they were sent.
            let Some(member) = st.creates.pop_front() else {
                return false;
            };
            let Some(m) = st.members.get_mut(&member) else {
                // Its owner left before the answer: nothing to route, cancel what etcd made.
                if !resp.canceled {
                    st.cancel(resp.watch_id);
                }
                return false;
            };
            if !resp.canceled {
                m.watch_id = Some(resp.watch_id);
                st.routes.insert(resp.watch_id, member);
            }
            member
        } else {
            match st.routes.get(&resp.watch_id) {
                Some(&member) => member,
                // A watch cancelled or detached meanwhile.
                None => return false,
            }
        };
        let ends = resp.canceled;
        let Some(m) = st.members.get(&member) else {
            return false;
        };
        let sent = match m.tx.try_send(Ok(resp)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::RELAY_DETACHED.inc();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        };
        let keep = sent && !ends;
        if !keep {
            // Ended by etcd (refused, compacted), or its owner is not reading (detached: it
            // re-creates the watch once it reads again) or gone.
            if let Some(m) = st.members.remove(&member) {
                if let Some(id) = m.watch_id {
                    st.routes.remove(&id);
                    if !ends {
                        st.cancel(id);
                    }
                }
            }
            return st.members.is_empty() && self.close(&mut st);
        }
        false
    }
}

impl StreamState {
    /// Asks etcd to cancel watch `id` on this stream (its answer is routed nowhere).
    fn cancel(&self, id: i64) {
        if let Some(tx) = &self.requests {
            let _ = tx.send(WatchRequest {
                request_union: Some(RequestUnion::CancelRequest(WatchCancelRequest {
                    watch_id: id,
                })),
            });
        }
    }
}

/// One upstream watch on a shared stream. Dropping it cancels the upstream watch.
#[derive(Debug)]
pub struct RelayWatch {
    /// etcd's responses for this watch (closed when detached or the stream failed).
    rx: mpsc::Receiver<Item>,
    /// The stream it is on.
    stream: Arc<SharedStream>,
    /// Its member number on the stream.
    member: u64,
    /// The streams' owner (to forget the stream if this watch closes it).
    owner: Arc<RelayStreams>,
}

impl RelayWatch {
    fn new(
        owner: Arc<RelayStreams>,
        stream: Arc<SharedStream>,
        (member, rx): (u64, mpsc::Receiver<Item>),
    ) -> RelayWatch {
        RelayWatch {
            rx,
            stream,
            member,
            owner,
        }
    }

    /// A watch that is over before it started (its owner tries again).
    fn ended(owner: Arc<RelayStreams>, stream: Arc<SharedStream>) -> RelayWatch {
        let (_, rx) = mpsc::channel(1);
        RelayWatch {
            rx,
            stream,
            member: u64::MAX,
            owner,
        }
    }

    /// The next response from etcd: `Ok(None)` when the watch was detached from its stream
    /// (its owner was not reading) or the stream ended, `Err` with the stream's failure.
    /// Either way the owner re-creates the watch from its first undelivered revision.
    pub async fn message(&mut self) -> Result<Option<WatchResponse>, Status> {
        match self.rx.recv().await {
            Some(item) => item.map(Some),
            None => Ok(None),
        }
    }
}

impl Drop for RelayWatch {
    fn drop(&mut self) {
        if self.stream.leave(self.member) {
            self.owner.forget(&self.stream);
        }
    }
}

/// Locks `m`; a poisoned lock (a panic elsewhere) still holds consistent routing state.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
