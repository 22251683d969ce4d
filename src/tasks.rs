//! The owner of every background task.
//!
//! Everything the proxy runs in the background (each feed's watch loop, sync loop and
//! backfills, the compaction poll, every watch session with its relay and catch-up tasks, the
//! connections to etcd's HTTP server, the signal handler) is spawned through one [`Tasks`]: a
//! cancellation token every task stops on, and a tracker that shutdown waits on. `main` makes
//! it, hands it to the hub, and stops it once the listener has drained.
//!
//! A task whose timing must not depend on the main runtime's load (the auth poll) runs on a
//! thread of its own ([`Tasks::spawn_isolated`]), owned and waited for the same way.
//!
//! Every task runs on the runtime that made the owner (the main runtime), whichever runtime
//! spawns it: a watch session created by a request served in the new-connection lane
//! (`wire::lanes`) must not run at that lane's lower priority.
//!
//! Connections are not here: the listener owns them in a `JoinSet` and drains them itself.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

pin_project_lite::pin_project! {
    /// A task that ends early when its owner stops: the task's future and the wait for the
    /// stop side by side, each stored once. (An `async` block that captured the task and
    /// `select!`ed on it stored it twice, as the captured value and inside the `select!`:
    /// a watch session's 1,840-byte future made a 3,784-byte task.) Fields: `stop` is ready
    /// once the owner stops, `task` is the task.
    struct UntilStopped<F> {
        #[pin]
        stop: WaitForCancellationFutureOwned,
        #[pin]
        task: F,
    }
}

impl<F: Future<Output = ()>> Future for UntilStopped<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.stop.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        this.task.poll(cx)
    }
}

/// Spawns tasks that stop when [`Tasks::stop`] is called, and waits for them.
#[derive(Debug, Clone)]
pub struct Tasks {
    /// Cancelled by [`Tasks::stop`]: every task ends at its next await point.
    cancel: CancellationToken,
    /// Every task spawned, so that [`Tasks::stop`] can wait for them.
    tracker: TaskTracker,
    /// The runtime tasks run on: the one current when the owner was made (`None` outside a
    /// runtime: then the spawning task's).
    runtime: Option<tokio::runtime::Handle>,
}

impl Default for Tasks {
    fn default() -> Tasks {
        Tasks::new()
    }
}

impl Tasks {
    /// A new owner with no tasks, running them on the current runtime.
    pub fn new() -> Tasks {
        Tasks {
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }

    /// Runs `task` until it ends or the owner stops. The handle may be used to abort it
    /// earlier; dropping the handle does not.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let task = UntilStopped {
            stop: self.cancel.clone().cancelled_owned(),
            task,
        };
        match &self.runtime {
            Some(runtime) => self.tracker.spawn_on(task, runtime),
            None => self.tracker.spawn(task),
        }
    }

    /// Runs the future `make` returns on a thread of its own (named `name`) with a
    /// single-threaded runtime, so that it keeps its timing while the main runtime is
    /// saturated (the auth poll: a poll answered late would stop the fan-out). It stops with
    /// the other tasks, and [`Tasks::stop`] waits for the thread's runtime to end. Fails only
    /// if the thread cannot be started.
    pub fn spawn_isolated<F, Fut>(&self, name: &str, make: F) -> std::io::Result<()>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let cancel = self.cancel.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => {
                        rt.block_on(async move {
                            tokio::select! {
                                _ = cancel.cancelled() => {}
                                _ = make() => {}
                            }
                        });
                        drop(rt);
                    }
                    Err(e) => tracing::error!(error = %e, "cannot start a runtime"),
                }
                drop(done_tx);
            })?;
        self.tracker.spawn(async move {
            let _ = done_rx.await;
        });
        Ok(())
    }

    /// Cancels every task and waits (at most `grace`) until all have ended; returns how many
    /// were still running when the wait gave up.
    pub async fn stop(&self, grace: Duration) -> usize {
        self.cancel.cancel();
        self.tracker.close();
        match tokio::time::timeout(grace, self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => self.tracker.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_cancels_and_waits() {
        let tasks = Tasks::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async move {
            // Holds `tx` until cancelled: the receiver sees it dropped then.
            let _tx = tx;
            futures::future::pending::<()>().await;
        });
        tasks.spawn(async {});
        assert_eq!(tasks.stop(Duration::from_secs(5)).await, 0);
        assert!(rx.await.is_err(), "the task was dropped");
    }

    /// A spawned task stores its future once (see [`UntilStopped`]).
    #[test]
    fn a_task_holds_its_future_once() {
        let big = [0u8; 4096];
        let task = async move {
            std::hint::black_box(&big);
        };
        let size = std::mem::size_of_val(&task);
        let wrapped = UntilStopped {
            stop: CancellationToken::new().cancelled_owned(),
            task,
        };
        assert!(std::mem::size_of_val(&wrapped) < size + 256);
    }

    #[tokio::test]
    async fn stop_waits_for_isolated_threads() {
        let tasks = Tasks::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks
            .spawn_isolated("test-isolated", move || async move {
                let _tx = tx;
                futures::future::pending::<()>().await;
            })
            .expect("thread");
        assert_eq!(tasks.stop(Duration::from_secs(5)).await, 0);
        assert!(rx.await.is_err(), "the isolated task was dropped");
    }
}
