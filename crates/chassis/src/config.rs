//! The runtime contract as a typed, validated struct.
//!
//! Everything the runtime tells an instance arrives as environment variables;
//! this module reads them once, at start, from a snapshot (so tests can pass
//! their own map instead of mutating the process environment) and fails fast
//! with the variable's name and the fix.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::Error;
use crate::tls::TlsFiles;

/// Listen address used when neither `FLOTILLA_LISTEN` nor `PORT` is set.
pub(crate) const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8000);
/// Default drain deadline (`FLOTILLA_DRAIN_SECONDS`).
pub(crate) const DEFAULT_DRAIN: Duration = Duration::from_secs(10);
/// Longest accepted drain deadline: beyond an hour a typo is likelier than intent.
const MAX_DRAIN_SECONDS: u64 = 3600;

/// Where the listen address came from, so start-up can say so in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListenSource {
    /// `FLOTILLA_LISTEN`.
    Flotilla,
    /// `PORT`, bound on all interfaces as container platforms expect.
    Port,
    /// Neither was set.
    Default,
}

/// A snapshot of the environment.
pub(crate) type Env = BTreeMap<String, String>;

/// The validated contract.
#[derive(Clone)]
pub(crate) struct Config {
    pub system: String,
    pub service: String,
    pub instance: String,
    pub listen: SocketAddr,
    pub listen_source: ListenSource,
    pub drain: Duration,
    pub otel_service_name: Option<String>,
    /// mTLS identity files.
    pub tls: Option<TlsFiles>,
    /// The ACL (`FLOTILLA_ACL_FILE`); required with `tls`.
    pub acl_file: Option<std::path::PathBuf>,
    pub env: Env,
}

/// Leaves the environment out: `DATABASE_URL` may carry a password one day.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("system", &self.system)
            .field("service", &self.service)
            .field("instance", &self.instance)
            .field("listen", &self.listen)
            .field("drain", &self.drain)
            .field("tls", &self.tls)
            .field("acl_file", &self.acl_file)
            .finish_non_exhaustive()
    }
}

/// The variable holding the URL of dependency `dep`: upper-cased, `-` → `_`.
pub(crate) fn dependency_var(dep: &str) -> String {
    let mut var = String::from("FLOTILLA_URL_");
    var.extend(dep.chars().map(|c| match c {
        '-' => '_',
        c => c.to_ascii_uppercase(),
    }));
    var
}

/// Reads the process environment; variables whose value is not UTF-8 are
/// kept out of the snapshot and rejected by name if they belong to the
/// contract.
pub(crate) fn process_env() -> Result<Env, Error> {
    let mut env = Env::new();
    for (key, value) in std::env::vars_os() {
        let Ok(key) = key.into_string() else { continue };
        match value.into_string() {
            Ok(value) => {
                env.insert(key, value);
            }
            Err(raw) if is_contract_var(&key) => {
                return Err(Error::InvalidEnv {
                    value: raw.to_string_lossy().into_owned(),
                    var: key,
                    reason: "not valid UTF-8".into(),
                    fix: "set it to a UTF-8 value".into(),
                });
            }
            Err(_) => {}
        }
    }
    Ok(env)
}

fn is_contract_var(key: &str) -> bool {
    key.starts_with("FLOTILLA_")
        || key.starts_with("OTEL_")
        || key == "PORT"
        || key == "DATABASE_URL"
        || key == "RUST_LOG"
}

impl Config {
    pub(crate) fn from_env(mut env: Env) -> Result<Self, Error> {
        // Only the contract's variables are kept, so nothing else in the
        // environment can end up anywhere through this struct.
        env.retain(|key, _| is_contract_var(key));
        let service = required(&env, "FLOTILLA_SERVICE", SERVICE_FIX)?;
        check_name("FLOTILLA_SERVICE", &service)?;
        let instance = match non_empty(&env, "FLOTILLA_INSTANCE") {
            Some(instance) => instance,
            None => format!("{service}-0"),
        };
        let system = non_empty(&env, "FLOTILLA_SYSTEM").unwrap_or_else(|| "local".to_owned());
        let (listen, listen_source) = listen_addr(&env)?;
        let drain = drain_deadline(&env)?;
        let tls = TlsFiles::from_env(&env)?;
        let acl_file = non_empty(&env, ACL_FILE_VAR).map(std::path::PathBuf::from);
        if tls.is_some() && acl_file.is_none() {
            return Err(Error::MissingEnv {
                var: ACL_FILE_VAR,
                fix: "the runtime sets it with FLOTILLA_TLS_*: an instance that serves mutual TLS applies the ACL in that file; when running by hand, point it at an ACL (docs/runtime-contract.md)",
            });
        }
        Ok(Config {
            acl_file,
            otel_service_name: non_empty(&env, "OTEL_SERVICE_NAME"),
            system,
            service,
            instance,
            listen,
            listen_source,
            drain,
            tls,
            env,
        })
    }

    /// The URL the runtime gave for dependency `dep`, validated.
    pub(crate) fn dependency_url(&self, dep: &str) -> Result<String, Error> {
        let var = dependency_var(dep);
        let Some(url) = non_empty(&self.env, &var) else {
            return Err(Error::UndeclaredDependency {
                dep: dep.to_owned(),
                var,
                service: self.service.clone(),
            });
        };
        http_url(var, url)
    }

    /// The broker's URL (`FLOTILLA_BROKER_URL`), validated.
    pub(crate) fn broker_url(&self) -> Result<String, Error> {
        let Some(url) = non_empty(&self.env, BROKER_URL_VAR) else {
            return Err(Error::NoBroker {
                service: self.service.clone(),
            });
        };
        http_url(BROKER_URL_VAR.to_owned(), url)
    }

    pub(crate) fn database_url(&self) -> Option<String> {
        non_empty(&self.env, "DATABASE_URL")
    }
}

/// An absolute http(s) URL with a host, without a trailing `/`.
fn http_url(var: String, url: String) -> Result<String, Error> {
    let parsed = reqwest::Url::parse(&url).map_err(|e| Error::InvalidEnv {
        var: var.clone(),
        value: url.clone(),
        reason: e.to_string(),
        fix: "use an absolute URL such as http://127.0.0.1:40211".into(),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err(Error::InvalidEnv {
            var,
            value: url,
            reason: "not an http(s) URL with a host".into(),
            fix: "use an absolute URL such as http://127.0.0.1:40211".into(),
        });
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// The variable holding the broker's URL.
const BROKER_URL_VAR: &str = "FLOTILLA_BROKER_URL";

/// The variable naming the instance's ACL file.
const ACL_FILE_VAR: &str = "FLOTILLA_ACL_FILE";

const SERVICE_FIX: &str = "the Flotilla runtime sets it; when running by hand, set FLOTILLA_SERVICE to the service's name in flotilla.toml";

fn non_empty(env: &Env, var: &str) -> Option<String> {
    env.get(var)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

fn required(env: &Env, var: &'static str, fix: &'static str) -> Result<String, Error> {
    non_empty(env, var).ok_or(Error::MissingEnv { var, fix })
}

fn check_name(var: &str, value: &str) -> Result<(), Error> {
    let ok = value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidEnv {
            var: var.to_owned(),
            value: value.to_owned(),
            reason: "a service name is at most 63 ASCII letters, digits, '-' or '_'".into(),
            fix: "use the service's key from flotilla.toml".into(),
        })
    }
}

fn listen_addr(env: &Env) -> Result<(SocketAddr, ListenSource), Error> {
    if let Some(value) = non_empty(env, "FLOTILLA_LISTEN") {
        let addr = value
            .parse()
            .map_err(|e: std::net::AddrParseError| Error::InvalidEnv {
                var: "FLOTILLA_LISTEN".into(),
                value: value.clone(),
                reason: e.to_string(),
                fix: "use IP:PORT, for example 127.0.0.1:8081".into(),
            })?;
        return Ok((addr, ListenSource::Flotilla));
    }
    if let Some(value) = non_empty(env, "PORT") {
        let port: u16 = value
            .parse()
            .map_err(|e: std::num::ParseIntError| Error::InvalidEnv {
                var: "PORT".into(),
                value: value.clone(),
                reason: e.to_string(),
                fix: "use a port number from 0 to 65535, or set FLOTILLA_LISTEN=IP:PORT".into(),
            })?;
        return Ok((
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            ListenSource::Port,
        ));
    }
    Ok((DEFAULT_LISTEN, ListenSource::Default))
}

fn drain_deadline(env: &Env) -> Result<Duration, Error> {
    let Some(value) = non_empty(env, "FLOTILLA_DRAIN_SECONDS") else {
        return Ok(DEFAULT_DRAIN);
    };
    match value.parse::<u64>() {
        Ok(secs) if secs <= MAX_DRAIN_SECONDS => Ok(Duration::from_secs(secs)),
        Ok(_) => Err(Error::InvalidEnv {
            var: "FLOTILLA_DRAIN_SECONDS".into(),
            value,
            reason: format!("more than {MAX_DRAIN_SECONDS} seconds"),
            fix: "use a whole number of seconds from 0 to 3600 (default 10)".into(),
        }),
        Err(e) => Err(Error::InvalidEnv {
            var: "FLOTILLA_DRAIN_SECONDS".into(),
            value,
            reason: e.to_string(),
            fix: "use a whole number of seconds from 0 to 3600 (default 10)".into(),
        }),
    }
}

#[cfg(test)]
pub(crate) fn env_of(pairs: &[(&str, &str)]) -> Env {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, Error> {
        Config::from_env(env_of(pairs))
    }

    #[test]
    fn reads_the_contract() {
        let c = config(&[
            ("FLOTILLA_SYSTEM", "shop"),
            ("FLOTILLA_SERVICE", "catalog"),
            ("FLOTILLA_INSTANCE", "catalog-1"),
            ("FLOTILLA_LISTEN", "127.0.0.1:40123"),
            ("PORT", "40123"),
            ("OTEL_SERVICE_NAME", "catalog"),
            ("FLOTILLA_DRAIN_SECONDS", "3"),
        ])
        .unwrap();
        assert_eq!(c.system, "shop");
        assert_eq!(c.service, "catalog");
        assert_eq!(c.instance, "catalog-1");
        assert_eq!(c.listen, "127.0.0.1:40123".parse().unwrap());
        assert_eq!(c.listen_source, ListenSource::Flotilla);
        assert_eq!(c.drain, Duration::from_secs(3));
        assert_eq!(c.otel_service_name.as_deref(), Some("catalog"));
        assert!(c.tls.is_none());
    }

    #[test]
    fn keeps_only_contract_variables_and_debug_hides_them() {
        let c = config(&[
            ("FLOTILLA_SERVICE", "x"),
            ("DATABASE_URL", "sqlite:///secret/path.db"),
            ("AWS_SECRET_ACCESS_KEY", "hunter2"),
        ])
        .unwrap();
        assert!(!c.env.contains_key("AWS_SECRET_ACCESS_KEY"));
        assert!(c.database_url().is_some());
        let debug = format!("{c:?}");
        assert!(!debug.contains("secret"), "{debug}");
    }

    #[test]
    fn missing_service_names_the_variable() {
        let err = config(&[("FLOTILLA_LISTEN", "127.0.0.1:1")]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("FLOTILLA_SERVICE"), "{msg}");
        assert!(msg.contains("flotilla.toml"), "{msg}");
    }

    #[test]
    fn bad_service_name_is_rejected() {
        let err = config(&[("FLOTILLA_SERVICE", "cat alog")]).unwrap_err();
        assert!(matches!(err, Error::InvalidEnv { ref var, .. } if var == "FLOTILLA_SERVICE"));
    }

    #[test]
    fn listen_falls_back_to_port_then_default() {
        let c = config(&[("FLOTILLA_SERVICE", "x"), ("PORT", "9001")]).unwrap();
        assert_eq!(c.listen, "0.0.0.0:9001".parse().unwrap());
        assert_eq!(c.listen_source, ListenSource::Port);

        let c = config(&[("FLOTILLA_SERVICE", "x")]).unwrap();
        assert_eq!(c.listen, DEFAULT_LISTEN);
        assert_eq!(c.listen_source, ListenSource::Default);
        assert_eq!(c.instance, "x-0");
        assert_eq!(c.drain, DEFAULT_DRAIN);
    }

    #[test]
    fn invalid_listen_and_port_name_the_variable() {
        let err = config(&[("FLOTILLA_SERVICE", "x"), ("FLOTILLA_LISTEN", "localhost")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("FLOTILLA_LISTEN=\"localhost\""), "{err}");
        assert!(err.contains("IP:PORT"), "{err}");

        let err = config(&[("FLOTILLA_SERVICE", "x"), ("PORT", "99999")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("PORT=\"99999\""), "{err}");
    }

    #[test]
    fn drain_deadline_is_bounded() {
        let err = config(&[
            ("FLOTILLA_SERVICE", "x"),
            ("FLOTILLA_DRAIN_SECONDS", "soon"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("FLOTILLA_DRAIN_SECONDS"), "{err}");
        assert!(
            config(&[
                ("FLOTILLA_SERVICE", "x"),
                ("FLOTILLA_DRAIN_SECONDS", "100000")
            ])
            .is_err()
        );
    }

    #[test]
    fn dependency_variable_names() {
        assert_eq!(dependency_var("pricing"), "FLOTILLA_URL_PRICING");
        assert_eq!(
            dependency_var("product-images"),
            "FLOTILLA_URL_PRODUCT_IMAGES"
        );
    }

    #[test]
    fn dependency_urls_are_validated() {
        let c = config(&[
            ("FLOTILLA_SERVICE", "orders"),
            ("FLOTILLA_URL_PRICING", "http://127.0.0.1:40211/"),
            ("FLOTILLA_URL_CATALOG", "ftp://127.0.0.1"),
        ])
        .unwrap();
        assert_eq!(
            c.dependency_url("pricing").unwrap(),
            "http://127.0.0.1:40211"
        );
        let err = c.dependency_url("catalog").unwrap_err().to_string();
        assert!(err.contains("FLOTILLA_URL_CATALOG"), "{err}");
        let err = c.dependency_url("inventory").unwrap_err().to_string();
        assert!(err.contains("FLOTILLA_URL_INVENTORY"), "{err}");
        assert!(err.contains("`calls` of service `orders`"), "{err}");
    }
}
