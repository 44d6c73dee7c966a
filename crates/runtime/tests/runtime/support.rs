//! Starting a system from an inline manifest in a temp dir.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_manifest::Manifest;
use flotilla_runtime::{Options, ServiceStatus, System};

pub fn hello() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testkit/fixtures/hello.py")
}

pub struct Harness {
    system: Option<System>,
    pub dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()).keep();
            eprintln!("test failed; data dir kept at {}", kept.display());
        }
    }
}

/// Starts `services` (TOML for `[services.*]` tables) with the gateway on a free port.
pub async fn start(services: &str) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "name = \"rt\"\n{}",
        services.replace("HELLO", &hello().display().to_string())
    );
    let path = dir.path().join("flotilla.toml");
    std::fs::write(&path, text).unwrap();
    let manifest = Manifest::load(&path).unwrap();
    let mut options = Options::new(dir.path().join("data"));
    options.listen = Some(([127, 0, 0, 1], 0).into());
    options.echo_logs = true;
    let system = System::start(manifest, options)
        .await
        .expect("system starts");
    Harness {
        system: Some(system),
        dir,
    }
}

impl Harness {
    pub fn system(&self) -> &System {
        self.system.as_ref().expect("running")
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.system.take() {
            s.shutdown().await;
        }
    }

    pub fn service(&self, name: &str) -> ServiceStatus {
        self.system()
            .status()
            .services
            .into_iter()
            .find(|s| s.name == name)
            .unwrap()
    }

    pub fn gateway(&self) -> String {
        self.system().endpoints().gateway.clone()
    }

    pub async fn wait(&self, what: &str, deadline: Duration, f: impl Fn(&Harness) -> bool) {
        let until = Instant::now() + deadline;
        while !f(self) {
            assert!(
                Instant::now() < until,
                "timed out waiting for {what}: {:#?}",
                self.system().status()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}
