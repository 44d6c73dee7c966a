//! A system degrades, never hangs or panics, when one service is broken:
//! the broken one is reported with the reason and the others are served.

use std::path::Path;
use std::time::Duration;

use flotilla_testkit::System;

use crate::support::client;

fn fixture() -> String {
    flotilla_testkit::hello_py().display().to_string()
}

/// A manifest with a healthy `hello` service and one broken service.
fn manifest_with(dir: &Path, broken: &str) -> std::path::PathBuf {
    let text = format!(
        r#"name = "degraded"
[services.hello]
run = {{ command = ["python3", "{hello}"] }}
routes = [{{ path = "/hello/**" }}]

[services.broken]
ready_timeout = "1s"
routes = [{{ path = "/broken/**" }}]
{broken}
"#,
        hello = fixture()
    );
    let path = dir.join("flotilla.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn assert_degraded(broken: &str, reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let system = System::start(manifest_with(dir.path(), broken))
        .await
        .expect("starts degraded");
    let http = client();
    let ok = http.get(system.url("/hello/x")).send().await.unwrap();
    assert_eq!(ok.status(), 200, "the healthy service is served");
    let status = system
        .wait_for("the broken service's error", Duration::from_secs(20), |s| {
            s.services
                .iter()
                .any(|s| s.name == "broken" && s.last_error.is_some())
        })
        .await;
    let broken_status = status.services.iter().find(|s| s.name == "broken").unwrap();
    let error = broken_status.last_error.clone().unwrap();
    assert!(error.contains(reason), "expected `{reason}` in: {error}");
    assert_eq!(broken_status.ready, 0);
    let refused = http.get(system.url("/broken/x")).send().await.unwrap();
    assert_eq!(refused.status(), 503, "no ready instance: 503, not a hang");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(body["error"]["code"].is_string(), "{body}");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_exits_at_start() {
    assert_degraded(
        r#"run = { command = ["sh", "-c", "echo cannot open config >&2; exit 3"] }"#,
        "exited during start (exit code 3); last output:\n    cannot open config",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_never_becomes_ready() {
    assert_degraded(
        &format!(
            r#"run = {{ command = ["python3", "{}"] }}
env = {{ NEVER_READY = "1" }}"#,
            fixture()
        ),
        "not ready after 1s",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_command() {
    assert_degraded(
        r#"run = { command = ["no-such-program-flotilla"] }"#,
        "command `no-such-program-flotilla` not found on PATH",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exit_reason_includes_the_last_output() {
    assert_degraded(
        r#"run = { command = ["sh", "-c", "echo cannot open config >&2; exit 3"] }"#,
        "cannot open config",
    )
    .await;
}
