//! The inventory database: stock per SKU and one reservation per order.
//!
//! Every function here takes the caller's connection, which is a
//! transaction: the event handlers run them between the inbox check and
//! the outbox enqueue, so a reservation and the event announcing it commit
//! together or not at all.

use serde::{Deserialize, Serialize};
use sqlx::{Connection, SqliteConnection, SqlitePool};

/// One SKU's stock, as `GET /api/inventory/{sku}` serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Stock {
    pub sku: String,
    pub available: i64,
    pub reserved: i64,
    /// Incremented with every change to `available` (see [`Level`]).
    pub version: i64,
}

/// A SKU's availability after a change, as the events announcing the
/// change carry it (`levels`): readers keep the figure with the highest
/// `version` they have seen and drop older ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Level {
    pub sku: String,
    pub available: i64,
    pub version: i64,
}

/// One line to reserve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub sku: String,
    pub quantity: i64,
}

/// What asking to reserve an order's items came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserve {
    /// Every item is now held for the order.
    Reserved,
    /// Nothing was held: `sku` is unknown or short.
    Rejected { sku: String, reason: &'static str },
    /// The order was seen before (whatever the answer was then); nothing
    /// changed and nothing should be published again.
    AlreadyDecided,
}

/// Reserves all of `items` for `order_id`, or none of them.
///
/// Each line is a conditional decrement (`available >= quantity`) inside a
/// savepoint; the first line that cannot be had rolls the savepoint back,
/// so earlier lines are returned and a rejected order holds nothing. The
/// outcome is recorded either way, which makes a repeated `order.placed`
/// for the same order a no-op even under a different event id.
pub async fn reserve(
    conn: &mut SqliteConnection,
    order_id: &str,
    customer: &str,
    items: &[Item],
) -> Result<Reserve, sqlx::Error> {
    if status_of(conn, order_id).await?.is_some() {
        return Ok(Reserve::AlreadyDecided);
    }
    let now = flotilla_chassis::now_rfc3339();

    // A line with a non-positive quantity would *add* stock; orders
    // validates quantities, but a malformed event must not mint stock.
    let mut shortfall = match items.iter().find(|i| i.quantity <= 0) {
        Some(bad) => Some((bad.sku.clone(), "invalid_quantity")),
        None if items.is_empty() => Some((String::new(), "no_items")),
        None => None,
    };
    let mut savepoint = conn.begin().await?;
    for item in items {
        if shortfall.is_some() {
            break;
        }
        let updated = sqlx::query(
            "UPDATE stock SET available = available - ?2, reserved = reserved + ?2,
                              version = version + 1
             WHERE sku = ?1 AND available >= ?2",
        )
        .bind(&item.sku)
        .bind(item.quantity)
        .execute(&mut *savepoint)
        .await?;
        if updated.rows_affected() == 0 {
            let known: Option<i64> = sqlx::query_scalar("SELECT 1 FROM stock WHERE sku = ?1")
                .bind(&item.sku)
                .fetch_optional(&mut *savepoint)
                .await?;
            let reason = if known.is_some() {
                "out_of_stock"
            } else {
                "unknown_sku"
            };
            shortfall = Some((item.sku.clone(), reason));
        }
    }

    match shortfall {
        Some((sku, reason)) => {
            savepoint.rollback().await?;
            reject(conn, order_id, customer, reason, &now).await?;
            Ok(Reserve::Rejected { sku, reason })
        }
        None => {
            sqlx::query(
                "INSERT INTO reservations (order_id, customer, status, created_at, updated_at)
                 VALUES (?1, ?2, 'reserved', ?3, ?3)",
            )
            .bind(order_id)
            .bind(customer)
            .bind(&now)
            .execute(&mut *savepoint)
            .await?;
            for item in items {
                // Orders merges repeated SKUs; should an event still repeat
                // one, the quantities add up rather than fail the insert.
                sqlx::query(
                    "INSERT INTO reservation_items (order_id, sku, quantity) VALUES (?1, ?2, ?3)
                     ON CONFLICT (order_id, sku) DO UPDATE SET quantity = quantity + excluded.quantity",
                )
                .bind(order_id)
                .bind(&item.sku)
                .bind(item.quantity)
                .execute(&mut *savepoint)
                .await?;
            }
            savepoint.commit().await?;
            Ok(Reserve::Reserved)
        }
    }
}

/// The status of `order_id`'s reservation, if it has one.
async fn status_of(
    conn: &mut SqliteConnection,
    order_id: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT status FROM reservations WHERE order_id = ?1")
        .bind(order_id)
        .fetch_optional(&mut *conn)
        .await
}

/// What settling a reservation came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// The reservation moved on; these were its items.
    Done(Vec<Item>),
    /// There is no live reservation for the order (never reserved,
    /// rejected, or already settled): nothing to do.
    NotReserved,
}

/// Payment went through: the held units are sold, so they leave
/// `reserved` for good. Only a `reserved` reservation moves.
pub async fn commit(conn: &mut SqliteConnection, order_id: &str) -> Result<Settle, sqlx::Error> {
    settle(conn, order_id, RESERVED, COMMITTED).await
}

/// Payment failed: the saga's compensation. The held units go back to
/// `available`. Only a `reserved` reservation moves, so releasing twice
/// (or after a commit) returns nothing twice.
pub async fn release(conn: &mut SqliteConnection, order_id: &str) -> Result<Settle, sqlx::Error> {
    settle(conn, order_id, RESERVED, RELEASED).await
}

const RESERVED: &str = "reserved";
const COMMITTED: &str = "committed";
const RELEASED: &str = "released";
/// The `reason` of the reservation an order cancelled before its
/// `order.placed` arrived never gets (see [`cancel`]).
pub const ORDER_CANCELLED: &str = "order_cancelled";

/// What an order's cancellation (`order.cancelled`) came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancel {
    /// What the order held is available again: these were its items.
    Released(Vec<Item>),
    /// It held nothing: rejected, or released already (its payment failed,
    /// or this cancellation was handled under another event id).
    NothingHeld,
    /// Its `order.placed` has not arrived (the two come by way of one
    /// queue but not in order, e.g. when the sweeper of orders cancelled
    /// it while inventory was down): the order is recorded as decided, so
    /// that `order.placed`, when it comes, reserves nothing.
    Forestalled,
}

/// The order was cancelled (whatever the reason): whatever it holds goes
/// back to `available`, once.
///
/// Each unit moves with one guarded change of the reservation's status,
/// and statuses only move forward (reserved → committed → released,
/// reserved → released; rejected and released are final), so however
/// the events interleave and repeat, units are given back at most once and
/// never left held:
/// - `reserved`: released, as a failed payment would be; a
///   `payment.succeeded` or `payment.failed` after it finds nothing to
///   settle.
/// - `committed`: the payment succeeded here, but orders had cancelled the
///   order first (the saga's deadline), so payments refunds it and the
///   units, sold to nobody, are available again.
/// - none yet: [`Cancel::Forestalled`].
/// - anything else: nothing held.
///
/// The reads and the guarded UPDATE run in the handler's transaction,
/// which holds SQLite's write lock from its first statement (the inbox
/// claim), so nothing changes between them.
pub async fn cancel(
    conn: &mut SqliteConnection,
    order_id: &str,
    customer: &str,
) -> Result<Cancel, sqlx::Error> {
    let from = match status_of(conn, order_id).await?.as_deref() {
        None => {
            let now = flotilla_chassis::now_rfc3339();
            reject(conn, order_id, customer, ORDER_CANCELLED, &now).await?;
            return Ok(Cancel::Forestalled);
        }
        Some(RESERVED) => RESERVED,
        Some(COMMITTED) => COMMITTED,
        Some(_) => return Ok(Cancel::NothingHeld),
    };
    Ok(match settle(conn, order_id, from, RELEASED).await? {
        Settle::Done(items) => Cancel::Released(items),
        Settle::NotReserved => Cancel::NothingHeld,
    })
}

/// Records `order_id` as rejected (`reason`), holding nothing: a later
/// `order.placed` for it then finds it decided ([`reserve`]). Callers
/// have seen no row for it in their transaction, which holds the write
/// lock.
async fn reject(
    conn: &mut SqliteConnection,
    order_id: &str,
    customer: &str,
    reason: &str,
    now: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO reservations (order_id, customer, status, reason, created_at, updated_at)
         VALUES (?1, ?2, 'rejected', ?3, ?4, ?4)",
    )
    .bind(order_id)
    .bind(customer)
    .bind(reason)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Moves the reservation from `from` to `to` and its units accordingly.
async fn settle(
    conn: &mut SqliteConnection,
    order_id: &str,
    from: &'static str,
    to: &'static str,
) -> Result<Settle, sqlx::Error> {
    // The guard is the WHERE clause: of two racing settlements only one
    // sees the reservation in `from`.
    let moved = sqlx::query(
        "UPDATE reservations SET status = ?2, updated_at = ?3
         WHERE order_id = ?1 AND status = ?4",
    )
    .bind(order_id)
    .bind(to)
    .bind(flotilla_chassis::now_rfc3339())
    .bind(from)
    .execute(&mut *conn)
    .await?;
    if moved.rows_affected() == 0 {
        return Ok(Settle::NotReserved);
    }
    let items = sqlx::query_as::<_, (String, i64)>(
        "SELECT sku, quantity FROM reservation_items WHERE order_id = ?1 ORDER BY sku",
    )
    .bind(order_id)
    .fetch_all(&mut *conn)
    .await?;
    // Units still held leave `reserved` (committed ones left it at the
    // commit). A release gives them back to `available` (a new version);
    // a commit only takes them out of `reserved`, which no event
    // announces.
    let out_of_reserved = i64::from(from == RESERVED);
    let back_to_available = i64::from(to == RELEASED);
    for (sku, quantity) in &items {
        sqlx::query(
            "UPDATE stock SET reserved = reserved - ?2 * ?4, available = available + ?2 * ?3,
                              version = version + ?3
             WHERE sku = ?1",
        )
        .bind(sku)
        .bind(quantity)
        .bind(back_to_available)
        .bind(out_of_reserved)
        .execute(&mut *conn)
        .await?;
    }
    Ok(Settle::Done(
        items
            .into_iter()
            .map(|(sku, quantity)| Item { sku, quantity })
            .collect(),
    ))
}

/// The current levels of `items`' SKUs, once each, ordered by SKU. Read
/// on the transaction that changed them, so each is the figure of its
/// version.
pub async fn levels(
    conn: &mut SqliteConnection,
    items: &[Item],
) -> Result<Vec<Level>, sqlx::Error> {
    let mut skus: Vec<&str> = items.iter().map(|i| i.sku.as_str()).collect();
    skus.sort_unstable();
    skus.dedup();
    let mut levels = Vec::with_capacity(skus.len());
    for sku in skus {
        let level =
            sqlx::query_as::<_, Level>("SELECT sku, available, version FROM stock WHERE sku = ?1")
                .bind(sku)
                .fetch_optional(&mut *conn)
                .await?;
        levels.extend(level);
    }
    Ok(levels)
}

/// One SKU's stock.
pub async fn stock(db: &SqlitePool, sku: &str) -> Result<Option<Stock>, sqlx::Error> {
    sqlx::query_as::<_, Stock>("SELECT sku, available, reserved, version FROM stock WHERE sku = ?1")
        .bind(sku)
        .fetch_optional(db)
        .await
}

/// A reservation's status.
#[cfg(test)]
pub async fn reservation_status(
    db: &SqlitePool,
    order_id: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT status FROM reservations WHERE order_id = ?1")
        .bind(order_id)
        .fetch_optional(db)
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

    fn item(sku: &str, quantity: i64) -> Item {
        Item {
            sku: sku.to_owned(),
            quantity,
        }
    }

    async fn level(db: &SqlitePool, sku: &str) -> (i64, i64) {
        let s = stock(db, sku).await.unwrap().unwrap();
        (s.available, s.reserved)
    }

    async fn reserve_tx(db: &SqlitePool, order: &str, items: &[Item]) -> Reserve {
        let mut tx = db.begin().await.unwrap();
        let out = reserve(&mut tx, order, "c-1", items).await.unwrap();
        tx.commit().await.unwrap();
        out
    }

    #[tokio::test]
    async fn seeded_like_the_catalog() {
        let db = db().await;
        assert_eq!(level(&db, "sku-grinder").await, (8, 0));
        assert_eq!(level(&db, "sku-chai").await, (0, 0));
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM stock")
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(n, 12);
    }

    #[tokio::test]
    async fn reserves_every_item() {
        let db = db().await;
        let out = reserve_tx(&db, "o-1", &[item("sku-grinder", 3), item("sku-mug", 2)]).await;
        assert_eq!(out, Reserve::Reserved);
        assert_eq!(level(&db, "sku-grinder").await, (5, 3));
        assert_eq!(level(&db, "sku-mug").await, (198, 2));
        assert_eq!(
            reservation_status(&db, "o-1").await.unwrap().as_deref(),
            Some("reserved")
        );
    }

    #[tokio::test]
    async fn all_or_nothing_when_one_line_is_short() {
        let db = db().await;
        // The first line would fit; the second does not.
        let out = reserve_tx(&db, "o-1", &[item("sku-mug", 5), item("sku-grinder", 9)]).await;
        assert_eq!(
            out,
            Reserve::Rejected {
                sku: "sku-grinder".into(),
                reason: "out_of_stock"
            }
        );
        assert_eq!(
            level(&db, "sku-mug").await,
            (200, 0),
            "first line given back"
        );
        assert_eq!(level(&db, "sku-grinder").await, (8, 0));
        assert_eq!(
            reservation_status(&db, "o-1").await.unwrap().as_deref(),
            Some("rejected")
        );
        let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM reservation_items")
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(held, 0);
    }

    #[tokio::test]
    async fn unknown_skus_and_bad_quantities_are_rejected() {
        let db = db().await;
        let out = reserve_tx(&db, "o-1", &[item("sku-mug", 1), item("sku-nope", 1)]).await;
        assert_eq!(
            out,
            Reserve::Rejected {
                sku: "sku-nope".into(),
                reason: "unknown_sku"
            }
        );
        let out = reserve_tx(&db, "o-2", &[item("sku-mug", -5)]).await;
        assert!(matches!(
            out,
            Reserve::Rejected {
                reason: "invalid_quantity",
                ..
            }
        ));
        assert_eq!(level(&db, "sku-mug").await, (200, 0), "no stock minted");
        let out = reserve_tx(&db, "o-3", &[]).await;
        assert!(matches!(
            out,
            Reserve::Rejected {
                reason: "no_items",
                ..
            }
        ));
    }

    #[tokio::test]
    async fn the_last_units_go_to_one_order_only() {
        let db = db().await;
        assert_eq!(
            reserve_tx(&db, "o-1", &[item("sku-grinder", 8)]).await,
            Reserve::Reserved
        );
        assert!(matches!(
            reserve_tx(&db, "o-2", &[item("sku-grinder", 1)]).await,
            Reserve::Rejected { .. }
        ));
        assert_eq!(level(&db, "sku-grinder").await, (0, 8));
    }

    #[tokio::test]
    async fn a_second_placement_of_the_same_order_changes_nothing() {
        let db = db().await;
        assert_eq!(
            reserve_tx(&db, "o-1", &[item("sku-mug", 2)]).await,
            Reserve::Reserved
        );
        assert_eq!(
            reserve_tx(&db, "o-1", &[item("sku-mug", 2)]).await,
            Reserve::AlreadyDecided
        );
        assert_eq!(level(&db, "sku-mug").await, (198, 2));
    }

    #[tokio::test]
    async fn release_returns_stock_once() {
        let db = db().await;
        reserve_tx(&db, "o-1", &[item("sku-kettle", 4)]).await;
        let mut tx = db.begin().await.unwrap();
        let out = release(&mut tx, "o-1").await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(out, Settle::Done(vec![item("sku-kettle", 4)]));
        assert_eq!(level(&db, "sku-kettle").await, (15, 0));

        let mut tx = db.begin().await.unwrap();
        assert_eq!(release(&mut tx, "o-1").await.unwrap(), Settle::NotReserved);
        assert_eq!(commit(&mut tx, "o-1").await.unwrap(), Settle::NotReserved);
        tx.commit().await.unwrap();
        assert_eq!(level(&db, "sku-kettle").await, (15, 0));
        assert_eq!(
            reservation_status(&db, "o-1").await.unwrap().as_deref(),
            Some("released")
        );
    }

    #[tokio::test]
    async fn commit_takes_units_out_of_reserved_for_good() {
        let db = db().await;
        reserve_tx(&db, "o-1", &[item("sku-kettle", 4)]).await;
        let mut tx = db.begin().await.unwrap();
        assert!(matches!(
            commit(&mut tx, "o-1").await.unwrap(),
            Settle::Done(_)
        ));
        // A late payment.failed for a committed order compensates nothing.
        assert_eq!(release(&mut tx, "o-1").await.unwrap(), Settle::NotReserved);
        tx.commit().await.unwrap();
        assert_eq!(level(&db, "sku-kettle").await, (11, 0));
    }

    async fn version(db: &SqlitePool, sku: &str) -> i64 {
        stock(db, sku).await.unwrap().unwrap().version
    }

    #[tokio::test]
    async fn versions_count_the_changes_to_available() {
        let db = db().await;
        assert_eq!(version(&db, "sku-kettle").await, 0, "seeded at 0");
        reserve_tx(&db, "o-1", &[item("sku-kettle", 4), item("sku-mug", 1)]).await;
        reserve_tx(&db, "o-2", &[item("sku-kettle", 1)]).await;
        assert_eq!(version(&db, "sku-kettle").await, 2);
        assert_eq!(version(&db, "sku-mug").await, 1);
        // A rejected order changes nothing, its version included.
        reserve_tx(
            &db,
            "o-3",
            &[item("sku-kettle", 1), item("sku-grinder", 99)],
        )
        .await;
        assert_eq!(version(&db, "sku-kettle").await, 2);
        assert_eq!(version(&db, "sku-grinder").await, 0);

        let mut tx = db.begin().await.unwrap();
        release(&mut tx, "o-1").await.unwrap();
        // A commit leaves `available`, and so the version, alone.
        commit(&mut tx, "o-2").await.unwrap();
        let got = levels(
            &mut tx,
            &[
                item("sku-mug", 1),
                item("sku-kettle", 1),
                item("sku-mug", 2),
            ],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let level = |sku: &str, available, version| Level {
            sku: sku.to_owned(),
            available,
            version,
        };
        assert_eq!(
            got,
            [level("sku-kettle", 14, 3), level("sku-mug", 200, 2)],
            "once per SKU, by SKU"
        );
    }

    #[tokio::test]
    async fn rejected_or_unknown_orders_have_nothing_to_settle() {
        let db = db().await;
        reserve_tx(&db, "o-1", &[item("sku-chai", 1)]).await;
        let mut tx = db.begin().await.unwrap();
        assert_eq!(release(&mut tx, "o-1").await.unwrap(), Settle::NotReserved);
        assert_eq!(
            release(&mut tx, "o-404").await.unwrap(),
            Settle::NotReserved
        );
    }
}
