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
//! inventory's and payments' answers, which confirm or cancel it. An order
//! still `placed` after `ORDERS_SAGA_TIMEOUT` (default 30 min) is
//! cancelled by the [`sweeper`] (`timed_out`).

mod api;
mod deps;
mod events;
mod openapi;
mod store;
mod sweeper;

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
    // Not UTF-8: its lossy form, which no duration parses, is refused
    // naming it, rather than taken for unset.
    let saga_timeout = sweeper::timeout_from(
        std::env::var_os(sweeper::TIMEOUT_VAR).map(|v| v.to_string_lossy().into_owned()),
    )?;
    if saga_timeout < sweeper::RETRY_SPAN {
        tracing::warn!(
            saga_timeout = %humantime::format_duration(saga_timeout),
            "ORDERS_SAGA_TIMEOUT is shorter than the broker's retries of a push (about 15 min): an order whose participant is only restarting may be cancelled"
        );
    }
    let catalog = service.client("catalog")?;
    let pricing = service.client("pricing")?;
    let db = service.database(&MIGRATOR).await?;
    Inbox::install(&db).await?;
    let _pruner = flotilla_chassis::inbox::Inbox::spawn_pruner(db.clone());
    Outbox::install(&db).await?;
    let relay = Outbox::spawn_relay(db.clone(), service.broker()?);
    let sweeper = sweeper::spawn(db.clone(), saga_timeout, Some(relay.clone()));
    let state = api::AppState {
        db: db.clone(),
        catalog,
        pricing,
        relay: Some(relay.clone()),
    };
    let served = service.serve(api::router(state)).await;
    // Stopped before the relay: a cancellation cut short rolls back, for
    // the next sweep of any replica; one committed stays in the outbox
    // until a relay (this one before it stops, another replica's, or this
    // service's at its next start) sends it.
    sweeper.abort();
    let _ = sweeper.await;
    relay.stop().await;
    // Closing checkpoints the WAL, leaving a single tidy file behind.
    db.close().await;
    served
}
