//! Header changes a system asks for (`request_headers`,
//! `response_headers`): security headers on every response, a header an
//! instance must not leak, a fixed header an upstream expects.
//!
//! The system's changes and a route's are merged once per configuration,
//! so a request walks one list, and a route with neither pays nothing
//! (an `Option` that is `None`). Names the gateway speaks for or relies on
//! are refused by the rule the manifest checks with
//! ([`flotilla_manifest::reserved_header`]), so a change can never forge an
//! identity, a request id or a CORS answer, nor touch the framing.

use flotilla_manifest::{HeaderDirection, only_added, reserved_header};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::relayed::Fields;

/// Fields to remove, then fields to set (replacing any of that name), then
/// fields to add (beside any of that name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderChanges {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
    pub add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderChanges {
    /// What the manifest validated: names that are tokens and values of
    /// visible ASCII, so every one converts.
    pub fn from_manifest(changes: &flotilla_manifest::HeaderChanges) -> HeaderChanges {
        let fields = |list: &[(String, String)]| -> Vec<(HeaderName, HeaderValue)> {
            list.iter()
                .filter_map(|(name, value)| {
                    Some((
                        HeaderName::from_bytes(name.as_bytes()).ok()?,
                        HeaderValue::from_str(value).ok()?,
                    ))
                })
                .collect()
        };
        HeaderChanges {
            set: fields(&changes.set),
            add: fields(&changes.add),
            remove: changes
                .remove
                .iter()
                .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty() && self.add.is_empty()
    }

    /// The first name the gateway keeps for itself, and why.
    pub(crate) fn reserved(&self, direction: HeaderDirection) -> Option<(String, &'static str)> {
        let mut replaced = self.set.iter().map(|(name, _)| name).chain(&self.remove);
        let added = self.add.iter().map(|(name, _)| name);
        added
            .clone()
            .chain(replaced.clone())
            .find_map(|name| Some((name.to_string(), reserved_header(name.as_str(), direction)?)))
            .or_else(|| {
                replaced.find_map(|name| {
                    Some((name.to_string(), only_added(name.as_str(), direction)?))
                })
            })
    }

    /// The system's changes, then the route's: a name the route sets or
    /// removes is no longer set or added by the system's; what both add is
    /// added twice. `None` when both are empty.
    pub(crate) fn merged(system: &HeaderChanges, route: &HeaderChanges) -> Option<HeaderChanges> {
        if route.is_empty() {
            return (!system.is_empty()).then(|| system.clone());
        }
        let route_names: Vec<&HeaderName> = route
            .set
            .iter()
            .map(|(n, _)| n)
            .chain(&route.remove)
            .collect();
        let mut remove = system.remove.clone();
        for name in &route.remove {
            if !remove.contains(name) {
                remove.push(name.clone());
            }
        }
        let set = system
            .set
            .iter()
            .filter(|(n, _)| !route_names.contains(&n))
            .chain(&route.set)
            .cloned()
            .collect();
        let add = system
            .add
            .iter()
            .filter(|(n, _)| !route_names.contains(&n))
            .chain(&route.add)
            .cloned()
            .collect();
        Some(HeaderChanges { set, remove, add })
    }

    /// On a request, before it is forwarded.
    pub(crate) fn apply_to_request(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }

    /// On a response, relayed or the gateway's own, on its way out.
    pub(crate) fn apply_to_response(&self, fields: &mut Fields<'_>) {
        for name in &self.remove {
            fields.remove(name);
        }
        for (name, value) in &self.set {
            fields.insert_ref(name, value);
        }
        for (name, value) in &self.add {
            fields.append(name.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(set: &[(&'static str, &'static str)], remove: &[&'static str]) -> HeaderChanges {
        HeaderChanges {
            set: set
                .iter()
                .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
                .collect(),
            remove: remove.iter().map(|n| HeaderName::from_static(n)).collect(),
            add: Vec::new(),
        }
    }

    #[test]
    fn the_routes_changes_follow_and_override_the_systems() {
        let system = changes(
            &[("x-frame-options", "DENY"), ("cache-control", "no-store")],
            &["x-powered-by"],
        );
        let route = changes(
            &[("cache-control", "public, max-age=60")],
            &["x-frame-options"],
        );
        let merged = HeaderChanges::merged(&system, &route);
        assert_eq!(
            merged,
            Some(changes(
                &[("cache-control", "public, max-age=60")],
                &["x-powered-by", "x-frame-options"]
            ))
        );
        let alone = HeaderChanges::merged(&system, &HeaderChanges::default());
        assert_eq!(alone, Some(system.clone()));
        let only_route = HeaderChanges::merged(&HeaderChanges::default(), &route);
        assert_eq!(only_route, Some(route));
        assert_eq!(
            HeaderChanges::merged(&HeaderChanges::default(), &HeaderChanges::default()),
            None
        );
    }

    #[test]
    fn removals_come_before_sets_and_a_set_replaces_every_value() {
        let c = changes(&[("x-a", "mine")], &["x-a", "cookie"]);
        let mut h = HeaderMap::new();
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        h.insert("cookie", HeaderValue::from_static("s=1"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        c.apply_to_request(&mut h);
        assert_eq!(h.get_all("x-a").iter().collect::<Vec<_>>(), ["mine"]);
        assert!(h.get("cookie").is_none());
        assert_eq!(h.get("accept").map(|v| v.as_bytes()), Some(&b"*/*"[..]));
    }

    #[test]
    fn an_added_field_goes_beside_the_others_after_the_sets() {
        let mut c = changes(&[("x-b", "set")], &["x-gone"]);
        c.add = vec![
            (
                HeaderName::from_static("x-a"),
                HeaderValue::from_static("added"),
            ),
            (
                HeaderName::from_static("x-b"),
                HeaderValue::from_static("added"),
            ),
        ];
        let mut h = HeaderMap::new();
        h.append("x-a", HeaderValue::from_static("client"));
        h.append("x-b", HeaderValue::from_static("client"));
        h.append("x-gone", HeaderValue::from_static("1"));
        c.apply_to_request(&mut h);
        assert_eq!(
            h.get_all("x-a").iter().collect::<Vec<_>>(),
            ["client", "added"]
        );
        assert_eq!(
            h.get_all("x-b").iter().collect::<Vec<_>>(),
            ["set", "added"]
        );
        assert!(h.get("x-gone").is_none());

        // A route that sets or removes a name takes it from the system's
        // additions; what both add is added twice.
        let system = HeaderChanges {
            add: vec![
                (
                    HeaderName::from_static("vary"),
                    HeaderValue::from_static("Accept-Language"),
                ),
                (
                    HeaderName::from_static("link"),
                    HeaderValue::from_static("</a>"),
                ),
            ],
            ..HeaderChanges::default()
        };
        let mut route = changes(&[("link", "</b>")], &[]);
        route.add = vec![(
            HeaderName::from_static("vary"),
            HeaderValue::from_static("Cookie"),
        )];
        let merged = HeaderChanges::merged(&system, &route).unwrap_or_default();
        assert_eq!(merged.set, route.set);
        let added: Vec<(&str, &[u8])> = merged
            .add
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        assert_eq!(
            added,
            [("vary", &b"Accept-Language"[..]), ("vary", &b"Cookie"[..])]
        );
    }

    #[test]
    fn reserved_names_are_found_in_either_list() {
        let c = changes(&[("x-ok", "1")], &["x-flotilla-user-id"]);
        assert_eq!(
            c.reserved(HeaderDirection::Request).map(|(n, _)| n),
            Some("x-flotilla-user-id".to_string())
        );
        let cors = changes(&[("access-control-allow-origin", "*")], &[]);
        assert!(cors.reserved(HeaderDirection::Response).is_some());
        assert!(cors.reserved(HeaderDirection::Request).is_none());
        let added = HeaderChanges {
            add: vec![(
                HeaderName::from_static("x-request-id"),
                HeaderValue::from_static("x"),
            )],
            ..HeaderChanges::default()
        };
        assert!(added.reserved(HeaderDirection::Response).is_some());

        // `vary` may be added to, not set or removed; `_` spellings are
        // the names they spell.
        let vary = |c: HeaderChanges| c.reserved(HeaderDirection::Response).map(|(n, _)| n);
        assert_eq!(vary(changes(&[("vary", "a")], &[])), Some("vary".into()));
        assert_eq!(vary(changes(&[], &["vary"])), Some("vary".into()));
        let add = HeaderChanges {
            add: vec![(
                HeaderName::from_static("vary"),
                HeaderValue::from_static("a"),
            )],
            ..HeaderChanges::default()
        };
        assert_eq!(vary(add.clone()), None);
        assert!(add.reserved(HeaderDirection::Request).is_none());
        let spelled = changes(&[("x_flotilla_user_id", "admin")], &[]);
        assert!(spelled.reserved(HeaderDirection::Request).is_some());
    }
}
