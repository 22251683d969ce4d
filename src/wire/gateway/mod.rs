//! etcd's grpc-gateway HTTP/JSON API (what Apache APISIX and other HTTP clients speak), served
//! on the proxy's one port next to gRPC, answering exactly as etcd 3.4's client port does:
//!
//! - the access controller: `/v3beta/` -> `/v3/`, CORS headers on every answer, `OPTIONS`
//!   answered 200 with no body;
//! - Go's `http.ServeMux`: unclean paths and `/v3` redirected (301), `/version`, `/health`,
//!   `/metrics`, unknown paths `404 page not found`;
//! - the gateway mux under `/v3/`: every etcd route (`POST` only: other methods get
//!   `405 Method Not Allowed`, unknown routes `404 Not Found`), request JSON decoded as
//!   `jsonpb` does ([`codec`]), the call made on the same services gRPC clients use (ranges and
//!   watches from the cache, the rest forwarded), the answer or error written as etcd writes it
//!   ([`errors`], [`stream`]).
//!
//! `Authorization` becomes the gRPC `token` (and `authorization`) metadata, and
//! `Grpc-Metadata-*` headers become metadata, as in grpc-gateway. Lock and election routes,
//! `/debug/vars` and `/config/local/log` are relayed to etcd's own HTTP server
//! ([`upstream_http`]); `/metrics` and `/readyz` are the proxy's own.
//!
//! Compared with etcd 3.4.23 by `tests/gateway_*.rs` (same requests to both, answers diffed:
//! status, headers, exact JSON text). Known differences, all deliberate or harmless:
//! - headers come in another order and chunk sizes are upper-case hex (HTTP says the latter is
//!   case-insensitive); the HTTP/1.x wire itself (keep-alive, pipelining, chunked bodies,
//!   `Expect`, HTTP/1.0, malformed requests) is [`crate::wire::http1`]'s, diffed against etcd by
//!   `tests/gateway_wire.rs`; a chunked body whose framing breaks after a complete JSON value
//!   is refused with the framing error (etcd decodes the value it read before the break);
//! - a stream message is always exactly one chunk: etcd splits a message over 2 KiB into
//!   two chunks (the JSON, then its newline), which old lua-resty-etcd cannot parse;
//! - JSON over h2c is served (etcd sends every HTTP/2 request to gRPC), WebSocket upgrades and
//!   `X-HTTP-Method-Override` are not; JSON nested deeper than 512 levels is refused (Go
//!   allows 10,000), and a body over 32 MiB is refused unread with etcd's oversized-message
//!   error (etcd reads it whole, then refuses it);
//! - `/health` is etcd's answer, but `{"health":"false"}` (503) while the proxy's caches are
//!   loading or etcd cannot be reached; `/version` is etcd's answer cached for a minute.

pub mod codec;
pub mod errors;
pub mod gobase64;
pub mod json;
pub mod stream;
pub mod upstream_http;

use crate::wire::http1::{BodyError, ReqBody};
use bytes::Bytes;
use futures::StreamExt;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use prost::Message as _;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use tonic::{Code, Status};

use self::json::{Decoder, Next, Value};
use self::stream::Body;
use crate::proto::etcdserverpb::*;
use crate::serve::kv::RangeAnswer;
use crate::serve::passthrough::BoxStream;
use crate::serve::Services;
use crate::wire::grpc::MAX_DECODING_MESSAGE;

/// Largest request body read. etcd has no limit, but nothing above this can be a valid etcd
/// request (2 MiB of protobuf is under 3 MiB of base64 JSON); larger bodies get the answer
/// etcd's gRPC server gives an oversized message.
const MAX_BODY: usize = crate::wire::http1::MAX_BODY;

/// Every `POST` route of etcd 3.4's gateway (`google.api.http` options of `rpc.proto`, plus
/// the lock and election services).
const ROUTES: &[&str] = &[
    "/v3/kv/range",
    "/v3/kv/put",
    "/v3/kv/deleterange",
    "/v3/kv/txn",
    "/v3/kv/compaction",
    "/v3/watch",
    "/v3/lease/grant",
    "/v3/lease/revoke",
    "/v3/kv/lease/revoke",
    "/v3/lease/keepalive",
    "/v3/lease/timetolive",
    "/v3/kv/lease/timetolive",
    "/v3/lease/leases",
    "/v3/kv/lease/leases",
    "/v3/cluster/member/add",
    "/v3/cluster/member/remove",
    "/v3/cluster/member/update",
    "/v3/cluster/member/list",
    "/v3/cluster/member/promote",
    "/v3/maintenance/alarm",
    "/v3/maintenance/status",
    "/v3/maintenance/defragment",
    "/v3/maintenance/hash",
    "/v3/maintenance/snapshot",
    "/v3/maintenance/transfer-leadership",
    "/v3/auth/enable",
    "/v3/auth/disable",
    "/v3/auth/authenticate",
    "/v3/auth/user/add",
    "/v3/auth/user/get",
    "/v3/auth/user/list",
    "/v3/auth/user/delete",
    "/v3/auth/user/changepw",
    "/v3/auth/user/grant",
    "/v3/auth/user/revoke",
    "/v3/auth/role/add",
    "/v3/auth/role/get",
    "/v3/auth/role/list",
    "/v3/auth/role/delete",
    "/v3/auth/role/grant",
    "/v3/auth/role/revoke",
];

/// Gateway routes etcd serves from services the proxy has no gRPC implementation of: relayed
/// to etcd's own gateway over HTTP.
const RELAYED_PREFIXES: &[&str] = &["/v3/lock/", "/v3/election/"];

/// Answers one non-gRPC HTTP request.
pub async fn handle(req: Request<ReqBody>, services: &Services) -> Response<Body> {
    let mut resp = route(req, services).await;
    let h = resp.headers_mut();
    // Upstream answers relayed as is already carry them: keep one copy.
    h.remove("access-control-allow-methods");
    h.remove("access-control-allow-origin");
    h.remove("access-control-allow-headers");
    h.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("POST, GET, OPTIONS, PUT, DELETE"),
    );
    h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    h.insert(
        "access-control-allow-headers",
        HeaderValue::from_static("accept, content-type, authorization"),
    );
    resp
}

async fn route(req: Request<ReqBody>, services: &Services) -> Response<Body> {
    let method = req.method().clone();
    let mut path = percent_decode(req.uri().path());
    if let Some(rest) = path.strip_prefix("/v3beta/") {
        path = format!("/v3/{rest}");
    }
    if method == Method::OPTIONS {
        return empty(StatusCode::OK);
    }
    if method != Method::CONNECT {
        let clean = clean_path(&path);
        if clean != path {
            return redirect(&method, &clean, req.uri().query());
        }
    }
    if path == "/v3" {
        return redirect(&method, "/v3/", req.uri().query());
    }
    if path.starts_with("/v3/") {
        return gateway(req, &path, services).await;
    }
    match path.as_str() {
        "/version" => version(&method, services).await,
        "/health" => health(req, services).await,
        "/debug/vars" | "/config/local/log" => relay(req, services).await,
        p => match crate::wire::http::local(p, services) {
            Some(resp) => resp,
            None => plain(StatusCode::NOT_FOUND, "404 page not found"),
        },
    }
}

/// Go's `http.Error`: text/plain, `nosniff`, the message and a newline.
fn plain(status: StatusCode, msg: &str) -> Response<Body> {
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

fn empty(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(Body::new(Full::new(Bytes::new())));
    *resp.status_mut() = status;
    resp
}

/// Go's `http.Redirect` with 301, as `ServeMux` sends it.
fn redirect(method: &Method, to: &str, query: Option<&str>) -> Response<Body> {
    let location = match query {
        Some(q) => format!("{to}?{q}"),
        None => to.to_string(),
    };
    let get = method == Method::GET;
    let body = if get {
        format!(
            "<a href=\"{}\">Moved Permanently</a>.\n\n",
            location.replace('&', "&amp;").replace('"', "&#34;")
        )
    } else {
        String::new()
    };
    let mut resp = Response::new(Body::new(Full::new(Bytes::from(body))));
    *resp.status_mut() = StatusCode::MOVED_PERMANENTLY;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    if get || method == Method::HEAD {
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
    }
    resp
}

/// Decodes `%XX` escapes like Go's `url.URL.Path`.
fn percent_decode(p: &str) -> String {
    if !p.contains('%') {
        return p.to_string();
    }
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(c) = hex {
                out.push(c);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Go's `ServeMux` `cleanPath`: `path.Clean`, keeping a trailing slash.
fn clean_path(p: &str) -> String {
    if p.is_empty() {
        return "/".into();
    }
    let rooted = if p.starts_with('/') {
        p.to_string()
    } else {
        format!("/{p}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for seg in rooted.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    let mut np = format!("/{}", parts.join("/"));
    if rooted.ends_with('/') && np != "/" {
        np.push('/');
    }
    np
}

/// `GET /version`: the upstream cluster's own answer.
async fn version(method: &Method, services: &Services) -> Response<Body> {
    if method != Method::GET {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    match upstream_http::version(&services.hub.upstream).await {
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
async fn health(req: Request<ReqBody>, services: &Services) -> Response<Body> {
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
    match upstream_http::fetch(&services.hub.upstream, &path).await {
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
async fn relay(req: Request<ReqBody>, services: &Services) -> Response<Body> {
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

/// gRPC metadata of a gateway call, from its HTTP headers.
fn metadata(headers: &http::HeaderMap) -> MetadataMap {
    let mut md = MetadataMap::new();
    for (k, v) in headers {
        let name = k.as_str();
        let key = if name == "authorization" {
            if let Ok(v) = AsciiMetadataValue::try_from(v.as_bytes()) {
                md.insert("token", v.clone());
                md.insert("authorization", v);
            }
            continue;
        } else if let Some(rest) = name.strip_prefix("grpc-metadata-") {
            rest
        } else {
            continue;
        };
        if key.ends_with("-bin") {
            continue;
        }
        if let (Ok(k), Ok(v)) = (
            AsciiMetadataKey::from_bytes(key.as_bytes()),
            AsciiMetadataValue::try_from(v.as_bytes()),
        ) {
            md.append(k, v);
        }
    }
    md
}

/// Why a unary call produced no answer.
enum Failure {
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
const GO_CHUNKING_THRESHOLD: usize = 2048;

/// A whole body framed as Go's server frames it: `Content-Length` up to 2 KiB, else chunked.
fn go_body(body: Vec<u8>) -> Body {
    go_body_of(vec![Bytes::from(body)])
}

/// [`go_body`] of a body made of consecutive pieces (shared ones are not copied when the body
/// is large).
fn go_body_of(mut pieces: Vec<Bytes>) -> Body {
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
fn json_response(body: Vec<Bytes>) -> Response<Body> {
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
fn error_response(code: Code, msg: &str, trailer: bool) -> Response<Body> {
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

/// The answer to a request body that could not be read: etcd reads bodies whole, refuses an
/// oversized one with its gRPC size error, and answers a body it could not read (a malformed
/// chunked one) as an invalid argument with the reader's words.
fn body_error(e: &(dyn std::error::Error + 'static)) -> Response<Body> {
    match e.downcast_ref::<BodyError>() {
        Some(BodyError::Malformed(why)) => error_response(Code::InvalidArgument, why, false),
        Some(BodyError::Transport(why)) => error_response(Code::InvalidArgument, why, false),
        Some(BodyError::TooLarge) | None => error_response(
            Code::ResourceExhausted,
            &format!(
                "grpc: received message larger than max ({MAX_BODY} vs. {MAX_DECODING_MESSAGE})"
            ),
            true,
        ),
    }
}

/// Routes under `/v3/`.
async fn gateway(req: Request<ReqBody>, path: &str, services: &Services) -> Response<Body> {
    if RELAYED_PREFIXES.iter().any(|p| path.starts_with(p)) {
        return relay(req, services).await;
    }
    let Some(&route) = ROUTES.iter().find(|r| **r == path) else {
        return plain(StatusCode::NOT_FOUND, "Not Found");
    };
    if req.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    }
    let (parts, body) = req.into_parts();
    let md = metadata(&parts.headers);
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return body_error(&*e),
    };
    match route {
        "/v3/watch" => return watch(services, md, body).await,
        "/v3/lease/keepalive" => return keep_alive(services, md, body).await,
        "/v3/maintenance/snapshot" => return snapshot(services, md, body).await,
        _ => {}
    }
    let mut dec = Decoder::new(&body);
    let value = match dec.next_value() {
        Ok(Next::Value(v, _)) => v,
        Ok(Next::End) => Value::Null,
        Err(e) => return error_response(Code::InvalidArgument, &e.0, false),
    };
    let answer = if route == "/v3/kv/range" {
        range(services, md, &value).await
    } else {
        unary(route, services, md, &value)
            .await
            .map(|json| vec![Bytes::from(json)])
    };
    match answer {
        Ok(json) => json_response(json),
        Err(Failure::Decode(msg)) => error_response(Code::InvalidArgument, &msg, false),
        Err(Failure::Call(s)) => call_error(s.code(), s.message(), services),
    }
}

/// An error returned by the gRPC call itself. etcd's gateway reaches etcd's gRPC server
/// natively on a plaintext port (the error's content type arrives as a trailer) and through
/// Go's HTTP/2 server on a TLS port (it arrives with the headers, as
/// `Grpc-Metadata-Content-Type`); the proxy answers as etcd on the same kind of port.
fn call_error(code: Code, msg: &str, services: &Services) -> Response<Body> {
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

fn decode<T: prost::Message + Default>(name: &str, v: &Value<'_>) -> Result<T, Failure> {
    codec::decode(name, v).map_err(|e| Failure::Decode(e.0))
}

fn request<T>(md: &MetadataMap, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    *req.metadata_mut() = md.clone();
    req
}

/// `/v3/kv/range`. A cached answer is its header's JSON followed by the JSON of its shared
/// body, made once per memoized answer: a restart storm of full-prefix reads costs a header
/// each, not a JSON encoding of the whole prefix each.
async fn range(services: &Services, md: MetadataMap, v: &Value<'_>) -> Result<Vec<Bytes>, Failure> {
    let msg: RangeRequest = decode("etcdserverpb.RangeRequest", v)?;
    let len = msg.encoded_len();
    if len > MAX_DECODING_MESSAGE {
        return Err(Failure::Call(Status::resource_exhausted(format!(
            "grpc: received message larger than max ({len} vs. {MAX_DECODING_MESSAGE})"
        ))));
    }
    match services.kv.range_answer(&md, msg).await? {
        RangeAnswer::Cached(header, body) => {
            let mut head = Vec::with_capacity(160);
            codec::write_range_head(&mut head, &header);
            let tail = body.json(codec::write_range_tail);
            Ok(vec![Bytes::from(head), tail])
        }
        RangeAnswer::Forwarded(resp) => {
            let mut out = Vec::new();
            codec::write_range_response(&mut out, &resp);
            Ok(vec![Bytes::from(out)])
        }
    }
}

/// Decodes, calls a service method with the caller's metadata, encodes the answer.
macro_rules! call {
    ($svc:expr, $trait:path, $method:ident, $req:ty, $req_name:literal, $resp_name:literal, $md:expr, $v:expr) => {{
        let msg: $req = decode(concat!("etcdserverpb.", $req_name), $v)?;
        let resp = <_ as $trait>::$method($svc, request(&$md, msg)).await?;
        Ok(codec::encode(
            concat!("etcdserverpb.", $resp_name),
            resp.get_ref(),
        ))
    }};
}

async fn unary(
    route: &str,
    services: &Services,
    md: MetadataMap,
    v: &Value<'_>,
) -> Result<Vec<u8>, Failure> {
    use crate::proto::etcdserverpb::{
        auth_server::Auth, cluster_server::Cluster, kv_server::Kv, lease_server::Lease,
        maintenance_server::Maintenance,
    };
    let kv = &services.kv;
    let p = &services.passthrough;
    match route {
        "/v3/kv/put" => call!(kv, Kv, put, PutRequest, "PutRequest", "PutResponse", md, v),
        "/v3/kv/deleterange" => call!(
            kv,
            Kv,
            delete_range,
            DeleteRangeRequest,
            "DeleteRangeRequest",
            "DeleteRangeResponse",
            md,
            v
        ),
        "/v3/kv/txn" => call!(kv, Kv, txn, TxnRequest, "TxnRequest", "TxnResponse", md, v),
        "/v3/kv/compaction" => call!(
            kv,
            Kv,
            compact,
            CompactionRequest,
            "CompactionRequest",
            "CompactionResponse",
            md,
            v
        ),
        "/v3/lease/grant" => call!(
            p,
            Lease,
            lease_grant,
            LeaseGrantRequest,
            "LeaseGrantRequest",
            "LeaseGrantResponse",
            md,
            v
        ),
        "/v3/lease/revoke" | "/v3/kv/lease/revoke" => call!(
            p,
            Lease,
            lease_revoke,
            LeaseRevokeRequest,
            "LeaseRevokeRequest",
            "LeaseRevokeResponse",
            md,
            v
        ),
        "/v3/lease/timetolive" | "/v3/kv/lease/timetolive" => call!(
            p,
            Lease,
            lease_time_to_live,
            LeaseTimeToLiveRequest,
            "LeaseTimeToLiveRequest",
            "LeaseTimeToLiveResponse",
            md,
            v
        ),
        "/v3/lease/leases" | "/v3/kv/lease/leases" => call!(
            p,
            Lease,
            lease_leases,
            LeaseLeasesRequest,
            "LeaseLeasesRequest",
            "LeaseLeasesResponse",
            md,
            v
        ),
        "/v3/cluster/member/add" => call!(
            p,
            Cluster,
            member_add,
            MemberAddRequest,
            "MemberAddRequest",
            "MemberAddResponse",
            md,
            v
        ),
        "/v3/cluster/member/remove" => call!(
            p,
            Cluster,
            member_remove,
            MemberRemoveRequest,
            "MemberRemoveRequest",
            "MemberRemoveResponse",
            md,
            v
        ),
        "/v3/cluster/member/update" => call!(
            p,
            Cluster,
            member_update,
            MemberUpdateRequest,
            "MemberUpdateRequest",
            "MemberUpdateResponse",
            md,
            v
        ),
        "/v3/cluster/member/list" => call!(
            p,
            Cluster,
            member_list,
            MemberListRequest,
            "MemberListRequest",
            "MemberListResponse",
            md,
            v
        ),
        "/v3/cluster/member/promote" => call!(
            p,
            Cluster,
            member_promote,
            MemberPromoteRequest,
            "MemberPromoteRequest",
            "MemberPromoteResponse",
            md,
            v
        ),
        "/v3/maintenance/alarm" => call!(
            p,
            Maintenance,
            alarm,
            AlarmRequest,
            "AlarmRequest",
            "AlarmResponse",
            md,
            v
        ),
        "/v3/maintenance/status" => call!(
            p,
            Maintenance,
            status,
            StatusRequest,
            "StatusRequest",
            "StatusResponse",
            md,
            v
        ),
        "/v3/maintenance/defragment" => call!(
            p,
            Maintenance,
            defragment,
            DefragmentRequest,
            "DefragmentRequest",
            "DefragmentResponse",
            md,
            v
        ),
        // etcd registers Hash and HashKV on the same path; the first (Hash) wins.
        "/v3/maintenance/hash" => call!(
            p,
            Maintenance,
            hash,
            HashRequest,
            "HashRequest",
            "HashResponse",
            md,
            v
        ),
        "/v3/maintenance/transfer-leadership" => call!(
            p,
            Maintenance,
            move_leader,
            MoveLeaderRequest,
            "MoveLeaderRequest",
            "MoveLeaderResponse",
            md,
            v
        ),
        "/v3/auth/enable" => call!(
            p,
            Auth,
            auth_enable,
            AuthEnableRequest,
            "AuthEnableRequest",
            "AuthEnableResponse",
            md,
            v
        ),
        "/v3/auth/disable" => call!(
            p,
            Auth,
            auth_disable,
            AuthDisableRequest,
            "AuthDisableRequest",
            "AuthDisableResponse",
            md,
            v
        ),
        "/v3/auth/authenticate" => call!(
            p,
            Auth,
            authenticate,
            AuthenticateRequest,
            "AuthenticateRequest",
            "AuthenticateResponse",
            md,
            v
        ),
        "/v3/auth/user/add" => call!(
            p,
            Auth,
            user_add,
            AuthUserAddRequest,
            "AuthUserAddRequest",
            "AuthUserAddResponse",
            md,
            v
        ),
        "/v3/auth/user/get" => call!(
            p,
            Auth,
            user_get,
            AuthUserGetRequest,
            "AuthUserGetRequest",
            "AuthUserGetResponse",
            md,
            v
        ),
        "/v3/auth/user/list" => call!(
            p,
            Auth,
            user_list,
            AuthUserListRequest,
            "AuthUserListRequest",
            "AuthUserListResponse",
            md,
            v
        ),
        "/v3/auth/user/delete" => call!(
            p,
            Auth,
            user_delete,
            AuthUserDeleteRequest,
            "AuthUserDeleteRequest",
            "AuthUserDeleteResponse",
            md,
            v
        ),
        "/v3/auth/user/changepw" => call!(
            p,
            Auth,
            user_change_password,
            AuthUserChangePasswordRequest,
            "AuthUserChangePasswordRequest",
            "AuthUserChangePasswordResponse",
            md,
            v
        ),
        "/v3/auth/user/grant" => call!(
            p,
            Auth,
            user_grant_role,
            AuthUserGrantRoleRequest,
            "AuthUserGrantRoleRequest",
            "AuthUserGrantRoleResponse",
            md,
            v
        ),
        "/v3/auth/user/revoke" => call!(
            p,
            Auth,
            user_revoke_role,
            AuthUserRevokeRoleRequest,
            "AuthUserRevokeRoleRequest",
            "AuthUserRevokeRoleResponse",
            md,
            v
        ),
        "/v3/auth/role/add" => call!(
            p,
            Auth,
            role_add,
            AuthRoleAddRequest,
            "AuthRoleAddRequest",
            "AuthRoleAddResponse",
            md,
            v
        ),
        "/v3/auth/role/get" => call!(
            p,
            Auth,
            role_get,
            AuthRoleGetRequest,
            "AuthRoleGetRequest",
            "AuthRoleGetResponse",
            md,
            v
        ),
        "/v3/auth/role/list" => call!(
            p,
            Auth,
            role_list,
            AuthRoleListRequest,
            "AuthRoleListRequest",
            "AuthRoleListResponse",
            md,
            v
        ),
        "/v3/auth/role/delete" => call!(
            p,
            Auth,
            role_delete,
            AuthRoleDeleteRequest,
            "AuthRoleDeleteRequest",
            "AuthRoleDeleteResponse",
            md,
            v
        ),
        "/v3/auth/role/grant" => call!(
            p,
            Auth,
            role_grant_permission,
            AuthRoleGrantPermissionRequest,
            "AuthRoleGrantPermissionRequest",
            "AuthRoleGrantPermissionResponse",
            md,
            v
        ),
        "/v3/auth/role/revoke" => call!(
            p,
            Auth,
            role_revoke_permission,
            AuthRoleRevokePermissionRequest,
            "AuthRoleRevokePermissionRequest",
            "AuthRoleRevokePermissionResponse",
            md,
            v
        ),
        _ => Err(Failure::Call(Status::unimplemented("Not Implemented"))),
    }
}

/// Decodes every request message of a streaming call's body. `Err` when the first one is
/// malformed (etcd then answers 500, code Unknown); a later malformed one ends the list.
fn stream_requests<T: prost::Message + Default>(name: &str, body: &[u8]) -> Result<Vec<T>, String> {
    let mut dec = Decoder::new(body);
    let mut out = Vec::new();
    loop {
        let item = match dec.next_value() {
            Ok(Next::End) => break,
            Ok(Next::Value(v, _)) => codec::decode::<T>(name, &v).map_err(|e| e.0),
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
async fn streaming<T, F>(
    mut responses: BoxStream<T>,
    encode: F,
    with_metadata: bool,
) -> Response<Body>
where
    T: Send + 'static,
    F: Fn(&T) -> Bytes + Send + Sync + 'static,
{
    let first = responses.next().await;
    let (status, first_chunk, done) = match first {
        None => (StatusCode::OK, None, true),
        Some(Ok(m)) => (StatusCode::OK, Some(encode(&m)), false),
        Some(Err(s)) => (
            StatusCode::from_u16(errors::http_status(s.code()))
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Some(stream::error_chunk(&s)),
            true,
        ),
    };
    let rest = if done {
        futures::stream::empty().boxed()
    } else {
        responses
            .map(move |item| match item {
                Ok(m) => (encode(&m), false),
                Err(s) => (stream::error_chunk(&s), true),
            })
            // Nothing follows an error chunk.
            .scan(false, |ended, (chunk, is_error)| {
                if *ended {
                    return futures::future::ready(None);
                }
                *ended = is_error;
                futures::future::ready(Some(chunk))
            })
            .boxed()
    };
    let body = futures::stream::iter(first_chunk).chain(rest);
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
async fn watch(services: &Services, md: MetadataMap, body: Bytes) -> Response<Body> {
    let reqs: Vec<WatchRequest> = match stream_requests("etcdserverpb.WatchRequest", &body) {
        Ok(r) => r,
        Err(e) => return error_response(Code::Unknown, &e, false),
    };
    if reqs.is_empty() {
        // etcd opens the stream, sends nothing and never answers.
        return futures::future::pending::<Response<Body>>().await;
    }
    let session = services
        .watch
        .session_frames(md, futures::stream::iter(reqs.into_iter().map(Ok)));
    streaming(session, stream::frame_chunk, true).await
}

/// `POST /v3/lease/keepalive`: the body's keepalives piped to etcd, etcd's answers back.
async fn keep_alive(services: &Services, md: MetadataMap, body: Bytes) -> Response<Body> {
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
                    stream::result_chunk(&codec::encode("etcdserverpb.LeaseKeepAliveResponse", m))
                },
                with_metadata,
            )
            .await
        }
        Err(s) => error_response(s.code(), s.message(), false),
    }
}

/// `POST /v3/maintenance/snapshot`: etcd's snapshot stream relayed.
async fn snapshot(services: &Services, md: MetadataMap, body: Bytes) -> Response<Body> {
    use crate::proto::etcdserverpb::maintenance_server::Maintenance;
    let mut dec = Decoder::new(&body);
    let value = match dec.next_value() {
        Ok(Next::Value(v, _)) => v,
        Ok(Next::End) => Value::Null,
        Err(e) => return error_response(Code::InvalidArgument, &e.0, false),
    };
    let msg: SnapshotRequest = match codec::decode("etcdserverpb.SnapshotRequest", &value) {
        Ok(m) => m,
        Err(e) => return error_response(Code::InvalidArgument, &e.0, false),
    };
    match Maintenance::snapshot(&services.passthrough, request(&md, msg)).await {
        Ok(resp) => {
            streaming(
                resp.into_inner(),
                |m: &SnapshotResponse| {
                    stream::result_chunk(&codec::encode("etcdserverpb.SnapshotResponse", m))
                },
                true,
            )
            .await
        }
        Err(s) => error_response(s.code(), s.message(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_clean_path() {
        assert_eq!(clean_path("//v3/kv/range"), "/v3/kv/range");
        assert_eq!(clean_path("/v3/kv/range/"), "/v3/kv/range/");
        assert_eq!(clean_path("/v3/./kv/../kv/range"), "/v3/kv/range");
        assert_eq!(clean_path("/"), "/");
        assert_eq!(clean_path("/.."), "/");
    }

    #[test]
    fn percent() {
        assert_eq!(percent_decode("/v3/kv/%72ange"), "/v3/kv/range");
        assert_eq!(percent_decode("/a%2"), "/a%2");
    }

    #[test]
    fn routes_are_unique() {
        let mut r = ROUTES.to_vec();
        r.sort();
        r.dedup();
        assert_eq!(r.len(), ROUTES.len());
    }
}
