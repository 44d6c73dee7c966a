//! A shared cache of responses at the edge, for routes with `cache`, as
//! Kong's proxy-cache, Envoy's cache filter and nginx's `proxy_cache` keep
//! one: a repeated GET is answered by the gateway, and the instance sees
//! one request per freshness lifetime instead of one per client.
//!
//! It is a shared cache in RFC 9111's sense, and keeps its rules:
//!
//! - Only GET responses are kept; a HEAD is answered from a kept GET. A
//!   request with `Range`, or `Cache-Control: no-store`, passes by; one
//!   with `no-cache` (or `max-age=0`, or `Pragma: no-cache`) is forwarded
//!   and its response replaces the kept one. A request's `max-age`,
//!   `min-fresh` and `max-stale` say how fresh a kept response it takes
//!   (`max-stale` never gets one that said `must-revalidate`), and
//!   `only-if-cached` gets a kept response or 504, never a fetch.
//! - A response is kept when its status is cacheable by default (200, 203,
//!   204, 300, 301, 308, 404, 405, 410, 414, 501), nothing in its
//!   `Cache-Control` forbids it (`no-store`, `private`, `no-cache`), it
//!   sets no cookie (a shared cache would hand one client's session to the
//!   next, so Varnish and most CDNs refuse these too), it does not vary on
//!   `*` (or on `X-Request-Id`, which differs for every request), and its
//!   body is whole and no larger than `max_entry_bytes`. A response to a
//!   request with `Authorization` is kept only when it says
//!   it may be shared (`public`, `s-maxage`, `must-revalidate`, §3.5);
//!   so is one to a request over a connection with a client certificate,
//!   or with an API key, which identify the client as surely.
//! - Freshness is the response's: `s-maxage`, else `max-age`, else
//!   `Expires` (from its `Date`), else the route's `ttl`, less the `Age`
//!   it came with. A stale entry is forwarded again, with its validators
//!   when it has any (`If-None-Match` with its `ETag`, `If-Modified-Since`
//!   with its `Last-Modified`, §4.3.1, unless the client sent conditions
//!   of its own): a `304 Not Modified` updates its fields, makes it fresh
//!   again and the client gets it whole, so an unchanged body never
//!   crosses the network twice; a 304 about another response (another
//!   tag or date, §4.3.4) refreshes nothing, and the request goes again
//!   without conditions. An entry with validators is kept past its
//!   freshness for that, until it is the least recently used. Besides:
//! - A stale entry is served at once while one request fetches it again in
//!   the background (RFC 5861's `stale-while-revalidate`), for as long
//!   past its freshness as the response's own `stale-while-revalidate`
//!   says, else the route's; never after `must-revalidate`, and never to a
//!   request that says how fresh a response it takes (`max-age`,
//!   `min-fresh`, `max-stale`), which is forwarded (RFC 9111 §4.2.4: the
//!   client's word against serving stale wins). One with `only-if-cached`
//!   is served it without the fetch, since it is never forwarded.
//! - A stale entry stands in for a fetch that fails with 500, 502, 503 or
//!   504 (RFC 5861's `stale-if-error`), for as long past its freshness as
//!   the response's own `stale-if-error` says, else the route's
//!   `stale_if_error`; never after `must-revalidate`. It is kept that long
//!   (or until it is the least recently used). So does one still fresh
//!   that the client's `max-age` or `min-fresh` passed over, but only if
//!   it could stand in once stale (a window, and no `must-revalidate`).
//! - A response the gateway's gzip would compress is kept gzipped too,
//!   compressed once as it is kept: a hit for a client that takes gzip is
//!   that copy (with its length), where nginx and Envoy gzip every hit.
//! - `Vary` is honoured: each kept response remembers the request's values
//!   of the fields it names, and is served only to requests with the same.
//! - A successful unsafe request (POST, PUT, PATCH, DELETE …) on a path
//!   drops what is kept for it (§4.4).
//!
//! A hit carries `Age` and `Cache-Status: flotilla; hit; ttl=…` (RFC 9211,
//! after any `Cache-Status` the instance sent);
//! a forwarded request's response carries `Cache-Status` with `fwd=` saying
//! why (`uri-miss`, `vary-miss`, `stale`, `request`, `method`, `bypass`).
//! Every edge policy (IP lists, JWT, rate limits) runs before the cache is
//! looked at, so a kept response never lets a request past them; the way
//! out (CORS, `RateLimit`, header changes, gzip) runs on hits as on
//! misses.
//!
//! The store is one per gateway, bounded by `max_bytes` in all: keys,
//! heads and bodies are counted, and the entries used longest ago go first
//! (a `LinkedHashMap` in use order). It is split into up to 16 shards by
//! the key's hash, each with its own lock and an equal share of the
//! bytes, so that worker threads hitting different URLs do not queue on
//! one lock. Entries are keyed by the route
//! (service, pattern, methods, hosts), the host when the route names
//! hosts, and the path with its query, so a reload that gives a path to
//! another route never serves the old route's answers, and the store
//! survives reloads that keep its sizes.
//!
//! An operator drops what is kept under a path prefix with
//! [`crate::Gateway::purge_cache`] (`flotilla purge`).
//!
//! A client's own conditional GET (`If-None-Match`, `If-Modified-Since`)
//! that a kept response meets gets `304 Not Modified` from the cache.
//!
//! Concurrent misses of one URL are collapsed, as nginx's
//! `proxy_cache_lock` and Varnish do: the first is forwarded, and the
//! others wait for its response to be kept (at most 5 s, or the route's
//! timeout if shorter) and are answered from it, so an entry that expires
//! under load costs the instance one request, not one per client. If the
//! first's response cannot be kept, each of the others is forwarded (and
//! none waits twice).

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use hashlink::LinkedHashMap;
use http::header::{
    AGE, AUTHORIZATION, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, DATE, ETAG,
    EXPIRES, HOST, HeaderMap, HeaderName, HeaderValue, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH,
    IF_RANGE, IF_UNMODIFIED_SINCE, LAST_MODIFIED, PRAGMA, RANGE, SET_COOKIE, TRANSFER_ENCODING,
    VARY,
};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::body::{self, Body, BoxError};
use crate::client_cert::XFCC;
use crate::compress::{self, Compression};
use crate::headers::list_elements;
use crate::jwt::USER_ID;
use crate::relayed::{Relayed, Reply};
use crate::stats;

/// The field a hit or a forwarded request's response says so in.
pub(crate) static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// How much of the cache one response may take, and all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    pub max_bytes: u64,
    pub max_entry_bytes: u64,
}

impl CacheConfig {
    pub fn from_manifest(c: &flotilla_manifest::CacheStore) -> CacheConfig {
        CacheConfig {
            max_bytes: c.max_bytes,
            max_entry_bytes: c.max_entry_bytes,
        }
    }
}

impl Default for CacheConfig {
    fn default() -> CacheConfig {
        CacheConfig::from_manifest(&flotilla_manifest::CacheStore::default())
    }
}

/// What one entry costs besides its bytes: the map's slot, the entry's
/// fields, the `Arc`. An estimate; it keeps many tiny entries from
/// escaping the bound.
const ENTRY_OVERHEAD: u64 = 256;

/// Variants of one key (`Vary`) kept at most; a new one past them
/// replaces the oldest. Bounds what a client varying a header can make
/// the gateway keep for one path.
const MAX_VARIANTS: usize = 8;

/// The longest a request waits for another's fetch of the same URL
/// (nginx's `proxy_cache_lock_timeout`); then it is forwarded itself.
const MAX_COLLAPSE_WAIT: Duration = Duration::from_secs(5);

/// The longest an entry is fresh, or stale and kept for a window: instants
/// a year apart at most (a year is RFC 9111's "never").
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// Shards of the store at most. Every hit moves its entry to the back of
/// the use order, a write: one lock for the whole store would have every
/// worker thread take turns on it, so keys are spread over shards, each
/// with its own lock, use order and share of `max_bytes`.
const MAX_SHARDS: u64 = 16;

/// The gateway's store of responses.
#[derive(Debug)]
pub(crate) struct ResponseCache {
    config: CacheConfig,
    shards: Box<[Mutex<Store>]>,
    /// Each shard's share of `max_bytes`.
    shard_bytes: u64,
    hasher: foldhash::fast::RandomState,
    /// Bytes kept in all the shards.
    bytes: AtomicU64,
}

#[derive(Debug, Default)]
struct Store {
    /// In use order: the front was used longest ago.
    entries: LinkedHashMap<Box<str>, Vec<Arc<Entry>>>,
    bytes: u64,
    /// The keys a forwarded request is fetching now, each with what its
    /// [`Fill`] signals (by being dropped) once the response is kept, or
    /// will not be.
    filling: HashMap<Box<str>, watch::Receiver<()>>,
}

/// Why a lookup found nothing fresh (RFC 9211's `fwd`), and the stale
/// entry that may stand in if the fetch fails.
struct Missed {
    fwd: &'static str,
    stale: Option<Arc<Entry>>,
}

/// What the store has for a request.
enum Found {
    Fresh(Arc<Entry>),
    /// Stale, but to be served while it is fetched again; with the claim
    /// to fetch it, unless another request is already.
    Revalidate(Arc<Entry>, Option<Fill>),
    /// Nothing fresh, and the request fetches it for the others, if it
    /// leads.
    Missing(Missed, Option<Fill>),
    /// Another request is fetching it: why it missed, and the signal.
    Filling(&'static str, watch::Receiver<()>),
}

/// What a request asking to fetch a key for the others gets.
enum Claim {
    Won(Fill),
    /// Another request is fetching it: the signal that it is done.
    Filling(watch::Receiver<()>),
    /// Another response was kept for it since it was looked up.
    Changed,
}

/// A request's claim to fetch a key for the others; they wake when it
/// is dropped, after the response is kept or given up.
struct Fill {
    cache: Arc<ResponseCache>,
    key: Box<str>,
    _done: watch::Sender<()>,
}

impl Drop for Fill {
    fn drop(&mut self) {
        // Before the sender goes (the fields drop after this): a request
        // that wakes and misses again must not find the claim still there.
        self.cache.store(&self.key).filling.remove(&self.key);
    }
}

/// What a purge dropped ([`crate::Gateway::purge_cache`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CachePurged {
    /// Responses dropped (each variant of a URL counts).
    pub responses: u64,
    /// The bytes they held.
    pub bytes: u64,
}

/// One kept response.
#[derive(Debug)]
pub(crate) struct Entry {
    status: StatusCode,
    /// The instance's fields, as relayed.
    relayed: Option<Relayed>,
    /// The response's map (empty for a relayed response).
    headers: HeaderMap,
    body: Bytes,
    /// The request's values of the fields the response's `Vary` names.
    vary: Vec<(HeaderName, Option<Vec<u8>>)>,
    stored: Instant,
    expires: Instant,
    /// Until when, past `expires`, it may stand in for a failed fetch
    /// (`stale-if-error`); `expires` when never.
    stale_until: Instant,
    /// Until when, past `expires`, it may be served while it is fetched
    /// again in the background (`stale-while-revalidate`).
    revalidate_until: Instant,
    /// The `Age` the instance sent, in seconds.
    age: u64,
    size: u64,
    /// `must-revalidate`: never served stale, whatever a client takes.
    must_revalidate: bool,
    /// The body gzipped, when the gateway compresses responses like it:
    /// made once as it is kept, not for every hit.
    gzipped: Option<Bytes>,
    /// Its `ETag` and `Last-Modified`, which a request to fetch it again
    /// asks with: a stale entry that has either is kept past its windows
    /// (until it is the least recently used), since an instance that
    /// answers `304 Not Modified` makes it fresh again without a body.
    validators: Validators,
}

/// What a kept response is identified by, to ask the instance whether it
/// has changed (RFC 9111 §4.3.1).
#[derive(Debug, Clone, Default)]
struct Validators {
    etag: Option<HeaderValue>,
    last_modified: Option<HeaderValue>,
}

impl Validators {
    fn of(reply: &Reply) -> Validators {
        let value = |name| {
            reply
                .values(name)
                .next()
                .and_then(|v| HeaderValue::from_bytes(v).ok())
        };
        Validators {
            etag: value(&ETAG),
            // Only a date: anything else could not be compared.
            last_modified: value(&LAST_MODIFIED)
                .filter(|v| http_date(Some(v.as_bytes())).is_some()),
        }
    }

    fn any(&self) -> bool {
        self.etag.is_some() || self.last_modified.is_some()
    }

    /// Whether `not_modified`, the instance's `304` to a request asking
    /// with these, is about the response that has them (RFC 9111 §4.3.4):
    /// its entity tag, if it sent one, is theirs (compared weakly, as
    /// `If-None-Match` is), else its `Last-Modified`, if it sent one, is
    /// the same time. A 304 with neither is taken as about it, as nginx
    /// and most caches take it: it answered this response's validators.
    fn answered_by(&self, not_modified: &Reply) -> bool {
        if let Some(tag) = not_modified.values(&ETAG).next() {
            let opaque = |tag: &[u8]| {
                let tag = tag.trim_ascii();
                tag.strip_prefix(b"W/").unwrap_or(tag).to_vec()
            };
            return self
                .etag
                .as_ref()
                .is_some_and(|kept| opaque(kept.as_bytes()) == opaque(tag));
        }
        if let Some(modified) = not_modified.values(&LAST_MODIFIED).next() {
            return self.last_modified.as_ref().is_some_and(|kept| {
                let kept = http_date(Some(kept.as_bytes()));
                kept.is_some() && kept == http_date(Some(modified))
            });
        }
        true
    }
}

impl ResponseCache {
    /// As many shards as leave each room for four of the largest entries,
    /// up to [`MAX_SHARDS`]: LRU within a shard is LRU overall for a store
    /// of many entries, and a store of a few large ones stays whole.
    pub(crate) fn new(config: CacheConfig) -> ResponseCache {
        let shards = (config.max_bytes / config.max_entry_bytes.saturating_mul(4).max(1))
            .clamp(1, MAX_SHARDS);
        ResponseCache {
            config,
            shards: (0..shards).map(|_| Mutex::new(Store::default())).collect(),
            shard_bytes: config.max_bytes / shards,
            hasher: foldhash::fast::RandomState::default(),
            bytes: AtomicU64::new(0),
        }
    }

    pub(crate) fn config(&self) -> CacheConfig {
        self.config
    }

    /// The shard that holds `key`, locked.
    fn store(&self, key: &str) -> std::sync::MutexGuard<'_, Store> {
        let at = self.hasher.hash_one(key) % self.shards.len() as u64;
        let shard = &self.shards[usize::try_from(at).unwrap_or(0)];
        // Nothing panics while holding it; a poisoned store is still whole.
        shard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a shard going from `before` bytes to `after`.
    fn account(&self, before: u64, after: u64) {
        let total = if after >= before {
            self.bytes.fetch_add(after - before, Ordering::Relaxed) + (after - before)
        } else {
            self.bytes.fetch_sub(before - after, Ordering::Relaxed) - (before - after)
        };
        stats::cache_bytes(total);
    }

    /// The fresh entry for `key` that `req`'s fields select, as fresh as
    /// its `asked` directives want (`max-age`, `min-fresh`), or a stale
    /// one it takes (`max-stale`); else why none, and the entry kept if
    /// it may still stand in for a failed fetch or be asked about.
    fn get(
        &self,
        key: &str,
        req: &HeaderMap,
        now: Instant,
        asked: &Directives,
    ) -> Result<Arc<Entry>, Missed> {
        let missed = |fwd| Missed { fwd, stale: None };
        let mut store = self.store(key);
        let store = &mut *store;
        let Some(variants) = store.entries.get_mut(key) else {
            return Err(missed("uri-miss"));
        };
        // The newest first, as RFC 9111 §4.1 asks when several match.
        let Some(at) = variants.iter().rposition(|e| e.selected_by(req)) else {
            return Err(missed("vary-miss"));
        };
        let entry = &variants[at];
        let age = entry.age + now.saturating_duration_since(entry.stored).as_secs();
        let too_old = asked.max_age.is_some_and(|max| age > max);
        let taken = if entry.expires > now {
            let left = entry.expires.duration_since(now).as_secs();
            if too_old || asked.min_fresh.is_some_and(|min| left < min) {
                // Fresh, but not as fresh as the client asked (RFC
                // 9211's `request`): forwarded, the entry kept.
                return Err(Missed {
                    fwd: "request",
                    stale: Some(Arc::clone(entry)),
                });
            }
            true
        } else {
            // Stale: a client may take it, as stale as it says, unless
            // the response said it must be revalidated (§4.2.4).
            let stale_for = now.duration_since(entry.expires).as_secs();
            !entry.must_revalidate
                && !too_old
                && asked.min_fresh.is_none()
                && asked.max_stale.is_some_and(|max| stale_for <= max)
        };
        if taken {
            let entry = Arc::clone(entry);
            store.entries.to_back(key);
            return Ok(entry);
        }
        // Stale, and not taken as it is: kept while it may stand in, be
        // served while fetched, or be asked about; else dropped now.
        if now < entry.stale_until || now < entry.revalidate_until || entry.validators.any() {
            return Err(Missed {
                fwd: "stale",
                stale: Some(Arc::clone(entry)),
            });
        }
        let stale = variants.remove(at);
        if variants.is_empty() {
            store.entries.remove(key);
        }
        store.bytes -= stale.size;
        self.account(store.bytes + stale.size, store.bytes);
        Err(missed("stale"))
    }

    /// What is kept for `key` that `req` may have; when nothing fresh is
    /// and `may_wait`, whether another request is fetching it (then wait
    /// for it) or this one should (then it holds the claim).
    fn find(
        this: &Arc<ResponseCache>,
        key: &str,
        req: &HeaderMap,
        now: Instant,
        asked: &Directives,
        may_wait: bool,
    ) -> Found {
        // The lookup and the claim take the shard's lock one after the
        // other: a fetch may keep its response and let go of its claim in
        // between, and a claim made then would fetch what was just kept.
        // Such a claim is refused (`Claim::Changed`) and the lookup made
        // again, which finds the kept response; a few times at most.
        let mut tries = 0;
        loop {
            tries += 1;
            let missed = match this.get(key, req, now, asked) {
                Ok(entry) => return Found::Fresh(entry),
                Err(missed) => missed,
            };
            let seen = (tries < 4).then_some(missed.stale.as_ref());
            // Only a stale entry: one fresh but not fresh enough for the
            // client is not served while it is fetched. Nor is a stale one
            // to a client that said how fresh a response it takes: the
            // entry failed what it said (else `get` took it), and a
            // response's `stale-while-revalidate` does not override the
            // client's word (RFC 9111 §4.2.4, §5.2.1).
            if let Some(stale) = &missed.stale
                && missed.fwd == "stale"
                && now < stale.revalidate_until
                && asked.leaves_freshness_to_the_cache()
            {
                let fill = if may_wait {
                    match Self::claim(this, key, req, seen) {
                        Claim::Won(fill) => Some(fill),
                        Claim::Filling(_) => None,
                        Claim::Changed => continue,
                    }
                } else {
                    None
                };
                return Found::Revalidate(Arc::clone(stale), fill);
            }
            if !may_wait {
                return Found::Missing(missed, None);
            }
            return match Self::claim(this, key, req, seen) {
                Claim::Won(fill) => Found::Missing(missed, Some(fill)),
                Claim::Filling(done) => Found::Filling(missed.fwd, done),
                Claim::Changed => continue,
            };
        }
    }

    /// The claim to fetch `key` for others, or, when a request has it, the
    /// signal that it is done. With `seen` (the variant `req` selected
    /// when it was looked up, if any), refused when another is kept for
    /// `req` now.
    fn claim(
        this: &Arc<ResponseCache>,
        key: &str,
        req: &HeaderMap,
        seen: Option<Option<&Arc<Entry>>>,
    ) -> Claim {
        let mut store = this.store(key);
        if let Some(done) = store.filling.get(key) {
            return Claim::Filling(done.clone());
        }
        if let Some(seen) = seen {
            let now_kept = store
                .entries
                .get(key)
                .and_then(|variants| variants.iter().rev().find(|e| e.selected_by(req)));
            let same = match (seen, now_kept) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                return Claim::Changed;
            }
        }
        let (tx, rx) = watch::channel(());
        store.filling.insert(key.into(), rx);
        Claim::Won(Fill {
            cache: Arc::clone(this),
            key: key.into(),
            _done: tx,
        })
    }

    /// Keeps `entry` under `key`, in place of the variant it matches, and
    /// lets go of what was used longest ago until the store fits.
    fn put(&self, key: Box<str>, entry: Entry) {
        if entry.size > self.shard_bytes {
            return;
        }
        let entry = Arc::new(entry);
        let mut store = self.store(&key);
        let store = &mut *store;
        let before = store.bytes;
        let mut freed = 0;
        // Out and back in: the key goes to the back, as just used.
        let mut variants = store.entries.remove(&key).unwrap_or_default();
        variants.retain(|e| {
            let same = e.vary == entry.vary;
            if same {
                freed += e.size;
            }
            !same
        });
        if variants.len() >= MAX_VARIANTS {
            freed += variants.remove(0).size;
        }
        let size = entry.size;
        variants.push(entry);
        store.entries.insert(key, variants);
        store.bytes = store.bytes - freed + size;
        while store.bytes > self.shard_bytes {
            let Some((_, evicted)) = store.entries.pop_front() else {
                break;
            };
            store.bytes -= evicted.iter().map(|e| e.size).sum::<u64>();
        }
        self.account(before, store.bytes);
    }

    /// Drops every variant kept under `key`.
    pub(crate) fn invalidate(&self, key: &str) {
        let mut store = self.store(key);
        if let Some(variants) = store.entries.remove(key) {
            let freed = variants.iter().map(|e| e.size).sum::<u64>();
            store.bytes -= freed;
            self.account(store.bytes + freed, store.bytes);
        }
    }

    /// Drops every entry whose path (with its query) starts with `prefix`.
    pub(crate) fn purge(&self, prefix: &str) -> CachePurged {
        let mut purged = CachePurged::default();
        for shard in &self.shards {
            let mut store = shard.lock().unwrap_or_else(|e| e.into_inner());
            let store = &mut *store;
            let before = store.bytes;
            // Keys are `route id \n host \n path`.
            store.entries.retain(|key, variants| {
                let path = key.splitn(3, '\n').nth(2).unwrap_or_default();
                if !path.starts_with(prefix) {
                    return true;
                }
                purged.responses += variants.len() as u64;
                let freed = variants.iter().map(|e| e.size).sum::<u64>();
                purged.bytes += freed;
                store.bytes -= freed;
                false
            });
            self.account(before, store.bytes);
        }
        purged
    }

    /// Bytes and entries kept now.
    #[cfg(test)]
    fn usage(&self) -> (u64, usize) {
        let mut usage = (0, 0);
        for shard in &self.shards {
            let store = shard.lock().unwrap_or_else(|e| e.into_inner());
            usage.0 += store.bytes;
            usage.1 += store.entries.values().map(Vec::len).sum::<usize>();
        }
        assert_eq!(
            usage.0,
            self.bytes.load(Ordering::Relaxed),
            "the total follows the shards"
        );
        usage
    }
}

impl Entry {
    fn selected_by(&self, req: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, value)| joined(req, name).as_deref() == value.as_deref())
    }

    /// The entry as a response to `req`, made `now`: to a HEAD, without
    /// its body (hyper's HTTP/2 server would send it) but with its length;
    /// to a request whose validators the entry meets, `304 Not Modified`;
    /// to a client that takes gzip (`gzip`), the body gzipped when it was
    /// kept. `said` is its `Cache-Status`, given the seconds it has left
    /// (negative when it is stale).
    fn reply(
        &self,
        now: Instant,
        form: Form,
        req: &HeaderMap,
        said: impl FnOnce(i64) -> String,
    ) -> Reply {
        let mut res = Response::new(body::empty());
        *res.status_mut() = self.status;
        if !self.headers.is_empty() {
            *res.headers_mut() = self.headers.clone();
        }
        let mut reply = Reply {
            res,
            relayed: self.relayed.clone(),
        };
        let not_modified = self.status == StatusCode::OK && not_modified(req, &reply);
        let age = self.age + now.saturating_duration_since(self.stored).as_secs();
        let ttl = match self.expires.checked_duration_since(now) {
            Some(left) => i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            None => -i64::try_from(now.duration_since(self.expires).as_secs()).unwrap_or(0),
        };
        if not_modified {
            *reply.res.status_mut() = StatusCode::NOT_MODIFIED;
        } else if !form.head {
            match &self.gzipped {
                Some(gzipped) if form.gzip => compress::gzipped(&mut reply, gzipped.clone()),
                _ => *reply.res.body_mut() = body::full(self.body.clone()),
            }
        }
        let mut fields = reply.fields();
        if not_modified {
            fields.remove(&CONTENT_LENGTH);
        } else if form.head {
            fields.insert(CONTENT_LENGTH, HeaderValue::from(self.body.len()));
        }
        fields.insert(AGE, HeaderValue::from(age));
        // After any the instance's own caches said (RFC 9211: the cache
        // nearest the client last).
        fields.append(
            CACHE_STATUS.clone(),
            HeaderValue::from_str(&said(ttl)).unwrap_or(HeaderValue::from_static("flotilla")),
        );
        reply
    }
}

/// Whether `req`'s validators say the client has what `reply` holds
/// (RFC 9110 §13.2.2): an `If-None-Match` with its entity tag (compared
/// weakly) or `*`; without one, an `If-Modified-Since` no earlier than its
/// `Last-Modified`.
fn not_modified(req: &HeaderMap, reply: &Reply) -> bool {
    if req.contains_key(IF_NONE_MATCH) {
        let Some(tag) = reply.values(&ETAG).next() else {
            return false;
        };
        let opaque = |t: &[u8]| t.strip_prefix(b"W/").unwrap_or(t).to_vec();
        let tag = opaque(tag.trim_ascii());
        return list_elements(req.get_all(IF_NONE_MATCH).iter().map(HeaderValue::as_bytes))
            .any(|asked| asked == b"*" || opaque(asked) == tag);
    }
    match (
        http_date(req.get(IF_MODIFIED_SINCE).map(HeaderValue::as_bytes)),
        http_date(reply.values(&LAST_MODIFIED).next()),
    ) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

/// A field's value read as an HTTP date, if it is one.
fn http_date(value: Option<&[u8]>) -> Option<SystemTime> {
    let text = std::str::from_utf8(value?).ok()?;
    httpdate::parse_http_date(text).ok()
}

/// A request's values of the field `name`, joined as one list; `None`
/// when it has none.
/// The request's fields as a response's `Vary` compares them: those the
/// instance was sent. They are the client's but for `Host`, which the
/// instance gets from the target's authority when it has one (an HTTP/2
/// request's `:authority`, an HTTP/1 request in absolute form), as the
/// request is routed and forwarded (`headers::forward_fields`). Compared
/// by the client's `Host` instead, a page an instance made for
/// `GET http://evil.example/` with `Host: shop.example` and `Vary: Host`
/// would be served to every later `Host: shop.example`, and every HTTP/2
/// client (which sends no `Host`) would share one variant.
fn varied_fields(req: &Request<Body>) -> Cow<'_, HeaderMap> {
    let headers = req.headers();
    let Some(authority) = req.uri().authority() else {
        return Cow::Borrowed(headers);
    };
    let mut host = headers.get_all(HOST).iter();
    if host.next().map(HeaderValue::as_bytes) == Some(authority.as_str().as_bytes())
        && host.next().is_none()
    {
        return Cow::Borrowed(headers);
    }
    let mut fields = headers.clone();
    // An authority's characters are all valid in a field value.
    if let Ok(value) = HeaderValue::from_str(authority.as_str()) {
        fields.insert(HOST, value);
    }
    Cow::Owned(fields)
}

fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<Vec<u8>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let mut out = first.as_bytes().to_vec();
    for v in values {
        out.extend_from_slice(b", ");
        out.extend_from_slice(v.as_bytes());
    }
    Some(out)
}

/// A route's caching, compiled: the store, the route's `ttl` and
/// `stale_if_error`, and its identity in keys.
#[derive(Debug)]
pub(crate) struct RouteCache {
    pub store: Arc<ResponseCache>,
    pub ttl: Duration,
    pub stale_if_error: Duration,
    pub stale_while_revalidate: Duration,
    /// The route's identity (service, pattern, methods, hosts).
    pub id: Box<str>,
    /// Whether the route names hosts: then the host is part of the key.
    pub by_host: bool,
    /// Whether every request is let on by `[gateway.authz]`'s check: then
    /// each is taken to carry credentials (the check admitted it by its
    /// cookie, say, and may have told the instance whose it is), and its
    /// response is kept only when the instance says it may be shared.
    pub checked: bool,
    /// The query parameters that count, if the route names them
    /// ([`RouteCache::kept_query`]).
    pub query: Option<Box<[Box<str>]>>,
    /// The gateway's gzip, if it compresses: a response it would compress
    /// is kept gzipped too.
    pub compression: Option<Arc<Compression>>,
    pub stats: stats::CacheStats,
}

/// What the cache made of a request on a caching route.
pub(crate) enum Verdict {
    /// Answered from the cache.
    Hit(Reply),
    /// Answered from the cache with a stale response, and, unless another
    /// request is at it, to be forwarded in the background to fetch it
    /// again (`stale-while-revalidate`).
    Revalidate(Reply, Option<Miss>),
    /// To be forwarded; [`Miss::keep`] takes its response.
    Forward(Miss),
    /// Another request is fetching the same: wait for it
    /// ([`Waiting::done`]), then look up again.
    Wait(Waiting),
    /// Nothing kept that it may have, and it asked for nothing else
    /// (`Cache-Control: only-if-cached`): 504, never forwarded.
    NotCached,
}

/// A request waiting for another's fetch of the same URL.
pub(crate) struct Waiting {
    /// Why it missed before it waited.
    fwd: &'static str,
    done: watch::Receiver<()>,
}

impl Waiting {
    /// Waits until the other request's response is kept or given up, or
    /// `timeout` (capped at [`MAX_COLLAPSE_WAIT`]) has passed; then what
    /// the second lookup needs.
    pub(crate) async fn done(mut self, timeout: Duration) -> Collapsed {
        let wait = self.done.changed();
        // `changed` ends with an error when the claim is dropped, which is
        // the only signal it ever gets.
        let _ = tokio::time::timeout(timeout.min(MAX_COLLAPSE_WAIT), wait).await;
        Collapsed { fwd: self.fwd }
    }
}

/// A request that waited for another's fetch: looked up again, it never
/// waits or fetches for others a second time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Collapsed {
    fwd: &'static str,
}

/// A forwarded request on a caching route, until its response is in.
pub(crate) struct Miss {
    /// Why it was forwarded (RFC 9211's `fwd`).
    fwd: &'static str,
    key: Box<str>,
    /// Whether its response may be kept.
    storable: bool,
    /// Whether a success drops what is kept under its key.
    invalidates: bool,
    /// Whether it carried credentials: `Authorization`, a client
    /// certificate the gateway verified, or an API key (its consumer,
    /// `x-flotilla-user-id`).
    authorized: bool,
    /// Its fields, for the response's `Vary` (only when `storable`).
    headers: HeaderMap,
    /// Its claim to fetch the URL for requests that wait for it.
    fill: Option<Fill>,
    /// Whether it waited for another request's fetch first, in vain.
    collapsed: bool,
    /// A kept response past its freshness, that may stand in if the fetch
    /// fails (`stale-if-error`) or be made fresh by a `304 Not Modified`.
    stale: Option<Arc<Entry>>,
    /// How a kept response would answer it.
    form: Form,
    /// Whether it fetches in the background, for a client answered stale
    /// already: its own conditions are the client's no longer.
    detached: bool,
    /// Set when it asks with `stale`'s validators
    /// ([`Miss::ask_if_changed`]): the request as it was before it asked,
    /// sent again if the instance's `304` is about another response than
    /// the kept one. Boxed: only a revalidation holds one.
    again: Option<Box<Request<Body>>>,
}

/// How a kept response goes to the client that asked: without its body
/// to a HEAD, gzipped to a client that takes gzip (when the gateway
/// compresses).
#[derive(Debug, Clone, Copy)]
struct Form {
    head: bool,
    gzip: bool,
}

impl RouteCache {
    /// Looks `req` up: `host` is the name it asked for (read only when the
    /// route names hosts), `path` its path and query as the client sent
    /// them, `gzip` whether it takes gzip and the gateway compresses;
    /// `collapsed` when it already waited for another request.
    pub(crate) fn lookup(
        &self,
        req: &Request<Body>,
        at: (Option<&str>, &str),
        gzip: bool,
        now: Instant,
        collapsed: Option<Collapsed>,
    ) -> Verdict {
        let asked = Directives::of(
            req.headers()
                .get_all(CACHE_CONTROL)
                .iter()
                .map(HeaderValue::as_bytes),
        );
        let verdict = self.consult(req, &asked, at, gzip, now, collapsed);
        // A GET or HEAD that would be forwarded, from a client that takes
        // only a kept response (RFC 9111 §5.2.1.7).
        if asked.only_if_cached
            && matches!(verdict, Verdict::Forward(_) | Verdict::Wait(_))
            && matches!(*req.method(), Method::GET | Method::HEAD)
        {
            return Verdict::NotCached;
        }
        verdict
    }

    /// [`RouteCache::lookup`] but for `only-if-cached`; `asked` is the
    /// request's `Cache-Control`.
    fn consult(
        &self,
        req: &Request<Body>,
        asked: &Directives,
        (host, path): (Option<&str>, &str),
        gzip: bool,
        now: Instant,
        collapsed: Option<Collapsed>,
    ) -> Verdict {
        let key = self.key(host, path);
        let method = req.method();
        let varied = varied_fields(req);
        let form = Form {
            head: method == Method::HEAD,
            gzip,
        };
        let miss = |fwd, storable, invalidates, fill| Miss {
            fwd,
            key: key.clone(),
            storable,
            invalidates,
            // The gateway's own word for who the caller is counts too: an
            // API key is taken off before the lookup, and its consumer's
            // answer is no more another's than a token's would be.
            authorized: self.checked
                || req.headers().contains_key(AUTHORIZATION)
                || req.headers().contains_key(&XFCC)
                || req.headers().contains_key(&USER_ID),
            headers: if storable {
                varied.as_ref().clone()
            } else {
                HeaderMap::new()
            },
            fill,
            collapsed: collapsed.is_some(),
            stale: None,
            form,
            detached: false,
            again: None,
        };
        if method != Method::GET && method != Method::HEAD {
            let unsafe_method = !matches!(*method, Method::OPTIONS | Method::TRACE);
            return Verdict::Forward(miss("method", false, unsafe_method, None));
        }
        if req.headers().contains_key(RANGE) {
            return Verdict::Forward(miss("bypass", false, false, None));
        }
        if asked.no_store {
            return Verdict::Forward(miss("request", false, false, None));
        }
        let is_get = method == Method::GET;
        let pragma_no_cache = !req.headers().contains_key(CACHE_CONTROL)
            && list_elements(
                req.headers()
                    .get_all(PRAGMA)
                    .iter()
                    .map(HeaderValue::as_bytes),
            )
            .any(|p| p.eq_ignore_ascii_case(b"no-cache"));
        if asked.no_cache || asked.max_age == Some(0) || pragma_no_cache {
            return Verdict::Forward(miss("request", is_get, false, None));
        }
        // Only a GET fetches what others may wait for; and not one with
        // `only-if-cached`, which is never forwarded, not even in the
        // background for a stale entry it is served.
        let may_wait = is_get && collapsed.is_none() && !asked.only_if_cached;
        match ResponseCache::find(&self.store, &key, &varied, now, asked, may_wait) {
            Found::Fresh(entry) => {
                let status = entry.status.as_u16();
                Verdict::Hit(entry.reply(now, form, req.headers(), |ttl| {
                    match collapsed {
                        None => format!("flotilla; hit; ttl={ttl}"),
                        // The response is the fetch this one waited for
                        // (RFC 9211's `collapsed`).
                        Some(c) => format!(
                            "flotilla; fwd={}; fwd-status={status}; collapsed; ttl={ttl}",
                            c.fwd
                        ),
                    }
                }))
            }
            Found::Revalidate(entry, fill) => {
                let reply = entry.reply(now, form, req.headers(), |ttl| {
                    format!("flotilla; hit; ttl={ttl}; detail=stale-while-revalidate")
                });
                let refresh = fill.map(|fill| Miss {
                    stale: Some(entry),
                    detached: true,
                    ..miss("stale", true, false, Some(fill))
                });
                Verdict::Revalidate(reply, refresh)
            }
            Found::Missing(missed, fill) => {
                let fwd = collapsed.map_or(missed.fwd, |c| c.fwd);
                Verdict::Forward(Miss {
                    stale: missed.stale,
                    ..miss(fwd, is_get, false, fill)
                })
            }
            Found::Filling(fwd, done) => Verdict::Wait(Waiting { fwd, done }),
        }
    }

    /// `path_and_query` with only the query parameters the route's `query`
    /// names, by name as sent, in the order of their names (a name's
    /// values in the order sent), if that differs from it. The gateway
    /// forwards a GET or HEAD with this query, and keys it by this query:
    /// what the instance answers is always for exactly what the entry is
    /// keyed by, so a parameter left out (even one an instance would read
    /// another way, `%70age` or `a;page`) can never put one page's answer
    /// under another's key.
    pub(crate) fn kept_query(&self, path_and_query: &str) -> Option<String> {
        let names = self.query.as_deref()?;
        let (path, query) = path_and_query.split_once('?')?;
        let mut kept: Vec<(&str, &str)> = query
            .split('&')
            .filter_map(|param| {
                let name = param.split_once('=').map_or(param, |(name, _)| name);
                names.iter().any(|n| **n == *name).then_some((name, param))
            })
            .collect();
        kept.sort_by(|a, b| a.0.cmp(b.0));
        let mut out = String::with_capacity(path_and_query.len());
        out.push_str(path);
        for (at, (_, param)) in kept.iter().enumerate() {
            out.push(if at == 0 { '?' } else { '&' });
            out.push_str(param);
        }
        (out != path_and_query).then_some(out)
    }

    /// The key a `GET` of `path_and_query` at `host` (the request's, as
    /// routed) is kept under: what a successful unsafe request to that
    /// target through another route drops (RFC 9111 §4.4).
    pub(crate) fn key_of_target(&self, host: Option<&str>, path_and_query: &str) -> Box<str> {
        let kept = self.kept_query(path_and_query);
        self.key(host, kept.as_deref().unwrap_or(path_and_query))
    }

    fn key(&self, host: Option<&str>, path: &str) -> Box<str> {
        let host = if self.by_host {
            host.unwrap_or_default()
        } else {
            ""
        };
        let mut key = String::with_capacity(self.id.len() + host.len() + path.len() + 2);
        key.push_str(&self.id);
        key.push('\n');
        for c in host.trim_end_matches('.').chars() {
            key.push(c.to_ascii_lowercase());
        }
        key.push('\n');
        key.push_str(path);
        key.into_boxed_str()
    }
}

impl Miss {
    /// Takes the response to the forwarded request: says why it was
    /// forwarded, and keeps it (as its body streams to the client) when it
    /// may be kept; a successful unsafe request drops the path's entries.
    ///
    /// A `304` about another response than the kept one (RFC 9111 §4.3.4:
    /// another entity tag, or another `Last-Modified`) refreshes nothing:
    /// the kept response is dropped, and what comes back is the request to
    /// send again without conditions, with this as its miss (asking with
    /// nothing now, and nothing to stand in), to keep what that answers.
    #[must_use = "a request to send again must be sent"]
    pub(crate) fn keep(
        mut self,
        cache: &RouteCache,
        reply: &mut Reply,
        now: Instant,
    ) -> Option<(Miss, Request<Body>)> {
        let status = reply.res.status();
        if let Some(again) = self.again.take() {
            if status == StatusCode::NOT_MODIFIED {
                let about_kept = self
                    .stale
                    .as_ref()
                    .is_none_or(|kept| kept.validators.answered_by(reply));
                if !about_kept {
                    cache.stats.revalidated("changed");
                    cache.store.invalidate(&self.key);
                    self.stale = None;
                    return Some((self, *again));
                }
                cache.stats.revalidated("unchanged");
                self.refresh(cache, reply, now);
                return None;
            }
            if !status.is_server_error() {
                cache.stats.revalidated("changed");
            }
        }
        if let Some(stale) = self.stand_in(status, now) {
            tracing::warn!(target: "flotilla::gateway", status = status.as_u16(), "the instance failed; a kept response past its freshness stands in (stale-if-error)");
            *reply = stale;
            return None;
        }
        let collapsed = if self.collapsed { "; collapsed=?0" } else { "" };
        let said = HeaderValue::from_str(&format!(
            "flotilla; fwd={}; fwd-status={}{collapsed}",
            self.fwd,
            status.as_u16()
        ))
        .unwrap_or(HeaderValue::from_static("flotilla"));
        if self.invalidates && (status.is_success() || status.is_redirection()) {
            cache.store.invalidate(&self.key);
        }
        if self.storable {
            self.record(cache, reply, now);
        }
        // After the entry took its copy of the fields: a hit says its own.
        reply.fields().append(CACHE_STATUS.clone(), said);
        None
    }

    /// Asks the instance, in the forwarded request `req`, for the
    /// response only if it differs from the stale one kept for it
    /// (`If-None-Match` with its `ETag`, `If-Modified-Since` with its
    /// `Last-Modified`), as nginx's `proxy_cache_revalidate` does: a `304`
    /// then makes the kept response fresh again ([`Miss::keep`]) without
    /// its body crossing the network. Not when the client asks with
    /// conditions of its own, whose answer is for it; a background fetch
    /// drops the client's, since the client has its answer. Not for a
    /// request with a body, which could not be sent again.
    pub(crate) fn ask_if_changed(&mut self, req: &mut Request<Body>) {
        let Some(validators) = self.stale.as_ref().map(|e| &e.validators) else {
            return;
        };
        if !validators.any() || !req.body().is_end_stream() {
            return;
        }
        let conditions = [
            IF_NONE_MATCH,
            IF_MODIFIED_SINCE,
            IF_MATCH,
            IF_UNMODIFIED_SINCE,
            IF_RANGE,
        ];
        let fields = req.headers_mut();
        if self.detached {
            for name in &conditions {
                fields.remove(name);
            }
        } else if conditions.iter().any(|name| fields.contains_key(name)) {
            return;
        }
        let mut again = Request::new(body::empty());
        *again.method_mut() = req.method().clone();
        *again.uri_mut() = req.uri().clone();
        *again.version_mut() = req.version();
        *again.headers_mut() = req.headers().clone();
        self.again = Some(Box::new(again));
        let fields = req.headers_mut();
        if let Some(etag) = &validators.etag {
            fields.insert(IF_NONE_MATCH, etag.clone());
        }
        if let Some(modified) = &validators.last_modified {
            fields.insert(IF_MODIFIED_SINCE, modified.clone());
        }
    }

    /// Makes the stale response this request asked about fresh again with
    /// the instance's `304 Not Modified` (RFC 9111 §4.3.4): its fields are
    /// updated from the 304's, freshness is worked out again from them,
    /// and the client gets the kept response. Kept again unless the
    /// updated fields forbid it. Any 304 to the gateway's own conditions
    /// counts, as with nginx: only the kept response was asked about.
    fn refresh(mut self, cache: &RouteCache, reply: &mut Reply, now: Instant) {
        let Some(old) = self.stale.take() else {
            return;
        };
        let update = std::mem::replace(reply, Reply::from(Response::new(body::empty())))
            .into_response()
            .into_parts()
            .0
            .headers;
        let mut fields = Reply {
            res: Response::new(body::empty()),
            relayed: old.relayed.clone(),
        };
        *fields.res.headers_mut() = old.headers.clone();
        let mut headers = fields.into_response().into_parts().0.headers;
        // The 304's `Age` is the response's now; the body's own fields
        // stay those of the body kept.
        headers.remove(AGE);
        let updates = |name: &HeaderName| {
            ![
                CONTENT_LENGTH,
                CONTENT_ENCODING,
                CONTENT_RANGE,
                TRANSFER_ENCODING,
            ]
            .contains(name)
        };
        for name in update.keys() {
            if updates(name) {
                headers.remove(name);
            }
        }
        for (name, value) in &update {
            if updates(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        let mut res = Response::new(body::empty());
        *res.status_mut() = old.status;
        *res.headers_mut() = headers;
        let merged = Reply::from(res);
        let age = number(merged.values(&AGE).next()).unwrap_or(0);
        let kept = self
            .lifetime(cache, &merged)
            .and_then(|(lifetime, stale, revalidate)| {
                let fresh = lifetime.checked_sub(Duration::from_secs(age))?;
                (!fresh.is_zero()).then_some((
                    fresh.min(YEAR),
                    stale.min(YEAR),
                    revalidate.min(YEAR),
                ))
            });
        let (fresh, stale_window, revalidate_window) = kept.unwrap_or_default();
        let expires = now + fresh;
        let head_bytes: usize = merged
            .res
            .headers()
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        let must_revalidate = Directives::of(merged.values(&CACHE_CONTROL)).must_revalidate;
        let entry = Entry {
            status: old.status,
            relayed: None,
            validators: Validators::of(&merged),
            headers: merged.res.into_parts().0.headers,
            body: old.body.clone(),
            gzipped: old.gzipped.clone(),
            must_revalidate,
            vary: old.vary.clone(),
            stored: now,
            expires,
            stale_until: expires + stale_window,
            revalidate_until: expires + revalidate_window,
            age,
            size: old.body.len() as u64
                + old.gzipped.as_ref().map_or(0, Bytes::len) as u64
                + self.key.len() as u64
                + head_bytes as u64
                + ENTRY_OVERHEAD,
        };
        let collapsed = if self.collapsed { "; collapsed=?0" } else { "" };
        *reply = entry.reply(now, self.form, &HeaderMap::new(), |ttl| {
            format!(
                "flotilla; fwd={}; fwd-status=304{collapsed}; ttl={ttl}",
                self.fwd
            )
        });
        if kept.is_some() {
            cache.store.put(self.key, entry);
        } else {
            // Its fields forbid keeping it now: the stale one goes too.
            cache.store.invalidate(&self.key);
        }
        // The claim goes last, once whoever waits finds the entry.
        drop(self.fill);
    }

    /// The kept response, past its freshness, for a fetch that failed with
    /// `status` (RFC 5861: 500, 502, 503 or 504, the instance's or the
    /// gateway's), if it may stand in for it now. Or one still fresh that
    /// the client's `max-age` or `min-fresh` passed over: only if it
    /// could stand in once stale, that is with a `stale-if-error` window
    /// (which `must-revalidate` closes): served past the client's limit,
    /// it is as good as stale to that client, and a response that may
    /// never be served stale is not served so on an error either.
    pub(crate) fn stand_in(&mut self, status: StatusCode, now: Instant) -> Option<Reply> {
        let failed = matches!(status.as_u16(), 500 | 502 | 503 | 504);
        let stale = self
            .stale
            .take()
            .filter(|e| failed && now < e.stale_until && e.stale_until > e.expires)?;
        let code = status.as_u16();
        // RFC 9211: `request` when the client's directives ruled out a
        // fresh response, `stale` when it was past its freshness.
        let fwd = if now < stale.expires {
            "request"
        } else {
            "stale"
        };
        Some(stale.reply(now, self.form, &HeaderMap::new(), |ttl| {
            format!("flotilla; fwd={fwd}; fwd-status={code}; ttl={ttl}; detail=stale-if-error")
        }))
    }

    /// What the lookup counts this request as, for the metrics: `None`
    /// for a method the cache does not serve, or one counted already (as
    /// `collapsed`, when it began to wait).
    pub(crate) fn result(&self) -> Option<&'static str> {
        match self.fwd {
            _ if self.collapsed => None,
            "method" => None,
            "request" | "bypass" => Some("bypass"),
            _ => Some("miss"),
        }
    }

    /// Starts keeping the response, if it may be kept; the claim to fetch
    /// it for others goes with it, and is let go of once it is kept (or
    /// here, if it will not be).
    fn record(self, cache: &RouteCache, reply: &mut Reply, now: Instant) {
        let status = reply.res.status();
        let Some((lifetime, stale_window, revalidate_window)) = self.lifetime(cache, reply) else {
            return;
        };
        let limit = cache.store.config.max_entry_bytes;
        // A body that says it is too large is not copied at all (the
        // instance's `Content-Length` is its size hint); one of unknown
        // length is, until it passes the limit.
        if reply.res.body().size_hint().lower() > limit {
            return;
        }
        let age = number(reply.values(&AGE).next()).unwrap_or(0);
        let Some(fresh) = lifetime.checked_sub(Duration::from_secs(age)) else {
            return;
        };
        if fresh.is_zero() {
            return;
        }
        let fresh = fresh.min(YEAR);
        let expires = now + fresh;
        let vary = list_elements(reply.values(&VARY))
            .filter_map(|name| HeaderName::from_bytes(name).ok())
            .map(|name| {
                let value = joined(&self.headers, &name);
                (name, value)
            })
            .collect();
        let relayed = reply.relayed.clone();
        let head_bytes = relayed.as_ref().map_or(0, Relayed::head_len) as u64;
        let pending = Pending {
            store: Arc::clone(&cache.store),
            gzip: cache.compression.clone().filter(|c| c.eligible(reply)),
            _fill: self.fill,
            key: self.key,
            entry: Entry {
                status,
                relayed,
                headers: reply.res.headers().clone(),
                body: Bytes::new(),
                gzipped: None,
                must_revalidate: Directives::of(reply.values(&CACHE_CONTROL)).must_revalidate,
                vary,
                stored: now,
                expires,
                stale_until: expires + stale_window.min(YEAR),
                revalidate_until: expires + revalidate_window.min(YEAR),
                age,
                size: 0,
                validators: Validators::of(reply),
            },
            overhead: head_bytes + ENTRY_OVERHEAD,
        };
        let inner = std::mem::replace(reply.res.body_mut(), body::empty());
        *reply.res.body_mut() = body::boxed(Recording {
            inner,
            pieces: Vec::new(),
            len: 0,
            limit,
            pending: Some(pending),
        });
    }

    /// How long the response may be served, if it may be kept at all, and
    /// for how long after that it may stand in for a failed fetch, and be
    /// served while it is fetched again: its own `stale-if-error` and
    /// `stale-while-revalidate`, else the route's, and neither past
    /// `must-revalidate` (RFC 9111 §5.2.2.2).
    fn lifetime(
        &self,
        cache: &RouteCache,
        reply: &Reply,
    ) -> Option<(Duration, Duration, Duration)> {
        let said = Directives::of(reply.values(&CACHE_CONTROL));
        let window = |own: Option<u64>, route: Duration| {
            if said.must_revalidate {
                Duration::ZERO
            } else {
                own.map_or(route, Duration::from_secs)
            }
        };
        Some((
            self.freshness(cache, reply, &said)?,
            window(said.stale_if_error, cache.stale_if_error),
            window(said.stale_while_revalidate, cache.stale_while_revalidate),
        ))
    }

    /// How long the response may be served, if it may be kept at all.
    fn freshness(&self, cache: &RouteCache, reply: &Reply, said: &Directives) -> Option<Duration> {
        if !cacheable_status(reply.res.status())
            || reply.values(&SET_COOKIE).next().is_some()
            // Varying on the request id, unique to each request, is
            // varying on everything, as `*` is (and the id the gateway
            // made is not among the request's fields, which a `Vary` is
            // read from).
            || list_elements(reply.values(&VARY))
                .any(|v| v == b"*" || v.eq_ignore_ascii_case(b"x-request-id"))
        {
            return None;
        }
        if said.no_store || said.private || said.no_cache {
            return None;
        }
        if self.authorized && !(said.public || said.s_maxage.is_some() || said.must_revalidate) {
            return None;
        }
        if let Some(secs) = said.s_maxage.or(said.max_age) {
            return Some(Duration::from_secs(secs));
        }
        if let Some(expires) = reply.values(&EXPIRES).next() {
            // An `Expires` that is not a date means "already expired".
            let expires = http_date(Some(expires))?;
            let date = http_date(reply.values(&DATE).next()).unwrap_or_else(SystemTime::now);
            return expires.duration_since(date).ok();
        }
        Some(cache.ttl)
    }
}

/// Statuses a shared cache may keep without explicit freshness
/// (RFC 9110 §15.1), and that this cache keeps at all.
fn cacheable_status(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

fn number(value: Option<&[u8]>) -> Option<u64> {
    let digits = value?.trim_ascii();
    let digits = digits
        .strip_prefix(b"\"")
        .and_then(|d| d.strip_suffix(b"\""))
        .unwrap_or(digits);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // A delta past `u64` is "forever", capped as RFC 9111 §1.2.2 says.
    Some(
        std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse().ok())
            .unwrap_or(2_147_483_648),
    )
}

/// The `Cache-Control` directives the cache acts on.
#[derive(Debug, Default, PartialEq)]
struct Directives {
    no_store: bool,
    no_cache: bool,
    private: bool,
    public: bool,
    must_revalidate: bool,
    max_age: Option<u64>,
    s_maxage: Option<u64>,
    stale_if_error: Option<u64>,
    stale_while_revalidate: Option<u64>,
    /// A request's: how stale a response it takes (`u64::MAX` for
    /// `max-stale` without a number: any).
    max_stale: Option<u64>,
    /// A request's: how long a response must stay fresh, at least.
    min_fresh: Option<u64>,
    /// A request's: a kept response or none, never a fetch.
    only_if_cached: bool,
}

impl Directives {
    /// Whether a request leaves how fresh a response it gets to the cache:
    /// it names no `max-age`, `min-fresh` or `max-stale`. Only then may a
    /// stale response be served to it while it is fetched again.
    fn leaves_freshness_to_the_cache(&self) -> bool {
        self.max_age.is_none() && self.min_fresh.is_none() && self.max_stale.is_none()
    }

    fn of<'a>(values: impl Iterator<Item = &'a [u8]>) -> Directives {
        let mut d = Directives::default();
        for element in list_elements(values) {
            let (name, arg) = match element.iter().position(|&b| b == b'=') {
                Some(at) => (element[..at].trim_ascii(), Some(&element[at + 1..])),
                None => (element, None),
            };
            let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
            if is(b"no-store") {
                d.no_store = true;
            } else if is(b"no-cache") {
                // With field names (`no-cache="set-cookie"`) too: the
                // cache does not keep a response in part.
                d.no_cache = true;
            } else if is(b"private") {
                d.private = true;
            } else if is(b"public") {
                d.public = true;
            } else if is(b"must-revalidate") || is(b"proxy-revalidate") {
                d.must_revalidate = true;
            } else if is(b"max-age") {
                // A malformed max-age makes the response stale (§4.2.1).
                d.max_age = Some(number(arg).unwrap_or(0));
            } else if is(b"s-maxage") {
                d.s_maxage = Some(number(arg).unwrap_or(0));
            } else if is(b"stale-if-error") {
                d.stale_if_error = number(arg);
            } else if is(b"stale-while-revalidate") {
                d.stale_while_revalidate = number(arg);
            } else if is(b"max-stale") {
                // Without a number (or with a malformed one, which must
                // not make the cache stricter than the client meant): any.
                d.max_stale = Some(number(arg).unwrap_or(u64::MAX));
            } else if is(b"min-fresh") {
                d.min_fresh = number(arg);
            } else if is(b"only-if-cached") {
                d.only_if_cached = true;
            }
        }
        d
    }
}

/// What a response's body becomes once it is whole.
struct Pending {
    store: Arc<ResponseCache>,
    /// The gateway's gzip, if it would compress the response.
    gzip: Option<Arc<Compression>>,
    /// Dropped after the entry is kept: whoever waits finds it.
    _fill: Option<Fill>,
    key: Box<str>,
    entry: Entry,
    overhead: u64,
}

/// A response's body on its way to the client, copied aside; kept when it
/// ends whole within the limit.
struct Recording {
    inner: Body,
    pieces: Vec<Bytes>,
    len: u64,
    limit: u64,
    pending: Option<Pending>,
}

impl Recording {
    fn commit(&mut self) {
        let Some(mut p) = self.pending.take() else {
            return;
        };
        // One copy, so that the kept body does not pin the larger read
        // buffers its pieces are slices of.
        let mut body = BytesMut::with_capacity(usize::try_from(self.len).unwrap_or(0));
        for piece in self.pieces.drain(..) {
            body.extend_from_slice(&piece);
        }
        p.entry.body = body.freeze();
        // Here, once, rather than for every hit by a client that takes it
        // (as nginx and Envoy do, with every hit gzipped again).
        p.entry.gzipped = p.gzip.as_ref().and_then(|c| c.gzip(&p.entry.body));
        let gzipped = p.entry.gzipped.as_ref().map_or(0, Bytes::len) as u64;
        p.entry.size = self.len + gzipped + p.key.len() as u64 + p.overhead;
        p.store.put(p.key, p.entry);
    }

    fn give_up(&mut self) {
        self.pending = None;
        self.pieces = Vec::new();
    }
}

impl http_body::Body for Recording {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => match frame.data_ref() {
                Some(data) if this.pending.is_some() => {
                    this.len += data.len() as u64;
                    if this.len > this.limit {
                        this.give_up();
                    } else {
                        this.pieces.push(data.clone());
                    }
                }
                Some(_) => {}
                // Trailers are not kept, nor the response without them.
                None => this.give_up(),
            },
            Poll::Ready(None) => this.commit(),
            // An error: the body is not whole.
            Poll::Ready(Some(Err(_))) => this.give_up(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Recording {
    /// A writer that stops at `Content-Length` may never poll the end:
    /// the body is whole if the inner one says it has ended.
    fn drop(&mut self) {
        if self.pending.is_some() && self.inner.is_end_stream() {
            self.commit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directives(values: &[&str]) -> Directives {
        Directives::of(values.iter().map(|v| v.as_bytes()))
    }

    #[test]
    fn cache_control_is_read_as_rfc_9111_has_it() {
        let d = directives(&["public, max-age=60", "S-MaxAge=\"30\""]);
        assert!(d.public);
        assert_eq!((d.max_age, d.s_maxage), (Some(60), Some(30)));
        let d = directives(&["no-cache=\"set-cookie\", private"]);
        assert!(d.no_cache && d.private && !d.no_store);
        // A malformed or negative max-age is stale; a huge one is capped.
        assert_eq!(directives(&["max-age=soon"]).max_age, Some(0));
        assert_eq!(directives(&["max-age=-1"]).max_age, Some(0));
        assert_eq!(
            directives(&["max-age=99999999999999999999999"]).max_age,
            Some(2_147_483_648)
        );
        assert_eq!(directives(&[]), Directives::default());
        assert!(directives(&["proxy-revalidate"]).must_revalidate);
        let d = directives(&["max-age=1, stale-if-error=300"]);
        assert_eq!(d.stale_if_error, Some(300));
        // A malformed one is not there: the route's window holds.
        assert_eq!(directives(&["stale-if-error=later"]).stale_if_error, None);
        let d = directives(&["max-age=1, stale-while-revalidate=\"30\""]);
        assert_eq!(d.stale_while_revalidate, Some(30));
        // A request's own.
        let d = directives(&["max-stale, min-fresh=5", "only-if-cached"]);
        assert_eq!((d.max_stale, d.min_fresh), (Some(u64::MAX), Some(5)));
        assert!(d.only_if_cached);
        assert_eq!(directives(&["max-stale=60"]).max_stale, Some(60));
        // A malformed max-stale takes any staleness, not none; a
        // malformed min-fresh asks for nothing.
        assert_eq!(directives(&["max-stale=soon"]).max_stale, Some(u64::MAX));
        assert_eq!(directives(&["min-fresh=x"]).min_fresh, None);
    }

    fn entry(size: u64, vary: Vec<(HeaderName, Option<Vec<u8>>)>, expires: Instant) -> Entry {
        Entry {
            status: StatusCode::OK,
            relayed: None,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"x"),
            vary,
            stored: Instant::now(),
            expires,
            stale_until: expires,
            revalidate_until: expires,
            age: 0,
            size,
            gzipped: None,
            must_revalidate: false,
            validators: Validators::default(),
        }
    }

    #[test]
    fn the_store_lets_the_least_recently_used_go_first() {
        let cache = ResponseCache::new(CacheConfig {
            max_bytes: 3000,
            max_entry_bytes: 1000,
        });
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        for key in ["a", "b", "c"] {
            cache.put(key.into(), entry(1000, Vec::new(), later));
        }
        assert_eq!(cache.usage(), (3000, 3));
        // `a` used: `b` is now the oldest, and goes for `d`.
        assert!(
            cache
                .get("a", &HeaderMap::new(), now, &Directives::default())
                .is_ok()
        );
        cache.put("d".into(), entry(1000, Vec::new(), later));
        assert_eq!(cache.usage(), (3000, 3));
        assert_eq!(
            cache
                .get("b", &HeaderMap::new(), now, &Directives::default())
                .err()
                .map(|m| m.fwd),
            Some("uri-miss")
        );
        assert!(
            cache
                .get("a", &HeaderMap::new(), now, &Directives::default())
                .is_ok()
        );
        // Replacing an entry frees the old one's bytes.
        cache.put("a".into(), entry(500, Vec::new(), later));
        assert_eq!(cache.usage(), (2500, 3));
        // Larger than the whole store: never kept.
        cache.put("e".into(), entry(5000, Vec::new(), later));
        assert_eq!(cache.usage(), (2500, 3));
        // Stale entries go when found; invalidation drops a key.
        cache.put("s".into(), entry(100, Vec::new(), now));
        assert_eq!(
            cache
                .get("s", &HeaderMap::new(), now, &Directives::default())
                .err()
                .map(|m| m.fwd),
            Some("stale")
        );
        cache.invalidate("a");
        assert_eq!(cache.usage().1, 2);
        let (bytes, _) = cache.usage();
        assert!(bytes <= 3000);
    }

    #[test]
    fn a_stale_entry_is_kept_for_its_stand_in_window_only() {
        let cache = ResponseCache::new(CacheConfig::default());
        let now = Instant::now();
        let mut stale = entry(100, Vec::new(), now);
        stale.stale_until = now + Duration::from_secs(60);
        cache.put("k".into(), stale);
        let missed = cache
            .get("k", &HeaderMap::new(), now, &Directives::default())
            .err();
        assert!(missed.is_some_and(|m| m.fwd == "stale" && m.stale.is_some()));
        assert_eq!(cache.usage(), (100, 1), "kept while it may stand in");
        let later = now + Duration::from_secs(61);
        let missed = cache
            .get("k", &HeaderMap::new(), later, &Directives::default())
            .err();
        assert!(missed.is_some_and(|m| m.fwd == "stale" && m.stale.is_none()));
        assert_eq!(cache.usage(), (0, 0), "dropped once it may not");
    }

    #[test]
    fn a_large_store_is_sharded_and_stays_within_its_bytes() {
        let config = CacheConfig::default();
        let cache = ResponseCache::new(config);
        assert_eq!(cache.shards.len(), 16);
        let later = Instant::now() + Duration::from_secs(60);
        for n in 0..4000 {
            cache.put(format!("k{n}").into(), entry(64 << 10, Vec::new(), later));
        }
        let (bytes, entries) = cache.usage();
        assert!(bytes <= config.max_bytes, "{bytes}");
        // Every shard full, or nearly: 64 MiB of 64 KiB entries, less at
        // most one entry per shard.
        assert!(entries >= 1024 - 16, "{entries}");
        // Small stores stay whole.
        let small = ResponseCache::new(CacheConfig {
            max_bytes: 4096,
            max_entry_bytes: 4096,
        });
        assert_eq!(small.shards.len(), 1);
    }

    /// A body of two pieces, recorded into `cache` under `key`.
    fn recording(cache: &Arc<ResponseCache>, key: &str) -> Recording {
        let pieces = futures_util::stream::iter([
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"hello "))),
            Ok(Frame::data(Bytes::from_static(b"world"))),
        ]);
        Recording {
            inner: body::boxed(http_body_util::StreamBody::new(pieces)),
            pieces: Vec::new(),
            len: 0,
            limit: 1024,
            pending: Some(Pending {
                store: Arc::clone(cache),
                gzip: None,
                _fill: None,
                key: key.into(),
                entry: entry(0, Vec::new(), Instant::now() + Duration::from_secs(60)),
                overhead: ENTRY_OVERHEAD,
            }),
        }
    }

    /// A request that looked up a stale entry, and asks to fetch it after
    /// another fetch kept a new one and let go of its claim, is refused
    /// the claim: looked up again, it finds the new one. (Before, it
    /// fetched the response a second time.)
    #[test]
    fn a_claim_after_another_fetch_kept_its_response_is_refused() {
        let cache = Arc::new(ResponseCache::new(CacheConfig::default()));
        let req = HeaderMap::new();
        let now = Instant::now();
        let stale = now.checked_sub(Duration::from_secs(5)).unwrap_or(now);
        let mut old = entry(10, Vec::new(), stale);
        old.revalidate_until = now + Duration::from_secs(60);
        cache.put("k".into(), old);
        let seen = match cache.get("k", &req, now, &Directives::default()) {
            Err(missed) => missed.stale,
            Ok(_) => None,
        };
        assert!(seen.is_some(), "the stale entry is what is seen");
        // Another request's fetch keeps a fresh one meanwhile.
        cache.put(
            "k".into(),
            entry(10, Vec::new(), now + Duration::from_secs(60)),
        );
        assert!(matches!(
            ResponseCache::claim(&cache, "k", &req, Some(seen.as_ref())),
            Claim::Changed
        ));
        // Unchanged, the claim is won; and the lookup again finds it fresh.
        let kept = cache.get("k", &req, now, &Directives::default()).ok();
        assert!(kept.is_some());
        let fresh = matches!(
            ResponseCache::find(&cache, "k", &req, now, &Directives::default(), true),
            Found::Fresh(_)
        );
        assert!(fresh);
        assert!(matches!(
            ResponseCache::claim(&cache, "k", &req, Some(kept.as_ref())),
            Claim::Won(_)
        ));
    }

    #[tokio::test]
    async fn a_body_is_kept_only_once_it_has_ended() {
        use http_body_util::BodyExt;
        let cache = Arc::new(ResponseCache::new(CacheConfig::default()));
        // The client went away after the first piece: nothing is kept.
        let mut cut = recording(&cache, "cut");
        let first = cut.frame().await;
        assert!(first.is_some_and(|f| f.is_ok()));
        drop(cut);
        assert_eq!(cache.usage(), (0, 0));
        // Read to its end: kept, whole.
        let whole = recording(&cache, "whole");
        let body = whole.collect().await.map(|c| c.to_bytes()).ok();
        assert_eq!(body.as_deref(), Some(&b"hello world"[..]));
        let kept = cache.get(
            "whole",
            &HeaderMap::new(),
            Instant::now(),
            &Directives::default(),
        );
        assert_eq!(
            kept.ok().map(|e| e.body.clone()),
            Some(Bytes::from_static(b"hello world"))
        );
    }

    #[tokio::test]
    async fn a_body_the_gateway_would_gzip_is_kept_gzipped_too_and_counted() {
        use std::io::Read;

        use http_body_util::BodyExt;
        let cache = Arc::new(ResponseCache::new(CacheConfig::default()));
        let plain = recording(&cache, "plain");
        let _ = plain.collect().await;
        let mut zipped = recording(&cache, "zipped");
        let compression = crate::compress::CompressionConfig::from_manifest(
            &flotilla_manifest::Compression::default(),
        );
        if let Some(p) = zipped.pending.as_mut() {
            p.gzip = Some(Arc::new(Compression::new(&compression)));
        }
        let _ = zipped.collect().await;
        let get = |key| {
            cache
                .get(
                    key,
                    &HeaderMap::new(),
                    Instant::now(),
                    &Directives::default(),
                )
                .ok()
                .unwrap_or_else(|| panic!("{key} not kept"))
        };
        let (plain, zipped) = (get("plain"), get("zipped"));
        assert!(plain.gzipped.is_none());
        let gzipped = zipped.gzipped.clone().unwrap_or_default();
        let mut out = Vec::new();
        let read = flate2::read::GzDecoder::new(&gzipped[..]).read_to_end(&mut out);
        assert!(read.is_ok());
        assert_eq!(out, b"hello world");
        // Both forms count against the store's bytes (the key `zipped` is
        // a byte longer than `plain`).
        assert_eq!(zipped.size, plain.size + gzipped.len() as u64 + 1);
        assert_eq!(cache.usage().0, plain.size + zipped.size);
    }

    /// Forwards a GET of `/x` on a route whose cache is `cache` with
    /// `fields`, answers it 200 with `said` as its `Cache-Control`, and
    /// reads the answer to its end; whether it was kept.
    async fn kept(
        cache: &RouteCache,
        fields: &[(HeaderName, &'static str)],
        said: &'static str,
    ) -> bool {
        use http_body_util::BodyExt;
        let mut req = Request::new(body::empty());
        for (name, value) in fields {
            req.headers_mut()
                .insert(name, HeaderValue::from_static(value));
        }
        let now = Instant::now();
        let Verdict::Forward(miss) = cache.lookup(&req, (None, "/x"), false, now, None) else {
            panic!("a first GET is forwarded");
        };
        let mut res = Response::new(body::full("x"));
        if !said.is_empty() {
            res.headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static(said));
        }
        let mut reply = Reply::from(res);
        assert!(
            miss.keep(cache, &mut reply, now).is_none(),
            "only a 304 is sent again"
        );
        let _ = reply.res.into_body().collect().await;
        cache
            .store
            .get(
                &cache.key(None, "/x"),
                req.headers(),
                now,
                &Directives::default(),
            )
            .is_ok()
    }

    /// A minute's cache on `/x`, with a store of its own, keyed by the
    /// `query` parameters named, or by the whole query.
    fn route_cache(query: Option<&[&str]>) -> RouteCache {
        RouteCache {
            store: Arc::new(ResponseCache::new(CacheConfig::default())),
            ttl: Duration::from_secs(60),
            stale_if_error: Duration::ZERO,
            stale_while_revalidate: Duration::ZERO,
            id: "svc:/x:".into(),
            by_host: false,
            checked: false,
            query: query.map(|q| q.iter().map(|n| (*n).into()).collect()),
            compression: None,
            stats: stats::CacheStats::new("/x"),
        }
    }

    #[tokio::test]
    async fn credentials_keep_a_response_only_when_it_may_be_shared() {
        let route = || route_cache(None);
        let token = (AUTHORIZATION, "Bearer t");
        // The gateway sets this from a verified client certificate.
        let cert = (XFCC.clone(), "Hash=00");
        assert!(kept(&route(), &[], "").await);
        for credential in [token, cert] {
            let with = std::slice::from_ref(&credential);
            for (said, keeps) in [
                ("", false),
                ("max-age=60", false),
                ("public", true),
                ("s-maxage=60", true),
            ] {
                assert_eq!(
                    kept(&route(), with, said).await,
                    keeps,
                    "{credential:?} {said}"
                );
            }
        }
        // On a route whose requests `[gateway.authz]` lets on, every one is
        // credentialed (the check may have admitted a cookie).
        let checked = || RouteCache {
            checked: true,
            ..route_cache(None)
        };
        for (said, keeps) in [("", false), ("max-age=60", false), ("public", true)] {
            assert_eq!(kept(&checked(), &[], said).await, keeps, "checked {said}");
        }
    }

    /// A route's cache with an entry kept for `/x`: fresh until `expires`,
    /// `age` seconds old at `now`, with `stale_window` past `expires` to
    /// stand in for a failed fetch, and a minute past `now` (or `expires`,
    /// if later) to be served while fetched again. (Kept as `Miss::record`
    /// keeps them: `must-revalidate` makes both windows nothing.)
    fn with_entry(now: Instant, expires: Instant, age: u64, stale_window: Duration) -> RouteCache {
        let cache = route_cache(None);
        let mut kept = entry(100, Vec::new(), expires);
        kept.stored = now;
        kept.age = age;
        kept.stale_until = expires + stale_window;
        kept.revalidate_until = expires.max(now) + Duration::from_secs(60);
        cache.store.put(cache.key(None, "/x"), kept);
        cache
    }

    /// A GET of `/x` with `Cache-Control: directives` (none if empty).
    fn asking(directives: &'static str) -> Request<Body> {
        let mut req = Request::new(body::empty());
        if !directives.is_empty() {
            req.headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static(directives));
        }
        req
    }

    fn cache_status_of(reply: &Reply) -> String {
        let said = reply.values(&CACHE_STATUS).next().unwrap_or_default();
        String::from_utf8_lossy(said).into_owned()
    }

    /// What a lookup made of a request, in words, for a failed assertion.
    fn verdict(v: &Verdict) -> String {
        match v {
            Verdict::Hit(r) => format!("hit: {}", cache_status_of(r)),
            Verdict::Revalidate(r, fetch) => {
                let fetch = if fetch.is_some() { "with" } else { "without" };
                format!("stale {fetch} a fetch: {}", cache_status_of(r))
            }
            Verdict::Forward(m) => format!("forwarded, fwd={}", m.fwd),
            Verdict::Wait(_) => "waits".into(),
            Verdict::NotCached => "not cached".into(),
        }
    }

    /// A client's `max-age`, `min-fresh` or `max-stale` that a stale entry
    /// fails rules it out even within its `stale-while-revalidate`
    /// window: forwarded (RFC 9111 §4.2.4), not served stale. One with
    /// `only-if-cached` is served it, but starts no fetch.
    #[test]
    fn a_client_s_freshness_limits_win_over_stale_while_revalidate() {
        // Ahead of the clock, so that 20 s before it is an instant too.
        let now = Instant::now() + Duration::from_secs(60);
        let went_stale = now - Duration::from_secs(20);
        // Fresh for 10 s, stale for 20: 30 s old.
        let cache = with_entry(now, went_stale, 30, Duration::ZERO);
        let look = |directives| cache.lookup(&asking(directives), (None, "/x"), false, now, None);
        for directives in [
            "max-age=5",
            "min-fresh=10",
            "max-stale=5",
            // Old enough for it, but stale, and no `max-stale`: a client
            // with a `max-age` takes nothing stale (§5.2.1.1).
            "max-age=100",
        ] {
            let v = look(directives);
            assert!(
                matches!(&v, Verdict::Forward(m) if m.fwd == "stale" && m.stale.is_some()),
                "{directives}: {}",
                verdict(&v)
            );
        }
        let v = look("max-stale=60");
        assert!(
            matches!(v, Verdict::Hit(_)),
            "as stale as it takes: {}",
            verdict(&v)
        );
        let v = look("only-if-cached");
        assert!(
            matches!(&v, Verdict::Revalidate(r, None)
                if cache_status_of(r).ends_with("detail=stale-while-revalidate")),
            "only-if-cached: {}",
            verdict(&v)
        );
        // A client that says nothing: served stale, and it fetches.
        let v = look("");
        assert!(
            matches!(&v, Verdict::Revalidate(_, Some(_))),
            "{}",
            verdict(&v)
        );
    }

    /// A response still fresh that the client's `max-age` passed over
    /// stands in for a failed fetch only where it could once stale: with
    /// a `stale-if-error` window (none after `must-revalidate`, which
    /// closes it as the response is kept).
    #[test]
    fn a_fresh_response_passed_over_stands_in_only_with_a_window() {
        let now = Instant::now();
        let fresh_until = now + Duration::from_secs(30);
        for (window, stands_in) in [(Duration::ZERO, false), (Duration::from_secs(600), true)] {
            let cache = with_entry(now, fresh_until, 30, window);
            let v = cache.lookup(&asking("max-age=5"), (None, "/x"), false, now, None);
            let Verdict::Forward(mut miss) = v else {
                panic!("max-age=5 of a 30 s old response: {}", verdict(&v));
            };
            assert_eq!(miss.fwd, "request");
            let stood_in = miss.stand_in(StatusCode::SERVICE_UNAVAILABLE, now);
            assert_eq!(stood_in.is_some(), stands_in, "{window:?}");
            if let Some(reply) = stood_in {
                let said = cache_status_of(&reply);
                assert!(
                    said.starts_with("flotilla; fwd=request; fwd-status=503; ttl=")
                        && said.ends_with("; detail=stale-if-error"),
                    "{said}"
                );
            }
        }
    }

    #[test]
    fn variants_are_bounded_per_key() {
        let cache = ResponseCache::new(CacheConfig::default());
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let lang = HeaderName::from_static("accept-language");
        for n in 0..(MAX_VARIANTS + 4) {
            let vary = vec![(lang.clone(), Some(n.to_string().into_bytes()))];
            cache.put("k".into(), entry(10, vary, later));
        }
        assert_eq!(cache.usage(), (10 * MAX_VARIANTS as u64, MAX_VARIANTS));
        let mut asked = HeaderMap::new();
        asked.insert(&lang, HeaderValue::from_static("0"));
        assert_eq!(
            cache
                .get("k", &asked, now, &Directives::default())
                .err()
                .map(|m| m.fwd),
            Some("vary-miss")
        );
        asked.insert(&lang, HeaderValue::from(MAX_VARIANTS + 3));
        assert!(cache.get("k", &asked, now, &Directives::default()).is_ok());
        // A variant without the field is its own.
        assert_eq!(
            cache
                .get("k", &HeaderMap::new(), now, &Directives::default())
                .err()
                .map(|m| m.fwd),
            Some("vary-miss")
        );
    }

    #[test]
    fn only_the_named_query_parameters_count_and_in_the_order_of_their_names() {
        let route = route_cache;
        let kept = route(Some(&["page", "sort", "tag"]));
        for (sent, want) in [
            // Others dropped, the rest by name; a name's values as sent.
            (
                "/x?utm_source=a&sort=new&page=2",
                Some("/x?page=2&sort=new"),
            ),
            ("/x?tag=b&page=1&tag=a", Some("/x?page=1&tag=b&tag=a")),
            ("/x?page=1&sort=new", None),
            ("/x", None),
            ("/x?", Some("/x")),
            ("/x?utm=1&&", Some("/x")),
            // A name is as sent: another spelling is another parameter,
            // dropped whole with whatever it holds.
            ("/x?pag%65=9&page=1", Some("/x?page=1")),
            ("/x?utm=1;page=9&page=1", Some("/x?page=1")),
            ("/x?page=1;admin=1", None),
            // A name alone, without `=`, is a parameter too.
            ("/x?sort&page=1", Some("/x?page=1&sort")),
        ] {
            assert_eq!(kept.kept_query(sent).as_deref(), want, "{sent}");
            // What it makes is kept as it is.
            if let Some(want) = want {
                assert_eq!(kept.kept_query(want), None, "{want}");
            }
        }
        assert_eq!(route(Some(&[])).kept_query("/x?a=1"), Some("/x".into()));
        assert_eq!(route(None).kept_query("/x?b=1&a=2"), None);
    }
}
