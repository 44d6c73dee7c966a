//! Shared test plumbing: scratch directories kept on failure, a CA and
//! identities in them, a line-based echo server over mTLS on 127.0.0.1:0,
//! and a client for it.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flotilla_mesh::tls::{TlsError, error_chain};
use flotilla_mesh::{
    Ca, CaConfig, ExpectedPeer, Identity, IdentityFiles, Leaf, SpiffeId, accept_with_timeout,
    client_config, connect_with_timeout, server_config,
};
use rustls::ClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector, client};

/// Generous: a loaded CI machine with two cores must not fail a test by
/// being slow; a hung test still ends.
pub const DEADLINE: Duration = Duration::from_secs(20);
pub const HOUR: Duration = Duration::from_secs(3600);

/// A temporary directory, kept (and its path printed) when the test fails.
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Scratch {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-mesh-")
            .tempdir()
            .unwrap();
        let path = dir.path().to_path_buf();
        Scratch {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn ca(&self, name: &str, system: &str) -> Ca {
        Ca::open(self.path.join(name), CaConfig::new(system)).unwrap()
    }

    /// Writes `leaf` into `<scratch>/<dir>/` and returns its files.
    pub fn install(&self, dir: &str, leaf: &Leaf) -> IdentityFiles {
        let files = IdentityFiles::in_dir(&self.path.join(dir));
        leaf.write(&files).unwrap();
        files
    }

    /// An hour-long identity for `service`, loaded.
    pub fn identity(&self, ca: &Ca, dir: &str, service: &str) -> Identity {
        let leaf = ca.issue_leaf(service, HOUR).unwrap();
        Identity::load(self.install(dir, &leaf)).unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("test state kept in {}", dir.keep().display());
        }
    }
}

pub fn id(service: &str) -> SpiffeId {
    SpiffeId::local("shop", service).unwrap()
}

pub fn ago(d: Duration) -> SystemTime {
    SystemTime::now() - d
}

pub fn from_now(d: Duration) -> SystemTime {
    SystemTime::now() + d
}

/// Answers one line per request line.
pub type Handler = Arc<dyn Fn(&SpiffeId, &str) -> String + Send + Sync>;

/// Answers `<caller's SPIFFE id> <line>`.
pub fn echo() -> Handler {
    Arc::new(|peer, line| format!("{peer} {line}"))
}

/// A line-based server over mTLS; accept-side errors are reported.
pub struct Server {
    pub addr: SocketAddr,
    errors: mpsc::Receiver<TlsError>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    pub async fn start(identity: &Identity, handshake_timeout: Duration, handler: Handler) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(server_config(identity).unwrap());
        // Tests look at a handful of errors; more are dropped, not queued.
        let (tx, errors) = mpsc::channel(64);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                let handler = handler.clone();
                tokio::spawn(async move {
                    let (tls, peer) =
                        match accept_with_timeout(&acceptor, tcp, handshake_timeout).await {
                            Ok(ok) => ok,
                            Err(e) => {
                                let _ = tx.try_send(e);
                                return;
                            }
                        };
                    let mut reader = BufReader::new(tls);
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match reader.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        let answer = handler(&peer, line.trim_end());
                        let stream = reader.get_mut();
                        if stream
                            .write_all(format!("{answer}\n").as_bytes())
                            .await
                            .is_err()
                            || stream.flush().await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        Server { addr, errors, task }
    }

    pub async fn echo(identity: &Identity) -> Self {
        Self::start(identity, Duration::from_secs(10), echo()).await
    }

    /// The next handshake error the server saw, as one line.
    pub async fn next_error(&mut self) -> String {
        match tokio::time::timeout(DEADLINE, self.errors.recv()).await {
            Ok(Some(e)) => error_chain(&e),
            _ => panic!("the server reported no handshake error"),
        }
    }
}

pub struct Client {
    reader: BufReader<client::TlsStream<TcpStream>>,
    pub server: SpiffeId,
}

impl Client {
    pub async fn connect(
        identity: &Identity,
        expected: ExpectedPeer,
        addr: SocketAddr,
    ) -> Result<Client, TlsError> {
        Self::connect_with(client_config(identity, expected)?, addr).await
    }

    pub async fn connect_with(
        config: Arc<ClientConfig>,
        addr: SocketAddr,
    ) -> Result<Client, TlsError> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| TlsError::Handshake { source })?;
        let (tls, server) = connect_with_timeout(
            &TlsConnector::from(config),
            ServerName::IpAddress(addr.ip().into()),
            tcp,
            DEADLINE,
        )
        .await?;
        Ok(Client {
            reader: BufReader::new(tls),
            server,
        })
    }

    /// Sends a line, returns the answer line.
    pub async fn request(&mut self, line: &str) -> io::Result<String> {
        let exchange = async {
            let stream = self.reader.get_mut();
            stream.write_all(format!("{line}\n").as_bytes()).await?;
            stream.flush().await?;
            let mut answer = String::new();
            if self.reader.read_line(&mut answer).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ));
            }
            Ok(answer.trim_end().to_string())
        };
        tokio::time::timeout(DEADLINE, exchange)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))?
    }
}

/// Connects as `identity`, sends one line, returns the answer; any failure
/// as a one-line message.
pub async fn call(
    identity: &Identity,
    expected: ExpectedPeer,
    addr: SocketAddr,
    line: &str,
) -> Result<String, String> {
    let mut client = Client::connect(identity, expected, addr)
        .await
        .map_err(|e| error_chain(&e))?;
    client.request(line).await.map_err(|e| e.to_string())
}

/// A verifier that accepts any server: for raw clients that test what the
/// *server* refuses (no client certificate, TLS 1.2).
#[derive(Debug)]
pub struct AcceptAnyServer;

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        flotilla_mesh::tls::crypto_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client config without a client certificate and with any protocol
/// versions given.
pub fn raw_client(versions: &[&'static rustls::SupportedProtocolVersion]) -> Arc<ClientConfig> {
    Arc::new(
        ClientConfig::builder_with_provider(flotilla_mesh::tls::crypto_provider())
            .with_protocol_versions(versions)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
            .with_no_client_auth(),
    )
}

/// Like [`raw_client`] (TLS 1.3, any server accepted) but presenting the
/// certificate in `files`.
pub fn raw_client_with_cert(files: &IdentityFiles) -> Arc<ClientConfig> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&files.key).unwrap();
    Arc::new(
        ClientConfig::builder_with_provider(flotilla_mesh::tls::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}
