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
//! A route may have several limits (20 a second per user and 5000 a day,
//! say): a request is counted against each in turn, and one that a limit
//! refuses is given back to the limits before it, so a refused request
//! counts against none.
//!
//! Headers follow the IETF draft "RateLimit header fields for HTTP"
//! (draft-ietf-httpapi-ratelimit-headers, structured-field form):
//! `RateLimit-Policy: "default";q=40;w=2` (quota `burst` replenished over
//! `w` seconds) and `RateLimit: "default";r=12;t=1` (remaining requests and
//! seconds until the quota is whole again); with several limits, one list
//! item each, named by unit and key (`"s-user"`, `"d-user"`). A rejection
//! is 429 with `Retry-After` in whole seconds.

pub(crate) mod gcra;
pub(crate) mod redis;

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex};
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
    /// runs ahead of now. `interval` and `tolerance` (nanoseconds) must be
    /// those the state was counted with, which for Redis are the limit's
    /// rounded up to whole microseconds (`redis::Store::check`): the
    /// remaining count divides what is left of one by the other.
    pub(crate) fn from_gcra(
        interval: u64,
        tolerance: u64,
        allowed: bool,
        ahead: u64,
        over: u64,
    ) -> Decision {
        let interval = interval.max(1);
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

/// A route's compiled limits and their counters; each limit's counters
/// are kept across reloads while that limit and the backend stay the same.
pub(crate) struct Limiter {
    /// In the manifest's order: a request is counted against each in turn.
    parts: Box<[Part]>,
    policy_header: HeaderValue,
}

/// One limit of a route, and its counters.
struct Part {
    limit: RateLimit,
    /// Its name in the `RateLimit` fields: `default` when it is the
    /// route's only one, else its unit and key (`s-user`, `d-route`).
    /// Interned: a refusal names it in the access log by reference.
    name: &'static str,
    store: Arc<Store>,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let limits: Vec<String> = self.parts.iter().map(|p| p.limit.to_string()).collect();
        f.debug_struct("Limiter")
            .field("limits", &limits)
            .finish_non_exhaustive()
    }
}

enum Store {
    Memory(gcra::Store),
    Redis(Box<redis::Store>),
}

/// A request's key under a limit: its text, and its hash in the memory
/// store when it was made beforehand (a verified caller's key, hashed once
/// per token: `gcra::key_hash`).
pub(crate) struct Key<'k> {
    pub text: Cow<'k, str>,
    pub hash: Option<u64>,
}

impl<'k> From<Cow<'k, str>> for Key<'k> {
    fn from(text: Cow<'k, str>) -> Key<'k> {
        Key { text, hash: None }
    }
}

impl Key<'_> {
    fn memory_hash(&self) -> u64 {
        self.hash.unwrap_or_else(|| gcra::key_hash(&self.text))
    }
}

impl Store {
    fn new(limit: &RateLimit, backend: &RateLimitBackend, id: &str) -> Store {
        match backend {
            RateLimitBackend::Memory => Store::Memory(gcra::Store::new(gcra::DEFAULT_MAX_KEYS)),
            // Named by the route and the limit's unit and key, the same on
            // every replica whatever the route's other limits.
            RateLimitBackend::Redis { url, prefix } => Store::Redis(Box::new(redis::Store::new(
                url,
                &format!("{prefix}{id}:{}:", unit_and_key(limit)),
            ))),
        }
    }

    async fn check(&self, limit: &RateLimit, key: &Key<'_>) -> Decision {
        match self {
            Store::Memory(store) => store.check_hashed(limit, &key.text, key.memory_hash()),
            // Boxed: the Redis exchange's future is large, and unboxed it
            // would make every request's future larger, memory store or not.
            Store::Redis(store) => Box::pin(store.check(limit, &key.text)).await,
        }
    }

    async fn refund(&self, limit: &RateLimit, key: &Key<'_>) {
        match self {
            Store::Memory(store) => store.refund(limit, &key.text),
            Store::Redis(store) => Box::pin(store.refund(limit, &key.text)).await,
        }
    }
}

/// `s-user`, `d-route`, `m-header:x-api-key`: a limit's unit and key, which
/// no two limits of a route share (validated).
fn unit_and_key(limit: &RateLimit) -> String {
    format!("{}-{}", limit.unit(), limit.key)
}

/// `name`, kept for the life of the process, once per distinct name: a
/// limit's name goes by reference into what a refusal tells the access
/// log, so that what every response carries stays small and `Copy`. The
/// names are few (a unit and a key, header names included), and a reload
/// that rebuilds the limits finds them here.
fn intern(name: String) -> &'static str {
    static NAMES: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(kept) = names.get(name.as_str()) {
        return kept;
    }
    let kept: &'static str = Box::leak(name.into_boxed_str());
    names.insert(kept);
    kept
}

/// What counting one request against a route's limits found: each limit's
/// decision, in order, up to the first that refused it (the limits before
/// it are given back the request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Counted {
    /// The route's only limit (the common case: no allocation).
    One(Decision),
    Several(Box<[Decision]>),
}

pub(crate) static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub(crate) static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// Whole seconds, rounded up: a client told "0" would retry at once.
fn ceil_secs(d: Duration) -> u64 {
    d.as_nanos().div_ceil(1_000_000_000) as u64
}

impl Limiter {
    /// `limits` (at least one; validated) for the route named `id` (stably,
    /// the same on every replica, for Redis keys), each with the counters
    /// of `previous`'s limit equal to it when there is one and the backend
    /// is unchanged (`reused`), so that a reload hands no one a fresh quota.
    fn new(
        limits: &[RateLimit],
        backend: &RateLimitBackend,
        id: &str,
        reused: Option<&Limiter>,
    ) -> Limiter {
        let alone = limits.len() == 1;
        let parts: Box<[Part]> = limits
            .iter()
            .map(|limit| {
                let store = reused
                    .and_then(|r| r.parts.iter().find(|p| p.limit == *limit))
                    .map_or_else(
                        || Arc::new(Store::new(limit, backend, id)),
                        |p| Arc::clone(&p.store),
                    );
                Part {
                    limit: limit.clone(),
                    name: if alone {
                        "default"
                    } else {
                        intern(unit_and_key(limit))
                    },
                    store,
                }
            })
            .collect();
        let policy = parts
            .iter()
            .map(|p| {
                let window = ceil_secs(Duration::from_nanos(p.limit.tolerance_nanos())).max(1);
                format!("\"{}\";q={};w={window}", p.name, p.limit.burst)
            })
            .collect::<Vec<_>>()
            .join(", ");
        let policy_header = HeaderValue::from_str(&policy)
            .unwrap_or_else(|_| HeaderValue::from_static("\"default\""));
        Limiter {
            parts,
            policy_header,
        }
    }

    /// The limits, in order.
    pub(crate) fn limits(&self) -> impl Iterator<Item = &RateLimit> {
        self.parts.iter().map(|p| &p.limit)
    }

    /// Counts one request against each limit in turn, under the key `key`
    /// gives for that limit's `RateLimitKey`. The first limit that refuses
    /// it ends the count, and the limits before it are given the request
    /// back: a request refused counts against none of them.
    pub(crate) async fn check<'k>(&self, key: impl Fn(&RateLimitKey) -> Key<'k>) -> Counted {
        if let [part] = &*self.parts {
            // The store matched here, not in an `async fn` of its own: one
            // future less in every limited request's (callgrind: ~200
            // instructions a request).
            let key = key(&part.limit.key);
            return Counted::One(match &*part.store {
                Store::Memory(store) => {
                    store.check_hashed(&part.limit, &key.text, key.memory_hash())
                }
                Store::Redis(store) => Box::pin(store.check(&part.limit, &key.text)).await,
            });
        }
        // Boxed: routes with several limits are few, and every request's
        // future would otherwise hold room for this one.
        Box::pin(self.check_each(key)).await
    }

    async fn check_each<'k>(&self, key: impl Fn(&RateLimitKey) -> Key<'k>) -> Counted {
        let mut decisions = Vec::with_capacity(self.parts.len());
        for part in &*self.parts {
            let decision = part.store.check(&part.limit, &key(&part.limit.key)).await;
            decisions.push(decision);
            if decision.allowed {
                continue;
            }
            let refused = decisions.len() - 1;
            for (earlier, counted) in self.parts[..refused].iter().zip(&mut decisions) {
                earlier
                    .store
                    .refund(&earlier.limit, &key(&earlier.limit.key))
                    .await;
                counted.given_back(&earlier.limit);
            }
            break;
        }
        Counted::Several(decisions.into())
    }

    /// The name of the limit that refused what `counted` found, if one did
    /// (`default`, or its unit and key: see `Part::name`).
    pub(crate) fn refused_by(&self, counted: &Counted) -> Option<&'static str> {
        let position = match counted {
            Counted::One(d) => (!d.allowed).then_some(0),
            Counted::Several(ds) => ds.iter().position(|d| !d.allowed),
        }?;
        self.parts.get(position).map(|p| p.name)
    }

    /// The `RateLimit`, `RateLimit-Policy` (and, when refused, `Retry-After`)
    /// headers for what `counted` found.
    pub(crate) fn headers(&self, counted: &Counted, headers: &mut Fields<'_>) {
        headers.insert_ref(&RATELIMIT_POLICY, &self.policy_header);
        // `"default";r=<u32>;t=<u64>` per limit, written where the field
        // goes (a relayed response's own buffer: no allocation of its own),
        // and itoa instead of `fmt` (a third of the cost). One limit, the
        // common case, without a loop.
        let refused = match counted {
            Counted::One(d) => {
                headers.insert_with(&RATELIMIT, |value| item(value, b"default", d));
                (!d.allowed).then_some(d)
            }
            Counted::Several(ds) => {
                headers.insert_with(&RATELIMIT, |value| {
                    for (i, (part, d)) in self.parts.iter().zip(ds.iter()).enumerate() {
                        if i > 0 {
                            value.extend_from_slice(b", ");
                        }
                        item(value, part.name.as_bytes(), d);
                    }
                });
                ds.iter().find(|d| !d.allowed)
            }
        };
        if let Some(refused) = refused {
            let secs = ceil_secs(refused.retry_after).max(1);
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
    }
}

/// One limit's `"<name>";r=<remaining>;t=<reset>` in a `RateLimit` value.
/// Always inlined: left to itself the compiler calls it, and the call
/// costs the one-limit case (every limited response) a fifth of the
/// headers' instructions (callgrind).
#[inline(always)]
fn item(value: &mut Vec<u8>, name: &[u8], d: &Decision) {
    let mut remaining = itoa::Buffer::new();
    let mut reset = itoa::Buffer::new();
    value.push(b'"');
    value.extend_from_slice(name);
    value.extend_from_slice(b"\";r=");
    value.extend_from_slice(remaining.format(d.remaining).as_bytes());
    value.extend_from_slice(b";t=");
    value.extend_from_slice(reset.format(ceil_secs(d.reset)).as_bytes());
}

impl Decision {
    /// This decision (an allowed one) as it stands once the request it
    /// counted has been given back.
    fn given_back(&mut self, limit: &RateLimit) {
        self.remaining = self.remaining.saturating_add(1).min(limit.burst);
        self.reset = self
            .reset
            .saturating_sub(Duration::from_nanos(limit.interval_nanos()));
    }
}

/// The route's limiter: `previous` itself when it counts the same limits in
/// the same backend, else a new one that keeps the counters of each limit
/// it shares with `previous`, so a reload does not hand everyone a fresh
/// quota.
pub(crate) fn reuse_or_new(
    limits: &[RateLimit],
    backend: &RateLimitBackend,
    id: &str,
    previous: Option<&Arc<Limiter>>,
    previous_backend: Option<&RateLimitBackend>,
) -> Arc<Limiter> {
    let reusable = previous.filter(|_| previous_backend == Some(backend));
    match reusable {
        Some(p) if p.limits().eq(limits.iter()) => Arc::clone(p),
        _ => Arc::new(Limiter::new(limits, backend, id, reusable.map(|p| &**p))),
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
        assert_eq!(err("20/w"), E::BadUnit("w".into()));
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
        assert!(err("20/w").to_string().contains("`s`, `m`, `h` or `d`"));
    }

    #[test]
    fn headers_follow_the_draft() {
        let limits = [parse("20/s burst 40")];
        let limiter = Limiter::new(&limits, &RateLimitBackend::Memory, "r", None);
        let mut h = http::HeaderMap::new();
        let (interval, tolerance) = (limits[0].interval_nanos(), limits[0].tolerance_nanos());
        let d = Decision::from_gcra(interval, tolerance, true, 150_000_000, 0);
        limiter.headers(&Counted::One(d), &mut (&mut h).into());
        assert_eq!(h["ratelimit-policy"], "\"default\";q=40;w=2");
        assert_eq!(h["ratelimit"], "\"default\";r=37;t=1");
        assert!(h.get("retry-after").is_none());
        let d = Decision::from_gcra(interval, tolerance, false, 2_000_000_000, 10_000_000);
        limiter.headers(&Counted::One(d), &mut (&mut h).into());
        assert_eq!(h["ratelimit"], "\"default\";r=0;t=2");
        assert_eq!(h["retry-after"], "1");
    }

    fn key_of(key: &RateLimitKey) -> Key<'static> {
        Cow::Borrowed(match key {
            RateLimitKey::Route => "",
            _ => "client",
        })
        .into()
    }

    #[tokio::test]
    async fn a_request_must_pass_every_limit_and_a_refused_one_counts_against_none() {
        // 3 a day per client, but only 2 an hour for the whole route.
        let limits = [parse("3/d per ip"), parse("2/h per route")];
        let limiter = Limiter::new(&limits, &RateLimitBackend::Memory, "r", None);
        assert_eq!(limiter.refused_by(&limiter.check(key_of).await), None);
        assert_eq!(limiter.refused_by(&limiter.check(key_of).await), None);
        // The route's limit refuses the third; the client's day is given
        // back what the route refused, every time.
        for _ in 0..5 {
            let counted = limiter.check(key_of).await;
            let Counted::Several(ds) = &counted else {
                panic!("{counted:?}");
            };
            assert_eq!(ds.len(), 2);
            assert!(ds[0].allowed && !ds[1].allowed, "{ds:?}");
            assert_eq!(limiter.refused_by(&counted), Some("h-route"));
            assert_eq!(
                ds[0].remaining, 1,
                "the client's day keeps its third request"
            );
            let mut h = http::HeaderMap::new();
            limiter.headers(&counted, &mut (&mut h).into());
            assert_eq!(
                h["ratelimit-policy"],
                "\"d-ip\";q=3;w=86400, \"h-route\";q=2;w=3600"
            );
            assert!(
                h["ratelimit"].to_str().is_ok_and(
                    |v| v.starts_with("\"d-ip\";r=1;t=") && v.contains(", \"h-route\";r=0;t=")
                ),
                "{:?}",
                h["ratelimit"]
            );
            assert_eq!(h["retry-after"], "1800");
        }
        // Without the refunds the client's day would be spent: it is not.
        let day = Limiter::new(&limits[..1], &RateLimitBackend::Memory, "r", Some(&limiter));
        let left = day.check(key_of).await;
        assert!(
            matches!(left, Counted::One(d) if d.allowed && d.remaining == 0),
            "{left:?}"
        );
    }

    #[test]
    fn a_reload_keeps_the_counters_of_each_limit_it_keeps() {
        let backend = RateLimitBackend::Memory;
        let day = parse("3/d per ip");
        let old = Arc::new(Limiter::new(
            std::slice::from_ref(&day),
            &backend,
            "r",
            None,
        ));
        let same = reuse_or_new(
            std::slice::from_ref(&day),
            &backend,
            "r",
            Some(&old),
            Some(&backend),
        );
        assert!(Arc::ptr_eq(&old, &same));
        let more = reuse_or_new(
            &[parse("1/s per route"), day.clone()],
            &backend,
            "r",
            Some(&old),
            Some(&backend),
        );
        assert!(Arc::ptr_eq(&more.parts[1].store, &old.parts[0].store));
        let redis = RateLimitBackend::Redis {
            url: "redis://127.0.0.1:1".into(),
            prefix: "p:".into(),
        };
        let moved = reuse_or_new(&[day], &redis, "r", Some(&old), Some(&backend));
        assert!(!Arc::ptr_eq(&moved.parts[0].store, &old.parts[0].store));
    }
}
