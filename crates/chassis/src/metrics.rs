//! Prometheus metrics: the process-wide recorder and the HTTP middleware
//! every chassis server runs.
//!
//! Route labels come from axum's `MatchedPath` (the route template), never
//! from the raw path, and methods outside the standard set collapse to
//! `OTHER`: label values must come from a bounded set or a client could
//! grow the registry without limit.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use http::Method;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::{request_id, trace};

/// Metric names, public so dashboards and tests refer to one spelling.
pub const HTTP_REQUESTS_TOTAL: &str = "http_requests_total";
/// Request latency histogram.
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "http_request_duration_seconds";
/// Requests being handled right now.
pub const HTTP_REQUESTS_IN_FLIGHT: &str = "http_requests_in_flight";
/// Events written to the transactional outbox and not yet published.
pub const OUTBOX_PENDING: &str = "flotilla_outbox_pending";

/// Route label for requests no route matched.
pub const UNMATCHED: &str = "unmatched";

/// Latency buckets in seconds: from a cache hit to the gateway's timeout.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The handle that renders this process' metrics, installing the recorder
/// on first use.
///
/// If another global recorder is already installed (a test harness, or a
/// service that set up its own), metrics go to that one and `/metrics`
/// renders only what this handle saw; the conflict is logged, not fatal.
pub fn prometheus_handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new();
        let builder = match builder.set_buckets_for_metric(
            Matcher::Full(HTTP_REQUEST_DURATION_SECONDS.to_owned()),
            BUCKETS,
        ) {
            Ok(with_buckets) => with_buckets,
            // Only an empty bucket list fails, and BUCKETS is not empty.
            Err(_) => PrometheusBuilder::new(),
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        match metrics::set_global_recorder(recorder) {
            Ok(()) => describe(),
            Err(e) => tracing::warn!(
                error = %e,
                "a metrics recorder is already installed; /metrics will not show its metrics"
            ),
        }
        handle
    })
}

fn describe() {
    metrics::describe_counter!(
        HTTP_REQUESTS_TOTAL,
        "HTTP requests handled, by route template"
    );
    metrics::describe_histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "HTTP request latency, by route template"
    );
    metrics::describe_gauge!(HTTP_REQUESTS_IN_FLIGHT, "HTTP requests being handled");
    metrics::describe_gauge!(
        OUTBOX_PENDING,
        "Events in the transactional outbox not yet published to the broker"
    );
}

/// A bounded label for `method`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Decrements the in-flight gauge however the request ends, cancellation
/// included.
struct InFlight(metrics::Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// The middleware: counts, times and tracks every request, and makes the
/// incoming `x-request-id` available to outgoing [`crate::Client`] calls
/// and the incoming `traceparent` to the events the handler creates.
pub(crate) async fn track(req: Request, next: Next) -> Response {
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED.to_owned(), |p| p.as_str().to_owned());
    let request_id = request_id::from_headers(req.headers());
    let traceparent = trace::from_headers(req.headers());

    let gauge = metrics::gauge!(HTTP_REQUESTS_IN_FLIGHT);
    gauge.increment(1.0);
    let _in_flight = InFlight(gauge);
    let start = Instant::now();

    let response = request_id::scope(request_id, trace::scope(traceparent, next.run(req))).await;

    let status = response.status().as_u16().to_string();
    metrics::counter!(
        HTTP_REQUESTS_TOTAL,
        "method" => method,
        "route" => route.clone(),
        "status" => status
    )
    .increment(1);
    metrics::histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        "method" => method,
        "route" => route
    )
    .record(start.elapsed().as_secs_f64());
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    #[test]
    fn methods_are_bounded() {
        assert_eq!(method_label(&Method::GET), "GET");
        let odd = Method::from_bytes(b"BREW").unwrap();
        assert_eq!(method_label(&odd), "OTHER");
    }

    #[tokio::test]
    async fn route_label_is_the_template_never_the_raw_path() {
        let handle = prometheus_handle();
        let app = Router::new()
            .route("/label-test/items/{id}", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn(track));
        for uri in ["/label-test/items/42", "/label-test/items/43", "/nowhere-7"] {
            let res = app
                .clone()
                .oneshot(Request::get(uri).body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert!(res.status().is_success() || res.status() == 404);
        }
        let text = handle.render();
        assert!(
            text.contains(
                r#"http_requests_total{method="GET",route="/label-test/items/{id}",status="200"} 2"#
            ),
            "{text}"
        );
        assert!(!text.contains("/label-test/items/42"), "{text}");
        assert!(!text.contains("nowhere-7"), "{text}");
        assert!(text.contains(r#"route="unmatched",status="404""#), "{text}");
        assert!(
            text.contains(r#"http_request_duration_seconds_bucket{method="GET",route="/label-test/items/{id}""#),
            "{text}"
        );
        assert!(text.contains("http_requests_in_flight"), "{text}");
    }
}
