//! Scale from zero: requests are held while the service activates, and
//! refused with 503 only when activation fails or outlasts the route timeout.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use flotilla_gateway::ActivateError;
use http::StatusCode;
use tokio::time::Instant;

use crate::support::*;

/// What an activator does once its instance would be up: starts `fn-0`
/// and makes it ready (unless the registry is gone).
async fn start_instance(registry: &Weak<Registry>) -> Result<(), ActivateError> {
    let up = Upstream::start("fn-0").await;
    let Some(registry) = registry.upgrade() else {
        return Err(ActivateError::ShuttingDown);
    };
    registry.set("fn", vec![up.endpoint()]);
    registry
        .started
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(up);
    Ok(())
}

#[tokio::test]
async fn a_request_is_held_until_an_instance_starts() {
    let registry = Registry::new();
    let weak = Arc::downgrade(&registry);
    registry.on_activate(
        "fn",
        Arc::new(move || {
            let weak = weak.clone();
            Box::pin(async move {
                // A cold start takes a while.
                tokio::time::sleep(Duration::from_millis(50)).await;
                start_instance(&weak).await
            })
        }),
    );
    let gateway = start(
        config(vec![route("fn", "/fn/**", &[], Duration::from_secs(5))]),
        &registry,
    )
    .await;
    let client = Client::new(&gateway);

    let began = Instant::now();
    let reply = client.get("/fn/hello").await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.instance(), "fn-0");
    assert!(began.elapsed() >= Duration::from_millis(50));
    assert_eq!(registry.activations.load(Ordering::SeqCst), 1);

    // Now warm: no more activations.
    assert_eq!(client.get("/fn/again").await.status, StatusCode::OK);
    assert_eq!(registry.activations.load(Ordering::SeqCst), 1);
    gateway.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn failed_activation_is_503() {
    let registry = Registry::new();
    registry.on_activate(
        "fn",
        Arc::new(|| {
            Box::pin(async {
                Err(ActivateError::Unavailable {
                    service: "fn".into(),
                    reason: "the process exited with status 1".into(),
                })
            })
        }),
    );
    let gateway = start(
        config(vec![route("fn", "/fn/**", &[], Duration::from_secs(5))]),
        &registry,
    )
    .await;
    let client = Client::new(&gateway);
    let reply = client.get("/fn/x").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let error = &reply.json()["error"];
    assert_eq!(error["code"], "no_ready_instance");
    assert_eq!(error["message"], "no instance of `fn` became ready");
    // Internal detail stays in the log.
    assert!(!reply.json().to_string().contains("status 1"));
    gateway.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn activation_outlasting_the_route_timeout_is_503_in_time() {
    let registry = Registry::new();
    registry.on_activate("fn", Arc::new(|| Box::pin(std::future::pending())));
    let timeout = Duration::from_millis(300);
    let gateway = start(config(vec![route("fn", "/fn/**", &[], timeout)]), &registry).await;
    let client = Client::new(&gateway);
    let began = Instant::now();
    let reply = client.get("/fn/x").await;
    let took = began.elapsed();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["error"]["code"], "no_ready_instance");
    assert!(took >= timeout, "{took:?}");
    // The route timeout fired, not the client's (or nothing): the bound is
    // the property, with generous room for a loaded machine.
    assert!(took < timeout + Duration::from_secs(10), "{took:?}");
    gateway.shutdown(Duration::from_secs(5)).await;
}

/// An activation the request gave up on (its route timeout fired) is
/// dropped, not left running until the service's `ready_timeout`: one per
/// request given up on would pile up while the service is slow to start.
#[tokio::test]
async fn an_activation_given_up_on_is_dropped() {
    let registry = Registry::new();
    // One reference per activation still running.
    let running = Arc::new(());
    let held = Arc::clone(&running);
    registry.on_activate(
        "fn",
        Arc::new(move || {
            let held = Arc::clone(&held);
            Box::pin(async move {
                let _held = held;
                std::future::pending().await
            })
        }),
    );
    let gateway = start(
        config(vec![route("fn", "/fn/**", &[], Duration::from_millis(100))]),
        &registry,
    )
    .await;
    let reply = Client::new(&gateway).get("/fn/x").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    // The closure's own reference and the test's are left.
    wait_until("the activation to be dropped", || {
        Arc::strong_count(&running) == 2
    })
    .await;
    gateway.shutdown(Duration::from_secs(5)).await;
}

/// Starting an instance spawns the tasks that supervise it, and those must
/// outlive the gateway's worker threads: an activation runs on the runtime
/// the gateway was started on. Run on a worker's runtime, the task below
/// died with it at shutdown (under `flotilla up`, shutdown then waited
/// forever for the instance's supervisor).
#[tokio::test]
async fn what_an_activation_spawns_outlives_the_gateway() {
    let registry = Registry::new();
    let weak = Arc::downgrade(&registry);
    let (release, released) = tokio::sync::watch::channel(false);
    let supervised = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&supervised);
    registry.on_activate(
        "fn",
        Arc::new(move || {
            let weak = weak.clone();
            let mut released = released.clone();
            let flag = Arc::clone(&flag);
            Box::pin(async move {
                // The instance's supervisor: runs until the test lets go.
                tokio::spawn(async move {
                    let _ = released.wait_for(|r| *r).await;
                    flag.store(true, Ordering::SeqCst);
                });
                start_instance(&weak).await
            })
        }),
    );
    let gateway = start(
        config(vec![route("fn", "/fn/**", &[], Duration::from_secs(5))]),
        &registry,
    )
    .await;
    let reply = Client::new(&gateway).get("/fn/hello").await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    gateway.shutdown(Duration::from_secs(5)).await;

    let _ = release.send(true);
    wait_until("the activation's task to finish after the gateway", || {
        supervised.load(Ordering::SeqCst)
    })
    .await;
}
