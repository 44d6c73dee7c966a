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
        r.rate_limits = vec![ok(RateLimit::parse(limit), "limit")];
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

#[tokio::test]
async fn a_route_s_requests_in_flight_count_on_across_a_reload() {
    let registry = Registry::new();
    let up = Upstream::start("cap-keep-0").await;
    registry.set("cap-keep", vec![up.endpoint()]);
    let capped = |cap: usize| {
        let mut r = route("cap-keep", "/**", &[], T);
        r.max_in_flight = Some(cap);
        r
    };
    let gateway = start(config(vec![capped(2)]), &registry).await;
    let client = Client::new(&gateway);
    let held = in_background(&client, "/hold", 2);
    wait_until("two requests in flight", || up.held() == 2).await;
    // The same route with a cap of 3: one more, not three.
    ok(gateway.reload(config(vec![capped(3)])), "reload");
    let third = in_background(&client, "/hold", 1);
    wait_until("a third request in flight", || up.held() == 3).await;
    let refused = client.get("/hold").await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.json()["error"]["code"], "route_overloaded");
    up.release();
    for h in held.into_iter().chain(third) {
        assert_eq!(ok(h.await, "held").status, StatusCode::OK);
    }
    gateway.shutdown(T).await;
}

/// How many of `n` requests to `path` each instance answered.
async fn shares(
    client: &Client,
    path: &str,
    n: usize,
) -> std::collections::BTreeMap<String, usize> {
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..n {
        let reply = client.get(path).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
        *seen.entry(reply.instance()).or_insert(0) += 1;
    }
    seen
}

#[tokio::test]
async fn a_canary_s_share_is_raised_by_a_reload_under_one_rate_limit() {
    let registry = Registry::new();
    let stable = Upstream::start("stable-0").await;
    let canary = Upstream::start("canary-0").await;
    registry.set("catalog", vec![stable.endpoint()]);
    registry.set("catalog-v2", vec![canary.endpoint()]);
    let with_share = |percent: u32| {
        let mut r = route("catalog", "/api/catalog/**", &[], T);
        r.split = vec![("catalog-v2".to_string(), percent)];
        r.rate_limits = vec![ok(RateLimit::parse("1000/h burst 1000 per route"), "limit")];
        config(vec![r])
    };
    let gateway = start(with_share(0), &registry).await;
    let client = Client::new(&gateway);

    // A dark launch: the canary is ready and gets nothing.
    let seen = shares(&client, "/api/catalog/1", 50).await;
    assert_eq!(seen.get("stable-0"), Some(&50), "{seen:?}");

    // 400 requests at 25 %: 100 expected, 8.7 the standard deviation.
    ok(gateway.reload(with_share(25)), "reload");
    let seen = shares(&client, "/api/catalog/1", 400).await;
    let to_canary = seen.get("canary-0").copied().unwrap_or(0);
    assert!((55..=145).contains(&to_canary), "{seen:?}");
    // Both services count against the route's one limit: the split is one
    // route to its clients, and the limiter survived the reloads (same
    // limit): 451 taken of 1000, and at most one refilled meanwhile.
    let reply = client.get("/api/catalog/1").await;
    let remaining = reply.header("ratelimit");
    assert!(
        remaining.contains("r=549;") || remaining.contains("r=550;"),
        "{remaining}"
    );

    ok(gateway.reload(with_share(100)), "reload");
    let seen = shares(&client, "/api/catalog/1", 50).await;
    assert_eq!(seen.get("canary-0"), Some(&50), "{seen:?}");

    // Too much given away is refused, and the last config stays.
    let mut bad = with_share(60);
    bad.routes[0].split.push(("other".to_string(), 50));
    assert!(matches!(
        gateway.reload(bad),
        Err(ConfigError::Split { .. })
    ));
    let seen = shares(&client, "/api/catalog/1", 10).await;
    assert_eq!(seen.get("canary-0"), Some(&10), "{seen:?}");
    // Metrics tell the services apart under the one route template.
    let canary_requests = metric_sum(&[
        "flotilla_gateway_requests_total",
        "route=\"/api/catalog/**\"",
        "service=\"catalog-v2\"",
    ]);
    assert!(canary_requests >= 60 + 55, "{canary_requests}");
    gateway.shutdown(T).await;
}
