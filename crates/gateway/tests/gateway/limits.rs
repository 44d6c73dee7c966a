//! Protective limits: body size (413), header size and count (431), slow
//! and idle clients (408, close), and load shedding (503).

use std::time::Duration;

use bytes::Bytes;
use flotilla_gateway::Limits;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::*;

const T: Duration = Duration::from_secs(5);

/// Reads one response (head and `content-length` body) from `stream`.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if out.len() >= end + 4 + len {
                return text;
            }
        }
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => panic!("read failed after {:?}: {e}", String::from_utf8_lossy(&out)),
            Err(_) => panic!("no complete response: {:?}", String::from_utf8_lossy(&out)),
        };
        if n == 0 {
            return String::from_utf8_lossy(&out).into_owned();
        }
        out.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let registry = Registry::new();
    let up = Upstream::start("body-0").await;
    registry.set("body", vec![up.endpoint()]);
    let mut small = route("body", "/small/**", &[], T);
    small.max_body_bytes = Some(1024);
    let gateway = start(config(vec![route("body", "/**", &[], T), small]), &registry).await;
    let client = Client::new(&gateway);

    // Default limit, 1 MiB: declared length over it.
    let reply = client
        .request(
            Method::POST,
            "/x",
            &[],
            Bytes::from(vec![b'x'; 1024 * 1024 + 1]),
        )
        .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.json()["error"]["code"], "payload_too_large");
    let reply = client
        .request(
            Method::POST,
            "/x",
            &[],
            Bytes::from(vec![b'x'; 1024 * 1024]),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    // A route's own limit.
    let reply = client
        .request(Method::PUT, "/small/x", &[], Bytes::from(vec![b'x'; 2048]))
        .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(up.hits(), 1);

    // Chunked, so no length to check up front: caught as it streams.
    let mut stream = ok(TcpStream::connect(gateway.local_addr()).await, "connect");
    let mut raw =
        String::from("POST /small/up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n");
    for _ in 0..4 {
        raw.push_str(&format!("3e8\r\n{}\r\n", "y".repeat(1000)));
    }
    raw.push_str("0\r\n\r\n");
    ok(stream.write_all(raw.as_bytes()).await, "write");
    let answer = read_response(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn oversized_heads_get_431_not_a_reset() {
    let registry = Registry::new();
    let up = Upstream::start("head-0").await;
    registry.set("head", vec![up.endpoint()]);
    let gateway = start(config(vec![route("head", "/**", &[], T)]), &registry).await;

    // 256 KiB of headers against the 64 KiB default.
    let stream = ok(TcpStream::connect(gateway.local_addr()).await, "connect");
    let mut raw = String::from("GET /x HTTP/1.1\r\nhost: x\r\n");
    for i in 0..64 {
        raw.push_str(&format!("x-big-{i}: {}\r\n", "b".repeat(4096)));
    }
    raw.push_str("\r\n");
    // The client may still be writing when the answer comes: write from
    // another task, as a real client's kernel would.
    let (mut reader, mut writer) = stream.into_split();
    let write = tokio::spawn(async move {
        let _ = writer.write_all(raw.as_bytes()).await;
        writer
    });
    let mut answer = Vec::new();
    let read = tokio::time::timeout(PATIENCE, reader.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(
        matches!(read, Ok(Ok(_))),
        "the connection was reset instead of answered: {read:?} {answer}"
    );
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let _ = write.await;

    // Too many headers: also 431.
    let mut stream = ok(TcpStream::connect(gateway.local_addr()).await, "connect");
    let mut raw = String::from("GET /x HTTP/1.1\r\nhost: x\r\n");
    for i in 0..150 {
        raw.push_str(&format!("x-h-{i}: v\r\n"));
    }
    raw.push_str("\r\n");
    ok(stream.write_all(raw.as_bytes()).await, "write");
    let answer = read_response(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(up.hits(), 0);
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn a_client_too_slow_with_its_headers_gets_408_but_idle_keep_alive_does_not() {
    let registry = Registry::new();
    let up = Upstream::start("slowloris-0").await;
    registry.set("slowloris", vec![up.endpoint()]);
    let mut cfg = config(vec![route("slowloris", "/**", &[], T)]);
    let timeout = Duration::from_millis(500);
    cfg.limits = Limits {
        header_read_timeout: timeout,
        idle_timeout: Duration::from_secs(30),
        ..Limits::default()
    };
    let gateway = start(cfg, &registry).await;

    let mut stream = ok(TcpStream::connect(gateway.local_addr()).await, "connect");
    let began = Instant::now();
    ok(
        stream
            .write_all(b"GET /x HTTP/1.1\r\nhost: x\r\nx-a: 1\r\n")
            .await,
        "write",
    );
    let answer = read_response(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(began.elapsed() >= timeout, "{:?}", began.elapsed());

    // Idle between requests is not slow: the head clock starts at its
    // first byte. (This sleep is the thing under test, not a wait.)
    let mut stream = ok(TcpStream::connect(gateway.local_addr()).await, "connect");
    ok(
        stream
            .write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
            .await,
        "write",
    );
    assert!(read_response(&mut stream).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(timeout * 2).await;
    ok(
        stream
            .write_all(b"GET /b HTTP/1.1\r\nhost: x\r\n\r\n")
            .await,
        "write",
    );
    assert!(read_response(&mut stream).await.starts_with("HTTP/1.1 200"));
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let registry = Registry::new();
    let up = Upstream::start("idle-0").await;
    registry.set("idle", vec![up.endpoint()]);
    let mut cfg = config(vec![route("idle", "/**", &[], T)]);
    cfg.limits.idle_timeout = Duration::from_millis(300);
    let gateway = start(cfg, &registry).await;
    let mut stream = ok(TcpStream::connect(gateway.local_addr()).await, "connect");
    ok(
        stream
            .write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
            .await,
        "write",
    );
    assert!(read_response(&mut stream).await.starts_with("HTTP/1.1 200"));
    let began = Instant::now();
    let mut buf = [0u8; 16];
    let n = ok(
        ok(
            tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await,
            "close in time",
        ),
        "read",
    );
    assert_eq!(n, 0, "closed without a word");
    assert!(
        began.elapsed() >= Duration::from_millis(250),
        "{:?}",
        began.elapsed()
    );
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn past_max_in_flight_requests_are_shed_with_503() {
    let registry = Registry::new();
    let up = Upstream::start("shed-0").await;
    registry.set("shed", vec![up.endpoint()]);
    let mut cfg = config(vec![route("shed", "/**", &[], T)]);
    cfg.limits.max_in_flight = 2;
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);
    let held: Vec<_> = (0..2)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.get("/hold").await })
        })
        .collect();
    wait_until("two requests in flight", || up.held() == 2).await;
    let reply = client.get("/x").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["error"]["code"], "overloaded");
    assert_eq!(reply.header("retry-after"), "1");
    up.release();
    for h in held {
        assert_eq!(ok(h.await, "held").status, StatusCode::OK);
    }
    // A request counts until its response body is sent, which the client
    // may see a moment before the gateway does: poll.
    let deadline = Instant::now() + PATIENCE;
    while client.get("/x").await.status != StatusCode::OK {
        assert!(
            Instant::now() < deadline,
            "still shedding after the load went"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gateway.shutdown(T).await;
}
