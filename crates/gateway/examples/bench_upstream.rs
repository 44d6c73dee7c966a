//! A trivial HTTP/1.1 upstream for `benches/gateway/run.sh`: answers every
//! request with `200 ok`, except a policy check (`/check/…`, for
//! `authz.sh`), which gets an empty `200`, or `403` for `/check/deny…`.
//! One thread, so that it costs every proxy under test the same.
//!
//! Usage: `bench_upstream 127.0.0.1:PORT [--tls DIR]`
//!
//! With `--tls DIR` it serves mutual TLS 1.3 only, with the identity in
//! `DIR` (`tls.crt`, `tls.key`, `ca.crt`, as `bench_gateway --issue` writes
//! them): what an instance behind `flotilla up` does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use flotilla_mesh::{Identity, IdentityFiles};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

async fn serve<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: IO) {
    let json = page();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        // `/json`: a page of JSON, as an API's list answers (for gzip);
        // anything else: three bytes of text.
        let (body, media) = if req.uri().path() == "/json" {
            (json.clone(), "application/json")
        } else {
            (Bytes::from_static(b"ok\n"), "text/plain")
        };
        // A policy check (`/check/…`) is answered with no body, as an
        // authorization service answers one: nginx's `auth_request` keeps
        // its connection to the upstream only then (it does not read a
        // check's body, so it closes the connection to skip one).
        let path = req.uri().path();
        let (body, denied) = if path.starts_with("/check/") {
            (Bytes::new(), path.starts_with("/check/deny"))
        } else {
            (body, false)
        };
        async move {
            let mut res = Response::new(Full::new(body));
            if denied {
                *res.status_mut() = http::StatusCode::FORBIDDEN;
            }
            res.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(media),
            );
            Ok::<_, Infallible>(res)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .await;
}

/// About 2.4 kB of JSON: twelve reviews of a product, as the shop's
/// reviews service lists them.
fn page() -> Bytes {
    let reviews: Vec<String> = (1..=12)
        .map(|i| {
            format!(
                "{{\"id\":{i},\"author\":\"customer-{i}@example.com\",\"rating\":{},\"text\":\"Arrived quickly and works as described; would buy again.\",\"created_at\":\"2026-11-{:02}T10:00:00Z\"}}",
                1 + i % 5,
                i
            )
        })
        .collect();
    Bytes::from(format!(
        "{{\"product_id\":\"sku-kettle\",\"count\":12,\"average_rating\":3.5,\"reviews\":[{}]}}",
        reviews.join(",")
    ))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .ok_or("usage: bench_upstream ADDR [--tls DIR]")?
        .parse()?;
    let tls = match (args.next().as_deref(), args.next()) {
        (Some("--tls"), Some(dir)) => {
            let identity = Identity::load(IdentityFiles::in_dir(std::path::Path::new(&dir)))?;
            Some(tokio_rustls::TlsAcceptor::from(
                flotilla_mesh::server_config(&identity)?,
            ))
        }
        (None, _) => None,
        _ => return Err("usage: bench_upstream ADDR [--tls DIR]".into()),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("listening: {}", listener.local_addr()?);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => serve(stream).await,
                    Some(acceptor) => {
                        if let Ok((stream, _peer)) = flotilla_mesh::accept_with_timeout(
                            &acceptor,
                            stream,
                            Duration::from_secs(10),
                        )
                        .await
                        {
                            serve(stream).await;
                        }
                    }
                }
            });
        }
    })
}
