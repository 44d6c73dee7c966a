//! The one place where errors become HTTP responses.
//!
//! Every error a Flotilla service returns has the same JSON shape, so the
//! gateway, the web UI and other services can read it without knowing who
//! answered:
//!
//! ```json
//! {"error": {"code": "insufficient_stock", "message": "…",
//!            "fields": [{"field": "items[0].quantity", "message": "…"}],
//!            "details": {…}}}
//! ```
//!
//! `code` is stable and machine-readable; `message` is safe to show to a
//! user; `fields` and `details` are present only when they have content.
//! Internal errors log their full chain and answer a generic message.

use std::borrow::Cow;
use std::ops::RangeInclusive;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::Error;
use crate::error::error_chain;

/// A problem with one field of the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// Path of the field, e.g. `items[2].quantity`.
    pub field: String,
    /// What is wrong with it, for a person.
    pub message: String,
}

impl FieldError {
    /// A field error.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An error response. Build one with the constructors, return it from a
/// handler (`Result<_, ApiError>`).
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code, `snake_case`.
    pub code: Cow<'static, str>,
    /// Human-readable message, safe to show.
    pub message: String,
    /// Field-level problems (validation).
    pub fields: Vec<FieldError>,
    /// Extra structured data, e.g. the new total of a `price_changed`.
    pub details: Option<Value>,
}

impl ApiError {
    /// An error with any status.
    pub fn new(
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            code: code.into(),
            message: message.into(),
            fields: Vec::new(),
            details: None,
        }
    }

    /// 400 with a specific code.
    pub fn bad_request(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 400 `invalid_request` listing the fields at fault.
    pub fn validation(fields: Vec<FieldError>) -> Self {
        let message = match fields.as_slice() {
            [one] => format!("{}: {}", one.field, one.message),
            _ => format!("{} fields are invalid", fields.len()),
        };
        ApiError {
            fields,
            ..Self::bad_request("invalid_request", message)
        }
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 409 with a specific code.
    pub fn conflict(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 422 with a specific code.
    pub fn unprocessable(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// 500 `internal_error`: logs `err` with its whole chain and answers a
    /// message that reveals nothing about it.
    pub fn internal(err: &(dyn std::error::Error + 'static)) -> Self {
        tracing::error!(error = %error_chain(err), "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error; the details are in the service's log",
        )
    }

    /// Adds a field error.
    pub fn with_field(mut self, field: impl Into<String>, message: impl Into<String>) -> Self {
        self.fields.push(FieldError::new(field, message));
        self
    }

    /// Sets `details`.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        let mut error = json!({"code": self.code, "message": self.message});
        if !self.fields.is_empty() {
            error["fields"] = json!(self.fields);
        }
        if let Some(details) = &self.details {
            error["details"] = details.clone();
        }
        json!({ "error": error })
    }

    /// Reads an error body produced by another chassis service, if `body`
    /// is one.
    pub fn from_body(status: StatusCode, body: &Value) -> Option<Self> {
        let error = body.get("error")?;
        let code = error.get("code")?.as_str()?.to_owned();
        let message = error.get("message")?.as_str()?.to_owned();
        let fields = error
            .get("fields")
            .and_then(|f| serde_json::from_value(f.clone()).ok())
            .unwrap_or_default();
        Some(ApiError {
            status,
            code: code.into(),
            message,
            fields,
            details: error.get("details").cloned(),
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Dependency and broker failures become 502/503 `dependency_unavailable`
/// naming the dependency; an invalid event or event data becomes 400
/// (`invalid_cloudevent`, `invalid_event_data`) so the broker dead-letters
/// it; everything else is internal.
impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        let (status, dep) = match &err {
            Error::Unreachable { dep, .. } | Error::Timeout { dep, .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, dep.clone())
            }
            Error::Status { dep, status, .. } if *status == StatusCode::SERVICE_UNAVAILABLE => {
                (StatusCode::SERVICE_UNAVAILABLE, dep.clone())
            }
            Error::Status { dep, .. }
            | Error::BadJson { dep, .. }
            | Error::TooLarge { dep, .. } => (StatusCode::BAD_GATEWAY, dep.clone()),
            Error::Broker { status, .. } if *status == StatusCode::SERVICE_UNAVAILABLE => {
                (StatusCode::SERVICE_UNAVAILABLE, "broker".to_owned())
            }
            Error::Broker { .. } => (StatusCode::BAD_GATEWAY, "broker".to_owned()),
            // A 4xx tells the broker to dead-letter a pushed event instead of
            // retrying it: right for events that can never be handled.
            Error::InvalidEvent { reason } => {
                tracing::warn!(error = %reason, "invalid CloudEvent");
                return ApiError::bad_request("invalid_cloudevent", err.to_string());
            }
            Error::EventData { .. } => {
                tracing::warn!(error = %error_chain(&err), "event data not understood");
                return ApiError::bad_request("invalid_event_data", error_chain(&err));
            }
            _ => return ApiError::internal(&err),
        };
        tracing::warn!(error = %error_chain(&err), dependency = %dep, "dependency call failed");
        ApiError::new(
            status,
            "dependency_unavailable",
            format!("the {dep} service is unavailable; try again shortly"),
        )
        .with_details(json!({ "dependency": dep }))
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        ApiError::internal(&err)
    }
}

/// `axum::Json` whose rejections are [`ApiError`]s (`invalid_json`), so a
/// malformed body gets the same JSON error shape as everything else.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    let code = match rejection {
        JsonRejection::MissingJsonContentType(_) => "unsupported_media_type",
        _ => "invalid_json",
    };
    ApiError::new(rejection.status(), code, rejection.body_text())
}

/// `axum::extract::Query` whose rejections are [`ApiError`]s
/// (`invalid_query`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(query_rejection(rejection)),
        }
    }
}

fn query_rejection(rejection: QueryRejection) -> ApiError {
    ApiError::new(rejection.status(), "invalid_query", rejection.body_text())
}

/// A whole-number parameter (typically from [`ApiQuery`], read as a string
/// so a bad value is a field error rather than a rejection): `default`
/// when absent or blank, else the trimmed value if it parses and lies in
/// `range`, else a [`FieldError`] for `field` saying "must be a whole
/// number from MIN to MAX".
///
/// ```
/// use flotilla_chassis::{ApiError, int_param};
///
/// let limit = int_param("limit", Some(" 20 "), 50, 1..=200);
/// assert_eq!(limit, Ok(20));
/// assert_eq!(int_param("limit", None, 50, 1..=200), Ok(50));
/// let err = int_param("limit", Some("0"), 50, 1..=200).map_err(|e| ApiError::validation(vec![e]));
/// assert_eq!(err.unwrap_err().message, "limit: must be a whole number from 1 to 200");
/// ```
pub fn int_param(
    field: &str,
    value: Option<&str>,
    default: i64,
    range: RangeInclusive<i64>,
) -> Result<i64, FieldError> {
    match value.map(str::trim) {
        None | Some("") => Ok(default),
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                FieldError::new(
                    field,
                    format!(
                        "must be a whole number from {} to {}",
                        range.start(),
                        range.end()
                    ),
                )
            }),
    }
}

/// A fallback handler answering 404 `not_found` in the common shape; use it
/// with `Router::fallback`.
pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::{Body, to_bytes};
    use axum::routing::post;
    use tower::ServiceExt;

    async fn body_of(res: Response) -> Value {
        let bytes = to_bytes(res.into_body(), 1 << 20).await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn whole_number_parameters() {
        for (raw, want) in [
            (None, 50),
            (Some(""), 50),
            (Some("  "), 50),
            (Some(" 7 "), 7),
        ] {
            assert_eq!(int_param("limit", raw, 50, 1..=200), Ok(want), "{raw:?}");
        }
        assert_eq!(int_param("limit", Some("200"), 50, 1..=200), Ok(200));
        for raw in ["0", "201", "-1", "1.5", "ten", "9999999999999999999999"] {
            assert_eq!(
                int_param("limit", Some(raw), 50, 1..=200),
                Err(FieldError::new(
                    "limit",
                    "must be a whole number from 1 to 200"
                )),
                "{raw}"
            );
        }
    }

    #[tokio::test]
    async fn shape_of_an_error() {
        let err = ApiError::validation(vec![FieldError::new("coupon", "unknown coupon")])
            .with_details(json!({"known": ["WELCOME10"]}));
        assert_eq!(err.message, "coupon: unknown coupon");
        let res = err.into_response();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        let body = body_of(res).await;
        assert_eq!(body["error"]["code"], "invalid_request");
        assert_eq!(body["error"]["fields"][0]["field"], "coupon");
        assert_eq!(body["error"]["details"]["known"][0], "WELCOME10");

        let plain = body_of(ApiError::not_found("no product").into_response()).await;
        assert!(plain["error"].get("fields").is_none());
        assert!(plain["error"].get("details").is_none());

        let back = ApiError::from_body(StatusCode::BAD_REQUEST, &body).unwrap();
        assert_eq!(back.code, "invalid_request");
        assert_eq!(back.fields[0].message, "unknown coupon");
    }

    #[test]
    fn dependency_errors_map_to_502_and_503() {
        let err: ApiError = Error::Timeout {
            dep: "pricing".into(),
            url: "http://x".into(),
            timeout: std::time::Duration::from_secs(1),
        }
        .into();
        assert_eq!(err.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(err.code, "dependency_unavailable");
        assert!(err.message.contains("pricing"));

        let err: ApiError = Error::Status {
            dep: "catalog".into(),
            url: "http://x".into(),
            status: StatusCode::INTERNAL_SERVER_ERROR,
            body: "boom".into(),
        }
        .into();
        assert_eq!(err.status, StatusCode::BAD_GATEWAY);
        assert_eq!(err.code, "dependency_unavailable");
        assert!(!err.message.contains("boom"), "bodies stay internal");

        let err: ApiError = Error::NoDatabase {
            service: "x".into(),
        }
        .into();
        assert_eq!(err.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            !err.message.contains("DATABASE_URL"),
            "internals stay internal"
        );
    }

    #[derive(Deserialize)]
    struct Body1 {
        #[allow(dead_code)]
        n: u32,
    }

    #[tokio::test]
    async fn json_rejections_are_api_errors() {
        let app = Router::new().route("/", post(|ApiJson(_b): ApiJson<Body1>| async { "ok" }));
        let res = app
            .clone()
            .oneshot(
                Request::post("/")
                    .header("content-type", "application/json")
                    .body(Body::from("{\"n\": -1}"))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body_of(res).await["error"]["code"], "invalid_json");

        let res = app
            .oneshot(Request::post("/").body(Body::from("{}")).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(
            body_of(res).await["error"]["code"],
            "unsupported_media_type"
        );
    }
}
