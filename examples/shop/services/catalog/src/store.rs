//! The catalog's queries. Runtime-checked `sqlx::query_as` with binds (no
//! compile-time macros: building must not need a database).

use serde::{Deserialize, Serialize};
use sqlx::{SqliteConnection, SqlitePool};

/// A product as stored and as served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Product {
    /// The SKU.
    pub id: String,
    pub name: String,
    pub description: String,
    pub price_cents: i64,
    pub currency: String,
    /// Units available, as inventory last announced them (a copy that may
    /// lag behind inventory for a moment, never move backwards).
    pub stock: i64,
    /// The inventory version `stock` is from; 0 for the seeded figure.
    pub stock_version: i64,
    pub category: String,
    /// Relative URL of an image, served with the web UI.
    pub image: Option<String>,
}

/// A validated product search.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Search {
    /// Text to find in name, description or category, its ASCII letters
    /// lower-cased (as SQLite's lower() folds the columns).
    pub text: Option<String>,
    /// Category to match exactly, its ASCII letters lower-cased.
    pub category: Option<String>,
    pub limit: i64,
    pub offset: i64,
}

/// One page of a search and how many products match in all.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub products: Vec<Product>,
    pub total: i64,
    pub limit: i64,
    pub offset: i64,
}

// SQLite's lower() folds ASCII only, so matching is case-insensitive for
// ASCII letters; instr() avoids LIKE's wildcard escaping.
// Macros rather than consts so queries stay `&'static str` literals.
macro_rules! filter {
    () => {
        " (?1 IS NULL
              OR instr(lower(name), ?1) > 0
              OR instr(lower(description), ?1) > 0
              OR instr(lower(category), ?1) > 0)
          AND (?2 IS NULL OR lower(category) = ?2) "
    };
}

macro_rules! columns {
    () => {
        " id, name, description, price_cents, currency, stock, stock_version, category, image "
    };
}

/// Products matching `search`, ordered by name then SKU for stable pages.
pub async fn search(db: &SqlitePool, search: &Search) -> Result<Page, sqlx::Error> {
    let products = sqlx::query_as::<_, Product>(concat!(
        "SELECT",
        columns!(),
        "FROM products WHERE",
        filter!(),
        "ORDER BY name, id LIMIT ?3 OFFSET ?4"
    ))
    .bind(&search.text)
    .bind(&search.category)
    .bind(search.limit)
    .bind(search.offset)
    .fetch_all(db)
    .await?;
    let total: i64 = sqlx::query_scalar(concat!("SELECT count(*) FROM products WHERE", filter!()))
        .bind(&search.text)
        .bind(&search.category)
        .fetch_one(db)
        .await?;
    Ok(Page {
        products,
        total,
        limit: search.limit,
        offset: search.offset,
    })
}

/// One product by SKU.
pub async fn get(db: &SqlitePool, id: &str) -> Result<Option<Product>, sqlx::Error> {
    sqlx::query_as::<_, Product>(concat!("SELECT", columns!(), "FROM products WHERE id = ?1"))
        .bind(id)
        .fetch_optional(db)
        .await
}

/// One SKU's availability as inventory's events carry it (`levels`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Level {
    pub sku: String,
    pub available: i64,
    pub version: i64,
}

/// What applying a [`Level`] came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The figure now shows the level.
    Updated,
    /// The figure is from this version or a newer one: nothing changed.
    Stale,
    /// The catalog has no such product: nothing changed.
    UnknownSku,
}

/// Sets a product's stock figure to `level`, if `level` is newer than the
/// figure, on `conn` (the event handler's transaction). The version check
/// is in the `UPDATE` itself, so of two replicas applying levels of the
/// same SKU the newer one wins whatever the order.
pub async fn apply_level(
    conn: &mut SqliteConnection,
    level: &Level,
) -> Result<Applied, sqlx::Error> {
    let updated = sqlx::query(
        "UPDATE products SET stock = ?2, stock_version = ?3
         WHERE id = ?1 AND stock_version < ?3",
    )
    .bind(&level.sku)
    .bind(level.available)
    .bind(level.version)
    .execute(&mut *conn)
    .await?;
    if updated.rows_affected() == 1 {
        return Ok(Applied::Updated);
    }
    let known: Option<i64> = sqlx::query_scalar("SELECT 1 FROM products WHERE id = ?1")
        .bind(&level.sku)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(if known.is_some() {
        Applied::Stale
    } else {
        Applied::UnknownSku
    })
}
