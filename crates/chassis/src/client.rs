//! HTTP clients for a service's declared dependencies.
//!
//! One [`Client`] per dependency, bound to the URL the runtime gave in
//! `FLOTILLA_URL_<DEP>`, with timeouts on by default and errors that say
//! which of "could not connect", "too slow", "said no" or "said something
//! unreadable" happened, because callers answer each differently.
//!
//! When the instance has an identity, the client speaks mutual TLS 1.3: it
//! presents the instance's certificate (reloaded on renewal) and accepts a
//! server only if its SPIFFE id is the dependency's, so a service address
//! that led anywhere else fails the handshake. Connections are pooled and
//! reused, so handshakes are rare.
//!
//! Calls made while a request is handled carry its `x-request-id` and W3C
//! `traceparent` on, so the dependency's log lines for the call name the
//! same request and trace.

use std::sync::{Arc, Once};
use std::time::Duration;

use flotilla_mesh::{ExpectedPeer, Identity};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Error, request_id, trace};

/// Default time to establish a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default time for a whole call, body included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response body read: bounds the memory a misbehaving dependency
/// can make us allocate.
const MAX_BODY: usize = 8 << 20;
/// How much of a non-2xx body is kept in [`Error::Status`].
const SNIPPET: usize = 4096;

static CRYPTO: Once = Once::new();

/// rustls needs a process-wide provider because reqwest is built without
/// one (to keep aws-lc-rs out of the tree). "Already installed" is fine.
fn install_crypto_provider() {
    CRYPTO.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A client for one dependency.
#[derive(Debug, Clone)]
pub struct Client {
    dep: Arc<str>,
    base: Arc<str>,
    http: reqwest::Client,
    timeout: Duration,
    identity: Option<Identity>,
}

impl Client {
    pub(crate) fn new(dep: &str, base: String, identity: Option<Identity>) -> Result<Self, Error> {
        Self::build(
            dep,
            base,
            identity,
            DEFAULT_CONNECT_TIMEOUT,
            DEFAULT_TIMEOUT,
        )
    }

    fn build(
        dep: &str,
        base: String,
        identity: Option<Identity>,
        connect: Duration,
        total: Duration,
    ) -> Result<Self, Error> {
        install_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(connect)
            .timeout(total)
            // Dependency URLs are local service addresses: an HTTP(S)_PROXY
            // in the environment must not capture them.
            .no_proxy();
        if let Some(identity) = &identity {
            let config = flotilla_mesh::client_config(identity, ExpectedPeer::service(dep))
                .map_err(|source| Error::Identity { source })?;
            builder = builder.tls_backend_preconfigured(rustls::ClientConfig::clone(&config));
        }
        let http = builder.build().map_err(|source| Error::ClientBuild {
            dep: dep.to_owned(),
            source,
        })?;
        Ok(Client {
            dep: dep.into(),
            base: base.into(),
            http,
            timeout: total,
            identity,
        })
    }

    /// The same client with other timeouts (connect, whole call).
    pub fn with_timeouts(self, connect: Duration, total: Duration) -> Result<Self, Error> {
        Self::build(
            &self.dep,
            self.base.to_string(),
            self.identity.clone(),
            connect,
            total,
        )
    }

    /// The dependency's name.
    pub fn dependency(&self) -> &str {
        &self.dep
    }

    /// The base URL, without a trailing `/`.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The absolute URL of `path` (which should start with `/`).
    pub fn url(&self, path: &str) -> String {
        if path.starts_with('/') {
            format!("{}{path}", self.base)
        } else {
            format!("{}/{path}", self.base)
        }
    }

    /// The underlying reqwest client, for calls the helpers do not cover.
    /// It has the timeouts but does not add `x-request-id` or `traceparent`.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// `GET path`, expecting a 2xx JSON body of type `T`.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        let url = self.url(path);
        let request = self.http.get(&url);
        self.send(url, request).await
    }

    /// `POST path` with `body` as JSON, expecting a 2xx JSON body of type `T`.
    pub async fn post_json<B, T>(&self, path: &str, body: &B) -> Result<T, Error>
    where
        B: Serialize + ?Sized,
        T: DeserializeOwned,
    {
        let url = self.url(path);
        let bytes = serde_json::to_vec(body).map_err(|source| Error::Encode {
            url: url.clone(),
            source,
        })?;
        let request = self
            .http
            .post(&url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(bytes);
        self.send(url, request).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        url: String,
        mut request: reqwest::RequestBuilder,
    ) -> Result<T, Error> {
        request = request.header(http::header::ACCEPT, "application/json");
        if let Some(id) = request_id::current() {
            request = request.header(request_id::HEADER, id);
        }
        // Passed on unchanged: the chassis starts no spans of its own, and
        // the trace id is what joins the dependency's log lines to ours.
        if let Some(tp) = trace::current() {
            request = request.header(trace::TRACEPARENT, tp);
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| self.transport_error(&url, e))?;
        let status = response.status();
        let body = self.read_body(&url, &mut response).await?;
        if !status.is_success() {
            return Err(Error::Status {
                dep: self.dep.to_string(),
                url,
                status,
                body: snippet(&body),
            });
        }
        serde_json::from_slice(&body).map_err(|source| Error::BadJson {
            dep: self.dep.to_string(),
            url,
            source,
        })
    }

    async fn read_body(
        &self,
        url: &str,
        response: &mut reqwest::Response,
    ) -> Result<Vec<u8>, Error> {
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.transport_error(url, e))?
        {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(Error::TooLarge {
                    dep: self.dep.to_string(),
                    url: url.to_owned(),
                    limit: MAX_BODY,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    fn transport_error(&self, url: &str, e: reqwest::Error) -> Error {
        if e.is_timeout() {
            Error::Timeout {
                dep: self.dep.to_string(),
                url: url.to_owned(),
                timeout: self.timeout,
            }
        } else {
            Error::Unreachable {
                dep: self.dep.to_string(),
                url: url.to_owned(),
                source: e,
            }
        }
    }
}

/// The first [`SNIPPET`] bytes of `body` as text, cut on a char boundary.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(SNIPPET)]);
    let mut text = text.into_owned();
    if body.len() > SNIPPET {
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_join_with_one_slash() {
        let c = Client::new("pricing", "http://127.0.0.1:1".into(), None).unwrap();
        assert_eq!(c.url("/api/x"), "http://127.0.0.1:1/api/x");
        assert_eq!(c.url("api/x"), "http://127.0.0.1:1/api/x");
        assert_eq!(c.dependency(), "pricing");
    }

    #[test]
    fn snippets_are_bounded_and_lossy() {
        assert_eq!(snippet(b"short"), "short");
        let long = vec![b'a'; SNIPPET + 10];
        let s = snippet(&long);
        assert!(s.ends_with('…'));
        assert_eq!(s.chars().filter(|c| *c == 'a').count(), SNIPPET);
        assert_eq!(snippet(&[0xff, b'x']), "\u{fffd}x");
    }

    #[tokio::test]
    async fn unreachable_is_distinguished() {
        // A port nobody listens on: bound and held, never listening, so no
        // other test's socket can take it meanwhile (as after a close).
        let held = tokio::net::TcpSocket::new_v4().unwrap();
        held.bind(([127, 0, 0, 1], 0).into()).unwrap();
        let addr = held.local_addr().unwrap();
        let c = Client::new("pricing", format!("http://{addr}"), None).unwrap();
        let err = c.get_json::<serde_json::Value>("/x").await.unwrap_err();
        assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
        assert!(err.is_dependency_failure());
    }
}
