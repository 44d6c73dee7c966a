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
//!   forwards the incoming `x-request-id`.
//! - [`Service::database`] opens the service's SQLite database (WAL, busy
//!   timeout, foreign keys) and migrates it safely across replicas.
//! - [`ApiError`] is the one mapping from errors to HTTP responses, with
//!   [`ApiJson`]/[`ApiQuery`] extractors that reject in the same shape.
//! - With the identity the runtime gives (`FLOTILLA_TLS_*`,
//!   `FLOTILLA_ACL_FILE`), [`Service::serve`] speaks mutual TLS 1.3 only,
//!   checks every request against the ACL before routing (403
//!   `acl_denied`), serves the normalised path, drops `x-flotilla-user-*`
//!   unless the caller is the gateway and puts the caller in the request as
//!   [`Caller`]; [`Service::client`] presents the identity and accepts only
//!   the dependency's. Certificates are reloaded when renewed. Without those
//!   variables (unit tests, a binary run by hand) it serves plain HTTP.
//!
//! Not yet: tracing export, broker and object-store clients.

mod api;
mod client;
mod config;
mod database;
mod error;
mod health;
mod logging;
mod mesh;
pub mod metrics;
pub mod request_id;
mod service;
pub mod tls;

pub use api::{ApiError, ApiJson, ApiQuery, FieldError, not_found};
pub use client::{Client, DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT};
pub use database::open_sqlite;
pub use error::{Error, error_chain};
pub use health::Readiness;
pub use logging::{format_rfc3339, init_logging, now_rfc3339};
pub use mesh::{Caller, DEFAULT_HANDSHAKE_TIMEOUT};
pub use service::{Server, Service};
