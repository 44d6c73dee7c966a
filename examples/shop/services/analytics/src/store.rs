//! The analytics database: sales per product and the stream position they
//! reflect, always updated together.

use serde::{Deserialize, Serialize};
use sqlx::SqlitePool;

/// One product's sales, as `GET /api/analytics/sales` serves them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct ProductSales {
    pub sku: String,
    pub currency: String,
    pub units: i64,
    pub revenue_cents: i64,
    pub orders: i64,
}

/// `order.confirmed` data, the part analytics reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Confirmed {
    /// Counted once, however many copies of its event the stream holds
    /// (absent from events of older orders: those are not deduplicated).
    #[serde(default)]
    pub order_id: Option<String>,
    pub items: Vec<Item>,
    #[serde(default = "eur")]
    pub currency: String,
}

fn eur() -> String {
    "EUR".to_owned()
}

/// One line of a confirmed order.
#[derive(Debug, Clone, Deserialize)]
pub struct Item {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
    /// What the line cost after its volume discount; events of older
    /// orders lack it, and their revenue is quantity times unit price.
    #[serde(default)]
    pub line_total_cents: Option<i64>,
}

impl Item {
    /// The line's revenue: what the customer paid for it before the
    /// order's own discounts and tax.
    fn revenue_cents(&self) -> i64 {
        self.line_total_cents
            .unwrap_or_else(|| self.quantity.saturating_mul(self.unit_price_cents))
    }
}

/// Whether a record was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Counted,
    /// At or below the partition's last applied sequence: a re-read.
    AlreadyCounted,
    /// A second copy of an order already counted (the position moved past
    /// it).
    Duplicate,
}

/// The last sequence applied for `partition` of `stream`.
pub async fn position(
    db: &SqlitePool,
    stream: &str,
    partition: u32,
) -> Result<Option<u64>, sqlx::Error> {
    let last: Option<i64> = sqlx::query_scalar(
        "SELECT last_sequence FROM stream_positions WHERE stream = ?1 AND partition = ?2",
    )
    .bind(stream)
    .bind(i64::from(partition))
    .fetch_optional(db)
    .await?;
    Ok(last.and_then(|l| u64::try_from(l).ok()))
}

/// Adds a confirmed order at `sequence` of `partition` to the totals, and
/// moves the partition's position to it, in one transaction; a sequence at
/// or below the position is skipped. `order` is `None` for records that
/// are not counted (another event type, undecodable data): the position
/// still moves past them.
pub async fn apply(
    db: &SqlitePool,
    stream: &str,
    partition: u32,
    sequence: u64,
    order: Option<&Confirmed>,
) -> Result<Applied, sqlx::Error> {
    let sequence = i64::try_from(sequence).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    let mut tx = db.begin().await?;
    // Write first, so the transaction takes SQLite's write lock before it
    // reads the position (no lock upgrade races between two writers).
    let moved = sqlx::query(
        "INSERT INTO stream_positions (stream, partition, last_sequence) VALUES (?1, ?2, ?3)
         ON CONFLICT (stream, partition) DO UPDATE SET last_sequence = excluded.last_sequence
         WHERE excluded.last_sequence > stream_positions.last_sequence",
    )
    .bind(stream)
    .bind(i64::from(partition))
    .bind(sequence)
    .execute(&mut *tx)
    .await?;
    if moved.rows_affected() == 0 {
        return Ok(Applied::AlreadyCounted);
    }
    if let Some(order) = order {
        if let Some(id) = &order.order_id {
            let first = sqlx::query(
                "INSERT INTO counted_orders (order_id) VALUES (?1) ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
            if first.rows_affected() == 0 {
                tx.commit().await?;
                return Ok(Applied::Duplicate);
            }
        }
        for item in order.items.iter().filter(|i| i.quantity > 0) {
            sqlx::query(
                "INSERT INTO product_sales (sku, currency, units, revenue_cents, orders)
                 VALUES (?1, ?2, ?3, ?4, 1)
                 ON CONFLICT (sku, currency) DO UPDATE SET
                     units = units + excluded.units,
                     revenue_cents = revenue_cents + excluded.revenue_cents,
                     orders = orders + 1",
            )
            .bind(&item.sku)
            .bind(&order.currency)
            .bind(item.quantity)
            .bind(item.revenue_cents())
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok(Applied::Counted)
}

/// Every product sold, best revenue first.
pub async fn sales(db: &SqlitePool) -> Result<Vec<ProductSales>, sqlx::Error> {
    sqlx::query_as::<_, ProductSales>(
        "SELECT sku, currency, units, revenue_cents, orders FROM product_sales
         ORDER BY revenue_cents DESC, sku",
    )
    .fetch_all(db)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn db() -> SqlitePool {
        flotilla_chassis::open_sqlite("sqlite::memory:", &crate::MIGRATOR)
            .await
            .unwrap()
    }

    /// A confirmed order of `items` (sku, quantity, unit price), with an
    /// id of its own.
    fn order(items: &[(&str, i64, i64)]) -> Confirmed {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Confirmed {
            order_id: Some(format!("o-{n}")),
            currency: "EUR".into(),
            items: items
                .iter()
                .map(|(sku, quantity, price)| Item {
                    sku: (*sku).into(),
                    quantity: *quantity,
                    unit_price_cents: *price,
                    line_total_cents: None,
                })
                .collect(),
        }
    }

    /// The orders outbox may publish an `order.confirmed` twice; the
    /// stream keeps both at different sequences. The order counts once.
    #[tokio::test]
    async fn a_republished_order_counts_once() {
        let db = db().await;
        let a = order(&[("sku-mug", 2, 1450)]);
        assert_eq!(
            apply(&db, "s", 0, 1, Some(&a)).await.unwrap(),
            Applied::Counted
        );
        assert_eq!(
            apply(&db, "s", 0, 2, Some(&a)).await.unwrap(),
            Applied::Duplicate
        );
        assert_eq!(
            apply(&db, "s", 3, 9, Some(&a)).await.unwrap(),
            Applied::Duplicate
        );
        let got = sales(&db).await.unwrap();
        assert_eq!((got[0].units, got[0].orders), (2, 1));
        // The position moved past the copy.
        assert_eq!(position(&db, "s", 0).await.unwrap(), Some(2));
    }

    /// Revenue is what the line cost after its volume discount.
    #[tokio::test]
    async fn revenue_is_the_line_total() {
        let db = db().await;
        let mut a = order(&[("sku-mug", 3, 1450)]);
        a.items[0].line_total_cents = Some(3915);
        apply(&db, "s", 0, 1, Some(&a)).await.unwrap();
        assert_eq!(sales(&db).await.unwrap()[0].revenue_cents, 3915);
    }

    #[tokio::test]
    async fn sums_units_and_revenue_per_product() {
        let db = db().await;
        let a = order(&[("sku-mug", 2, 1450), ("sku-kettle", 1, 5490)]);
        let b = order(&[("sku-mug", 1, 1450)]);
        assert_eq!(
            apply(&db, "s", 0, 1, Some(&a)).await.unwrap(),
            Applied::Counted
        );
        assert_eq!(
            apply(&db, "s", 1, 1, Some(&b)).await.unwrap(),
            Applied::Counted
        );
        let got = sales(&db).await.unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[0],
            ProductSales {
                sku: "sku-kettle".into(),
                currency: "EUR".into(),
                units: 1,
                revenue_cents: 5490,
                orders: 1
            }
        );
        assert_eq!(
            (got[1].units, got[1].revenue_cents, got[1].orders),
            (3, 4350, 2)
        );
    }

    #[tokio::test]
    async fn a_re_read_after_a_crash_does_not_double_count() {
        let db = db().await;
        let a = order(&[("sku-mug", 2, 1450)]);
        let b = order(&[("sku-mug", 2, 1450)]);
        apply(&db, "s", 0, 7, Some(&a)).await.unwrap();
        apply(&db, "s", 0, 8, Some(&b)).await.unwrap();
        // The broker checkpoint was lost: records 7 and 8 come again.
        assert_eq!(
            apply(&db, "s", 0, 7, Some(&a)).await.unwrap(),
            Applied::AlreadyCounted
        );
        assert_eq!(
            apply(&db, "s", 0, 8, Some(&b)).await.unwrap(),
            Applied::AlreadyCounted
        );
        assert_eq!(sales(&db).await.unwrap()[0].units, 4);
        assert_eq!(position(&db, "s", 0).await.unwrap(), Some(8));
        // Partitions are independent.
        assert_eq!(position(&db, "s", 1).await.unwrap(), None);
        let c = order(&[("sku-mug", 2, 1450)]);
        assert_eq!(
            apply(&db, "s", 1, 3, Some(&c)).await.unwrap(),
            Applied::Counted
        );
        assert_eq!(sales(&db).await.unwrap()[0].units, 6);
    }

    #[tokio::test]
    async fn skipped_records_still_move_the_position() {
        let db = db().await;
        assert_eq!(apply(&db, "s", 2, 5, None).await.unwrap(), Applied::Counted);
        assert_eq!(position(&db, "s", 2).await.unwrap(), Some(5));
        assert!(sales(&db).await.unwrap().is_empty());
    }
}
