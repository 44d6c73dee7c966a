//! Shared helpers: where the shop is, an HTTP client, JSON shapes.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

pub fn shop_manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/shop/flotilla.toml")
}

pub fn client() -> reqwest::Client {
    // reqwest is built without a default crypto provider (ring only, no aws-lc).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("reqwest client")
}

/// The product list, whether served as an array or as `{"products": [...]}`.
pub fn products(v: &Value) -> Vec<Value> {
    v.as_array()
        .or_else(|| v.get("products").and_then(Value::as_array))
        .or_else(|| v.get("items").and_then(Value::as_array))
        .cloned()
        .unwrap_or_default()
}

/// The `flotilla` binary built for this test run.
pub fn flotilla() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
}

/// Registers a fresh user through the gateway and returns an access token.
pub async fn sign_in(http: &reqwest::Client, gateway: &str, email: &str) -> String {
    let password = "correct horse battery staple";
    let r = http
        .post(format!("{gateway}/api/accounts/register"))
        .json(&serde_json::json!({"email": email, "password": password}))
        .send()
        .await
        .expect("register");
    assert!(
        r.status() == 201 || r.status() == 409,
        "register: {} {}",
        r.status(),
        r.text().await.unwrap_or_default()
    );
    let r = http
        .post(format!("{gateway}/api/accounts/login"))
        .json(&serde_json::json!({"email": email, "password": password}))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 200, "login");
    let body: serde_json::Value = r.json().await.expect("login json");
    body["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}
