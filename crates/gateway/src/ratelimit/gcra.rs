//! GCRA counters in memory: one theoretical arrival time per key, in
//! shards behind short mutexes.
//!
//! Each check is a read-modify-write of one `u64` under its shard's lock,
//! so concurrent requests are counted exactly (200 at once against a burst
//! of 50 lets exactly 50 through). Memory is bounded: a key whose arrival
//! time has passed is indistinguishable from an absent one and is dropped
//! whenever its shard is full; if a flood of distinct keys still fills it,
//! the key closest to being refilled is forgotten, which can only make that
//! one client's limit more lenient, never anyone else's stricter.

use std::hash::{BuildHasher, RandomState};
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

use hashbrown::HashTable;

use super::{Decision, RateLimit};

/// Keys tracked per limiter before idle ones are swept: ~100 bytes each,
/// so about 10 MB per limited route at worst.
pub(crate) const DEFAULT_MAX_KEYS: usize = 100_000;

const SHARDS: usize = 16;

/// Key → theoretical arrival time (nanoseconds since the store's epoch).
/// Each entry keeps its key's hash, so the table never hashes a key again.
type Shard = Mutex<HashTable<Entry>>;

struct Entry {
    hash: u64,
    key: Box<str>,
    tat: u64,
}

pub(crate) struct Store {
    epoch: Instant,
    shards: Box<[Shard]>,
    per_shard: usize,
}

/// The hasher of every store's keys: std's SipHash, whose DoS resistance
/// is kept since keys can be client-chosen (`per header`), with one random
/// seed per process rather than per store, so that a key's hash can be
/// made once where the key is made once (a verified caller's,
/// `jwt::Identity`) instead of on every request (~190 instructions,
/// `instructions.sh`).
static HASHER: LazyLock<RandomState> = LazyLock::new(RandomState::new);

/// `key`'s hash in every store of this process.
pub(crate) fn key_hash(key: &str) -> u64 {
    HASHER.hash_one(key)
}

/// The GCRA step: `tat` is the stored arrival time (0 for a new key).
/// Returns the decision and the arrival time to store when allowed.
pub(crate) fn step(limit: &RateLimit, tat: u64, now: u64) -> (Decision, Option<u64>) {
    let interval = limit.interval_nanos();
    let tolerance = limit.tolerance_nanos();
    let new_tat = tat.max(now).saturating_add(interval);
    let ahead = new_tat - now;
    if ahead > tolerance {
        let current = tat.saturating_sub(now);
        (
            Decision::from_gcra(interval, tolerance, false, current, ahead - tolerance),
            None,
        )
    } else {
        (
            Decision::from_gcra(interval, tolerance, true, ahead, 0),
            Some(new_tat),
        )
    }
}

impl Store {
    pub(crate) fn new(max_keys: usize) -> Store {
        let per_shard = max_keys.div_ceil(SHARDS).max(1);
        Store {
            epoch: Instant::now(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
            per_shard,
        }
    }

    /// Read under the shard's lock, from the clock itself: not the reading
    /// of the connection's poll (`clock::now`). Workers share the store, and
    /// a poll's reading is as old as the poll, so two workers' readings can
    /// reach the lock out of order; time going backwards for a key makes
    /// its `Retry-After` overshoot (73 s for a 72 s interval, caught by
    /// `ratelimits::exactly_the_burst_passes_out_of_200_concurrent_requests`)
    /// and can refuse a request that conforms. Read under the lock, the
    /// times a key sees only go forward. (tokio's `Instant`, so that
    /// tests that pause tokio's clock pause this one too.)
    fn now(&self) -> u64 {
        // Offset by one so that a fresh key (0) is always in the past.
        let now = tokio::time::Instant::now().into_std();
        now.saturating_duration_since(self.epoch).as_nanos() as u64 + 1
    }

    pub(crate) fn check(&self, limit: &RateLimit, key: &str) -> Decision {
        self.check_hashed(limit, key, key_hash(key))
    }

    /// Counts a request under `key`, whose hash (`key_hash`) is `hash`.
    pub(crate) fn check_hashed(&self, limit: &RateLimit, key: &str, hash: u64) -> Decision {
        // One hash of the key picks both the shard and the slot in it. The
        // shard comes from middle bits: the table indexes by the low ones
        // and tags by the top seven.
        let shard = &self.shards[(hash >> 32) as usize % SHARDS];
        // A panic cannot leave a `u64` half-written; keep counting.
        let mut table = shard.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.now();
        // One lookup for a known key (the common case).
        if let Some(entry) = table.find_mut(hash, |e| *e.key == *key) {
            let (decision, store) = step(limit, entry.tat, now);
            if let Some(new_tat) = store {
                entry.tat = new_tat;
            }
            return decision;
        }
        let (decision, store) = step(limit, 0, now);
        if let Some(tat) = store {
            if table.len() >= self.per_shard {
                evict(&mut table, now, self.per_shard);
            }
            table.insert_unique(
                hash,
                Entry {
                    hash,
                    key: key.into(),
                    tat,
                },
                |e| e.hash,
            );
        }
        decision
    }

    /// Gives `key` back the request last counted for it under `limit`
    /// (which a later limit of the route refused): its arrival time moves
    /// back one interval. Whatever else was counted for the key meanwhile
    /// stays counted, and an arrival time before now is the same as now,
    /// so the key ends as if the request had never come.
    pub(crate) fn refund(&self, limit: &RateLimit, key: &str) {
        let hash = key_hash(key);
        let shard = &self.shards[(hash >> 32) as usize % SHARDS];
        let mut table = shard.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = table.find_mut(hash, |e| *e.key == *key) {
            entry.tat = entry.tat.saturating_sub(limit.interval_nanos());
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

fn evict(table: &mut HashTable<Entry>, now: u64, cap: usize) {
    table.retain(|e| e.tat > now);
    if table.len() >= cap
        && let Some(oldest) = table.iter().min_by_key(|e| e.tat).map(|e| (e.hash, e.tat))
        && let Ok(entry) = table.find_entry(oldest.0, |e| e.tat == oldest.1)
    {
        entry.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn limit(s: &str) -> RateLimit {
        match RateLimit::parse(s) {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn burst_then_refill_at_the_rate() {
        let l = limit("10/s burst 3");
        let interval = l.interval_nanos();
        let mut tat = 0;
        let now = 1_000;
        for expected_remaining in [2, 1, 0] {
            let (d, new) = step(&l, tat, now);
            assert!(d.allowed);
            assert_eq!(d.remaining, expected_remaining);
            tat = new.unwrap_or(tat);
        }
        let (d, new) = step(&l, tat, now);
        assert!(!d.allowed);
        assert!(new.is_none());
        assert_eq!(d.retry_after, Duration::from_nanos(interval));
        // One interval later exactly one more fits.
        let later = now + interval;
        let (d, new) = step(&l, tat, later);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        let (d, _) = step(&l, new.unwrap_or(tat), later);
        assert!(!d.allowed);
    }

    #[test]
    fn exact_under_concurrency() {
        let store = Arc::new(Store::new(1000));
        let l = Arc::new(limit("1/h burst 50"));
        let allowed = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (store, l, allowed) =
                    (Arc::clone(&store), Arc::clone(&l), Arc::clone(&allowed));
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        if store.check(&l, "k").allowed {
                            allowed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().is_ok());
        }
        assert_eq!(allowed.load(Ordering::SeqCst), 50);
    }

    /// A check made in a poll that began before another worker's check
    /// (so the poll's clock reading is the older one) must still see time
    /// go forward: its `Retry-After` is at most one interval.
    #[test]
    fn a_check_from_an_older_poll_sees_time_go_forward() {
        let store = Arc::new(Store::new(1000));
        let l = Arc::new(limit("1/min burst 1"));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (checked_tx, checked_rx) = std::sync::mpsc::channel::<()>();
        let older = {
            let (store, l) = (Arc::clone(&store), Arc::clone(&l));
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .map_err(|e| e.to_string())?;
                // One poll: its reading is taken as it begins, then it
                // waits (blocking, inside the poll) for the other check.
                runtime.block_on(crate::clock::Ticking::new(async move {
                    let _ = started_tx.send(());
                    checked_rx
                        .recv_timeout(Duration::from_secs(10))
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>(store.check(&l, "k"))
                }))
            })
        };
        assert!(started_rx.recv_timeout(Duration::from_secs(10)).is_ok());
        // Time for the other poll's reading to fall measurably behind.
        std::thread::sleep(Duration::from_millis(5));
        assert!(store.check(&l, "k").allowed);
        let _ = checked_tx.send(());
        let refused = match older.join() {
            Ok(Ok(decision)) => decision,
            other => panic!("the older poll's check failed: {other:?}"),
        };
        assert!(!refused.allowed);
        assert!(
            refused.retry_after <= Duration::from_nanos(l.interval_nanos()),
            "Retry-After {:?} is more than the interval",
            refused.retry_after
        );
    }

    #[test]
    fn keys_are_independent_and_memory_is_bounded() {
        let store = Store::new(64);
        let l = limit("1/h burst 1");
        assert!(store.check(&l, "a").allowed);
        assert!(!store.check(&l, "a").allowed);
        assert!(store.check(&l, "b").allowed);
        for i in 0..10_000 {
            store.check(&l, &format!("k{i}"));
        }
        // 16 shards of 4.
        assert!(store.len() <= 64, "{}", store.len());
    }
}
