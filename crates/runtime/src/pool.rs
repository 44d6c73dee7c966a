//! The instances of one service: each instance is a *slot* with its own
//! supervisor task that starts the process, waits for `/readyz`, keeps
//! probing it, and restarts the process with exponential backoff when it
//! dies. The pool publishes its ready instances as an immutable snapshot the
//! gateway and the service address read without locking each other out, and
//! a scaler adds or removes slots from the observed load.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use flotilla_gateway::upstream::{ActivateError, Endpoint, Load};
use flotilla_manifest::{Service, Shape};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::console::Console;
use crate::mesh::Mesh;
use crate::process::{Launch, Proc};

/// Consecutive failed starts after which a service is reported as crash-looping.
const CRASH_LOOP_AFTER: u32 = 5;
/// An instance that stayed up this long had a fresh start: its next crash
/// restarts quickly again instead of continuing the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often a ready instance's `/readyz` is checked again.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Consecutive failed probes that take a ready instance out of rotation.
const PROBE_FAILURES: u32 = 3;
/// How often the scaler looks at load. Short, because a function's scale-up
/// from zero does not wait for it (activation starts an instance directly).
const SCALE_EVERY: Duration = Duration::from_millis(200);

/// The state of one instance, as `flotilla status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    Starting,
    Ready,
    /// Running but failing its readiness probe: out of rotation.
    Unready,
    /// Waiting to restart after a crash.
    Backoff,
    Stopping,
}

/// One instance in a status report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceStatus {
    pub id: String,
    pub state: InstanceState,
    pub pid: Option<u32>,
    pub address: Option<String>,
    /// Times this instance was restarted after exiting or failing readiness.
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub in_flight: u32,
    pub uptime_ms: Option<u64>,
}

/// One service in a status report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceStatus {
    pub name: String,
    pub shape: String,
    /// Stable service address handed to callers.
    pub address: String,
    pub min: u32,
    pub max: u32,
    pub ready: usize,
    pub restarts: u64,
    pub crash_loop: bool,
    pub last_error: Option<String>,
    pub instances: Vec<InstanceStatus>,
}

/// The whole system's status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub system: String,
    pub gateway: String,
    pub services: Vec<ServiceStatus>,
    /// How the edits of the manifest (and the files it names) went while
    /// the system watched it; all zero when it does not watch.
    #[serde(default)]
    pub reloads: ReloadStatus,
}

/// The manifest watcher's reloads since the system started.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReloadStatus {
    /// Changes applied.
    pub applied: u64,
    /// Changes refused (an invalid file, or one that needs a restart): the
    /// running configuration stayed.
    pub refused: u64,
    /// Why the latest change was refused, while no change was applied
    /// since: the running configuration is not what the files say.
    pub last_refusal: Option<String>,
}

/// Everything a pool needs from the system around it.
pub(crate) struct PoolEnv {
    pub system: String,
    pub data_dir: PathBuf,
    pub console: Arc<Console>,
    /// Environment shared by all instances of this service (URLs, database…).
    pub env: Vec<(String, String)>,
    /// What to run, or why it cannot be run (a missing binary).
    pub launch: Result<Launch, String>,
    /// The stable service address.
    pub address: SocketAddr,
    /// Issues each instance's identity and ACL.
    pub mesh: Arc<Mesh>,
    /// Reaches `/readyz` over mTLS as the runtime.
    pub prober: Prober,
}

struct Slot {
    status: InstanceStatus,
    started: Option<Instant>,
    stop: watch::Sender<bool>,
    /// The endpoint while the instance is in rotation.
    endpoint: Option<Endpoint>,
    /// Its requests in flight, from its first ready to the end of its run:
    /// kept apart from `endpoint` because an instance taken out of
    /// rotation still finishes the requests it was given, and the scaler
    /// must see them (it is not stopped under them).
    load: Option<Arc<Load>>,
    /// Since when it has been out of rotation for failing `/readyz`.
    unready_since: Option<Instant>,
    /// Its last run ended before it was ready (it exited at start, or
    /// never answered `/readyz`): a request does not wait for it to start
    /// again (see `Pool::worth_waiting`).
    start_failed: bool,
    /// Its runs that failed in a row: starts that never became ready and
    /// runs that ended before [`STABLE_AFTER`]. Back to 0 once a run has
    /// lasted that long, not as soon as it is ready: a program that
    /// crashes a second after each start is a crash loop too.
    failures: u32,
}

#[derive(Default)]
struct PoolState {
    slots: BTreeMap<u32, Slot>,
    restarts: u64,
    last_error: Option<String>,
    /// Bumped for every recorded error, so waiters can tell a new one.
    error_seq: u64,
    shutting_down: bool,
}

pub(crate) struct Pool {
    pub spec: Service,
    env: PoolEnv,
    state: Mutex<PoolState>,
    ready: RwLock<Arc<[Endpoint]>>,
    /// Bumped on every change; activation waiters and the endpoints writer
    /// watch it.
    changes: watch::Sender<u64>,
    change_seq: AtomicU64,
}

/// Locks a mutex even if a panicking thread poisoned it: the state is plain
/// data that every writer leaves consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    pub(crate) fn new(spec: Service, env: PoolEnv) -> Arc<Pool> {
        let (changes, _) = watch::channel(0);
        Arc::new(Pool {
            spec,
            env,
            state: Mutex::new(PoolState::default()),
            ready: RwLock::new(Arc::from(Vec::new())),
            changes,
            change_seq: AtomicU64::new(0),
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.spec.name
    }

    pub(crate) fn address(&self) -> SocketAddr {
        self.env.address
    }

    /// A receiver that changes whenever any instance changes state.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        let seq = self.change_seq.fetch_add(1, Ordering::AcqRel) + 1;
        self.changes.send_replace(seq);
    }

    /// Ready instances (the gateway's and the service address's view).
    pub(crate) fn ready(&self) -> Arc<[Endpoint]> {
        Arc::clone(&self.ready.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn publish_ready(&self, state: &PoolState) {
        let ready: Vec<Endpoint> = state
            .slots
            .values()
            .filter_map(|s| s.endpoint.clone())
            .collect();
        *self.ready.write().unwrap_or_else(|e| e.into_inner()) = Arc::from(ready);
    }

    /// Instances running or on their way (not stopping).
    fn running(state: &PoolState) -> u32 {
        state
            .slots
            .values()
            .filter(|s| s.status.state != InstanceState::Stopping)
            .count() as u32
    }

    /// Instances that take new requests, now or once ready: running, less
    /// a function's instances out of rotation that still finish the
    /// requests they were given (it is replaced, and a new one starting
    /// beside them is what a waiting request needs). A service's count:
    /// one out of rotation is not replaced (a dependency it needs may be
    /// down, and another would fail the same); a request that finds no
    /// other ready or starting is refused (`worth_waiting`). One
    /// restarting (its load reset) counts: it is on its way.
    fn taking(&self, state: &PoolState) -> u32 {
        let function = self.spec.shape == Shape::Function;
        state
            .slots
            .values()
            .filter(|s| s.status.state != InstanceState::Stopping)
            .filter(|s| {
                !function
                    || s.status.state != InstanceState::Unready
                    || s.load.as_ref().is_none_or(|l| l.in_flight() == 0)
            })
            .count() as u32
    }

    /// Starts slots until `count` take new requests, bounded by `max`
    /// running: an instance that left rotation busy does not hold back the
    /// one a waiting request needs (it would wait out that instance's
    /// longest request).
    pub(crate) fn ensure_running(self: &Arc<Self>, count: u32) {
        let mut state = lock(&self.state);
        if state.shutting_down {
            return;
        }
        let target = count.min(self.spec.scale.max);
        let room = |state: &PoolState| {
            self.taking(state) < target && Self::running(state) < self.spec.scale.max
        };
        if !room(&state) {
            // Nothing to start, and nothing to tell: `activate` calls this
            // on every change, and a change it caused would wake it again.
            return;
        }
        while room(&state) {
            let index = (0..).find(|i| !state.slots.contains_key(i)).unwrap_or(0);
            let id = format!("{}-{index}", self.spec.name);
            let (stop, stop_rx) = watch::channel(false);
            state.slots.insert(
                index,
                Slot {
                    status: InstanceStatus {
                        id: id.clone(),
                        state: InstanceState::Starting,
                        pid: None,
                        address: None,
                        restarts: 0,
                        last_exit: None,
                        in_flight: 0,
                        uptime_ms: None,
                    },
                    started: None,
                    stop,
                    endpoint: None,
                    load: None,
                    unready_since: None,
                    start_failed: false,
                    failures: 0,
                },
            );
            tokio::spawn(Arc::clone(self).supervise(index, id, stop_rx));
        }
        drop(state);
        self.changed();
    }

    /// Waits until at least one instance is ready, starting one if none is
    /// running; fails when an instance fails to start after this call, and
    /// at once for a service none of whose instances is on its way to
    /// ready (see `worth_waiting`).
    pub(crate) async fn activate(self: Arc<Self>) -> Result<(), ActivateError> {
        let mut changes = self.subscribe();
        let seen_errors = {
            let state = lock(&self.state);
            if state.shutting_down {
                return Err(ActivateError::ShuttingDown);
            }
            state.error_seq
        };
        if !self.ready().is_empty() {
            return Ok(());
        }
        loop {
            // Again on every change: the instance started for an earlier
            // request may have been stopped since (out of rotation).
            self.ensure_running(1);
            if !self.ready().is_empty() {
                return Ok(());
            }
            {
                let state = lock(&self.state);
                if state.shutting_down {
                    return Err(ActivateError::ShuttingDown);
                }
                if state.error_seq != seen_errors {
                    return Err(ActivateError::Unavailable {
                        service: self.spec.name.clone(),
                        reason: state.last_error.clone().unwrap_or_default(),
                    });
                }
                if let Err(reason) = self.worth_waiting(&state) {
                    return Err(ActivateError::Unavailable {
                        service: self.spec.name.clone(),
                        reason,
                    });
                }
            }
            if changes.changed().await.is_err() {
                return Err(ActivateError::ShuttingDown);
            }
        }
    }

    /// Whether a request, none of this pool's instances being ready, may
    /// wait for one; if not, why.
    ///
    /// A function's may: it is started from zero for the request. A
    /// service's may only while an instance is on its way to ready:
    /// starting for the first time, or again after a run in which it was
    /// ready (a crash). Instances out of rotation for failing `/readyz`,
    /// or whose last start failed (a crash loop, one never ready), may
    /// take any time, and a request held for them would only take an
    /// in-flight place until its timeout: it is answered 503 at once.
    fn worth_waiting(&self, state: &PoolState) -> Result<(), String> {
        if self.spec.shape == Shape::Function {
            return Ok(());
        }
        let coming = state.slots.values().any(|s| {
            matches!(
                s.status.state,
                InstanceState::Starting | InstanceState::Backoff
            ) && !s.start_failed
        });
        if coming {
            return Ok(());
        }
        let unready = state
            .slots
            .values()
            .filter(|s| s.status.state == InstanceState::Unready)
            .count();
        Err(match (unready, &state.last_error) {
            (1.., _) => "its instances are out of rotation, failing GET /readyz".into(),
            (0, Some(last)) => last.clone(),
            (0, None) => "none is starting".into(),
        })
    }

    fn record_error(&self, message: String) {
        self.env.console.warn(&message);
        let mut state = lock(&self.state);
        state.last_error = Some(message);
        state.error_seq += 1;
    }

    fn update(&self, index: u32, f: impl FnOnce(&mut Slot)) {
        let mut state = lock(&self.state);
        if let Some(slot) = state.slots.get_mut(&index) {
            f(slot);
        }
        self.publish_ready(&state);
        drop(state);
        self.changed();
    }

    /// The supervisor of one slot: start, wait ready, watch, restart.
    async fn supervise(self: Arc<Self>, index: u32, id: String, mut stop: watch::Receiver<bool>) {
        let log_file = self.env.data_dir.join("logs").join(format!("{id}.log"));
        loop {
            if *stop.borrow() {
                break;
            }
            let start_failed;
            let outcome = self.run_once(index, &id, &log_file, &mut stop).await;
            let failed = match outcome {
                Outcome::Stopped => break,
                Outcome::Failed {
                    message,
                    stable,
                    was_ready,
                } => {
                    start_failed = !was_ready;
                    self.record_error(message);
                    let mut state = lock(&self.state);
                    state.restarts += 1;
                    let Some(slot) = state.slots.get_mut(&index) else {
                        break;
                    };
                    slot.failures = if stable { 1 } else { slot.failures + 1 };
                    let n = slot.failures;
                    if n == CRASH_LOOP_AFTER {
                        drop(state);
                        self.env.console.warn(&format!(
                            "{}: crash loop ({n} failed runs in a row: starts that never became ready or runs shorter than 10 s); still retrying with backoff up to {}s. Logs: {}",
                            self.spec.name,
                            BACKOFF_MAX.as_secs(),
                            log_file.display()
                        ));
                    }
                    n
                }
            };
            self.update(index, |slot| {
                slot.status.state = InstanceState::Backoff;
                slot.status.restarts += 1;
                slot.status.pid = None;
                slot.endpoint = None;
                slot.load = None;
                slot.unready_since = None;
                slot.start_failed = start_failed;
            });
            let backoff = backoff(failed);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => break,
            }
        }
        let mut state = lock(&self.state);
        state.slots.remove(&index);
        self.publish_ready(&state);
        drop(state);
        self.changed();
    }

    async fn run_once(
        &self,
        index: u32,
        id: &str,
        log_file: &std::path::Path,
        stop: &mut watch::Receiver<bool>,
    ) -> Outcome {
        let launch = match &self.env.launch {
            Ok(l) => l.clone(),
            Err(why) => {
                return Outcome::Failed {
                    message: why.clone(),
                    stable: false,
                    was_ready: false,
                };
            }
        };
        let port = match free_port() {
            Ok(p) => p,
            Err(e) => {
                return Outcome::Failed {
                    message: format!("{id}: no free port on 127.0.0.1: {e}"),
                    stable: false,
                    was_ready: false,
                };
            }
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // A fresh certificate per start; renewed while this run lasts.
        let (mesh_env, _renewal) = match self.env.mesh.prepare_instance(&self.spec.name, id).await {
            Ok(prepared) => prepared,
            Err(e) => {
                return Outcome::Failed {
                    message: format!(
                        "{id}: cannot issue its identity: {}",
                        flotilla_mesh::tls::error_chain(&e)
                    ),
                    stable: false,
                    was_ready: false,
                };
            }
        };
        let mut env = self.instance_env(id, addr);
        env.extend(mesh_env);
        let started = Instant::now();
        self.update(index, |slot| {
            slot.status.state = InstanceState::Starting;
            slot.status.address = Some(addr.to_string());
            slot.started = Some(started);
        });
        let mut proc = match Proc::spawn(&launch, &env, id, log_file, Arc::clone(&self.env.console))
            .await
        {
            Ok(p) => p,
            Err(e) => {
                return Outcome::Failed {
                    message: format!(
                        "{id}: cannot start `{}`: {e}; check `run` for service `{}` in the manifest",
                        launch.program.display(),
                        self.spec.name
                    ),
                    stable: false,
                    was_ready: false,
                };
            }
        };
        let pid = proc.pid();
        self.update(index, |slot| slot.status.pid = Some(pid));

        let ready = tokio::select! {
            r = wait_ready(addr, self.spec.ready_timeout, &self.env.prober) => r,
            status = proc.wait() => {
                let how = describe_exit(status);
                return Outcome::Failed {
                    message: format!("{id}: exited during start ({how}); last output:\n{}", last_lines(log_file, 8)),
                    stable: false,
                    was_ready: false,
                };
            }
            _ = stop.changed() => {
                self.update(index, |slot| slot.status.state = InstanceState::Stopping);
                let _ = proc.stop(self.spec.drain).await;
                return Outcome::Stopped;
            }
        };
        if let Err(last) = ready {
            let _ = proc.stop(self.spec.drain).await;
            // Answered with a status: it speaks mTLS, it just is not ready.
            let hint = if last.starts_with("status ") {
                ""
            } else {
                "; a service must serve mutual TLS with FLOTILLA_TLS_* (docs/runtime-contract.md)"
            };
            return Outcome::Failed {
                message: format!(
                    "{id}: not ready after {:?} (GET /readyz on {addr} over mTLS never answered 200; last attempt: {last}); restarting. Raise `ready_timeout` if it needs longer{hint}",
                    self.spec.ready_timeout
                ),
                stable: false,
                was_ready: false,
            };
        }
        let load = Arc::new(Load::default());
        let endpoint = Endpoint {
            instance: id.to_string(),
            addr,
            load: Arc::clone(&load),
        };
        self.update(index, |slot| {
            slot.status.state = InstanceState::Ready;
            slot.endpoint = Some(endpoint.clone());
            slot.load = Some(load);
            slot.start_failed = false;
        });
        self.env.console.event(&format!(
            "{id} ready on {addr} (pid {pid}) in {} ms",
            started.elapsed().as_millis()
        ));

        // Watch the running instance until it exits or is told to stop.
        let mut failed_probes = 0u32;
        // Since when it has failed both probes: a hung process (a deadlock,
        // a busy loop) neither crashes nor recovers, and is restarted
        // after `liveness_timeout`, as Kubernetes' liveness probe does. A
        // ready instance is alive: `/healthz` is asked only while
        // `/readyz` fails, so a healthy system pays nothing for it.
        let mut dead_since: Option<Instant> = None;
        // Whether this run has lasted `STABLE_AFTER`, its slot's failures
        // forgotten.
        let mut stable = false;
        // A probe every `PROBE_EVERY` however long the last one took, and
        // inside the `select!`: an exit or a stop is seen while a probe of a
        // hung instance waits out its timeout.
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + PROBE_EVERY, PROBE_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // `/healthz` beside `/readyz` once `/readyz` has failed, at once,
            // so that a hung instance's probes take one timeout, not two.
            let ask_alive = failed_probes > 0;
            let prober = &self.env.prober;
            let check = async {
                ticker.tick().await;
                if ask_alive {
                    let (ready, alive) = tokio::join!(probe(addr, prober), alive(addr, prober));
                    (ready, Some(alive))
                } else {
                    (probe(addr, prober).await, None)
                }
            };
            tokio::select! {
                status = proc.wait() => {
                    let how = describe_exit(status);
                    let exit = how.clone();
                    self.update(index, |slot| {
                        slot.endpoint = None;
                        slot.load = None;
                        slot.status.last_exit = Some(exit);
                    });
                    return Outcome::Failed {
                        message: format!("{id}: exited ({how}) after {:?}; restarting", started.elapsed()),
                        stable: started.elapsed() >= STABLE_AFTER,
                        was_ready: true,
                    };
                }
                _ = stop.changed() => {
                    self.update(index, |slot| {
                        slot.status.state = InstanceState::Stopping;
                        slot.endpoint = None;
                    });
                    let _ = proc.stop(self.spec.drain).await;
                    return Outcome::Stopped;
                }
                (ready, alive) = check => {
                    if !stable && started.elapsed() >= STABLE_AFTER {
                        stable = true;
                        self.update(index, |slot| slot.failures = 0);
                    }
                    let ok = ready == Ok(200);
                    // Not when the scaler took it out to stop it meanwhile.
                    if ok && failed_probes >= PROBE_FAILURES && !*stop.borrow() {
                        self.env.console.event(&format!("{id} ready again"));
                        let ep = endpoint.clone();
                        self.update(index, |slot| {
                            // Under the lock the scaler takes it out under.
                            if slot.status.state != InstanceState::Stopping {
                                slot.status.state = InstanceState::Ready;
                                slot.endpoint = Some(ep);
                                slot.unready_since = None;
                            }
                        });
                    }
                    failed_probes = if ok { 0 } else { failed_probes + 1 };
                    match (ok, alive) {
                        // `/healthz` not asked yet (the first failure):
                        // nothing known.
                        (false, None) => {}
                        (true, _) | (false, Some(Ok(()))) => dead_since = None,
                        (false, Some(Err(why))) => {
                            let since = *dead_since.get_or_insert_with(Instant::now);
                            if since.elapsed() >= self.spec.liveness_timeout {
                                // Not `Stopping`: it is being replaced, and
                                // a slot stopping is not counted as running,
                                // so a request meanwhile would start another
                                // instance beside it past `max` (within it,
                                // a function's may, see `taking`).
                                self.update(index, |slot| {
                                    slot.status.state = InstanceState::Unready;
                                    slot.endpoint = None;
                                    slot.unready_since.get_or_insert_with(Instant::now);
                                });
                                let _ = proc.stop(self.spec.drain).await;
                                return Outcome::Failed {
                                    message: format!(
                                        "{id}: hung: GET /readyz and GET /healthz failing for {:?} (last /healthz: {why}); restarting. Raise `liveness_timeout` if it may be busy that long",
                                        self.spec.liveness_timeout
                                    ),
                                    stable: started.elapsed() >= STABLE_AFTER,
                                    was_ready: true,
                                };
                            }
                        }
                    }
                    if failed_probes == PROBE_FAILURES && !*stop.borrow() {
                        self.env.console.warn(&format!("{id}: /readyz failing; out of rotation until it recovers"));
                        self.update(index, |slot| {
                            if slot.status.state != InstanceState::Stopping {
                                slot.status.state = InstanceState::Unready;
                                slot.unready_since.get_or_insert_with(Instant::now);
                            }
                            slot.endpoint = None;
                        });
                    }
                }
            }
        }
    }

    fn instance_env(&self, id: &str, addr: SocketAddr) -> Vec<(String, String)> {
        let mut env = self.env.env.clone();
        env.extend([
            ("FLOTILLA_INSTANCE".into(), id.to_string()),
            ("FLOTILLA_LISTEN".into(), addr.to_string()),
            ("PORT".into(), addr.port().to_string()),
            (
                "OTEL_RESOURCE_ATTRIBUTES".into(),
                format!(
                    "service.instance.id={id},flotilla.system={},deployment.environment=local",
                    self.env.system
                ),
            ),
        ]);
        env
    }

    /// Tells every slot to stop and waits until all have.
    pub(crate) async fn shutdown(&self) {
        let mut changes = self.subscribe();
        {
            let mut state = lock(&self.state);
            state.shutting_down = true;
            for slot in state.slots.values() {
                let _ = slot.stop.send(true);
            }
        }
        self.changed();
        loop {
            if lock(&self.state).slots.is_empty() {
                return;
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Keeps instances between `min` and `max` from the observed load:
    /// adds them as soon as the load exceeds what those running take, and
    /// stops one at a time above `min` while the load of the last `idle`
    /// would have fitted in one fewer (or one has been idle for `idle`).
    pub(crate) async fn scale_loop(self: Arc<Self>) {
        let scale = self.spec.scale;
        self.ensure_running(scale.min);
        if scale.min == scale.max && self.spec.shape == Shape::Service {
            return; // fixed replicas: supervisors alone keep the count.
        }
        let mut tick = tokio::time::interval(SCALE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // The pool's requests in flight at each tick of the last `idle`,
        // whose peak is the load an instance fewer must take. The pool's,
        // not each instance's: the balancer spreads light traffic over all
        // instances, so under a steady trickle none of them is ever idle
        // for long, though one or two could take it all (scaled up for a
        // spike, the pool would stay at `max`). As Kubernetes' HPA picks
        // the highest recommendation of its scale-down window.
        let mut samples: std::collections::VecDeque<(Instant, u32)> =
            std::collections::VecDeque::new();
        let sampling_since = Instant::now();
        loop {
            tick.tick().await;
            let stopping = {
                let mut state = lock(&self.state);
                if state.shutting_down {
                    return;
                }
                let running = Self::running(&state);
                // Out of rotation or not, an instance's requests are load:
                // one that left rotation busy still needs its place until
                // they are answered. Not a stopping one's: it is no longer
                // counted as running either.
                let in_flight: u32 = state
                    .slots
                    .values()
                    .filter(|s| s.status.state != InstanceState::Stopping)
                    .filter_map(|s| s.load.as_ref())
                    .map(|l| l.in_flight())
                    .sum();
                let now = Instant::now();
                samples.push_back((now, in_flight));
                while samples
                    .front()
                    .is_some_and(|(at, _)| now.duration_since(*at) > scale.idle)
                {
                    samples.pop_front();
                }
                // `None` until the scaler has watched for all of `idle`.
                let peak = (now.duration_since(sampling_since) >= scale.idle)
                    .then(|| samples.iter().map(|(_, n)| *n).max().unwrap_or(0));
                let wanted = in_flight.div_ceil(scale.concurrency.max(1));
                if wanted > running {
                    drop(state);
                    self.ensure_running(wanted.max(scale.min));
                    continue;
                }
                // One instance at a time, so a short lull does not tear
                // the whole pool down at once; and never below what the
                // load needs (requests already placed on one instance leave
                // the new ones idle while the load still wants them). One
                // out of rotation (failing /readyz) serves nothing and goes
                // first; a ready one only while more than that many are
                // ready (instances starting or backing off after a crash
                // serve nothing yet either).
                let keep = scale.min.max(wanted);
                let ready = state
                    .slots
                    .values()
                    .filter(|s| s.endpoint.is_some())
                    .count() as u32;
                // Not while it still has requests to answer (SIGTERM would
                // cut them), unless it has been out of rotation for
                // `ready_timeout`: as long as a start may take, and a
                // request held longer by an instance failing `/readyz` is
                // likely stuck with it.
                // `stuck_only`: only one that has held requests for all of
                // `ready_timeout`.
                let unready = |stuck_only: bool| {
                    state.slots.iter().find_map(|(i, s)| {
                        if s.status.state != InstanceState::Unready {
                            return None;
                        }
                        let in_flight = s.load.as_ref().map_or(0, |l| l.in_flight());
                        if in_flight == 0 {
                            return (!stuck_only).then(|| (*i, "out of rotation".to_string()));
                        }
                        let since = s.unready_since?;
                        (since.elapsed() >= self.spec.ready_timeout).then(|| {
                            (
                                *i,
                                format!(
                                    "out of rotation for {:?} with {in_flight} requests still in flight",
                                    self.spec.ready_timeout
                                ),
                            )
                        })
                    })
                };
                let idle = || {
                    state
                        .slots
                        .iter()
                        .filter_map(|(i, s)| Some((i, s.endpoint.as_ref()?)))
                        .filter(|(_, e)| e.load.in_flight() == 0)
                        .max_by_key(|(_, e)| e.load.idle_for())
                        .filter(|(_, e)| e.load.idle_for() >= scale.idle)
                        .map(|(i, _)| (*i, format!("idle for {:?}", scale.idle)))
                };
                // The load fitted in one instance fewer all along: the
                // least loaded goes, one with nothing in flight (SIGTERM
                // would cut what it has), the longest quiet of those. Not
                // the last instance: that one goes when idle (above), as
                // the load sampled here may miss a request between ticks.
                let not_needed = || {
                    let fewer = ready.checked_sub(1).filter(|n| *n > 0)?;
                    let peak =
                        peak.filter(|p| *p <= fewer.saturating_mul(scale.concurrency.max(1)))?;
                    state
                        .slots
                        .iter()
                        .filter_map(|(i, s)| Some((i, s.endpoint.as_ref()?)))
                        .filter(|(_, e)| e.load.in_flight() == 0)
                        .max_by_key(|(_, e)| e.load.idle_for())
                        .map(|(i, _)| {
                            (
                                *i,
                                format!(
                                    "not needed: at most {peak} requests in flight in the last {:?} fit in {fewer}",
                                    scale.idle
                                ),
                            )
                        })
                };
                // One out of rotation is stopped above `min` even when the
                // load wants it kept, since its own in-flight requests made
                // that load: a function's as soon as they are answered (it
                // takes no new requests; a request that finds none ready
                // starts another beside it, see `taking`); a service's, not
                // replaced while it may come back, only once it has held
                // them for all of `ready_timeout`.
                let victim = if running > keep {
                    unready(false).or_else(|| {
                        if ready > keep {
                            idle().or_else(not_needed)
                        } else {
                            None
                        }
                    })
                } else if running > scale.min {
                    unready(self.spec.shape == Shape::Service)
                } else {
                    None
                };
                // Out of rotation before it is told to stop, in the same
                // look at the pool that found it unused: a request that
                // comes now is not sent to an instance about to go.
                let stopping = victim.and_then(|(index, why)| {
                    let slot = state.slots.get_mut(&index)?;
                    slot.endpoint = None;
                    slot.status.state = InstanceState::Stopping;
                    Some((slot.status.id.clone(), slot.stop.clone(), why))
                });
                if stopping.is_some() {
                    self.publish_ready(&state);
                }
                stopping.map(|(id, stop, why)| (id, stop, why, running))
            };
            if let Some((id, stop, why, running)) = stopping {
                self.changed();
                self.env
                    .console
                    .event(&format!("{id} {why}; stopping ({} running)", running - 1));
                let _ = stop.send(true);
            }
        }
    }

    /// A status snapshot.
    pub(crate) fn status(&self) -> ServiceStatus {
        let state = lock(&self.state);
        let instances = state
            .slots
            .values()
            .map(|s| {
                let mut st = s.status.clone();
                // From the load, not the endpoint: an instance out of
                // rotation or stopping may still be finishing requests.
                st.in_flight = s.load.as_ref().map_or(0, |l| l.in_flight());
                st.uptime_ms = s.started.map(|t| t.elapsed().as_millis() as u64);
                st
            })
            .collect::<Vec<_>>();
        ServiceStatus {
            name: self.spec.name.clone(),
            shape: match self.spec.shape {
                Shape::Service => "service".into(),
                Shape::Function => "function".into(),
            },
            address: format!("https://{}", self.env.address),
            min: self.spec.scale.min,
            max: self.spec.scale.max,
            ready: instances
                .iter()
                .filter(|i| i.state == InstanceState::Ready)
                .count(),
            restarts: state.restarts,
            crash_loop: Self::failures_in_a_row(&state) >= CRASH_LOOP_AFTER,
            last_error: state.last_error.clone(),
            instances,
        }
    }

    /// Whether an instance is in a crash loop.
    pub(crate) fn crash_looping(&self) -> bool {
        Self::failures_in_a_row(&lock(&self.state)) >= CRASH_LOOP_AFTER
    }

    /// The most runs in a row that one of its instances failed.
    pub(crate) fn consecutive_failures(&self) -> u32 {
        Self::failures_in_a_row(&lock(&self.state))
    }

    fn failures_in_a_row(state: &PoolState) -> u32 {
        state.slots.values().map(|s| s.failures).max().unwrap_or(0)
    }
}

enum Outcome {
    Stopped,
    /// The process exited or could not be started; `was_ready`: after it
    /// had been ready in this run.
    Failed {
        message: String,
        stable: bool,
        was_ready: bool,
    },
}

fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let base = BACKOFF_FIRST.saturating_mul(1u32 << exp).min(BACKOFF_MAX);
    // Up to 20 % jitter so instances that crashed together do not restart in lockstep.
    let jitter = base.mul_f64(rand::random::<f64>() * 0.2);
    base + jitter
}

fn describe_exit(status: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => s.to_string(),
        },
        Err(e) => format!("unknown status: {e}"),
    }
}

/// The last `n` lines of an instance's log, from its last 64 KiB only (a
/// log may be tens of MiB), any bytes that are not UTF-8 replaced.
fn last_lines(path: &std::path::Path, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    const TAIL: u64 = 64 * 1024;
    let mut bytes = Vec::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let len = file.metadata().map_or(0, |m| m.len());
        let from = len.saturating_sub(TAIL);
        if file.seek(SeekFrom::Start(from)).is_ok() {
            let _ = file.take(TAIL).read_to_end(&mut bytes);
        }
        if from > 0 {
            // The first line read is likely a part of one.
            let start = bytes.iter().position(|b| *b == b'\n').map_or(0, |i| i + 1);
            bytes.drain(..start);
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(n)..];
    if tail.is_empty() {
        return "    (no output)".into();
    }
    tail.iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A port for an instance to bind, free now.
///
/// Picked at random from *below* the kernel's ephemeral range: every other
/// listener here (service addresses, gateways, control APIs — ours and other
/// systems') binds port 0 and so gets an ephemeral port, which can never be
/// the one an instance is about to bind. (Handing out an ephemeral port
/// instead let another system's service address take it in the gap before
/// the instance bound it, and our readiness probe then woke that system's
/// function.) Another process may still take the port first; the instance
/// then fails to start and its restart picks a new one.
pub(crate) fn free_port() -> std::io::Result<u16> {
    use std::collections::VecDeque;
    use std::sync::OnceLock;
    /// Ports handed out lately, not handed out again while their instance
    /// may still be on its way to binding them.
    static RECENT: OnceLock<Mutex<VecDeque<u16>>> = OnceLock::new();
    const RECENT_MAX: usize = 1024;
    const LOWEST: u16 = 10_000;
    let (ephemeral_low, _) = ephemeral_range();
    let highest = ephemeral_low.saturating_sub(1);
    let recent = RECENT.get_or_init(|| Mutex::new(VecDeque::new()));
    if highest > LOWEST {
        for _ in 0..200 {
            let port = rand::random_range(LOWEST..=highest);
            let mut handed = lock(recent);
            if handed.contains(&port) || StdListener::bind(("127.0.0.1", port)).is_err() {
                continue;
            }
            if handed.len() == RECENT_MAX {
                handed.pop_front();
            }
            handed.push_back(port);
            return Ok(port);
        }
    }
    // No room below the ephemeral range (an unusual sysctl): fall back.
    Ok(StdListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// The kernel's ephemeral port range (Linux), or the usual default.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// How the runtime reaches an instance's `/readyz`: over mutual TLS with
/// its own identity, accepting only an instance of the service it probes.
#[derive(Clone)]
pub(crate) struct Prober(Option<TlsConnector>);

impl Prober {
    pub(crate) fn tls(connector: TlsConnector) -> Prober {
        Prober(Some(connector))
    }

    /// Plain TCP: only for tests of the probe itself.
    #[cfg(test)]
    fn plain() -> Prober {
        Prober(None)
    }
}

/// Polls `/readyz` until it answers 200 or `timeout` passes; on timeout,
/// says what the last attempt got. The first polls come quickly because a
/// cold start is on the request path of a function.
async fn wait_ready(addr: SocketAddr, timeout: Duration, prober: &Prober) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        let last = match probe(addr, prober).await {
            Ok(200) => return Ok(()),
            Ok(status) => format!("status {status}"),
            Err(e) => e,
        };
        if Instant::now() + pause > deadline {
            return Err(last);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 3 / 2).min(Duration::from_millis(100));
    }
}

/// `GET /readyz` over a fresh connection; the status code, or what went
/// wrong.
pub(crate) async fn probe(addr: SocketAddr, prober: &Prober) -> Result<u16, String> {
    probe_path(addr, prober, "/readyz").await
}

/// Whether an instance failing `/readyz` is alive: `GET /healthz` answered
/// with anything below 500. A 404 of a program that serves no `/healthz`
/// is an answer, and so alive; a 5xx says it is broken; no answer within
/// a second is a hung process. What went wrong, when it is not.
async fn alive(addr: SocketAddr, prober: &Prober) -> Result<(), String> {
    match probe_path(addr, prober, "/healthz").await {
        Ok(status) if status < 500 => Ok(()),
        Ok(status) => Err(format!("status {status}")),
        Err(e) => Err(e),
    }
}

/// `GET path` over a fresh connection; the status code, or what went
/// wrong.
///
/// Written against the socket rather than through an HTTP client because it
/// must never reuse a pooled connection (that would hide a dead listener)
/// and it needs nothing but the status line.
async fn probe_path(addr: SocketAddr, prober: &Prober, path: &str) -> Result<u16, String> {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        match &prober.0 {
            None => read_status(stream, addr, path).await,
            Some(connector) => {
                let (tls, _) = flotilla_mesh::connect_with_timeout(
                    connector,
                    ServerName::from(addr.ip()),
                    stream,
                    Duration::from_secs(1),
                )
                .await
                .map_err(|e| flotilla_mesh::tls::error_chain(&e))?;
                read_status(tls, addr, path).await
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .unwrap_or_else(|_| Err("no answer within 1s".to_string()))
}

async fn read_status<S>(mut stream: S, addr: SocketAddr, path: &str) -> Result<u16, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: flotilla-runtime\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 64];
    let mut len = 0;
    while len < 12 {
        // In TLS 1.3 a server's refusal of our certificate shows up here.
        let n = stream
            .read(&mut buf[len..])
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        len += n;
    }
    std::str::from_utf8(&buf[..len])
        .ok()
        .and_then(|head| head.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok())
        .ok_or_else(|| "no HTTP status line in the answer".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A crash report's last lines come from the log's end, whatever its
    /// size, and a byte that is not UTF-8 does not hide them.
    #[test]
    fn last_lines_read_the_end_of_a_long_log_lossily() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a-0.log");
        let mut text = "x".repeat(100).repeat(2000).into_bytes(); // no newline: 200 kB
        text.extend_from_slice(b"\nstarting\n\xff bad byte\npanicked: no config\n");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(
            last_lines(&path, 2),
            "    \u{fffd} bad byte\n    panicked: no config"
        );
        // The part of a line the 64 KiB cut through is not shown.
        assert_eq!(last_lines(&path, 5).lines().count(), 3);
        assert_eq!(
            last_lines(&dir.path().join("none.log"), 2),
            "    (no output)"
        );
    }

    #[test]
    fn instance_ports_never_come_from_the_ephemeral_range() {
        let (low, _) = ephemeral_range();
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        assert!(
            ports.iter().all(|p| *p < low),
            "{ports:?} vs ephemeral {low}"
        );
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "a port handed out twice");
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert!(backoff(1) >= BACKOFF_FIRST && backoff(1) < BACKOFF_FIRST * 2);
        assert!(backoff(3) >= BACKOFF_FIRST * 4);
        assert!(backoff(40) <= BACKOFF_MAX.mul_f64(1.2));
    }

    #[tokio::test]
    async fn probe_reads_the_status_line() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
        });
        assert_eq!(probe(addr, &Prober::plain()).await, Ok(503));
        assert!(
            probe(addr, &Prober::plain()).await.is_err(),
            "nothing listens any more"
        );
    }
}
