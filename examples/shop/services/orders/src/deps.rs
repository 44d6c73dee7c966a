//! Calls to the services orders depends on (`calls = ["catalog", "pricing"]`
//! in flotilla.toml), with just the fields orders reads from their answers.

use axum::http::StatusCode;
use flotilla_chassis::{Client, Error};
use serde::{Deserialize, Serialize};

/// The part of a catalog product orders needs.
#[derive(Debug, Clone, Deserialize)]
pub struct Product {
    pub id: String,
    pub name: String,
    pub price_cents: i64,
    pub currency: String,
}

/// The product with SKU `sku`, `None` if the catalog does not know it.
pub async fn product(catalog: &Client, sku: &str) -> Result<Option<Product>, Error> {
    // SKUs are validated to URL-safe characters before this is called.
    // Without reviews: the catalog would otherwise wait on the reviews
    // service for each line, which an order has no use for.
    match catalog
        .get_json::<Product>(&format!("/api/catalog/products/{sku}?reviews=false"))
        .await
    {
        Ok(product) => Ok(Some(product)),
        Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => Ok(None),
        Err(e) => Err(e),
    }
}

#[derive(Debug, Serialize)]
struct QuoteRequest<'a> {
    items: Vec<QuoteItem<'a>>,
    currency: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    coupon: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct QuoteItem<'a> {
    sku: &'a str,
    quantity: i64,
    unit_price_cents: i64,
}

/// The part of a pricing quote orders stores.
#[derive(Debug, Clone, Deserialize)]
pub struct Quote {
    pub lines: Vec<QuoteLine>,
    pub subtotal_cents: i64,
    pub discount_cents: i64,
    pub tax_cents: i64,
    pub total_cents: i64,
    pub currency: String,
    #[serde(default)]
    pub coupon: Option<String>,
}

/// One priced line of a quote.
#[derive(Debug, Clone, Deserialize)]
pub struct QuoteLine {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
    pub discount_cents: i64,
    pub line_total_cents: i64,
}

/// Asks pricing to quote `lines` (product, quantity) at the catalog's
/// prices.
pub async fn quote(
    pricing: &Client,
    lines: &[(Product, i64)],
    currency: &str,
    coupon: Option<&str>,
) -> Result<Quote, Error> {
    let request = QuoteRequest {
        items: lines
            .iter()
            .map(|(product, quantity)| QuoteItem {
                sku: &product.id,
                quantity: *quantity,
                unit_price_cents: product.price_cents,
            })
            .collect(),
        currency,
        coupon,
    };
    pricing.post_json("/api/pricing/quote", &request).await
}
