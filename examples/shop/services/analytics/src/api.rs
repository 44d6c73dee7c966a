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
    /// The revenue per currency: cents of different currencies do not add.
    revenue: Vec<Revenue>,
}

#[derive(Debug, PartialEq, Serialize)]
struct Revenue {
    currency: String,
    revenue_cents: i64,
}

/// `GET /api/analytics/sales`: units and revenue per product, best revenue
/// first, with the totals.
async fn sales(State(db): State<SqlitePool>) -> Result<axum::Json<Sales>, ApiError> {
    let products = store::sales(&db).await?;
    Ok(axum::Json(Sales {
        units: products.iter().map(|p| p.units).sum(),
        revenue: revenue_by_currency(&products),
        products,
    }))
}

/// The products' revenue summed per currency, in currency order.
fn revenue_by_currency(products: &[ProductSales]) -> Vec<Revenue> {
    let mut totals = std::collections::BTreeMap::<&str, i64>::new();
    for p in products {
        *totals.entry(&p.currency).or_default() += p.revenue_cents;
    }
    totals
        .into_iter()
        .map(|(currency, revenue_cents)| Revenue {
            currency: currency.to_owned(),
            revenue_cents,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revenue_is_summed_per_currency() {
        let sale = |sku: &str, currency: &str, revenue_cents| ProductSales {
            sku: sku.into(),
            currency: currency.into(),
            units: 1,
            revenue_cents,
            orders: 1,
        };
        let products = [
            sale("sku-a", "EUR", 500),
            sale("sku-b", "USD", 300),
            sale("sku-c", "EUR", 200),
        ];
        assert_eq!(
            revenue_by_currency(&products),
            [
                Revenue {
                    currency: "EUR".into(),
                    revenue_cents: 700
                },
                Revenue {
                    currency: "USD".into(),
                    revenue_cents: 300
                },
            ]
        );
    }
}
