//! Durability and faults of the embedded engine: kill -9 while publishing,
//! a full disk, group commit, restart, and a slow consumer's backlog.
//!
//! The kill and memory tests run the broker in a child process (this test
//! binary re-invoked with an environment variable), so the kill is real and
//! the memory figure is the broker's alone.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_broker::config::{EmbeddedConfig, EngineConfig};
use flotilla_broker::engine::embedded::FaultInjection;
use flotilla_broker::engine::{EngineError, OutgoingMessage, ReceiveRequest, StreamPosition};
use flotilla_broker::{
    Broker, Config, Durability, FilterPolicy, QueueConfig, StreamConfig, Subscription, TopicConfig,
};

use crate::support::{Http, Scratch, event, event_id, receive_n};

const CHILD_DIR: &str = "FLOTILLA_BROKER_TEST_CHILD_DIR";

fn config(dir: &Path, fault: Option<FaultInjection>) -> Config {
    let mut c = Config {
        engine: EngineConfig::Embedded(EmbeddedConfig {
            dir: dir.to_owned(),
            durability: Durability::Always,
            fault_injection: fault,
            ..EmbeddedConfig::default()
        }),
        ..Config::default()
    };
    c.topics.insert("events".into(), TopicConfig::default());
    c.queues.insert(
        "sink".into(),
        QueueConfig {
            subscribe: Some(Subscription {
                topic: "events".into(),
                filter: FilterPolicy::default(),
            }),
            ..Default::default()
        },
    );
    c.streams.insert(
        "log".into(),
        StreamConfig {
            partitions: 2,
            ..Default::default()
        },
    );
    c
}

/// Runs `test` of this binary (an `#[ignore]`d child entry point, hence
/// `--ignored`) alone in a process of its own, with `dir` as its data dir.
fn child(test: &str, dir: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args([
            test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child test process")
}

/// Drains everything in `queue`, returning how often each event id came.
async fn drain(broker: &Broker, queue: &str) -> HashMap<String, usize> {
    let e = broker.engine();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut empty = 0;
    while empty < 2 {
        let batch = e
            .receive(
                queue,
                ReceiveRequest {
                    max_messages: 10,
                    wait: Duration::from_millis(300),
                    visibility_timeout: Some(Duration::from_secs(600)),
                    one_per_group: false,
                },
            )
            .await
            .expect("receive");
        if batch.is_empty() {
            empty += 1;
            continue;
        }
        empty = 0;
        let receipts: Vec<_> = batch.iter().map(|d| d.receipt.clone()).collect();
        for d in &batch {
            *seen.entry(event_id(&d.event)).or_default() += 1;
        }
        e.ack(queue, &receipts).await.expect("ack");
    }
    seen
}

/// Child side of the kill -9 test: publishes until killed, printing every
/// acknowledged event id. Ignored, so a normal run does not list it as a
/// passed test that checked nothing; the parent runs it with `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of faults::kill9_during_publishing_loses_no_acknowledged_message, which runs it"]
async fn kill9_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return; // only does anything when spawned by the parent test
    };
    if !dir.ends_with("kill9") {
        return;
    }
    let broker = Broker::open(config(Path::new(&dir), None))
        .await
        .expect("open");
    let engine = broker.engine();
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let mut tasks = Vec::new();
    // Eight concurrent publishers, some single events and some batches, so
    // commits are shared; a safety stop in case the parent never kills us.
    for w in 0..8 {
        let (engine, out) = (engine.clone(), out.clone());
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut n = 0u64;
            while started.elapsed() < Duration::from_secs(60) {
                let size = if w % 2 == 0 { 1 } else { 10 };
                let events: Vec<_> = (0..size)
                    .map(|i| event(&format!("w{w}-{n}-{i}"), "t", &[]))
                    .collect();
                let ids: Vec<String> = events.iter().map(|e| e.id().to_owned()).collect();
                engine.publish("events", events).await.expect("publish");
                let mut out = out.lock().expect("stdout");
                for id in ids {
                    writeln!(out, "acked {id}").expect("write");
                }
                out.flush().expect("flush");
                n += 1;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_publishing_loses_no_acknowledged_message() {
    let scratch = Scratch::new();
    let dir = scratch.path.join("kill9");
    let mut child = child("faults::kill9_child", &dir);
    let stdout = child.stdout.take().expect("stdout");
    // Bounded: the reader thread waits if the test falls behind.
    let (tx, rx) = std::sync::mpsc::sync_channel::<String>(1024);
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(id) = line.strip_prefix("acked ")
                && tx.send(id.to_owned()).is_err()
            {
                break;
            }
        }
    });
    let mut acked = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < 3000 {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(id) => {
                acked.insert(id);
            }
            Err(e) => panic!("child stopped acknowledging after {}: {e}", acked.len()),
        }
        assert!(Instant::now() < deadline, "child too slow");
    }
    child.kill().expect("SIGKILL the broker"); // SIGKILL on Unix
    child.wait().expect("reap child");
    // Acks printed before the kill but not read yet count too. Drain while
    // the reader finishes so it never blocks on a full channel.
    loop {
        acked.extend(rx.try_iter());
        if reader.is_finished() {
            break;
        }
        if let Ok(id) = rx.recv_timeout(Duration::from_millis(50)) {
            acked.insert(id);
        }
    }
    let _ = reader.join();
    acked.extend(rx.try_iter());

    let broker = Broker::open(config(&dir, None))
        .await
        .expect("reopen after kill");
    let seen = drain(&broker, "sink").await;
    let lost: Vec<&String> = acked.iter().filter(|id| !seen.contains_key(*id)).collect();
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    let unacked_but_stored = seen.keys().filter(|id| !acked.contains(*id)).count();
    println!(
        "kill -9: {} acknowledged, {} stored, {} lost, {} duplicates, {} stored but unacknowledged (in flight at the kill)",
        acked.len(),
        seen.len(),
        lost.len(),
        duplicates,
        unacked_but_stored
    );
    assert!(lost.is_empty(), "acknowledged messages lost: {lost:?}");
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_fails_the_publish_and_acknowledges_nothing_unstored() {
    let scratch = Scratch::new();
    let dir = scratch.path.join("full");
    let fault = FaultInjection::new();
    let broker = Broker::open(config(&dir, Some(fault.clone())))
        .await
        .expect("open");
    let e = broker.engine();
    let stored: Vec<_> = (0..10)
        .map(|i| event(&format!("ok{i}"), "t", &[]))
        .collect();
    e.publish("events", stored)
        .await
        .expect("publish before the disk fills");

    fault.fail_writes(true);
    let r = e.publish("events", vec![event("lost1", "t", &[])]).await;
    assert!(matches!(r, Err(EngineError::StorageFull(_))), "{r:?}");
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("full"), "{msg}");
    // Over HTTP the publisher gets a clear 507.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let b2 = broker.clone();
    tokio::spawn(async move { b2.serve(listener).await });
    let http = Http::new(addr);
    let (status, body) = http
        .call(
            "POST",
            "/topics/events/events",
            "application/cloudevents+json",
            event("lost2", "t", &[]).as_bytes().clone(),
        )
        .await;
    assert!(status == 507 || status == 503, "{status} {body}");
    let (status, body) = http.call("GET", "/readyz", "", "").await;
    assert_eq!(status, 503, "not ready after a storage failure: {body}");
    // Space is back, but this process stays read-only until restarted.
    fault.fail_writes(false);
    let r = e.publish("events", vec![event("lost3", "t", &[])]).await;
    assert!(r.is_err(), "writes must stay refused after a failed commit");
    broker.close().await;

    let broker = Broker::open(config(&dir, None)).await.expect("reopen");
    let seen = drain(&broker, "sink").await;
    let mut ids: Vec<_> = seen.keys().cloned().collect();
    ids.sort();
    let want: Vec<String> = (0..10).map(|i| format!("ok{i}")).collect();
    assert_eq!(ids, want, "exactly the acknowledged events are stored");
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_share_fsyncs() {
    let scratch = Scratch::new();
    let fault = FaultInjection::new();
    let broker = Broker::open(config(&scratch.path.join("gc"), Some(fault.clone())))
        .await
        .expect("open");
    let e = broker.engine();
    let before = fault.syncs();
    for i in 0..8 {
        e.publish("events", vec![event(&format!("s{i}"), "t", &[])])
            .await
            .unwrap();
    }
    let per_publish = (fault.syncs() - before) as f64 / 8.0;
    assert!(per_publish >= 1.0, "always mode fsyncs each publish");
    let before = fault.syncs();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let e = e.clone();
        tasks.push(tokio::spawn(async move {
            e.publish("events", vec![event(&format!("c{i}"), "t", &[])])
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let syncs = fault.syncs() - before;
    println!(
        "group commit: 64 concurrent publishes, {syncs} fsyncs ({per_publish:.1} per sequential publish)"
    );
    assert!(
        (syncs as f64) < 64.0 * per_publish / 2.0,
        "{syncs} fsyncs for 64 concurrent publishes"
    );
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_restart() {
    let scratch = Scratch::new();
    let dir = scratch.path.join("restart");
    let mut cfg = config(&dir, None);
    if let Some(q) = cfg.queues.get_mut("sink") {
        q.visibility_timeout = Duration::from_millis(200);
    }
    let broker = Broker::open(cfg.clone()).await.expect("open");
    let e = broker.engine();
    e.publish("events", vec![event("again", "t", &[])])
        .await
        .unwrap();
    e.send(
        "sink",
        vec![OutgoingMessage {
            event: event("delayed", "t", &[]),
            delay: Some(Duration::from_secs(1)),
        }],
    )
    .await
    .unwrap();
    e.put_records("log", vec![event("rec", "t", &[]).into()])
        .await
        .unwrap();
    let d1 = receive_n(&*e, "sink", 1, Duration::from_millis(200)).await;
    assert_eq!(event_id(&d1[0].event), "again");
    let d2 = receive_n(&*e, "sink", 1, Duration::from_secs(60)).await;
    assert_eq!(d2[0].receive_count, 2);
    let leases = e
        .acquire_leases("log", "g", "c", Duration::from_secs(30))
        .await
        .unwrap();
    for l in &leases {
        e.checkpoint("log", "g", "c", l, 7).await.unwrap();
    }
    broker.close().await;

    let broker = Broker::open(cfg).await.expect("reopen");
    let e = broker.engine();
    let mut got = HashMap::new();
    for d in receive_n(&*e, "sink", 2, Duration::from_secs(60)).await {
        got.insert(event_id(&d.event), d.receive_count);
    }
    assert_eq!(
        got.get("again"),
        Some(&3),
        "receive counts persist: {got:?}"
    );
    assert_eq!(got.get("delayed"), Some(&1), "{got:?}");
    let leases = e
        .acquire_leases("log", "g", "c", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(leases.iter().all(|l| l.checkpoint == Some(7)), "{leases:?}");
    let mut total = 0;
    for p in 0..2 {
        total += e
            .read("log", p, StreamPosition::TrimHorizon, 10, Duration::ZERO)
            .await
            .unwrap()
            .records
            .len();
    }
    assert_eq!(total, 1);
    broker.close().await;
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Child side of the backlog test: fills a queue nobody consumes and
/// reports memory before and after. Ignored, so a normal run does not list
/// it as a passed test that checked nothing; the parent runs it with
/// `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of faults::slow_consumer_backlog_stays_on_disk, which runs it"]
async fn backlog_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return; // only does anything when spawned by the parent test
    };
    if !dir.ends_with("backlog") {
        return;
    }
    let mut cfg = config(Path::new(&dir), None);
    if let EngineConfig::Embedded(e) = &mut cfg.engine {
        e.cache_bytes = 16 << 20;
        e.durability = Durability::Interval(Duration::from_millis(100));
    }
    let broker = Broker::open(cfg).await.expect("open");
    let e = broker.engine();
    let pad = "x".repeat(900);
    let batch = |from: usize| -> Vec<_> {
        (from..from + 500)
            .map(|i| {
                flotilla_broker::CloudEvent::new(
                    &format!("b{i}"),
                    "/backlog",
                    "t",
                    &[],
                    &serde_json::json!({ "pad": pad }),
                )
                .expect("event")
            })
            .collect()
    };
    // Warm up (allocator, cache) before the baseline.
    for k in 0..20 {
        e.publish("events", batch(k * 500)).await.expect("publish");
    }
    let before = rss_bytes();
    let total = 120_000;
    for k in 20..total / 500 {
        e.publish("events", batch(k * 500)).await.expect("publish");
    }
    let after = rss_bytes();
    let stats = e.queue_stats("sink").await.expect("stats");
    let file = std::fs::metadata(Path::new(&dir).join("broker.redb"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "backlog rss_before {before} rss_after {after} ready {} file {file}",
        stats.ready
    );
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_backlog_stays_on_disk() {
    let scratch = Scratch::new();
    let dir = scratch.path.join("backlog");
    let child = child("faults::backlog_child", &dir);
    let out = child.wait_with_output().expect("child output");
    assert!(out.status.success(), "backlog child failed");
    let text = String::from_utf8_lossy(&out.stdout);
    // libtest may print the test name on the same line first.
    let line = text
        .lines()
        .find_map(|l| l.find("backlog rss_before").map(|at| &l[at..]))
        .unwrap_or_else(|| panic!("no report in child output:\n{text}"));
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [before, after, ready, file] = nums[..] else {
        panic!("bad report: {line}")
    };
    println!("{line}");
    assert_eq!(ready, 120_000);
    let payload = 120_000u64 * 1000;
    assert!(file > payload, "the backlog is in the file ({file} bytes)");
    let growth = after.saturating_sub(before);
    assert!(
        growth < 48 << 20,
        "memory grew by {} MiB for a {} MiB backlog",
        growth >> 20,
        payload >> 20
    );
}
