//! Refresh tokens: opaque, rotated on every use, grouped in families.
//!
//! A token is 256 random bits, base64url; only its SHA-256 is stored. Each
//! login starts a family; each refresh spends the presented token (marks it
//! used) and issues its successor in the same family. A spent token
//! presented again means two parties hold the family (one of them stole
//! it), and there is no telling which, so the whole family — every token
//! that ever descended from that login — is revoked (OAuth 2.0 Security
//! BCP, refresh token rotation). Logout revokes the family too.
//!
//! Each token expires `ttl` after it was issued, and a family ends for good
//! `max` after its login ([`Lifetime`]): without that bound, a stolen
//! token refreshed once a month would be a session for ever (OWASP's
//! "absolute timeout").
//!
//! Each rotation runs in one `BEGIN IMMEDIATE` transaction, so two requests
//! racing with the same token cannot both succeed: the second finds it
//! spent.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};
use sqlx::{Connection, SqlitePool};

/// Length of a token in characters (32 bytes, base64url without padding).
pub const TOKEN_CHARS: usize = 43;

/// Why a token could not be made or stored.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("the refresh-token tables could not be read or written")]
    Database(#[from] sqlx::Error),
    #[error("the system random number generator failed")]
    Random,
}

/// A new token and the hash that is stored for it.
struct Fresh {
    token: String,
    hash: Vec<u8>,
}

fn fresh() -> Result<Fresh, RefreshError> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| RefreshError::Random)?;
    let token = URL_SAFE_NO_PAD.encode(bytes);
    let hash = digest(&token);
    Ok(Fresh { token, hash })
}

/// The stored form of `token`. A fast hash is enough: the token has 256
/// bits of entropy, there is nothing to brute-force.
pub fn digest(token: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .to_vec()
}

/// Whether `token` could be one of ours; anything else is not looked up.
fn well_formed(token: &str) -> bool {
    token.len() == TOKEN_CHARS
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// How long tokens and their families live, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    /// Each token, from its issue (renewed by each rotation).
    pub ttl: i64,
    /// A family, from its login: no token of it outlives this.
    pub max: i64,
}

impl Lifetime {
    /// When a token issued at `now` in a family created at `created`
    /// expires.
    fn expiry(self, created: i64, now: i64) -> i64 {
        now.saturating_add(self.ttl)
            .min(created.saturating_add(self.max))
    }
}

/// Starts a family for `user_id` (a login) and returns its first token.
pub async fn start_family(
    db: &SqlitePool,
    user_id: &str,
    now: i64,
    life: Lifetime,
) -> Result<String, RefreshError> {
    let family = uuid::Uuid::new_v4().to_string();
    let first = fresh()?;
    let mut tx = db.begin().await?;
    sqlx::query("INSERT INTO refresh_families (id, user_id, created_at) VALUES (?1, ?2, ?3)")
        .bind(&family)
        .bind(user_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO refresh_tokens (token_hash, family_id, parent_hash, issued_at, expires_at)
         VALUES (?1, ?2, NULL, ?3, ?4)",
    )
    .bind(&first.hash)
    .bind(&family)
    .bind(now)
    .bind(life.expiry(now, now))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(first.token)
}

/// What presenting a refresh token led to.
#[derive(Debug, PartialEq, Eq)]
pub enum Rotation {
    /// Spent; here is its successor, which expires in `expires_in` s.
    Rotated {
        user_id: String,
        token: String,
        expires_in: i64,
    },
    /// It had been spent before: its family is now revoked.
    Reused { user_id: String },
    /// Unknown, expired, or of a revoked family.
    Invalid,
}

#[derive(sqlx::FromRow)]
struct Presented {
    family_id: String,
    expires_at: i64,
    used_at: Option<i64>,
    user_id: String,
    revoked_at: Option<i64>,
    created_at: i64,
}

/// Spends `token` and issues its successor, or detects reuse.
pub async fn rotate(
    db: &SqlitePool,
    token: &str,
    now: i64,
    life: Lifetime,
) -> Result<Rotation, RefreshError> {
    if !well_formed(token) {
        return Ok(Rotation::Invalid);
    }
    let hash = digest(token);
    let next = fresh()?;
    let mut conn = db.acquire().await?;
    let mut tx = (*conn).begin_with("BEGIN IMMEDIATE").await?;
    let presented = sqlx::query_as::<_, Presented>(
        "SELECT t.family_id, t.expires_at, t.used_at, f.user_id, f.revoked_at, f.created_at
         FROM refresh_tokens t JOIN refresh_families f ON f.id = t.family_id
         WHERE t.token_hash = ?1",
    )
    .bind(&hash)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(p) = presented else {
        return Ok(Rotation::Invalid);
    };
    if p.used_at.is_some() {
        revoke(&mut tx, &p.family_id, now, "reuse").await?;
        tx.commit().await?;
        return Ok(Rotation::Reused { user_id: p.user_id });
    }
    let expires_at = life.expiry(p.created_at, now);
    // Past the family's end: its last token may still be unexpired when
    // it was issued under a longer `max`.
    if p.revoked_at.is_some() || p.expires_at <= now || expires_at <= now {
        return Ok(Rotation::Invalid);
    }
    sqlx::query("UPDATE refresh_tokens SET used_at = ?2 WHERE token_hash = ?1")
        .bind(&hash)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO refresh_tokens (token_hash, family_id, parent_hash, issued_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .bind(&next.hash)
    .bind(&p.family_id)
    .bind(&hash)
    .bind(now)
    .bind(expires_at)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Rotation::Rotated {
        user_id: p.user_id,
        token: next.token,
        expires_in: expires_at - now,
    })
}

async fn revoke(
    conn: &mut sqlx::SqliteConnection,
    family: &str,
    now: i64,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE refresh_families SET revoked_at = ?2, revoked_reason = ?3
         WHERE id = ?1 AND revoked_at IS NULL",
    )
    .bind(family)
    .bind(now)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// Revokes the family of `token` (logout). Returns whether the token was
/// known; unknown tokens change nothing.
pub async fn logout(db: &SqlitePool, token: &str, now: i64) -> Result<bool, RefreshError> {
    if !well_formed(token) {
        return Ok(false);
    }
    let family: Option<String> =
        sqlx::query_scalar("SELECT family_id FROM refresh_tokens WHERE token_hash = ?1")
            .bind(digest(token))
            .fetch_optional(db)
            .await?;
    let Some(family) = family else {
        return Ok(false);
    };
    let mut conn = db.acquire().await?;
    revoke(&mut conn, &family, now, "logout").await?;
    Ok(true)
}

/// Deletes tokens past their expiry and families left without tokens.
/// Spent tokens are kept until they expire, so reuse is still detected.
pub async fn purge_expired(db: &SqlitePool, now: i64) -> Result<u64, RefreshError> {
    let mut tx = db.begin().await?;
    let tokens = sqlx::query("DELETE FROM refresh_tokens WHERE expires_at <= ?1")
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    sqlx::query(
        "DELETE FROM refresh_families
         WHERE NOT EXISTS (SELECT 1 FROM refresh_tokens t WHERE t.family_id = refresh_families.id)",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: i64 = 30 * 86_400;
    const LIFE: Lifetime = Lifetime {
        ttl: TTL,
        max: 90 * 86_400,
    };

    async fn db_with_user() -> SqlitePool {
        let db = flotilla_chassis::open_sqlite("sqlite::memory:", &crate::MIGRATOR)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO users (id, email, password_hash, created_at) VALUES ('u1', 'a@example.com', 'x', 'now')",
        )
        .execute(&db)
        .await
        .unwrap();
        db
    }

    fn token(r: Rotation) -> String {
        match r {
            Rotation::Rotated { token, .. } => token,
            other => panic!("not rotated: {other:?}"),
        }
    }

    #[test]
    fn tokens_are_256_bit_and_stored_hashed() {
        let a = fresh().unwrap();
        let b = fresh().unwrap();
        assert_eq!(a.token.len(), TOKEN_CHARS);
        assert_eq!(URL_SAFE_NO_PAD.decode(&a.token).unwrap().len(), 32);
        assert_ne!(a.token, b.token);
        assert_eq!(a.hash.len(), 32);
        assert_eq!(a.hash, digest(&a.token));
        assert!(well_formed(&a.token));
        assert!(!well_formed("short"));
        assert!(!well_formed(&"=".repeat(TOKEN_CHARS)));
    }

    #[tokio::test]
    async fn rotation_spends_the_token_and_reuse_revokes_the_family() {
        let db = db_with_user().await;
        let t1 = start_family(&db, "u1", 100, LIFE).await.unwrap();
        let t2 = token(rotate(&db, &t1, 200, LIFE).await.unwrap());
        let t3 = token(rotate(&db, &t2, 300, LIFE).await.unwrap());
        assert_ne!(t2, t1);
        assert_ne!(t3, t2);

        // t1 again: reuse. The family goes, including the newest token.
        assert_eq!(
            rotate(&db, &t1, 400, LIFE).await.unwrap(),
            Rotation::Reused {
                user_id: "u1".into()
            }
        );
        assert_eq!(
            rotate(&db, &t3, 401, LIFE).await.unwrap(),
            Rotation::Invalid
        );
        // Still reported as reuse afterwards, and still revoked.
        assert!(matches!(
            rotate(&db, &t2, 402, LIFE).await.unwrap(),
            Rotation::Reused { .. }
        ));
        let reason: String = sqlx::query_scalar("SELECT revoked_reason FROM refresh_families")
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(reason, "reuse");

        // Another login's family is untouched.
        let other = start_family(&db, "u1", 500, LIFE).await.unwrap();
        let other2 = token(rotate(&db, &other, 501, LIFE).await.unwrap());
        // Nothing stored is a token, nor its decoded bytes: each row is the
        // SHA-256 of a token handed out.
        let stored: Vec<Vec<u8>> = sqlx::query_scalar("SELECT token_hash FROM refresh_tokens")
            .fetch_all(&db)
            .await
            .unwrap();
        let issued = [&t1, &t2, &t3, &other, &other2];
        assert!(!stored.is_empty());
        for h in &stored {
            assert!(issued.iter().any(|t| *h == digest(t)), "{h:?}");
            assert!(
                issued
                    .iter()
                    .all(|t| *h != URL_SAFE_NO_PAD.decode(t).unwrap() && *h != t.as_bytes()),
                "a token stored as it is"
            );
        }
    }

    #[tokio::test]
    async fn concurrent_use_of_one_token_rotates_once() {
        let tmp = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/a.db", tmp.path().display());
        let db = flotilla_chassis::open_sqlite(&url, &crate::MIGRATOR)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO users (id, email, password_hash, created_at) VALUES ('u1', 'a@example.com', 'x', 'now')",
        )
        .execute(&db)
        .await
        .unwrap();
        let t = start_family(&db, "u1", 0, LIFE).await.unwrap();
        let (a, b) = tokio::join!(rotate(&db, &t, 1, LIFE), rotate(&db, &t, 1, LIFE));
        let outcomes = [a.unwrap(), b.unwrap()];
        let rotated = outcomes
            .iter()
            .filter(|o| matches!(o, Rotation::Rotated { .. }))
            .count();
        let reused = outcomes
            .iter()
            .filter(|o| matches!(o, Rotation::Reused { .. }))
            .count();
        assert_eq!((rotated, reused), (1, 1), "{outcomes:?}");
    }

    #[tokio::test]
    async fn a_family_ends_at_its_maximum_however_often_it_is_refreshed() {
        let db = db_with_user().await;
        let life = Lifetime { ttl: 100, max: 250 };
        let rotated = |r: Rotation| match r {
            Rotation::Rotated {
                token, expires_in, ..
            } => (token, expires_in),
            other => panic!("not rotated: {other:?}"),
        };
        let t = start_family(&db, "u1", 0, life).await.unwrap();
        let (t, left) = rotated(rotate(&db, &t, 90, life).await.unwrap());
        assert_eq!(left, 100);
        // The successor's life is cut to the family's end, at 250.
        let (t, left) = rotated(rotate(&db, &t, 180, life).await.unwrap());
        assert_eq!(left, 70);
        let (t, left) = rotated(rotate(&db, &t, 249, life).await.unwrap());
        assert_eq!(left, 1);
        assert_eq!(rotate(&db, &t, 250, life).await.unwrap(), Rotation::Invalid);

        // A token issued under longer settings ends with the current ones:
        // its own expiry (1000) is not yet, the family's end (250) is.
        let long = Lifetime {
            ttl: 1000,
            max: 5000,
        };
        let t = start_family(&db, "u1", 0, long).await.unwrap();
        assert_eq!(rotate(&db, &t, 300, life).await.unwrap(), Rotation::Invalid);
    }

    #[tokio::test]
    async fn expired_unknown_and_logged_out_tokens_are_invalid() {
        let db = db_with_user().await;
        let t = start_family(&db, "u1", 0, Lifetime { ttl: 100, ..LIFE })
            .await
            .unwrap();
        assert_eq!(
            rotate(&db, &t, 100, Lifetime { ttl: 100, ..LIFE })
                .await
                .unwrap(),
            Rotation::Invalid
        );
        assert_eq!(
            rotate(&db, &fresh().unwrap().token, 1, LIFE).await.unwrap(),
            Rotation::Invalid
        );
        assert_eq!(
            rotate(&db, "garbage", 1, LIFE).await.unwrap(),
            Rotation::Invalid
        );

        let t = start_family(&db, "u1", 0, LIFE).await.unwrap();
        let t2 = token(rotate(&db, &t, 1, LIFE).await.unwrap());
        // Logging out with the newest token revokes the family.
        assert!(logout(&db, &t2, 2).await.unwrap());
        assert_eq!(rotate(&db, &t2, 3, LIFE).await.unwrap(), Rotation::Invalid);
        assert!(!logout(&db, "garbage", 2).await.unwrap());
        assert!(!logout(&db, &fresh().unwrap().token, 2).await.unwrap());

        // Purging drops what expired and the families left empty.
        let purged = purge_expired(&db, TTL + 10).await.unwrap();
        assert_eq!(purged, 3);
        let families: i64 = sqlx::query_scalar("SELECT count(*) FROM refresh_families")
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(families, 0);
    }
}
