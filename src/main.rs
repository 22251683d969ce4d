//! The `etcd-fanout` binary: parse flags, run the proxy until SIGTERM or Ctrl-C (a second
//! signal cuts the shutdown delay short, see [`etcd_fanout::run`]).
//!
//! Exit codes: 0 after a clean shutdown; 2 for a bad flag (clap's usage errors) or a setting
//! the proxy cannot start with (credentials, endpoints, a busy listen address).

use std::io::Write;

use clap::Parser;

use etcd_fanout::config::Config;

#[tokio::main]
async fn main() {
    let (log_sink, log_guard) = etcd_fanout::logging::stdout();
    tracing_subscriber::fmt()
        .with_writer(log_sink)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = etcd_fanout::run(Config::parse(), wait_for_signal).await;
    // Write what is queued (for at most a second) and stop the log writer.
    drop(log_guard);
    if let Err(e) = result {
        // Not eprintln!: a closed stderr must not turn a clean error exit into a panic.
        let _ = writeln!(std::io::stderr(), "etcd-fanout: error: {e}");
        std::process::exit(2);
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
