//! Periodic progress notifications (`progress_notify`), which etcd sends every 10 minutes and
//! the proxy every `--progress-interval`: only to watches that asked, only when caught up, and
//! only after an interval without events, with the header at the revision reached.

use std::time::Duration;

use bytes::Bytes;
use etcd_fanout::proto::etcdserverpb::{
    watch_request::RequestUnion, PutRequest, WatchCreateRequest, WatchRequest, WatchResponse,
};
use testkit::{Clients, Etcd, Proxy};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

fn create(watch_id: i64, progress_notify: bool) -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: Bytes::from_static(b"/apisix/"),
            range_end: Bytes::from_static(b"/apisix0"),
            watch_id,
            progress_notify,
            ..Default::default()
        })),
    }
}

/// Every message received within `window`.
async fn collect(
    stream: &mut tonic::Streaming<WatchResponse>,
    window: Duration,
) -> Vec<WatchResponse> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Ok(Some(m))) = tokio::time::timeout_at(deadline, stream.message()).await {
        got.push(m);
    }
    got
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_notifications_follow_etcd_rules() {
    let etcd = Etcd::start();
    let proxy = Proxy::start_with(&etcd.url, &["/apisix/"], &["--progress-interval", "1s"]);
    let mut c = Clients::connect(&proxy.url).await;
    let put = |k: &str| PutRequest {
        key: Bytes::from(k.to_string()),
        value: Bytes::from_static(b"v"),
        ..Default::default()
    };
    let rev =
        c.kv.put(put("/apisix/a"))
            .await
            .expect("put")
            .into_inner()
            .header
            .expect("header")
            .revision;

    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(create(1, true)).expect("send");
    tx.send(create(2, false)).expect("send");
    let mut stream = c
        .watch
        .watch(UnboundedReceiverStream::new(rx))
        .await
        .expect("watch")
        .into_inner();

    // Idle for 2.5 intervals: progress for watch 1 only, empty, at the revision reached.
    let got = collect(&mut stream, Duration::from_millis(2600)).await;
    let created: Vec<_> = got.iter().filter(|m| m.created).collect();
    assert_eq!(created.len(), 2, "{got:?}");
    let progress: Vec<_> = got.iter().filter(|m| !m.created).collect();
    assert!(
        (2..=3).contains(&progress.len()),
        "one progress per interval: {progress:?}"
    );
    for p in &progress {
        assert_eq!(p.watch_id, 1, "only the watch that asked: {p:?}");
        assert!(p.events.is_empty() && !p.canceled);
        assert_eq!(p.header.as_ref().map(|h| h.revision), Some(rev));
    }

    // Busy: an event in every interval elides the progress notification.
    let writer = {
        let mut kv = c.kv.clone();
        tokio::spawn(async move {
            for i in 0..8 {
                let _ = kv.put(put(&format!("/apisix/busy/{i}"))).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let got = collect(&mut stream, Duration::from_millis(2200)).await;
    writer.await.expect("writer");
    assert!(got.iter().any(|m| !m.events.is_empty()), "{got:?}");
    assert!(
        got.iter().all(|m| !m.events.is_empty()),
        "no progress while events flow: {got:?}"
    );
}
