//! Who a request says it is, found exactly as etcd 3.4 finds it (`AuthInfoFromCtx`,
//! `auth/store.go`): the first value of the gRPC metadata `token`, else the first value of
//! `authorization` (the gateway's `Authorization` header arrives as the latter, and a
//! `Grpc-Metadata-Token` header as the former, so it wins). etcd 3.4 does not strip a
//! `Bearer ` prefix, so neither does the proxy. A client certificate's CommonName is not a
//! token: `tls::identity` refuses tokenless requests from CN certificates before they get
//! here, and [`super::Access`] words the refusal of CN-less ones.

use tonic::metadata::{AsciiMetadataValue, MetadataMap};

/// gRPC metadata key of clientv3's token (`rpctypes.TokenFieldNameGRPC`).
pub const TOKEN: &str = "token";
/// gRPC metadata key of the gateway's `Authorization` header (`TokenFieldNameSwagger`).
pub const AUTHORIZATION: &str = "authorization";

/// gRPC metadata key of the gateway's `Accept` header (grpc-gateway passes permanent HTTP
/// headers as `grpcgateway-*`). etcd's `AuthInfoFromTLS` takes a request carrying it for
/// its gateway's and ignores the connection's client certificate: such a tokenless request
/// has no identity at all (`user name is empty`), with or without `--client-cert-auth`.
pub const GATEWAY_ACCEPT: &str = "grpcgateway-accept";

/// Whether etcd would take a request with `metadata` for one from its gateway (see
/// [`GATEWAY_ACCEPT`]).
pub fn via_gateway(metadata: &MetadataMap) -> bool {
    metadata.contains_key(GATEWAY_ACCEPT)
}

/// The token etcd would read from `metadata`, if any (possibly empty: etcd then answers
/// `invalid auth token`, and so does a probe carrying it).
pub fn token(metadata: &MetadataMap) -> Option<&AsciiMetadataValue> {
    metadata.get(TOKEN).or_else(|| metadata.get(AUTHORIZATION))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: &[(&'static str, &'static str)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in pairs {
            m.append(*k, AsciiMetadataValue::from_static(v));
        }
        m
    }

    #[test]
    fn token_wins_over_authorization() {
        let m = md(&[("authorization", "a"), ("token", "t")]);
        assert_eq!(token(&m).map(|v| v.as_bytes()), Some(&b"t"[..]));
        let m = md(&[("authorization", "Bearer a")]);
        assert_eq!(token(&m).map(|v| v.as_bytes()), Some(&b"Bearer a"[..]));
        assert!(token(&md(&[("hasleader", "true")])).is_none());
    }

    #[test]
    fn first_value_counts() {
        let m = md(&[("token", "one"), ("token", "two")]);
        assert_eq!(token(&m).map(|v| v.as_bytes()), Some(&b"one"[..]));
    }
}
