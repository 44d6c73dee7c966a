//! `shop-orders`: places and lists the reference shop's orders.
//!
//! Owns its orders in its own SQLite database and calls the catalog and
//! pricing services through the URLs the runtime gives it
//! (`FLOTILLA_URL_CATALOG`, `FLOTILLA_URL_PRICING`). Who the customer is
//! comes from the request for now: see [`customer`].

mod api;
mod customer;
mod deps;
mod openapi;
mod store;

use std::process::ExitCode;

use flotilla_chassis::{Service, error_chain};

/// The orders schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[tokio::main]
async fn main() -> ExitCode {
    flotilla_chassis::init_logging();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %error_chain(&e), "shop-orders stopped");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), flotilla_chassis::Error> {
    let service = Service::from_env()?.with_openapi(openapi::document());
    let catalog = service.client("catalog")?;
    let pricing = service.client("pricing")?;
    let db = service.database(&MIGRATOR).await?;
    let state = api::AppState {
        db: db.clone(),
        catalog,
        pricing,
    };
    let served = service.serve(api::router(state)).await;
    // Closing checkpoints the WAL, leaving a single tidy file behind.
    db.close().await;
    served
}
