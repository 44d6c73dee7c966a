//! Connection limits, checked as each client connection is accepted: how
//! many the gateway holds at once (`max_connections`), and how many one
//! client address may hold (`max_connections_per_ip`). And the end of a
//! connection's life ([`Expired`]: `max_connection_requests`,
//! `max_connection_age`), which the HTTP/1 driver (`h1`) and the HTTP/2
//! watch (`conn`) check as it goes on.
//!
//! The in-flight cap bounds requests, not connections: a client that opens
//! thousands of idle or slow connections (a slowloris, a leaky pool) holds
//! a file descriptor and buffers for each and sends no request to shed.
//! These limits, like nginx's `limit_conn` and Envoy's connection limits,
//! close such connections at once instead, before a TLS handshake or a
//! byte is read, so the gateway's descriptors last for everyone else.
//!
//! An IPv6 client is counted by its /64, the block a single host or home
//! network is given (its interface identifiers are its to choose); an
//! IPv4-mapped address is counted as the IPv4 address it is. Trusted
//! proxies (`IpConfig::trusted_proxies`) are not limited per address: every
//! client behind a load balancer shares its address.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use metrics::Gauge;

use crate::ip;
use crate::routing::RoutingState;
use crate::stats;

/// The connections open now, in all and per address.
pub(crate) struct ConnLimits {
    max: usize,
    /// `0`: no limit per address.
    per_ip: usize,
    open: AtomicUsize,
    /// Only with a per-address limit. foldhash: keyed by client addresses,
    /// but a bounded map (`per_ip` × addresses within `max`) that a client
    /// flooding one bucket only slows for itself and its neighbours.
    by_ip: Mutex<HashMap<IpAddr, usize, foldhash::fast::RandomState>>,
    /// `flotilla_gateway_connections_open`, registered at the first
    /// connection (after the process installed its recorder), not looked
    /// up by name at each.
    gauge: OnceLock<Gauge>,
}

/// Why a connection was closed at once; the metric's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    MaxConnections,
    MaxConnectionsPerIp,
}

impl Refused {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refused::MaxConnections => "max_connections",
            Refused::MaxConnectionsPerIp => "max_connections_per_ip",
        }
    }
}

/// Why a connection was closed gracefully at the end of its life (an
/// HTTP/1.1 `Connection: close`, an HTTP/2 GOAWAY): so that behind an L4
/// balancer a long-lived client moves, in time, to a replica started after
/// it connected. The metric's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    /// It carried `max_connection_requests` requests.
    MaxRequests,
    /// It is older than `max_connection_age`.
    MaxAge,
}

impl Expired {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Expired::MaxRequests => "max_connection_requests",
            Expired::MaxAge => "max_connection_age",
        }
    }

    /// Counts the close (`flotilla_gateway_connections_expired_total`).
    pub(crate) fn count(self) {
        stats::connection_expired(self.reason());
    }
}

/// What decides whether a client connection is taken, on either listener:
/// the gateway's connection limits (a client holding idle plain-HTTP
/// connections to the redirect listener holds descriptors all the same)
/// and the routing in force, for its trusted proxies.
pub(crate) struct Admission {
    pub limits: Arc<ConnLimits>,
    pub routing: Arc<RoutingState>,
}

impl Admission {
    /// A slot for a connection from `peer`, or why not (logged here).
    pub(crate) fn admit(&self, peer: SocketAddr) -> Result<ConnSlot, Refused> {
        let trusted = self.limits.per_ip()
            && self
                .routing
                .current()
                .ip
                .as_ref()
                .is_some_and(|ip| ip::is_trusted(peer.ip(), &ip.trusted_proxies));
        self.limits.admit(peer.ip(), trusted).inspect_err(|why| {
            // Closed before a byte is read: no handshake, no buffers.
            tracing::debug!(target: "flotilla::gateway", %peer, reason = why.reason(), "connection refused");
        })
    }
}

/// One open connection, counted until dropped (when it closes).
pub(crate) struct ConnSlot {
    limits: Arc<ConnLimits>,
    /// Its place under its address, if it is counted per address.
    _ip: Option<IpCount>,
}

/// A connection counted under a client's address block until dropped.
pub(crate) struct IpCount {
    limits: Arc<ConnLimits>,
    key: IpAddr,
}

impl ConnLimits {
    pub(crate) fn new(max: usize, per_ip: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            max,
            per_ip,
            open: AtomicUsize::new(0),
            by_ip: Mutex::new(HashMap::default()),
            gauge: OnceLock::new(),
        })
    }

    /// Whether limits per address are on, so the caller knows whether to
    /// look up trusted proxies at all.
    pub(crate) fn per_ip(&self) -> bool {
        self.per_ip > 0
    }

    /// A slot for a connection from `peer`, unless that would pass a limit;
    /// `trusted`: the peer is a trusted proxy, not limited per address.
    /// Called by the one accept loop, so a check and its increment are not
    /// raced by another admission (only by closes, which lower the counts).
    pub(crate) fn admit(
        self: &Arc<Self>,
        peer: IpAddr,
        trusted: bool,
    ) -> Result<ConnSlot, Refused> {
        let refused = |why: Refused| {
            stats::connection_refused(why.reason());
            Err(why)
        };
        if self.open.load(Ordering::Relaxed) >= self.max {
            return refused(Refused::MaxConnections);
        }
        let ip = if self.per_ip() && !trusted {
            match self.count_ip(peer) {
                Some(count) => Some(count),
                None => return refused(Refused::MaxConnectionsPerIp),
            }
        } else {
            None
        };
        self.open.fetch_add(1, Ordering::Relaxed);
        self.gauge().increment(1.0);
        Ok(ConnSlot {
            limits: Arc::clone(self),
            _ip: ip,
        })
    }

    /// A place under `client`'s address for a connection already admitted
    /// from a trusted proxy, once its PROXY header named the client behind
    /// it: without one, every client of a balancer that passes TCP through
    /// would share the balancer's unlimited address. `Ok(None)` when there
    /// is no limit per address.
    pub(crate) fn admit_client(
        self: &Arc<Self>,
        client: IpAddr,
    ) -> Result<Option<IpCount>, Refused> {
        if !self.per_ip() {
            return Ok(None);
        }
        match self.count_ip(client) {
            Some(count) => Ok(Some(count)),
            None => {
                stats::connection_refused(Refused::MaxConnectionsPerIp.reason());
                Err(Refused::MaxConnectionsPerIp)
            }
        }
    }

    /// One more connection under `ip`'s block, unless it has `per_ip`
    /// already (the check and the increment under one lock).
    fn count_ip(self: &Arc<Self>, ip: IpAddr) -> Option<IpCount> {
        let key = ip::host_block(ip);
        let mut by_ip = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        let count = by_ip.entry(key).or_insert(0);
        if *count >= self.per_ip {
            return None;
        }
        *count += 1;
        Some(IpCount {
            limits: Arc::clone(self),
            key,
        })
    }

    fn gauge(&self) -> &Gauge {
        self.gauge.get_or_init(stats::connections_open)
    }

    #[cfg(test)]
    fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.limits.open.fetch_sub(1, Ordering::Relaxed);
        self.limits.gauge().decrement(1.0);
    }
}

impl Drop for IpCount {
    fn drop(&mut self) {
        let mut by_ip = self.limits.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = by_ip.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                by_ip.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn the_total_is_bounded_and_a_close_frees_its_place() {
        let limits = ConnLimits::new(2, 0);
        let a = limits.admit(ip("10.0.0.1"), false);
        let b = limits.admit(ip("10.0.0.2"), false);
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(
            limits.admit(ip("10.0.0.3"), true).err(),
            Some(Refused::MaxConnections),
            "trusted proxies count toward the total"
        );
        drop(a);
        assert_eq!(limits.open(), 1);
        assert!(limits.admit(ip("10.0.0.3"), false).is_ok());
        drop(b);
    }

    #[test]
    fn each_address_is_bounded_but_trusted_proxies_are_not() {
        let limits = ConnLimits::new(100, 2);
        let held: Vec<ConnSlot> = (0..2)
            .filter_map(|_| limits.admit(ip("10.0.0.1"), false).ok())
            .collect();
        assert_eq!(held.len(), 2);
        assert_eq!(
            limits.admit(ip("10.0.0.1"), false).err(),
            Some(Refused::MaxConnectionsPerIp)
        );
        assert!(
            limits.admit(ip("10.0.0.2"), false).is_ok(),
            "another address"
        );
        let proxy: Vec<ConnSlot> = (0..5)
            .filter_map(|_| limits.admit(ip("10.0.0.9"), true).ok())
            .collect();
        assert_eq!(proxy.len(), 5);
        drop(held);
        assert!(
            limits.by_ip.lock().map(|m| m.is_empty()).unwrap_or(false),
            "closed addresses leave the map"
        );
        assert!(limits.admit(ip("10.0.0.1"), false).is_ok());
    }

    #[test]
    fn a_client_named_behind_a_trusted_proxy_is_counted_under_its_own_address() {
        let limits = ConnLimits::new(100, 2);
        let direct = limits.admit(ip("203.0.113.9"), false);
        assert!(direct.is_ok());
        // Two connections from the balancer, each naming the same client.
        let via: Vec<(ConnSlot, Option<IpCount>)> = (0..2)
            .filter_map(|_| {
                let slot = limits.admit(ip("10.0.0.9"), true).ok()?;
                Some((slot, limits.admit_client(ip("203.0.113.9")).ok()?))
            })
            .collect();
        assert_eq!(via.len(), 1, "the client's direct connection counts too");
        assert_eq!(
            limits.admit_client(ip("203.0.113.9")).err(),
            Some(Refused::MaxConnectionsPerIp)
        );
        assert!(matches!(
            limits.admit_client(ip("203.0.113.10")),
            Ok(Some(_))
        ));
        drop(via);
        drop(direct);
        assert!(
            limits.by_ip.lock().map(|m| m.is_empty()).unwrap_or(false),
            "closed clients leave the map"
        );
        assert!(matches!(
            ConnLimits::new(100, 0).admit_client(ip("203.0.113.9")),
            Ok(None)
        ));
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        let limits = ConnLimits::new(100, 1);
        let _first = limits.admit(ip("2001:db8::1"), false);
        assert_eq!(
            limits.admit(ip("2001:db8::2"), false).err(),
            Some(Refused::MaxConnectionsPerIp),
            "the same /64"
        );
    }
}
