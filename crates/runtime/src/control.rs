//! The loopback control API of a running system, and the client the CLI
//! uses to reach it through `endpoints.json`.
//!
//! The control API speaks mutual TLS only and answers only the operator's
//! identity (`…/svc/operator`), which the runtime issues into
//! `<data-dir>/operator/` (key 0600) and renews like any other: whoever can
//! read that directory is the operator. Every other peer of the system gets
//! `403 operator_only`; plaintext and foreign certificates never finish the
//! handshake. Stopping the system (`POST /v1/shutdown`) and dropping the
//! gateway's kept responses (`POST /v1/cache/purge`) also still need the
//! bearer token from `endpoints.json` (0600).
//!
//! The web console (an HTML page and the read-only status it shows) is on a
//! separate plain-HTTP loopback listener, because a browser has no operator
//! certificate to present; it can read status, never change anything.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{any, get, post};
use bytes::Bytes;
use flotilla_gateway::{CachePurged, Gateway};
use flotilla_mesh::identity::{BROKER, OPERATOR, RUNTIME};
use flotilla_mesh::{ExpectedPeer, Identity, IdentityFiles};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::endpoints::Endpoints;
use crate::pool::Status;

/// How long a peer of the control API has to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How many connections the console serves at once; more wait in the
/// listen backlog. Any local user can reach the console, and each
/// connection holds a file descriptor of the process that also runs the
/// gateway and supervises every instance.
const CONSOLE_CONNECTIONS: usize = 64;

/// How long a console client has to send a request's head (and how long an
/// idle keep-alive connection is kept), so that connections that never
/// finish one do not hold the slots above for good.
const CONSOLE_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the control API serves from.
pub(crate) trait StatusSource: Send + Sync + 'static {
    fn status(&self) -> Status;
}

#[derive(Clone)]
struct ControlState {
    source: Arc<dyn StatusSource>,
    token: Arc<str>,
    shutdown: Arc<Notify>,
    /// Weak: the system stops the gateway by owning it alone.
    gateway: Weak<Gateway>,
}

/// The control API, for the operator.
pub(crate) fn router(
    source: Arc<dyn StatusSource>,
    token: String,
    shutdown: Arc<Notify>,
    gateway: Weak<Gateway>,
) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/shutdown", post(shutdown_handler))
        .route("/v1/cache/purge", post(purge_handler))
        .with_state(ControlState {
            source,
            token: token.into(),
            shutdown,
            gateway,
        })
}

/// The console: the page and the read-only status it polls, for requests
/// addressed to the loopback host only ([`loopback_host_only`]).
pub(crate) fn console_router(source: Arc<dyn StatusSource>) -> Router {
    Router::new()
        .route("/", get(console))
        .route(
            "/v1/status",
            get(|State(source): State<Arc<dyn StatusSource>>| async move {
                axum::Json(source.status()).into_response()
            }),
        )
        .route("/metrics", get(metrics))
        .with_state(source)
        .layer(axum::middleware::from_fn(loopback_host_only))
}

/// Answers only requests whose `Host` is a loopback address or
/// `localhost`. The console listens on loopback, but a web page on another
/// site can point its own host name at 127.0.0.1 (DNS rebinding) and then
/// read the console same-origin: the status holds instances' last log
/// lines. Such a request names that site in `Host`, and is refused (421).
async fn loopback_host_only(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    if host.is_some_and(is_loopback_host) {
        return next.run(request).await;
    }
    (
        StatusCode::MISDIRECTED_REQUEST,
        axum::Json(serde_json::json!({"error": {"code": "not_loopback", "message": "the console answers requests to 127.0.0.1, [::1] or localhost only"}})),
    )
        .into_response()
}

/// Whether a `Host` value (with or without a port) names this machine's
/// loopback: `127.0.0.1:8080`, `[::1]:8080`, `localhost`.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or(rest, |(ip, _)| ip),
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        },
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The platform's metrics in the Prometheus text format: the gateway's, the
/// broker's (queue and stream depths, in-flight, dead-lettered, push
/// outcomes) and the mesh's, all recorded in this process. Read-only, so it
/// sits with the console rather than behind the operator's certificate.
async fn metrics() -> Response {
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        flotilla_gateway::prometheus_recorder().render(),
    )
        .into_response()
}

/// `name` as one path segment: a space, `/` or `?` in what the operator
/// typed would otherwise make no URI (reported as the runtime not
/// answering) or another path. The broker answers an unknown name 404.
fn segment(name: &str) -> percent_encoding::PercentEncode<'_> {
    const NOT_NAME: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_');
    percent_encoding::utf8_percent_encode(name, NOT_NAME)
}

/// What every peer that is not the operator gets.
fn operator_only() -> Router {
    Router::new().fallback(any(|| async {
        (
            StatusCode::FORBIDDEN,
            axum::Json(serde_json::json!({"error": {"code": "operator_only", "message": "the control API answers only the operator's identity (<data-dir>/operator)"}})),
        )
    }))
}

/// Serves `api` over mutual TLS with the runtime's identity until `stop`:
/// the operator gets the API, any other peer of the system 403. Handshakes
/// run in their own tasks with a deadline, so a stalled peer cannot block
/// the operator.
pub(crate) async fn serve_mtls(
    listener: TcpListener,
    api: Router,
    acceptor: TlsAcceptor,
    mut stop: watch::Receiver<bool>,
) {
    let refused = operator_only();
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!("control API: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = async {
                let _ = stop.wait_for(|s| *s).await;
            } => return,
        };
        let (acceptor, api, refused) = (acceptor.clone(), api.clone(), refused.clone());
        tokio::spawn(async move {
            let (tls, peer) = match flotilla_mesh::accept_with_timeout(
                &acceptor,
                tcp,
                HANDSHAKE_TIMEOUT,
            )
            .await
            {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %flotilla_mesh::tls::error_chain(&e), "control API: refused a connection");
                    return;
                }
            };
            let app = if peer.service() == OPERATOR {
                api
            } else {
                tracing::warn!(%peer, "control API: refused a peer that is not the operator");
                refused
            };
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                .await;
        });
    }
}

/// Serves the console (plain HTTP, loopback) until `stop`: at most
/// [`CONSOLE_CONNECTIONS`] at once, each closed if a request's head takes
/// longer than [`CONSOLE_HEADER_TIMEOUT`]. `axum::serve` has neither limit.
/// At `stop` the open connections are dropped: the console's answers are
/// small and read-only, so there is nothing to drain.
pub(crate) async fn serve_console(
    listener: TcpListener,
    console: Router,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONSOLE_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    // HTTP/1 only (a browser speaks nothing else to plain http://): the
    // automatic choice (`auto::Builder`) reads the first bytes to tell
    // HTTP/1 from HTTP/2 with no deadline, so 64 connections that sent
    // nothing, or half an HTTP/2 preface, would hold every slot for good.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(CONSOLE_HEADER_TIMEOUT);
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            accepted = async {
                // The slot first: past the cap, connections wait in the
                // backlog rather than being accepted and left unserved.
                let slot = Arc::clone(&slots).acquire_owned().await;
                (slot, listener.accept().await)
            } => accepted,
            () = async {
                let _ = stop.wait_for(|s| *s).await;
            } => return,
        };
        let (slot, tcp) = match accepted {
            (Ok(slot), Ok((tcp, _))) => (slot, tcp),
            (Err(_), _) => return,
            (_, Err(e)) => {
                tracing::warn!("console: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (builder, console) = (builder.clone(), console.clone());
        connections.spawn(async move {
            let _slot = slot;
            let _ = builder
                .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(console))
                .await;
        });
    }
}

async fn status(State(state): State<ControlState>) -> Response {
    axum::Json(state.source.status()).into_response()
}

/// Whether `headers` carry the control token.
fn authorized(state: &ControlState, headers: &HeaderMap) -> bool {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    presented.is_some_and(|p| constant_time_eq(p.as_bytes(), state.token.as_bytes()))
}

fn unauthorized() -> Response {
    refusal(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "the control token from endpoints.json is required",
    )
}

fn refusal(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

async fn shutdown_handler(State(state): State<ControlState>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    state.shutdown.notify_one();
    (
        StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({"status": "stopping"})),
    )
        .into_response()
}

/// `POST /v1/cache/purge` with `{"prefix": "/api/reviews/"}`: drops the
/// gateway's kept responses under that path prefix; answers what it
/// dropped.
async fn purge_handler(
    State(state): State<ControlState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Purge {
        prefix: String,
    }
    let prefix = match serde_json::from_slice::<Purge>(&body) {
        Ok(p) if p.prefix.starts_with('/') => p.prefix,
        Ok(_) => {
            return refusal(
                StatusCode::BAD_REQUEST,
                "invalid_prefix",
                "the prefix is a path, starting with `/` (`/` alone: every kept response)",
            );
        }
        Err(e) => {
            return refusal(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                &format!("expected {{\"prefix\": \"/…\"}}: {e}"),
            );
        }
    };
    match state.gateway.upgrade() {
        Some(gateway) => axum::Json(gateway.purge_cache(&prefix)).into_response(),
        None => refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "the gateway is stopping",
        ),
    }
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
    #[error("the system in {} has no event broker (its manifest declares no topics, queues or streams)", dir.display())]
    NoBroker { dir: PathBuf },
    #[error("the broker answered {status}: {body}")]
    Broker { status: u16, body: String },
    #[error(
        "cannot use the operator's identity in {}; only the user who ran `flotilla up` can read it",
        dir.display()
    )]
    Identity {
        dir: PathBuf,
        #[source]
        source: flotilla_mesh::tls::TlsError,
    },
}

/// A client for one running system's control API: it presents the
/// operator's identity from `<data-dir>/operator/` and accepts only the
/// runtime's.
pub struct ControlClient {
    endpoints: Endpoints,
    dir: PathBuf,
    tls: TlsConnector,
    /// The same identity, accepting only the broker.
    broker_tls: TlsConnector,
}

/// A queue's counts, as the broker reports them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct QueueStats {
    pub queue: String,
    /// Stored and deliverable now.
    pub ready: u64,
    /// Delivered and not yet acknowledged.
    pub in_flight: u64,
    /// Waiting out a delivery delay.
    pub delayed: u64,
    /// Moved to its dead-letter queue so far.
    pub dead_lettered: u64,
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
        let operator = operator_dir(data_dir);
        let identity_error = |source| ControlError::Identity {
            dir: operator.clone(),
            source,
        };
        let identity = Identity::load(IdentityFiles::in_dir(&operator)).map_err(identity_error)?;
        let config = flotilla_mesh::client_config(&identity, ExpectedPeer::service(RUNTIME))
            .map_err(identity_error)?;
        let broker = flotilla_mesh::client_config(&identity, ExpectedPeer::service(BROKER))
            .map_err(identity_error)?;
        Ok(ControlClient {
            endpoints,
            dir: data_dir.to_path_buf(),
            tls: TlsConnector::from(config),
            broker_tls: TlsConnector::from(broker),
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

    /// Asks the system to stop, and waits up to `wait` for it to be gone:
    /// its control API silent, and then its runtime finished (its data
    /// dir's lock let go), so that a `flotilla up` right after finds the
    /// data dir free.
    pub async fn shutdown(&self, wait: Duration) -> Result<bool, ControlError> {
        self.call(http::Method::POST, "/v1/shutdown").await?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut silent = false;
        while tokio::time::Instant::now() < deadline {
            silent = silent || self.call(http::Method::GET, "/v1/status").await.is_err();
            if silent && crate::dirlock::DirLock::free(&self.dir) {
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(false)
    }

    /// Drops the gateway's kept responses whose path starts with `prefix`;
    /// what it dropped.
    pub async fn purge_cache(&self, prefix: &str) -> Result<CachePurged, ControlError> {
        let body = serde_json::json!({ "prefix": prefix }).to_string();
        let answer = self
            .exchange(
                &self.endpoints.control,
                &self.tls,
                true,
                http::Method::POST,
                "/v1/cache/purge",
                Some(body),
            )
            .await?;
        serde_json::from_slice(&answer).map_err(|e| ControlError::Refused {
            status: 200,
            body: format!("unreadable purge answer: {e}"),
        })
    }

    /// A queue's counts (the queue must be declared in the manifest).
    pub async fn queue_stats(&self, queue: &str) -> Result<QueueStats, ControlError> {
        let body = self
            .broker_call(
                http::Method::GET,
                &format!("/queues/{}", segment(queue)),
                None,
            )
            .await?;
        serde_json::from_slice(&body).map_err(|e| ControlError::Broker {
            status: 200,
            body: format!("unreadable queue stats: {e}"),
        })
    }

    /// Moves up to `max` messages from dead-letter queue `queue` back to the
    /// queues they came from; how many moved.
    pub async fn redrive(&self, queue: &str, max: u64) -> Result<u64, ControlError> {
        let body = serde_json::json!({ "max_messages": max }).to_string();
        let answer = self
            .broker_call(
                http::Method::POST,
                &format!("/queues/{}/redrive", segment(queue)),
                Some(body),
            )
            .await?;
        #[derive(serde::Deserialize)]
        struct Moved {
            moved: u64,
        }
        serde_json::from_slice::<Moved>(&answer)
            .map(|m| m.moved)
            .map_err(|e| ControlError::Broker {
                status: 200,
                body: format!("unreadable redrive answer: {e}"),
            })
    }

    async fn broker_call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Bytes, ControlError> {
        let url = self
            .endpoints
            .broker
            .clone()
            .ok_or_else(|| ControlError::NoBroker {
                dir: self.dir.clone(),
            })?;
        match self
            .exchange(&url, &self.broker_tls, false, method, path, body)
            .await
        {
            Err(ControlError::Refused { status, body }) => {
                Err(ControlError::Broker { status, body })
            }
            other => other,
        }
    }

    async fn call(&self, method: http::Method, path: &str) -> Result<Bytes, ControlError> {
        self.exchange(&self.endpoints.control, &self.tls, true, method, path, None)
            .await
    }

    /// One request over mutual TLS to `url` (`https://ip:port`), accepting
    /// the peer `tls` expects, with the control token when `token` (only
    /// the control API gets it); the body of a 2xx answer.
    async fn exchange(
        &self,
        url: &str,
        tls: &TlsConnector,
        token: bool,
        method: http::Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Bytes, ControlError> {
        let unreachable = || ControlError::Unreachable {
            dir: self.dir.clone(),
            url: url.to_string(),
        };
        let addr: SocketAddr = url
            .trim_start_matches("https://")
            .parse()
            .map_err(|_| unreachable())?;
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, addr.to_string())
            .header(header::CONTENT_TYPE, "application/json");
        if token {
            request = request.header(
                header::AUTHORIZATION,
                format!("Bearer {}", self.endpoints.control_token),
            );
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|_| unreachable())?;
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
            let (tls, _) = flotilla_mesh::connect_with_timeout(
                tls,
                ServerName::from(addr.ip()),
                tcp,
                HANDSHAKE_TIMEOUT,
            )
            .await
            .ok()?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .ok()?;
            tokio::spawn(connection);
            sender.send_request(request).await.ok()
        };
        let response = tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .map_err(|_| unreachable())?
            .ok_or_else(unreachable)?;
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

/// Where the operator's identity lives in a data dir.
pub(crate) fn operator_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(OPERATOR)
}

/// Binds the control API (or the console) on an ephemeral loopback port.
pub(crate) async fn bind() -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

#[cfg(test)]
mod tests {
    use super::is_loopback_host;

    #[test]
    fn a_queue_name_is_one_path_segment() {
        assert_eq!(super::segment("orders-dlq").to_string(), "orders-dlq");
        assert_eq!(
            super::segment("my q/../x?y").to_string(),
            "my%20q%2F%2E%2E%2Fx%3Fy"
        );
    }

    #[test]
    fn only_loopback_hosts_are_the_console_s() {
        for host in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "127.1.2.3:1",
            "[::1]:9000",
            "[::1]",
            "localhost:3000",
            "LOCALHOST",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "evil.example:8080",
            "evil.example",
            "127.0.0.1.evil.example:80",
            "localhost.evil.example",
            "10.0.0.1:8080",
            "[::2]:80",
            "",
            "127.0.0.1:80:80",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
