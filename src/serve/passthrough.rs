//! Lease, Cluster, Maintenance and Auth: forwarded to etcd untouched.
//!
//! None of these can be served from a cache (they change or report cluster state), so each call
//! is re-issued on the shared upstream channel with the caller's credentials, and etcd's answer
//! or error goes back as is. The two streaming calls (lease keepalive, snapshot) are piped.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::proto::etcdserverpb::*;
use crate::serve::access::Access;
use crate::source::registry::Registry;
use crate::source::upstream::{forward, Upstream};

/// A boxed response stream, as the streaming methods return.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Forwards the non-KV services to etcd.
#[derive(Debug, Clone)]
pub struct PassThrough {
    /// The upstream etcd cluster.
    upstream: Arc<Upstream>,
    /// Told about auth changes made through the proxy.
    access: Arc<Access>,
    /// Discovery: when set, `MemberList` lists the proxy replicas instead of etcd's members.
    registry: Option<Arc<Registry>>,
}

impl PassThrough {
    /// A forwarder on `upstream`, reporting auth changes to `access`; `MemberList` answered
    /// from `registry` when there is one.
    pub fn new(
        upstream: Arc<Upstream>,
        access: Arc<Access>,
        registry: Option<Arc<Registry>>,
    ) -> Self {
        PassThrough {
            upstream,
            access,
            registry,
        }
    }

    /// Pipes a stream of keepalive requests to etcd and etcd's answers back.
    /// `requests` ends the upstream stream when it ends (or yields an error).
    pub async fn keep_alive_stream<S>(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        requests: S,
    ) -> Result<BoxStream<LeaseKeepAliveResponse>, Status>
    where
        S: Stream<Item = Result<LeaseKeepAliveRequest, Status>> + Send + 'static,
    {
        let reqs = requests
            .take_while(|r| futures::future::ready(r.is_ok()))
            .filter_map(|r| futures::future::ready(r.ok()));
        let resp = self
            .upstream
            .lease()
            .lease_keep_alive(forward(metadata, reqs))
            .await?;
        Ok(Box::pin(resp.into_inner()))
    }
}

/// Implements a unary method by forwarding it with the caller's credentials.
///
/// Written in the shape `#[async_trait]` expands to, because an attribute macro does not see
/// inside macro invocations.
macro_rules! forward_unary {
    ($client:ident, $method:ident, $req:ty, $resp:ty) => {
        fn $method<'life0, 'async_trait>(
            &'life0 self,
            request: Request<$req>,
        ) -> Pin<Box<dyn Future<Output = Result<Response<$resp>, Status>> + Send + 'async_trait>>
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            Box::pin(async move {
                let (metadata, _, msg) = request.into_parts();
                let resp = self
                    .upstream
                    .$client()
                    .$method(forward(&metadata, msg))
                    .instrument(tracing::debug_span!(
                        "forward",
                        method = stringify!($method)
                    ))
                    .await
                    .inspect_err(|s| self.access.observe_status(s))?;
                self.upstream.observe_header(resp.get_ref().header.as_ref());
                self.access.observe_auth_call(stringify!($method));
                Ok(Response::new(resp.into_inner()))
            })
        }
    };
}

#[tonic::async_trait]
impl lease_server::Lease for PassThrough {
    forward_unary!(lease, lease_grant, LeaseGrantRequest, LeaseGrantResponse);
    forward_unary!(lease, lease_revoke, LeaseRevokeRequest, LeaseRevokeResponse);
    forward_unary!(
        lease,
        lease_time_to_live,
        LeaseTimeToLiveRequest,
        LeaseTimeToLiveResponse
    );
    forward_unary!(lease, lease_leases, LeaseLeasesRequest, LeaseLeasesResponse);

    type LeaseKeepAliveStream = BoxStream<LeaseKeepAliveResponse>;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let (metadata, _, stream) = request.into_parts();
        Ok(Response::new(
            self.keep_alive_stream(&metadata, stream).await?,
        ))
    }
}

#[tonic::async_trait]
impl cluster_server::Cluster for PassThrough {
    forward_unary!(cluster, member_add, MemberAddRequest, MemberAddResponse);
    forward_unary!(
        cluster,
        member_remove,
        MemberRemoveRequest,
        MemberRemoveResponse
    );
    forward_unary!(
        cluster,
        member_update,
        MemberUpdateRequest,
        MemberUpdateResponse
    );
    async fn member_list(
        &self,
        request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        match &self.registry {
            // The replicas, as `etcd grpc-proxy` lists them (source/registry.rs).
            Some(r) => {
                let header = self.upstream.header(self.upstream.observed_revision());
                Ok(Response::new(r.member_list(header)))
            }
            None => {
                let (metadata, _, msg) = request.into_parts();
                let resp = self
                    .upstream
                    .cluster()
                    .member_list(forward(&metadata, msg))
                    .await
                    .inspect_err(|s| self.access.observe_status(s))?;
                self.upstream.observe_header(resp.get_ref().header.as_ref());
                Ok(Response::new(resp.into_inner()))
            }
        }
    }
    forward_unary!(
        cluster,
        member_promote,
        MemberPromoteRequest,
        MemberPromoteResponse
    );
}

#[tonic::async_trait]
impl maintenance_server::Maintenance for PassThrough {
    forward_unary!(maintenance, alarm, AlarmRequest, AlarmResponse);
    forward_unary!(maintenance, status, StatusRequest, StatusResponse);
    forward_unary!(
        maintenance,
        defragment,
        DefragmentRequest,
        DefragmentResponse
    );
    forward_unary!(maintenance, hash, HashRequest, HashResponse);
    forward_unary!(maintenance, hash_kv, HashKvRequest, HashKvResponse);
    forward_unary!(
        maintenance,
        move_leader,
        MoveLeaderRequest,
        MoveLeaderResponse
    );

    type SnapshotStream = BoxStream<SnapshotResponse>;

    async fn snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let (metadata, _, msg) = request.into_parts();
        let resp = self
            .upstream
            .maintenance()
            .snapshot(forward(&metadata, msg))
            .await?;
        Ok(Response::new(Box::pin(resp.into_inner())))
    }
}

#[tonic::async_trait]
impl auth_server::Auth for PassThrough {
    forward_unary!(auth, auth_enable, AuthEnableRequest, AuthEnableResponse);
    forward_unary!(auth, auth_disable, AuthDisableRequest, AuthDisableResponse);
    forward_unary!(
        auth,
        authenticate,
        AuthenticateRequest,
        AuthenticateResponse
    );
    forward_unary!(auth, user_add, AuthUserAddRequest, AuthUserAddResponse);
    forward_unary!(auth, user_get, AuthUserGetRequest, AuthUserGetResponse);
    forward_unary!(auth, user_list, AuthUserListRequest, AuthUserListResponse);
    forward_unary!(
        auth,
        user_delete,
        AuthUserDeleteRequest,
        AuthUserDeleteResponse
    );
    forward_unary!(
        auth,
        user_change_password,
        AuthUserChangePasswordRequest,
        AuthUserChangePasswordResponse
    );
    forward_unary!(
        auth,
        user_grant_role,
        AuthUserGrantRoleRequest,
        AuthUserGrantRoleResponse
    );
    forward_unary!(
        auth,
        user_revoke_role,
        AuthUserRevokeRoleRequest,
        AuthUserRevokeRoleResponse
    );
    forward_unary!(auth, role_add, AuthRoleAddRequest, AuthRoleAddResponse);
    forward_unary!(auth, role_get, AuthRoleGetRequest, AuthRoleGetResponse);
    forward_unary!(auth, role_list, AuthRoleListRequest, AuthRoleListResponse);
    forward_unary!(
        auth,
        role_delete,
        AuthRoleDeleteRequest,
        AuthRoleDeleteResponse
    );
    forward_unary!(
        auth,
        role_grant_permission,
        AuthRoleGrantPermissionRequest,
        AuthRoleGrantPermissionResponse
    );
    forward_unary!(
        auth,
        role_revoke_permission,
        AuthRoleRevokePermissionRequest,
        AuthRoleRevokePermissionResponse
    );
}
