//! Payments' part in the order saga.
//!
//! Consumed (pushed by the broker, deduplicated by the chassis inbox):
//! - `stock.reserved` on `POST /events/stock`: charge the order, once;
//!   declined as `order_cancelled`, without asking the processor, when
//!   its `order.cancelled` came first;
//! - `order.cancelled` on `POST /events/orders`: remember it, and refund
//!   the order's charge if it succeeded (the order hit its deadline while
//!   the charge was on its way; orders then ignores `payment.succeeded`).
//!
//! Published to topic `payments` through the chassis outbox, in the
//! transaction that stores the charge or refund: `payment.succeeded`
//! {order_id, customer, amount_cents, currency, charge_id},
//! `payment.failed` {order_id, customer, reason} or `payment.refunded`
//! {order_id, customer, amount_cents, currency, charge_id, refund_id,
//! reason}. Nobody needs to act on `payment.refunded`; it is there for
//! whoever follows the money.

use axum::extract::State;
use flotilla_chassis::{ApiError, Event, Handled, PushedEvent, inbox};
use serde::{Deserialize, Serialize};
use sqlx::SqliteConnection;

use crate::AppState;
use crate::store::{self, Cancellation, Charge, ChargeRequest, Outcome, Refund};

/// This service's name: the events' `source` is `/payments`.
pub const SERVICE: &str = "payments";
/// The topic payments publishes to.
pub const TOPIC: &str = "payments";
/// The inbox consumer names, one per push endpoint.
const CONSUMER: &str = "payments-stock";
const ORDERS_CONSUMER: &str = "payments-orders";

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

#[derive(Serialize)]
struct Refunded<'a> {
    order_id: &'a str,
    customer: &'a str,
    amount_cents: i64,
    currency: &'a str,
    charge_id: &'a str,
    refund_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

/// `order.cancelled` data, the part payments reads.
#[derive(Debug, Deserialize)]
struct Cancelled {
    order_id: String,
    #[serde(default)]
    customer: String,
    #[serde(default)]
    reason: Option<String>,
}

/// Enqueues a `ty` event about `order` for `customer` on `tx`, with the
/// extensions every saga event carries.
async fn publish(
    tx: &mut SqliteConnection,
    ty: &str,
    order: &str,
    customer: &str,
    data: impl Serialize,
) -> Result<(), ApiError> {
    let event = Event::new(SERVICE, ty, data)?
        .with_subject(order)
        .with_extension("customer", customer)?
        .with_extension("orderid", order)?;
    flotilla_chassis::outbox::enqueue(tx, TOPIC, &event).await?;
    Ok(())
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
    publish(tx, ty, order, customer, data).await?;
    Ok(Some(charge))
}

/// Records the order's cancellation and refunds its charge if it
/// succeeded, enqueueing `payment.refunded`, on `tx`: the refund made,
/// `None` if there was nothing to give back.
pub async fn on_cancelled(
    tx: &mut SqliteConnection,
    order_id: &str,
    customer: &str,
    reason: Option<&str>,
) -> Result<Option<Refund>, ApiError> {
    let refund = match store::cancel(tx, order_id, customer, reason).await? {
        Cancellation::Refunded(refund) => refund,
        Cancellation::NothingToRefund => return Ok(None),
    };
    let data = Refunded {
        order_id: &refund.order_id,
        customer: &refund.customer,
        amount_cents: refund.amount_cents,
        currency: &refund.currency,
        charge_id: &refund.charge_id,
        refund_id: &refund.id,
        reason: refund.reason.as_deref(),
    };
    publish(
        tx,
        "payment.refunded",
        &refund.order_id,
        &refund.customer,
        data,
    )
    .await?;
    Ok(Some(refund))
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

/// `POST /events/orders`: `order.cancelled`.
pub async fn orders(
    State(state): State<AppState>,
    PushedEvent(event): PushedEvent,
) -> Result<Handled, ApiError> {
    if event.ty != "order.cancelled" {
        tracing::warn!(id = %event.id, ty = %event.ty, "ignored an event payments does not handle");
        return Ok(Handled::IGNORED);
    }
    let cancelled: Cancelled = event.data_as()?;
    // The customer is in the extension even if data leaves it out.
    let customer = match cancelled.customer.as_str() {
        "" => event.extension_str("customer").unwrap_or_default(),
        c => c,
    };
    let reason = cancelled.reason.as_deref();
    let handled = inbox::handle_once(&state.db, ORDERS_CONSUMER, &event, async |tx| {
        on_cancelled(tx, &cancelled.order_id, customer, reason).await
    })
    .await?;
    let Some(refunded) = handled else {
        return Ok(Handled::DUPLICATE);
    };
    let Some(refund) = refunded else {
        return Ok(Handled::new("nothing_to_refund"));
    };
    tracing::warn!(order = %refund.order_id, charge = %refund.charge_id, refund = %refund.id, reason, "charge refunded: its order was cancelled");
    metrics::counter!("shop_payments_refunds_total").increment(1);
    if let Some(relay) = &state.relay {
        relay.notify();
    }
    Ok(Handled::new("refunded"))
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
        push_to(app, "/events/stock", event).await
    }

    async fn push_to(app: &Router, path: &str, event: &Value) -> (StatusCode, Value) {
        let req = Request::post(path)
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

    fn cancelled(id: &str, order: &str, reason: &str) -> Value {
        json!({"specversion": "1.0", "id": id, "source": "/orders", "type": "order.cancelled",
               "customer": "alice", "orderid": order,
               "data": {"order_id": order, "customer": "alice", "items": [], "total_cents": 2400,
                        "currency": "EUR", "reason": reason}})
    }

    /// Pushes `order.cancelled`; the outcome.
    async fn cancel(app: &Router, event: &Value) -> Value {
        let (status, body) = push_to(app, "/events/orders", event).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["outcome"].clone()
    }

    async fn count(db: &SqlitePool, table: &str) -> i64 {
        let sql = format!("SELECT COUNT(*) FROM {table}");
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(db)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_charged_order_that_is_cancelled_is_refunded_once() {
        // The sweeper of orders cancelled it while its charge was on the
        // way: orders ignores the payment, payments gives it back.
        let (app, db) = app().await;
        let (_, body) = push(&app, &reserved("e-1", "o-1", "4242424242424242")).await;
        assert_eq!(body["outcome"], "succeeded");
        let event = cancelled("c-1", "o-1", "timed_out");
        assert_eq!(cancel(&app, &event).await, "refunded");
        assert_eq!(cancel(&app, &event).await, "duplicate");
        let again = cancelled("c-2", "o-1", "timed_out");
        assert_eq!(cancel(&app, &again).await, "nothing_to_refund");

        let events = outbox(&db).await;
        assert_eq!(events.len(), 2, "payment.succeeded, then one refund");
        let (paid, refunded) = (&events[0].1, &events[1].1);
        assert_eq!(events[1].0, "payments");
        assert_eq!(refunded["type"], "payment.refunded");
        assert_eq!(refunded["source"], "/payments");
        assert_eq!(refunded["customer"], "alice");
        assert_eq!(refunded["orderid"], "o-1");
        let data = &refunded["data"];
        assert_eq!(data["order_id"], "o-1");
        assert_eq!(data["amount_cents"], 2400);
        assert_eq!(data["currency"], "EUR");
        assert_eq!(data["charge_id"], paid["data"]["charge_id"]);
        assert!(data["refund_id"].as_str().unwrap().starts_with("re_"));
        assert_eq!(data["reason"], "timed_out");
        assert_eq!(count(&db, "refunds").await, 1);
    }

    #[tokio::test]
    async fn a_cancelled_order_is_never_charged() {
        let (app, db) = app().await;
        assert_eq!(
            cancel(&app, &cancelled("c-1", "o-1", "timed_out")).await,
            "nothing_to_refund"
        );
        // Its reservation comes late: declined without a charge, and
        // payment.failed has inventory release it.
        let (_, body) = push(&app, &reserved("e-1", "o-1", "4242424242424242")).await;
        assert_eq!(body["outcome"], "failed");
        let (_, body) = push(&app, &reserved("e-2", "o-1", "4242424242424242")).await;
        assert_eq!(body["outcome"], "unchanged");
        let events = outbox(&db).await;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].1["type"], "payment.failed");
        assert_eq!(
            events[0].1["data"],
            json!({"order_id": "o-1", "customer": "alice", "reason": "order_cancelled"})
        );
        let mut conn = db.acquire().await.unwrap();
        let charge = store::by_order(&mut conn, "o-1").await.unwrap().unwrap();
        assert_eq!(
            (charge.status.as_str(), charge.reason.as_deref()),
            ("failed", Some("order_cancelled"))
        );
        drop(conn);
        assert_eq!(count(&db, "refunds").await, 0);
    }

    #[tokio::test]
    async fn cancellations_after_a_decline_or_of_unreserved_orders_refund_nothing() {
        let (app, db) = app().await;
        let (_, body) = push(&app, &reserved("e-1", "o-1", "4000000000000002")).await;
        assert_eq!(body["outcome"], "failed");
        let declined = cancelled("c-1", "o-1", "payment_declined");
        assert_eq!(cancel(&app, &declined).await, "nothing_to_refund");
        // Out of stock: payments never heard of the order.
        let short = cancelled("c-2", "o-2", "out_of_stock");
        assert_eq!(cancel(&app, &short).await, "nothing_to_refund");
        let types: Vec<Value> = outbox(&db)
            .await
            .into_iter()
            .map(|(_, e)| e["type"].clone())
            .collect();
        assert_eq!(types, [json!("payment.failed")]);
        assert_eq!(count(&db, "refunds").await, 0);
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
