//! The broker's declarations: what parses, the defaults, and each error
//! with its message, help and place.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use crate::{BrokerDurability, BrokerEngine, Manifest};

const EVENTS: &str = r#"name = "shop"
[broker]
engine = "embedded"
durability = "interval"
fsync_interval = "50ms"
max_event_bytes = 262144
[topics.orders]
[topics.payments]
[queues.inventory-orders]
subscribe = { topic = "orders", filter = { type = ["order.placed"], amount = [{ numeric = [">=", 10] }] } }
deliver = { to = "inventory", path = "/events/orders", concurrency = 2, timeout = "30s" }
max_receives = 5
dead_letter = "inventory-orders-dlq"
visibility_timeout = "0s"
retention = "2d"
delay = "5s"
[queues.inventory-orders-dlq]
[queues.payment-jobs]
fifo = true
group_by = "customer"
subscribe = { topic = "payments" }
[streams.order-analytics]
partitions = 8
retention = "3d"
source = { topic = "orders", partition_key = "customer" }
deliver = { to = "analytics", path = "/events/analytics" }
[services.orders]
run = { cargo = "shop-orders" }
publishes = ["orders", "payments"]
[services.inventory]
run = { cargo = "shop-inventory" }
[services.analytics]
run = { cargo = "shop-analytics" }
consumes = ["order-analytics", "payment-jobs"]
[services.web]
run = { cargo = "shop-web" }
"#;

fn parse(src: &str) -> Manifest {
    Manifest::parse(src, Path::new("flotilla.toml")).unwrap_or_else(|e| panic!("{e}"))
}

fn errors(src: &str) -> String {
    match Manifest::parse(src, Path::new("flotilla.toml")) {
        Ok(m) => panic!("expected errors, got {m:#?}"),
        Err(e) => e.to_string(),
    }
}

/// Where `needle` (which must occur once in `src`) starts, plus `skip`
/// bytes, as the diagnostic shows it.
fn place(src: &str, needle: &str, skip: usize) -> String {
    assert_eq!(src.matches(needle).count(), 1, "`{needle}` in:\n{src}");
    let start = src.find(needle).unwrap() + skip;
    let line = src[..start].matches('\n').count() + 1;
    let column = start - src[..start].rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("--> flotilla.toml:{line}:{column}\n")
}

#[test]
fn a_full_declaration_parses() {
    let m = parse(EVENTS);
    assert_eq!(
        m.broker.engine,
        BrokerEngine::Embedded {
            durability: BrokerDurability::Interval(Duration::from_millis(50))
        }
    );
    assert_eq!(m.broker.max_event_bytes, 262_144);
    assert_eq!(m.topics.keys().collect::<Vec<_>>(), ["orders", "payments"]);
    assert_eq!(m.topics["orders"].name, "orders");

    let q = &m.queues["inventory-orders"];
    assert_eq!(q.name, "inventory-orders");
    assert!(!q.fifo);
    assert_eq!(q.group_by, None);
    assert_eq!(q.visibility_timeout, Some(Duration::ZERO));
    assert_eq!(q.max_receives, Some(5));
    assert_eq!(q.dead_letter.as_deref(), Some("inventory-orders-dlq"));
    assert_eq!(q.retention, Some(Duration::from_secs(2 * 24 * 3600)));
    assert_eq!(q.delay, Some(Duration::from_secs(5)));
    let sub = q.subscribe.as_ref().unwrap();
    assert_eq!(sub.topic, "orders");
    assert_eq!(sub.filter.keys().collect::<Vec<_>>(), ["amount", "type"]);
    assert_eq!(
        sub.filter["type"],
        toml::Value::Array(vec![toml::Value::String("order.placed".into())])
    );
    let numeric = &sub.filter["amount"].as_array().unwrap()[0];
    assert_eq!(
        numeric["numeric"].as_array().unwrap()[1],
        toml::Value::Integer(10)
    );
    let deliver = q.deliver.as_ref().unwrap();
    assert_eq!(deliver.to, "inventory");
    assert_eq!(deliver.path, "/events/orders");
    assert_eq!(deliver.concurrency, 2);
    assert_eq!(deliver.timeout, Duration::from_secs(30));

    let dlq = &m.queues["inventory-orders-dlq"];
    assert!(dlq.subscribe.is_none() && dlq.deliver.is_none());

    let jobs = &m.queues["payment-jobs"];
    assert!(jobs.fifo);
    assert_eq!(jobs.group_by.as_deref(), Some("customer"));
    assert!(jobs.subscribe.as_ref().unwrap().filter.is_empty());

    let s = &m.streams["order-analytics"];
    assert_eq!(s.name, "order-analytics");
    assert_eq!(s.partitions, 8);
    assert_eq!(s.retention, Some(Duration::from_secs(3 * 24 * 3600)));
    let source = s.source.as_ref().unwrap();
    assert_eq!(
        (source.topic.as_str(), source.partition_key.as_str()),
        ("orders", "customer")
    );
    assert!(source.filter.is_empty());
    assert_eq!(s.deliver.as_ref().unwrap().to, "analytics");

    assert_eq!(m.services["orders"].publishes, ["orders", "payments"]);
    assert!(m.services["orders"].consumes.is_empty());
    assert_eq!(
        m.services["analytics"].consumes,
        ["order-analytics", "payment-jobs"]
    );
    assert!(m.uses_broker());
    // `web` neither publishes, consumes nor is delivered to.
    assert_eq!(
        m.broker_users(),
        BTreeSet::from(["analytics".into(), "inventory".into(), "orders".into()])
    );
}

#[test]
fn defaults() {
    let src = r#"name = "shop"
[topics.t]
[queues.q]
subscribe = { topic = "t" }
deliver = { to = "a", path = "/e" }
[streams.s]
source = { topic = "t" }
[services.a]
run = { cargo = "a" }
"#;
    let m = parse(src);
    assert_eq!(
        m.broker.engine,
        BrokerEngine::Embedded {
            durability: BrokerDurability::Always
        }
    );
    assert_eq!(m.broker.max_event_bytes, 1 << 20);
    let q = &m.queues["q"];
    assert!(!q.fifo);
    assert_eq!(
        (
            &q.group_by,
            q.visibility_timeout,
            q.max_receives,
            &q.dead_letter,
            q.retention,
            q.delay
        ),
        (&None, None, None, &None, None, None)
    );
    let deliver = q.deliver.as_ref().unwrap();
    assert_eq!(deliver.concurrency, 8);
    assert_eq!(deliver.timeout, Duration::from_secs(10));
    let s = &m.streams["s"];
    assert_eq!((s.partitions, s.retention), (4, None));
    assert_eq!(s.source.as_ref().unwrap().partition_key, "partitionkey");
    assert!(s.deliver.is_none());
    assert!(m.services["a"].publishes.is_empty());
    assert!(m.services["a"].consumes.is_empty());
    assert!(m.uses_broker());
    assert_eq!(m.broker_users(), BTreeSet::from(["a".to_string()]));

    // No declarations: no broker needed, and `[broker]` still has defaults.
    let m = parse("name = \"shop\"\n[services.a]\nrun = { cargo = \"a\" }\n");
    assert!(!m.uses_broker());
    assert!(m.broker_users().is_empty());
    assert_eq!(m.broker.max_event_bytes, 1 << 20);
    assert!(m.topics.is_empty() && m.queues.is_empty() && m.streams.is_empty());

    let m = parse(&src.replace(
        "[topics.t]",
        "[broker]\ndurability = \"interval\"\n[topics.t]",
    ));
    assert_eq!(
        m.broker.engine,
        BrokerEngine::Embedded {
            durability: BrokerDurability::Interval(Duration::from_millis(100))
        }
    );

    let m = parse(&src.replace(
        "[topics.t]",
        "[broker]\nengine = \"nats\"\nurl = \"tls://nats.internal:4222\"\n[topics.t]",
    ));
    assert_eq!(
        m.broker.engine,
        BrokerEngine::Nats {
            url: "tls://nats.internal:4222".into(),
            prefix: "flotilla-shop".into()
        }
    );
    let m = parse(&src.replace(
        "[topics.t]",
        "[broker]\nengine = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nprefix = \"ci_42\"\n[topics.t]",
    ));
    assert!(matches!(m.broker.engine, BrokerEngine::Nats { prefix, .. } if prefix == "ci_42"));
}

/// Every shape of condition the broker's parser takes passes the manifest.
#[test]
fn every_condition_shape_the_broker_takes_is_accepted() {
    let src = EVENTS.replacen(
        "amount = [{ numeric = [\">=\", 10] }]",
        "amount = [10, 2.5, true, \"x\", { prefix = \"1\" }, { anything-but = \"a\" }, { anything-but = [\"a\", 1, false] }, { anything-but = { prefix = \"b\" } }, { numeric = [\">\", 0, \"<=\", 9.5] }, { numeric = [\"=\", 3] }, { exists = false }]",
        1,
    );
    let m = parse(&src);
    let sub = m.queues["inventory-orders"].subscribe.as_ref().unwrap();
    assert_eq!(sub.filter["amount"].as_array().map(Vec::len), Some(11));
}

#[test]
fn pull_and_push_combinations_that_are_allowed() {
    // A stream may be pushed to one service and consumed by others (each in
    // its own consumer group); a queue may keep max_receives without a
    // dead-letter queue (messages are then dropped); a dead-letter queue may
    // itself push.
    let src = EVENTS
        .replacen(
            "consumes = [\"order-analytics\", \"payment-jobs\"]",
            "consumes = [\"order-analytics\", \"payment-jobs\"]\n[services.reports]\nrun = { cargo = \"r\" }\nconsumes = [\"order-analytics\"]",
            1,
        )
        .replacen("dead_letter = \"inventory-orders-dlq\"\n", "", 1)
        .replacen(
            "[queues.inventory-orders-dlq]",
            "[queues.inventory-orders-dlq]\ndeliver = { to = \"web\", path = \"/dlq\" }",
            1,
        );
    let m = parse(&src);
    assert_eq!(m.queues["inventory-orders"].dead_letter, None);
    assert_eq!(m.queues["inventory-orders"].max_receives, Some(5));
    assert_eq!(m.services["reports"].consumes, ["order-analytics"]);
    assert!(m.broker_users().contains("web"));
}

/// The example docs/manifest.md gives for events parses as printed.
#[test]
fn the_documented_example_parses() {
    let docs = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/manifest.md"),
    )
    .unwrap();
    let section = docs
        .split("\n## Events:")
        .nth(1)
        .expect("docs/manifest.md has an `## Events:` section");
    let example = section
        .split("```toml\n")
        .nth(1)
        .and_then(|s| s.split("\n```").next())
        .expect("the section starts with a TOML example");
    let m = parse(example);
    assert_eq!(
        m.broker.engine,
        BrokerEngine::Embedded {
            durability: BrokerDurability::Always
        }
    );
    let q = &m.queues["inventory-orders"];
    assert_eq!(q.subscribe.as_ref().unwrap().topic, "orders");
    assert_eq!(q.deliver.as_ref().unwrap().to, "inventory");
    assert_eq!(q.dead_letter.as_deref(), Some("inventory-orders-dlq"));
    assert_eq!(m.streams["order-analytics"].partitions, 4);
    assert_eq!(m.services["orders"].publishes, ["orders"]);
    assert_eq!(m.services["analytics"].consumes, ["order-analytics"]);
    assert_eq!(
        m.broker_users(),
        BTreeSet::from(["analytics".into(), "inventory".into(), "orders".into()])
    );
}

/// Replace, with, message, help, and (needle, skip) locating the error.
type Case<'a> = (&'a str, &'a str, &'a str, &'a str, (&'a str, usize));

/// One error each, with its message, help and place.
#[test]
fn each_error_names_the_place_and_the_fix() {
    let long = "x".repeat(81);
    let long_topic = format!("[topics.orders]\n[topics.{long}]");
    let long_message = format!("topic name `{long}` is longer than 80 characters");
    let cases: Vec<Case> = vec![
        // Names.
        (
            "[topics.payments]",
            "[topics.payments]\n[topics.-bad]",
            "topic name `-bad` must start with a letter or digit",
            "use 1-80 ASCII letters, digits and `-`, starting with a letter or digit",
            ("-bad]", 0),
        ),
        (
            "[streams.order-analytics]",
            "[streams.order_log]\n[streams.order-analytics]",
            "stream name `order_log` may contain only ASCII letters, digits and `-`",
            "e.g. `[streams.order-events]`",
            ("order_log", 0),
        ),
        (
            "[topics.orders]",
            &long_topic,
            &long_message,
            "use 1-80",
            (&long, 0),
        ),
        (
            "[queues.inventory-orders-dlq]",
            "[queues.inventory-orders-dlq]\n[queues.orders]",
            "`orders` is declared both as a topic and as a queue",
            "rename the queue: `publishes` and `consumes` refer to topics, queues and streams by name",
            ("[queues.orders]", 8),
        ),
        (
            "[streams.order-analytics]",
            "[streams.payment-jobs]\n[streams.order-analytics]",
            "`payment-jobs` is declared both as a queue and as a stream",
            "rename the stream",
            ("[streams.payment-jobs]", 9),
        ),
        // References to topics.
        (
            "subscribe = { topic = \"payments\" }",
            "subscribe = { topic = \"paymnts\" }",
            "queue `payment-jobs` takes events from `paymnts`, which is not a topic of this system",
            "did you mean `payments`?",
            ("\"paymnts\"", 0),
        ),
        (
            "subscribe = { topic = \"payments\" }",
            "subscribe = { topic = \"inventory-orders-dlq\" }",
            "queue `payment-jobs` takes events from `inventory-orders-dlq`, which is a queue, not a topic",
            "events reach queues and streams only through topics",
            ("\"inventory-orders-dlq\" }", 0),
        ),
        (
            "subscribe = { topic = \"payments\" }",
            "subscribe = { filter = { type = [\"x\"] } }",
            "`subscribe` of queue `payment-jobs` names no `topic`",
            "write e.g. `subscribe = { topic = \"orders\" }`",
            ("{ filter", 0),
        ),
        (
            "source = { topic = \"orders\"",
            "source = { topic = \"ordrs\"",
            "stream `order-analytics` takes events from `ordrs`, which is not a topic of this system",
            "did you mean `orders`?",
            ("\"ordrs\"", 0),
        ),
        (
            "publishes = [\"orders\", \"payments\"]",
            "publishes = [\"orders\", \"paymets\"]",
            "`orders` publishes to `paymets`, which is not a topic of this system",
            "did you mean `payments`?",
            ("\"paymets\"", 0),
        ),
        (
            "publishes = [\"orders\", \"payments\"]",
            "publishes = [\"orders\", \"payment-jobs\"]",
            "`orders` publishes to `payment-jobs`, which is a queue, not a topic",
            "services publish to topics; queues and streams `subscribe` to a topic",
            ("\"payment-jobs\"]\n[services.inventory]", 0),
        ),
        (
            "publishes = [\"orders\", \"payments\"]",
            "publishes = [\"orders\", \"orders\"]",
            "`orders` is listed twice in `publishes`",
            "remove one",
            ("\"orders\"]", 0),
        ),
        // Consumes.
        (
            "consumes = [\"order-analytics\", \"payment-jobs\"]",
            "consumes = [\"order-analytic\", \"payment-jobs\"]",
            "`analytics` consumes `order-analytic`, which is not a queue or stream of this system",
            "did you mean `order-analytics`?",
            ("\"order-analytic\"", 0),
        ),
        (
            "consumes = [\"order-analytics\", \"payment-jobs\"]",
            "consumes = [\"payments\"]",
            "`analytics` consumes `payments`, which is a topic, not a queue or stream",
            "declare a queue with `subscribe = { topic = \"payments\" }` and consume that",
            ("[\"payments\"]", 1),
        ),
        (
            "consumes = [\"order-analytics\", \"payment-jobs\"]",
            "consumes = [\"inventory-orders\"]",
            "`analytics` consumes queue `inventory-orders`, whose `deliver` pushes it to `inventory`",
            "a queue is either pushed (`deliver`) or pulled (`consumes`)",
            ("[\"inventory-orders\"]", 1),
        ),
        (
            "consumes = [\"order-analytics\", \"payment-jobs\"]",
            "consumes = [\"payment-jobs\", \"payment-jobs\"]",
            "`payment-jobs` is listed twice in `consumes`",
            "remove one",
            ("\"payment-jobs\"]", 0),
        ),
        // Deliver.
        (
            "to = \"inventory\"",
            "to = \"inventroy\"",
            "queue `inventory-orders` delivers to `inventroy`, which is not a service of this system",
            "did you mean `inventory`?",
            ("\"inventroy\"", 0),
        ),
        (
            "deliver = { to = \"analytics\", path",
            "deliver = { path",
            "`deliver` of stream `order-analytics` names no service: `to` is missing",
            "e.g. `deliver = { to = \"inventory\", path = \"/events/orders\" }`",
            ("{ path = \"/events/analytics\"", 0),
        ),
        (
            ", path = \"/events/analytics\" }",
            " }",
            "`deliver` of stream `order-analytics` has no `path`",
            "add the path events are POSTed to",
            ("{ to = \"analytics\" }", 0),
        ),
        (
            "path = \"/events/orders\"",
            "path = \"events/orders\"",
            "`deliver` path `events/orders` must start with `/`",
            "e.g. `path = \"/events/orders\"`",
            ("\"events/orders\"", 0),
        ),
        (
            "path = \"/events/orders\"",
            "path = \"/events/*\"",
            "`deliver` path `/events/*` is a pattern; events go to one plain path",
            "e.g. `path = \"/events/orders\"`",
            ("\"/events/*\"", 0),
        ),
        (
            "path = \"/events/orders\"",
            "path = \"/events?kind=orders\"",
            "`deliver` path `/events?kind=orders` must not carry a query or fragment",
            "e.g. `path = \"/events/orders\"`",
            ("\"/events?kind", 0),
        ),
        // The broker's POST is let through by an ACL rule of the path:
        // only a path the mesh leaves as it is could ever pass it.
        (
            "path = \"/events/orders\"",
            "path = \"/events/../orders\"",
            "`deliver` path `/events/../orders` is not a plain, normalised path: a `..` segment is not allowed; write the normalised path",
            "e.g. `path = \"/events/orders\"`",
            ("\"/events/../", 0),
        ),
        (
            "path = \"/events/orders\"",
            "path = \"/events//orders\"",
            "`deliver` path `/events//orders` is not a plain, normalised path: empty segment (`//`) in the path",
            "e.g. `path = \"/events/orders\"`",
            ("\"/events//", 0),
        ),
        (
            "path = \"/events/orders\"",
            "path = \"/events/orders;v=1\"",
            "`deliver` path `/events/orders;v=1` is not a plain, normalised path: `orders;v=1` contains characters that are not allowed in a path (`?`, `#`, `%`, `;`, `\\`, spaces or control characters)",
            "e.g. `path = \"/events/orders\"`",
            ("\"/events/orders;", 0),
        ),
        (
            "path = \"/events/orders\"",
            "path = \"/events/%6Frders\"",
            "`deliver` path `/events/%6Frders` is not a plain, normalised path: `%6Frders` contains characters that are not allowed in a path (`?`, `#`, `%`, `;`, `\\`, spaces or control characters)",
            "e.g. `path = \"/events/orders\"`",
            ("\"/events/%6F", 0),
        ),
        (
            "path = \"/events/orders\"",
            "path = \"/\u{e9}v\u{e9}nements\"",
            "`deliver` path `/\u{e9}v\u{e9}nements` is not a plain, normalised path: `\u{e9}v\u{e9}nements` has characters clients send percent-encoded (non-ASCII, `\"`, `<`, `>`, `` ` ``, `{`, `}`), so no request path could match it",
            "e.g. `path = \"/events/orders\"`",
            ("\"/\u{e9}v", 0),
        ),
        (
            "path = \"/events/orders\"",
            "path = \"/events/{kind}\"",
            "`deliver` path `/events/{kind}` is a pattern; events go to one plain path",
            "e.g. `path = \"/events/orders\"`",
            ("\"/events/{", 0),
        ),
        (
            "concurrency = 2",
            "concurrency = 0",
            "`concurrency = 0` is out of range",
            "use a whole number from 1 to 256",
            ("0, timeout", 0),
        ),
        (
            "concurrency = 2",
            "concurrency = 257",
            "`concurrency = 257` is out of range",
            "use a whole number from 1 to 256",
            ("257", 0),
        ),
        (
            "timeout = \"30s\"",
            "timeout = \"20m\"",
            "`timeout = \"20m\"` is out of range",
            "use a duration from 1s to 15m",
            ("\"20m\"", 0),
        ),
        (
            "timeout = \"30s\"",
            "timeout = \"500ms\"",
            "`timeout = \"500ms\"` is out of range",
            "use a duration from 1s to 15m",
            ("\"500ms\"", 0),
        ),
        // Queue settings.
        (
            "dead_letter = \"inventory-orders-dlq\"",
            "dead_letter = \"inventory-orders\"",
            "queue `inventory-orders` names itself as its `dead_letter`",
            "declare a separate queue, e.g. `[queues.inventory-orders-dlq]`",
            ("\"inventory-orders\"\n", 0),
        ),
        (
            "dead_letter = \"inventory-orders-dlq\"",
            "dead_letter = \"inventory-dlq\"",
            "the `dead_letter` of queue `inventory-orders` is `inventory-dlq`, which is not a queue of this system",
            "declare `[queues.inventory-dlq]`, or name one of `inventory-orders-dlq`, `payment-jobs`",
            ("\"inventory-dlq\"", 0),
        ),
        (
            "dead_letter = \"inventory-orders-dlq\"",
            "dead_letter = \"inventory-orders-dql\"",
            "the `dead_letter` of queue `inventory-orders` is `inventory-orders-dql`, which is not a queue of this system",
            "did you mean `inventory-orders-dlq`?",
            ("\"inventory-orders-dql\"", 0),
        ),
        (
            "dead_letter = \"inventory-orders-dlq\"",
            "dead_letter = \"orders\"",
            "the `dead_letter` of queue `inventory-orders` is `orders`, which is a topic, not a queue",
            "name a queue, e.g. declare `[queues.inventory-orders-dlq]`",
            ("\"orders\"\nvisibility", 0),
        ),
        (
            "[queues.inventory-orders-dlq]",
            "[queues.inventory-orders-dlq]\nfifo = true",
            "dead-letter queue `inventory-orders-dlq` must be a standard queue, like queue `inventory-orders`",
            "remove `fifo = true` from `[queues.inventory-orders-dlq]`",
            ("\"inventory-orders-dlq\"", 0),
        ),
        (
            "fifo = true\n",
            "",
            "`group_by` needs `fifo = true`",
            "add `fifo = true`, or remove `group_by`",
            ("\"customer\"\n", 0),
        ),
        (
            "group_by = \"customer\"",
            "group_by = \"Customer-ID\"",
            "`Customer-ID` is not an event attribute name",
            "CloudEvents attribute names are lower-case letters and digits",
            ("\"Customer-ID\"", 0),
        ),
        (
            "max_receives = 5",
            "max_receives = 0",
            "`max_receives = 0` is out of range",
            "use a whole number from 1 to 1000",
            ("= 0", 2),
        ),
        (
            "visibility_timeout = \"0s\"",
            "visibility_timeout = \"13h\"",
            "`visibility_timeout = \"13h\"` is out of range",
            "use a duration from 0s to 12h",
            ("\"13h\"", 0),
        ),
        (
            "visibility_timeout = \"0s\"",
            "visibility_timeout = \"soon\"",
            "`soon` is not a duration",
            "such as `visibility_timeout = \"500ms\"`",
            ("\"soon\"", 0),
        ),
        (
            "retention = \"2d\"",
            "retention = \"30s\"",
            "`retention = \"30s\"` is out of range",
            "use a duration from 60s to 14d",
            ("= \"30s\"\ndelay", 2),
        ),
        (
            "retention = \"2d\"",
            "retention = \"15d\"",
            "`retention = \"15d\"` is out of range",
            "use a duration from 60s to 14d",
            ("\"15d\"", 0),
        ),
        (
            "delay = \"5s\"",
            "delay = \"901s\"",
            "`delay = \"901s\"` is out of range",
            "use a duration from 0s to 900s",
            ("\"901s\"", 0),
        ),
        // Streams.
        (
            "partitions = 8",
            "partitions = 0",
            "`partitions = 0` is out of range",
            "use a whole number from 1 to 256",
            ("partitions = 0", 13),
        ),
        (
            "retention = \"3d\"",
            "retention = \"30m\"",
            "`retention = \"30m\"` is out of range",
            "use a duration from 1h to 7d",
            ("\"30m\"", 0),
        ),
        (
            "retention = \"3d\"",
            "retention = \"8d\"",
            "`retention = \"8d\"` is out of range",
            "use a duration from 1h to 7d",
            ("\"8d\"", 0),
        ),
        (
            "partition_key = \"customer\"",
            "partition_key = \"\"",
            "`` is not an event attribute name",
            "e.g. `partition_key = \"customer\"`",
            ("\"\" }", 0),
        ),
        // Filters.
        (
            "filter = { type = [\"order.placed\"]",
            "filter = { type = \"order.placed\"",
            "the filter on `type` must be an array of conditions, not a string",
            "wrap it in an array: `type = [\"order.placed\"]`",
            ("\"order.placed\"", 0),
        ),
        (
            "amount = [{ numeric = [\">=\", 10] }]",
            "amount = { numeric = [\">=\", 10] }",
            "the filter on `amount` must be an array of conditions, not a table",
            "wrap the condition in an array: `amount = [{ … }]`",
            ("{ numeric", 0),
        ),
        // Conditions of a shape the broker's parser refuses, said here with
        // the place and the attribute.
        (
            "amount = [{ numeric = [\">=\", 10] }]",
            "amount = [{ numerc = [\">=\", 10] }]",
            "the filter on `amount`: unknown condition `numerc`; did you mean `numeric`?",
            "a condition is an exact value",
            ("[{ numerc", 0),
        ),
        (
            "amount = [{ numeric = [\">=\", 10] }]",
            "amount = [{ numeric = [\">=\", \"10\"] }]",
            "the filter on `amount`: `numeric` takes one or two operator/number pairs, the operators `=`, `<`, `<=`, `>`, `>=`, e.g. `{ numeric = [\">=\", 10, \"<\", 20] }`",
            "`{ exists = true }`",
            ("[{ numeric", 0),
        ),
        (
            "amount = [{ numeric = [\">=\", 10] }]",
            "amount = [{ numeric = [\"~\", 10] }]",
            "the filter on `amount`: `numeric` takes one or two operator/number pairs, the operators `=`, `<`, `<=`, `>`, `>=`, e.g. `{ numeric = [\">=\", 10, \"<\", 20] }`",
            "a condition is an exact value",
            ("[{ numeric", 0),
        ),
        (
            "amount = [{ numeric = [\">=\", 10] }]",
            "amount = [10, { prefix = \"1\", exists = true }]",
            "the filter on `amount`: a condition table takes exactly one of `prefix`, `anything-but`, `numeric` and `exists`",
            "a condition is an exact value",
            ("[10, {", 0),
        ),
        (
            "amount = [{ numeric = [\">=\", 10] }]",
            "amount = [{ anything-but = [[1]] }]",
            "the filter on `amount`: `anything-but` takes a value, an array of values, or `{ prefix = \"…\" }`",
            "a condition is an exact value",
            ("[{ anything", 0),
        ),
        (
            "amount = [{ numeric = [\">=\", 10] }]",
            "amount = [{ exists = \"yes\" }]",
            "the filter on `amount`: `exists` takes `true` or `false`",
            "a condition is an exact value",
            ("[{ exists", 0),
        ),
        (
            "filter = { type = [\"order.placed\"]",
            "filter = { type = [\"order.placed\", [\"order.paid\"]]",
            "the filter on `type`: a condition cannot be an array",
            "a condition is an exact value",
            ("[\"order.placed\", [", 0),
        ),
        (
            "filter = { type = [\"order.placed\"]",
            "filter = { type = []",
            "the filter on `type` lists no condition: no event could match",
            "e.g. `type = [\"order.placed\"]`, or remove it",
            ("[], amount", 0),
        ),
        (
            "subscribe = { topic = \"payments\" }",
            "subscribe = { topic = \"payments\", filter = [\"payment.due\"] }",
            "`filter` must be a table, not an array",
            "map event attributes to lists of conditions, e.g. `filter = { type = [\"order.placed\"] }`",
            ("[\"payment.due\"]", 0),
        ),
        // [broker].
        (
            "engine = \"embedded\"",
            "engine = \"nat\"",
            "unknown broker engine `nat`",
            "did you mean `engine = \"nats\"`?",
            ("\"nat\"", 0),
        ),
        (
            "durability = \"interval\"",
            "durability = \"sometimes\"",
            "unknown durability `sometimes`",
            "write `durability = \"always\"`",
            ("\"sometimes\"", 0),
        ),
        (
            "durability = \"interval\"",
            "durability = \"always\"",
            "`fsync_interval` applies to `durability = \"interval\"` only",
            "add `durability = \"interval\"`, or remove `fsync_interval`",
            ("\"50ms\"", 0),
        ),
        (
            "fsync_interval = \"50ms\"",
            "fsync_interval = \"0s\"",
            "`fsync_interval` must be longer than zero",
            "write a duration",
            ("\"0s\"\nmax_event", 0),
        ),
        (
            "max_event_bytes = 262144",
            "max_event_bytes = 16777217",
            "`max_event_bytes = 16777217` is out of range",
            "use a number of bytes from 1 to 16777216 (16 MiB); the default is 1048576 (1 MiB)",
            ("16777217", 0),
        ),
        (
            "engine = \"embedded\"\ndurability = \"interval\"\nfsync_interval = \"50ms\"",
            "engine = \"nats\"",
            "`engine = \"nats\"` needs a `url`",
            "add `url = \"nats://127.0.0.1:4222\"`",
            ("\"nats\"", 0),
        ),
        (
            "engine = \"embedded\"\ndurability = \"interval\"\nfsync_interval = \"50ms\"",
            "engine = \"nats\"\nurl = \"http://127.0.0.1:4222\"",
            "`http://127.0.0.1:4222` is not a NATS URL",
            "write `nats://host:port`, or `tls://host:port` for TLS",
            ("\"http://", 0),
        ),
        (
            "engine = \"embedded\"\ndurability = \"interval\"\nfsync_interval = \"50ms\"",
            "engine = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nprefix = \"shop.events\"",
            "`shop.events` cannot prefix NATS subjects and stream names",
            "use ASCII letters, digits, `-` and `_`, e.g. `prefix = \"flotilla-shop\"`",
            ("\"shop.events\"", 0),
        ),
        (
            "engine = \"embedded\"\ndurability = \"interval\"\nfsync_interval = \"50ms\"",
            "engine = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\ndurability = \"always\"",
            "`durability` applies to `engine = \"embedded\"` only",
            "remove it: NATS JetStream stores events by its own settings",
            ("\"always\"", 0),
        ),
        (
            "engine = \"embedded\"",
            "engine = \"embedded\"\nurl = \"nats://127.0.0.1:4222\"",
            "`url` applies to `engine = \"nats\"` only",
            "remove it, or write `engine = \"nats\"`",
            ("\"nats://", 0),
        ),
    ];
    for (from, to, message, help, (needle, skip)) in cases {
        assert_eq!(EVENTS.matches(from).count(), 1, "`{from}`");
        let src = EVENTS.replacen(from, to, 1);
        let e = errors(&src);
        assert!(e.contains(&format!("error: {message}\n")), "{to}: {e}");
        let help_line = e.lines().find(|l| l.starts_with("  = help: "));
        assert!(help_line.is_some_and(|l| l.contains(help)), "{to}: {e}");
        assert!(e.contains(&place(&src, needle, skip)), "{to}: {e}");
        assert!(e.ends_with("\n1 error in manifest"), "{to}: {e}");
    }
}

#[test]
fn unknown_keys_suggest_the_nearest() {
    let cases = [
        (
            "max_receives = 5",
            "max_recieves = 5",
            "max_recieves",
            "did you mean `max_receives`?",
        ),
        (
            "concurrency = 2",
            "concurency = 2",
            "concurency",
            "did you mean `concurrency`?",
        ),
        (
            "partition_key =",
            "partitionkey =",
            "partitionkey",
            "did you mean `partition_key`?",
        ),
        (
            "max_event_bytes =",
            "max_event_size =",
            "max_event_size",
            "did you mean `max_event_bytes`?",
        ),
        (
            "publishes =",
            "publish =",
            "publish",
            "did you mean `publishes`?",
        ),
        (
            "consumes =",
            "consume =",
            "consume",
            "did you mean `consumes`?",
        ),
        (
            "partitions = 8",
            "shards = 8",
            "shards",
            "the keys allowed here are `partitions`, `retention`, `source`, `deliver`",
        ),
        (
            "[topics.payments]",
            "[topics.payments]\nkind = \"fanout\"",
            "kind",
            "nothing can be set here yet; leave the table empty",
        ),
    ];
    for (from, to, key, help) in cases {
        let src = EVENTS.replacen(from, to, 1);
        let e = errors(&src);
        assert!(
            e.contains(&format!("error: unknown key `{key}`\n")),
            "{to}: {e}"
        );
        assert!(e.contains(&format!("= help: {help}")), "{to}: {e}");
        let needle = format!("\n{key}");
        let at = if src.contains(&needle) {
            place(&src, &needle, 1)
        } else {
            place(&src, &format!(" {key} ="), 1)
        };
        assert!(e.contains(&at), "{to}: {e}");
    }
}

#[test]
fn all_event_errors_are_reported_at_once() {
    let src = EVENTS
        .replacen("to = \"inventory\"", "to = \"inventroy\"", 1)
        .replacen("partitions = 8", "partitions = 0", 1)
        .replacen(
            "publishes = [\"orders\", \"payments\"]",
            "publishes = [\"order\"]",
            1,
        )
        .replacen("engine = \"embedded\"", "engine = \"kafka\"", 1);
    let e = errors(&src);
    assert!(e.ends_with("\n4 errors in manifest"), "{e}");
}

#[test]
fn hand_checked_places() {
    // The same checks as above, with the line and column spelled out.
    let e = errors(&EVENTS.replacen("topic = \"payments\"", "topic = \"paymnts\"", 1));
    assert!(e.contains("--> flotilla.toml:21:23\n"), "{e}");
    let e = errors(&EVENTS.replacen(
        "consumes = [\"order-analytics\"",
        "consumes = [\"orders\"",
        1,
    ));
    assert!(e.contains("--> flotilla.toml:34:13\n"), "{e}");
    let e = errors(&EVENTS.replacen(
        "[topics.payments]",
        "[topics.payments]\n[streams.orders]",
        1,
    ));
    assert!(
        e.contains("error: `orders` is declared both as a topic and as a stream"),
        "{e}"
    );
    assert!(e.contains("--> flotilla.toml:9:10\n"), "{e}");
}

/// Every error docs/manifest.md shows under "Errors" is the message printed
/// for its example, exactly (`flotilla check` prints the same text; the
/// CLI's end-to-end test checks a selection of them through the binary).
#[test]
fn the_documented_errors_are_printed_exactly() {
    let docs = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/manifest.md"),
    )
    .unwrap();
    let errors_section = docs.split("\n## Errors\n").nth(1).unwrap();
    let mut checked = 0;
    for example in errors_section.split("\n### ").skip(1) {
        let mut blocks = example.split("```").skip(1).step_by(2);
        let (Some(input), Some(output)) = (blocks.next(), blocks.next()) else {
            panic!("an example without input and output:\n{example}");
        };
        let input = input.strip_prefix("toml\n").expect("a TOML input block");
        let expected = output.trim_matches('\n');
        assert_eq!(errors(input), expected, "for input:\n{input}");
        checked += 1;
    }
    assert!(checked >= 10, "{checked} examples");
}
