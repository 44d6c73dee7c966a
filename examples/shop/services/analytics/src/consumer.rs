//! The stream consumer of `order-analytics` (consumer group `analytics`).
//!
//! A stream, not a queue, because analytics wants every confirmed order in
//! order per customer and may re-read history; the broker partitions it by
//! the `customer` extension. The loop: lease partitions (which also renews
//! them), read each leased partition after its position, apply each record
//! and checkpoint the group's position with the lease's fencing token.
//!
//! Exactly-once counting from at-least-once reading: [`store::apply`]
//! records the partition's last applied sequence in the transaction that
//! adds the sales, and skips anything at or below it. Reading resumes after
//! the further of that and the broker's checkpoint, so a crash between the
//! commit and the checkpoint re-reads a few records and counts none twice.

use std::collections::HashMap;
use std::time::Duration;

use flotilla_chassis::{Broker, Error, Event, Lease, StreamConsumer, UndecodableEvent};
use sqlx::SqlitePool;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::store::{self, Applied, Confirmed};

/// The stream read (`consumes = ["order-analytics"]` in flotilla.toml).
pub const STREAM: &str = "order-analytics";
/// The consumer group: every analytics replica joins it and the partitions
/// are split between them.
pub const GROUP: &str = "analytics";
/// Lease time-to-live; leases are renewed every third of it.
const LEASE_TTL: Duration = Duration::from_secs(30);
/// Most records read from one partition per call.
const READ_LIMIT: usize = 100;
/// When no leased partition had anything new, wait this long before
/// reading again: confirmed orders show up within about a second.
const IDLE: Duration = Duration::from_secs(1);
/// Waits after a failing broker call: from this...
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// ...doubling up to this.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Applies one record and returns whether it was counted. Events other
/// than `order.confirmed`, events the chassis cannot read and events whose
/// data cannot be read are not counted but still passed (and logged): a
/// stream has no dead-letter queue, and one bad record must not stop the
/// partition.
pub async fn apply_record(
    db: &SqlitePool,
    partition: u32,
    sequence: u64,
    event: Result<&Event, &UndecodableEvent>,
) -> Result<Applied, sqlx::Error> {
    let event = match event {
        Ok(event) => event,
        Err(e) => {
            tracing::error!(partition, sequence, id = %e.raw["id"], error = %e, "skipping a record whose event cannot be read");
            return store::apply(db, STREAM, partition, sequence, None).await;
        }
    };
    let order = match event.ty.as_str() {
        "order.confirmed" => match event.data_as::<Confirmed>() {
            Ok(order) => Some(order),
            Err(e) => {
                tracing::error!(partition, sequence, id = %event.id, error = %flotilla_chassis::error_chain(&e), "skipping an order.confirmed whose data cannot be read");
                None
            }
        },
        other => {
            tracing::warn!(
                partition,
                sequence,
                ty = other,
                "skipping an event analytics does not count"
            );
            None
        }
    };
    store::apply(db, STREAM, partition, sequence, order.as_ref()).await
}

/// Reads what is new in `lease`'s partition, applies it and checkpoints.
/// Returns how many records were read.
async fn drain(consumer: &StreamConsumer, db: &SqlitePool, lease: &Lease) -> Result<usize, Error> {
    let local = store::position(db, STREAM, lease.partition)
        .await
        .map_err(|source| Error::Sql {
            what: "read the stream position",
            source,
        })?;
    let after = match (local, lease.checkpoint) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let records = consumer
        .read(lease.partition, after, READ_LIMIT, Duration::ZERO)
        .await?;
    let Some(last) = records.last().map(|r| r.sequence) else {
        // Nothing new; still catch the group checkpoint up if a crash
        // left it behind the local position.
        if let Some(local) = local.filter(|l| lease.checkpoint.is_none_or(|c| c < *l)) {
            consumer.checkpoint(lease, local).await?;
        }
        return Ok(0);
    };
    for record in &records {
        let applied = apply_record(db, record.partition, record.sequence, record.event.as_ref())
            .await
            .map_err(|source| Error::Sql {
                what: "apply a stream record",
                source,
            })?;
        if applied == Applied::Counted {
            metrics::counter!("shop_analytics_records_total").increment(1);
        }
    }
    consumer.checkpoint(lease, last).await?;
    Ok(records.len())
}

/// Leases, reads, applies and checkpoints until `stop` turns true, then
/// leaves the group so the partitions move to other members at once.
pub async fn run(broker: Broker, db: SqlitePool, member: String, mut stop: watch::Receiver<bool>) {
    let consumer = match broker.stream_consumer(STREAM, GROUP, &member) {
        Ok(c) => c.with_lease_ttl(LEASE_TTL),
        Err(e) => {
            tracing::error!(error = %flotilla_chassis::error_chain(&e), "cannot consume the stream");
            return;
        }
    };
    let mut leases: Vec<Lease> = Vec::new();
    let mut renewed: Option<Instant> = None;
    let mut backoff = BACKOFF_MIN;
    tracing::info!(stream = STREAM, group = GROUP, member, "consuming");
    while !*stop.borrow() {
        let mut pause = IDLE;
        if renewed.is_none_or(|at| at.elapsed() >= LEASE_TTL / 3) {
            match consumer.lease().await {
                Ok(now) => {
                    let held: Vec<u32> = now.iter().map(|l| l.partition).collect();
                    if held != leases.iter().map(|l| l.partition).collect::<Vec<_>>() {
                        tracing::info!(partitions = ?held, "leases changed");
                    }
                    leases = now;
                    renewed = Some(Instant::now());
                    backoff = BACKOFF_MIN;
                }
                Err(e) => {
                    tracing::warn!(error = %flotilla_chassis::error_chain(&e), retry_in = ?backoff, "lease failed");
                    pause = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    leases.clear();
                    renewed = None;
                }
            }
        }
        let mut lost: HashMap<u32, ()> = HashMap::new();
        let mut busy = false;
        for lease in &leases {
            match drain(&consumer, &db, lease).await {
                Ok(n) => busy |= n == READ_LIMIT,
                Err(Error::Broker { code, .. }) if code == "lease_lost" => {
                    tracing::info!(partition = lease.partition, "lease lost to another member");
                    lost.insert(lease.partition, ());
                }
                Err(e) => {
                    tracing::warn!(partition = lease.partition, error = %flotilla_chassis::error_chain(&e), "reading the partition failed; retrying");
                    pause = pause.max(BACKOFF_MIN);
                }
            }
        }
        if !lost.is_empty() {
            leases.retain(|l| !lost.contains_key(&l.partition));
            renewed = None;
        }
        // A full read means more is waiting: go again at once.
        if busy {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => break,
        }
    }
    if let Err(e) = consumer.leave().await {
        tracing::warn!(error = %flotilla_chassis::error_chain(&e), "could not leave the group; leases lapse after their TTL");
    }
    tracing::info!(stream = STREAM, "stopped consuming");
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn confirmed(id: &str, ty: &str, data: serde_json::Value) -> Event {
        serde_json::from_value(json!({
            "specversion": "1.0", "id": id, "source": "/orders", "type": ty,
            "customer": "alice", "orderid": "o-1", "data": data
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn counts_confirmed_orders_once_and_passes_over_the_rest() {
        let db = flotilla_chassis::open_sqlite("sqlite::memory:", &crate::MIGRATOR)
            .await
            .unwrap();
        let good = confirmed(
            "e-1",
            "order.confirmed",
            json!({"order_id": "o-1", "customer": "alice", "currency": "EUR", "total_cents": 2900,
                   "items": [{"sku": "sku-mug", "quantity": 2, "unit_price_cents": 1450}]}),
        );
        assert_eq!(
            apply_record(&db, 0, 1, Ok(&good)).await.unwrap(),
            Applied::Counted
        );
        assert_eq!(
            apply_record(&db, 0, 1, Ok(&good)).await.unwrap(),
            Applied::AlreadyCounted
        );
        let unreadable = confirmed("e-2", "order.confirmed", json!({"items": "?"}));
        assert_eq!(
            apply_record(&db, 0, 2, Ok(&unreadable)).await.unwrap(),
            Applied::Counted
        );
        let other = confirmed("e-3", "order.cancelled", json!({}));
        assert_eq!(
            apply_record(&db, 0, 3, Ok(&other)).await.unwrap(),
            Applied::Counted
        );
        let binary = UndecodableEvent {
            reason: "binary data (`data_base64`) is not supported".into(),
            raw: json!({"specversion": "1.0", "id": "e-4", "data_base64": "AA=="}),
        };
        assert_eq!(
            apply_record(&db, 0, 4, Err(&binary)).await.unwrap(),
            Applied::Counted
        );
        let sales = store::sales(&db).await.unwrap();
        assert_eq!(sales.len(), 1);
        assert_eq!((sales[0].units, sales[0].revenue_cents), (2, 2900));
        assert_eq!(store::position(&db, STREAM, 0).await.unwrap(), Some(4));
    }
}
