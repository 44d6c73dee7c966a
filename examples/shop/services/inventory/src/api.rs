//! The inventory HTTP API: one public read route and the two paths the
//! broker pushes events to.

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use flotilla_chassis::ApiError;
use flotilla_chassis::outbox::RelayHandle;
use sqlx::SqlitePool;

use crate::events;
use crate::store::{self, Stock};

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    pub db: SqlitePool,
    /// Publishes what the outbox holds; woken after each commit that
    /// enqueued events. `None` in tests: events stay in the outbox table.
    pub relay: Option<RelayHandle>,
}

impl AppState {
    /// Wakes the outbox relay after a commit that enqueued events.
    pub fn published(&self) {
        if let Some(relay) = &self.relay {
            relay.notify();
        }
    }
}

/// The routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/inventory/{sku}", get(one))
        // Pushed by the broker (queues inventory-orders and
        // inventory-payments); never gateway routes.
        .route("/events/orders", post(events::orders))
        .route("/events/payments", post(events::payments))
        .fallback(flotilla_chassis::not_found)
        .with_state(state)
}

/// `GET /api/inventory/{sku}`: available and reserved units.
async fn one(
    State(state): State<AppState>,
    Path(sku): Path<String>,
) -> Result<axum::Json<Stock>, ApiError> {
    store::stock(&state.db, &sku)
        .await?
        .map(axum::Json)
        .ok_or_else(|| ApiError::not_found(format!("no stock is kept for sku {sku:?}")))
}
