//! History backfill: after a (re)start the proxy fetches recent history back from etcd, so a
//! client resuming from a revision shortly before the restart is replayed from memory (no
//! catch-up watch on etcd) and gets exactly the events etcd would give it.

use std::time::Duration;

use bytes::Bytes;
use etcd_fanout::proto::etcdserverpb::{
    watch_request::RequestUnion, PutRequest, WatchCreateRequest, WatchRequest, WatchResponse,
};
use testkit::{metric_value, Clients, Etcd, Proxy};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// The events (revision, key) a watch from `start` on /apisix/ delivers within `window`.
async fn replay(url: &str, start: i64, window: Duration) -> Vec<(i64, String)> {
    let mut c = Clients::connect(url).await;
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: Bytes::from_static(b"/apisix/"),
            range_end: Bytes::from_static(b"/apisix0"),
            start_revision: start,
            ..Default::default()
        })),
    })
    .expect("send");
    let mut stream = c
        .watch
        .watch(UnboundedReceiverStream::new(rx))
        .await
        .expect("watch")
        .into_inner();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Ok(Some(m))) = tokio::time::timeout_at(deadline, stream.message()).await {
        let m: WatchResponse = m;
        for e in m.events {
            let kv = e.kv.expect("kv");
            got.push((
                kv.mod_revision,
                String::from_utf8_lossy(&kv.key).to_string(),
            ));
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread")]
async fn resuming_after_a_restart_is_served_from_memory() {
    let etcd = Etcd::start();
    let mut direct = Clients::connect(&etcd.url).await;
    let mut first = 0;
    for i in 0..30 {
        // Interleave writes outside the prefix: the backfill must keep only the prefix's.
        let key = if i % 3 == 0 {
            format!("/other/{i}")
        } else {
            format!("/apisix/routes/{i}")
        };
        let rev = direct
            .kv
            .put(PutRequest {
                key: Bytes::from(key),
                value: Bytes::from_static(b"v"),
                ..Default::default()
            })
            .await
            .expect("put")
            .into_inner()
            .header
            .expect("header")
            .revision;
        if i == 10 {
            first = rev;
        }
    }
    // The proxy starts after the writes: its load revision is after `first`.
    let proxy = Proxy::start(&etcd.url, &["/apisix/"]);
    let backfilled = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        proxy.log().contains("history backfilled")
    });
    assert!(backfilled, "no backfill:\n{}", proxy.log());

    let want = replay(&etcd.url, first, Duration::from_millis(800)).await;
    let got = replay(&proxy.url, first, Duration::from_millis(800)).await;
    // i = 10..30 without multiples of 3: 14 puts under /apisix/.
    assert_eq!(
        want.len(),
        14,
        "events of /apisix/ from revision {first}: {want:?}"
    );
    assert_eq!(got, want);
    assert_eq!(
        metric_value(&proxy.metrics(), "etcd_fanout_watch_catchups_total"),
        0.0,
        "replayed from the backfilled window, not from etcd"
    );
}
