//! The orders HTTP API: place an order, list a customer's orders, read one.
//!
//! Placing an order checks with the catalog (does each SKU exist, is there
//! enough stock, at what price) and with pricing (what does it cost), then
//! stores the order as `placed` and enqueues `order.placed` in one
//! transaction (the transactional outbox): the order exists if and only if
//! the saga that confirms or cancels it has started. The answer does not
//! wait for the saga; clients poll `GET /api/orders/{id}` for the outcome.
//! The client's idea of the price is never used; it may send
//! `expected_total_cents` to be told when the price it showed has changed.
//!
//! A placement may carry an `Idempotency-Key` (IETF draft
//! `httpapi-idempotency-key-header`, as Stripe's API has it): sent again
//! with the same key and the same order, because the first answer was lost
//! (or by the gateway, which retries a POST only when it has one), it
//! answers with the order the key placed, marked `Idempotent-Replayed:
//! true`, rather than placing and charging a second one. The same key with
//! a different order is 422 `idempotency_key_reused`. Keys are each
//! customer's own and are kept as long as their orders.

use std::collections::HashMap;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use flotilla_chassis::outbox::RelayHandle;
use flotilla_chassis::{ApiError, ApiJson, ApiQuery, Client, FieldError, VerifiedUser, int_param};
use futures_util::{StreamExt, TryStreamExt, stream};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::SqlitePool;

use crate::deps::{self, Product};
use crate::events;
use crate::store::{self, Order, OrderLine, StatusChange};

/// Most lines in one order.
pub const MAX_LINES: usize = 100;
/// Most of one SKU in one order.
pub const MAX_QUANTITY: i64 = 1000;
/// Longest SKU.
pub const MAX_SKU_LEN: usize = 64;
/// Longest coupon code.
pub const MAX_COUPON_LEN: usize = 32;
/// Catalog lookups in flight per order: enough to hide latency, few enough
/// not to flood the catalog with one large basket.
const LOOKUP_CONCURRENCY: usize = 8;
/// The request field that makes a placement safe to retry.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The response field that says a retried placement was answered with the
/// order its key placed before.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
/// Orders listed when `limit` is absent, and at most.
pub const DEFAULT_LIST_LIMIT: i64 = 50;
pub const MAX_LIST_LIMIT: i64 = 200;

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    pub db: SqlitePool,
    pub catalog: Client,
    pub pricing: Client,
    /// Publishes what the outbox holds; woken after each commit that
    /// enqueued events. `None` in tests: events stay in the outbox table.
    pub relay: Option<RelayHandle>,
}

impl AppState {
    /// Wakes the outbox relay after a commit that enqueued events, so they
    /// go out now rather than at its next poll.
    pub fn published(&self) {
        if let Some(relay) = &self.relay {
            relay.notify();
        }
    }
}

/// The routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/orders", get(list).post(place))
        .route("/api/orders/{id}", get(one))
        // Pushed by the broker (queues orders-stock and orders-payments);
        // not gateway routes: the ACL lets only the broker's identity in.
        .route("/events/stock", axum::routing::post(events::stock))
        .route("/events/payments", axum::routing::post(events::payments))
        .fallback(flotilla_chassis::not_found)
        .with_state(state)
}

/// `POST /api/orders` body. Everything optional at the JSON level so that a
/// missing field is a field error, not a parse error.
#[derive(Debug, Default, Deserialize)]
pub struct PlaceOrder {
    #[serde(default)]
    items: Vec<OrderItem>,
    #[serde(default)]
    expected_total_cents: Option<i64>,
    #[serde(default)]
    coupon: Option<String>,
    #[serde(default)]
    payment: Option<Payment>,
}

/// How the customer pays. The number is a simulated test card (see
/// `services/payments/src/card.rs`): it travels to payments as the
/// "payment token" because there is no card vault to tokenise it in. A
/// real shop would get an opaque token from its payment provider and never
/// handle card numbers. It is never logged (hence the hand-written
/// `Debug`), never stored in the orders table and never answered.
#[derive(Default, Deserialize)]
struct Payment {
    #[serde(default)]
    card: String,
}

impl std::fmt::Debug for Payment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payment")
            .field("card", &"<redacted>")
            .finish()
    }
}

/// Shortest and longest card numbers issued.
pub const CARD_DIGITS: std::ops::RangeInclusive<usize> = 12..=19;

/// The card number's digits, spaces removed, if it is 12 to 19 digits.
fn card_digits(card: &str) -> Option<String> {
    let digits: String = card.chars().filter(|c| *c != ' ').collect();
    (CARD_DIGITS.contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()))
        .then_some(digits)
}

#[derive(Debug, Deserialize)]
struct OrderItem {
    sku: String,
    quantity: i64,
}

/// A validated order request, repeated SKUs merged in first-seen order.
#[derive(PartialEq, Eq)]
struct Validated {
    customer: VerifiedUser,
    items: Vec<(String, i64)>,
    coupon: Option<String>,
    expected_total_cents: Option<i64>,
    /// The card's digits: the simulated payment token.
    card: String,
}

fn validate(body: PlaceOrder, customer: VerifiedUser) -> Result<Validated, ApiError> {
    let mut errors = Vec::new();
    if body.items.is_empty() || body.items.len() > MAX_LINES {
        errors.push(FieldError::new(
            "items",
            format!("must contain 1 to {MAX_LINES} lines"),
        ));
    }
    let mut items: Vec<(String, i64)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (i, item) in body.items.iter().enumerate().take(MAX_LINES) {
        let sku = item.sku.trim();
        let sku_ok = !sku.is_empty()
            && sku.len() <= MAX_SKU_LEN
            && sku
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !sku_ok {
            errors.push(FieldError::new(
                format!("items[{i}].sku"),
                format!("must be 1 to {MAX_SKU_LEN} letters, digits, '-', '_' or '.'"),
            ));
            continue;
        }
        if !(1..=MAX_QUANTITY).contains(&item.quantity) {
            errors.push(FieldError::new(
                format!("items[{i}].quantity"),
                format!("must be between 1 and {MAX_QUANTITY}"),
            ));
            continue;
        }
        match index.get(sku) {
            Some(&at) => {
                items[at].1 += item.quantity;
                if items[at].1 > MAX_QUANTITY {
                    errors.push(FieldError::new(
                        format!("items[{i}].quantity"),
                        format!("at most {MAX_QUANTITY} of {sku:?} per order in all"),
                    ));
                }
            }
            None => {
                index.insert(sku.to_owned(), items.len());
                items.push((sku.to_owned(), item.quantity));
            }
        }
    }
    let coupon = body
        .coupon
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty());
    if coupon.as_ref().is_some_and(|c| c.len() > MAX_COUPON_LEN) {
        errors.push(FieldError::new(
            "coupon",
            format!("must be at most {MAX_COUPON_LEN} characters"),
        ));
    }
    if body.expected_total_cents.is_some_and(|t| t < 0) {
        errors.push(FieldError::new(
            "expected_total_cents",
            "must not be negative",
        ));
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    // A card that cannot be a card number is 422: the request is well
    // formed, its payment is not acceptable.
    let card = body
        .payment
        .as_ref()
        .and_then(|p| card_digits(&p.card))
        .ok_or_else(|| {
            ApiError::unprocessable(
                "invalid_card",
                "payment.card must be a card number of 12 to 19 digits (spaces allowed)",
            )
            .with_field("payment.card", "must be 12 to 19 digits")
        })?;
    Ok(Validated {
        customer,
        items,
        coupon,
        expected_total_cents: body.expected_total_cents,
        card,
    })
}

/// The request's `Idempotency-Key`, if it has one: a structured-field
/// string as the IETF draft writes it (`"…"`), or bare as Stripe's clients
/// send it; 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let bad = || {
        ApiError::bad_request(
            "invalid_idempotency_key",
            format!(
                "Idempotency-Key must be one value of 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters, e.g. a UUID"
            ),
        )
        .with_field(
            "Idempotency-Key",
            format!("1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"),
        )
    };
    if values.next().is_some() {
        return Err(bad());
    }
    let text = value.to_str().map_err(|_| bad())?.trim();
    let key = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    let fine = !key.is_empty()
        && key.len() <= MAX_IDEMPOTENCY_KEY_LEN
        && key.bytes().all(|b| b.is_ascii_graphic() && b != b'"');
    if !fine {
        return Err(bad());
    }
    Ok(Some(key.to_owned()))
}

/// A placement as its idempotency key remembers it, to tell a retry from
/// another order under the same key: what was ordered, never the card
/// number (its last four digits stand for it).
fn fingerprint(order: &Validated) -> String {
    json!({
        "items": order.items,
        "coupon": order.coupon,
        "expected_total_cents": order.expected_total_cents,
        "card_last4": &order.card[order.card.len() - 4..],
    })
    .to_string()
}

/// The answer to a placement whose key placed an order already: that
/// order, as the first answer had it (201), if `request` is the same
/// placement; 422 if it is another. `None` when the key is new.
async fn replay(
    state: &AppState,
    customer: &str,
    key: &str,
    request: &str,
) -> Result<Option<Response>, ApiError> {
    let mut conn = state.db.acquire().await?;
    let Some((first, order_id)) = store::keyed(&mut conn, customer, key).await? else {
        return Ok(None);
    };
    if first != request {
        return Err(ApiError::unprocessable(
            "idempotency_key_reused",
            "this Idempotency-Key placed a different order; send a new key with a new order",
        )
        .with_details(json!({ "order_id": order_id })));
    }
    let order = store::get_on(&mut conn, &order_id)
        .await?
        .ok_or_else(missing_order)?;
    tracing::info!(order = %order.id, "order placement replayed for its idempotency key");
    Ok(Some(created(order, true)))
}

/// A key's order is gone: the key's row goes with its order (`ON DELETE
/// CASCADE`), so this is a broken database, not a client's mistake.
fn missing_order() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the order this Idempotency-Key placed is missing",
    )
}

/// 201 with the order and where it lives.
fn created(order: Order, replayed: bool) -> Response {
    let location = format!("/api/orders/{}", order.id);
    let mut response = (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        axum::Json(order),
    )
        .into_response();
    if replayed {
        response.headers_mut().insert(
            IDEMPOTENT_REPLAYED,
            header::HeaderValue::from_static("true"),
        );
    }
    response
}

async fn place(
    State(state): State<AppState>,
    customer: VerifiedUser,
    headers: HeaderMap,
    ApiJson(body): ApiJson<PlaceOrder>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let order = validate(body, customer)?;
    // A retry is answered before anything is asked of the catalog and
    // pricing, whose answers may have changed since.
    let keyed = key.map(|key| (key, fingerprint(&order)));
    if let Some((key, request)) = &keyed
        && let Some(done) = replay(&state, order.customer.as_str(), key, request).await?
    {
        return Ok(done);
    }

    // 1. The catalog: existence, stock and price of every SKU.
    // Owned values in the stream: borrowed ones trip the compiler's
    // higher-ranked lifetime check for `Send` handler futures.
    let lookups: Vec<_> = order
        .items
        .iter()
        .map(|(sku, _)| {
            let (catalog, sku) = (state.catalog.clone(), sku.clone());
            async move { deps::product(&catalog, &sku).await }
        })
        .collect();
    let found: Vec<Option<Product>> = stream::iter(lookups)
        .buffered(LOOKUP_CONCURRENCY)
        .try_collect()
        .await?;
    let unknown: Vec<&str> = order
        .items
        .iter()
        .zip(&found)
        .filter(|(_, p)| p.is_none())
        .map(|((sku, _), _)| sku.as_str())
        .collect();
    if !unknown.is_empty() {
        let mut err = ApiError::unprocessable(
            "unknown_sku",
            format!("the catalog has no product {}", quoted(&unknown)),
        )
        .with_details(json!({ "skus": unknown }));
        for (i, (sku, _)) in order.items.iter().enumerate() {
            if unknown.contains(&sku.as_str()) {
                err = err.with_field(format!("items[{i}].sku"), format!("unknown sku {sku:?}"));
            }
        }
        return Err(err);
    }
    let lines: Vec<(Product, i64)> = found
        .into_iter()
        .flatten()
        .zip(order.items.iter().map(|(_, q)| *q))
        .collect();
    // Stock is not checked here: inventory owns it and decides in the
    // saga (a reservation, or `stock.rejected` → cancelled, out_of_stock).
    // The catalog's figure is for display and may be stale by the time the
    // order is placed, so refusing on it would be both racy and redundant.
    let currency = lines
        .first()
        .map(|(p, _)| p.currency.clone())
        .unwrap_or_default();
    if lines.iter().any(|(p, _)| p.currency != currency) {
        return Err(ApiError::unprocessable(
            "mixed_currency",
            "the products are priced in different currencies; order them separately",
        ));
    }

    // 2. Pricing, at the catalog's prices.
    let quote = match deps::quote(&state.pricing, &lines, &currency, order.coupon.as_deref()).await
    {
        Ok(quote) => quote,
        Err(e) => return Err(pricing_error(e)),
    };
    let consistent = quote.lines.len() == lines.len()
        && quote
            .lines
            .iter()
            .zip(&lines)
            .all(|(q, (p, n))| q.sku == p.id && q.quantity == *n);
    if !consistent {
        tracing::error!("pricing answered a quote whose lines do not match the request");
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "dependency_unavailable",
            "the pricing service gave an inconsistent answer; try again shortly",
        ));
    }
    if let Some(expected) = order
        .expected_total_cents
        .filter(|expected| *expected != quote.total_cents)
    {
        return Err(ApiError::conflict(
            "price_changed",
            format!(
                "the total is now {}, not {}; review the basket and place the order again",
                amount(quote.total_cents, &quote.currency),
                amount(expected, &quote.currency)
            ),
        )
        .with_details(json!({
            "total_cents": quote.total_cents,
            "expected_total_cents": expected,
        })));
    }

    // 3. Store it and start the saga, in one transaction.
    let created_at = flotilla_chassis::now_rfc3339();
    let stored = Order {
        id: uuid::Uuid::new_v4().to_string(),
        customer: order.customer.as_str().to_owned(),
        status: store::PLACED.to_owned(),
        reason: None,
        currency: quote.currency.clone(),
        coupon: quote.coupon.clone(),
        lines: quote
            .lines
            .iter()
            .zip(&lines)
            .map(|(q, (p, _))| OrderLine {
                sku: q.sku.clone(),
                name: p.name.clone(),
                quantity: q.quantity,
                unit_price_cents: q.unit_price_cents,
                discount_cents: q.discount_cents,
                line_total_cents: q.line_total_cents,
            })
            .collect(),
        subtotal_cents: quote.subtotal_cents,
        discount_cents: quote.discount_cents,
        tax_cents: quote.tax_cents,
        total_cents: quote.total_cents,
        card_last4: Some(order.card[order.card.len() - 4..].to_owned()),
        created_at: created_at.clone(),
        history: vec![StatusChange {
            status: store::PLACED.to_owned(),
            reason: None,
            at: created_at,
        }],
    };
    let placed = events::placed(&stored, &order.card)?;
    let mut tx = state.db.begin().await?;
    store::insert(&mut tx, &stored).await?;
    if let Some((key, request)) = &keyed
        && !store::remember_key(&mut tx, &stored.customer, key, request, &stored.id).await?
    {
        // A concurrent retry with the same key placed its order first:
        // this one is not placed, and is answered as that one was.
        tx.rollback().await?;
        return replay(&state, &stored.customer, key, request)
            .await?
            .ok_or_else(missing_order);
    }
    events::enqueue_placed(&mut tx, placed).await?;
    tx.commit().await?;
    state.published();
    metrics::counter!("shop_orders_placed_total").increment(1);
    tracing::info!(order = %stored.id, total_cents = stored.total_cents, "order placed");
    Ok(created(stored, false))
}

/// Pricing rejecting the coupon is the client's problem (400 on the
/// `coupon` field). Pricing refusing anything else it was asked (a product
/// priced in a currency it does not quote, a price above its bound) is
/// 422 `unpriceable`: asking again cannot help, so it must not read as
/// "pricing unavailable; try again". Anything else from pricing is a
/// dependency failure.
fn pricing_error(e: flotilla_chassis::Error) -> ApiError {
    if e.status() == Some(StatusCode::BAD_REQUEST) {
        let refusal = e
            .body_json()
            .and_then(|body| ApiError::from_body(StatusCode::BAD_REQUEST, &body));
        if let Some(refusal) = refusal {
            if let Some(field) = refusal.fields.iter().find(|f| f.field == "coupon") {
                return ApiError::validation(vec![field.clone()]);
            }
            // Pricing's field errors say what it could not take; its
            // message alone is the generic "invalid fields".
            let why = if refusal.fields.is_empty() {
                refusal.message
            } else {
                refusal
                    .fields
                    .iter()
                    .map(|f| format!("{} {}", f.field, f.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            tracing::warn!(pricing = %why, "pricing cannot price an order");
            return ApiError::unprocessable(
                "unpriceable",
                format!("this order cannot be priced: {why}"),
            );
        }
    }
    ApiError::from(e)
}

/// `1920, "EUR"` → `19.20 EUR`, for messages.
fn amount(cents: i64, currency: &str) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    format!("{sign}{}.{:02} {currency}", abs / 100, abs % 100)
}

fn quoted(skus: &[&str]) -> String {
    skus.iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `GET /api/orders` query.
#[derive(Debug, Deserialize)]
struct ListParams {
    limit: Option<String>,
}

/// `GET /api/orders` response.
#[derive(Debug, Serialize)]
struct OrderList {
    orders: Vec<Order>,
}

async fn list(
    State(state): State<AppState>,
    customer: VerifiedUser,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<axum::Json<OrderList>, ApiError> {
    let limit = int_param(
        "limit",
        params.limit.as_deref(),
        DEFAULT_LIST_LIMIT,
        1..=MAX_LIST_LIMIT,
    )
    .map_err(|e| ApiError::validation(vec![e]))?;
    let orders = store::for_customer(&state.db, customer.as_str(), limit).await?;
    Ok(axum::Json(OrderList { orders }))
}

async fn one(
    State(state): State<AppState>,
    customer: VerifiedUser,
    Path(id): Path<String>,
) -> Result<axum::Json<Order>, ApiError> {
    // Someone else's order is "not found", so ids of others' orders leak nothing.
    store::get(&state.db, &id)
        .await?
        .filter(|order| order.customer == customer.as_str())
        .map(axum::Json)
        .ok_or_else(|| ApiError::not_found(format!("no order with id {id:?}")))
}

#[cfg(test)]
mod tests;
