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

use http::{HeaderName, HeaderValue};

use crate::relayed::Fields;

// The limit itself and its string syntax belong to the manifest, so that
// `flotilla check` reports a bad limit with its line and column.
pub use flotilla_manifest::{RateLimit, RateLimitKey, RateLimitParseError};

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
            // Boxed: the Redis exchange's future is large, and unboxed it
            // would make every request's future larger, memory store or not.
            Store::Redis(store) => Box::pin(store.check(&self.limit, key)).await,
        }
    }

    /// The `RateLimit`, `RateLimit-Policy` (and, when refused, `Retry-After`)
    /// headers for `decision`.
    pub(crate) fn headers(&self, decision: &Decision, headers: &mut Fields<'_>) {
        headers.insert(RATELIMIT_POLICY.clone(), self.policy_header.clone());
        // `"default";r=<u32>;t=<u64>`: at most 49 bytes, one allocation
        // (the value's), and itoa instead of `fmt` (a third of the cost).
        let mut remaining = itoa::Buffer::new();
        let mut reset = itoa::Buffer::new();
        let mut value = Vec::with_capacity(49);
        value.extend_from_slice(b"\"default\";r=");
        value.extend_from_slice(remaining.format(decision.remaining).as_bytes());
        value.extend_from_slice(b";t=");
        value.extend_from_slice(reset.format(ceil_secs(decision.reset)).as_bytes());
        headers.insert(
            RATELIMIT.clone(),
            crate::headers::own_value(bytes::Bytes::from(value)),
        );
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
            RateLimitKey::Header("x-api-key".into())
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
        let mut h = http::HeaderMap::new();
        let d = Decision::from_gcra(&limiter.limit, true, 150_000_000, 0);
        limiter.headers(&d, &mut (&mut h).into());
        assert_eq!(h["ratelimit-policy"], "\"default\";q=40;w=2");
        assert_eq!(h["ratelimit"], "\"default\";r=37;t=1");
        assert!(h.get("retry-after").is_none());
        let d = Decision::from_gcra(&limiter.limit, false, 2_000_000_000, 10_000_000);
        limiter.headers(&d, &mut (&mut h).into());
        assert_eq!(h["ratelimit"], "\"default\";r=0;t=2");
        assert_eq!(h["retry-after"], "1");
    }
}
