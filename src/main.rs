//! The `etcd-fanout` binary: parse flags, start the feeds, serve until SIGTERM or Ctrl-C, then
//! stop every background task and wait for it.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use etcd_fanout::config::Config;
use etcd_fanout::serve::Services;
use etcd_fanout::source::hub::Hub;
use etcd_fanout::source::upstream::Upstream;
use etcd_fanout::tasks::Tasks;
use etcd_fanout::wire::server::serve;

/// Longest time open connections get to finish after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);

/// Longest wait for the background tasks to end once cancelled.
const STOP: Duration = Duration::from_secs(5);

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
    let tasks = Tasks::new();
    let hub = Hub::start(config, upstream, tasks.clone());
    let shutdown = hub.shutdown_signal();
    let signal_hub = hub.clone();
    tasks.spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        signal_hub.shutdown();
    });
    serve(listener, Services::new(hub), shutdown, DRAIN).await;
    let left = tasks.stop(STOP).await;
    if left > 0 {
        tracing::warn!(tasks = left, "background tasks still running at exit");
    }
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
