//! The three streaming routes: `/v3/watch` (a watch session over the request body's
//! messages, answered from the cache), `/v3/lease/keepalive` and `/v3/maintenance/snapshot`
//! (piped to etcd). Each answer is a chunked stream of `{"result":...}` messages.

use bytes::Bytes;
use futures::StreamExt;
use http::{header, HeaderValue, Response, StatusCode};
use tonic::metadata::MetadataMap;
use tonic::Code;

use super::answer::error_response;
use super::json::{Decoder, Next, Value};
use super::stream::{self, Body};
use super::{errors, jsonpb};
use crate::proto::etcdserverpb::{
    LeaseKeepAliveRequest, LeaseKeepAliveResponse, SnapshotRequest, SnapshotResponse, WatchRequest,
};
use crate::serve::passthrough::BoxStream;
use crate::serve::watch::ConnectionEnding;
use crate::serve::Services;

/// Decodes every request message of a streaming call's body. `Err` when the first one is
/// malformed (etcd then answers 500, code Unknown); a later malformed one ends the list.
pub(super) fn stream_requests<T: prost::Message + Default>(
    name: &str,
    body: &[u8],
) -> Result<Vec<T>, String> {
    let mut dec = Decoder::new(body);
    let mut out = Vec::new();
    loop {
        let item = match dec.next_value() {
            Ok(Next::End) => break,
            Ok(Next::Value(v)) => jsonpb::decode::<T>(name, &v).map_err(|e| e.0),
            Err(e) => Err(e.0),
        };
        match item {
            Ok(m) => out.push(m),
            Err(e) if out.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    Ok(out)
}

/// A streaming answer: waits for the first message (as Go writes the status with it), then
/// streams every message as its own chunk; a failure ends the stream with an error chunk.
pub(super) async fn streaming<T, F>(
    mut responses: BoxStream<T>,
    encode: F,
    with_metadata: bool,
) -> Response<Body>
where
    T: Send + 'static,
    F: Fn(&T) -> Vec<Bytes> + Send + Sync + 'static,
{
    let first = responses.next().await;
    let (status, first_chunks, done) = match first {
        None => (StatusCode::OK, Vec::new(), true),
        Some(Ok(m)) => (StatusCode::OK, encode(&m), false),
        Some(Err(s)) => (
            StatusCode::from_u16(errors::http_status(s.code()))
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            vec![stream::error_chunk(&s)],
            true,
        ),
    };
    let rest = if done {
        futures::stream::empty().boxed()
    } else {
        responses
            .map(move |item| match item {
                Ok(m) => (encode(&m), false),
                Err(s) => (vec![stream::error_chunk(&s)], true),
            })
            // Nothing follows an error chunk.
            .scan(false, |ended, (chunks, is_error)| {
                if *ended {
                    return futures::future::ready(None);
                }
                *ended = is_error;
                futures::future::ready(Some(chunks))
            })
            .flat_map(futures::stream::iter)
            .boxed()
    };
    let body = futures::stream::iter(first_chunks).chain(rest);
    let mut resp = Response::new(stream::chunked(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if with_metadata {
        h.insert(
            "grpc-metadata-content-type",
            HeaderValue::from_static("application/grpc"),
        );
    }
    resp
}

/// `POST /v3/watch`: a watch session fed with the body's requests, answered from the cache.
/// The session lives as long as the response body (the client's connection).
pub(super) async fn watch(
    services: &Services,
    md: MetadataMap,
    ending: Option<ConnectionEnding>,
    body: Bytes,
) -> Response<Body> {
    let reqs: Vec<WatchRequest> = match stream_requests("etcdserverpb.WatchRequest", &body) {
        Ok(r) => r,
        Err(e) => return error_response(Code::Unknown, &e, false),
    };
    if reqs.is_empty() {
        // etcd opens the stream, sends nothing and never answers.
        return futures::future::pending::<Response<Body>>().await;
    }
    let session =
        services
            .watch
            .session(md, ending, futures::stream::iter(reqs.into_iter().map(Ok)));
    // A proxy shutdown, or the connection's max age, ends the stream cleanly after the last
    // whole response (a revision boundary), so an HTTP client resumes elsewhere from the next
    // revision without an error.
    let ends = [
        crate::error::Error::Stopped.to_string(),
        crate::error::Error::Draining.to_string(),
    ];
    let session = session
        .take_while(move |item| {
            futures::future::ready(!matches!(item, Err(s)
                if s.code() == Code::Unavailable && ends.iter().any(|m| m == s.message())))
        })
        .boxed();
    streaming(session, stream::reply_chunks, true).await
}

/// `POST /v3/lease/keepalive`: the body's keepalives piped to etcd, etcd's answers back.
pub(super) async fn keep_alive(
    services: &Services,
    md: MetadataMap,
    body: Bytes,
) -> Response<Body> {
    let reqs: Vec<LeaseKeepAliveRequest> =
        match stream_requests("etcdserverpb.LeaseKeepAliveRequest", &body) {
            Ok(r) => r,
            Err(e) => return error_response(Code::Unknown, &e, false),
        };
    let with_metadata = !reqs.is_empty();
    let upstream = services
        .passthrough
        .keep_alive_stream(&md, futures::stream::iter(reqs.into_iter().map(Ok)))
        .await;
    match upstream {
        Ok(s) => {
            streaming(
                s,
                |m: &LeaseKeepAliveResponse| {
                    vec![stream::result_chunk(&jsonpb::encode(
                        "etcdserverpb.LeaseKeepAliveResponse",
                        m,
                    ))]
                },
                with_metadata,
            )
            .await
        }
        Err(s) => error_response(s.code(), s.message(), false),
    }
}

/// `POST /v3/maintenance/snapshot`: etcd's snapshot stream relayed.
pub(super) async fn snapshot(services: &Services, md: MetadataMap, body: Bytes) -> Response<Body> {
    use crate::proto::etcdserverpb::maintenance_server::Maintenance;
    let mut dec = Decoder::new(&body);
    let value = match dec.next_value() {
        Ok(Next::Value(v)) => v,
        Ok(Next::End) => Value::Null,
        Err(e) => return error_response(Code::InvalidArgument, &e.0, false),
    };
    let msg: SnapshotRequest = match jsonpb::decode("etcdserverpb.SnapshotRequest", &value) {
        Ok(m) => m,
        Err(e) => return error_response(Code::InvalidArgument, &e.0, false),
    };
    let req = tonic::Request::from_parts(md, Default::default(), msg);
    match Maintenance::snapshot(&services.passthrough, req).await {
        Ok(resp) => {
            streaming(
                resp.into_inner(),
                |m: &SnapshotResponse| {
                    vec![stream::result_chunk(&jsonpb::encode(
                        "etcdserverpb.SnapshotResponse",
                        m,
                    ))]
                },
                true,
            )
            .await
        }
        Err(s) => error_response(s.code(), s.message(), false),
    }
}
