//! The orders database: orders and their lines, written together.

use std::collections::HashMap;

use serde::Serialize;
use sqlx::SqlitePool;

/// An order as stored and as served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Order {
    pub id: String,
    pub customer: String,
    pub status: String,
    pub currency: String,
    pub coupon: Option<String>,
    pub lines: Vec<OrderLine>,
    pub subtotal_cents: i64,
    pub discount_cents: i64,
    pub tax_cents: i64,
    pub total_cents: i64,
    pub created_at: String,
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
    currency: String,
    coupon: Option<String>,
    subtotal_cents: i64,
    discount_cents: i64,
    tax_cents: i64,
    total_cents: i64,
    created_at: String,
}

#[derive(sqlx::FromRow)]
struct LineRow {
    order_id: String,
    #[sqlx(flatten)]
    line: OrderLine,
}

impl OrderRow {
    fn with_lines(self, lines: Vec<OrderLine>) -> Order {
        Order {
            id: self.id,
            customer: self.customer,
            status: self.status,
            currency: self.currency,
            coupon: self.coupon,
            lines,
            subtotal_cents: self.subtotal_cents,
            discount_cents: self.discount_cents,
            tax_cents: self.tax_cents,
            total_cents: self.total_cents,
            created_at: self.created_at,
        }
    }
}

/// Stores `order` and its lines in one transaction.
pub async fn insert(db: &SqlitePool, order: &Order) -> Result<(), sqlx::Error> {
    let mut tx = db.begin().await?;
    sqlx::query(
        "INSERT INTO orders (id, customer, status, currency, coupon, subtotal_cents,
                             discount_cents, tax_cents, total_cents, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )
    .bind(&order.id)
    .bind(&order.customer)
    .bind(&order.status)
    .bind(&order.currency)
    .bind(&order.coupon)
    .bind(order.subtotal_cents)
    .bind(order.discount_cents)
    .bind(order.tax_cents)
    .bind(order.total_cents)
    .bind(&order.created_at)
    .execute(&mut *tx)
    .await?;
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
    tx.commit().await
}

/// One order by id.
pub async fn get(db: &SqlitePool, id: &str) -> Result<Option<Order>, sqlx::Error> {
    let row = sqlx::query_as::<_, OrderRow>(
        "SELECT id, customer, status, currency, coupon, subtotal_cents,
                discount_cents, tax_cents, total_cents, created_at
         FROM orders WHERE id = ?1",
    )
    .bind(id)
    .fetch_optional(db)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let lines = sqlx::query_as::<_, OrderLine>(
        "SELECT sku, name, quantity, unit_price_cents, discount_cents, line_total_cents
         FROM order_lines WHERE order_id = ?1 ORDER BY line_no",
    )
    .bind(id)
    .fetch_all(db)
    .await?;
    Ok(Some(row.with_lines(lines)))
}

/// A customer's latest `limit` orders, newest first (insertion order breaks
/// ties within a millisecond).
pub async fn for_customer(
    db: &SqlitePool,
    customer: &str,
    limit: i64,
) -> Result<Vec<Order>, sqlx::Error> {
    let rows = sqlx::query_as::<_, OrderRow>(
        "SELECT id, customer, status, currency, coupon, subtotal_cents,
                discount_cents, tax_cents, total_cents, created_at
         FROM orders WHERE customer = ?1
         ORDER BY created_at DESC, rowid DESC LIMIT ?2",
    )
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
    let mut lines: HashMap<String, Vec<OrderLine>> = HashMap::new();
    for row in line_rows {
        lines.entry(row.order_id).or_default().push(row.line);
    }
    Ok(rows
        .into_iter()
        .map(|row| {
            let own = lines.remove(&row.id).unwrap_or_default();
            row.with_lines(own)
        })
        .collect())
}
