//! External authorization (`[gateway.authz]`, a route's `authz = true`),
//! as Envoy's `ext_authz` HTTP service, nginx's `auth_request` and
//! Traefik's `forwardAuth` do it: a request of such a route goes on only
//! if a service of the system says so. An OPA sidecar, an entitlement
//! service, a legacy session store: policy that belongs to no one service
//! and that the manifest's `scopes` and `claims` cannot say.
//!
//! The check is a request of its own to that service, over the mesh (mTLS,
//! its instances balanced and ejected as any route's): the request's
//! method, `path_prefix` and its path and query, its `Host`, the client's
//! headers named in `request_headers`, and what the gateway tells every
//! instance (`X-Forwarded-For`, the request id, the trace, and the caller
//! a token or key identified). No body.
//!
//! - A 2xx answer lets the request through, with the answer's headers
//!   named in `upstream_headers` (a tenant, a role the service decided).
//!   A client's own copies of those never go on, whatever the answer: a
//!   service reading one can trust that the check set it.
//! - A 3xx or 4xx answer refuses it: the client gets that answer (its
//!   status, headers and up to 64 KiB of body), so the service can ask
//!   for credentials (`WWW-Authenticate`) or send a browser to sign in
//!   (`Location`).
//! - No answer within `timeout`, or a 5xx: the request is refused with
//!   503 `authz_unavailable` (fail closed), unless `failure = "allow"`.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, Uri};
use http_body::Body as _;
use http_body_util::BodyExt;

use crate::body::{self, Body};
use crate::edge::ClientAddr;
use crate::headers::Told;
use crate::proxy::Proxy;
use crate::rejection::Rejection;
use crate::routes::Route;
use crate::server::ConnInfo;
use crate::stats::{AuthzOutcome, AuthzStats};
use crate::trace::TRACEPARENT;

/// The most of a refusing answer's body passed on to the client.
const MAX_DENIAL_BODY: usize = 64 * 1024;

/// `[gateway.authz]`, compiled: what a check sends and keeps.
#[derive(Debug)]
pub(crate) struct Authz {
    service: String,
    path_prefix: String,
    timeout: Duration,
    request_headers: Vec<HeaderName>,
    upstream_headers: Vec<HeaderName>,
    failure_open: bool,
}

impl Authz {
    /// `None` when a header name is not one (the manifest checks them).
    pub(crate) fn new(config: &flotilla_manifest::Authz) -> Option<Authz> {
        let names = |list: &[String]| -> Option<Vec<HeaderName>> {
            list.iter()
                .map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect()
        };
        Some(Authz {
            service: config.service.clone(),
            path_prefix: config.path_prefix.trim_end_matches('/').to_string(),
            timeout: config.timeout,
            request_headers: names(&config.request_headers)?,
            upstream_headers: names(&config.upstream_headers)?,
            failure_open: config.failure_open,
        })
    }

    pub(crate) fn service(&self) -> &str {
        &self.service
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// A route's check: the gateway's settings, the route the check is sent
/// by (to `[gateway.authz]`'s service, under the check's timeout, counted
/// under the route's pattern), and the route's authz metrics.
#[derive(Debug)]
pub(crate) struct Check {
    pub authz: std::sync::Arc<Authz>,
    pub route: std::sync::Arc<Route>,
    pub stats: AuthzStats,
}

/// Asks the check's service about `req`, about to go on by the route the
/// check is of; on `Ok` the request may go on, with the answer's
/// `upstream_headers` among its fields.
///
/// Boxed here, not at the caller: a future made there, even moved into a
/// box at once, would keep its room in the edge's future (a moved-from
/// local's storage lasts to the end of its scope), and every request's
/// future, routes without `authz` included, would carry a check's.
pub(crate) fn check<'a>(
    proxy: &'a Proxy,
    check: &'a Check,
    req: &'a mut Request<Body>,
    conn: ConnInfo,
    client: ClientAddr,
    told: Told,
) -> BoxFuture<'a, Result<(), Rejection>> {
    Box::pin(ask(proxy, check, req, conn, client, told))
}

async fn ask(
    proxy: &Proxy,
    check: &Check,
    req: &mut Request<Body>,
    conn: ConnInfo,
    client: ClientAddr,
    told: Told,
) -> Result<(), Rejection> {
    let authz = &*check.authz;
    let started = crate::clock::now();
    // Whatever the answer, no client speaks for the check: not in the
    // fields' own names, nor with `_` for `-` (`x_tenant_id`), which a
    // CGI-style server (WSGI, Rack, PHP) reads as the same variable.
    for name in &authz.upstream_headers {
        req.headers_mut().remove(name);
    }
    let spelled: Vec<HeaderName> = req
        .headers()
        .keys()
        .filter(|k| {
            k.as_str().contains('_')
                && authz.upstream_headers.iter().any(|n| {
                    crate::edge::spells_with_underscores(
                        k.as_str().as_bytes(),
                        n.as_str().as_bytes(),
                    )
                })
        })
        .cloned()
        .collect();
    for name in spelled {
        req.headers_mut().remove(name);
    }
    let asked = match question(authz, req) {
        Some(asked) => asked,
        // A path that cannot be put after the prefix: nothing to ask
        // about, and nothing is let through undecided.
        None => {
            let why = "the check's path is not a path".into();
            return failed(check, "bad_path", why, started);
        }
    };
    let reply = match proxy.forward(asked, conn, &check.route, client, told).await {
        Ok((reply, _instance)) => reply,
        Err(rejection) => {
            let reason = match &rejection {
                Rejection::UpstreamTimeout { .. } => "timeout",
                Rejection::UpstreamUnreachable { .. } => "unreachable",
                Rejection::NoReadyInstance { .. } => "no_instance",
                Rejection::BadGateway { .. } => "connection_lost",
                _ => "error",
            };
            return failed(check, reason, rejection.to_string(), started);
        }
    };
    let status = reply.res.status();
    if status.is_success() {
        // Read from the instance's fields as they came: an answer that
        // lets a request on is not made into a map of its own.
        for name in &authz.upstream_headers {
            for value in reply.values(name) {
                if let Ok(value) = HeaderValue::from_bytes(value) {
                    req.headers_mut().append(name.clone(), value);
                }
            }
        }
        // Read to the end, so the connection can be used again.
        drain(reply.res.into_body(), authz.timeout).await;
        check.stats.checked(AuthzOutcome::Allowed, elapsed(started));
        return Ok(());
    }
    if status.is_server_error() {
        drain(reply.res.into_body(), authz.timeout).await;
        let why = format!("it answered {status}");
        return failed(check, "status_5xx", why, started);
    }
    // 1xx cannot arrive here (the client reads past them); 3xx and 4xx
    // refuse. Its fields in the map, the instance's included.
    let (mut parts, body) = reply.into_response().into_parts();
    let bytes = read(body, authz.timeout).await.unwrap_or_default();
    parts.headers.remove(CONTENT_LENGTH);
    parts.headers.remove(TRANSFER_ENCODING);
    check.stats.checked(AuthzOutcome::Denied, elapsed(started));
    Err(Rejection::AuthzDenied(Box::new(Response::from_parts(
        parts,
        body::full(bytes),
    ))))
}

/// The check's request: `req`'s method, the prefix and `req`'s path and
/// query, its `Host`, and the client's headers the check reads.
fn question(authz: &Authz, req: &Request<Body>) -> Option<Request<Body>> {
    let pq = req.uri().path_and_query().map_or("/", PathAndQuery::as_str);
    let uri = if authz.path_prefix.is_empty() {
        Uri::try_from(pq).ok()?
    } else {
        // Not `format!`, whose machinery cost more than the copy.
        let mut path = String::with_capacity(authz.path_prefix.len() + pq.len());
        path.push_str(&authz.path_prefix);
        path.push_str(pq);
        Uri::try_from(path).ok()?
    };
    let mut asked = Request::new(body::empty());
    *asked.method_mut() = req.method().clone();
    *asked.uri_mut() = uri;
    let headers: &mut HeaderMap = asked.headers_mut();
    // The host the request was routed by: its target's, else `Host`.
    let host = req
        .uri()
        .authority()
        .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
        .or_else(|| req.headers().get(HOST).cloned());
    if let Some(host) = host {
        headers.insert(HOST, host);
    }
    // The request's trace, as the instance will get it: without it the
    // check would be sent in the trace the gateway starts for a request
    // that has none, one its access log never names.
    let tracestate = HeaderName::from_static("tracestate");
    let trace = [&TRACEPARENT, &tracestate];
    for name in trace.into_iter().chain(&authz.request_headers) {
        for value in req.headers().get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    Some(asked)
}

/// A check that decided nothing (`reason`, for the access log, and `why`,
/// for the gateway's): refused with 503, or let through with `failure =
/// "allow"`.
fn failed(
    check: &Check,
    reason: &'static str,
    why: String,
    started: tokio::time::Instant,
) -> Result<(), Rejection> {
    let authz = &*check.authz;
    // The route's pattern: the check is sent by a route of the same one.
    let label = check.route.label();
    if authz.failure_open {
        check
            .stats
            .checked(AuthzOutcome::FailedOpen, elapsed(started));
        tracing::warn!(target: "flotilla::gateway", route = label, service = %authz.service, error = %why, "the authorization check failed; the request goes on (failure = \"allow\")");
        return Ok(());
    }
    check.stats.checked(AuthzOutcome::Error, elapsed(started));
    tracing::warn!(target: "flotilla::gateway", route = label, service = %authz.service, error = %why, "the authorization check failed; the request is refused");
    Err(Rejection::AuthzUnavailable {
        service: authz.service.clone(),
        reason,
    })
}

/// How long since `started`, by the clock the connection's poll read.
fn elapsed(started: tokio::time::Instant) -> Duration {
    crate::clock::now().saturating_duration_since(started)
}

/// `body` read to its end and thrown away, within `timeout`; an empty one
/// (an allowing answer's, usually) at once, without setting a timer.
async fn drain(body: Body, timeout: Duration) {
    if !body.is_end_stream() {
        let _ = read(body, timeout).await;
    }
}

/// A body read whole, up to [`MAX_DENIAL_BODY`] and `timeout`; `None`
/// when it is larger, slower, or breaks off. Frame by frame rather than
/// with `Limited`, whose boxed error type trips the compiler's
/// higher-ranked lifetime check inside the edge's future.
async fn read(mut body: Body, timeout: Duration) -> Option<Bytes> {
    let whole = async move {
        let mut out = BytesMut::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.ok()?.into_data() {
                if out.len() + data.len() > MAX_DENIAL_BODY {
                    return None;
                }
                out.extend_from_slice(&data);
            }
        }
        Some(out.freeze())
    };
    tokio::time::timeout(timeout, whole).await.ok()?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authz(prefix: &str) -> Authz {
        Authz {
            service: "policy".into(),
            path_prefix: prefix.into(),
            timeout: Duration::from_secs(1),
            request_headers: vec![HeaderName::from_static("authorization")],
            upstream_headers: vec![HeaderName::from_static("x-tenant")],
            failure_open: false,
        }
    }

    #[test]
    fn the_question_has_the_method_path_host_and_chosen_headers_only() {
        let req = Request::post("/api/orders?page=2")
            .header("host", "shop.example")
            .header("authorization", "Bearer t")
            .header("cookie", "a=1")
            .header("content-type", "application/json")
            .body(body::full("{\"secret\":1}"))
            .unwrap();
        let asked = question(&authz("/check"), &req).unwrap();
        assert_eq!(asked.method(), "POST");
        assert_eq!(asked.uri(), "/check/api/orders?page=2");
        assert_eq!(asked.headers()["host"], "shop.example");
        assert_eq!(asked.headers()["authorization"], "Bearer t");
        assert_eq!(asked.headers().len(), 2, "{:?}", asked.headers());
        let asked = question(&authz(""), &req).unwrap();
        assert_eq!(asked.uri(), "/api/orders?page=2");
        // An absolute-form target: its host is the one routed by.
        let req = Request::get("http://api.example/a")
            .body(body::empty())
            .unwrap();
        let asked = question(&authz(""), &req).unwrap();
        assert_eq!(asked.headers()["host"], "api.example");
        assert_eq!(asked.uri(), "/a");
        // The request's trace goes with it, as it goes to the instance.
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let req = Request::get("/a")
            .header("traceparent", parent)
            .header("tracestate", "vendor=1")
            .body(body::empty())
            .unwrap();
        let asked = question(&authz(""), &req).unwrap();
        assert_eq!(asked.headers()["traceparent"], parent);
        assert_eq!(asked.headers()["tracestate"], "vendor=1");
    }

    fn check(policy: Authz) -> Check {
        Check {
            route: Route::for_check(
                &policy.service,
                &flotilla_manifest::PathPattern::parse("/a").unwrap(),
                "/a",
                policy.timeout,
            ),
            authz: std::sync::Arc::new(policy),
            stats: AuthzStats::new("/a"),
        }
    }

    #[test]
    fn a_check_that_decided_nothing_fails_closed_unless_told_otherwise() {
        let now = tokio::time::Instant::now();
        let closed = failed(&check(authz("")), "timeout", "-".into(), now);
        assert!(matches!(
            closed,
            Err(Rejection::AuthzUnavailable {
                reason: "timeout",
                ..
            })
        ));
        let mut open = authz("");
        open.failure_open = true;
        assert!(failed(&check(open), "timeout", "-".into(), now).is_ok());
    }
}
