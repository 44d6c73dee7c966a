//! `auth = "key"`: machine clients with API keys from `[gateway.api_keys]`,
//! through a real gateway.

use std::time::Duration;

use bytes::Bytes;
use flotilla_gateway::{RateLimit, RouteAuth};
use http::{Method, StatusCode};

use crate::support::*;

const T: Duration = Duration::from_secs(5);

fn digest(key: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    d.as_ref().try_into().unwrap_or([0; 32])
}

/// `[gateway.api_keys]` in the default header: each consumer with the
/// digests of its keys.
pub(crate) fn api_keys(consumers: &[(&str, &[&str])]) -> Option<flotilla_manifest::ApiKeys> {
    Some(flotilla_manifest::ApiKeys {
        header: "x-api-key".into(),
        consumers: consumers
            .iter()
            .map(|(name, keys)| (name.to_string(), keys.iter().map(|k| digest(k)).collect()))
            .collect(),
    })
}

fn keyed(pattern: &str, consumers: &[&str]) -> flotilla_gateway::RouteConfig {
    let mut r = route("keyed", pattern, &[], T);
    r.auth = RouteAuth::Key {
        consumers: consumers.iter().map(|c| c.to_string()).collect(),
    };
    r
}

async fn get(client: &Client, path: &str, fields: &[(&str, &str)]) -> Reply {
    client
        .request(Method::GET, path, fields, Bytes::new())
        .await
}

fn failures(reason: &str) -> u64 {
    metric_sum(&[
        "flotilla_gateway_auth_failures_total",
        "route=\"/k/**\"",
        &format!("reason=\"{reason}\""),
    ])
}

#[tokio::test]
async fn a_key_lets_its_consumer_in_and_nothing_else_does() {
    let registry = Registry::new();
    let up = Upstream::start("keyed-0").await;
    registry.set("keyed", vec![up.endpoint()]);
    let mut limited = keyed("/lim/**", &[]);
    limited.rate_limits = vec![ok(RateLimit::parse("1/h per user"), "limit")];
    let mut cfg = config(vec![
        keyed("/k/**", &[]),
        keyed("/only-a/**", &["partner-a"]),
        limited,
    ]);
    cfg.api_keys = api_keys(&[
        ("partner-a", &["key-a"]),
        ("partner-b", &["key-b", "key-b2"]),
    ]);
    cfg.routes.push(route("keyed", "/open/**", &[], T));
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);

    // A key sent to a route that does not ask for one stays here too: an
    // SDK sends it on every call, and the service may log what it gets.
    let reply = get(&client, "/open/x", &[("x-api-key", "key-a")]).await;
    assert_eq!(reply.status, StatusCode::OK);
    let headers = &reply.json()["headers"];
    assert!(headers.get("x-api-key").is_none(), "forwarded: {headers}");
    assert!(headers.get("x-flotilla-user-id").is_none(), "{headers}");

    // The consumer, as the gateway vouches for it; the key stays here.
    let forged = ("x-flotilla-user-id", "admin");
    for (key, consumer) in [("key-a", "partner-a"), ("key-b2", "partner-b")] {
        let reply = get(&client, "/k/x", &[("x-api-key", key), forged]).await;
        assert_eq!(reply.status, StatusCode::OK, "{key}");
        let headers = &reply.json()["headers"];
        assert_eq!(headers["x-flotilla-user-id"], consumer);
        assert!(headers.get("x-api-key").is_none(), "forwarded: {headers}");
    }

    let hits = up.hits();
    for (fields, status, code) in [
        (&[][..], StatusCode::UNAUTHORIZED, "missing_api_key"),
        (
            &[("x-api-key", "key-c")][..],
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
        ),
        (
            &[("x-api-key", "key-a"), ("x-api-key", "key-b")][..],
            StatusCode::UNAUTHORIZED,
            "missing_api_key",
        ),
        // A bearer token is not a key.
        (
            &[("authorization", "Bearer key-a")][..],
            StatusCode::UNAUTHORIZED,
            "missing_api_key",
        ),
    ] {
        let before = failures(code);
        let reply = get(&client, "/k/x", fields).await;
        assert_eq!(reply.status, status, "{fields:?}");
        assert_eq!(reply.json()["error"]["code"], code, "{fields:?}");
        assert_eq!(
            reply.header("www-authenticate"),
            "ApiKey realm=\"flotilla\", header=\"x-api-key\""
        );
        assert!(failures(code) > before, "{code} counted");
    }
    assert_eq!(up.hits(), hits, "no refused request reached the service");

    // A route for one consumer only.
    let other = get(&client, "/only-a/x", &[("x-api-key", "key-b")]).await;
    assert_eq!(other.status, StatusCode::FORBIDDEN);
    assert_eq!(other.json()["error"]["code"], "consumer_not_allowed");
    assert!(other.headers.get("www-authenticate").is_none());
    let own = get(&client, "/only-a/x", &[("x-api-key", "key-a")]).await;
    assert_eq!(own.status, StatusCode::OK);

    // `per user` counts per consumer, whichever of its keys it sends.
    assert_eq!(
        get(&client, "/lim/x", &[("x-api-key", "key-a")])
            .await
            .status,
        StatusCode::OK
    );
    let again = get(&client, "/lim/x", &[("x-api-key", "key-a")]).await;
    assert_eq!(again.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        get(&client, "/lim/x", &[("x-api-key", "key-b")])
            .await
            .status,
        StatusCode::OK
    );
    let rotated = get(&client, "/lim/x", &[("x-api-key", "key-b2")]).await;
    assert_eq!(rotated.status, StatusCode::TOO_MANY_REQUESTS);
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn a_key_route_without_keys_is_refused_at_start() {
    let mut cfg = config(vec![keyed("/k/**", &[])]);
    let e = start_error(cfg.clone(), "a key route without [gateway.api_keys]").await;
    assert!(e.contains("[gateway.api_keys]"), "{e}");
    cfg.api_keys = api_keys(&[("partner-a", &["k"])]);
    cfg.routes = vec![keyed("/k/**", &["partner-z"])];
    let e = start_error(cfg, "a route for an unknown consumer").await;
    assert!(e.contains("partner-z"), "{e}");
}

#[tokio::test]
async fn a_reload_adds_and_revokes_keys() {
    let registry = Registry::new();
    let up = Upstream::start("keyed-r-0").await;
    registry.set("keyed", vec![up.endpoint()]);
    let with_keys = |keys: &[&str]| {
        let mut cfg = config(vec![keyed("/k/**", &[])]);
        cfg.api_keys = api_keys(&[("partner-a", keys)]);
        cfg
    };
    let gateway = start(with_keys(&["old"]), &registry).await;
    let client = Client::new(&gateway);
    let status = |key: &'static str| {
        let client = client.clone();
        async move { get(&client, "/k/x", &[("x-api-key", key)]).await.status }
    };
    assert_eq!(status("old").await, StatusCode::OK);
    assert_eq!(status("new").await, StatusCode::UNAUTHORIZED);
    // Rotation: both for a while, then the new one alone.
    ok(gateway.reload(with_keys(&["old", "new"])), "reload");
    assert_eq!(status("old").await, StatusCode::OK);
    assert_eq!(status("new").await, StatusCode::OK);
    ok(gateway.reload(with_keys(&["new"])), "reload");
    assert_eq!(status("old").await, StatusCode::UNAUTHORIZED);
    assert_eq!(status("new").await, StatusCode::OK);
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn one_consumer_s_answer_is_never_kept_for_another() {
    let registry = Registry::new();
    let up = Upstream::start("keyed-c-0").await;
    registry.set("keyed", vec![up.endpoint()]);
    let mut cached = keyed("/k/**", &[]);
    cached.cache = Some(flotilla_manifest::RouteCache {
        ttl: Duration::from_secs(60),
        stale_if_error: Duration::ZERO,
        stale_while_revalidate: Duration::ZERO,
        query: None,
    });
    let mut cfg = config(vec![cached]);
    cfg.api_keys = api_keys(&[("partner-a", &["key-a"]), ("partner-b", &["key-b"])]);
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);
    // Answers that do not say they may be shared are the consumer's own.
    for key in ["key-a", "key-b"] {
        let reply = get(&client, "/k/mine", &[("x-api-key", key)]).await;
        assert!(reply.header("cache-status").contains("fwd=uri-miss"));
    }
    let b = get(&client, "/k/mine", &[("x-api-key", "key-b")]).await;
    assert_eq!(b.json()["headers"]["x-flotilla-user-id"], "partner-b");
    assert_eq!(up.hits(), 3, "nothing kept");
    // One that says `public` is everyone's.
    let public = [
        ("x-api-key", "key-a"),
        ("x-reply-cache-control", "public, max-age=60"),
    ];
    get(&client, "/k/shared", &public).await;
    let other = get(&client, "/k/shared", &[("x-api-key", "key-b")]).await;
    assert!(other.header("cache-status").contains("hit"));
    // One that varies on the caller is kept once per consumer.
    let per_caller = |key| {
        [
            ("x-api-key", key),
            ("x-reply-cache-control", "public, max-age=60"),
            ("x-reply-vary", "x-flotilla-user-id"),
        ]
    };
    let a = get(&client, "/k/each", &per_caller("key-a")).await;
    assert_eq!(a.json()["headers"]["x-flotilla-user-id"], "partner-a");
    let b = get(&client, "/k/each", &per_caller("key-b")).await;
    assert!(
        b.header("cache-status").contains("fwd=vary-miss"),
        "{}",
        b.header("cache-status")
    );
    assert_eq!(b.json()["headers"]["x-flotilla-user-id"], "partner-b");
    for (key, consumer) in [("key-a", "partner-a"), ("key-b", "partner-b")] {
        let again = get(&client, "/k/each", &per_caller(key)).await;
        assert!(again.header("cache-status").contains("hit"), "{key}");
        assert_eq!(again.json()["headers"]["x-flotilla-user-id"], consumer);
    }
    gateway.shutdown(T).await;
}
