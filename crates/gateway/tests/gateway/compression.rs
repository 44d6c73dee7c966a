//! gzip on the way out: proxied and static responses, over HTTP/1.1 and
//! HTTP/2, only for clients that take it and bodies worth it.

use std::io::Read;
use std::time::Duration;

use bytes::Bytes;
use flotilla_gateway::CompressionConfig;
use http::{Method, StatusCode};

use crate::support::*;

const T: Duration = Duration::from_secs(5);

fn gunzip(body: &[u8]) -> String {
    let mut out = String::new();
    ok(
        flate2::read::GzDecoder::new(body).read_to_string(&mut out),
        "a gzip body",
    );
    out
}

#[tokio::test]
async fn responses_are_gzipped_for_clients_that_take_it() {
    let dir = TestDir::new();
    let web = dir.path().join("web");
    ok(std::fs::create_dir_all(&web), "mkdir");
    let script = "console.log('flotilla');\n".repeat(200);
    ok(std::fs::write(web.join("app.js"), &script), "write");
    ok(std::fs::write(web.join("tiny.js"), "1"), "write");
    ok(
        std::fs::write(web.join("logo.png"), vec![7u8; 4096]),
        "write",
    );

    let registry = Registry::new();
    let api = Upstream::start("gz-0").await;
    registry.set("gz", vec![api.endpoint()]);
    let mut cfg = config(vec![route("gz", "/api/**", &[], T)]);
    cfg.static_dir = Some(web);
    cfg.compression = Some(CompressionConfig::from_manifest(
        &flotilla_manifest::Compression::default(),
    ));
    let gateway = start(cfg, &registry).await;
    let pad = "x".repeat(4000);
    let gzip = [
        ("accept-encoding", "br;q=1, gzip;q=0.8"),
        ("x-pad", pad.as_str()),
    ];

    for client in [Client::new(&gateway), Client::h2c(&gateway)] {
        // Proxied: the instance's JSON, about 4 kB of it.
        let reply = client
            .request(Method::GET, "/api/x", &gzip, Bytes::new())
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("content-encoding"), "gzip");
        assert_eq!(reply.header("vary"), "accept-encoding");
        assert!(reply.headers.get("content-length").is_none());
        assert!(reply.body.len() < 1000, "{} bytes", reply.body.len());
        let echo: serde_json::Value = ok(serde_json::from_str(&gunzip(&reply.body)), "JSON");
        assert_eq!(echo["instance"], "gz-0");
        assert_eq!(echo["headers"]["x-pad"], pad.as_str());
        // The instance is not asked to compress: the gateway does.
        assert_eq!(echo["headers"]["accept-encoding"], "br;q=1, gzip;q=0.8");

        // A client that does not take gzip gets the JSON as it was.
        let plain = client
            .request(
                Method::GET,
                "/api/x",
                &[("x-pad", pad.as_str())],
                Bytes::new(),
            )
            .await;
        assert!(plain.headers.get("content-encoding").is_none());
        assert_eq!(plain.header("vary"), "accept-encoding");
        assert_eq!(plain.json()["instance"], "gz-0");

        // Static files: text compressed, images and small files not.
        let js = client
            .request(Method::GET, "/app.js", &gzip, Bytes::new())
            .await;
        assert_eq!(js.header("content-encoding"), "gzip");
        assert!(js.headers.get("accept-ranges").is_none());
        assert_eq!(gunzip(&js.body), script);
        for path in ["/tiny.js", "/logo.png"] {
            let r = client.request(Method::GET, path, &gzip, Bytes::new()).await;
            assert_eq!(r.status, StatusCode::OK, "{path}");
            assert!(r.headers.get("content-encoding").is_none(), "{path}");
        }
        // The gateway's own small answers stay as they are.
        let missing = client
            .request(Method::GET, "/nowhere", &gzip, Bytes::new())
            .await;
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
        assert!(missing.headers.get("content-encoding").is_none());
        assert_eq!(missing.json()["error"]["code"], "not_found");
    }
    gateway.shutdown(T).await;
}

/// `compress = false` leaves one route's responses as the instance sent
/// them (a page that reflects what a visitor typed beside a secret:
/// BREACH), while the rest of the system's are gzipped.
#[tokio::test]
async fn a_route_with_compress_false_is_not_gzipped() {
    let registry = Registry::new();
    let api = Upstream::start("gzoff-0").await;
    registry.set("gzoff", vec![api.endpoint()]);
    let mut plain = route("gzoff", "/account/**", &[], T);
    plain.compress = false;
    let mut cfg = config(vec![route("gzoff", "/api/**", &[], T), plain]);
    cfg.compression = Some(CompressionConfig::from_manifest(
        &flotilla_manifest::Compression::default(),
    ));
    let gateway = start(cfg, &registry).await;
    let pad = "x".repeat(4000);
    let gzip = [("accept-encoding", "gzip"), ("x-pad", pad.as_str())];
    for client in [Client::new(&gateway), Client::h2c(&gateway)] {
        let zipped = client
            .request(Method::GET, "/api/x", &gzip, Bytes::new())
            .await;
        assert_eq!(zipped.header("content-encoding"), "gzip");
        let kept = client
            .request(Method::GET, "/account/x", &gzip, Bytes::new())
            .await;
        assert_eq!(kept.status, StatusCode::OK);
        assert!(kept.headers.get("content-encoding").is_none(), "{kept:?}");
        assert!(kept.headers.get("vary").is_none(), "{kept:?}");
        assert_eq!(kept.json()["headers"]["x-pad"], pad.as_str());
    }
    gateway.shutdown(T).await;
}
