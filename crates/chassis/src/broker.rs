//! [`Broker`]: the client for the event broker's HTTP API
//! (`docs/broker.md`): publish to topics, receive from queues with
//! visibility timeouts, and read streams as a member of a consumer group.
//!
//! It is a [`Client`] for the dependency `broker` underneath, so under
//! mutual TLS it presents the instance's identity and accepts only the
//! broker's. Errors keep the broker's status and stable code
//! ([`Error::Broker`]) because consumers act on them: a `stale_receipt`
//! means another consumer owns the message now, an `unknown_topic` is a
//! manifest mistake, unreachable or timeout is worth a retry.

use std::time::Duration;

use http::Method;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::client::Client;
use crate::events::{BATCH_CONTENT_TYPE, CONTENT_TYPE, Event};
use crate::{Error, request_id};

/// Time for a call that does not wait on purpose.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response read: ten 1 MiB messages, or a stream read of 100
/// records of 1 MiB, with room for the envelope.
const MAX_BODY: usize = 128 << 20;
/// How much of an unexpected error body is kept in the message.
const SNIPPET: usize = 512;
const JSON: &str = "application/json";

/// A client for the event broker (`FLOTILLA_BROKER_URL`). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Broker {
    client: Client,
}

/// How [`Broker::receive`] waits and hides what it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiveOptions {
    /// At most this many messages (1–10).
    pub max_messages: usize,
    /// Long poll: wait up to this long (at most 20 s) for a first message.
    pub wait: Duration,
    /// Hide the received messages from other consumers for this long
    /// (`None`: the queue's default); ack, extend or release within it.
    pub visibility_timeout: Option<Duration>,
}

impl Default for ReceiveOptions {
    /// Ten messages, a 20 s long poll, the queue's visibility timeout.
    fn default() -> Self {
        ReceiveOptions {
            max_messages: 10,
            wait: Duration::from_secs(20),
            visibility_timeout: None,
        }
    }
}

/// A message received from a queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Proof of this delivery: ack, extend or release with it.
    pub receipt: String,
    /// The queue's id for the message (stable across deliveries).
    pub message_id: String,
    /// How many times it has been delivered, this time included.
    pub receive_count: u32,
    /// The event, or why the chassis cannot read it. Such a message must
    /// still be acked or released (or left to expire) like any other.
    pub event: Result<Event, UndecodableEvent>,
}

/// A delivered event the chassis cannot read as an [`Event`]: binary data
/// (`data_base64`), for example, which other publishers may send but the
/// chassis does not decode.
///
/// [`Broker::receive`] and [`StreamConsumer::read`] return it in place of
/// the event rather than dropping the delivery, so the consumer still has
/// the receipt to settle a queue message with and the sequence to
/// checkpoint past a stream record.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("the delivered event cannot be read: {reason}")]
pub struct UndecodableEvent {
    /// What is wrong with it.
    pub reason: String,
    /// The event as the broker delivered it (structured JSON), to log or
    /// pass on.
    pub raw: Value,
}

/// Reads a delivered event, keeping what could not be read.
fn decode(raw: Value) -> Result<Event, UndecodableEvent> {
    match serde_json::from_value::<Event>(raw.clone()) {
        Ok(event) => Ok(event),
        Err(e) => Err(UndecodableEvent {
            reason: e.to_string(),
            raw,
        }),
    }
}

/// A stream partition leased to a [`StreamConsumer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The partition.
    pub partition: u32,
    /// Fencing token: checkpoints present it, so a consumer whose lease was
    /// taken over cannot move the group's position.
    pub token: u64,
    /// The last sequence the group finished with; read after it.
    pub checkpoint: Option<u64>,
}

/// A record read from a stream partition.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The partition.
    pub partition: u32,
    /// Its position in the partition (increasing, possibly with gaps).
    pub sequence: u64,
    /// The event, or why the chassis cannot read it. Checkpoint past such
    /// a record like any other, or the partition stops there.
    pub event: Result<Event, UndecodableEvent>,
}

impl Broker {
    pub(crate) fn new(
        url: String,
        identity: Option<flotilla_mesh::Identity>,
    ) -> Result<Self, Error> {
        Ok(Broker {
            client: Client::new("broker", url, identity)?,
        })
    }

    /// The broker's base URL.
    pub fn base_url(&self) -> &str {
        self.client.base_url()
    }

    /// Publishes `event` to `topic` (which the service must declare in
    /// `publishes`). Returns once the broker stored it durably.
    pub async fn publish(&self, topic: &str, event: &Event) -> Result<(), Error> {
        check_name("topic", topic)?;
        event.validate()?;
        let body = event.to_json()?;
        self.publish_body(topic, CONTENT_TYPE, body).await
    }

    /// Publishes `events` to `topic` in one request (at most 1000 events and
    /// 16 MiB). Nothing is sent for an empty slice.
    pub async fn publish_batch(&self, topic: &str, events: &[Event]) -> Result<(), Error> {
        check_name("topic", topic)?;
        let mut json = Vec::with_capacity(events.len());
        for event in events {
            event.validate()?;
            json.push(event.to_json()?);
        }
        self.publish_json(topic, &json).await
    }

    /// Publishes events already encoded as JSON, as one batch.
    pub(crate) async fn publish_json(&self, topic: &str, events: &[String]) -> Result<(), Error> {
        if events.is_empty() {
            return Ok(());
        }
        let mut body = String::with_capacity(events.iter().map(|e| e.len() + 1).sum::<usize>() + 2);
        body.push('[');
        for (i, event) in events.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(event);
        }
        body.push(']');
        self.publish_body(topic, BATCH_CONTENT_TYPE, body).await
    }

    async fn publish_body(
        &self,
        topic: &str,
        content_type: &str,
        body: String,
    ) -> Result<(), Error> {
        let path = format!("/topics/{topic}/events");
        let _: Value = self
            .call(Method::POST, &path, content_type, Some(body), CALL_TIMEOUT)
            .await?;
        Ok(())
    }

    /// Receives up to `options.max_messages` messages from `queue`, waiting
    /// up to `options.wait` for the first. An empty result means none
    /// arrived in time.
    ///
    /// A message whose event the chassis cannot read (binary data, say) is
    /// returned too, with an [`UndecodableEvent`] for its event: ack it to
    /// drop it, or release it so the queue's `max_receives` moves it to the
    /// dead-letter queue.
    pub async fn receive(
        &self,
        queue: &str,
        options: ReceiveOptions,
    ) -> Result<Vec<Message>, Error> {
        check_name("queue", queue)?;
        let mut body = json!({
            "max_messages": options.max_messages,
            "wait_seconds": options.wait.as_secs_f64(),
        });
        if let Some(v) = options.visibility_timeout {
            body["visibility_timeout_seconds"] = json!(v.as_secs_f64());
        }
        #[derive(Deserialize)]
        struct Received {
            messages: Vec<RawMessage>,
        }
        #[derive(Deserialize)]
        struct RawMessage {
            receipt: String,
            message_id: String,
            receive_count: u32,
            event: Value,
        }
        let path = format!("/queues/{queue}/receive");
        // The request waits on purpose: allow for the wait on top.
        let timeout = options.wait + CALL_TIMEOUT;
        let received: Received = self
            .call(Method::POST, &path, JSON, Some(body.to_string()), timeout)
            .await?;
        Ok(received
            .messages
            .into_iter()
            .map(|m| Message {
                receipt: m.receipt,
                message_id: m.message_id,
                receive_count: m.receive_count,
                event: decode(m.event),
            })
            .collect())
    }

    /// Acknowledges (deletes) a received message. A receipt from an earlier
    /// delivery fails with 409 `stale_receipt`.
    pub async fn ack(&self, queue: &str, receipt: &str) -> Result<(), Error> {
        check_name("queue", queue)?;
        let path = format!("/queues/{queue}/ack");
        let body = json!({ "receipt": receipt }).to_string();
        let _: Value = self
            .call(Method::POST, &path, JSON, Some(body), CALL_TIMEOUT)
            .await?;
        Ok(())
    }

    /// Keeps a received message hidden for `timeout` from now (at most
    /// 12 h). Returns the new receipt: use it from now on, the old one is
    /// stale.
    pub async fn extend(
        &self,
        queue: &str,
        receipt: &str,
        timeout: Duration,
    ) -> Result<String, Error> {
        check_name("queue", queue)?;
        #[derive(Deserialize)]
        struct Extended {
            receipt: String,
        }
        let path = format!("/queues/{queue}/visibility");
        let body = json!({ "receipt": receipt, "timeout_seconds": timeout.as_secs_f64() });
        let extended: Extended = self
            .call(
                Method::POST,
                &path,
                JSON,
                Some(body.to_string()),
                CALL_TIMEOUT,
            )
            .await?;
        Ok(extended.receipt)
    }

    /// Makes a received message visible again at once, for this or another
    /// consumer (it counts as a delivery towards `max_receives`).
    pub async fn release(&self, queue: &str, receipt: &str) -> Result<(), Error> {
        check_name("queue", queue)?;
        let path = format!("/queues/{queue}/release");
        let body = json!({ "receipt": receipt }).to_string();
        let _: Value = self
            .call(Method::POST, &path, JSON, Some(body), CALL_TIMEOUT)
            .await?;
        Ok(())
    }

    /// A member named `consumer` of consumer group `group` on `stream`. The
    /// group's members split the partitions between them through leases.
    pub fn stream_consumer(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
    ) -> Result<StreamConsumer, Error> {
        check_name("stream", stream)?;
        check_name("group", group)?;
        check_name("consumer", consumer)?;
        Ok(StreamConsumer {
            broker: self.clone(),
            stream: stream.to_owned(),
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            lease_ttl: DEFAULT_LEASE_TTL,
        })
    }

    /// One call: JSON in, JSON out, errors classified.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Option<String>,
        timeout: Duration,
    ) -> Result<T, Error> {
        let url = self.client.url(path);
        let mut request = self
            .client
            .http()
            .request(method, &url)
            .timeout(timeout)
            .header(http::header::ACCEPT, JSON);
        if let Some(body) = body {
            request = request
                .header(http::header::CONTENT_TYPE, content_type)
                .body(body);
        }
        if let Some(id) = request_id::current() {
            request = request.header(request_id::HEADER, id);
        }
        let transport = |e: reqwest::Error| {
            if e.is_timeout() {
                Error::Timeout {
                    dep: "broker".into(),
                    url: url.clone(),
                    timeout,
                }
            } else {
                Error::Unreachable {
                    dep: "broker".into(),
                    url: url.clone(),
                    source: e,
                }
            }
        };
        let mut response = request.send().await.map_err(transport)?;
        let status = response.status();
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if bytes.len() + chunk.len() > MAX_BODY {
                return Err(Error::TooLarge {
                    dep: "broker".into(),
                    url,
                    limit: MAX_BODY,
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            return Err(broker_error(url, status, &bytes));
        }
        let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        serde_json::from_slice(bytes).map_err(|source| Error::BadJson {
            dep: "broker".into(),
            url,
            source,
        })
    }
}

/// [`Error::Broker`] from a non-2xx answer, reading the broker's
/// `{"error":{"code","message"}}` when that is what it is.
fn broker_error(url: String, status: http::StatusCode, body: &[u8]) -> Error {
    #[derive(Deserialize)]
    struct Body {
        error: Detail,
    }
    #[derive(Deserialize)]
    struct Detail {
        code: String,
        #[serde(default)]
        message: String,
    }
    let (code, message) = match serde_json::from_slice::<Body>(body) {
        Ok(b) => (b.error.code, b.error.message),
        Err(_) => {
            let text = String::from_utf8_lossy(&body[..body.len().min(SNIPPET)]);
            ("unexpected_response".to_owned(), text.into_owned())
        }
    };
    Error::Broker {
        url,
        status,
        code,
        message,
    }
}

/// Names go into URL paths: keep them to what the broker's names can be.
pub(crate) fn check_name(kind: &'static str, name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 80
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::BrokerName {
            kind,
            name: name.to_owned(),
        })
    }
}

/// How long a lease lasts unless renewed by [`StreamConsumer::lease`].
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);

/// One member of a stream consumer group (Kinesis-style): lease
/// partitions, read each after its checkpoint, checkpoint what was handled.
///
/// Call [`StreamConsumer::lease`] more often than the lease TTL: it renews
/// the leases held, takes free or expired ones, and so rebalances when
/// members come and go. Delivery is at least once: records after the last
/// checkpoint are read again by whoever holds the partition next.
#[derive(Debug, Clone)]
pub struct StreamConsumer {
    broker: Broker,
    stream: String,
    group: String,
    consumer: String,
    lease_ttl: Duration,
}

impl StreamConsumer {
    /// Leases last `ttl` instead of [`DEFAULT_LEASE_TTL`].
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Acquires and renews this member's leases; returns the partitions it
    /// holds now, with the group's checkpoint for each.
    pub async fn lease(&self) -> Result<Vec<Lease>, Error> {
        #[derive(Deserialize)]
        struct Leases {
            leases: Vec<RawLease>,
        }
        #[derive(Deserialize)]
        struct RawLease {
            partition: u32,
            token: u64,
            checkpoint: Option<u64>,
        }
        let path = format!("/streams/{}/groups/{}/leases", self.stream, self.group);
        let body =
            json!({ "consumer": self.consumer, "ttl_seconds": self.lease_ttl.as_secs_f64() });
        let leases: Leases = self
            .broker
            .call(
                Method::POST,
                &path,
                JSON,
                Some(body.to_string()),
                CALL_TIMEOUT,
            )
            .await?;
        Ok(leases
            .leases
            .into_iter()
            .map(|l| Lease {
                partition: l.partition,
                token: l.token,
                checkpoint: l.checkpoint,
            })
            .collect())
    }

    /// Reads up to `limit` records of `partition` after sequence `after`
    /// (from the oldest retained with `None`; pass the lease's checkpoint),
    /// waiting up to `wait` (at most 20 s) for the first. Records whose
    /// event the chassis cannot read are returned too, with an
    /// [`UndecodableEvent`] for their event.
    pub async fn read(
        &self,
        partition: u32,
        after: Option<u64>,
        limit: usize,
        wait: Duration,
    ) -> Result<Vec<Record>, Error> {
        #[derive(Deserialize)]
        struct Read {
            records: Vec<RawRecord>,
        }
        #[derive(Deserialize)]
        struct RawRecord {
            partition: u32,
            sequence: u64,
            event: Value,
        }
        let iterator = match after {
            Some(seq) => format!("after_sequence:{seq}"),
            None => "trim_horizon".to_owned(),
        };
        let path = format!(
            "/streams/{}/partitions/{partition}/records?iterator={iterator}&limit={limit}&wait_seconds={}",
            self.stream,
            wait.as_secs_f64()
        );
        let read: Read = self
            .broker
            .call(Method::GET, &path, JSON, None, wait + CALL_TIMEOUT)
            .await?;
        Ok(read
            .records
            .into_iter()
            .map(|r| Record {
                partition: r.partition,
                sequence: r.sequence,
                event: decode(r.event),
            })
            .collect())
    }

    /// Records that the group finished with `partition` up to `sequence`.
    /// Fails with 409 `lease_lost` when another member holds the partition
    /// now: stop processing it.
    pub async fn checkpoint(&self, lease: &Lease, sequence: u64) -> Result<(), Error> {
        let path = format!(
            "/streams/{}/groups/{}/partitions/{}/checkpoint",
            self.stream, self.group, lease.partition
        );
        let body = json!({ "consumer": self.consumer, "token": lease.token, "sequence": sequence });
        let _: Value = self
            .broker
            .call(
                Method::PUT,
                &path,
                JSON,
                Some(body.to_string()),
                CALL_TIMEOUT,
            )
            .await?;
        Ok(())
    }

    /// Leaves the group, freeing this member's leases for the others at
    /// once (on shutdown).
    pub async fn leave(&self) -> Result<(), Error> {
        let path = format!(
            "/streams/{}/groups/{}/consumers/{}",
            self.stream, self.group, self.consumer
        );
        let _: Value = self
            .broker
            .call(Method::DELETE, &path, JSON, None, CALL_TIMEOUT)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_they_reach_a_url() {
        assert!(check_name("topic", "orders").is_ok());
        assert!(check_name("consumer", "orders-0").is_ok());
        for bad in ["", "a/b", "a?b", "-a", "a b", &"x".repeat(81)] {
            let err = check_name("topic", bad).unwrap_err().to_string();
            assert!(err.contains("topic name"), "{err}");
        }
    }

    #[test]
    fn error_bodies_keep_status_and_code() {
        let err = broker_error(
            "http://b/queues/q/ack".into(),
            http::StatusCode::CONFLICT,
            br#"{"error":{"code":"stale_receipt","message":"the receipt is stale"}}"#,
        );
        assert_eq!(err.status(), Some(http::StatusCode::CONFLICT));
        assert_eq!(err.broker_code(), Some("stale_receipt"));
        assert!(err.to_string().contains("409"), "{err}");
        let err = broker_error("u".into(), http::StatusCode::BAD_GATEWAY, b"<html>");
        assert_eq!(err.broker_code(), Some("unexpected_response"));
        assert!(err.is_dependency_failure());
    }
}
