//! The API description served at `/openapi.json`.

use flotilla_chassis::openapi::{error_response, error_schema};
use serde_json::{Value, json};

/// OpenAPI 3.0.3 for the orders routes.
pub fn document() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "shop-orders",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Places orders against the catalog's prices and pricing's quote (stock is inventory's, decided in the saga), then confirms or cancels them through the order saga (events from inventory and payments). Amounts are integer cents. Every /api route needs a bearer token: the gateway verifies it and passes the user as `x-flotilla-user-id`; orders belong to that user. `/events/*` are called by the broker only (push delivery)."
        },
        "paths": {
            "/api/orders": {
                "post": {
                    "operationId": "placeOrder",
                    "summary": "Place an order",
                    "parameters": [
                        {"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                         "description": "Makes the placement safe to retry: sent again with the same key and the same order, it answers with the order the key placed (201, `Idempotent-Replayed: true`) instead of placing a second one. One key per checkout, e.g. a UUID; each customer's keys are their own."}
                    ],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PlaceOrder"}}}},
                    "responses": {
                        "201": {
                            "description": "Placed (status `placed`); poll the Location for `confirmed` or `cancelled`",
                            "headers": {
                                "Location": {"description": "The order's URL", "schema": {"type": "string"}},
                                "Idempotent-Replayed": {"description": "`true` when this answers a retry with the order its Idempotency-Key placed before", "schema": {"type": "string", "enum": ["true"]}}
                            },
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Order"}}}
                        },
                        "400": error_response("Invalid fields, including an unknown coupon, or invalid_idempotency_key"),
                        "409": error_response("price_changed (details.total_cents is the new total)"),
                        "422": error_response("unknown_sku (details.skus), invalid_card (payment.card is not 12 to 19 digits), idempotency_key_reused (the key placed a different order, details.order_id), unpriceable (pricing cannot price these products, e.g. their currency), or a body that is not the expected JSON"),
                        "502": error_response("dependency_unavailable: catalog or pricing answered badly"),
                        "503": error_response("dependency_unavailable: catalog or pricing unreachable")
                    }
                },
                "get": {
                    "operationId": "listOrders",
                    "summary": "A customer's orders, newest first",
                    "parameters": [
                        {"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}}
                    ],
                    "responses": {
                        "200": {"description": "The orders", "content": {"application/json": {"schema": {
                            "type": "object",
                            "required": ["orders"],
                            "properties": {"orders": {"type": "array", "items": {"$ref": "#/components/schemas/Order"}}}
                        }}}},
                        "400": error_response("Invalid limit")
                    }
                }
            },
            "/events/stock": {
                "post": {
                    "operationId": "onStockEvent",
                    "summary": "Broker push: stock.rejected cancels a placed order (out_of_stock) and publishes order.cancelled",
                    "requestBody": {"required": true, "content": {"application/cloudevents+json": {"schema": {"type": "object"}}}},
                    "responses": {
                        "200": {"description": "Handled, duplicate, unchanged or ignored: acknowledged"},
                        "400": error_response("Not a CloudEvent, or data without order_id: dead-lettered"),
                        "415": error_response("Not application/cloudevents+json")
                    }
                }
            },
            "/events/payments": {
                "post": {
                    "operationId": "onPaymentEvent",
                    "summary": "Broker push: payment.succeeded confirms, payment.failed cancels (payment_declined) a placed order; publishes order.confirmed / order.cancelled",
                    "requestBody": {"required": true, "content": {"application/cloudevents+json": {"schema": {"type": "object"}}}},
                    "responses": {
                        "200": {"description": "Handled, duplicate, unchanged or ignored: acknowledged"},
                        "400": error_response("Not a CloudEvent, or data without order_id: dead-lettered"),
                        "415": error_response("Not application/cloudevents+json")
                    }
                }
            },
            "/api/orders/{id}": {
                "get": {
                    "operationId": "getOrder",
                    "summary": "One order",
                    "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"}}],
                    "responses": {
                        "200": {"description": "The order", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Order"}}}},
                        "404": error_response("No such order")
                    }
                }
            }
        },
        "components": {
            "schemas": {
                "PlaceOrder": {
                    "type": "object",
                    "required": ["items", "payment"],
                    "properties": {
                        "payment": {
                            "type": "object",
                            "required": ["card"],
                            "description": "A simulated test card: 4242 4242 4242 4242 succeeds, 4000 0000 0000 0002 declines, 4000 0000 0000 9995 has insufficient funds.",
                            "properties": {"card": {"type": "string", "pattern": "^[0-9 ]+$", "example": "4242 4242 4242 4242"}}
                        },
                        "items": {"type": "array", "minItems": 1, "maxItems": 100, "items": {
                            "type": "object",
                            "required": ["sku", "quantity"],
                            "properties": {
                                "sku": {"type": "string", "example": "sku-espresso"},
                                "quantity": {"type": "integer", "minimum": 1, "maximum": 1000}
                            }
                        }},
                        "expected_total_cents": {"type": "integer", "minimum": 0, "nullable": true},
                        "coupon": {"type": "string", "nullable": true, "example": "WELCOME10"}
                    }
                },
                "OrderLine": {
                    "type": "object",
                    "required": ["sku", "name", "quantity", "unit_price_cents", "discount_cents", "line_total_cents"],
                    "properties": {
                        "sku": {"type": "string"},
                        "name": {"type": "string"},
                        "quantity": {"type": "integer"},
                        "unit_price_cents": {"type": "integer"},
                        "discount_cents": {"type": "integer"},
                        "line_total_cents": {"type": "integer"}
                    }
                },
                "Order": {
                    "type": "object",
                    "required": ["id", "customer", "status", "currency", "lines", "subtotal_cents", "discount_cents", "tax_cents", "total_cents", "created_at", "history"],
                    "properties": {
                        "id": {"type": "string", "format": "uuid"},
                        "customer": {"type": "string", "description": "The id of the user who placed it (the token's sub)"},
                        "status": {"type": "string", "enum": ["placed", "confirmed", "cancelled"]},
                        "reason": {"type": "string", "enum": ["out_of_stock", "payment_declined", "timed_out"], "description": "Why it was cancelled (`timed_out`: still `placed` after ORDERS_SAGA_TIMEOUT); absent otherwise"},
                        "card_last4": {"type": "string", "nullable": true},
                        "history": {"type": "array", "description": "Every status it went through, oldest first", "items": {
                            "type": "object",
                            "required": ["status", "at"],
                            "properties": {
                                "status": {"type": "string"},
                                "reason": {"type": "string"},
                                "at": {"type": "string", "format": "date-time"}
                            }
                        }},
                        "currency": {"type": "string"},
                        "coupon": {"type": "string", "nullable": true},
                        "lines": {"type": "array", "items": {"$ref": "#/components/schemas/OrderLine"}},
                        "subtotal_cents": {"type": "integer"},
                        "discount_cents": {"type": "integer"},
                        "tax_cents": {"type": "integer"},
                        "total_cents": {"type": "integer"},
                        "created_at": {"type": "string", "format": "date-time"}
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
    fn lists_every_route() {
        let doc = super::document();
        assert_eq!(doc["openapi"], "3.0.3");
        assert!(doc["paths"]["/api/orders"]["post"].is_object());
        assert!(doc["paths"]["/api/orders"]["get"].is_object());
        assert!(doc["paths"]["/api/orders/{id}"]["get"].is_object());
        assert!(doc["paths"]["/events/stock"]["post"].is_object());
        assert!(doc["paths"]["/events/payments"]["post"].is_object());
    }
}
