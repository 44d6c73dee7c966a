//! Mirrored routes (`mirror`): what a copy may cost the client whose
//! request is copied, and the gateway that copies it.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use flotilla_gateway::Endpoint;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::support::*;

/// Copies out at once across the gateway (`mirror::MAX_IN_FLIGHT`).
const MAX_COPIES: usize = 256;

/// `flotilla_gateway_mirrored_total` for copies to `service` that ended
/// as `result`.
fn copies(service: &str, result: &str) -> u64 {
    metric_sum(&[
        "flotilla_gateway_mirrored_total",
        &format!("service=\"{service}\""),
        &format!("result=\"{result}\""),
    ])
}

/// A body small enough to copy is read whole before the request goes on,
/// and a client that never sends it must not hold the request (and the
/// route's and the gateway's places) for ever: it gets the 408 it would
/// get without a mirror, within the route's timeout, and nothing is sent
/// anywhere.
#[tokio::test]
async fn a_mirrored_request_whose_body_never_comes_gets_408_and_frees_its_place() {
    let _places = MIRROR_PLACES.read().await;
    let registry = Registry::new();
    let live = Upstream::start("slowcopy-0").await;
    let shadow = Upstream::start("slowcopy-shadow-0").await;
    registry.set("slowcopy", vec![live.endpoint()]);
    registry.set("slowcopy-shadow", vec![shadow.endpoint()]);
    let mut mirrored = route("slowcopy", "/**", &[], Duration::from_millis(300));
    mirrored.mirror = vec![("slowcopy-shadow".to_string(), 100)];
    // One place: a request still holding it would shed the next.
    mirrored.max_in_flight = Some(1);
    let gateway = start(config(vec![mirrored]), &registry).await;
    let addr = gateway.local_addr();

    // None of the body, and a tenth of it; a POST would stream to the
    // instance without a mirror, and a PUT be buffered to be retryable.
    for raw in [
        "POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 65000\r\n\r\n",
        "PUT /up HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789",
    ] {
        let answer = raw_request(addr, raw).await;
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
        assert!(answer.contains("\"request_timeout\""), "{answer}");
        assert!(
            answer.contains("the request body did not arrive within 300ms"),
            "{answer}"
        );
    }
    assert_eq!(live.hits(), 0, "a request without its body was forwarded");
    assert_eq!(shadow.hits(), 0, "a request without its body was copied");

    // The route's one place is free again, and a whole body is copied.
    let reply = Client::new(&gateway)
        .request(Method::POST, "/up", &[], Bytes::from_static(b"0123456789"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.json()["body_len"], 10);
    wait_until("the whole request's copy", || shadow.hits() == 1).await;
    gateway.shutdown(Duration::ZERO).await;
}

/// A client that pauses in a body the mirror reads to copy gets the 408 of
/// `body_timeout` (1 s here) there, long before the route's 30 s, and
/// nothing is sent anywhere. The route's one instance is down: a request
/// forwarded would get 502, so the 408 says that none was.
#[tokio::test]
async fn a_mirrored_request_whose_body_pauses_gets_408_after_body_timeout() {
    let _places = MIRROR_PLACES.read().await;
    let registry = Registry::new();
    let mut live = Upstream::start("pausecopy-0").await;
    live.kill().await;
    let shadow = Upstream::start("pausecopy-shadow-0").await;
    registry.set("pausecopy", vec![live.endpoint()]);
    registry.set("pausecopy-shadow", vec![shadow.endpoint()]);
    let mut mirrored = route("pausecopy", "/**", &[], Duration::from_secs(30));
    mirrored.mirror = vec![("pausecopy-shadow".to_string(), 100)];
    let mut cfg = config(vec![mirrored]);
    cfg.limits.body_timeout = Duration::from_secs(1);
    let gateway = start(cfg, &registry).await;
    let began = tokio::time::Instant::now();
    let answer = raw_request(
        gateway.local_addr(),
        "POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(
        answer.contains("the client sent nothing more of the request body for 1s"),
        "{answer}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(shadow.hits(), 0, "a request without its body was copied");
    gateway.shutdown(Duration::ZERO).await;
}

/// The route's timeout runs from when the request is forwarded, its body
/// included: the wait for a body the mirror reads to copy it is part of
/// it, not taken before it. Body 1 s late, the instance answering at
/// 2.5 s, a 2 s route: 504, as without a mirror (it was 200, the forward's
/// own 2 s starting after the body). Half a second either side, for a
/// loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wait_for_a_copied_body_is_part_of_the_route_s_timeout() {
    let _places = MIRROR_PLACES.read().await;
    let registry = Registry::new();
    let live = Upstream::start("latebody-0").await;
    let shadow = Upstream::start("latebody-shadow-0").await;
    registry.set("latebody", vec![live.endpoint()]);
    registry.set("latebody-shadow", vec![shadow.endpoint()]);
    let mut mirrored = route("latebody", "/**", &[], Duration::from_secs(2));
    mirrored.mirror = vec![("latebody-shadow".to_string(), 100)];
    let gateway = start(config(vec![mirrored]), &registry).await;

    let sent = tokio::time::Instant::now();
    let mut stream = ok(TcpStream::connect(gateway.local_addr()).await, "connect");
    let head = "POST /hold HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 10\r\n\r\n";
    ok(stream.write_all(head.as_bytes()).await, "write the head");
    // The client's pace, not a wait for a condition.
    tokio::time::sleep_until(sent + Duration::from_secs(1)).await;
    ok(stream.write_all(b"0123456789").await, "write the body");
    wait_until("the request at the instance", || live.held() == 1).await;
    tokio::time::sleep_until(sent + Duration::from_millis(2500)).await;
    live.release();
    let mut answer = Vec::new();
    ok(
        within("the answer", stream.read_to_end(&mut answer)).await,
        "read",
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 504 "), "{answer}");
    assert!(answer.contains("\"upstream_timeout\""), "{answer}");
    gateway.shutdown(Duration::ZERO).await;
}

/// With every copy's place taken, a request's copy is dropped: its body
/// must then not be read ahead for it, and the request goes on at once,
/// as on a route without a mirror (its body streamed to the instance as it
/// comes).
#[tokio::test]
async fn with_every_copy_out_a_request_is_not_held_for_its_body() {
    let _places = MIRROR_PLACES.write().await;
    let registry = Registry::new();
    let live = Upstream::start("fullcopy-0").await;
    let mut shadow = Upstream::start("fullcopy-shadow-0").await;
    registry.set("fullcopy", vec![live.endpoint()]);
    registry.set("fullcopy-shadow", vec![shadow.endpoint()]);
    // Long enough that no copy gives up before the shadow is killed.
    let mut mirrored = route("fullcopy", "/**", &[], Duration::from_secs(60));
    mirrored.mirror = vec![("fullcopy-shadow".to_string(), 100)];
    let gateway = start(config(vec![mirrored]), &registry).await;
    let client = Client::new(&gateway);
    let failed_before = copies("fullcopy-shadow", "failed");

    // Every place taken by a copy the shadow never answers.
    shadow.stall();
    for i in 0..MAX_COPIES {
        let reply = client.get(&format!("/fill/{i}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }
    wait_until("every copy at the shadow", || shadow.hits() == MAX_COPIES).await;
    let overloaded = copies("fullcopy-shadow", "overloaded");

    // A POST with a body small enough to copy, a tenth of it sent.
    let mut stream = ok(TcpStream::connect(gateway.local_addr()).await, "connect");
    let head = "POST /up HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 100\r\n\r\n";
    ok(
        stream
            .write_all(format!("{head}0123456789").as_bytes())
            .await,
        "write",
    );
    wait_until("the request at the instance before its whole body", || {
        live.hits() == MAX_COPIES + 1
    })
    .await;
    assert_eq!(
        copies("fullcopy-shadow", "overloaded"),
        overloaded + 1,
        "the copy was not dropped"
    );
    ok(stream.write_all(&[b'x'; 90]).await, "write the rest");
    let mut answer = Vec::new();
    ok(
        within("the answer", stream.read_to_end(&mut answer)).await,
        "read",
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.contains("\"body_len\":100"), "{answer}");
    assert_eq!(shadow.hits(), MAX_COPIES, "a copy was sent past the cap");

    // Every place freed before another test needs one.
    shadow.kill().await;
    wait_until("every copy given up", || {
        copies("fullcopy-shadow", "failed") >= failed_before + MAX_COPIES as u64
    })
    .await;
    gateway.shutdown(Duration::ZERO).await;
}

/// The length of a [`large_answer`]: far more than the kernel buffers of
/// the connection between the shadow and the gateway hold.
const LARGE_ANSWER: usize = 64 << 20;

/// A shadow instance that answers one request with [`LARGE_ANSWER`]
/// bytes, with a `Content-Length` or `chunked`, and says how many it
/// wrote before the gateway closed the connection (`Err`), or that it
/// wrote them all (`Ok`).
async fn large_answer(chunked: bool) -> (SocketAddr, JoinHandle<Result<usize, usize>>) {
    let listener = ok(TcpListener::bind("127.0.0.1:0").await, "bind shadow");
    let addr = ok(listener.local_addr(), "shadow addr");
    let answering = tokio::spawn(async move {
        let (mut stream, _) = ok(listener.accept().await, "accept");
        assert!(read_head(&mut stream).await.is_some(), "no request head");
        let (head, chunk) = if chunked {
            let mut chunk = b"10000\r\n".to_vec();
            chunk.extend_from_slice(&[b'x'; 0x10000]);
            chunk.extend_from_slice(b"\r\n");
            ("transfer-encoding: chunked".to_string(), chunk)
        } else {
            (
                format!("content-length: {LARGE_ANSWER}"),
                vec![b'x'; 0x10000],
            )
        };
        let head = format!("HTTP/1.1 200 OK\r\n{head}\r\n\r\n");
        ok(stream.write_all(head.as_bytes()).await, "write head");
        let mut written = 0;
        while written < LARGE_ANSWER {
            if stream.write_all(&chunk).await.is_err() {
                return Err(written);
            }
            written += 0x10000;
        }
        if chunked && stream.write_all(b"0\r\n\r\n").await.is_err() {
            return Err(written);
        }
        Ok(written)
    });
    (addr, answering)
}

/// A mirror's answer is thrown away: it must not be read whole into
/// memory (256 copies out at once, each with an answer of tens of
/// megabytes, would take gigabytes), nor be read on past what keeping its
/// connection is worth. The gateway stops reading and closes the
/// connection, which the shadow sees as its writes failing before the
/// whole answer is out.
#[tokio::test]
async fn a_mirror_s_large_answer_is_not_read_whole() {
    let _places = MIRROR_PLACES.read().await;
    let registry = Registry::new();
    let live = Upstream::start("bigcopy-0").await;
    registry.set("bigcopy", vec![live.endpoint()]);
    let mut mirrored = route("bigcopy", "/**", &[], Duration::from_secs(30));
    mirrored.mirror = vec![("bigcopy-shadow".to_string(), 100)];
    let gateway = start(config(vec![mirrored]), &registry).await;
    let client = Client::new(&gateway);

    for (n, chunked) in [false, true].into_iter().enumerate() {
        let (addr, answering) = large_answer(chunked).await;
        registry.set(
            "bigcopy-shadow",
            vec![Endpoint {
                instance: format!("bigcopy-shadow-{n}"),
                addr,
                load: Default::default(),
            }],
        );
        let reply = client.get("/items").await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.instance(), "bigcopy-0");
        let written = ok(within("the shadow's answer", answering).await, "shadow");
        assert!(
            written.is_err(),
            "chunked {chunked}: the gateway read the mirror's whole answer ({written:?} bytes)"
        );
        // It answered: counted so, however little of it was read.
        wait_until("the copy counted", || {
            copies("bigcopy-shadow", "answered") == n as u64 + 1
        })
        .await;
    }
    gateway.shutdown(Duration::ZERO).await;
}
