//! The broker's typed configuration and its validation.
//!
//! [`Config`] mirrors the `[topics]`, `[queues]` and `[streams]` tables of
//! `flotilla.toml` (the manifest crate maps onto it) plus the engine choice.
//! [`Config::validate`] checks every cross-reference and limit once, at start,
//! and produces the [`Topology`] the engines are built from, in which topic
//! push subscriptions have become ordinary (internal) queues.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::filter::FilterPolicy;

/// Visibility timeout when a queue does not set one (SQS default).
pub const DEFAULT_VISIBILITY: Duration = Duration::from_secs(30);
/// The longest a message may stay invisible (SQS maximum).
pub const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);
/// Queue retention when a queue does not set one (SQS default).
pub const DEFAULT_QUEUE_RETENTION: Duration = Duration::from_secs(4 * 24 * 3600);
/// Stream retention when a stream does not set one (Kinesis default).
pub const DEFAULT_STREAM_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// The longest delivery delay (SQS maximum).
pub const MAX_DELAY: Duration = Duration::from_secs(900);
/// The longest a receive may wait for messages (SQS maximum).
pub const MAX_WAIT: Duration = Duration::from_secs(20);
/// The most messages one receive returns (SQS maximum).
pub const MAX_RECEIVE_BATCH: usize = 10;
/// FIFO deduplication window (SQS).
pub const DEDUP_WINDOW: Duration = Duration::from_secs(300);
/// The attribute that carries a FIFO message group or a stream partition key
/// unless configured otherwise: the CloudEvents Partitioning extension.
pub const DEFAULT_KEY_ATTRIBUTE: &str = "partitionkey";

/// Why a configuration cannot be used. Each message names the setting and
/// what to write instead.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "{kind} name `{name}` is invalid: use 1-80 ASCII letters, digits and hyphens, starting with a letter or digit"
    )]
    InvalidName { kind: &'static str, name: String },
    #[error(
        "{owner}: {setting} refers to {kind} `{name}`, which is not declared; declare [{kind}s.{name}] or fix the name"
    )]
    Undeclared {
        owner: String,
        setting: &'static str,
        kind: &'static str,
        name: String,
    },
    #[error("{owner}: {setting} is {value}, {rule}")]
    OutOfRange {
        owner: String,
        setting: &'static str,
        value: String,
        rule: &'static str,
    },
    #[error("{owner}: {problem}")]
    Invalid { owner: String, problem: String },
}

/// Everything the broker needs to open: engine, limits and the declared
/// topics, queues and streams.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub engine: EngineConfig,
    /// The broker's own mTLS identity (its certificate, key and trust
    /// bundle, reloaded when renewed): push delivery presents it, and
    /// [`crate::Broker::serve_mesh`] serves with it. `None`: plain HTTP.
    pub identity: Option<flotilla_mesh::IdentityFiles>,
    pub limits: Limits,
    pub topics: BTreeMap<String, TopicConfig>,
    pub queues: BTreeMap<String, QueueConfig>,
    pub streams: BTreeMap<String, StreamConfig>,
}

/// Which engine stores the events.
#[derive(Debug, Clone)]
pub enum EngineConfig {
    /// The durable on-disk engine inside the broker process (the default).
    Embedded(EmbeddedConfig),
    /// NATS JetStream; the broker keeps no state of its own.
    Nats(NatsConfig),
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self::Embedded(EmbeddedConfig::default())
    }
}

/// Settings of the embedded engine.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Directory holding `broker.redb`; created if missing.
    pub dir: PathBuf,
    /// When a publish is acknowledged relative to the fsync.
    pub durability: Durability,
    /// Bytes of database pages cached in memory. The backlog beyond this
    /// stays on disk (and in the OS page cache, which the kernel reclaims).
    pub cache_bytes: usize,
    /// Test hook: fails or counts storage writes. Leave `None`.
    pub fault_injection: Option<crate::engine::embedded::FaultInjection>,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(".flotilla/broker"),
            durability: Durability::Always,
            cache_bytes: 32 << 20,
            fault_injection: None,
        }
    }
}

/// When the embedded engine acknowledges a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// After the data is fsynced (concurrent publishes share one fsync).
    #[default]
    Always,
    /// After the data is committed in memory; a durable commit runs every
    /// interval, so a crash of the process or a power loss can lose up to
    /// one interval of acknowledged publishes (redb keeps a non-durable
    /// commit in memory only). So can a full disk: it is found at the
    /// durable commit, after the publishes were acknowledged; the engine
    /// logs the loss, refuses writes, and the restart that follows drops
    /// them.
    Interval(Duration),
}

/// Settings of the NATS JetStream engine.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URL, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// Prefix of every subject and stream the broker creates, so several
    /// systems (or test runs) can share one server.
    pub prefix: String,
    /// JetStream replicas per stream (1 for a single server).
    pub replicas: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            prefix: "flotilla".into(),
            replicas: 1,
        }
    }
}

/// Size limits applied at the API.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The largest single event, in bytes of JSON (default 1 MiB).
    pub max_event_bytes: usize,
    /// The most events in one publish batch.
    pub max_batch_events: usize,
    /// The largest request body, in bytes.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_event_bytes: 1 << 20,
            max_batch_events: 1000,
            max_body_bytes: 16 << 20,
        }
    }
}

/// A pub/sub topic. Queues and streams subscribe themselves (see
/// [`QueueConfig::subscribe`], [`StreamConfig::source`]); HTTP endpoints
/// subscribe here.
#[derive(Debug, Clone, Default)]
pub struct TopicConfig {
    /// HTTP push subscriptions by name.
    pub push: BTreeMap<String, PushSubscription>,
}

/// An HTTP endpoint subscribed to a topic. It is backed by an internal
/// durable queue, so it has the queue's retry and dead-letter semantics.
#[derive(Debug, Clone)]
pub struct PushSubscription {
    pub filter: FilterPolicy,
    pub deliver: PushConfig,
    /// Deliveries before the event is dead-lettered.
    pub max_receives: u32,
    /// Queue that receives events this subscription gave up on.
    pub dead_letter: Option<String>,
}

/// Where and how push delivery POSTs events.
#[derive(Debug, Clone)]
pub struct PushConfig {
    /// Absolute URL: the subscriber's address plus its path (`https://`
    /// when the broker has an identity and `peer` is set).
    pub url: String,
    /// The service the URL belongs to. With the broker's identity
    /// ([`Config::identity`]) delivery is mutual TLS and accepts only this
    /// service's certificate; `None` delivers over plain HTTP.
    pub peer: Option<String>,
    /// Deliveries in flight at once for this subscription.
    pub concurrency: usize,
    /// How long one POST may take before it counts as a failure.
    pub timeout: Duration,
    /// First retry delay; doubles per attempt, with full jitter.
    pub backoff_min: Duration,
    /// Cap on the retry delay.
    pub backoff_max: Duration,
    /// Streams only: attempts per record before it is skipped (queues use
    /// `max_receives` and their dead-letter queue instead).
    pub max_attempts: u32,
}

impl PushConfig {
    /// Push to `url` with default concurrency, timeout and backoff.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            peer: None,
            concurrency: 8,
            timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(60),
            max_attempts: 10,
        }
    }
}

/// A work queue (SQS semantics).
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// FIFO queue: ordered per message group, deduplicated by event
    /// `source` + `id` for five minutes.
    pub fifo: bool,
    /// The event attribute naming a message's FIFO group.
    pub group_attribute: String,
    pub visibility_timeout: Duration,
    /// Deliveries before a message moves to `dead_letter` (or is dropped if
    /// there is none). `None`: unlimited.
    pub max_receives: Option<u32>,
    pub dead_letter: Option<String>,
    pub retention: Duration,
    /// Default delivery delay of new messages.
    pub delay: Duration,
    /// Subscribe this queue to a topic.
    pub subscribe: Option<Subscription>,
    /// Push messages to an HTTP endpoint instead of waiting for receives.
    pub deliver: Option<PushConfig>,
    /// Most messages delivered and not yet acknowledged (SQS: 120 000
    /// standard, 20 000 FIFO). Bounds the broker's memory per queue.
    pub max_in_flight: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            fifo: false,
            group_attribute: DEFAULT_KEY_ATTRIBUTE.into(),
            visibility_timeout: DEFAULT_VISIBILITY,
            max_receives: None,
            dead_letter: None,
            retention: DEFAULT_QUEUE_RETENTION,
            delay: Duration::ZERO,
            subscribe: None,
            deliver: None,
            max_in_flight: 120_000,
        }
    }
}

/// A queue's or stream's subscription to a topic.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub topic: String,
    pub filter: FilterPolicy,
}

/// An ordered, partitioned log (Kinesis semantics).
#[derive(Debug, Clone)]
pub struct StreamConfig {
    pub partitions: u32,
    pub retention: Duration,
    /// The event attribute whose hash picks the partition.
    pub partition_key: String,
    /// Subscribe this stream to a topic.
    pub source: Option<Subscription>,
    /// Push records to an HTTP endpoint, in order per partition.
    pub deliver: Option<PushConfig>,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            partitions: 4,
            retention: DEFAULT_STREAM_RETENTION,
            partition_key: DEFAULT_KEY_ATTRIBUTE.into(),
            source: None,
            deliver: None,
        }
    }
}

/// A queue as the engines see it (declared, or backing a topic push
/// subscription).
#[derive(Debug, Clone)]
pub struct QueueSpec {
    pub name: String,
    pub config: QueueConfig,
    /// Backs a topic push subscription; not addressable by clients.
    pub internal: bool,
}

/// A stream as the engines see it.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    pub name: String,
    pub config: StreamConfig,
}

/// Where a topic fans an event out to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Queue(String),
    Stream(String),
}

/// A topic's subscription as the engines see it.
#[derive(Debug, Clone)]
pub struct Route {
    pub target: Target,
    pub filter: FilterPolicy,
}

/// The validated set of entities, shared by both engines.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    pub topics: BTreeMap<String, Vec<Route>>,
    pub queues: BTreeMap<String, QueueSpec>,
    pub streams: BTreeMap<String, StreamSpec>,
}

/// The internal queue behind a topic push subscription. Underscores cannot
/// appear in declared names, so this never collides with one.
pub fn push_queue_name(topic: &str, subscription: &str) -> String {
    format!("_push_{topic}_{subscription}")
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 80
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn check_name(kind: &'static str, name: &str) -> Result<(), ConfigError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ConfigError::InvalidName {
            kind,
            name: name.to_owned(),
        })
    }
}

fn range(
    owner: &str,
    setting: &'static str,
    value: Duration,
    ok: bool,
    rule: &'static str,
) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange {
            owner: owner.to_owned(),
            setting,
            value: format!("{value:?}"),
            rule,
        })
    }
}

fn check_push(owner: &str, push: &PushConfig) -> Result<(), ConfigError> {
    let invalid = |problem: String| ConfigError::Invalid {
        owner: owner.to_owned(),
        problem,
    };
    let uri: http::Uri = push
        .url
        .parse()
        .map_err(|e| invalid(format!("deliver url `{}` is not a URL: {e}", push.url)))?;
    // https means mutual TLS to a service of the system, so it needs the
    // service (`peer`) whose certificate to accept.
    let scheme_ok = match uri.scheme_str() {
        Some("http") => true,
        Some("https") => push.peer.is_some(),
        _ => false,
    };
    if !scheme_ok || uri.authority().is_none() {
        return Err(invalid(format!(
            "deliver url `{}` must be an absolute http:// URL, or https:// with the service it belongs to (`peer`)",
            push.url
        )));
    }
    if push.max_attempts == 0 {
        return Err(invalid("deliver max_attempts must be at least 1".into()));
    }
    if push.concurrency == 0 || push.concurrency > 1024 {
        return Err(invalid(format!(
            "deliver concurrency is {}, use 1 to 1024",
            push.concurrency
        )));
    }
    range(
        owner,
        "deliver timeout",
        push.timeout,
        !push.timeout.is_zero(),
        "use more than zero",
    )?;
    range(
        owner,
        "deliver backoff_max",
        push.backoff_max,
        push.backoff_max >= push.backoff_min && !push.backoff_min.is_zero(),
        "backoff_min must be more than zero and backoff_max at least backoff_min",
    )
}

impl Config {
    /// Checks names, references and limits, and derives the [`Topology`].
    pub fn validate(&self) -> Result<Topology, ConfigError> {
        let l = &self.limits;
        if l.max_event_bytes == 0 || l.max_batch_events == 0 || l.max_body_bytes < l.max_event_bytes
        {
            return Err(ConfigError::Invalid {
                owner: "limits".into(),
                problem: "max_event_bytes and max_batch_events must be positive and max_body_bytes at least max_event_bytes".into(),
            });
        }
        if let EngineConfig::Embedded(e) = &self.engine
            && let Durability::Interval(d) = e.durability
            && d.is_zero()
        {
            return Err(ConfigError::Invalid {
                owner: "broker".into(),
                problem: "durability interval must be more than zero; use Durability::Always to fsync every publish".into(),
            });
        }
        let mut topology = Topology::default();
        for name in self.topics.keys() {
            check_name("topic", name)?;
            topology.topics.insert(name.clone(), Vec::new());
        }
        for (name, q) in &self.queues {
            check_name("queue", name)?;
            topology.queues.insert(
                name.clone(),
                QueueSpec {
                    name: name.clone(),
                    config: q.clone(),
                    internal: false,
                },
            );
        }
        for (topic, t) in &self.topics {
            for (sub, p) in &t.push {
                check_name("push subscription", sub)?;
                let name = push_queue_name(topic, sub);
                let config = QueueConfig {
                    max_receives: Some(p.max_receives),
                    dead_letter: p.dead_letter.clone(),
                    subscribe: Some(Subscription {
                        topic: topic.clone(),
                        filter: p.filter.clone(),
                    }),
                    deliver: Some(p.deliver.clone()),
                    ..QueueConfig::default()
                };
                topology.queues.insert(
                    name.clone(),
                    QueueSpec {
                        name,
                        config,
                        internal: true,
                    },
                );
            }
        }
        for spec in topology.queues.values() {
            let owner = if spec.internal {
                format!("push subscription {}", spec.name)
            } else {
                format!("queues.{}", spec.name)
            };
            let q = &spec.config;
            range(
                &owner,
                "visibility_timeout",
                q.visibility_timeout,
                q.visibility_timeout <= MAX_VISIBILITY,
                "use at most 12h",
            )?;
            range(
                &owner,
                "delay",
                q.delay,
                q.delay <= MAX_DELAY,
                "use 0 to 900s",
            )?;
            range(
                &owner,
                "retention",
                q.retention,
                q.retention >= Duration::from_secs(1)
                    && q.retention <= Duration::from_secs(14 * 24 * 3600),
                "use 1s to 14 days",
            )?;
            if let Some(m) = q.max_receives
                && !(1..=1000).contains(&m)
            {
                return Err(ConfigError::Invalid {
                    owner,
                    problem: format!("max_receives is {m}, use 1 to 1000"),
                });
            }
            if q.max_in_flight == 0 {
                return Err(ConfigError::Invalid {
                    owner,
                    problem: "max_in_flight must be positive".into(),
                });
            }
            if let Some(dlq) = &q.dead_letter {
                let Some(target) = self.queues.get(dlq) else {
                    return Err(ConfigError::Undeclared {
                        owner,
                        setting: "dead_letter",
                        kind: "queue",
                        name: dlq.clone(),
                    });
                };
                if *dlq == spec.name {
                    return Err(ConfigError::Invalid {
                        owner,
                        problem: "dead_letter names the queue itself; use a separate queue".into(),
                    });
                }
                if target.fifo != q.fifo {
                    return Err(ConfigError::Invalid {
                        owner,
                        problem: format!(
                            "dead_letter `{dlq}` must be {} like this queue",
                            if q.fifo { "FIFO" } else { "a standard queue" }
                        ),
                    });
                }
            }
            if let Some(sub) = &q.subscribe {
                let Some(routes) = topology.topics.get_mut(&sub.topic) else {
                    return Err(ConfigError::Undeclared {
                        owner,
                        setting: "subscribe.topic",
                        kind: "topic",
                        name: sub.topic.clone(),
                    });
                };
                routes.push(Route {
                    target: Target::Queue(spec.name.clone()),
                    filter: sub.filter.clone(),
                });
            }
            if let Some(push) = &q.deliver {
                check_push(&owner, push)?;
            }
        }
        for (name, s) in &self.streams {
            check_name("stream", name)?;
            let owner = format!("streams.{name}");
            if !(1..=1024).contains(&s.partitions) {
                return Err(ConfigError::Invalid {
                    owner,
                    problem: format!("partitions is {}, use 1 to 1024", s.partitions),
                });
            }
            range(
                &owner,
                "retention",
                s.retention,
                s.retention >= Duration::from_secs(1)
                    && s.retention <= Duration::from_secs(365 * 24 * 3600),
                "use 1s to 365 days",
            )?;
            if s.partition_key.is_empty() {
                return Err(ConfigError::Invalid {
                    owner,
                    problem: "partition_key must name an event attribute, e.g. \"partitionkey\""
                        .into(),
                });
            }
            if let Some(src) = &s.source {
                let Some(routes) = topology.topics.get_mut(&src.topic) else {
                    return Err(ConfigError::Undeclared {
                        owner,
                        setting: "source.topic",
                        kind: "topic",
                        name: src.topic.clone(),
                    });
                };
                routes.push(Route {
                    target: Target::Stream(name.clone()),
                    filter: src.filter.clone(),
                });
            }
            if let Some(push) = &s.deliver {
                check_push(&owner, push)?;
            }
            topology.streams.insert(
                name.clone(),
                StreamSpec {
                    name: name.clone(),
                    config: s.clone(),
                },
            );
        }
        Ok(topology)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derives_routes_and_push_queues() {
        let mut c = Config::default();
        c.topics.insert(
            "orders".into(),
            TopicConfig {
                push: BTreeMap::from([(
                    "audit".into(),
                    PushSubscription {
                        filter: FilterPolicy::default(),
                        deliver: PushConfig::new("http://127.0.0.1:9/events"),
                        max_receives: 3,
                        dead_letter: None,
                    },
                )]),
            },
        );
        c.queues.insert(
            "inventory".into(),
            QueueConfig {
                subscribe: Some(Subscription {
                    topic: "orders".into(),
                    filter: FilterPolicy::types(["order.placed"]),
                }),
                ..Default::default()
            },
        );
        c.streams.insert(
            "analytics".into(),
            StreamConfig {
                source: Some(Subscription {
                    topic: "orders".into(),
                    filter: FilterPolicy::default(),
                }),
                ..Default::default()
            },
        );
        let t = c.validate().unwrap();
        let routes = &t.topics["orders"];
        assert_eq!(routes.len(), 3);
        assert!(t.queues["_push_orders_audit"].internal);
    }

    #[test]
    fn rejects_bad_references_and_ranges() {
        let mut c = Config::default();
        c.queues.insert(
            "a".into(),
            QueueConfig {
                dead_letter: Some("nope".into()),
                ..Default::default()
            },
        );
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("dead_letter") && e.contains("nope"), "{e}");

        let mut c = Config::default();
        c.queues.insert(
            "a".into(),
            QueueConfig {
                delay: Duration::from_secs(901),
                ..Default::default()
            },
        );
        assert!(c.validate().unwrap_err().to_string().contains("delay"));

        let mut c = Config::default();
        c.queues.insert("a_b".into(), QueueConfig::default());
        assert!(matches!(c.validate(), Err(ConfigError::InvalidName { .. })));
    }
}
