//! The `etcd-fanout` binary: parse flags, start the feeds, serve until SIGTERM or Ctrl-C.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use etcd_fanout::config::Config;
use etcd_fanout::serve::Services;
use etcd_fanout::source::hub::Hub;
use etcd_fanout::source::upstream::Upstream;
use etcd_fanout::tls::client::UpstreamTls;
use etcd_fanout::tls::server::ServerTls;
use etcd_fanout::wire::server::serve_with_tls;

/// Longest time open connections get to finish after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);

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
    // A TLS configuration that cannot work stops the process with a clear message.
    let tls = UpstreamTls::from_args(&config.tls, &config.endpoints)
        .and_then(|up| Ok((up, ServerTls::from_args(&config.tls)?)));
    let (upstream_tls, server_tls) = match tls {
        Ok(t) => t,
        Err(e) => {
            eprintln!("etcd-fanout: {e}");
            std::process::exit(2);
        }
    };
    let upstream = Arc::new(Upstream::with_tls(&config.endpoints, upstream_tls)?);
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %config.listen, tls = server_tls.is_some(), endpoints = ?config.endpoints, prefixes = ?config.prefixes, "etcd-fanout starting");
    let hub = Hub::start(config, upstream);
    let shutdown = hub.shutdown_signal();
    let signal_hub = hub.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        signal_hub.shutdown();
    });
    serve_with_tls(listener, Services::new(hub), server_tls, shutdown, DRAIN).await;
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
