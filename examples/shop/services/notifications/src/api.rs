//! The notifications HTTP API: the signed-in customer's messages.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use flotilla_chassis::{ApiError, ApiQuery, FieldError};
use serde::{Deserialize, Serialize};
use sqlx::SqlitePool;

use crate::customer::Customer;
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
    customer: Customer,
    ApiQuery(params): ApiQuery<Params>,
) -> Result<axum::Json<List>, ApiError> {
    let limit = match params.limit.as_deref().map(str::trim) {
        None | Some("") => DEFAULT_LIMIT,
        Some(raw) => match raw.parse::<i64>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::validation(vec![FieldError::new(
                    "limit",
                    format!("must be a whole number from 1 to {MAX_LIMIT}"),
                )]));
            }
        },
    };
    let notifications = store::for_customer(&db, customer.as_str(), limit).await?;
    Ok(axum::Json(List { notifications }))
}
