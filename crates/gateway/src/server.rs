//! Listening and serving: binds the listener, assembles the request path
//! (one service: [`Front`], then the edge and the proxy), runs the accept
//! loop and serves each connection, and shuts down gracefully.
//!
//! The accept loop only accepts, and hands each connection to one of the
//! gateway's worker threads (`workers`); everything per connection
//! (`TCP_NODELAY`, the TLS handshake) happens on the connection's own task
//! there, so a slow client cannot stall accepting. Each worker
//! keeps its connections in a `JoinSet`, so that shutdown can close the
//! ones still open at the deadline.
//!
//! A connection's first bytes decide its protocol: the HTTP/2 preface goes
//! to hyper (h2c, through hyper's HTTP/2 builder, its socket watched by
//! `conn` for the lingering close); anything else is HTTP/1.x, served by the
//! gateway's own driver (`h1`), which parses heads, enforces the head size
//! and count limits (431), the slow-head (408) and idle timeouts, and
//! lingers on close itself.
//!
//! With TLS (`Config::tls`, see `tls`), every connection is a TLS one: the
//! handshake first (bounded by the head timeout), then ALPN decides: `h2`
//! goes to hyper, anything else to the same HTTP/1 driver, over the TLS
//! stream, with `https` as the connection's scheme.
//!
//! Load shedding: past `max_in_flight` requests at once, new ones get 503
//! `overloaded` at once (before any routing or upstream work), so a flood
//! degrades into fast refusals instead of a gateway out of memory.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use http::header::{SERVER, STRICT_TRANSPORT_SECURITY};
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::access_log::{self, AccessLog, Refused, Sink};
use crate::body::{self, Body, Holding};
use crate::bulkhead::{Cap, Place};
use crate::client_cert::ClientCert;
use crate::config::Limits;
use crate::conn::{self, H2_PREFACE, Paused, StreamExecutor, Watch};
use crate::conn_limit::Admission;
use crate::conn_limit::{ConnLimits, Expired};
use crate::edge;
use crate::h1;
use crate::health;
use crate::outbound::Outbound;
use crate::proxy::Proxy;
use crate::proxy_protocol;
use crate::rejection::{Refusal, Rejection};
use crate::relayed::Reply;
use crate::request_id::{RequestId, X_REQUEST_ID};
use crate::resilience::Resilience;
use crate::routing::RoutingState;
use crate::tls::Acceptor;
use crate::transport::Transport;
use crate::upgrade::Tunnels;
use crate::upstream::Upstreams;
use crate::workers::{self, Workers};
use crate::{Error, stats};

/// The `Server` field of every response.
static FLOTILLA: HeaderValue = HeaderValue::from_static("flotilla");

/// The whole request path, called with each request and the connection it
/// arrived on. Not a tower `Service`: a service's future must be a type it
/// can name, which for an `async fn` means a box, allocated, moved into and
/// freed per request. A handler's future is its own concrete type, which
/// the HTTP/1 driver holds inline in the connection's task.
pub(crate) trait Handler: Clone + Send + Sync + 'static {
    fn call(
        &self,
        req: Request<Body>,
        conn: ConnInfo,
    ) -> impl Future<Output = Reply> + Send + 'static;

    /// A request the HTTP/1 driver answered itself, never having made it
    /// one to `call` with (a head too slow, too large or malformed, a
    /// malformed chunked body): to record as the request path records its
    /// own answers.
    fn refused(&self, refused: &Refused<'_>);
}

/// The gateway's request path ([`Front`]), one per worker.
#[derive(Clone)]
pub(crate) struct Stack(Arc<Front>);

impl Handler for Stack {
    fn call(
        &self,
        req: Request<Body>,
        conn: ConnInfo,
    ) -> impl Future<Output = Reply> + Send + 'static {
        // `serve`'s own future, not one wrapped in a block: awaiting it in
        // one would move all of it (~3 KB) into the block's on every call.
        Front::serve(Arc::clone(&self.0), req, conn)
    }

    fn refused(&self, refused: &Refused<'_>) {
        self.0.log.refused(refused);
    }
}

/// The client side of the connection a request arrived on. Passed beside
/// the request rather than in its extensions: the first extension costs
/// three allocations (the map, its table, the boxed value) per request.
///
/// A client certificate the handshake verified (`TlsConfig::client_ca`)
/// goes in the request's extensions instead, as an `Arc<ClientCert>`: only
/// requests that have one pay for it, and this stays small and `Copy`
/// (every request moves it through several futures).
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

/// The request path, as one cloneable service: [`Front::serve`] is every
/// step before and after the edge, then the edge and the proxy.
///
/// One `async fn` rather than a stack of tower layers: each layer would box
/// its future and re-wrap the response body, and those allocations, moves
/// and indirect calls were most of the gateway's own CPU time per request.
/// The request's whole future is one concrete type, never boxed on the
/// HTTP/1 path ([`Handler`]).
///
/// One stack per client (a worker's connection pool), sharing everything
/// else: configuration, access log, in-flight count, open WebSocket
/// tunnels, instance health.
/// Each worker's requests touch only its own `Front`, so its reference
/// count, cloned per request, stays in one core's cache.
pub(crate) fn stacks(
    limits: &Limits,
    hsts: Option<Duration>,
    routing: Arc<RoutingState>,
    access_log: Option<Arc<Sink>>,
    upstreams: Arc<dyn Upstreams>,
    clients: Vec<Outbound>,
    resilience: Arc<Resilience>,
) -> Vec<Stack> {
    stats::describe();
    // The gateway's own metrics: its routings carry them, so that every
    // routing built for the gateway (the first, and each reload's) counts
    // into the same.
    let log = AccessLog::new(access_log, Arc::clone(&routing.current().stats));
    let in_flight = Cap::new(limits.max_in_flight);
    let tunnels = Tunnels::new(limits.max_tunnels);
    let hsts = hsts.map(|max_age| {
        // Digits and ASCII only: always a valid value.
        HeaderValue::try_from(format!("max-age={}", max_age.as_secs()))
            .unwrap_or_else(|_| HeaderValue::from_static("max-age=0"))
    });
    let mut clients = clients.into_iter();
    let Some(first) = clients.next() else {
        return Vec::new();
    };
    let first = Proxy::new(upstreams, first, limits, resilience);
    let others: Vec<Proxy> = clients.map(|client| first.with_client(client)).collect();
    std::iter::once(first)
        .chain(others)
        .map(|proxy| {
            Stack(Arc::new(Front {
                log: log.clone(),
                in_flight: in_flight.clone(),
                tunnels: Arc::clone(&tunnels),
                routing: Arc::clone(&routing),
                proxy,
                hsts: hsts.clone(),
            }))
        })
        .collect()
}

/// Fields the gateway may add to a request's map before forwarding it
/// (see `h1::head`'s `HEADROOM`; an HTTP/2 request's map comes from hyper).
const REQUEST_HEADROOM: usize = 8;

/// What every request goes through, whatever its route.
struct Front {
    log: AccessLog,
    /// Requests admitted and not finished (response body done or
    /// dropped), against `max_in_flight`; shared by every worker's stack.
    in_flight: Cap,
    /// WebSocket tunnels open, against `Limits::max_tunnels`.
    tunnels: Arc<Tunnels>,
    routing: Arc<RoutingState>,
    proxy: Proxy,
    /// `Strict-Transport-Security` for every response, with TLS and `hsts`
    /// (the listener is then HTTPS only, so every response is over TLS).
    hsts: Option<HeaderValue>,
}

impl Front {
    /// The steps, in order: the request id (first, so that every response
    /// carries it, even one made up here, and every later step can log it);
    /// the access-log entry (which sees the final status, route and instance
    /// of every request); load shedding (before any work is spent on a
    /// request that will be refused); the gateway's own health answer
    /// (before routing, so that no service route can shadow it); then the
    /// edge (IP lists, CORS, routing, JWT, rate limits, body limits) and the
    /// proxy. Every response leaves with the request id and `server:
    /// flotilla`, its body wrapped once to finish the entry (and the
    /// in-flight count) when it is done.
    ///
    /// An `async` block rather than an `async fn`: an `async fn` copies
    /// its arguments into locals of its future, which then holds the
    /// request (240 bytes) twice and copies it once more per request.
    #[expect(clippy::manual_async_fn, reason = "an async fn copies its arguments")]
    fn serve(
        self: Arc<Self>,
        mut req: Request<Body>,
        conn: ConnInfo,
    ) -> impl Future<Output = Reply> + Send + 'static {
        async move {
            // Room for what the gateway may add to the map in one
            // allocation rather than a regrowth per insert.
            // (It fails only near the map's size limit, which the head
            // limits rule out.)
            let _ = req.headers_mut().try_reserve(REQUEST_HEADROOM);
            // The client's id kept in place, or a new one for the instance's
            // request head.
            let request_id = RequestId::of(req.headers_mut());
            // Dropped with this future if the client leaves before the
            // response: then it logs a 499.
            let mut entry = self.log.begin(&req, request_id, conn.peer.ip());
            let admitted = self.admit();
            let mut reply = if admitted.is_none() {
                self.log.shed();
                Rejection::Overloaded.into_reply(Some(entry.request_id()), entry.logs())
            } else if let Some(res) = health::answer(&req) {
                res.into()
            } else {
                let routing = self.routing.current();
                // The edge writes what it finds into the entry as it goes,
                // so that a request dropped midway is logged with it.
                let (request_id, served) = entry.serving();
                edge::handle(
                    routing,
                    &self.proxy,
                    &self.tunnels,
                    req,
                    conn,
                    request_id,
                    served,
                )
                .await
            };
            let mut fields = reply.fields();
            fields.insert_ref(&X_REQUEST_ID, entry.request_id().header());
            fields.insert_ref(&SERVER, &FLOTILLA);
            if let Some(hsts) = &self.hsts {
                fields.insert_ref(&STRICT_TRANSPORT_SECURITY, hsts);
            }
            let refusal = reply.res.extensions().get::<Refusal>().copied();
            entry.responded(reply.res.status(), refusal);
            // In flight until the response body is done. The body is swapped
            // in place: taking the response apart and putting it together
            // again would copy all of it twice.
            let body = reply.res.body_mut();
            *body = access_log::logged(std::mem::replace(body, body::empty()), admitted, entry);
            reply
        }
    }

    /// Counts a request in, unless `max_in_flight` are in flight already.
    fn admit(&self) -> Option<Place> {
        self.in_flight.enter()
    }
}

/// hyper's HTTP/2 builder, for h2c connections (`serve_h2`): only
/// connections that start with the HTTP/2 preface reach hyper, so no
/// HTTP/1 settings (and no second look at the preface) are needed.
fn h2_builder(limits: &Limits) -> http2::Builder<StreamExecutor> {
    let mut builder = http2::Builder::new(StreamExecutor);
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// Serves until `stop` yields a drain deadline (or is dropped: deadline 0):
/// accepts here, and hands each connection within `limits` to the worker
/// thread with the fewest open, which serves it to its end (`workers`).
/// One over a limit is closed at once (`conn_limit`), the routing in force
/// when it arrives saying which peers are trusted proxies.
pub(crate) async fn run(
    listener: TcpListener,
    mut workers: Workers,
    admission: Admission,
    stopping: watch::Sender<()>,
    mut stop: oneshot::Receiver<Duration>,
    log_writer: Option<JoinHandle<()>>,
) {
    let deadline = loop {
        tokio::select! {
            stop = &mut stop => break stop.unwrap_or(Duration::ZERO),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if let Ok(slot) = admission.admit(peer) {
                        workers.hand(stream, peer, slot);
                    }
                }
                Err(e) => accept_failed(e).await,
            },
        }
    };
    drop(listener);
    // Idle HTTP/1 connections close at once, busy ones after their
    // request; h2c connections send GOAWAY and finish their streams.
    stopping.send_replace(());
    tracing::info!(target: "flotilla::gateway", ?deadline, "gateway stopping");
    workers.finish(deadline).await;

    if let Some(writer) = log_writer
        && tokio::time::timeout(LOG_FLUSH_DEADLINE, writer)
            .await
            .is_err()
    {
        tracing::warn!(target: "flotilla::gateway", "the access log was not written out in time");
    }
}

/// Starts the worker threads, one per stack; `stopping` (sent when the
/// gateway stops) reaches every connection.
pub(crate) fn start_workers(
    stacks: Vec<Stack>,
    limits: &Limits,
    tls: Option<Acceptor>,
    conn_limits: &Arc<ConnLimits>,
    stopping: &watch::Sender<()>,
) -> std::io::Result<Workers> {
    let builder = Arc::new(h2_builder(limits));
    let settings = h1::Settings::new(limits);
    let serves = stacks
        .into_iter()
        .map(|stack| Connections {
            builder: Arc::clone(&builder),
            stack,
            stopping: stopping.subscribe(),
            settings,
            tls: tls.clone(),
            conn_limits: Arc::clone(conn_limits),
        })
        .collect();
    Workers::start("flotilla-gateway", serves)
}

/// What a worker serves each connection with; each connection's task
/// holds a clone (reference counts and a watch receiver).
#[derive(Clone)]
struct Connections {
    builder: Arc<http2::Builder<StreamExecutor>>,
    stack: Stack,
    stopping: watch::Receiver<()>,
    settings: h1::Settings,
    /// With TLS terminated here: the handshake, with the current certificate.
    tls: Option<Acceptor>,
    /// For the client a PROXY protocol header names.
    conn_limits: Arc<ConnLimits>,
}

impl workers::Serve for Connections {
    fn serve(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = ()> + Send + 'static {
        serve_connection(self.clone(), stream, peer)
    }
}

/// An `accept` that failed: the main listener and the redirect one alike.
pub(crate) async fn accept_failed(e: std::io::Error) {
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

/// A connection, to its end: what comes before HTTP/1 (the TLS handshake,
/// the first read) and HTTP/2, which each step serves itself, then HTTP/1.
/// The one place the HTTP/1 driver is started from: with two, its future's
/// poll would no longer be inlined into this one's, which costs every
/// request on a plain connection ~45 instructions (`instructions.sh`).
async fn serve_connection(with: Connections, mut stream: TcpStream, mut peer: SocketAddr) {
    // The connection's first head (over TLS, its handshake) is due
    // `header_timeout` from now: a PROXY header's wait is part of it, not
    // added to it.
    let accepted = tokio::time::Instant::now();
    // Behind a balancer that speaks the PROXY protocol, the client is the
    // one its header names, counted under its address while the
    // connection is open. Boxed: a connection's task does not grow by the
    // read's future.
    let client = proxy_protocol::client_of(
        &mut stream,
        peer,
        &with.stack.0.routing,
        &with.conn_limits,
        with.settings.header_timeout,
    );
    let Some(client) = Box::pin(client).await else {
        return;
    };
    peer = client.addr;
    let _counted = client.counted;
    let started = match &with.tls {
        None => start_plain(&with, stream, peer, accepted).await,
        // Boxed: a plain connection's task does not grow by the
        // handshake's future.
        Some(tls) => Box::pin(start_tls(tls, &with, stream, peer, accepted)).await,
    };
    if let Some((io, first, info, client_cert, head_by)) = started {
        let Connections {
            stack,
            settings,
            stopping,
            ..
        } = with;
        let conn = h1::Start {
            io,
            read: first,
            info,
            client_cert,
            head_by,
            accepted,
        };
        h1::serve(conn, stack, settings, stopping).await;
    }
}

/// What the HTTP/1 driver starts with: the connection, what was read from
/// it, where it comes from, the client's verified certificate, and when
/// its first request's head must have arrived.
type Http1 = (
    Transport,
    BytesMut,
    ConnInfo,
    Option<Arc<ClientCert>>,
    tokio::time::Instant,
);

/// A plain connection: its first bytes tell HTTP/2 (served here, to its
/// end) from HTTP/1 (returned).
async fn start_plain(
    with: &Connections,
    stream: TcpStream,
    peer: SocketAddr,
    accepted: tokio::time::Instant,
) -> Option<Http1> {
    nodelay(&stream, peer);
    // A client that connects and says nothing would hold the socket
    // forever (and, being silent, would never see a graceful shutdown).
    // Its first head is due `header_timeout` after it connected: the wait
    // for its first bytes is part of it, not added to it.
    let head_by = accepted + with.settings.header_timeout;
    let mut first = BytesMut::with_capacity(FIRST_READ);
    let mut stop = with.stopping.clone();
    tokio::select! {
        read = tokio::time::timeout_at(head_by, read_first(&stream, &mut first)) => {
            if !matches!(read, Ok(Ok(true))) {
                return None;
            }
        }
        _ = stop.changed() => return None,
    }
    let info = ConnInfo {
        peer,
        scheme: "http",
    };
    if first.starts_with(H2_PREFACE) {
        serve_h2(with, stream, first, info, accepted).await;
        return None;
    }
    Some((stream.into(), first, info, None, head_by))
}

/// A connection to a gateway that terminates TLS: the handshake (within
/// the head timeout: a client that connects and never finishes it must not
/// hold the socket), then HTTP/2 if the client chose it by ALPN (served
/// here, to its end), else HTTP/1.x (returned), with `https` as the scheme.
async fn start_tls(
    tls: &Acceptor,
    with: &Connections,
    stream: TcpStream,
    peer: SocketAddr,
    accepted: tokio::time::Instant,
) -> Option<Http1> {
    nodelay(&stream, peer);
    let mut stop = with.stopping.clone();
    // One deadline for the first byte and the handshake.
    let deadline = accepted + with.settings.header_timeout;
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        peeked = tokio::time::timeout_at(deadline, stream.peek(&mut first)) => peeked,
        _ = stop.changed() => return None,
    };
    match peeked {
        Ok(Ok(n)) if n > 0 => {}
        // Closed, or failed: nothing to answer.
        Ok(_) => return None,
        Err(_) => {
            stats::tls_failed("timeout");
            return None;
        }
    }
    // A TLS connection starts with a handshake record (22), an HTTP
    // request with a method's first letter.
    if first[0].is_ascii_alphabetic() {
        stats::tls_failed("plaintext");
        refuse_plaintext(stream).await;
        return None;
    }
    let handshake = tokio::select! {
        handshake = tokio::time::timeout_at(deadline, tls.accept(stream)) => handshake,
        _ = stop.changed() => return None,
    };
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(target: "flotilla::gateway", %peer, error = %e, "TLS handshake failed");
            stats::tls_failed("error");
            return None;
        }
        Err(_) => {
            stats::tls_failed("timeout");
            return None;
        }
    };
    let (_, session) = stream.get_ref();
    let h2 = session.alpn_protocol() == Some(b"h2");
    let client_cert = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| Arc::new(ClientCert::new(leaf)));
    if let Some(cert) = &client_cert
        && !cert.in_date(unix_seconds())
    {
        // A resumed session's (see `ClientCert::in_date`): refused, not
        // counted as accepted. (A client that renewed its certificate but
        // kept its sessions then makes a full handshake: the test shows.)
        tracing::debug!(target: "flotilla::gateway", %peer, "client certificate out of date on a resumed session");
        stats::tls_failed("certificate_expired");
        return None;
    }
    stats::tls_accepted(session.protocol_version(), h2);
    let info = ConnInfo {
        peer,
        scheme: "https",
    };
    if h2 {
        let watch = Watch::new(with.settings.max_requests);
        let h2 = H2 {
            info,
            client_cert,
            watch,
            accepted,
        };
        serve_h2_conn(with, stream, h2).await;
        return None;
    }
    // The first head is due `header_timeout` after the handshake, as the
    // next ones are after their requests: not the idle timeout's minute a
    // connection that has said nothing yet would otherwise get.
    let head_by = tokio::time::Instant::now() + with.settings.header_timeout;
    Some((stream.into(), BytesMut::new(), info, client_cert, head_by))
}

/// The wall clock, in Unix seconds (0 before 1970).
fn unix_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Requests and responses are small writes that must not wait for
/// Nagle's algorithm.
fn nodelay(stream: &TcpStream, peer: SocketAddr) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(target: "flotilla::gateway", %peer, error = %e, "cannot set TCP_NODELAY");
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
    with: &Connections,
    stream: TcpStream,
    first: BytesMut,
    info: ConnInfo,
    accepted: tokio::time::Instant,
) {
    let (io, watched) = conn::watch(stream, first.freeze(), with.settings.max_requests);
    let h2 = H2 {
        info,
        client_cert: None,
        watch: Arc::clone(&watched.watch),
        accepted,
    };
    serve_h2_conn(with, io, h2).await;
    // hyper's side of the connection is gone here.
    watched.linger().await;
}

/// An HTTP/2 connection as `serve_h2_conn` takes it, beside its socket.
struct H2 {
    info: ConnInfo,
    client_cert: Option<Arc<ClientCert>>,
    watch: Arc<Watch>,
    /// When it was accepted, which its age counts from.
    accepted: tokio::time::Instant,
}

/// Serves an HTTP/2 connection with hyper to its end; gracefully (GOAWAY,
/// then the streams in progress finish) once the gateway stops, once no
/// request has been in progress for `idle_timeout`, once
/// `max_connection_requests` streams have begun, or once it is
/// `max_connection_age` old.
async fn serve_h2_conn<I>(with: &Connections, io: I, h2: H2)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let H2 {
        info,
        client_cert,
        watch,
        accepted,
    } = h2;
    let peer = info.peer;
    let service = TowerToHyperService::new(Connection {
        stack: with.stack.clone(),
        info,
        client_cert,
        watch: Arc::clone(&watch),
        max_headers: with.settings.max_headers,
        body_timeout: with.settings.body_timeout,
    });
    let conn = with.builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut stopping = with.stopping.clone();
    let expiry = async {
        match with.settings.max_age {
            Some(age) => tokio::time::sleep_until(accepted + age).await,
            None => std::future::pending().await,
        }
    };
    let body_timeout = with.settings.body_timeout;
    let ended = tokio::select! {
        result = conn.as_mut() => Some(result),
        // An error: the gateway is gone, which is stopping too.
        _ = stopping.changed() => None,
        () = watch.idle(with.settings.idle_timeout) => {
            tracing::debug!(target: "flotilla::gateway", %peer, "idle HTTP/2 connection; going away");
            None
        }
        () = watch.spent() => {
            tracing::debug!(target: "flotilla::gateway", %peer, "HTTP/2 connection at max_connection_requests; going away");
            Expired::MaxRequests.count();
            None
        }
        () = expiry => {
            tracing::debug!(target: "flotilla::gateway", %peer, "HTTP/2 connection at max_connection_age; going away");
            Expired::MaxAge.count();
            None
        }
        // Resets each stream the client reads nothing of; resolves only for
        // one that cannot be reset alone. Closed at once then: a graceful
        // end would wait for that stream.
        () = watch.stalled(body_timeout) => {
            tracing::debug!(target: "flotilla::gateway", %peer, timeout = ?body_timeout, "an HTTP/2 client read nothing of a response; closing");
            Some(Ok(()))
        }
    };
    let result = match ended {
        Some(result) => result,
        None => {
            // GOAWAY: the client opens no more streams, and those in
            // progress finish, each still reset if its client reads
            // nothing of it for `body_timeout`. (When the gateway stops,
            // its drain deadline bounds the whole.)
            conn.as_mut().graceful_shutdown();
            // hyper sends its last GOAWAY, and ends the connection, once
            // the client has answered a PING: a client that never does
            // would hold it (a socket, a task) for ever. It gets
            // `header_timeout` to, and then no request may have been in
            // progress for `body_timeout` (h2 may still hold the tail of a
            // response whose body hyper has let go, and the stream's
            // `Paced` clock with it: a client that reads it within
            // `body_timeout` gets it whole, as before the GOAWAY).
            let grace = with.settings.header_timeout;
            let unanswered = async {
                tokio::time::sleep(grace).await;
                watch.idle(body_timeout.max(grace)).await;
            };
            tokio::select! {
                result = conn.as_mut() => result,
                () = watch.stalled(body_timeout) => Ok(()),
                () = unanswered => {
                    tracing::debug!(target: "flotilla::gateway", %peer, "an HTTP/2 client never acknowledged going away; closing");
                    Ok(())
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(target: "flotilla::gateway", %peer, error = %e, "connection ended with an error");
    }
}

/// Plain HTTP on the TLS port: a 400 that says so, then the lingering close.
async fn refuse_plaintext(stream: TcpStream) {
    const BODY: &str = r#"{"error":{"code":"https_required","message":"this port speaks HTTPS: send the request to https:// instead of http://","request_id":""}}"#;
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-type: application/json\r\nserver: flotilla\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    conn::write_plain(&stream, response.as_bytes()).await;
    conn::linger(&stream).await;
}

/// The stack as seen from one connection: boxes hyper's body into the
/// stack's and tags each request with the connection's [`ConnInfo`].
#[derive(Clone)]
struct Connection {
    stack: Stack,
    info: ConnInfo,
    client_cert: Option<Arc<ClientCert>>,
    watch: Arc<Watch>,
    /// `[gateway.limits] max_headers`: hyper bounds a head's bytes
    /// (`max_header_list_size`), not its fields, and HTTP/2's accounting
    /// (each field's length plus 32) lets some 1 900 one-byte fields
    /// through 64 KiB. More than this many get 431, as over HTTP/1 (the
    /// cookies counted as one field).
    max_headers: usize,
    /// `[gateway.limits] body_timeout`: a request body waited for this
    /// long fails (`conn::Paused`).
    body_timeout: Duration,
}

impl tower::Service<Request<Incoming>> for Connection {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = futures_util::future::BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        use futures_util::FutureExt;
        self.watch.stream_begun();
        if too_many_fields(req.headers(), self.max_headers) {
            // The refusal HTTP/1 gives the same head (`h1::head`).
            let too_large = h1::head::Invalid::TooLarge;
            let body = crate::rejection::error_body(too_large.code(), too_large.message(), "");
            let mut res = Response::new(body::full(body));
            *res.status_mut() = too_large.status();
            res.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            return async move { Ok(res) }.boxed();
        }
        let guard = self.watch.request_started();
        // A body still to come is timed while it is waited for; one that
        // ended with the head (most requests) costs nothing.
        let mut req = req.map(|b| match http_body::Body::is_end_stream(&b) {
            true => body::boxed(b),
            false => body::boxed(Paused::new(b, self.body_timeout)),
        });
        if let Some(cert) = &self.client_cert {
            req.extensions_mut().insert(Arc::clone(cert));
        }
        let fut = self.stack.call(req, self.info);
        let watch = Arc::clone(&self.watch);
        async move {
            // hyper writes the map only.
            let res = fut.await.into_response();
            Ok(res.map(|b| body::boxed(Holding::new(watch.pace(b), guard))))
        }
        .boxed()
    }
}

/// Whether an HTTP/2 request's head has more than `max` fields. Its
/// cookies count as one: HTTP/2 clients send each as a field of its own
/// (RFC 9113 §8.2.3), which HTTP/1 joins into one line. Counted only past
/// `max`, which almost no request is.
fn too_many_fields(headers: &http::HeaderMap, max: usize) -> bool {
    if headers.len() <= max {
        return false;
    }
    let cookies = headers.get_all(http::header::COOKIE).iter().count();
    headers.len() - cookies + usize::from(cookies > 0) > max
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, RouteConfig};
    use crate::upstream::{ActivateFuture, Endpoint, Load};
    use crate::{access_log, client, outbound, routing};

    #[test]
    fn an_http2_head_s_cookies_count_as_one_field() {
        let head = |fields: usize, cookies: usize| {
            let mut h = http::HeaderMap::new();
            for i in 0..fields {
                h.append(
                    http::HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                    http::HeaderValue::from_static("v"),
                );
            }
            for _ in 0..cookies {
                h.append(http::header::COOKIE, http::HeaderValue::from_static("a=1"));
            }
            h
        };
        assert!(!too_many_fields(&head(10, 0), 10));
        assert!(too_many_fields(&head(11, 0), 10));
        assert!(!too_many_fields(&head(9, 50), 10), "nine and the cookies");
        assert!(too_many_fields(&head(10, 1), 10));
        assert!(too_many_fields(&head(10, 50), 10));
    }

    /// One service whose only instance accepts connections and never answers.
    struct Silent(Arc<[Endpoint]>);

    impl Upstreams for Silent {
        fn ready(&self, _service: &str) -> Arc<[Endpoint]> {
            Arc::clone(&self.0)
        }

        fn activate(&self, _service: &str) -> ActivateFuture {
            Box::pin(async { Ok(()) })
        }
    }

    fn request(path: &str) -> Request<Body> {
        match Request::builder().uri(path).body(body::empty()) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    async fn call(stack: &mut Stack, req: Request<Body>) -> Response<Body> {
        let conn = ConnInfo {
            peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
            scheme: "http",
        };
        stack.call(req, conn).await.into_response()
    }

    #[tokio::test]
    async fn an_abandoned_request_logs_499_and_is_no_longer_in_flight() {
        let silent = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        };
        let addr = match silent.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        };
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let path = dir.path().join("access.log");
        let (sink, writer) = match access_log::open(&path).await {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        };
        let pattern = match flotilla_manifest::PathPattern::parse("/**") {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        let limits = Limits {
            // One at a time: a request still counted would shed the next.
            max_in_flight: 1,
            ..Limits::default()
        };
        let config = Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            routes: vec![RouteConfig::new("svc", pattern)],
            static_dir: None,
            access_log: None,
            limits: limits.clone(),
            jwt: Vec::new(),
            cors: None,
            ip: None,
            rate_limit_backend: Default::default(),
            upstream_tls: None,
            tls: None,
            request_headers: Default::default(),
            response_headers: Default::default(),
            compression: None,
            cache: Default::default(),
            api_keys: None,
            authz: None,
        };
        let upstreams: Arc<dyn Upstreams> = Arc::new(Silent(Arc::from(vec![Endpoint {
            instance: "svc-0".into(),
            addr,
            load: Arc::new(Load::default()),
        }])));
        let connector = match client::connector(&limits, None) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let context = routing::Context {
            client: client::fetch_client(connector.clone()),
            upstreams: Arc::clone(&upstreams),
            stats: stats::GatewayStats::new(),
        };
        let built = match routing::Routing::build(&config, None, &context) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        let Some(mut stack) = stacks(
            &limits,
            None,
            Arc::new(RoutingState::new(built)),
            Some(sink),
            Arc::clone(&upstreams),
            vec![outbound::Outbound::new(connector, limits.body_timeout)],
            Arc::new(Resilience::new(crate::resilience::Settings::from_limits(
                &limits,
            ))),
        )
        .pop() else {
            panic!("no stack for one client");
        };

        // The client gives up while the instance is still silent.
        let abandoned = tokio::time::timeout(
            Duration::from_millis(200),
            call(&mut stack, request("/svc/slow")),
        )
        .await;
        assert!(abandoned.is_err(), "the silent instance answered");
        let load = upstreams.ready("svc");
        assert_eq!(load[0].load.in_flight(), 0, "the instance is still loaded");

        // Not in flight any more: the next request is not shed.
        let res = call(&mut stack, request("/healthz")).await;
        assert_eq!(res.status(), http::StatusCode::OK);
        assert_eq!(res.headers()[SERVER], "flotilla");
        let id = res.headers()[&X_REQUEST_ID].clone();
        drop(res);
        // While a response body is unfinished, the request is in flight.
        let held = call(&mut stack, request("/healthz")).await;
        let shed = call(&mut stack, request("/healthz")).await;
        assert_eq!(shed.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        drop((held, shed));

        drop(stack);
        match tokio::time::timeout(Duration::from_secs(5), writer).await {
            Ok(Ok(())) => {}
            other => panic!("writer did not finish: {other:?}"),
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[0]["status"], 499, "{text}");
        assert_eq!(lines[0]["path"], "/svc/slow");
        assert_eq!(lines[1]["status"], 200);
        assert_eq!(lines[1]["request_id"], id.to_str().unwrap_or("-"));
        let statuses: Vec<_> = lines[2..].iter().map(|l| l["status"].clone()).collect();
        assert!(statuses.contains(&503.into()), "{text}");
    }
}
