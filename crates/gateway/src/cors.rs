//! CORS, decided at the gateway so that services need not (and cannot get
//! it subtly wrong one by one).
//!
//! - Origins match exactly (scheme, host and port, as the browser sends
//!   them); `*` is allowed only without credentials, and even then the
//!   gateway answers with `*`, never by echoing the origin.
//! - A preflight (`OPTIONS` with `Origin` and
//!   `Access-Control-Request-Method`) on a path with a CORS policy is
//!   answered here and never reaches a service: 204 with the allowed
//!   methods, headers and `Access-Control-Max-Age` when the origin, method
//!   and headers are allowed; otherwise **403** with a JSON body and no CORS
//!   headers (the browser refuses either way; a 403 tells whoever debugs it
//!   that the gateway said no).
//! - Other requests go through whatever their origin; an allowed origin
//!   gets `Access-Control-Allow-Origin` (and `-Credentials`,
//!   `-Expose-Headers`) on the response, a disallowed one gets none. Any
//!   `Access-Control-*` an upstream set is replaced, so the gateway's policy
//!   is the only one. `Vary: Origin` is always added, so caches do not
//!   serve one origin's answer to another.
//! - A WebSocket handshake is the exception: browsers apply no CORS to
//!   WebSockets and send the page's cookies with the handshake, so any site
//!   could open one as the user (cross-site WebSocket hijacking). Under a
//!   CORS policy, a handshake whose `Origin` is not allowed gets 403
//!   `cors_denied`; one without `Origin` (not from a browser) passes.
//!
//! The system's policy applies to every path; a route's own policy replaces
//! it for that route.

use std::collections::HashSet;
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use crate::body::Body;
use crate::relayed::Fields;

/// A CORS policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsConfig {
    /// Exact origins, e.g. `http://localhost:8080`, or the single entry `*`
    /// (only without `credentials`).
    pub origins: Vec<String>,
    /// Send `Access-Control-Allow-Credentials: true` (cookies, HTTP auth).
    pub credentials: bool,
    /// Methods a cross-origin request may use.
    pub methods: Vec<String>,
    /// Request headers a cross-origin request may send.
    pub headers: Vec<String>,
    /// Response headers the page's script may read.
    pub expose_headers: Vec<String>,
    /// How long a browser may cache a preflight answer.
    pub max_age: Duration,
}

impl Default for CorsConfig {
    /// No origins (set them); the usual methods; the headers a Flotilla API
    /// client sends; the gateway's own headers exposed; 10 min preflights.
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        CorsConfig {
            origins: Vec::new(),
            credentials: false,
            methods: s(&["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]),
            headers: s(&[
                "authorization",
                "content-type",
                "idempotency-key",
                "x-request-id",
            ]),
            expose_headers: s(&[
                "x-request-id",
                "ratelimit",
                "ratelimit-policy",
                "retry-after",
            ]),
            max_age: Duration::from_secs(600),
        }
    }
}

/// Why a CORS policy is invalid; the message says how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorsConfigError {
    #[error("CORS needs at least one origin, e.g. origins = [\"http://localhost:8080\"]")]
    NoOrigins,
    #[error("CORS origin `*` cannot be combined with credentials: list the exact origins instead")]
    WildcardWithCredentials,
    #[error("CORS origin `*` must be the only origin")]
    WildcardNotAlone,
    #[error(
        "`{0}` is not an origin: write scheme://host[:port], e.g. \"https://shop.example\", without a path"
    )]
    BadOrigin(String),
    #[error("`{0}` is not an HTTP method")]
    BadMethod(String),
    #[error("`{0}` is not a header name")]
    BadHeader(String),
}

/// A validated, ready-to-use policy.
#[derive(Debug)]
pub(crate) struct CorsPolicy {
    any_origin: bool,
    origins: HashSet<String>,
    credentials: bool,
    methods: Vec<Method>,
    headers: HashSet<HeaderName>,
    allow_methods: HeaderValue,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: HeaderValue,
}

fn valid_origin(o: &str) -> bool {
    let Some((scheme, rest)) = o.split_once("://") else {
        return false;
    };
    let scheme_ok = !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
    scheme_ok
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', '@', ' '])
        && rest == rest.to_ascii_lowercase()
        && rest.parse::<http::uri::Authority>().is_ok()
}

fn join(items: impl Iterator<Item = String>) -> Option<HeaderValue> {
    let joined = items.collect::<Vec<_>>().join(", ");
    if joined.is_empty() {
        return None;
    }
    HeaderValue::from_str(&joined).ok()
}

impl CorsPolicy {
    pub(crate) fn new(config: &CorsConfig) -> Result<CorsPolicy, CorsConfigError> {
        if config.origins.is_empty() {
            return Err(CorsConfigError::NoOrigins);
        }
        let any_origin = config.origins.iter().any(|o| o == "*");
        if any_origin {
            if config.credentials {
                return Err(CorsConfigError::WildcardWithCredentials);
            }
            if config.origins.len() > 1 {
                return Err(CorsConfigError::WildcardNotAlone);
            }
        }
        let mut origins = HashSet::new();
        for o in config.origins.iter().filter(|o| *o != "*") {
            let o = o.trim_end_matches('/');
            if !valid_origin(o) {
                return Err(CorsConfigError::BadOrigin(o.to_string()));
            }
            origins.insert(o.to_string());
        }
        let methods = config
            .methods
            .iter()
            .map(|m| {
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| CorsConfigError::BadMethod(m.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let parse_headers = |list: &[String]| {
            list.iter()
                .map(|h| {
                    HeaderName::from_bytes(h.as_bytes())
                        .map_err(|_| CorsConfigError::BadHeader(h.clone()))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let headers = parse_headers(&config.headers)?;
        let expose = parse_headers(&config.expose_headers)?;
        Ok(CorsPolicy {
            any_origin,
            origins,
            credentials: config.credentials,
            allow_methods: join(methods.iter().map(|m| m.to_string()))
                .unwrap_or_else(|| HeaderValue::from_static("GET")),
            methods,
            allow_headers: join(headers.iter().map(|h| h.to_string())),
            headers: headers.into_iter().collect(),
            expose_headers: join(expose.iter().map(|h| h.to_string())),
            max_age: HeaderValue::from(config.max_age.as_secs()),
        })
    }

    /// Whether a page of `origin` may send its cookies here: the policy
    /// admits it with `credentials` (never with `*`: validated).
    pub(crate) fn admits_credentials(&self, origin: &HeaderValue) -> bool {
        self.credentials && self.origin_allowed(origin)
    }

    fn origin_allowed(&self, origin: &HeaderValue) -> bool {
        self.any_origin || origin.to_str().is_ok_and(|o| self.origins.contains(o))
    }

    fn allow_origin(&self, origin: &HeaderValue) -> HeaderValue {
        if self.any_origin {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        }
    }

    /// The answer to a preflight: `Ok` with the 204's headers, or `Err` for
    /// a refusal (403, no CORS headers).
    pub(crate) fn preflight(&self, req: &Request<Body>) -> Result<Response<Body>, ()> {
        let h = req.headers();
        let origin = h.get(header::ORIGIN).ok_or(())?;
        if !self.origin_allowed(origin) {
            return Err(());
        }
        let method = h
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
            .ok_or(())?;
        if !self.methods.contains(&method) {
            return Err(());
        }
        for requested in h.get_all(header::ACCESS_CONTROL_REQUEST_HEADERS) {
            let list = requested.to_str().map_err(|_| ())?;
            for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| ())?;
                if !self.headers.contains(&name) {
                    return Err(());
                }
            }
        }
        let mut res = Response::new(crate::body::empty());
        *res.status_mut() = StatusCode::NO_CONTENT;
        let out = res.headers_mut();
        out.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            self.allow_origin(origin),
        );
        out.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            self.allow_methods.clone(),
        );
        if let Some(v) = &self.allow_headers {
            out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
        }
        if self.credentials {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        out.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        out.insert(
            header::VARY,
            HeaderValue::from_static(
                "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
            ),
        );
        Ok(res)
    }

    /// Sets the CORS headers of a response to a request from `origin`
    /// (`None`: not a cross-origin request).
    pub(crate) fn decorate(&self, origin: Option<&HeaderValue>, headers: &mut Fields<'_>) {
        strip(headers);
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
        let Some(origin) = origin.filter(|o| self.origin_allowed(o)) else {
            return;
        };
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            self.allow_origin(origin),
        );
        if self.credentials {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(v) = &self.expose_headers {
            headers.insert_ref(&header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
        }
    }
}

impl CorsPolicy {
    /// Whether a WebSocket handshake `req` may go on (see the module doc).
    pub(crate) fn admits_websocket(&self, req: &Request<Body>) -> bool {
        req.headers()
            .get_all(header::ORIGIN)
            .iter()
            .all(|origin| self.origin_allowed(origin))
    }
}

/// Whether `req` is a CORS preflight.
pub(crate) fn is_preflight(req: &Request<Body>) -> bool {
    req.method() == Method::OPTIONS
        && req.headers().contains_key(header::ORIGIN)
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

fn strip(headers: &mut Fields<'_>) {
    for name in [
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        header::ACCESS_CONTROL_ALLOW_METHODS,
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        header::ACCESS_CONTROL_MAX_AGE,
    ] {
        headers.remove(&name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn policy(origins: &[&str], credentials: bool) -> Result<CorsPolicy, CorsConfigError> {
        CorsPolicy::new(&CorsConfig {
            origins: origins.iter().map(|s| s.to_string()).collect(),
            credentials,
            ..CorsConfig::default()
        })
    }

    fn preflight(origin: &str, method: &str, headers: Option<&str>) -> Request<Body> {
        let mut b = Request::builder()
            .method(Method::OPTIONS)
            .uri("/api/x")
            .header("origin", origin)
            .header("access-control-request-method", method);
        if let Some(h) = headers {
            b = b.header("access-control-request-headers", h);
        }
        match b.body(crate::body::empty()) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn config_is_validated() {
        assert!(matches!(
            policy(&[], false),
            Err(CorsConfigError::NoOrigins)
        ));
        assert!(matches!(
            policy(&["*"], true),
            Err(CorsConfigError::WildcardWithCredentials)
        ));
        assert!(matches!(
            policy(&["*", "http://a.example"], false),
            Err(CorsConfigError::WildcardNotAlone)
        ));
        for bad in [
            "a.example",
            "http://a.example/path",
            "http://A.example",
            "http://",
        ] {
            assert!(
                matches!(policy(&[bad], false), Err(CorsConfigError::BadOrigin(_))),
                "{bad}"
            );
        }
        assert!(policy(&["http://localhost:8080", "https://shop.example/"], true).is_ok());
    }

    #[test]
    fn preflight_allowed_and_denied() {
        let Ok(p) = policy(&["http://localhost:8080"], true) else {
            panic!("valid policy");
        };
        let res = match p.preflight(&preflight(
            "http://localhost:8080",
            "POST",
            Some("Content-Type, Authorization"),
        )) {
            Ok(r) => r,
            Err(()) => panic!("refused"),
        };
        assert_eq!(res.status(), StatusCode::NO_CONTENT);
        let h = res.headers();
        assert_eq!(h["access-control-allow-origin"], "http://localhost:8080");
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert_eq!(h["access-control-max-age"], "600");
        assert!(h["vary"].to_str().is_ok_and(|v| v.contains("Origin")));
        assert!(
            p.preflight(&preflight("http://localhost:8081", "GET", None))
                .is_err()
        );
        assert!(
            p.preflight(&preflight("http://localhost:8080", "TRACE", None))
                .is_err()
        );
        assert!(
            p.preflight(&preflight("http://localhost:8080", "GET", Some("x-secret")))
                .is_err()
        );
    }

    #[test]
    fn wildcard_answers_star_and_never_credentials() {
        let Ok(p) = policy(&["*"], false) else {
            panic!("valid policy");
        };
        let mut h = HeaderMap::new();
        h.insert(
            "access-control-allow-origin",
            HeaderValue::from_static("http://evil"),
        );
        h.insert(
            "access-control-allow-credentials",
            HeaderValue::from_static("true"),
        );
        p.decorate(
            Some(&HeaderValue::from_static("http://any.example")),
            &mut (&mut h).into(),
        );
        assert_eq!(h["access-control-allow-origin"], "*");
        assert!(h.get("access-control-allow-credentials").is_none());
        assert_eq!(h["vary"], "Origin");
    }

    #[test]
    fn disallowed_origin_gets_no_cors_headers() {
        let Ok(p) = policy(&["https://shop.example"], true) else {
            panic!("valid policy");
        };
        let mut h = HeaderMap::new();
        p.decorate(
            Some(&HeaderValue::from_static("https://evil.example")),
            &mut (&mut h).into(),
        );
        assert!(h.get("access-control-allow-origin").is_none());
        assert!(h.get("access-control-allow-credentials").is_none());
        assert_eq!(h["vary"], "Origin");
        let mut h = HeaderMap::new();
        p.decorate(
            Some(&HeaderValue::from_static("https://shop.example")),
            &mut (&mut h).into(),
        );
        assert_eq!(h["access-control-allow-origin"], "https://shop.example");
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert!(
            h["access-control-expose-headers"]
                .to_str()
                .is_ok_and(|v| v.contains("ratelimit"))
        );
    }
}
