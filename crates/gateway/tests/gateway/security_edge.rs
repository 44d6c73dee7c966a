//! IP lists, forwarded-for handling and CORS, through a real gateway.

use std::time::Duration;

use bytes::Bytes;
use flotilla_gateway::{
    ConfigError, CorsConfig, Error, ForwardedHeader, Gateway, IpConfig, IpRules, Upstreams,
    parse_nets,
};
use http::{Method, StatusCode};

use crate::support::*;

const T: Duration = Duration::from_secs(5);

fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
    ok(parse_nets(list), "networks")
}

async fn ip_gateway(
    service: &str,
    ip: IpConfig,
    routes: Vec<flotilla_gateway::RouteConfig>,
) -> (Upstream, Gateway, Client) {
    let registry = Registry::new();
    let up = Upstream::start(&format!("{service}-0")).await;
    registry.set(service, vec![up.endpoint()]);
    let mut cfg = config(routes);
    cfg.ip = Some(ip);
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);
    (up, gateway, client)
}

async fn get(client: &Client, path: &str, headers: &[(&str, &str)]) -> Reply {
    client
        .request(Method::GET, path, headers, Bytes::new())
        .await
}

fn assert_ip_denied(reply: &Reply) {
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{reply:?}");
    assert_eq!(reply.json()["error"]["code"], "ip_denied");
    assert_eq!(reply.header("content-type"), "application/json");
}

#[tokio::test]
async fn a_forged_x_forwarded_for_from_an_untrusted_peer_is_ignored() {
    // The test client (127.0.0.1) is no proxy; 198.51.100.0/24 is denied.
    let ip = IpConfig {
        deny: nets(&["198.51.100.0/24"]),
        ..IpConfig::default()
    };
    let (up, gateway, client) =
        ip_gateway("ip-forged", ip, vec![route("ip-forged", "/**", &[], T)]).await;
    // Claiming to be someone else does not get a denied client in...
    let reply = get(
        &client,
        "/x",
        &[
            ("x-forwarded-for", "203.0.113.1"),
            ("forwarded", "for=203.0.113.1"),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    // ...nor a good one out, and the service never sees the forged hop.
    let reply = get(&client, "/x", &[("x-forwarded-for", "198.51.100.7")]).await;
    assert_eq!(reply.status, StatusCode::OK);
    let h = &reply.json()["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert!(h.get("forwarded").is_none());
    assert_eq!(up.hits(), 2);
    gateway.shutdown(T).await;

    // An allow list the peer is not on refuses it, whatever it claims.
    let ip = IpConfig {
        allow: nets(&["10.0.0.0/8"]),
        ..IpConfig::default()
    };
    let (up, gateway, client) =
        ip_gateway("ip-allow", ip, vec![route("ip-allow", "/**", &[], T)]).await;
    assert_ip_denied(&get(&client, "/x", &[("x-forwarded-for", "10.1.1.1")]).await);
    assert_eq!(up.hits(), 0);
    // Health checks are not subject to the lists.
    assert_eq!(get(&client, "/healthz", &[]).await.status, StatusCode::OK);
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn a_trusted_proxy_chain_is_honoured_up_to_the_first_untrusted_hop() {
    // The test client plays a trusted proxy at 127.0.0.1.
    let ip = IpConfig {
        deny: nets(&["198.51.100.0/24"]),
        trusted_proxies: nets(&["127.0.0.0/8", "10.0.0.0/8"]),
        ..IpConfig::default()
    };
    let (up, gateway, client) =
        ip_gateway("ip-trusted", ip, vec![route("ip-trusted", "/**", &[], T)]).await;
    // The client behind the proxies is denied.
    assert_ip_denied(
        &get(
            &client,
            "/x",
            &[("x-forwarded-for", "198.51.100.7, 10.0.0.5")],
        )
        .await,
    );
    // A client's own `Forwarded`, which a balancer that appends to
    // `X-Forwarded-For` passes on untouched, is neither believed nor
    // passed on: a denied client does not get in by naming another address.
    let reply = get(
        &client,
        "/x",
        &[
            ("forwarded", "for=203.0.113.9;proto=https"),
            ("x-forwarded-for", "198.51.100.7"),
        ],
    )
    .await;
    assert_ip_denied(&reply);
    let reply = get(
        &client,
        "/x",
        &[
            ("forwarded", "for=\"198.51.100.9:4711\";proto=https"),
            ("x-forwarded-for", "203.0.113.9"),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.json()["headers"].get("forwarded").is_none());
    assert_eq!(reply.json()["headers"]["x-forwarded-proto"], "http");
    // A denied address written left of the real client is the client's own
    // claim: ignored.
    let reply = get(
        &client,
        "/x",
        &[("x-forwarded-for", "198.51.100.7, 203.0.113.5")],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    // The chain from a trusted proxy is passed on, with the proxy appended.
    assert_eq!(
        reply.json()["headers"]["x-forwarded-for"],
        "198.51.100.7, 203.0.113.5, 127.0.0.1"
    );
    assert_eq!(up.hits(), 2);
    gateway.shutdown(T).await;

    // Proxies that write `Forwarded` (`forwarded_header = "forwarded"`):
    // that one is read and passed on, and `X-Forwarded-For` is not read.
    let ip = IpConfig {
        deny: nets(&["198.51.100.0/24"]),
        trusted_proxies: nets(&["127.0.0.0/8", "10.0.0.0/8"]),
        forwarded_header: ForwardedHeader::Forwarded,
        ..IpConfig::default()
    };
    let (up, gateway, client) =
        ip_gateway("ip-rfc7239", ip, vec![route("ip-rfc7239", "/**", &[], T)]).await;
    assert_ip_denied(
        &get(
            &client,
            "/x",
            &[("forwarded", "for=\"198.51.100.9:4711\";proto=https")],
        )
        .await,
    );
    let reply = get(
        &client,
        "/x",
        &[
            ("forwarded", "for=203.0.113.9;proto=https;host=shop.example"),
            ("x-forwarded-for", "198.51.100.7"),
            ("x-forwarded-host", "evil.example"),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let h = &reply.json()["headers"];
    assert_eq!(
        h["forwarded"],
        "for=203.0.113.9;proto=https;host=shop.example"
    );
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-host"], "shop.example");
    assert_eq!(up.hits(), 1);
    gateway.shutdown(T).await;
}

/// A route whose instance is kept by a cookie the gateway makes up, which
/// says by `Secure` whether the gateway believes the client used HTTPS.
fn cookie_route(service: &str) -> flotilla_gateway::RouteConfig {
    let mut r = route(service, "/**", &[], T);
    r.affinity = Some(ok(
        flotilla_gateway::Affinity::parse("cookie:sticky"),
        "affinity",
    ));
    r
}

#[tokio::test]
async fn a_trusted_proxy_s_scheme_and_host_reach_the_service() {
    // The test client plays a load balancer that terminated TLS.
    let ip = IpConfig {
        trusted_proxies: nets(&["127.0.0.0/8"]),
        ..IpConfig::default()
    };
    let (up, gateway, client) = ip_gateway("fwd-proto", ip, vec![cookie_route("fwd-proto")]).await;
    let reply = get(
        &client,
        "/x",
        &[
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "shop.example"),
            ("x-forwarded-for", "203.0.113.5"),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let h = &reply.json()["headers"];
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-host"], "shop.example");
    assert_eq!(h["x-forwarded-for"], "203.0.113.5, 127.0.0.1");
    let set = reply.header("set-cookie");
    assert!(
        set.ends_with("; Path=/; HttpOnly; SameSite=Lax; Secure"),
        "{set}"
    );

    // `Forwarded` is not read from proxies that write `X-Forwarded-*` (the
    // default): a client's own passes through them untouched.
    let reply = get(
        &client,
        "/x",
        &[("forwarded", "for=203.0.113.5;proto=https")],
    )
    .await;
    assert_eq!(reply.json()["headers"]["x-forwarded-proto"], "http");
    assert!(!reply.header("set-cookie").contains("Secure"), "{reply:?}");

    // A proxy that says nothing, or something that is no scheme, leaves the
    // connection's own.
    for fields in [vec![], vec![("x-forwarded-proto", "gopher")]] {
        let reply = get(&client, "/x", &fields).await;
        let h = &reply.json()["headers"];
        assert_eq!(h["x-forwarded-proto"], "http", "{fields:?}");
        assert!(!reply.header("set-cookie").contains("Secure"), "{reply:?}");
    }
    assert_eq!(up.hits(), 4);
    gateway.shutdown(T).await;

    // From a peer that is no trusted proxy the same claims are the client's
    // own: the service is told the truth, and the cookie is not `Secure`
    // (which a browser on plain HTTP would refuse to keep).
    let (up, gateway, client) = ip_gateway(
        "fwd-forged",
        IpConfig::default(),
        vec![cookie_route("fwd-forged")],
    )
    .await;
    let reply = get(
        &client,
        "/x",
        &[
            ("host", "shop.example"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=203.0.113.5;proto=https"),
        ],
    )
    .await;
    let h = &reply.json()["headers"];
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "shop.example");
    assert!(!reply.header("set-cookie").contains("Secure"), "{reply:?}");
    assert_eq!(up.hits(), 1);
    gateway.shutdown(T).await;
}

/// Sends `head` then `request` on one fresh connection and returns the
/// whole answer ("" when the gateway closed it unanswered).
async fn proxied(gateway: &Gateway, head: &[u8], request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = ok(
        tokio::net::TcpStream::connect(gateway.local_addr()).await,
        "connect",
    );
    let mut sent = head.to_vec();
    sent.extend_from_slice(request.as_bytes());
    ok(stream.write_all(&sent).await, "write");
    let mut out = Vec::new();
    // A reset after the gateway closed on unread bytes is an answer too.
    let _ = ok(
        tokio::time::timeout(PATIENCE, stream.read_to_end(&mut out)).await,
        "read timed out",
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// The JSON body of a whole HTTP/1.1 answer.
fn answer_json(answer: &str) -> serde_json::Value {
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

const GET: &str = "GET /x HTTP/1.1\r\nhost: shop.example\r\nconnection: close\r\n\r\n";

#[tokio::test]
async fn a_trusted_balancer_s_proxy_protocol_header_names_the_client() {
    let ip = IpConfig {
        deny: nets(&["198.51.100.0/24"]),
        trusted_proxies: nets(&["127.0.0.0/8"]),
        proxy_protocol: true,
        ..IpConfig::default()
    };
    let (up, gateway, _) =
        ip_gateway("pp-trusted", ip, vec![route("pp-trusted", "/**", &[], T)]).await;

    // v1: the client it names is the one the service is told of, and the
    // one a client's own `X-Forwarded-For` cannot replace.
    let answer = proxied(
        &gateway,
        b"PROXY TCP4 203.0.113.9 127.0.0.1 55555 8080\r\n",
        "GET /x HTTP/1.1\r\nhost: shop.example\r\nx-forwarded-for: 10.9.9.9\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        answer_json(&answer)["headers"]["x-forwarded-for"],
        "203.0.113.9"
    );

    // v2, IPv6, and the IP lists judge the named client.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x24".to_vec();
    v2.extend_from_slice(
        &"2001:db8::5"
            .parse::<std::net::Ipv6Addr>()
            .map(|a| a.octets())
            .unwrap_or_default(),
    );
    v2.extend_from_slice(&[0; 15]);
    v2.push(1);
    v2.extend_from_slice(&[0x12, 0x67, 0x1f, 0x90]);
    let answer = proxied(&gateway, &v2, GET).await;
    assert_eq!(
        answer_json(&answer)["headers"]["x-forwarded-for"],
        "2001:db8::5",
        "{answer}"
    );
    let answer = proxied(&gateway, b"PROXY TCP4 198.51.100.7 127.0.0.1 1 2\r\n", GET).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("ip_denied"), "{answer}");

    // The balancer's health check (`LOCAL`) is the balancer itself.
    let answer = proxied(&gateway, b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00", GET).await;
    assert_eq!(
        answer_json(&answer)["headers"]["x-forwarded-for"],
        "127.0.0.1",
        "{answer}"
    );

    // Without a header, or with a broken one, the connection is closed
    // unanswered and counted.
    let before = metric_sum(&[
        "flotilla_gateway_connections_refused_total",
        "reason=\"proxy_protocol\"",
    ]);
    assert_eq!(proxied(&gateway, b"", GET).await, "");
    assert_eq!(
        proxied(&gateway, b"PROXY TCP4 nowhere 127.0.0.1 1 2\r\n", GET).await,
        ""
    );
    let after = metric_sum(&[
        "flotilla_gateway_connections_refused_total",
        "reason=\"proxy_protocol\"",
    ]);
    assert!(after >= before + 2, "{before} -> {after}");
    assert_eq!(up.hits(), 3);
    gateway.shutdown(T).await;

    // From a peer that is no trusted proxy, the header is read and not
    // believed: the peer stays the client.
    let ip = IpConfig {
        trusted_proxies: nets(&["10.0.0.0/8"]),
        proxy_protocol: true,
        ..IpConfig::default()
    };
    let (_up, gateway, _) = ip_gateway(
        "pp-untrusted",
        ip,
        vec![route("pp-untrusted", "/**", &[], T)],
    )
    .await;
    let answer = proxied(
        &gateway,
        b"PROXY TCP4 203.0.113.9 127.0.0.1 55555 8080\r\n",
        GET,
    )
    .await;
    assert_eq!(
        answer_json(&answer)["headers"]["x-forwarded-for"],
        "127.0.0.1",
        "{answer}"
    );
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn the_proxy_protocol_needs_trusted_proxies() {
    let mut cfg = config(vec![route("pp-none", "/**", &[], T)]);
    cfg.ip = Some(IpConfig {
        proxy_protocol: true,
        ..IpConfig::default()
    });
    let e = cfg
        .validate()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("proxy_protocol needs trusted_proxies"), "{e}");
}

#[tokio::test]
async fn route_ip_lists_narrow_the_systems() {
    let mut internal = route("ip-route", "/internal/**", &[], T);
    internal.ip = Some(IpRules {
        allow: nets(&["10.0.0.0/8", "fd00::/8"]),
        deny: vec![],
    });
    let routes = vec![route("ip-route", "/api/**", &[], T), internal];
    let (up, gateway, client) = ip_gateway("ip-route", IpConfig::default(), routes).await;
    assert_eq!(get(&client, "/api/x", &[]).await.status, StatusCode::OK);
    assert_ip_denied(&get(&client, "/internal/x", &[]).await);
    assert_eq!(up.hits(), 1);
    assert!(metric_sum(&["flotilla_gateway_ip_denied_total", "route=\"/internal/**\""]) >= 1);
    gateway.shutdown(T).await;
}

/// Requests no route matched, and those the system's IP list refused
/// before any route was looked for, count under `route="unmatched"`, after
/// a reload as before it.
#[tokio::test]
async fn refusals_before_a_route_count_under_unmatched() {
    let unmatched_404 = || {
        metric_sum(&[
            "flotilla_gateway_requests_total",
            "route=\"unmatched\"",
            "status_class=\"4xx\"",
        ])
    };
    let denied = || metric_sum(&["flotilla_gateway_ip_denied_total", "route=\"unmatched\""]);
    let routes = || vec![route("ip-unmatched", "/api/**", &[], T)];
    let (up, gateway, client) = ip_gateway("ip-unmatched", IpConfig::default(), routes()).await;
    for round in ["before a reload", "after a reload"] {
        let (before_404, before_denied) = (unmatched_404(), denied());
        assert_eq!(
            get(&client, "/elsewhere", &[]).await.status,
            StatusCode::NOT_FOUND
        );
        // Counted as the answer's body ends, which may be after the client
        // has read it.
        wait_until(&format!("{round}: the 404 counted"), || {
            unmatched_404() > before_404
        })
        .await;
        // The gateway's other tests run beside this one and count under
        // `unmatched` too: counts only ever grow, so "more" is what says
        // this gateway counted.
        let mut cfg = config(routes());
        cfg.ip = Some(IpConfig {
            deny: nets(&["127.0.0.0/8", "::1/128"]),
            ..IpConfig::default()
        });
        ok(gateway.reload(cfg), "reload with a deny list");
        assert_ip_denied(&get(&client, "/api/x", &[]).await);
        wait_until(&format!("{round}: the denial counted"), || {
            denied() > before_denied
        })
        .await;
        let mut cfg = config(routes());
        cfg.ip = Some(IpConfig::default());
        ok(gateway.reload(cfg), "reload without it");
    }
    assert_eq!(up.hits(), 0);
    gateway.shutdown(T).await;
}

fn cors(origins: &[&str], credentials: bool) -> CorsConfig {
    CorsConfig {
        origins: origins.iter().map(|s| s.to_string()).collect(),
        credentials,
        ..CorsConfig::default()
    }
}

async fn cors_gateway(service: &str, system: CorsConfig) -> (Upstream, Gateway, Client) {
    let registry = Registry::new();
    let up = Upstream::start(&format!("{service}-0")).await;
    registry.set(service, vec![up.endpoint()]);
    let mut special = route(service, "/special/**", &[], T);
    special.cors = Some(cors(&["http://other.example"], false));
    let mut cfg = config(vec![
        route(service, "/api/**", &["GET", "POST"], T),
        special,
    ]);
    cfg.cors = Some(system);
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);
    (up, gateway, client)
}

async fn preflight(
    client: &Client,
    path: &str,
    origin: &str,
    method: &str,
    headers: Option<&str>,
) -> Reply {
    let mut h = vec![
        ("origin", origin),
        ("access-control-request-method", method),
    ];
    if let Some(v) = headers {
        h.push(("access-control-request-headers", v));
    }
    client
        .request(Method::OPTIONS, path, &h, Bytes::new())
        .await
}

/// A route's own policy answers CORS where the system has none: the
/// gateway reads a request's `Origin` only when some policy may answer it.
#[tokio::test]
async fn a_route_s_own_cors_policy_answers_without_a_system_one() {
    let registry = Registry::new();
    let up = Upstream::start("cors-own-0").await;
    registry.set("cors-own", vec![up.endpoint()]);
    let origin = "http://other.example";
    let mut special = route("cors-own", "/special/**", &[], T);
    special.cors = Some(cors(&[origin], false));
    let gateway = start(
        config(vec![route("cors-own", "/api/**", &["GET"], T), special]),
        &registry,
    )
    .await;
    let client = Client::new(&gateway);
    let reply = client
        .request(
            Method::GET,
            "/special/x",
            &[("origin", origin)],
            Bytes::new(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("access-control-allow-origin"), origin);
    let preflight = preflight(&client, "/special/x", origin, "GET", None).await;
    assert_eq!(preflight.status, StatusCode::NO_CONTENT);
    assert_eq!(preflight.header("access-control-allow-origin"), origin);
    // The other route has no policy: no CORS fields.
    let plain = client
        .request(Method::GET, "/api/x", &[("origin", origin)], Bytes::new())
        .await;
    assert_eq!(plain.header("access-control-allow-origin"), "");
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn cors_preflights_are_answered_at_the_gateway() {
    let origin = "http://localhost:8080";
    let (up, gateway, client) = cors_gateway("cors-pre", cors(&[origin], true)).await;

    let reply = preflight(
        &client,
        "/api/orders",
        origin,
        "POST",
        Some("authorization, content-type"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(reply.header("access-control-allow-origin"), origin);
    assert_eq!(reply.header("access-control-allow-credentials"), "true");
    assert!(
        reply
            .header("access-control-allow-methods")
            .contains("POST")
    );
    assert!(
        reply
            .header("access-control-allow-headers")
            .contains("authorization")
    );
    assert_eq!(reply.header("access-control-max-age"), "600");
    assert!(reply.header("vary").contains("Origin"));

    for (what, reply) in [
        (
            "foreign origin",
            preflight(&client, "/api/orders", "http://evil.example", "GET", None).await,
        ),
        (
            "origin with another port",
            preflight(&client, "/api/orders", "http://localhost:8081", "GET", None).await,
        ),
        (
            "disallowed method",
            preflight(&client, "/api/orders", origin, "TRACE", None).await,
        ),
        (
            "disallowed header",
            preflight(&client, "/api/orders", origin, "GET", Some("x-secret")).await,
        ),
    ] {
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{what}");
        assert_eq!(reply.json()["error"]["code"], "cors_denied", "{what}");
        assert!(
            reply.headers.get("access-control-allow-origin").is_none(),
            "{what}"
        );
        assert!(
            reply
                .headers
                .get("access-control-allow-credentials")
                .is_none(),
            "{what}"
        );
    }
    // A route's own policy replaces the system's.
    let reply = preflight(&client, "/special/x", origin, "GET", None).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let reply = preflight(&client, "/special/x", "http://other.example", "GET", None).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(
        reply.header("access-control-allow-origin"),
        "http://other.example"
    );
    assert!(
        reply
            .headers
            .get("access-control-allow-credentials")
            .is_none()
    );

    assert_eq!(up.hits(), 0, "a preflight reached the service");
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn cors_headers_on_actual_requests_only_for_allowed_origins() {
    let origin = "http://localhost:8080";
    let (_up, gateway, client) = cors_gateway("cors-actual", cors(&[origin], true)).await;
    let reply = get(&client, "/api/x", &[("origin", origin)]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("access-control-allow-origin"), origin);
    assert_eq!(reply.header("access-control-allow-credentials"), "true");
    assert!(
        reply
            .header("access-control-expose-headers")
            .contains("x-request-id")
    );
    assert!(reply.header("vary").contains("Origin"));

    let reply = get(&client, "/api/x", &[("origin", "http://evil.example")]).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "CORS is the browser's to enforce"
    );
    assert!(reply.headers.get("access-control-allow-origin").is_none());
    assert!(
        reply
            .headers
            .get("access-control-allow-credentials")
            .is_none()
    );
    assert!(reply.header("vary").contains("Origin"));

    // The gateway's own refusals carry CORS too, so a page can read them.
    let reply = get(&client, "/nope", &[("origin", origin)]).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.header("access-control-allow-origin"), origin);
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn a_wildcard_is_never_sent_with_credentials() {
    // Refused outright in config...
    let registry = Registry::new();
    let mut cfg = config(vec![route("cors-star", "/**", &[], T)]);
    cfg.cors = Some(cors(&["*"], true));
    let upstreams: std::sync::Arc<dyn Upstreams> = registry.clone();
    match Gateway::start(cfg, upstreams).await {
        Err(Error::Config(e @ ConfigError::Cors { .. })) => {
            assert!(e.to_string().contains("credentials"), "{e}");
        }
        Err(other) => panic!("expected a CORS config error, got {other}"),
        Ok(_) => panic!("`*` with credentials was accepted"),
    }
    // ...and without credentials `*` is answered as `*`, never echoed.
    let (_up, gateway, client) = cors_gateway("cors-star", cors(&["*"], false)).await;
    let reply = preflight(&client, "/api/x", "http://any.example", "GET", None).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(reply.header("access-control-allow-origin"), "*");
    assert!(
        reply
            .headers
            .get("access-control-allow-credentials")
            .is_none()
    );
    let reply = get(&client, "/api/x", &[("origin", "http://any.example")]).await;
    assert_eq!(reply.header("access-control-allow-origin"), "*");
    assert!(
        reply
            .headers
            .get("access-control-allow-credentials")
            .is_none()
    );
    gateway.shutdown(T).await;
}

/// An instance cannot speak for the gateway: the CORS, rate-limit, `server`
/// and request-id fields it sends are replaced by the gateway's own (or
/// removed, for an origin the policy does not allow), while its other
/// fields, repeated ones included, reach the client as it sent them. Over
/// HTTP/1.1, which relays the instance's head as bytes, and over h2c,
/// which rebuilds it.
#[tokio::test]
async fn an_instance_cannot_set_the_gateways_own_response_fields() {
    let origin = "http://localhost:8080";
    let registry = Registry::new();
    let up = Upstream::start("forger-0").await;
    registry.set("forger", vec![up.endpoint()]);
    let mut limited = route("forger", "/api/**", &[], T);
    limited.rate_limits = vec![ok(
        flotilla_gateway::RateLimit::parse("1000/s burst 1000"),
        "rate limit",
    )];
    let mut cfg = config(vec![limited]);
    cfg.cors = Some(cors(&[origin], false));
    let gateway = start(cfg, &registry).await;
    for (protocol, client) in [
        ("HTTP/1.1", Client::new(&gateway)),
        ("h2c", Client::h2c(&gateway)),
    ] {
        let reply = get(&client, "/api/forge", &[("origin", origin)]).await;
        assert_eq!(reply.status, StatusCode::OK, "{protocol}");
        let all = |name: &str| -> Vec<&str> {
            reply
                .headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap_or("?"))
                .collect()
        };
        assert_eq!(all("access-control-allow-origin"), [origin], "{protocol}");
        assert!(
            all("access-control-allow-credentials").is_empty(),
            "{protocol}"
        );
        assert!(all("access-control-max-age").is_empty(), "{protocol}");
        assert_eq!(all("server"), ["flotilla"], "{protocol}");
        let id = all("x-request-id");
        assert_eq!(id.len(), 1, "{protocol}");
        assert_ne!(id[0], "forged", "{protocol}");
        let ratelimit = all("ratelimit");
        assert_eq!(ratelimit.len(), 1, "{protocol}");
        assert!(ratelimit[0].contains("r=99"), "{protocol}: {ratelimit:?}");
        assert!(
            !ratelimit[0].contains("999999"),
            "{protocol}: {ratelimit:?}"
        );
        assert_eq!(
            all("ratelimit-policy"),
            ["\"default\";q=1000;w=1"],
            "{protocol}"
        );
        assert_eq!(all("vary"), ["Accept-Encoding", "Origin"], "{protocol}");
        assert_eq!(all("set-cookie"), ["a=1", "b=2"], "{protocol}");
        assert_eq!(
            reply.header("content-type"),
            "application/json",
            "{protocol}"
        );
        assert_eq!(reply.json()["path"], "/api/forge", "{protocol}");

        // A foreign origin gets no CORS fields at all, the instance's none.
        let reply = get(&client, "/api/forge", &[("origin", "http://evil.example")]).await;
        assert_eq!(reply.status, StatusCode::OK, "{protocol}");
        for name in [
            "access-control-allow-origin",
            "access-control-allow-credentials",
            "access-control-max-age",
        ] {
            assert!(reply.headers.get(name).is_none(), "{protocol}: {name}");
        }
    }
    gateway.shutdown(T).await;
}

/// A request sent frame by frame: its HPACK head, its body, and whether
/// the body waits until the instance has the head.
struct Attack {
    what: &'static str,
    head: Vec<u8>,
    body: Option<Vec<u8>>,
    late: bool,
}

/// HTTP/2 in front, HTTP/1.1 behind: a request whose HTTP/2 framing and
/// fields say different things (request smuggling by downgrade, as James
/// Kettle showed against several CDNs in 2021) must never become two
/// requests, or a request and the start of another, on the instance's
/// connection. Each is sent frame by frame (no client library sends them),
/// each is refused, the instance never sees the request hidden in it, and
/// the gateway's pooled connections to the instance stay in step.
#[tokio::test]
async fn an_http2_request_cannot_smuggle_another_past_the_gateway() {
    use h2_raw::{Outcome, field, frame, preface};
    const HIDDEN: &[u8] = b"GET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n";
    let registry = Registry::new();
    let up = Upstream::start("smuggle-0").await;
    registry.set("smuggle", vec![up.endpoint()]);
    let mut cfg = config(vec![route("smuggle", "/**", &[], T)]);
    // One worker, so one pool of connections to the instance: the requests
    // after each attack reuse the connection it was sent on, if kept.
    cfg.limits.workers = 1;
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);

    let head = |method: u8, path: &[u8], fields: &[Vec<u8>]| {
        // :method (static 2 GET, 3 POST), :scheme http, :path, :authority.
        let mut block = vec![method, 0x86, 0x04, path.len() as u8];
        block.extend_from_slice(path);
        block.extend_from_slice(&[0x01, 1, b'x']);
        for f in fields {
            block.extend_from_slice(f);
        }
        block
    };
    let with_body = |body: &[u8]| {
        let mut b = body.to_vec();
        b.extend_from_slice(HIDDEN);
        b
    };
    let (get, post) = (0x82, 0x83);
    // The body sent with the head, or (`late`) once the instance has the
    // head: the gateway has then begun the request on an instance
    // connection, and must not let that connection carry what follows.
    let mut attacks = Vec::new();
    for late in [false, true] {
        attacks.push(Attack {
            what: "a content-length shorter than the body",
            head: head(post, b"/cl", &[field(b"content-length", b"5")]),
            body: Some(with_body(b"hello")),
            late,
        });
        attacks.push(Attack {
            what: "a content-length longer than the body",
            head: head(post, b"/cl-long", &[field(b"content-length", b"100")]),
            body: Some(b"hello".to_vec()),
            late,
        });
    }
    let chunked = |name: &[u8]| Attack {
        what: "transfer-encoding: chunked",
        head: head(post, b"/te", &[field(name, b"chunked")]),
        body: Some(with_body(b"0\r\n\r\n")),
        late: false,
    };
    attacks.push(chunked(b"transfer-encoding"));
    attacks.push(Attack {
        what: "an upper-case Transfer-Encoding",
        ..chunked(b"Transfer-Encoding")
    });
    let bare = |what, head| Attack {
        what,
        head,
        body: None,
        late: false,
    };
    attacks.push(bare(
        "CRLF in a field's value",
        head(
            get,
            b"/crlf",
            &[field(
                b"x-note",
                b"a\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x",
            )],
        ),
    ));
    attacks.push(bare(
        "CRLF in the path",
        head(get, b"/p HTTP/1.1\r\nhost: x\r\n\r\nGET /smuggled", &[]),
    ));
    attacks.push(bare(
        "CRLF in a field's name",
        head(
            get,
            b"/crlf-name",
            &[field(b"x-a\r\ntransfer-encoding", b"chunked")],
        ),
    ));
    // No `:authority`, and two `Host` fields: routed by the first, the
    // instance (sent both) may read the last.
    let mut two_hosts = vec![get, 0x86, 0x04, 2, b'/', b'h'];
    two_hosts.extend(field(b"host", b"public.example"));
    two_hosts.extend(field(b"host", b"internal.example"));
    attacks.push(bare("two Host fields and no :authority", two_hosts));
    for Attack {
        what,
        head: block,
        body,
        late,
    } in attacks
    {
        let stream = ok(
            tokio::net::TcpStream::connect(gateway.local_addr()).await,
            "connect",
        );
        let (mut rx, mut tx) = stream.into_split();
        let mut out = preface();
        match &body {
            // HEADERS with END_HEADERS, then DATA with END_STREAM.
            Some(body) => {
                out.extend(frame(0x1, 0x4, 1, &block));
                if late {
                    ok(
                        tokio::io::AsyncWriteExt::write_all(&mut tx, &out).await,
                        "write",
                    );
                    out.clear();
                    let seen = up.hits() + 1;
                    wait_until("the instance has the head", || up.hits() >= seen).await;
                }
                out.extend(frame(0x0, 0x1, 1, body));
            }
            None => out.extend(frame(0x1, 0x5, 1, &block)),
        }
        ok(
            tokio::io::AsyncWriteExt::write_all(&mut tx, &out).await,
            "write",
        );
        let what = format!("{what}{}", if late { ", sent after the head" } else { "" });
        let outcome = within(&what, h2_raw::outcome(&mut rx, 1)).await;
        eprintln!("{what}: {outcome:?}");
        assert!(
            !matches!(outcome, Outcome::Answered(Some(200..=299))),
            "{what}: answered as a good request"
        );
        // The instance's connections stay in step: each request after it
        // gets its own answer, not one meant for a hidden request.
        for i in 0..3 {
            let path = format!("/after/{i}");
            let reply = client.get(&path).await;
            assert_eq!(reply.status, StatusCode::OK, "{what}: {reply:?}");
            assert_eq!(reply.json()["path"], path, "{what}: out of step");
        }
        let paths = up.paths();
        assert!(
            !paths.iter().any(|p| p.contains("smuggled")),
            "{what}: the instance saw {paths:?}"
        );
    }
    gateway.shutdown(T).await;
}

/// CONNECT asks for a tunnel to the host it names, which a reverse proxy
/// does not give: refused with 405 (as nginx does) over HTTP/1 and HTTP/2,
/// even on a route for every path and method, and never forwarded (an
/// instance answering it 2xx would have made its connection a tunnel).
#[tokio::test]
async fn connect_is_refused_over_either_protocol_and_never_forwarded() {
    let registry = Registry::new();
    let up = Upstream::start("connect-0").await;
    registry.set("connect", vec![up.endpoint()]);
    let gateway = start(config(vec![route("connect", "/**", &[], T)]), &registry).await;

    for raw in [
        "CONNECT shop.example:443 HTTP/1.1\r\nHost: shop.example:443\r\n\r\n",
        "CONNECT / HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let answer = raw_request(gateway.local_addr(), raw).await;
        assert!(answer.starts_with("HTTP/1.1 405 "), "{raw:?}: {answer}");
        assert!(
            answer.contains(r#""code":"method_not_allowed""#),
            "{answer}"
        );
        assert!(answer.contains("\r\nallow: \r\n"), "{answer}");
    }

    let tcp = ok(
        tokio::net::TcpStream::connect(gateway.local_addr()).await,
        "connect",
    );
    let (mut h2, conn) = ok(h2::client::handshake(tcp).await, "h2 handshake");
    tokio::spawn(conn);
    // No `:scheme` nor `:path`: an authority only, as RFC 9113 §8.5 has it.
    let req = ok(
        http::Request::builder()
            .method(Method::CONNECT)
            .uri("shop.example:443")
            .body(()),
        "request",
    );
    let (answer, _) = ok(h2.send_request(req, true), "send");
    let answer = ok(within("the CONNECT's answer", answer).await, "answer");
    assert_eq!(answer.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        answer.headers().get("allow").map(|v| v.as_bytes()),
        Some(&b""[..])
    );
    let mut body = answer.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        bytes.extend_from_slice(&ok(chunk, "body"));
    }
    let json: serde_json::Value = ok(serde_json::from_slice(&bytes), "json");
    assert_eq!(json["error"]["code"], "method_not_allowed");

    assert_eq!(up.hits(), 0, "a CONNECT reached the instance");
    gateway.shutdown(T).await;
}

/// A host that is no host (a path in it, a list, a space) is refused with
/// 400 `bad_host` and never reaches an instance (which would get it as
/// `Host` and `X-Forwarded-Host`, and might build links or cache keys from
/// it), over HTTP/1 and HTTP/2 alike; an HTTP/1.1 request without a `Host`
/// is refused (RFC 9112 §3.2), an HTTP/1.0 one is served, and an HTTP/2
/// request with neither `:authority` nor `Host` is refused (RFC 9113
/// §8.3.1), one with `Host` alone served.
#[tokio::test]
async fn a_host_that_is_no_host_or_none_is_refused() {
    use h2_raw::{Outcome, field, frame, preface};
    let registry = Registry::new();
    let up = Upstream::start("hosts-0").await;
    registry.set("hosts", vec![up.endpoint()]);
    let gateway = start(config(vec![route("hosts", "/**", &[], T)]), &registry).await;

    for raw in [
        "GET /x HTTP/1.1\r\nHost: a/b?c\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: good, evil\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: good,evil\r\n\r\n",
        "GET http://good,evil/x HTTP/1.1\r\nHost: good\r\n\r\n",
        "GET /x HTTP/1.1\r\n\r\n",
    ] {
        let answer = raw_request(gateway.local_addr(), raw).await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{raw:?}: {answer}");
        assert!(answer.contains(r#""code":"bad_host""#), "{raw:?}: {answer}");
    }
    let answer = raw_request(gateway.local_addr(), "GET /x HTTP/1.0\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.0 200 "), "{answer}");
    assert_eq!(up.hits(), 1);

    // HTTP/2: `:authority` (`,` is among the URI's characters hyper
    // checks it for), or a `Host` field.
    let head = |authority: &[u8], fields: &[Vec<u8>]| {
        // :method GET, :scheme http, :path /x, :authority.
        let mut block = vec![0x82, 0x86, 0x04, 2, b'/', b'x', 0x01, authority.len() as u8];
        block.extend_from_slice(authority);
        for f in fields {
            block.extend_from_slice(f);
        }
        block
    };
    for (what, block) in [
        ("a list as :authority", head(b"good,evil", &[])),
        (
            "a path in Host",
            head(b"good.example", &[field(b"host", b"a/b?c")]),
        ),
        // RFC 9113 §8.3.1: an `http` request must name its host.
        (
            "neither :authority nor Host",
            vec![0x82, 0x86, 0x04, 2, b'/', b'x'],
        ),
    ] {
        let stream = ok(
            tokio::net::TcpStream::connect(gateway.local_addr()).await,
            "connect",
        );
        let (mut rx, mut tx) = stream.into_split();
        let mut out = preface();
        out.extend(frame(0x1, 0x5, 1, &block));
        ok(
            tokio::io::AsyncWriteExt::write_all(&mut tx, &out).await,
            "write",
        );
        let outcome = within(what, h2_raw::outcome(&mut rx, 1)).await;
        assert_eq!(outcome, Outcome::Answered(Some(400)), "{what}");
        // Its body: the stream's DATA.
        let data = async {
            while let Some(f) = h2_raw::read_frame(&mut rx).await {
                if f.kind == 0x0 && f.stream == 1 {
                    return Some(String::from_utf8_lossy(&f.payload).into_owned());
                }
            }
            None
        };
        let body = within(what, data).await;
        assert!(
            body.as_deref()
                .is_some_and(|b| b.contains(r#""code":"bad_host""#)),
            "{what}: {body:?}"
        );
    }
    // With only `Host`, it names one.
    let stream = ok(
        tokio::net::TcpStream::connect(gateway.local_addr()).await,
        "connect",
    );
    let (mut rx, mut tx) = stream.into_split();
    let mut block = vec![0x82, 0x86, 0x04, 2, b'/', b'x'];
    block.extend(field(b"host", b"good.example"));
    let mut out = preface();
    out.extend(frame(0x1, 0x5, 1, &block));
    ok(
        tokio::io::AsyncWriteExt::write_all(&mut tx, &out).await,
        "write",
    );
    let outcome = within("Host alone", h2_raw::outcome(&mut rx, 1)).await;
    assert_eq!(outcome, Outcome::Answered(Some(200)), "Host alone");
    // Closed, or the gateway's stop would wait for its answer to a PING.
    drop((rx, tx));
    assert_eq!(up.hits(), 2, "a bad host reached the instance");
    gateway.shutdown(T).await;
}
