//! Compact JWS verification for the asymmetric algorithms identity
//! providers sign with: EdDSA (Ed25519), ES256 and ES384 (P-256, P-384),
//! and RSA (RS256/384/512, PS256/384/512, keys of 2048 to 8192 bits), on
//! `ring`, and nothing else.
//!
//! Why not a JWT crate: `jsonwebtoken` 11 needs a crypto backend, and its
//! `rust_crypto` one pulls `rsa` 0.9 (RUSTSEC-2023-0071, no fixed release)
//! while its `aws_lc_rs` one is banned here (DEPENDENCIES.md); the other
//! crates either do the same or verify every algorithm by default. The
//! gateway needs one direction (verify), which is ~150 lines over `ring`
//! (already in the tree through rustls; its RSA verification is not the
//! `rsa` crate's, and verifying uses no secret for a timing attack to
//! find), `base64` and `serde_json` — small enough to read whole, and
//! strict by construction:
//!
//! - only the algorithms above exist; `none`, every `HS*` (HMAC, where a
//!   public key could be abused as the secret) and anything unknown are
//!   refused before any key is looked at;
//! - the key is chosen by `kid` (required) and pins the algorithm: a token
//!   whose `alg` differs from its key's is refused (an RSA key that pins
//!   RS256 never verifies a PS256 token, nor the reverse);
//! - `crit` is refused (no extension is understood), and `jku`/`x5u`/`jwk`
//!   headers are never used to find keys;
//! - base64url must be canonical and unpadded, the token at most
//!   `max_bytes`, and exactly three segments long.
//!
//! Claim checks (time, issuer, audience) live in `super`, on the verified
//! payload only.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::{Map, Value};

/// The algorithms a key may pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Alg {
    EdDsa,
    Es256,
    Es384,
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
}

impl Alg {
    pub(crate) fn from_name(name: &str) -> Option<Alg> {
        Some(match name {
            "EdDSA" => Alg::EdDsa,
            "ES256" => Alg::Es256,
            "ES384" => Alg::Es384,
            "RS256" => Alg::Rs256,
            "RS384" => Alg::Rs384,
            "RS512" => Alg::Rs512,
            "PS256" => Alg::Ps256,
            "PS384" => Alg::Ps384,
            "PS512" => Alg::Ps512,
            _ => return None,
        })
    }

    /// Whether a key of this algorithm is an RSA key.
    pub(crate) fn is_rsa(self) -> bool {
        !matches!(self, Alg::EdDsa | Alg::Es256 | Alg::Es384)
    }
}

/// A verification key's public part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Public {
    /// Ed25519: the 32-byte key; P-256 and P-384: the uncompressed point
    /// `04 || x || y`.
    Raw(Vec<u8>),
    /// RSA: the modulus and the exponent, big-endian.
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

/// A verification key from the JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Key {
    pub kid: String,
    pub alg: Alg,
    pub public: Public,
}

impl Key {
    fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        match &self.public {
            Public::Raw(public) => {
                let alg: &dyn signature::VerificationAlgorithm = match self.alg {
                    Alg::EdDsa => &signature::ED25519,
                    Alg::Es256 => &signature::ECDSA_P256_SHA256_FIXED,
                    Alg::Es384 => &signature::ECDSA_P384_SHA384_FIXED,
                    _ => return false,
                };
                UnparsedPublicKey::new(alg, public)
                    .verify(message, sig)
                    .is_ok()
            }
            Public::Rsa { n, e } => {
                let params = match self.alg {
                    Alg::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Alg::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    Alg::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    Alg::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
                    Alg::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
                    Alg::Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
                    _ => return false,
                };
                RsaPublicKeyComponents { n, e }
                    .verify(params, message, sig)
                    .is_ok()
            }
        }
    }
}

/// Why a token was refused before its claims were looked at. Each maps to
/// a metric reason; none is ever shown to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JwsError {
    Oversized,
    Malformed,
    /// `none`, HMAC or unknown.
    AlgNotAllowed,
    /// The token's `alg` is not its key's.
    AlgMismatch,
    UnknownKid,
    BadSignature,
}

impl JwsError {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            JwsError::Oversized => "oversized",
            JwsError::Malformed => "malformed",
            JwsError::AlgNotAllowed => "alg_not_allowed",
            JwsError::AlgMismatch => "alg_mismatch",
            JwsError::UnknownKid => "unknown_kid",
            JwsError::BadSignature => "bad_signature",
        }
    }
}

/// A token split and decoded, signature not yet checked.
#[derive(Debug)]
pub(crate) struct Unverified<'a> {
    pub alg: Alg,
    pub kid: String,
    signing_input: &'a [u8],
    signature: Vec<u8>,
    payload: Vec<u8>,
}

fn b64(segment: &str) -> Result<Vec<u8>, JwsError> {
    URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| JwsError::Malformed)
}

/// Whether a header's `typ` is one a bearer token may have: a JWT, or an
/// OAuth access token (`at+jwt`, which RFC 9068 §4 says resource servers
/// must accept, as `application/at+jwt` too). `typ` is a media type, so it
/// compares without regard to case and its `application/` may be left out
/// (RFC 7515 §4.1.9): providers write either form.
fn typ_allowed(typ: &str) -> bool {
    const APPLICATION: &str = "application/";
    let subtype = match typ.get(..APPLICATION.len()) {
        Some(prefix) if prefix.eq_ignore_ascii_case(APPLICATION) => &typ[APPLICATION.len()..],
        _ => typ,
    };
    subtype.eq_ignore_ascii_case("jwt") || subtype.eq_ignore_ascii_case("at+jwt")
}

/// Splits and decodes `token`, checking its header.
pub(crate) fn parse(token: &str, max_bytes: usize) -> Result<Unverified<'_>, JwsError> {
    if token.len() > max_bytes {
        return Err(JwsError::Oversized);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwsError::Malformed);
    };
    if h.is_empty() || p.is_empty() || s.is_empty() {
        return Err(JwsError::Malformed);
    }
    let header: Map<String, Value> =
        serde_json::from_slice(&b64(h)?).map_err(|_| JwsError::Malformed)?;
    let alg = match header.get("alg") {
        Some(Value::String(name)) => Alg::from_name(name).ok_or(JwsError::AlgNotAllowed)?,
        _ => return Err(JwsError::Malformed),
    };
    if header.contains_key("crit") {
        return Err(JwsError::Malformed);
    }
    if let Some(typ) = header.get("typ")
        && !typ.as_str().is_some_and(typ_allowed)
    {
        return Err(JwsError::Malformed);
    }
    let kid = match header.get("kid") {
        Some(Value::String(kid)) if !kid.is_empty() => kid.clone(),
        _ => return Err(JwsError::Malformed),
    };
    let signing_input = &token.as_bytes()[..h.len() + 1 + p.len()];
    Ok(Unverified {
        alg,
        kid,
        signing_input,
        signature: b64(s)?,
        payload: b64(p)?,
    })
}

/// The `iss` of a compact JWS's payload, unverified: which issuer's keys
/// to check it with. The token is checked in full by [`parse`] and
/// [`Unverified::verify`] after.
pub(crate) fn peek_issuer(token: &str) -> Result<String, JwsError> {
    #[derive(serde::Deserialize)]
    struct Claims {
        iss: Option<String>,
    }
    let payload = token.split('.').nth(1).ok_or(JwsError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&b64(payload)?).map_err(|_| JwsError::Malformed)?;
    claims.iss.ok_or(JwsError::Malformed)
}

impl Unverified<'_> {
    /// Checks the signature with `key` (which must pin the token's `alg`)
    /// and returns the payload's claims.
    pub(crate) fn verify(self, key: &Key) -> Result<Map<String, Value>, JwsError> {
        if key.alg != self.alg {
            return Err(JwsError::AlgMismatch);
        }
        if !key.verify(self.signing_input, &self.signature) {
            return Err(JwsError::BadSignature);
        }
        serde_json::from_slice(&self.payload).map_err(|_| JwsError::Malformed)
    }
}

#[cfg(test)]
pub(crate) mod test_keys {
    //! Signing, for tests only: the gateway never signs.
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};

    pub(crate) enum Signer {
        Ed(Ed25519KeyPair),
        Ec(EcdsaKeyPair),
        /// Signs RS256 or PS256 (the `alg` given), with the test key.
        Rsa(RsaKeyPair, Alg),
    }

    /// The tests' RSA key (`ring` cannot make one): see the fixture's
    /// README.
    pub(crate) const RSA_TEST_KEY: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/rsa-2048-test-only.pk8.der"
    ));

    impl Signer {
        pub(crate) fn ed25519() -> Signer {
            let rng = SystemRandom::new();
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| e.to_string());
            let pair = pkcs8
                .and_then(|p| Ed25519KeyPair::from_pkcs8(p.as_ref()).map_err(|e| e.to_string()));
            match pair {
                Ok(p) => Signer::Ed(p),
                Err(e) => panic!("{e}"),
            }
        }

        pub(crate) fn p256() -> Signer {
            let rng = SystemRandom::new();
            let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
            let pair = EcdsaKeyPair::generate_pkcs8(alg, &rng)
                .map_err(|e| e.to_string())
                .and_then(|p| {
                    EcdsaKeyPair::from_pkcs8(alg, p.as_ref(), &rng).map_err(|e| e.to_string())
                });
            match pair {
                Ok(p) => Signer::Ec(p),
                Err(e) => panic!("{e}"),
            }
        }

        /// `alg`: [`Alg::Rs256`] or [`Alg::Ps256`].
        pub(crate) fn rsa(alg: Alg) -> Signer {
            match RsaKeyPair::from_pkcs8(RSA_TEST_KEY) {
                Ok(p) => Signer::Rsa(p, alg),
                Err(e) => panic!("{e}"),
            }
        }

        pub(crate) fn key(&self, kid: &str) -> Key {
            let (alg, public) = match self {
                Signer::Ed(p) => (Alg::EdDsa, Public::Raw(p.public_key().as_ref().to_vec())),
                Signer::Ec(p) => (Alg::Es256, Public::Raw(p.public_key().as_ref().to_vec())),
                Signer::Rsa(p, alg) => {
                    let parts = RsaPublicKeyComponents::<Vec<u8>>::from(p.public());
                    (
                        *alg,
                        Public::Rsa {
                            n: parts.n,
                            e: parts.e,
                        },
                    )
                }
            };
            Key {
                kid: kid.into(),
                alg,
                public,
            }
        }

        pub(crate) fn sign(&self, header: &Value, claims: &Value) -> String {
            let input = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            );
            let rng = SystemRandom::new();
            let sig = match self {
                Signer::Ed(p) => p.sign(input.as_bytes()).as_ref().to_vec(),
                Signer::Ec(p) => match p.sign(&rng, input.as_bytes()) {
                    Ok(s) => s.as_ref().to_vec(),
                    Err(e) => panic!("{e}"),
                },
                Signer::Rsa(p, alg) => {
                    let padding: &dyn signature::RsaEncoding = match alg {
                        Alg::Ps256 => &signature::RSA_PSS_SHA256,
                        _ => &signature::RSA_PKCS1_SHA256,
                    };
                    let mut sig = vec![0; p.public().modulus_len()];
                    if let Err(e) = p.sign(padding, &rng, input.as_bytes(), &mut sig) {
                        panic!("{e}");
                    }
                    sig
                }
            };
            format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_keys::Signer;
    use super::*;
    use serde_json::json;

    fn claims() -> Value {
        json!({"sub": "u1", "exp": 4_000_000_000u64})
    }

    #[test]
    fn every_algorithm_verifies_with_its_key() {
        for (signer, alg) in [
            (Signer::ed25519(), "EdDSA"),
            (Signer::p256(), "ES256"),
            (Signer::rsa(Alg::Rs256), "RS256"),
            (Signer::rsa(Alg::Ps256), "PS256"),
        ] {
            let key = signer.key("k1");
            let token = signer.sign(&json!({"alg": alg, "kid": "k1", "typ": "JWT"}), &claims());
            let parsed = match parse(&token, 8192) {
                Ok(p) => p,
                Err(e) => panic!("{alg}: {e:?}"),
            };
            assert_eq!(parsed.kid, "k1");
            match parsed.verify(&key) {
                Ok(c) => assert_eq!(c["sub"], "u1"),
                Err(e) => panic!("{alg}: {e:?}"),
            }
        }
    }

    #[test]
    fn refuses_none_hmac_and_unknown_algs() {
        for alg in [
            "none", "None", "HS256", "HS384", "HS512", "ES512", "RS1", "EdDSA ", "rs256",
        ] {
            let token = format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode(json!({"alg": alg, "kid": "k"}).to_string()),
                URL_SAFE_NO_PAD.encode(claims().to_string()),
                URL_SAFE_NO_PAD.encode(b"sig"),
            );
            assert_eq!(
                parse(&token, 8192).err(),
                Some(JwsError::AlgNotAllowed),
                "{alg}"
            );
        }
    }

    #[test]
    fn alg_is_pinned_by_the_key() {
        let ed = Signer::ed25519();
        let ec = Signer::p256();
        // An ES256 token checked against an Ed25519 key with the same kid.
        let token = ec.sign(&json!({"alg": "ES256", "kid": "k"}), &claims());
        let parsed = parse(&token, 8192);
        assert!(parsed.is_ok());
        if let Ok(p) = parsed {
            assert_eq!(p.verify(&ed.key("k")).err(), Some(JwsError::AlgMismatch));
        }
        // One RSA key, two paddings: the key's is the only one it takes.
        let rs = Signer::rsa(Alg::Rs256);
        let ps = Signer::rsa(Alg::Ps256);
        let pss_token = ps.sign(&json!({"alg": "PS256", "kid": "k"}), &claims());
        let verify = |t: &str, key: &Key| parse(t, 8192).and_then(|p| p.verify(key)).err();
        assert_eq!(
            verify(&pss_token, &rs.key("k")),
            Some(JwsError::AlgMismatch)
        );
        // A PSS signature presented as PKCS#1 v1.5 does not verify.
        let relabelled = {
            let mut parts: Vec<String> = pss_token.split('.').map(String::from).collect();
            parts[0] = URL_SAFE_NO_PAD.encode(json!({"alg": "RS256", "kid": "k"}).to_string());
            parts.join(".")
        };
        assert_eq!(
            verify(&relabelled, &rs.key("k")),
            Some(JwsError::BadSignature)
        );
    }

    #[test]
    fn bad_signature_and_tampered_payload() {
        let s = Signer::ed25519();
        let other = Signer::ed25519();
        let token = s.sign(&json!({"alg": "EdDSA", "kid": "k"}), &claims());
        let verify = |t: &str, key: &Key| parse(t, 8192).and_then(|p| p.verify(key)).err();
        assert_eq!(
            verify(&token, &other.key("k")),
            Some(JwsError::BadSignature)
        );
        let mut parts: Vec<String> = token.split('.').map(String::from).collect();
        parts[1] =
            URL_SAFE_NO_PAD.encode(json!({"sub": "admin", "exp": 4_000_000_000u64}).to_string());
        assert_eq!(
            verify(&parts.join("."), &s.key("k")),
            Some(JwsError::BadSignature)
        );
    }

    #[test]
    fn malformed_shapes() {
        let s = Signer::ed25519();
        let good = s.sign(&json!({"alg": "EdDSA", "kid": "k"}), &claims());
        let e = |t: &str| parse(t, 8192).err();
        assert_eq!(e(""), Some(JwsError::Malformed));
        assert_eq!(e("a.b"), Some(JwsError::Malformed));
        assert_eq!(e(&format!("{good}.x")), Some(JwsError::Malformed));
        assert_eq!(e("..."), Some(JwsError::Malformed));
        assert_eq!(e("!!.a.b"), Some(JwsError::Malformed));
        // Padding is not allowed in JWS.
        let padded = good.replacen('.', "=.", 1);
        assert_eq!(e(&padded), Some(JwsError::Malformed));
        let header = |h: Value| format!("{}.e30.c2ln", URL_SAFE_NO_PAD.encode(h.to_string()));
        assert_eq!(
            e(&header(json!({"alg": "EdDSA"}))),
            Some(JwsError::Malformed),
            "no kid"
        );
        assert_eq!(
            e(&header(json!({"alg": "EdDSA", "kid": 7}))),
            Some(JwsError::Malformed)
        );
        assert_eq!(
            e(&header(json!({"kid": "k"}))),
            Some(JwsError::Malformed),
            "no alg"
        );
        assert_eq!(
            e(&header(
                json!({"alg": "EdDSA", "kid": "k", "crit": ["exp"]})
            )),
            Some(JwsError::Malformed)
        );
        assert_eq!(
            e(&header(json!({"alg": "EdDSA", "kid": "k", "typ": "JWE"}))),
            Some(JwsError::Malformed)
        );
        assert_eq!(e(&header(json!(["alg"]))), Some(JwsError::Malformed));
        assert_eq!(parse(&good, 10).err(), Some(JwsError::Oversized));
    }

    #[test]
    fn typ_is_a_media_type_of_a_jwt_or_an_access_token() {
        let typ = |t: Value| {
            let h = json!({"alg": "EdDSA", "kid": "k", "typ": t});
            let token = format!("{}.e30.c2ln", URL_SAFE_NO_PAD.encode(h.to_string()));
            parse(&token, 8192).err()
        };
        for ok in [
            "JWT",
            "jwt",
            "at+jwt",
            "AT+JWT",
            "application/jwt",
            "application/at+jwt",
            "Application/AT+JWT",
            "APPLICATION/JWT",
        ] {
            assert_eq!(typ(json!(ok)), None, "{ok}");
        }
        for bad in [
            "JWE",
            "application/jwe",
            "text/jwt",
            "application/",
            "application",
            "applicationjwt",
            "application/application/jwt",
            "at+jwt ",
            "secevent+jwt",
            "",
        ] {
            assert_eq!(typ(json!(bad)), Some(JwsError::Malformed), "{bad}");
        }
        assert_eq!(typ(json!(7)), Some(JwsError::Malformed));
        assert_eq!(typ(Value::Null), Some(JwsError::Malformed));
    }
}
