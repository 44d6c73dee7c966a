//! A headless Chromium driven over the W3C WebDriver protocol, through
//! Debian's `chromedriver`, for tests that click through the shop's UI.
//!
//! The few commands the tests need (open a session, navigate, find, click,
//! type, run a script) are plain JSON over HTTP, spoken here with the
//! tests' own reqwest client: a WebDriver crate (fantoccini, thirtyfour)
//! would add its own HTTP and TLS stack to the build for the same six
//! endpoints.

use std::net::TcpListener;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The key under which WebDriver returns an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// How long a condition may take to hold before the test fails.
const PATIENCE: Duration = Duration::from_secs(30);

pub struct Browser {
    http: reqwest::Client,
    /// `http://127.0.0.1:PORT/session/ID`.
    session: String,
    _driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// A new headless browser, or `None` (and a `skipped:` line, or a
    /// panic under `FLOTILLA_TEST_REQUIRE_ALL`) when chromium or
    /// chromedriver is not installed.
    pub async fn start() -> Option<Browser> {
        let installed = |cmd: &str| {
            std::process::Command::new(cmd)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !installed("chromedriver") || !installed("chromium") {
            flotilla_testkit::skip(
                "no chromium and chromedriver on this machine",
                "apt-get install -y chromium chromium-driver",
            );
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let driver = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let base = format!("http://127.0.0.1:{port}");
        let http = crate::support::client();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let ready = http.get(format!("{base}/status")).send().await;
            if let Ok(r) = ready
                && let Ok(v) = r.json::<Value>().await
                && v["value"]["ready"] == true
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver not ready on {base}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().expect("a profile dir");
        // The flags the machine's notes give for a closed network: without
        // the background-networking ones Chromium keeps dialling Google.
        let args = [
            "--headless".to_string(),
            "--no-sandbox".to_string(),
            "--disable-gpu".to_string(),
            "--disable-background-networking".to_string(),
            "--disable-component-update".to_string(),
            "--disable-sync".to_string(),
            "--no-first-run".to_string(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args},
        }}});
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("new session answer");
        let id = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"));
        Some(Browser {
            session: format!("{base}/session/{id}"),
            http,
            _driver: driver,
            _profile: profile,
        })
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.session);
        let mut req = self.http.request(method, &url);
        if !body.is_null() {
            req = req.json(&body);
        }
        let answer: Value = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        if answer["value"]["error"].is_string() {
            panic!("{url}: {answer}");
        }
        answer["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await;
    }

    async fn find(&self, css: &str) -> String {
        let found = self
            .command(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_string()
    }

    /// Clicks the first element `css` selects, as a user would.
    pub async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            json!({}),
        )
        .await;
    }

    /// Types `text` into the first element `css` selects.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    /// What the JavaScript `body` (a function body) returns, in the page.
    pub async fn eval(&self, body: &str) -> Value {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": body, "args": []}),
        )
        .await
    }

    /// Waits until `body` returns something truthy (and returns it); fails
    /// with `what` and the page's text after `PATIENCE`.
    pub async fn wait_for(&self, what: &str, body: &str) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let v = self.eval(body).await;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return v;
            }
            if Instant::now() >= deadline {
                let page = self.eval("return document.body.innerText").await;
                panic!("timed out waiting for {what}; the page says:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The browser's cookie `name` for the current page, as WebDriver
    /// sees it (`httpOnly`, `sameSite` and all; scripts see less).
    pub async fn cookie(&self, name: &str) -> Value {
        self.command(
            reqwest::Method::GET,
            &format!("/cookie/{name}"),
            Value::Null,
        )
        .await
    }

    /// Deletes the cookie `name`, as an expired one would be.
    pub async fn delete_cookie(&self, name: &str) {
        self.command(
            reqwest::Method::DELETE,
            &format!("/cookie/{name}"),
            Value::Null,
        )
        .await;
    }

    pub async fn close(self) {
        self.command(reqwest::Method::DELETE, "", Value::Null).await;
    }
}
