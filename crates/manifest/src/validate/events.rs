//! Validation of the event broker's declarations: `[broker]`,
//! `[topics.<name>]`, `[queues.<name>]`, `[streams.<name>]`, and the
//! per-service `publishes` and `consumes`.

use std::collections::BTreeMap;
use std::time::Duration;

use toml::Spanned;

use super::{Ctx, quote_list};
use crate::diagnostic::did_you_mean;
use crate::raw::{
    RawBroker, RawDeliver, RawFilter, RawManifest, RawQueue, RawSource, RawStream, RawSubscribe,
};
use crate::{
    Broker, BrokerDurability, BrokerEngine, Deliver, PathPattern, PatternError, Queue, Stream,
    StreamSource, Subscribe, Topic,
};

const DEFAULT_MAX_EVENT_BYTES: u64 = 1 << 20;
/// A larger event belongs in the object store, with a reference in the event.
const MAX_EVENT_BYTES: i64 = 16 << 20;
const DEFAULT_FSYNC_INTERVAL: Duration = Duration::from_millis(100);
/// The broker refuses longer names, and names end up in NATS subjects.
const MAX_NAME_LEN: usize = 80;
/// SQS's maximum visibility timeout.
const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 60 * 60);
/// The broker's bound: more deliveries than this is a retry loop, not a plan.
const MAX_RECEIVES: i64 = 1000;
/// SQS's retention bounds.
const MIN_QUEUE_RETENTION: Duration = Duration::from_secs(60);
const MAX_QUEUE_RETENTION: Duration = Duration::from_secs(14 * 24 * 60 * 60);
/// SQS's maximum delivery delay.
const MAX_DELAY: Duration = Duration::from_secs(900);
/// Kinesis's retention bounds, short end; a week of log on one disk is the long end.
const MIN_STREAM_RETENTION: Duration = Duration::from_secs(60 * 60);
const MAX_STREAM_RETENTION: Duration = Duration::from_secs(7 * 24 * 60 * 60);
const DEFAULT_PARTITIONS: u32 = 4;
/// Each partition is an ordered log with its own consumer cursor per group.
const MAX_PARTITIONS: i64 = 256;
/// The CloudEvents Partitioning extension attribute.
const DEFAULT_PARTITION_KEY: &str = "partitionkey";
const DEFAULT_DELIVER_CONCURRENCY: u32 = 8;
const MAX_DELIVER_CONCURRENCY: i64 = 256;
const DEFAULT_DELIVER_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_DELIVER_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_DELIVER_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// What the manifest declares, by kind, as written: references are checked
/// against these, whether or not the declarations themselves are valid (a
/// bad declaration is reported once, not again at every reference).
pub(super) struct Names {
    services: Vec<String>,
    topics: Vec<String>,
    /// Each queue, whether it is FIFO, and the service `deliver` pushes to.
    queues: BTreeMap<String, (bool, Option<String>)>,
    streams: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Topic,
    Queue,
    Stream,
}

impl Kind {
    fn noun(self) -> &'static str {
        match self {
            Kind::Topic => "topic",
            Kind::Queue => "queue",
            Kind::Stream => "stream",
        }
    }
}

impl Names {
    pub(super) fn new(raw: &RawManifest) -> Names {
        Names {
            services: raw.services.keys().map(|k| k.get_ref().clone()).collect(),
            topics: raw.topics.keys().map(|k| k.get_ref().clone()).collect(),
            queues: raw
                .queues
                .iter()
                .map(|(k, q)| {
                    let q = q.get_ref();
                    let fifo = q.fifo.as_ref().is_some_and(|f| *f.get_ref());
                    let to = q
                        .deliver
                        .as_ref()
                        .and_then(|d| d.get_ref().to.as_ref())
                        .map(|t| t.get_ref().clone());
                    (k.get_ref().clone(), (fifo, to))
                })
                .collect(),
            streams: raw.streams.keys().map(|k| k.get_ref().clone()).collect(),
        }
    }

    fn kind_of(&self, name: &str) -> Option<Kind> {
        if self.topics.iter().any(|t| t == name) {
            Some(Kind::Topic)
        } else if self.queues.contains_key(name) {
            Some(Kind::Queue)
        } else if self.streams.iter().any(|s| s == name) {
            Some(Kind::Stream)
        } else {
            None
        }
    }

    fn of(&self, kind: Kind) -> Vec<&str> {
        match kind {
            Kind::Topic => self.topics.iter().map(String::as_str).collect(),
            Kind::Queue => self.queues.keys().map(String::as_str).collect(),
            Kind::Stream => self.streams.iter().map(String::as_str).collect(),
        }
    }
}

/// Checks that `value` names a declared topic, queue or stream of one of
/// the `wanted` kinds (other than `exclude`). `what` starts the message
/// ("`orders` publishes to"); `wrong_kind` is the help when `value` names
/// a declaration of another kind.
fn reference(
    ctx: &mut Ctx<'_>,
    names: &Names,
    value: &Spanned<String>,
    wanted: &[Kind],
    what: &str,
    wrong_kind: &str,
    exclude: Option<&str>,
) -> bool {
    let name = value.get_ref();
    let kind = names.kind_of(name);
    if kind.is_some_and(|k| wanted.contains(&k)) {
        return true;
    }
    let wanted_noun = wanted
        .iter()
        .map(|k| k.noun())
        .collect::<Vec<_>>()
        .join(" or ");
    if let Some(kind) = kind {
        ctx.error(
            value.span(),
            format!(
                "{what} `{name}`, which is a {}, not a {wanted_noun}",
                kind.noun()
            ),
            Some(wrong_kind.to_string()),
        );
        return false;
    }
    let candidates: Vec<&str> = wanted
        .iter()
        .flat_map(|k| names.of(*k))
        .filter(|c| Some(*c) != exclude)
        .collect();
    let table = wanted[0].noun();
    let help = match did_you_mean(name, candidates.iter().copied()) {
        Some(s) => format!("did you mean `{s}`?"),
        None if candidates.is_empty() => format!("declare `[{table}s.{name}]`"),
        None => format!(
            "declare `[{table}s.{name}]`, or name one of {}",
            quote_list(&candidates)
        ),
    };
    ctx.error(
        value.span(),
        format!("{what} `{name}`, which is not a {wanted_noun} of this system"),
        Some(help),
    );
    false
}

/// 1-80 ASCII letters, digits and `-`, starting with a letter or digit: the
/// broker's rule for topic, queue and stream names.
fn check_event_name(name: &str) -> Result<(), &'static str> {
    match name.chars().next() {
        None => return Err("is empty"),
        Some(c) if !c.is_ascii_alphanumeric() => return Err("must start with a letter or digit"),
        _ => {}
    }
    if name.len() > MAX_NAME_LEN {
        return Err("is longer than 80 characters");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err("may contain only ASCII letters, digits and `-`");
    }
    Ok(())
}

/// `[broker]`, or its defaults when absent.
pub(super) fn broker(
    ctx: &mut Ctx<'_>,
    raw: Option<&Spanned<RawBroker>>,
    system: &str,
) -> Option<Broker> {
    let mut broker = default_broker();
    let Some(raw) = raw else { return Some(broker) };
    let span = raw.span();
    let raw = raw.get_ref();
    let before = ctx.errors.len();

    if let Some(m) = &raw.max_event_bytes {
        let v = *m.get_ref();
        if (1..=MAX_EVENT_BYTES).contains(&v) {
            broker.max_event_bytes = v as u64;
        } else {
            ctx.error(
                m.span(),
                format!("`max_event_bytes = {v}` is out of range"),
                Some(format!(
                    "use a number of bytes from 1 to {MAX_EVENT_BYTES} (16 MiB); the default is {DEFAULT_MAX_EVENT_BYTES} (1 MiB)"
                )),
            );
        }
    }

    let nats = match &raw.engine {
        None => false,
        Some(e) => match e.get_ref().as_str() {
            "embedded" => false,
            "nats" => true,
            other => {
                let help = match did_you_mean(other, ["embedded", "nats"]) {
                    Some(s) => format!("did you mean `engine = \"{s}\"`?"),
                    None => "write `engine = \"embedded\"` (a durable log inside the broker, the default) or `engine = \"nats\"` (NATS JetStream)".into(),
                };
                ctx.error(
                    e.span(),
                    format!("unknown broker engine `{other}`"),
                    Some(help),
                );
                return None;
            }
        },
    };

    if nats {
        for (value, key) in [
            (&raw.durability, "durability"),
            (&raw.fsync_interval, "fsync_interval"),
        ] {
            if let Some(v) = value {
                ctx.error(
                    v.span(),
                    format!("`{key}` applies to `engine = \"embedded\"` only"),
                    Some("remove it: NATS JetStream stores events by its own settings".into()),
                );
            }
        }
        let url = match &raw.url {
            None => {
                let at = raw.engine.as_ref().map_or(span, |e| e.span());
                ctx.error(
                    at,
                    "`engine = \"nats\"` needs a `url`",
                    Some("add `url = \"nats://127.0.0.1:4222\"`".into()),
                );
                None
            }
            Some(u) => {
                let url = u.get_ref();
                let rest = url
                    .strip_prefix("nats://")
                    .or_else(|| url.strip_prefix("tls://"));
                if rest.is_some_and(|r| !r.is_empty() && !r.contains(char::is_whitespace)) {
                    Some(url.clone())
                } else {
                    ctx.error(
                        u.span(),
                        format!("`{url}` is not a NATS URL"),
                        Some(
                            "write `nats://host:port`, or `tls://host:port` for TLS, e.g. `url = \"nats://127.0.0.1:4222\"`"
                                .into(),
                        ),
                    );
                    None
                }
            }
        };
        let prefix = match &raw.prefix {
            None => format!("flotilla-{system}"),
            Some(p) => {
                let prefix = p.get_ref();
                if prefix.is_empty()
                    || !prefix
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    ctx.error(
                        p.span(),
                        format!("`{prefix}` cannot prefix NATS subjects and stream names"),
                        Some(format!(
                            "use ASCII letters, digits, `-` and `_`, e.g. `prefix = \"flotilla-{system}\"`"
                        )),
                    );
                }
                prefix.clone()
            }
        };
        if let Some(url) = url {
            broker.engine = BrokerEngine::Nats { url, prefix };
        }
    } else {
        for (value, key) in [(&raw.url, "url"), (&raw.prefix, "prefix")] {
            if let Some(v) = value {
                ctx.error(
                    v.span(),
                    format!("`{key}` applies to `engine = \"nats\"` only"),
                    Some("remove it, or write `engine = \"nats\"` to use NATS JetStream".into()),
                );
            }
        }
        // `None` when `durability` is unknown (and reported).
        let interval = match &raw.durability {
            None => Some(false),
            Some(d) => match d.get_ref().as_str() {
                "always" => Some(false),
                "interval" => Some(true),
                other => {
                    let help = match did_you_mean(other, ["always", "interval"]) {
                        Some(s) => format!("did you mean `durability = \"{s}\"`?"),
                        None => "write `durability = \"always\"` (fsync before acknowledging, the default) or `durability = \"interval\"` (fsync every `fsync_interval`)".into(),
                    };
                    ctx.error(
                        d.span(),
                        format!("unknown durability `{other}`"),
                        Some(help),
                    );
                    None
                }
            },
        };
        let durability = match (&raw.fsync_interval, interval) {
            (_, None) | (None, Some(false)) => BrokerDurability::Always,
            (None, Some(true)) => BrokerDurability::Interval(DEFAULT_FSYNC_INTERVAL),
            (Some(f), Some(true)) => BrokerDurability::Interval(
                ctx.duration_in(
                    f,
                    "fsync_interval",
                    (Duration::from_millis(1), Duration::from_secs(60)),
                    "1ms to 1m",
                )
                .unwrap_or_default(),
            ),
            (Some(f), Some(false)) => {
                ctx.error(
                    f.span(),
                    "`fsync_interval` applies to `durability = \"interval\"` only",
                    Some("add `durability = \"interval\"`, or remove `fsync_interval`: with `\"always\"` every publish is fsynced".into()),
                );
                BrokerDurability::Always
            }
        };
        broker.engine = BrokerEngine::Embedded { durability };
    }
    (ctx.errors.len() == before).then_some(broker)
}

pub(super) fn default_broker() -> Broker {
    Broker {
        engine: BrokerEngine::Embedded {
            durability: BrokerDurability::Always,
        },
        max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
    }
}

/// Topics, queues and streams by name.
pub(super) type Declarations = (
    BTreeMap<String, Topic>,
    BTreeMap<String, Queue>,
    BTreeMap<String, Stream>,
);

/// The declared topics, queues and streams, or `None` when any has an error
/// (each is reported).
pub(super) fn declarations(
    ctx: &mut Ctx<'_>,
    raw: &RawManifest,
    names: &Names,
) -> Option<Declarations> {
    let before = ctx.errors.len();
    let mut topics = BTreeMap::new();
    for key in raw.topics.keys() {
        if event_name(ctx, key, Kind::Topic, names) {
            let name = key.get_ref().clone();
            topics.insert(name.clone(), Topic { name });
        }
    }
    let mut queues = BTreeMap::new();
    for (key, value) in &raw.queues {
        if event_name(ctx, key, Kind::Queue, names)
            && let Some(q) = queue(ctx, key.get_ref(), value, names)
        {
            queues.insert(key.get_ref().clone(), q);
        }
    }
    let mut streams = BTreeMap::new();
    for (key, value) in &raw.streams {
        if event_name(ctx, key, Kind::Stream, names)
            && let Some(s) = stream(ctx, key.get_ref(), value, names)
        {
            streams.insert(key.get_ref().clone(), s);
        }
    }
    (ctx.errors.len() == before).then_some((topics, queues, streams))
}

/// Checks a declaration's name, and that no declaration of an earlier kind
/// (topics, then queues, then streams) has it too.
fn event_name(ctx: &mut Ctx<'_>, key: &Spanned<String>, kind: Kind, names: &Names) -> bool {
    let name = key.get_ref();
    let noun = kind.noun();
    if let Err(why) = check_event_name(name) {
        ctx.error(
            key.span(),
            format!("{noun} name `{name}` {why}"),
            Some(format!(
                "use 1-80 ASCII letters, digits and `-`, starting with a letter or digit, e.g. `[{noun}s.order-events]`"
            )),
        );
        return false;
    }
    if let Some(other) = names.kind_of(name)
        && other != kind
    {
        ctx.error(
            key.span(),
            format!("`{name}` is declared both as a {} and as a {noun}", other.noun()),
            Some(format!(
                "rename the {noun}: `publishes` and `consumes` refer to topics, queues and streams by name, so each needs its own"
            )),
        );
        return false;
    }
    true
}

fn queue(ctx: &mut Ctx<'_>, name: &str, raw: &Spanned<RawQueue>, names: &Names) -> Option<Queue> {
    let raw = raw.get_ref();
    let before = ctx.errors.len();
    let owner = format!("queue `{name}`");
    let fifo = raw.fifo.as_ref().is_some_and(|f| *f.get_ref());

    let group_by = match &raw.group_by {
        None => None,
        Some(g) if !fifo => {
            ctx.error(
                g.span(),
                "`group_by` needs `fifo = true`",
                Some(
                    "message groups order a FIFO queue: add `fifo = true`, or remove `group_by`"
                        .into(),
                ),
            );
            None
        }
        Some(g) => attribute(ctx, g, "group_by"),
    };
    let visibility_timeout = raw.visibility_timeout.as_ref().and_then(|v| {
        ctx.duration_in(
            v,
            "visibility_timeout",
            (Duration::ZERO, MAX_VISIBILITY),
            "0s to 12h",
        )
    });
    let max_receives = raw
        .max_receives
        .as_ref()
        .and_then(|m| ctx.count(m, "max_receives", 1, MAX_RECEIVES));
    let dead_letter = match &raw.dead_letter {
        None => None,
        Some(d) if d.get_ref() == name => {
            ctx.error(
                d.span(),
                format!("{owner} names itself as its `dead_letter`"),
                Some(format!(
                    "declare a separate queue, e.g. `[queues.{name}-dlq]`, and name it here"
                )),
            );
            None
        }
        Some(d) => {
            let ok = reference(
                ctx,
                names,
                d,
                &[Kind::Queue],
                &format!("the `dead_letter` of {owner} is"),
                &format!("name a queue, e.g. declare `[queues.{name}-dlq]`"),
                Some(name),
            );
            match names.queues.get(d.get_ref()) {
                Some((dlq_fifo, _)) if ok && *dlq_fifo != fifo => {
                    let (what, fix) = if fifo {
                        (
                            "FIFO",
                            format!("add `fifo = true` to `[queues.{}]`", d.get_ref()),
                        )
                    } else {
                        (
                            "a standard queue",
                            format!("remove `fifo = true` from `[queues.{}]`", d.get_ref()),
                        )
                    };
                    ctx.error(
                        d.span(),
                        format!(
                            "dead-letter queue `{}` must be {what}, like {owner}",
                            d.get_ref()
                        ),
                        Some(fix),
                    );
                    None
                }
                _ if ok => Some(d.get_ref().clone()),
                _ => None,
            }
        }
    };
    let retention = raw.retention.as_ref().and_then(|r| {
        ctx.duration_in(
            r,
            "retention",
            (MIN_QUEUE_RETENTION, MAX_QUEUE_RETENTION),
            "60s to 14d",
        )
    });
    let delay = raw
        .delay
        .as_ref()
        .and_then(|d| ctx.duration_in(d, "delay", (Duration::ZERO, MAX_DELAY), "0s to 900s"));
    let subscribe = raw
        .subscribe
        .as_ref()
        .and_then(|s| subscribe(ctx, &owner, s, names));
    let deliver = raw
        .deliver
        .as_ref()
        .and_then(|d| deliver(ctx, &owner, d, names));

    if ctx.errors.len() != before {
        return None;
    }
    Some(Queue {
        name: name.to_string(),
        fifo,
        group_by,
        visibility_timeout,
        max_receives,
        dead_letter,
        retention,
        delay,
        subscribe,
        deliver,
    })
}

fn stream(
    ctx: &mut Ctx<'_>,
    name: &str,
    raw: &Spanned<RawStream>,
    names: &Names,
) -> Option<Stream> {
    let raw = raw.get_ref();
    let before = ctx.errors.len();
    let owner = format!("stream `{name}`");
    let partitions = match &raw.partitions {
        None => Some(DEFAULT_PARTITIONS),
        Some(p) => ctx.count(p, "partitions", 1, MAX_PARTITIONS),
    };
    let retention = raw.retention.as_ref().and_then(|r| {
        ctx.duration_in(
            r,
            "retention",
            (MIN_STREAM_RETENTION, MAX_STREAM_RETENTION),
            "1h to 7d",
        )
    });
    let source = raw
        .source
        .as_ref()
        .and_then(|s| source(ctx, &owner, s, names));
    let deliver = raw
        .deliver
        .as_ref()
        .and_then(|d| deliver(ctx, &owner, d, names));
    if ctx.errors.len() != before {
        return None;
    }
    Some(Stream {
        name: name.to_string(),
        partitions: partitions?,
        retention,
        source,
        deliver,
    })
}

/// The `topic` of a `subscribe` or `source`, which must be declared.
fn topic_of(
    ctx: &mut Ctx<'_>,
    owner: &str,
    table: &str,
    span: std::ops::Range<usize>,
    topic: Option<&Spanned<String>>,
    names: &Names,
) -> Option<String> {
    let Some(topic) = topic else {
        ctx.error(
            span,
            format!("`{table}` of {owner} names no `topic`"),
            Some(format!(
                "write e.g. `{table} = {{ topic = \"orders\" }}`: events reach queues and streams through topics"
            )),
        );
        return None;
    };
    reference(
        ctx,
        names,
        topic,
        &[Kind::Topic],
        &format!("{owner} takes events from"),
        "name a topic: events reach queues and streams only through topics",
        None,
    )
    .then(|| topic.get_ref().clone())
}

fn subscribe(
    ctx: &mut Ctx<'_>,
    owner: &str,
    raw: &Spanned<RawSubscribe>,
    names: &Names,
) -> Option<Subscribe> {
    let span = raw.span();
    let raw = raw.get_ref();
    let topic = topic_of(ctx, owner, "subscribe", span, raw.topic.as_ref(), names);
    let filter = filter(ctx, raw.filter.as_ref());
    Some(Subscribe {
        topic: topic?,
        filter: filter?,
    })
}

fn source(
    ctx: &mut Ctx<'_>,
    owner: &str,
    raw: &Spanned<RawSource>,
    names: &Names,
) -> Option<StreamSource> {
    let span = raw.span();
    let raw = raw.get_ref();
    let topic = topic_of(ctx, owner, "source", span, raw.topic.as_ref(), names);
    let partition_key = match &raw.partition_key {
        None => Some(DEFAULT_PARTITION_KEY.to_string()),
        Some(k) => attribute(ctx, k, "partition_key"),
    };
    let filter = filter(ctx, raw.filter.as_ref());
    Some(StreamSource {
        topic: topic?,
        partition_key: partition_key?,
        filter: filter?,
    })
}

/// A CloudEvents attribute name: lower-case letters and digits.
fn attribute(ctx: &mut Ctx<'_>, raw: &Spanned<String>, key: &str) -> Option<String> {
    let name = raw.get_ref();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        ctx.error(
            raw.span(),
            format!("`{name}` is not an event attribute name"),
            Some(format!(
                "CloudEvents attribute names are lower-case letters and digits, e.g. `{key} = \"customer\"`"
            )),
        );
        return None;
    }
    Some(name.clone())
}

/// A filter policy: a table of attribute → non-empty array of conditions,
/// each of the shapes the broker's parser (crates/broker/src/filter.rs)
/// takes. The broker checks them again when it starts, but its serde errors
/// name neither the place nor the attribute; this says both.
fn filter(
    ctx: &mut Ctx<'_>,
    raw: Option<&Spanned<RawFilter>>,
) -> Option<BTreeMap<String, toml::Value>> {
    let Some(raw) = raw else {
        return Some(BTreeMap::new());
    };
    let entries = match raw.get_ref() {
        RawFilter::Table(entries) => entries,
        RawFilter::Other(what) => {
            ctx.error(
                raw.span(),
                format!("`filter` must be a table, not {what}"),
                Some("map event attributes to lists of conditions, e.g. `filter = { type = [\"order.placed\"] }`".into()),
            );
            return None;
        }
    };
    let before = ctx.errors.len();
    let mut filter = BTreeMap::new();
    let mut entries: Vec<_> = entries.iter().collect();
    entries.sort_by_key(|(_, value)| value.span().start);
    for (attr, value) in entries {
        match value.get_ref() {
            toml::Value::Array(list) if list.is_empty() => ctx.error(
                value.span(),
                format!("the filter on `{attr}` lists no condition: no event could match"),
                Some(format!(
                    "list the values `{attr}` may have, e.g. `{attr} = [\"order.placed\"]`, or remove it"
                )),
            ),
            toml::Value::Array(list) => {
                // The first bad condition of the list: the array's span is
                // the closest place TOML keeps.
                if let Some(why) = list.iter().find_map(|c| condition_problem(c).err()) {
                    ctx.error(
                        value.span(),
                        format!("the filter on `{attr}`: {why}"),
                        Some(CONDITION_SHAPES.into()),
                    );
                } else {
                    filter.insert(attr.clone(), value.get_ref().clone());
                }
            }
            toml::Value::Table(_) => ctx.error(
                value.span(),
                format!("the filter on `{attr}` must be an array of conditions, not a table"),
                Some(format!(
                    "wrap the condition in an array: `{attr} = [{{ … }}]`"
                )),
            ),
            other => ctx.error(
                value.span(),
                format!(
                    "the filter on `{attr}` must be an array of conditions, not a {}",
                    other.type_str()
                ),
                Some(format!("wrap it in an array: `{attr} = [{other}]`")),
            ),
        }
    }
    (ctx.errors.len() == before).then_some(filter)
}

const CONDITION_SHAPES: &str = "a condition is an exact value (`\"order.placed\"`, `42`, `true`), `{ prefix = \"eu-\" }`, `{ anything-but = [\"a\", \"b\"] }`, `{ numeric = [\">=\", 10, \"<\", 20] }` or `{ exists = true }`";

/// Whether one filter condition has a shape the broker takes: a string,
/// number or boolean; or a table with exactly one of `prefix` (a string),
/// `anything-but` (a value, an array of them, or `{ prefix = "…" }`),
/// `numeric` (one or two operator/number pairs) and `exists` (a boolean).
fn condition_problem(condition: &toml::Value) -> Result<(), String> {
    use toml::Value;
    let scalar = |v: &Value| {
        matches!(
            v,
            Value::String(_) | Value::Integer(_) | Value::Float(_) | Value::Boolean(_)
        )
    };
    let table = match condition {
        v if scalar(v) => return Ok(()),
        Value::Table(t) => t,
        other => {
            return Err(format!(
                "a condition cannot be {} {}",
                if matches!(other, Value::Array(_)) {
                    "an"
                } else {
                    "a"
                },
                other.type_str()
            ));
        }
    };
    const KEYS: [&str; 4] = ["prefix", "anything-but", "numeric", "exists"];
    if let Some(unknown) = table.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(match did_you_mean(unknown, KEYS) {
            Some(near) => format!("unknown condition `{unknown}`; did you mean `{near}`?"),
            None => format!("unknown condition `{unknown}`"),
        });
    }
    let mut keys = table.iter();
    let (Some((key, value)), None) = (keys.next(), keys.next()) else {
        return Err(
            "a condition table takes exactly one of `prefix`, `anything-but`, `numeric` and `exists`"
                .into(),
        );
    };
    let ok = match (key.as_str(), value) {
        ("prefix", Value::String(_)) | ("exists", Value::Boolean(_)) => true,
        ("anything-but", Value::Array(list)) => list.iter().all(scalar),
        ("anything-but", Value::Table(t)) => {
            t.len() == 1 && matches!(t.get("prefix"), Some(Value::String(_)))
        }
        ("anything-but", v) => scalar(v),
        ("numeric", Value::Array(list)) => {
            let pair = |p: &[Value]| {
                matches!(&p[0], Value::String(op) if ["=", "<", "<=", ">", ">="].contains(&op.as_str()))
                    && matches!(&p[1], Value::Integer(_) | Value::Float(_))
            };
            matches!(list.len(), 2 | 4) && list.chunks(2).all(pair)
        }
        _ => false,
    };
    if ok {
        return Ok(());
    }
    Err(match key.as_str() {
        "prefix" => "`prefix` takes a string, e.g. `{ prefix = \"eu-\" }`".into(),
        "exists" => "`exists` takes `true` or `false`".into(),
        "anything-but" => "`anything-but` takes a value, an array of values, or `{ prefix = \"…\" }`".into(),
        _ => "`numeric` takes one or two operator/number pairs, the operators `=`, `<`, `<=`, `>`, `>=`, e.g. `{ numeric = [\">=\", 10, \"<\", 20] }`".into(),
    })
}

fn deliver(
    ctx: &mut Ctx<'_>,
    owner: &str,
    raw: &Spanned<RawDeliver>,
    names: &Names,
) -> Option<Deliver> {
    let span = raw.span();
    let raw = raw.get_ref();
    let before = ctx.errors.len();
    let example = "e.g. `deliver = { to = \"inventory\", path = \"/events/orders\" }`";

    let to = match &raw.to {
        None => {
            ctx.error(
                span.clone(),
                format!("`deliver` of {owner} names no service: `to` is missing"),
                Some(format!("add the service to push events to, {example}")),
            );
            None
        }
        Some(to) if !names.services.contains(to.get_ref()) => {
            let service = to.get_ref();
            let declared: Vec<&str> = names.services.iter().map(String::as_str).collect();
            let help = match did_you_mean(service, declared.iter().copied()) {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!(
                    "declare `[services.{service}]`, or deliver to one of {}",
                    quote_list(&declared)
                ),
            };
            ctx.error(
                to.span(),
                format!("{owner} delivers to `{service}`, which is not a service of this system"),
                Some(help),
            );
            None
        }
        Some(to) => Some(to.get_ref().clone()),
    };

    let path = match &raw.path {
        None => {
            ctx.error(
                span,
                format!("`deliver` of {owner} has no `path`"),
                Some(format!("add the path events are POSTed to, {example}")),
            );
            None
        }
        Some(p) => {
            let path = p.get_ref();
            // The broker POSTs to the path as written, and the mesh lets it
            // (an ACL rule of that path) only if the path is already as the
            // mesh normalises it: so no `.`, `..` or `//` segment, nothing
            // refused as `bad_path`, nothing a client would send encoded.
            let problem = if !path.starts_with('/') {
                Some("must start with `/`".to_string())
            } else if path.contains('*') {
                Some("is a pattern; events go to one plain path".to_string())
            } else if path.contains(['?', '#']) {
                Some("must not carry a query or fragment".to_string())
            } else if path.contains(|c: char| c.is_whitespace() || c.is_control()) {
                Some("must not contain spaces".to_string())
            } else if let Err(e) = PathPattern::parse(path) {
                Some(match e {
                    PatternError::Placeholder { .. } => {
                        "is a pattern; events go to one plain path".to_string()
                    }
                    e => format!("is not a plain, normalised path: {e}"),
                })
            } else {
                None
            };
            match problem {
                Some(why) => {
                    ctx.error(
                        p.span(),
                        format!("`deliver` path `{path}` {why}"),
                        Some(
                            "write the path events are POSTed to, e.g. `path = \"/events/orders\"`"
                                .into(),
                        ),
                    );
                    None
                }
                None => Some(path.clone()),
            }
        }
    };

    let concurrency = match &raw.concurrency {
        None => Some(DEFAULT_DELIVER_CONCURRENCY),
        Some(c) => ctx.count(c, "concurrency", 1, MAX_DELIVER_CONCURRENCY),
    };
    let timeout = match &raw.timeout {
        None => Some(DEFAULT_DELIVER_TIMEOUT),
        Some(t) => ctx.duration_in(
            t,
            "timeout",
            (MIN_DELIVER_TIMEOUT, MAX_DELIVER_TIMEOUT),
            "1s to 15m",
        ),
    };
    if ctx.errors.len() != before {
        return None;
    }
    Some(Deliver {
        to: to?,
        path: path?,
        concurrency: concurrency?,
        timeout: timeout?,
    })
}

/// A service's `publishes`: declared topics, each once.
pub(super) fn publishes(
    ctx: &mut Ctx<'_>,
    service: &str,
    raw: Option<&Vec<Spanned<String>>>,
    names: &Names,
) -> Vec<String> {
    let mut out = Vec::new();
    for entry in raw.into_iter().flatten() {
        let ok = reference(
            ctx,
            names,
            entry,
            &[Kind::Topic],
            &format!("`{service}` publishes to"),
            "services publish to topics; queues and streams `subscribe` to a topic to receive its events",
            None,
        );
        if ok {
            push_once(ctx, &mut out, entry, "publishes");
        }
    }
    out
}

/// A service's `consumes`: declared queues and streams, each once, and no
/// queue that `deliver` already pushes to someone.
pub(super) fn consumes(
    ctx: &mut Ctx<'_>,
    service: &str,
    raw: Option<&Vec<Spanned<String>>>,
    names: &Names,
) -> Vec<String> {
    let mut out = Vec::new();
    for entry in raw.into_iter().flatten() {
        let name = entry.get_ref();
        let ok = reference(
            ctx,
            names,
            entry,
            &[Kind::Queue, Kind::Stream],
            &format!("`{service}` consumes"),
            &format!(
                "a topic only fans events out: declare a queue with `subscribe = {{ topic = \"{name}\" }}` and consume that"
            ),
            None,
        );
        if !ok {
            continue;
        }
        if let Some((_, Some(to))) = names.queues.get(name) {
            ctx.error(
                entry.span(),
                format!("`{service}` consumes queue `{name}`, whose `deliver` pushes it to `{to}`"),
                Some(format!(
                    "a queue is either pushed (`deliver`) or pulled (`consumes`): remove one, or give `{service}` a queue of its own subscribed to the same topic"
                )),
            );
            continue;
        }
        push_once(ctx, &mut out, entry, "consumes");
    }
    out
}

fn push_once(ctx: &mut Ctx<'_>, out: &mut Vec<String>, entry: &Spanned<String>, key: &str) {
    let name = entry.get_ref();
    if out.contains(name) {
        ctx.error(
            entry.span(),
            format!("`{name}` is listed twice in `{key}`"),
            Some("remove one".into()),
        );
    } else {
        out.push(name.clone());
    }
}

#[cfg(test)]
mod tests;
