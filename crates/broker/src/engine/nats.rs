//! The NATS JetStream engine: the same semantics, with all state in NATS.
//!
//! The broker process keeps no durable state, so any number of broker
//! replicas can run against one NATS cluster. The mapping (names start with
//! the configured prefix `P`):
//!
//! - queue `q`: a work-queue stream `P_Q_q` on subject `P.q.q` with one
//!   durable pull consumer `work`. Visibility timeout = the consumer's
//!   AckWait; extending sends in-progress acks (and keeps sending them from
//!   this process for extensions beyond AckWait); shorter visibility and
//!   release use NAK with a delay. `max_receives` = MaxDeliver: when NATS
//!   gives up on a message it publishes a max-deliveries advisory, and a
//!   broker (one per queue group) moves the message to the dead-letter
//!   queue. FIFO queues have MaxAckPending 1 and deduplicate with
//!   `Nats-Msg-Id` in a 5-minute duplicate window.
//! - topic: no NATS object. A publish is fanned out by the broker to the
//!   subjects of the matching queues and streams (filter policies look at
//!   CloudEvent attributes, which subjects cannot express) and acknowledged
//!   when every target stream acknowledged it.
//! - stream `s`: a stream `P_S_s` on subjects `P.s.s.<partition>`; reads are
//!   short-lived ordered consumers filtered to one partition. Sequence
//!   numbers are the NATS stream sequence: increasing per partition, with
//!   gaps (as in Kinesis).
//! - consumer groups: one document per group (members and leases) in the
//!   stream `P_STATE` (one message per subject), updated with
//!   compare-and-set on the subject's last sequence. (The key-value API is
//!   not used: it fails against nats-server 2.9.)
//!
//! Receipts carry the ack subject and the delivery's deadline. NATS would
//! accept an ack from an earlier delivery and delete a message that was
//! since redelivered, so the broker refuses receipts past their deadline
//! (minus a safety margin) itself.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{
    self, AckKind,
    consumer::{self, AckPolicy, DeliverPolicy, PullConsumer},
    context::PublishErrorKind,
    message::PublishMessage,
    stream::{self, LastRawMessageErrorKind, RetentionPolicy, StorageType},
};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::join_all;

use super::leases::{self, LeaseState};
use super::{
    Delivery, Engine, EngineError, Lease, OutgoingMessage, OutgoingRecord, PartitionStats,
    PublishOutcome, QueueStats, ReadResult, Receipt, ReceiveRequest, Record, RecordPosition,
    SendOutcome, StreamPosition, check_delay, check_visibility, now_ms, partition_for,
};
use crate::cloudevent::CloudEvent;
use crate::config::{DEDUP_WINDOW, NatsConfig, QueueConfig, StreamConfig, Target, Topology};
use crate::engine::embedded::check_member_name;
use crate::filter::FilterPolicy;

const ORIGIN: &str = "Flotilla-Origin";
const NOT_BEFORE: &str = "Flotilla-Not-Before";
const KEY: &str = "Flotilla-Key";
const CONSUMER: &str = "work";
/// Most extensions beyond AckWait kept alive by this process at once; each
/// is a small task. Beyond it, extensions are refused rather than growing.
const MAX_KEEPALIVES: usize = 100_000;
/// Most revoked receipts remembered; the oldest-expiring are forgotten
/// first when full.
const MAX_REVOKED: usize = 100_000;
/// Compare-and-set attempts on a consumer-group document before giving up.
const CAS_ATTEMPTS: usize = 50;
/// Bytes of every NATS message kept for this engine's headers: the
/// server's `max_payload` limits payload and headers together, so events are
/// limited to `max_payload` less this. It covers `Flotilla-Key` with a key
/// at its 256-byte maximum, `Flotilla-Not-Before`, `Flotilla-Origin` (a
/// dead-letter move or redrive) and a FIFO `Nats-Msg-Id` (the hex of
/// `source` + `id`) for a `source` and `id` of up to ~1.9 KiB together; a
/// message whose headers are longer still is checked exactly and refused
/// whole.
pub const HEADER_ROOM: usize = 4096;

fn nats<E: std::error::Error + Send + Sync + 'static>(
    op: &'static str,
) -> impl Fn(E) -> EngineError {
    move |e| EngineError::Nats {
        op,
        source: Box::new(e),
    }
}

fn nats_boxed(op: &'static str) -> impl Fn(async_nats::Error) -> EngineError {
    move |source| EngineError::Nats { op, source }
}

struct NQueue {
    config: QueueConfig,
    subject: String,
    stream: stream::Stream,
    consumer: PullConsumer,
    ack_wait: Duration,
    dead_letter: Option<String>,
    dead_lettered: AtomicU64,
}

struct NStream {
    config: StreamConfig,
    subject: String,
    stream: stream::Stream,
}

enum NTarget {
    Queue(String),
    Stream(String),
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: String,
    queues: HashMap<String, NQueue>,
    streams: HashMap<String, NStream>,
    topics: HashMap<String, Vec<(NTarget, FilterPolicy)>>,
    state: stream::Stream,
    keepalive: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// Receipts whose visibility was cut short (release, shorter timeout),
    /// until their original deadline: NATS would still honour their ack
    /// subject. Per process; see docs/broker.md.
    revoked: Mutex<HashMap<String, u64>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    closed: AtomicBool,
    /// The largest event: `Limits.max_event_bytes`, at most the server's
    /// `max_payload` less [`HEADER_ROOM`].
    max_event_bytes: usize,
}

/// The NATS JetStream engine. Cheap to clone.
#[derive(Clone)]
pub struct NatsEngine {
    inner: Arc<Inner>,
}

/// A decoded receipt: the delivery's ack subject and its deadline.
struct NReceipt {
    deadline_ms: u64,
    reply: String,
}

impl NReceipt {
    fn parse(r: &Receipt) -> Result<Self, EngineError> {
        let bad = || EngineError::InvalidReceipt(r.0.clone());
        let (deadline, reply) = r.0.split_once(':').ok_or_else(bad)?;
        if !reply.starts_with("$JS.ACK.") {
            return Err(bad());
        }
        Ok(Self {
            deadline_ms: deadline.parse().map_err(|_| bad())?,
            reply: reply.to_owned(),
        })
    }

    fn encode(&self) -> Receipt {
        Receipt(format!("{}:{}", self.deadline_ms, self.reply))
    }

    fn live(&self) -> Result<(), EngineError> {
        if now_ms() >= self.deadline_ms {
            Err(EngineError::StaleReceipt)
        } else {
            Ok(())
        }
    }

    /// The stream sequence in the ack subject (v1: 9 tokens, v2: 11+).
    fn stream_sequence(&self) -> Option<u64> {
        let tokens: Vec<&str> = self.reply.split('.').collect();
        let at = if tokens.len() == 9 { 5 } else { 7 };
        tokens.get(at)?.parse().ok()
    }
}

/// How early before NATS's own timer a receipt is considered stale: the
/// broker's clock starts before the server's, but acks take time to land.
fn margin(visibility: Duration) -> u64 {
    (visibility.as_millis() as u64 / 10).clamp(20, 2_000)
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The size of a message on the wire as the NATS client counts it against
/// `max_payload`: the header block (as `HPUB` sends it) plus the payload.
fn wire_len(headers: &HeaderMap, payload: usize) -> usize {
    if headers.is_empty() {
        return payload;
    }
    let mut len = b"NATS/1.0\r\n".len() + b"\r\n".len();
    for (k, vs) in headers.iter() {
        let k: &str = k.as_ref();
        for v in vs {
            len += k.len() + b": ".len() + v.as_str().len() + b"\r\n".len();
        }
    }
    len + payload
}

fn check_prefix(prefix: &str) -> Result<(), EngineError> {
    if prefix.is_empty()
        || prefix.len() > 32
        || !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(EngineError::InvalidArgument {
            what: "nats prefix",
            problem: format!("`{prefix}` must be 1-32 ASCII letters, digits or hyphens"),
        });
    }
    Ok(())
}

/// A consumer group's document in the state stream.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct GroupDoc {
    members: BTreeMap<String, u64>,
    leases: Vec<LeaseState>,
}

impl NatsEngine {
    /// Connects, and creates (or reuses) the streams and consumers of the
    /// topology. `max_event_bytes` (`Limits.max_event_bytes`) is lowered to
    /// the server's `max_payload` less [`HEADER_ROOM`] if it is over it (see
    /// [`NatsEngine::max_event_bytes`]).
    pub async fn open(
        topology: &Topology,
        config: &NatsConfig,
        max_event_bytes: usize,
    ) -> Result<Self, EngineError> {
        check_prefix(&config.prefix)?;
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(config.url.as_str())
            .await
            .map_err(nats("connect"))?;
        let max_payload = client.server_info().max_payload;
        let room = max_payload.saturating_sub(HEADER_ROOM);
        if room == 0 {
            return Err(EngineError::InvalidArgument {
                what: "NATS max_payload",
                problem: format!(
                    "the server at {} allows messages of {max_payload} bytes, which leaves no room for events after {HEADER_ROOM} bytes of headers; raise max_payload in the nats-server configuration",
                    config.url
                ),
            });
        }
        if max_event_bytes > room {
            // Clamped, not refused: the defaults of both (1 MiB) collide, and
            // with NATS the server's max_payload is the message size limit.
            let message = "events are limited to the NATS server's max_payload less room for headers; to allow larger ones raise max_payload in the nats-server configuration (max 64 MiB), or set max_event_bytes to the limit to silence this";
            if max_event_bytes > max_payload {
                tracing::warn!(
                    max_event_bytes,
                    max_payload,
                    limit = room,
                    header_room = HEADER_ROOM,
                    "{message}"
                );
            } else {
                tracing::info!(
                    max_event_bytes,
                    max_payload,
                    limit = room,
                    header_room = HEADER_ROOM,
                    "{message}"
                );
            }
        }
        let max_event_bytes = max_event_bytes.min(room);
        let js = jetstream::new(client.clone());
        let p = &config.prefix;
        let replicas = config.replicas.max(1);
        let mut queues = HashMap::new();
        for (name, spec) in &topology.queues {
            let c = &spec.config;
            let subject = format!("{p}.q.{name}");
            let stream = js
                .get_or_create_stream(stream::Config {
                    name: format!("{p}_Q_{name}"),
                    subjects: vec![subject.clone()],
                    retention: RetentionPolicy::WorkQueue,
                    storage: StorageType::File,
                    max_age: c.retention,
                    num_replicas: replicas,
                    duplicate_window: if c.fifo { DEDUP_WINDOW } else { Duration::ZERO },
                    ..Default::default()
                })
                .await
                .map_err(nats("create queue stream"))?;
            let ack_wait = c.visibility_timeout.max(Duration::from_millis(1));
            let consumer: PullConsumer = stream
                .get_or_create_consumer(
                    CONSUMER,
                    consumer::pull::Config {
                        durable_name: Some(CONSUMER.into()),
                        ack_policy: AckPolicy::Explicit,
                        ack_wait,
                        max_deliver: c.max_receives.map_or(-1, i64::from),
                        max_ack_pending: if c.fifo { 1 } else { c.max_in_flight as i64 },
                        ..Default::default()
                    },
                )
                .await
                .map_err(nats("create queue consumer"))?;
            queues.insert(
                name.clone(),
                NQueue {
                    config: c.clone(),
                    subject,
                    stream,
                    consumer,
                    ack_wait,
                    dead_letter: c.dead_letter.clone(),
                    dead_lettered: AtomicU64::new(0),
                },
            );
        }
        let mut streams = HashMap::new();
        for (name, spec) in &topology.streams {
            let subject = format!("{p}.s.{name}");
            let stream = js
                .get_or_create_stream(stream::Config {
                    name: format!("{p}_S_{name}"),
                    subjects: vec![format!("{subject}.*")],
                    retention: RetentionPolicy::Limits,
                    storage: StorageType::File,
                    max_age: spec.config.retention,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(nats("create stream"))?;
            streams.insert(
                name.clone(),
                NStream {
                    config: spec.config.clone(),
                    subject,
                    stream,
                },
            );
        }
        let state = js
            .get_or_create_stream(stream::Config {
                name: format!("{p}_STATE"),
                subjects: vec![format!("{p}.state.>")],
                max_messages_per_subject: 1,
                storage: StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(nats("create state stream"))?;
        let topics = topology
            .topics
            .iter()
            .map(|(name, routes)| {
                let r = routes
                    .iter()
                    .map(|r| {
                        let t = match &r.target {
                            Target::Queue(q) => NTarget::Queue(q.clone()),
                            Target::Stream(s) => NTarget::Stream(s.clone()),
                        };
                        (t, r.filter.clone())
                    })
                    .collect();
                (name.clone(), r)
            })
            .collect();
        let engine = Self {
            inner: Arc::new(Inner {
                client,
                js,
                prefix: p.clone(),
                queues,
                streams,
                topics,
                state,
                keepalive: Mutex::new(HashMap::new()),
                revoked: Mutex::new(HashMap::new()),
                tasks: Mutex::new(Vec::new()),
                closed: AtomicBool::new(false),
                max_event_bytes,
            }),
        };
        engine.start_dead_letter_listeners().await?;
        Ok(engine)
    }

    /// The largest event this engine stores, in bytes: the configured
    /// `Limits.max_event_bytes`, or the NATS server's `max_payload` less
    /// [`HEADER_ROOM`] if that is smaller. The broker's HTTP API refuses
    /// larger events with 413 before they reach the engine.
    pub fn max_event_bytes(&self) -> usize {
        self.inner.max_event_bytes
    }

    /// One listener per queue with `max_receives`, in a queue group so that
    /// exactly one broker replica moves each message.
    async fn start_dead_letter_listeners(&self) -> Result<(), EngineError> {
        for (name, q) in &self.inner.queues {
            if q.config.max_receives.is_none() {
                continue;
            }
            let subject = format!(
                "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{CONSUMER}",
                q.stream.cached_info().config.name
            );
            let mut sub = self
                .inner
                .client
                .queue_subscribe(subject, format!("{}-dead-letter", self.inner.prefix))
                .await
                .map_err(nats("subscribe to advisories"))?;
            let weak = Arc::downgrade(&self.inner);
            let queue = name.clone();
            let task = tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    let Some(inner) = weak.upgrade() else { return };
                    #[derive(serde::Deserialize)]
                    struct Advisory {
                        stream_seq: u64,
                    }
                    let Ok(a) = serde_json::from_slice::<Advisory>(&msg.payload) else {
                        continue;
                    };
                    if let Err(e) = inner.move_to_dead_letter(&queue, a.stream_seq, None).await {
                        tracing::warn!(queue = %queue, error = %e, "dead-lettering failed");
                    }
                }
            });
            if let Ok(mut t) = self.inner.tasks.lock() {
                t.push(task);
            }
        }
        // Make sure the subscriptions are registered before anyone publishes.
        self.inner
            .client
            .flush()
            .await
            .map_err(nats("flush subscriptions"))
    }
}

impl Inner {
    fn queue(&self, name: &str) -> Result<&NQueue, EngineError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(EngineError::Closed);
        }
        self.queues
            .get(name)
            .ok_or_else(|| EngineError::UnknownQueue(name.to_owned()))
    }

    fn stream(&self, name: &str) -> Result<&NStream, EngineError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(EngineError::Closed);
        }
        self.streams
            .get(name)
            .ok_or_else(|| EngineError::UnknownStream(name.to_owned()))
    }

    async fn ack_kind(&self, reply: &str, kind: AckKind) -> Result<(), EngineError> {
        self.client
            .request(reply.to_owned(), kind.into())
            .await
            .map(|_| ())
            .map_err(nats("ack"))
    }

    /// Parses a receipt and checks it is still the current delivery's.
    fn current(&self, receipt: &Receipt) -> Result<NReceipt, EngineError> {
        let r = NReceipt::parse(receipt)?;
        r.live()?;
        if let Ok(revoked) = self.revoked.lock()
            && revoked.contains_key(&receipt.0)
        {
            return Err(EngineError::StaleReceipt);
        }
        Ok(r)
    }

    fn revoke(&self, receipt: &Receipt, until_ms: u64) {
        if let Ok(mut revoked) = self.revoked.lock() {
            let now = now_ms();
            revoked.retain(|_, until| *until > now);
            if revoked.len() >= MAX_REVOKED
                && let Some(first) = revoked
                    .iter()
                    .min_by_key(|(_, until)| **until)
                    .map(|(k, _)| k.clone())
            {
                revoked.remove(&first);
            }
            revoked.insert(receipt.0.clone(), until_ms);
        }
    }

    fn stop_keepalive(&self, reply: &str) {
        if let Ok(mut k) = self.keepalive.lock()
            && let Some(h) = k.remove(reply)
        {
            h.abort();
        }
    }

    /// Keeps a delivery invisible until `until_ms` by sending in-progress
    /// acks every half AckWait (NATS cannot set a longer AckWait per
    /// message).
    fn keep_alive(
        self: &Arc<Self>,
        reply: &str,
        ack_wait: Duration,
        until_ms: u64,
    ) -> Result<(), EngineError> {
        let mut k = self.keepalive.lock().map_err(|_| EngineError::Closed)?;
        k.retain(|_, h| !h.is_finished());
        if k.len() >= MAX_KEEPALIVES {
            return Err(EngineError::InvalidArgument {
                what: "visibility_timeout",
                problem: "too many deliveries are being extended beyond the queue's visibility timeout on this broker".into(),
            });
        }
        let weak = Arc::downgrade(self);
        let subject = reply.to_owned();
        let every = (ack_wait / 2).max(Duration::from_millis(1));
        let h = tokio::spawn(async move {
            loop {
                if now_ms() + ms(every) >= until_ms {
                    // The last stretch is covered by the last WPI.
                    return;
                }
                tokio::time::sleep(every).await;
                let Some(inner) = weak.upgrade() else { return };
                if inner.ack_kind(&subject, AckKind::Progress).await.is_err() {
                    return;
                }
            }
        });
        if let Some(old) = k.insert(reply.to_owned(), h) {
            old.abort();
        }
        Ok(())
    }

    fn headers_for(&self, q: &NQueue, event: &CloudEvent, delay: Duration) -> HeaderMap {
        let mut h = HeaderMap::new();
        if q.config.fifo {
            h.insert("Nats-Msg-Id", hex(&event.dedup_key()).as_str());
        }
        if !delay.is_zero() {
            h.insert(NOT_BEFORE, (now_ms() + ms(delay)).to_string().as_str());
        }
        h
    }

    /// Refuses event #`index` if its message (`payload` bytes plus
    /// `headers`) is over the event limit or the server's `max_payload`.
    /// Called for every message of a call before any is published, so that
    /// a fan-out or batch is stored whole or not at all on size.
    fn check_size(
        &self,
        index: usize,
        headers: &HeaderMap,
        payload: usize,
    ) -> Result<(), EngineError> {
        let max_payload = self.client.max_payload();
        let wire = wire_len(headers, payload);
        if payload > self.max_event_bytes || wire > max_payload {
            return Err(EngineError::TooLarge(format!(
                "event #{index} is {payload} bytes ({wire} as a NATS message with headers), over the limit of {} bytes per event and the NATS server's max_payload of {max_payload} bytes per message",
                self.max_event_bytes
            )));
        }
        Ok(())
    }

    /// Publishes `msgs` and waits for every acknowledgement. Every message
    /// is checked against the server's `max_payload` first: the client
    /// refuses an oversized one only when it comes to it, after the ones
    /// before it were sent.
    async fn publish_all(
        &self,
        msgs: Vec<(String, HeaderMap, Bytes)>,
    ) -> Result<Vec<jetstream::publish::PublishAck>, EngineError> {
        let max_payload = self.client.max_payload();
        for (i, (_, headers, payload)) in msgs.iter().enumerate() {
            let wire = wire_len(headers, payload.len());
            if wire > max_payload {
                return Err(EngineError::TooLarge(format!(
                    "message #{i} is {wire} bytes with headers, over the NATS server's max_payload of {max_payload} bytes"
                )));
            }
        }
        let mut futures = Vec::with_capacity(msgs.len());
        for (subject, headers, payload) in msgs {
            futures.push(
                self.js
                    .publish_with_headers(subject, headers, payload)
                    .await
                    .map_err(|e| {
                        if e.kind() == PublishErrorKind::MaxPayloadExceeded {
                            EngineError::TooLarge(e.to_string())
                        } else {
                            nats("publish")(e)
                        }
                    })?,
            );
        }
        let mut acks = Vec::with_capacity(futures.len());
        for f in join_all(
            futures
                .into_iter()
                .map(std::future::IntoFuture::into_future),
        )
        .await
        {
            acks.push(f.map_err(nats("publish"))?);
        }
        Ok(acks)
    }

    /// Moves stored message `seq` of `queue` to its dead-letter queue (or
    /// drops it), then removes it: by ack if `reply` is a live delivery,
    /// else by deleting it from the stream.
    async fn move_to_dead_letter(
        &self,
        queue: &str,
        seq: u64,
        reply: Option<&str>,
    ) -> Result<(), EngineError> {
        let q = self.queue(queue)?;
        let msg = match q.stream.get_raw_message(seq).await {
            Ok(m) => m,
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => return Ok(()),
            Err(e) => return Err(nats("read message")(e)),
        };
        match q.dead_letter.as_deref().and_then(|d| self.queues.get(d)) {
            Some(dlq) => {
                let mut h = HeaderMap::new();
                h.insert(ORIGIN, queue);
                self.publish_all(vec![(dlq.subject.clone(), h, msg.payload)])
                    .await?;
            }
            None => tracing::info!(queue, seq, "no dead-letter queue; dropping message"),
        }
        match reply {
            Some(r) => self.ack_kind(r, AckKind::Ack).await?,
            None => {
                q.stream
                    .delete_message(seq)
                    .await
                    .map_err(nats("delete message"))?;
            }
        }
        q.dead_lettered.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn group_subject(&self, stream: &str, group: &str) -> String {
        format!("{}.state.{stream}.{}", self.prefix, hex(group))
    }

    async fn load_group(
        &self,
        subject: &str,
        partitions: u32,
    ) -> Result<(u64, GroupDoc), EngineError> {
        let (seq, mut doc) = match self.state.get_last_raw_message_by_subject(subject).await {
            Ok(m) => (
                m.sequence,
                serde_json::from_slice::<GroupDoc>(&m.payload).unwrap_or_default(),
            ),
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => {
                (0, GroupDoc::default())
            }
            Err(e) => return Err(nats("read consumer group")(e)),
        };
        doc.leases
            .resize(partitions as usize, LeaseState::default());
        Ok((seq, doc))
    }

    /// Read-modify-write of a group document with compare-and-set.
    async fn update_group<T>(
        &self,
        stream: &str,
        group: &str,
        mut change: impl FnMut(&mut GroupDoc) -> (T, bool),
    ) -> Result<T, EngineError> {
        let s = self.stream(stream)?;
        let subject = self.group_subject(stream, group);
        for _ in 0..CAS_ATTEMPTS {
            let (seq, mut doc) = self.load_group(&subject, s.config.partitions).await?;
            let (out, write) = change(&mut doc);
            if !write {
                return Ok(out);
            }
            let payload = serde_json::to_vec(&doc).map_err(nats("encode consumer group"))?;
            let publish = PublishMessage::build()
                .payload(payload.into())
                .expected_last_subject_sequence(seq);
            let ack = self
                .js
                .send_publish(subject.clone(), publish)
                .await
                .map_err(nats("write consumer group"))?
                .await;
            match ack {
                Ok(_) => return Ok(out),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    // Someone else changed it first: back off a little, retry.
                    let pause = rand::random::<u64>() % 10 + 1;
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                Err(e) => return Err(nats("write consumer group")(e)),
            }
        }
        Err(EngineError::Nats {
            op: "update consumer group",
            source: "too much contention; try again".into(),
        })
    }
}

#[async_trait]
impl Engine for NatsEngine {
    fn name(&self) -> &'static str {
        "nats"
    }

    async fn publish(
        &self,
        topic: &str,
        events: Vec<CloudEvent>,
    ) -> Result<Vec<PublishOutcome>, EngineError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::SeqCst) {
            return Err(EngineError::Closed);
        }
        let routes = inner
            .topics
            .get(topic)
            .ok_or_else(|| EngineError::UnknownTopic(topic.to_owned()))?;
        let mut msgs = Vec::new();
        let mut outcomes = Vec::with_capacity(events.len());
        for (index, event) in events.iter().enumerate() {
            let mut routed = 0;
            for (target, filter) in routes {
                if !filter.matches(event) {
                    continue;
                }
                routed += 1;
                match target {
                    NTarget::Queue(name) => {
                        let q = inner.queue(name)?;
                        let h = inner.headers_for(q, event, q.config.delay);
                        inner.check_size(index, &h, event.as_bytes().len())?;
                        msgs.push((q.subject.clone(), h, event.as_bytes().clone()));
                    }
                    NTarget::Stream(name) => {
                        let s = inner.stream(name)?;
                        let key = super::stream_key(None, event, &s.config.partition_key)?;
                        let p = partition_for(&key, s.config.partitions);
                        let mut h = HeaderMap::new();
                        h.insert(KEY, key.as_str());
                        inner.check_size(index, &h, event.as_bytes().len())?;
                        msgs.push((format!("{}.{p}", s.subject), h, event.as_bytes().clone()));
                    }
                }
            }
            outcomes.push(PublishOutcome { routed });
        }
        inner.publish_all(msgs).await?;
        Ok(outcomes)
    }

    async fn send(
        &self,
        queue: &str,
        messages: Vec<OutgoingMessage>,
    ) -> Result<Vec<SendOutcome>, EngineError> {
        let inner = &self.inner;
        let q = inner.queue(queue)?;
        let mut msgs = Vec::with_capacity(messages.len());
        for (index, m) in messages.iter().enumerate() {
            check_delay(m.delay)?;
            let h = inner.headers_for(q, &m.event, m.delay.unwrap_or(q.config.delay));
            inner.check_size(index, &h, m.event.as_bytes().len())?;
            msgs.push((q.subject.clone(), h, m.event.as_bytes().clone()));
        }
        let acks = inner.publish_all(msgs).await?;
        Ok(acks
            .into_iter()
            .map(|a| SendOutcome {
                message_id: a.sequence.to_string(),
                duplicate: a.duplicate,
            })
            .collect())
    }

    async fn receive(
        &self,
        queue: &str,
        request: ReceiveRequest,
    ) -> Result<Vec<Delivery>, EngineError> {
        request.check()?;
        let inner = &self.inner;
        let q = inner.queue(queue)?;
        // A FIFO queue's message stays in flight for all of AckWait: a
        // shorter visibility is a -NAK with delay, which frees its one
        // place and lets the next message overtake it.
        let visibility = match request.visibility_timeout {
            Some(v) if !(q.config.fifo && v < q.ack_wait) => v,
            _ => q.ack_wait,
        };
        let deadline = tokio::time::Instant::now() + request.wait;
        loop {
            let before = now_ms();
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            // A FIFO queue has one message in flight (MaxAckPending 1): a
            // fetch for more was held open by the server until it expired.
            let most = if q.config.fifo {
                1
            } else {
                request.max_messages
            };
            let fetch = q.consumer.fetch().max_messages(most);
            let fetch = if remaining >= Duration::from_millis(10) {
                fetch.expires(remaining)
            } else {
                fetch
            };
            let mut batch = fetch.messages().await.map_err(nats("fetch"))?;
            let mut out = Vec::new();
            // NAKed once the batch is in: a message NAKed with a delay
            // counts as pending at the server, which then holds the fetch
            // open until it expires (every receive with a visibility shorter
            // than AckWait, push delivery's included, took the whole long
            // poll, 20 s, however many messages were there).
            let mut shortened: Vec<String> = Vec::new();
            // Messages fetched before their delivery delay, handed back
            // once the batch is in, for the same reason.
            let mut early: Vec<(String, Duration)> = Vec::new();
            while let Some(m) = batch.next().await {
                let m = m.map_err(nats_boxed("fetch"))?;
                let Some(reply) = m.reply.as_ref().map(|r| r.to_string()) else {
                    continue;
                };
                let (delivered, seq, published) = match m.info() {
                    Ok(i) => (
                        i.delivered.max(1) as u32,
                        i.stream_sequence,
                        (i.published.unix_timestamp_nanos() / 1_000_000) as u64,
                    ),
                    Err(_) => continue,
                };
                let not_before = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(NOT_BEFORE))
                    .and_then(|v| v.as_str().parse::<u64>().ok());
                if let Some(nb) = not_before
                    && nb > now_ms()
                {
                    // Delivery delay: hand it back until it is due.
                    early.push((reply, Duration::from_millis(nb - now_ms())));
                    continue;
                }
                let until = if visibility < q.ack_wait {
                    shortened.push(reply.clone());
                    before + ms(visibility)
                } else {
                    if visibility > q.ack_wait {
                        inner.keep_alive(&reply, q.ack_wait, before + ms(visibility))?;
                    }
                    before + ms(visibility)
                };
                out.push(Delivery {
                    receipt: NReceipt {
                        deadline_ms: until.saturating_sub(margin(visibility)),
                        reply,
                    }
                    .encode(),
                    message_id: seq.to_string(),
                    receive_count: delivered,
                    sent_at_ms: published,
                    event: m.payload.clone(),
                });
            }
            drop(batch);
            for reply in &shortened {
                inner
                    .ack_kind(reply, AckKind::Nak(Some(visibility)))
                    .await?;
            }
            for (reply, wait) in &early {
                inner.ack_kind(reply, AckKind::Nak(Some(*wait))).await?;
            }
            if !out.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(out);
            }
        }
    }

    async fn ack(
        &self,
        queue: &str,
        receipts: &[Receipt],
    ) -> Result<Vec<Result<(), EngineError>>, EngineError> {
        let inner = &self.inner;
        inner.queue(queue)?;
        let acks = receipts.iter().map(|r| async move {
            let r = inner.current(r)?;
            inner.stop_keepalive(&r.reply);
            inner.ack_kind(&r.reply, AckKind::Ack).await
        });
        Ok(join_all(acks).await)
    }

    async fn change_visibility(
        &self,
        queue: &str,
        receipt: &Receipt,
        timeout: Duration,
    ) -> Result<Receipt, EngineError> {
        check_visibility(timeout)?;
        let inner = &self.inner;
        let q = inner.queue(queue)?;
        let r = inner.current(receipt)?;
        inner.stop_keepalive(&r.reply);
        let start = now_ms();
        // On a FIFO queue only a release (0) is a -NAK, which puts the
        // message back at the head; one with a delay would let the next
        // overtake it, so a shorter timeout keeps it for AckWait.
        let timeout = if q.config.fifo && !timeout.is_zero() {
            timeout.max(q.ack_wait)
        } else {
            timeout
        };
        if timeout < q.ack_wait {
            // Redelivered sooner than the old receipt's deadline: that
            // receipt must not be able to ack the redelivery.
            inner.revoke(receipt, r.deadline_ms);
            let delay = (!timeout.is_zero()).then_some(timeout);
            inner.ack_kind(&r.reply, AckKind::Nak(delay)).await?;
        } else {
            inner.ack_kind(&r.reply, AckKind::Progress).await?;
            if timeout > q.ack_wait {
                inner.keep_alive(&r.reply, q.ack_wait, start + ms(timeout))?;
            }
        }
        Ok(NReceipt {
            deadline_ms: (start + ms(timeout)).saturating_sub(margin(timeout)),
            reply: r.reply,
        }
        .encode())
    }

    async fn dead_letter(&self, queue: &str, receipt: &Receipt) -> Result<(), EngineError> {
        let inner = &self.inner;
        inner.queue(queue)?;
        let r = inner.current(receipt)?;
        inner.stop_keepalive(&r.reply);
        inner.revoke(receipt, r.deadline_ms);
        let seq = r
            .stream_sequence()
            .ok_or_else(|| EngineError::InvalidReceipt(receipt.0.clone()))?;
        inner.move_to_dead_letter(queue, seq, Some(&r.reply)).await
    }

    async fn redrive(&self, dead_letter_queue: &str, max: usize) -> Result<u64, EngineError> {
        let inner = &self.inner;
        let dlq = inner.queue(dead_letter_queue)?;
        let mut moved = 0u64;
        // Messages that stay (no `Flotilla-Origin`, or an origin no longer
        // declared) are held un-acked until the call ends, then NAKed: NAKed
        // at once they were deliverable again at once, every fetch returned
        // them, and the loop never ended (each turn also counted a delivery
        // toward MaxDeliver).
        let mut kept: Vec<String> = Vec::new();
        // Stream sequences fetched by this call. A held message fetched
        // again (its AckWait ran out) is not new: a fetch of only such
        // messages means everything has been looked at.
        let mut seen: HashSet<u64> = HashSet::new();
        // While the consumer's MaxAckPending messages are held, nothing more
        // can be fetched (FIFO: one).
        let hold_limit = if dlq.config.fifo {
            1
        } else {
            dlq.config.max_in_flight.max(1)
        };
        let result = async {
            while (moved as usize) < max && kept.len() < hold_limit {
                // FIFO: one at a time (MaxAckPending 1); a fetch for more
                // was held open by the server, with no expiry: for ever.
                let want = (max - moved as usize).min(if dlq.config.fifo { 1 } else { 256 });
                let mut batch = dlq
                    .consumer
                    .fetch()
                    .max_messages(want)
                    .messages()
                    .await
                    .map_err(nats("fetch"))?;
                let mut new = 0;
                while let Some(m) = batch.next().await {
                    let m = m.map_err(nats_boxed("fetch"))?;
                    let Some(reply) = m.reply.as_ref().map(|r| r.to_string()) else {
                        continue;
                    };
                    if let Ok(info) = m.info()
                        && !seen.insert(info.stream_sequence)
                    {
                        kept.push(reply);
                        continue;
                    }
                    new += 1;
                    let origin = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(ORIGIN))
                        .map(|v| v.as_str().to_owned());
                    match origin.as_deref().and_then(|o| inner.queues.get(o)) {
                        Some(target) => {
                            inner
                                .publish_all(vec![(
                                    target.subject.clone(),
                                    HeaderMap::new(),
                                    m.payload.clone(),
                                )])
                                .await?;
                            inner.ack_kind(&reply, AckKind::Ack).await?;
                            moved += 1;
                        }
                        // Not from a declared queue: leave it where it is.
                        None => kept.push(reply),
                    }
                }
                if new == 0 {
                    break;
                }
            }
            Ok(())
        }
        .await;
        // Hand the ones left back, also when the loop failed part way.
        for reply in &kept {
            if let Err(e) = inner.ack_kind(reply, AckKind::Nak(None)).await {
                tracing::warn!(queue = dead_letter_queue, error = %e, "cannot hand back a message redrive left; it is redelivered after its AckWait");
            }
        }
        result.map(|()| moved)
    }

    async fn queue_stats(&self, queue: &str) -> Result<QueueStats, EngineError> {
        let q = self.inner.queue(queue)?;
        let info = q
            .stream
            .consumer_info(CONSUMER)
            .await
            .map_err(nats("consumer info"))?;
        Ok(QueueStats {
            ready: info.num_pending,
            in_flight: info.num_ack_pending as u64,
            delayed: 0,
            dead_lettered: q.dead_lettered.load(Ordering::Relaxed),
        })
    }

    async fn put_records(
        &self,
        stream: &str,
        records: Vec<OutgoingRecord>,
    ) -> Result<Vec<RecordPosition>, EngineError> {
        let inner = &self.inner;
        let s = inner.stream(stream)?;
        let mut partitions = Vec::with_capacity(records.len());
        let mut msgs = Vec::with_capacity(records.len());
        for (index, r) in records.into_iter().enumerate() {
            let key = super::stream_key(r.partition_key, &r.event, &s.config.partition_key)?;
            let p = partition_for(&key, s.config.partitions);
            let mut h = HeaderMap::new();
            h.insert(KEY, key.as_str());
            inner.check_size(index, &h, r.event.as_bytes().len())?;
            partitions.push(p);
            msgs.push((format!("{}.{p}", s.subject), h, r.event.into_bytes()));
        }
        let acks = inner.publish_all(msgs).await?;
        Ok(acks
            .iter()
            .zip(partitions)
            .map(|(a, partition)| RecordPosition {
                partition,
                sequence: a.sequence,
            })
            .collect())
    }

    async fn read(
        &self,
        stream: &str,
        partition: u32,
        from: StreamPosition,
        limit: usize,
        wait: Duration,
    ) -> Result<ReadResult, EngineError> {
        let s = self.inner.stream(stream)?;
        if partition >= s.config.partitions {
            return Err(EngineError::UnknownPartition {
                stream: stream.to_owned(),
                partition,
            });
        }
        if limit == 0 || limit > 10_000 {
            return Err(EngineError::InvalidArgument {
                what: "limit",
                problem: format!("{limit} is out of range; use 1 to 10000"),
            });
        }
        let (policy, resume) = match from {
            StreamPosition::TrimHorizon => (DeliverPolicy::All, from),
            StreamPosition::Latest => {
                let info = s.stream.get_info().await.map_err(nats("stream info"))?;
                let next = info.state.last_sequence + 1;
                (
                    DeliverPolicy::ByStartSequence {
                        start_sequence: next,
                    },
                    StreamPosition::AtSequence(next),
                )
            }
            StreamPosition::AtSequence(n) => (
                DeliverPolicy::ByStartSequence {
                    start_sequence: n.max(1),
                },
                from,
            ),
            StreamPosition::AfterSequence(n) => (
                DeliverPolicy::ByStartSequence {
                    start_sequence: n.saturating_add(1),
                },
                from,
            ),
            StreamPosition::AtTimestamp(t) => {
                let start_time =
                    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(t) * 1_000_000)
                        .map_err(|_| EngineError::InvalidArgument {
                            what: "at_timestamp",
                            problem: format!("{t} is not a valid time"),
                        })?;
                (DeliverPolicy::ByStartTime { start_time }, from)
            }
        };
        // A short-lived consumer filtered to the partition; the server
        // removes it after it goes idle.
        let consumer: PullConsumer = s
            .stream
            .create_consumer(consumer::pull::Config {
                deliver_policy: policy,
                filter_subject: format!("{}.{partition}", s.subject),
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(nats("create reader"))?;
        let wait = wait.min(crate::config::MAX_WAIT);
        let fetch = consumer
            .fetch()
            .max_messages(limit)
            .max_bytes(super::MAX_READ_BYTES);
        let fetch = if wait >= Duration::from_millis(10) {
            fetch.expires(wait)
        } else {
            fetch
        };
        let mut batch = fetch.messages().await.map_err(nats("read"))?;
        let mut records = Vec::new();
        while let Some(m) = batch.next().await {
            let m = match m {
                Ok(m) => m,
                // The server ends a batch whose next message would pass
                // `max_bytes` with a 409 (async-nats: an opaque error):
                // what came is returned, and the next read goes on from
                // after it. An error before any record is the caller's.
                Err(_) if !records.is_empty() => break,
                Err(e) => return Err(nats_boxed("read")(e)),
            };
            let Ok(info) = m.info() else { continue };
            let key = m
                .headers
                .as_ref()
                .and_then(|h| h.get(KEY))
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            records.push(Record {
                partition,
                sequence: info.stream_sequence,
                timestamp_ms: (info.published.unix_timestamp_nanos() / 1_000_000) as u64,
                partition_key: key,
                event: m.payload.clone(),
            });
        }
        let name = consumer.cached_info().name.clone();
        let stream_handle = s.stream.clone();
        tokio::spawn(async move {
            let _ = stream_handle.delete_consumer(&name).await;
        });
        let next = records
            .last()
            .map_or(resume, |r| StreamPosition::AtSequence(r.sequence + 1));
        Ok(ReadResult { records, next })
    }

    async fn acquire_leases(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        ttl: Duration,
    ) -> Result<Vec<Lease>, EngineError> {
        check_member_name("group", group)?;
        check_member_name("consumer", consumer)?;
        let ttl_ms = ms(ttl).max(1);
        self.inner
            .update_group(stream, group, |doc| {
                let (mine, _) = leases::acquire(
                    &mut doc.members,
                    &mut doc.leases,
                    consumer,
                    now_ms(),
                    ttl_ms,
                );
                (mine, true)
            })
            .await
    }

    async fn checkpoint(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        lease: &Lease,
        sequence: u64,
    ) -> Result<(), EngineError> {
        let s = self.inner.stream(stream)?;
        if lease.partition >= s.config.partitions {
            return Err(EngineError::UnknownPartition {
                stream: stream.to_owned(),
                partition: lease.partition,
            });
        }
        let ok = self
            .inner
            .update_group(stream, group, |doc| {
                let l = &mut doc.leases[lease.partition as usize];
                let ok = leases::checkpoint(l, consumer, lease.token, sequence, now_ms());
                (ok, ok)
            })
            .await?;
        if ok {
            Ok(())
        } else {
            Err(EngineError::LeaseLost {
                stream: stream.to_owned(),
                group: group.to_owned(),
                partition: lease.partition,
            })
        }
    }

    async fn leave_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
    ) -> Result<(), EngineError> {
        self.inner
            .update_group(stream, group, |doc| {
                leases::leave(&mut doc.members, &mut doc.leases, consumer);
                ((), true)
            })
            .await
    }

    async fn stream_stats(&self, stream: &str) -> Result<Vec<PartitionStats>, EngineError> {
        let s = self.inner.stream(stream)?;
        let mut info = s
            .stream
            .info_with_subjects(format!("{}.*", s.subject))
            .await
            .map_err(nats("stream info"))?;
        let next = info.info.state.last_sequence + 1;
        let mut subjects: HashMap<String, usize> = HashMap::new();
        while let Some(entry) = info.next().await {
            let (subject, count) = entry.map_err(nats("stream info"))?;
            subjects.insert(subject, count);
        }
        Ok((0..s.config.partitions)
            .map(|p| PartitionStats {
                partition: p,
                records: subjects
                    .get(&format!("{}.{p}", s.subject))
                    .copied()
                    .unwrap_or(0) as u64,
                next_sequence: next,
            })
            .collect())
    }

    async fn ready(&self) -> Result<(), EngineError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(EngineError::Closed);
        }
        match self.inner.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            state => Err(EngineError::Nats {
                op: "connection",
                source: format!("not connected to NATS ({state})").into(),
            }),
        }
    }

    async fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        if let Ok(mut t) = self.inner.tasks.lock() {
            for h in t.drain(..) {
                h.abort();
            }
        }
        if let Ok(mut k) = self.inner.keepalive.lock() {
            for (_, h) in k.drain() {
                h.abort();
            }
        }
        let _ = self.inner.client.flush().await;
    }
}
