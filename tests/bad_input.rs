//! Differential bad-input tests: odd or invalid requests must get exactly etcd's answer
//! (gRPC code AND message, or the same response) through the proxy.
//!
//! Not diffed: `RangeRequest.sort_target` outside 0..=4 with a sort order — etcd 3.4.23 panics
//! on it (nil sorter) and the whole server process dies; the proxy refuses it as etcd 3.5
//! does (`tests/shield.rs`).
//!
//! `ETCD_FANOUT_DIFF_SELFCHECK=1` replaces the proxy with a plain etcd (validates the tests).

use std::time::Duration;

use etcd_fanout::proto::etcdserverpb::{
    RangeRequest, RangeResponse, WatchCreateRequest, WatchResponse,
};
use prost::Message;
use testkit::diff::*;

const QUIET: Duration = Duration::from_millis(400);

/// Range requests etcd accepts oddly or rejects, inside and outside the cached prefix.
#[tokio::test(flavor = "multi_thread")]
async fn range_bad_inputs() {
    let r = differential(
        "range_bad_inputs",
        Opts::default(),
        |side, rec| async move {
            let mut kv = side.kv().await;
            populate(&mut kv, &rec).await;
            for base in ["/apisix/", "/other/"] {
                let p = rp(base);
                let cases: Vec<(&str, RangeRequest)> = vec![
                    ("empty key", rr("", b"")),
                    ("empty key with range_end", rr("", b"/apisix0")),
                    ("empty key with range_end \\0", rr("", b"\0")),
                    (
                        "range_end < key",
                        RangeRequest {
                            key: p.range_end.clone(),
                            range_end: p.key.clone(),
                            ..Default::default()
                        },
                    ),
                    (
                        "range_end == key",
                        RangeRequest {
                            key: p.key.clone(),
                            range_end: p.key.clone(),
                            ..Default::default()
                        },
                    ),
                    (
                        "limit -1",
                        RangeRequest {
                            limit: -1,
                            ..p.clone()
                        },
                    ),
                    (
                        "limit i64::MIN",
                        RangeRequest {
                            limit: i64::MIN,
                            ..p.clone()
                        },
                    ),
                    (
                        "limit i64::MAX",
                        RangeRequest {
                            limit: i64::MAX,
                            ..p.clone()
                        },
                    ),
                    (
                        "limit -1 count_only",
                        RangeRequest {
                            limit: -1,
                            count_only: true,
                            ..p.clone()
                        },
                    ),
                    (
                        "revision -1",
                        RangeRequest {
                            revision: -1,
                            ..p.clone()
                        },
                    ),
                    (
                        "revision i64::MIN",
                        RangeRequest {
                            revision: i64::MIN,
                            ..p.clone()
                        },
                    ),
                    (
                        "revision i64::MAX",
                        RangeRequest {
                            revision: i64::MAX,
                            ..p.clone()
                        },
                    ),
                    (
                        "revision current+1",
                        RangeRequest {
                            revision: 17,
                            ..p.clone()
                        },
                    ),
                    (
                        "sort_order 7",
                        RangeRequest {
                            sort_order: 7,
                            ..p.clone()
                        },
                    ),
                    (
                        "sort_order -1 target VERSION",
                        RangeRequest {
                            sort_order: -1,
                            sort_target: 1,
                            ..p.clone()
                        },
                    ),
                    (
                        "sort_order 3 target MOD",
                        RangeRequest {
                            sort_order: 3,
                            sort_target: 3,
                            ..p.clone()
                        },
                    ),
                    (
                        "max_mod_revision -1",
                        RangeRequest {
                            max_mod_revision: -1,
                            ..p.clone()
                        },
                    ),
                    (
                        "min_mod_revision -3",
                        RangeRequest {
                            min_mod_revision: -3,
                            ..p.clone()
                        },
                    ),
                    (
                        "max_create_revision -1",
                        RangeRequest {
                            max_create_revision: -1,
                            ..p.clone()
                        },
                    ),
                    (
                        "min_mod > max_mod",
                        RangeRequest {
                            min_mod_revision: 10,
                            max_mod_revision: 5,
                            ..p.clone()
                        },
                    ),
                    ("single key \\0", rr("\0", b"")),
                    (
                        "keys_only + count_only + limit",
                        RangeRequest {
                            keys_only: true,
                            count_only: true,
                            limit: 1,
                            ..p.clone()
                        },
                    ),
                    (
                        "serializable + revision",
                        RangeRequest {
                            serializable: true,
                            revision: 5,
                            ..p.clone()
                        },
                    ),
                ];
                for (label, req) in cases {
                    range(&mut kv, &rec, &format!("{base}: {label}"), req).await;
                }
            }
            // non-UTF-8 and long keys
            let mut k = b"/apisix/bin/".to_vec();
            k.extend_from_slice(&[0xff, 0x00, 0xfe]);
            let r = kv
                .put(etcd_fanout::proto::etcdserverpb::PutRequest {
                    key: bytes::Bytes::from(k.clone()),
                    value: bytes::Bytes::from_static(&[0, 1, 2, 0xff]),
                    ..Default::default()
                })
                .await;
            rec.res("put binary key", r);
            range(
                &mut kv,
                &rec,
                "get binary key",
                RangeRequest {
                    key: bytes::Bytes::from(k),
                    ..Default::default()
                },
            )
            .await;
            range(&mut kv, &rec, "prefix with binary key", rp("/apisix/bin/")).await;
            let long = format!("/apisix/long/{}", "k".repeat(5000));
            put(&mut kv, &Rec::new(), &long, "v").await;
            let r = kv.range(rp("/apisix/long/")).await.map(|r| {
                let m = r.into_inner();
                (
                    m.count,
                    m.kvs.iter().map(|kv| kv.key.len()).collect::<Vec<_>>(),
                )
            });
            rec.note(format!("long key: {:?}", r.map_err(|s| status_str(&s))));
        },
    )
    .await;
    assert!(r.contains("etcdserver: key is not provided"));
    assert!(r.contains("required revision is a future revision"));
}

/// Odd watch requests on one stream, then one write to see which watches are live.
#[tokio::test(flavor = "multi_thread")]
async fn watch_bad_inputs() {
    let r = differential(
        "watch_bad_inputs",
        Opts::default(),
        |side, rec| async move {
            let mut kv = side.kv().await;
            populate(&mut kv, &rec).await;
            let mut w = side.watch().await;
            let c = |k: &str, end: &str| WatchCreateRequest {
                key: b(k),
                range_end: b(end),
                ..Default::default()
            };
            w.cancel(42);
            w.quiet(&rec, "cancel unknown id on a fresh stream", QUIET)
                .await;
            w.progress();
            w.expect(&rec, "stream alive after bogus cancel", 1).await;
            w.send_raw_empty();
            w.quiet(&rec, "empty WatchRequest ignored", QUIET).await;
            w.create(WatchCreateRequest {
                start_revision: -5,
                ..c("/apisix/c", "")
            });
            w.expect(&rec, "negative start_revision", 2).await;
            w.create(c("/apisix/b", "/apisix/a"));
            w.expect(&rec, "range_end < key", 1).await;
            w.create(c("/apisix/b", "/apisix/b"));
            w.expect(&rec, "range_end == key", 1).await;
            w.create(WatchCreateRequest {
                watch_id: -7,
                ..c("/apisix/c", "")
            });
            w.expect(&rec, "negative client watch_id", 1).await;
            w.create(WatchCreateRequest {
                watch_id: -7,
                ..c("/apisix/c", "")
            });
            w.expect(&rec, "negative client watch_id duplicate", 1)
                .await;
            w.create(WatchCreateRequest {
                watch_id: 3,
                ..c("/apisix/c", "")
            });
            w.expect(&rec, "client id 3", 1).await;
            w.create(WatchCreateRequest {
                watch_id: 3,
                ..c("/apisix/c", "/apisix/d")
            });
            w.expect(&rec, "client id 3 duplicate", 1).await;
            w.create(WatchCreateRequest {
                filters: vec![7, -1],
                ..c("/apisix/c", "")
            });
            w.expect(&rec, "unknown filter values", 1).await;
            w.create(WatchCreateRequest {
                start_revision: i64::MAX,
                ..c("/apisix/c", "")
            });
            w.expect(&rec, "start_revision i64::MAX", 1).await;
            w.create(WatchCreateRequest {
                start_revision: 1_000_000,
                ..c("/apisix/", "/apisix0")
            });
            w.expect(&rec, "start_revision 1e6 (future)", 1).await;
            w.create(c("", ""));
            w.expect(&rec, "empty key", 1).await;
            w.create(c("", "\0"));
            w.expect(&rec, "empty key, range_end \\0 (everything)", 1)
                .await;
            w.cancel(-1);
            w.quiet(&rec, "cancel -1", QUIET).await;
            w.cancel(i64::MAX);
            w.quiet(&rec, "cancel i64::MAX", QUIET).await;
            w.progress();
            w.expect(&rec, "progress", 1).await;
            put(&mut kv, &rec, "/apisix/c", "x").await;
            // live: -7, 3, filters, everything (the negative-start watch was canceled)
            w.expect(&rec, "put /apisix/c", 4).await;
            w.quiet(&rec, "nothing else", QUIET).await;
            // a second stream: future start revision waits, then delivers
            let mut w2 = side.watch().await;
            w2.create(WatchCreateRequest {
                start_revision: 19,
                ..c("/apisix/", "/apisix0")
            });
            w2.expect(&rec, "w2 start 19 created", 1).await;
            put(&mut kv, &rec, "/apisix/d", "18").await;
            w2.quiet(&rec, "w2: 18 not delivered", QUIET).await;
            put(&mut kv, &rec, "/apisix/d", "19").await;
            w2.expect(&rec, "w2: 19 delivered", 1).await;
        },
    )
    .await;
    assert!(r.contains("mvcc: watcher range is empty"));
    assert!(r.contains("duplicate watch ID"));
    assert!(r.contains("compact_revision: -1"));
}

fn decode_range(v: &[u8]) -> String {
    match RangeResponse::decode(v) {
        Ok(m) => normalize(&format!("{m:#?}")),
        Err(e) => format!("undecodable response: {e}"),
    }
}

/// Malformed protobuf bodies sent raw, unknown methods and services.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_protobuf() {
    let r = differential(
        "malformed_protobuf",
        Opts::default(),
        |side, rec| async move {
            let mut kv = side.kv().await;
            populate(&mut kv, &rec).await;
            let bodies: Vec<(&str, Vec<u8>)> = vec![
                ("garbage", vec![0xff, 0xff, 0xff]),
                ("truncated key", vec![0x0a, 0x05, b'/']),
                ("wrong wire type for key", vec![0x08, 0x01]),
                (
                    "unknown field (ignored)",
                    vec![
                        0x0a, 0x10, b'/', b'a', b'p', b'i', b's', b'i', b'x', b'/', b'r', b'o',
                        b'u', b't', b'e', b's', b'/', b'1', 0x98, 0x06, 0x01,
                    ],
                ),
                ("empty body (empty key)", vec![]),
                ("prefix range, encoded by hand", {
                    let mut v = vec![0x0a, 8];
                    v.extend_from_slice(b"/apisix/");
                    v.push(0x12);
                    v.push(8);
                    v.extend_from_slice(b"/apisix0");
                    v
                }),
            ];
            for (label, body) in bodies {
                let r = raw_unary(&side.url, "/etcdserverpb.KV/Range", body).await;
                rec.note(format!(
                    "raw Range {label}: {}",
                    match r {
                        Ok(v) => decode_range(&v),
                        Err(s) => status_str(&s),
                    }
                ));
            }
            for (label, path) in [
                ("unknown method", "/etcdserverpb.KV/Nope"),
                ("unknown service", "/foo.Bar/Nope"),
                ("known service, other package", "/etcdserverpb.Foo/Range"),
            ] {
                let r = raw_unary(&side.url, path, vec![]).await;
                rec.note(format!(
                    "{label}: {:?}",
                    r.map(|v| v.len()).map_err(|s| status_str(&s))
                ));
            }
            for (label, frames) in [
                ("garbage frame", vec![vec![0xff, 0xff]]),
                ("valid progress frame", vec![vec![0x1a, 0x00]]),
            ] {
                let r = raw_streaming(
                    &side.url,
                    "/etcdserverpb.Watch/Watch",
                    frames,
                    Duration::from_secs(2),
                )
                .await;
                let (msgs, status) = r;
                for m in msgs {
                    match WatchResponse::decode(&m[..]) {
                        Ok(w) => rec.push(&format!("raw Watch {label}: message"), &w),
                        Err(e) => rec.note(format!("raw Watch {label}: undecodable message: {e}")),
                    }
                }
                rec.note(format!(
                    "raw Watch {label}: end: {:?}",
                    status.map(|s| status_str(&s))
                ));
            }
        },
    )
    .await;
    assert!(
        r.contains("error unmarshalling request"),
        "see /tmp/etcd-fanout-diff/"
    );
    assert!(
        r.contains("unknown service foo.Bar"),
        "see /tmp/etcd-fanout-diff/"
    );
}
