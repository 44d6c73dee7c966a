//! The engine trait: the broker's semantics, independent of where events live.
//!
//! The HTTP API, push delivery and the conformance suite only speak this
//! trait, so the embedded engine and the NATS JetStream engine are
//! interchangeable. Each method documents the semantics both engines aim
//! for; `docs/broker.md` lists where the NATS engine falls short.

pub mod embedded;
mod leases;
pub mod nats;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;

use crate::cloudevent::CloudEvent;

/// Why an engine operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("topic `{0}` is not declared")]
    UnknownTopic(String),
    #[error("queue `{0}` is not declared")]
    UnknownQueue(String),
    #[error("stream `{0}` is not declared")]
    UnknownStream(String),
    #[error("stream `{stream}` has no partition {partition}")]
    UnknownPartition { stream: String, partition: u32 },
    #[error(
        "receipt is stale: the message was acknowledged, dead-lettered, or its visibility timeout expired and it was delivered again"
    )]
    StaleReceipt,
    #[error("receipt `{0}` was not issued by this queue")]
    InvalidReceipt(String),
    #[error("{what}: {problem}")]
    InvalidArgument { what: &'static str, problem: String },
    #[error(
        "partition {partition} of `{stream}` is not leased to this consumer in group `{group}`"
    )]
    LeaseLost {
        stream: String,
        group: String,
        partition: u32,
    },
    #[error("the {engine} engine does not support {what}")]
    Unsupported {
        engine: &'static str,
        what: &'static str,
    },
    #[error("storage is full; the event was not stored")]
    StorageFull(#[source] std::io::Error),
    #[error("storage failed; the operation did not take effect")]
    Storage(#[source] embedded::StoreError),
    /// An event the engine cannot store whole: on NATS, over the server's
    /// `max_payload` once its headers are added. Nothing of the call was
    /// stored.
    #[error("{0}")]
    TooLarge(String),
    #[error("NATS {op} failed")]
    Nats {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the engine is shut down")]
    Closed,
}

/// An opaque handle to one delivery of one message. Acknowledging, extending
/// or releasing needs the receipt of the current delivery: after a message
/// is delivered again, earlier receipts are stale.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Receipt(pub String);

/// A message to put on a queue.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    pub event: CloudEvent,
    /// Overrides the queue's delivery delay (0-900 s).
    pub delay: Option<Duration>,
}

impl From<CloudEvent> for OutgoingMessage {
    fn from(event: CloudEvent) -> Self {
        Self { event, delay: None }
    }
}

/// What happened to one sent message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendOutcome {
    /// The engine's id of the stored message.
    pub message_id: String,
    /// A FIFO queue had already accepted this event (`source` + `id`) within
    /// the deduplication window; nothing new was stored.
    pub duplicate: bool,
}

/// What happened to one published event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOutcome {
    /// How many subscriptions (queues and streams) stored the event.
    pub routed: usize,
}

/// How to receive from a queue.
#[derive(Debug, Clone)]
pub struct ReceiveRequest {
    /// 1 to 10.
    pub max_messages: usize,
    /// Long polling: wait up to this long (at most 20 s) for a message.
    pub wait: Duration,
    /// Overrides the queue's visibility timeout for these deliveries.
    pub visibility_timeout: Option<Duration>,
    /// On a FIFO queue, at most one message of each group (its head): for
    /// a consumer that handles a group's messages one at a time (push
    /// delivery), so that the rest are not received, counted and held
    /// in flight while the head is handled. On NATS a FIFO queue has one
    /// message in flight anyway.
    pub one_per_group: bool,
}

impl Default for ReceiveRequest {
    fn default() -> Self {
        Self {
            max_messages: 1,
            wait: Duration::ZERO,
            visibility_timeout: None,
            one_per_group: false,
        }
    }
}

impl ReceiveRequest {
    pub(crate) fn check(&self) -> Result<(), EngineError> {
        if !(1..=crate::config::MAX_RECEIVE_BATCH).contains(&self.max_messages) {
            return Err(EngineError::InvalidArgument {
                what: "max_messages",
                problem: format!("{} is out of range; use 1 to 10", self.max_messages),
            });
        }
        if self.wait > crate::config::MAX_WAIT {
            return Err(EngineError::InvalidArgument {
                what: "wait",
                problem: format!("{:?} is over the maximum of 20s", self.wait),
            });
        }
        if let Some(v) = self.visibility_timeout {
            check_visibility(v)?;
        }
        Ok(())
    }
}

pub(crate) fn check_visibility(v: Duration) -> Result<(), EngineError> {
    if v > crate::config::MAX_VISIBILITY {
        return Err(EngineError::InvalidArgument {
            what: "visibility_timeout",
            problem: format!("{v:?} is over the maximum of 12h"),
        });
    }
    Ok(())
}

pub(crate) fn check_delay(d: Option<Duration>) -> Result<(), EngineError> {
    if let Some(d) = d
        && d > crate::config::MAX_DELAY
    {
        return Err(EngineError::InvalidArgument {
            what: "delay",
            problem: format!("{d:?} is over the maximum of 900s"),
        });
    }
    Ok(())
}

/// One delivery of a queue message.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub receipt: Receipt,
    pub message_id: String,
    /// How many times the message has been delivered, this one included.
    pub receive_count: u32,
    /// When the message was first stored (milliseconds since the epoch).
    pub sent_at_ms: u64,
    /// The CloudEvent, as published.
    pub event: Bytes,
}

/// Counters of one queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Stored and visible (or soon visible) messages.
    pub ready: u64,
    /// Delivered and not yet acknowledged or expired.
    pub in_flight: u64,
    /// Waiting out a delivery delay.
    pub delayed: u64,
    /// Messages this queue has moved to its dead-letter queue.
    pub dead_lettered: u64,
}

/// A record to put on a stream.
#[derive(Debug, Clone)]
pub struct OutgoingRecord {
    pub event: CloudEvent,
    /// Overrides the partition key taken from the event.
    pub partition_key: Option<String>,
}

impl From<CloudEvent> for OutgoingRecord {
    fn from(event: CloudEvent) -> Self {
        Self {
            event,
            partition_key: None,
        }
    }
}

/// Where a record was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordPosition {
    pub partition: u32,
    pub sequence: u64,
}

/// Where to start reading a partition (a Kinesis shard iterator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamPosition {
    /// The oldest record still retained.
    TrimHorizon,
    /// Just after the newest record: only records put from now on.
    Latest,
    AtSequence(u64),
    AfterSequence(u64),
    /// The first record stored at or after this time (ms since the epoch).
    AtTimestamp(u64),
}

impl StreamPosition {
    /// Parses the iterator syntax of the HTTP API: `trim_horizon`, `latest`,
    /// `at_sequence:N`, `after_sequence:N`, `at_timestamp:MS`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "trim_horizon" => Self::TrimHorizon,
            "latest" => Self::Latest,
            _ => {
                let (kind, n) = s.split_once(':')?;
                let n: u64 = n.parse().ok()?;
                match kind {
                    "at_sequence" => Self::AtSequence(n),
                    "after_sequence" => Self::AfterSequence(n),
                    "at_timestamp" => Self::AtTimestamp(n),
                    _ => return None,
                }
            }
        })
    }
}

impl std::fmt::Display for StreamPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TrimHorizon => f.write_str("trim_horizon"),
            Self::Latest => f.write_str("latest"),
            Self::AtSequence(n) => write!(f, "at_sequence:{n}"),
            Self::AfterSequence(n) => write!(f, "after_sequence:{n}"),
            Self::AtTimestamp(n) => write!(f, "at_timestamp:{n}"),
        }
    }
}

/// One stream record.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: u32,
    pub sequence: u64,
    pub timestamp_ms: u64,
    pub partition_key: String,
    pub event: Bytes,
}

/// Records read from a partition and where to continue.
#[derive(Debug, Clone)]
pub struct ReadResult {
    pub records: Vec<Record>,
    /// Pass this back to read what comes next (always `AtSequence`).
    pub next: StreamPosition,
}

/// A partition leased to a consumer of a consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub partition: u32,
    /// Fencing token: checkpoints must present it.
    pub token: u64,
    /// The last sequence the group finished with, if any.
    pub checkpoint: Option<u64>,
}

/// Counters of one stream partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionStats {
    pub partition: u32,
    pub records: u64,
    /// The sequence the next record will get.
    pub next_sequence: u64,
}

/// The most event bytes one stream read returns (it returns at least one
/// record, whatever its size): `limit` alone let a read of 10 000 records
/// of 1 MiB hold 10 GiB in the broker. Above the largest event allowed
/// (16 MiB) with its headers, since NATS refuses a fetch whose byte budget
/// one message exceeds.
pub const MAX_READ_BYTES: usize = 32 << 20;

/// The longest partition or FIFO group key, in bytes: Kinesis's partition
/// keys are at most 256 characters, SQS's group ids 128.
pub const MAX_KEY_BYTES: usize = 256;

/// `key`, taken from the event attribute `attribute` (or given with the
/// record), if it can be a partition or group key: at most
/// [`MAX_KEY_BYTES`], no control characters. A longer one had its length
/// stored in two bytes and wrapped, corrupting the record (and the
/// broker's start, if it was a partition's last); a line break in one
/// made the NATS client panic writing it as a header.
pub fn checked_key(key: String, attribute: &str) -> Result<String, EngineError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(EngineError::InvalidArgument {
            what: "key",
            problem: format!(
                "the key taken from `{attribute}` is {} bytes; at most {MAX_KEY_BYTES}",
                key.len()
            ),
        });
    }
    if key.chars().any(char::is_control) {
        return Err(EngineError::InvalidArgument {
            what: "key",
            problem: format!("the key taken from `{attribute}` has a control character"),
        });
    }
    Ok(key)
}

/// A stream record's partition key: the one given with it, else the event
/// attribute `attribute`, else the event's id; checked ([`checked_key`]).
pub fn stream_key(
    given: Option<String>,
    event: &CloudEvent,
    attribute: &str,
) -> Result<String, EngineError> {
    match given {
        Some(key) => checked_key(key, "partition_key"),
        None => match event.key(attribute) {
            Some(key) => checked_key(key, attribute),
            None => checked_key(event.id().to_owned(), "id"),
        },
    }
}

/// The partition for `key` among `partitions`: FNV-1a (stable across
/// processes, versions and engines) modulo the partition count.
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(partitions.max(1))) as u32
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a broker does with events. Both engines implement it.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// `"embedded"` or `"nats"`.
    fn name(&self) -> &'static str;

    /// Publishes events to a topic: each is stored in every subscribed queue
    /// and stream whose filter it passes before the call returns. An event
    /// no subscription wants is accepted and dropped.
    async fn publish(
        &self,
        topic: &str,
        events: Vec<CloudEvent>,
    ) -> Result<Vec<PublishOutcome>, EngineError>;

    /// Puts messages directly on a queue.
    async fn send(
        &self,
        queue: &str,
        messages: Vec<OutgoingMessage>,
    ) -> Result<Vec<SendOutcome>, EngineError>;

    /// Receives up to `max_messages`, each invisible to other receivers for
    /// the visibility timeout. A message whose receive count reached the
    /// queue's `max_receives` is moved to the dead-letter queue instead of
    /// being delivered again.
    async fn receive(
        &self,
        queue: &str,
        request: ReceiveRequest,
    ) -> Result<Vec<Delivery>, EngineError>;

    /// Acknowledges (deletes) messages. Each receipt succeeds or fails on its
    /// own: a stale receipt fails with [`EngineError::StaleReceipt`] and
    /// leaves the message alone.
    async fn ack(
        &self,
        queue: &str,
        receipts: &[Receipt],
    ) -> Result<Vec<Result<(), EngineError>>, EngineError>;

    /// Sets the remaining visibility timeout of a delivery: extend it, or
    /// release the message (`Duration::ZERO`) for immediate redelivery.
    /// Returns the receipt to use from now on.
    async fn change_visibility(
        &self,
        queue: &str,
        receipt: &Receipt,
        timeout: Duration,
    ) -> Result<Receipt, EngineError>;

    /// Moves a delivered message to the queue's dead-letter queue now (or
    /// drops it, if the queue has none).
    async fn dead_letter(&self, queue: &str, receipt: &Receipt) -> Result<(), EngineError>;

    /// Moves up to `max` messages from a dead-letter queue back to the queues
    /// they came from; returns how many moved.
    async fn redrive(&self, dead_letter_queue: &str, max: usize) -> Result<u64, EngineError>;

    async fn queue_stats(&self, queue: &str) -> Result<QueueStats, EngineError>;

    /// Appends records; each goes to partition `hash(key) mod partitions`
    /// and gets the next sequence number of that partition.
    async fn put_records(
        &self,
        stream: &str,
        records: Vec<OutgoingRecord>,
    ) -> Result<Vec<RecordPosition>, EngineError>;

    /// Reads up to `limit` records of one partition from `from`, waiting up
    /// to `wait` (at most 20 s) for the first one if there are none yet.
    async fn read(
        &self,
        stream: &str,
        partition: u32,
        from: StreamPosition,
        limit: usize,
        wait: Duration,
    ) -> Result<ReadResult, EngineError>;

    /// Joins (or heartbeats in) a consumer group and returns the partitions
    /// this consumer now holds. Live consumers split the partitions evenly;
    /// a consumer that stops heartbeating for `ttl` loses its leases to the
    /// others.
    async fn acquire_leases(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        ttl: Duration,
    ) -> Result<Vec<Lease>, EngineError>;

    /// Records that `group` has processed `partition` up to `sequence`.
    /// Fails with [`EngineError::LeaseLost`] unless the lease is held.
    async fn checkpoint(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        lease: &Lease,
        sequence: u64,
    ) -> Result<(), EngineError>;

    /// Leaves a consumer group, freeing its leases at once.
    async fn leave_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
    ) -> Result<(), EngineError>;

    async fn stream_stats(&self, stream: &str) -> Result<Vec<PartitionStats>, EngineError>;

    /// Whether the engine can take writes: the embedded engine after a
    /// storage failure, or a NATS engine without a connection, is not ready.
    async fn ready(&self) -> Result<(), EngineError>;

    /// Flushes and stops; later calls fail with [`EngineError::Closed`].
    async fn close(&self);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitioning_is_stable_and_spread() {
        assert_eq!(
            partition_for("customer-1", 4),
            partition_for("customer-1", 4)
        );
        let mut seen = [0; 4];
        for i in 0..400 {
            seen[partition_for(&format!("c{i}"), 4) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    #[test]
    fn positions_round_trip() {
        for p in [
            StreamPosition::TrimHorizon,
            StreamPosition::Latest,
            StreamPosition::AtSequence(5),
            StreamPosition::AfterSequence(6),
            StreamPosition::AtTimestamp(7),
        ] {
            assert_eq!(StreamPosition::parse(&p.to_string()), Some(p));
        }
        assert_eq!(StreamPosition::parse("at_sequence:x"), None);
    }
}
