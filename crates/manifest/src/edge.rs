//! The gateway's edge policies as the manifest states them: JWT issuers,
//! CORS, IP lists and rate limits, with the small string syntaxes users
//! write (`"20/s burst 40 per user"`, `"10.0.0.0/8"`).
//!
//! The parsers live here, not in the gateway, so that `flotilla check`
//! reports a bad value with its line and column; the gateway re-exports
//! them and builds its runtime policies from these validated values.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

pub use ipnet::IpNet;

/// What the gateway accepts from clients and how much it takes on
/// (`[gateway.limits]`). `None` keeps the gateway's default, which lives
/// with the gateway (and in docs/manifest.md), not here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayLimits {
    /// Requests handled at once before new ones are shed with 503.
    pub max_in_flight: Option<u32>,
    /// Client connections open at once.
    pub max_connections: Option<u32>,
    /// Client connections open at once from one address (an IPv6 /64).
    pub max_connections_per_ip: Option<u32>,
    /// Requests a client connection carries before it is closed gracefully.
    pub max_connection_requests: Option<u32>,
    /// How long a client connection may live before it is closed gracefully.
    pub max_connection_age: Option<Duration>,
    /// Largest request body of routes that set no `max_body_bytes`.
    pub max_body_bytes: Option<u64>,
    /// Largest request head (request line and headers).
    pub max_header_bytes: Option<u32>,
    /// Most request headers.
    pub max_headers: Option<u32>,
    /// How long a client may take to send a request's head.
    pub header_timeout: Option<Duration>,
    /// How long a kept-alive connection may sit idle between requests.
    pub idle_timeout: Option<Duration>,
    /// The longest pause within a response body, either way.
    pub body_timeout: Option<Duration>,
    /// How long connecting to an instance may take.
    pub connect_timeout: Option<Duration>,
    /// WebSocket tunnels open at once.
    pub max_websockets: Option<u32>,
    /// How long a tunnel may carry nothing before it is closed.
    pub websocket_idle_timeout: Option<Duration>,
    /// Threads serving connections.
    pub workers: Option<u32>,
}

/// Retries of failed upstream attempts (`[gateway.retries]`); `None` keeps
/// the gateway's default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retries {
    /// Extra attempts per request, each on another instance.
    pub attempts: Option<u32>,
    /// Retries per service as a percentage of its requests in the last second.
    pub budget_percent: Option<u32>,
    /// Retries per second per service allowed whatever the percentage.
    pub min_per_second: Option<u32>,
}

/// Passive outlier detection (`[gateway.outlier_detection]`); `None` keeps
/// the gateway's default. The two ejection defaults live here, not only
/// in the gateway, because validation compares what will be used
/// (`max_ejection` at least `base_ejection`); the gateway's `Limits`
/// default to these same constants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutlierDetection {
    /// Consecutive failures (connect errors, broken connections, timeouts,
    /// 5xx) that eject an instance.
    pub consecutive_failures: Option<u32>,
    /// Ejection time, multiplied by the instance's number of ejections.
    pub base_ejection: Option<Duration>,
    /// Longest ejection.
    pub max_ejection: Option<Duration>,
}

impl OutlierDetection {
    pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
    pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);
}

/// Header changes the gateway makes on the way to an instance
/// (`request_headers`) or back to the client (`response_headers`), for the
/// whole system or a route: the `remove` names go first, then `set`
/// replaces any field of its names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderChanges {
    /// Lower-case names and their values, each name once, in name order.
    pub set: Vec<(String, String)>,
    /// Lower-case names, each once, in the order written.
    pub remove: Vec<String>,
    /// Fields appended, beside any of the same name; lower-case names,
    /// each once, in name order.
    pub add: Vec<(String, String)>,
}

/// Fields that describe one connection, whatever `Connection` says (RFC
/// 9110 §7.6.1); so does every `Proxy-*` field. The gateway never relays
/// them, and a manifest may not set them.
pub const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Which way a header change applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderDirection {
    /// To the instance (`request_headers`).
    Request,
    /// To the client (`response_headers`).
    Response,
}

/// Why a header name is the gateway's own, if it is: a manifest may not set
/// or remove such a field, since the gateway relies on it or speaks for it.
/// `name` is lower case. Shared with the gateway, which checks a
/// configuration built in code by the same rule.
pub fn reserved_header(name: &str, direction: HeaderDirection) -> Option<&'static str> {
    // Read with `_` as `-` too: servers that hand fields over CGI-style
    // (WSGI, Rack, PHP) read `x_flotilla_user_id` as the gateway's own
    // `x-flotilla-user-id`, which is why the gateway strips a client's.
    let dashed;
    let name = if name.contains('_') {
        dashed = name.replace('_', "-");
        dashed.as_str()
    } else {
        name
    };
    if HOP_BY_HOP.contains(&name)
        || name.starts_with("proxy-")
        || name == "content-length"
        || name == "host"
    {
        return Some(
            "it belongs to the connection or the message's framing, which the gateway manages",
        );
    }
    if name == "x-request-id" {
        return Some(
            "the gateway sets it to the request's id, the same in its access log and traces",
        );
    }
    if name.starts_with("x-flotilla-user-") || name == "x-forwarded-client-cert" {
        return Some(
            "only the gateway says who the caller is, from a verified token or certificate",
        );
    }
    match direction {
        HeaderDirection::Request => {
            if matches!(
                name,
                "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host" | "forwarded"
            ) {
                return Some("the gateway sets it from the client's connection");
            }
            if name == "traceparent" || name == "tracestate" {
                return Some(
                    "the gateway passes the request's trace on, the one its access log records",
                );
            }
        }
        HeaderDirection::Response => {
            if name.starts_with("access-control-") {
                return Some("CORS fields come from `cors`");
            }
            if name == "ratelimit" || name == "ratelimit-policy" {
                return Some("rate-limit fields come from the route's `rate_limit`");
            }
            if name == "server" {
                return Some("the gateway sets it on every response");
            }
            if name == "strict-transport-security" {
                return Some("set it with `[gateway.tls] hsts`");
            }
            if name == "content-encoding" {
                return Some(
                    "it says how the body is encoded, which the instance or `[gateway.compression]` decides",
                );
            }
        }
    }
    None
}

/// Why a header may only be added to (`add`), not set or removed, if so:
/// the gateway adds values of its own that a `set` or `remove` would take
/// away. `Vary: Origin` (CORS) and `Vary: accept-encoding` (compression)
/// gone, a shared cache would hand one origin's or one encoding's answer
/// to another. `name` is lower case.
pub fn only_added(name: &str, direction: HeaderDirection) -> Option<&'static str> {
    (direction == HeaderDirection::Response && name == "vary").then_some(
        "the gateway adds to it for CORS and compression, and a `set` or `remove` would take that away; use `add`",
    )
}

/// A `tchar` of RFC 9110 §5.6.2, the bytes a field name is made of.
pub(crate) fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether `s` is a token (RFC 9110 §5.6.2): what a field's name, or a
/// cookie's (RFC 6265 §4.1.1), may be.
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_token_byte)
}

/// The most issuers `[gateway] jwt` may list (the gateway keeps the ones a
/// route takes as the bits of a 16-bit word).
pub const MAX_JWT_ISSUERS: usize = 16;

/// How the gateway verifies one issuer's bearer tokens (`[gateway.jwt]`,
/// or one of `[[gateway.jwt]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwt {
    /// What routes' `issuers` call it (`default` for a lone issuer that
    /// sets none), and, for every issuer but the first, the prefix of its
    /// users' ids (`<name>:<sub>`).
    pub name: String,
    /// Required `iss`.
    pub issuer: String,
    /// Accepted `aud` values (a token needs one of them).
    pub audiences: Vec<String>,
    /// Where the signing keys are published.
    pub jwks: JwksSource,
    /// The CA certificates (PEM) an `https://` JWKS server's certificate
    /// must chain to; `None`: the machine's trusted roots.
    pub jwks_ca: Option<PathBuf>,
    /// How often the key set is fetched again in the background.
    pub refresh: Duration,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Claims forwarded to services as `x-flotilla-user-<claim>`, by their
    /// names as written (claim names are case-sensitive; the header's is
    /// lower case).
    pub forward_claims: Vec<String>,
    /// A cookie the token may come in, when a request has no
    /// `Authorization: Bearer`.
    pub cookie: Option<String>,
}

/// Where a JWKS is fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// An `https://` URL, or an `http://` one on this machine.
    Url(String),
    /// A path on a service of this system: `accounts:/.well-known/jwks.json`.
    Service { service: String, path: String },
    /// A file on this machine (`jwks_file`), read again at every refresh.
    File(PathBuf),
}

impl JwksSource {
    /// Parses `https://host[:port]/path`, `http://` to this machine, or
    /// `<service>:/path`. The one parser of this syntax: the gateway takes
    /// the parsed form.
    ///
    /// Keys fetched over plain HTTP from another machine could be swapped
    /// on the way, and with them any token forged, so `http://` is taken
    /// for a loopback host only (a test server, a local identity provider).
    pub fn parse(s: &str) -> Result<JwksSource, String> {
        let url = s
            .strip_prefix("https://")
            .map(|rest| (true, rest))
            .or_else(|| s.strip_prefix("http://").map(|rest| (false, rest)));
        if let Some((tls, rest)) = url {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
            let host = authority
                .strip_prefix('[')
                .and_then(|h| h.split_once(']'))
                .map_or_else(|| authority.split(':').next().unwrap_or(""), |(h, _)| h);
            if host.is_empty()
                || authority.contains('@')
                || s.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(format!(
                    "`{s}` is not a JWKS URL: write `https://host[:port]/path`"
                ));
            }
            if !tls && !is_loopback(host) {
                return Err(format!(
                    "`{s}` fetches the signing keys over plain HTTP from another machine: anyone on the way could put in keys of their own and sign any token; write `https://{rest}`"
                ));
            }
            return Ok(JwksSource::Url(s.to_string()));
        }
        if s.contains("://") {
            return Err(format!(
                "`{s}`: a JWKS URL is `https://` (or `http://` to this machine); use `<service>:/path` for a service of this system"
            ));
        }
        let service_ok = |service: &str| {
            !service.is_empty()
                && service
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        let path_ok = |path: &str| {
            path.starts_with('/') && !path.chars().any(|c| c.is_whitespace() || c.is_control())
        };
        match s.split_once(':') {
            Some((service, path)) if service_ok(service) && path_ok(path) => {
                Ok(JwksSource::Service {
                    service: service.to_string(),
                    path: path.to_string(),
                })
            }
            _ => Err(format!(
                "`{s}` is not a JWKS source: write `http://host:port/path` or `<service>:/path`, e.g. \"accounts:/.well-known/jwks.json\""
            )),
        }
    }
}

/// `localhost`, or an address of 127.0.0.0/8 or `::1`.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Cross-origin rules (`[gateway.cors]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cors {
    /// Exact origins (`scheme://host[:port]`), or the single entry `*`.
    pub origins: Vec<String>,
    pub credentials: bool,
    pub methods: Vec<String>,
    pub headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub max_age: Duration,
}

/// Allow and deny lists of client networks (`[gateway.ip]`, or per route).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpList {
    /// When non-empty, only these networks may call.
    pub allow: Vec<IpNet>,
    /// These networks may never call (wins over `allow`).
    pub deny: Vec<IpNet>,
    /// Proxies whose `X-Forwarded-For` (or `Forwarded`, with
    /// `forwarded_header`) is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Which header those proxies write (`[gateway.ip]` only).
    pub forwarded_header: ForwardedHeader,
    /// Every client connection starts with a PROXY protocol header (v1 or
    /// v2), whose source address is the client when a trusted proxy sent
    /// it (`[gateway.ip]` only).
    pub proxy_protocol: bool,
    /// The files `allow` and `deny` were read from besides the manifest
    /// (`allow_file`, `deny_file`): an edit of one is a reload.
    pub files: Vec<PathBuf>,
}

/// The header `trusted_proxies` write the client's address (and scheme and
/// host) in. Only that one is read from them: a balancer that appends to
/// one passes the other through as its client sent it, so reading both
/// would let a client name its own address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host`: what
    /// AWS's and Google's load balancers, nginx, HAProxy, Envoy and most
    /// CDNs write.
    #[default]
    XForwardedFor,
    /// RFC 7239's `Forwarded` (`for=`, `proto=`, `host=`).
    Forwarded,
}

/// Where rate-limit counters live (`[gateway.rate_limits]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RateLimitStore {
    /// In the gateway process: exact for one gateway.
    #[default]
    Memory,
    /// In Redis, shared by every gateway replica.
    Redis { url: String },
}

/// HTTPS for the gateway's clients (`[gateway.tls]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// PEM certificate chain, the gateway's certificate first.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
    /// Further certificates (`[[gateway.tls.certificates]]`), each served
    /// to the clients that ask (by SNI) for a name in its subjectAltName;
    /// `cert` is served to the rest.
    pub certificates: Vec<TlsCertificate>,
    /// PEM CA certificates that sign client certificates: with it, the
    /// gateway asks every client for a certificate and verifies any it gets.
    pub client_ca: Option<PathBuf>,
    /// PEM CRLs of those CAs: client certificates they revoke are refused.
    pub client_crl: Option<PathBuf>,
    /// Whether a client without a certificate may connect at all.
    pub client_auth: ClientAuth,
    /// The oldest TLS version a client may use.
    pub min_version: TlsVersion,
    /// A plain-HTTP listener that redirects every request to HTTPS.
    pub http_redirect: Option<SocketAddr>,
    /// `Strict-Transport-Security: max-age=` on every response, if set.
    pub hsts: Option<Duration>,
}

/// One certificate chain and its key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Whether clients must present a certificate (`client_auth`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClientAuth {
    /// A client without one connects; routes with `client_cert = true`
    /// refuse its requests.
    #[default]
    Optional,
    /// The handshake fails without a valid certificate.
    Required,
}

/// A TLS protocol version (`min_version = "1.2"` or `"1.3"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

impl TlsVersion {
    /// `"1.2"` or `"1.3"`.
    pub fn parse(s: &str) -> Option<TlsVersion> {
        match s.trim() {
            "1.2" => Some(TlsVersion::Tls12),
            "1.3" => Some(TlsVersion::Tls13),
            _ => None,
        }
    }
}

/// Why a network string does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not an IP network: write a CIDR like \"10.0.0.0/8\" or \"2001:db8::/32\", or a single address"
)]
pub struct IpNetParseError(pub String);

/// Parses `"10.0.0.0/8"`, `"::1/128"` or a bare address (a /32 or /128).
pub fn parse_net(s: &str) -> Result<IpNet, IpNetParseError> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| IpNetParseError(s.to_string()))
}

/// Parses a list with [`parse_net`].
pub fn parse_nets<S: AsRef<str>>(list: &[S]) -> Result<Vec<IpNet>, IpNetParseError> {
    list.iter().map(|s| parse_net(s.as_ref())).collect()
}

/// The most rate limits one route may have: a few windows (a second, an
/// hour, a day) and keys (per client, for the whole route).
pub const MAX_RATE_LIMITS: usize = 4;

/// One route's limit: `count` requests per `period`, at most `burst` at
/// once, counted per `key`.
///
/// The string form is `"<count>/<unit> [burst <n>] [per <key>]"` with unit
/// `s`, `m`, `h` or `d`, and key `ip` (the default), `user`, `route` or
/// `header:<name>`, e.g. `"20/s burst 40 per user"`, `"100/m"`,
/// `"5/h per header:x-api-key"`. Without `burst`, the burst is `count`: up
/// to `count` requests at once, refilled at `count` per `period`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RateLimit {
    /// Requests per `period` (sustained rate).
    pub count: u32,
    pub period: Duration,
    /// How many requests may arrive at once after a quiet spell.
    pub burst: u32,
    pub key: RateLimitKey,
}

/// Whom a limit counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RateLimitKey {
    /// The client address (after trusted proxies).
    Ip,
    /// The verified JWT subject; the route must have `auth = "jwt"`.
    User,
    /// The value of this request header (lower case), e.g. an API key;
    /// requests without it are counted per client address instead.
    Header(String),
    /// One counter for the whole route.
    Route,
}

/// Why a rate-limit string does not parse; the message says what to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateLimitParseError {
    #[error("empty rate limit; write e.g. \"20/s\" or \"20/s burst 40 per user\"")]
    Empty,
    #[error("`{0}` is not a rate: write `<count>/<unit>`, e.g. \"20/s\", \"100/m\" or \"1000/h\"")]
    BadRate(String),
    #[error("`{0}` is not a time unit: use `s`, `m`, `h` or `d`")]
    BadUnit(String),
    #[error("the count in `{0}` must be a whole number from 1 to 1000000000")]
    BadCount(String),
    #[error("`burst` needs a whole number from 1 to 1000000000 after it, e.g. `burst 40`")]
    BadBurst,
    #[error("`per` needs `ip`, `user`, `route` or `header:<name>` after it")]
    MissingKey,
    #[error("`per {0}` is not a key: use `ip`, `user`, `route` or `header:<name>`")]
    BadKey(String),
    #[error("`{0}` is not a valid header name")]
    BadHeader(String),
    #[error("unexpected `{0}`; write `<count>/<unit> [burst <n>] [per <key>]`")]
    Unexpected(String),
    #[error("`{0}` is given twice")]
    Duplicate(&'static str),
}

const MAX_COUNT: u64 = 1_000_000_000;

fn parse_count(s: &str, err: impl Fn() -> RateLimitParseError) -> Result<u32, RateLimitParseError> {
    match s.parse::<u64>() {
        Ok(n) if (1..=MAX_COUNT).contains(&n) => Ok(n as u32),
        _ => Err(err()),
    }
}

/// RFC 9110 `token` characters: what a header name may contain.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl RateLimit {
    /// Parses the manifest syntax; see [`RateLimit`].
    pub fn parse(s: &str) -> Result<RateLimit, RateLimitParseError> {
        let mut words = s.split_whitespace();
        let rate = words.next().ok_or(RateLimitParseError::Empty)?;
        let (count, unit) = rate
            .split_once('/')
            .ok_or_else(|| RateLimitParseError::BadRate(rate.to_string()))?;
        let count = parse_count(count, || RateLimitParseError::BadCount(rate.to_string()))?;
        let period = match unit {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            "" => return Err(RateLimitParseError::BadRate(rate.to_string())),
            other => return Err(RateLimitParseError::BadUnit(other.to_string())),
        };
        let mut burst = None;
        let mut key = None;
        while let Some(word) = words.next() {
            match word {
                "burst" => {
                    if burst.is_some() {
                        return Err(RateLimitParseError::Duplicate("burst"));
                    }
                    let n = words.next().ok_or(RateLimitParseError::BadBurst)?;
                    burst = Some(parse_count(n, || RateLimitParseError::BadBurst)?);
                }
                "per" => {
                    if key.is_some() {
                        return Err(RateLimitParseError::Duplicate("per"));
                    }
                    let k = words.next().ok_or(RateLimitParseError::MissingKey)?;
                    key = Some(match k {
                        "ip" => RateLimitKey::Ip,
                        "user" => RateLimitKey::User,
                        "route" => RateLimitKey::Route,
                        other => match other.strip_prefix("header:") {
                            Some(name) if is_header_name(name) => {
                                RateLimitKey::Header(name.to_ascii_lowercase())
                            }
                            Some(name) => {
                                return Err(RateLimitParseError::BadHeader(name.to_string()));
                            }
                            None => return Err(RateLimitParseError::BadKey(other.to_string())),
                        },
                    });
                }
                other => return Err(RateLimitParseError::Unexpected(other.to_string())),
            }
        }
        Ok(RateLimit {
            count,
            period,
            burst: burst.unwrap_or(count),
            key: key.unwrap_or(RateLimitKey::Ip),
        })
    }

    /// Nanoseconds between two requests at the sustained rate (at least 1).
    pub fn interval_nanos(&self) -> u64 {
        (self.period.as_nanos() as u64 / u64::from(self.count.max(1))).max(1)
    }

    /// How far ahead of now the arrival time may run: `burst` intervals.
    pub fn tolerance_nanos(&self) -> u64 {
        self.interval_nanos().saturating_mul(u64::from(self.burst))
    }
}

impl RateLimit {
    /// The unit of its period as written: `s`, `m`, `h` or `d`.
    pub fn unit(&self) -> &'static str {
        match self.period.as_secs() {
            86_400 => "d",
            3600 => "h",
            60 => "m",
            _ => "s",
        }
    }

    /// Whether `other` counts the same key over the same unit of time: two
    /// such limits on one route would only repeat the stricter one.
    pub fn same_counter(&self, other: &RateLimit) -> bool {
        self.period == other.period && self.key == other.key
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.unit())?;
        if self.burst != self.count {
            write!(f, " burst {}", self.burst)?;
        }
        write!(f, " per {}", self.key)
    }
}

/// As written after `per`: `ip`, `user`, `route` or `header:<name>`.
impl fmt::Display for RateLimitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateLimitKey::Ip => write!(f, "ip"),
            RateLimitKey::User => write!(f, "user"),
            RateLimitKey::Route => write!(f, "route"),
            RateLimitKey::Header(h) => write!(f, "header:{h}"),
        }
    }
}

/// What a route's requests are sent to the same instance by (`affinity`),
/// as Envoy's ring-hash `hash_policy` and Kong's `hash_on` do: a cart, a
/// session or a user's cached state stays on the instance that holds it.
///
/// The string form is `ip`, `user`, `header:<name>` or `cookie:<name>`.
/// A request without the value is balanced as any other, except that a
/// `cookie` is then made up by the gateway and set on the response, so
/// that the client's next requests carry it (Envoy's generated cookie).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Affinity {
    /// The client address (after trusted proxies; an IPv6 client by its
    /// /64).
    Ip,
    /// The verified JWT subject, or the API key's consumer.
    User,
    /// The value of this request header (lower case).
    Header(String),
    /// The value of this cookie, set by the gateway when absent.
    Cookie(String),
}

/// Why an `affinity` string does not parse; the message says what to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AffinityParseError {
    #[error("`{0}` is not an affinity: use `ip`, `user`, `header:<name>` or `cookie:<name>`")]
    Unknown(String),
    #[error("`{0}` is not a valid header name")]
    BadHeader(String),
    #[error("`{0}` is not a valid cookie name (letters, digits and `!#$%&'*+-.^_`|~`)")]
    BadCookie(String),
}

impl Affinity {
    /// Parses the manifest syntax; see [`Affinity`].
    pub fn parse(s: &str) -> Result<Affinity, AffinityParseError> {
        match s.trim() {
            "ip" => Ok(Affinity::Ip),
            "user" => Ok(Affinity::User),
            other => {
                if let Some(name) = other.strip_prefix("header:") {
                    if is_header_name(name) {
                        Ok(Affinity::Header(name.to_ascii_lowercase()))
                    } else {
                        Err(AffinityParseError::BadHeader(name.to_string()))
                    }
                } else if let Some(name) = other.strip_prefix("cookie:") {
                    // A cookie name is an RFC 6265 token, as a header name;
                    // its case is kept: cookie names are case-sensitive.
                    if is_header_name(name) {
                        Ok(Affinity::Cookie(name.to_string()))
                    } else {
                        Err(AffinityParseError::BadCookie(name.to_string()))
                    }
                } else {
                    Err(AffinityParseError::Unknown(other.to_string()))
                }
            }
        }
    }
}

impl fmt::Display for Affinity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Affinity::Ip => write!(f, "ip"),
            Affinity::User => write!(f, "user"),
            Affinity::Header(h) => write!(f, "header:{h}"),
            Affinity::Cookie(c) => write!(f, "cookie:{c}"),
        }
    }
}

/// Whether `origin` is an exact web origin: `scheme://host[:port]`, no path.
pub(crate) fn is_origin(origin: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', ' '])
        && !rest.ends_with(':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinities_parse_and_print() {
        for (text, parsed) in [
            ("ip", Affinity::Ip),
            ("user", Affinity::User),
            ("header:X-Cart", Affinity::Header("x-cart".into())),
            ("cookie:Sticky_1", Affinity::Cookie("Sticky_1".into())),
        ] {
            assert_eq!(Affinity::parse(text), Ok(parsed.clone()), "{text}");
            assert_eq!(Affinity::parse(&parsed.to_string()), Ok(parsed));
        }
        assert_eq!(
            Affinity::parse("route"),
            Err(AffinityParseError::Unknown("route".into()))
        );
        assert_eq!(
            Affinity::parse("header:"),
            Err(AffinityParseError::BadHeader("".into()))
        );
        assert_eq!(
            Affinity::parse("cookie:a=b"),
            Err(AffinityParseError::BadCookie("a=b".into()))
        );
        assert_eq!(
            Affinity::parse("cookie:a;b"),
            Err(AffinityParseError::BadCookie("a;b".into()))
        );
    }

    #[test]
    fn rate_limits_parse_and_print() {
        let l = RateLimit::parse("20/s burst 40 per user").unwrap();
        assert_eq!(
            (l.count, l.burst, l.key.clone()),
            (20, 40, RateLimitKey::User)
        );
        assert_eq!(l.to_string(), "20/s burst 40 per user");
        let h = RateLimit::parse("5/h per header:X-Api-Key").unwrap();
        assert_eq!(h.key, RateLimitKey::Header("x-api-key".into()));
        assert_eq!(
            RateLimit::parse("100/m").unwrap().to_string(),
            "100/m per ip"
        );
        assert_eq!(
            RateLimit::parse("1/w"),
            Err(RateLimitParseError::BadUnit("w".into()))
        );
        let daily = RateLimit::parse("5000/day per user").unwrap();
        assert_eq!(daily.period, Duration::from_secs(86_400));
        assert_eq!(daily.to_string(), "5000/d per user");
        assert_eq!(
            RateLimit::parse("x/s"),
            Err(RateLimitParseError::BadCount("x/s".into()))
        );
        assert_eq!(
            RateLimit::parse("1/s per header:bad name"),
            Err(RateLimitParseError::Unexpected("name".into()))
        );
        assert_eq!(
            RateLimit::parse("1/s per header:a(b"),
            Err(RateLimitParseError::BadHeader("a(b".into()))
        );
    }

    #[test]
    fn networks() {
        assert_eq!(parse_net("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_net("::1").unwrap().to_string(), "::1/128");
        assert!(parse_net("10.0.0.0/33").is_err());
    }

    #[test]
    fn origins_and_jwks() {
        assert!(is_origin("http://localhost:8080"));
        assert!(is_origin("https://shop.example"));
        assert!(!is_origin("localhost:8080"));
        assert!(!is_origin("https://shop.example/"));
        assert_eq!(
            JwksSource::parse("accounts:/.well-known/jwks.json").unwrap(),
            JwksSource::Service {
                service: "accounts".into(),
                path: "/.well-known/jwks.json".into()
            }
        );
        for url in [
            "https://idp.example/.well-known/jwks.json",
            "https://idp.example:8443/jwks?tenant=a",
            "https://[2001:db8::1]/jwks",
            "http://127.0.0.1:9000/jwks.json",
            "http://localhost/jwks",
            "http://[::1]:8080/jwks",
        ] {
            assert_eq!(
                JwksSource::parse(url),
                Ok(JwksSource::Url(url.into())),
                "{url}"
            );
        }
        // Plain HTTP from another machine: keys anyone on the way could swap.
        for url in [
            "http://idp.example/jwks",
            "http://10.0.0.5/jwks",
            "http://[2001:db8::1]/jwks",
            "http://localhost.evil.example/jwks",
        ] {
            let why = JwksSource::parse(url).unwrap_err();
            assert!(why.contains("https://"), "{url}: {why}");
        }
        assert!(JwksSource::parse("https://user@idp.example/jwks").is_err());
        assert!(JwksSource::parse("https:///jwks").is_err());
        assert!(JwksSource::parse("accounts").is_err());
        assert!(JwksSource::parse("ftp://x/jwks").is_err());
        assert!(JwksSource::parse("Accounts:/jwks").is_err());
        assert!(JwksSource::parse("http:///jwks").is_err());
        assert!(JwksSource::parse("accounts:/a b").is_err());
    }
}

/// Response compression at the gateway (`[gateway.compression]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compression {
    /// The smallest body compressed, when the response says its length.
    pub min_bytes: u64,
    /// Media types compressed, lower case: `type/subtype`, or `type/*`.
    pub types: Vec<String>,
    /// The gzip level, 1 (fastest) to 9 (smallest).
    pub level: u32,
}

impl Compression {
    /// Below about a kilobyte, gzip's header and the chunked framing eat
    /// most of what it saves (nginx and Caddy default near here too).
    pub const DEFAULT_MIN_BYTES: u64 = 1024;
    /// Most of level 9's ratio on text for a fraction of its CPU.
    pub const DEFAULT_LEVEL: u32 = 5;
    /// Text formats that compress well; images, video, archives and fonts
    /// other than SVG are compressed already.
    pub const DEFAULT_TYPES: [&str; 14] = [
        "text/html",
        "text/css",
        "text/plain",
        "text/javascript",
        "text/xml",
        "text/csv",
        "text/markdown",
        "application/javascript",
        "application/json",
        "application/problem+json",
        "application/xml",
        "application/manifest+json",
        "application/wasm",
        "image/svg+xml",
    ];
}

impl Default for Compression {
    fn default() -> Compression {
        Compression {
            min_bytes: Compression::DEFAULT_MIN_BYTES,
            types: Compression::DEFAULT_TYPES.map(String::from).to_vec(),
            level: Compression::DEFAULT_LEVEL,
        }
    }
}

/// External authorization (`[gateway.authz]`), as Envoy's `ext_authz`
/// HTTP service, nginx's `auth_request` and Traefik's `forwardAuth` do it:
/// before a request of a route with `authz = true` goes on, the gateway
/// asks a service of the system (over the mesh) with the request's method,
/// path and chosen headers, and the service's answer decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authz {
    pub service: String,
    /// Put before the request's path in the check (`""`: the path as is).
    pub path_prefix: String,
    /// How long the check may take.
    pub timeout: Duration,
    /// The client's headers the check gets (lower case), besides `Host`
    /// and what the gateway tells every instance.
    pub request_headers: Vec<String>,
    /// Headers of an allowing answer that go on with the request (lower
    /// case); a client's own copies never do.
    pub upstream_headers: Vec<String>,
    /// When the check fails (no answer in time, 5xx): let the request
    /// through (`failure = "allow"`) instead of refusing it with 503.
    pub failure_open: bool,
}

impl Authz {
    /// `timeout` when none is set.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
    /// The longest `timeout`.
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);
    /// `request_headers` when none are set: the credentials a check reads.
    pub const DEFAULT_REQUEST_HEADERS: [&'static str; 2] = ["authorization", "cookie"];
}

/// The keys machine clients authenticate with (`[gateway.api_keys]`), as
/// Kong's key-auth takes them: each consumer's keys, by their SHA-256, so
/// that the manifest holds nothing that would let anyone in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeys {
    /// The request header a key comes in (lower case).
    pub header: String,
    /// Each consumer's keys' SHA-256 digests (more than one while a key is
    /// rotated).
    pub consumers: BTreeMap<String, Vec<[u8; 32]>>,
}

impl ApiKeys {
    pub const DEFAULT_HEADER: &str = "x-api-key";

    /// Whether `name` may name a consumer: up to 64 letters, digits, `-`,
    /// `_` or `.` (it becomes `x-flotilla-user-id`'s value).
    pub fn is_consumer_name(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    }
}

/// The gateway's store of cached responses (`[gateway.cache]`): one for
/// every route with `cache`, bounded in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStore {
    /// Bytes kept in all (bodies, heads and keys); past it the entries
    /// used longest ago go first.
    pub max_bytes: u64,
    /// The largest response body kept; a larger one is relayed, not kept.
    pub max_entry_bytes: u64,
}

impl CacheStore {
    pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;
    pub const DEFAULT_MAX_ENTRY_BYTES: u64 = 1 << 20;
}

impl Default for CacheStore {
    fn default() -> CacheStore {
        CacheStore {
            max_bytes: CacheStore::DEFAULT_MAX_BYTES,
            max_entry_bytes: CacheStore::DEFAULT_MAX_ENTRY_BYTES,
        }
    }
}

/// A route's response caching (`cache = { ttl = "30s" }`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteCache {
    /// How long a response without freshness of its own (`Cache-Control:
    /// max-age`, `s-maxage`, `Expires`) is served from the cache.
    pub ttl: Duration,
    /// How long past its freshness a kept response may still be served
    /// when the service fails (RFC 5861's `stale-if-error`, which a
    /// response may also give itself); zero: never.
    pub stale_if_error: Duration,
    /// How long past its freshness a kept response may still be served at
    /// once while the gateway fetches it again in the background (RFC
    /// 5861's `stale-while-revalidate`, which a response may also give
    /// itself); zero: never.
    pub stale_while_revalidate: Duration,
    /// The query parameters a GET or HEAD keeps, by name as sent, in the
    /// order of their names: the others are dropped from the request the
    /// instance gets as from its key, so that neither a tracking parameter
    /// nor a random one makes another entry, and what the instance answers
    /// is always for what the entry is keyed by. `None`: the query as sent.
    pub query: Option<Vec<String>>,
}

impl RouteCache {
    pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
}
