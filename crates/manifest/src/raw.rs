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
    pub timeout: Option<Spanned<String>>,
}
