//! The verification keys: a JWKS fetched from the configured source,
//! refreshed in the background, and refetched on demand (at most once per
//! `refetch_min_interval`) when a token names a key id we do not know —
//! which is how a rotated-in key is picked up before the next refresh.
//!
//! A fetch that fails, or returns no usable key, leaves the last good set
//! in place: an outage of the identity service must not log everyone out.
//! Only keys that pin an algorithm we verify are kept, each with a `kid`:
//! OKP/Ed25519 → EdDSA, EC/P-256 → ES256, EC/P-384 → ES384, and RSA keys
//! of 2048 to 8192 bits → the RS*/PS* algorithm their `alg` names, or
//! RS256 when they name none (Azure AD's and some others' keys carry no
//! `alg`; RS256 is what they sign with). Symmetric (`oct`) and encryption
//! keys are skipped, so a JWKS can never smuggle in an HMAC secret.

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
use super::jws::{Alg, Key, Public};
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
    /// RSA: the modulus and the exponent.
    n: Option<String>,
    e: Option<String>,
}

/// A base64url field of `len` bytes.
fn coordinate(v: &Option<String>, len: usize) -> Option<Vec<u8>> {
    let bytes = URL_SAFE_NO_PAD.decode(v.as_deref()?).ok()?;
    (bytes.len() == len).then_some(bytes)
}

/// RSA moduli `ring` verifies with (`RSA_*_2048_8192_*`).
const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=8192;

/// A base64url big-endian integer, without its leading zero bytes.
fn integer(v: &Option<String>) -> Option<Vec<u8>> {
    let bytes = URL_SAFE_NO_PAD.decode(v.as_deref()?).ok()?;
    let first = bytes.iter().position(|&b| b != 0)?;
    Some(bytes[first..].to_vec())
}

/// The RSA public key of a JWK's `n` and `e`, if its modulus has a size
/// we verify with.
fn rsa(n: &Option<String>, e: &Option<String>) -> Option<Public> {
    let (n, e) = (integer(n)?, integer(e)?);
    let bits = n.len() * 8 - n.first().map_or(8, |b| b.leading_zeros() as usize);
    RSA_BITS.contains(&bits).then_some(Public::Rsa { n, e })
}

impl Jwk {
    /// The key, if it is one we verify with; `None` skips it.
    fn into_key(self) -> Option<Key> {
        let kid = self.kid.filter(|k| !k.is_empty())?;
        if self.use_.as_deref().is_some_and(|u| u != "sig") {
            return None;
        }
        let point = |len| {
            let mut point = vec![0x04];
            point.extend(coordinate(&self.x, len)?);
            point.extend(coordinate(&self.y, len)?);
            Some(Public::Raw(point))
        };
        let (alg, public) = match (self.kty.as_deref()?, self.crv.as_deref()) {
            ("OKP", Some("Ed25519")) => (Alg::EdDsa, Public::Raw(coordinate(&self.x, 32)?)),
            ("EC", Some("P-256")) => (Alg::Es256, point(32)?),
            ("EC", Some("P-384")) => (Alg::Es384, point(48)?),
            ("RSA", _) => {
                // An RSA key signs with the padding and hash its `alg`
                // names; without one, with RS256, as its issuers do.
                let alg = match self.alg.as_deref() {
                    None => Alg::Rs256,
                    Some(named) => Alg::from_name(named).filter(|a| a.is_rsa())?,
                };
                (alg, rsa(&self.n, &self.e)?)
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
    #[error("cannot read the JWKS file `{}`", .0.display())]
    File(std::path::PathBuf, #[source] std::io::Error),
    #[error("the JWKS file `{}` is larger than {MAX_JWKS_BYTES} bytes", .0.display())]
    FileTooLarge(std::path::PathBuf),
    #[error("the JWKS source answered {0}")]
    Status(StatusCode),
    #[error("cannot read the JWKS (larger than {MAX_JWKS_BYTES} bytes?)")]
    Body(#[source] body::BoxError),
    #[error("the JWKS is not valid JSON of the form {{\"keys\": [...]}}")]
    Json(#[source] serde_json::Error),
    #[error(
        "the JWKS has no usable key (OKP/Ed25519, EC/P-256 or P-384, or RSA of 2048 to 8192 bits, with a `kid`)"
    )]
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
            JwksSource::File(path) => return read_file(path).await,
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

/// The key set in the JWKS file at `path`, read whole unless it is larger
/// than any JWKS is.
async fn read_file(path: &std::path::Path) -> Result<KeySet, FetchError> {
    use tokio::io::AsyncReadExt;
    let failed = |e| FetchError::File(path.to_path_buf(), e);
    let file = tokio::fs::File::open(path).await.map_err(failed)?;
    let mut bytes = Vec::new();
    // One byte past the limit tells a file that is too large.
    file.take(MAX_JWKS_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(failed)?;
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(FetchError::FileTooLarge(path.to_path_buf()));
    }
    parse(&bytes)
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

/// Checks a JWKS URL for config validation: `https://` or `http://`
/// with a host (the manifest's parser takes `http://` to loopback only).
pub(crate) fn check_url(uri: &Uri) -> bool {
    matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some()
}

pub(crate) fn chain(error: &dyn std::error::Error) -> String {
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
    fn keeps_the_keys_it_verifies_with_and_skips_the_rest() {
        let x = b64(&[1; 32]);
        let y = b64(&[2; 32]);
        let x48 = b64(&[1; 48]);
        let y48 = b64(&[2; 48]);
        // A 2048-bit modulus (its top bit set), one of 2047 bits, and one
        // with a leading zero byte, as some encoders write it.
        let mut n2048 = vec![0x80; 256];
        n2048[255] = 1;
        let n = b64(&n2048);
        let n2047 = b64(&[0x7f; 256]);
        let n_padded = b64(&[&[0u8][..], &n2048].concat());
        let doc = json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "ed", "alg": "EdDSA", "use": "sig"},
            {"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": "ec"},
            {"kty": "EC", "crv": "P-384", "x": x48, "y": y48, "kid": "p384", "alg": "ES384"},
            {"kty": "RSA", "n": n, "e": "AQAB", "kid": "rsa"},
            {"kty": "RSA", "n": n_padded, "e": "AQAB", "kid": "pss", "alg": "PS256"},
            {"kty": "RSA", "n": n, "e": "AQAB", "kid": "rs512", "alg": "RS512"},
            {"kty": "oct", "k": x, "kid": "hmac", "alg": "HS256"},
            {"kty": "RSA", "n": n, "e": "AQAB", "kid": "rsa-as-hmac", "alg": "HS256"},
            {"kty": "RSA", "n": n, "e": "AQAB", "kid": "rsa-as-ec", "alg": "ES256"},
            {"kty": "RSA", "n": n2047, "e": "AQAB", "kid": "rsa-small"},
            {"kty": "RSA", "n": x, "e": "AQAB", "kid": "rsa-tiny"},
            {"kty": "RSA", "e": "AQAB", "kid": "rsa-no-n"},
            {"kty": "RSA", "n": n, "e": "AA", "kid": "rsa-zero-e"},
            {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "enc", "use": "enc"},
            {"kty": "OKP", "crv": "Ed25519", "x": x},
            {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "wrong-alg", "alg": "ES256"},
            {"kty": "OKP", "crv": "Ed25519", "x": b64(&[1; 31]), "kid": "short"},
            {"kty": "EC", "crv": "P-384", "x": x, "y": y, "kid": "p384-short"},
            {"kty": "EC", "crv": "P-521", "x": x, "y": y, "kid": "p521"},
        ]});
        let set = match parse(doc.to_string().as_bytes()) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(set.kids(), ["ec", "ed", "p384", "pss", "rs512", "rsa"]);
        let alg = |kid: &str| set.get(kid).map(|k| k.alg);
        assert_eq!(alg("ec"), Some(Alg::Es256));
        assert_eq!(alg("ed"), Some(Alg::EdDsa));
        assert_eq!(alg("p384"), Some(Alg::Es384));
        assert_eq!(alg("rsa"), Some(Alg::Rs256), "no alg: RS256");
        assert_eq!(alg("pss"), Some(Alg::Ps256));
        assert_eq!(alg("rs512"), Some(Alg::Rs512));
        let public = |kid: &str| set.get(kid).map(|k| k.public.clone());
        assert!(matches!(public("ec"), Some(Public::Raw(p)) if p.len() == 65));
        assert!(matches!(public("p384"), Some(Public::Raw(p)) if p.len() == 97));
        assert!(
            matches!(public("pss"), Some(Public::Rsa { n, e }) if n == n2048 && e == [1, 0, 1]),
            "the leading zero is not part of the modulus"
        );
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
