//! Hot reload: editing flotilla.toml under a running system swaps the
//! gateway's policies; an invalid file or a change that needs a restart is
//! refused and the running configuration stays.

use std::time::{Duration, Instant};

use crate::support::{Harness, client, start_editing, start_with};

const SERVICES: &str = r#"[services.hello]
run = { command = ["python3", "HELLO"] }
routes = [{ path = "/hello/**", methods = ["GET"] }]
"#;

/// Status of `GET /hello/x` through the gateway.
async fn status(gateway: &str) -> u16 {
    client()
        .get(format!("{gateway}/hello/x"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Polls until two requests in a row answer `want` second (rate-limited).
async fn wait_for_limit(gateway: &str, limited: bool) {
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let _ = status(gateway).await;
        let second = status(gateway).await;
        if (second == 429) == limited {
            return;
        }
        assert!(
            Instant::now() < until,
            "gateway never became limited={limited}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for the watcher to have refused one more change than `before`
/// (a count of `reloads.refused`), for a reason that mentions `why`.
async fn wait_for_refusal(h: &Harness, before: u64, why: &str) {
    h.wait("the edit to be refused", Duration::from_secs(15), |h| {
        h.system().status().reloads.refused > before
    })
    .await;
    let reloads = h.system().status().reloads;
    assert_eq!(reloads.refused, before + 1, "{reloads:?}");
    let refusal = reloads.last_refusal.unwrap_or_default();
    assert!(
        refusal.contains(why),
        "refused for another reason: {refusal}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_the_manifest_reloads_gateway_policies() {
    let h = start_with(SERVICES, |o| o.watch = true).await;
    let gateway = h.gateway();
    let file = h.dir.path().join("flotilla.toml");
    let original = std::fs::read_to_string(&file).unwrap();
    assert_eq!(status(&gateway).await, 200);
    assert_eq!(status(&gateway).await, 200, "no limit yet");

    // A rate limit appears: applied without a restart.
    let limited = original.replace(
        r#"methods = ["GET"] }"#,
        r#"methods = ["GET"], rate_limit = "1/h burst 1 per route" }"#,
    );
    std::fs::write(&file, &limited).unwrap();
    wait_for_limit(&gateway, true).await;

    // An invalid file is refused: the limit stays, the system keeps serving.
    let refused = h.system().status().reloads.refused;
    std::fs::write(&file, limited.replace("rate_limit", "rate_limmit")).unwrap();
    wait_for_refusal(&h, refused, "rate_limmit").await;
    assert_eq!(
        status(&gateway).await,
        429,
        "the running configuration stays"
    );

    // A new path needs a restart (instance ACLs): refused as a whole.
    std::fs::write(&file, original.replace("/hello/**", "/bye/**")).unwrap();
    wait_for_refusal(&h, refused + 1, "restart to apply").await;
    assert_eq!(
        status(&gateway).await,
        429,
        "still the old routes and limit"
    );

    // Back to the original file: the limit goes away again.
    std::fs::write(&file, &original).unwrap();
    wait_for_limit(&gateway, false).await;
    let reloads = h.system().status().reloads;
    assert_eq!(reloads.last_refusal, None, "{reloads:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_saved_while_the_system_starts_is_applied() {
    // Saved after the manifest was read, while the services would build:
    // the running gateway must not keep the file as read.
    let h = start_editing(
        SERVICES,
        |o| o.watch = true,
        |file| {
            let text = std::fs::read_to_string(file).unwrap();
            let limited = text.replace(
                r#"methods = ["GET"] }"#,
                r#"methods = ["GET"], rate_limit = "1/h burst 1 per route" }"#,
            );
            std::fs::write(file, limited).unwrap();
        },
    )
    .await;
    wait_for_limit(&h.gateway(), true).await;
    h.stop().await;
}

/// Status of `GET /hello/x` carrying a body of `bytes` bytes.
async fn status_with_body(gateway: &str, bytes: usize) -> u16 {
    client()
        .get(format!("{gateway}/hello/x"))
        .body(vec![b'x'; bytes])
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifests_gateway_limits_apply_and_a_change_waits_for_a_restart() {
    let limited = format!("[gateway.limits]\nmax_body_bytes = 1000\n{SERVICES}");
    let h = start_with(&limited, |o| o.watch = true).await;
    let gateway = h.gateway();
    assert_eq!(status(&gateway).await, 200);
    // The default (1 MiB) would take it; the manifest's limit does not.
    assert_eq!(status_with_body(&gateway, 2000).await, 413);

    // A new limit is read once at start: the change is refused, and the
    // rest of the file's changes with it, until a restart.
    let file = h.dir.path().join("flotilla.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let raised = text
        .replace("max_body_bytes = 1000", "max_body_bytes = 5000")
        .replace(
            r#"methods = ["GET"] }"#,
            r#"methods = ["GET"], rate_limit = "1/h burst 1 per route" }"#,
        );
    let refused = h.system().status().reloads.refused;
    std::fs::write(&file, &raised).unwrap();
    wait_for_refusal(&h, refused, "`[gateway.limits]` changed").await;
    assert_eq!(status_with_body(&gateway, 2000).await, 413);
    for _ in 0..3 {
        assert_eq!(status(&gateway).await, 200, "the rate limit came along");
    }

    // Retries and outlier detection are taken without a restart: with the
    // limit as it was, the edit (and its rate limit) applies.
    let retuned = raised
        .replace("max_body_bytes = 5000", "max_body_bytes = 1000")
        .replace(
            "[gateway.limits]",
            "[gateway.retries]\nattempts = 0\n[gateway.outlier_detection]\nconsecutive_failures = 2\n[gateway.limits]",
        );
    std::fs::write(&file, retuned).unwrap();
    wait_for_limit(&gateway, true).await;
    h.stop().await;
}
