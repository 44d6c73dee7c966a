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
