//! `shop-catalog`: the reference shop's products.
//!
//! Owns the `products` table in its own SQLite database (`DATABASE_URL`),
//! seeded by a migration; runs as several replicas against the same file,
//! which is why every response says which instance served it. Calls the
//! `reviews` service (`FLOTILLA_URL_REVIEWS`) for a product's reviews.
//!
//! A product's `stock` is a copy of inventory's available units, kept up to
//! date by inventory's events, which the broker pushes to `/events/stock`
//! (see [`events`]); handled events are remembered in the chassis inbox so
//! a redelivery changes nothing.

mod api;
mod events;
mod openapi;
mod store;

use std::process::ExitCode;

use flotilla_chassis::Service;
use flotilla_chassis::inbox::Inbox;

/// The catalog's schema and seed data.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[tokio::main]
async fn main() -> ExitCode {
    flotilla_chassis::run_main("shop-catalog", run()).await
}

async fn run() -> Result<(), flotilla_chassis::Error> {
    let service = Service::from_env()?.with_openapi(openapi::document());
    let db = service.database(&MIGRATOR).await?;
    Inbox::install(&db).await?;
    let _pruner = flotilla_chassis::inbox::Inbox::spawn_pruner(db.clone());
    // Reviews are optional on a product page: without the dependency
    // declared (`calls = ["reviews"]`), pages come without them.
    let reviews = service.client("reviews").ok();
    let router = api::router(db.clone(), service.instance(), reviews);
    let served = service.serve(router).await;
    // Closing checkpoints the WAL, leaving a single tidy file behind.
    db.close().await;
    served
}
