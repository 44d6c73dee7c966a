//! Shadow traffic (a route's `mirror`): a copy of a share of a route's
//! requests goes to another service, whose answer is thrown away, as
//! Envoy's request mirroring and Istio's `mirror` do. A new version sees
//! real traffic before it serves anyone.
//!
//! The client's request is never held up by its copy beyond reading a
//! small body whole, for no longer than the route's timeout (past it the
//! client gets 408, as without a mirror): the copy is sent from a task of
//! its own after the request has gone on, under the route's timeout, and
//! dropped, never queued, when [`MAX_IN_FLIGHT`] copies are out already
//! (and then the body is not read ahead at all). A body is copied only
//! when its length is known and at most [`MAX_BODY`]; a larger or
//! streamed one is not mirrored at all. The copy's host name ends in
//! `-shadow` (Envoy's convention), before any port, so the service and
//! its logs can tell a copy from the real thing. A copy's answer is read
//! only to be thrown away, a frame at a time, and no further than
//! [`MAX_DRAIN`]: past it, its connection is closed instead.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Request};
use http_body::Body as _;
use http_body_util::BodyExt;
use rand::Rng;

use crate::body::{self, Body, BodyStalled, BoxError};
use crate::edge::ClientAddr;
use crate::headers::Told;
use crate::proxy::{Deadline, Proxy};
use crate::rejection::Rejection;
use crate::routes::Route;
use crate::server::ConnInfo;
use crate::stats;

/// The largest request body copied.
const MAX_BODY: u64 = 64 * 1024;
/// The most of a mirror's answer read only to be thrown away: past it,
/// closing the connection costs less than reading on.
const MAX_DRAIN: u64 = 64 * 1024;
/// Copies in flight at once, across the gateway; past it copies are dropped.
const MAX_IN_FLIGHT: usize = 256;

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// One copy in flight, counted until dropped.
struct Slot;

impl Slot {
    fn take() -> Option<Slot> {
        IN_FLIGHT
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_IN_FLIGHT).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sends copies of `req` (about to be forwarded on `route`, its instance
/// `told` what the request's fields do not hold) to the mirrors whose
/// share it falls in. May read a small body whole, leaving `req` with the
/// same bytes: only once a copy has its place among [`MAX_IN_FLIGHT`], and
/// for no longer than the route's timeout. A client that has not sent its
/// body by then gets the 408 it would get without a mirror (the `Err`).
pub(crate) async fn send(
    proxy: &Proxy,
    req: &mut Request<Body>,
    conn: ConnInfo,
    route: &Route,
    client: ClientAddr,
    told: &Told,
) -> Result<(), Rejection> {
    let label = route.label();
    let chosen: Vec<&Arc<Route>> = route
        .mirrors
        .iter()
        .filter(|(percent, _)| rand::rng().random_range(0..100) < *percent)
        .map(|(_, mirror)| mirror)
        .collect();
    if chosen.is_empty() {
        return Ok(());
    }
    let empty = req.body().is_end_stream();
    let copyable = empty
        || req
            .body()
            .size_hint()
            .exact()
            .is_some_and(|n| n <= MAX_BODY);
    if !copyable {
        for mirror in chosen {
            stats::mirrored(label, &mirror.service, "body_too_large");
        }
        return Ok(());
    }
    // Each copy's place is taken before the body is read: a copy that
    // would be dropped must not hold the request, nor its body be kept
    // (at most `MAX_IN_FLIGHT` bodies are buffered for copies at once).
    let copies: Vec<(&Arc<Route>, Slot)> = chosen
        .into_iter()
        .filter_map(|mirror| match Slot::take() {
            Some(slot) => Some((mirror, slot)),
            None => {
                stats::mirrored(label, &mirror.service, "overloaded");
                None
            }
        })
        .collect();
    if copies.is_empty() {
        return Ok(());
    }
    let bytes = if empty {
        Bytes::new()
    } else {
        let body = std::mem::replace(req.body_mut(), body::empty());
        // Bounded as the proxy bounds a body it buffers: a client that
        // never sends the length it announced would otherwise hold its
        // route's and the gateway's places for ever. The forward then has
        // what is left of the same timeout.
        let deadline = crate::clock::now() + route.timeout;
        req.extensions_mut().insert(Deadline(deadline));
        match tokio::time::timeout_at(deadline, body.collect()).await {
            Ok(Ok(collected)) => {
                let bytes = collected.to_bytes();
                *req.body_mut() = body::full(bytes.clone());
                bytes
            }
            // The client paused in it for `body_timeout`: the 408 the
            // proxy would give, without asking an instance first.
            Ok(Err(e)) if body::cause::<BodyStalled>(e.as_ref()).is_some() => {
                return Err(crate::proxy::body_error(e));
            }
            // The client's body broke off: the request goes on to fail
            // as it would have, and nothing is copied.
            Ok(Err(e)) => {
                *req.body_mut() = body::boxed(http_body_util::StreamBody::new(
                    futures_util::stream::once(async move { Err::<http_body::Frame<Bytes>, _>(e) }),
                ));
                return Ok(());
            }
            Err(_) => {
                return Err(Rejection::RequestBodyTimeout {
                    timeout: route.timeout,
                });
            }
        }
    };
    for (mirror, slot) in copies {
        let copy = copy_of(req, bytes.clone());
        let told = told.clone();
        let proxy = proxy.detached();
        let mirror = Arc::clone(mirror);
        tokio::spawn(async move {
            let label = mirror.label();
            let result = match proxy.forward(copy, conn, &mirror, client, told).await {
                Ok((reply, _answered)) => {
                    // No longer than the route may take.
                    let drained =
                        tokio::time::timeout(mirror.timeout, drain(reply.res.into_body())).await;
                    if matches!(drained, Ok(Ok(()))) {
                        "answered"
                    } else {
                        "failed"
                    }
                }
                Err(_) => "failed",
            };
            // Free before counted: a copy counted is no longer out.
            drop(slot);
            stats::mirrored(label, &mirror.service, result);
        });
    }
    Ok(())
}

/// Reads a mirror's answer, `body`, to throw it away: to its end, so that
/// its connection can be used again, when it is at most [`MAX_DRAIN`];
/// past that it is dropped (its connection closed) rather than read on,
/// and one whose length says it is longer before any of it is read.
/// Frame by frame, none kept: [`MAX_IN_FLIGHT`] copies' answers of any
/// size must not be held in memory at once.
async fn drain(mut body: Body) -> Result<(), BoxError> {
    let mut read = 0u64;
    while read <= MAX_DRAIN && body.size_hint().lower() <= MAX_DRAIN - read {
        let Some(frame) = body.frame().await else {
            return Ok(());
        };
        if let Ok(data) = frame?.into_data() {
            read = read.saturating_add(data.len() as u64);
        }
    }
    Ok(())
}

/// `req`'s head with `body`, its `Host` marked as a shadow's. The host
/// is the one the request was routed by: its target's, when the target
/// names one (absolute form, HTTP/2's `:authority`), else its `Host`. The
/// copy's target is then the path alone, so that the shadow's `Host` is
/// the one forwarded (`headers::forward_fields` prefers a target's host).
/// A host that cannot be marked ([`shadow_host`]) is left as it is.
fn copy_of(req: &Request<Body>, body: Bytes) -> Request<Body> {
    let mut copy = Request::new(body::full(body));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()));
    if let Some(shadow) = host.and_then(shadow_host) {
        copy.headers_mut().insert(HOST, shadow);
        if req.uri().authority().is_some() {
            let mut origin = http::uri::Parts::default();
            origin.path_and_query = req.uri().path_and_query().cloned();
            if let Ok(uri) = http::Uri::from_parts(origin) {
                *copy.uri_mut() = uri;
            }
        }
    }
    copy
}

/// `host` (`name[:port]`) with `-shadow` on its name, before the port:
/// `shop.example:8443` is `shop.example-shadow:8443`, where `-shadow`
/// after the port would make it no host at all (`:8443-shadow` is no
/// port). An IPv6 address (`[::1]:8080`) has no name to add to
/// (`[::1]-shadow` is not a host either), and neither has something that
/// is not a host: `None` for both, and the copy keeps the request's host.
fn shadow_host(host: &str) -> Option<HeaderValue> {
    let authority: http::uri::Authority = host.parse().ok()?;
    let name = authority.host();
    if name.is_empty() || name.starts_with('[') {
        return None;
    }
    // What follows the name: `:port`, or nothing. Userinfo, which the
    // gateway refuses in a request's host before this, is dropped.
    let written = authority.as_str();
    let after_userinfo = written.rsplit_once('@').map_or(written, |(_, rest)| rest);
    let port = after_userinfo.strip_prefix(name)?;
    HeaderValue::from_str(&format!("{name}-shadow{port}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_s_host_name_is_marked_before_its_port() {
        let copy = |target: &str, host: Option<&str>| {
            let mut req = Request::builder().uri(target);
            if let Some(host) = host {
                req = req.header(HOST, host);
            }
            let req = req
                .body(body::empty())
                .unwrap_or_else(|e| panic!("{target}: {e}"));
            let copy = copy_of(&req, Bytes::new());
            let host = copy.headers().get(HOST).map(|h| h.as_bytes().to_vec());
            (
                host.map(|h| String::from_utf8_lossy(&h).into_owned()),
                copy.uri().to_string(),
            )
        };
        let host = |target: &str, host: &str| copy(target, Some(host)).0;
        assert_eq!(
            host("/a", "shop.example").as_deref(),
            Some("shop.example-shadow")
        );
        assert_eq!(
            host("/a", "shop.example:8443").as_deref(),
            Some("shop.example-shadow:8443")
        );
        assert_eq!(
            host("/a", "127.0.0.1:8080").as_deref(),
            Some("127.0.0.1-shadow:8080")
        );
        // An IPv6 address has no name to mark: left as it is.
        assert_eq!(host("/a", "[::1]:8080").as_deref(), Some("[::1]:8080"));
        assert_eq!(host("/a", "[::1]").as_deref(), Some("[::1]"));
        // The host a target names (absolute form, `:authority`) is the
        // one marked, and the copy's target becomes the path alone.
        assert_eq!(
            copy("http://shop.example:8443/a?b", Some("other.example")),
            (Some("shop.example-shadow:8443".into()), "/a?b".into())
        );
        assert_eq!(
            copy("http://shop.example/a", None),
            (Some("shop.example-shadow".into()), "/a".into())
        );
        // Unmarked, the target keeps its host, which is what is forwarded.
        assert_eq!(
            copy("http://[::1]:8080/a", Some("[::1]:8080")),
            (Some("[::1]:8080".into()), "http://[::1]:8080/a".into())
        );
        assert_eq!(copy("/a", None), (None, "/a".into()));
        // Not a host: left alone rather than made a different wrong one.
        assert_eq!(host("/a", "a b").as_deref(), Some("a b"));
    }

    /// The only test in this binary that takes slots: the count is global.
    #[test]
    fn copies_past_the_cap_are_refused_until_one_finishes() {
        let mut held: Vec<Slot> = (0..MAX_IN_FLIGHT).filter_map(|_| Slot::take()).collect();
        assert_eq!(held.len(), MAX_IN_FLIGHT);
        assert!(Slot::take().is_none(), "a copy past the cap was let out");
        // One finishes: exactly one place is free.
        drop(held.pop());
        let next = Slot::take();
        assert!(next.is_some(), "a finished copy did not free its place");
        assert!(Slot::take().is_none(), "one finished copy freed two places");
        drop(next);
        drop(held);
        assert_eq!(IN_FLIGHT.load(Ordering::Acquire), 0);
    }
}
