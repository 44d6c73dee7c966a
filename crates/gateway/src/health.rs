//! `GET /healthz` of the gateway itself: answered before routing so that no
//! service route (not even `/**`) can shadow it, and so that a health check
//! never depends on any upstream being up. The front of the request path
//! (`server`) asks [`answer`] after request ids, the access log and load
//! shedding, and before the edge.

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response};

use crate::body::{self, Body};

pub(crate) const PATH: &str = "/healthz";

/// The health answer, if `req` asks for it.
pub(crate) fn answer(req: &Request<Body>) -> Option<Response<Body>> {
    let is_health =
        req.uri().path() == PATH && (req.method() == Method::GET || req.method() == Method::HEAD);
    if !is_health {
        return None;
    }
    let mut res = Response::new(body::full(r#"{"status":"ok"}"#));
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Some(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, uri: &str) -> Request<Body> {
        let mut req = Request::new(body::empty());
        *req.method_mut() = method;
        *req.uri_mut() = match uri.parse() {
            Ok(u) => u,
            Err(e) => panic!("{uri}: {e}"),
        };
        req
    }

    #[test]
    fn only_get_and_head_of_the_exact_path_are_answered() {
        let res = answer(&request(Method::GET, "/healthz?x=1"));
        assert!(res.is_some_and(|r| r.headers()[CONTENT_TYPE] == "application/json"));
        assert!(answer(&request(Method::HEAD, "/healthz")).is_some());
        assert!(answer(&request(Method::POST, "/healthz")).is_none());
        assert!(answer(&request(Method::GET, "/healthz/x")).is_none());
        assert!(answer(&request(Method::GET, "/")).is_none());
    }
}
