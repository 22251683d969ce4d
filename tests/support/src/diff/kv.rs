//! KV helpers of the scenarios: put, delete, range, txn and compact with every answer recorded
//! in the transcript, and the standard APISIX-like data set.

use bytes::Bytes;
use etcd_fanout::proto::etcdserverpb::{
    kv_client::KvClient, CompactionRequest, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use tonic::transport::Channel;

use super::transcript::Rec;
use super::{b, range_end};

pub type Kv = KvClient<Channel>;

pub async fn put(kv: &mut Kv, rec: &Rec, k: &str, v: &str) -> Option<PutResponse> {
    let r = kv
        .put(PutRequest {
            key: b(k),
            value: b(v),
            ..Default::default()
        })
        .await;
    rec.res(&format!("put {k}={v}"), r)
}

pub async fn put_req(kv: &mut Kv, rec: &Rec, label: &str, req: PutRequest) -> Option<PutResponse> {
    let r = kv.put(req).await;
    rec.res(label, r)
}

/// Deletes `[k, end)` (`end` empty = the single key).
pub async fn del(
    kv: &mut Kv,
    rec: &Rec,
    k: &str,
    end: &[u8],
    prev_kv: bool,
) -> Option<DeleteRangeResponse> {
    let r = kv
        .delete_range(DeleteRangeRequest {
            key: b(k),
            range_end: Bytes::copy_from_slice(end),
            prev_kv,
        })
        .await;
    rec.res(
        &format!("delete {k}..{:?}", String::from_utf8_lossy(end)),
        r,
    )
}

pub async fn range(
    kv: &mut Kv,
    rec: &Rec,
    label: &str,
    req: RangeRequest,
) -> Option<RangeResponse> {
    let r = kv.range(req).await;
    rec.res(label, r)
}

/// Range of a single key or `[k, end)`.
pub fn rr(k: &str, end: &[u8]) -> RangeRequest {
    RangeRequest {
        key: b(k),
        range_end: Bytes::copy_from_slice(end),
        ..Default::default()
    }
}

/// Range of every key under `prefix`.
pub fn rp(prefix: &str) -> RangeRequest {
    RangeRequest {
        key: b(prefix),
        range_end: range_end(prefix),
        ..Default::default()
    }
}

pub async fn txn(kv: &mut Kv, rec: &Rec, label: &str, req: TxnRequest) -> Option<TxnResponse> {
    let r = kv.txn(req).await;
    rec.res(label, r)
}

pub async fn compact(kv: &mut Kv, rec: &Rec, rev: i64, physical: bool) {
    let r = kv
        .compact(CompactionRequest {
            revision: rev,
            physical,
        })
        .await;
    rec.res(&format!("compact {rev} physical={physical}"), r);
}

/// The current store revision (from a range answer, not recorded).
pub async fn current_rev(kv: &mut Kv) -> i64 {
    kv.range(RangeRequest {
        key: b("\0"),
        count_only: true,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().header.map(|h| h.revision).unwrap_or(-1))
    .unwrap_or(-1)
}

/// The standard data set: a few APISIX-like keys, some rewritten, one deleted and recreated,
/// plus keys just outside `/apisix/`. 15 writes: ends at revision 16 on a fresh etcd.
pub async fn populate(kv: &mut Kv, rec: &Rec) {
    for (k, v) in [
        ("/apisix/routes/1", "r1"),
        ("/apisix/routes/2", "r2"),
        ("/apisix/routes/3", "r3"),
        ("/apisix/upstreams/1", "u1"),
        ("/apisix/routes/2", "r2-v2"),
        ("/apisix/services/1", "s1"),
        ("/other/x", "ox"),
        ("/apisix/routes/10", "r10"),
        ("/apisix/routes/1", "r1-v2"),
    ] {
        put(kv, rec, k, v).await;
    }
    del(kv, rec, "/apisix/routes/3", b"", false).await;
    for (k, v) in [
        ("/apisix/routes/3", "r3-new"),
        ("/apisix/consumers/a", "zzz"),
        ("/apisix0", "just past the prefix"),
        ("/apisix", "the prefix without slash"),
        ("/apisix/routes/1", "r1-v3"),
    ] {
        put(kv, rec, k, v).await;
    }
}
