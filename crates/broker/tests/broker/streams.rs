//! Stream semantics (Kinesis): partitioning, per-partition sequences,
//! iterators, consumer groups with leases and checkpoints.

use std::collections::BTreeSet;
use std::time::Duration;

use flotilla_broker::StreamConfig;
use flotilla_broker::engine::{EngineError, OutgoingRecord, StreamPosition, now_ms, partition_for};

use crate::conformance;
use crate::support::{Env, Kind, event, event_id, eventually};

conformance!(
    partitions_sequences_iterators,
    consumer_groups_split_and_take_over,
    partition_keys_are_bounded,
    a_read_is_bounded_in_bytes
);

/// A read returns at most `MAX_READ_BYTES` of events, then goes on from
/// where it stopped: 80 events of 512 KiB are 40 MiB.
async fn a_read_is_bounded_in_bytes(kind: Kind) {
    let env = Env::start(&kind, |c| {
        c.streams.insert(
            "big".into(),
            StreamConfig {
                partitions: 1,
                ..Default::default()
            },
        );
    })
    .await;
    let e = &*env.engine;
    let pad = "x".repeat(512 << 10);
    for chunk in 0..8 {
        let records: Vec<OutgoingRecord> = (0..10)
            .map(|i| {
                flotilla_broker::CloudEvent::new(
                    &format!("b{}", chunk * 10 + i),
                    "/tests",
                    "t",
                    &[("partitionkey", "k")],
                    &serde_json::json!({ "pad": pad }),
                )
                .unwrap()
                .into()
            })
            .collect();
        e.put_records("big", records).await.unwrap();
    }
    let mut from = StreamPosition::TrimHorizon;
    let mut reads = Vec::new();
    let mut ids = Vec::new();
    while ids.len() < 80 {
        let r = e
            .read("big", 0, from, 10_000, Duration::ZERO)
            .await
            .unwrap();
        assert!(!r.records.is_empty(), "stopped at {}", ids.len());
        let bytes: usize = r.records.iter().map(|r| r.event.len()).sum();
        assert!(bytes <= flotilla_broker::engine::MAX_READ_BYTES, "{bytes}");
        reads.push(r.records.len());
        ids.extend(r.records.iter().map(|r| event_id(&r.event)));
        from = r.next;
    }
    assert!(reads.len() >= 2, "{reads:?}");
    let want: Vec<String> = (0..80).map(|i| format!("b{i}")).collect();
    assert_eq!(ids, want);
    env.close().await;
}

/// A partition key is at most 256 bytes, with no control characters:
/// a longer one's length wrapped in the embedded store (a corrupt record,
/// and a broker that would not start when it was a partition's last), and
/// a line break made the NATS client panic. Refused with what to fix;
/// nothing of the batch is stored.
async fn partition_keys_are_bounded(kind: Kind) {
    let env = Env::start(&kind, |c| {
        c.streams.insert(
            "keys".into(),
            StreamConfig {
                partitions: 2,
                ..Default::default()
            },
        );
    })
    .await;
    let e = &*env.engine;
    let longest = "k".repeat(256);
    let ok = e
        .put_records(
            "keys",
            vec![event("fits", "t", &[("partitionkey", &longest)]).into()],
        )
        .await
        .unwrap();
    for bad in ["k".repeat(257), "a\r\nb".to_string(), "x".repeat(70_000)] {
        let refused = e
            .put_records(
                "keys",
                vec![
                    event("first", "t", &[("partitionkey", "fine")]).into(),
                    event("bad", "t", &[("partitionkey", &bad)]).into(),
                ],
            )
            .await;
        assert!(
            matches!(&refused, Err(EngineError::InvalidArgument { problem, .. }) if problem.contains("partitionkey")),
            "{refused:?}"
        );
    }
    // An id standing in for a missing key is held to the same bound.
    let long_id = e
        .put_records("keys", vec![event(&"i".repeat(300), "t", &[]).into()])
        .await;
    assert!(
        matches!(&long_id, Err(EngineError::InvalidArgument { problem, .. }) if problem.contains("`id`")),
        "{long_id:?}"
    );
    let read = e
        .read(
            "keys",
            ok[0].partition,
            StreamPosition::TrimHorizon,
            100,
            Duration::ZERO,
        )
        .await
        .unwrap();
    let keys: Vec<&str> = read
        .records
        .iter()
        .map(|r| r.partition_key.as_str())
        .collect();
    assert_eq!(keys, [longest.as_str()], "only the record that fits");
    env.close().await;
}

async fn partitions_sequences_iterators(kind: Kind) {
    let env = Env::start(&kind, |c| {
        c.streams.insert(
            "clicks".into(),
            StreamConfig {
                partitions: 4,
                ..Default::default()
            },
        );
    })
    .await;
    let e = &*env.engine;
    let records: Vec<OutgoingRecord> = (0..20)
        .map(|i| {
            let key = format!("user{}", i % 5);
            event(&format!("r{i}"), "click", &[("partitionkey", &key)]).into()
        })
        .collect();
    let positions = e.put_records("clicks", records).await.unwrap();
    for (i, p) in positions.iter().enumerate() {
        assert_eq!(p.partition, partition_for(&format!("user{}", i % 5), 4));
    }
    let mut total = 0;
    for p in 0..4 {
        let r = e
            .read(
                "clicks",
                p,
                StreamPosition::TrimHorizon,
                100,
                Duration::ZERO,
            )
            .await
            .unwrap();
        // In order, increasing sequence numbers, right keys.
        let seqs: Vec<u64> = r.records.iter().map(|r| r.sequence).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        for rec in &r.records {
            assert_eq!(partition_for(&rec.partition_key, 4), p);
        }
        let ids: Vec<usize> = r
            .records
            .iter()
            .map(|r| event_id(&r.event)[1..].parse().unwrap())
            .collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "publish order kept: {ids:?}"
        );
        total += r.records.len();
        if let Some(first) = r.records.first() {
            let at = e
                .read(
                    "clicks",
                    p,
                    StreamPosition::AtSequence(first.sequence),
                    1,
                    Duration::ZERO,
                )
                .await
                .unwrap();
            assert_eq!(at.records[0].sequence, first.sequence);
            let after = e
                .read(
                    "clicks",
                    p,
                    StreamPosition::AfterSequence(first.sequence),
                    100,
                    Duration::ZERO,
                )
                .await
                .unwrap();
            assert_eq!(after.records.len(), r.records.len() - 1);
            // Reading on from `next` finds nothing new.
            let tail = e
                .read("clicks", p, r.next, 100, Duration::ZERO)
                .await
                .unwrap();
            assert!(tail.records.is_empty());
        }
    }
    assert_eq!(total, 20);

    // `latest` sees only what comes after it; timestamps find later records.
    let p = partition_for("user1", 4);
    let latest = e
        .read("clicks", p, StreamPosition::Latest, 100, Duration::ZERO)
        .await
        .unwrap();
    assert!(latest.records.is_empty());
    let mark = now_ms();
    let fresh = e
        .put_records(
            "clicks",
            vec![OutgoingRecord {
                event: event("new", "click", &[]),
                partition_key: Some("user1".into()),
            }],
        )
        .await
        .unwrap();
    let after_latest = e
        .read("clicks", p, latest.next, 100, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(after_latest.records.len(), 1);
    assert_eq!(after_latest.records[0].sequence, fresh[0].sequence);
    let by_time = e
        .read(
            "clicks",
            p,
            StreamPosition::AtTimestamp(mark),
            100,
            Duration::ZERO,
        )
        .await
        .unwrap();
    assert!(by_time.records.iter().all(|r| r.timestamp_ms >= mark));
    assert!(by_time.records.iter().any(|r| event_id(&r.event) == "new"));

    let r = e
        .read("clicks", 9, StreamPosition::TrimHorizon, 1, Duration::ZERO)
        .await;
    assert!(matches!(r, Err(EngineError::UnknownPartition { .. })));
    let stats = e.stream_stats("clicks").await.unwrap();
    assert_eq!(stats.iter().map(|s| s.records).sum::<u64>(), 21);
    env.close().await;
}

async fn consumer_groups_split_and_take_over(kind: Kind) {
    let env = Env::start(&kind, |c| {
        c.streams.insert(
            "orders".into(),
            StreamConfig {
                partitions: 4,
                ..Default::default()
            },
        );
    })
    .await;
    let e = &*env.engine;
    let ttl = Duration::from_secs(2);
    let a = e
        .acquire_leases("orders", "analytics", "a", ttl)
        .await
        .unwrap();
    assert_eq!(a.len(), 4, "a lone consumer takes every partition");
    let b = e
        .acquire_leases("orders", "analytics", "b", ttl)
        .await
        .unwrap();
    assert_eq!(b.len(), 2, "a second consumer takes half: {b:?}");
    let a = e
        .acquire_leases("orders", "analytics", "a", ttl)
        .await
        .unwrap();
    let pa: BTreeSet<u32> = a.iter().map(|l| l.partition).collect();
    let pb: BTreeSet<u32> = b.iter().map(|l| l.partition).collect();
    assert_eq!(pa.len(), 2);
    assert!(pa.is_disjoint(&pb), "{pa:?} {pb:?}");

    // a checkpoints its partition; b cannot checkpoint a's.
    e.checkpoint("orders", "analytics", "a", &a[0], 42)
        .await
        .unwrap();
    let stolen = e.checkpoint("orders", "analytics", "b", &a[0], 43).await;
    assert!(
        matches!(stolen, Err(EngineError::LeaseLost { .. })),
        "{stolen:?}"
    );

    // a dies (stops heartbeating): b takes over everything, with a's
    // checkpoint.
    let all = eventually("b to take over", Duration::from_secs(20), || async {
        let l = e
            .acquire_leases("orders", "analytics", "b", ttl)
            .await
            .unwrap();
        (l.len() == 4).then_some(l)
    })
    .await;
    let taken = all.iter().find(|l| l.partition == a[0].partition).unwrap();
    assert_eq!(taken.checkpoint, Some(42));
    // a's old lease is fenced off.
    let late = e.checkpoint("orders", "analytics", "a", &a[0], 44).await;
    assert!(
        matches!(late, Err(EngineError::LeaseLost { .. })),
        "{late:?}"
    );
    e.checkpoint("orders", "analytics", "b", taken, 50)
        .await
        .unwrap();
    e.leave_group("orders", "analytics", "b").await.unwrap();
    let c = e
        .acquire_leases("orders", "analytics", "c", ttl)
        .await
        .unwrap();
    assert_eq!(c.len(), 4, "leaving frees the leases at once");
    env.close().await;
}
