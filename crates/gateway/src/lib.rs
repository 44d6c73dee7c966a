//! The edge of a Flotilla system.
//!
//! Clients never talk to service instances directly: every outside request
//! enters through the gateway, which is the one place that knows which
//! service owns which path, spreads requests over the ready instances of that
//! service, holds a request while a function scales up from zero, retries
//! idempotent requests when an instance dies under it, and gives every
//! request an id, an access-log line and metrics. Concentrating this here
//! keeps services small and makes edge policy (JWT, rate limits, CORS, IP
//! lists, body and header limits, slow-client timeouts) something the
//! platform enforces rather than something each service must remember.
//!
//! The gateway knows nothing about processes: it asks an [`Upstreams`] (the
//! runtime, or a test double) for ready instances. Its public surface is:
//!
//! - [`Config`] (built with [`Config::from_manifest`], fields overridable)
//!   and its policy types: [`JwtConfig`]/[`JwksSource`], [`RouteAuth`],
//!   [`RateLimit`] (`"20/s burst 40 per user"`), [`RateLimitBackend`],
//!   [`CorsConfig`], [`IpConfig`]/[`IpRules`] ([`parse_net`]), [`Limits`],
//!   [`TlsConfig`], [`CompressionConfig`], [`CacheConfig`];
//! - [`Gateway::start`], [`Gateway::local_addr`], [`Gateway::url`],
//!   [`Gateway::reload`], [`Gateway::shutdown`];
//! - [`Error`] for why it could not start ([`TlsError`] for a certificate
//!   it cannot serve), [`ConfigError`] for why a configuration was refused.
//!
//! A request passes through one tower stack, outermost first: request id →
//! access log and metrics → `server` header → load shedding → `/healthz` →
//! edge (IP lists → CORS → route match, 404/405/static files → route IP
//! lists → JWT → rate limit → body limit → response cache, whose hits are
//! answered here) → proxy (instance pick by power of
//! two choices skipping ejected instances, activation, timeout, retries
//! within a budget, outlier detection). Below the stack, each connection's
//! socket is watched for slow heads (408) and idle keep-alive. A WebSocket
//! handshake goes through the same stack; once the instance switches, the
//! client's connection and the instance's become one tunnel (`upgrade`).
//! With [`TlsConfig`], clients connect over HTTPS (`tls`): the same stack
//! behind a TLS handshake, HTTP/2 or HTTP/1.1 by ALPN.

mod access_log;
mod affinity;
mod apikey;
mod authz;
mod balance;
mod body;
mod bulkhead;
mod cache;
mod chunked;
mod client;
mod client_cert;
mod clock;
mod compress;
mod config;
mod conn;
mod conn_limit;
mod cors;
mod edge;
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzz;
mod h1;
mod header_changes;
mod headers;
mod health;
mod ip;
mod json;
mod jwt;
mod mirror;
mod outbound;
mod proxy;
mod proxy_protocol;
mod random;
mod ratelimit;
mod redirect;
mod rejection;
mod relayed;
mod request_id;
mod resilience;
mod routes;
mod routing;
mod server;
mod stats;
mod tls;
mod trace;
mod transport;
mod upgrade;
pub mod upstream;
mod workers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::task::AbortOnDropHandle;

pub use apikey::{NewApiKey, new_api_key};
pub use cache::{CacheConfig, CachePurged};
pub use client::{UpstreamTls, WebTrustError};
pub use compress::CompressionConfig;
pub use config::{Config, ConfigError, Limits, RouteConfig};
pub use cors::{CorsConfig, CorsConfigError};
/// What a route keeps a client's requests on one instance by
/// ([`RouteConfig::affinity`]).
pub use flotilla_manifest::Affinity;
pub use header_changes::HeaderChanges;
pub use ip::{ForwardedHeader, IpConfig, IpNetParseError, IpRules, parse_net, parse_nets};
pub use jwt::{JwksSource, JwksSourceError, JwtConfig, RouteAuth, RouteAuthParseError};
pub use ratelimit::{RateLimit, RateLimitBackend, RateLimitKey, RateLimitParseError};
pub use stats::prometheus_recorder;
pub use tls::{ClientAuth, TlsCertificate, TlsConfig, TlsError};
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
    #[error("invalid gateway configuration")]
    Config(#[from] ConfigError),
    #[error(
        "cannot start the gateway's worker threads; lower limits.workers or raise the process's thread limit"
    )]
    Workers(#[source] std::io::Error),
    #[error("cannot load the gateway's identity for mutual TLS to instances (upstream_tls)")]
    UpstreamTls(#[source] flotilla_mesh::tls::TlsError),
    #[error("cannot serve HTTPS with the files of [gateway.tls]")]
    Tls(#[source] TlsError),
    #[error("the task loading the certificate of [gateway.tls] failed")]
    TlsTask(#[source] tokio::task::JoinError),
    #[error(
        "cannot listen on {addr} for the redirect to HTTPS ([gateway.tls] http_redirect): choose another address or stop what holds it"
    )]
    Redirect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running gateway. Dropping it without [`Gateway::shutdown`] stops
/// accepting and closes open connections at once.
#[derive(Debug)]
pub struct Gateway {
    local_addr: SocketAddr,
    routing: Arc<routing::RoutingState>,
    context: routing::Context,
    /// The retry and ejection settings every worker's proxy reads, and
    /// each service's state: a reload changes the settings in place.
    resilience: Arc<resilience::Resilience>,
    /// Serialises reloads, so each builds on the one before.
    reloading: std::sync::Mutex<()>,
    /// `https` when TLS is terminated here, else `http`.
    scheme: &'static str,
    /// Takes a renewed certificate (with TLS); stops when the gateway goes.
    _certificates: Option<AbortOnDropHandle<()>>,
    /// The plain-HTTP listener redirecting to HTTPS, and its address.
    redirect: Option<(SocketAddr, AbortOnDropHandle<()>)>,
    stop: oneshot::Sender<Duration>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for routing::Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Gateway {
    /// Validates `config`, binds its listen address and starts serving.
    pub async fn start(config: Config, upstreams: Arc<dyn Upstreams>) -> Result<Gateway, Error> {
        config.validate()?;
        if let Some(dir) = &config.static_dir {
            let is_dir = tokio::fs::metadata(dir)
                .await
                .map(|m| m.is_dir())
                .unwrap_or(false);
            if !is_dir {
                return Err(Error::StaticDir { path: dir.clone() });
            }
        }
        // Before binding: a gateway that cannot serve TLS does not start.
        // The files are read on the blocking pool, as the reloader reads them.
        let acceptor = match config.tls.clone() {
            Some(tls) => {
                let loaded = tokio::task::spawn_blocking(move || tls::Acceptor::new(&tls)).await;
                Some(loaded.map_err(Error::TlsTask)?.map_err(Error::Tls)?)
            }
            None => None,
        };
        let listener = server::bind(config.listen).await?;
        let local_addr = listener.local_addr().map_err(|source| Error::Listen {
            addr: config.listen,
            source,
        })?;
        let redirect_listener = match config.tls.as_ref().and_then(|t| t.http_redirect) {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| Error::Redirect { addr, source })?;
                let bound = listener
                    .local_addr()
                    .map_err(|source| Error::Redirect { addr, source })?;
                Some((bound, listener))
            }
            None => None,
        };
        let access_log = match &config.access_log {
            Some(path) => Some(access_log::open(path).await?),
            None => None,
        };
        let (sink, writer) = match access_log {
            Some((sink, writer)) => (Some(sink), Some(writer)),
            None => (None, None),
        };

        let connector = client::connector(&config.limits, config.upstream_tls.as_ref())
            .map_err(Error::UpstreamTls)?;
        let context = routing::Context {
            client: client::fetch_client(connector.clone()),
            upstreams: Arc::clone(&upstreams),
            stats: stats::GatewayStats::new(),
        };
        let routing = Arc::new(routing::RoutingState::new(routing::Routing::build(
            &config, None, &context,
        )?));
        // One connection pool per worker: a pooled connection is served by
        // the reactor of the worker that opened it.
        let clients = (0..config.limits.workers)
            .map(|_| outbound::Outbound::new(connector.clone(), config.limits.body_timeout))
            .collect();
        let resilience = Arc::new(resilience::Resilience::new(
            resilience::Settings::from_limits(&config.limits),
        ));
        let stacks = server::stacks(
            &config.limits,
            config.tls.as_ref().and_then(|t| t.hsts),
            Arc::clone(&routing),
            sink,
            upstreams,
            clients,
            Arc::clone(&resilience),
        );
        let (stopping, _) = tokio::sync::watch::channel(());
        let certificates = config
            .tls
            .as_ref()
            .zip(acceptor.as_ref())
            .map(|(tls, acceptor)| acceptor.spawn_reloader(tls.reload_every));
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        // One budget for both listeners: they share the process's file
        // descriptors, and a client is one client on either port.
        let conn_limits = conn_limit::ConnLimits::new(
            config.limits.max_connections,
            config.limits.max_connections_per_ip,
        );
        let admission = || conn_limit::Admission {
            limits: Arc::clone(&conn_limits),
            routing: Arc::clone(&routing),
        };
        let redirect = redirect_listener.map(|(addr, listener)| {
            (
                addr,
                redirect::spawn(listener, local_addr.port(), &config.limits, admission()),
            )
        });
        let workers =
            server::start_workers(stacks, &config.limits, acceptor, &conn_limits, &stopping)
                .map_err(Error::Workers)?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server::run(
            listener,
            workers,
            admission(),
            stopping,
            stopped,
            writer,
        ));
        tracing::info!(target: "flotilla::gateway", %local_addr, scheme, "gateway listening");
        Ok(Gateway {
            local_addr,
            scheme,
            _certificates: certificates,
            redirect,
            routing,
            context,
            resilience,
            reloading: std::sync::Mutex::new(()),
            stop,
            task,
        })
    }

    /// The address the gateway listens on (the real port when the configured
    /// port was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the plain-HTTP listener that redirects to HTTPS listens
    /// (`TlsConfig::http_redirect`; the real port when it was 0).
    pub fn redirect_addr(&self) -> Option<SocketAddr> {
        self.redirect.as_ref().map(|(addr, _)| *addr)
    }

    /// The gateway's base URL: `https://` and the address when it
    /// terminates TLS (`Config::tls`), else `http://` and the address.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.local_addr)
    }

    /// Atomically replaces the routes, the static directory and every
    /// policy (JWT, CORS, IP lists, rate limits, body limits, retries and
    /// outlier detection). Requests in flight finish with the configuration
    /// they started with; connections stay open and their next request uses
    /// the new one. Rate-limit counters of unchanged limits and the JWT keys
    /// of an unchanged JWT config carry over, and so do the retry budgets
    /// spent and the instances ejected (under the new rules from their next
    /// decision on).
    ///
    /// An invalid `config` is refused with its error and the old one stays.
    /// `listen`, `tls`, `access_log` and `limits` (except `max_body_bytes`,
    /// the retry settings and the outlier detection's) are fixed at start;
    /// changing them needs a new gateway. Must be called from within the
    /// tokio runtime.
    pub fn reload(&self, config: Config) -> Result<(), ConfigError> {
        let _serial = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.routing.current();
        let next = routing::Routing::build(&config, Some(&current), &self.context)?;
        self.routing.replace(next);
        self.resilience
            .update(resilience::Settings::from_limits(&config.limits));
        tracing::info!(
            target: "flotilla::gateway",
            routes = config.routes.len(),
            "gateway configuration reloaded"
        );
        Ok(())
    }

    /// Drops every kept response (routes' `cache`) whose path, with its
    /// query, starts with `prefix` (`"/"`: all of them), as Kong's
    /// proxy-cache purge does: after a bad deploy, say, without waiting
    /// for the responses to expire. A request for one of them now is
    /// forwarded.
    pub fn purge_cache(&self, prefix: &str) -> CachePurged {
        match self.routing.current().cache() {
            Some(cache) => cache.purge(prefix),
            None => CachePurged::default(),
        }
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
