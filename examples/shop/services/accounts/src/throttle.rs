//! Sign-in throttling per e-mail address: the part of brute-force defence
//! the gateway cannot do.
//!
//! The gateway limits sign-ins per client address (`10/m per ip`), which
//! stops one machine guessing. It cannot stop a botnet trying one
//! account's password from thousands of addresses, nor see whether an
//! attempt failed. Here, each address gets [`FREE_FAILURES`] failed
//! attempts; from then on each failure makes the next attempt wait, 30 s
//! doubling to at most 15 min (Keycloak's "brute force detection" defaults
//! are of this shape). A success clears the count, and so do
//! [`RESET_AFTER`] without an attempt.
//!
//! The count is kept whether or not the address has an account, and a
//! refusal comes before the password is checked, so the throttle answers
//! alike for both and tells nobody which addresses are registered.
//!
//! Each attempt is counted as a failure *before* its password is checked,
//! inside one `BEGIN IMMEDIATE` transaction, and uncounted by its success.
//! Counted after, a burst of concurrent guesses would all find the count
//! low and all be checked.
//!
//! What an exponential wait cannot avoid: whoever knows an address can keep
//! its owner waiting, one wrong guess per wait. A lockout that ends by
//! itself, capped at 15 min, is the usual price; a permanent lock would
//! hand out a denial of service instead.

use std::time::Duration;

use sqlx::{Connection, SqlitePool};

/// Failed attempts allowed before any wait.
pub const FREE_FAILURES: i64 = 5;
/// The first wait, after the [`FREE_FAILURES`]th failure; it doubles with
/// each further failure.
pub const FIRST_WAIT_SECONDS: i64 = 30;
/// The longest wait.
pub const MAX_WAIT_SECONDS: i64 = 15 * 60;
/// A count with no attempt for this long starts again from zero (and its
/// row is purged).
pub const RESET_AFTER: Duration = Duration::from_secs(12 * 3600);

/// Whether an attempt may have its password checked.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    /// Counted as a failure until [`succeeded`] says otherwise.
    Allowed,
    /// Not checked and not counted; try again after this many seconds.
    Wait(i64),
}

/// How long attempts wait after `failures` failures in a row.
fn wait_after(failures: i64) -> i64 {
    if failures < FREE_FAILURES {
        return 0;
    }
    let doublings = (failures - FREE_FAILURES).min(16) as u32;
    FIRST_WAIT_SECONDS
        .saturating_mul(1 << doublings)
        .min(MAX_WAIT_SECONDS)
}

#[derive(sqlx::FromRow)]
struct Row {
    failures: i64,
    last_at: i64,
    blocked_until: i64,
}

/// `email`'s count, read in the transaction that will write it.
async fn counted(tx: &mut sqlx::SqliteConnection, email: &str) -> Result<Option<Row>, sqlx::Error> {
    sqlx::query_as::<_, Row>(
        "SELECT failures, last_at, blocked_until FROM login_attempts WHERE email = ?1",
    )
    .bind(email)
    .fetch_optional(tx)
    .await
}

/// Asks to check a password for `email` (normalised) at `now`, counting the
/// attempt as a failure if it may go ahead.
pub async fn attempt(db: &SqlitePool, email: &str, now: i64) -> Result<Attempt, sqlx::Error> {
    let mut conn = db.acquire().await?;
    let mut tx = (*conn).begin_with("BEGIN IMMEDIATE").await?;
    let row = counted(&mut tx, email).await?;
    let reset = RESET_AFTER.as_secs() as i64;
    let failures = match row {
        Some(r) if r.blocked_until > now => return Ok(Attempt::Wait(r.blocked_until - now)),
        Some(r) if now.saturating_sub(r.last_at) < reset => r.failures,
        _ => 0,
    };
    let failures = failures.saturating_add(1);
    let blocked_until = now.saturating_add(wait_after(failures));
    sqlx::query(
        "INSERT INTO login_attempts (email, failures, last_at, blocked_until)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (email) DO UPDATE SET
             failures = excluded.failures,
             last_at = excluded.last_at,
             blocked_until = excluded.blocked_until",
    )
    .bind(email)
    .bind(failures)
    .bind(now)
    .bind(blocked_until)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Attempt::Allowed)
}

/// The attempt [`attempt`] counted for `email` ended in no verdict (the
/// database or the password hashing failed, or was too busy): it is not
/// counted against the address. Else a user retrying through a storm of
/// 503s would be made to wait without a password ever checked.
pub async fn undecided(db: &SqlitePool, email: &str) -> Result<(), sqlx::Error> {
    let mut conn = db.acquire().await?;
    let mut tx = (*conn).begin_with("BEGIN IMMEDIATE").await?;
    if let Some(r) = counted(&mut tx, email).await? {
        let failures = r.failures.saturating_sub(1).max(0);
        sqlx::query("UPDATE login_attempts SET failures = ?2, blocked_until = ?3 WHERE email = ?1")
            .bind(email)
            .bind(failures)
            .bind(r.last_at.saturating_add(wait_after(failures)))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The password for `email` was right: its count starts again.
pub async fn succeeded(db: &SqlitePool, email: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM login_attempts WHERE email = ?1")
        .bind(email)
        .execute(db)
        .await?;
    Ok(())
}

/// Deletes counts that have reset by age; returns how many.
pub async fn purge(db: &SqlitePool, now: i64) -> Result<u64, sqlx::Error> {
    let reset = RESET_AFTER.as_secs() as i64;
    let done =
        sqlx::query("DELETE FROM login_attempts WHERE last_at <= ?1 AND blocked_until <= ?2")
            .bind(now.saturating_sub(reset))
            .bind(now)
            .execute(db)
            .await?;
    Ok(done.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn db() -> SqlitePool {
        flotilla_chassis::open_sqlite("sqlite::memory:", &crate::MIGRATOR)
            .await
            .unwrap()
    }

    #[test]
    fn waits_start_after_the_free_failures_double_and_are_capped() {
        let waits: Vec<i64> = (1..=12).map(wait_after).collect();
        assert_eq!(waits, [0, 0, 0, 0, 30, 60, 120, 240, 480, 900, 900, 900]);
        assert_eq!(wait_after(i64::MAX), MAX_WAIT_SECONDS);
    }

    #[tokio::test]
    async fn failures_make_the_next_attempt_wait_and_a_success_clears_them() {
        let db = db().await;
        let a = "a@example.com";
        for _ in 0..FREE_FAILURES {
            assert_eq!(attempt(&db, a, 1000).await.unwrap(), Attempt::Allowed);
        }
        // The fifth failure set a 30 s wait; a wait is not counted.
        assert_eq!(attempt(&db, a, 1000).await.unwrap(), Attempt::Wait(30));
        assert_eq!(attempt(&db, a, 1029).await.unwrap(), Attempt::Wait(1));
        // Another address is not affected.
        assert_eq!(
            attempt(&db, "b@example.com", 1000).await.unwrap(),
            Attempt::Allowed
        );
        // After the wait one more try, then twice the wait.
        assert_eq!(attempt(&db, a, 1030).await.unwrap(), Attempt::Allowed);
        assert_eq!(attempt(&db, a, 1031).await.unwrap(), Attempt::Wait(59));
        // A try that ended in no verdict (a 503) is given back: the next
        // is not made to wait twice as long.
        undecided(&db, a).await.unwrap();
        assert_eq!(attempt(&db, a, 1061).await.unwrap(), Attempt::Allowed);
        // That try was right: the count is gone.
        succeeded(&db, a).await.unwrap();
        assert_eq!(attempt(&db, a, 1031).await.unwrap(), Attempt::Allowed);
    }

    #[tokio::test]
    async fn concurrent_guesses_are_counted_before_they_are_checked() {
        // A file, so that the pool has several connections racing.
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("a.db").display());
        let db = flotilla_chassis::open_sqlite(&url, &crate::MIGRATOR)
            .await
            .unwrap();
        let mut tries = tokio::task::JoinSet::new();
        for _ in 0..40 {
            let db = db.clone();
            tries.spawn(async move { attempt(&db, "a@example.com", 5000).await.unwrap() });
        }
        let mut allowed = 0;
        while let Some(result) = tries.join_next().await {
            if result.unwrap() == Attempt::Allowed {
                allowed += 1;
            }
        }
        assert_eq!(allowed, FREE_FAILURES);
    }

    #[tokio::test]
    async fn a_quiet_address_starts_again_and_is_purged() {
        let db = db().await;
        let a = "a@example.com";
        for _ in 0..FREE_FAILURES - 1 {
            attempt(&db, a, 0).await.unwrap();
        }
        let reset = RESET_AFTER.as_secs() as i64;
        // Four failures, then quiet: the next four are free again.
        for _ in 0..FREE_FAILURES - 1 {
            assert_eq!(attempt(&db, a, reset).await.unwrap(), Attempt::Allowed);
        }
        assert_eq!(purge(&db, reset).await.unwrap(), 0);
        assert_eq!(purge(&db, 2 * reset).await.unwrap(), 1);
    }
}
