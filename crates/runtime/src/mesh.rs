//! The system's identities, as the runtime hands them out: it owns the CA
//! (`<data-dir>/ca`), issues a certificate for every instance before it
//! starts and re-issues it at 70 % of its life, writes each callee's ACL
//! (derived from the manifest) next to it, and keeps identities of its
//! own for the gateway, its health checks and the operator's CLI.
//!
//! ```text
//! <data-dir>/ca/                the CA (see flotilla-mesh)
//! <data-dir>/run/<instance>/    tls.crt, tls.key (0600), ca.crt, acl.json
//! <data-dir>/run/gateway/       the gateway's identity
//! <data-dir>/run/runtime/       the runtime's (health checks, metrics)
//! <data-dir>/operator/          the operator's: what `flotilla status/down` present
//!                               to the control API
//! ```
//!
//! Files are rewritten in place (atomically) on renewal; the processes
//! reload them by themselves, nothing restarts.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use flotilla_manifest::{AclEffect, JwksSource, Jwt, Manifest, MeshMode, Service};
use flotilla_mesh::acl::{AclError, Effect, GatewaySpec, RouteSpec, RuleSpec};
use flotilla_mesh::ca::CaError;
use flotilla_mesh::identity::{GATEWAY, RUNTIME};
use flotilla_mesh::tls::{Reloader, TlsError};
use flotilla_mesh::{
    Ca, CaConfig, ExpectedPeer, Identity, IdentityFiles, Mode, Policy, PolicySpec, SpiffeId,
};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The instance environment variable naming its ACL file.
pub const ENV_ACL_FILE: &str = "FLOTILLA_ACL_FILE";
/// The ACL file's name in an instance directory.
const ACL_FILE: &str = "acl.json";
/// How often the runtime reloads its own identity files (it rewrites them
/// itself, so this only bounds how stale its view can be).
const RELOAD_EVERY: Duration = Duration::from_secs(1);
/// Retry delay after a failed renewal, capped by what is left of the
/// certificate's life.
const RENEW_RETRY: Duration = Duration::from_secs(5);
/// The longest a renewal timer sleeps before it looks at the wall clock
/// again. tokio's clock is monotonic and stops while the machine is
/// suspended; certificates expire by the wall clock, which does not. One
/// sleep of 16.8 h (a 24 h leaf's renewal) on a laptop closed overnight
/// woke hours after every certificate had expired.
const WALL_CLOCK_CHECK: Duration = Duration::from_secs(30);

/// Why identities could not be issued or loaded.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("cannot open the system's certificate authority")]
    Ca(#[source] Box<CaError>),
    #[error("cannot issue the certificate of `{service}`")]
    Issue {
        service: String,
        #[source]
        source: Box<CaError>,
    },
    #[error("cannot load the {role}'s identity from {}", dir.display())]
    Load {
        role: &'static str,
        dir: PathBuf,
        #[source]
        source: Box<TlsError>,
    },
    #[error("the ACL of `{service}` derived from the manifest is invalid")]
    Acl {
        service: String,
        #[source]
        source: Box<AclError>,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the certificate authority task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// The runtime's side of the mesh for one system.
pub(crate) struct Mesh {
    ca: Mutex<Ca>,
    lifetime: Duration,
    data_dir: PathBuf,
    /// Each service's ACL, as written to its instances.
    policies: BTreeMap<String, PolicySpec>,
    /// The runtime's own identity: health checks and metrics.
    runtime: Identity,
    _runtime_reloader: Reloader,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("data_dir", &self.data_dir)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

/// Renews one identity until dropped.
pub(crate) struct Renewal(JoinHandle<()>);

impl Drop for Renewal {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Mesh {
    /// Opens (or creates) the CA, derives and checks every service's ACL,
    /// and issues the runtime's own identity.
    pub(crate) async fn open(
        manifest: &Manifest,
        data_dir: &Path,
        lifetime: Duration,
    ) -> Result<(Arc<Mesh>, Renewal), MeshError> {
        let ca_dir = data_dir.join("ca");
        let system = manifest.name.clone();
        let ca = blocking(move || {
            Ca::open(ca_dir, CaConfig::new(&system)).map_err(|e| MeshError::Ca(Box::new(e)))
        })
        .await?;
        let mode = match manifest.mesh.mode {
            MeshMode::Enforce => Mode::Enforce,
            MeshMode::Audit => Mode::Audit,
        };
        let mut policies = BTreeMap::new();
        for service in manifest.services.values() {
            let spec = policy_spec(&ca, manifest, service, mode)?;
            Policy::from_spec(&spec).map_err(|source| MeshError::Acl {
                service: service.name.clone(),
                source: Box::new(source),
            })?;
            policies.insert(service.name.clone(), spec);
        }
        let ca = Mutex::new(ca);
        let runtime_dir = run_dir(data_dir).join(RUNTIME);
        let renew_at = issue_into(&ca, RUNTIME, &runtime_dir, lifetime)?;
        let runtime = Identity::load(IdentityFiles::in_dir(&runtime_dir)).map_err(|source| {
            MeshError::Load {
                role: "runtime",
                dir: runtime_dir.clone(),
                source: Box::new(source),
            }
        })?;
        let reloader = runtime.spawn_reloader(RELOAD_EVERY);
        let mesh = Arc::new(Mesh {
            ca,
            lifetime,
            data_dir: data_dir.to_path_buf(),
            policies,
            runtime,
            _runtime_reloader: reloader,
        });
        let renewal = Arc::clone(&mesh).keep_renewed(RUNTIME.to_string(), runtime_dir, renew_at);
        Ok((mesh, renewal))
    }

    /// Where the identity of `name` (an instance id or a platform role)
    /// lives.
    pub(crate) fn dir_of(&self, name: &str) -> PathBuf {
        run_dir(&self.data_dir).join(name)
    }

    /// Issues the identity of a platform role (`gateway`, `operator`) into
    /// `dir` and keeps it renewed.
    pub(crate) async fn issue_platform(
        self: &Arc<Self>,
        role: &'static str,
        dir: PathBuf,
    ) -> Result<Renewal, MeshError> {
        let renew_at = self.issue(role, &dir).await?;
        Ok(Arc::clone(self).keep_renewed(role.to_string(), dir, renew_at))
    }

    /// The environment the system's identities belong to.
    pub(crate) fn env(&self) -> String {
        self.ca
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .env()
            .to_string()
    }

    /// The gateway's identity directory.
    pub(crate) fn gateway_dir(&self) -> PathBuf {
        self.dir_of(GATEWAY)
    }

    /// Prepares instance `id` of `service`: a fresh certificate and its ACL
    /// in the instance's directory; returns the variables that point the
    /// instance at them, and the renewal that lasts as long as it is kept.
    pub(crate) async fn prepare_instance(
        self: &Arc<Self>,
        service: &str,
        id: &str,
    ) -> Result<(Vec<(String, String)>, Renewal), MeshError> {
        let dir = self.dir_of(id);
        let renew_at = self.issue(service, &dir).await?;
        let acl = dir.join(ACL_FILE);
        // Every service of the manifest has one; `null` (deny everything)
        // is only what a service unknown to it would get.
        let text = serde_json::to_vec_pretty(&self.policies.get(service)).map_err(|e| {
            MeshError::Write {
                path: acl.clone(),
                source: io::Error::other(e),
            }
        })?;
        let path = acl.clone();
        blocking(move || {
            write_atomically(&path, &text).map_err(|source| MeshError::Write {
                path: path.clone(),
                source,
            })
        })
        .await?;
        let files = IdentityFiles::in_dir(&dir);
        let mut env: Vec<(String, String)> = files
            .env()
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.display().to_string()))
            .collect();
        env.push((ENV_ACL_FILE.to_string(), acl.display().to_string()));
        let renewal = Arc::clone(self).keep_renewed(service.to_string(), dir, renew_at);
        Ok((env, renewal))
    }

    /// A TLS server with the runtime's identity: for the control API.
    pub(crate) fn control_acceptor(&self) -> Result<TlsAcceptor, MeshError> {
        flotilla_mesh::server_config(&self.runtime)
            .map(TlsAcceptor::from)
            .map_err(|source| MeshError::Load {
                role: "runtime",
                dir: self.dir_of(RUNTIME),
                source: Box::new(source),
            })
    }

    /// A TLS client with the runtime's identity that accepts only an
    /// instance of `service`: for health checks.
    pub(crate) fn prober(&self, service: &str) -> Result<TlsConnector, MeshError> {
        flotilla_mesh::client_config(&self.runtime, ExpectedPeer::service(service))
            .map(TlsConnector::from)
            .map_err(|source| MeshError::Load {
                role: "runtime",
                dir: self.dir_of(RUNTIME),
                source: Box::new(source),
            })
    }

    /// Issues a leaf for `service` into `dir`; returns when to renew it.
    async fn issue(self: &Arc<Self>, service: &str, dir: &Path) -> Result<SystemTime, MeshError> {
        let mesh = Arc::clone(self);
        let service = service.to_string();
        let dir = dir.to_path_buf();
        blocking(move || issue_into(&mesh.ca, &service, &dir, mesh.lifetime)).await
    }

    /// Re-issues `service`'s leaf in `dir` at each `renew_at`, until the
    /// returned guard is dropped. A failed renewal is logged and retried
    /// while the current certificate is still valid.
    fn keep_renewed(self: Arc<Self>, service: String, dir: PathBuf, first: SystemTime) -> Renewal {
        Renewal(tokio::spawn(async move {
            let mut renew_at = first;
            let mut failing = false;
            loop {
                until_wall_clock(renew_at).await;
                match self.issue(&service, &dir).await {
                    Ok(next) => {
                        tracing::debug!(%service, dir = %dir.display(), "certificate renewed");
                        renew_at = next;
                        failing = false;
                    }
                    Err(e) => {
                        // The first failure of a run is an error, shown at
                        // the default log level: left alone, it ends in
                        // every call to the service failing.
                        let error = flotilla_mesh::tls::error_chain(&e);
                        if failing {
                            tracing::warn!(%service, dir = %dir.display(), %error, "cannot renew the certificate; retrying");
                        } else {
                            tracing::error!(%service, dir = %dir.display(), %error, "cannot renew the certificate; retrying every few seconds until it expires");
                        }
                        failing = true;
                        renew_at = SystemTime::now() + RENEW_RETRY.min(self.lifetime / 10);
                    }
                }
            }
        }))
    }
}

/// Returns once the wall clock reads `at` (at once if it has passed),
/// looking again at least every [`WALL_CLOCK_CHECK`].
async fn until_wall_clock(at: SystemTime) {
    while let Ok(left) = at.duration_since(SystemTime::now()) {
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(WALL_CLOCK_CHECK)).await;
    }
}

fn run_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("run")
}

/// Runs CA and file work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, MeshError> + Send + 'static,
) -> Result<T, MeshError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(MeshError::Task)?
}

fn issue_into(
    ca: &Mutex<Ca>,
    service: &str,
    dir: &Path,
    lifetime: Duration,
) -> Result<SystemTime, MeshError> {
    create_private_dir(dir).map_err(|source| MeshError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca = ca.lock().unwrap_or_else(|e| e.into_inner());
    let issue_error = |source| MeshError::Issue {
        service: service.to_string(),
        source: Box::new(source),
    };
    let leaf = ca.issue_leaf(service, lifetime).map_err(issue_error)?;
    leaf.write(&IdentityFiles::in_dir(dir))
        .map_err(issue_error)?;
    Ok(leaf.renew_at())
}

/// Creates `dir` (0700: it holds a private key) and its parents.
fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

fn write_atomically(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

/// What the gateway may call on `callee`, as the manifest implies it: its
/// routes and those that split a share of their requests to it (HEAD
/// wherever GET, as the gateway forwards it), `GET` of a JWKS the gateway
/// fetches from it, and the checks `[gateway.authz]` sends it. The one
/// place this is worked out: the instances' ACLs are made from it, and a
/// hot reload that needs more than they allow is refused by it.
pub(crate) fn gateway_routes(manifest: &Manifest, callee: &str) -> Vec<RouteSpec> {
    // Its own routes, and those that split a share of their requests to it.
    let mut routes: Vec<RouteSpec> = manifest
        .routes_reaching(callee)
        .map(|r| {
            let mut methods = r.methods.clone();
            if methods.iter().any(|m| m == "GET") && !methods.iter().any(|m| m == "HEAD") {
                methods.push("HEAD".to_string());
            }
            // The path as the instance sees it: less any `strip_prefix`.
            RouteSpec {
                path: r.forwarded_pattern().as_str().to_string(),
                methods,
            }
        })
        .collect();
    for jwt in &manifest.gateway.jwt {
        if let Jwt {
            jwks: JwksSource::Service { service, path },
            ..
        } = jwt
            && service == callee
        {
            routes.push(RouteSpec {
                path: path.clone(),
                methods: vec!["GET".to_string(), "HEAD".to_string()],
            });
        }
    }
    // The external authorization service: its checks are the gateway's
    // requests, any method, under the check's path prefix.
    if let Some(authz) = &manifest.gateway.authz
        && authz.service == callee
    {
        routes.push(RouteSpec {
            path: format!("{}/**", authz.path_prefix),
            methods: Vec::new(),
        });
    }
    routes
}

/// The ACL of `callee` the manifest implies: its callers from the other
/// services' `calls`, the gateway on what [`gateway_routes`] gives it, the
/// runtime on its health paths, and the service's own `acl` rules.
fn policy_spec(
    ca: &Ca,
    manifest: &Manifest,
    callee: &Service,
    mode: Mode,
) -> Result<PolicySpec, MeshError> {
    let id = |service: &str| -> Result<SpiffeId, MeshError> {
        ca.id_for(service).map_err(|source| MeshError::Issue {
            service: service.to_string(),
            source: Box::new(source),
        })
    };
    let routes = gateway_routes(manifest, &callee.name);
    let mut spec = PolicySpec::new(id(&callee.name)?);
    spec.mode = mode;
    spec.callers = manifest
        .services
        .values()
        .filter(|s| s.calls.contains(&callee.name))
        .map(|s| s.name.clone())
        .collect();
    spec.gateway = Some(GatewaySpec {
        identity: id(GATEWAY)?,
        routes,
    });
    spec.runtime = Some(id(RUNTIME)?);
    spec.rules = callee
        .acl
        .iter()
        .map(|r| RuleSpec {
            caller: r.caller.clone(),
            path: r.pattern.as_str().to_string(),
            methods: r.methods.clone(),
            effect: match r.effect {
                AclEffect::Allow => Effect::Allow,
                AclEffect::Deny => Effect::Deny,
            },
        })
        .collect();
    // The broker POSTs push deliveries to the paths queues and streams
    // deliver to, and to nothing else of the service.
    let deliveries = manifest
        .queues
        .values()
        .filter_map(|q| q.deliver.as_ref())
        .chain(manifest.streams.values().filter_map(|s| s.deliver.as_ref()))
        .filter(|d| d.to == callee.name);
    // As a caller with allow rules it gets only those paths, not the
    // allow-everything a `calls` entry implies.
    for d in deliveries {
        spec.callers
            .insert(flotilla_mesh::identity::BROKER.to_string());
        spec.rules.push(RuleSpec {
            caller: flotilla_mesh::identity::BROKER.to_string(),
            path: d.path.clone(),
            methods: vec!["POST".to_string()],
            effect: Effect::Allow,
        });
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A paused tokio clock stands for a suspended machine: tokio's time
    /// does not pass with the wall clock's. The renewal timer still waits
    /// for the wall clock (a timer on tokio's time alone returned at once
    /// here, as one woke hours late after a laptop's night).
    #[tokio::test(start_paused = true)]
    async fn a_renewal_waits_for_the_wall_clock_not_tokio_s() {
        let at = SystemTime::now() + Duration::from_millis(200);
        until_wall_clock(at).await;
        assert!(SystemTime::now() >= at);
        // Past: at once.
        until_wall_clock(SystemTime::UNIX_EPOCH).await;
    }

    #[test]
    fn the_manifest_implies_each_callee_s_acl() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = Manifest::parse(
            r#"name = "shop"
[services.catalog]
run = { cargo = "c" }
routes = [{ path = "/api/catalog/**", methods = ["GET"], split = { catalog-v2 = 0 } }]
acl = [{ caller = "orders", path = "/api/catalog/**", methods = ["GET"] }]
[services.catalog-v2]
run = { cargo = "c2" }
[services.orders]
run = { cargo = "o" }
calls = ["catalog"]
routes = [{ path = "/api/orders" }, { path = "/legacy/orders/**", strip_prefix = "/legacy" }]
[services.accounts]
run = { cargo = "a" }
[services.policy]
run = { cargo = "p" }
[mesh]
mode = "audit"
[gateway]
jwt = { issuer = "shop", audiences = ["shop"], jwks = "accounts:/.well-known/jwks.json" }
[gateway.authz]
service = "policy"
path_prefix = "/check"
"#,
            &dir.path().join("flotilla.toml"),
        )
        .unwrap();
        let ca = Ca::open(dir.path().join("ca"), CaConfig::new("shop")).unwrap();
        let catalog =
            policy_spec(&ca, &manifest, &manifest.services["catalog"], Mode::Audit).unwrap();
        assert_eq!(
            catalog.callee.to_string(),
            "spiffe://shop.flotilla/ns/local/svc/catalog"
        );
        assert_eq!(catalog.mode, Mode::Audit);
        assert_eq!(catalog.callers.iter().collect::<Vec<_>>(), ["orders"]);
        let gateway = catalog.gateway.as_ref().unwrap();
        assert_eq!(gateway.identity.service(), "gateway");
        assert_eq!(gateway.routes[0].methods, ["GET", "HEAD"]);
        assert_eq!(catalog.runtime.as_ref().unwrap().service(), "runtime");
        assert_eq!(catalog.rules.len(), 1);
        Policy::from_spec(&catalog).unwrap();

        // A canary lets the gateway in on the routes that split to it, even
        // at 0 %, so its share can be raised without a restart.
        let canary = policy_spec(
            &ca,
            &manifest,
            &manifest.services["catalog-v2"],
            Mode::Enforce,
        )
        .unwrap();
        let routes = &canary.gateway.as_ref().unwrap().routes;
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].path, "/api/catalog/**");

        let orders =
            policy_spec(&ca, &manifest, &manifest.services["orders"], Mode::Enforce).unwrap();
        assert!(orders.callers.is_empty(), "nobody calls orders");
        let routes = &orders.gateway.as_ref().unwrap().routes;
        assert!(routes[0].methods.is_empty());
        // A stripped route is allowed as the instance sees it.
        assert_eq!(routes[1].path, "/orders/**");
        let policy = Policy::from_spec(&orders).unwrap();
        let gateway = orders.gateway.unwrap().identity;
        let allowed = |path| policy.decide(&gateway, &http::Method::GET, path).allowed;
        assert!(allowed("/orders/7"));
        assert!(!allowed("/legacy/orders/7"));

        // The gateway fetches its token keys from accounts.
        let accounts = policy_spec(
            &ca,
            &manifest,
            &manifest.services["accounts"],
            Mode::Enforce,
        )
        .unwrap();
        let routes = &accounts.gateway.as_ref().unwrap().routes;
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].path, "/.well-known/jwks.json");
        let policy = Policy::from_spec(&accounts).unwrap();
        let gateway = accounts.gateway.unwrap().identity;
        assert!(
            policy
                .decide(&gateway, &http::Method::GET, "/.well-known/jwks.json")
                .allowed
        );

        // The gateway asks the authorization service, any method, under
        // the check's prefix only.
        let spec =
            policy_spec(&ca, &manifest, &manifest.services["policy"], Mode::Enforce).unwrap();
        let policy = Policy::from_spec(&spec).unwrap();
        let gateway = spec.gateway.unwrap().identity;
        let allowed = |method, path| policy.decide(&gateway, &method, path).allowed;
        assert!(allowed(http::Method::DELETE, "/check/api/orders/7"));
        assert!(allowed(http::Method::GET, "/check/"));
        assert!(!allowed(http::Method::GET, "/admin"));
    }

    #[test]
    fn the_broker_may_post_only_the_paths_it_delivers_to() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = Manifest::parse(
            r#"name = "shop"
[topics.orders]
[queues.q]
subscribe = { topic = "orders" }
deliver = { to = "inventory", path = "/events/orders" }
[services.inventory]
run = { cargo = "i" }
routes = [{ path = "/api/inventory/*", methods = ["GET"] }]
[services.orders]
run = { cargo = "o" }
publishes = ["orders"]
"#,
            &dir.path().join("flotilla.toml"),
        )
        .unwrap();
        let ca = Ca::open(dir.path().join("ca"), CaConfig::new("shop")).unwrap();
        let spec = policy_spec(
            &ca,
            &manifest,
            &manifest.services["inventory"],
            Mode::Enforce,
        )
        .unwrap();
        let policy = Policy::from_spec(&spec).unwrap();
        let broker = ca.id_for("broker").unwrap();
        let allowed = |m: http::Method, p: &str| policy.decide(&broker, &m, p).allowed;
        assert!(allowed(http::Method::POST, "/events/orders"));
        assert!(!allowed(http::Method::GET, "/events/orders"));
        assert!(!allowed(http::Method::POST, "/events/other"));
        assert!(!allowed(http::Method::GET, "/api/inventory/x"));
        // Nobody else delivers to orders: the broker is no caller of it.
        let orders =
            policy_spec(&ca, &manifest, &manifest.services["orders"], Mode::Enforce).unwrap();
        assert!(orders.callers.is_empty());
    }
}
