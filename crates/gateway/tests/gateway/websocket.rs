//! WebSocket through a real gateway: a real client and a real instance
//! (tungstenite on both ends), the handshake under the route's policies,
//! messages both ways, the close handshake, and what is refused: a switch
//! nobody asked for, upgrades to anything but WebSocket, and bytes after an
//! upgrade request that the instance declined.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flotilla_gateway::{Endpoint, Gateway, RateLimit};
use futures_util::{SinkExt as _, StreamExt as _};
use http::StatusCode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{WebSocketStream, client_async};

use crate::support::*;

const T: Duration = Duration::from_secs(10);

/// A WebSocket instance: sends `welcome` as soon as the connection has
/// switched, then echoes text as `echo: …` and binary as it came. Picks the
/// `chat` subprotocol when offered; refuses `/ws/refused` with 403. Reports
/// each handshake request's headers.
pub(crate) struct WsInstance {
    addr: SocketAddr,
    heads: mpsc::UnboundedReceiver<http::HeaderMap>,
}

impl WsInstance {
    pub(crate) async fn start() -> WsInstance {
        WsInstance::serving(None).await
    }

    /// Serving mutual TLS only, with `tls`; plaintext with `None`.
    async fn serving(tls: Option<tokio_rustls::TlsAcceptor>) -> WsInstance {
        let listener = ok(TcpListener::bind("127.0.0.1:0").await, "bind instance");
        let addr = ok(listener.local_addr(), "instance addr");
        let (tx, heads) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve_ws(stream, tx).await,
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                serve_ws(stream, tx).await;
                            }
                        }
                    }
                });
            }
        });
        WsInstance { addr, heads }
    }

    /// The headers of the next handshake the instance saw.
    async fn next_head(&mut self) -> http::HeaderMap {
        ok(
            tokio::time::timeout(T, self.heads.recv())
                .await
                .map_err(|_| "timeout"),
            "instance head",
        )
        .unwrap_or_else(|| panic!("the instance saw no handshake"))
    }

    pub(crate) fn endpoint(&self, name: &str) -> Endpoint {
        Endpoint {
            instance: name.to_string(),
            addr: self.addr,
            load: Arc::default(),
        }
    }
}

/// One connection of a [`WsInstance`].
async fn serve_ws<S>(stream: S, tx: mpsc::UnboundedSender<http::HeaderMap>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    #[expect(
        clippy::result_large_err,
        reason = "the signature is tungstenite's handshake callback"
    )]
    let callback = |req: &Request, mut res: Response| {
        let _ = tx.send(req.headers().clone());
        if req.uri().path() == "/ws/refused" {
            let mut no = ErrorResponse::new(Some("not you".into()));
            *no.status_mut() = StatusCode::FORBIDDEN;
            return Err(no);
        }
        let offered = req
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if offered.split(',').any(|p| p.trim() == "chat") {
            res.headers_mut().insert(
                "sec-websocket-protocol",
                http::HeaderValue::from_static("chat"),
            );
        }
        Ok(res)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    if ws.send(Message::text("welcome")).await.is_err() {
        return;
    }
    while let Some(Ok(msg)) = ws.next().await {
        let answer = match msg {
            Message::Text(t) => Message::text(format!("echo: {}", t.as_str())),
            Message::Binary(b) => Message::Binary(b),
            // Pings are answered and closes completed by
            // tungstenite itself.
            _ => continue,
        };
        if ws.send(answer).await.is_err() {
            return;
        }
    }
}

/// A gateway configured by `cfg` in front of a plaintext [`WsInstance`],
/// the one instance of service `chat`.
async fn ws_gateway(cfg: flotilla_gateway::Config) -> (WsInstance, Gateway) {
    before(WsInstance::start().await, cfg).await
}

/// A gateway configured by `cfg` in front of `instance`, the one instance
/// of service `chat`.
async fn before(instance: WsInstance, cfg: flotilla_gateway::Config) -> (WsInstance, Gateway) {
    let registry = Registry::new();
    registry.set("chat", vec![instance.endpoint("chat-0")]);
    let gateway = start(cfg, &registry).await;
    (instance, gateway)
}

/// The `/ws/**` route of service `chat`, for `GET`.
fn chat_route() -> flotilla_gateway::RouteConfig {
    route("chat", "/ws/**", &["GET"], T)
}

/// The answer the gateway refused a handshake to `path` with (with more
/// header `fields`); panics if the handshake went through.
async fn refused(
    gateway: &Gateway,
    path: &str,
    fields: &[(&'static str, &str)],
) -> http::Response<Option<Vec<u8>>> {
    match connect_with(gateway, path, fields).await {
        Err(tungstenite::Error::Http(res)) => *res,
        Err(e) => panic!("the handshake to {path} failed without an answer: {e}"),
        Ok((_, res)) => panic!("the handshake to {path} went through: {res:?}"),
    }
}

/// Sends a binary message of `len` bytes, larger than any one buffer on
/// the way, and checks the echo is the same.
async fn echoes_binary(ws: &mut WebSocketStream<TcpStream>, len: u32) {
    let big: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    ok(ws.send(Message::binary(big.clone())).await, "send binary");
    match next(ws).await {
        Message::Binary(b) => assert!(b[..] == big[..], "the binary message changed on its way"),
        other => panic!("expected binary, got {other:?}"),
    }
}

/// Opens a WebSocket to `path` through the gateway, offering `chat`.
async fn connect(
    gateway: &Gateway,
    path: &str,
) -> Result<
    (
        WebSocketStream<TcpStream>,
        tungstenite::handshake::client::Response,
    ),
    tungstenite::Error,
> {
    connect_with(gateway, path, &[]).await
}

/// [`connect`] with more handshake header fields.
async fn connect_with(
    gateway: &Gateway,
    path: &str,
    fields: &[(&'static str, &str)],
) -> Result<
    (
        WebSocketStream<TcpStream>,
        tungstenite::handshake::client::Response,
    ),
    tungstenite::Error,
> {
    let stream = ok(TcpStream::connect(gateway.local_addr()).await, "connect");
    let mut req = ok(
        tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{}{path}",
            gateway.local_addr()
        )),
        "request",
    );
    req.headers_mut().insert(
        "sec-websocket-protocol",
        http::HeaderValue::from_static("chat, superchat"),
    );
    for &(name, value) in fields {
        let value = ok(http::HeaderValue::from_str(value), "field value");
        req.headers_mut().insert(name, value);
    }
    tokio::time::timeout(T, client_async(req, stream))
        .await
        .unwrap_or_else(|_| panic!("the handshake to {path} took over {T:?}"))
}

/// The next data message, within the test deadline.
async fn next(ws: &mut WebSocketStream<TcpStream>) -> Message {
    loop {
        match tokio::time::timeout(T, ws.next()).await {
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(Some(Ok(msg))) => return msg,
            Ok(other) => panic!("no message: {other:?}"),
            Err(_) => panic!("no message within {T:?}"),
        }
    }
}

#[tokio::test]
async fn messages_pass_both_ways_and_a_close_ends_the_tunnel() {
    // A service and route of its own (not `chat` on `/ws/**`, as the other
    // tests' tunnels are), so the metrics below count this tunnel alone.
    let mut instance = WsInstance::start().await;
    let registry = Registry::new();
    registry.set("chat-one", vec![instance.endpoint("chat-one-0")]);
    let gateway = start(
        config(vec![route("chat-one", "/ws-one/**", &["GET"], T)]),
        &registry,
    )
    .await;
    // Labelled by route template and service, never the path.
    const CLOSED: &[&str] = &[
        "flotilla_gateway_websockets_closed_total",
        "route=\"/ws-one/**\"",
        "service=\"chat-one\"",
    ];
    const UPSTREAM_BYTES: &[&str] = &[
        "flotilla_gateway_websocket_bytes_total",
        "route=\"/ws-one/**\"",
        "service=\"chat-one\"",
        "direction=\"upstream\"",
    ];
    let closed_before = metric_sum(CLOSED);
    let cleanly_before = metric_sum(&[CLOSED, &["reason=\"closed\""]].concat());
    let bytes_before = metric_sum(UPSTREAM_BYTES);

    let (mut ws, res) = ok(connect(&gateway, "/ws-one/room").await, "handshake");
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    // The instance's choices reach the client (tungstenite checked the
    // accept key against its own nonce), with the gateway's request id.
    assert_eq!(res.headers()["sec-websocket-protocol"], "chat");
    assert!(res.headers().contains_key("x-request-id"));
    // The handshake reached the instance as a WebSocket request, with what
    // the gateway says about the client.
    let head = instance.next_head().await;
    assert_eq!(head["upgrade"], "websocket");
    assert_eq!(head["x-forwarded-for"], "127.0.0.1");
    assert_eq!(head["sec-websocket-version"], "13");

    // Sent by the instance right after its 101 (often in the same packet).
    assert_eq!(next(&mut ws).await, Message::text("welcome"));
    ok(ws.send(Message::text("hello")).await, "send text");
    assert_eq!(next(&mut ws).await, Message::text("echo: hello"));
    echoes_binary(&mut ws, 200_000).await;

    // The close handshake passes through, and then the tunnel ends.
    ok(ws.close(None).await, "close");
    loop {
        match tokio::time::timeout(T, ws.next()).await {
            Ok(None) => break,
            Ok(Some(Ok(Message::Close(_)))) => {}
            Ok(Some(Ok(other))) => panic!("after close: {other:?}"),
            Ok(Some(Err(tungstenite::Error::ConnectionClosed))) => break,
            Ok(Some(Err(e))) => panic!("after close: {e}"),
            Err(_) => panic!("the tunnel did not end within {T:?}"),
        }
    }
    // The instance closed its connection; the client closes its own, as
    // clients do once the server has (RFC 6455 §7.1.1), and with both
    // directions ended the tunnel is done.
    drop(ws);
    wait_until("the tunnel is counted closed", || {
        metric_sum(CLOSED) > closed_before
    })
    .await;
    assert_eq!(metric_sum(CLOSED) - closed_before, 1, "one tunnel ended");
    assert_eq!(
        metric_sum(&[CLOSED, &["reason=\"closed\""]].concat()) - cleanly_before,
        1,
        "ended by its close handshake"
    );
    // The client's frames, masked: "hello" (2 + 4 + 5 bytes), the binary
    // message (2 + 8 + 4 + 200,000) and the empty close (2 + 4).
    assert_eq!(metric_sum(UPSTREAM_BYTES) - bytes_before, 11 + 200_014 + 6);
    gateway.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn the_handshake_is_a_request_like_any_other() {
    let mut limited = chat_route();
    limited.rate_limits = vec![ok(RateLimit::parse("1/m burst 1 per ip"), "rate limit")];
    let (_instance, gateway) = ws_gateway(config(vec![limited])).await;

    // A route the request does not match: 404, no tunnel.
    let res = refused(&gateway, "/elsewhere", &[]).await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    // The instance declines: its answer is relayed, no tunnel.
    let res = refused(&gateway, "/ws/refused", &[]).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    // The rate limit counted the handshake the instance declined: the next
    // is over it, and says when to come back.
    let res = refused(&gateway, "/ws/room", &[]).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(res.headers().contains_key("retry-after"));
    gateway.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn a_switch_carries_the_route_policy_headers() {
    let mut limited = chat_route();
    limited.rate_limits = vec![ok(RateLimit::parse("10/m burst 10 per ip"), "rate limit")];
    let (_instance, gateway) = ws_gateway(config(vec![limited])).await;
    let (mut ws, res) = ok(connect(&gateway, "/ws/room").await, "handshake");
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert!(res.headers().contains_key("ratelimit"), "{res:?}");
    assert_eq!(next(&mut ws).await, Message::text("welcome"));
    gateway.shutdown(Duration::ZERO).await;
}

/// Reads what the gateway sends until it closes the connection.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    match tokio::time::timeout(T, stream.read_to_end(&mut got)).await {
        Ok(_) => String::from_utf8_lossy(&got).into_owned(),
        Err(_) => panic!(
            "the gateway did not close within {T:?}: {:?}",
            String::from_utf8_lossy(&got)
        ),
    }
}

#[tokio::test]
async fn a_switch_nobody_asked_for_is_a_502_and_never_a_tunnel() {
    // An instance that answers every request with a switch to h2c, and then
    // sends bytes that would reach the client if the gateway tunnelled.
    let listener = ok(TcpListener::bind("127.0.0.1:0").await, "bind");
    let addr = ok(listener.local_addr(), "addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\nSMUGGLED")
                    .await;
                let _ = s.read(&mut buf).await;
            });
        }
    });
    let registry = Registry::new();
    registry.set(
        "rogue",
        vec![Endpoint {
            instance: "rogue-0".into(),
            addr,
            load: Arc::default(),
        }],
    );
    let mut cfg = config(vec![route("rogue", "/**", &[], T)]);
    cfg.limits.max_retries = 0;
    let gateway = start(cfg, &registry).await;
    for ask in [
        // A WebSocket handshake, answered with a switch to something else.
        "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nConnection: close\r\n\r\n",
        // A plain request, answered with a switch.
        "GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ] {
        let mut stream = ok(TcpStream::connect(gateway.local_addr()).await, "connect");
        ok(stream.write_all(ask.as_bytes()).await, "send");
        let got = read_to_close(&mut stream).await;
        assert!(got.starts_with("HTTP/1.1 502 "), "{got}");
        assert!(!got.contains("SMUGGLED"), "{got}");
    }
    gateway.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn other_upgrades_and_declined_ones_stay_http() {
    let registry = Registry::new();
    let up = Upstream::start("echo-0").await;
    registry.set("echo", vec![up.endpoint()]);
    let gateway = start(config(vec![route("echo", "/**", &[], T)]), &registry).await;

    // `Upgrade: h2c` is not relayed: the instance sees a plain GET.
    let mut stream = ok(TcpStream::connect(gateway.local_addr()).await, "connect");
    ok(
        stream
            .write_all(b"GET /h2c HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
            .await,
        "send",
    );
    let got = read_to_close(&mut stream).await;
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
    let lower = got.to_lowercase();
    assert!(!lower.contains("\"upgrade\""), "{got}");
    assert!(!lower.contains("http2-settings"), "{got}");

    // A WebSocket request the instance answers as plain HTTP (it knows no
    // WebSocket): the connection stays HTTP, and what the client sent next
    // is the next request, routed and answered as such.
    let mut stream = ok(TcpStream::connect(gateway.local_addr()).await, "connect");
    ok(
        stream
            .write_all(b"GET /first HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await,
        "send",
    );
    let got = read_to_close(&mut stream).await;
    assert_eq!(got.matches("HTTP/1.1 200 ").count(), 2, "{got}");
    assert!(got.contains("/first") && got.contains("/second"), "{got}");
    assert!(!got.contains("HTTP/1.1 101"), "{got}");
    gateway.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn a_stopping_gateway_closes_tunnels_at_its_drain_deadline() {
    // A route of this test's own, for a metric no other test touches.
    let (_instance, gateway) =
        ws_gateway(config(vec![route("chat", "/drain/**", &["GET"], T)])).await;
    const ABORTED: &[&str] = &[
        "flotilla_gateway_websockets_closed_total",
        "route=\"/drain/**\"",
        "reason=\"aborted\"",
    ];
    let aborted_before = metric_sum(ABORTED);
    let (mut ws, _) = ok(connect(&gateway, "/drain/room").await, "handshake");
    assert_eq!(next(&mut ws).await, Message::text("welcome"));
    let stopping = tokio::spawn(gateway.shutdown(Duration::from_millis(300)));
    // Still carried during the drain...
    ok(ws.send(Message::text("still there?")).await, "send");
    assert_eq!(next(&mut ws).await, Message::text("echo: still there?"));
    // ...and closed at its deadline, not left open for ever.
    loop {
        match tokio::time::timeout(T, ws.next()).await {
            Ok(None | Some(Err(_))) => break,
            Ok(Some(Ok(_))) => {}
            Err(_) => panic!("the tunnel outlived the drain deadline by {T:?}"),
        }
    }
    ok(
        tokio::time::timeout(T, stopping)
            .await
            .map_err(|_| "shutdown took too long"),
        "shutdown",
    )
    .unwrap_or_else(|e| panic!("shutdown task: {e}"));
    assert_eq!(metric_sum(ABORTED), aborted_before + 1);
}

#[tokio::test]
async fn a_reload_leaves_open_tunnels_alone() {
    let (_instance, gateway) = ws_gateway(config(vec![chat_route()])).await;
    let (mut ws, _) = ok(connect(&gateway, "/ws/room").await, "handshake");
    assert_eq!(next(&mut ws).await, Message::text("welcome"));
    // The route is gone from the new configuration...
    ok(
        gateway.reload(config(vec![route("chat", "/other/**", &["GET"], T)])),
        "reload",
    );
    let res = refused(&gateway, "/ws/room", &[]).await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    // ...and the tunnel opened under the old one still carries messages.
    ok(ws.send(Message::text("after reload")).await, "send");
    assert_eq!(next(&mut ws).await, Message::text("echo: after reload"));
    gateway.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn the_tunnel_runs_over_the_mutual_tls_hop() {
    use flotilla_mesh::{Ca, CaConfig, Identity, IdentityFiles};
    let dir = TestDir::new();
    let ca = ok(
        Ca::open(dir.path().join("ca"), CaConfig::new("wstest")),
        "CA",
    );
    for (service, sub) in [("gateway", "gateway"), ("chat", "chat")] {
        let leaf = ok(ca.issue_leaf(service, Duration::from_secs(3600)), "leaf");
        ok(
            leaf.write(&IdentityFiles::in_dir(&dir.path().join(sub))),
            "write leaf",
        );
    }
    let identity = ok(
        Identity::load(IdentityFiles::in_dir(&dir.path().join("chat"))),
        "instance identity",
    );
    let acceptor = tokio_rustls::TlsAcceptor::from(ok(
        flotilla_mesh::server_config(&identity),
        "server config",
    ));
    let mut cfg = config(vec![chat_route()]);
    cfg.upstream_tls = Some(flotilla_gateway::UpstreamTls::in_dir(
        &dir.path().join("gateway"),
    ));
    let (_instance, gateway) = before(WsInstance::serving(Some(acceptor)).await, cfg).await;

    let (mut ws, res) = ok(connect(&gateway, "/ws/room").await, "handshake");
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(next(&mut ws).await, Message::text("welcome"));
    echoes_binary(&mut ws, 100_000).await;
    ok(ws.send(Message::text("over tls")).await, "send text");
    assert_eq!(next(&mut ws).await, Message::text("echo: over tls"));
    gateway.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn under_a_cors_policy_only_allowed_origins_may_open_a_websocket() {
    let mut cfg = config(vec![chat_route()]);
    cfg.cors = Some(flotilla_gateway::CorsConfig {
        origins: vec!["https://shop.example".into()],
        credentials: true,
        ..Default::default()
    });
    let (_instance, gateway) = ws_gateway(cfg).await;

    // Another site's page, with the user's cookies: refused.
    let res = refused(&gateway, "/ws/room", &[("origin", "https://evil.example")]).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert!(!res.headers().contains_key("access-control-allow-origin"));
    // The shop's own page, and a client that is no browser: through.
    for fields in [&[("origin", "https://shop.example")][..], &[]] {
        let (mut ws, res) = ok(
            connect_with(&gateway, "/ws/room", fields).await,
            "handshake",
        );
        assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(next(&mut ws).await, Message::text("welcome"));
    }
    gateway.shutdown(Duration::ZERO).await;
}

/// A tunnel to `path`, opened once the gateway stops refusing it with
/// 503 (a closed tunnel's place given back), within `T`.
async fn once_a_place_is_free(gateway: &Gateway, path: &str) -> WebSocketStream<TcpStream> {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match connect(gateway, path).await {
            Ok((opened, _)) => return opened,
            Err(tungstenite::Error::Http(res))
                if res.status() == StatusCode::SERVICE_UNAVAILABLE
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("the place of a closed tunnel was not given back: {e}"),
        }
    }
}

#[tokio::test]
async fn past_max_tunnels_handshakes_get_503_until_one_closes() {
    let mut cfg = config(vec![chat_route()]);
    cfg.limits.max_tunnels = 1;
    let (_instance, gateway) = ws_gateway(cfg).await;

    let (mut first, _) = ok(connect(&gateway, "/ws/room").await, "first handshake");
    assert_eq!(next(&mut first).await, Message::text("welcome"));
    let res = refused(&gateway, "/ws/room", &[]).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().contains_key("retry-after"));
    let body = res.body().clone().unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&body).contains("too_many_websockets"),
        "{res:?}"
    );
    // Plain requests are not held back by the tunnels: this one reaches the
    // instance, which speaks only WebSocket and hangs up (502), rather than
    // being refused at the gateway (503).
    let plain = Client::new(&gateway).get("/ws/plain").await;
    assert_eq!(plain.status, StatusCode::BAD_GATEWAY, "{plain:?}");

    // The first tunnel ends; its place is given back.
    drop(first);
    let mut again = once_a_place_is_free(&gateway, "/ws/room").await;
    assert_eq!(next(&mut again).await, Message::text("welcome"));
    gateway.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn an_open_tunnel_holds_its_place_in_the_route_s_max_in_flight() {
    let mut capped = chat_route();
    capped.max_in_flight = Some(1);
    let (_instance, gateway) = ws_gateway(config(vec![capped])).await;

    let (mut first, _) = ok(connect(&gateway, "/ws/room").await, "first handshake");
    assert_eq!(next(&mut first).await, Message::text("welcome"));
    // The tunnel is the route's one request in flight while it is open.
    let res = refused(&gateway, "/ws/room", &[]).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = res.body().clone().unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&body).contains("route_overloaded"),
        "{res:?}"
    );
    echoes_binary(&mut first, 1000).await;

    // Closed, its place is given back.
    drop(first);
    let mut again = once_a_place_is_free(&gateway, "/ws/room").await;
    assert_eq!(next(&mut again).await, Message::text("welcome"));
    gateway.shutdown(Duration::ZERO).await;
}

/// A gateway whose `/ws/**` route needs a JWT, in front of a
/// [`WsInstance`], and a token for it (user `user-7`).
struct JwtChat {
    instance: WsInstance,
    gateway: Gateway,
    token: String,
    _keys: JwksServer,
}

impl JwtChat {
    async fn start() -> JwtChat {
        use crate::support::keys::{Signer, jwks, now};
        use flotilla_gateway::{JwksSource, JwtConfig, RouteAuth};

        let signer = Signer::ed25519("k1");
        let keys = JwksServer::start(jwks(&[&signer])).await;
        let mut guarded = chat_route();
        guarded.auth = RouteAuth::jwt();
        let mut cfg = config(vec![guarded]);
        let mut jwt = JwtConfig::new(
            "test-issuer",
            vec!["shop".into()],
            ok(JwksSource::parse(&keys.url), "jwks url"),
        );
        jwt.cookie = Some("at".into());
        cfg.jwt = vec![jwt];
        let (instance, gateway) = ws_gateway(cfg).await;
        let now = now();
        let token = signer.sign(&serde_json::json!({
            "sub": "user-7", "iss": "test-issuer", "aud": "shop",
            "exp": now + 900, "nbf": now - 10, "iat": now - 10,
        }));
        JwtChat {
            instance,
            gateway,
            token,
            _keys: keys,
        }
    }
}

#[tokio::test]
async fn a_browser_can_send_its_bearer_token_as_a_subprotocol() {
    let JwtChat {
        mut instance,
        gateway,
        token,
        _keys,
    } = JwtChat::start().await;

    // No token: 401, as for any request on the route.
    let res = refused(&gateway, "/ws/room", &[]).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    // A forged one in the subprotocol: 401 too. (The last character of a
    // 64-byte signature in base64url is never `x`: this changes it.)
    let forged = format!("chat, bearer.flotilla.{}x", &token[..token.len() - 1]);
    let res = refused(&gateway, "/ws/room", &[("sec-websocket-protocol", &forged)]).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    // The browser's way (`new WebSocket(url, ["chat", "bearer.flotilla." +
    // token])`): through, as user-7, and the instance picks `chat` from a
    // list without the token.
    let offered = format!("chat, bearer.flotilla.{token}");
    let (mut ws, res) = ok(
        connect_with(
            &gateway,
            "/ws/room",
            &[("sec-websocket-protocol", &offered)],
        )
        .await,
        "handshake",
    );
    assert_eq!(res.headers()["sec-websocket-protocol"], "chat");
    assert_eq!(next(&mut ws).await, Message::text("welcome"));
    // The refused handshakes never reached it: this is its first.
    let head = instance.next_head().await;
    assert_eq!(head["x-flotilla-user-id"], "user-7");
    assert_eq!(head["sec-websocket-protocol"], "chat");
    assert_eq!(head["authorization"], format!("Bearer {token}").as_str());
    gateway.shutdown(Duration::ZERO).await;
}

/// A token in a cookie opens a tunnel only from this site: the handshake
/// is a GET, but the tunnel then acts for the user, and a browser sends
/// the cookie with another site's page's handshake too (cross-site
/// WebSocket hijacking).
#[tokio::test]
async fn a_token_in_a_cookie_opens_a_tunnel_only_from_this_site() {
    let mut chat = JwtChat::start().await;
    let gateway = &chat.gateway;
    let cookie = format!("at={}", chat.token);
    let res = refused(
        gateway,
        "/ws/room",
        &[("cookie", &cookie), ("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let body = res.body().clone().unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&body).contains("cross_site_request"),
        "{res:?}"
    );
    let own = format!("http://{}", gateway.local_addr());
    let (mut ws, _) = ok(
        connect_with(
            gateway,
            "/ws/room",
            &[("cookie", &cookie), ("origin", &own)],
        )
        .await,
        "handshake",
    );
    assert_eq!(next(&mut ws).await, Message::text("welcome"));
    // The refused handshake never reached it: this is its first.
    let head = chat.instance.next_head().await;
    assert_eq!(head["x-flotilla-user-id"], "user-7");
    chat.gateway.shutdown(Duration::ZERO).await;
}

/// Serves a test page (`/`) to headless Chromium, and holds the page's
/// `load` event until the page says it is done: `--dump-dom` prints the
/// page once it has loaded, and WebSockets do not hold that back. So the
/// page ends with `<script src="/hold">`, answered only once the page has
/// fetched `/done` (or at the test deadline); the page's own scripts and
/// WebSocket events run meanwhile. Same origin throughout, so no CORS in
/// the way.
async fn page_server(html: String) -> SocketAddr {
    let listener = ok(TcpListener::bind("127.0.0.1:0").await, "bind page server");
    let addr = ok(listener.local_addr(), "page server addr");
    let html = Arc::new(html);
    let (done, released) = tokio::sync::watch::channel(false);
    let done = Arc::new(done);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + T;
        while let Ok(Ok((mut stream, _))) =
            tokio::time::timeout_at(deadline, listener.accept()).await
        {
            let (html, done, mut released) =
                (Arc::clone(&html), Arc::clone(&done), released.clone());
            // Each connection on its own: Chromium also opens connections
            // it sends nothing on (preconnects).
            tokio::spawn(async move {
                let Some(head) = read_head(&mut stream).await else {
                    return;
                };
                let body = if head.starts_with(b"GET /done") {
                    done.send_replace(true);
                    ""
                } else if head.starts_with(b"GET /hold") {
                    let _ = tokio::time::timeout_at(deadline, released.wait_for(|d| *d)).await;
                    ""
                } else {
                    html.as_str()
                };
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    if body.is_empty() {
                        "text/javascript"
                    } else {
                        "text/html"
                    },
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// What headless Chromium's page at `url` wrote into its `<pre id="out">`
/// once it wrote `all finished` there; `None` (after [`skip`]) when
/// Chromium is not installed.
async fn chromium_page(dir: &TestDir, url: &str) -> Option<String> {
    let installed = std::process::Command::new("chromium")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        skip("no chromium on this machine", "apt-get install -y chromium");
        return None;
    }
    let run = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--dump-dom",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.path().join("profile").display()
        ))
        .arg(url)
        .kill_on_drop(true)
        .output();
    let out = ok(
        ok(
            tokio::time::timeout(Duration::from_secs(60), run)
                .await
                .map_err(|_| "over 60 s"),
            "chromium",
        ),
        "chromium",
    );
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    let written = dom
        .split_once("<pre id=\"out\">")
        .and_then(|(_, rest)| rest.split_once("</pre>"))
        .map_or(dom.clone(), |(written, _)| written.to_string());
    assert!(
        written.contains("all finished"),
        "the page did not finish (profile kept in {}): {dom}",
        dir.path().display()
    );
    Some(written)
}

#[tokio::test]
async fn a_real_browser_opens_one_with_its_token_as_a_subprotocol() {
    let JwtChat {
        gateway,
        token,
        _keys,
        ..
    } = JwtChat::start().await;
    let url = format!("ws://{}/ws/room", gateway.local_addr());

    // Each attempt reports how it went; all run at once.
    let html = format!(
        r#"<html><body><pre id="out"></pre><script>
const out = document.getElementById("out");
function show(s) {{ out.textContent += s + "\n"; }}
function attempt(name, protocols) {{
  return new Promise((resolve) => {{
    const ws = new WebSocket("{url}", protocols);
    ws.onopen = () => {{ show(name + ": open " + ws.protocol); ws.send("hi"); }};
    ws.onmessage = (e) => {{ if (e.data !== "welcome") {{ show(name + ": got " + e.data); ws.close(); }} }};
    ws.onerror = () => show(name + ": error");
    ws.onclose = () => resolve();
  }});
}}
Promise.all([
  attempt("token", ["chat", "bearer.flotilla.{token}"]),
  attempt("none", ["chat"]),
  attempt("only-token", ["bearer.flotilla.{token}"]),
]).then(() => {{
  show("all " + "finished");
  fetch("/done").catch(() => {{}});
}});
</script><script src="/hold"></script></body></html>"#
    );
    let page = page_server(html).await;
    let dir = TestDir::new();
    let Some(dom) = chromium_page(&dir, &format!("http://{page}/")).await else {
        return;
    };
    // Through with the token, speaking `chat`, the message echoed.
    assert!(dom.contains("token: open chat"), "{dom}");
    assert!(dom.contains("token: got echo: hi"), "{dom}");
    // Without one: refused (401), which a page sees as an error.
    assert!(dom.contains("none: error"), "{dom}");
    assert!(!dom.contains("none: open"), "{dom}");
    // The token as the only subprotocol: let through by the gateway, but
    // the instance can choose none, and the browser refuses such an answer
    // (why manifest.md says to offer a real subprotocol beside it).
    assert!(dom.contains("only-token: error"), "{dom}");
    gateway.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn a_handshake_is_never_copied_to_a_mirror() {
    let _places = MIRROR_PLACES.read().await;
    let instance = WsInstance::start().await;
    let shadow = Upstream::start("ws-shadow-0").await;
    let registry = Registry::new();
    registry.set("chat", vec![instance.endpoint("chat-0")]);
    registry.set("ws-shadow", vec![shadow.endpoint()]);
    let mut mirrored = chat_route();
    mirrored.mirror = vec![("ws-shadow".to_string(), 100)];
    let gateway = start(config(vec![mirrored]), &registry).await;
    let client = Client::new(&gateway);
    let plain = async |host: &str| {
        let _ = client
            .try_request(
                http::Method::GET,
                "/ws/plain",
                &[("host", host)],
                bytes::Bytes::new(),
            )
            .await;
    };

    // The mirror is on: a plain request on the route is copied.
    plain("one.example").await;
    wait_until("the first copy", || shadow.hits() == 1).await;
    let (ws, res) = ok(connect(&gateway, "/ws/room").await, "handshake");
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    drop(ws);
    plain("two.example").await;
    wait_until("the second copy", || shadow.hits() >= 2).await;
    assert_eq!(
        shadow.hosts(),
        ["one.example-shadow", "two.example-shadow"],
        "the handshake was copied"
    );
    gateway.shutdown(Duration::ZERO).await;
}
