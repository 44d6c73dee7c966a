//! The event broker as the runtime runs it: on the mesh (mutual TLS only,
//! each call checked against what the caller declared), instances told
//! where it is, and push deliveries reaching a subscriber over mTLS as the
//! `broker` identity through the service address.

use std::time::{Duration, Instant};

use flotilla_mesh::{ExpectedPeer, Identity, client_config};
use flotilla_runtime::Endpoints;
use serde_json::{Value, json};

use crate::support::{Harness, env_or_skip, environ, identity, start};

const EVENTS: &str = r#"[topics.orders]
[topics.audit]
[queues.sink]
subscribe = { topic = "orders", filter = { type = ["order.placed"] } }
deliver = { to = "sink", path = "/events/orders", timeout = "5s" }
max_receives = 3
dead_letter = "sink-dlq"
[queues.sink-dlq]
[queues.pulled]
subscribe = { topic = "orders" }
[streams.audit-log]
source = { topic = "audit" }
[services.sink]
run = { command = ["python3", "HELLO"] }
env = { PUSH_LOG = "PUSHLOG" }
[services.shop]
run = { command = ["python3", "HELLO"] }
publishes = ["orders"]
[services.reader]
run = { command = ["python3", "HELLO"] }
consumes = ["pulled"]
[services.bystander]
run = { command = ["python3", "HELLO"] }
"#;

async fn start_events(broker: &str) -> (Harness, std::path::PathBuf) {
    let log_dir = tempfile::tempdir().unwrap().keep();
    let log = log_dir.join("push.log");
    let manifest = format!(
        "{broker}\n{}",
        EVENTS.replace("PUSHLOG", &log.display().to_string())
    );
    let h = start(&manifest).await;
    (h, log)
}

/// An HTTPS client presenting `identity` that accepts only the broker.
fn as_service(identity: &Identity) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = client_config(identity, ExpectedPeer::service("broker")).unwrap();
    reqwest::Client::builder()
        .tls_backend_preconfigured(rustls::ClientConfig::clone(&config))
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn broker_url(h: &Harness) -> String {
    Endpoints::read(h.system().data_dir())
        .unwrap()
        .broker
        .expect("endpoints.json names the broker")
}

fn event(id: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "/shop", "type": "order.placed", "data": {"n": 1}})
}

async fn publish(client: &reqwest::Client, url: &str, topic: &str, id: &str) -> (u16, Value) {
    let resp = client
        .post(format!("{url}/topics/{topic}/events"))
        .header("content-type", "application/cloudevents+json")
        .body(event(id).to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn broker_var(h: &Harness, service: &str) -> Option<String> {
    let pid = h.service(service).instances[0].pid.expect("running");
    environ(pid)
        .into_iter()
        .find(|(k, _)| k == "FLOTILLA_BROKER_URL")
        .map(|(_, v)| v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_reach_only_what_they_declared_and_pushes_arrive_over_mtls() {
    let (h, log) = start_events("").await;
    declared_only_and_pushed_over_mtls(h, log).await;
}

/// The same system with `[broker] engine = "nats"`: the manifest picks the
/// engine, nothing else changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifest_can_put_the_broker_on_nats() {
    let Some(url) = env_or_skip(
        "FLOTILLA_TEST_NATS_URL",
        "set it to a NATS server with JetStream, e.g. nats://127.0.0.1:4222",
    ) else {
        return;
    };
    // A prefix of its own, so runs never see each other's streams.
    let prefix = format!("rt{}", uuid_like());
    let broker = format!("[broker]\nengine = \"nats\"\nurl = \"{url}\"\nprefix = \"{prefix}\"");
    let (h, log) = start_events(&broker).await;
    declared_only_and_pushed_over_mtls(h, log).await;
}

fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}{:x}", nanos, std::process::id())
}

async fn declared_only_and_pushed_over_mtls(h: Harness, log: std::path::PathBuf) {
    let url = broker_url(&h);

    // Who is told where the broker is: publishers, consumers, push targets.
    for s in ["shop", "reader", "sink"] {
        assert_eq!(broker_var(&h, s).as_deref(), Some(url.as_str()), "{s}");
    }
    assert_eq!(broker_var(&h, "bystander"), None);

    // Plain HTTP gets no answer at all.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let http_url = url.replacen("https://", "http://", 1);
    assert!(
        plain
            .get(format!("{http_url}/healthz"))
            .send()
            .await
            .is_err()
    );

    // The declared publisher publishes; the event is pushed to `sink`.
    let shop = as_service(&identity(&h, "shop"));
    let (status, body) = publish(&shop, &url, "orders", "e-1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["routed"], 2, "{body}");

    // Anything else is refused with the reason.
    let (status, body) = publish(&shop, &url, "audit", "e-2").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "exposure_denied");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did not declare topic `audit`"),
        "{body}"
    );
    let bystander = as_service(&identity(&h, "bystander"));
    let (status, _) = publish(&bystander, &url, "orders", "e-3").await;
    assert_eq!(status, 403);
    let receive = |client: reqwest::Client, queue: &'static str| {
        let url = url.clone();
        async move {
            client
                .post(format!("{url}/queues/{queue}/receive"))
                .body(r#"{"max_messages":10,"wait_seconds":5}"#)
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(receive(shop.clone(), "pulled").await.status(), 403);
    // Streams are fed by their topic: writing records directly is refused
    // even to the operator, who may otherwise do anything.
    let operator = as_service(&identity(&h, "operator"));
    let direct = operator
        .post(format!("{url}/streams/audit-log/records"))
        .header("content-type", "application/cloudevents+json")
        .body(event("s-1").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 403);
    let body: Value = direct.json().await.unwrap();
    assert_eq!(body["error"]["code"], "action_not_applicable", "{body}");
    assert_eq!(receive(bystander.clone(), "sink-dlq").await.status(), 403);

    // The declared consumer pulls its copy.
    let reader = as_service(&identity(&h, "reader"));
    let got: Value = receive(reader, "pulled").await.json().await.unwrap();
    assert_eq!(got["messages"][0]["event"]["id"], "e-1", "{got}");

    // The push reached `sink`, from the broker's identity.
    let until = Instant::now() + Duration::from_secs(20);
    let line = loop {
        if let Ok(text) = std::fs::read_to_string(&log)
            && let Some(line) = text.lines().next()
        {
            break serde_json::from_str::<Value>(line).unwrap();
        }
        assert!(Instant::now() < until, "no push delivery reached sink");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(line["path"], "/events/orders");
    assert_eq!(line["peer"], "spiffe://rt.flotilla/ns/local/svc/broker");
    let pushed: Value = serde_json::from_str(line["body"].as_str().unwrap()).unwrap();
    assert_eq!(pushed["id"], "e-1");

    // Depths, in-flight and dead-letter counts are Prometheus metrics on
    // the console's /metrics.
    let console = h.system().endpoints().console.clone();
    let text = plain
        .get(format!("{console}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for metric in [
        "flotilla_broker_published_total{topic=\"orders\"}",
        "flotilla_broker_queue_depth{queue=\"sink-dlq\"}",
        "flotilla_broker_queue_in_flight{queue=\"pulled\"}",
    ] {
        assert!(text.contains(metric), "{metric} missing from:\n{text}");
    }

    h.stop().await;
}

/// A subscriber that refuses with a 4xx dead-letters at once; the operator
/// sees it in the counts and redrives it, through the CLI's client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_sees_dead_letters_and_redrives_them() {
    let log_dir = tempfile::tempdir().unwrap().keep();
    let log = log_dir.join("push.log");
    let manifest = EVENTS.replace(
        r#"env = { PUSH_LOG = "PUSHLOG" }"#,
        &format!(
            r#"env = {{ PUSH_LOG = "{}", PUSH_STATUS = "400" }}"#,
            log.display()
        ),
    );
    let h = start(&manifest).await;
    let url = broker_url(&h);
    let shop = as_service(&identity(&h, "shop"));
    assert_eq!(publish(&shop, &url, "orders", "bad-1").await.0, 200);

    let control = flotilla_runtime::ControlClient::open(h.system().data_dir()).unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let dlq = control.queue_stats("sink-dlq").await.unwrap();
        if dlq.ready == 1 {
            break;
        }
        assert!(Instant::now() < until, "never dead-lettered: {dlq:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sink = control.queue_stats("sink").await.unwrap();
    assert_eq!(sink.dead_lettered, 1, "{sink:?}");
    assert_eq!(control.redrive("sink-dlq", 100).await.unwrap(), 1);
    // Back in `sink`, delivered (and refused) again.
    let until = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .count()
        < 2
    {
        assert!(
            Instant::now() < until,
            "the redriven message was not delivered again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An unknown queue is the broker's clear 404.
    let err = control.queue_stats("nope").await.unwrap_err().to_string();
    assert!(
        err.contains("404") && err.contains("unknown_queue"),
        "{err}"
    );
    h.stop().await;
}
