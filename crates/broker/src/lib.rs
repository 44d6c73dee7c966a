//! The event broker: queues, pub/sub topics and ordered streams.
//!
//! Services talk asynchronously through "dumb pipes". This crate is that
//! pipe, with the semantics people already rely on: work queues as in SQS
//! (visibility timeouts, receive counts, dead-letter queues and redrive,
//! long polling, delays, FIFO groups with deduplication), fan-out topics as
//! in SNS (filter policies on CloudEvent attributes) and partitioned,
//! ordered streams as in Kinesis (iterators, consumer groups with leases
//! and checkpoints). Events are CloudEvents 1.0.
//!
//! Two engines implement one [`Engine`] trait: the embedded engine (a
//! durable redb file, nothing to install; the default) and NATS JetStream
//! (for when the system outgrows one machine; the broker then keeps no
//! state). `docs/broker.md` explains the storage choice, the HTTP API and
//! what the NATS engine cannot honour.
//!
//! The public surface a runtime embeds:
//!
//! - [`Config`] (topics, queues, streams, engine, limits) and
//!   [`Config::validate`];
//! - [`Broker::open`], [`Broker::router`] (the HTTP API as an axum
//!   router), [`Broker::serve`], [`Broker::engine`], [`Broker::close`];
//! - [`CloudEvent`] and [`FilterPolicy`] for building events and
//!   subscriptions in code;
//! - [`Error`] for why the broker could not open.

pub mod cloudevent;
pub mod config;
pub mod engine;
pub mod filter;
pub mod http;
pub mod metrics;
mod push;
mod secure;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

pub use cloudevent::{CloudEvent, EventError};
pub use config::{
    Config, ConfigError, Durability, EmbeddedConfig, EngineConfig, Limits, NatsConfig, PushConfig,
    PushSubscription, QueueConfig, StreamConfig, Subscription, TopicConfig, Topology,
};
pub use engine::{Engine, EngineError};
pub use filter::FilterPolicy;

/// How often depth gauges are refreshed.
const METRICS_EVERY: Duration = Duration::from_secs(5);

/// Why the broker could not open.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid broker configuration")]
    Config(#[from] ConfigError),
    #[error("the broker has no identity to serve mutual TLS with; set Config::identity")]
    NoIdentity,
    #[error("cannot load the broker's identity")]
    Identity(#[source] flotilla_mesh::tls::TlsError),
    #[error("cannot start the {engine} engine")]
    Engine {
        engine: &'static str,
        #[source]
        source: EngineError,
    },
}

/// A running broker: an engine plus its push deliveries. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Arc<dyn Engine>,
    limits: Limits,
    identity: Option<flotilla_mesh::Identity>,
    _reloader: Option<flotilla_mesh::tls::Reloader>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Broker {
    /// Validates `config`, opens its engine, and starts push delivery for
    /// every subscription that has one. Must run inside a tokio runtime.
    pub async fn open(config: Config) -> Result<Self, Error> {
        let topology = config.validate()?;
        let mut limits = config.limits.clone();
        let identity = match &config.identity {
            Some(files) => {
                Some(flotilla_mesh::Identity::load(files.clone()).map_err(Error::Identity)?)
            }
            None => None,
        };
        // Renewed certificates are picked up without a restart.
        let reloader = identity
            .as_ref()
            .map(|i| i.spawn_reloader(Duration::from_secs(1)));
        let engine: Arc<dyn Engine> = match &config.engine {
            EngineConfig::Embedded(e) => Arc::new(
                engine::embedded::EmbeddedEngine::open(&topology, e)
                    .await
                    .map_err(|source| Error::Engine {
                        engine: "embedded",
                        source,
                    })?,
            ),
            EngineConfig::Nats(n) => {
                let nats = engine::nats::NatsEngine::open(&topology, n, limits.max_event_bytes)
                    .await
                    .map_err(|source| Error::Engine {
                        engine: "nats",
                        source,
                    })?;
                // The server's max_payload may lower the limit: the API then
                // refuses larger events with 413 before they reach NATS.
                limits.max_event_bytes = nats.max_event_bytes();
                Arc::new(nats)
            }
        };
        let (shutdown, rx) = watch::channel(false);
        let mut tasks = Vec::new();
        for spec in topology.queues.values() {
            if let Some(push) = &spec.config.deliver {
                tasks.push(push::spawn_queue(
                    engine.clone(),
                    spec.name.clone(),
                    push.clone(),
                    spec.config.max_receives,
                    spec.config.fifo,
                    identity.clone(),
                    rx.clone(),
                ));
            }
        }
        // Each broker process is one consumer of the push group; replicas
        // split the partitions between them.
        let consumer = format!("broker-{}", uuid::Uuid::new_v4().simple());
        for spec in topology.streams.values() {
            if let Some(push) = &spec.config.deliver {
                tasks.push(push::spawn_stream(
                    engine.clone(),
                    spec.name.clone(),
                    push.clone(),
                    consumer.clone(),
                    identity.clone(),
                    rx.clone(),
                ));
            }
        }
        tasks.push(metrics::spawn_refresh(
            engine.clone(),
            topology,
            METRICS_EVERY,
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                limits,
                identity,
                _reloader: reloader,
                shutdown,
                tasks: Mutex::new(tasks),
            }),
        })
    }

    /// The engine, for embedding code that calls it directly.
    pub fn engine(&self) -> Arc<dyn Engine> {
        self.inner.engine.clone()
    }

    /// The limits the HTTP API applies: `Config.limits`, with
    /// `max_event_bytes` lowered to what the engine can store (on NATS, the
    /// server's `max_payload` less room for headers).
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The HTTP API (see `docs/broker.md`).
    pub fn router(&self) -> axum::Router {
        http::router(self.inner.engine.clone(), self.inner.limits.clone())
    }

    /// Serves the HTTP API on `listener` until [`Broker::close`] is called.
    pub async fn serve(&self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let mut rx = self.inner.shutdown.subscribe();
        axum::serve(listener, self.router())
            .with_graceful_shutdown(async move {
                let _ = rx.wait_for(|stop| *stop).await;
            })
            .await
    }

    /// Serves the HTTP API on `listener` over mutual TLS with the broker's
    /// identity until [`Broker::close`] is called: only peers of the same
    /// system and environment connect, and each call must be one `grants`
    /// allows (a service publishes to the topics it declared and consumes
    /// its own queues and streams; anything else is 403 `exposure_denied`).
    /// Fails if the broker was opened without [`Config::identity`].
    pub async fn serve_mesh(
        &self,
        listener: tokio::net::TcpListener,
        grants: flotilla_mesh::Grants,
    ) -> Result<(), Error> {
        let identity = self.inner.identity.clone().ok_or(Error::NoIdentity)?;
        let acceptor = flotilla_mesh::server_config(&identity).map_err(Error::Identity)?;
        let app = secure::authorized(self.router(), grants);
        secure::serve(
            listener,
            app,
            tokio_rustls::TlsAcceptor::from(acceptor),
            self.inner.shutdown.subscribe(),
        )
        .await;
        Ok(())
    }

    /// Stops push delivery and the HTTP server, then flushes and closes the
    /// engine.
    pub async fn close(&self) {
        let _ = self.inner.shutdown.send(true);
        let tasks: Vec<_> = self
            .inner
            .tasks
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default();
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        self.inner.engine.close().await;
    }
}
