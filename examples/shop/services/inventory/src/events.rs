//! Inventory's part in the order saga.
//!
//! Consumed (pushed by the broker, deduplicated by the chassis inbox):
//! - `POST /events/orders`: `order.placed` → reserve all items or none;
//!   `order.cancelled` → release whatever the order still holds, even a
//!   committed reservation (orders cancelled it first: the saga's
//!   deadline), or, when it comes before `order.placed`, see to it that
//!   the order is never reserved ([`store::cancel`]);
//! - `POST /events/payments`: `payment.failed` → release (compensation),
//!   `payment.succeeded` → commit.
//!
//! Published to topic `inventory` through the chassis outbox, in the same
//! transaction as the reservation change: `stock.reserved` (which carries
//! what payments needs to charge: amount, currency, payment token),
//! `stock.rejected`, `stock.released`.
//!
//! The two that change availability, `stock.reserved` and `stock.released`,
//! are each followed (same transaction) by `stock.changed`, whose data is
//! only `levels`: `[{sku, available, version}]`, the new figures of the
//! SKUs touched. A separate event so that readers of the figures (the
//! catalog's stock, queue `catalog-stock`) never receive what payments
//! needs (the payment token rides in `stock.reserved`). `version` grows
//! with every change to a SKU's `available`, so a reader applies a level
//! only when it is newer than what it has. Committing a reservation
//! changes no `available`, so it publishes nothing.

use axum::extract::State;
use flotilla_chassis::{ApiError, Event, Handled, PushedEvent, inbox};
use serde::{Deserialize, Serialize};
use sqlx::SqliteConnection;

use crate::api::AppState;
use crate::store::{self, Cancel, Item, Level, Reserve, Settle};

/// This service's name: the events' `source` is `/inventory`.
pub const SERVICE: &str = "inventory";
/// The topic inventory publishes to.
pub const TOPIC: &str = "inventory";
/// The inbox consumer names, one per push endpoint.
const ORDERS_CONSUMER: &str = "inventory-orders";
const PAYMENTS_CONSUMER: &str = "inventory-payments";

/// One line of `order.placed`; the price travels on to payments untouched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub sku: String,
    pub quantity: i64,
    #[serde(default)]
    pub unit_price_cents: i64,
}

/// `order.placed` data, the part inventory reads.
#[derive(Deserialize)]
pub struct Placed {
    pub order_id: String,
    pub customer: String,
    pub items: Vec<Line>,
    pub total_cents: i64,
    pub currency: String,
    /// Passed on to payments in `stock.reserved`; never logged (see the
    /// `Debug` below) and never stored by inventory beyond the outbox row
    /// that publishes it, deleted once sent.
    pub payment_token: String,
}

impl std::fmt::Debug for Placed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placed")
            .field("order_id", &self.order_id)
            .field("customer", &self.customer)
            .field("items", &self.items)
            .field("total_cents", &self.total_cents)
            .field("currency", &self.currency)
            .field("payment_token", &"<redacted>")
            .finish()
    }
}

/// `stock.reserved` data: everything payments needs to charge.
#[derive(Serialize)]
struct Reserved<'a> {
    order_id: &'a str,
    customer: &'a str,
    total_cents: i64,
    currency: &'a str,
    payment_token: &'a str,
    items: &'a [Line],
}

/// `stock.rejected` data.
#[derive(Serialize)]
struct Rejected<'a> {
    order_id: &'a str,
    customer: &'a str,
    reason: &'a str,
    sku: &'a str,
}

/// `stock.released` data.
#[derive(Serialize)]
struct Released<'a> {
    order_id: &'a str,
    customer: &'a str,
    items: &'a [Item],
}

/// `stock.changed` data: the new availability of the SKUs a change touched.
#[derive(Serialize)]
struct Changed<'a> {
    levels: &'a [Level],
}

/// `payment.*` and `order.cancelled` data, the part inventory reads.
#[derive(Debug, Deserialize)]
struct About {
    order_id: String,
    #[serde(default)]
    customer: String,
}

/// A new event about `order_id` for `customer`, with the extensions every
/// saga event carries.
fn event(
    ty: &str,
    order_id: &str,
    customer: &str,
    data: impl Serialize,
) -> Result<Event, flotilla_chassis::Error> {
    Event::new(SERVICE, ty, data)?
        .with_subject(order_id)
        .with_extension("customer", customer)?
        .with_extension("orderid", order_id)
}

/// Reserves an order's stock and enqueues the answer, on `tx`. Returns the
/// outcome for the response and the logs. Separate from the handler so the
/// tests drive it without HTTP.
pub async fn on_placed(
    tx: &mut SqliteConnection,
    placed: &Placed,
) -> Result<&'static str, ApiError> {
    let items: Vec<Item> = placed
        .items
        .iter()
        .map(|l| Item {
            sku: l.sku.clone(),
            quantity: l.quantity,
        })
        .collect();
    let (order, customer) = (placed.order_id.as_str(), placed.customer.as_str());
    let outcome = match store::reserve(tx, order, customer, &items).await? {
        Reserve::Reserved => {
            let data = Reserved {
                order_id: order,
                customer,
                total_cents: placed.total_cents,
                currency: &placed.currency,
                payment_token: &placed.payment_token,
                items: &placed.items,
            };
            // It carries the card number on to payments: its outbox row
            // goes once the broker has it.
            let reserved = event("stock.reserved", order, customer, data)?;
            flotilla_chassis::outbox::enqueue_sensitive(tx, TOPIC, &reserved).await?;
            changed(tx, order, customer, &items).await?;
            "reserved"
        }
        Reserve::Rejected { sku, reason } => {
            let data = Rejected {
                order_id: order,
                customer,
                reason,
                sku: &sku,
            };
            enqueue(tx, event("stock.rejected", order, customer, data)?).await?;
            "rejected"
        }
        Reserve::AlreadyDecided => "unchanged",
    };
    Ok(outcome)
}

/// Settles an order's reservation after its payment and enqueues
/// `stock.released` when it was released.
pub async fn on_payment(
    tx: &mut SqliteConnection,
    ty: &str,
    order_id: &str,
    customer: &str,
) -> Result<&'static str, ApiError> {
    match ty {
        "payment.failed" => match store::release(tx, order_id).await? {
            Settle::Done(items) => released(tx, order_id, customer, &items).await,
            Settle::NotReserved => Ok("unchanged"),
        },
        "payment.succeeded" => match store::commit(tx, order_id).await? {
            Settle::Done(_) => Ok("committed"),
            Settle::NotReserved => Ok("unchanged"),
        },
        _ => Ok("ignored"),
    }
}

/// Gives back what a cancelled order holds (see [`store::cancel`]) and
/// enqueues `stock.released` when it held anything.
pub async fn on_cancelled(
    tx: &mut SqliteConnection,
    order_id: &str,
    customer: &str,
) -> Result<&'static str, ApiError> {
    match store::cancel(tx, order_id, customer).await? {
        Cancel::Released(items) => released(tx, order_id, customer, &items).await,
        Cancel::NothingHeld => Ok("unchanged"),
        Cancel::Forestalled => Ok("forestalled"),
    }
}

/// Enqueues `stock.released` and `stock.changed` for `items`, just given
/// back by `order_id`.
async fn released(
    tx: &mut SqliteConnection,
    order_id: &str,
    customer: &str,
    items: &[Item],
) -> Result<&'static str, ApiError> {
    let data = Released {
        order_id,
        customer,
        items,
    };
    enqueue(tx, event("stock.released", order_id, customer, data)?).await?;
    changed(tx, order_id, customer, items).await?;
    Ok("released")
}

/// Enqueues `stock.changed` with the new levels of `items`' SKUs, read in
/// the transaction that changed them.
async fn changed(
    tx: &mut SqliteConnection,
    order_id: &str,
    customer: &str,
    items: &[Item],
) -> Result<(), ApiError> {
    let levels = store::levels(tx, items).await?;
    let data = Changed { levels: &levels };
    enqueue(tx, event("stock.changed", order_id, customer, data)?).await?;
    Ok(())
}

async fn enqueue(tx: &mut SqliteConnection, event: Event) -> Result<(), flotilla_chassis::Error> {
    flotilla_chassis::outbox::enqueue(tx, TOPIC, &event).await
}

/// `POST /events/orders`: `order.placed`, `order.cancelled`.
pub async fn orders(
    State(state): State<AppState>,
    PushedEvent(event): PushedEvent,
) -> Result<Handled, ApiError> {
    match event.ty.as_str() {
        "order.placed" => placed(&state, &event).await,
        "order.cancelled" => about_order(&state, ORDERS_CONSUMER, &event).await,
        _ => {
            tracing::warn!(id = %event.id, ty = %event.ty, "ignored an event inventory does not handle");
            Ok(Handled::IGNORED)
        }
    }
}

async fn placed(state: &AppState, event: &Event) -> Result<Handled, ApiError> {
    let placed: Placed = event.data_as()?;
    let handled = inbox::handle_once(&state.db, ORDERS_CONSUMER, event, async |tx| {
        on_placed(tx, &placed).await
    })
    .await?;
    let Some(outcome) = handled else {
        return Ok(Handled::DUPLICATE);
    };
    state.published();
    tracing::info!(order = %placed.order_id, outcome, "order.placed handled");
    metrics::counter!("shop_inventory_reservations_total", "outcome" => outcome).increment(1);
    Ok(Handled::new(outcome))
}

/// `POST /events/payments`: `payment.failed`, `payment.succeeded`.
pub async fn payments(
    State(state): State<AppState>,
    PushedEvent(event): PushedEvent,
) -> Result<Handled, ApiError> {
    if !matches!(event.ty.as_str(), "payment.failed" | "payment.succeeded") {
        tracing::warn!(id = %event.id, ty = %event.ty, "ignored an event inventory does not handle");
        return Ok(Handled::IGNORED);
    }
    about_order(&state, PAYMENTS_CONSUMER, &event).await
}

/// Applies a `payment.*` or `order.cancelled` event to its order's
/// reservation, once per event (the inbox), publishing what it changed in
/// the same transaction.
async fn about_order(state: &AppState, consumer: &str, event: &Event) -> Result<Handled, ApiError> {
    let about: About = event.data_as()?;
    // The customer is in the extension even if data leaves it out.
    let customer = match about.customer.as_str() {
        "" => event.extension_str("customer").unwrap_or_default(),
        c => c,
    }
    .to_owned();
    let handled = inbox::handle_once(&state.db, consumer, event, async |tx| {
        if event.ty == "order.cancelled" {
            on_cancelled(tx, &about.order_id, &customer).await
        } else {
            on_payment(tx, &event.ty, &about.order_id, &customer).await
        }
    })
    .await?;
    let Some(outcome) = handled else {
        return Ok(Handled::DUPLICATE);
    };
    state.published();
    tracing::info!(order = %about.order_id, ty = %event.ty, outcome, "{} handled", event.ty);
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
        let app = crate::api::router(AppState {
            db: db.clone(),
            relay: None,
        });
        (app, db)
    }

    async fn call(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
        let res = app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = to_bytes(res.into_body(), 1 << 20).await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn push(app: &Router, path: &str, event: &Value) -> (StatusCode, Value) {
        let req = Request::post(path)
            .header("content-type", "application/cloudevents+json")
            .body(Body::from(event.to_string()))
            .unwrap();
        call(app, req).await
    }

    async fn level(app: &Router, sku: &str) -> (i64, i64) {
        let (status, s) = call(
            app,
            Request::get(format!("/api/inventory/{sku}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{s}");
        (
            s["available"].as_i64().unwrap(),
            s["reserved"].as_i64().unwrap(),
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

    fn placed(id: &str, order: &str, items: Value) -> Value {
        json!({"specversion": "1.0", "id": id, "source": "/orders", "type": "order.placed",
               "customer": "alice", "orderid": order,
               "data": {"order_id": order, "customer": "alice", "items": items, "total_cents": 5000,
                        "currency": "EUR", "card_last4": "4242", "payment_token": "4242424242424242"}})
    }

    fn payment(id: &str, ty: &str, order: &str) -> Value {
        json!({"specversion": "1.0", "id": id, "source": "/payments", "type": ty,
               "customer": "alice", "orderid": order,
               "data": {"order_id": order, "customer": "alice", "reason": "card_declined"}})
    }

    #[tokio::test]
    async fn order_placed_reserves_and_publishes_stock_reserved_once() {
        let (app, db) = app().await;
        let event = placed(
            "e-1",
            "o-1",
            json!([{"sku": "sku-grinder", "quantity": 2, "unit_price_cents": 12900}]),
        );
        let (status, body) = push(&app, "/events/orders", &event).await;
        assert_eq!(
            (status, &body["outcome"]),
            (StatusCode::OK, &json!("reserved"))
        );
        let (_, body) = push(&app, "/events/orders", &event).await;
        assert_eq!(body["outcome"], "duplicate");
        assert_eq!(level(&app, "sku-grinder").await, (6, 2));

        let events = outbox(&db).await;
        assert_eq!(events.len(), 2);
        let (topic, reserved) = &events[0];
        assert_eq!(topic, "inventory");
        assert_eq!(reserved["type"], "stock.reserved");
        assert_eq!(reserved["source"], "/inventory");
        assert_eq!(reserved["customer"], "alice");
        assert_eq!(reserved["orderid"], "o-1");
        let data = &reserved["data"];
        assert_eq!(data["order_id"], "o-1");
        assert_eq!(data["total_cents"], 5000);
        assert_eq!(data["currency"], "EUR");
        assert_eq!(data["payment_token"], "4242424242424242");
        assert_eq!(data["items"][0]["quantity"], 2);
        assert!(data.get("levels").is_none());
        // The figures travel apart from the token.
        let changed = &events[1].1;
        assert_eq!(changed["type"], "stock.changed");
        assert_eq!(
            changed["data"],
            json!({"levels": [{"sku": "sku-grinder", "available": 6, "version": 1}]})
        );
    }

    #[tokio::test]
    async fn a_short_line_rejects_the_whole_order() {
        let (app, db) = app().await;
        let event = placed(
            "e-1",
            "o-1",
            json!([{"sku": "sku-mug", "quantity": 3}, {"sku": "sku-grinder", "quantity": 9}]),
        );
        let (_, body) = push(&app, "/events/orders", &event).await;
        assert_eq!(body["outcome"], "rejected");
        assert_eq!(level(&app, "sku-mug").await, (200, 0));
        assert_eq!(level(&app, "sku-grinder").await, (8, 0));
        let events = outbox(&db).await;
        assert_eq!(events[0].1["type"], "stock.rejected");
        assert_eq!(
            events[0].1["data"],
            json!({"order_id": "o-1", "customer": "alice", "reason": "out_of_stock", "sku": "sku-grinder"})
        );
        // The same order placed again under a new event id: no second answer.
        let (_, body) = push(
            &app,
            "/events/orders",
            &placed("e-2", "o-1", json!([{"sku": "sku-mug", "quantity": 1}])),
        )
        .await;
        assert_eq!(body["outcome"], "unchanged");
        assert_eq!(outbox(&db).await.len(), 1);
    }

    #[tokio::test]
    async fn payment_failed_releases_payment_succeeded_commits() {
        let (app, db) = app().await;
        push(
            &app,
            "/events/orders",
            &placed("e-1", "o-1", json!([{"sku": "sku-kettle", "quantity": 5}])),
        )
        .await;
        push(
            &app,
            "/events/orders",
            &placed("e-2", "o-2", json!([{"sku": "sku-kettle", "quantity": 3}])),
        )
        .await;
        assert_eq!(level(&app, "sku-kettle").await, (7, 8));

        let failed = payment("p-1", "payment.failed", "o-1");
        let (_, body) = push(&app, "/events/payments", &failed).await;
        assert_eq!(body["outcome"], "released");
        let (_, body) = push(&app, "/events/payments", &failed).await;
        assert_eq!(body["outcome"], "duplicate");
        assert_eq!(level(&app, "sku-kettle").await, (12, 3));

        let (_, body) = push(
            &app,
            "/events/payments",
            &payment("p-2", "payment.succeeded", "o-2"),
        )
        .await;
        assert_eq!(body["outcome"], "committed");
        assert_eq!(level(&app, "sku-kettle").await, (12, 0));
        // A late failure for the committed order compensates nothing.
        let (_, body) = push(
            &app,
            "/events/payments",
            &payment("p-3", "payment.failed", "o-2"),
        )
        .await;
        assert_eq!(body["outcome"], "unchanged");
        assert_eq!(level(&app, "sku-kettle").await, (12, 0));

        let types: Vec<String> = outbox(&db)
            .await
            .iter()
            .map(|(_, e)| e["type"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            types,
            [
                "stock.reserved",
                "stock.changed",
                "stock.reserved",
                "stock.changed",
                "stock.released",
                "stock.changed"
            ]
        );
        let released = &outbox(&db).await[4].1;
        assert_eq!(
            released["data"]["items"],
            json!([{"sku": "sku-kettle", "quantity": 5}])
        );
        // Each event carries the level it left behind: 15 - 5, 10 - 3, 7 + 5.
        let levels: Vec<Value> = outbox(&db)
            .await
            .iter()
            .filter(|(_, e)| e["type"] == "stock.changed")
            .map(|(_, e)| e["data"]["levels"].clone())
            .collect();
        assert_eq!(
            levels,
            [
                json!([{"sku": "sku-kettle", "available": 10, "version": 1}]),
                json!([{"sku": "sku-kettle", "available": 7, "version": 2}]),
                json!([{"sku": "sku-kettle", "available": 12, "version": 3}]),
            ]
        );
        assert_eq!(released["orderid"], "o-1");
    }

    fn cancelled(id: &str, order: &str, reason: &str) -> Value {
        json!({"specversion": "1.0", "id": id, "source": "/orders", "type": "order.cancelled",
               "customer": "alice", "orderid": order,
               "data": {"order_id": order, "customer": "alice", "items": [], "total_cents": 5000,
                        "currency": "EUR", "reason": reason}})
    }

    /// `order.placed` for `quantity` kettles.
    fn kettles(id: &str, order: &str, quantity: i64) -> Value {
        placed(
            id,
            order,
            json!([{"sku": "sku-kettle", "quantity": quantity}]),
        )
    }

    /// Pushes `event` where the broker would (by its type); the outcome.
    async fn handle(app: &Router, event: &Value) -> Value {
        let path = if event["type"].as_str().unwrap().starts_with("order.") {
            "/events/orders"
        } else {
            "/events/payments"
        };
        let (status, body) = push(app, path, event).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["outcome"].clone()
    }

    async fn types(db: &SqlitePool) -> Vec<String> {
        outbox(db)
            .await
            .iter()
            .map(|(_, e)| e["type"].as_str().unwrap().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn order_cancelled_releases_a_reservation_exactly_once() {
        let (app, db) = app().await;
        assert_eq!(handle(&app, &kettles("e-1", "o-1", 5)).await, "reserved");
        assert_eq!(level(&app, "sku-kettle").await, (10, 5));

        let cancel = cancelled("c-1", "o-1", "timed_out");
        assert_eq!(handle(&app, &cancel).await, "released");
        assert_eq!(level(&app, "sku-kettle").await, (15, 0));
        // Redelivered, re-published under a new id, then the payment's
        // late answer either way: nothing is given back twice.
        assert_eq!(handle(&app, &cancel).await, "duplicate");
        for late in [
            cancelled("c-2", "o-1", "timed_out"),
            payment("p-1", "payment.failed", "o-1"),
            payment("p-2", "payment.succeeded", "o-1"),
        ] {
            assert_eq!(handle(&app, &late).await, "unchanged", "{late}");
        }
        assert_eq!(level(&app, "sku-kettle").await, (15, 0));
        assert_eq!(
            types(&db).await,
            [
                "stock.reserved",
                "stock.changed",
                "stock.released",
                "stock.changed"
            ]
        );
        let events = outbox(&db).await;
        let released = &events[2].1;
        assert_eq!(released["orderid"], "o-1");
        assert_eq!(
            released["data"]["items"],
            json!([{"sku": "sku-kettle", "quantity": 5}])
        );
        assert_eq!(
            events[3].1["data"],
            json!({"levels": [{"sku": "sku-kettle", "available": 15, "version": 2}]})
        );
    }

    #[tokio::test]
    async fn a_cancellation_after_the_payment_gives_the_sold_units_back() {
        // The sweeper of orders cancelled the order just before payments
        // charged it: inventory committed, payments refunds.
        let (app, db) = app().await;
        handle(&app, &kettles("e-1", "o-1", 5)).await;
        let paid = payment("p-1", "payment.succeeded", "o-1");
        assert_eq!(handle(&app, &paid).await, "committed");
        assert_eq!(level(&app, "sku-kettle").await, (10, 0));
        let cancel = cancelled("c-1", "o-1", "timed_out");
        assert_eq!(handle(&app, &cancel).await, "released");
        assert_eq!(level(&app, "sku-kettle").await, (15, 0));
        let again = cancelled("c-2", "o-1", "timed_out");
        assert_eq!(handle(&app, &again).await, "unchanged");
        assert_eq!(level(&app, "sku-kettle").await, (15, 0));
        assert_eq!(types(&db).await.len(), 4, "released once");
    }

    #[tokio::test]
    async fn a_cancellation_before_its_placement_means_no_reservation() {
        let (app, db) = app().await;
        let cancel = cancelled("c-1", "o-1", "timed_out");
        assert_eq!(handle(&app, &cancel).await, "forestalled");
        assert_eq!(handle(&app, &kettles("e-1", "o-1", 5)).await, "unchanged");
        assert_eq!(level(&app, "sku-kettle").await, (15, 0));
        assert!(outbox(&db).await.is_empty(), "nothing to tell payments");
        let status = store::reservation_status(&db, "o-1").await.unwrap();
        assert_eq!(status.as_deref(), Some("rejected"));
    }

    #[tokio::test]
    async fn cancellations_of_the_other_kinds_hold_nothing_to_release() {
        let (app, db) = app().await;
        // Out of stock: nothing was reserved.
        let chai = placed("e-1", "o-1", json!([{"sku": "sku-chai", "quantity": 1}]));
        assert_eq!(handle(&app, &chai).await, "rejected");
        let cancel = cancelled("c-1", "o-1", "out_of_stock");
        assert_eq!(handle(&app, &cancel).await, "unchanged");
        // Payment declined: released once, whichever of payment.failed and
        // order.cancelled comes first.
        for (order, cancelled_first) in [("o-2", false), ("o-3", true)] {
            handle(&app, &kettles(&format!("e-{order}"), order, 2)).await;
            let mut answers = [
                payment(&format!("p-{order}"), "payment.failed", order),
                cancelled(&format!("c-{order}"), order, "payment_declined"),
            ];
            if cancelled_first {
                answers.reverse();
            }
            assert_eq!(handle(&app, &answers[0]).await, "released", "{order}");
            assert_eq!(handle(&app, &answers[1]).await, "unchanged", "{order}");
        }
        assert_eq!(level(&app, "sku-kettle").await, (15, 0));
        assert_eq!(level(&app, "sku-chai").await, (0, 0));
        let types = types(&db).await;
        assert_eq!(types.iter().filter(|t| *t == "stock.released").count(), 2);
    }

    #[tokio::test]
    async fn reads_and_rejections() {
        let (app, _) = app().await;
        let (status, _) = call(
            &app,
            Request::get("/api/inventory/sku-nope")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = push(&app, "/events/orders", &json!({"specversion": "1.0"})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let mut bad = placed("e-1", "o-1", json!([]));
        bad["data"] = json!({"order_id": "o-1"});
        let (status, _) = push(&app, "/events/orders", &bad).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "data without items is dead-lettered"
        );
    }

    #[test]
    fn the_token_is_never_in_debug_output() {
        let p: Placed =
            serde_json::from_value(placed("e", "o", json!([]))["data"].clone()).unwrap();
        assert!(!format!("{p:?}").contains("4242424242424242"));
    }
}
