//! Mutual TLS and the ACL inside a Rust service.
//!
//! When the runtime gives the instance an identity (`FLOTILLA_TLS_*`) and an
//! ACL (`FLOTILLA_ACL_FILE`), [`crate::Service::serve`] accepts only TLS 1.3
//! connections that present a certificate of the same system, and every
//! request then passes [`authorize`] before routing:
//!
//! 1. the caller's verified SPIFFE id is checked against the ACL on the
//!    normalised path; a denial is answered `403 acl_denied` (counted in
//!    `flotilla_authz_denied_total{caller,callee}` and logged with both
//!    identities), in audit mode it is logged and let through;
//! 2. the request's path becomes the normalised one, so the router serves
//!    exactly what was checked;
//! 3. `x-flotilla-user-*` headers are removed unless the caller is the
//!    gateway;
//! 4. the caller lands in the request's extensions as [`Caller`].
//!
//! Handshakes run in their own tasks with a deadline
//! ([`Service::with_handshake_timeout`](crate::Service::with_handshake_timeout)),
//! so a peer that connects and stalls costs a slot only until then. The
//! identity files are polled every second and reloaded when the runtime
//! renews them; connections already open are untouched.
//!
//! Without `FLOTILLA_TLS_*` (unit tests, running a binary by hand) the same
//! listener and middleware serve plain HTTP and check nothing.

use std::fmt;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use flotilla_mesh::identity::GATEWAY;
use flotilla_mesh::{Identity, IdentityFiles, Policy, PolicySpec, SpiffeId};
use http::StatusCode;
use http::uri::PathAndQuery;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::Error;
use crate::tls::TlsFiles;

/// How long a peer has to finish the TLS handshake, unless the service
/// sets another deadline.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the identity files are checked for a renewed certificate.
const RELOAD_EVERY: Duration = Duration::from_secs(1);
/// Handshakes in progress at once. Past this, accepting waits (the kernel's
/// backlog holds new connections), so a flood of stalled peers costs at
/// most this many tasks and sockets until their deadlines free them.
const MAX_HANDSHAKES: usize = 256;
/// Finished handshakes waiting for the HTTP server to take them. The
/// server takes them as fast as it can spawn a task; the bound only stops
/// the acceptor from running ahead of it.
const ACCEPTED_QUEUE: usize = 64;

/// The verified identity of whoever sent a request, in the request's
/// extensions when the service serves mutual TLS:
/// `Option<Extension<Caller>>` in a handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub SpiffeId);

/// This instance's identity and ACL.
pub(crate) struct Mesh {
    pub(crate) identity: Identity,
    policy: Policy,
    /// The only caller whose `x-flotilla-user-*` headers are believed.
    gateway: SpiffeId,
}

impl fmt::Debug for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mesh")
            .field("identity", &self.identity)
            .field("mode", &self.policy.mode())
            .finish_non_exhaustive()
    }
}

impl Mesh {
    /// Loads the identity files and the ACL, checking that the ACL is the
    /// one of this instance's own service.
    pub(crate) fn load(files: &TlsFiles, acl: &Path) -> Result<Mesh, Error> {
        // Loading sets flotilla_cert_expiry_timestamp_seconds: the recorder
        // must exist first, or the gauge is lost until the next renewal.
        crate::metrics::prometheus_handle();
        let identity = Identity::load(IdentityFiles {
            cert: files.cert.clone(),
            key: files.key.clone(),
            ca: files.ca.clone(),
        })
        .map_err(|source| Error::Identity { source })?;
        let acl_error =
            |problem: String, source: Option<Box<dyn std::error::Error + Send + Sync>>| {
                Error::Acl {
                    path: acl.to_path_buf(),
                    problem,
                    source,
                }
            };
        let text = std::fs::read(acl)
            .map_err(|e| acl_error("cannot be read".into(), Some(Box::new(e))))?;
        let spec: PolicySpec = serde_json::from_slice(&text)
            .map_err(|e| acl_error("is not an ACL the runtime wrote".into(), Some(Box::new(e))))?;
        let policy = Policy::from_spec(&spec)
            .map_err(|e| acl_error("is not a valid ACL".into(), Some(Box::new(e))))?;
        let id = identity.id();
        if *policy.callee() != id {
            return Err(acl_error(
                format!(
                    "protects {}, but this instance's certificate is {id}",
                    policy.callee()
                ),
                None,
            ));
        }
        let gateway = match spec.gateway {
            Some(g) => g.identity,
            None => id
                .sibling(GATEWAY)
                .map_err(|e| acl_error("names no gateway".into(), Some(Box::new(e))))?,
        };
        Ok(Mesh {
            identity,
            policy,
            gateway,
        })
    }
}

/// What the listener knows about a connection: where it came from and, over
/// mutual TLS, who.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    id: Option<SpiffeId>,
}

impl Connected<IncomingStream<'_, MeshListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, MeshListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// Checks every request against the ACL (see the module docs); passes
/// everything through when the service serves plain HTTP.
pub(crate) async fn authorize(
    State(mesh): State<Option<Arc<Mesh>>>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(mesh) = mesh else {
        return next.run(request).await;
    };
    let caller = request
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .and_then(|info| info.0.id.clone());
    let Some(caller) = caller else {
        // Every connection of an mTLS listener has a verified peer; a
        // request without one means the server was assembled wrongly.
        tracing::error!("a request arrived without a verified peer on an mTLS server; refused");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let raw = request
        .uri()
        .path_and_query()
        .map_or("/", PathAndQuery::as_str);
    let decision = match mesh.policy.check(&caller, request.method(), raw) {
        Ok(decision) => decision,
        Err(denied) => return denied.to_response().into_response(),
    };
    if let Some(path) = &decision.path
        && path != request.uri().path()
    {
        let target = match request.uri().query() {
            Some(query) => format!("{path}?{query}"),
            None => path.clone(),
        };
        let mut parts = request.uri().clone().into_parts();
        match PathAndQuery::try_from(target) {
            Ok(pq) => parts.path_and_query = Some(pq),
            Err(_) => return StatusCode::BAD_REQUEST.into_response(),
        }
        match http::Uri::from_parts(parts) {
            Ok(uri) => *request.uri_mut() = uri,
            Err(_) => return StatusCode::BAD_REQUEST.into_response(),
        }
    }
    flotilla_mesh::strip_untrusted_user_headers(
        request.headers_mut(),
        Some(&caller),
        &mesh.gateway,
    );
    request.extensions_mut().insert(Caller(caller));
    next.run(request).await
}

/// The chassis' listener: plain TCP, or mutual TLS with handshakes done
/// off the accept path.
pub(crate) enum MeshListener {
    Plain(TcpListener),
    Tls(TlsListener),
}

pub(crate) struct TlsListener {
    accepted: mpsc::Receiver<(Io, Peer)>,
    acceptor: JoinHandle<()>,
    _reloader: flotilla_mesh::tls::Reloader,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        // Closes the socket: a draining instance takes no new connections.
        self.acceptor.abort();
    }
}

impl MeshListener {
    /// Wraps `listener`: mutual TLS with `mesh`'s identity, or plain.
    pub(crate) fn new(
        listener: TcpListener,
        mesh: Option<&Mesh>,
        handshake_timeout: Duration,
    ) -> Result<MeshListener, Error> {
        let Some(mesh) = mesh else {
            return Ok(MeshListener::Plain(listener));
        };
        let config = flotilla_mesh::server_config(&mesh.identity)
            .map_err(|source| Error::Identity { source })?;
        let reloader = mesh.identity.spawn_reloader(RELOAD_EVERY);
        let (tx, accepted) = mpsc::channel(ACCEPTED_QUEUE);
        let acceptor = tokio::spawn(accept_loop(
            listener,
            TlsAcceptor::from(config),
            tx,
            handshake_timeout,
        ));
        Ok(MeshListener::Tls(TlsListener {
            accepted,
            acceptor,
            _reloader: reloader,
        }))
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    accepted: mpsc::Sender<(Io, Peer)>,
    timeout: Duration,
) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (tcp, remote) = tokio::select! {
            conn = listener.accept() => match conn {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = accepted.closed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, accepted) = (acceptor.clone(), accepted.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match flotilla_mesh::accept_with_timeout(&acceptor, tcp, timeout).await {
                Ok((tls, id)) => {
                    let peer = Peer { id: Some(id) };
                    let _ = accepted.send((Io::Tls(Box::new(tls)), peer)).await;
                }
                Err(e) => tracing::warn!(
                    %remote,
                    error = %flotilla_mesh::tls::error_chain(&e),
                    "refused a connection"
                ),
            }
        });
    }
}

impl Listener for MeshListener {
    type Io = Io;
    type Addr = Peer;

    async fn accept(&mut self) -> (Io, Peer) {
        match self {
            MeshListener::Plain(listener) => loop {
                match TcpListener::accept(listener).await {
                    Ok((tcp, _)) => {
                        let _ = tcp.set_nodelay(true);
                        return (Io::Plain(tcp), Peer { id: None });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            },
            MeshListener::Tls(tls) => match tls.accepted.recv().await {
                Some(conn) => conn,
                // The acceptor only stops when this listener is dropped.
                None => std::future::pending().await,
            },
        }
    }

    fn local_addr(&self) -> io::Result<Peer> {
        match self {
            MeshListener::Plain(listener) => listener.local_addr().map(|_| Peer { id: None }),
            // The socket is the acceptor task's; the server never asks.
            MeshListener::Tls(_) => Ok(Peer { id: None }),
        }
    }
}

/// One accepted connection.
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}
