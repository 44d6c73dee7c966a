//! Path patterns for routes (and, later, ACL rules): one syntax everywhere a
//! manifest names a set of request paths.
//!
//! A pattern is a sequence of `/`-separated segments. A literal segment
//! matches itself, `*` matches exactly one segment, and `**` (allowed only
//! last) matches zero or more segments, so `/api/orders/**` covers
//! `/api/orders` itself as well as everything below it.
//!
//! A literal is matched against the path as the gateway and the mesh
//! normalise it (escapes of letters, digits and `-._~` decoded, the rest
//! kept encoded), so a literal that no normalised path can hold is refused:
//! one with `;` or `\` (such paths are refused with 400 `bad_path`), `%`,
//! or a character clients send percent-encoded (non-ASCII, `"`, `<`, `>`,
//! `` ` ``, `{`, `}`). Placeholders of other routers (`{id}`, `:id`,
//! `<id>`) would match only themselves; `*` is the segment wildcard here.
//!
//! When several patterns match, the *most specific* wins, never the first
//! listed: patterns are compared segment by segment, a literal beats `*`,
//! `*` beats `**`, and a longer exact pattern beats a shorter one. Two
//! different valid patterns never tie, so the winner is always well defined.

use std::cmp::Ordering;
use std::fmt;

/// A parsed, validated path pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PathPattern {
    source: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Segment {
    Literal(String),
    One,
    Rest,
}

impl Segment {
    /// Rank within one position: higher is more specific.
    fn rank(&self) -> u8 {
        match self {
            Segment::Literal(_) => 2,
            Segment::One => 1,
            Segment::Rest => 0,
        }
    }
}

/// Why a string is not a valid path pattern; the message says what to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("a path pattern must start with `/`")]
    NoLeadingSlash,
    #[error("empty segment (`//`) in the path")]
    EmptySegment,
    #[error("`**` may only be the last segment of a path pattern")]
    RestNotLast,
    #[error("`{segment}` mixes `*` with other characters; `*` and `**` must be whole segments")]
    PartialWildcard { segment: String },
    #[error("a `{segment}` segment is not allowed; write the normalised path")]
    DotSegment { segment: String },
    #[error(
        "`{segment}` contains characters that are not allowed in a path (`?`, `#`, `%`, `;`, `\\`, spaces or control characters)"
    )]
    BadCharacter { segment: String },
    #[error(
        "`{segment}` has characters clients send percent-encoded (non-ASCII, `\"`, `<`, `>`, `` ` ``, `{{`, `}}`), so no request path could match it"
    )]
    Encoded { segment: String },
    #[error(
        "`{segment}` is not a placeholder here: it would match only itself; use `*` for one segment"
    )]
    Placeholder { segment: String },
}

/// `{id}`, `<id>` or `:id`: another router's way to name a segment.
fn is_placeholder(segment: &str) -> bool {
    let inner = |s: &str| !s.is_empty();
    segment
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .or_else(|| segment.strip_prefix('<').and_then(|s| s.strip_suffix('>')))
        .is_some_and(inner)
        || segment
            .strip_prefix(':')
            .and_then(|s| s.chars().next())
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
}

impl PathPattern {
    /// Parses a pattern such as `/api/catalog/**` or `/api/orders/*`.
    pub fn parse(source: &str) -> Result<Self, PatternError> {
        let rest = source
            .strip_prefix('/')
            .ok_or(PatternError::NoLeadingSlash)?;
        // A trailing slash names the same pattern: `/a/` is `/a`.
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let mut segments = Vec::new();
        if !rest.is_empty() {
            let parts: Vec<&str> = rest.split('/').collect();
            for (i, part) in parts.iter().enumerate() {
                let last = i + 1 == parts.len();
                let segment = match *part {
                    "" => return Err(PatternError::EmptySegment),
                    "**" if last => Segment::Rest,
                    "**" => return Err(PatternError::RestNotLast),
                    "*" => Segment::One,
                    "." | ".." => {
                        return Err(PatternError::DotSegment {
                            segment: part.to_string(),
                        });
                    }
                    p if p.contains('*') => {
                        return Err(PatternError::PartialWildcard {
                            segment: p.to_string(),
                        });
                    }
                    p if is_placeholder(p) => {
                        return Err(PatternError::Placeholder {
                            segment: p.to_string(),
                        });
                    }
                    p if p
                        .chars()
                        .any(|c| c.is_control() || c.is_whitespace() || "?#%;\\".contains(c)) =>
                    {
                        return Err(PatternError::BadCharacter {
                            segment: p.to_string(),
                        });
                    }
                    p if p.chars().any(|c| !c.is_ascii() || "\"<>`{}".contains(c)) => {
                        return Err(PatternError::Encoded {
                            segment: p.to_string(),
                        });
                    }
                    p => Segment::Literal(p.to_string()),
                };
                segments.push(segment);
            }
        }
        Ok(PathPattern {
            source: source.to_string(),
            segments,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `path` (a request path without query string) matches.
    ///
    /// The path is compared segment by segment as given; callers that must
    /// defend against `//`, `/./` or percent-encoded dots normalise first.
    pub fn matches(&self, path: &str) -> bool {
        let path = path.strip_prefix('/').unwrap_or(path);
        let mut parts = path.split('/').filter(|s| !s.is_empty());
        for segment in &self.segments {
            match segment {
                Segment::Rest => return true,
                Segment::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(lit) => match parts.next() {
                    Some(p) if p == lit => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }

    /// Orders patterns by specificity: `Greater` means `self` is more
    /// specific and wins over `other` when both match.
    pub fn specificity_cmp(&self, other: &Self) -> Ordering {
        for (a, b) in self.segments.iter().zip(other.segments.iter()) {
            match a.rank().cmp(&b.rank()) {
                Ordering::Equal => {}
                unequal => return unequal,
            }
        }
        // Same shape on the common prefix: the longer pattern is more
        // specific, except that a trailing `**` makes a pattern broader
        // than the same prefix without it (`/a` beats `/a/**`).
        let self_len = self.exact_len();
        let other_len = other.exact_len();
        match self_len.cmp(&other_len) {
            Ordering::Equal => {
                let self_rest = matches!(self.segments.last(), Some(Segment::Rest));
                let other_rest = matches!(other.segments.last(), Some(Segment::Rest));
                // `false > true`: no trailing `**` is more specific.
                other_rest
                    .cmp(&self_rest)
                    .then_with(|| other.source.cmp(&self.source))
            }
            unequal => unequal,
        }
    }

    /// Whether the two patterns are the same set of paths written alike
    /// (used to reject duplicate routes).
    pub fn same_as(&self, other: &Self) -> bool {
        self.segments == other.segments
    }

    /// Whether `prefix` is this pattern's first segments, written alike
    /// (`/t/*` starts `/t/*/orders/**`), and has no `**`: a path that
    /// matches this pattern then starts with segments `prefix` matches.
    pub fn starts_with(&self, prefix: &Self) -> bool {
        !prefix.segments.contains(&Segment::Rest)
            && self.segments.len() >= prefix.segments.len()
            && self.segments[..prefix.segments.len()] == prefix.segments[..]
    }

    /// How many segments the pattern has (`**` counted as one).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// This pattern without its first `n` segments: the paths an instance
    /// sees when the gateway strips them (`/api/legacy/**` less two is
    /// `/**`, `/api/legacy` less two is `/`).
    pub fn without_prefix(&self, n: usize) -> PathPattern {
        let segments: Vec<Segment> = self.segments.iter().skip(n).cloned().collect();
        let mut source = String::new();
        for segment in &segments {
            source.push('/');
            source.push_str(match segment {
                Segment::Literal(l) => l,
                Segment::One => "*",
                Segment::Rest => "**",
            });
        }
        if source.is_empty() {
            source.push('/');
        }
        PathPattern { source, segments }
    }

    fn exact_len(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| !matches!(s, Segment::Rest))
            .count()
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathPattern {
        PathPattern::parse(s).unwrap()
    }

    #[test]
    fn literal_and_wildcards_match() {
        assert!(p("/api/catalog").matches("/api/catalog"));
        assert!(!p("/api/catalog").matches("/api/catalog/x"));
        assert!(p("/api/*/x").matches("/api/a/x"));
        assert!(!p("/api/*/x").matches("/api/x"));
        assert!(p("/api/orders/**").matches("/api/orders"));
        assert!(p("/api/orders/**").matches("/api/orders/1/lines"));
        assert!(!p("/api/orders/**").matches("/api/ordersx"));
        assert!(p("/**").matches("/"));
        assert!(p("/**").matches("/anything/at/all"));
        assert!(p("/").matches("/"));
        assert!(!p("/").matches("/a"));
    }

    #[test]
    fn most_specific_wins_whatever_the_order() {
        let mut pats = [
            p("/**"),
            p("/api/**"),
            p("/api/*/x"),
            p("/api/a/*"),
            p("/api/a/x"),
        ];
        pats.sort_by(|a, b| b.specificity_cmp(a));
        let order: Vec<_> = pats.iter().map(|p| p.as_str()).collect();
        assert_eq!(
            order,
            ["/api/a/x", "/api/a/*", "/api/*/x", "/api/**", "/**"]
        );
        assert_eq!(p("/a").specificity_cmp(&p("/a/**")), Ordering::Greater);
        assert_eq!(p("/a/*").specificity_cmp(&p("/a/**")), Ordering::Greater);
    }

    #[test]
    fn invalid_patterns_say_why() {
        assert_eq!(PathPattern::parse("api"), Err(PatternError::NoLeadingSlash));
        assert_eq!(PathPattern::parse("/a//b"), Err(PatternError::EmptySegment));
        assert_eq!(
            PathPattern::parse("/a/**/b"),
            Err(PatternError::RestNotLast)
        );
        assert!(matches!(
            PathPattern::parse("/a/b*"),
            Err(PatternError::PartialWildcard { .. })
        ));
        assert!(matches!(
            PathPattern::parse("/a/../b"),
            Err(PatternError::DotSegment { .. })
        ));
        assert!(matches!(
            PathPattern::parse("/a b"),
            Err(PatternError::BadCharacter { .. })
        ));
    }

    /// What the gateway refuses (`;`, `\`) or only ever sees encoded
    /// (non-ASCII, `{`) could never match; placeholders of other routers
    /// would match only themselves.
    #[test]
    fn literals_no_normalised_path_holds_are_refused() {
        for bad in ["/a;b", "/a\\b", "/a/%41", "/x;jsessionid=1"] {
            assert!(
                matches!(
                    PathPattern::parse(bad),
                    Err(PatternError::BadCharacter { .. })
                ),
                "{bad}"
            );
        }
        for bad in ["/caf\u{e9}", "/a\"b", "/a<b", "/a`b", "/a{b"] {
            assert!(
                matches!(PathPattern::parse(bad), Err(PatternError::Encoded { .. })),
                "{bad}"
            );
        }
        for bad in ["/users/{id}", "/users/:id", "/users/<id>", "/x/:_y/z"] {
            let e = PathPattern::parse(bad).unwrap_err();
            assert!(matches!(e, PatternError::Placeholder { .. }), "{bad}");
            assert!(e.to_string().contains("use `*` for one segment"), "{e}");
        }
        for good in [
            "/v1/things:batchGet",
            "/a-b_c~d.e",
            "/a:",
            "/~user/(x)/[y]/a|b/@me/$1!",
        ] {
            assert!(PathPattern::parse(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn a_prefix_is_leading_segments_written_alike_and_can_be_taken_off() {
        let pattern = p("/t/*/orders/**");
        assert!(pattern.starts_with(&p("/t")));
        assert!(pattern.starts_with(&p("/t/*")));
        assert!(pattern.starts_with(&p("/t/*/orders/")));
        assert!(!pattern.starts_with(&p("/t/acme")));
        assert!(
            !pattern.starts_with(&p("/t/*/orders/**")),
            "no `**` in a prefix"
        );
        assert!(!pattern.starts_with(&p("/u")));
        assert!(!p("/t").starts_with(&p("/t/x")));
        assert_eq!(pattern.without_prefix(2).as_str(), "/orders/**");
        assert_eq!(pattern.without_prefix(3).as_str(), "/**");
        assert_eq!(p("/api/legacy").without_prefix(2).as_str(), "/");
        assert!(pattern.without_prefix(2).same_as(&p("/orders/**")));
        assert!(p("/api/legacy").without_prefix(2).matches("/"));
        assert_eq!(pattern.segment_count(), 4);
    }

    #[test]
    fn trailing_slash_is_the_same_pattern() {
        assert!(p("/a/").same_as(&p("/a")));
        assert!(!p("/a/*").same_as(&p("/a/**")));
    }
}
