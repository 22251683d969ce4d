//! Request metrics of the gRPC routes: every call counted by method and status code when it
//! ends, unary calls timed (`etcd_fanout_grpc_requests_total`,
//! `etcd_fanout_grpc_request_duration_seconds`).
//!
//! A call's code is in its head (trailers-only answers) or its trailers; the answer's body is
//! wrapped to read them as they pass. A body dropped before its trailers (the client left)
//! counts as `Canceled`, as grpc-go's interceptors count it. Each method's handles are made
//! once ([`handles`]), so a call costs a map lookup, two atomic adds and one boxed body.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::body::Body;

use super::GRPC_METHODS;
use crate::metrics::{RequestHandles, GRPC};

/// grpc-go's names of the status codes (`codes.Code.String()`), by number.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// Code of a call whose answer ended without a status.
const UNKNOWN: usize = 2;
/// Code of a call whose client left before the end.
const CANCELED: usize = 1;

/// Streaming methods: counted, not timed (their duration is the stream's life).
const STREAMING: [&str; 3] = ["Watch", "LeaseKeepAlive", "Snapshot"];

/// The handles of every method etcd serves, by path, and of `unknown`.
static METHODS: LazyLock<(HashMap<String, RequestHandles>, RequestHandles)> = LazyLock::new(|| {
    let mut m = HashMap::new();
    for (service, methods) in GRPC_METHODS {
        for method in methods {
            let path = format!("/{service}/{method}");
            let timed = !STREAMING.contains(method);
            let h = RequestHandles::new(&GRPC, &path, CODE_NAMES.len(), timed);
            m.insert(path, h);
        }
    }
    let unknown = RequestHandles::new(&GRPC, "unknown", CODE_NAMES.len(), true);
    (m, unknown)
});

/// The handles of the method at `path` (`unknown` for paths etcd does not serve).
pub fn handles(path: &str) -> &'static RequestHandles {
    METHODS.0.get(path).unwrap_or(&METHODS.1)
}

/// The code number in a `grpc-status` header, if there is one.
fn status_of(headers: &http::HeaderMap) -> Option<usize> {
    let v = headers.get("grpc-status")?;
    std::str::from_utf8(v.as_bytes())
        .ok()?
        .parse::<usize>()
        .ok()
        .filter(|c| *c < CODE_NAMES.len())
        .or(Some(UNKNOWN))
}

/// `resp`, the answer to a call of `rpc` that arrived at `start`, counted when it ends.
pub fn observe(
    resp: http::Response<Body>,
    rpc: &'static RequestHandles,
    start: Instant,
) -> http::Response<Body> {
    if let Some(code) = status_of(resp.headers()) {
        rpc.done(Some(code), CODE_NAMES[code], start.elapsed());
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let body = Observed {
        inner: body,
        rpc,
        start,
        done: false,
    };
    http::Response::from_parts(parts, Body::new(body))
}

/// An answer's body, counting its call when the trailers pass (or when it is dropped).
struct Observed {
    /// The answer.
    inner: Body,
    /// The method's handles.
    rpc: &'static RequestHandles,
    /// When the request arrived.
    start: Instant,
    /// Counted already.
    done: bool,
}

impl Observed {
    fn finish(&mut self, code: usize) {
        if !self.done {
            self.done = true;
            self.rpc
                .done(Some(code), CODE_NAMES[code], self.start.elapsed());
        }
    }
}

impl http_body::Body for Observed {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    this.finish(status_of(t).unwrap_or(UNKNOWN));
                }
            }
            Poll::Ready(Some(Err(s))) => this.finish((s.code() as usize).min(CODE_NAMES.len() - 1)),
            Poll::Ready(None) => this.finish(UNKNOWN),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.finish(CANCELED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_has_handles_and_codes_have_go_names() {
        assert!(!std::ptr::eq(
            handles("/etcdserverpb.KV/Range"),
            handles("/x/y")
        ));
        assert!(std::ptr::eq(handles("/a/b"), handles("/x/y")));
        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", http::HeaderValue::from_static("14"));
        assert_eq!(status_of(&h).map(|c| CODE_NAMES[c]), Some("Unavailable"));
        h.insert("grpc-status", http::HeaderValue::from_static("99"));
        assert_eq!(status_of(&h), Some(UNKNOWN));
        assert_eq!(tonic::Code::Unauthenticated as usize, 16);
    }
}
