//! Graceful shutdown: readiness flips, in-flight requests finish, the drain
//! deadline bounds the wait.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use tokio::sync::{Notify, mpsc};

use crate::support::{eventually, http, http_giving_up_after, start};

/// A route that reports when it starts and finishes only when released.
fn held(started: mpsc::Sender<()>, release: Arc<Notify>) -> Router {
    Router::new().route(
        "/api/held",
        get(move || {
            let started = started.clone();
            let release = release.clone();
            async move {
                let _ = started.send(()).await;
                release.notified().await;
                "done"
            }
        }),
    )
}

#[tokio::test]
async fn in_flight_requests_finish_after_shutdown_starts() {
    let (started_tx, mut started_rx) = mpsc::channel(1);
    let release = Arc::new(Notify::new());
    let mut server = start("it-drain", &[], held(started_tx, release.clone())).await;

    let url = server.url("/api/held");
    let request = tokio::spawn(async move { http().get(url).send().await });
    started_rx.recv().await.expect("handler started");

    server.trigger_stop();
    let readiness = server.readiness.clone();
    eventually(Duration::from_secs(5), || {
        let readiness = readiness.clone();
        async move { readiness.is_draining().then_some(()) }
    })
    .await;
    assert!(!readiness.is_ready());
    assert!(
        !server.task.is_finished(),
        "must wait for the in-flight request"
    );

    release.notify_one();
    let res = request.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "done");
    server.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn drain_deadline_bounds_the_wait() {
    let (started_tx, mut started_rx) = mpsc::channel(1);
    let release = Arc::new(Notify::new());
    let mut server = start(
        "it-deadline",
        &[("FLOTILLA_DRAIN_SECONDS", "30")],
        held(started_tx, release),
    )
    .await;
    let url = server.url("/api/held");
    // A client that outwaits the drain (http()'s gives up after 10 s, which
    // would end the request, and so the drain, early).
    let patient = http_giving_up_after(Duration::from_secs(120));
    let _request = tokio::spawn(async move { patient.get(url).send().await });
    started_rx.recv().await.expect("handler started");

    let begun = Instant::now();
    server.trigger_stop();
    // Never released: serve_until must still return, after four fifths
    // of the 30 s, leaving the last six for cleanup before SIGKILL.
    tokio::time::timeout(Duration::from_secs(60), &mut server.task)
        .await
        .expect("serve_until returned within the deadline")
        .unwrap()
        .unwrap();
    // Not a measure of speed: whether it waited for the requests at all
    // (at least their 24 s), and whether it left the cleanup its share (it
    // returned before the whole budget had passed; the budget is long so
    // that the 6 s share is room enough for a loaded machine).
    let took = begun.elapsed();
    assert!(took >= Duration::from_millis(23_900), "{took:?}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}
