//! What a client certificate's CommonName means, decided in one place.
//!
//! etcd with `--client-cert-auth` *and auth enabled* takes the CN of a verified client
//! certificate as the user of a gRPC request that carries no token; with auth disabled it
//! ignores the certificate's identity altogether. The proxy terminates TLS: etcd sees the
//! proxy's own certificate (whose CN is empty, see [`super::client`]), never the client's,
//! and no header can carry it. So [`grpc_refusal`] refuses a tokenless gRPC request from a
//! certificate with a CN while etcd's auth is on: serving it from the cache or forwarding it
//! would run it as anonymous, not as the CN's user, and deciding as that user would need its
//! roles, which only etcd's root may read (the proxy's recommended user reads its prefixes
//! only). While auth is off such a client is served like any other, as etcd serves it.
//!
//! The gateway: etcd answers a `/v3/` request whose client certificate has a CN with HTTP 400
//! and a fixed text ([`GATEWAY_CN_REFUSAL`], which APISIX's CLI looks for) when
//! `--client-cert-auth` is set and auth is enabled, token or not (measured on etcd 3.4.23;
//! with `--trusted-ca-file` alone, or auth off, the CN is ignored): [`gateway_refusal`].
//!
//! etcd's auth state is the proxy's `serve::access` state, passed in by the listener: while it
//! is unknown the proxy answers as with auth off, and forwards (tokenless) whatever the caches
//! could answer, so etcd refuses what the anonymous caller may not do.
//!
//! Without `--client-cert-auth` (only `--trusted-ca-file`), client certificates are required
//! and verified but their CN means nothing, exactly as in etcd.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Full;

/// What a TLS handshake proved about the client. When the certificate has a CN, each request
/// of the connection carries it as an `Arc<Peer>` request extension (`tonic::Request::
/// extensions` in the gRPC services), for decisions per identity.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// The CommonName of the verified client certificate, when it has a non-empty one.
    pub common_name: Option<Arc<str>>,
}

/// How the listen address treats client-certificate CommonNames.
#[derive(Debug, Clone, Copy, Default)]
pub struct CnPolicy {
    /// `--client-cert-auth`: a CN is an etcd identity.
    pub client_cert_auth: bool,
}

/// etcd's answer body to a gateway request made with a CN certificate (`http.Error` adds the
/// newline).
pub const GATEWAY_CN_REFUSAL: &str =
    "CommonName of client sending a request against gateway will be ignored and not used as expected\n";

/// The refusal of a gRPC request that etcd would run as the user named by the client
/// certificate's CN (`auth_on`: etcd's auth is known to be enabled), or `None` to serve it (no
/// CN identity in play, or a token that wins over the certificate, as in etcd).
pub fn grpc_refusal(
    policy: CnPolicy,
    peer: &Peer,
    headers: &HeaderMap,
    auth_on: bool,
) -> Option<tonic::Status> {
    if !policy.client_cert_auth || !auth_on {
        return None;
    }
    let cn = peer.common_name.as_deref()?;
    if headers.contains_key("token") || headers.contains_key("authorization") {
        return None;
    }
    Some(tonic::Status::unauthenticated(format!(
        "etcd-fanout: the client certificate's CommonName {cn:?} would be the etcd user of this \
         request, and a proxy cannot present it to etcd: authenticate with a token (etcd \
         user and password) or use a client certificate without a CommonName"
    )))
}

/// etcd's HTTP 400 to a gateway (`/v3/...`) request whose client certificate has a CN while
/// auth is on (`auth_on`), or `None` to serve it.
pub fn gateway_refusal(
    policy: CnPolicy,
    peer: &Peer,
    path: &str,
    auth_on: bool,
) -> Option<Response<tonic::body::Body>> {
    if !policy.client_cert_auth
        || !auth_on
        || peer.common_name.is_none()
        || !path.starts_with("/v3/")
    {
        return None;
    }
    let mut resp = Response::new(tonic::body::Body::new(Full::new(Bytes::from_static(
        GATEWAY_CN_REFUSAL.as_bytes(),
    ))));
    *resp.status_mut() = StatusCode::BAD_REQUEST;
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        http::HeaderValue::from_static("nosniff"),
    );
    Some(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cn_policy() {
        let on = CnPolicy {
            client_cert_auth: true,
        };
        let off = CnPolicy::default();
        let alice = Peer {
            common_name: Some("alice".into()),
        };
        let anon = Peer::default();
        let mut token = HeaderMap::new();
        token.insert("token", http::HeaderValue::from_static("t"));
        let none = HeaderMap::new();
        for auth in [true, false] {
            assert_eq!(grpc_refusal(on, &alice, &none, auth).is_some(), auth);
            assert!(grpc_refusal(on, &alice, &token, auth).is_none());
            assert!(grpc_refusal(on, &anon, &none, auth).is_none());
            assert!(grpc_refusal(off, &alice, &none, auth).is_none());
            assert_eq!(
                gateway_refusal(on, &alice, "/v3/kv/range", auth).is_some(),
                auth
            );
            assert!(gateway_refusal(on, &alice, "/version", auth).is_none());
            assert!(gateway_refusal(on, &anon, "/v3/kv/range", auth).is_none());
            assert!(gateway_refusal(off, &alice, "/v3/kv/range", auth).is_none());
        }
    }
}
