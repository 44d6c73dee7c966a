//! Handler tests against fake catalog and pricing servers on port 0,
//! reached through real chassis clients.

use std::net::SocketAddr;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::Path;
use axum::http::{Request, StatusCode};
use axum::routing::{get, post};
use flotilla_chassis::Service;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;
use crate::customer::USER_HEADER;

/// Serves `router` on a random port until the test's runtime ends.
async fn spawn(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// A port with nothing listening.
fn dead_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

fn fake_catalog() -> Router {
    Router::new().route(
        "/api/catalog/products/{id}",
        get(|Path(id): Path<String>| async move {
            let product = match id.as_str() {
                "sku-a" => json!({"id": "sku-a", "name": "Alpha", "price_cents": 1000, "currency": "EUR", "stock": 5, "description": "", "category": "x"}),
                "sku-b" => json!({"id": "sku-b", "name": "Beta", "price_cents": 250, "currency": "EUR", "stock": 100, "description": "", "category": "x"}),
                "sku-none" => json!({"id": "sku-none", "name": "Gone", "price_cents": 100, "currency": "EUR", "stock": 0, "description": "", "category": "x"}),
                _ => return flotilla_chassis::ApiError::not_found("no product").into_response(),
            };
            axum::Json(product).into_response()
        }),
    )
}

/// Sums at the given prices, 10 % off with WELCOME10, 20 % VAT; any other
/// coupon is rejected the way the real pricing does.
fn fake_pricing() -> Router {
    Router::new().route(
        "/api/pricing/quote",
        post(|axum::Json(req): axum::Json<Value>| async move {
            let coupon = req["coupon"].as_str();
            if coupon.is_some_and(|c| c != "WELCOME10") {
                return flotilla_chassis::ApiError::validation(vec![FieldError::new(
                    "coupon",
                    "unknown coupon",
                )])
                .into_response();
            }
            let lines: Vec<Value> = req["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| {
                    let gross = i["quantity"].as_i64().unwrap() * i["unit_price_cents"].as_i64().unwrap();
                    json!({"sku": i["sku"], "quantity": i["quantity"], "unit_price_cents": i["unit_price_cents"],
                           "gross_cents": gross, "discount_cents": 0, "line_total_cents": gross})
                })
                .collect();
            let subtotal: i64 = lines.iter().map(|l| l["line_total_cents"].as_i64().unwrap()).sum();
            let discount = if coupon.is_some() { subtotal / 10 } else { 0 };
            let tax = (subtotal - discount) / 5;
            axum::Json(json!({
                "lines": lines, "subtotal_cents": subtotal, "discount_cents": discount,
                "tax_cents": tax, "total_cents": subtotal - discount + tax,
                "currency": req["currency"], "coupon": coupon, "discounts": []
            }))
            .into_response()
        }),
    )
}

async fn app_with(catalog: SocketAddr, pricing: SocketAddr) -> Router {
    let catalog_url = format!("http://{catalog}");
    let pricing_url = format!("http://{pricing}");
    let service = Service::from_vars([
        ("FLOTILLA_SERVICE", "orders"),
        ("FLOTILLA_URL_CATALOG", catalog_url.as_str()),
        ("FLOTILLA_URL_PRICING", pricing_url.as_str()),
    ])
    .unwrap();
    let db = flotilla_chassis::open_sqlite("sqlite::memory:", &crate::MIGRATOR)
        .await
        .unwrap();
    router(AppState {
        db,
        catalog: service.client("catalog").unwrap(),
        pricing: service.client("pricing").unwrap(),
    })
}

async fn app() -> Router {
    app_with(spawn(fake_catalog()).await, spawn(fake_pricing()).await).await
}

async fn call(app: &Router, req: Request<Body>) -> (StatusCode, Option<String>, Value) {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let location = res
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = to_bytes(res.into_body(), 1 << 20).await.unwrap();
    (status, location, serde_json::from_slice(&bytes).unwrap())
}

/// Places an order as the user in the body's `customer` (the id the
/// gateway would pass from a verified token; removed from the body).
async fn place_order(app: &Router, mut body: Value) -> (StatusCode, Option<String>, Value) {
    let user = body.as_object_mut().and_then(|o| o.remove("customer"));
    let mut req = Request::post("/api/orders").header("content-type", "application/json");
    if let Some(user) = user.as_ref().and_then(Value::as_str) {
        req = req.header(USER_HEADER, user);
    }
    call(app, req.body(Body::from(body.to_string())).unwrap()).await
}

/// A GET as `user` (no user header when `None`).
async fn get_as(app: &Router, user: Option<&str>, uri: &str) -> (StatusCode, Value) {
    let mut req = Request::get(uri);
    if let Some(user) = user {
        req = req.header(USER_HEADER, user);
    }
    let (status, _, body) = call(app, req.body(Body::empty()).unwrap()).await;
    (status, body)
}

#[tokio::test]
async fn places_an_order_at_catalog_prices() {
    let app = app().await;
    let (status, location, order) = place_order(
        &app,
        json!({"customer": "alice@example.com", "items": [
            {"sku": "sku-a", "quantity": 2},
            {"sku": "sku-b", "quantity": 1},
            {"sku": "sku-a", "quantity": 1}
        ], "unit_price_cents": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    let id = order["id"].as_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok());
    assert_eq!(
        location.as_deref(),
        Some(format!("/api/orders/{id}").as_str())
    );
    assert_eq!(order["customer"], "alice@example.com");
    assert_eq!(order["status"], "placed");
    // Repeated SKUs merged; prices from the catalog.
    assert_eq!(order["lines"].as_array().unwrap().len(), 2);
    assert_eq!(order["lines"][0]["sku"], "sku-a");
    assert_eq!(order["lines"][0]["name"], "Alpha");
    assert_eq!(order["lines"][0]["quantity"], 3);
    assert_eq!(order["lines"][0]["unit_price_cents"], 1000);
    assert_eq!(order["subtotal_cents"], 3250);
    assert_eq!(order["tax_cents"], 650);
    assert_eq!(order["total_cents"], 3900);
    let created = order["created_at"].as_str().unwrap();
    assert_eq!(created.len(), "2025-01-01T00:00:00.000Z".len());
    assert!(created.ends_with('Z'));

    let (status, fetched) = get_as(
        &app,
        Some("alice@example.com"),
        &format!("/api/orders/{id}"),
    )
    .await;
    let (other, _) = get_as(&app, Some("mallory"), &format!("/api/orders/{id}")).await;
    assert_eq!(
        other,
        StatusCode::NOT_FOUND,
        "another user's order is not found"
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fetched, order);
}

#[tokio::test]
async fn lists_a_customers_orders_newest_first() {
    let app = app().await;
    let mut ids = Vec::new();
    for quantity in 1..=3 {
        let (status, _, order) = place_order(
            &app,
            json!({"customer": "bob@example.com", "items": [{"sku": "sku-b", "quantity": quantity}]}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
        ids.push(order["id"].as_str().unwrap().to_owned());
    }
    place_order(
        &app,
        json!({"customer": "carol@example.com", "items": [{"sku": "sku-b", "quantity": 1}]}),
    )
    .await;

    let (status, list) = get_as(&app, Some("bob@example.com"), "/api/orders").await;
    assert_eq!(status, StatusCode::OK);
    let got: Vec<&str> = list["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    let want: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    assert_eq!(got, want);
    assert_eq!(list["orders"][0]["lines"][0]["quantity"], 3);

    let (_, list) = get_as(&app, Some("bob@example.com"), "/api/orders?limit=1").await;
    assert_eq!(list["orders"].as_array().unwrap().len(), 1);
    let (_, list) = get_as(&app, Some("nobody@example.com"), "/api/orders").await;
    assert_eq!(list["orders"], json!([]));
}

#[tokio::test]
async fn unknown_sku_is_422_naming_it() {
    let app = app().await;
    let (status, _, e) = place_order(
        &app,
        json!({"customer": "a@example.com", "items": [
            {"sku": "sku-a", "quantity": 1}, {"sku": "sku-zzz", "quantity": 1}
        ]}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(e["error"]["code"], "unknown_sku");
    assert!(e["error"]["message"].as_str().unwrap().contains("sku-zzz"));
    assert_eq!(e["error"]["details"]["skus"], json!(["sku-zzz"]));
    assert_eq!(e["error"]["fields"][0]["field"], "items[1].sku");
}

#[tokio::test]
async fn insufficient_stock_is_409() {
    let app = app().await;
    let (status, _, e) = place_order(
        &app,
        json!({"customer": "a@example.com", "items": [{"sku": "sku-a", "quantity": 6}]}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(e["error"]["code"], "insufficient_stock");
    assert_eq!(e["error"]["details"]["items"][0]["available"], 5);
    let (_, list) = get_as(&app, Some("a@example.com"), "/api/orders").await;
    assert_eq!(list["orders"], json!([]), "nothing stored");
}

#[tokio::test]
async fn changed_price_is_409_with_the_new_total() {
    let app = app().await;
    let (status, _, e) = place_order(
        &app,
        json!({"customer": "a@example.com", "items": [{"sku": "sku-a", "quantity": 1}],
               "expected_total_cents": 999}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(e["error"]["code"], "price_changed");
    assert_eq!(e["error"]["details"]["total_cents"], 1200);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("12.00 EUR, not 9.99 EUR")
    );
    let (_, list) = get_as(&app, Some("a@example.com"), "/api/orders").await;
    assert_eq!(list["orders"], json!([]), "nothing stored");

    let (status, _, order) = place_order(
        &app,
        json!({"customer": "a@example.com", "items": [{"sku": "sku-a", "quantity": 1}],
               "expected_total_cents": 1200}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(order["total_cents"], 1200);
}

#[tokio::test]
async fn coupons_are_passed_to_pricing_and_rejections_are_field_errors() {
    let app = app().await;
    let (status, _, order) = place_order(
        &app,
        json!({"customer": "a@example.com", "items": [{"sku": "sku-a", "quantity": 1}], "coupon": "WELCOME10"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(order["coupon"], "WELCOME10");
    assert_eq!(order["discount_cents"], 100);

    let (status, _, e) = place_order(
        &app,
        json!({"customer": "a@example.com", "items": [{"sku": "sku-a", "quantity": 1}], "coupon": "NOPE"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(e["error"]["fields"][0]["field"], "coupon");
}

#[tokio::test]
async fn invalid_requests_list_every_field() {
    let app = app().await;
    let (status, _, e) = place_order(
        &app,
        json!({"customer": "u-1", "items": [
            {"sku": "bad sku!", "quantity": 1}, {"sku": "sku-a", "quantity": 0}
        ], "expected_total_cents": -5}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let fields: Vec<&str> = e["error"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        ["items[0].sku", "items[1].quantity", "expected_total_cents"]
    );

    let (status, _, e) = place_order(&app, json!({"customer": "a@example.com"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(e["error"]["fields"][0]["field"], "items");

    let (status, _, e) = place_order(&app, json!({"customer": "u-1", "items": "many"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(e["error"]["code"], "invalid_json");
}

#[tokio::test]
async fn dependencies_down_are_503_never_a_panic() {
    let pricing = spawn(fake_pricing()).await;
    let app = app_with(dead_port(), pricing).await;
    let (status, _, e) = place_order(
        &app,
        json!({"customer": "a@example.com", "items": [{"sku": "sku-a", "quantity": 1}]}),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(e["error"]["code"], "dependency_unavailable");
    assert_eq!(e["error"]["details"]["dependency"], "catalog");

    let catalog = spawn(fake_catalog()).await;
    let app = app_with(catalog, dead_port()).await;
    let (status, _, e) = place_order(
        &app,
        json!({"customer": "a@example.com", "items": [{"sku": "sku-a", "quantity": 1}]}),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(e["error"]["details"]["dependency"], "pricing");
}

#[tokio::test]
async fn a_broken_dependency_is_502() {
    let broken = spawn(Router::new().route(
        "/api/pricing/quote",
        post(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
    ))
    .await;
    let app = app_with(spawn(fake_catalog()).await, broken).await;
    let (status, _, e) = place_order(
        &app,
        json!({"customer": "a@example.com", "items": [{"sku": "sku-a", "quantity": 1}]}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(e["error"]["code"], "dependency_unavailable");
}

#[test]
fn amounts_read_as_money() {
    assert_eq!(amount(1920, "EUR"), "19.20 EUR");
    assert_eq!(amount(5, "EUR"), "0.05 EUR");
    assert_eq!(amount(-150, "EUR"), "-1.50 EUR");
}

#[tokio::test]
async fn reads_validate_and_404() {
    let app = app().await;
    let (status, e) = get_as(&app, None, "/api/orders").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(e["error"]["code"], "unauthenticated");
    let (status, e) = get_as(&app, Some("a@example.com"), "/api/orders?limit=0").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(e["error"]["fields"][0]["field"], "limit");
    let (status, e) = get_as(
        &app,
        Some("a@example.com"),
        "/api/orders/00000000-0000-4000-8000-000000000000",
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(e["error"]["code"], "not_found");
}

#[tokio::test]
async fn orders_need_a_verified_user() {
    let app = app().await;
    let (status, _, e) =
        place_order(&app, json!({"items": [{"sku": "sku-a", "quantity": 1}]})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(e["error"]["code"], "unauthenticated");
}
