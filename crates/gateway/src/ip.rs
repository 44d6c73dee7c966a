//! Who the client is, and whether it may come in: the client address
//! (through trusted proxies only) and allow/deny lists by CIDR.
//!
//! `X-Forwarded-For` and `Forwarded` are written by whoever sends the
//! request, so they are believed only when the direct peer is a trusted
//! proxy, and then only as far as the chain stays trusted: walking the list
//! from the right (the hop nearest to us), the first address that is not a
//! trusted proxy is the client. Anything to its left was written by the
//! client itself and is ignored. Without trusted proxies the peer address
//! is the client, whatever the headers say.
//!
//! Lists: deny wins over allow; a non-empty allow list admits only its
//! networks. The system's lists apply to every request (before routing, so
//! a refused client learns nothing about routes); a route's lists apply on
//! top, to that route only — a route can narrow access, never widen it.
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, from dual-stack sockets)
//! are matched as the IPv4 address they are.

use std::net::{IpAddr, Ipv6Addr};

use http::HeaderMap;
use ipnet::IpNet;

/// System-wide IP settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpConfig {
    /// Admit only these networks (empty: everyone not denied).
    pub allow: Vec<IpNet>,
    /// Refuse these networks, even when allowed.
    pub deny: Vec<IpNet>,
    /// Proxies (load balancers, CDNs) whose `X-Forwarded-For` (or
    /// `Forwarded`) is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Which of the two they write; the other is never read.
    pub forwarded_header: ForwardedHeader,
    /// Every client connection starts with a PROXY protocol header
    /// (`proxy_protocol`), believed from `trusted_proxies` only.
    pub proxy_protocol: bool,
}

/// A route's own allow/deny lists, applied after the system's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpRules {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

// The parsers are the manifest's, so both report the same errors.
pub use flotilla_manifest::{ForwardedHeader, IpNetParseError, parse_net, parse_nets};

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` (`canonical`) is in one of `nets`, by a scan: for the few
/// trusted proxies, looked at only for a request that names a client
/// behind one. A network written as IPv4-mapped IPv6
/// (`::ffff:10.0.0.0/104`) holds the IPv4 addresses it maps, as in
/// [`IpSet`].
fn contains(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|n| {
        n.contains(&ip)
            || matches!(ip, IpAddr::V4(v4) if n.contains(&IpAddr::V6(v4.to_ipv6_mapped())))
    })
}

/// A list of networks as sorted ranges that neither overlap nor touch, one
/// list per family: a lookup is a binary search, so a list of thousands of
/// networks (a threat feed's blocklist) costs a request a dozen
/// comparisons rather than a scan, as nginx's `geo` radix tree and
/// Envoy's LC-trie make it. A network written as IPv4-mapped IPv6
/// (`::ffff:10.0.0.0/104`) matches the IPv4 addresses it maps, as the
/// addresses are matched (`canonical`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct IpSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

/// `::ffff:0:0/96`, the IPv4-mapped addresses.
const MAPPED: (u128, u128) = (0xffff_0000_0000, 0xffff_ffff_ffff);

impl IpSet {
    pub(crate) fn new(nets: &[IpNet]) -> IpSet {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for net in nets {
            match net {
                IpNet::V4(n) => v4.push((n.network().to_bits(), n.broadcast().to_bits())),
                IpNet::V6(n) => {
                    let (first, last) = (n.network().to_bits(), n.broadcast().to_bits());
                    // The part of it that maps IPv4 addresses, as those.
                    let (lo, hi) = (first.max(MAPPED.0), last.min(MAPPED.1));
                    if lo <= hi {
                        // In range: both are within the /96, whose low 32
                        // bits are the IPv4 address.
                        v4.push((lo as u32, hi as u32));
                    }
                    v6.push((first, last));
                }
            }
        }
        IpSet {
            v4: merged(v4),
            v6: merged(v6),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Whether `ip` (canonical: an IPv4-mapped address as IPv4) is in it.
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => within(&self.v4, a.to_bits()),
            IpAddr::V6(a) => within(&self.v6, a.to_bits()),
        }
    }
}

/// An address as a number, for the ranges of either family.
trait Bits: Ord + Copy {
    fn after(self) -> Option<Self>;
}

impl Bits for u32 {
    fn after(self) -> Option<u32> {
        self.checked_add(1)
    }
}

impl Bits for u128 {
    fn after(self) -> Option<u128> {
        self.checked_add(1)
    }
}

/// `ranges` sorted, with those that overlap or touch made one.
fn merged<T: Bits>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (first, last) in ranges {
        match out.last_mut() {
            // Starts within the last one, or right after it.
            Some(prev) if prev.1.after().is_none_or(|next| first <= next) => {
                prev.1 = prev.1.max(last);
            }
            _ => out.push((first, last)),
        }
    }
    out.shrink_to_fit();
    out
}

/// Whether `x` is in one of `ranges` (sorted, apart).
fn within<T: Bits>(ranges: &[(T, T)], x: T) -> bool {
    // The first range that does not end before `x`.
    let i = ranges.partition_point(|r| r.1 < x);
    ranges.get(i).is_some_and(|r| r.0 <= x)
}

/// Allow and deny lists, compiled for lookups (see [`IpSet`]).
#[derive(Debug)]
pub(crate) struct IpFilter {
    allow: IpSet,
    deny: IpSet,
}

impl IpFilter {
    pub(crate) fn new(allow: &[IpNet], deny: &[IpNet]) -> IpFilter {
        IpFilter {
            allow: IpSet::new(allow),
            deny: IpSet::new(deny),
        }
    }

    pub(crate) fn admits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        !self.deny.contains(ip) && (self.allow.is_empty() || self.allow.contains(ip))
    }
}

impl IpRules {
    pub(crate) fn filter(&self) -> IpFilter {
        IpFilter::new(&self.allow, &self.deny)
    }
}

impl IpConfig {
    pub(crate) fn filter(&self) -> IpFilter {
        IpFilter::new(&self.allow, &self.deny)
    }
}

/// The block of addresses one client holds, which per-client limits
/// (connections, `per ip` rate limits) count it by: an IPv4 address as it
/// is, an IPv6 one by its /64, the block a single host or home network is
/// given (so a client cannot pass a limit by moving through its 2^64
/// addresses), an IPv4-mapped one as its IPv4 address.
pub(crate) fn host_block(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !((1u128 << 64) - 1))),
        },
    }
}

/// `ip` as text, as its `Display` writes it. An IPv4 address digit by
/// digit: `Display` goes through the formatting machinery (padding, a
/// formatter per octet), about 1 300 instructions where this takes a
/// tenth, and a `per ip` rate limit writes its client's address on every
/// request (`REFUSALS=1 benches/gateway/instructions.sh`). IPv6 by
/// `Display`, for its zero compression.
pub(crate) fn text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut out = String::with_capacity(15);
    v4_digits(v4, |b| out.push(char::from(b)));
    out
}

/// `ip` as text, as [`text`] writes it, at the end of `out`.
pub(crate) fn push_text(ip: IpAddr, out: &mut Vec<u8>) {
    match ip {
        IpAddr::V4(v4) => v4_digits(v4, |b| out.push(b)),
        IpAddr::V6(v6) => {
            use std::io::Write;
            // Writing into a `Vec` cannot fail.
            let _ = write!(out, "{v6}");
        }
    }
}

/// The characters of `v4` as `Display` writes it, one by one.
fn v4_digits(v4: std::net::Ipv4Addr, mut push: impl FnMut(u8)) {
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            push(b'.');
        }
        if octet >= 100 {
            push(b'0' + octet / 100);
        }
        if octet >= 10 {
            push(b'0' + octet / 10 % 10);
        }
        push(b'0' + octet % 10);
    }
}

/// Whether `peer` is one of the `trusted` proxies (an IPv4-mapped IPv6
/// peer of a dual-stack socket matched as the IPv4 address it is).
pub(crate) fn is_trusted(peer: IpAddr, trusted: &[IpNet]) -> bool {
    !trusted.is_empty() && contains(trusted, canonical(peer))
}

/// The scheme a trusted proxy that writes `header` says its client used:
/// the right-most element of `X-Forwarded-Proto` (a proxy that appends to
/// a client's own writes its claim last, so an element to its left is the
/// client's and is not believed), or with `Forwarded` the `proto=` of its
/// right-most element. `None` when it sent none or something other than
/// `http` or `https`: the scheme of the connection stands. Only for a peer
/// `is_trusted`.
pub(crate) fn forwarded_proto(
    headers: &HeaderMap,
    header: ForwardedHeader,
) -> Option<&'static str> {
    let scheme = |s: &str| {
        let s = s.trim().trim_matches('"');
        if s.eq_ignore_ascii_case("https") {
            Some("https")
        } else if s.eq_ignore_ascii_case("http") {
            Some("http")
        } else {
            None
        }
    };
    if header == ForwardedHeader::XForwardedFor {
        return scheme(last_element(headers, "x-forwarded-proto")?);
    }
    scheme(forwarded_param(
        last_element(headers, "forwarded")?,
        "proto",
    )?)
}

/// The right-most element of the last `name` field, read on its own: the
/// one a trusted proxy appended. (Read with the whole line, a byte the
/// client chose to its left would make the proxy's unreadable too.)
fn last_element<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    let last = headers.get_all(name).iter().next_back()?;
    let element = last.as_bytes().rsplit(|b| *b == b',').next()?;
    std::str::from_utf8(element).ok()
}

/// The `host=` of the right-most `Forwarded` element, unquoted: the name
/// a trusted proxy that writes `Forwarded` says its client asked for.
pub(crate) fn forwarded_host(headers: &HeaderMap) -> Option<&[u8]> {
    let element = last_element(headers, "forwarded")?;
    let host = forwarded_param(element, "host")?.trim_matches('"');
    (!host.is_empty()).then_some(host.as_bytes())
}

/// The value of the parameter `key` (`for`, `proto`, …) of one
/// `Forwarded` element (RFC 7239 §4), trimmed, quotes left on.
fn forwarded_param<'a>(element: &'a str, key: &str) -> Option<&'a str> {
    element.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        k.trim().eq_ignore_ascii_case(key).then(|| v.trim())
    })
}

/// Hops of a forwarding header walked at most: past as many trusted
/// proxies, the last one's word is taken (nginx's `real_ip_recursive` and
/// Envoy's `xff_num_trusted_hops` stop well before).
const MAX_HOPS: usize = 32;

/// The client address of a request that arrived from `peer`: when it is
/// one of the `trusted` proxies, the right-most untrusted hop of the
/// header they write (`header`). The other header is not read: a proxy
/// passes it on as its client wrote it, and a client that sent
/// `Forwarded: for=10.0.0.9` through a balancer that appends to
/// `X-Forwarded-For` would otherwise be whoever it named.
pub(crate) fn client_addr(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
    header: ForwardedHeader,
) -> IpAddr {
    let peer = canonical(peer);
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let name = match header {
        ForwardedHeader::XForwardedFor => "x-forwarded-for",
        ForwardedHeader::Forwarded => "forwarded",
    };
    // From the right, lazily: the walk nearly always stops at the first
    // hop or two, and a client may send thousands. Each element is read
    // on its own, as bytes: a line read whole would be unreadable for one
    // byte the client chose (`X-Forwarded-For: \x80`), and balancers
    // append their hop to the client's own line, so that one byte would
    // hide the address the balancer wrote.
    let hops = headers
        .get_all(name)
        .iter()
        .rev()
        .flat_map(|v| v.as_bytes().rsplit(|b| *b == b','))
        .map(|element| {
            let element = std::str::from_utf8(element).ok()?;
            match header {
                ForwardedHeader::XForwardedFor => parse_node(element.trim()),
                // An element without `for=` says nothing about the client
                // but is still a hop.
                ForwardedHeader::Forwarded => {
                    parse_node(forwarded_param(element, "for")?.trim_matches('"'))
                }
            }
        })
        .take(MAX_HOPS);
    let mut client = peer;
    for hop in hops {
        match hop {
            Some(ip) => {
                client = canonical(ip);
                if !contains(trusted, client) {
                    return client;
                }
            }
            // A trusted proxy wrote something that is not an address
            // (`unknown`, an obfuscated id): the hop it came from is as
            // far as we can see.
            None => return client,
        }
    }
    client
}

/// An address with an optional port: `1.2.3.4`, `1.2.3.4:80`, `[::1]`,
/// `[::1]:80`, `::1`.
fn parse_node(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, _) = rest.split_once(']')?;
        return addr.parse().ok();
    }
    let (addr, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    addr.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_written_as_display_writes_it() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut v4: Vec<u32> = vec![0, u32::MAX, 0x0a00_6409, 0x7f00_0001, 0x6464_6464];
        v4.extend((0..2000).map(|_| next() as u32));
        let pushed = |ip: IpAddr| {
            let mut out = b"x".to_vec();
            push_text(ip, &mut out);
            String::from_utf8(out).unwrap_or_default()
        };
        for bits in v4 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from_bits(bits));
            assert_eq!(text(ip), ip.to_string());
            assert_eq!(pushed(ip), format!("x{ip}"));
        }
        for ip in ["::1", "2001:db8::", "::ffff:10.0.0.1", "fe80::1:2:3:4"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(text(ip), ip.to_string());
            assert_eq!(pushed(ip), format!("x{ip}"));
        }
    }

    #[test]
    fn a_client_s_block_is_its_ipv4_address_or_its_ipv6_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(host_block(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            host_block(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            ip("2001:db8:1:2::")
        );
        assert_ne!(host_block(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
        assert_eq!(host_block(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(host_block(ip("192.0.2.7")), ip("192.0.2.7"));
    }
    use http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        match s.parse() {
            Ok(ip) => ip,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        match parse_nets(list) {
            Ok(n) => n,
            Err(e) => panic!("{e}"),
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn parses_cidrs_and_bare_addresses() {
        assert_eq!(
            parse_net("10.1.2.3/8").map(|n| n.to_string()),
            Ok("10.0.0.0/8".into())
        );
        assert_eq!(
            parse_net("::1").map(|n| n.to_string()),
            Ok("::1/128".into())
        );
        assert_eq!(
            parse_net("192.0.2.1").map(|n| n.to_string()),
            Ok("192.0.2.1/32".into())
        );
        assert!(parse_net("10.0.0.0/33").is_err());
        let e = parse_net("localhost").err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("CIDR")));
    }

    #[test]
    fn a_trusted_proxy_s_scheme_is_its_right_most_claim() {
        let proto = |pairs: &[(&'static str, &'static str)]| {
            forwarded_proto(&headers(pairs), ForwardedHeader::XForwardedFor)
        };
        assert_eq!(proto(&[("x-forwarded-proto", "https")]), Some("https"));
        assert_eq!(proto(&[("x-forwarded-proto", "HTTP")]), Some("http"));
        // A proxy that appends to the client's own: the client's is ignored.
        assert_eq!(proto(&[("x-forwarded-proto", "https, http")]), Some("http"));
        assert_eq!(
            proto(&[
                ("x-forwarded-proto", "https"),
                ("x-forwarded-proto", "http")
            ]),
            Some("http")
        );
        // Anything else leaves the connection's scheme.
        assert_eq!(proto(&[("x-forwarded-proto", "wss")]), None);
        assert_eq!(proto(&[("x-forwarded-proto", "http, ftp")]), None);
        assert_eq!(proto(&[]), None);
        // `Forwarded` is not read from a proxy that writes the other.
        assert_eq!(proto(&[("forwarded", "for=203.0.113.7;proto=https")]), None);
        // From one that writes `Forwarded`: its last element.
        let proto = |pairs: &[(&'static str, &'static str)]| {
            forwarded_proto(&headers(pairs), ForwardedHeader::Forwarded)
        };
        assert_eq!(
            proto(&[(
                "forwarded",
                "for=6.6.6.6;proto=http, for=203.0.113.7;Proto=\"https\""
            )]),
            Some("https")
        );
        assert_eq!(
            proto(&[("forwarded", "for=203.0.113.7;proto=https, for=10.0.0.2")]),
            None
        );
        assert_eq!(
            proto(&[
                ("forwarded", "for=203.0.113.7;proto=https"),
                ("x-forwarded-proto", "http"),
            ]),
            Some("https")
        );
    }

    #[test]
    fn a_mapped_peer_is_trusted_as_its_ipv4_address() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert!(is_trusted(ip("10.1.2.3"), &trusted));
        assert!(is_trusted(ip("::ffff:10.1.2.3"), &trusted));
        assert!(!is_trusted(ip("192.0.2.1"), &trusted));
        assert!(!is_trusted(ip("10.1.2.3"), &[]));
    }

    #[test]
    fn deny_wins_and_allow_narrows() {
        let rules = IpRules {
            allow: nets(&["10.0.0.0/8", "2001:db8::/32"]),
            deny: nets(&["10.9.0.0/16"]),
        }
        .filter();
        assert!(rules.admits(ip("10.1.1.1")));
        assert!(!rules.admits(ip("10.9.1.1")));
        assert!(!rules.admits(ip("192.0.2.1")));
        assert!(rules.admits(ip("2001:db8::5")));
        assert!(!rules.admits(ip("2001:db9::5")));
        // IPv4-mapped IPv6 is matched as IPv4.
        assert!(rules.admits(ip("::ffff:10.1.1.1")));
        assert!(!rules.admits(ip("::ffff:10.9.1.1")));
        assert!(IpRules::default().filter().admits(ip("203.0.113.9")));
        // A network written as IPv4-mapped IPv6 matches those IPv4 clients.
        let mapped = IpFilter::new(&[], &nets(&["::ffff:192.0.2.0/120"]));
        assert!(!mapped.admits(ip("192.0.2.7")));
        assert!(!mapped.admits(ip("::ffff:192.0.2.7")));
        assert!(mapped.admits(ip("192.0.3.7")));
    }

    /// The ranges say what a scan of the networks says, for lists with
    /// overlaps, neighbours, the ends of each family and mapped networks,
    /// at addresses drawn near and far from them.
    #[test]
    fn a_compiled_set_matches_what_a_scan_finds() {
        // xorshift64*: the same draws every run, no dependency.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut draw = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        // Mostly inside 10.0.0.0/16 and 2001:db8::/112, so that networks
        // overlap and touch; now and then anywhere.
        use std::net::Ipv4Addr;
        let v4 = |d: u64| {
            let near = 0x0a00_0000 | (d as u32 & 0xffff);
            if d >> 60 == 0 { d as u32 } else { near }
        };
        let v6 = |d: u64| (0x2001_0db8_u128 << 96) | u128::from(d as u16);
        for round in 0..20 {
            let mut list = vec!["255.255.255.255/32".to_string(), "::/128".to_string()];
            if round % 5 == 0 {
                list.push("0.0.0.0/1".into());
            }
            // Small networks (a /24 to a single address), so that there
            // are many ranges with many ends.
            for _ in 0..200 {
                let d = draw();
                let prefix = (d >> 40) as u8 % 9;
                list.push(match d % 4 {
                    0 | 1 => format!("{}/{}", Ipv4Addr::from_bits(v4(d)), 24 + prefix),
                    2 => format!("{}/{}", Ipv6Addr::from_bits(v6(d)), 120 + prefix),
                    _ => format!(
                        "{}/{}",
                        Ipv4Addr::from_bits(v4(d)).to_ipv6_mapped(),
                        120 + prefix
                    ),
                });
            }
            let list = nets(&list.iter().map(String::as_str).collect::<Vec<_>>());
            let set = IpSet::new(&list);
            // Addresses drawn, and each network's ends and their
            // neighbours, where an off-by-one would show.
            let mut addrs: Vec<IpAddr> = (0..5000)
                .map(|_| {
                    let d = draw();
                    if d % 2 == 0 {
                        IpAddr::V4(Ipv4Addr::from_bits(v4(d >> 1)))
                    } else {
                        IpAddr::V6(Ipv6Addr::from_bits(v6(d >> 1)))
                    }
                })
                .collect();
            for net in &list {
                let (first, last) = match net {
                    IpNet::V4(n) => (
                        u128::from(n.network().to_bits()),
                        u128::from(n.broadcast().to_bits()),
                    ),
                    IpNet::V6(n) => (n.network().to_bits(), n.broadcast().to_bits()),
                };
                for x in [first.wrapping_sub(1), first, last, last.wrapping_add(1)] {
                    addrs.push(match net {
                        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from_bits(x as u32)),
                        IpNet::V6(_) => {
                            let a = Ipv6Addr::from_bits(x);
                            // A mapped address is looked up as IPv4.
                            a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4)
                        }
                    });
                }
            }
            for addr in addrs {
                let scan = list.iter().any(|n| {
                    n.contains(&addr)
                        || matches!(addr, IpAddr::V4(a) if n.contains(&IpAddr::V6(a.to_ipv6_mapped())))
                });
                assert_eq!(set.contains(addr), scan, "{addr} in round {round}");
            }
        }
    }

    const XFF: ForwardedHeader = ForwardedHeader::XForwardedFor;
    const FORWARDED: ForwardedHeader = ForwardedHeader::Forwarded;

    #[test]
    fn forwarded_headers_from_untrusted_peers_are_ignored() {
        let h = headers(&[("x-forwarded-for", "1.1.1.1"), ("forwarded", "for=2.2.2.2")]);
        for header in [XFF, FORWARDED] {
            assert_eq!(
                client_addr(ip("203.0.113.5"), &h, &[], header),
                ip("203.0.113.5")
            );
            let trusted = nets(&["10.0.0.0/8"]);
            assert_eq!(
                client_addr(ip("203.0.113.5"), &h, &trusted, header),
                ip("203.0.113.5")
            );
        }
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_client() {
        let trusted = nets(&["10.0.0.0/8"]);
        // client forged 6.6.6.6; real client 198.51.100.7; two proxies.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6, 198.51.100.7"),
            ("x-forwarded-for", "10.0.0.2"),
        ]);
        assert_eq!(
            client_addr(ip("10.0.0.1"), &h, &trusted, XFF),
            ip("198.51.100.7")
        );
        // All hops trusted: the left-most is as far as we can see.
        let h = headers(&[("x-forwarded-for", "10.0.0.3, 10.0.0.2")]);
        assert_eq!(
            client_addr(ip("10.0.0.1"), &h, &trusted, XFF),
            ip("10.0.0.3")
        );
        // No header: the proxy itself.
        assert_eq!(
            client_addr(ip("10.0.0.1"), &HeaderMap::new(), &trusted, XFF),
            ip("10.0.0.1")
        );
        // Garbage stops the walk at the last trusted hop.
        let h = headers(&[("x-forwarded-for", "198.51.100.7, garbage, 10.0.0.2")]);
        assert_eq!(
            client_addr(ip("10.0.0.1"), &h, &trusted, XFF),
            ip("10.0.0.2")
        );
        // A byte the client chose in its own part of the line it sent
        // through a balancer that appends: the balancer's part stands.
        for (name, header, value) in [
            ("x-forwarded-for", XFF, &b"\x80, 203.0.113.7"[..]),
            ("x-forwarded-for", XFF, b"caf\xc3\xa9,203.0.113.7"),
            ("forwarded", FORWARDED, b"for=\x80, for=203.0.113.7"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_bytes(value).unwrap());
            assert_eq!(
                client_addr(ip("10.0.0.1"), &h, &trusted, header),
                ip("203.0.113.7"),
                "{value:?}"
            );
        }
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-proto",
            HeaderValue::from_bytes(b"\x80, https").unwrap(),
        );
        h.insert(
            "forwarded",
            HeaderValue::from_bytes(b"host=\x80, proto=https;host=a.example").unwrap(),
        );
        assert_eq!(forwarded_proto(&h, XFF), Some("https"));
        assert_eq!(forwarded_proto(&h, FORWARDED), Some("https"));
        assert_eq!(forwarded_host(&h), Some(&b"a.example"[..]));
        // Thousands of hops: only the first few from the right are read.
        let many = format!("198.51.100.7, {}10.0.0.4", "10.0.0.3, ".repeat(10_000));
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_str(&many).unwrap());
        assert_eq!(
            client_addr(ip("10.0.0.1"), &h, &trusted, XFF),
            ip("10.0.0.3"),
            "the walk stops after MAX_HOPS trusted hops"
        );
    }

    #[test]
    fn trusted_proxies_written_as_mapped_ipv6_hold_their_ipv4_addresses() {
        let trusted = nets(&["::ffff:10.0.0.0/104"]);
        let h = headers(&[("x-forwarded-for", "198.51.100.7, 10.0.0.2")]);
        for peer in ["10.0.0.1", "::ffff:10.0.0.1"] {
            assert!(is_trusted(ip(peer), &trusted), "{peer}");
            assert_eq!(client_addr(ip(peer), &h, &trusted, XFF), ip("198.51.100.7"));
        }
        assert!(!is_trusted(ip("11.0.0.1"), &trusted));
    }

    #[test]
    fn forwarded_rfc7239() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&[(
            "forwarded",
            "for=6.6.6.6, for=\"[2001:db8:cafe::17]:4711\";proto=https, For=10.0.0.9:80;by=10.0.0.1",
        )]);
        assert_eq!(
            client_addr(ip("10.0.0.1"), &h, &trusted, FORWARDED),
            ip("2001:db8:cafe::17")
        );
        let h = headers(&[("forwarded", "for=unknown")]);
        assert_eq!(
            client_addr(ip("10.0.0.1"), &h, &trusted, FORWARDED),
            ip("10.0.0.1")
        );
    }

    /// A balancer appends to the header it writes and passes the other on
    /// as its client sent it: only the one it writes is read, address,
    /// scheme and host alike.
    #[test]
    fn only_the_header_the_trusted_proxies_write_is_read() {
        let trusted = nets(&["10.0.0.0/8"]);
        // The client sent `Forwarded` (naming an allowed inside address,
        // `https` and another site) through a balancer at 10.0.0.2 that
        // appended its peer to `X-Forwarded-For` and set nothing else.
        let h = headers(&[
            ("forwarded", "for=10.9.9.9;proto=https;host=evil.example"),
            ("x-forwarded-for", "203.0.113.7"),
        ]);
        assert_eq!(
            client_addr(ip("10.0.0.2"), &h, &trusted, XFF),
            ip("203.0.113.7")
        );
        assert_eq!(forwarded_proto(&h, XFF), None);
        // The other way round: a balancer that writes `Forwarded`.
        let h = headers(&[
            ("x-forwarded-for", "10.9.9.9"),
            ("x-forwarded-proto", "https"),
            (
                "forwarded",
                "for=198.51.100.1:8080;proto=http;host=\"shop.example\"",
            ),
        ]);
        assert_eq!(
            client_addr(ip("10.0.0.2"), &h, &trusted, FORWARDED),
            ip("198.51.100.1")
        );
        assert_eq!(forwarded_proto(&h, FORWARDED), Some("http"));
        assert_eq!(forwarded_host(&h), Some(&b"shop.example"[..]));
        assert_eq!(
            forwarded_host(&headers(&[("forwarded", "for=1.2.3.4")])),
            None
        );
    }
}
