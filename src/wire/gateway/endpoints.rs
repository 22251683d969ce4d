//! The endpoints outside `/v3/`: etcd's own `/version` (cached) and `/health` (unhealthy while
//! the caches load), the relays to etcd's HTTP server (`/debug/vars`, `/config/local/log`,
//! lock and election routes), and the proxy's own `/readyz` and `/metrics`.

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

/// The proxy's own endpoints (`/readyz`, `/metrics`), or `None` for any other path.
pub(super) fn own(path: &str, services: &Services) -> Option<Response<tonic::body::Body>> {
    match path {
        "/readyz" => Some(if services.hub.is_ready() {
            text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n")
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                "loading\n",
            )
        }),
        "/metrics" => Some(text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            crate::metrics::render(),
        )),
        _ => None,
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

/// `GET /health`: etcd's health as etcd answers it, and unhealthy while the proxy's caches
/// are not loaded.
pub(super) async fn health(req: Request<ReqBody>, services: &Services) -> Response<Body> {
    if req.method() != Method::GET {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    let unhealthy = || plain(StatusCode::SERVICE_UNAVAILABLE, r#"{"health":"false"}"#);
    if !services.hub.is_ready() {
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
