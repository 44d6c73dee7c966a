//! HTTPS at the gateway (`Config::tls`): real TLS handshakes from a rustls
//! client that trusts only the test's own certificate, HTTP/1.1 and HTTP/2
//! (by ALPN) and WebSocket behind it, the versions offered, plain HTTP sent
//! to the TLS port, a client that never finishes its handshake, a
//! certificate renewed on disk while the gateway runs, graceful shutdown;
//! and HTTP/2's idle timeout, over TLS and over h2c alike.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotilla_gateway::{Config, Gateway, Limits, TlsConfig};
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

use super::support::*;

/// A self-signed certificate for `localhost` and 127.0.0.1, and its key.
struct Pair {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

fn pair() -> Pair {
    let made = ok(
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]),
        "make a certificate",
    );
    Pair {
        cert_pem: made.cert.pem(),
        key_pem: made.signing_key.serialize_pem(),
        der: made.cert.der().clone(),
    }
}

/// Writes the pair where `TlsConfig` will look for it. By rename, as a
/// renewal would: the gateway must never read a half-written file.
fn write(dir: &TestDir, pair: &Pair) {
    for (name, text) in [("cert.pem", &pair.cert_pem), ("key.pem", &pair.key_pem)] {
        let tmp = dir.path().join(format!("{name}.tmp"));
        ok(std::fs::write(&tmp, text), "write pem");
        ok(std::fs::rename(&tmp, dir.path().join(name)), "rename pem");
    }
}

fn tls_config(dir: &TestDir) -> TlsConfig {
    TlsConfig {
        reload_every: Duration::from_millis(50),
        ..TlsConfig::new(dir.path().join("cert.pem"), dir.path().join("key.pem"))
    }
}

/// A gateway with TLS in front of one echoing upstream (`/api/**`).
async fn https_gateway(dir: &TestDir, adjust: impl FnOnce(&mut Config)) -> (Gateway, Upstream) {
    let upstream = Upstream::start("a").await;
    let registry = Registry::new();
    registry.set("svc", vec![upstream.endpoint()]);
    let mut cfg = config(vec![route(
        "svc",
        "/api/**",
        &["GET", "POST"],
        Duration::from_secs(5),
    )]);
    cfg.tls = Some(tls_config(dir));
    adjust(&mut cfg);
    (start(cfg, &registry).await, upstream)
}

fn client_config(
    trusted: &CertificateDer<'static>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    ok(roots.add(trusted.clone()), "trust the test certificate");
    let mut config = ok(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions),
        "client versions",
    )
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS handshake as `localhost` (also for `tls_client_cert`).
pub(super) async fn handshake(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ok(ServerName::try_from("localhost"), "server name");
    tokio::time::timeout(PATIENCE, TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))?
}

async fn connect(
    addr: SocketAddr,
    trusted: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> TlsStream<TcpStream> {
    let config = client_config(trusted, rustls::DEFAULT_VERSIONS, alpn);
    ok(handshake(addr, config).await, "TLS handshake")
}

/// Sends `raw` and reads until the whole answer (framed by its
/// content-length) is there; the connection stays open.
async fn exchange(stream: &mut TlsStream<TcpStream>, raw: &str) -> String {
    ok(stream.write_all(raw.as_bytes()).await, "write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = complete(&got) {
            return String::from_utf8_lossy(&got[..end]).into_owned();
        }
        let n = ok(
            ok(
                tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await,
                "read timed out",
            ),
            "read",
        );
        assert!(
            n > 0,
            "closed before a whole answer: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

/// Where the first response in `bytes` ends, if it is all there.
fn complete(bytes: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(bytes).ok()?;
    let head_end = text.find("\r\n\r\n")? + 4;
    let length = text[..head_end]
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    (bytes.len() >= head_end + length).then_some(head_end + length)
}

/// GETs `path` on `stream`, checks the answer is a 200, and returns it.
async fn get_200(stream: &mut TlsStream<TcpStream>, path: &str) -> String {
    let answer = exchange(
        stream,
        &format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer
}

/// Handshakes with `config` until it succeeds: the gateway takes a renewed
/// certificate within a few of its reload periods.
async fn served(addr: SocketAddr, config: &Arc<ClientConfig>, what: &str) -> TlsStream<TcpStream> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Ok(stream) = handshake(addr, Arc::clone(config)).await {
            return stream;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} was never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn body_json(answer: &str) -> serde_json::Value {
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    ok(serde_json::from_str(body), "JSON body")
}

#[tokio::test]
async fn https_with_http1_keeps_the_connection_and_tells_instances_the_scheme() {
    let dir = TestDir::new();
    let pair = pair();
    write(&dir, &pair);
    let (gw, upstream) = https_gateway(&dir, |_| {}).await;
    assert_eq!(gw.url(), format!("https://{}", gw.local_addr()));

    let mut tls = connect(gw.local_addr(), &pair.der, &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    for i in 0..3 {
        let answer = exchange(
            &mut tls,
            &format!(
                "GET /api/x{i} HTTP/1.1\r\nhost: localhost\r\nx-forwarded-proto: http\r\n\r\n"
            ),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let echo = body_json(&answer);
        assert_eq!(echo["path"], format!("/api/x{i}"));
        assert!(
            !answer
                .to_ascii_lowercase()
                .contains("strict-transport-security"),
            "no HSTS unless configured: {answer}"
        );
        // The gateway's own view of the scheme, not the client's claim.
        assert_eq!(echo["headers"]["x-forwarded-proto"], "https", "{echo}");
    }
    assert_eq!(upstream.hits(), 3, "three requests on one TLS connection");

    // A POST with a body, then a refusal the gateway makes itself.
    let answer = exchange(
        &mut tls,
        "POST /api/p HTTP/1.1\r\nhost: localhost\r\ncontent-length: 5\r\n\r\nhello",
    )
    .await;
    assert_eq!(body_json(&answer)["body_len"], 5, "{answer}");
    let answer = exchange(&mut tls, "GET /nowhere HTTP/1.1\r\nhost: localhost\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_proxy_protocol_header_comes_before_the_tls_handshake() {
    let dir = TestDir::new();
    let pair = pair();
    write(&dir, &pair);
    let (gw, upstream) = https_gateway(&dir, |cfg| {
        cfg.ip = Some(flotilla_gateway::IpConfig {
            trusted_proxies: ok(flotilla_gateway::parse_nets(&["127.0.0.1"]), "nets"),
            proxy_protocol: true,
            ..flotilla_gateway::IpConfig::default()
        });
        if let Some(tls) = cfg.tls.as_mut() {
            tls.http_redirect = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        }
    })
    .await;
    // A balancer passing TCP through: its header, then the client's bytes.
    let mut tcp = ok(TcpStream::connect(gw.local_addr()).await, "connect");
    ok(
        tcp.write_all(b"PROXY TCP4 203.0.113.9 127.0.0.1 55555 443\r\n")
            .await,
        "write the PROXY header",
    );
    let name = ok(ServerName::try_from("localhost"), "server name");
    let config = client_config(&pair.der, rustls::DEFAULT_VERSIONS, &[b"http/1.1"]);
    let mut tls = ok(
        ok(
            tokio::time::timeout(PATIENCE, TlsConnector::from(config).connect(name, tcp)).await,
            "handshake timed out",
        ),
        "TLS handshake after the PROXY header",
    );
    let answer = exchange(&mut tls, "GET /api/x HTTP/1.1\r\nhost: localhost\r\n\r\n").await;
    let echo = body_json(&answer);
    assert_eq!(echo["headers"]["x-forwarded-for"], "203.0.113.9", "{echo}");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https", "{echo}");
    assert_eq!(upstream.hits(), 1);

    // A client that reached the gateway around the balancer, handshake
    // first: closed.
    let config = client_config(&pair.der, rustls::DEFAULT_VERSIONS, &[b"http/1.1"]);
    assert!(handshake(gw.local_addr(), config).await.is_err());

    // The balancer's plain-HTTP port sends its header too: the redirect
    // listener takes it off, and refuses a connection without one.
    let redirect = gw
        .redirect_addr()
        .unwrap_or_else(|| panic!("no redirect listener"));
    let get = "GET /api/x HTTP/1.1\r\nhost: shop.example\r\nconnection: close\r\n\r\n";
    let answer = raw_request(
        redirect,
        &format!("PROXY TCP4 203.0.113.9 127.0.0.1 55555 80\r\n{get}"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 308"), "{answer}");
    // Closed unanswered: an end of stream, or a reset for the unread bytes.
    let mut bare = ok(TcpStream::connect(redirect).await, "connect");
    ok(bare.write_all(get.as_bytes()).await, "write");
    let mut got = Vec::new();
    let read = tokio::time::timeout(PATIENCE, bare.read_to_end(&mut got)).await;
    assert!(
        read.is_ok(),
        "the redirect listener held a headerless connection"
    );
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert_eq!(upstream.hits(), 1);
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn https_with_h2_by_alpn() {
    let dir = TestDir::new();
    let pair = pair();
    write(&dir, &pair);
    let (gw, upstream) = https_gateway(&dir, |_| {}).await;

    let tls = connect(gw.local_addr(), &pair.der, &[b"h2", b"http/1.1"]).await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "h2 is preferred"
    );
    let (mut sender, conn) = ok(
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await,
        "h2 handshake",
    );
    tokio::spawn(conn);
    for i in 0..3 {
        let req = ok(
            Request::builder()
                .uri(format!("https://localhost/api/h2/{i}"))
                .body(Empty::<Bytes>::new()),
            "request",
        );
        let res = ok(sender.send_request(req).await, "h2 request");
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.version(), Version::HTTP_2);
        let body = ok(res.into_body().collect().await, "body").to_bytes();
        let echo: serde_json::Value = ok(serde_json::from_slice(&body), "JSON");
        assert_eq!(echo["headers"]["x-forwarded-proto"], "https", "{echo}");
    }
    assert_eq!(upstream.hits(), 3);
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn tls_1_2_is_accepted_unless_the_config_asks_for_1_3() {
    let dir = TestDir::new();
    let pair = pair();
    write(&dir, &pair);
    let tls12 = client_config(&pair.der, &[&rustls::version::TLS12], &[]);

    // Only this test speaks TLS 1.2.
    let tls12_handshakes =
        || metric_sum(&["flotilla_gateway_tls_handshakes_total", "version=\"1.2\""]);
    let before = tls12_handshakes();
    let (gw, _upstream) = https_gateway(&dir, |_| {}).await;
    let mut stream = ok(
        handshake(gw.local_addr(), Arc::clone(&tls12)).await,
        "TLS 1.2 handshake",
    );
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    get_200(&mut stream, "/api/v").await;
    wait_until("the TLS 1.2 handshake counted", || {
        tls12_handshakes() > before
    })
    .await;
    // Every certificate of these tests expires far in the future.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // This test's certificate, by its file: other tests' certificates are
    // in the same registry.
    let cert = format!("cert=\"{}\"", dir.path().join("cert.pem").display());
    let expiry = metric_sum(&[
        "flotilla_gateway_tls_certificate_expiry_timestamp_seconds",
        &cert,
    ]);
    assert!(
        expiry > now,
        "the certificate's expiry is exported: {expiry}"
    );
    gw.shutdown(Duration::from_secs(1)).await;

    let (gw, _upstream) = https_gateway(&dir, |cfg| {
        if let Some(tls) = cfg.tls.as_mut() {
            tls.min_version = flotilla_manifest::TlsVersion::Tls13;
        }
    })
    .await;
    let refused = handshake(gw.local_addr(), tls12).await;
    assert!(
        refused.is_err(),
        "a TLS 1.2 client is refused by a 1.3-only gateway"
    );
    let mut stream = connect(gw.local_addr(), &pair.der, &[]).await;
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    get_200(&mut stream, "/api/v").await;
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn plain_http_to_the_tls_port_is_told_to_use_https() {
    let dir = TestDir::new();
    let pair = pair();
    write(&dir, &pair);
    let (gw, upstream) = https_gateway(&dir, |_| {}).await;
    let before = metric_sum(&[
        "flotilla_gateway_tls_handshake_failures_total",
        "reason=\"plaintext\"",
    ]);
    let answer = raw_request(
        gw.local_addr(),
        "GET /api/x HTTP/1.1\r\nhost: localhost\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"code\":\"https_required\""), "{answer}");
    assert!(answer.contains("https://"), "{answer}");
    assert_eq!(upstream.hits(), 0);
    wait_until("the plaintext refusal counted", || {
        metric_sum(&[
            "flotilla_gateway_tls_handshake_failures_total",
            "reason=\"plaintext\"",
        ]) > before
    })
    .await;
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_is_closed_at_the_head_timeout() {
    let dir = TestDir::new();
    let pair = pair();
    write(&dir, &pair);
    let (gw, _upstream) = https_gateway(&dir, |cfg| {
        cfg.limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
    })
    .await;
    // Only this test leaves handshakes unfinished.
    let timeouts = || {
        metric_sum(&[
            "flotilla_gateway_tls_handshake_failures_total",
            "reason=\"timeout\"",
        ])
    };
    let before = timeouts();
    // Silent, then a first byte of a handshake record and nothing more.
    for opening in [&b""[..], &[22u8, 3, 1][..]] {
        let mut stream = ok(TcpStream::connect(gw.local_addr()).await, "connect");
        ok(stream.write_all(opening).await, "write");
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await;
        // Closed (EOF, or a reset), well before the test's patience.
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the gateway should close a stalled handshake: {read:?}"
        );
    }
    wait_until("both stalled handshakes counted", || {
        timeouts() >= before + 2
    })
    .await;
    gw.shutdown(Duration::from_secs(1)).await;
}

/// After its handshake a connection has the head timeout for its first
/// request, as it has for each next one once it starts: not the idle
/// timeout of a kept-alive connection between requests.
#[tokio::test]
async fn a_client_silent_after_its_handshake_is_closed_at_the_head_timeout() {
    let dir = TestDir::new();
    let pair = pair();
    write(&dir, &pair);
    let (gw, _upstream) = https_gateway(&dir, |cfg| {
        cfg.limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            // Far beyond the test's patience: a close within it is the
            // head timeout's.
            idle_timeout: Duration::from_secs(600),
            ..Limits::default()
        };
    })
    .await;
    // Says nothing: closed without an answer.
    let mut stream = connect(gw.local_addr(), &pair.der, &[b"http/1.1"]).await;
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a silent connection should be closed at the head timeout: {read:?}"
    );
    // Starts a head and stalls: 408.
    let mut stream = connect(gw.local_addr(), &pair.der, &[b"http/1.1"]).await;
    ok(stream.write_all(b"GET /api/x HTTP/1.1\r\n").await, "write");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "no answer within the test's patience");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart_and_a_broken_one_is_not() {
    let dir = TestDir::new();
    let first = pair();
    write(&dir, &first);
    let (gw, _upstream) = https_gateway(&dir, |_| {}).await;
    let addr = gw.local_addr();
    // The connection made before the renewal keeps its certificate.
    let mut before = connect(addr, &first.der, &[]).await;

    let second = pair();
    write(&dir, &second);
    let trusts_second = client_config(&second.der, rustls::DEFAULT_VERSIONS, &[]);
    let mut renewed = served(addr, &trusts_second, "the renewed certificate").await;
    get_200(&mut renewed, "/api/r").await;
    get_200(&mut before, "/api/b").await;

    // A rotation caught half way: the third pair's certificate with the
    // second's key. The second pair stays in use.
    let third = pair();
    let broken = Pair {
        cert_pem: third.cert_pem.clone(),
        key_pem: second.key_pem.clone(),
        der: third.der.clone(),
    };
    let failed = || {
        metric_sum(&[
            "flotilla_gateway_tls_certificate_reloads_total",
            "result=\"error\"",
        ])
    };
    let failed_before = failed();
    write(&dir, &broken);
    wait_until("the broken pair refused", || failed() > failed_before).await;
    let mut still = ok(
        handshake(addr, Arc::clone(&trusts_second)).await,
        "the second certificate is still served",
    );
    get_200(&mut still, "/api/s").await;
    let trusts_third = client_config(&third.der, rustls::DEFAULT_VERSIONS, &[]);
    assert!(handshake(addr, Arc::clone(&trusts_third)).await.is_err());

    // Completed, it is taken.
    write(&dir, &third);
    served(addr, &trusts_third, "the completed rotation").await;
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_key_that_does_not_match_its_certificate_stops_the_start() {
    let dir = TestDir::new();
    let one = pair();
    let other = pair();
    write(
        &dir,
        &Pair {
            cert_pem: one.cert_pem.clone(),
            key_pem: other.key_pem.clone(),
            der: one.der.clone(),
        },
    );
    let mut cfg = config(Vec::new());
    cfg.tls = Some(tls_config(&dir));
    let text = start_error(cfg, "a key of another certificate").await;
    assert!(text.contains("[gateway.tls]"), "{text}");
    assert!(
        text.contains("key.pem") && text.contains("cert.pem"),
        "names both files: {text}"
    );

    ok(
        std::fs::write(dir.path().join("cert.pem"), "not a certificate"),
        "write",
    );
    let mut cfg = config(Vec::new());
    cfg.tls = Some(tls_config(&dir));
    let source = start_error(cfg, "no certificate").await;
    assert!(source.contains("no PEM certificate"), "{source}");
}

#[tokio::test]
async fn websocket_over_tls() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let dir = TestDir::new();
    let pair = pair();
    write(&dir, &pair);
    let instance = super::websocket::WsInstance::start().await;
    let registry = Registry::new();
    registry.set("chat", vec![instance.endpoint("chat-0")]);
    let mut cfg = config(vec![route("chat", "/ws/**", &["GET"], PATIENCE)]);
    cfg.tls = Some(tls_config(&dir));
    let gw = start(cfg, &registry).await;

    let tls = connect(gw.local_addr(), &pair.der, &[b"http/1.1"]).await;
    let (mut ws, res) = ok(
        tokio_tungstenite::client_async("wss://localhost/ws/echo", tls).await,
        "wss handshake",
    );
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    let welcome = match tokio::time::timeout(PATIENCE, ws.next()).await {
        Ok(Some(Ok(msg))) => msg,
        other => panic!("no welcome through the tunnel: {other:?}"),
    };
    assert_eq!(welcome, Message::text("welcome"));
    ok(ws.send(Message::text("over tls")).await, "send");
    let echoed = match tokio::time::timeout(PATIENCE, ws.next()).await {
        Ok(Some(Ok(msg))) => msg,
        other => panic!("no echo through the tunnel: {other:?}"),
    };
    assert_eq!(echoed, Message::text("echo: over tls"));
    ok(ws.close(None).await, "close");
    gw.shutdown(Duration::from_secs(1)).await;
}

/// Stopping the gateway: an h2 connection over TLS is told to go away and
/// finishes its stream, an HTTP/1.1 one its request, each over TLS to the
/// end.
#[tokio::test]
async fn graceful_shutdown_finishes_requests_in_flight_over_tls() {
    let dir = TestDir::new();
    let pair = pair();
    write(&dir, &pair);
    let (gw, upstream) = https_gateway(&dir, |_| {}).await;

    let tls = connect(gw.local_addr(), &pair.der, &[b"h2"]).await;
    let (mut sender, conn) = ok(
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await,
        "h2 handshake",
    );
    tokio::spawn(conn);
    let req = ok(
        Request::builder()
            .uri("https://localhost/api/hold/h2")
            .body(Empty::<Bytes>::new()),
        "request",
    );
    let h2 = tokio::spawn(async move {
        let res = ok(sender.send_request(req).await, "h2 request");
        let status = res.status();
        let body = ok(res.into_body().collect().await, "h2 body").to_bytes();
        (status, body)
    });
    let mut h1 = connect(gw.local_addr(), &pair.der, &[b"http/1.1"]).await;
    let h1 = tokio::spawn(async move { get_200(&mut h1, "/api/hold/h1").await });
    wait_until("both requests to reach the upstream", || {
        upstream.held() == 2
    })
    .await;

    let addr = gw.local_addr();
    let shutdown = tokio::spawn(gw.shutdown(PATIENCE));
    // Stopping has begun once no connection is accepted.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still accepting after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !shutdown.is_finished(),
        "shutdown waits for the requests in flight"
    );
    upstream.release();
    let (status, body) = ok(
        ok(tokio::time::timeout(PATIENCE, h2).await, "h2 timed out"),
        "h2 task",
    );
    assert_eq!(status, StatusCode::OK);
    let echo: serde_json::Value = ok(serde_json::from_slice(&body), "JSON");
    assert_eq!(echo["path"], "/api/hold/h2");
    let answer = ok(
        ok(tokio::time::timeout(PATIENCE, h1).await, "h1 timed out"),
        "h1 task",
    );
    assert_eq!(body_json(&answer)["path"], "/api/hold/h1");
    ok(
        tokio::time::timeout(PATIENCE, shutdown).await,
        "shutdown finished",
    )
    .unwrap_or(());
}

/// Over `io` (h2c, or h2 over TLS), to a gateway whose idle timeout is
/// `idle`: a request held for several idle timeouts is not cut, and once
/// it is done and `idle` passes with nothing in progress, the gateway goes
/// away and the client's connection ends.
async fn h2_goes_away_when_idle<I>(io: I, upstream: &Upstream, idle: Duration)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = ok(
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await,
        "h2 handshake",
    );
    let conn = tokio::spawn(conn);
    let req = ok(
        Request::builder()
            .uri("http://localhost/api/hold/idle")
            .body(Empty::<Bytes>::new()),
        "request",
    );
    let held = tokio::spawn(async move {
        let res = ok(sender.send_request(req).await, "h2 request");
        (res.status(), sender)
    });
    wait_until("the request to reach the upstream", || upstream.held() == 1).await;
    // Time passes with the request in progress: not idle.
    tokio::time::sleep(idle * 3).await;
    assert!(
        !conn.is_finished(),
        "a connection with a request in progress was closed"
    );
    upstream.release();
    let (status, _sender) = ok(
        ok(
            tokio::time::timeout(PATIENCE, held).await,
            "held request timed out",
        ),
        "held task",
    );
    assert_eq!(status, StatusCode::OK);
    // Idle now: the gateway sends GOAWAY and closes.
    let ended = tokio::time::timeout(PATIENCE, conn).await;
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "the idle HTTP/2 connection should have been closed by the gateway: {ended:?}"
    );
}

fn short_idle(cfg: &mut Config) {
    cfg.limits = Limits {
        idle_timeout: Duration::from_millis(200),
        ..Limits::default()
    };
}

#[tokio::test]
async fn an_idle_h2_connection_over_tls_is_told_to_go_away() {
    let dir = TestDir::new();
    let pair = pair();
    write(&dir, &pair);
    let (gw, upstream) = https_gateway(&dir, short_idle).await;
    let tls = connect(gw.local_addr(), &pair.der, &[b"h2"]).await;
    h2_goes_away_when_idle(tls, &upstream, Duration::from_millis(200)).await;
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn an_idle_h2c_connection_is_told_to_go_away() {
    let dir = TestDir::new();
    let pair = pair();
    write(&dir, &pair);
    let (gw, upstream) = https_gateway(&dir, |cfg| {
        short_idle(cfg);
        cfg.tls = None;
    })
    .await;
    let tcp = ok(TcpStream::connect(gw.local_addr()).await, "connect");
    h2_goes_away_when_idle(tcp, &upstream, Duration::from_millis(200)).await;
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn pings_alone_do_not_keep_an_h2c_connection() {
    let dir = TestDir::new();
    let pair = pair();
    write(&dir, &pair);
    let (gw, _upstream) = https_gateway(&dir, |cfg| {
        short_idle(cfg);
        cfg.tls = None;
    })
    .await;
    let tcp = ok(TcpStream::connect(gw.local_addr()).await, "connect");
    // A client that PINGs four times per idle timeout and asks nothing.
    let (_sender, conn) = ok(
        hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_millis(50))
            .keep_alive_while_idle(true)
            .handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
            .await,
        "h2 handshake",
    );
    let ended = tokio::time::timeout(PATIENCE, conn).await;
    assert!(
        matches!(ended, Ok(Ok(()))),
        "a connection of PINGs alone should have been told to go away: {ended:?}"
    );
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn the_plain_http_listener_redirects_to_https_which_sends_hsts() {
    let dir = TestDir::new();
    let pair = pair();
    write(&dir, &pair);
    let (gw, upstream) = https_gateway(&dir, |cfg| {
        if let Some(tls) = cfg.tls.as_mut() {
            tls.http_redirect = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
            tls.hsts = Some(Duration::from_secs(86_400));
        }
    })
    .await;
    let redirect = gw
        .redirect_addr()
        .unwrap_or_else(|| panic!("no redirect listener"));
    let port = gw.local_addr().port();

    let answer = raw_request(
        redirect,
        "POST /api/x?q=1&r=%20 HTTP/1.1\r\nhost: shop.example:8080\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 308"), "{answer}");
    assert!(
        !answer
            .to_ascii_lowercase()
            .contains("strict-transport-security"),
        "HSTS is never sent over plain HTTP: {answer}"
    );
    let location = format!("location: https://shop.example:{port}/api/x?q=1&r=%20\r\n");
    assert!(answer.to_ascii_lowercase().contains(&location), "{answer}");

    let answer = raw_request(redirect, "GET / HTTP/1.0\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.0 400"),
        "no Host, no redirect: {answer}"
    );
    assert_eq!(
        upstream.hits(),
        0,
        "nothing is proxied from the redirect listener"
    );

    // Where it points is served, with HSTS.
    let mut tls = connect(gw.local_addr(), &pair.der, &[]).await;
    let answer = get_200(&mut tls, "/api/x?q=1").await;
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nstrict-transport-security: max-age=86400\r\n"),
        "{answer}"
    );
    let answer = exchange(&mut tls, "GET /nowhere HTTP/1.1\r\nhost: localhost\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.1 404")
            && answer
                .to_ascii_lowercase()
                .contains("strict-transport-security"),
        "the gateway's own answers carry it too: {answer}"
    );
    gw.shutdown(Duration::from_secs(1)).await;
}

/// Sends a request on a plain connection to the redirect listener: its
/// status line, or `None` when the connection was closed unanswered.
async fn redirect_status(stream: &mut TcpStream) -> Option<String> {
    // The write may land before a close does; the read tells.
    let _ = stream
        .write_all(b"GET /x HTTP/1.1\r\nhost: shop.example\r\n\r\n")
        .await;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.windows(2).any(|w| w == b"\r\n") {
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no answer and no close within {PATIENCE:?}"),
        }
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    text.lines().next().map(str::to_string)
}

#[tokio::test]
async fn the_redirect_listener_shares_the_connection_limits() {
    let dir = TestDir::new();
    let pair = pair();
    write(&dir, &pair);
    let (gw, _upstream) = https_gateway(&dir, |cfg| {
        cfg.limits.max_connections_per_ip = 2;
        if let Some(tls) = cfg.tls.as_mut() {
            tls.http_redirect = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        }
    })
    .await;
    let redirect = gw
        .redirect_addr()
        .unwrap_or_else(|| panic!("no redirect listener"));

    // One HTTPS connection and one kept-alive redirect connection: the
    // address's two places.
    let mut https = connect(gw.local_addr(), &pair.der, &[]).await;
    get_200(&mut https, "/api/x").await;
    let mut plain = ok(TcpStream::connect(redirect).await, "connect");
    let status = redirect_status(&mut plain).await;
    assert_eq!(status.as_deref(), Some("HTTP/1.1 308 Permanent Redirect"));
    let mut third = ok(TcpStream::connect(redirect).await, "connect");
    assert_eq!(
        redirect_status(&mut third).await,
        None,
        "a third connection from the address was answered"
    );
    // The kept-alive one is still served.
    assert!(redirect_status(&mut plain).await.is_some());

    // Closing the HTTPS connection frees a place on the other port (once
    // the gateway has seen the close: poll).
    drop(https);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let mut next = ok(TcpStream::connect(redirect).await, "connect");
        if redirect_status(&mut next).await.is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the HTTPS connection's place was never freed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gw.shutdown(Duration::from_secs(1)).await;
}
