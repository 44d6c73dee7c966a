//! One configuration's routes and policies, compiled, and the slot that
//! holds the one in force.
//!
//! A reload builds a whole new [`Routing`] (routes, static files, JWT
//! verifier, CORS, IP lists, rate limiters) and swaps it in with one pointer
//! write; each request takes a snapshot when it enters the edge, so it is
//! routed and policed by exactly one configuration, old or new, never a
//! mix. Connections are not involved at all, so kept-alive connections carry
//! on and their next request sees the new configuration.
//!
//! State worth keeping survives a reload when its settings do not change:
//! a route's rate-limit counters (matched by service, pattern and methods)
//! and the JWT verifier with its keys and cache.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use flotilla_manifest::HostPattern;
use http::{HeaderName, HeaderValue};

use tower_http::services::ServeDir;

use crate::apikey::KeyVerifier;
use crate::authz::{Authz, Check};
use crate::bulkhead::Bulkhead;
use crate::cache::{ResponseCache, RouteCache};
use crate::client::FetchClient;
use crate::compress::Compression;
use crate::config::{Config, ConfigError};
use crate::cors::CorsPolicy;
use crate::header_changes::HeaderChanges;
use crate::ip::{IpConfig, IpFilter, IpRules};
use crate::jwt::{Issuers, JwtConfig, Verifier, Verifiers};
use crate::ratelimit::{self, RateLimitBackend};
use crate::routes::{Outgoing, Route, RoutePolicy, RouteTable};
use crate::stats::GatewayStats;
use crate::upstream::Upstreams;

/// One configuration, compiled.
#[derive(Debug)]
pub(crate) struct Routing {
    pub table: RouteTable,
    pub static_files: Option<ServeDir>,
    /// The issuers of `[gateway] jwt`, in order.
    pub jwt: Verifiers,
    /// The API keys, for routes with `auth = key`.
    pub keys: Option<KeyVerifier>,
    /// What responses to requests no route matched get on the way out.
    pub outgoing: Outgoing,
    /// The system's allow/deny lists (`None`: everyone).
    pub ip_rules: Option<IpFilter>,
    pub ip: Option<IpConfig>,
    /// Whether responses may be gzipped (`Outgoing::compression`), so
    /// that a request's `Accept-Encoding` is read only then.
    pub compression: bool,
    /// Whether any policy answers CORS (the system's or a route's), so
    /// that a request's `Origin` is looked up only then.
    pub cors: bool,
    backend: RateLimitBackend,
    /// The store of the routes with `cache`, if any has.
    cache: Option<Arc<ResponseCache>>,
    /// The gateway's own metrics, the same in every routing built for it.
    pub stats: Arc<GatewayStats>,
}

impl Routing {
    /// The store of the routes with `cache`, if any has.
    pub(crate) fn cache(&self) -> Option<&Arc<ResponseCache>> {
        self.cache.as_ref()
    }
}

/// What building a [`Routing`] needs besides the config.
#[derive(Clone)]
pub(crate) struct Context {
    pub client: FetchClient,
    pub upstreams: Arc<dyn Upstreams>,
    /// The gateway's own metrics, which its access log counts into too.
    pub stats: Arc<GatewayStats>,
}

/// What each route of `previous` keeps across a reload (`of` its
/// policy), by the route's identity.
fn by_route_id<'a, T>(
    previous: Option<&'a Routing>,
    of: impl Fn(&'a RoutePolicy) -> Option<&'a T>,
) -> HashMap<String, &'a T> {
    let Some(previous) = previous else {
        return HashMap::new();
    };
    previous
        .table
        .routes()
        .iter()
        .filter_map(|r| {
            let kept = of(&r.policy)?;
            let id = route_id(
                &r.service,
                r.pattern.as_str(),
                r.methods(),
                &r.hosts,
                &r.match_headers,
            );
            Some((id, kept))
        })
        .collect()
}

/// Identifies a route across reloads (and across replicas, for Redis keys).
/// A route for any host keeps the id it had before routes could name hosts,
/// so an upgrade does not reset its counters in Redis.
fn route_id(
    service: &str,
    pattern: &str,
    methods: &[String],
    hosts: &[HostPattern],
    headers: &[(HeaderName, Vec<HeaderValue>)],
) -> String {
    let mut id = format!("{service}:{pattern}:{}", methods.join(","));
    if !hosts.is_empty() {
        let hosts: Vec<String> = hosts.iter().map(ToString::to_string).collect();
        id.push_str(&format!(":{}", hosts.join(",")));
    }
    // Two routes of one path for different headers are two routes: their
    // limits, counts and cached responses are their own.
    for (name, values) in headers {
        id.push_str(&format!(":{name}="));
        for value in values {
            id.push_str(&String::from_utf8_lossy(value.as_bytes()));
            id.push(',');
        }
    }
    id
}

/// The bits of the issuers named `names` (validated: each is one of
/// `jwt`'s); none named, the first's.
fn issuers(jwt: &[JwtConfig], names: &[String]) -> Issuers {
    if names.is_empty() {
        return Issuers::default();
    }
    Issuers(
        jwt.iter()
            .enumerate()
            .filter(|(_, j)| names.contains(&j.name))
            .fold(0, |bits, (i, _)| bits | (1 << i)),
    )
}

impl Routing {
    /// Validates `config` and compiles it, reusing what `previous` has that
    /// is still valid. Must run inside tokio (the JWT verifier spawns its
    /// key refresh).
    pub(crate) fn build(
        config: &Config,
        previous: Option<&Routing>,
        ctx: &Context,
    ) -> Result<Routing, ConfigError> {
        config.validate()?;
        // Each issuer's keys and verified tokens are kept while its
        // settings, its place (first or not) and its `jwks_ca` file are.
        let mut verifiers = Vec::with_capacity(config.jwt.len());
        for (i, jwt) in config.jwt.iter().enumerate() {
            let secondary = i > 0;
            let kept = previous
                .into_iter()
                .flat_map(|p| &p.jwt.0)
                .find(|v| v.still_current(jwt, secondary));
            verifiers.push(match kept {
                Some(v) => {
                    v.reread_file();
                    Arc::clone(v)
                }
                None => Arc::new(
                    Verifier::start(
                        jwt.clone(),
                        secondary,
                        ctx.client.clone(),
                        Arc::clone(&ctx.upstreams),
                        &config.limits,
                    )
                    .map_err(ConfigError::JwksTrust)?,
                ),
            });
        }
        let jwt = Verifiers(verifiers);
        let cors = match &config.cors {
            // Validated above.
            Some(c) => CorsPolicy::new(c).ok().map(Arc::new),
            None => None,
        };
        let old_limiters = by_route_id(previous, |p| p.limiter.as_ref());
        // The same for each route's count of requests in flight.
        let old_bulkheads = by_route_id(previous, |p| p.bulkhead.as_ref());
        let compression = config
            .compression
            .as_ref()
            .map(|c| Arc::new(Compression::new(c)));
        // Kept across reloads that keep its sizes: entries are keyed by
        // route, so a path that moved to another route is not served from
        // the old one's.
        let cache = config.routes.iter().any(|r| r.cache.is_some()).then(|| {
            match previous.and_then(|p| p.cache.as_ref()) {
                Some(store) if store.config() == config.cache => Arc::clone(store),
                _ => Arc::new(ResponseCache::new(config.cache)),
            }
        });
        let backend = &config.rate_limit_backend;
        let old_backend = previous.map(|p| &p.backend);
        let default_body = config.limits.max_body_bytes;
        let authz = match &config.authz {
            Some(a) => Some(Arc::new(Authz::new(a).ok_or(ConfigError::AuthzHeader)?)),
            None => None,
        };
        let table = RouteTable::with_policies(&config.routes, |route| {
            let methods: Vec<String> = route
                .methods
                .iter()
                .map(|m| m.to_ascii_uppercase())
                .collect();
            let id = route_id(
                &route.service,
                route.pattern.as_str(),
                &methods,
                &route.hosts,
                &route.match_headers,
            );
            let label = crate::routes::route_label(route, &config.routes);
            // `compress = false`: this route's responses go as they come.
            let route_compression = compression.clone().filter(|_| route.compress);
            RoutePolicy {
                auth: route.auth.clone(),
                issuers: issuers(&config.jwt, &route.issuers),
                limiter: (!route.rate_limits.is_empty()).then(|| {
                    ratelimit::reuse_or_new(
                        &route.rate_limits,
                        backend,
                        &id,
                        old_limiters.get(&id).copied(),
                        old_backend,
                    )
                }),
                outgoing: Outgoing {
                    // Validated above.
                    cors: match &route.cors {
                        Some(own) => CorsPolicy::new(own).ok().map(Arc::new),
                        None => cors.clone(),
                    },
                    headers: HeaderChanges::merged(
                        &config.response_headers,
                        &route.response_headers,
                    ),
                    compression: route_compression.clone(),
                },
                ip: route.ip.as_ref().map(IpRules::filter),
                max_body_bytes: Some(route.max_body_bytes.unwrap_or(default_body)),
                client_cert: route.client_cert,
                request_headers: HeaderChanges::merged(
                    &config.request_headers,
                    &route.request_headers,
                ),
                cache: match (&cache, &route.cache) {
                    (Some(store), Some(c)) => Some(RouteCache {
                        store: Arc::clone(store),
                        ttl: c.ttl,
                        stale_if_error: c.stale_if_error,
                        stale_while_revalidate: c.stale_while_revalidate,
                        by_host: !route.hosts.is_empty(),
                        checked: route.authz && authz.is_some(),
                        query: c
                            .query
                            .as_ref()
                            .map(|names| names.iter().map(|n| n.as_str().into()).collect()),
                        compression: route_compression.clone(),
                        stats: crate::stats::CacheStats::new(&label),
                        id: id.clone().into_boxed_str(),
                    }),
                    _ => None,
                },
                affinity: route.affinity.clone(),
                authz: authz.as_ref().filter(|_| route.authz).map(|a| Check {
                    authz: Arc::clone(a),
                    route: Route::for_check(a.service(), &route.pattern, &label, a.timeout()),
                    stats: crate::stats::AuthzStats::new(&label),
                }),
                bulkhead: route
                    .max_in_flight
                    .map(|limit| Bulkhead::new(limit, &label, old_bulkheads.get(&id).copied())),
            }
        });
        let keys = match &config.api_keys {
            Some(k) => Some(
                KeyVerifier::new(k).ok_or_else(|| ConfigError::ApiKeyHeader(k.header.clone()))?,
            ),
            None => None,
        };
        Ok(Routing {
            table,
            keys,
            static_files: config
                .static_dir
                .as_ref()
                .map(|dir| ServeDir::new(dir).append_index_html_on_directories(true)),
            jwt,
            outgoing: Outgoing {
                cors,
                headers: HeaderChanges::merged(&config.response_headers, &HeaderChanges::default()),
                compression: compression.clone(),
            },
            ip_rules: config.ip.as_ref().map(IpConfig::filter),
            ip: config.ip.clone(),
            compression: compression.is_some(),
            cors: config.cors.is_some() || config.routes.iter().any(|r| r.cors.is_some()),
            backend: backend.clone(),
            cache,
            stats: Arc::clone(&ctx.stats),
        })
    }
}

/// The routing in force; replaced whole on reload.
#[derive(Debug)]
pub(crate) struct RoutingState(RwLock<Arc<Routing>>);

impl RoutingState {
    pub(crate) fn new(routing: Routing) -> RoutingState {
        RoutingState(RwLock::new(Arc::new(routing)))
    }

    pub(crate) fn current(&self) -> Arc<Routing> {
        // A panic while holding the lock cannot leave an `Arc` half-written.
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn replace(&self, routing: Routing) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(routing);
    }
}
