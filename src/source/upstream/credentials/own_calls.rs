//! The calls the proxy makes for itself (feed loads, upstream watches, backfill, sync checks,
//! compaction probes): each carries the proxy's token and is retried once after a new login
//! when etcd refuses the token. A watch refusal arrives as a `canceled` response whose
//! `cancel_reason` is Go's status string; it becomes that status.

use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use super::{needs_login, Ticket};
use crate::metrics;
use crate::proto::etcdserverpb::{RangeRequest, RangeResponse, WatchCreateRequest};
use crate::source::upstream::{Upstream, UpstreamWatch};

/// The proxy's own calls: each carries the proxy's token and is retried once after a new
/// login when etcd refuses the token.
impl Upstream {
    /// A Range made for the proxy itself (counted as `kind`).
    pub async fn own_range(
        &self,
        kind: metrics::Upstream,
        req: RangeRequest,
    ) -> Result<RangeResponse, Status> {
        let creds = self.credentials();
        let ticket = creds.ticket(self).await;
        kind.inc();
        match self.kv().range(ticket.request(req.clone())).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) if needs_login(&s, ticket.token.is_none()) => {
                tracing::debug!(error = %s.message(), "etcd refused the proxy's token; logging in again");
                creds.drop_token(&ticket);
                if !creds.renew_after(self, &ticket).await {
                    return Err(s);
                }
                let ticket = creds.ticket(self).await;
                kind.inc();
                self.kv()
                    .range(ticket.request(req))
                    .await
                    .map(|r| r.into_inner())
            }
            Err(s) => Err(s),
        }
    }

    /// A watch made for the proxy itself, on its own stream (counted as `kind`). Returns once
    /// etcd accepted it; a refusal becomes the matching error (e.g. `PermissionDenied`).
    pub async fn own_watch(
        &self,
        kind: metrics::Upstream,
        create: WatchCreateRequest,
    ) -> Result<UpstreamWatch, Status> {
        let creds = self.credentials();
        let ticket = creds.ticket(self).await;
        match self.try_own_watch(kind, &ticket, create.clone()).await {
            Err(s) if needs_login(&s, ticket.token.is_none()) => {
                tracing::debug!(error = %s.message(), "etcd refused the proxy's token; logging in again");
                creds.drop_token(&ticket);
                if !creds.renew_after(self, &ticket).await {
                    return Err(s);
                }
                let ticket = creds.ticket(self).await;
                self.try_own_watch(kind, &ticket, create).await
            }
            r => r,
        }
    }

    async fn try_own_watch(
        &self,
        kind: metrics::Upstream,
        ticket: &Ticket,
        create: WatchCreateRequest,
    ) -> Result<UpstreamWatch, Status> {
        let mut metadata = MetadataMap::new();
        ticket.insert(&mut metadata);
        let mut up = self.open_watch(kind, &metadata, create).await?;
        match up.responses.message().await? {
            None => Err(Status::unavailable("upstream watch stream ended")),
            Some(first) if first.canceled && first.compact_revision == 0 => {
                self.observe_header(first.header.as_ref());
                Err(cancel_status(&first.cancel_reason))
            }
            Some(first) => {
                up.push_back(first);
                Ok(up)
            }
        }
    }
}

/// The gRPC status a watch refusal's `cancel_reason` stands for: etcd words it as Go's
/// `rpc error: code = X desc = Y` (3.4.22+); older servers send the bare message.
fn cancel_status(reason: &str) -> Status {
    let parsed = reason
        .strip_prefix("rpc error: code = ")
        .and_then(|r| r.split_once(" desc = "));
    match parsed {
        Some((code, desc)) => Status::new(go_code(code), desc),
        None if reason == "etcdserver: permission denied" => {
            Status::permission_denied(reason.to_string())
        }
        None => Status::unknown(reason.to_string()),
    }
}

/// A gRPC code from its Go name.
fn go_code(name: &str) -> Code {
    match name {
        "OK" => Code::Ok,
        "Canceled" => Code::Cancelled,
        "InvalidArgument" => Code::InvalidArgument,
        "DeadlineExceeded" => Code::DeadlineExceeded,
        "NotFound" => Code::NotFound,
        "AlreadyExists" => Code::AlreadyExists,
        "PermissionDenied" => Code::PermissionDenied,
        "ResourceExhausted" => Code::ResourceExhausted,
        "FailedPrecondition" => Code::FailedPrecondition,
        "Aborted" => Code::Aborted,
        "OutOfRange" => Code::OutOfRange,
        "Unimplemented" => Code::Unimplemented,
        "Internal" => Code::Internal,
        "Unavailable" => Code::Unavailable,
        "DataLoss" => Code::DataLoss,
        "Unauthenticated" => Code::Unauthenticated,
        _ => Code::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_reasons_become_statuses() {
        let s = cancel_status(
            "rpc error: code = PermissionDenied desc = etcdserver: permission denied",
        );
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(s.message(), "etcdserver: permission denied");
        // A tokenless call refused so: an etcd with --client-cert-auth asking for a login.
        assert!(needs_login(&s, true));
        assert!(!needs_login(&s, false));
        let s = cancel_status(
            "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token",
        );
        assert!(needs_login(&s, false));
        let s = cancel_status(
            "rpc error: code = InvalidArgument desc = etcdserver: user name is empty",
        );
        assert!(needs_login(&s, false));
        assert_eq!(
            cancel_status("etcdserver: permission denied").code(),
            Code::PermissionDenied
        );
        assert!(!needs_login(
            &Status::invalid_argument("etcdserver: key is not provided"),
            true
        ));
    }
}
