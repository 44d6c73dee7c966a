//! # flotilla-chassis
//!
//! What a Rust service links to honour the Flotilla runtime contract.
//!
//! The runtime starts every instance with its identity, listen address,
//! dependency URLs and database in environment variables, and expects
//! health, readiness, metrics and an API description over HTTP, JSON logs on
//! stdout and a graceful stop on SIGTERM. Every service needs all of that and
//! none of it is business logic, so it lives here once: a service is a
//! router plus a few lines of `main`.
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use flotilla_chassis::Service;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), flotilla_chassis::Error> {
//!     let service = Service::from_env()?;           // reads FLOTILLA_*, logs JSON
//!     let pricing = service.client("pricing")?;     // FLOTILLA_URL_PRICING
//!     let app = Router::new().route("/api/hello", get(|| async { "hi" }));
//!     service.serve(app).await                      // + /healthz /readyz /metrics /openapi.json
//! }
//! ```
//!
//! What the pieces do:
//!
//! - [`Service::from_env`] validates the contract and fails fast with the
//!   variable's name and the fix.
//! - [`Service::serve`] adds `/healthz`, `/readyz`, `/metrics` (Prometheus:
//!   `http_requests_total`, `http_request_duration_seconds`,
//!   `http_requests_in_flight`, labelled by route template) and
//!   `/openapi.json` ([`Service::with_openapi`]); on SIGTERM/SIGINT it turns
//!   `/readyz` to 503, stops accepting and drains within
//!   `FLOTILLA_DRAIN_SECONDS` (default 10).
//! - [`Service::client`] gives a [`Client`] for a declared dependency whose
//!   errors tell unreachable, timeout, non-2xx and bad JSON apart, and which
//!   forwards the incoming `x-request-id` and `traceparent`.
//! - [`Service::database`] opens the service's SQLite database (WAL, busy
//!   timeout, foreign keys) and migrates it safely across replicas, with
//!   foreign keys off while migrations run (so a table rebuild does not
//!   cascade) and checked before they commit.
//! - [`ApiError`] is the one mapping from errors to HTTP responses, with
//!   [`ApiJson`]/[`ApiQuery`] extractors that reject in the same shape and
//!   [`int_param`] for a ranged whole-number parameter such as `limit`.
//! - With the identity the runtime gives (`FLOTILLA_TLS_*`,
//!   `FLOTILLA_ACL_FILE`), [`Service::serve`] speaks mutual TLS 1.3 only,
//!   checks every request against the ACL before routing (403
//!   `acl_denied`), serves the normalised path, drops `x-flotilla-user-*`
//!   unless the caller is the gateway and puts the caller in the request as
//!   [`Caller`]; [`Service::client`] presents the identity and accepts only
//!   the dependency's. Certificates are reloaded when renewed. Without those
//!   variables (unit tests, a binary run by hand) it serves plain HTTP.
//! - [`VerifiedUser`] extracts the end user the gateway verified
//!   ([`USER_HEADER`], `x-flotilla-user-id`) and answers 401
//!   `unauthenticated` without one.
//! - [`openapi::error_response`] and [`openapi::error_schema`] describe the
//!   [`ApiError`] body once for every service's `/openapi.json`.
//! - [`run_main`] is a binary's `main`: JSON logs, run, exit code, the
//!   error's whole chain logged.
//!
//! - Events ([`events`], [`broker`], [`outbox`], [`inbox`]):
//!   [`Event`] is a CloudEvent 1.0 ([`Service::event`] stamps the source,
//!   a UUID, the time and the incoming `traceparent`); [`Service::broker`]
//!   gives a [`Broker`] (`FLOTILLA_BROKER_URL`, mutual TLS to the broker)
//!   to publish, receive/ack/extend/release queue messages and read streams
//!   as a consumer group member ([`StreamConsumer`]); its errors keep the
//!   broker's status and code ([`Error::Broker`], e.g. 409 `stale_receipt`).
//!   [`outbox::enqueue`] writes an event in the caller's transaction and
//!   the relay ([`Outbox::spawn_relay`]) publishes it after the commit, in
//!   order, retrying until the broker has it; [`inbox::claim`] makes a
//!   consumer handle each event once, and [`inbox::handle_once`] wraps a
//!   push handler's work in the transaction that claims the event;
//!   [`PushedEvent`] extracts a pushed event and answers 400 to anything
//!   else so the broker dead-letters it; [`Handled`] answers 200 with the
//!   outcome.
//!   Delivery is at least once everywhere: consumers deduplicate with
//!   [`inbox::claim`].
//!
//! Publishing through the outbox: the order and its event commit together.
//!
//! ```no_run
//! use flotilla_chassis::{ApiError, Outbox, RelayHandle, Service, outbox};
//! use sqlx::SqlitePool;
//!
//! static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate::Migrator::DEFAULT;
//!
//! async fn start(service: &Service) -> Result<(SqlitePool, RelayHandle), flotilla_chassis::Error> {
//!     let pool = service.database(&MIGRATOR).await?;
//!     Outbox::install(&pool).await?;
//!     let relay = Outbox::spawn_relay(pool.clone(), service.broker()?);
//!     Ok((pool, relay))
//! }
//!
//! async fn place(service: &Service, pool: &SqlitePool, relay: &RelayHandle) -> Result<(), ApiError> {
//!     let mut tx = pool.begin().await?;
//!     sqlx::query("INSERT INTO orders (id) VALUES ('o-1')").execute(&mut *tx).await?;
//!     let event = service.event("order.placed", serde_json::json!({"order": "o-1"}))?;
//!     outbox::enqueue(&mut tx, "orders", &event).await?;
//!     tx.commit().await?;
//!     relay.notify(); // publish now rather than at the next poll
//!     Ok(())
//! }
//! ```
//!
//! An idempotent push handler: the inbox row and the handler's writes
//! commit together, so a redelivered event is acknowledged and skipped.
//!
//! ```no_run
//! use axum::extract::State;
//! use flotilla_chassis::{ApiError, Handled, PushedEvent, inbox};
//! use sqlx::SqlitePool;
//!
//! #[derive(serde::Deserialize)]
//! struct OrderPlaced { order: String }
//!
//! // Router::new().route("/events/orders", post(on_order_placed)), after
//! // Inbox::install(&pool) at start.
//! async fn on_order_placed(
//!     State(pool): State<SqlitePool>,
//!     PushedEvent(event): PushedEvent,
//! ) -> Result<Handled, ApiError> {
//!     let placed: OrderPlaced = event.data_as()?; // bad data: 400, dead-lettered
//!     // One transaction: claim the event, apply it, commit.
//!     let done = inbox::handle_once(&pool, "reserve-stock", &event, async |tx| {
//!         sqlx::query("INSERT INTO reservations (order_id) VALUES (?1)")
//!             .bind(&placed.order)
//!             .execute(&mut *tx)
//!             .await?;
//!         Ok::<_, ApiError>(Handled::new("reserved"))
//!     })
//!     .await?;
//!     Ok(done.unwrap_or(Handled::DUPLICATE)) // 2xx acks; 5xx makes the broker retry
//! }
//! ```
//!
//! Not yet: tracing export (events carry the incoming `traceparent` on, but
//! the chassis starts no spans), object-store clients.

mod api;
pub mod broker;
mod client;
mod config;
mod database;
mod error;
pub mod events;
mod health;
pub mod inbox;
mod logging;
mod mesh;
pub mod metrics;
pub mod openapi;
pub mod outbox;
pub mod request_id;
mod service;
pub mod tls;
mod trace;
mod user;

pub use api::{ApiError, ApiJson, ApiQuery, FieldError, int_param, not_found};
pub use broker::{
    Broker, Lease, Message, ReceiveOptions, Record, StreamConsumer, UndecodableEvent,
};
pub use client::{Client, DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT};
pub use database::open_sqlite;
pub use error::{Error, error_chain};
pub use events::{Event, Handled, PushedEvent};
pub use health::Readiness;
pub use inbox::Inbox;
pub use logging::{format_rfc3339, init_logging, now_rfc3339, run_main};
pub use mesh::{Caller, DEFAULT_HANDSHAKE_TIMEOUT};
pub use outbox::{Outbox, RelayHandle};
pub use service::{Server, Service};
pub use user::{USER_HEADER, VerifiedUser};
