//! API keys for machine clients (`[gateway.api_keys]`, routes with
//! `auth = "key"`), as Kong's key-auth checks them: a partner's server, a
//! cron job or a device sends its key in a header of its own, and the
//! gateway lets it in as its consumer.
//!
//! The manifest holds each key's SHA-256, never the key: a leaked manifest
//! lets no one in, and a key (32 random bytes, say) cannot be found from
//! its digest. A request's key is hashed and looked up by its digest, so
//! the time taken says nothing about any key's bytes. The key header is
//! taken off the request before it is forwarded: a service never sees a
//! client's credential, only who it is (`x-flotilla-user-id`, the consumer).
//! A route may admit only some consumers (`consumers = [...]`); `per user`
//! rate limits count per consumer.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderName};

use crate::jwt::Identity;

/// A new API key and what the manifest keeps of it
/// ([`new_api_key`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewApiKey {
    /// `flk_` and 32 random bytes in unpadded base64url: for the client,
    /// shown once.
    pub key: String,
    /// `sha256:` and the key's SHA-256 in hex: for `[gateway.api_keys]`.
    pub digest: String,
}

/// A new random API key (32 bytes from the system's generator) and its
/// digest; `None` if the generator fails.
pub fn new_api_key() -> Option<NewApiKey> {
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes).ok()?;
    let key = format!(
        "flk_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let sum = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    Some(NewApiKey {
        digest: format!("sha256:{}", hex::encode(sum)),
        key,
    })
}

/// The keys of `[gateway.api_keys]`, ready to check requests against.
#[derive(Debug)]
pub(crate) struct KeyVerifier {
    header: HeaderName,
    /// Each key's SHA-256, to its consumer's identity.
    by_digest: HashMap<[u8; 32], Arc<Identity>>,
}

/// Why a request's key did not let it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyError {
    /// No key (or more than one) in the header.
    Missing,
    /// A key no consumer has.
    Invalid,
    /// A consumer's key, on a route that admits others only.
    NotAllowed,
}

impl KeyError {
    /// The reason, for `flotilla_gateway_auth_failures_total`.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            KeyError::Missing => "missing_api_key",
            KeyError::Invalid => "invalid_api_key",
            KeyError::NotAllowed => "consumer_not_allowed",
        }
    }
}

impl KeyVerifier {
    /// The verifier of `keys`; `None` if its header is no header name
    /// (the manifest refuses such a one).
    pub(crate) fn new(keys: &flotilla_manifest::ApiKeys) -> Option<KeyVerifier> {
        let header = HeaderName::from_bytes(keys.header.as_bytes()).ok()?;
        let by_digest = keys
            .consumers
            .iter()
            .flat_map(|(name, digests)| {
                let identity = Arc::new(Identity::consumer(name));
                digests.iter().map(move |d| (*d, Arc::clone(&identity)))
            })
            .collect();
        Some(KeyVerifier { header, by_digest })
    }

    /// The header keys come in.
    pub(crate) fn header(&self) -> &HeaderName {
        &self.header
    }

    /// The consumer whose key `headers` carry, if it is one of `allowed`
    /// (any, when empty). The key is taken out of `headers` either way.
    pub(crate) fn authenticate(
        &self,
        headers: &mut HeaderMap,
        allowed: &[String],
    ) -> Result<Arc<Identity>, KeyError> {
        let mut sent = match headers.entry(&self.header) {
            http::header::Entry::Occupied(e) => e.remove_entry_mult().1,
            http::header::Entry::Vacant(_) => return Err(KeyError::Missing),
        };
        let key = sent.next().ok_or(KeyError::Missing)?;
        if sent.next().is_some() {
            // Two keys: which one would be meant is a guess; refuse it.
            return Err(KeyError::Missing);
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        let digest: [u8; 32] = digest.as_ref().try_into().map_err(|_| KeyError::Invalid)?;
        let identity = self.by_digest.get(&digest).ok_or(KeyError::Invalid)?;
        if !allowed.is_empty() && !allowed.iter().any(|c| identity.consumer_name() == Some(c)) {
            return Err(KeyError::NotAllowed);
        }
        Ok(Arc::clone(identity))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use http::HeaderValue;

    use super::*;

    fn digest(key: &str) -> [u8; 32] {
        let d = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        d.as_ref().try_into().unwrap_or([0; 32])
    }

    fn verifier() -> KeyVerifier {
        let consumers = BTreeMap::from([
            (
                "partner-a".to_string(),
                vec![digest("key-a1"), digest("key-a2")],
            ),
            ("partner-b".to_string(), vec![digest("key-b")]),
        ]);
        let keys = flotilla_manifest::ApiKeys {
            header: "x-api-key".into(),
            consumers,
        };
        KeyVerifier::new(&keys).unwrap_or_else(|| panic!("a valid header"))
    }

    fn with_key(keys: &[&'static str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for key in keys {
            headers.append("x-api-key", HeaderValue::from_static(key));
        }
        headers.insert("accept", HeaderValue::from_static("*/*"));
        headers
    }

    #[test]
    fn a_new_key_is_random_and_its_digest_lets_it_in() {
        let (Some(one), Some(two)) = (new_api_key(), new_api_key()) else {
            panic!("no random bytes");
        };
        assert_ne!(one.key, two.key);
        assert!(
            one.key.starts_with("flk_") && one.key.len() == 47,
            "{}",
            one.key
        );
        assert!(one.digest.starts_with("sha256:") && one.digest.len() == 71);
        let keys = flotilla_manifest::ApiKeys {
            header: "x-api-key".into(),
            consumers: BTreeMap::from([("p".to_string(), vec![digest(&one.key)])]),
        };
        assert_eq!(
            one.digest,
            format!("sha256:{}", hex::encode(digest(&one.key)))
        );
        let verifier = KeyVerifier::new(&keys).unwrap_or_else(|| panic!("a valid header"));
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-api-key",
            HeaderValue::from_str(&one.key).unwrap_or_else(|e| panic!("{e}")),
        );
        assert!(verifier.authenticate(&mut headers, &[]).is_ok());
    }

    #[test]
    fn a_key_names_its_consumer_and_never_goes_further() {
        let keys = verifier();
        for (key, consumer) in [
            ("key-a1", "partner-a"),
            ("key-a2", "partner-a"),
            ("key-b", "partner-b"),
        ] {
            let mut headers = with_key(&[key]);
            let id = keys.authenticate(&mut headers, &[]);
            assert_eq!(
                id.map(|i| i.consumer_name().cloned()),
                Ok(Some(consumer.to_string())),
                "{key}"
            );
            assert!(!headers.contains_key("x-api-key"), "the key is taken off");
            assert!(headers.contains_key("accept"));
        }
        let only_b = ["partner-b".to_string()];
        assert_eq!(
            keys.authenticate(&mut with_key(&["key-a1"]), &only_b).err(),
            Some(KeyError::NotAllowed)
        );
        for (sent, error) in [
            (&[][..], KeyError::Missing),
            (&["key-a1", "key-b"][..], KeyError::Missing),
            (&["key-c"][..], KeyError::Invalid),
            // A digest is not a key.
            (&["sha256:0000"][..], KeyError::Invalid),
        ] {
            let mut headers = with_key(sent);
            assert_eq!(
                keys.authenticate(&mut headers, &[]).err(),
                Some(error),
                "{sent:?}"
            );
            assert!(!headers.contains_key("x-api-key"));
        }
    }
}
