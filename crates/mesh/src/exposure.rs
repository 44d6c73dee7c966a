//! Building-block exposure: a service reaches only the topics, queues,
//! streams and buckets it declared in the manifest.
//!
//! The broker and the object store authenticate their callers with mTLS
//! like every other service; before acting they ask [`Grants::check`]
//! whether the caller's service declared the resource. The runtime builds
//! the [`Grants`] from the manifest (`publishes`, the queues delivered to a
//! service, the streams it reads, `buckets`) and hands them to the broker
//! and object store.
//!
//! What a declaration allows:
//!
//! | declared in | kind | actions |
//! |---|---|---|
//! | `topics` | [`ResourceKind::Topic`] | [`Action::Publish`] |
//! | `queues` | [`ResourceKind::Queue`] | [`Action::Publish`] (send), [`Action::Consume`] (receive, ack, extend, release) |
//! | `streams` | [`ResourceKind::Stream`] | [`Action::Consume`] (read) |
//! | `buckets` | [`ResourceKind::Bucket`] | [`Action::Read`], [`Action::Write`], [`Action::Delete`], [`Action::List`] |
//!
//! Operator identities (the CLI) may do everything; nothing else is
//! allowed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::identity::{IdentityError, SpiffeId, check_name};

/// Why a building-block call is refused, or grants cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExposureError {
    /// The caller's service did not declare the resource.
    #[error(
        "{caller} did not declare {kind} `{name}`; add it to the service's {} in flotilla.toml",
        kind.manifest_key()
    )]
    NotDeclared {
        /// Who asked.
        caller: SpiffeId,
        /// The kind of resource.
        kind: ResourceKind,
        /// Its name.
        name: String,
        /// What it wanted to do.
        action: Action,
    },
    /// The action does not apply to that kind of resource.
    #[error("{action} is not something a service can do to a {kind}")]
    NotApplicable {
        /// The kind of resource.
        kind: ResourceKind,
        /// The action.
        action: Action,
    },
    /// The caller belongs to another system or environment.
    #[error("{caller} is not in {system}/{env}")]
    ForeignIdentity {
        /// Who asked.
        caller: SpiffeId,
        /// This system.
        system: String,
        /// This environment.
        env: String,
    },
    /// A name in the grants is invalid.
    #[error("invalid name in the building-block grants")]
    BadName {
        /// Why.
        #[source]
        source: IdentityError,
    },
}

impl ExposureError {
    /// The stable error code for an HTTP body (403 for every variant a
    /// check returns).
    pub fn code(&self) -> &'static str {
        match self {
            ExposureError::NotApplicable { .. } => "action_not_applicable",
            _ => "exposure_denied",
        }
    }
}

/// A kind of building-block resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    /// A pub/sub topic.
    Topic,
    /// A work queue.
    Queue,
    /// An ordered, partitioned stream.
    Stream,
    /// An object-storage bucket.
    Bucket,
}

impl ResourceKind {
    fn manifest_key(self) -> &'static str {
        match self {
            ResourceKind::Topic => "`publishes`",
            ResourceKind::Queue => "queues (a queue's `deliver.to`)",
            ResourceKind::Stream => "streams",
            ResourceKind::Bucket => "`buckets`",
        }
    }

    fn allows(self, action: Action) -> bool {
        matches!(
            (self, action),
            (ResourceKind::Topic, Action::Publish)
                | (ResourceKind::Queue, Action::Publish | Action::Consume)
                | (ResourceKind::Stream, Action::Consume)
                | (
                    ResourceKind::Bucket,
                    Action::Read | Action::Write | Action::Delete | Action::List
                )
        )
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResourceKind::Topic => "topic",
            ResourceKind::Queue => "queue",
            ResourceKind::Stream => "stream",
            ResourceKind::Bucket => "bucket",
        })
    }
}

/// What a caller wants to do with a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Publish to a topic, send to a queue.
    Publish,
    /// Receive/ack/extend/release from a queue, read a stream.
    Consume,
    /// Get an object.
    Read,
    /// Put an object.
    Write,
    /// Delete an object.
    Delete,
    /// List objects.
    List,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Publish => "publish",
            Action::Consume => "consume",
            Action::Read => "read",
            Action::Write => "write",
            Action::Delete => "delete",
            Action::List => "list",
        })
    }
}

/// What one service declared.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declared {
    /// Topics it publishes to.
    #[serde(default)]
    pub topics: BTreeSet<String>,
    /// Queues it owns (sends to and consumes).
    #[serde(default)]
    pub queues: BTreeSet<String>,
    /// Streams it reads.
    #[serde(default)]
    pub streams: BTreeSet<String>,
    /// Buckets it uses.
    #[serde(default)]
    pub buckets: BTreeSet<String>,
}

impl Declared {
    fn set(&self, kind: ResourceKind) -> &BTreeSet<String> {
        match kind {
            ResourceKind::Topic => &self.topics,
            ResourceKind::Queue => &self.queues,
            ResourceKind::Stream => &self.streams,
            ResourceKind::Bucket => &self.buckets,
        }
    }

    fn merge(&mut self, other: Declared) {
        self.topics.extend(other.topics);
        self.queues.extend(other.queues);
        self.streams.extend(other.streams);
        self.buckets.extend(other.buckets);
    }
}

/// Who may touch which building-block resources in one system and
/// environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    system: String,
    env: String,
    services: BTreeMap<String, Declared>,
    operators: BTreeSet<String>,
}

impl Grants {
    /// No grants yet for `system`/`env`.
    pub fn new(system: &str, env: &str) -> Result<Self, ExposureError> {
        check_name("system", system).map_err(|source| ExposureError::BadName { source })?;
        check_name("env", env).map_err(|source| ExposureError::BadName { source })?;
        Ok(Grants {
            system: system.to_string(),
            env: env.to_string(),
            services: BTreeMap::new(),
            operators: BTreeSet::new(),
        })
    }

    /// Adds what `service` declared (merged with earlier declarations).
    pub fn declare(&mut self, service: &str, declared: Declared) -> Result<(), ExposureError> {
        check_name("service", service).map_err(|source| ExposureError::BadName { source })?;
        self.services
            .entry(service.to_string())
            .or_default()
            .merge(declared);
        Ok(())
    }

    /// Lets the identity of `service` (e.g. [`crate::identity::OPERATOR`])
    /// do anything.
    pub fn allow_operator(&mut self, service: &str) -> Result<(), ExposureError> {
        check_name("service", service).map_err(|source| ExposureError::BadName { source })?;
        self.operators.insert(service.to_string());
        Ok(())
    }

    /// The services that declared anything.
    pub fn services(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }

    /// Whether `caller` is one of [`Grants::allow_operator`]'s identities
    /// (of this system and environment).
    pub fn is_operator(&self, caller: &SpiffeId) -> bool {
        caller.system() == self.system
            && caller.env() == self.env
            && self.operators.contains(caller.service())
    }

    /// Whether `caller` may do `action` to the `kind` resource `name`.
    pub fn check(
        &self,
        caller: &SpiffeId,
        kind: ResourceKind,
        name: &str,
        action: Action,
    ) -> Result<(), ExposureError> {
        if caller.system() != self.system || caller.env() != self.env {
            return Err(ExposureError::ForeignIdentity {
                caller: caller.clone(),
                system: self.system.clone(),
                env: self.env.clone(),
            });
        }
        if !kind.allows(action) {
            return Err(ExposureError::NotApplicable { kind, action });
        }
        if self.operators.contains(caller.service()) {
            return Ok(());
        }
        let declared = self
            .services
            .get(caller.service())
            .is_some_and(|d| d.set(kind).contains(name));
        if declared {
            Ok(())
        } else {
            Err(ExposureError::NotDeclared {
                caller: caller.clone(),
                kind,
                name: name.to_string(),
                action,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(service: &str) -> SpiffeId {
        SpiffeId::local("shop", service).unwrap()
    }

    fn grants() -> Grants {
        let mut g = Grants::new("shop", "local").unwrap();
        g.declare(
            "orders",
            Declared {
                topics: ["orders".to_string()].into(),
                ..Declared::default()
            },
        )
        .unwrap();
        g.declare(
            "inventory",
            Declared {
                queues: ["inventory-orders".to_string()].into(),
                ..Declared::default()
            },
        )
        .unwrap();
        g.declare(
            "catalog",
            Declared {
                buckets: ["product-images".to_string()].into(),
                ..Declared::default()
            },
        )
        .unwrap();
        g.allow_operator("operator").unwrap();
        g
    }

    #[test]
    fn declared_resources_only() {
        let g = grants();
        assert!(
            g.check(
                &id("orders"),
                ResourceKind::Topic,
                "orders",
                Action::Publish
            )
            .is_ok()
        );
        let err = g
            .check(
                &id("orders"),
                ResourceKind::Topic,
                "payments",
                Action::Publish,
            )
            .unwrap_err();
        assert!(matches!(err, ExposureError::NotDeclared { .. }));
        assert_eq!(err.code(), "exposure_denied");
        assert!(err.to_string().contains("`publishes`"), "{err}");
        assert!(
            g.check(
                &id("catalog"),
                ResourceKind::Topic,
                "orders",
                Action::Publish
            )
            .is_err()
        );
        assert!(
            g.check(
                &id("inventory"),
                ResourceKind::Queue,
                "inventory-orders",
                Action::Consume
            )
            .is_ok()
        );
        assert!(
            g.check(
                &id("orders"),
                ResourceKind::Queue,
                "inventory-orders",
                Action::Consume
            )
            .is_err()
        );
        for action in [Action::Read, Action::Write, Action::Delete, Action::List] {
            assert!(
                g.check(
                    &id("catalog"),
                    ResourceKind::Bucket,
                    "product-images",
                    action
                )
                .is_ok()
            );
            assert!(
                g.check(
                    &id("orders"),
                    ResourceKind::Bucket,
                    "product-images",
                    action
                )
                .is_err()
            );
        }
        assert!(
            g.check(
                &id("unknown"),
                ResourceKind::Bucket,
                "product-images",
                Action::Read
            )
            .is_err()
        );
    }

    #[test]
    fn actions_must_fit_the_kind() {
        let g = grants();
        let err = g
            .check(
                &id("orders"),
                ResourceKind::Topic,
                "orders",
                Action::Consume,
            )
            .unwrap_err();
        assert!(matches!(err, ExposureError::NotApplicable { .. }));
        assert!(
            g.check(
                &id("catalog"),
                ResourceKind::Bucket,
                "product-images",
                Action::Publish
            )
            .is_err()
        );
    }

    #[test]
    fn operators_and_foreigners() {
        let g = grants();
        assert!(
            g.check(
                &id("operator"),
                ResourceKind::Queue,
                "anything",
                Action::Consume
            )
            .is_ok()
        );
        let foreign = SpiffeId::local("bank", "orders").unwrap();
        assert!(matches!(
            g.check(&foreign, ResourceKind::Topic, "orders", Action::Publish),
            Err(ExposureError::ForeignIdentity { .. })
        ));
        assert!(Grants::new("Shop", "local").is_err());
    }
}
