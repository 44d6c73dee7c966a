//! Handler tests against fake catalog and pricing servers on port 0,
//! reached through real chassis clients.

use std::net::SocketAddr;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::Path;
use axum::http::{Request, StatusCode};
use axum::routing::{get, post};
use flotilla_chassis::{Service, USER_HEADER};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;

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

/// The app and its database (with the chassis inbox and outbox tables).
async fn setup(catalog: SocketAddr, pricing: SocketAddr) -> (Router, sqlx::SqlitePool) {
    setup_on(catalog, pricing, "sqlite::memory:").await
}

/// As [`setup`], on the database at `url`.
async fn setup_on(
    catalog: SocketAddr,
    pricing: SocketAddr,
    url: &str,
) -> (Router, sqlx::SqlitePool) {
    let catalog_url = format!("http://{catalog}");
    let pricing_url = format!("http://{pricing}");
    let service = Service::from_vars([
        ("FLOTILLA_SERVICE", "orders"),
        ("FLOTILLA_URL_CATALOG", catalog_url.as_str()),
        ("FLOTILLA_URL_PRICING", pricing_url.as_str()),
    ])
    .unwrap();
    let db = open(url).await;
    let app = router(AppState {
        db: db.clone(),
        catalog: service.client("catalog").unwrap(),
        pricing: service.client("pricing").unwrap(),
        relay: None,
    });
    (app, db)
}

/// The orders database at `url`, migrated, with the inbox and outbox.
async fn open(url: &str) -> sqlx::SqlitePool {
    let db = flotilla_chassis::open_sqlite(url, &crate::MIGRATOR)
        .await
        .unwrap();
    flotilla_chassis::Inbox::install(&db).await.unwrap();
    flotilla_chassis::Outbox::install(&db).await.unwrap();
    db
}

async fn app_with(catalog: SocketAddr, pricing: SocketAddr) -> Router {
    setup(catalog, pricing).await.0
}

async fn app() -> Router {
    app_with(spawn(fake_catalog()).await, spawn(fake_pricing()).await).await
}

async fn app_and_db() -> (Router, sqlx::SqlitePool) {
    setup(spawn(fake_catalog()).await, spawn(fake_pricing()).await).await
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
    // Every order pays with the test card that succeeds, unless the test
    // says otherwise (`"payment": null` leaves it out).
    if let Some(o) = body.as_object_mut() {
        match o.get("payment") {
            None => {
                o.insert("payment".into(), json!({"card": "4242 4242 4242 4242"}));
            }
            Some(Value::Null) => {
                o.remove("payment");
            }
            Some(_) => {}
        }
    }
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
        // A client's prices, per line and for the order, are ignored.
        json!({"customer": "alice@example.com", "items": [
            {"sku": "sku-a", "quantity": 2, "unit_price_cents": 1},
            {"sku": "sku-b", "quantity": 1, "unit_price_cents": 1, "line_total_cents": 1},
            {"sku": "sku-a", "quantity": 1}
        ], "unit_price_cents": 1, "total_cents": 1}),
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
async fn stock_is_left_to_inventory() {
    // More than the catalog shows: placed all the same; inventory decides
    // in the saga and the order is cancelled there if stock is short.
    let app = app().await;
    let (status, _, order) = place_order(
        &app,
        json!({"customer": "a@example.com", "items": [{"sku": "sku-a", "quantity": 6}]}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    assert_eq!(order["status"], "placed");
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

/// Pricing refusing what it was asked for any reason but the coupon
/// (here: a currency it does not quote) is 422: trying again cannot help.
#[tokio::test]
async fn an_order_pricing_refuses_is_unpriceable_not_unavailable() {
    let refusing = spawn(Router::new().route(
        "/api/pricing/quote",
        post(|| async {
            flotilla_chassis::ApiError::validation(vec![FieldError::new(
                "currency",
                "only EUR is quoted",
            )])
            .into_response()
        }),
    ))
    .await;
    let app = app_with(spawn(fake_catalog()).await, refusing).await;
    let (status, _, e) = place_order(
        &app,
        json!({"customer": "a@example.com", "items": [{"sku": "sku-a", "quantity": 1}]}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert_eq!(e["error"]["code"], "unpriceable");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains("currency only EUR is quoted"), "{message}");
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

/// The events waiting in the outbox, oldest first, as (topic, event).
async fn outbox(db: &sqlx::SqlitePool) -> Vec<(String, Value)> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT topic, event FROM flotilla_outbox ORDER BY seq")
            .fetch_all(db)
            .await
            .unwrap();
    rows.into_iter()
        .map(|(topic, event)| (topic, serde_json::from_str(&event).unwrap()))
        .collect()
}

/// POSTs a CloudEvent the way the broker pushes it.
async fn push(app: &Router, path: &str, event: &Value) -> (StatusCode, Value) {
    let req = Request::post(path)
        .header("content-type", "application/cloudevents+json")
        .body(Body::from(event.to_string()))
        .unwrap();
    let (status, _, body) = call(app, req).await;
    (status, body)
}

fn cloudevent(id: &str, source: &str, ty: &str, data: Value) -> Value {
    json!({"specversion": "1.0", "id": id, "source": source, "type": ty,
           "customer": data["customer"], "orderid": data["order_id"], "data": data})
}

/// Places a one-line order as alice and returns its id.
async fn placed_order(app: &Router) -> String {
    let (status, _, order) = place_order(
        app,
        json!({"customer": "alice", "items": [{"sku": "sku-a", "quantity": 2}]}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    order["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn placing_enqueues_order_placed_in_the_same_transaction() {
    let (app, db) = app_and_db().await;
    let (status, _, order) = place_order(
        &app,
        json!({"customer": "alice", "items": [{"sku": "sku-a", "quantity": 2}],
               "payment": {"card": "4000 0000 0000 0002"}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    assert_eq!(order["status"], "placed");
    assert_eq!(order["card_last4"], "0002");
    assert_eq!(order["history"][0]["status"], "placed");
    assert_eq!(order["history"].as_array().unwrap().len(), 1);
    let text = order.to_string();
    assert!(!text.contains("4000000000000002") && !text.contains("payment_token"));

    let events = outbox(&db).await;
    assert_eq!(events.len(), 1);
    let (topic, event) = &events[0];
    assert_eq!(topic, "orders");
    assert_eq!(event["type"], "order.placed");
    assert_eq!(event["source"], "/orders");
    assert_eq!(event["customer"], "alice");
    assert_eq!(event["orderid"], order["id"]);
    let data = &event["data"];
    assert_eq!(data["order_id"], order["id"]);
    assert_eq!(data["customer"], "alice");
    assert_eq!(
        data["items"],
        json!([{"sku": "sku-a", "quantity": 2, "unit_price_cents": 1000, "line_total_cents": 2000}])
    );
    assert_eq!(data["total_cents"], 2400);
    assert_eq!(data["currency"], "EUR");
    assert_eq!(data["card_last4"], "0002");
    assert_eq!(data["payment_token"], "4000000000000002");
}

#[tokio::test]
async fn a_card_that_cannot_be_one_is_422_and_nothing_is_stored() {
    let (app, db) = app_and_db().await;
    for payment in [
        json!(null),
        json!({"card": "1234"}),
        json!({"card": "4242-4242-4242-4242"}),
        json!({"card": "4242 4242 4242 4242 4242"}),
        json!({}),
    ] {
        let (status, _, e) = place_order(
            &app,
            json!({"customer": "alice", "items": [{"sku": "sku-a", "quantity": 1}], "payment": payment}),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{payment}: {e}");
        assert_eq!(e["error"]["code"], "invalid_card");
        assert_eq!(e["error"]["fields"][0]["field"], "payment.card");
    }
    let (_, list) = get_as(&app, Some("alice"), "/api/orders").await;
    assert_eq!(list["orders"], json!([]));
    assert!(outbox(&db).await.is_empty());
}

#[tokio::test]
async fn payment_succeeded_confirms_once() {
    let (app, db) = app_and_db().await;
    let id = placed_order(&app).await;
    let paid = cloudevent(
        "p-1",
        "/payments",
        "payment.succeeded",
        json!({"order_id": id, "customer": "alice", "amount_cents": 2400, "charge_id": "ch_1"}),
    );
    let (status, body) = push(&app, "/events/payments", &paid).await;
    assert_eq!(
        (status, &body["outcome"]),
        (StatusCode::OK, &json!("confirmed"))
    );
    // The broker redelivers: the inbox recognises it.
    let (status, body) = push(&app, "/events/payments", &paid).await;
    assert_eq!(
        (status, &body["outcome"]),
        (StatusCode::OK, &json!("duplicate"))
    );

    let (_, order) = get_as(&app, Some("alice"), &format!("/api/orders/{id}")).await;
    assert_eq!(order["status"], "confirmed");
    assert!(order.get("reason").is_none());
    let steps: Vec<&str> = order["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["placed", "confirmed"]);

    let events = outbox(&db).await;
    assert_eq!(events.len(), 2, "order.placed, then order.confirmed once");
    let (topic, confirmed) = &events[1];
    assert_eq!(topic, "orders");
    assert_eq!(confirmed["type"], "order.confirmed");
    assert_eq!(confirmed["customer"], "alice");
    assert_eq!(confirmed["orderid"], json!(id));
    assert_eq!(confirmed["data"]["total_cents"], 2400);
    assert_eq!(confirmed["data"]["items"][0]["sku"], "sku-a");
    assert!(confirmed["data"].get("reason").is_none());
    assert!(!confirmed.to_string().contains("payment_token"));
}

#[tokio::test]
async fn transitions_only_leave_placed() {
    let (app, db) = app_and_db().await;
    let id = placed_order(&app).await;
    let rejected = cloudevent(
        "s-1",
        "/inventory",
        "stock.rejected",
        json!({"order_id": id, "customer": "alice", "reason": "out_of_stock", "sku": "sku-a"}),
    );
    let (_, body) = push(&app, "/events/stock", &rejected).await;
    assert_eq!(body["outcome"], "cancelled");
    // A late, different event for the same order changes nothing.
    let paid = cloudevent(
        "p-1",
        "/payments",
        "payment.succeeded",
        json!({"order_id": id, "customer": "alice"}),
    );
    let (status, body) = push(&app, "/events/payments", &paid).await;
    assert_eq!(
        (status, &body["outcome"]),
        (StatusCode::OK, &json!("unchanged"))
    );

    let (_, order) = get_as(&app, Some("alice"), &format!("/api/orders/{id}")).await;
    assert_eq!(order["status"], "cancelled");
    assert_eq!(order["reason"], "out_of_stock");
    assert_eq!(order["history"][1]["reason"], "out_of_stock");
    let events = outbox(&db).await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].1["type"], "order.cancelled");
    assert_eq!(events[1].1["data"]["reason"], "out_of_stock");

    // Payment declined cancels with its own reason.
    let id = placed_order(&app).await;
    let failed = cloudevent(
        "p-2",
        "/payments",
        "payment.failed",
        json!({"order_id": id, "customer": "alice", "reason": "card_declined"}),
    );
    let (_, body) = push(&app, "/events/payments", &failed).await;
    assert_eq!(body["outcome"], "cancelled");
    let (_, order) = get_as(&app, Some("alice"), &format!("/api/orders/{id}")).await;
    assert_eq!(order["reason"], "payment_declined");
}

#[tokio::test]
async fn events_about_unknown_orders_or_of_other_types_are_acknowledged() {
    let (app, db) = app_and_db().await;
    let unknown = cloudevent(
        "p-1",
        "/payments",
        "payment.succeeded",
        json!({"order_id": "nope", "customer": "alice"}),
    );
    let (status, body) = push(&app, "/events/payments", &unknown).await;
    assert_eq!(
        (status, &body["outcome"]),
        (StatusCode::OK, &json!("unchanged"))
    );
    let other = cloudevent(
        "s-1",
        "/inventory",
        "stock.reserved",
        json!({"order_id": "x"}),
    );
    let (status, body) = push(&app, "/events/stock", &other).await;
    assert_eq!(
        (status, &body["outcome"]),
        (StatusCode::OK, &json!("ignored"))
    );
    assert!(outbox(&db).await.is_empty());
}

#[tokio::test]
async fn malformed_events_are_4xx_so_the_broker_dead_letters_them() {
    let app = app().await;
    let (status, _) = push(&app, "/events/payments", &json!({"id": "1"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let no_order = cloudevent("p-1", "/payments", "payment.failed", json!({"reason": "x"}));
    let (status, _) = push(&app, "/events/payments", &no_order).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let req = Request::post("/events/stock")
        .header("content-type", "text/plain")
        .body(Body::from("hi"))
        .unwrap();
    let (status, _, _) = call(&app, req).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

/// Places `body` as `user` with `Idempotency-Key: key`; the response's
/// status, `Idempotent-Replayed` and body.
async fn place_keyed(
    app: &Router,
    user: &str,
    key: &str,
    body: &Value,
) -> (StatusCode, Option<String>, Value) {
    let req = Request::post("/api/orders")
        .header("content-type", "application/json")
        .header(USER_HEADER, user)
        .header(IDEMPOTENCY_KEY, key)
        .body(Body::from(body.to_string()))
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let replayed = res
        .headers()
        .get(IDEMPOTENT_REPLAYED)
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = to_bytes(res.into_body(), 1 << 20).await.unwrap();
    (status, replayed, serde_json::from_slice(&bytes).unwrap())
}

async fn orders_stored(db: &sqlx::SqlitePool) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM orders")
        .fetch_one(db)
        .await
        .unwrap()
}

/// A placement retried with its key (its answer lost) is answered with
/// the order it placed: one order, one `order.placed`, one charge.
#[tokio::test]
async fn a_retried_placement_with_its_key_places_one_order() {
    let (app, db) = app_and_db().await;
    let body = json!({"items": [{"sku": "sku-a", "quantity": 2}], "payment": {"card": "4242 4242 4242 4242"}});
    let (status, replayed, first) = place_keyed(&app, "alice", "checkout-1", &body).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(replayed, None);
    // The draft's structured-field spelling is the same key.
    for key in ["checkout-1", "\"checkout-1\""] {
        let (status, replayed, again) = place_keyed(&app, "alice", key, &body).await;
        assert_eq!(status, StatusCode::CREATED, "{again}");
        assert_eq!(replayed.as_deref(), Some("true"));
        assert_eq!(again["id"], first["id"]);
        assert_eq!(again["total_cents"], first["total_cents"]);
    }
    assert_eq!(orders_stored(&db).await, 1);
    assert_eq!(outbox(&db).await.len(), 1);

    // The same key with another order is the client's mistake, said so.
    let other = json!({"items": [{"sku": "sku-a", "quantity": 3}], "payment": {"card": "4242 4242 4242 4242"}});
    let (status, _, err) = place_keyed(&app, "alice", "checkout-1", &other).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(err["error"]["code"], "idempotency_key_reused");
    assert_eq!(orders_stored(&db).await, 1);

    // A key is its customer's own: bob's `checkout-1` is bob's order.
    let (status, replayed, bobs) = place_keyed(&app, "bob", "checkout-1", &body).await;
    assert_eq!(status, StatusCode::CREATED, "{bobs}");
    assert_eq!(replayed, None);
    assert_ne!(bobs["id"], first["id"]);
    assert_eq!(bobs["customer"], "bob");
    assert_eq!(orders_stored(&db).await, 2);
}

/// Retries that race (the gateway's and the client's) still place one
/// order: the key is taken in the order's own transaction.
#[tokio::test]
async fn racing_retries_with_one_key_place_one_order() {
    let (app, db) = app_and_db().await;
    let body = json!({"items": [{"sku": "sku-b", "quantity": 1}], "payment": {"card": "4242 4242 4242 4242"}});
    let answers =
        futures_util::future::join_all((0..8).map(|_| place_keyed(&app, "alice", "race-1", &body)))
            .await;
    let first = &answers[0].2["id"];
    for (status, _, order) in &answers {
        assert_eq!(*status, StatusCode::CREATED, "{order}");
        assert_eq!(&order["id"], first);
    }
    assert_eq!(
        answers.iter().filter(|(_, r, _)| r.is_none()).count(),
        1,
        "exactly one answer placed the order"
    );
    assert_eq!(orders_stored(&db).await, 1);
    assert_eq!(outbox(&db).await.len(), 1);
}

#[tokio::test]
async fn a_malformed_idempotency_key_is_refused() {
    let (app, db) = app_and_db().await;
    let body = json!({"items": [{"sku": "sku-b", "quantity": 1}], "payment": {"card": "4242 4242 4242 4242"}});
    let long = "k".repeat(MAX_IDEMPOTENCY_KEY_LEN + 1);
    for key in ["", "\"\"", "two words", long.as_str(), "\"a\"b\""] {
        let (status, _, err) = place_keyed(&app, "alice", key, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{key:?}: {err}");
        assert_eq!(err["error"]["code"], "invalid_idempotency_key", "{key:?}");
    }
    assert_eq!(orders_stored(&db).await, 0);
}

// ---- The saga's deadline (crate::sweeper) ---------------------------------

use crate::sweeper;

/// Makes order `id` look placed long ago.
async fn age(db: &sqlx::SqlitePool, id: &str) {
    sqlx::query("UPDATE orders SET created_at = '2020-01-01T00:00:00.000Z' WHERE id = ?1")
        .bind(id)
        .execute(db)
        .await
        .unwrap();
}

/// The `order.cancelled` events in the outbox, as (order id, reason).
async fn cancellations(db: &sqlx::SqlitePool) -> Vec<(String, String)> {
    outbox(db)
        .await
        .iter()
        .filter(|(_, e)| e["type"] == "order.cancelled")
        .map(|(_, e)| {
            (
                e["orderid"].as_str().unwrap().to_owned(),
                e["data"]["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Pushes `payment.succeeded` (event `event_id`) for `order`; the outcome.
async fn paid(app: &Router, event_id: &str, order: &str) -> Value {
    let event = cloudevent(
        event_id,
        "/payments",
        "payment.succeeded",
        json!({"order_id": order, "customer": "alice"}),
    );
    push(app, "/events/payments", &event).await.1["outcome"].clone()
}

const DEADLINE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Held by every test that sweeps, so that one can count exactly what its
/// own sweep adds to the process's `shop_orders_saga_timeouts_total`.
static SWEEPS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `shop_orders_saga_timeouts_total` as `/metrics` shows it (0 before its
/// first increment).
fn timeouts_counted() -> u64 {
    flotilla_chassis::metrics::prometheus_handle()
        .render()
        .lines()
        .find_map(|line| line.strip_prefix("shop_orders_saga_timeouts_total "))
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[tokio::test]
async fn the_sweeper_cancels_orders_placed_past_the_deadline_only() {
    let (app, db) = app_and_db().await;
    let stuck = placed_order(&app).await;
    age(&db, &stuck).await;
    let young = placed_order(&app).await;
    // Old too, but their sagas ended: not the sweeper's.
    let confirmed = placed_order(&app).await;
    assert_eq!(paid(&app, "p-1", &confirmed).await, "confirmed");
    age(&db, &confirmed).await;
    let rejected = placed_order(&app).await;
    let short = cloudevent(
        "s-1",
        "/inventory",
        "stock.rejected",
        json!({"order_id": rejected, "customer": "alice", "reason": "out_of_stock"}),
    );
    assert_eq!(
        push(&app, "/events/stock", &short).await.1["outcome"],
        "cancelled"
    );
    age(&db, &rejected).await;

    let sweeping = SWEEPS.lock().await;
    let counted = timeouts_counted();
    assert_eq!(sweeper::sweep(&db, DEADLINE, None).await.unwrap(), 1);
    assert_eq!(
        timeouts_counted(),
        counted + 1,
        "shop_orders_saga_timeouts_total counts it"
    );
    drop(sweeping);
    let (_, order) = get_as(&app, Some("alice"), &format!("/api/orders/{stuck}")).await;
    assert_eq!(order["status"], "cancelled", "{order}");
    assert_eq!(order["reason"], "timed_out");
    let last = order["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (&last["status"], &last["reason"]),
        (&json!("cancelled"), &json!("timed_out"))
    );
    for (id, status) in [
        (&young, "placed"),
        (&confirmed, "confirmed"),
        (&rejected, "cancelled"),
    ] {
        let (_, order) = get_as(&app, Some("alice"), &format!("/api/orders/{id}")).await;
        assert_eq!(order["status"], status, "{order}");
        assert_ne!(order["reason"], "timed_out", "{order}");
    }
    // Announced like any cancellation, in the same transaction.
    assert_eq!(
        cancellations(&db).await,
        [
            (rejected.clone(), "out_of_stock".to_owned()),
            (stuck.clone(), "timed_out".to_owned())
        ]
    );
    let (topic, event) = outbox(&db).await.pop().unwrap();
    assert_eq!(topic, "orders");
    assert_eq!(event["customer"], "alice");
    assert_eq!(event["data"]["items"][0]["sku"], "sku-a");
    assert_eq!(event["data"]["total_cents"], 2400);

    // Swept again: nothing more. A late payment changes nothing either.
    assert_eq!(sweeper::sweep(&db, DEADLINE, None).await.unwrap(), 0);
    assert_eq!(paid(&app, "p-2", &stuck).await, "unchanged");
    let (_, order) = get_as(&app, Some("alice"), &format!("/api/orders/{stuck}")).await;
    assert_eq!(
        (&order["status"], &order["reason"]),
        (&json!("cancelled"), &json!("timed_out"))
    );
    assert_eq!(cancellations(&db).await.len(), 2);
}

#[tokio::test]
async fn replicas_sweeping_at_once_cancel_each_order_once() {
    let _sweeping = SWEEPS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("orders.db").display());
    let (app, one) = setup_on(
        spawn(fake_catalog()).await,
        spawn(fake_pricing()).await,
        &url,
    )
    .await;
    // A second replica: its own pool on the same file.
    let other = open(&url).await;

    // Both read the same batch before either cancels: the guarded update
    // lets one through.
    let id = placed_order(&app).await;
    age(&one, &id).await;
    let cutoff = flotilla_chassis::now_rfc3339();
    let from_oldest = store::PlacedKey::default();
    let ids = |page: Vec<store::PlacedKey>| page.into_iter().map(|k| k.id).collect::<Vec<_>>();
    let seen_one = store::placed_before(&one, &cutoff, &from_oldest, sweeper::BATCH)
        .await
        .unwrap();
    let seen_other = store::placed_before(&other, &cutoff, &from_oldest, sweeper::BATCH)
        .await
        .unwrap();
    assert_eq!(
        (ids(seen_one), ids(seen_other)),
        (vec![id.clone()], vec![id.clone()])
    );
    assert!(sweeper::cancel(&one, &id).await.unwrap());
    assert!(!sweeper::cancel(&other, &id).await.unwrap());
    assert_eq!(
        cancellations(&one).await,
        [(id.clone(), "timed_out".to_owned())]
    );

    // Whole sweeps at once, over more orders.
    let mut ids = Vec::new();
    for _ in 0..30 {
        let id = placed_order(&app).await;
        age(&one, &id).await;
        ids.push(id);
    }
    let (a, b) = tokio::join!(
        sweeper::sweep(&one, DEADLINE, None),
        sweeper::sweep(&other, DEADLINE, None)
    );
    assert_eq!(a.unwrap() + b.unwrap(), 30);
    let mut cancelled: Vec<String> = cancellations(&one)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    cancelled.sort();
    let mut expected: Vec<String> = ids.iter().chain([&id]).cloned().collect();
    expected.sort();
    assert_eq!(
        cancelled, expected,
        "each order cancelled and announced once"
    );
    other.close().await;
    one.close().await;
}

#[tokio::test]
async fn the_sweep_reads_the_index_of_placed_orders() {
    let db = open("sqlite::memory:").await;
    let explain = format!("EXPLAIN QUERY PLAN {}", store::PLACED_BEFORE);
    let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(explain))
        .bind("2020-01-01T00:00:00.000Z")
        .bind("2019-01-01T00:00:00.000Z")
        .bind("o_1")
        .bind(100)
        .fetch_all(&db)
        .await
        .unwrap();
    let plan: Vec<&str> = plan.iter().map(|row| row.3.as_str()).collect();
    // The plan's wording is SQLite's and may change; what it names is not.
    assert!(
        plan.len() == 1
            && plan[0].starts_with("SEARCH orders USING ")
            && plan[0].contains("INDEX orders_placed_by_age "),
        "no scan, no sort: {plan:?}"
    );
}

/// An order the sweeper cannot cancel (here a row that no longer decodes)
/// is passed over and counted: the orders after it are still cancelled.
#[tokio::test]
async fn an_order_that_cannot_be_cancelled_does_not_stop_the_sweep() {
    let _sweeping = SWEEPS.lock().await;
    let (app, db) = app_and_db().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = placed_order(&app).await;
        age(&db, &id).await;
        ids.push(id);
    }
    ids.sort();
    // The first in the sweep's order (same age: by id) is broken.
    sqlx::query("UPDATE orders SET customer = X'FF' WHERE id = ?1")
        .bind(&ids[0])
        .execute(&db)
        .await
        .unwrap();
    assert_eq!(sweeper::sweep(&db, DEADLINE, None).await.unwrap(), 2);
    let cancelled: Vec<String> = cancellations(&db)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(cancelled.len(), 2);
    assert!(!cancelled.contains(&ids[0]), "{cancelled:?}");
    let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = ?1")
        .bind(&ids[0])
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(status, "placed");
}
