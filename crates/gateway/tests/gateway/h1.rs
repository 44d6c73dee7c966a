//! The gateway's own HTTP/1 server side, over real sockets, with raw
//! clients: request bodies (chunked, `100-continue`), smuggling shapes,
//! pipelining, HTTP/1.0 and HEAD.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use flotilla_gateway::{Endpoint, Gateway, Load};
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::support::*;

const T: Duration = Duration::from_secs(5);

/// An upstream that answers every request with its body, byte for byte
/// (`/stream/…`: in two frames of unknown length, so chunked; HEAD: no
/// body but a `content-length`).
struct Mirror {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Mirror {
    async fn start() -> Mirror {
        let listener = ok(TcpListener::bind("127.0.0.1:0").await, "bind mirror");
        let addr = ok(listener.local_addr(), "mirror addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&hits);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let hits = Arc::clone(&counted);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        mirror(req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Mirror { addr, hits, task }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint {
            instance: "mirror-0".into(),
            addr: self.addr,
            load: Arc::new(Load::default()),
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type MirrorBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn mirror(req: Request<Incoming>) -> Result<Response<MirrorBody>, Infallible> {
    if req.method() == http::Method::HEAD {
        // The length a GET would have.
        let mut res = Response::new(Full::new(Bytes::new()).boxed());
        res.headers_mut()
            .insert("content-length", http::HeaderValue::from_static("1234"));
        return Ok(res);
    }
    let streamed = req.uri().path().starts_with("/stream");
    let body = match req.into_body().collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => Bytes::from_static(b"<body error>"),
    };
    let body = if streamed {
        let half = body.len() / 2;
        let frames =
            [body.slice(..half), body.slice(half..)].map(|b| Ok::<_, Infallible>(Frame::data(b)));
        StreamBody::new(futures_util::stream::iter(frames)).boxed()
    } else {
        Full::new(body).boxed()
    };
    Ok(Response::new(body))
}

async fn gateway_for(mirror: &Mirror) -> Gateway {
    let registry = Registry::new();
    registry.set("mirror", vec![mirror.endpoint()]);
    start(config(vec![route("mirror", "/**", &[], T)]), &registry).await
}

async fn connect(gateway: &Gateway) -> TcpStream {
    ok(TcpStream::connect(gateway.local_addr()).await, "connect")
}

async fn send(stream: &mut TcpStream, raw: &[u8]) {
    ok(stream.write_all(raw).await, "write");
}

/// Reads until `done` holds for what arrived (or the server closes).
async fn read_until(stream: &mut TcpStream, done: impl Fn(&str) -> bool) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if done(&text) {
            return text;
        }
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
            Ok(Ok(0)) => return text,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => panic!("read failed after {text:?}: {e}"),
            Err(_) => panic!("timed out after {text:?}"),
        }
    }
}

async fn read_all(stream: &mut TcpStream) -> String {
    read_until(stream, |_| false).await
}

#[tokio::test]
async fn a_chunked_request_body_reaches_the_upstream_intact() {
    let mirror = Mirror::start().await;
    let gateway = gateway_for(&mirror).await;
    let mut stream = connect(&gateway).await;
    // In pieces, split inside sizes, data and CRLFs, with an extension and
    // a trailer: what a streaming client may send.
    let payload: Vec<u8> = (0..3000u32)
        .map(|i| b"abcdefghij"[(i % 10) as usize])
        .collect();
    let mut raw = b"POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for (i, chunk) in payload.chunks(700).enumerate() {
        raw.extend_from_slice(format!("{:X};n={i}\r\n", chunk.len()).as_bytes());
        raw.extend_from_slice(chunk);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\nx-checksum: 1\r\n\r\n");
    for piece in raw.chunks(333) {
        send(&mut stream, piece).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let expected = String::from_utf8_lossy(&payload).into_owned();
    let answer = read_until(&mut stream, |t| t.ends_with(&expected)).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("content-length: 3000\r\n"), "{answer}");

    // A response of unknown length goes back chunked, and the connection
    // carries on.
    send(
        &mut stream,
        b"POST /stream HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\n\r\nabcdef",
    )
    .await;
    let answer = read_until(&mut stream, |t| t.ends_with("0\r\n\r\n")).await;
    assert!(
        answer.contains("transfer-encoding: chunked\r\n"),
        "{answer}"
    );
    assert!(
        answer.ends_with("\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n"),
        "{answer}"
    );
    assert_eq!(mirror.hits(), 2);
    drop(stream);
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn request_smuggling_shapes_are_refused_before_the_upstream() {
    let mirror = Mirror::start().await;
    let gateway = gateway_for(&mirror).await;
    for raw in [
        // CL.TE: a front end reading the length would pass the rest on as
        // a second request.
        "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nX",
        // TE.CL, with the headers the other way round.
        "POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
        // Obfuscated codings and lengths.
        "POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ntransfer-encoding: x\r\n\r\n0\r\n\r\n",
        "POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding : chunked\r\n\r\n0\r\n\r\n",
        "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
        "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 0x3\r\n\r\nabc",
        "POST /a HTTP/1.0\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        // A chunk size a lenient parser reads differently.
        "POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3 ;x\nabc\r\n0\r\n\r\n",
    ] {
        let answer = raw_request(gateway.local_addr(), raw).await;
        assert!(
            answer.starts_with("HTTP/1.1 400 ") || answer.starts_with("HTTP/1.1 501 "),
            "{raw:?}: {answer}"
        );
        // One answer, then the connection is closed: nothing smuggled in.
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{raw:?}: {answer}");
        assert!(answer.contains("connection: close\r\n"), "{answer}");
    }
    assert_eq!(mirror.hits(), 0);
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let mirror = Mirror::start().await;
    let gateway = gateway_for(&mirror).await;
    let answer = raw_request(
        gateway.local_addr(),
        "POST /one HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nfirst\
         POST /two HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n6\r\nsecond\r\n0\r\n\r\n\
         POST /three HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nconnection: close\r\n\r\nthird",
    )
    .await;
    let responses: Vec<&str> = answer.split("HTTP/1.1 200 OK\r\n").skip(1).collect();
    assert_eq!(responses.len(), 3, "{answer}");
    for (res, body) in responses.iter().zip(["first", "second", "third"]) {
        assert!(res.ends_with(&format!("\r\n\r\n{body}")), "{answer}");
    }
    assert_eq!(answer.matches("connection: close").count(), 1, "{answer}");
    assert_eq!(mirror.hits(), 3);
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn http10_clients_get_lengths_or_a_close() {
    let mirror = Mirror::start().await;
    let gateway = gateway_for(&mirror).await;
    // Known length: content-length, and closed (no keep-alive asked).
    let answer = raw_request(
        gateway.local_addr(),
        "POST /x HTTP/1.0\r\ncontent-length: 4\r\n\r\nping",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
    assert!(answer.contains("content-length: 4\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nping"), "{answer}");
    // Kept alive when asked; unknown length: no chunks, delimited by close.
    let mut stream = connect(&gateway).await;
    send(
        &mut stream,
        b"POST /x HTTP/1.0\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nhi",
    )
    .await;
    let first = read_until(&mut stream, |t| t.ends_with("\r\n\r\nhi")).await;
    assert!(first.contains("connection: keep-alive\r\n"), "{first}");
    send(
        &mut stream,
        b"POST /stream HTTP/1.0\r\nconnection: keep-alive\r\ncontent-length: 4\r\n\r\nabcd",
    )
    .await;
    let second = read_all(&mut stream).await;
    assert!(second.starts_with("HTTP/1.0 200 OK\r\n"), "{second}");
    assert!(!second.contains("transfer-encoding"), "{second}");
    assert!(second.contains("connection: close\r\n"), "{second}");
    assert!(second.ends_with("\r\n\r\nabcd"), "{second}");
    drop(stream);
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn expect_100_continue_works_as_curl_uses_it() {
    let mirror = Mirror::start().await;
    let gateway = gateway_for(&mirror).await;
    let mut stream = connect(&gateway).await;
    let body = "x".repeat(2 * 1024 * 1024 / 4);
    let head = format!(
        "PUT /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
        body.len()
    );
    send(&mut stream, head.as_bytes()).await;
    // curl waits up to a second for the go-ahead before sending anyway.
    let mut buf = [0u8; 64];
    let n = match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
        Ok(Ok(n)) => n,
        other => panic!("no 100 Continue: {other:?}"),
    };
    assert_eq!(&buf[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
    send(&mut stream, body.as_bytes()).await;
    let answer = read_until(&mut stream, |t| t.ends_with(&body)).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:.200}");
    assert!(!answer.contains("connection: close"), "{answer:.200}");
    drop(stream);

    // A request refused before its body is read gets no 100: the client
    // never sends the body, and the connection closes after the answer.
    let mut small = route("mirror", "/small/**", &[], T);
    small.max_body_bytes = Some(10);
    let registry = Registry::new();
    registry.set("mirror", vec![mirror.endpoint()]);
    let limited = start(config(vec![small]), &registry).await;
    let mut stream = ok(TcpStream::connect(limited.local_addr()).await, "connect");
    send(
        &mut stream,
        b"PUT /small/x HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\nexpect: 100-continue\r\n\r\n",
    )
    .await;
    let answer = read_all(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
    assert!(answer.contains("connection: close\r\n"), "{answer}");
    assert_eq!(mirror.hits(), 1);
    drop(stream);
    limited.shutdown(T).await;
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn head_requests_get_the_upstream_length_and_no_body() {
    let mirror = Mirror::start().await;
    let gateway = gateway_for(&mirror).await;
    let answer = raw_request(
        gateway.local_addr(),
        "HEAD /x HTTP/1.1\r\nhost: x\r\n\r\nGET /y HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    let responses: Vec<&str> = answer.split("HTTP/1.1 200 OK\r\n").skip(1).collect();
    assert_eq!(responses.len(), 2, "{answer}");
    assert!(responses[0].ends_with("\r\n\r\n"), "{answer}");
    assert!(
        responses[0].contains("content-length: 1234\r\n"),
        "{answer}"
    );
    assert!(responses[1].contains("content-length: 0\r\n"), "{answer}");
    assert!(responses[0].contains("x-request-id: "), "{answer}");
    assert!(answer.contains("server: flotilla\r\n"), "{answer}");
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn a_streamed_body_over_the_limit_is_413() {
    let mirror = Mirror::start().await;
    let mut small = route("mirror", "/**", &[], T);
    small.max_body_bytes = Some(1024);
    let registry = Registry::new();
    registry.set("mirror", vec![mirror.endpoint()]);
    let gateway = start(config(vec![small]), &registry).await;
    let mut stream = connect(&gateway).await;
    send(
        &mut stream,
        b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n",
    )
    .await;
    // In pieces, so that the body streams rather than arriving whole; the
    // gateway may answer (and close) before the client is done.
    let piece = format!("c8\r\n{}\r\n", "y".repeat(200));
    for _ in 0..20 {
        if stream.write_all(piece.as_bytes()).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let answer = read_until(&mut stream, |t| t.contains("\r\n\r\n{")).await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
    drop(stream);
    gateway.shutdown(T).await;
}

#[tokio::test]
async fn chunk_extensions_past_the_body_s_cap_are_refused_as_a_long_size_line_is() {
    let mirror = Mirror::start().await;
    let gateway = gateway_for(&mirror).await;
    // 1-byte chunks with 3000 bytes of extensions each: every size line
    // within its own 4 KiB, 24,000 bytes in all (the cap is 16 KiB).
    let flood = format!("1;{}\r\nx\r\n", "e".repeat(2999)).repeat(8);
    let long_line = format!("1;{}\r\nx\r\n", "e".repeat(5000));
    let mut answers = Vec::new();
    for body in [flood, long_line] {
        let mut stream = connect(&gateway).await;
        send(
            &mut stream,
            b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n1\r\nx\r\n",
        )
        .await;
        // Apart, so that the body streams, as a flood's would.
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The gateway may answer (and close) before all of it is sent.
        let _ = stream.write_all(body.as_bytes()).await;
        let _ = stream.write_all(b"0\r\n\r\n").await;
        // Until the error's JSON body, or the head of an answer that is none.
        let answer = read_until(&mut stream, |t| {
            t.contains("\r\n\r\n{") || (t.starts_with("HTTP/1.1 200 ") && t.contains("\r\n\r\n"))
        })
        .await;
        assert!(!answer.starts_with("HTTP/1.1 200 "), "taken: {answer}");
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        let status = answer.lines().next().unwrap_or_default().to_string();
        let code = answer
            .split(r#""code":""#)
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_default()
            .to_string();
        answers.push((status, code));
    }
    assert!(!answers[0].1.is_empty(), "{answers:?}");
    assert_eq!(answers[0], answers[1], "the flood, and a long size line");
    // The client's body is at fault, not the instance it streamed to.
    assert_eq!(
        answers[0],
        (
            "HTTP/1.1 400 Bad Request".to_string(),
            "bad_request_body".to_string()
        )
    );
    gateway.shutdown(T).await;
}

/// Requests the HTTP/1 driver refuses before they are requests the edge
/// takes (a smuggling shape, a malformed chunked body, a head too large,
/// one too slow, bytes that are no HTTP) are logged and counted as the
/// gateway's other answers before a route, each under an id its answer
/// carries; a connection that said nothing before it timed out is no
/// request, and leaves no line.
#[tokio::test]
async fn requests_refused_before_the_edge_are_logged_and_counted() {
    let dir = TestDir::new();
    let log = path_buf(&dir, "access.log");
    let mirror = Mirror::start().await;
    let registry = Registry::new();
    registry.set("mirror", vec![mirror.endpoint()]);
    let mut cfg = config(vec![route("mirror", "/**", &[], T)]);
    cfg.access_log = Some(log.clone());
    cfg.limits.header_read_timeout = Duration::from_millis(300);
    let gateway = start(cfg, &registry).await;
    // Refusals before a route is looked for are counted as
    // `route="unmatched"`, `service=""`, for every gateway: no label tells
    // this test's from other tests' in this process, so the count below is
    // checked to have grown by at least this test's refusals, not exactly.
    let unmatched = || {
        metric_sum(&[
            "flotilla_gateway_requests_total",
            "route=\"unmatched\"",
            "status_class=\"4xx\"",
        ])
    };
    let before = unmatched();

    // Says nothing, and is closed unanswered when its head is due.
    let mut silent = connect(&gateway).await;
    assert_eq!(read_all(&mut silent).await, "", "no answer, no 408");

    let many: String = (0..150).map(|i| format!("x-h-{i}: v\r\n")).collect();
    let cases = [
        (
            "POST /smuggle HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nX".to_string(),
            400,
            "bad_request",
            Some("POST"),
            Some("/smuggle"),
        ),
        (
            "POST /chunked?k=secret HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3 ;x\nabc\r\n0\r\n\r\n".to_string(),
            400,
            "bad_request",
            Some("POST"),
            Some("/chunked"),
        ),
        (
            format!("GET /large HTTP/1.1\r\nhost: x\r\n{many}\r\n"),
            431,
            "headers_too_large",
            Some("GET"),
            Some("/large"),
        ),
        // Never finished: 408 once `header_read_timeout` has passed.
        (
            "GET /slowloris?token=secret HTTP/1.1\r\nhost: x\r\n".to_string(),
            408,
            "request_timeout",
            Some("GET"),
            Some("/slowloris"),
        ),
        (
            "\u{16}\u{3}\u{1}\u{2}\u{0}\u{1}\u{0}\u{1}\r\n\r\n".to_string(),
            400,
            "bad_request",
            None,
            None,
        ),
    ];
    let mut ids = Vec::new();
    for (raw, status, ..) in &cases {
        let answer = raw_request(gateway.local_addr(), raw).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{raw:?}: {answer}"
        );
        let id = answer
            .lines()
            .find_map(|l| l.strip_prefix("x-request-id: "))
            .unwrap_or_else(|| panic!("no x-request-id: {answer}"))
            .to_string();
        assert!(
            answer.contains(&format!("\"request_id\":\"{id}\"")),
            "{answer}"
        );
        ids.push(id);
    }
    assert_eq!(mirror.hits(), 0);
    wait_until("the refusals counted under unmatched", || {
        unmatched() >= before + cases.len() as u64
    })
    .await;
    gateway.shutdown(T).await;

    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("secret"), "no query string: {text}");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| ok(serde_json::from_str(l), "access-log line is JSON"))
        .collect();
    // One a refusal, none for the connection that said nothing.
    assert_eq!(lines.len(), cases.len(), "{text}");
    for ((raw, status, code, method, path), id) in cases.iter().zip(&ids) {
        let line = lines
            .iter()
            .find(|l| l["request_id"] == id.as_str())
            .unwrap_or_else(|| panic!("{raw:?}: no line with its id {id}: {text}"));
        assert_eq!(line["status"], *status, "{raw:?}: {line}");
        assert_eq!(line["error"], *code, "{raw:?}: {line}");
        assert_eq!(line["method"].as_str(), *method, "{raw:?}: {line}");
        assert_eq!(line["path"].as_str(), *path, "{raw:?}: {line}");
        assert_eq!(line["client"], "127.0.0.1", "{raw:?}: {line}");
        assert_eq!(line["route"], serde_json::Value::Null, "{raw:?}: {line}");
        assert!(line["bytes"].as_u64().is_some_and(|b| b > 0), "{line}");
        assert!(line["duration_ms"].is_number(), "{line}");
    }
}
