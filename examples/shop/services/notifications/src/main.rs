//! `shop-notifications`: tells customers how their orders ended.
//!
//! A pull consumer of queue `notifications` (which subscribes to topic
//! `orders` for `order.confirmed` and `order.cancelled`): see [`consumer`].
//! It keeps one human-readable message per order outcome and serves the
//! signed-in customer's at `GET /api/notifications`.

mod api;
mod consumer;
mod openapi;
mod store;

use std::process::ExitCode;
use std::time::Duration;

use flotilla_chassis::Service;

/// The notifications schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long shutdown waits for the consumer to finish its batch.
const CONSUMER_STOP: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> ExitCode {
    flotilla_chassis::run_main("shop-notifications", run()).await
}

async fn run() -> Result<(), flotilla_chassis::Error> {
    let service = Service::from_env()?.with_openapi(openapi::document());
    let db = service.database(&MIGRATOR).await?;
    flotilla_chassis::inbox::Inbox::install(&db).await?;
    let _pruner = flotilla_chassis::inbox::Inbox::spawn_pruner(db.clone());
    let broker = service.broker()?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let consumer = tokio::spawn(consumer::run(broker, db.clone(), stopped));
    let served = service.serve(api::router(db.clone())).await;
    let _ = stop.send(true);
    if tokio::time::timeout(CONSUMER_STOP, consumer).await.is_err() {
        tracing::warn!("the consumer did not stop in time; its messages will be redelivered");
    }
    // Closing checkpoints the WAL, leaving a single tidy file behind.
    db.close().await;
    served
}
