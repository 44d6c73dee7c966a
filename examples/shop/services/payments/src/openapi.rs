//! The API description served at `/openapi.json`.

use flotilla_chassis::openapi::{error_response, error_schema};
use serde_json::{Value, json};

/// OpenAPI 3.0.3 for the payments routes.
pub fn document() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "shop-payments",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Charges simulated test cards for the order saga. Called by the broker only (push delivery); a 4xx dead-letters the event, a 5xx has it retried. Test cards: 4000 0000 0000 0002 declines (card_declined), 4000 0000 0000 9995 declines (insufficient_funds), any other number passing the Luhn check succeeds, anything else declines (invalid_card). A negative amount declines as invalid_amount, a currency that is not three upper-case letters (ISO 4217) as invalid_currency, an order cancelled before its charge as order_cancelled."
        },
        "paths": {
            "/events/stock": {
                "post": {
                    "operationId": "onStockEvent",
                    "summary": "stock.reserved: charge the order once; publishes payment.succeeded or payment.failed",
                    "requestBody": {"required": true, "content": {"application/cloudevents+json": {"schema": {"$ref": "#/components/schemas/CloudEvent"}}}},
                    "responses": {
                        "200": {"description": "Handled (or a duplicate): acknowledged", "content": {"application/json": {"schema": {
                            "type": "object",
                            "required": ["outcome"],
                            "properties": {"outcome": {"type": "string", "enum": ["succeeded", "failed", "duplicate", "unchanged", "ignored"]}}
                        }}}},
                        "400": error_response("Not a CloudEvent, or data not a stock.reserved"),
                        "415": error_response("Not application/cloudevents+json")
                    }
                }
            },
            "/events/orders": {
                "post": {
                    "operationId": "onOrderEvent",
                    "summary": "order.cancelled: refund the order's charge if it succeeded (publishes payment.refunded), and decline a later stock.reserved for it (payment.failed, order_cancelled)",
                    "requestBody": {"required": true, "content": {"application/cloudevents+json": {"schema": {"$ref": "#/components/schemas/CloudEvent"}}}},
                    "responses": {
                        "200": {"description": "Handled (or a duplicate): acknowledged", "content": {"application/json": {"schema": {
                            "type": "object",
                            "required": ["outcome"],
                            "properties": {"outcome": {"type": "string", "enum": ["refunded", "nothing_to_refund", "duplicate", "ignored"]}}
                        }}}},
                        "400": error_response("Not a CloudEvent, or data without order_id"),
                        "415": error_response("Not application/cloudevents+json")
                    }
                }
            }
        },
        "components": {
            "schemas": {
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
        assert!(doc["paths"]["/events/stock"]["post"].is_object());
        assert!(doc["paths"]["/events/orders"]["post"].is_object());
    }
}
