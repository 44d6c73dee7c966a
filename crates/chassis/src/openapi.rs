//! Pieces of an OpenAPI 3.0 document that every service describes the
//! same way: its error responses.
//!
//! Every error a chassis service answers has the shape [`ApiError`]
//! produces, so a document describes it once as the component schema
//! `Error` ([`error_schema`]) and points each error response at it
//! ([`error_response`]):
//!
//! ```
//! use flotilla_chassis::openapi::{error_response, error_schema};
//! use serde_json::json;
//!
//! let doc = json!({
//!     "openapi": "3.0.3",
//!     "paths": {"/api/things/{id}": {"get": {"responses": {
//!         "200": {"description": "The thing"},
//!         "404": error_response("No such thing")
//!     }}}},
//!     "components": {"schemas": {"Error": error_schema()}}
//! });
//! assert_eq!(doc["paths"]["/api/things/{id}"]["get"]["responses"]["404"]["description"], "No such thing");
//! ```
//!
//! [`ApiError`]: crate::ApiError

use serde_json::{Value, json};

/// Where [`error_response`] points: register [`error_schema`] under
/// `components.schemas.Error`.
pub const ERROR_SCHEMA_REF: &str = "#/components/schemas/Error";

/// An error response: `description` and a JSON body of the `Error`
/// schema ([`ERROR_SCHEMA_REF`]).
pub fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": ERROR_SCHEMA_REF}}}
    })
}

/// The schema of the body of every [`ApiError`](crate::ApiError):
/// `{"error": {"code", "message", "fields"?, "details"?}}`.
pub fn error_schema() -> Value {
    json!({
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "fields": {"type": "array", "items": {
                        "type": "object",
                        "properties": {"field": {"type": "string"}, "message": {"type": "string"}}
                    }},
                    "details": {"type": "object"}
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;
    use crate::ApiError;

    /// The schema names every member an [`ApiError`] body can have, and
    /// requires the ones it always has.
    #[test]
    fn the_schema_matches_what_api_error_answers() {
        let schema = error_schema();
        let error = &schema["properties"]["error"];
        let body = ApiError::new(StatusCode::CONFLICT, "taken", "taken")
            .with_field("email", "taken")
            .with_details(json!({"x": 1}))
            .body();
        for member in body["error"].as_object().unwrap().keys() {
            assert!(error["properties"][member].is_object(), "{member}");
        }
        let bare = ApiError::not_found("no").body();
        let mut always: Vec<&str> = bare["error"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        always.sort_unstable();
        assert_eq!(error["required"], json!(always));
        assert_eq!(body["error"]["fields"][0]["field"], "email");
        assert!(error["properties"]["fields"]["items"]["properties"]["field"].is_object());
    }

    #[test]
    fn a_response_points_at_the_schema() {
        let response = error_response("No such thing");
        assert_eq!(response["description"], "No such thing");
        assert_eq!(
            response["content"]["application/json"]["schema"]["$ref"],
            ERROR_SCHEMA_REF
        );
    }
}
