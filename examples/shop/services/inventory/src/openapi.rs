//! The API description served at `/openapi.json`.

use flotilla_chassis::openapi::{error_response, error_schema};
use serde_json::{Value, json};

/// OpenAPI 3.0.3 for the inventory routes.
pub fn document() -> Value {
    let event_body = json!({"required": true, "content": {"application/cloudevents+json": {"schema": {"$ref": "#/components/schemas/CloudEvent"}}}});
    let handled = json!({"description": "Handled (or a duplicate, or nothing to do): acknowledged", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Handled"}}}});
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "shop-inventory",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Stock levels and per-order reservations for the order saga. `/events/*` are called by the broker only (push delivery); a 4xx dead-letters the event, a 5xx has it retried."
        },
        "paths": {
            "/api/inventory/{sku}": {
                "get": {
                    "operationId": "getStock",
                    "summary": "A SKU's available and reserved units",
                    "parameters": [{"name": "sku", "in": "path", "required": true, "schema": {"type": "string"}}],
                    "responses": {
                        "200": {"description": "The levels", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Stock"}}}},
                        "404": error_response("No stock is kept for that SKU")
                    }
                }
            },
            "/events/orders": {
                "post": {
                    "operationId": "onOrderEvent",
                    "summary": "order.placed: reserve every item or none; publishes stock.reserved or stock.rejected. order.cancelled: release what the order holds, reserved or committed (stock.released); before its order.placed, see that it is never reserved",
                    "requestBody": event_body.clone(),
                    "responses": {"200": handled.clone(), "400": error_response("Not a CloudEvent, or data not an order.placed / order.cancelled"), "415": error_response("Not application/cloudevents+json")}
                }
            },
            "/events/payments": {
                "post": {
                    "operationId": "onPaymentEvent",
                    "summary": "payment.failed: release the reservation (stock.released); payment.succeeded: commit it",
                    "requestBody": event_body,
                    "responses": {"200": handled, "400": error_response("Not a CloudEvent, or data without order_id"), "415": error_response("Not application/cloudevents+json")}
                }
            }
        },
        "components": {
            "schemas": {
                "Stock": {
                    "type": "object",
                    "required": ["sku", "available", "reserved", "version"],
                    "properties": {
                        "sku": {"type": "string"},
                        "available": {"type": "integer", "description": "Free to reserve"},
                        "reserved": {"type": "integer", "description": "Held for orders awaiting payment"},
                        "version": {"type": "integer", "description": "Changes to `available` so far; the `levels` of stock.reserved and stock.released carry it"}
                    }
                },
                "CloudEvent": {
                    "type": "object",
                    "required": ["specversion", "id", "source", "type"],
                    "properties": {
                        "specversion": {"type": "string", "enum": ["1.0"]},
                        "id": {"type": "string"},
                        "source": {"type": "string"},
                        "type": {"type": "string"},
                        "customer": {"type": "string"},
                        "orderid": {"type": "string"},
                        "data": {"type": "object"}
                    }
                },
                "Handled": {
                    "type": "object",
                    "required": ["outcome"],
                    "properties": {"outcome": {"type": "string", "enum": ["reserved", "rejected", "released", "committed", "duplicate", "unchanged", "forestalled", "ignored"]}}
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
        assert!(doc["paths"]["/api/inventory/{sku}"]["get"].is_object());
        assert!(doc["paths"]["/events/orders"]["post"].is_object());
        assert!(doc["paths"]["/events/payments"]["post"].is_object());
    }
}
