//! Orders' part in the order saga: the events it publishes and the ones the
//! broker pushes to it.
//!
//! Published to topic `orders` through the chassis transactional outbox, in
//! the same transaction as the change they announce:
//! - `order.placed` when an order is stored (it starts the saga);
//! - `order.confirmed` / `order.cancelled` when the saga ends, by an
//!   event below or by the saga's deadline ([`crate::sweeper`], reason
//!   `timed_out`).
//!
//! Consumed (pushed by the broker, deduplicated by the chassis inbox):
//! - `POST /events/stock`: `stock.rejected` → cancelled (`out_of_stock`);
//! - `POST /events/payments`: `payment.succeeded` → confirmed,
//!   `payment.failed` → cancelled (`payment_declined`).
//!
//! Every event carries the extensions `customer` and `orderid`, so the
//! broker can filter and partition on them without reading `data`.

use axum::extract::State;
use flotilla_chassis::{ApiError, Event, Handled, PushedEvent, inbox};
use serde::{Deserialize, Serialize};
use sqlx::SqliteConnection;

use crate::api::AppState;
use crate::store::{self, Order};

/// This service's name: the events' `source` is `/orders`.
pub const SERVICE: &str = "orders";
/// The topic orders publishes to.
pub const TOPIC: &str = "orders";
/// The inbox consumer names, one per push endpoint.
const STOCK_CONSUMER: &str = "orders-stock";
const PAYMENTS_CONSUMER: &str = "orders-payments";

/// One line as the saga's events carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
    /// After the line's volume discount: what analytics counts as the
    /// product's revenue.
    pub line_total_cents: i64,
}

/// `order.placed` data.
#[derive(Serialize)]
struct Placed<'a> {
    order_id: &'a str,
    customer: &'a str,
    items: Vec<Item>,
    total_cents: i64,
    currency: &'a str,
    card_last4: Option<&'a str>,
    /// The simulated payment token: the test card number itself (see
    /// `api::Payment`). It sits in the outbox row until published and then
    /// in the broker's queue for payments; nowhere is it logged.
    payment_token: &'a str,
}

/// `order.confirmed` / `order.cancelled` data.
#[derive(Serialize)]
struct Ended<'a> {
    order_id: &'a str,
    customer: &'a str,
    items: Vec<Item>,
    total_cents: i64,
    currency: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

fn items(order: &Order) -> Vec<Item> {
    order
        .lines
        .iter()
        .map(|l| Item {
            sku: l.sku.clone(),
            quantity: l.quantity,
            unit_price_cents: l.unit_price_cents,
            line_total_cents: l.line_total_cents,
        })
        .collect()
}

/// Adds the extensions every saga event carries.
fn tagged(event: Event, order: &Order) -> Result<Event, flotilla_chassis::Error> {
    event
        .with_subject(order.id.clone())
        .with_extension("customer", order.customer.clone())?
        .with_extension("orderid", order.id.clone())
}

/// The `order.placed` event for a just-placed order paid with `card`.
pub fn placed(order: &Order, card: &str) -> Result<Event, flotilla_chassis::Error> {
    let data = Placed {
        order_id: &order.id,
        customer: &order.customer,
        items: items(order),
        total_cents: order.total_cents,
        currency: &order.currency,
        card_last4: order.card_last4.as_deref(),
        payment_token: card,
    };
    tagged(Event::new(SERVICE, "order.placed", data)?, order)
}

/// The `order.confirmed` or `order.cancelled` event for an order that has
/// just reached that status.
pub fn ended(order: &Order) -> Result<Event, flotilla_chassis::Error> {
    let data = Ended {
        order_id: &order.id,
        customer: &order.customer,
        items: items(order),
        total_cents: order.total_cents,
        currency: &order.currency,
        reason: order.reason.as_deref(),
    };
    tagged(
        Event::new(SERVICE, &format!("order.{}", order.status), data)?,
        order,
    )
}

/// Enqueues `event` for topic `orders` on the caller's transaction.
pub async fn enqueue(
    tx: &mut SqliteConnection,
    event: Event,
) -> Result<(), flotilla_chassis::Error> {
    flotilla_chassis::outbox::enqueue(tx, TOPIC, &event).await
}

/// Enqueues `order.placed` (from [`placed`]) on the caller's transaction:
/// it carries the card number, so its outbox row is deleted once the broker
/// has it, not kept a day.
pub async fn enqueue_placed(
    tx: &mut SqliteConnection,
    placed: Event,
) -> Result<(), flotilla_chassis::Error> {
    flotilla_chassis::outbox::enqueue_sensitive(tx, TOPIC, &placed).await
}

/// Moves order `id` from `placed` to `to` (with `reason`) and enqueues
/// `order.confirmed`/`order.cancelled` for it, both on `tx`: what every
/// end of the saga does, whether an event or the sweeper
/// ([`crate::sweeper`]) ends it. `None`, and nothing enqueued, when the
/// order is unknown or no longer `placed` ([`store::transition`]'s guard):
/// of two racing ends only one happens and is announced.
pub async fn end(
    tx: &mut SqliteConnection,
    id: &str,
    to: &str,
    reason: Option<&str>,
) -> Result<Option<Order>, flotilla_chassis::Error> {
    let order = store::transition(tx, id, to, reason)
        .await
        .map_err(|source| flotilla_chassis::Error::Sql {
            what: "move the order on",
            source,
        })?;
    if let Some(order) = &order {
        enqueue(tx, ended(order)?).await?;
    }
    Ok(order)
}

/// The part of `stock.*` and `payment.*` data orders reads.
#[derive(Debug, Deserialize)]
struct About {
    order_id: String,
}

/// What a pushed event does to its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Confirm,
    Cancel(&'static str),
    /// Not an event orders acts on (the queue's filter should not have let
    /// it through); acknowledged and logged.
    Ignore,
}

/// The saga's rules for orders.
pub fn effect(ty: &str) -> Effect {
    match ty {
        "stock.rejected" => Effect::Cancel("out_of_stock"),
        "payment.succeeded" => Effect::Confirm,
        "payment.failed" => Effect::Cancel("payment_declined"),
        _ => Effect::Ignore,
    }
}

/// `POST /events/stock`: `stock.rejected`.
pub async fn stock(
    State(state): State<AppState>,
    PushedEvent(event): PushedEvent,
) -> Result<Handled, ApiError> {
    handle(&state, STOCK_CONSUMER, event).await
}

/// `POST /events/payments`: `payment.succeeded`, `payment.failed`.
pub async fn payments(
    State(state): State<AppState>,
    PushedEvent(event): PushedEvent,
) -> Result<Handled, ApiError> {
    handle(&state, PAYMENTS_CONSUMER, event).await
}

/// Applies one pushed event: inbox claim, guarded transition, outbox
/// enqueue, all in one transaction. A failure rolls everything back and
/// answers 5xx so the broker retries; a duplicate is answered 200 and
/// changes nothing.
async fn handle(state: &AppState, consumer: &str, event: Event) -> Result<Handled, ApiError> {
    let (to, reason) = match effect(&event.ty) {
        Effect::Confirm => (store::CONFIRMED, None),
        Effect::Cancel(reason) => (store::CANCELLED, Some(reason)),
        Effect::Ignore => {
            tracing::warn!(id = %event.id, ty = %event.ty, "ignored an event orders does not handle");
            return Ok(Handled::IGNORED);
        }
    };
    let about: About = event.data_as()?;
    let handled = inbox::handle_once(&state.db, consumer, &event, async |tx| {
        let outcome = match end(tx, &about.order_id, to, reason).await? {
            Some(order) => {
                tracing::info!(order = %order.id, status = to, reason, "order {to}");
                metrics::counter!("shop_orders_ended_total", "status" => to).increment(1);
                to
            }
            // Unknown, or already confirmed/cancelled: a late or repeated
            // event. Claimed all the same so it is not applied later.
            None => {
                tracing::info!(order = %about.order_id, ty = %event.ty, "order not placed; event changes nothing");
                "unchanged"
            }
        };
        Ok::<_, ApiError>(outcome)
    })
    .await?;
    let Some(outcome) = handled else {
        return Ok(Handled::DUPLICATE);
    };
    state.published();
    Ok(Handled::new(outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_saga_rules() {
        assert_eq!(effect("stock.rejected"), Effect::Cancel("out_of_stock"));
        assert_eq!(effect("payment.succeeded"), Effect::Confirm);
        assert_eq!(effect("payment.failed"), Effect::Cancel("payment_declined"));
        assert_eq!(effect("stock.reserved"), Effect::Ignore);
        assert_eq!(effect("order.placed"), Effect::Ignore);
    }
}
