//! Rate limits through real gateways: exact under concurrency, the draft
//! `RateLimit` headers on every response, keys by header, and one limit
//! shared by two gateways through Redis.

use std::time::Duration;

use bytes::Bytes;
use flotilla_gateway::{Gateway, RateLimit, RateLimitBackend};
use http::{Method, StatusCode};

use crate::support::*;

const T: Duration = Duration::from_secs(10);

fn limited(service: &str, limit: &str) -> flotilla_gateway::RouteConfig {
    limited_at(service, "/**", limit)
}

/// [`limited`] on the route `pattern`: a route label no other test's
/// requests are counted under.
fn limited_at(service: &str, pattern: &str, limit: &str) -> flotilla_gateway::RouteConfig {
    let mut r = route(service, pattern, &[], T);
    r.rate_limits = vec![ok(RateLimit::parse(limit), "rate limit")];
    r
}

/// Sends `n` requests at once, spread over `clients`; returns the replies.
async fn burst(
    clients: &[Client],
    n: usize,
    headers: &'static [(&'static str, &'static str)],
) -> Vec<Reply> {
    burst_to(clients, "/x", n, headers).await
}

/// [`burst`] to `path`.
async fn burst_to(
    clients: &[Client],
    path: &'static str,
    n: usize,
    headers: &'static [(&'static str, &'static str)],
) -> Vec<Reply> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let c = clients[i % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            c.request(Method::GET, path, headers, Bytes::new()).await
        }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(ok(t.await, "request task"));
    }
    replies
}

fn count(replies: &[Reply], status: StatusCode) -> usize {
    replies.iter().filter(|r| r.status == status).count()
}

#[tokio::test]
async fn exactly_the_burst_passes_out_of_200_concurrent_requests() {
    let registry = Registry::new();
    let up = Upstream::start("rl-exact-0").await;
    registry.set("rl-exact", vec![up.endpoint()]);
    // A route of its own: the refusals counted under its label are this
    // test's alone, so the count is exact.
    let gateway = start(
        config(vec![limited_at(
            "rl-exact",
            "/rl-exact/**",
            "50/h burst 50 per ip",
        )]),
        &registry,
    )
    .await;
    let client = Client::new(&gateway);
    let refused = || {
        metric_sum(&[
            "flotilla_gateway_rate_limited_total",
            "route=\"/rl-exact/**\"",
        ])
    };
    let before = refused();

    let replies = burst_to(&[client], "/rl-exact/x", 200, &[]).await;
    assert_eq!(count(&replies, StatusCode::OK), 50);
    assert_eq!(count(&replies, StatusCode::TOO_MANY_REQUESTS), 150);
    assert_eq!(up.hits(), 50);
    for r in &replies {
        assert_eq!(
            r.header("ratelimit-policy"),
            "\"default\";q=50;w=3600",
            "{r:?}"
        );
        assert!(r.header("ratelimit").starts_with("\"default\";r="), "{r:?}");
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(r.json()["error"]["code"], "rate_limited");
            let retry: u64 = r.header("retry-after").parse().unwrap_or(0);
            // One request's worth of refill at 50/h: 72 s.
            assert!((70..=72).contains(&retry), "Retry-After {retry}");
            assert!(
                r.header("ratelimit").starts_with("\"default\";r=0;"),
                "{r:?}"
            );
        }
    }
    assert_eq!(refused() - before, 150, "refusals counted");
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn a_header_key_counts_each_value_separately() {
    let registry = Registry::new();
    let up = Upstream::start("rl-header-0").await;
    registry.set("rl-header", vec![up.endpoint()]);
    let gateway = start(
        config(vec![limited("rl-header", "2/h per header:x-api-key")]),
        &registry,
    )
    .await;
    let client = Client::new(&gateway);
    let a = burst(std::slice::from_ref(&client), 3, &[("x-api-key", "a")]).await;
    let b = burst(std::slice::from_ref(&client), 3, &[("x-api-key", "b")]).await;
    assert_eq!(count(&a, StatusCode::OK), 2);
    assert_eq!(count(&b, StatusCode::OK), 2);
    let ok_reply = a.iter().find(|r| r.status == StatusCode::OK);
    assert!(ok_reply.is_some_and(|r| r.header("ratelimit-policy") == "\"default\";q=2;w=3600"));
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn an_ipv6_client_is_limited_by_its_64_not_by_each_address() {
    let registry = Registry::new();
    let up = Upstream::start("rl-v6-0").await;
    registry.set("rl-v6", vec![up.endpoint()]);
    let mut cfg = config(vec![limited("rl-v6", "2/h per ip")]);
    // The test client plays a trusted proxy, telling the gateway who the
    // client behind it is.
    cfg.ip = Some(flotilla_gateway::IpConfig {
        trusted_proxies: ok(flotilla_gateway::parse_nets(&["127.0.0.0/8"]), "nets"),
        ..flotilla_gateway::IpConfig::default()
    });
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);
    let from = |client_ip: &'static str| [("x-forwarded-for", client_ip)];
    // Three addresses of one /64: one client, two requests an hour.
    let mut statuses = Vec::new();
    for addr in ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3"] {
        let reply = client
            .request(Method::GET, "/x", &from(addr), Bytes::new())
            .await;
        statuses.push(reply.status);
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    // Another /64, and an IPv4 client, are others.
    for addr in ["2001:db8:1:3::1", "192.0.2.7"] {
        let reply = client
            .request(Method::GET, "/x", &from(addr), Bytes::new())
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{addr}");
    }
    gateway.shutdown(T).await;
}

/// The tests' Redis, or `None` (after [`skip`]) when none is set.
#[track_caller]
fn redis_url() -> Option<String> {
    env_or_skip(
        "FLOTILLA_TEST_REDIS_URL",
        "set it to a Redis server, e.g. redis://127.0.0.1:6379",
    )
}

/// Held by the tests whose gateways use the Redis backend: the backend
/// error counter they read is the process's, and one test's failures
/// (on purpose, in the fallback test) must not show up in the other's.
static REDIS_BACKEND: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn two_gateways_share_one_limit_through_redis() {
    let Some(url) = redis_url() else {
        return;
    };
    let _alone = REDIS_BACKEND.lock().await;
    let registry = Registry::new();
    let up = Upstream::start("rl-redis-0").await;
    registry.set("rl-redis", vec![up.endpoint()]);
    // A fresh prefix per run: counters of earlier runs must not count.
    let prefix = format!("flotilla-test:{}:", uuid::Uuid::new_v4());
    let mut cfg = config(vec![limited("rl-redis", "50/h burst 50 per route")]);
    cfg.rate_limit_backend = RateLimitBackend::Redis { url, prefix };
    let one = start(cfg.clone(), &registry).await;
    let two = start(cfg, &registry).await;
    let clients = [Client::new(&one), Client::new(&two)];

    let backend_errors = counter("flotilla_gateway_rate_limit_backend_errors_total");
    let replies = burst(&clients, 200, &[]).await;
    assert_eq!(
        counter("flotilla_gateway_rate_limit_backend_errors_total"),
        backend_errors,
        "Redis failed during the test; counts fell back to memory"
    );
    assert_eq!(count(&replies, StatusCode::OK), 50);
    assert_eq!(count(&replies, StatusCode::TOO_MANY_REQUESTS), 150);
    assert_eq!(up.hits(), 50);
    // Request i went to gateway i % 2: both refused some, so each saw the
    // other's count.
    let refused = |g: usize| {
        replies
            .iter()
            .enumerate()
            .filter(|(i, r)| i % 2 == g && r.status == StatusCode::TOO_MANY_REQUESTS)
            .count()
    };
    assert!(
        refused(0) > 0 && refused(1) > 0,
        "{} / {}",
        refused(0),
        refused(1)
    );
    one.shutdown(T).await;
    two.shutdown(T).await;
}

#[tokio::test]
async fn an_unreachable_redis_falls_back_to_memory() {
    let _alone = REDIS_BACKEND.lock().await;
    let registry = Registry::new();
    let up = Upstream::start("rl-fallback-0").await;
    registry.set("rl-fallback", vec![up.endpoint()]);
    // A port nothing listens on: bound and held, never listening, for the
    // whole test, so no other test's socket can take it and answer.
    let dead = ok(tokio::net::TcpSocket::new_v4(), "socket");
    ok(dead.bind(([127, 0, 0, 1], 0).into()), "bind");
    let port = ok(dead.local_addr(), "addr").port();
    let mut cfg = config(vec![limited("rl-fallback", "3/h per route")]);
    cfg.rate_limit_backend = RateLimitBackend::Redis {
        url: format!("redis://127.0.0.1:{port}"),
        prefix: "x:".into(),
    };
    let gateway: Gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);
    let replies = burst(&[client], 6, &[]).await;
    assert_eq!(count(&replies, StatusCode::OK), 3);
    assert_eq!(count(&replies, StatusCode::TOO_MANY_REQUESTS), 3);
    gateway.shutdown(T).await;
}

/// 5 an hour for the route, then 1 an hour per `x-client`, through
/// `gateways` in turn: a request the client's limit refuses is given back
/// to the route's, so four more clients still get in after one client has
/// been refused four times.
async fn several_limits(gateways: &[Gateway], up: &Upstream) {
    let clients: Vec<Client> = gateways.iter().map(Client::new).collect();
    let mut next = 0;
    let mut get = async |client_id: &str| {
        next += 1;
        clients[next % clients.len()]
            .request(Method::GET, "/x", &[("x-client", client_id)], Bytes::new())
            .await
    };
    assert_eq!(get("a").await.status, StatusCode::OK);
    for _ in 0..4 {
        let refused = get("a").await;
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            refused.header("ratelimit-policy"),
            "\"h-route\";q=5;w=3600, \"h-header:x-client\";q=1;w=3600"
        );
        let state = refused.header("ratelimit");
        assert!(
            state.starts_with("\"h-route\";r=4;t=")
                && state.contains(", \"h-header:x-client\";r=0;t="),
            "{state}"
        );
        assert_eq!(refused.header("retry-after"), "3600");
    }
    for client_id in ["b", "c", "d", "e"] {
        let reply = get(client_id).await;
        assert_eq!(reply.status, StatusCode::OK, "{client_id}: {reply:?}");
    }
    let last = get("f").await;
    assert_eq!(last.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        metric_sum(&[
            "flotilla_gateway_rate_limited_total",
            "limit=\"h-header:x-client\"",
        ]) >= 4
    );
    assert!(metric_sum(&["flotilla_gateway_rate_limited_total", "limit=\"h-route\"",]) >= 1);
    assert!(
        last.header("ratelimit").starts_with("\"h-route\";r=0;t="),
        "{last:?}"
    );
    assert_eq!(up.hits(), 5);
}

fn with_several_limits(service: &str) -> flotilla_gateway::RouteConfig {
    let mut r = route(service, "/**", &[], T);
    r.rate_limits = ["5/h per route", "1/h per header:x-client"]
        .into_iter()
        .map(|l| ok(RateLimit::parse(l), "rate limit"))
        .collect();
    r
}

#[tokio::test]
async fn several_limits_must_all_pass_and_a_refused_request_counts_against_none() {
    let registry = Registry::new();
    let up = Upstream::start("rl-several-0").await;
    registry.set("rl-several", vec![up.endpoint()]);
    let gateway = start(config(vec![with_several_limits("rl-several")]), &registry).await;
    several_limits(std::slice::from_ref(&gateway), &up).await;
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn several_limits_are_given_back_in_redis_too() {
    let Some(url) = redis_url() else {
        return;
    };
    let _alone = REDIS_BACKEND.lock().await;
    let registry = Registry::new();
    let up = Upstream::start("rl-several-redis-0").await;
    registry.set("rl-several-redis", vec![up.endpoint()]);
    let prefix = format!("flotilla-test:{}:", uuid::Uuid::new_v4());
    let mut cfg = config(vec![with_several_limits("rl-several-redis")]);
    cfg.rate_limit_backend = RateLimitBackend::Redis { url, prefix };
    let backend_errors = counter("flotilla_gateway_rate_limit_backend_errors_total");
    let gateways = [
        start(cfg.clone(), &registry).await,
        start(cfg, &registry).await,
    ];
    several_limits(&gateways, &up).await;
    assert_eq!(
        counter("flotilla_gateway_rate_limit_backend_errors_total"),
        backend_errors,
        "Redis failed during the test; counts fell back to memory"
    );
    for g in gateways {
        g.shutdown(T).await;
    }
}

#[tokio::test]
async fn two_limits_on_one_unit_and_key_are_refused() {
    let mut r = route("svc", "/**", &[], T);
    r.rate_limits = ["5/s per ip", "50/s burst 10 per ip"]
        .into_iter()
        .map(|l| ok(RateLimit::parse(l), "rate limit"))
        .collect();
    let why = start_error(config(vec![r]), "two limits per second per ip").await;
    assert!(why.contains("two with the same unit and key"), "{why}");
}
