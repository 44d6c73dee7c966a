//! [`Service`]: the contract read at start, and serving a router under it
//! (built-in endpoints, metrics middleware, graceful drain on SIGTERM).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use serde_json::Value;
use sqlx::SqlitePool;
use sqlx::migrate::Migrator;
use tokio::net::TcpListener;

use crate::broker::Broker;
use crate::client::Client;
use crate::config::{Config, Env, ListenSource};
use crate::events::Event;
use crate::health::{self, Readiness};
use crate::mesh::{self, Mesh, MeshListener, Peer};
use crate::tls::TlsFiles;
use crate::{Error, database, logging, metrics};

/// How often histogram storage is compacted when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// One instance of a service, configured from the runtime contract.
#[derive(Debug, Clone)]
pub struct Service {
    config: Config,
    openapi: Option<Value>,
    readiness: Readiness,
    /// Identity and ACL, when the runtime provided them.
    mesh: Option<Arc<Mesh>>,
    handshake_timeout: Duration,
}

impl Service {
    /// Reads the runtime contract from the process environment, after
    /// installing JSON logging ([`crate::init_logging`]).
    ///
    /// `FLOTILLA_SERVICE` is required. `FLOTILLA_INSTANCE` defaults to
    /// `<service>-0` and `FLOTILLA_SYSTEM` to `local`. The listen address is
    /// `FLOTILLA_LISTEN`, else `0.0.0.0:$PORT`, else `127.0.0.1:8000`; the
    /// fallbacks are logged.
    pub fn from_env() -> Result<Service, Error> {
        logging::init_logging();
        let service = Self::from_vars(crate::config::process_env()?)?;
        match service.config.listen_source {
            ListenSource::Flotilla => {}
            ListenSource::Port => tracing::info!(
                listen = %service.config.listen,
                "FLOTILLA_LISTEN is not set; listening on all interfaces at PORT"
            ),
            ListenSource::Default => tracing::warn!(
                listen = %service.config.listen,
                "neither FLOTILLA_LISTEN nor PORT is set; using the default address"
            ),
        }
        match &service.mesh {
            Some(mesh) => tracing::info!(
                identity = %mesh.identity.id(),
                "serving mutual TLS; calls are checked against the ACL"
            ),
            None => tracing::warn!(
                "FLOTILLA_TLS_* are not set: serving plain HTTP without identities or ACL (run under `flotilla up` for mutual TLS)"
            ),
        }
        Ok(service)
    }

    /// Like [`Service::from_env`] but from the given variables instead of
    /// the process environment, and without touching logging: for tests and
    /// embedding. With `FLOTILLA_TLS_*` it loads the identity files and the
    /// ACL (`FLOTILLA_ACL_FILE`) now, so a damaged file stops the start.
    pub fn from_vars<I, K, V>(vars: I) -> Result<Service, Error>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let env: Env = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let config = Config::from_env(env)?;
        let mesh = match (&config.tls, &config.acl_file) {
            (Some(tls), Some(acl)) => Some(Arc::new(Mesh::load(tls, acl)?)),
            _ => None,
        };
        Ok(Service {
            config,
            openapi: None,
            readiness: Readiness::default(),
            mesh,
            handshake_timeout: mesh::DEFAULT_HANDSHAKE_TIMEOUT,
        })
    }

    /// The service's name (`FLOTILLA_SERVICE`).
    pub fn name(&self) -> &str {
        &self.config.service
    }

    /// This instance's name (`FLOTILLA_INSTANCE`), e.g. `catalog-0`.
    pub fn instance(&self) -> &str {
        &self.config.instance
    }

    /// The system's name (`FLOTILLA_SYSTEM`).
    pub fn system(&self) -> &str {
        &self.config.system
    }

    /// The address [`Service::serve`] binds.
    pub fn listen_addr(&self) -> SocketAddr {
        self.config.listen
    }

    /// How long shutdown waits for in-flight requests
    /// (`FLOTILLA_DRAIN_SECONDS`, default 10).
    pub fn drain_deadline(&self) -> Duration {
        self.config.drain
    }

    /// `OTEL_SERVICE_NAME`, when the runtime set it.
    pub fn otel_service_name(&self) -> Option<&str> {
        self.config.otel_service_name.as_deref()
    }

    /// The identity files for mTLS, when the runtime provided them.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.config.tls.as_ref()
    }

    /// This instance's SPIFFE id, when it serves mutual TLS.
    pub fn identity(&self) -> Option<flotilla_mesh::SpiffeId> {
        self.mesh.as_ref().map(|m| m.identity.id())
    }

    /// How long a peer has to finish the TLS handshake before its
    /// connection is closed (default 10 s).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The readiness state behind `/readyz`.
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// Serves `doc` at `/openapi.json` instead of the minimal default.
    pub fn with_openapi(mut self, doc: Value) -> Self {
        self.openapi = Some(doc);
        self
    }

    /// A client for declared dependency `dep`, from `FLOTILLA_URL_<DEP>`
    /// (upper-cased, `-` → `_`). Connect timeout 2 s, total 10 s; see
    /// [`Client::with_timeouts`]. Under mutual TLS it presents this
    /// instance's certificate and accepts only a server of `dep`.
    pub fn client(&self, dep: &str) -> Result<Client, Error> {
        Client::new(
            dep,
            self.config.dependency_url(dep)?,
            self.mesh.as_ref().map(|m| m.identity.clone()),
        )
    }

    /// The event broker's client, from `FLOTILLA_BROKER_URL` (set for
    /// services that declare `publishes` or `consumes`). Under mutual TLS it
    /// presents this instance's certificate and accepts only the broker's.
    pub fn broker(&self) -> Result<Broker, Error> {
        Broker::new(
            self.config.broker_url()?,
            self.mesh.as_ref().map(|m| m.identity.clone()),
        )
    }

    /// A new event of type `ty` from this service (`source` `/<service>`);
    /// see [`Event::new`].
    pub fn event(&self, ty: &str, data: impl serde::Serialize) -> Result<Event, Error> {
        Event::new(self.name(), ty, data)
    }

    /// Opens the service's own database from `DATABASE_URL` and runs
    /// `migrator` (see [`crate::open_sqlite`]).
    pub async fn database(&self, migrator: &'static Migrator) -> Result<SqlitePool, Error> {
        let url = self
            .config
            .database_url()
            .ok_or_else(|| Error::NoDatabase {
                service: self.config.service.clone(),
            })?;
        database::open_sqlite(&url, migrator).await
    }

    /// Binds the listen address, so the caller can learn the port (useful
    /// with port 0) before serving.
    pub async fn bind(self) -> Result<Server, Error> {
        let addr = self.config.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        Ok(Server {
            service: self,
            listener,
            local_addr,
        })
    }

    /// Binds and serves `router` with the built-in endpoints until SIGTERM
    /// or SIGINT, then drains. Returns `Ok` after a graceful stop, including
    /// one cut short by the drain deadline.
    ///
    /// `router` must not define `/healthz`, `/readyz`, `/metrics` or
    /// `/openapi.json` itself.
    pub async fn serve(self, router: Router) -> Result<(), Error> {
        self.bind().await?.serve(router).await
    }
}

/// A bound, not yet serving, [`Service`].
#[derive(Debug)]
pub struct Server {
    service: Service,
    listener: TcpListener,
    local_addr: SocketAddr,
}

impl Server {
    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The readiness state behind `/readyz`.
    pub fn readiness(&self) -> Readiness {
        self.service.readiness()
    }

    /// Serves until SIGTERM or SIGINT.
    pub async fn serve(self, router: Router) -> Result<(), Error> {
        let signal = shutdown_signal()?;
        self.serve_until(router, async move {
            let name = signal.await;
            tracing::info!(signal = name, "shutdown requested");
        })
        .await
    }

    /// Serves until `shutdown` completes, then drains: `/readyz` turns 503,
    /// the listener stops accepting, in-flight requests get four fifths of
    /// the drain deadline to finish. The last fifth is for the caller's
    /// own cleanup after this returns (stopping the outbox relay and
    /// consumers, closing the database), which would never run if the
    /// requests took it all: the runtime sends SIGKILL at the deadline.
    pub async fn serve_until<F>(self, router: Router, shutdown: F) -> Result<(), Error>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Server {
            service,
            listener,
            local_addr,
        } = self;
        let handle = metrics::prometheus_handle();
        let openapi = service
            .openapi
            .clone()
            .unwrap_or_else(|| health::default_openapi(service.name()));
        let readiness = service.readiness();
        let app = router
            .merge(health::routes(readiness.clone(), Arc::new(openapi)))
            .layer(axum::middleware::from_fn(metrics::track));
        // Around the router, not inside it: the ACL must decide before
        // routing, on the path the router will then see.
        let app = tower::Layer::layer(
            &axum::middleware::from_fn_with_state(service.mesh.clone(), mesh::authorize),
            app,
        );
        let listener =
            MeshListener::new(listener, service.mesh.as_deref(), service.handshake_timeout)?;

        let upkeep = tokio::spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP_EVERY);
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        });

        let (draining_tx, mut draining_rx) = tokio::sync::watch::channel(false);
        let graceful = async move {
            shutdown.await;
            // Readiness first, so probes see 503 before the listener closes.
            readiness.set_draining();
            let _ = draining_tx.send(true);
        };
        let drain = service.drain_deadline();
        let in_flight = drain * 4 / 5;
        let deadline = async move {
            if draining_rx.wait_for(|draining| *draining).await.is_err() {
                std::future::pending::<()>().await;
            }
            tracing::info!(deadline = ?in_flight, "draining in-flight requests");
            tokio::time::sleep(in_flight).await;
        };

        // service, instance and system are on every line already.
        tracing::info!(addr = %local_addr, drain = ?drain, "listening");
        let server = axum::serve(
            listener,
            axum::ServiceExt::<axum::extract::Request>::into_make_service_with_connect_info::<Peer>(
                app,
            ),
        )
        .with_graceful_shutdown(graceful);
        let result = tokio::select! {
            result = server => result.map_err(|source| Error::Serve { addr: local_addr, source }),
            () = deadline => {
                tracing::warn!(
                    deadline = ?in_flight,
                    "drain deadline passed with requests still in flight; stopping anyway"
                );
                Ok(())
            }
        };
        upkeep.abort();
        if result.is_ok() {
            tracing::info!(addr = %local_addr, "stopped");
        }
        result
    }
}

/// Resolves on the first SIGTERM or SIGINT, naming it. The handlers are
/// installed now, so a failure surfaces before serving starts.
fn shutdown_signal() -> Result<impl Future<Output = &'static str> + Send + 'static, Error> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(|source| Error::Signal {
            signal: "SIGTERM",
            source,
        })?;
        let mut int = signal(SignalKind::interrupt()).map_err(|source| Error::Signal {
            signal: "SIGINT",
            source,
        })?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async move {
            let _ = tokio::signal::ctrl_c().await;
            "ctrl-c"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accessors_and_clients() {
        let s = Service::from_vars([
            ("FLOTILLA_SYSTEM", "shop"),
            ("FLOTILLA_SERVICE", "orders"),
            ("FLOTILLA_INSTANCE", "orders-2"),
            ("FLOTILLA_LISTEN", "127.0.0.1:0"),
            ("FLOTILLA_URL_PRICING", "http://127.0.0.1:40211"),
        ])
        .unwrap();
        assert_eq!(s.name(), "orders");
        assert_eq!(s.instance(), "orders-2");
        assert_eq!(s.system(), "shop");
        assert_eq!(s.listen_addr(), "127.0.0.1:0".parse().unwrap());
        assert_eq!(
            s.client("pricing").unwrap().base_url(),
            "http://127.0.0.1:40211"
        );
        let err = s.client("catalog").unwrap_err().to_string();
        assert!(err.contains("FLOTILLA_URL_CATALOG"), "{err}");
        assert!(err.contains("calls"), "{err}");
        assert_eq!(s.event("order.placed", 1).unwrap().source, "/orders");
    }

    #[test]
    fn broker_without_url_says_what_to_declare() {
        let s = Service::from_vars([("FLOTILLA_SERVICE", "orders")]).unwrap();
        let err = s.broker().unwrap_err().to_string();
        assert!(err.contains("FLOTILLA_BROKER_URL"), "{err}");
        assert!(err.contains("`publishes` or `consumes`"), "{err}");
        assert!(err.contains("`orders`"), "{err}");
        let s = Service::from_vars([
            ("FLOTILLA_SERVICE", "orders"),
            ("FLOTILLA_BROKER_URL", "http://127.0.0.1:41234/"),
        ])
        .unwrap();
        assert_eq!(s.broker().unwrap().base_url(), "http://127.0.0.1:41234");
        let s = Service::from_vars([
            ("FLOTILLA_SERVICE", "orders"),
            ("FLOTILLA_BROKER_URL", "nats://127.0.0.1:4222"),
        ])
        .unwrap();
        let err = s.broker().unwrap_err().to_string();
        assert!(err.contains("FLOTILLA_BROKER_URL"), "{err}");
    }

    #[tokio::test]
    async fn database_without_url_says_what_to_declare() {
        static M: Migrator = Migrator::DEFAULT;
        let s = Service::from_vars([("FLOTILLA_SERVICE", "catalog")]).unwrap();
        let err = s.database(&M).await.unwrap_err().to_string();
        assert!(err.contains("DATABASE_URL"), "{err}");
        assert!(err.contains("data = \"sqlite\""), "{err}");
        assert!(err.contains("`catalog`"), "{err}");
    }
}
