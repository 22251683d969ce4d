//! The proxy's own HTTP endpoints, `/readyz` and `/metrics`, served on the shared port by the
//! gateway's mux (next to etcd's own `/version`, `/health` and `/v3/...`).

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::serve::Services;

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
pub fn local(path: &str, services: &Services) -> Option<Response<tonic::body::Body>> {
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
