//! The edge of a Flotilla system.
//!
//! Clients never talk to service instances directly: every outside request
//! enters through the gateway, which is the one place that knows which
//! service owns which path, spreads requests over the ready instances of that
//! service, holds a request while a function scales up from zero, retries
//! idempotent requests when an instance dies under it, and gives every
//! request an id, an access-log line and metrics. Concentrating this here
//! keeps services small and makes edge policy (JWT, rate limits, CORS, IP
//! lists, coming next) something the platform enforces rather than something
//! each service must remember.
//!
//! The gateway knows nothing about processes: it asks an [`Upstreams`] (the
//! runtime, or a test double) for ready instances. Its public surface is:
//!
//! - [`Config`] (built with [`Config::from_manifest`], fields overridable),
//! - [`Gateway::start`], [`Gateway::local_addr`], [`Gateway::reload`],
//!   [`Gateway::shutdown`],
//! - [`Error`] for why it could not start.
//!
//! A request passes through one tower stack, outermost first: request id →
//! access log and metrics → `server` header → `/healthz` → route match (404,
//! 405, static files) → proxy (instance pick by power of two choices,
//! activation, timeout, retries). Each concern is its own module and layer so
//! that edge-security layers can be slotted between them.

mod access_log;
mod balance;
mod body;
mod client;
mod config;
mod headers;
mod health;
mod proxy;
mod rejection;
mod request_id;
mod routes;
mod routing;
mod server;
mod stats;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::{Config, Limits, RouteConfig};
pub use upstream::{ActivateError, ActivateFuture, Endpoint, Load, LoadGuard, Upstreams};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot listen on {addr}: the address is already in use: stop the other process or choose another address with --listen"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}; choose another address with --listen")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot open the access log {}; check that its directory exists and is writable",
        path.display()
    )]
    AccessLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the static directory {} is not a directory; create it or remove `static_dir` from [gateway]",
        path.display()
    )]
    StaticDir { path: PathBuf },
}

/// A running gateway. Dropping it without [`Gateway::shutdown`] stops
/// accepting and closes open connections at once.
#[derive(Debug)]
pub struct Gateway {
    local_addr: SocketAddr,
    routing: Arc<routing::RoutingState>,
    stop: oneshot::Sender<Duration>,
    task: JoinHandle<()>,
}

impl Gateway {
    /// Validates `config`, binds its listen address and starts serving.
    pub async fn start(config: Config, upstreams: Arc<dyn Upstreams>) -> Result<Gateway, Error> {
        if let Some(dir) = &config.static_dir {
            let is_dir = tokio::fs::metadata(dir)
                .await
                .map(|m| m.is_dir())
                .unwrap_or(false);
            if !is_dir {
                return Err(Error::StaticDir { path: dir.clone() });
            }
        }
        let listener = server::bind(config.listen).await?;
        let local_addr = listener.local_addr().map_err(|source| Error::Listen {
            addr: config.listen,
            source,
        })?;
        let access_log = match &config.access_log {
            Some(path) => Some(access_log::open(path).await?),
            None => None,
        };
        let (sink, writer) = match access_log {
            Some((sink, writer)) => (Some(sink), Some(writer)),
            None => (None, None),
        };

        let routing = Arc::new(routing::RoutingState::new(routing::Routing::new(&config)));
        let stack = server::stack(&config, Arc::clone(&routing), sink, upstreams);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server::run(
            listener,
            stack,
            config.limits.clone(),
            stopped,
            writer,
        ));
        tracing::info!(target: "flotilla::gateway", %local_addr, "gateway listening");
        Ok(Gateway {
            local_addr,
            routing,
            stop,
            task,
        })
    }

    /// The address the gateway listens on (the real port when the configured
    /// port was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Atomically replaces the routes and the static directory. Requests
    /// already past routing finish with the configuration they started with.
    /// `listen`, `access_log` and `limits` are fixed at start; changing them
    /// needs a new gateway.
    pub fn reload(&self, config: Config) {
        self.routing.replace(routing::Routing::new(&config));
        tracing::info!(
            target: "flotilla::gateway",
            routes = config.routes.len(),
            "gateway configuration reloaded"
        );
    }

    /// Stops accepting connections, lets in-flight requests finish for up to
    /// `deadline`, then closes whatever is still open.
    pub async fn shutdown(self, deadline: Duration) {
        // A send error means the server task has already ended.
        let _ = self.stop.send(deadline);
        if let Err(e) = self.task.await {
            tracing::error!(target: "flotilla::gateway", error = %e, "gateway task failed");
        }
    }
}
