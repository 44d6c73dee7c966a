//! A running system: the order things start in, what "ready" means for the
//! whole, and the order they stop in.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_gateway::upstream::{ActivateError, ActivateFuture, Endpoint, Upstreams};
use flotilla_gateway::{Config as GatewayConfig, Gateway, UpstreamTls};
use flotilla_manifest::{Data, Manifest, Run, Service, Shape, env_key};
use tokio::sync::{Notify, watch};

use crate::broker::{self, ENV_BROKER_URL};
use crate::build::{self, bin_name};
use crate::console::Console;
use crate::control::{self, StatusSource};
use crate::dirlock::DirLock;
use crate::endpoints::{Endpoints, InstanceEndpoint, ServiceEndpoint};
use crate::mesh::{Mesh, Renewal};
use crate::pool::{Pool, PoolEnv, Prober, ReloadStatus, Status};
use crate::process::Launch;
use crate::reload;
use crate::{Error, Options};

/// The pools by service name; the gateway's view of the instances.
struct Registry {
    system: String,
    gateway_url: std::sync::OnceLock<String>,
    pools: BTreeMap<String, Arc<Pool>>,
    /// Written by the manifest watcher.
    reloads: Arc<Mutex<ReloadStatus>>,
}

impl Upstreams for Registry {
    fn ready(&self, service: &str) -> Arc<[Endpoint]> {
        match self.pools.get(service) {
            Some(pool) => pool.ready(),
            None => Arc::from(Vec::new()),
        }
    }

    fn activate(&self, service: &str) -> ActivateFuture {
        match self.pools.get(service) {
            Some(pool) => Box::pin(Arc::clone(pool).activate()),
            None => {
                let service = service.to_string();
                Box::pin(async move { Err(ActivateError::UnknownService(service)) })
            }
        }
    }
}

impl StatusSource for Registry {
    fn status(&self) -> Status {
        Status {
            system: self.system.clone(),
            gateway: self.gateway_url.get().cloned().unwrap_or_default(),
            services: self.pools.values().map(|p| p.status()).collect(),
            reloads: self.reloads.lock().unwrap().clone(),
        }
    }
}

/// A system started by [`System::start`]; stop it with [`System::shutdown`].
pub struct System {
    registry: Arc<Registry>,
    gateway: Arc<Gateway>,
    /// The manifest watcher, which holds the other handle on the gateway.
    watcher: Option<tokio::task::JoinHandle<()>>,
    endpoints: Endpoints,
    data_dir: PathBuf,
    console: Arc<Console>,
    stop_tx: watch::Sender<bool>,
    shutdown_requested: Arc<Notify>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The event broker, when the manifest declares topics, queues or
    /// streams.
    broker: Option<flotilla_broker::Broker>,
    /// The runtime's, gateway's and operator's certificates, kept renewed.
    _renewals: Vec<Renewal>,
    /// Held until the system is dropped (or the process dies).
    _lock: DirLock,
}

impl System {
    /// Builds and starts everything in `manifest`, and returns once every
    /// service has its minimum of ready instances or has been reported as
    /// failing (the rest of the system is then served, degraded).
    pub async fn start(manifest: Manifest, options: Options) -> Result<System, Error> {
        let started = Instant::now();
        let read_at = options
            .manifest_read_at
            .unwrap_or_else(std::time::SystemTime::now);
        let data_dir = prepare_data_dir(&options.data_dir)?;
        let lock = lock_data_dir(&data_dir)?;
        if let Some(url) = control::is_live(&data_dir).await {
            return Err(Error::AlreadyRunning { data_dir, url });
        }
        let console = Arc::new(Console::new(
            options.echo_logs,
            options.echo_logs || options.interactive,
        ));
        // Before anything records a metric.
        flotilla_gateway::prometheus_recorder();
        match crate::process::raise_open_files_limit() {
            Ok((before, after)) if after > before => {
                tracing::debug!(before, after, "raised the open-files limit");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
        }
        let lifetime = options.leaf_lifetime.unwrap_or(manifest.mesh.leaf_lifetime);
        let mut manifest = manifest;
        if let Some(mode) = options.mesh_mode {
            manifest.mesh.mode = mode;
        }
        let (mesh, runtime_renewal) = Mesh::open(&manifest, &data_dir, lifetime).await?;
        let mut renewals = vec![runtime_renewal];

        let binaries = build::build(&manifest, options.profile, options.interactive).await?;
        let built = started.elapsed();

        // Service addresses first: every instance's environment names them.
        let mut listeners = BTreeMap::new();
        for name in manifest.services.keys() {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
                .await
                .map_err(|e| Error::Listen {
                    what: format!("the service address of `{name}`"),
                    addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                    reason: e.to_string(),
                })?;
            let addr = listener.local_addr().map_err(|e| Error::Listen {
                what: format!("the service address of `{name}`"),
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                reason: e.to_string(),
            })?;
            listeners.insert(name.clone(), (listener, addr));
        }
        // The broker's address too, when there is one.
        let broker_listener = if manifest.uses_broker() {
            let any = SocketAddr::from(([127, 0, 0, 1], 0));
            let listener = tokio::net::TcpListener::bind(any)
                .await
                .map_err(|e| Error::Listen {
                    what: "the event broker".into(),
                    addr: any,
                    reason: e.to_string(),
                })?;
            let addr = listener.local_addr().map_err(|e| Error::Listen {
                what: "the event broker".into(),
                addr: any,
                reason: e.to_string(),
            })?;
            Some((listener, addr))
        } else {
            None
        };
        let broker_users = manifest.broker_users();
        let broker_url = broker_listener
            .as_ref()
            .map(|(_, addr)| format!("https://{addr}"));

        let mut pools = BTreeMap::new();
        for (name, spec) in &manifest.services {
            let launch = match &spec.run {
                Run::Cargo { package, bin } => {
                    let key = (package.clone(), bin_name(package, bin.as_deref()));
                    binaries
                        .get(&key)
                        .map(|program| Launch {
                            program: program.clone(),
                            args: Vec::new(),
                            dir: manifest.dir.clone(),
                        })
                        .ok_or_else(|| {
                            format!("{name}: no binary was built for package `{package}`")
                        })
                }
                Run::Command { argv, dir } => resolve_command(argv, dir).map(|program| Launch {
                    program,
                    args: argv[1..].to_vec(),
                    dir: dir.clone(),
                }),
            };
            let mut env = vec![
                ("FLOTILLA_SYSTEM".to_string(), manifest.name.clone()),
                ("FLOTILLA_SERVICE".to_string(), name.clone()),
                (
                    "FLOTILLA_DRAIN_SECONDS".to_string(),
                    spec.drain.as_secs().max(1).to_string(),
                ),
                ("OTEL_SERVICE_NAME".to_string(), name.clone()),
            ];
            for dep in &spec.calls {
                if let Some((_, addr)) = listeners.get(dep) {
                    env.push((
                        format!("FLOTILLA_URL_{}", env_key(dep)),
                        format!("https://{addr}"),
                    ));
                }
            }
            if let Some((_, addr)) = &broker_listener
                && broker_users.contains(name)
            {
                env.push((ENV_BROKER_URL.to_string(), format!("https://{addr}")));
            }
            if spec.data == Data::Sqlite {
                let dir = data_dir.join("data").join(name);
                std::fs::create_dir_all(&dir).map_err(|source| Error::DataDir {
                    path: dir.clone(),
                    source,
                })?;
                env.push((
                    "DATABASE_URL".to_string(),
                    format!("sqlite://{}", dir.join(format!("{name}.db")).display()),
                ));
            }
            env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
            let address = listeners[name].1;
            let prober = Prober::tls(mesh.prober(name)?);
            let pool = Pool::new(
                with_delivery_idle(spec, &manifest),
                PoolEnv {
                    system: manifest.name.clone(),
                    data_dir: data_dir.clone(),
                    console: Arc::clone(&console),
                    env,
                    launch,
                    address,
                    mesh: Arc::clone(&mesh),
                    prober,
                },
            );
            pools.insert(name.clone(), pool);
        }
        let registry = Arc::new(Registry {
            system: manifest.name.clone(),
            gateway_url: std::sync::OnceLock::new(),
            pools,
            reloads: Arc::default(),
        });

        let mut gateway_config = GatewayConfig::from_manifest(&manifest);
        if let Some(listen) = options.listen {
            gateway_config.listen = listen;
        }
        gateway_config.access_log = Some(data_dir.join("logs").join("gateway-access.log"));
        let gateway_dir = mesh.gateway_dir();
        renewals.push(
            mesh.issue_platform(flotilla_mesh::identity::GATEWAY, gateway_dir.clone())
                .await?,
        );
        gateway_config.upstream_tls = Some(UpstreamTls::in_dir(&gateway_dir));
        renewals.push(
            mesh.issue_platform(
                flotilla_mesh::identity::OPERATOR,
                control::operator_dir(&data_dir),
            )
            .await?,
        );
        let watched = reload::Watched {
            manifest: manifest.clone(),
            base: gateway_config.clone(),
            read_at,
        };
        let gateway = Gateway::start(gateway_config, Arc::clone(&registry) as Arc<dyn Upstreams>)
            .await
            .map_err(Error::Gateway)?;
        let gateway = Arc::new(gateway);
        let gateway_url = gateway.url();
        let _ = registry.gateway_url.set(gateway_url.clone());

        let (stop_tx, stop_rx) = watch::channel(false);
        let shutdown_requested = Arc::new(Notify::new());
        let mut tasks = Vec::new();

        // The broker before any instance starts: services publish (their
        // outbox relays) and receive deliveries from their first moment.
        let broker = match broker_listener {
            Some((listener, _)) => {
                let addresses = listeners
                    .iter()
                    .map(|(name, (_, addr))| (name.clone(), *addr))
                    .collect();
                let mut config = broker::config(&manifest, &data_dir, &addresses)?;
                let dir = mesh.dir_of(flotilla_mesh::identity::BROKER);
                renewals.push(
                    mesh.issue_platform(flotilla_mesh::identity::BROKER, dir.clone())
                        .await?,
                );
                config.identity = Some(flotilla_mesh::IdentityFiles::in_dir(&dir));
                let opened = flotilla_broker::Broker::open(config)
                    .await
                    .map_err(|e| Error::Broker(broker::BrokerError::Open(e)))?;
                let grants = broker::grants(&manifest, &mesh.env())?;
                let serving = opened.clone();
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = serving.serve_mesh(listener, grants).await {
                        tracing::error!("the event broker stopped serving: {e}");
                    }
                }));
                Some(opened)
            }
            None => None,
        };

        let bind = |what: &'static str| async move {
            control::bind().await.map_err(|e| Error::Listen {
                what: what.into(),
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                reason: e.to_string(),
            })
        };
        let (control_listener, control_addr) = bind("the control API").await?;
        let (console_listener, console_addr) = bind("the console").await?;
        let token = format!("{:032x}", rand::random::<u128>());
        let router = control::router(
            Arc::clone(&registry) as Arc<dyn StatusSource>,
            token.clone(),
            Arc::clone(&shutdown_requested),
            Arc::downgrade(&gateway),
        );
        tasks.push(tokio::spawn(control::serve_mtls(
            control_listener,
            router,
            mesh.control_acceptor()?,
            stop_rx.clone(),
        )));
        let console_router =
            control::console_router(Arc::clone(&registry) as Arc<dyn StatusSource>);
        tasks.push(tokio::spawn(control::serve_console(
            console_listener,
            console_router,
            stop_rx.clone(),
        )));

        for (name, (listener, _)) in listeners {
            let pool = Arc::clone(&registry.pools[&name]);
            tasks.push(tokio::spawn(crate::address::serve(
                listener,
                pool,
                stop_rx.clone(),
            )));
        }
        for pool in registry.pools.values() {
            tasks.push(tokio::spawn(Arc::clone(pool).scale_loop()));
        }

        wait_until_ready(&registry, &console).await;

        let endpoints = Endpoints {
            system: manifest.name.clone(),
            pid: std::process::id(),
            gateway: gateway_url,
            console: format!("http://{console_addr}"),
            control: format!("https://{control_addr}"),
            control_token: token,
            broker: broker_url,
            services: BTreeMap::new(),
        };
        let endpoints = snapshot(&endpoints, &registry);
        endpoints
            .write(&data_dir)
            .map_err(|source| Error::DataDir {
                path: Endpoints::path(&data_dir),
                source,
            })?;
        let watcher = options.watch.then(|| {
            tokio::spawn(reload::watch_manifest(
                watched,
                Arc::clone(&gateway),
                Arc::clone(&console),
                Arc::clone(&registry.reloads),
                stop_rx.clone(),
            ))
        });
        tasks.push(tokio::spawn(keep_endpoints_current(
            endpoints.clone(),
            Arc::clone(&registry),
            data_dir.clone(),
            stop_rx.clone(),
        )));

        if options.interactive {
            print_ready(&endpoints, &registry.status(), started.elapsed(), built);
        }
        Ok(System {
            _lock: lock,
            registry,
            gateway,
            watcher,
            endpoints,
            data_dir,
            console,
            stop_tx,
            shutdown_requested,
            tasks,
            broker,
            _renewals: renewals,
        })
    }

    /// Where everything is (also in `<data-dir>/endpoints.json`).
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The data dir in use.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A status snapshot.
    pub fn status(&self) -> Status {
        self.registry.status()
    }

    /// Resolves when `flotilla down` (the control API) asks the system to stop.
    pub async fn shutdown_requested(&self) {
        self.shutdown_requested.notified().await;
    }

    /// Stops the gateway (finishing in-flight requests), then every instance
    /// (SIGTERM, drain deadline, SIGKILL), then the listeners.
    pub async fn shutdown(self) {
        self.console.event("stopping");
        let drain = self
            .registry
            .pools
            .values()
            .map(|p| p.spec.drain)
            .max()
            .unwrap_or(Duration::from_secs(10));
        if let Some(watcher) = self.watcher {
            watcher.abort();
            let _ = watcher.await;
        }
        // The watcher's handle is gone, so this is the only one left.
        if let Ok(gateway) = Arc::try_unwrap(self.gateway) {
            gateway.shutdown(drain).await;
        }
        let stops = self.registry.pools.values().map(|p| {
            let p = Arc::clone(p);
            async move { p.shutdown().await }
        });
        futures_join_all(stops).await;
        // After the instances: their last outbox flushes still land.
        if let Some(broker) = self.broker {
            broker.close().await;
        }
        let _ = self.stop_tx.send(true);
        for task in &self.tasks {
            task.abort();
        }
        // An abort takes effect at the task's next await: one running on
        // another worker finishes its poll first. Waited for, so that
        // `keep_endpoints_current`, caught writing the instances' last
        // change, cannot put endpoints.json back after it is removed.
        for task in self.tasks {
            let _ = task.await;
        }
        let _ = std::fs::remove_file(Endpoints::path(&self.data_dir));
        self.console.event("stopped");
        self.console.flush(Duration::from_secs(1));
    }
}

/// Awaits all futures (a tiny join_all, to avoid a dependency for one call).
async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    for h in handles {
        let _ = h.await;
    }
}

fn lock_data_dir(dir: &Path) -> Result<DirLock, Error> {
    match DirLock::take(dir) {
        Ok(Ok(lock)) => Ok(lock),
        Ok(Err(pid)) => Err(Error::DataDirInUse {
            data_dir: dir.to_path_buf(),
            pid,
        }),
        Err(source) => Err(Error::DataDir {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Makes the data dir its owner's alone (0700): logs, databases and the
/// broker's stored events are below it, and the umask (022) would leave
/// them readable to every user of the machine. A directory made now is
/// always set; one that existed only if this user owns it and it is not
/// the user's home or the current directory given as `--data-dir .`,
/// whose modes are the user's choice (a warning says why it is left).
fn private(dir: &Path, existed: bool) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    if meta.permissions().mode() & 0o077 == 0 {
        return;
    }
    // SAFETY: geteuid(2) has no failure mode.
    let mine = meta.uid() == unsafe { libc::geteuid() };
    let shared = |other: Option<PathBuf>| {
        other.is_some_and(|o| o.canonicalize().ok() == dir.canonicalize().ok())
    };
    let users_own =
        shared(std::env::var_os("HOME").map(PathBuf::from)) || shared(std::env::current_dir().ok());
    if !existed || (mine && !users_own) {
        if let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot make the data dir 0700");
        }
    } else {
        tracing::warn!(
            dir = %dir.display(),
            "the data dir is readable by other users (its logs, databases and stored events too); left as it is, since it is not a directory of flotilla's own"
        );
    }
}

fn prepare_data_dir(dir: &Path) -> Result<PathBuf, Error> {
    let mk = |p: &Path| {
        std::fs::create_dir_all(p).map_err(|source| Error::DataDir {
            path: p.to_path_buf(),
            source,
        })
    };
    let existed = dir.is_dir();
    mk(dir)?;
    private(dir, existed);
    mk(&dir.join("logs"))?;
    mk(&dir.join("data"))?;
    let dir = dir.canonicalize().map_err(|source| Error::DataDir {
        path: dir.to_path_buf(),
        source,
    })?;
    // Probe writability now rather than at the first log line.
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"").map_err(|source| Error::DataDir {
        path: dir.clone(),
        source,
    })?;
    let _ = std::fs::remove_file(probe);
    Ok(dir)
}

/// `argv[0]` as a path: relative to `dir` if it names a file there, else
/// looked up on `PATH`. A missing program is reported now, by name.
fn resolve_command(argv: &[String], dir: &Path) -> Result<PathBuf, String> {
    let program = argv.first().map(String::as_str).unwrap_or_default();
    if program.contains('/') {
        let path = dir.join(program);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "command `{program}` not found at {}",
                path.display()
            ))
        };
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(program))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| format!("command `{program}` not found on PATH; install it or give its path in `run.command`"))
}

/// Waits until each service has `min` ready instances, or is crash-looping,
/// or its `ready_timeout` has passed; reports the ones that are not ready.
async fn wait_until_ready(registry: &Registry, console: &Console) {
    let started = Instant::now();
    let mut pending: Vec<&Arc<Pool>> = registry
        .pools
        .values()
        .filter(|p| p.spec.shape == Shape::Service)
        .collect();
    let mut receivers: Vec<watch::Receiver<u64>> = pending.iter().map(|p| p.subscribe()).collect();
    loop {
        let mut i = 0;
        while i < pending.len() {
            let pool = pending[i];
            let ready = pool.ready().len() as u32 >= pool.spec.scale.min;
            let timed_out = started.elapsed() >= pool.spec.ready_timeout;
            // Give up waiting on a service whose first starts all failed fast
            // (it exits at start): the others should not wait its full timeout.
            let failing = pool.crash_looping()
                || (pool.consecutive_failures() >= 3 && pool.ready().is_empty());
            if ready || timed_out || failing {
                if !ready {
                    console.warn(&format!(
                        "service `{}` is not ready ({}); the rest of the system is served",
                        pool.name(),
                        pool.status()
                            .last_error
                            .unwrap_or_else(|| "still starting".into())
                    ));
                }
                pending.remove(i);
                receivers.remove(i);
            } else {
                i += 1;
            }
        }
        if pending.is_empty() {
            return;
        }
        // Wake on any change, or at least every 100 ms to check timeouts.
        let changed = futures_any_changed(&mut receivers);
        let _ = tokio::time::timeout(Duration::from_millis(100), changed).await;
    }
}

async fn futures_any_changed(receivers: &mut [watch::Receiver<u64>]) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut handles = Vec::new();
    for r in receivers.iter() {
        let mut r = r.clone();
        let tx = tx.clone();
        handles.push(tokio::spawn(async move {
            if r.changed().await.is_ok() {
                let _ = tx.try_send(());
            }
        }));
    }
    drop(tx);
    let _ = rx.recv().await;
    for h in handles {
        h.abort();
    }
}

fn snapshot(base: &Endpoints, registry: &Registry) -> Endpoints {
    let mut e = base.clone();
    e.services = registry
        .pools
        .values()
        .map(|pool| {
            let status = pool.status();
            let instances = pool
                .ready()
                .iter()
                .map(|ep| InstanceEndpoint {
                    id: ep.instance.clone(),
                    address: format!("https://{}", ep.addr),
                    pid: status
                        .instances
                        .iter()
                        .find(|i| i.id == ep.instance)
                        .and_then(|i| i.pid)
                        .unwrap_or(0),
                })
                .collect();
            (
                pool.name().to_string(),
                ServiceEndpoint {
                    address: format!("https://{}", pool.address()),
                    shape: status.shape,
                    instances,
                },
            )
        })
        .collect();
    e
}

/// Rewrites `endpoints.json` when instances change (debounced).
async fn keep_endpoints_current(
    mut last: Endpoints,
    registry: Arc<Registry>,
    data_dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    let mut receivers: Vec<_> = registry.pools.values().map(|p| p.subscribe()).collect();
    loop {
        tokio::select! {
            _ = futures_any_changed(&mut receivers) => {}
            _ = stop.changed() => return,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Stopping: the instances' last changes are the shutdown's, and
        // the file is about to be removed.
        if *stop.borrow() {
            return;
        }
        let next = snapshot(&last, &registry);
        if next != last {
            if let Err(e) = next.write(&data_dir) {
                tracing::warn!("cannot update endpoints.json: {e}");
            }
            last = next;
        }
    }
}

fn print_ready(endpoints: &Endpoints, status: &Status, took: Duration, build: Duration) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "ready: gateway {} console {} ({} ms: build check {} ms, start {} ms)",
        endpoints.gateway,
        endpoints.console,
        took.as_millis(),
        build.as_millis(),
        took.saturating_sub(build).as_millis()
    );
    let _ = writeln!(
        out,
        "{:<16} {:<9} {:>7} {:<24} state",
        "SERVICE", "SHAPE", "READY", "ADDRESS"
    );
    for s in &status.services {
        let state = if s.crash_loop || (s.ready == 0 && s.min > 0) {
            format!(
                "NOT READY: {}",
                s.last_error
                    .clone()
                    .unwrap_or_default()
                    .lines()
                    .next()
                    .unwrap_or("")
            )
        } else if s.shape == "function" && s.ready == 0 {
            "scaled to zero".to_string()
        } else {
            "ok".to_string()
        };
        let _ = writeln!(
            out,
            "{:<16} {:<9} {:>3}/{:<3} {:<24} {state}",
            s.name,
            s.shape,
            s.ready,
            s.max,
            s.address.trim_start_matches("https://"),
        );
    }
}

/// `spec` with `idle` at least the longest `timeout` of a push delivery to
/// the service. A delivery reaches it through its service address, spliced
/// as bytes (TLS end to end): the scaler cannot count it as a request, only
/// see bytes flow. A function working on one without a byte for `idle`
/// would look idle, and its last instance would be stopped under it; a
/// delivery that takes longer than its `timeout` has failed anyway.
fn with_delivery_idle(spec: &Service, manifest: &Manifest) -> Service {
    let longest = manifest
        .queues
        .values()
        .filter_map(|q| q.deliver.as_ref())
        .chain(manifest.streams.values().filter_map(|s| s.deliver.as_ref()))
        .filter(|d| d.to == spec.name)
        .map(|d| d.timeout)
        .max();
    let mut spec = spec.clone();
    if let Some(timeout) = longest {
        spec.scale.idle = spec.scale.idle.max(timeout);
    }
    spec
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::{private, with_delivery_idle};

    fn mode(path: &std::path::Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_service_s_idle_is_at_least_its_longest_delivery() {
        let manifest = flotilla_manifest::Manifest::parse(
            r#"name = "t"
[services.fn]
shape = "function"
run = { command = ["true"] }
scale = { idle = "5s" }
[services.other]
run = { command = ["true"] }
scale = { idle = "5s" }
[topics.t]
[queues.slow]
subscribe = { topic = "t" }
deliver = { to = "fn", path = "/events", timeout = "2m" }
[queues.quick]
subscribe = { topic = "t" }
deliver = { to = "fn", path = "/events", timeout = "3s" }
"#,
            std::path::Path::new("/tmp/flotilla.toml"),
        )
        .unwrap();
        let idle = |name: &str| {
            with_delivery_idle(&manifest.services[name], &manifest)
                .scale
                .idle
        };
        assert_eq!(idle("fn"), std::time::Duration::from_secs(120));
        assert_eq!(idle("other"), std::time::Duration::from_secs(5));
    }

    #[test]
    fn an_existing_data_dir_of_the_users_is_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Made before this run, owned by this user, neither HOME nor the
        // current directory: flotilla's own, so made 0700.
        private(&data, true);
        assert_eq!(mode(&data), 0o700);
        // One that is already private keeps its mode (0500 is the owner's
        // choice, not widened to 0700).
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o500)).unwrap();
        private(&data, true);
        assert_eq!(mode(&data), 0o500);
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
}
