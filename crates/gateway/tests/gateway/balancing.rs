//! Load balancing over instances, and retries when one dies.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::support::*;

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn load_spreads_over_two_instances() {
    let registry = Registry::new();
    let a = Upstream::start("svc-a").await;
    let b = Upstream::start("svc-b").await;
    registry.set("svc", vec![a.endpoint(), b.endpoint()]);
    let gateway = start(config(vec![route("svc", "/**", &[], T)]), &registry).await;
    let client = Client::new(&gateway);

    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..100 {
        let reply = client.get("/x").await;
        assert_eq!(reply.status, StatusCode::OK);
        *seen.entry(reply.instance()).or_default() += 1;
    }
    // Equal load: each pick is a coin toss; 100 tosses land 20–80 with
    // overwhelming probability.
    for name in ["svc-a", "svc-b"] {
        let n = seen.get(name).copied().unwrap_or(0);
        assert!(n >= 20, "{name} got {n} of 100: {seen:?}");
    }
    // Every request's load guard is released once its body is done.
    wait_until("load to return to zero", || {
        a.load.in_flight() == 0 && b.load.in_flight() == 0
    })
    .await;
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn the_less_loaded_instance_gets_new_requests() {
    let registry = Registry::new();
    let busy = Upstream::start("busy").await;
    let idle = Upstream::start("idle").await;
    registry.set("svc", vec![busy.endpoint(), idle.endpoint()]);
    let gateway = start(config(vec![route("svc", "/**", &[], T)]), &registry).await;
    let client = Client::new(&gateway);

    // A request held on `busy` counts as in flight there until it is done.
    let c = client.clone();
    registry.set("svc", vec![busy.endpoint()]);
    let held = tokio::spawn(async move { c.get("/hold").await });
    wait_until("the request to be held", || busy.held() == 1).await;
    assert_eq!(busy.load.in_flight(), 1);
    registry.set("svc", vec![busy.endpoint(), idle.endpoint()]);

    // The runtime's own traffic on the same counters counts as well.
    let others: Vec<_> = (0..2).map(|_| busy.load.begin()).collect();
    for _ in 0..20 {
        assert_eq!(client.get("/x").await.instance(), "idle");
    }
    busy.release();
    assert_eq!(ok(held.await, "held request").status, StatusCode::OK);
    drop(others);
    wait_until("the held request's load to end", || {
        busy.load.in_flight() == 0
    })
    .await;
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn killing_an_instance_loses_no_get() {
    let registry = Registry::new();
    let mut a = Upstream::start("svc-a").await;
    let b = Upstream::start("svc-b").await;
    // The registry keeps listing `a` after it dies, as the runtime would
    // until its health check notices: the gateway must cope on its own.
    registry.set("svc", vec![a.endpoint(), b.endpoint()]);
    let mut cfg = config(vec![route("svc", "/**", &[], T)]);
    // The retries this takes (every request in flight at `a`, and those
    // that meet it before it is ejected) are about retrying, not the
    // budget (unit-tested): 20 % of a second's requests, when the kill
    // comes early in a second of a test that lasts a tenth of one, can be
    // fewer than that.
    cfg.limits.retry_budget_min_per_second = 1000;
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);

    const TOTAL: usize = 200;
    const WORKERS: usize = 8;
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (client, next, done, failures) = (
            client.clone(),
            Arc::clone(&next),
            Arc::clone(&done),
            Arc::clone(&failures),
        );
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::SeqCst) < TOTAL {
                match client
                    .try_request(Method::GET, "/item", &[], Bytes::new())
                    .await
                {
                    Ok(reply) if reply.status == StatusCode::OK => {}
                    Ok(reply) => {
                        eprintln!(
                            "failed: {} {}",
                            reply.status,
                            String::from_utf8_lossy(&reply.body)
                        );
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        eprintln!("failed: {e}");
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    wait_until("a quarter of the requests", || {
        done.load(Ordering::SeqCst) >= TOTAL / 4
    })
    .await;
    let a_before_kill = a.hits();
    a.kill().await;
    for w in workers {
        ok(w.await, "worker");
    }
    assert_eq!(done.load(Ordering::SeqCst), TOTAL);
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "requests failed while an instance died"
    );
    assert!(a_before_kill > 0, "both instances served before the kill");
    assert!(b.hits() > TOTAL / 2, "the survivor took over: {}", b.hits());
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn requests_in_flight_on_a_dying_instance_are_retried_unless_post() {
    let registry = Registry::new();
    let mut a = Upstream::start("svc-a").await;
    let b = Upstream::start("svc-b").await;
    b.release(); // `b` answers `/hold` at once
    registry.set("svc", vec![a.endpoint()]);
    let gateway = start(config(vec![route("svc", "/**", &[], T)]), &registry).await;
    let client = Client::new(&gateway);

    let mut gets = Vec::new();
    for _ in 0..3 {
        let c = client.clone();
        gets.push(tokio::spawn(async move {
            c.try_request(Method::GET, "/hold", &[], Bytes::new()).await
        }));
    }
    let c = client.clone();
    let post = tokio::spawn(async move {
        c.try_request(Method::POST, "/hold", &[], Bytes::from_static(b"{}"))
            .await
    });
    wait_until("requests to be held on a", || a.held() == 4).await;
    registry.set("svc", vec![a.endpoint(), b.endpoint()]);
    // Their connections close before response headers.
    a.kill().await;

    for get in gets {
        let reply = ok(ok(get.await, "task"), "GET");
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.instance(), "svc-b");
    }
    let reply = ok(ok(post.await, "task"), "POST");
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.json()["error"]["code"], "bad_gateway");
    assert_eq!(b.hits(), 3, "the POST was not retried");
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn an_unreachable_only_instance_is_502() {
    let registry = Registry::new();
    let mut dead = Upstream::start("dead").await;
    dead.kill().await;
    registry.set("svc", vec![dead.endpoint()]);
    let gateway = start(config(vec![route("svc", "/**", &[], T)]), &registry).await;
    let client = Client::new(&gateway);
    let reply = client.get("/x").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    let error = &reply.json()["error"];
    assert_eq!(error["code"], "upstream_unreachable");
    assert_eq!(error["request_id"], reply.header("x-request-id"));
    // Never retried past the retry budget, and the guard was released.
    assert_eq!(dead.load.in_flight(), 0);

    // POST is not retried either way, and still says why.
    let reply = client
        .request(Method::POST, "/x", &[], Bytes::from_static(b"{}"))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    gateway.shutdown(T).await;
}
