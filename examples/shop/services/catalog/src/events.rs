//! The catalog's stock figure, an event-carried copy of inventory's.
//!
//! Inventory owns stock. Every change to what is available is followed by
//! its `stock.changed` event, whose data is `levels`:
//! `[{sku, available, version}]`, the new figures of the SKUs it touched.
//! The broker pushes them here (queue `catalog-stock`) and each level sets
//! `products.stock` only if its `version` is newer than the figure's
//! `stock_version`: at-least-once delivery, retries and two replicas
//! handling events concurrently can repeat or reorder events, never move a
//! figure backwards. The chassis inbox drops an event seen before.
//!
//! Only `stock.changed` is subscribed: `stock.reserved` carries the payment
//! token meant for payments, which the catalog has no business receiving.

use axum::extract::State;
use flotilla_chassis::{ApiError, Handled, PushedEvent, inbox};
use serde::Deserialize;

use crate::api::AppState;
use crate::store::{self, Applied, Level};

/// The inbox consumer name.
const CONSUMER: &str = "catalog-stock";

/// The event types that carry `levels` (the queue's filter in
/// flotilla.toml); anything else is acknowledged and ignored.
pub const LEVEL_TYPES: &[&str] = &["stock.changed"];

/// The part of those events' data the catalog reads.
#[derive(Deserialize)]
struct Levels {
    levels: Vec<Level>,
}

/// `POST /events/stock`: `stock.changed`.
///
/// Answers 400 (so the broker dead-letters instead of retrying) for data
/// without valid `levels`, 5xx (retried) when the database fails, and 200
/// otherwise with the outcome `updated` (at least one figure changed),
/// `unchanged` (every level was stale or for an unknown SKU), `duplicate`
/// or `ignored`.
pub async fn stock(
    State(state): State<AppState>,
    PushedEvent(event): PushedEvent,
) -> Result<Handled, ApiError> {
    if !LEVEL_TYPES.contains(&event.ty.as_str()) {
        tracing::warn!(id = %event.id, ty = %event.ty, "ignored an event the catalog does not handle");
        return Ok(Handled::IGNORED);
    }
    let Levels { levels } = event.data_as()?;
    check(&levels).map_err(|problem| {
        tracing::warn!(id = %event.id, ty = %event.ty, problem, "refused stock levels");
        ApiError::bad_request(
            "invalid_levels",
            format!("event {} has invalid levels: {problem}", event.id),
        )
    })?;
    let handled = inbox::handle_once(&state.db, CONSUMER, &event, async |tx| {
        let mut updated = 0;
        for level in &levels {
            match store::apply_level(tx, level).await? {
                Applied::Updated => updated += 1,
                Applied::Stale => {
                    tracing::debug!(sku = %level.sku, version = level.version, "stale stock level skipped");
                }
                Applied::UnknownSku => {
                    tracing::warn!(id = %event.id, sku = %level.sku, "stock level for a product the catalog does not have; ignored");
                }
            }
        }
        Ok::<_, ApiError>(updated)
    })
    .await?;
    let Some(updated) = handled else {
        return Ok(Handled::DUPLICATE);
    };
    tracing::info!(id = %event.id, ty = %event.ty, levels = levels.len(), updated, "stock levels handled");
    Ok(Handled::new(if updated > 0 {
        "updated"
    } else {
        "unchanged"
    }))
}

/// What inventory never sends: a negative figure (the `stock` column's
/// CHECK would fail the transaction and have the event retried for
/// nothing), a version a figure could not be newer than, or no SKU.
fn check(levels: &[Level]) -> Result<(), String> {
    for level in levels {
        if level.sku.is_empty() {
            return Err("a level without sku".into());
        }
        if level.available < 0 {
            return Err(format!("negative available for {:?}", level.sku));
        }
        if level.version < 1 {
            return Err(format!("version below 1 for {:?}", level.sku));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::{Body, to_bytes};
    use axum::http::{Request, StatusCode};
    use serde_json::{Value, json};
    use sqlx::SqlitePool;
    use tower::ServiceExt;

    async fn app() -> (Router, SqlitePool) {
        let db = flotilla_chassis::open_sqlite("sqlite::memory:", &crate::MIGRATOR)
            .await
            .unwrap();
        flotilla_chassis::Inbox::install(&db).await.unwrap();
        (crate::api::router(db.clone(), "catalog-0", None), db)
    }

    async fn push(app: &Router, event: &Value) -> (StatusCode, Value) {
        let req = Request::post("/events/stock")
            .header("content-type", "application/cloudevents+json")
            .body(Body::from(event.to_string()))
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = to_bytes(res.into_body(), 1 << 20).await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// An inventory event with `levels` [(sku, available, version)].
    fn stock_event(id: &str, ty: &str, levels: &[(&str, i64, i64)]) -> Value {
        let levels: Vec<Value> = levels
            .iter()
            .map(|(sku, available, version)| json!({"sku": sku, "available": available, "version": version}))
            .collect();
        json!({"specversion": "1.0", "id": id, "source": "/inventory", "type": ty,
               "customer": "alice", "orderid": "o-1",
               "data": {"order_id": "o-1", "customer": "alice", "payment_token": "4242424242424242",
                        "items": [], "levels": levels}})
    }

    /// (stock, stock_version) of a product.
    async fn figure(db: &SqlitePool, sku: &str) -> (i64, i64) {
        let p = crate::store::get(db, sku).await.unwrap().unwrap();
        (p.stock, p.stock_version)
    }

    #[tokio::test]
    async fn levels_set_the_stock_figure() {
        let (app, db) = app().await;
        assert_eq!(figure(&db, "sku-kettle").await, (15, 0), "the seed");
        let event = stock_event(
            "e-1",
            "stock.changed",
            &[("sku-kettle", 13, 1), ("sku-mug", 199, 1)],
        );
        let (status, body) = push(&app, &event).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["outcome"], "updated");
        assert_eq!(figure(&db, "sku-kettle").await, (13, 1));
        assert_eq!(figure(&db, "sku-mug").await, (199, 1));
        assert_eq!(figure(&db, "sku-grinder").await, (8, 0), "untouched");

        let event = stock_event("e-2", "stock.changed", &[("sku-kettle", 15, 2)]);
        let (_, body) = push(&app, &event).await;
        assert_eq!(body["outcome"], "updated");
        assert_eq!(figure(&db, "sku-kettle").await, (15, 2));

        // As the API serves it.
        let res = app
            .clone()
            .oneshot(
                Request::get("/api/catalog/products/sku-kettle")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let bytes = to_bytes(res.into_body(), 1 << 20).await.unwrap();
        let p: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            (p["stock"].clone(), p["stock_version"].clone()),
            (json!(15), json!(2))
        );
    }

    #[tokio::test]
    async fn an_older_version_never_moves_the_figure_back() {
        let (app, db) = app().await;
        // Version 2 overtakes version 1 (a retry, another replica).
        let (_, body) = push(
            &app,
            &stock_event("e-2", "stock.changed", &[("sku-kettle", 15, 2)]),
        )
        .await;
        assert_eq!(body["outcome"], "updated");
        let (status, body) = push(
            &app,
            &stock_event("e-1", "stock.changed", &[("sku-kettle", 14, 1)]),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["outcome"], "unchanged");
        assert_eq!(figure(&db, "sku-kettle").await, (15, 2));
        // The same version again under another event id changes nothing
        // either; a newer one for one SKU still applies beside a stale one.
        let (_, body) = push(
            &app,
            &stock_event(
                "e-3",
                "stock.changed",
                &[("sku-kettle", 1, 2), ("sku-mug", 190, 4)],
            ),
        )
        .await;
        assert_eq!(body["outcome"], "updated");
        assert_eq!(figure(&db, "sku-kettle").await, (15, 2));
        assert_eq!(figure(&db, "sku-mug").await, (190, 4));
    }

    #[tokio::test]
    async fn a_redelivered_event_is_a_duplicate() {
        let (app, db) = app().await;
        let event = stock_event("e-1", "stock.changed", &[("sku-kettle", 10, 5)]);
        let (_, body) = push(&app, &event).await;
        assert_eq!(body["outcome"], "updated");
        // Set the figure by hand: a duplicate must not touch it again.
        sqlx::query("UPDATE products SET stock = 3, stock_version = 0 WHERE id = 'sku-kettle'")
            .execute(&db)
            .await
            .unwrap();
        let (status, body) = push(&app, &event).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["outcome"], "duplicate");
        assert_eq!(figure(&db, "sku-kettle").await, (3, 0));
        let claimed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM flotilla_inbox WHERE consumer = 'catalog-stock'",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        assert_eq!(claimed, 1);
    }

    #[tokio::test]
    async fn unknown_skus_and_other_types_are_acknowledged() {
        let (app, db) = app().await;
        let event = stock_event(
            "e-1",
            "stock.changed",
            &[("sku-nope", 4, 1), ("sku-mug", 198, 1)],
        );
        let (status, body) = push(&app, &event).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["outcome"], "updated");
        assert_eq!(figure(&db, "sku-mug").await, (198, 1));
        assert!(crate::store::get(&db, "sku-nope").await.unwrap().is_none());
        let (_, body) = push(
            &app,
            &stock_event("e-2", "stock.changed", &[("sku-nope", 4, 2)]),
        )
        .await;
        assert_eq!(body["outcome"], "unchanged");

        let mut rejected = stock_event("e-3", "stock.rejected", &[]);
        rejected["data"] = json!({"order_id": "o-1", "reason": "out_of_stock", "sku": "sku-chai"});
        let (status, body) = push(&app, &rejected).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["outcome"], "ignored");
    }

    #[tokio::test]
    async fn malformed_events_are_refused_for_the_dead_letter_queue() {
        let (app, db) = app().await;
        let (status, _) = push(&app, &json!({"specversion": "1.0"})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let mut no_levels = stock_event("e-1", "stock.changed", &[]);
        no_levels["data"] = json!({"order_id": "o-1"});
        let mut bad_type = stock_event("e-2", "stock.changed", &[]);
        bad_type["data"]["levels"] = json!([{"sku": "sku-mug", "available": "lots", "version": 1}]);
        for bad in [
            no_levels,
            bad_type,
            stock_event("e-3", "stock.changed", &[("sku-mug", -1, 1)]),
            stock_event("e-4", "stock.changed", &[("sku-mug", 5, 0)]),
            stock_event("e-5", "stock.changed", &[("", 5, 1)]),
        ] {
            let (status, body) = push(&app, &bad).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
            assert!(!body.to_string().contains("4242424242424242"), "{body}");
        }
        assert_eq!(figure(&db, "sku-mug").await, (200, 0));
        let claimed: i64 = sqlx::query_scalar("SELECT count(*) FROM flotilla_inbox")
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(claimed, 0, "refused events are not claimed");
    }
}
