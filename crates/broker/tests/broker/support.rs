//! Test harness: engines under test, temp dirs kept on failure, unique
//! names, condition polling with deadlines, and a tiny HTTP client.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotilla_broker::config::{Config, EmbeddedConfig, EngineConfig, NatsConfig};
use flotilla_broker::engine::{Delivery, Engine, ReceiveRequest};
use flotilla_broker::{Broker, CloudEvent, Durability};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub const NATS_ENV: &str = "FLOTILLA_TEST_NATS_URL";

/// One rule for every crate's tests (`flotilla-testenv`).
pub use flotilla_testenv::env_or_skip;

/// Which engine a conformance test runs against.
#[derive(Debug, Clone)]
pub enum Kind {
    Embedded,
    Nats(String),
}

impl Kind {
    /// The NATS engine, or `None` (after [`skip`]) when no server is set.
    pub fn nats() -> Option<Self> {
        env_or_skip(
            NATS_ENV,
            "set it to a NATS server with JetStream, e.g. nats://127.0.0.1:4222",
        )
        .map(Self::Nats)
    }

    pub fn is_nats(&self) -> bool {
        matches!(self, Self::Nats(_))
    }
}

/// A temp dir that is deleted on success and kept (and printed) when the
/// test panics.
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
    pub path: PathBuf,
}

impl Scratch {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-broker-test-")
            .tempdir()
            .expect("create temp dir");
        let path = dir.path().to_owned();
        Self {
            dir: Some(dir),
            path,
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(d) = self.dir.take()
        {
            eprintln!("test failed; state kept in {}", d.keep().display());
        }
    }
}

/// A name no other test or earlier run uses (NATS streams outlive tests).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// An opened broker on one engine.
pub struct Env {
    pub broker: Broker,
    pub engine: Arc<dyn Engine>,
    /// Kept for its drop: deleted on success, kept on failure.
    _scratch: Scratch,
    /// NATS server and the prefix of this test's streams, to delete them.
    nats: Option<(String, String)>,
}

pub fn engine_config(kind: &Kind, scratch: &Scratch) -> EngineConfig {
    match kind {
        Kind::Embedded => EngineConfig::Embedded(EmbeddedConfig {
            dir: scratch.path.join("data"),
            durability: Durability::Always,
            ..EmbeddedConfig::default()
        }),
        Kind::Nats(url) => EngineConfig::Nats(NatsConfig {
            url: url.clone(),
            prefix: unique("t"),
            replicas: 1,
        }),
    }
}

impl Env {
    pub async fn start(kind: &Kind, build: impl FnOnce(&mut Config)) -> Self {
        let scratch = Scratch::new();
        let mut config = Config {
            engine: engine_config(kind, &scratch),
            ..Config::default()
        };
        build(&mut config);
        let nats = match (&config.engine, kind) {
            (EngineConfig::Nats(n), Kind::Nats(url)) => Some((url.clone(), n.prefix.clone())),
            _ => None,
        };
        let broker = Broker::open(config).await.expect("open broker");
        Self {
            engine: broker.engine(),
            broker,
            _scratch: scratch,
            nats,
        }
    }

    /// Serves the HTTP API on a random port.
    pub async fn serve(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let broker = self.broker.clone();
        tokio::spawn(async move { broker.serve(listener).await });
        addr
    }

    /// Closes the broker and removes the test's NATS streams.
    pub async fn close(self) {
        self.broker.close().await;
        if let Some((url, prefix)) = &self.nats {
            let Ok(client) = async_nats::connect(url.as_str()).await else {
                return;
            };
            let js = async_nats::jetstream::new(client);
            let mut names = js.stream_names();
            let mut mine = Vec::new();
            while let Some(Ok(name)) = names.next().await {
                if name.starts_with(&format!("{prefix}_")) {
                    mine.push(name);
                }
            }
            for name in mine {
                let _ = js.delete_stream(&name).await;
            }
        }
    }
}

/// Polls `check` until it returns `Some`, failing after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        // Polling cadence, not synchronisation: the condition decides.
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

pub fn event(id: &str, ty: &str, ext: &[(&str, &str)]) -> CloudEvent {
    CloudEvent::new(
        id,
        "/tests",
        ty,
        ext,
        &serde_json::json!({ "id": id, "pad": "x".repeat(64) }),
    )
    .expect("valid event")
}

/// Five messages of FIFO groups `A` and `B` (their `partitionkey`),
/// interleaved: a1 b1 a2 b2 a3.
pub fn two_groups() -> Vec<flotilla_broker::engine::OutgoingMessage> {
    [
        ("a1", "A"),
        ("b1", "B"),
        ("a2", "A"),
        ("b2", "B"),
        ("a3", "A"),
    ]
    .into_iter()
    .map(|(id, group)| event(id, "t", &[("partitionkey", group)]).into())
    .collect()
}

pub fn event_id(bytes: &Bytes) -> String {
    let v: serde_json::Value = serde_json::from_slice(bytes).expect("event json");
    v["id"].as_str().expect("id").to_owned()
}

/// Receives until `n` deliveries arrived (or the deadline passes).
pub async fn receive_n(
    engine: &dyn Engine,
    queue: &str,
    n: usize,
    visibility: Duration,
) -> Vec<Delivery> {
    let mut got = Vec::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(15);
    while got.len() < n {
        assert!(
            tokio::time::Instant::now() < end,
            "only {} of {n} messages arrived on {queue}",
            got.len()
        );
        let batch = engine
            .receive(
                queue,
                ReceiveRequest {
                    max_messages: (n - got.len()).min(10),
                    wait: Duration::from_secs(2),
                    visibility_timeout: Some(visibility),
                    one_per_group: false,
                },
            )
            .await
            .expect("receive");
        got.extend(batch);
    }
    got
}

/// Receives with a long poll of `window`: used to observe that nothing is
/// deliverable during that time.
pub async fn receive_window(engine: &dyn Engine, queue: &str, window: Duration) -> Vec<Delivery> {
    engine
        .receive(
            queue,
            ReceiveRequest {
                max_messages: 10,
                wait: window,
                visibility_timeout: None,
                one_per_group: false,
            },
        )
        .await
        .expect("receive")
}

pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{addr}"),
        }
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: impl Into<Bytes>,
    ) -> (u16, serde_json::Value) {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", content_type)
            .body(Full::new(body.into()))
            .expect("request");
        self.send(req).await
    }

    async fn send(&self, req: http::Request<Full<Bytes>>) -> (u16, serde_json::Value) {
        let resp = self.client.request(req).await.expect("http call");
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let json = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
            })
        };
        (status, json)
    }

    /// A call with extra headers (binary-mode CloudEvents).
    pub async fn call_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> (u16, serde_json::Value) {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into())).expect("request");
        self.send(req).await
    }

    pub async fn json(
        &self,
        method: &str,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        self.call(method, path, "application/json", body.to_string())
            .await
    }
}

/// Runs a conformance check against both engines: `embedded` always, `nats`
/// when `FLOTILLA_TEST_NATS_URL` is set.
#[macro_export]
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn embedded() {
                    super::$name($crate::support::Kind::Embedded).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn nats() {
                    if let Some(kind) = $crate::support::Kind::nats() {
                        super::$name(kind).await
                    }
                }
            }
        )*
    };
}
