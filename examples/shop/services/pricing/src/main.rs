//! `shop-pricing`: quotes baskets for the reference shop.
//!
//! A function-shaped service: the runtime scales it from zero on demand, so
//! it starts with nothing to load (no database, no remote calls) and holds
//! no state between requests. The rules are in [`rules`].

mod api;
mod rules;

use std::process::ExitCode;

use flotilla_chassis::Service;
use flotilla_chassis::openapi::{error_response, error_schema};

#[tokio::main]
async fn main() -> ExitCode {
    flotilla_chassis::run_main("shop-pricing", run()).await
}

async fn run() -> Result<(), flotilla_chassis::Error> {
    let service = Service::from_env()?.with_openapi(openapi());
    service.serve(api::router()).await
}

/// The API description served at `/openapi.json`.
fn openapi() -> serde_json::Value {
    serde_json::json!({
        "openapi": "3.0.3",
        "info": {
            "title": "shop-pricing",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Quotes a basket: volume, order and coupon discounts, then 20 % VAT. Amounts are integer cents."
        },
        "paths": {
            "/api/pricing/quote": {
                "post": {
                    "operationId": "quote",
                    "summary": "Price a basket",
                    "requestBody": {
                        "required": true,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/QuoteRequest"}}}
                    },
                    "responses": {
                        "200": {"description": "The quote", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Quote"}}}},
                        "400": error_response("Invalid fields (including an unknown coupon)"),
                        "422": error_response("Body is not the expected JSON")
                    }
                }
            }
        },
        "components": {
            "schemas": {
                "QuoteRequest": {
                    "type": "object",
                    "required": ["items"],
                    "properties": {
                        "items": {"type": "array", "minItems": 1, "maxItems": 100, "items": {"$ref": "#/components/schemas/QuoteItem"}},
                        "currency": {"type": "string", "enum": ["EUR"], "default": "EUR"},
                        "coupon": {"type": "string", "nullable": true, "example": "WELCOME10"}
                    }
                },
                "QuoteItem": {
                    "type": "object",
                    "required": ["sku", "quantity", "unit_price_cents"],
                    "properties": {
                        "sku": {"type": "string", "maxLength": 64},
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 1000},
                        "unit_price_cents": {"type": "integer", "minimum": 0, "maximum": 100_000_000}
                    }
                },
                "QuoteLine": {
                    "type": "object",
                    "required": ["sku", "quantity", "unit_price_cents", "gross_cents", "discount_cents", "line_total_cents"],
                    "properties": {
                        "sku": {"type": "string"},
                        "quantity": {"type": "integer"},
                        "unit_price_cents": {"type": "integer"},
                        "gross_cents": {"type": "integer"},
                        "discount_cents": {"type": "integer"},
                        "line_total_cents": {"type": "integer"}
                    }
                },
                "Discount": {
                    "type": "object",
                    "required": ["code", "description", "amount_cents"],
                    "properties": {
                        "code": {"type": "string"},
                        "description": {"type": "string"},
                        "amount_cents": {"type": "integer"}
                    }
                },
                "Quote": {
                    "type": "object",
                    "required": ["lines", "subtotal_cents", "discount_cents", "tax_cents", "total_cents", "currency", "discounts"],
                    "properties": {
                        "lines": {"type": "array", "items": {"$ref": "#/components/schemas/QuoteLine"}},
                        "subtotal_cents": {"type": "integer", "description": "Sum of line totals (after volume discounts)"},
                        "discount_cents": {"type": "integer", "description": "Order-level discounts (order and coupon)"},
                        "tax_cents": {"type": "integer", "description": "20 % VAT on subtotal minus discount"},
                        "total_cents": {"type": "integer"},
                        "currency": {"type": "string"},
                        "coupon": {"type": "string", "nullable": true},
                        "discounts": {"type": "array", "items": {"$ref": "#/components/schemas/Discount"}}
                    }
                },
                "Error": error_schema()
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn openapi_lists_the_route() {
        let doc = super::openapi();
        assert_eq!(doc["openapi"], "3.0.3");
        assert!(doc["paths"]["/api/pricing/quote"]["post"].is_object());
    }
}
