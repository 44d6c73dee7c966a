//! Turns the raw TOML into the typed model, collecting every problem rather
//! than stopping at the first, so one `flotilla check` shows them all.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use crate::diagnostic::{Diagnostic, did_you_mean};
use crate::raw::{
    RawAclRule, RawGateway, RawManifest, RawMesh, RawRoute, RawRun, RawScale, RawService,
};
use crate::{
    AclEffect, AclRule, Affinity, Auth, Data, Gateway, HeaderChanges, HeaderDirection, HostPattern,
    Manifest, Mesh, MeshMode, PLATFORM_NAMES, PathPattern, RateLimitKey, Route, Run, Scale,
    Service, Shape,
};

const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Kubernetes' default liveness probe gives up after three failures ten
/// seconds apart: about as long.
const DEFAULT_LIVENESS_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_DRAIN: Duration = Duration::from_secs(10);
const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// Shorter leaves would expire before instances (which poll their files
/// about once a second) could load the renewed ones.
const MIN_LEAF_LIFETIME: Duration = Duration::from_secs(5);
/// Longer leaves make a leaked key useful for too long.
const MAX_LEAF_LIFETIME: Duration = Duration::from_secs(365 * 24 * 60 * 60);
const DEFAULT_FUNCTION_MAX: u32 = 4;
const DEFAULT_FUNCTION_CONCURRENCY: u32 = 32;
const DEFAULT_FUNCTION_IDLE: Duration = Duration::from_secs(30);
const DEFAULT_TARGET_CONCURRENCY: u32 = 50;
/// More instances than this of one service on one machine is a typo, not a plan.
const MAX_INSTANCES: i64 = 64;
const MAX_CONCURRENCY: i64 = 100_000;
const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
/// Variables the runtime sets on every instance, besides `FLOTILLA_*`.
/// The OpenTelemetry pair is the runtime's too: it names the instance in
/// `OTEL_RESOURCE_ATTRIBUTES` (set after `env`, so a value here would be
/// silently lost), and `OTEL_SERVICE_NAME` must agree with it.
const RUNTIME_ENV: [&str; 4] = [
    "DATABASE_URL",
    "PORT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
];
/// Whether the runtime owns the environment variable `name`, so a
/// service's `env` cannot set it.
fn set_by_runtime(name: &str) -> bool {
    name.starts_with("FLOTILLA_") || RUNTIME_ENV.contains(&name)
}

/// Paths the gateway answers itself.
const RESERVED_PATHS: [&str; 1] = ["/healthz"];
const SECOND: Duration = Duration::from_secs(1);
const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// A request's `timeout`, the gateway's or a route's.
const TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_millis(1), DAY);
const TIMEOUT_RANGE_TEXT: &str = "1ms to 1d";
/// `ready_timeout` and `liveness_timeout`: an instance's probes answer
/// every 100 ms at best.
const PROBE_RANGE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(3600));
const PROBE_RANGE_TEXT: &str = "100ms to 1h";
/// `drain`: instances are told it in whole seconds (`FLOTILLA_DRAIN_SECONDS`)
/// and stopped when it ends, so less than a second would be a promise the
/// runtime breaks.
const DRAIN_RANGE: (Duration, Duration) = (SECOND, Duration::from_secs(3600));
const DRAIN_RANGE_TEXT: &str = "1s to 1h";
/// `idle` of `scale`.
const IDLE_RANGE: (Duration, Duration) = (Duration::from_millis(100), DAY);
const IDLE_RANGE_TEXT: &str = "100ms to 1d";

struct Ctx<'a> {
    file: &'a Path,
    source: &'a str,
    dir: PathBuf,
    /// The gateway's timeout, the default for routes that set none.
    route_timeout: Duration,
    /// The names of `[gateway.jwt]`'s issuers, if it is set, so routes may
    /// use `auth = "jwt"` and name them in `issuers`.
    jwt_names: Vec<String>,
    /// The consumers of `[gateway.api_keys]`, if it is set, so routes may
    /// use `auth = "key"` and name them.
    key_consumers: Option<BTreeSet<String>>,
    /// The header API keys come in, when `[gateway.api_keys]` is set.
    key_header: Option<String>,
    /// Whether `[gateway.tls] client_ca` is set, so routes may ask for
    /// `client_cert`.
    client_ca_configured: bool,
    /// Whether `[gateway.authz]` is set, so routes may ask for `authz`.
    authz_configured: bool,
    /// Whether `[gateway.compression]` is set, so `compress` means anything.
    compression_configured: bool,
    /// The parts of `[gateway]` that are written but invalid (their errors
    /// already reported). The route checks that lean on one are skipped:
    /// they could only repeat its error, or wrongly say it is missing.
    gateway_broken: BTreeSet<&'static str>,
    errors: Vec<Diagnostic>,
}

impl Ctx<'_> {
    /// Whether `[gateway]`'s `part` is written but invalid.
    fn broken(&self, part: &str) -> bool {
        self.gateway_broken.contains(part)
    }

    fn error(&mut self, span: Range<usize>, message: impl Into<String>, help: Option<String>) {
        self.errors.push(Diagnostic::at(
            self.file,
            self.source,
            Some(span),
            message,
            help,
        ));
    }

    fn duration(&mut self, value: &Spanned<String>, key: &str) -> Option<Duration> {
        self.duration_or_zero(value, key, false)
    }

    /// A duration from `min` to `max` (`range` says so in words; `"0s"`
    /// only when `min` is zero). Every duration the platform adds to a
    /// clock needs a bound: `"300000000000y"` parses, and overflowed the
    /// gateway's clock on every request of its route.
    fn duration_in(
        &mut self,
        value: &Spanned<String>,
        key: &str,
        (min, max): (Duration, Duration),
        range: &str,
    ) -> Option<Duration> {
        let d = self.duration_or_zero(value, key, min.is_zero())?;
        if !(min..=max).contains(&d) {
            self.error(
                value.span(),
                format!("`{key} = \"{}\"` is out of range", value.get_ref()),
                Some(format!("use a duration from {range}")),
            );
            return None;
        }
        Some(d)
    }

    /// Like [`Ctx::duration`], accepting `"0s"` when `zero_ok`.
    fn duration_or_zero(
        &mut self,
        value: &Spanned<String>,
        key: &str,
        zero_ok: bool,
    ) -> Option<Duration> {
        match humantime::parse_duration(value.get_ref()) {
            Ok(d) if d.is_zero() && !zero_ok => {
                self.error(
                    value.span(),
                    format!("`{key}` must be longer than zero"),
                    Some(format!("write a duration such as `{key} = \"30s\"`")),
                );
                None
            }
            Ok(d) => Some(d),
            Err(_) => {
                self.error(
                    value.span(),
                    format!("`{}` is not a duration", value.get_ref()),
                    Some(format!(
                        "write a number with a unit, such as `{key} = \"500ms\"`, `\"30s\"` or `\"2m\"`"
                    )),
                );
                None
            }
        }
    }

    fn count(&mut self, value: &Spanned<i64>, key: &str, min: i64, max: i64) -> Option<u32> {
        let v = *value.get_ref();
        if v < min || v > max {
            self.error(
                value.span(),
                format!("`{key} = {v}` is out of range"),
                Some(format!("use a whole number from {min} to {max}")),
            );
            return None;
        }
        u32::try_from(v).ok()
    }
}

pub(crate) fn parse(source: &str, file: &Path) -> Result<Manifest, Vec<Diagnostic>> {
    let dir = file
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let mut ctx = Ctx {
        file,
        source,
        dir,
        route_timeout: DEFAULT_TIMEOUT,
        jwt_names: Vec::new(),
        key_consumers: None,
        key_header: None,
        client_ca_configured: false,
        authz_configured: false,
        compression_configured: false,
        gateway_broken: BTreeSet::new(),
        errors: Vec::new(),
    };
    let raw: RawManifest = match toml::from_str(source) {
        Ok(raw) => raw,
        Err(e) => {
            let (message, help) = explain_toml_error(e.message());
            ctx.error(e.span().unwrap_or(0..0), message, help);
            return Err(ctx.errors);
        }
    };

    let name = raw.name.get_ref().clone();
    if let Err(why) = check_name(&name) {
        ctx.error(
            raw.name.span(),
            format!("system name `{name}` {why}"),
            Some("use lower-case letters, digits and `-`, starting with a letter, e.g. `name = \"shop\"`".into()),
        );
    }

    let declared_names: Vec<String> = raw.services.keys().map(|k| k.get_ref().clone()).collect();
    // What of the gateway is valid, even when some of it is not: routes
    // are checked against that (and `ctx.gateway_broken`), so one bad
    // section neither hides the others' errors nor invents route errors.
    let gateway = gateway(&mut ctx, raw.gateway.as_ref(), &declared_names);
    ctx.route_timeout = gateway.timeout;
    ctx.jwt_names = gateway.jwt.iter().map(|j| j.name.clone()).collect();
    ctx.key_consumers = gateway
        .api_keys
        .as_ref()
        .map(|k| k.consumers.keys().cloned().collect());
    ctx.key_header = gateway.api_keys.as_ref().map(|k| k.header.clone());
    ctx.client_ca_configured = gateway.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    ctx.authz_configured = gateway.authz.is_some();
    ctx.compression_configured = gateway.compression.is_some();

    let mesh = mesh(&mut ctx, raw.mesh.as_ref());
    let broker = events::broker(&mut ctx, raw.broker.as_ref(), &name);
    let event_names = events::Names::new(&raw);
    let declarations = events::declarations(&mut ctx, &raw, &event_names);

    let declared: Vec<String> = raw.services.keys().map(|k| k.get_ref().clone()).collect();
    // Who lists whom in `calls`, as written: ACL rules may only name callers.
    let mut callers_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (key, value) in &raw.services {
        for call in value.get_ref().calls.iter().flatten() {
            callers_of
                .entry(call.get_ref().clone())
                .or_default()
                .insert(key.get_ref().clone());
        }
    }
    let mut services = BTreeMap::new();
    for (key, value) in &raw.services {
        let name = key.get_ref();
        if let Err(why) = check_name(name) {
            ctx.error(
                key.span(),
                format!("service name `{name}` {why}"),
                Some("use lower-case letters, digits and `-`, starting with a letter, e.g. `[services.order-history]`".into()),
            );
            continue;
        }
        if PLATFORM_NAMES.contains(&name.as_str()) {
            ctx.error(
                key.span(),
                format!("service name `{name}` is reserved for the platform's own identity"),
                Some(format!(
                    "rename the service; {} are the platform's",
                    quote_list(&PLATFORM_NAMES)
                )),
            );
            continue;
        }
        let callers = callers_of.get(name).cloned().unwrap_or_default();
        if let Some(service) = service(&mut ctx, name, value, &declared, &callers, &event_names) {
            services.insert(name.clone(), service);
        }
    }
    if raw.services.is_empty() {
        ctx.error(
            raw.name.span(),
            "the system declares no services",
            Some("add one, e.g. `[services.hello]` with `run = { command = [\"python3\", \"app.py\"] }`".into()),
        );
    }

    check_route_conflicts(&mut ctx, &raw);

    match (ctx.errors.is_empty(), declarations) {
        (true, Some((topics, queues, streams))) => Ok(Manifest {
            name,
            file: file.to_path_buf(),
            dir: ctx.dir,
            gateway,
            mesh: mesh.unwrap_or_else(unreachable_mesh),
            services,
            broker: broker.unwrap_or_else(events::default_broker),
            topics,
            queues,
            streams,
        }),
        _ => Err(ctx.errors),
    }
}

/// Only reached when errors were recorded, in which case it is discarded.
fn unreachable_mesh() -> Mesh {
    Mesh {
        mode: MeshMode::Enforce,
        leaf_lifetime: DEFAULT_LEAF_LIFETIME,
    }
}

fn mesh(ctx: &mut Ctx<'_>, raw: Option<&Spanned<RawMesh>>) -> Option<Mesh> {
    let mut mesh = Mesh {
        mode: MeshMode::Enforce,
        leaf_lifetime: DEFAULT_LEAF_LIFETIME,
    };
    let Some(raw) = raw else { return Some(mesh) };
    let raw = raw.get_ref();
    if let Some(mode) = &raw.mode {
        mesh.mode = match mode.get_ref().as_str() {
            "enforce" => MeshMode::Enforce,
            "audit" => MeshMode::Audit,
            other => {
                let help = match did_you_mean(other, ["enforce", "audit"]) {
                    Some(s) => format!("did you mean `mode = \"{s}\"`?"),
                    None => "write `mode = \"enforce\"` (deny calls no rule allows) or `mode = \"audit\"` (log them and let them through)".into(),
                };
                ctx.error(
                    mode.span(),
                    format!("unknown mesh mode `{other}`"),
                    Some(help),
                );
                return None;
            }
        };
    }
    if let Some(lifetime) = &raw.leaf_lifetime {
        let d = ctx.duration(lifetime, "leaf_lifetime")?;
        if !(MIN_LEAF_LIFETIME..=MAX_LEAF_LIFETIME).contains(&d) {
            ctx.error(
                lifetime.span(),
                format!(
                    "`leaf_lifetime = \"{}\"` is out of range",
                    lifetime.get_ref()
                ),
                Some("use a duration from 5s to 365d; the default is \"24h\"".into()),
            );
            return None;
        }
        mesh.leaf_lifetime = d;
    }
    Some(mesh)
}

fn check_name(name: &str) -> Result<(), &'static str> {
    let mut chars = name.chars();
    match chars.next() {
        None => return Err("is empty"),
        Some(c) if !c.is_ascii_lowercase() => return Err("must start with a lower-case letter"),
        _ => {}
    }
    if name.len() > 40 {
        return Err("is longer than 40 characters");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err("may contain only lower-case letters, digits and `-`");
    }
    if name.ends_with('-') {
        return Err("must not end with `-`");
    }
    Ok(())
}

/// Rewrites serde's wording into ours, adding a suggestion for unknown keys.
fn explain_toml_error(message: &str) -> (String, Option<String>) {
    let message = message.trim();
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((field, expected)) = rest.split_once('`')
    {
        let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        let help = match did_you_mean(field, candidates.iter().copied()) {
            Some(s) => format!("did you mean `{s}`?"),
            None if candidates.is_empty() => {
                "nothing can be set here yet; leave the table empty".into()
            }
            None => format!("the keys allowed here are {}", quote_list(&candidates)),
        };
        return (format!("unknown key `{field}`"), Some(help));
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or(rest);
        let help = match field {
            "name" => "add `name = \"my-system\"` at the top of the file".to_string(),
            "path" => "each route needs a path, e.g. `{ path = \"/api/things/**\" }`".to_string(),
            other => format!("add `{other} = ...`"),
        };
        return (format!("missing key `{field}`"), Some(help));
    }
    if message.starts_with("invalid type") {
        return (
            message.to_string(),
            Some("check the value's type against docs/manifest.md".into()),
        );
    }
    (message.to_string(), None)
}

fn quote_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `[gateway]`, each section checked on its own so that every problem is
/// reported at once. What is invalid keeps its default here and is named
/// in `ctx.gateway_broken`; the errors make the manifest fail anyway.
fn gateway(ctx: &mut Ctx<'_>, raw: Option<&Spanned<RawGateway>>, declared: &[String]) -> Gateway {
    let mut gw = Gateway {
        listen: DEFAULT_LISTEN,
        static_dir: None,
        timeout: DEFAULT_TIMEOUT,
        jwt: Vec::new(),
        cors: None,
        ip: None,
        rate_limits: Default::default(),
        tls: None,
        limits: Default::default(),
        retries: Default::default(),
        outlier_detection: Default::default(),
        request_headers: Default::default(),
        response_headers: Default::default(),
        compression: None,
        cache: Default::default(),
        api_keys: None,
        authz: None,
    };
    let Some(raw) = raw else { return gw };
    let raw = raw.get_ref();
    // Stores a section's value, or notes that it is broken.
    fn take<T>(ctx: &mut Ctx<'_>, part: &'static str, value: Option<T>, into: &mut T) {
        match value {
            Some(v) => *into = v,
            None => {
                ctx.gateway_broken.insert(part);
            }
        }
    }
    if let Some(listen) = &raw.listen {
        match listen.get_ref().parse::<SocketAddr>() {
            Ok(addr) => gw.listen = addr,
            Err(_) => {
                ctx.gateway_broken.insert("listen");
                ctx.error(
                    listen.span(),
                    format!("`{}` is not a socket address", listen.get_ref()),
                    Some("write an IP address and a port, e.g. `listen = \"127.0.0.1:8080\"` or `\"[::1]:8080\"`; port 0 picks a free one".into()),
                );
            }
        }
    }
    if let Some(dir) = &raw.static_dir {
        let path = ctx.dir.join(dir.get_ref());
        // The manifest's directory holds the manifest and, by default, the
        // system's data directory (`.flotilla`: its CA's private keys, the
        // control token, the databases); served as files they would be
        // anyone's. (The gateway never serves dot-files either.)
        let here = if ctx.dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            ctx.dir.as_path()
        };
        let holds_manifest = match (path.canonicalize(), here.canonicalize()) {
            (Ok(served), Ok(here)) => here.starts_with(served),
            _ => false,
        };
        if holds_manifest {
            ctx.error(
                dir.span(),
                format!(
                    "static directory `{}` holds the manifest's own directory, with the manifest and the system's data (its CA keys and control token)",
                    dir.get_ref()
                ),
                Some("give the files a directory of their own below the manifest's, e.g. `static = \"web\"`".into()),
            );
        } else if path.is_dir() {
            gw.static_dir = Some(path);
        } else {
            ctx.error(
                dir.span(),
                format!("static directory `{}` does not exist", path.display()),
                Some("give a directory relative to the manifest, e.g. `static = \"web\"`".into()),
            );
        }
    }
    if let Some(t) = &raw.timeout {
        let v = ctx.duration_in(t, "timeout", TIMEOUT_RANGE, TIMEOUT_RANGE_TEXT);
        take(ctx, "timeout", v, &mut gw.timeout);
    }
    if let Some(j) = &raw.jwt {
        let v = edge::jwts(ctx, j, declared);
        take(ctx, "jwt", v, &mut gw.jwt);
    }
    if let Some(c) = &raw.cors {
        let v = edge::cors(ctx, c).map(Some);
        take(ctx, "cors", v, &mut gw.cors);
    }
    if let Some(i) = &raw.ip {
        let v = edge::ip(ctx, i, false).map(Some);
        take(ctx, "ip", v, &mut gw.ip);
    }
    if let Some(r) = &raw.rate_limits {
        let v = edge::rate_limit_store(ctx, r);
        take(ctx, "rate_limits", v, &mut gw.rate_limits);
    }
    if let Some(l) = &raw.limits {
        let v = limits::limits(ctx, l);
        take(ctx, "limits", v, &mut gw.limits);
    }
    if let Some(r) = &raw.retries {
        let v = limits::retries(ctx, r);
        take(ctx, "retries", v, &mut gw.retries);
    }
    if let Some(o) = &raw.outlier_detection {
        let v = limits::outlier_detection(ctx, o);
        take(ctx, "outlier_detection", v, &mut gw.outlier_detection);
    }
    if let Some(h) = &raw.request_headers {
        let v = edge::header_changes(ctx, h, HeaderDirection::Request);
        take(ctx, "request_headers", v, &mut gw.request_headers);
    }
    if let Some(h) = &raw.response_headers {
        let v = edge::header_changes(ctx, h, HeaderDirection::Response);
        take(ctx, "response_headers", v, &mut gw.response_headers);
    }
    if let Some(c) = &raw.compression {
        let v = edge::compression(ctx, c).map(Some);
        take(ctx, "compression", v, &mut gw.compression);
    }
    if let Some(c) = &raw.cache {
        let v = edge::cache_store(ctx, c);
        take(ctx, "cache", v, &mut gw.cache);
    }
    if let Some(k) = &raw.api_keys {
        let v = edge::api_keys(ctx, k).map(Some);
        take(ctx, "api_keys", v, &mut gw.api_keys);
    }
    if let Some(a) = &raw.authz {
        // With broken keys their header is unknown, and not checked against.
        let key_header = gw.api_keys.as_ref().map(|k| k.header.as_str());
        let v = edge::authz(ctx, a, declared, key_header).map(Some);
        take(ctx, "authz", v, &mut gw.authz);
    }
    if let Some(t) = &raw.tls {
        let v = edge::tls(ctx, t);
        // Against a `listen` that is not valid there is nothing to compare.
        let clash = v.as_ref().is_some_and(|tls| {
            !ctx.broken("listen")
                && tls
                    .http_redirect
                    .is_some_and(|r| crate::same_socket(r, gw.listen))
        });
        if clash {
            ctx.error(
                t.span(),
                format!("`http_redirect` takes `listen`'s own port ({})", gw.listen),
                Some("give the plain-HTTP listener another port, e.g. `http_redirect = \"0.0.0.0:80\"` beside `listen = \"0.0.0.0:443\"`".into()),
            );
        }
        let v = v.filter(|_| !clash).map(Some);
        take(ctx, "tls", v, &mut gw.tls);
    }
    gw
}

fn service(
    ctx: &mut Ctx<'_>,
    name: &str,
    raw: &Spanned<RawService>,
    declared: &[String],
    callers: &BTreeSet<String>,
    event_names: &events::Names,
) -> Option<Service> {
    let span = raw.span();
    let raw = raw.get_ref();
    let before = ctx.errors.len();

    let shape = match &raw.shape {
        None => Shape::Service,
        Some(s) => match s.get_ref().as_str() {
            "service" => Shape::Service,
            "function" => Shape::Function,
            other => {
                let help = match did_you_mean(other, ["service", "function"]) {
                    Some(s) => format!("did you mean `shape = \"{s}\"`?"),
                    None => "write `shape = \"service\"` (long-running replicas) or `shape = \"function\"` (scales from zero)".into(),
                };
                ctx.error(s.span(), format!("unknown shape `{other}`"), Some(help));
                Shape::Service
            }
        },
    };

    let run = match &raw.run {
        Some(r) => run(ctx, r),
        None => {
            ctx.error(
                span.clone(),
                format!("service `{name}` has no `run`"),
                Some("say how to start it: `run = { cargo = \"my-package\" }` or `run = { command = [\"python3\", \"app.py\"] }`".into()),
            );
            None
        }
    };

    let scale = scale(ctx, shape, raw.replicas.as_ref(), raw.scale.as_ref());

    let data = match &raw.data {
        None => Data::None,
        Some(d) => match d.get_ref().as_str() {
            "sqlite" => Data::Sqlite,
            "none" => Data::None,
            other => {
                let help = match did_you_mean(other, ["sqlite", "none"]) {
                    Some(s) => format!("did you mean `data = \"{s}\"`?"),
                    None => "write `data = \"sqlite\"` for a database of the service's own, or leave `data` out".into(),
                };
                ctx.error(d.span(), format!("unknown data kind `{other}`"), Some(help));
                Data::None
            }
        },
    };

    let mut calls = Vec::new();
    for call in raw.calls.iter().flatten() {
        let callee = call.get_ref();
        if callee == name {
            ctx.error(
                call.span(),
                format!("service `{name}` lists itself in `calls`"),
                Some("a service can always reach itself; remove it".into()),
            );
        } else if !declared.contains(callee) {
            let help = match did_you_mean(callee, declared.iter().map(String::as_str)) {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!(
                    "declare `[services.{callee}]`, or call one of {}",
                    quote_list(&declared.iter().map(String::as_str).collect::<Vec<_>>())
                ),
            };
            ctx.error(
                call.span(),
                format!("`{name}` calls `{callee}`, which is not a service of this system"),
                Some(help),
            );
        } else if calls.contains(callee) {
            ctx.error(
                call.span(),
                format!("`{callee}` is listed twice in `calls`"),
                Some("remove one".into()),
            );
        } else {
            calls.push(callee.clone());
        }
    }

    let mut routes = Vec::new();
    for r in raw.routes.iter().flatten() {
        if let Some(route) = route(ctx, r, name, declared) {
            routes.push(route);
        }
    }

    let mut acl = Vec::new();
    for r in raw.acl.iter().flatten() {
        if let Some(rule) = acl_rule(ctx, name, r, declared, callers) {
            acl.push(rule);
        }
    }

    let mut env = BTreeMap::new();
    for (k, v) in raw.env.iter().flatten() {
        let key = k.get_ref();
        let valid = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            ctx.error(
                k.span(),
                format!("`{key}` is not a valid environment variable name"),
                Some("use letters, digits and `_`, not starting with a digit".into()),
            );
        } else if set_by_runtime(key) {
            ctx.error(
                k.span(),
                format!("`{key}` is set by the runtime and cannot be overridden"),
                Some(
                    "pick another name; docs/runtime-contract.md lists the runtime's variables"
                        .into(),
                ),
            );
        } else {
            env.insert(key.clone(), v.get_ref().clone());
        }
    }

    let ready_timeout = raw
        .ready_timeout
        .as_ref()
        .and_then(|t| ctx.duration_in(t, "ready_timeout", PROBE_RANGE, PROBE_RANGE_TEXT))
        .unwrap_or(DEFAULT_READY_TIMEOUT);
    let liveness_timeout = raw
        .liveness_timeout
        .as_ref()
        .and_then(|t| ctx.duration_in(t, "liveness_timeout", PROBE_RANGE, PROBE_RANGE_TEXT))
        .unwrap_or(DEFAULT_LIVENESS_TIMEOUT);
    let drain = raw
        .drain
        .as_ref()
        .and_then(|t| ctx.duration_in(t, "drain", DRAIN_RANGE, DRAIN_RANGE_TEXT))
        .unwrap_or(DEFAULT_DRAIN);

    let publishes = events::publishes(ctx, name, raw.publishes.as_ref(), event_names);
    let consumes = events::consumes(ctx, name, raw.consumes.as_ref(), event_names);

    if ctx.errors.len() != before {
        return None;
    }
    Some(Service {
        name: name.to_string(),
        shape,
        run: run?,
        scale: scale?,
        data,
        calls,
        routes,
        acl,
        env,
        ready_timeout,
        liveness_timeout,
        drain,
        publishes,
        consumes,
    })
}

fn run(ctx: &mut Ctx<'_>, raw: &Spanned<RawRun>) -> Option<Run> {
    let span = raw.span();
    let raw = raw.get_ref();
    match (&raw.cargo, &raw.command) {
        (Some(_), Some(command)) => {
            ctx.error(
                command.span(),
                "`run` has both `cargo` and `command`",
                Some(
                    "keep one: `cargo` builds a workspace package, `command` runs anything".into(),
                ),
            );
            None
        }
        (None, None) => {
            ctx.error(
                span,
                "`run` names neither `cargo` nor `command`",
                Some("write `run = { cargo = \"my-package\" }` or `run = { command = [\"python3\", \"app.py\"] }`".into()),
            );
            None
        }
        (Some(package), None) => {
            if let Some(dir) = &raw.dir {
                ctx.error(
                    dir.span(),
                    "`dir` applies to `command` only",
                    Some("remove it: cargo packages run from the manifest's directory".into()),
                );
                return None;
            }
            let valid = |s: &str| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            };
            if !valid(package.get_ref()) {
                ctx.error(
                    package.span(),
                    format!("`{}` is not a cargo package name", package.get_ref()),
                    Some("use the `name` from the package's Cargo.toml".into()),
                );
                return None;
            }
            let bin = raw.bin.as_ref().map(|b| b.get_ref().clone());
            Some(Run::Cargo {
                package: package.get_ref().clone(),
                bin,
            })
        }
        (None, Some(command)) => {
            if let Some(bin) = &raw.bin {
                ctx.error(
                    bin.span(),
                    "`bin` applies to `cargo` only",
                    Some(
                        "remove it, or run the program with `command = [\"path/to/program\"]`"
                            .into(),
                    ),
                );
                return None;
            }
            let argv = command.get_ref();
            if argv.first().is_none_or(|a| a.trim().is_empty()) {
                ctx.error(
                    command.span(),
                    "`command` is empty",
                    Some("give the program and its arguments, e.g. `command = [\"python3\", \"app.py\"]`".into()),
                );
                return None;
            }
            let dir = match &raw.dir {
                None => ctx.dir.clone(),
                Some(d) => {
                    let path = ctx.dir.join(d.get_ref());
                    if !path.is_dir() {
                        ctx.error(
                            d.span(),
                            format!("directory `{}` does not exist", path.display()),
                            Some("give a directory relative to the manifest".into()),
                        );
                        return None;
                    }
                    path
                }
            };
            Some(Run::Command {
                argv: argv.clone(),
                dir,
            })
        }
    }
}

fn scale(
    ctx: &mut Ctx<'_>,
    shape: Shape,
    replicas: Option<&Spanned<i64>>,
    raw: Option<&Spanned<RawScale>>,
) -> Option<Scale> {
    if let (Some(r), Some(_)) = (replicas, raw) {
        ctx.error(
            r.span(),
            "`replicas` and `scale` both set the number of instances",
            Some("keep `replicas = N` for a fixed count, or `scale = { min = .., max = .. }` to autoscale".into()),
        );
        return None;
    }
    match shape {
        Shape::Function => {
            if let Some(r) = replicas {
                ctx.error(
                    r.span(),
                    "a function has no fixed `replicas`: it scales from zero on demand",
                    Some("write `scale = { max = 4, concurrency = 32, idle = \"30s\" }`, or use `shape = \"service\"`".into()),
                );
                return None;
            }
            let mut s = Scale {
                min: 0,
                max: DEFAULT_FUNCTION_MAX,
                concurrency: DEFAULT_FUNCTION_CONCURRENCY,
                idle: DEFAULT_FUNCTION_IDLE,
            };
            let Some(raw) = raw else { return Some(s) };
            let raw = raw.get_ref();
            for (value, key) in [
                (&raw.min, "min"),
                (&raw.target_concurrency, "target_concurrency"),
            ] {
                if let Some(v) = value {
                    ctx.error(
                        v.span(),
                        format!("`{key}` does not apply to a function"),
                        Some(
                            "a function scales from zero: use `max`, `concurrency` and `idle`"
                                .into(),
                        ),
                    );
                    return None;
                }
            }
            if let Some(m) = &raw.max {
                s.max = ctx.count(m, "max", 1, MAX_INSTANCES)?;
            }
            if let Some(c) = &raw.concurrency {
                s.concurrency = ctx.count(c, "concurrency", 1, MAX_CONCURRENCY)?;
            }
            if let Some(i) = &raw.idle {
                s.idle = ctx.duration_in(i, "idle", IDLE_RANGE, IDLE_RANGE_TEXT)?;
            }
            Some(s)
        }
        Shape::Service => {
            if let Some(r) = replicas {
                let n = ctx.count(r, "replicas", 1, MAX_INSTANCES)?;
                return Some(Scale {
                    min: n,
                    max: n,
                    concurrency: DEFAULT_TARGET_CONCURRENCY,
                    idle: DEFAULT_FUNCTION_IDLE,
                });
            }
            let mut s = Scale {
                min: 1,
                max: 1,
                concurrency: DEFAULT_TARGET_CONCURRENCY,
                idle: DEFAULT_FUNCTION_IDLE,
            };
            let Some(raw_spanned) = raw else {
                return Some(s);
            };
            let raw = raw_spanned.get_ref();
            if let Some(c) = &raw.concurrency {
                ctx.error(
                    c.span(),
                    "`concurrency` is the per-instance limit of a function",
                    Some("for a service write `target_concurrency`".into()),
                );
                return None;
            }
            if let Some(m) = &raw.min {
                s.min = ctx.count(m, "min", 1, MAX_INSTANCES)?;
            }
            s.max = s.min;
            if let Some(m) = &raw.max {
                s.max = ctx.count(m, "max", 1, MAX_INSTANCES)?;
            }
            if s.max < s.min {
                ctx.error(
                    raw_spanned.span(),
                    format!("`max = {}` is below `min = {}`", s.max, s.min),
                    Some("raise `max` or lower `min`".into()),
                );
                return None;
            }
            if let Some(c) = &raw.target_concurrency {
                s.concurrency = ctx.count(c, "target_concurrency", 1, MAX_CONCURRENCY)?;
            }
            if let Some(i) = &raw.idle {
                s.idle = ctx.duration_in(i, "idle", IDLE_RANGE, IDLE_RANGE_TEXT)?;
            }
            Some(s)
        }
    }
}

fn route(
    ctx: &mut Ctx<'_>,
    raw: &Spanned<RawRoute>,
    service: &str,
    declared: &[String],
) -> Option<Route> {
    let raw = raw.get_ref();
    let pattern = match PathPattern::parse(raw.path.get_ref()) {
        Ok(p) => p,
        Err(e) => {
            ctx.error(
                raw.path.span(),
                format!("invalid route path `{}`: {e}", raw.path.get_ref()),
                Some(
                    "write e.g. `path = \"/api/orders/**\"` (`*` is one segment, `**` the rest)"
                        .into(),
                ),
            );
            return None;
        }
    };
    if RESERVED_PATHS
        .iter()
        .filter_map(|r| PathPattern::parse(r).ok())
        .any(|r| pattern.same_as(&r))
    {
        ctx.error(
            raw.path.span(),
            format!("`{}` is answered by the gateway itself", raw.path.get_ref()),
            Some("choose another path".into()),
        );
        return None;
    }
    let methods = methods(ctx, raw.methods.as_ref(), &raw.path, "route unreachable")?;
    let hosts = match &raw.hosts {
        Some(h) => hosts(ctx, h)?,
        None => Vec::new(),
    };
    let strip_prefix = match &raw.strip_prefix {
        Some(prefix) => Some(strip_prefix(ctx, prefix, &pattern)?),
        None => None,
    };
    let split = match &raw.split {
        Some(s) => shares(ctx, s, service, declared, "split")?,
        None => BTreeMap::new(),
    };
    let mirror = match &raw.mirror {
        Some(m) => shares(ctx, m, service, declared, "mirror")?,
        None => BTreeMap::new(),
    };
    let retries = match &raw.retries {
        Some(r) => Some(ctx.count(r, "retries", 0, 10)?),
        None => None,
    };
    let cache = match &raw.cache {
        Some(c) => Some(edge::route_cache(ctx, c, &methods)?),
        None => None,
    };
    // A broken `[gateway] jwt` or `[gateway.api_keys]` has had its error:
    // the route is checked as if it were there, but not against its names.
    let jwt_written = !ctx.jwt_names.is_empty() || ctx.broken("jwt");
    let auth = match &raw.auth {
        None => Auth::Public,
        Some(a) => match a.get_ref().as_str() {
            "public" => Auth::Public,
            "jwt" if jwt_written => Auth::Jwt {
                scopes: raw
                    .scopes
                    .iter()
                    .flat_map(|s| s.get_ref())
                    .map(|s| s.get_ref().clone())
                    .collect(),
                claims: match &raw.claims {
                    Some(c) => edge::claims(ctx, c)?,
                    None => BTreeMap::new(),
                },
            },
            "optional" if jwt_written => Auth::Optional,
            "key" if ctx.key_consumers.is_some() || ctx.broken("api_keys") => {
                let known = ctx.key_consumers.clone();
                Auth::Key {
                    consumers: edge::route_consumers(ctx, raw.consumers.as_ref(), known.as_ref())?,
                }
            }
            "key" => {
                ctx.error(
                    a.span(),
                    "`auth = \"key\"` needs `[gateway.api_keys]`: the gateway has no keys to check",
                    Some(
                        "add `[gateway.api_keys]` with `consumers = { partner = [\"sha256:…\"] }`"
                            .into(),
                    ),
                );
                return None;
            }
            which @ ("jwt" | "optional") => {
                ctx.error(
                    a.span(),
                    format!("`auth = \"{which}\"` needs `[gateway.jwt]`: the gateway has no issuer to verify tokens against"),
                    Some("add `jwt = { issuer = \"…\", audiences = [\"…\"], jwks = \"accounts:/.well-known/jwks.json\" }` under `[gateway]`".into()),
                );
                return None;
            }
            other => {
                ctx.error(
                    a.span(),
                    format!("unknown auth `{other}`"),
                    Some(
                        "write `auth = \"public\"`, `auth = \"optional\"`, `auth = \"jwt\"` or `auth = \"key\"`"
                            .into(),
                    ),
                );
                return None;
            }
        },
    };
    let jwt_route = matches!(auth, Auth::Jwt { .. });
    // Written at all, even empty (`consumers = []`), they belong to a
    // route of that kind: elsewhere they would be ignored without a word.
    if !matches!(auth, Auth::Key { .. })
        && let Some(consumers) = &raw.consumers
    {
        ctx.error(
            consumers.span(),
            "`consumers` need `auth = \"key\"`",
            Some("add `auth = \"key\"` to the route, or remove `consumers`".into()),
        );
        return None;
    }
    // What only a token can carry: the first of these written on a route
    // without `auth = "jwt"`.
    let needs_jwt = [
        ("scopes", raw.scopes.as_ref().map(|s| s.span())),
        ("claims", raw.claims.as_ref().map(|c| c.span())),
    ];
    if !jwt_route && let Some((key, span)) = needs_jwt.into_iter().find_map(|(k, s)| Some((k, s?)))
    {
        ctx.error(
            span,
            format!("`{key}` need `auth = \"jwt\"`"),
            Some(format!(
                "add `auth = \"jwt\"` to the route, or remove `{key}`"
            )),
        );
        return None;
    }
    let issuers = match &raw.issuers {
        Some(names) if jwt_route || auth == Auth::Optional => {
            if ctx.broken("jwt") {
                Vec::new()
            } else {
                let known = ctx.jwt_names.clone();
                edge::route_issuers(ctx, names, &known)?
            }
        }
        Some(names) => {
            ctx.error(
                names.span(),
                "`issuers` need `auth = \"jwt\"` or `\"optional\"`",
                Some("add `auth = \"jwt\"` to the route, or remove `issuers`".into()),
            );
            return None;
        }
        None => Vec::new(),
    };
    // `per user` needs a user: one every request has, or, on an optional
    // route, one some have (the others are limited by their address).
    let has_user = jwt_route || auth == Auth::Optional || matches!(auth, Auth::Key { .. });
    let rate_limits = match &raw.rate_limit {
        Some(r) => edge::rate_limits(ctx, r, has_user)?,
        None => Vec::new(),
    };
    // The gateway takes the API-key header off every request before the
    // limits count (it checks it on a key route, and keeps it from the
    // service on any other): a limit on that header would find none and
    // count every request by its address instead.
    let key_route = matches!(auth, Auth::Key { .. });
    let instead = |key_route: bool| -> String {
        if key_route {
            "count `per user`: on such a route it counts each key's consumer".into()
        } else {
            "make the route `auth = \"key\"` and count `per user`, or count `per ip`".into()
        }
    };
    if let (Some(header), Some(r)) = (&ctx.key_header, &raw.rate_limit)
        && rate_limits
            .iter()
            .any(|l| matches!(&l.key, RateLimitKey::Header(h) if h == header))
    {
        ctx.error(
            r.span(),
            format!(
                "`per header:{header}` cannot count by the API-key header: the gateway takes it off every request before the limits count"
            ),
            Some(instead(key_route)),
        );
        return None;
    }
    let affinity = match &raw.affinity {
        Some(a) => Some(edge::affinity(ctx, a, has_user)?),
        None => None,
    };
    // Likewise for the instance a key's requests are kept on.
    if let (Some(header), Some(Affinity::Header(h)), Some(a)) =
        (&ctx.key_header, &affinity, &raw.affinity)
        && h == header
    {
        ctx.error(
            a.span(),
            format!("`affinity = \"header:{header}\"` cannot keep an API key on one instance: the gateway takes the API-key header off every request first"),
            Some(if key_route {
                "use `affinity = \"user\"`: on such a route it keeps each key's consumer on one instance".into()
            } else {
                "make the route `auth = \"key\"` and use `affinity = \"user\"`, or use `affinity = \"ip\"`".into()
            }),
        );
        return None;
    }
    let cors = match &raw.cors {
        Some(c) => Some(edge::cors(ctx, c)?),
        None => None,
    };
    let request_headers = match &raw.request_headers {
        Some(h) => edge::header_changes(ctx, h, HeaderDirection::Request)?,
        None => HeaderChanges::default(),
    };
    let response_headers = match &raw.response_headers {
        Some(h) => edge::header_changes(ctx, h, HeaderDirection::Response)?,
        None => HeaderChanges::default(),
    };
    let ip = match &raw.ip {
        Some(i) => Some(edge::ip(ctx, i, true)?),
        None => None,
    };
    let max_body_bytes = match &raw.max_body_bytes {
        Some(m) => Some(edge::max_body(ctx, m)?),
        None => None,
    };
    let match_headers = match &raw.match_headers {
        Some(h) => edge::match_headers(ctx, h)?,
        None => BTreeMap::new(),
    };
    let max_in_flight = match &raw.max_in_flight {
        Some(m) => Some(edge::route_max_in_flight(ctx, m)?),
        None => None,
    };
    let timeout = match &raw.timeout {
        Some(t) => ctx.duration_in(t, "timeout", TIMEOUT_RANGE, TIMEOUT_RANGE_TEXT)?,
        None => ctx.route_timeout,
    };
    let try_timeout = match &raw.try_timeout {
        Some(t) => {
            let try_timeout = ctx.duration(t, "try_timeout")?;
            // Not against the gateway's `timeout` when that is invalid.
            let known = raw.timeout.is_some() || !ctx.broken("timeout");
            if known && try_timeout >= timeout {
                ctx.error(
                    t.span(),
                    format!(
                        "`try_timeout` ({}) must be shorter than the route's `timeout` ({}), which every attempt shares",
                        humantime::format_duration(try_timeout),
                        humantime::format_duration(timeout)
                    ),
                    Some("lower `try_timeout`, or raise the route's `timeout` to leave room for a retry".into()),
                );
                return None;
            }
            Some(try_timeout)
        }
        None => None,
    };
    let client_cert = raw.client_cert.as_ref().is_some_and(|c| *c.get_ref());
    if client_cert && !ctx.client_ca_configured && !ctx.broken("tls") {
        let span = raw
            .client_cert
            .as_ref()
            .map(|c| c.span())
            .unwrap_or_default();
        ctx.error(
            span,
            "`client_cert = true` needs `[gateway.tls] client_ca`: the gateway has no CA to verify client certificates against",
            Some("add `client_ca = \"certs/clients-ca.pem\"` under `[gateway.tls]`".into()),
        );
        return None;
    }
    let authz = raw.authz.as_ref().is_some_and(|a| *a.get_ref());
    if authz && !ctx.authz_configured && !ctx.broken("authz") {
        let span = raw.authz.as_ref().map(|a| a.span()).unwrap_or_default();
        ctx.error(
            span,
            "`authz = true` needs `[gateway.authz]`: the gateway has no service to ask",
            Some("add `[gateway.authz]` with `service = \"<the service that decides>\"`".into()),
        );
        return None;
    }
    if let Some(c) = &raw.compress
        && !ctx.compression_configured
        && !ctx.broken("compression")
    {
        ctx.error(
            c.span(),
            "`compress` needs `[gateway.compression]`: without it nothing is compressed",
            Some("add `[gateway.compression]` to gzip responses, or leave `compress` out".into()),
        );
        return None;
    }
    let compress = raw.compress.as_ref().is_none_or(|c| *c.get_ref());
    Some(Route {
        pattern,
        hosts,
        strip_prefix,
        split,
        mirror,
        retries,
        cache,
        methods,
        auth,
        issuers,
        timeout,
        try_timeout,
        rate_limits,
        affinity,
        cors,
        request_headers,
        response_headers,
        ip,
        match_headers,
        max_body_bytes,
        max_in_flight,
        client_cert,
        authz,
        compress,
    })
}

/// A route's `split` or `mirror` (`key`): other services of this system,
/// each with a whole percentage; a split's add up to 100 at most (the
/// route's own service takes the rest), a mirror's each stand alone.
fn shares(
    ctx: &mut Ctx<'_>,
    raw: &Spanned<BTreeMap<String, Spanned<i64>>>,
    service: &str,
    declared: &[String],
    key: &str,
) -> Option<BTreeMap<String, u32>> {
    let mut split = BTreeMap::new();
    let mut ok = true;
    for (other, percent) in raw.get_ref() {
        if other == service {
            ctx.error(
                percent.span(),
                format!("`{key}` names `{service}`, the route's own service"),
                Some(if key == "split" {
                    "it takes what the others leave: list only the other services".into()
                } else {
                    "it gets every request already: list only the other services".into()
                }),
            );
            ok = false;
        } else if !declared.contains(other) {
            let help = match did_you_mean(other, declared.iter().map(String::as_str)) {
                Some(near) => format!("did you mean `{near}`?"),
                None => format!("a {key} sends requests to another service of this system"),
            };
            ctx.error(
                percent.span(),
                format!("`{key}` names `{other}`, which is not a service of this system"),
                Some(help),
            );
            ok = false;
        } else {
            match u32::try_from(*percent.get_ref()) {
                Ok(p) if p <= 100 => {
                    split.insert(other.clone(), p);
                }
                _ => {
                    ctx.error(
                        percent.span(),
                        format!(
                            "`{other}` gets {}%: a share is a whole percentage from 0 to 100",
                            percent.get_ref()
                        ),
                        None,
                    );
                    ok = false;
                }
            }
        }
    }
    let total: u32 = split.values().sum();
    if ok && key == "split" && total > 100 {
        ctx.error(
            raw.span(),
            format!("`split` gives away {total}% of the route's requests: at most 100"),
            Some("lower the shares; the route's own service takes what they leave".into()),
        );
        ok = false;
    }
    ok.then_some(split)
}

/// A route's `strip_prefix`: leading segments of its `path`, written as
/// they are there, so every path the route matches starts with them.
fn strip_prefix(
    ctx: &mut Ctx<'_>,
    raw: &Spanned<String>,
    path: &PathPattern,
) -> Option<PathPattern> {
    let help = || {
        let first = path.as_str().split('/').nth(1).unwrap_or("api");
        Some(format!(
            "write the path's first segments as the path has them, e.g. `strip_prefix = \"/{first}\"` for `path = \"{}\"`",
            path.as_str()
        ))
    };
    match PathPattern::parse(raw.get_ref()) {
        Ok(prefix) if prefix.segment_count() == 0 => {
            ctx.error(
                raw.span(),
                "`strip_prefix = \"/\"` strips nothing",
                Some("leave `strip_prefix` out, or name segments to strip".into()),
            );
            None
        }
        Ok(prefix) if path.starts_with(&prefix) => Some(prefix),
        Ok(prefix) => {
            ctx.error(
                raw.span(),
                format!(
                    "`strip_prefix = \"{prefix}\"` is not how the route's path `{}` starts (no `**` either): only what every matching path starts with can be stripped",
                    path.as_str()
                ),
                help(),
            );
            None
        }
        Err(e) => {
            ctx.error(
                raw.span(),
                format!("invalid `strip_prefix` `{}`: {e}", raw.get_ref()),
                help(),
            );
            None
        }
    }
}

/// A route's `hosts`: valid, distinct names or wildcards; `hosts = []` is
/// an error (it would match no request), as `methods = []` is.
fn hosts(ctx: &mut Ctx<'_>, raw: &Spanned<Vec<Spanned<String>>>) -> Option<Vec<HostPattern>> {
    if raw.get_ref().is_empty() {
        ctx.error(
            raw.span(),
            "`hosts = []` matches no request: the route would be unreachable",
            Some("list names, e.g. `hosts = [\"shop.example.com\"]`, or leave `hosts` out to match any host".into()),
        );
        return None;
    }
    let mut hosts: Vec<HostPattern> = Vec::new();
    let mut ok = true;
    for h in raw.get_ref() {
        match HostPattern::parse(h.get_ref()) {
            Ok(p) if hosts.contains(&p) => {
                ctx.error(h.span(), format!("host `{p}` is listed twice"), None);
                ok = false;
            }
            Ok(p) => hosts.push(p),
            Err(e) => {
                ctx.error(
                    h.span(),
                    format!("invalid host `{}`: {e}", h.get_ref()),
                    Some("write a name, e.g. `\"shop.example.com\"`, or a wildcard, e.g. `\"*.example.com\"`".into()),
                );
                ok = false;
            }
        }
    }
    ok.then_some(hosts)
}

/// Upper-case, known, distinct methods; `methods = []` is an error (it
/// would match nothing), `None` means any method.
fn methods(
    ctx: &mut Ctx<'_>,
    raw: Option<&Vec<Spanned<String>>>,
    path: &Spanned<String>,
    what: &str,
) -> Option<Vec<String>> {
    let mut methods = Vec::new();
    for m in raw.into_iter().flatten() {
        let method = m.get_ref();
        if METHODS.contains(&method.as_str()) {
            if methods.contains(method) {
                ctx.error(
                    m.span(),
                    format!("`{method}` is listed twice"),
                    Some("remove one".into()),
                );
                return None;
            }
            methods.push(method.clone());
        } else if METHODS.contains(&method.to_ascii_uppercase().as_str()) {
            ctx.error(
                m.span(),
                format!("method `{method}` must be upper case"),
                Some(format!("write `\"{}\"`", method.to_ascii_uppercase())),
            );
            return None;
        } else {
            ctx.error(
                m.span(),
                format!("`{method}` is not an HTTP method"),
                Some(format!("use one of {}", quote_list(&METHODS))),
            );
            return None;
        }
    }
    if raw.is_some_and(Vec::is_empty) {
        ctx.error(
            path.span(),
            format!("`methods = []` would make the {what}"),
            Some("list the methods, or leave `methods` out to accept any".into()),
        );
        return None;
    }
    Some(methods)
}

/// One `acl` rule of service `callee`: its caller must be a service that
/// lists `callee` in `calls` (rules refine `calls`, they never replace
/// it), or the gateway or runtime, whose reach only a deny rule can change.
fn acl_rule(
    ctx: &mut Ctx<'_>,
    callee: &str,
    raw: &Spanned<RawAclRule>,
    declared: &[String],
    callers: &BTreeSet<String>,
) -> Option<AclRule> {
    let raw = raw.get_ref();
    let effect = match &raw.effect {
        None => AclEffect::Allow,
        Some(e) => match e.get_ref().as_str() {
            "allow" => AclEffect::Allow,
            "deny" => AclEffect::Deny,
            other => {
                let help = match did_you_mean(other, ["allow", "deny"]) {
                    Some(s) => format!("did you mean `effect = \"{s}\"`?"),
                    None => {
                        "write `effect = \"allow\"` (the default) or `effect = \"deny\"`".into()
                    }
                };
                ctx.error(
                    e.span(),
                    format!("unknown ACL effect `{other}`"),
                    Some(help),
                );
                return None;
            }
        },
    };
    let caller = raw.caller.get_ref();
    let platform_reach = match caller.as_str() {
        "gateway" => Some(format!("the routes of `{callee}`")),
        "runtime" => Some("`/healthz`, `/readyz` and `/metrics`".to_string()),
        _ => None,
    };
    if let Some(reach) = platform_reach {
        if effect == AclEffect::Allow {
            ctx.error(
                raw.caller.span(),
                format!(
                    "the {caller} reaches exactly {reach}; an ACL rule can only take from that"
                ),
                Some(format!(
                    "write `effect = \"deny\"` to refuse part of it{}",
                    if caller == "gateway" {
                        ", or change the service's `routes`"
                    } else {
                        ""
                    }
                )),
            );
            return None;
        }
    } else if caller == callee {
        ctx.error(
            raw.caller.span(),
            format!("ACL rule of `{callee}` names `{callee}` itself as the caller"),
            Some("rules govern calls from other services; remove it".into()),
        );
        return None;
    } else if declared.contains(caller) {
        if !callers.contains(caller) {
            ctx.error(
                raw.caller.span(),
                format!("ACL rule names `{caller}`, which does not call `{callee}`"),
                Some(format!(
                    "add \"{callee}\" to `calls` of service `{caller}`: rules refine `calls`, they do not replace it"
                )),
            );
            return None;
        }
    } else {
        let candidates = declared
            .iter()
            .map(String::as_str)
            .filter(|s| *s != callee)
            .chain(["gateway", "runtime"]);
        let help = match did_you_mean(caller, candidates) {
            Some(s) => format!("did you mean `{s}`?"),
            None => {
                format!("name a service whose `calls` list `{callee}`, or `gateway` or `runtime`")
            }
        };
        ctx.error(
            raw.caller.span(),
            format!("ACL rule names `{caller}`, which is not a service of this system"),
            Some(help),
        );
        return None;
    }
    let pattern = match PathPattern::parse(raw.path.get_ref()) {
        Ok(p) => p,
        Err(e) => {
            ctx.error(
                raw.path.span(),
                format!("invalid ACL path `{}`: {e}", raw.path.get_ref()),
                Some(
                    "write e.g. `path = \"/api/orders/**\"` (`*` is one segment, `**` the rest)"
                        .into(),
                ),
            );
            return None;
        }
    };
    let methods = methods(ctx, raw.methods.as_ref(), &raw.path, "rule match nothing")?;
    Some(AclRule {
        caller: caller.clone(),
        pattern,
        methods,
        effect,
    })
}

/// Two routes with the same pattern, a method in common and the same hosts
/// in common (or no hosts, both) would make the gateway's choice arbitrary,
/// so they are an error wherever they are declared. A route with hosts and
/// one without never clash: the one with hosts wins for its names.
fn check_route_conflicts(ctx: &mut Ctx<'_>, raw: &RawManifest) {
    type MatchHeaders = BTreeMap<String, BTreeSet<String>>;
    type Seen = (
        String,
        PathPattern,
        Vec<String>,
        Vec<HostPattern>,
        MatchHeaders,
    );
    let mut seen: Vec<Seen> = Vec::new();
    for (name, service) in &raw.services {
        for r in service.get_ref().routes.iter().flatten() {
            let r = r.get_ref();
            let Ok(pattern) = PathPattern::parse(r.path.get_ref()) else {
                continue;
            };
            let methods: Vec<String> = r
                .methods
                .iter()
                .flatten()
                .map(|m| m.get_ref().to_ascii_uppercase())
                .collect();
            // Invalid hosts are reported by `route`; the rest still clash.
            let hosts: Vec<HostPattern> = r
                .hosts
                .iter()
                .flat_map(|h| h.get_ref())
                .filter_map(|h| HostPattern::parse(h.get_ref()).ok())
                .collect();
            // Routes for different headers are different routes; compared
            // as the gateway reads them: names in lower case, a string as a
            // list of one, the values as a set (invalid ones are reported
            // by `route`).
            let mut headers: MatchHeaders = BTreeMap::new();
            for (name, value) in r.match_headers.iter().flat_map(|h| h.get_ref()) {
                headers
                    .entry(name.to_ascii_lowercase())
                    .or_default()
                    .extend(edge::match_header_values(value.get_ref()).unwrap_or_default());
            }
            for (other, other_pattern, other_methods, other_hosts, other_headers) in &seen {
                let overlap = methods.is_empty()
                    || other_methods.is_empty()
                    || methods.iter().any(|m| other_methods.contains(m));
                let same_hosts = if hosts.is_empty() || other_hosts.is_empty() {
                    hosts.is_empty() && other_hosts.is_empty()
                } else {
                    hosts.iter().any(|h| other_hosts.contains(h))
                };
                if overlap
                    && same_hosts
                    && headers == *other_headers
                    && pattern.same_as(other_pattern)
                {
                    let whose = if other == name.get_ref() {
                        "this service".to_string()
                    } else {
                        format!("service `{other}`")
                    };
                    ctx.error(
                        r.path.span(),
                        format!(
                            "route `{}` is also declared by {whose} for the same methods",
                            r.path.get_ref()
                        ),
                        Some(
                            "give each route its own path or hosts, or split the methods between them"
                                .into(),
                        ),
                    );
                }
            }
            seen.push((name.get_ref().clone(), pattern, methods, hosts, headers));
        }
    }
}

mod edge;
mod events;
mod limits;

#[cfg(test)]
mod tests;
