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

/// Dot-files and dot-directories are never served, however the path spells
/// them: `static` may be a directory that also holds a checkout's `.git`
/// or a system's `.flotilla` (its CA keys). `.well-known` is public.
#[tokio::test]
async fn dot_files_are_not_served() {
    let dir = TestDir::new();
    let web = dir.path().to_path_buf();
    for (file, text) in [
        ("index.html", "<h1>shop</h1>"),
        (".env", "SECRET=1"),
        (".flotilla/ca/gen-1/root.key", "ROOTKEY"),
        ("assets/.hidden", "HIDDEN"),
        (
            ".well-known/security.txt",
            "Contact: mailto:security@example.com",
        ),
    ] {
        let path = web.join(file);
        ok(std::fs::create_dir_all(path.parent().unwrap()), "mkdir");
        ok(std::fs::write(&path, text), "write");
    }
    let registry = Registry::new();
    let mut cfg = config(vec![]);
    cfg.static_dir = Some(web);
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);
    assert_eq!(client.get("/").await.status, StatusCode::OK);
    let public = client.get("/.well-known/security.txt").await;
    assert_eq!(public.status, StatusCode::OK);
    for target in [
        "/.env",
        "/.flotilla/ca/gen-1/root.key",
        "/%2Eflotilla/ca/gen-1/root.key",
        "/%2eenv",
        "/assets/.hidden",
        "/assets/%2ehidden",
    ] {
        let got = client.get(target).await;
        assert_eq!(got.status, StatusCode::NOT_FOUND, "{target}");
        assert_eq!(got.json()["error"]["code"], "not_found", "{target}");
        let head = client
            .request(Method::HEAD, target, &[], Bytes::new())
            .await;
        assert_eq!(head.status, StatusCode::NOT_FOUND, "HEAD {target}");
    }
    gateway.shutdown(T).await;
}
