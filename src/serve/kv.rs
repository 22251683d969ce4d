//! The KV service: Range from the cache when a feed covers the keys, everything else
//! (writes, transactions, compaction, ranges outside every prefix) forwarded to etcd.
//!
//! [`answer_range`] reproduces etcd's `applierV3backend.Range` over a list of key-values
//! (filters, sort, limit, `more`, `count`, `keys_only`, `count_only`), so a cached answer is
//! byte-for-byte what etcd would have sent.

use std::cmp::Ordering as CmpOrdering;
use std::sync::Arc;

use prost::Message;

use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::error::Error;
use crate::keys::KeyRange;
use crate::metrics;
use crate::proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::proto::etcdserverpb::*;
use crate::proto::mvccpb::KeyValue;
use crate::serve::access::{Access, Verdict};
use crate::serve::shield;
use crate::source::feed::Feed;
use crate::source::hub::Hub;
use crate::source::upstream::{forward, requires_leader};

/// Go's `sort.Sort` is an insertion sort (stable) up to this many elements; above it, the
/// order of equal elements is etcd's own, so such sorts are forwarded.
const GO_STABLE_SORT_MAX: usize = 12;

/// Serves the KV service.
#[derive(Debug, Clone)]
pub struct KvService {
    /// Feeds and upstream.
    hub: Arc<Hub>,
    /// Recent range answers of each feed (same order as [`Hub::feeds`]), shared by identical
    /// reads.
    memos: Arc<[RangeMemo]>,
    /// etcd's decisions for callers of cached ranges.
    access: Arc<Access>,
}

impl KvService {
    /// A KV service over `hub`, checking callers with `access`.
    pub fn new(hub: Arc<Hub>, access: Arc<Access>) -> Self {
        let memos = hub.feeds().iter().map(|_| RangeMemo::default()).collect();
        KvService { hub, memos, access }
    }

    /// The range memo of `feed`.
    fn memo(&self, feed: &Feed) -> Option<&RangeMemo> {
        let i = self
            .hub
            .feeds()
            .iter()
            .position(|f| std::ptr::eq(Arc::as_ptr(f), feed))?;
        self.memos.get(i)
    }

    /// Answers a range, from the cache when possible.
    pub async fn range_request(
        &self,
        metadata: &MetadataMap,
        req: RangeRequest,
    ) -> Result<RangeResponse, Error> {
        Ok(self.range_answer(metadata, req).await?.into_response())
    }

    /// Answers a range; a cached answer keeps its shared, pre-encoded body.
    pub async fn range_answer(
        &self,
        metadata: &MetadataMap,
        req: RangeRequest,
    ) -> Result<RangeAnswer, Error> {
        shield::check_range(&req)?;
        let range = KeyRange::new(&req.key, &req.range_end);
        let mut cached = self
            .hub
            .feed_for(&range)
            .filter(|f| f.is_ready() && !current_count(&req));
        if let Some(feed) = cached {
            if req.serializable && requires_leader(metadata) && feed.health.is_stale() {
                // A member cut off from its cluster refuses callers that require a leader,
                // before anything else (etcd's interceptor, ahead of its auth check).
                return Err(Error::NoLeader);
            }
        }
        if let Some(feed) = cached {
            // etcd's permission check comes before the read (and its revision errors).
            match self
                .access
                .check(metadata, &req.key, &req.range_end, true, Some(&feed.range))
                .await
            {
                Verdict::Serve => {}
                Verdict::Refuse(e) => return Err(e),
                Verdict::Forward => cached = None,
            }
        }
        if let Some(feed) = cached {
            if let Some(answer) = self.range_cached(feed, &range, &req).await? {
                metrics::RANGES_CACHED.inc();
                return Ok(answer);
            }
        }
        metrics::RANGES_FORWARDED.inc();
        let resp = self
            .hub
            .upstream
            .kv()
            .range(forward(metadata, req))
            .instrument(tracing::debug_span!("forward", method = "Range"))
            .await
            .inspect_err(|s| self.access.observe_status(s))?;
        self.hub
            .upstream
            .observe_header(resp.get_ref().header.as_ref());
        Ok(RangeAnswer::Forwarded(resp.into_inner()))
    }

    /// The cached answer, or `None` when only etcd can answer (the caller forwards).
    async fn range_cached(
        &self,
        feed: &Feed,
        range: &KeyRange,
        req: &RangeRequest,
    ) -> Result<Option<RangeAnswer>, Error> {
        let sync = if req.serializable {
            None
        } else {
            match feed.linearize().await {
                Some(p) => Some(p),
                None => return Ok(None),
            }
        };
        let head = feed.cache().head();
        // `base`: revision whose cached state is read; `report`: etcd's current revision.
        // Between the two nothing in the prefix changed (see `Feed::sync_check`).
        let (base, report) = match sync {
            Some(p) if p.read_at > 0 => (p.read_at, p.report),
            _ => (head, feed.verified_revision(head)),
        };
        let at = if req.revision > 0 {
            if req.revision > report {
                if req.serializable {
                    return Ok(None);
                }
                return Err(Error::FutureRevision);
            }
            if feed.compaction().is_compacted(req.revision) {
                return Err(Error::Compacted);
            }
            if req.revision < head {
                // A compaction made directly on etcd may not be known yet: ask (historical
                // reads are rare, so one small request each is cheap).
                match feed
                    .compaction()
                    .probe_range(feed.upstream(), req.revision)
                    .await
                {
                    Ok(true) => return Err(Error::Compacted),
                    Ok(false) => {}
                    // Not the caller's answer (e.g. the proxy's own read refused): let etcd
                    // answer the caller.
                    Err(_) => return Ok(None),
                }
                return Ok(self.read_at(feed, range, req, req.revision.min(base), report));
            }
            req.revision.min(base)
        } else {
            base
        };
        Ok(self.read_at(feed, range, req, at, report))
    }

    /// Answers `req` from the cache state at revision `at`, reporting `report` in the header.
    /// The state at a revision never changes, so the answer body is memoized per request and
    /// revision and shared by identical reads (a restart storm of full-prefix ranges).
    fn read_at(
        &self,
        feed: &Feed,
        range: &KeyRange,
        req: &RangeRequest,
        at: i64,
        report: i64,
    ) -> Option<RangeAnswer> {
        let header = feed.upstream().header(report);
        let key = RangeRequest {
            revision: at,
            serializable: false,
            ..req.clone()
        }
        .encode_to_vec();
        let memo = self.memo(feed);
        if let Some(body) = memo.and_then(|m| m.get(&key)) {
            return Some(RangeAnswer::Cached(header, body));
        }
        let kvs = feed.cache().kvs_at(range, at)?;
        let resp = answer_range(req, kvs, ResponseHeader::default())?;
        let body = Arc::new(RangeBody::new(RangeResponse {
            header: None,
            ..resp
        }));
        if let Some(memo) = memo {
            memo.put(key, body.clone());
        }
        Some(RangeAnswer::Cached(header, body))
    }
}

/// A range answer: made from the cache (a fresh header and a shared body) or etcd's own.
#[derive(Debug, Clone)]
pub enum RangeAnswer {
    /// From the cache.
    Cached(ResponseHeader, Arc<RangeBody>),
    /// Forwarded to etcd.
    Forwarded(RangeResponse),
}

impl RangeAnswer {
    /// The answer as a message.
    pub fn into_response(self) -> RangeResponse {
        match self {
            RangeAnswer::Cached(header, body) => RangeResponse {
                header: Some(header),
                ..body.response.clone()
            },
            RangeAnswer::Forwarded(r) => r,
        }
    }

    /// Writes the answer as an encoded RangeResponse: the header, then the shared body.
    pub fn encode_to<B: bytes::BufMut>(&self, buf: &mut B) -> Result<(), prost::EncodeError> {
        match self {
            RangeAnswer::Cached(header, body) => {
                RangeResponse {
                    header: Some(*header),
                    ..Default::default()
                }
                .encode(buf)?;
                buf.put_slice(&body.proto);
                Ok(())
            }
            RangeAnswer::Forwarded(r) => r.encode(buf),
        }
    }
}

/// The part of a cached range answer that does not depend on the header: the message and
/// its encoding (fields `kvs`, `more`, `count`, which follow the header on the wire).
#[derive(Debug)]
pub struct RangeBody {
    /// The answer without header.
    pub response: RangeResponse,
    /// `response` encoded.
    pub proto: bytes::Bytes,
    /// The JSON of the same fields (for the HTTP gateway), made by the first JSON answer.
    json: std::sync::OnceLock<bytes::Bytes>,
}

impl RangeBody {
    fn new(response: RangeResponse) -> RangeBody {
        let proto = response.encode_to_vec().into();
        RangeBody {
            response,
            proto,
            json: std::sync::OnceLock::new(),
        }
    }

    /// The JSON of the body's fields, written by `write` the first time it is asked for.
    pub fn json(&self, write: fn(&mut Vec<u8>, &RangeResponse)) -> bytes::Bytes {
        self.json
            .get_or_init(|| {
                let mut out = Vec::with_capacity(self.proto.len() * 3 / 2 + 64);
                write(&mut out, &self.response);
                out.into()
            })
            .clone()
    }

    /// Bytes this body may hold: its protobuf and, once made, its JSON (base64 makes that
    /// about 1.4 times larger).
    fn cost(&self) -> usize {
        self.proto.len() * 5 / 2
    }
}

/// Recently answered range bodies of one feed, by request and revision: small, bounded in
/// entries and bytes, oldest dropped first.
#[derive(Debug, Default)]
pub struct RangeMemo {
    /// `(request bytes with the revision read, body)`, newest last.
    entries: std::sync::Mutex<std::collections::VecDeque<(Vec<u8>, Arc<RangeBody>)>>,
}

/// Most memoized range bodies per feed.
const RANGE_MEMO_ENTRIES: usize = 16;
/// Most bytes of memoized range bodies per feed.
const RANGE_MEMO_BYTES: usize = 64 << 20;

impl RangeMemo {
    /// The memoized body for `key`.
    pub fn get(&self, key: &[u8]) -> Option<Arc<RangeBody>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .iter()
            .rev()
            .find(|(k, _)| k.as_slice() == key)
            .map(|(_, b)| b.clone())
    }

    /// Remembers `body` for `key`, dropping the oldest entries beyond the bounds.
    pub fn put(&self, key: Vec<u8>, body: Arc<RangeBody>) {
        if body.cost() > RANGE_MEMO_BYTES {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.push_back((key, body));
        let mut bytes: usize = entries.iter().map(|(_, b)| b.cost()).sum();
        while entries.len() > RANGE_MEMO_ENTRIES || bytes > RANGE_MEMO_BYTES {
            match entries.pop_front() {
                Some((_, b)) => bytes -= b.cost(),
                None => break,
            }
        }
    }
}

/// etcd's Range semantics over the live key-values of the requested range (sorted by key).
/// Returns `None` when etcd's answer depends on its unstable sort (caller forwards).
pub fn answer_range(
    req: &RangeRequest,
    mut kvs: Vec<KeyValue>,
    header: ResponseHeader,
) -> Option<RangeResponse> {
    let count = kvs.len() as i64;
    if req.count_only {
        return Some(RangeResponse {
            header: Some(header),
            kvs: Vec::new(),
            more: false,
            count,
        });
    }
    let filtered = req.max_mod_revision != 0
        || req.min_mod_revision != 0
        || req.max_create_revision != 0
        || req.min_create_revision != 0;
    if req.sort_order == SortOrder::None as i32 && !filtered && req.limit > 0 {
        // etcd reads only limit+1 keys (in key order) when no sort order is given, and then
        // sorts just those by a non-key target.
        kvs.truncate(req.limit as usize + 1);
    }
    if req.max_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision <= req.max_mod_revision);
    }
    if req.min_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision >= req.min_mod_revision);
    }
    if req.max_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision <= req.max_create_revision);
    }
    if req.min_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision >= req.min_create_revision);
    }
    let target = SortTarget::try_from(req.sort_target).ok();
    let mut order = SortOrder::try_from(req.sort_order).ok();
    if target != Some(SortTarget::Key) && order == Some(SortOrder::None) {
        order = Some(SortOrder::Ascend);
    }
    if matches!(order, Some(SortOrder::Ascend | SortOrder::Descend)) {
        let cmp: fn(&KeyValue, &KeyValue) -> CmpOrdering = match target {
            Some(SortTarget::Key) => |a, b| a.key.cmp(&b.key),
            Some(SortTarget::Version) => |a, b| a.version.cmp(&b.version),
            Some(SortTarget::Create) => |a, b| a.create_revision.cmp(&b.create_revision),
            Some(SortTarget::Mod) => |a, b| a.mod_revision.cmp(&b.mod_revision),
            Some(SortTarget::Value) => |a, b| a.value.cmp(&b.value),
            // etcd has no sorter for an unknown target; let it answer.
            None => return None,
        };
        if target != Some(SortTarget::Key) && kvs.len() > GO_STABLE_SORT_MAX {
            return None;
        }
        if order == Some(SortOrder::Ascend) {
            kvs.sort_by(cmp);
        } else {
            kvs.sort_by(|a, b| cmp(b, a));
        }
    }
    let mut more = false;
    if req.limit > 0 && kvs.len() > req.limit as usize {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    if req.keys_only {
        for kv in &mut kvs {
            kv.value = Default::default();
        }
    }
    Some(RangeResponse {
        header: Some(header),
        kvs,
        more,
        count,
    })
}

#[tonic::async_trait]
impl kv_server::Kv for KvService {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        Ok(Response::new(self.range_request(&metadata, req).await?))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let resp = self
            .hub
            .upstream
            .kv()
            .put(forward(&metadata, req))
            .instrument(tracing::debug_span!("forward", method = "Put"))
            .await?;
        self.hub
            .upstream
            .observe_header(resp.get_ref().header.as_ref());
        Ok(Response::new(resp.into_inner()))
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let resp = self
            .hub
            .upstream
            .kv()
            .delete_range(forward(&metadata, req))
            .instrument(tracing::debug_span!("forward", method = "DeleteRange"))
            .await?;
        self.hub
            .upstream
            .observe_header(resp.get_ref().header.as_ref());
        Ok(Response::new(resp.into_inner()))
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        shield::check_txn(&req)?;
        let resp = self
            .hub
            .upstream
            .kv()
            .txn(forward(&metadata, req))
            .instrument(tracing::debug_span!("forward", method = "Txn"))
            .await?;
        self.hub
            .upstream
            .observe_header(resp.get_ref().header.as_ref());
        Ok(Response::new(resp.into_inner()))
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let rev = req.revision;
        let resp = self
            .hub
            .upstream
            .kv()
            .compact(forward(&metadata, req))
            .instrument(tracing::debug_span!("forward", method = "Compact"))
            .await?;
        self.hub
            .upstream
            .observe_header(resp.get_ref().header.as_ref());
        self.hub.compaction.observe(rev);
        Ok(Response::new(resp.into_inner()))
    }
}

/// A linearizable `count_only` Range at the current revision. etcd answers it from its index
/// with one request, which is what answering it from the cache costs too (the sync check's
/// `count_only` Range), without the check's wait for events in flight and its probe: it is
/// forwarded. It is what a lower tier's revision clock asks (`source::clock`), so creates on
/// lower replicas do not queue behind an upper replica's per-prefix sync checks.
fn current_count(req: &RangeRequest) -> bool {
    req.count_only && !req.serializable && req.revision == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::proto::testing::kv;

    fn keys(r: &RangeResponse) -> Vec<String> {
        r.kvs
            .iter()
            .map(|k| String::from_utf8_lossy(&k.key).to_string())
            .collect()
    }

    fn sample() -> Vec<KeyValue> {
        vec![
            kv("a", "3", 2, 9, 4),
            kv("b", "1", 3, 3, 1),
            kv("c", "2", 4, 7, 2),
        ]
    }

    #[test]
    fn limit_more_count() {
        let req = RangeRequest {
            limit: 2,
            ..Default::default()
        };
        let r = answer_range(&req, sample(), Default::default()).unwrap();
        assert_eq!(keys(&r), ["a", "b"]);
        assert!(r.more);
        assert_eq!(r.count, 3);
        let req = RangeRequest {
            limit: -5,
            ..Default::default()
        };
        let r = answer_range(&req, sample(), Default::default()).unwrap();
        assert_eq!(r.kvs.len(), 3);
        assert!(!r.more);
    }

    #[test]
    fn sorts_and_filters() {
        let req = RangeRequest {
            sort_target: SortTarget::Mod as i32,
            ..Default::default()
        };
        let r = answer_range(&req, sample(), Default::default()).unwrap();
        assert_eq!(
            keys(&r),
            ["b", "c", "a"],
            "non-key target defaults to ascending"
        );
        let req = RangeRequest {
            sort_target: SortTarget::Value as i32,
            sort_order: SortOrder::Descend as i32,
            ..Default::default()
        };
        let r = answer_range(&req, sample(), Default::default()).unwrap();
        assert_eq!(keys(&r), ["a", "c", "b"]);
        let req = RangeRequest {
            min_mod_revision: 4,
            keys_only: true,
            ..Default::default()
        };
        let r = answer_range(&req, sample(), Default::default()).unwrap();
        assert_eq!(keys(&r), ["a", "c"]);
        assert!(r.kvs.iter().all(|k| k.value.is_empty()));
        assert_eq!(r.count, 3, "count is taken before filters");
    }

    #[test]
    fn count_only() {
        let req = RangeRequest {
            count_only: true,
            limit: 1,
            ..Default::default()
        };
        let r = answer_range(&req, sample(), Default::default()).unwrap();
        assert!(r.kvs.is_empty() && !r.more);
        assert_eq!(r.count, 3);
    }

    #[test]
    fn shared_body_encodes_like_the_message() {
        let resp = answer_range(&RangeRequest::default(), sample(), Default::default()).unwrap();
        let body = Arc::new(RangeBody::new(RangeResponse {
            header: None,
            ..resp
        }));
        let header = ResponseHeader {
            cluster_id: 1,
            member_id: 2,
            revision: 42,
            raft_term: 3,
        };
        let answer = RangeAnswer::Cached(header, body.clone());
        let mut wire = Vec::new();
        answer.encode_to(&mut wire).unwrap();
        assert_eq!(wire, answer.clone().into_response().encode_to_vec());
        assert_eq!(answer.into_response().header.unwrap().revision, 42);

        let memo = RangeMemo::default();
        for i in 0..(RANGE_MEMO_ENTRIES + 3) {
            memo.put(vec![i as u8], body.clone());
        }
        assert!(memo.get(&[0]).is_none(), "oldest entries are dropped");
        assert!(memo.get(&[(RANGE_MEMO_ENTRIES + 2) as u8]).is_some());
    }

    #[test]
    fn unstable_sorts_are_left_to_etcd() {
        let many: Vec<KeyValue> = (0..13)
            .map(|i| kv(&format!("k{i:02}"), "v", 1, 1, 1))
            .collect();
        let req = RangeRequest {
            sort_target: SortTarget::Value as i32,
            ..Default::default()
        };
        assert!(answer_range(&req, many.clone(), Default::default()).is_none());
        let req = RangeRequest {
            sort_order: SortOrder::Descend as i32,
            ..Default::default()
        };
        let r = answer_range(&req, many, Default::default()).unwrap();
        assert_eq!(keys(&r)[0], "k12");
    }
}
