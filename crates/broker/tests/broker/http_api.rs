//! The HTTP API end to end, including every bad-input case of the issue.

use std::time::Duration;

use flotilla_broker::{FilterPolicy, QueueConfig, StreamConfig, Subscription, TopicConfig};

use crate::conformance;
use crate::support::{Env, Http, Kind};

conformance!(api_round_trip, api_rejects_bad_input);

const CE: &str = "application/cloudevents+json";
const BATCH: &str = "application/cloudevents-batch+json";

fn ce(id: &str, ty: &str) -> serde_json::Value {
    serde_json::json!({
        "specversion": "1.0", "id": id, "source": "/http-test", "type": ty,
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "data": {"n": id}
    })
}

async fn env(kind: &Kind) -> Env {
    Env::start(kind, |c| {
        c.topics.insert("orders".into(), TopicConfig::default());
        c.queues.insert(
            "work".into(),
            QueueConfig {
                subscribe: Some(Subscription {
                    topic: "orders".into(),
                    filter: FilterPolicy::default(),
                }),
                visibility_timeout: Duration::from_secs(30),
                max_receives: Some(3),
                dead_letter: Some("work-dlq".into()),
                ..Default::default()
            },
        );
        c.queues.insert("work-dlq".into(), QueueConfig::default());
        c.streams.insert(
            "log".into(),
            StreamConfig {
                partitions: 2,
                ..Default::default()
            },
        );
    })
    .await
}

async fn api_round_trip(kind: Kind) {
    let env = env(&kind).await;
    let http = Http::new(env.serve().await);

    let (s, body) = http
        .call(
            "POST",
            "/topics/orders/events",
            CE,
            ce("1", "order.placed").to_string(),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["results"][0]["routed"], 1);
    let batch = serde_json::json!([ce("2", "t"), ce("3", "t")]);
    let (s, body) = http
        .call("POST", "/topics/orders/events", BATCH, batch.to_string())
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["results"].as_array().unwrap().len(), 2);
    let (s, body) = http
        .call(
            "POST",
            "/queues/work/messages",
            CE,
            ce("4", "t").to_string(),
        )
        .await;
    assert_eq!(s, 200, "{body}");

    let mut messages = Vec::new();
    for _ in 0..20 {
        let (s, body) = http
            .json(
                "POST",
                "/queues/work/receive",
                serde_json::json!({"max_messages": 10, "wait_seconds": 2, "visibility_timeout_seconds": 30}),
            )
            .await;
        assert_eq!(s, 200, "{body}");
        messages.extend(body["messages"].as_array().unwrap().iter().cloned());
        if messages.len() >= 4 {
            break;
        }
    }
    assert_eq!(messages.len(), 4);
    let m = &messages[0];
    assert_eq!(m["receive_count"], 1);
    assert_eq!(m["event"]["specversion"], "1.0");
    assert!(
        m["event"]["traceparent"]
            .as_str()
            .unwrap()
            .starts_with("00-")
    );

    // extend, release, single ack, batch ack
    let receipt = |m: &serde_json::Value| m["receipt"].as_str().unwrap().to_owned();
    let (s, body) = http
        .json(
            "POST",
            "/queues/work/visibility",
            serde_json::json!({"receipt": receipt(&messages[0]), "timeout_seconds": 60}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let extended = body["receipt"].as_str().unwrap().to_owned();
    let (s, body) = http
        .json(
            "POST",
            "/queues/work/ack",
            serde_json::json!({"receipt": extended}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = http
        .json(
            "POST",
            "/queues/work/release",
            serde_json::json!({"receipt": receipt(&messages[1])}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let rest: Vec<String> = messages[2..].iter().map(receipt).collect();
    let (s, body) = http
        .json(
            "POST",
            "/queues/work/ack",
            serde_json::json!({"receipts": rest}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["acked"], 2);
    let (s, body) = http.call("GET", "/queues/work", "", "").await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = http
        .json("POST", "/queues/work-dlq/redrive", serde_json::json!({}))
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["moved"], 0);

    // streams
    let (s, body) = http
        .call(
            "POST",
            "/streams/log/records?partition_key=k1",
            BATCH,
            serde_json::json!([ce("s1", "t"), ce("s2", "t")]).to_string(),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let p = body["results"][0]["partition"].as_u64().unwrap();
    assert_eq!(body["results"][1]["partition"].as_u64().unwrap(), p);
    let (s, body) = http
        .call(
            "GET",
            &format!("/streams/log/partitions/{p}/records?iterator=trim_horizon&limit=1"),
            "",
            "",
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["records"][0]["event"]["id"], "s1");
    let next = body["next_iterator"].as_str().unwrap().to_owned();
    let (s, body) = http
        .call(
            "GET",
            &format!("/streams/log/partitions/{p}/records?iterator={next}"),
            "",
            "",
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["records"][0]["event"]["id"], "s2");
    let seq = body["records"][0]["sequence"].as_u64().unwrap();
    // A lease is renewed, not taken for a day: a consumer that died
    // holding one would stall its partitions that long.
    for ttl in [86_400.0, 301.0, 0.0] {
        let (s, body) = http
            .json(
                "POST",
                "/streams/log/groups/g/leases",
                serde_json::json!({"consumer": "c1", "ttl_seconds": ttl}),
            )
            .await;
        assert_eq!(s, 400, "{ttl}: {body}");
        assert!(body.to_string().contains("at most 300"), "{body}");
    }
    let (s, body) = http
        .json(
            "POST",
            "/streams/log/groups/g/leases",
            serde_json::json!({"consumer": "c1", "ttl_seconds": 30}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let lease = body["leases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["partition"] == p)
        .unwrap()
        .clone();
    let (s, body) = http
        .json(
            "PUT",
            &format!("/streams/log/groups/g/partitions/{p}/checkpoint"),
            serde_json::json!({"consumer": "c1", "token": lease["token"], "sequence": seq}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let (s, _) = http
        .call("DELETE", "/streams/log/groups/g/consumers/c1", "", "")
        .await;
    assert_eq!(s, 204);
    let (s, body) = http.call("GET", "/streams/log", "", "").await;
    assert_eq!(s, 200, "{body}");

    let (s, body) = http.call("GET", "/openapi.json", "", "").await;
    assert_eq!(s, 200);
    assert!(body["openapi"].as_str().unwrap().starts_with("3.0"));
    env.close().await;
}

async fn api_rejects_bad_input(kind: Kind) {
    let env = env(&kind).await;
    let http = Http::new(env.serve().await);
    let code = |b: &serde_json::Value| b["error"]["code"].as_str().unwrap_or("").to_owned();

    // Oversized event (default limit 1 MiB).
    let mut big = ce("big", "t");
    big["data"] = serde_json::json!({"blob": "x".repeat((1 << 20) + 10)});
    let (s, b) = http
        .call("POST", "/topics/orders/events", CE, big.to_string())
        .await;
    assert_eq!((s, code(&b).as_str()), (413, "message_too_large"), "{b}");

    // Over the limits before parsing: a binary-mode body of data over
    // 1 MiB, or of JSON over 4 MiB (written back compact, JSON may shrink;
    // this is not JSON, though it says so: it is never parsed), and a
    // batch past 1000 events (the rest, malformed, is never read).
    for (content_type, body) in [
        ("application/octet-stream", "x".repeat((1 << 20) + 1)),
        ("application/json", format!("[{}", "0,".repeat(1 << 21))),
    ] {
        let (s, b) = http
            .call_with(
                "POST",
                "/topics/orders/events",
                &[
                    ("content-type", content_type),
                    ("ce-specversion", "1.0"),
                    ("ce-id", "big"),
                    ("ce-source", "/tests"),
                    ("ce-type", "t"),
                ],
                body,
            )
            .await;
        assert_eq!(
            (s, code(&b).as_str()),
            (413, "message_too_large"),
            "{content_type}: {b}"
        );
    }
    let (s, b) = http
        .call(
            "POST",
            "/topics/orders/events",
            BATCH,
            format!("[{}{{not json", "0,".repeat(1001)),
        )
        .await;
    assert_eq!((s, code(&b).as_str()), (413, "batch_too_large"), "{b}");
    let batch: Vec<_> = (0..1001).map(|i| ce(&i.to_string(), "t")).collect();
    let (s, b) = http
        .call(
            "POST",
            "/topics/orders/events",
            BATCH,
            serde_json::Value::from(batch).to_string(),
        )
        .await;
    assert_eq!((s, code(&b).as_str()), (413, "batch_too_large"), "{b}");

    // Invalid CloudEvents: each required attribute missing, bad version.
    for missing in ["specversion", "id", "source", "type"] {
        let mut e = ce("x", "t");
        e.as_object_mut().unwrap().remove(missing);
        let (s, b) = http
            .call("POST", "/topics/orders/events", CE, e.to_string())
            .await;
        assert_eq!(
            (s, code(&b).as_str()),
            (400, "invalid_cloudevent"),
            "{missing}: {b}"
        );
        assert!(
            b["error"]["message"].as_str().unwrap().contains(missing),
            "{b}"
        );
    }
    let (s, b) = http
        .call("POST", "/topics/orders/events", CE, "{not json")
        .await;
    assert_eq!((s, code(&b).as_str()), (400, "invalid_cloudevent"), "{b}");
    let (s, b) = http
        .call(
            "POST",
            "/topics/orders/events",
            BATCH,
            format!("[{},{{\"id\":1}}]", ce("ok", "t")),
        )
        .await;
    assert_eq!((s, code(&b).as_str()), (400, "invalid_cloudevent"), "{b}");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("#1"),
        "{b}"
    );
    let (s, b) = http
        .call(
            "POST",
            "/topics/orders/events",
            "text/plain",
            ce("x", "t").to_string(),
        )
        .await;
    assert_eq!(
        (s, code(&b).as_str()),
        (415, "unsupported_media_type"),
        "{b}"
    );

    // Unknown queue, undeclared topic, internal names.
    let (s, b) = http
        .json("POST", "/queues/nope/receive", serde_json::json!({}))
        .await;
    assert_eq!((s, code(&b).as_str()), (404, "unknown_queue"), "{b}");
    let (s, b) = http
        .call(
            "POST",
            "/topics/undeclared/events",
            CE,
            ce("x", "t").to_string(),
        )
        .await;
    assert_eq!((s, code(&b).as_str()), (404, "unknown_topic"), "{b}");
    let (s, b) = http
        .call(
            "POST",
            "/streams/nope/records",
            CE,
            ce("x", "t").to_string(),
        )
        .await;
    assert_eq!((s, code(&b).as_str()), (404, "unknown_stream"), "{b}");

    // Stale receipt: the message went to someone else.
    http.call(
        "POST",
        "/queues/work/messages",
        CE,
        ce("s", "t").to_string(),
    )
    .await;
    let mut first = serde_json::Value::Null;
    for _ in 0..10 {
        let (_, b) = http
            .json(
                "POST",
                "/queues/work/receive",
                serde_json::json!({"wait_seconds": 2, "visibility_timeout_seconds": 30}),
            )
            .await;
        if let Some(m) = b["messages"].as_array().and_then(|a| a.first()) {
            first = m.clone();
            break;
        }
    }
    let old = first["receipt"].as_str().expect("a delivery").to_owned();
    let (s, b) = http
        .json(
            "POST",
            "/queues/work/release",
            serde_json::json!({"receipt": old}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let mut second = serde_json::Value::Null;
    for _ in 0..10 {
        let (_, b) = http
            .json(
                "POST",
                "/queues/work/receive",
                serde_json::json!({"wait_seconds": 2, "visibility_timeout_seconds": 30}),
            )
            .await;
        if let Some(m) = b["messages"].as_array().and_then(|a| a.first()) {
            second = m.clone();
            break;
        }
    }
    assert_eq!(second["receive_count"], 2);
    let (s, b) = http
        .json(
            "POST",
            "/queues/work/ack",
            serde_json::json!({"receipt": old}),
        )
        .await;
    assert_eq!((s, code(&b).as_str()), (409, "stale_receipt"), "{b}");
    let (s, b) = http
        .json(
            "POST",
            "/queues/work/ack",
            serde_json::json!({"receipt": second["receipt"]}),
        )
        .await;
    assert_eq!(
        s, 200,
        "the redelivered message survived the stale ack: {b}"
    );

    // Malformed control requests.
    let (s, b) = http
        .json(
            "POST",
            "/queues/work/receive",
            serde_json::json!({"max_messages": 11}),
        )
        .await;
    assert_eq!((s, code(&b).as_str()), (400, "invalid_argument"), "{b}");
    let (s, b) = http
        .json(
            "POST",
            "/queues/work/receive",
            serde_json::json!({"bogus": 1}),
        )
        .await;
    assert_eq!((s, code(&b).as_str()), (400, "invalid_request"), "{b}");
    let (s, b) = http
        .call(
            "GET",
            "/streams/log/partitions/0/records?iterator=sideways",
            "",
            "",
        )
        .await;
    assert_eq!((s, code(&b).as_str()), (400, "invalid_request"), "{b}");
    env.close().await;
}
