//! GCRA counters in Redis, shared by every gateway replica pointed at it.
//!
//! One Lua script does the whole read-modify-write, so Redis runs it
//! atomically: concurrent requests on different replicas are counted as
//! exactly as on one. The script takes the time from Redis (`TIME`), not
//! from the replicas, so their clocks need not agree. Keys expire once
//! their arrival time has passed: idle clients cost Redis nothing.
//!
//! When Redis fails or is slow (no answer within 250 ms, tried twice), the
//! request is counted in this replica's in-memory store instead and Redis
//! is left alone for a second: limits stay roughly in force (per replica)
//! and a Redis outage neither stalls nor opens the gateway. After that
//! second, one request tries Redis again while the others go on counting
//! in memory: were all to try at once, a Redis that drops packets would
//! stall every request of that moment.
//!
//! The calls run on the runtime the store was made on (the gateway's
//! caller's), not on the worker thread whose request asked: the Redis
//! connection's driver task, and each reconnection's, is spawned where the
//! connection is used, and a worker's runtime ends before the gateway's
//! does. With the connection on a worker, the other workers' checks would
//! fail once that worker had stopped, and count in memory for a second.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Decision, RateLimit, gcra};
use crate::stats;

/// Returns `{allowed, ahead_us, over_us}`; see `gcra::step` for the same
/// arithmetic in Rust. Times are microseconds (Lua numbers are doubles:
/// exact to 2^53, i.e. centuries of microseconds). A stored arrival time
/// is never more than `tolerance` ahead of `now`, but for Redis's clock
/// stepping back: then it is taken as `tolerance` ahead, so a step back
/// of an hour does not refuse every client for an hour.
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
if tat > now + tolerance then tat = now + tolerance end
local new_tat = tat + interval
local ahead = new_tat - now
if ahead > tolerance then
  return {0, tat - now, ahead - tolerance}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil(ahead / 1000) + 1)
return {1, ahead, 0}
"#;

/// Gives a key back one interval (see `gcra::Store::refund`), keeping its
/// expiry.
const REFUND: &str = r#"
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat > 0 then
  redis.call('SET', KEYS[1], string.format('%d', math.max(tat - tonumber(ARGV[1]), 0)), 'KEEPTTL')
end
return 1
"#;

const RESPONSE_TIMEOUT: Duration = Duration::from_millis(250);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long to stay on the local fallback after a Redis failure.
const BACK_OFF: Duration = Duration::from_secs(1);
/// The longest a call may take: the response timeout, and one retry.
const PROBE: Duration = Duration::from_millis(2 * RESPONSE_TIMEOUT.as_millis() as u64);

/// `limit`'s emission interval and tolerance as the script counts them:
/// whole microseconds, the interval rounded up (never to nothing), the
/// tolerance `burst` such intervals.
fn micros(limit: &RateLimit) -> (u64, u64) {
    let interval = limit.interval_nanos().div_ceil(1000).max(1);
    (interval, interval.saturating_mul(u64::from(limit.burst)))
}

/// The decision the script's answer (`{allowed, ahead_us, over_us}`)
/// makes, figured with the interval and tolerance the script counted
/// with. The limit's own, in nanoseconds, are a little shorter: "3/s"
/// counts 333,334 µs a request, and after one has 666,668 µs of its
/// 1,000,002 left, two requests' worth; over the unrounded 333,333,333
/// ns that was 1.99, shown as one remaining where the memory store says 2.
fn decision(limit: &RateLimit, allowed: bool, ahead_us: i64, over_us: i64) -> Decision {
    let (interval, tolerance) = micros(limit);
    let ns = |us: u64| us.saturating_mul(1000);
    Decision::from_gcra(
        ns(interval),
        ns(tolerance),
        allowed,
        ns(ahead_us.max(0) as u64),
        ns(over_us.max(0) as u64),
    )
}

pub(crate) struct Store {
    client: Option<redis::Client>,
    manager: OnceLock<Option<ConnectionManager>>,
    script: Arc<redis::Script>,
    refund: Arc<redis::Script>,
    /// Where the calls run (see the module's comment); `None` outside a
    /// runtime, where they run in the caller's task.
    background: Option<tokio::runtime::Handle>,
    prefix: String,
    fallback: gcra::Store,
    epoch: Instant,
    /// Milliseconds since `epoch` before which Redis is not tried.
    degraded_until_ms: AtomicU64,
}

/// How a script call went.
enum Ran<T> {
    Done(T),
    /// Not tried: Redis failed a moment ago, or cannot be set up.
    Skipped,
    /// Tried, and failed or timed out (counted; the store backs off).
    Failed,
}

/// Checks a Redis URL without connecting, for config validation.
pub(crate) fn check_url(url: &str) -> Result<(), redis::RedisError> {
    redis::Client::open(url).map(|_| ())
}

impl Store {
    pub(crate) fn new(url: &str, prefix: &str) -> Store {
        // The URL was validated with the config; `None` only if it was not.
        let client = redis::Client::open(url).ok();
        Store {
            client,
            manager: OnceLock::new(),
            script: Arc::new(redis::Script::new(SCRIPT)),
            refund: Arc::new(redis::Script::new(REFUND)),
            background: tokio::runtime::Handle::try_current().ok(),
            prefix: prefix.to_string(),
            fallback: gcra::Store::new(gcra::DEFAULT_MAX_KEYS),
            epoch: Instant::now(),
            degraded_until_ms: AtomicU64::new(0),
        }
    }

    fn manager(&self) -> Option<ConnectionManager> {
        self.manager
            .get_or_init(|| {
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_number_of_retries(1);
                let client = self.client.clone()?;
                match ConnectionManager::new_lazy_with_config(client, config) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        tracing::error!(target: "flotilla::gateway", error = %e, "cannot set up the Redis rate-limit backend");
                        None
                    }
                }
            })
            .clone()
    }

    pub(crate) async fn check(&self, limit: &RateLimit, key: &str) -> Decision {
        let (interval, tolerance) = micros(limit);
        let ran = self
            .run::<(i64, i64, i64)>(&self.script, key, &[interval, tolerance])
            .await;
        match ran {
            Ran::Done((allowed, ahead, over)) => decision(limit, allowed == 1, ahead, over),
            Ran::Skipped | Ran::Failed => self.fallback.check(limit, key),
        }
    }

    /// Gives `key` back a request counted under `limit`, where it was
    /// counted: in Redis, or in memory while Redis is failing. A refund
    /// that fails is lost (the request stays counted: the strict side).
    pub(crate) async fn refund(&self, limit: &RateLimit, key: &str) {
        let (interval, _) = micros(limit);
        if let Ran::Skipped = self.run::<i64>(&self.refund, key, &[interval]).await {
            self.fallback.refund(limit, key);
        }
    }

    /// Runs `script` on `key` (under the prefix) with `args`, on the
    /// caller's runtime and within the response timeout; a failure is
    /// counted and puts the store on its fallback for a while.
    async fn run<T: redis::FromRedisValue + Send + 'static>(
        &self,
        script: &Arc<redis::Script>,
        key: &str,
        args: &[u64],
    ) -> Ran<T> {
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        let until = self.degraded_until_ms.load(Ordering::Acquire);
        if now_ms < until {
            return Ran::Skipped;
        }
        // Back from a failure: one request (the one that moves the mark
        // on) finds out whether Redis is back, within the calls' timeout.
        let probing = until != 0;
        if probing
            && self
                .degraded_until_ms
                .compare_exchange(
                    until,
                    now_ms + PROBE.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
        {
            return Ran::Skipped;
        }
        let Some(mut conn) = self.manager() else {
            return Ran::Skipped;
        };
        let (script, key, args) = (
            Arc::clone(script),
            format!("{}{key}", self.prefix),
            args.to_vec(),
        );
        let call = async move {
            let mut invocation = script.key(key);
            for arg in args {
                invocation.arg(arg);
            }
            let call = invocation.invoke_async::<T>(&mut conn);
            tokio::time::timeout(PROBE, call).await
        };
        let error = match crate::workers::on_caller(self.background.as_ref(), call).await {
            Ok(Ok(Ok(value))) => {
                if probing {
                    self.degraded_until_ms.store(0, Ordering::Release);
                }
                return Ran::Done(value);
            }
            Ok(Ok(Err(e))) => e.to_string(),
            Ok(Err(_)) => "timed out".to_string(),
            Err(e) => e.to_string(),
        };
        self.degrade(now_ms, &error);
        Ran::Failed
    }

    fn degrade(&self, now_ms: u64, error: &str) {
        let until = now_ms + BACK_OFF.as_millis() as u64;
        let previous = self.degraded_until_ms.swap(until, Ordering::Relaxed);
        stats::rate_limit_backend_error();
        // Log once per outage, not once per request.
        if previous + BACK_OFF.as_millis() as u64 <= now_ms {
            tracing::warn!(
                target: "flotilla::gateway",
                error,
                "the Redis rate-limit backend failed; counting in memory for now"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests' Redis (`FLOTILLA_TEST_REDIS_URL`), or `None` after
    /// `flotilla_testenv::skip`.
    #[track_caller]
    fn redis_url() -> Option<String> {
        flotilla_testenv::env_or_skip(
            "FLOTILLA_TEST_REDIS_URL",
            "set it to a Redis server, e.g. redis://127.0.0.1:6379",
        )
    }

    /// One check made on a runtime of its own, on a thread of its own,
    /// both gone when it returns: as a gateway worker that stops.
    async fn check_from_a_worker(store: &Arc<Store>, limit: &RateLimit) -> Decision {
        let (store, limit) = (Arc::clone(store), limit.clone());
        let checked = tokio::task::spawn_blocking(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("{e}"));
            runtime.block_on(store.check(&limit, "client"))
        });
        checked.await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// What each of `limit`'s first `n` requests, made at once, leaves:
    /// as the script's answer reports it, and as the memory store does.
    fn remaining(limit: &str, n: usize) -> (Vec<u32>, Vec<u32>) {
        let limit = RateLimit::parse(limit).unwrap_or_else(|e| panic!("{e}"));
        let (interval, tolerance) = micros(&limit);
        // The script's arithmetic, at one instant: each request pushes
        // the arrival time one interval ahead.
        let redis = (1..=n as i64)
            .map(|i| {
                let ahead = i * interval as i64;
                let allowed = ahead <= tolerance as i64;
                let ahead = if allowed {
                    ahead
                } else {
                    ahead - interval as i64
                };
                decision(&limit, allowed, ahead, 0).remaining
            })
            .collect();
        let mut tat = 0;
        let memory = (0..n)
            .map(|_| {
                let (d, stored) = gcra::step(&limit, tat, 1);
                tat = stored.unwrap_or(tat);
                d.remaining
            })
            .collect();
        (redis, memory)
    }

    #[test]
    fn remaining_is_counted_with_the_interval_the_script_counts_with() {
        // Intervals that are not whole microseconds (333,333.3 µs, 142,857.1
        // µs) and one that is.
        for (limit, want) in [
            ("3/s", vec![2, 1, 0, 0]),
            ("7/s burst 3", vec![2, 1, 0, 0]),
            ("7/m burst 3", vec![2, 1, 0, 0]),
            ("10/s burst 4", vec![3, 2, 1, 0, 0]),
            ("3/m burst 3", vec![2, 1, 0, 0]),
        ] {
            let (redis, memory) = remaining(limit, want.len());
            assert_eq!(redis, want, "{limit} in Redis");
            assert_eq!(memory, want, "{limit} in memory");
        }
    }

    /// The same against a Redis of the tests' (`FLOTILLA_TEST_REDIS_URL`).
    #[tokio::test]
    async fn redis_and_memory_report_the_same_remaining() {
        let Some(url) = redis_url() else {
            return;
        };
        let prefix = format!("flotilla-test:{}:", uuid::Uuid::new_v4());
        let store = Store::new(&url, &prefix);
        // 8,571,428.6 µs a request: rounded up by the script, and long
        // enough that the time between the checks changes nothing.
        let limit = RateLimit::parse("7/m burst 3").unwrap_or_else(|e| panic!("{e}"));
        let mut remaining = Vec::new();
        for _ in 0..3 {
            remaining.push(store.check(&limit, "client").await.remaining);
        }
        assert_eq!(
            store.degraded_until_ms.load(Ordering::Relaxed),
            0,
            "a check failed and was counted in memory"
        );
        assert_eq!(remaining, [2, 1, 0]);
    }

    /// A stored arrival time far ahead of Redis's clock (as after the
    /// clock stepped back an hour) refuses for one interval, not the hour.
    #[tokio::test]
    async fn a_clock_stepped_back_refuses_for_an_interval_not_the_step() {
        let Some(url) = redis_url() else {
            return;
        };
        let prefix = format!("flotilla-test:{}:", uuid::Uuid::new_v4());
        let store = Store::new(&url, &prefix);
        let limit = RateLimit::parse("10/s burst 5").unwrap_or_else(|e| panic!("{e}"));
        let client = redis::Client::open(url.as_str()).unwrap_or_else(|e| panic!("{e}"));
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let hour_ahead = (secs + 3600) * 1_000_000 + micros;
        let _: () = redis::cmd("SET")
            .arg(format!("{prefix}client"))
            .arg(hour_ahead.to_string())
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let decision = store.check(&limit, "client").await;
        assert_eq!(store.degraded_until_ms.load(Ordering::Relaxed), 0);
        assert!(!decision.allowed);
        assert!(
            decision.retry_after <= Duration::from_millis(100),
            "refused for {:?}",
            decision.retry_after
        );
    }

    /// After a failure's back-off, one call tries Redis again; the others
    /// of that moment count in memory without waiting on it. The Redis
    /// here takes connections and commands and never answers.
    #[tokio::test]
    async fn one_call_tries_a_failed_redis_again_while_the_others_go_on() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(1..) = socket.read(&mut buf).await {}
                });
            }
        });
        let store = Arc::new(Store::new(&format!("redis://{addr}"), "flotilla-test:"));
        // A failure whose back-off has just ended.
        store.degraded_until_ms.store(1, Ordering::Release);
        while store.epoch.elapsed() < Duration::from_millis(2) {
            tokio::task::yield_now().await;
        }
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let store = Arc::clone(&store);
            calls.spawn(async move {
                let script = Arc::clone(&store.script);
                matches!(
                    store.run::<(i64, i64, i64)>(&script, "k", &[1, 1]).await,
                    Ran::Failed
                )
            });
        }
        let mut tried = 0;
        while let Some(failed) = calls.join_next().await {
            tried += usize::from(failed.unwrap_or_else(|e| panic!("{e}")));
        }
        assert_eq!(tried, 1, "calls that waited on Redis");
        // And a check meanwhile is counted in memory.
        let limit = RateLimit::parse("10/s burst 20").unwrap_or_else(|e| panic!("{e}"));
        assert!(store.check(&limit, "k").await.allowed);
    }

    #[tokio::test]
    async fn the_connection_outlives_the_worker_that_first_used_it() {
        let Some(url) = redis_url() else {
            return;
        };
        // A fresh prefix per run: counters of earlier runs must not count.
        let prefix = format!("flotilla-test:{}:", uuid::Uuid::new_v4());
        let store = Arc::new(Store::new(&url, &prefix));
        let limit = RateLimit::parse("2/h burst 2").unwrap_or_else(|e| panic!("{e}"));

        // The first worker makes the connection and stops; the next ones
        // must still reach Redis through it.
        let decisions = [
            check_from_a_worker(&store, &limit).await,
            check_from_a_worker(&store, &limit).await,
            check_from_a_worker(&store, &limit).await,
        ];
        assert_eq!(
            store.degraded_until_ms.load(Ordering::Relaxed),
            0,
            "a check failed and was counted in memory"
        );
        let allowed: Vec<bool> = decisions.iter().map(|d| d.allowed).collect();
        assert_eq!(
            allowed,
            [true, true, false],
            "Redis did not count all three"
        );
    }
}
