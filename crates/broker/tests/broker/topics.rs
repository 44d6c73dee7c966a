//! Topic semantics (SNS): fan-out to queues and streams with filter
//! policies.

use std::time::Duration;

use flotilla_broker::engine::StreamPosition;
use flotilla_broker::{FilterPolicy, QueueConfig, StreamConfig, Subscription, TopicConfig};

use crate::conformance;
use crate::support::{Env, Kind, event, event_id, receive_n, receive_window};

conformance!(fan_out_with_filters);

fn policy(v: serde_json::Value) -> FilterPolicy {
    serde_json::from_value(v).expect("policy")
}

async fn fan_out_with_filters(kind: Kind) {
    let env = Env::start(&kind, |c| {
        c.topics.insert("orders".into(), TopicConfig::default());
        let sub = |filter| {
            Some(Subscription {
                topic: "orders".into(),
                filter,
            })
        };
        c.queues.insert(
            "placed".into(),
            QueueConfig {
                subscribe: sub(FilterPolicy::types(["order.placed"])),
                ..Default::default()
            },
        );
        c.queues.insert(
            "big-eu".into(),
            QueueConfig {
                subscribe: sub(policy(serde_json::json!({
                    "amount": [{"numeric": [">=", 100]}],
                    "region": [{"prefix": "eu-"}],
                    "test": [{"exists": false}],
                }))),
                ..Default::default()
            },
        );
        c.queues.insert(
            "not-cancelled".into(),
            QueueConfig {
                subscribe: sub(policy(serde_json::json!({
                    "type": [{"anything-but": ["order.cancelled"]}],
                }))),
                ..Default::default()
            },
        );
        c.streams.insert(
            "analytics".into(),
            StreamConfig {
                partitions: 2,
                partition_key: "customer".into(),
                source: sub(FilterPolicy::default()),
                ..Default::default()
            },
        );
    })
    .await;
    let e = &*env.engine;
    let out = e
        .publish(
            "orders",
            vec![
                event(
                    "1",
                    "order.placed",
                    &[("amount", "150"), ("region", "eu-west"), ("customer", "c1")],
                ),
                event(
                    "2",
                    "order.placed",
                    &[("amount", "50"), ("region", "eu-west"), ("customer", "c2")],
                ),
                event(
                    "3",
                    "order.cancelled",
                    &[
                        ("amount", "500"),
                        ("region", "eu-north"),
                        ("customer", "c1"),
                    ],
                ),
                event(
                    "4",
                    "order.placed",
                    &[
                        ("amount", "500"),
                        ("region", "us-east"),
                        ("customer", "c3"),
                        ("test", "1"),
                    ],
                ),
            ],
        )
        .await
        .unwrap();
    let routed: Vec<usize> = out.iter().map(|o| o.routed).collect();
    assert_eq!(routed, [4, 3, 2, 3]);

    let ids = |ds: Vec<flotilla_broker::engine::Delivery>| {
        let mut v: Vec<String> = ds.iter().map(|d| event_id(&d.event)).collect();
        v.sort();
        v
    };
    let t = Duration::from_secs(30);
    assert_eq!(ids(receive_n(e, "placed", 3, t).await), ["1", "2", "4"]);
    assert_eq!(ids(receive_n(e, "big-eu", 2, t).await), ["1", "3"]);
    assert_eq!(
        ids(receive_n(e, "not-cancelled", 3, t).await),
        ["1", "2", "4"]
    );
    for q in ["placed", "big-eu", "not-cancelled"] {
        assert!(
            receive_window(e, q, Duration::from_millis(200))
                .await
                .is_empty(),
            "{q} got more than its filter allows"
        );
    }
    let mut in_stream = Vec::new();
    for p in 0..2 {
        let r = e
            .read(
                "analytics",
                p,
                StreamPosition::TrimHorizon,
                100,
                Duration::ZERO,
            )
            .await
            .unwrap();
        in_stream.extend(
            r.records
                .iter()
                .map(|r| (r.partition_key.clone(), event_id(&r.event))),
        );
    }
    in_stream.sort();
    assert_eq!(
        in_stream,
        [
            ("c1".to_owned(), "1".to_owned()),
            ("c1".to_owned(), "3".to_owned()),
            ("c2".to_owned(), "2".to_owned()),
            ("c3".to_owned(), "4".to_owned())
        ]
    );
    env.close().await;
}

/// An event of exactly `size` bytes of JSON.
fn sized_event(id: &str, size: usize) -> flotilla_broker::CloudEvent {
    let make = |pad: usize| {
        flotilla_broker::CloudEvent::new(
            id,
            "/tests",
            "big",
            &[],
            &serde_json::json!({ "pad": "x".repeat(pad) }),
        )
        .expect("valid event")
    };
    let overhead = make(0).as_bytes().len();
    let e = make(size - overhead);
    assert_eq!(e.as_bytes().len(), size);
    e
}

/// NATS limits a message, payload and headers together, to the server's
/// `max_payload` (1 MiB by default, as `Limits.max_event_bytes`). An event
/// that fits a header-less queue but not the stream (`Flotilla-Key`) or a
/// FIFO queue (`Nats-Msg-Id`) is refused whole with 413 before any target
/// stores it; an event at the broker's limit fits every target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_event_over_max_payload_is_refused_whole() {
    let Some(kind) = Kind::nats() else { return };
    let env = Env::start(&kind, |c| {
        c.topics.insert("big".into(), TopicConfig::default());
        let sub = Some(Subscription {
            topic: "big".into(),
            filter: FilterPolicy::default(),
        });
        c.queues.insert(
            "plain".into(),
            QueueConfig {
                subscribe: sub.clone(),
                ..Default::default()
            },
        );
        c.streams.insert(
            "log".into(),
            StreamConfig {
                partitions: 1,
                source: sub,
                ..Default::default()
            },
        );
        c.queues.insert(
            "ordered".into(),
            QueueConfig {
                fifo: true,
                ..Default::default()
            },
        );
    })
    .await;
    let e = &*env.engine;
    let configured = flotilla_broker::Limits::default().max_event_bytes;
    let limit = env.broker.limits().max_event_bytes;
    assert!(
        limit < configured,
        "the 1 MiB default should be lowered below the server's 1 MiB max_payload, got {limit}"
    );

    // Fits the header-less queue's message, not the stream's or the FIFO's.
    let over = sized_event("over", configured - 16);
    let err = e
        .publish("big", vec![over.clone()])
        .await
        .expect_err("over max_payload with headers");
    assert!(
        matches!(err, flotilla_broker::EngineError::TooLarge(_)),
        "{err:?}"
    );
    let err = e
        .send("ordered", vec![over.clone().into()])
        .await
        .expect_err("over max_payload with Nats-Msg-Id");
    assert!(
        matches!(err, flotilla_broker::EngineError::TooLarge(_)),
        "{err:?}"
    );
    // Over HTTP: 413, and a retry adds nothing anywhere either.
    let addr = env.serve().await;
    let http = crate::support::Http::new(addr);
    for _ in 0..2 {
        let (s, b) = http
            .call(
                "POST",
                "/topics/big/events",
                "application/cloudevents+json",
                over.as_bytes().clone(),
            )
            .await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (413, Some("message_too_large")),
            "{b}"
        );
    }
    for q in ["plain", "ordered"] {
        let stats = e.queue_stats(q).await.unwrap();
        assert_eq!((stats.ready, stats.in_flight), (0, 0), "{q} stored a part");
    }
    let r = e
        .read("log", 0, StreamPosition::TrimHorizon, 10, Duration::ZERO)
        .await
        .unwrap();
    assert!(r.records.is_empty(), "the stream stored a part");

    // At the limit, every target takes it, headers included.
    let fits = sized_event("fits", limit);
    let out = e.publish("big", vec![fits.clone()]).await.expect("publish");
    assert_eq!(out[0].routed, 2);
    e.send("ordered", vec![fits.into()]).await.expect("send");
    assert_eq!(
        receive_n(e, "plain", 1, Duration::from_secs(30))
            .await
            .len(),
        1
    );
    assert_eq!(
        receive_n(e, "ordered", 1, Duration::from_secs(30))
            .await
            .len(),
        1
    );
    let r = e
        .read("log", 0, StreamPosition::TrimHorizon, 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(r.records.len(), 1);
    env.close().await;
}
