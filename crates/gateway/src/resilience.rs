//! Per-service memory of how instances behave: the retry budget and
//! passive outlier detection.
//!
//! **Retry budget.** Retries help when one instance fails and hurt when a
//! whole service is overloaded (each retry is more load). So retries per
//! second may be at most `ratio` (20 %) of the requests per second, with a
//! floor (3/s) so that a quiet service still gets its retries. Requests per
//! second is the larger of the current and the previous second's count, so
//! the budget does not collapse at each second's start.
//!
//! **Outlier detection.** Every answer from an instance is evidence: a
//! connect error, a broken connection, a timeout or a 5xx counts against
//! it, anything else clears its record. `consecutive_failures` in a row
//! eject it for `base × (number of its ejections)`, at most `max`; while
//! ejected it gets no traffic. An instance is never ejected when that would
//! leave its service with no instance at all (better a flaky instance than
//! none). The ejection count is forgotten once an instance has stayed in
//! for `max`, so one bad hour does not follow it forever.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Limits;
use crate::stats;
use crate::upstream::Endpoint;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Settings {
    /// Retries per request, for routes that set none of their own.
    max_retries: u32,
    ratio: f64,
    min_per_second: u32,
    consecutive: u32,
    base: Duration,
    max: Duration,
}

impl Settings {
    pub(crate) fn from_limits(l: &Limits) -> Settings {
        Settings {
            max_retries: l.max_retries,
            ratio: l.retry_budget_ratio,
            min_per_second: l.retry_budget_min_per_second,
            consecutive: l.outlier_consecutive_failures,
            base: l.outlier_base_ejection,
            max: l.outlier_max_ejection,
        }
    }
}

/// The settings in force, which a reload changes in place: every
/// service's health reads them as it decides, so that a new retry budget
/// or ejection rule applies at once, with the counts and ejections so far
/// kept. Each an atomic of its own: a decision that reads some before a
/// reload and some after acts on values that are each valid.
#[derive(Debug)]
struct Live {
    max_retries: AtomicU32,
    ratio: AtomicU64,
    min_per_second: AtomicU32,
    consecutive: AtomicU32,
    base_nanos: AtomicU64,
    max_nanos: AtomicU64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Live {
    fn new(settings: Settings) -> Live {
        let live = Live {
            max_retries: AtomicU32::new(0),
            ratio: AtomicU64::new(0),
            min_per_second: AtomicU32::new(0),
            consecutive: AtomicU32::new(0),
            base_nanos: AtomicU64::new(0),
            max_nanos: AtomicU64::new(0),
        };
        live.set(settings);
        live
    }

    fn set(&self, s: Settings) {
        self.max_retries.store(s.max_retries, Ordering::Relaxed);
        self.ratio.store(s.ratio.to_bits(), Ordering::Relaxed);
        self.min_per_second
            .store(s.min_per_second, Ordering::Relaxed);
        self.consecutive.store(s.consecutive, Ordering::Relaxed);
        self.base_nanos.store(nanos(s.base), Ordering::Relaxed);
        self.max_nanos.store(nanos(s.max), Ordering::Relaxed);
    }

    fn get(&self) -> Settings {
        Settings {
            max_retries: self.max_retries.load(Ordering::Relaxed),
            ratio: f64::from_bits(self.ratio.load(Ordering::Relaxed)),
            min_per_second: self.min_per_second.load(Ordering::Relaxed),
            consecutive: self.consecutive.load(Ordering::Relaxed),
            base: Duration::from_nanos(self.base_nanos.load(Ordering::Relaxed)),
            max: Duration::from_nanos(self.max_nanos.load(Ordering::Relaxed)),
        }
    }
}

/// Every service's health, created on first use.
pub(crate) struct Resilience {
    settings: Arc<Live>,
    epoch: Instant,
    /// foldhash: service names come from the manifest, not from clients.
    services: RwLock<HashMap<String, Arc<ServiceHealth>, foldhash::fast::RandomState>>,
}

impl std::fmt::Debug for Resilience {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resilience")
            .field("settings", &self.settings.get())
            .finish_non_exhaustive()
    }
}

impl Resilience {
    pub(crate) fn new(settings: Settings) -> Resilience {
        Resilience {
            settings: Arc::new(Live::new(settings)),
            epoch: Instant::now(),
            services: RwLock::new(HashMap::default()),
        }
    }

    /// Puts `settings` in force for every service (a reload), from its
    /// next decision on; what each has counted and ejected so far stays.
    pub(crate) fn update(&self, settings: Settings) {
        self.settings.set(settings);
    }

    /// Retries per request, for a route that sets none of its own.
    pub(crate) fn max_retries(&self) -> u32 {
        self.settings.max_retries.load(Ordering::Relaxed)
    }

    pub(crate) fn service(&self, name: &str) -> Arc<ServiceHealth> {
        if let Some(s) = self
            .services
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Arc::clone(s);
        }
        let mut services = self.services.write().unwrap_or_else(|e| e.into_inner());
        Arc::clone(services.entry(name.to_string()).or_insert_with(|| {
            Arc::new(ServiceHealth {
                name: name.to_string(),
                settings: Arc::clone(&self.settings),
                epoch: self.epoch,
                budget: Mutex::new(Budget::default()),
                instances: Mutex::new(HashMap::new()),
                tracked: AtomicUsize::new(0),
                budget_exhausted: stats::LazyCounter::retry_budget_exhausted(name),
            })
        }))
    }
}

#[derive(Debug, Default)]
struct Budget {
    second: u64,
    requests: u64,
    retries: u64,
    previous_requests: u64,
}

impl Budget {
    /// Moves the budget on to `second`, and only ever forward: readings
    /// come from the workers' polls (`clock::now`), each as old as its
    /// poll, so one from the second before can reach the lock after
    /// another worker has moved on. Rolled back, it would wipe both
    /// seconds' counts (the rate the budget allows, and the retries taken
    /// against it); it is counted in the current second instead.
    fn roll(&mut self, second: u64) {
        if second > self.second {
            self.previous_requests = if second == self.second + 1 {
                self.requests
            } else {
                0
            };
            self.second = second;
            self.requests = 0;
            self.retries = 0;
        }
    }
}

/// An instance's record, for the process at `addr`: an instance id is
/// given again to the process that replaces a crashed one (at another
/// address), which starts with a clean record rather than its
/// predecessor's ejection.
#[derive(Debug)]
struct InstanceState {
    addr: SocketAddr,
    consecutive: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl InstanceState {
    fn new(addr: SocketAddr) -> InstanceState {
        InstanceState {
            addr,
            consecutive: 0,
            ejections: 0,
            ejected_until: None,
        }
    }

    /// Whether `e`'s process is out at `now`.
    fn ejects(&self, e: &Endpoint, now: Instant) -> bool {
        self.addr == e.addr && self.ejected_until.is_some_and(|until| until > now)
    }
}

/// One service's health, remembered where it is asked for on every
/// request (a route, whose service never changes): [`Resilience::service`]
/// takes a lock shared by every worker and clones a shared `Arc`, where a
/// memo is a plain read. It holds the health in one `Resilience`, the first
/// that asks; any other gets its own the long way (a route table belongs
/// to one gateway, so that does not happen outside tests). The `Weak`
/// keeps that `Resilience`'s allocation, so no other can take its address.
#[derive(Default)]
pub(crate) struct HealthMemo(OnceLock<(Weak<Resilience>, Arc<ServiceHealth>)>);

impl std::fmt::Debug for HealthMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HealthMemo")
    }
}

impl HealthMemo {
    /// The health of `service` in `resilience`.
    pub(crate) fn get<'a>(
        &'a self,
        resilience: &Arc<Resilience>,
        service: &str,
    ) -> Cow<'a, Arc<ServiceHealth>> {
        let (owner, health) = self
            .0
            .get_or_init(|| (Arc::downgrade(resilience), resilience.service(service)));
        if std::ptr::eq(owner.as_ptr(), Arc::as_ptr(resilience)) {
            Cow::Borrowed(health)
        } else {
            Cow::Owned(resilience.service(service))
        }
    }
}

pub(crate) struct ServiceHealth {
    name: String,
    settings: Arc<Live>,
    epoch: Instant,
    budget: Mutex<Budget>,
    instances: Mutex<HashMap<String, InstanceState>>,
    /// Entries in `instances`: lets the common all-healthy case skip the lock.
    tracked: AtomicUsize,
    budget_exhausted: stats::LazyCounter,
}

impl ServiceHealth {
    fn second(&self) -> u64 {
        crate::clock::now()
            .saturating_duration_since(self.epoch)
            .as_secs()
    }

    /// Counts a request towards the budget.
    pub(crate) fn request(&self) {
        let second = self.second();
        let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        b.roll(second);
        b.requests += 1;
    }

    /// Takes one retry from the budget, if there is one left.
    pub(crate) fn try_retry(&self) -> bool {
        let second = self.second();
        let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        b.roll(second);
        let rate = b.requests.max(b.previous_requests) as f64;
        let settings = self.settings.get();
        let allowed = (rate * settings.ratio).max(f64::from(settings.min_per_second));
        if (b.retries as f64) < allowed {
            b.retries += 1;
            true
        } else {
            self.budget_exhausted.increment();
            false
        }
    }

    pub(crate) fn is_ejected(&self, e: &Endpoint) -> bool {
        if self.tracked.load(Ordering::Acquire) == 0 {
            return false;
        }
        let now = crate::clock::now();
        let instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        instances.get(&e.instance).is_some_and(|s| s.ejects(e, now))
    }

    pub(crate) fn success(&self, e: &Endpoint) {
        if self.tracked.load(Ordering::Acquire) == 0 {
            return;
        }
        let now = crate::clock::now();
        let max = self.settings.get().max;
        let mut instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        let forget = match instances.get_mut(&e.instance) {
            // Another process's record: this one starts clean.
            Some(s) if s.addr != e.addr => true,
            Some(s) => {
                s.consecutive = 0;
                // Back in for `max` since its last ejection ended: forgiven.
                let forgiven = s.ejected_until.is_none_or(|until| now >= until + max);
                if forgiven {
                    s.ejections = 0;
                    s.ejected_until = None;
                }
                forgiven
            }
            None => false,
        };
        if forget {
            instances.remove(&e.instance);
            self.tracked.store(instances.len(), Ordering::Release);
        }
    }

    /// Records a failure of `e`; `ready` is the service's instances now
    /// (so that the last one standing is never ejected).
    pub(crate) fn failure(&self, e: &Endpoint, ready: &[Endpoint]) {
        let now = crate::clock::now();
        let settings = self.settings.get();
        let mut instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        // Records of processes no longer ready (scaled down, replaced, or
        // out of rotation a while) go once they hold nothing that would
        // still count, their ejections forgiven: they would only keep
        // every pick taking this lock. One that is merely unready for a
        // moment keeps its count of ejections.
        instances.retain(|id, s| {
            id == &e.instance
                || ready.iter().any(|r| &r.instance == id && r.addr == s.addr)
                || s.ejected_until
                    .is_some_and(|until| now < until + settings.max)
        });
        let state = instances
            .entry(e.instance.clone())
            .or_insert_with(|| InstanceState::new(e.addr));
        if state.addr != e.addr {
            *state = InstanceState::new(e.addr);
        }
        if state.ejects(e, now) {
            // Already out; failures of requests sent before do not extend it.
            self.tracked.store(instances.len(), Ordering::Release);
            return;
        }
        state.consecutive += 1;
        if state.consecutive < settings.consecutive {
            self.tracked.store(instances.len(), Ordering::Release);
            return;
        }
        let others_in = ready.iter().any(|r| {
            r.instance != e.instance && instances.get(&r.instance).is_none_or(|s| !s.ejects(r, now))
        });
        self.tracked.store(instances.len(), Ordering::Release);
        let Some(state) = instances.get_mut(&e.instance) else {
            return;
        };
        if !others_in {
            tracing::debug!(target: "flotilla::gateway", service = %self.name, instance = %e.instance, "not ejecting the last instance in rotation");
            return;
        }
        if state
            .ejected_until
            .is_some_and(|until| now >= until + settings.max)
        {
            state.ejections = 0;
        }
        state.ejections += 1;
        state.consecutive = 0;
        let duration = settings
            .base
            .saturating_mul(state.ejections)
            .min(settings.max);
        state.ejected_until = Some(now + duration);
        stats::ejected(&self.name);
        tracing::warn!(
            target: "flotilla::gateway",
            service = %self.name,
            instance = %e.instance,
            ejections = state.ejections,
            for_ = ?duration,
            "instance ejected after consecutive failures"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Load;
    use std::net::SocketAddr;

    fn settings() -> Settings {
        Settings::from_limits(&Limits::default())
    }

    fn endpoint(name: &str) -> Endpoint {
        Endpoint {
            instance: name.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            load: Arc::new(Load::default()),
        }
    }

    #[test]
    fn a_memo_gives_its_own_resilience_s_health_and_any_other_its_own() {
        let memo = HealthMemo::default();
        let first = Arc::new(Resilience::new(settings()));
        let second = Arc::new(Resilience::new(settings()));
        let health = memo.get(&first, "svc");
        assert!(matches!(health, Cow::Borrowed(_)));
        assert!(Arc::ptr_eq(&health, &first.service("svc")));
        // Another gateway's proxy asking through the same route: its own
        // health, not the first one's.
        let other = memo.get(&second, "svc");
        assert!(matches!(other, Cow::Owned(_)));
        assert!(Arc::ptr_eq(&other, &second.service("svc")));
        assert!(!Arc::ptr_eq(&other, &health));
        // The state is the service's: what one request records, the next
        // sees through the memo.
        for _ in 0..100 {
            memo.get(&first, "svc").request();
        }
        let granted = (0..50).filter(|_| first.service("svc").try_retry()).count();
        assert_eq!(granted, 20);
    }

    #[test]
    fn budget_has_a_floor_and_a_ratio() {
        let r = Resilience::new(settings());
        let s = r.service("svc");
        // Floor: 3 retries with no traffic.
        assert!(s.try_retry() && s.try_retry() && s.try_retry());
        assert!(!s.try_retry());
        let s = r.service("busy");
        for _ in 0..100 {
            s.request();
        }
        let granted = (0..50).filter(|_| s.try_retry()).count();
        assert_eq!(granted, 20);
    }

    #[test]
    fn a_reading_from_the_second_before_does_not_roll_the_budget_back() {
        let mut b = Budget::default();
        b.roll(7);
        b.requests = 100;
        b.retries = 20;
        b.roll(8);
        b.requests = 40;
        b.retries = 5;
        // A late reading of second 7, after another worker moved on to 8.
        b.roll(7);
        assert_eq!(
            (b.second, b.requests, b.retries, b.previous_requests),
            (8, 40, 5, 100)
        );
        b.roll(9);
        assert_eq!((b.second, b.requests, b.previous_requests), (9, 0, 40));
    }

    #[tokio::test(start_paused = true)]
    async fn five_failures_eject_with_growing_durations_but_never_the_last() {
        let r = Resilience::new(settings());
        let s = r.service("svc");
        let ready = [endpoint("a"), endpoint("b")];
        for _ in 0..4 {
            s.failure(&ready[0], &ready);
        }
        assert!(!s.is_ejected(&ready[0]));
        s.failure(&ready[0], &ready);
        assert!(s.is_ejected(&ready[0]));
        // b fails too, but a is out: b stays in.
        for _ in 0..10 {
            s.failure(&ready[1], &ready);
        }
        assert!(!s.is_ejected(&ready[1]));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(!s.is_ejected(&ready[0]));
        for _ in 0..5 {
            s.failure(&ready[0], &ready);
        }
        assert!(s.is_ejected(&ready[0]));
        // Second ejection: 60 s.
        tokio::time::advance(Duration::from_secs(45)).await;
        assert!(s.is_ejected(&ready[0]));
        tokio::time::advance(Duration::from_secs(16)).await;
        assert!(!s.is_ejected(&ready[0]));
    }

    #[tokio::test(start_paused = true)]
    async fn new_settings_apply_to_every_service_at_once_and_its_state_stays() {
        let r = Resilience::new(settings());
        let s = r.service("svc");
        let ready = [endpoint("a"), endpoint("b")];
        for _ in 0..3 {
            s.failure(&ready[0], &ready);
        }
        assert!(!s.is_ejected(&ready[0]));
        assert!(s.try_retry(), "the floor of 3 a second");
        r.update(Settings {
            max_retries: 0,
            ratio: 0.0,
            min_per_second: 1,
            consecutive: 4,
            base: Duration::from_secs(2),
            max: Duration::from_secs(2),
        });
        assert_eq!(r.max_retries(), 0);
        // The retry taken counts against the new floor of one.
        assert!(!s.try_retry());
        // The fourth failure, with the three before it, under the new rule.
        s.failure(&ready[0], &ready);
        assert!(s.is_ejected(&ready[0]));
        tokio::time::advance(Duration::from_millis(2100)).await;
        assert!(!s.is_ejected(&ready[0]), "ejected for the new base of 2 s");
        // A service first asked about after the reload has them too.
        assert_eq!(r.service("later").settings.get(), r.settings.get());
    }

    #[tokio::test(start_paused = true)]
    async fn a_replaced_process_starts_clean_and_gone_ones_are_forgotten() {
        let r = Resilience::new(settings());
        let s = r.service("svc");
        let ready = [endpoint("a"), endpoint("b"), endpoint("c")];
        for _ in 0..5 {
            s.failure(&ready[0], &ready);
        }
        assert!(s.is_ejected(&ready[0]));
        // `a` crashed; the process that replaces it has its id, at another
        // address: not the one ejected.
        let again = Endpoint {
            addr: SocketAddr::from(([127, 0, 0, 1], 2)),
            ..endpoint("a")
        };
        assert!(!s.is_ejected(&again));
        let ready = [again, endpoint("b"), endpoint("c")];
        // Its first failure counts from one, not from the old record.
        for _ in 0..4 {
            s.failure(&ready[0], &ready);
        }
        assert!(!s.is_ejected(&ready[0]));
        // `c` is scaled away; a failure elsewhere drops its record.
        s.failure(&ready[2], &ready);
        let c = ready[2].clone();
        let ready = [ready[0].clone(), endpoint("b")];
        s.failure(&ready[1], &ready);
        assert_eq!(s.tracked.load(Ordering::Acquire), 2, "a and b");
        // An ejected one out of the ready list a moment keeps its record
        // (and its count of ejections) until that would be forgiven.
        let ready = [ready[0].clone(), endpoint("b"), c];
        for _ in 0..5 {
            s.failure(&ready[2], &ready);
        }
        assert!(s.is_ejected(&ready[2]));
        let without_c = [ready[0].clone(), endpoint("b")];
        s.failure(&without_c[1], &without_c);
        assert!(s.is_ejected(&ready[2]), "kept while unready");
        tokio::time::advance(Duration::from_secs(30 + 300)).await;
        s.failure(&without_c[1], &without_c);
        assert!(
            !s.instances.lock().unwrap().contains_key("c"),
            "forgiven, then forgotten"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn success_resets_the_streak() {
        let r = Resilience::new(settings());
        let s = r.service("svc");
        let ready = [endpoint("a"), endpoint("b")];
        for _ in 0..4 {
            s.failure(&ready[0], &ready);
        }
        s.success(&ready[0]);
        for _ in 0..4 {
            s.failure(&ready[0], &ready);
        }
        assert!(!s.is_ejected(&ready[0]));
        s.success(&ready[0]);
        assert_eq!(s.tracked.load(Ordering::Acquire), 0);
    }
}
