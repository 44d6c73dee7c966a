//! `GET /healthz` of the gateway itself: answered before routing so that no
//! service route (not even `/**`) can shadow it, and so that a health check
//! never depends on any upstream being up.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::future::{self, BoxFuture, FutureExt};
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response};
use tower::{Layer, Service};

use crate::body::{self, Body};

pub(crate) const PATH: &str = "/healthz";

#[derive(Debug, Clone, Default)]
pub(crate) struct HealthLayer;

impl<S> Layer<S> for HealthLayer {
    type Service = HealthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HealthService { inner }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct HealthService<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for HealthService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let is_health = req.uri().path() == PATH
            && (req.method() == Method::GET || req.method() == Method::HEAD);
        if !is_health {
            return self.inner.call(req).boxed();
        }
        let mut res = Response::new(body::full(r#"{"status":"ok"}"#));
        res.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        future::ready(Ok(res)).boxed()
    }
}
