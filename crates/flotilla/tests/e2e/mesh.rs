//! The shop on its zero-trust mesh: every hop mutual TLS, every call
//! checked against the ACL the manifest implies. Raw clients present the
//! identities the runtime wrote into the data dir, the way an attacker who
//! stole one would.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use flotilla_mesh::{
    Ca, CaConfig, ExpectedPeer, Identity, IdentityFiles, client_config, connect_with_timeout,
};
use flotilla_testkit::{MeshMode, System};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::support::{client, shop_manifest, sign_in};

/// The identity the runtime issued to `name` (an instance or `runtime`).
fn identity_of(system: &System, name: &str) -> Identity {
    Identity::load(IdentityFiles::in_dir(
        &system.data_dir().join("run").join(name),
    ))
    .unwrap()
}

/// The address of an instance of `service`.
fn instance(system: &System, service: &str) -> String {
    let endpoints = flotilla_runtime::Endpoints::read(system.data_dir()).unwrap();
    endpoints.services[service].instances[0]
        .address
        .trim_start_matches("https://")
        .to_string()
}

/// One request written by hand over mutual TLS (reqwest would tidy the
/// paths these tests send on purpose): status and body.
async fn call(
    identity: &Identity,
    service: &str,
    addr: &str,
    method: &str,
    target: &str,
) -> Result<(u16, String), String> {
    call_with(identity, service, addr, method, target, "").await
}

/// [`call`] with extra header lines (`"name: value\r\n"`).
async fn call_with(
    identity: &Identity,
    service: &str,
    addr: &str,
    method: &str,
    target: &str,
    headers: &str,
) -> Result<(u16, String), String> {
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {service}\r\n{headers}Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    let text = exchange(identity, service, addr, &request).await?;
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .filter(|_| text.starts_with("HTTP/1."))
        .ok_or_else(|| format!("not an HTTP answer: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Writes `request` as it is over mutual TLS and reads until the server
/// closes the connection (within 10 s): everything it answered.
async fn exchange(
    identity: &Identity,
    service: &str,
    addr: &str,
    request: &str,
) -> Result<String, String> {
    let connector = TlsConnector::from(
        client_config(identity, ExpectedPeer::service(service)).map_err(|e| e.to_string())?,
    );
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let ip = tcp.peer_addr().map_err(|e| e.to_string())?.ip();
    let (mut tls, _) = connect_with_timeout(
        &connector,
        ServerName::from(ip),
        tcp,
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| flotilla_mesh::tls::error_chain(&e))?;
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await {
        Err(_) => {
            return Err(format!(
                "not closed within 10 s; answered so far: {:?}",
                String::from_utf8_lossy(&answer)
            ));
        }
        Ok(Ok(_)) => {}
        // Python's ssl closes without close_notify.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof && !answer.is_empty() => {}
        Ok(Err(e)) => return Err(e.to_string()),
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// `MAX_CONNECTIONS` of the reviews service, from its source.
fn reviews_connection_cap() -> usize {
    let app = shop_manifest().with_file_name("services/reviews/app.py");
    std::fs::read_to_string(&app)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MAX_CONNECTIONS = "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `MAX_CONNECTIONS = N` in {}", app.display()))
}

fn json_of(body: &str) -> Value {
    body.find('{')
        .and_then(|s| body.rfind('}').map(|e| &body[s..=e]))
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or(Value::Null)
}

/// The value of `name{caller="…",callee="…"}` in Prometheus text.
fn counter(metrics: &str, name: &str, caller: &str, callee: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .find(|l| {
            l.contains(&format!("caller=\"{caller}\""))
                && l.contains(&format!("callee=\"{callee}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

async fn metrics_of(system: &System, service: &str) -> String {
    let runtime = identity_of(system, "runtime");
    let (status, body) = call(
        &runtime,
        service,
        &instance(system, service),
        "GET",
        "/metrics",
    )
    .await
    .unwrap();
    assert_eq!(
        status, 200,
        "the runtime reads /metrics of {service}: {body}"
    );
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_runs_on_mutual_tls_and_its_acls() {
    let system = System::start(shop_manifest()).await.expect("shop starts");
    let http = client();

    // Gateway → catalog → reviews (Python, through its L4 address): the
    // product page carries its reviews.
    let page: Value = http
        .get(system.url("/api/catalog/products/sku-espresso"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["id"], "sku-espresso");
    assert!(
        page["reviews"]["count"].as_u64().unwrap_or(0) >= 2,
        "reviews from the Python service: {page}"
    );
    // Through the gateway to reviews directly, whose route keeps answers
    // for 30 s: the second read is the gateway's.
    let mut tag = String::new();
    for want in ["fwd=uri-miss", "hit"] {
        let read = http
            .get(system.url("/api/reviews/sku-kettle"))
            .send()
            .await
            .unwrap();
        let said = read.headers()["cache-status"].to_str().unwrap_or("");
        assert!(said.contains(want), "{want}: {said}");
        tag = read.headers()["etag"].to_str().unwrap_or("").to_string();
    }
    // The service tags the list from its index: a conditional request
    // that passes the cache by is answered 304 by the service itself (as
    // the gateway's own revalidation of a stale copy is).
    let unchanged = http
        .get(system.url("/api/reviews/sku-kettle"))
        .header("cache-control", "no-cache")
        .header("if-none-match", &tag)
        .send()
        .await
        .unwrap();
    assert_eq!(unchanged.status(), 304, "{tag}");
    let said = unchanged.headers()["cache-status"].to_str().unwrap_or("");
    assert!(said.contains("fwd=request; fwd-status=304"), "{said}");
    // Only a signed-in user reviews.
    let review = json!({"author": "e2e", "rating": 4, "text": "Pours well."});
    let anonymous = http
        .post(system.url("/api/reviews/sku-kettle"))
        .json(&review)
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    // Write one, read it back: the write, by its own route, dropped the
    // list the reading route keeps.
    let token = sign_in(&http, system.gateway_url(), "reviewer@example.com").await;
    let posted = http
        .post(system.url("/api/reviews/sku-kettle"))
        .bearer_auth(&token)
        .json(&review)
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 201);
    let read = http
        .get(system.url("/api/reviews/sku-kettle"))
        .send()
        .await
        .unwrap();
    let said = read.headers()["cache-status"].to_str().unwrap_or("");
    assert!(said.contains("fwd=uri-miss"), "{said}");
    assert_ne!(
        read.headers()["etag"].to_str().unwrap_or(""),
        tag,
        "a new tag"
    );
    let list: Value = read.json().await.unwrap();
    assert!(
        list["reviews"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["text"] == "Pours well."),
        "{list}"
    );
    // A second review by the same user replaces the first.
    let again = http
        .post(system.url("/api/reviews/sku-kettle"))
        .bearer_auth(&token)
        .json(&json!({"author": "e2e", "rating": 5, "text": "Pours very well."}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 201);
    let list: Value = http
        .get(system.url("/api/reviews/sku-kettle"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let texts: Vec<&Value> = list["reviews"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["text"])
        .collect();
    assert!(texts.contains(&&json!("Pours very well.")), "{list}");
    assert!(!texts.contains(&&json!("Pours well.")), "{list}");
    let bad = http
        .post(system.url("/api/reviews/sku-kettle"))
        .bearer_auth(&token)
        .json(&json!({"author": "e2e", "rating": 9, "text": ""}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    // JSON may escape half a UTF-16 pair alone, which no UTF-8 text (the
    // database's) can hold: each such field is named in a 400, not a 500.
    let lone = http
        .post(system.url("/api/reviews/sku-kettle"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(r#"{"author": "e2e \ud800", "rating": 4, "text": "Pours \udfffwell."}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(lone.status(), 400);
    let lone: Value = lone.json().await.unwrap();
    assert_eq!(lone["error"]["code"], "invalid_request", "{lone}");
    let named: Vec<&Value> = lone["error"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| &f["field"])
        .collect();
    assert_eq!(named, [&json!("author"), &json!("text")], "{lone}");
    // Reviews asks the catalog (Python to Rust, over mutual TLS) whether
    // the product exists: no review of what the shop does not sell. (By
    // another user: the first has spent the route's burst of 5 a minute.)
    let other = sign_in(&http, system.gateway_url(), "second-reviewer@example.com").await;
    let unknown = http
        .post(system.url("/api/reviews/sku-no-such-thing"))
        .bearer_auth(&other)
        .json(&review)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let unknown: Value = unknown.json().await.unwrap();
    assert_eq!(unknown["error"]["code"], "unknown_product", "{unknown}");

    // A stolen identity calling where the manifest says it may not: the
    // catalog's certificate to orders (catalog does not call orders).
    let catalog = identity_of(&system, "catalog-0");
    let orders_addr = instance(&system, "orders");
    let before = counter(
        &metrics_of(&system, "orders").await,
        "flotilla_authz_denied_total",
        "catalog",
        "orders",
    );
    let (status, body) = call(&catalog, "orders", &orders_addr, "GET", "/api/orders")
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert_eq!(json_of(&body)["error"]["code"], "acl_denied", "{body}");
    let after = counter(
        &metrics_of(&system, "orders").await,
        "flotilla_authz_denied_total",
        "catalog",
        "orders",
    );
    assert_eq!(after, before + 1, "the denial is counted on orders");

    // The same in the Python service: orders may not call reviews, and
    // catalog may only read them.
    let orders = identity_of(&system, "orders-0");
    let reviews_addr = instance(&system, "reviews");
    let (status, body) = call(
        &orders,
        "reviews",
        &reviews_addr,
        "GET",
        "/api/reviews/sku-mug",
    )
    .await
    .unwrap();
    assert_eq!(status, 403, "{body}");
    assert_eq!(json_of(&body)["error"]["code"], "acl_denied");
    let (status, _) = call(
        &catalog,
        "reviews",
        &reviews_addr,
        "GET",
        "/api/reviews/sku-mug",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let (status, body) = call(
        &catalog,
        "reviews",
        &reviews_addr,
        "POST",
        "/api/reviews/sku-mug",
    )
    .await
    .unwrap();
    assert_eq!(status, 403, "catalog may only read reviews: {body}");
    // A request's framing is checked before anything else: a
    // Content-Length that is not a number of bytes is a 400 that closes
    // the connection, whoever sends it and whatever they may do.
    let gateway = identity_of(&system, "gateway");
    for (who, identity, request) in [
        (
            "catalog",
            &catalog,
            "GET /api/reviews/sku-mug HTTP/1.1\r\nHost: reviews\r\nContent-Length: abc\r\n\r\n",
        ),
        // Read as -1, it would be read to the end of the stream, which the
        // client keeps open for the answer.
        (
            "gateway",
            &gateway,
            "POST /api/reviews/sku-mug HTTP/1.1\r\nHost: reviews\r\nx-flotilla-user-id: e2e-framing\r\nContent-Type: application/json\r\nContent-Length: -1\r\n\r\n{}",
        ),
    ] {
        let answer = exchange(identity, "reviews", &reviews_addr, request)
            .await
            .unwrap_or_else(|e| panic!("{who}: {request:?}: {e}"));
        assert!(
            answer.starts_with("HTTP/1.1 400 "),
            "{who}: {request:?}: {answer:?}"
        );
        assert_eq!(json_of(&answer)["error"]["code"], "bad_request", "{answer}");
    }
    // A chunked body (which http.server does not read) on a GET is not
    // taken for the next request on the connection: the answer closes it.
    let answer = exchange(
        &catalog,
        "reviews",
        &reviews_addr,
        "GET /api/reviews/sku-mug HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_default();
    assert!(head.starts_with("HTTP/1.1 200 "), "{answer:?}");
    assert!(
        head.to_ascii_lowercase().contains("\r\nconnection: close"),
        "{answer:?}"
    );
    // Read as a request, the chunk would be answered too (an HTTP/0.9
    // error page, after the JSON).
    assert!(
        serde_json::from_str::<Value>(body).is_ok(),
        "one answer and nothing after it: {answer:?}"
    );
    let reviews_metrics = metrics_of(&system, "reviews").await;
    assert!(
        counter(
            &reviews_metrics,
            "flotilla_authz_denied_total",
            "orders",
            "reviews"
        ) >= 1,
        "{reviews_metrics}"
    );

    // Path tricks cannot take orders (allowed GET /api/catalog/**) outside
    // the catalog's API, nor can encodings hide an escape.
    let catalog_addr = instance(&system, "catalog");
    let (status, _) = call(
        &orders,
        "catalog",
        &catalog_addr,
        "GET",
        "/api/catalog//products/./sku-mug",
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "a messy spelling of an allowed path is served");
    for trick in [
        "/api/catalog/../../metrics",
        "/api/catalog/%2e%2e/%2e%2e/metrics",
        "/api/catalog/products/%2E%2E/%2E%2E/%2E%2E/openapi.json",
        "/api/catalog%2F..%2F..%2Fmetrics",
    ] {
        let (status, body) = call(&orders, "catalog", &catalog_addr, "GET", trick)
            .await
            .unwrap();
        assert_eq!(status, 403, "{trick}: {body}");
        assert_eq!(json_of(&body)["error"]["code"], "acl_denied", "{trick}");
    }
    let (status, _) = call(
        &orders,
        "catalog",
        &catalog_addr,
        "POST",
        "/api/catalog/products",
    )
    .await
    .unwrap();
    assert_eq!(status, 403, "orders only reads the catalog");

    // Plaintext and a foreign CA's certificate are refused at the door.
    let mut tcp = tokio::net::TcpStream::connect(&catalog_addr).await.unwrap();
    tcp.write_all(b"GET /api/catalog/products HTTP/1.1\r\nHost: c\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    assert!(!answer.starts_with(b"HTTP/"), "plaintext was answered");
    let foreign_dir = tempfile::tempdir().unwrap();
    let foreign_ca = Ca::open(foreign_dir.path().join("ca"), CaConfig::new("shop")).unwrap();
    let files = IdentityFiles::in_dir(&foreign_dir.path().join("orders"));
    foreign_ca
        .issue_leaf("orders", Duration::from_secs(600))
        .unwrap()
        .write(&files)
        .unwrap();
    let foreign = Identity::load(files).unwrap();
    for (service, addr) in [("catalog", &catalog_addr), ("reviews", &reviews_addr)] {
        let outcome = call(&foreign, service, addr, "GET", "/healthz").await;
        assert!(
            outcome.is_err(),
            "{service} served a foreign CA: {outcome:?}"
        );
    }

    // Silent peers past reviews' cap on connections (a thread each) wait
    // in the backlog instead of each taking a thread. Their handshake
    // deadline (10 s) closes those accepted together; those past the cap
    // would only be accepted then, and closed 10 s later.
    let cap = reviews_connection_cap();
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
    let mut silent = Vec::new();
    for _ in 0..cap + 20 {
        let mut tcp = tokio::net::TcpStream::connect(&reviews_addr).await.unwrap();
        let closed_tx = closed_tx.clone();
        silent.push(tokio::spawn(async move {
            // End of stream or a reset: the server closed it.
            let _ = tcp.read(&mut [0; 1]).await;
            let _ = closed_tx.send(tokio::time::Instant::now());
        }));
    }
    let first = tokio::time::timeout(Duration::from_secs(30), closed.recv())
        .await
        .expect("the handshake deadline closes silent connections")
        .unwrap();
    // Everything closed within half a deadline of the first was accepted
    // in the same round, and so held a thread at the same time.
    let mut round = 1;
    while let Ok(Some(_)) =
        tokio::time::timeout_at(first + Duration::from_secs(5), closed.recv()).await
    {
        round += 1;
    }
    assert!(
        round <= cap,
        "{round} silent connections held at once; the cap is {cap}"
    );
    // The waiting ones give up; their slots come free and a real caller
    // is served at once, not after another handshake deadline.
    for peer in &silent {
        peer.abort();
    }
    let runtime = identity_of(&system, "runtime");
    let (status, body) = call(&runtime, "reviews", &reviews_addr, "GET", "/healthz")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_lets_a_would_be_denial_through_and_logs_it() {
    let system = System::builder(shop_manifest())
        .mesh_mode(MeshMode::Audit)
        .start()
        .await
        .expect("shop starts");
    let catalog = identity_of(&system, "catalog-0");
    let (status, body) = call(
        &catalog,
        "orders",
        &instance(&system, "orders"),
        "GET",
        "/api/orders",
    )
    .await
    .unwrap();
    // Past the ACL: whatever orders itself answers, not the 403.
    assert_ne!(status, 403, "audit mode lets it through: {body}");
    assert_ne!(json_of(&body)["error"]["code"], "acl_denied", "{body}");
    let metrics = metrics_of(&system, "orders").await;
    assert!(
        counter(
            &metrics,
            "flotilla_authz_audit_would_deny_total",
            "catalog",
            "orders"
        ) >= 1,
        "{metrics}"
    );
    let log = std::fs::read_to_string(system.data_dir().join("logs/orders-0.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("acl audit: would deny") && l.contains("svc/catalog")),
        "the decision log names the caller:\n{log}"
    );
    system.stop().await;
}

/// Certificates that live five seconds, renewed at 3.5 s, under steady
/// traffic over every kind of hop: gateway → Rust and Python services
/// (and to accounts for its signing keys), orders → catalog and pricing (a
/// function), catalog → reviews.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_traffic_with_no_failure_and_no_restart() {
    let system = System::builder(shop_manifest())
        .leaf_lifetime(Duration::from_secs(5))
        .start()
        .await
        .expect("shop starts");
    let restarts_before: u64 = system.status().services.iter().map(|s| s.restarts).sum();
    let token = sign_in(&client(), system.gateway_url(), "rotation@example.com").await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for n in 0..3 {
        let (stop, ok, failures, http) = (stop.clone(), ok.clone(), failures.clone(), client());
        let gateway = system.gateway_url().to_string();
        let token = token.clone();
        workers.push(tokio::spawn(async move {
            // Orders are rate limited per user (10/s): place 5 a second.
            let mut pace = tokio::time::interval(Duration::from_millis(200));
            while !stop.load(Ordering::Relaxed) {
                if n == 1 {
                    pace.tick().await;
                }
                let outcome = match n {
                    0 => http
                        .get(format!("{gateway}/api/catalog/products/sku-espresso"))
                        .send()
                        .await
                        .map(|r| (r.status().as_u16(), 200)),
                    1 => http
                        .post(format!("{gateway}/api/orders"))
                        .bearer_auth(&token)
                        .json(&json!({"items": [{"sku": "sku-mug", "quantity": 1}], "payment": {"card": "4242 4242 4242 4242"}}))
                        .send()
                        .await
                        .map(|r| (r.status().as_u16(), 201)),
                    _ => http
                        .get(format!("{gateway}/api/reviews/sku-espresso"))
                        .send()
                        .await
                        .map(|r| (r.status().as_u16(), 200)),
                };
                match outcome {
                    Ok((got, want)) if got == want => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok((got, _)) => failures.lock().unwrap().push(format!("worker {n}: {got}")),
                    Err(e) => failures.lock().unwrap().push(format!("worker {n}: {e}")),
                }
            }
        }));
    }
    // Until the leaf has been renewed twice and the first one has expired:
    // from then on every new handshake proves the renewed files were
    // loaded on both sides.
    let cert = system.data_dir().join("run/catalog-0/tls.crt");
    let mut last = std::fs::read(&cert).unwrap();
    let mut renewals = 0;
    let started = std::time::Instant::now();
    while renewals < 2 || started.elapsed() < Duration::from_secs(8) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "renewed {renewals} times in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = std::fs::read(&cert).unwrap_or_default();
        if !now.is_empty() && now != last {
            renewals += 1;
            last = now;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, the first: {:?}",
        failures.len(),
        failures.len() + ok.load(Ordering::Relaxed),
        &failures[..failures.len().min(20)]
    );
    assert!(ok.load(Ordering::Relaxed) > 30, "traffic flowed");
    let restarts_after: u64 = system.status().services.iter().map(|s| s.restarts).sum();
    assert_eq!(restarts_after, restarts_before, "no instance restarted");
    // Every catalog replica still presents a valid certificate.
    let runtime = identity_of(&system, "runtime");
    let (status, _) = call(
        &runtime,
        "catalog",
        &instance(&system, "catalog"),
        "GET",
        "/readyz",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    system.stop().await;
}

/// `[gateway.authz]` under `flotilla up`: the gateway asks a policy
/// service of the system over the mesh (mutual TLS, the ACL the manifest
/// implies lets the gateway in under the check's prefix only) before a
/// request of an `authz` route goes on, and the policy's answer decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authz_route_goes_on_only_when_the_policy_service_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let hello = flotilla_testkit::hello_py().display().to_string();
    let manifest = dir.path().join("flotilla.toml");
    std::fs::write(
        &manifest,
        format!(
            r#"name = "authz"
[gateway.authz]
service = "policy"
path_prefix = "/check"
upstream_headers = ["x-tenant"]

[services.hello]
run = {{ command = ["python3", "{hello}"] }}
routes = [{{ path = "/api/**", authz = true }}, {{ path = "/public/**" }}]

[services.policy]
run = {{ command = ["python3", "{hello}"] }}
env = {{ POLICY = "1" }}
"#
        ),
    )
    .unwrap();
    let system = System::start(&manifest).await.expect("system starts");
    let http = client();
    let get = |path: &str, token: Option<&str>| {
        let mut req = http.get(system.url(path)).header("x-tenant", "evil");
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req.send()
    };
    let allowed = get("/api/things", Some("let-me-in")).await.unwrap();
    assert_eq!(allowed.status(), 200);
    let body: Value = allowed.json().await.unwrap();
    assert_eq!(
        body["tenant"], "acme",
        "the check's word, not the client's: {body}"
    );
    assert!(
        body["peer"]
            .as_str()
            .is_some_and(|p| p.ends_with("/svc/gateway")),
        "{body}"
    );
    let refused = get("/api/things", Some("guess")).await.unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(
        refused.headers()["www-authenticate"],
        "Bearer realm=\"policy\""
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "who are you?");
    // A route without `authz` is not checked.
    let public = get("/public/page", None).await.unwrap();
    assert_eq!(public.status(), 200);
    // The policy is asked only by the gateway: none of its paths is a
    // route.
    let direct = get("/check/api/things", Some("let-me-in")).await.unwrap();
    assert_eq!(
        direct.status(),
        404,
        "the policy service has no route of its own"
    );
    system.stop().await;
}
