//! The log sink: formatted log lines go through a bounded queue to one writer thread, and a
//! line that cannot be written is dropped and counted, never reported as an error.
//!
//! Why: tracing-subscriber reports a failed write with `eprintln!`, which panics when stderr
//! is a closed pipe (a log shipper restarting, `| head`), so whichever task logged next died:
//! the signal task (SIGTERM then never stopped the proxy) or a feed task (its prefix froze).
//! A blocked pipe would equally stall every task that logs. Here a task only ever pushes a
//! line into the queue without waiting; when the queue is full or the output is gone the
//! line is dropped and `etcd_fanout_log_dropped_total` counts it. The sink knows nothing of
//! the format: any `tracing_subscriber::fmt` layer (text or JSON) can write through it.

use std::io::Write;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

use crate::metrics;

/// Lines queued for the writer thread before new ones are dropped.
const QUEUE_LINES: usize = 4096;
/// Longest wait at shutdown for queued lines to be written.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

/// What the writer thread receives.
enum Msg {
    /// One formatted log line (or several, as the layer wrote them at once).
    Line(Vec<u8>),
    /// Write everything queued before this, then stop and say so.
    Stop(mpsc::Sender<()>),
}

/// Hands log writes to the writer thread; cloned into the subscriber.
#[derive(Clone)]
pub struct LogSink {
    /// The writer thread's queue.
    tx: SyncSender<Msg>,
}

/// Owns the writer thread: dropping it flushes what is queued (for at most [`FLUSH_WAIT`])
/// and stops the thread.
pub struct LogGuard {
    /// The writer thread's queue (for the stop message).
    tx: SyncSender<Msg>,
    /// The writer thread.
    thread: Option<JoinHandle<()>>,
}

/// A sink writing to `out` on its own thread, and the guard that stops it.
pub fn sink<W: Write + Send + 'static>(out: W) -> (LogSink, LogGuard) {
    let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
    let thread = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || write_lines(rx, out))
        .ok();
    // Without a thread the receiver is gone and every line counts as dropped.
    (LogSink { tx: tx.clone() }, LogGuard { tx, thread })
}

/// A sink writing to the process's standard output.
pub fn stdout() -> (LogSink, LogGuard) {
    sink(std::io::stdout())
}

/// The writer thread: writes each line, counting the ones the output refuses.
fn write_lines<W: Write>(rx: Receiver<Msg>, mut out: W) {
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Line(line) => {
                if out.write_all(&line).and_then(|_| out.flush()).is_err() {
                    metrics::LOG_DROPPED.inc();
                }
            }
            Msg::Stop(done) => {
                let _ = done.send(());
                return;
            }
        }
    }
}

impl LogSink {
    /// Queues `buf` for the writer thread, or counts it as dropped.
    fn push(&self, buf: &[u8]) {
        match self.tx.try_send(Msg::Line(buf.to_vec())) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                metrics::LOG_DROPPED.inc();
            }
        }
    }
}

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogSink {
    type Writer = LogSink;

    fn make_writer(&'a self) -> LogSink {
        self.clone()
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let (done_tx, done_rx) = mpsc::channel();
        // A full queue gets its stop message as soon as the thread has room, if it ever does.
        let sent = self.tx.send_timeout_compat(Msg::Stop(done_tx), FLUSH_WAIT);
        if sent && done_rx.recv_timeout(FLUSH_WAIT).is_ok() {
            let _ = thread.join();
        }
        // Otherwise the output is stuck: the thread is left to the process exit.
    }
}

/// `SyncSender::send` bounded in time (std has no `send_timeout` on stable).
trait SendTimeout {
    fn send_timeout_compat(&self, msg: Msg, wait: Duration) -> bool;
}

impl SendTimeout for SyncSender<Msg> {
    fn send_timeout_compat(&self, mut msg: Msg, wait: Duration) -> bool {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match self.try_send(msg) {
                Ok(()) => return true,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(m)) => {
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output that always fails, as a closed pipe does.
    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
    }

    #[test]
    fn failed_writes_are_dropped_and_counted() {
        let before = metrics::LOG_DROPPED.get();
        let (mut s, guard) = sink(Broken);
        for _ in 0..10 {
            assert_eq!(s.write(b"line\n").ok(), Some(5));
        }
        drop(guard);
        assert!(metrics::LOG_DROPPED.get() >= before + 10);
        // After the thread stopped, lines are still accepted and counted.
        assert_eq!(s.write(b"late\n").ok(), Some(5));
        assert!(metrics::LOG_DROPPED.get() >= before + 11);
    }

    #[test]
    fn lines_reach_a_working_output_in_order() {
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().map(|mut v| v.extend_from_slice(b)).ok();
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (mut s, guard) = sink(Shared(out.clone()));
        s.write_all(b"a\n").ok();
        s.write_all(b"b\n").ok();
        drop(guard);
        assert_eq!(out.lock().map(|v| v.clone()).unwrap_or_default(), b"a\nb\n");
    }
}
