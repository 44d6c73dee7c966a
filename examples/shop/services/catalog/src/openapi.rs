//! The API description served at `/openapi.json`.

use flotilla_chassis::openapi::{error_response, error_schema};
use serde_json::{Value, json};

/// OpenAPI 3.0.3 for the catalog's routes.
pub fn document() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "shop-catalog",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The shop's products. Prices are integer cents. Every response carries `x-served-by: <instance>`. `/events/stock` is called by the broker only (push delivery); a 4xx dead-letters the event, a 5xx has it retried."
        },
        "paths": {
            "/api/catalog/products": {
                "get": {
                    "operationId": "listProducts",
                    "summary": "Search products",
                    "parameters": [
                        {"name": "q", "in": "query", "required": false, "description": "Text in name, description or category; case-insensitive for ASCII letters (others match as written)", "schema": {"type": "string", "maxLength": 100}},
                        {"name": "category", "in": "query", "required": false, "description": "Exact category; case-insensitive for ASCII letters (others match as written)", "schema": {"type": "string", "maxLength": 100}},
                        {"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 50}},
                        {"name": "offset", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 0, "maximum": 10000, "default": 0}}
                    ],
                    "responses": {
                        "200": {"description": "A page of products", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Page"}}}},
                        "400": error_response("Invalid parameters")
                    }
                }
            },
            "/events/stock": {
                "post": {
                    "operationId": "onStockEvent",
                    "summary": "stock.changed: set each product's stock to the event's `levels` newer than its figure",
                    "requestBody": {"required": true, "content": {"application/cloudevents+json": {"schema": {"$ref": "#/components/schemas/CloudEvent"}}}},
                    "responses": {
                        "200": {"description": "Handled (or a duplicate, or nothing newer): acknowledged", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Handled"}}}},
                        "400": error_response("Not a CloudEvent, or data without valid levels"),
                        "415": error_response("Not application/cloudevents+json")
                    }
                }
            },
            "/api/catalog/products/{id}": {
                "get": {
                    "operationId": "getProduct",
                    "summary": "One product by SKU",
                    "parameters": [
                        {"name": "id", "in": "path", "required": true, "schema": {"type": "string"}, "example": "sku-espresso"},
                        {"name": "reviews", "in": "query", "required": false, "schema": {"type": "boolean", "default": true},
                         "description": "`false`: the product alone (`reviews` null), without asking the reviews service; for services that only need the product"}
                    ],
                    "responses": {
                        "200": {"description": "The product with its reviews", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ProductPage"}}}},
                        "400": error_response("reviews is not true or false"),
                        "404": error_response("No such product")
                    }
                }
            }
        },
        "components": {
            "schemas": {
                "Product": {
                    "type": "object",
                    "required": ["id", "name", "description", "price_cents", "currency", "stock", "stock_version", "category"],
                    "properties": {
                        "id": {"type": "string", "example": "sku-espresso"},
                        "name": {"type": "string"},
                        "description": {"type": "string"},
                        "price_cents": {"type": "integer", "minimum": 0},
                        "currency": {"type": "string", "example": "EUR"},
                        "stock": {"type": "integer", "minimum": 0, "description": "Units available, as inventory last announced them; may lag inventory briefly"},
                        "stock_version": {"type": "integer", "minimum": 0, "description": "The inventory version of `stock` (0: the seeded figure)"},
                        "category": {"type": "string"},
                        "image": {"type": "string", "nullable": true}
                    }
                },
                "ProductPage": {
                    "allOf": [
                        {"$ref": "#/components/schemas/Product"},
                        {
                            "type": "object",
                            "properties": {
                                "reviews": {
                                    "type": "object",
                                    "nullable": true,
                                    "description": "From the reviews service; null when it could not be reached in time",
                                    "properties": {
                                        "count": {"type": "integer"},
                                        "average_rating": {"type": "number", "nullable": true},
                                        "reviews": {"type": "array", "items": {"type": "object"}}
                                    }
                                }
                            }
                        }
                    ]
                },
                "Page": {
                    "type": "object",
                    "required": ["products", "total", "limit", "offset"],
                    "properties": {
                        "products": {"type": "array", "items": {"$ref": "#/components/schemas/Product"}},
                        "total": {"type": "integer", "description": "Products matching in all"},
                        "limit": {"type": "integer"},
                        "offset": {"type": "integer"}
                    }
                },
                "CloudEvent": {
                    "type": "object",
                    "required": ["specversion", "id", "source", "type"],
                    "properties": {
                        "specversion": {"type": "string", "enum": ["1.0"]},
                        "id": {"type": "string"},
                        "source": {"type": "string"},
                        "type": {"type": "string", "enum": ["stock.changed"]},
                        "data": {
                            "type": "object",
                            "required": ["levels"],
                            "properties": {
                                "levels": {"type": "array", "items": {
                                    "type": "object",
                                    "required": ["sku", "available", "version"],
                                    "properties": {
                                        "sku": {"type": "string"},
                                        "available": {"type": "integer", "minimum": 0},
                                        "version": {"type": "integer", "minimum": 1}
                                    }
                                }}
                            }
                        }
                    }
                },
                "Handled": {
                    "type": "object",
                    "required": ["outcome"],
                    "properties": {"outcome": {"type": "string", "enum": ["updated", "unchanged", "duplicate", "ignored"]}}
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
        assert!(doc["paths"]["/api/catalog/products"]["get"].is_object());
        assert!(doc["paths"]["/api/catalog/products/{id}"]["get"].is_object());
        assert!(doc["paths"]["/events/stock"]["post"].is_object());
    }
}
