//! The orders database: orders, their lines and their status history.
//!
//! Writes take the caller's connection, which is a transaction: placing an
//! order and enqueueing `order.placed`, or moving an order on and
//! enqueueing `order.confirmed`/`order.cancelled`, commit together.

use std::collections::HashMap;

use serde::Serialize;
use sqlx::{SqliteConnection, SqlitePool};

/// Where every order starts; the only status an event may move it from.
pub const PLACED: &str = "placed";
/// Paid for and its stock committed.
pub const CONFIRMED: &str = "confirmed";
/// Out of stock, payment declined or past the saga's deadline; see
/// `reason`.
pub const CANCELLED: &str = "cancelled";

/// An order as stored and as served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Order {
    pub id: String,
    pub customer: String,
    pub status: String,
    /// Why it was cancelled; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub currency: String,
    pub coupon: Option<String>,
    pub lines: Vec<OrderLine>,
    pub subtotal_cents: i64,
    pub discount_cents: i64,
    pub tax_cents: i64,
    pub total_cents: i64,
    /// The last four digits of the card it was paid with.
    pub card_last4: Option<String>,
    pub created_at: String,
    /// Every status it went through, oldest first.
    pub history: Vec<StatusChange>,
}

/// One step of an order's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct StatusChange {
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: String,
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct OrderLine {
    pub sku: String,
    pub name: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
    pub discount_cents: i64,
    pub line_total_cents: i64,
}

#[derive(sqlx::FromRow)]
struct OrderRow {
    id: String,
    customer: String,
    status: String,
    reason: Option<String>,
    currency: String,
    coupon: Option<String>,
    subtotal_cents: i64,
    discount_cents: i64,
    tax_cents: i64,
    total_cents: i64,
    card_last4: Option<String>,
    created_at: String,
}

#[derive(sqlx::FromRow)]
struct HistoryRow {
    order_id: String,
    #[sqlx(flatten)]
    change: StatusChange,
}

/// The columns [`OrderRow`] reads, as a macro so queries stay `&'static
/// str` (sqlx refuses SQL built at run time).
macro_rules! order_columns {
    () => {
        "id, customer, status, reason, currency, coupon, subtotal_cents,
         discount_cents, tax_cents, total_cents, card_last4, created_at"
    };
}

#[derive(sqlx::FromRow)]
struct LineRow {
    order_id: String,
    #[sqlx(flatten)]
    line: OrderLine,
}

impl OrderRow {
    fn with(self, lines: Vec<OrderLine>, history: Vec<StatusChange>) -> Order {
        Order {
            id: self.id,
            customer: self.customer,
            status: self.status,
            reason: self.reason,
            currency: self.currency,
            coupon: self.coupon,
            lines,
            subtotal_cents: self.subtotal_cents,
            discount_cents: self.discount_cents,
            tax_cents: self.tax_cents,
            total_cents: self.total_cents,
            card_last4: self.card_last4,
            created_at: self.created_at,
            history,
        }
    }
}

/// Stores `order`, its lines and its history on `conn` (the caller's
/// transaction).
pub async fn insert(tx: &mut SqliteConnection, order: &Order) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO orders (id, customer, status, reason, currency, coupon, subtotal_cents,
                             discount_cents, tax_cents, total_cents, card_last4, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )
    .bind(&order.id)
    .bind(&order.customer)
    .bind(&order.status)
    .bind(&order.reason)
    .bind(&order.currency)
    .bind(&order.coupon)
    .bind(order.subtotal_cents)
    .bind(order.discount_cents)
    .bind(order.tax_cents)
    .bind(order.total_cents)
    .bind(&order.card_last4)
    .bind(&order.created_at)
    .execute(&mut *tx)
    .await?;
    for (seq, change) in (0_i64..).zip(&order.history) {
        sqlx::query(
            "INSERT INTO order_status_history (order_id, seq, status, reason, at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(&order.id)
        .bind(seq)
        .bind(&change.status)
        .bind(&change.reason)
        .bind(&change.at)
        .execute(&mut *tx)
        .await?;
    }
    for (line_no, line) in (0_i64..).zip(&order.lines) {
        sqlx::query(
            "INSERT INTO order_lines (order_id, line_no, sku, name, quantity,
                                      unit_price_cents, discount_cents, line_total_cents)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .bind(&order.id)
        .bind(line_no)
        .bind(&line.sku)
        .bind(&line.name)
        .bind(line.quantity)
        .bind(line.unit_price_cents)
        .bind(line.discount_cents)
        .bind(line.line_total_cents)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// The placement a customer's idempotency key was first used for: the
/// request as [`remember_key`] stored it, and the order it placed.
pub async fn keyed(
    conn: &mut SqliteConnection,
    customer: &str,
    key: &str,
) -> Result<Option<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT request, order_id FROM order_idempotency_keys WHERE customer = ?1 AND key = ?2",
    )
    .bind(customer)
    .bind(key)
    .fetch_optional(&mut *conn)
    .await
}

/// Records that `customer`'s `key` placed `order_id` with `request`, in
/// the transaction that stores the order; `false` (and nothing written)
/// when the key is taken already: a concurrent retry placed its order
/// first, and this transaction must roll back.
pub async fn remember_key(
    tx: &mut SqliteConnection,
    customer: &str,
    key: &str,
    request: &str,
    order_id: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO order_idempotency_keys (customer, key, request, order_id)
         VALUES (?1, ?2, ?3, ?4) ON CONFLICT (customer, key) DO NOTHING",
    )
    .bind(customer)
    .bind(key)
    .bind(request)
    .bind(order_id)
    .execute(&mut *tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Moves order `id` from `placed` to `to` (with `reason`), recording the
/// step in its history, and returns the order as it now is.
///
/// `None` when the order is unknown or no longer `placed`: the UPDATE is
/// guarded by `status = 'placed'`, so a redelivered or late event (a
/// `payment.failed` after the order was already cancelled for stock, say)
/// changes nothing and publishes nothing, and of two racing events only
/// one wins.
pub async fn transition(
    conn: &mut SqliteConnection,
    id: &str,
    to: &str,
    reason: Option<&str>,
) -> Result<Option<Order>, sqlx::Error> {
    let at = flotilla_chassis::now_rfc3339();
    let moved =
        sqlx::query("UPDATE orders SET status = ?2, reason = ?3 WHERE id = ?1 AND status = ?4")
            .bind(id)
            .bind(to)
            .bind(reason)
            .bind(PLACED)
            .execute(&mut *conn)
            .await?;
    if moved.rows_affected() == 0 {
        return Ok(None);
    }
    sqlx::query(
        "INSERT INTO order_status_history (order_id, seq, status, reason, at)
         SELECT ?1, COALESCE(MAX(seq) + 1, 0), ?2, ?3, ?4
         FROM order_status_history WHERE order_id = ?1",
    )
    .bind(id)
    .bind(to)
    .bind(reason)
    .bind(&at)
    .execute(&mut *conn)
    .await?;
    get_on(conn, id).await
}

/// Where a page of [`placed_before`] starts: after this order (the
/// default: from the oldest).
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct PlacedKey {
    pub created_at: String,
    pub id: String,
}

/// At most `limit` orders still `placed` that were placed before `cutoff`
/// (RFC 3339 UTC, as `created_at`) and come after `after` in
/// `(created_at, id)` order, oldest first: a page of the sweeper's (index
/// `orders_placed_by_age`, whose condition the query repeats word for
/// word so SQLite can use it).
pub async fn placed_before(
    db: &SqlitePool,
    cutoff: &str,
    after: &PlacedKey,
    limit: i64,
) -> Result<Vec<PlacedKey>, sqlx::Error> {
    sqlx::query_as(PLACED_BEFORE)
        .bind(cutoff)
        .bind(&after.created_at)
        .bind(&after.id)
        .bind(limit)
        .fetch_all(db)
        .await
}

/// [`placed_before`]'s query.
pub const PLACED_BEFORE: &str = "SELECT created_at, id FROM orders
     WHERE status = 'placed' AND created_at < ?1 AND (created_at, id) > (?2, ?3)
     ORDER BY created_at, id LIMIT ?4";

/// One order by id.
pub async fn get(db: &SqlitePool, id: &str) -> Result<Option<Order>, sqlx::Error> {
    let mut conn = db.acquire().await?;
    get_on(&mut conn, id).await
}

/// One order by id, read on `conn` (inside the caller's transaction).
pub async fn get_on(conn: &mut SqliteConnection, id: &str) -> Result<Option<Order>, sqlx::Error> {
    let row = sqlx::query_as::<_, OrderRow>(concat!(
        "SELECT ",
        order_columns!(),
        " FROM orders WHERE id = ?1"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let lines = sqlx::query_as::<_, OrderLine>(
        "SELECT sku, name, quantity, unit_price_cents, discount_cents, line_total_cents
         FROM order_lines WHERE order_id = ?1 ORDER BY line_no",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    let history = sqlx::query_as::<_, StatusChange>(
        "SELECT status, reason, at FROM order_status_history WHERE order_id = ?1 ORDER BY seq",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(row.with(lines, history)))
}

/// A customer's latest `limit` orders, newest first (insertion order breaks
/// ties within a millisecond).
pub async fn for_customer(
    db: &SqlitePool,
    customer: &str,
    limit: i64,
) -> Result<Vec<Order>, sqlx::Error> {
    let rows = sqlx::query_as::<_, OrderRow>(concat!(
        "SELECT ",
        order_columns!(),
        " FROM orders WHERE customer = ?1 ORDER BY created_at DESC, rowid DESC LIMIT ?2"
    ))
    .bind(customer)
    .bind(limit)
    .fetch_all(db)
    .await?;
    let line_rows = sqlx::query_as::<_, LineRow>(
        "SELECT order_id, sku, name, quantity, unit_price_cents, discount_cents, line_total_cents
         FROM order_lines
         WHERE order_id IN (SELECT id FROM orders WHERE customer = ?1
                            ORDER BY created_at DESC, rowid DESC LIMIT ?2)
         ORDER BY order_id, line_no",
    )
    .bind(customer)
    .bind(limit)
    .fetch_all(db)
    .await?;
    let history_rows = sqlx::query_as::<_, HistoryRow>(
        "SELECT order_id, status, reason, at
         FROM order_status_history
         WHERE order_id IN (SELECT id FROM orders WHERE customer = ?1
                            ORDER BY created_at DESC, rowid DESC LIMIT ?2)
         ORDER BY order_id, seq",
    )
    .bind(customer)
    .bind(limit)
    .fetch_all(db)
    .await?;
    let mut lines: HashMap<String, Vec<OrderLine>> = HashMap::new();
    for row in line_rows {
        lines.entry(row.order_id).or_default().push(row.line);
    }
    let mut history: HashMap<String, Vec<StatusChange>> = HashMap::new();
    for row in history_rows {
        history.entry(row.order_id).or_default().push(row.change);
    }
    Ok(rows
        .into_iter()
        .map(|row| {
            let own = lines.remove(&row.id).unwrap_or_default();
            let steps = history.remove(&row.id).unwrap_or_default();
            row.with(own, steps)
        })
        .collect())
}
