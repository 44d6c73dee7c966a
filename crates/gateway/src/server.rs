//! Listening and serving: binds the listener, assembles the tower stack,
//! runs the accept loop and serves each connection, and shuts down
//! gracefully.
//!
//! The accept loop only accepts; everything per connection (today only
//! `TCP_NODELAY`, later the TLS handshake) happens on the connection's own
//! task, so a slow client cannot stall accepting. Connections live in a
//! `JoinSet` so that shutdown can close the ones still open at the deadline.
//!
//! A connection's first bytes decide its protocol: the HTTP/2 preface goes
//! to hyper (h2c, through hyper-util's auto builder, its socket watched by
//! `conn` for the lingering close); anything else is HTTP/1.x, served by the
//! gateway's own driver (`h1`), which parses heads, enforces the head size
//! and count limits (431), the slow-head (408) and idle timeouts, and
//! lingers on close itself.
//!
//! Load shedding: past `max_in_flight` requests at once, new ones get 503
//! `overloaded` at once (before any routing or upstream work), so a flood
//! degrades into fast refusals instead of a gateway out of memory.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
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
use tower::util::BoxCloneService;
use tower::{Layer, ServiceBuilder};

use crate::access_log::{AccessLogLayer, Sink};
use crate::body::{self, Body, Holding};
use crate::client::UpstreamClient;
use crate::config::Limits;
use crate::conn::{self, H2_PREFACE, Verdict, Watch};
use crate::edge::EdgeLayer;
use crate::h1;
use crate::health::HealthLayer;
use crate::proxy::Proxy;
use crate::rejection::Rejection;
use crate::request_id::{RequestId, RequestIdLayer};
use crate::routing::RoutingState;
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
    limits: &Limits,
    routing: Arc<RoutingState>,
    access_log: Option<Arc<Sink>>,
    upstreams: Arc<dyn Upstreams>,
    client: UpstreamClient,
) -> Stack {
    stats::describe();
    let service = ServiceBuilder::new()
        // First, so that every response, even one made up by a later
        // layer, carries the id, and every later layer can log it.
        .layer(RequestIdLayer)
        // Sees the final status, route and instance of every request.
        .layer(AccessLogLayer::new(access_log))
        .map_response(set_server_header)
        // Before any work is spent on a request that will be refused.
        .layer(ShedLayer::new(limits.max_in_flight))
        // Before routing, so no service route can shadow it.
        .layer(HealthLayer)
        // IP lists, CORS, routing, JWT, rate limits, body limits.
        .layer(EdgeLayer::new(routing))
        .service(Proxy::new(upstreams, client, limits));
    BoxCloneService::new(service)
}

/// Sheds requests past the in-flight cap.
#[derive(Debug, Clone)]
struct ShedLayer {
    in_flight: Arc<AtomicUsize>,
    max: usize,
}

impl ShedLayer {
    fn new(max: usize) -> ShedLayer {
        ShedLayer {
            in_flight: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Shed<S> {
        Shed {
            layer: self.clone(),
            inner,
        }
    }
}

#[derive(Debug, Clone)]
struct Shed<S> {
    layer: ShedLayer,
    inner: S,
}

/// Counts one request in flight until dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S> tower::Service<Request<Body>> for Shed<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = futures_util::future::BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        use futures_util::FutureExt;
        let before = self.layer.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight(Arc::clone(&self.layer.in_flight));
        if before >= self.layer.max {
            drop(guard);
            stats::shed();
            let id = req.extensions().get::<RequestId>().cloned();
            let res = Rejection::Overloaded.into_response(id.as_ref());
            return futures_util::future::ready(Ok(res)).boxed();
        }
        // Boxed here, outside the async block: rustc cannot prove a projected
        // future type `Send` inside one (rust-lang/rust#110338).
        let fut = self.inner.call(req).boxed();
        async move {
            let res = fut.await?;
            // In flight until the response body is done.
            Ok(res.map(|b| body::boxed(Holding::new(b, guard))))
        }
        .boxed()
    }
}

fn set_server_header(mut res: Response<Body>) -> Response<Body> {
    res.headers_mut()
        .insert(SERVER, HeaderValue::from_static("flotilla"));
    res
}

/// hyper's builder, for h2c connections (`serve_h2`). Only connections that
/// start with the HTTP/2 preface reach it; its HTTP/1 settings keep the
/// limits should that ever change.
fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The connection watchdog times heads out with a 408 instead.
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
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
    let settings = h1::Settings::new(&limits);
    let graceful = GracefulShutdown::new();
    // Tells HTTP/1 connections, and those that have not sent a byte yet,
    // (none watched by `graceful`) that the gateway is stopping: idle ones
    // close at once, busy ones after their request.
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
                        settings,
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

/// Most bytes read before a connection's protocol is decided; the HTTP/1
/// driver keeps the buffer for its first head.
const FIRST_READ: usize = 8 * 1024;

async fn serve_connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    peer: SocketAddr,
    stack: Stack,
    watcher: Watcher,
    mut stopping: watch::Receiver<()>,
    settings: h1::Settings,
) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(target: "flotilla::gateway", %peer, error = %e, "cannot set TCP_NODELAY");
    }
    // A client that connects and says nothing would hold the socket
    // forever (and, being silent, would never see a graceful shutdown).
    let mut first = BytesMut::with_capacity(FIRST_READ);
    tokio::select! {
        read = tokio::time::timeout(settings.header_timeout, read_first(&stream, &mut first)) => {
            if !matches!(read, Ok(Ok(true))) {
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
    if first.starts_with(H2_PREFACE) {
        serve_h2(builder, stream, first, info, stack, watcher, settings).await;
    } else {
        // Shutdown reaches an HTTP/1 connection through `stopping`.
        drop(watcher);
        h1::serve(stream, first, info, stack, settings, stopping).await;
    }
}

/// Reads until the protocol is known: `true` once the bytes either start
/// with the HTTP/2 preface or cannot; `false` if the client closed first.
async fn read_first(stream: &TcpStream, buf: &mut BytesMut) -> std::io::Result<bool> {
    loop {
        stream.readable().await?;
        match stream.try_read_buf(buf) {
            Ok(0) => return Ok(false),
            Ok(_) => {
                if buf.len() >= H2_PREFACE.len() || !H2_PREFACE.starts_with(buf) {
                    return Ok(true);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// An h2c connection, served by hyper (its first bytes are replayed).
async fn serve_h2(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    first: BytesMut,
    info: ConnInfo,
    stack: Stack,
    watcher: Watcher,
    settings: h1::Settings,
) {
    let peer = info.peer;
    let (io, watched) = conn::watch(stream, first.freeze());
    let service = TowerToHyperService::new(Connection {
        stack,
        info,
        watch: Arc::clone(&watched.watch),
    });
    let conn = watcher.watch(builder.serve_connection(TokioIo::new(io), service));
    let verdict = tokio::select! {
        result = conn => {
            if let Err(e) = result {
                tracing::debug!(target: "flotilla::gateway", %peer, error = %e, "connection ended with an error");
            }
            None
        }
        verdict = watched.expired(settings.header_timeout, settings.idle_timeout) => Some(verdict),
    };
    // hyper's side of the connection is gone here (dropped with the select).
    if verdict == Some(Verdict::HeadTimeout) {
        tracing::debug!(target: "flotilla::gateway", %peer, "request headers too slow; answering 408");
        watched.send_408().await;
    }
    watched.linger().await;
}

/// The stack as seen from one connection: boxes hyper's body into the
/// stack's and tags each request with the connection's [`ConnInfo`].
#[derive(Clone)]
struct Connection {
    stack: Stack,
    info: ConnInfo,
    watch: Arc<Watch>,
}

impl tower::Service<Request<Incoming>> for Connection {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = futures_util::future::BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.stack.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        use futures_util::FutureExt;
        let guard = self.watch.request_started();
        let mut req = req.map(body::boxed);
        req.extensions_mut().insert(self.info);
        let fut = self.stack.call(req);
        async move {
            let res = fut.await?;
            Ok(res.map(|b| body::boxed(Holding::new(b, guard))))
        }
        .boxed()
    }
}
