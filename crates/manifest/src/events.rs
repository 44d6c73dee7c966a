//! The event broker as the manifest declares it: the engine (`[broker]`),
//! pub/sub topics (`[topics.<name>]`), work queues (`[queues.<name>]`) and
//! partitioned streams (`[streams.<name>]`). Which services publish to and
//! consume from them is on [`Service`](crate::Service) (`publishes`,
//! `consumes`).
//!
//! Every name, reference and range here has been checked; filter policies
//! are kept as written (each attribute maps to an array of conditions) and
//! the broker validates the conditions themselves.

use std::collections::BTreeMap;
use std::time::Duration;

/// The broker's engine and limits (`[broker]`; defaults when absent).
#[derive(Debug, Clone, PartialEq)]
pub struct Broker {
    /// Where events are stored.
    pub engine: BrokerEngine,
    /// The largest single event accepted, in bytes (`max_event_bytes`,
    /// default 1 MiB, 1 byte to 16 MiB).
    pub max_event_bytes: u64,
}

/// Which engine stores the events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerEngine {
    /// The default, `engine = "embedded"`: a durable log on disk inside the
    /// broker process. `durability = "always"` (the default) or
    /// `durability = "interval"` with `fsync_interval = "100ms"` (the default
    /// interval).
    Embedded { durability: BrokerDurability },
    /// `engine = "nats"`: NATS JetStream at `url` (`nats://` or `tls://`,
    /// required). Every subject and stream the broker creates starts with
    /// `prefix` (default `flotilla-<system name>`), so systems can share a
    /// server.
    Nats { url: String, prefix: String },
}

/// When the embedded engine acknowledges a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerDurability {
    /// After the event is fsynced (concurrent publishes share one fsync).
    Always,
    /// After it is committed in memory; the log is made durable every
    /// interval, so a crash of the broker's process or a power loss can
    /// lose up to one interval of acknowledged publishes.
    Interval(Duration),
}

/// A pub/sub topic (`[topics.<name>]`, SNS-like): services publish to it,
/// queues and streams subscribe to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    pub name: String,
}

/// A work queue (`[queues.<name>]`, SQS-like). Its messages are either
/// pushed to a service (`deliver`) or pulled by the services that list it in
/// `consumes`, never both.
#[derive(Debug, Clone, PartialEq)]
pub struct Queue {
    pub name: String,
    /// Ordered per message group and deduplicated (default `false`).
    pub fifo: bool,
    /// The event attribute naming a message's FIFO group (only with
    /// `fifo = true`; the broker's default, `partitionkey`, when `None`).
    pub group_by: Option<String>,
    /// How long a received message stays invisible before it is delivered
    /// again (0s to 12h; the broker's default when `None`).
    pub visibility_timeout: Option<Duration>,
    /// Deliveries before a message moves to `dead_letter`, or is dropped when
    /// there is none (1 to 1000; unlimited when `None`).
    pub max_receives: Option<u32>,
    /// Another declared queue that receives the messages this one gave up on;
    /// FIFO exactly when this queue is.
    pub dead_letter: Option<String>,
    /// How long an unacknowledged message is kept (60s to 14 days; the
    /// broker's default when `None`).
    pub retention: Option<Duration>,
    /// Delivery delay of new messages (0s to 900s; none when `None`).
    pub delay: Option<Duration>,
    /// The topic this queue takes its events from.
    pub subscribe: Option<Subscribe>,
    /// Push the messages to a service instead of waiting for it to pull.
    pub deliver: Option<Deliver>,
}

/// A queue's subscription to a topic
/// (`subscribe = { topic = "orders", filter = { type = ["order.placed"] } }`).
#[derive(Debug, Clone, PartialEq)]
pub struct Subscribe {
    /// A declared topic.
    pub topic: String,
    /// SNS-style filter policy: event attribute → array of conditions. Empty
    /// (the default) takes every event.
    pub filter: BTreeMap<String, toml::Value>,
}

/// Push delivery to a service
/// (`deliver = { to = "inventory", path = "/events/orders" }`): the broker
/// POSTs each event to `path` on one of `to`'s instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deliver {
    /// A declared service.
    pub to: String,
    /// A plain absolute path (no `*`, no query).
    pub path: String,
    /// Deliveries in flight at once (default 8, 1 to 256).
    pub concurrency: u32,
    /// How long one delivery may take before it counts as failed (default
    /// 10s, 1s to 15m).
    pub timeout: Duration,
}

/// An ordered, partitioned log (`[streams.<name>]`, Kinesis-like).
#[derive(Debug, Clone, PartialEq)]
pub struct Stream {
    pub name: String,
    /// Default 4, 1 to 256.
    pub partitions: u32,
    /// How long records are kept (1h to 7 days; the broker's default when
    /// `None`).
    pub retention: Option<Duration>,
    /// The topic this stream takes its events from.
    pub source: Option<StreamSource>,
    /// Push records to a service, in order per partition. Services may also
    /// consume the stream (`consumes`) in their own consumer groups.
    pub deliver: Option<Deliver>,
}

/// A stream's subscription to a topic
/// (`source = { topic = "orders", partition_key = "customer" }`).
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSource {
    /// A declared topic.
    pub topic: String,
    /// The event attribute whose hash picks the partition (default
    /// `partitionkey`, the CloudEvents Partitioning extension).
    pub partition_key: String,
    /// SNS-style filter policy, as in [`Subscribe::filter`].
    pub filter: BTreeMap<String, toml::Value>,
}
