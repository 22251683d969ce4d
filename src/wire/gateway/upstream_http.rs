//! HTTP/1.1 (over TLS for `https://` endpoints) to etcd's own client port, for what only
//! etcd's HTTP server can answer:
//! `/version` (fetched once and cached), `/health`, `/debug/vars`, `/config/local/log`, and the
//! lock / election gateway routes (`/v3/lock/*`, `/v3/election/*`, services the proxy does not
//! implement over gRPC). Endpoints are tried in configured order; each try is bounded in time.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::source::upstream::Upstream;
use crate::tasks::Tasks;
use crate::tls::client::Alpn;

/// Longest wait for a connection plus the response head, per endpoint.
const TRY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a fetched `/version` answer is reused.
const VERSION_TTL: Duration = Duration::from_secs(60);

/// `host:port` of an endpoint URL (`http://`, `https://` or none), or `None` for other
/// schemes.
fn authority(endpoint: &str) -> Option<&str> {
    let rest = match endpoint.split_once("://") {
        Some(("http" | "https", rest)) => rest,
        Some(_) => return None,
        None => endpoint,
    };
    let host = rest.split('/').next().unwrap_or(rest);
    (!host.is_empty()).then_some(host)
}

/// Sends `req` (path and query only in its URI) to the first endpoint that answers; the
/// connection is driven by a task of `tasks` until the answer is read.
pub async fn send(
    tasks: &Tasks,
    upstream: &Upstream,
    method: http::Method,
    path_and_query: &str,
    headers: &http::HeaderMap,
    body: Bytes,
) -> Result<Response<Incoming>, String> {
    let mut last = String::from("no usable etcd endpoint");
    for ep in upstream.endpoints() {
        let Some(host) = authority(ep) else { continue };
        crate::metrics::Upstream::Http.inc();
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(path_and_query)
            .header(http::header::HOST, host);
        for (k, v) in headers {
            if k != http::header::HOST
                && k != http::header::CONNECTION
                && k != http::header::TRANSFER_ENCODING
                && k != http::header::CONTENT_LENGTH
            {
                builder = builder.header(k, v);
            }
        }
        let req = match builder.body(Full::new(body.clone())) {
            Ok(r) => r,
            Err(e) => return Err(e.to_string()),
        };
        let attempt = async {
            let mut sender = match upstream.tls() {
                Some(tls) => {
                    let stream = tls
                        .connect(host, Alpn::Http1)
                        .await
                        .map_err(|e| e.to_string())?;
                    handshake(tasks, stream).await?
                }
                None => {
                    let stream = TcpStream::connect(host).await.map_err(|e| e.to_string())?;
                    let _ = stream.set_nodelay(true);
                    handshake(tasks, stream).await?
                }
            };
            sender.send_request(req).await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(TRY_TIMEOUT, attempt).await {
            Ok(Ok(resp)) => return Ok(resp),
            Ok(Err(e)) => last = format!("etcd at {ep} unreachable: {e}"),
            Err(_) => last = format!("etcd at {ep} did not answer in time"),
        }
    }
    Err(last)
}

/// An HTTP/1.1 client connection over `io`, driven by a task of `tasks` until the answer is
/// read and the sender dropped.
async fn handshake<T>(tasks: &Tasks, io: T) -> Result<SendRequest<Full<Bytes>>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tasks.spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Fetches a small answer whole: (status, content type, body).
pub async fn fetch(
    tasks: &Tasks,
    upstream: &Upstream,
    path: &str,
) -> Result<(u16, Option<String>, Bytes), String> {
    let resp = send(
        tasks,
        upstream,
        http::Method::GET,
        path,
        &http::HeaderMap::new(),
        Bytes::new(),
    )
    .await?;
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = tokio::time::timeout(TRY_TIMEOUT, resp.into_body().collect())
        .await
        .map_err(|_| "reading the answer timed out".to_string())?
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, ct, body))
}

/// The upstream cluster's `/version` answer body, cached.
static VERSION: Mutex<Option<(Bytes, Instant)>> = Mutex::new(None);

/// etcd's `/version` body (`{"etcdserver":"3.4.23","etcdcluster":"3.4.0"}`), from the cache
/// when fresh, else from etcd; a stale answer is used when etcd cannot be reached.
pub async fn version(tasks: &Tasks, upstream: &Upstream) -> Result<Bytes, String> {
    let cached = VERSION.lock().ok().and_then(|v| v.clone());
    if let Some((body, at)) = &cached {
        if at.elapsed() < VERSION_TTL {
            return Ok(body.clone());
        }
    }
    match fetch(tasks, upstream, "/version").await {
        Ok((200, _, body)) => {
            if let Ok(mut v) = VERSION.lock() {
                *v = Some((body.clone(), Instant::now()));
            }
            Ok(body)
        }
        Ok((status, _, _)) => cached
            .map(|(b, _)| b)
            .ok_or_else(|| format!("etcd answered /version with {status}")),
        Err(e) => cached.map(|(b, _)| b).ok_or(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        assert_eq!(authority("http://127.0.0.1:2379"), Some("127.0.0.1:2379"));
        assert_eq!(authority("127.0.0.1:2379"), Some("127.0.0.1:2379"));
        assert_eq!(authority("http://h:1/"), Some("h:1"));
        assert_eq!(authority("https://h:1"), Some("h:1"));
        assert_eq!(authority("unix://h:1"), None);
    }
}
