//! The endpoints outside `/v3/`: etcd's own `/version` (cached) and `/health` (unhealthy while
//! the caches load), the relays to etcd's HTTP server (`/debug/vars`, `/config/local/log`,
//! lock and election routes), and the proxy's own `/readyz`, `/livez` and `/metrics`.

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};

use super::answer::{plain, MAX_BODY};
use super::stream::Body;
use super::upstream_http;
use crate::serve::Services;
use crate::wire::body::ReqBody;

fn text(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<tonic::body::Body> {
    let mut resp = Response::new(tonic::body::Body::new(Full::new(body.into())));
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

/// The proxy's own endpoints (`/readyz`, `/livez`, `/metrics`), or `None` for any other path.
pub(super) fn own(path: &str, services: &Services) -> Option<Response<tonic::body::Body>> {
    match path {
        "/readyz" => Some(readyz(services)),
        "/livez" => Some(text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n")),
        "/metrics" => {
            services.hub.observe_metrics();
            Some(text(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                crate::metrics::render(),
            ))
        }
        _ => None,
    }
}

/// `/readyz`: 200 once every prefix is loaded, 503 before that and from SIGTERM on. A stale
/// prefix (etcd lost) keeps the replica ready (see [`Hub::is_ready`]); the body names it.
///
/// [`Hub::is_ready`]: crate::source::hub::Hub::is_ready
fn readyz(services: &Services) -> Response<tonic::body::Body> {
    let hub = &services.hub;
    let ct = "text/plain; charset=utf-8";
    if hub.is_draining() {
        return text(StatusCode::SERVICE_UNAVAILABLE, ct, "shutting down\n");
    }
    if !hub.is_ready() {
        return text(StatusCode::SERVICE_UNAVAILABLE, ct, "loading\n");
    }
    let stale = hub.stale_prefixes();
    if stale.is_empty() {
        text(StatusCode::OK, ct, "ok\n")
    } else {
        text(
            StatusCode::OK,
            ct,
            format!("ok (stale: {})\n", stale.join(" ")),
        )
    }
}

/// `GET /version`: the upstream cluster's own answer.
pub(super) async fn version(method: &Method, services: &Services) -> Response<Body> {
    if method != Method::GET {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    match upstream_http::version(&services.hub.tasks, &services.hub.upstream).await {
        Ok(body) => {
            let mut resp = Response::new(Body::new(Full::new(body)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read etcd's /version");
            plain(StatusCode::SERVICE_UNAVAILABLE, "etcd unavailable")
        }
    }
}

/// `GET /health`: etcd's health as etcd answers it; `{"health":"false"}` (503, etcd's answer
/// of a member without a leader) while a prefix is not loaded or is stale.
pub(super) async fn health(req: Request<ReqBody>, services: &Services) -> Response<Body> {
    if req.method() != Method::GET {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    let unhealthy = || plain(StatusCode::SERVICE_UNAVAILABLE, r#"{"health":"false"}"#);
    if !services.hub.is_loaded() || !services.hub.stale_prefixes().is_empty() {
        return unhealthy();
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/health".into());
    match upstream_http::fetch(&services.hub.tasks, &services.hub.upstream, &path).await {
        Ok((status, ct, body)) => {
            let mut resp = Response::new(Body::new(Full::new(body)));
            *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            if let Some(v) = ct.and_then(|c| HeaderValue::from_str(&c).ok()) {
                resp.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            if status != 200 {
                resp.headers_mut().insert(
                    "x-content-type-options",
                    HeaderValue::from_static("nosniff"),
                );
            }
            resp
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read etcd's /health");
            unhealthy()
        }
    }
}

/// Relays a request to etcd's own HTTP server and its answer back.
pub(super) async fn relay(req: Request<ReqBody>, services: &Services) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
    };
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    match upstream_http::send(
        &services.hub.tasks,
        &services.hub.upstream,
        parts.method,
        &pq,
        &parts.headers,
        body,
    )
    .await
    {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            parts.headers.remove(header::CONNECTION);
            parts.headers.remove(header::TRANSFER_ENCODING);
            parts.headers.remove("keep-alive");
            Response::from_parts(parts, Body::new(body))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot relay to etcd's HTTP server");
            plain(StatusCode::BAD_GATEWAY, "etcd unavailable")
        }
    }
}
