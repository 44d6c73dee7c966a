//! CloudEvents 1.0 in the structured JSON format, validated once at the edge.
//!
//! Everything the broker stores and delivers is a CloudEvent. The broker
//! never rewrites an event: it keeps the publisher's JSON bytes verbatim and
//! only extracts the context attributes it needs to route (filters, partition
//! keys, FIFO groups, deduplication). Parsing borrows from the input so that
//! `data` is scanned, not copied into a tree.

use std::collections::HashMap;
use std::fmt;

use bytes::Bytes;
use serde_json::value::RawValue;

/// The only CloudEvents version this broker speaks.
pub const SPEC_VERSION: &str = "1.0";

/// Media type of one event in the structured JSON format.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// Media type of a JSON array of events (the batch format).
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// Why a body is not an acceptable CloudEvent or batch of them.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("event{} is {size} bytes, over the limit of {limit} bytes", at(*.index))]
    TooLarge {
        index: Option<usize>,
        size: usize,
        limit: usize,
    },
    #[error("batch has more than {limit} events")]
    BatchTooLarge { limit: usize },
    #[error("batch is empty: send at least one event")]
    EmptyBatch,
    #[error("body is not JSON{}", at(*.index))]
    Json {
        index: Option<usize>,
        #[source]
        source: serde_json::Error,
    },
    #[error("event{} is missing the required attribute `{attribute}`", at(*.index))]
    Missing {
        index: Option<usize>,
        attribute: &'static str,
    },
    #[error("event{}: attribute `{attribute}` {problem}", at(*.index))]
    Invalid {
        index: Option<usize>,
        attribute: String,
        problem: &'static str,
    },
    #[error("event{}: specversion `{found}` is not supported, use \"1.0\"", at(*.index))]
    SpecVersion { index: Option<usize>, found: String },
}

/// `%XX` sequences decoded; `None` if malformed or not UTF-8.
fn percent_decode(raw: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = std::str::from_utf8(raw.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn at(index: Option<usize>) -> String {
    index.map(|i| format!(" #{i}")).unwrap_or_default()
}

impl EventError {
    fn with_index(self, i: usize) -> Self {
        let index = Some(i);
        match self {
            Self::TooLarge { size, limit, .. } => Self::TooLarge { index, size, limit },
            Self::Json { source, .. } => Self::Json { index, source },
            Self::Missing { attribute, .. } => Self::Missing { index, attribute },
            Self::Invalid {
                attribute, problem, ..
            } => Self::Invalid {
                index,
                attribute,
                problem,
            },
            Self::SpecVersion { found, .. } => Self::SpecVersion { index, found },
            other => other,
        }
    }
}

/// Reads a batch's JSON array into its items, failing at the first item
/// past `max` (and noting so in `over`).
struct BatchItems<'c> {
    max: usize,
    over: &'c std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for BatchItems<'_> {
    type Value = Vec<&'de RawValue>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for BatchItems<'_> {
    type Value = Vec<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array of CloudEvents")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<&'de RawValue>()? {
            if items.len() == self.max {
                self.over.set(true);
                return Err(serde::de::Error::custom("too many events"));
            }
            items.push(item);
        }
        Ok(items)
    }
}

/// The value of a context attribute (CloudEvents' JSON types minus null).
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    String(String),
    Number(f64),
    Bool(bool),
}

impl AttrValue {
    /// The attribute as text, the way it would appear in an HTTP header.
    pub fn to_text(&self) -> String {
        match self {
            Self::String(s) => s.clone(),
            Self::Number(n) => format_number(*n),
            Self::Bool(b) => b.to_string(),
        }
    }

    /// The attribute as a number, for numeric filters: numbers, and strings
    /// that parse as numbers (CloudEvents extensions often carry numbers as
    /// strings).
    pub fn as_number(&self) -> Option<f64> {
        match self {
            Self::Number(n) => Some(*n),
            Self::String(s) => s.trim().parse().ok(),
            Self::Bool(_) => None,
        }
    }
}

fn format_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

/// One validated CloudEvent: the publisher's JSON bytes plus its context
/// attributes.
#[derive(Clone)]
pub struct CloudEvent {
    raw: Bytes,
    attributes: Vec<(String, AttrValue)>,
}

impl fmt::Debug for CloudEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudEvent")
            .field("id", &self.id())
            .field("type", &self.ty())
            .field("bytes", &self.raw.len())
            .finish()
    }
}

impl CloudEvent {
    /// Parses one event in the structured JSON format.
    pub fn parse(body: Bytes, max_bytes: usize) -> Result<Self, EventError> {
        let trimmed = trim(&body);
        if trimmed.len() > max_bytes {
            return Err(EventError::TooLarge {
                index: None,
                size: trimmed.len(),
                limit: max_bytes,
            });
        }
        let raw = body.slice_ref(trimmed);
        let attributes = parse_attributes(&raw)?;
        Ok(Self { raw, attributes })
    }

    /// Builds an event sent in the HTTP binary content mode: the context
    /// attributes in `ce-*` headers (percent-decoded, as the HTTP binding
    /// says), the body as `data` with its `content-type` as
    /// `datacontenttype`. The broker stores it in the structured form, so
    /// every consumer reads one format: a JSON body becomes `data`, a UTF-8
    /// `text/*` body a string, anything else `data_base64`.
    pub fn from_binary(
        headers: &http::HeaderMap,
        body: &[u8],
        max_bytes: usize,
    ) -> Result<Self, EventError> {
        use base64::Engine as _;
        let content_type = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let essence = content_type
            .as_deref()
            .and_then(|c| c.split(';').next())
            .map(|c| c.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let json = essence == "application/json" || essence.ends_with("+json");
        // The body is the event's data. Base64-encoded (not JSON) it only
        // grows, so a body over the limit makes an event over it. JSON is
        // validated and written back compact, which shrinks a pretty-printed
        // body: it may be up to four times the limit. Either way it is
        // refused before it is read any further.
        let allowed = if json {
            max_bytes.saturating_mul(4)
        } else {
            max_bytes
        };
        if body.len() > allowed {
            return Err(EventError::TooLarge {
                index: None,
                size: body.len(),
                limit: max_bytes,
            });
        }
        let mut event = serde_json::Map::new();
        for (name, value) in headers {
            let Some(attr) = name.as_str().strip_prefix("ce-") else {
                continue;
            };
            let text = percent_decode(value.as_bytes()).ok_or_else(|| EventError::Invalid {
                index: None,
                attribute: attr.to_owned(),
                problem: "is not valid percent-encoded UTF-8 in its ce- header",
            })?;
            event.insert(attr.to_owned(), serde_json::Value::String(text));
        }
        // JSON data is spliced in as the compact bytes of the body, never
        // built into a tree: a 4 MiB body of `[0,0,...]` is two million
        // 32-byte `serde_json::Value`s, 64 MiB, per request.
        let mut json_data = None;
        if !body.is_empty() {
            let data = if json {
                json_data = Some(compact_json(body)?);
                event.remove("data");
                event.remove("data_base64");
                None
            } else if essence.starts_with("text/")
                && let Ok(text) = std::str::from_utf8(body)
            {
                Some(("data", serde_json::Value::String(text.to_owned())))
            } else {
                Some((
                    "data_base64",
                    serde_json::Value::String(
                        base64::engine::general_purpose::STANDARD.encode(body),
                    ),
                ))
            };
            if let Some((name, value)) = data {
                event.insert(name.to_owned(), value);
            }
        }
        if let Some(ct) = content_type {
            event.insert("datacontenttype".into(), serde_json::Value::String(ct));
        }
        let mut bytes = serde_json::to_vec(&event).map_err(|source| EventError::Json {
            index: None,
            source,
        })?;
        if let Some(data) = json_data {
            // `{...}` becomes `{...,"data":<data>}`.
            bytes.pop();
            if !event.is_empty() {
                bytes.push(b',');
            }
            bytes.extend_from_slice(br#""data":"#);
            bytes.extend_from_slice(&data);
            bytes.push(b'}');
        }
        Self::parse(Bytes::from(bytes), max_bytes)
    }

    /// Parses a batch (a JSON array of structured events).
    pub fn parse_batch(
        body: &[u8],
        max_bytes: usize,
        max_events: usize,
    ) -> Result<Vec<Self>, EventError> {
        // The cap is enforced while the array is read: parsed whole first, a
        // 16 MiB body of `[0,0,...]` was millions of entries before it was
        // refused.
        let over = std::cell::Cell::new(false);
        let mut de = serde_json::Deserializer::from_slice(body);
        let items = serde::de::DeserializeSeed::deserialize(
            BatchItems {
                max: max_events,
                over: &over,
            },
            &mut de,
        )
        .and_then(|items| de.end().map(|()| items))
        .map_err(|source| {
            if over.get() {
                EventError::BatchTooLarge { limit: max_events }
            } else {
                EventError::Json {
                    index: None,
                    source,
                }
            }
        })?;
        if items.is_empty() {
            return Err(EventError::EmptyBatch);
        }
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let text = item.get().as_bytes();
                if text.len() > max_bytes {
                    return Err(EventError::TooLarge {
                        index: Some(i),
                        size: text.len(),
                        limit: max_bytes,
                    });
                }
                let raw = Bytes::copy_from_slice(text);
                let attributes = parse_attributes(&raw).map_err(|e| e.with_index(i))?;
                Ok(Self { raw, attributes })
            })
            .collect()
    }

    /// Builds an event from parts; `data` is embedded as JSON.
    ///
    /// Extensions must be valid attribute names; invalid input is rejected
    /// exactly as it would be over HTTP.
    pub fn new(
        id: &str,
        source: &str,
        ty: &str,
        extensions: &[(&str, &str)],
        data: &serde_json::Value,
    ) -> Result<Self, EventError> {
        let mut obj = serde_json::Map::new();
        obj.insert("specversion".into(), SPEC_VERSION.into());
        obj.insert("id".into(), id.into());
        obj.insert("source".into(), source.into());
        obj.insert("type".into(), ty.into());
        obj.insert("datacontenttype".into(), "application/json".into());
        for (k, v) in extensions {
            obj.insert((*k).to_owned(), (*v).into());
        }
        obj.insert("data".into(), data.clone());
        let raw = serde_json::to_vec(&obj).map_err(|source| EventError::Json {
            index: None,
            source,
        })?;
        Self::parse(Bytes::from(raw), usize::MAX)
    }

    /// The event's JSON bytes, exactly as published.
    pub fn as_bytes(&self) -> &Bytes {
        &self.raw
    }

    /// Consumes the event, returning its JSON bytes.
    pub fn into_bytes(self) -> Bytes {
        self.raw
    }

    /// A context attribute or extension by name.
    pub fn attribute(&self, name: &str) -> Option<&AttrValue> {
        self.attributes
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    fn text(&self, name: &str) -> &str {
        match self.attribute(name) {
            Some(AttrValue::String(s)) => s,
            _ => "",
        }
    }

    /// The `id` attribute.
    pub fn id(&self) -> &str {
        self.text("id")
    }

    /// The `source` attribute.
    pub fn source(&self) -> &str {
        self.text("source")
    }

    /// The `type` attribute.
    pub fn ty(&self) -> &str {
        self.text("type")
    }

    /// The W3C trace context carried in the `traceparent` extension.
    pub fn traceparent(&self) -> Option<&str> {
        match self.attribute("traceparent") {
            Some(AttrValue::String(s)) => Some(s),
            _ => None,
        }
    }

    /// CloudEvents defines `source` + `id` as the identity of an event: two
    /// events with the same pair are duplicates. This is the FIFO
    /// deduplication key.
    pub fn dedup_key(&self) -> String {
        format!("{}\u{0}{}", self.source(), self.id())
    }

    /// The partition or group key named by `attribute`, as text.
    pub fn key(&self, attribute: &str) -> Option<String> {
        self.attribute(attribute).map(AttrValue::to_text)
    }
}

/// A JSON document checked and written back without the whitespace between
/// its tokens, in one pass over its bytes and no tree. Strings, numbers and
/// escapes are kept as sent.
fn compact_json(body: &[u8]) -> Result<Vec<u8>, EventError> {
    // `IgnoredAny` checks the grammar (and the nesting limit) but not the
    // UTF-8 of strings, which must be checked apart.
    let text = std::str::from_utf8(body).map_err(|_| EventError::Invalid {
        index: None,
        attribute: "data".into(),
        problem: "is not UTF-8, as a JSON body must be",
    })?;
    serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|source| EventError::Json {
        index: None,
        source,
    })?;
    let mut out = Vec::with_capacity(body.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in body {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            continue;
        } else if b == b'"' {
            in_string = true;
        }
        out.push(b);
    }
    Ok(out)
}

fn trim(body: &[u8]) -> &[u8] {
    let start = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(body.len());
    let end = body
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &body[start..end]
}

fn parse_attributes(raw: &[u8]) -> Result<Vec<(String, AttrValue)>, EventError> {
    let map: HashMap<&str, &RawValue> =
        serde_json::from_slice(raw).map_err(|source| EventError::Json {
            index: None,
            source,
        })?;
    let invalid = |attribute: &str, problem| EventError::Invalid {
        index: None,
        attribute: attribute.to_owned(),
        problem,
    };
    if map.contains_key("data") && map.contains_key("data_base64") {
        return Err(invalid(
            "data_base64",
            "cannot be present together with `data`",
        ));
    }
    let mut attributes = Vec::with_capacity(map.len());
    for (name, value) in map {
        if name == "data" {
            continue;
        }
        if name == "data_base64" {
            // The JSON format's member for binary data: a base64 string.
            let ok = serde_json::from_str::<&str>(value.get()).is_ok_and(|b64| {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .is_ok()
            });
            if !ok {
                return Err(invalid(name, "must be a base64 string"));
            }
            continue;
        }
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(invalid(
                name,
                "is not a valid attribute name (lower-case letters and digits only)",
            ));
        }
        let text = value.get();
        let parsed = match text.as_bytes().first() {
            Some(b'"') => AttrValue::String(
                serde_json::from_str(text).map_err(|_| invalid(name, "is not a valid string"))?,
            ),
            Some(b't') | Some(b'f') => AttrValue::Bool(text == "true"),
            Some(b'n') => continue,
            Some(b'-') | Some(b'0'..=b'9') => AttrValue::Number(
                text.parse()
                    .map_err(|_| invalid(name, "is not a valid number"))?,
            ),
            _ => return Err(invalid(name, "must be a string, number or boolean")),
        };
        if name == "data_base64" {
            if !matches!(parsed, AttrValue::String(_)) {
                return Err(invalid(name, "must be a base64 string"));
            }
            continue;
        }
        attributes.push((name.to_owned(), parsed));
    }
    let get = |name: &'static str| -> Result<&str, EventError> {
        match attributes.iter().find(|(k, _)| k == name) {
            None => Err(EventError::Missing {
                index: None,
                attribute: name,
            }),
            Some((_, AttrValue::String(s))) if !s.is_empty() => Ok(s),
            Some((_, AttrValue::String(_))) => Err(invalid(name, "must not be empty")),
            Some(_) => Err(invalid(name, "must be a string")),
        }
    };
    let version = get("specversion")?;
    if version != SPEC_VERSION {
        return Err(EventError::SpecVersion {
            index: None,
            found: version.to_owned(),
        });
    }
    get("id")?;
    get("source")?;
    get("type")?;
    for optional in ["subject", "datacontenttype", "dataschema", "time"] {
        match attributes.iter().find(|(k, _)| k == optional) {
            Some((_, AttrValue::String(s))) if optional == "time" => {
                // The spec's type for it: a consumer that reads it must be
                // able to, whatever produced it.
                let rfc3339 = &time::format_description::well_known::Rfc3339;
                if time::OffsetDateTime::parse(s, rfc3339).is_err() {
                    return Err(invalid(
                        optional,
                        "must be an RFC 3339 timestamp, e.g. 2026-12-01T10:00:00Z",
                    ));
                }
            }
            Some((_, AttrValue::String(_))) | None => {}
            Some(_) => return Err(invalid(optional, "must be a string")),
        }
    }
    Ok(attributes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<CloudEvent, EventError> {
        CloudEvent::parse(Bytes::from(s.to_owned()), 1 << 20)
    }

    #[test]
    fn accepts_a_minimal_event_and_keeps_bytes() {
        let s = r#" {"specversion":"1.0","id":"1","source":"/s","type":"t","data":{"a":[1,2]},"amount":12,"flag":true} "#;
        let e = parse(s).unwrap();
        assert_eq!(e.id(), "1");
        assert_eq!(e.ty(), "t");
        assert_eq!(e.as_bytes().as_ref(), s.trim().as_bytes());
        assert_eq!(e.attribute("amount"), Some(&AttrValue::Number(12.0)));
        assert_eq!(e.attribute("flag"), Some(&AttrValue::Bool(true)));
        assert_eq!(e.key("amount").as_deref(), Some("12"));
    }

    #[test]
    fn rejects_missing_and_bad_attributes() {
        assert!(matches!(
            parse(r#"{"id":"1","source":"/s","type":"t"}"#),
            Err(EventError::Missing {
                attribute: "specversion",
                ..
            })
        ));
        assert!(matches!(
            parse(r#"{"specversion":"0.3","id":"1","source":"/s","type":"t"}"#),
            Err(EventError::SpecVersion { .. })
        ));
        assert!(matches!(
            parse(r#"{"specversion":"1.0","id":"","source":"/s","type":"t"}"#),
            Err(EventError::Invalid { .. })
        ));
        assert!(matches!(
            parse(r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","Bad":"x"}"#),
            Err(EventError::Invalid { .. })
        ));
        assert!(matches!(
            parse(r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","ext":{"a":1}}"#),
            Err(EventError::Invalid { .. })
        ));
        assert!(matches!(parse("[1]"), Err(EventError::Json { .. })));
        for time in [
            "yesterday",
            "2026-12-01",
            "10:00:00Z",
            "2026-13-01T10:00:00Z",
        ] {
            let e = format!(
                r#"{{"specversion":"1.0","id":"1","source":"/s","type":"t","time":"{time}"}}"#
            );
            assert!(
                matches!(parse(&e), Err(EventError::Invalid { ref attribute, .. }) if attribute == "time"),
                "{time}"
            );
        }
        for time in ["2026-12-01T10:00:00Z", "2026-12-01T10:00:00.123456+01:00"] {
            let e = format!(
                r#"{{"specversion":"1.0","id":"1","source":"/s","type":"t","time":"{time}"}}"#
            );
            assert!(parse(&e).is_ok(), "{time}");
        }
        assert!(matches!(
            CloudEvent::parse(Bytes::from_static(b"{}"), 1),
            Err(EventError::TooLarge { .. })
        ));
    }

    #[test]
    fn batch_reports_the_failing_index() {
        let ok = r#"{"specversion":"1.0","id":"1","source":"/s","type":"t"}"#;
        let bad = r#"{"specversion":"1.0","id":"2","source":"/s"}"#;
        let body = format!("[{ok},{bad}]");
        let err = CloudEvent::parse_batch(body.as_bytes(), 1 << 20, 10).unwrap_err();
        assert!(err.to_string().contains("#1"), "{err}");
        let body = format!("[{ok},{ok}]");
        assert_eq!(
            CloudEvent::parse_batch(body.as_bytes(), 1 << 20, 10)
                .unwrap()
                .len(),
            2
        );
        assert!(matches!(
            CloudEvent::parse_batch(body.as_bytes(), 1 << 20, 1),
            Err(EventError::BatchTooLarge { .. })
        ));
        assert!(matches!(
            CloudEvent::parse_batch(b"[]", 1 << 20, 1),
            Err(EventError::EmptyBatch)
        ));
    }

    fn binary(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, http::HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const CE: [(&str, &str); 4] = [
        ("ce-specversion", "1.0"),
        ("ce-id", "b-1"),
        ("ce-source", "/orders"),
        ("ce-type", "order.placed"),
    ];

    #[test]
    fn binary_mode_becomes_the_structured_form() {
        let mut h = binary(&CE);
        h.insert("content-type", "application/json".parse().unwrap());
        h.insert("ce-customer", "c%2042".parse().unwrap());
        let e = CloudEvent::from_binary(&h, br#"{"total":12}"#, 1 << 20).unwrap();
        assert_eq!(e.id(), "b-1");
        assert_eq!(e.ty(), "order.placed");
        assert_eq!(e.key("customer").as_deref(), Some("c 42"));
        let v: serde_json::Value = serde_json::from_slice(e.as_bytes()).unwrap();
        assert_eq!(v["data"]["total"], 12);
        assert_eq!(v["datacontenttype"], "application/json");

        // Text stays text; anything else is base64.
        let mut h = binary(&CE);
        h.insert("content-type", "text/plain".parse().unwrap());
        let v: serde_json::Value = serde_json::from_slice(
            CloudEvent::from_binary(&h, b"hello", 1 << 20)
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(v["data"], "hello");
        let mut h = binary(&CE);
        h.insert("content-type", "application/octet-stream".parse().unwrap());
        let v: serde_json::Value = serde_json::from_slice(
            CloudEvent::from_binary(&h, &[0, 255, 1], 1 << 20)
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(v["data_base64"], "AP8B");
    }

    #[test]
    fn binary_mode_is_validated_like_the_structured_form() {
        let h = binary(&CE[..3]);
        assert!(matches!(
            CloudEvent::from_binary(&h, b"", 1 << 20),
            Err(EventError::Missing {
                attribute: "type",
                ..
            })
        ));
        let mut h = binary(&CE);
        h.insert("content-type", "application/json".parse().unwrap());
        assert!(matches!(
            CloudEvent::from_binary(&h, b"{not json", 1 << 20),
            Err(EventError::Json { .. })
        ));
        let mut h = binary(&CE);
        h.insert("ce-bad", "%zz".parse().unwrap());
        assert!(CloudEvent::from_binary(&h, b"", 1 << 20).is_err());
        let h = binary(&CE);
        assert!(matches!(
            CloudEvent::from_binary(&h, &[b'a'; 300], 100),
            Err(EventError::TooLarge { .. })
        ));
    }

    /// JSON data is kept as sent, less the whitespace between its tokens:
    /// whitespace, quotes and backslashes inside strings stay, and a body
    /// that is not JSON, or not UTF-8, is refused.
    #[test]
    fn binary_json_data_is_compacted_as_sent() {
        let mut h = binary(&CE);
        h.insert("content-type", "application/vnd.shop+json".parse().unwrap());
        h.insert("ce-data", "from-a-header".parse().unwrap());
        let body =
            "{\n  \"a b\" : [ 1.50 , \"x \\\" \\\\\" , \"\\u00e9 \\t\" ],\r\n\t\"n\": null }\n";
        let event = CloudEvent::from_binary(&h, body.as_bytes(), 1 << 20).unwrap();
        let stored = std::str::from_utf8(event.as_bytes()).unwrap();
        assert!(
            stored.contains(r#""data":{"a b":[1.50,"x \" \\","\u00e9 \t"],"n":null}"#),
            "{stored}"
        );
        let v: serde_json::Value = serde_json::from_str(stored).unwrap();
        assert_eq!(v["data"]["a b"][1], "x \" \\");
        assert_eq!(v["datacontenttype"], "application/vnd.shop+json");
        assert_eq!(event.ty(), "order.placed");

        for bad in [&b"[1,]"[..], b"[1] [2]", b"\"open", b"[\"\xff\"]"] {
            assert!(
                matches!(
                    CloudEvent::from_binary(&h, bad, 1 << 20),
                    Err(EventError::Json { .. } | EventError::Invalid { .. })
                ),
                "{bad:?}"
            );
        }
        // Deep nesting is checked without recursion, so it overflows no
        // stack, and is taken as the structured form takes it.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let event = CloudEvent::from_binary(&h, deep.as_bytes(), 1 << 20).unwrap();
        assert!(
            std::str::from_utf8(event.as_bytes())
                .unwrap()
                .contains(&deep)
        );
        let structured =
            format!(r#"{{"specversion":"1.0","id":"s","source":"/s","type":"t","data":{deep}}}"#);
        CloudEvent::parse(Bytes::from(structured), 1 << 20).unwrap();
    }

    /// Limits are checked before the body is parsed, so an oversized body
    /// costs no tree and no array of millions of entries: the error is the
    /// size's, not the (later, never reached) parse error's.
    #[test]
    fn limits_apply_before_parsing() {
        let mut h = binary(&CE);
        h.insert("content-type", "application/json".parse().unwrap());
        // JSON over four times the limit: refused unparsed (this is not
        // even JSON).
        let body = format!("[{}", "0,".repeat(250));
        assert!(matches!(
            CloudEvent::from_binary(&h, body.as_bytes(), 100),
            Err(EventError::TooLarge { size, limit: 100, .. }) if size == body.len()
        ));
        // Pretty-printed JSON over the limit that is within it written
        // compact, as the event holds it: taken.
        let pretty = format!("[1,{}2]", " ".repeat(300));
        let event = CloudEvent::from_binary(&h, pretty.as_bytes(), 200).unwrap();
        let stored: serde_json::Value = serde_json::from_slice(event.as_bytes()).unwrap();
        assert_eq!(stored["data"], serde_json::json!([1, 2]));
        // Other data only grows (base64): over the limit, refused unread.
        h.insert("content-type", "application/octet-stream".parse().unwrap());
        let body = vec![0u8; 201];
        assert!(matches!(
            CloudEvent::from_binary(&h, &body, 200),
            Err(EventError::TooLarge {
                size: 201,
                limit: 200,
                ..
            })
        ));

        // One element past the cap ends the parse: what follows is not read.
        let ok = r#"{"specversion":"1.0","id":"1","source":"/s","type":"t"}"#;
        let body = format!("[{}{{not json", format!("{ok},").repeat(4));
        let err = CloudEvent::parse_batch(body.as_bytes(), 1 << 20, 3).unwrap_err();
        assert!(
            matches!(err, EventError::BatchTooLarge { limit: 3 }),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "batch has more than 3 events");
        // Up to the cap it is parsed, and errors are the parse's.
        let body = format!("[{}{{not json", format!("{ok},").repeat(2));
        assert!(matches!(
            CloudEvent::parse_batch(body.as_bytes(), 1 << 20, 3),
            Err(EventError::Json { .. })
        ));
        let body = format!("[{ok},{ok},{ok}]");
        assert_eq!(
            CloudEvent::parse_batch(body.as_bytes(), 1 << 20, 3)
                .unwrap()
                .len(),
            3
        );
        // Not an array, trailing bytes.
        for body in [ok.to_owned(), format!("[{ok}] x")] {
            assert!(matches!(
                CloudEvent::parse_batch(body.as_bytes(), 1 << 20, 3),
                Err(EventError::Json { index: None, .. })
            ));
        }
    }
}
