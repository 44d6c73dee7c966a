//! Functions from zero through the gateway and through the L4 service
//! address, back to zero when idle; services scaling up under load.

use std::time::Duration;

use flotilla_runtime::InstanceState;

use tokio::task::JoinHandle;

use crate::support::{Harness, client, host_port, identity, start, tls_get};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_to_a_function_at_zero_is_held_then_served() {
    let h = start(
        r#"[services.fn]
shape = "function"
run = { command = ["python3", "HELLO"] }
scale = { idle = "300ms" }
routes = [{ path = "/fn/**" }]
"#,
    )
    .await;
    assert_eq!(h.service("fn").instances.len(), 0, "starts at zero");
    // Straight to the service address, as a caller's FLOTILLA_URL_FN would:
    // mutual TLS end to end through the L4 address.
    let addr = host_port(&h.system().endpoints().services["fn"].address);
    let caller = identity(&h, "caller");
    let response = tls_get(&caller, "fn", &addr, "/via-address").await.unwrap();
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    assert!(response.contains("\"instance\": \"fn-0\""), "{response}");

    // No traffic for `idle`: back to zero.
    h.wait("fn to scale to zero", Duration::from_secs(10), |h| {
        h.service("fn").instances.is_empty()
    })
    .await;

    // And from zero again through the gateway.
    let r = client()
        .get(format!("{}/fn/again", h.gateway()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_scales_up_under_load_and_back_down_when_idle() {
    let h = start(
        r#"[services.busy]
run = { command = ["python3", "HELLO"] }
scale = { min = 1, max = 3, target_concurrency = 2, idle = "500ms" }
routes = [{ path = "/busy/**" }]
"#,
    )
    .await;
    assert_eq!(h.service("busy").instances.len(), 1);
    let http = client();
    // Six slow requests in flight against a target of two per instance,
    // each sent again as it is answered, until the scale-up is seen (a
    // cold start slower than one request's time must not let the load go).
    let (done, _) = tokio::sync::watch::channel(false);
    let mut held = Vec::new();
    for _ in 0..6 {
        let (http, url) = (http.clone(), format!("{}/busy/sleep?ms=1000", h.gateway()));
        let done = done.subscribe();
        held.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            loop {
                statuses.push(http.get(&url).send().await.map(|r| r.status().as_u16()));
                if *done.borrow() {
                    return statuses;
                }
            }
        }));
    }
    h.wait(
        "busy to scale to its max of 3",
        Duration::from_secs(30),
        |h| h.service("busy").ready == 3,
    )
    .await;
    done.send_replace(true);
    for r in held {
        for status in r.await.unwrap() {
            assert_eq!(status.unwrap(), 200);
        }
    }
    h.wait(
        "busy to scale back to min 1",
        Duration::from_secs(15),
        |h| h.service("busy").instances.len() == 1,
    )
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_at_zero_is_started_by_a_gateway_request() {
    let h = start(
        r#"[services.fn]
shape = "function"
run = { command = ["python3", "HELLO"] }
routes = [{ path = "/fn/**" }]
"#,
    )
    .await;
    let r = client()
        .get(format!("{}/fn/hello", h.gateway()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-served-by"], "fn-0");
    assert_eq!(h.service("fn").ready, 1);
    h.stop().await;
}

/// A function's instance out of rotation (failing `/readyz` but alive)
/// serves nothing: it is stopped, and the next request starts a fresh one
/// instead of waiting for it until its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_s_instance_out_of_rotation_is_replaced() {
    let flags = tempfile::tempdir().unwrap();
    let unready = flags.path().join("unready");
    let h = start(&format!(
        r#"[services.fn]
shape = "function"
run = {{ command = ["sh", "-c", "[ -e {flag}.used ] && rm -f {flag}; touch {flag}.used; exec python3 HELLO"] }}
env = {{ UNREADY_FILE = "{flag}" }}
scale = {{ idle = "1h" }}
routes = [{{ path = "/fn/**", timeout = "5m" }}]
"#,
        flag = unready.display()
    ))
    .await;
    let http = client();
    let url = format!("{}/fn/x", h.gateway());
    assert_eq!(http.get(&url).send().await.unwrap().status(), 200);
    // fn-0 fails /readyz from now on; the next start clears the flag.
    std::fs::write(&unready, "").unwrap();
    // Stopped: with an `idle` of an hour, not for idleness.
    h.wait("fn-0 stopped", Duration::from_secs(30), |h| {
        h.service("fn").instances.is_empty()
    })
    .await;
    let answered = http.get(&url).send().await.unwrap();
    assert_eq!(answered.status(), 200);
    h.stop().await;
}

/// Function `fn`, whose instance `fn-N` fails `/readyz` while the file
/// `<flags>/fn-N` exists (so one instance at a time can be taken out of
/// rotation), with `scale`, behind `/fn/**`. Never retried: a request cut
/// by an instance's stop must show as such, not be answered by another.
async fn function_with_flags(flags: &std::path::Path, scale: &str) -> Harness {
    start(&format!(
        r#"[services.fn]
shape = "function"
run = {{ command = ["sh", "-c", "UNREADY_FILE={dir}/$FLOTILLA_INSTANCE exec python3 HELLO"] }}
scale = {{ {scale} }}
ready_timeout = "10m"
routes = [{{ path = "/fn/**", timeout = "5m", retries = 0 }}]
"#,
        dir = flags.display()
    ))
    .await
}

/// `GET /fn/sleep?ms=<ms>` through `h`'s gateway, in a task of its own:
/// the answer's status and body.
fn sleep_request(h: &Harness, ms: u32) -> JoinHandle<reqwest::Result<(u16, String)>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let url = format!("{}/fn/sleep?ms={ms}", h.gateway());
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()?;
        let r = http.get(url).send().await?;
        let status = r.status().as_u16();
        r.text().await.map(|body| (status, body))
    })
}

/// Waits until `fn`'s only instance is fn-1.
async fn wait_for_fn_1_alone(h: &Harness) {
    h.wait("fn-0 stopped, fn-1 left", Duration::from_secs(30), |h| {
        let ids: Vec<String> = h
            .service("fn")
            .instances
            .into_iter()
            .map(|i| i.id)
            .collect();
        ids == ["fn-1"]
    })
    .await;
}

/// A function's only instance that leaves rotation (failing `/readyz`)
/// while a request is in flight on it finishes that request: it is
/// stopped once the request is answered, not under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_out_of_rotation_finishes_its_requests_before_it_stops() {
    let flags = tempfile::tempdir().unwrap();
    let h = function_with_flags(flags.path(), r#"idle = "1h""#).await;
    let get = |ms: u32| sleep_request(&h, ms);
    // Held far longer than leaving rotation takes (three failed probes a
    // second apart).
    let held = get(20000);
    h.wait(
        "the request in flight on fn-0",
        Duration::from_secs(30),
        |h| h.service("fn").instances.iter().any(|i| i.in_flight == 1),
    )
    .await;
    // fn-0 fails /readyz from now on.
    std::fs::write(flags.path().join("fn-0"), "").unwrap();
    h.wait("fn-0 out of rotation", Duration::from_secs(30), |h| {
        h.service("fn").ready == 0
    })
    .await;
    let fn0 = h.service("fn");
    assert!(
        fn0.instances
            .iter()
            .any(|i| i.state == InstanceState::Unready && i.in_flight == 1),
        "fn-0 kept, finishing its request: {fn0:#?}"
    );
    // A request now does not wait for fn-0's to end: another instance
    // starts for it beside fn-0.
    let (status, body) = get(0).await.unwrap().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"instance\": \"fn-1\""), "{body}");
    assert!(
        !held.is_finished(),
        "the new request waited for fn-0's to end"
    );
    let (status, body) = held.await.unwrap().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"instance\": \"fn-0\""), "{body}");
    // Its request answered, it serves nothing: stopped (with an `idle` of
    // an hour, not for idleness); fn-1 stays.
    wait_for_fn_1_alone(&h).await;
    h.stop().await;
}

/// The same with another instance ready beside it, enough for the load:
/// the one out of rotation is still not stopped under its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_out_of_rotation_beside_a_ready_one_finishes_its_requests() {
    let flags = tempfile::tempdir().unwrap();
    let h = function_with_flags(flags.path(), r#"max = 2, concurrency = 1, idle = "1h""#).await;
    let get = |ms: u32| sleep_request(&h, ms);
    let long = get(20000);
    h.wait(
        "the long request in flight on fn-0",
        Duration::from_secs(30),
        |h| h.service("fn").instances.iter().any(|i| i.in_flight == 1),
    )
    .await;
    // A second request on fn-0 against a concurrency of one starts fn-1.
    let short = get(3000);
    h.wait("fn-1 ready", Duration::from_secs(30), |h| {
        h.service("fn").ready == 2
    })
    .await;
    let (status, body) = short.await.unwrap().unwrap();
    assert_eq!(status, 200, "{body}");
    // fn-1 alone can take the load that is left; fn-0 fails /readyz.
    std::fs::write(flags.path().join("fn-0"), "").unwrap();
    h.wait("fn-0 out of rotation", Duration::from_secs(30), |h| {
        h.service("fn").ready == 1
    })
    .await;
    let status_now = h.service("fn");
    assert!(
        status_now
            .instances
            .iter()
            .any(|i| i.id == "fn-0" && i.state == InstanceState::Unready && i.in_flight == 1),
        "fn-0 kept, finishing its request: {status_now:#?}"
    );
    let (status, body) = long.await.unwrap().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"instance\": \"fn-0\""), "{body}");
    wait_for_fn_1_alone(&h).await;
    h.stop().await;
}

/// Scaled up for a burst, a service scales back down under a trickle of
/// requests that one instance takes easily, though the balancer spreads
/// the trickle so that no instance is ever idle for `idle` on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_scales_down_under_a_trickle_that_fewer_instances_take() {
    let h = start(
        r#"[services.busy]
run = { command = ["python3", "HELLO"] }
scale = { min = 1, max = 3, target_concurrency = 2, idle = "1s" }
routes = [{ path = "/busy/**" }]
"#,
    )
    .await;
    let http = client();
    // Held long enough that the load is still there when the instances it
    // started are ready, however slowly they start (else the first of
    // them may go again before all three were ever ready).
    let mut held = Vec::new();
    for _ in 0..6 {
        let (http, url) = (http.clone(), format!("{}/busy/sleep?ms=8000", h.gateway()));
        held.push(tokio::spawn(async move {
            http.get(url).send().await.map(|r| r.status().as_u16())
        }));
    }
    h.wait(
        "busy to scale to its max of 3",
        Duration::from_secs(30),
        |h| h.service("busy").ready == 3,
    )
    .await;
    for r in held {
        assert_eq!(r.await.unwrap().unwrap(), 200);
    }
    // One request every 100 ms until told to stop; their statuses.
    let (done, mut stop) = tokio::sync::watch::channel(false);
    let trickle = {
        let (http, url) = (http.clone(), format!("{}/busy/trickle", h.gateway()));
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            let mut every = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = stop.changed() => return statuses,
                }
                statuses.push(
                    http.get(&url)
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .ok(),
                );
            }
        })
    };
    h.wait(
        "busy to scale back to min 1 under the trickle",
        Duration::from_secs(30),
        |h| h.service("busy").instances.len() == 1,
    )
    .await;
    done.send(true).unwrap();
    let statuses = trickle.await.unwrap();
    assert!(
        statuses.iter().all(|s| *s == Some(200)),
        "every request answered: {statuses:?}"
    );
    h.stop().await;
}
