//! `shop-orders`: places and lists the reference shop's orders.
//!
//! Owns its orders in its own SQLite database and calls the catalog and
//! pricing services through the URLs the runtime gives it
//! (`FLOTILLA_URL_CATALOG`, `FLOTILLA_URL_PRICING`). Who the customer is
//! comes from the gateway-verified token
//! ([`flotilla_chassis::VerifiedUser`]): orders belong to that user, and
//! nothing the client writes in the body or query can choose another.
//!
//! An order starts the order saga (see [`events`]): placing it publishes
//! `order.placed` through the chassis outbox, and the broker pushes back
//! inventory's and payments' answers, which confirm or cancel it.

mod api;
mod deps;
mod events;
mod openapi;
mod store;

use std::process::ExitCode;

use flotilla_chassis::Service;
use flotilla_chassis::inbox::Inbox;
use flotilla_chassis::outbox::Outbox;

/// The orders schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[tokio::main]
async fn main() -> ExitCode {
    flotilla_chassis::run_main("shop-orders", run()).await
}

async fn run() -> Result<(), flotilla_chassis::Error> {
    let service = Service::from_env()?.with_openapi(openapi::document());
    let catalog = service.client("catalog")?;
    let pricing = service.client("pricing")?;
    let db = service.database(&MIGRATOR).await?;
    Inbox::install(&db).await?;
    let _pruner = flotilla_chassis::inbox::Inbox::spawn_pruner(db.clone());
    Outbox::install(&db).await?;
    let relay = Outbox::spawn_relay(db.clone(), service.broker()?);
    let state = api::AppState {
        db: db.clone(),
        catalog,
        pricing,
        relay: Some(relay.clone()),
    };
    let served = service.serve(api::router(state)).await;
    relay.stop().await;
    // Closing checkpoints the WAL, leaving a single tidy file behind.
    db.close().await;
    served
}
