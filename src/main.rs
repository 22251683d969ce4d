//! The `etcd-fanout` binary: parse flags, start the feeds, serve until SIGTERM or Ctrl-C.
//!
//! Shutdown is a rollout's: at the first signal `/readyz` fails while everything is still
//! served and accepted for `--shutdown-delay` (load balancers remove the replica first; a
//! second signal cuts the delay short), then watch streams end (clients resume on another
//! replica) and open connections get `--shutdown-timeout` to finish.

use clap::Parser;
use std::sync::Arc;

use etcd_fanout::config::Config;
use etcd_fanout::serve::Services;
use etcd_fanout::source::hub::Hub;
use etcd_fanout::source::upstream::Upstream;
use etcd_fanout::wire::server::serve;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = Config::parse();
    etcd_fanout::metrics::init();
    let upstream = Arc::new(Upstream::new(&config.endpoints)?);
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %config.listen, endpoints = ?config.endpoints, prefixes = ?config.prefixes, "etcd-fanout starting");
    let (delay, drain) = (config.shutdown_delay, config.shutdown_timeout);
    let hub = Hub::start(config, upstream);
    let shutdown = hub.shutdown_signal();
    let signal_hub = hub.clone();
    // Owned by `main`: aborted once the server has stopped.
    let signals = tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "shutdown signal: readiness fails, still serving during the shutdown delay"
        );
        signal_hub.begin_drain();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = wait_for_signal() => tracing::info!("second signal: shutdown delay cut short"),
        }
        tracing::info!("shutting down: ending watch streams, draining connections");
        signal_hub.shutdown();
    });
    serve(listener, Services::new(hub), shutdown, drain).await;
    signals.abort();
    tracing::info!("stopped");
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
