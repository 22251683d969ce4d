//! The listener: one TCP port serving the etcd v3 gRPC API and plain HTTP on every
//! connection. The first bytes of a connection tell HTTP/2 (the preface) from HTTP/1.x. HTTP/2
//! connections are served by hyper: gRPC requests (`content-type: application/grpc...`) go to
//! tonic and the [`grpc`] routes, anything else to the [`gateway`]. HTTP/1.x connections are
//! served by [`http1`], every request to the [`gateway`] (health, readiness, metrics, and the
//! JSON API), as etcd sends every HTTP/1 request to its HTTP handlers.
//!
//! With TLS ([`crate::tls::server`]) the handshake's ALPN tells the protocols apart instead
//! (`h2`: HTTP/2; `http/1.1` or none: HTTP/1.x), and what the handshake proved about the client
//! ([`Peer`]) goes with each request: [`crate::tls::identity`] decides what its certificate's
//! CommonName means.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::service::Routes;
use tower::ServiceExt;

use crate::serve::access::AuthState;
use crate::serve::Services;
use crate::throttle::Throttle;
use crate::tls::identity::{self, CnPolicy, Peer};
use crate::tls::server::ServerTls;
use crate::wire::lanes::{self, Lanes};
use crate::wire::transport::Transport;
use crate::wire::{age, coalesce, gate, http1};
use crate::wire::{gateway, grpc};

fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Decrements a connections gauge when the connection's task ends.
struct OpenGuard(prometheus::IntGauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The first bytes an HTTP/2 client sends (prior knowledge: gRPC, h2c).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a connection speaks, told from its first bytes.
enum Protocol {
    /// HTTP/2: gRPC and JSON over h2c, served by hyper.
    Http2,
    /// HTTP/1.x: the JSON gateway, served by [`http1`].
    Http1,
}

/// Reads the first bytes of a connection until they tell HTTP/2's preface from anything else;
/// `None` if the client leaves first. The bytes read are returned with the answer.
async fn sniff(stream: &mut TcpStream) -> Option<(Protocol, BytesMut)> {
    let mut buf = BytesMut::with_capacity(H2_PREFACE.len());
    loop {
        let n = buf.len().min(H2_PREFACE.len());
        if buf[..n] != H2_PREFACE[..n] {
            return Some((Protocol::Http1, buf));
        }
        if n == H2_PREFACE.len() {
            return Some((Protocol::Http2, buf));
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// A stream whose first reads return bytes already read from it (the sniffed preface).
struct Rewind<S> {
    /// Bytes to return before reading the stream again.
    prefix: Bytes,
    /// The connection.
    inner: S,
}

impl<S: Transport> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: Transport> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An answer being computed (boxed: connections keep no handler-sized state, and the boxing
/// pins down that it is `Send`).
type Answer = Pin<Box<dyn Future<Output = http::Response<tonic::body::Body>> + Send>>;

/// Which handler an HTTP/2 request goes to.
enum H2Route {
    /// JSON over h2c: the HTTP handlers.
    Http,
    /// A gRPC method etcd does not have.
    Unknown(tonic::Status),
    /// `KV/Range` with its shared encoder.
    Range,
    /// `Watch/Watch` with its shared encoder.
    Watch,
    /// Any other gRPC method.
    Grpc,
}

/// What a connection's requests carry along: the client's TLS identity and its policy.
#[derive(Debug, Clone, Default)]
struct ConnInfo {
    /// What the TLS handshake proved (nothing for plaintext).
    peer: Arc<Peer>,
    /// What a certificate's CommonName means on this listener.
    policy: CnPolicy,
}

impl ConnInfo {
    /// etcd's answer to a gateway request this client may not make (see
    /// [`identity::gateway_refusal`]; `services` tell etcd's auth state); otherwise the peer
    /// is attached to the request.
    fn admit_http<B>(
        &self,
        req: &mut http::Request<B>,
        services: &Services,
    ) -> Option<http::Response<tonic::body::Body>> {
        self.peer.common_name.as_ref()?;
        let refusal =
            identity::gateway_refusal(self.policy, &self.peer, req.uri().path(), auth_on(services));
        req.extensions_mut().insert(self.peer.clone());
        refusal
    }
}

/// Whether etcd is known to have auth enabled: what a client certificate's CommonName means
/// depends on it (`tls::identity`). Unknown counts as off there, safely: while the state is
/// unknown every request the caches could answer is forwarded, tokenless, so etcd judges it
/// as anonymous (never more than the CommonName's user could do).
fn auth_on(services: &Services) -> bool {
    services.access.auth_state() == AuthState::On
}

/// gRPC methods etcd answers without looking at the caller's identity, so a client
/// certificate's CommonName never matters for them (`Authenticate` is how such a client gets a
/// token).
const IDENTITY_FREE_METHODS: [&str; 2] = [
    "/etcdserverpb.Auth/Authenticate",
    "/etcdserverpb.Cluster/MemberList",
];

/// One HTTP/2 request: gRPC to tonic (Watch and KV/Range to their own encoders), anything
/// else (JSON over h2c) to the [`gateway`].
fn h2_request(
    mut req: http::Request<Incoming>,
    routes: Routes,
    services: Services,
    conn: &ConnInfo,
) -> Answer {
    let start = std::time::Instant::now();
    let route = if !is_grpc(&req) {
        if let Some(refusal) = conn.admit_http(&mut req, &services) {
            return Box::pin(async move { refusal });
        }
        H2Route::Http
    } else if let Some(status) = grpc::unknown_method(req.uri().path()) {
        H2Route::Unknown(status)
    } else if let Some(status) = (!IDENTITY_FREE_METHODS.contains(&req.uri().path()))
        .then(|| identity::grpc_refusal(conn.policy, &conn.peer, req.headers(), auth_on(&services)))
        .flatten()
    {
        H2Route::Unknown(status)
    } else {
        if conn.peer.common_name.is_some() {
            // For the services (`tonic::Request::extensions`): who the certificate names.
            req.extensions_mut().insert(conn.peer.clone());
        }
        match req.uri().path() {
            grpc::range::PATH => H2Route::Range,
            grpc::watch::PATH => H2Route::Watch,
            _ => H2Route::Grpc,
        }
    };
    let max = grpc::MAX_DECODING_MESSAGE;
    let rpc = grpc::observe::handles(req.uri().path());
    let observe = move |resp| grpc::observe::observe(resp, rpc, start);
    match route {
        H2Route::Http => {
            let req = req.map(|b| {
                b.map_err(|e| crate::wire::body::BodyError::Transport(e.to_string()))
                    .boxed()
            });
            Box::pin(async move { gateway::handle(req, &services).await })
        }
        H2Route::Unknown(status) => Box::pin(async move { observe(status.into_http()) }),
        H2Route::Range => Box::pin(async move {
            observe(grpc::go_status(
                grpc::range::serve(services.kv, req, max).await,
            ))
        }),
        H2Route::Watch => Box::pin(async move {
            observe(grpc::go_status(
                grpc::watch::serve(services.watch, req, max).await,
            ))
        }),
        H2Route::Grpc => Box::pin(async move {
            match routes.oneshot(req).await {
                Ok(resp) => observe(grpc::go_status(resp)),
                Err(never) => match never {},
            }
        }),
    }
}

/// HTTP/2 receive window of each stream: how much a client may send that the proxy has not
/// read yet, per stream. 64 KiB, grpc-go's (etcd's) initial stream window.
///
/// h2 also keeps a budget for the framing overhead of small DATA frames received and not yet
/// read (each frame of `p` < 256 bytes costs `256 - p`; half the connection window) and ends
/// the connection with GOAWAY `ENHANCE_YOUR_CALM` ("too_many_data_frames") when it runs out;
/// hyper does not let it be set. A watch session reads its requests as they arrive
/// (`serve/watch/session.rs`) and stops reading only when 1 MiB of them wait to be handled (a
/// client flooding creates without reading its answers): then the stream's window holds the
/// client back, as etcd's Go server does. A stopped stream holds at most one window of
/// frames, which for messages of at least 10 bytes (the smallest create, one per DATA frame
/// as grpc-go and tonic send them) is `STREAM_WINDOW / 10 * 246` bytes of overhead (1.6 MiB):
/// the budget of [`CONNECTION_WINDOW`] (32 MiB) holds 20 such streams stopped at once on one
/// connection (49 with 25-byte creates), so flow control, not GOAWAY, holds back several
/// streams flooding creates (`tests/bursts.rs`). What still ends a connection: frames of a
/// few bytes (a message cut into pieces) left unread, more than 20 streams of one connection
/// stopped at once, and h2's other limits (empty DATA frames, rapid resets, CONTINUATION
/// floods) as they are.
const STREAM_WINDOW: u32 = 64 << 10;

/// HTTP/2 receive window of a connection (all its streams): see [`STREAM_WINDOW`]; h2's
/// small-frame budget is half of it.
const CONNECTION_WINDOW: u32 = 64 << 20;

/// Connections the kernel may complete and queue before the proxy accepts them: the largest
/// backlog `listen` takes, which Linux lowers to `net.core.somaxconn` (4096 by default since
/// Linux 5.4), as etcd's Go listener asks for. tokio's `bind` asks for 1,024: 3,000 clients
/// connecting at once (a reconnect storm) then overflowed the queue and hundreds waited a
/// one-second SYN retransmission.
const LISTEN_BACKLOG: u32 = 65_535;

/// Binds the proxy's listening socket at `addr` (`SO_REUSEADDR`, as tokio's `bind` and Go's
/// listener set it) with [`LISTEN_BACKLOG`].
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts connections (TLS ones when `tls` is given) until `shutdown` turns true, then stops
/// accepting and lets open connections finish gracefully for at most `drain`.
pub async fn serve(
    listener: TcpListener,
    services: Services,
    tls: Option<Arc<ServerTls>>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let routes = grpc::routes(&services);
    let config = &services.hub.config;
    let lanes = Lanes::start(config.new_connection_lane_threads()).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot start the new-connection lane: serving every connection on the main runtime");
        Lanes::start(0).expect("no lane needs no thread")
    });
    let mut h2 = http2::Builder::new(lanes::MainExecutor(tokio::runtime::Handle::current()));
    h2.max_concurrent_streams(u32::MAX)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .keep_alive_interval(Some(services.hub.config.grpc_keepalive_interval))
        .keep_alive_timeout(services.hub.config.grpc_keepalive_timeout)
        .timer(TokioTimer::new());
    let h2 = Arc::new(h2);
    let (conn_shutdown_tx, _) = watch::channel(false);
    let conn_shutdown_tx = Arc::new(conn_shutdown_tx);
    let mut conns = tokio::task::JoinSet::new();
    let mut accept_errors = AcceptErrors::default();
    let timeouts = http1::Timeouts {
        header: services.hub.config.request_header_timeout,
        idle: services.hub.config.idle_timeout,
    };
    let max_age = age::MaxAge::from_config(&services.hub.config);
    let sockets = SocketLimits::from_config(&services.hub.config);
    let turns = match services.hub.config.unproven_write_turns {
        0 => None,
        n => Some(gate::Turns::new(n)),
    };
    loop {
        let (mut stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => {
                    accept_errors.succeeded();
                    s
                }
                Err(e) => {
                    let pause = accept_errors.failed(&e);
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
                    }
                    continue;
                }
            },
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
        };
        let accepted = tokio::time::Instant::now();
        let _ = stream.set_nodelay(true);
        sockets.apply(&stream);
        let conn = Connection {
            routes: routes.clone(),
            services: services.clone(),
            h2: h2.clone(),
            shutdown: conn_shutdown_tx.subscribe(),
            timeouts,
            max_age,
            turns: turns.clone(),
            mover: lanes.mover(),
        };
        let tls = tls.clone();
        conns.spawn(async move {
            match tls {
                None => {
                    // The first bytes are part of the first request's head: due within its
                    // deadline.
                    let sniffed =
                        tokio::time::timeout_at(accepted + timeouts.header, sniff(&mut stream));
                    let Ok(Some((protocol, read))) = sniffed.await else {
                        return;
                    };
                    // Boxed (here and below): the task's future then holds a pointer, not
                    // the largest state of every protocol and transport; each connection
                    // allocates only what its own kind needs.
                    Box::pin(conn.serve(stream, protocol, read, ConnInfo::default(), accepted))
                        .await;
                }
                Some(tls) => {
                    // Boxed: the handshake's state (rustls' connection inside the accept
                    // future) would otherwise size every connection's task, plaintext ones too.
                    let Some(tls_conn) = Box::pin(tls.accept(stream)).await else {
                        return;
                    };
                    // Taken apart whole: a partly moved `tls_conn` would keep the TLS
                    // stream's room in this task's future for the connection's life.
                    let crate::tls::server::Accepted { stream, h2, peer } = tls_conn;
                    let protocol = if h2 { Protocol::Http2 } else { Protocol::Http1 };
                    let info = ConnInfo {
                        peer: Arc::new(peer),
                        policy: tls.policy,
                    };
                    Box::pin(conn.serve(stream, protocol, BytesMut::new(), info, accepted)).await;
                }
            }
        });
        while conns.try_join_next().is_some() {}
    }
    // Refuse new connections at once (clients go to another replica) while the open ones
    // drain.
    drop(listener);
    let _ = conn_shutdown_tx.send(true);
    let _ = tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} }).await;
    // What is left is aborted; the lane's runtime goes once every connection's stint there has
    // ended.
    conns.shutdown().await;
    lanes.stop().await;
}

/// What serving one connection needs.
struct Connection {
    /// The gRPC routes.
    routes: Routes,
    /// The services.
    services: Services,
    /// hyper's HTTP/2 server settings.
    h2: Arc<http2::Builder<lanes::MainExecutor>>,
    /// Turns true when open connections must finish.
    shutdown: watch::Receiver<bool>,
    /// The HTTP/1.x deadlines.
    timeouts: http1::Timeouts,
    /// The connection's maximum age, if any.
    max_age: Option<age::MaxAge>,
    /// The process's write turns for connections not yet seen to read (`None`: no turns).
    turns: Option<gate::Turns>,
    /// Moves the connection between the new-connection lane and the main runtime (`None`:
    /// no lane).
    mover: Option<lanes::Mover>,
}

impl Connection {
    /// Serves `stream` (whose first bytes, already read, are `read`) as `protocol`.
    async fn serve<S: Transport + Sync + 'static>(
        self,
        stream: S,
        protocol: Protocol,
        read: BytesMut,
        info: ConnInfo,
        accepted: tokio::time::Instant,
    ) {
        let Connection {
            routes,
            services,
            h2,
            shutdown,
            timeouts,
            max_age,
            turns,
            mover,
        } = self;
        let place = mover.as_ref().map(|_| Arc::new(lanes::Place::default()));
        let stream = gate::Gated::new(stream, turns, place.clone());
        let label = match protocol {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
        };
        crate::metrics::CONNECTIONS_ACCEPTED
            .with_label_values(&[label])
            .inc();
        let open = crate::metrics::CONNECTIONS_OPEN.with_label_values(&[label]);
        open.inc();
        let _open = OpenGuard(open);
        // The connection's whole serving future, boxed so that it can move to the
        // new-connection lane and back in one piece (`lanes`).
        let work: lanes::Work = Box::pin(async move {
            let mut life = age::Life::new(shutdown, max_age, accepted, label);
            match protocol {
                Protocol::Http1 => {
                    let signal = life.ending.signal();
                    let handle = move |mut req| -> Answer {
                        if let Some(refusal) = info.admit_http(&mut req, &services) {
                            return Box::pin(async move { refusal });
                        }
                        req.extensions_mut().insert(signal.clone());
                        let services = services.clone();
                        Box::pin(async move { gateway::handle(req, &services).await })
                    };
                    // The connection's own flag: it stops taking requests (and closes after the
                    // current answer) when asked to end.
                    let flag = life.ending.flag();
                    let mut conn = std::pin::pin!(http1::serve(
                        stream, read, handle, flag, timeouts, accepted
                    ));
                    loop {
                        tokio::select! {
                            _ = conn.as_mut() => break,
                            // The flag makes the server stop; only a closing turn matters here.
                            turn = life.next() => if turn == age::Turn::Close { break },
                        }
                    }
                }
                Protocol::Http2 => {
                    let (io, drain) = coalesce::coalesce(Rewind {
                        prefix: read.freeze(),
                        inner: stream,
                    });
                    let signal = life.ending.signal();
                    let svc =
                        hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
                            req.extensions_mut().insert(signal.clone());
                            let answer = h2_request(req, routes.clone(), services.clone(), &info);
                            async move { Ok::<_, Infallible>(answer.await) }
                        });
                    // On the heap: hyper's HTTP/2 connection state would otherwise size the
                    // future of every connection, HTTP/1.x ones included.
                    let mut conn = Box::pin(h2.serve_connection(TokioIo::new(io), svc));
                    loop {
                        tokio::select! {
                            r = std::future::poll_fn(|cx| drive(conn.as_mut(), &drain, cx)) => {
                                if let Err(e) = r {
                                    tracing::debug!(error = %e, "connection ended");
                                }
                                break;
                            }
                            turn = life.next() => match turn {
                                // GOAWAY, so that the streams the sessions end now are reopened
                                // on a new connection.
                                age::Turn::AskToEnd => conn.as_mut().graceful_shutdown(),
                                age::Turn::Close => break,
                            },
                        }
                    }
                }
            }
        });
        match (mover, place) {
            (Some(mover), Some(place)) => mover.serve(work, place, label).await,
            _ => work.await,
        }
    }
}

/// Polls hyper's HTTP/2 connection once (h2 writes everything it can into the coalescing
/// buffer), then sends what it wrote in one write ([`coalesce`]). Ends with the connection, or
/// with the socket's write error.
fn drive<F, S>(
    conn: Pin<&mut F>,
    drain: &coalesce::Drain<S>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), Box<dyn std::error::Error + Send + Sync>>>
where
    F: Future<Output = Result<(), hyper::Error>>,
    S: AsyncWrite + Unpin,
{
    let served = conn.poll(cx);
    let sent = drain.poll_drain(cx);
    match (served, sent) {
        (Poll::Ready(r), _) => Poll::Ready(r.map_err(Into::into)),
        (Poll::Pending, Poll::Ready(Err(e))) => Poll::Ready(Err(e.into())),
        (Poll::Pending, _) => Poll::Pending,
    }
}

/// What an accepted socket may hold for its client in the kernel (see
/// `--socket-unsent-bytes`, `--socket-send-buffer`): a client that stops reading blocks the
/// connection's writer after this much, not after the kernel's autotuned buffers (megabytes
/// on a fast path), so thousands of non-readers cost little copying and memory.
#[derive(Debug, Clone, Copy)]
struct SocketLimits {
    /// `TCP_NOTSENT_LOWAT` (0: the kernel's default).
    unsent: u32,
    /// `SO_SNDBUF` (0: autotuned).
    send_buffer: usize,
}

impl SocketLimits {
    fn from_config(config: &crate::config::Config) -> SocketLimits {
        SocketLimits {
            unsent: config.socket_unsent_bytes,
            send_buffer: config.socket_send_buffer,
        }
    }

    /// Sets the limits on an accepted socket; a failure (an old kernel) only loses the bound.
    fn apply(&self, stream: &TcpStream) {
        let sock = socket2::SockRef::from(stream);
        if self.unsent > 0 {
            if let Err(e) = sock.set_tcp_notsent_lowat(self.unsent) {
                tracing::debug!(error = %e, "TCP_NOTSENT_LOWAT not set");
            }
        }
        if self.send_buffer > 0 {
            if let Err(e) = sock.set_send_buffer_size(self.send_buffer) {
                tracing::debug!(error = %e, "SO_SNDBUF not set");
            }
        }
    }
}

/// Failed accepts (at the file-descriptor limit, every accept fails at once): a pause that
/// doubles from 5 ms to 1 s, as Go's server backs off, and one log line per second with the
/// number of failures since the last one.
#[derive(Debug)]
struct AcceptErrors {
    /// Current pause after a failure (zero after a success).
    pause: Duration,
    /// The warning's rate limit (one per [`AcceptErrors::REPORT_EVERY`], with a count).
    report: Throttle,
}

impl Default for AcceptErrors {
    fn default() -> Self {
        AcceptErrors {
            pause: Duration::ZERO,
            report: Throttle::new(Self::REPORT_EVERY),
        }
    }
}

impl AcceptErrors {
    /// Smallest and largest pause after a failed accept.
    const MIN_PAUSE: Duration = Duration::from_millis(5);
    const MAX_PAUSE: Duration = Duration::from_secs(1);
    /// Shortest time between two reports.
    const REPORT_EVERY: Duration = Duration::from_secs(1);

    /// Records a failure; returns how long to pause before the next accept.
    fn failed(&mut self, e: &std::io::Error) -> Duration {
        crate::metrics::ACCEPT_ERRORS.inc();
        if let Some(not_logged) = self.report.allow() {
            tracing::warn!(error = %e, failures = not_logged + 1, "accept failed");
        }
        self.pause = (self.pause * 2).clamp(Self::MIN_PAUSE, Self::MAX_PAUSE);
        self.pause
    }

    /// Records a success: the next failure pauses briefly again.
    fn succeeded(&mut self) {
        self.pause = Duration::ZERO;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection storm larger than tokio's default backlog (1,024) is queued by the kernel
    /// before the proxy accepts any of it: no client waits for a SYN retransmission.
    #[tokio::test]
    async fn listen_queues_a_storm_larger_than_tokios_backlog() {
        let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(0);
        // The kernel's limit bounds any backlog; below 1,100 it cannot show a difference.
        let n = somaxconn.min(1_500);
        if n <= 1_100 {
            eprintln!("net.core.somaxconn is {somaxconn}: the kernel's queue is the bound here");
            return;
        }
        let listener = listen("127.0.0.1:0".parse().expect("address")).expect("listen");
        let addr = listener.local_addr().expect("address");
        let mut connects = tokio::task::JoinSet::new();
        for _ in 0..n {
            // A SYN dropped by a full queue is retransmitted after a second.
            connects.spawn(tokio::time::timeout(
                Duration::from_millis(800),
                TcpStream::connect(addr),
            ));
        }
        let mut open = Vec::with_capacity(n);
        while let Some(r) = connects.join_next().await {
            if let Ok(Ok(Ok(stream))) = r {
                open.push(stream);
            }
        }
        assert_eq!(open.len(), n, "connections completed without an accept");
    }
}
