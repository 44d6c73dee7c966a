//! The innermost step of the request path: forwards a routed request to an
//! instance of its service and relays the response.
//!
//! Per request: pick an instance by power of two choices (activating the
//! service and holding the request when none is ready, which is how a
//! function scales up from zero), count the request on that instance until
//! the response body is done, forward with hop-by-hop headers removed and
//! `X-Forwarded-*` set, and bound everything up to the response headers by
//! the route's timeout.
//!
//! Idempotent requests (and POSTs carrying an `Idempotency-Key`) whose body
//! is empty or small enough to buffer are retried on another instance when
//! the upstream connection fails before a response arrives (refused, reset,
//! closed early) or the instance answers 502 or 503, after a short jittered
//! backoff and within the service's retry budget (see `resilience`), so
//! that an instance dying or draining costs clients nothing. Nothing else
//! is retried: a non-idempotent request may already have had its effect.
//!
//! Every attempt's outcome feeds passive outlier detection; ejected
//! instances are skipped when picking. On a route with `affinity`, the
//! pick is the client's own instance instead (see `affinity`), and a
//! retry its next.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use rand::Rng;
use tokio::time::Instant;

use crate::balance;
use crate::body::{self, Body, BodyStalled, BoxError};
use crate::config::Limits;
use crate::edge::ClientAddr;
use crate::headers::{Forwarding, Told};
use crate::outbound::{OutBody, Outbound, SendError, UpstreamRequest};
use crate::rejection::Rejection;
use crate::relayed::Reply;
use crate::resilience::{Resilience, ServiceHealth};
use crate::routes::Route;
use crate::server::ConnInfo;
use crate::upstream::{ActivateError, Endpoint, LoadGuard, Upstreams};
use crate::workers;

/// The instance that answered a request. Kept (by the access log) until
/// the response body is done, counting the request on that instance until
/// then.
pub(crate) struct Upstream {
    ready: Arc<[Endpoint]>,
    index: usize,
    _load: LoadGuard,
}

impl Upstream {
    pub(crate) fn instance(&self) -> &str {
        self.ready
            .get(self.index)
            .map_or("", |e| e.instance.as_str())
    }
}

/// Backoff before retry `n` (from 1): "full jitter" up to 10 ms × 2^(n-1),
/// at most 200 ms — short, since the retry goes to another instance, and
/// random so that a burst of failures does not retry in lockstep.
fn backoff(retry: u32) -> Duration {
    let cap = backoff_cap(retry).as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(1..=cap))
}

/// The longest [`backoff`] before retry `n`.
fn backoff_cap(retry: u32) -> Duration {
    Duration::from_millis((10u64 << retry.saturating_sub(1).min(5)).min(200))
}

/// Whether retry `n` still fits before the route's `deadline`, at `now`:
/// its longest backoff must end before it. One that would start past it
/// would be given no time at all, charge its instance a failure, spend the
/// retry budget, and turn the 502 or 503 the client should get into a 504.
fn retry_fits(now: Instant, retry: u32, deadline: Instant) -> bool {
    now + backoff_cap(retry) < deadline
}

static IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

/// When a request's route timeout ends, put in its extensions by what
/// spent part of it before [`Proxy::forward`] (a mirror reading the body
/// to copy it), so that the body's wait and the instance's share the one
/// `timeout`, as without the mirror, instead of taking it twice.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadline(pub tokio::time::Instant);

pub(crate) struct Proxy {
    upstreams: Arc<dyn Upstreams>,
    client: Outbound,
    retry_body_limit: usize,
    /// Shared by every worker's proxy: outliers and retry budgets are
    /// per instance and per service, not per thread.
    resilience: Arc<Resilience>,
    /// The runtime the gateway was started on, where activations run
    /// ([`workers::on_caller`]). `None` outside a runtime.
    background: Option<tokio::runtime::Handle>,
}

/// The request body as it will be sent.
enum Outgoing {
    /// Buffered (or empty): can be sent again on a retry.
    Replayable(Bytes),
    /// Streamed from the client: one attempt only.
    Streaming(Option<Body>),
}

/// How an attempt failed, for the retry decision and the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// No connection to the instance (refused, unreachable, connect timeout).
    Connect,
    /// The connection broke before response headers arrived.
    ConnectionLost,
    Other,
}

impl Proxy {
    /// `resilience` holds the retry and ejection settings (which a reload
    /// may change) and every service's state.
    pub(crate) fn new(
        upstreams: Arc<dyn Upstreams>,
        client: Outbound,
        limits: &Limits,
        resilience: Arc<Resilience>,
    ) -> Proxy {
        Proxy {
            upstreams,
            client,
            retry_body_limit: limits.retry_body_limit,
            resilience,
            background: tokio::runtime::Handle::try_current().ok(),
        }
    }

    /// This proxy, owned: for work that outlives the request that started
    /// it (a mirrored copy).
    pub(crate) fn detached(&self) -> Proxy {
        self.with_client(self.client.clone())
    }

    /// The same proxy (instances, retry and outlier state) sending through
    /// `client`: a worker's own connection pool.
    pub(crate) fn with_client(&self, client: Outbound) -> Proxy {
        Proxy {
            upstreams: Arc::clone(&self.upstreams),
            client,
            retry_body_limit: self.retry_body_limit,
            resilience: Arc::clone(&self.resilience),
            background: self.background.clone(),
        }
    }

    /// Forwards `req`, matched to `route`, and relays the response, with
    /// the instance that answered it. `client` is who sent it, as the edge
    /// found (for `X-Forwarded-For`); `told` what the instance is told
    /// besides the request's fields (its id, the verified caller).
    ///
    /// The route's timeout runs from now, or from the [`Deadline`] in the
    /// request's extensions when something before the proxy already spent
    /// part of it.
    ///
    /// The request is taken apart before the future is made, which then
    /// holds it once, as it is sent (an `async fn` would hold it also as it
    /// came, and copy it into itself).
    pub(crate) fn forward<'a>(
        &'a self,
        req: Request<Body>,
        conn: ConnInfo,
        route: &'a Route,
        client: ClientAddr,
        told: Told,
    ) -> impl Future<Output = Result<(Reply, Upstream), Rejection>> + Send + 'a {
        let (parts, body) = req.into_parts();
        // The `X-Forwarded-*` fields are written with the head.
        let req = UpstreamRequest::new(
            parts,
            Forwarding {
                peer: conn.peer.ip(),
                trusted_proxy: client.trusted_proxy,
                proto: client.proto,
                trace: Some(client.trace),
                told,
            },
        );
        async move {
            // Only a mirrored route's requests carry one. Taken out of the
            // parts before the future was made, the lookup (and the moves
            // it cost) added ~330 instructions to every request
            // (instructions.sh), 1.6 % of one.
            let deadline = match route.mirrors.is_empty() {
                true => None,
                false => req.parts.extensions.get::<Deadline>().map(|d| d.0),
            }
            .unwrap_or_else(|| crate::clock::now() + route.timeout);
            let timed_out = || Rejection::UpstreamTimeout {
                service: route.service.clone(),
                timeout: route.timeout,
            };
            let retryable = may_retry_method(&req.parts);
            let max_retries = route
                .retries
                .unwrap_or_else(|| self.resilience.max_retries());
            let mut outgoing = match self.outgoing(retryable && max_retries > 0, body) {
                Ok(outgoing) => outgoing,
                // Only a body to buffer needs the deadline (and a timer) here.
                // It comes from the client: past the deadline, the client
                // was too slow (408), and no instance was asked.
                Err(body) => tokio::time::timeout_at(deadline, collect(body))
                    .await
                    .map_err(|_| Rejection::RequestBodyTimeout {
                        timeout: route.timeout,
                    })??,
            };
            let can_retry = matches!(outgoing, Outgoing::Replayable(_));
            let health = route.health.get(&self.resilience, &route.service);
            let health: &ServiceHealth = &health;
            health.request();

            let mut tried: Vec<String> = Vec::new();
            let mut retries = 0;
            loop {
                let (ready, index) = self
                    .pick(route, &tried, deadline, health, client.affinity)
                    .await?;
                let Some(endpoint) = ready.get(index) else {
                    // Unreachable: `pick` returns an index into `ready`.
                    return Err(Rejection::NoReadyInstance {
                        service: route.service.clone(),
                        source: None,
                    });
                };
                let guard = endpoint.load.begin();
                let body = match &mut outgoing {
                    Outgoing::Replayable(bytes) => OutBody::Full(bytes.clone()),
                    Outgoing::Streaming(body) => {
                        OutBody::Stream(body.take().unwrap_or_else(body::empty))
                    }
                };
                let may_retry = |retries: u32| {
                    can_retry
                        && retries < max_retries
                        && retry_fits(crate::clock::now(), retries + 1, deadline)
                };
                // This attempt's own deadline (`try_timeout`), within the
                // route's, which every attempt shares.
                let attempt_deadline = route
                    .try_timeout
                    .map_or(deadline, |t| deadline.min(crate::clock::now() + t));
                // Sent for the route's service: over mTLS, only an instance of
                // it can take the request.
                let sending =
                    self.client
                        .send(&route.service, endpoint.addr, &req, body, attempt_deadline);
                // Why this attempt is retried; every other outcome returns.
                let reason = match sending.await {
                    // A client that sends its body slower than the route's
                    // timeout allows is its own fault: were the instance
                    // charged, a handful of slow uploads would eject every
                    // instance but one.
                    Err(SendError::ClientTooSlow) => {
                        drop(guard);
                        return Err(Rejection::RequestBodyTimeout {
                            timeout: if attempt_deadline < deadline {
                                route.try_timeout.unwrap_or(route.timeout)
                            } else {
                                route.timeout
                            },
                        });
                    }
                    Err(SendError::TimedOut) => {
                        health.failure(endpoint, &ready);
                        drop(guard);
                        let Some(try_timeout) =
                            route.try_timeout.filter(|_| attempt_deadline < deadline)
                        else {
                            return Err(timed_out());
                        };
                        if !may_retry(retries) || !health.try_retry() {
                            return Err(Rejection::UpstreamTimeout {
                                service: route.service.clone(),
                                timeout: try_timeout,
                            });
                        }
                        "try_timeout"
                    }
                    Ok(reply) => {
                        let status = reply.res.status();
                        if status.is_server_error() {
                            health.failure(endpoint, &ready);
                        } else {
                            health.success(endpoint);
                        }
                        let reason = match status {
                            StatusCode::BAD_GATEWAY => "status_502",
                            StatusCode::SERVICE_UNAVAILABLE => "status_503",
                            _ => return Ok(relay(reply, ready, index, guard)),
                        };
                        if !may_retry(retries) || !health.try_retry() {
                            return Ok(relay(reply, ready, index, guard));
                        }
                        drop(guard);
                        reason
                    }
                    Err(error) => {
                        drop(guard);
                        if let Some(limit) = body_limit_exceeded(&error, route) {
                            return Err(Rejection::PayloadTooLarge { limit });
                        }
                        // The client paused in its body for `body_timeout`:
                        // its wait, as `ClientTooSlow` is, not the instance's.
                        if let Some(timeout) = body_stalled(&error) {
                            return Err(Rejection::RequestBodyPaused { timeout });
                        }
                        let failure = classify(&error);
                        // An answer that is no HTTP response is evidence
                        // against the instance as a 502 would be: counted
                        // toward its ejection (not retried: it may have
                        // acted on the request).
                        // A stale pooled connection is not: the instance
                        // closed an idle connection, as it may.
                        if (failure != Failure::Other || matches!(error, SendError::Protocol(_)))
                            && !matches!(error, SendError::Stale(_))
                        {
                            health.failure(endpoint, &ready);
                        }
                        if failure == Failure::Other || !may_retry(retries) || !health.try_retry() {
                            let service = route.service.clone();
                            // The client's body broke as it streamed (bad
                            // chunked framing, longer or shorter than it
                            // said): the client's fault, not the instance's.
                            if matches!(error, SendError::Body(_)) {
                                return Err(Rejection::BadRequestBody {
                                    source: Box::new(error),
                                });
                            }
                            let source = Box::new(error);
                            return Err(match failure {
                                Failure::Connect => {
                                    Rejection::UpstreamUnreachable { service, source }
                                }
                                Failure::ConnectionLost | Failure::Other => {
                                    Rejection::BadGateway { service, source }
                                }
                            });
                        }
                        tracing::debug!(target: "flotilla::gateway", service = %route.service, instance = %endpoint.instance, error = %error, "upstream connection failed");
                        match failure {
                            Failure::Connect => "connect",
                            _ => "connection_lost",
                        }
                    }
                };
                retries += 1;
                route.stats.retried(reason);
                tracing::debug!(
                    target: "flotilla::gateway",
                    service = %route.service,
                    instance = %endpoint.instance,
                    reason,
                    retry = retries,
                    "retrying on another instance"
                );
                tried.push(endpoint.instance.clone());
                tokio::time::sleep_until(deadline.min(Instant::now() + backoff(retries))).await;
            }
        }
    }

    /// The body as it will be sent, unless it must be buffered first (to
    /// make the request retryable): then `Err` with the body to collect.
    fn outgoing(&self, retryable: bool, body: Body) -> Result<Outgoing, Body> {
        if !retryable {
            return Ok(Outgoing::Streaming(Some(body)));
        }
        if body.is_end_stream() {
            return Ok(Outgoing::Replayable(Bytes::new()));
        }
        // Only a body whose length is known to be small is buffered; a
        // chunked or large one streams and is not retried.
        match body.size_hint().upper() {
            Some(len) if len <= self.retry_body_limit as u64 => Err(body),
            _ => Ok(Outgoing::Streaming(Some(body))),
        }
    }

    /// A ready instance (as `ready` and its index there), preferring ones
    /// not `tried` yet and not ejected: the one `affinity`, a client's key
    /// hashed, goes to, or else the less loaded of two drawn at random.
    /// Activates the service (holding the request) when none is ready.
    /// `ready` is also what outlier detection needs.
    async fn pick(
        &self,
        route: &Route,
        tried: &[String],
        deadline: Instant,
        health: &ServiceHealth,
        affinity: Option<u64>,
    ) -> Result<(Arc<[Endpoint]>, usize), Rejection> {
        let service = route.service.as_str();
        let no_ready = |source: ActivateError| Rejection::NoReadyInstance {
            service: service.to_string(),
            source: Some(source),
        };
        let mut ready = self.upstreams.ready(service);
        if ready.is_empty() {
            let activation =
                workers::on_caller(self.background.as_ref(), self.upstreams.activate(service));
            let activated = tokio::time::timeout_at(deadline, activation)
                .await
                .map(|joined| {
                    joined.unwrap_or_else(|e| {
                        Err(ActivateError::Unavailable {
                            service: service.to_string(),
                            reason: format!("the activation failed: {e}"),
                        })
                    })
                });
            match activated {
                Err(_) => {
                    return Err(no_ready(ActivateError::Unavailable {
                        service: service.to_string(),
                        reason: format!(
                            "none was ready within the route timeout of {}",
                            humantime::format_duration(route.timeout)
                        ),
                    }));
                }
                Ok(Err(e)) => return Err(no_ready(e)),
                Ok(Ok(())) => {}
            }
            ready = self.upstreams.ready(service);
        }
        // Candidates by predicate rather than collected into lists: this
        // runs on every request, and nearly always every instance is a
        // candidate.
        let healthy = |e: &Endpoint| !health.is_ejected(e);
        let fresh = |e: &Endpoint| !tried.contains(&e.instance);
        // Outlier detection never ejects every instance, but the runtime's
        // list may have shrunk to ejected ones: better them than nothing.
        let any_healthy = ready.iter().any(healthy);
        let in_pool = |e: &Endpoint| !any_healthy || healthy(e);
        // With every instance tried, try again where we must.
        let any_fresh = tried.is_empty() || ready.iter().any(|e| in_pool(e) && fresh(e));
        let candidate = |e: &Endpoint| in_pool(e) && (!any_fresh || fresh(e));
        let picked = match affinity {
            Some(key) => balance::pick_sticky(&ready, candidate, key),
            None => balance::pick(&ready, candidate, &mut rand::rng()),
        };
        match picked {
            Some(index) => Ok((ready, index)),
            None => Err(no_ready(ActivateError::Unavailable {
                service: service.to_string(),
                reason: "activation finished but no instance is ready".to_string(),
            })),
        }
    }
}

/// Buffers a small request body, so that it can be sent again.
async fn collect(body: Body) -> Result<Outgoing, Rejection> {
    let limit = body.size_hint().upper().unwrap_or(0);
    match body.collect().await {
        Ok(collected) => Ok(Outgoing::Replayable(collected.to_bytes())),
        Err(source) if source.is::<http_body_util::LengthLimitError>() => {
            Err(Rejection::PayloadTooLarge {
                limit: usize::try_from(limit).unwrap_or(usize::MAX),
            })
        }
        Err(source) => Err(body_error(source)),
    }
}

/// What a request body that failed as it was read for buffering (to
/// retry it, to copy it to a mirror) is refused as: 408 when the client
/// paused in it for `body_timeout` (see [`BodyStalled`]), else 400.
pub(crate) fn body_error(source: BoxError) -> Rejection {
    match body::cause::<BodyStalled>(source.as_ref()) {
        Some(stalled) => Rejection::RequestBodyPaused {
            timeout: stalled.timeout,
        },
        None => Rejection::BadRequestBody { source },
    }
}

/// Whether a request may be sent again (to another instance, or on a
/// fresh connection after a stale one, `outbound`): an idempotent method,
/// or a POST with an `Idempotency-Key`.
pub(crate) fn may_retry_method(parts: &http::request::Parts) -> bool {
    is_idempotent(&parts.method)
        || (parts.method == Method::POST && parts.headers.contains_key(&IDEMPOTENCY_KEY))
}

/// GET, HEAD, OPTIONS, PUT and DELETE may be sent twice without changing
/// the outcome (RFC 9110 §9.2.2); POST and PATCH may not.
fn is_idempotent(method: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// The upstream response for the client, and the instance it came from
/// (loaded until the caller drops it, with the response body).
fn relay(
    mut reply: Reply,
    ready: Arc<[Endpoint]>,
    index: usize,
    load: LoadGuard,
) -> (Reply, Upstream) {
    // The instance's hop-by-hop fields were left out of its relayed ones
    // (see `outbound`), and what the way out sets goes beside them (see
    // `relayed`).
    // The client's connection has its own protocol version; an HTTP/1.0
    // upstream (Python's http.server) must not downgrade it.
    *reply.res.version_mut() = Version::default();
    let upstream = Upstream {
        ready,
        index,
        _load: load,
    };
    (reply, upstream)
}

/// The route's body limit, when `error` is the request body exceeding it
/// while streaming to the upstream.
fn body_limit_exceeded(error: &SendError, route: &Route) -> Option<usize> {
    let SendError::Body(error) = error else {
        return None;
    };
    body::cause::<http_body_util::LengthLimitError>(error.as_ref()).and(route.policy.max_body_bytes)
}

/// The `body_timeout` the client paused in its body for, when `error` is
/// that pause while the body streamed to the upstream.
fn body_stalled(error: &SendError) -> Option<Duration> {
    let SendError::Body(error) = error else {
        return None;
    };
    body::cause::<BodyStalled>(error.as_ref()).map(|s| s.timeout)
}

fn classify(error: &SendError) -> Failure {
    match error {
        SendError::Connect(_) => Failure::Connect,
        SendError::Lost(_) | SendError::Stale(_) => Failure::ConnectionLost,
        SendError::Body(_)
        | SendError::Protocol(_)
        | SendError::TimedOut
        | SendError::ClientTooSlow => Failure::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_is_made_only_when_its_backoff_ends_before_the_deadline() {
        let now = Instant::now();
        let deadline = now + Duration::from_millis(100);
        // The first retry waits up to 10 ms, the third up to 40.
        assert!(retry_fits(now, 1, deadline));
        assert!(retry_fits(now + Duration::from_millis(89), 1, deadline));
        assert!(!retry_fits(now + Duration::from_millis(90), 1, deadline));
        assert!(!retry_fits(now + Duration::from_millis(60), 3, deadline));
        assert!(!retry_fits(deadline, 1, deadline));
        for retry in 1..12 {
            for _ in 0..50 {
                let b = backoff(retry);
                assert!(b >= Duration::from_millis(1) && b <= backoff_cap(retry));
            }
        }
        assert_eq!(backoff_cap(30), Duration::from_millis(200));
    }

    #[test]
    fn only_idempotent_methods_are_retryable() {
        for m in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
        ] {
            assert!(is_idempotent(&m), "{m}");
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!is_idempotent(&m), "{m}");
        }
    }
}
