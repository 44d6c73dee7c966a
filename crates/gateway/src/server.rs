//! Listening and serving: binds the listener, assembles the tower stack,
//! runs the accept loop and serves each connection with HTTP/1.1 or h2c
//! (hyper-util's auto builder), and shuts down gracefully.
//!
//! The accept loop only accepts; everything per connection (today only
//! `TCP_NODELAY`, later the TLS handshake) happens on the connection's own
//! task, so a slow client cannot stall accepting. Connections live in a
//! `JoinSet` so that shutdown can close the ones still open at the deadline.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::SERVER;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tower::ServiceBuilder;
use tower::util::BoxCloneService;

use crate::access_log::{AccessLogLayer, Sink};
use crate::body::{self, Body};
use crate::config::{Config, Limits};
use crate::health::HealthLayer;
use crate::proxy::Proxy;
use crate::request_id::RequestIdLayer;
use crate::routing::{RouteLayer, RoutingState};
use crate::upstream::Upstreams;
use crate::{Error, stats};

/// The whole request path as one cloneable service.
pub(crate) type Stack = BoxCloneService<Request<Body>, Response<Body>, Infallible>;

/// The client side of the connection a request arrived on; in request
/// extensions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnInfo {
    pub peer: SocketAddr,
    /// `http`, or `https` once TLS is terminated here.
    pub scheme: &'static str,
}

/// How long the access-log writer may take to write out its queue at
/// shutdown: a wedged disk must not wedge shutdown.
const LOG_FLUSH_DEADLINE: Duration = Duration::from_secs(5);

pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            Error::Bind { addr, source }
        } else {
            Error::Listen { addr, source }
        }
    })
}

/// The request path, outermost layer first.
pub(crate) fn stack(
    config: &Config,
    routing: Arc<RoutingState>,
    access_log: Option<Arc<Sink>>,
    upstreams: Arc<dyn Upstreams>,
) -> Stack {
    stats::describe();
    let service = ServiceBuilder::new()
        // First, so that every response, even one made up by a later
        // layer, carries the id, and every later layer can log it.
        .layer(RequestIdLayer)
        // Sees the final status, route and instance of every request.
        .layer(AccessLogLayer::new(access_log))
        .map_response(set_server_header)
        // Before routing, so no service route can shadow it.
        .layer(HealthLayer)
        // Edge security that needs no route (IP lists, CORS) goes here, so
        // that refused clients learn nothing about routes.
        .layer(RouteLayer::new(routing))
        // Per-route policy (JWT, rate limits) goes here, after routing.
        .service(Proxy::new(upstreams, &config.limits));
    BoxCloneService::new(service)
}

fn set_server_header(mut res: Response<Body>) -> Response<Body> {
    res.headers_mut()
        .insert(SERVER, HeaderValue::from_static("flotilla"));
    res
}

fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// Serves until `stop` yields a drain deadline (or is dropped: deadline 0).
pub(crate) async fn run(
    listener: TcpListener,
    stack: Stack,
    limits: Limits,
    mut stop: oneshot::Receiver<Duration>,
    log_writer: Option<JoinHandle<()>>,
) {
    let builder = Arc::new(http_builder(&limits));
    let graceful = GracefulShutdown::new();
    // Tells connections that have not sent a byte yet (and so are not
    // watched by `graceful`) to close at once.
    let (stopping, stopping_rx) = watch::channel(());
    let mut connections = JoinSet::new();
    let deadline = loop {
        tokio::select! {
            stop = &mut stop => break stop.unwrap_or(Duration::ZERO),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(serve_connection(
                        Arc::clone(&builder),
                        stream,
                        peer,
                        stack.clone(),
                        graceful.watcher(),
                        stopping_rx.clone(),
                        limits.header_read_timeout,
                    ));
                }
                Err(e) => accept_failed(e).await,
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    };
    drop(listener);
    drop(stack);
    stopping.send_replace(());

    let open = connections.len();
    tracing::info!(target: "flotilla::gateway", open, ?deadline, "gateway stopping");
    let drained = tokio::time::timeout(deadline, async {
        graceful.shutdown().await;
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            target: "flotilla::gateway",
            closed = connections.len(),
            "drain deadline reached; closing the remaining connections"
        );
    }
    connections.shutdown().await;

    if let Some(writer) = log_writer
        && tokio::time::timeout(LOG_FLUSH_DEADLINE, writer)
            .await
            .is_err()
    {
        tracing::warn!(target: "flotilla::gateway", "the access log was not written out in time");
    }
}

async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::*;
    // A connection that died before we took it says nothing about us.
    if matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted) {
        return;
    }
    // Typically out of file descriptors: pause rather than spin, and let
    // closing connections free some.
    tracing::warn!(target: "flotilla::gateway", error = %e, "cannot accept connections");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn serve_connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    peer: SocketAddr,
    stack: Stack,
    watcher: Watcher,
    mut stopping: watch::Receiver<()>,
    first_byte_timeout: Duration,
) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(target: "flotilla::gateway", %peer, error = %e, "cannot set TCP_NODELAY");
    }
    // The protocol sniffing of the auto builder has no timeout of its own:
    // a client that connects and says nothing would hold the socket forever
    // (and, being silent, would never see a graceful shutdown either).
    tokio::select! {
        first = tokio::time::timeout(first_byte_timeout, stream.readable()) => {
            if first.is_err() {
                return;
            }
        }
        _ = stopping.changed() => return,
    }
    // TLS slots in here: wrap `stream` and set the scheme to `https`.
    let info = ConnInfo {
        peer,
        scheme: "http",
    };
    let service = TowerToHyperService::new(Connection { stack, info });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(target: "flotilla::gateway", %peer, error = %e, "connection ended with an error");
    }
}

/// The stack as seen from one connection: boxes hyper's body into the
/// stack's and tags each request with the connection's [`ConnInfo`].
#[derive(Clone)]
struct Connection {
    stack: Stack,
    info: ConnInfo,
}

impl tower::Service<Request<Incoming>> for Connection {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = <Stack as tower::Service<Request<Body>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        self.stack.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let mut req = req.map(body::boxed);
        req.extensions_mut().insert(self.info);
        self.stack.call(req)
    }
}
