//! A floor for `benches/gateway`: the gateway's transport design with
//! nothing else — one task per client connection that owns its upstream
//! connection, parses with httparse and forwards; no routing, no checks, no
//! headers beyond `x-forwarded-for`, Content-Length bodies only. The
//! gateway's own HTTP/1 driver (`src/h1.rs`) and upstream client
//! (`src/outbound.rs`) follow this design; the distance between this and
//! `gw-plain` is what the gateway's features cost per request.
//!
//! Usage: `bench_raw_h1 LISTEN UPSTREAM [THREADS] [--per-core]`
//!
//! `--per-core` runs one current-thread runtime per thread, each with its
//! own `SO_REUSEPORT` listener, instead of one multi-thread runtime.

use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[global_allocator]
static GLOBAL: flotilla_alloc::Allocator = flotilla_alloc::Allocator;

fn content_length(headers: &[httparse::Header<'_>]) -> usize {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
        .unwrap_or(0)
}

/// Copies `headers` into `out` as header lines, but `Connection` (each hop
/// has its own).
fn copy_headers(out: &mut Vec<u8>, headers: &[httparse::Header<'_>]) {
    for h in headers {
        if h.name.eq_ignore_ascii_case("connection") {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
}

async fn conn(
    mut client: TcpStream,
    peer: SocketAddr,
    upstream: SocketAddr,
) -> Result<(), BoxError> {
    let mut cbuf = BytesMut::with_capacity(8192);
    let mut ubuf = BytesMut::with_capacity(8192);
    let mut up: Option<TcpStream> = None;
    let mut out = Vec::with_capacity(1024);
    loop {
        // Request head.
        let (head_len, body_len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            if let httparse::Status::Complete(n) = req.parse(&cbuf)? {
                out.clear();
                out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
                out.push(b' ');
                out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
                out.extend_from_slice(b" HTTP/1.1\r\n");
                copy_headers(&mut out, req.headers);
                out.extend_from_slice(b"x-forwarded-for: ");
                out.extend_from_slice(peer.ip().to_string().as_bytes());
                out.extend_from_slice(b"\r\n\r\n");
                break (n, content_length(req.headers));
            }
            if client.read_buf(&mut cbuf).await? == 0 {
                return Ok(());
            }
        };
        cbuf.advance(head_len);
        let u = match &mut up {
            Some(u) => u,
            None => {
                let s = TcpStream::connect(upstream).await?;
                s.set_nodelay(true)?;
                up.insert(s)
            }
        };
        while cbuf.len() < body_len {
            if client.read_buf(&mut cbuf).await? == 0 {
                return Ok(());
            }
        }
        out.extend_from_slice(&cbuf[..body_len]);
        cbuf.advance(body_len);
        u.write_all(&out).await?;
        // Response head.
        let (head_len, body_len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut res = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = res.parse(&ubuf)? {
                out.clear();
                out.extend_from_slice(b"HTTP/1.1 ");
                out.extend_from_slice(res.code.unwrap_or(502).to_string().as_bytes());
                out.push(b' ');
                out.extend_from_slice(res.reason.unwrap_or("").as_bytes());
                out.extend_from_slice(b"\r\n");
                copy_headers(&mut out, res.headers);
                out.extend_from_slice(b"server: flotilla\r\n\r\n");
                break (n, content_length(res.headers));
            }
            if u.read_buf(&mut ubuf).await? == 0 {
                return Err("upstream closed".into());
            }
        };
        ubuf.advance(head_len);
        while ubuf.len() < body_len {
            if u.read_buf(&mut ubuf).await? == 0 {
                return Err("upstream closed".into());
            }
        }
        out.extend_from_slice(&ubuf[..body_len]);
        ubuf.advance(body_len);
        client.write_all(&out).await?;
    }
}

async fn serve(listen: SocketAddr, upstream: SocketAddr, reuse: bool) -> Result<(), BoxError> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(reuse)?;
    socket.bind(listen)?;
    let listener = socket.listen(1024)?;
    loop {
        let (stream, peer) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = conn(stream, peer, upstream).await;
        });
    }
}

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: bench_raw_h1 LISTEN UPSTREAM [THREADS] [--per-core]";
    let listen: SocketAddr = args.first().ok_or(usage)?.parse()?;
    let upstream: SocketAddr = args.get(1).ok_or(usage)?.parse()?;
    let threads: usize = args.get(2).map_or(Ok(2), |t| t.parse())?;
    if args.iter().any(|a| a == "--per-core") {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(serve(listen, upstream, true))
                })
            })
            .collect();
        for h in handles {
            let _ = h.join();
        }
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    rt.block_on(serve(listen, upstream, false))
}
