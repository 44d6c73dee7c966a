//! Starting a system from an inline manifest in a temp dir.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_manifest::Manifest;
use flotilla_mesh::tls::error_chain;
use flotilla_mesh::{
    Ca, CaConfig, ExpectedPeer, Identity, IdentityFiles, client_config, connect_with_timeout,
};
use flotilla_runtime::{Options, ServiceStatus, System};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

/// One rule for every crate's tests (`flotilla-testenv`).
pub use flotilla_testenv::env_or_skip;

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
    start_with(services, |_| {}).await
}

/// Like [`start`], adjusting the options first.
pub async fn start_with(services: &str, configure: impl FnOnce(&mut Options)) -> Harness {
    start_editing(services, configure, |_| {}).await
}

/// Like [`start_with`], calling `edit` with the manifest's path once it has
/// been read and before the system starts (as `flotilla up` reads it
/// before it builds the services).
pub async fn start_editing(
    services: &str,
    configure: impl FnOnce(&mut Options),
    edit: impl FnOnce(&Path),
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "name = \"rt\"\n{}",
        services.replace("HELLO", &hello().display().to_string())
    );
    let path = dir.path().join("flotilla.toml");
    std::fs::write(&path, text).unwrap();
    // Read once the file system's clock has passed the write by more than
    // the watcher allows for its lag (50 ms), as a manifest is read by
    // `flotilla up` well after it was saved: else the watcher would take
    // the file for one saved after it was read, and reload it once.
    let written = std::time::SystemTime::now();
    while written.elapsed().unwrap_or_default() < Duration::from_millis(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let read_at = std::time::SystemTime::now();
    let manifest = Manifest::load(&path).unwrap();
    edit(&path);
    let mut options = Options::new(dir.path().join("data"));
    options.listen = Some(([127, 0, 0, 1], 0).into());
    options.echo_logs = true;
    options.manifest_read_at = Some(read_at);
    configure(&mut options);
    let system = match System::start(manifest, options).await {
        Ok(system) => system,
        Err(e) => {
            let kept = dir.keep();
            panic!(
                "the system did not start: {e}; data dir kept at {}",
                kept.display()
            );
        }
    };
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

    /// Stops the system and hands over its temp dir (to start again on it).
    pub async fn stop_keeping_dir(mut self) -> tempfile::TempDir {
        if let Some(s) = self.system.take() {
            s.shutdown().await;
        }
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
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

/// An identity of this system's `service`, issued by its own CA (as the
/// runtime would issue it) into a directory of the test's.
pub fn identity(h: &Harness, service: &str) -> Identity {
    let ca = Ca::open(h.system().data_dir().join("ca"), CaConfig::new("rt")).unwrap();
    let leaf = ca.issue_leaf(service, Duration::from_secs(3600)).unwrap();
    let dir = h.dir.path().join("ids").join(service);
    let files = IdentityFiles::in_dir(&dir);
    leaf.write(&files).unwrap();
    Identity::load(files).unwrap()
}

/// Sends `request` over mutual TLS as `identity` to `addr`, expecting the
/// server to be an instance of `expected`; the whole answer.
pub async fn tls_exchange(
    identity: &Identity,
    expected: &str,
    addr: &str,
    request: &str,
) -> Result<String, String> {
    let connector = TlsConnector::from(
        client_config(identity, ExpectedPeer::service(expected)).map_err(|e| e.to_string())?,
    );
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let ip = tcp.peer_addr().unwrap().ip();
    let (mut tls, _) = connect_with_timeout(
        &connector,
        ServerName::from(ip),
        tcp,
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| error_chain(&e))?;
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    match tls.read_to_end(&mut response).await {
        Ok(_) => {}
        // Python's ssl closes without close_notify after the response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(e.to_string()),
    }
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// `GET path` over mutual TLS; the whole answer.
pub async fn tls_get(
    identity: &Identity,
    expected: &str,
    addr: &str,
    path: &str,
) -> Result<String, String> {
    tls_exchange(
        identity,
        expected,
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {expected}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// `host:port` of an `https://host:port` address from endpoints.json.
pub fn host_port(address: &str) -> String {
    address.trim_start_matches("https://").to_string()
}

/// The environment of a running process, from /proc.
pub fn environ(pid: u32) -> Vec<(String, String)> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}
