//! The manifest exactly as written, with the source span of every value, so
//! that validation can point at the offending key. Enumerations are kept as
//! strings here: our own messages ("did you mean `function`?") beat serde's.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawManifest {
    pub name: Spanned<String>,
    pub gateway: Option<Spanned<RawGateway>>,
    pub mesh: Option<Spanned<RawMesh>>,
    #[serde(default)]
    pub services: BTreeMap<Spanned<String>, Spanned<RawService>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGateway {
    pub listen: Option<Spanned<String>>,
    #[serde(rename = "static")]
    pub static_dir: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub jwt: Option<Spanned<RawJwt>>,
    pub cors: Option<Spanned<RawCors>>,
    pub ip: Option<Spanned<RawIp>>,
    pub rate_limits: Option<Spanned<RawRateLimits>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJwt {
    pub issuer: Spanned<String>,
    pub audiences: Vec<Spanned<String>>,
    pub jwks: Spanned<String>,
    pub refresh: Option<Spanned<String>>,
    pub forward_claims: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCors {
    pub origins: Vec<Spanned<String>>,
    pub credentials: Option<bool>,
    pub methods: Option<Vec<Spanned<String>>>,
    pub headers: Option<Vec<Spanned<String>>>,
    pub expose_headers: Option<Vec<Spanned<String>>>,
    pub max_age: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIp {
    pub allow: Option<Vec<Spanned<String>>>,
    pub deny: Option<Vec<Spanned<String>>>,
    pub trusted_proxies: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimits {
    pub store: Spanned<String>,
    pub url: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMesh {
    pub mode: Option<Spanned<String>>,
    pub leaf_lifetime: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawService {
    pub shape: Option<Spanned<String>>,
    pub run: Option<Spanned<RawRun>>,
    pub replicas: Option<Spanned<i64>>,
    pub scale: Option<Spanned<RawScale>>,
    pub data: Option<Spanned<String>>,
    pub calls: Option<Vec<Spanned<String>>>,
    pub routes: Option<Vec<Spanned<RawRoute>>>,
    pub acl: Option<Vec<Spanned<RawAclRule>>>,
    pub env: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    pub ready_timeout: Option<Spanned<String>>,
    pub drain: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRun {
    pub cargo: Option<Spanned<String>>,
    pub bin: Option<Spanned<String>>,
    pub command: Option<Spanned<Vec<String>>>,
    pub dir: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawScale {
    pub min: Option<Spanned<i64>>,
    pub max: Option<Spanned<i64>>,
    pub target_concurrency: Option<Spanned<i64>>,
    pub concurrency: Option<Spanned<i64>>,
    pub idle: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub path: Spanned<String>,
    pub methods: Option<Vec<Spanned<String>>>,
    pub auth: Option<Spanned<String>>,
    pub scopes: Option<Vec<Spanned<String>>>,
    pub timeout: Option<Spanned<String>>,
    pub rate_limit: Option<Spanned<String>>,
    pub ip: Option<Spanned<RawIp>>,
    pub max_body_bytes: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAclRule {
    pub caller: Spanned<String>,
    pub path: Spanned<String>,
    pub methods: Option<Vec<Spanned<String>>>,
    pub effect: Option<Spanned<String>>,
}
