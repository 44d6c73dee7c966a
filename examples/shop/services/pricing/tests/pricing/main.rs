//! The real `shop-pricing` process under the runtime contract: JSON log
//! lines on stdout, the built-in endpoints, a quote, and exit 0 on SIGTERM.
#![cfg(unix)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Kills the child if a test assertion fails half-way.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

fn next_log(lines: &mpsc::Receiver<String>, deadline: Instant, message: &str) -> Value {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no {message:?} log line in time"));
        let entry: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line}"));
        assert_eq!(entry["service"], "pricing", "{line}");
        assert_eq!(entry["instance"], "pricing-it", "{line}");
        if entry["message"] == message {
            return entry;
        }
    }
}

#[test]
fn serves_the_contract_and_stops_on_sigterm() {
    let child = Command::new(env!("CARGO_BIN_EXE_shop-pricing"))
        .env_clear()
        .env("FLOTILLA_SYSTEM", "shop")
        .env("FLOTILLA_SERVICE", "pricing")
        .env("FLOTILLA_INSTANCE", "pricing-it")
        .env("FLOTILLA_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = Guard(child);
    let stdout = child.0.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let deadline = Instant::now() + Duration::from_secs(20);
    let listening = next_log(&lines, deadline, "listening");
    let addr: SocketAddr = listening["addr"].as_str().unwrap().parse().unwrap();

    let health = http(
        addr,
        "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let ready = http(
        addr,
        "GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    let body = r#"{"items":[{"sku":"sku-mug","quantity":3,"unit_price_cents":1450}]}"#;
    let quote = http(
        addr,
        &format!(
            "POST /api/pricing/quote HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(quote.starts_with("HTTP/1.1 200"), "{quote}");
    // 4350 gross, 435 off, 3915 + 783 VAT
    assert!(quote.contains(r#""total_cents":4698"#), "{quote}");

    let metrics = http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert!(
        metrics.contains(r#"route="/api/pricing/quote",status="200""#),
        "{metrics}"
    );

    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    next_log(&lines, deadline, "stopped");
    let exit = loop {
        if let Some(exit) = child.0.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
}
