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
}

/// An HTTP upstream on 127.0.0.1:0. Paths containing `slow` never answer;
/// paths containing `hold` wait for [`Upstream::release`]; anything else is
/// echoed as JSON (instance, method, path, headers, body length).
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

    /// Requests waiting in a `hold` handler.
    pub fn held(&self) -> usize {
        self.state.held.load(Ordering::SeqCst)
    }

    pub fn release(&self) {
        let _ = self.release.send(true);
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
    let path = req.uri().path().to_string();
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
    let headers: HashMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
        .collect();
    let body_len = match req.into_body().collect().await {
        Ok(c) => c.to_bytes().len(),
        Err(_) => usize::MAX,
    };
    let json = serde_json::json!({
        "instance": state.name,
        "method": method,
        "path": path_and_query,
        "headers": headers,
        "body_len": body_len,
    });
    let mut res = Response::new(Full::new(Bytes::from(json.to_string())));
    res.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    Ok(res)
}

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
        service: service.to_string(),
        pattern: ok(PathPattern::parse(pattern), "pattern"),
        methods: methods.iter().map(|m| m.to_string()).collect(),
        timeout,
    }
}

pub fn config(routes: Vec<RouteConfig>) -> Config {
    Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        routes,
        static_dir: None,
        access_log: None,
        limits: Limits::default(),
    }
}

pub async fn start(config: Config, registry: &Arc<Registry>) -> Gateway {
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
