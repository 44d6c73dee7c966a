//! WebSocket load for `benches/gateway/websocket.sh`: an echo instance and a
//! client that measures round trips through whatever is between them.
//!
//! - `bench_ws serve 127.0.0.1:PORT`: a WebSocket echo server (tungstenite,
//!   one thread, as `bench_upstream` is one thread): every message comes
//!   back as it came; the first subprotocol offered is chosen.
//! - `bench_ws load HOST:PORT [--connections N] [--seconds S] [--size B]`:
//!   opens N WebSockets to `ws://HOST:PORT/ws` (default 64) and on each, for
//!   S seconds (default 5), sends a binary message of B bytes (default 64)
//!   and waits for its echo, one at a time; on one thread, as wrk runs in
//!   the other scripts. Prints one line: `messages=… rate=… p50_us=…
//!   p99_us=…` (round trips completed, per second, and their latency).
//!
//! tokio-tungstenite is a dev-dependency of the gateway, which examples may
//! use; the gateway under test (`bench_gateway`) is built without it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() {
    if let Err(e) = run() {
        eprintln!("bench_ws: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match args.next().as_deref() {
        Some("serve") => {
            let addr: SocketAddr = args.next().ok_or("serve ADDR")?.parse()?;
            runtime.block_on(serve(addr))
        }
        Some("load") => {
            let target: SocketAddr = args.next().ok_or("load HOST:PORT")?.parse()?;
            let mut load = Load {
                target,
                connections: 64,
                seconds: 5,
                size: 64,
            };
            while let Some(flag) = args.next() {
                let value = args.next().ok_or(format!("{flag} needs a value"))?;
                match flag.as_str() {
                    "--connections" => load.connections = value.parse()?,
                    "--seconds" => load.seconds = value.parse()?,
                    "--size" => load.size = value.parse()?,
                    other => return Err(format!("unknown argument {other}").into()),
                }
            }
            runtime.block_on(load.run())
        }
        _ => Err("usage: bench_ws serve ADDR | bench_ws load HOST:PORT [--connections N] [--seconds S] [--size B]".into()),
    }
}

async fn serve(addr: SocketAddr) -> Result<(), BoxError> {
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, first_protocol).await
            else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                if (msg.is_binary() || msg.is_text()) && ws.send(msg).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Chooses the first subprotocol the client offered, as a server that
/// speaks them all would: a browser that offered some refuses an answer
/// that names none.
#[expect(
    clippy::result_large_err,
    reason = "the signature is tungstenite's handshake callback"
)]
fn first_protocol(
    req: &tokio_tungstenite::tungstenite::handshake::server::Request,
    mut res: tokio_tungstenite::tungstenite::handshake::server::Response,
) -> Result<
    tokio_tungstenite::tungstenite::handshake::server::Response,
    tokio_tungstenite::tungstenite::handshake::server::ErrorResponse,
> {
    let first = req
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').map(str::trim).find(|p| !p.is_empty()))
        .and_then(|p| http::HeaderValue::from_str(p).ok());
    if let Some(first) = first {
        res.headers_mut().insert("sec-websocket-protocol", first);
    }
    Ok(res)
}

struct Load {
    target: SocketAddr,
    connections: usize,
    seconds: u64,
    size: usize,
}

impl Load {
    async fn run(self) -> Result<(), BoxError> {
        let url = format!("ws://{}/ws", self.target);
        let mut sockets = Vec::with_capacity(self.connections);
        for _ in 0..self.connections {
            let stream = TcpStream::connect(self.target).await?;
            stream.set_nodelay(true)?;
            let (ws, _) = tokio_tungstenite::client_async(url.as_str(), stream).await?;
            sockets.push(ws);
        }
        let payload = bytes::Bytes::from(vec![0x5a; self.size]);
        let end = Instant::now() + Duration::from_secs(self.seconds);
        let mut tasks = tokio::task::JoinSet::new();
        for mut ws in sockets {
            let payload = payload.clone();
            tasks.spawn(async move {
                let mut rtts: Vec<u32> = Vec::new();
                while Instant::now() < end {
                    let sent = Instant::now();
                    ws.send(Message::Binary(payload.clone())).await?;
                    loop {
                        match ws.next().await {
                            Some(Ok(Message::Binary(b))) if b.len() == payload.len() => break,
                            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                            Some(Ok(other)) => {
                                return Err::<Vec<u32>, BoxError>(
                                    format!("unexpected message {other:?}").into(),
                                );
                            }
                            Some(Err(e)) => return Err(e.into()),
                            None => return Err("the connection closed".into()),
                        }
                    }
                    let micros = sent.elapsed().as_micros();
                    rtts.push(u32::try_from(micros).unwrap_or(u32::MAX));
                }
                let _ = ws.close(None).await;
                Ok(rtts)
            });
        }
        let mut all = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            all.extend(joined??);
        }
        all.sort_unstable();
        let at = |q: f64| {
            let i = ((all.len() as f64 * q).ceil() as usize).saturating_sub(1);
            all.get(i).copied().unwrap_or(0)
        };
        println!(
            "messages={} rate={:.0} p50_us={} p99_us={}",
            all.len(),
            all.len() as f64 / self.seconds as f64,
            at(0.50),
            at(0.99)
        );
        Ok(())
    }
}
