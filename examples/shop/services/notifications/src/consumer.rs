//! The pull consumer of queue `notifications`.
//!
//! Unlike the saga's services, which the broker pushes to, notifications
//! asks for work: a background task long-polls the queue (up to 20 s per
//! call, so an idle consumer costs one request per 20 s), applies each
//! message and acks it. That is the right shape for a consumer that may be
//! slow or offline for a while: the queue holds the backlog, and nothing
//! has to reach the consumer over the network.
//!
//! Delivery is at least once. Each message is applied in one transaction
//! with the chassis inbox claim, so a redelivery (the ack was lost, or
//! visibility expired mid-work) changes nothing. A message that fails is
//! not acked: it becomes visible again after the queue's visibility
//! timeout and, after `max_receives` tries, moves to `notifications-dlq`.
//! One whose event cannot be read at all (binary data from some other
//! publisher), or whose data is not an order that ended, never will be, so
//! it is released at once instead, which
//! spends those tries without waiting and moves it to the dead-letter queue
//! within a moment, where someone can look at it.

use std::time::Duration;

use flotilla_chassis::{Broker, Event, ReceiveOptions};
use sqlx::SqlitePool;
use tokio::sync::watch;

use crate::store::{self, OrderEnded};

/// The queue consumed (`consumes = ["notifications"]` in flotilla.toml).
pub const QUEUE: &str = "notifications";
/// The inbox consumer name.
const CONSUMER: &str = "notifications";
/// Waits between failed receives: from this...
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// ...doubling up to this, so an unreachable broker is not hammered.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What applying one event came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A new message for the customer.
    Stored,
    /// Seen before (same event, or another event for the same outcome).
    Duplicate,
    /// Not an event notifications tells anyone about.
    Ignored,
}

/// Applies one event: inbox claim and message, in one transaction.
pub async fn apply(db: &SqlitePool, event: &Event) -> Result<Applied, flotilla_chassis::Error> {
    // The type first: an event of another type (a filter widened by
    // mistake) is ignored, not read as an order that ended and failed.
    if !store::KINDS.contains(&event.ty.as_str()) {
        return Ok(Applied::Ignored);
    }
    let order: OrderEnded = event.data_as()?;
    let Some(message) = store::message(&event.ty, &order) else {
        return Ok(Applied::Ignored);
    };
    let mut tx = db.begin().await.map_err(sql("begin a transaction"))?;
    if !flotilla_chassis::inbox::claim(&mut tx, CONSUMER, event).await? {
        return Ok(Applied::Duplicate);
    }
    let new = store::insert(&mut tx, &event.ty, &order, &message)
        .await
        .map_err(sql("store a notification"))?;
    tx.commit().await.map_err(sql("commit a notification"))?;
    Ok(if new {
        Applied::Stored
    } else {
        Applied::Duplicate
    })
}

fn sql(what: &'static str) -> impl FnOnce(sqlx::Error) -> flotilla_chassis::Error {
    move |source| flotilla_chassis::Error::Sql { what, source }
}

/// Receives, applies and acks until `stop` turns true. A batch in hand is
/// finished first; a long poll in progress is abandoned (its messages, if
/// any arrive, become visible again after the visibility timeout).
pub async fn run(broker: Broker, db: SqlitePool, mut stop: watch::Receiver<bool>) {
    let mut backoff = BACKOFF_MIN;
    let options = ReceiveOptions {
        max_messages: 10,
        wait: Duration::from_secs(20),
        visibility_timeout: None,
    };
    tracing::info!(queue = QUEUE, "consuming");
    while !*stop.borrow() {
        let received = tokio::select! {
            received = broker.receive(QUEUE, options) => received,
            _ = stop.changed() => break,
        };
        let messages = match received {
            Ok(messages) => {
                backoff = BACKOFF_MIN;
                messages
            }
            Err(e) => {
                tracing::warn!(queue = QUEUE, error = %flotilla_chassis::error_chain(&e), retry_in = ?backoff, "receive failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => break,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        for message in messages {
            let event = match &message.event {
                Ok(event) => event,
                Err(e) => {
                    tracing::error!(message_id = %message.message_id, receive_count = message.receive_count, error = %e, "cannot read the event; releasing it towards the dead-letter queue");
                    metrics::counter!("shop_notifications_events_total", "outcome" => "undecodable").increment(1);
                    if let Err(e) = broker.release(QUEUE, &message.receipt).await {
                        tracing::warn!(message_id = %message.message_id, error = %flotilla_chassis::error_chain(&e), "release failed; the message comes back after its visibility timeout");
                    }
                    continue;
                }
            };
            match apply(&db, event).await {
                Ok(applied) => {
                    tracing::info!(id = %event.id, ty = %event.ty, ?applied, "notification handled");
                    metrics::counter!("shop_notifications_events_total", "outcome" => format!("{applied:?}").to_lowercase()).increment(1);
                    if let Err(e) = broker.ack(QUEUE, &message.receipt).await {
                        // Stale receipt: it was redelivered meanwhile and
                        // the inbox will recognise it. Anything else: the
                        // same, after the visibility timeout.
                        tracing::warn!(id = %event.id, error = %flotilla_chassis::error_chain(&e), "ack failed; the message will come back and be recognised");
                    }
                }
                // Data that does not read as an order that ended never
                // will: released at once, like an unreadable event, so it
                // reaches the dead-letter queue in moments rather than
                // after `max_receives` visibility timeouts of errors.
                Err(e @ flotilla_chassis::Error::EventData { .. }) => {
                    tracing::error!(id = %event.id, ty = %event.ty, receive_count = message.receive_count, error = %flotilla_chassis::error_chain(&e), "cannot read the event's data; releasing it towards the dead-letter queue");
                    metrics::counter!("shop_notifications_events_total", "outcome" => "undecodable").increment(1);
                    if let Err(e) = broker.release(QUEUE, &message.receipt).await {
                        tracing::warn!(id = %event.id, error = %flotilla_chassis::error_chain(&e), "release failed; the message comes back after its visibility timeout");
                    }
                }
                Err(e) => {
                    tracing::error!(id = %event.id, ty = %event.ty, receive_count = message.receive_count, error = %flotilla_chassis::error_chain(&e), "could not apply; left for redelivery");
                }
            }
        }
    }
    tracing::info!(queue = QUEUE, "stopped consuming");
}

#[cfg(test)]
mod tests {
    use axum::body::{Body, to_bytes};
    use axum::http::{Request, StatusCode};
    use serde_json::{Value, json};
    use tower::ServiceExt;

    use super::*;

    async fn db() -> SqlitePool {
        let db = flotilla_chassis::open_sqlite("sqlite::memory:", &crate::MIGRATOR)
            .await
            .unwrap();
        flotilla_chassis::Inbox::install(&db).await.unwrap();
        db
    }

    fn event(id: &str, ty: &str, order: &str, customer: &str, reason: Option<&str>) -> Event {
        serde_json::from_value(json!({
            "specversion": "1.0", "id": id, "source": "/orders", "type": ty,
            "customer": customer, "orderid": order,
            "data": {"order_id": order, "customer": customer, "total_cents": 1234,
                     "currency": "EUR", "items": [], "reason": reason}
        }))
        .unwrap()
    }

    async fn list(db: &SqlitePool, user: Option<&str>) -> (StatusCode, Value) {
        let mut req = Request::get("/api/notifications");
        if let Some(user) = user {
            req = req.header(flotilla_chassis::USER_HEADER, user);
        }
        let res = crate::api::router(db.clone())
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let bytes = to_bytes(res.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn stores_one_message_per_outcome_and_serves_the_customers_own() {
        let db = db().await;
        let confirmed = event("e-1", "order.confirmed", "aaaaaaaa-1", "alice", None);
        assert_eq!(apply(&db, &confirmed).await.unwrap(), Applied::Stored);
        // Redelivered: the inbox recognises it.
        assert_eq!(apply(&db, &confirmed).await.unwrap(), Applied::Duplicate);
        // Re-published under a new id: the unique (order, kind) does.
        let again = event("e-9", "order.confirmed", "aaaaaaaa-1", "alice", None);
        assert_eq!(apply(&db, &again).await.unwrap(), Applied::Duplicate);
        let cancelled = event(
            "e-2",
            "order.cancelled",
            "bbbbbbbb-2",
            "alice",
            Some("payment_declined"),
        );
        assert_eq!(apply(&db, &cancelled).await.unwrap(), Applied::Stored);
        let bobs = event("e-3", "order.confirmed", "cccccccc-3", "bob", None);
        assert_eq!(apply(&db, &bobs).await.unwrap(), Applied::Stored);
        let placed = event("e-4", "order.placed", "dddddddd-4", "alice", None);
        assert_eq!(apply(&db, &placed).await.unwrap(), Applied::Ignored);

        let (status, body) = list(&db, Some("alice")).await;
        assert_eq!(status, StatusCode::OK);
        let messages: Vec<&str> = body["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["message"].as_str().unwrap())
            .collect();
        assert_eq!(
            messages,
            [
                "Order #bbbbbbbb cancelled: payment declined",
                "Order #aaaaaaaa confirmed — €12.34"
            ]
        );
        let (status, _) = list(&db, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn unreadable_data_is_an_event_data_error_so_the_message_is_released() {
        let db = db().await;
        let bad: Event = serde_json::from_value(json!({
            "specversion": "1.0", "id": "e-1", "source": "/orders",
            "type": "order.confirmed", "data": {"nope": 1}
        }))
        .unwrap();
        let err = apply(&db, &bad).await.unwrap_err();
        assert!(
            matches!(err, flotilla_chassis::Error::EventData { .. }),
            "{err}"
        );
        // Another type is ignored whatever its data.
        let other: Event = serde_json::from_value(json!({
            "specversion": "1.0", "id": "e-2", "source": "/orders",
            "type": "order.placed", "data": {"nope": 1}
        }))
        .unwrap();
        assert_eq!(apply(&db, &other).await.unwrap(), Applied::Ignored);
    }
}
