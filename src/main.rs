//! The `etcd-fanout` binary: parse flags, run the proxy until SIGTERM or Ctrl-C.
//!
//! Exit codes: 0 after a clean shutdown; 2 for a bad flag (clap's usage errors) or a setting
//! the proxy cannot start with (credentials, endpoints, a busy listen address).

use clap::Parser;

use etcd_fanout::config::Config;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if let Err(e) = etcd_fanout::run(Config::parse(), wait_for_signal()).await {
        eprintln!("etcd-fanout: error: {e}");
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
