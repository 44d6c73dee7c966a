//! How the gateway reaches instances: the connector (TCP, then mutual TLS
//! as the service it is meant for when the gateway has an identity,
//! [`UpstreamTls`]), used by the proxy's own HTTP/1.1 client (`outbound`)
//! and by hyper's pooled client for the gateway's own fetches (the JWKS).
//!
//! How to reach an instance is decided here and only here, so the rest of
//! the gateway builds requests the same way with or without TLS.
//!
//! # Which service an address belongs to
//!
//! An instance's address says nothing about who listens there: ports are
//! reused, and a stale address could lead to another service's instance.
//! So the URI of an upstream request names the service it is meant for, as
//! its user-info: `http://catalog@127.0.0.1:40123/api/...`
//! ([`service_uri`]). The connector reads it and makes the TLS handshake
//! accept only a certificate of that service (`ExpectedPeer::service`): a
//! request for `catalog` can never be written to a connection whose peer
//! is not `…/svc/catalog`. The user-info is also part of hyper's pool key
//! (scheme and authority), so a connection verified for one service is
//! never reused for a request to another at the same address. hyper sends
//! only the path on the wire and takes `Host` from the client's request, so
//! the user-info never leaves the gateway. The proxy's own client is given
//! the service and the address as they are ([`Connector::open`]) and pools
//! connections by both, to the same effect.
//!
//! Without [`UpstreamTls`] (tests, or a gateway in front of plain HTTP
//! instances) the connector is plain TCP and the user-info is ignored, as
//! it is for URIs that name no service (a JWKS URL).
//!
//! # Servers outside the system
//!
//! An identity provider's JWKS (Auth0, Okta, Keycloak, Google) is served
//! over HTTPS with a certificate from the web's CAs, not the mesh's: an
//! `https://` URI is opened by [`web_fetch_client`]'s connector only, with
//! TLS checking the URI's host name against the machine's trusted roots
//! (or the CA file `jwt.jwks_ca` names), never with the gateway's mesh
//! identity. The other connectors refuse `https://` URIs.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use flotilla_mesh::tls::{self as mesh_tls, Reloader, TlsError};
use flotilla_mesh::{ExpectedPeer, Identity, IdentityFiles};
use futures_util::future::BoxFuture;
use http::Uri;
use http::uri::{Authority, PathAndQuery, Scheme};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::body::Body;
use crate::config::Limits;

/// hyper's pooled client, for the gateway's own fetches (the JWKS).
pub(crate) type FetchClient = Client<Connector, Body>;

/// Idle pooled connections kept per instance. Enough for bursts to reuse
/// connections: clients that send in step (a few hundred at once) would
/// otherwise open connections for each burst and close all but the kept
/// ones after it, churning through ephemeral ports and TIME_WAIT sockets
/// (64 did, in benches/gateway's paced run); bounded so a spike does not
/// leave thousands of idle sockets (and file descriptors) behind for the
/// idle timeout.
pub(crate) const MAX_IDLE_PER_INSTANCE: usize = 512;

/// How long an idle pooled connection is kept.
pub(crate) const POOL_IDLE: Duration = Duration::from_secs(30);

/// How often the identity files are checked for a renewed certificate.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// The gateway's own identity, for mutual TLS to instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// The gateway's certificate chain, key and trust bundle (the runtime
    /// writes them into `<data-dir>/run/gateway/` and rewrites them when it
    /// renews the certificate; the gateway reloads them by itself). Their
    /// SPIFFE id should be the `gateway` service's: instances accept
    /// `x-flotilla-user-*` headers only from it.
    pub identity: IdentityFiles,
}

impl UpstreamTls {
    /// The identity files in `dir` (`tls.crt`, `tls.key`, `ca.crt`).
    pub fn in_dir(dir: &std::path::Path) -> Self {
        UpstreamTls {
            identity: IdentityFiles::in_dir(dir),
        }
    }
}

/// Opens connections to instances, with the gateway's identity if it has
/// one (its certificate is reloaded in the background when renewed).
pub(crate) fn connector(limits: &Limits, tls: Option<&UpstreamTls>) -> Result<Connector, TlsError> {
    let tcp = tcp_connector(limits);
    let mtls = match tls {
        None => None,
        Some(tls) => {
            let identity = Identity::load(tls.identity.clone())?;
            let reloader = identity.spawn_reloader(RELOAD_EVERY);
            Some(Arc::new(Mtls {
                identity,
                connectors: RwLock::new(HashMap::new()),
                _reloader: reloader,
            }))
        }
    };
    Ok(Connector {
        tcp,
        mtls,
        web: None,
        handshake_timeout: limits.connect_timeout,
    })
}

/// TCP with no delay, within the connect timeout.
fn tcp_connector(limits: &Limits) -> HttpConnector {
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(limits.connect_timeout));
    tcp
}

/// Why the roots an `https://` JWKS server's certificate is checked
/// against cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum WebTrustError {
    #[error("cannot read jwt.jwks_ca {}; check the path", path.display())]
    ReadCa {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "jwt.jwks_ca {} holds no usable CA certificate ({reason}); give the PEM file of the CA that signed the JWKS server's certificate",
        path.display()
    )]
    BadCa { path: PathBuf, reason: String },
    #[error(
        "this machine has no trusted root certificates to check the JWKS server's with; install its CA bundle (Debian: ca-certificates), or set jwt.jwks_ca to the server's CA"
    )]
    NoSystemRoots,
    #[error("TLS 1.2 and 1.3 with the ring provider")]
    Tls(#[source] tokio_rustls::rustls::Error),
}

/// The roots in the PEM file `ca`, or the machine's trusted roots (as
/// OpenSSL finds them: `SSL_CERT_FILE`, `SSL_CERT_DIR`, the system bundle).
pub(crate) fn web_roots(ca: Option<&Path>) -> Result<RootCertStore, WebTrustError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| WebTrustError::ReadCa {
                path: path.to_path_buf(),
                source,
            })?;
            let bad = |reason: String| WebTrustError::BadCa {
                path: path.to_path_buf(),
                reason,
            };
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| bad(e.to_string()))?;
                roots.add(cert).map_err(|e| bad(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(bad("no `-----BEGIN CERTIFICATE-----` in it".into()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::debug!(target: "flotilla::gateway", error = %e, "a trusted root could not be read");
            }
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            if ignored > 0 {
                tracing::debug!(target: "flotilla::gateway", added, ignored, "trusted roots rustls cannot use were left out");
            }
            if roots.is_empty() {
                return Err(WebTrustError::NoSystemRoots);
            }
        }
    }
    Ok(roots)
}

/// hyper's pooled client for `https://` servers outside the system (an
/// identity provider's JWKS): their certificate must chain to `roots` and
/// name the URI's host. Plain `http://` URIs are opened as plain TCP.
pub(crate) fn web_fetch_client(
    roots: RootCertStore,
    limits: &Limits,
) -> Result<FetchClient, WebTrustError> {
    let mut config = ClientConfig::builder_with_provider(mesh_tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(WebTrustError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // hyper's pooled client speaks HTTP/1.1 here.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut tcp = tcp_connector(limits);
    // `https://` URIs reach `call`, which wraps them in TLS.
    tcp.enforce_http(false);
    Ok(fetch_client(Connector {
        tcp,
        mtls: None,
        web: Some(TlsConnector::from(Arc::new(config))),
        handshake_timeout: limits.connect_timeout,
    }))
}

/// hyper's pooled client over `connector`: for the gateway's own fetches
/// (the JWKS), which may name a host rather than an instance. Proxied
/// requests go through `outbound` instead.
pub(crate) fn fetch_client(connector: Connector) -> FetchClient {
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(MAX_IDLE_PER_INSTANCE)
        .build(connector)
}

/// The URI of `path_and_query` on the instance at `addr` of `service`: the
/// connector will accept only that service's certificate.
pub(crate) fn service_uri(
    service: &str,
    addr: SocketAddr,
    path_and_query: Option<&PathAndQuery>,
) -> Result<Uri, http::Error> {
    let authority = Authority::try_from(format!("{service}@{addr}"))?;
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority)
        // A clone shares the bytes; no second parse of the path.
        .path_and_query(
            path_and_query
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        )
        .build()
}

/// The service a URI names, if any.
fn named_service(uri: &Uri) -> Option<&str> {
    uri.authority()?
        .as_str()
        .split_once('@')
        .map(|(service, _)| service)
        .filter(|s| !s.is_empty())
}

/// Opens connections to instances: TCP, then mutual TLS as the service the
/// URI names when the gateway has an identity.
#[derive(Clone)]
pub(crate) struct Connector {
    tcp: HttpConnector,
    mtls: Option<Arc<Mtls>>,
    /// TLS to servers outside the system, for `https://` URIs
    /// ([`web_fetch_client`]); `None` refuses them.
    web: Option<TlsConnector>,
    handshake_timeout: Duration,
}

struct Mtls {
    identity: Identity,
    /// One TLS client per upstream service, each accepting only that
    /// service's certificate. The keys are service names from the routes
    /// (and the JWKS source), never from client input, so the map is
    /// bounded by the configuration.
    connectors: RwLock<HashMap<String, TlsConnector>>,
    _reloader: Reloader,
}

impl Mtls {
    fn connector(&self, service: &str) -> Result<TlsConnector, TlsError> {
        if let Some(c) = self
            .connectors
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
        {
            return Ok(c.clone());
        }
        let config = mesh_tls::client_config(&self.identity, ExpectedPeer::service(service))?;
        let connector = TlsConnector::from(config);
        self.connectors
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(service.to_string(), connector.clone());
        Ok(connector)
    }
}

pub(crate) type ConnectError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = ConnectError;
    type Future = BoxFuture<'static, Result<UpstreamIo, ConnectError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        // One deadline for the TCP connect and the handshake, as in `open`.
        let deadline = tokio::time::Instant::now() + self.handshake_timeout;
        let left = move || deadline.saturating_duration_since(tokio::time::Instant::now());
        if dst.scheme() == Some(&Scheme::HTTPS) {
            let web = self.web.clone();
            let name = web_server_name(&dst);
            let connecting = self.tcp.call(dst);
            return Box::pin(async move {
                let web = web.ok_or("an https:// URI for a connector without web TLS")?;
                let name = name?;
                let tcp = connecting.await?.into_inner();
                let tls = tokio::time::timeout(left(), web.connect(name, tcp))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the TLS handshake took too long",
                        )
                    })??;
                Ok(UpstreamIo(TokioIo::new(Stream::Tls(Box::new(tls)))))
            });
        }
        let service = named_service(&dst).map(str::to_string);
        let connecting = self.tcp.call(dst);
        let mtls = self.mtls.clone();
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            let stream = secure(mtls.as_deref(), service.as_deref(), tcp, left()).await?;
            Ok(UpstreamIo(TokioIo::new(stream)))
        })
    }
}

/// The name an `https://` server's certificate must have: the URI's host
/// (an IP address without its brackets).
fn web_server_name(uri: &Uri) -> Result<ServerName<'static>, ConnectError> {
    let host = uri.host().ok_or("an https:// URI without a host")?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Ok(ServerName::try_from(host.to_string())?)
}

impl Connector {
    /// A connection to the instance of `service` at `addr`: TCP (with the
    /// connect timeout), then mutual TLS accepting only `service`'s
    /// certificate when the gateway has an identity. For the proxy's own
    /// HTTP/1.1 client (`outbound`), which needs tokio I/O rather than
    /// hyper's.
    pub(crate) async fn open(
        &self,
        service: &str,
        addr: SocketAddr,
    ) -> Result<Stream, ConnectError> {
        // One deadline for the TCP connect and the TLS handshake after it:
        // `connect_timeout` is how long opening a connection may take, not
        // each step of it.
        let deadline = tokio::time::Instant::now() + self.handshake_timeout;
        let tcp = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Err(_) => {
                return Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "connecting to {addr} took longer than {}",
                        humantime::format_duration(self.handshake_timeout)
                    ),
                )));
            }
            Ok(tcp) => tcp?,
        };
        tcp.set_nodelay(true)?;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        secure(self.mtls.as_deref(), Some(service), tcp, left).await
    }
}

/// `tcp`, wrapped in mutual TLS as `service` when there is an identity.
async fn secure(
    mtls: Option<&Mtls>,
    service: Option<&str>,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<Stream, ConnectError> {
    let (Some(mtls), Some(service)) = (mtls, service) else {
        return Ok(Stream::Plain(tcp));
    };
    let ip: IpAddr = tcp.peer_addr()?.ip();
    let connector = mtls.connector(service)?;
    let (stream, peer) =
        mesh_tls::connect_with_timeout(&connector, ServerName::from(ip), tcp, timeout).await?;
    tracing::trace!(target: "flotilla::gateway", %peer, "mutual TLS to an instance");
    Ok(Stream::Tls(Box::new(stream)))
}

/// A connection to an instance, as tokio I/O.
pub(crate) enum Stream {
    Plain(TcpStream),
    /// The handshake verified the peer as the service it was opened for.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Stream::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Stream::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(io) => Pin::new(io).poll_flush(cx),
            Stream::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Stream::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Stream::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(io) => io.is_write_vectored(),
            Stream::Tls(io) => io.is_write_vectored(),
        }
    }
}

/// A connection to an instance, as hyper's client wants it.
pub(crate) struct UpstreamIo(TokioIo<Stream>);

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_uri_names_its_service_and_keeps_the_rest() {
        let pq = PathAndQuery::from_static("/a/b?x=1&y=%20");
        let u = match service_uri(
            "catalog",
            SocketAddr::from(([127, 0, 0, 1], 4000)),
            Some(&pq),
        ) {
            Ok(u) => u,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(u.to_string(), "http://catalog@127.0.0.1:4000/a/b?x=1&y=%20");
        assert_eq!(named_service(&u), Some("catalog"));
        assert_eq!(u.host(), Some("127.0.0.1"));
        assert_eq!(u.port_u16(), Some(4000));
        let v6: SocketAddr = match "[::1]:9000".parse() {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        };
        match service_uri("orders", v6, None) {
            Ok(u) => assert_eq!(u.to_string(), "http://orders@[::1]:9000/"),
            Err(e) => panic!("{e}"),
        }
        let plain: Uri = match "http://127.0.0.1:9000/jwks".parse() {
            Ok(u) => u,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(named_service(&plain), None);
    }
}
