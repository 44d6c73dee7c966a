//! The gateway's HTTP client to instances: one pooled, keep-alive HTTP/1.1
//! client shared by all requests.
//!
//! How to reach an instance is decided here and only here (the connector
//! and the URI scheme), so that mutual TLS to instances replaces this one
//! module when the mesh arrives.

use std::net::SocketAddr;
use std::time::Duration;

use http::Uri;
use http::uri::{Authority, PathAndQuery, Scheme};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::Body;
use crate::config::Limits;

/// The connector to instances: plain TCP for now.
pub(crate) type Connector = HttpConnector;

pub(crate) type UpstreamClient = Client<Connector, Body>;

/// Idle pooled connections kept per instance. Enough for bursts to reuse
/// connections; bounded so a spike does not leave thousands of idle sockets
/// (and file descriptors) behind.
const MAX_IDLE_PER_INSTANCE: usize = 64;

/// How long an idle pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(30);

pub(crate) fn build(limits: &Limits) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(limits.connect_timeout));
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(MAX_IDLE_PER_INSTANCE)
        .build(connector)
}

/// The URI of `path_and_query` on the instance at `addr`.
pub(crate) fn uri(
    addr: SocketAddr,
    path_and_query: Option<&PathAndQuery>,
) -> Result<Uri, http::Error> {
    let authority = Authority::try_from(addr.to_string())?;
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority)
        .path_and_query(path_and_query.map(PathAndQuery::as_str).unwrap_or("/"))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_keeps_path_and_query_and_brackets_ipv6() {
        let pq = PathAndQuery::from_static("/a/b?x=1&y=%20");
        let u = match uri(SocketAddr::from(([127, 0, 0, 1], 8080)), Some(&pq)) {
            Ok(u) => u,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(u.to_string(), "http://127.0.0.1:8080/a/b?x=1&y=%20");
        let v6: SocketAddr = match "[::1]:9000".parse() {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        };
        let u = match uri(v6, None) {
            Ok(u) => u,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(u.to_string(), "http://[::1]:9000/");
    }
}
