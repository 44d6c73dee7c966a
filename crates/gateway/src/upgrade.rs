//! WebSocket through the gateway: the HTTP/1.1 upgrade handshake is proxied
//! like any request (routing, IP lists, JWT, rate limits and the retry
//! rules all apply to it), and once the instance has answered
//! `101 Switching Protocols` the two connections are joined into a tunnel
//! that carries bytes both ways until either side closes.
//!
//! Who decides what:
//!
//! - The HTTP/1 front (`h1::head`) marks a request [`WebSocket`] when it is
//!   an HTTP/1.1 `GET` without a body whose `Connection` names `upgrade`
//!   and whose `Upgrade` offers `websocket` (RFC 6455 §4.1). Only that
//!   front can switch a connection, so only it marks; HTTP/2 clients
//!   (hyper's server) never ask this way. Other upgrades (`h2c`, anything
//!   else) are not relayed: `Upgrade` stays a hop-by-hop field, removed on
//!   the way to the instance, and the request is served as plain HTTP.
//! - The upstream client (`outbound`) sends a marked request with
//!   `Connection: upgrade` and `Upgrade: websocket`, and accepts a `101`
//!   only for a marked request whose answer says `Upgrade: websocket`;
//!   the connection then leaves the pool for good, as a [`Tunnel`] in the
//!   response's extensions ([`Handoff`]). A `101` to anything else is a
//!   protocol error (502): a proxy that tunnelled after an answer the
//!   client did not ask for, or after a refusal, would let a client
//!   smuggle requests past it.
//! - The edge refuses a handshake from an origin the CORS policy does not
//!   allow (`cors`), and one past `max_tunnels` ([`Tunnels`]), whose place
//!   the tunnel then holds until it ends; and it takes a bearer token a
//!   browser offered as a subprotocol ([`token_from_subprotocol`]).
//! - The front writes the `101` with the instance's fields (its
//!   `Sec-WebSocket-Accept`, a chosen subprotocol) and then [`relay`]s.
//!
//! The tunnel is bytes, not frames: the gateway reads no WebSocket frame,
//! so every extension and subprotocol passes. It ends when both directions
//! have ended (each end's close is passed on as a half-close), when either
//! side fails, or after `tunnel_idle_timeout` with no byte either way.
//! When the gateway stops, a tunnel is left open until the drain deadline,
//! when its connection is closed with the others still open.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{AUTHORIZATION, HeaderMap, HeaderValue, SEC_WEBSOCKET_PROTOCOL};
use http::{Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::body::Body;
use crate::bulkhead::{Cap, Place};
use crate::client::Stream;
use crate::routes::Route;
use crate::stats;

/// The subprotocol a browser offers its bearer token as: browsers cannot
/// set `Authorization` on a WebSocket, and the only field a page controls
/// in the handshake is `Sec-WebSocket-Protocol` (Kubernetes' API server
/// takes tokens the same way). A JWT's characters are all allowed in a
/// subprotocol name. In the query string instead, the token would end up
/// in every log that records URLs.
pub(crate) const TOKEN_PROTOCOL: &str = "bearer.flotilla.";

/// Takes a bearer token offered as the subprotocol `bearer.flotilla.<token>`
/// out of `Sec-WebSocket-Protocol` (the instance never sees it, and cannot
/// choose it), and makes it the handshake's `Authorization: Bearer`, unless
/// the handshake has an `Authorization` of its own; the route's JWT policy
/// then checks it as any other. The other subprotocols stay, in order.
pub(crate) fn token_from_subprotocol(headers: &mut HeaderMap) {
    let protocols = headers.get_all(SEC_WEBSOCKET_PROTOCOL);
    let offered = crate::headers::list_elements(protocols.iter().map(HeaderValue::as_bytes));
    let mut token: Option<&[u8]> = None;
    let mut others: Vec<&[u8]> = Vec::new();
    for protocol in offered {
        match protocol.strip_prefix(TOKEN_PROTOCOL.as_bytes()) {
            Some(t) => {
                token.get_or_insert(t);
            }
            None => others.push(protocol),
        }
    }
    let Some(token) = token else {
        return;
    };
    let bearer = (!token.is_empty() && !headers.contains_key(AUTHORIZATION))
        .then(|| HeaderValue::from_bytes(&[b"Bearer ", token].concat()));
    let rest = (!others.is_empty()).then(|| HeaderValue::from_bytes(&others.join(&b", "[..])));
    headers.remove(SEC_WEBSOCKET_PROTOCOL);
    // Both were parts of valid header values, so both are valid again.
    if let Some(Ok(rest)) = rest {
        headers.insert(SEC_WEBSOCKET_PROTOCOL, rest);
    }
    if let Some(Ok(bearer)) = bearer {
        headers.insert(AUTHORIZATION, bearer);
    }
}

/// Marks a request whose connection can switch to WebSocket (see the module
/// doc); in the request's extensions, so only such requests pay for it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WebSocket;

/// The instance's side of a switched connection: the connection, and what
/// it sent after its `101` head (frames may follow the head at once); and
/// its place under `max_tunnels`, held until the tunnel ends.
pub(crate) struct Tunnel {
    pub(crate) io: Stream,
    pub(crate) read: BytesMut,
    pub(crate) slot: Option<Slot>,
}

/// Tunnels open (and handshakes in progress) against `Limits::max_tunnels`,
/// shared by every worker.
#[derive(Debug)]
pub(crate) struct Tunnels(Cap);

/// One tunnel's place among [`Tunnels`], given back when dropped; and the
/// route it was opened on, for its metrics.
#[derive(Debug)]
pub(crate) struct Slot {
    _open: Place,
    route: Arc<Route>,
    /// Its place within the route's `max_in_flight`, if the route has one:
    /// a tunnel is a request in flight until it closes.
    pub(crate) in_flight: Option<Place>,
}

impl Tunnels {
    pub(crate) fn new(max: usize) -> Arc<Tunnels> {
        Arc::new(Tunnels(Cap::new(max)))
    }

    /// A place for one more tunnel on `route`, unless all are taken.
    pub(crate) fn reserve(&self, route: &Arc<Route>) -> Option<Slot> {
        Some(Slot {
            _open: self.0.enter()?,
            route: Arc::clone(route),
            in_flight: None,
        })
    }
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("buffered", &self.read.len())
            .finish_non_exhaustive()
    }
}

/// A [`Tunnel`] on its way from `outbound` to the HTTP/1 front, in the
/// `101` response's extensions. There rather than in a field of `Reply`:
/// a field would make every reply larger, and a reply is moved several
/// times per request (`instructions.sh` counted ~0.9 % more instructions
/// per request that way); extensions cost nothing until used. Extensions
/// must be `Clone`, hence the shared slot, taken once.
#[derive(Clone)]
pub(crate) struct Handoff(Arc<Mutex<Option<Tunnel>>>);

impl Handoff {
    pub(crate) fn attach(res: &mut Response<Body>, tunnel: Tunnel) {
        res.extensions_mut()
            .insert(Handoff(Arc::new(Mutex::new(Some(tunnel)))));
    }

    /// Gives the tunnel of a `101` that carries one its place among the
    /// open ones (else the place is given back at once).
    pub(crate) fn hold(res: &Response<Body>, slot: Slot) {
        if let Some(handoff) = res.extensions().get::<Handoff>() {
            let mut tunnel = handoff.0.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(tunnel) = tunnel.as_mut() {
                tunnel.slot = Some(slot);
            }
        }
    }

    /// The tunnel of a `101` that carries one.
    pub(crate) fn take(res: &mut Response<Body>) -> Option<Tunnel> {
        if res.status() != StatusCode::SWITCHING_PROTOCOLS {
            return None;
        }
        let handoff = res.extensions_mut().remove::<Handoff>()?;
        let mut slot = handoff.0.lock().unwrap_or_else(|e| e.into_inner());
        slot.take()
    }
}

/// Buffer per direction.
const BUFFER: usize = 16 * 1024;

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Both sides closed.
    Closed,
    /// Nothing moved either way for the idle timeout.
    Idle,
    /// A read or write failed (a reset, a broken TLS session).
    Failed,
}

impl Ended {
    fn label(self) -> &'static str {
        match self {
            Ended::Closed => "closed",
            Ended::Idle => "idle",
            Ended::Failed => "error",
        }
    }
}

/// Carries bytes between `client` and the instance until the tunnel ends.
/// `from_client` is what the client sent after its request head (already
/// read off its socket), passed to the instance first.
pub(crate) async fn relay<C>(
    client: &mut C,
    from_client: Bytes,
    tunnel: Tunnel,
    idle: Duration,
) -> Ended
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let open = match tunnel.slot.as_ref().map(|s| &s.route) {
        Some(route) => stats::tunnel_opened(route.label(), &route.service),
        None => stats::tunnel_opened(stats::UNMATCHED, ""),
    };
    let start = crate::clock::now();
    // Milliseconds since `start` of the last byte either way.
    let last = AtomicU64::new(0);
    let mut near = Side {
        io: client,
        pending: from_client,
        last: &last,
        start,
    };
    let mut far = Side {
        io: tunnel.io,
        pending: tunnel.read.freeze(),
        last: &last,
        start,
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut near, &mut far, BUFFER, BUFFER);
    tokio::pin!(copy);
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    let ended = loop {
        tokio::select! {
            done = &mut copy => break match done {
                Ok((up, down)) => {
                    open.carried(up, down);
                    Ended::Closed
                }
                Err(e) => {
                    tracing::debug!(target: "flotilla::gateway", error = %e, "websocket tunnel failed");
                    Ended::Failed
                }
            },
            () = &mut timer => {
                let quiet_since = last.load(Ordering::Relaxed);
                let due = quiet_since.saturating_add(idle_ms);
                if elapsed_ms(start) >= due {
                    tracing::debug!(target: "flotilla::gateway", ?idle, "websocket tunnel idle; closing");
                    break Ended::Idle;
                }
                timer.as_mut().reset(start + Duration::from_millis(due));
            }
        }
    };
    open.finished(ended.label());
    ended
}

/// Milliseconds since `start`, by the connection task's clock (read once
/// per poll: `clock`), as every message would otherwise read it again.
fn elapsed_ms(start: Instant) -> u64 {
    let since = crate::clock::now().saturating_duration_since(start);
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// One end of the tunnel: reads start with `pending`; every byte read
/// counts as activity (every byte written was read first).
struct Side<'a, S> {
    io: S,
    pending: Bytes,
    last: &'a AtomicU64,
    start: Instant,
}

impl<S> Side<'_, S> {
    fn active(&self) {
        self.last.store(elapsed_ms(self.start), Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Side<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.pending.is_empty() {
            let n = this.pending.len().min(buf.remaining());
            buf.put_slice(&this.pending[..n]);
            this.pending.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.active();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Side<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_token_offered_as_a_subprotocol_becomes_the_bearer_and_leaves_the_list() {
        use http::header::{AUTHORIZATION, HeaderMap, HeaderValue, SEC_WEBSOCKET_PROTOCOL};
        let after = |protocols: &[&'static str], authorization: Option<&'static str>| {
            let mut h = HeaderMap::new();
            for p in protocols {
                h.append(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
            }
            if let Some(a) = authorization {
                h.insert(AUTHORIZATION, HeaderValue::from_static(a));
            }
            super::token_from_subprotocol(&mut h);
            let text = |name| {
                let all: Vec<&str> = h
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                (!all.is_empty()).then(|| all.join(" | "))
            };
            (text(&SEC_WEBSOCKET_PROTOCOL), text(&AUTHORIZATION))
        };
        assert_eq!(
            after(&["chat, bearer.flotilla.eyJ.x-y_z.sig, superchat"], None),
            (
                Some("chat, superchat".into()),
                Some("Bearer eyJ.x-y_z.sig".into())
            )
        );
        // Across several fields; the only protocol offered.
        assert_eq!(
            after(&["chat", "bearer.flotilla.tok"], None),
            (Some("chat".into()), Some("Bearer tok".into()))
        );
        assert_eq!(
            after(&["bearer.flotilla.tok"], None),
            (None, Some("Bearer tok".into()))
        );
        // An `Authorization` of the handshake's own wins; the offered
        // token is still taken out.
        assert_eq!(
            after(&["chat, bearer.flotilla.tok"], Some("Bearer own")),
            (Some("chat".into()), Some("Bearer own".into()))
        );
        // Nothing to take: untouched.
        assert_eq!(
            after(&["chat, superchat"], None),
            (Some("chat, superchat".into()), None)
        );
        // An empty token is no token (the JWT step says it is missing).
        assert_eq!(
            after(&["chat, bearer.flotilla."], None),
            (Some("chat".into()), None)
        );
    }

    #[test]
    fn tunnels_past_the_limit_get_no_slot_and_slots_come_back() {
        let pattern = match flotilla_manifest::PathPattern::parse("/ws/**") {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        let table = crate::routes::RouteTable::new(&[crate::RouteConfig::new("chat", pattern)]);
        let Some(route) = table.routes().first() else {
            panic!("no route");
        };
        let tunnels = super::Tunnels::new(2);
        let a = tunnels.reserve(route);
        let b = tunnels.reserve(route);
        assert!(a.is_some() && b.is_some());
        assert!(tunnels.reserve(route).is_none());
        drop(a);
        let c = tunnels.reserve(route);
        assert!(c.is_some());
        assert!(tunnels.reserve(route).is_none());
    }

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair of TCP sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("bind: {e}"),
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("addr: {e}"),
        };
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        match (a, b) {
            (Ok(a), Ok((b, _))) => (a, b),
            (a, b) => panic!("connect: {:?} / {:?}", a.err(), b.err()),
        }
    }

    async fn read_exact(io: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        if let Err(e) = io.read_exact(&mut buf).await {
            panic!("read {n} bytes: {e}");
        }
        buf
    }

    #[tokio::test]
    async fn buffered_bytes_go_first_and_closes_pass_through() {
        // client <-> (near | gateway | far) <-> instance
        let (mut client, mut near) = pair().await;
        let (far, mut instance) = pair().await;
        let tunnel = Tunnel {
            io: Stream::Plain(far),
            read: BytesMut::from(&b"early-from-instance "[..]),
            slot: None,
        };
        let relaying = tokio::spawn(async move {
            relay(
                &mut near,
                Bytes::from_static(b"early-from-client "),
                tunnel,
                Duration::from_secs(30),
            )
            .await
        });
        let ok = |r: io::Result<()>| {
            if let Err(e) = r {
                panic!("write: {e}");
            }
        };
        ok(client.write_all(b"then-client").await);
        ok(instance.write_all(b"then-instance").await);
        assert_eq!(
            read_exact(&mut instance, 29).await,
            b"early-from-client then-client"
        );
        assert_eq!(
            read_exact(&mut client, 33).await,
            b"early-from-instance then-instance"
        );
        // The client's half-close reaches the instance, which can still
        // answer; then the instance closes too and the tunnel ends.
        ok(client.shutdown().await);
        let mut rest = Vec::new();
        if let Err(e) = instance.read_to_end(&mut rest).await {
            panic!("read to end: {e}");
        }
        assert!(rest.is_empty());
        ok(instance.write_all(b"last words").await);
        drop(instance);
        let mut tail = Vec::new();
        if let Err(e) = client.read_to_end(&mut tail).await {
            panic!("read to end: {e}");
        }
        assert_eq!(tail, b"last words");
        match relaying.await {
            Ok(ended) => assert_eq!(ended, Ended::Closed),
            Err(e) => panic!("relay task: {e}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_tunnel_closes_after_its_idle_timeout() {
        let (mut client, mut near) = pair().await;
        let (far, mut instance) = pair().await;
        let tunnel = Tunnel {
            io: Stream::Plain(far),
            read: BytesMut::new(),
            slot: None,
        };
        let idle = Duration::from_secs(60);
        let relaying =
            tokio::spawn(async move { relay(&mut near, Bytes::new(), tunnel, idle).await });
        // Traffic keeps it open past one idle period...
        tokio::time::sleep(Duration::from_secs(40)).await;
        if let Err(e) = client.write_all(b"ping").await {
            panic!("write: {e}");
        }
        assert_eq!(read_exact(&mut instance, 4).await, b"ping");
        tokio::time::sleep(Duration::from_secs(40)).await;
        assert!(!relaying.is_finished());
        // ...and silence closes it.
        match relaying.await {
            Ok(ended) => assert_eq!(ended, Ended::Idle),
            Err(e) => panic!("relay task: {e}"),
        }
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest).await;
        assert!(rest.is_empty());
    }
}
