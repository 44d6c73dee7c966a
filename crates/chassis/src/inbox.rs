//! The idempotent consumer: handle each event once, although the broker
//! and the outbox deliver at least once.
//!
//! [`claim`] records `(consumer, source, id)` in the table `flotilla_inbox`
//! inside the handler's own transaction. If the event was handled before
//! the insert finds the row and `claim` answers false; otherwise the
//! handler's writes and the record commit together, so a crash before the
//! commit leaves neither and the redelivery is handled normally.
//!
//! Make `claim` the first statement of the transaction: SQLite then takes
//! the write lock before anything is read, so two replicas handling the
//! same event at once queue on the lock and the second sees the first's
//! row.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::{SqliteConnection, SqlitePool};

use crate::Error;
use crate::events::Event;

/// How long handled events are remembered by default: longer than the
/// broker keeps an unacknowledged message (4 days), so every redelivery
/// finds its row.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS flotilla_inbox (
    consumer TEXT NOT NULL,
    event_id TEXT NOT NULL,
    source TEXT NOT NULL,
    processed_ms INTEGER NOT NULL,
    PRIMARY KEY (consumer, source, event_id)
);
CREATE INDEX IF NOT EXISTS flotilla_inbox_processed ON flotilla_inbox (processed_ms);
";

/// The inbox table.
#[derive(Debug)]
pub struct Inbox;

impl Inbox {
    /// Creates the inbox table if it does not exist (safe to run on every
    /// start, from every replica).
    pub async fn install(pool: &SqlitePool) -> Result<(), Error> {
        sqlx::raw_sql(SCHEMA)
            .execute(pool)
            .await
            .map_err(|source| Error::Sql {
                what: "create the inbox table",
                source,
            })?;
        Ok(())
    }

    /// Forgets events handled more than `older_than` ago
    /// ([`DEFAULT_RETENTION`] is the usual choice); returns how many. Run it
    /// now and then, e.g. hourly: an event redelivered after it was
    /// forgotten would be handled again.
    pub async fn prune(pool: &SqlitePool, older_than: Duration) -> Result<u64, Error> {
        let cutoff =
            now_ms().saturating_sub(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX));
        let done = sqlx::query("DELETE FROM flotilla_inbox WHERE processed_ms < ?1")
            .bind(cutoff)
            .execute(pool)
            .await
            .map_err(|source| Error::Sql {
                what: "prune the inbox",
                source,
            })?;
        Ok(done.rows_affected())
    }
}

/// How often [`Inbox::spawn_pruner`] prunes.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);

impl Inbox {
    /// Prunes events handled more than [`DEFAULT_RETENTION`] ago now and
    /// then every [`PRUNE_EVERY`], until the returned task is aborted (or the
    /// runtime stops). Seven days outlast the broker's longest redelivery
    /// window (a queue keeps a message four days by default), so a
    /// forgotten event cannot come back. A failed prune is logged and tried
    /// again at the next tick.
    pub fn spawn_pruner(pool: SqlitePool) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PRUNE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match Inbox::prune(&pool, DEFAULT_RETENTION).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(pruned = n, "inbox: forgot old handled events"),
                    Err(e) => {
                        tracing::warn!(error = %crate::error_chain(&e), "inbox: prune failed")
                    }
                }
            }
        })
    }
}

/// Records that `consumer` handles `event`, on `conn` (the handler's open
/// transaction, `&mut *tx`). True the first time: go on and commit. False
/// if the event was handled before: skip it, acknowledge it and roll back
/// (dropping the transaction does).
///
/// `consumer` names the handler (a service may consume the same event in
/// several places); events are identified by `source` + `id`.
pub async fn claim(
    conn: &mut SqliteConnection,
    consumer: &str,
    event: &Event,
) -> Result<bool, Error> {
    let done = sqlx::query(
        "INSERT INTO flotilla_inbox (consumer, event_id, source, processed_ms)
         VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
    )
    .bind(consumer)
    .bind(&event.id)
    .bind(&event.source)
    .bind(now_ms())
    .execute(conn)
    .await
    .map_err(|source| Error::Sql {
        what: "record the event in the inbox (is Inbox::install run at start?)",
        source,
    })?;
    Ok(done.rows_affected() == 1)
}

/// Runs a push handler's work once per event: begins a transaction on
/// `pool`, [`claim`]s `event` for `consumer` as its first statement, runs
/// `apply` on the transaction (where it makes its changes and
/// [`outbox::enqueue`](crate::outbox::enqueue)s what it publishes) and
/// commits. Answers `Ok(Some(what apply returned))`, or `Ok(None)` without
/// running `apply` when the event was handled before: acknowledge it.
///
/// An error from `apply`, or a failed commit, rolls everything back, the
/// claim included, so the redelivered event is handled again. After
/// `Some`, wake the outbox relay ([`RelayHandle::notify`](crate::RelayHandle::notify))
/// if `apply` enqueued events.
///
/// ```no_run
/// use flotilla_chassis::{ApiError, Event, inbox};
/// use sqlx::SqlitePool;
///
/// async fn reserve(pool: &SqlitePool, event: &Event) -> Result<&'static str, ApiError> {
///     let outcome = inbox::handle_once(pool, "reserve-stock", event, async |tx| {
///         sqlx::query("INSERT INTO reservations (event) VALUES (?1)")
///             .bind(&event.id)
///             .execute(&mut *tx)
///             .await?;
///         Ok::<_, ApiError>("reserved")
///     })
///     .await?;
///     Ok(outcome.unwrap_or("duplicate"))
/// }
/// ```
pub async fn handle_once<T, E>(
    pool: &SqlitePool,
    consumer: &str,
    event: &Event,
    apply: impl AsyncFnOnce(&mut SqliteConnection) -> Result<T, E>,
) -> Result<Option<T>, E>
where
    E: From<Error>,
{
    let sql = |what| move |source| Error::Sql { what, source };
    let mut tx = pool
        .begin()
        .await
        .map_err(sql("begin the transaction that handles an event"))?;
    if !claim(&mut tx, consumer, event).await? {
        return Ok(None);
    }
    let done = apply(&mut tx).await?;
    tx.commit()
        .await
        .map_err(sql("commit the transaction that handled an event"))?;
    Ok(Some(done))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
