//! `shop-payments`: charges orders once their stock is reserved.
//!
//! Its part in the order saga: on `stock.reserved` (pushed by the broker to
//! `/events/stock`) it charges the order's card with the simulated
//! processor in [`card`] and publishes `payment.succeeded` or
//! `payment.failed` to topic `payments` through the chassis outbox, in the
//! transaction that stores the charge. At most one charge per order,
//! however often the event arrives. On `order.cancelled` (pushed to
//! `/events/orders`) it refunds the order's charge, if any
//! (`payment.refunded`), and never charges the order afterwards. It has
//! no public routes.

mod card;
mod events;
mod openapi;
mod store;

use std::process::ExitCode;

use axum::Router;
use axum::routing::post;
use flotilla_chassis::Service;
use flotilla_chassis::inbox::Inbox;
use flotilla_chassis::outbox::{Outbox, RelayHandle};

/// The payments schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[tokio::main]
async fn main() -> ExitCode {
    flotilla_chassis::run_main("shop-payments", run()).await
}

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    pub db: sqlx::SqlitePool,
    /// Publishes what the outbox holds; woken after each commit that
    /// enqueued events. `None` in tests: events stay in the outbox table.
    pub relay: Option<RelayHandle>,
}

/// The routes: only the broker's push endpoints.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/events/stock", post(events::stock))
        .route("/events/orders", post(events::orders))
        .fallback(flotilla_chassis::not_found)
        .with_state(state)
}

async fn run() -> Result<(), flotilla_chassis::Error> {
    let service = Service::from_env()?.with_openapi(openapi::document());
    let db = service.database(&MIGRATOR).await?;
    Inbox::install(&db).await?;
    let _pruner = flotilla_chassis::inbox::Inbox::spawn_pruner(db.clone());
    Outbox::install(&db).await?;
    let relay = Outbox::spawn_relay(db.clone(), service.broker()?);
    let state = AppState {
        db: db.clone(),
        relay: Some(relay.clone()),
    };
    let served = service.serve(router(state)).await;
    relay.stop().await;
    // Closing checkpoints the WAL, leaving a single tidy file behind.
    db.close().await;
    served
}
