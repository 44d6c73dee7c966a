//! Payments' part in the order saga.
//!
//! Consumed: `stock.reserved` on `POST /events/stock` (pushed by the
//! broker, deduplicated by the chassis inbox). Published to topic
//! `payments` through the chassis outbox, in the transaction that stores
//! the charge: `payment.succeeded` {order_id, customer, amount_cents,
//! charge_id} or `payment.failed` {order_id, customer, reason}.

use axum::extract::State;
use flotilla_chassis::{ApiError, Event, Handled, PushedEvent, inbox};
use serde::{Deserialize, Serialize};
use sqlx::SqliteConnection;

use crate::AppState;
use crate::store::{self, Charge, ChargeRequest, Outcome};

/// This service's name: the events' `source` is `/payments`.
pub const SERVICE: &str = "payments";
/// The topic payments publishes to.
pub const TOPIC: &str = "payments";
/// The inbox consumer name.
const CONSUMER: &str = "payments-stock";

/// `stock.reserved` data, the part payments reads.
#[derive(Deserialize)]
pub struct Reserved {
    pub order_id: String,
    pub customer: String,
    pub total_cents: i64,
    pub currency: String,
    /// The simulated payment token (a test card number): decided on,
    /// never stored, never logged (see the `Debug` below).
    pub payment_token: String,
}

impl std::fmt::Debug for Reserved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reserved")
            .field("order_id", &self.order_id)
            .field("customer", &self.customer)
            .field("total_cents", &self.total_cents)
            .field("currency", &self.currency)
            .field("payment_token", &"<redacted>")
            .finish()
    }
}

#[derive(Serialize)]
struct Succeeded<'a> {
    order_id: &'a str,
    customer: &'a str,
    amount_cents: i64,
    currency: &'a str,
    charge_id: &'a str,
}

#[derive(Serialize)]
struct Failed<'a> {
    order_id: &'a str,
    customer: &'a str,
    reason: &'a str,
}

/// Charges the order (once) and enqueues the result, on `tx`: the charge
/// made, `None` if the order had one. Separate from the handler so the
/// tests drive it without HTTP.
pub async fn on_reserved(
    tx: &mut SqliteConnection,
    reserved: &Reserved,
) -> Result<Option<Charge>, ApiError> {
    let request = ChargeRequest {
        order_id: &reserved.order_id,
        customer: &reserved.customer,
        amount_cents: reserved.total_cents,
        currency: &reserved.currency,
        payment_token: &reserved.payment_token,
    };
    let charge = match store::charge(tx, &request).await? {
        Outcome::New(charge) => charge,
        Outcome::AlreadyCharged(_) => return Ok(None),
    };
    let (order, customer) = (charge.order_id.as_str(), charge.customer.as_str());
    let (ty, data) = match charge.reason.as_deref() {
        None => (
            "payment.succeeded",
            serde_json::to_value(Succeeded {
                order_id: order,
                customer,
                amount_cents: charge.amount_cents,
                currency: &charge.currency,
                charge_id: &charge.id,
            }),
        ),
        Some(reason) => (
            "payment.failed",
            serde_json::to_value(Failed {
                order_id: order,
                customer,
                reason,
            }),
        ),
    };
    let data = data.map_err(|e| ApiError::internal(&e))?;
    let event = Event::new(SERVICE, ty, data)?
        .with_subject(order)
        .with_extension("customer", customer)?
        .with_extension("orderid", order)?;
    flotilla_chassis::outbox::enqueue(tx, TOPIC, &event).await?;
    Ok(Some(charge))
}

/// `POST /events/stock`: `stock.reserved`.
pub async fn stock(
    State(state): State<AppState>,
    PushedEvent(event): PushedEvent,
) -> Result<Handled, ApiError> {
    if event.ty != "stock.reserved" {
        tracing::warn!(id = %event.id, ty = %event.ty, "ignored an event payments does not handle");
        return Ok(Handled::IGNORED);
    }
    let reserved: Reserved = event.data_as()?;
    let handled = inbox::handle_once(&state.db, CONSUMER, &event, async |tx| {
        on_reserved(tx, &reserved).await
    })
    .await?;
    let Some(charged) = handled else {
        return Ok(Handled::DUPLICATE);
    };
    let Some(charge) = charged else {
        return Ok(Handled::new("unchanged"));
    };
    // Told once the charge committed: a commit that failed is redelivered,
    // and would otherwise be counted twice.
    let outcome = if charge.reason.is_none() {
        "succeeded"
    } else {
        "failed"
    };
    tracing::info!(order = %charge.order_id, charge = %charge.id, outcome, reason = charge.reason.as_deref(), "charged");
    metrics::counter!("shop_payments_charges_total", "outcome" => outcome).increment(1);
    if let Some(relay) = &state.relay {
        relay.notify();
    }
    Ok(Handled::new(outcome))
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::{Body, to_bytes};
    use axum::http::{Request, StatusCode};
    use serde_json::{Value, json};
    use sqlx::SqlitePool;
    use tower::ServiceExt;

    use super::*;

    async fn app() -> (Router, SqlitePool) {
        let db = flotilla_chassis::open_sqlite("sqlite::memory:", &crate::MIGRATOR)
            .await
            .unwrap();
        flotilla_chassis::Inbox::install(&db).await.unwrap();
        flotilla_chassis::Outbox::install(&db).await.unwrap();
        let app = crate::router(AppState {
            db: db.clone(),
            relay: None,
        });
        (app, db)
    }

    async fn push(app: &Router, event: &Value) -> (StatusCode, Value) {
        let req = Request::post("/events/stock")
            .header("content-type", "application/cloudevents+json")
            .body(Body::from(event.to_string()))
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = to_bytes(res.into_body(), 1 << 20).await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn outbox(db: &SqlitePool) -> Vec<(String, Value)> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT topic, event FROM flotilla_outbox ORDER BY seq")
                .fetch_all(db)
                .await
                .unwrap();
        rows.into_iter()
            .map(|(t, e)| (t, serde_json::from_str(&e).unwrap()))
            .collect()
    }

    fn reserved(id: &str, order: &str, card: &str) -> Value {
        json!({"specversion": "1.0", "id": id, "source": "/inventory", "type": "stock.reserved",
               "customer": "alice", "orderid": order,
               "data": {"order_id": order, "customer": "alice", "total_cents": 2400, "currency": "EUR",
                        "payment_token": card, "items": [{"sku": "sku-a", "quantity": 2}]}})
    }

    #[tokio::test]
    async fn a_good_card_publishes_payment_succeeded_once() {
        let (app, db) = app().await;
        let event = reserved("e-1", "o-1", "4242424242424242");
        let (status, body) = push(&app, &event).await;
        assert_eq!(
            (status, &body["outcome"]),
            (StatusCode::OK, &json!("succeeded"))
        );
        let (_, body) = push(&app, &event).await;
        assert_eq!(body["outcome"], "duplicate");
        // Re-published under a new id: still one charge.
        let (_, body) = push(&app, &reserved("e-2", "o-1", "4242424242424242")).await;
        assert_eq!(body["outcome"], "unchanged");

        let events = outbox(&db).await;
        assert_eq!(events.len(), 1);
        let (topic, paid) = &events[0];
        assert_eq!(topic, "payments");
        assert_eq!(paid["type"], "payment.succeeded");
        assert_eq!(paid["source"], "/payments");
        assert_eq!(paid["customer"], "alice");
        assert_eq!(paid["orderid"], "o-1");
        assert_eq!(paid["data"]["amount_cents"], 2400);
        assert!(
            paid["data"]["charge_id"]
                .as_str()
                .unwrap()
                .starts_with("ch_")
        );
        assert!(!paid.to_string().contains("4242424242424242"));
    }

    #[tokio::test]
    async fn declines_publish_payment_failed_with_the_reason() {
        let (app, db) = app().await;
        for (i, (card, reason)) in [
            ("4000 0000 0000 0002", "card_declined"),
            ("4000 0000 0000 9995", "insufficient_funds"),
            ("1234 5678 9012 3456", "invalid_card"),
        ]
        .into_iter()
        .enumerate()
        {
            let (_, body) = push(&app, &reserved(&format!("e-{i}"), &format!("o-{i}"), card)).await;
            assert_eq!(body["outcome"], "failed");
            let (_, failed) = outbox(&db).await.pop().unwrap();
            assert_eq!(failed["type"], "payment.failed");
            assert_eq!(
                failed["data"],
                json!({"order_id": format!("o-{i}"), "customer": "alice", "reason": reason})
            );
        }
    }

    #[tokio::test]
    async fn other_types_are_ignored_and_bad_data_is_400() {
        let (app, db) = app().await;
        let mut other = reserved("e-1", "o-1", "4242424242424242");
        other["type"] = json!("stock.released");
        let (status, body) = push(&app, &other).await;
        assert_eq!(
            (status, &body["outcome"]),
            (StatusCode::OK, &json!("ignored"))
        );
        let mut bad = reserved("e-2", "o-1", "4242424242424242");
        bad["data"] = json!({"order_id": "o-1"});
        let (status, _) = push(&app, &bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(outbox(&db).await.is_empty());
    }
}
