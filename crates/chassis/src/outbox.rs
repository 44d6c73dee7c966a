//! The transactional outbox: publish an event if and only if the data
//! change that caused it commits.
//!
//! Publishing to the broker inside a request cannot be atomic with the
//! database write: either can fail after the other succeeded. So
//! [`enqueue`] writes the event into the table `flotilla_outbox` in the
//! caller's own transaction, and a relay task ([`Outbox::spawn_relay`])
//! publishes committed rows afterwards, in `seq` order, retrying until the
//! broker has them. Delivery is therefore at least once: consumers
//! deduplicate by event `source` + `id` ([`crate::inbox::claim`]).
//!
//! Several replicas sharing one SQLite file: one relay at a time holds a
//! short lease (row `flotilla_outbox_relay`, 15 s, renewed before every
//! batch) and publishes everyone's rows, so they go out once and in order;
//! the others stand by, poll every second and take over when the lease
//! lapses. Duplicates remain possible when a relay stalls past its lease
//! mid-publish or fails to mark rows sent after publishing; the consumer
//! side deduplicates, as for any redelivery.
//!
//! Per topic the relay keeps order: a row the broker refuses (4xx, for
//! example a topic the service did not declare in `publishes`) gets
//! `last_error`, is logged once and retried with backoff, and holds back
//! the rows after it in its topic, never other topics'. An unreachable or
//! failing broker (5xx, 429, timeout) is retried with backoff from 100 ms
//! doubling to 5 s. Nothing is dropped. Sent rows are kept for a day (for
//! inspection), then deleted; rows written with [`enqueue_sensitive`] (an
//! event carrying a card number, say) are deleted as they are marked sent.
//! The gauge `flotilla_outbox_pending` counts unsent rows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::{SqliteConnection, SqlitePool};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::broker::{self, Broker};
use crate::error::error_chain;
use crate::events::Event;
use crate::{Error, metrics};

/// How often the relay looks for rows without being notified (rows other
/// replicas wrote, retries after a crash).
const POLL: Duration = Duration::from_secs(1);
/// First retry delay after a failed publish; doubles per failure.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Most events per publish (the broker takes up to 1000).
const BATCH_EVENTS: i64 = 100;
/// Most bytes of events per publish: well under the broker's 16 MiB body
/// limit even with the largest events.
const BATCH_BYTES: usize = 4 << 20;
/// The broker's default limit for one event; a larger one could never be
/// published and would hold back its topic for good.
const MAX_EVENT_BYTES: usize = 1 << 20;
/// Batches published per topic per pass before the next topic's turn.
const BATCHES_PER_TURN: usize = 10;
/// How long the relay lease lasts unless renewed; longer than one publish
/// (10 s timeout) so a live relay does not lose it mid-batch.
const LEASE: Duration = Duration::from_secs(15);
/// How long sent rows are kept (for inspection) before deletion.
const KEEP_SENT: Duration = Duration::from_secs(24 * 3600);
/// How often sent rows are deleted.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(600);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS flotilla_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    event TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    sent_ms INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    keep_sent INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS flotilla_outbox_unsent ON flotilla_outbox (topic, seq) WHERE sent_ms IS NULL;
CREATE INDEX IF NOT EXISTS flotilla_outbox_sent ON flotilla_outbox (sent_ms) WHERE sent_ms IS NOT NULL;
CREATE TABLE IF NOT EXISTS flotilla_outbox_relay (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT NOT NULL,
    until_ms INTEGER NOT NULL
);
";

/// The outbox's tables and relay.
#[derive(Debug)]
pub struct Outbox;

impl Outbox {
    /// Creates the outbox tables if they do not exist (safe to run on every
    /// start, from every replica).
    pub async fn install(pool: &SqlitePool) -> Result<(), Error> {
        sqlx::raw_sql(SCHEMA)
            .execute(pool)
            .await
            .map_err(|source| Error::Sql {
                what: "create the outbox tables",
                source,
            })?;
        // A table made before `keep_sent` existed gains it. Replicas may
        // race to add it: the loser's "duplicate column" is success.
        let has_keep_sent = || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pragma_table_info('flotilla_outbox') WHERE name = 'keep_sent'",
            )
            .fetch_one(pool)
            .await
            .map_err(|source| Error::Sql {
                what: "read the outbox table's columns",
                source,
            })
        };
        if has_keep_sent().await? == 0 {
            let added = sqlx::query(
                "ALTER TABLE flotilla_outbox ADD COLUMN keep_sent INTEGER NOT NULL DEFAULT 1",
            )
            .execute(pool)
            .await;
            if let Err(source) = added
                && has_keep_sent().await? == 0
            {
                return Err(Error::Sql {
                    what: "add the outbox's keep_sent column",
                    source,
                });
            }
        }
        Ok(())
    }

    /// Starts the relay task that publishes committed rows through
    /// `broker`. Call [`RelayHandle::notify`] after committing a
    /// transaction that enqueued events, so they go out at once rather than
    /// at the next poll.
    pub fn spawn_relay(pool: SqlitePool, broker: Broker) -> RelayHandle {
        let shared = Arc::new(Shared {
            notify: Notify::new(),
            stop: watch::channel(false).0,
            task: Mutex::new(None),
        });
        let relay = Relay {
            pool,
            broker,
            holder: uuid::Uuid::new_v4().to_string(),
            topics: HashMap::new(),
            last_housekeeping: None,
        };
        let task = tokio::spawn(relay.run(shared.clone()));
        if let Ok(mut slot) = shared.task.lock() {
            *slot = Some(task);
        }
        RelayHandle { shared }
    }
}

/// Writes `event` for `topic` into the outbox on `conn`, which should be
/// the caller's open transaction (`&mut *tx`): the event is published if
/// and only if that transaction commits.
///
/// The event is checked now (valid CloudEvent, topic name, at most 1 MiB)
/// so a mistake fails the request instead of the relay.
pub async fn enqueue(conn: &mut SqliteConnection, topic: &str, event: &Event) -> Result<(), Error> {
    insert(conn, topic, event, true).await
}

/// As [`enqueue`], for an event that must not stay at rest once the broker
/// has it (a card number on its way to the service that charges it): its
/// row is deleted as it is marked sent, not kept a day for inspection.
/// Open the database with [`crate::open_sqlite`], which sets SQLite's
/// `secure_delete`, so the deleted row's bytes are overwritten too.
pub async fn enqueue_sensitive(
    conn: &mut SqliteConnection,
    topic: &str,
    event: &Event,
) -> Result<(), Error> {
    insert(conn, topic, event, false).await
}

async fn insert(
    conn: &mut SqliteConnection,
    topic: &str,
    event: &Event,
    keep_sent: bool,
) -> Result<(), Error> {
    broker::check_name("topic", topic)?;
    event.validate()?;
    let json = event.to_json()?;
    if json.len() > MAX_EVENT_BYTES {
        return Err(Error::InvalidEvent {
            reason: format!(
                "event {} is {} bytes, over the broker's limit of {MAX_EVENT_BYTES} bytes",
                event.id,
                json.len()
            ),
        });
    }
    sqlx::query(
        "INSERT INTO flotilla_outbox (topic, event, created_ms, keep_sent) VALUES (?1, ?2, ?3, ?4)",
    )
    .bind(topic)
    .bind(json)
    .bind(now_ms())
    .bind(keep_sent)
    .execute(conn)
    .await
    .map_err(|source| Error::Sql {
        what: "write the event to the outbox (is Outbox::install run at start?)",
        source,
    })?;
    Ok(())
}

/// Controls a running relay, which runs until [`RelayHandle::stop`] or the
/// end of the tokio runtime (dropping handles does not stop it). Cheap to
/// clone; keep one in the router state.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    notify: Notify,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl RelayHandle {
    /// Wakes the relay now: call it after committing a transaction that
    /// enqueued events.
    pub fn notify(&self) {
        self.shared.notify.notify_one();
    }

    /// Stops the relay (abandoning a publish in flight, which is retried by
    /// whoever relays next) and gives up its lease so another replica takes
    /// over at its next poll.
    pub async fn stop(&self) {
        let _ = self.shared.stop.send(true);
        let task = self.shared.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// Retry state of one topic.
#[derive(Debug, Clone, Copy)]
struct TopicState {
    /// The delay after the next failure.
    backoff: Duration,
    /// No attempt before this.
    not_before: Instant,
    failing: bool,
}

impl Default for TopicState {
    fn default() -> Self {
        TopicState {
            backoff: BACKOFF_MIN,
            not_before: Instant::now(),
            failing: false,
        }
    }
}

struct Relay {
    pool: SqlitePool,
    broker: Broker,
    /// This relay's lease holder id.
    holder: String,
    topics: HashMap<String, TopicState>,
    last_housekeeping: Option<Instant>,
}

/// A row read for publishing.
struct Row {
    seq: i64,
    event: String,
    last_error: Option<String>,
}

/// What a pass found.
enum Next {
    /// More rows are ready now.
    Now,
    /// Nothing ready before this instant (or a notification).
    At(Instant),
}

impl Relay {
    async fn run(mut self, shared: Arc<Shared>) {
        let mut stop = shared.stop.subscribe();
        loop {
            let next = tokio::select! {
                next = self.pass() => next,
                _ = stop.wait_for(|s| *s) => break,
            };
            let wake = match next {
                Next::Now => continue,
                Next::At(at) => at,
            };
            tokio::select! {
                () = shared.notify.notified() => {}
                () = tokio::time::sleep_until(wake) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        let released = sqlx::query("DELETE FROM flotilla_outbox_relay WHERE holder = ?1")
            .bind(&self.holder)
            .execute(&self.pool)
            .await;
        if let Err(e) = released {
            tracing::warn!(error = %e, "outbox relay could not give up its lease; another replica takes over when it lapses");
        }
    }

    /// Publishes what is due; says when to look again.
    async fn pass(&mut self) -> Next {
        let poll = Instant::now() + POLL;
        match self.pass_inner().await {
            Ok(next) => next,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "outbox relay could not read its table; retrying");
                Next::At(poll)
            }
        }
    }

    async fn pass_inner(&mut self) -> Result<Next, Error> {
        let poll = Instant::now() + POLL;
        if !self.renew_lease().await? {
            self.update_gauge().await;
            return Ok(Next::At(poll));
        }
        self.housekeeping().await;
        let topics: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT topic FROM flotilla_outbox WHERE sent_ms IS NULL ORDER BY topic",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|source| Error::Sql {
            what: "read the outbox",
            source,
        })?;
        self.topics.retain(|t, _| topics.contains(t));
        let mut next = Next::At(poll);
        for topic in topics {
            let state = self.topics.entry(topic.clone()).or_default();
            if state.not_before > Instant::now() {
                next = earliest(next, state.not_before);
                continue;
            }
            if self.relay_topic(&topic).await? {
                next = Next::Now;
            } else if let Some(state) = self.topics.get(&topic)
                && state.failing
            {
                next = earliest(next, state.not_before);
            }
        }
        self.update_gauge().await;
        Ok(next)
    }

    /// Publishes up to [`BATCHES_PER_TURN`] batches of `topic`. True when
    /// rows remain that could go now.
    async fn relay_topic(&mut self, topic: &str) -> Result<bool, Error> {
        for _ in 0..BATCHES_PER_TURN {
            let rows = self.next_batch(topic).await?;
            if rows.is_empty() {
                return Ok(false);
            }
            if !self.renew_lease().await? {
                return Ok(false);
            }
            let events: Vec<String> = rows.iter().map(|r| r.event.clone()).collect();
            match self.broker.publish_json(topic, &events).await {
                Ok(()) => {
                    self.mark_sent(&rows).await;
                    self.recovered(topic);
                }
                Err(e) if is_refusal(&e) && rows.len() > 1 => {
                    // Find the row the broker refuses: one at a time, in order.
                    for row in &rows {
                        match self
                            .broker
                            .publish_json(topic, std::slice::from_ref(&row.event))
                            .await
                        {
                            Ok(()) => {
                                self.mark_sent(std::slice::from_ref(row)).await;
                                self.recovered(topic);
                            }
                            Err(e) => {
                                self.failed(topic, std::slice::from_ref(row), &e).await;
                                return Ok(false);
                            }
                        }
                    }
                }
                Err(e) => {
                    self.failed(topic, &rows, &e).await;
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// The oldest unsent rows of `topic`, at most [`BATCH_EVENTS`] and
    /// [`BATCH_BYTES`] (but at least one).
    async fn next_batch(&self, topic: &str) -> Result<Vec<Row>, Error> {
        let rows: Vec<(i64, String, Option<String>)> = sqlx::query_as(
            "SELECT seq, event, last_error FROM flotilla_outbox
             WHERE sent_ms IS NULL AND topic = ?1 ORDER BY seq LIMIT ?2",
        )
        .bind(topic)
        .bind(BATCH_EVENTS)
        .fetch_all(&self.pool)
        .await
        .map_err(|source| Error::Sql {
            what: "read the outbox",
            source,
        })?;
        let mut bytes = 0;
        let mut batch = Vec::with_capacity(rows.len());
        for (seq, event, last_error) in rows {
            bytes += event.len();
            if !batch.is_empty() && bytes > BATCH_BYTES {
                break;
            }
            batch.push(Row {
                seq,
                event,
                last_error,
            });
        }
        Ok(batch)
    }

    /// Takes or renews the relay lease; false while another relay holds it.
    async fn renew_lease(&self) -> Result<bool, Error> {
        let now = now_ms();
        let done = sqlx::query(
            "INSERT INTO flotilla_outbox_relay (id, holder, until_ms) VALUES (1, ?1, ?2)
             ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms
             WHERE flotilla_outbox_relay.holder = excluded.holder
                OR flotilla_outbox_relay.until_ms < ?3",
        )
        .bind(&self.holder)
        .bind(now + millis(LEASE))
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|source| Error::Sql {
            what: "take the outbox relay lease",
            source,
        })?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks `rows` sent and deletes the sensitive ones among them, in one
    /// transaction. If this fails the rows are published again later: a
    /// duplicate, which consumers tolerate, rather than a loss.
    async fn mark_sent(&self, rows: &[Row]) {
        // The seqs go in as one JSON array: a static statement whatever the
        // batch size.
        let seqs = seqs(rows);
        let marked = async {
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "DELETE FROM flotilla_outbox
                 WHERE keep_sent = 0 AND seq IN (SELECT value FROM json_each(?1))",
            )
            .bind(&seqs)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE flotilla_outbox SET sent_ms = ?1, attempts = attempts + 1, last_error = NULL
                 WHERE seq IN (SELECT value FROM json_each(?2))",
            )
            .bind(now_ms())
            .bind(&seqs)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        };
        if let Err(e) = marked.await {
            tracing::error!(
                error = %e,
                rows = rows.len(),
                "published outbox rows could not be marked sent; they will be published again"
            );
        }
    }

    fn recovered(&mut self, topic: &str) {
        let state = self.topics.entry(topic.to_owned()).or_default();
        if state.failing {
            tracing::info!(topic, "outbox publishing to the topic works again");
        }
        *state = TopicState::default();
    }

    /// Records a failed publish of `rows` and backs the topic off.
    async fn failed(&mut self, topic: &str, rows: &[Row], err: &Error) {
        let message = error_chain(err);
        let state = self.topics.entry(topic.to_owned()).or_default();
        let delay = state.backoff;
        state.not_before = Instant::now() + delay;
        state.backoff = (delay * 2).min(BACKOFF_MAX);
        let first_failure = !state.failing;
        state.failing = true;
        if is_refusal(err) {
            // The broker refuses this event: log it once per distinct error,
            // not on every retry.
            for row in rows {
                if row.last_error.as_deref() != Some(message.as_str()) {
                    tracing::error!(
                        topic,
                        seq = row.seq,
                        error = %message,
                        "the broker refuses an outbox event; it is kept and retried, and holds back later events of its topic"
                    );
                }
            }
        } else if first_failure {
            tracing::warn!(
                topic,
                error = %message,
                retry_in = ?delay,
                "outbox cannot publish; retrying with backoff"
            );
        }
        let query = sqlx::query(
            "UPDATE flotilla_outbox SET attempts = attempts + 1, last_error = ?1
             WHERE seq IN (SELECT value FROM json_each(?2))",
        )
        .bind(&message)
        .bind(seqs(rows));
        if let Err(e) = query.execute(&self.pool).await {
            tracing::warn!(error = %e, "could not record the outbox publish failure");
        }
    }

    /// Deletes rows sent more than a day ago, every few minutes.
    async fn housekeeping(&mut self) {
        if self
            .last_housekeeping
            .is_some_and(|t| t.elapsed() < HOUSEKEEPING_EVERY)
        {
            return;
        }
        self.last_housekeeping = Some(Instant::now());
        let cutoff = now_ms() - millis(KEEP_SENT);
        match sqlx::query("DELETE FROM flotilla_outbox WHERE sent_ms IS NOT NULL AND sent_ms < ?1")
            .bind(cutoff)
            .execute(&self.pool)
            .await
        {
            Ok(done) if done.rows_affected() > 0 => {
                tracing::debug!(
                    deleted = done.rows_affected(),
                    "deleted old sent outbox rows"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not delete old sent outbox rows"),
        }
    }

    async fn update_gauge(&self) {
        let pending: Result<i64, _> =
            sqlx::query_scalar("SELECT count(*) FROM flotilla_outbox WHERE sent_ms IS NULL")
                .fetch_one(&self.pool)
                .await;
        if let Ok(n) = pending {
            ::metrics::gauge!(metrics::OUTBOX_PENDING).set(n as f64);
        }
    }
}

/// True when the broker refused the request itself (a 4xx other than
/// timeout or rate limit): retrying the same bytes soon will not help.
fn is_refusal(err: &Error) -> bool {
    matches!(err, Error::Broker { status, .. }
        if status.is_client_error() && !matches!(status.as_u16(), 408 | 429))
}

/// The rows' seqs as a JSON array, for `json_each`.
fn seqs(rows: &[Row]) -> String {
    serde_json::to_string(&rows.iter().map(|r| r.seq).collect::<Vec<_>>()).unwrap_or_default()
}

fn earliest(next: Next, at: Instant) -> Next {
    match next {
        Next::Now => Next::Now,
        Next::At(t) => Next::At(t.min(at)),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_client_errors_except_timeouts_and_rate_limits() {
        let broker = |status: u16| Error::Broker {
            url: "u".into(),
            status: http::StatusCode::from_u16(status).unwrap(),
            code: "c".into(),
            message: "m".into(),
        };
        assert!(is_refusal(&broker(404)));
        assert!(is_refusal(&broker(400)));
        assert!(!is_refusal(&broker(429)));
        assert!(!is_refusal(&broker(408)));
        assert!(!is_refusal(&broker(503)));
    }

    #[tokio::test]
    async fn enqueue_refuses_what_the_broker_would_refuse_after_the_commit() {
        static NONE: sqlx::migrate::Migrator = sqlx::migrate::Migrator::DEFAULT;
        let pool = crate::open_sqlite("sqlite::memory:", &NONE).await.unwrap();
        Outbox::install(&pool).await.unwrap();
        let good = Event::new("orders", "order.placed", 1).unwrap();
        let mut bad_time = good.clone();
        bad_time.time = Some("2026-12-01 10:00".into());
        let bad_key = good
            .clone()
            .with_extension("partitionkey", "x".repeat(300))
            .unwrap();
        let mut tx = pool.begin().await.unwrap();
        for bad in [&bad_time, &bad_key] {
            let err = enqueue(&mut tx, "orders", bad).await.unwrap_err();
            assert!(matches!(err, Error::InvalidEvent { .. }), "{err:?}");
        }
        enqueue(&mut tx, "orders", &good).await.unwrap();
        tx.commit().await.unwrap();
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM flotilla_outbox")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(rows, 1, "only the good event is written");
    }
}
