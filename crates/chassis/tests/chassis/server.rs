//! The built-in endpoints of a real server.

use axum::Router;
use axum::extract::Path;
use axum::routing::get;
use serde_json::{Value, json};

use crate::support::{http, start, start_with};

fn echo() -> Router {
    Router::new().route(
        "/api/echo/{word}",
        get(|Path(word): Path<String>| async move { axum::Json(json!({ "word": word })) }),
    )
}

#[tokio::test]
async fn health_ready_metrics_and_openapi() {
    let server = start("it-server", &[], echo()).await;
    let http = http();

    let res = http.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = http.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(res.status(), 200);

    for word in ["a", "b", "c"] {
        let body: Value = http
            .get(server.url(&format!("/api/echo/{word}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["word"], word);
    }
    let res = http.get(server.url("/no/such/route")).send().await.unwrap();
    assert_eq!(res.status(), 404);

    let res = http.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = res.text().await.unwrap();
    assert!(
        text.contains(
            r#"http_requests_total{method="GET",route="/api/echo/{word}",status="200"} 3"#
        ),
        "{text}"
    );
    assert!(text.contains(r#"route="unmatched",status="404""#), "{text}");
    assert!(!text.contains("/no/such/route"), "{text}");
    assert!(
        text.contains("http_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("http_requests_in_flight"), "{text}");

    let doc: Value = http
        .get(server.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    assert_eq!(doc["info"]["title"], "it-server");

    server.stop().await.unwrap();
}

#[tokio::test]
async fn custom_openapi_is_served() {
    let doc = json!({"openapi": "3.0.3", "info": {"title": "custom", "version": "9"}, "paths": {"/api/echo/{word}": {}}});
    let expected = doc.clone();
    let server = start_with("it-openapi", &[], echo(), move |s| s.with_openapi(doc)).await;
    let got: Value = http()
        .get(server.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got, expected);
    server.stop().await.unwrap();
}
