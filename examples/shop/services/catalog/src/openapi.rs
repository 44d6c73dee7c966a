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
            "description": "The shop's products. Prices are integer cents. Every response carries `x-served-by: <instance>`."
        },
        "paths": {
            "/api/catalog/products": {
                "get": {
                    "operationId": "listProducts",
                    "summary": "Search products",
                    "parameters": [
                        {"name": "q", "in": "query", "required": false, "description": "Case-insensitive text in name, description or category", "schema": {"type": "string", "maxLength": 100}},
                        {"name": "category", "in": "query", "required": false, "description": "Exact category, case-insensitive", "schema": {"type": "string", "maxLength": 100}},
                        {"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 50}},
                        {"name": "offset", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 0, "maximum": 10000, "default": 0}}
                    ],
                    "responses": {
                        "200": {"description": "A page of products", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Page"}}}},
                        "400": error_response("Invalid parameters")
                    }
                }
            },
            "/api/catalog/products/{id}": {
                "get": {
                    "operationId": "getProduct",
                    "summary": "One product by SKU",
                    "parameters": [
                        {"name": "id", "in": "path", "required": true, "schema": {"type": "string"}, "example": "sku-espresso"}
                    ],
                    "responses": {
                        "200": {"description": "The product with its reviews", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ProductPage"}}}},
                        "404": error_response("No such product")
                    }
                }
            }
        },
        "components": {
            "schemas": {
                "Product": {
                    "type": "object",
                    "required": ["id", "name", "description", "price_cents", "currency", "stock", "category"],
                    "properties": {
                        "id": {"type": "string", "example": "sku-espresso"},
                        "name": {"type": "string"},
                        "description": {"type": "string"},
                        "price_cents": {"type": "integer", "minimum": 0},
                        "currency": {"type": "string", "example": "EUR"},
                        "stock": {"type": "integer", "minimum": 0},
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
                "Error": error_schema()
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn lists_both_routes() {
        let doc = super::document();
        assert_eq!(doc["openapi"], "3.0.3");
        assert!(doc["paths"]["/api/catalog/products"]["get"].is_object());
        assert!(doc["paths"]["/api/catalog/products/{id}"]["get"].is_object());
    }
}
