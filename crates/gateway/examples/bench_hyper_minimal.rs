//! The floor for `benches/gateway`: the smallest reverse proxy hyper 1.x
//! makes (server connection + pooled legacy client, no layers, no checks),
//! so the figures can tell hyper's own cost from the gateway's.
//!
//! Usage: `bench_hyper_minimal LISTEN UPSTREAM [THREADS] [--per-core]`
//!
//! `--per-core` runs one current-thread runtime per thread, each with its
//! own `SO_REUSEPORT` listener and client pool (thread-per-core), instead of
//! one multi-thread runtime.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, hyper::Error>;

#[global_allocator]
static GLOBAL: flotilla_alloc::Allocator = flotilla_alloc::Allocator;

async fn serve(listen: SocketAddr, upstream: SocketAddr, reuse_port: bool) -> Result<(), BoxError> {
    let client: Client<_, Incoming> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http();
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(reuse_port)?;
    socket.bind(listen)?;
    let listener = socket.listen(1024)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                let client = client.clone();
                async move {
                    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                    let uri = format!("http://{upstream}{path}").parse();
                    let response: hyper::Response<Body> = match uri {
                        Ok(uri) => {
                            *req.uri_mut() = uri;
                            match client.request(req).await {
                                Ok(r) => r.map(|b| b.boxed_unsync()),
                                Err(_) => bad_gateway(),
                            }
                        }
                        Err(_) => bad_gateway(),
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn bad_gateway() -> hyper::Response<Body> {
    let mut r = hyper::Response::new(
        Full::new(Bytes::from_static(b"bad gateway"))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = hyper::StatusCode::BAD_GATEWAY;
    r
}

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: bench_hyper_minimal LISTEN UPSTREAM [THREADS] [--per-core]";
    let listen: SocketAddr = args.first().ok_or(usage)?.parse()?;
    let upstream: SocketAddr = args.get(1).ok_or(usage)?.parse()?;
    let threads: usize = match args.get(2) {
        Some(t) if t != "--per-core" => t.parse()?,
        _ => 2,
    };
    if args.iter().any(|a| a == "--per-core") {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|_| {
                std::thread::spawn(move || -> Result<(), String> {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())?;
                    runtime
                        .block_on(serve(listen, upstream, true))
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| "a thread panicked")??;
        }
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?
        .block_on(serve(listen, upstream, false))
}
