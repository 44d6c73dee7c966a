//! The routing layer: decides, per request, between a service route (passed
//! inward, with the matched [`Route`] in the request extensions), a 405, the
//! static files, or a 404.
//!
//! The current routes live behind [`RoutingState`] so that a reload swaps
//! them atomically; each request takes a snapshot at this layer, so requests
//! in flight finish with the configuration they were routed by.

use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use futures_util::future::{self, BoxFuture, FutureExt};
use http::{Method, Request, Response, StatusCode};
use tower::{Layer, Service, ServiceExt};
use tower_http::services::ServeDir;

use crate::body::{self, Body};
use crate::config::Config;
use crate::rejection::Rejection;
use crate::request_id::RequestId;
use crate::routes::{Match, Route, RouteTable, has_dot_segment};

/// The route a request was matched to; in request and response extensions.
#[derive(Debug, Clone)]
pub(crate) struct MatchedRoute(pub Arc<Route>);

/// One configuration's routing: the table and the static files.
#[derive(Debug)]
pub(crate) struct Routing {
    table: RouteTable,
    static_files: Option<ServeDir>,
}

impl Routing {
    pub(crate) fn new(config: &Config) -> Routing {
        Routing {
            table: RouteTable::new(&config.routes),
            static_files: config
                .static_dir
                .as_ref()
                .map(|dir| ServeDir::new(dir).append_index_html_on_directories(true)),
        }
    }
}

/// The routing in force; replaced whole on reload.
#[derive(Debug)]
pub(crate) struct RoutingState(RwLock<Arc<Routing>>);

impl RoutingState {
    pub(crate) fn new(routing: Routing) -> RoutingState {
        RoutingState(RwLock::new(Arc::new(routing)))
    }

    pub(crate) fn current(&self) -> Arc<Routing> {
        // A panic while holding the lock cannot leave an `Arc` half-written.
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn replace(&self, routing: Routing) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(routing);
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RouteLayer {
    state: Arc<RoutingState>,
}

impl RouteLayer {
    pub(crate) fn new(state: Arc<RoutingState>) -> RouteLayer {
        RouteLayer { state }
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = RouteService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RouteService {
            state: Arc::clone(&self.state),
            inner,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RouteService<S> {
    state: Arc<RoutingState>,
    inner: S,
}

impl<S> Service<Request<Body>> for RouteService<S>
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

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let request_id = req.extensions().get::<RequestId>().cloned();
        let reject = move |r: Rejection| future::ready(Ok(r.into_response(request_id.as_ref())));
        let path = req.uri().path();
        if has_dot_segment(path) {
            return reject(Rejection::BadPath).boxed();
        }
        let routing = self.state.current();
        match routing.table.find(req.method(), path) {
            Match::Route(route) => {
                let matched = MatchedRoute(route);
                req.extensions_mut().insert(matched.clone());
                let fut = self.inner.call(req).boxed();
                async move {
                    let mut res = fut.await?;
                    res.extensions_mut().insert(matched);
                    Ok(res)
                }
                .boxed()
            }
            Match::MethodNotAllowed(allow) => reject(Rejection::MethodNotAllowed {
                method: req.method().clone(),
                path: path.to_string(),
                allow,
            })
            .boxed(),
            Match::NotFound => {
                let not_found = Rejection::NotFound {
                    method: req.method().clone(),
                    path: path.to_string(),
                };
                let is_read = req.method() == Method::GET || req.method() == Method::HEAD;
                match routing.static_files.clone() {
                    Some(files) if is_read => {
                        let serve = files.oneshot(req).boxed();
                        async move {
                            let res = match serve.await {
                                Ok(res) => res,
                                Err(never) => match never {},
                            };
                            // A missing file gets the same JSON 404 as a missing route.
                            if res.status() == StatusCode::NOT_FOUND {
                                return reject(not_found).await;
                            }
                            Ok(res.map(body::boxed))
                        }
                        .boxed()
                    }
                    _ => reject(not_found).boxed(),
                }
            }
        }
    }
}
