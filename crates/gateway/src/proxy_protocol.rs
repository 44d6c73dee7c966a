//! HAProxy's PROXY protocol, v1 (text) and v2 (binary), on client
//! connections: a load balancer that passes TCP through (AWS's NLB,
//! HAProxy in `mode tcp`, a TCP proxy in front of TLS the gateway
//! terminates) writes its client's address ahead of the connection's first
//! byte, so the gateway sees the client, not the balancer, in its IP
//! lists, rate limits, affinity, access log and `X-Forwarded-For`.
//!
//! With `[gateway.ip] proxy_protocol`, every connection must start with a
//! header; one that does not, or sends a malformed one, is closed, as
//! nginx's `listen … proxy_protocol` does (a client that reached the
//! gateway around the balancer would otherwise be taken for the balancer).
//! The address is believed only from `trusted_proxies`, as nginx's
//! `set_real_ip_from`: from anyone else the header is read and ignored,
//! and the peer stays the client. A `LOCAL` header (the balancer's own
//! health check) and `UNKNOWN` leave the peer too. A named client is
//! counted under its own address against `max_connections_per_ip` (the
//! balancer, a trusted proxy, is not limited).
//!
//! The header is read exactly, never a byte past it: a TLS handshake
//! follows it on the same connection. The parsing is `ppp`'s.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use std::sync::Arc;

use crate::conn_limit::{ConnLimits, IpCount};
use crate::ip::{self, IpConfig};
use crate::routing::RoutingState;
use crate::stats;

/// The v2 header's first 12 bytes.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// How a v1 header starts.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 header, `\r\n` included (the protocol's own bound).
const V1_MAX: usize = 107;
/// The longest v2 header taken: addresses and TLVs (an AWS VPC endpoint
/// id, a TLS summary) take a few hundred bytes; the format allows 64 KiB,
/// which no client needs to make the gateway buffer.
pub(crate) const V2_MAX: usize = 4096;

/// Why a connection's PROXY header was not taken.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HeaderError {
    #[error("the connection did not start with a PROXY protocol header")]
    Missing,
    #[error("a malformed PROXY protocol header: {0}")]
    Malformed(String),
    #[error("a PROXY protocol header longer than {0} bytes")]
    TooLong(usize),
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// A connection's client, once its PROXY header is taken.
pub(crate) struct Client {
    pub addr: SocketAddr,
    /// Its place under the client's address (`max_connections_per_ip`),
    /// held as long as the connection, when a trusted proxy named it.
    pub counted: Option<IpCount>,
}

/// The client of a new connection from `peer`, on either listener: with
/// `proxy_protocol` on in the routing in force, what its header says
/// ([`take`]), else the peer itself. `None`: close the connection.
pub(crate) async fn client_of(
    stream: &mut TcpStream,
    peer: SocketAddr,
    routing: &RoutingState,
    limits: &Arc<ConnLimits>,
    timeout: Duration,
) -> Option<Client> {
    let current = routing.current();
    match current.ip.as_ref().filter(|ip| ip.proxy_protocol) {
        Some(ip) => take(stream, peer, ip, limits, timeout).await,
        None => Some(Client {
            addr: peer,
            counted: None,
        }),
    }
}

/// Takes the PROXY header off a new connection from `peer`, within
/// `timeout`: the client (the peer itself unless a trusted proxy named
/// another, which is then counted under its own address against `limits`),
/// or `None` when the connection is to be closed (no valid header in time,
/// or the named client over its connections; logged and counted as
/// refused).
async fn take(
    stream: &mut TcpStream,
    peer: SocketAddr,
    ip: &IpConfig,
    limits: &Arc<ConnLimits>,
    timeout: Duration,
) -> Option<Client> {
    let named = match tokio::time::timeout(timeout, read(stream)).await {
        Ok(Ok(named)) => named,
        Ok(Err(e)) => return refused(peer, &e.to_string()),
        Err(_) => {
            return refused(
                peer,
                &format!("no PROXY protocol header within {timeout:?}"),
            );
        }
    };
    let trusted = |addr: SocketAddr| ip::is_trusted(addr.ip(), &ip.trusted_proxies);
    match named {
        // The peer was admitted as a trusted proxy, not counted under its
        // address; the client it names is (unless it is a proxy too).
        Some(client) if trusted(peer) => {
            let counted = if trusted(client) {
                None
            } else {
                match limits.admit_client(client.ip()) {
                    Ok(counted) => counted,
                    Err(why) => {
                        tracing::debug!(target: "flotilla::gateway", %peer, %client, reason = why.reason(), "connection closed");
                        return None;
                    }
                }
            };
            Some(Client {
                addr: client,
                counted,
            })
        }
        Some(client) => {
            tracing::debug!(target: "flotilla::gateway", %peer, claimed = %client, "a PROXY header from a peer that is no trusted proxy; ignored");
            Some(Client {
                addr: peer,
                counted: None,
            })
        }
        None => Some(Client {
            addr: peer,
            counted: None,
        }),
    }
}

fn refused(peer: SocketAddr, error: &str) -> Option<Client> {
    tracing::debug!(target: "flotilla::gateway", %peer, %error, "connection closed");
    stats::connection_refused("proxy_protocol");
    None
}

/// Reads one PROXY header from the start of `stream`, and nothing after
/// it: the source address it names, or `None` for `LOCAL` and `UNKNOWN`
/// (and for a v2 address family without one, such as a Unix socket).
pub(crate) async fn read(stream: &mut TcpStream) -> Result<Option<SocketAddr>, HeaderError> {
    // Both versions' shortest header is longer than 12 bytes, so these
    // are the header's own.
    let mut start = [0u8; 12];
    read_exact(stream, &mut start).await?;
    if &start == V2_SIGNATURE {
        read_v2(stream, start).await
    } else if start.starts_with(V1_PREFIX) {
        read_v1(stream, start).await
    } else {
        Err(HeaderError::Missing)
    }
}

async fn read_v2(
    stream: &mut TcpStream,
    start: [u8; 12],
) -> Result<Option<SocketAddr>, HeaderError> {
    let mut header = Vec::with_capacity(64);
    header.extend_from_slice(&start);
    let mut fixed = [0u8; 4];
    read_exact(stream, &mut fixed).await?;
    header.extend_from_slice(&fixed);
    let length = 16 + usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
    if length > V2_MAX {
        return Err(HeaderError::TooLong(V2_MAX));
    }
    header.resize(length, 0);
    read_exact(stream, &mut header[16..]).await?;
    let parsed = ppp::v2::Header::try_from(header.as_slice())
        .map_err(|e| HeaderError::Malformed(e.to_string()))?;
    Ok(match (parsed.command, parsed.addresses) {
        (ppp::v2::Command::Local, _) => None,
        (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (ppp::v2::Command::Proxy, _) => None,
    })
}

async fn read_v1(
    stream: &mut TcpStream,
    start: [u8; 12],
) -> Result<Option<SocketAddr>, HeaderError> {
    let mut line = Vec::with_capacity(V1_MAX);
    line.extend_from_slice(&start);
    // Up to the line's end and no further: what has arrived is looked at
    // first, then only the header's part of it is read. Every pass reads
    // at least a byte, so a header trickling in does not spin.
    let mut seen = [0u8; V1_MAX];
    while line.last() != Some(&b'\n') {
        let room = V1_MAX - line.len();
        if room == 0 {
            return Err(HeaderError::TooLong(V1_MAX));
        }
        let n = stream.peek(&mut seen[..room]).await?;
        if n == 0 {
            return Err(HeaderError::Missing);
        }
        let take = seen[..n]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(n, |end| end + 1);
        let from = line.len();
        line.resize(from + take, 0);
        read_exact(stream, &mut line[from..]).await?;
    }
    let parsed = ppp::v1::Header::try_from(line.as_slice())
        .map_err(|e| HeaderError::Malformed(e.to_string()))?;
    Ok(match parsed.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Unknown => None,
    })
}

/// `read_exact`, a connection closed first being a missing header.
async fn read_exact(stream: &mut TcpStream, buf: &mut [u8]) -> Result<(), HeaderError> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(HeaderError::Missing),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// What `read` makes of a connection on which `chunks` arrive, one
    /// write each, and what is left to read after it.
    async fn read_sent(chunks: &[&[u8]]) -> (Result<Option<SocketAddr>, String>, Vec<u8>) {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("bind: {e}"),
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        };
        let chunks: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        let writer = tokio::spawn(async move {
            let Ok(mut client) = TcpStream::connect(addr).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            for chunk in chunks {
                if client.write_all(&chunk).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let (mut stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => panic!("accept: {e}"),
        };
        let result = read(&mut stream).await.map_err(|e| e.to_string());
        let _ = writer.await;
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
        (result, rest)
    }

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        let len = u16::try_from(addresses.len() + tlvs.len()).unwrap_or(u16::MAX);
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(addresses);
        h.extend_from_slice(tlvs);
        h
    }

    fn addr(s: &str) -> SocketAddr {
        match s.parse() {
            Ok(a) => a,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[tokio::test]
    async fn a_v1_header_names_the_client_and_nothing_after_it_is_read() {
        let (got, rest) =
            read_sent(&[b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n\x16\x03\x01"]).await;
        assert_eq!(got, Ok(Some(addr("203.0.113.7:51234"))));
        assert_eq!(rest, b"\x16\x03\x01");
        let (got, rest) =
            read_sent(&[b"PROXY TCP6 2001:db8::7 2001:db8::1 4711 80\r\nGET / HTTP/1.1\r\n"]).await;
        assert_eq!(got, Ok(Some(addr("[2001:db8::7]:4711"))));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
        let (got, rest) = read_sent(&[b"PROXY UNKNOWN\r\nGET"]).await;
        assert_eq!(got, Ok(None));
        assert_eq!(rest, b"GET");
    }

    #[tokio::test]
    async fn a_v1_header_may_arrive_in_pieces() {
        let (got, rest) = read_sent(&[
            b"PROXY TCP4 ",
            b"203.0.113.7 10.0.",
            b"0.1 51234 443\r",
            b"\nGET",
        ])
        .await;
        assert_eq!(got, Ok(Some(addr("203.0.113.7:51234"))));
        assert_eq!(rest, b"GET");
    }

    #[tokio::test]
    async fn a_v2_header_names_the_client_or_none_for_local() {
        // IPv4 over TCP: source, destination, source port, destination port.
        let mut a = vec![203, 0, 113, 7, 10, 0, 0, 1];
        a.extend_from_slice(&51234u16.to_be_bytes());
        a.extend_from_slice(&443u16.to_be_bytes());
        // An AWS VPC endpoint TLV (type 0xEA) after the addresses.
        let tlv = [0xEA, 0x00, 0x04, 0x01, b'v', b'p', b'c'];
        let mut sent = v2(1, 0x11, &a, &tlv);
        sent.extend_from_slice(b"\x16\x03\x01");
        let (got, rest) = read_sent(&[&sent]).await;
        assert_eq!(got, Ok(Some(addr("203.0.113.7:51234"))));
        assert_eq!(rest, b"\x16\x03\x01");

        let mut a6 = Vec::new();
        a6.extend_from_slice(&std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7).octets());
        a6.extend_from_slice(&[0; 16]);
        a6.extend_from_slice(&4711u16.to_be_bytes());
        a6.extend_from_slice(&80u16.to_be_bytes());
        let (got, _) = read_sent(&[&v2(1, 0x21, &a6, &[])]).await;
        assert_eq!(got, Ok(Some(addr("[2001:db8::7]:4711"))));

        // The balancer's own health check: no client.
        let (got, rest) = read_sent(&[&v2(0, 0x00, &[], &[]), b"GET"]).await;
        assert_eq!(got, Ok(None));
        assert_eq!(rest, b"GET");
    }

    #[tokio::test]
    async fn anything_else_is_refused_with_what_is_wrong() {
        let cases: [(&[u8], &str); 6] = [
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "did not start"),
            (b"PROXY TCP4 not-an-address 10.0.0.1 1 2\r\n", "malformed"),
            (b"PROXY TCP4 203.0.113.7 10.0.0.1 1 2\n", "malformed"),
            (b"PROXY 1", "did not start"),
            (b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443 and on and on and on and on and on and on and on and on and on and on and on", "longer than 107"),
            (b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff", "longer than 4096"),
        ];
        for (sent, expected) in cases {
            let (got, _) = read_sent(&[sent]).await;
            match got {
                Err(e) => assert!(e.contains(expected), "{sent:?}: {e}"),
                Ok(a) => panic!("{sent:?} was taken: {a:?}"),
            }
        }
        // A v2 header too short for its address family.
        let (got, _) = read_sent(&[&v2(1, 0x11, &[1, 2, 3], &[])]).await;
        assert!(got.is_err_and(|e| e.contains("malformed")));
    }
}
