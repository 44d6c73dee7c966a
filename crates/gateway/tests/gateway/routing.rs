//! Routing, error bodies, request ids, forwarded headers, health and the
//! access log.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::support::*;

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn routes_to_the_most_specific_pattern_for_the_method() {
    let registry = Registry::new();
    let api = Upstream::start("api-0").await;
    let orders = Upstream::start("orders-0").await;
    let special = Upstream::start("special-0").await;
    registry.set("api", vec![api.endpoint()]);
    registry.set("orders", vec![orders.endpoint()]);
    registry.set("special", vec![special.endpoint()]);
    // Listed least specific first: order must not matter.
    let gateway = start(
        config(vec![
            route("api", "/api/**", &[], T),
            route("orders", "/api/orders/**", &["GET", "POST"], T),
            route("special", "/api/orders/special", &["GET"], T),
        ]),
        &registry,
    )
    .await;
    let client = Client::new(&gateway);

    for (method, path, instance) in [
        (Method::GET, "/api/catalog/1", "api-0"),
        (Method::GET, "/api/orders", "orders-0"),
        (Method::GET, "/api/orders/42/lines", "orders-0"),
        (Method::GET, "/api/orders/special", "special-0"),
        // The most specific route lacks POST; the next one has it.
        (Method::POST, "/api/orders/special", "orders-0"),
    ] {
        let reply = client
            .request(method.clone(), path, &[], Bytes::new())
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{method} {path}");
        assert_eq!(reply.instance(), instance, "{method} {path}");
        assert_eq!(reply.json()["method"], method.as_str());
    }
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn forwards_path_query_body_and_headers() {
    let registry = Registry::new();
    let up = Upstream::start("svc-0").await;
    registry.set("svc", vec![up.endpoint()]);
    let gateway = start(config(vec![route("svc", "/svc/**", &[], T)]), &registry).await;
    let client = Client::new(&gateway);

    let big = Bytes::from(vec![b'x'; 200 * 1024]);
    let reply = client
        .request(
            Method::POST,
            "/svc/a%20b/c?q=1&r=two",
            &[
                ("host", "shop.example"),
                ("x-forwarded-for", "203.0.113.9"),
                ("connection", "x-hop"),
                ("x-hop", "secret"),
                ("proxy-authorization", "Basic Zm9vOmJhcg=="),
                ("x-custom", "kept"),
            ],
            big.clone(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let echo = reply.json();
    assert_eq!(echo["path"], "/svc/a%20b/c?q=1&r=two");
    assert_eq!(echo["body_len"], big.len());
    let h = &echo["headers"];
    assert_eq!(h["host"], "shop.example");
    assert_eq!(h["x-forwarded-host"], "shop.example");
    assert_eq!(h["x-forwarded-proto"], "http");
    // The client is no trusted proxy: its own `X-Forwarded-For` is a claim,
    // not a hop, and is replaced (see the security suite for proxies).
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-custom"], "kept");
    assert!(h.get("x-hop").is_none(), "{h}");
    assert!(h.get("proxy-authorization").is_none(), "{h}");
    assert_eq!(reply.header("server"), "flotilla");
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_405_in_json() {
    let registry = Registry::new();
    let up = Upstream::start("svc-0").await;
    registry.set("svc", vec![up.endpoint()]);
    let gateway = start(
        config(vec![route("svc", "/api/items/**", &["GET", "POST"], T)]),
        &registry,
    )
    .await;
    let client = Client::new(&gateway);

    let reply = client.get("/nowhere").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.header("content-type"), "application/json");
    let error = &reply.json()["error"];
    assert_eq!(error["code"], "not_found");
    assert_eq!(error["message"], "no route for GET /nowhere");
    assert_eq!(error["request_id"], reply.header("x-request-id"));
    assert!(!reply.header("x-request-id").is_empty());

    let reply = client
        .request(Method::DELETE, "/api/items/1", &[], Bytes::new())
        .await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.header("allow"), "GET, HEAD, POST");
    assert_eq!(reply.json()["error"]["code"], "method_not_allowed");

    // Dot segments never reach an upstream.
    let raw = raw_request(
        gateway.local_addr(),
        "GET /api/items/../admin HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(raw.contains("bad_path"), "{raw}");
    assert_eq!(up.hits(), 0);
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn request_id_is_kept_when_well_formed_and_generated_otherwise() {
    let registry = Registry::new();
    let up = Upstream::start("svc-0").await;
    registry.set("svc", vec![up.endpoint()]);
    let gateway = start(config(vec![route("svc", "/**", &[], T)]), &registry).await;
    let client = Client::new(&gateway);

    let kept = client
        .request(
            Method::GET,
            "/a",
            &[("x-request-id", "client-id:42.a_b")],
            Bytes::new(),
        )
        .await;
    assert_eq!(kept.header("x-request-id"), "client-id:42.a_b");
    assert_eq!(kept.json()["headers"]["x-request-id"], "client-id:42.a_b");
    assert_eq!(kept.json()["request_ids"], 1);

    // Of several, the first well-formed one, alone.
    let first = client
        .request(
            Method::GET,
            "/a",
            &[("x-request-id", "first-1"), ("x-request-id", "second-2")],
            Bytes::new(),
        )
        .await;
    assert_eq!(first.header("x-request-id"), "first-1");
    assert_eq!(first.json()["headers"]["x-request-id"], "first-1");
    assert_eq!(first.json()["request_ids"], 1);

    let replaced = client
        .request(
            Method::GET,
            "/a",
            &[("x-request-id", "bad id;")],
            Bytes::new(),
        )
        .await;
    let id = replaced.header("x-request-id").to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    assert_eq!(replaced.json()["headers"]["x-request-id"], id.as_str());
    assert_eq!(replaced.json()["request_ids"], 1);

    let generated = client.get("/a").await;
    let id2 = generated.header("x-request-id").to_string();
    assert!(uuid::Uuid::parse_str(&id2).is_ok(), "{id2}");
    assert_eq!(generated.json()["headers"]["x-request-id"], id2.as_str());
    assert_eq!(generated.json()["request_ids"], 1);
    assert_ne!(id, id2);
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn healthz_answers_even_when_a_route_claims_everything() {
    let registry = Registry::new();
    let gateway = start(config(vec![route("svc", "/**", &[], T)]), &registry).await;
    let client = Client::new(&gateway);
    let reply = client.get("/healthz").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), serde_json::json!({"status": "ok"}));
    assert_eq!(
        registry
            .activations
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    gateway.shutdown(T).await;
}

/// A full disk under the access log costs no request: the gateway answers
/// as before, stops without waiting on the disk, and counts the lines it
/// could not write.
#[tokio::test]
async fn a_full_disk_under_the_access_log_costs_no_request() {
    let dir = TestDir::new();
    let log = path_buf(&dir, "access.log");
    // Every write to /dev/full fails with ENOSPC, as on a full disk.
    ok(std::os::unix::fs::symlink("/dev/full", &log), "symlink");
    let registry = Registry::new();
    let up = Upstream::start("full-0").await;
    registry.set("full", vec![up.endpoint()]);
    let mut cfg = config(vec![route("full", "/full/*", &[], T)]);
    cfg.access_log = Some(log.clone());
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);
    let lost = || {
        metric_sum(&[
            "flotilla_gateway_access_log_dropped_total",
            "reason=\"write_failed\"",
        ])
    };
    let before = lost();
    for i in 0..50 {
        assert_eq!(
            client.get(&format!("/full/{i}")).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(up.hits(), 50);
    gateway.shutdown(T).await;
    // Kept in case the disk took them again, then counted when the writer
    // ended with them unwritten. Only this test's disk is full: other
    // tests add nothing here.
    assert_eq!(lost(), before + 50);
}

#[tokio::test]
async fn access_log_has_one_line_per_request() {
    let dir = TestDir::new();
    let log = path_buf(&dir, "access.log");
    let registry = Registry::new();
    let up = Upstream::start("svc-0").await;
    registry.set("svc", vec![up.endpoint()]);
    let mut cfg = config(vec![route("svc", "/svc/*", &[], T)]);
    cfg.access_log = Some(log.clone());
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);

    let routed = client
        .request(
            Method::GET,
            "/svc/1?token=s3cret",
            &[("x-request-id", "log-1")],
            Bytes::new(),
        )
        .await;
    assert_eq!(routed.status, StatusCode::OK);
    let missing = client
        .request(
            Method::GET,
            "/other",
            &[("x-request-id", "log-2")],
            Bytes::new(),
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    // Lines are written after the bodies: shut down to flush them all.
    gateway.shutdown(T).await;

    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !text.contains("s3cret"),
        "query strings are not logged: {text}"
    );
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| ok(serde_json::from_str(l), "access-log line is JSON"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let by_id = |id: &str| -> serde_json::Value {
        let found = lines.iter().find(|l| l["request_id"] == id).cloned();
        found.unwrap_or_else(|| panic!("no line for {id}: {text}"))
    };
    let first = &by_id("log-1");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["client"], "127.0.0.1");
    // The trace the gateway started, as the instance was told it.
    let traceparent = routed.json()["headers"]["traceparent"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(first["trace_id"], traceparent.get(3..35).unwrap_or("none"));
    assert_eq!(first["path"], "/svc/1");
    assert_eq!(first["route"], "/svc/*");
    assert_eq!(first["service"], "svc");
    assert_eq!(first["instance"], "svc-0");
    assert_eq!(first["status"], 200);
    assert_eq!(first["bytes"], routed.body.len());
    assert!(first["duration_ms"].as_f64().is_some_and(|d| d >= 0.0));
    assert!(first["ts"].as_str().is_some_and(|t| t.ends_with('Z')));
    let second = &by_id("log-2");
    assert_eq!(second["status"], 404);
    assert_eq!(second["route"], serde_json::Value::Null);
}

/// The access-log line of `id` in `log`, once it is written.
async fn logged_line(log: &std::path::Path, id: &str) -> serde_json::Value {
    let line = || -> Option<serde_json::Value> {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["request_id"] == id)
    };
    wait_until(&format!("the line of {id}"), || line().is_some()).await;
    line().unwrap_or_default()
}

/// A request whose client leaves before its answer is logged as a 499
/// and counted under the route it was matched to, with the client, the
/// trace and the caller the edge had found for it by then: not as an
/// unmatched request from the proxy in front.
#[tokio::test]
async fn a_request_its_client_abandons_keeps_its_route_client_trace_and_user() {
    let dir = TestDir::new();
    let log = path_buf(&dir, "access.log");
    let registry = Registry::new();
    let up = Upstream::start("abandoned-0").await;
    registry.set("abandoned", vec![up.endpoint()]);
    let mut keyed = route("abandoned", "/abandoned/*", &[], T);
    keyed.auth = flotilla_gateway::RouteAuth::Key {
        consumers: vec!["partner".into()],
    };
    let mut cfg = config(vec![keyed]);
    cfg.access_log = Some(log.clone());
    cfg.api_keys = crate::security_keys::api_keys(&[("partner", &["k1"])]);
    // The test client plays a trusted proxy, naming the client behind it.
    cfg.ip = Some(flotilla_gateway::IpConfig {
        trusted_proxies: ok(flotilla_gateway::parse_nets(&["127.0.0.0/8"]), "nets"),
        ..flotilla_gateway::IpConfig::default()
    });
    let gateway = start(cfg, &registry).await;
    let counted = || {
        metric_sum(&[
            "flotilla_gateway_requests_total",
            "route=\"/abandoned/*\"",
            "service=\"abandoned\"",
            "status_class=\"4xx\"",
        ])
    };
    let before = counted();

    // A `slow` path: the instance never answers, and the client leaves.
    let mut stream = ok(
        tokio::net::TcpStream::connect(gateway.local_addr()).await,
        "connect",
    );
    let head = "GET /abandoned/slow HTTP/1.1\r\nhost: x\r\nx-forwarded-for: 203.0.113.7\r\n\
                x-api-key: k1\r\nx-request-id: abandoned-1\r\n\r\n";
    ok(
        tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes()).await,
        "write",
    );
    wait_until("the request at its instance", || up.hits() == 1).await;
    drop(stream);

    let line = logged_line(&log, "abandoned-1").await;
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["route"], "/abandoned/*", "{line}");
    assert_eq!(line["service"], "abandoned", "{line}");
    // No instance answered it.
    assert_eq!(line["instance"], serde_json::Value::Null, "{line}");
    assert_eq!(line["client"], "203.0.113.7", "{line}");
    assert_eq!(line["user"], "partner", "{line}");
    // The trace the gateway started and sent the instance.
    let trace_id = line["trace_id"].as_str().unwrap_or_default();
    assert!(
        trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{line}"
    );
    wait_until("the 499 counted under its route", || counted() > before).await;
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn every_request_reaches_its_instance_in_a_trace() {
    let registry = Registry::new();
    let up = Upstream::start("trace-0").await;
    registry.set("trace", vec![up.endpoint()]);
    let gateway = start(config(vec![route("trace", "/t/**", &[], T)]), &registry).await;
    let client = Client::new(&gateway);
    let told = |reply: &Reply, name: &str| -> Option<String> {
        reply.json()["headers"][name].as_str().map(String::from)
    };
    let shape = |v: &str| {
        let parts: Vec<&str> = v.split('-').collect();
        parts.len() == 4
            && parts[0] == "00"
            && parts[1].len() == 32
            && parts[2].len() == 16
            && parts[3] == "01"
            && v.bytes()
                .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };

    // None given: one is started, a new trace for each request.
    let a = client.get("/t/a").await;
    let b = client.get("/t/b").await;
    let (ta, tb) = (told(&a, "traceparent"), told(&b, "traceparent"));
    assert!(ta.as_deref().is_some_and(shape), "{ta:?}");
    assert!(tb.as_deref().is_some_and(shape), "{tb:?}");
    assert_ne!(
        ta.as_deref().and_then(|t| t.get(3..35)),
        tb.as_deref().and_then(|t| t.get(3..35))
    );

    // A client's trace goes on, its state with it.
    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let kept = client
        .request(
            Method::GET,
            "/t/c",
            &[("traceparent", given), ("tracestate", "congo=t61rcWkgMzE")],
            Bytes::new(),
        )
        .await;
    assert_eq!(told(&kept, "traceparent").as_deref(), Some(given));
    assert_eq!(
        told(&kept, "tracestate").as_deref(),
        Some("congo=t61rcWkgMzE")
    );

    // A malformed one is replaced, and the state that came with it dropped.
    let replaced = client
        .request(
            Method::GET,
            "/t/d",
            &[
                (
                    "traceparent",
                    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                ),
                ("tracestate", "congo=t61rcWkgMzE"),
            ],
            Bytes::new(),
        )
        .await;
    let new = told(&replaced, "traceparent");
    assert!(new.as_deref().is_some_and(shape), "{new:?}");
    assert_eq!(told(&replaced, "tracestate"), None);
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn h2c_clients_are_proxied_over_http11() {
    let registry = Registry::new();
    let up = Upstream::start("svc-0").await;
    registry.set("svc", vec![up.endpoint()]);
    let gateway = start(config(vec![route("svc", "/svc/**", &[], T)]), &registry).await;
    let client = Client::h2c(&gateway);
    let reply = client.get("/svc/x?y=1").await;
    assert_eq!(reply.status, StatusCode::OK);
    let echo = reply.json();
    assert_eq!(echo["path"], "/svc/x?y=1");
    // HTTP/2 has no Host header; its `:authority` becomes one.
    let authority = gateway.local_addr().to_string();
    assert_eq!(echo["headers"]["host"], authority.as_str());
    assert_eq!(echo["headers"]["x-forwarded-host"], authority.as_str());
    assert!(!reply.header("x-request-id").is_empty());
    // The gateway's own refusals reach an HTTP/2 client whole too: their
    // fields are kept as a relayed response's are, not in a map.
    let refused = client.get("/nope").await;
    assert_eq!(refused.status, StatusCode::NOT_FOUND);
    assert_eq!(refused.header("content-type"), "application/json");
    assert_eq!(refused.header("server"), "flotilla");
    let id = refused.header("x-request-id");
    assert!(!id.is_empty());
    assert_eq!(refused.json()["error"]["code"], "not_found");
    assert_eq!(refused.json()["error"]["request_id"], id);
    gateway.shutdown(T).await;
}

/// An absolute-form request is for the host its target names, whatever a
/// `Host` beside it says (RFC 9112 §3.2.2): routed by it, and forwarded
/// with it, so that the instance never hears of a host the request was
/// not routed and authorised for.
#[tokio::test]
async fn an_absolute_target_s_host_is_the_one_forwarded() {
    let registry = Registry::new();
    let public = Upstream::start("public-0").await;
    let admin = Upstream::start("admin-0").await;
    registry.set("public", vec![public.endpoint()]);
    registry.set("admin", vec![admin.endpoint()]);
    let for_public = on_hosts(route("public", "/**", &[], T), &["public.example"]);
    let for_admin = on_hosts(route("admin", "/**", &[], T), &["admin.example"]);
    let gateway = start(config(vec![for_public, for_admin]), &registry).await;
    let raw = raw_request(
        gateway.local_addr(),
        "GET http://public.example/x HTTP/1.1\r\nhost: admin.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let echo: serde_json::Value = ok(serde_json::from_str(body), "echo");
    assert_eq!(echo["instance"], "public-0");
    assert_eq!(echo["path"], "/x");
    assert_eq!(echo["headers"]["host"], "public.example", "{echo}");
    assert_eq!(
        echo["headers"]["x-forwarded-host"], "public.example",
        "{echo}"
    );
    assert_eq!(admin.hits(), 0);
    // A host with userinfo names two hosts, depending on who reads it.
    for raw in [
        "GET http://admin.example@public.example/x HTTP/1.1\r\nhost: public.example\r\nconnection: close\r\n\r\n",
        "GET /x HTTP/1.1\r\nhost: admin.example@public.example\r\nconnection: close\r\n\r\n",
    ] {
        let answer = raw_request(gateway.local_addr(), raw).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{raw:?}: {answer}");
        assert!(answer.contains("userinfo"), "{answer}");
    }
    assert_eq!(public.hits() + admin.hits(), 1);
    gateway.shutdown(T).await;
}

/// Request metrics are labelled by the route's pattern (never the raw
/// path) and status class, and the latency is a Prometheus histogram
/// (`_bucket` series that replicas can add up), not a summary.
#[tokio::test]
async fn request_metrics_are_histograms_by_route_pattern_and_status_class() {
    let registry = Registry::new();
    let up = Upstream::start("hist-0").await;
    registry.set("hist", vec![up.endpoint()]);
    let gateway = start(
        config(vec![route("hist", "/hist/items/*", &[], T)]),
        &registry,
    )
    .await;
    let client = Client::new(&gateway);
    for id in ["1", "2", "3"] {
        let reply = client.get(&format!("/hist/items/{id}")).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    up.set_status(503);
    let reply = client.get("/hist/items/4").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);

    let labels =
        |class: &str| format!("route=\"/hist/items/*\",service=\"hist\",status_class=\"{class}\"");
    let ok = labels("2xx");
    // A request's metrics are recorded as its response body ends, which
    // can be just after the client has read it.
    wait_until("the four requests counted", || {
        metric_sum(&["flotilla_gateway_requests_total", &ok]) == 3
            && metric_sum(&["flotilla_gateway_requests_total", &labels("5xx")]) == 1
    })
    .await;
    assert_eq!(
        metric_sum(&["flotilla_gateway_request_duration_seconds_count", &ok]),
        3
    );
    assert_eq!(
        metric_sum(&[
            "flotilla_gateway_request_duration_seconds_bucket",
            &ok,
            "le=\"+Inf\""
        ]),
        3
    );
    let buckets = metric_lines(&["flotilla_gateway_request_duration_seconds_bucket", &ok]);
    assert!(
        buckets.iter().any(|l| l.contains("le=\"0.0005\""))
            && buckets.iter().any(|l| l.contains("le=\"60\"")),
        "{buckets:?}"
    );
    assert!(
        metric_lines(&["flotilla_gateway_request_duration_seconds{", &ok]).is_empty(),
        "a summary's quantile lines"
    );
    assert!(
        metric_lines(&["/hist/items/1"]).is_empty(),
        "a raw path as a label"
    );
    gateway.shutdown(T).await;
}

fn on_hosts(
    mut route: flotilla_gateway::RouteConfig,
    hosts: &[&str],
) -> flotilla_gateway::RouteConfig {
    route.hosts = hosts
        .iter()
        .map(|h| ok(flotilla_manifest::HostPattern::parse(h), "host"))
        .collect();
    route
}

/// The instance that answered a raw HTTP/1.1 exchange, or its status line.
fn answered_by(raw: &str) -> String {
    match raw.split("\r\n\r\n").nth(1) {
        Some(body) if raw.starts_with("HTTP/1.1 200") => {
            let echo: serde_json::Value = ok(serde_json::from_str(body), "JSON");
            echo["instance"].as_str().unwrap_or("").to_string()
        }
        _ => raw.lines().next().unwrap_or("").to_string(),
    }
}

#[tokio::test]
async fn routes_by_the_host_asked_for_over_http1_and_http2() {
    let registry = Registry::new();
    let site = Upstream::start("site-0").await;
    let wild = Upstream::start("wild-0").await;
    let any = Upstream::start("any-0").await;
    registry.set("site", vec![site.endpoint()]);
    registry.set("wild", vec![wild.endpoint()]);
    registry.set("any", vec![any.endpoint()]);
    let gateway = start(
        config(vec![
            route("any", "/**", &[], T),
            on_hosts(route("site", "/**", &[], T), &["admin.example.com"]),
            on_hosts(route("wild", "/api/**", &["GET"], T), &["*.example.com"]),
        ]),
        &registry,
    )
    .await;
    let client = Client::new(&gateway);
    for (host, method, path, instance) in [
        ("admin.example.com", Method::GET, "/api/x", "site-0"),
        // The port and the case are not part of the name.
        ("Admin.Example.COM:8443", Method::GET, "/api/x", "site-0"),
        ("shop.example.com", Method::GET, "/api/x", "wild-0"),
        // What the wildcard's route lacks falls back to any host's.
        ("shop.example.com", Method::POST, "/api/x", "any-0"),
        ("shop.example.com", Method::GET, "/index.html", "any-0"),
        ("example.com", Method::GET, "/api/x", "any-0"),
        ("127.0.0.1", Method::GET, "/api/x", "any-0"),
    ] {
        let reply = client
            .request(method.clone(), path, &[("host", host)], Bytes::new())
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{host} {method} {path}");
        assert_eq!(reply.instance(), instance, "{host} {method} {path}");
        // The instance sees the name the client asked for, untouched.
        assert_eq!(reply.json()["headers"]["host"], host, "{host}");
    }

    // An absolute-form request line names the host; `Host` is ignored then.
    let raw = raw_request(
        gateway.local_addr(),
        "GET http://admin.example.com/api/x HTTP/1.1\r\nhost: shop.example.com\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(answered_by(&raw), "site-0", "{raw}");

    // HTTP/2 names it in `:authority`.
    let tcp = ok(
        tokio::net::TcpStream::connect(gateway.local_addr()).await,
        "connect",
    );
    let (mut sender, conn) = ok(
        hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await,
        "h2c handshake",
    );
    tokio::spawn(conn);
    for (authority, instance) in [
        ("admin.example.com:80", "site-0"),
        ("shop.example.com", "wild-0"),
        ("localhost", "any-0"),
    ] {
        let req = ok(
            http::Request::builder()
                .uri(format!("http://{authority}/api/x"))
                .body(http_body_util::Empty::<Bytes>::new()),
            "request",
        );
        let res = ok(sender.send_request(req).await, "h2 request");
        assert_eq!(res.status(), StatusCode::OK, "{authority}");
        let body = ok(
            http_body_util::BodyExt::collect(res.into_body()).await,
            "body",
        )
        .to_bytes();
        let echo: serde_json::Value = ok(serde_json::from_slice(&body), "JSON");
        assert_eq!(echo["instance"], instance, "{authority}: {echo}");
    }
    gateway.shutdown(T).await;
}

fn stripping(
    mut route: flotilla_gateway::RouteConfig,
    prefix: &str,
) -> flotilla_gateway::RouteConfig {
    route.strip_prefix = Some(ok(flotilla_manifest::PathPattern::parse(prefix), "prefix"));
    route
}

#[tokio::test]
async fn strip_prefix_forwards_the_rest_of_the_path_and_names_what_it_took() {
    let registry = Registry::new();
    let legacy = Upstream::start("legacy-0").await;
    let plain = Upstream::start("plain-0").await;
    registry.set("legacy", vec![legacy.endpoint()]);
    registry.set("plain", vec![plain.endpoint()]);
    let gateway = start(
        config(vec![
            stripping(route("legacy", "/legacy/**", &[], T), "/legacy"),
            stripping(route("legacy", "/t/*/orders/**", &[], T), "/t/*"),
            route("plain", "/plain/**", &[], T),
        ]),
        &registry,
    )
    .await;
    let client = Client::new(&gateway);
    let forged = [("x-forwarded-prefix", "/evil")];
    for (path, upstream_path, prefix) in [
        (
            "/legacy/items/7?q=1&r=a%20b",
            "/items/7?q=1&r=a%20b",
            Some("/legacy"),
        ),
        ("/legacy", "/", Some("/legacy")),
        ("/legacy/", "/", Some("/legacy")),
        ("/legacy?x=1", "/?x=1", Some("/legacy")),
        ("/t/acme/orders/9", "/orders/9", Some("/t/acme")),
        // A client's own claim never reaches an instance.
        ("/plain/x", "/plain/x", None),
    ] {
        let reply = client
            .request(Method::GET, path, &forged, Bytes::new())
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        let echo = reply.json();
        assert_eq!(echo["path"], upstream_path, "{path}");
        assert_eq!(
            echo["headers"]["x-forwarded-prefix"].as_str(),
            prefix,
            "{path}: {echo}"
        );
    }
    // A client's `Connection` takes its own fields off this hop, not the
    // gateway's: the instance still learns what was taken off the path.
    let fields = [
        ("connection", "keep-alive, X-Forwarded-Prefix, x-dropped"),
        ("x-dropped", "1"),
        ("x-kept", "1"),
    ];
    let reply = client
        .request(Method::GET, "/legacy/items", &fields, Bytes::new())
        .await;
    let echo = reply.json();
    assert_eq!(echo["headers"]["x-forwarded-prefix"], "/legacy", "{echo}");
    assert!(echo["headers"].get("x-dropped").is_none(), "{echo}");
    assert_eq!(echo["headers"]["x-kept"], "1", "{echo}");
    gateway.shutdown(T).await;

    let bad = stripping(route("legacy", "/legacy/**", &[], T), "/other");
    let why = start_error(
        config(vec![bad]),
        "a strip_prefix the path does not start with",
    )
    .await;
    assert!(
        why.contains("strip_prefix `/other` is not how its path starts"),
        "{why}"
    );
}

#[tokio::test]
async fn a_mirror_gets_copies_and_the_client_only_the_route_s_answer() {
    let _places = MIRROR_PLACES.read().await;
    let registry = Registry::new();
    let live = Upstream::start("live-0").await;
    let shadow = Upstream::start("shadow-0").await;
    registry.set("live", vec![live.endpoint()]);
    registry.set("shadow", vec![shadow.endpoint()]);
    let mut mirrored = route("live", "/api/**", &[], T);
    mirrored.mirror = vec![("shadow".to_string(), 100)];
    let gateway = start(config(vec![mirrored]), &registry).await;
    let client = Client::new(&gateway);
    let sent = |result: &str| {
        metric_sum(&[
            "flotilla_gateway_mirrored_total",
            "service=\"shadow\"",
            &format!("result=\"{result}\""),
        ])
    };

    // Reads and small writes are copied, bodies included; the client sees
    // only the live service's answer, even when the shadow fails.
    shadow.set_status(500);
    let body = Bytes::from(vec![b'x'; 1000]);
    for method in [Method::GET, Method::POST, Method::PUT] {
        let reply = client
            .request(
                method.clone(),
                "/api/items",
                &[("host", "gw.example")],
                body.clone(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{method}");
        assert_eq!(reply.instance(), "live-0", "{method}");
        assert_eq!(reply.json()["body_len"], 1000, "{method}");
    }
    wait_until("the shadow got three copies", || shadow.hits() == 3).await;
    wait_until("the copies' answers were counted", || sent("answered") >= 3).await;
    assert_eq!(live.hits(), 3);
    // A copy says it is one.
    assert_eq!(shadow.hosts(), ["gw.example-shadow"; 3]);
    assert_eq!(live.hosts(), ["gw.example"; 3]);
    // An HTTP/2 request's host is its `:authority`, and so is its copy's.
    let reply = Client::h2c(&gateway).get("/api/items").await;
    assert_eq!(reply.status, StatusCode::OK);
    wait_until("the shadow got the HTTP/2 copy", || shadow.hits() == 4).await;
    // Marked on its name, before the port (an IPv6 address is left alone).
    let addr = gateway.local_addr();
    let authority = addr.to_string();
    let marked = match addr {
        std::net::SocketAddr::V4(a) => format!("{}-shadow:{}", a.ip(), a.port()),
        std::net::SocketAddr::V6(_) => authority.clone(),
    };
    assert_eq!(shadow.hosts().last(), Some(&marked));
    assert_eq!(live.hosts().last(), Some(&authority));

    // A body too large to copy goes to the live service alone, whole.
    let big = Bytes::from(vec![b'y'; 100 * 1024]);
    let reply = client.request(Method::POST, "/api/items", &[], big).await;
    assert_eq!(reply.json()["body_len"], 100 * 1024);
    assert!(sent("body_too_large") >= 1);
    assert_eq!(shadow.hits(), 4);
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn a_canary_takes_the_requests_that_carry_its_header() {
    let registry = Registry::new();
    let stable = Upstream::start("stable-0").await;
    let canary = Upstream::start("canary-0").await;
    registry.set("stable", vec![stable.endpoint()]);
    registry.set("canary", vec![canary.endpoint()]);
    let mut for_testers = route("canary", "/api/**", &[], T);
    for_testers.match_headers = vec![(
        http::HeaderName::from_static("x-canary"),
        vec![http::HeaderValue::from_static("1")],
    )];
    let gateway = start(
        config(vec![route("stable", "/api/**", &[], T), for_testers]),
        &registry,
    )
    .await;
    let client = Client::new(&gateway);
    for (fields, want) in [
        (&[][..], "stable-0"),
        (&[("x-canary", "1")][..], "canary-0"),
        (&[("x-canary", "0")][..], "stable-0"),
    ] {
        let reply = client
            .request(Method::GET, "/api/items", fields, Bytes::new())
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json()["instance"], want, "{fields:?}");
    }
    gateway.shutdown(T).await;
}
