//! Push delivery: POSTs queue messages and stream records to subscribers.
//!
//! One task per subscription. Queue subscriptions receive in batches and
//! deliver concurrently up to the subscription's limit; the queue's own
//! machinery holds the retry state, so a broker restart loses nothing:
//! 2xx acks, 429/5xx/408/timeouts/connection errors set the message's
//! visibility to an exponential backoff with jitter (honouring
//! `Retry-After`), other 4xx dead-letter at once, and a message that reaches
//! `max_receives` is dead-lettered. Stream subscriptions take partition
//! leases in the consumer group `push` and deliver each partition strictly
//! in order, checkpointing after every record; a record that keeps failing
//! is skipped after `max_attempts` (streams have no dead-letter queue).
//! The CloudEvent's `traceparent` extension is also sent as the
//! `traceparent` header so the subscriber joins the publisher's trace.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotilla_mesh::{ExpectedPeer, Identity};
use http::{HeaderValue, StatusCode, header};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::cloudevent;
use crate::config::PushConfig;
use crate::engine::{Delivery, Engine, EngineError, Lease, ReceiveRequest, StreamPosition};
use crate::metrics::PUSH_DELIVERIES;

/// The consumer group stream push delivery uses.
pub const PUSH_GROUP: &str = "push";
/// How long a stream push lease lives without a heartbeat.
const LEASE_TTL: Duration = Duration::from_secs(15);
const HEARTBEAT: Duration = Duration::from_secs(5);
/// Pause after an engine error before trying again, so a broken engine is
/// not spun on.
const ENGINE_RETRY: Duration = Duration::from_secs(1);
/// Longest response body read (and discarded) to keep the connection.
const MAX_RESPONSE: usize = 64 << 10;

type HttpClient = reqwest::Client;

/// The client one subscription delivers with. With the broker's identity it
/// speaks mutual TLS and accepts only the subscriber's service (`peer`), so
/// an event can never be handed to another service that took over a port;
/// without one (tests, plain `http://` endpoints) it is plain HTTP.
pub(crate) fn client(identity: Option<&Identity>, cfg: &PushConfig) -> Result<HttpClient, String> {
    // reqwest is built without a default crypto provider (to keep aws-lc-rs
    // out) and panics without one; ring is the process's provider. An
    // error means one is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
        .pool_idle_timeout(Duration::from_secs(30));
    if let (Some(identity), Some(peer)) = (identity, cfg.peer.as_deref()) {
        let config = flotilla_mesh::client_config(identity, ExpectedPeer::service(peer))
            .map_err(|e| flotilla_mesh::tls::error_chain(&e))?;
        builder = builder.tls_backend_preconfigured(rustls::ClientConfig::clone(&config));
    }
    builder.build().map_err(|e| e.to_string())
}

/// Builds the subscription's client; a failure (a broken identity) is
/// logged and retried rather than ending delivery for good.
async fn client_or_wait(
    identity: Option<&Identity>,
    cfg: &PushConfig,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<HttpClient> {
    loop {
        match client(identity, cfg) {
            Ok(c) => return Some(c),
            Err(e) => {
                tracing::error!(url = %cfg.url, error = %e, "cannot build the push client; retrying")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(ENGINE_RETRY) => {}
            _ = shutdown.changed() => return None,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Delivered,
    Retry(Option<Duration>),
    Reject(StatusCode),
}

fn traceparent(event: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Trace {
        traceparent: Option<String>,
    }
    serde_json::from_slice::<Trace>(event).ok()?.traceparent
}

async fn post(client: &HttpClient, cfg: &PushConfig, event: &Bytes) -> Outcome {
    let mut req = client
        .post(&cfg.url)
        .header(header::CONTENT_TYPE, cloudevent::CONTENT_TYPE)
        .timeout(cfg.timeout)
        .body(event.clone());
    if let Some(tp) = traceparent(event).and_then(|t| HeaderValue::from_str(&t).ok()) {
        req = req.header("traceparent", tp);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) if e.is_builder() => return Outcome::Reject(StatusCode::BAD_REQUEST),
        Err(_) => return Outcome::Retry(None),
    };
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    // Drain a small body so the connection can be reused; a large one is
    // dropped with its connection.
    if resp
        .content_length()
        .is_some_and(|n| n as usize <= MAX_RESPONSE)
    {
        let _ = resp.bytes().await;
    }
    if status.is_success() {
        Outcome::Delivered
    } else if status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
    {
        Outcome::Retry(retry_after)
    } else {
        Outcome::Reject(status)
    }
}

/// Exponential backoff with "equal jitter": half the step fixed, half
/// random, so retries spread out but never collapse to zero.
pub(crate) fn backoff(cfg: &PushConfig, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(30));
    let step = cfg.backoff_min.saturating_mul(factor).min(cfg.backoff_max);
    let half = step / 2;
    half + half.mul_f64(rand::random::<f64>())
}

fn count(subscription: &str, outcome: &'static str) {
    metrics::counter!(PUSH_DELIVERIES, "subscription" => subscription.to_owned(), "outcome" => outcome)
        .increment(1);
}

/// Settles delivery `d` of `queue` by how its POST went: acknowledged,
/// put back with backoff, or dead-lettered.
async fn settle(
    engine: &dyn Engine,
    queue: &str,
    cfg: &PushConfig,
    max_receives: Option<u32>,
    d: &Delivery,
    outcome: Outcome,
) {
    let result = match outcome {
        Outcome::Delivered => {
            count(queue, "ok");
            let acked = engine.ack(queue, std::slice::from_ref(&d.receipt)).await;
            acked.map(|_| ())
        }
        Outcome::Retry(after) if max_receives.is_none_or(|m| d.receive_count < m) => {
            count(queue, "retry");
            let wait = backoff(cfg, d.receive_count).max(after.unwrap_or_default());
            let wait = wait.min(crate::config::MAX_VISIBILITY);
            let put_back = engine.change_visibility(queue, &d.receipt, wait).await;
            put_back.map(|_| ())
        }
        Outcome::Retry(_) | Outcome::Reject(_) => {
            tracing::info!(queue = %queue, receive_count = d.receive_count, outcome = ?outcome, "push delivery gave up; dead-lettering");
            count(queue, "dead_letter");
            engine.dead_letter(queue, &d.receipt).await
        }
    };
    if let Err(e) = result {
        // Stale: it expired and went to someone else.
        tracing::debug!(queue = %queue, error = %e, "push settle failed");
    }
}

/// Delivers a queue's messages to `cfg.url` until `shutdown` turns true.
/// From a FIFO queue (`fifo`) it receives one message of each group at a
/// time: the next of a group only once the one before it is acknowledged
/// or dead-lettered (a receive could hold several of one group, POSTed at
/// once, the second arriving first or succeeding while the first waited
/// to be retried), so that the subscriber sees each group in order.
pub(crate) fn spawn_queue(
    engine: Arc<dyn Engine>,
    queue: String,
    cfg: PushConfig,
    max_receives: Option<u32>,
    fifo: bool,
    identity: Option<Identity>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(client) = client_or_wait(identity.as_ref(), &cfg, &mut shutdown).await else {
            return;
        };
        let cfg = Arc::new(cfg);
        // One permit per POST in flight: the subscription's concurrency.
        let permits = Arc::new(Semaphore::new(cfg.concurrency));
        let mut tasks = JoinSet::new();
        loop {
            while tasks.try_join_next().is_some() {}
            let first = tokio::select! {
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = shutdown.changed() => break,
            };
            let mut held = vec![first];
            while held.len() < crate::config::MAX_RECEIVE_BATCH {
                match permits.clone().try_acquire_owned() {
                    Ok(p) => held.push(p),
                    Err(_) => break,
                }
            }
            let request = ReceiveRequest {
                max_messages: held.len(),
                wait: crate::config::MAX_WAIT,
                // Long enough that a slow POST is not redelivered under it.
                visibility_timeout: Some(cfg.timeout + Duration::from_secs(5)),
                one_per_group: fifo,
            };
            let got = tokio::select! {
                r = engine.receive(&queue, request) => r,
                _ = shutdown.changed() => break,
            };
            let deliveries = match got {
                Ok(d) => d,
                Err(EngineError::Closed) => break,
                Err(e) => {
                    tracing::warn!(queue = %queue, error = %e, "push receive failed");
                    tokio::time::sleep(ENGINE_RETRY).await;
                    continue;
                }
            };
            for d in deliveries {
                let Some(permit) = held.pop() else { break };
                let (engine, client, cfg, queue) =
                    (engine.clone(), client.clone(), cfg.clone(), queue.clone());
                tasks.spawn(async move {
                    let _permit = permit;
                    let outcome = post(&client, &cfg, &d.event).await;
                    settle(&*engine, &queue, &cfg, max_receives, &d, outcome).await;
                });
            }
        }
        tasks.shutdown().await;
    })
}

/// Delivers a stream's records to `cfg.url`, in order per partition, while
/// this broker holds the partition's lease.
pub(crate) fn spawn_stream(
    engine: Arc<dyn Engine>,
    stream: String,
    cfg: PushConfig,
    consumer: String,
    identity: Option<Identity>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(client) = client_or_wait(identity.as_ref(), &cfg, &mut shutdown).await else {
            return;
        };
        let cfg = Arc::new(cfg);
        let permits = Arc::new(Semaphore::new(cfg.concurrency));
        let mut running: HashMap<u32, (u64, tokio::task::JoinHandle<()>)> = HashMap::new();
        loop {
            match engine
                .acquire_leases(&stream, PUSH_GROUP, &consumer, LEASE_TTL)
                .await
            {
                Ok(leases) => {
                    running.retain(|p, (token, h)| {
                        let keep = !h.is_finished()
                            && leases
                                .iter()
                                .any(|l| l.partition == *p && l.token == *token);
                        if !keep {
                            h.abort();
                        }
                        keep
                    });
                    for lease in leases {
                        if running.contains_key(&lease.partition) {
                            continue;
                        }
                        let token = lease.token;
                        let partition = lease.partition;
                        let h = tokio::spawn(deliver_partition(
                            engine.clone(),
                            client.clone(),
                            cfg.clone(),
                            permits.clone(),
                            stream.clone(),
                            consumer.clone(),
                            lease,
                        ));
                        running.insert(partition, (token, h));
                    }
                }
                Err(EngineError::Closed) => break,
                Err(e) => {
                    tracing::warn!(stream = %stream, error = %e, "push lease heartbeat failed")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(HEARTBEAT) => {}
                _ = shutdown.changed() => break,
            }
        }
        for (_, (_, h)) in running {
            h.abort();
        }
        let _ = engine.leave_group(&stream, PUSH_GROUP, &consumer).await;
    })
}

async fn deliver_partition(
    engine: Arc<dyn Engine>,
    client: HttpClient,
    cfg: Arc<PushConfig>,
    permits: Arc<Semaphore>,
    stream: String,
    consumer: String,
    lease: Lease,
) {
    let label = format!("stream:{stream}");
    let mut from = lease
        .checkpoint
        .map_or(StreamPosition::TrimHorizon, StreamPosition::AfterSequence);
    loop {
        let batch = match engine
            .read(&stream, lease.partition, from, 100, crate::config::MAX_WAIT)
            .await
        {
            Ok(b) => b,
            Err(EngineError::Closed) => return,
            Err(e) => {
                tracing::warn!(stream = %stream, partition = lease.partition, error = %e, "push read failed");
                tokio::time::sleep(ENGINE_RETRY).await;
                continue;
            }
        };
        for rec in &batch.records {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let outcome = {
                    let Ok(_permit) = permits.acquire().await else {
                        return;
                    };
                    post(&client, &cfg, &rec.event).await
                };
                match outcome {
                    Outcome::Delivered => {
                        count(&label, "ok");
                        break;
                    }
                    Outcome::Retry(after) if attempt < cfg.max_attempts => {
                        count(&label, "retry");
                        tokio::time::sleep(backoff(&cfg, attempt).max(after.unwrap_or_default()))
                            .await;
                    }
                    other => {
                        count(&label, "dropped");
                        tracing::warn!(stream = %stream, partition = lease.partition, sequence = rec.sequence, outcome = ?other, "push delivery gave up on a stream record; skipping it");
                        break;
                    }
                }
            }
            match engine
                .checkpoint(&stream, PUSH_GROUP, &consumer, &lease, rec.sequence)
                .await
            {
                Ok(()) => {}
                Err(EngineError::LeaseLost { .. }) | Err(EngineError::Closed) => return,
                Err(e) => {
                    tracing::warn!(stream = %stream, error = %e, "push checkpoint failed")
                }
            }
        }
        from = batch.next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let cfg = PushConfig {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            ..PushConfig::new("http://127.0.0.1:1/")
        };
        for attempt in 1..20 {
            let b = backoff(&cfg, attempt);
            let step = (Duration::from_millis(100) * 2u32.pow((attempt - 1).min(10)))
                .min(Duration::from_secs(1));
            assert!(b >= step / 2 && b <= step, "attempt {attempt}: {b:?}");
        }
    }

    #[test]
    fn traceparent_is_read_from_the_event() {
        let e = br#"{"specversion":"1.0","id":"1","source":"s","type":"t","traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}"#;
        assert_eq!(
            traceparent(e).as_deref(),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
    }
}
