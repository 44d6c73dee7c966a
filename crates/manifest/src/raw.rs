//! The manifest exactly as written, with the source span of every value, so
//! that validation can point at the offending key. Enumerations are kept as
//! strings here: our own messages ("did you mean `function`?") beat serde's.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawManifest {
    pub name: Spanned<String>,
    pub gateway: Option<Spanned<RawGateway>>,
    pub mesh: Option<Spanned<RawMesh>>,
    #[serde(default)]
    pub services: BTreeMap<Spanned<String>, Spanned<RawService>>,
    pub broker: Option<Spanned<RawBroker>>,
    #[serde(default)]
    pub topics: BTreeMap<Spanned<String>, Spanned<RawTopic>>,
    #[serde(default)]
    pub queues: BTreeMap<Spanned<String>, Spanned<RawQueue>>,
    #[serde(default)]
    pub streams: BTreeMap<Spanned<String>, Spanned<RawStream>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGateway {
    pub listen: Option<Spanned<String>>,
    #[serde(rename = "static")]
    pub static_dir: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub jwt: Option<Spanned<RawJwts>>,
    pub cors: Option<Spanned<RawCors>>,
    pub ip: Option<Spanned<RawIp>>,
    pub rate_limits: Option<Spanned<RawRateLimits>>,
    pub tls: Option<Spanned<RawTls>>,
    pub limits: Option<Spanned<RawLimits>>,
    pub retries: Option<Spanned<RawRetries>>,
    pub outlier_detection: Option<Spanned<RawOutlier>>,
    pub request_headers: Option<Spanned<RawHeaderChanges>>,
    pub response_headers: Option<Spanned<RawHeaderChanges>>,
    pub compression: Option<Spanned<RawCompression>>,
    pub cache: Option<Spanned<RawCacheStore>>,
    pub api_keys: Option<Spanned<RawApiKeys>>,
    pub authz: Option<Spanned<RawAuthz>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAuthz {
    pub service: Spanned<String>,
    pub path_prefix: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub request_headers: Option<Vec<Spanned<String>>>,
    pub upstream_headers: Option<Vec<Spanned<String>>>,
    pub failure: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawApiKeys {
    pub header: Option<Spanned<String>>,
    pub consumers: Spanned<BTreeMap<String, Spanned<Vec<Spanned<String>>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCacheStore {
    pub max_bytes: Option<Spanned<i64>>,
    pub max_entry_bytes: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRouteCache {
    pub ttl: Option<Spanned<String>>,
    pub stale_if_error: Option<Spanned<String>>,
    pub stale_while_revalidate: Option<Spanned<String>>,
    pub query: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCompression {
    pub min_bytes: Option<Spanned<i64>>,
    pub types: Option<Spanned<Vec<Spanned<String>>>>,
    pub level: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHeaderChanges {
    pub set: Option<BTreeMap<String, Spanned<String>>>,
    pub add: Option<BTreeMap<String, Spanned<String>>>,
    pub remove: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub max_in_flight: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_connections_per_ip: Option<Spanned<i64>>,
    pub max_connection_requests: Option<Spanned<i64>>,
    pub max_connection_age: Option<Spanned<String>>,
    pub max_body_bytes: Option<Spanned<i64>>,
    pub max_header_bytes: Option<Spanned<i64>>,
    pub max_headers: Option<Spanned<i64>>,
    pub header_timeout: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub body_timeout: Option<Spanned<String>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub max_websockets: Option<Spanned<i64>>,
    pub websocket_idle_timeout: Option<Spanned<String>>,
    pub workers: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetries {
    pub attempts: Option<Spanned<i64>>,
    pub budget_percent: Option<Spanned<i64>>,
    pub min_per_second: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutlier {
    pub consecutive_failures: Option<Spanned<i64>>,
    pub base_ejection: Option<Spanned<String>>,
    pub max_ejection: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
    pub certificates: Option<Vec<RawTlsCertificate>>,
    pub client_ca: Option<Spanned<String>>,
    pub client_crl: Option<Spanned<String>>,
    pub client_auth: Option<Spanned<String>>,
    pub min_version: Option<Spanned<String>>,
    pub http_redirect: Option<Spanned<String>>,
    pub hsts: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTlsCertificate {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJwt {
    pub name: Option<Spanned<String>>,
    pub issuer: Spanned<String>,
    pub audiences: Vec<Spanned<String>>,
    pub jwks: Option<Spanned<String>>,
    pub jwks_file: Option<Spanned<String>>,
    pub leeway: Option<Spanned<String>>,
    pub jwks_ca: Option<Spanned<String>>,
    pub refresh: Option<Spanned<String>>,
    pub forward_claims: Option<Vec<Spanned<String>>>,
    pub cookie: Option<Spanned<String>>,
}

/// `jwt`: one issuer's table, or an array of them (`[[gateway.jwt]]`).
/// By hand rather than `#[serde(untagged)]`: an untagged enum buffers the
/// value, which loses every span inside it and replaces each error (an
/// unknown key, a missing `issuer`) with "did not match any variant".
#[derive(Debug)]
pub(crate) enum RawJwts {
    One(Box<RawJwt>),
    Many(Vec<Spanned<RawJwt>>),
}

impl<'de> Deserialize<'de> for RawJwts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RawJwts, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawJwts;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a table `{ issuer, audiences, jwks }`, or an array of such tables")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawJwts, A::Error> {
                RawJwt::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(|one| RawJwts::One(Box::new(one)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<RawJwts, A::Error> {
                Vec::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(RawJwts::Many)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCors {
    pub origins: Vec<Spanned<String>>,
    pub credentials: Option<bool>,
    pub methods: Option<Vec<Spanned<String>>>,
    pub headers: Option<Vec<Spanned<String>>>,
    pub expose_headers: Option<Vec<Spanned<String>>>,
    pub max_age: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIp {
    pub allow: Option<Vec<Spanned<String>>>,
    pub deny: Option<Vec<Spanned<String>>>,
    pub allow_file: Option<Spanned<String>>,
    pub deny_file: Option<Spanned<String>>,
    pub trusted_proxies: Option<Vec<Spanned<String>>>,
    pub forwarded_header: Option<Spanned<String>>,
    pub proxy_protocol: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimits {
    pub store: Spanned<String>,
    pub url: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMesh {
    pub mode: Option<Spanned<String>>,
    pub leaf_lifetime: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawService {
    pub shape: Option<Spanned<String>>,
    pub run: Option<Spanned<RawRun>>,
    pub replicas: Option<Spanned<i64>>,
    pub scale: Option<Spanned<RawScale>>,
    pub data: Option<Spanned<String>>,
    pub calls: Option<Vec<Spanned<String>>>,
    pub routes: Option<Vec<Spanned<RawRoute>>>,
    pub acl: Option<Vec<Spanned<RawAclRule>>>,
    pub env: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    pub ready_timeout: Option<Spanned<String>>,
    pub liveness_timeout: Option<Spanned<String>>,
    pub drain: Option<Spanned<String>>,
    pub publishes: Option<Vec<Spanned<String>>>,
    pub consumes: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRun {
    pub cargo: Option<Spanned<String>>,
    pub bin: Option<Spanned<String>>,
    pub command: Option<Spanned<Vec<String>>>,
    pub dir: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawScale {
    pub min: Option<Spanned<i64>>,
    pub max: Option<Spanned<i64>>,
    pub target_concurrency: Option<Spanned<i64>>,
    pub concurrency: Option<Spanned<i64>>,
    pub idle: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub path: Spanned<String>,
    pub hosts: Option<Spanned<Vec<Spanned<String>>>>,
    pub strip_prefix: Option<Spanned<String>>,
    pub split: Option<Spanned<BTreeMap<String, Spanned<i64>>>>,
    pub mirror: Option<Spanned<BTreeMap<String, Spanned<i64>>>>,
    pub retries: Option<Spanned<i64>>,
    pub cache: Option<Spanned<RawRouteCache>>,
    pub methods: Option<Vec<Spanned<String>>>,
    pub auth: Option<Spanned<String>>,
    pub issuers: Option<Spanned<Vec<Spanned<String>>>>,
    pub scopes: Option<Spanned<Vec<Spanned<String>>>>,
    pub claims: Option<Spanned<BTreeMap<String, Spanned<toml::Value>>>>,
    pub timeout: Option<Spanned<String>>,
    pub try_timeout: Option<Spanned<String>>,
    /// A limit, or a list of them (each request must pass all).
    pub rate_limit: Option<Spanned<toml::Value>>,
    pub affinity: Option<Spanned<String>>,
    pub cors: Option<Spanned<RawCors>>,
    pub request_headers: Option<Spanned<RawHeaderChanges>>,
    pub response_headers: Option<Spanned<RawHeaderChanges>>,
    pub ip: Option<Spanned<RawIp>>,
    pub max_body_bytes: Option<Spanned<i64>>,
    pub max_in_flight: Option<Spanned<i64>>,
    pub match_headers: Option<Spanned<BTreeMap<String, Spanned<toml::Value>>>>,
    pub consumers: Option<Spanned<Vec<Spanned<String>>>>,
    pub client_cert: Option<Spanned<bool>>,
    pub authz: Option<Spanned<bool>>,
    pub compress: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAclRule {
    pub caller: Spanned<String>,
    pub path: Spanned<String>,
    pub methods: Option<Vec<Spanned<String>>>,
    pub effect: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBroker {
    pub engine: Option<Spanned<String>>,
    pub durability: Option<Spanned<String>>,
    pub fsync_interval: Option<Spanned<String>>,
    pub url: Option<Spanned<String>>,
    pub prefix: Option<Spanned<String>>,
    pub max_event_bytes: Option<Spanned<i64>>,
}

/// A topic has no settings yet: `[topics.orders]` is the whole declaration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTopic {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQueue {
    pub fifo: Option<Spanned<bool>>,
    pub group_by: Option<Spanned<String>>,
    pub visibility_timeout: Option<Spanned<String>>,
    pub max_receives: Option<Spanned<i64>>,
    pub dead_letter: Option<Spanned<String>>,
    pub retention: Option<Spanned<String>>,
    pub delay: Option<Spanned<String>>,
    pub subscribe: Option<Spanned<RawSubscribe>>,
    pub deliver: Option<Spanned<RawDeliver>>,
}

/// `topic` is optional here so that its absence gets our message, not serde's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSubscribe {
    pub topic: Option<Spanned<String>>,
    pub filter: Option<Spanned<RawFilter>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDeliver {
    pub to: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub concurrency: Option<Spanned<i64>>,
    pub timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStream {
    pub partitions: Option<Spanned<i64>>,
    pub retention: Option<Spanned<String>>,
    pub source: Option<Spanned<RawSource>>,
    pub deliver: Option<Spanned<RawDeliver>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSource {
    pub topic: Option<Spanned<String>>,
    pub partition_key: Option<Spanned<String>>,
    pub filter: Option<Spanned<RawFilter>>,
}

/// A filter policy as written. Anything but a table is kept (as the name of
/// its type) so that validation can say what to write instead; a table's
/// values keep their spans.
#[derive(Debug)]
pub(crate) enum RawFilter {
    Table(Vec<(String, Spanned<toml::Value>)>),
    Other(&'static str),
}

impl<'de> Deserialize<'de> for RawFilter {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(FilterVisitor)
    }
}

struct FilterVisitor;

impl<'de> serde::de::Visitor<'de> for FilterVisitor {
    type Value = RawFilter;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a table of attribute conditions")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<RawFilter, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            // How the TOML deserializer hands out a date-time.
            if key.starts_with("$__toml_private") {
                map.next_value::<serde::de::IgnoredAny>()?;
                return Ok(RawFilter::Other("a date-time"));
            }
            let value = map.next_value::<Spanned<toml::Value>>()?;
            entries.push((key, value));
        }
        Ok(RawFilter::Table(entries))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<RawFilter, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(RawFilter::Other("an array"))
    }

    fn visit_str<E>(self, _: &str) -> Result<RawFilter, E> {
        Ok(RawFilter::Other("a string"))
    }

    fn visit_string<E>(self, _: String) -> Result<RawFilter, E> {
        Ok(RawFilter::Other("a string"))
    }

    fn visit_bool<E>(self, _: bool) -> Result<RawFilter, E> {
        Ok(RawFilter::Other("a boolean"))
    }

    fn visit_i64<E>(self, _: i64) -> Result<RawFilter, E> {
        Ok(RawFilter::Other("an integer"))
    }

    fn visit_u64<E>(self, _: u64) -> Result<RawFilter, E> {
        Ok(RawFilter::Other("an integer"))
    }

    fn visit_f64<E>(self, _: f64) -> Result<RawFilter, E> {
        Ok(RawFilter::Other("a float"))
    }
}
