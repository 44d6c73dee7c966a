//! Mutual TLS between Flotilla processes: rustls server and client configs
//! built from an instance's identity files, reloaded when those files are
//! rewritten.
//!
//! An [`Identity`] is the three PEM files the runtime writes for an
//! instance ([`IdentityFiles`]: certificate chain, key, trust bundle), held
//! in memory behind a lock and swapped whole when the files change. The
//! configs from [`server_config`] and [`client_config`] never copy the
//! certificate: their certificate resolver and their verifier read the
//! current identity at every handshake. So a rotated leaf or a new trust
//! bundle applies to the next handshake without a restart, and connections
//! already open are untouched (TLS authenticates once, at the handshake).
//!
//! Both sides speak TLS 1.3 only, both present a certificate, and both
//! check the peer's chain against the trust bundle and then its SPIFFE id:
//! it must be in the same system and environment (so a certificate of
//! another system is refused even when its CA is trusted), and on the
//! client side it must be the peer the caller meant ([`ExpectedPeer`]).
//! DNS names and IP addresses in certificates play no part: the identity is
//! the SPIFFE id.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert,
    WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use crate::identity::{IdentityError, SpiffeId};

/// Environment variable naming the certificate chain file.
pub const ENV_CERT: &str = "FLOTILLA_TLS_CERT";
/// Environment variable naming the private key file.
pub const ENV_KEY: &str = "FLOTILLA_TLS_KEY";
/// Environment variable naming the trust bundle file.
pub const ENV_CA: &str = "FLOTILLA_TLS_CA";
/// The gauge set to a certificate's `not_after` whenever one is loaded.
pub const CERT_EXPIRY_METRIC: &str = "flotilla_cert_expiry_timestamp_seconds";

/// What can go wrong loading an identity or during a handshake.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// An environment variable of the runtime contract is missing.
    #[error(
        "{var} is not set; the runtime sets it for every instance (run the service under `flotilla up`)"
    )]
    MissingEnv {
        /// The variable.
        var: &'static str,
    },
    /// A file could not be read.
    #[error("cannot read the {what} file {}", path.display())]
    Read {
        /// `certificate`, `key` or `trust bundle`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A file is not valid PEM of the expected kind.
    #[error(
        "the {what} file {} is damaged or truncated; the runtime rewrites it when the instance's certificate is re-issued",
        path.display()
    )]
    BadPem {
        /// `certificate`, `key` or `trust bundle`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The PEM parser's error.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A file holds nothing of the expected kind.
    #[error(
        "the {what} file {} holds no {what} (it is empty or truncated); the runtime rewrites it when the instance's certificate is re-issued",
        path.display()
    )]
    Empty {
        /// `certificate`, `key` or `trust bundle`.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The key cannot be used for signing.
    #[error("the key file {} holds a key rustls cannot use (expected ECDSA P-256 in PKCS#8)", path.display())]
    BadKey {
        /// The file.
        path: PathBuf,
        /// rustls's error.
        #[source]
        source: rustls::Error,
    },
    /// The key does not belong to the certificate.
    #[error(
        "the key in {} does not belong to the certificate in {}; write both from the same issue",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The certificate is unreadable as X.509 or carries no valid SPIFFE id.
    #[error("the certificate in {} is not a Flotilla identity", path.display())]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: IdentityError,
    },
    /// A certificate in the trust bundle cannot be a trust anchor.
    #[error("the trust bundle {} holds a certificate that cannot be a trust anchor", path.display())]
    BadTrustBundle {
        /// The file.
        path: PathBuf,
        /// rustls's error.
        #[source]
        source: rustls::Error,
    },
    /// Rotation must keep the instance's identity; new files with another
    /// identity are refused and the old identity kept.
    #[error(
        "the certificate in {} is for {new}, but this process is {old}; an instance keeps its identity across rotation",
        path.display()
    )]
    IdentityChanged {
        /// The certificate file.
        path: PathBuf,
        /// The identity in use.
        old: SpiffeId,
        /// The identity in the new file.
        new: SpiffeId,
    },
    /// rustls refused to build a config or verifier.
    #[error("cannot build the TLS configuration")]
    Config {
        /// rustls's error.
        #[source]
        source: rustls::Error,
    },
    /// rustls refused to build the client certificate verifier.
    #[error("cannot build the client certificate verifier")]
    Verifier {
        /// rustls's error.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// The peer did not finish the handshake in time.
    #[error("the TLS handshake did not finish within {after:?}; the connection was closed")]
    HandshakeTimeout {
        /// The deadline.
        after: Duration,
    },
    /// The handshake failed (plaintext, untrusted or expired certificate,
    /// wrong identity, ...).
    #[error("the TLS handshake failed")]
    Handshake {
        /// The I/O error wrapping rustls's error.
        #[source]
        source: io::Error,
    },
    /// The peer presented no certificate.
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    /// The peer's certificate carries no valid SPIFFE id.
    #[error("the peer's certificate is not a Flotilla identity")]
    PeerIdentity {
        /// What is wrong with it.
        #[source]
        source: IdentityError,
    },
    /// The peer belongs to another system (trust domain) or environment.
    #[error(
        "the peer {peer} belongs to another system or environment than this process ({ours}); certificates of another system are refused"
    )]
    ForeignPeer {
        /// The peer's identity.
        peer: SpiffeId,
        /// Ours.
        ours: SpiffeId,
    },
    /// The peer is not who the caller meant to reach.
    #[error("expected the peer to be {expected}, but it is {peer}")]
    UnexpectedPeer {
        /// A description of the expected identity.
        expected: String,
        /// The identity the peer presented.
        peer: SpiffeId,
    },
}

/// The three PEM files of an instance's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    /// Certificate chain: the leaf, then its intermediate.
    pub cert: PathBuf,
    /// The leaf's private key (0600).
    pub key: PathBuf,
    /// The trust bundle: one or more roots.
    pub ca: PathBuf,
}

impl IdentityFiles {
    /// The standard names inside an instance directory: `tls.crt`,
    /// `tls.key`, `ca.crt`.
    pub fn in_dir(dir: &Path) -> Self {
        IdentityFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            ca: dir.join("ca.crt"),
        }
    }

    /// From `FLOTILLA_TLS_CERT`, `FLOTILLA_TLS_KEY` and `FLOTILLA_TLS_CA`.
    pub fn from_env() -> Result<Self, TlsError> {
        let var = |var| {
            std::env::var_os(var)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .ok_or(TlsError::MissingEnv { var })
        };
        Ok(IdentityFiles {
            cert: var(ENV_CERT)?,
            key: var(ENV_KEY)?,
            ca: var(ENV_CA)?,
        })
    }

    /// The environment variables that point a process at these files.
    pub fn env(&self) -> [(&'static str, &Path); 3] {
        [
            (ENV_CERT, &self.cert),
            (ENV_KEY, &self.key),
            (ENV_CA, &self.ca),
        ]
    }
}

/// The rustls crypto provider every Flotilla config uses: `ring`.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// What a file looked like: length, modification time and inode. A
/// rewrite (even to the same size within the same timestamp tick) changes
/// the inode, since files are replaced by rename; a file that cannot be
/// looked at is `FileStamp::of` a missing one. Taken before a file is
/// read, so that a change while it is being read shows at the next look:
/// how every certificate reloader of the platform (this one, the
/// gateway's) tells a renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp(Option<(u64, SystemTime, u64)>);

impl FileStamp {
    pub fn of(path: &Path) -> FileStamp {
        let look = || {
            let meta = std::fs::metadata(path).ok()?;
            #[cfg(unix)]
            let ino = std::os::unix::fs::MetadataExt::ino(&meta);
            #[cfg(not(unix))]
            let ino = 0;
            Some((meta.len(), meta.modified().ok()?, ino))
        };
        FileStamp(look())
    }
}

/// What the identity files looked like when they were read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint([FileStamp; 3]);

impl Fingerprint {
    fn of(files: &IdentityFiles) -> Self {
        Fingerprint([&files.cert, &files.key, &files.ca].map(|p| FileStamp::of(p)))
    }
}

/// One consistent snapshot of the identity files.
struct Loaded {
    id: SpiffeId,
    certified: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    not_after: SystemTime,
    fingerprint: Fingerprint,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::BadPem {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn load(files: &IdentityFiles, provider: &Arc<CryptoProvider>) -> Result<Loaded, TlsError> {
    // Taken before reading, so a write that lands during the read shows up
    // as a change at the next poll.
    let fingerprint = Fingerprint::of(files);
    let chain = read_certs("certificate", &files.cert)?;
    let key_bytes = read("key", &files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            what: "key",
            path: files.key.clone(),
        },
        source => TlsError::BadPem {
            what: "key",
            path: files.key.clone(),
            source,
        },
    })?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::BadKey {
            path: files.key.clone(),
            source,
        })?;
    let (id, not_after) = leaf_facts(&chain[0]).map_err(|source| TlsError::BadCertificate {
        path: files.cert.clone(),
        source,
    })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(TlsError::KeyMismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
            });
        }
    }
    let mut roots = RootCertStore::empty();
    for der in read_certs("trust bundle", &files.ca)? {
        roots.add(der).map_err(|source| TlsError::BadTrustBundle {
            path: files.ca.clone(),
            source,
        })?;
    }
    let roots = Arc::new(roots);
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|source| TlsError::Verifier { source })?;
    Ok(Loaded {
        id,
        certified: Arc::new(certified),
        roots,
        client_verifier,
        not_after,
        fingerprint,
    })
}

fn leaf_facts(der: &CertificateDer<'_>) -> Result<(SpiffeId, SystemTime), IdentityError> {
    let id = SpiffeId::from_cert_der(der)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| IdentityError::NotACertificate {
            detail: e.to_string(),
        })?;
    let secs = cert.validity().not_after.timestamp();
    let not_after = UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    Ok((id, not_after))
}

fn record_expiry(loaded: &Loaded) {
    let secs = loaded
        .not_after
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    metrics::gauge!(CERT_EXPIRY_METRIC, "service" => loaded.id.service().to_string()).set(secs);
}

struct Inner {
    files: IdentityFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<Loaded>>,
    /// Serialises reloads, so a slow reload of older files cannot replace
    /// the result of a newer one.
    reloading: Mutex<()>,
    loads: AtomicU64,
}

/// An instance's identity, loaded from its files and reloadable. Cheap to
/// clone; clones share the same current certificate.
#[derive(Clone)]
pub struct Identity {
    inner: Arc<Inner>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id().to_string())
            .field("files", &self.inner.files)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads the identity: the chain's leaf must carry a SPIFFE id, the key
    /// must match it and the bundle must hold at least one root. Sets
    /// `flotilla_cert_expiry_timestamp_seconds{service}`.
    pub fn load(files: IdentityFiles) -> Result<Identity, TlsError> {
        let provider = crypto_provider();
        let loaded = load(&files, &provider)?;
        record_expiry(&loaded);
        Ok(Identity {
            inner: Arc::new(Inner {
                files,
                provider,
                current: RwLock::new(Arc::new(loaded)),
                reloading: Mutex::new(()),
                loads: AtomicU64::new(1),
            }),
        })
    }

    /// The files it is loaded from.
    pub fn files(&self) -> &IdentityFiles {
        &self.inner.files
    }

    /// Who this process is.
    pub fn id(&self) -> SpiffeId {
        self.current().id.clone()
    }

    /// When the current certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.current().not_after
    }

    /// How many times the files have been loaded successfully (1 after
    /// [`Identity::load`]); lets an owner or a test see that a rotation was
    /// picked up.
    pub fn loads(&self) -> u64 {
        self.inner.loads.load(Ordering::Acquire)
    }

    /// Re-reads the files now. On success new handshakes use them; on
    /// error the previous identity stays in use (a half-written rotation
    /// shows up as a key mismatch and is simply retried later).
    pub fn reload(&self) -> Result<(), TlsError> {
        let _one_at_a_time = self
            .inner
            .reloading
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let loaded = load(&self.inner.files, &self.inner.provider)?;
        let old = self.current();
        if loaded.id != old.id {
            return Err(TlsError::IdentityChanged {
                path: self.inner.files.cert.clone(),
                old: old.id.clone(),
                new: loaded.id,
            });
        }
        record_expiry(&loaded);
        *self
            .inner
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(loaded);
        self.inner.loads.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Reloads when any of the three files changed since the last
    /// successful load; returns whether it reloaded.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        if Fingerprint::of(&self.inner.files) == self.current().fingerprint {
            return Ok(false);
        }
        self.reload().map(|()| true)
    }

    /// Polls the files every `every` on a Tokio task (reading them on the
    /// blocking pool) and reloads on change. Stops when the returned handle
    /// is dropped. Must be called inside a Tokio runtime.
    pub fn spawn_reloader(&self, every: Duration) -> Reloader {
        let identity = self.clone();
        let handle = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_error = None::<String>;
            loop {
                tick.tick().await;
                let id = identity.clone();
                match tokio::task::spawn_blocking(move || id.reload_if_changed()).await {
                    Ok(Ok(true)) => {
                        last_error = None;
                        tracing::info!(
                            identity = %identity.id(),
                            not_after = ?identity.not_after(),
                            "reloaded the TLS identity"
                        );
                    }
                    Ok(Ok(false)) => {}
                    Ok(Err(error)) => {
                        let text = error_chain(&error);
                        // A rotation in progress fails once or twice
                        // (key written, chain not yet); say it once.
                        if last_error.as_deref() != Some(text.as_str()) {
                            tracing::warn!(error = %text, "cannot reload the TLS identity; keeping the current one");
                            last_error = Some(text);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "the TLS identity reload task failed");
                    }
                }
            }
        });
        Reloader { handle }
    }

    fn current(&self) -> Arc<Loaded> {
        self.inner
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Stops the file poller of [`Identity::spawn_reloader`] when dropped.
#[derive(Debug)]
pub struct Reloader {
    handle: tokio::task::JoinHandle<()>,
}

impl Drop for Reloader {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Which server identity a client accepts.
#[derive(Clone)]
pub enum ExpectedPeer {
    /// Exactly this identity.
    Exact(SpiffeId),
    /// This service, in the client's own system and environment.
    Service(String),
    /// Any identity in the client's own system and environment (e.g. the
    /// runtime's health checks, which reach every service).
    AnyService,
    /// Whatever the predicate accepts (still only in the client's own
    /// system and environment).
    Matching {
        /// Says what is expected, for error messages.
        description: String,
        /// Decides.
        predicate: Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>,
    },
}

impl ExpectedPeer {
    /// Exactly `id`.
    pub fn exact(id: SpiffeId) -> Self {
        ExpectedPeer::Exact(id)
    }

    /// The service `name` in the client's own system and environment.
    pub fn service(name: &str) -> Self {
        ExpectedPeer::Service(name.to_string())
    }

    /// A predicate over the peer's identity.
    pub fn matching(
        description: impl Into<String>,
        predicate: impl Fn(&SpiffeId) -> bool + Send + Sync + 'static,
    ) -> Self {
        ExpectedPeer::Matching {
            description: description.into(),
            predicate: Arc::new(predicate),
        }
    }

    fn accepts(&self, peer: &SpiffeId) -> bool {
        match self {
            ExpectedPeer::Exact(id) => id == peer,
            ExpectedPeer::Service(name) => peer.service() == name,
            ExpectedPeer::AnyService => true,
            ExpectedPeer::Matching { predicate, .. } => predicate(peer),
        }
    }

    fn describe(&self, ours: &SpiffeId) -> String {
        match self {
            ExpectedPeer::Exact(id) => id.to_string(),
            ExpectedPeer::Service(name) => match ours.sibling(name) {
                Ok(id) => id.to_string(),
                Err(_) => format!("service `{name}`"),
            },
            ExpectedPeer::AnyService => format!("a service of {}", ours.trust_domain()),
            ExpectedPeer::Matching { description, .. } => description.clone(),
        }
    }
}

impl fmt::Debug for ExpectedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedPeer::Exact(id) => write!(f, "Exact({id})"),
            ExpectedPeer::Service(name) => write!(f, "Service({name})"),
            ExpectedPeer::AnyService => f.write_str("AnyService"),
            ExpectedPeer::Matching { description, .. } => write!(f, "Matching({description})"),
        }
    }
}

fn reject(error: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

/// The peer's SPIFFE id, and that it is in our system and environment.
fn check_peer(ours: &SpiffeId, end_entity: &CertificateDer<'_>) -> Result<SpiffeId, rustls::Error> {
    let peer = SpiffeId::from_cert_der(end_entity)
        .map_err(|source| reject(TlsError::PeerIdentity { source }))?;
    if !ours.same_namespace(&peer) {
        return Err(reject(TlsError::ForeignPeer {
            peer,
            ours: ours.clone(),
        }));
    }
    Ok(peer)
}

/// Serves the current certificate, on both sides.
#[derive(Debug)]
struct CurrentCert {
    identity: Identity,
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.identity.current().certified.clone())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.identity.current().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Server side: verifies client chains against the current bundle.
#[derive(Debug)]
struct ClientVerifier {
    identity: Identity,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The bundle can change under us and this returns a borrow; an
        // empty list means "send whatever certificate you have", which is
        // what every Flotilla client does anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let loaded = self.identity.current();
        loaded
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        check_peer(&loaded.id, end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self
                .identity
                .inner
                .provider
                .signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self
                .identity
                .inner
                .provider
                .signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.identity
            .inner
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Client side: verifies the server chain against the current bundle and
/// its SPIFFE id against what the caller expects; the server name is not
/// used (identities are SPIFFE ids, not DNS names).
#[derive(Debug)]
struct ServerVerifier {
    identity: Identity,
    expected: ExpectedPeer,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let loaded = self.identity.current();
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &loaded.roots,
            intermediates,
            now,
            self.identity
                .inner
                .provider
                .signature_verification_algorithms
                .all,
        )?;
        let peer = check_peer(&loaded.id, end_entity)?;
        if !self.expected.accepts(&peer) {
            return Err(reject(TlsError::UnexpectedPeer {
                expected: self.expected.describe(&loaded.id),
                peer,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self
                .identity
                .inner
                .provider
                .signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self
                .identity
                .inner
                .provider
                .signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.identity
            .inner
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A server config for `identity`: TLS 1.3 only, a client certificate is
/// required and must chain to the trust bundle and name a peer in the same
/// system and environment. Read the caller with [`peer_identity`] after
/// the handshake and apply the ACL to it. No ALPN is set; for HTTP/2 clone
/// the config and set `alpn_protocols`.
///
/// Session resumption is off: a resumed session skips certificate
/// verification, so it would let a client keep using a certificate that
/// has since expired or whose root was retired. Connections are pooled
/// and reused, so full handshakes are rare anyway.
pub fn server_config(identity: &Identity) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(identity.inner.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config { source })?
        .with_client_cert_verifier(Arc::new(ClientVerifier {
            identity: identity.clone(),
        }))
        .with_cert_resolver(Arc::new(CurrentCert {
            identity: identity.clone(),
        }));
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A client config for `identity`: TLS 1.3 only, presents its own
/// certificate, and accepts a server only if its chain is trusted and its
/// SPIFFE id is `expected` (in the same system and environment). Any
/// server name may be used to connect; it is not checked.
pub fn client_config(
    identity: &Identity,
    expected: ExpectedPeer,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(identity.inner.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config { source })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier {
            identity: identity.clone(),
            expected,
        }))
        .with_client_cert_resolver(Arc::new(CurrentCert {
            identity: identity.clone(),
        }));
    // Servers never resume (see `server_config`); do not cache tickets.
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The verified SPIFFE id of the peer of an established connection
/// (`&ServerConnection` or `&ClientConnection` both work).
pub fn peer_identity(conn: &CommonState) -> Result<SpiffeId, TlsError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    SpiffeId::from_cert_der(leaf).map_err(|source| TlsError::PeerIdentity { source })
}

/// Accepts a TLS connection, giving up after `timeout` so a peer that
/// connects and stalls cannot hold the slot; dropping the stream on error
/// closes the socket. Returns the stream and the caller's identity.
pub async fn accept_with_timeout<IO>(
    acceptor: &TlsAcceptor,
    stream: IO,
    timeout: Duration,
) -> Result<(server::TlsStream<IO>, SpiffeId), TlsError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let tls = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Err(_) => return Err(TlsError::HandshakeTimeout { after: timeout }),
        Ok(Err(source)) => return Err(handshake_error(source)),
        Ok(Ok(tls)) => tls,
    };
    let peer = peer_identity(tls.get_ref().1)?;
    Ok((tls, peer))
}

/// Turns a failed handshake into our own error when it was our verifier
/// that refused the peer (rustls would only print its debug form), else
/// keeps rustls's error as the source.
fn handshake_error(source: io::Error) -> TlsError {
    let ours = source
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .and_then(|e| match e {
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
                other.0.downcast_ref::<TlsError>()
            }
            _ => None,
        });
    match ours {
        Some(TlsError::PeerIdentity { source }) => TlsError::PeerIdentity {
            source: source.clone(),
        },
        Some(TlsError::ForeignPeer { peer, ours }) => TlsError::ForeignPeer {
            peer: peer.clone(),
            ours: ours.clone(),
        },
        Some(TlsError::UnexpectedPeer { expected, peer }) => TlsError::UnexpectedPeer {
            expected: expected.clone(),
            peer: peer.clone(),
        },
        _ => TlsError::Handshake { source },
    }
}

/// Connects over TLS with a deadline. In TLS 1.3 the client finishes
/// before the server has checked the client's certificate, so a server's
/// refusal of this client shows up on the first read, not here.
pub async fn connect_with_timeout<IO>(
    connector: &TlsConnector,
    server_name: ServerName<'static>,
    stream: IO,
    timeout: Duration,
) -> Result<(client::TlsStream<IO>, SpiffeId), TlsError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let tls = match tokio::time::timeout(timeout, connector.connect(server_name, stream)).await {
        Err(_) => return Err(TlsError::HandshakeTimeout { after: timeout }),
        Ok(Err(source)) => return Err(handshake_error(source)),
        Ok(Ok(tls)) => tls,
    };
    let peer = peer_identity(tls.get_ref().1)?;
    Ok((tls, peer))
}

/// An error and its sources on one line, for logs.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        // rustls wraps our own errors; skip a level that repeats the last.
        if !text.ends_with(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}
