//! The Ed25519 keys that sign access tokens: kept in the service's database
//! (PKCS#8), loaded into a [`KeyRing`] that every replica holds in memory,
//! rotated by [`maintain`] according to the [`schedule`], and published as
//! a JWKS.
//!
//! Replicas share the database. [`maintain`] re-plans inside one
//! `BEGIN IMMEDIATE` transaction, which holds SQLite's write lock, so of
//! several replicas that see a rotation due at once exactly one creates the
//! key and the others find it done; the `UNIQUE` generation column makes a
//! second "next key" impossible even without that lock.

pub mod schedule;

use std::sync::{Arc, RwLock};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{Value, json};
use sqlx::{Connection, SqliteConnection, SqlitePool};

use self::schedule::{KeyState, KeyTimes, Schedule};

/// Why keys could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the signing-key table could not be read or written")]
    Database(#[from] sqlx::Error),
    #[error("could not generate an Ed25519 key")]
    Generate,
    /// A stored key does not parse: the database was edited or corrupted.
    #[error("stored signing key {kid} is not a valid Ed25519 PKCS#8 key: {reason}")]
    Corrupt { kid: String, reason: String },
}

/// A signing key with its pair parsed.
pub struct SigningKey {
    pub kid: String,
    pub generation: i64,
    pub activates_at: i64,
    pub pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("generation", &self.generation)
            .field("activates_at", &self.activates_at)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// The public half as a JWK.
    pub fn jwk(&self) -> Value {
        json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(self.pair.public_key().as_ref()),
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig",
        })
    }
}

/// The RFC 7638 thumbprint of an Ed25519 public key, used as its `kid`:
/// derived from the key, so it is stable and never collides by accident.
pub fn thumbprint(public: &[u8]) -> String {
    // The required members in lexicographic order, no whitespace.
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(public)
    );
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    ))
}

/// Every stored key, in generation order, with the schedule that says what
/// each one may do at a given time.
#[derive(Debug)]
pub struct KeyRing {
    schedule: Schedule,
    keys: Vec<SigningKey>,
}

impl KeyRing {
    fn times(&self) -> Vec<KeyTimes> {
        self.keys
            .iter()
            .map(|k| KeyTimes {
                generation: k.generation,
                activates_at: k.activates_at,
            })
            .collect()
    }

    /// The key that signs at `now`.
    pub fn signer(&self, now: i64) -> Option<&SigningKey> {
        let states = schedule::states(&self.schedule, &self.times(), now);
        self.keys
            .iter()
            .zip(states)
            .find(|(_, s)| *s == KeyState::Active)
            .map(|(k, _)| k)
    }

    /// The JWKS at `now`: published, active and retired keys, newest first.
    pub fn jwks(&self, now: i64) -> Value {
        let states = schedule::states(&self.schedule, &self.times(), now);
        let keys: Vec<Value> = self
            .keys
            .iter()
            .zip(states)
            .rev()
            .filter(|(_, s)| s.is_published())
            .map(|(k, _)| k.jwk())
            .collect();
        json!({ "keys": keys })
    }

    /// Each key's id and state at `now`.
    #[cfg(test)]
    pub fn states(&self, now: i64) -> Vec<(String, KeyState)> {
        let states = schedule::states(&self.schedule, &self.times(), now);
        self.keys
            .iter()
            .map(|k| k.kid.clone())
            .zip(states)
            .collect()
    }
}

/// The ring every handler reads, swapped whole by the maintenance task.
#[derive(Debug, Clone)]
pub struct Keys {
    ring: Arc<RwLock<Arc<KeyRing>>>,
}

impl Keys {
    pub fn new(ring: KeyRing) -> Keys {
        Keys {
            ring: Arc::new(RwLock::new(Arc::new(ring))),
        }
    }

    /// A snapshot: handlers use one ring for the whole request.
    pub fn current(&self) -> Arc<KeyRing> {
        // A panic elsewhere while swapping cannot leave a half-written Arc.
        self.ring.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, ring: KeyRing) {
        *self.ring.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ring);
    }
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    kid: String,
    generation: i64,
    pkcs8: Vec<u8>,
    activates_at: i64,
}

async fn load_rows(conn: &mut SqliteConnection) -> Result<Vec<KeyRow>, sqlx::Error> {
    sqlx::query_as::<_, KeyRow>(
        "SELECT kid, generation, pkcs8, activates_at FROM signing_keys ORDER BY generation",
    )
    .fetch_all(conn)
    .await
}

fn times(rows: &[KeyRow]) -> Vec<KeyTimes> {
    rows.iter()
        .map(|r| KeyTimes {
            generation: r.generation,
            activates_at: r.activates_at,
        })
        .collect()
}

fn parse(rows: Vec<KeyRow>, schedule: Schedule) -> Result<KeyRing, KeyError> {
    let keys = rows
        .into_iter()
        .map(|row| {
            let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&row.pkcs8).map_err(|e| {
                KeyError::Corrupt {
                    kid: row.kid.clone(),
                    reason: e.to_string(),
                }
            })?;
            if thumbprint(pair.public_key().as_ref()) != row.kid {
                return Err(KeyError::Corrupt {
                    kid: row.kid,
                    reason: "its kid is not its public key's thumbprint".into(),
                });
            }
            Ok(SigningKey {
                kid: row.kid,
                generation: row.generation,
                activates_at: row.activates_at,
                pair,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(KeyRing { schedule, keys })
}

/// Applies the schedule at `now` (first key, rotation, removal) and returns
/// the resulting ring. Safe to run from every replica at once.
pub async fn maintain(db: &SqlitePool, schedule: Schedule, now: i64) -> Result<KeyRing, KeyError> {
    let mut conn = db.acquire().await?;
    let rows = load_rows(&mut conn).await?;
    if schedule::plan(&schedule, &times(&rows), now).is_empty() {
        return parse(rows, schedule);
    }
    // Something to do: plan again under the write lock, since another
    // replica may have done it in between.
    let mut tx = (*conn).begin_with("BEGIN IMMEDIATE").await?;
    let rows = load_rows(&mut tx).await?;
    let plan = schedule::plan(&schedule, &times(&rows), now);
    for generation in &plan.remove {
        sqlx::query("DELETE FROM signing_keys WHERE generation = ?1")
            .bind(generation)
            .execute(&mut *tx)
            .await?;
        tracing::info!(generation, "signing key removed from the JWKS");
    }
    if let Some(activates_at) = plan.create {
        let pkcs8 =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Generate)?;
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| KeyError::Generate)?;
        let public = pair.public_key().as_ref().to_vec();
        let kid = thumbprint(&public);
        let generation = rows.last().map_or(1, |r| r.generation + 1);
        let inserted = sqlx::query(
            "INSERT INTO signing_keys (kid, generation, pkcs8, public_key, created_at, activates_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(&kid)
        .bind(generation)
        .bind(pkcs8.as_ref())
        .bind(&public)
        .bind(now)
        .bind(activates_at)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            // Another writer took this generation (possible only on an
            // engine where the lock above does not serialise): theirs
            // stands, ours is dropped with the transaction.
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                drop(tx);
                tracing::info!(generation, "another replica created the next signing key");
                let rows = load_rows(&mut conn).await?;
                return parse(rows, schedule);
            }
            Err(e) => return Err(e.into()),
        }
        metrics::counter!("accounts_signing_keys_created_total").increment(1);
        tracing::info!(
            kid = %kid,
            generation,
            signs_in_seconds = activates_at - now,
            "signing key created and published"
        );
    }
    tx.commit().await?;
    let rows = load_rows(&mut conn).await?;
    parse(rows, schedule)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> Schedule {
        Schedule {
            publish_delay: 300,
            rotation: Some(3600),
            retire_grace: 960,
        }
    }

    #[test]
    fn thumbprint_matches_rfc_8037() {
        // RFC 8037 appendix A.2/A.3.
        let x = URL_SAFE_NO_PAD
            .decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
            .unwrap();
        assert_eq!(
            thumbprint(&x),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[tokio::test]
    async fn first_start_creates_one_key_and_rotation_publishes_before_signing() {
        let db = flotilla_chassis::open_sqlite("sqlite::memory:", &crate::MIGRATOR)
            .await
            .unwrap();
        let s = schedule();
        let t0 = 1_700_000_000;
        let ring = maintain(&db, s, t0).await.unwrap();
        let first = ring.signer(t0).unwrap().kid.clone();
        assert_eq!(ring.jwks(t0)["keys"].as_array().unwrap().len(), 1);

        // Idempotent.
        let ring = maintain(&db, s, t0 + 10).await.unwrap();
        assert_eq!(ring.states(t0 + 10).len(), 1);

        // Rotation due: a second key is published but the first still signs.
        let due = t0 + 3600 - 300;
        let ring = maintain(&db, s, due).await.unwrap();
        assert_eq!(ring.signer(due).unwrap().kid, first);
        let jwks = ring.jwks(due);
        let kids: Vec<&str> = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap())
            .collect();
        assert_eq!(kids.len(), 2);
        let second = kids[0].to_owned();
        assert_ne!(second, first);

        // After the delay the second signs, the first is still published.
        let switch = due + 300;
        let ring = maintain(&db, s, switch).await.unwrap();
        assert_eq!(ring.signer(switch).unwrap().kid, second);
        assert_eq!(ring.jwks(switch)["keys"].as_array().unwrap().len(), 2);

        // After the grace the first is gone from the JWKS and the table.
        let ring = maintain(&db, s, switch + 960).await.unwrap();
        let jwks = ring.jwks(switch + 960);
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
        assert_eq!(jwks["keys"][0]["kid"], second.as_str());
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM signing_keys")
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(n, 1);
    }

    #[tokio::test]
    async fn replicas_starting_together_create_one_key() {
        let tmp = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/accounts.db", tmp.path().display());
        let mut pools = Vec::new();
        for _ in 0..3 {
            pools.push(
                flotilla_chassis::open_sqlite(&url, &crate::MIGRATOR)
                    .await
                    .unwrap(),
            );
        }
        let s = schedule();
        let now = 1_700_000_000;
        let (a, b, c) = tokio::join!(
            maintain(&pools[0], s, now),
            maintain(&pools[1], s, now),
            maintain(&pools[2], s, now)
        );
        let kids: Vec<String> = [a, b, c]
            .into_iter()
            .map(|r| r.unwrap().signer(now).unwrap().kid.clone())
            .collect();
        assert!(kids.iter().all(|k| *k == kids[0]), "{kids:?}");

        // The same for a rotation falling due on all of them at once.
        let due = now + 3600 - 300;
        let (a, b, c) = tokio::join!(
            maintain(&pools[0], s, due),
            maintain(&pools[1], s, due),
            maintain(&pools[2], s, due)
        );
        for ring in [a, b, c] {
            assert_eq!(ring.unwrap().states(due).len(), 2);
        }
    }

    #[tokio::test]
    async fn a_tampered_key_is_refused() {
        let db = flotilla_chassis::open_sqlite("sqlite::memory:", &crate::MIGRATOR)
            .await
            .unwrap();
        maintain(&db, schedule(), 0).await.unwrap();
        sqlx::query("UPDATE signing_keys SET kid = 'other'")
            .execute(&db)
            .await
            .unwrap();
        let err = maintain(&db, schedule(), 1).await.unwrap_err();
        assert!(matches!(err, KeyError::Corrupt { .. }), "{err}");
    }
}
