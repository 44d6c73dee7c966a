//! Sending a client's requests to the same instance (a route's
//! `affinity`), by rendezvous hashing.
//!
//! What keeps a client together (its address, its user, a header or a
//! cookie) is hashed once per request; each ready instance is scored by a
//! hash of that and its name, and the highest score among the candidates
//! wins. Rendezvous (highest-random-weight) hashing rather than a ring:
//! with the handful of instances a service has, scoring each is as cheap
//! as a ring lookup, needs no table to rebuild when instances come and
//! go, and moves only the keys of an instance that leaves (ejected,
//! scaled down) or the share a new one takes. A retry skips the instances
//! tried, so it goes to the key's next choice, the same one every time.
//!
//! The scores depend on instance names and the key only, not on the
//! order or number of the gateway's threads, so every worker and every
//! replica of one build sends a key to the same instance.
//!
//! Written here rather than taken from a crate: the whole algorithm is a
//! maximum over a keyed hash, and the hash (foldhash, fixed seeds) is one
//! the gateway already uses.

use std::hash::BuildHasher;
use std::net::IpAddr;

use flotilla_manifest::Affinity;
use foldhash::quality::FixedState;
use http::{HeaderMap, HeaderValue};
use rand::RngCore;

use crate::headers;
use crate::ip;
use crate::jwt::Identity;

/// Seeds the key's hash: any fixed value, the same in every replica.
const KEY_SEED: u64 = 0x666c_6f74_696c_6c61; // "flotilla"

/// What a request is kept on an instance by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sticky {
    /// The key's hash; `None` when the request carries none, and is then
    /// balanced as on any route.
    pub hash: Option<u64>,
    /// A cookie the gateway made up for a client that had none, to set on
    /// the response.
    pub set_cookie: Option<HeaderValue>,
}

/// The key of `affinity` for a request from `client` (by its address
/// block: an IPv6 client's /64) with `headers`, and `identity`, its
/// verified user or consumer if any. `https`: whether the client's
/// connection is, for a made-up cookie's `Secure`.
pub(crate) fn sticky(
    affinity: &Affinity,
    client: IpAddr,
    identity: Option<&Identity>,
    headers: &HeaderMap,
    https: bool,
) -> Sticky {
    let keyed = |bytes: &[u8]| Sticky {
        hash: Some(key_hash(bytes)),
        set_cookie: None,
    };
    let none = Sticky {
        hash: None,
        set_cookie: None,
    };
    match affinity {
        Affinity::Ip => match ip::host_block(client) {
            IpAddr::V4(v4) => keyed(&v4.octets()),
            IpAddr::V6(v6) => keyed(&v6.octets()),
        },
        Affinity::User => identity.map_or(none, |i| keyed(i.rate_key.as_bytes())),
        Affinity::Header(name) => {
            crate::jwt::request_field(headers, identity, name).map_or(none, |v| keyed(v.as_bytes()))
        }
        Affinity::Cookie(name) => match headers::cookie(headers, name) {
            Some(value) => keyed(value),
            None => {
                let value = new_cookie_value();
                let secure = if https { "; Secure" } else { "" };
                let set = format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax{secure}");
                Sticky {
                    hash: Some(key_hash(value.as_bytes())),
                    // The name is a token (validated) and the value hex.
                    set_cookie: HeaderValue::from_str(&set).ok(),
                }
            }
        },
    }
}

/// 128 random bits in hex: a made-up cookie no two clients share.
fn new_cookie_value() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn key_hash(bytes: &[u8]) -> u64 {
    FixedState::with_seed(KEY_SEED).hash_one(bytes)
}

/// `instance`'s score for the key hashed to `key`: the instance with the
/// highest score among those that may take the request gets it.
pub(crate) fn score(key: u64, instance: &str) -> u64 {
    FixedState::with_seed(key).hash_one(instance.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::Ipv6Addr;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    /// The instance of `names` a key goes to.
    fn owner<'a>(key: u64, names: &[&'a str]) -> &'a str {
        names.iter().copied().max_by_key(|n| score(key, n)).unwrap()
    }

    #[test]
    fn a_missing_cookie_is_made_up_and_set() {
        let affinity = Affinity::Cookie("sticky".into());
        let client = IpAddr::from([10, 0, 0, 1]);
        let made = sticky(&affinity, client, None, &HeaderMap::new(), true);
        let set = made.set_cookie.expect("a cookie to set");
        let set = set.to_str().unwrap();
        let value = set
            .strip_prefix("sticky=")
            .and_then(|rest| rest.split(';').next())
            .unwrap();
        assert_eq!(value.len(), 32, "{set}");
        assert!(
            set.ends_with("; Path=/; HttpOnly; SameSite=Lax; Secure"),
            "{set}"
        );
        // The client's next request, carrying it, goes where this one did.
        let back = headers(&[("cookie", &format!("sticky={value}"))]);
        let again = sticky(&affinity, client, None, &back, true);
        assert_eq!((again.hash, again.set_cookie), (made.hash, None));
        // Over plain HTTP the cookie is not `Secure` (a browser would
        // never send it back).
        let plain = sticky(&affinity, client, None, &HeaderMap::new(), false);
        assert!(
            !plain
                .set_cookie
                .unwrap()
                .to_str()
                .unwrap()
                .contains("Secure")
        );
    }

    #[test]
    fn keys_come_from_what_the_affinity_names() {
        let h = headers(&[("x-cart", "c1")]);
        let v4 = IpAddr::from([10, 0, 0, 1]);
        let by_header = sticky(&Affinity::Header("x-cart".into()), v4, None, &h, false);
        assert!(by_header.hash.is_some() && by_header.set_cookie.is_none());
        let missing = sticky(&Affinity::Header("x-other".into()), v4, None, &h, false);
        assert_eq!(missing.hash, None);
        // An identity field is the verified caller's (not among the
        // request's fields): the same key as by user's name.
        let partner = Identity::consumer("partner");
        let by_id = Affinity::Header("x-flotilla-user-id".into());
        let id_hash = sticky(&by_id, v4, Some(&partner), &h, false).hash;
        assert!(id_hash.is_some());
        let sent = headers(&[("x-flotilla-user-id", "partner")]);
        assert_eq!(sticky(&by_id, v4, None, &sent, false).hash, id_hash);
        assert_eq!(sticky(&by_id, v4, None, &h, false).hash, None);
        // No user: balanced freely, not by address.
        assert_eq!(sticky(&Affinity::User, v4, None, &h, false).hash, None);
        let user = Identity::consumer("partner");
        let by_user = sticky(&Affinity::User, v4, Some(&user), &h, false);
        assert!(by_user.hash.is_some());
        // One IPv6 client's /64 is one key.
        let a = IpAddr::from("2001:db8:1:2::1".parse::<Ipv6Addr>().unwrap());
        let b = IpAddr::from("2001:db8:1:2:ffff::9".parse::<Ipv6Addr>().unwrap());
        let c = IpAddr::from("2001:db8:1:3::1".parse::<Ipv6Addr>().unwrap());
        let by_ip = |ip| sticky(&Affinity::Ip, ip, None, &h, false).hash;
        assert_eq!(by_ip(a), by_ip(b));
        assert_ne!(by_ip(a), by_ip(c));
    }

    #[test]
    fn keys_spread_evenly_and_only_a_leaving_instance_s_keys_move() {
        let four = ["cart-0", "cart-1", "cart-2", "cart-3"];
        let keys: Vec<u64> = (0..8000)
            .map(|i| key_hash(format!("user-{i}").as_bytes()))
            .collect();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for k in &keys {
            *counts.entry(owner(*k, &four)).or_default() += 1;
        }
        for name in four {
            // 2000 expected each; a fair split stays well within ±15 %.
            let n = counts[name];
            assert!(
                (1700..=2300).contains(&n),
                "{name}: {n} of 8000 ({counts:?})"
            );
        }
        // cart-2 leaves: its keys spread over the rest, no other key moves.
        let three = ["cart-0", "cart-1", "cart-3"];
        for k in &keys {
            let before = owner(*k, &four);
            if before != "cart-2" {
                assert_eq!(owner(*k, &three), before);
            }
        }
        // A fifth joins: it takes keys only from the others, about a fifth.
        let five = ["cart-0", "cart-1", "cart-2", "cart-3", "cart-4"];
        let mut moved = 0;
        for k in &keys {
            let after = owner(*k, &five);
            if after != owner(*k, &four) {
                assert_eq!(after, "cart-4");
                moved += 1;
            }
        }
        assert!((1300..=1900).contains(&moved), "{moved} of 8000 moved");
    }
}
