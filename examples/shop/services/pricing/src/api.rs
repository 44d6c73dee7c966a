//! `POST /api/pricing/quote`: request validation and the JSON shapes around
//! [`crate::rules`].

use axum::Router;
use axum::routing::post;
use flotilla_chassis::{ApiError, ApiJson, FieldError};
use serde::{Deserialize, Serialize};

use crate::rules::{self, Item, Line};

/// The only currency quoted: the VAT rule is a euro-area rule.
pub const CURRENCY: &str = "EUR";
/// Most lines in one quote.
pub const MAX_LINES: usize = 100;
/// Most of one item in one line.
pub const MAX_QUANTITY: i64 = 1000;
/// Highest unit price, cents (1 000 000.00): keeps the arithmetic exact.
pub const MAX_UNIT_PRICE_CENTS: i64 = 100_000_000;
/// Longest SKU.
pub const MAX_SKU_LEN: usize = 64;

/// The request body. Numbers are signed so that a negative quantity is a
/// field error rather than a JSON error.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct QuoteRequest {
    pub items: Vec<QuoteItem>,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub coupon: Option<String>,
}

/// One requested line.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct QuoteItem {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

/// The response body.
#[derive(Debug, Clone, Serialize)]
pub struct Quote {
    pub lines: Vec<Line>,
    pub subtotal_cents: i64,
    pub discount_cents: i64,
    pub tax_cents: i64,
    pub total_cents: i64,
    pub currency: &'static str,
    /// The coupon applied, normalised, if any.
    pub coupon: Option<&'static str>,
    /// Order-level discounts, itemised.
    pub discounts: Vec<Discount>,
}

/// One order-level discount.
#[derive(Debug, Clone, Serialize)]
pub struct Discount {
    pub code: &'static str,
    pub description: String,
    pub amount_cents: i64,
}

/// The service's routes.
pub fn router() -> Router {
    Router::new()
        .route("/api/pricing/quote", post(quote))
        .fallback(flotilla_chassis::not_found)
}

async fn quote(ApiJson(request): ApiJson<QuoteRequest>) -> Result<axum::Json<Quote>, ApiError> {
    let (items, coupon) = validate(&request).map_err(ApiError::validation)?;
    let totals = rules::price(&items, coupon);
    let mut discounts = Vec::new();
    if totals.order_discount_cents > 0 {
        discounts.push(Discount {
            code: "order_over_100",
            description: format!(
                "{} % off orders of {}.00 {CURRENCY} or more",
                rules::ORDER_PERCENT,
                rules::ORDER_THRESHOLD_CENTS / 100
            ),
            amount_cents: totals.order_discount_cents,
        });
    }
    if let Some(c) = coupon {
        discounts.push(Discount {
            code: c.code,
            description: format!("coupon {}: {} % off", c.code, c.percent),
            amount_cents: totals.coupon_discount_cents,
        });
    }
    Ok(axum::Json(Quote {
        lines: totals.lines,
        subtotal_cents: totals.subtotal_cents,
        discount_cents: totals.discount_cents,
        tax_cents: totals.tax_cents,
        total_cents: totals.total_cents,
        currency: CURRENCY,
        coupon: coupon.map(|c| c.code),
        discounts,
    }))
}

/// Checks every field, reporting all problems at once.
fn validate(request: &QuoteRequest) -> Result<(Vec<Item>, Option<rules::Coupon>), Vec<FieldError>> {
    let mut errors = Vec::new();
    if request.items.is_empty() || request.items.len() > MAX_LINES {
        errors.push(FieldError::new(
            "items",
            format!("must contain 1 to {MAX_LINES} lines"),
        ));
    }
    for (i, item) in request.items.iter().enumerate().take(MAX_LINES) {
        let sku = item.sku.trim();
        if sku.is_empty() || sku.len() > MAX_SKU_LEN {
            errors.push(FieldError::new(
                format!("items[{i}].sku"),
                format!("must be 1 to {MAX_SKU_LEN} characters"),
            ));
        }
        if !(1..=MAX_QUANTITY).contains(&item.quantity) {
            errors.push(FieldError::new(
                format!("items[{i}].quantity"),
                format!("must be between 1 and {MAX_QUANTITY}"),
            ));
        }
        if !(0..=MAX_UNIT_PRICE_CENTS).contains(&item.unit_price_cents) {
            errors.push(FieldError::new(
                format!("items[{i}].unit_price_cents"),
                format!("must be between 0 and {MAX_UNIT_PRICE_CENTS}"),
            ));
        }
    }
    match request.currency.as_deref() {
        None | Some(CURRENCY) => {}
        Some(other) => errors.push(FieldError::new(
            "currency",
            format!("only {CURRENCY} is quoted, not {other:?}"),
        )),
    }
    let coupon = match request.coupon.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(code) => match rules::coupon(code) {
            Some(c) => Some(c),
            None => {
                errors.push(FieldError::new(
                    "coupon",
                    format!("unknown coupon {code:?}"),
                ));
                None
            }
        },
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    let items = request
        .items
        .iter()
        .map(|i| Item {
            sku: i.sku.trim().to_owned(),
            quantity: i.quantity,
            unit_price_cents: i.unit_price_cents,
        })
        .collect();
    Ok((items, coupon))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{Body, to_bytes};
    use axum::http::{Request, StatusCode};
    use serde_json::{Value, json};
    use tower::ServiceExt;

    async fn post_quote(body: Value) -> (StatusCode, Value) {
        let res = router()
            .oneshot(
                Request::post("/api/pricing/quote")
                    .header("content-type", "application/json")
                    .body(Body::from(body.to_string()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = res.status();
        let bytes = to_bytes(res.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn quotes_with_every_rule() {
        let (status, q) = post_quote(json!({
            "items": [
                {"sku": "sku-grinder", "quantity": 1, "unit_price_cents": 12900},
                {"sku": "sku-espresso", "quantity": 3, "unit_price_cents": 899}
            ],
            "currency": "EUR",
            "coupon": "WELCOME10"
        }))
        .await;
        assert_eq!(status, StatusCode::OK, "{q}");
        // espresso: 2697 gross, 269.7 → 270 off, 2427
        assert_eq!(q["lines"][1]["discount_cents"], 270);
        assert_eq!(q["lines"][1]["line_total_cents"], 2427);
        assert_eq!(q["lines"][0]["discount_cents"], 0);
        // subtotal 15 327; 5 % = 766.35 → 766; 14 561; 10 % = 1456.1 → 1456
        assert_eq!(q["subtotal_cents"], 15327);
        assert_eq!(q["discount_cents"], 766 + 1456);
        // net 13 105; VAT 2621
        assert_eq!(q["tax_cents"], 2621);
        assert_eq!(q["total_cents"], 15726);
        assert_eq!(q["currency"], "EUR");
        assert_eq!(q["coupon"], "WELCOME10");
        assert_eq!(q["discounts"].as_array().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn currency_defaults_to_eur_and_coupon_is_optional() {
        let (status, q) = post_quote(json!({
            "items": [{"sku": "a", "quantity": 2, "unit_price_cents": 450}]
        }))
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(q["total_cents"], 1080);
        assert_eq!(q["coupon"], Value::Null);
    }

    #[tokio::test]
    async fn unknown_coupon_is_a_field_error() {
        let (status, e) = post_quote(json!({
            "items": [{"sku": "a", "quantity": 1, "unit_price_cents": 100}],
            "coupon": "FREEBIE"
        }))
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(e["error"]["code"], "invalid_request");
        assert_eq!(e["error"]["fields"][0]["field"], "coupon");
    }

    #[tokio::test]
    async fn every_invalid_field_is_reported() {
        let (status, e) = post_quote(json!({
            "items": [
                {"sku": "", "quantity": 0, "unit_price_cents": -1},
                {"sku": "b", "quantity": 1001, "unit_price_cents": 1}
            ],
            "currency": "USD"
        }))
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let fields: Vec<&str> = e["error"]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["field"].as_str().unwrap())
            .collect();
        assert_eq!(
            fields,
            [
                "items[0].sku",
                "items[0].quantity",
                "items[0].unit_price_cents",
                "items[1].quantity",
                "currency"
            ]
        );
    }

    #[tokio::test]
    async fn empty_and_oversized_orders_are_rejected() {
        let (status, e) = post_quote(json!({"items": []})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(e["error"]["fields"][0]["field"], "items");

        let items: Vec<Value> = (0..101)
            .map(|i| json!({"sku": format!("s{i}"), "quantity": 1, "unit_price_cents": 1}))
            .collect();
        let (status, e) = post_quote(json!({ "items": items })).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(e["error"]["fields"][0]["field"], "items");
    }

    #[tokio::test]
    async fn malformed_json_gets_the_common_error_shape() {
        let (status, e) = post_quote(json!({"items": "nope"})).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e["error"]["code"], "invalid_json");
    }
}
