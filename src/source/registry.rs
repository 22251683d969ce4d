//! Discovery, as `etcd grpc-proxy start` does it (`--advertise-client-url`,
//! `--resolver-prefix`, `--resolver-ttl`): each replica registers its client URL in etcd under
//! a lease it keeps alive, watches the registrations of every replica, and answers
//! `Cluster.MemberList` with them. etcd's Go client with endpoint auto-sync replaces its
//! endpoints with `MemberList`'s client URLs; through a replica that would otherwise be etcd's
//! own URLs, and such clients would silently bypass the proxy tier.
//!
//! The registration is grpc-proxy 3.4's (`clientv3/naming`), so both kinds of proxy can share
//! a prefix: key `PREFIX/URL`, value `{"Op":0,"Addr":URL,"Metadata":"{\"name\":HOST}"}`.
//! `MemberList` follows grpc-proxy's rules: with a prefix and at least one registration
//! known, one member per registration (`name` from its metadata, ID 0, the URL as its only
//! client URL); otherwise this replica alone (its host name and advertised URL). Unlike
//! grpc-proxy's answer, it carries a response header (etcd's always does; `etcdctl -w fields`
//! crashes on grpc-proxy's). The lease is revoked when the replica starts draining (SIGTERM),
//! so a terminating replica leaves the list at once; one that dies leaves after the TTL.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio_stream::StreamExt;

use crate::config::Config;
use crate::keys::KeyRange;
use crate::metrics;
use crate::proto::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, Member, MemberListResponse,
    PutRequest, RangeRequest, ResponseHeader, WatchCreateRequest,
};
use crate::proto::mvccpb::event::EventType;
use crate::source::upstream::Upstream;
use crate::tasks::Tasks;

/// Pause before retrying after a failure (grpc-proxy retries once a second).
const RETRY: Duration = Duration::from_secs(1);

/// This replica's registration and the registrations of all replicas.
#[derive(Debug)]
pub struct Registry {
    /// This replica's advertised client URL.
    url: String,
    /// Host name: the registration's `name`.
    hostname: String,
    /// Key prefix of the registrations (`None`: advertise the URL alone, register nothing).
    prefix: Option<String>,
    /// TTL of the registration's lease, in seconds.
    ttl: i64,
    /// Live registrations known: client URL -> name.
    members: Mutex<BTreeMap<String, String>>,
    /// The lease of this replica's registration (0 while there is none).
    lease: AtomicI64,
    /// True once the replica deregistered (draining): it does not register again.
    stopped: AtomicBool,
}

/// A registration's value (grpc-proxy 3.4's `naming.Update`).
#[derive(Debug, PartialEq)]
struct Update {
    /// 0: add (1, delete, is never stored).
    op: i64,
    /// The client URL.
    addr: String,
    /// The member name from the metadata (`{"name": ...}`).
    name: String,
}

impl Update {
    /// The JSON grpc-proxy writes.
    fn encode(addr: &str, name: &str) -> String {
        let quote = |s: &str| serde_json::Value::from(s).to_string();
        let meta = format!(r#"{{"name":{}}}"#, quote(name));
        format!(
            r#"{{"Op":0,"Addr":{},"Metadata":{}}}"#,
            quote(addr),
            quote(&meta)
        )
    }

    /// Reads a registration (`None` if it is not one).
    fn decode(value: &[u8]) -> Option<Update> {
        let v: serde_json::Value = serde_json::from_slice(value).ok()?;
        let meta = v["Metadata"]
            .as_str()
            .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok());
        Some(Update {
            op: v["Op"].as_i64().unwrap_or(0),
            addr: v["Addr"].as_str()?.to_string(),
            name: meta
                .as_ref()
                .and_then(|m| m["name"].as_str())
                .unwrap_or_default()
                .to_string(),
        })
    }
}

/// The host name, as Go's `os.Hostname` reads it on Linux.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "etcd-fanout".to_string())
}

impl Registry {
    /// The registry the flags ask for, if any (`--advertise-client-url`).
    pub fn from_config(config: &Config) -> Option<Arc<Registry>> {
        let url = config.advertise_client_url.clone()?;
        Some(Arc::new(Registry {
            url,
            hostname: hostname(),
            prefix: config
                .resolver_prefix
                .clone()
                .filter(|p| !p.is_empty())
                .map(|p| p.trim_end_matches('/').to_string()),
            ttl: config.resolver_ttl.max(1),
            members: Mutex::new(BTreeMap::new()),
            lease: AtomicI64::new(0),
            stopped: AtomicBool::new(false),
        }))
    }

    /// Starts registering and following the registrations (with a prefix), owned by `tasks`.
    pub fn spawn(self: &Arc<Self>, upstream: Arc<Upstream>, tasks: &Tasks) {
        if self.prefix.is_none() {
            return;
        }
        tasks.spawn(self.clone().keep_registered(upstream.clone()));
        tasks.spawn(self.clone().follow(upstream));
    }

    /// The key of this replica's registration.
    fn key(&self, prefix: &str) -> String {
        format!("{prefix}/{}", self.url)
    }

    /// `MemberList`'s answer (grpc-proxy's rules, see the module doc) under `header`.
    pub fn member_list(&self, header: ResponseHeader) -> MemberListResponse {
        let registered: Vec<Member> = if self.prefix.is_some() {
            let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
            members
                .iter()
                .map(|(url, name)| Member {
                    name: name.clone(),
                    client_ur_ls: vec![url.clone()],
                    ..Default::default()
                })
                .collect()
        } else {
            Vec::new()
        };
        let members = if registered.is_empty() {
            vec![Member {
                name: self.hostname.clone(),
                client_ur_ls: vec![self.url.clone()],
                ..Default::default()
            }]
        } else {
            registered
        };
        MemberListResponse {
            header: Some(header),
            members,
        }
    }

    /// Revokes this replica's registration and stops renewing it (the replica drains).
    pub async fn deregister(&self, upstream: &Upstream) {
        self.stopped.store(true, Ordering::Release);
        let lease = self.lease.swap(0, Ordering::AcqRel);
        if lease == 0 {
            return;
        }
        // Bounded: the shutdown delay runs meanwhile, and the lease expires anyway.
        match tokio::time::timeout(Duration::from_secs(2), revoke(upstream, lease)).await {
            Ok(Ok(_)) => tracing::info!(url = %self.url, "deregistered from the resolver prefix"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "deregistration failed; the registration expires with its lease")
            }
            Err(_) => {
                tracing::warn!("deregistration timed out; the registration expires with its lease")
            }
        }
    }

    /// Registers under a lease and keeps it alive; registers again when the lease is lost.
    async fn keep_registered(self: Arc<Self>, upstream: Arc<Upstream>) {
        let mut logged = false;
        while !self.stopped.load(Ordering::Acquire) {
            match self.register_once(&upstream, &mut logged).await {
                Ok(()) => {
                    tracing::warn!(url = %self.url, "registration lease lost; registering again")
                }
                Err(e) if !logged => {
                    tracing::warn!(error = %e, url = %self.url, "registration failed; retrying");
                    logged = true;
                }
                Err(e) => tracing::debug!(error = %e, "registration failed; retrying"),
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// One registration: grant, put, keep alive until the lease is lost (`Ok`) or a call
    /// fails (`Err`).
    async fn register_once(
        &self,
        upstream: &Upstream,
        logged: &mut bool,
    ) -> Result<(), tonic::Status> {
        let Some(prefix) = self.prefix.as_deref() else {
            return Ok(());
        };
        let ticket = upstream.credentials().ticket(upstream).await;
        metrics::Upstream::Registry.inc();
        let grant = upstream
            .lease()
            .lease_grant(ticket.request(LeaseGrantRequest {
                ttl: self.ttl,
                id: 0,
            }))
            .await?
            .into_inner();
        let lease = grant.id;
        self.lease.store(lease, Ordering::Release);
        metrics::Upstream::Registry.inc();
        upstream
            .kv()
            .put(ticket.request(PutRequest {
                key: Bytes::from(self.key(prefix)),
                value: Bytes::from(Update::encode(&self.url, &self.hostname)),
                lease,
                ..Default::default()
            }))
            .await?;
        if self.stopped.load(Ordering::Acquire) {
            // Drained meanwhile: the registration must not outlive the replica's drain.
            self.deregister_lease(upstream, lease).await;
            return Ok(());
        }
        tracing::info!(url = %self.url, prefix, ttl = self.ttl, "registered in the resolver prefix");
        *logged = false;
        // Keep-alives every third of the TTL, as clientv3's `KeepAlive`.
        let every = Duration::from_secs((self.ttl / 3).max(1) as u64);
        let requests = futures::stream::unfold(true, move |first| async move {
            if !first {
                tokio::time::sleep(every).await;
            }
            Some((LeaseKeepAliveRequest { id: lease }, false))
        });
        let mut md = tonic::metadata::MetadataMap::new();
        ticket.insert(&mut md);
        let mut req = tonic::Request::new(requests);
        *req.metadata_mut() = md;
        metrics::Upstream::Registry.inc();
        let mut answers = upstream.lease().lease_keep_alive(req).await?.into_inner();
        while let Some(answer) = answers.next().await {
            if answer?.ttl <= 0 {
                // Expired (etcd unreachable for longer than the TTL): register again.
                return Ok(());
            }
            if self.stopped.load(Ordering::Acquire) {
                return Ok(());
            }
        }
        Err(tonic::Status::unavailable("lease keep-alive stream ended"))
    }

    /// Revokes `lease` if it is still this replica's registration.
    async fn deregister_lease(&self, upstream: &Upstream, lease: i64) {
        if self
            .lease
            .compare_exchange(lease, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let _ = revoke(upstream, lease).await;
        }
    }

    /// Follows the registrations: a range of the prefix, then a watch from the next revision;
    /// again after any failure.
    async fn follow(self: Arc<Self>, upstream: Arc<Upstream>) {
        loop {
            if let Err(e) = self.follow_once(&upstream).await {
                tracing::debug!(error = %e, "following the resolver prefix failed; retrying");
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    async fn follow_once(&self, upstream: &Upstream) -> Result<(), tonic::Status> {
        let Some(prefix) = self.prefix.as_deref() else {
            return Ok(());
        };
        let range = KeyRange::prefix(format!("{prefix}/").as_bytes());
        let resp = upstream
            .own_range(
                metrics::Upstream::Registry,
                RangeRequest {
                    key: range.start.clone(),
                    range_end: range.range_end(),
                    ..Default::default()
                },
            )
            .await?;
        let revision = resp.header.as_ref().map_or(0, |h| h.revision);
        {
            let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
            members.clear();
            for kv in &resp.kvs {
                if let Some(u) = Update::decode(&kv.value).filter(|u| u.op == 0) {
                    members.insert(u.addr, u.name);
                }
            }
        }
        let mut watch = upstream
            .own_watch(
                metrics::Upstream::Registry,
                WatchCreateRequest {
                    key: range.start.clone(),
                    range_end: range.range_end(),
                    start_revision: revision + 1,
                    prev_kv: true,
                    ..Default::default()
                },
            )
            .await?;
        while let Some(resp) = watch.message().await? {
            if resp.canceled {
                return Err(tonic::Status::unavailable(resp.cancel_reason));
            }
            let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
            for ev in &resp.events {
                let put = ev.r#type == EventType::Put as i32;
                let value = if put {
                    ev.kv.as_ref().map(|kv| &kv.value)
                } else {
                    ev.prev_kv.as_ref().map(|kv| &kv.value)
                };
                let Some(u) = value.and_then(|v| Update::decode(v)) else {
                    continue;
                };
                if put && u.op == 0 {
                    members.insert(u.addr, u.name);
                } else {
                    members.remove(&u.addr);
                }
            }
        }
        Err(tonic::Status::unavailable("resolver watch ended"))
    }
}

/// Revokes `lease` on etcd with the proxy's own credentials.
async fn revoke(upstream: &Upstream, lease: i64) -> Result<(), tonic::Status> {
    let ticket = upstream.credentials().ticket(upstream).await;
    metrics::Upstream::Registry.inc();
    upstream
        .lease()
        .lease_revoke(ticket.request(LeaseRevokeRequest { id: lease }))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_is_grpc_proxys() {
        // What etcd 3.4.23's grpc-proxy wrote (read back with etcdctl).
        let theirs = br#"{"Op":0,"Addr":"127.0.0.1:42399","Metadata":"{\"name\":\"vm\"}"}"#;
        let v = Update::encode("127.0.0.1:42399", "vm");
        assert_eq!(v.as_bytes(), theirs);
        let want = Update {
            op: 0,
            addr: "127.0.0.1:42399".into(),
            name: "vm".into(),
        };
        assert_eq!(Update::decode(theirs), Some(want));
        assert_eq!(Update::decode(v.as_bytes()), Update::decode(theirs));
        assert_eq!(Update::decode(b"not json"), None);
    }
}
