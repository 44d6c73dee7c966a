//! A chassis client calling between two chassis servers.

use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use flotilla_chassis::{ApiError, ApiJson, Client, Error, Service};
use serde_json::{Value, json};

use crate::support::{http, start};

/// The callee: echoes what it received, fails, or misbehaves on request.
fn callee() -> Router {
    Router::new()
        .route(
            "/api/items/{id}",
            get(|Path(id): Path<String>, headers: HeaderMap| async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                axum::Json(json!({
                    "id": id,
                    "request_id": header("x-request-id"),
                    "traceparent": header("traceparent"),
                }))
            }),
        )
        .route(
            "/api/items",
            post(|ApiJson(body): ApiJson<Value>| async move {
                axum::Json(json!({ "received": body }))
            }),
        )
        .route(
            "/api/broken",
            get(|| async { ApiError::conflict("out_of_stock", "no more") }),
        )
        .route("/api/not-json", get(|| async { "plain text" }))
        .route(
            "/api/slow",
            get(|| async {
                // Simulates a dependency slower than the caller's timeout.
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        )
}

/// The caller: proxies to the callee through `service.client("callee")`.
fn caller(client: Client) -> Router {
    Router::new()
        .route(
            "/api/proxy/{id}",
            get(
                |State(client): State<Client>, Path(id): Path<String>| async move {
                    let item: Value = client.get_json(&format!("/api/items/{id}")).await?;
                    Ok::<_, ApiError>(axum::Json(item))
                },
            ),
        )
        .route(
            "/api/proxy-broken",
            get(|State(client): State<Client>| async move {
                let item: Value = client.get_json("/api/broken").await?;
                Ok::<_, ApiError>(axum::Json(item))
            }),
        )
        .with_state(client)
}

#[tokio::test]
async fn calls_between_two_servers() {
    let callee = start("it-callee", &[], callee()).await;
    let callee_url = format!("http://{}", callee.addr);

    let vars = [("FLOTILLA_URL_IT_CALLEE", callee_url.as_str())];
    let service = Service::from_vars(
        [("FLOTILLA_SERVICE", "it-caller")]
            .into_iter()
            .chain(vars.iter().copied()),
    )
    .unwrap();
    let client = service.client("it-callee").unwrap();
    let caller = start("it-caller", &vars, caller(client.clone())).await;

    // Through the caller, with the request id and trace forwarded.
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let res = http()
        .get(caller.url("/api/proxy/sku-1"))
        .header("x-request-id", "req-42")
        .header("traceparent", tp)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["id"], "sku-1");
    assert_eq!(body["request_id"], "req-42");
    assert_eq!(body["traceparent"], tp);
    // Without one, none is made up.
    let res = http()
        .get(caller.url("/api/proxy/sku-2"))
        .send()
        .await
        .unwrap();
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["traceparent"], Value::Null);

    // A non-2xx from the callee becomes a 502 dependency_unavailable.
    let res = http()
        .get(caller.url("/api/proxy-broken"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "dependency_unavailable");

    // The typed errors, directly.
    let posted: Value = client
        .post_json("/api/items", &json!({"n": 1}))
        .await
        .unwrap();
    assert_eq!(posted["received"]["n"], 1);

    match client.get_json::<Value>("/api/broken").await {
        Err(Error::Status { status, body, .. }) => {
            assert_eq!(status, 409);
            assert!(body.contains("out_of_stock"), "{body}");
        }
        other => panic!("expected Status, got {other:?}"),
    }
    match client.get_json::<Value>("/api/not-json").await {
        Err(Error::BadJson { .. }) => {}
        other => panic!("expected BadJson, got {other:?}"),
    }
    let impatient = client
        .clone()
        .with_timeouts(Duration::from_secs(1), Duration::from_millis(200))
        .unwrap();
    match impatient.get_json::<Value>("/api/slow").await {
        Err(Error::Timeout { .. }) => {}
        other => panic!("expected Timeout, got {other:?}"),
    }

    caller.stop().await.unwrap();
    // The callee is gone: unreachable, and the caller's mapping says 503.
    callee.stop().await.unwrap();
    let err = client.get_json::<Value>("/api/items/x").await.unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
    assert_eq!(ApiError::from(err).status, 503);
}
