//! HTTPS for the gateway's clients (`[gateway.tls]`).
//!
//! The gateway terminates TLS 1.2 and 1.3 with rustls (the `ring`
//! provider, as every other TLS hop of the platform), offers HTTP/2 and
//! HTTP/1.1 by ALPN, and serves the same request path behind it, with
//! `https` as the scheme the instances see (`X-Forwarded-Proto`). TLS 1.2
//! is accepted unless the manifest asks for 1.3 only: browsers and most
//! clients speak 1.3, but load balancers and older clients in front of an
//! edge often still speak 1.2 alone, and rustls offers only its
//! forward-secret AEAD suites for it.
//!
//! The certificate chain and key are PEM files the operator provides (a
//! public CA's, or cert-manager's, or a development one). The gateway looks
//! at them every few seconds and takes a rewritten pair for new handshakes
//! without a restart, as a renewal writes them (certbot's, or a mounted
//! Kubernetes secret's); a pair that does not load (a rotation caught half
//! way: key written, chain not yet; or a key that does not match) leaves
//! the pair it has in use, and is said once in the log. Connections already
//! open keep the certificate they were made with, as with every TLS server.
//!
//! A client that speaks plain HTTP to the TLS port gets a `400` that says
//! to use `https://` (nginx answers the same, its 497), instead of a
//! handshake failure it cannot read: the first byte of a TLS connection is
//! a handshake record's (22), never a letter.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use flotilla_manifest::TlsVersion;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;

use crate::stats;

/// How TLS is terminated for the gateway's clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM certificate chain, the gateway's own certificate first.
    pub cert: PathBuf,
    /// PEM private key of that certificate (PKCS #8, PKCS #1 or SEC 1).
    pub key: PathBuf,
    /// The oldest protocol version accepted.
    pub min_version: TlsVersion,
    /// How often the two files are looked at for a renewal.
    pub reload_every: Duration,
    /// A plain-HTTP listener that answers every request with a redirect to
    /// the same URL over HTTPS (`redirect`); none if `None`.
    pub http_redirect: Option<std::net::SocketAddr>,
    /// Sends `Strict-Transport-Security: max-age=<seconds>` with every
    /// response (browsers then use HTTPS alone for the host for that long);
    /// none if `None`.
    pub hsts: Option<Duration>,
}

impl TlsConfig {
    /// TLS 1.2 and 1.3 with `cert` and `key`, looked at every 10 s.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> TlsConfig {
        TlsConfig {
            cert: cert.into(),
            key: key.into(),
            min_version: TlsVersion::Tls12,
            reload_every: Duration::from_secs(10),
            http_redirect: None,
            hsts: None,
        }
    }
}

/// Why a certificate and key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} is not a PEM certificate chain: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error(
        "{} holds no PEM private key (`-----BEGIN PRIVATE KEY-----`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`)",
        path.display()
    )]
    NoKey { path: PathBuf },
    #[error(
        "the key in {} cannot be used with the certificate in {}: {reason}",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("cannot set up TLS: {0}")]
    Config(#[source] rustls::Error),
}

/// Accepts TLS connections with the current certificate.
#[derive(Clone)]
pub(crate) struct Acceptor {
    acceptor: TlsAcceptor,
    certs: Arc<Certificates>,
}

impl Acceptor {
    /// Loads the certificate and key now: a gateway that cannot serve TLS
    /// does not start.
    pub(crate) fn new(config: &TlsConfig) -> Result<Acceptor, TlsError> {
        let provider = flotilla_mesh::tls::crypto_provider();
        let loaded = load(&config.cert, &config.key, &provider)?;
        loaded.record();
        let certs = Arc::new(Certificates {
            cert: config.cert.clone(),
            key: config.key.clone(),
            provider: Arc::clone(&provider),
            current: RwLock::new(loaded),
        });
        let versions: &[&rustls::SupportedProtocolVersion] = match config.min_version {
            TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&certs) as Arc<dyn ResolvesServerCert>);
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Acceptor {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            certs,
        })
    }

    /// The TLS handshake on `stream`.
    pub(crate) async fn accept(&self, stream: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        self.acceptor.accept(stream).await
    }

    /// Looks at the files every `every` (on a task of the current runtime)
    /// and takes a changed pair; stops when the handle is dropped.
    pub(crate) fn spawn_reloader(&self, every: Duration) -> Reloader {
        let certs = Arc::clone(&self.certs);
        let task = tokio::spawn(async move {
            // `interval` refuses a zero period (it would panic).
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut last_error = None::<String>;
            loop {
                tick.tick().await;
                let certs = Arc::clone(&certs);
                let outcome = tokio::task::spawn_blocking(move || certs.reload_if_changed()).await;
                match outcome {
                    Ok(Ok(false)) => {}
                    Ok(Ok(true)) => {
                        stats::tls_certificate_reloaded(true);
                        last_error = None;
                        tracing::info!(target: "flotilla::gateway", "reloaded the TLS certificate");
                    }
                    Ok(Err(error)) => {
                        stats::tls_certificate_reloaded(false);
                        let text = flotilla_mesh::tls::error_chain(&error);
                        if last_error.as_deref() != Some(text.as_str()) {
                            tracing::warn!(target: "flotilla::gateway", error = %text, "cannot load the renewed TLS certificate; keeping the current one");
                            last_error = Some(text);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(target: "flotilla::gateway", %error, "the TLS certificate reload task failed");
                    }
                }
            }
        });
        Reloader(task)
    }
}

/// Stops the certificate reloader when dropped.
#[derive(Debug)]
pub(crate) struct Reloader(JoinHandle<()>);

impl Drop for Reloader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The certificate handshakes are made with, and the files it came from.
#[derive(Debug)]
struct Certificates {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Loaded>,
}

impl Certificates {
    fn current(&self) -> std::sync::RwLockReadGuard<'_, Loaded> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes the files again if either changed since they were last taken.
    fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let seen = Fingerprint::of(&self.cert, &self.key);
        if seen == self.current().fingerprint {
            return Ok(false);
        }
        let loaded = load(&self.cert, &self.key, &self.provider)?;
        loaded.record();
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = loaded;
        Ok(true)
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current().key))
    }
}

/// One consistent pair, read from the files.
#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// The files as they were before they were read: a change while they
    /// were being read shows as a change on the next look.
    fingerprint: Fingerprint,
    not_after: Option<SystemTime>,
}

impl Loaded {
    fn record(&self) {
        let Some(not_after) = self.not_after else {
            return;
        };
        stats::tls_certificate_expiry(not_after);
        if not_after < SystemTime::now() {
            tracing::warn!(target: "flotilla::gateway", "the gateway's TLS certificate has expired: clients will refuse it");
        }
    }
}

/// What the two files looked like: length, modification time and inode
/// (a file replaced by rename changes its inode even within one tick of
/// the clock).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint([Option<(u64, SystemTime, u64)>; 2]);

impl Fingerprint {
    fn of(cert: &Path, key: &Path) -> Fingerprint {
        let look = |path: &Path| {
            let meta = std::fs::metadata(path).ok()?;
            #[cfg(unix)]
            let inode = std::os::unix::fs::MetadataExt::ino(&meta);
            #[cfg(not(unix))]
            let inode = 0;
            Some((meta.len(), meta.modified().ok()?, inode))
        };
        Fingerprint([look(cert), look(key)])
    }
}

fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<Loaded, TlsError> {
    let fingerprint = Fingerprint::of(cert, key);
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: cert.to_path_buf(),
            reason: e.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate {
            path: cert.to_path_buf(),
        });
    };
    let not_after = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| TlsError::BadCertificate {
            path: cert.to_path_buf(),
            reason: e.to_string(),
        })?
        .1
        .validity()
        .not_after
        .timestamp();
    let not_after = u64::try_from(not_after)
        .ok()
        .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::NoKey {
        path: key.to_path_buf(),
    })?;
    let certified =
        CertifiedKey::from_der(chain, private, provider).map_err(|e| TlsError::KeyMismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(Loaded {
        key: Arc::new(certified),
        fingerprint,
        not_after,
    })
}
