//! The `etcd-fanout` binary: parse flags, run the proxy until SIGTERM or Ctrl-C.

use clap::Parser;

use etcd_fanout::config::Config;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (log_sink, log_guard) = etcd_fanout::logging::stdout();
    tracing_subscriber::fmt()
        .with_writer(log_sink)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = etcd_fanout::run(Config::parse(), wait_for_signal()).await;
    // Write what is queued (for at most a second) and stop the log writer.
    drop(log_guard);
    if let Err(e) = result {
        // Said plainly (`Display`): a startup error names the flag and the file at fault.
        eprintln!("etcd-fanout: {e}");
        std::process::exit(2);
    }
    Ok(())
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
