//! Rate limits per route: what a limit is (`"20/s burst 40 per user"`), who
//! it is counted against, where the counters live, and the headers every
//! response on a limited route carries.
//!
//! The algorithm is GCRA (the generic cell rate algorithm): one timestamp
//! per key, the "theoretical arrival time", instead of a window of counts.
//! A request is allowed when pushing the timestamp forward by one emission
//! interval keeps it within `burst` intervals of now. It is exact (no window
//! edges to double-dip across), needs one number per key, and the same few
//! lines run in memory ([`gcra`]) and as an atomic Lua script in Redis
//! ([`redis`]), so several gateway replicas can share counters.
//!
//! Headers follow the IETF draft "RateLimit header fields for HTTP"
//! (draft-ietf-httpapi-ratelimit-headers, structured-field form):
//! `RateLimit-Policy: "default";q=40;w=2` (quota `burst` replenished over
//! `w` seconds) and `RateLimit: "default";r=12;t=1` (remaining requests and
//! seconds until the quota is whole again). A rejection is 429 with
//! `Retry-After` in whole seconds.

pub(crate) mod gcra;
pub(crate) mod redis;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

/// One route's limit: `count` requests per `period`, at most `burst` at
/// once, counted per `key`.
///
/// The string form is `"<count>/<unit> [burst <n>] [per <key>]"` with unit
/// `s`, `m` or `h`, and key `ip` (the default), `user`, `route` or
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
    /// The client address (after trusted proxies, see `IpConfig`).
    Ip,
    /// The verified JWT subject; the route must have `auth = jwt`.
    User,
    /// The value of this request header (e.g. an API key); requests without
    /// it are counted per client address instead.
    Header(HeaderName),
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
    #[error("`{0}` is not a time unit: use `s`, `m` or `h`")]
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
                            Some(name) => RateLimitKey::Header(
                                HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                                    RateLimitParseError::BadHeader(name.to_string())
                                })?,
                            ),
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
    pub(crate) fn interval_nanos(&self) -> u64 {
        (self.period.as_nanos() as u64 / u64::from(self.count.max(1))).max(1)
    }

    /// How far ahead of now the arrival time may run: `burst` intervals.
    pub(crate) fn tolerance_nanos(&self) -> u64 {
        self.interval_nanos().saturating_mul(u64::from(self.burst))
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.period.as_secs() {
            3600 => "h",
            60 => "m",
            _ => "s",
        };
        write!(f, "{}/{unit}", self.count)?;
        if self.burst != self.count {
            write!(f, " burst {}", self.burst)?;
        }
        match &self.key {
            RateLimitKey::Ip => write!(f, " per ip"),
            RateLimitKey::User => write!(f, " per user"),
            RateLimitKey::Route => write!(f, " per route"),
            RateLimitKey::Header(h) => write!(f, " per header:{h}"),
        }
    }
}

/// Where rate-limit counters live.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RateLimitBackend {
    /// In this process: exact for one gateway.
    #[default]
    Memory,
    /// In Redis, shared by every gateway replica that uses the same `url`
    /// and `prefix` (an atomic Lua script per request). When Redis cannot be
    /// reached, each replica falls back to its in-memory counters (logged
    /// and counted) rather than refusing or waving through all traffic.
    Redis {
        /// `redis://host:port[/db]`.
        url: String,
        /// Prepended to every key, so several systems can share one Redis.
        prefix: String,
    },
}

/// The outcome of counting one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decision {
    pub allowed: bool,
    /// Requests that would still be allowed right now.
    pub remaining: u32,
    /// Until the quota is whole again.
    pub reset: Duration,
    /// Until one more request would be allowed (zero when allowed).
    pub retry_after: Duration,
}

impl Decision {
    /// From GCRA state: `ahead` is how far the (new, if allowed) arrival time
    /// runs ahead of now.
    pub(crate) fn from_gcra(limit: &RateLimit, allowed: bool, ahead: u64, over: u64) -> Decision {
        let interval = limit.interval_nanos();
        let tolerance = limit.tolerance_nanos();
        Decision {
            allowed,
            remaining: if allowed {
                (tolerance.saturating_sub(ahead) / interval) as u32
            } else {
                0
            },
            reset: Duration::from_nanos(ahead),
            retry_after: Duration::from_nanos(over),
        }
    }
}

/// A route's compiled limit and its counters; kept across reloads while
/// the route's limit and the backend stay the same.
pub(crate) struct Limiter {
    pub limit: RateLimit,
    store: Store,
    policy_header: HeaderValue,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("limit", &self.limit.to_string())
            .finish_non_exhaustive()
    }
}

enum Store {
    Memory(gcra::Store),
    Redis(Box<redis::Store>),
}

pub(crate) static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub(crate) static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// Whole seconds, rounded up: a client told "0" would retry at once.
fn ceil_secs(d: Duration) -> u64 {
    d.as_nanos().div_ceil(1_000_000_000) as u64
}

impl Limiter {
    /// `id` names the route stably (the same on every replica), for Redis keys.
    pub(crate) fn new(limit: RateLimit, backend: &RateLimitBackend, id: &str) -> Limiter {
        let window = ceil_secs(Duration::from_nanos(limit.tolerance_nanos())).max(1);
        let policy = format!("\"default\";q={};w={window}", limit.burst);
        let policy_header = HeaderValue::from_str(&policy)
            .unwrap_or_else(|_| HeaderValue::from_static("\"default\""));
        let store = match backend {
            RateLimitBackend::Memory => Store::Memory(gcra::Store::new(gcra::DEFAULT_MAX_KEYS)),
            RateLimitBackend::Redis { url, prefix } => {
                Store::Redis(Box::new(redis::Store::new(url, &format!("{prefix}{id}:"))))
            }
        };
        Limiter {
            limit,
            store,
            policy_header,
        }
    }

    /// Counts one request for `key`.
    pub(crate) async fn check(&self, key: &str) -> Decision {
        match &self.store {
            Store::Memory(store) => store.check(&self.limit, key),
            Store::Redis(store) => store.check(&self.limit, key).await,
        }
    }

    /// The `RateLimit`, `RateLimit-Policy` (and, when refused, `Retry-After`)
    /// headers for `decision`.
    pub(crate) fn headers(&self, decision: &Decision, headers: &mut HeaderMap) {
        headers.insert(RATELIMIT_POLICY.clone(), self.policy_header.clone());
        let value = format!(
            "\"default\";r={};t={}",
            decision.remaining,
            ceil_secs(decision.reset)
        );
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(RATELIMIT.clone(), v);
        }
        if !decision.allowed {
            let secs = ceil_secs(decision.retry_after).max(1);
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
    }
}

/// Reuses `previous` when it counts the same limit in the same backend, so a
/// reload does not hand everyone a fresh quota.
pub(crate) fn reuse_or_new(
    limit: &RateLimit,
    backend: &RateLimitBackend,
    id: &str,
    previous: Option<&Arc<Limiter>>,
    previous_backend: Option<&RateLimitBackend>,
) -> Arc<Limiter> {
    match (previous, previous_backend) {
        (Some(p), Some(b)) if &p.limit == limit && b == backend => Arc::clone(p),
        _ => Arc::new(Limiter::new(limit.clone(), backend, id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> RateLimit {
        match RateLimit::parse(s) {
            Ok(l) => l,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn full_syntax() {
        let l = parse("20/s burst 40 per user");
        assert_eq!(l.count, 20);
        assert_eq!(l.period, Duration::from_secs(1));
        assert_eq!(l.burst, 40);
        assert_eq!(l.key, RateLimitKey::User);
        assert_eq!(l.to_string(), "20/s burst 40 per user");
        assert_eq!(l.interval_nanos(), 50_000_000);
        assert_eq!(l.tolerance_nanos(), 2_000_000_000);
    }

    #[test]
    fn defaults_and_keys() {
        let l = parse("100/m");
        assert_eq!(
            (l.count, l.burst, l.period),
            (100, 100, Duration::from_secs(60))
        );
        assert_eq!(l.key, RateLimitKey::Ip);
        assert_eq!(parse("5/h per route").key, RateLimitKey::Route);
        assert_eq!(
            parse("5/h per header:X-Api-Key").key,
            RateLimitKey::Header(HeaderName::from_static("x-api-key"))
        );
        assert_eq!(parse("  3/s   per ip  burst 1 ").burst, 1);
        assert_eq!(
            parse("5/h per header:x-k").to_string(),
            "5/h per header:x-k"
        );
    }

    #[test]
    fn errors_are_precise() {
        use RateLimitParseError as E;
        let err = |s: &str| match RateLimit::parse(s) {
            Ok(l) => panic!("{s} parsed as {l}"),
            Err(e) => e,
        };
        assert_eq!(err(""), E::Empty);
        assert_eq!(err("20"), E::BadRate("20".into()));
        assert_eq!(err("20/"), E::BadRate("20/".into()));
        assert_eq!(err("20/d"), E::BadUnit("d".into()));
        assert_eq!(err("0/s"), E::BadCount("0/s".into()));
        assert_eq!(err("x/s"), E::BadCount("x/s".into()));
        assert_eq!(err("20/s burst"), E::BadBurst);
        assert_eq!(err("20/s burst 0"), E::BadBurst);
        assert_eq!(err("20/s per"), E::MissingKey);
        assert_eq!(err("20/s per bob"), E::BadKey("bob".into()));
        assert_eq!(err("20/s per header:a b"), E::Unexpected("b".into()));
        assert_eq!(err("20/s per header:"), E::BadHeader("".into()));
        assert_eq!(err("20/s burst 2 burst 3"), E::Duplicate("burst"));
        assert_eq!(err("20/s per ip per user"), E::Duplicate("per"));
        assert_eq!(err("20/s please"), E::Unexpected("please".into()));
        assert!(err("20/d").to_string().contains("`s`, `m` or `h`"));
    }

    #[test]
    fn headers_follow_the_draft() {
        let limiter = Limiter::new(parse("20/s burst 40"), &RateLimitBackend::Memory, "r");
        let mut h = HeaderMap::new();
        let d = Decision::from_gcra(&limiter.limit, true, 150_000_000, 0);
        limiter.headers(&d, &mut h);
        assert_eq!(h["ratelimit-policy"], "\"default\";q=40;w=2");
        assert_eq!(h["ratelimit"], "\"default\";r=37;t=1");
        assert!(h.get("retry-after").is_none());
        let d = Decision::from_gcra(&limiter.limit, false, 2_000_000_000, 10_000_000);
        limiter.headers(&d, &mut h);
        assert_eq!(h["ratelimit"], "\"default\";r=0;t=2");
        assert_eq!(h["retry-after"], "1");
    }
}
