//! Access tokens: compact JWS (RFC 7515) with `alg: EdDSA` (RFC 8037),
//! signed with `ring` directly.
//!
//! Why not a JWT crate: `jsonwebtoken` 11 needs a crypto backend; its
//! `rust_crypto` one pulls `rsa` 0.9 (RUSTSEC-2023-0071, no fixed release,
//! so `cargo deny` fails) and its `aws_lc_rs` one is banned here
//! (DEPENDENCIES.md). Signing one algorithm is a header, a payload, two
//! base64url encodings and one `Ed25519KeyPair::sign` — fewer lines than
//! configuring a crate, over `ring` (already in the tree through rustls),
//! `base64` and `serde_json`. The gateway verifies the same way
//! (`crates/gateway/src/jwt/jws.rs`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::Ed25519KeyPair;
use serde::{Deserialize, Serialize};

use crate::keys::SigningKey;

/// Access-token lifetime: short, because an access token cannot be revoked
/// before it expires (only its refresh family can).
pub const ACCESS_TTL_SECONDS: i64 = 900;

/// The scopes every shop user gets.
pub const USER_SCOPE: &str = "orders:read orders:write";

/// The protected header.
#[derive(Debug, Serialize)]
pub struct Header<'a> {
    pub alg: &'a str,
    pub typ: &'a str,
    pub kid: &'a str,
}

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub email: String,
    pub scope: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
}

impl Claims {
    /// Claims for `user` issued at `now`, valid for [`ACCESS_TTL_SECONDS`].
    pub fn access(issuer: &str, audience: &str, user_id: &str, email: &str, now: i64) -> Claims {
        Claims {
            iss: issuer.to_owned(),
            aud: audience.to_owned(),
            sub: user_id.to_owned(),
            email: email.to_owned(),
            scope: USER_SCOPE.to_owned(),
            iat: now,
            nbf: now,
            exp: now + ACCESS_TTL_SECONDS,
            jti: uuid::Uuid::new_v4().to_string(),
        }
    }
}

/// Signs `claims` with `key` as a compact JWT naming the key's `kid`.
pub fn sign(key: &SigningKey, claims: &Claims) -> String {
    let header = Header {
        alg: "EdDSA",
        typ: "JWT",
        kid: &key.kid,
    };
    // Serialising plain structs of strings and integers cannot fail.
    let header = serde_json::to_vec(&header).unwrap_or_default();
    let payload = serde_json::to_vec(claims).unwrap_or_default();
    compact(&key.pair, &header, &payload)
}

/// `b64(header) . b64(payload) . b64(Ed25519(b64(header) . b64(payload)))`.
fn compact(pair: &Ed25519KeyPair, header: &[u8], payload: &[u8]) -> String {
    let mut token = URL_SAFE_NO_PAD.encode(header);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(payload, &mut token);
    let signature = pair.sign(token.as_bytes());
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(signature.as_ref(), &mut token);
    token
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{ED25519, KeyPair, UnparsedPublicKey};
    use serde_json::Value;

    /// Verifies `token` against an Ed25519 public key with ring and returns
    /// (header, claims): what a verifier like the gateway does.
    pub(crate) fn verify(token: &str, public: &[u8]) -> (Value, Value) {
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3, "{token}");
        let signed = format!("{}.{}", parts[0], parts[1]);
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        UnparsedPublicKey::new(&ED25519, public)
            .verify(signed.as_bytes(), &sig)
            .expect("the signature verifies");
        let header = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        let claims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        (header, claims)
    }

    pub(crate) fn test_key() -> SigningKey {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        SigningKey {
            kid: crate::keys::thumbprint(pair.public_key().as_ref()),
            generation: 1,
            activates_at: 0,
            pair,
        }
    }

    #[test]
    fn matches_the_rfc_8037_example() {
        // RFC 8037 appendix A.1 (key) and A.4 (signature): Ed25519 is
        // deterministic, so the output must match byte for byte.
        let d = URL_SAFE_NO_PAD
            .decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
            .unwrap();
        let x = URL_SAFE_NO_PAD
            .decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
            .unwrap();
        let pair = Ed25519KeyPair::from_seed_and_public_key(&d, &x).unwrap();
        let token = compact(&pair, br#"{"alg":"EdDSA"}"#, b"Example of Ed25519 signing");
        assert_eq!(
            token,
            "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc.hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
        );
    }

    #[test]
    fn access_tokens_verify_and_carry_the_claims() {
        let key = test_key();
        let now = 1_700_000_000;
        let claims = Claims::access("shop-accounts", "shop", "user-1", "a@example.com", now);
        let token = sign(&key, &claims);
        let (header, body) = verify(&token, key.pair.public_key().as_ref());
        assert_eq!(header["alg"], "EdDSA");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["kid"], key.kid.as_str());
        assert_eq!(body["iss"], "shop-accounts");
        assert_eq!(body["aud"], "shop");
        assert_eq!(body["sub"], "user-1");
        assert_eq!(body["email"], "a@example.com");
        assert_eq!(body["scope"], "orders:read orders:write");
        assert_eq!(body["iat"], now);
        assert_eq!(body["nbf"], now);
        assert_eq!(body["exp"], now + 900);
        assert_eq!(body["jti"].as_str().unwrap().len(), 36);

        // Another token gets another jti; a tampered one does not verify.
        let again = sign(&key, &Claims::access("i", "a", "s", "e", now));
        let (_, other) = verify(&again, key.pair.public_key().as_ref());
        assert_ne!(other["jti"], body["jti"]);
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let forged = Claims {
            sub: "user-2".into(),
            ..claims
        };
        parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        let signed = format!("{}.{}", parts[0], parts[1]);
        let sig = URL_SAFE_NO_PAD.decode(&parts[2]).unwrap();
        assert!(
            UnparsedPublicKey::new(&ED25519, key.pair.public_key().as_ref())
                .verify(signed.as_bytes(), &sig)
                .is_err()
        );
    }
}
