//! etcd-fanout: an etcd v3 proxy that keeps one upstream watch per configured prefix and
//! serves every downstream reader and watcher from a revision-indexed cache.
//!
//! Data flows one way, and so do imports: [`source`] (the upstream channel, one feed per
//! prefix filling its cache, the hub routing key ranges to feeds) -> [`serve`] (KV and Watch
//! sessions over the caches, the services passed through to etcd) -> [`wire`] (the listener,
//! HTTP/2 and HTTP/1.x, gRPC routes and codec, etcd's HTTP/JSON gateway). `config`, `error`,
//! `keys`, `metrics`, `proto`, `tasks` and `throttle` are shared by all three.
//!
//! The crate's public surface is what the binary, the tests and the load generator use:
//! [`run`], [`config`], the wire types ([`proto`]), key ranges ([`keys`]), the gRPC codec
//! ([`codec`]) and range answers ([`kv`]).

pub mod config;
pub(crate) mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod keys;
pub mod logging;
pub(crate) mod metrics;
pub mod proto;
pub(crate) mod serve;
pub(crate) mod source;
pub(crate) mod tasks;
pub(crate) mod throttle;
pub mod tls;
pub(crate) mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// The gRPC codec of every etcd service (prost, with etcd's wording of decode errors).
pub mod codec {
    pub use crate::wire::grpc::codec::{EtcdCodec, EtcdDecoder, EtcdEncoder};
}

/// Range answers as the KV service makes them (a cached answer keeps its encoded body).
pub mod kv {
    pub use crate::serve::kv::{RangeAnswer, RangeBody};
}

/// Longest wait for the background tasks to end once cancelled.
const STOP: Duration = Duration::from_secs(5);

/// Runs the proxy on `config` until a shutdown signal (each call of `signal` waits for the next
/// one). Shutdown is a rollout's: at the first signal `/readyz` fails while everything is still
/// served and accepted for `--shutdown-delay` (load balancers remove the replica first; a
/// second signal cuts the delay short), then watch streams end (clients resume on another
/// replica), open connections get `--shutdown-timeout` to finish, and every background task
/// is cancelled and waited for.
pub async fn run<F, S>(
    config: config::Config,
    mut signal: F,
) -> Result<(), Box<dyn std::error::Error>>
where
    F: FnMut() -> S + Send + 'static,
    S: Future<Output = ()> + Send + 'static,
{
    metrics::init();
    // One line with the version and every effective setting (secrets masked), first, so
    // that even a proxy that cannot start says how it was configured.
    let settings = if config.settings.is_empty() {
        format!("{config:?}")
    } else {
        config.settings.clone()
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        settings = %settings,
        "etcd-fanout {} starting",
        env!("CARGO_PKG_VERSION")
    );
    // A TLS configuration that cannot work stops the proxy before anything starts.
    let upstream_tls = tls::client::UpstreamTls::from_args(&config.tls, &config.endpoints)?;
    let server_tls = tls::server::ServerTls::from_args(&config.tls)?;
    let credentials = source::upstream::credentials::Credentials::from_config(&config)?;
    let user = credentials.user().unwrap_or("").to_string();
    let upstream = Arc::new(
        source::upstream::Upstream::with_tls(&config.endpoints, upstream_tls)?
            .with_credentials(credentials),
    );
    let listener = wire::server::listen(config.listen)
        .map_err(|e| format!("cannot listen on {} (--listen): {e}", config.listen))?;
    let bound = listener.local_addr().unwrap_or(config.listen);
    tracing::info!(listen = %bound, tls = server_tls.is_some(), endpoints = ?config.endpoints, prefixes = ?config.prefixes, user, "listening");
    let (delay, drain) = (config.shutdown_delay, config.shutdown_timeout);
    let tasks = tasks::Tasks::new();
    let hub = source::hub::Hub::start(config, upstream, tasks.clone());
    let shutdown = hub.shutdown_signal();
    let signal_hub = hub.clone();
    tasks.spawn(async move {
        signal().await;
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "shutdown signal: readiness fails, still serving during the shutdown delay"
        );
        let drain_start = tokio::time::Instant::now();
        signal_hub.begin_drain().await;
        tokio::select! {
            _ = tokio::time::sleep_until(drain_start + delay) => {}
            _ = signal() => tracing::info!("second signal: shutdown delay cut short"),
        }
        tracing::info!("shutting down: ending watch streams, draining connections");
        signal_hub.shutdown();
    });
    let services = serve::Services::new(hub);
    wire::server::serve(listener, services, server_tls, shutdown, drain).await;
    let left = tasks.stop(STOP).await;
    if left > 0 {
        tracing::warn!(tasks = left, "background tasks still running at exit");
    }
    tracing::info!("stopped");
    Ok(())
}
