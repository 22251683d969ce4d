//! Authenticated mode (`--auth`): the same workload against an etcd with auth on, as
//! production APISIX deployments run it.
//!
//! Per target, right after its etcd starts: `root` (the writer: every put and the readiness
//! probe carry its token), `loadgen-reader` (read on `--prefix-base` only: every gRPC watch
//! stream, every HTTP/JSON range and watch and every cold range carries its token, gRPC
//! `token` metadata or the raw `Authorization` header as APISIX sends it), `etcd-fanout` (read
//! on `--prefix-base`: the proxy's own `--user`), then `auth enable`. Without `--auth`
//! nothing here adds anything to a request.
//!
//! The tokens live in one process-wide slot, replaced for each target (each has its own etcd);
//! etcd's simple tokens live 300 s unused, longer than a run.

use std::sync::RwLock;

use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::Request;

use etcd_fanout::proto::authpb::{permission::Type as PermType, Permission};
use etcd_fanout::proto::etcdserverpb::{
    auth_client::AuthClient, AuthEnableRequest, AuthRoleAddRequest, AuthRoleGrantPermissionRequest,
    AuthUserAddRequest, AuthUserGrantRoleRequest, AuthenticateRequest,
};

use crate::BoxError;

/// Password of every user made here.
const PASSWORD: &str = "loadgen-pw";
/// The watchers' user.
const READER: &str = "loadgen-reader";
/// The proxy's own user.
const FANOUT: &str = "etcd-fanout";

/// The current target's tokens (none: auth off).
static TOKENS: RwLock<Option<Tokens>> = RwLock::new(None);

/// Tokens of one target's etcd.
#[derive(Clone)]
struct Tokens {
    /// root's, for writes and probes.
    writer: String,
    /// loadgen-reader's, for every watch and range.
    reader: String,
}

/// Users, roles and `auth enable` on the etcd at `url`, readers confined to `prefix_base`;
/// then both tokens are taken for the requests below.
pub async fn enable(url: &str, prefix_base: &str) -> Result<(), BoxError> {
    let ch = crate::work::connect(url).await?;
    let mut auth = AuthClient::new(ch.clone());
    let prefix = prefix_base.as_bytes().to_vec();
    let mut end = prefix.clone();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    for user in ["root", READER, FANOUT] {
        auth.user_add(AuthUserAddRequest {
            name: user.into(),
            password: PASSWORD.into(),
            ..Default::default()
        })
        .await?;
    }
    auth.user_grant_role(AuthUserGrantRoleRequest {
        user: "root".into(),
        role: "root".into(),
    })
    .await?;
    auth.role_add(AuthRoleAddRequest {
        name: READER.into(),
    })
    .await?;
    auth.role_grant_permission(AuthRoleGrantPermissionRequest {
        name: READER.into(),
        perm: Some(Permission {
            perm_type: PermType::Read as i32,
            key: prefix.into(),
            range_end: end.into(),
        }),
    })
    .await?;
    for user in [READER, FANOUT] {
        auth.user_grant_role(AuthUserGrantRoleRequest {
            user: user.into(),
            role: READER.into(),
        })
        .await?;
    }
    auth.auth_enable(AuthEnableRequest {}).await?;
    let tokens = Tokens {
        writer: login(&ch, "root").await?,
        reader: login(&ch, READER).await?,
    };
    *TOKENS.write().unwrap_or_else(|e| e.into_inner()) = Some(tokens);
    Ok(())
}

/// Forgets the tokens (the next target runs with auth off unless enabled again).
pub fn disable() {
    *TOKENS.write().unwrap_or_else(|e| e.into_inner()) = None;
}

async fn login(ch: &Channel, user: &str) -> Result<String, BoxError> {
    Ok(AuthClient::new(ch.clone())
        .authenticate(AuthenticateRequest {
            name: user.into(),
            password: PASSWORD.into(),
        })
        .await?
        .into_inner()
        .token)
}

fn tokens() -> Option<Tokens> {
    TOKENS.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// `msg` with the writer's token, when auth is on.
pub fn as_writer<T>(msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(v) = tokens().and_then(|t| MetadataValue::try_from(t.writer.as_str()).ok()) {
        req.metadata_mut().insert("token", v);
    }
    req
}

/// `msg` with the watchers' token, when auth is on.
pub fn as_reader<T>(msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(v) = tokens().and_then(|t| MetadataValue::try_from(t.reader.as_str()).ok()) {
        req.metadata_mut().insert("token", v);
    }
    req
}

/// The `Authorization` header line of every HTTP/JSON request (the watchers' token), or
/// nothing when auth is off.
pub fn http_header() -> String {
    tokens()
        .map(|t| format!("Authorization: {}\r\n", t.reader))
        .unwrap_or_default()
}

/// etcd-fanout's own credentials, when auth is on.
pub fn fanout_args() -> Vec<String> {
    if tokens().is_some() {
        vec!["--user".into(), format!("{FANOUT}:{PASSWORD}")]
    } else {
        Vec::new()
    }
}
