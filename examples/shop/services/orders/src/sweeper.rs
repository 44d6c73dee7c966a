//! The order saga's deadline: no order stays `placed` for ever.
//!
//! A participant that never answers (its event dead-lettered after
//! `max_receives`, the service down longer than the broker's retries, a
//! bug) used to leave its order `placed` for good, with its stock held.
//! Every replica of orders now runs a sweeper that, every so often,
//! cancels the orders still `placed` longer than `ORDERS_SAGA_TIMEOUT`
//! (default 30 min) with reason `timed_out`.
//!
//! A timed-out order is cancelled exactly as an event cancels one
//! ([`events::end`]): the transition guarded by `status = 'placed'` and the
//! `order.cancelled` it publishes, in one transaction through the outbox.
//! So:
//! - a late `payment.succeeded` or `stock.rejected` for it finds it no
//!   longer `placed` and changes nothing in orders;
//! - an event that ends the order first leaves the sweeper nothing to do;
//! - replicas sweeping at once may pick the same orders, but SQLite runs
//!   their updates one after the other and only the first still finds
//!   the order `placed`: one cancellation, one `order.cancelled`.
//!
//! The others compensate on `order.cancelled` (see their `events.rs`):
//! inventory gives back what it holds for the order (or never reserves
//! it), payments refunds a charge (or never makes it).
//!
//! The deadline should outlast the broker's retries of a push (the
//! manifest's 20 deliveries span about 6 to 12 minutes when each fails at
//! once, about 15 when each waits out its 10 s delivery timeout), and it
//! counts from the order's placement across the saga's three hops; or an
//! order whose
//! participant is only restarting is cancelled when it would have gone
//! through. That is never wrong, only disappointing: the compensations
//! make the cancellation hold whatever arrives later. Shorter deadlines
//! are allowed (with a warning at start) for tests and demonstrations.

use std::time::{Duration, SystemTime};

use flotilla_chassis::outbox::RelayHandle;
use sqlx::SqlitePool;

use crate::{events, store};

/// The variable that sets the deadline.
pub const TIMEOUT_VAR: &str = "ORDERS_SAGA_TIMEOUT";
/// The deadline when the variable is unset.
pub const DEFAULT_TIMEOUT: &str = "30m";
/// The longest the broker's retries of one push take in the shop's
/// manifest (20 deliveries, backoff doubling from 200 ms to 60 s, with
/// jitter, each delivery waiting up to its 10 s timeout): a deadline
/// shorter than this can cancel orders that were only waiting for a
/// participant to come back.
pub const RETRY_SPAN: Duration = Duration::from_secs(15 * 60);
/// The shortest deadline accepted.
pub const MIN_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest: the most a queue keeps a message, dead-letter queues
/// included. Past it no step of the saga can still arrive, so a longer
/// deadline would only leave stuck orders stuck longer.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(14 * 86_400);
/// Why a timed-out order was cancelled.
pub const REASON: &str = "timed_out";
/// Orders read per page: each is cancelled in its own short transaction,
/// so a sweep never holds much at once.
pub const BATCH: i64 = 100;
/// The longest wait between two sweeps; shorter deadlines are swept more
/// often (a quarter of the deadline, at least every second).
pub const MAX_SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The deadline from the variable's value (`None` or blank: the default),
/// a duration such as `30m` or `1h` between [`MIN_TIMEOUT`] and
/// [`MAX_TIMEOUT`].
pub fn timeout_from(value: Option<String>) -> Result<Duration, flotilla_chassis::Error> {
    let raw = value
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_TIMEOUT.to_owned());
    let invalid = |reason: String| flotilla_chassis::Error::InvalidEnv {
        var: TIMEOUT_VAR.to_owned(),
        value: raw.clone(),
        reason,
        fix: format!(
            "write a duration between 1s and 14d, longer than the broker's retries of a push (about 15m), e.g. {DEFAULT_TIMEOUT}"
        ),
    };
    let timeout = humantime::parse_duration(raw.trim()).map_err(|e| invalid(e.to_string()))?;
    if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&timeout) {
        return Err(invalid("must be between 1 s and 14 days".into()));
    }
    Ok(timeout)
}

/// How long after start the first sweep waits, at most (never longer than
/// the deadline). Orders down for longer than the deadline finds, on
/// coming back, orders past it whose answers are waiting in the broker's
/// queues; the broker's backoff is at most 60 s, so within this grace
/// every waiting answer has been tried again and confirms or cancels its
/// order before the sweeper judges it. Best effort: an answer still
/// failing then is overtaken, and its order cancelled and compensated.
pub const START_GRACE: Duration = Duration::from_secs(120);

/// How often a sweeper with deadline `timeout` sweeps.
pub fn sweep_every(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_secs(1), MAX_SWEEP_EVERY)
}

/// Cancels every order still `placed` that was placed more than `timeout`
/// ago, in pages of [`BATCH`] oldest first, each order in its own
/// transaction. Returns how many this call cancelled (another replica's
/// share is not counted). `relay` is woken after each page that enqueued
/// events.
///
/// An order that cannot be cancelled (a row that no longer decodes, an
/// event that cannot be built from it) is logged, counted
/// (`shop_orders_saga_timeout_failures_total`) and passed over: the pages
/// go on after it, by `(created_at, id)`, so one bad order never keeps
/// the sweeper from every order placed after it.
pub async fn sweep(
    db: &SqlitePool,
    timeout: Duration,
    relay: Option<&RelayHandle>,
) -> Result<u64, flotilla_chassis::Error> {
    let Some(cutoff) = SystemTime::now().checked_sub(timeout) else {
        // Before the epoch: nothing can be that old.
        return Ok(0);
    };
    let cutoff = flotilla_chassis::format_rfc3339(cutoff);
    let sql = |what| move |source| flotilla_chassis::Error::Sql { what, source };
    let mut cancelled = 0;
    let mut after = store::PlacedKey::default();
    loop {
        let page = store::placed_before(db, &cutoff, &after, BATCH)
            .await
            .map_err(sql("find the orders past the saga's deadline"))?;
        let mut this_page = 0;
        for key in &page {
            match cancel(db, &key.id).await {
                Ok(true) => this_page += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(order = %key.id, error = %flotilla_chassis::error_chain(&e), "saga deadline: could not cancel the order; passed over");
                    metrics::counter!("shop_orders_saga_timeout_failures_total").increment(1);
                }
            }
        }
        if this_page > 0 {
            cancelled += this_page;
            if let Some(relay) = relay {
                relay.notify();
            }
        }
        match page.last() {
            Some(last) if page.len() == BATCH as usize => after = last.clone(),
            // A short page was the last.
            _ => return Ok(cancelled),
        }
    }
}

/// Cancels order `id` (`timed_out`) if it is still `placed`: true if this
/// call did.
pub async fn cancel(db: &SqlitePool, id: &str) -> Result<bool, flotilla_chassis::Error> {
    let sql = |what| move |source| flotilla_chassis::Error::Sql { what, source };
    // The UPDATE is the transaction's first statement, so it takes
    // SQLite's write lock (waiting out the busy timeout) on a fresh
    // snapshot: it sees any cancellation committed before it.
    let mut tx = db
        .begin()
        .await
        .map_err(sql("begin the transaction that times an order out"))?;
    let Some(order) = events::end(&mut tx, id, store::CANCELLED, Some(REASON)).await? else {
        // Ended meanwhile (an event, another replica): nothing to undo.
        return Ok(false);
    };
    tx.commit()
        .await
        .map_err(sql("commit the transaction that times an order out"))?;
    tracing::warn!(order = %order.id, placed = %order.created_at, "order cancelled: saga timed out");
    metrics::counter!("shop_orders_saga_timeouts_total").increment(1);
    metrics::counter!("shop_orders_ended_total", "status" => store::CANCELLED).increment(1);
    Ok(true)
}

/// Sweeps after [`START_GRACE`] (or `timeout`, if shorter) and then every
/// [`sweep_every`]`(timeout)` until the returned task is aborted (at shutdown; a cancellation in flight then rolls
/// back, to be done by the next sweep of any replica). A failed sweep is
/// logged and tried again at the next tick.
pub fn spawn(
    db: SqlitePool,
    timeout: Duration,
    relay: Option<RelayHandle>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let first = tokio::time::Instant::now() + START_GRACE.min(timeout);
        let mut tick = tokio::time::interval_at(first, sweep_every(timeout));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match sweep(&db, timeout, relay.as_ref()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(cancelled = n, "saga deadline: timed-out orders cancelled"),
                Err(e) => {
                    tracing::error!(error = %flotilla_chassis::error_chain(&e), "saga deadline: sweep failed")
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_and_its_errors() {
        assert_eq!(timeout_from(None).unwrap(), Duration::from_secs(30 * 60));
        assert_eq!(
            timeout_from(Some("  ".into())).unwrap(),
            Duration::from_secs(30 * 60)
        );
        // The default outlasts the broker's retries of a push.
        assert!(timeout_from(None).unwrap() > RETRY_SPAN);
        assert_eq!(
            timeout_from(Some("2s".into())).unwrap(),
            Duration::from_secs(2)
        );
        assert_eq!(
            timeout_from(Some("14d".into())).unwrap(),
            Duration::from_secs(14 * 86_400)
        );
        for bad in ["0s", "500ms", "15d", "soon", "-1m", "15"] {
            let e = timeout_from(Some(bad.into())).unwrap_err().to_string();
            assert!(e.contains("ORDERS_SAGA_TIMEOUT"), "{bad}: {e}");
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
            assert!(e.contains("e.g. 30m"), "{bad}: {e}");
        }
    }

    #[test]
    fn short_deadlines_are_swept_more_often() {
        assert_eq!(
            sweep_every(Duration::from_secs(15 * 60)),
            Duration::from_secs(60)
        );
        assert_eq!(sweep_every(Duration::from_secs(20)), Duration::from_secs(5));
        assert_eq!(sweep_every(Duration::from_secs(1)), Duration::from_secs(1));
    }
}
