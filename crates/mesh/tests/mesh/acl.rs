//! ACL decisions: default deny, `calls`, gateway routes, runtime paths,
//! most-specific-wins, audit mode, normalisation attacks, the 403 and its
//! metric and log line, and the whole thing behind real mTLS.

use std::io::Write;
use std::sync::{Arc, Mutex};

use flotilla_mesh::acl::{
    DENIED_METRIC, Effect, GatewaySpec, Mode, ReasonCode, RouteSpec, RuleSpec,
};
use flotilla_mesh::{ExpectedPeer, Policy, PolicySpec};
use http::Method;

use crate::support::{Handler, Scratch, Server, call, id};

fn rule(caller: &str, methods: &[&str], path: &str, effect: Effect) -> RuleSpec {
    RuleSpec {
        caller: caller.into(),
        path: path.into(),
        methods: methods.iter().map(|m| m.to_string()).collect(),
        effect,
    }
}

/// `catalog`, called by `orders` (everything but `/admin/**`) and `cart`
/// (only what its rules allow), exposed at `/api/catalog/**` for `GET` by
/// the gateway, checked by the runtime.
fn catalog_spec(rules_reversed: bool) -> PolicySpec {
    let mut spec = PolicySpec::new(id("catalog"));
    spec.callers = ["orders", "cart"].map(String::from).into();
    spec.gateway = Some(GatewaySpec {
        identity: id("gateway"),
        routes: vec![RouteSpec {
            path: "/api/catalog/**".into(),
            methods: vec!["GET".into()],
        }],
    });
    spec.runtime = Some(id("runtime"));
    let mut rules = vec![
        rule("orders", &[], "/admin/**", Effect::Deny),
        rule("cart", &[], "/api/**", Effect::Allow),
        rule("cart", &[], "/api/internal/**", Effect::Deny),
        rule("cart", &["GET"], "/api/internal/status", Effect::Allow),
        rule("cart", &["POST"], "/api/items/*/reserve", Effect::Allow),
        rule("cart", &[], "/api/items/*/reserve", Effect::Deny),
        rule("gateway", &[], "/api/catalog/admin/**", Effect::Deny),
    ];
    if rules_reversed {
        rules.reverse();
    }
    spec.rules = rules;
    spec
}

fn allowed(policy: &Policy, caller: &str, method: Method, path: &str) -> bool {
    policy.decide(&id(caller), &method, path).allowed
}

#[test]
fn default_deny() {
    let empty = Policy::from_spec(&PolicySpec::new(id("catalog"))).unwrap();
    for caller in ["orders", "gateway", "runtime", "catalog"] {
        let d = empty.decide(&id(caller), &Method::GET, "/healthz");
        assert!(!d.allowed, "{caller}");
        assert_eq!(d.reason, ReasonCode::NoMatchingRule);
        assert_eq!(d.reason_code(), "no_matching_rule");
    }
    let policy = Policy::from_spec(&catalog_spec(false)).unwrap();
    // A sibling that does not declare `catalog` in its `calls`.
    assert!(!allowed(&policy, "payments", Method::GET, "/api/catalog/1"));
    assert!(!allowed(&policy, "catalog", Method::GET, "/"));
}

#[test]
fn calls_gateway_routes_and_runtime_paths() {
    let policy = Policy::from_spec(&catalog_spec(false)).unwrap();
    for (method, path) in [
        (Method::GET, "/"),
        (Method::POST, "/anything/at/all"),
        (Method::DELETE, "/api/catalog/1"),
    ] {
        let d = policy.decide(&id("orders"), &method, path);
        assert!(d.allowed, "{method} {path}");
        assert_eq!(d.reason, ReasonCode::Allowed);
        assert!(d.matched_rule.unwrap().contains("`calls` of orders"));
    }
    // The gateway: only its routes and methods.
    assert!(allowed(&policy, "gateway", Method::GET, "/api/catalog"));
    assert!(allowed(
        &policy,
        "gateway",
        Method::GET,
        "/api/catalog/items/7"
    ));
    assert!(!allowed(
        &policy,
        "gateway",
        Method::POST,
        "/api/catalog/items"
    ));
    assert!(!allowed(&policy, "gateway", Method::GET, "/api/orders"));
    assert!(!allowed(&policy, "gateway", Method::GET, "/healthz"));
    assert!(!allowed(
        &policy,
        "gateway",
        Method::GET,
        "/api/catalog/admin/x"
    ));
    // The runtime: health and metrics, read-only.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert!(allowed(&policy, "runtime", Method::GET, path), "{path}");
        assert!(allowed(&policy, "runtime", Method::HEAD, path), "{path}");
        assert!(!allowed(&policy, "runtime", Method::POST, path), "{path}");
    }
    assert!(!allowed(&policy, "runtime", Method::GET, "/api/catalog"));
    assert!(!allowed(&policy, "runtime", Method::GET, "/healthz/x"));
}

#[test]
fn the_most_specific_rule_wins_not_the_first() {
    for reversed in [false, true] {
        let policy = Policy::from_spec(&catalog_spec(reversed)).unwrap();
        let check = |method: Method, path: &str| allowed(&policy, "cart", method, path);
        assert!(check(Method::GET, "/api/items"), "{reversed}");
        assert!(!check(Method::GET, "/api/internal/secrets"), "{reversed}");
        assert!(check(Method::GET, "/api/internal/status"), "{reversed}");
        assert!(!check(Method::POST, "/api/internal/status"), "{reversed}");
        // Same pattern: the rule naming the method beats the one without.
        assert!(check(Method::POST, "/api/items/9/reserve"), "{reversed}");
        assert!(!check(Method::GET, "/api/items/9/reserve"), "{reversed}");
        // Explicit allow rules replace cart's implicit allow-everything.
        assert!(!check(Method::GET, "/other"), "{reversed}");
        let d = policy.decide(&id("cart"), &Method::GET, "/api/internal/x");
        assert_eq!(d.reason, ReasonCode::DeniedByRule);
        assert!(d.matched_rule.unwrap().contains("deny * /api/internal/**"));
    }
}

#[test]
fn normalisation_cannot_slip_past_a_rule() {
    let policy = Policy::from_spec(&catalog_spec(false)).unwrap();
    assert!(!allowed(&policy, "orders", Method::GET, "/admin"));
    for attack in [
        "/admin",
        "/admin/",
        "/admin/users",
        "//admin",
        "//admin//users",
        "/./admin",
        "/a/../admin",
        "/a/b/../../admin/users",
        "/%2e%2e/admin",
        "/a/%2e%2e/admin",
        "/a/.%2e/admin",
        "/%61dmin",
        "/%61%64%6d%69%6e/users",
        "/ADMIN",
        "/Admin/users",
        "/%41DMIN",
        "/admin%2fusers",
        "/x%2f..%2fadmin",
        "/admin\\users",
        "/..",
        "/admin?x=1",
        "/admin#x",
    ] {
        let d = policy.decide(&id("orders"), &Method::GET, attack);
        assert!(!d.allowed, "{attack} slipped past the deny rule: {d:?}");
    }
    // An allow-only caller cannot climb out of its allowed prefix either.
    for attack in [
        "/api/../admin",
        "/api/%2e%2e/admin",
        "/api/x%2f..%2f..%2fadmin",
        "/API/items",
        "/api/../../admin",
    ] {
        let d = policy.decide(&id("cart"), &Method::GET, attack);
        assert!(!d.allowed, "{attack}: {d:?}");
    }
    let d = policy.decide(&id("orders"), &Method::GET, "/admin%2fusers");
    assert_eq!(d.reason, ReasonCode::InvalidPath);
    // Dot segments are resolved whatever precedes them, and the decision
    // carries the path to serve, so the check and the handler agree.
    let d = policy.decide(&id("orders"), &Method::GET, "/admin/x=1/..");
    assert_eq!(d.path.as_deref(), Some("/admin/"));
    // A path parameter, which Java's servlet containers drop before they
    // route (`/api/..;/admin` is `/admin` to Tomcat), is no path to decide on.
    for attack in [
        "/api/..;/admin",
        "/admin;x=1/..",
        "/api;x/items",
        "/api%3B/items",
    ] {
        let d = policy.decide(&id("cart"), &Method::GET, attack);
        assert_eq!(d.reason, ReasonCode::InvalidPath, "{attack}");
        assert!(!d.allowed, "{attack}");
    }
    let d = policy.decide(&id("orders"), &Method::GET, "/a//b/./c/../%64");
    assert_eq!(d.path.as_deref(), Some("/a/b/d"));
}

/// A deny rule is not dodged by `HEAD` for `GET`, by an escape the
/// service's framework decodes, or by spelling its pattern unlike the
/// allow it carves from.
#[test]
fn deny_rules_hold_against_head_escapes_and_spelling() {
    let mut spec = PolicySpec::new(id("catalog"));
    spec.callers = ["orders"].map(String::from).into();
    spec.gateway = Some(GatewaySpec {
        identity: id("gateway"),
        routes: vec![
            RouteSpec {
                path: "/api/catalog/**".into(),
                methods: vec!["GET".into()],
            },
            RouteSpec {
                path: "/api/orders".into(),
                methods: vec![],
            },
        ],
    });
    spec.rules = vec![
        rule("gateway", &["GET"], "/api/catalog/admin/**", Effect::Deny),
        rule("gateway", &[], "/api/orders/", Effect::Deny),
        rule("orders", &["POST"], "/v1/items:purge", Effect::Deny),
        rule("orders", &[], "/users/bob@corp", Effect::Deny),
    ];
    let policy = Policy::from_spec(&spec).unwrap();
    let denied = |caller: &str, method: Method, path: &str| {
        let d = policy.decide(&id(caller), &method, path);
        assert!(!d.allowed, "{method} {path} slipped past: {d:?}");
        assert_eq!(d.reason, ReasonCode::DeniedByRule, "{method} {path}");
    };
    // `HEAD` runs the `GET` handler: a deny on `GET` is one on `HEAD`.
    denied("gateway", Method::GET, "/api/catalog/admin/export");
    denied("gateway", Method::HEAD, "/api/catalog/admin/export");
    assert!(allowed(&policy, "gateway", Method::HEAD, "/api/catalog/1"));
    // Escapes kept encoded by normalisation are decoded for deny rules.
    denied("orders", Method::POST, "/v1/items:purge");
    denied("orders", Method::POST, "/v1/items%3Apurge");
    denied("orders", Method::POST, "/v1/ITEMS%3apurge");
    denied("orders", Method::GET, "/users/bob%40corp");
    assert!(allowed(&policy, "orders", Method::POST, "/v1/items%3Alist"));
    // `/api/orders/` is `/api/orders`: the deny beats the route's allow
    // whichever way each is spelt.
    denied("gateway", Method::GET, "/api/orders");
    denied("gateway", Method::POST, "/api/orders/");
}

#[test]
fn audit_mode_lets_through_what_it_would_deny() {
    let mut spec = catalog_spec(false);
    spec.mode = Mode::Audit;
    let policy = Policy::from_spec(&spec).unwrap();
    let d = policy.decide(&id("payments"), &Method::GET, "/x");
    assert!(d.allowed);
    assert!(d.would_deny);
    assert_eq!(d.reason, ReasonCode::NoMatchingRule);
    assert_eq!(d.reason_code(), "would_deny");
    let d = policy.decide(&id("orders"), &Method::GET, "/x");
    assert!(d.allowed && !d.would_deny);
    assert_eq!(d.reason_code(), "allowed");
    // `check` lets it through too.
    assert!(policy.check(&id("payments"), &Method::GET, "/x").is_ok());
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_denial_is_a_403_counted_and_logged() {
    let policy = Policy::from_spec(&catalog_spec(false)).unwrap();
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let denied = tracing::subscriber::with_default(subscriber, || {
        metrics::with_local_recorder(&recorder, || {
            assert!(policy.check(&id("orders"), &Method::GET, "/x").is_ok());
            policy
                .check(&id("payments"), &Method::POST, "/api/x")
                .unwrap_err();
            policy
                .check(&id("payments"), &Method::POST, "/api/x")
                .unwrap_err()
        })
    });

    let response = denied.to_response();
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_str(response.body()).unwrap();
    assert_eq!(body["error"]["code"], "acl_denied");
    assert_eq!(body["error"]["details"]["reason"], "no_matching_rule");
    assert_eq!(
        body["error"]["details"]["caller"],
        "spiffe://shop.flotilla/ns/local/svc/payments"
    );

    let metrics = handle.render();
    let line = format!("{DENIED_METRIC}{{caller=\"payments\",callee=\"catalog\"}} 2");
    assert!(metrics.contains(&line), "{line} not in:\n{metrics}");

    let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let denial = log
        .lines()
        .find(|l| l.contains("acl denied"))
        .unwrap_or_else(|| panic!("no decision line in:\n{log}"));
    assert!(
        denial.contains("caller=spiffe://shop.flotilla/ns/local/svc/payments"),
        "{denial}"
    );
    assert!(
        denial.contains("callee=spiffe://shop.flotilla/ns/local/svc/catalog"),
        "{denial}"
    );
    assert!(denial.contains("reason=\"no_matching_rule\""), "{denial}");
}

/// The callee's side as the chassis will do it: the caller is the peer
/// certificate's SPIFFE id, never anything the caller says.
#[tokio::test]
async fn the_acl_applies_to_the_verified_peer() {
    let scratch = Scratch::new();
    let ca = scratch.ca("ca", "shop");
    let catalog = scratch.identity(&ca, "catalog", "catalog");
    let orders = scratch.identity(&ca, "orders", "orders");
    let payments = scratch.identity(&ca, "payments", "payments");
    let policy = Arc::new(Policy::from_spec(&catalog_spec(false)).unwrap());
    let handler: Handler = Arc::new(move |peer, line| {
        let (method, path) = line.split_once(' ').unwrap_or(("GET", line));
        let method = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
        match policy.check(peer, &method, path) {
            Ok(decision) => format!("200 {}", decision.path.unwrap_or_default()),
            Err(denied) => format!("403 {}", denied.body()),
        }
    });
    let server = Server::start(&catalog, std::time::Duration::from_secs(10), handler).await;
    let expected = || ExpectedPeer::service("catalog");

    let answer = call(&orders, expected(), server.addr, "GET /api//items/./1")
        .await
        .unwrap();
    assert_eq!(answer, "200 /api/items/1");
    let answer = call(&orders, expected(), server.addr, "GET /%61dmin")
        .await
        .unwrap();
    assert!(
        answer.starts_with("403 ") && answer.contains("acl_denied"),
        "{answer}"
    );
    let answer = call(&payments, expected(), server.addr, "GET /api/items")
        .await
        .unwrap();
    assert!(
        answer.contains("\"reason\":\"no_matching_rule\""),
        "{answer}"
    );
}
