//! The system's event broker: the manifest's `[broker]`, `[topics]`,
//! `[queues]` and `[streams]` turned into a running `flotilla-broker` on the
//! mesh.
//!
//! On one machine the broker runs inside `flotilla up` (the embedded engine
//! keeps its log in `<data-dir>/broker/`; with `engine = "nats"` it keeps
//! nothing). It listens on a loopback port with its own identity (service
//! `broker`) and serves mutual TLS only; services that declared `publishes`
//! or `consumes`, or receive deliveries, get `FLOTILLA_BROKER_URL`. Each
//! call is checked against the [`Grants`] the manifest implies, and push
//! deliveries go to the subscriber's service address over mTLS accepting
//! only that service's certificate (the subscriber's ACL lets `broker` POST
//! its delivery path; see `mesh::policy_spec`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use flotilla_broker::{
    Config, Durability, EmbeddedConfig, EngineConfig, FilterPolicy, Limits, NatsConfig, PushConfig,
    QueueConfig, StreamConfig, Subscription, TopicConfig,
};
use flotilla_manifest::{BrokerDurability, BrokerEngine, Deliver, Manifest};
use flotilla_mesh::{Declared, Grants};

/// The environment variable naming the broker's URL in an instance.
pub(crate) const ENV_BROKER_URL: &str = "FLOTILLA_BROKER_URL";

/// Why the manifest's event declarations cannot become a broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{owner}: filter {problem}; see docs/broker.md \"Topics (SNS)\" for the conditions")]
    Filter { owner: String, problem: String },
    #[error("the broker configuration is invalid: {0}")]
    Config(#[from] flotilla_broker::ConfigError),
    #[error("cannot build the broker's grants: {0}")]
    Grants(#[from] flotilla_mesh::exposure::ExposureError),
    #[error("cannot start the broker")]
    Open(#[source] flotilla_broker::Error),
}

fn filter(owner: &str, table: &BTreeMap<String, toml::Value>) -> Result<FilterPolicy, BrokerError> {
    let problem = |problem: String| BrokerError::Filter {
        owner: owner.to_string(),
        problem,
    };
    let json = serde_json::to_value(table).map_err(|e| problem(e.to_string()))?;
    serde::Deserialize::deserialize(json).map_err(|e: serde_json::Error| problem(e.to_string()))
}

fn push(deliver: &Deliver, addresses: &BTreeMap<String, SocketAddr>) -> PushConfig {
    // The subscriber's stable service address: it picks a ready instance
    // and starts one of a function that is at zero. `to` is checked by the
    // manifest, so the address exists; an unknown one yields a URL that
    // fails to connect (retried) rather than a panic.
    let addr = addresses
        .get(&deliver.to)
        .copied()
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 1)));
    PushConfig {
        peer: Some(deliver.to.clone()),
        concurrency: deliver.concurrency as usize,
        timeout: deliver.timeout,
        ..PushConfig::new(format!("https://{addr}{}", deliver.path))
    }
}

/// The broker configuration the manifest declares. `addresses` are the
/// services' addresses (push targets); `data_dir` holds the embedded log.
pub(crate) fn config(
    manifest: &Manifest,
    data_dir: &Path,
    addresses: &BTreeMap<String, SocketAddr>,
) -> Result<Config, BrokerError> {
    let engine = match &manifest.broker.engine {
        BrokerEngine::Embedded { durability } => EngineConfig::Embedded(EmbeddedConfig {
            dir: data_dir.join("broker"),
            durability: match durability {
                BrokerDurability::Always => Durability::Always,
                BrokerDurability::Interval(every) => Durability::Interval(*every),
            },
            ..EmbeddedConfig::default()
        }),
        BrokerEngine::Nats { url, prefix } => EngineConfig::Nats(NatsConfig {
            url: url.clone(),
            prefix: prefix.clone(),
            ..NatsConfig::default()
        }),
    };
    let max_event_bytes = usize::try_from(manifest.broker.max_event_bytes).unwrap_or(usize::MAX);
    let defaults = Limits::default();
    let limits = Limits {
        max_event_bytes,
        max_body_bytes: defaults.max_body_bytes.max(max_event_bytes),
        ..defaults
    };
    let topics = manifest
        .topics
        .keys()
        .map(|name| (name.clone(), TopicConfig::default()))
        .collect();
    let mut queues = BTreeMap::new();
    for (name, q) in &manifest.queues {
        let owner = format!("queues.{name}");
        let d = QueueConfig::default();
        let subscribe = match &q.subscribe {
            Some(s) => Some(Subscription {
                topic: s.topic.clone(),
                filter: filter(&format!("{owner}.subscribe"), &s.filter)?,
            }),
            None => None,
        };
        queues.insert(
            name.clone(),
            QueueConfig {
                fifo: q.fifo,
                group_attribute: q.group_by.clone().unwrap_or(d.group_attribute),
                visibility_timeout: q.visibility_timeout.unwrap_or(d.visibility_timeout),
                max_receives: q.max_receives,
                dead_letter: q.dead_letter.clone(),
                retention: q.retention.unwrap_or(d.retention),
                delay: q.delay.unwrap_or(d.delay),
                subscribe,
                deliver: q.deliver.as_ref().map(|p| push(p, addresses)),
                max_in_flight: d.max_in_flight,
            },
        );
    }
    let mut streams = BTreeMap::new();
    for (name, s) in &manifest.streams {
        let owner = format!("streams.{name}");
        let d = StreamConfig::default();
        let (partition_key, source) = match &s.source {
            Some(src) => (
                src.partition_key.clone(),
                Some(Subscription {
                    topic: src.topic.clone(),
                    filter: filter(&format!("{owner}.source"), &src.filter)?,
                }),
            ),
            None => (d.partition_key, None),
        };
        streams.insert(
            name.clone(),
            StreamConfig {
                partitions: s.partitions,
                retention: s.retention.unwrap_or(d.retention),
                partition_key,
                source,
                deliver: s.deliver.as_ref().map(|p| push(p, addresses)),
            },
        );
    }
    let config = Config {
        engine,
        identity: None,
        limits,
        topics,
        queues,
        streams,
    };
    config.validate()?;
    Ok(config)
}

/// Checks what `flotilla check` cannot see from the manifest alone: filter
/// conditions and the broker's own limits.
pub fn check(manifest: &Manifest) -> Result<(), BrokerError> {
    config(manifest, Path::new(".flotilla"), &BTreeMap::new()).map(|_| ())
}

/// Who may touch what: each service the topics it `publishes` and the
/// queues and streams it `consumes`; the operator everything.
pub(crate) fn grants(manifest: &Manifest, env: &str) -> Result<Grants, BrokerError> {
    let mut grants = Grants::new(&manifest.name, env)?;
    for (name, s) in &manifest.services {
        let mut declared = Declared::default();
        declared.topics.extend(s.publishes.iter().cloned());
        for c in &s.consumes {
            if manifest.queues.contains_key(c) {
                declared.queues.insert(c.clone());
            } else if manifest.streams.contains_key(c) {
                declared.streams.insert(c.clone());
            }
        }
        grants.declare(name, declared)?;
    }
    grants.allow_operator(flotilla_mesh::identity::OPERATOR)?;
    Ok(grants)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_mesh::{Action, ResourceKind, SpiffeId};

    const SHOP: &str = r#"
name = "shop"
[topics.orders]
[queues.inventory-orders]
subscribe = { topic = "orders", filter = { type = ["order.placed"], total = [{ numeric = [">=", 10] }] } }
deliver = { to = "inventory", path = "/events/orders" }
max_receives = 5
dead_letter = "dlq"
[queues.dlq]
[queues.notes]
subscribe = { topic = "orders" }
[streams.sales]
partitions = 2
source = { topic = "orders", partition_key = "customer" }
[services.orders]
run = { command = ["true"] }
publishes = ["orders"]
[services.inventory]
run = { command = ["true"] }
[services.notes]
run = { command = ["true"] }
consumes = ["notes", "sales"]
"#;

    fn manifest(text: &str) -> Manifest {
        Manifest::parse(text, Path::new("/shop/flotilla.toml")).unwrap()
    }

    #[test]
    fn the_manifest_becomes_a_valid_broker_config() {
        let m = manifest(SHOP);
        let addr: SocketAddr = "127.0.0.1:4100".parse().unwrap();
        let addresses = BTreeMap::from([("inventory".to_string(), addr)]);
        let c = config(&m, Path::new("/d"), &addresses).unwrap();
        let q = &c.queues["inventory-orders"];
        let push = q.deliver.as_ref().unwrap();
        assert_eq!(push.url, "https://127.0.0.1:4100/events/orders");
        assert_eq!(push.peer.as_deref(), Some("inventory"));
        assert_eq!(q.max_receives, Some(5));
        assert_eq!(q.dead_letter.as_deref(), Some("dlq"));
        assert_eq!(c.streams["sales"].partition_key, "customer");
        assert_eq!(c.streams["sales"].partitions, 2);
        match &c.engine {
            EngineConfig::Embedded(e) => assert_eq!(e.dir, Path::new("/d/broker")),
            other => panic!("expected the embedded engine, got {other:?}"),
        }
    }

    #[test]
    fn a_bad_filter_condition_names_the_queue() {
        // `flotilla check` refuses this shape itself; the broker's rules are
        // the backstop for a Manifest that reaches the runtime another way.
        let mut m = manifest(SHOP);
        let bad: toml::Table = toml::from_str(r#"total = [{ numeric = ["~", 10] }]"#).unwrap();
        if let Some(sub) = m
            .queues
            .get_mut("inventory-orders")
            .and_then(|q| q.subscribe.as_mut())
        {
            sub.filter.extend(bad);
        }
        let err = check(&m).unwrap_err().to_string();
        assert!(
            err.contains("queues.inventory-orders.subscribe"),
            "got: {err}"
        );
    }

    #[test]
    fn grants_follow_publishes_and_consumes() {
        let g = grants(&manifest(SHOP), "local").unwrap();
        let id = |s: &str| SpiffeId::local("shop", s).unwrap();
        let ok = |s, k, n, a| g.check(&id(s), k, n, a).is_ok();
        assert!(ok("orders", ResourceKind::Topic, "orders", Action::Publish));
        assert!(!ok("notes", ResourceKind::Topic, "orders", Action::Publish));
        assert!(ok("notes", ResourceKind::Queue, "notes", Action::Consume));
        assert!(ok("notes", ResourceKind::Stream, "sales", Action::Consume));
        assert!(!ok("orders", ResourceKind::Queue, "notes", Action::Consume));
        assert!(!ok(
            "inventory",
            ResourceKind::Queue,
            "dlq",
            Action::Consume
        ));
        assert!(ok("operator", ResourceKind::Queue, "dlq", Action::Consume));
    }
}
