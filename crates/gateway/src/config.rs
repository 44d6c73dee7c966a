//! What a gateway is told at start (and, for routes, policies and static
//! files, on reload): typed settings derived from the manifest, which
//! callers may override field by field, and their validation.
//!
//! Every policy has a typed form here and, where the manifest has a string
//! syntax for it, a parser next to its type ([`RateLimit::parse`],
//! [`crate::JwksSource::parse`], [`RouteAuth::parse`], [`crate::parse_net`]) so the
//! manifest crate can reuse them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use flotilla_manifest::{
    Affinity, Auth, HeaderDirection, HostPattern, MAX_JWT_ISSUERS, MAX_RATE_LIMITS, Manifest,
    PathPattern, RateLimitStore,
};
use http::{HeaderName, HeaderValue};

use crate::cache::CacheConfig;
use crate::client::UpstreamTls;
use crate::compress::CompressionConfig;
use crate::cors::{CorsConfig, CorsConfigError, CorsPolicy};
use crate::header_changes::HeaderChanges;
use crate::ip::{IpConfig, IpRules};
use crate::jwt::{JwksSource, JwtConfig, RouteAuth, USER_ID, USER_ISSUER, claim_header};
use crate::ratelimit::{RateLimit, RateLimitBackend, RateLimitKey};
use crate::tls::TlsConfig;

/// Everything a gateway needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen; port 0 picks a free port (see [`crate::Gateway::local_addr`]).
    pub listen: SocketAddr,
    /// The routes of every service; order does not matter, the most specific
    /// matching pattern wins.
    pub routes: Vec<RouteConfig>,
    /// Files served for GET/HEAD requests no route claims.
    pub static_dir: Option<PathBuf>,
    /// A file to append one JSON line per request to.
    pub access_log: Option<PathBuf>,
    /// Protective bounds; fixed at start except `max_body_bytes`.
    pub limits: Limits,
    /// The issuers whose access tokens the gateway verifies; needed by any
    /// route with `auth = jwt` or `optional`, which takes the first's
    /// unless its `issuers` name others. Empty: none.
    pub jwt: Vec<JwtConfig>,
    /// CORS for every path (routes may replace it with their own).
    pub cors: Option<CorsConfig>,
    /// Client address allow/deny lists and trusted proxies.
    pub ip: Option<IpConfig>,
    /// Where rate-limit counters live (default: in memory).
    pub rate_limit_backend: RateLimitBackend,
    /// The gateway's identity for mutual TLS to instances (`None`: plain
    /// TCP). Fixed at start, like `listen`.
    pub upstream_tls: Option<UpstreamTls>,
    /// HTTPS for clients (`None`: plain HTTP). Fixed at start, like
    /// `listen`; the certificate itself is reloaded when its files change.
    pub tls: Option<TlsConfig>,
    /// Header changes on every request forwarded to an instance.
    pub request_headers: HeaderChanges,
    /// Header changes on every response, the gateway's own included (but
    /// a CORS preflight's).
    pub response_headers: HeaderChanges,
    /// gzip for responses to clients that take it; off when `None`.
    pub compression: Option<CompressionConfig>,
    /// The store of responses kept for routes with `cache`.
    pub cache: CacheConfig,
    /// The keys of machine clients; needed by any route with `auth = key`.
    pub api_keys: Option<flotilla_manifest::ApiKeys>,
    /// The service that authorizes requests of routes with `authz`
    /// (`[gateway.authz]`; see [`crate::authz`]).
    pub authz: Option<flotilla_manifest::Authz>,
}

/// One path (and optionally methods) owned by a service.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub service: String,
    pub pattern: PathPattern,
    /// The names a request must have asked for; empty means any. A route
    /// with hosts wins over one without for the names it lists.
    pub hosts: Vec<HostPattern>,
    /// Leading segments of `pattern` taken off the path before forwarding;
    /// the instance learns them from `X-Forwarded-Prefix`.
    pub strip_prefix: Option<PathPattern>,
    /// Other services that take a share of the route's requests, each with
    /// its percentage; `service` takes the rest. All share one policy.
    pub split: Vec<(String, u32)>,
    /// Other services that get a copy of a share of the route's requests,
    /// each with its percentage; their answers are thrown away.
    pub mirror: Vec<(String, u32)>,
    /// Retries after a failed attempt, instead of `Limits::max_retries`.
    pub retries: Option<u32>,
    /// Keep GET responses and answer repeats from the gateway (`ttl`: how
    /// long when a response gives no freshness of its own).
    pub cache: Option<flotilla_manifest::RouteCache>,
    /// Upper-case methods; empty means any. HEAD is allowed wherever GET is.
    pub methods: Vec<String>,
    /// Bounds everything up to the upstream's response headers: waiting for
    /// an instance to activate, connecting, retries and the upstream's work.
    pub timeout: Duration,
    /// How long each attempt may wait for the instance's response headers,
    /// within `timeout`; one that takes longer is given up, and retried on
    /// another instance when the request may be (Envoy's
    /// `per_try_timeout`). `None`: an attempt may take all of `timeout`.
    pub try_timeout: Option<Duration>,
    /// Who may call it (default: anyone).
    pub auth: RouteAuth,
    /// For `auth = jwt` and `optional`: the names of the [`Config::jwt`]
    /// issuers whose tokens it takes; empty: the first's.
    pub issuers: Vec<String>,
    /// Requests allowed per client, user, header value or route: each
    /// limit counted on its own, a request must pass all (at most
    /// `MAX_RATE_LIMITS`, no two with the same unit and key).
    pub rate_limits: Vec<RateLimit>,
    /// What sends a client's requests to the same instance; `None`: the
    /// less loaded of two instances drawn at random.
    pub affinity: Option<Affinity>,
    /// Replaces the system's CORS policy for this route.
    pub cors: Option<CorsConfig>,
    /// Allow/deny lists applied on top of the system's, for this route.
    pub ip: Option<IpRules>,
    /// Replaces `Limits::max_body_bytes` for this route.
    pub max_body_bytes: Option<usize>,
    /// Requests of this route in flight at once; past it, 503 (a
    /// bulkhead). `None`: only `Limits::max_in_flight`.
    pub max_in_flight: Option<usize>,
    /// Request headers the route is for: each name to the values one of
    /// which the request's must be. Tried before a route of the same path
    /// without; empty: any request.
    pub match_headers: Vec<(HeaderName, Vec<HeaderValue>)>,
    /// Only clients that connected with a verified certificate
    /// (`TlsConfig::client_ca`); the rest get 403.
    pub client_cert: bool,
    /// Header changes on this route's requests, after the system's.
    pub request_headers: HeaderChanges,
    /// Header changes on this route's responses, after the system's.
    pub response_headers: HeaderChanges,
    /// Each request is let through only if `Config::authz`'s service
    /// allows it.
    pub authz: bool,
    /// Whether `Config::compression` applies to its responses.
    pub compress: bool,
}

impl RouteConfig {
    /// A public route with no policy of its own and a 30 s timeout.
    pub fn new(service: impl Into<String>, pattern: PathPattern) -> RouteConfig {
        RouteConfig {
            service: service.into(),
            pattern,
            hosts: Vec::new(),
            strip_prefix: None,
            split: Vec::new(),
            mirror: Vec::new(),
            retries: None,
            cache: None,
            methods: Vec::new(),
            timeout: Duration::from_secs(30),
            try_timeout: None,
            auth: RouteAuth::Public,
            issuers: Vec::new(),
            rate_limits: Vec::new(),
            affinity: None,
            cors: None,
            ip: None,
            max_body_bytes: None,
            max_in_flight: None,
            match_headers: Vec::new(),
            client_cert: false,
            request_headers: HeaderChanges::default(),
            response_headers: HeaderChanges::default(),
            authz: false,
            compress: true,
        }
    }

    /// How the route is named in errors, logs and metrics.
    pub(crate) fn name(&self) -> String {
        format!("{} {}", self.service, self.pattern.as_str())
    }
}

/// Protective bounds; the defaults suit a gateway in front of local services.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long a client may take to send a request's headers, from their
    /// first byte (slow-client protection: answered 408 and closed). Also
    /// how long a new connection may stay silent before it is closed.
    pub header_read_timeout: Duration,
    /// How long to wait for a TCP connection to an instance before trying
    /// another one.
    pub connect_timeout: Duration,
    /// Extra attempts, on other instances, for idempotent requests whose
    /// upstream connection failed.
    pub max_retries: u32,
    /// Largest request body buffered so that the request can be retried;
    /// larger bodies are streamed and not retried.
    pub retry_body_limit: usize,
    /// Largest request body (default 1 MiB); larger ones get 413. Routes
    /// may set their own.
    pub max_body_bytes: usize,
    /// Largest request head, request line and headers together (default
    /// 64 KiB, at least 8 KiB); larger ones get 431.
    pub max_header_bytes: usize,
    /// Most request headers (default 100); more get 431.
    pub max_headers: usize,
    /// Client connections open at once (default 10 000); one more is
    /// closed as soon as it is accepted (`conn_limit`).
    pub max_connections: usize,
    /// Client connections open at once from one address (an IPv6 /64);
    /// `0` (the default): no limit. Trusted proxies are not limited.
    pub max_connections_per_ip: usize,
    /// Requests a client connection carries before it is closed gracefully
    /// (HTTP/1.1: `Connection: close` on the last one's response; HTTP/2:
    /// GOAWAY once as many streams have begun); `0` (the default): no
    /// limit. Behind an L4 balancer, so that clients spread over new
    /// gateway replicas.
    pub max_connection_requests: u64,
    /// How long a client connection may live, from when it was accepted,
    /// before it is closed gracefully (HTTP/1.1: at its next response, or
    /// at once when idle; HTTP/2: GOAWAY); `None` (the default): for ever.
    /// WebSocket tunnels are not cut.
    pub max_connection_age: Option<Duration>,
    /// Requests handled at once before new ones are shed with 503
    /// `overloaded` (default 10 000): past this, latency for everyone
    /// suffers more than a quick refusal hurts a few.
    pub max_in_flight: usize,
    /// How long a kept-alive connection may sit idle between requests
    /// (default 60 s); an HTTP/2 connection with no request in progress
    /// for as long is told to go away.
    pub idle_timeout: Duration,
    /// The longest pause within a response body, either way (default
    /// 60 s, as nginx's `proxy_read_timeout` and `send_timeout`): the
    /// instance sending none of it, or the client reading none of it.
    /// Past it the response is cut short (an HTTP/1.1 connection closed,
    /// an HTTP/2 stream reset, the connection's other streams going on),
    /// so that neither a hung instance nor a client that stops reading
    /// holds a connection, a place in `max_in_flight` and an instance
    /// connection for ever.
    pub body_timeout: Duration,
    /// How long a WebSocket tunnel may carry nothing either way before it
    /// is closed (default 5 min; a client that pings keeps it open).
    pub tunnel_idle_timeout: Duration,
    /// WebSocket tunnels open at once (handshakes in progress included);
    /// past this, handshakes get 503 `too_many_websockets` (default 10 000).
    /// Each tunnel holds two sockets and 32 KiB of buffers for as long as
    /// it lives, which `max_in_flight` (about requests) does not bound.
    pub max_tunnels: usize,
    /// Retries allowed, as a share of requests in the last second, per
    /// service (default 0.2): retries must not multiply an overload.
    pub retry_budget_ratio: f64,
    /// Retries allowed per second per service whatever the ratio (default 3).
    pub retry_budget_min_per_second: u32,
    /// Consecutive failures (connect errors, 5xx) that eject an instance
    /// (default 5).
    pub outlier_consecutive_failures: u32,
    /// Ejection time, multiplied by the instance's number of ejections
    /// (default 30 s).
    pub outlier_base_ejection: Duration,
    /// Longest ejection (default 300 s).
    pub outlier_max_ejection: Duration,
    /// Threads serving connections (default: one per CPU), each with a
    /// runtime of its own; see `workers`.
    pub workers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            max_retries: 2,
            retry_body_limit: 64 * 1024,
            max_body_bytes: 1024 * 1024,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_in_flight: 10_000,
            max_connections: 10_000,
            max_connections_per_ip: 0,
            max_connection_requests: 0,
            max_connection_age: None,
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            tunnel_idle_timeout: Duration::from_secs(300),
            max_tunnels: 10_000,
            retry_budget_ratio: 0.2,
            retry_budget_min_per_second: 3,
            outlier_consecutive_failures: 5,
            outlier_base_ejection: flotilla_manifest::OutlierDetection::DEFAULT_BASE_EJECTION,
            outlier_max_ejection: flotilla_manifest::OutlierDetection::DEFAULT_MAX_EJECTION,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// Most worker threads: far past any machine's cores, short of a typo's
/// thousands of threads.
const MAX_WORKERS: usize = 1024;
/// The longest `max_connection_age` (the manifest's bound too): a longer
/// one would overflow the instant a connection's age is added to.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(86_400);

/// Why a configuration cannot be used; each message names the setting and
/// the fix. On reload the old configuration stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "route `{route}` has `auth = jwt` but the gateway has no JWT settings; add [gateway] jwt = {{ issuer, audiences, jwks }} or make the route public"
    )]
    JwtRequired { route: String },
    #[error("route `{route}` limits `per user` but is public; use `auth = jwt` or limit `per ip`")]
    UserLimitNeedsJwt { route: String },
    #[error(
        "route `{route}` has more than {MAX_RATE_LIMITS} rate limits, or two with the same unit and key; keep the stricter of two"
    )]
    RateLimits { route: String },
    #[error(
        "route `{route}` keeps clients on an instance by user but is public; use `auth = jwt`, `optional` or `key`, or `affinity = \"ip\"` or `\"cookie:<name>\"`"
    )]
    UserAffinityNeedsUser { route: String },
    #[error(
        "route `{route}` has `auth = key` but the gateway has no API keys; add [gateway.api_keys] or make the route public"
    )]
    ApiKeysRequired { route: String },
    #[error("route `{route}` admits consumer `{consumer}`, which [gateway.api_keys] does not have")]
    UnknownConsumer { route: String, consumer: String },
    #[error("[gateway.api_keys] header `{0}` cannot be a header name")]
    ApiKeyHeader(String),
    #[error(
        "route `{route}` has `authz` but the gateway has no authorization service; add [gateway.authz] with `service`"
    )]
    AuthzRequired { route: String },
    #[error("[gateway.authz] lists a header that cannot be a header name")]
    AuthzHeader,
    #[error("the JWKS server's certificate cannot be checked")]
    JwksTrust(#[source] crate::client::WebTrustError),
    #[error("the JWT issuer is empty; set jwt.issuer to the `iss` your tokens carry")]
    JwtIssuer,
    #[error(
        "jwt.forward_claims has `{0}`, which cannot be a header name (or is `id` or `issuer`, which the gateway sets); use letters, digits, `_` and `-`"
    )]
    JwtForwardClaim(String),
    #[error(
        "jwt issuer name `{0}` is empty, too long, repeated or has characters other than letters, digits, `-`, `_` and `.`"
    )]
    JwtName(String),
    #[error("two jwt issuers verify `iss = \"{0}\"`; a token goes to the one its `iss` names")]
    JwtIssuerRepeated(String),
    #[error(
        "jwt.cookie `{0}` cannot be a cookie's name; use letters, digits and `!#$%&'*+-.^_`|~`"
    )]
    JwtCookie(String),
    #[error("jwt lists more than {MAX_JWT_ISSUERS} issuers")]
    JwtTooMany,
    #[error(
        "route `{route}` takes tokens of issuer `{issuer}`, which jwt does not list (or has `issuers` without `auth = jwt` or `optional`)"
    )]
    UnknownIssuer { route: String, issuer: String },
    #[error("jwt.max_token_bytes must be at least 256")]
    JwtMaxTokenBytes,
    #[error("jwt.refresh_interval must be at least 1s")]
    JwtRefresh,
    #[error("jwt.leeway must be at most 5m: more would take tokens long expired")]
    JwtLeeway,
    #[error("{}CORS: {source}", route.as_ref().map(|r| format!("route `{r}`: ")).unwrap_or_default())]
    Cors {
        route: Option<String>,
        #[source]
        source: CorsConfigError,
    },
    #[error("the Redis rate-limit URL `{url}` is invalid; write redis://host:port")]
    RedisUrl {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("limits.{0}")]
    Limits(&'static str),
    #[error(
        "ip.proxy_protocol needs trusted_proxies: a PROXY header is believed only from the load balancers listed there"
    )]
    ProxyProtocolUntrusted,
    #[error(
        "route `{route}`: strip_prefix `{prefix}` is not how its path starts; write the path's first segments as the path has them, without `**`"
    )]
    StripPrefix { route: String, prefix: String },
    #[error(
        "route `{route}`: split gives away more than 100% of its requests, or names the route's own service; list other services with shares that add up to 100 at most"
    )]
    Split { route: String },
    #[error(
        "route `{route}`: mirror gives a share over 100% or names the route's own service; list other services, each with a share from 0 to 100"
    )]
    Mirror { route: String },
    #[error(
        "route `{route}`: try_timeout must be longer than zero and shorter than the route's timeout, which every attempt shares"
    )]
    TryTimeout { route: String },
    #[error(
        "{}{which} may not change `{name}`: {why}",
        route.as_ref().map(|r| format!("route `{r}`: ")).unwrap_or_default()
    )]
    ReservedHeader {
        route: Option<String>,
        /// `request_headers` or `response_headers`.
        which: &'static str,
        name: String,
        why: &'static str,
    },
}

impl Config {
    /// Checks everything that can be checked without the network.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if l.max_header_bytes < 8192 {
            return Err(ConfigError::Limits(
                "max_header_bytes must be at least 8192",
            ));
        }
        if l.max_headers == 0 || l.max_in_flight == 0 || l.max_connections == 0 {
            return Err(ConfigError::Limits(
                "max_headers, max_in_flight and max_connections must be at least 1",
            ));
        }
        if !(0.0..=1.0).contains(&l.retry_budget_ratio) {
            return Err(ConfigError::Limits(
                "retry_budget_ratio must be between 0 and 1",
            ));
        }
        if l.outlier_consecutive_failures == 0 {
            return Err(ConfigError::Limits(
                "outlier_consecutive_failures must be at least 1",
            ));
        }
        if l.max_connection_age
            .is_some_and(|age| age.is_zero() || age > MAX_CONNECTION_AGE)
        {
            return Err(ConfigError::Limits(
                "max_connection_age must be longer than zero and at most a day (None: no limit)",
            ));
        }
        if !(1..=MAX_WORKERS).contains(&l.workers) {
            return Err(ConfigError::Limits("workers must be between 1 and 1024"));
        }
        if self.jwt.len() > MAX_JWT_ISSUERS {
            return Err(ConfigError::JwtTooMany);
        }
        for (i, jwt) in self.jwt.iter().enumerate() {
            if jwt.issuer.is_empty() {
                return Err(ConfigError::JwtIssuer);
            }
            let name_ok = (1..=64).contains(&jwt.name.len())
                && jwt
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            let earlier = &self.jwt[..i];
            if !name_ok || earlier.iter().any(|j| j.name == jwt.name) {
                return Err(ConfigError::JwtName(jwt.name.clone()));
            }
            if earlier.iter().any(|j| j.issuer == jwt.issuer) {
                return Err(ConfigError::JwtIssuerRepeated(jwt.issuer.clone()));
            }
            if let Some(bad) = jwt.forward_claims.iter().find(|c| {
                // By the header it would travel in: claim names are
                // case-sensitive, so `ID` is a claim of its own, but
                // its header would be the gateway's `x-flotilla-user-id`.
                claim_header(c).is_none_or(|h| h == USER_ID || h == USER_ISSUER)
            }) {
                return Err(ConfigError::JwtForwardClaim(bad.clone()));
            }
            if let Some(cookie) = &jwt.cookie
                && !flotilla_manifest::is_token(cookie)
            {
                return Err(ConfigError::JwtCookie(cookie.clone()));
            }
            if jwt.max_token_bytes < 256 {
                return Err(ConfigError::JwtMaxTokenBytes);
            }
            if jwt.refresh_interval < Duration::from_secs(1) {
                return Err(ConfigError::JwtRefresh);
            }
            if jwt.leeway > Duration::from_secs(300) {
                return Err(ConfigError::JwtLeeway);
            }
        }
        if self
            .ip
            .as_ref()
            .is_some_and(|ip| ip.proxy_protocol && ip.trusted_proxies.is_empty())
        {
            return Err(ConfigError::ProxyProtocolUntrusted);
        }
        if let Some(cors) = &self.cors {
            CorsPolicy::new(cors).map_err(|source| ConfigError::Cors {
                route: None,
                source,
            })?;
        }
        check_header_changes(None, &self.request_headers, &self.response_headers)?;
        for route in &self.routes {
            check_header_changes(
                Some(route.pattern.as_str()),
                &route.request_headers,
                &route.response_headers,
            )?;
        }
        if let RateLimitBackend::Redis { url, .. } = &self.rate_limit_backend {
            crate::ratelimit::redis::check_url(url).map_err(|source| ConfigError::RedisUrl {
                url: url.clone(),
                source,
            })?;
        }
        for route in &self.routes {
            if route
                .try_timeout
                .is_some_and(|t| t.is_zero() || t >= route.timeout)
            {
                return Err(ConfigError::TryTimeout {
                    route: route.name(),
                });
            }
            // `optional` verifies tokens too, and keys `per user` limits by
            // the user when there is one (by address when not).
            let is_jwt = matches!(route.auth, RouteAuth::Optional | RouteAuth::Jwt { .. });
            if is_jwt && self.jwt.is_empty() {
                return Err(ConfigError::JwtRequired {
                    route: route.name(),
                });
            }
            if let Some(unknown) = route
                .issuers
                .iter()
                .find(|n| !is_jwt || !self.jwt.iter().any(|j| j.name == **n))
            {
                return Err(ConfigError::UnknownIssuer {
                    route: route.name(),
                    issuer: unknown.clone(),
                });
            }
            if route.authz && self.authz.is_none() {
                return Err(ConfigError::AuthzRequired {
                    route: route.name(),
                });
            }
            if let RouteAuth::Key { consumers } = &route.auth {
                let Some(keys) = &self.api_keys else {
                    return Err(ConfigError::ApiKeysRequired {
                        route: route.name(),
                    });
                };
                if let Some(unknown) = consumers.iter().find(|c| !keys.consumers.contains_key(*c)) {
                    return Err(ConfigError::UnknownConsumer {
                        route: route.name(),
                        consumer: unknown.clone(),
                    });
                }
            }
            let has_user = is_jwt || matches!(route.auth, RouteAuth::Key { .. });
            if route
                .rate_limits
                .iter()
                .any(|l| l.key == RateLimitKey::User)
                && !has_user
            {
                return Err(ConfigError::UserLimitNeedsJwt {
                    route: route.name(),
                });
            }
            let limits = &route.rate_limits;
            let twins = limits
                .iter()
                .enumerate()
                .any(|(i, a)| limits[..i].iter().any(|b| a.same_counter(b)));
            if limits.len() > MAX_RATE_LIMITS || twins {
                return Err(ConfigError::RateLimits {
                    route: route.name(),
                });
            }
            if route.affinity == Some(Affinity::User) && !has_user {
                return Err(ConfigError::UserAffinityNeedsUser {
                    route: route.name(),
                });
            }
            if let Some(cors) = &route.cors {
                CorsPolicy::new(cors).map_err(|source| ConfigError::Cors {
                    route: Some(route.name()),
                    source,
                })?;
            }
            let given = route.split.iter().map(|(_, p)| u64::from(*p)).sum::<u64>();
            if given > 100 || route.split.iter().any(|(s, _)| *s == route.service) {
                return Err(ConfigError::Split {
                    route: route.name(),
                });
            }
            if route
                .mirror
                .iter()
                .any(|(s, p)| *p > 100 || *s == route.service)
            {
                return Err(ConfigError::Mirror {
                    route: route.name(),
                });
            }
            if let Some(prefix) = &route.strip_prefix
                && (prefix.segment_count() == 0 || !route.pattern.starts_with(prefix))
            {
                return Err(ConfigError::StripPrefix {
                    route: route.name(),
                    prefix: prefix.as_str().to_string(),
                });
            }
        }
        Ok(())
    }
}

impl Config {
    /// The gateway described by `manifest`: its listen address, static
    /// directory and every service's routes. No access log file; callers set
    /// one (and override anything else) on the result.
    pub fn from_manifest(manifest: &Manifest) -> Config {
        let gw = &manifest.gateway;
        Config {
            listen: gw.listen,
            routes: manifest
                .routes()
                .map(|(service, route)| RouteConfig {
                    hosts: route.hosts.clone(),
                    strip_prefix: route.strip_prefix.clone(),
                    split: route
                        .split
                        .iter()
                        .map(|(service, percent)| (service.clone(), *percent))
                        .collect(),
                    mirror: route
                        .mirror
                        .iter()
                        .map(|(service, percent)| (service.clone(), *percent))
                        .collect(),
                    retries: route.retries,
                    cache: route.cache.clone(),
                    methods: route.methods.clone(),
                    timeout: route.timeout,
                    try_timeout: route.try_timeout,
                    auth: match &route.auth {
                        Auth::Public => RouteAuth::Public,
                        Auth::Optional => RouteAuth::Optional,
                        Auth::Jwt { scopes, claims } => RouteAuth::Jwt {
                            scopes: scopes.clone(),
                            claims: claims.clone(),
                        },
                        Auth::Key { consumers } => RouteAuth::Key {
                            consumers: consumers.clone(),
                        },
                    },
                    issuers: route.issuers.clone(),
                    rate_limits: route.rate_limits.clone(),
                    affinity: route.affinity.clone(),
                    cors: route.cors.as_ref().map(cors_config),
                    ip: route.ip.as_ref().map(|ip| IpRules {
                        allow: ip.allow.clone(),
                        deny: ip.deny.clone(),
                    }),
                    max_body_bytes: route
                        .max_body_bytes
                        .map(|b| usize::try_from(b).unwrap_or(usize::MAX)),
                    max_in_flight: route
                        .max_in_flight
                        .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
                    // Validated: names are tokens, values strings (one
                    // that is no header value could never be sent).
                    match_headers: route
                        .match_headers
                        .iter()
                        .filter_map(|(name, values)| {
                            let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
                            let values = values
                                .iter()
                                .filter_map(|v| HeaderValue::from_str(v).ok())
                                .collect();
                            Some((name, values))
                        })
                        .collect(),
                    client_cert: route.client_cert,
                    authz: route.authz,
                    compress: route.compress,
                    request_headers: HeaderChanges::from_manifest(&route.request_headers),
                    response_headers: HeaderChanges::from_manifest(&route.response_headers),
                    ..RouteConfig::new(service, route.pattern.clone())
                })
                .collect(),
            static_dir: gw.static_dir.clone(),
            access_log: None,
            limits: limits(gw),
            // A source the gateway cannot parse leaves `jwt` empty (not one
            // issuer out, which could make another the routes' default);
            // `validate` then refuses every `auth = "jwt"` route, so it
            // never fails open. The manifest's parser is the gateway's, so
            // this does not happen.
            jwt: gw
                .jwt
                .iter()
                .map(|j| {
                    let mut config = JwtConfig::new(
                        j.issuer.clone(),
                        j.audiences.clone(),
                        JwksSource::try_from(&j.jwks).ok()?,
                    );
                    config.name = j.name.clone();
                    config.refresh_interval = j.refresh;
                    config.jwks_ca = j.jwks_ca.clone();
                    config.forward_claims = j.forward_claims.clone();
                    config.cookie = j.cookie.clone();
                    config.leeway = j.leeway;
                    Some(config)
                })
                .collect::<Option<Vec<_>>>()
                .unwrap_or_default(),
            cors: gw.cors.as_ref().map(cors_config),
            ip: gw.ip.as_ref().map(|ip| IpConfig {
                allow: ip.allow.clone(),
                deny: ip.deny.clone(),
                trusted_proxies: ip.trusted_proxies.clone(),
                forwarded_header: ip.forwarded_header,
                proxy_protocol: ip.proxy_protocol,
            }),
            rate_limit_backend: match &gw.rate_limits {
                RateLimitStore::Memory => RateLimitBackend::Memory,
                RateLimitStore::Redis { url } => RateLimitBackend::Redis {
                    url: url.clone(),
                    prefix: format!("flotilla:{}:", manifest.name),
                },
            },
            upstream_tls: None,
            tls: gw.tls.as_ref().map(|t| TlsConfig {
                certificates: t.certificates.clone(),
                client_ca: t.client_ca.clone(),
                client_crl: t.client_crl.clone(),
                client_auth: t.client_auth,
                min_version: t.min_version,
                http_redirect: t.http_redirect,
                hsts: t.hsts,
                ..TlsConfig::new(&t.cert, &t.key)
            }),
            request_headers: HeaderChanges::from_manifest(&gw.request_headers),
            response_headers: HeaderChanges::from_manifest(&gw.response_headers),
            compression: gw
                .compression
                .as_ref()
                .map(CompressionConfig::from_manifest),
            cache: CacheConfig::from_manifest(&gw.cache),
            api_keys: gw.api_keys.clone(),
            authz: gw.authz.clone(),
        }
    }
}

/// Refuses a change to a header the gateway keeps for itself: a
/// configuration built in code passes the rule the manifest checks.
fn check_header_changes(
    route: Option<&str>,
    request: &HeaderChanges,
    response: &HeaderChanges,
) -> Result<(), ConfigError> {
    let refused = [
        ("request_headers", request, HeaderDirection::Request),
        ("response_headers", response, HeaderDirection::Response),
    ]
    .into_iter()
    .find_map(|(which, changes, direction)| Some((which, changes.reserved(direction)?)));
    match refused {
        Some((which, (name, why))) => Err(ConfigError::ReservedHeader {
            route: route.map(str::to_string),
            which,
            name,
            why,
        }),
        None => Ok(()),
    }
}

/// The gateway's defaults with what `[gateway.limits]`, `.retries` and
/// `.outlier_detection` set in their place.
fn limits(gw: &flotilla_manifest::Gateway) -> Limits {
    let d = Limits::default();
    let (m, r, o) = (&gw.limits, &gw.retries, &gw.outlier_detection);
    let size = |v: u32| usize::try_from(v).unwrap_or(usize::MAX);
    Limits {
        max_in_flight: m.max_in_flight.map_or(d.max_in_flight, size),
        max_connections: m.max_connections.map_or(d.max_connections, size),
        max_connections_per_ip: m
            .max_connections_per_ip
            .map_or(d.max_connections_per_ip, size),
        max_connection_requests: m
            .max_connection_requests
            .map_or(d.max_connection_requests, u64::from),
        max_connection_age: m.max_connection_age.or(d.max_connection_age),
        max_body_bytes: m.max_body_bytes.map_or(d.max_body_bytes, |v| {
            usize::try_from(v).unwrap_or(usize::MAX)
        }),
        max_header_bytes: m.max_header_bytes.map_or(d.max_header_bytes, size),
        max_headers: m.max_headers.map_or(d.max_headers, size),
        header_read_timeout: m.header_timeout.unwrap_or(d.header_read_timeout),
        idle_timeout: m.idle_timeout.unwrap_or(d.idle_timeout),
        body_timeout: m.body_timeout.unwrap_or(d.body_timeout),
        connect_timeout: m.connect_timeout.unwrap_or(d.connect_timeout),
        max_tunnels: m.max_websockets.map_or(d.max_tunnels, size),
        tunnel_idle_timeout: m.websocket_idle_timeout.unwrap_or(d.tunnel_idle_timeout),
        workers: m.workers.map_or(d.workers, size),
        max_retries: r.attempts.unwrap_or(d.max_retries),
        retry_budget_ratio: r
            .budget_percent
            .map_or(d.retry_budget_ratio, |p| f64::from(p) / 100.0),
        retry_budget_min_per_second: r.min_per_second.unwrap_or(d.retry_budget_min_per_second),
        outlier_consecutive_failures: o
            .consecutive_failures
            .unwrap_or(d.outlier_consecutive_failures),
        outlier_base_ejection: o.base_ejection.unwrap_or(d.outlier_base_ejection),
        outlier_max_ejection: o.max_ejection.unwrap_or(d.outlier_max_ejection),
        ..d
    }
}

/// The system's or a route's CORS policy, as the manifest wrote it.
fn cors_config(c: &flotilla_manifest::Cors) -> CorsConfig {
    CorsConfig {
        origins: c.origins.clone(),
        credentials: c.credentials,
        methods: c.methods.clone(),
        headers: c.headers.clone(),
        expose_headers: c.expose_headers.clone(),
        max_age: c.max_age,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, HeaderValue};
    use std::path::Path;

    fn parse(toml: &str) -> Manifest {
        match Manifest::parse(toml, Path::new("flotilla.toml")) {
            Ok(m) => m,
            Err(e) => panic!("test manifest is invalid: {e}"),
        }
    }

    #[test]
    fn from_manifest_takes_listen_routes_and_static_dir() {
        let toml = r#"
name = "shop"

[gateway]
listen = "127.0.0.1:0"
timeout = "7s"
jwt = { issuer = "shop", audiences = ["shop"], jwks = "http://127.0.0.1:1/jwks.json" }
response_headers = { set = { "x-frame-options" = "DENY" } }

[services.catalog]
run = { command = ["true"] }
routes = [
  { path = "/api/catalog/**", methods = ["GET"], affinity = "cookie:sticky" },
  { path = "/api/stock/**", hosts = ["staff.example.com"], auth = "jwt", scopes = ["stock"], claims = { "realm_access.roles" = ["staff", "admin"] }, cors = { origins = ["https://staff.example"], credentials = true }, request_headers = { remove = ["cookie"] } },
]
"#;
        let manifest = parse(toml);
        let config = Config::from_manifest(&manifest);
        assert_eq!(config.listen, manifest.gateway.listen);
        assert_eq!(config.routes.len(), 2);
        let route = &config.routes[0];
        assert_eq!(route.service, "catalog");
        assert_eq!(route.pattern.as_str(), "/api/catalog/**");
        assert_eq!(route.methods, ["GET"]);
        assert!(route.hosts.is_empty());
        assert_eq!(
            config.routes[1].hosts,
            [HostPattern::parse("staff.example.com").unwrap()]
        );
        assert_eq!(route.timeout, Duration::from_secs(7));
        assert_eq!(route.auth, RouteAuth::Public);
        assert_eq!(route.cors, None);
        assert_eq!(route.affinity, Some(Affinity::Cookie("sticky".into())));
        assert_eq!(config.routes[1].affinity, None);
        assert_eq!(
            config.response_headers.set,
            [(
                HeaderName::from_static("x-frame-options"),
                HeaderValue::from_static("DENY")
            )]
        );
        assert!(config.request_headers.is_empty());
        assert!(route.request_headers.is_empty() && route.response_headers.is_empty());
        assert_eq!(
            config.routes[1].request_headers.remove,
            [HeaderName::from_static("cookie")]
        );
        let cors = config.routes[1].cors.as_ref();
        assert_eq!(
            cors.map(|c| (c.origins.clone(), c.credentials, c.max_age)),
            Some((
                vec!["https://staff.example".to_string()],
                true,
                Duration::from_secs(600)
            ))
        );
        assert_eq!(
            config.routes[1].auth,
            RouteAuth::Jwt {
                scopes: vec!["stock".into()],
                claims: [(
                    "realm_access.roles".to_string(),
                    vec!["staff".to_string(), "admin".to_string()]
                )]
                .into(),
            }
        );
        assert!(config.static_dir.is_none());
        assert!(config.access_log.is_none());
    }

    #[test]
    fn several_issuers_are_taken_in_order_and_validated() {
        let toml = r#"
name = "shop"

[gateway]
jwt = [
  { name = "shop", issuer = "shop", audiences = ["shop"], jwks = "http://127.0.0.1:1/jwks.json" },
  { name = "staff", issuer = "https://id.corp.example/realms/staff", audiences = ["admin"], jwks = "https://id.corp.example/certs" },
]

[services.catalog]
run = { command = ["true"] }
routes = [
  { path = "/api/**", auth = "jwt" },
  { path = "/admin/**", auth = "optional", issuers = ["staff", "shop"] },
]
"#;
        let config = Config::from_manifest(&parse(toml));
        let names: Vec<&str> = config.jwt.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["shop", "staff"]);
        assert!(config.routes[0].issuers.is_empty());
        assert_eq!(config.routes[1].issuers, ["staff", "shop"]);
        assert!(config.validate().is_ok());

        let refused = |change: &dyn Fn(&mut Config), expected: &str| {
            let mut c = config.clone();
            change(&mut c);
            match c.validate() {
                Err(e) => assert!(e.to_string().contains(expected), "{e}"),
                Ok(()) => panic!("accepted, expected: {expected}"),
            }
        };
        refused(&|c| c.jwt[1].name = "shop".into(), "jwt issuer name `shop`");
        refused(&|c| c.jwt[1].name = "a:b".into(), "jwt issuer name `a:b`");
        refused(
            &|c| c.jwt[1].issuer = "shop".into(),
            "two jwt issuers verify `iss = \"shop\"`",
        );
        refused(
            &|c| c.routes[1].issuers = vec!["staf".into()],
            "route `catalog /admin/**` takes tokens of issuer `staf`",
        );
        refused(
            &|c| {
                c.routes[1].auth = RouteAuth::Public;
            },
            "takes tokens of issuer `staff`",
        );
        refused(
            &|c| c.jwt[0].forward_claims = vec!["issuer".into()],
            "jwt.forward_claims has `issuer`",
        );
        refused(
            &|c| c.jwt[0].forward_claims = vec!["tenantId".into(), "ID".into()],
            "jwt.forward_claims has `ID`",
        );
        refused(
            &|c| c.jwt[1].leeway = Duration::from_secs(301),
            "jwt.leeway must be at most 5m",
        );
        refused(
            &|c| c.jwt[0].cookie = Some("access token".into()),
            "jwt.cookie `access token` cannot be a cookie's name",
        );
        refused(
            &|c| {
                let extra = c.jwt[1].clone();
                c.jwt = (0..17)
                    .map(|i| JwtConfig {
                        name: format!("i{i}"),
                        issuer: format!("iss-{i}"),
                        ..extra.clone()
                    })
                    .collect();
            },
            "more than 16 issuers",
        );
    }

    #[test]
    fn from_manifest_takes_limits_retries_and_outlier_detection() {
        let toml = r#"
name = "l"

[gateway.limits]
max_in_flight = 2000
max_connections = 5000
max_connections_per_ip = 64
max_connection_requests = 1000
max_connection_age = "10m"
max_body_bytes = 262144
max_header_bytes = 16384
max_headers = 50
header_timeout = "5s"
idle_timeout = "30s"
body_timeout = "45s"
connect_timeout = "500ms"
max_websockets = 300
websocket_idle_timeout = "1m"
workers = 3

[gateway.retries]
attempts = 1
budget_percent = 10
min_per_second = 5

[gateway.outlier_detection]
consecutive_failures = 3
base_ejection = "10s"
max_ejection = "2m"

[services.a]
run = { command = ["true"] }
routes = [{ path = "/a/**" }]
"#;
        let manifest = parse(toml);
        let l = Config::from_manifest(&manifest).limits;
        let secs = Duration::from_secs;
        assert_eq!(
            (
                l.max_in_flight,
                l.max_body_bytes,
                l.max_header_bytes,
                l.max_headers
            ),
            (2000, 262_144, 16384, 50)
        );
        assert_eq!(
            (l.header_read_timeout, l.idle_timeout, l.connect_timeout),
            (secs(5), secs(30), Duration::from_millis(500))
        );
        assert_eq!((l.max_tunnels, l.tunnel_idle_timeout), (300, secs(60)));
        assert_eq!(l.body_timeout, secs(45));
        assert_eq!((l.max_connections, l.max_connections_per_ip), (5000, 64));
        assert_eq!(
            (l.max_connection_requests, l.max_connection_age),
            (1000, Some(secs(600)))
        );
        assert_eq!(l.workers, 3);
        assert_eq!(l.max_retries, 1);
        assert!((l.retry_budget_ratio - 0.1).abs() < 1e-9);
        assert_eq!(l.retry_budget_min_per_second, 5);
        assert_eq!(
            (
                l.outlier_consecutive_failures,
                l.outlier_base_ejection,
                l.outlier_max_ejection
            ),
            (3, secs(10), secs(120))
        );
        // What the manifest leaves out keeps the gateway's default.
        let defaults = Limits::default();
        assert_eq!(l.retry_body_limit, defaults.retry_body_limit);
        let plain = toml.split("[services.a]").nth(1).unwrap_or_default();
        let manifest = parse(&format!("name = \"l\"\n[services.a]{plain}"));
        let l = Config::from_manifest(&manifest).limits;
        assert_eq!(format!("{l:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn worker_counts_out_of_range_are_refused_naming_the_setting() {
        let toml = r#"
name = "w"

[services.a]
run = { command = ["true"] }
routes = [{ path = "/a/**" }]
"#;
        let manifest = parse(toml);
        let mut config = Config::from_manifest(&manifest);
        assert!(config.limits.workers >= 1, "one per CPU by default");
        assert!(config.validate().is_ok());
        for workers in [0, MAX_WORKERS + 1] {
            config.limits.workers = workers;
            match config.validate() {
                Err(ConfigError::Limits(message)) => {
                    assert!(message.starts_with("workers"), "{message}")
                }
                other => panic!("{workers} workers: {other:?}"),
            }
        }
        config.limits.workers = MAX_WORKERS;
        assert!(config.validate().is_ok());
    }

    #[test]
    fn connections_live_for_ever_unless_limited_and_ages_are_bounded() {
        let defaults = Limits::default();
        assert_eq!(
            (
                defaults.max_connection_requests,
                defaults.max_connection_age
            ),
            (0, None)
        );
        let mut config = Config::from_manifest(&parse(
            "name = \"z\"\n[services.a]\nrun = { command = [\"true\"] }\nroutes = [{ path = \"/a/**\" }]\n",
        ));
        // Zero, and past a day (`Duration::MAX` would overflow the instant
        // it is added to, in every connection's task).
        for age in [
            Duration::ZERO,
            MAX_CONNECTION_AGE + Duration::from_secs(1),
            Duration::MAX,
        ] {
            config.limits.max_connection_age = Some(age);
            match config.validate() {
                Err(ConfigError::Limits(message)) => {
                    assert!(message.starts_with("max_connection_age"), "{message}")
                }
                other => panic!("an age of {age:?}: {other:?}"),
            }
        }
        for age in [Duration::from_secs(1), MAX_CONNECTION_AGE] {
            config.limits.max_connection_age = Some(age);
            assert!(config.validate().is_ok(), "{age:?}");
        }
    }
}
