//! The users table: one row per account, found by id or normalised e-mail.

use serde::Serialize;
use sqlx::SqlitePool;

/// A user as served (never with the password hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct User {
    pub id: String,
    pub email: String,
    pub name: Option<String>,
    pub created_at: String,
}

/// Stores `user`; `Ok(false)` when the e-mail address is taken.
pub async fn insert(
    db: &SqlitePool,
    user: &User,
    password_hash: &str,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO users (id, email, name, password_hash, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .bind(&user.id)
    .bind(&user.email)
    .bind(&user.name)
    .bind(password_hash)
    .bind(&user.created_at)
    .execute(db)
    .await;
    match inserted {
        Ok(_) => Ok(true),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(false),
        Err(e) => Err(e),
    }
}

/// The user with `email` (normalised) and their password hash.
pub async fn by_email(db: &SqlitePool, email: &str) -> Result<Option<(User, String)>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        user: User,
        password_hash: String,
    }
    let row = sqlx::query_as::<_, Row>(
        "SELECT id, email, name, created_at, password_hash FROM users WHERE email = ?1 COLLATE NOCASE",
    )
    .bind(email)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|r| (r.user, r.password_hash)))
}

/// The user with `id`.
pub async fn by_id(db: &SqlitePool, id: &str) -> Result<Option<User>, sqlx::Error> {
    sqlx::query_as::<_, User>("SELECT id, email, name, created_at FROM users WHERE id = ?1")
        .bind(id)
        .fetch_optional(db)
        .await
}
