//! Test fixtures: upstream servers whose death the test controls, a
//! registry playing the runtime, an HTTP client and polling helpers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use flotilla_gateway::{
    ActivateError, ActivateFuture, Config, Endpoint, Gateway, Limits, Load, RouteConfig, Upstreams,
};
use flotilla_manifest::PathPattern;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as LegacyClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// One rule for every crate's tests (`flotilla-testenv`).
pub use flotilla_testenv::{env_or_skip, skip};

/// Generous bound for conditions that normally hold within milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub fn ok<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e}"),
    }
}

/// Polls `cond` until it holds; panics naming `what` at the deadline.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `fut`'s output; the test fails, saying `what`, when it takes longer
/// than [`PATIENCE`].
pub async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(PATIENCE, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: not within {PATIENCE:?}"),
    }
}

/// The places of mirrored copies in flight are counted per process (the
/// gateway's 256), so they are shared by every gateway of these tests: a
/// test that needs its copies sent holds this read, and a test that takes
/// every place holds it written, alone, and frees them all before it lets
/// go.
pub static MIRROR_PLACES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A temp dir kept (and its path printed) when the test fails.
pub struct TestDir(Option<tempfile::TempDir>);

impl TestDir {
    pub fn new() -> TestDir {
        TestDir(Some(ok(tempfile::tempdir(), "temp dir")))
    }

    pub fn path(&self) -> &Path {
        match &self.0 {
            Some(d) => d.path(),
            None => Path::new("/nonexistent"),
        }
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.0.take()
        {
            eprintln!("test failed; kept {}", dir.keep().display());
        }
    }
}

// ---------------------------------------------------------------- upstreams

struct UpstreamState {
    name: String,
    hits: AtomicUsize,
    held: AtomicUsize,
    release: watch::Receiver<bool>,
    /// When not 0, every request is answered with this status.
    status: std::sync::atomic::AtomicU16,
    /// Every request is left unanswered (a hung process).
    stalled: std::sync::atomic::AtomicBool,
    /// The `Host` of every request, in arrival order.
    hosts: Mutex<Vec<String>>,
    /// The path of every request, in arrival order.
    paths: Mutex<Vec<String>>,
    /// Requests answered `304 Not Modified`.
    not_modified: AtomicUsize,
}

/// The body of an upstream's `bigbody` paths: more than any client's and
/// the kernel's buffers take unread.
pub const BIG_BODY: usize = 16 << 20;

/// An HTTP upstream on 127.0.0.1:0. Paths containing `slow` never answer;
/// paths containing `bigbody` answer [`BIG_BODY`] bytes;
/// paths containing `hold` wait for [`Upstream::release`]; anything else is
/// echoed as JSON (instance, method, path, headers, body length), with
/// each request field `x-reply-<name>` answered as a field `<name>`; paths
/// containing `forge` also carry the fields only the gateway may set
/// ([`FORGED`]). A GET whose `If-None-Match` is the `x-reply-etag` it asks
/// for (or, without one, whose `If-Modified-Since` is its
/// `x-reply-last-modified`) is answered `304 Not Modified`, and so is any
/// conditional GET with `x-not-modified-anyway` (an instance answering
/// about another response than the one asked about). Field names go out in title case (`Content-Type`), as
/// many servers write them.
pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    pub load: Arc<Load>,
    state: Arc<UpstreamState>,
    release: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        let listener = ok(TcpListener::bind("127.0.0.1:0").await, "bind upstream");
        let addr = ok(listener.local_addr(), "upstream addr");
        let (release, release_rx) = watch::channel(false);
        let state = Arc::new(UpstreamState {
            name: name.to_string(),
            hits: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            release: release_rx,
            status: std::sync::atomic::AtomicU16::new(0),
            stalled: std::sync::atomic::AtomicBool::new(false),
            hosts: Mutex::new(Vec::new()),
            paths: Mutex::new(Vec::new()),
            not_modified: AtomicUsize::new(0),
        });
        let task = tokio::spawn(serve(listener, Arc::clone(&state)));
        Upstream {
            name: name.to_string(),
            addr,
            load: Arc::new(Load::default()),
            state,
            release,
            task: Some(task),
        }
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            instance: self.name.clone(),
            addr: self.addr,
            load: Arc::clone(&self.load),
        }
    }

    /// Requests answered or being answered.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Requests it answered `304 Not Modified`.
    pub fn not_modified(&self) -> usize {
        self.state.not_modified.load(Ordering::SeqCst)
    }

    /// The `Host` of every request so far, in arrival order.
    pub fn hosts(&self) -> Vec<String> {
        self.state
            .hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The path of every request so far, in arrival order.
    pub fn paths(&self) -> Vec<String> {
        self.state
            .paths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Requests waiting in a `hold` handler.
    pub fn held(&self) -> usize {
        self.state.held.load(Ordering::SeqCst)
    }

    pub fn release(&self) {
        let _ = self.release.send(true);
    }

    /// Answers every request with `status` from now on (0: echo again).
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// Leaves every request from now on unanswered, with its connection
    /// open, as a hung process would.
    pub fn stall(&self) {
        self.state.stalled.store(true, Ordering::SeqCst);
    }

    /// Closes the listener and every open connection, as a crashed process
    /// would.
    pub async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn serve(listener: TcpListener, state: Arc<UpstreamState>) {
    // Dropped with this task on kill: aborts every connection task too.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let state = Arc::clone(&state);
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(Arc::clone(&state), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .title_case_headers(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn handle(
    state: Arc<UpstreamState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let host = req.headers().get("host").and_then(|h| h.to_str().ok());
    state
        .hosts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(host.unwrap_or_default().to_string());
    state
        .paths
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(req.uri().path().to_string());
    if state.stalled.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    let status = state.status.load(Ordering::SeqCst);
    if status != 0 {
        let mut res = Response::new(Full::new(Bytes::from_static(b"{\"error\":\"down\"}")));
        *res.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return Ok(res);
    }
    let path = req.uri().path().to_string();
    if path.contains("bigbody") {
        return Ok(Response::new(Full::new(Bytes::from(vec![b'x'; BIG_BODY]))));
    }
    if path.contains("slow") {
        std::future::pending::<()>().await;
    }
    if path.contains("hold") {
        state.held.fetch_add(1, Ordering::SeqCst);
        let mut release = state.release.clone();
        let _ = release.wait_for(|released| *released).await;
    }
    let method = req.method().to_string();
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_default();
    // How many `x-request-id` lines came: the map below keeps one.
    let request_ids = req.headers().get_all("x-request-id").iter().count();
    let headers: HashMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
        .collect();
    let reply_fields: Vec<(http::HeaderName, http::HeaderValue)> = req
        .headers()
        .iter()
        .filter_map(|(k, v)| {
            let name = k.as_str().strip_prefix("x-reply-")?;
            Some((
                http::HeaderName::from_bytes(name.as_bytes()).ok()?,
                v.clone(),
            ))
        })
        .collect();
    // A conditional GET that the validators it was told to send meet gets
    // `304 Not Modified`, with those fields and no body, as a real
    // instance's would.
    let told = |name: &str| {
        reply_fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_bytes())
    };
    let asked = |name: &str| req.headers().get(name).map(http::HeaderValue::as_bytes);
    let anyway = asked("x-not-modified-anyway").is_some()
        && (asked("if-none-match").is_some() || asked("if-modified-since").is_some());
    let unchanged = anyway
        || match asked("if-none-match") {
            Some(tags) => told("etag").is_some_and(|tag| tags == tag),
            None => {
                asked("if-modified-since").is_some_and(|since| told("last-modified") == Some(since))
            }
        };
    if unchanged {
        state.not_modified.fetch_add(1, Ordering::SeqCst);
        let mut res = Response::new(Full::new(Bytes::new()));
        *res.status_mut() = StatusCode::NOT_MODIFIED;
        for (name, value) in &reply_fields {
            res.headers_mut().append(name.clone(), value.clone());
        }
        return Ok(res);
    }
    let body_len = match req.into_body().collect().await {
        Ok(c) => c.to_bytes().len(),
        Err(_) => usize::MAX,
    };
    let json = serde_json::json!({
        "instance": state.name,
        "method": method,
        "path": path_and_query,
        "headers": headers,
        "request_ids": request_ids,
        "body_len": body_len,
    });
    let mut res = Response::new(Full::new(Bytes::from(json.to_string())));
    res.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    // What the test asks the instance to answer with: `x-reply-<name>`
    // becomes the response's `<name>`.
    for (name, value) in &reply_fields {
        res.headers_mut().append(name.clone(), value.clone());
    }
    if path.contains("forge") {
        for (name, value) in FORGED {
            res.headers_mut()
                .append(*name, http::HeaderValue::from_static(value));
        }
    }
    Ok(res)
}

/// What an upstream answers on a `forge` path besides the echo: fields the
/// gateway sets itself, which it must replace or strip, and fields of its
/// own that it must relay untouched.
pub const FORGED: &[(&str, &str)] = &[
    ("access-control-allow-origin", "*"),
    ("access-control-allow-credentials", "true"),
    ("access-control-max-age", "86400"),
    ("ratelimit", "\"default\";r=999999;t=0"),
    ("ratelimit-policy", "\"default\";q=999999;w=1"),
    ("server", "forged"),
    ("x-request-id", "forged"),
    ("vary", "Accept-Encoding"),
    ("set-cookie", "a=1"),
    ("set-cookie", "b=2"),
];

// ----------------------------------------------------------------- registry

pub type Activator = Arc<dyn Fn() -> ActivateFuture + Send + Sync>;

/// Plays the runtime: ready instances per service, set by the test, and an
/// optional activation behaviour per service.
#[derive(Default)]
pub struct Registry {
    ready: Mutex<HashMap<String, Arc<[Endpoint]>>>,
    activators: Mutex<HashMap<String, Activator>>,
    pub activations: AtomicUsize,
    /// Upstreams started by activators, kept alive with the registry.
    pub started: Mutex<Vec<Upstream>>,
}

impl Registry {
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    pub fn set(&self, service: &str, endpoints: Vec<Endpoint>) {
        let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        ready.insert(service.to_string(), endpoints.into());
    }

    pub fn on_activate(&self, service: &str, activator: Activator) {
        let mut activators = self.activators.lock().unwrap_or_else(|e| e.into_inner());
        activators.insert(service.to_string(), activator);
    }
}

impl Upstreams for Registry {
    fn ready(&self, service: &str) -> Arc<[Endpoint]> {
        let ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        ready
            .get(service)
            .cloned()
            .unwrap_or_else(|| Arc::from(Vec::new()))
    }

    fn activate(&self, service: &str) -> ActivateFuture {
        self.activations.fetch_add(1, Ordering::SeqCst);
        let activator = {
            let activators = self.activators.lock().unwrap_or_else(|e| e.into_inner());
            activators.get(service).cloned()
        };
        match activator {
            Some(activate) => activate(),
            None => {
                let service = service.to_string();
                Box::pin(async move { Err(ActivateError::UnknownService(service)) })
            }
        }
    }
}

// ------------------------------------------------------------------ gateway

pub fn route(service: &str, pattern: &str, methods: &[&str], timeout: Duration) -> RouteConfig {
    RouteConfig {
        methods: methods.iter().map(|m| m.to_string()).collect(),
        timeout,
        ..RouteConfig::new(service, ok(PathPattern::parse(pattern), "pattern"))
    }
}

pub fn config(routes: Vec<RouteConfig>) -> Config {
    Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        routes,
        static_dir: None,
        access_log: None,
        limits: Limits::default(),
        jwt: Vec::new(),
        cors: None,
        ip: None,
        rate_limit_backend: Default::default(),
        upstream_tls: None,
        tls: None,
        request_headers: Default::default(),
        response_headers: Default::default(),
        compression: None,
        cache: Default::default(),
        api_keys: None,
        authz: None,
    }
}

/// Why a gateway with `config` did not start, as `error: its source`;
/// panics, naming `why_not` (what should have stopped it), if it started.
pub async fn start_error(config: Config, why_not: &str) -> String {
    match Gateway::start(config, Registry::new()).await {
        Ok(_) => panic!("the gateway started ({why_not})"),
        Err(err) => {
            let mut chain = err.to_string();
            let mut source = std::error::Error::source(&err);
            while let Some(e) = source {
                chain.push_str(": ");
                chain.push_str(&e.to_string());
                source = e.source();
            }
            chain
        }
    }
}

/// `n` GETs of `path` sent at once, each in a task of its own: requests
/// to hold at an instance (a `hold` path) while the test looks at what
/// else the gateway does.
pub fn in_background(client: &Client, path: &'static str, n: usize) -> Vec<JoinHandle<Reply>> {
    (0..n)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.get(path).await })
        })
        .collect()
}

pub async fn start(config: Config, registry: &Arc<Registry>) -> Gateway {
    // Before any gateway counts anything: counts made with no recorder
    // installed are lost.
    metrics();
    let upstreams: Arc<dyn Upstreams> = Arc::clone(registry) as Arc<dyn Upstreams>;
    ok(Gateway::start(config, upstreams).await, "start gateway")
}

// ------------------------------------------------------------------- client

/// What a request got back.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        match serde_json::from_slice(&self.body) {
            Ok(v) => v,
            Err(e) => panic!(
                "{} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            ),
        }
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The instance an echoed request reached.
    pub fn instance(&self) -> String {
        self.json()["instance"].as_str().unwrap_or("").to_string()
    }
}

#[derive(Clone)]
pub struct Client {
    base: String,
    inner: LegacyClient<HttpConnector, Full<Bytes>>,
}

impl Client {
    pub fn new(gateway: &Gateway) -> Client {
        Client {
            base: format!("http://{}", gateway.local_addr()),
            inner: LegacyClient::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// A client speaking HTTP/2 without TLS (h2c, prior knowledge).
    pub fn h2c(gateway: &Gateway) -> Client {
        Client {
            base: format!("http://{}", gateway.local_addr()),
            inner: LegacyClient::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.request(Method::GET, path, &[], Bytes::new()).await
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Reply {
        match self.try_request(method, path, headers, body).await {
            Ok(reply) => reply,
            Err(e) => panic!("request to {path} failed: {e}"),
        }
    }

    pub async fn try_request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
        let mut builder = Request::builder().method(method).uri(self.url(path));
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let res = self.inner.request(builder.body(Full::new(body))?).await?;
        let (parts, body) = res.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// Reads from `stream` up to the end of a request head (and whatever came
/// with it); `None` if the peer closed first.
pub async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// Sends `raw` as-is over a fresh connection and returns the whole answer;
/// for requests an HTTP client would normalise (`/../x`).
pub async fn raw_request(addr: SocketAddr, raw: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = ok(tokio::net::TcpStream::connect(addr).await, "connect");
    ok(stream.write_all(raw.as_bytes()).await, "write");
    let mut out = Vec::new();
    let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut out)).await;
    ok(ok(read, "read timed out"), "read");
    String::from_utf8_lossy(&out).into_owned()
}

pub fn path_buf(dir: &TestDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

// ------------------------------------------------------------------ metrics

/// The process-wide Prometheus recorder (installed on first use), so tests
/// can read the gateway's metrics. Tests use their own service and route
/// names, so they can share it.
pub fn metrics() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    flotilla_gateway::prometheus_recorder()
}

/// The value of the counter line starting with `prefix` (name and labels
/// in the exporter's order), or 0.
pub fn counter(prefix: &str) -> u64 {
    metrics()
        .render()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Every metrics line containing all of `parts`.
pub fn metric_lines(parts: &[&str]) -> Vec<String> {
    metrics()
        .render()
        .lines()
        .filter(|l| !l.starts_with('#') && parts.iter().all(|p| l.contains(p)))
        .map(String::from)
        .collect()
}

/// The sum of every sample line containing all of `parts`.
pub fn metric_sum(parts: &[&str]) -> u64 {
    metric_lines(parts)
        .iter()
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

// --------------------------------------------------------------------- jwks

/// Serves a JWKS document the test can change, counting fetches.
pub struct JwksServer {
    pub url: String,
    doc: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl JwksServer {
    /// Over plain HTTP, at `http://127.0.0.1:<port>/jwks.json`.
    pub async fn start(doc: serde_json::Value) -> JwksServer {
        JwksServer::serve(doc, None).await
    }

    /// Over HTTPS with `cert` (`url` names 127.0.0.1; [`JwksServer::url_at`]
    /// another host name).
    pub async fn start_tls(doc: serde_json::Value, cert: &ServerCert) -> JwksServer {
        let key = ok(
            tokio_rustls::rustls::pki_types::PrivateKeyDer::try_from(cert.key_der.clone()),
            "server key",
        );
        let config = ok(
            ok(
                tokio_rustls::rustls::ServerConfig::builder_with_provider(
                    flotilla_mesh::tls::crypto_provider(),
                )
                .with_safe_default_protocol_versions(),
                "TLS versions",
            )
            .with_no_client_auth()
            .with_single_cert(vec![cert.der.clone()], key),
            "server config",
        );
        JwksServer::serve(doc, Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn serve(doc: serde_json::Value, tls: Option<tokio_rustls::TlsAcceptor>) -> JwksServer {
        let listener = ok(TcpListener::bind("127.0.0.1:0").await, "bind jwks");
        let addr = ok(listener.local_addr(), "jwks addr");
        let doc = Arc::new(Mutex::new(doc.to_string()));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (d, f) = (Arc::clone(&doc), Arc::clone(&fetches));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (d, f, tls) = (Arc::clone(&d), Arc::clone(&f), tls.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                        f.fetch_add(1, Ordering::SeqCst);
                        let body = d.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        // A client that refuses the certificate ends here.
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    }
                });
            }
        });
        JwksServer {
            url: format!("{scheme}://{addr}/jwks.json"),
            doc,
            fetches,
            task,
        }
    }

    /// `url` with `host` for 127.0.0.1 (`localhost`: a name the server's
    /// certificate may have).
    pub fn url_at(&self, host: &str) -> String {
        self.url.replacen("127.0.0.1", host, 1)
    }

    pub fn set(&self, doc: serde_json::Value) {
        *self.doc.lock().unwrap_or_else(|e| e.into_inner()) = doc.to_string();
    }

    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A server certificate and its key, and the PEM of the CA that signed it.
pub struct ServerCert {
    pub der: tokio_rustls::rustls::pki_types::CertificateDer<'static>,
    pub key_der: Vec<u8>,
    pub ca_pem: String,
}

/// A new CA named `ca_name` and a server certificate it signed for `names`
/// (DNS names, or IP addresses).
pub fn server_cert(ca_name: &str, names: &[&str]) -> ServerCert {
    let ca_key = ok(rcgen::KeyPair::generate(), "CA key");
    let mut ca = rcgen::CertificateParams::default();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ok(ca.self_signed(&ca_key), "CA certificate");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = ok(rcgen::KeyPair::generate(), "server key");
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let params = ok(rcgen::CertificateParams::new(names), "server names");
    let cert = ok(params.signed_by(&key, &issuer), "server certificate");
    ServerCert {
        der: cert.der().clone(),
        key_der: key.serialize_der(),
        ca_pem: ca_cert.pem(),
    }
}

// ------------------------------------------------------------ raw HTTP/2

/// What a client library would never send: HTTP/2 frame by frame.
pub mod h2_raw {
    use tokio::io::{AsyncRead, AsyncReadExt};

    /// The client's connection preface and an empty SETTINGS frame.
    pub fn preface() -> Vec<u8> {
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(0x4, 0, 0, &[]));
        out
    }

    /// One frame: its 9-byte header, then `payload`.
    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes();
        let mut frame = vec![len[1], len[2], len[3], kind, flags];
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    /// An HPACK field line, literal and not indexed, name and value as
    /// given (each under 127 bytes): whatever bytes they are.
    pub fn field(name: &[u8], value: &[u8]) -> Vec<u8> {
        let mut out = vec![0x00, name.len() as u8];
        out.extend_from_slice(name);
        out.push(value.len() as u8);
        out.extend_from_slice(value);
        out
    }

    /// How the server answered a stream.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Outcome {
        /// A response head, with its status when HPACK gave it plainly
        /// (a static-table status, or a literal one first).
        Answered(Option<u16>),
        /// `RST_STREAM` with this error code.
        Reset(u32),
        /// `GOAWAY` with this error code.
        GoAway(u32),
        /// The connection ended first.
        Closed,
    }

    /// A frame of the server's.
    pub struct Frame {
        pub kind: u8,
        pub stream: u32,
        pub payload: Vec<u8>,
    }

    impl Frame {
        /// The error code of a `RST_STREAM`, or of a `GOAWAY`.
        pub fn error_code(&self) -> u32 {
            let at = if self.kind == 0x7 { 4 } else { 0 };
            self.payload
                .get(at..at + 4)
                .map_or(0, |c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        }
    }

    /// The server's next frame; `None` once the connection has ended.
    pub async fn read_frame(rx: &mut (impl AsyncRead + Unpin)) -> Option<Frame> {
        let mut head = [0u8; 9];
        rx.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        rx.read_exact(&mut payload).await.ok()?;
        Some(Frame {
            kind: head[3],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
        })
    }

    /// The server's frames until stream `id` is answered or reset, or the
    /// connection goes away.
    pub async fn outcome(rx: &mut (impl AsyncRead + Unpin), id: u32) -> Outcome {
        while let Some(frame) = read_frame(rx).await {
            match frame.kind {
                0x1 if frame.stream == id => return Outcome::Answered(status(&frame.payload)),
                0x3 if frame.stream == id => return Outcome::Reset(frame.error_code()),
                0x7 => return Outcome::GoAway(frame.error_code()),
                _ => {}
            }
        }
        Outcome::Closed
    }

    fn status(block: &[u8]) -> Option<u16> {
        match *block.first()? {
            b @ 0x88..=0x8e => [200, 204, 206, 304, 400, 404, 500]
                .get(usize::from(b - 0x88))
                .copied(),
            // Literal, name `:status` (static 8), with or without indexing.
            0x48 | 0x08 => std::str::from_utf8(block.get(2..2 + usize::from(*block.get(1)?))?)
                .ok()?
                .parse()
                .ok(),
            _ => None,
        }
    }
}

// ------------------------------------------------------------------ signing

pub mod keys {
    //! Test keys, generated per run, and token minting.
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ring::rand::SystemRandom;
    use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
    use serde_json::{Value, json};

    use super::ok;

    pub fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    pub enum Key {
        Ed(Ed25519KeyPair),
        Ec(EcdsaKeyPair),
        /// The fixture key, signing with `alg` (`RS256` or `PS256`); its
        /// JWK names `alg` when `named` (some providers' keys do not).
        Rsa {
            pair: RsaKeyPair,
            alg: &'static str,
            named: bool,
        },
    }

    pub struct Signer {
        pub kid: String,
        key: Key,
    }

    impl Signer {
        pub fn ed25519(kid: &str) -> Signer {
            let rng = SystemRandom::new();
            let pkcs8 = ok(Ed25519KeyPair::generate_pkcs8(&rng), "ed25519 key");
            let pair = ok(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()), "ed25519 key");
            Signer {
                kid: kid.into(),
                key: Key::Ed(pair),
            }
        }

        pub fn p256(kid: &str) -> Signer {
            let rng = SystemRandom::new();
            let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
            let pkcs8 = ok(EcdsaKeyPair::generate_pkcs8(alg, &rng), "p256 key");
            let pair = ok(
                EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng),
                "p256 key",
            );
            Signer {
                kid: kid.into(),
                key: Key::Ec(pair),
            }
        }

        /// The tests' RSA key (`ring` makes none; see the fixture's
        /// README), signing with `alg`, `RS256` or `PS256`; `named`: whether
        /// its JWK says so.
        pub fn rsa(kid: &str, alg: &'static str, named: bool) -> Signer {
            let der = include_bytes!("../fixtures/rsa-2048-test-only.pk8.der");
            Signer {
                kid: kid.into(),
                key: Key::Rsa {
                    pair: ok(RsaKeyPair::from_pkcs8(der), "rsa key"),
                    alg,
                    named,
                },
            }
        }

        pub fn alg(&self) -> &'static str {
            match self.key {
                Key::Ed(_) => "EdDSA",
                Key::Ec(_) => "ES256",
                Key::Rsa { alg, .. } => alg,
            }
        }

        /// The public key as a JWK.
        pub fn jwk(&self) -> Value {
            match &self.key {
                Key::Ed(p) => json!({
                    "kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA",
                    "kid": self.kid, "x": b64(p.public_key().as_ref()),
                }),
                Key::Ec(p) => {
                    let point = p.public_key().as_ref();
                    json!({
                        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256",
                        "kid": self.kid, "x": b64(&point[1..33]), "y": b64(&point[33..65]),
                    })
                }
                Key::Rsa { pair, alg, named } => {
                    let parts = signature::RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
                    let mut jwk = json!({
                        "kty": "RSA", "use": "sig", "kid": self.kid,
                        "n": b64(&parts.n), "e": b64(&parts.e),
                    });
                    if *named {
                        jwk["alg"] = json!(alg);
                    }
                    jwk
                }
            }
        }

        /// The raw public key bytes (what an HMAC-confusion attacker would
        /// use as the secret).
        pub fn public_bytes(&self) -> Vec<u8> {
            match &self.key {
                Key::Ed(p) => p.public_key().as_ref().to_vec(),
                Key::Ec(p) => p.public_key().as_ref().to_vec(),
                Key::Rsa { pair, .. } => pair.public().as_ref().to_vec(),
            }
        }

        pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
            let input = format!(
                "{}.{}",
                b64(header.to_string().as_bytes()),
                b64(claims.to_string().as_bytes())
            );
            let sig = match &self.key {
                Key::Ed(p) => p.sign(input.as_bytes()).as_ref().to_vec(),
                Key::Ec(p) => ok(p.sign(&SystemRandom::new(), input.as_bytes()), "sign")
                    .as_ref()
                    .to_vec(),
                Key::Rsa { pair, alg, .. } => {
                    let padding: &dyn signature::RsaEncoding = if *alg == "PS256" {
                        &signature::RSA_PSS_SHA256
                    } else {
                        &signature::RSA_PKCS1_SHA256
                    };
                    let mut sig = vec![0; pair.public().modulus_len()];
                    ok(
                        pair.sign(padding, &SystemRandom::new(), input.as_bytes(), &mut sig),
                        "sign",
                    );
                    sig
                }
            };
            format!("{input}.{}", b64(&sig))
        }

        /// A token with this key's alg and kid.
        pub fn sign(&self, claims: &Value) -> String {
            self.sign_with_header(
                &json!({"alg": self.alg(), "kid": self.kid, "typ": "JWT"}),
                claims,
            )
        }
    }

    pub fn jwks(signers: &[&Signer]) -> Value {
        json!({"keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>()})
    }

    pub fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }
}
