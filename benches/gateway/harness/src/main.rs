//! Starts a Flotilla gateway in front of one fixed upstream, for the
//! scripts in `benches/gateway` (run.sh, ab.sh, pgo.sh, ...).
//!
//! Usage: `bench_gateway --listen ADDR --upstream ADDR [--threads N]
//! [--jwt] [--rate-limit SPEC] [--cache] [--gzip] [--authz] [--upstream-tls DIR] [--tls DIR]
//! [--route PATTERN] [--access-log PATH]`, or
//! `bench_gateway --issue DIR` to create a CA and the identities of both
//! sides of an mTLS upstream hop (`DIR/gateway`, `DIR/upstream`) and exit.
//!
//! With `--upstream-tls DIR` the gateway reaches the upstream over mutual
//! TLS with the identity in `DIR`, as under `flotilla up`; the upstream
//! must present the `bench` service's identity (`bench_upstream --tls`).
//!
//! With `--cache` the route keeps responses for a minute (a route's
//! `cache`), so all but the first request of a URL are answered by the
//! gateway.
//!
//! With `--gzip` the gateway compresses responses for clients that take
//! gzip (`[gateway] compression = {}`, its defaults: level 5, JSON and
//! text of 1 kB or more).
//!
//! With `--authz` every request is first checked by `[gateway.authz]`
//! (`path_prefix = "/check"`, `Authorization` passed on), whose service is
//! the same upstream, which allows anything: the cost of one check a
//! request, as nginx's `auth_request` is measured in `authz.sh`.
//!
//! With `--route PATTERN` the one route is `PATTERN` rather than `/**`,
//! so that requests to other paths are ones no route matches (404), as
//! `instructions.sh` counts them with `UNMATCHED=1`.
//!
//! With `--access-log PATH` every request gets a line in the file at `PATH`
//! (`[gateway] access_log`, as `flotilla up` always writes one).
//!
//! With `--tls DIR` clients connect over HTTPS, with the certificate
//! `DIR/cert.pem` and its key `DIR/key.pem` (`[gateway.tls]`).
//!
//! With `--jwt`, every route needs a token: the program makes an Ed25519
//! key, serves its JWKS itself (on another port), and prints a valid
//! long-lived token as `token: <jwt>`. It prints `listening: <addr>` once
//! the gateway accepts connections.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use flotilla_gateway::{
    ActivateFuture, Config, Endpoint, Gateway, JwksSource, JwtConfig, Limits, Load, RateLimit,
    RouteAuth, RouteConfig, Upstreams,
};
use flotilla_manifest::PathPattern;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use ring::signature::{Ed25519KeyPair, KeyPair};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The allocator the `flotilla` binary uses, so the figures are the
/// gateway's as shipped.
#[global_allocator]
static GLOBAL: flotilla_alloc::Allocator = flotilla_alloc::Allocator;

struct Fixed(Arc<[Endpoint]>);

impl Upstreams for Fixed {
    fn ready(&self, _service: &str) -> Arc<[Endpoint]> {
        Arc::clone(&self.0)
    }

    fn activate(&self, _service: &str) -> ActivateFuture {
        Box::pin(async { Ok(()) })
    }
}

struct Args {
    upstream_tls: Option<std::path::PathBuf>,
    tls: Option<std::path::PathBuf>,
    listen: SocketAddr,
    upstream: SocketAddr,
    threads: usize,
    jwt: bool,
    rate_limit: Option<String>,
    cache: bool,
    gzip: bool,
    authz: bool,
    route: String,
    access_log: Option<std::path::PathBuf>,
}

fn args() -> Result<Args, BoxError> {
    let mut listen = None;
    let mut upstream = None;
    let mut threads = 2;
    let mut jwt = false;
    let mut rate_limit = None;
    let mut cache = false;
    let mut gzip = false;
    let mut authz = false;
    let mut upstream_tls = None;
    let mut tls = None;
    let mut route = "/**".to_owned();
    let mut access_log = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--listen" => listen = Some(it.next().ok_or("--listen ADDR")?.parse()?),
            "--upstream" => upstream = Some(it.next().ok_or("--upstream ADDR")?.parse()?),
            "--threads" => threads = it.next().ok_or("--threads N")?.parse()?,
            "--jwt" => jwt = true,
            "--rate-limit" => rate_limit = Some(it.next().ok_or("--rate-limit SPEC")?),
            "--cache" => cache = true,
            "--gzip" => gzip = true,
            "--authz" => authz = true,
            "--route" => route = it.next().ok_or("--route PATTERN")?,
            "--access-log" => access_log = Some(it.next().ok_or("--access-log PATH")?.into()),
            "--upstream-tls" => upstream_tls = Some(it.next().ok_or("--upstream-tls DIR")?.into()),
            "--tls" => tls = Some(it.next().ok_or("--tls DIR")?.into()),
            "--issue" => {
                issue(std::path::Path::new(&it.next().ok_or("--issue DIR")?))?;
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(Args {
        upstream_tls,
        tls,
        listen: listen.ok_or("--listen is required")?,
        upstream: upstream.ok_or("--upstream is required")?,
        threads,
        jwt,
        rate_limit,
        cache,
        gzip,
        authz,
        route,
        access_log,
    })
}

/// Serves `doc` on 127.0.0.1:0; returns its URL.
async fn serve_jwks(doc: String) -> Result<String, BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/jwks.json", listener.local_addr()?);
    let doc = Bytes::from(doc);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let doc = doc.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    let doc = doc.clone();
                    async move { Ok::<_, Infallible>(Response::new(Full::new(doc))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(url)
}

/// A CA and the two leaves of the gateway → upstream hop.
fn issue(dir: &std::path::Path) -> Result<(), BoxError> {
    let ca = flotilla_mesh::Ca::open(dir.join("ca"), flotilla_mesh::CaConfig::new("bench"))?;
    for (service, sub) in [("gateway", "gateway"), ("bench", "upstream")] {
        let leaf = ca.issue_leaf(service, Duration::from_secs(24 * 3600))?;
        leaf.write(&flotilla_mesh::IdentityFiles::in_dir(&dir.join(sub)))?;
    }
    Ok(())
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

async fn run(args: Args) -> Result<(), BoxError> {
    let mut route = RouteConfig::new("bench", PathPattern::parse(&args.route)?);
    route.timeout = Duration::from_secs(10);
    let mut config = Config {
        listen: args.listen,
        routes: Vec::new(),
        static_dir: None,
        access_log: args.access_log.clone(),
        limits: Limits {
            workers: args.threads.max(1),
            ..Limits::default()
        },
        jwt: Vec::new(),
        cors: None,
        ip: None,
        rate_limit_backend: Default::default(),
        upstream_tls: args
            .upstream_tls
            .as_deref()
            .map(flotilla_gateway::UpstreamTls::in_dir),
        tls: args
            .tls
            .as_deref()
            .map(|dir| flotilla_gateway::TlsConfig::new(dir.join("cert.pem"), dir.join("key.pem"))),
        request_headers: Default::default(),
        response_headers: Default::default(),
        compression: args.gzip.then(|| {
            flotilla_gateway::CompressionConfig::from_manifest(
                &flotilla_manifest::Compression::default(),
            )
        }),
        cache: Default::default(),
        api_keys: None,
        authz: None,
    };
    if args.jwt {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| e.to_string())?;
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| e.to_string())?;
        let jwks = serde_json::json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": "bench",
            "x": b64(key.public_key().as_ref()),
        }]});
        let url = serve_jwks(jwks.to_string()).await?;
        config.jwt = vec![JwtConfig::new(
            "bench",
            vec!["bench".into()],
            JwksSource::parse(&url)?,
        )];
        route.auth = RouteAuth::jwt();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let header = serde_json::json!({"alg": "EdDSA", "kid": "bench", "typ": "JWT"});
        let claims = serde_json::json!({
            "sub": "bench-user", "iss": "bench", "aud": "bench",
            "iat": now, "exp": now + 3600, "scope": "bench",
        });
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = key.sign(input.as_bytes());
        println!("token: {input}.{}", b64(sig.as_ref()));
    }
    if let Some(spec) = &args.rate_limit {
        route.rate_limits = vec![RateLimit::parse(spec)?];
    }
    if args.cache {
        route.cache = Some(flotilla_manifest::RouteCache {
            ttl: Duration::from_secs(60),
            stale_if_error: Duration::ZERO,
            stale_while_revalidate: Duration::ZERO,
            query: None,
        });
    }
    if args.authz {
        config.authz = Some(flotilla_manifest::Authz {
            service: "bench".into(),
            path_prefix: "/check".into(),
            timeout: Duration::from_secs(1),
            request_headers: vec!["authorization".into()],
            upstream_headers: Vec::new(),
            failure_open: false,
        });
        route.authz = true;
    }
    config.routes.push(route);
    let endpoint = Endpoint {
        instance: "bench-0".into(),
        addr: args.upstream,
        load: Arc::new(Load::default()),
    };
    let gateway = Gateway::start(config, Arc::new(Fixed(Arc::from(vec![endpoint])))).await?;
    println!("listening: {}", gateway.local_addr());
    tokio::signal::ctrl_c().await?;
    gateway.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let args = args()?;
    // The Prometheus recorder `flotilla up` installs, with its upkeep, so
    // that recording the gateway's metrics costs here what it costs there.
    flotilla_gateway::prometheus_recorder();
    // The gateway serves on `--threads` worker threads of its own; this
    // runtime only accepts and runs the background tasks.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}
