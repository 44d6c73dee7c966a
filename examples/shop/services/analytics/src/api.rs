//! The analytics HTTP API: sales per product (public, read only).

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use flotilla_chassis::ApiError;
use serde::Serialize;
use sqlx::SqlitePool;

use crate::store::{self, ProductSales};

/// The routes.
pub fn router(db: SqlitePool) -> Router {
    Router::new()
        .route("/api/analytics/sales", get(sales))
        .fallback(flotilla_chassis::not_found)
        .with_state(db)
}

#[derive(Debug, Serialize)]
struct Sales {
    products: Vec<ProductSales>,
    units: i64,
    revenue_cents: i64,
}

/// `GET /api/analytics/sales`: units and revenue per product, best revenue
/// first, with the totals.
async fn sales(State(db): State<SqlitePool>) -> Result<axum::Json<Sales>, ApiError> {
    let products = store::sales(&db).await?;
    Ok(axum::Json(Sales {
        units: products.iter().map(|p| p.units).sum(),
        revenue_cents: products.iter().map(|p| p.revenue_cents).sum(),
        products,
    }))
}
