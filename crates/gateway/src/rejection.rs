//! Every response the gateway makes up itself instead of relaying one: the
//! one place where a failure becomes an HTTP status, a stable error code and
//! a message that is safe to show a client. The full error chain goes to the
//! log, never to the client.
//!
//! Body shape: `{"error":{"code":"not_found","message":"no route for GET /x","request_id":"..."}}`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::header::{ALLOW, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderName, HeaderValue, Method, Response, StatusCode};

use crate::apikey::KeyError;
use crate::body::{self, Body, BoxError};
use crate::json;
use crate::jwt::AuthError;
use crate::relayed::{Field, Relayed, Reply};
use crate::request_id::RequestId;
use crate::upstream::ActivateError;

/// What the access log tells of a response the gateway made itself: its
/// `error.code`, and for a refused credential the reason, which the
/// client is never told (a metric label, as `auth_failures_total` counts
/// it), and for a 429 the limit that refused it (its `RateLimit` name, the
/// `limit` label of `rate_limited_total`). Kept in the response's
/// extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub code: &'static str,
    pub reason: Option<&'static str>,
}

/// Why the gateway answered a request itself. The `Display` text is the
/// client-facing message.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Rejection {
    #[error("no route for {method} {path}")]
    NotFound { method: Method, path: String },
    #[error("{method} is not allowed on {path}; allowed: {}", allow.join(", "))]
    MethodNotAllowed {
        method: Method,
        path: String,
        allow: Vec<String>,
    },
    #[error(
        "the path must not contain a `.` or `..` segment, an encoded `/` (`%2F`), a backslash, a `;`, a control character or a malformed `%` escape"
    )]
    BadPath,
    #[error("the request must name one host, without userinfo (`user@`)")]
    BadHost,
    /// An HTTP/2 `:authority` or `Host` that is no host
    /// (`headers::is_valid_host`); HTTP/1's are refused with their head.
    #[error(
        "the request's host must be a host name, an IPv4 address or a bracketed IPv6 address, with an optional port"
    )]
    InvalidHost,
    /// An HTTP/2 request with neither `:authority` nor `Host`, malformed
    /// (RFC 9113 §8.3.1); HTTP/1.1's is refused with its head.
    #[error("an HTTP/2 request must name its host in :authority or a Host header")]
    MissingHost,
    /// An HTTP/2 `CONNECT` (HTTP/1's is refused with its head, `h1::head`).
    #[error("{}", crate::h1::head::CONNECT_REFUSED)]
    Connect,
    #[error("could not read the request body")]
    BadRequestBody {
        #[source]
        source: BoxError,
    },
    #[error("no instance of `{service}` became ready")]
    NoReadyInstance {
        service: String,
        #[source]
        source: Option<ActivateError>,
    },
    #[error("`{service}` did not answer within {}", humantime::format_duration(*timeout))]
    UpstreamTimeout { service: String, timeout: Duration },
    /// The client had not sent its body when the route's `timeout` ran
    /// out: its fault, not the service's (which is not charged for it).
    #[error("the request body did not arrive within {}", humantime::format_duration(*timeout))]
    RequestBodyTimeout { timeout: Duration },
    /// The client sent nothing more of its body for `body_timeout` while
    /// the gateway waited for it ([`crate::body::BodyStalled`]): its
    /// fault too, and the same 408, but a pause, not a total, is what ran
    /// out.
    #[error("the client sent nothing more of the request body for {}", humantime::format_duration(*timeout))]
    RequestBodyPaused { timeout: Duration },
    #[error("cannot connect to `{service}`")]
    UpstreamUnreachable {
        service: String,
        #[source]
        source: BoxError,
    },
    #[error("`{service}` failed to answer")]
    BadGateway {
        service: String,
        #[source]
        source: BoxError,
    },
    #[error("this client address is not allowed")]
    IpDenied,
    #[error("this origin may not make this request")]
    CorsDenied,
    #[error(
        "this route needs a client certificate: connect with one the gateway's client CA signed"
    )]
    ClientCertRequired,
    /// The reason stays out of the message: telling an attacker why a
    /// token failed helps them forge the next one.
    #[error("{}", auth_message(.0))]
    Auth(AuthError),
    /// As for tokens, the message says what to send, never why a key
    /// failed beyond that.
    #[error("{}", key_message(.error, .header))]
    ApiKey { error: KeyError, header: HeaderName },
    #[error(
        "a token from a cookie is taken on this request only from this site, or from an origin the CORS policy admits with credentials; send it in `Authorization: Bearer` instead"
    )]
    CrossSiteToken,
    /// The authorization service's own refusal (`[gateway.authz]`), passed
    /// on as it answered.
    #[error("the authorization service refused the request")]
    AuthzDenied(Box<Response<Body>>),
    #[error("the authorization service `{service}` could not decide on the request; retry later")]
    /// `reason` says why, in the access log only.
    AuthzUnavailable {
        service: String,
        reason: &'static str,
    },
    /// `limit` is the refusing limit's name, for the access log only.
    #[error("too many requests; retry later")]
    RateLimited { limit: &'static str },
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the gateway is overloaded; retry later")]
    Overloaded,
    #[error(
        "nothing is kept for this request, which asked for a kept response only (`Cache-Control: only-if-cached`)"
    )]
    NotCached,
    #[error("service `{service}` has as many requests in flight as this route allows; retry later")]
    RouteOverloaded { service: String },
    #[error("the gateway has as many WebSocket connections open as it allows; retry later")]
    TooManyTunnels,
}

fn key_message(e: &KeyError, header: &HeaderName) -> String {
    match e {
        KeyError::Missing => format!("an API key is required, in one `{header}` header"),
        KeyError::Invalid => "the API key is invalid".into(),
        KeyError::NotAllowed => "this API key may not call this route".into(),
    }
}

fn auth_message(e: &AuthError) -> &'static str {
    match e {
        AuthError::Missing => "an access token is required",
        AuthError::Invalid(_) => "the access token is invalid",
        AuthError::Forbidden { .. } => "the access token does not allow this request",
    }
}

impl Rejection {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Rejection::NotFound { .. } => StatusCode::NOT_FOUND,
            Rejection::MethodNotAllowed { .. } | Rejection::Connect => {
                StatusCode::METHOD_NOT_ALLOWED
            }
            Rejection::BadPath
            | Rejection::BadHost
            | Rejection::InvalidHost
            | Rejection::MissingHost
            | Rejection::BadRequestBody { .. } => StatusCode::BAD_REQUEST,
            Rejection::NoReadyInstance { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Rejection::UpstreamTimeout { .. } | Rejection::NotCached => StatusCode::GATEWAY_TIMEOUT,
            Rejection::RequestBodyTimeout { .. } | Rejection::RequestBodyPaused { .. } => {
                StatusCode::REQUEST_TIMEOUT
            }
            Rejection::UpstreamUnreachable { .. } | Rejection::BadGateway { .. } => {
                StatusCode::BAD_GATEWAY
            }
            Rejection::IpDenied | Rejection::CorsDenied | Rejection::ClientCertRequired => {
                StatusCode::FORBIDDEN
            }
            Rejection::Auth(AuthError::Forbidden { .. }) => StatusCode::FORBIDDEN,
            Rejection::Auth(_) => StatusCode::UNAUTHORIZED,
            Rejection::ApiKey {
                error: KeyError::NotAllowed,
                ..
            } => StatusCode::FORBIDDEN,
            Rejection::ApiKey { .. } => StatusCode::UNAUTHORIZED,
            Rejection::CrossSiteToken => StatusCode::FORBIDDEN,
            Rejection::AuthzDenied(res) => res.status(),
            Rejection::AuthzUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Rejection::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Rejection::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::Overloaded
            | Rejection::RouteOverloaded { .. }
            | Rejection::TooManyTunnels => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Stable, machine-readable; clients may branch on it.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Rejection::NotFound { .. } => "not_found",
            Rejection::MethodNotAllowed { .. } | Rejection::Connect => "method_not_allowed",
            Rejection::BadPath => "bad_path",
            Rejection::BadHost | Rejection::InvalidHost | Rejection::MissingHost => "bad_host",
            Rejection::BadRequestBody { .. } => "bad_request_body",
            Rejection::NoReadyInstance { .. } => "no_ready_instance",
            Rejection::UpstreamTimeout { .. } => "upstream_timeout",
            Rejection::RequestBodyTimeout { .. } | Rejection::RequestBodyPaused { .. } => {
                "request_timeout"
            }
            Rejection::UpstreamUnreachable { .. } => "upstream_unreachable",
            Rejection::BadGateway { .. } => "bad_gateway",
            Rejection::IpDenied => "ip_denied",
            Rejection::CorsDenied => "cors_denied",
            Rejection::ClientCertRequired => "client_certificate_required",
            Rejection::Auth(AuthError::Missing) => "missing_token",
            Rejection::Auth(AuthError::Invalid(_)) => "invalid_token",
            Rejection::Auth(AuthError::Forbidden { .. }) => "insufficient_scope",
            Rejection::ApiKey { error, .. } => error.reason(),
            Rejection::CrossSiteToken => "cross_site_request",
            Rejection::AuthzDenied(_) => "authz_denied",
            Rejection::AuthzUnavailable { .. } => "authz_unavailable",
            Rejection::RateLimited { .. } => "rate_limited",
            Rejection::PayloadTooLarge { .. } => "payload_too_large",
            Rejection::Overloaded => "overloaded",
            Rejection::NotCached => "not_cached",
            Rejection::RouteOverloaded { .. } => "route_overloaded",
            Rejection::TooManyTunnels => "too_many_websockets",
        }
    }

    /// The JSON error response; logs the full chain of server-side
    /// failures. When the access log writes a line for the request
    /// (`logged`), the response carries what the line tells of the refusal
    /// ([`Refusal`], in its extensions); only then, since a map of
    /// extensions costs a refusal two allocations and a hashed insert.
    ///
    /// Its fields are kept as the gateway's fields of a relayed response
    /// are (lines in one buffer, [`Fields`]), and so are those the way out
    /// adds (the request id, `Server`, a limit's `RateLimit` fields, CORS):
    /// collected in an `http::HeaderMap` instead, each hashed into it, they
    /// cost a 429 about 2 000 instructions more
    /// (`REFUSALS=1 benches/gateway/instructions.sh`).
    pub(crate) fn into_reply(self, request_id: Option<&RequestId>, logged: bool) -> Reply {
        let status = self.status();
        if let Rejection::AuthzDenied(mut res) = self {
            // The service's answer is the client's; the log's `status` is
            // the service's.
            if logged {
                res.extensions_mut().insert(Refusal {
                    code: "authz_denied",
                    reason: None,
                });
            }
            return Reply::from(*res);
        }
        let request_id = request_id.map(RequestId::as_str).unwrap_or("");
        let shed = matches!(
            self,
            Rejection::Overloaded | Rejection::RouteOverloaded { .. } | Rejection::TooManyTunnels
        );
        if shed {
            // Said in a summary: a line for each, written to the console
            // under its lock by the worker that sheds, would add to the
            // load being shed (the access log and metrics count each).
            if let Some(refused) = SHED_LOG.shed(std::time::Instant::now()) {
                tracing::warn!(
                    target: "flotilla::gateway",
                    code = self.code(),
                    refused,
                    "shedding load: requests refused with 503 since the last such line"
                );
            }
        } else if status.is_server_error() && !matches!(self, Rejection::NotCached) {
            // A 504 for `only-if-cached` is the client's choice, not a
            // failure.
            tracing::warn!(
                target: "flotilla::gateway",
                request_id,
                code = self.code(),
                error = %chain(&self),
                "request failed"
            );
        }
        let body = error_body(self.code(), &self.message(), request_id);
        let mut res = Response::new(body::full(body));
        *res.status_mut() = status;
        if logged {
            res.extensions_mut().insert(Refusal {
                code: self.code(),
                reason: match &self {
                    Rejection::Auth(e) => Some(e.reason()),
                    Rejection::ApiKey { error, .. } => Some(error.reason()),
                    Rejection::RateLimited { limit } => Some(limit),
                    Rejection::AuthzUnavailable { reason, .. } => Some(reason),
                    _ => None,
                },
            });
        }
        let mut reply = Reply {
            res,
            relayed: Some(json_fields()),
        };
        let mut fields = reply.fields();
        if let Rejection::MethodNotAllowed { allow, .. } = &self
            && let Ok(v) = HeaderValue::from_str(&allow.join(", "))
        {
            fields.insert(ALLOW, v);
        }
        if let Rejection::Connect = &self {
            // What `h1`'s refusal of a CONNECT says: its target (a host to
            // tunnel to) is nothing the gateway serves any method on.
            fields.insert(ALLOW, HeaderValue::from_static(""));
        }
        if let Rejection::Auth(e) = &self {
            fields.insert(WWW_AUTHENTICATE, challenge(e));
        }
        if let Rejection::ApiKey { header, .. } = &self
            && status == StatusCode::UNAUTHORIZED
            && let Ok(v) =
                HeaderValue::from_str(&format!("ApiKey realm=\"flotilla\", header=\"{header}\""))
        {
            fields.insert(WWW_AUTHENTICATE, v);
        }
        if let Rejection::Overloaded
        | Rejection::RouteOverloaded { .. }
        | Rejection::AuthzUnavailable { .. }
        | Rejection::TooManyTunnels = &self
        {
            fields.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        reply
    }

    /// [`Rejection::into_reply`] as one response, its fields in its map.
    #[cfg(test)]
    pub(crate) fn into_response(
        self,
        request_id: Option<&RequestId>,
        logged: bool,
    ) -> Response<Body> {
        self.into_reply(request_id, logged).into_response()
    }
}

/// A refusal's `Content-Type: application/json`, kept as if an instance
/// had sent it. Among the fields the gateway adds, the others go into the
/// head as one buffer of lines; a `content-type` there shares its
/// [`name_bit`](crate::headers::name_bit) with `date`, which the writer
/// must look for, and would send every one of them through the writer
/// field by field, about 1 200 instructions more.
fn json_fields() -> Relayed {
    const HEAD: &[u8] = b"content-type: application/json";
    let head = bytes::Bytes::from_static(HEAD);
    let field = Field::within(&head, &head[..12], &head[14..]);
    Relayed::new(head, vec![field])
}

impl Rejection {
    /// The client-facing message, `Display`'s text. A 404's is put
    /// together by hand: a scanner probing for paths gets the most of
    /// them, and the formatting machinery (a `String` grown through
    /// `fmt::Write`) was about 400 of a 404's 12 000 instructions. A test
    /// holds it to `Display`'s.
    fn message(&self) -> String {
        match self {
            Rejection::NotFound { method, path } => {
                let method = method.as_str();
                let mut m = String::with_capacity(NO_ROUTE.len() + method.len() + 1 + path.len());
                m.push_str(NO_ROUTE);
                m.push_str(method);
                m.push(' ');
                m.push_str(path);
                m
            }
            other => other.to_string(),
        }
    }
}

/// How a 404's message starts: `Rejection::NotFound`'s `Display`.
const NO_ROUTE: &str = "no route for ";

/// How often at most load shedding is said in the log.
const SHED_LOG_EVERY: Duration = Duration::from_secs(10);

static SHED_LOG: ShedLog = ShedLog {
    refused: AtomicU64::new(0),
    said_at: Mutex::new(None),
};

/// Requests shed since the log last said so, and when it did.
struct ShedLog {
    refused: AtomicU64,
    said_at: Mutex<Option<std::time::Instant>>,
}

impl ShedLog {
    /// Counts one refusal at `now`; the count to say, when a line is due
    /// (the first shed, then at most one every [`SHED_LOG_EVERY`]).
    fn shed(&self, now: std::time::Instant) -> Option<u64> {
        self.refused.fetch_add(1, Ordering::Relaxed);
        // Only one of the workers shedding at once says it; the others
        // do not wait for it.
        let mut said_at = self.said_at.try_lock().ok()?;
        if said_at.is_some_and(|at| now.saturating_duration_since(at) < SHED_LOG_EVERY) {
            return None;
        }
        *said_at = Some(now);
        Some(self.refused.swap(0, Ordering::Relaxed))
    }
}

/// The JSON body of a refusal: `{"error":{"code":…,"message":…,
/// "request_id":…}}`, byte for byte what `serde_json` writes for it.
/// Written here rather than through `serde_json`: built as a `Value`, it
/// took a quarter of a 429's instructions, and serialised from a struct
/// still a twelfth, most of it in the escaping of strings that need none
/// (`REFUSALS=1 benches/gateway/instructions.sh`). Refusals are what a
/// gateway under a flood answers most.
pub(crate) fn error_body(code: &str, message: &str, request_id: &str) -> bytes::Bytes {
    let mut out = Vec::with_capacity(48 + code.len() + message.len() + request_id.len());
    out.extend_from_slice(b"{\"error\":{\"code\":");
    json::string(&mut out, code);
    out.extend_from_slice(b",\"message\":");
    json::string(&mut out, message);
    out.extend_from_slice(b",\"request_id\":");
    json::string(&mut out, request_id);
    out.extend_from_slice(b"}}");
    out.into()
}

/// The `WWW-Authenticate` challenge (RFC 6750 §3): no error code when no
/// token was sent, the scope the route needs when it was too narrow.
fn challenge(e: &AuthError) -> HeaderValue {
    match e {
        AuthError::Missing => HeaderValue::from_static("Bearer realm=\"flotilla\""),
        AuthError::Invalid(_) => {
            HeaderValue::from_static("Bearer realm=\"flotilla\", error=\"invalid_token\"")
        }
        AuthError::Forbidden { scope, .. } => {
            let scope = scope
                .as_deref()
                .filter(|s| {
                    s.bytes()
                        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\' || b == b' ')
                })
                .map(|s| format!(", scope=\"{s}\""))
                .unwrap_or_default();
            HeaderValue::from_str(&format!(
                "Bearer realm=\"flotilla\", error=\"insufficient_scope\"{scope}"
            ))
            .unwrap_or_else(|_| {
                HeaderValue::from_static("Bearer realm=\"flotilla\", error=\"insufficient_scope\"")
            })
        }
    }
}

/// `error: cause: cause`, for logs.
fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_shedding_is_said_once_in_a_while_with_its_count() {
        let log = ShedLog {
            refused: AtomicU64::new(0),
            said_at: Mutex::new(None),
        };
        let start = std::time::Instant::now();
        assert_eq!(log.shed(start), Some(1), "the first is said at once");
        let said: Vec<u64> = (1..=1000)
            .filter_map(|ms| log.shed(start + Duration::from_millis(ms * 19)))
            .collect();
        // 19 s of sheds: one line at 10 s, with all since the first.
        assert_eq!(said, [527]);
        assert_eq!(log.shed(start + Duration::from_secs(21)), Some(474));
    }

    /// A 404's message, put together by hand, is `Display`'s.
    #[test]
    fn a_404_s_message_is_its_display_text() {
        let methods = [
            Method::GET,
            Method::DELETE,
            Method::OPTIONS,
            Method::from_bytes(b"PURGE").unwrap_or(Method::GET),
        ];
        for method in methods {
            for path in ["/", "/a/b", "/x%20y/\"quoted\"", "/.env", ""] {
                let not_found = Rejection::NotFound {
                    method: method.clone(),
                    path: path.into(),
                };
                assert_eq!(not_found.message(), not_found.to_string());
            }
        }
        // Every other rejection's message is its `Display` text.
        assert_eq!(Rejection::BadPath.message(), Rejection::BadPath.to_string());
    }

    #[test]
    fn the_error_body_is_what_serde_json_writes() {
        let strings = [
            "",
            "rate_limited",
            "too many requests; retry later",
            "no route for GET /a\"b\\c",
            "a \"quoted\" name",
            "a back\\slash",
            "tab\there, newline\n, nul\u{0}, escape\u{1b}, del\u{7f}",
            "é, ☃, \u{2028}, 𝄞",
        ];
        for code in strings {
            for message in strings {
                let body = error_body(code, message, "id-1");
                let expected = serde_json::json!({
                    "error": { "code": code, "message": message, "request_id": "id-1" }
                });
                assert_eq!(
                    std::str::from_utf8(&body).unwrap(),
                    expected.to_string(),
                    "{code:?} {message:?}"
                );
            }
        }
    }
    use http_body_util::BodyExt;

    async fn json(res: Response<Body>) -> serde_json::Value {
        let bytes = match res.into_body().collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) => panic!("{e}"),
        };
        match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => panic!("not JSON: {e}"),
        }
    }

    #[tokio::test]
    async fn not_found_is_json_with_code_message_and_request_id() {
        let res = Rejection::NotFound {
            method: Method::GET,
            path: "/x".into(),
        }
        .into_response(None, true);
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            res.headers()[http::header::CONTENT_TYPE],
            "application/json"
        );
        let v = json(res).await;
        assert_eq!(v["error"]["code"], "not_found");
        assert_eq!(v["error"]["message"], "no route for GET /x");
        assert_eq!(v["error"]["request_id"], "");
    }

    #[tokio::test]
    async fn method_not_allowed_sets_allow() {
        let res = Rejection::MethodNotAllowed {
            method: Method::DELETE,
            path: "/a".into(),
            allow: vec!["GET".into(), "HEAD".into()],
        }
        .into_response(None, true);
        assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(res.headers()[ALLOW], "GET, HEAD");
        assert_eq!(json(res).await["error"]["code"], "method_not_allowed");
    }

    #[tokio::test]
    async fn auth_failures_carry_a_challenge_and_no_detail() {
        let res = Rejection::Auth(AuthError::Invalid("bad_signature")).into_response(None, true);
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            res.headers()[WWW_AUTHENTICATE],
            "Bearer realm=\"flotilla\", error=\"invalid_token\""
        );
        let v = json(res).await;
        assert_eq!(v["error"]["code"], "invalid_token");
        assert!(!v.to_string().contains("signature"));
        let res = Rejection::Auth(AuthError::Forbidden {
            reason: "missing_scope",
            scope: Some("orders:write".into()),
        })
        .into_response(None, true);
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            res.headers()[WWW_AUTHENTICATE],
            "Bearer realm=\"flotilla\", error=\"insufficient_scope\", scope=\"orders:write\""
        );
        let res = Rejection::Auth(AuthError::Missing).into_response(None, true);
        assert_eq!(res.headers()[WWW_AUTHENTICATE], "Bearer realm=\"flotilla\"");
    }

    #[test]
    fn chain_includes_sources_but_message_does_not() {
        let e = Rejection::UpstreamUnreachable {
            service: "catalog".into(),
            source: "connection refused".into(),
        };
        assert_eq!(e.to_string(), "cannot connect to `catalog`");
        assert_eq!(chain(&e), "cannot connect to `catalog`: connection refused");
    }
}
