//! Protective limits: body size (413), header size and count (431), slow
//! and idle clients (408, close), load shedding (503), and connection
//! limits (in all and per client address).

use std::time::Duration;

use bytes::Bytes;
use flotilla_gateway::{Gateway, Limits};
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

    // Over HTTP/2 too, where only the head's bytes were bounded; each
    // cookie a field of its own there, as browsers send them, counts as
    // the one field HTTP/1 joins them into.
    let h2 = Client::h2c(&gateway);
    let names: Vec<String> = (0..150).map(|i| format!("x-h-{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    let reply = h2.request(Method::GET, "/x", &many, Bytes::new()).await;
    assert_eq!(
        reply.status,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "{reply:?}"
    );
    assert_eq!(reply.json()["error"]["code"], "headers_too_large");
    assert_eq!(up.hits(), 0);
    let crumbs: Vec<String> = (0..150).map(|i| format!("c{i}=v")).collect();
    let cookies: Vec<(&str, &str)> = crumbs.iter().map(|c| ("cookie", c.as_str())).collect();
    let reply = h2.request(Method::GET, "/x", &cookies, Bytes::new()).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
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
    let held = in_background(&client, "/hold", 2);
    wait_until("two requests in flight", || up.held() == 2).await;
    let shed = || metric_sum(&["flotilla_gateway_shed_total"]);
    let shed_before = shed();
    let reply = client.get("/x").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["error"]["code"], "overloaded");
    assert_eq!(reply.header("retry-after"), "1");
    // `shed_total` has no labels (a request is shed before any route is
    // looked for), so other tests' gateways in this process add to the
    // same counter: only that it grew can be checked, not by how much.
    assert!(shed() > shed_before, "the 503 was not counted");
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

/// A connection to the gateway from `source` (any 127.0.0.0/8 address).
async fn connect_from(source: &str, gateway: &flotilla_gateway::Gateway) -> TcpStream {
    let socket = ok(tokio::net::TcpSocket::new_v4(), "socket");
    ok(
        socket.bind(ok(format!("{source}:0").parse(), "source address")),
        "bind the source address",
    );
    ok(socket.connect(gateway.local_addr()).await, "connect")
}

/// Whether a request on `stream` is answered 200 (the connection was kept).
async fn served(stream: &mut TcpStream) -> bool {
    ok(
        stream
            .write_all(b"GET /x HTTP/1.1\r\nhost: gw\r\n\r\n")
            .await,
        "write",
    );
    read_response(stream).await.starts_with("HTTP/1.1 200")
}

/// Whether the gateway closed `stream` without answering: end of stream
/// or a reset, and not a byte of a response.
async fn closed_unanswered(stream: &mut TcpStream) -> bool {
    // The write may land before the close does; the read tells.
    let _ = stream
        .write_all(b"GET /x HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// Waits until a connection made by `connect` is served again, once the
/// gateway has seen a close the client made a moment ago: polled.
async fn a_place_is_freed<F: std::future::Future<Output = TcpStream>>(connect: impl Fn() -> F) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut next = connect().await;
        if !closed_unanswered(&mut next).await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the closed connection's place was never freed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn refused(reason: &str) -> u64 {
    metric_sum(&[
        "flotilla_gateway_connections_refused_total",
        &format!("reason=\"{reason}\""),
    ])
}

#[tokio::test]
async fn connections_past_max_connections_are_closed_at_once() {
    let registry = Registry::new();
    let up = Upstream::start("conns-0").await;
    registry.set("conns", vec![up.endpoint()]);
    let mut cfg = config(vec![route("conns", "/**", &[], T)]);
    cfg.limits.max_connections = 2;
    let gateway = start(cfg, &registry).await;

    let mut first = connect_from("127.0.0.1", &gateway).await;
    let mut second = connect_from("127.0.0.1", &gateway).await;
    assert!(served(&mut first).await && served(&mut second).await);
    let before = refused("max_connections");
    let mut third = connect_from("127.0.0.1", &gateway).await;
    assert!(
        closed_unanswered(&mut third).await,
        "a third connection was served"
    );
    assert!(refused("max_connections") > before, "not counted");
    // Kept-alive connections stay served meanwhile.
    assert!(served(&mut first).await);

    // A closed connection frees its place (once the gateway has seen the
    // close, a moment after the client made it: poll).
    drop(second);
    a_place_is_freed(|| connect_from("127.0.0.1", &gateway)).await;
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn one_address_is_limited_but_others_and_trusted_proxies_are_not() {
    limited_by_address(false).await;
}

#[tokio::test]
async fn clients_a_proxy_protocol_header_names_are_limited_by_their_own_address() {
    limited_by_address(true).await;
}

/// Two connections per client address, from 127.0.0.2 and 127.0.0.4, and
/// none for the trusted proxy at 127.0.0.3. With `proxy_protocol`, all of
/// them come through one balancer (127.0.0.5, trusted), whose headers name
/// them.
async fn limited_by_address(proxy_protocol: bool) {
    let registry = Registry::new();
    let service = if proxy_protocol { "ppip" } else { "perip" };
    let up = Upstream::start(&format!("{service}-0")).await;
    registry.set(service, vec![up.endpoint()]);
    let mut cfg = config(vec![route(service, "/**", &[], T)]);
    cfg.limits.max_connections_per_ip = 2;
    cfg.ip = Some(flotilla_gateway::IpConfig {
        trusted_proxies: ok(
            flotilla_gateway::parse_nets(&["127.0.0.3", "127.0.0.5"]),
            "nets",
        ),
        proxy_protocol,
        ..flotilla_gateway::IpConfig::default()
    });
    let gateway = start(cfg, &registry).await;
    let connect = |client: &'static str| {
        let gateway = &gateway;
        async move {
            if !proxy_protocol {
                return connect_from(client, gateway).await;
            }
            let mut stream = connect_from("127.0.0.5", gateway).await;
            let head = format!("PROXY TCP4 {client} 127.0.0.1 40000 8080\r\n");
            ok(
                stream.write_all(head.as_bytes()).await,
                "write the PROXY header",
            );
            stream
        }
    };

    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = connect("127.0.0.2").await;
        assert!(served(&mut c).await);
        held.push(c);
    }
    let before = refused("max_connections_per_ip");
    let mut over = connect("127.0.0.2").await;
    assert!(
        closed_unanswered(&mut over).await,
        "a third from one address was served"
    );
    assert!(refused("max_connections_per_ip") > before, "not counted");
    // Another address has places of its own.
    let mut other = connect("127.0.0.4").await;
    assert!(served(&mut other).await);
    // A load balancer carries many clients: not limited by its address.
    for _ in 0..4 {
        let mut c = connect("127.0.0.3").await;
        assert!(
            served(&mut c).await,
            "a trusted proxy's connection was refused"
        );
        held.push(c);
    }
    // A closed connection gives its address's place back (once the
    // gateway has seen the close: poll).
    held.remove(0);
    a_place_is_freed(|| connect("127.0.0.2")).await;
    gateway.shutdown(T).await;
}

/// HTTP/1.1 has one response at a time, so its connection is closed; an
/// HTTP/2 connection carries others (a browser's whole page), so only the
/// unread stream is reset and the connection goes on.
#[tokio::test]
async fn a_client_that_reads_nothing_of_a_response_is_cut_off_after_body_timeout() {
    let registry = Registry::new();
    let up = Upstream::start("unread-0").await;
    registry.set("unread", vec![up.endpoint()]);
    let mut cfg = config(vec![route("unread", "/**", &[], T)]);
    cfg.limits.body_timeout = Duration::from_millis(300);
    let gateway = start(cfg, &registry).await;

    // HTTP/1.1: the request, then nothing read.
    let mut h1 = ok(TcpStream::connect(gateway.local_addr()).await, "connect");
    ok(
        h1.write_all(b"GET /bigbody HTTP/1.1\r\nhost: x\r\n\r\n")
            .await,
        "write",
    );
    // HTTP/2: the head read, the body never (its window stays shut).
    let h2 = ok(TcpStream::connect(gateway.local_addr()).await, "connect");
    let (mut sender, conn) = ok(
        hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(h2),
        )
        .await,
        "h2 handshake",
    );
    let h2_conn = tokio::spawn(conn);
    let req = ok(
        http::Request::get(format!("http://{}/bigbody", gateway.local_addr()))
            .body(http_body_util::Empty::<Bytes>::new()),
        "request",
    );
    let res = ok(sender.send_request(req).await, "h2 response");
    assert_eq!(res.status(), StatusCode::OK);

    // Both are given up (a request is counted as its response ends),
    // neither client having the whole body.
    wait_until("both responses given up", || {
        metric_sum(&["flotilla_gateway_requests_total", "service=\"unread\""]) >= 2
    })
    .await;
    // The unread HTTP/2 stream was reset: its body ends in an error.
    let body =
        tokio::time::timeout(PATIENCE, http_body_util::BodyExt::collect(res.into_body())).await;
    match body {
        Ok(Err(e)) => {
            let reset = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<h2::Error>())
                .and_then(h2::Error::reason);
            assert_eq!(reset, Some(h2::Reason::CANCEL), "{e:?}");
        }
        Ok(Ok(b)) => panic!(
            "HTTP/2: the body ended without a reset ({} bytes)",
            b.to_bytes().len()
        ),
        Err(_) => panic!("HTTP/2: the unread stream was kept"),
    }
    // ... and the connection still serves: another stream on it is answered
    // whole, then the connection is still open.
    let again = ok(
        http::Request::get(format!("http://{}/after", gateway.local_addr()))
            .body(http_body_util::Empty::<Bytes>::new()),
        "request",
    );
    let res = ok(
        within("a second stream's answer", sender.send_request(again)).await,
        "a second stream",
    );
    assert_eq!(res.status(), StatusCode::OK);
    ok(
        http_body_util::BodyExt::collect(res.into_body()).await,
        "the second stream's body",
    );
    assert!(!h2_conn.is_finished(), "the HTTP/2 connection was closed");
    let mut h1_got = Vec::new();
    let read = tokio::time::timeout(PATIENCE, h1.read_to_end(&mut h1_got)).await;
    assert!(read.is_ok(), "the HTTP/1.1 connection was kept");
    assert!(h1_got.len() < BIG_BODY, "HTTP/1.1: the whole body came");
    gateway.shutdown(T).await;
}

/// HTTP/2 "rapid reset" (CVE-2023-44487): a client opens streams and
/// resets each at once, so none counts against the concurrent-stream limit
/// while every one may cost the server a request to an instance. The
/// gateway ends such a connection with `GOAWAY` `ENHANCE_YOUR_CALM`, after
/// few of its streams reached the instance.
#[tokio::test]
async fn an_http2_client_resetting_every_stream_it_opens_is_cut_off() {
    const STREAMS: usize = 2000;
    let registry = Registry::new();
    let up = Upstream::start("reset-0").await;
    registry.set("reset", vec![up.endpoint()]);
    let gateway = start(config(vec![route("reset", "/**", &[], T)]), &registry).await;

    let tcp = ok(TcpStream::connect(gateway.local_addr()).await, "connect");
    let (mut client, conn) = ok(h2::client::handshake(tcp).await, "h2 handshake");
    let conn = tokio::spawn(conn);
    let mut sent = 0;
    for i in 0..STREAMS {
        let req = ok(
            http::Request::get(format!("http://{}/hold/{i}", gateway.local_addr())).body(()),
            "request",
        );
        let Ok((_, mut stream)) = client.send_request(req, true) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        sent += 1;
        if i % 20 == 19 {
            // Let the frames out, as an attacker streams them.
            tokio::task::yield_now().await;
        }
    }
    let ended = within("the gateway's end of the connection", conn).await;
    let err = match ended {
        Ok(Err(e)) => e,
        other => panic!("the connection ended without an error: {other:?}"),
    };
    assert!(err.is_go_away(), "{err:?}");
    assert_eq!(err.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{err:?}");
    let reached = up.hits();
    eprintln!("sent {sent} streams, {reached} reached the instance");
    assert!(
        reached < STREAMS / 10,
        "{reached} of {sent} reset streams reached the instance"
    );
    gateway.shutdown(T).await;
}

/// HTTP/2 "MadeYouReset" (CVE-2025-8671): a client makes the server reset
/// the streams it opens (here a `PRIORITY` frame making each stream depend
/// on itself, a stream error), so none counts against the concurrent-stream
/// limit. (Its other ways, a `WINDOW_UPDATE` of 0 or `DATA` after a
/// stream's end, end the connection at once.) The gateway ends such a
/// connection with `GOAWAY` `ENHANCE_YOUR_CALM` once it has reset 1024 of
/// its streams (h2's `max_local_error_reset_streams`; fewer of the resets
/// are on the wire by then), few if any having reached the instance, and
/// keeps serving others.
#[tokio::test]
async fn an_http2_client_making_the_gateway_reset_its_streams_is_cut_off() {
    const STREAMS: u32 = 3000;
    const GET_HOLD: &[u8] = &[
        0x82, // :method GET (static table 2)
        0x86, // :scheme http (6)
        0x04, 5, b'/', b'h', b'o', b'l', b'd', // :path, literal, not indexed
        0x01, 1, b'x', // :authority
    ];
    let registry = Registry::new();
    let up = Upstream::start("made-reset-0").await;
    registry.set("made-reset", vec![up.endpoint()]);
    let gateway = start(config(vec![route("made-reset", "/**", &[], T)]), &registry).await;

    let stream = ok(TcpStream::connect(gateway.local_addr()).await, "connect");
    let (mut rx, mut tx) = stream.into_split();
    let attack = tokio::spawn(async move {
        let mut out = h2_raw::preface();
        for i in 0..STREAMS {
            let id = 2 * i + 1;
            // HEADERS, END_STREAM | END_HEADERS; then PRIORITY on itself.
            out.extend(h2_raw::frame(0x1, 0x5, id, GET_HOLD));
            let mut priority = id.to_be_bytes().to_vec();
            priority.push(16);
            out.extend(h2_raw::frame(0x2, 0, id, &priority));
            if i % 100 == 99 {
                if tx.write_all(&out).await.is_err() {
                    return i + 1;
                }
                out.clear();
            }
        }
        STREAMS
    });
    // The gateway's frames, until its GOAWAY.
    let go_away = async {
        let mut resets = 0u32;
        while let Some(frame) = h2_raw::read_frame(&mut rx).await {
            match frame.kind {
                0x3 => resets += 1,
                0x7 => {
                    let debug = String::from_utf8_lossy(frame.payload.get(8..).unwrap_or_default());
                    return Some((frame.error_code(), debug.into_owned(), resets));
                }
                _ => {}
            }
        }
        None
    };
    let (code, debug, resets) = within("the gateway's GOAWAY", go_away)
        .await
        .unwrap_or_else(|| panic!("the connection ended without a GOAWAY"));
    let sent = ok(within("the attack's writes", attack).await, "the attack");
    let reached = up.hits();
    eprintln!(
        "sent {sent} streams; {resets} reset, {reached} reached the instance; GOAWAY {code} {debug:?}"
    );
    assert_eq!(
        code, 0xb,
        "GOAWAY's error code ({debug}), not ENHANCE_YOUR_CALM"
    );
    assert!(
        resets < 1100,
        "{resets} streams reset before the connection was ended"
    );
    assert!(
        (reached as u32) < STREAMS / 10,
        "{reached} of {sent} reset streams reached the instance"
    );
    // Others are served still.
    let client = Client::new(&gateway);
    let reply = client.get("/after").await;
    assert_eq!(reply.status, StatusCode::OK);
    gateway.shutdown(T).await;
}

/// The `max_connection_age` of the tests of it: the least there is.
const AGE: Duration = Duration::from_secs(1);

/// A gateway in front of one instance of `service` (named after it),
/// with its limits as `limit` sets them.
async fn limited(service: &str, limit: impl FnOnce(&mut Limits)) -> (Upstream, Gateway) {
    let registry = Registry::new();
    let up = Upstream::start(&format!("{service}-0")).await;
    registry.set(service, vec![up.endpoint()]);
    let mut cfg = config(vec![route(service, "/**", &[], T)]);
    limit(&mut cfg.limits);
    (up, start(cfg, &registry).await)
}

/// Held by every test that closes connections for their age or request
/// count, so that each counts exactly what it adds to the process's
/// `flotilla_gateway_connections_expired_total`.
static EXPIRING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn expired(reason: &str) -> u64 {
    metric_sum(&[
        "flotilla_gateway_connections_expired_total",
        &format!("reason=\"{reason}\""),
    ])
}

/// Whether a response's head says `connection: close`.
fn says_close(response: &str) -> bool {
    let head = response.split("\r\n\r\n").next().unwrap_or_default();
    head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close")
        })
    })
}

/// What `stream` still sends until it ends (a reset counts as the end);
/// fails if it does not end within [`PATIENCE`].
async fn rest_until_closed(stream: &mut TcpStream) -> String {
    let mut rest = Vec::new();
    let read = within("the connection's close", stream.read_to_end(&mut rest)).await;
    if let Err(e) = read {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }
    String::from_utf8_lossy(&rest).into_owned()
}

/// `max_connection_requests`: the last response a connection may carry
/// says `connection: close`, the connection closes once it is written,
/// and a request pipelined behind it is not answered (nor forwarded).
#[tokio::test]
async fn an_http1_connection_closes_after_max_connection_requests() {
    let _expiring = EXPIRING.lock().await;
    let (up, gateway) = limited("conn-requests", |l| l.max_connection_requests = 3).await;
    let before = expired("max_connection_requests");

    let mut stream = ok(TcpStream::connect(gateway.local_addr()).await, "connect");
    for n in 1..=2 {
        ok(
            stream
                .write_all(format!("GET /{n} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await,
            "write",
        );
        let answer = read_response(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{n}: {answer}");
        assert!(!says_close(&answer), "{n}: {answer}");
    }
    // The third, with a fourth pipelined behind it in the same write.
    ok(
        stream
            .write_all(b"GET /3 HTTP/1.1\r\nhost: x\r\n\r\nGET /4 HTTP/1.1\r\nhost: x\r\n\r\n")
            .await,
        "write",
    );
    let answer = read_response(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(says_close(&answer), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    let rest = rest_until_closed(&mut stream).await;
    assert!(rest.is_empty(), "the pipelined fourth was answered: {rest}");
    assert_eq!(up.paths(), ["/1", "/2", "/3"]);
    assert_eq!(expired("max_connection_requests"), before + 1);

    // Without the limit, the same exchange keeps the connection.
    let (_instance, unlimited) = limited("conn-unlimited", |_| {}).await;
    let mut stream = ok(TcpStream::connect(unlimited.local_addr()).await, "connect");
    for _ in 0..4 {
        assert!(served(&mut stream).await);
    }
    unlimited.shutdown(T).await;
    gateway.shutdown(T).await;
}

/// `max_connection_age`: a request in progress as the connection comes of
/// age is finished, its response says `connection: close` and the
/// connection then closes; a kept-alive connection idle at its age is
/// closed then, long before its idle timeout.
#[tokio::test]
async fn an_http1_connection_closes_at_max_connection_age() {
    // Long enough for both connections' first exchanges and the held
    // request to be made before either comes of age on a loaded machine.
    const AGE: Duration = Duration::from_secs(3);
    let _expiring = EXPIRING.lock().await;
    let (up, gateway) = limited("conn-age", |l| l.max_connection_age = Some(AGE)).await;
    let before = expired("max_connection_age");

    let born = Instant::now();
    let mut busy = ok(TcpStream::connect(gateway.local_addr()).await, "connect");
    let mut idle = ok(TcpStream::connect(gateway.local_addr()).await, "connect");
    for stream in [&mut busy, &mut idle] {
        ok(
            stream
                .write_all(b"GET /young HTTP/1.1\r\nhost: x\r\n\r\n")
                .await,
            "write",
        );
        let answer = read_response(stream).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(!says_close(&answer), "young: {answer}");
    }
    // Both were accepted by now (each task takes its own reading of
    // when): `busy` is of age by `AGE` from now at the latest.
    let busy_of_age = Instant::now() + AGE;
    ok(
        busy.write_all(b"GET /hold HTTP/1.1\r\nhost: x\r\n\r\n")
            .await,
        "write",
    );
    wait_until("the request at the instance", || up.held() == 1).await;

    // The idle one is closed as it comes of age, without a word.
    let rest = rest_until_closed(&mut idle).await;
    assert!(rest.is_empty(), "{rest}");
    let lived = born.elapsed();
    assert!(lived >= AGE - Duration::from_millis(50), "{lived:?}");

    // The busy one's request was not cut: answered once released, with
    // the close. (This wait is the thing under test, not a
    // synchronisation: the response must begin after the age.)
    tokio::time::sleep_until(busy_of_age).await;
    up.release();
    let answer = read_response(&mut busy).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(says_close(&answer), "{answer}");
    let rest = rest_until_closed(&mut busy).await;
    assert!(rest.is_empty(), "{rest}");
    assert_eq!(expired("max_connection_age"), before + 2);
    gateway.shutdown(T).await;
}

/// An HTTP/2 connection frame by frame, that answers the gateway's PINGs
/// (as every client library does: a graceful GOAWAY waits for one).
struct RawH2 {
    rx: tokio::net::tcp::OwnedReadHalf,
    tx: tokio::net::tcp::OwnedWriteHalf,
    /// Off: a client that never answers a PING.
    answers_pings: bool,
}

/// `GET <path>` on `stream`, its end in the same HEADERS frame.
fn h2_get(stream: u32, path: &str) -> Vec<u8> {
    // :method GET, :scheme http, :path (literal, not indexed), :authority x.
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, 1, b'x']);
    h2_raw::frame(0x1, 0x5, stream, &block)
}

impl RawH2 {
    /// Connected, with the preface and `GET <path>` on stream 1 sent.
    async fn open(gateway: &Gateway, path: &str) -> RawH2 {
        let stream = ok(TcpStream::connect(gateway.local_addr()).await, "connect");
        let (rx, tx) = stream.into_split();
        let mut h2 = RawH2 {
            rx,
            tx,
            answers_pings: true,
        };
        let mut out = h2_raw::preface();
        out.extend(h2_get(1, path));
        h2.send(&out).await;
        h2
    }

    async fn send(&mut self, bytes: &[u8]) {
        ok(self.tx.write_all(bytes).await, "write");
    }

    /// The gateway's next frame that `wanted` picks (PINGs answered on
    /// the way); `None` once the connection has ended.
    async fn until(
        &mut self,
        what: &str,
        wanted: impl Fn(&h2_raw::Frame) -> bool,
    ) -> Option<h2_raw::Frame> {
        within(what, async {
            while let Some(frame) = h2_raw::read_frame(&mut self.rx).await {
                if wanted(&frame) {
                    return Some(frame);
                }
                // A PING without ACK: answered with its payload.
                if self.answers_pings && frame.kind == 0x6 && frame.payload.len() == 8 {
                    let pong = h2_raw::frame(0x6, 0x1, 0, &frame.payload);
                    let _ = self.tx.write_all(&pong).await;
                }
            }
            None
        })
        .await
    }

    /// Stream `id`'s response head: its status, if 200 (HPACK's `0x88`).
    async fn answered_200(&mut self, id: u32) -> bool {
        let head = self
            .until("a response head", |f| f.kind == 0x1 && f.stream == id)
            .await;
        head.is_some_and(|f| f.payload.first() == Some(&0x88))
    }

    /// The next GOAWAY: its last stream id and error code.
    async fn go_away(&mut self) -> (u32, u32) {
        let frame = self
            .until("a GOAWAY", |f| f.kind == 0x7)
            .await
            .unwrap_or_else(|| panic!("the connection ended without a GOAWAY"));
        let last = frame.payload.get(..4).map_or(0, |b| {
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff
        });
        (last, frame.error_code())
    }

    /// Reads (answering PINGs) until the connection ends; fails if a
    /// response head comes on the way.
    async fn until_closed(&mut self) {
        if let Some(f) = self.until("the connection's end", |f| f.kind == 0x1).await {
            panic!("a response head on stream {} after the last", f.stream);
        }
    }
}

/// `max_connection_requests` over HTTP/2: once as many streams have begun,
/// GOAWAY; the stream in progress finishes with 200, a stream opened past
/// the GOAWAY's last one is not served, and the connection then closes.
#[tokio::test]
async fn an_http2_connection_goes_away_after_max_connection_requests() {
    let _expiring = EXPIRING.lock().await;
    let (up, gateway) = limited("h2-conn-requests", |l| l.max_connection_requests = 2).await;
    let before = expired("max_connection_requests");

    let mut h2 = RawH2::open(&gateway, "/first").await;
    assert!(h2.answered_200(1).await, "the first stream");
    h2.send(&h2_get(3, "/hold")).await;
    wait_until("the second stream at the instance", || up.held() == 1).await;
    // h2's graceful GOAWAY: the first names no last stream, the second
    // (once the client answered its PING) stream 3.
    assert_eq!(h2.go_away().await, (0x7fff_ffff, 0), "GOAWAY NO_ERROR");
    assert_eq!(h2.go_away().await, (3, 0), "the final GOAWAY");
    h2.send(&h2_get(5, "/late")).await;
    up.release();
    assert!(h2.answered_200(3).await, "the stream in progress");
    h2.until_closed().await;
    assert_eq!(up.paths(), ["/first", "/hold"]);
    assert_eq!(expired("max_connection_requests"), before + 1);
    gateway.shutdown(T).await;
}

/// `max_connection_age` over HTTP/2: the connection is told to go away
/// once it is that old, and the stream in progress finishes with 200.
#[tokio::test]
async fn an_http2_connection_goes_away_at_max_connection_age() {
    let _expiring = EXPIRING.lock().await;
    let (up, gateway) = limited("h2-conn-age", |l| l.max_connection_age = Some(AGE)).await;
    let before = expired("max_connection_age");

    let born = Instant::now();
    let mut h2 = RawH2::open(&gateway, "/hold").await;
    wait_until("the stream at the instance", || up.held() == 1).await;
    assert_eq!(h2.go_away().await, (0x7fff_ffff, 0), "GOAWAY NO_ERROR");
    let lived = born.elapsed();
    assert!(lived >= AGE - Duration::from_millis(50), "{lived:?}");
    assert_eq!(h2.go_away().await, (1, 0), "the final GOAWAY");
    up.release();
    assert!(h2.answered_200(1).await, "the stream in progress");
    h2.until_closed().await;
    assert_eq!(expired("max_connection_age"), before + 1);
    gateway.shutdown(T).await;
}

/// A client told to go away that never answers the PING h2 waits for
/// before its last GOAWAY does not hold the connection for ever: it is
/// closed `header_timeout` after the first GOAWAY, once nothing has been
/// in progress for `body_timeout`.
#[tokio::test]
async fn an_http2_client_that_never_answers_going_away_is_closed() {
    let _expiring = EXPIRING.lock().await;
    let (_up, gateway) = limited("h2-no-pong", |l| {
        l.max_connection_requests = 1;
        l.header_read_timeout = AGE;
        l.body_timeout = AGE;
    })
    .await;
    let mut h2 = RawH2::open(&gateway, "/first").await;
    h2.answers_pings = false;
    // The GOAWAY comes as the stream begins, before its answer.
    assert_eq!(h2.go_away().await, (0x7fff_ffff, 0), "GOAWAY NO_ERROR");
    assert!(h2.answered_200(1).await, "the stream in progress");
    h2.until_closed().await;
    gateway.shutdown(T).await;
}

/// An instance whose `/straddle` response sends its head at once and its
/// two-byte body once `release` is told; anything else is answered `ok`.
async fn straddling_instance(
    release: std::sync::Arc<tokio::sync::Notify>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use http_body_util::{BodyExt, StreamBody};
    let listener = ok(tokio::net::TcpListener::bind("127.0.0.1:0").await, "bind");
    let addr = ok(listener.local_addr(), "addr");
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let release = std::sync::Arc::clone(&release);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<_>| {
                    let release = std::sync::Arc::clone(&release);
                    async move {
                        let _: &hyper::body::Incoming = req.body();
                        let body = if req.uri().path() == "/straddle" {
                            StreamBody::new(futures_util::stream::once(async move {
                                release.notified().await;
                                Ok::<_, std::convert::Infallible>(http_body::Frame::data(
                                    Bytes::from_static(b"ok"),
                                ))
                            }))
                            .boxed()
                        } else {
                            http_body_util::Full::new(Bytes::from_static(b"ok")).boxed()
                        };
                        let mut res = http::Response::new(body);
                        res.headers_mut()
                            .insert("content-length", http::HeaderValue::from_static("2"));
                        Ok::<_, std::convert::Infallible>(res)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, task)
}

/// Reads from `stream` into `got` until `done` says so; fails if
/// `stream` ends first or it takes longer than [`PATIENCE`].
async fn read_more_until(
    stream: &mut TcpStream,
    got: &mut Vec<u8>,
    what: &str,
    done: impl Fn(&[u8]) -> bool,
) {
    within(what, async {
        while !done(got) {
            let mut buf = [0u8; 1024];
            let n = ok(stream.read(&mut buf).await, "read");
            assert!(n > 0, "closed before {what}");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
}

/// A response that began before the connection came of age and ended
/// after it did not say `connection: close`. The connection is not closed
/// as that response ends, just when its client may be sending the next
/// request on it: it serves one more, which says `connection: close`.
#[tokio::test]
async fn an_http1_response_straddling_the_age_leaves_room_for_one_more_request() {
    const AGE: Duration = Duration::from_secs(3);
    let _expiring = EXPIRING.lock().await;
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let (addr, instance) = straddling_instance(std::sync::Arc::clone(&release)).await;
    let registry = Registry::new();
    registry.set(
        "straddle",
        vec![flotilla_gateway::Endpoint {
            instance: "straddle-0".into(),
            addr,
            load: std::sync::Arc::new(flotilla_gateway::Load::default()),
        }],
    );
    let mut cfg = config(vec![route("straddle", "/**", &[], T)]);
    cfg.limits.max_connection_age = Some(AGE);
    let gateway = start(cfg, &registry).await;
    let before = expired("max_connection_age");

    let born = Instant::now();
    let mut stream = ok(TcpStream::connect(gateway.local_addr()).await, "connect");
    ok(
        stream
            .write_all(b"GET /straddle HTTP/1.1\r\nhost: x\r\n\r\n")
            .await,
        "write",
    );
    // Its head, before the age.
    let mut got = Vec::new();
    read_more_until(&mut stream, &mut got, "the response head", |got| {
        got.windows(4).any(|w| w == b"\r\n\r\n")
    })
    .await;
    let head = String::from_utf8_lossy(&got).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(!says_close(&head), "{head}");
    // Its body after it. (This wait is the thing under test.)
    tokio::time::sleep_until(born + AGE + Duration::from_millis(100)).await;
    release.notify_one();
    read_more_until(&mut stream, &mut got, "the response body", |got| {
        got.ends_with(b"ok")
    })
    .await;
    // The next request, sent as soon as the last answer is in, is served,
    // and says `connection: close`; then the connection closes.
    ok(
        stream
            .write_all(b"GET /next HTTP/1.1\r\nhost: x\r\n\r\n")
            .await,
        "write",
    );
    let answer = read_response(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(says_close(&answer), "{answer}");
    let rest = rest_until_closed(&mut stream).await;
    assert!(rest.is_empty(), "{rest}");
    assert_eq!(expired("max_connection_age"), before + 1);
    gateway.shutdown(T).await;
    instance.abort();
}
