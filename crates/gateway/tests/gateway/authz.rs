//! External authorization (`[gateway.authz]`) through a real gateway: a
//! policy service of its own decides, by the credentials it is shown,
//! whether a request goes on, with what, or what the client is told.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use flotilla_gateway::{Endpoint, Load};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::support::*;

const T: Duration = Duration::from_secs(5);

/// A check as the policy service saw it.
#[derive(Debug, Clone)]
struct Asked {
    method: String,
    uri: String,
    headers: http::HeaderMap,
}

/// The policy service: who `Authorization` names decides the answer.
/// `Bearer alice` is let in as tenant `acme`; `Bearer bob` is sent to sign
/// in; `Bearer broken` gets a 500; `Bearer slow` never an answer; anyone
/// else a 401 with the service's own challenge and body.
struct Policy {
    endpoint: Endpoint,
    asked: Arc<Mutex<Vec<Asked>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl Policy {
    async fn start() -> Policy {
        let listener = ok(TcpListener::bind("127.0.0.1:0").await, "bind policy");
        let addr = ok(listener.local_addr(), "policy addr");
        let asked = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&asked);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req| decide(Arc::clone(&seen), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Policy {
            endpoint: Endpoint {
                instance: "policy-0".into(),
                addr,
                load: Arc::new(Load::default()),
            },
            asked,
            _task: task,
        }
    }

    fn asked(&self) -> Vec<Asked> {
        self.asked.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

async fn decide(
    seen: Arc<Mutex<Vec<Asked>>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let who = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    seen.lock().unwrap_or_else(|e| e.into_inner()).push(Asked {
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        headers: req.headers().clone(),
    });
    let answer = |status: u16, fields: &[(&str, &str)], body: &'static str| {
        let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *res.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
        for (n, v) in fields {
            res.headers_mut().append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap_or(http::header::WARNING),
                http::HeaderValue::from_str(v).unwrap_or(http::HeaderValue::from_static("?")),
            );
        }
        Ok(res)
    };
    match who.as_str() {
        "Bearer alice" => answer(200, &[("x-tenant", "acme"), ("x-other", "no")], "ok"),
        "Bearer bob" => answer(302, &[("location", "/sign-in?next=%2Fapi")], ""),
        "Bearer broken" => answer(500, &[], "oops"),
        "Bearer slow" => {
            std::future::pending::<()>().await;
            answer(200, &[], "")
        }
        _ => answer(
            401,
            &[
                ("www-authenticate", "Bearer realm=\"policy\""),
                ("content-type", "application/json"),
            ],
            "{\"error\":\"who are you?\"}",
        ),
    }
}

fn authz(failure_open: bool) -> flotilla_manifest::Authz {
    flotilla_manifest::Authz {
        service: "policy".into(),
        path_prefix: "/check".into(),
        timeout: Duration::from_millis(300),
        request_headers: vec!["authorization".into()],
        upstream_headers: vec!["x-tenant".into()],
        failure_open,
    }
}

async fn checked_gateway(
    failure_open: bool,
    access_log: Option<std::path::PathBuf>,
) -> (flotilla_gateway::Gateway, Upstream, Policy, Arc<Registry>) {
    let registry = Registry::new();
    let up = Upstream::start("things-0").await;
    registry.set("things", vec![up.endpoint()]);
    let policy = Policy::start().await;
    registry.set("policy", vec![policy.endpoint.clone()]);
    let mut checked = route("things", "/api/**", &[], T);
    checked.authz = true;
    let open = route("things", "/public/**", &[], T);
    let mut cfg = config(vec![checked, open]);
    cfg.authz = Some(authz(failure_open));
    cfg.access_log = access_log;
    let gateway = start(cfg, &registry).await;
    (gateway, up, policy, registry)
}

/// Allowed, refused with the service's own answer, sent to sign in: the
/// check decides, with what it was shown, and only the headers it may set
/// go on.
#[tokio::test]
async fn the_policy_service_decides_and_its_answer_is_the_clients() {
    let (gateway, up, policy, _registry) = checked_gateway(false, None).await;
    let client = Client::new(&gateway);
    let allowed = |outcome: &str| {
        metric_sum(&[
            "flotilla_gateway_authz_total",
            "route=\"/api/**\"",
            &format!("outcome=\"{outcome}\""),
        ])
    };
    let (allowed_before, denied_before) = (allowed("allowed"), allowed("denied"));

    // Let in: the instance gets the tenant the check decided, not the
    // one the client claimed, nor any other field of the answer.
    let reply = client
        .request(
            Method::POST,
            "/api/things?page=2",
            &[
                ("authorization", "Bearer alice"),
                ("x-tenant", "evil"),
                // The same variable as `x-tenant` to a CGI-style server.
                ("x_tenant", "evil"),
                ("cookie", "session=1"),
                ("content-type", "application/json"),
            ],
            Bytes::from_static(b"{\"a\":1}"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let seen = reply.json();
    assert_eq!(seen["headers"]["x-tenant"], "acme", "{seen}");
    assert!(seen["headers"].get("x_tenant").is_none(), "{seen}");
    assert!(seen["headers"].get("x-other").is_none(), "{seen}");
    assert_eq!(seen["body_len"], 7, "the body went on");
    // The check: the method, the prefix and the path and query, the host,
    // the headers it reads and what the gateway tells every instance; no
    // body, no cookie.
    let asked = policy.asked();
    assert_eq!(asked.len(), 1, "{asked:?}");
    let a = &asked[0];
    assert_eq!(
        (a.method.as_str(), a.uri.as_str()),
        ("POST", "/check/api/things?page=2")
    );
    assert_eq!(a.headers["authorization"], "Bearer alice");
    assert_eq!(a.headers["host"], gateway.local_addr().to_string());
    assert!(a.headers.get("cookie").is_none() && a.headers.get("x-tenant").is_none());
    assert_eq!(a.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(a.headers["x-request-id"], reply.header("x-request-id"));
    assert!(
        a.headers.get("content-length").is_none_or(|l| l == "0"),
        "{a:?}"
    );

    // Refused: the service's status, challenge and body, and the instance
    // never asked.
    let hits = up.hits();
    let reply = client
        .request(
            Method::GET,
            "/api/things",
            &[("x-tenant", "acme"), ("x-request-id", "client-chosen-1")],
            Bytes::new(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{reply:?}");
    assert_eq!(reply.header("www-authenticate"), "Bearer realm=\"policy\"");
    // The client's own request id, which the gateway keeps, is the check's.
    let last = policy.asked().pop().map(|a| a.headers);
    assert_eq!(
        last.as_ref()
            .and_then(|h| h.get("x-request-id"))
            .map(|v| v.as_bytes()),
        Some(&b"client-chosen-1"[..])
    );
    assert_eq!(reply.json()["error"], "who are you?");
    assert!(
        !reply.header("x-request-id").is_empty(),
        "still the gateway's answer"
    );
    let reply = client
        .request(
            Method::GET,
            "/api/things",
            &[("authorization", "Bearer bob")],
            Bytes::new(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::FOUND, "{reply:?}");
    assert_eq!(reply.header("location"), "/sign-in?next=%2Fapi");
    assert_eq!(up.hits(), hits, "a refused request reached the instance");

    // A route without `authz` asks nothing.
    let before = policy.asked().len();
    let reply = client.get("/public/page").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(policy.asked().len(), before);

    assert_eq!(allowed("allowed"), allowed_before + 1);
    assert_eq!(allowed("denied"), denied_before + 2);
    // And how long each took, in the request-duration buckets.
    let timed = metric_sum(&[
        "flotilla_gateway_authz_duration_seconds_bucket",
        "route=\"/api/**\"",
        "le=\"+Inf\"",
    ]);
    assert!(timed >= 3, "{timed} checks timed");
    gateway.shutdown(T).await;
}

/// A check that decides nothing (an error, no answer in time, no
/// instance) refuses the request with 503 by default, and lets it through
/// with `failure = "allow"`.
#[tokio::test]
async fn a_check_that_fails_refuses_unless_failure_is_allow() {
    let dir = TestDir::new();
    let log = path_buf(&dir, "access.log");
    let (gateway, up, _policy, registry) = checked_gateway(false, Some(log.clone())).await;
    let client = Client::new(&gateway);
    for who in ["Bearer broken", "Bearer slow"] {
        let reply = client
            .request(
                Method::GET,
                "/api/things",
                &[("authorization", who)],
                Bytes::new(),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{who}: {reply:?}"
        );
        assert_eq!(reply.json()["error"]["code"], "authz_unavailable", "{who}");
        assert_eq!(reply.header("retry-after"), "1");
    }
    registry.set("policy", Vec::new());
    let reply = client
        .request(
            Method::GET,
            "/api/things",
            &[("authorization", "Bearer alice")],
            Bytes::new(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    assert_eq!(up.hits(), 0);
    gateway.shutdown(T).await;
    // The access log says why each check decided nothing, which the
    // client is not told.
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let reasons: Vec<String> = text
        .lines()
        .map(|l| ok(serde_json::from_str::<serde_json::Value>(l), "a log line"))
        .map(|l| {
            format!(
                "{} {}",
                l["error"].as_str().unwrap_or("-"),
                l["reason"].as_str().unwrap_or("-")
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            "authz_unavailable status_5xx",
            "authz_unavailable timeout",
            "authz_unavailable no_instance"
        ],
        "{text}"
    );

    let (gateway, up, _policy, _registry) = checked_gateway(true, None).await;
    let client = Client::new(&gateway);
    let reply = client
        .request(
            Method::GET,
            "/api/things",
            &[("authorization", "Bearer broken"), ("x-tenant", "evil")],
            Bytes::new(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    // Let through undecided, but still without the client's word for
    // what only the check may say.
    assert!(reply.json()["headers"].get("x-tenant").is_none());
    assert_eq!(up.hits(), 1);
    gateway.shutdown(T).await;
}

/// `authz` on a route needs `[gateway.authz]`.
#[tokio::test]
async fn a_route_with_authz_needs_the_gateways_settings() {
    let mut r = route("things", "/api/**", &[], T);
    r.authz = true;
    let error = start_error(config(vec![r]), "authz without [gateway.authz]").await;
    assert!(
        error.contains("has `authz` but the gateway has no authorization service"),
        "{error}"
    );
}
