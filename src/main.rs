//! The `etcd-fanout` binary: parse flags, run the proxy until SIGTERM or Ctrl-C (a second
//! signal cuts the shutdown delay short, see [`etcd_fanout::run`]).
//!
//! Logs go to standard output (see `etcd_fanout::logging`) as text or JSON (`--log-format`).
//!
//! Exit codes: 0 after a clean shutdown; 2 for a bad flag (clap's usage errors) or a setting
//! the proxy cannot start with (credentials, endpoints, a busy listen address).

use std::io::{IsTerminal, Write};

use etcd_fanout::config::{Config, LogFormat};

#[tokio::main]
async fn main() {
    let config = Config::from_command_line();
    let (log_sink, log_guard) = etcd_fanout::logging::stdout();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match config.log_format {
        // Colour codes only for a person at a terminal, never into a file or a pipe.
        LogFormat::Text => tracing_subscriber::fmt()
            .with_writer(log_sink)
            .with_env_filter(filter)
            .with_ansi(std::io::stdout().is_terminal())
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(log_sink)
            .with_env_filter(filter)
            .init(),
    }
    let result = etcd_fanout::run(config, wait_for_signal).await;
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
