//! The `/v3/` routes of etcd's gateway: one table ([`ROUTES`]) of every route and the call that
//! answers it, request JSON decoded as `jsonpb` does, the call made on the same services gRPC
//! clients use (with the caller's `Authorization` and `Grpc-Metadata-*` headers as metadata),
//! the answer or error written as etcd writes it.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use prost::Message as _;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use tonic::Code;

use super::answer::{
    body_error, call_error, error_response, json_response, plain, Failure, MAX_BODY,
};
use super::json::{Decoder, Next, Value};
use super::stream::Body;
use super::{endpoints, jsonpb, streaming};
use crate::error::Error;
use crate::proto::etcdserverpb::auth_server::Auth;
use crate::proto::etcdserverpb::cluster_server::Cluster;
use crate::proto::etcdserverpb::kv_server::Kv;
use crate::proto::etcdserverpb::lease_server::Lease;
use crate::proto::etcdserverpb::maintenance_server::Maintenance;
use crate::proto::etcdserverpb::*;
use crate::serve::access::identity::GATEWAY_ACCEPT;
use crate::serve::kv::RangeAnswer;
use crate::serve::watch::ConnectionEnding;
use crate::serve::Services;
use crate::wire::body::ReqBody;
use crate::wire::grpc::MAX_DECODING_MESSAGE;

/// How a route is answered.
#[derive(Clone, Copy)]
enum Call {
    /// `KV/Range`: from the cache when it can, with the JSON of a cached answer made once.
    Range,
    /// A unary call: the body decoded, the service called with the caller's metadata, the
    /// answer encoded.
    Unary(Unary),
    /// `Watch/Watch`: a watch session over the body's requests.
    Watch,
    /// `Lease/LeaseKeepAlive`: piped to etcd.
    KeepAlive,
    /// `Maintenance/Snapshot`: etcd's stream relayed.
    Snapshot,
}

/// A unary call of the gateway: decodes the request JSON, calls the service, encodes the
/// answer as JSON.
type Unary = for<'a> fn(
    &'a Services,
    MetadataMap,
    &'a Value<'a>,
) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, Failure>> + Send + 'a>>;

/// A [`Call::Unary`] of service field `$svc` through trait `$trait`'s `$method`, from
/// `$req` to `$resp` (etcdserverpb message names).
macro_rules! unary {
    ($svc:ident, $trait:ident :: $method:ident, $req:ident -> $resp:ident) => {
        Call::Unary(|services, md, v| {
            Box::pin(async move {
                let msg: $req = decode(concat!("etcdserverpb.", stringify!($req)), v)?;
                let resp = <_ as $trait>::$method(&services.$svc, request(&md, msg)).await?;
                Ok(jsonpb::encode(
                    concat!("etcdserverpb.", stringify!($resp)),
                    resp.get_ref(),
                ))
            })
        })
    };
}

/// Every `POST` route of etcd 3.4's gateway (`google.api.http` options of `rpc.proto`) and
/// how it is answered. Lock and election routes are relayed ([`RELAYED_PREFIXES`]).
const ROUTES: &[(&str, Call)] = &[
    ("/v3/kv/range", Call::Range),
    ("/v3/kv/put", unary!(kv, Kv::put, PutRequest -> PutResponse)),
    (
        "/v3/kv/deleterange",
        unary!(kv, Kv::delete_range, DeleteRangeRequest -> DeleteRangeResponse),
    ),
    ("/v3/kv/txn", unary!(kv, Kv::txn, TxnRequest -> TxnResponse)),
    (
        "/v3/kv/compaction",
        unary!(kv, Kv::compact, CompactionRequest -> CompactionResponse),
    ),
    ("/v3/watch", Call::Watch),
    (
        "/v3/lease/grant",
        unary!(passthrough, Lease::lease_grant, LeaseGrantRequest -> LeaseGrantResponse),
    ),
    (
        "/v3/lease/revoke",
        unary!(passthrough, Lease::lease_revoke, LeaseRevokeRequest -> LeaseRevokeResponse),
    ),
    (
        "/v3/kv/lease/revoke",
        unary!(passthrough, Lease::lease_revoke, LeaseRevokeRequest -> LeaseRevokeResponse),
    ),
    ("/v3/lease/keepalive", Call::KeepAlive),
    (
        "/v3/lease/timetolive",
        unary!(passthrough, Lease::lease_time_to_live, LeaseTimeToLiveRequest -> LeaseTimeToLiveResponse),
    ),
    (
        "/v3/kv/lease/timetolive",
        unary!(passthrough, Lease::lease_time_to_live, LeaseTimeToLiveRequest -> LeaseTimeToLiveResponse),
    ),
    (
        "/v3/lease/leases",
        unary!(passthrough, Lease::lease_leases, LeaseLeasesRequest -> LeaseLeasesResponse),
    ),
    (
        "/v3/kv/lease/leases",
        unary!(passthrough, Lease::lease_leases, LeaseLeasesRequest -> LeaseLeasesResponse),
    ),
    (
        "/v3/cluster/member/add",
        unary!(passthrough, Cluster::member_add, MemberAddRequest -> MemberAddResponse),
    ),
    (
        "/v3/cluster/member/remove",
        unary!(passthrough, Cluster::member_remove, MemberRemoveRequest -> MemberRemoveResponse),
    ),
    (
        "/v3/cluster/member/update",
        unary!(passthrough, Cluster::member_update, MemberUpdateRequest -> MemberUpdateResponse),
    ),
    (
        "/v3/cluster/member/list",
        unary!(passthrough, Cluster::member_list, MemberListRequest -> MemberListResponse),
    ),
    (
        "/v3/cluster/member/promote",
        unary!(passthrough, Cluster::member_promote, MemberPromoteRequest -> MemberPromoteResponse),
    ),
    (
        "/v3/maintenance/alarm",
        unary!(passthrough, Maintenance::alarm, AlarmRequest -> AlarmResponse),
    ),
    (
        "/v3/maintenance/status",
        unary!(passthrough, Maintenance::status, StatusRequest -> StatusResponse),
    ),
    (
        "/v3/maintenance/defragment",
        unary!(passthrough, Maintenance::defragment, DefragmentRequest -> DefragmentResponse),
    ),
    // etcd registers Hash and HashKV on the same path; the first (Hash) wins.
    (
        "/v3/maintenance/hash",
        unary!(passthrough, Maintenance::hash, HashRequest -> HashResponse),
    ),
    ("/v3/maintenance/snapshot", Call::Snapshot),
    (
        "/v3/maintenance/transfer-leadership",
        unary!(passthrough, Maintenance::move_leader, MoveLeaderRequest -> MoveLeaderResponse),
    ),
    (
        "/v3/auth/enable",
        unary!(passthrough, Auth::auth_enable, AuthEnableRequest -> AuthEnableResponse),
    ),
    (
        "/v3/auth/disable",
        unary!(passthrough, Auth::auth_disable, AuthDisableRequest -> AuthDisableResponse),
    ),
    (
        "/v3/auth/authenticate",
        unary!(passthrough, Auth::authenticate, AuthenticateRequest -> AuthenticateResponse),
    ),
    (
        "/v3/auth/user/add",
        unary!(passthrough, Auth::user_add, AuthUserAddRequest -> AuthUserAddResponse),
    ),
    (
        "/v3/auth/user/get",
        unary!(passthrough, Auth::user_get, AuthUserGetRequest -> AuthUserGetResponse),
    ),
    (
        "/v3/auth/user/list",
        unary!(passthrough, Auth::user_list, AuthUserListRequest -> AuthUserListResponse),
    ),
    (
        "/v3/auth/user/delete",
        unary!(passthrough, Auth::user_delete, AuthUserDeleteRequest -> AuthUserDeleteResponse),
    ),
    (
        "/v3/auth/user/changepw",
        unary!(passthrough, Auth::user_change_password, AuthUserChangePasswordRequest -> AuthUserChangePasswordResponse),
    ),
    (
        "/v3/auth/user/grant",
        unary!(passthrough, Auth::user_grant_role, AuthUserGrantRoleRequest -> AuthUserGrantRoleResponse),
    ),
    (
        "/v3/auth/user/revoke",
        unary!(passthrough, Auth::user_revoke_role, AuthUserRevokeRoleRequest -> AuthUserRevokeRoleResponse),
    ),
    (
        "/v3/auth/role/add",
        unary!(passthrough, Auth::role_add, AuthRoleAddRequest -> AuthRoleAddResponse),
    ),
    (
        "/v3/auth/role/get",
        unary!(passthrough, Auth::role_get, AuthRoleGetRequest -> AuthRoleGetResponse),
    ),
    (
        "/v3/auth/role/list",
        unary!(passthrough, Auth::role_list, AuthRoleListRequest -> AuthRoleListResponse),
    ),
    (
        "/v3/auth/role/delete",
        unary!(passthrough, Auth::role_delete, AuthRoleDeleteRequest -> AuthRoleDeleteResponse),
    ),
    (
        "/v3/auth/role/grant",
        unary!(passthrough, Auth::role_grant_permission, AuthRoleGrantPermissionRequest -> AuthRoleGrantPermissionResponse),
    ),
    (
        "/v3/auth/role/revoke",
        unary!(passthrough, Auth::role_revoke_permission, AuthRoleRevokePermissionRequest -> AuthRoleRevokePermissionResponse),
    ),
];

/// Gateway routes etcd serves from services the proxy has no gRPC implementation of: relayed
/// to etcd's own gateway over HTTP.
pub(super) const RELAYED_PREFIXES: &[&str] = &["/v3/lock/", "/v3/election/"];

/// Every `/v3/` route path of [`ROUTES`].
pub(super) fn route_paths() -> impl Iterator<Item = &'static str> {
    ROUTES.iter().map(|(p, _)| *p)
}

/// Answers a request under `/v3/`: a relayed prefix, or a route of [`ROUTES`].
pub(super) async fn v3(req: Request<ReqBody>, path: &str, services: &Services) -> Response<Body> {
    if RELAYED_PREFIXES.iter().any(|p| path.starts_with(p)) {
        return endpoints::relay(req, services).await;
    }
    let Some(&(_, call)) = ROUTES.iter().find(|(r, _)| *r == path) else {
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
    let unary = match call {
        Call::Watch => {
            let ending = parts.extensions.get::<ConnectionEnding>().cloned();
            return streaming::watch(services, md, ending, body).await;
        }
        Call::KeepAlive => return streaming::keep_alive(services, md, body).await,
        Call::Snapshot => return streaming::snapshot(services, md, body).await,
        Call::Range => None,
        Call::Unary(f) => Some(f),
    };
    let mut dec = Decoder::new(&body);
    let value = match dec.next_value() {
        Ok(Next::Value(v)) => v,
        Ok(Next::End) => Value::Null,
        Err(e) => return error_response(Code::InvalidArgument, &e.0, false),
    };
    let answer = match unary {
        None => range(services, md, &value).await,
        Some(f) => f(services, md, &value)
            .await
            .map(|json| vec![Bytes::from(json)]),
    };
    match answer {
        Ok(json) => json_response(json),
        Err(Failure::Decode(msg)) => error_response(Code::InvalidArgument, &msg, false),
        Err(Failure::Call(s)) => call_error(s.code(), s.message(), services),
    }
}

fn decode<T: prost::Message + Default>(name: &str, v: &Value<'_>) -> Result<T, Failure> {
    jsonpb::decode(name, v).map_err(|e| Failure::Decode(e.0))
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
        return Err(Error::MessageTooLarge {
            len,
            max: MAX_DECODING_MESSAGE,
        }
        .into());
    }
    match services.kv.range_answer(&md, msg).await? {
        RangeAnswer::Cached(header, body) => {
            let mut head = Vec::with_capacity(160);
            jsonpb::write_range_head(&mut head, &header);
            let tail = body.json(jsonpb::write_range_tail);
            Ok(vec![Bytes::from(head), tail])
        }
        RangeAnswer::Forwarded(resp) => {
            let mut out = Vec::new();
            jsonpb::write_range_response(&mut out, &resp);
            Ok(vec![Bytes::from(out)])
        }
    }
}

/// gRPC metadata of a gateway call, from its HTTP headers.
fn metadata(headers: &http::HeaderMap) -> MetadataMap {
    let mut md = MetadataMap::new();
    for (k, v) in headers {
        let name = k.as_str();
        // grpc-gateway passes `Authorization` as `authorization` metadata; a
        // `Grpc-Metadata-Token` header becomes `token`, which etcd reads first.
        let key = if name == "authorization" {
            name
        } else if name == "accept" {
            // grpc-gateway passes permanent HTTP headers as `grpcgateway-*` metadata; etcd
            // reads this one to tell its gateway's requests from gRPC clients' (see
            // `serve::access::identity::GATEWAY_ACCEPT`).
            GATEWAY_ACCEPT
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_unique() {
        let mut r: Vec<&str> = ROUTES.iter().map(|(p, _)| *p).collect();
        r.sort();
        r.dedup();
        assert_eq!(r.len(), ROUTES.len());
    }
}
