//! The broker on the mesh: mutual TLS on every connection and the
//! building-block exposure check on every call.
//!
//! The check happens before routing, from the path alone, so no handler can
//! forget it: `/topics/{t}/events` needs `publish` on topic `t`,
//! `/queues/{q}/messages` `publish` on queue `q`, any other `/queues/{q}…`
//! `consume` on `q`, and `/streams/{s}…` `consume` on `s`. Putting records
//! into a stream directly needs `publish` on it, which no declaration grants:
//! streams are fed by their topic (`source`).
//! Health and the OpenAPI document are open to any peer of the system. A
//! name the check does not recognise (percent-encoded, say) is simply not
//! declared: the check fails closed. A stream's consumer group, which
//! must be the caller's own, is judged percent-decoded, as the handlers
//! read it: there an escape would not fail closed but pass as another
//! service's group.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use flotilla_mesh::{Action, Grants, ResourceKind, SpiffeId};
use http::{Method, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::Layer;

/// A handshake that has not finished by then frees its task.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The verified identity of the connection's peer.
#[derive(Debug, Clone)]
pub(crate) struct Peer(pub SpiffeId);

/// What a call needs, read from its path; `None` for open endpoints.
fn required(method: &Method, path: &str) -> Option<(ResourceKind, String, Action)> {
    let mut parts = path.trim_start_matches('/').split('/');
    let (kind, name) = (parts.next()?, parts.next()?);
    let rest = parts.next();
    match (kind, rest) {
        ("topics", _) => Some((ResourceKind::Topic, name.into(), Action::Publish)),
        ("queues", Some("messages")) if method == Method::POST => {
            Some((ResourceKind::Queue, name.into(), Action::Publish))
        }
        ("queues", _) => Some((ResourceKind::Queue, name.into(), Action::Consume)),
        ("streams", Some("records")) if method == Method::POST => {
            Some((ResourceKind::Stream, name.into(), Action::Publish))
        }
        ("streams", _) => Some((ResourceKind::Stream, name.into(), Action::Consume)),
        _ => None,
    }
}

/// The consumer group a stream call names (`/streams/{s}/groups/{g}/…`).
fn stream_group(path: &str) -> Option<&str> {
    let mut parts = path.trim_start_matches('/').split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("streams"), Some(_), Some("groups"), Some(group)) => Some(group),
        _ => None,
    }
}

/// Whether `group` is `service`'s: its name, or its name and `-` before
/// anything, unless a longer name of `services` claims it so (`orders-audit`
/// is the group of service `orders-audit`, not of `orders`). `push` is the
/// broker's own push delivery's, nobody else's. Every service that
/// consumes a stream could otherwise join, checkpoint or take the leases
/// of another's group, and skip or stall its records.
fn owns_group<'a>(service: &str, group: &str, mut services: impl Iterator<Item = &'a str>) -> bool {
    let claims = |name: &str| {
        group
            .strip_prefix(name)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
    };
    if group == crate::push::PUSH_GROUP || !claims(service) {
        return false;
    }
    !services.any(|other| other.len() > service.len() && claims(other))
}

fn denied(code: &str, message: String) -> Response {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    (
        StatusCode::FORBIDDEN,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `router` behind the exposure check of `grants`.
pub(crate) fn authorized(router: Router, grants: Grants) -> Router {
    let grants = Arc::new(grants);
    router.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let grants = Arc::clone(&grants);
            async move {
                let Some(Peer(caller)) = req.extensions().get::<Peer>().cloned() else {
                    // Only `serve` below builds this router, and it always sets
                    // the peer; refuse rather than guess if that ever changes.
                    return denied("unauthenticated", "no verified peer identity".into());
                };
                if let Some((kind, name, action)) = required(req.method(), req.uri().path())
                    && let Err(e) = grants.check(&caller, kind, &name, action)
                {
                    tracing::warn!(%caller, %kind, name, %action, "broker: refused a call: {e}");
                    return denied(e.code(), e.to_string());
                }
                // The handlers read the group percent-decoded (axum's
                // `Path`): decide on what they will see, or an escape
                // (`analytics-%61udit`) would pass as another name here.
                if let Some(group) = stream_group(req.uri().path())
                    .map(|raw| percent_encoding::percent_decode_str(raw).decode_utf8_lossy())
                    && !grants.is_operator(&caller)
                    && !owns_group(caller.service(), &group, grants.services())
                {
                    let service = caller.service();
                    tracing::warn!(%caller, group = %group, "broker: refused another's consumer group");
                    return denied(
                        "not_your_group",
                        format!(
                            "consumer group `{group}` is not service `{service}`'s: a service's groups are named `{service}` or `{service}-<anything>`"
                        ),
                    );
                }
                next.run(req).await
            }
        },
    ))
}

/// Resolves once `stop` is true (without holding its guard across awaits).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Serves `app` over mutual TLS until `stop` turns true. Handshakes run in
/// their own tasks with a deadline, so a stalled peer blocks nobody.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    acceptor: TlsAcceptor,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors, typically: back off briefly.
                    tracing::warn!("broker: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => return,
        };
        let (acceptor, app, mut stop) = (acceptor.clone(), app.clone(), stop.clone());
        tokio::spawn(async move {
            let (tls, peer) = match flotilla_mesh::accept_with_timeout(
                &acceptor,
                tcp,
                HANDSHAKE_TIMEOUT,
            )
            .await
            {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %flotilla_mesh::tls::error_chain(&e), "broker: refused a connection");
                    return;
                }
            };
            let svc = axum::Extension(Peer(peer)).layer(app);
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(tls), TowerToHyperService::new(svc));
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_path_needs_what_its_kind_allows() {
        let post = Method::POST;
        let get = Method::GET;
        assert_eq!(
            required(&post, "/topics/orders/events"),
            Some((ResourceKind::Topic, "orders".into(), Action::Publish))
        );
        assert_eq!(
            required(&post, "/queues/q/messages"),
            Some((ResourceKind::Queue, "q".into(), Action::Publish))
        );
        for p in ["/queues/q/receive", "/queues/q/ack", "/queues/q"] {
            assert_eq!(
                required(&post, p),
                Some((ResourceKind::Queue, "q".into(), Action::Consume)),
                "{p}"
            );
        }
        assert_eq!(
            required(&get, "/streams/s/partitions/0/records"),
            Some((ResourceKind::Stream, "s".into(), Action::Consume))
        );
        assert_eq!(
            required(&post, "/streams/s/records"),
            Some((ResourceKind::Stream, "s".into(), Action::Publish))
        );
        assert_eq!(required(&get, "/healthz"), None);
        assert_eq!(required(&get, "/openapi.json"), None);
    }

    /// Two services consume one stream: each may use its own groups only,
    /// not the other's nor the broker's `push`; the operator any.
    #[tokio::test]
    async fn a_service_uses_only_its_own_consumer_groups() {
        use tower::ServiceExt as _;
        let mut grants = Grants::new("shop", "local").unwrap();
        for service in ["analytics", "audit", "analytics-audit", "push"] {
            let mut declared = flotilla_mesh::exposure::Declared::default();
            declared.streams.insert("orders".into());
            grants.declare(service, declared).unwrap();
        }
        grants.allow_operator("flotilla-operator").unwrap();
        let app = authorized(
            Router::new().fallback(|| async { StatusCode::NO_CONTENT }),
            grants,
        );
        let call = |service: &str, path: &str| {
            let request = Request::builder()
                .method(Method::POST)
                .uri(path)
                .extension(Peer(SpiffeId::local("shop", service).unwrap()))
                .body(axum::body::Body::empty())
                .unwrap();
            let app = app.clone();
            async move { app.oneshot(request).await.unwrap().status() }
        };
        for (service, group, allowed) in [
            ("analytics", "analytics", true),
            ("analytics", "analytics-replay", true),
            ("analytics", "analyticsx", false),
            ("analytics", "audit", false),
            ("audit", "analytics", false),
            ("audit", "push", false),
            ("push", "push", false),
            ("analytics", "analytics-audit", false),
            ("analytics", "analytics-audit-x", false),
            ("analytics-audit", "analytics-audit-x", true),
            ("flotilla-operator", "push", true),
            // Judged as the handler reads it, decoded.
            ("analytics", "analytics-%61udit", false),
            ("analytics", "analytics-%61udit-x", false),
            ("audit", "%70ush", false),
            ("analytics", "%61nalytics", true),
        ] {
            for path in [
                format!("/streams/orders/groups/{group}/leases"),
                format!("/streams/orders/groups/{group}/partitions/0/checkpoint"),
            ] {
                let status = call(service, &path).await;
                let want = if allowed {
                    StatusCode::NO_CONTENT
                } else {
                    StatusCode::FORBIDDEN
                };
                assert_eq!(status, want, "{service} {path}");
            }
        }
        // Reading a partition names no group.
        let read = call("audit", "/streams/orders/partitions/0/records").await;
        assert_eq!(read, StatusCode::NO_CONTENT);
    }
}
