//! The API description served at `/openapi.json`.

use flotilla_chassis::openapi::{error_response, error_schema};
use serde_json::{Value, json};

/// OpenAPI 3.0.3 for the notifications routes.
pub fn document() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "shop-notifications",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Messages about the signed-in customer's orders (confirmed, cancelled), from the `notifications` queue. Needs a bearer token: the gateway passes the user as `x-flotilla-user-id`."
        },
        "paths": {
            "/api/notifications": {
                "get": {
                    "operationId": "listNotifications",
                    "summary": "The customer's messages, newest first",
                    "parameters": [
                        {"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}}
                    ],
                    "responses": {
                        "200": {"description": "The messages", "content": {"application/json": {"schema": {
                            "type": "object",
                            "required": ["notifications"],
                            "properties": {"notifications": {"type": "array", "items": {"$ref": "#/components/schemas/Notification"}}}
                        }}}},
                        "400": error_response("Invalid limit"),
                        "401": error_response("unauthenticated: not signed in")
                    }
                }
            }
        },
        "components": {
            "schemas": {
                "Notification": {
                    "type": "object",
                    "required": ["id", "order_id", "kind", "message", "created_at"],
                    "properties": {
                        "id": {"type": "integer"},
                        "order_id": {"type": "string"},
                        "kind": {"type": "string", "enum": ["order.confirmed", "order.cancelled"]},
                        "message": {"type": "string", "example": "Order #1f0e2d3c confirmed — €12.34"},
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
        assert!(doc["paths"]["/api/notifications"]["get"].is_object());
    }
}
