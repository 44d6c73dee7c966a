//! The broker's HTTP API (documented in `docs/broker.md` and served as
//! OpenAPI 3.0 at `/openapi.json`).
//!
//! Events travel as CloudEvents 1.0 in the structured JSON format, one
//! (`application/cloudevents+json`) or many
//! (`application/cloudevents-batch+json`). Control calls take and return
//! plain JSON. Every error is JSON `{"error": {"code", "message"}}` with a
//! stable code; [`ApiError`] is the one place domain errors become HTTP
//! statuses.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use serde::{Deserialize, Serialize};

use crate::cloudevent::{self, CloudEvent, EventError};
use crate::config::Limits;
use crate::engine::{
    Engine, EngineError, Lease, OutgoingMessage, OutgoingRecord, Receipt, ReceiveRequest,
    StreamPosition,
};

/// The OpenAPI 3.0 document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// A request the API refuses, or an operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Event(#[from] EventError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(
        "content type `{0}` is not accepted; send application/cloudevents+json, application/cloudevents-batch+json, or one event in binary mode (ce-specversion, ce-id, ce-source, ce-type headers)"
    )]
    MediaType(String),
    #[error("request body is over the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("cannot read the request body")]
    Body(#[source] BytesRejection),
    #[error("invalid request: {0}")]
    Request(String),
    #[error("no such endpoint; see /openapi.json")]
    NotFound,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
}

impl ApiError {
    /// The HTTP status and stable error code.
    pub fn status_code(&self) -> (StatusCode, &'static str) {
        use EngineError as E;
        match self {
            Self::Event(EventError::TooLarge { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "message_too_large")
            }
            Self::Event(EventError::BatchTooLarge { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "batch_too_large")
            }
            Self::Event(_) => (StatusCode::BAD_REQUEST, "invalid_cloudevent"),
            Self::MediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            Self::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            Self::Body(_) => (StatusCode::BAD_REQUEST, "invalid_body"),
            Self::Request(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            Self::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Self::Engine(e) => match e {
                E::UnknownTopic(_) => (StatusCode::NOT_FOUND, "unknown_topic"),
                E::UnknownQueue(_) => (StatusCode::NOT_FOUND, "unknown_queue"),
                E::UnknownStream(_) => (StatusCode::NOT_FOUND, "unknown_stream"),
                E::UnknownPartition { .. } => (StatusCode::NOT_FOUND, "unknown_partition"),
                E::StaleReceipt => (StatusCode::CONFLICT, "stale_receipt"),
                E::InvalidReceipt(_) => (StatusCode::BAD_REQUEST, "invalid_receipt"),
                E::InvalidArgument { .. } => (StatusCode::BAD_REQUEST, "invalid_argument"),
                E::LeaseLost { .. } => (StatusCode::CONFLICT, "lease_lost"),
                E::Unsupported { .. } => (StatusCode::NOT_IMPLEMENTED, "unsupported"),
                E::StorageFull(_) => (StatusCode::INSUFFICIENT_STORAGE, "storage_full"),
                E::Storage(_) => (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable"),
                E::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "message_too_large"),
                E::Nats { .. } => (StatusCode::SERVICE_UNAVAILABLE, "engine_unavailable"),
                E::Closed => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            },
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_code();
        if status.is_server_error() {
            tracing::warn!(code, error = %chain(&self), "broker request failed");
        } else {
            tracing::debug!(code, error = %chain(&self), "broker request refused");
        }
        // The message is the top-level error only: sources may carry paths
        // and internals that are for the log.
        let body = ErrorBody {
            error: ErrorDetail {
                code,
                message: self.to_string(),
            },
        };
        (status, axum::Json(body)).into_response()
    }
}

/// `Path` whose rejection is a JSON [`ApiError`].
struct ApiPath<T>(T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| Self(v))
            .map_err(|e| ApiError::Request(e.body_text()))
    }
}

/// `Query` whose rejection is a JSON [`ApiError`].
struct ApiQuery<T>(T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| Self(v))
            .map_err(|e| ApiError::Request(e.body_text()))
    }
}

#[derive(Clone)]
struct Api {
    engine: Arc<dyn Engine>,
    limits: Limits,
}

/// The API's router, to be served as is or nested by the runtime.
pub fn router(engine: Arc<dyn Engine>, limits: Limits) -> Router {
    let body_limit = limits.max_body_bytes;
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .route("/topics/{topic}/events", post(publish))
        .route("/queues/{queue}", get(queue_stats))
        .route("/queues/{queue}/messages", post(send))
        .route("/queues/{queue}/receive", post(receive))
        .route("/queues/{queue}/ack", post(ack))
        .route("/queues/{queue}/visibility", post(visibility))
        .route("/queues/{queue}/release", post(release))
        .route("/queues/{queue}/redrive", post(redrive))
        .route("/streams/{stream}", get(stream_stats))
        .route("/streams/{stream}/records", post(put_records))
        .route(
            "/streams/{stream}/partitions/{partition}/records",
            get(read_records),
        )
        .route("/streams/{stream}/groups/{group}/leases", post(leases))
        .route(
            "/streams/{stream}/groups/{group}/partitions/{partition}/checkpoint",
            put(checkpoint),
        )
        .route(
            "/streams/{stream}/groups/{group}/consumers/{consumer}",
            delete(leave),
        )
        .fallback(|| async { ApiError::NotFound })
        // Bodies are checked against the limit while they are read; the
        // per-event limit is checked after parsing.
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(Api { engine, limits })
}

async fn readyz(State(api): State<Api>) -> Result<&'static str, ApiError> {
    api.engine.ready().await?;
    Ok("ok")
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// Names with `_` belong to internal queues (topic push subscriptions);
/// clients cannot address them.
fn public(name: &str, unknown: fn(String) -> EngineError) -> Result<(), ApiError> {
    if name.contains('_') {
        Err(unknown(name.to_owned()).into())
    } else {
        Ok(())
    }
}

fn body(api: &Api, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::BodyTooLarge {
                limit: api.limits.max_body_bytes,
            }
        } else {
            ApiError::Body(e)
        }
    })
}

fn events(api: &Api, headers: &HeaderMap, body: Bytes) -> Result<Vec<CloudEvent>, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let l = &api.limits;
    match essence.as_str() {
        cloudevent::CONTENT_TYPE => Ok(vec![CloudEvent::parse(body, l.max_event_bytes)?]),
        cloudevent::BATCH_CONTENT_TYPE => Ok(CloudEvent::parse_batch(
            &body,
            l.max_event_bytes,
            l.max_batch_events,
        )?),
        // The HTTP binding's binary mode: attributes in ce-* headers.
        _ if headers.contains_key("ce-specversion") => Ok(vec![CloudEvent::from_binary(
            headers,
            &body,
            l.max_event_bytes,
        )?]),
        _ => Err(ApiError::MediaType(ct.to_owned())),
    }
}

fn json<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::Request(e.to_string()))
}

fn seconds(what: &str, s: Option<f64>) -> Result<Option<Duration>, ApiError> {
    s.map(|s| {
        Duration::try_from_secs_f64(s).map_err(|_| {
            ApiError::Request(format!("{what} must be a non-negative number of seconds"))
        })
    })
    .transpose()
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn ok_json<T: Serialize>(v: &T) -> Response {
    match serde_json::to_string(v) {
        Ok(s) => json_response(StatusCode::OK, s),
        Err(e) => ApiError::Request(e.to_string()).into_response(),
    }
}

#[derive(Serialize)]
struct PublishResult<'a> {
    id: &'a str,
    routed: usize,
}

async fn publish(
    State(api): State<Api>,
    ApiPath(topic): ApiPath<String>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    public(&topic, EngineError::UnknownTopic)?;
    let evs = events(&api, &headers, body(&api, raw)?)?;
    let ids: Vec<String> = evs.iter().map(|e| e.id().to_owned()).collect();
    let out = api.engine.publish(&topic, evs).await?;
    metrics::counter!(crate::metrics::PUBLISHED, "topic" => topic).increment(ids.len() as u64);
    let results: Vec<PublishResult> = ids
        .iter()
        .zip(out)
        .map(|(id, o)| PublishResult {
            id,
            routed: o.routed,
        })
        .collect();
    Ok(ok_json(&serde_json::json!({ "results": results })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SendQuery {
    delay_seconds: Option<f64>,
}

#[derive(Serialize)]
struct SendResult<'a> {
    id: &'a str,
    message_id: String,
    duplicate: bool,
}

async fn send(
    State(api): State<Api>,
    ApiPath(queue): ApiPath<String>,
    ApiQuery(q): ApiQuery<SendQuery>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    public(&queue, EngineError::UnknownQueue)?;
    let delay = seconds("delay_seconds", q.delay_seconds)?;
    let evs = events(&api, &headers, body(&api, raw)?)?;
    let ids: Vec<String> = evs.iter().map(|e| e.id().to_owned()).collect();
    let msgs = evs
        .into_iter()
        .map(|event| OutgoingMessage { event, delay })
        .collect();
    let out = api.engine.send(&queue, msgs).await?;
    let results: Vec<SendResult> = ids
        .iter()
        .zip(out)
        .map(|(id, o)| SendResult {
            id,
            message_id: o.message_id,
            duplicate: o.duplicate,
        })
        .collect();
    Ok(ok_json(&serde_json::json!({ "results": results })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReceiveBody {
    max_messages: Option<usize>,
    wait_seconds: Option<f64>,
    visibility_timeout_seconds: Option<f64>,
}

async fn receive(
    State(api): State<Api>,
    ApiPath(queue): ApiPath<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    public(&queue, EngineError::UnknownQueue)?;
    let b: ReceiveBody = json(&body(&api, raw)?)?;
    let request = ReceiveRequest {
        max_messages: b.max_messages.unwrap_or(1),
        wait: seconds("wait_seconds", b.wait_seconds)?.unwrap_or_default(),
        visibility_timeout: seconds("visibility_timeout_seconds", b.visibility_timeout_seconds)?,
        one_per_group: false,
    };
    let deliveries = api.engine.receive(&queue, request).await?;
    // The events are stored, validated JSON: splice them in verbatim.
    let mut out = String::from("{\"messages\":[");
    for (i, d) in deliveries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let head = serde_json::json!({
            "receipt": d.receipt.0,
            "message_id": d.message_id,
            "receive_count": d.receive_count,
            "sent_at_ms": d.sent_at_ms,
        })
        .to_string();
        out.push_str(&head[..head.len() - 1]);
        out.push_str(",\"event\":");
        out.push_str(&String::from_utf8_lossy(&d.event));
        out.push('}');
    }
    out.push_str("]}");
    Ok(json_response(StatusCode::OK, out))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AckBody {
    receipt: Option<String>,
    receipts: Option<Vec<String>>,
}

async fn ack(
    State(api): State<Api>,
    ApiPath(queue): ApiPath<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    public(&queue, EngineError::UnknownQueue)?;
    let b: AckBody = json(&body(&api, raw)?)?;
    match (b.receipt, b.receipts) {
        (Some(r), None) => {
            let mut out = api.engine.ack(&queue, &[Receipt(r)]).await?;
            match out.pop() {
                Some(Err(e)) => Err(e.into()),
                _ => Ok(ok_json(&serde_json::json!({ "acked": 1 }))),
            }
        }
        (None, Some(list)) => {
            let receipts: Vec<Receipt> = list.into_iter().map(Receipt).collect();
            let out = api.engine.ack(&queue, &receipts).await?;
            let mut acked = 0;
            let mut failed = Vec::new();
            for (r, res) in receipts.iter().zip(out) {
                match res {
                    Ok(()) => acked += 1,
                    Err(e) => {
                        let message = e.to_string();
                        let (_, code) = ApiError::Engine(e).status_code();
                        failed.push(serde_json::json!({
                            "receipt": r.0, "code": code, "message": message
                        }));
                    }
                }
            }
            Ok(ok_json(
                &serde_json::json!({ "acked": acked, "failed": failed }),
            ))
        }
        _ => Err(ApiError::Request(
            "send either `receipt` or `receipts`".into(),
        )),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct VisibilityBody {
    receipt: String,
    timeout_seconds: Option<f64>,
}

async fn visibility(
    State(api): State<Api>,
    ApiPath(queue): ApiPath<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    public(&queue, EngineError::UnknownQueue)?;
    let b: VisibilityBody = json(&body(&api, raw)?)?;
    let timeout = seconds("timeout_seconds", b.timeout_seconds)?
        .ok_or_else(|| ApiError::Request("timeout_seconds is required".into()))?;
    let r = api
        .engine
        .change_visibility(&queue, &Receipt(b.receipt), timeout)
        .await?;
    Ok(ok_json(&serde_json::json!({ "receipt": r.0 })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    receipt: String,
}

async fn release(
    State(api): State<Api>,
    ApiPath(queue): ApiPath<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    public(&queue, EngineError::UnknownQueue)?;
    let b: ReleaseBody = json(&body(&api, raw)?)?;
    api.engine
        .change_visibility(&queue, &Receipt(b.receipt), Duration::ZERO)
        .await?;
    Ok(ok_json(&serde_json::json!({ "released": 1 })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RedriveBody {
    max_messages: Option<usize>,
}

async fn redrive(
    State(api): State<Api>,
    ApiPath(queue): ApiPath<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    public(&queue, EngineError::UnknownQueue)?;
    let b: RedriveBody = json(&body(&api, raw)?)?;
    let moved = api
        .engine
        .redrive(&queue, b.max_messages.unwrap_or(10_000).clamp(1, 100_000))
        .await?;
    Ok(ok_json(&serde_json::json!({ "moved": moved })))
}

async fn queue_stats(
    State(api): State<Api>,
    ApiPath(queue): ApiPath<String>,
) -> Result<Response, ApiError> {
    public(&queue, EngineError::UnknownQueue)?;
    let s = api.engine.queue_stats(&queue).await?;
    Ok(ok_json(&serde_json::json!({
        "queue": queue,
        "ready": s.ready,
        "in_flight": s.in_flight,
        "delayed": s.delayed,
        "dead_lettered": s.dead_lettered,
    })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PutQuery {
    partition_key: Option<String>,
}

async fn put_records(
    State(api): State<Api>,
    ApiPath(stream): ApiPath<String>,
    ApiQuery(q): ApiQuery<PutQuery>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let evs = events(&api, &headers, body(&api, raw)?)?;
    let records = evs
        .into_iter()
        .map(|event| OutgoingRecord {
            event,
            partition_key: q.partition_key.clone(),
        })
        .collect();
    let out = api.engine.put_records(&stream, records).await?;
    let results: Vec<_> = out
        .iter()
        .map(|p| serde_json::json!({ "partition": p.partition, "sequence": p.sequence }))
        .collect();
    Ok(ok_json(&serde_json::json!({ "results": results })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReadQuery {
    iterator: Option<String>,
    limit: Option<usize>,
    wait_seconds: Option<f64>,
}

async fn read_records(
    State(api): State<Api>,
    ApiPath((stream, partition)): ApiPath<(String, u32)>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> Result<Response, ApiError> {
    let iterator = q.iterator.as_deref().unwrap_or("trim_horizon");
    let from = StreamPosition::parse(iterator).ok_or_else(|| {
        ApiError::Request(format!(
            "iterator `{iterator}` is not one of trim_horizon, latest, at_sequence:N, after_sequence:N, at_timestamp:MS"
        ))
    })?;
    let wait = seconds("wait_seconds", q.wait_seconds)?.unwrap_or_default();
    let r = api
        .engine
        .read(&stream, partition, from, q.limit.unwrap_or(100), wait)
        .await?;
    let mut out = String::from("{\"records\":[");
    for (i, rec) in r.records.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let head = serde_json::json!({
            "partition": rec.partition,
            "sequence": rec.sequence,
            "timestamp_ms": rec.timestamp_ms,
            "partition_key": rec.partition_key,
        })
        .to_string();
        out.push_str(&head[..head.len() - 1]);
        out.push_str(",\"event\":");
        out.push_str(&String::from_utf8_lossy(&rec.event));
        out.push('}');
    }
    out.push_str("],\"next_iterator\":");
    out.push_str(&serde_json::Value::String(r.next.to_string()).to_string());
    out.push('}');
    Ok(json_response(StatusCode::OK, out))
}

async fn stream_stats(
    State(api): State<Api>,
    ApiPath(stream): ApiPath<String>,
) -> Result<Response, ApiError> {
    let parts = api.engine.stream_stats(&stream).await?;
    let parts: Vec<_> = parts
        .iter()
        .map(|p| {
            serde_json::json!({
                "partition": p.partition, "records": p.records, "next_sequence": p.next_sequence
            })
        })
        .collect();
    Ok(ok_json(
        &serde_json::json!({ "stream": stream, "partitions": parts }),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LeaseBody {
    consumer: String,
    ttl_seconds: Option<f64>,
}

/// The longest lease a consumer may ask for.
const MAX_LEASE_TTL: Duration = Duration::from_secs(300);

fn lease_json(l: &Lease) -> serde_json::Value {
    serde_json::json!({ "partition": l.partition, "token": l.token, "checkpoint": l.checkpoint })
}

async fn leases(
    State(api): State<Api>,
    ApiPath((stream, group)): ApiPath<(String, String)>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let b: LeaseBody = json(&body(&api, raw)?)?;
    let ttl = seconds("ttl_seconds", b.ttl_seconds)?.unwrap_or(Duration::from_secs(30));
    // A consumer that took its partitions for a day and died would stall
    // them for a day: renewals are cheap, a long lease is not.
    if ttl > MAX_LEASE_TTL || ttl.is_zero() {
        return Err(ApiError::Request(format!(
            "ttl_seconds must be more than 0 and at most {}",
            MAX_LEASE_TTL.as_secs()
        )));
    }
    let leases = api
        .engine
        .acquire_leases(&stream, &group, &b.consumer, ttl)
        .await?;
    let leases: Vec<_> = leases.iter().map(lease_json).collect();
    Ok(ok_json(&serde_json::json!({ "leases": leases })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CheckpointBody {
    consumer: String,
    token: u64,
    sequence: u64,
}

async fn checkpoint(
    State(api): State<Api>,
    ApiPath((stream, group, partition)): ApiPath<(String, String, u32)>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let b: CheckpointBody = json(&body(&api, raw)?)?;
    let lease = Lease {
        partition,
        token: b.token,
        checkpoint: None,
    };
    api.engine
        .checkpoint(&stream, &group, &b.consumer, &lease, b.sequence)
        .await?;
    Ok(ok_json(&serde_json::json!({ "checkpoint": b.sequence })))
}

async fn leave(
    State(api): State<Api>,
    ApiPath((stream, group, consumer)): ApiPath<(String, String, String)>,
) -> Result<Response, ApiError> {
    api.engine.leave_group(&stream, &group, &consumer).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    /// Every route the router serves, as written in the OpenAPI document.
    const ROUTES: &[(&str, &str)] = &[
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/openapi.json", "get"),
        ("/topics/{topic}/events", "post"),
        ("/queues/{queue}", "get"),
        ("/queues/{queue}/messages", "post"),
        ("/queues/{queue}/receive", "post"),
        ("/queues/{queue}/ack", "post"),
        ("/queues/{queue}/visibility", "post"),
        ("/queues/{queue}/release", "post"),
        ("/queues/{queue}/redrive", "post"),
        ("/streams/{stream}", "get"),
        ("/streams/{stream}/records", "post"),
        ("/streams/{stream}/partitions/{partition}/records", "get"),
        ("/streams/{stream}/groups/{group}/leases", "post"),
        (
            "/streams/{stream}/groups/{group}/partitions/{partition}/checkpoint",
            "put",
        ),
        (
            "/streams/{stream}/groups/{group}/consumers/{consumer}",
            "delete",
        ),
    ];

    #[test]
    fn openapi_documents_every_route_and_every_response_has_a_description() {
        let doc: serde_json::Value = serde_json::from_str(super::OPENAPI).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.0"));
        let paths = doc["paths"].as_object().unwrap();
        assert_eq!(paths.len(), ROUTES.len());
        for (path, method) in ROUTES {
            let op = &doc["paths"][path][method];
            assert!(op.is_object(), "{method} {path} missing");
            for (status, r) in op["responses"].as_object().unwrap() {
                assert!(r["description"].is_string(), "{method} {path} {status}");
            }
        }
    }
}
