//! [`Event`]: a CloudEvent 1.0 as services build, publish and receive it,
//! [`PushedEvent`], the extractor for events the broker pushes, and
//! [`Handled`], the answer to a push.
//!
//! The wire format is the structured JSON mode the broker speaks
//! (`docs/broker.md`): context attributes and extensions at the top level,
//! `data` as JSON. Events are validated the way the broker validates them,
//! so a mistake shows up where the event is built, not as a 400 from the
//! broker (or, through the outbox, long after the request that made it).

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::ApiError;
use crate::{Error, trace};

/// The only CloudEvents version spoken.
pub const SPEC_VERSION: &str = "1.0";
/// Media type of one event in the structured JSON format.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";
/// Media type of a JSON array of events.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// The extension the broker partitions streams and groups FIFO queues by
/// unless the manifest names another attribute (CloudEvents' Partitioning
/// extension).
const PARTITION_KEY: &str = "partitionkey";
/// The longest key the broker accepts, in bytes (as Kinesis's partition
/// keys).
const MAX_KEY_BYTES: usize = 256;

/// Attribute names an extension may not take: the CloudEvents context
/// attributes and the data members.
const RESERVED: &[&str] = &[
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "data",
];

/// A CloudEvent 1.0 with JSON `data`.
///
/// `source` + `id` identify an event: a redelivery or an outbox retry
/// carries the same pair, which is what [`crate::inbox::claim`] deduplicates
/// on. Optional attributes this struct does not name (`dataschema`, and
/// every extension) live in [`Event::extensions`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Wire", into = "Wire")]
pub struct Event {
    /// Unique per `source`; [`Event::new`] uses a random UUID.
    pub id: String,
    /// Who produced it, a URI reference; [`Event::new`] uses `/<service>`.
    pub source: String,
    /// What happened, e.g. `order.placed` (serialized as `type`).
    pub ty: String,
    /// What it happened to, e.g. the order's id.
    pub subject: Option<String>,
    /// When it happened, RFC 3339.
    pub time: Option<String>,
    /// Media type of `data`; `application/json` from [`Event::new`].
    pub datacontenttype: Option<String>,
    /// The payload (`null` when the event has none).
    pub data: Value,
    /// Extension attributes (and `dataschema`): names of lower-case ASCII
    /// letters and digits, values strings, numbers or booleans.
    pub extensions: BTreeMap<String, Value>,
}

impl Event {
    /// A new event from service `source_service`: a random UUID v4 `id`,
    /// `source` `/<service>`, `time` now, `data` serialized as JSON, and the
    /// `traceparent` of the request being handled, if it carried one.
    pub fn new(source_service: &str, ty: &str, data: impl Serialize) -> Result<Event, Error> {
        let data = serde_json::to_value(data).map_err(|source| Error::EventEncode {
            ty: ty.to_owned(),
            source,
        })?;
        let mut extensions = BTreeMap::new();
        if let Some(tp) = trace::current() {
            extensions.insert(trace::TRACEPARENT.to_owned(), Value::String(tp));
        }
        let event = Event {
            id: uuid::Uuid::new_v4().to_string(),
            source: format!("/{source_service}"),
            ty: ty.to_owned(),
            subject: None,
            time: Some(crate::now_rfc3339()),
            datacontenttype: Some("application/json".to_owned()),
            data,
            extensions,
        };
        event.validate()?;
        Ok(event)
    }

    /// Adds (or replaces) extension attribute `name`. Names are lower-case
    /// ASCII letters and digits and not a context attribute's; values are
    /// strings, numbers or booleans.
    pub fn with_extension(mut self, name: &str, value: impl Into<Value>) -> Result<Event, Error> {
        let value = value.into();
        check_extension(name, &value)?;
        self.extensions.insert(name.to_owned(), value);
        Ok(self)
    }

    /// Sets `subject`.
    pub fn with_subject(mut self, subject: impl Into<String>) -> Event {
        self.subject = Some(subject.into());
        self
    }

    /// `data` decoded as `T`. The error is [`Error::EventData`], which
    /// [`ApiError`] answers with 400 so a push delivery is dead-lettered
    /// rather than retried: the same bytes will not decode next time either.
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T, Error> {
        T::deserialize(&self.data).map_err(|source| Error::EventData {
            id: self.id.clone(),
            ty: self.ty.clone(),
            source,
        })
    }

    /// The W3C trace context carried in the `traceparent` extension.
    pub fn traceparent(&self) -> Option<&str> {
        self.extension_str(trace::TRACEPARENT)
    }

    /// Extension `name`, if it is a string.
    pub fn extension_str(&self, name: &str) -> Option<&str> {
        self.extensions.get(name)?.as_str()
    }

    /// Checks the rules the broker enforces before it takes an event:
    /// non-empty `id`, `source` and `type`, valid extension names and
    /// values, an RFC 3339 `time`, and keys it can partition a stream or
    /// group a FIFO queue by: `partitionkey` (the default key attribute),
    /// or `id` when there is none (then the key), at most 256 bytes, with
    /// no control characters. A key attribute the manifest names instead
    /// (`partition_key`, `group_by`) must keep to the same rule.
    ///
    /// Checked where events are published and written to the outbox, so a
    /// mistake fails the request that made it: through the outbox it would
    /// otherwise be refused by the broker long after the commit, and hold
    /// up the topic's later events.
    pub fn validate(&self) -> Result<(), Error> {
        self.check_attributes()?;
        if let Some(at) = &self.time {
            let rfc3339 = &time::format_description::well_known::Rfc3339;
            if time::OffsetDateTime::parse(at, rfc3339).is_err() {
                return Err(invalid(format!(
                    "attribute `time` must be an RFC 3339 timestamp, e.g. 2026-12-01T10:00:00Z, not {at:?}"
                )));
            }
        }
        // The key the broker would use: `partitionkey` when there is one
        // (checked whether or not a stream reads it: the chassis cannot
        // tell), else `id`, which the broker judges only then.
        match self.extensions.get(PARTITION_KEY) {
            Some(Value::String(key)) => check_key(PARTITION_KEY, key)?,
            _ => check_key("id", &self.id)?,
        }
        Ok(())
    }

    /// The rules every event read is held to as well: the ones
    /// [`Event::validate`] adds are the broker's rules for accepting an
    /// event, and one it delivered is read even if it took it under older
    /// rules.
    fn check_attributes(&self) -> Result<(), Error> {
        for (name, value) in [
            ("id", &self.id),
            ("source", &self.source),
            ("type", &self.ty),
        ] {
            if value.is_empty() {
                return Err(invalid(format!("attribute `{name}` must not be empty")));
            }
        }
        for (name, value) in &self.extensions {
            check_extension(name, value)?;
        }
        Ok(())
    }

    /// The structured JSON encoding.
    pub(crate) fn to_json(&self) -> Result<String, Error> {
        serde_json::to_string(self).map_err(|source| Error::EventEncode {
            ty: self.ty.clone(),
            source,
        })
    }
}

fn invalid(reason: String) -> Error {
    Error::InvalidEvent { reason }
}

/// A partition or FIFO group key, as the broker checks it.
fn check_key(attribute: &str, key: &str) -> Result<(), Error> {
    if key.len() > MAX_KEY_BYTES {
        return Err(invalid(format!(
            "attribute `{attribute}` is {} bytes; as a partition or group key it may have at most {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    if key.chars().any(char::is_control) {
        return Err(invalid(format!(
            "attribute `{attribute}` has a control character, which a partition or group key may not"
        )));
    }
    Ok(())
}

fn check_extension(name: &str, value: &Value) -> Result<(), Error> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(invalid(format!(
            "extension name `{name}` is invalid: use lower-case ASCII letters and digits only"
        )));
    }
    if RESERVED.contains(&name) {
        return Err(invalid(format!(
            "`{name}` is a context attribute, not an extension: set the field instead"
        )));
    }
    if !matches!(value, Value::String(_) | Value::Number(_) | Value::Bool(_)) {
        return Err(invalid(format!(
            "extension `{name}` must be a string, number or boolean"
        )));
    }
    Ok(())
}

/// The JSON shape, with `specversion` and the flattened extensions.
#[derive(Serialize, Deserialize)]
struct Wire {
    specversion: String,
    id: String,
    source: String,
    #[serde(rename = "type")]
    ty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    datacontenttype: Option<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    data: Value,
    #[serde(flatten)]
    extensions: BTreeMap<String, Value>,
}

impl TryFrom<Wire> for Event {
    type Error = Error;

    fn try_from(w: Wire) -> Result<Self, Error> {
        if w.specversion != SPEC_VERSION {
            return Err(invalid(format!(
                "specversion `{}` is not supported, use \"1.0\"",
                w.specversion
            )));
        }
        if w.extensions.contains_key("data_base64") {
            return Err(invalid(
                "binary data (`data_base64`) is not supported: the chassis reads JSON `data` only"
                    .into(),
            ));
        }
        let mut extensions = w.extensions;
        // CloudEvents treats a null attribute as absent.
        extensions.retain(|_, v| !v.is_null());
        let event = Event {
            id: w.id,
            source: w.source,
            ty: w.ty,
            subject: w.subject,
            time: w.time,
            datacontenttype: w.datacontenttype,
            data: w.data,
            extensions,
        };
        event.check_attributes()?;
        Ok(event)
    }
}

impl From<Event> for Wire {
    fn from(e: Event) -> Self {
        Wire {
            specversion: SPEC_VERSION.to_owned(),
            id: e.id,
            source: e.source,
            ty: e.ty,
            subject: e.subject,
            time: e.time,
            datacontenttype: e.datacontenttype,
            data: e.data,
            extensions: e.extensions,
        }
    }
}

/// Parses one structured-mode event.
pub(crate) fn parse(bytes: &[u8]) -> Result<Event, Error> {
    serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))
}

/// Extracts the CloudEvent the broker pushes (structured mode,
/// `application/cloudevents+json`; `application/json` is accepted too).
///
/// Anything else is rejected with 400 `invalid_cloudevent` (or 415 for
/// another content type, 413 for an oversized body): the broker dead-letters
/// on a 4xx instead of retrying a delivery that can never succeed. The
/// `traceparent` header the broker sends is in the event's extension of the
/// same name, and events the handler creates with [`Event::new`] carry it.
#[derive(Debug, Clone, PartialEq)]
pub struct PushedEvent(pub Event);

impl<S: Send + Sync> FromRequest<S> for PushedEvent {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if essence != CONTENT_TYPE && essence != "application/json" {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "content type `{content_type}` is not accepted; send one event as {CONTENT_TYPE}"
                ),
            ));
        }
        let body = Bytes::from_request(req, state).await.map_err(|rejection| {
            ApiError::new(rejection.status(), "invalid_body", rejection.body_text())
        })?;
        parse(&body).map(PushedEvent).map_err(|e| {
            tracing::warn!(error = %e, "refused a pushed event");
            ApiError::from(e)
        })
    }
}

/// The answer to a pushed event that was handled: 200 with
/// `{"outcome": "…"}`. The broker only looks at the status (2xx
/// acknowledges); the outcome is for people reading logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Handled {
    /// What handling came to, e.g. `reserved`, `duplicate`, `ignored`.
    pub outcome: &'static str,
}

impl Handled {
    /// Handled before (see [`crate::inbox::handle_once`]): nothing done.
    pub const DUPLICATE: Handled = Handled::new("duplicate");
    /// Not an event this handler acts on: acknowledged, nothing done.
    pub const IGNORED: Handled = Handled::new("ignored");

    /// An answer with `outcome`.
    pub const fn new(outcome: &'static str) -> Handled {
        Handled { outcome }
    }
}

impl IntoResponse for Handled {
    fn into_response(self) -> Response {
        (StatusCode::OK, axum::Json(self)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn new_events_round_trip() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Placed {
            order: String,
            total: u32,
        }
        let e = Event::new(
            "orders",
            "order.placed",
            Placed {
                order: "o-1".into(),
                total: 12,
            },
        )
        .unwrap()
        .with_subject("o-1")
        .with_extension("partitionkey", "c-42")
        .unwrap();
        assert_eq!(e.source, "/orders");
        assert_eq!(uuid::Uuid::parse_str(&e.id).unwrap().get_version_num(), 4);
        assert!(e.time.as_deref().unwrap().ends_with('Z'));
        assert_eq!(e.traceparent(), None);
        let json: Value = serde_json::from_str(&e.to_json().unwrap()).unwrap();
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["type"], "order.placed");
        assert_eq!(json["subject"], "o-1");
        assert_eq!(json["partitionkey"], "c-42");
        assert_eq!(json["datacontenttype"], "application/json");
        assert_eq!(json["data"]["total"], 12);
        assert!(json.get("extensions").is_none());
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, e);
        let placed: Placed = back.data_as().unwrap();
        assert_eq!(placed.total, 12);
        let err = back.data_as::<Vec<u8>>().unwrap_err();
        assert!(matches!(err, Error::EventData { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn new_events_carry_the_request_trace() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let e = trace::scope(Some(tp.into()), async {
            Event::new("orders", "t", json!(null))
        })
        .await
        .unwrap();
        assert_eq!(e.traceparent(), Some(tp));
        let json: Value = serde_json::from_str(&e.to_json().unwrap()).unwrap();
        assert_eq!(json["traceparent"], tp);
        assert!(json.get("data").is_none());
    }

    #[test]
    fn extensions_are_validated() {
        let e = Event::new("orders", "t", 1).unwrap();
        for (name, value) in [
            ("Upper", json!("x")),
            ("with_underscore", json!("x")),
            ("", json!("x")),
            ("id", json!("x")),
            ("nested", json!({"a": 1})),
            ("list", json!([1])),
        ] {
            let err = e.clone().with_extension(name, value).unwrap_err();
            assert!(matches!(err, Error::InvalidEvent { .. }), "{name}: {err:?}");
        }
        assert!(e.clone().with_extension("amount", 12).is_ok());
        assert!(e.clone().with_extension("flag", true).is_ok());
        assert!(Event::new("orders", "", 1).is_err());
    }

    #[test]
    fn time_and_keys_are_validated_as_the_broker_does() {
        let e = Event::new("orders", "t", 1).unwrap();
        // What the broker's parser (the `time` crate's) takes, no more.
        for ok in [
            "2026-12-01T10:00:00Z",
            "2026-12-01 10:00:00Z",
            "2026-12-01T10:00:00.123456+02:00",
            "1985-04-12T23:20:50.52Z",
        ] {
            let mut e = e.clone();
            e.time = Some(ok.into());
            assert!(e.validate().is_ok(), "{ok}");
        }
        for bad in [
            "yesterday",
            "",
            "2026-12-01",
            "2026-12-01T10:00:00",
            "2026-13-01T10:00:00Z",
        ] {
            let mut e = e.clone();
            e.time = Some(bad.into());
            let err = e.validate().expect_err(bad);
            assert!(matches!(err, Error::InvalidEvent { .. }), "{bad}: {err:?}");
            assert!(err.to_string().contains("`time`"), "{err}");
        }
        let key = |k: &str| e.clone().with_extension("partitionkey", k).unwrap();
        assert!(key(&"k".repeat(256)).validate().is_ok());
        assert!(key("c-42").validate().is_ok());
        for bad in ["k".repeat(257), "a\nb".into(), "a\u{7f}b".into()] {
            let err = key(&bad).validate().unwrap_err();
            assert!(err.to_string().contains("`partitionkey`"), "{err}");
        }
        let mut long_id = e.clone();
        long_id.id = "i".repeat(257);
        let err = long_id.validate().unwrap_err();
        assert!(err.to_string().contains("`id`"), "{err}");
        // With a partition key, the id is no key: the broker takes it long.
        let keyed = long_id.with_extension("partitionkey", "c-42").unwrap();
        assert!(keyed.validate().is_ok());
        // Another extension is not a key unless the manifest says so: the
        // broker takes it at any length.
        assert!(
            e.clone()
                .with_extension("note", "n".repeat(1000))
                .unwrap()
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn received_events_are_read_even_under_older_rules() {
        let e =
            parse(br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","time":"yesterday"}"#)
                .unwrap();
        assert_eq!(e.time.as_deref(), Some("yesterday"));
        assert!(e.validate().is_err(), "but it would not be published");
    }

    #[test]
    fn parsing_rejects_what_the_broker_rejects() {
        let ok =
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","dataschema":"x","n":null}"#;
        let e = parse(ok.as_bytes()).unwrap();
        assert_eq!(e.data, Value::Null);
        assert_eq!(e.extensions.get("dataschema"), Some(&json!("x")));
        assert!(!e.extensions.contains_key("n"));
        for bad in [
            "not json",
            "[]",
            r#"{"id":"1","source":"/s","type":"t"}"#,
            r#"{"specversion":"0.3","id":"1","source":"/s","type":"t"}"#,
            r#"{"specversion":"1.0","id":"","source":"/s","type":"t"}"#,
            r#"{"specversion":"1.0","id":"1","source":"/s"}"#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","Bad":"x"}"#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","ext":{"a":1}}"#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data_base64":"AA=="}"#,
        ] {
            let err = parse(bad.as_bytes()).unwrap_err();
            assert!(matches!(err, Error::InvalidEvent { .. }), "{bad}: {err:?}");
        }
    }
}
