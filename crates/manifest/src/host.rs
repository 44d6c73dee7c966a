//! Host patterns for routes: which names a request may have asked for.
//!
//! A pattern is a DNS name (`shop.example.com`), matched exactly, or a
//! wildcard (`*.example.com`) that matches every name ending in
//! `.example.com` with at least one label before it (`a.example.com`,
//! `a.b.example.com`, never `example.com` itself), as Kong's and Envoy's
//! wildcard hosts do. Names are compared without regard to ASCII case, and
//! a request's port and trailing dot are not part of its name.
//!
//! When routes for several patterns match, the most specific wins: an exact
//! name beats any wildcard, and a longer wildcard suffix beats a shorter.

use std::cmp::Ordering;
use std::fmt;

/// A parsed, validated host pattern, lower case.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPattern {
    /// The name, or for a wildcard the suffix after `*` (`.example.com`).
    name: String,
    wildcard: bool,
}

/// Why a string is not a valid host pattern; the message says what to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPatternError {
    #[error("a host must not be empty")]
    Empty,
    #[error("`*` alone matches every host: leave `hosts` out instead")]
    Everything,
    #[error("`{0}` has a port: a host matches the name only, whatever the port")]
    Port(String),
    #[error("in `{0}`, `*` may only be the whole first label, as in `*.example.com`")]
    Wildcard(String),
    #[error("`{0}` is longer than the 253 characters a DNS name may have")]
    TooLong(String),
    #[error(
        "`{0}` is not a DNS name: its labels must be 1 to 63 letters, digits or `-`, not starting or ending with `-`"
    )]
    BadName(String),
}

/// Longest DNS name, in its text form without the trailing dot (RFC 1035).
const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;

impl HostPattern {
    /// Parses `shop.example.com` or `*.example.com`; upper-case letters are
    /// taken as lower case and one trailing dot is dropped.
    pub fn parse(source: &str) -> Result<HostPattern, HostPatternError> {
        let lower = source.to_ascii_lowercase();
        let written = lower.strip_suffix('.').unwrap_or(&lower);
        if written.is_empty() {
            return Err(HostPatternError::Empty);
        }
        if written == "*" {
            return Err(HostPatternError::Everything);
        }
        // One colon is a port; more, an IPv6 literal, which is no name.
        if written.matches(':').count() == 1 {
            return Err(HostPatternError::Port(source.to_string()));
        }
        let (wildcard, name) = match written.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, written),
        };
        if name.contains('*') {
            return Err(HostPatternError::Wildcard(source.to_string()));
        }
        if name.len() > MAX_NAME {
            return Err(HostPatternError::TooLong(source.to_string()));
        }
        let label_ok = |label: &str| {
            (1..=MAX_LABEL).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        };
        if !name.split('.').all(label_ok) {
            return Err(HostPatternError::BadName(source.to_string()));
        }
        Ok(HostPattern {
            name: if wildcard {
                format!(".{name}")
            } else {
                name.to_string()
            },
            wildcard,
        })
    }

    /// Whether a request for `host` (its name, without the port) matches.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host).as_bytes();
        let name = self.name.as_bytes();
        if self.wildcard {
            host.len() > name.len() && host[host.len() - name.len()..].eq_ignore_ascii_case(name)
        } else {
            host.eq_ignore_ascii_case(name)
        }
    }

    /// Orders patterns by specificity: `Greater` means `self` is more
    /// specific and wins over `other` when both match the same name.
    pub fn specificity_cmp(&self, other: &HostPattern) -> Ordering {
        match (self.wildcard, other.wildcard) {
            (false, true) => Ordering::Greater,
            (true, false) => Ordering::Less,
            _ => self.name.len().cmp(&other.name.len()),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            write!(f, "*{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

/// The name part of a `Host` header or URI authority: without the port and
/// without an IPv6 literal's port (`[::1]:8080` is `[::1]`).
pub fn host_name(authority: &str) -> &str {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => &authority[..=end],
            None => authority,
        };
    }
    match authority.rfind(':') {
        Some(colon) => &authority[..colon],
        None => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> HostPattern {
        match HostPattern::parse(s) {
            Ok(p) => p,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn exact_names_match_whatever_the_case_and_trailing_dot() {
        let p = h("Shop.Example.com.");
        assert_eq!(p.to_string(), "shop.example.com");
        for yes in ["shop.example.com", "SHOP.example.COM", "shop.example.com."] {
            assert!(p.matches(yes), "{yes}");
        }
        for no in ["example.com", "a.shop.example.com", "shop.example.co", ""] {
            assert!(!p.matches(no), "{no}");
        }
    }

    #[test]
    fn a_wildcard_matches_one_label_or_more_but_not_the_bare_suffix() {
        let p = h("*.example.com");
        assert_eq!(p.to_string(), "*.example.com");
        for yes in ["a.example.com", "a.b.example.com", "A.EXAMPLE.com"] {
            assert!(p.matches(yes), "{yes}");
        }
        for no in [
            "example.com",
            ".example.com",
            "aexample.com",
            "example.com.evil",
        ] {
            assert!(!p.matches(no), "{no}");
        }
        // Bytes, not chars: a non-ASCII host neither panics nor matches.
        assert!(!p.matches("é.example.co"));
        assert!(!h("a.b").matches("ééé"));
    }

    #[test]
    fn exact_beats_wildcard_and_a_longer_suffix_beats_a_shorter() {
        let exact = h("a.b.example.com");
        let long = h("*.b.example.com");
        let short = h("*.example.com");
        assert_eq!(exact.specificity_cmp(&long), Ordering::Greater);
        assert_eq!(long.specificity_cmp(&short), Ordering::Greater);
        assert_eq!(short.specificity_cmp(&exact), Ordering::Less);
        assert_eq!(short.specificity_cmp(&short), Ordering::Equal);
    }

    #[test]
    fn invalid_hosts_say_what_to_write() {
        use HostPatternError::*;
        let cases = [
            ("", Empty),
            (".", Empty),
            ("*", Everything),
            ("example.com:8443", Port("example.com:8443".into())),
            ("[::1]", BadName("[::1]".into())),
            ("::1", BadName("::1".into())),
            ("example.*", Wildcard("example.*".into())),
            ("a.*.com", Wildcard("a.*.com".into())),
            ("*example.com", Wildcard("*example.com".into())),
            ("**.example.com", Wildcard("**.example.com".into())),
            ("-a.example.com", BadName("-a.example.com".into())),
            ("a..com", BadName("a..com".into())),
            ("a_b.com", BadName("a_b.com".into())),
            ("exämple.com", BadName("exämple.com".into())),
            ("*.", Everything),
            ("*..", BadName("*..".into())),
        ];
        for (input, want) in cases {
            assert_eq!(HostPattern::parse(input), Err(want), "{input:?}");
        }
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(matches!(HostPattern::parse(&long_label), Err(BadName(_))));
        let long_name = ["abcdefghi"; 26].join(".");
        assert!(matches!(HostPattern::parse(&long_name), Err(TooLong(_))));
        // IPv4 literals are names as far as matching goes.
        assert!(h("127.0.0.1").matches("127.0.0.1"));
    }

    #[test]
    fn the_port_is_not_part_of_the_name() {
        assert_eq!(host_name("shop.example.com:8443"), "shop.example.com");
        assert_eq!(host_name("shop.example.com"), "shop.example.com");
        assert_eq!(host_name("[::1]:8080"), "[::1]");
        assert_eq!(host_name("[::1]"), "[::1]");
        assert_eq!(host_name("[::1"), "[::1");
        assert_eq!(host_name(""), "");
    }
}
