//! Validation of the gateway's edge policies: `[gateway.jwt]`, `.cors`,
//! `.ip`, `.rate_limits`, `.tls`, the per-route `auth`, `scopes`,
//! `claims`, `rate_limit`, `affinity`, `cors`, `ip` and `max_body_bytes`, and the
//! system's and routes' `request_headers` and `response_headers`, and
//! `[gateway.compression]`, `[gateway.cache]` and a route's `cache`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use toml::Spanned;

use super::{Ctx, DAY, SECOND};
use crate::edge::{
    Affinity, ApiKeys, Authz, CacheStore, ClientAuth, Compression, Cors, ForwardedHeader,
    HeaderChanges, HeaderDirection, IpList, JwksSource, Jwt, MAX_JWT_ISSUERS, MAX_RATE_LIMITS,
    RateLimit, RateLimitKey, RateLimitStore, RouteCache, Tls, TlsCertificate, TlsVersion,
    is_origin, is_token, is_token_byte, only_added, parse_net, reserved_header,
};
use crate::raw::{
    RawApiKeys, RawAuthz, RawCacheStore, RawCompression, RawCors, RawHeaderChanges, RawIp, RawJwt,
    RawJwts, RawRateLimits, RawRouteCache, RawTls,
};

const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(300);
/// Clock skew allowed on `exp` and `nbf`, as Envoy's `clock_skew_seconds`.
const DEFAULT_JWT_LEEWAY: Duration = Duration::from_secs(60);
const MAX_JWT_LEEWAY: Duration = Duration::from_secs(300);
const DEFAULT_CORS_MAX_AGE: Duration = Duration::from_secs(600);
const DEFAULT_CORS_METHODS: [&str; 5] = ["GET", "HEAD", "POST", "PUT", "DELETE"];
/// `[gateway.cache] max_bytes`: 1 KiB to 4 GiB, as docs/manifest.md says.
const MIN_CACHE_BYTES: u64 = 1 << 10;
const MAX_CACHE_BYTES: u64 = 4 << 30;
/// A larger request body than this belongs in the object store.
const MAX_BODY_LIMIT: i64 = 1 << 30;

/// `[gateway] jwt`: one issuer's table (its `name` optional, `default`),
/// or an array of them, each named. Names and `iss` values are unique: a
/// token is given to the issuer its `iss` names.
pub(super) fn jwts(
    ctx: &mut Ctx<'_>,
    raw: &Spanned<RawJwts>,
    declared: &[String],
) -> Option<Vec<Jwt>> {
    let span = raw.span();
    let entries: Vec<(&RawJwt, std::ops::Range<usize>)> = match raw.get_ref() {
        RawJwts::One(one) => vec![(one.as_ref(), span.clone())],
        RawJwts::Many(many) => many.iter().map(|j| (j.get_ref(), j.span())).collect(),
    };
    let many = matches!(raw.get_ref(), RawJwts::Many(_));
    if entries.is_empty() {
        ctx.error(
            span,
            "`jwt` lists no issuer",
            Some("give one: `jwt = { issuer = \"…\", audiences = [\"…\"], jwks = \"accounts:/.well-known/jwks.json\" }`, or remove `jwt`".into()),
        );
        return None;
    }
    if entries.len() > MAX_JWT_ISSUERS {
        ctx.error(
            span,
            format!(
                "`jwt` lists {} issuers; at most {MAX_JWT_ISSUERS}",
                entries.len()
            ),
            Some("remove issuers no route takes".into()),
        );
        return None;
    }
    let before = ctx.errors.len();
    let mut out: Vec<Jwt> = Vec::new();
    for (entry, entry_span) in entries {
        let name = match &entry.name {
            Some(n) => {
                let name = n.get_ref();
                let ok = !name.is_empty()
                    && name.len() <= 64
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
                if !ok {
                    ctx.error(
                        n.span(),
                        format!("`{name}` cannot be an issuer's name"),
                        Some("use up to 64 letters, digits, `-`, `_` and `.`, e.g. `name = \"staff\"`".into()),
                    );
                    continue;
                }
                if out.iter().any(|j| j.name == *name) {
                    ctx.error(
                        n.span(),
                        format!("two issuers are named `{name}`"),
                        Some("give each `[[gateway.jwt]]` a name of its own".into()),
                    );
                    continue;
                }
                name.clone()
            }
            None if many => {
                ctx.error(
                    entry_span,
                    "an issuer of `[[gateway.jwt]]` has no `name`",
                    Some("name each, e.g. `name = \"staff\"`: routes' `issuers` name the ones they take".into()),
                );
                continue;
            }
            None => "default".to_string(),
        };
        if let Some(other) = out.iter().find(|j| j.issuer == *entry.issuer.get_ref()) {
            ctx.error(
                entry.issuer.span(),
                format!(
                    "issuers `{}` and `{name}` both verify `iss = \"{}\"`",
                    other.name,
                    entry.issuer.get_ref()
                ),
                Some("a token goes to the one issuer its `iss` names: merge them, or give each its own `issuer`".into()),
            );
            continue;
        }
        if let Some(jwt) = jwt(ctx, entry, name, declared) {
            out.push(jwt);
        }
    }
    (ctx.errors.len() == before).then_some(out)
}

/// A route's `issuers`: names of `[gateway] jwt`'s issuers, at least one,
/// each once.
pub(super) fn route_issuers(
    ctx: &mut Ctx<'_>,
    raw: &Spanned<Vec<Spanned<String>>>,
    known: &[String],
) -> Option<Vec<String>> {
    if raw.get_ref().is_empty() {
        ctx.error(
            raw.span(),
            "`issuers` is empty: no token could pass",
            Some(format!(
                "name one or more of {}, or remove `issuers` to take `{}`'s",
                quoted(known),
                known.first().map_or("", String::as_str)
            )),
        );
        return None;
    }
    let mut names: Vec<String> = Vec::new();
    for name in raw.get_ref() {
        if !known.contains(name.get_ref()) {
            ctx.error(
                name.span(),
                format!("`{}` is not an issuer of `[gateway] jwt`", name.get_ref()),
                Some(format!("name one of {}", quoted(known))),
            );
            return None;
        }
        if !names.contains(name.get_ref()) {
            names.push(name.get_ref().clone());
        }
    }
    Some(names)
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `jwks`: a URL or a service of this system (declared).
fn jwks_source(
    ctx: &mut Ctx<'_>,
    jwks: &Spanned<String>,
    declared: &[String],
) -> Option<JwksSource> {
    match JwksSource::parse(jwks.get_ref()) {
        Ok(JwksSource::Service { service, path }) if !declared.contains(&service) => {
            ctx.error(
                jwks.span(),
                format!("`jwks` names service `{service}`, which is not a service of this system"),
                Some(format!(
                    "declare `[services.{service}]`, or give an `https://` URL"
                )),
            );
            Some(JwksSource::Service { service, path })
        }
        Ok(source) => Some(source),
        Err(why) => {
            ctx.error(
                jwks.span(),
                why,
                Some("e.g. `jwks = \"accounts:/.well-known/jwks.json\"`".into()),
            );
            None
        }
    }
}

fn jwt(ctx: &mut Ctx<'_>, raw: &RawJwt, name: String, declared: &[String]) -> Option<Jwt> {
    let before = ctx.errors.len();
    if raw.issuer.get_ref().trim().is_empty() {
        ctx.error(
            raw.issuer.span(),
            "`issuer` is empty",
            Some("write the `iss` your tokens carry, e.g. `issuer = \"shop-accounts\"`".into()),
        );
    }
    if raw.audiences.is_empty() {
        ctx.error(
            raw.issuer.span(),
            "`audiences` is empty: no token could pass",
            Some("list the `aud` values to accept, e.g. `audiences = [\"shop\"]`".into()),
        );
    }
    let jwks = match (&raw.jwks, &raw.jwks_file) {
        (Some(jwks), None) => jwks_source(ctx, jwks, declared)?,
        (None, Some(file)) => {
            let path = ctx.dir.join(file.get_ref());
            if !path.is_file() {
                ctx.error(
                    file.span(),
                    format!("JWKS file `{}` does not exist", path.display()),
                    Some("give a JSON file of the form `{\"keys\": [...]}` relative to the manifest, e.g. `jwks_file = \"keys/jwks.json\"`".into()),
                );
                return None;
            }
            JwksSource::File(path)
        }
        (Some(_), Some(file)) => {
            ctx.error(
                file.span(),
                "`jwks` and `jwks_file` both say where the keys are",
                Some("keep one: `jwks` to fetch them, `jwks_file` to read them from a file".into()),
            );
            return None;
        }
        (None, None) => {
            ctx.error(
                raw.issuer.span(),
                "this issuer has no keys: `jwks` or `jwks_file` is missing",
                Some("add `jwks = \"accounts:/.well-known/jwks.json\"` (or an `https://` URL), or `jwks_file = \"keys/jwks.json\"`".into()),
            );
            return None;
        }
    };
    let jwks_ca = raw.jwks_ca.as_ref().map(|ca| {
        let path = ctx.dir.join(ca.get_ref());
        if !matches!(&jwks, JwksSource::Url(url) if url.starts_with("https://")) {
            ctx.error(
                ca.span(),
                "`jwks_ca` is for an `https://` `jwks` URL",
                Some("remove it: a service of this system is reached over the mesh's mutual TLS, and a loopback `http://` URL and a `jwks_file` have no certificate".into()),
            );
        } else if !path.is_file() {
            ctx.error(
                ca.span(),
                format!("JWKS CA file `{}` does not exist", path.display()),
                Some("give a PEM file relative to the manifest, e.g. `jwks_ca = \"certs/idp-ca.pem\"`, or leave it out to trust the machine's roots".into()),
            );
        }
        path
    });
    let refresh = match &raw.refresh {
        // The identity provider's JWKS is fetched this often: at most once
        // a second, at least once a day.
        Some(r) => ctx.duration_in(r, "refresh", (SECOND, DAY), "1s to 1d")?,
        None => DEFAULT_JWKS_REFRESH,
    };
    let leeway = match &raw.leeway {
        Some(l) => {
            let leeway = ctx.duration_or_zero(l, "leeway", true)?;
            if leeway > MAX_JWT_LEEWAY {
                ctx.error(
                    l.span(),
                    format!(
                        "`leeway` of `{}` would take tokens long expired",
                        l.get_ref()
                    ),
                    Some("allow at most `\"5m\"` of clock skew; the default is `\"60s\"`".into()),
                );
                return None;
            }
            leeway
        }
        None => DEFAULT_JWT_LEEWAY,
    };
    // Kept as written: claim names are case-sensitive (RFC 7519 §4), so
    // `tenantId` is looked up as `tenantId`. Only the header it travels in
    // is lower case (`x-flotilla-user-tenantid`), as header names are.
    let mut forward_claims: Vec<String> = Vec::new();
    for c in raw.forward_claims.iter().flatten() {
        let claim = c.get_ref();
        let suffix = claim.to_ascii_lowercase().replace('_', "-");
        if claim.is_empty()
            || !claim
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
        {
            ctx.error(
                c.span(),
                format!("`{claim}` cannot be a header name suffix"),
                Some("use letters, digits, `_` and `-`".into()),
            );
        } else if ["id", "issuer"].contains(&suffix.as_str()) {
            ctx.error(
                c.span(),
                format!("`{claim}` would be `x-flotilla-user-{suffix}`, which the gateway sets itself"),
                Some("remove it: `x-flotilla-user-id` carries the `sub`, and `x-flotilla-user-issuer` the issuer's name".into()),
            );
        } else if let Some(other) = forward_claims
            .iter()
            .find(|o| o.to_ascii_lowercase().replace('_', "-") == suffix)
        {
            // Two claims in one header would reach the service as two
            // values it could not tell apart.
            ctx.error(
                c.span(),
                format!("`{claim}` and `{other}` would both be `x-flotilla-user-{suffix}`"),
                Some("forward one of them".into()),
            );
        } else {
            forward_claims.push(claim.clone());
        }
    }
    let cookie = raw.cookie.as_ref().and_then(|c| {
        if is_token(c.get_ref()) {
            return Some(c.get_ref().clone());
        }
        ctx.error(
            c.span(),
            format!("`{}` cannot be a cookie's name", c.get_ref()),
            Some(
                "use letters, digits and `!#$%&'*+-.^_`|~`, e.g. `cookie = \"access_token\"`"
                    .into(),
            ),
        );
        None
    });
    if ctx.errors.len() != before {
        return None;
    }
    Some(Jwt {
        name,
        cookie,
        leeway,
        issuer: raw.issuer.get_ref().clone(),
        audiences: raw.audiences.iter().map(|a| a.get_ref().clone()).collect(),
        jwks,
        jwks_ca,
        refresh,
        forward_claims,
    })
}

pub(super) fn cors(ctx: &mut Ctx<'_>, raw: &Spanned<RawCors>) -> Option<Cors> {
    let span = raw.span();
    let raw = raw.get_ref();
    let before = ctx.errors.len();
    let credentials = raw.credentials.unwrap_or(false);
    let mut origins = Vec::new();
    for o in &raw.origins {
        let origin = o.get_ref();
        if origin == "*" {
            if credentials {
                ctx.error(
                    o.span(),
                    "`*` cannot be combined with `credentials = true`",
                    Some("browsers refuse it: list the exact origins instead".into()),
                );
            } else if raw.origins.len() > 1 {
                ctx.error(
                    o.span(),
                    "`*` must be the only origin",
                    Some("remove the others, or list exact origins only".into()),
                );
            }
        } else if !is_origin(origin) {
            ctx.error(
                o.span(),
                format!("`{origin}` is not an origin"),
                Some("write `scheme://host[:port]` with no path, e.g. `\"https://shop.example\"` or `\"http://localhost:8080\"`".into()),
            );
        }
        origins.push(origin.clone());
    }
    if origins.is_empty() {
        ctx.error(
            span,
            "`origins` is empty: no browser could call",
            Some("list the origins, e.g. `origins = [\"http://localhost:8080\"]`".into()),
        );
    }
    let list = |v: &Option<Vec<Spanned<String>>>| {
        v.iter()
            .flatten()
            .map(|s| s.get_ref().clone())
            .collect::<Vec<_>>()
    };
    let methods = match &raw.methods {
        Some(_) => list(&raw.methods)
            .into_iter()
            .map(|m| m.to_ascii_uppercase())
            .collect(),
        None => DEFAULT_CORS_METHODS.iter().map(|m| m.to_string()).collect(),
    };
    let max_age = match &raw.max_age {
        // Browsers cap it lower still (Chrome at 2h, Firefox at 1d).
        Some(m) => ctx.duration_in(m, "max_age", (SECOND, DAY), "1s to 1d")?,
        None => DEFAULT_CORS_MAX_AGE,
    };
    if ctx.errors.len() != before {
        return None;
    }
    Some(Cors {
        origins,
        credentials,
        methods,
        headers: list(&raw.headers),
        expose_headers: list(&raw.expose_headers),
        max_age,
    })
}

/// `[gateway.ip]`, or a route's `ip` (`route`: only the lists, since who
/// the client is is decided for the whole gateway before any route).
pub(super) fn ip(ctx: &mut Ctx<'_>, raw: &Spanned<RawIp>, route: bool) -> Option<IpList> {
    let table = raw.span();
    let raw = raw.get_ref();
    let before = ctx.errors.len();
    if route {
        let spans = [
            raw.trusted_proxies.as_ref().map(|l| {
                (
                    "trusted_proxies",
                    l.first().map_or(table.clone(), |e| e.span()),
                )
            }),
            raw.forwarded_header
                .as_ref()
                .map(|f| ("forwarded_header", f.span())),
            raw.proxy_protocol
                .as_ref()
                .map(|p| ("proxy_protocol", p.span())),
        ];
        for (key, span) in spans.into_iter().flatten() {
            ctx.error(
                span,
                format!("a route's `ip` takes `allow` and `deny` only, not `{key}`"),
                Some(
                    "set it in `[gateway.ip]`: who the client is is decided for the whole gateway"
                        .into(),
                ),
            );
        }
    }
    let mut nets = |list: &Option<Vec<Spanned<String>>>| {
        let mut out = Vec::new();
        for entry in list.iter().flatten() {
            match parse_net(entry.get_ref()) {
                Ok(net) => out.push(net),
                Err(e) => ctx.error(entry.span(), e.to_string(), None),
            }
        }
        out
    };
    let mut list = IpList {
        allow: nets(&raw.allow),
        deny: nets(&raw.deny),
        trusted_proxies: nets(&raw.trusted_proxies),
        forwarded_header: ForwardedHeader::XForwardedFor,
        proxy_protocol: raw.proxy_protocol.as_ref().is_some_and(|p| *p.get_ref()),
        files: Vec::new(),
    };
    for (file, key) in [
        (&raw.allow_file, "allow_file"),
        (&raw.deny_file, "deny_file"),
    ] {
        let Some(file) = file else { continue };
        let path = ctx.dir.join(file.get_ref());
        if let Some(read) = ip_file(ctx, file, &path, key) {
            match key {
                "allow_file" => list.allow.extend(read),
                _ => list.deny.extend(read),
            }
        }
        list.files.push(path);
    }
    if let Some(header) = &raw.forwarded_header
        && !route
    {
        match header.get_ref().to_ascii_lowercase().as_str() {
            "x-forwarded-for" => {}
            "forwarded" => list.forwarded_header = ForwardedHeader::Forwarded,
            other => ctx.error(
                header.span(),
                format!("unknown forwarded_header `{other}`"),
                Some(
                    "write `forwarded_header = \"x-forwarded-for\"` (the default) or `\"forwarded\"`: the one your load balancer writes"
                        .into(),
                ),
            ),
        }
    }
    if list.proxy_protocol
        && list.trusted_proxies.is_empty()
        && ctx.errors.len() == before
        && let Some(p) = &raw.proxy_protocol
    {
        ctx.error(
            p.span(),
            "`proxy_protocol = true` needs `trusted_proxies`: a PROXY header is believed only from them",
            Some("list the load balancers that send it, e.g. `trusted_proxies = [\"10.0.0.0/24\"]`".into()),
        );
    }
    (ctx.errors.len() == before).then_some(list)
}

/// The largest list file read: a few million networks.
const MAX_IP_FILE_BYTES: u64 = 64 << 20;
/// How many of a list file's bad lines are told, the rest counted.
const MAX_IP_FILE_ERRORS: usize = 5;

/// The networks of a list file (`allow_file`, `deny_file`): one address or
/// CIDR a line, with `#` and `;` starting a comment, so a FireHOL netset
/// or Spamhaus' DROP list (`1.10.16.0/20 ; SBL256894`) is read as
/// published.
fn ip_file(
    ctx: &mut Ctx<'_>,
    file: &Spanned<String>,
    path: &std::path::Path,
    key: &str,
) -> Option<Vec<ipnet::IpNet>> {
    let too_large = std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_IP_FILE_BYTES);
    let text = match std::fs::read_to_string(path) {
        Ok(_) if too_large => Err(format!("it is larger than {} MiB", MAX_IP_FILE_BYTES >> 20)),
        Ok(text) => Ok(text),
        Err(e) => Err(e.to_string()),
    };
    let text = match text {
        Ok(text) => text,
        Err(why) => {
            ctx.error(
                file.span(),
                format!("cannot read `{key}` `{}`: {why}", path.display()),
                Some(format!(
                    "give a text file relative to the manifest, one address or CIDR a line, e.g. `{key} = \"blocklists/drop.txt\"`"
                )),
            );
            return None;
        }
    };
    let mut nets = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let entry = line.split(['#', ';']).next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        match parse_net(entry) {
            Ok(net) => nets.push(net),
            Err(_) => bad.push(format!("line {}: `{entry}`", i + 1)),
        }
    }
    if !bad.is_empty() {
        let more = bad.len().saturating_sub(MAX_IP_FILE_ERRORS);
        let mut told = bad[..bad.len().min(MAX_IP_FILE_ERRORS)].join(", ");
        if more > 0 {
            told.push_str(&format!(" and {more} more"));
        }
        ctx.error(
            file.span(),
            format!("`{}` has lines that are not an address or a CIDR: {told}", path.display()),
            Some("write one address or CIDR a line (`203.0.113.0/24`, `2001:db8::/32`); `#` or `;` starts a comment".into()),
        );
        return None;
    }
    Some(nets)
}

pub(super) fn rate_limit_store(
    ctx: &mut Ctx<'_>,
    raw: &Spanned<RawRateLimits>,
) -> Option<RateLimitStore> {
    let raw = raw.get_ref();
    match (raw.store.get_ref().as_str(), &raw.url) {
        ("memory", None) => Some(RateLimitStore::Memory),
        ("memory", Some(url)) => {
            ctx.error(
                url.span(),
                "`url` applies to `store = \"redis\"` only",
                Some("remove it".into()),
            );
            None
        }
        ("redis", Some(url)) if url.get_ref().starts_with("redis://") => {
            Some(RateLimitStore::Redis {
                url: url.get_ref().clone(),
            })
        }
        ("redis", Some(url)) => {
            ctx.error(
                url.span(),
                format!("`{}` is not a Redis URL", url.get_ref()),
                Some("write `redis://host:port[/db]`".into()),
            );
            None
        }
        ("redis", None) => {
            ctx.error(
                raw.store.span(),
                "`store = \"redis\"` needs a `url`",
                Some("add `url = \"redis://127.0.0.1:6379\"`".into()),
            );
            None
        }
        (other, _) => {
            ctx.error(raw.store.span(), format!("unknown store `{other}`"), Some("write `store = \"memory\"` (one gateway) or `store = \"redis\"` (shared by replicas)".into()));
            None
        }
    }
}

/// `[gateway.tls]`: both files must be there when the system starts (their
/// contents are the gateway's to judge: it loads them, and says what is
/// wrong with a chain or a key).
pub(super) fn tls(ctx: &mut Ctx<'_>, raw: &Spanned<RawTls>) -> Option<Tls> {
    let raw = raw.get_ref();
    let before = ctx.errors.len();
    let file = |ctx: &mut Ctx<'_>, value: &Spanned<String>, what: &str, example: &str| {
        let path = ctx.dir.join(value.get_ref());
        if !path.is_file() {
            ctx.error(
                value.span(),
                format!("{what} file `{}` does not exist", path.display()),
                Some(format!(
                    "give a PEM file relative to the manifest, e.g. `{example}`"
                )),
            );
        }
        path
    };
    let cert = file(
        ctx,
        &raw.cert,
        "certificate",
        "cert = \"certs/gateway.pem\"",
    );
    let key = file(ctx, &raw.key, "key", "key = \"certs/gateway-key.pem\"");
    let mut certificates: Vec<TlsCertificate> = Vec::new();
    for more in raw.certificates.iter().flatten() {
        let pair = TlsCertificate {
            cert: file(ctx, &more.cert, "certificate", "cert = \"certs/api.pem\""),
            key: file(ctx, &more.key, "key", "key = \"certs/api-key.pem\""),
        };
        // The same chain twice would never be served from its second place.
        if pair.cert == cert || certificates.iter().any(|c| c.cert == pair.cert) {
            ctx.error(
                more.cert.span(),
                format!("certificate `{}` is listed twice", more.cert.get_ref()),
                Some("list each certificate once: `[gateway.tls] cert` is the one served when no other's names match".into()),
            );
        }
        certificates.push(pair);
    }
    let client_ca = raw
        .client_ca
        .as_ref()
        .map(|ca| file(ctx, ca, "client CA", "client_ca = \"certs/clients-ca.pem\""));
    let client_crl = match &raw.client_crl {
        Some(crl) if client_ca.is_none() => {
            ctx.error(
                crl.span(),
                "`client_crl` needs `client_ca`: the CAs whose revocations it lists",
                Some("add `client_ca = \"certs/clients-ca.pem\"`, or remove `client_crl`".into()),
            );
            None
        }
        Some(crl) => Some(file(
            ctx,
            crl,
            "client CRL",
            "client_crl = \"certs/clients-crl.pem\"",
        )),
        None => None,
    };
    let client_auth = match &raw.client_auth {
        None => ClientAuth::Optional,
        Some(a) if client_ca.is_none() => {
            ctx.error(
                a.span(),
                "`client_auth` needs `client_ca`: the CAs client certificates are verified against",
                Some("add `client_ca = \"certs/clients-ca.pem\"`, or remove `client_auth`".into()),
            );
            ClientAuth::Optional
        }
        Some(a) => match a.get_ref().as_str() {
            "optional" => ClientAuth::Optional,
            "required" => ClientAuth::Required,
            other => {
                ctx.error(
                    a.span(),
                    format!("unknown client_auth `{other}`"),
                    Some(
                        "write `client_auth = \"optional\"` (the default) or `\"required\"`".into(),
                    ),
                );
                ClientAuth::Optional
            }
        },
    };
    let min_version = match &raw.min_version {
        None => TlsVersion::Tls12,
        Some(v) => match TlsVersion::parse(v.get_ref()) {
            Some(version) => version,
            None => {
                ctx.error(
                    v.span(),
                    format!("`{}` is not a TLS version", v.get_ref()),
                    Some("write `min_version = \"1.2\"` (the default) or `\"1.3\"`".into()),
                );
                TlsVersion::Tls12
            }
        },
    };
    let http_redirect = raw.http_redirect.as_ref().and_then(|addr| {
        let parsed = addr.get_ref().parse::<std::net::SocketAddr>().ok();
        if parsed.is_none() {
            ctx.error(
                addr.span(),
                format!("`{}` is not a socket address", addr.get_ref()),
                Some(
                    "write an IP address and a port, e.g. `http_redirect = \"0.0.0.0:80\"`".into(),
                ),
            );
        }
        parsed
    });
    let hsts = match &raw.hsts {
        // `max-age` counts whole seconds: under one it would be
        // `max-age=0`, which tells browsers to forget HSTS.
        Some(d) => Some(ctx.duration_in(
            d,
            "hsts",
            (SECOND, Duration::from_secs(10 * 365 * 24 * 60 * 60)),
            "1s to 3650d",
        )?),
        None => None,
    };
    (ctx.errors.len() == before).then_some(Tls {
        cert,
        key,
        certificates,
        client_ca,
        client_crl,
        client_auth,
        min_version,
        http_redirect,
        hsts,
    })
}

/// A route's `rate_limit`: one limit, or a list of them, each on its own
/// window and key (two with the same unit and key would only repeat the
/// stricter one). `per user` needs a route whose requests carry a user.
pub(super) fn rate_limits(
    ctx: &mut Ctx<'_>,
    raw: &Spanned<toml::Value>,
    has_user: bool,
) -> Option<Vec<RateLimit>> {
    let example = "e.g. `rate_limit = \"20/s burst 40 per user\"`, or a list: `rate_limit = [\"20/s per user\", \"5000/d per user\"]`";
    let texts: Vec<&str> = match raw.get_ref() {
        toml::Value::String(s) => vec![s.as_str()],
        toml::Value::Array(items) if !items.is_empty() && items.len() <= MAX_RATE_LIMITS => {
            match items
                .iter()
                .map(toml::Value::as_str)
                .collect::<Option<Vec<_>>>()
            {
                Some(texts) => texts,
                None => {
                    ctx.error(
                        raw.span(),
                        "every rate limit in the list must be a string",
                        Some(example.into()),
                    );
                    return None;
                }
            }
        }
        toml::Value::Array(items) => {
            ctx.error(
                raw.span(),
                format!(
                    "a route takes 1 to {MAX_RATE_LIMITS} rate limits, not {}",
                    items.len()
                ),
                Some(example.into()),
            );
            return None;
        }
        _ => {
            ctx.error(
                raw.span(),
                "`rate_limit` must be a string or a list of strings",
                Some(example.into()),
            );
            return None;
        }
    };
    let mut limits: Vec<RateLimit> = Vec::with_capacity(texts.len());
    for text in texts {
        let limit = match RateLimit::parse(text) {
            Ok(limit) => limit,
            Err(e) => {
                ctx.error(raw.span(), e.to_string(), Some(example.into()));
                return None;
            }
        };
        if limit.key == RateLimitKey::User && !has_user {
            ctx.error(
                raw.span(),
                "`per user` needs a verified user",
                Some(
                    "set `auth = \"jwt\"` (or `\"optional\"`) on this route, or count `per ip`"
                        .into(),
                ),
            );
            return None;
        }
        if let Some(twin) = limits.iter().find(|l| l.same_counter(&limit)) {
            ctx.error(
                raw.span(),
                format!("`{twin}` and `{limit}` count the same key over the same unit of time"),
                Some("keep the stricter one, or give them different units (`/s`, `/h`, `/d`) or keys".into()),
            );
            return None;
        }
        limits.push(limit);
    }
    Some(limits)
}

/// A route's `affinity`; `user` needs a route whose requests can carry a
/// user.
pub(super) fn affinity(
    ctx: &mut Ctx<'_>,
    raw: &Spanned<String>,
    has_user: bool,
) -> Option<Affinity> {
    match Affinity::parse(raw.get_ref()) {
        Ok(Affinity::User) if !has_user => {
            ctx.error(
                raw.span(),
                "`affinity = \"user\"` needs a verified user",
                Some(
                    "set `auth = \"jwt\"`, `\"optional\"` or `\"key\"` on this route, or use `affinity = \"ip\"` or `\"cookie:<name>\"`"
                        .into(),
                ),
            );
            None
        }
        Ok(affinity) => Some(affinity),
        Err(e) => {
            ctx.error(
                raw.span(),
                e.to_string(),
                Some(
                    "e.g. `affinity = \"cookie:flotilla-affinity\"` or `affinity = \"user\"`"
                        .into(),
                ),
            );
            None
        }
    }
}

/// A route's `max_in_flight`: at least one request, and no more than the
/// gateway could ever hold.
pub(super) fn route_max_in_flight(ctx: &mut Ctx<'_>, raw: &Spanned<i64>) -> Option<u32> {
    const MAX: i64 = 1_000_000;
    let v = *raw.get_ref();
    if !(1..=MAX).contains(&v) {
        ctx.error(
            raw.span(),
            format!("`max_in_flight = {v}` is out of range"),
            Some(format!(
                "give the requests this route may have in flight at once, from 1 to {MAX}"
            )),
        );
        return None;
    }
    u32::try_from(v).ok()
}

pub(super) fn max_body(ctx: &mut Ctx<'_>, raw: &Spanned<i64>) -> Option<u64> {
    let v = *raw.get_ref();
    if !(1..=MAX_BODY_LIMIT).contains(&v) {
        ctx.error(
            raw.span(),
            format!("`max_body_bytes = {v}` is out of range"),
            Some(format!("use a number of bytes from 1 to {MAX_BODY_LIMIT}")),
        );
        return None;
    }
    u64::try_from(v).ok()
}

/// A route's `claims`: each name to the values one of which the token's
/// claim must have. Values are strings, booleans or integers (kept as their
/// text, which is what the gateway compares), or a non-empty array of them.
pub(super) fn claims(
    ctx: &mut Ctx<'_>,
    raw: &Spanned<BTreeMap<String, Spanned<toml::Value>>>,
) -> Option<BTreeMap<String, Vec<String>>> {
    let before = ctx.errors.len();
    let mut claims = BTreeMap::new();
    for (name, value) in raw.get_ref() {
        if name.is_empty() {
            ctx.error(
                value.span(),
                "a claim name is empty",
                Some("name the claim, e.g. `claims = { role = \"admin\" }`".into()),
            );
            continue;
        }
        if name == "scope" || name == "scp" {
            ctx.error(
                value.span(),
                format!("`{name}` is checked by `scopes`, not `claims`"),
                Some(format!(
                    "write `scopes = [\"…\"]`: each scope in `{name}` is one word of its value"
                )),
            );
            continue;
        }
        let single = |v: &toml::Value| match v {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Boolean(b) => Some(b.to_string()),
            toml::Value::Integer(i) => Some(i.to_string()),
            _ => None,
        };
        let values = match value.get_ref() {
            toml::Value::Array(list) => list.iter().map(single).collect::<Option<Vec<_>>>(),
            v => single(v).map(|v| vec![v]),
        };
        match values {
            Some(values) if values.is_empty() => ctx.error(
                value.span(),
                format!("claim `{name}` lists no value: no token could pass"),
                Some(format!(
                    "list the values `{name}` may have, or remove the claim"
                )),
            ),
            Some(values) => {
                claims.insert(name.clone(), values);
            }
            None => ctx.error(
                value.span(),
                format!(
                    "claim `{name}` must be a string, a boolean, an integer or an array of them"
                ),
                Some(format!(
                    "e.g. `{name} = \"admin\"` or `{name} = [\"admin\", \"ops\"]`"
                )),
            ),
        }
    }
    (ctx.errors.len() == before).then_some(claims)
}

/// `[gateway.api_keys]`: the header (a token, not one the gateway sets or
/// `authorization`, which bearer tokens take) and each consumer's keys as
/// `sha256:<64 hex digits>`, none under two consumers.
pub(super) fn api_keys(ctx: &mut Ctx<'_>, raw: &Spanned<RawApiKeys>) -> Option<ApiKeys> {
    let before = ctx.errors.len();
    let raw = raw.get_ref();
    let header = match &raw.header {
        Some(h) => {
            let lower = h.get_ref().to_ascii_lowercase();
            let bad = lower.is_empty()
                || !lower.bytes().all(is_token_byte)
                || lower.starts_with("x-flotilla-")
                || lower == "authorization"
                || lower == "cookie";
            if bad {
                ctx.error(
                    h.span(),
                    format!("`header = \"{}\"` cannot carry API keys", h.get_ref()),
                    Some("name a header of its own, e.g. `header = \"x-api-key\"` (not `authorization`, `cookie` or `x-flotilla-*`)".into()),
                );
            }
            lower
        }
        None => ApiKeys::DEFAULT_HEADER.to_string(),
    };
    let mut consumers = BTreeMap::new();
    let mut owner: BTreeMap<[u8; 32], String> = BTreeMap::new();
    for (name, keys) in raw.consumers.get_ref() {
        if !ApiKeys::is_consumer_name(name) {
            ctx.error(
                keys.span(),
                format!("`{name}` is not a consumer name"),
                Some("use up to 64 letters, digits, `-`, `_` or `.`, e.g. `partner-a`".into()),
            );
            continue;
        }
        if keys.get_ref().is_empty() {
            ctx.error(
                keys.span(),
                format!("consumer `{name}` has no key: it could never be let in"),
                Some("give it one, or remove it".into()),
            );
            continue;
        }
        let mut digests = Vec::new();
        for key in keys.get_ref() {
            let Some(digest) = sha256_of(key.get_ref()) else {
                ctx.error(
                    key.span(),
                    format!("`{}` is not a key's digest", key.get_ref()),
                    Some("write `sha256:` and the 64 hex digits of the key's SHA-256, never the key itself: `printf %s \"$KEY\" | sha256sum`".into()),
                );
                continue;
            };
            if let Some(other) = owner.insert(digest, name.clone()) {
                ctx.error(
                    key.span(),
                    format!("this key is also `{other}`'s: a key names one consumer"),
                    Some("give each consumer keys of its own".into()),
                );
                continue;
            }
            digests.push(digest);
        }
        consumers.insert(name.clone(), digests);
    }
    if raw.consumers.get_ref().is_empty() {
        ctx.error(
            raw.consumers.span(),
            "`[gateway.api_keys]` names no consumer",
            Some("add one, e.g. `consumers = { partner-a = [\"sha256:…\"] }`".into()),
        );
    }
    (ctx.errors.len() == before).then_some(ApiKeys { header, consumers })
}

/// `[gateway.authz]`: a declared service, a path prefix, a timeout, and
/// header names: those the check gets (any token) and those of its
/// answer that go on with the request (none the gateway sets itself).
/// `key_header`: the API keys' header, if `[gateway.api_keys]` is set,
/// which the gateway takes off every request before the check.
pub(super) fn authz(
    ctx: &mut Ctx<'_>,
    raw: &Spanned<RawAuthz>,
    declared: &[String],
    key_header: Option<&str>,
) -> Option<Authz> {
    let before = ctx.errors.len();
    let raw = raw.get_ref();
    let service = raw.service.get_ref().clone();
    if !declared.contains(&service) {
        ctx.error(
            raw.service.span(),
            format!("`service = \"{service}\"` is not a service of this system"),
            Some(if declared.is_empty() {
                "declare the service that decides, e.g. `[services.authz]`".into()
            } else {
                format!("name one of {}", quoted(declared))
            }),
        );
    }
    let path_prefix = match &raw.path_prefix {
        None => String::new(),
        Some(p) => {
            let prefix = p.get_ref().trim_end_matches('/').to_string();
            let ok = p.get_ref().starts_with('/')
                && prefix
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !matches!(b, b'?' | b'#' | b'%'))
                && !prefix.split('/').any(|seg| seg == "." || seg == "..");
            if !ok {
                ctx.error(
                    p.span(),
                    format!("`path_prefix = \"{}\"` is not a path prefix", p.get_ref()),
                    Some("write an absolute path without a query, e.g. `path_prefix = \"/check\"`: the check of `GET /api/orders` is then `GET /check/api/orders`".into()),
                );
            }
            prefix
        }
    };
    let timeout = match &raw.timeout {
        None => Authz::DEFAULT_TIMEOUT,
        Some(t) => {
            let timeout = ctx.duration(t, "timeout")?;
            if timeout > Authz::MAX_TIMEOUT {
                ctx.error(
                    t.span(),
                    format!("`timeout = \"{}\"` is longer than a check may take (60s)", t.get_ref()),
                    Some("a check is on every request's path: give it at most a second or two, e.g. `timeout = \"500ms\"`".into()),
                );
            }
            timeout
        }
    };
    let mut names = |list: Option<&Vec<Spanned<String>>>, upstream: bool| -> Vec<String> {
        let mut out = Vec::new();
        for name in list.into_iter().flatten() {
            let lower = name.get_ref().to_ascii_lowercase();
            // Both ways, the fields the gateway writes itself on a request
            // (the connection's, framing, `Host`, forwarding, the request
            // id, the caller): the check gets the gateway's, and no answer
            // may set them.
            let why = if lower.is_empty() || !lower.bytes().all(is_token_byte) {
                Some("it is not a header name")
            } else if !upstream && lower.starts_with("x-flotilla-") {
                Some("the gateway tells the check the caller itself")
            } else if key_header.is_some_and(|k| k.eq_ignore_ascii_case(&lower)) {
                Some(
                    "the gateway takes the API-key header off every request first, and tells the check the key's consumer",
                )
            } else {
                reserved_header(&lower, HeaderDirection::Request)
            };
            match why {
                Some(why) => ctx.error(
                    name.span(),
                    format!("`{}` cannot be listed here: {why}", name.get_ref()),
                    Some(if upstream {
                        "list the headers the check's answer adds for the service, e.g. `upstream_headers = [\"x-tenant-id\"]`".into()
                    } else {
                        "list the client's headers the check reads, e.g. `request_headers = [\"authorization\", \"cookie\"]`".into()
                    }),
                ),
                None if !out.contains(&lower) => out.push(lower),
                None => {}
            }
        }
        out
    };
    let request_headers = match &raw.request_headers {
        None => Authz::DEFAULT_REQUEST_HEADERS.map(String::from).to_vec(),
        Some(list) => names(Some(list), false),
    };
    let upstream_headers = names(raw.upstream_headers.as_ref(), true);
    let failure_open = match raw.failure.as_ref().map(|f| f.get_ref().as_str()) {
        None | Some("deny") => false,
        Some("allow") => true,
        Some(other) => {
            let span = raw.failure.as_ref().map(|f| f.span()).unwrap_or_default();
            ctx.error(
                span,
                format!("`failure = \"{other}\"` is neither `deny` nor `allow`"),
                Some("`deny` (the default) refuses a request the check could not decide with 503; `allow` lets it through".into()),
            );
            false
        }
    };
    (ctx.errors.len() == before).then_some(Authz {
        service,
        path_prefix,
        timeout,
        request_headers,
        upstream_headers,
        failure_open,
    })
}

/// `sha256:` and 64 hex digits, as bytes.
fn sha256_of(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.strip_prefix("sha256:")?, &mut out).ok()?;
    Some(out)
}

/// A key route's `consumers`: each one of `[gateway.api_keys]`'s (`known`;
/// `None` when that table is invalid, and then not checked against), at
/// least one. Left out, every consumer is admitted; `consumers = []` is
/// refused like `hosts = []` and `issuers = []`, since read as "none" it
/// would lock every key out, and read as "any" it widens silently.
pub(super) fn route_consumers(
    ctx: &mut Ctx<'_>,
    raw: Option<&Spanned<Vec<Spanned<String>>>>,
    known: Option<&BTreeSet<String>>,
) -> Option<Vec<String>> {
    let Some(raw) = raw else {
        return Some(Vec::new());
    };
    if raw.get_ref().is_empty() {
        ctx.error(
            raw.span(),
            "`consumers = []` names no consumer",
            Some("list the consumers whose keys the route admits, e.g. `consumers = [\"partner-a\"]`, or leave `consumers` out to admit every consumer of `[gateway.api_keys]`".into()),
        );
        return None;
    }
    let mut consumers = Vec::new();
    for name in raw.get_ref() {
        if let Some(known) = known
            && !known.contains(name.get_ref())
        {
            ctx.error(
                name.span(),
                format!(
                    "`{}` is not a consumer of `[gateway.api_keys]`",
                    name.get_ref()
                ),
                Some(format!(
                    "name one of {}",
                    known
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            );
            return None;
        }
        consumers.push(name.get_ref().clone());
    }
    Some(consumers)
}

/// A route's `match_headers`: header names (kept in lower case) to a
/// string, or a non-empty array of strings, one of which the request's
/// value must be. At most 16 names; none the gateway itself sets or
/// strips, which no client could match.
pub(super) fn match_headers(
    ctx: &mut Ctx<'_>,
    raw: &Spanned<BTreeMap<String, Spanned<toml::Value>>>,
) -> Option<BTreeMap<String, Vec<String>>> {
    const MAX: usize = 16;
    let before = ctx.errors.len();
    if raw.get_ref().len() > MAX {
        ctx.error(
            raw.span(),
            format!("`match_headers` names {} headers", raw.get_ref().len()),
            Some(format!("name at most {MAX}")),
        );
        return None;
    }
    let mut headers = BTreeMap::new();
    // Each lower-cased name and how it was first written.
    let mut written: BTreeMap<String, &str> = BTreeMap::new();
    for (name, value) in raw.get_ref() {
        let lower = name.to_ascii_lowercase();
        // Header names are case-insensitive: TOML keeps `X-Canary` and
        // `x-canary` apart, and one of their values would be dropped.
        if let Some(first) = written.insert(lower.clone(), name) {
            ctx.error(
                value.span(),
                format!("`{name}` and `{first}` are the same header"),
                Some(format!(
                    "give `{lower}` once, with every value it may have in a list"
                )),
            );
            continue;
        }
        if lower.is_empty() || !lower.bytes().all(is_token_byte) {
            ctx.error(
                value.span(),
                format!("`{name}` is not a header name"),
                Some("use letters, digits and `-`, e.g. `x-canary`".into()),
            );
            continue;
        }
        if lower.starts_with("x-flotilla-") || lower == "x-forwarded-client-cert" {
            ctx.error(
                value.span(),
                format!(
                    "`{name}` is set by the gateway, never by a client: no request could match it"
                ),
                Some("match a header clients send, e.g. `x-canary`".into()),
            );
            continue;
        }
        match match_header_values(value.get_ref()) {
            Some(values) if !values.is_empty() => {
                headers.insert(lower, values);
            }
            Some(_) => ctx.error(
                value.span(),
                format!("`{name}` lists no value: no request could match"),
                Some(format!("list the values `{name}` may have, or remove it")),
            ),
            None => ctx.error(
                value.span(),
                format!("`{name}` must be a string or an array of strings"),
                Some(format!(
                    "e.g. `\"{name}\" = \"1\"` or `\"{name}\" = [\"a\", \"b\"]`"
                )),
            ),
        }
    }
    (ctx.errors.len() == before).then_some(headers)
}

/// A `match_headers` value: a string is a list of one. `None` if it is
/// neither a string nor an array of them.
pub(super) fn match_header_values(value: &toml::Value) -> Option<Vec<String>> {
    let text = |v: &toml::Value| v.as_str().map(str::to_string);
    match value {
        toml::Value::Array(list) => list.iter().map(text).collect(),
        v => text(v).map(|v| vec![v]),
    }
}

/// `request_headers` or `response_headers`: names that are tokens (kept in
/// lower case) and not the gateway's own ([`reserved_header`]), values of
/// visible ASCII, each name once across `set` and `remove`.
pub(super) fn header_changes(
    ctx: &mut Ctx<'_>,
    raw: &Spanned<RawHeaderChanges>,
    direction: HeaderDirection,
) -> Option<HeaderChanges> {
    let span = raw.span();
    let raw = raw.get_ref();
    let before = ctx.errors.len();
    let mut changes = HeaderChanges::default();
    let mut seen: Vec<String> = Vec::new();
    let mut name_ok = |ctx: &mut Ctx<'_>, name: &str, at: std::ops::Range<usize>, add: bool| {
        let lower = name.to_ascii_lowercase();
        if lower.is_empty() || !lower.bytes().all(is_token_byte) {
            ctx.error(
                at,
                format!("`{name}` is not a header name"),
                Some("use letters, digits and `-`, e.g. `x-content-type-options`".into()),
            );
            return None;
        }
        if let Some(why) = reserved_header(&lower, direction) {
            ctx.error(
                at,
                format!("`{lower}` cannot be changed here: {why}"),
                Some("remove it from this table".into()),
            );
            return None;
        }
        if let Some(why) = only_added(&lower, direction).filter(|_| !add) {
            ctx.error(
                at,
                format!("`{lower}` can only be added to: {why}"),
                Some(format!("write `add = {{ {lower} = \"…\" }}`")),
            );
            return None;
        }
        if seen.contains(&lower) {
            ctx.error(
                at,
                format!("`{lower}` is named twice"),
                Some("name each header once, in `set`, `add` or `remove`".into()),
            );
            return None;
        }
        seen.push(lower.clone());
        Some(lower)
    };
    let sets = raw.set.iter().flatten().map(|field| (false, field));
    let adds = raw.add.iter().flatten().map(|field| (true, field));
    for (add, (name, value)) in sets.chain(adds) {
        let Some(lower) = name_ok(ctx, name, value.span(), add) else {
            continue;
        };
        let v = value.get_ref();
        if !v.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)) {
            ctx.error(
                value.span(),
                format!("the value of `{lower}` has a character a header cannot carry"),
                Some("use visible ASCII, spaces and tabs: no line breaks or control characters; percent-encode anything else".into()),
            );
            continue;
        }
        let list = if add {
            &mut changes.add
        } else {
            &mut changes.set
        };
        list.push((lower, v.trim().to_string()));
    }
    for name in raw.remove.iter().flatten() {
        if let Some(lower) = name_ok(ctx, name.get_ref(), name.span(), false) {
            changes.remove.push(lower);
        }
    }
    if raw.set.is_none() && raw.remove.is_none() && raw.add.is_none() {
        ctx.error(
            span,
            "this table changes nothing",
            Some("add `set = { \"x-frame-options\" = \"DENY\" }`, `add = { vary = \"Accept-Language\" }` or `remove = [\"x-powered-by\"]`, or remove the table".into()),
        );
    }
    changes.set.sort();
    changes.add.sort();
    (ctx.errors.len() == before).then_some(changes)
}

/// `[gateway.compression]`: each key in range, each type a media type
/// (`type/subtype` or `type/*`, no parameters), at least one type.
pub(super) fn compression(ctx: &mut Ctx<'_>, raw: &Spanned<RawCompression>) -> Option<Compression> {
    let raw = raw.get_ref();
    let mut c = Compression::default();
    let before = ctx.errors.len();
    if let Some(m) = &raw.min_bytes {
        c.min_bytes = ctx
            .count(m, "min_bytes", 0, MAX_BODY_LIMIT)
            .map_or(0, u64::from);
    }
    if let Some(l) = &raw.level {
        c.level = ctx.count(l, "level", 1, 9).unwrap_or(1);
    }
    if let Some(types) = &raw.types {
        if types.get_ref().is_empty() {
            ctx.error(
                types.span(),
                "`types = []` compresses nothing",
                Some("list media types, e.g. `types = [\"application/json\"]`, or leave `[gateway.compression]` out".into()),
            );
        }
        c.types.clear();
        for t in types.get_ref() {
            let lower = t.get_ref().trim().to_ascii_lowercase();
            let token = |s: &str| {
                !s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
            };
            let valid = match lower.split_once('/') {
                Some(("*", _)) => false,
                Some((kind, "*")) => token(kind),
                Some((kind, sub)) => token(kind) && token(sub),
                None => false,
            };
            if !valid {
                ctx.error(
                    t.span(),
                    format!("`{}` is not a media type the gateway can compress", t.get_ref()),
                    Some("write `type/subtype` (`application/json`) or `type/*` (`text/*`), without parameters; `*/*` would compress images and archives too".into()),
                );
            } else if c.types.contains(&lower) {
                ctx.error(t.span(), format!("`{lower}` is listed twice"), None);
            } else {
                c.types.push(lower);
            }
        }
    }
    (ctx.errors.len() == before).then_some(c)
}

/// `[gateway.cache]`: both sizes in range, an entry no larger than the
/// store.
pub(super) fn cache_store(ctx: &mut Ctx<'_>, raw: &Spanned<RawCacheStore>) -> Option<CacheStore> {
    let raw = raw.get_ref();
    let mut c = CacheStore::default();
    let before = ctx.errors.len();
    if let Some(m) = &raw.max_bytes {
        // Not `ctx.count`: 4 GiB is one more than a u32 holds.
        let v = *m.get_ref();
        match u64::try_from(v) {
            Ok(n) if (MIN_CACHE_BYTES..=MAX_CACHE_BYTES).contains(&n) => c.max_bytes = n,
            _ => ctx.error(
                m.span(),
                format!("`max_bytes = {v}` is out of range"),
                Some(format!(
                    "use a whole number from {MIN_CACHE_BYTES} (1 KiB) to {MAX_CACHE_BYTES} (4 GiB)"
                )),
            ),
        }
    }
    if let Some(m) = &raw.max_entry_bytes {
        c.max_entry_bytes = ctx
            .count(m, "max_entry_bytes", 1, MAX_BODY_LIMIT)
            .map_or(0, u64::from);
    }
    if ctx.errors.len() == before && c.max_entry_bytes > c.max_bytes {
        let span = raw
            .max_entry_bytes
            .as_ref()
            .or(raw.max_bytes.as_ref())
            .map(Spanned::span)
            .unwrap_or_default();
        ctx.error(
            span,
            format!(
                "`max_entry_bytes = {}` is more than the whole cache (`max_bytes = {}`)",
                c.max_entry_bytes, c.max_bytes
            ),
            Some("raise `max_bytes`, or lower `max_entry_bytes`".into()),
        );
    }
    (ctx.errors.len() == before).then_some(c)
}

/// The longest `ttl` a route may give: a year, as RFC 9111's `max-age`
/// advice has it for "never expires".
const MAX_CACHE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// A route's `cache`: a `ttl` of a whole second or more, and
/// `stale_if_error` and `stale_while_revalidate` of zero or more (each at
/// most a year), on a route that takes GET (only GET responses are kept),
/// and optionally the query parameters that count.
pub(super) fn route_cache(
    ctx: &mut Ctx<'_>,
    raw: &Spanned<RawRouteCache>,
    methods: &[String],
) -> Option<RouteCache> {
    if !methods.is_empty() && !methods.iter().any(|m| m == "GET") {
        ctx.error(
            raw.span(),
            "`cache` keeps GET responses only, and this route takes no GET",
            Some("add \"GET\" to the route's `methods`, or remove `cache`".into()),
        );
        return None;
    }
    let raw = raw.get_ref();
    let ttl = match &raw.ttl {
        Some(t) => {
            let ttl = ctx.duration(t, "ttl")?;
            if ttl < Duration::from_secs(1) || ttl > MAX_CACHE_TTL {
                ctx.error(
                    t.span(),
                    format!("`ttl = \"{}\"` is out of range", t.get_ref()),
                    Some("give from 1s to 365d; `Age` counts whole seconds".into()),
                );
                return None;
            }
            ttl
        }
        None => RouteCache::DEFAULT_TTL,
    };
    let mut window = |raw: &Option<Spanned<String>>, key: &str| match raw {
        Some(s) => {
            let window = ctx.duration_or_zero(s, key, true)?;
            if window > MAX_CACHE_TTL {
                ctx.error(
                    s.span(),
                    format!("`{key} = \"{}\"` is out of range", s.get_ref()),
                    Some("give from 0s (never) to 365d".into()),
                );
                return None;
            }
            Some(window)
        }
        None => Some(Duration::ZERO),
    };
    let stale_if_error = window(&raw.stale_if_error, "stale_if_error")?;
    let stale_while_revalidate = window(&raw.stale_while_revalidate, "stale_while_revalidate")?;
    let query = match &raw.query {
        Some(names) => Some(query_names(ctx, names)?),
        None => None,
    };
    Some(RouteCache {
        ttl,
        stale_if_error,
        stale_while_revalidate,
        query,
    })
}

/// A cache's `query`: parameter names as a client writes them, each once,
/// and none holding what would end or split a parameter.
fn query_names(ctx: &mut Ctx<'_>, raw: &Spanned<Vec<Spanned<String>>>) -> Option<Vec<String>> {
    const MAX: usize = 64;
    if raw.get_ref().len() > MAX {
        ctx.error(
            raw.span(),
            format!("`query` names {} parameters", raw.get_ref().len()),
            Some(format!("name at most {MAX}")),
        );
        return None;
    }
    let mut names: Vec<String> = Vec::with_capacity(raw.get_ref().len());
    for name in raw.get_ref() {
        let text = name.get_ref();
        let bad = text.is_empty()
            || text.len() > 256
            || text
                .bytes()
                .any(|b| matches!(b, b'&' | b'=' | b'#' | b'?') || !b.is_ascii_graphic());
        if bad {
            ctx.error(
                name.span(),
                format!("`{text}` is not a query parameter's name"),
                Some(
                    "give a name as clients write it in the URL, like \"page\" (no `&`, `=`, `#`, `?` or spaces)"
                        .into(),
                ),
            );
            return None;
        }
        if names.contains(text) {
            ctx.error(
                name.span(),
                format!("`{text}` is listed twice in `query`"),
                Some("name each parameter once".into()),
            );
            return None;
        }
        names.push(text.clone());
    }
    Some(names)
}
