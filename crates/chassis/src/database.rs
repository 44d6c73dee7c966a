//! The service's own SQLite database: opened with the settings every
//! service needs, and migrated safely when several replicas start at once.
//!
//! sqlx's migrator does not lock SQLite databases, so two replicas starting
//! together would both try to apply the same migration and one would fail.
//! Migrations therefore run inside one `BEGIN IMMEDIATE` transaction: the
//! first replica takes SQLite's write lock, the others wait for it (busy
//! timeout, then retries until a deadline), and then find nothing to do.
//! Opening a brand-new file races the same way on the switch to WAL, which
//! SQLite's busy timeout does not cover, so that is retried too.
//!
//! Foreign keys are off while migrations run. SQLite ignores
//! `PRAGMA foreign_keys` inside a transaction, so a migration cannot turn
//! them off itself, and with them on the table rebuild SQLite documents
//! (`CREATE TABLE t_new …; INSERT …; DROP TABLE t; ALTER TABLE t_new RENAME
//! TO t`) would cascade the `DROP` to every child row. Instead the
//! migration connection turns them off before `BEGIN IMMEDIATE`, runs
//! `PRAGMA foreign_key_check` before committing (and rolls everything back
//! if any row is left pointing nowhere), and turns them on again before the
//! connection goes back to the pool.

use std::str::FromStr;
use std::time::{Duration, Instant};

use sqlx::Connection;
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use crate::Error;

/// How long one statement waits for another connection's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long start-up keeps retrying while another replica holds the lock:
/// long enough for a slow migration, short enough to fail visibly.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// Pool size: SQLite has one writer; more readers than this only queue.
const MAX_CONNECTIONS: u32 = 8;

/// Opens the SQLite database at `url` (`sqlite:///abs/path.db`,
/// `sqlite://rel.db` or `sqlite::memory:`), creating the file and its
/// directory if missing, with WAL, a 5 s busy timeout and foreign keys on,
/// then runs `migrator` with foreign keys off, refusing to commit if they no
/// longer hold afterwards ([`Error::MigrateForeignKeys`]).
///
/// [`crate::Service::database`] calls this with `DATABASE_URL`; tests call
/// it directly with a temporary file.
pub async fn open_sqlite(url: &str, migrator: &Migrator) -> Result<SqlitePool, Error> {
    let scheme = url.split(':').next().unwrap_or_default();
    if scheme != "sqlite" {
        return Err(Error::UnsupportedDatabase {
            scheme: scheme.to_owned(),
        });
    }
    let in_memory = url.contains(":memory:") || url.contains("mode=memory");
    let options = SqliteConnectOptions::from_str(url)
        .map_err(|source| Error::Database {
            path: url.to_owned(),
            source,
        })?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true)
        // Deleted rows' bytes are overwritten, not left in free pages: the
        // outbox deletes sensitive events once sent
        // (`outbox::enqueue_sensitive`), and a service's own deletes of
        // personal data should go as far.
        .pragma("secure_delete", "ON");
    let path = if in_memory {
        ":memory:".to_owned()
    } else {
        options.get_filename().display().to_string()
    };
    let dir = options
        .get_filename()
        .parent()
        .filter(|d| !in_memory && !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| Error::Database {
                path: path.clone(),
                source: sqlx::Error::Io(e),
            })?;
    }
    // Each connection to `:memory:` is its own database: keep exactly one.
    let max = if in_memory { 1 } else { MAX_CONNECTIONS };
    let pool_options = SqlitePoolOptions::new()
        .max_connections(max)
        .min_connections(if in_memory { 1 } else { 0 })
        .idle_timeout(if in_memory {
            None
        } else {
            Some(Duration::from_secs(600))
        })
        .max_lifetime(if in_memory {
            None
        } else {
            Some(Duration::from_secs(1800))
        });

    let deadline = Instant::now() + START_DEADLINE;
    let mut backoff = Backoff::default();
    // Switching a new file to WAL takes an exclusive lock that SQLite's busy
    // timeout does not wait for, so replicas opening a fresh database
    // together retry here.
    let pool = loop {
        match pool_options.clone().connect_with(options.clone()).await {
            Ok(pool) => break pool,
            Err(e) if is_busy(&e) && Instant::now() < deadline => backoff.wait().await,
            Err(source) => {
                return Err(Error::Database {
                    path: path.clone(),
                    source,
                });
            }
        }
    };
    loop {
        match migrate_once(&pool, migrator).await {
            Ok(()) => return Ok(pool),
            Err(Failure::Migrate(e)) if is_migrate_busy(&e) && Instant::now() < deadline => {
                tracing::info!(database = %path, "another replica is migrating; waiting");
                backoff.wait().await;
            }
            Err(Failure::Migrate(source)) => {
                return Err(Error::Migrate {
                    path: path.clone(),
                    source,
                });
            }
            Err(Failure::ForeignKeys(violations)) => {
                return Err(Error::MigrateForeignKeys {
                    path: path.clone(),
                    violations,
                });
            }
        }
    }
}

/// Growing pauses between attempts, so waiting replicas do not spin.
#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    async fn wait(&mut self) {
        self.0 = self.0.saturating_add(1);
        let millis = 10u64.saturating_mul(1 << self.0.min(5));
        tokio::time::sleep(Duration::from_millis(millis)).await;
    }
}

/// Why one migration attempt failed.
enum Failure {
    Migrate(MigrateError),
    /// `PRAGMA foreign_key_check` found rows, summarised per table.
    ForeignKeys(String),
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Failure::Migrate(MigrateError::Execute(e))
    }
}

impl From<MigrateError> for Failure {
    fn from(e: MigrateError) -> Self {
        Failure::Migrate(e)
    }
}

async fn migrate_once(pool: &SqlitePool, migrator: &Migrator) -> Result<(), Failure> {
    let mut conn = pool.acquire().await?;
    // Must come before BEGIN: inside a transaction SQLite ignores it (see the
    // module's documentation).
    sqlx::query("PRAGMA foreign_keys = OFF")
        .execute(&mut *conn)
        .await?;
    let outcome = migrate_checked(&mut conn, migrator).await;
    // Every pool connection promises foreign keys on, so this one goes back
    // only once they are; if they cannot be turned on (say a rollback
    // failed and a transaction is still open, where the pragma is ignored)
    // it is closed instead (for `:memory:` that loses the database, but
    // opening fails then anyway).
    let restored = restore_foreign_keys(&mut conn).await;
    if let Err(e) = &restored {
        tracing::warn!(error = %e, "could not turn foreign keys back on; closing the migration connection");
        let _ = conn.detach().close().await;
    }
    outcome?;
    restored?;
    Ok(())
}

async fn migrate_checked(
    conn: &mut sqlx::pool::PoolConnection<sqlx::Sqlite>,
    migrator: &Migrator,
) -> Result<(), Failure> {
    let mut tx = (**conn).begin_with("BEGIN IMMEDIATE").await?;
    let before = applied(&mut tx).await;
    // Inside the transaction sqlx applies each migration in a savepoint, so
    // the whole run is atomic and holds the write lock throughout.
    if let Err(e) = migrator.run(&mut *tx).await {
        let _ = tx.rollback().await;
        return Err(e.into());
    }
    // Nothing applied, nothing to check: a start with no new migration
    // neither scans every child table nor refuses a database whose
    // references were broken by hand (the sqlite3 shell has foreign keys
    // off), which no migration could mend.
    if applied(&mut tx).await == before {
        tx.commit().await?;
        return Ok(());
    }
    // Checked before committing, so a migration that breaks a reference is
    // refused whole instead of leaving rows no later statement could
    // satisfy.
    let rows: Vec<(String, String, i64)> = match sqlx::query_as(
        "SELECT \"table\", parent, count(*) FROM pragma_foreign_key_check \
         GROUP BY \"table\", parent ORDER BY \"table\", parent",
    )
    .fetch_all(&mut *tx)
    .await
    {
        Ok(rows) => rows,
        Err(e) => {
            let _ = tx.rollback().await;
            return Err(e.into());
        }
    };
    if !rows.is_empty() {
        tx.rollback().await?;
        let summary = rows
            .iter()
            .map(|(table, parent, n)| {
                format!("{n} row(s) of `{table}` reference missing `{parent}` rows")
            })
            .collect::<Vec<_>>()
            .join("; ");
        return Err(Failure::ForeignKeys(summary));
    }
    tx.commit().await?;
    Ok(())
}

/// How many migrations the database has applied (none before the first
/// run made sqlx's table).
async fn applied(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&mut **tx)
        .await
        .unwrap_or(0)
}

async fn restore_foreign_keys(
    conn: &mut sqlx::pool::PoolConnection<sqlx::Sqlite>,
) -> Result<(), sqlx::Error> {
    sqlx::query("PRAGMA foreign_keys = ON")
        .execute(&mut **conn)
        .await?;
    let on: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(&mut **conn)
        .await?;
    if on == 1 {
        Ok(())
    } else {
        Err(sqlx::Error::Protocol(
            "PRAGMA foreign_keys = ON did not take effect".into(),
        ))
    }
}

fn is_migrate_busy(e: &MigrateError) -> bool {
    match e {
        MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => is_busy(e),
        _ => false,
    }
}

/// SQLITE_BUSY / SQLITE_LOCKED, including their extended codes.
fn is_busy(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    let primary = db
        .code()
        .and_then(|c| c.parse::<i32>().ok())
        .map(|c| c & 0xff);
    matches!(primary, Some(5 | 6))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    async fn migrator(dir: &Path) -> Migrator {
        std::fs::write(
            dir.join("0001_items.sql"),
            "CREATE TABLE items (id TEXT PRIMARY KEY, parent TEXT REFERENCES items(id));\n\
             INSERT INTO items (id) VALUES ('a'), ('b');",
        )
        .unwrap();
        std::fs::write(
            dir.join("0002_more.sql"),
            "INSERT INTO items (id, parent) VALUES ('c', 'a');",
        )
        .unwrap();
        Migrator::new(dir).await.unwrap()
    }

    #[tokio::test]
    async fn concurrent_replicas_migrate_once() {
        let tmp = tempfile::tempdir().unwrap();
        let mdir = tmp.path().join("migrations");
        std::fs::create_dir(&mdir).unwrap();
        let m = migrator(&mdir).await;
        let url = format!("sqlite://{}/data/x/x.db", tmp.path().display());
        let (a, b, c) = tokio::join!(
            open_sqlite(&url, &m),
            open_sqlite(&url, &m),
            open_sqlite(&url, &m)
        );
        let (a, b, _c) = (a.unwrap(), b.unwrap(), c.unwrap());
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
            .fetch_one(&a)
            .await
            .unwrap();
        assert_eq!(n, 3);
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&b)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(&b)
            .await
            .unwrap();
        assert_eq!(fk, 1);
        let err = sqlx::query("INSERT INTO items (id, parent) VALUES ('d', 'nope')")
            .execute(&b)
            .await;
        assert!(err.is_err(), "foreign keys must be enforced");
        // Reopening finds nothing to do.
        open_sqlite(&url, &m).await.unwrap();
    }

    /// Writes `files` (name, SQL) into a fresh migrations directory.
    async fn migrator_of(dir: &Path, files: &[(&str, &str)]) -> Migrator {
        std::fs::create_dir_all(dir).unwrap();
        for (name, sql) in files {
            std::fs::write(dir.join(name), sql).unwrap();
        }
        Migrator::new(dir).await.unwrap()
    }

    const ORDERS: &str = "CREATE TABLE orders (id TEXT PRIMARY KEY, total INTEGER NOT NULL);\n\
         CREATE TABLE order_lines (\n\
           id INTEGER PRIMARY KEY,\n\
           order_id TEXT NOT NULL REFERENCES orders(id) ON DELETE CASCADE\n\
         );\n\
         INSERT INTO orders (id, total) VALUES ('o1', 5), ('o2', 7);\n\
         INSERT INTO order_lines (order_id) VALUES ('o1'), ('o1'), ('o2');";

    #[tokio::test]
    async fn rebuilding_a_parent_table_keeps_its_children() {
        let tmp = tempfile::tempdir().unwrap();
        // The rebuild SQLite documents for changing a column's type.
        let m = migrator_of(
            &tmp.path().join("migrations"),
            &[
                ("0001_orders.sql", ORDERS),
                (
                    "0002_rebuild.sql",
                    "CREATE TABLE orders_new (id TEXT PRIMARY KEY, total TEXT NOT NULL);\n\
                     INSERT INTO orders_new SELECT id, CAST(total AS TEXT) FROM orders;\n\
                     DROP TABLE orders;\n\
                     ALTER TABLE orders_new RENAME TO orders;",
                ),
            ],
        )
        .await;
        let url = format!("sqlite://{}/x.db", tmp.path().display());
        let pool = open_sqlite(&url, &m).await.unwrap();
        let lines: i64 = sqlx::query_scalar("SELECT count(*) FROM order_lines")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(lines, 3, "the rebuild must not cascade to order_lines");
        // Every connection, the migration's included, has them on again.
        let mut conns = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            conns.push(pool.acquire().await.unwrap());
        }
        for conn in &mut conns {
            let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
                .fetch_one(&mut **conn)
                .await
                .unwrap();
            assert_eq!(fk, 1);
        }
        drop(conns);
        let err = sqlx::query("DELETE FROM orders WHERE id = 'o1'")
            .execute(&pool)
            .await;
        assert!(err.is_ok());
        let lines: i64 = sqlx::query_scalar("SELECT count(*) FROM order_lines")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(lines, 1, "ON DELETE CASCADE still applies after migrating");
    }

    #[tokio::test]
    async fn a_migration_that_breaks_a_reference_is_rolled_back() {
        let tmp = tempfile::tempdir().unwrap();
        let m = migrator_of(
            &tmp.path().join("migrations"),
            &[
                ("0001_orders.sql", ORDERS),
                ("0002_drop.sql", "DELETE FROM orders WHERE id = 'o1';"),
            ],
        )
        .await;
        let url = format!("sqlite://{}/x.db", tmp.path().display());
        let err = open_sqlite(&url, &m).await.unwrap_err();
        assert!(matches!(err, Error::MigrateForeignKeys { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("2 row(s) of `order_lines`"), "{msg}");
        assert!(msg.contains("`orders`"), "{msg}");
        assert!(msg.contains("rolled back"), "{msg}");
        // Nothing was applied, not even 0001.
        let pool = SqlitePool::connect(&url).await.unwrap();
        let tables: i64 =
            sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE name = 'orders'")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(tables, 0);
    }

    /// A reference broken outside any migration (by hand, in the sqlite3
    /// shell, where foreign keys are off) does not stop a start that
    /// applies nothing: no migration could mend it.
    #[tokio::test]
    async fn a_start_with_no_new_migration_does_not_check_references() {
        let tmp = tempfile::tempdir().unwrap();
        let m = migrator_of(
            &tmp.path().join("migrations"),
            &[("0001_orders.sql", ORDERS)],
        )
        .await;
        let url = format!("sqlite://{}/x.db", tmp.path().display());
        open_sqlite(&url, &m).await.unwrap().close().await;
        let by_hand = SqlitePool::connect_with(
            url.parse::<sqlx::sqlite::SqliteConnectOptions>()
                .unwrap()
                .foreign_keys(false),
        )
        .await
        .unwrap();
        sqlx::query("DELETE FROM orders WHERE id = 'o1'")
            .execute(&by_hand)
            .await
            .unwrap();
        let dangling: i64 = sqlx::query_scalar("SELECT count(*) FROM pragma_foreign_key_check")
            .fetch_one(&by_hand)
            .await
            .unwrap();
        assert_eq!(dangling, 2, "the references are broken");
        by_hand.close().await;
        open_sqlite(&url, &m).await.unwrap();
    }

    #[tokio::test]
    async fn memory_and_bad_urls() {
        let tmp = tempfile::tempdir().unwrap();
        let m = migrator(tmp.path()).await;
        let pool = open_sqlite("sqlite::memory:", &m).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, 3);
        // The one connection is the migration's: foreign keys are on again.
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(fk, 1);

        let err = open_sqlite("postgres://u:secret@h/db", &m)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("postgres"), "{err}");
        assert!(!err.contains("secret"), "{err}");
    }
}
