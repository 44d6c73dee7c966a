//! The catalog's HTTP API: product search and lookup, read-only. A single
//! product comes with its reviews from the `reviews` service (a Python
//! service: the catalog neither knows nor cares), and without them when
//! reviews is down: the catalog degrades, it does not fail. The one write,
//! `POST /events/stock`, is the broker's (see [`crate::events`]).

use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::HeaderValue;
use axum::response::Response;
use axum::routing::{get, post};
use flotilla_chassis::{ApiError, ApiQuery, Client, FieldError, int_param};
use serde::Deserialize;
use serde_json::json;
use sqlx::SqlitePool;

use crate::events;
use crate::store::{self, Page, Product, Search};

/// Page size when `limit` is absent.
pub const DEFAULT_LIMIT: i64 = 50;
/// Largest page.
pub const MAX_LIMIT: i64 = 100;
/// Deepest offset: past it, narrow the search instead of paging.
pub const MAX_OFFSET: i64 = 10_000;
/// Longest search text or category.
pub const MAX_TEXT: usize = 100;

/// The header naming the instance that answered, so tests and people can
/// watch load balancing.
pub const SERVED_BY: &str = "x-served-by";

/// How long a product page waits for its reviews before showing it
/// without them.
pub const REVIEWS_TIMEOUT: Duration = Duration::from_millis(1500);

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) db: SqlitePool,
    /// The `reviews` dependency, when the service declares it.
    reviews: Option<Client>,
}

/// A product with what customers say about it.
#[derive(Debug, serde::Serialize)]
pub struct ProductPage {
    #[serde(flatten)]
    product: Product,
    /// The reviews service's answer; `null` when it could not be reached
    /// in time (the page is still served).
    reviews: Option<serde_json::Value>,
}

/// Query parameters, as text so bad numbers get a field error.
#[derive(Debug, Default, Deserialize)]
pub struct ListParams {
    q: Option<String>,
    category: Option<String>,
    limit: Option<String>,
    offset: Option<String>,
}

/// `GET /api/catalog/products/{id}` parameters.
#[derive(Debug, Default, Deserialize)]
pub struct OneParams {
    /// `false`: the product alone, without asking reviews. For services
    /// (orders looks up every line of an order), which have no use for
    /// reviews and should not wait up to `REVIEWS_TIMEOUT` for them.
    reviews: Option<String>,
}

/// The routes, with `x-served-by: <instance>` on every response. `reviews`
/// is the client of the reviews service, if there is one.
pub fn router(db: SqlitePool, instance: &str, reviews: Option<Client>) -> Router {
    let served_by = HeaderValue::from_str(instance).ok();
    Router::new()
        .route("/api/catalog/products", get(list))
        .route("/api/catalog/products/{id}", get(one))
        // Pushed by the broker (queue catalog-stock); never a gateway route.
        .route("/events/stock", post(events::stock))
        .fallback(flotilla_chassis::not_found)
        .with_state(AppState { db, reviews })
        .layer(axum::middleware::map_response(move |mut res: Response| {
            let served_by = served_by.clone();
            async move {
                if let Some(value) = served_by {
                    res.headers_mut().insert(SERVED_BY, value);
                }
                res
            }
        }))
}

async fn list(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<axum::Json<Page>, ApiError> {
    let search = parse(params).map_err(ApiError::validation)?;
    Ok(axum::Json(store::search(&state.db, &search).await?))
}

async fn one(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(params): ApiQuery<OneParams>,
) -> Result<axum::Json<ProductPage>, ApiError> {
    let with_reviews = match params.reviews.as_deref() {
        None | Some("true") => true,
        Some("false") => false,
        Some(_) => {
            return Err(ApiError::validation(vec![FieldError::new(
                "reviews",
                "must be true or false",
            )]));
        }
    };
    let Some(product) = store::get(&state.db, &id).await? else {
        return Err(ApiError::not_found(format!("no product with id {id:?}"))
            .with_details(json!({ "id": id })));
    };
    let reviews = match &state.reviews {
        Some(client) if with_reviews => reviews_of(client, &product.id).await,
        _ => None,
    };
    Ok(axum::Json(ProductPage { product, reviews }))
}

/// The product's reviews, or `None` (logged) when the reviews service
/// fails or is slow: a product page without reviews beats no page.
async fn reviews_of(client: &Client, id: &str) -> Option<serde_json::Value> {
    let path = format!("/api/reviews/{id}");
    let call = client.get_json::<serde_json::Value>(&path);
    match tokio::time::timeout(REVIEWS_TIMEOUT, call).await {
        Ok(Ok(mut reviews)) => {
            if let Some(obj) = reviews.as_object_mut() {
                obj.remove("product_id");
            }
            Some(reviews)
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %flotilla_chassis::error_chain(&e), product = id, "reviews unavailable; serving the product without them");
            None
        }
        Err(_) => {
            tracing::warn!(product = id, timeout = ?REVIEWS_TIMEOUT, "reviews too slow; serving the product without them");
            None
        }
    }
}

/// Validates the parameters, reporting every bad one.
fn parse(params: ListParams) -> Result<Search, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut text_param = |name: &str, value: Option<String>| -> Option<String> {
        let value = value?;
        // Counted as sent (the OpenAPI maxLength): folding can change the
        // count, `İ` being two characters in lower case.
        if value.chars().count() > MAX_TEXT {
            errors.push(FieldError::new(
                name,
                format!("must be at most {MAX_TEXT} characters"),
            ));
            return None;
        }
        // ASCII only, as SQLite's lower() folds what it is compared with:
        // `É` folded here would never match the `É` it leaves in a name.
        let value = value.trim().to_ascii_lowercase();
        (!value.is_empty()).then_some(value)
    };
    let text = text_param("q", params.q);
    let category = text_param("category", params.category);
    let limit = number(
        &mut errors,
        "limit",
        params.limit,
        DEFAULT_LIMIT,
        1,
        MAX_LIMIT,
    );
    let offset = number(&mut errors, "offset", params.offset, 0, 0, MAX_OFFSET);
    if errors.is_empty() {
        Ok(Search {
            text,
            category,
            limit,
            offset,
        })
    } else {
        Err(errors)
    }
}

fn number(
    errors: &mut Vec<FieldError>,
    name: &str,
    value: Option<String>,
    default: i64,
    min: i64,
    max: i64,
) -> i64 {
    int_param(name, value.as_deref(), default, min..=max).unwrap_or_else(|e| {
        errors.push(e);
        default
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{Body, to_bytes};
    use axum::http::{Request, StatusCode};
    use serde_json::Value;
    use tower::ServiceExt;

    async fn db() -> SqlitePool {
        flotilla_chassis::open_sqlite("sqlite::memory:", &crate::MIGRATOR)
            .await
            .unwrap()
    }

    async fn get(app: &Router, uri: &str) -> (StatusCode, Option<String>, Value) {
        let res = app
            .clone()
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let served_by = res
            .headers()
            .get(SERVED_BY)
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = to_bytes(res.into_body(), 1 << 20).await.unwrap();
        (status, served_by, serde_json::from_slice(&bytes).unwrap())
    }

    fn skus(page: &Value) -> Vec<&str> {
        page["products"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn lists_the_seeded_products() {
        let app = router(db().await, "catalog-1", None);
        let (status, served_by, page) = get(&app, "/api/catalog/products").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(served_by.as_deref(), Some("catalog-1"));
        assert_eq!(page["total"], 12);
        assert_eq!(page["limit"], DEFAULT_LIMIT);
        let first = &page["products"][0];
        assert_eq!(first["currency"], "EUR");
        assert!(first["price_cents"].is_i64());
        assert!(first["image"].as_str().unwrap().starts_with("images/"));
    }

    #[tokio::test]
    async fn searches_case_insensitively() {
        let app = router(db().await, "catalog-0", None);
        // In a name.
        let (_, _, page) = get(&app, "/api/catalog/products?q=ESPRESSO").await;
        assert_eq!(
            skus(&page),
            ["sku-croissant", "sku-grinder", "sku-espresso"]
        );
        // In a category.
        let (_, _, page) = get(&app, "/api/catalog/products?q=Tea").await;
        assert_eq!(page["total"], 3);
        // Category filter combined with text.
        let (_, _, page) = get(&app, "/api/catalog/products?category=Coffee&q=roast").await;
        assert_eq!(skus(&page), ["sku-espresso", "sku-filter"]);
        // Wildcards are plain text.
        let (_, _, page) = get(&app, "/api/catalog/products?q=%25").await;
        assert_eq!(page["total"], 0);
    }

    /// SQLite's lower() folds ASCII letters only, and so does the search:
    /// a name or category with an upper-case `É` is found by `É` (any
    /// case of its ASCII letters), not by `é`.
    #[tokio::test]
    async fn searches_non_ascii_text_case_insensitively_for_ascii_letters() {
        let db = db().await;
        sqlx::query(
            "INSERT INTO products (id, name, description, price_cents, currency, stock, category)
             VALUES ('sku-eclair', 'Éclair au café', 'Choux pastry', 350, 'EUR', 5, 'Épicerie')",
        )
        .execute(&db)
        .await
        .unwrap();
        let app = router(db, "catalog-0", None);
        for query in [
            "q=%C3%89CLAIR",          // ÉCLAIR
            "q=%C3%89clair",          // Éclair
            "q=CAF%C3%A9",            // CAFé
            "q=%C3%89PICERIE",        // ÉPICERIE, in the category
            "category=%C3%89picerie", // Épicerie
            "category=%C3%89PICERIE", // ÉPICERIE
        ] {
            let (status, _, page) = get(&app, &format!("/api/catalog/products?{query}")).await;
            assert_eq!(status, StatusCode::OK, "{query}");
            assert_eq!(skus(&page), ["sku-eclair"], "{query}: {page}");
        }
        // Only ASCII letters are folded.
        let (_, _, page) = get(&app, "/api/catalog/products?q=%C3%A9clair").await;
        assert_eq!(page["total"], 0, "éclair: {page}");
    }

    #[tokio::test]
    async fn pages_with_limit_and_offset() {
        let app = router(db().await, "catalog-0", None);
        let (_, _, all) = get(&app, "/api/catalog/products?limit=100").await;
        let (_, _, page) = get(&app, "/api/catalog/products?limit=5&offset=10").await;
        assert_eq!(page["total"], 12);
        assert_eq!(skus(&page), skus(&all)[10..]);
    }

    #[tokio::test]
    async fn bad_parameters_are_field_errors() {
        let app = router(db().await, "catalog-0", None);
        let (status, _, e) = get(&app, "/api/catalog/products?limit=0&offset=-1").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(e["error"]["code"], "invalid_request");
        assert_eq!(e["error"]["fields"][0]["field"], "limit");
        assert_eq!(e["error"]["fields"][1]["field"], "offset");
        let (status, _, _) = get(&app, "/api/catalog/products?limit=abc").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _, _) = get(&app, "/api/catalog/products?limit=101").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let long = "x".repeat(101);
        let (status, _, e) = get(&app, &format!("/api/catalog/products?q={long}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(e["error"]["fields"][0]["field"], "q");
        // The limit is of the characters sent: 100 `İ` are 100, though
        // 200 in lower case.
        for (n, want) in [(100, StatusCode::OK), (101, StatusCode::BAD_REQUEST)] {
            let dotted = "%C4%B0".repeat(n);
            for name in ["q", "category"] {
                let uri = format!("/api/catalog/products?{name}={dotted}");
                let (status, _, e) = get(&app, &uri).await;
                assert_eq!(status, want, "{n} İ in {name}: {e}");
            }
        }
    }

    #[tokio::test]
    async fn one_product_or_404() {
        let app = router(db().await, "catalog-0", None);
        let (status, _, p) = get(&app, "/api/catalog/products/sku-grinder").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(p["price_cents"], 12900);
        assert_eq!(p["stock"], 8);
        let (status, served_by, e) = get(&app, "/api/catalog/products/sku-nope").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(served_by.as_deref(), Some("catalog-0"));
        assert_eq!(e["error"]["code"], "not_found");
        assert_eq!(e["error"]["details"]["id"], "sku-nope");
        let (status, _, e) = get(&app, "/api/catalog/nothing-here").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(e["error"]["code"], "not_found");
    }

    #[tokio::test]
    async fn a_product_is_served_without_reviews_when_reviews_is_down() {
        // Bind then drop a listener: a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let service = flotilla_chassis::Service::from_vars([
            ("FLOTILLA_SERVICE", "catalog".to_string()),
            ("FLOTILLA_URL_REVIEWS", format!("http://127.0.0.1:{port}")),
        ])
        .unwrap();
        let reviews = service.client("reviews").unwrap();
        let app = router(db().await, "catalog-0", Some(reviews));
        let (status, _, p) = get(&app, "/api/catalog/products/sku-espresso").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(p["id"], "sku-espresso");
        assert_eq!(p["reviews"], Value::Null);
    }

    /// `?reviews=false` is the product alone: reviews is not asked (so a
    /// slow reviews cannot hold up the order that looks the product up).
    #[tokio::test]
    async fn a_product_without_reviews_does_not_ask_reviews() {
        let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = asked.clone();
        let fake = Router::new().route(
            "/api/reviews/{id}",
            axum::routing::get(move || {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { axum::Json(json!({"count": 1, "reviews": []})) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, fake).await });
        let service = flotilla_chassis::Service::from_vars([
            ("FLOTILLA_SERVICE", "catalog".to_string()),
            ("FLOTILLA_URL_REVIEWS", format!("http://127.0.0.1:{port}")),
        ])
        .unwrap();
        let app = router(db().await, "catalog-0", service.client("reviews").ok());
        let path = "/api/catalog/products/sku-espresso";
        let (status, _, p) = get(&app, &format!("{path}?reviews=false")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(p["id"], "sku-espresso");
        assert_eq!(p["reviews"], Value::Null);
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 0);
        let (status, _, p) = get(&app, path).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(p["reviews"]["count"], 1);
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
        let (status, _, e) = get(&app, &format!("{path}?reviews=no")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(e["error"]["fields"][0]["field"], "reviews");
    }

    #[tokio::test]
    async fn two_replicas_migrate_one_file_concurrently() {
        let tmp = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/catalog/catalog.db", tmp.path().display());
        let (a, b) = tokio::join!(
            flotilla_chassis::open_sqlite(&url, &crate::MIGRATOR),
            flotilla_chassis::open_sqlite(&url, &crate::MIGRATOR)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        for pool in [&a, &b] {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM products")
                .fetch_one(pool)
                .await
                .unwrap();
            assert_eq!(n, 12);
        }
    }
}
