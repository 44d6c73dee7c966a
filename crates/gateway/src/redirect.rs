//! The plain-HTTP listener beside an HTTPS gateway
//! (`TlsConfig::http_redirect`): every request is answered `308 Permanent
//! Redirect` to the same path and query over HTTPS, at the host the client
//! named and the gateway's HTTPS port, as `return 308 https://$host$request_uri`
//! would in nginx. 308 rather than 301: a client repeats the method and
//! body, so a `POST` is not turned into a `GET`. Nothing is proxied from
//! here; a request without a usable `Host` gets 400.
//!
//! hyper's HTTP/1 server serves it: one short answer per request, where
//! the gateway's own driver (`h1`) would bring the whole request path.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, LOCATION, SERVER};
use http::uri::Authority;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

use crate::config::Limits;
use crate::conn_limit::Admission;

/// Serves redirects on `listener` to the HTTPS port `https_port` until
/// the handle is dropped (which closes its connections too). A connection
/// over the gateway's connection limits is closed as soon as it is
/// accepted, as on the HTTPS port.
pub(crate) fn spawn(
    listener: TcpListener,
    https_port: u16,
    limits: &Limits,
    admission: Admission,
) -> AbortOnDropHandle<()> {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    let builder = Arc::new(builder);
    let header_timeout = limits.header_read_timeout;
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(accepted) => accepted,
                        // Out of file descriptors, say: pause, do not spin.
                        Err(e) => {
                            crate::server::accept_failed(e).await;
                            continue;
                        }
                    };
                    // Dropped (closed) at once when over a limit.
                    let Ok(slot) = admission.admit(peer) else {
                        continue;
                    };
                    let builder = Arc::clone(&builder);
                    let routing = Arc::clone(&admission.routing);
                    let limits = Arc::clone(&admission.limits);
                    connections.spawn(async move {
                        let mut stream = stream;
                        // A balancer in front sends its PROXY header here
                        // too; the redirect needs no client address.
                        let client = crate::proxy_protocol::client_of(
                            &mut stream,
                            peer,
                            &routing,
                            &limits,
                            header_timeout,
                        );
                        let Some(client) = client.await else {
                            return;
                        };
                        let _counted = client.counted;
                        let service = hyper::service::service_fn(move |req| async move {
                            Ok::<_, Infallible>(answer(&req, https_port))
                        });
                        let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                        drop(slot);
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    });
    AbortOnDropHandle::new(task)
}

/// The redirect for `req`, or 400 without a `Host` to send it to.
fn answer(req: &Request<Incoming>, https_port: u16) -> Response<Full<Bytes>> {
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<Authority>().ok())
        .or_else(|| req.uri().authority().cloned());
    let location = host.and_then(|authority| {
        let port = if https_port == 443 {
            String::new()
        } else {
            format!(":{https_port}")
        };
        let path = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        HeaderValue::try_from(format!("https://{}{port}{path}", authority.host())).ok()
    });
    let mut res = match location {
        Some(location) => {
            let mut res = Response::new(Full::new(Bytes::new()));
            *res.status_mut() = StatusCode::PERMANENT_REDIRECT;
            res.headers_mut().insert(LOCATION, location);
            res.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
            res
        }
        None => {
            let body = Bytes::from_static(
                br#"{"error":{"code":"bad_request","message":"this port redirects to HTTPS and needs a Host header to say where","request_id":""}}"#,
            );
            let mut res = Response::new(Full::new(body));
            *res.status_mut() = StatusCode::BAD_REQUEST;
            res.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            res
        }
    };
    res.headers_mut()
        .insert(SERVER, HeaderValue::from_static("flotilla"));
    res
}
