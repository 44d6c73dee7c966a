//! The innermost service: forwards a routed request to an instance of its
//! service and relays the response.
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
//! instances are skipped when picking.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use rand::Rng;
use tokio::time::Instant;
use tower::Service;

use crate::balance;
use crate::body::{self, Body, Holding};
use crate::config::Limits;
use crate::edge::ClientAddr;
use crate::headers;
use crate::outbound::{OutBody, Outbound, SendError};
use crate::rejection::Rejection;
use crate::request_id::RequestId;
use crate::resilience::{Resilience, ServiceHealth, Settings};
use crate::routes::Route;
use crate::routing::MatchedRoute;
use crate::server::ConnInfo;
use crate::stats;
use crate::upstream::{ActivateError, Endpoint, LoadGuard, Upstreams};

/// The instance that answered; in response extensions for the access log.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamInstance(pub String);

/// Backoff before retry `n` (from 1): "full jitter" up to 10 ms × 2^(n-1),
/// at most 200 ms — short, since the retry goes to another instance, and
/// random so that a burst of failures does not retry in lockstep.
fn backoff(retry: u32) -> Duration {
    let cap = (10u64 << retry.saturating_sub(1).min(5)).min(200);
    Duration::from_millis(rand::rng().random_range(1..=cap))
}

static IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

#[derive(Clone)]
pub(crate) struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    upstreams: Arc<dyn Upstreams>,
    client: Outbound,
    max_retries: u32,
    retry_body_limit: usize,
    resilience: Resilience,
}

impl Proxy {
    pub(crate) fn new(upstreams: Arc<dyn Upstreams>, client: Outbound, limits: &Limits) -> Proxy {
        Proxy {
            inner: Arc::new(Inner {
                upstreams,
                client,
                max_retries: limits.max_retries,
                retry_body_limit: limits.retry_body_limit,
                resilience: Resilience::new(Settings::from_limits(limits)),
            }),
        }
    }
}

impl Service<Request<Body>> for Proxy {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { Ok(inner.handle(req).await) })
    }
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

impl Inner {
    async fn handle(&self, req: Request<Body>) -> Response<Body> {
        let request_id = req.extensions().get::<RequestId>().cloned();
        let Some(MatchedRoute(route)) = req.extensions().get::<MatchedRoute>().cloned() else {
            // Only reachable if the stack is assembled without routing.
            let rejection = Rejection::NotFound {
                method: req.method().clone(),
                path: req.uri().path().to_string(),
            };
            return rejection.into_response(request_id.as_ref());
        };
        match self.forward(req, &route).await {
            Ok(res) => res,
            Err(rejection) => rejection.into_response(request_id.as_ref()),
        }
    }

    async fn forward(
        &self,
        req: Request<Body>,
        route: &Route,
    ) -> Result<Response<Body>, Rejection> {
        let deadline = Instant::now() + route.timeout;
        let timed_out = || Rejection::UpstreamTimeout {
            service: route.service.clone(),
            timeout: route.timeout,
        };
        let (mut parts, body) = req.into_parts();
        let conn = parts.extensions.get::<ConnInfo>().copied();
        let trusted = parts
            .extensions
            .get::<ClientAddr>()
            .is_some_and(|c| c.via_trusted_proxy);
        let authority = parts.uri.authority().map(|a| a.to_string());
        headers::prepare_request(
            &mut parts.headers,
            conn.map(|c| c.peer.ip()),
            trusted,
            conn.map_or("http", |c| c.scheme),
            authority.as_deref(),
        );
        let retryable = is_idempotent(&parts.method)
            || (parts.method == Method::POST && parts.headers.contains_key(&IDEMPOTENCY_KEY));
        let mut outgoing = tokio::time::timeout_at(deadline, self.outgoing(retryable, body))
            .await
            .map_err(|_| timed_out())??;
        let can_retry = matches!(outgoing, Outgoing::Replayable(_));
        let health = self.resilience.service(&route.service);
        health.request();

        let mut tried: Vec<String> = Vec::new();
        let mut retries = 0;
        loop {
            let (endpoint, ready) = self.pick(route, &tried, deadline, &health).await?;
            let guard = endpoint.load.begin();
            let body = match &mut outgoing {
                Outgoing::Replayable(bytes) => OutBody::Full(bytes.clone()),
                Outgoing::Streaming(body) => {
                    OutBody::Stream(body.take().unwrap_or_else(body::empty))
                }
            };
            let may_retry = |retries: u32| can_retry && retries < self.max_retries;
            // Sent for the route's service: over mTLS, only an instance of
            // it can take the request.
            let sending = self
                .client
                .send(&route.service, endpoint.addr, &parts, body);
            let error = match tokio::time::timeout_at(deadline, sending).await {
                Err(_) => {
                    health.failure(&endpoint.instance, &ready);
                    return Err(timed_out());
                }
                Ok(Ok(res)) => {
                    let status = res.status();
                    if status.is_server_error() {
                        health.failure(&endpoint.instance, &ready);
                    } else {
                        health.success(&endpoint.instance);
                    }
                    let reason = match status {
                        StatusCode::BAD_GATEWAY => "status_502",
                        StatusCode::SERVICE_UNAVAILABLE => "status_503",
                        _ => return Ok(relay(res, guard, &endpoint)),
                    };
                    if !may_retry(retries) || !health.try_retry() {
                        return Ok(relay(res, guard, &endpoint));
                    }
                    drop(res);
                    drop(guard);
                    retries += 1;
                    stats::retried(route.pattern.as_str(), &route.service, reason);
                    tracing::debug!(
                        target: "flotilla::gateway",
                        service = %route.service,
                        instance = %endpoint.instance,
                        %status,
                        retry = retries,
                        "upstream answered {status}; retrying on another instance"
                    );
                    tried.push(endpoint.instance);
                    tokio::time::sleep_until(deadline.min(Instant::now() + backoff(retries))).await;
                    continue;
                }
                Ok(Err(error)) => error,
            };
            drop(guard);
            if let Some(limit) = body_limit_exceeded(&error, route) {
                return Err(Rejection::PayloadTooLarge { limit });
            }
            let failure = classify(&error);
            if failure != Failure::Other {
                health.failure(&endpoint.instance, &ready);
            }
            if failure != Failure::Other && may_retry(retries) && health.try_retry() {
                retries += 1;
                let reason = match failure {
                    Failure::Connect => "connect",
                    _ => "connection_lost",
                };
                stats::retried(route.pattern.as_str(), &route.service, reason);
                tracing::debug!(
                    target: "flotilla::gateway",
                    service = %route.service,
                    instance = %endpoint.instance,
                    error = %error,
                    retry = retries,
                    "upstream connection failed; retrying on another instance"
                );
                tried.push(endpoint.instance);
                tokio::time::sleep_until(deadline.min(Instant::now() + backoff(retries))).await;
                continue;
            }
            let service = route.service.clone();
            let source = Box::new(error);
            return Err(match failure {
                Failure::Connect => Rejection::UpstreamUnreachable { service, source },
                Failure::ConnectionLost | Failure::Other => {
                    Rejection::BadGateway { service, source }
                }
            });
        }
    }

    /// Buffers the body when that makes the request retryable.
    async fn outgoing(&self, retryable: bool, body: Body) -> Result<Outgoing, Rejection> {
        if !retryable || self.max_retries == 0 {
            return Ok(Outgoing::Streaming(Some(body)));
        }
        if body.is_end_stream() {
            return Ok(Outgoing::Replayable(Bytes::new()));
        }
        // Only a body whose length is known to be small is buffered; a
        // chunked or large one streams and is not retried.
        match body.size_hint().upper() {
            Some(len) if len <= self.retry_body_limit as u64 => {
                let collected =
                    body.collect().await.map_err(|source| match source
                        .downcast_ref::<http_body_util::LengthLimitError>(
                    ) {
                        Some(_) => Rejection::PayloadTooLarge {
                            limit: len as usize,
                        },
                        None => Rejection::BadRequestBody { source },
                    })?;
                Ok(Outgoing::Replayable(collected.to_bytes()))
            }
            _ => Ok(Outgoing::Streaming(Some(body))),
        }
    }

    /// A ready instance, preferring ones not `tried` yet and not ejected;
    /// activates the service (holding the request) when none is ready.
    /// Also returns the ready instances, for outlier detection.
    async fn pick(
        &self,
        route: &Route,
        tried: &[String],
        deadline: Instant,
        health: &ServiceHealth,
    ) -> Result<(Endpoint, Arc<[Endpoint]>), Rejection> {
        let service = route.service.as_str();
        let no_ready = |source: ActivateError| Rejection::NoReadyInstance {
            service: service.to_string(),
            source: Some(source),
        };
        let mut ready = self.upstreams.ready(service);
        if ready.is_empty() {
            match tokio::time::timeout_at(deadline, self.upstreams.activate(service)).await {
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
        let healthy: Vec<&Endpoint> = ready
            .iter()
            .filter(|e| !health.is_ejected(&e.instance))
            .collect();
        // Outlier detection never ejects every instance, but the runtime's
        // list may have shrunk to ejected ones: better them than nothing.
        let pool: Vec<&Endpoint> = if healthy.is_empty() {
            ready.iter().collect()
        } else {
            healthy
        };
        let fresh: Vec<&Endpoint> = pool
            .iter()
            .filter(|e| !tried.contains(&e.instance))
            .copied()
            .collect();
        // With every instance tried, try again where we must.
        let candidates: Vec<&Endpoint> = if fresh.is_empty() { pool } else { fresh };
        let picked = balance::pick(&candidates, &mut rand::rng()).cloned();
        picked.map(|e| (e, Arc::clone(&ready))).ok_or_else(|| {
            no_ready(ActivateError::Unavailable {
                service: service.to_string(),
                reason: "activation finished but no instance is ready".to_string(),
            })
        })
    }
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

/// The upstream response for the client; the instance stays loaded until
/// the body is done.
fn relay(res: Response<Body>, guard: LoadGuard, endpoint: &Endpoint) -> Response<Body> {
    let (mut parts, incoming) = res.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    // The client's connection has its own protocol version; an HTTP/1.0
    // upstream (Python's http.server) must not downgrade it.
    parts.version = Version::default();
    parts
        .extensions
        .insert(UpstreamInstance(endpoint.instance.clone()));
    Response::from_parts(parts, body::boxed(Holding::new(incoming, guard)))
}

/// The route's body limit, when `error` is the request body exceeding it
/// while streaming to the upstream.
fn body_limit_exceeded(error: &SendError, route: &Route) -> Option<usize> {
    let SendError::Body(error) = error else {
        return None;
    };
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return route.policy.max_body_bytes;
        }
        source = e.source();
    }
    None
}

fn classify(error: &SendError) -> Failure {
    match error {
        SendError::Connect(_) => Failure::Connect,
        SendError::Lost(_) => Failure::ConnectionLost,
        SendError::Body(_) | SendError::Protocol(_) => Failure::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
