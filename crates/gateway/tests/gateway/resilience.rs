//! Retries on 502/503 and connect failures, the retry budget's knobs, POST
//! idempotency, and passive outlier ejection — with one instance killed and
//! one answering 503.

use std::time::Duration;

use bytes::Bytes;
use flotilla_gateway::{Gateway, Limits};
use http::{Method, StatusCode};
use tokio::time::Instant;

use crate::support::*;

const T: Duration = Duration::from_secs(5);

fn generous_budget() -> Limits {
    Limits {
        // These tests are about retries happening; the budget is unit-tested.
        retry_budget_min_per_second: 1000,
        ..Limits::default()
    }
}

#[tokio::test]
async fn a_dead_and_a_503_instance_are_retried_around_then_ejected() {
    let registry = Registry::new();
    let mut dead = Upstream::start("ej-dead").await;
    let failing = Upstream::start("ej-503").await;
    let good = Upstream::start("ej-good").await;
    dead.kill().await;
    failing.set_status(503);
    registry.set(
        "ej",
        vec![dead.endpoint(), failing.endpoint(), good.endpoint()],
    );
    let mut cfg = config(vec![route("ej", "/**", &[], T)]);
    cfg.limits = generous_budget();
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);
    let retries_before = metric_sum(&["flotilla_gateway_retries_total", "service=\"ej\""]);

    for i in 0..40 {
        let reply = client.get(&format!("/item/{i}")).await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}: {reply:?}");
        assert_eq!(reply.instance(), "ej-good");
    }
    // Five consecutive failures each: both bad instances are out.
    assert_eq!(
        metric_sum(&["flotilla_gateway_ejections_total", "service=\"ej\""]),
        2
    );
    let retries =
        metric_sum(&["flotilla_gateway_retries_total", "service=\"ej\""]) - retries_before;
    assert!(retries >= 10, "retries: {retries}");
    assert!(
        metric_sum(&[
            "flotilla_gateway_retries_total",
            "service=\"ej\"",
            "reason=\"status_503\""
        ]) >= 5
    );
    assert!(
        metric_sum(&[
            "flotilla_gateway_retries_total",
            "service=\"ej\"",
            "reason=\"connect\""
        ]) >= 5
    );
    assert!(failing.hits() >= 5);

    // Ejected instances get nothing more (30 s, far beyond this test).
    let failing_hits = failing.hits();
    for i in 0..20 {
        let reply = client.get(&format!("/after/{i}")).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(failing.hits(), failing_hits);
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn the_last_instance_in_rotation_is_never_ejected() {
    let registry = Registry::new();
    let mut dead = Upstream::start("last-dead").await;
    let failing = Upstream::start("last-503").await;
    dead.kill().await;
    failing.set_status(503);
    registry.set("last", vec![dead.endpoint(), failing.endpoint()]);
    let mut cfg = config(vec![route("last", "/**", &[], T)]);
    cfg.limits = generous_budget();
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);
    for i in 0..30 {
        let reply = client.get(&format!("/x/{i}")).await;
        // After every retry failed, the last answer is relayed as it is.
        assert!(
            reply.status == StatusCode::SERVICE_UNAVAILABLE
                || reply.status == StatusCode::BAD_GATEWAY,
            "{reply:?}"
        );
    }
    assert_eq!(
        metric_sum(&["flotilla_gateway_ejections_total", "service=\"last\""]),
        1
    );
    // Whichever reached five failures first is out; the other, the last in
    // rotation, keeps being tried (and its answer relayed).
    let hits = failing.hits();
    let mut statuses = Vec::new();
    for i in 0..5 {
        statuses.push(client.get(&format!("/y/{i}")).await.status);
    }
    if failing.hits() > hits {
        // Each request tried it, with retries, up to three times.
        assert!((5..=15).contains(&(failing.hits() - hits)), "{statuses:?}");
        assert!(
            statuses
                .iter()
                .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE),
            "{statuses:?}"
        );
    } else {
        assert!(
            statuses.iter().all(|s| *s == StatusCode::BAD_GATEWAY),
            "{statuses:?}"
        );
    }
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn post_is_retried_only_with_an_idempotency_key() {
    let registry = Registry::new();
    let failing = Upstream::start("idem-503").await;
    let good = Upstream::start("idem-good").await;
    failing.set_status(503);
    registry.set("idem", vec![failing.endpoint(), good.endpoint()]);
    let mut cfg = config(vec![route("idem", "/**", &[], T)]);
    cfg.limits = Limits {
        // Keep the failing instance in rotation for the whole test.
        outlier_consecutive_failures: 1000,
        ..generous_budget()
    };
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);
    let body = || Bytes::from_static(b"{\"order\":1}");

    let mut unavailable = 0;
    for _ in 0..20 {
        let reply = client.request(Method::POST, "/orders", &[], body()).await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            unavailable += 1;
        }
    }
    assert!(
        unavailable > 0,
        "the 503 instance was never picked in 20 tries"
    );
    assert_eq!(failing.hits() + good.hits(), 20, "a POST was sent twice");
    assert_eq!(failing.hits(), unavailable);

    for i in 0..20 {
        let key = format!("order-{i}");
        let reply = client
            .request(
                Method::POST,
                "/orders",
                &[("idempotency-key", &key)],
                body(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.json()["body_len"], 11);
    }
    assert!(failing.hits() > unavailable, "keyed POSTs were retried");
    gateway.shutdown(T).await;
}

/// Two instances of `service`, `<service>-a` and `-b`, answering every
/// request 503.
async fn two_answering_503(
    registry: &std::sync::Arc<Registry>,
    service: &str,
) -> (Upstream, Upstream) {
    let a = Upstream::start(&format!("{service}-a")).await;
    let b = Upstream::start(&format!("{service}-b")).await;
    a.set_status(503);
    b.set_status(503);
    registry.set(service, vec![a.endpoint(), b.endpoint()]);
    (a, b)
}

#[tokio::test]
async fn a_route_s_own_retries_replace_the_gateway_s() {
    let registry = Registry::new();
    let (a, b) = two_answering_503(&registry, "rr").await;
    let mut once = route("rr", "/once/**", &[], T);
    once.retries = Some(0);
    let mut cfg = config(vec![once, route("rr", "/again/**", &[], T)]);
    cfg.limits = generous_budget();
    // Failures must not eject: these requests count attempts.
    cfg.limits.outlier_consecutive_failures = 1000;
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);

    // The gateway's retries (2): three attempts.
    let reply = client.get("/again/x").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.hits() + b.hits(), 3);
    // `retries = 0` on the route: one attempt, its answer relayed.
    for n in 1..=5 {
        let reply = client.get("/once/x").await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(a.hits() + b.hits(), 3 + n);
    }
    gateway.shutdown(T).await;
}

/// A spent retry budget stops retries, and each one it refuses is counted
/// for its service.
#[tokio::test]
async fn retries_past_the_budget_are_not_made_and_are_counted() {
    let registry = Registry::new();
    let (a, b) = two_answering_503(&registry, "spent").await;
    let mut cfg = config(vec![route("spent", "/**", &[], T)]);
    // No budget at all: every retry is past it.
    cfg.limits.retry_budget_ratio = 0.0;
    cfg.limits.retry_budget_min_per_second = 0;
    cfg.limits.outlier_consecutive_failures = 1000;
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);
    let refused = || {
        metric_sum(&[
            "flotilla_gateway_retry_budget_exhausted_total",
            "service=\"spent\"",
        ])
    };
    let before = refused();
    for _ in 0..5 {
        let reply = client.get("/x").await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(a.hits() + b.hits(), 5, "one attempt each");
    assert_eq!(refused(), before + 5);
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn retries_and_ejections_follow_a_reload_with_their_state_kept() {
    let registry = Registry::new();
    let (a, b) = two_answering_503(&registry, "rlr").await;
    let mut cfg = config(vec![route("rlr", "/**", &[], T)]);
    cfg.limits = generous_budget();
    cfg.limits.outlier_consecutive_failures = 1000;
    let gateway = start(cfg.clone(), &registry).await;
    let client = Client::new(&gateway);
    let attempts = || a.hits() + b.hits();

    // The gateway's retries (2): three attempts.
    let reply = client.get("/x").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(attempts(), 3);

    // None now: one attempt each, on the same connection.
    cfg.limits.max_retries = 0;
    ok(gateway.reload(cfg.clone()), "reload without retries");
    for n in 1..=3 {
        let reply = client.get("/x").await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(attempts(), 3 + n);
    }

    // An instance that fails twice in a row is out now: the next two
    // failures of `a` (with what it failed before) eject it, and then
    // every request goes to `b`.
    cfg.limits.outlier_consecutive_failures = 2;
    ok(
        gateway.reload(cfg.clone()),
        "reload with a stricter ejection",
    );
    let ejected = || metric_sum(&["flotilla_gateway_ejections_total", "service=\"rlr\""]);
    for _ in 0..20 {
        if ejected() > 0 {
            break;
        }
        client.get("/x").await;
    }
    assert_eq!(ejected(), 1, "one of the two ejected, never both");
    let (a_before, b_before) = (a.hits(), b.hits());
    for _ in 0..10 {
        client.get("/x").await;
    }
    let (a_more, b_more) = (a.hits() - a_before, b.hits() - b_before);
    assert!(
        (a_more, b_more) == (10, 0) || (a_more, b_more) == (0, 10),
        "all to the one left in: a {a_more}, b {b_more}"
    );

    // An invalid setting is refused, and the last good ones stay.
    cfg.limits.outlier_consecutive_failures = 0;
    assert!(gateway.reload(cfg).is_err());
    let before = attempts();
    client.get("/x").await;
    assert_eq!(attempts(), before + 1, "still no retries");
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn an_attempt_past_its_try_timeout_is_given_up_and_retried_elsewhere() {
    let registry = Registry::new();
    let hung = Upstream::start("tt-hung").await;
    let good = Upstream::start("tt-good").await;
    hung.stall();
    registry.set("tt", vec![hung.endpoint(), good.endpoint()]);
    let mut tried = route("tt", "/**", &[], Duration::from_secs(30));
    tried.try_timeout = Some(Duration::from_millis(200));
    let mut cfg = config(vec![tried]);
    cfg.limits = generous_budget();
    // Ejection would take the hung instance out of the draw: these
    // requests are to meet it.
    cfg.limits.outlier_consecutive_failures = 1000;
    let gateway = start(cfg.clone(), &registry).await;
    let client = Client::new(&gateway);
    let retried = || {
        metric_sum(&[
            "flotilla_gateway_retries_total",
            "service=\"tt\"",
            "reason=\"try_timeout\"",
        ])
    };

    // Each GET that meets the hung instance first is given up there and
    // answered by the other, well within the route's 30 s.
    let mut met = 0;
    for i in 0..40 {
        let reply = client.get(&format!("/x/{i}")).await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}: {reply:?}");
        assert_eq!(reply.instance(), "tt-good");
        met = hung.hits();
        if met >= 3 {
            break;
        }
    }
    assert!(met >= 3, "the hung instance was drawn {met} times in 40");
    assert_eq!(retried(), met as u64);

    // A request that may not be retried gets 504 once its one attempt is
    // past the try_timeout, naming it; with only the hung instance in,
    // a GET gets its retries there, each given up in turn.
    registry.set("tt", vec![hung.endpoint()]);
    let before = hung.hits();
    let reply = client
        .request(Method::POST, "/x/post", &[], Bytes::from_static(b"{}"))
        .await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        String::from_utf8_lossy(&reply.body).contains("200ms"),
        "{reply:?}"
    );
    assert_eq!(hung.hits(), before + 1);
    let reply = client.get("/x/get").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(hung.hits(), before + 4, "the attempt and its two retries");

    // A try_timeout that leaves no room within the route's is refused.
    cfg.routes[0].try_timeout = Some(Duration::from_secs(30));
    let refused = gateway.reload(cfg).err().map(|e| e.to_string());
    assert!(
        refused
            .as_deref()
            .is_some_and(|e| e.contains("try_timeout must be longer than zero and shorter")),
        "{refused:?}"
    );
    gateway.shutdown(T).await;
}

/// An instance that answers with something that is no HTTP response gets
/// 502s for its requests and is ejected as one answering 502 would be.
#[tokio::test]
async fn an_instance_answering_garbage_is_ejected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = ok(tokio::net::TcpListener::bind("127.0.0.1:0").await, "bind");
    let addr = ok(listener.local_addr(), "addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(b"HTTP/1.1 2OO Fine\r\n\r\n").await;
            });
        }
    });
    let registry = Registry::new();
    let good = Upstream::start("garbage-good").await;
    let garbage = flotilla_gateway::Endpoint {
        instance: "garbage-bad".into(),
        addr,
        load: Default::default(),
    };
    registry.set("garbage", vec![garbage, good.endpoint()]);
    let mut cfg = config(vec![route("garbage", "/**", &[], T)]);
    cfg.limits = generous_budget();
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);
    let mut bad = 0;
    for i in 0..40 {
        let reply = client.get(&format!("/x/{i}")).await;
        if reply.status == StatusCode::BAD_GATEWAY {
            bad += 1;
        } else {
            assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        }
    }
    assert_eq!(bad, 5, "five bad answers, then it is out");
    assert_eq!(
        metric_sum(&["flotilla_gateway_ejections_total", "service=\"garbage\""]),
        1
    );
    gateway.shutdown(T).await;
}

/// A client that sends its body slower than the route's timeout gets 408,
/// and the instance waiting for that body is not charged for it: were it,
/// a handful of stalled uploads at once would eject every instance but one.
#[tokio::test]
async fn a_client_too_slow_with_its_body_gets_408_and_no_instance_is_charged() {
    let registry = Registry::new();
    let a = Upstream::start("slowbody-a").await;
    let b = Upstream::start("slowbody-b").await;
    registry.set("slowbody", vec![a.endpoint(), b.endpoint()]);
    let cfg = config(vec![route(
        "slowbody",
        "/**",
        &[],
        Duration::from_millis(300),
    )]);
    let gateway = start(cfg, &registry).await;
    let addr = gateway.local_addr();

    // Twelve stalled uploads at once: more than the five consecutive
    // failures that eject an instance, on each of the two. A POST's body
    // streams to the instance (10 of its 100 bytes), and a PUT's is
    // buffered first to be retryable: both wait for the client.
    let mut uploads = tokio::task::JoinSet::new();
    for i in 0..12 {
        let method = if i % 2 == 0 { "POST" } else { "PUT" };
        let raw = format!(
            "{method} /up/{i} HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789"
        );
        uploads.spawn(async move { raw_request(addr, &raw).await });
    }
    while let Some(answer) = uploads.join_next().await {
        assert_body_timed_out(
            &ok(answer, "upload task"),
            "the request body did not arrive within 300ms",
        );
    }
    neither_was_charged(&gateway, "slowbody", &a, &b).await;
    gateway.shutdown(T).await;
}

/// A 408 for a body that did not arrive `within`.
fn assert_body_timed_out(answer: &str, message: &str) {
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");
    assert!(answer.contains(message), "{answer}");
}

/// Neither of `service`'s instances `a` and `b` was ejected, and both
/// still serve.
async fn neither_was_charged(gateway: &Gateway, service: &str, a: &Upstream, b: &Upstream) {
    assert_eq!(
        metric_sum(&[
            "flotilla_gateway_ejections_total",
            &format!("service=\"{service}\"")
        ]),
        0
    );
    let client = Client::new(gateway);
    let (a_before, b_before) = (a.hits(), b.hits());
    for i in 0..10 {
        let reply = client.get(&format!("/x/{i}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }
    assert!(a.hits() > a_before && b.hits() > b_before);
}

/// A client that pauses inside its body is timed out by `body_timeout`
/// (1 s here), not the route's `timeout` (30 s, as an upload route's may
/// be a day): 408, no instance charged, as for a body too slow for the
/// route, and the connection closed (the rest of the body is unread).
#[tokio::test]
async fn a_client_that_pauses_in_its_body_gets_408_after_body_timeout_and_no_instance_is_charged() {
    let registry = Registry::new();
    let a = Upstream::start("pausebody-a").await;
    let b = Upstream::start("pausebody-b").await;
    registry.set("pausebody", vec![a.endpoint(), b.endpoint()]);
    let mut cfg = config(vec![route(
        "pausebody",
        "/**",
        &[],
        Duration::from_secs(30),
    )]);
    cfg.limits.body_timeout = Duration::from_secs(1);
    // One failure charged ejects an instance (the other is left in).
    cfg.limits.outlier_consecutive_failures = 1;
    let gateway = start(cfg, &registry).await;
    let addr = gateway.local_addr();

    // Twelve at once: a POST's body streams to the instance, a PUT's is
    // buffered first to be retryable, and a chunked one streams. Each
    // sends 3 bytes of 10, then nothing.
    let mut uploads = tokio::task::JoinSet::new();
    for i in 0..12 {
        let framing = match i % 3 {
            0 => "POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n012",
            1 => "PUT /up HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n012",
            _ => "POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\na\r\n012",
        };
        uploads.spawn(async move {
            let began = Instant::now();
            // Read to its end: the connection is closed after the answer.
            let answer = raw_request(addr, framing).await;
            (answer, began.elapsed())
        });
    }
    while let Some(answer) = uploads.join_next().await {
        let (answer, took) = ok(answer, "upload task");
        assert_body_timed_out(
            &answer,
            "the client sent nothing more of the request body for 1s",
        );
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(10),
            "answered after {took:?}"
        );
    }
    neither_was_charged(&gateway, "pausebody", &a, &b).await;
    gateway.shutdown(T).await;
}

/// Over HTTP/2 only the stream whose body paused is answered 408; the
/// connection's other streams go on, and so does the connection.
#[tokio::test]
async fn an_http2_stream_whose_body_pauses_gets_408_and_the_connection_goes_on() {
    let registry = Registry::new();
    let up = Upstream::start("h2pause-0").await;
    registry.set("h2pause", vec![up.endpoint()]);
    let mut cfg = config(vec![route("h2pause", "/**", &[], Duration::from_secs(30))]);
    cfg.limits.body_timeout = Duration::from_secs(1);
    let gateway = start(cfg, &registry).await;
    let url = |path: &str| format!("http://{}{path}", gateway.local_addr());

    let tcp = ok(
        tokio::net::TcpStream::connect(gateway.local_addr()).await,
        "connect",
    );
    let (client, conn) = ok(h2::client::handshake(tcp).await, "h2 handshake");
    let conn = tokio::spawn(conn);
    let mut client = ok(client.ready().await, "h2 ready");
    // HEADERS without END_STREAM and 3 bytes of 10, then nothing: a POST
    // (streamed to the instance) and a PUT (buffered to be retryable).
    let mut paused = Vec::new();
    for method in [Method::POST, Method::PUT] {
        let req = ok(
            http::Request::builder()
                .method(method)
                .uri(url("/up"))
                .header("content-length", "10")
                .body(()),
            "request",
        );
        let (response, mut body) = ok(client.send_request(req, false), "send");
        ok(body.send_data(Bytes::from_static(b"012"), false), "data");
        // Kept open: dropped, it would end the stream.
        paused.push((response, body));
    }
    let began = Instant::now();
    for (response, _body) in paused {
        let res = ok(
            within("a paused stream's answer", response).await,
            "response",
        );
        assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT);
        let mut body = res.into_body();
        let mut got = Vec::new();
        while let Some(data) = within("its body", body.data()).await {
            got.extend_from_slice(&ok(data, "body data"));
        }
        let got = String::from_utf8_lossy(&got);
        assert!(got.contains("\"request_timeout\""), "{got}");
        assert!(
            got.contains("the client sent nothing more of the request body for 1s"),
            "{got}"
        );
    }
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    // Another stream on the same connection is answered.
    let req = ok(http::Request::get(url("/after")).body(()), "request");
    let (response, _) = ok(client.send_request(req, true), "send");
    let res = ok(
        within("another stream's answer", response).await,
        "response",
    );
    assert_eq!(res.status(), StatusCode::OK);
    assert!(!conn.is_finished(), "the HTTP/2 connection was closed");
    gateway.shutdown(T).await;
}

/// `body_timeout` bounds a pause, not a body: a client that sends a byte
/// every 300 ms, its body taking half again the 2 s, is never cut off
/// (each pause leaves 1.7 s of room on a loaded machine).
#[tokio::test]
async fn a_client_that_keeps_sending_its_body_slowly_is_not_cut_off_by_body_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let registry = Registry::new();
    let up = Upstream::start("dripbody-0").await;
    registry.set("dripbody", vec![up.endpoint()]);
    let mut cfg = config(vec![route("dripbody", "/**", &[], Duration::from_secs(30))]);
    cfg.limits.body_timeout = Duration::from_secs(2);
    let gateway = start(cfg, &registry).await;
    let addr = gateway.local_addr();

    let mut uploads = tokio::task::JoinSet::new();
    for (method, chunked) in [("POST", false), ("PUT", false), ("POST", true)] {
        uploads.spawn(async move {
            let framing = match chunked {
                true => "transfer-encoding: chunked",
                false => "content-length: 10",
            };
            let mut stream = ok(tokio::net::TcpStream::connect(addr).await, "connect");
            let head = format!(
                "{method} /drip HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{framing}\r\n\r\n"
            );
            ok(stream.write_all(head.as_bytes()).await, "head");
            for _ in 0..10 {
                // The pacing is the thing under test, not a wait.
                tokio::time::sleep(Duration::from_millis(300)).await;
                let byte: &[u8] = if chunked { b"1\r\nx\r\n" } else { b"x" };
                ok(stream.write_all(byte).await, "a byte");
            }
            if chunked {
                ok(stream.write_all(b"0\r\n\r\n").await, "last chunk");
            }
            let mut answer = Vec::new();
            let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer)).await;
            ok(ok(read, "read timed out"), "read");
            String::from_utf8_lossy(&answer).into_owned()
        });
    }
    while let Some(answer) = uploads.join_next().await {
        let answer = ok(answer, "upload task");
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(answer.contains("\"body_len\":10"), "{answer}");
    }
    gateway.shutdown(T).await;
}

/// An instance slow to take a body is not the client's pause: the client
/// has sent it all, the gateway holds it back (its slot toward the
/// instance full), and the instance reads nothing of it for three times
/// `body_timeout`: no 408, the instance's answer arrives.
#[tokio::test]
async fn an_instance_slow_to_read_a_body_is_not_a_client_pause() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BODY: usize = 32 << 20;
    let listener = ok(tokio::net::TcpListener::bind("127.0.0.1:0").await, "bind");
    let addr = ok(listener.local_addr(), "addr");
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let Some(head) = read_head(&mut stream).await else {
            return;
        };
        let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
        let mut read = head.len() - end;
        // More than the sockets between hold: the gateway's write waits.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut buf = vec![0u8; 64 * 1024];
        while read < BODY {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read += n,
            }
        }
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{read}",
            read.to_string().len()
        );
        let _ = stream.write_all(answer.as_bytes()).await;
    });
    let registry = Registry::new();
    registry.set(
        "slowreader",
        vec![flotilla_gateway::Endpoint {
            instance: "slowreader-0".into(),
            addr,
            load: Default::default(),
        }],
    );
    let mut slow = route("slowreader", "/**", &[], Duration::from_secs(30));
    slow.max_body_bytes = Some(BODY);
    let mut cfg = config(vec![slow]);
    cfg.limits.body_timeout = Duration::from_secs(1);
    let gateway = start(cfg, &registry).await;
    let reply = Client::new(&gateway)
        .request(Method::POST, "/up", &[], Bytes::from(vec![b'x'; BODY]))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.body, Bytes::from(BODY.to_string()));
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn a_route_s_max_in_flight_sheds_its_excess_and_leaves_the_others_room() {
    let registry = Registry::new();
    let slow = Upstream::start("bulk-slow-0").await;
    let fast = Upstream::start("bulk-fast-0").await;
    registry.set("bulk-slow", vec![slow.endpoint()]);
    registry.set("bulk-fast", vec![fast.endpoint()]);
    let mut capped = route("bulk-slow", "/capped/**", &[], Duration::from_secs(5));
    capped.max_in_flight = Some(2);
    let mut cfg = config(vec![
        capped,
        route("bulk-fast", "/fast/**", &[], Duration::from_secs(5)),
    ]);
    // The gateway's own allowance: without the route's cap, the slow
    // service's requests would take all of it. (The test upstream never
    // answers a path with `slow` in it: hence `capped`.)
    cfg.limits.max_in_flight = 4;
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);
    let shed = || metric_sum(&["flotilla_gateway_route_shed_total", "route=\"/capped/**\""]);
    let shed_before = shed();

    let held = in_background(&client, "/capped/hold", 2);
    wait_until("two requests at the slow service", || slow.held() == 2).await;
    let excess = futures_util::future::join_all((0..5).map(|_| client.get("/capped/hold"))).await;
    for reply in &excess {
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.json()["error"]["code"], "route_overloaded");
        assert_eq!(reply.header("retry-after"), "1");
        let message = reply.json()["error"]["message"].to_string();
        assert!(message.contains("bulk-slow"), "{message}");
    }
    assert_eq!(slow.hits(), 2, "the excess never reached the service");
    assert_eq!(shed(), shed_before + 5);
    // The other route has the rest of the gateway's room.
    for _ in 0..2 {
        assert_eq!(client.get("/fast/x").await.status, StatusCode::OK);
    }

    slow.release();
    for h in held {
        assert_eq!(ok(h.await, "held").status, StatusCode::OK);
    }
    // A place is given back once the response body is sent, which the
    // client may see a moment before the gateway does: poll.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while client.get("/capped/x").await.status != StatusCode::OK {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still refused after the load went"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gateway.shutdown(Duration::from_secs(5)).await;
}

/// An instance may close a kept-alive connection (or write into it) just
/// as the gateway sends the next request on it, before the gateway could
/// see it had. Such a request is sent again on a fresh connection: the
/// client gets its answer, and the instance is neither retried around nor
/// charged a failure toward ejection (it closed an idle connection, as it
/// may). Each instance here answers one request per connection and gives
/// out at the next: every reuse meets a stale connection.
#[tokio::test]
async fn a_stale_pooled_connection_costs_neither_the_client_nor_the_instance() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;
    let stale = Arc::new(AtomicUsize::new(0));
    let mut endpoints = Vec::new();
    for name in ["stale-pool-a", "stale-pool-b"] {
        let listener = ok(tokio::net::TcpListener::bind("127.0.0.1:0").await, "bind");
        let addr = ok(listener.local_addr(), "addr");
        let stale = Arc::clone(&stale);
        tokio::spawn(async move {
            let mut conn_no = 0usize;
            while let Ok((mut stream, _)) = listener.accept().await {
                conn_no += 1;
                // Half the connections close, half write what is no
                // response and close.
                let garbage = conn_no.is_multiple_of(2);
                let stale = Arc::clone(&stale);
                tokio::spawn(async move {
                    if read_head(&mut stream).await.is_none() {
                        return;
                    }
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                    if read_head(&mut stream).await.is_some() {
                        stale.fetch_add(1, Ordering::SeqCst);
                        if garbage {
                            let _ = stream.write_all(b"\0garbage\r\n\r\n").await;
                        }
                    }
                });
            }
        });
        endpoints.push(flotilla_gateway::Endpoint {
            instance: name.into(),
            addr,
            load: Default::default(),
        });
    }
    let registry = Registry::new();
    registry.set("stale-pool", endpoints);
    let mut cfg = config(vec![route("stale-pool", "/**", &[], T)]);
    // One worker, so one pool: each request after the first two finds a
    // pooled connection.
    cfg.limits.workers = 1;
    // Any failure held against an instance ejects it.
    cfg.limits.outlier_consecutive_failures = 1;
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);
    for i in 0..20 {
        let reply = client.get(&format!("/s/{i}")).await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}: {reply:?}");
        assert_eq!(reply.body, "ok", "request {i}");
    }
    let met = stale.load(Ordering::SeqCst);
    assert!(met >= 10, "only {met} requests met a stale connection");
    // A POST without an `Idempotency-Key` may not be sent twice (the
    // instance may have acted on it): it gets 502, but the instance is not
    // held to account for it either. Each instance's connections go stale,
    // fresh, stale…: of 8, at least 3 meet a stale one.
    let mut refused = 0;
    for i in 0..8 {
        let path = format!("/p/{i}");
        let reply = client
            .request(Method::POST, &path, &[], Bytes::from_static(b"x"))
            .await;
        if reply.status == StatusCode::BAD_GATEWAY {
            assert_eq!(reply.json()["error"]["code"], "bad_gateway");
            refused += 1;
        } else {
            assert_eq!(reply.status, StatusCode::OK, "POST {i}: {reply:?}");
        }
    }
    assert!(refused >= 3, "{refused} POSTs met a stale connection");
    assert_eq!(
        metric_sum(&["flotilla_gateway_ejections_total", "service=\"stale-pool\""]),
        0
    );
    assert_eq!(
        metric_sum(&["flotilla_gateway_retries_total", "service=\"stale-pool\""]),
        0
    );
    gateway.shutdown(T).await;
}
