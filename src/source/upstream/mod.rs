//! The connection to the real etcd cluster: one load-balanced gRPC channel over every
//! configured endpoint, the typed clients built on it, and the last response header etcd sent
//! (cluster id, member id, raft term) that the proxy stamps on answers it makes itself.
//!
//! Failover: tonic's balanced channel keeps a connection per endpoint and routes around the
//! ones that fail; HTTP/2 keepalives notice a stalled connection that never closes.
//!
//! The proxy's own identity on this channel (its user, token and the calls it makes for
//! itself) lives in [`credentials`], a part of the connection rather than a layer above it.

pub mod credentials;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use std::time::Duration;

use tower::Service;

use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};
use tonic::Request;

use crate::tls::client::UpstreamTls;

use crate::proto::etcdserverpb::{
    auth_client::AuthClient, cluster_client::ClusterClient, kv_client::KvClient,
    lease_client::LeaseClient, maintenance_client::MaintenanceClient, watch_client::WatchClient,
    watch_request::RequestUnion, ResponseHeader, WatchCreateRequest, WatchRequest, WatchResponse,
};

/// Metadata keys copied from a downstream request to the upstream one: the auth token
/// (`token`), clientv3's require-leader flag (`hasleader`), the gateway's token header and
/// the gateway's `Accept` header (`grpcgateway-accept`: with it etcd ignores the client
/// certificate of the connection, here the proxy's, as it does for its own gateway).
const FORWARDED_METADATA: [&str; 4] = ["token", "hasleader", "authorization", "grpcgateway-accept"];

/// Shared handle on the upstream etcd cluster (cheap to clone: the channel is shared).
#[derive(Debug)]
pub struct Upstream {
    /// Balanced channel over all endpoints.
    channel: UpstreamChannel,
    /// The endpoint URLs.
    endpoints: Vec<String>,
    /// TLS client configuration (`https://` endpoints).
    tls: Option<Arc<UpstreamTls>>,
    /// Cluster id, member id and raft term from the most recent upstream response: read on
    /// every answer the proxy makes, replaced (rarely) when etcd's identity fields change.
    header: ArcSwap<ResponseHeader>,
    /// Highest revision any etcd response header has shown (etcd's revision is at least this).
    revision: std::sync::atomic::AtomicI64,
    /// The proxy's own login and token, for the calls it makes for itself.
    credentials: crate::source::upstream::credentials::Credentials,
}

impl Upstream {
    /// Builds the channel over plaintext endpoints; connections are made lazily and re-made
    /// after failures.
    #[cfg(test)]
    pub fn new(endpoints: &[String]) -> Result<Upstream, String> {
        Self::with_tls(endpoints, None)
    }

    /// Builds the channel, over TLS when `tls` is given (`https://` endpoints).
    pub fn with_tls(
        endpoints: &[String],
        tls: Option<Arc<UpstreamTls>>,
    ) -> Result<Upstream, String> {
        let mut eps = Vec::with_capacity(endpoints.len());
        for url in endpoints {
            let url = if url.contains("://") {
                url.clone()
            } else {
                format!("http://{url}")
            };
            let ep = Endpoint::from_shared(url.clone())
                .map_err(|e| format!("invalid endpoint {url:?}: {e}"))?
                .connect_timeout(Duration::from_secs(3))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true)
                .initial_stream_window_size(Some(4 << 20))
                .initial_connection_window_size(Some(16 << 20));
            eps.push(ep);
        }
        if eps.is_empty() {
            return Err("no etcd endpoint configured".into());
        }
        let channel = match &tls {
            None if eps.len() == 1 => UpstreamChannel::Plain(eps.remove(0).connect_lazy()),
            None => UpstreamChannel::Plain(Channel::balance_list(eps.into_iter())),
            Some(tls) => UpstreamChannel::tls(tls, eps),
        };
        Ok(Upstream {
            channel,
            endpoints: endpoints.to_vec(),
            tls,
            header: ArcSwap::from_pointee(ResponseHeader::default()),
            revision: std::sync::atomic::AtomicI64::new(0),
            credentials: Default::default(),
        })
    }

    /// The configured endpoint URLs (for the gateway's HTTP calls to etcd).
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The TLS client configuration for `https://` endpoints.
    pub fn tls(&self) -> Option<&Arc<UpstreamTls>> {
        self.tls.as_ref()
    }

    /// Uses `credentials` for the proxy's own calls (see [`crate::source::upstream::credentials`]).
    pub fn with_credentials(
        mut self,
        credentials: crate::source::upstream::credentials::Credentials,
    ) -> Self {
        self.credentials = credentials;
        self
    }

    /// The proxy's own credentials.
    pub fn credentials(&self) -> &crate::source::upstream::credentials::Credentials {
        &self.credentials
    }

    /// KV client with no message size cap (etcd sends ranges of any size).
    pub fn kv(&self) -> KvClient<UpstreamChannel> {
        KvClient::new(self.channel.clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    /// Watch client.
    pub fn watch(&self) -> WatchClient<UpstreamChannel> {
        WatchClient::new(self.channel.clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    /// Lease client.
    pub fn lease(&self) -> LeaseClient<UpstreamChannel> {
        LeaseClient::new(self.channel.clone()).max_decoding_message_size(usize::MAX)
    }

    /// Cluster client.
    pub fn cluster(&self) -> ClusterClient<UpstreamChannel> {
        ClusterClient::new(self.channel.clone()).max_decoding_message_size(usize::MAX)
    }

    /// Maintenance client.
    pub fn maintenance(&self) -> MaintenanceClient<UpstreamChannel> {
        MaintenanceClient::new(self.channel.clone()).max_decoding_message_size(usize::MAX)
    }

    /// Auth client.
    pub fn auth(&self) -> AuthClient<UpstreamChannel> {
        AuthClient::new(self.channel.clone()).max_decoding_message_size(usize::MAX)
    }

    /// Remembers the identity fields and the revision of a header etcd sent.
    pub fn observe_header(&self, h: Option<&ResponseHeader>) {
        if let Some(h) = h {
            self.revision
                .fetch_max(h.revision, std::sync::atomic::Ordering::AcqRel);
            let cur = self.header.load();
            if (cur.cluster_id, cur.member_id, cur.raft_term)
                != (h.cluster_id, h.member_id, h.raft_term)
            {
                self.header.store(Arc::new(ResponseHeader {
                    cluster_id: h.cluster_id,
                    member_id: h.member_id,
                    raft_term: h.raft_term,
                    revision: 0,
                }));
            }
        }
    }

    /// The highest revision etcd has been seen at (a lower bound of its current revision).
    pub fn observed_revision(&self) -> i64 {
        self.revision.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A response header for an answer the proxy makes itself, at `revision`.
    pub fn header(&self, revision: i64) -> ResponseHeader {
        let mut h = **self.header.load();
        h.revision = revision;
        h
    }
}

impl Upstream {
    /// A failure of a call to etcd worded for the log: it names etcd and its endpoint(s)
    /// (the one endpoint, or every configured one: the balanced channel does not say which
    /// one failed) and says whether etcd was unreachable or answered with an error, e.g.
    /// `etcd at http://127.0.0.1:2379 unreachable: tcp connect error: Connection refused`.
    pub fn describe(&self, e: &tonic::Status) -> String {
        let at = self.endpoints.join(",");
        let mut detail = e.message().to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            let s_text = s.to_string();
            if !s_text.is_empty() && !detail.contains(&s_text) {
                detail.push_str(": ");
                detail.push_str(&s_text);
            }
            source = s.source();
        }
        // Statuses tonic makes itself carry their transport error as a source; etcd's own
        // answers (e.g. "etcdserver: no leader") come from its grpc-status and carry none.
        let transport = std::error::Error::source(e).is_some()
            || matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
                && !e.message().starts_with("etcdserver:");
        match e.code() {
            tonic::Code::DeadlineExceeded if transport || e.message().is_empty() => {
                format!("etcd at {at} did not answer in time: {detail}")
            }
            _ if transport => format!("etcd at {at} unreachable: {detail}"),
            code => format!("etcd at {at} answered {code:?}: {detail}"),
        }
    }
}

/// Wraps a client's `msg` forwarded to etcd in a request carrying the caller's credentials
/// from `from` (counted in `etcd_fanout_upstream_requests_total{kind="forwarded"}`).
pub fn forward<T>(from: &MetadataMap, msg: T) -> Request<T> {
    crate::metrics::Upstream::Forwarded.inc();
    with_credentials(from, msg)
}

/// `msg` in a request carrying the credentials in `from`.
fn with_credentials<T>(from: &MetadataMap, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    copy_credentials(from, req.metadata_mut());
    req
}

/// One watch on its own upstream stream. Dropping it closes the stream (and so the watch).
#[derive(Debug)]
pub struct UpstreamWatch {
    /// Keeps the request stream open; dropping it half-closes the stream.
    _requests: tokio::sync::mpsc::Sender<WatchRequest>,
    /// etcd's responses.
    pub responses: tonic::Streaming<WatchResponse>,
    /// A response already read from `responses` (the `created` one), returned first by
    /// [`UpstreamWatch::message`].
    pending: Option<WatchResponse>,
}

impl UpstreamWatch {
    /// The next response: a response put back first, then the stream's.
    pub async fn message(&mut self) -> Result<Option<WatchResponse>, tonic::Status> {
        match self.pending.take() {
            Some(r) => Ok(Some(r)),
            None => self.responses.message().await,
        }
    }

    /// Puts a response back, to be returned by the next [`UpstreamWatch::message`].
    pub fn push_back(&mut self, resp: WatchResponse) {
        self.pending = Some(resp);
    }
}

impl Upstream {
    /// Opens a new upstream watch stream carrying one watch, `create`, with `metadata`'s
    /// credentials and the require-leader flag.
    pub async fn open_watch(
        &self,
        kind: crate::metrics::Upstream,
        metadata: &MetadataMap,
        create: WatchCreateRequest,
    ) -> Result<UpstreamWatch, tonic::Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let req = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(create)),
        };
        tx.send(req)
            .await
            .map_err(|_| tonic::Status::internal("request channel closed"))?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        kind.inc();
        let responses = self
            .watch()
            .watch(watch_stream(metadata, stream))
            .await?
            .into_inner();
        Ok(UpstreamWatch {
            _requests: tx,
            responses,
            pending: None,
        })
    }
}

/// A watch stream request for etcd carrying `metadata`'s credentials and clientv3's
/// `hasleader` flag, so a member that loses its leader ends the stream instead of silently
/// serving a stale watch (the proxy then resumes on a healthy member).
pub fn watch_stream<S>(metadata: &MetadataMap, requests: S) -> Request<S> {
    let mut req = with_credentials(metadata, requests);
    req.metadata_mut().insert(
        "hasleader",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

/// True when the caller requires a member with a leader (clientv3's `WithRequireLeader`:
/// `hasleader: true` metadata). etcd refuses such calls with "etcdserver: no leader" when it
/// has none; the proxy does the same for a stale prefix.
pub fn requires_leader(metadata: &MetadataMap) -> bool {
    metadata
        .get("hasleader")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "true")
}

/// Only the metadata the proxy reads or forwards for a caller ([`FORWARDED_METADATA`], every
/// value in order), in a map of that size: what a long-lived watch stream keeps of its request
/// headers (a gRPC request's whole header map is about 1 KB, most of it `te`, `user-agent`,
/// `content-type` and spare capacity).
pub fn credentials_only(metadata: MetadataMap) -> MetadataMap {
    let kept: usize = FORWARDED_METADATA
        .iter()
        .map(|k| metadata.get_all(*k).iter().count())
        .sum();
    if kept == 0 {
        return MetadataMap::new();
    }
    let headers = metadata.into_headers();
    let mut out = http::HeaderMap::with_capacity(kept);
    for key in FORWARDED_METADATA {
        for v in headers.get_all(key) {
            out.append(key, v.clone());
        }
    }
    MetadataMap::from_headers(out)
}

/// Copies the credential metadata (see [`FORWARDED_METADATA`]) from one map to another.
pub fn copy_credentials(from: &MetadataMap, to: &mut MetadataMap) {
    for key in FORWARDED_METADATA {
        if let Some(v) = from.get(key) {
            to.insert(key, v.clone());
        }
    }
}

/// A boxed error, as tower's balancer and buffer return them.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One HTTP/2 request to etcd, boxed.
type BoxResponse =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, BoxError>> + Send>>;

/// Requests over TLS channels, balanced and buffered (clonable like tonic's `Channel`).
type TlsBalanced = tower::buffer::Buffer<http::Request<tonic::body::Body>, BoxResponse>;

/// The service every typed client runs on.
#[derive(Clone)]
pub enum UpstreamChannel {
    /// tonic's channel (balanced over the endpoints when there are several).
    Plain(Channel),
    /// One tonic channel per `https://` endpoint, each with its TLS connector, balanced by
    /// tower's power-of-two-choices (tonic's own balancer takes no custom connector).
    Tls(TlsBalanced),
}

impl std::fmt::Debug for UpstreamChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamChannel::Plain(c) => f.debug_tuple("Plain").field(c).finish(),
            UpstreamChannel::Tls(_) => f.write_str("Tls"),
        }
    }
}

impl UpstreamChannel {
    /// Channels to `https://` endpoints over `tls`.
    fn tls(tls: &Arc<UpstreamTls>, eps: Vec<Endpoint>) -> UpstreamChannel {
        let channels: Vec<_> = eps
            .iter()
            .map(|ep| {
                // `Channel::new`, not `Endpoint::connect_with_connector_lazy`: the latter puts
                // tonic's own TLS layer (present when tonic's TLS feature is on) in front,
                // which refuses `https://` without tonic's TLS settings. The connector bounds
                // connect plus handshake in time itself.
                tower::load::PendingRequests::new(
                    Channel::new(tls.grpc_connector(), ep.clone()),
                    tower::load::CompleteOnResponse::default(),
                )
            })
            .collect();
        let balanced =
            tower::balance::p2c::Balance::new(tower::discover::ServiceList::new(channels));
        let boxed = tower::util::BoxService::new(balanced);
        UpstreamChannel::Tls(tower::buffer::Buffer::new(boxed, 1024))
    }
}

impl Service<http::Request<tonic::body::Body>> for UpstreamChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = BoxResponse;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            UpstreamChannel::Plain(c) => c.poll_ready(cx).map_err(Into::into),
            UpstreamChannel::Tls(c) => c.poll_ready(cx),
        }
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> BoxResponse {
        match self {
            UpstreamChannel::Plain(c) => {
                let f = c.call(req);
                Box::pin(async move { f.await.map_err(Into::into) })
            }
            UpstreamChannel::Tls(c) => Box::pin(c.call(req)),
        }
    }
}
