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

/// Three instances of `svc` behind a route keeping clients by `affinity`.
async fn sticky_gateway(
    affinity: &str,
) -> (
    Arc<Registry>,
    Vec<Upstream>,
    flotilla_gateway::Gateway,
    Client,
) {
    let registry = Registry::new();
    let mut ups = Vec::new();
    for name in ["svc-a", "svc-b", "svc-c"] {
        ups.push(Upstream::start(name).await);
    }
    registry.set("svc", ups.iter().map(Upstream::endpoint).collect());
    let mut r = route("svc", "/**", &[], T);
    r.affinity = Some(ok(flotilla_gateway::Affinity::parse(affinity), "affinity"));
    let mut cfg = config(vec![r]);
    // Retries are about where they go here, not the budget; and a failing
    // instance stays in rotation, so that its clients can be seen to come
    // back (an ejected one is skipped as a tried one is).
    cfg.limits.retry_budget_min_per_second = 1000;
    cfg.limits.outlier_consecutive_failures = 1000;
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);
    (registry, ups, gateway, client)
}

/// Where `n` requests with `fields` went: each instance and its count.
async fn spread(client: &Client, fields: &[(&str, &str)], n: usize) -> HashMap<String, usize> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..n {
        let reply = client
            .request(Method::GET, "/cart", fields, Bytes::new())
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        *seen.entry(reply.instance()).or_default() += 1;
    }
    seen
}

#[tokio::test]
async fn a_cookie_keeps_a_browser_on_its_instance_and_is_made_up_when_missing() {
    let (_registry, ups, gateway, client) = sticky_gateway("cookie:flotilla-sticky").await;

    // A first visit: balanced freely, and given a cookie to come back with.
    let first = client.get("/cart").await;
    assert_eq!(first.status, StatusCode::OK);
    let set = first.header("set-cookie").to_string();
    assert!(
        set.starts_with("flotilla-sticky=") && set.ends_with("; Path=/; HttpOnly; SameSite=Lax"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap_or_default().to_string();
    // With it, every request goes where the first did (even with other
    // cookies around it), and no new cookie is set.
    let with = format!("theme=dark; {cookie}");
    for _ in 0..30 {
        let reply = client
            .request(Method::GET, "/cart", &[("cookie", &with)], Bytes::new())
            .await;
        assert_eq!(reply.instance(), first.instance());
        assert_eq!(reply.header("set-cookie"), "");
    }

    // Different clients' cookies spread over the instances.
    let mut owners: HashMap<String, usize> = HashMap::new();
    for i in 0..60 {
        let value = format!("flotilla-sticky=client-{i}");
        let seen = spread(&client, &[("cookie", &value)], 3).await;
        assert_eq!(seen.len(), 1, "client {i} moved: {seen:?}");
        for (instance, _) in seen {
            *owners.entry(instance).or_default() += 1;
        }
    }
    // 20 expected each; all three take a fair share.
    for up in &ups {
        let n = owners.get(&up.name).copied().unwrap_or(0);
        assert!(n >= 8, "{} kept {n} of 60 clients: {owners:?}", up.name);
    }
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn a_failing_instance_s_clients_move_together_and_come_back() {
    let (_registry, ups, gateway, client) = sticky_gateway("header:x-cart").await;
    let fields = [("x-cart", "cart-17")];
    let home = spread(&client, &fields, 5).await;
    assert_eq!(home.len(), 1, "{home:?}");
    let home = home.into_keys().next().unwrap_or_default();
    let Some(failing) = ups.iter().find(|u| u.name == home) else {
        panic!("no instance named {home}");
    };

    // Its instance answers 503: each request is retried, and always on
    // the same other instance (the key's next choice), never lost.
    failing.set_status(503);
    let moved = spread(&client, &fields, 10).await;
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert!(!moved.contains_key(&home), "{moved:?}");
    // Once the instance answers again (and is no longer ejected), the
    // client goes back to it.
    failing.set_status(0);
    let back = spread(&client, &fields, 1).await;
    assert!(back.contains_key(&home), "{back:?}");

    // Requests without the header are balanced as on any route.
    let free = spread(&client, &[], 60).await;
    assert!(free.len() >= 2, "{free:?}");
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn affinity_by_user_needs_a_route_with_users() {
    let mut r = route("svc", "/**", &[], T);
    r.affinity = Some(flotilla_gateway::Affinity::User);
    let error = start_error(config(vec![r]), "a public route kept by user").await;
    assert!(
        error.contains("keeps clients on an instance by user"),
        "{error}"
    );
}

#[tokio::test]
async fn a_sticky_split_keeps_each_client_on_one_version() {
    let registry = Registry::new();
    let stable = Upstream::start("stable-0").await;
    let canary = Upstream::start("canary-0").await;
    registry.set("svc", vec![stable.endpoint()]);
    registry.set("canary", vec![canary.endpoint()]);
    let mut r = route("svc", "/**", &[], T);
    r.split = vec![("canary".into(), 30)];
    r.affinity = Some(flotilla_gateway::Affinity::Cookie("v".into()));
    let gateway = start(config(vec![r]), &registry).await;
    let client = Client::new(&gateway);

    // A new visitor gets its cookie, and its version with it.
    let first = client.get("/page").await;
    let cookie = first
        .header("set-cookie")
        .split(';')
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(cookie.starts_with("v="), "{first:?}");
    let again = spread(&client, &[("cookie", &cookie)], 10).await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert!(again.contains_key(&first.instance()), "{again:?}");

    // 100 visitors: each on one version, about 30 on the canary.
    let mut on_canary = 0;
    for i in 0..100 {
        let value = format!("v=visitor-{i}");
        let seen = spread(&client, &[("cookie", &value)], 3).await;
        assert_eq!(seen.len(), 1, "visitor {i} moved: {seen:?}");
        if seen.contains_key("canary-0") {
            on_canary += 1;
        }
    }
    assert!(
        (12..=50).contains(&on_canary),
        "{on_canary} of 100 on the canary"
    );
    // Counted under the service that answered.
    let canary_requests = metric_sum(&[
        "flotilla_gateway_requests_total",
        "route=\"/**\"",
        "service=\"canary\"",
    ]);
    assert!(canary_requests >= 3 * on_canary as u64, "{canary_requests}");
    gateway.shutdown(T).await;
}
