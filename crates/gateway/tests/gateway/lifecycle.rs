//! Start, reload, timeouts and graceful shutdown.

use std::time::Duration;

use flotilla_gateway::{Error, Gateway, Upstreams};
use http::StatusCode;
use tokio::time::Instant;

use crate::support::*;

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_slow_upstream_is_504_within_the_route_timeout() {
    let registry = Registry::new();
    let up = Upstream::start("slow-0").await;
    registry.set("svc", vec![up.endpoint()]);
    let timeout = Duration::from_millis(300);
    let gateway = start(config(vec![route("svc", "/**", &[], timeout)]), &registry).await;
    let client = Client::new(&gateway);

    let began = Instant::now();
    let reply = client.get("/slow").await;
    let took = began.elapsed();
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    let error = &reply.json()["error"];
    assert_eq!(error["code"], "upstream_timeout");
    assert_eq!(error["message"], "`svc` did not answer within 300ms");
    assert!(took >= timeout, "{took:?}");
    // The timeout fired, not the client's (or nothing): the bound is the
    // property, with generous room for a loaded machine.
    assert!(took < timeout + Duration::from_secs(10), "{took:?}");
    wait_until("the abandoned request's load to end", || {
        up.load.in_flight() == 0
    })
    .await;
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    an_in_flight_request_finishes_during_shutdown(Client::new).await;
}

/// h2c connections are told to go away (GOAWAY) and finish their streams.
#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_h2c_request_finish() {
    an_in_flight_request_finishes_during_shutdown(Client::h2c).await;
}

async fn an_in_flight_request_finishes_during_shutdown(client: fn(&Gateway) -> Client) {
    let registry = Registry::new();
    let up = Upstream::start("svc-0").await;
    registry.set("svc", vec![up.endpoint()]);
    let gateway = start(config(vec![route("svc", "/**", &[], T)]), &registry).await;
    let addr = gateway.local_addr();
    let client = client(&gateway);

    let c = client.clone();
    let in_flight = tokio::spawn(async move { c.get("/hold").await });
    wait_until("the request to reach the upstream", || up.held() == 1).await;

    let shutdown = tokio::spawn(gateway.shutdown(T));
    // No new connections once shutdown has begun...
    let deadline = Instant::now() + PATIENCE;
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after shutdown");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !shutdown.is_finished(),
        "shutdown waits for the in-flight request"
    );
    // ...but the one in flight completes.
    up.release();
    let reply = ok(in_flight.await, "in-flight request");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.instance(), "svc-0");
    ok(
        tokio::time::timeout(PATIENCE, shutdown).await,
        "shutdown finished",
    )
    .unwrap_or(());
}

#[tokio::test]
async fn shutdown_closes_what_is_still_open_at_the_deadline() {
    let registry = Registry::new();
    let up = Upstream::start("svc-0").await;
    registry.set("svc", vec![up.endpoint()]);
    let gateway = start(config(vec![route("svc", "/**", &[], T)]), &registry).await;
    let client = Client::new(&gateway);
    let c = client.clone();
    let in_flight = tokio::spawn(async move {
        c.try_request(http::Method::GET, "/hold", &[], bytes::Bytes::new())
            .await
    });
    wait_until("the request to reach the upstream", || up.held() == 1).await;
    let began = Instant::now();
    gateway.shutdown(Duration::from_millis(200)).await;
    // The deadline cut the held request off rather than waiting for it:
    // the bound is the property, with generous room for a loaded machine.
    let took = began.elapsed();
    assert!(took < Duration::from_secs(15), "{took:?}");
    let result = ok(in_flight.await, "in-flight task");
    assert!(result.is_err(), "the connection was closed: {result:?}");
    wait_until("the upstream load to end", || up.load.in_flight() == 0).await;
}

#[tokio::test]
async fn a_taken_address_is_a_clear_bind_error() {
    let registry = Registry::new();
    let first = start(config(vec![]), &registry).await;
    let mut cfg = config(vec![]);
    cfg.listen = first.local_addr();
    let upstreams: std::sync::Arc<dyn Upstreams> = registry.clone();
    match Gateway::start(cfg, upstreams).await {
        Err(e @ Error::Bind { .. }) => {
            let message = e.to_string();
            assert!(
                message.contains(&first.local_addr().to_string()),
                "{message}"
            );
            assert!(message.contains("already in use"), "{message}");
            assert!(message.contains("--listen"), "{message}");
        }
        Err(other) => panic!("expected Error::Bind, got {other}"),
        Ok(_) => panic!("two gateways bound {}", first.local_addr()),
    }
    first.shutdown(T).await;
}

#[tokio::test]
async fn a_missing_static_dir_fails_start() {
    let dir = TestDir::new();
    let mut cfg = config(vec![]);
    cfg.static_dir = Some(dir.path().join("nope"));
    let registry = Registry::new();
    let upstreams: std::sync::Arc<dyn Upstreams> = registry.clone();
    match Gateway::start(cfg, upstreams).await {
        Err(e @ Error::StaticDir { .. }) => assert!(e.to_string().contains("nope"), "{e}"),
        Err(other) => panic!("expected Error::StaticDir, got {other}"),
        Ok(_) => panic!("started without its static dir"),
    }
}

#[tokio::test]
async fn reload_swaps_routes_while_in_flight_requests_keep_theirs() {
    let registry = Registry::new();
    let old = Upstream::start("old-0").await;
    let new = Upstream::start("new-0").await;
    registry.set("old", vec![old.endpoint()]);
    registry.set("new", vec![new.endpoint()]);
    let gateway = start(config(vec![route("old", "/**", &[], T)]), &registry).await;
    let client = Client::new(&gateway);

    let c = client.clone();
    let in_flight = tokio::spawn(async move { c.get("/hold").await });
    wait_until("the request to reach the old service", || old.held() == 1).await;

    ok(
        gateway.reload(config(vec![route("new", "/**", &[], T)])),
        "reload",
    );
    assert_eq!(client.get("/x").await.instance(), "new-0");
    assert_eq!(client.get("/old/gone").await.instance(), "new-0");

    old.release();
    let reply = ok(in_flight.await, "in-flight request");
    assert_eq!(reply.instance(), "old-0");
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn silent_and_idle_connections_do_not_delay_shutdown() {
    let registry = Registry::new();
    let up = Upstream::start("svc-0").await;
    registry.set("svc", vec![up.endpoint()]);
    let gateway = start(config(vec![route("svc", "/**", &[], T)]), &registry).await;
    // One connection that never says anything, one idle after a request.
    let _silent = ok(
        tokio::net::TcpStream::connect(gateway.local_addr()).await,
        "connect",
    );
    let client = Client::new(&gateway);
    assert_eq!(client.get("/x").await.status, StatusCode::OK);

    let began = Instant::now();
    gateway.shutdown(Duration::from_secs(30)).await;
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        began.elapsed()
    );
}
