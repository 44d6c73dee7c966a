//! Events end to end against a real broker (embedded engine, plain HTTP on
//! 127.0.0.1): the broker client, the transactional outbox, the inbox and
//! the push extractor.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use flotilla_broker::config::{
    Config, EmbeddedConfig, EngineConfig, PushConfig, PushSubscription, QueueConfig, StreamConfig,
    Subscription, TopicConfig,
};
use flotilla_broker::{Durability, FilterPolicy};
use flotilla_chassis::{
    ApiError, Broker, Error, Event, Inbox, Outbox, PushedEvent, ReceiveOptions, Service, inbox,
    open_sqlite, outbox,
};
use serde_json::{Value, json};
use sqlx::SqlitePool;
use sqlx::migrate::Migrator;

use crate::support::{eventually, http, start, unlistened};

const TRACE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const DEADLINE: Duration = Duration::from_secs(20);

/// A temp dir kept (and printed) when the test fails.
struct Scratch {
    dir: Option<tempfile::TempDir>,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-chassis-events-")
            .tempdir()
            .expect("temp dir");
        Scratch { dir: Some(dir) }
    }

    fn path(&self) -> &std::path::Path {
        self.dir.as_ref().expect("dir").path()
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

/// Topic `orders` fans out to queue `inventory` and the one-partition
/// stream `audit` (whose order the tests check).
fn topology(c: &mut Config) {
    c.topics.insert("orders".into(), TopicConfig::default());
    c.queues.insert(
        "inventory".into(),
        QueueConfig {
            subscribe: Some(Subscription {
                topic: "orders".into(),
                filter: FilterPolicy::default(),
            }),
            ..QueueConfig::default()
        },
    );
    c.streams.insert(
        "audit".into(),
        StreamConfig {
            partitions: 1,
            source: Some(Subscription {
                topic: "orders".into(),
                filter: FilterPolicy::default(),
            }),
            ..StreamConfig::default()
        },
    );
}

/// A broker served over plain HTTP on `listener`.
async fn broker_on(
    scratch: &Scratch,
    listener: tokio::net::TcpListener,
    build: impl FnOnce(&mut Config),
) -> flotilla_broker::Broker {
    let mut config = Config {
        engine: EngineConfig::Embedded(EmbeddedConfig {
            dir: scratch.path().join("broker"),
            durability: Durability::Always,
            ..EmbeddedConfig::default()
        }),
        ..Config::default()
    };
    build(&mut config);
    let broker = flotilla_broker::Broker::open(config)
        .await
        .expect("open broker");
    let serving = broker.clone();
    tokio::spawn(async move { serving.serve(listener).await });
    broker
}

async fn start_broker(scratch: &Scratch) -> (flotilla_broker::Broker, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    (broker_on(scratch, listener, topology).await, addr)
}

fn service(broker: SocketAddr) -> Service {
    Service::from_vars([
        ("FLOTILLA_SERVICE", "orders"),
        ("FLOTILLA_BROKER_URL", &format!("http://{broker}")),
    ])
    .expect("service")
}

async fn database(scratch: &Scratch, name: &str) -> SqlitePool {
    static NONE: Migrator = Migrator::DEFAULT;
    let url = format!("sqlite://{}/{name}.db", scratch.path().display());
    let pool = open_sqlite(&url, &NONE).await.expect("open db");
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, total INTEGER)")
        .execute(&pool)
        .await
        .expect("orders table");
    Outbox::install(&pool).await.expect("outbox");
    Inbox::install(&pool).await.expect("inbox");
    pool
}

/// Receives from `queue` until `n` messages arrived; acks them.
async fn receive_n(broker: &Broker, queue: &str, n: usize) -> Vec<Event> {
    let mut got = Vec::new();
    let end = tokio::time::Instant::now() + DEADLINE;
    while got.len() < n {
        assert!(
            tokio::time::Instant::now() < end,
            "only {} of {n} messages arrived",
            got.len()
        );
        let options = ReceiveOptions {
            wait: Duration::from_secs(2),
            ..ReceiveOptions::default()
        };
        for m in broker.receive(queue, options).await.expect("receive") {
            broker.ack(queue, &m.receipt).await.expect("ack");
            got.push(m.event.expect("a readable event"));
        }
    }
    got
}

/// Reads stream `audit` from the start until `n` records arrived.
async fn audit_ids(broker: &Broker, n: usize) -> Vec<String> {
    let reader = broker
        .stream_consumer("audit", "test-reader", "reader")
        .expect("consumer");
    let mut ids = Vec::new();
    let mut after = None;
    let end = tokio::time::Instant::now() + DEADLINE;
    while ids.len() < n {
        assert!(
            tokio::time::Instant::now() < end,
            "only {} of {n} records",
            ids.len()
        );
        for r in reader
            .read(0, after, 100, Duration::from_secs(2))
            .await
            .expect("read")
        {
            after = Some(r.sequence);
            ids.push(r.event.expect("a readable event").id);
        }
    }
    ids
}

#[tokio::test]
async fn publish_receive_ack_extend_release() {
    let scratch = Scratch::new();
    let (server, addr) = start_broker(&scratch).await;
    let svc = service(addr);
    let broker = svc.broker().expect("broker");

    let event = svc
        .event("order.placed", json!({"order": "o-1", "total": 12}))
        .unwrap()
        .with_subject("o-1")
        .with_extension("customer", "c-42")
        .unwrap();
    broker.publish("orders", &event).await.expect("publish");

    let options = ReceiveOptions {
        max_messages: 10,
        wait: Duration::from_secs(5),
        visibility_timeout: Some(Duration::from_secs(30)),
    };
    let got = broker.receive("inventory", options).await.expect("receive");
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(
        m.event,
        Ok(event.clone()),
        "the event comes back as published"
    );
    assert_eq!(m.receive_count, 1);

    // Extended, it stays hidden; use the receipt the broker returns.
    let receipt = broker
        .extend("inventory", &m.receipt, Duration::from_secs(60))
        .await
        .expect("extend");
    let hidden = broker
        .receive(
            "inventory",
            ReceiveOptions {
                wait: Duration::ZERO,
                ..options
            },
        )
        .await
        .expect("receive");
    assert!(hidden.is_empty());

    // Released, it is delivered again at once, and the first delivery's
    // receipt is stale from then on.
    broker
        .release("inventory", &receipt)
        .await
        .expect("release");
    let again = broker.receive("inventory", options).await.expect("receive");
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].event.as_ref().map(|e| &e.id), Ok(&event.id));
    assert_eq!(again[0].receive_count, 2);
    let err = broker.ack("inventory", &m.receipt).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::CONFLICT), "{err}");
    assert_eq!(err.broker_code(), Some("stale_receipt"), "{err}");
    assert!(matches!(err, Error::Broker { .. }));
    broker
        .ack("inventory", &again[0].receipt)
        .await
        .expect("ack");
    let none = broker
        .receive(
            "inventory",
            ReceiveOptions {
                wait: Duration::ZERO,
                ..options
            },
        )
        .await
        .expect("receive");
    assert!(none.is_empty());

    // Batches, and the errors callers branch on.
    let batch: Vec<Event> = (0..3)
        .map(|i| svc.event("order.placed", json!({ "n": i })).unwrap())
        .collect();
    broker.publish_batch("orders", &batch).await.expect("batch");
    let ids: Vec<String> = receive_n(&broker, "inventory", 3)
        .await
        .into_iter()
        .map(|e| e.id)
        .collect();
    for e in &batch {
        assert!(ids.contains(&e.id));
    }
    let err = broker.publish("undeclared", &event).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::NOT_FOUND), "{err}");
    assert_eq!(err.broker_code(), Some("unknown_topic"), "{err}");
    let err = broker.publish("a/b", &event).await.unwrap_err();
    assert!(matches!(err, Error::BrokerName { .. }), "{err:?}");

    server.close().await;

    // Held, unlistened, to the end: nothing else can take the port.
    let (_held, nowhere) = unlistened();
    let err = service(nowhere)
        .broker()
        .unwrap()
        .publish("orders", &event)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Unreachable { ref dep, .. } if dep == "broker"),
        "{err:?}"
    );
    assert!(err.is_dependency_failure());
}

/// A binary-mode event, as a publisher other than the chassis may send:
/// the broker stores it, the chassis cannot read it as an [`Event`].
const BINARY: &str = r#"{"specversion":"1.0","id":"bin-1","source":"/camera","type":"photo.taken","datacontenttype":"image/png","data_base64":"iVBORw0KGgo="}"#;

#[tokio::test]
async fn undecodable_deliveries_can_still_be_settled() {
    let scratch = Scratch::new();
    let (server, addr) = start_broker(&scratch).await;
    let svc = service(addr);
    let broker = svc.broker().expect("broker");
    let response = http()
        .post(format!("http://{addr}/topics/orders/events"))
        .header("content-type", "application/cloudevents+json")
        .body(BINARY)
        .send()
        .await
        .expect("publish binary");
    assert!(response.status().is_success(), "{response:?}");
    let readable = svc.event("order.placed", json!({"n": 1})).unwrap();
    broker.publish("orders", &readable).await.expect("publish");

    // The queue: both come back, the binary one with its receipt, so it
    // can be acked instead of coming back after every visibility timeout.
    let options = ReceiveOptions {
        wait: Duration::from_secs(2),
        visibility_timeout: Some(Duration::from_millis(300)),
        ..ReceiveOptions::default()
    };
    let mut got = Vec::new();
    let end = tokio::time::Instant::now() + DEADLINE;
    while got.len() < 2 {
        assert!(tokio::time::Instant::now() < end, "got only {got:?}");
        got.extend(broker.receive("inventory", options).await.expect("receive"));
    }
    let bad = got
        .iter()
        .find(|m| m.event.is_err())
        .expect("the binary event is returned");
    let err = bad.event.as_ref().unwrap_err();
    assert!(err.reason.contains("data_base64"), "{err}");
    assert_eq!(err.raw["id"], "bin-1");
    assert_eq!(bad.receive_count, 1);
    for m in &got {
        broker.ack("inventory", &m.receipt).await.expect("ack");
    }
    // Had an ack been lost, its message would be visible again after the
    // 300 ms visibility timeout, and a long poll of a second returns it.
    let none = broker
        .receive(
            "inventory",
            ReceiveOptions {
                wait: Duration::from_secs(1),
                ..options
            },
        )
        .await
        .expect("receive");
    assert!(none.is_empty(), "acked, not redelivered: {none:?}");

    // The stream: the binary record keeps its place, so a consumer that
    // checkpoints the last record read moves past it.
    let reader = broker
        .stream_consumer("audit", "skipper", "s")
        .expect("consumer");
    let lease = reader.lease().await.expect("lease")[0];
    let mut records = Vec::new();
    while records.len() < 2 {
        assert!(tokio::time::Instant::now() < end, "got only {records:?}");
        let after = records
            .last()
            .map(|r: &flotilla_chassis::Record| r.sequence);
        records.extend(
            reader
                .read(0, after, 10, Duration::from_secs(2))
                .await
                .expect("read"),
        );
    }
    assert!(records[0].event.is_err(), "published first: {records:?}");
    assert_eq!(records[1].event.as_ref().map(|e| &e.id), Ok(&readable.id));
    reader
        .checkpoint(&lease, records[1].sequence)
        .await
        .expect("checkpoint");
    let rest = reader
        .read(0, Some(records[1].sequence), 10, Duration::ZERO)
        .await
        .expect("read");
    assert!(rest.is_empty());
    server.close().await;
}

#[tokio::test]
async fn stream_consumer_leases_reads_and_checkpoints() {
    let scratch = Scratch::new();
    let (server, addr) = start_broker(&scratch).await;
    let svc = service(addr);
    let broker = svc.broker().expect("broker");
    let events: Vec<Event> = (0..3)
        .map(|i| svc.event("order.placed", json!({ "n": i })).unwrap())
        .collect();
    broker
        .publish_batch("orders", &events)
        .await
        .expect("publish");

    let a = broker
        .stream_consumer("audit", "billing", "a")
        .expect("consumer")
        .with_lease_ttl(Duration::from_secs(30));
    let leases = a.lease().await.expect("lease");
    assert_eq!(leases.len(), 1);
    let lease = leases[0];
    assert_eq!((lease.partition, lease.checkpoint), (0, None));

    let mut records = Vec::new();
    let end = tokio::time::Instant::now() + DEADLINE;
    while records.len() < 3 {
        assert!(tokio::time::Instant::now() < end, "records did not arrive");
        let after = records
            .last()
            .map(|r: &flotilla_chassis::Record| r.sequence);
        records.extend(
            a.read(0, after, 10, Duration::from_secs(2))
                .await
                .expect("read"),
        );
    }
    let ids: Vec<&str> = records
        .iter()
        .map(|r| r.event.as_ref().expect("readable").id.as_str())
        .collect();
    let want: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, want, "in order");
    let last = records[2].sequence;
    a.checkpoint(&lease, last).await.expect("checkpoint");

    let renewed = a.lease().await.expect("renew");
    assert_eq!(renewed[0].checkpoint, Some(last));
    let rest = a
        .read(0, renewed[0].checkpoint, 10, Duration::ZERO)
        .await
        .expect("read");
    assert!(rest.is_empty());

    // Another member gets nothing while `a` holds the partition, and cannot
    // move the group's position.
    let b = broker
        .stream_consumer("audit", "billing", "b")
        .expect("consumer");
    assert!(b.lease().await.expect("lease").is_empty());
    let forged = flotilla_chassis::Lease {
        token: lease.token + 1000,
        ..lease
    };
    let err = b.checkpoint(&forged, last + 1).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::CONFLICT), "{err}");
    assert_eq!(err.broker_code(), Some("lease_lost"), "{err}");

    // When `a` leaves, `b` takes over at the checkpoint.
    a.leave().await.expect("leave");
    let taken = b.lease().await.expect("lease");
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].checkpoint, Some(last));
    server.close().await;
}

/// The `sent_ms` of every outbox row, in `seq` order.
async fn outbox_rows(pool: &SqlitePool) -> Vec<(String, Option<i64>, i64, Option<String>)> {
    sqlx::query_as("SELECT event, sent_ms, attempts, last_error FROM flotilla_outbox ORDER BY seq")
        .fetch_all(pool)
        .await
        .expect("outbox rows")
}

#[tokio::test]
async fn outbox_publishes_committed_rows_only() {
    let scratch = Scratch::new();
    let (server, addr) = start_broker(&scratch).await;
    let svc = service(addr);
    let broker = svc.broker().expect("broker");
    let pool = database(&scratch, "orders").await;
    let relay = Outbox::spawn_relay(pool.clone(), broker.clone());

    // Rolled back: neither the order nor its event.
    let ghost = svc
        .event("order.placed", json!({"order": "ghost"}))
        .unwrap();
    {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO orders (id, total) VALUES ('ghost', 1)")
            .execute(&mut *tx)
            .await
            .unwrap();
        outbox::enqueue(&mut tx, "orders", &ghost).await.unwrap();
        tx.rollback().await.unwrap();
    }
    relay.notify();

    // Committed: the order and its event together.
    let placed = svc.event("order.placed", json!({"order": "o-1"})).unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders (id, total) VALUES ('o-1', 12)")
        .execute(&mut *tx)
        .await
        .unwrap();
    outbox::enqueue(&mut tx, "orders", &placed).await.unwrap();
    tx.commit().await.unwrap();
    relay.notify();

    let got = receive_n(&broker, "inventory", 1).await;
    assert_eq!(got, vec![placed.clone()]);
    let rows = eventually(DEADLINE, || {
        let pool = pool.clone();
        async move {
            let rows = outbox_rows(&pool).await;
            rows.iter().all(|r| r.1.is_some()).then_some(rows)
        }
    })
    .await;
    assert_eq!(
        rows.len(),
        1,
        "the rolled-back event never reached the table"
    );
    assert_eq!(rows[0].2, 1, "one attempt");
    assert_eq!(rows[0].3, None);
    let none = broker
        .receive(
            "inventory",
            ReceiveOptions {
                wait: Duration::from_millis(200),
                ..ReceiveOptions::default()
            },
        )
        .await
        .unwrap();
    assert!(none.is_empty(), "published once: {none:?}");

    // A sensitive event: published, then its row is gone, and its bytes
    // with it (secure_delete, once the WAL is checkpointed).
    let secret = "4242424242424242";
    let paid = svc
        .event("order.placed", json!({"order": "o-2", "card": secret}))
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    outbox::enqueue_sensitive(&mut tx, "orders", &paid)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    relay.notify();
    let got = receive_n(&broker, "inventory", 1).await;
    assert_eq!(got, vec![paid.clone()]);
    eventually(DEADLINE, || {
        let pool = pool.clone();
        async move { (outbox_rows(&pool).await.len() == 1).then_some(()) }
    })
    .await;
    assert!(outbox_rows(&pool).await[0].0.contains(r#""order":"o-1""#));
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&pool)
        .await
        .unwrap();
    let db = scratch.path().join("orders.db");
    for file in [db.clone(), db.with_extension("db-wal")] {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{} still holds the card number",
            file.display()
        );
    }

    // Invalid input fails the request, not the relay.
    let mut tx = pool.begin().await.unwrap();
    let err = outbox::enqueue(&mut tx, "a/b", &placed).await.unwrap_err();
    assert!(matches!(err, Error::BrokerName { .. }), "{err:?}");
    let mut bad = placed.clone();
    bad.extensions.insert("Bad".into(), json!(1));
    let err = outbox::enqueue(&mut tx, "orders", &bad).await.unwrap_err();
    assert!(matches!(err, Error::InvalidEvent { .. }), "{err:?}");
    drop(tx);

    relay.stop().await;
    server.close().await;
}

/// An outbox table made before `keep_sent` existed gains the column, and
/// its rows are kept once sent as before.
#[tokio::test]
async fn outbox_install_adds_keep_sent_to_an_older_table() {
    let scratch = Scratch::new();
    static NONE: Migrator = Migrator::DEFAULT;
    let url = format!("sqlite://{}/old.db", scratch.path().display());
    let pool = open_sqlite(&url, &NONE).await.expect("open db");
    sqlx::raw_sql(
        "CREATE TABLE flotilla_outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, event TEXT NOT NULL,
            created_ms INTEGER NOT NULL, sent_ms INTEGER, attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT);
         INSERT INTO flotilla_outbox (topic, event, created_ms) VALUES ('orders', '{}', 1);",
    )
    .execute(&pool)
    .await
    .unwrap();
    Outbox::install(&pool)
        .await
        .expect("install on an older table");
    Outbox::install(&pool).await.expect("install again");
    let kept: Vec<i64> = sqlx::query_scalar("SELECT keep_sent FROM flotilla_outbox")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(kept, [1]);
}

#[tokio::test]
async fn outbox_waits_for_the_broker_and_keeps_order() {
    let scratch = Scratch::new();
    // A port where nothing listens yet; the broker starts there later, on
    // this same socket, so no other test's socket can take the port first.
    let (socket, addr) = unlistened();
    let svc = service(addr);
    let broker = svc.broker().expect("broker");
    let pool = database(&scratch, "orders").await;
    let relay = Outbox::spawn_relay(pool.clone(), broker.clone());

    let events: Vec<Event> = (0..5)
        .map(|i| svc.event("order.placed", json!({ "n": i })).unwrap())
        .collect();
    for e in &events {
        let mut tx = pool.begin().await.unwrap();
        outbox::enqueue(&mut tx, "orders", e).await.unwrap();
        tx.commit().await.unwrap();
        relay.notify();
    }
    // The relay tried, failed, recorded why, and keeps every row.
    eventually(DEADLINE, || {
        let pool = pool.clone();
        async move {
            let rows = outbox_rows(&pool).await;
            (rows.len() == 5 && rows.iter().any(|r| r.2 >= 2)).then_some(())
        }
    })
    .await;
    let rows = outbox_rows(&pool).await;
    assert!(rows.iter().all(|r| r.1.is_none()), "nothing sent yet");
    let error = rows.iter().find_map(|r| r.3.clone()).expect("last_error");
    assert!(error.contains("unreachable"), "{error}");

    let listener = socket.listen(1024).expect("listen");
    let server = broker_on(&scratch, listener, topology).await;
    let want: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(audit_ids(&broker, 5).await, want, "published in order");
    eventually(DEADLINE, || {
        let pool = pool.clone();
        async move {
            let rows = outbox_rows(&pool).await;
            rows.iter()
                .all(|r| r.1.is_some() && r.3.is_none())
                .then_some(())
        }
    })
    .await;
    relay.stop().await;
    server.close().await;
}

#[tokio::test]
async fn outbox_refused_topic_does_not_block_others() {
    let scratch = Scratch::new();
    let (server, addr) = start_broker(&scratch).await;
    let svc = service(addr);
    let broker = svc.broker().expect("broker");
    let pool = database(&scratch, "orders").await;
    let relay = Outbox::spawn_relay(pool.clone(), broker.clone());

    let lost = svc.event("order.lost", json!({})).unwrap();
    let placed = svc.event("order.placed", json!({})).unwrap();
    let mut tx = pool.begin().await.unwrap();
    outbox::enqueue(&mut tx, "undeclared", &lost).await.unwrap();
    outbox::enqueue(&mut tx, "orders", &placed).await.unwrap();
    tx.commit().await.unwrap();
    relay.notify();

    assert_eq!(receive_n(&broker, "inventory", 1).await, vec![placed]);
    let (sent, error) = eventually(DEADLINE, || {
        let pool = pool.clone();
        async move {
            let rows = outbox_rows(&pool).await;
            match rows.as_slice() {
                [refused, ok] if ok.1.is_some() && refused.3.is_some() => {
                    Some((refused.1, refused.3.clone().unwrap_or_default()))
                }
                _ => None,
            }
        }
    })
    .await;
    assert_eq!(sent, None, "the refused row is kept");
    assert!(error.contains("unknown_topic"), "{error}");
    relay.stop().await;
    server.close().await;
}

#[tokio::test]
async fn two_relays_on_one_database_publish_each_event_once() {
    let scratch = Scratch::new();
    let (server, addr) = start_broker(&scratch).await;
    let svc = service(addr);
    let broker = svc.broker().expect("broker");
    let pool = database(&scratch, "orders").await;
    // A second replica: its own pool on the same file.
    let pool2 = database(&scratch, "orders").await;
    let relays = [
        Outbox::spawn_relay(pool.clone(), broker.clone()),
        Outbox::spawn_relay(pool2.clone(), broker.clone()),
    ];
    let events: Vec<Event> = (0..20)
        .map(|i| svc.event("order.placed", json!({ "n": i })).unwrap())
        .collect();
    for (i, e) in events.iter().enumerate() {
        let (pool, relay) = if i % 2 == 0 {
            (&pool, &relays[0])
        } else {
            (&pool2, &relays[1])
        };
        let mut tx = pool.begin().await.unwrap();
        outbox::enqueue(&mut tx, "orders", e).await.unwrap();
        tx.commit().await.unwrap();
        relay.notify();
    }
    let want: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(audit_ids(&broker, 20).await, want, "once each, in order");
    eventually(DEADLINE, || {
        let pool = pool.clone();
        async move {
            outbox_rows(&pool)
                .await
                .iter()
                .all(|r| r.1.is_some())
                .then_some(())
        }
    })
    .await;
    let extra = broker
        .stream_consumer("audit", "check", "c")
        .unwrap()
        .read(0, None, 100, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(extra.len(), 20, "no duplicates");
    for r in &relays {
        r.stop().await;
    }
    server.close().await;
}

#[tokio::test]
async fn inbox_runs_the_handler_once() {
    let scratch = Scratch::new();
    let pool = database(&scratch, "inventory").await;
    let event = Event::new("orders", "order.placed", json!({"order": "o-1"})).unwrap();

    async fn handle(pool: &SqlitePool, event: &Event) -> Result<bool, Error> {
        let mut tx = pool.begin().await.expect("begin");
        if !inbox::claim(&mut tx, "reserve-stock", event).await? {
            return Ok(false);
        }
        sqlx::query("INSERT INTO orders (id, total) VALUES (?1, 0)")
            .bind(&event.id)
            .execute(&mut *tx)
            .await
            .expect("handler write");
        tx.commit().await.expect("commit");
        Ok(true)
    }

    // A claim that rolls back does not count.
    {
        let mut tx = pool.begin().await.unwrap();
        assert!(
            inbox::claim(&mut tx, "reserve-stock", &event)
                .await
                .unwrap()
        );
    }
    assert!(handle(&pool, &event).await.unwrap(), "first delivery");
    assert!(!handle(&pool, &event).await.unwrap(), "redelivery skipped");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
    // Another consumer of the same event, or another source, is separate.
    let mut tx = pool.begin().await.unwrap();
    assert!(inbox::claim(&mut tx, "notify", &event).await.unwrap());
    let mut other = event.clone();
    other.source = "/payments".into();
    assert!(
        inbox::claim(&mut tx, "reserve-stock", &other)
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();

    assert_eq!(
        Inbox::prune(&pool, inbox::DEFAULT_RETENTION).await.unwrap(),
        0,
        "nothing is that old"
    );

    // An entry older than the retention is forgotten by the pruner's first
    // pass; the recent ones stay.
    sqlx::query("UPDATE flotilla_inbox SET processed_ms = 1 WHERE consumer = 'notify'")
        .execute(&pool)
        .await
        .unwrap();
    let pruner = Inbox::spawn_pruner(pool.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM flotilla_inbox WHERE consumer = 'notify'")
                .fetch_one(&pool)
                .await
                .unwrap();
        if left == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the pruner never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pruner.abort();
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM flotilla_inbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(kept, 2, "recent entries stay");
}

#[derive(Clone)]
struct PushState {
    pool: SqlitePool,
    svc: Service,
    /// (event id, the follow-up's traceparent, whether it was a duplicate)
    seen: tokio::sync::mpsc::Sender<(String, Option<String>, bool)>,
}

#[derive(serde::Deserialize)]
struct Order {
    total: i64,
}

/// An idempotent push handler, as a service writes one.
async fn on_order(
    State(state): State<PushState>,
    PushedEvent(event): PushedEvent,
) -> Result<StatusCode, ApiError> {
    let order: Order = event.data_as()?;
    let mut tx = state.pool.begin().await?;
    if !inbox::claim(&mut tx, "on-order", &event).await? {
        let _ = state.seen.send((event.id.clone(), None, true)).await;
        return Ok(StatusCode::OK);
    }
    sqlx::query("INSERT INTO orders (id, total) VALUES (?1, ?2)")
        .bind(&event.id)
        .bind(order.total)
        .execute(&mut *tx)
        .await?;
    // A follow-up event joins the trace the broker passed on.
    let follow = state.svc.event("stock.reserved", json!({}))?;
    tx.commit().await?;
    let _ = state
        .seen
        .send((
            event.id.clone(),
            follow.traceparent().map(str::to_owned),
            false,
        ))
        .await;
    Ok(StatusCode::OK)
}

#[tokio::test]
async fn pushed_events_are_extracted_deduplicated_and_garbage_is_refused() {
    let scratch = Scratch::new();
    let pool = database(&scratch, "inventory").await;
    let (tx, mut seen) = tokio::sync::mpsc::channel(16);
    let state = PushState {
        pool: pool.clone(),
        svc: Service::from_vars([("FLOTILLA_SERVICE", "inventory")]).unwrap(),
        seen: tx,
    };
    let router = Router::new()
        .route("/events/orders", post(on_order))
        .with_state(state);
    let running = start("inventory", &[], router).await;
    let url = running.url("/events/orders");

    // Garbage is a 4xx, so the broker dead-letters instead of retrying.
    let client = http();
    for (content_type, body, status, code) in [
        (
            "application/cloudevents+json",
            "not json",
            400,
            "invalid_cloudevent",
        ),
        (
            "application/cloudevents+json",
            r#"{"specversion":"1.0","id":"1","source":"/s"}"#,
            400,
            "invalid_cloudevent",
        ),
        ("text/plain", "{}", 415, "unsupported_media_type"),
        (
            "application/cloudevents+json",
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":{"total":"twelve"}}"#,
            400,
            "invalid_event_data",
        ),
        (
            "application/json",
            r#"{"specversion":"1.0","id":"2","source":"/s","type":"t","data":{"total":12}}"#,
            200,
            "",
        ),
    ] {
        let res = client
            .post(&url)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), status, "{body}");
        if status != 200 {
            let body: Value = res.json().await.unwrap();
            assert_eq!(body["error"]["code"], code, "{body}");
        }
    }
    while seen.try_recv().is_ok() {}

    // Pushed by a real broker, twice: handled once, trace carried on.
    let broker_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broker_addr = broker_listener.local_addr().unwrap();
    let push_url = url.clone();
    let server = broker_on(&scratch, broker_listener, move |c| {
        c.topics.insert(
            "orders".into(),
            TopicConfig {
                push: [(
                    "inventory".to_owned(),
                    PushSubscription {
                        filter: FilterPolicy::default(),
                        deliver: PushConfig::new(push_url),
                        max_receives: 5,
                        dead_letter: None,
                    },
                )]
                .into(),
            },
        );
    })
    .await;
    let broker = service(broker_addr).broker().unwrap();
    let event = Event::new("orders", "order.placed", json!({"total": 12}))
        .unwrap()
        .with_extension("traceparent", TRACE)
        .unwrap();
    broker.publish("orders", &event).await.unwrap();
    broker.publish("orders", &event).await.unwrap();
    // Both deliveries arrive (possibly at once); one is handled, the other
    // is recognised as a duplicate.
    let mut deliveries = Vec::new();
    for _ in 0..2 {
        deliveries.push(
            tokio::time::timeout(DEADLINE, seen.recv())
                .await
                .expect("pushed in time")
                .expect("handled"),
        );
    }
    deliveries.sort_by_key(|d| d.2);
    assert_eq!(
        deliveries[0],
        (event.id.clone(), Some(TRACE.to_owned()), false)
    );
    assert_eq!(deliveries[1], (event.id.clone(), None, true));
    server.close().await;
    let handled: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE id = ?1")
        .bind(&event.id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(handled, 1);
    running.stop().await.unwrap();
}
