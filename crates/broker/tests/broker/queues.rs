//! Queue semantics (SQS): receive/ack, visibility, stale receipts, dead
//! letters and redrive, long polling, delays, FIFO groups and dedup.

use std::time::{Duration, Instant};

use flotilla_broker::QueueConfig;
use flotilla_broker::engine::{EngineError, OutgoingMessage, ReceiveRequest};

use crate::conformance;
use crate::support::{
    Env, Kind, event, event_id, eventually, receive_n, receive_window, two_groups,
};

conformance!(
    send_receive_ack,
    visibility_redelivery_and_stale_receipts,
    extend_and_release,
    never_acked_goes_to_dead_letter_then_redrive,
    redrive_leaves_messages_without_origin,
    poison_message_does_not_block_others,
    long_poll_wakes_on_send,
    delivery_delay,
    fifo_groups_and_dedup,
    fifo_group_keys_are_bounded,
    retention_expires_messages,
    concurrent_publish_and_consume_loses_nothing,
    bad_arguments,
);

async fn send_receive_ack(kind: Kind) {
    let env = Env::start(&kind, |c| {
        c.queues.insert("work".into(), QueueConfig::default());
    })
    .await;
    let e = &*env.engine;
    let sent = e
        .send(
            "work",
            (0..3)
                .map(|i| event(&format!("m{i}"), "t", &[]).into())
                .collect(),
        )
        .await
        .unwrap();
    assert_eq!(sent.len(), 3);
    let got = receive_n(e, "work", 3, Duration::from_secs(30)).await;
    let mut ids: Vec<String> = got.iter().map(|d| event_id(&d.event)).collect();
    ids.sort();
    assert_eq!(ids, ["m0", "m1", "m2"]);
    assert!(got.iter().all(|d| d.receive_count == 1));
    let receipts: Vec<_> = got.iter().map(|d| d.receipt.clone()).collect();
    let acked = e.ack("work", &receipts).await.unwrap();
    assert!(acked.iter().all(|r| r.is_ok()), "{acked:?}");
    assert!(
        receive_window(e, "work", Duration::from_millis(300))
            .await
            .is_empty()
    );
    let stats = eventually("stats to settle", Duration::from_secs(10), || async {
        let s = e.queue_stats("work").await.unwrap();
        (s.ready == 0 && s.in_flight == 0).then_some(s)
    })
    .await;
    assert_eq!(stats.dead_lettered, 0);
    env.close().await;
}

async fn visibility_redelivery_and_stale_receipts(kind: Kind) {
    // NATS's visibility is the consumer's AckWait, so set it on the queue.
    let env = Env::start(&kind, |c| {
        c.queues.insert(
            "vis".into(),
            QueueConfig {
                visibility_timeout: Duration::from_millis(500),
                ..Default::default()
            },
        );
    })
    .await;
    let e = &*env.engine;
    e.send("vis", vec![event("only", "t", &[]).into()])
        .await
        .unwrap();
    let first = receive_n(e, "vis", 1, Duration::from_millis(500)).await;
    assert_eq!(first[0].receive_count, 1);
    // Invisible for now...
    assert!(
        receive_window(e, "vis", Duration::from_millis(100))
            .await
            .is_empty()
    );
    // ...then delivered again, to "someone else".
    let second = receive_n(e, "vis", 1, Duration::from_secs(30)).await;
    assert_eq!(event_id(&second[0].event), "only");
    assert_eq!(second[0].receive_count, 2);
    assert_ne!(first[0].receipt, second[0].receipt);

    // The first consumer's late ack must not delete the redelivered message.
    let stale = e.ack("vis", &[first[0].receipt.clone()]).await.unwrap();
    assert!(
        matches!(stale[0], Err(EngineError::StaleReceipt)),
        "{stale:?}"
    );
    let r = e
        .change_visibility("vis", &first[0].receipt, Duration::ZERO)
        .await;
    assert!(matches!(r, Err(EngineError::StaleReceipt)), "{r:?}");
    // The current holder still owns it and can ack it.
    let ok = e.ack("vis", &[second[0].receipt.clone()]).await.unwrap();
    assert!(ok[0].is_ok(), "{ok:?}");
    assert!(
        receive_window(e, "vis", Duration::from_millis(800))
            .await
            .is_empty()
    );
    env.close().await;
}

async fn extend_and_release(kind: Kind) {
    let env = Env::start(&kind, |c| {
        c.queues.insert(
            "ext".into(),
            QueueConfig {
                visibility_timeout: Duration::from_millis(400),
                ..Default::default()
            },
        );
    })
    .await;
    let e = &*env.engine;
    e.send("ext", vec![event("x", "t", &[]).into()])
        .await
        .unwrap();
    let d = receive_n(e, "ext", 1, Duration::from_millis(400)).await;
    let receipt = e
        .change_visibility("ext", &d[0].receipt, Duration::from_secs(10))
        .await
        .unwrap();
    // Past the original 400 ms, still invisible.
    assert!(
        receive_window(e, "ext", Duration::from_millis(900))
            .await
            .is_empty()
    );
    e.change_visibility("ext", &receipt, Duration::ZERO)
        .await
        .unwrap();
    let again = receive_n(e, "ext", 1, Duration::from_secs(30)).await;
    assert_eq!(again[0].receive_count, 2);
    env.close().await;
}

async fn never_acked_goes_to_dead_letter_then_redrive(kind: Kind) {
    let env = Env::start(&kind, |c| {
        c.queues.insert(
            "jobs".into(),
            QueueConfig {
                visibility_timeout: Duration::from_millis(300),
                max_receives: Some(2),
                dead_letter: Some("jobs-dlq".into()),
                ..Default::default()
            },
        );
        c.queues.insert("jobs-dlq".into(), QueueConfig::default());
    })
    .await;
    let e = &*env.engine;
    e.send("jobs", vec![event("poison", "t", &[]).into()])
        .await
        .unwrap();
    // A consumer that never acks: delivered max_receives times.
    for n in 1..=2 {
        let d = receive_n(e, "jobs", 1, Duration::from_millis(300)).await;
        assert_eq!(d[0].receive_count, n);
    }
    // The consumer keeps polling (and never acks); on its next poll the
    // message has used up its receives and moves to the dead-letter queue.
    let end = Instant::now() + Duration::from_secs(30);
    let dead = loop {
        assert!(
            Instant::now() < end,
            "message never reached the dead-letter queue"
        );
        let again = receive_window(e, "jobs", Duration::from_millis(300)).await;
        assert!(again.is_empty(), "delivered beyond max_receives: {again:?}");
        let d = e
            .receive("jobs-dlq", ReceiveRequest::default())
            .await
            .unwrap();
        if !d.is_empty() {
            break d;
        }
    };
    assert_eq!(event_id(&dead[0].event), "poison");
    e.change_visibility("jobs-dlq", &dead[0].receipt, Duration::ZERO)
        .await
        .unwrap();
    eventually("dead-letter count", Duration::from_secs(10), || async {
        (e.queue_stats("jobs").await.unwrap().dead_lettered >= 1).then_some(())
    })
    .await;

    let moved = e.redrive("jobs-dlq", 100).await.unwrap();
    assert_eq!(moved, 1);
    let back = receive_n(e, "jobs", 1, Duration::from_secs(30)).await;
    assert_eq!(event_id(&back[0].event), "poison");
    assert_eq!(back[0].receive_count, 1, "redrive starts the count again");
    env.close().await;
}

/// A message in a dead-letter queue that did not come from a declared
/// queue (sent to it directly) stays there, and redrive still returns,
/// moving the others. (On NATS it was put back at once, refetched at once,
/// and the call never ended.) Standard and FIFO dead-letter queues.
async fn redrive_leaves_messages_without_origin(kind: Kind) {
    for fifo in [false, true] {
        let env = Env::start(&kind, |c| {
            c.queues.insert(
                "jobs".into(),
                QueueConfig {
                    fifo,
                    dead_letter: Some("jobs-dlq".into()),
                    ..Default::default()
                },
            );
            c.queues.insert(
                "jobs-dlq".into(),
                QueueConfig {
                    fifo,
                    ..Default::default()
                },
            );
        })
        .await;
        let e = &*env.engine;
        let g = [("partitionkey", "g")];
        e.send("jobs", vec![event("failed", "t", &g).into()])
            .await
            .unwrap();
        let d = receive_n(e, "jobs", 1, Duration::from_secs(30)).await;
        e.dead_letter("jobs", &d[0].receipt).await.unwrap();
        // After the dead letter: on NATS a FIFO queue is ordered as a
        // whole, and redrive stops at a message it has to leave.
        e.send("jobs-dlq", vec![event("stray", "t", &g).into()])
            .await
            .unwrap();

        let moved = tokio::time::timeout(Duration::from_secs(20), e.redrive("jobs-dlq", 100))
            .await
            .unwrap_or_else(|_| panic!("redrive did not return (fifo: {fifo})"))
            .unwrap();
        assert_eq!(moved, 1, "fifo: {fifo}");
        let back = receive_n(e, "jobs", 1, Duration::from_secs(30)).await;
        assert_eq!(event_id(&back[0].event), "failed");
        let left = receive_n(e, "jobs-dlq", 1, Duration::from_secs(30)).await;
        assert_eq!(event_id(&left[0].event), "stray");
        // On NATS, redrive looked at it through the consumer: one delivery
        // per call (documented), not one per turn of a loop.
        let deliveries = if kind.is_nats() { 2 } else { 1 };
        assert_eq!(left[0].receive_count, deliveries, "fifo: {fifo}");
        // Nothing else is left in either queue.
        e.ack("jobs", &[back[0].receipt.clone()]).await.unwrap();
        e.ack("jobs-dlq", &[left[0].receipt.clone()]).await.unwrap();
        assert_eq!(e.redrive("jobs-dlq", 100).await.unwrap(), 0);
        env.close().await;
    }
}

async fn poison_message_does_not_block_others(kind: Kind) {
    let env = Env::start(&kind, |c| {
        c.queues.insert(
            "mixed".into(),
            QueueConfig {
                visibility_timeout: Duration::from_millis(500),
                ..Default::default()
            },
        );
    })
    .await;
    let e = &*env.engine;
    let mut msgs: Vec<OutgoingMessage> = vec![event("poison", "t", &[]).into()];
    msgs.extend((0..20).map(|i| event(&format!("ok{i}"), "t", &[]).into()));
    e.send("mixed", msgs).await.unwrap();
    let mut acked = 0;
    let mut poison_seen = 0;
    let end = Instant::now() + Duration::from_secs(30);
    while acked < 20 {
        assert!(
            Instant::now() < end,
            "only {acked} of 20 good messages arrived"
        );
        let batch = e
            .receive(
                "mixed",
                ReceiveRequest {
                    max_messages: 10,
                    wait: Duration::from_millis(500),
                    visibility_timeout: None,
                    one_per_group: false,
                },
            )
            .await
            .unwrap();
        for d in batch {
            if event_id(&d.event) == "poison" {
                poison_seen += 1; // never acked
            } else {
                assert!(e.ack("mixed", &[d.receipt]).await.unwrap()[0].is_ok());
                acked += 1;
            }
        }
    }
    assert!(poison_seen >= 1);
    env.close().await;
}

async fn long_poll_wakes_on_send(kind: Kind) {
    let env = Env::start(&kind, |c| {
        c.queues.insert("lp".into(), QueueConfig::default());
    })
    .await;
    let engine = env.engine.clone();
    let started = Instant::now();
    let waiter = tokio::spawn(async move {
        engine
            .receive(
                "lp",
                ReceiveRequest {
                    max_messages: 1,
                    wait: Duration::from_secs(15),
                    visibility_timeout: None,
                    one_per_group: false,
                },
            )
            .await
    });
    env.engine
        .send("lp", vec![event("wake", "t", &[]).into()])
        .await
        .unwrap();
    let got = waiter.await.unwrap().unwrap();
    assert_eq!(got.len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "long poll returned only after {:?}",
        started.elapsed()
    );
    env.close().await;
}

async fn delivery_delay(kind: Kind) {
    let env = Env::start(&kind, |c| {
        c.queues.insert("later".into(), QueueConfig::default());
    })
    .await;
    let e = &*env.engine;
    let sent = Instant::now();
    e.send(
        "later",
        vec![OutgoingMessage {
            event: event("d", "t", &[]),
            delay: Some(Duration::from_secs(1)),
        }],
    )
    .await
    .unwrap();
    assert!(
        receive_window(e, "later", Duration::from_millis(200))
            .await
            .is_empty()
    );
    let got = receive_n(e, "later", 1, Duration::from_secs(30)).await;
    assert_eq!(event_id(&got[0].event), "d");
    assert!(sent.elapsed() >= Duration::from_millis(950));
    let too_long = e
        .send(
            "later",
            vec![OutgoingMessage {
                event: event("d2", "t", &[]),
                delay: Some(Duration::from_secs(901)),
            }],
        )
        .await;
    assert!(matches!(too_long, Err(EngineError::InvalidArgument { .. })));
    env.close().await;
}

/// A FIFO group key is held to a stream key's bound (its length was
/// stored in two bytes). On NATS a FIFO queue has no groups to key.
async fn fifo_group_keys_are_bounded(kind: Kind) {
    if kind.is_nats() {
        return;
    }
    let env = Env::start(&kind, |c| {
        c.queues.insert(
            "orders".into(),
            QueueConfig {
                fifo: true,
                ..Default::default()
            },
        );
    })
    .await;
    let e = &*env.engine;
    let long = "g".repeat(65_537);
    let refused = e
        .send(
            "orders",
            vec![event("a1", "t", &[("partitionkey", &long)]).into()],
        )
        .await;
    assert!(
        matches!(&refused, Err(EngineError::InvalidArgument { .. })),
        "{refused:?}"
    );
    let fits = e
        .send(
            "orders",
            vec![event("a2", "t", &[("partitionkey", &"g".repeat(256))]).into()],
        )
        .await;
    assert!(fits.is_ok(), "{fits:?}");
    env.close().await;
}

async fn fifo_groups_and_dedup(kind: Kind) {
    let env = Env::start(&kind, |c| {
        c.queues.insert(
            "orders".into(),
            QueueConfig {
                fifo: true,
                visibility_timeout: Duration::from_secs(30),
                ..Default::default()
            },
        );
    })
    .await;
    let e = &*env.engine;
    let g = |id: &str, group: &str| event(id, "t", &[("partitionkey", group)]).into();
    let out = e.send("orders", two_groups()).await.unwrap();
    assert!(out.iter().all(|o| !o.duplicate));
    // Same source + id within five minutes: deduplicated.
    let dup = e.send("orders", vec![g("a1", "A")]).await.unwrap();
    assert!(dup[0].duplicate, "{dup:?}");

    if kind.is_nats() {
        // Documented: on NATS a FIFO queue is ordered as a whole (one
        // message in flight), not per group. Check that order.
        let mut order = Vec::new();
        for _ in 0..5 {
            let d = receive_n(e, "orders", 1, Duration::from_secs(30)).await;
            order.push(event_id(&d[0].event));
            assert!(e.ack("orders", &[d[0].receipt.clone()]).await.unwrap()[0].is_ok());
        }
        assert_eq!(order, ["a1", "b1", "a2", "b2", "a3"]);
        env.close().await;
        return;
    }

    // Take A's head and hold it: A is blocked, B flows in order.
    let first = e
        .receive(
            "orders",
            ReceiveRequest {
                max_messages: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(event_id(&first[0].event), "a1");
    let rest = receive_window(e, "orders", Duration::from_millis(200)).await;
    let ids: Vec<String> = rest.iter().map(|d| event_id(&d.event)).collect();
    assert_eq!(ids, ["b1", "b2"], "group A must wait for a1");
    let receipts: Vec<_> = rest.iter().map(|d| d.receipt.clone()).collect();
    e.ack("orders", &receipts).await.unwrap();
    assert!(
        receive_window(e, "orders", Duration::from_millis(200))
            .await
            .is_empty(),
        "a2 must not overtake the in-flight a1"
    );
    // a1 fails (released): it comes back first, then the rest of A.
    e.change_visibility("orders", &first[0].receipt, Duration::ZERO)
        .await
        .unwrap();
    let again = receive_window(e, "orders", Duration::from_secs(2)).await;
    let ids: Vec<String> = again.iter().map(|d| event_id(&d.event)).collect();
    assert_eq!(ids, ["a1", "a2", "a3"]);
    assert_eq!(again[0].receive_count, 2);
    env.close().await;
}

async fn bad_arguments(kind: Kind) {
    let env = Env::start(&kind, |c| {
        c.queues.insert("q".into(), QueueConfig::default());
    })
    .await;
    let e = &*env.engine;
    let r = e
        .receive(
            "q",
            ReceiveRequest {
                max_messages: 11,
                ..Default::default()
            },
        )
        .await;
    assert!(matches!(r, Err(EngineError::InvalidArgument { .. })));
    let r = e
        .receive(
            "q",
            ReceiveRequest {
                wait: Duration::from_secs(21),
                ..Default::default()
            },
        )
        .await;
    assert!(matches!(r, Err(EngineError::InvalidArgument { .. })));
    let r = e.receive("nope", ReceiveRequest::default()).await;
    assert!(matches!(r, Err(EngineError::UnknownQueue(_))));
    let r = e
        .ack("q", &[flotilla_broker::engine::Receipt("garbage".into())])
        .await
        .unwrap();
    assert!(matches!(r[0], Err(EngineError::InvalidReceipt(_))));
    let r = e.publish("undeclared", vec![event("x", "t", &[])]).await;
    assert!(matches!(r, Err(EngineError::UnknownTopic(_))));
    env.close().await;
}

async fn retention_expires_messages(kind: Kind) {
    let env = Env::start(&kind, |c| {
        c.queues.insert(
            "short".into(),
            QueueConfig {
                retention: Duration::from_secs(1),
                ..Default::default()
            },
        );
        c.streams.insert(
            "short".into(),
            flotilla_broker::StreamConfig {
                partitions: 1,
                retention: Duration::from_secs(1),
                ..Default::default()
            },
        );
    })
    .await;
    let e = &*env.engine;
    e.send("short", vec![event("old", "t", &[]).into()])
        .await
        .unwrap();
    e.put_records("short", vec![event("old", "t", &[]).into()])
        .await
        .unwrap();
    crate::support::eventually(
        "retention to expire both",
        Duration::from_secs(30),
        || async {
            let q = e.queue_stats("short").await.unwrap();
            let s = e.stream_stats("short").await.unwrap();
            (q.ready == 0 && s[0].records == 0).then_some(())
        },
    )
    .await;
    assert!(
        receive_window(e, "short", Duration::from_millis(100))
            .await
            .is_empty()
    );
    env.close().await;
}

async fn concurrent_publish_and_consume_loses_nothing(kind: Kind) {
    let env = Env::start(&kind, |c| {
        c.queues.insert("busy".into(), QueueConfig::default());
    })
    .await;
    let total = 4_000;
    let mut publishers = Vec::new();
    for w in 0..4 {
        let e = env.engine.clone();
        publishers.push(tokio::spawn(async move {
            let mut i = 0;
            while i < total / 4 {
                let n = if i % 3 == 0 { 10 } else { 1 }.min(total / 4 - i);
                let msgs = (i..i + n)
                    .map(|j| event(&format!("w{w}-{j}"), "t", &[]).into())
                    .collect();
                e.send("busy", msgs).await.unwrap();
                i += n;
            }
        }));
    }
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let mut consumers = Vec::new();
    for _ in 0..3 {
        let (e, seen) = (env.engine.clone(), seen.clone());
        consumers.push(tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(60);
            while seen.lock().unwrap().len() < total && Instant::now() < end {
                let batch = e
                    .receive(
                        "busy",
                        ReceiveRequest {
                            max_messages: 10,
                            wait: Duration::from_millis(500),
                            visibility_timeout: None,
                            one_per_group: false,
                        },
                    )
                    .await
                    .unwrap();
                let receipts: Vec<_> = batch.iter().map(|d| d.receipt.clone()).collect();
                if !receipts.is_empty() {
                    e.ack("busy", &receipts).await.unwrap();
                }
                let mut s = seen.lock().unwrap();
                for d in &batch {
                    s.insert(event_id(&d.event));
                }
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    for c in consumers {
        c.await.unwrap();
    }
    assert_eq!(seen.lock().unwrap().len(), total, "messages went missing");
    env.close().await;
}

/// Embedded FIFO: with group A's head held in flight and a backlog of A
/// larger than what is held of a group in memory (and, on `small`, than
/// `max_in_flight`), a message of group B published after the backlog is
/// still received; then A's whole backlog comes, in order.
/// With a stuck group's backlog holding every place for passed-over
/// messages (max_in_flight of them), another group whose next message had
/// to wait on disk behind its own message in flight still gets it once
/// that one is acked.
#[tokio::test]
async fn fifo_a_group_left_on_disk_is_read_back_past_the_cap() {
    let env = Env::start(&Kind::Embedded, |c| {
        c.queues.insert(
            "small".into(),
            QueueConfig {
                fifo: true,
                max_in_flight: 64,
                ..Default::default()
            },
        );
    })
    .await;
    let e = &*env.engine;
    let g = |id: String, group: &str| -> OutgoingMessage {
        event(&id, "t", &[("partitionkey", group)]).into()
    };
    e.send("small", vec![g("a0".into(), "A")]).await.unwrap();
    let head = receive_n(e, "small", 1, Duration::from_secs(60)).await;
    assert_eq!(event_id(&head[0].event), "a0");
    let backlog: Vec<_> = (1..=200).map(|i| g(format!("a{i}"), "A")).collect();
    e.send("small", backlog).await.unwrap();
    e.send("small", vec![g("d0".into(), "D")]).await.unwrap();
    let d0 = receive_n(e, "small", 1, Duration::from_secs(60)).await;
    assert_eq!(event_id(&d0[0].event), "d0");
    // d1 comes while d0 is in flight and A's backlog holds every place.
    e.send("small", vec![g("d1".into(), "D")]).await.unwrap();
    assert!(
        receive_window(e, "small", Duration::from_millis(200))
            .await
            .is_empty(),
        "d1 before d0 was acked"
    );
    e.ack("small", &[d0[0].receipt.clone()]).await.unwrap();
    let d1 = receive_n(e, "small", 1, Duration::from_secs(10)).await;
    assert_eq!(event_id(&d1[0].event), "d1", "D stuck behind A's backlog");
    env.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_other_groups_flow_past_a_stuck_groups_backlog() {
    const BACKLOG: usize = 600;
    let env = Env::start(&Kind::Embedded, |c| {
        for (name, max_in_flight) in [("small", 64), ("big", 120_000)] {
            c.queues.insert(
                name.into(),
                QueueConfig {
                    fifo: true,
                    max_in_flight,
                    ..Default::default()
                },
            );
        }
    })
    .await;
    let e = &*env.engine;
    let g = |id: String, group: &str| -> OutgoingMessage {
        event(&id, "t", &[("partitionkey", group)]).into()
    };
    for queue in ["small", "big"] {
        e.send(queue, vec![g("a0".into(), "A")]).await.unwrap();
        let head = receive_n(e, queue, 1, Duration::from_secs(60)).await;
        assert_eq!(event_id(&head[0].event), "a0");
        let backlog: Vec<_> = (1..=BACKLOG).map(|i| g(format!("a{i}"), "A")).collect();
        e.send(queue, backlog).await.unwrap();
        e.send(queue, vec![g("b0".into(), "B")]).await.unwrap();

        let b = receive_n(e, queue, 1, Duration::from_secs(60)).await;
        assert_eq!(event_id(&b[0].event), "b0", "{queue}: B must flow past A");
        e.send(queue, vec![g("b1".into(), "B")]).await.unwrap();
        e.ack(queue, &[b[0].receipt.clone()]).await.unwrap();
        let b = receive_n(e, queue, 1, Duration::from_secs(60)).await;
        assert_eq!(event_id(&b[0].event), "b1", "{queue}: B keeps flowing");
        e.ack(queue, &[b[0].receipt.clone(), head[0].receipt.clone()])
            .await
            .unwrap();

        // A's backlog, all of it, in order.
        let mut got = Vec::new();
        while got.len() < BACKLOG {
            let batch = receive_window(e, queue, Duration::from_secs(5)).await;
            assert!(!batch.is_empty(), "{queue}: A stalled after {}", got.len());
            let receipts: Vec<_> = batch.iter().map(|d| d.receipt.clone()).collect();
            got.extend(batch.iter().map(|d| event_id(&d.event)));
            for r in e.ack(queue, &receipts).await.unwrap() {
                r.unwrap();
            }
        }
        let want: Vec<String> = (1..=BACKLOG).map(|i| format!("a{i}")).collect();
        assert_eq!(got, want, "{queue}: A out of order");
        assert!(
            receive_window(e, queue, Duration::from_millis(100))
                .await
                .is_empty(),
            "{queue}: nothing left"
        );
    }
    env.close().await;
}
