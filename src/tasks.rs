//! The owner of every background task.
//!
//! Everything the proxy runs in the background (each feed's watch loop, sync loop and
//! backfills, the compaction poll, every watch session with its relay and catch-up tasks, the
//! connections to etcd's HTTP server, the signal handler) is spawned through one [`Tasks`]: a
//! cancellation token every task stops on, and a tracker that shutdown waits on. `main` makes
//! it, hands it to the hub, and stops it once the listener has drained.
//!
//! Connections are not here: the listener owns them in a `JoinSet` and drains them itself.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Spawns tasks that stop when [`Tasks::stop`] is called, and waits for them.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    /// Cancelled by [`Tasks::stop`]: every task ends at its next await point.
    cancel: CancellationToken,
    /// Every task spawned, so that [`Tasks::stop`] can wait for them.
    tracker: TaskTracker,
}

impl Tasks {
    /// A new owner with no tasks.
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Runs `task` until it ends or the owner stops. The handle may be used to abort it
    /// earlier; dropping the handle does not.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = task => {}
            }
        })
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
}
