//! The verification keys: a JWKS fetched from the configured source,
//! refreshed in the background, and refetched on demand (at most once per
//! `refetch_min_interval`) when a token names a key id we do not know —
//! which is how a rotated-in key is picked up before the next refresh.
//!
//! A fetch that fails, or answers with something that is not a JWKS (JSON
//! with a `keys` array), leaves the last good set in place: an outage of
//! the identity service must not log everyone out. A JWKS replaces it,
//! even one without a key we can use (`{"keys": []}`): that is how the
//! only key, a leaked one, is taken out, and the set is the source's word
//! on which keys are good. Then every token is refused, and a warning says
//! which keys were skipped and why. (Envoy refuses every token of a
//! `local_jwks` without a valid key too; its remote sets expire after
//! `cache_duration`, where ours are kept until replaced, so a set kept past
//! its revocation would verify the leaked key for good.)
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

    fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn kids(&self) -> Vec<&str> {
        let mut kids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        kids
    }
}

/// Each key is read on its own ([`parse`]): one whose field has the wrong
/// JSON type (`"kid": 5`) is skipped, not the whole set.
#[derive(Deserialize)]
struct Jwks {
    keys: Vec<serde_json::Value>,
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
    /// The key, if it is one we verify with; else why it is skipped.
    fn into_key(self) -> Result<Key, &'static str> {
        let kid = self.kid.filter(|k| !k.is_empty()).ok_or("no `kid`")?;
        if self.use_.as_deref().is_some_and(|u| u != "sig") {
            return Err("not a signing key (its `use` is not `sig`)");
        }
        let point = |len| {
            let mut point = vec![0x04];
            point.extend(coordinate(&self.x, len)?);
            point.extend(coordinate(&self.y, len)?);
            Some(Public::Raw(point))
        };
        let (alg, public) = match (self.kty.as_deref(), self.crv.as_deref()) {
            (Some("OKP"), Some("Ed25519")) => (
                Alg::EdDsa,
                Public::Raw(coordinate(&self.x, 32).ok_or("its `x` is not 32 bytes of base64url")?),
            ),
            (Some("EC"), Some("P-256")) => (
                Alg::Es256,
                point(32).ok_or("its `x` or `y` is not 32 bytes of base64url")?,
            ),
            (Some("EC"), Some("P-384")) => (
                Alg::Es384,
                point(48).ok_or("its `x` or `y` is not 48 bytes of base64url")?,
            ),
            (Some("RSA"), _) => {
                // An RSA key signs with the padding and hash its `alg`
                // names; without one, with RS256, as its issuers do.
                let alg = match self.alg.as_deref() {
                    None => Alg::Rs256,
                    Some(named) => Alg::from_name(named)
                        .filter(|a| a.is_rsa())
                        .ok_or("an RSA key whose `alg` is not RS256/384/512 or PS256/384/512")?,
                };
                let public = rsa(&self.n, &self.e)
                    .ok_or("an RSA key whose `n` is not of 2048 to 8192 bits, or whose `n` or `e` is malformed")?;
                (alg, public)
            }
            (Some("oct"), _) => return Err("a symmetric (`oct`) key, never taken from a JWKS"),
            _ => return Err("not OKP/Ed25519, EC/P-256 or P-384, or RSA"),
        };
        // A key that names another algorithm than its curve implies is
        // inconsistent: skip it rather than guess.
        if let Some(named) = &self.alg
            && Alg::from_name(named) != Some(alg)
        {
            return Err("its `alg` is not the one its key type and curve imply");
        }
        Ok(Key { kid, alg, public })
    }
}

/// A key of a JWKS we do not verify with, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Skipped {
    kid: Option<String>,
    why: &'static str,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kid {
            // Cut short: a JWKS is someone else's text, and a log line
            // should not carry a 256 KiB `kid`.
            Some(kid) if kid.chars().count() > 64 => {
                let cut: String = kid.chars().take(64).collect();
                write!(f, "{cut:?}…: {}", self.why)
            }
            Some(kid) => write!(f, "{kid:?}: {}", self.why),
            None => write!(f, "a key without a `kid`: {}", self.why),
        }
    }
}

/// The skipped keys, for a log line: the first 16, and how many more.
fn describe(skipped: &[Skipped]) -> String {
    const SHOWN: usize = 16;
    if skipped.is_empty() {
        return "none".into();
    }
    let mut out = skipped
        .iter()
        .take(SHOWN)
        .map(Skipped::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if skipped.len() > SHOWN {
        out.push_str(&format!("; and {} more", skipped.len() - SHOWN));
    }
    out
}

/// A JWKS document read: the keys we verify with, and those we skip.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub keys: KeySet,
    pub skipped: Vec<Skipped>,
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
        "the JWKS fetch took longer than {}",
        humantime::format_duration(FETCH_TIMEOUT)
    )]
    Timeout,
}

/// Parses a JWKS document, keeping the keys we can verify with. A set
/// with none is still a set (see the module's comment); only a document
/// that is not one is an error.
pub(crate) fn parse(bytes: &[u8]) -> Result<Parsed, FetchError> {
    let jwks: Jwks = serde_json::from_slice(bytes).map_err(FetchError::Json)?;
    let mut keys = HashMap::new();
    let mut skipped = Vec::new();
    let mut duplicates = Vec::new();
    for value in jwks.keys {
        // A key that is not even of the JWK's shape is one skipped, as one
        // of a kind we do not verify with is: were the whole document
        // refused for it, the last set would stay, and a key the provider
        // took out (a leaked one) would go on verifying.
        let jwk = match Jwk::deserialize(&value) {
            Ok(jwk) => jwk,
            Err(_) => {
                let kid = value.get("kid").and_then(|k| k.as_str()).map(String::from);
                skipped.push(Skipped {
                    kid,
                    why: "not a JWK: a field is not of its JSON type",
                });
                continue;
            }
        };
        let kid = jwk.kid.clone();
        match jwk.into_key() {
            Ok(key) if keys.contains_key(&key.kid) => duplicates.push(key.kid),
            Ok(key) => {
                keys.insert(key.kid.clone(), Arc::new(key));
            }
            Err(why) => skipped.push(Skipped { kid, why }),
        }
    }
    // Two keys under one id: which one signed a token is ambiguous.
    for kid in duplicates {
        if keys.remove(&kid).is_some() {
            skipped.push(Skipped {
                kid: Some(kid),
                why: "another key has the same `kid`",
            });
        }
    }
    Ok(Parsed {
        keys: KeySet { keys },
        skipped,
    })
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

    /// Fetches the set and installs it, unless the fetch failed or what
    /// came is not a JWKS.
    pub(crate) async fn refresh(&self) -> Result<(), FetchError> {
        let _fetching = self.fetching.lock().await;
        self.refresh_locked().await
    }

    async fn refresh_locked(&self) -> Result<(), FetchError> {
        let Parsed { keys: set, skipped } = tokio::time::timeout(FETCH_TIMEOUT, self.fetch())
            .await
            .map_err(|_| FetchError::Timeout)??;
        // Installed all the same (the module's comment says why), and
        // said at every fetch while it lasts: no token passes meanwhile.
        if set.is_empty() {
            tracing::warn!(
                target: "flotilla::gateway",
                skipped = %describe(&skipped),
                "the JWKS has no usable key (OKP/Ed25519, EC/P-256 or P-384, or RSA of 2048 to 8192 bits, with a `kid`): every token is refused until it has one"
            );
        }
        let mut current = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if **current != set {
            tracing::info!(target: "flotilla::gateway", kids = ?set.kids(), skipped = %describe(&skipped), "JWKS updated");
            *current = Arc::new(set);
            self.version.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    async fn fetch(&self) -> Result<Parsed, FetchError> {
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
async fn read_file(path: &std::path::Path) -> Result<Parsed, FetchError> {
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
        let Parsed { keys: set, skipped } = match parse(doc.to_string().as_bytes()) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(set.kids(), ["ec", "ed", "p384", "pss", "rs512", "rsa"]);
        // Each skipped key is named, with why, for the log.
        let why = |kid: Option<&str>| {
            skipped
                .iter()
                .find(|s| s.kid.as_deref() == kid)
                .map(|s| s.why)
        };
        assert_eq!(skipped.len(), 13, "{skipped:?}");
        assert_eq!(
            why(Some("hmac")),
            Some("a symmetric (`oct`) key, never taken from a JWKS")
        );
        assert_eq!(
            why(Some("enc")),
            Some("not a signing key (its `use` is not `sig`)")
        );
        assert_eq!(why(None), Some("no `kid`"));
        assert_eq!(
            why(Some("wrong-alg")),
            Some("its `alg` is not the one its key type and curve imply")
        );
        assert_eq!(
            why(Some("p521")),
            Some("not OKP/Ed25519, EC/P-256 or P-384, or RSA")
        );
        assert!(why(Some("rsa-small")).is_some_and(|w| w.contains("2048 to 8192")));
        assert!(why(Some("rsa-as-hmac")).is_some_and(|w| w.contains("`alg`")));
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

    /// A set without a usable key is a set (an empty one): only what is
    /// not a JWKS is an error.
    #[test]
    fn duplicate_kids_are_dropped_and_a_set_without_usable_keys_is_still_a_set() {
        let x = b64(&[1; 32]);
        let doc = json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "a"},
            {"kty": "OKP", "crv": "Ed25519", "x": b64(&[3; 32]), "kid": "a"},
            {"kty": "OKP", "crv": "Ed25519", "x": b64(&[4; 32]), "kid": "a"},
        ]});
        let parsed = parse(doc.to_string().as_bytes());
        assert!(
            matches!(&parsed, Ok(p) if p.keys.is_empty()
                && p.skipped == [Skipped { kid: Some("a".into()), why: "another key has the same `kid`" }]),
            "{parsed:?}"
        );
        let parsed = parse(br#"{"keys": []}"#);
        assert!(
            matches!(&parsed, Ok(p) if p.keys.is_empty() && p.skipped.is_empty()),
            "{parsed:?}"
        );
        // A key of the wrong shape is skipped, not the set.
        let doc = json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": 5},
            {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "b", "use": ["sig"]},
            "a string",
            {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "c"},
        ]});
        let parsed = parse(doc.to_string().as_bytes());
        let not_a_jwk = "not a JWK: a field is not of its JSON type";
        assert!(
            matches!(&parsed, Ok(p) if p.keys.kids() == ["c"]
            && p.skipped == [
                Skipped { kid: None, why: not_a_jwk },
                Skipped { kid: Some("b".into()), why: not_a_jwk },
                Skipped { kid: None, why: not_a_jwk },
            ]),
            "{parsed:?}"
        );
        for not_a_jwks in [&b"{}"[..], b"[]", br#"{"keys": {}}"#, b"{not json", b""] {
            assert!(
                matches!(parse(not_a_jwks), Err(FetchError::Json(_))),
                "{}",
                String::from_utf8_lossy(not_a_jwks)
            );
        }
    }

    #[test]
    fn a_skipped_key_is_logged_by_its_kid_cut_short() {
        let long = "k".repeat(100);
        let skipped: Vec<Skipped> = (0..20)
            .map(|n| Skipped {
                kid: (n > 0).then(|| {
                    if n == 1 {
                        long.clone()
                    } else {
                        format!("k{n}")
                    }
                }),
                why: "why",
            })
            .collect();
        let said = describe(&skipped);
        assert!(
            said.starts_with(&format!(
                "a key without a `kid`: why; \"{}\"…: why; \"k2\": why; ",
                "k".repeat(64)
            )),
            "{said}"
        );
        assert!(said.ends_with("; and 4 more"), "{said}");
        assert_eq!(describe(&[]), "none");
    }

    /// Keys from nowhere: a store of a file's keys never asks for one.
    struct NoUpstreams;

    impl Upstreams for NoUpstreams {
        fn ready(&self, _service: &str) -> Arc<[crate::upstream::Endpoint]> {
            Arc::from([])
        }

        fn activate(&self, _service: &str) -> crate::upstream::ActivateFuture {
            Box::pin(async { Ok(()) })
        }
    }

    /// An operator revokes the only key, a leaked one, by writing a set
    /// without it: the empty set replaces the last good one at once (and
    /// the version changes, so that no cached verification holds). A
    /// file that is not a JWKS, or is gone, keeps the last good set.
    #[tokio::test]
    async fn a_set_without_usable_keys_replaces_the_last_good_one_and_a_broken_one_does_not() {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let file = dir.path().join("jwks.json");
        let write = |doc: &str| {
            if let Err(e) = std::fs::write(&file, doc) {
                panic!("{e}");
            }
        };
        let connector = match client::connector(&crate::config::Limits::default(), None) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let store = KeyStore::new(
            JwksSource::File(file.clone()),
            client::fetch_client(connector),
            Arc::new(NoUpstreams),
            Duration::ZERO,
        );
        let good = json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": b64(&[1; 32]), "kid": "leaked"},
        ]})
        .to_string();
        let refreshed = |r: Result<(), FetchError>| match r {
            Ok(()) => {}
            Err(e) => panic!("{}", chain(&e)),
        };

        for unusable in [
            r#"{"keys": []}"#.to_string(),
            // Keys, none of which the gateway verifies with.
            json!({"keys": [{"kty": "oct", "k": b64(&[1; 32]), "kid": "hmac"}]}).to_string(),
        ] {
            write(&good);
            refreshed(store.refresh().await);
            assert!(store.current().get("leaked").is_some());
            let version = store.version();
            write(&unusable);
            refreshed(store.refresh().await);
            assert!(
                store.current().get("leaked").is_none(),
                "{unusable}: still verifying with the revoked key"
            );
            assert!(
                store.version() > version,
                "{unusable}: cached tokens outlive it"
            );
            assert!(store.key("leaked").await.is_none(), "{unusable}: refetched");
        }

        // Not a JWKS, or no file at all: a failed fetch, the set kept.
        write(&good);
        refreshed(store.refresh().await);
        let version = store.version();
        for broken in ["{not json", "{}", r#"{"keys": null}"#] {
            write(broken);
            let failed = store.refresh().await;
            assert!(matches!(failed, Err(FetchError::Json(_))), "{broken}");
            assert!(store.current().get("leaked").is_some(), "{broken}");
        }
        if let Err(e) = std::fs::remove_file(&file) {
            panic!("{e}");
        }
        assert!(matches!(store.refresh().await, Err(FetchError::File(..))));
        assert!(store.current().get("leaked").is_some());
        assert_eq!(store.version(), version);
    }
}
