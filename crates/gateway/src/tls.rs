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

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use flotilla_manifest::TlsVersion;
pub use flotilla_manifest::{ClientAuth, TlsCertificate};
use flotilla_mesh::tls::FileStamp;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig, SignatureScheme};
use tokio_rustls::server::TlsStream;
use tokio_util::task::AbortOnDropHandle;

use crate::client_cert::{ClientCas, Sessions};
use crate::stats;

/// How TLS is terminated for the gateway's clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM certificate chain, the gateway's own certificate first.
    pub cert: PathBuf,
    /// PEM private key of that certificate (PKCS #8, PKCS #1 or SEC 1).
    pub key: PathBuf,
    /// Further certificates, each served to the clients that ask (SNI) for
    /// a name in its subjectAltName; `cert` goes to the rest.
    pub certificates: Vec<TlsCertificate>,
    /// PEM CA certificates that sign client certificates: with it, every
    /// client is asked for one, and one it sends must verify
    /// (`client_cert`). Looked at for renewal as the certificates are.
    pub client_ca: Option<PathBuf>,
    /// PEM CRLs of those CAs: a client certificate one of them revokes is
    /// refused. Looked at for renewal with the CAs.
    pub client_crl: Option<PathBuf>,
    /// Whether a client without a certificate may connect at all.
    pub client_auth: ClientAuth,
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
            certificates: Vec::new(),
            client_ca: None,
            client_crl: None,
            client_auth: ClientAuth::Optional,
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
    #[error(
        "{} names no DNS name in its subjectAltName, so no client could be served it",
        path.display()
    )]
    NoNames { path: PathBuf },
    #[error("{} cannot be used as client CAs: {reason}", path.display())]
    ClientCa { path: PathBuf, reason: String },
    #[error("cannot set up TLS: {0}")]
    Config(#[source] rustls::Error),
}

/// Accepts TLS connections with the current certificate.
#[derive(Clone)]
pub(crate) struct Acceptor {
    acceptor: TlsAcceptor,
    certs: Arc<Certificates>,
    client_cas: Option<Arc<ClientCas>>,
}

impl Acceptor {
    /// Loads the certificate and key now: a gateway that cannot serve TLS
    /// does not start.
    pub(crate) fn new(config: &TlsConfig) -> Result<Acceptor, TlsError> {
        let provider = flotilla_mesh::tls::crypto_provider();
        let files: Vec<TlsCertificate> = std::iter::once(TlsCertificate {
            cert: config.cert.clone(),
            key: config.key.clone(),
        })
        .chain(config.certificates.iter().cloned())
        .collect();
        let pairs = files
            .iter()
            .enumerate()
            .map(|(i, files)| load(files, i > 0, &provider))
            .collect::<Result<Vec<_>, _>>()?;
        for pair in &pairs {
            pair.record();
        }
        let certs = Arc::new(Certificates {
            files,
            provider: Arc::clone(&provider),
            current: RwLock::new(Served::new(pairs)),
        });
        let versions: &[&rustls::SupportedProtocolVersion] = match config.min_version {
            TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let client_cas = match &config.client_ca {
            Some(file) => Some(Arc::new(ClientCas::new(
                file,
                config.client_crl.as_deref(),
                config.client_auth == ClientAuth::Required,
                Arc::clone(&provider),
            )?)),
            None => None,
        };
        let builder = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(TlsError::Config)?;
        let builder = match &client_cas {
            Some(cas) => builder.with_client_cert_verifier(Arc::clone(cas) as _),
            None => builder.with_no_client_auth(),
        };
        let mut server =
            builder.with_cert_resolver(Arc::clone(&certs) as Arc<dyn ResolvesServerCert>);
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        if let Some(cas) = &client_cas {
            server.session_storage = Arc::new(Sessions::new(Arc::clone(cas)));
        }
        Ok(Acceptor {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            certs,
            client_cas,
        })
    }

    /// The TLS handshake on `stream`.
    pub(crate) async fn accept(&self, stream: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        self.acceptor.accept(stream).await
    }

    /// Looks at the files every `every` (on a task of the current runtime)
    /// and takes a changed pair; stops when the handle is dropped.
    pub(crate) fn spawn_reloader(&self, every: Duration) -> AbortOnDropHandle<()> {
        let certs = Arc::clone(&self.certs);
        let client_cas = self.client_cas.clone();
        let task = tokio::spawn(async move {
            // `interval` refuses a zero period (it would panic).
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            // Said once while it lasts, not at every look.
            let mut said: Vec<String> = Vec::new();
            loop {
                tick.tick().await;
                let certs = Arc::clone(&certs);
                let client_cas = client_cas.clone();
                let looked = match tokio::task::spawn_blocking(move || {
                    let mut looked = certs.reload_if_changed();
                    if let Some(cas) = client_cas {
                        match cas.reload_if_changed() {
                            Ok(true) => looked.reloaded.push(cas.file().to_path_buf()),
                            Ok(false) => {}
                            Err(error) => looked.failed.push(error),
                        }
                    }
                    looked
                })
                .await
                {
                    Ok(looked) => looked,
                    Err(error) => {
                        tracing::warn!(target: "flotilla::gateway", %error, "the TLS certificate reload task failed");
                        continue;
                    }
                };
                for cert in &looked.reloaded {
                    stats::tls_certificate_reloaded(true);
                    tracing::info!(target: "flotilla::gateway", cert = %cert.display(), "reloaded a TLS certificate");
                }
                let mut now = Vec::with_capacity(looked.failed.len());
                for error in &looked.failed {
                    stats::tls_certificate_reloaded(false);
                    let text = flotilla_mesh::tls::error_chain(error);
                    if !said.contains(&text) {
                        tracing::warn!(target: "flotilla::gateway", error = %text, "cannot load a renewed TLS certificate; keeping the current one");
                    }
                    now.push(text);
                }
                said = now;
            }
        });
        AbortOnDropHandle::new(task)
    }
}

/// The certificates handshakes are made with, and the files they came from.
#[derive(Debug)]
struct Certificates {
    /// `[0]` is `TlsConfig::cert`'s pair, the rest `TlsConfig::certificates`.
    files: Vec<TlsCertificate>,
    provider: Arc<CryptoProvider>,
    current: RwLock<Served>,
}

/// What one look at the files found.
#[derive(Debug, Default)]
struct Looked {
    /// The certificate files of the pairs taken anew.
    reloaded: Vec<PathBuf>,
    /// The changed pairs that did not load (each keeps its current one).
    failed: Vec<TlsError>,
}

impl Certificates {
    fn current(&self) -> std::sync::RwLockReadGuard<'_, Served> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes again each pair whose files changed since they were last taken.
    fn reload_if_changed(&self) -> Looked {
        let mut looked = Looked::default();
        let mut pairs: Option<Vec<Loaded>> = None;
        for (i, files) in self.files.iter().enumerate() {
            let seen = Fingerprint::of(&files.cert, &files.key);
            if seen == self.current().pairs[i].fingerprint {
                continue;
            }
            match load(files, i > 0, &self.provider) {
                Ok(loaded) => {
                    loaded.record();
                    pairs.get_or_insert_with(|| self.current().pairs.clone())[i] = loaded;
                    looked.reloaded.push(files.cert.clone());
                }
                Err(error) => looked.failed.push(error),
            }
        }
        if let Some(pairs) = pairs {
            *self
                .current
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Served::new(pairs);
        }
        looked
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let served = self.current();
        let chosen = served.choose(hello.server_name(), hello.signature_schemes());
        Some(Arc::clone(&chosen.key))
    }
}

/// The pairs in use, and which of them cover each name.
#[derive(Debug)]
struct Served {
    /// Never empty; `[0]` is the one served when no other's names match.
    pairs: Vec<Loaded>,
    /// Exact names, and the pairs (in order) whose subjectAltName has them.
    exact: HashMap<String, Vec<usize>>,
    /// `*.example.com`'s pairs under `example.com`.
    wildcard: HashMap<String, Vec<usize>>,
}

impl Served {
    fn new(pairs: Vec<Loaded>) -> Served {
        let mut exact: HashMap<String, Vec<usize>> = HashMap::new();
        let mut wildcard: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, pair) in pairs.iter().enumerate() {
            for name in &pair.names {
                let (map, key) = match name.strip_prefix("*.") {
                    Some(parent) => (&mut wildcard, parent),
                    None => (&mut exact, name.as_str()),
                };
                let at = map.entry(key.to_owned()).or_default();
                if !at.contains(&i) {
                    at.push(i);
                }
            }
        }
        Served {
            pairs,
            exact,
            wildcard,
        }
    }

    /// The pair for a client that asked for `name` (SNI) and can verify
    /// `schemes`: the first covering the name whose key can sign with one
    /// of them, else the first covering it, else the first of all.
    fn choose(&self, name: Option<&str>, schemes: &[SignatureScheme]) -> &Loaded {
        let first = &self.pairs[0];
        let Some(name) = name.filter(|_| self.pairs.len() > 1) else {
            return first;
        };
        let covering = self.covering(name);
        covering
            .iter()
            .map(|&i| &self.pairs[i])
            .find(|pair| pair.key.key.choose_scheme(schemes).is_some())
            .or_else(|| covering.first().map(|&i| &self.pairs[i]))
            .unwrap_or(first)
    }

    /// The pairs whose names cover `name`: exact ones, else wildcards for
    /// its parent (one label: `*.example.com` covers `a.example.com`, not
    /// `example.com` nor `a.b.example.com`).
    fn covering(&self, name: &str) -> &[usize] {
        // rustls hands over the SNI lower-cased; a trailing dot is the same
        // name to DNS.
        let name = name.strip_suffix('.').unwrap_or(name);
        let name: Cow<'_, str> = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(name.to_ascii_lowercase())
        } else {
            Cow::Borrowed(name)
        };
        if let Some(exact) = self.exact.get(name.as_ref()) {
            return exact;
        }
        match name.split_once('.') {
            Some((label, parent)) if !label.is_empty() => {
                self.wildcard.get(parent).map_or(&[], Vec::as_slice)
            }
            _ => &[],
        }
    }
}

/// One consistent pair, read from the files.
#[derive(Debug, Clone)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// The DNS names of its subjectAltName, lower-cased.
    names: Vec<String>,
    /// The certificate file, to name it in the expiry metric.
    cert: PathBuf,
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
        stats::tls_certificate_expiry(&self.cert, not_after);
        if not_after < SystemTime::now() {
            tracing::warn!(target: "flotilla::gateway", cert = %self.cert.display(), "the gateway's TLS certificate has expired: clients will refuse it");
        }
    }
}

/// What a pair's two files looked like.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint([FileStamp; 2]);

impl Fingerprint {
    fn of(cert: &Path, key: &Path) -> Fingerprint {
        Fingerprint([FileStamp::of(cert), FileStamp::of(key)])
    }
}

/// Reads one pair. `needs_names`: a further certificate, served only by
/// the names in its subjectAltName, must have some.
fn load(
    files: &TlsCertificate,
    needs_names: bool,
    provider: &CryptoProvider,
) -> Result<Loaded, TlsError> {
    let (cert, key) = (files.cert.as_path(), files.key.as_path());
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
    let bad = |reason: String| TlsError::BadCertificate {
        path: cert.to_path_buf(),
        reason,
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|e| bad(e.to_string()))?;
    let not_after = u64::try_from(parsed.validity().not_after.timestamp())
        .ok()
        .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
    let names: Vec<String> = match parsed.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => {
                    Some(dns.trim_end_matches('.').to_ascii_lowercase())
                }
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(bad(e.to_string())),
    };
    if needs_names && names.is_empty() {
        return Err(TlsError::NoNames {
            path: cert.to_path_buf(),
        });
    }
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
        names,
        cert: cert.to_path_buf(),
        fingerprint,
        not_after,
    })
}
