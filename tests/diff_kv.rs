//! Differential KV tests: the same Range/Put/DeleteRange/Txn/Compact scenario against a
//! reference etcd and against etcd-fanout in front of a second fresh etcd; transcripts must be
//! identical apart from cluster_id/member_id/raft_term.
//!
//! `ETCD_FANOUT_DIFF_SELFCHECK=1` replaces the proxy with a plain etcd (validates the tests).

use etcd_fanout::proto::etcdserverpb::{
    compare, request_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest,
};
use testkit::diff::*;

/// Ranges of every shape over the standard data set.
#[tokio::test(flavor = "multi_thread")]
async fn range_shapes_and_options() {
    let r = differential(
        "range_shapes_and_options",
        Opts::default(),
        |side, rec| async move {
            let mut kv = side.kv().await;
            populate(&mut kv, &rec).await;

            // single keys
            for k in [
                "/apisix/routes/1",
                "/apisix/routes/3",
                "/apisix/routes/",
                "/apisix/missing",
                "/apisix",
                "/other/x",
            ] {
                range(&mut kv, &rec, &format!("get {k}"), rr(k, b"")).await;
            }
            // prefixes (inside, sub-prefix, a key-prefix, outside, partly outside)
            for p in [
                "/apisix/",
                "/apisix/routes/",
                "/apisix/routes/1",
                "/apisix",
                "/other/",
                "/",
                "/nothing/",
            ] {
                range(&mut kv, &rec, &format!("prefix {p}"), rp(p)).await;
            }
            // explicit intervals, from-key, all keys
            for (k, e) in [
                ("/apisix/routes/1", &b"/apisix/routes/3"[..]),
                ("/apisix/", &b"/apisix/routes/"[..]),
                ("/apisix/routes/2", &b"/apisix/upstreams/2"[..]),
                ("/a", &b"/z"[..]),
                ("/apisix/", &b"\0"[..]),
                ("/apisix/services/", &b"\0"[..]),
                ("\0", &b"\0"[..]),
            ] {
                range(
                    &mut kv,
                    &rec,
                    &format!("interval {k:?}..{:?}", String::from_utf8_lossy(e)),
                    rr(k, e),
                )
                .await;
            }
            // keys_only / count_only
            range(
                &mut kv,
                &rec,
                "keys_only",
                RangeRequest {
                    keys_only: true,
                    ..rp("/apisix/")
                },
            )
            .await;
            range(
                &mut kv,
                &rec,
                "count_only",
                RangeRequest {
                    count_only: true,
                    ..rp("/apisix/")
                },
            )
            .await;
            range(
                &mut kv,
                &rec,
                "count_only+keys_only",
                RangeRequest {
                    count_only: true,
                    keys_only: true,
                    ..rp("/apisix/")
                },
            )
            .await;
            range(
                &mut kv,
                &rec,
                "count_only single",
                RangeRequest {
                    count_only: true,
                    ..rr("/apisix/routes/1", b"")
                },
            )
            .await;
            range(
                &mut kv,
                &rec,
                "count_only+limit",
                RangeRequest {
                    count_only: true,
                    limit: 2,
                    ..rp("/apisix/")
                },
            )
            .await;
            // limits (more + count)
            for limit in [0, 1, 2, 3, 7, 8, 100] {
                range(
                    &mut kv,
                    &rec,
                    &format!("limit {limit}"),
                    RangeRequest {
                        limit,
                        ..rp("/apisix/")
                    },
                )
                .await;
                range(
                    &mut kv,
                    &rec,
                    &format!("limit {limit} keys_only"),
                    RangeRequest {
                        limit,
                        keys_only: true,
                        ..rp("/apisix/routes/")
                    },
                )
                .await;
            }
            // sort orders x targets, with and without limit
            for order in 0..=2 {
                for target in 0..=4 {
                    for limit in [0, 3] {
                        range(
                            &mut kv,
                            &rec,
                            &format!("sort order={order} target={target} limit={limit}"),
                            RangeRequest {
                                sort_order: order,
                                sort_target: target,
                                limit,
                                ..rp("/apisix/")
                            },
                        )
                        .await;
                    }
                }
            }
            // revision filters
            for (mn, mx, cmn, cmx) in [
                (5, 0, 0, 0),
                (0, 5, 0, 0),
                (3, 9, 0, 0),
                (0, 0, 4, 0),
                (0, 0, 0, 4),
                (0, 0, 2, 8),
                (9, 0, 0, 8),
                (100, 0, 0, 0),
                (0, 0, 100, 0),
            ] {
                range(
                    &mut kv,
                    &rec,
                    &format!("filters min_mod={mn} max_mod={mx} min_create={cmn} max_create={cmx}"),
                    RangeRequest {
                        min_mod_revision: mn,
                        max_mod_revision: mx,
                        min_create_revision: cmn,
                        max_create_revision: cmx,
                        ..rp("/apisix/")
                    },
                )
                .await;
            }
            range(
                &mut kv,
                &rec,
                "filters+limit",
                RangeRequest {
                    min_mod_revision: 4,
                    limit: 2,
                    ..rp("/apisix/")
                },
            )
            .await;
            range(
                &mut kv,
                &rec,
                "filters+count_only",
                RangeRequest {
                    min_mod_revision: 4,
                    count_only: true,
                    ..rp("/apisix/")
                },
            )
            .await;
            // serializable
            range(
                &mut kv,
                &rec,
                "serializable",
                RangeRequest {
                    serializable: true,
                    ..rp("/apisix/")
                },
            )
            .await;
        },
    )
    .await;
    assert!(
        r.count("kvs: [") > 50,
        "scenario sanity: expected many non-empty ranges ({})",
        "see /tmp/etcd-fanout-diff/"
    );
    assert!(r.contains("more: true"));
}

/// Range at every past revision, at the current one, in the future, and around compactions
/// (one through the target, one made directly on the backing etcd).
#[tokio::test(flavor = "multi_thread")]
async fn range_revisions_and_compaction() {
    let r = differential(
        "range_revisions_and_compaction",
        Opts::default(),
        |side, rec| async move {
            let mut kv = side.kv().await;
            populate(&mut kv, &rec).await; // revision 16
            for rev in 0..=18 {
                range(
                    &mut kv,
                    &rec,
                    &format!("prefix at rev {rev}"),
                    RangeRequest {
                        revision: rev,
                        ..rp("/apisix/")
                    },
                )
                .await;
            }
            range(
                &mut kv,
                &rec,
                "single at rev 9",
                RangeRequest {
                    revision: 9,
                    ..rr("/apisix/routes/1", b"")
                },
            )
            .await;
            range(
                &mut kv,
                &rec,
                "count_only at rev 5",
                RangeRequest {
                    revision: 5,
                    count_only: true,
                    ..rp("/apisix/")
                },
            )
            .await;
            range(
                &mut kv,
                &rec,
                "limit at rev 7",
                RangeRequest {
                    revision: 7,
                    limit: 1,
                    ..rp("/apisix/")
                },
            )
            .await;
            range(
                &mut kv,
                &rec,
                "sorted at rev 12",
                RangeRequest {
                    revision: 12,
                    sort_order: 2,
                    sort_target: 3,
                    ..rp("/apisix/")
                },
            )
            .await;
            range(
                &mut kv,
                &rec,
                "outside prefix at rev 8",
                RangeRequest {
                    revision: 8,
                    ..rr("/other/x", b"")
                },
            )
            .await;

            // compaction through the target
            compact(&mut kv, &rec, 6, false).await;
            for rev in [1, 5, 6, 7, 16, 17] {
                range(
                    &mut kv,
                    &rec,
                    &format!("after compact 6: prefix at rev {rev}"),
                    RangeRequest {
                        revision: rev,
                        ..rp("/apisix/")
                    },
                )
                .await;
            }
            compact(&mut kv, &rec, 6, false).await; // again: error
            compact(&mut kv, &rec, 3, false).await; // older: error
            compact(&mut kv, &rec, 100, false).await; // future: error

            // more writes, then a compaction made directly on etcd, behind the proxy's back
            put(&mut kv, &rec, "/apisix/routes/4", "r4").await; // 17
            put(&mut kv, &rec, "/apisix/routes/4", "r4-v2").await; // 18
            let mut direct = side.etcd_kv().await;
            direct
                .compact(etcd_fanout::proto::etcdserverpb::CompactionRequest {
                    revision: 17,
                    physical: true,
                })
                .await
                .expect("direct compaction");
            for rev in [6, 16, 17, 18, 19] {
                range(
                    &mut kv,
                    &rec,
                    &format!("after direct compact 17: prefix at rev {rev}"),
                    RangeRequest {
                        revision: rev,
                        ..rp("/apisix/")
                    },
                )
                .await;
                range(
                    &mut kv,
                    &rec,
                    &format!("after direct compact 17: key at rev {rev}"),
                    RangeRequest {
                        revision: rev,
                        ..rr("/apisix/routes/4", b"")
                    },
                )
                .await;
            }
            range(
                &mut kv,
                &rec,
                "after direct compact: current",
                rp("/apisix/"),
            )
            .await;
        },
    )
    .await;
    assert!(
        r.contains("required revision has been compacted"),
        "{}",
        "see /tmp/etcd-fanout-diff/"
    );
    assert!(
        r.contains("required revision is a future revision"),
        "{}",
        "see /tmp/etcd-fanout-diff/"
    );
}

/// Linearizable reads through the target right after writes made directly to its etcd must
/// see those writes (same for deletes and for keys outside the cached prefixes).
#[tokio::test(flavor = "multi_thread")]
async fn linearizable_range_after_direct_write() {
    let r = differential(
        "linearizable_range_after_direct_write",
        Opts::default(),
        |side, rec| async move {
            let mut kv = side.kv().await;
            let mut direct = side.etcd_kv().await;
            let quiet = Rec::new(); // direct writes are not part of the transcript
            for i in 0..25 {
                let k = format!("/apisix/lin/{i:02}");
                put(&mut direct, &quiet, &k, &format!("v{i}")).await;
                range(
                    &mut kv,
                    &rec,
                    &format!("get {k} right after direct put"),
                    rr(&k, b""),
                )
                .await;
                range(
                    &mut kv,
                    &rec,
                    "count /apisix/lin/",
                    RangeRequest {
                        count_only: true,
                        ..rp("/apisix/lin/")
                    },
                )
                .await;
                if i % 5 == 4 {
                    del(
                        &mut direct,
                        &quiet,
                        &format!("/apisix/lin/{:02}", i - 2),
                        b"",
                        false,
                    )
                    .await;
                    range(
                        &mut kv,
                        &rec,
                        "prefix after direct delete",
                        RangeRequest {
                            keys_only: true,
                            ..rp("/apisix/lin/")
                        },
                    )
                    .await;
                }
            }
            // a key outside every cached prefix
            put(&mut direct, &quiet, "/elsewhere/k", "x").await;
            range(
                &mut kv,
                &rec,
                "outside prefix after direct put",
                rr("/elsewhere/k", b""),
            )
            .await;
            // a direct txn touching several keys
            direct
                .txn(TxnRequest {
                    success: vec![
                        op_put("/apisix/lin/t1", "a"),
                        op_put("/apisix/lin/t2", "b"),
                        RequestOp {
                            request: Some(request_op::Request::RequestDeleteRange(
                                DeleteRangeRequest {
                                    key: b("/apisix/lin/00"),
                                    ..Default::default()
                                },
                            )),
                        },
                    ],
                    ..Default::default()
                })
                .await
                .expect("direct txn");
            range(&mut kv, &rec, "prefix after direct txn", rp("/apisix/lin/")).await;
            // serializable read after waiting a little (may be stale only in theory; after 1 s the
            // cache must have caught up)
            put(&mut direct, &quiet, "/apisix/lin/ser", "s").await;
            tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
            range(
                &mut kv,
                &rec,
                "serializable 1s after direct put",
                RangeRequest {
                    serializable: true,
                    ..rr("/apisix/lin/ser", b"")
                },
            )
            .await;
        },
    )
    .await;
    assert_eq!(r.count("get /apisix/lin/"), 25);
    assert!(
        r.contains("b\"v24\""),
        "scenario sanity check failed; see the reference transcript in /tmp/etcd-fanout-diff/"
    );
}

fn op_put(k: &str, v: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: b(k),
            value: b(v),
            ..Default::default()
        })),
    }
}

fn op_range(req: RangeRequest) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(req)),
    }
}

fn op_del(k: &str, end: &[u8], prev_kv: bool) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            DeleteRangeRequest {
                key: b(k),
                range_end: bytes::Bytes::copy_from_slice(end),
                prev_kv,
            },
        )),
    }
}

/// Writes forwarded through the target: put (prev_kv, ignore_value, ignore_lease), delete
/// range (prev_kv), txns (success and failure branches, nested range), and the errors etcd gives.
#[tokio::test(flavor = "multi_thread")]
async fn writes_and_txns() {
    let r = differential("writes_and_txns", Opts::default(), |side, rec| async move {
        let mut kv = side.kv().await;
        populate(&mut kv, &rec).await;
        put_req(
            &mut kv,
            &rec,
            "put prev_kv existing",
            PutRequest {
                key: b("/apisix/routes/1"),
                value: b("p"),
                prev_kv: true,
                ..Default::default()
            },
        )
        .await;
        put_req(
            &mut kv,
            &rec,
            "put prev_kv new",
            PutRequest {
                key: b("/apisix/routes/9"),
                value: b("p"),
                prev_kv: true,
                ..Default::default()
            },
        )
        .await;
        put_req(
            &mut kv,
            &rec,
            "put ignore_value",
            PutRequest {
                key: b("/apisix/routes/9"),
                ignore_value: true,
                prev_kv: true,
                ..Default::default()
            },
        )
        .await;
        put_req(
            &mut kv,
            &rec,
            "put ignore_value missing key",
            PutRequest {
                key: b("/apisix/routes/none"),
                ignore_value: true,
                ..Default::default()
            },
        )
        .await;
        put_req(
            &mut kv,
            &rec,
            "put ignore_value with value",
            PutRequest {
                key: b("/apisix/routes/9"),
                value: b("x"),
                ignore_value: true,
                ..Default::default()
            },
        )
        .await;
        put_req(
            &mut kv,
            &rec,
            "put ignore_lease with lease",
            PutRequest {
                key: b("/apisix/routes/9"),
                value: b("x"),
                ignore_lease: true,
                lease: 5,
                ..Default::default()
            },
        )
        .await;
        put_req(
            &mut kv,
            &rec,
            "put unknown lease",
            PutRequest {
                key: b("/apisix/routes/9"),
                value: b("x"),
                lease: 12345,
                ..Default::default()
            },
        )
        .await;
        put_req(
            &mut kv,
            &rec,
            "put empty key",
            PutRequest {
                key: b(""),
                value: b("x"),
                ..Default::default()
            },
        )
        .await;
        put_req(
            &mut kv,
            &rec,
            "put empty value",
            PutRequest {
                key: b("/apisix/empty"),
                ..Default::default()
            },
        )
        .await;
        range(&mut kv, &rec, "get empty value", rr("/apisix/empty", b"")).await;

        del(
            &mut kv,
            &rec,
            "/apisix/routes/",
            &range_end("/apisix/routes/"),
            true,
        )
        .await;
        del(
            &mut kv,
            &rec,
            "/apisix/routes/",
            &range_end("/apisix/routes/"),
            true,
        )
        .await; // nothing left
        del(&mut kv, &rec, "/apisix/missing", b"", false).await;
        let r = kv.delete_range(DeleteRangeRequest::default()).await;
        rec.res("delete empty key", r);

        // txn: compare mod_revision equal (APISIX-style)
        let cmp = |k: &str, rev: i64| Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Mod as i32,
            key: b(k),
            range_end: Default::default(),
            target_union: Some(compare::TargetUnion::ModRevision(rev)),
        };
        txn(
            &mut kv,
            &rec,
            "txn success",
            TxnRequest {
                compare: vec![cmp("/apisix/upstreams/1", 5)],
                success: vec![
                    op_put("/apisix/upstreams/1", "u1-v2"),
                    op_put("/apisix/upstreams/2", "u2"),
                    op_range(rp("/apisix/upstreams/")),
                ],
                failure: vec![op_range(rr("/apisix/upstreams/1", b""))],
            },
        )
        .await;
        txn(
            &mut kv,
            &rec,
            "txn failure",
            TxnRequest {
                compare: vec![cmp("/apisix/upstreams/1", 5)],
                success: vec![op_put("/apisix/upstreams/1", "never")],
                failure: vec![
                    op_range(rr("/apisix/upstreams/1", b"")),
                    op_del("/apisix/services/", &range_end("/apisix/services/"), true),
                ],
            },
        )
        .await;
        txn(&mut kv, &rec, "txn empty", TxnRequest::default()).await;
        txn(
            &mut kv,
            &rec,
            "txn version compare + nested",
            TxnRequest {
                compare: vec![Compare {
                    result: compare::CompareResult::Greater as i32,
                    target: compare::CompareTarget::Version as i32,
                    key: b("/apisix/upstreams/1"),
                    range_end: Default::default(),
                    target_union: Some(compare::TargetUnion::Version(0)),
                }],
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestTxn(TxnRequest {
                        success: vec![op_put("/apisix/nested", "n")],
                        ..Default::default()
                    })),
                }],
                failure: vec![],
            },
        )
        .await;
        txn(
            &mut kv,
            &rec,
            "txn duplicate put (error)",
            TxnRequest {
                success: vec![op_put("/apisix/dup", "1"), op_put("/apisix/dup", "2")],
                ..Default::default()
            },
        )
        .await;
        txn(
            &mut kv,
            &rec,
            "txn value compare on range",
            TxnRequest {
                compare: vec![Compare {
                    result: compare::CompareResult::NotEqual as i32,
                    target: compare::CompareTarget::Value as i32,
                    key: b("/apisix/"),
                    range_end: range_end("/apisix/"),
                    target_union: Some(compare::TargetUnion::Value(b("zzz"))),
                }],
                success: vec![op_range(rp("/apisix/"))],
                failure: vec![op_range(RangeRequest {
                    count_only: true,
                    ..rp("/apisix/")
                })],
            },
        )
        .await;
        range(&mut kv, &rec, "final state", rr("\0", b"\0")).await;
    })
    .await;
    assert!(r.contains("succeeded: true"));
    assert!(
        r.contains("etcdserver: key is not provided"),
        "{}",
        "see /tmp/etcd-fanout-diff/"
    );
}

/// The comparison itself: normalisation keeps real differences and the diff names them.
#[test]
fn diff_helper_detects_mismatch() {
    let a = vec![
        normalize("get: RangeResponse {\n    header: Some(\n        ResponseHeader {\n            cluster_id: 11,\n            member_id: 22,\n            revision: 5,\n            raft_term: 2,\n        },\n    ),\n    count: 1,\n}"),
        "same".to_string(),
    ];
    let mut b = a.clone();
    assert!(std::panic::catch_unwind(|| assert_same("selftest_equal", &a, &b, "")).is_ok());
    let other_ids = normalize(&a[0].replace("<n>", "999"));
    assert!(other_ids.contains("revision: 5"));
    b[0] = a[0].replace("revision: 5", "revision: 6");
    b.push("extra".to_string());
    let err = std::panic::catch_unwind(|| assert_same("selftest_differs", &a, &b, ""))
        .expect_err("a differing transcript must fail");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        msg.contains("- ") && msg.contains("revision: 5") && msg.contains("revision: 6"),
        "{msg}"
    );
    assert!(msg.contains("+ extra"), "{msg}");
    let c = vec![a[0].replace("count: 1", "count: 2"), "same".to_string()];
    assert!(std::panic::catch_unwind(|| assert_same("selftest_count", &a, &c, "")).is_err());
}

/// Writes outside the cached prefix still move etcd's revision: every answer about the
/// prefix (range header, count_only, range at the current revision) must carry etcd's
/// current revision, not the prefix's last one.
#[tokio::test(flavor = "multi_thread")]
async fn header_revision_after_writes_outside_prefix() {
    let r = differential(
        "header_revision_after_writes_outside_prefix",
        Opts::default(),
        |side, rec| async move {
            let mut kv = side.kv().await;
            let mut direct = side.etcd_kv().await;
            let quiet = Rec::new();
            put(&mut kv, &rec, "/apisix/routes/1", "a").await; // 2
            put(&mut kv, &rec, "/other/1", "x").await; // 3 via target
            range(
                &mut kv,
                &rec,
                "prefix after 1 outside write",
                rp("/apisix/"),
            )
            .await;
            put(&mut direct, &quiet, "/other/2", "y").await; // 4 directly
            put(&mut direct, &quiet, "/other/3", "z").await; // 5 directly
            range(
                &mut kv,
                &rec,
                "prefix after 2 direct outside writes",
                rp("/apisix/"),
            )
            .await;
            range(&mut kv, &rec, "single key", rr("/apisix/routes/1", b"")).await;
            range(
                &mut kv,
                &rec,
                "count_only",
                RangeRequest {
                    count_only: true,
                    ..rp("/apisix/")
                },
            )
            .await;
            range(
                &mut kv,
                &rec,
                "at rev 5",
                RangeRequest {
                    revision: 5,
                    ..rp("/apisix/")
                },
            )
            .await;
            range(
                &mut kv,
                &rec,
                "at rev 6 (future)",
                RangeRequest {
                    revision: 6,
                    ..rp("/apisix/")
                },
            )
            .await;
            range(
                &mut kv,
                &rec,
                "serializable",
                RangeRequest {
                    serializable: true,
                    ..rp("/apisix/")
                },
            )
            .await;
            // a range straddling the cached prefix and the rest
            range(
                &mut kv,
                &rec,
                "straddling",
                rr("/apisix/routes/", b"/other/2"),
            )
            .await;
            range(
                &mut kv,
                &rec,
                "straddling sorted desc limit 2",
                RangeRequest {
                    sort_order: 2,
                    limit: 2,
                    ..rr("/apisix/routes/", b"/other/9")
                },
            )
            .await;
        },
    )
    .await;
    assert!(r.contains("revision: 5"), "see /tmp/etcd-fanout-diff/");
}

/// Two cached prefixes: ranges and txns spanning both, and the prefix between them.
#[tokio::test(flavor = "multi_thread")]
async fn two_prefixes_ranges() {
    let opts = Opts::default().prefixes(&["/apisix/", "/other/"]);
    let r = differential("two_prefixes_ranges", opts, |side, rec| async move {
        let mut kv = side.kv().await;
        populate(&mut kv, &rec).await;
        txn(
            &mut kv,
            &rec,
            "txn over both prefixes",
            TxnRequest {
                success: vec![
                    op_put("/apisix/x", "1"),
                    op_put("/other/y", "2"),
                    op_put("/between", "3"),
                ],
                ..Default::default()
            },
        )
        .await;
        for (label, req) in [
            ("everything", rr("\0", b"\0")),
            ("/ prefix", rp("/")),
            ("spanning both", rr("/apisix/", b"/other/z")),
            (
                "spanning both, limit 3",
                RangeRequest {
                    limit: 3,
                    ..rr("/apisix/", b"/other/z")
                },
            ),
            (
                "spanning both, count_only",
                RangeRequest {
                    count_only: true,
                    ..rr("/apisix/", b"/other/z")
                },
            ),
            (
                "spanning both at rev 10",
                RangeRequest {
                    revision: 10,
                    ..rr("/apisix/", b"/other/z")
                },
            ),
            ("other prefix", rp("/other/")),
            (
                "other prefix sorted by mod desc",
                RangeRequest {
                    sort_order: 2,
                    sort_target: 3,
                    ..rp("/other/")
                },
            ),
            ("between", rr("/between", b"")),
        ] {
            range(&mut kv, &rec, label, req).await;
        }
    })
    .await;
    assert!(r.contains("/between"), "see /tmp/etcd-fanout-diff/");
}
