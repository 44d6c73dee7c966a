//! Every response the gateway makes up itself instead of relaying one: the
//! one place where a failure becomes an HTTP status, a stable error code and
//! a message that is safe to show a client. The full error chain goes to the
//! log, never to the client.
//!
//! Body shape: `{"error":{"code":"not_found","message":"no route for GET /x","request_id":"..."}}`.

use std::time::Duration;

use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderValue, Method, Response, StatusCode};

use crate::body::{self, Body, BoxError};
use crate::request_id::RequestId;
use crate::upstream::ActivateError;

/// Why the gateway answered a request itself. The `Display` text is the
/// client-facing message.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Rejection {
    #[error("no route for {method} {path}")]
    NotFound { method: Method, path: String },
    #[error("{method} is not allowed on {path}; allowed: {}", allow.join(", "))]
    MethodNotAllowed {
        method: Method,
        path: String,
        allow: Vec<String>,
    },
    #[error("the path must not contain `.` or `..` segments")]
    BadPath,
    #[error("could not read the request body")]
    BadRequestBody {
        #[source]
        source: BoxError,
    },
    #[error("no instance of `{service}` became ready")]
    NoReadyInstance {
        service: String,
        #[source]
        source: Option<ActivateError>,
    },
    #[error("`{service}` did not answer within {}", humantime::format_duration(*timeout))]
    UpstreamTimeout { service: String, timeout: Duration },
    #[error("cannot connect to `{service}`")]
    UpstreamUnreachable {
        service: String,
        #[source]
        source: BoxError,
    },
    #[error("`{service}` failed to answer")]
    BadGateway {
        service: String,
        #[source]
        source: BoxError,
    },
}

impl Rejection {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Rejection::NotFound { .. } => StatusCode::NOT_FOUND,
            Rejection::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Rejection::BadPath | Rejection::BadRequestBody { .. } => StatusCode::BAD_REQUEST,
            Rejection::NoReadyInstance { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Rejection::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Rejection::UpstreamUnreachable { .. } | Rejection::BadGateway { .. } => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    /// Stable, machine-readable; clients may branch on it.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Rejection::NotFound { .. } => "not_found",
            Rejection::MethodNotAllowed { .. } => "method_not_allowed",
            Rejection::BadPath => "bad_path",
            Rejection::BadRequestBody { .. } => "bad_request_body",
            Rejection::NoReadyInstance { .. } => "no_ready_instance",
            Rejection::UpstreamTimeout { .. } => "upstream_timeout",
            Rejection::UpstreamUnreachable { .. } => "upstream_unreachable",
            Rejection::BadGateway { .. } => "bad_gateway",
        }
    }

    /// The JSON error response; logs the full chain of server-side failures.
    pub(crate) fn into_response(self, request_id: Option<&RequestId>) -> Response<Body> {
        let status = self.status();
        let request_id = request_id.map(RequestId::as_str).unwrap_or("");
        if status.is_server_error() {
            tracing::warn!(
                target: "flotilla::gateway",
                request_id,
                code = self.code(),
                error = %chain(&self),
                "request failed"
            );
        }
        let body = serde_json::json!({
            "error": {
                "code": self.code(),
                "message": self.to_string(),
                "request_id": request_id,
            }
        });
        let mut res = Response::new(body::full(body.to_string()));
        *res.status_mut() = status;
        res.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Rejection::MethodNotAllowed { allow, .. } = &self
            && let Ok(v) = HeaderValue::from_str(&allow.join(", "))
        {
            res.headers_mut().insert(ALLOW, v);
        }
        res
    }
}

/// `error: cause: cause`, for logs.
fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn json(res: Response<Body>) -> serde_json::Value {
        let bytes = match res.into_body().collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) => panic!("{e}"),
        };
        match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => panic!("not JSON: {e}"),
        }
    }

    #[tokio::test]
    async fn not_found_is_json_with_code_message_and_request_id() {
        let res = Rejection::NotFound {
            method: Method::GET,
            path: "/x".into(),
        }
        .into_response(None);
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        assert_eq!(res.headers()[CONTENT_TYPE], "application/json");
        let v = json(res).await;
        assert_eq!(v["error"]["code"], "not_found");
        assert_eq!(v["error"]["message"], "no route for GET /x");
        assert_eq!(v["error"]["request_id"], "");
    }

    #[tokio::test]
    async fn method_not_allowed_sets_allow() {
        let res = Rejection::MethodNotAllowed {
            method: Method::DELETE,
            path: "/a".into(),
            allow: vec!["GET".into(), "HEAD".into()],
        }
        .into_response(None);
        assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(res.headers()[ALLOW], "GET, HEAD");
        assert_eq!(json(res).await["error"]["code"], "method_not_allowed");
    }

    #[test]
    fn chain_includes_sources_but_message_does_not() {
        let e = Rejection::UpstreamUnreachable {
            service: "catalog".into(),
            source: "connection refused".into(),
        };
        assert_eq!(e.to_string(), "cannot connect to `catalog`");
        assert_eq!(chain(&e), "cannot connect to `catalog`: connection refused");
    }
}
