//! The payments database: one charge per order.
//!
//! [`charge`] runs inside the event handler's transaction, between the
//! inbox check and the outbox enqueue, so the stored charge and the
//! `payment.*` event announcing it commit together.

use serde::Serialize;
use sqlx::SqliteConnection;

use crate::card::{self, Decline};

/// What to charge, from a `stock.reserved` event.
#[derive(Debug, Clone)]
pub struct ChargeRequest<'a> {
    pub order_id: &'a str,
    pub customer: &'a str,
    pub amount_cents: i64,
    pub currency: &'a str,
    /// The simulated payment token: the test card number (see
    /// [`crate::card`]). Used to decide, never stored or logged.
    pub payment_token: &'a str,
}

/// A stored charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Charge {
    pub id: String,
    pub order_id: String,
    pub customer: String,
    pub amount_cents: i64,
    pub currency: String,
    pub card_last4: Option<String>,
    pub status: String,
    pub reason: Option<String>,
    pub created_at: String,
}

/// What charging came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new charge was made (succeeded or failed): publish it.
    New(Charge),
    /// The order was charged before; nothing changed and nothing should be
    /// published again.
    AlreadyCharged(Charge),
}

/// Charges the order once: decides with the simulated processor and stores
/// the result. A second call for the same order returns the first charge.
pub async fn charge(
    conn: &mut SqliteConnection,
    request: &ChargeRequest<'_>,
) -> Result<Outcome, sqlx::Error> {
    if let Some(existing) = by_order(conn, request.order_id).await? {
        return Ok(Outcome::AlreadyCharged(existing));
    }
    let currency = request.currency;
    let decision = if is_cancelled(conn, request.order_id).await? {
        // orders cancelled it (its deadline passed) before inventory's
        // reservation reached us: declined, and `payment.failed` tells
        // inventory to release what it may still hold.
        Err(Decline::OrderCancelled)
    } else if request.amount_cents < 0 {
        Err(Decline::InvalidAmount)
    } else if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        Err(Decline::InvalidCurrency)
    } else {
        card::authorize(request.payment_token)
    };
    let charge = Charge {
        id: format!("ch_{}", uuid::Uuid::new_v4().simple()),
        order_id: request.order_id.to_owned(),
        customer: request.customer.to_owned(),
        // Stored as 0 when negative (the table refuses less), declined
        // with `invalid_amount`, which says what it was.
        amount_cents: request.amount_cents.max(0),
        currency: request.currency.to_owned(),
        card_last4: card::last4(request.payment_token),
        status: match decision {
            Ok(()) => "succeeded",
            Err(_) => "failed",
        }
        .to_owned(),
        reason: decision.err().map(|d| d.code().to_owned()),
        created_at: flotilla_chassis::now_rfc3339(),
    };
    // ON CONFLICT DO NOTHING: should two deliveries race past the check
    // above, the unique order_id lets only one insert land.
    let inserted = sqlx::query(
        "INSERT INTO charges (id, order_id, customer, amount_cents, currency, card_last4,
                              status, reason, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(&charge.id)
    .bind(&charge.order_id)
    .bind(&charge.customer)
    .bind(charge.amount_cents)
    .bind(&charge.currency)
    .bind(&charge.card_last4)
    .bind(&charge.status)
    .bind(&charge.reason)
    .bind(&charge.created_at)
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 0 {
        let existing = by_order(conn, request.order_id)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?;
        return Ok(Outcome::AlreadyCharged(existing));
    }
    Ok(Outcome::New(charge))
}

/// The order's charge, if it has one.
pub async fn by_order(
    conn: &mut SqliteConnection,
    order_id: &str,
) -> Result<Option<Charge>, sqlx::Error> {
    sqlx::query_as::<_, Charge>(
        "SELECT id, order_id, customer, amount_cents, currency, card_last4, status, reason,
                created_at
         FROM charges WHERE order_id = ?1",
    )
    .bind(order_id)
    .fetch_optional(&mut *conn)
    .await
}

/// Whether `order.cancelled` was seen for `order_id`.
async fn is_cancelled(conn: &mut SqliteConnection, order_id: &str) -> Result<bool, sqlx::Error> {
    let seen: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM cancelled_orders WHERE order_id = ?1")
            .bind(order_id)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(seen.is_some())
}

/// A charge given back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Refund {
    pub id: String,
    pub charge_id: String,
    pub order_id: String,
    pub customer: String,
    pub amount_cents: i64,
    pub currency: String,
    pub reason: Option<String>,
    pub created_at: String,
}

/// What an order's cancellation came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancellation {
    /// It had been charged: the charge is refunded now (publish it).
    Refunded(Refund),
    /// Nothing to give back: never charged, its charge was declined, or
    /// it was refunded before. Recorded, so it will never be charged.
    NothingToRefund,
}

/// The order was cancelled (`order.cancelled`, with its `reason`): records
/// it, so that a `stock.reserved` arriving later is declined
/// ([`charge`]), and refunds the order's charge if it succeeded.
///
/// Runs in the handler's transaction, which holds SQLite's write lock from
/// its first statement (the inbox claim), as does [`charge`]'s: one of the
/// two runs wholly before the other, so a charge is either made before
/// and refunded here, or sees the cancellation and is never made. At most
/// one refund per charge (UNIQUE charge_id).
pub async fn cancel(
    conn: &mut SqliteConnection,
    order_id: &str,
    customer: &str,
    reason: Option<&str>,
) -> Result<Cancellation, sqlx::Error> {
    let now = flotilla_chassis::now_rfc3339();
    sqlx::query(
        "INSERT INTO cancelled_orders (order_id, customer, reason, cancelled_at)
         VALUES (?1, ?2, ?3, ?4) ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order_id)
    .bind(customer)
    .bind(reason)
    .bind(&now)
    .execute(&mut *conn)
    .await?;
    let Some(charge) = by_order(conn, order_id)
        .await?
        .filter(|c| c.status == "succeeded")
    else {
        return Ok(Cancellation::NothingToRefund);
    };
    let refund = Refund {
        id: format!("re_{}", uuid::Uuid::new_v4().simple()),
        charge_id: charge.id,
        order_id: charge.order_id,
        customer: charge.customer,
        amount_cents: charge.amount_cents,
        currency: charge.currency,
        reason: reason.map(str::to_owned),
        created_at: now,
    };
    let inserted = sqlx::query(
        "INSERT INTO refunds (id, charge_id, order_id, customer, amount_cents, currency,
                              reason, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (charge_id) DO NOTHING",
    )
    .bind(&refund.id)
    .bind(&refund.charge_id)
    .bind(&refund.order_id)
    .bind(&refund.customer)
    .bind(refund.amount_cents)
    .bind(&refund.currency)
    .bind(&refund.reason)
    .bind(&refund.created_at)
    .execute(&mut *conn)
    .await?;
    Ok(if inserted.rows_affected() == 1 {
        Cancellation::Refunded(refund)
    } else {
        Cancellation::NothingToRefund
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::SqlitePool;

    async fn db() -> SqlitePool {
        flotilla_chassis::open_sqlite("sqlite::memory:", &crate::MIGRATOR)
            .await
            .unwrap()
    }

    fn request<'a>(order_id: &'a str, card: &'a str) -> ChargeRequest<'a> {
        ChargeRequest {
            order_id,
            customer: "c-1",
            amount_cents: 1234,
            currency: "EUR",
            payment_token: card,
        }
    }

    async fn charge_once(db: &SqlitePool, req: &ChargeRequest<'_>) -> Outcome {
        let mut conn = db.acquire().await.unwrap();
        charge(&mut conn, req).await.unwrap()
    }

    #[tokio::test]
    async fn a_good_card_succeeds_and_keeps_only_the_last_four() {
        let db = db().await;
        let Outcome::New(c) = charge_once(&db, &request("o-1", "4242 4242 4242 4242")).await else {
            panic!("expected a new charge")
        };
        assert_eq!(c.status, "succeeded");
        assert_eq!(c.reason, None);
        assert_eq!(c.card_last4.as_deref(), Some("4242"));
        assert_eq!(c.amount_cents, 1234);
        assert!(c.id.starts_with("ch_"));
        let stored: Vec<Charge> = sqlx::query_as("SELECT * FROM charges")
            .fetch_all(&db)
            .await
            .unwrap();
        assert!(!format!("{stored:?}").contains("4242424242424242"));
    }

    #[tokio::test]
    async fn declines_are_stored_with_their_reason() {
        let db = db().await;
        for (order, card, reason) in [
            ("o-1", "4000 0000 0000 0002", "card_declined"),
            ("o-2", "4000 0000 0000 9995", "insufficient_funds"),
            ("o-3", "4242 4242 4242 4241", "invalid_card"),
        ] {
            let Outcome::New(c) = charge_once(&db, &request(order, card)).await else {
                panic!("expected a new charge")
            };
            assert_eq!(c.status, "failed");
            assert_eq!(c.reason.as_deref(), Some(reason));
        }
    }

    #[tokio::test]
    async fn a_negative_amount_or_a_currency_that_is_no_code_is_declined_as_such() {
        let db = db().await;
        let negative = ChargeRequest {
            amount_cents: -5,
            ..request("o-1", "4242 4242 4242 4242")
        };
        let Outcome::New(c) = charge_once(&db, &negative).await else {
            panic!("expected a new charge")
        };
        assert_eq!(
            (c.status.as_str(), c.reason.as_deref()),
            ("failed", Some("invalid_amount"))
        );
        for (order, currency) in [("o-2", "eur"), ("o-3", "EURO"), ("o-4", "")] {
            let odd = ChargeRequest {
                currency,
                ..request(order, "4242 4242 4242 4242")
            };
            let Outcome::New(c) = charge_once(&db, &odd).await else {
                panic!("expected a new charge")
            };
            assert_eq!(
                c.reason.as_deref(),
                Some("invalid_currency"),
                "{currency:?}"
            );
        }
    }

    #[tokio::test]
    async fn an_order_is_charged_once() {
        let db = db().await;
        let Outcome::New(first) = charge_once(&db, &request("o-1", "4242424242424242")).await
        else {
            panic!("expected a new charge")
        };
        // Even a different card for the same order does not charge again.
        let again = charge_once(&db, &request("o-1", "4000000000000002")).await;
        assert_eq!(again, Outcome::AlreadyCharged(first));
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM charges")
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(n, 1);
    }
}
