//! Service addresses: one stable loopback listener per service, handed to
//! its callers as `FLOTILLA_URL_<NAME>`. It works at L4 — it picks a ready
//! instance per connection and splices bytes — so that when the mesh adds
//! TLS it runs end to end between the two instances and the callee sees the
//! caller's own certificate. For a function at zero the connection is held
//! while an instance starts, not refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flotilla_gateway::upstream::{Endpoint, Load};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::pool::Pool;

/// How many ready instances a connection tries before giving up.
const CONNECT_ATTEMPTS: usize = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Accepts connections for `pool` until `shutdown` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    pool: Arc<Pool>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((client, _)) => {
                let _ = client.set_nodelay(true);
                tokio::spawn(handle(client, Arc::clone(&pool)));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(service = pool.name(), "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(client: TcpStream, pool: Arc<Pool>) {
    let Some((upstream, endpoint)) = connect(&pool).await else {
        // Nothing to splice to: closing tells the caller's client at once,
        // and its own error names the service it could not reach.
        return;
    };
    splice(client, upstream, &endpoint.load).await;
}

async fn connect(pool: &Arc<Pool>) -> Option<(TcpStream, Endpoint)> {
    if pool.ready().is_empty() {
        let wait = tokio::time::timeout(pool.spec.ready_timeout, Arc::clone(pool).activate()).await;
        if !matches!(wait, Ok(Ok(()))) {
            tracing::warn!(service = pool.name(), "no ready instance for a connection");
            return None;
        }
    }
    let mut tried: Vec<SocketAddr> = Vec::new();
    for _ in 0..CONNECT_ATTEMPTS {
        let ready = pool.ready();
        let candidate = ready
            .iter()
            .filter(|e| !tried.contains(&e.addr))
            .min_by_key(|e| e.load.in_flight())
            .cloned()?;
        tried.push(candidate.addr);
        if let Ok(Ok(stream)) =
            tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(candidate.addr)).await
        {
            let _ = stream.set_nodelay(true);
            return Some((stream, candidate));
        }
    }
    None
}

/// Copies both ways until both sides are done, marking the instance active
/// as bytes flow (so an open but quiet keep-alive connection does not keep
/// a function from scaling to zero).
async fn splice(client: TcpStream, upstream: TcpStream, load: &Arc<Load>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let up = pipe(&mut cr, &mut uw, load);
    let down = pipe(&mut ur, &mut cw, load);
    let _ = tokio::join!(up, down);
}

async fn pipe<R, W>(from: &mut R, to: &mut W, load: &Load) -> std::io::Result<()>
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // Half-close: the other direction may still be sending.
            return to.shutdown().await;
        }
        load.touch();
        to.write_all(&buf[..n]).await?;
    }
}
