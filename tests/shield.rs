//! Requests that crash etcd 3.4.23 are refused by the proxy with etcd 3.5's answer and never
//! reach etcd: an invalid `sort_target` in a Range (with any `sort_order`), over gRPC and the JSON
//! gateway, directly and inside (nested) Txn operations, for cached and forwarded keys.
//! After each attack etcd must still be alive and answering.

use std::time::Duration;

use etcd_fanout::proto::etcdserverpb::request_op::Request as Op;
use etcd_fanout::proto::etcdserverpb::{PutRequest, RangeRequest, RequestOp, TxnRequest};
use testkit::{http, Clients, Etcd, Proxy};
use tonic::Code;

const SORT_ERR: &str = "etcdserver: invalid sort option";

fn bad_range(key: &str, target: i32, order: i32) -> RangeRequest {
    RangeRequest {
        key: key.as_bytes().to_vec().into(),
        range_end: testkit::range_end(key),
        sort_target: target,
        sort_order: order,
        ..Default::default()
    }
}

fn op(r: Op) -> RequestOp {
    RequestOp { request: Some(r) }
}

/// etcd answers a plain read directly, its process is running and its log shows no panic.
async fn assert_etcd_alive(etcd: &mut Etcd, after: &str) {
    let mut direct = Clients::connect(&etcd.url).await;
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        direct.kv.range(RangeRequest {
            key: "/apisix/a".into(),
            ..Default::default()
        }),
    )
    .await;
    assert!(
        matches!(r, Ok(Ok(_))),
        "etcd stopped answering after {after}: {r:?}\n{}",
        etcd.log()
    );
    assert!(
        !etcd.log().contains("panic"),
        "etcd panicked after {after}\n{}",
        etcd.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_sort_options_never_reach_etcd() {
    let mut etcd = Etcd::start();
    let proxy = Proxy::start(&etcd.url, &["/apisix/"]);
    let mut c = Clients::connect(&proxy.url).await;
    for k in ["/apisix/a", "/apisix/b", "/other/a", "/other/b"] {
        c.kv.put(PutRequest {
            key: k.into(),
            value: "v".into(),
            ..Default::default()
        })
        .await
        .expect("put");
    }

    // Range over gRPC: cached prefix and forwarded keys, bad target and bad order.
    for key in ["/apisix/", "/other/"] {
        for (target, order) in [(99, 1), (99, 0), (5, 2), (-1, 1), (7, 9), (-3, -7)] {
            let e =
                c.kv.range(bad_range(key, target, order))
                    .await
                    .expect_err("invalid sort accepted");
            assert_eq!(e.code(), Code::InvalidArgument, "{key} {target} {order}");
            assert_eq!(e.message(), SORT_ERR, "{key} {target} {order}");
            assert_etcd_alive(&mut etcd, &format!("range {key} {target}/{order}")).await;
        }
    }

    // Txn over gRPC: a write txn with a bad range (etcd would panic in its apply loop, then
    // on every restart), in success and failure, and nested 20 deep.
    let write = op(Op::RequestPut(PutRequest {
        key: "/apisix/w".into(),
        value: "x".into(),
        ..Default::default()
    }));
    let mut txns = vec![
        TxnRequest {
            success: vec![
                write.clone(),
                op(Op::RequestRange(bad_range("/apisix/", 99, 1))),
            ],
            ..Default::default()
        },
        TxnRequest {
            failure: vec![op(Op::RequestRange(bad_range("/other/", 7, 2)))],
            ..Default::default()
        },
    ];
    let mut nested = TxnRequest {
        success: vec![
            write.clone(),
            op(Op::RequestRange(bad_range("/other/", 99, 2))),
        ],
        ..Default::default()
    };
    for _ in 0..20 {
        nested = TxnRequest {
            success: vec![op(Op::RequestTxn(nested))],
            ..Default::default()
        };
    }
    txns.push(nested);
    for (i, t) in txns.into_iter().enumerate() {
        let e = c.kv.txn(t).await.expect_err("invalid sort accepted in txn");
        assert_eq!(e.code(), Code::InvalidArgument, "txn {i}");
        assert_eq!(e.message(), SORT_ERR, "txn {i}");
        assert_etcd_alive(&mut etcd, &format!("txn {i}")).await;
    }

    // The JSON gateway: the same refusals with grpc-gateway's status and error body.
    let bodies = [
        (
            "/v3/kv/range",
            r#"{"key":"L2FwaXNpeC8=","range_end":"L2FwaXNpeDA=","sort_target":99,"sort_order":"ASCEND"}"#,
        ),
        ("/v3/kv/range", r#"{"key":"L290aGVyLw==","sort_target":5}"#),
        (
            "/v3/kv/txn",
            r#"{"success":[{"request_put":{"key":"L2FwaXNpeC93","value":"eA=="}},{"request_range":{"key":"L2FwaXNpeC8=","sort_target":99,"sort_order":1}}]}"#,
        ),
        (
            "/v3/kv/txn",
            r#"{"failure":[{"request_txn":{"success":[{"request_range":{"key":"L290aGVyLw==","sort_target":42}}]}}]}"#,
        ),
    ];
    for (path, body) in bodies {
        let r = http::post(proxy.port, path, body);
        assert_eq!(r.status, 400, "{path} {body}: {}", r.text());
        let j = r.json();
        assert_eq!(j["error"], SORT_ERR, "{}", r.text());
        assert_eq!(j["message"], SORT_ERR, "{}", r.text());
        assert_eq!(j["code"], 3, "{}", r.text());
        assert_etcd_alive(&mut etcd, &format!("POST {path} {body}")).await;
    }

    // An unknown sort order with a known target is etcd 3.4's to answer (unsorted, no harm).
    for key in ["/apisix/", "/other/"] {
        let r =
            c.kv.range(bad_range(key, 1, 7))
                .await
                .expect("etcd 3.4 answers it");
        assert_eq!(r.get_ref().kvs.len(), 2, "{key}");
    }
    assert_etcd_alive(&mut etcd, "an unknown sort order").await;

    // Valid sorts still work, and through the proxy etcd still answers.
    let r =
        c.kv.range(bad_range("/other/", 4, 2))
            .await
            .expect("valid sort");
    assert_eq!(r.get_ref().kvs.len(), 2);
    let ok = c.kv.txn(TxnRequest {
        success: vec![write, op(Op::RequestRange(bad_range("/other/", 3, 1)))],
        ..Default::default()
    });
    ok.await.expect("valid txn");
    assert_etcd_alive(&mut etcd, "the valid requests").await;
}
