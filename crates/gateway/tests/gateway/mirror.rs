//! Mirrored routes (`mirror`): what a copy may cost the client whose
//! request is copied, and the gateway that copies it.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::support::*;

/// A body small enough to copy is read whole before the request goes on,
/// and a client that never sends it must not hold the request (and the
/// route's and the gateway's places) for ever: it gets the 408 it would
/// get without a mirror, within the route's timeout, and nothing is sent
/// anywhere.
#[tokio::test]
async fn a_mirrored_request_whose_body_never_comes_gets_408_and_frees_its_place() {
    let registry = Registry::new();
    let live = Upstream::start("slowcopy-0").await;
    let shadow = Upstream::start("slowcopy-shadow-0").await;
    registry.set("slowcopy", vec![live.endpoint()]);
    registry.set("slowcopy-shadow", vec![shadow.endpoint()]);
    let mut mirrored = route("slowcopy", "/**", &[], Duration::from_millis(300));
    mirrored.mirror = vec![("slowcopy-shadow".to_string(), 100)];
    // One place: a request still holding it would shed the next.
    mirrored.max_in_flight = Some(1);
    let gateway = start(config(vec![mirrored]), &registry).await;
    let addr = gateway.local_addr();

    // None of the body, and a tenth of it; a POST would stream to the
    // instance without a mirror, and a PUT be buffered to be retryable.
    for raw in [
        "POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 65000\r\n\r\n",
        "PUT /up HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789",
    ] {
        let answer = raw_request(addr, raw).await;
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
        assert!(answer.contains("\"request_timeout\""), "{answer}");
        assert!(
            answer.contains("the request body did not arrive within 300ms"),
            "{answer}"
        );
    }
    assert_eq!(live.hits(), 0, "a request without its body was forwarded");
    assert_eq!(shadow.hits(), 0, "a request without its body was copied");

    // The route's one place is free again, and a whole body is copied.
    let reply = Client::new(&gateway)
        .request(Method::POST, "/up", &[], Bytes::from_static(b"0123456789"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.json()["body_len"], 10);
    wait_until("the whole request's copy", || shadow.hits() == 1).await;
    gateway.shutdown(Duration::ZERO).await;
}
