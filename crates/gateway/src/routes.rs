//! The route table: which service a `(host, method, path)` belongs to.
//!
//! Routes are sorted once, when a configuration is loaded: routes for the
//! most specific host first (an exact name, then wildcards by length), then
//! routes for any host; within each, the most specific path pattern first.
//! A lookup is a scan that stops at the first route that matches the host
//! and path and allows the method. Matching by method as well as path lets
//! two services share a path prefix for different methods; a path that
//! some route matches but none for this method is a 405 with `Allow`.
//!
//! Host first, as Envoy's virtual hosts and Kong's routes order them: the
//! routes of `api.example.com` are that site's, whatever paths another
//! site's routes claim. A name none of them has a route for still falls
//! back to the routes for any host.

use std::sync::Arc;
use std::time::Duration;

use flotilla_manifest::{HostPattern, PathPattern};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use rand::Rng;

use crate::bulkhead::Bulkhead;
use crate::cache::RouteCache;
use crate::compress::Compression;
use crate::config::RouteConfig;
use crate::cors::CorsPolicy;
use crate::header_changes::HeaderChanges;
use crate::ip::IpFilter;
use crate::jwt::{Issuers, RouteAuth};
use crate::ratelimit::Limiter;
use crate::resilience::HealthMemo;
use crate::stats::RouteStats;
use flotilla_manifest::Affinity;

/// One route, as the edge and the proxy need it. A route with a `split`
/// is one of these per service, sharing one policy.
#[derive(Debug)]
pub(crate) struct Route {
    pub service: String,
    pub pattern: PathPattern,
    /// Empty: any host.
    pub hosts: Vec<HostPattern>,
    /// Leading path segments taken off before forwarding (0: none).
    pub strip_segments: usize,
    methods: Vec<String>,
    /// The request headers it is for (`match_headers`); empty: any.
    pub match_headers: Vec<(HeaderName, Vec<HeaderValue>)>,
    pub timeout: Duration,
    /// How long one attempt may take, within `timeout` (`try_timeout`).
    pub try_timeout: Option<Duration>,
    /// Retries after a failed attempt; `None`: the gateway's.
    pub retries: Option<u32>,
    /// Shared by the routes of one `split`.
    pub policy: Arc<RoutePolicy>,
    /// Services that get a copy of a share of the requests (`mirror`):
    /// each share in percent, and the route to send the copy by. Shared by
    /// the routes of one `split`; empty on a mirror's own route.
    pub mirrors: Arc<[(u32, Arc<Route>)]>,
    pub stats: RouteStats,
    /// What metrics and the access log call it ([`route_label`]).
    label: Box<str>,
    /// The service's health, for the proxy.
    pub health: HealthMemo,
}

/// What the edge enforces on a route, compiled from its config.
#[derive(Debug, Default)]
pub(crate) struct RoutePolicy {
    pub auth: RouteAuth,
    /// The issuers whose tokens it takes, for `jwt` and `optional`.
    pub issuers: Issuers,
    pub limiter: Option<Arc<Limiter>>,
    /// What its responses get on the way out.
    pub outgoing: Outgoing,
    pub ip: Option<IpFilter>,
    /// `None`: no limit (only tests build routes without one).
    pub max_body_bytes: Option<usize>,
    /// Only requests over a connection with a verified client certificate.
    pub client_cert: bool,
    /// The system's request header changes, then the route's.
    pub request_headers: Option<HeaderChanges>,
    /// Responses kept and served by the gateway (`cache`).
    pub cache: Option<RouteCache>,
    /// The route's own cap on requests in flight (`max_in_flight`).
    pub bulkhead: Option<Bulkhead>,
    /// What keeps a client's requests on one instance (`affinity`).
    pub affinity: Option<Affinity>,
    /// The external authorization check its requests pass (`authz`).
    pub authz: Option<crate::authz::Check>,
}

/// What every response gets on its way out: of a route, or the system's
/// for requests no route matched. Worked out when the configuration is
/// built, so a request borrows one of these instead of assembling its own
/// (or cloning an `Arc`, a cache line shared by every core).
#[derive(Debug, Default)]
pub(crate) struct Outgoing {
    /// The route's own CORS policy, else the system's.
    pub cors: Option<Arc<CorsPolicy>>,
    /// The system's response header changes, then the route's.
    pub headers: Option<HeaderChanges>,
    /// gzip, if configured.
    pub compression: Option<Arc<Compression>>,
}

/// What route `c` of `all` is called in metrics and the access log: its
/// pattern, after its hosts when it names any
/// (`shop.example,*.shop.example/api/**`), so that routes of one pattern on
/// different hosts are told apart; and after its methods when another
/// route has the same hosts and pattern (`POST /api/reviews/*`), as the
/// usual split of a cached public `GET` route and a `jwt` `POST` route
/// would otherwise share every series, latency included. A bounded set, as
/// routes are: never what a client sent.
pub(crate) fn route_label(c: &RouteConfig, all: &[RouteConfig]) -> String {
    let hosts: Vec<String> = c.hosts.iter().map(ToString::to_string).collect();
    let place = format!("{}{}", hosts.join(","), c.pattern.as_str());
    let shared = all
        .iter()
        .filter(|o| o.pattern == c.pattern && o.hosts == c.hosts)
        .nth(1)
        .is_some();
    if shared && !c.methods.is_empty() {
        let methods: Vec<String> = c.methods.iter().map(|m| m.to_ascii_uppercase()).collect();
        format!("{} {place}", methods.join(","))
    } else {
        place
    }
}

impl Route {
    /// What metrics and the access log call it ([`route_label`]).
    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    /// The route the checks of `[gateway.authz]` (to `service`, under
    /// `timeout`) are sent by for requests of a route of `pattern`, called
    /// `label`.
    pub(crate) fn for_check(
        service: &str,
        pattern: &PathPattern,
        label: &str,
        timeout: Duration,
    ) -> Arc<Route> {
        Arc::new(Route {
            service: service.to_string(),
            pattern: pattern.clone(),
            hosts: Vec::new(),
            strip_segments: 0,
            methods: Vec::new(),
            match_headers: Vec::new(),
            timeout,
            try_timeout: None,
            retries: None,
            policy: Arc::new(RoutePolicy::default()),
            mirrors: Arc::new([]),
            stats: RouteStats::new(label, service),
            label: label.into(),
            health: HealthMemo::default(),
        })
    }

    /// The methods the route was configured with, upper case.
    pub(crate) fn methods(&self) -> &[String] {
        &self.methods
    }

    /// Whether `headers` are what the route is for: for each of its
    /// names, some value of the request's is one of the route's.
    fn wants(&self, headers: &HeaderMap) -> bool {
        self.match_headers
            .iter()
            .all(|(name, values)| headers.get_all(name).iter().any(|v| values.contains(v)))
    }

    /// Any method when none are listed; HEAD wherever GET is, as HTTP asks.
    fn allows(&self, method: &Method) -> bool {
        self.methods.is_empty()
            || self.methods.iter().any(|m| m == method.as_str())
            || (method == Method::HEAD && self.methods.iter().any(|m| m == "GET"))
    }
}

/// The result of a lookup.
#[derive(Debug)]
pub(crate) enum Match {
    Route(Arc<Route>),
    /// A route with a `split` and an `affinity`: the split's services are
    /// chosen between by the client's key, which the edge finds once the
    /// route's policies (the same for all of them) have run. The route is
    /// the split's own.
    Sticky(Arc<Route>, Split),
    /// Some route has this path, none this method; the methods that would do.
    MethodNotAllowed(Vec<String>),
    NotFound,
}

#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    /// Most specific path first.
    routes: Vec<Arc<Route>>,
    /// What a lookup scans: a route once per host it lists, or once for
    /// any host; in the order the module's comment gives.
    entries: Vec<Entry>,
    /// Whether any route lists hosts: when none does, a lookup needs no
    /// host and the edge does not look for one.
    by_host: bool,
}

#[derive(Debug)]
struct Entry {
    /// `None`: any host.
    host: Option<HostPattern>,
    route: Arc<Route>,
    split: Option<Split>,
}

/// A `split`: each service's route and the percentage below which a draw
/// in `0..100` picks it, the route's own first.
pub(crate) type Split = Arc<[(u32, Arc<Route>)]>;

/// The route of `split` (of `own`'s) that takes a request: by
/// `affinity`, a client's key hashed, so that a client stays with one
/// version (as Kong's canary `hash` does), or by a random draw.
pub(crate) fn choose(own: &Arc<Route>, split: &Split, affinity: Option<u64>) -> Arc<Route> {
    let draw = match affinity {
        // The key's hash is uniform: its remainder is a fair share.
        Some(hash) => (hash % 100) as u32,
        None => rand::rng().random_range(0..100),
    };
    split
        .iter()
        .find(|(below, _)| draw < *below)
        .map_or_else(|| Arc::clone(own), |(_, r)| Arc::clone(r))
}

impl Entry {
    /// What a lookup found: a draw among the split's services, or the only
    /// one; a split with `affinity` is left to the edge, which draws once
    /// the route's policies have found the client's key.
    fn pick(&self) -> Match {
        match &self.split {
            None => Match::Route(Arc::clone(&self.route)),
            Some(split) if self.route.policy.affinity.is_some() => {
                Match::Sticky(Arc::clone(&self.route), Arc::clone(split))
            }
            Some(split) => Match::Route(choose(&self.route, split, None)),
        }
    }
}

impl RouteTable {
    #[cfg(test)]
    pub(crate) fn new(configs: &[RouteConfig]) -> RouteTable {
        RouteTable::with_policies(configs, |_| RoutePolicy::default())
    }

    /// The table of `configs`, each route's policy made by `policy`.
    pub(crate) fn with_policies(
        configs: &[RouteConfig],
        mut policy: impl FnMut(&RouteConfig) -> RoutePolicy,
    ) -> RouteTable {
        let route_to = |c: &RouteConfig,
                        service: &str,
                        policy: Arc<RoutePolicy>,
                        mirrors: Arc<[(u32, Arc<Route>)]>| {
            let label = route_label(c, configs);
            Arc::new(Route {
                service: service.to_string(),
                pattern: c.pattern.clone(),
                hosts: c.hosts.clone(),
                strip_segments: c
                    .strip_prefix
                    .as_ref()
                    .map_or(0, PathPattern::segment_count),
                methods: c.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
                match_headers: c.match_headers.clone(),
                timeout: c.timeout,
                try_timeout: c.try_timeout,
                retries: c.retries,
                policy,
                mirrors,
                stats: RouteStats::new(&label, service),
                label: label.into_boxed_str(),
                health: HealthMemo::default(),
            })
        };
        let mut routes: Vec<(Arc<Route>, Option<Split>)> = configs
            .iter()
            .map(|c| {
                let policy = Arc::new(policy(c));
                let mirrors: Arc<[(u32, Arc<Route>)]> = c
                    .mirror
                    .iter()
                    .map(|(service, percent)| {
                        let none: Arc<[(u32, Arc<Route>)]> = Arc::new([]);
                        (*percent, route_to(c, service, Arc::clone(&policy), none))
                    })
                    .collect();
                let own = route_to(c, &c.service, policy, Arc::clone(&mirrors));
                if c.split.is_empty() {
                    return (own, None);
                }
                // One policy for all: the split's services share the
                // route's rate limits, auth and the rest, as one route.
                let given: u32 = c.split.iter().map(|(_, p)| p).sum();
                let mut below = 100u32.saturating_sub(given);
                let mut split = vec![(below, Arc::clone(&own))];
                for (service, percent) in &c.split {
                    below += percent;
                    let route = route_to(c, service, Arc::clone(&own.policy), Arc::clone(&mirrors));
                    split.push((below, route));
                }
                (own, Some(split.into()))
            })
            .collect();
        // Stable: routes with the same pattern keep their configured
        // order, except that one for given headers comes before one for
        // any request (the more headers, the sooner).
        routes.sort_by(|(a, _), (b, _)| {
            b.pattern
                .specificity_cmp(&a.pattern)
                .then_with(|| b.match_headers.len().cmp(&a.match_headers.len()))
        });
        let mut entries: Vec<Entry> = routes
            .iter()
            .flat_map(|(route, split)| {
                let hosts: Vec<Option<HostPattern>> = if route.hosts.is_empty() {
                    vec![None]
                } else {
                    route.hosts.iter().cloned().map(Some).collect()
                };
                hosts.into_iter().map(|host| Entry {
                    host,
                    route: Arc::clone(route),
                    split: split.clone(),
                })
            })
            .collect();
        // Stable again: within one host, the path order above stands.
        entries.sort_by(|a, b| match (&a.host, &b.host) {
            (Some(a), Some(b)) => b.specificity_cmp(a),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        });
        RouteTable {
            by_host: entries.iter().any(|e| e.host.is_some()),
            routes: routes.into_iter().map(|(route, _)| route).collect(),
            entries,
        }
    }

    /// Every route, most specific path first.
    pub(crate) fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// Whether a lookup needs the request's host.
    pub(crate) fn by_host(&self) -> bool {
        self.by_host
    }

    /// The route for a request to `host` (its name, without the port;
    /// `None` when it named none, or when the table is not [`by_host`]).
    ///
    /// [`by_host`]: RouteTable::by_host
    pub(crate) fn find(
        &self,
        host: Option<&str>,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Match {
        let mut allow: Vec<String> = Vec::new();
        for entry in &self.entries {
            if let Some(wanted) = &entry.host
                && !host.is_some_and(|h| wanted.matches(h))
            {
                continue;
            }
            let route = &entry.route;
            if !route.pattern.matches(path) {
                continue;
            }
            if !route.match_headers.is_empty() && !route.wants(headers) {
                continue;
            }
            if route.allows(method) {
                return entry.pick();
            }
            allow.extend(route.methods.iter().cloned());
        }
        if allow.is_empty() {
            return Match::NotFound;
        }
        if allow.iter().any(|m| m == "GET") {
            allow.push("HEAD".to_string());
        }
        allow.sort();
        allow.dedup();
        Match::MethodNotAllowed(allow)
    }
}

/// `path` split after its first `n` segments, as patterns count them
/// (empty ones, from `//`, not counted): what a route's `strip_prefix` takes
/// off, and the rest, which keeps its leading `/` (empty if nothing is left).
pub(crate) fn split_after_segments(path: &str, n: usize) -> (&str, &str) {
    let bytes = path.as_bytes();
    let mut end = 0;
    for _ in 0..n {
        while bytes.get(end) == Some(&b'/') {
            end += 1;
        }
        if end == bytes.len() {
            break;
        }
        while end < bytes.len() && bytes[end] != b'/' {
            end += 1;
        }
    }
    path.split_at(end)
}

/// The path a request is routed by and forwarded with, when it is not the
/// path as sent: the one a service reads, normalised as the mesh's ACLs
/// and the chassis normalise it (`flotilla_mesh::normalize_path`:
/// escapes of letters, digits and `-._~` decoded, `//` collapsed). Most
/// frameworks decode those escapes too. Matched as sent, `/%61dmin` would
/// miss a protected `/admin/**` route, match a public `/**` beside it, and
/// be served as `/admin` all the same.
///
/// `Err`: a path no route is matched against, refused as it arrives: a
/// `.` or `..` segment (literally or percent-encoded; resolving it would
/// route `/api/public/../admin` by a path the client did not ask for), an
/// encoded `/` or a backslash (raw or encoded: whether a service takes
/// either for a separator differs between frameworks), a `;` (raw or
/// encoded), a control character or a malformed escape.
///
/// The `;`: Java's servlet containers (Tomcat, Jetty, and Spring on them)
/// take what follows a `;` in a segment for a path parameter and drop it
/// before they route. Matched as sent, `/public/..;/admin/users` would be
/// a public route's path and `/admin;x/users` would miss `/admin/**`,
/// and both be served as `/admin/users`. Spring Security's firewall
/// refuses `;` and `%3B` by default for the same reason.
pub(crate) fn routed_path(path: &str) -> Result<Option<String>, ()> {
    // Most paths have no dot, escape, backslash, `;` or doubled slash: one
    // pass over their bytes settles them.
    let mut last = 0;
    let plain = path.bytes().all(|b| {
        let plain = !(matches!(b, b'.' | b'%' | b'\\' | b';') || (b == b'/' && last == b'/'));
        last = b;
        plain
    });
    if plain {
        return Ok(None);
    }
    if has_dot_segment(path) {
        return Err(());
    }
    // Refuses the rest, `;` and `%3B` included, as the mesh's ACLs do.
    let normal = flotilla_mesh::normalize_path(path).map_err(|_| ())?;
    Ok((normal != path).then_some(normal))
}

/// Whether `path` has a `.` or `..` segment, literally or percent-encoded.
fn has_dot_segment(path: &str) -> bool {
    // Most paths have neither a dot nor an escape: one pass over the bytes
    // settles them, where splitting into segments cost ~200 instructions
    // even for `/`.
    path.bytes().any(|b| b == b'.' || b == b'%')
        && path
            .split('/')
            .any(|segment| is_dot_segment(segment.as_bytes()))
}

/// `.` or `..`, each dot written as itself or as `%2e` (any case). Checked
/// in place: this runs on every request, and lower-casing and decoding a
/// copy of each segment cost two allocations per segment.
fn is_dot_segment(segment: &[u8]) -> bool {
    let mut rest = segment;
    let mut dots = 0;
    while !rest.is_empty() {
        rest = if let Some(after) = rest.strip_prefix(b".") {
            after
        } else if let [b'%', b'2', e, after @ ..] = rest
            && e.eq_ignore_ascii_case(&b'e')
        {
            after
        } else {
            return false;
        };
        dots += 1;
    }
    dots == 1 || dots == 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(service: &str, pattern: &str, methods: &[&str]) -> RouteConfig {
        let pattern = match PathPattern::parse(pattern) {
            Ok(p) => p,
            Err(e) => panic!("{pattern}: {e}"),
        };
        RouteConfig {
            methods: methods.iter().map(|m| m.to_string()).collect(),
            timeout: Duration::from_secs(1),
            ..RouteConfig::new(service, pattern)
        }
    }

    fn service_for(table: &RouteTable, method: Method, path: &str) -> Option<String> {
        service_at(table, None, method, path)
    }

    #[test]
    fn a_route_for_given_headers_goes_before_one_of_its_path_for_any() {
        let canary = |service: &str, wanted: &[(&'static str, &[&'static str])]| RouteConfig {
            match_headers: wanted
                .iter()
                .map(|(name, values)| {
                    let values = values.iter().map(|v| HeaderValue::from_static(v)).collect();
                    (HeaderName::from_static(name), values)
                })
                .collect(),
            ..route(service, "/api/**", &[])
        };
        // Written after the route for any request, and still first.
        let table = RouteTable::new(&[
            route("stable", "/api/**", &[]),
            canary("canary", &[("x-canary", &["1", "yes"])]),
            canary("gold", &[("x-canary", &["1"]), ("x-tier", &["gold"])]),
            route("catalog", "/api/catalog/**", &[]),
        ]);
        let at = |path: &str, fields: &[(&'static str, &'static str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in fields {
                headers.append(*name, HeaderValue::from_static(value));
            }
            match table.find(None, &Method::GET, path, &headers) {
                Match::Route(r) => r.service.clone(),
                _ => "none".to_string(),
            }
        };
        assert_eq!(at("/api/x", &[]), "stable");
        assert_eq!(at("/api/x", &[("x-canary", "1")]), "canary");
        assert_eq!(at("/api/x", &[("x-canary", "yes")]), "canary");
        assert_eq!(at("/api/x", &[("x-canary", "no")]), "stable");
        // Every header named, one of its values: the more headers, the
        // sooner.
        assert_eq!(
            at("/api/x", &[("x-canary", "1"), ("x-tier", "gold")]),
            "gold"
        );
        assert_eq!(at("/api/x", &[("x-tier", "gold")]), "stable");
        // Any of a repeated field's values.
        assert_eq!(
            at("/api/x", &[("x-canary", "0"), ("x-canary", "1")]),
            "canary"
        );
        // Headers refine a path; they do not beat a more specific one.
        assert_eq!(at("/api/catalog/1", &[("x-canary", "1")]), "catalog");
    }

    #[test]
    fn table_is_sorted_most_specific_first_whatever_the_config_order() {
        let table = RouteTable::new(&[
            route("web", "/**", &[]),
            route("api", "/api/**", &[]),
            route("orders", "/api/orders/*", &[]),
            route("special", "/api/orders/special", &[]),
        ]);
        let order: Vec<&str> = table.routes.iter().map(|r| r.pattern.as_str()).collect();
        assert_eq!(
            order,
            ["/api/orders/special", "/api/orders/*", "/api/**", "/**"]
        );
        assert_eq!(
            service_for(&table, Method::GET, "/api/orders/special").as_deref(),
            Some("special")
        );
        assert_eq!(
            service_for(&table, Method::GET, "/api/orders/1").as_deref(),
            Some("orders")
        );
        assert_eq!(
            service_for(&table, Method::GET, "/api/x/y").as_deref(),
            Some("api")
        );
        assert_eq!(
            service_for(&table, Method::GET, "/index.html").as_deref(),
            Some("web")
        );
    }

    #[test]
    fn a_less_specific_route_takes_methods_the_more_specific_one_lacks() {
        let table = RouteTable::new(&[
            route("orders", "/api/orders/**", &["GET", "POST"]),
            route("special", "/api/orders/special", &["GET"]),
        ]);
        assert_eq!(
            service_for(&table, Method::GET, "/api/orders/special").as_deref(),
            Some("special")
        );
        assert_eq!(
            service_for(&table, Method::POST, "/api/orders/special").as_deref(),
            Some("orders")
        );
    }

    #[test]
    fn no_matching_path_is_not_found() {
        let table = RouteTable::new(&[route("a", "/api/a/**", &["GET"])]);
        assert!(matches!(
            table.find(None, &Method::GET, "/api/b", &HeaderMap::new()),
            Match::NotFound
        ));
        assert!(matches!(
            table.find(None, &Method::GET, "/", &HeaderMap::new()),
            Match::NotFound
        ));
        assert!(matches!(
            RouteTable::default().find(None, &Method::GET, "/", &HeaderMap::new()),
            Match::NotFound
        ));
    }

    #[test]
    fn matching_path_with_other_method_is_405_with_the_union_of_methods() {
        let table = RouteTable::new(&[
            route("a", "/api/**", &["POST"]),
            route("b", "/api/x", &["GET"]),
        ]);
        match table.find(None, &Method::DELETE, "/api/x", &HeaderMap::new()) {
            Match::MethodNotAllowed(allow) => assert_eq!(allow, ["GET", "HEAD", "POST"]),
            other => panic!("expected 405, got {other:?}"),
        }
        // HEAD rides on GET.
        assert_eq!(
            service_for(&table, Method::HEAD, "/api/x").as_deref(),
            Some("b")
        );
    }

    fn on_hosts(mut config: RouteConfig, hosts: &[&str]) -> RouteConfig {
        config.hosts = hosts
            .iter()
            .map(|h| HostPattern::parse(h).unwrap_or_else(|e| panic!("{h}: {e}")))
            .collect();
        config
    }

    fn service_at(
        table: &RouteTable,
        host: Option<&str>,
        method: Method,
        path: &str,
    ) -> Option<String> {
        match table.find(host, &method, path, &HeaderMap::new()) {
            Match::Route(r) => Some(r.service.clone()),
            _ => None,
        }
    }

    #[test]
    fn a_route_on_hosts_is_labelled_with_them() {
        let table = RouteTable::new(&[
            route("any", "/**", &[]),
            on_hosts(route("wild", "/**", &[]), &["*.example.com"]),
            on_hosts(
                route("admin", "/**", &[]),
                &["admin.example.com", "ops.example.com"],
            ),
        ]);
        let mut labels: Vec<&str> = table.routes().iter().map(|r| r.label()).collect();
        labels.sort_unstable();
        assert_eq!(
            labels,
            [
                "*.example.com/**",
                "/**",
                "admin.example.com,ops.example.com/**"
            ]
        );
    }

    #[test]
    fn routes_of_one_place_are_labelled_with_their_methods() {
        let table = RouteTable::new(&[
            route("reviews", "/api/reviews/*", &["GET"]),
            route("reviews", "/api/reviews/*", &["post"]),
            // Alone on its pattern: its label stays the pattern.
            route("catalog", "/api/catalog/**", &["GET", "HEAD"]),
            // Another host is another place.
            on_hosts(
                route("admin", "/api/reviews/*", &["DELETE"]),
                &["admin.example"],
            ),
        ]);
        let mut labels: Vec<&str> = table.routes().iter().map(|r| r.label()).collect();
        labels.sort_unstable();
        assert_eq!(
            labels,
            [
                "/api/catalog/**",
                "GET /api/reviews/*",
                "POST /api/reviews/*",
                "admin.example/api/reviews/*"
            ]
        );
    }

    #[test]
    fn the_most_specific_host_wins_before_the_most_specific_path() {
        let table = RouteTable::new(&[
            route("any", "/api/orders", &[]),
            on_hosts(route("wild", "/**", &[]), &["*.example.com"]),
            on_hosts(route("deeper", "/**", &[]), &["*.eu.example.com"]),
            on_hosts(
                route("admin", "/**", &[]),
                &["admin.example.com", "ops.example.com"],
            ),
        ]);
        assert!(table.by_host());
        let at = |host, path| service_at(&table, host, Method::GET, path);
        assert_eq!(
            at(Some("admin.example.com"), "/api/orders").as_deref(),
            Some("admin")
        );
        assert_eq!(at(Some("OPS.example.com."), "/x").as_deref(), Some("admin"));
        assert_eq!(
            at(Some("shop.eu.example.com"), "/api/orders").as_deref(),
            Some("deeper")
        );
        assert_eq!(
            at(Some("shop.example.com"), "/api/orders").as_deref(),
            Some("wild")
        );
        // No route for this name: the routes for any host answer.
        assert_eq!(
            at(Some("example.org"), "/api/orders").as_deref(),
            Some("any")
        );
        assert_eq!(at(None, "/api/orders").as_deref(), Some("any"));
        assert_eq!(at(Some("example.com"), "/x"), None);
        assert_eq!(at(None, "/x"), None);
    }

    #[test]
    fn a_host_route_falls_back_to_any_host_for_paths_and_methods_it_lacks() {
        let table = RouteTable::new(&[
            route("web", "/**", &[]),
            on_hosts(route("api", "/v1/**", &["GET"]), &["api.example.com"]),
        ]);
        let at = |method, path| service_at(&table, Some("api.example.com"), method, path);
        assert_eq!(at(Method::GET, "/v1/items").as_deref(), Some("api"));
        assert_eq!(at(Method::POST, "/v1/items").as_deref(), Some("web"));
        assert_eq!(at(Method::GET, "/index.html").as_deref(), Some("web"));
        assert_eq!(
            service_at(&table, Some("www.example.com"), Method::GET, "/v1/items").as_deref(),
            Some("web")
        );
        // Without a route for any host, another name's methods make no 405.
        let table = RouteTable::new(&[on_hosts(
            route("api", "/v1/**", &["GET"]),
            &["api.example.com"],
        )]);
        assert!(matches!(
            table.find(
                Some("www.example.com"),
                &Method::POST,
                "/v1/items",
                &HeaderMap::new()
            ),
            Match::NotFound
        ));
        match table.find(
            Some("api.example.com"),
            &Method::POST,
            "/v1/items",
            &HeaderMap::new(),
        ) {
            Match::MethodNotAllowed(allow) => assert_eq!(allow, ["GET", "HEAD"]),
            other => panic!("expected 405, got {other:?}"),
        }
    }

    fn counts(table: &RouteTable, draws: usize) -> std::collections::BTreeMap<String, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..draws {
            if let Some(s) = service_for(table, Method::GET, "/api/catalog/1") {
                *counts.entry(s).or_insert(0) += 1;
            }
        }
        counts
    }

    #[test]
    fn a_split_route_sends_each_service_its_share_under_one_policy() {
        let mut split = route("catalog", "/api/catalog/**", &[]);
        split.split = vec![("canary".to_string(), 30), ("dark".to_string(), 0)];
        let table = RouteTable::new(&[split, route("web", "/**", &[])]);
        // 10 000 draws: 3 000 expected, 46 the standard deviation.
        let seen = counts(&table, 10_000);
        let canary = seen.get("canary").copied().unwrap_or(0);
        assert!((2_700..=3_300).contains(&canary), "{seen:?}");
        assert_eq!(
            seen.get("catalog").copied().unwrap_or(0) + canary,
            10_000,
            "{seen:?}"
        );
        assert!(
            !seen.contains_key("dark"),
            "a 0 % share got requests: {seen:?}"
        );
        // The split's routes are one route to everything but the proxy.
        let picked: Vec<Arc<Route>> = (0..200)
            .filter_map(|_| {
                match table.find(None, &Method::GET, "/api/catalog/1", &HeaderMap::new()) {
                    Match::Route(r) => Some(r),
                    _ => None,
                }
            })
            .collect();
        assert!(
            picked
                .iter()
                .all(|r| Arc::ptr_eq(&r.policy, &picked[0].policy))
        );
        assert!(
            picked
                .iter()
                .all(|r| r.pattern.as_str() == "/api/catalog/**")
        );
        assert_eq!(table.routes().len(), 2, "one route per configured route");

        let mut all = route("catalog", "/api/catalog/**", &[]);
        all.split = vec![("canary".to_string(), 100)];
        let seen = counts(&RouteTable::new(&[all]), 500);
        assert_eq!(seen.get("canary"), Some(&500), "{seen:?}");
    }

    #[test]
    fn a_sticky_split_is_left_to_the_key_which_keeps_a_client_on_one_service() {
        let mut split = route("catalog", "/api/catalog/**", &[]);
        split.split = vec![("canary".to_string(), 30), ("dark".to_string(), 0)];
        let table = RouteTable::with_policies(&[split], |_| RoutePolicy {
            affinity: Some(Affinity::Header("x-user".into())),
            ..RoutePolicy::default()
        });
        let (own, services) =
            match table.find(None, &Method::GET, "/api/catalog/1", &HeaderMap::new()) {
                Match::Sticky(own, services) => (own, services),
                other => panic!("expected a sticky split, got {other:?}"),
            };
        assert_eq!(own.service, "catalog");
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for key in 0..10_000u64 {
            // Spread keys, as a hash is.
            let hash = key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let first = choose(&own, &services, Some(hash));
            for _ in 0..3 {
                assert!(Arc::ptr_eq(&first, &choose(&own, &services, Some(hash))));
            }
            *seen.entry(first.service.clone()).or_default() += 1;
        }
        let canary = seen.get("canary").copied().unwrap_or(0);
        assert!((2_700..=3_300).contains(&canary), "{seen:?}");
        assert!(!seen.contains_key("dark"), "{seen:?}");
        // No key: a draw, as on any split.
        let drawn = (0..2_000)
            .map(|_| choose(&own, &services, None).service.clone())
            .filter(|s| s == "canary")
            .count();
        assert!((450..=750).contains(&drawn), "{drawn} of 2000");
    }

    #[test]
    fn a_table_without_hosts_does_not_need_one() {
        let table = RouteTable::new(&[route("a", "/a", &[])]);
        assert!(!table.by_host());
        assert_eq!(
            service_at(&table, Some("anything.example"), Method::GET, "/a").as_deref(),
            Some("a")
        );
    }

    #[test]
    fn a_prefix_is_split_off_by_segments_as_patterns_count_them() {
        assert_eq!(
            split_after_segments("/api/legacy/x/y", 2),
            ("/api/legacy", "/x/y")
        );
        assert_eq!(split_after_segments("/api/legacy", 2), ("/api/legacy", ""));
        assert_eq!(
            split_after_segments("/api/legacy/", 2),
            ("/api/legacy", "/")
        );
        assert_eq!(
            split_after_segments("//api//legacy//x", 2),
            ("//api//legacy", "//x")
        );
        assert_eq!(split_after_segments("/api", 2), ("/api", ""));
        assert_eq!(split_after_segments("/", 1), ("/", ""));
        assert_eq!(
            split_after_segments("/t/acme/orders", 2),
            ("/t/acme", "/orders")
        );
        assert_eq!(split_after_segments("/a/b", 0), ("", "/a/b"));
    }

    #[test]
    fn paths_are_routed_as_services_read_them() {
        for plain in ["/", "/api/items/1", "/a-b_c~d", "/caf\u{e9}"] {
            assert_eq!(routed_path(plain), Ok(None), "{plain}");
        }
        for (sent, routed) in [
            ("/%61dmin/x", Some("/admin/x")),
            ("/adm%69n", Some("/admin")),
            ("//admin", Some("/admin")),
            ("/a//b/", Some("/a/b/")),
            ("/a%20b", None),
            ("/a%3ab", Some("/a%3Ab")),
            ("/v1.2/x", None),
            ("/.well-known/jwks.json", None),
        ] {
            assert_eq!(routed_path(sent), Ok(routed.map(String::from)), "{sent}");
        }
        for refused in [
            "/a/../admin",
            "/a/%2e%2e/admin",
            "/admin%2Fx",
            "/x%2f..%2fadmin",
            "/x\\..\\admin",
            "/x%5Cadmin",
            "/a%00",
            "/a%zz",
            "/..",
            // Path parameters, which servlet containers drop before they
            // route: each of these is served as `/admin/users` there.
            "/public/..;/admin/users",
            "/admin;x/users",
            "/admin;/users",
            "/admin%3bx/users",
            "/admin%3B/users",
        ] {
            assert_eq!(routed_path(refused), Err(()), "{refused}");
        }
    }

    #[test]
    fn dot_segments_are_detected_plain_or_encoded() {
        assert!(has_dot_segment("/a/../b"));
        assert!(has_dot_segment("/a/./b"));
        assert!(has_dot_segment("/.."));
        assert!(has_dot_segment("/a/%2e%2E/b"));
        assert!(has_dot_segment("/a/.%2e"));
        assert!(!has_dot_segment("/a/..b/c"));
        assert!(!has_dot_segment("/a/.well-known"));
        assert!(!has_dot_segment("/"));
        assert!(has_dot_segment("/a/%2E"));
        assert!(has_dot_segment("/a/%2e."));
        assert!(!has_dot_segment("/a/..."));
        assert!(!has_dot_segment("/a/%2e%2e%2e"));
        assert!(!has_dot_segment("/a/%2"));
        assert!(!has_dot_segment("/a/%2f"));
        assert!(!has_dot_segment("/a/%%2e2e"));
        assert!(!has_dot_segment(""));
    }
}
