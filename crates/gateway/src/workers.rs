//! The gateway's worker threads: each runs a current-thread tokio runtime
//! of its own and serves, start to end, the connections handed to it.
//!
//! Why not the caller's multi-thread runtime: a proxied request is a few
//! microseconds of work on one connection's task, and on a work-stealing
//! scheduler much of what it costs is the scheduler's, not the request's:
//! idle workers woken to steal (futex calls, for nothing), tasks moved
//! between cores, shared queues and counters bouncing between caches. One
//! runtime per thread, like nginx's worker processes, keeps every
//! connection, its upstream connections and its timers on one core. The
//! raw transport alone (examples/bench_raw_h1.rs, `--per-core`) used about
//! 10 % less CPU per request this way (docs/benchmarks.md).
//!
//! The caller's runtime keeps the accept loop (`server::run`), which hands
//! each accepted socket to the worker with the fewest open connections, and
//! everything in the background (JWKS refresh, the access-log writer, the
//! pool sweeps). Handing a socket over costs two `epoll_ctl` calls per
//! connection, not per request; in exchange, connections are spread evenly,
//! which `SO_REUSEPORT` listeners (one per worker, the kernel hashing
//! connections onto them) would not promise, and no other process can
//! share the port by binding it with `SO_REUSEPORT` too.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::conn_limit::ConnSlot;

/// Runs `task` on `runtime`, the runtime the gateway was started on, and
/// waits for it here; without one (outside a runtime), runs it in place.
/// For work whose spawned tasks must outlive the worker thread that asked,
/// since a worker's runtime ends before the gateway's: starting an instance
/// spawns its supervisors, and redis-rs spawns a connection's driver where
/// the connection is first used. `Err`: the task panicked, or its runtime
/// is shutting down.
///
/// Dropped before it is done (a route's timeout fired while an instance
/// was activated, the client went away), it aborts the task, as `task`
/// would be dropped if it ran in place: a dropped `JoinHandle` only
/// detaches its task, and an abandoned activation would go on waiting for
/// an instance until the service's `ready_timeout`, one per request given
/// up on. What the task spawned (supervisors, a connection's driver) is
/// not aborted with it.
pub(crate) async fn on_caller<T: Send + 'static>(
    runtime: Option<&tokio::runtime::Handle>,
    task: impl Future<Output = T> + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    match runtime {
        Some(runtime) => {
            let handle = runtime.spawn(task);
            let _abort = AbortOnDrop(handle.abort_handle());
            handle.await
        }
        None => Ok(task.await),
    }
}

/// Aborts a task when dropped; a no-op once the task has ended.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a worker does with each socket handed to it; runs on the worker.
pub(crate) trait Serve: Send + 'static {
    fn serve(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = ()> + Send + 'static;
}

struct Job {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    slot: ConnSlot,
}

struct Worker {
    jobs: mpsc::UnboundedSender<Job>,
    /// Connections handed to it and not yet closed.
    open: Arc<AtomicUsize>,
    /// Closed (its sender dropped) when the thread ends.
    done: oneshot::Receiver<()>,
}

/// The running workers.
pub(crate) struct Workers {
    workers: Vec<Worker>,
    /// Where the search for the least busy worker starts: rotated, so that
    /// ties (all idle, say) are broken round-robin.
    next: usize,
    /// When the workers must close what is still open; `None` until the
    /// gateway stops (a pool dropped without `finish` closes at once).
    drain: watch::Sender<Option<Instant>>,
}

impl Workers {
    /// Starts one worker per `serve` (each serves with its own), named
    /// `{name}-{index}`.
    pub(crate) fn start<S: Serve>(name: &str, serves: Vec<S>) -> std::io::Result<Workers> {
        let (drain, drain_rx) = watch::channel(None);
        let mut workers = Vec::with_capacity(serves.len());
        for (index, serve) in serves.into_iter().enumerate() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (jobs, rx) = mpsc::unbounded_channel();
            let (done_tx, done) = oneshot::channel::<()>();
            let open = Arc::new(AtomicUsize::new(0));
            let count = Arc::clone(&open);
            let drain = drain_rx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    runtime.block_on(work(rx, serve, count, drain));
                    // Whatever the connections left running (an h2c
                    // stream's task, a pool sweep) goes with the runtime.
                    drop(runtime);
                    drop(done_tx);
                })?;
            workers.push(Worker { jobs, open, done });
        }
        Ok(Workers {
            workers,
            next: 0,
            drain,
        })
    }

    /// Hands a freshly accepted connection to the worker with the fewest
    /// open connections; `slot` counts it against the connection limits
    /// until it closes.
    pub(crate) fn hand(&mut self, stream: TcpStream, peer: SocketAddr, slot: ConnSlot) {
        let n = self.workers.len();
        let Some(at) = (0..n)
            .map(|i| (self.next + i) % n)
            .min_by_key(|&i| self.workers[i].open.load(Ordering::Relaxed))
        else {
            return;
        };
        self.next = (at + 1) % n;
        // Out of this runtime's reactor, into the worker's (`work`).
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(target: "flotilla::gateway", %peer, error = %e, "cannot hand a connection to a worker");
                return;
            }
        };
        let worker = &self.workers[at];
        worker.open.fetch_add(1, Ordering::Relaxed);
        if worker.jobs.send(Job { stream, peer, slot }).is_err() {
            // The worker is gone (its thread panicked): the socket closes.
            worker.open.fetch_sub(1, Ordering::Relaxed);
            tracing::error!(target: "flotilla::gateway", worker = at, "a gateway worker has stopped");
        }
    }

    /// Stops handing out connections and waits for the workers: each lets
    /// its connections finish for up to `deadline`, then closes the rest.
    pub(crate) async fn finish(self, deadline: Duration) {
        self.drain.send_replace(Some(Instant::now() + deadline));
        let mut done = Vec::with_capacity(self.workers.len());
        for worker in self.workers {
            drop(worker.jobs);
            done.push(worker.done);
        }
        for d in done {
            // An error is the usual end: the sender dropped with the thread.
            let _ = d.await;
        }
    }
}

/// Counts a connection as open until dropped (finished or aborted), on
/// its worker and against the connection limits.
struct Open {
    on_worker: Arc<AtomicUsize>,
    _slot: ConnSlot,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.on_worker.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// A connection served, counted open until it is done.
    struct Counted<F> {
        #[pin]
        served: F,
        _open: Open,
    }
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().served.poll(cx)
    }
}

/// A worker's life: serve what is handed over until the pool stops, then
/// drain.
async fn work<S: Serve>(
    mut jobs: mpsc::UnboundedReceiver<Job>,
    serve: S,
    open: Arc<AtomicUsize>,
    drain: watch::Receiver<Option<Instant>>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            job = jobs.recv() => {
                let Some(Job { stream, peer, slot }) = job else { break };
                let guard = Open {
                    on_worker: Arc::clone(&open),
                    _slot: slot,
                };
                match TcpStream::from_std(stream) {
                    Ok(stream) => {
                        let served = serve.serve(stream, peer);
                        // The connection's own future, the guard beside it:
                        // awaited in a block, it would be there twice.
                        connections.spawn(crate::clock::Ticking::new(Counted {
                            served,
                            _open: guard,
                        }));
                    }
                    Err(e) => {
                        tracing::debug!(target: "flotilla::gateway", %peer, error = %e, "a worker cannot take a connection");
                    }
                }
            }
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    let deadline = (*drain.borrow()).unwrap_or_else(Instant::now);
    let _ = tokio::time::timeout_at(deadline, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn_limit::ConnLimits;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    const PATIENCE: Duration = Duration::from_secs(10);

    /// Records which thread served each connection, then holds it open
    /// until the client closes it.
    struct Recorder(Arc<Mutex<HashMap<SocketAddr, String>>>);

    impl Serve for Recorder {
        fn serve(
            &self,
            mut stream: TcpStream,
            peer: SocketAddr,
        ) -> impl Future<Output = ()> + Send + 'static {
            let seen = Arc::clone(&self.0);
            async move {
                let name = std::thread::current().name().unwrap_or("?").to_string();
                seen.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(peer, name);
                let mut buf = [0u8; 16];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            }
        }
    }

    async fn listener() -> (TcpListener, SocketAddr) {
        let l = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        };
        let addr = match l.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        };
        (l, addr)
    }

    /// A connection to `l`: the client's end, and the server's as accepted.
    async fn connect(l: &TcpListener, addr: SocketAddr) -> (TcpStream, TcpStream, SocketAddr) {
        let client = match TcpStream::connect(addr).await {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        match l.accept().await {
            Ok((server, peer)) => (client, server, peer),
            Err(e) => panic!("{e}"),
        }
    }

    /// A place under limits no test reaches.
    fn slot(peer: SocketAddr) -> ConnSlot {
        static LIMITS: std::sync::OnceLock<Arc<ConnLimits>> = std::sync::OnceLock::new();
        let limits = LIMITS.get_or_init(|| ConnLimits::new(usize::MAX, 0));
        match limits.admit(peer.ip(), false) {
            Ok(slot) => slot,
            Err(why) => panic!("{why:?}"),
        }
    }

    async fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn connections_are_spread_evenly_over_the_worker_threads() {
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let serves = vec![Recorder(Arc::clone(&seen)), Recorder(Arc::clone(&seen))];
        let mut workers = match Workers::start("test-worker", serves) {
            Ok(w) => w,
            Err(e) => panic!("{e}"),
        };
        let (l, addr) = listener().await;
        let mut clients = Vec::new();
        for _ in 0..6 {
            let (client, server, peer) = connect(&l, addr).await;
            workers.hand(server, peer, slot(peer));
            clients.push(client);
        }
        wait_for("six connections served", || {
            seen.lock().unwrap_or_else(|e| e.into_inner()).len() == 6
        })
        .await;
        let mut per_thread: HashMap<String, usize> = HashMap::new();
        for name in seen.lock().unwrap_or_else(|e| e.into_inner()).values() {
            *per_thread.entry(name.clone()).or_default() += 1;
        }
        assert_eq!(
            per_thread,
            HashMap::from([("test-worker-0".into(), 3), ("test-worker-1".into(), 3)])
        );

        // Closed connections no longer count: the next goes to the worker
        // that has fewer open.
        let first_on_0 = seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, name)| *name == "test-worker-0")
            .map(|(peer, _)| *peer)
            .collect::<Vec<_>>();
        clients.retain(|c| c.local_addr().map_or(true, |a| !first_on_0.contains(&a)));
        wait_for("worker 0's connections closed", || {
            workers.workers[0].open.load(Ordering::Relaxed) == 0
        })
        .await;
        let (client, server, peer) = connect(&l, addr).await;
        let local = client.local_addr().ok();
        workers.hand(server, peer, slot(peer));
        wait_for("the seventh connection served", || {
            local.is_some_and(|a| {
                seen.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&a)
                    .is_some_and(|n| n == "test-worker-0")
            })
        })
        .await;
        drop(client);
        drop(clients);
        workers.finish(PATIENCE).await;
    }

    /// A task run on the caller's runtime for a caller that gave up
    /// waiting (its timeout fired) is aborted, not left running.
    #[tokio::test]
    async fn a_task_on_the_caller_s_runtime_ends_when_its_caller_gives_up() {
        let runtime = tokio::runtime::Handle::current();
        // Dropped with the task that holds it: `ended` then resolves.
        let (held, ended) = oneshot::channel::<()>();
        let waits_forever = async move {
            let _held = held;
            std::future::pending::<()>().await;
        };
        let given_up = tokio::time::timeout(
            Duration::from_millis(10),
            on_caller(Some(&runtime), waits_forever),
        )
        .await;
        assert!(given_up.is_err(), "the task cannot have finished");
        let ended = tokio::time::timeout(PATIENCE, ended).await;
        assert!(
            matches!(ended, Ok(Err(_))),
            "the abandoned task is still running"
        );
    }

    #[tokio::test]
    async fn finishing_closes_what_is_still_open_at_the_deadline() {
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let mut workers = match Workers::start("test-drain", vec![Recorder(Arc::clone(&seen))]) {
            Ok(w) => w,
            Err(e) => panic!("{e}"),
        };
        let (l, addr) = listener().await;
        let (mut client, server, peer) = connect(&l, addr).await;
        workers.hand(server, peer, slot(peer));
        wait_for("the connection served", || {
            !seen.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
        })
        .await;
        // The client never closes: the worker gives up on it at the
        // deadline and the socket closes under the client.
        let finished =
            tokio::time::timeout(PATIENCE, workers.finish(Duration::from_millis(50))).await;
        assert!(finished.is_ok(), "the workers did not finish");
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(PATIENCE, client.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the connection is still open: {read:?}"
        );
    }
}
