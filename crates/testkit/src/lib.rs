//! Runs a whole Flotilla system inside a test: the real runtime, real
//! processes, real sockets on free ports, and a temporary data dir that is
//! kept — with every instance's log — when the test fails, so the failure
//! can be read afterwards.
//!
//! ```no_run
//! # async fn t() -> Result<(), flotilla_testkit::Error> {
//! let system = flotilla_testkit::System::start("examples/shop/flotilla.toml").await?;
//! let url = system.url("/api/catalog/products");
//! // … drive it over HTTP …
//! system.stop().await;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_manifest::Manifest;
use flotilla_runtime::{Endpoints, Options, Profile, Status};

pub use flotilla_manifest::MeshMode;
pub use flotilla_runtime::InstanceState;

/// A complete service in Python's standard library, for tests of the
/// platform: it binds `FLOTILLA_LISTEN`, serves mutual TLS with
/// `FLOTILLA_TLS_*` (reloading renewed files), answers `/healthz` and
/// `/readyz` (503 forever with `NEVER_READY=1`), echoes the instance, path
/// and caller's SPIFFE id, and answers `GET …/sleep?ms=N` after N
/// milliseconds. It does not apply the ACL.
pub fn hello_py() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hello.py")
}

/// How a test that cannot run here says so (one rule for every crate's
/// tests, which live in `flotilla-testenv`).
pub use flotilla_testenv::{REQUIRE_ALL_ENV, env_or_skip, require_all, skip};

/// Why a test system could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create a temporary data dir")]
    TempDir(#[source] std::io::Error),
    #[error(transparent)]
    Manifest(#[from] flotilla_manifest::Error),
    #[error("the system failed to start (data dir kept at {})", data_dir.display())]
    Start {
        data_dir: PathBuf,
        #[source]
        source: flotilla_runtime::Error,
    },
}

/// How to start a test system.
#[derive(Debug, Clone)]
pub struct Builder {
    manifest: PathBuf,
    profile: Profile,
    echo: bool,
    data_dir: Option<PathBuf>,
    leaf_lifetime: Option<Duration>,
    mesh_mode: Option<MeshMode>,
}

impl Builder {
    /// Build services with this profile (default: dev, sharing artifacts with
    /// `cargo test`; set `FLOTILLA_TEST_PROFILE=release` to override).
    pub fn profile(mut self, profile: Profile) -> Self {
        self.profile = profile;
        self
    }

    /// Echo instance output to the test's stdout (shown on failure).
    pub fn echo_logs(mut self, echo: bool) -> Self {
        self.echo = echo;
        self
    }

    /// Issue certificates with this lifetime instead of the manifest's
    /// (e.g. seconds, to watch them rotate under traffic).
    pub fn leaf_lifetime(mut self, lifetime: Duration) -> Self {
        self.leaf_lifetime = Some(lifetime);
        self
    }

    /// Apply ACLs in this mode instead of the manifest's.
    pub fn mesh_mode(mut self, mode: MeshMode) -> Self {
        self.mesh_mode = Some(mode);
        self
    }

    /// Use this data dir instead of a fresh temporary one (e.g. to restart
    /// a system on the data of a previous one).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Builds and starts the system with the gateway on a free port.
    pub async fn start(self) -> Result<System, Error> {
        let manifest_path = self
            .manifest
            .canonicalize()
            .unwrap_or(self.manifest.clone());
        let manifest = Manifest::load(&manifest_path)?;
        let (temp, data_dir) = match self.data_dir.clone() {
            Some(d) => (None, d),
            None => {
                let t = tempfile::Builder::new()
                    .prefix(&format!("flotilla-test-{}-", manifest.name))
                    .tempdir()
                    .map_err(Error::TempDir)?;
                let d = t.path().to_path_buf();
                (Some(t), d)
            }
        };
        let mut options = Options::new(&data_dir);
        options.listen = Some(([127, 0, 0, 1], 0).into());
        options.profile = self.profile;
        options.echo_logs = self.echo;
        options.leaf_lifetime = self.leaf_lifetime;
        options.mesh_mode = self.mesh_mode;
        let inner = match flotilla_runtime::System::start(manifest, options).await {
            Ok(s) => s,
            Err(source) => {
                if let Some(t) = temp {
                    let _ = t.keep();
                }
                return Err(Error::Start { data_dir, source });
            }
        };
        Ok(System {
            inner: Some(inner),
            temp,
            data_dir,
            builder: self,
        })
    }
}

/// A running system; stop it with [`System::stop`]. If the test panics
/// first, dropping it keeps the data dir and prints where it is.
pub struct System {
    inner: Option<flotilla_runtime::System>,
    temp: Option<tempfile::TempDir>,
    data_dir: PathBuf,
    /// How it was started, for [`System::restart`].
    builder: Builder,
}

impl System {
    /// A builder for the system in `manifest`.
    pub fn builder(manifest: impl AsRef<Path>) -> Builder {
        let profile = match std::env::var("FLOTILLA_TEST_PROFILE").as_deref() {
            Ok("release") => Profile::Release,
            _ => Profile::Dev,
        };
        Builder {
            manifest: manifest.as_ref().to_path_buf(),
            profile,
            echo: true,
            data_dir: None,
            leaf_lifetime: None,
            mesh_mode: None,
        }
    }

    /// Starts the system in `manifest` with default options.
    pub async fn start(manifest: impl AsRef<Path>) -> Result<System, Error> {
        System::builder(manifest).start().await
    }

    fn inner(&self) -> &flotilla_runtime::System {
        // `inner` is only taken by `stop`/`restart`, which consume `self`.
        self.inner
            .as_ref()
            .unwrap_or_else(|| unreachable!("system already stopped"))
    }

    /// Where everything is.
    pub fn endpoints(&self) -> &Endpoints {
        self.inner().endpoints()
    }

    /// The gateway's base URL.
    pub fn gateway_url(&self) -> &str {
        &self.endpoints().gateway
    }

    /// The gateway URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.gateway_url())
    }

    /// The data dir (temporary unless set on the builder).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A status snapshot.
    pub fn status(&self) -> Status {
        self.inner().status()
    }

    /// Waits until `condition` holds on the status, or panics with the last
    /// status after `deadline` — the way tests wait, never with sleeps.
    pub async fn wait_for(
        &self,
        what: &str,
        deadline: Duration,
        condition: impl Fn(&Status) -> bool,
    ) -> Status {
        let until = Instant::now() + deadline;
        loop {
            let status = self.status();
            if condition(&status) {
                return status;
            }
            if Instant::now() >= until {
                panic!(
                    "timed out after {deadline:?} waiting for {what}; logs in {}; last status: {status:#?}",
                    self.data_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the system gracefully; the data dir is removed unless the test
    /// is panicking.
    pub async fn stop(mut self) {
        if let Some(inner) = self.inner.take() {
            inner.shutdown().await;
        }
    }

    /// Stops the system and starts it again on the same data dir, with the
    /// builder's settings (what `flotilla down` then `flotilla up` does).
    /// If it cannot start again, a temporary data dir is kept, with its
    /// logs, and its path printed.
    pub async fn restart(mut self) -> Result<System, Error> {
        if let Some(inner) = self.inner.take() {
            inner.shutdown().await;
        }
        let temp = self.temp.take();
        let started = self
            .builder
            .clone()
            .data_dir(self.data_dir.clone())
            .start()
            .await;
        match started {
            Ok(mut next) => {
                next.temp = temp;
                next.builder.data_dir = self.builder.data_dir.clone();
                Ok(next)
            }
            Err(e) => {
                if let Some(t) = temp {
                    let kept = t.keep();
                    eprintln!(
                        "flotilla-testkit: restart failed; data dir and logs kept at {}",
                        kept.display()
                    );
                }
                Err(e)
            }
        }
    }
}

impl Drop for System {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(t) = self.temp.take()
        {
            let kept = t.keep();
            eprintln!(
                "flotilla-testkit: test failed; data dir and logs kept at {}",
                kept.display()
            );
        }
        // Instances still running die with their tokio tasks (kill_on_drop)
        // when the test's runtime shuts down.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_manifest(dir: &Path) -> PathBuf {
        let manifest = dir.join("flotilla.toml");
        std::fs::write(
            &manifest,
            format!(
                "name = \"kit\"\n[services.hello]\nrun = {{ command = [\"python3\", \"{}\"] }}\n",
                hello_py().display()
            ),
        )
        .unwrap();
        manifest
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restart_keeps_the_builders_settings_and_a_failed_one_keeps_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = write_manifest(dir.path());
        let system = System::builder(&manifest)
            .echo_logs(false)
            .leaf_lifetime(Duration::from_secs(600))
            .mesh_mode(MeshMode::Audit)
            .start()
            .await
            .unwrap();
        let data = system.data_dir().to_path_buf();
        let system = system.restart().await.expect("restarts");
        assert_eq!(system.data_dir(), data);
        assert!(!system.builder.echo);
        assert_eq!(system.builder.leaf_lifetime, Some(Duration::from_secs(600)));
        assert_eq!(system.builder.mesh_mode, Some(MeshMode::Audit));
        assert_eq!(system.builder.data_dir, None, "a temp dir still");

        // Cannot start again (the manifest became invalid): the temp data
        // dir stays for its logs.
        std::fs::write(&manifest, "name = ").unwrap();
        let err = match system.restart().await {
            Ok(_) => panic!("restarted on an invalid manifest"),
            Err(e) => e,
        };
        assert!(matches!(err, Error::Manifest(_)), "{err}");
        let kept = data.join("logs").join("hello-0.log");
        let exists = kept.exists();
        let _ = std::fs::remove_dir_all(&data);
        assert!(exists, "{} deleted after a failed restart", kept.display());
    }
}
