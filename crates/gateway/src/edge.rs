//! The edge policy and routing layer: everything between "a request
//! arrived" and "forward it to the service", in the order DESIGN.md gives:
//!
//! 1. take one snapshot of the configuration for the whole request;
//! 2. strip every `x-flotilla-user-*` and `x-forwarded-client-cert` the
//!    client sent (only the gateway may say who the user is — on public
//!    routes too), and set the latter from the client certificate the TLS
//!    handshake verified, if any;
//! 3. find the client address (through trusted proxies only) and apply the
//!    system's IP lists → 403 `ip_denied`;
//! 4. CORS: answer preflights here (→ 204 or 403 `cors_denied`);
//! 5. route match → 404 / 405 / static files;
//! 6. the route's IP lists → 403;
//! 7. a client certificate (`client_cert`) → 403; JWT (`auth = jwt`) → 401
//!    / 403, then the identity headers;
//! 8. rate limit → 429;
//! 9. body size → 413 (declared length now, streamed length as it flows);
//! 10. the route's `cache`: a kept response answers here (`cache`);
//! 11. the `request_headers` changes (`header_changes`);
//!
//! then the proxy. On the way out every response, including the gateway's
//! own refusals, gets the CORS headers (so a browser can read a 401 or 429),
//! on a limited route the `RateLimit` headers, and the `response_headers`
//! changes.
//!
//! The steps share the snapshot and the matched route, so they live in one
//! async function, [`handle`], called by the front of the request path
//! (`server`); each concern's logic is in its own module (`ip`, `cors`,
//! `jwt`, `ratelimit`).

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use futures_util::future::FutureExt;
use http::header::{CONNECTION, HOST, ORIGIN, SET_COOKIE};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::Limited;
use tower::ServiceExt;

/// The gateway's fields in their CGI spelling are the mesh's concern too.
pub(crate) use flotilla_mesh::user::spells_with_underscores;

use crate::affinity;
use crate::apikey::KeyError;
use crate::authz;
use crate::body::{self, Body};
use crate::cache::{Collapsed, Miss, Verdict};
use crate::client_cert::{ClientCert, XFCC};
use crate::clock;
use crate::compress;
use crate::cors::{self, CorsPolicy};
use crate::headers::Told;
use crate::ip;
use crate::jwt::{self, Identity, RouteAuth, USER_HEADER_PREFIX};
use crate::mirror;
use crate::proxy::{Proxy, Upstream};
use crate::ratelimit::{self, Counted, Limiter, RateLimitKey};
use crate::rejection::Rejection;
use crate::relayed::Reply;
use crate::request_id::RequestId;
use crate::routes::{self, Match, Outgoing, Route, routed_path, split_after_segments};
use crate::routing::Routing;
use crate::server::ConnInfo;
use crate::trace;
use crate::upgrade::{self, Handoff, Slot, Tunnels, WebSocket};

/// Who sent a request: the client address after trusted proxies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientAddr {
    pub ip: IpAddr,
    /// When the direct peer is a trusted proxy, the header it writes (whose
    /// forwarding chain may be passed on).
    pub trusted_proxy: Option<ip::ForwardedHeader>,
    /// The scheme the client used: the connection's, or the one a trusted
    /// proxy says its client used (`X-Forwarded-Proto`, or `Forwarded`), so
    /// that a gateway behind a TLS-terminating load balancer tells its
    /// instances `https` and marks its cookies `Secure`.
    pub proto: &'static str,
    /// On a route with `affinity`, the hash of what keeps this client on
    /// one instance, once the route's policies have found it; `None`:
    /// balanced freely.
    pub affinity: Option<u64>,
    /// The trace the request is sent in when it brings none to keep: one
    /// for all its attempts and mirrored copies.
    pub trace: trace::Started,
}

/// How a request was served, for the access log: the route it matched and
/// the instance that answered. The instance is kept until the response
/// body is done, since it counts the request on that instance. It is the
/// access-log entry's own (`access_log::Entry::serving`), written as each
/// is found: a request dropped before its response (its client left) is
/// logged and counted with what was found by then.
#[derive(Default)]
pub(crate) struct Served {
    pub route: Option<Arc<Route>>,
    /// The service of a sticky split (`Match::Sticky`) that took it, once
    /// the client's key chose it: counted and logged instead of `route`.
    pub split: Option<Arc<Route>>,
    pub upstream: Option<Upstream>,
    /// What the route's cache made of it, as its metric counts it.
    pub cache: Option<&'static str>,
    /// The client address, once the edge has found it through trusted
    /// proxies (else the log keeps the connection's peer).
    pub client: Option<IpAddr>,
    /// The trace started for it, sent to the instance in place of a
    /// `traceparent` the request did not bring (or brought malformed).
    pub trace: Option<trace::Started>,
    /// Whether a line will be written (`access_log::Entry::logs`): only
    /// then is `user` worth a clone.
    pub logged: bool,
    /// The verified caller's `x-flotilla-user-id`, when a line is written.
    pub user: Option<HeaderValue>,
}

/// The name a request asked for, without the port: the URI's authority
/// (HTTP/2's `:authority`, or an absolute-form request line) before `Host`,
/// as RFC 9112 section 3.2.2 has it.
fn request_host(req: &Request<Body>) -> Option<&str> {
    match req.uri().authority() {
        Some(authority) => Some(authority.host()),
        None => {
            let host = req.headers().get(HOST)?.to_str().ok()?;
            Some(flotilla_manifest::host_name(host))
        }
    }
}

/// Whether the request's host could be read as two names: userinfo
/// (`admin@public.example`) in its target or its `Host` (RFC 9110 §4.2.4
/// forbids it in an `http` URI, and readers disagree on which name such a
/// host is: the gateway routes by what follows the `@`, a service may take
/// what precedes it), or two `Host` fields (the gateway routes by the
/// first; the instance, sent both when the request has no `:authority`,
/// may read the last). An HTTP/1 request's `Host` was checked for both as
/// its head was read (`h1::head`), which spares every request the lookups
/// here.
fn host_is_ambiguous(req: &Request<Body>) -> bool {
    req.uri()
        .authority()
        .is_some_and(|a| a.as_str().contains('@'))
        || (req.version() == http::Version::HTTP_2 && {
            let mut hosts = req.headers().get_all(HOST).iter();
            hosts
                .next()
                .is_some_and(|h| crate::headers::has_byte(h.as_bytes(), b'@'))
                || hosts.next().is_some()
        })
}

/// Why an HTTP/2 request's host is refused, if it is: it names none,
/// neither `:authority` nor `Host` (malformed for an `http` or `https`
/// URI, RFC 9113 §8.3.1; h2 drops the `:scheme` of a request without
/// `:authority`, so none is told apart, and the gateway serves no other
/// scheme), or it names one with what is no host
/// (`headers::is_valid_host`): `a/b?c`, `good, evil`. hyper checks an
/// `:authority` against the URI's characters only, which let a `,`
/// through, and a `Host` field not at all. An HTTP/1 request's were
/// checked as its head was read (`h1::head`), which spares it the lookup
/// here.
fn http2_host_refusal(req: &Request<Body>) -> Option<Rejection> {
    if req.version() != http::Version::HTTP_2 {
        return None;
    }
    let authority = req.uri().authority();
    let host = req.headers().get(HOST);
    if authority.is_none() && host.is_none() {
        return Some(Rejection::MissingHost);
    }
    let invalid = authority.is_some_and(|a| !crate::headers::is_valid_host(a.as_str().as_bytes()))
        || host.is_some_and(|h| !crate::headers::is_valid_host(h.as_bytes()));
    invalid.then_some(Rejection::InvalidHost)
}

/// Tells an instance what a route's `strip_prefix` took off the path.
static X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");

/// Takes the first `segments` segments off the request's path, keeping the
/// query, and names what was taken in `X-Forwarded-Prefix`, so an instance
/// can build links that work through the gateway (as Spring's and
/// ASP.NET's forwarded-headers support read it).
fn strip_prefix(req: &mut Request<Body>, segments: usize) -> Result<(), Rejection> {
    let uri = req.uri();
    let (prefix, rest) = split_after_segments(uri.path(), segments);
    let rest = if rest.is_empty() { "/" } else { rest };
    // Both come from a valid URI's path: neither can fail.
    let prefix = HeaderValue::from_str(prefix).map_err(|_| Rejection::BadPath)?;
    *req.uri_mut() = with_path(uri, rest)?;
    req.headers_mut().insert(X_FORWARDED_PREFIX.clone(), prefix);
    Ok(())
}

/// `uri` with its path replaced by `path` (a valid URI's path, or one made
/// from one), its query kept.
fn with_path(uri: &Uri, path: &str) -> Result<Uri, Rejection> {
    let target = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(target).map_err(|_| Rejection::BadPath)?);
    Uri::from_parts(parts).map_err(|_| Rejection::BadPath)
}

/// Removes every `x-flotilla-user-*`, `x-forwarded-client-cert` and
/// `x-forwarded-prefix` header: only the gateway may say who the user is,
/// which certificate the client showed, and what it took off the path.
/// Also any name that is one of those, or of the forwarding fields the
/// gateway writes, with `_` for `-` (`x_flotilla_user_id`): servers that
/// hand a request's fields over CGI-style (WSGI, Rack, PHP) read both
/// spellings as one variable, so such a field would speak for the
/// gateway there. nginx drops every name with an underscore by default;
/// these alone are dropped here. And the fields the client's `Connection`
/// names, now rather than at forwarding, where the gateway's own would go
/// with them.
fn strip_identity_headers(headers: &mut HeaderMap) {
    // Every name looked for starts with `x` (a `HeaderName` is lower
    // case): most fields are told apart by their first byte.
    let forged = |k: &&HeaderName| {
        let name = k.as_str();
        name.as_bytes().first() == Some(&b'x')
            && (name.starts_with(USER_HEADER_PREFIX)
                || **k == XFCC
                || **k == X_FORWARDED_PREFIX
                || (name.as_bytes().contains(&b'_') && spells_gateway_field(name)))
    };
    // Almost every request has none: look before making a list. The same
    // look finds a `Connection` (`c`), whose named fields go too, before
    // the gateway adds its own (`headers::take_connection_named`).
    let mut connection = false;
    let any_forged = headers.keys().any(|k| {
        connection |= k.as_str().as_bytes().first() == Some(&b'c') && *k == CONNECTION;
        forged(&k)
    });
    if any_forged {
        // The look stopped at the first: it may not have reached one.
        connection = headers.contains_key(CONNECTION);
        let forged: Vec<HeaderName> = headers.keys().filter(forged).cloned().collect();
        for name in forged {
            headers.remove(name);
        }
    }
    if connection {
        crate::headers::take_connection_named(headers);
    }
}

/// Whether a request path names a dot-file or something under a
/// dot-directory (`/.git/config`, `/.env`, `/%2Eflotilla/ca/…`, as the
/// files see it, decoded), which `static` never serves, as nginx setups
/// deny `/\.`: a directory of files to serve may also hold a checkout's
/// `.git`, a tool's state or a system's data directory (`.flotilla`, its
/// CA keys and control token, when `static` is the manifest's own
/// directory). `/.well-known/` is served: it is meant to be public
/// (`security.txt`, ACME challenges).
fn hidden(path: &str) -> bool {
    let path = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    path.split(['/', '\\'])
        .any(|segment| segment.starts_with('.') && segment != ".well-known")
}

/// Whether `name`, read with `_` as `-`, is a field only the gateway
/// writes: a user field, the client certificate, the prefix taken off, the
/// forwarding fields or the request id.
fn spells_gateway_field(name: &str) -> bool {
    const FIELDS: [&str; 6] = [
        "x-forwarded-client-cert",
        "x-forwarded-prefix",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
    ];
    let name = name.as_bytes();
    let prefix = USER_HEADER_PREFIX.as_bytes();
    name.get(..prefix.len())
        .is_some_and(|p| spells_with_underscores(p, prefix))
        || FIELDS
            .iter()
            .any(|f| spells_with_underscores(name, f.as_bytes()))
}

/// What every response of this request gets on its way out. Borrows what
/// it can: the route (its limiter, its `Outgoing`), the configuration
/// snapshot and the request id outlive the request's handling, and a
/// shared `Arc` cloned per request is a cache line that bounces between
/// cores.
struct Finish<'a> {
    request_id: &'a RequestId,
    origin: Option<HeaderValue>,
    /// The system's until a route matched, then the route's.
    out: &'a Outgoing,
    limit: Option<(&'a Limiter, Counted)>,
    /// Whether the client takes gzip (read only when compression is on).
    gzip: bool,
    /// Whether the access log writes a line for the request.
    logged: bool,
}

impl Finish<'_> {
    fn reject(&self, rejection: Rejection) -> Reply {
        let mut reply = rejection.into_reply(Some(self.request_id), self.logged);
        self.done(&mut reply);
        reply
    }

    /// In place: a reply is a few hundred bytes, copied whole by each move.
    fn done(&self, reply: &mut Reply) {
        if let Some(compression) = &self.out.compression {
            compression.apply(reply, self.gzip);
        }
        let mut fields = reply.fields();
        if let Some(cors) = &self.out.cors {
            cors.decorate(self.origin.as_ref(), &mut fields);
        }
        if let Some((limiter, counted)) = &self.limit {
            limiter.headers(counted, &mut fields);
        }
        if let Some(changes) = &self.out.headers {
            changes.apply_to_response(&mut fields);
        }
    }
}

/// Steps 1–9 for `req` (taken from `routing`, the configuration in force
/// when it arrived), then the proxy. What `served` the request goes to the
/// access log.
///
/// An `async` block, not an `async fn`, for the reason `server`'s `serve`
/// gives: the request is held and copied once, not twice.
#[expect(clippy::manual_async_fn, reason = "an async fn copies its arguments")]
pub(crate) fn handle<'a>(
    routing: Arc<Routing>,
    proxy: &'a Proxy,
    tunnels: &'a Arc<Tunnels>,
    mut req: Request<Body>,
    conn: ConnInfo,
    request_id: &'a RequestId,
    served: &'a mut Served,
) -> impl Future<Output = Reply> + Send + 'a {
    async move {
        let Served {
            route: matched,
            split: chosen,
            upstream,
            cache: cache_result,
            client: client_seen,
            trace: trace_started,
            logged,
            user,
        } = served;
        let mut finish = Finish {
            request_id,
            // Read only for a CORS policy to answer (a hashed lookup, ~100
            // instructions, that misses for most requests anyway).
            origin: if routing.cors {
                req.headers().get(ORIGIN).cloned()
            } else {
                None
            },
            out: &routing.outgoing,
            limit: None,
            gzip: routing.compression
                && req.method() != Method::HEAD
                && compress::accepts_gzip(req.headers()),
            logged: *logged,
        };
        strip_identity_headers(req.headers_mut());
        let has_cert = match req.extensions_mut().remove::<Arc<ClientCert>>() {
            Some(cert) => {
                req.headers_mut().insert(XFCC.clone(), cert.xfcc.clone());
                true
            }
            None => false,
        };

        let mut client = {
            let peer = conn.peer.ip();
            let (trusted, header) = routing
                .ip
                .as_ref()
                .map(|i| (i.trusted_proxies.as_slice(), i.forwarded_header))
                .unwrap_or_default();
            let trusted_proxy = ip::is_trusted(peer, trusted).then_some(header);
            ClientAddr {
                ip: ip::client_addr(peer, req.headers(), trusted, header),
                trusted_proxy,
                proto: trusted_proxy
                    .and_then(|header| ip::forwarded_proto(req.headers(), header))
                    .unwrap_or(conn.scheme),
                affinity: None,
                trace: trace::Started::new(),
            }
        };
        *client_seen = Some(client.ip);
        *trace_started = Some(client.trace);
        if let Some(rules) = &routing.ip_rules
            && !rules.admits(client.ip)
        {
            routing.stats.unmatched().ip_denied();
            return finish.reject(Rejection::IpDenied);
        }

        // A clone shares the URI's bytes; the path is copied only into a
        // rejection.
        let mut uri = req.uri().clone();
        if host_is_ambiguous(&req) {
            return finish.reject(Rejection::BadHost);
        }
        if let Some(refused) = http2_host_refusal(&req) {
            return finish.reject(refused);
        }
        // An HTTP/2 CONNECT (HTTP/1's never gets here, refused with its
        // head): its target is a host to tunnel to, not a path, and hyper
        // would make the stream a tunnel on a 2xx from an instance that
        // was sent an ordinary request. Extended CONNECT (`:protocol`,
        // RFC 8441) is not enabled on the HTTP/2 server, which refuses it
        // before it is a request.
        if req.method() == Method::CONNECT {
            return finish.reject(Rejection::Connect);
        }
        match routed_path(uri.path()) {
            Ok(None) => {}
            Ok(Some(path)) => match with_path(&uri, &path) {
                Ok(routed) => {
                    *req.uri_mut() = routed.clone();
                    uri = routed;
                }
                Err(rejection) => return finish.reject(rejection),
            },
            Err(()) => return finish.reject(Rejection::BadPath),
        }
        let path = uri.path();

        // In a block: what only the lookup needs (the host, the method a
        // preflight asks about) ends here, and is not kept in this future
        // across the awaits below.
        let found = {
            let preflight = cors::is_preflight(&req);
            let lookup_method = if preflight {
                req.headers()
                    .get(http::header::ACCESS_CONTROL_REQUEST_METHOD)
                    .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
                    .unwrap_or(Method::OPTIONS)
            } else {
                req.method().clone()
            };
            let host = if routing.table.by_host() {
                request_host(&req)
            } else {
                None
            };
            let found = routing
                .table
                .find(host, &lookup_method, path, req.headers());
            let cors = match &found {
                Match::Route(route) | Match::Sticky(route, _) => {
                    route.policy.outgoing.cors.as_deref()
                }
                _ => routing.outgoing.cors.as_deref(),
            };
            if preflight && let Some(cors) = cors {
                // A preflight is answered here whatever the route: it never
                // costs a service anything. The answer carries its own CORS
                // headers.
                return match cors.preflight(&req) {
                    Ok(res) => res.into(),
                    Err(()) => {
                        let mut reply = Rejection::CorsDenied.into_reply(Some(request_id), *logged);
                        reply
                            .fields()
                            .insert(http::header::VARY, HeaderValue::from_static("Origin"));
                        reply
                    }
                };
            }
            if preflight {
                // No CORS policy here: an ordinary OPTIONS request.
                routing.table.find(host, req.method(), path, req.headers())
            } else {
                found
            }
        };

        let (route, split) = match found {
            Match::Route(route) => (route, None),
            Match::Sticky(route, services) => (route, Some(services)),
            Match::MethodNotAllowed(allow) => {
                return finish.reject(Rejection::MethodNotAllowed {
                    method: req.method().clone(),
                    path: path.to_string(),
                    allow,
                });
            }
            Match::NotFound => {
                let not_found = Rejection::NotFound {
                    method: req.method().clone(),
                    path: path.to_string(),
                };
                let is_read = req.method() == Method::GET || req.method() == Method::HEAD;
                return match routing.static_files.clone() {
                    Some(files) if is_read && !hidden(req.uri().path()) => {
                        let res = match files.oneshot(req).boxed().await {
                            Ok(res) => res,
                            Err(never) => match never {},
                        };
                        // A missing file gets the same JSON 404 as a missing route.
                        if res.status() == StatusCode::NOT_FOUND {
                            return finish.reject(not_found);
                        }
                        let mut reply = res.map(body::boxed).into();
                        finish.done(&mut reply);
                        reply
                    }
                    _ => finish.reject(not_found),
                };
            }
        };
        // The `Arc` for a WebSocket's metrics; `&Route` everywhere else.
        let route: &Arc<Route> = matched.insert(route);
        finish.out = &route.policy.outgoing;
        let tunnel = if req.extensions().get::<WebSocket>().is_some() {
            match admit_websocket(&mut req, finish.out.cors.as_deref(), tunnels, route) {
                Ok(slot) => Some(slot),
                Err(rejection) => return finish.reject(rejection),
            }
        } else {
            None
        };
        let logged_user = logged.then_some(user);
        let identity = match police(
            &routing,
            route,
            client,
            has_cert,
            &mut req,
            &mut finish,
            logged_user,
        )
        .await
        {
            Ok(identity) => identity,
            Err(rejection) => return finish.reject(rejection),
        };
        // After every policy of the gateway's own, so that the check is
        // asked only about requests those let through; before affinity,
        // which may key on a field the check set. Boxed (by `check`): most
        // routes ask nothing. The id always: the check has none of the
        // request's fields but those it reads.
        if let Some(check) = &route.policy.authz {
            let asked = authz::check(
                proxy,
                check,
                &mut req,
                conn,
                client,
                Told {
                    request_id: Some(request_id.header().clone()),
                    identity: identity.clone(),
                },
            );
            if let Err(rejection) = asked.await {
                return finish.reject(rejection);
            }
        }
        // A cookie the gateway made up to keep this client on its instance.
        let mut set_cookie = None;
        if let Some(affinity) = &route.policy.affinity {
            let sticky = affinity::sticky(
                affinity,
                client.ip,
                identity.as_deref(),
                req.headers(),
                client.proto == "https",
            );
            client.affinity = sticky.hash;
            set_cookie = sticky.set_cookie;
        }
        // What the instance is told besides the request's fields: the id
        // made here, the caller verified (unless `police` put it among the
        // fields, for the cache).
        let told = Told {
            request_id: request_id.unsent(),
            identity: identity.filter(|_| route.policy.cache.is_none()),
        };
        // A sticky split's service, by the client's key: every route of a
        // split has the one policy just applied, and differs only in where
        // it sends the request.
        let route: &Arc<Route> = match split {
            Some(services) => chosen.insert(routes::choose(route, &services, client.affinity)),
            None => route,
        };
        // After every policy, so that a kept response never lets a request
        // past one; before the request's own changes, which are the same
        // for every request of the route. Boxed: most routes keep nothing,
        // and every request's future would otherwise hold room for it.
        let mut miss: Option<Box<Miss>> = None;
        if let Some(cache) = &route.policy.cache
            && tunnel.is_none()
        {
            let mut verdict = look_up(cache, &mut req, finish.gzip, None, cache_result);
            if let Verdict::Wait(waiting) = verdict {
                // Boxed, as the mirror's: only a collapsed request waits.
                let collapsed = Box::pin(waiting.done(route.timeout)).await;
                verdict = look_up(cache, &mut req, finish.gzip, Some(collapsed), cache_result);
            }
            match verdict {
                Verdict::Hit(mut reply) => {
                    finish.done(&mut reply);
                    return reply;
                }
                Verdict::Revalidate(mut reply, refresh) => {
                    // The request itself goes on, in the background, to
                    // fetch what the client was given stale.
                    if let Some(mut refresh) = refresh
                        && prepare(route, &mut req).is_ok()
                    {
                        refresh.ask_if_changed(&mut req);
                        revalidate(
                            proxy.detached(),
                            req,
                            conn,
                            Arc::clone(route),
                            (client, told.clone()),
                            refresh,
                        );
                    }
                    finish.done(&mut reply);
                    return reply;
                }
                Verdict::Forward(m) => miss = Some(Box::new(m)),
                Verdict::NotCached => return finish.reject(Rejection::NotCached),
                // Unreachable: a collapsed request never waits again.
                Verdict::Wait(_) => {}
            }
        }
        // Past the cache, which answers without the service.
        let mut place = match &route.policy.bulkhead {
            None => None,
            Some(bulkhead) => match bulkhead.enter() {
                Some(place) => Some(place),
                None => return overloaded(&finish, miss, route),
            },
        };
        if let Err(rejection) = prepare(route, &mut req) {
            return finish.reject(rejection);
        }
        if let Some(miss) = &mut miss {
            miss.ask_if_changed(&mut req);
        }
        // A WebSocket is a conversation with one instance: never copied.
        // Boxed: the rare path would otherwise make every request's
        // future, and each move of it, that much larger.
        if !route.mirrors.is_empty()
            && tunnel.is_none()
            && let Err(rejection) =
                Box::pin(mirror::send(proxy, &mut req, conn, route, client, &told)).await
        {
            return failed(&finish, miss, route, rejection);
        }
        // Kept for a second fetch, which only a cache asks for.
        let told_again = route.policy.cache.as_ref().map(|_| told.clone());
        // An unsafe request by a route that keeps nothing, to a target
        // another route keeps (a `POST` route beside a cached `GET` one):
        // what that route keeps of it goes once this succeeds.
        let kept_elsewhere = if route.policy.cache.is_none()
            && routing.cache().is_some()
            && !matches!(
                *req.method(),
                Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
            ) {
            kept_by_another_route(&routing.table, &req, &uri)
        } else {
            None
        };
        match proxy.forward(req, conn, route, client, told).await {
            Ok((mut reply, answered)) => {
                if let Some(kept) = kept_elsewhere
                    && let (keeper, key) = &*kept
                    && let Some(cache) = &keeper.policy.cache
                {
                    let status = reply.res.status();
                    if status.is_success() || status.is_redirection() {
                        cache.store.invalidate(key);
                    }
                }
                if let Some(mut slot) = tunnel {
                    // An open tunnel is a request in flight until it closes.
                    if reply.res.status() == StatusCode::SWITCHING_PROTOCOLS {
                        slot.in_flight = place.take();
                    }
                    Handoff::hold(&reply.res, slot);
                }
                *upstream = Some(answered);
                // Boxed, as the mirror's: only a revalidation that the
                // instance answered about another response fetches again.
                // Made in a closure, so that neither the miss nor the
                // request takes room in this future.
                let again = match (miss, &route.policy.cache, told_again) {
                    (Some(miss), Some(cache), Some(told)) => miss
                        .keep(cache, &mut reply, clock::now())
                        .map(|(miss, again)| {
                            Box::pin(fetch_again(proxy, again, conn, route, (client, told), miss))
                        }),
                    _ => None,
                };
                if let Some(fetched) = again {
                    match fetched.await {
                        Ok((fetched, answered)) => {
                            reply = fetched;
                            *upstream = Some(answered);
                        }
                        Err(rejection) => return finish.reject(rejection),
                    }
                }
                if let Some(cookie) = set_cookie {
                    reply.fields().append(SET_COOKIE, cookie);
                }
                if let Some(place) = place {
                    // In flight until the client has the whole response.
                    let body = std::mem::replace(reply.res.body_mut(), body::empty());
                    *reply.res.body_mut() = body::boxed(body::Holding::new(body, place));
                }
                finish.done(&mut reply);
                reply
            }
            Err(rejection) => failed(&finish, miss, route, rejection),
        }
    }
}

/// The answer to a request whose fetch failed with `rejection`: a kept
/// response past its freshness if one may stand in (`stale-if-error`),
/// else the rejection.
#[cold]
fn failed(
    finish: &Finish<'_>,
    miss: Option<Box<Miss>>,
    route: &Route,
    rejection: Rejection,
) -> Reply {
    if let Some(mut miss) = miss
        && let Some(mut reply) = miss.stand_in(rejection.status(), clock::now())
    {
        tracing::warn!(target: "flotilla::gateway", route = route.label(), error = %rejection, "the fetch failed; a kept response past its freshness stands in (stale-if-error)");
        finish.done(&mut reply);
        return reply;
    }
    finish.reject(rejection)
}

/// The answer to a request its route's bulkhead refused: 503, or a kept
/// response standing in for it, as for any failed fetch.
#[cold]
#[inline(never)]
fn overloaded(finish: &Finish<'_>, miss: Option<Box<Miss>>, route: &Route) -> Reply {
    let rejection = Rejection::RouteOverloaded {
        service: route.service.clone(),
    };
    failed(finish, miss, route, rejection)
}

/// Step 11 and the prefix: `req` as the instance is to get it. Inlined:
/// every request takes it, and a call cost it about 50 instructions
/// (`instructions.sh`).
#[inline(always)]
fn prepare(route: &Route, req: &mut Request<Body>) -> Result<(), Rejection> {
    if let Some(changes) = &route.policy.request_headers {
        changes.apply_to_request(req.headers_mut());
    }
    if route.strip_segments > 0 {
        strip_prefix(req, route.strip_segments)?;
    }
    Ok(())
}

/// Forwards `req` again, without the kept response's validators: the
/// instance answered them with a `304` about another response
/// ([`Miss::keep`]). What it answers now is kept as any miss's would be.
#[cold]
#[inline(never)]
async fn fetch_again(
    proxy: &Proxy,
    req: Request<Body>,
    conn: ConnInfo,
    route: &Route,
    (client, told): (ClientAddr, Told),
    miss: Miss,
) -> Result<(Reply, Upstream), Rejection> {
    let (mut reply, answered) = proxy.forward(req, conn, route, client, told).await?;
    if let Some(cache) = &route.policy.cache {
        // No longer asking with validators: never sent a third time.
        let _ = miss.keep(cache, &mut reply, clock::now());
    }
    Ok((reply, answered))
}

/// Forwards `req`, whose client was answered with a stale response, from
/// a task of its own, and keeps what the instance answers
/// (`stale-while-revalidate`). If the fetch fails, the stale response
/// stays (unless a 304 about another response disowned it), and the
/// claim goes with the task, so that the next request tries again.
#[cold]
#[inline(never)]
fn revalidate(
    proxy: Proxy,
    req: Request<Body>,
    conn: ConnInfo,
    route: Arc<Route>,
    (client, told): (ClientAddr, Told),
    refresh: Miss,
) {
    tokio::spawn(async move {
        let Some(cache) = &route.policy.cache else {
            return;
        };
        let fetched = match proxy.forward(req, conn, &route, client, told.clone()).await {
            Ok((mut reply, answered)) => match refresh.keep(cache, &mut reply, clock::now()) {
                None => Ok((reply, answered)),
                // A 304 about another response: fetched whole now.
                Some((miss, again)) => {
                    fetch_again(&proxy, again, conn, &route, (client, told), miss).await
                }
            },
            Err(rejection) => Err(rejection),
        };
        match fetched {
            Ok((reply, _answered)) => {
                // The response is kept as its body ends: read it to there,
                // no longer than the route may take.
                let body = http_body_util::BodyExt::collect(reply.res.into_body());
                let _ = tokio::time::timeout(route.timeout, body).await;
            }
            Err(rejection) => {
                tracing::debug!(target: "flotilla::gateway", route = route.label(), error = %rejection, "a background fetch of a stale response failed");
            }
        }
    });
}

/// The route that keeps responses to a `GET` of `req`'s target, and the
/// key it keeps them under, if one does. `uri` is the target as routed
/// (its path normalised), before the route's own changes to it.
#[cold]
#[inline(never)]
fn kept_by_another_route(
    table: &crate::routes::RouteTable,
    req: &Request<Body>,
    uri: &Uri,
) -> Option<Box<(Arc<Route>, Box<str>)>> {
    let host = if table.by_host() {
        request_host(req)
    } else {
        None
    };
    let route = match table.find(host, &Method::GET, uri.path(), req.headers()) {
        Match::Route(route) | Match::Sticky(route, _) => route,
        _ => return None,
    };
    let cache = route.policy.cache.as_ref()?;
    let host = if cache.by_host {
        request_host(req)
    } else {
        None
    };
    let target = uri
        .path_and_query()
        .map_or(uri.path(), PathAndQuery::as_str);
    let key = cache.key_of_target(host, target);
    // Boxed: held across the forward in every request's future, where
    // most requests have none.
    Some(Box::new((route, key)))
}

/// The cache's verdict on `req`, counted by route (once: a request that
/// waited for another's fetch was counted as it began to wait). A GET or
/// HEAD goes on with only the query parameters the route's cache keys by.
#[cold]
#[inline(never)]
fn look_up(
    cache: &crate::cache::RouteCache,
    req: &mut Request<Body>,
    gzip: bool,
    collapsed: Option<Collapsed>,
    counted: &mut Option<&'static str>,
) -> Verdict {
    let path = req
        .uri()
        .path_and_query()
        .map_or(req.uri().path(), PathAndQuery::as_str);
    let mut kept = cache.kept_query(path);
    if let Some(target) = &kept
        && matches!(*req.method(), Method::GET | Method::HEAD)
    {
        // A part of a valid target: cannot fail, but if it did, the
        // request would be keyed as it goes, whole.
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = PathAndQuery::try_from(target.as_str()).ok();
        match Uri::from_parts(parts) {
            Ok(uri) if uri.path_and_query().is_some() => *req.uri_mut() = uri,
            _ => kept = None,
        }
    }
    let req = &*req;
    let host = if cache.by_host {
        request_host(req)
    } else {
        None
    };
    let path = match &kept {
        Some(kept) => kept.as_str(),
        None => req
            .uri()
            .path_and_query()
            .map_or(req.uri().path(), PathAndQuery::as_str),
    };
    let first = collapsed.is_none();
    let verdict = cache.lookup(req, (host, path), gzip, clock::now(), collapsed);
    let result = match &verdict {
        Verdict::Hit(_) => first.then_some("hit"),
        Verdict::Revalidate(..) => first.then_some("stale"),
        Verdict::Forward(miss) => miss.result(),
        Verdict::Wait(_) => Some("collapsed"),
        Verdict::NotCached => first.then_some("miss"),
    };
    if let Some(result) = result {
        cache.stats.lookup(result);
        *counted = Some(result);
    }
    verdict
}

/// A WebSocket handshake's place among the open tunnels, if its origin may
/// open one under the CORS policy (see `cors`) and the gateway has room;
/// a token it offered as a subprotocol becomes its bearer token, for the
/// JWT step (`upgrade::token_from_subprotocol`).
#[cold]
fn admit_websocket(
    req: &mut Request<Body>,
    cors: Option<&CorsPolicy>,
    tunnels: &Arc<Tunnels>,
    route: &Arc<Route>,
) -> Result<Slot, Rejection> {
    if cors.is_some_and(|cors| !cors.admits_websocket(req)) {
        return Err(Rejection::CorsDenied);
    }
    let slot = tunnels.reserve(route).ok_or(Rejection::TooManyTunnels)?;
    upgrade::token_from_subprotocol(req.headers_mut());
    Ok(slot)
}

/// Steps 6–9 for a matched route; on success `req` is ready to forward,
/// and the caller's verified identity, if it has one, is returned. When
/// the access log wants it (`user`), the caller's id is put there as soon
/// as it is verified: a request refused after that (rate limit, body
/// size) is logged with its caller.
async fn police<'a>(
    routing: &Routing,
    route: &'a Route,
    client: ClientAddr,
    has_cert: bool,
    req: &mut Request<Body>,
    finish: &mut Finish<'a>,
    user: Option<&mut Option<HeaderValue>>,
) -> Result<Option<Arc<Identity>>, Rejection> {
    let label = route.label();
    let policy = &route.policy;
    if let Some(rules) = &policy.ip
        && !rules.admits(client.ip)
    {
        route.stats.ip_denied();
        return Err(Rejection::IpDenied);
    }

    if policy.client_cert && !has_cert {
        route.stats.auth_failed("client_certificate_required");
        return Err(Rejection::ClientCertRequired);
    }

    let mut identity: Option<Arc<Identity>> = None;
    if let Some(keys) = &routing.keys
        && !matches!(policy.auth, RouteAuth::Key { .. })
    {
        // The key is the gateway's to read wherever it is sent: an SDK
        // that sends it on every call must not hand it to a public
        // route's service, which may log it. (A key route takes it off
        // as it authenticates.)
        req.headers_mut().remove(keys.header());
    }
    if let RouteAuth::Key { consumers } = &policy.auth {
        // Validation guarantees keys for every key route.
        let result = match &routing.keys {
            Some(keys) => keys.authenticate(req.headers_mut(), consumers),
            None => Err(KeyError::Invalid),
        };
        match result {
            Ok(id) => identity = Some(id),
            Err(error) => {
                route.stats.auth_failed(error.reason());
                let header = routing.keys.as_ref().map_or_else(
                    || HeaderName::from_static("x-api-key"),
                    |k| k.header().clone(),
                );
                return Err(Rejection::ApiKey { error, header });
            }
        }
    } else if !matches!(policy.auth, RouteAuth::Public) {
        // Validation guarantees a verifier for every jwt and optional route.
        let mut result = routing
            .jwt
            .authenticate(req.headers(), policy.issuers)
            .await;
        let cookie = matches!(result, Err(jwt::AuthError::Missing))
            .then(|| routing.jwt.cookie_token(req.headers(), policy.issuers));
        let optional = matches!(policy.auth, RouteAuth::Optional);
        if let Some(Err(reason)) = cookie {
            // Two tokens under the cookie's name: neither is taken. On an
            // optional route the caller is anonymous, as without one.
            if !optional {
                result = Err(jwt::AuthError::Invalid(reason));
            }
        } else if let Some(Ok(Some(token))) = cookie {
            if !cookie_allowed(req, finish.out.cors.as_deref(), client.trusted_proxy) {
                // On an optional route a cookie the browser sent on
                // another site's behalf leaves the caller anonymous, as
                // without one.
                if !optional {
                    route.stats.auth_failed("cross_site");
                    return Err(Rejection::CrossSiteToken);
                }
            } else {
                // Boxed: few routes read cookies, and every request's
                // future would otherwise grow by this path's.
                match Box::pin(routing.jwt.identify(token, policy.issuers)).await {
                    // ... and so does a stale one there.
                    Err(_) if optional => {}
                    other => result = other,
                }
            }
        }
        let result = result.and_then(|id| jwt::authorize(&id, &policy.auth).map(|()| id));
        match result {
            // No bearer token on an optional route: an anonymous caller
            // (the identity headers a client sent are already gone).
            Err(jwt::AuthError::Missing) if matches!(policy.auth, RouteAuth::Optional) => {}
            Ok(id) => identity = Some(id),
            Err(e) => {
                route.stats.auth_failed(e.reason());
                tracing::debug!(target: "flotilla::gateway", route = label, reason = e.reason(), "request refused by JWT policy");
                return Err(Rejection::Auth(e));
            }
        }
    }

    if let (Some(user), Some(id)) = (user, &identity) {
        *user = id.field(jwt::USER_ID.as_str()).cloned();
    }

    // The caller's fields go to the instance with the request
    // (`headers::Told`), and are put among the request's fields only on a
    // route that keeps responses: a response may vary on them
    // (`Vary: x-flotilla-user-id`), and the cache reads the request's
    // fields.
    if policy.cache.is_some()
        && let Some(id) = &identity
    {
        for (name, value) in &id.headers {
            req.headers_mut().insert(name.clone(), value.clone());
        }
    }

    if let Some(limiter) = &policy.limiter {
        let (id, headers) = (identity.as_deref(), req.headers());
        let counted = limiter
            .check(|key| limit_key(key, client, id, headers))
            .await;
        if let Some(refused_by) = limiter.refused_by(&counted) {
            route.stats.rate_limited(refused_by);
            finish.limit = Some((limiter, counted));
            return Err(Rejection::RateLimited { limit: refused_by });
        }
        finish.limit = Some((limiter, counted));
    }

    if let Some(limit) = policy.max_body_bytes {
        // The length the client declared, as its body tells it (the
        // connection read `Content-Length` already; a body read whole is
        // its own length): no second lookup and parse of the field.
        if req.body().size_hint().lower() > limit as u64 {
            return Err(Rejection::PayloadTooLarge { limit });
        }
        if !req.body().is_end_stream() {
            let body = std::mem::replace(req.body_mut(), body::empty());
            *req.body_mut() = body::boxed(Limited::new(body, limit));
        }
    }
    Ok(identity)
}

/// Whether `req` may be acted on with a token from its cookies
/// ([`jwt::cookie`]), under `cors`, its route's CORS policy; a trusted
/// proxy's `X-Forwarded-Host` names this site too.
#[cold]
fn cookie_allowed(
    req: &Request<Body>,
    cors: Option<&CorsPolicy>,
    trusted_proxy: Option<ip::ForwardedHeader>,
) -> bool {
    let websocket = req.extensions().get::<WebSocket>().is_some();
    let forwarded = trusted_proxy
        .and_then(|header| crate::headers::trusted_forwarded_host(req.headers(), header));
    jwt::cookie::same_site(
        req.method(),
        req.uri(),
        req.headers(),
        websocket,
        cors,
        forwarded,
    )
}

/// Longer header values are hashed, so a key costs bounded memory.
const MAX_KEY_BYTES: usize = 128;

/// The key of a request under a limit keyed by `key`: [`rate_key`], with
/// the hash a verified caller's key was made with.
#[inline(always)]
fn limit_key<'a>(
    key: &RateLimitKey,
    client: ClientAddr,
    identity: Option<&'a Identity>,
    headers: &HeaderMap,
) -> ratelimit::Key<'a> {
    match (key, identity) {
        (RateLimitKey::User, Some(i)) => ratelimit::Key {
            text: Cow::Borrowed(&i.rate_key),
            hash: Some(i.rate_key_hash),
        },
        _ => rate_key(key, client, identity, headers).into(),
    }
}

/// Inlined into the key closure that `police` hands the limiter (it was,
/// before the limiter took a closure).
#[inline(always)]
fn rate_key<'a>(
    key: &RateLimitKey,
    client: ClientAddr,
    identity: Option<&'a Identity>,
    headers: &HeaderMap,
) -> Cow<'a, str> {
    // By the client's block: an IPv6 client holds a /64 of addresses.
    let ip = || ip::text(ip::host_block(client.ip));
    match key {
        RateLimitKey::Ip => Cow::Owned(ip()),
        RateLimitKey::User => match identity {
            Some(i) => Cow::Borrowed(&i.rate_key),
            None => Cow::Owned(ip()),
        },
        RateLimitKey::Route => Cow::Borrowed(""),
        RateLimitKey::Header(name) => {
            Cow::Owned(match jwt::request_field(headers, identity, name) {
                // Text as it is; anything else by its digest, as a long
                // value is: read lossily, `a\x80` and `a\x81` would be one
                // client, and one could spend the other's limit.
                Some(v)
                    if v.len() <= MAX_KEY_BYTES
                        && let Ok(text) = v.to_str() =>
                {
                    format!("h:{text}")
                }
                Some(v) => {
                    let digest = ring::digest::digest(&ring::digest::SHA256, v.as_bytes());
                    format!("h#{}", hex::encode(digest))
                }
                None => format!("ip:{}", ip()),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http2_request_with_two_hosts_is_ambiguous() {
        let mut req = Request::new(crate::body::empty());
        *req.version_mut() = http::Version::HTTP_2;
        *req.uri_mut() = "/x".parse().unwrap_or_default();
        req.headers_mut()
            .append(HOST, HeaderValue::from_static("public.example"));
        assert!(!host_is_ambiguous(&req));
        req.headers_mut()
            .append(HOST, HeaderValue::from_static("admin.internal.example"));
        assert!(host_is_ambiguous(&req));
    }

    #[test]
    fn userinfo_in_a_target_or_an_http2_host_is_seen() {
        let req = |version, uri: &str, host: Option<&'static str>| {
            let mut req = Request::new(crate::body::empty());
            *req.version_mut() = version;
            *req.uri_mut() = uri.parse().unwrap_or_default();
            if let Some(host) = host {
                req.headers_mut()
                    .insert(HOST, HeaderValue::from_static(host));
            }
            req
        };
        let h1 = http::Version::HTTP_11;
        let h2 = http::Version::HTTP_2;
        assert!(host_is_ambiguous(&req(h1, "http://a@b.example/x", None)));
        assert!(host_is_ambiguous(&req(h2, "http://a@b.example/x", None)));
        assert!(host_is_ambiguous(&req(h2, "/x", Some("a@b.example"))));
        // HTTP/1's `Host` is refused as its head is read (`h1::head`).
        assert!(!host_is_ambiguous(&req(h1, "/x", Some("a@b.example"))));
        assert!(!host_is_ambiguous(&req(
            h2,
            "http://b.example/x",
            Some("b.example")
        )));
    }

    #[test]
    fn gateway_fields_spelled_with_underscores_are_told_apart() {
        for forged in [
            "x_flotilla_user_id",
            "x-flotilla_user-role",
            "x_forwarded_for",
            "x_forwarded_client_cert",
            "x_request_id",
            "x_forwarded_prefix",
        ] {
            assert!(spells_gateway_field(forged), "{forged}");
        }
        for fine in [
            "x_custom",
            "api_key",
            "x_flotilla_user",
            "x_forwarded_fo",
            "x_forwarded_forx",
        ] {
            assert!(!spells_gateway_field(fine), "{fine}");
        }
    }

    #[test]
    fn identity_headers_are_stripped_whatever_their_case_or_number() {
        let mut h = HeaderMap::new();
        h.append("x-flotilla-user-id", HeaderValue::from_static("admin"));
        h.append("X-Flotilla-User-Id", HeaderValue::from_static("root"));
        h.append("x-flotilla-user-role", HeaderValue::from_static("admin"));
        h.append("x-flotilla-username", HeaderValue::from_static("kept"));
        h.append("x-other", HeaderValue::from_static("kept"));
        h.append(
            "X-Forwarded-Client-Cert",
            HeaderValue::from_static("Hash=00"),
        );
        h.append(
            "x-forwarded-client-cert",
            HeaderValue::from_static("Hash=11"),
        );
        strip_identity_headers(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["x-flotilla-username", "x-other"]);
    }

    /// A plain-HTTP client at 192.0.2.1, not behind a trusted proxy.
    fn client() -> ClientAddr {
        ClientAddr {
            ip: IpAddr::from([192, 0, 2, 1]),
            trusted_proxy: None,
            proto: "http",
            affinity: None,
            trace: trace::Started::new(),
        }
    }

    #[test]
    fn header_keys_are_bounded() {
        let mut h = HeaderMap::new();
        let long = "k".repeat(500);
        if let Ok(v) = HeaderValue::from_str(&long) {
            h.insert("x-api-key", v);
        }
        let name = String::from("x-api-key");
        let client = client();
        let key = rate_key(&RateLimitKey::Header(name.clone()), client, None, &h);
        assert_eq!(key.len(), 2 + 64);
        h.insert("x-api-key", HeaderValue::from_static("abc"));
        assert_eq!(
            rate_key(&RateLimitKey::Header(name.clone()), client, None, &h),
            "h:abc"
        );
        // Values that are not text are told apart by their digests.
        let keys: Vec<_> = [&b"a\x80"[..], b"a\x81"]
            .iter()
            .map(|v| {
                h.insert("x-api-key", HeaderValue::from_bytes(v).unwrap());
                rate_key(&RateLimitKey::Header(name.clone()), client, None, &h).into_owned()
            })
            .collect();
        assert_ne!(keys[0], keys[1]);
        assert!(keys[0].starts_with("h#"), "{}", keys[0]);
        assert_eq!(
            rate_key(&RateLimitKey::Header(name), client, None, &HeaderMap::new()),
            "ip:192.0.2.1"
        );
        // An identity field is the verified caller's, which the request's
        // fields do not hold.
        let user = Identity::consumer("partner");
        let by_user = RateLimitKey::Header("x-flotilla-user-id".into());
        assert_eq!(
            rate_key(&by_user, client, Some(&user), &HeaderMap::new()),
            "h:partner"
        );
        assert_eq!(
            rate_key(&by_user, client, None, &HeaderMap::new()),
            "ip:192.0.2.1"
        );
    }

    #[test]
    fn a_verified_caller_s_key_comes_with_the_hash_it_was_made_with() {
        let client = client();
        let user = Identity::consumer("partner");
        let h = HeaderMap::new();
        let key = limit_key(&RateLimitKey::User, client, Some(&user), &h);
        assert_eq!(key.text, "k:partner");
        assert_eq!(
            key.hash,
            Some(crate::ratelimit::gcra::key_hash("k:partner")),
            "not the hash the stores make"
        );
        // Any other key is hashed by the store.
        let by_ip = limit_key(&RateLimitKey::Ip, client, Some(&user), &h);
        assert_eq!((by_ip.text.as_ref(), by_ip.hash), ("192.0.2.1", None));
        let anonymous = limit_key(&RateLimitKey::User, client, None, &h);
        assert_eq!(anonymous.hash, None);
    }
}
