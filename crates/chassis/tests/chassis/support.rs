//! Helpers shared by the integration tests.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use flotilla_chassis::{Readiness, Service};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A socket bound to a free port of 127.0.0.1 and not listening, with its
/// address: connecting there is refused for as long as it is held, and no
/// other socket can take the port meanwhile (as one can between closing a
/// listener and binding its address again). `listen` on it accepts there.
pub fn unlistened() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind 127.0.0.1:0");
    let addr = socket.local_addr().expect("its address");
    (socket, addr)
}

/// A server running in the background until [`Running::stop`].
pub struct Running {
    pub addr: SocketAddr,
    pub readiness: Readiness,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<Result<(), flotilla_chassis::Error>>,
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Triggers shutdown and waits for `serve_until` to return.
    pub async fn stop(mut self) -> Result<(), flotilla_chassis::Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("server task panicked")
    }

    /// Triggers shutdown without waiting.
    pub fn trigger_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Builds a service from `vars` (plus a port-0 listen address) and serves
/// `router` in the background.
pub async fn start(service: &str, vars: &[(&str, &str)], router: Router) -> Running {
    start_with(service, vars, router, |s| s).await
}

pub async fn start_with(
    service: &str,
    vars: &[(&str, &str)],
    router: Router,
    configure: impl FnOnce(Service) -> Service,
) -> Running {
    let mut env: Vec<(String, String)> = vec![
        ("FLOTILLA_SYSTEM".into(), "test".into()),
        ("FLOTILLA_SERVICE".into(), service.into()),
        ("FLOTILLA_INSTANCE".into(), format!("{service}-0")),
        ("FLOTILLA_LISTEN".into(), "127.0.0.1:0".into()),
    ];
    env.extend(vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let service = configure(Service::from_vars(env).expect("valid test env"));
    let server = service.bind().await.expect("bind port 0");
    let addr = server.local_addr();
    let readiness = server.readiness();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(server.serve_until(router, async move {
        let _ = rx.await;
    }));
    Running {
        addr,
        readiness,
        stop: Some(tx),
        task,
    }
}

pub fn http() -> reqwest::Client {
    http_giving_up_after(Duration::from_secs(10))
}

/// Like [`http`], giving up on a request after `timeout`.
pub fn http_giving_up_after(timeout: Duration) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .expect("reqwest client")
}

/// Polls `check` until it returns `Some` or `deadline` passes.
pub async fn eventually<T, F, Fut>(deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < end,
            "condition not met within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
