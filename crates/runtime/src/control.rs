//! The loopback control API of a running system, and the client the CLI
//! uses to reach it through `endpoints.json`.
//!
//! Reading status is open to local processes; changes (`shutdown`) need the
//! bearer token written, 0600, into `endpoints.json`, so only the operator
//! who can read the data dir can stop the system. (The mesh issue replaces
//! the token with the operator's mTLS identity.)

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Notify;

use crate::endpoints::Endpoints;
use crate::pool::Status;

/// What the control API serves from.
pub(crate) trait StatusSource: Send + Sync + 'static {
    fn status(&self) -> Status;
}

#[derive(Clone)]
struct ControlState {
    source: Arc<dyn StatusSource>,
    token: Arc<str>,
    shutdown: Arc<Notify>,
}

pub(crate) fn router(
    source: Arc<dyn StatusSource>,
    token: String,
    shutdown: Arc<Notify>,
) -> Router {
    Router::new()
        .route("/", get(console))
        .route("/v1/status", get(status))
        .route("/v1/shutdown", post(shutdown_handler))
        .with_state(ControlState {
            source,
            token: token.into(),
            shutdown,
        })
}

async fn status(State(state): State<ControlState>) -> Response {
    axum::Json(state.source.status()).into_response()
}

async fn shutdown_handler(State(state): State<ControlState>, headers: HeaderMap) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), state.token.as_bytes())) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({"error": {"code": "unauthorized", "message": "the control token from endpoints.json is required"}})),
        )
            .into_response();
    }
    state.shutdown.notify_one();
    (
        StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({"status": "stopping"})),
    )
        .into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn console() -> Html<&'static str> {
    Html(include_str!("console.html"))
}

/// Why the control API could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no system is running from {} (no endpoints.json); start one with `flotilla up`", dir.display())]
    NotRunning { dir: std::path::PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the system in {} does not answer at {url} (it may have crashed; its endpoints.json is stale)", dir.display())]
    Unreachable {
        dir: std::path::PathBuf,
        url: String,
    },
    #[error("the control API answered {status}: {body}")]
    Refused { status: u16, body: String },
}

/// A client for one running system's control API.
pub struct ControlClient {
    endpoints: Endpoints,
    dir: std::path::PathBuf,
    http: Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
}

impl ControlClient {
    /// Finds the system running from `data_dir`.
    pub fn open(data_dir: &Path) -> Result<ControlClient, ControlError> {
        let endpoints = Endpoints::read(data_dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ControlError::NotRunning {
                    dir: data_dir.to_path_buf(),
                }
            } else {
                ControlError::Unreadable {
                    path: Endpoints::path(data_dir),
                    source: e,
                }
            }
        })?;
        Ok(ControlClient {
            endpoints,
            dir: data_dir.to_path_buf(),
            http: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// The endpoints file it was opened from.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The system's status.
    pub async fn status(&self) -> Result<Status, ControlError> {
        let body = self.call(http::Method::GET, "/v1/status").await?;
        serde_json::from_slice(&body).map_err(|e| ControlError::Refused {
            status: 200,
            body: format!("unreadable status: {e}"),
        })
    }

    /// Asks the system to stop, and waits up to `wait` for it to be gone.
    pub async fn shutdown(&self, wait: Duration) -> Result<bool, ControlError> {
        self.call(http::Method::POST, "/v1/shutdown").await?;
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline {
            if self.call(http::Method::GET, "/v1/status").await.is_err() {
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(false)
    }

    async fn call(&self, method: http::Method, path: &str) -> Result<Bytes, ControlError> {
        let unreachable = || ControlError::Unreachable {
            dir: self.dir.clone(),
            url: self.endpoints.control.clone(),
        };
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.endpoints.control))
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", self.endpoints.control_token),
            )
            .body(Empty::new())
            .map_err(|_| unreachable())?;
        let response = tokio::time::timeout(Duration::from_secs(5), self.http.request(request))
            .await
            .map_err(|_| unreachable())?
            .map_err(|_| unreachable())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|_| unreachable())?
            .to_bytes();
        if !status.is_success() {
            return Err(ControlError::Refused {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        Ok(body)
    }
}

/// Whether a control API answers at `addr`'s endpoints (used to refuse a
/// second `up` on the same data dir).
pub(crate) async fn is_live(data_dir: &Path) -> Option<String> {
    let client = ControlClient::open(data_dir).ok()?;
    client.status().await.ok()?;
    Some(client.endpoints.control.clone())
}

/// Binds the control API on an ephemeral loopback port.
pub(crate) async fn bind() -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}
