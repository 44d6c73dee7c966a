//! Static files for paths no route claims, without escaping the directory.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::support::*;

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn static_files_are_served_and_traversal_refused() {
    let dir = TestDir::new();
    let web = dir.path().join("web");
    ok(std::fs::create_dir_all(web.join("assets")), "mkdir");
    ok(
        std::fs::write(web.join("index.html"), "<h1>shop</h1>"),
        "write",
    );
    ok(
        std::fs::write(web.join("assets/app.js"), "console.log(1)"),
        "write",
    );
    ok(
        std::fs::write(dir.path().join("secret.txt"), "TOPSECRET"),
        "write",
    );

    let registry = Registry::new();
    let api = Upstream::start("api-0").await;
    registry.set("api", vec![api.endpoint()]);
    let mut cfg = config(vec![route("api", "/api/**", &[], T)]);
    cfg.static_dir = Some(web.clone());
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);

    let index = client.get("/").await;
    assert_eq!(index.status, StatusCode::OK);
    assert_eq!(&index.body[..], b"<h1>shop</h1>");
    assert!(index.header("content-type").starts_with("text/html"));
    assert_eq!(index.header("server"), "flotilla");
    assert!(!index.header("x-request-id").is_empty());

    let js = client.get("/assets/app.js").await;
    assert_eq!(js.status, StatusCode::OK);
    assert_eq!(&js.body[..], b"console.log(1)");

    let head = client
        .request(Method::HEAD, "/assets/app.js", &[], Bytes::new())
        .await;
    assert_eq!(head.status, StatusCode::OK);

    // Routes win over files.
    assert_eq!(client.get("/api/x").await.instance(), "api-0");

    let missing = client.get("/nope.css").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.json()["error"]["code"], "not_found");

    // Only GET and HEAD reach the files.
    let post = client.request(Method::POST, "/", &[], Bytes::new()).await;
    assert_eq!(post.status, StatusCode::NOT_FOUND);

    for target in [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/assets/..%2f..%2fsecret.txt",
        "/assets/%2e%2e/%2e%2e/secret.txt",
    ] {
        let raw = raw_request(
            gateway.local_addr(),
            &format!("GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
        )
        .await;
        assert!(!raw.contains("TOPSECRET"), "{target}: {raw}");
        assert!(
            raw.starts_with("HTTP/1.1 400") || raw.starts_with("HTTP/1.1 404"),
            "{target}: {raw}"
        );
    }
    gateway.shutdown(T).await;
}
