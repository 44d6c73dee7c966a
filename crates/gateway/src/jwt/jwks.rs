//! The verification keys: a JWKS fetched from the configured source,
//! refreshed in the background, and refetched on demand (at most once per
//! `refetch_min_interval`) when a token names a key id we do not know —
//! which is how a rotated-in key is picked up before the next refresh.
//!
//! A fetch that fails, or returns no usable key, leaves the last good set
//! in place: an outage of the identity service must not log everyone out.
//! Only keys that pin an algorithm we verify are kept (OKP/Ed25519 →
//! EdDSA, EC/P-256 → ES256, each with a `kid`); RSA, symmetric (`oct`) and
//! encryption keys are skipped, so a JWKS can never smuggle in an HMAC
//! secret.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use tokio::time::Instant;

use super::JwksSource;
use super::jws::{Alg, Key};
use crate::body;
use crate::client::{self, FetchClient};
use crate::upstream::Upstreams;

/// A JWKS document is a few keys; anything this large is not one.
const MAX_JWKS_BYTES: usize = 256 * 1024;
/// One fetch, including waiting for the identity service to activate.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// First retry delay after a failed background fetch; doubles up to the
/// refresh interval.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// The usable keys by id.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct KeySet {
    keys: HashMap<String, Arc<Key>>,
}

impl KeySet {
    pub(crate) fn get(&self, kid: &str) -> Option<Arc<Key>> {
        self.keys.get(kid).cloned()
    }

    fn kids(&self) -> Vec<&str> {
        let mut kids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        kids
    }
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: Option<String>,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

fn coordinate(v: &Option<String>) -> Option<Vec<u8>> {
    let bytes = URL_SAFE_NO_PAD.decode(v.as_deref()?).ok()?;
    (bytes.len() == 32).then_some(bytes)
}

impl Jwk {
    /// The key, if it is one we verify with; `None` skips it.
    fn into_key(self) -> Option<Key> {
        let kid = self.kid.filter(|k| !k.is_empty())?;
        if self.use_.as_deref().is_some_and(|u| u != "sig") {
            return None;
        }
        let (alg, public) = match (self.kty.as_deref()?, self.crv.as_deref()?) {
            ("OKP", "Ed25519") => (Alg::EdDsa, coordinate(&self.x)?),
            ("EC", "P-256") => {
                let mut point = vec![0x04];
                point.extend(coordinate(&self.x)?);
                point.extend(coordinate(&self.y)?);
                (Alg::Es256, point)
            }
            _ => return None,
        };
        // A key that names another algorithm than its curve implies is
        // inconsistent: skip it rather than guess.
        if let Some(named) = &self.alg
            && Alg::from_name(named) != Some(alg)
        {
            return None;
        }
        Some(Key { kid, alg, public })
    }
}

/// Why a JWKS could not be fetched or used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("no instance of `{0}` is ready to serve the JWKS")]
    NoInstance(String),
    #[error("cannot build the JWKS request")]
    Request(#[source] http::Error),
    #[error("the JWKS request failed")]
    Send(#[source] hyper_util::client::legacy::Error),
    #[error("the JWKS source answered {0}")]
    Status(StatusCode),
    #[error("cannot read the JWKS (larger than {MAX_JWKS_BYTES} bytes?)")]
    Body(#[source] body::BoxError),
    #[error("the JWKS is not valid JSON of the form {{\"keys\": [...]}}")]
    Json(#[source] serde_json::Error),
    #[error("the JWKS has no usable key (OKP/Ed25519 or EC/P-256 with a `kid`)")]
    NoUsableKeys,
    #[error(
        "the JWKS fetch took longer than {}",
        humantime::format_duration(FETCH_TIMEOUT)
    )]
    Timeout,
}

/// Parses a JWKS document, keeping the keys we can verify with.
pub(crate) fn parse(bytes: &[u8]) -> Result<KeySet, FetchError> {
    let jwks: Jwks = serde_json::from_slice(bytes).map_err(FetchError::Json)?;
    let mut keys = HashMap::new();
    let mut duplicates = Vec::new();
    for jwk in jwks.keys {
        if let Some(key) = jwk.into_key() {
            if keys.contains_key(&key.kid) {
                duplicates.push(key.kid.clone());
                continue;
            }
            keys.insert(key.kid.clone(), Arc::new(key));
        }
    }
    // Two keys under one id: which one signed a token is ambiguous.
    for kid in duplicates {
        keys.remove(&kid);
    }
    if keys.is_empty() {
        return Err(FetchError::NoUsableKeys);
    }
    Ok(KeySet { keys })
}

/// The current key set and how to get a new one.
pub(crate) struct KeyStore {
    source: JwksSource,
    client: FetchClient,
    upstreams: Arc<dyn Upstreams>,
    keys: RwLock<Arc<KeySet>>,
    /// Bumped whenever the set changes, so cached verifications made with
    /// a removed key are not trusted any more.
    version: AtomicU64,
    /// Held during every fetch: a request with an unknown kid waits for a
    /// fetch in progress (the first one, at start) instead of starting its
    /// own, and concurrent ones share one refetch.
    fetching: tokio::sync::Mutex<()>,
    /// The last refetch triggered by an unknown `kid` (attackers can send
    /// any kid, so these are rate-limited).
    on_demand: std::sync::Mutex<Option<Instant>>,
    refetch_min_interval: Duration,
}

impl KeyStore {
    pub(crate) fn new(
        source: JwksSource,
        client: FetchClient,
        upstreams: Arc<dyn Upstreams>,
        refetch_min_interval: Duration,
    ) -> KeyStore {
        KeyStore {
            source,
            client,
            upstreams,
            keys: RwLock::new(Arc::new(KeySet::default())),
            version: AtomicU64::new(0),
            fetching: tokio::sync::Mutex::new(()),
            on_demand: std::sync::Mutex::new(None),
            refetch_min_interval,
        }
    }

    pub(crate) fn current(&self) -> Arc<KeySet> {
        Arc::clone(&self.keys.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The key `kid`, refetching the set first if it is unknown and no
    /// on-demand refetch happened within `refetch_min_interval`.
    pub(crate) async fn key(&self, kid: &str) -> Option<Arc<Key>> {
        if let Some(key) = self.current().get(kid) {
            return Some(key);
        }
        let _fetching = self.fetching.lock().await;
        if let Some(key) = self.current().get(kid) {
            return Some(key);
        }
        let allowed = {
            let mut last = self.on_demand.lock().unwrap_or_else(|e| e.into_inner());
            let allowed = last.is_none_or(|t| t.elapsed() >= self.refetch_min_interval);
            if allowed {
                *last = Some(Instant::now());
            }
            allowed
        };
        if allowed {
            tracing::info!(target: "flotilla::gateway", kid, "unknown key id; refetching the JWKS");
            if let Err(e) = self.refresh_locked().await {
                tracing::warn!(target: "flotilla::gateway", error = %chain(&e), "JWKS refetch failed; keeping the last good set");
            }
        }
        self.current().get(kid)
    }

    /// Fetches the set and installs it if usable.
    pub(crate) async fn refresh(&self) -> Result<(), FetchError> {
        let _fetching = self.fetching.lock().await;
        self.refresh_locked().await
    }

    async fn refresh_locked(&self) -> Result<(), FetchError> {
        let set = tokio::time::timeout(FETCH_TIMEOUT, self.fetch())
            .await
            .map_err(|_| FetchError::Timeout)??;
        let mut current = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if **current != set {
            tracing::info!(target: "flotilla::gateway", kids = ?set.kids(), "JWKS updated");
            *current = Arc::new(set);
            self.version.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    async fn fetch(&self) -> Result<KeySet, FetchError> {
        let uri = match &self.source {
            JwksSource::Url(uri) => uri.clone(),
            JwksSource::Service { service, path } => {
                let mut ready = self.upstreams.ready(service);
                if ready.is_empty() {
                    // Bounded by the caller's FETCH_TIMEOUT.
                    let _ = self.upstreams.activate(service).await;
                    ready = self.upstreams.ready(service);
                }
                let endpoint = ready
                    .first()
                    .ok_or_else(|| FetchError::NoInstance(service.clone()))?;
                let pq = http::uri::PathAndQuery::try_from(path.as_str())
                    .map_err(|e| FetchError::Request(e.into()))?;
                client::service_uri(service, endpoint.addr, Some(&pq))
                    .map_err(FetchError::Request)?
            }
        };
        let request = Request::get(uri)
            .header(http::header::ACCEPT, "application/json")
            .body(body::empty())
            .map_err(FetchError::Request)?;
        let res = self
            .client
            .request(request)
            .await
            .map_err(FetchError::Send)?;
        if res.status() != StatusCode::OK {
            return Err(FetchError::Status(res.status()));
        }
        let bytes = Limited::new(res.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(FetchError::Body)?
            .to_bytes();
        parse(&bytes)
    }
}

/// Refreshes `store` every `interval`, retrying failures sooner; runs until
/// aborted (when the verifier that owns it is dropped).
pub(crate) async fn refresh_loop(store: Arc<KeyStore>, interval: Duration) {
    let mut retry = FIRST_RETRY;
    loop {
        match store.refresh().await {
            Ok(()) => {
                retry = FIRST_RETRY;
                tokio::time::sleep(interval).await;
            }
            Err(e) => {
                tracing::warn!(
                    target: "flotilla::gateway",
                    error = %chain(&e),
                    retry_in = ?retry.min(interval),
                    "JWKS fetch failed; keeping the last good set"
                );
                tokio::time::sleep(retry.min(interval)).await;
                retry = (retry * 2).min(interval);
            }
        }
    }
}

/// Checks a JWKS URL for config validation: plain `http://` with a host.
pub(crate) fn check_url(uri: &Uri) -> bool {
    uri.scheme_str() == Some("http") && uri.host().is_some()
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn keeps_ed25519_and_p256_skips_the_rest() {
        let x = b64(&[1; 32]);
        let y = b64(&[2; 32]);
        let doc = json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "ed", "alg": "EdDSA", "use": "sig"},
            {"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": "ec"},
            {"kty": "oct", "k": x, "kid": "hmac", "alg": "HS256"},
            {"kty": "RSA", "n": x, "e": "AQAB", "kid": "rsa"},
            {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "enc", "use": "enc"},
            {"kty": "OKP", "crv": "Ed25519", "x": x},
            {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "wrong-alg", "alg": "ES256"},
            {"kty": "OKP", "crv": "Ed25519", "x": b64(&[1; 31]), "kid": "short"},
            {"kty": "EC", "crv": "P-384", "x": x, "y": y, "kid": "p384"},
        ]});
        let set = match parse(doc.to_string().as_bytes()) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(set.kids(), ["ec", "ed"]);
        let ec = set.get("ec");
        assert_eq!(ec.as_ref().map(|k| k.alg), Some(Alg::Es256));
        assert_eq!(ec.map(|k| k.public.len()), Some(65));
        assert_eq!(set.get("ed").map(|k| k.alg), Some(Alg::EdDsa));
    }

    #[test]
    fn duplicate_kids_are_dropped_and_empty_sets_refused() {
        let x = b64(&[1; 32]);
        let doc = json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "a"},
            {"kty": "OKP", "crv": "Ed25519", "x": b64(&[3; 32]), "kid": "a"},
        ]});
        assert!(matches!(
            parse(doc.to_string().as_bytes()),
            Err(FetchError::NoUsableKeys)
        ));
        assert!(matches!(parse(b"{}"), Err(FetchError::Json(_))));
        assert!(matches!(
            parse(br#"{"keys": []}"#),
            Err(FetchError::NoUsableKeys)
        ));
    }
}
