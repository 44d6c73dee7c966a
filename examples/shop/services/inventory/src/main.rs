//! `shop-inventory`: how many of each product can still be promised.
//!
//! Its part in the order saga: when an order is placed it reserves all of
//! the order's items or none (`stock.reserved` / `stock.rejected`); when
//! the payment fails it releases them again, the saga's compensation
//! (`stock.released`); when the payment succeeds the reservation is
//! committed. When the order is cancelled for any reason (its saga's
//! deadline included), whatever it still holds is released. Events arrive by push from the broker on `/events/*` and
//! leave through the chassis outbox, each in the transaction of the change
//! it announces. `GET /api/inventory/{sku}` shows a SKU's levels.

mod api;
mod events;
mod openapi;
mod store;

use std::process::ExitCode;

use flotilla_chassis::Service;
use flotilla_chassis::inbox::Inbox;
use flotilla_chassis::outbox::Outbox;

/// The inventory schema and its seed.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[tokio::main]
async fn main() -> ExitCode {
    flotilla_chassis::run_main("shop-inventory", run()).await
}

async fn run() -> Result<(), flotilla_chassis::Error> {
    let service = Service::from_env()?.with_openapi(openapi::document());
    let db = service.database(&MIGRATOR).await?;
    Inbox::install(&db).await?;
    let _pruner = flotilla_chassis::inbox::Inbox::spawn_pruner(db.clone());
    Outbox::install(&db).await?;
    let relay = Outbox::spawn_relay(db.clone(), service.broker()?);
    let state = api::AppState {
        db: db.clone(),
        relay: Some(relay.clone()),
    };
    let served = service.serve(api::router(state)).await;
    relay.stop().await;
    // Closing checkpoints the WAL, leaving a single tidy file behind.
    db.close().await;
    served
}
