//! The gateway's metrics, through the `metrics` facade, and the Prometheus
//! exporter the process installs for them ([`prometheus_recorder`]). Labels are bounded: `route` is a route's pattern (or
//! `unmatched`), never a raw path, so a scanner cannot blow up cardinality.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::StatusCode;
use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

const REQUESTS_TOTAL: &str = "flotilla_gateway_requests_total";
const REQUEST_DURATION: &str = "flotilla_gateway_request_duration_seconds";
/// The request-duration histogram's bucket bounds, in seconds: from a
/// cached answer to a minute (the longest timeouts); slower ones count in
/// `+Inf`.
const REQUEST_DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
const IN_FLIGHT: &str = "flotilla_gateway_in_flight";
const RETRIES_TOTAL: &str = "flotilla_gateway_retries_total";
const MIRRORED: &str = "flotilla_gateway_mirrored_total";
const AUTHZ: &str = "flotilla_gateway_authz_total";
const AUTHZ_DURATION: &str = "flotilla_gateway_authz_duration_seconds";
const CACHE_LOOKUPS: &str = "flotilla_gateway_cache_lookups_total";
const CACHE_BYTES: &str = "flotilla_gateway_cache_bytes";
const CACHE_REVALIDATIONS: &str = "flotilla_gateway_cache_revalidations_total";
const ACCESS_LOG_DROPPED: &str = "flotilla_gateway_access_log_dropped_total";
const AUTH_FAILURES: &str = "flotilla_gateway_auth_failures_total";
const RATE_LIMITED: &str = "flotilla_gateway_rate_limited_total";
const RATE_LIMIT_BACKEND_ERRORS: &str = "flotilla_gateway_rate_limit_backend_errors_total";
const IP_DENIED: &str = "flotilla_gateway_ip_denied_total";
const EJECTIONS: &str = "flotilla_gateway_ejections_total";
const RETRY_BUDGET_EXHAUSTED: &str = "flotilla_gateway_retry_budget_exhausted_total";
const SHED: &str = "flotilla_gateway_shed_total";
const ROUTE_SHED: &str = "flotilla_gateway_route_shed_total";
const WEBSOCKETS_OPEN: &str = "flotilla_gateway_websockets_open";
const WEBSOCKETS_CLOSED: &str = "flotilla_gateway_websockets_closed_total";
const WEBSOCKET_BYTES: &str = "flotilla_gateway_websocket_bytes_total";
const TLS_HANDSHAKES: &str = "flotilla_gateway_tls_handshakes_total";
const TLS_HANDSHAKE_FAILURES: &str = "flotilla_gateway_tls_handshake_failures_total";
const TLS_CERT_EXPIRY: &str = "flotilla_gateway_tls_certificate_expiry_timestamp_seconds";
const TLS_CERT_RELOADS: &str = "flotilla_gateway_tls_certificate_reloads_total";
const CONNECTIONS_OPEN: &str = "flotilla_gateway_connections_open";
const CONNECTIONS_REFUSED: &str = "flotilla_gateway_connections_refused_total";
const CONNECTIONS_EXPIRED: &str = "flotilla_gateway_connections_expired_total";

/// The `route` label of a request no route matched.
pub(crate) const UNMATCHED: &str = "unmatched";

/// The process's Prometheus recorder, installed on first use, with the
/// gateway's histogram buckets and the thread that keeps it up. Whoever
/// serves `/metrics` renders it (the runtime's console for the whole
/// platform: gateway, broker and mesh). Several gateways in one process
/// (tests) share it; a recorder installed by someone else first leaves this
/// one empty rather than failing.
pub fn prometheus_recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = prometheus_builder().build_recorder();
        let handle = recorder.handle();
        let _ = metrics::set_global_recorder(recorder);
        keep_up(handle.clone());
        handle
    })
}

/// Without buckets the exporter renders a histogram as a summary:
/// quantiles of one process, which cannot be added up across gateway
/// replicas or turned into an SLO ratio, and which cost a sketch update per
/// request to keep.
fn prometheus_builder() -> PrometheusBuilder {
    let built = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(REQUEST_DURATION.to_owned()),
            REQUEST_DURATION_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(AUTHZ_DURATION.to_owned()),
                REQUEST_DURATION_BUCKETS,
            )
        });
    match built {
        Ok(builder) => builder,
        // Only an empty list is refused, and the list above is not empty.
        Err(_) => PrometheusBuilder::new(),
    }
}

/// How often histogram samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The recorder keeps every histogram sample (one or more per request)
/// until something drains them: a render of `/metrics`, or its upkeep.
/// With nobody scraping, a busy gateway's memory grew without end, about
/// 20 bytes a request (4 MB every 5 s at 40 000 requests/s). A thread
/// rather than a task: the recorder is the process's, and outlives any
/// runtime.
fn keep_up(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(target: "flotilla::gateway", error = %e, "cannot start the metrics upkeep thread; histograms are drained only by scrapes of /metrics");
    }
}

/// Registers help texts; harmless to call more than once.
pub(crate) fn describe() {
    metrics::describe_counter!(
        REQUESTS_TOTAL,
        "Requests answered, by route, service and status class."
    );
    metrics::describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Time from request received to the last byte of the response."
    );
    metrics::describe_gauge!(IN_FLIGHT, "Requests being handled now.");
    metrics::describe_counter!(
        RETRIES_TOTAL,
        "Attempts retried on another instance, by route, service and reason (connect, connection_lost, status_502, status_503)."
    );
    metrics::describe_histogram!(
        AUTHZ_DURATION,
        metrics::Unit::Seconds,
        "How long external authorization checks took, from asking to the decision, by route: what a check adds to each request of the route."
    );
    metrics::describe_counter!(
        AUTHZ,
        "External authorization checks by route and outcome (allowed, denied, error: refused with 503, failed_open: let through on failure = \"allow\")"
    );
    metrics::describe_counter!(
        MIRRORED,
        "Copies of requests for a route's mirror services, by route, service and result (answered, failed, body_too_large, overloaded)."
    );
    metrics::describe_counter!(
        CACHE_LOOKUPS,
        "GET and HEAD requests on routes with a cache, by route and result (hit, stale: a stale response served while it is fetched again, miss: nothing fresh kept, bypass: the request asked not to be served from the cache, or for a range, collapsed: it waited for another request's fetch of the same URL)."
    );
    metrics::describe_counter!(
        CACHE_REVALIDATIONS,
        "Stale responses the gateway asked the instance about with their validators (If-None-Match, If-Modified-Since), by route and result (unchanged: 304, made fresh again without a body; changed: a whole new response)."
    );
    metrics::describe_gauge!(
        CACHE_BYTES,
        "Bytes the response cache holds: bodies, heads and keys."
    );
    metrics::describe_counter!(
        AUTH_FAILURES,
        "Requests refused by a route's JWT policy, by route and reason."
    );
    metrics::describe_counter!(RATE_LIMITED, "Requests refused with 429, by route.");
    metrics::describe_counter!(
        RATE_LIMIT_BACKEND_ERRORS,
        "Rate-limit checks that fell back to memory because Redis failed."
    );
    metrics::describe_counter!(IP_DENIED, "Requests refused by an IP list, by route.");
    metrics::describe_counter!(
        EJECTIONS,
        "Instances ejected by outlier detection, by service."
    );
    metrics::describe_counter!(
        RETRY_BUDGET_EXHAUSTED,
        "Retries not made because the service's retry budget was spent."
    );
    metrics::describe_counter!(
        SHED,
        "Requests shed with 503 because too many were in flight."
    );
    metrics::describe_counter!(
        ROUTE_SHED,
        "Requests refused with 503 because their route had its max_in_flight in flight, by route."
    );
    metrics::describe_counter!(
        ACCESS_LOG_DROPPED,
        "Access-log lines dropped, by reason: queue_full (the writer fell behind), write_failed (the disk refused writes, full or failing, for longer than the lines kept for it could cover)."
    );
    metrics::describe_gauge!(
        WEBSOCKETS_OPEN,
        "WebSocket tunnels open now, by route and service."
    );
    metrics::describe_counter!(
        WEBSOCKETS_CLOSED,
        "WebSocket tunnels ended, by route, service and reason (closed, idle, error, aborted: by the gateway stopping)."
    );
    metrics::describe_counter!(
        WEBSOCKET_BYTES,
        "Bytes carried by WebSocket tunnels that closed, by route, service and direction (upstream: client to instance; downstream: instance to client)."
    );
    metrics::describe_counter!(
        TLS_HANDSHAKES,
        "Client connections that completed a TLS handshake, by protocol version and ALPN protocol."
    );
    metrics::describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "Client connections closed before their TLS handshake completed, by reason (error, timeout, plaintext: plain HTTP sent to the TLS port)."
    );
    metrics::describe_gauge!(
        TLS_CERT_EXPIRY,
        metrics::Unit::Seconds,
        "When each certificate the gateway serves to clients (by its file, cert) expires, in seconds since the Unix epoch."
    );
    metrics::describe_gauge!(
        CONNECTIONS_OPEN,
        "Client connections open now (TLS handshakes in progress included)."
    );
    metrics::describe_counter!(
        CONNECTIONS_REFUSED,
        "Client connections closed as soon as accepted, over max_connections or max_connections_per_ip, or without a valid PROXY protocol header (reason)."
    );
    metrics::describe_counter!(
        CONNECTIONS_EXPIRED,
        "Client connections closed gracefully at the end of their life, by the limit that ended it (reason: max_connection_requests, max_connection_age)."
    );
    metrics::describe_counter!(
        TLS_CERT_RELOADS,
        "Changed certificate, client CA or CRL files the gateway took (result ok) or could not take and kept the current ones (result error; counted at each look while they stay so)."
    );
}

/// The gateway's own metrics, not a route's: requests in flight, requests
/// shed, and requests no route matched. One per gateway, which its access
/// log and every routing built for it share; each handle made on first use
/// rather than looked up by name on every request. A scanner probing for
/// paths no route matches, and a flood the gateway sheds, are where the
/// requests are.
///
/// Not a process-wide static: a handle made before the process installs
/// its recorder would count into nothing for good.
pub(crate) struct GatewayStats {
    in_flight: OnceLock<Gauge>,
    shed: OnceLock<Counter>,
    unmatched: RouteStats,
}

impl std::fmt::Debug for GatewayStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayStats")
    }
}

impl GatewayStats {
    pub(crate) fn new() -> Arc<GatewayStats> {
        Arc::new(GatewayStats {
            in_flight: OnceLock::new(),
            shed: OnceLock::new(),
            unmatched: RouteStats::new(UNMATCHED, ""),
        })
    }

    /// The requests-in-flight gauge.
    pub(crate) fn in_flight(&self) -> &Gauge {
        self.in_flight.get_or_init(|| metrics::gauge!(IN_FLIGHT))
    }

    /// A request refused because `max_in_flight` were in flight.
    pub(crate) fn shed(&self) {
        self.shed
            .get_or_init(|| metrics::counter!(SHED))
            .increment(1);
    }

    /// The metrics of requests no route matched (`route="unmatched"`,
    /// `service=""`): their requests and durations, and the system IP
    /// list's refusals, made before a route is looked for.
    pub(crate) fn unmatched(&self) -> &RouteStats {
        &self.unmatched
    }
}

/// One route's request metrics. The handles are registered on the first
/// request of each status class and kept with the route: looking a metric
/// up by name and labels costs a hash of its key (and the label strings
/// allocated for it) on every request, a measurable share of a proxied
/// request's CPU time.
pub(crate) struct RouteStats {
    route: String,
    service: String,
    classes: [OnceLock<(Counter, Histogram)>; 5],
    /// The route's counters of refusals and retries, by metric and label
    /// value, each made on first use: a client a route refuses (a flood of
    /// requests over its rate limit, of forged tokens) is the one that
    /// sends the most, and a registry lookup cost a 429 about a tenth of
    /// its instructions; retries come in floods too, when an instance
    /// fails. Slots are taken in order, so a lookup stops at the first
    /// empty one; past the last, the registry is asked.
    events: [OnceLock<(Event, &'static str, Counter)>; EVENT_SLOTS],
}

/// Room for a route's refusal and retry counters: a route refuses for a
/// few reasons (its JWT policy's, its API keys', its limits', its IP list)
/// and retries for a few (`connect`, `status_503`, ...).
const EVENT_SLOTS: usize = 12;

/// Which metric a route's refusal or retry counter is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Auth,
    RateLimited,
    IpDenied,
    Retried,
}

impl std::fmt::Debug for RouteStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteStats")
            .field("route", &self.route)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl RouteStats {
    pub(crate) fn new(route: &str, service: &str) -> RouteStats {
        RouteStats {
            route: route.to_string(),
            service: service.to_string(),
            classes: Default::default(),
            events: Default::default(),
        }
    }

    /// A request of this route refused by its JWT policy, API keys or
    /// client-certificate rule, for `reason`.
    pub(crate) fn auth_failed(&self, reason: &'static str) {
        self.counted(Event::Auth, reason);
    }

    /// A request of this route refused by its rate limit named `limit`
    /// (`default`, or the unit and key of one of several).
    pub(crate) fn rate_limited(&self, limit: &'static str) {
        self.counted(Event::RateLimited, limit);
    }

    /// A request of this route refused by an IP list.
    pub(crate) fn ip_denied(&self) {
        self.counted(Event::IpDenied, "");
    }

    /// A request of this route sent again, after a failed attempt for
    /// `reason`.
    pub(crate) fn retried(&self, reason: &'static str) {
        self.counted(Event::Retried, reason);
    }

    fn counted(&self, kind: Event, value: &'static str) {
        let register = || match kind {
            Event::Auth => {
                metrics::counter!(AUTH_FAILURES, "route" => self.route.clone(), "reason" => value)
            }
            Event::RateLimited => {
                metrics::counter!(RATE_LIMITED, "route" => self.route.clone(), "limit" => value)
            }
            Event::IpDenied => metrics::counter!(IP_DENIED, "route" => self.route.clone()),
            Event::Retried => metrics::counter!(
                RETRIES_TOTAL,
                "route" => self.route.clone(),
                "service" => self.service.clone(),
                "reason" => value,
            ),
        };
        for slot in &self.events {
            // Taken by whichever worker comes first; another that wanted
            // it for another counter goes on to the next.
            let (k, v, counter) = slot.get_or_init(|| (kind, value, register()));
            if *k == kind && *v == value {
                counter.increment(1);
                return;
            }
        }
        register().increment(1);
    }

    /// A request on this route is finished.
    pub(crate) fn finished(&self, status: StatusCode, took: Duration) {
        let class = status_class(status);
        let index = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        let (requests, duration) = self.classes[index].get_or_init(|| {
            let labels = [
                ("route", self.route.clone()),
                ("service", self.service.clone()),
                ("status_class", class.to_string()),
            ];
            (
                metrics::counter!(REQUESTS_TOTAL, &labels),
                metrics::histogram!(REQUEST_DURATION, &labels),
            )
        });
        requests.increment(1);
        duration.record(took.as_secs_f64());
    }
}

/// A route's external authorization metrics, each made on first use, as
/// [`CacheStats`] are: a check costs an atomic add and a histogram sample,
/// where looking them up in the registry by name and labels, with the
/// route's label copied, cost more than a tenth of a check's instructions
/// (`AUTHZ=1 benches/gateway/instructions.sh`).
pub(crate) struct AuthzStats {
    route: String,
    outcomes: [OnceLock<Counter>; AuthzOutcome::ALL.len()],
    duration: OnceLock<Histogram>,
}

/// What a check decided: the `outcome` label of
/// `flotilla_gateway_authz_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthzOutcome {
    Allowed,
    Denied,
    /// Decided nothing, and the request was refused with 503.
    Error,
    /// Decided nothing, and the request went on (`failure = "allow"`).
    FailedOpen,
}

impl AuthzOutcome {
    const ALL: [AuthzOutcome; 4] = [
        AuthzOutcome::Allowed,
        AuthzOutcome::Denied,
        AuthzOutcome::Error,
        AuthzOutcome::FailedOpen,
    ];

    fn label(self) -> &'static str {
        match self {
            AuthzOutcome::Allowed => "allowed",
            AuthzOutcome::Denied => "denied",
            AuthzOutcome::Error => "error",
            AuthzOutcome::FailedOpen => "failed_open",
        }
    }
}

impl std::fmt::Debug for AuthzStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthzStats")
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl AuthzStats {
    pub(crate) fn new(route: &str) -> AuthzStats {
        AuthzStats {
            route: route.to_string(),
            outcomes: Default::default(),
            duration: OnceLock::new(),
        }
    }

    /// Counts a check of a request of the route, which took `took` to
    /// decide.
    pub(crate) fn checked(&self, outcome: AuthzOutcome, took: Duration) {
        self.outcomes[outcome as usize]
            .get_or_init(|| {
                metrics::counter!(AUTHZ, "route" => self.route.clone(), "outcome" => outcome.label())
            })
            .increment(1);
        self.duration
            .get_or_init(|| metrics::histogram!(AUTHZ_DURATION, "route" => self.route.clone()))
            .record(took.as_secs_f64());
    }
}

pub(crate) fn mirrored(route: &str, service: &str, result: &'static str) {
    metrics::counter!(
        MIRRORED,
        "route" => route.to_string(),
        "service" => service.to_string(),
        "result" => result,
    )
    .increment(1);
}

/// A caching route's lookup counters, made once per result on first use:
/// a hit costs an atomic add, not a registry lookup with a label copied.
pub(crate) struct CacheStats {
    route: String,
    results: [OnceLock<Counter>; CacheStats::RESULTS.len()],
    revalidations: [OnceLock<Counter>; 2],
}

impl std::fmt::Debug for CacheStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheStats")
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl CacheStats {
    const RESULTS: [&'static str; 5] = ["hit", "stale", "miss", "bypass", "collapsed"];

    pub(crate) fn new(route: &str) -> CacheStats {
        CacheStats {
            route: route.to_string(),
            results: Default::default(),
            revalidations: Default::default(),
        }
    }

    /// Counts a stale response asked about: `unchanged` or `changed`.
    pub(crate) fn revalidated(&self, result: &'static str) {
        let at = usize::from(result != "unchanged");
        self.revalidations[at]
            .get_or_init(|| {
                metrics::counter!(CACHE_REVALIDATIONS, "route" => self.route.clone(), "result" => result)
            })
            .increment(1);
    }

    /// Counts a lookup; `result` is one of [`CacheStats::RESULTS`].
    pub(crate) fn lookup(&self, result: &'static str) {
        let Some(at) = CacheStats::RESULTS.iter().position(|r| *r == result) else {
            return;
        };
        self.results[at]
            .get_or_init(|| {
                metrics::counter!(CACHE_LOOKUPS, "route" => self.route.clone(), "result" => result)
            })
            .increment(1);
    }
}

pub(crate) fn cache_bytes(bytes: u64) {
    metrics::gauge!(CACHE_BYTES).set(bytes as f64);
}

pub(crate) fn rate_limit_backend_error() {
    metrics::counter!(RATE_LIMIT_BACKEND_ERRORS).increment(1);
}

pub(crate) fn ejected(service: &str) {
    metrics::counter!(EJECTIONS, "service" => service.to_string()).increment(1);
}

/// A counter with one label, made on first use rather than looked up by
/// name and label (a `String` made for the label) on every count: a
/// route's requests shed over its own `max_in_flight` (a route sheds when
/// it is busiest), a service's retries its budget refused (while an
/// instance fails, every request to the service may ask for one).
pub(crate) struct LazyCounter {
    metric: &'static str,
    label: &'static str,
    value: Box<str>,
    counter: OnceLock<Counter>,
}

impl std::fmt::Debug for LazyCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{{{}={:?}}}", self.metric, self.label, self.value)
    }
}

impl LazyCounter {
    fn new(metric: &'static str, label: &'static str, value: &str) -> LazyCounter {
        LazyCounter {
            metric,
            label,
            value: value.into(),
            counter: OnceLock::new(),
        }
    }

    /// `route`'s requests shed over its own `max_in_flight`.
    pub(crate) fn route_shed(route: &str) -> LazyCounter {
        LazyCounter::new(ROUTE_SHED, "route", route)
    }

    /// `service`'s retries its budget refused.
    pub(crate) fn retry_budget_exhausted(service: &str) -> LazyCounter {
        LazyCounter::new(RETRY_BUDGET_EXHAUSTED, "service", service)
    }

    pub(crate) fn increment(&self) {
        self.counter
            .get_or_init(|| metrics::counter!(self.metric, self.label => self.value.to_string()))
            .increment(1);
    }
}

/// The open-connections gauge, for `conn_limit` to keep.
pub(crate) fn connections_open() -> Gauge {
    metrics::gauge!(CONNECTIONS_OPEN)
}

pub(crate) fn connection_refused(reason: &'static str) {
    metrics::counter!(CONNECTIONS_REFUSED, "reason" => reason).increment(1);
}

/// A client connection told to close by `max_connection_requests` or
/// `max_connection_age` (once per connection: not a per-request count).
pub(crate) fn connection_expired(reason: &'static str) {
    metrics::counter!(CONNECTIONS_EXPIRED, "reason" => reason).increment(1);
}

/// A WebSocket tunnel on a route, counted open until it is finished or
/// dropped (a tunnel closed by the gateway's shutdown ends as `aborted`).
pub(crate) struct Tunnel {
    open: Gauge,
    route: String,
    service: String,
    reason: &'static str,
}

pub(crate) fn tunnel_opened(route: &str, service: &str) -> Tunnel {
    let open = metrics::gauge!(WEBSOCKETS_OPEN, "route" => route.to_string(), "service" => service.to_string());
    open.increment(1.0);
    Tunnel {
        open,
        route: route.to_string(),
        service: service.to_string(),
        reason: "aborted",
    }
}

impl Tunnel {
    /// What the tunnel carried each way (upstream: client to instance).
    pub(crate) fn carried(&self, upstream: u64, downstream: u64) {
        for (direction, bytes) in [("upstream", upstream), ("downstream", downstream)] {
            metrics::counter!(
                WEBSOCKET_BYTES,
                "route" => self.route.clone(),
                "service" => self.service.clone(),
                "direction" => direction
            )
            .increment(bytes);
        }
    }

    pub(crate) fn finished(mut self, reason: &'static str) {
        self.reason = reason;
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.open.decrement(1.0);
        metrics::counter!(
            WEBSOCKETS_CLOSED,
            "route" => std::mem::take(&mut self.route),
            "service" => std::mem::take(&mut self.service),
            "reason" => self.reason
        )
        .increment(1);
    }
}

/// A client's TLS handshake completed.
pub(crate) fn tls_accepted(version: Option<tokio_rustls::rustls::ProtocolVersion>, h2: bool) {
    use tokio_rustls::rustls::ProtocolVersion;
    let version = match version {
        Some(ProtocolVersion::TLSv1_3) => "1.3",
        Some(ProtocolVersion::TLSv1_2) => "1.2",
        _ => "other",
    };
    let alpn = if h2 { "h2" } else { "http/1.1" };
    metrics::counter!(TLS_HANDSHAKES, "version" => version, "alpn" => alpn).increment(1);
}

/// Changed certificate files were taken (`true`) or refused.
pub(crate) fn tls_certificate_reloaded(ok: bool) {
    let result = if ok { "ok" } else { "error" };
    metrics::counter!(TLS_CERT_RELOADS, "result" => result).increment(1);
}

/// A client's connection ended before its TLS handshake did.
pub(crate) fn tls_failed(reason: &'static str) {
    metrics::counter!(TLS_HANDSHAKE_FAILURES, "reason" => reason).increment(1);
}

/// The client-facing certificate in `cert`, now served, expires at
/// `not_after`.
pub(crate) fn tls_certificate_expiry(cert: &std::path::Path, not_after: std::time::SystemTime) {
    let secs = not_after
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    metrics::gauge!(TLS_CERT_EXPIRY, "cert" => cert.display().to_string()).set(secs);
}

/// An access-log line the writer could not take in time (its queue full).
pub(crate) const DROPPED_QUEUE_FULL: &str = "queue_full";
/// An access-log line dropped while the disk refused writes and the lines
/// kept for it filled their room, or left unwritten at the end.
pub(crate) const DROPPED_WRITE_FAILED: &str = "write_failed";

/// `lines` access-log lines dropped, for `reason` (one of the two above).
pub(crate) fn access_log_dropped(reason: &'static str, lines: u64) {
    metrics::counter!(ACCESS_LOG_DROPPED, "reason" => reason).increment(lines);
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each refusal and retry is counted under its own metric and label, in
    /// the slots a route keeps and past them (the registry is asked then).
    #[test]
    fn a_route_counts_each_refusal_under_its_own_labels() {
        let recorder = prometheus_builder().build_recorder();
        let handle = recorder.handle();
        let reasons: Vec<&'static str> = (0..EVENT_SLOTS + 3)
            .map(|i| &*Box::leak(format!("reason_{i}").into_boxed_str()))
            .collect();
        metrics::with_local_recorder(&recorder, || {
            let stats = RouteStats::new("/r/**", "svc");
            for (i, reason) in reasons.iter().enumerate() {
                for _ in 0..=i {
                    stats.auth_failed(reason);
                }
            }
            // Past the slots, which the reasons took: from the registry.
            for _ in 0..200 {
                stats.rate_limited("s-ip");
                stats.ip_denied();
            }
            // And a route whose first refusals take the slots, two of one
            // label value under two metrics.
            let other = RouteStats::new("/o", "svc");
            for _ in 0..3 {
                other.rate_limited("default");
                other.auth_failed("default");
                other.retried("status_503");
            }
            other.retried("connect");
        });
        let text = handle.render();
        let count = |line: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("no `{line}` in\n{text}"))
        };
        for (i, reason) in reasons.iter().enumerate() {
            let line = format!(
                "flotilla_gateway_auth_failures_total{{route=\"/r/**\",reason=\"{reason}\"}}"
            );
            assert_eq!(count(&line), i as u64 + 1, "{reason}");
        }
        let limited = "flotilla_gateway_rate_limited_total{route=\"/r/**\",limit=\"s-ip\"}";
        assert_eq!(count(limited), 200);
        assert_eq!(
            count("flotilla_gateway_ip_denied_total{route=\"/r/**\"}"),
            200
        );
        let other = "flotilla_gateway_rate_limited_total{route=\"/o\",limit=\"default\"}";
        assert_eq!(count(other), 3);
        let other = "flotilla_gateway_auth_failures_total{route=\"/o\",reason=\"default\"}";
        assert_eq!(count(other), 3);
        let retried =
            "flotilla_gateway_retries_total{route=\"/o\",service=\"svc\",reason=\"status_503\"}";
        assert_eq!(count(retried), 3);
        let retried =
            "flotilla_gateway_retries_total{route=\"/o\",service=\"svc\",reason=\"connect\"}";
        assert_eq!(count(retried), 1);
    }

    /// The gateway's own counts and a route's shed count, made before the
    /// recorder they count into is there (as a gateway's are when its
    /// process installs one later): their handles are made on first use,
    /// under the recorder then in place, and counted on after that.
    #[test]
    fn the_gateway_s_own_counts_go_to_the_recorder_in_place_when_first_used() {
        let stats = GatewayStats::new();
        let route = LazyCounter::route_shed("/capped/**");
        let budget = LazyCounter::retry_budget_exhausted("svc");
        let recorder = prometheus_builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            for _ in 0..3 {
                stats.shed();
                route.increment();
                budget.increment();
                stats.unmatched().ip_denied();
                stats.in_flight().increment(1.0);
            }
            stats.in_flight().decrement(1.0);
            stats
                .unmatched()
                .finished(StatusCode::NOT_FOUND, Duration::from_millis(1));
            stats
                .unmatched()
                .finished(StatusCode::NOT_FOUND, Duration::from_millis(2));
        });
        let text = handle.render();
        let count = |line: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("no `{line}` in\n{text}"))
        };
        assert_eq!(count("flotilla_gateway_shed_total "), 3.0);
        assert_eq!(
            count("flotilla_gateway_route_shed_total{route=\"/capped/**\"}"),
            3.0
        );
        assert_eq!(
            count("flotilla_gateway_retry_budget_exhausted_total{service=\"svc\"}"),
            3.0
        );
        assert_eq!(
            count("flotilla_gateway_ip_denied_total{route=\"unmatched\"}"),
            3.0
        );
        assert_eq!(count("flotilla_gateway_in_flight "), 2.0);
        assert_eq!(
            count(
                "flotilla_gateway_requests_total{route=\"unmatched\",service=\"\",status_class=\"4xx\"}"
            ),
            2.0
        );
        assert_eq!(
            count(
                "flotilla_gateway_request_duration_seconds_count{route=\"unmatched\",service=\"\",status_class=\"4xx\"}"
            ),
            2.0
        );
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(StatusCode::OK), "2xx");
        assert_eq!(status_class(StatusCode::NOT_MODIFIED), "3xx");
        assert_eq!(status_class(StatusCode::NOT_FOUND), "4xx");
        assert_eq!(status_class(StatusCode::GATEWAY_TIMEOUT), "5xx");
    }

    /// The names of this process's threads, as the kernel has them.
    #[cfg(target_os = "linux")]
    fn thread_names() -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .map(|tasks| {
                tasks
                    .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                    .map(|name| name.trim().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Without upkeep, every histogram sample stays in memory until a
    /// scrape: the recorder must come with the thread that drains it.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_recorder_comes_with_its_upkeep_thread() {
        let _ = prometheus_recorder();
        // A new thread names itself once it runs; until then it has the
        // name of the thread that spawned it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let names = thread_names();
            if names.iter().any(|n| n == "metrics-upkeep") {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no metrics-upkeep thread among {names:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
