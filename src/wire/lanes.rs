//! Two lanes for downstream connections: the main runtime, where the feeds, the dispatch, the
//! watch sessions and connections run, and the *new-connection lane*, a runtime of its own
//! (`--new-connection-threads`) where a connection makes its large writes until its client has
//! been seen to read ([`crate::wire::gate`]).
//!
//! Why: a large event reaching thousands of fresh sockets whose clients never read costs a
//! kernel copy of each client's receive window (3,000 non-readers and a 100 KB event: some
//! 240 MB). On one runtime those copies sat in tokio's first-in-first-out run queue ahead of
//! the replies of clients that read, and those waited for all of them. In the lane the copies
//! queue behind each other only: the kernel shares the cores between the lane's threads and the
//! main runtime's, so a reading client's reply waits for a time slice, not for the crowd. A
//! crowd of new clients alone (a reconnect storm) still has every core. Unlike write turns
//! (`--unproven-write-turns`), nothing waits in a line.
//!
//! When a connection moves: it starts in the lane, and leaves it once its client has been seen
//! to read and [`crate::wire::gate::LANE_PROOF`] bytes (256 KiB) have gone out, more than a
//! client that never reads can hold with a default receive buffer (the kernel makes room in a
//! non-reader's receive buffer after a stall, so a write that succeeds after one is not proof
//! enough on its own), or once it has made [`crate::wire::gate::SETTLED`] small writes (an
//! APISIX watcher of small configuration values: a hop between runtimes per event doubled
//! those watchers' latency, loadtest/RESULTS.md, "Slow readers, seventh pass"). A connection
//! back on the main runtime whose client is not yet proven returns to the lane for its next
//! large write. A client that never reads stays in the lane, its writer waiting for room that
//! never comes. (Starting every connection on the main runtime and moving it only for its
//! first large write was measured too: worse for the reading clients than no lane at all. A
//! lower OS priority for the lane was worse as well: a lane thread preempted while it holds a
//! lock a main thread needs, such as an HTTP/2 connection's stream table, stalls the main
//! thread.)
//!
//! What moves is the connection's whole serving future (boxed: moving it moves a pointer);
//! its socket, its timers and hyper's state go with it. Nothing a connection starts runs in
//! the lane: HTTP/2 streams are spawned on the main runtime ([`MainExecutor`]), sessions
//! through [`crate::tasks::Tasks`], which always spawns there.
//!
//! Ownership: the listener's `JoinSet` owns each connection's task on the main runtime, which
//! serves the connection itself while it is there and waits for its stint in the lane
//! otherwise ([`Stint`], aborted if that task is dropped). [`Lanes::stop`] waits for every
//! stint before it shuts the lane's runtime down: a connection may hold timers of that runtime.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::runtime::{Handle, Runtime};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

/// A connection's serving future, movable between runtimes.
pub type Work = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The new-connection lane, if any.
pub struct Lanes {
    /// The lane's runtime; `None` without a lane (or once stopped).
    lane: Option<Runtime>,
    /// What connections need to move (`None` without a lane).
    mover: Option<Mover>,
}

/// Moves connections into the lane and back (cheap to clone: one per connection).
#[derive(Clone)]
pub struct Mover {
    /// The lane's runtime.
    lane: Handle,
    /// Every stint in the lane, waited for by [`Lanes::stop`].
    stints: TaskTracker,
}

/// Where a connection is and where it asks to go: shared by its [`crate::wire::gate::Gated`]
/// stream, which asks, and its task, which moves it.
#[derive(Debug, Default)]
pub struct Place {
    /// True while the connection is served in the lane.
    in_lane: AtomicBool,
    /// True once the current stint has asked to move (one word per stint).
    asked: AtomicBool,
    /// Told when the connection should move to the lane.
    to_lane: Notify,
    /// Told when the connection should move back to the main runtime.
    to_main: Notify,
}

impl Place {
    /// Before a large write of a client not yet seen to read: `true` when the connection must
    /// first move to the lane (the write is to be made again there).
    pub fn ask_for_lane(&self) -> bool {
        if self.in_lane.load(Ordering::Acquire) {
            return false;
        }
        if !self.asked.swap(true, Ordering::AcqRel) {
            self.to_lane.notify_one();
        }
        true
    }

    /// The client reads, or writes only small things: back to the main runtime if in the
    /// lane.
    pub fn leave_lane(&self) {
        if self.in_lane.load(Ordering::Acquire) && !self.asked.swap(true, Ordering::AcqRel) {
            self.to_main.notify_one();
        }
    }

    /// Records where the connection is now (its task, on each move).
    fn set(&self, in_lane: bool) {
        self.in_lane.store(in_lane, Ordering::Release);
        self.asked.store(false, Ordering::Release);
    }
}

#[cfg(test)]
impl Place {
    /// Marks the connection as in the lane or not (what [`Mover::serve`] does).
    pub fn set_in_lane_for_tests(&self, in_lane: bool) {
        self.set(in_lane);
    }

    /// Whether the connection has been told to go back to the main runtime (takes the word).
    pub fn to_main_told_for_tests(&self) -> bool {
        use futures::FutureExt;
        self.to_main.notified().now_or_never().is_some()
    }
}

impl Lanes {
    /// A lane of `threads` threads (0: no lane) beside the current (main) runtime. Fails if
    /// the lane's threads cannot be started.
    pub fn start(threads: usize) -> io::Result<Lanes> {
        if threads == 0 {
            return Ok(Lanes {
                lane: None,
                mover: None,
            });
        }
        let lane = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("new-connections")
            .enable_all()
            .build()?;
        Ok(Lanes {
            mover: Some(Mover {
                lane: lane.handle().clone(),
                stints: TaskTracker::new(),
            }),
            lane: Some(lane),
        })
    }

    /// What a connection needs to move (`None` without a lane: it never moves).
    pub fn mover(&self) -> Option<Mover> {
        self.mover.clone()
    }

    /// Waits for every stint in the lane (call once the connections' tasks are gone: their
    /// stints are then aborted), then shuts the lane's runtime down.
    pub async fn stop(mut self) {
        if let Some(mover) = &self.mover {
            mover.stints.close();
            mover.stints.wait().await;
        }
        if let Some(lane) = self.lane.take() {
            lane.shutdown_background();
        }
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        // Not stopped (the listener's future was dropped): a runtime may not be dropped
        // from async code.
        if let Some(lane) = self.lane.take() {
            lane.shutdown_background();
        }
    }
}

impl Mover {
    /// Serves `work` until it ends: in the lane until `place` asks for the main runtime, then
    /// here (the main runtime) until it asks for the lane, and so on. `protocol` labels the
    /// moves' metric.
    pub async fn serve(&self, mut work: Work, place: Arc<Place>, protocol: &'static str) {
        loop {
            place.set(true);
            let stint = {
                let place = place.clone();
                self.stints.spawn_on(
                    async move { until_told(work, &place.to_main).await },
                    &self.lane,
                )
            };
            match Stint(stint).await {
                Some(w) => work = w,
                None => return,
            }
            place.set(false);
            moved(protocol, "main");
            match until_told(work, &place.to_lane).await {
                Some(w) => work = w,
                None => return,
            }
            moved(protocol, "lane");
        }
    }
}

/// Polls `work` until it ends (`None`) or `told` is told (`Some`: the work, to go on
/// elsewhere).
async fn until_told(mut work: Work, told: &Notify) -> Option<Work> {
    tokio::select! {
        biased;
        _ = work.as_mut() => None,
        _ = told.notified() => Some(work),
    }
}

/// Counts a move.
fn moved(protocol: &'static str, to: &'static str) {
    crate::metrics::CONNECTION_MOVES
        .with_label_values(&[protocol, to])
        .inc();
}

/// A connection's stint in the lane: awaited by the connection's task, aborted if that task
/// is dropped (the listener's `JoinSet` aborting its connections at the end of the drain).
/// Ends with the work when it is to move back, `None` when it ended (or panicked).
struct Stint(JoinHandle<Option<Work>>);

impl Future for Stint {
    type Output = Option<Work>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Work>> {
        Pin::new(&mut self.0).poll(cx).map(|r| r.ok().flatten())
    }
}

impl Drop for Stint {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Spawns hyper's HTTP/2 streams on the main runtime, wherever their connection runs.
#[derive(Clone)]
pub struct MainExecutor(pub Handle);

impl<F> hyper::rt::Executor<F> for MainExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn thread_name() -> Option<String> {
        std::thread::current().name().map(str::to_string)
    }

    /// A connection's work starts in the lane, runs on the main runtime once it asks to
    /// leave, goes back to the lane when it asks for it; the lane stops only after its stints.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_moves_between_the_lane_and_the_main_runtime() {
        let lanes = Lanes::start(1).expect("lane");
        let mover = lanes.mover().expect("a lane has a mover");
        let lane_thread = Some("new-connections".to_string());
        let place = Arc::new(Place::default());
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let (step_tx, mut step_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let work: Work = Box::pin(async move {
            for _ in 0..3 {
                let _ = seen_tx.send(thread_name());
                if step_rx.recv().await.is_none() {
                    return;
                }
            }
        });
        let conn = tokio::spawn({
            let place = place.clone();
            async move { mover.serve(work, place, "http1").await }
        });
        assert_eq!(
            seen_rx.recv().await.expect("ran"),
            lane_thread,
            "did not start in the lane"
        );
        assert!(!place.ask_for_lane(), "asked for the lane from the lane");
        place.leave_lane();
        tokio::time::sleep(Duration::from_millis(20)).await;
        step_tx.send(()).expect("step");
        assert_ne!(
            seen_rx.recv().await.expect("ran"),
            lane_thread,
            "stayed in the lane"
        );
        place.leave_lane(); // on the main runtime: nothing to do
        assert!(
            place.ask_for_lane(),
            "a connection on the main runtime must move"
        );
        assert!(place.ask_for_lane(), "asking twice");
        tokio::time::sleep(Duration::from_millis(20)).await;
        step_tx.send(()).expect("step");
        assert_eq!(
            seen_rx.recv().await.expect("ran"),
            lane_thread,
            "did not go back"
        );
        step_tx.send(()).expect("step");
        conn.await.expect("connection task");
        tokio::time::timeout(Duration::from_secs(5), lanes.stop())
            .await
            .expect("lane stopped");
    }

    /// Dropping the task of a connection in the lane aborts its stint, so that
    /// [`Lanes::stop`] does not wait for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_a_connections_task_aborts_its_stint() {
        let lanes = Lanes::start(1).expect("lane");
        let mover = lanes.mover().expect("mover");
        let place = Arc::new(Place::default());
        let (held_tx, held_rx) = tokio::sync::oneshot::channel::<()>();
        let work: Work = Box::pin(async move {
            let _held = held_tx;
            futures::future::pending::<()>().await;
        });
        let conn = tokio::spawn(async move { mover.serve(work, place, "http2").await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        conn.abort();
        assert!(held_rx.await.is_err(), "the work was dropped");
        tokio::time::timeout(Duration::from_secs(5), lanes.stop())
            .await
            .expect("stop waited for an aborted connection");
    }
}
