//! Identities and mutual TLS as the runtime hands them out: per-instance
//! certificates and ACLs, mTLS through the gateway, health checks and the
//! L4 service addresses, refusal of everything else, renewal under traffic
//! without restarts, and a damaged CA reported clearly.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use flotilla_mesh::tls::error_chain;
use flotilla_mesh::{Ca, CaConfig, Identity, IdentityFiles, PolicySpec};
use flotilla_runtime::{ControlClient, Endpoints, Error, Options, System};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{
    Harness, client, environ, host_port, identity, start, start_with, tls_exchange, tls_get,
};

const TWO: &str = r#"[services.hello]
run = { command = ["python3", "HELLO"] }
routes = [{ path = "/hello/**", methods = ["GET"] }]
[services.caller]
run = { command = ["python3", "HELLO"] }
calls = ["hello"]
"#;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn instance_address(h: &Harness, service: &str) -> String {
    let endpoints = Endpoints::read(h.system().data_dir()).unwrap();
    host_port(&endpoints.services[service].instances[0].address)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_instance_gets_an_identity_an_acl_and_https_urls() {
    let h = start(TWO).await;
    let data = h.system().data_dir().to_path_buf();
    let run = data.join("run");

    // The instance's files: key 0600 in a 0700 directory, its own SPIFFE id.
    let dir = run.join("hello-0");
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("tls.key")), 0o600);
    let id = Identity::load(IdentityFiles::in_dir(&dir)).unwrap().id();
    assert_eq!(id.to_string(), "spiffe://rt.flotilla/ns/local/svc/hello");
    // The platform's own identities.
    for (dir, service) in [
        (run.join("gateway"), "gateway"),
        (run.join("runtime"), "runtime"),
        (data.join("operator"), "operator"),
    ] {
        assert_eq!(mode(&dir.join("tls.key")), 0o600, "{}", dir.display());
        let id = Identity::load(IdentityFiles::in_dir(&dir)).unwrap().id();
        assert_eq!(id.service(), service);
    }

    // The ACL the manifest implies, handed to the callee.
    let acl: PolicySpec =
        serde_json::from_slice(&std::fs::read(dir.join("acl.json")).unwrap()).unwrap();
    assert_eq!(acl.callee, id);
    assert_eq!(acl.callers.iter().collect::<Vec<_>>(), ["caller"]);
    let gateway = acl.gateway.unwrap();
    assert_eq!(gateway.identity.service(), "gateway");
    assert_eq!(gateway.routes[0].path, "/hello/**");
    assert_eq!(gateway.routes[0].methods, ["GET", "HEAD"]);
    assert_eq!(acl.runtime.unwrap().service(), "runtime");

    // The caller's environment points at its files and at https URLs.
    let caller = h.service("caller");
    let env = environ(caller.instances[0].pid.unwrap());
    let get = |k: &str| {
        env.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{k} not set: {env:?}"))
    };
    assert_eq!(
        get("FLOTILLA_URL_HELLO"),
        h.system().endpoints().services["hello"].address
    );
    assert!(get("FLOTILLA_URL_HELLO").starts_with("https://127.0.0.1:"));
    let own = run.join("caller-0");
    assert_eq!(
        get("FLOTILLA_TLS_CERT"),
        own.join("tls.crt").display().to_string()
    );
    assert_eq!(
        get("FLOTILLA_TLS_KEY"),
        own.join("tls.key").display().to_string()
    );
    assert_eq!(
        get("FLOTILLA_TLS_CA"),
        own.join("ca.crt").display().to_string()
    );
    assert_eq!(
        get("FLOTILLA_ACL_FILE"),
        own.join("acl.json").display().to_string()
    );

    // Through the gateway: the instance sees the gateway's identity.
    let r = client()
        .get(format!("{}/hello/x", h.gateway()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["peer"], "spiffe://rt.flotilla/ns/local/svc/gateway");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_and_a_stripped_prefix_reach_the_canary_as_its_acl_allows() {
    let h = start(
        r#"[services.hello]
run = { command = ["python3", "HELLO"] }
routes = [{ path = "/hello/**", methods = ["GET"], strip_prefix = "/hello", split = { canary = 100 } }]
[services.canary]
run = { command = ["python3", "HELLO"] }
"#,
    )
    .await;
    let r = client()
        .get(format!("{}/hello/x?q=1", h.gateway()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["instance"], "canary-0", "{body}");
    assert_eq!(body["path"], "/x?q=1", "{body}");
    assert_eq!(body["peer"], "spiffe://rt.flotilla/ns/local/svc/gateway");
    // Both services' ACLs let the gateway in on the path they see.
    for instance in ["hello-0", "canary-0"] {
        let acl: PolicySpec = serde_json::from_slice(
            &std::fs::read(
                h.system()
                    .data_dir()
                    .join("run")
                    .join(instance)
                    .join("acl.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let routes = acl.gateway.unwrap().routes;
        assert_eq!(routes.len(), 1, "{instance}");
        assert_eq!(routes[0].path, "/**", "{instance}");
    }
    h.stop().await;
}

/// What an instance answers a raw client that is not a peer it accepts:
/// anything but an HTTP response.
fn refused(outcome: &Result<String, String>) -> bool {
    match outcome {
        Ok(answer) => !answer.contains("HTTP/1."),
        Err(_) => true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_foreign_expired_and_wrong_identities_are_refused() {
    let h = start(TWO).await;
    let instance = instance_address(&h, "hello");
    let address = host_port(&h.system().endpoints().services["hello"].address);

    // A peer of the system is served, directly and through the L4 address.
    let caller = identity(&h, "caller");
    for addr in [&instance, &address] {
        let ok = tls_get(&caller, "hello", addr, "/x").await.unwrap();
        assert!(ok.starts_with("HTTP/1.0 200"), "{ok}");
        assert!(
            ok.contains("svc/caller"),
            "the callee sees the caller: {ok}"
        );
    }

    // Plaintext HTTP.
    for addr in [&instance, &address] {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /x HTTP/1.1\r\nHost: hello\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
        assert!(
            !answer.starts_with(b"HTTP/"),
            "plaintext got an HTTP answer: {}",
            String::from_utf8_lossy(&answer)
        );
    }

    // A certificate from another CA, even one for the same system name.
    let foreign_dir = h.dir.path().join("foreign");
    let foreign_ca = Ca::open(foreign_dir.join("ca"), CaConfig::new("rt")).unwrap();
    let files = IdentityFiles::in_dir(&foreign_dir.join("caller"));
    foreign_ca
        .issue_leaf("caller", Duration::from_secs(3600))
        .unwrap()
        .write(&files)
        .unwrap();
    let foreign = Identity::load(files).unwrap();
    let outcome = tls_get(&foreign, "hello", &instance, "/x").await;
    assert!(refused(&outcome), "foreign CA served: {outcome:?}");

    // An expired certificate from the system's own CA.
    let ca = Ca::open(h.system().data_dir().join("ca"), CaConfig::new("rt")).unwrap();
    let now = SystemTime::now();
    let files = IdentityFiles::in_dir(&h.dir.path().join("expired"));
    ca.issue_leaf_with_validity(
        "caller",
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    )
    .unwrap()
    .write(&files)
    .unwrap();
    let expired = Identity::load(files).unwrap();
    let outcome = tls_get(&expired, "hello", &instance, "/x").await;
    assert!(refused(&outcome), "expired certificate served: {outcome:?}");

    // A server that is not the service the client meant: refused by the
    // client before it sends anything.
    let err = tls_get(&caller, "caller", &instance, "/x")
        .await
        .unwrap_err();
    assert!(err.contains("expected the peer to be"), "{err}");
    assert!(err.contains("svc/hello"), "{err}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_traffic_without_restarts_or_failures() {
    let h = start_with(
        r#"[services.hello]
run = { command = ["python3", "HELLO"] }
replicas = 2
routes = [{ path = "/**" }]
"#,
        |o: &mut Options| o.leaf_lifetime = Some(Duration::from_secs(5)),
    )
    .await;
    let before = h.service("hello");
    let pids: Vec<_> = before.instances.iter().map(|i| i.pid).collect();
    let cert = h.system().data_dir().join("run/hello-0/tls.crt");
    let first = std::fs::read(&cert).unwrap();
    let address = host_port(&h.system().endpoints().services["hello"].address);
    let caller = identity(&h, "caller");

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for n in 0..3 {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        let (http, url) = (client(), format!("{}/steady", h.gateway()));
        let (caller, address) = (caller.clone(), address.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // Two workers through the gateway (gateway ↔ instance
                // certificates), one straight through the service address.
                let outcome = if n < 2 {
                    match http.get(&url).send().await {
                        Ok(r) if r.status() == 200 => Ok(()),
                        Ok(r) => Err(format!("status {}", r.status())),
                        Err(e) => Err(format!("error {e}")),
                    }
                } else {
                    match tls_get(&caller, "hello", &address, "/direct").await {
                        Ok(a) if a.starts_with("HTTP/1.0 200") => Ok(()),
                        other => Err(format!("{other:?}")),
                    }
                };
                match outcome {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.lock().unwrap().push(e),
                }
            }
        }));
    }
    // Long enough for the first certificates to have expired: every
    // handshake after that proves the renewed ones were loaded.
    let mut renewals = 0;
    let mut last = first.clone();
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(12) {
        let now = std::fs::read(&cert).unwrap_or_default();
        if !now.is_empty() && now != last {
            renewals += 1;
            last = now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {failures:?}",
        failures.len(),
        failures.len() + ok.load(Ordering::Relaxed)
    );
    assert!(ok.load(Ordering::Relaxed) > 50, "traffic flowed");
    assert!(renewals >= 2, "the leaf was renewed {renewals} times");
    let after = h.service("hello");
    assert_eq!(after.restarts, 0, "{after:?}");
    assert_eq!(
        after.instances.iter().map(|i| i.pid).collect::<Vec<_>>(),
        pids,
        "no instance restarted"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_ca_file_is_reported_by_name() {
    let h = start(TWO).await;
    let data = h.system().data_dir().to_path_buf();
    let manifest = flotilla_manifest::Manifest::load(&h.dir.path().join("flotilla.toml")).unwrap();
    let dir = h.stop_keeping_dir().await;
    let damaged = data.join("ca/gen-1/intermediate.crt");
    let text = std::fs::read_to_string(&damaged).unwrap();
    std::fs::write(&damaged, &text[..text.len() / 2]).unwrap();
    let mut options = Options::new(&data);
    options.listen = Some(([127, 0, 0, 1], 0).into());
    match System::start(manifest, options).await {
        Err(e @ Error::Mesh(_)) => {
            let chain = error_chain(&e);
            assert!(chain.contains(&damaged.display().to_string()), "{chain}");
            assert!(chain.contains("restore the CA directory"), "{chain}");
        }
        Err(e) => panic!("unexpected error: {}", error_chain(&e)),
        Ok(_) => panic!("started on a damaged CA"),
    }
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_api_answers_only_the_operator() {
    let h = start(TWO).await;
    let data = h.system().data_dir().to_path_buf();
    let endpoints = Endpoints::read(&data).unwrap();
    assert!(endpoints.control.starts_with("https://"), "{endpoints:?}");
    assert!(endpoints.console.starts_with("http://"), "{endpoints:?}");
    let control = endpoints.control.trim_start_matches("https://").to_string();

    // The CLI's way: the operator's identity from the data dir.
    let operator = ControlClient::open(&data).unwrap();
    let status = operator.status().await.unwrap();
    assert_eq!(status.system, "rt");
    // A purge of the gateway's kept responses: none kept here; a prefix
    // that is not a path is refused with why.
    let purged = operator.purge_cache("/").await.unwrap();
    assert_eq!((purged.responses, purged.bytes), (0, 0));
    let refused = operator.purge_cache("api").await.unwrap_err().to_string();
    assert!(refused.contains("invalid_prefix"), "{refused}");
    // The operator's identity without the control token changes nothing.
    let operator_id = identity(&h, "operator");
    for path in ["/v1/cache/purge", "/v1/shutdown"] {
        let body = r#"{"prefix": "/"}"#;
        let answer = tls_exchange(
            &operator_id,
            "runtime",
            &control,
            &format!(
                "POST {path} HTTP/1.1\r\nHost: runtime\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
        .await
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 401"), "{path}: {answer}");
        assert!(answer.contains("unauthorized"), "{path}: {answer}");
    }

    // Any other identity of the system is refused; so is plaintext.
    let caller = identity(&h, "caller");
    let answer = tls_get(&caller, "runtime", &control, "/v1/status")
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("operator_only"), "{answer}");
    let mut tcp = tokio::net::TcpStream::connect(&control).await.unwrap();
    tcp.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    assert!(!answer.starts_with(b"HTTP/"), "plaintext was answered");

    // Without the operator's files there is no client, and the error says
    // where they should be.
    let elsewhere = h.dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::copy(Endpoints::path(&data), Endpoints::path(&elsewhere)).unwrap();
    let err = match ControlClient::open(&elsewhere) {
        Ok(_) => panic!("a control client without the operator's identity"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("operator"), "{err}");
    assert!(err.contains(&elsewhere.display().to_string()), "{err}");

    // The console stays readable from a browser (read only).
    let page = client()
        .get(format!("{}/v1/status", endpoints.console))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    // Not from a page whose own host name was pointed at 127.0.0.1 (DNS
    // rebinding): it would read instances' log lines same-origin.
    let rebound = client()
        .get(format!("{}/v1/status", endpoints.console))
        .header("host", "rebound.example:80")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), 421);
    let shutdown = client()
        .post(format!("{}/v1/shutdown", endpoints.console))
        .send()
        .await
        .unwrap();
    assert_eq!(shutdown.status(), 404, "the console cannot stop the system");
    let purge = client()
        .post(format!("{}/v1/cache/purge", endpoints.console))
        .body(r#"{"prefix": "/"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(purge.status(), 404, "nor purge the gateway's cache");
    h.stop().await;
}

/// Any local user reaches the console, and every connection it holds is a
/// file descriptor of the process that runs the gateway: it serves 64 at
/// once, and closes one that sends no whole request head within 10 s,
/// whatever it sent (nothing at all included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_holds_64_connections_and_closes_silent_ones() {
    let h = start(TWO).await;
    let endpoints = Endpoints::read(h.system().data_dir()).unwrap();
    let console = endpoints.console.trim_start_matches("http://").to_string();

    // 64 connections that send nothing, half an HTTP/2 preface, or start
    // a request head, and never finish (std sockets: their state is read
    // below with a plain non-blocking read).
    let mut silent = Vec::new();
    for i in 0..64 {
        let mut tcp = std::net::TcpStream::connect(&console).unwrap();
        let start: &[u8] = match i % 3 {
            0 => b"",
            1 => b"PRI * HTTP/2.0\r\n",
            _ => b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        };
        std::io::Write::write_all(&mut tcp, start).unwrap();
        tcp.set_nonblocking(true).unwrap();
        silent.push(tcp);
    }
    // Whether the console has closed `tcp` (end of stream, or reset).
    let closed = |mut tcp: &std::net::TcpStream| {
        let mut buf = [0u8; 512];
        loop {
            match std::io::Read::read(&mut tcp, &mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
    };
    // A 65th with a whole request waits for one of them to go.
    let mut tcp = tokio::net::TcpStream::connect(&console).await.unwrap();
    tcp.write_all(b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), tcp.read_to_end(&mut answer))
        .await
        .expect("the 65th connection was never answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The console closed a silent one (its end of stream is here: on
    // loopback it arrives as the console closes) before it took the 65th.
    let already = silent.iter().filter(|tcp| closed(tcp)).count();
    assert!(
        already >= 1,
        "the 65th connection was served while 64 others were held"
    );
    // Every one of them is closed.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !silent.iter().all(closed) {
        assert!(
            std::time::Instant::now() < deadline,
            "silent connections left open after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.stop().await;
}
