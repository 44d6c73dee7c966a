//! `request_headers` and `response_headers`, the system's and a route's,
//! through a real gateway: on relayed responses over HTTP/1.1 and h2c, on
//! the gateway's own refusals, on requests as the instance sees them; and
//! a change to a field the gateway keeps for itself refused at start.

use std::time::Duration;

use bytes::Bytes;
use flotilla_gateway::{ConfigError, HeaderChanges};
use http::{Method, StatusCode};

use crate::support::*;

const T: Duration = Duration::from_secs(5);

/// As the manifest hands them over.
fn changes(set: &[(&str, &str)], remove: &[&str]) -> HeaderChanges {
    HeaderChanges::from_manifest(&flotilla_manifest::HeaderChanges {
        set: set
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        remove: remove.iter().map(|n| n.to_string()).collect(),
        add: Vec::new(),
    })
}

fn values(reply: &Reply, name: &str) -> Vec<String> {
    reply
        .headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap_or("?").to_string())
        .collect()
}

#[tokio::test]
async fn the_systems_and_a_routes_changes_reach_clients_and_instances() {
    let registry = Registry::new();
    let up = Upstream::start("headers-0").await;
    registry.set("headers", vec![up.endpoint()]);
    let mut api = route("headers", "/api/**", &[], T);
    api.request_headers = changes(&[("x-api-version", "2")], &["cookie"]);
    api.response_headers = changes(&[("cache-control", "no-store")], &["x-frame-options"]);
    api.response_headers.add = vec![(
        http::HeaderName::from_static("vary"),
        http::HeaderValue::from_static("Accept-Language"),
    )];
    let other = route("headers", "/other/**", &[], T);
    let mut cfg = config(vec![api, other]);
    cfg.request_headers = changes(&[("x-gateway", "flotilla")], &["x-debug"]);
    cfg.response_headers = changes(
        &[
            ("x-content-type-options", "nosniff"),
            ("x-frame-options", "DENY"),
        ],
        &["set-cookie"],
    );
    let gateway = start(cfg, &registry).await;

    for client in [Client::new(&gateway), Client::h2c(&gateway)] {
        // The route's changes after the system's; `forge` makes the
        // instance send two `Set-Cookie` and a `Vary` of its own.
        let reply = client
            .request(
                Method::GET,
                "/api/forge",
                &[
                    ("cookie", "session=secret"),
                    ("x-api-version", "1"),
                    ("x-debug", "1"),
                    ("accept", "application/json"),
                ],
                Bytes::new(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(values(&reply, "x-content-type-options"), ["nosniff"]);
        assert_eq!(values(&reply, "cache-control"), ["no-store"]);
        assert!(values(&reply, "x-frame-options").is_empty(), "{reply:?}");
        assert!(values(&reply, "set-cookie").is_empty(), "{reply:?}");
        // The instance's own `Vary`, and the route's added beside it.
        assert_eq!(
            values(&reply, "vary"),
            ["Accept-Encoding", "Accept-Language"]
        );
        let seen = &reply.json()["headers"];
        assert_eq!(seen["x-api-version"], "2", "{seen}");
        assert_eq!(seen["x-gateway"], "flotilla", "{seen}");
        assert!(seen.get("cookie").is_none(), "{seen}");
        assert!(seen.get("x-debug").is_none(), "{seen}");
        assert_eq!(seen["accept"], "application/json", "{seen}");

        // A route without changes of its own gets the system's.
        let reply = client
            .request(
                Method::GET,
                "/other/forge",
                &[("x-api-version", "1")],
                Bytes::new(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(values(&reply, "x-frame-options"), ["DENY"]);
        assert_eq!(values(&reply, "x-content-type-options"), ["nosniff"]);
        assert!(values(&reply, "cache-control").is_empty());
        assert!(values(&reply, "set-cookie").is_empty());
        let seen = &reply.json()["headers"];
        assert_eq!(seen["x-api-version"], "1", "the client's, untouched");
        assert_eq!(seen["x-gateway"], "flotilla");

        // So does the gateway's own answer to a request no route matched.
        let reply = client.get("/nowhere").await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND);
        assert_eq!(values(&reply, "x-frame-options"), ["DENY"]);
        assert_eq!(values(&reply, "x-content-type-options"), ["nosniff"]);
        assert_eq!(reply.json()["error"]["code"], "not_found");
    }
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn a_change_to_a_field_the_gateway_keeps_stops_the_start() {
    let cases = [
        (
            "request",
            changes(&[("x-flotilla-user-id", "admin")], &[]),
            "request_headers may not change `x-flotilla-user-id`",
        ),
        (
            "request",
            changes(&[], &["x-forwarded-for"]),
            "request_headers may not change `x-forwarded-for`",
        ),
        (
            "response",
            changes(&[("access-control-allow-origin", "*")], &[]),
            "response_headers may not change `access-control-allow-origin`",
        ),
        (
            "response",
            changes(&[], &["x-request-id"]),
            "response_headers may not change `x-request-id`",
        ),
    ];
    for (direction, change, message) in cases {
        let mut r = route("headers", "/api/**", &[], T);
        if direction == "request" {
            r.request_headers = change;
        } else {
            r.response_headers = change;
        }
        let why = start_error(config(vec![r]), message).await;
        assert!(why.contains(message), "{why}");
        assert!(why.contains("route `/api/**`"), "{why}");
    }
    // The system's too, by the same rule.
    let mut cfg = config(vec![route("headers", "/api/**", &[], T)]);
    cfg.response_headers = changes(&[("server", "mine")], &[]);
    let why = start_error(cfg, "server is the gateway's").await;
    assert!(
        why.contains("response_headers may not change `server`"),
        "{why}"
    );
    assert!(!why.contains("route `"), "{why}");
    // The same refusal is a `ConfigError`, for callers that validate first.
    let mut cfg = config(vec![]);
    cfg.request_headers = changes(&[("transfer-encoding", "chunked")], &[]);
    assert!(matches!(
        cfg.validate(),
        Err(ConfigError::ReservedHeader { name, .. }) if name == "transfer-encoding"
    ));
}

#[tokio::test]
async fn a_reload_swaps_the_changes_and_a_refused_one_keeps_them() {
    let registry = Registry::new();
    let up = Upstream::start("headers-reload-0").await;
    registry.set("headers", vec![up.endpoint()]);
    let routes = || vec![route("headers", "/api/**", &[], T)];
    let gateway = start(config(routes()), &registry).await;
    let client = Client::new(&gateway);
    let reply = client.get("/api/x").await;
    assert!(values(&reply, "x-frame-options").is_empty());

    let mut with = config(routes());
    with.response_headers = changes(&[("x-frame-options", "DENY")], &[]);
    ok(gateway.reload(with), "reload with header changes");
    let reply = client.get("/api/x").await;
    assert_eq!(values(&reply, "x-frame-options"), ["DENY"]);

    // A change to a field the gateway keeps is refused whole: the last
    // good configuration, changes included, stays in force.
    let mut refused = config(routes());
    refused.response_headers = changes(&[("x-frame-options", "SAMEORIGIN"), ("server", "x")], &[]);
    assert!(matches!(
        gateway.reload(refused),
        Err(ConfigError::ReservedHeader { name, .. }) if name == "server"
    ));
    let reply = client.get("/api/x").await;
    assert_eq!(values(&reply, "x-frame-options"), ["DENY"]);
    gateway.shutdown(T).await;
}
