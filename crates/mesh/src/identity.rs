//! SPIFFE ids: the one name every Flotilla process is known by.
//!
//! An identity is `spiffe://<system>.flotilla/ns/<env>/svc/<service>`. The
//! trust domain `<system>.flotilla` says which system (and so which CA) the
//! process belongs to; `<env>` is the environment (`local` unless the
//! runtime says otherwise); `<service>` is the service, or one of the
//! platform's own identities ([`GATEWAY`], [`RUNTIME`], [`OPERATOR`], ...).
//!
//! Parsing is strict on purpose: there is exactly one way to write an id,
//! so comparing two ids is comparing strings and nothing can smuggle an
//! alternative spelling (upper case, `%`-escapes, a trailing `/`, a query)
//! past an equality check.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use x509_parser::extensions::GeneralName;

/// The suffix that turns a system name into its SPIFFE trust domain.
pub const TRUST_DOMAIN_SUFFIX: &str = ".flotilla";
/// The environment used when none is configured.
pub const DEFAULT_ENV: &str = "local";
/// The gateway's service name: the only identity that may send
/// `x-flotilla-user-*` headers, and that reaches only the declared routes.
pub const GATEWAY: &str = "gateway";
/// The runtime's service name: health checks and metrics scrapes.
pub const RUNTIME: &str = "runtime";
/// The operator's service name: the CLI's identity for the control API.
pub const OPERATOR: &str = "operator";
/// The embedded broker's service name.
pub const BROKER: &str = "broker";
/// The embedded object store's service name.
pub const OBJECTS: &str = "objects";
/// Names the platform uses for its own processes; a user service must not
/// take one of them (the manifest should reject it).
pub const RESERVED_SERVICES: [&str; 5] = [GATEWAY, RUNTIME, OPERATOR, BROKER, OBJECTS];

/// Longest system, environment or service name (a DNS label).
const MAX_NAME: usize = 63;

/// A parsed, validated SPIFFE id of a Flotilla process. Cheap to clone
/// (it is checked on every request).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(Arc<Parts>);

#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Parts {
    system: String,
    env: String,
    service: String,
    uri: String,
}

/// Why a string or a certificate does not carry a valid SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The string does not have the shape of a Flotilla SPIFFE id.
    #[error(
        "`{value}` is not a Flotilla SPIFFE id ({problem}); write spiffe://<system>.flotilla/ns/<env>/svc/<service>"
    )]
    Malformed {
        /// What was given.
        value: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// One of the three names is not a valid name.
    #[error(
        "{part} name `{value}` {problem}; names are lower-case letters, digits and `-`, starting with a letter"
    )]
    InvalidName {
        /// `system`, `env` or `service`.
        part: &'static str,
        /// The name given.
        value: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The bytes are not a DER X.509 certificate.
    #[error("not a valid X.509 certificate: {detail}")]
    NotACertificate {
        /// The parser's description of the problem.
        detail: String,
    },
    /// The certificate has no URI subject alternative name.
    #[error("the certificate carries no SPIFFE id (it has no URI subject alternative name)")]
    NoSpiffeId,
    /// SPIFFE allows exactly one URI SAN; several make the identity ambiguous.
    #[error(
        "the certificate has {count} URI subject alternative names; a SPIFFE certificate has exactly one"
    )]
    SeveralUris {
        /// How many URI SANs it has.
        count: usize,
    },
}

impl SpiffeId {
    /// An id from its three parts, each validated.
    pub fn new(system: &str, env: &str, service: &str) -> Result<Self, IdentityError> {
        check_name("system", system)?;
        check_name("env", env)?;
        check_name("service", service)?;
        Ok(SpiffeId(Arc::new(Parts {
            system: system.to_string(),
            env: env.to_string(),
            service: service.to_string(),
            uri: format!("spiffe://{system}{TRUST_DOMAIN_SUFFIX}/ns/{env}/svc/{service}"),
        })))
    }

    /// An id in the default environment ([`DEFAULT_ENV`]).
    pub fn local(system: &str, service: &str) -> Result<Self, IdentityError> {
        Self::new(system, DEFAULT_ENV, service)
    }

    /// Parses `spiffe://<system>.flotilla/ns/<env>/svc/<service>`.
    pub fn parse(value: &str) -> Result<Self, IdentityError> {
        let malformed = |problem| IdentityError::Malformed {
            value: value.to_string(),
            problem,
        };
        let rest = value
            .strip_prefix("spiffe://")
            .ok_or_else(|| malformed("it does not start with `spiffe://`"))?;
        let (domain, path) = rest
            .split_once('/')
            .ok_or_else(|| malformed("it has no path"))?;
        let system = domain
            .strip_suffix(TRUST_DOMAIN_SUFFIX)
            .ok_or_else(|| malformed("its trust domain does not end in `.flotilla`"))?;
        let parts: Vec<&str> = path.split('/').collect();
        let [ns, env, svc, service] = parts.as_slice() else {
            return Err(malformed("its path is not `/ns/<env>/svc/<service>`"));
        };
        if *ns != "ns" || *svc != "svc" {
            return Err(malformed("its path is not `/ns/<env>/svc/<service>`"));
        }
        Self::new(system, env, service)
    }

    /// Reads the SPIFFE id from a DER certificate's single URI SAN.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| {
            IdentityError::NotACertificate {
                detail: e.to_string(),
            }
        })?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::NotACertificate {
                detail: e.to_string(),
            })?
            .ok_or(IdentityError::NoSpiffeId)?;
        let uris: Vec<&str> = san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [] => Err(IdentityError::NoSpiffeId),
            [uri] => Self::parse(uri),
            many => Err(IdentityError::SeveralUris { count: many.len() }),
        }
    }

    /// Another service in the same system and environment.
    pub fn sibling(&self, service: &str) -> Result<Self, IdentityError> {
        Self::new(&self.0.system, &self.0.env, service)
    }

    /// The system's name.
    pub fn system(&self) -> &str {
        &self.0.system
    }

    /// The environment's name.
    pub fn env(&self) -> &str {
        &self.0.env
    }

    /// The service's name.
    pub fn service(&self) -> &str {
        &self.0.service
    }

    /// The SPIFFE trust domain, `<system>.flotilla`.
    pub fn trust_domain(&self) -> String {
        format!("{}{TRUST_DOMAIN_SUFFIX}", self.0.system)
    }

    /// Whether `other` is in the same system and environment: the only
    /// peers a Flotilla process talks to.
    pub fn same_namespace(&self, other: &SpiffeId) -> bool {
        self.0.system == other.0.system && self.0.env == other.0.env
    }

    /// The id as a URI.
    pub fn as_uri(&self) -> &str {
        &self.0.uri
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.0.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Validates one of the three names of an id: the manifest's name rules
/// (lower-case letter first, then letters, digits and `-`, not ending in
/// `-`), bounded by a DNS label's length.
pub(crate) fn check_name(part: &'static str, value: &str) -> Result<(), IdentityError> {
    let invalid = |problem| IdentityError::InvalidName {
        part,
        value: value.to_string(),
        problem,
    };
    match value.chars().next() {
        None => return Err(invalid("is empty")),
        Some(c) if !c.is_ascii_lowercase() => {
            return Err(invalid("must start with a lower-case letter"));
        }
        _ => {}
    }
    if value.len() > MAX_NAME {
        return Err(invalid("is longer than 63 characters"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(invalid(
            "may contain only lower-case letters, digits and `-`",
        ));
    }
    if value.ends_with('-') {
        return Err(invalid("must not end with `-`"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id = SpiffeId::parse("spiffe://shop.flotilla/ns/local/svc/catalog").unwrap();
        assert_eq!(id.system(), "shop");
        assert_eq!(id.env(), "local");
        assert_eq!(id.service(), "catalog");
        assert_eq!(id.trust_domain(), "shop.flotilla");
        assert_eq!(
            id.to_string(),
            "spiffe://shop.flotilla/ns/local/svc/catalog"
        );
        assert_eq!(SpiffeId::local("shop", "catalog").unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://shop.flotilla/ns/local/svc/catalog\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
    }

    #[test]
    fn rejects_every_other_spelling() {
        for bad in [
            "",
            "http://shop.flotilla/ns/local/svc/catalog",
            "SPIFFE://shop.flotilla/ns/local/svc/catalog",
            "spiffe://shop/ns/local/svc/catalog",
            "spiffe://shop.example.org/ns/local/svc/catalog",
            "spiffe://Shop.flotilla/ns/local/svc/catalog",
            "spiffe://shop.flotilla/ns/local/svc/Catalog",
            "spiffe://shop.flotilla/ns/local/svc/catalog/",
            "spiffe://shop.flotilla/ns/local/svc/catalog?x=1",
            "spiffe://shop.flotilla/ns/local/svc/cat%61log",
            "spiffe://shop.flotilla/ns/local/svc/",
            "spiffe://shop.flotilla/ns//svc/catalog",
            "spiffe://shop.flotilla/ns/local/sa/catalog",
            "spiffe://shop.flotilla/svc/catalog",
            "spiffe://shop.flotilla",
            "spiffe://.flotilla/ns/local/svc/catalog",
            "spiffe://shop.flotilla/ns/local/svc/catalog-",
            "spiffe://shop.flotilla/ns/local/svc/1catalog",
            "spiffe://shop.flotilla/ns/local/svc/cat.alog",
            "spiffe://user@shop.flotilla/ns/local/svc/catalog",
            "spiffe://shop.flotilla:443/ns/local/svc/catalog",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let long = "a".repeat(64);
        assert!(SpiffeId::local("shop", &long).is_err());
        assert!(SpiffeId::local("shop", &"a".repeat(63)).is_ok());
    }

    #[test]
    fn errors_say_what_to_write() {
        let err = SpiffeId::parse("spiffe://shop.flotilla/x").unwrap_err();
        assert!(
            err.to_string()
                .contains("spiffe://<system>.flotilla/ns/<env>/svc/<service>")
        );
        let err = SpiffeId::local("shop", "Catalog").unwrap_err();
        assert!(err.to_string().contains("service name `Catalog`"), "{err}");
    }

    fn cert_with_uris(uris: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI((*u).try_into().unwrap()))
            .chain(std::iter::once(rcgen::SanType::DnsName(
                "catalog".try_into().unwrap(),
            )))
            .collect();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_exactly_one_uri_san() {
        let one = cert_with_uris(&["spiffe://shop.flotilla/ns/local/svc/catalog"]);
        assert_eq!(
            SpiffeId::from_cert_der(&one).unwrap(),
            SpiffeId::local("shop", "catalog").unwrap()
        );
        assert_eq!(
            SpiffeId::from_cert_der(&cert_with_uris(&[])),
            Err(IdentityError::NoSpiffeId)
        );
        let two = cert_with_uris(&[
            "spiffe://shop.flotilla/ns/local/svc/catalog",
            "spiffe://shop.flotilla/ns/local/svc/gateway",
        ]);
        assert_eq!(
            SpiffeId::from_cert_der(&two),
            Err(IdentityError::SeveralUris { count: 2 })
        );
        let foreign = cert_with_uris(&["spiffe://example.org/ns/local/svc/catalog"]);
        assert!(matches!(
            SpiffeId::from_cert_der(&foreign),
            Err(IdentityError::Malformed { .. })
        ));
    }

    #[test]
    fn not_a_certificate() {
        assert!(matches!(
            SpiffeId::from_cert_der(b"nope"),
            Err(IdentityError::NotACertificate { .. })
        ));
    }
}
