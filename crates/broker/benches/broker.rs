//! Embedded engine vs NATS JetStream, through the same `Engine` trait.
//!
//! Run with `benches/broker/run.sh` (or `cargo bench -p flotilla-broker
//! --bench broker`). Starts its own `nats-server -js` (file storage) in a
//! temp dir unless `FLOTILLA_BENCH_NATS_URL` points at one. Every message
//! is a 1 KiB CloudEvent. Durability: nats-server 2.9 writes each message
//! to the OS and fsyncs on its sync interval (2 min; it has no per-message
//! fsync option), so the embedded engine runs in `interval` mode (fsync
//! every second); `always` rows (fsync before every ack) are shown for
//! reference against the same NATS figure.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_broker::config::{EmbeddedConfig, EngineConfig, NatsConfig};
use flotilla_broker::engine::{Engine, OutgoingMessage, ReceiveRequest};
use flotilla_broker::{Broker, CloudEvent, Config, Durability, QueueConfig};

const PAD: usize = 860;

fn event(i: u64) -> CloudEvent {
    let sent = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    CloudEvent::new(
        &format!("e{i:012}"),
        "/bench",
        "bench.event",
        &[],
        &serde_json::json!({ "t": sent, "pad": "x".repeat(PAD) }),
    )
    .expect("event")
}

fn sent_ns(bytes: &[u8]) -> u64 {
    #[derive(serde::Deserialize)]
    struct D {
        t: u64,
    }
    #[derive(serde::Deserialize)]
    struct E {
        data: D,
    }
    serde_json::from_slice::<E>(bytes).map_or(0, |e| e.data.t)
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn rss_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn config(engine: EngineConfig, queues: &[&str]) -> Config {
    let mut c = Config {
        engine,
        ..Config::default()
    };
    for q in queues {
        c.queues.insert(
            (*q).to_owned(),
            QueueConfig {
                visibility_timeout: Duration::from_secs(60),
                ..Default::default()
            },
        );
    }
    c
}

struct Results {
    publish_single: f64,
    publish_batched: f64,
    p50: Duration,
    p99: Duration,
    consume: f64,
}

async fn publish_single(e: &dyn Engine, queue: &str, n: u64) -> f64 {
    let start = Instant::now();
    for i in 0..n {
        e.send(queue, vec![event(i).into()]).await.expect("send");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn publish_batched(e: &dyn Engine, queue: &str, n: u64, batch: u64) -> f64 {
    let start = Instant::now();
    let mut i = 0;
    while i < n {
        let msgs: Vec<OutgoingMessage> = (i..i + batch).map(|j| event(j).into()).collect();
        e.send(queue, msgs).await.expect("send batch");
        i += batch;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn consume(e: Arc<dyn Engine>, queue: &str, n: u64, workers: usize) -> f64 {
    let start = Instant::now();
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (e, q, done) = (e.clone(), queue.to_owned(), done.clone());
        tasks.push(tokio::spawn(async move {
            let stall = Instant::now() + Duration::from_secs(120);
            while done.load(std::sync::atomic::Ordering::Relaxed) < n {
                assert!(
                    Instant::now() < stall,
                    "consume stalled at {} of {n}",
                    done.load(std::sync::atomic::Ordering::Relaxed)
                );
                let batch = e
                    .receive(
                        &q,
                        ReceiveRequest {
                            max_messages: 10,
                            wait: Duration::from_millis(200),
                            visibility_timeout: None,
                            one_per_group: false,
                        },
                    )
                    .await
                    .expect("receive");
                if batch.is_empty() {
                    continue;
                }
                let receipts: Vec<_> = batch.iter().map(|d| d.receipt.clone()).collect();
                e.ack(&q, &receipts).await.expect("ack");
                done.fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("consumer");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn latency(e: Arc<dyn Engine>, queue: &str, n: usize) -> Vec<Duration> {
    let (e2, q) = (e.clone(), queue.to_owned());
    let consumer = tokio::spawn(async move {
        let mut samples = Vec::with_capacity(n);
        let stall = Instant::now() + Duration::from_secs(120);
        while samples.len() < n {
            assert!(
                Instant::now() < stall,
                "latency run stalled at {} of {n}",
                samples.len()
            );
            let batch = e2
                .receive(
                    &q,
                    ReceiveRequest {
                        max_messages: 10,
                        wait: Duration::from_secs(5),
                        visibility_timeout: None,
                        one_per_group: false,
                    },
                )
                .await
                .expect("receive");
            let now = now_ns();
            for d in &batch {
                samples.push(Duration::from_nanos(now.saturating_sub(sent_ns(&d.event))));
            }
            let receipts: Vec<_> = batch.iter().map(|d| d.receipt.clone()).collect();
            if !receipts.is_empty() {
                e2.ack(&q, &receipts).await.expect("ack");
            }
        }
        samples
    });
    // Paced publishing (a load shape, not synchronisation): ~1000 msg/s.
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    for i in 0..n as u64 {
        tick.tick().await;
        e.send(queue, vec![event(i).into()]).await.expect("send");
    }
    consumer.await.expect("consumer")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Each measure runs three times (the machine is shared, so single runs are
/// noisy): throughputs report the median, latencies pool the samples.
async fn run(name: &str, engine: EngineConfig, scale: u64) -> Results {
    const RUNS: usize = 3;
    let queues: Vec<String> = (0..RUNS)
        .flat_map(|r| ["single", "batched", "lat", "consume"].map(|q| format!("{q}{r}")))
        .collect();
    let names: Vec<&str> = queues.iter().map(String::as_str).collect();
    let broker = Broker::open(config(engine, &names))
        .await
        .expect("open broker");
    let e = broker.engine();
    // Warm up connections and caches.
    publish_single(&*e, "single0", 200).await;
    let (mut single, mut batched, mut consumed, mut lat) = (vec![], vec![], vec![], vec![]);
    for r in 0..RUNS {
        single.push(publish_single(&*e, &format!("single{r}"), 3_000 * scale).await);
        batched.push(publish_batched(&*e, &format!("batched{r}"), 30_000 * scale, 100).await);
        lat.extend(latency(e.clone(), &format!("lat{r}"), 1_000).await);
        publish_batched(&*e, &format!("consume{r}"), 30_000 * scale, 100).await;
        consumed.push(consume(e.clone(), &format!("consume{r}"), 30_000 * scale, 4).await);
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    eprintln!("  {name}: done");
    broker.close().await;
    Results {
        publish_single: median(single),
        publish_batched: median(batched),
        p50: pct(0.50),
        p99: pct(0.99),
        consume: median(consumed),
    }
}

/// Fills one queue with `n` messages and reports this process's RSS
/// growth (run in a child so nothing else is in the figure).
async fn rss_child(dir: &str, n: u64) {
    let before = rss_of("self");
    let broker = Broker::open(config(
        EngineConfig::Embedded(EmbeddedConfig {
            dir: dir.into(),
            durability: Durability::Interval(Duration::from_secs(1)),
            ..EmbeddedConfig::default()
        }),
        &["backlog"],
    ))
    .await
    .expect("open");
    let e = broker.engine();
    let mut peak = 0;
    let mut i = 0;
    while i < n {
        let msgs: Vec<OutgoingMessage> = (i..i + 500).map(|j| event(j).into()).collect();
        e.send("backlog", msgs).await.expect("send");
        i += 500;
        if i % 100_000 == 0 {
            peak = peak.max(rss_of("self"));
        }
    }
    let after = rss_of("self");
    broker.close().await;
    println!("rss {before} {} {}", after.max(peak), after);
}

async fn nats_fill(url: &str, n: u64) {
    let broker = Broker::open(config(
        EngineConfig::Nats(NatsConfig {
            url: url.into(),
            prefix: format!("rss{}", std::process::id()),
            replicas: 1,
        }),
        &["backlog"],
    ))
    .await
    .expect("open nats");
    let e = broker.engine();
    let mut i = 0;
    while i < n {
        let msgs: Vec<OutgoingMessage> = (i..i + 500).map(|j| event(j).into()).collect();
        e.send("backlog", msgs).await.expect("send");
        i += 500;
    }
    broker.close().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct NatsServer {
    child: std::process::Child,
    url: String,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_nats(dir: &std::path::Path) -> NatsServer {
    let port = free_port();
    let child = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nats-server (apt-get install nats-server)");
    let url = format!("nats://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while async_nats::connect(url.as_str()).await.is_err() {
        assert!(Instant::now() < deadline, "nats-server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    NatsServer { child, url }
}

fn row(name: &str, flotilla: f64, nats: f64, unit: &str) {
    println!(
        "| {name:<38} | {flotilla:>12.0} {unit:<5} | {nats:>12.0} {unit:<5} | {:>6.2}x |",
        flotilla / nats
    );
}

fn lat_row(name: &str, flotilla: Duration, nats: Duration) {
    println!(
        "| {name:<38} | {:>12.3} ms    | {:>12.3} ms    | {:>6.2}x |",
        flotilla.as_secs_f64() * 1e3,
        nats.as_secs_f64() * 1e3,
        nats.as_secs_f64() / flotilla.as_secs_f64()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--rss-child") {
        let dir = args.get(at + 1).expect("dir");
        let n: u64 = args
            .get(at + 2)
            .and_then(|s| s.parse().ok())
            .unwrap_or(1_000_000);
        rss_child(dir, n).await;
        return;
    }
    let scale: u64 = std::env::var("FLOTILLA_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let backlog: u64 = std::env::var("FLOTILLA_BENCH_BACKLOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let tmp = tempfile::tempdir().expect("temp dir");
    let external = std::env::var("FLOTILLA_BENCH_NATS_URL").ok();
    let server = match &external {
        Some(_) => None,
        None => Some(start_nats(&tmp.path().join("nats")).await),
    };
    let url = external
        .clone()
        .or_else(|| server.as_ref().map(|s| s.url.clone()))
        .expect("nats url");
    let nats_pid = server.as_ref().map(|s| s.child.id().to_string());

    eprintln!("running: nats ({url})");
    let nats = run(
        "nats",
        EngineConfig::Nats(NatsConfig {
            url: url.clone(),
            prefix: format!("bench{}", std::process::id()),
            replicas: 1,
        }),
        scale,
    )
    .await;
    eprintln!("running: embedded, interval (fsync every 1 s)");
    let interval = run(
        "embedded/interval",
        EngineConfig::Embedded(EmbeddedConfig {
            dir: tmp.path().join("interval"),
            durability: Durability::Interval(Duration::from_secs(1)),
            ..EmbeddedConfig::default()
        }),
        scale,
    )
    .await;
    eprintln!("running: embedded, always (fsync before every ack)");
    let always = run(
        "embedded/always",
        EngineConfig::Embedded(EmbeddedConfig {
            dir: tmp.path().join("always"),
            durability: Durability::Always,
            ..EmbeddedConfig::default()
        }),
        scale,
    )
    .await;

    eprintln!("running: backlog of {backlog} messages");
    let out = Command::new(std::env::current_exe().expect("self"))
        .arg("--rss-child")
        .arg(tmp.path().join("backlog"))
        .arg(backlog.to_string())
        .output()
        .expect("rss child");
    let text = String::from_utf8_lossy(&out.stdout);
    let nums: Vec<u64> = text
        .lines()
        .find(|l| l.starts_with("rss "))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|w| w.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let (emb_before, emb_peak) = (
        nums.first().copied().unwrap_or(0),
        nums.get(1).copied().unwrap_or(0),
    );
    let nats_before = nats_pid.as_deref().map_or(0, rss_of);
    nats_fill(&url, backlog).await;
    let nats_after = nats_pid.as_deref().map_or(0, rss_of);

    println!();
    println!(
        "1 KiB CloudEvents; one process, 2 cores shared; NATS: nats-server 2.9 -js (file store, fsync every 2 min); embedded interval: fsync every 1 s; embedded always: fsync before each ack (group commit)."
    );
    println!(
        "| {:<38} | {:>18} | {:>18} | {:>7} |",
        "measure", "flotilla embedded", "NATS JetStream", "ratio"
    );
    println!(
        "|{}|{}|{}|{}|",
        "-".repeat(40),
        "-".repeat(20),
        "-".repeat(20),
        "-".repeat(9)
    );
    row(
        "publish, single (interval)",
        interval.publish_single,
        nats.publish_single,
        "msg/s",
    );
    row(
        "publish, single (always)",
        always.publish_single,
        nats.publish_single,
        "msg/s",
    );
    row(
        "publish, batches of 100 (interval)",
        interval.publish_batched,
        nats.publish_batched,
        "msg/s",
    );
    row(
        "publish, batches of 100 (always)",
        always.publish_batched,
        nats.publish_batched,
        "msg/s",
    );
    lat_row("publish→deliver p50 (interval)", interval.p50, nats.p50);
    lat_row("publish→deliver p99 (interval)", interval.p99, nats.p99);
    lat_row("publish→deliver p50 (always)", always.p50, nats.p50);
    lat_row("publish→deliver p99 (always)", always.p99, nats.p99);
    row(
        "consume + ack, 4 consumers (interval)",
        interval.consume,
        nats.consume,
        "msg/s",
    );
    row(
        "consume + ack, 4 consumers (always)",
        always.consume,
        nats.consume,
        "msg/s",
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "| {:<38} | {:>12.0} MiB   | {:>12} MiB   | {:>7} |",
        format!("RSS growth, backlog of {backlog}"),
        mib(emb_peak.saturating_sub(emb_before)),
        if nats_pid.is_some() {
            format!("{:.0}", mib(nats_after.saturating_sub(nats_before)))
        } else {
            "n/a".into()
        },
        "lower"
    );
    println!(
        "| {:<38} | {:>12.0} MiB   | {:>12} MiB   | {:>7} |",
        "RSS after the backlog (absolute)",
        mib(emb_peak),
        if nats_pid.is_some() {
            format!("{:.0}", mib(nats_after))
        } else {
            "n/a".into()
        },
        ""
    );
    println!(
        "(ratio = flotilla / NATS for throughput, NATS / flotilla for latency: above 1.00x means flotilla is better; RSS: peak growth of a process holding only the embedded engine vs growth of nats-server)"
    );
}
