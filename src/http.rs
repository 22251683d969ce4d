//! Plain HTTP requests on the shared port: `/readyz`, `/health`, `/metrics`; everything else
//! answers like etcd's HTTP server for an unknown path (404, `404 page not found`).

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::server::Services;

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

/// Answers one non-gRPC request.
pub async fn handle(req: Request<Incoming>, services: &Services) -> Response<tonic::body::Body> {
    match req.uri().path() {
        "/readyz" => {
            if services.hub.is_ready() {
                text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    "loading\n",
                )
            }
        }
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            crate::metrics::render(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "404 page not found\n",
        ),
    }
}
