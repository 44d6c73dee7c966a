//! Push delivery: retries with backoff, dead-lettering, trace context, and
//! per-partition order for streams.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use flotilla_broker::engine::OutgoingRecord;
use flotilla_broker::{
    FilterPolicy, PushConfig, PushSubscription, QueueConfig, StreamConfig, TopicConfig,
    config::push_queue_name,
};
use tokio::sync::mpsc;

use crate::conformance;
use crate::support::{Env, Kind, event, event_id, eventually, receive_n, two_groups};

conformance!(
    topic_push_retries_then_delivers_with_trace,
    push_dead_letters_rejections_and_exhausted_retries,
    stream_push_in_order_per_partition,
    fifo_push_keeps_each_group_in_order,
);

/// A FIFO queue's receive can hold several messages of one group; pushed
/// each in a task of its own, the second could arrive first, or succeed
/// while the first was put back to be retried. Each group's messages now
/// reach the subscriber in order, retries included, and a message waiting
/// behind its group's head is not received (and counted toward
/// `max_receives`) meanwhile. On NATS (one message in flight for the whole
/// queue) a retry waits out the queue's visibility, 2 s here, rather than
/// the push backoff: a -NAK with a delay let the next message overtake it,
/// and each receive took the whole long poll.
async fn fifo_push_keeps_each_group_in_order(kind: Kind) {
    let (addr, mut rx) = subscriber(Arc::new(|id, attempt| match (id, attempt) {
        ("a1", 1 | 2) | ("a2", 1) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::OK,
    }))
    .await;
    let env = Env::start(&kind, |c| {
        c.queues.insert(
            "orders".into(),
            QueueConfig {
                fifo: true,
                deliver: Some(push(addr)),
                visibility_timeout: Duration::from_secs(2),
                max_receives: Some(3),
                ..Default::default()
            },
        );
    })
    .await;
    env.engine.send("orders", two_groups()).await.unwrap();
    let hits = collect_until(&mut rx, "5 deliveries", |h| {
        h.iter().filter(|h| h.status == 200).count() >= 5
    })
    .await;
    let seen = |group: &str| -> Vec<String> {
        hits.iter()
            .filter(|h| h.key.as_deref() == Some(group))
            .map(|h| format!("{}:{}", h.id, h.status))
            .collect()
    };
    assert_eq!(
        seen("A"),
        ["a1:503", "a1:503", "a1:200", "a2:503", "a2:200", "a3:200"],
        "{hits:?}"
    );
    assert_eq!(seen("B"), ["b1:200", "b2:200"], "{hits:?}");
    env.close().await;
}

const TRACE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

#[derive(Debug, Clone)]
struct Hit {
    id: String,
    key: Option<String>,
    attempt: u32,
    status: u16,
    traceparent: Option<String>,
}

type Policy = Arc<dyn Fn(&str, u32) -> StatusCode + Send + Sync>;

#[derive(Clone)]
struct Sub {
    policy: Policy,
    attempts: Arc<Mutex<HashMap<String, u32>>>,
    hits: mpsc::Sender<Hit>,
}

/// A subscriber endpoint answering per `policy(event id, attempt)`.
async fn subscriber(policy: Policy) -> (SocketAddr, mpsc::Receiver<Hit>) {
    // Generous bound: tests deliver at most a few hundred events.
    let (tx, rx) = mpsc::channel(4096);
    let sub = Sub {
        policy,
        attempts: Arc::default(),
        hits: tx,
    };
    let app = axum::Router::new()
        .route("/events", axum::routing::post(hit))
        .with_state(sub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, rx)
}

async fn hit(State(sub): State<Sub>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let id = v["id"].as_str().unwrap_or("").to_owned();
    let attempt = {
        let mut a = sub.attempts.lock().unwrap();
        let n = a.entry(id.clone()).or_default();
        *n += 1;
        *n
    };
    let status = (sub.policy)(&id, attempt);
    let _ = sub.hits.try_send(Hit {
        id,
        key: v["partitionkey"].as_str().map(str::to_owned),
        attempt,
        status: status.as_u16(),
        traceparent: headers
            .get("traceparent")
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned),
    });
    status
}

fn push(addr: SocketAddr) -> PushConfig {
    PushConfig {
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        timeout: Duration::from_secs(5),
        ..PushConfig::new(format!("http://{addr}/events"))
    }
}

async fn collect_until(
    rx: &mut mpsc::Receiver<Hit>,
    what: &str,
    mut done: impl FnMut(&[Hit]) -> bool,
) -> Vec<Hit> {
    let mut hits = Vec::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done(&hits) {
        match tokio::time::timeout_at(end, rx.recv()).await {
            Ok(Some(h)) => hits.push(h),
            _ => panic!("timed out waiting for {what}; got {hits:?}"),
        }
    }
    hits
}

async fn topic_push_retries_then_delivers_with_trace(kind: Kind) {
    // Every event fails once with 503, then succeeds.
    let (addr, mut rx) = subscriber(Arc::new(|_, attempt| {
        if attempt == 1 {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        }
    }))
    .await;
    let env = Env::start(&kind, |c| {
        c.topics.insert(
            "orders".into(),
            TopicConfig {
                push: [(
                    "audit".to_owned(),
                    PushSubscription {
                        filter: FilterPolicy::types(["order.placed"]),
                        deliver: push(addr),
                        max_receives: 5,
                        dead_letter: None,
                    },
                )]
                .into(),
            },
        );
    })
    .await;
    let events: Vec<_> = (0..5)
        .map(|i| event(&format!("o{i}"), "order.placed", &[("traceparent", TRACE)]))
        .chain([event("skip", "order.shipped", &[])])
        .collect();
    env.engine.publish("orders", events).await.unwrap();
    let hits = collect_until(&mut rx, "5 deliveries", |h| {
        h.iter().filter(|h| h.status == 200).count() >= 5
    })
    .await;
    assert!(
        hits.iter().all(|h| h.id != "skip"),
        "filter applies to push"
    );
    assert!(hits.iter().all(|h| h.traceparent.as_deref() == Some(TRACE)));
    assert!(
        hits.iter()
            .filter(|h| h.status == 200)
            .all(|h| h.attempt == 2)
    );
    let q = push_queue_name("orders", "audit");
    eventually("push queue drained", Duration::from_secs(20), || async {
        let s = env.engine.queue_stats(&q).await.unwrap();
        (s.ready == 0 && s.in_flight == 0).then_some(())
    })
    .await;
    env.close().await;
}

async fn push_dead_letters_rejections_and_exhausted_retries(kind: Kind) {
    let (addr, mut rx) = subscriber(Arc::new(|id, _| match id {
        "bad" => StatusCode::BAD_REQUEST,
        "flaky" => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::NO_CONTENT,
    }))
    .await;
    let env = Env::start(&kind, |c| {
        c.queues.insert(
            "inbox".into(),
            QueueConfig {
                deliver: Some(push(addr)),
                max_receives: Some(3),
                dead_letter: Some("inbox-dlq".into()),
                ..Default::default()
            },
        );
        c.queues.insert("inbox-dlq".into(), QueueConfig::default());
    })
    .await;
    let e = &*env.engine;
    e.send(
        "inbox",
        vec![
            event("bad", "t", &[]).into(),
            event("flaky", "t", &[]).into(),
            event("good", "t", &[]).into(),
        ],
    )
    .await
    .unwrap();
    let dead = receive_n(e, "inbox-dlq", 2, Duration::from_secs(60)).await;
    let mut ids: Vec<String> = dead.iter().map(|d| event_id(&d.event)).collect();
    ids.sort();
    assert_eq!(ids, ["bad", "flaky"]);
    let mut hits = Vec::new();
    while let Ok(h) = rx.try_recv() {
        hits.push(h);
    }
    let count = |id: &str| hits.iter().filter(|h| h.id == id).count();
    assert_eq!(count("bad"), 1, "other 4xx dead-letters at once");
    assert_eq!(count("flaky"), 3, "5xx retries until max_receives");
    assert_eq!(count("good"), 1);
    env.close().await;
}

async fn stream_push_in_order_per_partition(kind: Kind) {
    // One record fails twice before succeeding: order must still hold.
    let (addr, mut rx) = subscriber(Arc::new(|id, attempt| {
        if id == "k1-3" && attempt <= 2 {
            StatusCode::BAD_GATEWAY
        } else {
            StatusCode::OK
        }
    }))
    .await;
    let env = Env::start(&kind, |c| {
        c.streams.insert(
            "feed".into(),
            StreamConfig {
                partitions: 3,
                deliver: Some(push(addr)),
                ..Default::default()
            },
        );
    })
    .await;
    let records: Vec<OutgoingRecord> = (0..10)
        .flat_map(|i| {
            (0..3).map(move |k| {
                let key = format!("k{k}");
                event(&format!("{key}-{i}"), "t", &[("partitionkey", &key)]).into()
            })
        })
        .collect();
    env.engine.put_records("feed", records).await.unwrap();
    let hits = collect_until(&mut rx, "30 deliveries", |h| {
        h.iter().filter(|h| h.status == 200).count() >= 30
    })
    .await;
    for k in 0..3 {
        let key = format!("k{k}");
        let order: Vec<u32> = hits
            .iter()
            .filter(|h| h.status == 200 && h.key.as_deref() == Some(key.as_str()))
            .map(|h| h.id.rsplit('-').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(order, (0..10).collect::<Vec<_>>(), "{key} out of order");
    }
    env.close().await;
}
