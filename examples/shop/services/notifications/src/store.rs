//! The notifications database, and how an order event reads as a message.

use serde::{Deserialize, Serialize};
use sqlx::{SqliteConnection, SqlitePool};

/// A message shown to a customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Notification {
    pub id: i64,
    pub order_id: String,
    pub kind: String,
    pub message: String,
    pub created_at: String,
}

/// `order.confirmed` / `order.cancelled` data, the part notifications
/// reads.
#[derive(Debug, Clone, Deserialize)]
pub struct OrderEnded {
    pub order_id: String,
    pub customer: String,
    pub total_cents: i64,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

/// `1234, "EUR"` → `€12.34`; other currencies read `12.34 USD`.
pub fn money(cents: i64, currency: &str) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    let number = format!("{}.{:02}", abs / 100, abs % 100);
    match currency {
        "EUR" => format!("{sign}€{number}"),
        "GBP" => format!("{sign}£{number}"),
        "USD" => format!("{sign}${number}"),
        other => format!("{sign}{number} {other}"),
    }
}

/// The order's short reference, as the shop shows it: the UUID's first
/// eight characters.
fn reference(order_id: &str) -> &str {
    order_id.get(..8).unwrap_or(order_id)
}

/// The event types a customer is told about.
pub const KINDS: [&str; 2] = ["order.confirmed", "order.cancelled"];

/// The message for an order event of type `kind`, `None` for types
/// notifications does not tell customers about.
pub fn message(kind: &str, order: &OrderEnded) -> Option<String> {
    let reference = reference(&order.order_id);
    match kind {
        "order.confirmed" => Some(format!(
            "Order #{reference} confirmed — {}",
            money(
                order.total_cents,
                order.currency.as_deref().unwrap_or("EUR")
            )
        )),
        "order.cancelled" => {
            let why = match order.reason.as_deref() {
                Some("payment_declined") => "payment declined".to_owned(),
                Some("out_of_stock") => "out of stock".to_owned(),
                Some(other) => other.replace('_', " "),
                None => "no reason given".to_owned(),
            };
            Some(format!("Order #{reference} cancelled: {why}"))
        }
        _ => None,
    }
}

/// Stores the message for `order` on `conn` (the caller's transaction).
/// Returns whether it was new: one message per order and kind.
pub async fn insert(
    conn: &mut SqliteConnection,
    kind: &str,
    order: &OrderEnded,
    message: &str,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO notifications (customer, order_id, kind, message, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (order_id, kind) DO NOTHING",
    )
    .bind(&order.customer)
    .bind(&order.order_id)
    .bind(kind)
    .bind(message)
    .bind(flotilla_chassis::now_rfc3339())
    .execute(&mut *conn)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// A customer's latest `limit` messages, newest first.
pub async fn for_customer(
    db: &SqlitePool,
    customer: &str,
    limit: i64,
) -> Result<Vec<Notification>, sqlx::Error> {
    sqlx::query_as::<_, Notification>(
        "SELECT id, order_id, kind, message, created_at FROM notifications
         WHERE customer = ?1 ORDER BY id DESC LIMIT ?2",
    )
    .bind(customer)
    .bind(limit)
    .fetch_all(db)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(reason: Option<&str>) -> OrderEnded {
        OrderEnded {
            order_id: "1f0e2d3c-aaaa-4bbb-8ccc-000000000000".into(),
            customer: "c-1".into(),
            total_cents: 1234,
            currency: Some("EUR".into()),
            reason: reason.map(str::to_owned),
        }
    }

    #[test]
    fn messages_read_like_a_shop() {
        assert_eq!(
            message("order.confirmed", &ended(None)).unwrap(),
            "Order #1f0e2d3c confirmed — €12.34"
        );
        assert_eq!(
            message("order.cancelled", &ended(Some("payment_declined"))).unwrap(),
            "Order #1f0e2d3c cancelled: payment declined"
        );
        assert_eq!(
            message("order.cancelled", &ended(Some("out_of_stock"))).unwrap(),
            "Order #1f0e2d3c cancelled: out of stock"
        );
        assert_eq!(message("order.placed", &ended(None)), None);
    }

    #[test]
    fn money_formats() {
        assert_eq!(money(1234, "EUR"), "€12.34");
        assert_eq!(money(5, "EUR"), "€0.05");
        assert_eq!(money(100, "CHF"), "1.00 CHF");
        assert_eq!(money(-150, "USD"), "-$1.50");
    }

    #[tokio::test]
    async fn one_message_per_order_and_kind_newest_first() {
        let db = flotilla_chassis::open_sqlite("sqlite::memory:", &crate::MIGRATOR)
            .await
            .unwrap();
        let mut conn = db.acquire().await.unwrap();
        let a = ended(None);
        let mut b = ended(Some("out_of_stock"));
        b.order_id = "22222222-0000".into();
        assert!(
            insert(&mut conn, "order.confirmed", &a, "first")
                .await
                .unwrap()
        );
        assert!(
            !insert(&mut conn, "order.confirmed", &a, "again")
                .await
                .unwrap()
        );
        assert!(
            insert(&mut conn, "order.cancelled", &b, "second")
                .await
                .unwrap()
        );
        drop(conn);
        let got = for_customer(&db, "c-1", 50).await.unwrap();
        let messages: Vec<&str> = got.iter().map(|n| n.message.as_str()).collect();
        assert_eq!(messages, ["second", "first"]);
        assert!(for_customer(&db, "c-2", 50).await.unwrap().is_empty());
    }
}
