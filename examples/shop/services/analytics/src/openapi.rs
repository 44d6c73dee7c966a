//! The API description served at `/openapi.json`.

use serde_json::{Value, json};

/// OpenAPI 3.0.3 for the analytics routes.
pub fn document() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "shop-analytics",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Units and revenue per product from confirmed orders (stream `order-analytics`). Revenue is what each line cost at order time (after its volume discount), before order-level discounts and tax; each order counts once, however many copies of its event the stream holds. Amounts are integer cents."
        },
        "paths": {
            "/api/analytics/sales": {
                "get": {
                    "operationId": "getSales",
                    "summary": "Sales per product, best revenue first",
                    "responses": {
                        "200": {"description": "The sales", "content": {"application/json": {"schema": {
                            "type": "object",
                            "required": ["products", "units", "revenue"],
                            "properties": {
                                "products": {"type": "array", "items": {"$ref": "#/components/schemas/ProductSales"}},
                                "units": {"type": "integer"},
                                "revenue": {
                                    "description": "The revenue per currency (cents of different currencies are not added)",
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["currency", "revenue_cents"],
                                        "properties": {"currency": {"type": "string"}, "revenue_cents": {"type": "integer"}}
                                    }
                                }
                            }
                        }}}}
                    }
                }
            }
        },
        "components": {
            "schemas": {
                "ProductSales": {
                    "type": "object",
                    "required": ["sku", "currency", "units", "revenue_cents", "orders"],
                    "properties": {
                        "sku": {"type": "string"},
                        "currency": {"type": "string"},
                        "units": {"type": "integer"},
                        "revenue_cents": {"type": "integer"},
                        "orders": {"type": "integer", "description": "Confirmed orders containing it"}
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn lists_every_route() {
        let doc = super::document();
        assert_eq!(doc["openapi"], "3.0.3");
        assert!(doc["paths"]["/api/analytics/sales"]["get"].is_object());
    }
}
