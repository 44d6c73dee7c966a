//! Service-to-service requests over mutual TLS against plain HTTP, on the
//! same code path: a chassis client calling a chassis server (both in this
//! process), identical but for the identity files in the environment.
//!
//! Run it with `benches/mesh/run.sh` (or `cargo run --release -p
//! flotilla-chassis --example mesh-bench -- [seconds] [concurrency]`). It
//! prints, for each transport, requests/s and latency percentiles with
//! reused connections, and new connections per second (a fresh TCP
//! connection, and for mTLS a full handshake, per request); then the ratios
//! against the named baseline, `plaintext`. Rounds alternate between the
//! two so that drift on a shared machine hits both alike; the median round
//! is reported.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use flotilla_chassis::{Client, Service};
use flotilla_mesh::{Ca, CaConfig, ExpectedPeer, Identity, IdentityFiles, PolicySpec};
use serde_json::{Value, json};

const ROUNDS: usize = 3;

#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    fn files(&self, service: &str) -> IdentityFiles {
        let files = IdentityFiles::in_dir(&self.dir.path().join(service));
        self.ca
            .issue_leaf(service, Duration::from_secs(3600))
            .expect("issue")
            .write(&files)
            .expect("write");
        files
    }

    fn vars(&self, service: &str, acl: &std::path::Path) -> Vec<(String, String)> {
        let mut vars: Vec<(String, String)> = self
            .files(service)
            .env()
            .iter()
            .map(|(k, v)| (k.to_string(), v.display().to_string()))
            .collect();
        vars.push(("FLOTILLA_ACL_FILE".into(), acl.display().to_string()));
        vars
    }
}

fn base(service: &str) -> Vec<(String, String)> {
    vec![
        ("FLOTILLA_SYSTEM".into(), "bench".into()),
        ("FLOTILLA_SERVICE".into(), service.into()),
        ("FLOTILLA_LISTEN".into(), "127.0.0.1:0".into()),
    ]
}

/// Starts the callee (with `tls` vars, or plain) and returns its URL.
async fn start_callee(tls: Vec<(String, String)>, scheme: &str) -> String {
    let mut vars = base("callee");
    vars.extend(tls);
    let service = Service::from_vars(vars).expect("callee env");
    let server = service.bind().await.expect("bind");
    let url = format!("{scheme}://{}", server.local_addr());
    let app = Router::new().route(
        "/api/items/{id}",
        get(|| async {
            axum::Json(json!({"id": "sku-1", "name": "Espresso", "price_cents": 899}))
        }),
    );
    tokio::spawn(server.serve_until(app, std::future::pending()));
    url
}

fn caller(tls: Vec<(String, String)>, url: &str) -> Client {
    let mut vars = base("caller");
    vars.extend(tls);
    vars.push(("FLOTILLA_URL_CALLEE".into(), url.into()));
    Service::from_vars(vars)
        .expect("caller env")
        .client("callee")
        .expect("client")
}

/// `concurrency` loops calling through `client` for `duration`.
async fn load(client: &Client, concurrency: usize, duration: Duration) -> Figures {
    // Warm up: open the pooled connections first.
    for _ in 0..concurrency {
        let _: Value = client.get_json("/api/items/sku-1").await.expect("warm-up");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, stop) = (client.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(1 << 16);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let _: Value = client.get_json("/api/items/sku-1").await.expect("call");
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Figures {
        rps: all.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    }
}

/// New connections per second: one request per fresh connection (for mTLS
/// a full handshake each time: sessions are never resumed), sequentially.
async fn connections(url: &str, identity: Option<&Identity>, duration: Duration) -> f64 {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0);
    if let Some(identity) = identity {
        let config =
            flotilla_mesh::client_config(identity, ExpectedPeer::service("callee")).expect("tls");
        builder = builder.tls_backend_preconfigured(rustls::ClientConfig::clone(&config));
    }
    let http = builder.build().expect("client");
    let target = format!("{url}/api/items/sku-1");
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < duration {
        let r = http.get(&target).send().await.expect("request");
        assert!(r.status().is_success());
        let _ = r.bytes().await;
        n += 1;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn median(mut v: Vec<Figures>) -> Figures {
    v.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    v[v.len() / 2]
}

fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let concurrency: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(16);
    let duration = Duration::from_secs(seconds);

    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::open(dir.path().join("ca"), CaConfig::new("bench")).expect("ca");
    let pki = Pki { dir, ca };
    let mut spec = PolicySpec::new(pki.ca.id_for("callee").expect("id"));
    spec.callers = BTreeSet::from(["caller".to_string()]);
    let acl = pki.dir.path().join("acl.json");
    std::fs::write(&acl, serde_json::to_vec(&spec).expect("json")).expect("acl");

    let plain_url = start_callee(Vec::new(), "http").await;
    let mtls_url = start_callee(pki.vars("callee", &acl), "https").await;
    let plain = caller(Vec::new(), &plain_url);
    // The caller's own ACL (nobody may call it) is never consulted here.
    let caller_acl = pki.dir.path().join("caller-acl.json");
    let caller_spec = PolicySpec::new(pki.ca.id_for("caller").expect("id"));
    std::fs::write(&caller_acl, serde_json::to_vec(&caller_spec).expect("json")).expect("acl");
    let mtls = caller(pki.vars("caller", &caller_acl), &mtls_url);
    let caller_identity = Identity::load(IdentityFiles::in_dir(&pki.dir.path().join("caller")))
        .expect("caller identity");

    println!(
        "mesh bench: chassis client → chassis server, GET with a small JSON answer, {concurrency} concurrent callers, {seconds} s per measurement, {ROUNDS} rounds alternating (median shown)"
    );
    let (mut p, mut m, mut pc, mut mc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        p.push(load(&plain, concurrency, duration).await);
        m.push(load(&mtls, concurrency, duration).await);
        pc.push(connections(&plain_url, None, duration).await);
        mc.push(connections(&mtls_url, Some(&caller_identity), duration).await);
        eprintln!(
            "round {round}: plaintext {:.0} req/s, mTLS {:.0} req/s; new connections {:.0}/s vs {:.0}/s",
            p[round - 1].rps,
            m[round - 1].rps,
            pc[round - 1],
            mc[round - 1]
        );
    }
    let (p, m, pc, mc) = (median(p), median(m), median_f(pc), median_f(mc));
    println!();
    println!(
        "{:<22} {:>10} {:>9} {:>9} {:>16}",
        "transport", "req/s", "p50 ms", "p99 ms", "new conn/s"
    );
    for (name, f, c) in [("plaintext (baseline)", p, pc), ("mutual TLS 1.3", m, mc)] {
        println!(
            "{name:<22} {:>10.0} {:>9.2} {:>9.2} {:>16.0}",
            f.rps, f.p50_ms, f.p99_ms, c
        );
    }
    println!();
    println!(
        "mTLS / plaintext: throughput {:.3}x ({:+.1} %), p99 {:.2}x, new connections {:.3}x",
        m.rps / p.rps,
        (m.rps / p.rps - 1.0) * 100.0,
        m.p99_ms / p.p99_ms,
        mc / pc
    );
    let lost = (1.0 - m.rps / p.rps) * 100.0;
    println!(
        "goal: at most 10 % throughput lost on reused connections: {:.1} % lost, {}",
        lost.max(0.0),
        if lost <= 10.0 { "met" } else { "NOT met" }
    );
}
