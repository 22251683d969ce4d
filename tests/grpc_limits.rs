//! gRPC limits as etcd has them: an oversized request message gets grpc-go's
//! `RESOURCE_EXHAUSTED` "grpc: received message larger than max (N vs. M)" on every route
//! (unary, the cached Range route, the Watch stream), and a Txn nested 50 to 128 deep is
//! accepted as etcd accepts it (prost's recursion limit refused it from 50 on); deeper ones
//! get etcd's "too many operations" answer.

use etcd_fanout::proto::etcdserverpb::request_op::Request as Op;
use etcd_fanout::proto::etcdserverpb::response_op::Response as OpResp;
use etcd_fanout::proto::etcdserverpb::{
    watch_request::RequestUnion, PutRequest, RangeRequest, RequestOp, TxnRequest, TxnResponse,
    WatchCreateRequest, WatchRequest,
};
use testkit::{Clients, Etcd, Proxy};
use tonic::Code;

fn nested(depth: usize) -> TxnRequest {
    let mut t = TxnRequest {
        success: vec![RequestOp {
            request: Some(Op::RequestRange(RangeRequest {
                key: "/apisix/a".into(),
                ..Default::default()
            })),
        }],
        ..Default::default()
    };
    for _ in 1..depth {
        t = TxnRequest {
            success: vec![RequestOp {
                request: Some(Op::RequestTxn(t)),
            }],
            ..Default::default()
        };
    }
    t
}

/// A `TxnRequest` nested `depth` deep, encoded from the inside out without recursion: each
/// level is `TxnRequest { success (2): RequestOp { request_txn (4): inner } }`.
fn deep_bytes(depth: usize) -> Vec<u8> {
    use prost::Message;
    let inner = nested(1).encode_to_vec();
    let mut prefixes = Vec::with_capacity(depth);
    let mut len = inner.len();
    for _ in 1..depth {
        let mut op = vec![4 << 3 | 2];
        prost::encoding::encode_varint(len as u64, &mut op);
        let op_len = op.len() + len;
        let mut prefix = vec![2 << 3 | 2];
        prost::encoding::encode_varint(op_len as u64, &mut prefix);
        prefix.extend_from_slice(&op);
        len += prefix.len();
        prefixes.push(prefix);
    }
    let mut out = Vec::with_capacity(len);
    for p in prefixes.iter().rev() {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(&inner);
    out
}

fn response_depth(r: &TxnResponse) -> usize {
    let mut depth = 1;
    let mut cur = r;
    while let Some(OpResp::ResponseTxn(inner)) =
        cur.responses.first().and_then(|o| o.response.as_ref())
    {
        depth += 1;
        cur = inner;
    }
    depth
}

async fn clients(url: &str) -> Clients {
    let mut c = Clients::connect(url).await;
    c.kv = c.kv.max_encoding_message_size(usize::MAX);
    c.watch = c.watch.max_encoding_message_size(usize::MAX);
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_messages_and_deep_txns_as_etcd() {
    let etcd = Etcd::start();
    let proxy = Proxy::start(&etcd.url, &["/apisix/"]);
    let mut sides = [
        ("etcd", clients(&etcd.url).await),
        ("proxy", clients(&proxy.url).await),
    ];
    let big = vec![b'x'; 3 << 20];
    let mut answers = Vec::new();
    for (who, c) in sides.iter_mut() {
        let put =
            c.kv.put(PutRequest {
                key: "/apisix/big".into(),
                value: big.clone().into(),
                ..Default::default()
            })
            .await
            .map(|_| ());
        let range =
            c.kv.range(RangeRequest {
                key: big.clone().into(),
                ..Default::default()
            })
            .await
            .map(|_| ());
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: big.clone().into(),
                ..Default::default()
            })),
        };
        let watch = match c.watch.watch(tokio_stream::iter(vec![create])).await {
            Ok(resp) => {
                let mut s = resp.into_inner();
                s.message().await.map(|_| ())
            }
            Err(e) => Err(e),
        };
        let show = |r: Result<(), tonic::Status>| match r {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("{:?}: {}", e.code(), e.message()),
        };
        answers.push((*who, show(put), show(range), show(watch)));
    }
    assert_eq!(answers[0].1, answers[1].1, "put: {answers:?}");
    assert_eq!(answers[0].2, answers[1].2, "range: {answers:?}");
    assert_eq!(answers[0].3, answers[1].3, "watch: {answers:?}");
    assert!(
        answers[1]
            .1
            .starts_with("ResourceExhausted: grpc: received message larger than max ("),
        "{answers:?}"
    );

    // Deep Txns: etcd accepts them, so does the proxy (and the answer nests as deep).
    for depth in [50, 100, 128] {
        for (who, c) in sides.iter_mut() {
            let r =
                c.kv.txn(nested(depth))
                    .await
                    .unwrap_or_else(|e| panic!("{who}: txn nested {depth} deep refused: {e:?}"));
            assert_eq!(response_depth(r.get_ref()), depth, "{who} {depth}");
        }
    }
    // Deeper: etcd's own refusal (forwarded, or the proxy's above its decoding bound).
    for depth in [129, 256, 400] {
        for (who, c) in sides.iter_mut() {
            let e = c.kv.txn(nested(depth)).await.expect_err("too deep");
            assert_eq!(e.code(), Code::InvalidArgument, "{who} {depth}: {e:?}");
            assert_eq!(
                e.message(),
                "etcdserver: too many operations in txn request",
                "{who} {depth}"
            );
        }
    }
    // Far deeper (encoded without recursion, 1.5 MiB): no stack is spent on it.
    for (who, url) in [("etcd", &etcd.url), ("proxy", &proxy.url)] {
        let e = testkit::diff::raw_unary(url, "/etcdserverpb.KV/Txn", deep_bytes(200_000))
            .await
            .expect_err("too deep");
        assert_eq!(e.code(), Code::InvalidArgument, "{who}: {e:?}");
        assert_eq!(
            e.message(),
            "etcdserver: too many operations in txn request",
            "{who}"
        );
    }
    sides[1]
        .1
        .kv
        .txn(nested(10))
        .await
        .expect("the proxy still serves");
}
