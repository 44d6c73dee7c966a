//! The notifications HTTP API: the signed-in customer's messages.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use flotilla_chassis::{ApiError, ApiQuery, VerifiedUser, int_param};
use serde::{Deserialize, Serialize};
use sqlx::SqlitePool;

use crate::store::{self, Notification};

/// Messages listed when `limit` is absent, and at most.
pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 200;

/// The routes.
pub fn router(db: SqlitePool) -> Router {
    Router::new()
        .route("/api/notifications", get(list))
        .fallback(flotilla_chassis::not_found)
        .with_state(db)
}

#[derive(Debug, Deserialize)]
struct Params {
    limit: Option<String>,
}

#[derive(Debug, Serialize)]
struct List {
    notifications: Vec<Notification>,
}

/// `GET /api/notifications`: newest first.
async fn list(
    State(db): State<SqlitePool>,
    customer: VerifiedUser,
    ApiQuery(params): ApiQuery<Params>,
) -> Result<axum::Json<List>, ApiError> {
    let limit = int_param(
        "limit",
        params.limit.as_deref(),
        DEFAULT_LIMIT,
        1..=MAX_LIMIT,
    )
    .map_err(|e| ApiError::validation(vec![e]))?;
    let notifications = store::for_customer(&db, customer.as_str(), limit).await?;
    Ok(axum::Json(List { notifications }))
}
