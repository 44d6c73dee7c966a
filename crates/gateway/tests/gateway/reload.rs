//! Hot reload: routes and policies swap atomically under a kept-alive
//! connection; invalid configs are refused and the old one stays; rate
//! counters of unchanged limits carry over.

use std::time::Duration;

use bytes::Bytes;
use flotilla_gateway::{ConfigError, IpRules, RateLimit, RouteAuth, parse_nets};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::support::*;

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_kept_alive_connection_survives_a_reload_and_sees_the_new_config() {
    let registry = Registry::new();
    let old = Upstream::start("rl-old-0").await;
    let new = Upstream::start("rl-new-0").await;
    registry.set("old", vec![old.endpoint()]);
    registry.set("new", vec![new.endpoint()]);
    let gateway = start(config(vec![route("old", "/**", &[], T)]), &registry).await;

    // One connection, driven by hand, so that "the same connection" is
    // certain: if it closed, `send_request` would fail.
    let stream = ok(
        tokio::net::TcpStream::connect(gateway.local_addr()).await,
        "connect",
    );
    let (mut conn, driver) = ok(
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await,
        "handshake",
    );
    let driver = tokio::spawn(driver);
    let mut send = async |path: &str| {
        let req = ok(
            Request::get(path)
                .header("host", "gw")
                .body(Empty::<Bytes>::new()),
            "request",
        );
        let res = ok(
            conn.send_request(req).await,
            "request on the kept-alive connection",
        );
        let status = res.status();
        let body = ok(res.into_body().collect().await, "body").to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        (status, json)
    };
    let (status, json) = send("/a").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["instance"], "rl-old-0");

    // New routes and a new policy: /private is closed to this client.
    let mut private = route("new", "/private/**", &[], T);
    private.ip = Some(IpRules {
        allow: ok(parse_nets(&["10.0.0.0/8"]), "nets"),
        deny: vec![],
    });
    ok(
        gateway.reload(config(vec![route("new", "/**", &[], T), private.clone()])),
        "reload",
    );
    let (status, json) = send("/a").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["instance"], "rl-new-0");
    let (status, json) = send("/private/x").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(json["error"]["code"], "ip_denied");

    // An invalid config is refused, and the one in force stays.
    let mut needs_jwt = route("new", "/jwt/**", &[], T);
    needs_jwt.auth = RouteAuth::jwt();
    match gateway.reload(config(vec![needs_jwt])) {
        Err(e @ ConfigError::JwtRequired { .. }) => {
            assert!(e.to_string().contains("/jwt/**"), "{e}");
        }
        other => panic!("expected JwtRequired, got {other:?}"),
    }
    let (status, json) = send("/a").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["instance"], "rl-new-0");
    assert!(!driver.is_finished(), "the connection was closed");
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn unchanged_rate_limits_keep_their_counters_across_a_reload() {
    let registry = Registry::new();
    let up = Upstream::start("rl-keep-0").await;
    registry.set("rl-keep", vec![up.endpoint()]);
    let limited = |limit: &str| {
        let mut r = route("rl-keep", "/**", &[], T);
        r.rate_limit = Some(ok(RateLimit::parse(limit), "limit"));
        r
    };
    let gateway = start(config(vec![limited("2/h per route")]), &registry).await;
    let client = Client::new(&gateway);
    assert_eq!(client.get("/x").await.status, StatusCode::OK);
    assert_eq!(client.get("/x").await.status, StatusCode::OK);
    // Same limit, one more route: the quota is still spent.
    ok(
        gateway.reload(config(vec![
            limited("2/h per route"),
            route("other", "/o/**", &[], T),
        ])),
        "reload",
    );
    assert_eq!(client.get("/x").await.status, StatusCode::TOO_MANY_REQUESTS);
    // A changed limit starts afresh.
    ok(
        gateway.reload(config(vec![limited("3/h per route")])),
        "reload",
    );
    let reply = client.get("/x").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("ratelimit-policy"), "\"default\";q=3;w=3600");
    gateway.shutdown(T).await;
}
