//! `shop-analytics`: units and revenue per product.
//!
//! Reads the `order-analytics` stream (confirmed orders, partitioned by
//! customer) as a member of consumer group `analytics`: see [`consumer`].
//! `GET /api/analytics/sales` serves the totals.

mod api;
mod consumer;
mod openapi;
mod store;

use std::process::ExitCode;
use std::time::Duration;

use flotilla_chassis::Service;

/// The analytics schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long shutdown waits for the consumer to finish and leave the group.
const CONSUMER_STOP: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> ExitCode {
    flotilla_chassis::run_main("shop-analytics", run()).await
}

async fn run() -> Result<(), flotilla_chassis::Error> {
    let service = Service::from_env()?.with_openapi(openapi::document());
    let db = service.database(&MIGRATOR).await?;
    let broker = service.broker()?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // The instance name is the group member's: stable across restarts, so
    // a restarted instance gets its own partitions back.
    let member = service.instance().to_owned();
    let consumer = tokio::spawn(consumer::run(broker, db.clone(), member, stopped));
    let served = service.serve(api::router(db.clone())).await;
    let _ = stop.send(true);
    if tokio::time::timeout(CONSUMER_STOP, consumer).await.is_err() {
        tracing::warn!("the consumer did not stop in time; its leases lapse after their TTL");
    }
    // Closing checkpoints the WAL, leaving a single tidy file behind.
    db.close().await;
    served
}
