//! JWT authentication at the edge: routes with `auth = jwt` only see
//! requests that carry a valid access token, and services learn who the
//! caller is from `x-flotilla-user-*` headers the gateway sets (and that no
//! client can set: copies are stripped from every request, see `edge`).
//!
//! A token is `Authorization: Bearer <compact JWS>` (which a browser's
//! WebSocket handshake may offer as a subprotocol instead: the edge moves
//! it here first, see `upgrade::token_from_subprotocol`), signed with EdDSA,
//! ES256/384 or RSA (RS*/PS*) by a key in the configured JWKS ([`jwks`]),
//! verified by [`jws`],
//! and accepted when `exp`/`nbf` hold (with `leeway`), `iss` is the
//! configured issuer, `aud` names one of the configured audiences, and
//! `sub` is present. The route may also require scopes (`scope`, space
//! separated, or `scp`) and claim values.
//!
//! There may be several issuers ([`Verifiers`]), each with its own keys,
//! cache and settings. A route takes the first's tokens unless it names
//! others ([`Issuers`]); a token no cache holds goes to the issuer its
//! (unverified) `iss` names, and only to it. Callers of any issuer but the
//! first are `<name>:<sub>` with `x-flotilla-user-issuer`, so that no
//! service takes them for the system's own users.
//!
//! Verified tokens are cached, keyed by the whole token, until they expire
//! or the key set changes: a signature check costs ~50 µs, a cache hit a
//! hash of the token and one comparison, and the same token is typically
//! presented many times in its 15 minutes.
//!
//! Every failure is a 401 with `WWW-Authenticate: Bearer
//! error="invalid_token"` (a missing token gets the bare challenge, as
//! RFC 6750 §3.1 asks), missing scopes or claims a 403 with
//! `error="insufficient_scope"`; the reason goes to metrics and the debug
//! log, never to the client.

pub(crate) mod cookie;
pub(crate) mod jwks;
pub(crate) mod jws;

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use hashbrown::HashTable;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use serde_json::{Map, Value};
use tokio_util::task::AbortOnDropHandle;

use self::jwks::KeyStore;
use self::jws::JwsError;
use crate::client::{self, FetchClient, WebTrustError};
use crate::upstream::Upstreams;

/// The prefix of the identity headers the gateway sets.
pub(crate) const USER_HEADER_PREFIX: &str = "x-flotilla-user-";
pub(crate) static USER_ID: HeaderName = HeaderName::from_static("x-flotilla-user-id");
/// The name of the issuer that verified a caller's token, for every issuer
/// but the first (whose callers are the system's own users).
pub(crate) static USER_ISSUER: HeaderName = HeaderName::from_static("x-flotilla-user-issuer");

/// How the gateway verifies one issuer's access tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    /// What routes' `issuers` call it; for every issuer but the first, the
    /// prefix of its callers' ids (`<name>:<sub>`) and their
    /// `x-flotilla-user-issuer`. Default `default`.
    pub name: String,
    /// The required `iss` claim.
    pub issuer: String,
    /// `aud` must name at least one of these; empty skips the check (not
    /// recommended: a token for another system would be accepted).
    pub audiences: Vec<String>,
    /// Where the verification keys come from.
    pub jwks: JwksSource,
    /// For an `https://` source: the PEM file of the CAs its server's
    /// certificate must chain to; `None` trusts the machine's roots.
    pub jwks_ca: Option<PathBuf>,
    /// How often the JWKS is fetched again (default 5 min).
    pub refresh_interval: Duration,
    /// The least time between two refetches triggered by an unknown `kid`
    /// (default 10 s): anyone can send an unknown kid.
    pub refetch_min_interval: Duration,
    /// Clock skew allowed on `exp` and `nbf` (default 60 s).
    pub leeway: Duration,
    /// Larger tokens are refused unread (default 8 KiB).
    pub max_token_bytes: usize,
    /// A cookie the token may come in when a request has no
    /// `Authorization: Bearer` (see [`cookie`]: honoured on requests that
    /// could change something only from this site).
    pub cookie: Option<String>,
    /// Claims forwarded to services as `x-flotilla-user-<claim>` (lower
    /// case, `_` as `-`), besides `sub` as `x-flotilla-user-id`. Each is
    /// looked up by its name as written (claim names are case-sensitive:
    /// `tenantId` goes as `x-flotilla-user-tenantid`). Strings go
    /// as they are, numbers and booleans as JSON, arrays of strings joined
    /// with spaces; other values are not forwarded.
    pub forward_claims: Vec<String>,
}

impl JwtConfig {
    /// Defaults for everything but the three settings that have none.
    pub fn new(issuer: impl Into<String>, audiences: Vec<String>, jwks: JwksSource) -> JwtConfig {
        JwtConfig {
            name: "default".to_string(),
            issuer: issuer.into(),
            audiences,
            jwks,
            jwks_ca: None,
            refresh_interval: Duration::from_secs(300),
            refetch_min_interval: Duration::from_secs(10),
            leeway: Duration::from_secs(60),
            max_token_bytes: 8 * 1024,
            cookie: None,
            forward_claims: Vec::new(),
        }
    }
}

/// Where a JWKS is fetched from.
///
/// String form: `https://host[:port]/path` (a URL; `http://` to this
/// machine only), or `<service>:<path>`
/// (e.g. `accounts:/.well-known/jwks.json`: a ready instance of that
/// service of this system, activated if needed). A file has no string
/// form: the manifest names it with `jwks_file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    Url(Uri),
    Service {
        service: String,
        path: String,
    },
    /// A JWKS document on this machine, read at every refresh (and on an
    /// unknown `kid`), as Envoy's `local_jwks`.
    File(PathBuf),
}

/// Why a JWKS source string does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksSourceError {
    #[error(
        "`{0}` is not a JWKS source: write `https://host[:port]/path` or `<service>:/path`, e.g. \"accounts:/.well-known/jwks.json\""
    )]
    Invalid(String),
    /// The manifest's parser refused it; its message says why and the fix.
    #[error("{0}")]
    Refused(String),
}

impl FromStr for JwksSource {
    type Err = JwksSourceError;

    fn from_str(s: &str) -> Result<JwksSource, JwksSourceError> {
        JwksSource::parse(s)
    }
}

impl JwksSource {
    /// Parses the manifest's syntax (with the manifest's parser) and checks
    /// that the URL is one the gateway can fetch.
    pub fn parse(s: &str) -> Result<JwksSource, JwksSourceError> {
        match flotilla_manifest::JwksSource::parse(s) {
            Ok(source) => JwksSource::try_from(&source),
            Err(why) => Err(JwksSourceError::Refused(why)),
        }
    }
}

impl TryFrom<&flotilla_manifest::JwksSource> for JwksSource {
    type Error = JwksSourceError;

    fn try_from(source: &flotilla_manifest::JwksSource) -> Result<JwksSource, JwksSourceError> {
        match source {
            flotilla_manifest::JwksSource::Url(url) => {
                let invalid = || JwksSourceError::Invalid(url.clone());
                let uri: Uri = url.parse().map_err(|_| invalid())?;
                if !jwks::check_url(&uri) {
                    return Err(invalid());
                }
                Ok(JwksSource::Url(uri))
            }
            flotilla_manifest::JwksSource::File(path) => Ok(JwksSource::File(path.clone())),
            flotilla_manifest::JwksSource::Service { service, path } => {
                if path.parse::<http::uri::PathAndQuery>().is_err() {
                    return Err(JwksSourceError::Invalid(format!("{service}:{path}")));
                }
                Ok(JwksSource::Service {
                    service: service.clone(),
                    path: path.clone(),
                })
            }
        }
    }
}

/// Who may call a route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RouteAuth {
    /// Anyone (`auth = "public"`, the default).
    #[default]
    Public,
    /// Anyone, but a bearer token, if the request has one, must be valid,
    /// and then identifies the caller (`auth = "optional"`): a page that
    /// everyone may read and a signed-in user sees personalised.
    Optional,
    /// A valid access token (`auth = "jwt"`), having every scope in
    /// `scopes` and, for each `claims` entry, that claim equal to one of the
    /// values (or, for an array claim, containing one). See [`claim`] for
    /// how a name finds its claim.
    Jwt {
        scopes: Vec<String>,
        claims: BTreeMap<String, Vec<String>>,
    },
    /// An API key of one of `consumers`, any consumer's when empty
    /// (`auth = "key"`, [`crate::apikey`]).
    Key { consumers: Vec<String> },
}

/// Why an auth string does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown auth `{0}`: write `public`, `optional` or `jwt`")]
pub struct RouteAuthParseError(pub String);

impl RouteAuth {
    /// `jwt` with no scope or claim requirements.
    pub fn jwt() -> RouteAuth {
        RouteAuth::Jwt {
            scopes: Vec::new(),
            claims: BTreeMap::new(),
        }
    }

    /// `"public"`, `"optional"` or `"jwt"`; scopes and claims are set on
    /// the result.
    pub fn parse(s: &str) -> Result<RouteAuth, RouteAuthParseError> {
        match s {
            "public" => Ok(RouteAuth::Public),
            "optional" => Ok(RouteAuth::Optional),
            "jwt" => Ok(RouteAuth::jwt()),
            other => Err(RouteAuthParseError(other.to_string())),
        }
    }
}

/// A verified caller, shared by every request carrying the same token.
#[derive(Debug)]
pub(crate) struct Identity {
    /// `u:<sub>`, the caller's key under `per user` rate limits, made once
    /// per verified token rather than once per request.
    pub rate_key: Box<str>,
    /// Its hash in the rate limits' memory stores, made once with it.
    pub rate_key_hash: u64,
    scopes: Vec<String>,
    claims: Map<String, Value>,
    /// Seconds since the epoch.
    exp: f64,
    /// `x-flotilla-user-id` and the forwarded claims.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The API-key consumer it is, when a key identified it.
    consumer: Option<String>,
}

impl Identity {
    /// The caller an API key of `name`'s identifies
    /// ([`crate::apikey::KeyVerifier`]): `x-flotilla-user-id: <name>`, and
    /// its own count under `per user` rate limits.
    pub(crate) fn consumer(name: &str) -> Identity {
        let rate_key: Box<str> = format!("k:{name}").into();
        Identity {
            rate_key_hash: crate::ratelimit::gcra::key_hash(&rate_key),
            rate_key,
            scopes: Vec::new(),
            claims: Map::new(),
            exp: f64::INFINITY,
            // A consumer's name is a header value (the manifest checks it).
            headers: HeaderValue::from_str(name)
                .map(|v| vec![(USER_ID.clone(), v)])
                .unwrap_or_default(),
            consumer: Some(name.to_string()),
        }
    }

    /// The API-key consumer it is, if a key identified it.
    pub(crate) fn consumer_name(&self) -> Option<&String> {
        self.consumer.as_ref()
    }

    /// The value it gives the identity field `name` (lower case), if any.
    pub(crate) fn field(&self, name: &str) -> Option<&HeaderValue> {
        self.headers
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, v)| v)
    }
}

/// The field `name` (lower case) of a request with `headers`, whose
/// caller is `identity`: the identity's fields (`x-flotilla-user-id`, the
/// forwarded claims) reach the instance with the request, but are not put
/// among its fields (`headers::Told`).
pub(crate) fn request_field<'a>(
    headers: &'a HeaderMap,
    identity: Option<&'a Identity>,
    name: &str,
) -> Option<&'a HeaderValue> {
    identity
        .and_then(|i| i.field(name))
        .or_else(|| headers.get(name))
}

/// An authentication or authorization failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AuthError {
    /// No `Authorization: Bearer` at all.
    Missing,
    /// 401 invalid_token; `reason` is for metrics and logs.
    Invalid(&'static str),
    /// 403 insufficient_scope.
    Forbidden {
        reason: &'static str,
        scope: Option<String>,
    },
}

impl AuthError {
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Invalid(r) | AuthError::Forbidden { reason: r, .. } => r,
        }
    }
}

/// Verifies tokens for one [`JwtConfig`]; kept across reloads while the
/// config is unchanged (keys and cache survive).
pub(crate) struct Verifier {
    pub config: JwtConfig,
    /// Not the first issuer: its callers' ids are `<name>:<sub>`, and they
    /// carry `x-flotilla-user-issuer: <name>`, so that no service takes
    /// them for the system's own users of the same `sub`.
    pub secondary: bool,
    /// What `jwks_ca` held as the verifier began (a hash): a verifier is
    /// kept across a reload only while the file holds the same.
    ca_stamp: Option<u64>,
    store: Arc<KeyStore>,
    cache: TokenCache,
    forward: Vec<(String, HeaderName)>,
    /// The background refresh, stopped when the verifier is dropped.
    _refresh: AbortOnDropHandle<()>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuer", &self.config.issuer)
            .finish_non_exhaustive()
    }
}

/// A hash of what `config`'s `jwks_ca` file holds, if it has one: its
/// contents rather than its modification time, which file systems keep
/// only to a clock tick (two writes within one look alike). A few KiB,
/// read on a reload only.
fn ca_stamp(config: &JwtConfig) -> Option<u64> {
    let ca = config.jwks_ca.as_deref()?;
    let bytes = std::fs::read(ca).ok()?;
    Some(foldhash::quality::FixedState::default().hash_one(&bytes))
}

/// The header a forwarded claim travels in, if the claim name can be one.
pub(crate) fn claim_header(claim: &str) -> Option<HeaderName> {
    let ok = !claim.is_empty()
        && claim
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        return None;
    }
    let name = format!(
        "{USER_HEADER_PREFIX}{}",
        claim.to_ascii_lowercase().replace('_', "-")
    );
    HeaderName::from_bytes(name.as_bytes()).ok()
}

impl Verifier {
    /// Starts fetching keys in the background (must run inside tokio):
    /// from a service of this system with `client`, from an `https://`
    /// server with a client of its own that trusts `jwks_ca` or the
    /// machine's roots, which must be there.
    pub(crate) fn start(
        config: JwtConfig,
        secondary: bool,
        client: FetchClient,
        upstreams: Arc<dyn Upstreams>,
        limits: &crate::config::Limits,
    ) -> Result<Verifier, WebTrustError> {
        // Before the roots are read: a change while they are is noticed
        // at the next reload.
        let ca_stamp = ca_stamp(&config);
        let client = match &config.jwks {
            JwksSource::Url(uri) if uri.scheme() == Some(&http::uri::Scheme::HTTPS) => {
                let roots = client::web_roots(config.jwks_ca.as_deref())?;
                client::web_fetch_client(roots, limits)?
            }
            _ => client,
        };
        let store = Arc::new(KeyStore::new(
            config.jwks.clone(),
            client,
            upstreams,
            config.refetch_min_interval,
        ));
        let task = tokio::spawn(jwks::refresh_loop(
            Arc::clone(&store),
            config.refresh_interval,
        ));
        let forward = config
            .forward_claims
            .iter()
            .filter_map(|c| claim_header(c).map(|h| (c.clone(), h)))
            .collect();
        Ok(Verifier {
            config,
            secondary,
            ca_stamp,
            store,
            cache: TokenCache::new(),
            forward,
            _refresh: AbortOnDropHandle::new(task),
        })
    }

    /// Whether this verifier is what `config`, in its place, would start:
    /// the same settings and, for an `https://` JWKS trusting `jwks_ca`,
    /// that file as it was (`flotilla up` reloads when it changes).
    pub(crate) fn still_current(&self, config: &JwtConfig, secondary: bool) -> bool {
        self.config == *config && self.secondary == secondary && self.ca_stamp == ca_stamp(config)
    }

    /// For keys read from a file (`jwks_file`): reads it again now, in the
    /// background, as a reload kept this verifier. `flotilla up` reloads
    /// when the file changes, so a key taken out of it (a leaked one) stops
    /// verifying at once rather than at the next refresh: the set changes,
    /// and with it the version every cached token was verified under.
    pub(crate) fn reread_file(&self) {
        if !matches!(self.config.jwks, JwksSource::File(_)) {
            return;
        }
        let store = Arc::clone(&self.store);
        tokio::spawn(async move {
            if let Err(e) = store.refresh().await {
                tracing::warn!(target: "flotilla::gateway", error = %jwks::chain(&e), "JWKS file not read again; keeping the last good set");
            }
        });
    }

    /// The caller `token` names if this issuer verified it before (and its
    /// keys have not changed since): an error if it has expired since.
    #[inline]
    fn cached(&self, token: &[u8], now: f64) -> Option<Result<Arc<Identity>, AuthError>> {
        let identity = self.cache.get(token, self.store.version())?;
        if now > identity.exp + self.config.leeway.as_secs_f64() {
            return Some(Err(AuthError::Invalid("expired")));
        }
        Some(Ok(identity))
    }

    /// Verifies a token the cache does not hold, and caches its identity.
    async fn verify(
        &self,
        token: &[u8],
        now: f64,
        version: u64,
    ) -> Result<Arc<Identity>, AuthError> {
        let leeway = self.config.leeway.as_secs_f64();
        let text = token_text(token)?;
        let unverified = jws::parse(text, self.config.max_token_bytes).map_err(jws_error)?;
        let key = self
            .store
            .key(&unverified.kid)
            .await
            .ok_or(AuthError::Invalid(JwsError::UnknownKid.reason()))?;
        let claims = unverified.verify(&key).map_err(jws_error)?;
        let identity = Arc::new(self.check_claims(claims, now)?);
        // The version read before the (possible) refetch: a set that
        // changed meanwhile makes this entry a miss next time, never a
        // stale hit.
        self.cache.insert(token, version, &identity, now, leeway);
        Ok(identity)
    }

    fn check_claims(&self, claims: Map<String, Value>, now: f64) -> Result<Identity, AuthError> {
        let leeway = self.config.leeway.as_secs_f64();
        let exp = numeric_date(claims.get("exp")).ok_or(AuthError::Invalid("missing_exp"))?;
        if now > exp + leeway {
            return Err(AuthError::Invalid("expired"));
        }
        match claims.get("nbf") {
            None => {}
            Some(v) => {
                let nbf = numeric_date(Some(v)).ok_or(AuthError::Invalid("malformed"))?;
                if now + leeway < nbf {
                    return Err(AuthError::Invalid("not_yet_valid"));
                }
            }
        }
        if claims.get("iss").and_then(Value::as_str) != Some(self.config.issuer.as_str()) {
            return Err(AuthError::Invalid("wrong_issuer"));
        }
        if !self.config.audiences.is_empty() {
            let aud_ok = match claims.get("aud") {
                Some(Value::String(a)) => self.config.audiences.contains(a),
                Some(Value::Array(list)) => list
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|a| self.config.audiences.iter().any(|c| c == a)),
                _ => false,
            };
            if !aud_ok {
                return Err(AuthError::Invalid("wrong_audience"));
            }
        }
        let sub = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(AuthError::Invalid("missing_sub")),
        };
        // A secondary issuer's callers are told apart from the first's:
        // `<name>:<sub>` with their issuer's name, and their own prefix
        // under `per user` limits (`u:` is the first's), which no `sub`
        // can forge: a name has no `:`.
        let (id, rate_key) = match self.secondary {
            false => (sub.clone(), format!("u:{sub}")),
            true => {
                let name = &self.config.name;
                (format!("{name}:{sub}"), format!("i:{name}:{sub}"))
            }
        };
        let id = HeaderValue::from_str(&id).map_err(|_| AuthError::Invalid("malformed"))?;
        let mut headers = vec![(USER_ID.clone(), id)];
        if self.secondary {
            let issuer = HeaderValue::from_str(&self.config.name)
                .map_err(|_| AuthError::Invalid("malformed"))?;
            headers.push((USER_ISSUER.clone(), issuer));
        }
        for (claim, header) in &self.forward {
            if let Some(v) = claims.get(claim).and_then(header_value) {
                headers.push((header.clone(), v));
            }
        }
        let scopes = match (claims.get("scope"), claims.get("scp")) {
            (Some(Value::String(s)), _) => s
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            (_, Some(Value::String(s))) => s
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            (_, Some(Value::Array(list))) => list
                .iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect(),
            _ => Vec::new(),
        };
        let rate_key = rate_key.into_boxed_str();
        Ok(Identity {
            rate_key_hash: crate::ratelimit::gcra::key_hash(&rate_key),
            rate_key,
            scopes,
            claims,
            exp,
            headers,
            consumer: None,
        })
    }
}

/// The issuers of `[gateway] jwt`, in order: a route takes the first's
/// tokens unless it names others (a bit each in [`Issuers`]).
#[derive(Debug, Default)]
pub(crate) struct Verifiers(pub Vec<Arc<Verifier>>);

/// The issuers a route takes, a bit each by their place in [`Verifiers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Issuers(pub u16);

impl Default for Issuers {
    /// The first only.
    fn default() -> Issuers {
        Issuers(1)
    }
}

impl Issuers {
    fn has(self, i: usize) -> bool {
        i < 16 && self.0 & (1 << i) != 0
    }
}

impl Verifiers {
    /// The caller of a request, from its `Authorization` header, if one of
    /// `accepted` issued its token.
    pub(crate) async fn authenticate(
        &self,
        headers: &HeaderMap,
        accepted: Issuers,
    ) -> Result<Arc<Identity>, AuthError> {
        let token = bearer(headers)?;
        let now = unix_now();
        if let Some(found) = self.cached(token, now, accepted) {
            return found;
        }
        // Boxed: the rare path (a token not seen before, maybe a JWKS
        // refetch) would otherwise make every request's future, and each
        // move of it, that much larger (see `server::Handler`). Not an
        // `identify` awaited here: a future nested in this one is moved
        // with it on every request (~200 instructions, `instructions.sh`).
        Box::pin(self.verify(token, now, accepted)).await
    }

    /// The token in the first cookie an `accepted` issuer reads tokens
    /// from (`cookie`), if the request has one. `Err` (the reason, for the
    /// 401) when it has two different ones under that name: one may have
    /// been set by a sibling host ([`crate::headers::cookie_once`]).
    pub(crate) fn cookie_token<'a>(
        &self,
        headers: &'a HeaderMap,
        accepted: Issuers,
    ) -> Result<Option<&'a [u8]>, &'static str> {
        for (i, v) in self.0.iter().enumerate() {
            let Some(name) = v.config.cookie.as_deref().filter(|_| accepted.has(i)) else {
                continue;
            };
            match crate::headers::cookie_once(headers, name) {
                Ok(None) => {}
                Ok(Some(token)) => return Ok(Some(token)),
                Err(()) => return Err("ambiguous_cookie"),
            }
        }
        Ok(None)
    }

    /// The caller `token` (from a cookie) names, if one of `accepted`
    /// issued it.
    pub(crate) async fn identify(
        &self,
        token: &[u8],
        accepted: Issuers,
    ) -> Result<Arc<Identity>, AuthError> {
        let now = unix_now();
        match self.cached(token, now, accepted) {
            Some(found) => found,
            None => self.verify(token, now, accepted).await,
        }
    }

    /// The caller an `accepted` issuer verified `token` for before, if
    /// one did: one cache lookup for a route of one issuer, the usual case.
    #[inline]
    fn cached(
        &self,
        token: &[u8],
        now: f64,
        accepted: Issuers,
    ) -> Option<Result<Arc<Identity>, AuthError>> {
        for (i, verifier) in self.0.iter().enumerate() {
            if accepted.has(i)
                && let Some(found) = verifier.cached(token, now)
            {
                return Some(found);
            }
        }
        None
    }

    /// Verifies a token no accepted issuer's cache holds, with the keys of
    /// the issuer its `iss` names (read before the signature is checked,
    /// as Envoy's `jwt_authn` picks a provider), and caches its identity.
    async fn verify(
        &self,
        token: &[u8],
        now: f64,
        accepted: Issuers,
    ) -> Result<Arc<Identity>, AuthError> {
        let verifier = match self.0.as_slice() {
            [] => return Err(AuthError::Invalid("no_verifier")),
            // One issuer: its own checks say what is wrong with the token.
            [only] => only,
            several => {
                let largest = several.iter().map(|v| v.config.max_token_bytes).max();
                if token.len() > largest.unwrap_or(0) {
                    return Err(jws_error(JwsError::Oversized));
                }
                let iss = jws::peek_issuer(token_text(token)?).map_err(jws_error)?;
                let found = several
                    .iter()
                    .enumerate()
                    .find(|(_, v)| v.config.issuer == iss);
                match found {
                    Some((i, v)) if accepted.has(i) => v,
                    // Another issuer's, or none of them: not for this
                    // route, whatever its signature.
                    _ => return Err(AuthError::Invalid("wrong_issuer")),
                }
            }
        };
        let version = verifier.store.version();
        verifier.verify(token, now, version).await
    }
}

/// The claim `name` names: the top-level claim of that name if there is
/// one, else, for a dotted name, the path through nested objects, so
/// `realm_access.roles` reaches Keycloak's roles while a namespaced claim
/// such as `https://example.com/roles` (Auth0's) is still found whole.
fn claim<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(name) {
        return Some(v);
    }
    let mut parts = name.split('.');
    let mut at = claims.get(parts.next()?)?;
    for part in parts {
        at = at.as_object()?.get(part)?;
    }
    Some(at)
}

/// A scalar claim equal to one of `wanted`, compared as text (the manifest
/// keeps `true` and `3` as text too). Objects and nulls match nothing.
fn is_one_of(v: &Value, wanted: &[String]) -> bool {
    let text: std::borrow::Cow<'_, str> = match v {
        Value::String(s) => s.as_str().into(),
        Value::Bool(b) => if *b { "true" } else { "false" }.into(),
        Value::Number(n) => n.to_string().into(),
        _ => return false,
    };
    wanted.iter().any(|w| *w == *text)
}

/// Checks a verified caller against a route's requirements.
pub(crate) fn authorize(identity: &Identity, auth: &RouteAuth) -> Result<(), AuthError> {
    let RouteAuth::Jwt { scopes, claims } = auth else {
        return Ok(());
    };
    let missing: Vec<&str> = scopes
        .iter()
        .filter(|s| !identity.scopes.contains(s))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(AuthError::Forbidden {
            reason: "missing_scope",
            scope: Some(scopes.join(" ")),
        });
    }
    for (name, wanted) in claims {
        let ok = match claim(&identity.claims, name) {
            Some(Value::Array(list)) => list.iter().any(|v| is_one_of(v, wanted)),
            Some(v) => is_one_of(v, wanted),
            None => false,
        };
        if !ok {
            return Err(AuthError::Forbidden {
                reason: "missing_claim",
                scope: None,
            });
        }
    }
    Ok(())
}

fn jws_error(e: JwsError) -> AuthError {
    AuthError::Invalid(e.reason())
}

/// A token's bytes as text, if they are ASCII, as every token is: checked
/// only for a token the cache does not hold (it holds verified ones, all
/// ASCII), not on every request (a word at a time over hundreds of bytes:
/// ~90 instructions a request, `instructions.sh`).
fn token_text(token: &[u8]) -> Result<&str, AuthError> {
    if !token.is_ascii() {
        return Err(AuthError::Invalid("malformed"));
    }
    std::str::from_utf8(token).map_err(|_| AuthError::Invalid("malformed"))
}

/// The token of `Authorization: Bearer <token>`; exactly one such header.
/// As bytes: on a cache hit nothing needs it as a `str` (`token_text`
/// checks it otherwise).
fn bearer(headers: &HeaderMap) -> Result<&[u8], AuthError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(AuthError::Missing);
    };
    if values.next().is_some() {
        return Err(AuthError::Invalid("malformed"));
    }
    // Split as bytes: `to_str` checks a byte at a time, and a token is
    // hundreds. The scheme is a few bytes: a plain scan beats a general
    // searcher.
    let value = value.as_bytes();
    let space = value
        .iter()
        .position(|b| *b == b' ')
        .ok_or(AuthError::Invalid("malformed"))?;
    let (scheme, token) = (&value[..space], &value[space + 1..]);
    if !scheme.is_ascii() {
        return Err(AuthError::Invalid("malformed"));
    }
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        // Another scheme (Basic, ...) is not a token we can check.
        return Err(AuthError::Missing);
    }
    let start = token.iter().position(|b| *b != b' ').unwrap_or(token.len());
    let end = token
        .iter()
        .rposition(|b| *b != b' ')
        .map_or(start, |i| i + 1);
    let token = &token[start..end];
    if token.is_empty() {
        return Err(AuthError::Invalid("malformed"));
    }
    Ok(token)
}

fn numeric_date(v: Option<&Value>) -> Option<f64> {
    v?.as_f64().filter(|n| n.is_finite())
}

fn header_value(v: &Value) -> Option<HeaderValue> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Array(list) => {
            let items: Option<Vec<&str>> = list.iter().map(Value::as_str).collect();
            items?.join(" ")
        }
        _ => return None,
    };
    HeaderValue::from_str(&text).ok()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Verified tokens, each with the key-set version it was verified under.
///
/// Keyed by the token itself, compared whole on every hit: a hit hands out
/// an identity, so nothing short of the exact token may match (a digest
/// would do too, but SHA-256 of a typical token cost ~10k instructions per
/// request, a third of the gateway's own work; hashing with a seeded
/// foldhash and comparing the bytes costs a few hundred). Only verified
/// tokens are inserted, so a client cannot fill the cache or aim at one
/// bucket with tokens of its choosing.
///
/// Bounded by count and by bytes: 16 shards of at most 1024 tokens and
/// 256 KiB of token text each (4 MiB in all). A full shard drops its
/// expired entries, and if that is not enough, all of them (they are
/// re-verified on their next use, nothing worse).
struct TokenCache {
    /// Hashes a token once, for its shard (middle bits) and its slot (the
    /// table uses the low bits and the top seven).
    hasher: foldhash::fast::RandomState,
    shards: Box<[Mutex<CacheShard>]>,
}

#[derive(Default)]
struct CacheShard {
    table: HashTable<Cached>,
    /// The bytes of the tokens in `table`.
    bytes: usize,
}

struct Cached {
    hash: u64,
    token: Box<[u8]>,
    /// The key-set version the token was verified under.
    version: u64,
    identity: Arc<Identity>,
}

/// How many of a token's last bytes place it in the cache: an Ed25519
/// signature is 86 base64url characters, an ECDSA or RSA one more.
const HASHED_TAIL: usize = 32;
const CACHE_SHARDS: usize = 16;
const CACHE_PER_SHARD: usize = 1024;
const CACHE_BYTES_PER_SHARD: usize = 256 * 1024;

impl TokenCache {
    fn new() -> TokenCache {
        TokenCache {
            hasher: foldhash::fast::RandomState::default(),
            shards: (0..CACHE_SHARDS)
                .map(|_| Mutex::new(CacheShard::default()))
                .collect(),
        }
    }

    fn locate(&self, token: &[u8]) -> (u64, &Mutex<CacheShard>) {
        // Its length and its last bytes, the end of the signature, which
        // differ between any two tokens as a signature's bytes do: the hash
        // only places a token, and a hit compares it whole. Hashing all of
        // a token's hundreds of bytes cost ~190 instructions a request
        // (`instructions.sh`), these ~40. (Only verified tokens are kept,
        // so no client can make kept tokens share an end.)
        let tail = token.get(token.len().saturating_sub(HASHED_TAIL)..);
        let hash = self.hasher.hash_one((token.len(), tail.unwrap_or(token)));
        (hash, &self.shards[(hash >> 32) as usize % CACHE_SHARDS])
    }

    fn get(&self, token: &[u8], version: u64) -> Option<Arc<Identity>> {
        let (hash, shard) = self.locate(token);
        let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        shard
            .table
            .find(hash, |c| *c.token == *token)
            .filter(|c| c.version == version)
            .map(|c| Arc::clone(&c.identity))
    }

    fn insert(&self, token: &[u8], version: u64, identity: &Arc<Identity>, now: f64, leeway: f64) {
        if token.len() > CACHE_BYTES_PER_SHARD / 16 {
            // Too large to be worth a sixteenth of a shard: verified each time.
            return;
        }
        let (hash, shard) = self.locate(token);
        let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        let shard = &mut *shard;
        if let Ok(mut known) = shard.table.find_entry(hash, |c| *c.token == *token) {
            let cached = known.get_mut();
            cached.version = version;
            cached.identity = Arc::clone(identity);
            return;
        }
        if shard.table.len() >= CACHE_PER_SHARD || shard.bytes + token.len() > CACHE_BYTES_PER_SHARD
        {
            shard
                .table
                .retain(|c| c.version == version && now <= c.identity.exp + leeway);
            shard.bytes = shard.table.iter().map(|c| c.token.len()).sum();
            if shard.table.len() >= CACHE_PER_SHARD
                || shard.bytes + token.len() > CACHE_BYTES_PER_SHARD
            {
                shard.table.clear();
                shard.bytes = 0;
            }
        }
        shard.table.insert_unique(
            hash,
            Cached {
                hash,
                token: token.into(),
                version,
                identity: Arc::clone(identity),
            },
            |c| c.hash,
        );
        shard.bytes += token.len();
    }
}

#[cfg(test)]
mod tests {
    use super::jws::test_keys::Signer;
    use super::*;
    use serde_json::json;

    #[test]
    fn jwks_source_syntax() {
        assert_eq!(
            JwksSource::parse("accounts:/.well-known/jwks.json"),
            Ok(JwksSource::Service {
                service: "accounts".into(),
                path: "/.well-known/jwks.json".into()
            })
        );
        assert!(matches!(
            JwksSource::parse("http://127.0.0.1:9/jwks"),
            Ok(JwksSource::Url(_))
        ));
        assert!(matches!(
            JwksSource::parse("https://idp.example/jwks"),
            Ok(JwksSource::Url(u)) if u.scheme() == Some(&http::uri::Scheme::HTTPS)
        ));
        assert!(matches!(
            JwksSource::parse("http://idp.example/jwks"),
            Err(JwksSourceError::Refused(why)) if why.contains("https://idp.example/jwks")
        ));
        for bad in [
            "accounts",
            "accounts:jwks",
            ":/x",
            "Acc:/x",
            "http:///x",
            "ftp://idp.example/jwks",
            "",
        ] {
            assert!(JwksSource::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn route_auth_syntax() {
        assert_eq!(RouteAuth::parse("public"), Ok(RouteAuth::Public));
        assert_eq!(RouteAuth::parse("optional"), Ok(RouteAuth::Optional));
        assert_eq!(RouteAuth::parse("jwt"), Ok(RouteAuth::jwt()));
        let e = RouteAuth::parse("basic").err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("unknown auth `basic`: write `public`, `optional` or `jwt`")
        );
    }

    #[test]
    fn claim_headers() {
        assert_eq!(
            claim_header("tenant_id").map(|h| h.to_string()).as_deref(),
            Some("x-flotilla-user-tenant-id")
        );
        // The header is lower case; the claim keeps its name (`forward`).
        assert_eq!(
            claim_header("tenantId").map(|h| h.to_string()).as_deref(),
            Some("x-flotilla-user-tenantid")
        );
        assert!(claim_header("a b").is_none());
        assert!(claim_header("").is_none());
    }

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(auth) {
            h.insert(AUTHORIZATION, v);
        }
        h
    }

    #[test]
    fn bearer_extraction() {
        assert_eq!(bearer(&HeaderMap::new()), Err(AuthError::Missing));
        assert_eq!(bearer(&headers("Bearer abc")), Ok(&b"abc"[..]));
        assert_eq!(bearer(&headers("bearer abc")), Ok(&b"abc"[..]));
        assert_eq!(bearer(&headers("Basic abc")), Err(AuthError::Missing));
        assert_eq!(
            bearer(&headers("Bearer ")),
            Err(AuthError::Invalid("malformed"))
        );
        assert_eq!(
            bearer(&headers("Bearer")),
            Err(AuthError::Invalid("malformed"))
        );
        // A token that is not ASCII is no token: refused before it is
        // parsed, when the cache does not hold it (which it never can).
        let latin1 = HeaderValue::from_bytes(b"Bearer caf\xe9").ok();
        let mut h = HeaderMap::new();
        h.extend(latin1.map(|v| (AUTHORIZATION, v)));
        assert_eq!(bearer(&h), Ok(&b"caf\xe9"[..]));
        assert_eq!(token_text(b"caf\xe9"), Err(AuthError::Invalid("malformed")));
        assert_eq!(token_text(b"a.b.c"), Ok("a.b.c"));
        let scheme = HeaderValue::from_bytes(b"B\xe9arer abc").ok();
        let mut h = HeaderMap::new();
        h.extend(scheme.map(|v| (AUTHORIZATION, v)));
        assert_eq!(bearer(&h), Err(AuthError::Invalid("malformed")));
        assert_eq!(bearer(&headers("Bearer  abc ")), Ok(&b"abc"[..]));
        let mut two = headers("Bearer a");
        two.append(AUTHORIZATION, HeaderValue::from_static("Bearer b"));
        assert_eq!(bearer(&two), Err(AuthError::Invalid("malformed")));
    }

    fn identity(scopes: &str, claims: Value) -> Identity {
        let Value::Object(claims) = claims else {
            panic!("claims must be an object");
        };
        Identity {
            rate_key: "u:u".into(),
            rate_key_hash: crate::ratelimit::gcra::key_hash("u:u"),
            scopes: scopes.split(' ').map(String::from).collect(),
            claims,
            exp: 0.0,
            headers: Vec::new(),
            consumer: None,
        }
    }

    #[test]
    fn scopes_and_claims_are_required() {
        let id = identity(
            "orders:read orders:write",
            json!({"role": ["admin", "x"], "tier": "gold"}),
        );
        let need = |scopes: &[&str], claims: &[(&str, &str)]| RouteAuth::Jwt {
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            claims: claims
                .iter()
                .map(|(k, v)| (k.to_string(), v.split('|').map(String::from).collect()))
                .collect(),
        };
        assert_eq!(authorize(&id, &need(&["orders:read"], &[])), Ok(()));
        assert_eq!(
            authorize(&id, &need(&[], &[("role", "admin"), ("tier", "gold")])),
            Ok(())
        );
        assert_eq!(
            authorize(&id, &need(&["orders:read", "admin"], &[])).map_err(|e| e.reason()),
            Err("missing_scope")
        );
        assert_eq!(
            authorize(&id, &need(&[], &[("tier", "silver")])).map_err(|e| e.reason()),
            Err("missing_claim")
        );
        // Several values: any one of them will do.
        assert_eq!(
            authorize(&id, &need(&[], &[("tier", "silver|gold")])),
            Ok(())
        );
        assert_eq!(authorize(&id, &need(&[], &[("role", "ops|x")])), Ok(()));
        assert_eq!(
            authorize(&id, &need(&[], &[("role", "ops|root")])).map_err(|e| e.reason()),
            Err("missing_claim")
        );
        // A claim the token lacks never passes.
        assert_eq!(
            authorize(&id, &need(&[], &[("team", "a")])).map_err(|e| e.reason()),
            Err("missing_claim")
        );
        assert_eq!(authorize(&id, &RouteAuth::Public), Ok(()));
    }

    #[test]
    fn claims_are_found_whole_then_by_dotted_path() {
        let id = identity(
            "",
            json!({
                "realm_access": {"roles": ["shop-admin", "user"]},
                "https://example.com/roles": ["editor"],
                "https://example.com": {"roles": ["nobody"]},
                "email_verified": true,
                "level": 3,
                "org": {"name": "acme", "meta": {"x": 1}},
                "nothing": null,
            }),
        );
        let need = |name: &str, value: &str| RouteAuth::Jwt {
            scopes: Vec::new(),
            claims: [(name.to_string(), vec![value.to_string()])].into(),
        };
        let passes = |name: &str, value: &str| authorize(&id, &need(name, value)).is_ok();
        assert!(passes("realm_access.roles", "shop-admin"));
        assert!(!passes("realm_access.roles", "admin"));
        // A name with dots that is a claim of its own is taken whole.
        assert!(passes("https://example.com/roles", "editor"));
        assert!(passes("org.name", "acme"));
        assert!(!passes("org.name.first", "acme"));
        assert!(!passes("org.missing", "acme"));
        assert!(!passes("org", "acme"), "an object matches nothing");
        assert!(!passes("org.meta", "{\"x\":1}"));
        assert!(!passes("nothing", "null"));
        assert!(passes("email_verified", "true"));
        assert!(!passes("email_verified", "false"));
        assert!(passes("level", "3"));
        assert!(!passes("level", "4"));
    }

    #[test]
    fn cache_is_bounded_by_count_and_bytes() {
        let cache = TokenCache::new();
        let id = Arc::new(identity("", json!({})));
        // Far more text than the cache holds, in tokens of 4000 bytes, the
        // key-set version unchanged and nothing expired (exp 0, now 0).
        // Each ends differently, as signatures do.
        for i in 0..2000 {
            let token = format!("{}{i:04}", "x".repeat(3996));
            cache.insert(token.as_bytes(), 1, &id, 0.0, 60.0);
        }
        let mut kept = 0;
        for shard in cache.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            assert!(shard.table.len() <= CACHE_PER_SHARD);
            assert!(shard.bytes <= CACHE_BYTES_PER_SHARD, "{}", shard.bytes);
            assert_eq!(
                shard.bytes,
                shard.table.iter().map(|c| c.token.len()).sum::<usize>()
            );
            kept += shard.table.len();
        }
        assert!(kept > 0 && kept < 2000, "{kept}");
        // The newest one is always there.
        let last = format!("{}1999", "x".repeat(3996));
        assert!(cache.get(last.as_bytes(), 1).is_some());
        // A token larger than a sixteenth of a shard is never kept.
        let huge = "y".repeat(CACHE_BYTES_PER_SHARD / 16 + 1);
        cache.insert(huge.as_bytes(), 1, &id, 0.0, 60.0);
        assert!(cache.get(huge.as_bytes(), 1).is_none());
    }

    #[tokio::test]
    async fn cache_is_keyed_by_version() {
        let cache = TokenCache::new();
        let id = Arc::new(identity("", json!({})));
        cache.insert(b"a.b.c", 1, &id, 0.0, 60.0);
        assert!(cache.get(b"a.b.c", 1).is_some());
        assert!(cache.get(b"a.b.c", 2).is_none());
        assert!(cache.get(b"a.b.d", 1).is_none());
        assert!(cache.get(b"a.b.c ", 1).is_none());
        // Placed by their ends, compared whole: tokens that end alike are
        // still told apart.
        let ends = TokenCache::new();
        let tail = "s".repeat(HASHED_TAIL);
        ends.insert(format!("one.{tail}").as_bytes(), 1, &id, 0.0, 60.0);
        assert!(ends.get(format!("one.{tail}").as_bytes(), 1).is_some());
        assert!(ends.get(format!("two.{tail}").as_bytes(), 1).is_none());
        // Verified again under a new key set: the one entry now holds the
        // new version (and the new identity), its bytes counted once.
        let again = Arc::new(identity("again", json!({})));
        cache.insert(b"a.b.c", 2, &again, 0.0, 60.0);
        assert!(cache.get(b"a.b.c", 1).is_none());
        let hit = cache.get(b"a.b.c", 2);
        assert!(hit.is_some_and(|i| Arc::ptr_eq(&i, &again)));
        let (entries, bytes) = cache.shards.iter().fold((0, 0), |(n, b), shard| {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            (n + shard.table.len(), b + shard.bytes)
        });
        assert_eq!((entries, bytes), (1, 5));
        // Signing helpers are exercised in `jws`; keep them linked here too.
        let _ = Signer::ed25519().key("k");
    }
}
