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
//! A token presented again within [`Lifetime::reuse_grace`] of its
//! rotation, while its successor is still unused, is a retry, not a theft:
//! the answer to the first use was lost (a dropped connection, a phone
//! going into a tunnel), or two tabs of one browser refreshed at once. It
//! gets a new successor, and the one it had is superseded: presenting that
//! one is reuse. So there is still only one live token per family, and a
//! thief who replays a token within the grace is caught as soon as the
//! holder of the superseded successor presents it (Auth0's reuse interval
//! and Okta's grace period, without their second live token).
//!
//! Each rotation runs in one `BEGIN IMMEDIATE` transaction, so two requests
//! racing with the same token are taken one after the other: the second
//! is a retry within the grace, or reuse.

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
    /// For how many seconds after its rotation a token presented again is
    /// taken as a retry of that rotation rather than as reuse (0: never).
    pub reuse_grace: i64,
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
    /// `retry`: it had been spent within the reuse grace, and the
    /// successor it got then is superseded by this one.
    Rotated {
        user_id: String,
        token: String,
        expires_in: i64,
        retry: bool,
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
    superseded_at: Option<i64>,
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
        "SELECT t.family_id, t.expires_at, t.used_at, t.superseded_at, f.user_id, f.revoked_at,
                f.created_at
         FROM refresh_tokens t JOIN refresh_families f ON f.id = t.family_id
         WHERE t.token_hash = ?1",
    )
    .bind(&hash)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(p) = presented else {
        return Ok(Rotation::Invalid);
    };
    let expires_at = life.expiry(p.created_at, now);
    // Past the family's end: its last token may still be unexpired when
    // it was issued under a longer `max`.
    let ended = p.revoked_at.is_some() || p.expires_at <= now || expires_at <= now;
    let retry = match p.used_at {
        None if p.superseded_at.is_none() => false,
        Some(used) if p.superseded_at.is_none() && !ended && now - used < life.reuse_grace => {
            // A retry only while the successor it got is unused: once that
            // was presented, its holder has the session and this is reuse.
            let successor = sqlx::query_scalar::<_, Vec<u8>>(
                "SELECT token_hash FROM refresh_tokens
                 WHERE family_id = ?1 AND parent_hash = ?2
                   AND used_at IS NULL AND superseded_at IS NULL",
            )
            .bind(&p.family_id)
            .bind(&hash)
            .fetch_optional(&mut *tx)
            .await?;
            match successor {
                Some(successor) => {
                    sqlx::query(
                        "UPDATE refresh_tokens SET superseded_at = ?2 WHERE token_hash = ?1",
                    )
                    .bind(&successor)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    true
                }
                None => {
                    revoke(&mut tx, &p.family_id, now, "reuse").await?;
                    tx.commit().await?;
                    return Ok(Rotation::Reused { user_id: p.user_id });
                }
            }
        }
        // Spent, or superseded (never meant to be used): reuse.
        _ => {
            revoke(&mut tx, &p.family_id, now, "reuse").await?;
            tx.commit().await?;
            return Ok(Rotation::Reused { user_id: p.user_id });
        }
    };
    if ended {
        return Ok(Rotation::Invalid);
    }
    if !retry {
        sqlx::query("UPDATE refresh_tokens SET used_at = ?2 WHERE token_hash = ?1")
            .bind(&hash)
            .bind(now)
            .execute(&mut *tx)
            .await?;
    }
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
        retry,
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
    const GRACE: i64 = 10;
    const LIFE: Lifetime = Lifetime {
        ttl: TTL,
        max: 90 * 86_400,
        reuse_grace: GRACE,
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
        // Without a grace: one rotates, the other is reuse.
        let no_grace = Lifetime {
            reuse_grace: 0,
            ..LIFE
        };
        let t = start_family(&db, "u1", 0, no_grace).await.unwrap();
        let (a, b) = tokio::join!(rotate(&db, &t, 1, no_grace), rotate(&db, &t, 1, no_grace));
        let outcomes = [a.unwrap(), b.unwrap()];
        let rotated = outcomes
            .iter()
            .filter(|o| matches!(o, Rotation::Rotated { retry: false, .. }))
            .count();
        let reused = outcomes
            .iter()
            .filter(|o| matches!(o, Rotation::Reused { .. }))
            .count();
        assert_eq!((rotated, reused), (1, 1), "{outcomes:?}");

        // With one (two tabs at once): one rotates, the other retries, and
        // only the retry's token lives on.
        let t = start_family(&db, "u1", 0, LIFE).await.unwrap();
        let (a, b) = tokio::join!(rotate(&db, &t, 1, LIFE), rotate(&db, &t, 1, LIFE));
        let (mut first, mut retried) = (None, None);
        for outcome in [a.unwrap(), b.unwrap()] {
            match outcome {
                Rotation::Rotated {
                    token,
                    retry: false,
                    ..
                } if first.is_none() => first = Some(token),
                Rotation::Rotated {
                    token, retry: true, ..
                } if retried.is_none() => retried = Some(token),
                other => panic!("{other:?}"),
            }
        }
        let (first, retried) = (first.unwrap(), retried.unwrap());
        token(rotate(&db, &retried, 2, LIFE).await.unwrap());
        assert!(matches!(
            rotate(&db, &first, 3, LIFE).await.unwrap(),
            Rotation::Reused { .. }
        ));
    }

    fn retried(r: Rotation) -> String {
        match r {
            Rotation::Rotated {
                token, retry: true, ..
            } => token,
            other => panic!("not a retry: {other:?}"),
        }
    }

    /// A token presented again within the grace, its successor unused, gets
    /// a new successor; the one it had is superseded and is reuse from then
    /// on. Once the successor was used, or past the grace, it is reuse.
    #[tokio::test]
    async fn a_retry_within_the_grace_supersedes_the_successor() {
        let db = db_with_user().await;
        let t1 = start_family(&db, "u1", 0, LIFE).await.unwrap();
        let t2 = token(rotate(&db, &t1, 100, LIFE).await.unwrap());
        let t2b = retried(rotate(&db, &t1, 105, LIFE).await.unwrap());
        // The grace counts from the rotation, not from the last retry.
        let t2c = retried(rotate(&db, &t1, 100 + GRACE - 1, LIFE).await.unwrap());
        assert!(t2 != t2b && t2b != t2c && t2 != t2c);
        let t3 = token(rotate(&db, &t2c, 111, LIFE).await.unwrap());
        // t2c was used: t1 again is reuse, though within its grace.
        assert!(matches!(
            rotate(&db, &t1, 111, LIFE).await.unwrap(),
            Rotation::Reused { .. }
        ));
        assert_eq!(
            rotate(&db, &t3, 112, LIFE).await.unwrap(),
            Rotation::Invalid
        );

        // Past the grace: reuse.
        let u1 = start_family(&db, "u1", 0, LIFE).await.unwrap();
        let u2 = token(rotate(&db, &u1, 0, LIFE).await.unwrap());
        assert!(matches!(
            rotate(&db, &u1, GRACE, LIFE).await.unwrap(),
            Rotation::Reused { .. }
        ));
        assert_eq!(
            rotate(&db, &u2, GRACE, LIFE).await.unwrap(),
            Rotation::Invalid
        );

        // A superseded successor presented, even at once: reuse, and the
        // retry's token goes with the family (one of the two holders is
        // not who they say).
        let v1 = start_family(&db, "u1", 0, LIFE).await.unwrap();
        let v2 = token(rotate(&db, &v1, 0, LIFE).await.unwrap());
        let v2b = retried(rotate(&db, &v1, 1, LIFE).await.unwrap());
        assert!(matches!(
            rotate(&db, &v2, 2, LIFE).await.unwrap(),
            Rotation::Reused { .. }
        ));
        assert_eq!(rotate(&db, &v2b, 3, LIFE).await.unwrap(), Rotation::Invalid);
        // And a retry of a revoked family's token is not one.
        assert!(matches!(
            rotate(&db, &v1, 4, LIFE).await.unwrap(),
            Rotation::Reused { .. }
        ));
    }

    #[tokio::test]
    async fn a_family_ends_at_its_maximum_however_often_it_is_refreshed() {
        let db = db_with_user().await;
        let life = Lifetime {
            ttl: 100,
            max: 250,
            ..LIFE
        };
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
            ..LIFE
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
