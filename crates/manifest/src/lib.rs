//! The `flotilla.toml` model.
//!
//! One file describes a whole system; every other crate works from the typed,
//! validated [`Manifest`] this crate produces, never from TOML. Validation is
//! strict (unknown keys are errors, never ignored) and every error is a
//! [`Diagnostic`] that names the file, line and column and, where it can, says
//! what to write instead. `docs/manifest.md` documents the schema.

mod diagnostic;
mod edge;
mod events;
mod host;
mod pattern;
mod raw;
mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use diagnostic::Diagnostic;
pub use edge::{
    Affinity, AffinityParseError, ApiKeys, Authz, CacheStore, ClientAuth, Compression, Cors,
    ForwardedHeader, GatewayLimits, HOP_BY_HOP, HeaderChanges, HeaderDirection, IpList, IpNet,
    IpNetParseError, JwksSource, Jwt, MAX_JWT_ISSUERS, MAX_RATE_LIMITS, OutlierDetection,
    RateLimit, RateLimitKey, RateLimitParseError, RateLimitStore, Retries, RouteCache, Tls,
    TlsCertificate, TlsVersion, is_token, only_added, parse_net, parse_nets, reserved_header,
};
pub use events::{
    Broker, BrokerDurability, BrokerEngine, Deliver, Queue, Stream, StreamSource, Subscribe, Topic,
};
pub use host::{HostPattern, HostPatternError, host_name};
pub use pattern::{PathPattern, PatternError};

/// The file name Flotilla looks for.
pub const FILE_NAME: &str = "flotilla.toml";

/// A validated system description.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// The system's name (a DNS label).
    pub name: String,
    /// The manifest file, as given.
    pub file: PathBuf,
    /// The directory relative paths in the manifest are resolved against.
    pub dir: PathBuf,
    pub gateway: Gateway,
    /// Identities and access control.
    pub mesh: Mesh,
    /// Services by name, in name order.
    pub services: BTreeMap<String, Service>,
    /// The event broker's engine and limits (`[broker]`; defaults when
    /// absent).
    pub broker: Broker,
    /// Pub/sub topics by name (`[topics.<name>]`).
    pub topics: BTreeMap<String, Topic>,
    /// Work queues by name (`[queues.<name>]`).
    pub queues: BTreeMap<String, Queue>,
    /// Partitioned streams by name (`[streams.<name>]`).
    pub streams: BTreeMap<String, Stream>,
}

/// The edge of the system.
#[derive(Debug, Clone, PartialEq)]
pub struct Gateway {
    pub listen: SocketAddr,
    /// A directory of static files served at `/` for paths no route claims.
    pub static_dir: Option<PathBuf>,
    /// Default upstream timeout for routes that set none.
    pub timeout: Duration,
    /// Bearer-token verification for routes with `auth = "jwt"` or
    /// `"optional"`: the issuers whose tokens the gateway can verify, the
    /// first being the one routes accept unless they name others
    /// (`issuers`). Empty: no tokens.
    pub jwt: Vec<Jwt>,
    /// Cross-origin rules for browsers.
    pub cors: Option<Cors>,
    /// Client networks allowed or denied everywhere.
    pub ip: Option<IpList>,
    /// Where rate-limit counters live.
    pub rate_limits: RateLimitStore,
    /// HTTPS for clients (`[gateway.tls]`); plain HTTP without it.
    pub tls: Option<Tls>,
    /// Limits on clients and load (`[gateway.limits]`).
    pub limits: GatewayLimits,
    /// Retries of failed upstream attempts (`[gateway.retries]`).
    pub retries: Retries,
    /// Ejection of failing instances (`[gateway.outlier_detection]`).
    pub outlier_detection: OutlierDetection,
    /// Header changes on every request to an instance.
    pub request_headers: HeaderChanges,
    /// Header changes on every response to a client.
    pub response_headers: HeaderChanges,
    /// gzip for responses to clients that accept it
    /// (`[gateway.compression]`); off without it.
    pub compression: Option<Compression>,
    /// The store of cached responses (`[gateway.cache]`), for routes with
    /// `cache`.
    pub cache: CacheStore,
    /// The API keys of machine clients (`[gateway.api_keys]`), for routes
    /// with `auth = "key"`.
    pub api_keys: Option<ApiKeys>,
    /// The service that authorizes requests of routes with `authz = true`
    /// (`[gateway.authz]`).
    pub authz: Option<Authz>,
}

impl Gateway {
    /// `[gateway.tls] http_redirect`, if it would claim the same socket as a
    /// gateway listening on `listen`. The manifest's own `listen` is checked
    /// when it is parsed; this is for a `listen` given in its place
    /// (`flotilla up --listen`).
    pub fn redirect_clashes_with(&self, listen: SocketAddr) -> Option<SocketAddr> {
        self.tls
            .as_ref()?
            .http_redirect
            .filter(|r| same_socket(*r, listen))
    }
}

/// Whether two listeners would claim the same socket: the same port (not
/// 0, which picks a free one) on the same address, or on every address.
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Names of the platform's own identities: no service may take one.
/// `gateway` and `runtime` may appear as callers in ACL rules.
pub const PLATFORM_NAMES: [&str; 5] = ["gateway", "runtime", "operator", "broker", "objects"];

/// How identities are issued and ACLs applied (`[mesh]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mesh {
    /// Deny calls no rule allows, or only log them.
    pub mode: MeshMode,
    /// How long an instance's certificate lasts; it is renewed at 70 %.
    pub leaf_lifetime: Duration,
}

/// Whether ACL denials are enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshMode {
    /// A call no rule allows is refused with 403.
    Enforce,
    /// It is let through, logged and counted as a would-be denial.
    Audit,
}

/// Whether an ACL rule allows or denies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclEffect {
    Allow,
    Deny,
}

/// A per-caller refinement of a service's ACL (`acl = [...]`).
#[derive(Debug, Clone, PartialEq)]
pub struct AclRule {
    /// A service whose `calls` list this one, or `gateway`/`runtime`.
    pub caller: String,
    pub pattern: PathPattern,
    /// Upper-case HTTP methods; empty means any method.
    pub methods: Vec<String>,
    pub effect: AclEffect,
}

/// How a service is run and scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Long-running replicas behind a load balancer.
    Service,
    /// Zero instances until a request arrives; back to zero when idle.
    Function,
}

/// What process to start for each instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Run {
    /// A binary of a package in the Cargo workspace that holds the manifest.
    Cargo {
        package: String,
        bin: Option<String>,
    },
    /// Any command; `argv[0]` is looked up on `PATH` or relative to `dir`.
    Command { argv: Vec<String>, dir: PathBuf },
}

/// How many instances, and when to add or remove them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scale {
    /// Instances kept running at all times (0 for functions).
    pub min: u32,
    /// Upper bound on instances.
    pub max: u32,
    /// In-flight requests per instance the autoscaler aims for.
    pub concurrency: u32,
    /// How long without traffic before an instance above `min` is stopped.
    pub idle: Duration,
}

/// The database a service owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Data {
    None,
    /// One SQLite file per service, provisioned under the data dir.
    Sqlite,
}

/// Who may call a route through the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    Public,
    /// Anyone; a bearer token, if sent, must be valid and identifies the
    /// caller.
    Optional,
    /// A valid bearer token from one of the route's issuers, with these
    /// scopes and claims.
    Jwt {
        scopes: Vec<String>,
        /// Each claim the token must carry, to the values it may have: the
        /// claim must equal one of them (an array claim must contain one).
        /// Booleans and integers are kept as their text (`true`, `3`).
        claims: BTreeMap<String, Vec<String>>,
    },
    /// A key from `[gateway.api_keys]`, of one of `consumers` (any
    /// consumer's when empty).
    Key {
        consumers: Vec<String>,
    },
}

/// A path the gateway exposes, owned by one service.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub pattern: PathPattern,
    /// The names requests must have asked for (`Host`, or HTTP/2's
    /// `:authority`); empty means any.
    pub hosts: Vec<HostPattern>,
    /// Leading segments of `pattern` taken off the path before the request
    /// is forwarded (`/api/legacy` of `/api/legacy/**`).
    pub strip_prefix: Option<PathPattern>,
    /// Other services that take a share of this route's requests, each
    /// with its percentage (0–100, at most 100 in all); the route's own
    /// service takes the rest. A canary release: `{ "catalog-v2" = 10 }`.
    pub split: BTreeMap<String, u32>,
    /// Other services that get a copy of a share of this route's requests
    /// (each with its percentage, 0–100), their answers thrown away: shadow
    /// traffic for a new version, `{ "catalog-v2" = 100 }`.
    pub mirror: BTreeMap<String, u32>,
    /// Retries of a failed attempt for this route, instead of
    /// `[gateway.retries] attempts`.
    pub retries: Option<u32>,
    /// The gateway keeps its GET responses and answers repeats itself.
    pub cache: Option<RouteCache>,
    /// Upper-case HTTP methods; empty means any method.
    pub methods: Vec<String>,
    pub auth: Auth,
    /// The `[gateway] jwt` issuers (by name) whose tokens the route takes,
    /// for `auth = "jwt"` and `"optional"`; empty means the first only.
    pub issuers: Vec<String>,
    pub timeout: Duration,
    /// How long each attempt may wait for the instance's answer, within
    /// `timeout`, before it is given up and (if the request may be) retried
    /// on another instance: Envoy's `per_try_timeout`. `None`: an attempt
    /// may take all of `timeout`.
    pub try_timeout: Option<Duration>,
    /// GCRA limits for this route, each counted on its own; a request
    /// must pass all of them (20 a second and 5000 a day per user, say).
    pub rate_limits: Vec<RateLimit>,
    /// What sends a client's requests to the same instance; `None`: each
    /// request goes to the less loaded of two drawn at random.
    pub affinity: Option<Affinity>,
    /// Cross-origin rules for this route, instead of the gateway's.
    pub cors: Option<Cors>,
    /// Header changes on this route's requests, after the gateway's.
    pub request_headers: HeaderChanges,
    /// Header changes on this route's responses, after the gateway's.
    pub response_headers: HeaderChanges,
    /// Client networks for this route, on top of the gateway's.
    pub ip: Option<IpList>,
    /// Request headers the route is for: each name (lower case) to the
    /// values one of which the request's must be, exactly. A route with
    /// them is tried before one of the same path without (`match_headers`:
    /// a canary for testers who send `x-canary: 1`, say).
    pub match_headers: BTreeMap<String, Vec<String>>,
    /// Largest request body accepted (the gateway's default when `None`).
    pub max_body_bytes: Option<u64>,
    /// Requests of this route in flight at once, past which the next gets
    /// 503 (a bulkhead: a slow service cannot take every one of the
    /// gateway's `max_in_flight`); `None`: only the gateway's cap.
    pub max_in_flight: Option<u32>,
    /// Only clients with a verified certificate (`[gateway.tls] client_ca`).
    pub client_cert: bool,
    /// Each request is let through only if `[gateway.authz]`'s service
    /// allows it.
    pub authz: bool,
    /// Whether `[gateway.compression]` applies to its responses (`true`
    /// unless the route says `compress = false`).
    pub compress: bool,
}

impl Route {
    /// The paths of this route as its instances see them: `pattern` less
    /// `strip_prefix`. What the gateway may call, in the instances' ACLs.
    pub fn forwarded_pattern(&self) -> PathPattern {
        match &self.strip_prefix {
            Some(prefix) => self.pattern.without_prefix(prefix.segment_count()),
            None => self.pattern.clone(),
        }
    }

    /// Whether this route accepts `method`.
    pub fn allows(&self, method: &str) -> bool {
        self.methods.is_empty() || self.methods.iter().any(|m| m == method)
    }
}

impl Manifest {
    /// The files besides the manifest whose contents the gateway's settings
    /// are made of and a hot reload applies: the IP list files
    /// (`allow_file`, `deny_file`) of the gateway and of every route, and
    /// the JWT issuers' `jwks_ca` and `jwks_file`.
    pub fn gateway_files(&self) -> Vec<PathBuf> {
        let routes = self.services.values().flat_map(|s| &s.routes);
        let lists = self
            .gateway
            .ip
            .iter()
            .chain(routes.filter_map(|r| r.ip.as_ref()));
        let mut files: Vec<PathBuf> = lists.flat_map(|l| l.files.iter().cloned()).collect();
        for jwt in &self.gateway.jwt {
            files.extend(jwt.jwks_ca.clone());
            if let JwksSource::File(keys) = &jwt.jwks {
                files.push(keys.clone());
            }
        }
        files.sort();
        files.dedup();
        files
    }

    /// The routes whose requests may reach `service`: its own, and those of
    /// other services that `split` a share to it or `mirror` one. What the
    /// gateway may call on its instances.
    pub fn routes_reaching<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Route> {
        self.services.values().flat_map(move |s| {
            s.routes.iter().filter(move |r| {
                s.name == service || r.split.contains_key(service) || r.mirror.contains_key(service)
            })
        })
    }
}

/// One service of the system.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub shape: Shape,
    pub run: Run,
    pub scale: Scale,
    pub data: Data,
    /// Services this one may call (each becomes `FLOTILLA_URL_<NAME>`).
    pub calls: Vec<String>,
    pub routes: Vec<Route>,
    /// Per-caller ACL rules refining what `calls` and `routes` allow.
    pub acl: Vec<AclRule>,
    /// Extra environment for each instance.
    pub env: BTreeMap<String, String>,
    /// How long an instance may take to answer `/readyz` with 200.
    pub ready_timeout: Duration,
    /// How long a started instance may fail both `/readyz` and `/healthz`
    /// (no answer, or a 5xx) before it is restarted as hung.
    pub liveness_timeout: Duration,
    /// How long an instance may take to stop after SIGTERM before SIGKILL.
    pub drain: Duration,
    /// Topics this service may publish to (`publishes = ["orders"]`).
    pub publishes: Vec<String>,
    /// Queues and streams this service pulls from
    /// (`consumes = ["notifications"]`). Never a queue with `deliver`.
    pub consumes: Vec<String>,
}

/// Why a manifest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read manifest {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no {FILE_NAME} in {} or any parent directory; pass the manifest's path, e.g. `flotilla up examples/shop/flotilla.toml`",
        start.display()
    )]
    NotFound { start: PathBuf },
    #[error("{}", render(diagnostics))]
    Invalid { diagnostics: Vec<Diagnostic> },
}

fn render(diagnostics: &[Diagnostic]) -> String {
    let mut out = String::new();
    for d in diagnostics {
        out.push_str(&d.to_string());
        out.push_str("\n\n");
    }
    let n = diagnostics.len();
    out.push_str(&format!(
        "{n} error{} in manifest",
        if n == 1 { "" } else { "s" }
    ));
    out
}

impl Manifest {
    /// Reads and validates the manifest at `path`.
    pub fn load(path: &Path) -> Result<Manifest, Error> {
        let source = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Manifest::parse(&source, path)
    }

    /// Validates `source`, reporting errors against `file` and resolving
    /// relative paths against `file`'s directory.
    pub fn parse(source: &str, file: &Path) -> Result<Manifest, Error> {
        validate::parse(source, file).map_err(|diagnostics| Error::Invalid { diagnostics })
    }

    /// Finds `flotilla.toml` in `start` or the nearest ancestor.
    pub fn find(start: &Path) -> Result<PathBuf, Error> {
        start
            .ancestors()
            .map(|dir| dir.join(FILE_NAME))
            .find(|candidate| candidate.is_file())
            .ok_or_else(|| Error::NotFound {
                start: start.to_path_buf(),
            })
    }

    /// Every route of every service, with the owning service's name.
    pub fn routes(&self) -> impl Iterator<Item = (&str, &Route)> {
        self.services
            .values()
            .flat_map(|s| s.routes.iter().map(move |r| (s.name.as_str(), r)))
    }

    /// Whether the system declares any topic, queue or stream, i.e. whether
    /// it needs a broker at all.
    pub fn uses_broker(&self) -> bool {
        !(self.topics.is_empty() && self.queues.is_empty() && self.streams.is_empty())
    }

    /// The services that talk to the broker: those that publish or consume
    /// (non-empty `publishes` or `consumes`), and those some queue or stream
    /// pushes events to (`deliver.to`): every service that must reach the
    /// broker, or be reached by it.
    pub fn broker_users(&self) -> BTreeSet<String> {
        let pushed = self
            .queues
            .values()
            .filter_map(|q| q.deliver.as_ref())
            .chain(self.streams.values().filter_map(|s| s.deliver.as_ref()))
            .map(|d| d.to.clone());
        self.services
            .values()
            .filter(|s| !s.publishes.is_empty() || !s.consumes.is_empty())
            .map(|s| s.name.clone())
            .chain(pushed)
            .collect()
    }
}

/// The suffix of a service's environment variables: `order-history` →
/// `ORDER_HISTORY`, as in `FLOTILLA_URL_ORDER_HISTORY`.
pub fn env_key(service: &str) -> String {
    service.to_ascii_uppercase().replace('-', "_")
}
