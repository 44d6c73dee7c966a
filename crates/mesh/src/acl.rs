//! Default-deny access control on service-to-service calls, evaluated by
//! the callee on the caller's verified SPIFFE id.
//!
//! The runtime derives a [`PolicySpec`] per callee from the manifest and
//! hands it to the instance; [`Policy::from_spec`] validates and compiles
//! it. The rules it implies:
//!
//! - every service listed in [`PolicySpec::callers`] (those whose `calls`
//!   name the callee) may call any method on any path;
//! - the gateway may call exactly the routes it exposes for this callee
//!   (path pattern and methods);
//! - the runtime may `GET`/`HEAD` [`RUNTIME_PATHS`];
//! - explicit [`RuleSpec`]s refine this per caller, by path pattern and
//!   method. When a caller has any explicit *allow* rule, its implicit
//!   allow-everything is dropped: the allow rules list what it may call.
//!   *Deny* rules carve exceptions out of whatever is allowed;
//! - nothing else is allowed.
//!
//! When several rules match, the most specific path pattern wins
//! ([`PathPattern::specificity_cmp`]), never the first listed; on equal
//! patterns (`/a` and `/a/` are equal, and so are a deny's `/ADMIN` and an
//! allow's `/admin`) a rule naming methods beats one that does not, and
//! deny beats allow.
//!
//! # Paths are normalised before matching
//!
//! [`normalize_path`] turns the raw request target into the one spelling
//! rules are written in, and refuses what cannot be made safe:
//!
//! - the query string and fragment are cut off;
//! - `%XX` escapes of unreserved characters (letters, digits, `-._~`) are
//!   decoded, so `/%61dmin` is `/admin` and `%2e` is a dot; other escapes
//!   stay encoded (upper-cased hex), and since patterns cannot contain `%`
//!   an escaped segment is matched only by wildcards;
//! - `%2F` (an encoded `/`), `%5C` and a raw `\` (which some servers treat
//!   as `/`), `%00` and control characters, and malformed escapes are
//!   refused: the path is invalid and the call denied. Rejecting is the
//!   only safe choice, since the callee's framework may or may not decode
//!   `%2F` into a separator after the ACL has looked;
//! - empty segments (`//`) and `.` segments are removed, `..` removes the
//!   previous segment, and a `..` that would climb above the root is
//!   refused;
//! - case is kept: paths are case-sensitive (RFC 3986), so an allow rule
//!   for `/admin` does not allow `/ADMIN`. But a service might route case-
//!   insensitively, so **deny rules match case-insensitively**: a deny on
//!   `/admin/**` also denies `/ADMIN/x`. And a service's framework decodes
//!   the escapes the normalised path keeps before it routes (`%3A` is the
//!   `:` of `/v1/items:purge` to Flask, Spring or axum), so **deny rules
//!   match the path with every escape decoded** too. Case and escape
//!   tricks can thus make a call fall out of an allow rule, never out of
//!   a deny rule.
//!
//! A rule that names `GET` names `HEAD` too: a `HEAD` runs the `GET`
//! handler in every framework (RFC 9110 §9.3.2), so a deny on `GET` that
//! let `HEAD` through would protect nothing.
//!
//! The callee should serve the request on [`Decision::path`] (the
//! normalised path), so that what was checked is what runs.
//!
//! In [`Mode::Audit`] a call that would be denied is let through, logged
//! and counted; the decision says `would_deny`.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::fmt;

use flotilla_manifest::{PathPattern, PatternError};
use http::{Method, Response, StatusCode, header};
use serde::{Deserialize, Serialize};

use crate::identity::{IdentityError, SpiffeId, check_name};

/// Paths the runtime's identity may `GET` or `HEAD` on every service.
pub const RUNTIME_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];
/// Counter of denied calls, labelled `caller` and `callee`.
pub const DENIED_METRIC: &str = "flotilla_authz_denied_total";
/// Counter of calls audit mode let through that would have been denied.
pub const AUDIT_METRIC: &str = "flotilla_authz_audit_would_deny_total";
/// The `code` of the 403 error body.
pub const DENIED_CODE: &str = "acl_denied";

/// Why a policy cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    /// A caller named in the spec is not a valid service name.
    #[error("ACL caller `{name}` is not a valid service name")]
    BadCaller {
        /// The name.
        name: String,
        /// Why.
        #[source]
        source: IdentityError,
    },
    /// A path pattern is invalid.
    #[error("{context}: invalid path pattern `{pattern}`")]
    BadPattern {
        /// Which rule or route.
        context: String,
        /// The pattern.
        pattern: String,
        /// Why.
        #[source]
        source: PatternError,
    },
    /// A method is not an upper-case HTTP method token.
    #[error(
        "{context}: `{method}` is not an HTTP method; write it in upper case, e.g. `GET`, or leave `methods` out for any method"
    )]
    BadMethod {
        /// Which rule or route.
        context: String,
        /// The method as written.
        method: String,
    },
    /// An allow rule for a service that does not declare the callee.
    #[error(
        "ACL rule {index} allows `{caller}` to call `{callee}`, but `{caller}` does not list `{callee}` in its `calls`; add it there (rules refine `calls`, they do not replace it)"
    )]
    UndeclaredCaller {
        /// Position of the rule (0-based).
        index: usize,
        /// The rule's caller.
        caller: String,
        /// The callee.
        callee: String,
    },
    /// A rule names a caller that is neither a declared caller, nor the
    /// gateway, nor the runtime.
    #[error(
        "ACL rule {index} names `{caller}`, which never calls `{callee}`; rules may name the services in its `calls`, the gateway or the runtime"
    )]
    UnknownCaller {
        /// Position of the rule (0-based).
        index: usize,
        /// The rule's caller.
        caller: String,
        /// The callee.
        callee: String,
    },
    /// The gateway or runtime identity is in another system or environment.
    #[error("the {role} identity {id} is not in the callee's system and environment ({callee})")]
    ForeignPlatformIdentity {
        /// `gateway` or `runtime`.
        role: &'static str,
        /// The identity given.
        id: SpiffeId,
        /// The callee.
        callee: SpiffeId,
    },
}

/// Enforce denials, or only log them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deny calls no rule allows.
    #[default]
    Enforce,
    /// Let them through, logging and counting the would-be denial.
    Audit,
}

/// Whether a rule allows or denies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// Allow matching calls.
    #[default]
    Allow,
    /// Deny matching calls.
    Deny,
}

/// The ACL of one callee, as the runtime derives it from the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// The service this policy protects.
    pub callee: SpiffeId,
    /// Enforce or audit.
    #[serde(default)]
    pub mode: Mode,
    /// Services (in the callee's system and environment) whose `calls`
    /// list the callee.
    #[serde(default)]
    pub callers: BTreeSet<String>,
    /// The gateway and the routes it exposes to this callee.
    #[serde(default)]
    pub gateway: Option<GatewaySpec>,
    /// The runtime's identity, allowed [`RUNTIME_PATHS`].
    #[serde(default)]
    pub runtime: Option<SpiffeId>,
    /// Per-caller refinements.
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

impl PolicySpec {
    /// An empty (deny-everything) spec for `callee`.
    pub fn new(callee: SpiffeId) -> Self {
        PolicySpec {
            callee,
            mode: Mode::Enforce,
            callers: BTreeSet::new(),
            gateway: None,
            runtime: None,
            rules: Vec::new(),
        }
    }
}

/// The gateway's access to one callee.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySpec {
    /// The gateway's identity.
    pub identity: SpiffeId,
    /// The routes the gateway exposes for this callee.
    pub routes: Vec<RouteSpec>,
}

/// One exposed route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Path pattern, as in the manifest.
    pub path: String,
    /// Methods; empty means any.
    #[serde(default)]
    pub methods: Vec<String>,
}

/// An explicit rule for one caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// The calling service's name (or the gateway's or runtime's).
    pub caller: String,
    /// Path pattern (`*` one segment, `**` the rest).
    pub path: String,
    /// Methods; empty means any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Allow (default) or deny.
    #[serde(default)]
    pub effect: Effect,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Who {
    /// A service of the callee's system and environment, by name.
    Service(String),
    /// One exact identity (gateway, runtime).
    Exact(SpiffeId),
}

#[derive(Debug, Clone)]
struct Rule {
    who: Who,
    /// `None`: any method.
    methods: Option<Vec<Method>>,
    /// As written: used for specificity and descriptions.
    pattern: PathPattern,
    /// Lower-cased: deny rules match the lower-cased, decoded path with
    /// it, and two rules whose folded patterns are the same are equally
    /// specific.
    folded: PathPattern,
    effect: Effect,
    description: String,
}

impl Rule {
    /// Whether the rule is about this call: `path` is the normalised path,
    /// `folded` the same lower-cased with every escape decoded.
    fn applies(&self, caller: &SpiffeId, method: &Method, path: &str, folded: &str) -> bool {
        let who = match &self.who {
            Who::Service(name) => caller.service() == name,
            Who::Exact(id) => id == caller,
        };
        who && self.methods.as_ref().is_none_or(|m| m.contains(method))
            && match self.effect {
                Effect::Deny => self.folded.matches(folded),
                Effect::Allow => self.pattern.matches(path),
            }
    }

    /// `Greater`: `self` wins over `other`.
    fn precedence(&self, other: &Rule) -> Ordering {
        // `specificity_cmp` orders equal patterns by their spelling, to be
        // total; here an equal pattern must fall through to "deny beats
        // allow", whatever its spelling.
        let specificity = if self.folded.same_as(&other.folded) {
            Ordering::Equal
        } else {
            self.pattern.specificity_cmp(&other.pattern)
        };
        specificity
            .then_with(|| self.methods.is_some().cmp(&other.methods.is_some()))
            .then_with(|| (self.effect == Effect::Deny).cmp(&(other.effect == Effect::Deny)))
    }
}

/// Why a call was allowed or denied; stable, `snake_case` in logs and
/// bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasonCode {
    /// A rule allowed it.
    Allowed,
    /// No rule allows it (default deny).
    NoMatchingRule,
    /// A deny rule matched.
    DeniedByRule,
    /// The path could not be normalised safely.
    InvalidPath,
    /// The caller is in another system or environment.
    ForeignIdentity,
}

impl ReasonCode {
    /// The code as written in logs and the 403 body.
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::Allowed => "allowed",
            ReasonCode::NoMatchingRule => "no_matching_rule",
            ReasonCode::DeniedByRule => "denied_by_rule",
            ReasonCode::InvalidPath => "invalid_path",
            ReasonCode::ForeignIdentity => "foreign_identity",
        }
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of [`Policy::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the call may proceed (always true in audit mode).
    pub allowed: bool,
    /// Why: in audit mode, the reason it *would* have been denied.
    pub reason: ReasonCode,
    /// The rule that decided, described (`orders: deny GET /admin/**`).
    pub matched_rule: Option<String>,
    /// Audit mode let through a call enforce mode would deny.
    pub would_deny: bool,
    /// The normalised path (absent when it could not be normalised).
    pub path: Option<String>,
}

impl Decision {
    /// `would_deny` in audit mode, else the reason's code.
    pub fn reason_code(&self) -> &'static str {
        if self.would_deny {
            "would_deny"
        } else {
            self.reason.as_str()
        }
    }
}

/// A denied call: an error for the caller of [`Policy::check`], and the
/// 403 response to send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{caller} may not call {callee}: {}", decision.reason)]
pub struct Denied {
    /// The decision.
    pub decision: Decision,
    /// Who called.
    pub caller: SpiffeId,
    /// Who was called.
    pub callee: SpiffeId,
}

impl Denied {
    /// The JSON body: `{"error":{"code":"acl_denied","message":…,"details":{"reason":…}}}`.
    /// It names no rule: the caller learns that and why in general terms,
    /// the callee's log has the rest.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "code": DENIED_CODE,
                "message": "this service does not accept this call from the caller's identity",
                "details": {
                    "reason": self.decision.reason.as_str(),
                    "caller": self.caller.to_string(),
                    "callee": self.callee.to_string(),
                }
            }
        })
    }

    /// The 403 response.
    pub fn to_response(&self) -> Response<String> {
        let mut response = Response::new(self.body().to_string());
        *response.status_mut() = StatusCode::FORBIDDEN;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        response
    }
}

/// A compiled policy for one callee.
#[derive(Debug, Clone)]
pub struct Policy {
    callee: SpiffeId,
    mode: Mode,
    rules: Vec<Rule>,
    /// Whether any rule denies: only then is the path decoded and folded
    /// for them, on every call.
    denies: bool,
}

fn parse_methods(context: &str, methods: &[String]) -> Result<Option<Vec<Method>>, AclError> {
    if methods.is_empty() {
        return Ok(None);
    }
    methods
        .iter()
        .map(|m| {
            let valid = !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase());
            valid
                .then(|| Method::from_bytes(m.as_bytes()).ok())
                .flatten()
                .ok_or_else(|| AclError::BadMethod {
                    context: context.to_string(),
                    method: m.clone(),
                })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn compile(
    who: Who,
    who_name: &str,
    context: String,
    path: &str,
    methods: Option<Vec<Method>>,
    effect: Effect,
) -> Result<Rule, AclError> {
    let bad = |source| AclError::BadPattern {
        context: context.clone(),
        pattern: path.to_string(),
        source,
    };
    let pattern = PathPattern::parse(path).map_err(bad)?;
    let folded = PathPattern::parse(&path.to_ascii_lowercase()).map_err(bad)?;
    let method_text = match &methods {
        None => "*".to_string(),
        Some(ms) => ms.iter().map(Method::as_str).collect::<Vec<_>>().join(","),
    };
    // A rule about `GET` is about `HEAD` too (see the module docs); the
    // description keeps what was written.
    let methods = methods.map(|mut ms| {
        if ms.contains(&Method::GET) && !ms.contains(&Method::HEAD) {
            ms.push(Method::HEAD);
        }
        ms
    });
    let verb = match effect {
        Effect::Allow => "allow",
        Effect::Deny => "deny",
    };
    Ok(Rule {
        who,
        methods,
        pattern,
        folded,
        effect,
        description: format!("{context} ({who_name}: {verb} {method_text} {path})"),
    })
}

impl Policy {
    /// Validates and compiles a spec.
    pub fn from_spec(spec: &PolicySpec) -> Result<Policy, AclError> {
        let callee = &spec.callee;
        let mut rules = Vec::new();
        for name in &spec.callers {
            check_name("service", name).map_err(|source| AclError::BadCaller {
                name: name.clone(),
                source,
            })?;
        }
        let gateway = spec.gateway.as_ref().map(|g| g.identity.clone());
        let runtime = spec.runtime.clone();
        for (role, id) in [("gateway", &gateway), ("runtime", &runtime)] {
            if let Some(id) = id
                && !id.same_namespace(callee)
            {
                return Err(AclError::ForeignPlatformIdentity {
                    role,
                    id: id.clone(),
                    callee: callee.clone(),
                });
            }
        }

        // Explicit rules first: they decide whether a caller keeps its
        // implicit allow-everything.
        let mut has_allow_rules = BTreeSet::new();
        for (index, r) in spec.rules.iter().enumerate() {
            let context = format!("ACL rule {index}");
            let who = if spec.callers.contains(&r.caller) {
                if r.effect == Effect::Allow {
                    has_allow_rules.insert(r.caller.clone());
                }
                Who::Service(r.caller.clone())
            } else if let Some(id) = [&gateway, &runtime]
                .into_iter()
                .flatten()
                .find(|id| id.service() == r.caller)
            {
                // The platform's reach is fixed by routes and health
                // paths; rules may only take away from it.
                if r.effect == Effect::Allow {
                    return Err(AclError::UndeclaredCaller {
                        index,
                        caller: r.caller.clone(),
                        callee: callee.service().to_string(),
                    });
                }
                Who::Exact(id.clone())
            } else if r.effect == Effect::Allow {
                return Err(AclError::UndeclaredCaller {
                    index,
                    caller: r.caller.clone(),
                    callee: callee.service().to_string(),
                });
            } else {
                return Err(AclError::UnknownCaller {
                    index,
                    caller: r.caller.clone(),
                    callee: callee.service().to_string(),
                });
            };
            let methods = parse_methods(&context, &r.methods)?;
            rules.push(compile(
                who, &r.caller, context, &r.path, methods, r.effect,
            )?);
        }
        for name in &spec.callers {
            if !has_allow_rules.contains(name) {
                rules.push(compile(
                    Who::Service(name.clone()),
                    name,
                    format!("`calls` of {name}"),
                    "/**",
                    None,
                    Effect::Allow,
                )?);
            }
        }
        if let Some(g) = &spec.gateway {
            for route in &g.routes {
                let context = format!("gateway route {}", route.path);
                let methods = parse_methods(&context, &route.methods)?;
                rules.push(compile(
                    Who::Exact(g.identity.clone()),
                    g.identity.service(),
                    context,
                    &route.path,
                    methods,
                    Effect::Allow,
                )?);
            }
        }
        if let Some(runtime) = &spec.runtime {
            for path in RUNTIME_PATHS {
                rules.push(compile(
                    Who::Exact(runtime.clone()),
                    runtime.service(),
                    format!("runtime access to {path}"),
                    path,
                    Some(vec![Method::GET, Method::HEAD]),
                    Effect::Allow,
                )?);
            }
        }
        Ok(Policy {
            callee: callee.clone(),
            mode: spec.mode,
            denies: rules.iter().any(|r| r.effect == Effect::Deny),
            rules,
        })
    }

    /// The service this policy protects.
    pub fn callee(&self) -> &SpiffeId {
        &self.callee
    }

    /// Enforce or audit.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Decides a call; no side effects (see [`Policy::check`]).
    pub fn decide(&self, caller: &SpiffeId, method: &Method, raw_path: &str) -> Decision {
        let (reason, matched_rule, path) = self.evaluate(caller, method, raw_path);
        let denied = reason != ReasonCode::Allowed;
        let audit = denied && self.mode == Mode::Audit;
        Decision {
            allowed: !denied || audit,
            reason,
            matched_rule,
            would_deny: audit,
            path,
        }
    }

    fn evaluate(
        &self,
        caller: &SpiffeId,
        method: &Method,
        raw_path: &str,
    ) -> (ReasonCode, Option<String>, Option<String>) {
        let path = match normalize_path(raw_path) {
            Ok(path) => path,
            Err(_) => return (ReasonCode::InvalidPath, None, None),
        };
        if !caller.same_namespace(&self.callee) {
            return (ReasonCode::ForeignIdentity, None, Some(path));
        }
        let folded = if self.denies {
            decoded(&path).to_ascii_lowercase()
        } else {
            String::new()
        };
        let winner = self
            .rules
            .iter()
            .filter(|r| r.applies(caller, method, &path, &folded))
            .max_by(|a, b| a.precedence(b));
        match winner {
            None => (ReasonCode::NoMatchingRule, None, Some(path)),
            Some(rule) => {
                let reason = match rule.effect {
                    Effect::Allow => ReasonCode::Allowed,
                    Effect::Deny => ReasonCode::DeniedByRule,
                };
                (reason, Some(rule.description.clone()), Some(path))
            }
        }
    }

    /// Decides a call, logs the decision (naming both identities) and
    /// counts denials in `flotilla_authz_denied_total{caller,callee}` (and
    /// audit-mode would-be denials in `flotilla_authz_audit_would_deny_total`).
    /// `Err` carries the 403 to send.
    pub fn check(
        &self,
        caller: &SpiffeId,
        method: &Method,
        raw_path: &str,
    ) -> Result<Decision, Denied> {
        let decision = self.decide(caller, method, raw_path);
        let path = decision.path.as_deref().unwrap_or(raw_path);
        let rule = decision.matched_rule.as_deref().unwrap_or("-");
        let labels = || {
            [
                ("caller", caller_label(caller, &self.callee)),
                ("callee", self.callee.service().to_string()),
            ]
        };
        if decision.would_deny {
            metrics::counter!(AUDIT_METRIC, &labels()).increment(1);
            tracing::warn!(caller = %caller, callee = %self.callee, %method, path, reason = decision.reason.as_str(), rule, "acl audit: would deny");
            Ok(decision)
        } else if decision.allowed {
            tracing::debug!(caller = %caller, callee = %self.callee, %method, path, rule, "acl allowed");
            Ok(decision)
        } else {
            metrics::counter!(DENIED_METRIC, &labels()).increment(1);
            tracing::warn!(caller = %caller, callee = %self.callee, %method, path, reason = decision.reason.as_str(), rule, "acl denied");
            Err(Denied {
                decision,
                caller: caller.clone(),
                callee: self.callee.clone(),
            })
        }
    }
}

/// A caller's metric label: its service name when it is a sibling, its
/// full id otherwise (still bounded: it passed the mTLS handshake).
fn caller_label(caller: &SpiffeId, callee: &SpiffeId) -> String {
    if caller.same_namespace(callee) {
        caller.service().to_string()
    } else {
        caller.to_string()
    }
}

/// Why a path cannot be normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathProblem {
    /// It does not start with `/`.
    NotAbsolute,
    /// `%` not followed by two hex digits.
    BadEscape,
    /// `%2F`: an encoded separator.
    EncodedSlash,
    /// `\` or `%5C`.
    Backslash,
    /// A NUL or other control character, raw or encoded, or a raw space.
    ControlCharacter,
    /// `..` above the root.
    EscapesRoot,
    /// `;` or `%3B`: Java's servlet containers (Tomcat, Jetty, Spring on
    /// them) drop what follows it in a segment (a path parameter) before
    /// they route, so `/public/..;/admin` would be checked as one path
    /// and served as another.
    PathParameter,
}

impl fmt::Display for PathProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathProblem::NotAbsolute => "the path does not start with `/`",
            PathProblem::BadEscape => "the path has a malformed `%` escape",
            PathProblem::EncodedSlash => "the path has an encoded `/` (`%2F`)",
            PathProblem::Backslash => "the path has a backslash",
            PathProblem::ControlCharacter => "the path has a control character or space",
            PathProblem::EscapesRoot => "the path climbs above the root with `..`",
            PathProblem::PathParameter => "the path has a `;` (a path parameter)",
        })
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn decode_segment(segment: &str) -> Result<String, PathProblem> {
    let bytes = segment.as_bytes();
    let mut out = String::with_capacity(segment.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathProblem::BadEscape);
            };
            let v = hi * 16 + lo;
            match v {
                b'/' => return Err(PathProblem::EncodedSlash),
                b'\\' => return Err(PathProblem::Backslash),
                b';' => return Err(PathProblem::PathParameter),
                0..=0x1f | 0x7f => return Err(PathProblem::ControlCharacter),
                v if v.is_ascii_alphanumeric() || b"-._~".contains(&v) => out.push(char::from(v)),
                v => {
                    out.push('%');
                    out.push_str(&format!("{v:02X}"));
                }
            }
            i += 3;
        } else {
            if b == b'\\' {
                return Err(PathProblem::Backslash);
            }
            if b == b';' {
                return Err(PathProblem::PathParameter);
            }
            if b <= 0x20 || b == 0x7f {
                return Err(PathProblem::ControlCharacter);
            }
            // Copy the whole UTF-8 character (non-ASCII is kept as is).
            let ch_len = segment[i..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&segment[i..i + ch_len]);
            i += ch_len;
        }
    }
    Ok(out)
}

/// A normalised path with the escapes it kept decoded: what a service's
/// framework routes on, for deny rules. Non-UTF-8 bytes become U+FFFD,
/// which no pattern names. (A pattern cannot hold `%`, so a `%25` decoded
/// to `%` cannot start a second round of decoding that matters.) The
/// decoder axum's `Path` uses, so the two agree on what a path means.
fn decoded(path: &str) -> std::borrow::Cow<'_, str> {
    percent_encoding::percent_decode_str(path).decode_utf8_lossy()
}

/// Normalises a request target's path for matching (see the module
/// documentation for the rules). A trailing `/` is kept.
pub fn normalize_path(raw: &str) -> Result<String, PathProblem> {
    let end = raw.find(['?', '#']).unwrap_or(raw.len());
    let raw = &raw[..end];
    let rest = raw.strip_prefix('/').ok_or(PathProblem::NotAbsolute)?;
    let mut segments: Vec<String> = Vec::new();
    let mut trailing_slash = false;
    for segment in rest.split('/') {
        let decoded = decode_segment(segment)?;
        trailing_slash = false;
        match decoded.as_str() {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                segments.pop().ok_or(PathProblem::EscapesRoot)?;
                trailing_slash = true;
            }
            _ => segments.push(decoded),
        }
    }
    let mut path = String::with_capacity(raw.len());
    for s in &segments {
        path.push('/');
        path.push_str(s);
    }
    if path.is_empty() || trailing_slash {
        path.push('/');
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(service: &str) -> SpiffeId {
        SpiffeId::local("shop", service).unwrap()
    }

    #[test]
    fn normalisation() {
        for (raw, want) in [
            ("/", "/"),
            ("", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("//admin", "/admin"),
            ("/./admin", "/admin"),
            ("/a/../admin", "/admin"),
            ("/a/%2e%2e/admin", "/admin"),
            ("/a/%2E%2e/admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/a/.", "/a/"),
            ("/a/..", "/"),
            ("/a?x=/../../etc", "/a"),
            ("/a#frag", "/a"),
            ("/a%20b", "/a%20b"),
            ("/a%3ab", "/a%3Ab"),
            ("/%252e%252e/x", "/%252e%252e/x"),
            ("/caf\u{e9}", "/caf\u{e9}"),
        ] {
            let got = normalize_path(raw);
            let want = if raw.is_empty() {
                Err(PathProblem::NotAbsolute)
            } else {
                Ok(want.to_string())
            };
            assert_eq!(got, want, "{raw:?}");
        }
        for (raw, problem) in [
            ("/..", PathProblem::EscapesRoot),
            ("/%2e%2e/admin", PathProblem::EscapesRoot),
            ("/a/../../admin", PathProblem::EscapesRoot),
            ("/admin%2fx", PathProblem::EncodedSlash),
            ("/admin%2Fx", PathProblem::EncodedSlash),
            ("/a\\b", PathProblem::Backslash),
            ("/a%5cb", PathProblem::Backslash),
            ("/a%00", PathProblem::ControlCharacter),
            ("/a b", PathProblem::ControlCharacter),
            ("/a%", PathProblem::BadEscape),
            ("/a%4", PathProblem::BadEscape),
            ("/a%zz", PathProblem::BadEscape),
            ("admin", PathProblem::NotAbsolute),
            ("/public/..;/admin", PathProblem::PathParameter),
            ("/admin;jsessionid=1/x", PathProblem::PathParameter),
            ("/admin%3bx", PathProblem::PathParameter),
            ("/admin%3B", PathProblem::PathParameter),
        ] {
            assert_eq!(normalize_path(raw), Err(problem), "{raw:?}");
        }
    }

    fn spec() -> PolicySpec {
        let mut spec = PolicySpec::new(id("catalog"));
        spec.callers.insert("orders".into());
        spec
    }

    #[test]
    fn rule_validation() {
        let mut s = spec();
        s.rules.push(RuleSpec {
            caller: "payments".into(),
            path: "/**".into(),
            methods: vec![],
            effect: Effect::Allow,
        });
        assert!(matches!(
            Policy::from_spec(&s),
            Err(AclError::UndeclaredCaller { .. })
        ));
        s.rules[0].effect = Effect::Deny;
        assert!(matches!(
            Policy::from_spec(&s),
            Err(AclError::UnknownCaller { .. })
        ));
        let mut s = spec();
        s.rules.push(RuleSpec {
            caller: "orders".into(),
            path: "/a/**/b".into(),
            methods: vec![],
            effect: Effect::Allow,
        });
        let err = Policy::from_spec(&s).unwrap_err();
        assert!(matches!(err, AclError::BadPattern { .. }), "{err}");
        s.rules[0].path = "/a".into();
        s.rules[0].methods = vec!["get".into()];
        assert!(matches!(
            Policy::from_spec(&s),
            Err(AclError::BadMethod { .. })
        ));
        let mut s = spec();
        s.callers.insert("Bad".into());
        assert!(matches!(
            Policy::from_spec(&s),
            Err(AclError::BadCaller { .. })
        ));
        let mut s = spec();
        s.runtime = Some(SpiffeId::local("bank", "runtime").unwrap());
        assert!(matches!(
            Policy::from_spec(&s),
            Err(AclError::ForeignPlatformIdentity { .. })
        ));
    }

    #[test]
    fn spec_round_trips_as_json() {
        let mut s = spec();
        s.mode = Mode::Audit;
        s.runtime = Some(id("runtime"));
        s.gateway = Some(GatewaySpec {
            identity: id("gateway"),
            routes: vec![RouteSpec {
                path: "/api/catalog/**".into(),
                methods: vec!["GET".into()],
            }],
        });
        s.rules.push(RuleSpec {
            caller: "orders".into(),
            path: "/admin/**".into(),
            methods: vec![],
            effect: Effect::Deny,
        });
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<PolicySpec>(&json).unwrap(), s);
        assert!(
            serde_json::from_str::<PolicySpec>(
                r#"{"callee":"spiffe://shop.flotilla/ns/local/svc/catalog","calls":[]}"#
            )
            .is_err()
        );
    }

    #[test]
    fn foreign_callers_are_denied() {
        let policy = Policy::from_spec(&spec()).unwrap();
        let other = SpiffeId::local("bank", "orders").unwrap();
        let d = policy.decide(&other, &Method::GET, "/x");
        assert!(!d.allowed);
        assert_eq!(d.reason, ReasonCode::ForeignIdentity);
        let other_env = SpiffeId::new("shop", "prod", "orders").unwrap();
        assert!(!policy.decide(&other_env, &Method::GET, "/x").allowed);
        assert!(policy.decide(&id("orders"), &Method::GET, "/x").allowed);
    }
}
