//! The life of one client connection after it is accepted: how it is asked to end, at
//! shutdown or at its maximum age (`--max-connection-age`, `--max-connection-age-grace`:
//! grpc-go's `MaxConnectionAge` and `MaxConnectionAgeGrace`).
//!
//! Long-lived connections (gRPC watch streams, APISIX's kept-alive HTTP watches) never move
//! by themselves, so after a scale-out the new replicas would stay idle. With a maximum age,
//! each connection is asked to go away once it is that old (plus or minus 10 % of jitter, as
//! grpc-go, so that connections accepted together do not all reconnect together):
//!
//! - the protocol's own request first: HTTP/2 gets a graceful GOAWAY (no new streams; the
//!   client opens its next ones on a new connection, through the Service to any replica),
//!   HTTP/1.x answers its current request with `Connection: close` and takes no other;
//! - then the connection's [`ConnectionEnding`] turns true: its watch sessions end their
//!   streams after their last whole response (gRPC: `Unavailable` "the connection is
//!   draining", which etcd's Go client treats as "reconnect and resume every watch from its
//!   next revision"; an HTTP watch stream ends cleanly at a revision boundary);
//! - other calls (unary calls in flight, lease keep-alive streams) get the grace period, then
//!   the connection is closed.
//!
//! At shutdown the same request is made with no grace of its own: the listener's drain
//! (`--shutdown-timeout`) bounds it.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::Config;
use crate::serve::watch::ConnectionEnding;

/// The maximum age of client connections.
#[derive(Debug, Clone, Copy)]
pub struct MaxAge {
    /// Age after which a connection is asked to go away (before jitter).
    pub age: Duration,
    /// How long its calls then get before it is closed.
    pub grace: Duration,
}

impl MaxAge {
    /// The configured maximum age; `None` when connections may live for ever (`0`).
    pub fn from_config(config: &Config) -> Option<MaxAge> {
        (!config.max_connection_age.is_zero()).then_some(MaxAge {
            age: config.max_connection_age,
            grace: config.max_connection_age_grace,
        })
    }

    /// When a connection accepted at `accepted` is asked to go away: the age plus a jitter
    /// drawn uniformly from plus or minus 10 % of it (grpc-go's `getJitter`).
    pub fn limit(&self, accepted: Instant) -> Instant {
        let tenth = self.age / 10;
        let jitter = tenth.mul_f64(fastrand::f64() * 2.0);
        accepted + self.age - tenth + jitter
    }
}

/// One connection's end signal: the sending half kept by the connection's task, the
/// [`ConnectionEnding`] handed to every request it serves.
#[derive(Debug)]
pub struct Ending {
    /// Turns true once the connection is asked to end.
    tx: watch::Sender<bool>,
}

impl Default for Ending {
    /// A signal that has not fired.
    fn default() -> Ending {
        Ending {
            tx: watch::channel(false).0,
        }
    }
}

impl Ending {
    /// The receiving half for the connection's requests.
    pub fn signal(&self) -> ConnectionEnding {
        ConnectionEnding(self.tx.subscribe())
    }

    /// The receiving half as a plain flag (the HTTP/1.x server's `shutdown`).
    pub fn flag(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
}

/// What a connection must do next (see [`Life::next`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Turn {
    /// Ask the client to go away the protocol's way (GOAWAY); the [`Ending`] has fired.
    AskToEnd,
    /// The grace after the age limit is over: drop the connection (which closes it).
    Close,
}

/// One connection's life after its accept: its age limit, its grace, whether it was asked to
/// end yet. The connection's task races its protocol's future against [`Life::next`].
#[derive(Debug)]
pub struct Life {
    /// The end signal of the connection's requests.
    pub ending: Ending,
    /// Turns true at shutdown.
    shutdown: watch::Receiver<bool>,
    /// The age limit and the grace after it.
    limit: Option<(Instant, Duration)>,
    /// The connection has been asked to end.
    asked: bool,
    /// When the connection is closed (its grace after the age limit).
    close_at: Option<Instant>,
    /// Label of the aged-connections metric.
    protocol: &'static str,
}

impl Life {
    /// The life of a connection accepted at `accepted`.
    pub fn new(
        shutdown: watch::Receiver<bool>,
        max_age: Option<MaxAge>,
        accepted: Instant,
        protocol: &'static str,
    ) -> Life {
        Life {
            ending: Ending::default(),
            shutdown,
            limit: max_age.map(|m| (m.limit(accepted), m.grace)),
            asked: false,
            close_at: None,
            protocol,
        }
    }

    /// Waits for the next thing the connection must do. At shutdown (no grace of its own: the
    /// listener's drain bounds it) or at the age limit (then closed after the grace), the
    /// connection's [`Ending`] fires and [`Turn::AskToEnd`] is returned, once.
    pub async fn next(&mut self) -> Turn {
        let asked = self.asked;
        let limit = self.limit.map(|l| l.0);
        let close_at = self.close_at;
        let shutdown = &mut self.shutdown;
        let aged = tokio::select! {
            _ = async { let _ = shutdown.wait_for(|s| *s).await; }, if !asked => false,
            _ = sleep_until(limit), if !asked => true,
            _ = sleep_until(close_at) => return Turn::Close,
        };
        if aged {
            crate::metrics::CONNECTIONS_AGED
                .with_label_values(&[self.protocol])
                .inc();
            self.close_at = self.limit.map(|(_, grace)| Instant::now() + grace);
        }
        self.asked = true;
        self.ending.tx.send_replace(true);
        Turn::AskToEnd
    }
}

/// Sleeps until `at`; for ever when `None`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
