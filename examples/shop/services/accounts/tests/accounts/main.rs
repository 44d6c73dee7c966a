//! The real `shop-accounts` process: two replicas on one database agree on
//! one signing key, share sessions, keep the key across a restart, and a
//! bad setting stops the process with the variable's name.
//!
//! Each test works in a temp dir holding the database and every instance's
//! log; the dir is kept (and its path printed) when the test fails.
#![cfg(unix)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

/// Start-up includes an argon2 hash, slow in debug builds.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// The test's directory, kept when the test panics.
struct Workdir(Option<tempfile::TempDir>);

impl Workdir {
    fn new() -> Workdir {
        Workdir(Some(
            tempfile::Builder::new()
                .prefix("shop-accounts-it-")
                .tempdir()
                .unwrap(),
        ))
    }

    fn path(&self) -> &Path {
        self.0.as_ref().unwrap().path()
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        if let Some(dir) = self.0.take() {
            eprintln!(
                "kept the test's database and logs in {}",
                dir.keep().display()
            );
        }
    }
}

/// A running instance; killed when dropped.
struct Instance {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn command(dir: &Path, name: &str, extra: &[(&str, &str)]) -> (Child, mpsc::Receiver<Value>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shop-accounts"));
    cmd.env_clear()
        .env("FLOTILLA_SYSTEM", "shop")
        .env("FLOTILLA_SERVICE", "accounts")
        .env("FLOTILLA_INSTANCE", name)
        .env("FLOTILLA_LISTEN", "127.0.0.1:0")
        .env(
            "DATABASE_URL",
            format!("sqlite://{}/accounts.db", dir.display()),
        )
        .env("RUST_LOG", "info");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let log_path: PathBuf = dir.join(format!("{name}.log"));
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        let mut log = File::create(log_path).unwrap();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = writeln!(log, "{line}");
            if let Ok(entry) = serde_json::from_str::<Value>(&line) {
                // The receiver may be gone; the log still gets every line.
                let _ = tx.send(entry);
            }
        }
    });
    (child, lines)
}

fn wait_for(lines: &mpsc::Receiver<Value>, message: &str) -> Value {
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let entry = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no {message:?} log line in time"));
        if entry["message"] == message {
            return entry;
        }
    }
}

fn start(dir: &Path, name: &str) -> Instance {
    // The longest reuse grace, so that a slow machine between a refresh and
    // its retry does not turn the retry into reuse.
    let (child, lines) = command(dir, name, &[("ACCOUNTS_REFRESH_REUSE_GRACE", "60s")]);
    let listening = wait_for(&lines, "listening");
    Instance {
        child,
        addr: listening["addr"].as_str().unwrap().parse().unwrap(),
    }
}

/// One HTTP/1.1 exchange: (status, JSON body or null).
fn call(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let payload = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(payload).unwrap_or(Value::Null))
}

fn kids(addr: SocketAddr) -> Vec<String> {
    let (status, jwks) = call(addr, "GET", "/.well-known/jwks.json", None);
    assert_eq!(status, 200);
    jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

/// Verifies `token` with the key of its `kid` in `addr`'s JWKS.
fn verify(addr: SocketAddr, token: &str) -> Value {
    let parts: Vec<&str> = token.split('.').collect();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    let (_, jwks) = call(addr, "GET", "/.well-known/jwks.json", None);
    let key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .expect("kid in the JWKS")
        .clone();
    let public = URL_SAFE_NO_PAD.decode(key["x"].as_str().unwrap()).unwrap();
    let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public)
        .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
        .expect("signature verifies");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap()
}

#[test]
fn replicas_share_one_key_and_sessions_and_the_key_survives_a_restart() {
    let work = Workdir::new();
    let dir = work.path();
    // Two replicas racing on a fresh database.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| start(dir, "accounts-0"));
        let b = s.spawn(|| start(dir, "accounts-1"));
        (a.join().unwrap(), b.join().unwrap())
    });
    let kid = kids(a.addr);
    assert_eq!(kid.len(), 1, "one key");
    assert_eq!(kids(b.addr), kid, "the same key on both replicas");

    let creds = json!({"email": "it@example.com", "password": "integration passphrase"});
    let (status, user) = call(
        a.addr,
        "POST",
        "/api/accounts/register",
        Some(creds.clone()),
    );
    assert_eq!(status, 201, "{user}");
    let (status, tokens) = call(b.addr, "POST", "/api/accounts/login", Some(creds));
    assert_eq!(status, 200, "{tokens}");
    let claims = verify(a.addr, tokens["access_token"].as_str().unwrap());
    assert_eq!(claims["sub"], user["id"]);

    // Rotate on one replica, retry on the other (within the reuse grace),
    // then present the superseded successor: reuse, and the family is
    // revoked.
    let first = tokens["refresh_token"].clone();
    let (status, next) = call(
        a.addr,
        "POST",
        "/api/accounts/refresh",
        Some(json!({"refresh_token": first})),
    );
    assert_eq!(status, 200, "{next}");
    let (status, retried) = call(
        b.addr,
        "POST",
        "/api/accounts/refresh",
        Some(json!({"refresh_token": first})),
    );
    assert_eq!(status, 200, "{retried}");
    let (status, reused) = call(
        a.addr,
        "POST",
        "/api/accounts/refresh",
        Some(json!({"refresh_token": next["refresh_token"]})),
    );
    assert_eq!(status, 401);
    assert_eq!(reused["error"]["code"], "refresh_token_reused");
    let (status, _) = call(
        b.addr,
        "POST",
        "/api/accounts/refresh",
        Some(json!({"refresh_token": retried["refresh_token"]})),
    );
    assert_eq!(status, 401, "the newest token of a revoked family");

    // The key is in the database, not the process.
    drop((a, b));
    let again = start(dir, "accounts-2");
    assert_eq!(kids(again.addr), kid);
    let logs = std::fs::read_to_string(dir.join("accounts-0.log")).unwrap()
        + &std::fs::read_to_string(dir.join("accounts-1.log")).unwrap();
    assert!(
        !logs.contains("integration passphrase"),
        "no password in logs"
    );
    assert!(
        !logs.contains(tokens["refresh_token"].as_str().unwrap()),
        "no token in logs"
    );
}

#[test]
fn a_bad_setting_stops_the_process_naming_the_variable() {
    let work = Workdir::new();
    let (mut child, lines) = command(
        work.path(),
        "accounts-bad",
        &[("ACCOUNTS_KEY_ROTATION", "soon")],
    );
    let stopped = wait_for(&lines, "shop-accounts stopped");
    let error = stopped["error"].as_str().unwrap();
    assert!(error.contains("ACCOUNTS_KEY_ROTATION"), "{error}");
    let status = child.wait().unwrap();
    assert!(!status.success());
}
