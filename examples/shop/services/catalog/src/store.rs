//! The catalog's queries. Runtime-checked `sqlx::query_as` with binds (no
//! compile-time macros: building must not need a database).

use serde::Serialize;
use sqlx::SqlitePool;

/// A product as stored and as served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Product {
    /// The SKU.
    pub id: String,
    pub name: String,
    pub description: String,
    pub price_cents: i64,
    pub currency: String,
    pub stock: i64,
    pub category: String,
    /// Relative URL of an image, served with the web UI.
    pub image: Option<String>,
}

/// A validated product search.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Search {
    /// Lower-cased text to find in name, description or category.
    pub text: Option<String>,
    /// Lower-cased category to match exactly.
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
        " id, name, description, price_cents, currency, stock, category, image "
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
