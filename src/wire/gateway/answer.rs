//! Answers as etcd's HTTP server frames them: Go's `http.Error` text answers, bodies with
//! `Content-Length` up to 2 KiB and chunked above, JSON answers and etcd's JSON error answers.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use tonic::{Code, Status};

use super::errors;
use super::stream::{self, Body};
use crate::error::Error;
use crate::serve::Services;
use crate::wire::body::BodyError;
use crate::wire::grpc::MAX_DECODING_MESSAGE;

/// Largest request body read. etcd has no limit, but nothing above this can be a valid etcd
/// request (2 MiB of protobuf is under 3 MiB of base64 JSON); larger bodies get the answer
/// etcd's gRPC server gives an oversized message.
pub(super) const MAX_BODY: usize = crate::wire::body::MAX_BODY;

/// Go's `http.Error`: text/plain, `nosniff`, the message and a newline.
pub(super) fn plain(status: StatusCode, msg: &str) -> Response<Body> {
    let mut resp = Response::new(Body::new(Full::new(Bytes::from(format!("{msg}\n")))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

pub(super) fn empty(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(Body::new(Full::new(Bytes::new())));
    *resp.status_mut() = status;
    resp
}

/// Why a unary call produced no answer.
pub(super) enum Failure {
    /// The body could not be decoded (etcd answers 400 before calling anything).
    Decode(String),
    /// The call failed.
    Call(Status),
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Failure::Call(s)
    }
}

impl From<crate::error::Error> for Failure {
    fn from(e: crate::error::Error) -> Self {
        Failure::Call(e.into())
    }
}

/// Go's `net/http` sends a body of at most this many bytes (written by a handler that then
/// returns) with `Content-Length`, and anything larger chunked.
pub(super) const GO_CHUNKING_THRESHOLD: usize = 2048;

/// A whole body framed as Go's server frames it: `Content-Length` up to 2 KiB, else chunked.
pub(super) fn go_body(body: Vec<u8>) -> Body {
    go_body_of(vec![Bytes::from(body)])
}

/// [`go_body`] of a body made of consecutive pieces (shared ones are not copied when the body
/// is large).
pub(super) fn go_body_of(mut pieces: Vec<Bytes>) -> Body {
    let len: usize = pieces.iter().map(Bytes::len).sum();
    if len > GO_CHUNKING_THRESHOLD {
        stream::frames(pieces.into_iter().map(http_body::Frame::data).collect())
    } else if pieces.len() == 1 {
        Body::new(Full::new(pieces.pop().unwrap_or_default()))
    } else {
        Body::new(Full::new(Bytes::from(pieces.concat())))
    }
}

/// The JSON answer of a successful unary call, in pieces.
pub(super) fn json_response(body: Vec<Bytes>) -> Response<Body> {
    let mut resp = Response::new(go_body_of(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        "grpc-metadata-content-type",
        HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// An error answer in etcd's JSON shape; `trailer` for errors returned by the call itself.
pub(super) fn error_response(code: Code, msg: &str, trailer: bool) -> Response<Body> {
    let body = errors::unary_body(code, msg);
    let status = StatusCode::from_u16(errors::http_status(code))
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = if trailer {
        let mut r = Response::new(stream::error_with_trailer(body));
        r.headers_mut().insert(
            header::TRAILER,
            HeaderValue::from_static("Grpc-Trailer-Content-Type"),
        );
        r
    } else {
        Response::new(go_body(body))
    };
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// An error returned by the gRPC call itself. etcd's gateway reaches etcd's gRPC server
/// natively on a plaintext port (the error's content type arrives as a trailer) and through
/// Go's HTTP/2 server on a TLS port (it arrives with the headers, as
/// `Grpc-Metadata-Content-Type`); the proxy answers as etcd on the same kind of port.
pub(super) fn call_error(code: Code, msg: &str, services: &Services) -> Response<Body> {
    if services.hub.config.tls.cert_file.is_none() {
        return error_response(code, msg, true);
    }
    let mut resp = error_response(code, msg, false);
    resp.headers_mut().insert(
        "grpc-metadata-content-type",
        HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// The answer to a request body that could not be read: etcd reads bodies whole, refuses an
/// oversized one with its gRPC size error, and answers a body it could not read (a malformed
/// chunked one) as an invalid argument with the reader's words.
pub(super) fn body_error(e: &(dyn std::error::Error + 'static)) -> Response<Body> {
    match e.downcast_ref::<BodyError>() {
        Some(BodyError::Malformed(why)) => error_response(Code::InvalidArgument, why, false),
        Some(BodyError::Transport(why)) => error_response(Code::InvalidArgument, why, false),
        Some(BodyError::TooLarge) | None => {
            let s = Status::from(Error::MessageTooLarge {
                len: MAX_BODY,
                max: MAX_DECODING_MESSAGE,
            });
            error_response(s.code(), s.message(), true)
        }
    }
}
