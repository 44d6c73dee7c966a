//! The contract's built-in endpoints: `/healthz`, `/readyz`, `/metrics`,
//! `/openapi.json`, and the readiness state behind `/readyz`.
//!
//! Liveness and readiness are separate on purpose: a draining instance is
//! alive (do not restart it) but not ready (send it no new traffic).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

/// Whether this instance wants traffic. Cheap to clone; all clones share
/// one state.
///
/// Starts ready. A service that needs warm-up can call
/// [`Readiness::set_ready`]`(false)` before serving and `true` when done;
/// shutdown marks it draining, which no later `set_ready` undoes. Nothing
/// else changes it: the chassis does not probe the database or other
/// dependencies, so a service that wants to leave rotation while one is
/// down calls `set_ready` itself.
#[derive(Debug, Clone)]
pub struct Readiness {
    inner: Arc<State>,
}

#[derive(Debug)]
struct State {
    ready: AtomicBool,
    draining: AtomicBool,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            inner: Arc::new(State {
                ready: AtomicBool::new(true),
                draining: AtomicBool::new(false),
            }),
        }
    }
}

impl Readiness {
    /// Marks the instance ready or not ready for traffic.
    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::SeqCst);
    }

    /// Marks the instance as draining: `/readyz` answers 503 from now on.
    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// True when `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::SeqCst) && !self.is_draining()
    }

    /// True once shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }
}

/// A minimal valid OpenAPI 3.0.3 document for a service that supplied none.
pub(crate) fn default_openapi(service: &str) -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": service,
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!("The `{service}` service has not published an API description."),
        },
        "paths": {}
    })
}

/// The built-in routes.
pub(crate) fn routes(readiness: Readiness, openapi: Arc<Value>) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route(
            "/readyz",
            get(move || {
                let readiness = readiness.clone();
                async move { readyz(&readiness) }
            }),
        )
        .route("/metrics", get(metrics))
        .route(
            "/openapi.json",
            get(move || {
                let doc = openapi.clone();
                async move { axum::Json(doc.as_ref().clone()) }
            }),
        )
}

fn readyz(readiness: &Readiness) -> Response {
    if readiness.is_draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "draining"})),
        )
            .into_response()
    } else if readiness.is_ready() {
        axum::Json(json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "not_ready"})),
        )
            .into_response()
    }
}

async fn metrics() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::prometheus_handle().render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{Body, to_bytes};
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get_status(app: &Router, path: &str) -> (StatusCode, Value) {
        let res = app
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let body = to_bytes(res.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    #[tokio::test]
    async fn readyz_flips_when_draining() {
        let readiness = Readiness::default();
        let app = routes(readiness.clone(), Arc::new(default_openapi("t")));
        assert_eq!(get_status(&app, "/readyz").await.0, StatusCode::OK);

        readiness.set_ready(false);
        let (status, body) = get_status(&app, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "not_ready");
        readiness.set_ready(true);

        readiness.set_draining();
        readiness.set_ready(true);
        let (status, body) = get_status(&app, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "draining");
        // Liveness is unaffected by draining.
        assert_eq!(get_status(&app, "/healthz").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn default_openapi_is_served() {
        let app = routes(Readiness::default(), Arc::new(default_openapi("catalog")));
        let (status, body) = get_status(&app, "/openapi.json").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["openapi"], "3.0.3");
        assert_eq!(body["info"]["title"], "catalog");
        assert!(body["paths"].is_object());
    }
}
