//! Serving and calling over mutual TLS with an ACL: who may call what, the
//! 403, metrics, audit mode, path tricks, user headers, refused peers,
//! stalled handshakes, and damaged identity or ACL files.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Extension, Request};
use axum::routing::any;
use flotilla_chassis::{Caller, Error, Service};
use flotilla_mesh::acl::{Effect, GatewaySpec, RouteSpec, RuleSpec};
use flotilla_mesh::{
    Ca, CaConfig, ExpectedPeer, Identity, IdentityFiles, Mode, PolicySpec, SpiffeId, client_config,
    connect_with_timeout,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::support::{Running, http, start_with};

/// A CA for system `test` and the identities and ACLs of a few services.
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::open(dir.path().join("ca"), CaConfig::new("test")).unwrap();
        Pki { dir, ca }
    }

    fn files(&self, service: &str) -> IdentityFiles {
        let files = IdentityFiles::in_dir(&self.dir.path().join(service));
        if !files.cert.exists() {
            self.ca
                .issue_leaf(service, Duration::from_secs(3600))
                .unwrap()
                .write(&files)
                .unwrap();
        }
        files
    }

    fn identity(&self, service: &str) -> Identity {
        Identity::load(self.files(service)).unwrap()
    }

    fn id(&self, service: &str) -> SpiffeId {
        self.ca.id_for(service).unwrap()
    }

    /// catalog's ACL: orders calls it (but not its admin paths), the
    /// gateway may GET its products, the runtime its health paths.
    fn catalog_acl(&self, mode: Mode) -> PathBuf {
        let mut spec = PolicySpec::new(self.id("catalog"));
        spec.mode = mode;
        spec.callers = BTreeSet::from(["orders".to_string()]);
        spec.gateway = Some(GatewaySpec {
            identity: self.id("gateway"),
            routes: vec![RouteSpec {
                path: "/api/catalog/products/**".into(),
                methods: vec!["GET".into(), "HEAD".into()],
            }],
        });
        spec.runtime = Some(self.id("runtime"));
        spec.rules = vec![RuleSpec {
            caller: "orders".into(),
            path: "/api/catalog/admin/**".into(),
            methods: vec![],
            effect: Effect::Deny,
        }];
        let path = self.dir.path().join(format!("catalog-acl-{mode:?}.json"));
        std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();
        path
    }

    /// The runtime-contract variables of `service` with `acl`.
    fn env(&self, service: &str, acl: &std::path::Path) -> Vec<(String, String)> {
        let files = self.files(service);
        let mut env: Vec<(String, String)> = files
            .env()
            .iter()
            .map(|(k, v)| (k.to_string(), v.display().to_string()))
            .collect();
        env.push(("FLOTILLA_ACL_FILE".into(), acl.display().to_string()));
        env
    }
}

/// Echoes who called, on which path, with which user header.
fn echo() -> Router {
    Router::new().route(
        "/api/{*rest}",
        any(
            |Extension(caller): Extension<Caller>, request: Request| async move {
                let user = request
                    .headers()
                    .get("x-flotilla-user-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                axum::Json(json!({
                    "caller": caller.0.to_string(),
                    "path": request.uri().path(),
                    "query": request.uri().query(),
                    "user": user,
                }))
            },
        ),
    )
}

async fn serve(pki: &Pki, acl: &std::path::Path, handshake: Duration) -> Running {
    let env = pki.env("catalog", acl);
    let vars: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    start_with("catalog", &vars, echo(), move |s| {
        s.with_handshake_timeout(handshake)
    })
    .await
}

/// A request written by hand over mutual TLS as `identity` (reqwest would
/// clean up the paths the tests want to send as they are); the status and
/// body, or why there was none.
async fn raw(
    identity: &Identity,
    running: &Running,
    method: &str,
    target: &str,
    headers: &str,
) -> Result<(u16, String), String> {
    let connector = TlsConnector::from(
        client_config(identity, ExpectedPeer::service("catalog")).map_err(|e| e.to_string())?,
    );
    let tcp = tokio::net::TcpStream::connect(running.addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut tls, _) = connect_with_timeout(
        &connector,
        ServerName::from(running.addr.ip()),
        tcp,
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| flotilla_mesh::tls::error_chain(&e))?;
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: catalog\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    match tls.read_to_end(&mut answer).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !answer.is_empty() => {}
        Err(e) => return Err(e.to_string()),
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

async fn get(identity: &Identity, running: &Running, target: &str) -> (u16, Value) {
    let (status, body) = raw(identity, running, "GET", target, "").await.unwrap();
    // Chunked or not, the JSON is the body's one object.
    let json = body
        .find('{')
        .and_then(|start| body.rfind('}').map(|end| &body[start..=end]))
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

fn counter(metrics: &str, name: &str, caller: &str) -> u64 {
    metrics
        .lines()
        .find(|l| {
            l.starts_with(name)
                && l.contains(&format!("caller=\"{caller}\""))
                && l.contains("callee=\"catalog\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test]
async fn the_acl_decides_who_may_call_what() {
    let pki = Pki::new();
    let acl = pki.catalog_acl(Mode::Enforce);
    let running = serve(&pki, &acl, Duration::from_secs(10)).await;
    let (orders, gateway, runtime, pricing) = (
        pki.identity("orders"),
        pki.identity("gateway"),
        pki.identity("runtime"),
        pki.identity("pricing"),
    );

    // A declared caller: anything but its denied paths; its forged user
    // header is removed, and the handler sees who called.
    let (status, body) = raw(
        &orders,
        &running,
        "POST",
        "/api/catalog/products?x=1",
        "x-flotilla-user-id: mallory\r\n",
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(body.trim()).unwrap_or(Value::Null);
    assert_eq!(body["caller"], pki.id("orders").to_string());
    assert_eq!(body["user"], Value::Null, "forged user header stripped");
    assert_eq!(body["query"], "x=1");

    // The gateway: its routes only, and its user headers are believed.
    let (status, body) = raw(
        &gateway,
        &running,
        "GET",
        "/api/catalog/products/sku-1",
        "x-flotilla-user-id: alice\r\n",
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"user\":\"alice\""), "{body}");
    let (status, _) = raw(&gateway, &running, "POST", "/api/catalog/products/x", "")
        .await
        .unwrap();
    assert_eq!(status, 403, "POST is not a gateway route");
    let (status, _) = get(&gateway, &running, "/api/catalog/stock").await;
    assert_eq!(status, 403, "not a gateway route");

    // Nobody else: 403 acl_denied, counted, and the runtime reads the count
    // on /metrics (which nobody else may).
    let denied_before = {
        let (status, body) = raw(&runtime, &running, "GET", "/metrics", "")
            .await
            .unwrap();
        assert_eq!(status, 200);
        counter(&body, "flotilla_authz_denied_total", "pricing")
    };
    let (status, body) = get(&pricing, &running, "/api/catalog/products").await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "acl_denied");
    assert_eq!(body["error"]["details"]["reason"], "no_matching_rule");
    assert_eq!(
        body["error"]["details"]["caller"],
        pki.id("pricing").to_string()
    );
    let (_, metrics) = raw(&runtime, &running, "GET", "/metrics", "")
        .await
        .unwrap();
    assert_eq!(
        counter(&metrics, "flotilla_authz_denied_total", "pricing"),
        denied_before + 1,
        "{metrics}"
    );
    assert!(
        metrics.contains("flotilla_cert_expiry_timestamp_seconds{service=\"catalog\"}"),
        "{metrics}"
    );
    let (status, _) = get(&pricing, &running, "/metrics").await;
    assert_eq!(status, 403, "only the runtime reads metrics");
    let (status, _) = get(&runtime, &running, "/readyz").await;
    assert_eq!(status, 200);
    let (status, _) = get(&runtime, &running, "/api/catalog/products").await;
    assert_eq!(status, 403, "the runtime reaches health paths only");

    running.stop().await.unwrap();
}

#[tokio::test]
async fn path_tricks_cannot_slip_past_a_rule() {
    let pki = Pki::new();
    let acl = pki.catalog_acl(Mode::Enforce);
    let running = serve(&pki, &acl, Duration::from_secs(10)).await;
    let orders = pki.identity("orders");

    let (status, _) = get(&orders, &running, "/api/catalog/admin/users").await;
    assert_eq!(status, 403, "the plain spelling is denied");
    for trick in [
        "/api/catalog//admin/users",
        "/api/catalog/./admin/users",
        "/api/catalog/products/../admin/users",
        "/api/catalog/products/%2e%2e/admin/users",
        "/api/catalog/products/%2E%2E/admin/users",
        "/api/catalog/%61dmin/users",
        "/api/catalog/ADMIN/users",
        "/api/catalog/Admin/users?x=1",
        "/api/catalog/admin%2Fusers",
        "/api/catalog/admin\\users",
    ] {
        let (status, body) = get(&orders, &running, trick).await;
        assert_eq!(status, 403, "{trick} got through: {body}");
        assert_eq!(body["error"]["code"], "acl_denied", "{trick}: {body}");
    }
    // What is allowed is served on the path that was checked.
    let (status, body) = get(&orders, &running, "/api/catalog//products/./sku-1?q=a").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["path"], "/api/catalog/products/sku-1");
    assert_eq!(body["query"], "q=a");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn audit_mode_logs_and_lets_through() {
    let pki = Pki::new();
    let acl = pki.catalog_acl(Mode::Audit);
    let running = serve(&pki, &acl, Duration::from_secs(10)).await;
    let (pricing, runtime) = (pki.identity("pricing"), pki.identity("runtime"));
    let (_, before) = raw(&runtime, &running, "GET", "/metrics", "")
        .await
        .unwrap();
    let before = counter(&before, "flotilla_authz_audit_would_deny_total", "pricing");
    let (status, body) = get(&pricing, &running, "/api/catalog/products").await;
    assert_eq!(status, 200, "audit mode lets it through: {body}");
    assert_eq!(body["caller"], pki.id("pricing").to_string());
    let (_, after) = raw(&runtime, &running, "GET", "/metrics", "")
        .await
        .unwrap();
    assert_eq!(
        counter(&after, "flotilla_authz_audit_would_deny_total", "pricing"),
        before + 1,
        "{after}"
    );
    running.stop().await.unwrap();
}

#[tokio::test]
async fn plaintext_foreign_and_stalled_peers_are_refused() {
    let pki = Pki::new();
    let acl = pki.catalog_acl(Mode::Enforce);
    let running = serve(&pki, &acl, Duration::from_millis(300)).await;

    // Plaintext.
    let mut tcp = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    assert!(!answer.starts_with(b"HTTP/"), "plaintext was answered");

    // A certificate of another CA for the same system and service name,
    // held by a client that trusts the real CA: so the server's check of
    // the client is what refuses it, not the client's of the server.
    let foreign = Pki::new();
    let files = foreign.files("orders");
    pki.ca.write_bundle(&files).unwrap();
    let outcome = raw(
        &Identity::load(files).unwrap(),
        &running,
        "GET",
        "/api/catalog/products",
        "",
    )
    .await;
    let refused = outcome.expect_err("foreign CA served");
    assert!(
        refused.contains("alert"),
        "refused by the client itself: {refused}"
    );

    // Stalled handshakes: held only until the deadline, and the slots are
    // freed (a real peer is served afterwards).
    let started = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..20 {
        stalled.push(tokio::net::TcpStream::connect(running.addr).await.unwrap());
    }
    for mut s in stalled {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "a stalled handshake was not closed: {read:?}"
        );
    }
    // Not a measure of speed: twenty deadlines of 300 ms, run side by
    // side, are over long before this; the bound only catches them held
    // far longer in all (one after another with a longer deadline, say),
    // with room for a loaded machine.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "{took:?}");
    let (status, _) = get(&pki.identity("orders"), &running, "/api/catalog/products").await;
    assert_eq!(status, 200);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn the_client_presents_its_identity_and_checks_the_dependency() {
    let pki = Pki::new();
    let acl = pki.catalog_acl(Mode::Enforce);
    let running = serve(&pki, &acl, Duration::from_secs(10)).await;
    let url = format!("https://{}", running.addr);
    let orders_acl = pki.dir.path().join("orders-acl.json");
    std::fs::write(
        &orders_acl,
        serde_json::to_vec(&PolicySpec::new(pki.id("orders"))).unwrap(),
    )
    .unwrap();
    let mut vars = pki.env("orders", &orders_acl);
    vars.extend([
        ("FLOTILLA_SERVICE".to_string(), "orders".to_string()),
        ("FLOTILLA_SYSTEM".to_string(), "test".to_string()),
        ("FLOTILLA_URL_CATALOG".to_string(), url.clone()),
        ("FLOTILLA_URL_PRICING".to_string(), url.clone()),
    ]);
    let orders = Service::from_vars(vars).unwrap();
    assert_eq!(orders.identity(), Some(pki.id("orders")));

    // The dependency it meant: served, as orders.
    let catalog = orders.client("catalog").unwrap();
    let body: Value = catalog.get_json("/api/catalog/products").await.unwrap();
    assert_eq!(body["caller"], pki.id("orders").to_string());
    // Reused connections: many calls, one handshake's worth of time.
    for _ in 0..20 {
        let _: Value = catalog.get_json("/api/catalog/products").await.unwrap();
    }

    // An address that leads to another service: refused before sending.
    let pricing = orders.client("pricing").unwrap();
    let err = pricing
        .get_json::<Value>("/api/catalog/products")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
    let chain = flotilla_chassis::error_chain(&err);
    assert!(
        chain.contains("UnexpectedPeer") && chain.contains("svc/pricing"),
        "{chain}"
    );
    running.stop().await.unwrap();
}

#[test]
fn damaged_identity_and_acl_files_are_clear_errors() {
    let pki = Pki::new();
    let acl = pki.catalog_acl(Mode::Enforce);
    let base = || {
        let mut vars = pki.env("catalog", &acl);
        vars.push(("FLOTILLA_SERVICE".into(), "catalog".into()));
        vars
    };
    let start = |vars: Vec<(String, String)>| match Service::from_vars(vars) {
        Ok(_) => panic!("started with damaged files"),
        Err(e) => flotilla_chassis::error_chain(&e),
    };

    // A truncated certificate.
    let files = pki.files("catalog");
    let cert = std::fs::read_to_string(&files.cert).unwrap();
    let damaged = pki.dir.path().join("damaged.crt");
    std::fs::write(&damaged, &cert[..cert.len() / 3]).unwrap();
    let mut vars = base();
    vars.retain(|(k, _)| k != "FLOTILLA_TLS_CERT");
    vars.push(("FLOTILLA_TLS_CERT".into(), damaged.display().to_string()));
    let err = start(vars);
    assert!(err.contains("FLOTILLA_TLS_CERT"), "{err}");
    assert!(err.contains(&damaged.display().to_string()), "{err}");

    // An ACL that is not JSON, and one for another service.
    let bad = pki.dir.path().join("bad-acl.json");
    std::fs::write(&bad, "{not json").unwrap();
    let mut vars = base();
    vars.retain(|(k, _)| k != "FLOTILLA_ACL_FILE");
    vars.push(("FLOTILLA_ACL_FILE".into(), bad.display().to_string()));
    let err = start(vars);
    assert!(err.contains("is not an ACL the runtime wrote"), "{err}");
    let other = pki.dir.path().join("other-acl.json");
    std::fs::write(
        &other,
        serde_json::to_vec(&PolicySpec::new(pki.id("orders"))).unwrap(),
    )
    .unwrap();
    let mut vars = base();
    vars.retain(|(k, _)| k != "FLOTILLA_ACL_FILE");
    vars.push(("FLOTILLA_ACL_FILE".into(), other.display().to_string()));
    let err = start(vars);
    assert!(
        err.contains("protects spiffe://test.flotilla/ns/local/svc/orders"),
        "{err}"
    );

    // Identity without an ACL.
    let mut vars = base();
    vars.retain(|(k, _)| k != "FLOTILLA_ACL_FILE");
    let err = start(vars);
    assert!(err.contains("FLOTILLA_ACL_FILE is not set"), "{err}");
}

#[tokio::test]
async fn plain_http_without_an_identity() {
    let app = Router::new().route("/x", axum::routing::get(|| async { "ok" }));
    let running = start_with("catalog", &[], app, |s| s).await;
    let body = http()
        .get(running.url("/x"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "ok");
    running.stop().await.unwrap();
}
