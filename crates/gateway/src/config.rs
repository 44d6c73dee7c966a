//! What a gateway is told at start (and, for routes and static files, on
//! reload): typed settings derived from the manifest, which callers may
//! override field by field.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use flotilla_manifest::{Manifest, PathPattern};

/// Everything a gateway needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen; port 0 picks a free port (see [`crate::Gateway::local_addr`]).
    pub listen: SocketAddr,
    /// The routes of every service; order does not matter, the most specific
    /// matching pattern wins.
    pub routes: Vec<RouteConfig>,
    /// Files served for GET/HEAD requests no route claims.
    pub static_dir: Option<PathBuf>,
    /// A file to append one JSON line per request to.
    pub access_log: Option<PathBuf>,
    pub limits: Limits,
}

/// One path (and optionally methods) owned by a service.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub service: String,
    pub pattern: PathPattern,
    /// Upper-case methods; empty means any. HEAD is allowed wherever GET is.
    pub methods: Vec<String>,
    /// Bounds everything up to the upstream's response headers: waiting for
    /// an instance to activate, connecting, retries and the upstream's work.
    pub timeout: Duration,
}

/// Protective bounds; the defaults suit a gateway in front of local services.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long a client may take to send a request's headers (slow-client
    /// protection).
    pub header_read_timeout: Duration,
    /// How long to wait for a TCP connection to an instance before trying
    /// another one.
    pub connect_timeout: Duration,
    /// Extra attempts, on other instances, for idempotent requests whose
    /// upstream connection failed.
    pub max_retries: u32,
    /// Largest request body buffered so that the request can be retried;
    /// larger bodies are streamed and not retried.
    pub retry_body_limit: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            max_retries: 2,
            retry_body_limit: 64 * 1024,
        }
    }
}

impl Config {
    /// The gateway described by `manifest`: its listen address, static
    /// directory and every service's routes. No access log file; callers set
    /// one (and override anything else) on the result.
    pub fn from_manifest(manifest: &Manifest) -> Config {
        Config {
            listen: manifest.gateway.listen,
            routes: manifest
                .routes()
                .map(|(service, route)| RouteConfig {
                    service: service.to_string(),
                    pattern: route.pattern.clone(),
                    methods: route.methods.clone(),
                    timeout: route.timeout,
                })
                .collect(),
            static_dir: manifest.gateway.static_dir.clone(),
            access_log: None,
            limits: Limits::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn from_manifest_takes_listen_routes_and_static_dir() {
        let toml = r#"
name = "shop"

[gateway]
listen = "127.0.0.1:0"
timeout = "7s"

[services.catalog]
run = { command = ["true"] }
routes = [{ path = "/api/catalog/**", methods = ["GET"] }]
"#;
        let manifest = match Manifest::parse(toml, Path::new("flotilla.toml")) {
            Ok(m) => m,
            Err(e) => panic!("test manifest is invalid: {e}"),
        };
        let config = Config::from_manifest(&manifest);
        assert_eq!(config.listen, manifest.gateway.listen);
        assert_eq!(config.routes.len(), 1);
        let route = &config.routes[0];
        assert_eq!(route.service, "catalog");
        assert_eq!(route.pattern.as_str(), "/api/catalog/**");
        assert_eq!(route.methods, ["GET"]);
        assert_eq!(route.timeout, Duration::from_secs(7));
        assert!(config.static_dir.is_none());
        assert!(config.access_log.is_none());
    }
}
