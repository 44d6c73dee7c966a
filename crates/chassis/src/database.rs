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
/// then runs `migrator`.
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
        .foreign_keys(true);
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
            Err(e) if is_migrate_busy(&e) && Instant::now() < deadline => {
                tracing::info!(database = %path, "another replica is migrating; waiting");
                backoff.wait().await;
            }
            Err(source) => {
                return Err(Error::Migrate {
                    path: path.clone(),
                    source,
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

async fn migrate_once(pool: &SqlitePool, migrator: &Migrator) -> Result<(), MigrateError> {
    let mut conn = pool.acquire().await?;
    let mut tx = (*conn).begin_with("BEGIN IMMEDIATE").await?;
    // Inside the transaction sqlx applies each migration in a savepoint, so
    // the whole run is atomic and holds the write lock throughout.
    migrator.run(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
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

        let err = open_sqlite("postgres://u:secret@h/db", &m)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("postgres"), "{err}");
        assert!(!err.contains("secret"), "{err}");
    }
}
