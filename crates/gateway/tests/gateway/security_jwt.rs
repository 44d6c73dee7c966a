//! JWT at the gateway, through a real gateway: every bad token is a 401
//! with `error="invalid_token"` and no detail, a narrow token is a 403, a
//! good one reaches the service with the identity headers and nothing the
//! client forged; keys rotate in through a rate-limited refetch and survive
//! a broken JWKS.

use std::time::Duration;

use bytes::Bytes;
use flotilla_gateway::{Gateway, JwksSource, JwtConfig, RouteAuth};
use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::keys::{Signer, b64, jwks, now};
use crate::support::*;

const T: Duration = Duration::from_secs(5);
const ISSUER: &str = "test-issuer";

struct Fixture {
    up: Upstream,
    jwks: JwksServer,
    gateway: Gateway,
    client: Client,
    _registry: std::sync::Arc<Registry>,
}

fn jwt_config(jwks: &JwksServer) -> JwtConfig {
    let source = ok(JwksSource::parse(&jwks.url), "jwks url");
    let mut jwt = JwtConfig::new(ISSUER, vec!["shop".into()], source);
    jwt.forward_claims = vec!["tenant".into()];
    jwt
}

/// A gateway with `/api/**` (jwt), `/admin/**` (jwt + scope `admin`),
/// `/staff/**` (jwt + Keycloak-style role `staff` or `ops`, and a verified
/// email), `/public/**` and `/feed/**` (optional) of service `service`,
/// keys from a JWKS of `signers`.
async fn fixture(
    service: &str,
    signers: &[&Signer],
    tweak: impl FnOnce(&mut JwtConfig),
) -> Fixture {
    let registry = Registry::new();
    let up = Upstream::start(&format!("{service}-0")).await;
    registry.set(service, vec![up.endpoint()]);
    let jwks = JwksServer::start(jwks(signers)).await;
    let mut api = route(service, "/api/**", &[], T);
    api.auth = RouteAuth::jwt();
    let mut admin = route(service, "/admin/**", &[], T);
    admin.auth = RouteAuth::Jwt {
        scopes: vec!["admin".into()],
        claims: Default::default(),
    };
    let mut staff = route(service, "/staff/**", &[], T);
    staff.auth = RouteAuth::Jwt {
        scopes: Vec::new(),
        claims: [
            ("realm_access.roles", vec!["staff", "ops"]),
            ("email_verified", vec!["true"]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
        .collect(),
    };
    let public = route(service, "/public/**", &[], T);
    let mut feed = route(service, "/feed/**", &[], T);
    feed.auth = RouteAuth::Optional;
    let mut cfg = config(vec![api, admin, staff, public, feed]);
    let mut jwt = jwt_config(&jwks);
    tweak(&mut jwt);
    cfg.jwt = vec![jwt];
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);
    Fixture {
        up,
        jwks,
        gateway,
        client,
        _registry: registry,
    }
}

fn claims() -> Value {
    let now = now();
    json!({
        "sub": "user-1",
        "iss": ISSUER,
        "aud": "shop",
        "exp": now + 900,
        "nbf": now - 10,
        "iat": now - 10,
        "tenant": "t1",
        "scope": "orders:read",
    })
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    if let Some(map) = claims.as_object_mut() {
        map.remove(key);
    }
    claims
}

async fn get(client: &Client, path: &str, token: Option<&str>, extra: &[(&str, &str)]) -> Reply {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = extra.to_vec();
    if let Some(a) = &auth {
        headers.push(("authorization", a));
    }
    client
        .request(Method::GET, path, &headers, Bytes::new())
        .await
}

fn assert_invalid_token(reply: &Reply, what: &str) {
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{what}: {reply:?}");
    assert_eq!(
        reply.header("www-authenticate"),
        "Bearer realm=\"flotilla\", error=\"invalid_token\"",
        "{what}"
    );
    let body = reply.json();
    assert_eq!(body["error"]["code"], "invalid_token", "{what}");
    // The same words for every failure: nothing to learn from.
    assert_eq!(
        body["error"]["message"], "the access token is invalid",
        "{what}"
    );
}

#[tokio::test]
async fn a_good_token_forwards_the_identity_and_strips_forged_headers() {
    let ed = Signer::ed25519("ed-1");
    let ec = Signer::p256("ec-1");
    // An identity provider's RSA keys: one whose JWK names PS256, one
    // whose JWK names no algorithm (RS256, as Azure AD's keys sign).
    let ps = Signer::rsa("ps-1", "PS256", true);
    let rs = Signer::rsa("rs-1", "RS256", false);
    let f = fixture("jwt-good", &[&ed, &ec, &ps, &rs], |_| {}).await;
    // Underscores too: CGI-style servers read `x_flotilla_user_id` as
    // `x-flotilla-user-id`.
    let forged = [
        ("x-flotilla-user-id", "admin"),
        ("X-Flotilla-User-Role", "root"),
        ("x_flotilla_user_id", "admin"),
        ("X_Forwarded_For", "203.0.113.9"),
        ("x-flotilla_user-tenant", "t0"),
    ];
    for signer in [&ed, &ec, &ps, &rs] {
        let token = signer.sign(&claims());
        let reply = get(&f.client, "/api/orders", Some(&token), &forged).await;
        assert_eq!(reply.status, StatusCode::OK, "{}: {reply:?}", signer.alg());
        let h = &reply.json()["headers"];
        assert_eq!(h["x-flotilla-user-id"], "user-1");
        assert_eq!(h["x-flotilla-user-tenant"], "t1");
        assert!(h.get("x-flotilla-user-role").is_none(), "{h}");
        for underscored in [
            "x_flotilla_user_id",
            "x_forwarded_for",
            "x-flotilla_user-tenant",
        ] {
            assert!(h.get(underscored).is_none(), "{h}");
        }
        // The token itself still reaches the service.
        assert_eq!(h["authorization"], format!("Bearer {token}"));
    }
    // Public routes never carry identity headers, forged or not.
    let reply = get(&f.client, "/public/x", None, &forged).await;
    assert_eq!(reply.status, StatusCode::OK);
    let h = &reply.json()["headers"];
    assert!(h.get("x-flotilla-user-id").is_none(), "{h}");
    assert!(h.get("x-flotilla-user-role").is_none(), "{h}");
    f.gateway.shutdown(T).await;
}

#[tokio::test]
async fn an_optional_route_takes_anyone_and_identifies_a_caller_with_a_token() {
    let key = Signer::ed25519("opt-1");
    let f = fixture("jwt-optional", &[&key], |_| {}).await;
    let forged = [("x-flotilla-user-id", "admin")];

    // No token, or a credential that is no bearer token: anonymous, and
    // nobody the client claims to be.
    for extra in [&forged[..], &[("authorization", "Basic dXNlcjpwdw==")]] {
        let reply = get(&f.client, "/feed/today", None, extra).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        let h = &reply.json()["headers"];
        assert!(h.get("x-flotilla-user-id").is_none(), "{h}");
    }
    // A good token: the caller is known.
    let token = key.sign(&claims());
    let reply = get(&f.client, "/feed/today", Some(&token), &forged).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["headers"]["x-flotilla-user-id"], "user-1");
    // A bad one is refused, as on a jwt route: a client that sent a token
    // meant to be someone, and must learn that it is not.
    let hits = f.up.hits();
    let expired = key.sign(&with(claims(), "exp", json!(now() - 120)));
    for bad in [expired.as_str(), "not-a-token"] {
        let reply = get(&f.client, "/feed/today", Some(bad), &[]).await;
        assert_invalid_token(&reply, bad);
    }
    assert_eq!(f.up.hits(), hits, "a bad token reached the service");
    f.gateway.shutdown(T).await;
}

#[tokio::test]
async fn every_bad_token_is_401_invalid_token_and_never_reaches_the_service() {
    let key = Signer::ed25519("k1");
    let impostor = Signer::ed25519("k1");
    let ec = Signer::p256("k1");
    let f = fixture("jwt-bad", &[&key], |_| {}).await;
    let now = now();

    // HMAC over the public key: the classic algorithm-confusion forgery.
    let hmac_token = {
        let header = json!({"alg": "HS256", "kid": "k1", "typ": "JWT"});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims().to_string().as_bytes())
        );
        let secret = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.public_bytes());
        let tag = ring::hmac::sign(&secret, input.as_bytes());
        format!("{input}.{}", b64(tag.as_ref()))
    };
    let none_token = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "kid": "k1"}).to_string().as_bytes()),
        b64(claims().to_string().as_bytes())
    );
    let none_signed = format!("{none_token}c2ln");
    let big = with(claims(), "pad", json!("x".repeat(9000)));
    let cases: Vec<(&str, String, &str)> = vec![
        ("alg none", none_token, "malformed"),
        ("alg none with a signature", none_signed, "alg_not_allowed"),
        ("HMAC with the public key", hmac_token, "alg_not_allowed"),
        ("bad signature", impostor.sign(&claims()), "bad_signature"),
        ("alg not the key's", ec.sign(&claims()), "alg_mismatch"),
        (
            "an RSA token for the Ed25519 key",
            Signer::rsa("k1", "RS256", true).sign(&claims()),
            "alg_mismatch",
        ),
        (
            "expired",
            key.sign(&with(claims(), "exp", json!(now - 120))),
            "expired",
        ),
        (
            "not yet valid",
            key.sign(&with(claims(), "nbf", json!(now + 120))),
            "not_yet_valid",
        ),
        (
            "wrong iss",
            key.sign(&with(claims(), "iss", json!("evil"))),
            "wrong_issuer",
        ),
        (
            "wrong aud",
            key.sign(&with(claims(), "aud", json!(["other"]))),
            "wrong_audience",
        ),
        (
            "no aud",
            key.sign(&without(claims(), "aud")),
            "wrong_audience",
        ),
        ("no exp", key.sign(&without(claims(), "exp")), "missing_exp"),
        ("no sub", key.sign(&without(claims(), "sub")), "missing_sub"),
        ("malformed", "not-a-token".into(), "malformed"),
        ("three garbage segments", "a.b.c".into(), "malformed"),
        ("oversized", key.sign(&big), "oversized"),
    ];
    for (what, token, reason) in &cases {
        let before = metric_sum(&[
            "flotilla_gateway_auth_failures_total",
            "route=\"/api/**\"",
            &format!("reason=\"{reason}\""),
        ]);
        let reply = get(&f.client, "/api/x", Some(token), &[]).await;
        assert_invalid_token(&reply, what);
        let after = metric_sum(&[
            "flotilla_gateway_auth_failures_total",
            "route=\"/api/**\"",
            &format!("reason=\"{reason}\""),
        ]);
        assert!(after > before, "{what}: reason {reason} not counted");
    }
    // No token at all: the bare challenge (RFC 6750 §3.1).
    let reply = get(&f.client, "/api/x", None, &[]).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        reply.header("www-authenticate"),
        "Bearer realm=\"flotilla\""
    );
    assert_eq!(reply.json()["error"]["code"], "missing_token");
    assert_eq!(f.up.hits(), 0, "a refused request reached the service");

    // Within the 60 s leeway both ways, the token is fine.
    let lenient = with(
        with(claims(), "exp", json!(now - 30)),
        "nbf",
        json!(now + 30),
    );
    let reply = get(&f.client, "/api/x", Some(&key.sign(&lenient)), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    f.gateway.shutdown(T).await;
}

#[tokio::test]
async fn a_missing_scope_is_403_insufficient_scope() {
    let key = Signer::ed25519("k1");
    let f = fixture("jwt-scope", &[&key], |_| {}).await;
    let reply = get(&f.client, "/admin/x", Some(&key.sign(&claims())), &[]).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(
        reply.header("www-authenticate"),
        "Bearer realm=\"flotilla\", error=\"insufficient_scope\", scope=\"admin\""
    );
    assert_eq!(reply.json()["error"]["code"], "insufficient_scope");
    let admin = with(claims(), "scope", json!("orders:read admin"));
    let reply = get(&f.client, "/admin/x", Some(&key.sign(&admin)), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(f.up.hits(), 1);
    f.gateway.shutdown(T).await;
}

#[tokio::test]
async fn a_missing_or_wrong_claim_is_403_and_never_reaches_the_service() {
    let key = Signer::ed25519("k1");
    let f = fixture("jwt-claims", &[&key], |_| {}).await;
    let roles = |roles: Value| json!({ "roles": roles });
    let staff = with(
        with(claims(), "realm_access", roles(json!(["user", "ops"]))),
        "email_verified",
        json!(true),
    );
    let refused = [
        ("no claims at all", claims()),
        (
            "no verified email",
            without(staff.clone(), "email_verified"),
        ),
        (
            "an unverified email",
            with(staff.clone(), "email_verified", json!(false)),
        ),
        (
            "other roles",
            with(staff.clone(), "realm_access", roles(json!(["user"]))),
        ),
        (
            "the role as a top-level claim, not under realm_access",
            with(
                without(staff.clone(), "realm_access"),
                "roles",
                json!(["ops"]),
            ),
        ),
        (
            "the role's name as the whole object",
            with(staff.clone(), "realm_access", json!("ops")),
        ),
    ];
    for (what, token_claims) in &refused {
        let before = metric_sum(&[
            "flotilla_gateway_auth_failures_total",
            "route=\"/staff/**\"",
            "reason=\"missing_claim\"",
        ]);
        let reply = get(&f.client, "/staff/x", Some(&key.sign(token_claims)), &[]).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{what}: {reply:?}");
        assert_eq!(
            reply.header("www-authenticate"),
            "Bearer realm=\"flotilla\", error=\"insufficient_scope\"",
            "{what}"
        );
        assert_eq!(
            reply.json()["error"]["code"],
            "insufficient_scope",
            "{what}"
        );
        let after = metric_sum(&[
            "flotilla_gateway_auth_failures_total",
            "route=\"/staff/**\"",
            "reason=\"missing_claim\"",
        ]);
        assert_eq!(after, before + 1, "{what}: not counted as missing_claim");
    }
    assert_eq!(f.up.hits(), 0, "a refused request reached the service");

    // Any one of the listed roles, in the array claim, with the email.
    let reply = get(&f.client, "/staff/x", Some(&key.sign(&staff)), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let single = with(staff.clone(), "realm_access", roles(json!("staff")));
    let reply = get(&f.client, "/staff/x", Some(&key.sign(&single)), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "a string claim: {reply:?}");
    assert_eq!(f.up.hits(), 2);
    // The claims bind only their own route.
    let reply = get(&f.client, "/api/x", Some(&key.sign(&claims())), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    f.gateway.shutdown(T).await;
}

#[tokio::test]
async fn an_unknown_kid_triggers_one_rate_limited_refetch() {
    let a = Signer::ed25519("a");
    let b = Signer::p256("b");
    let c = Signer::ed25519("c");
    let f = fixture("jwt-kid", &[&a], |_| {}).await;
    let reply = get(&f.client, "/api/x", Some(&a.sign(&claims())), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);

    // `b` is published after the gateway fetched the set: a token signed
    // with it makes the gateway refetch at once.
    f.jwks.set(jwks(&[&a, &b]));
    let before = f.jwks.fetches();
    let reply = get(&f.client, "/api/x", Some(&b.sign(&claims())), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(f.jwks.fetches(), before + 1);

    // Another unknown kid within 10 s: no second fetch (anyone can send
    // unknown kids), just a 401.
    f.jwks.set(jwks(&[&a, &b, &c]));
    let reply = get(&f.client, "/api/x", Some(&c.sign(&claims())), &[]).await;
    assert_invalid_token(&reply, "unknown kid within the refetch interval");
    assert_eq!(f.jwks.fetches(), before + 1);
    f.gateway.shutdown(T).await;
}

/// GETs `/api/x` with `token` until it is refused (within `T`), as a
/// key set read again in the background takes its key away.
async fn until_refused(client: &Client, token: &str, what: &str) {
    let deadline = std::time::Instant::now() + T;
    loop {
        let reply = get(client, "/api/x", Some(token), &[]).await;
        if reply.status == StatusCode::UNAUTHORIZED {
            assert_invalid_token(&reply, what);
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: still taken: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A JWKS source that answers with something that is not a JWKS keeps
/// the last good keys; one that answers with a JWKS without the key
/// (here without any: the identity provider revoked its only one) takes
/// it away.
#[tokio::test]
async fn the_last_good_key_set_is_kept_when_the_jwks_breaks() {
    let a = Signer::ed25519("a");
    let f = fixture("jwt-keep", &[&a], |jwt| {
        jwt.refresh_interval = Duration::from_secs(1);
    })
    .await;
    let token = a.sign(&claims());
    assert_eq!(
        get(&f.client, "/api/x", Some(&token), &[]).await.status,
        StatusCode::OK
    );
    f.jwks.set(json!({"error": "down for maintenance"}));
    let before = f.jwks.fetches();
    wait_until("two failed refreshes", || f.jwks.fetches() >= before + 2).await;
    // Cached verifications are not what keeps this working: a fresh token.
    let fresh = a.sign(&with(claims(), "jti", json!("fresh")));
    assert_eq!(
        get(&f.client, "/api/x", Some(&fresh), &[]).await.status,
        StatusCode::OK
    );

    f.jwks.set(json!({"keys": []}));
    until_refused(&f.client, &token, "a token of a key the JWKS took out").await;
    let another = a.sign(&with(claims(), "jti", json!("another")));
    assert_invalid_token(
        &get(&f.client, "/api/x", Some(&another), &[]).await,
        "a new token of a key the JWKS took out",
    );
    f.gateway.shutdown(T).await;
}

/// A protected route cannot be reached under another spelling of its path
/// through a public route beside it: routes are matched against the path
/// as a service normalises it (the chassis, and most frameworks, decode
/// `%61` to `a` and collapse `//`), and that path is what is forwarded;
/// spellings a service might read either way (`%2F`, a backslash) are
/// refused.
#[tokio::test]
async fn a_protected_route_is_not_reached_by_another_spelling_of_its_path() {
    let registry = Registry::new();
    let up = Upstream::start("jwt-spelling-0").await;
    registry.set("jwt-spelling", vec![up.endpoint()]);
    let signer = Signer::ed25519("ed-1");
    let jwks = JwksServer::start(jwks(&[&signer])).await;
    let mut admin = route("jwt-spelling", "/admin/**", &[], T);
    admin.auth = RouteAuth::jwt();
    let everything = route("jwt-spelling", "/**", &[], T);
    let mut cfg = config(vec![admin, everything]);
    cfg.jwt = vec![jwt_config(&jwks)];
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);

    for path in ["/%61dmin/x", "/adm%69n/x", "//admin/x", "/admin//x"] {
        let reply = get(&client, path, None, &[]).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{path}: {reply:?}");
    }
    assert_eq!(up.hits(), 0);
    let token = signer.sign(&claims());
    let reply = get(&client, "/%61dmin/x?q=%61", Some(&token), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.json()["path"], "/admin/x?q=%61");

    for target in [
        "/admin%2Fx",
        "/x%2f..%2fadmin",
        "/x\\..\\admin",
        "/x%5Cadmin",
        // Servlet containers serve each of these as `/admin/x`.
        "/x/..;/admin/x",
        "/admin;jsessionid=1/x",
        "/admin%3B/x",
    ] {
        let raw = raw_request(
            gateway.local_addr(),
            &format!("GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
        )
        .await;
        assert!(raw.starts_with("HTTP/1.1 400"), "{target}: {raw}");
        assert!(raw.contains("bad_path"), "{target}: {raw}");
    }
    assert_eq!(up.hits(), 1);
    gateway.shutdown(T).await;
}

/// A gateway with one JWT route whose keys come from the JWKS at `url`,
/// trusting the CA in `ca_pem` (written beside the test) for its
/// certificate.
async fn https_fixture(
    service: &str,
    url: &str,
    ca_pem: &str,
    dir: &TestDir,
) -> (Upstream, Gateway, Client) {
    let registry = Registry::new();
    let up = Upstream::start(&format!("{service}-0")).await;
    registry.set(service, vec![up.endpoint()]);
    let mut api = route(service, "/api/**", &[], T);
    api.auth = RouteAuth::jwt();
    let mut cfg = config(vec![api]);
    let ca = path_buf(dir, "jwks-ca.pem");
    ok(std::fs::write(&ca, ca_pem), "write the CA");
    let mut jwt = JwtConfig::new(
        ISSUER,
        vec!["shop".into()],
        ok(JwksSource::parse(url), "jwks url"),
    );
    jwt.jwks_ca = Some(ca);
    cfg.jwt = vec![jwt];
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);
    (up, gateway, client)
}

/// An identity provider's JWKS is served over HTTPS (Auth0, Okta, Google
/// serve theirs no other way): the gateway fetches it so, its server's
/// certificate checked against `jwks_ca` (or the machine's roots) and the
/// URL's host name.
#[tokio::test]
async fn keys_come_from_an_https_jwks_whose_certificate_is_trusted() {
    let key = Signer::ed25519("web-1");
    let cert = server_cert("idp-ca", &["localhost"]);
    let jwks = JwksServer::start_tls(jwks(&[&key]), &cert).await;
    let dir = TestDir::new();
    let (_up, gateway, client) =
        https_fixture("jwt-https", &jwks.url_at("localhost"), &cert.ca_pem, &dir).await;
    let reply = get(&client, "/api/orders", Some(&key.sign(&claims())), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.json()["headers"]["x-flotilla-user-id"], "user-1");
    assert!(jwks.fetches() >= 1);
    gateway.shutdown(T).await;
}

/// A JWKS server whose certificate is not for the URL's host, or is signed
/// by a CA other than `jwks_ca`, is never read: its keys could be anyone's.
#[tokio::test]
async fn an_https_jwks_whose_certificate_is_not_trusted_is_never_read() {
    let key = Signer::ed25519("web-2");
    let cert = server_cert("idp-ca", &["localhost"]);
    let other = server_cert("another-ca", &["localhost"]);
    let jwks = JwksServer::start_tls(jwks(&[&key]), &cert).await;
    let token = key.sign(&claims());
    for (url, ca, why) in [
        (
            jwks.url.clone(),
            &cert.ca_pem,
            "a certificate for another name",
        ),
        (jwks.url_at("localhost"), &other.ca_pem, "another CA"),
    ] {
        let dir = TestDir::new();
        let (_up, gateway, client) = https_fixture("jwt-https-untrusted", &url, ca, &dir).await;
        // The first fetch, then the refetch an unknown `kid` asks for,
        // both fail: the token's key is unknown.
        let reply = get(&client, "/api/orders", Some(&token), &[]).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{why}: {reply:?}");
        assert_eq!(jwks.fetches(), 0, "{why}: the JWKS was read");
        gateway.shutdown(T).await;
    }
}

/// A `jwks_ca` that holds no certificate is refused when the gateway
/// starts, saying so, rather than failing every token later.
#[tokio::test]
async fn a_jwks_ca_without_a_certificate_is_refused_at_start() {
    let dir = TestDir::new();
    let ca = path_buf(&dir, "empty-ca.pem");
    ok(std::fs::write(&ca, "not a certificate\n"), "write the CA");
    let mut api = route("jwt-no-ca", "/api/**", &[], T);
    api.auth = RouteAuth::jwt();
    let mut cfg = config(vec![api]);
    let mut jwt = JwtConfig::new(
        ISSUER,
        vec!["shop".into()],
        ok(
            JwksSource::parse("https://idp.example/.well-known/jwks.json"),
            "jwks url",
        ),
    );
    jwt.jwks_ca = Some(ca);
    cfg.jwt = vec![jwt];
    let e = start_error(cfg, "its jwks_ca holds no certificate").await;
    assert!(
        e.contains("empty-ca.pem holds no usable CA certificate"),
        "{e}"
    );
}

/// The staff identity provider of `several_issuers`, beside the system's
/// own (`ISSUER`).
const STAFF_ISSUER: &str = "https://id.corp.example/realms/staff";

/// Two issuers, as a shop with its own accounts and a company's staff
/// directory would have: a route takes the first's tokens unless it names
/// others; a token goes to the issuer its `iss` names, and to no other's
/// keys; the second's callers are `staff:<sub>` with
/// `x-flotilla-user-issuer`, never one of the system's users of the same
/// `sub`, and count apart under `per user` limits.
#[tokio::test]
async fn several_issuers_each_for_the_routes_that_name_it() {
    let own_key = Signer::ed25519("own-1");
    let staff_key = Signer::p256("staff-1");
    let registry = Registry::new();
    let up = Upstream::start("issuers-0").await;
    registry.set("issuers", vec![up.endpoint()]);
    let own_jwks = JwksServer::start(jwks(&[&own_key])).await;
    let staff_jwks = JwksServer::start(jwks(&[&staff_key])).await;

    let mut api = route("issuers", "/api/**", &[], T);
    api.auth = RouteAuth::jwt();
    let mut admin = route("issuers", "/admin/**", &[], T);
    admin.auth = RouteAuth::jwt();
    admin.issuers = vec!["staff".into()];
    let mut both = route("issuers", "/both/**", &[], T);
    both.auth = RouteAuth::jwt();
    both.issuers = vec!["staff".into(), "own".into()];
    both.rate_limits = vec![ok(
        flotilla_gateway::RateLimit::parse("1/h per user"),
        "rate limit",
    )];
    let mut cfg = config(vec![api, admin, both]);
    let mut own = jwt_config(&own_jwks);
    own.name = "own".into();
    let mut staff = JwtConfig::new(
        STAFF_ISSUER,
        vec!["shop-admin".into()],
        ok(JwksSource::parse(&staff_jwks.url), "jwks url"),
    );
    staff.name = "staff".into();
    staff.forward_claims = vec!["tenant".into()];
    cfg.jwt = vec![own, staff];
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);

    let own_token = own_key.sign(&claims());
    let staff_claims = with(
        with(claims(), "iss", json!(STAFF_ISSUER)),
        "aud",
        json!("shop-admin"),
    );
    let staff_token = staff_key.sign(&staff_claims);
    let forged = [
        ("x-flotilla-user-issuer", "own"),
        ("x_flotilla_user_issuer", "own"),
    ];

    // A staff token verified (and cached) for a route that takes it...
    let reply = get(&client, "/admin/stock", Some(&staff_token), &forged).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let h = &reply.json()["headers"];
    assert_eq!(h["x-flotilla-user-id"], "staff:user-1", "{h}");
    assert_eq!(h["x-flotilla-user-issuer"], "staff", "{h}");
    assert_eq!(h["x-flotilla-user-tenant"], "t1", "{h}");
    assert!(h.get("x_flotilla_user_issuer").is_none(), "{h}");
    // ... is no token at all for a route that takes the system's own.
    let hits = up.hits();
    let reply = get(&client, "/api/orders", Some(&staff_token), &[]).await;
    assert_invalid_token(&reply, "a staff token on an own-users route");
    // Nor is the system's own token for the staff's route.
    let reply = get(&client, "/admin/stock", Some(&own_token), &[]).await;
    assert_invalid_token(&reply, "an own token on a staff route");
    // A staff key's signature on a token that claims the system's `iss`
    // is checked with the system's keys, which do not have it.
    let mislabelled = staff_key.sign(&claims());
    let reply = get(&client, "/both/x", Some(&mislabelled), &[]).await;
    assert_invalid_token(&reply, "a staff-signed token claiming the own issuer");
    // An issuer nobody configured.
    let stranger = own_key.sign(&with(claims(), "iss", json!("https://evil.example")));
    let reply = get(&client, "/both/x", Some(&stranger), &[]).await;
    assert_invalid_token(&reply, "an unknown issuer");
    assert_eq!(up.hits(), hits, "a refused token reached the service");

    // The system's own user: the `sub` alone, no issuer field, forged
    // ones stripped.
    let reply = get(&client, "/api/orders", Some(&own_token), &forged).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let h = &reply.json()["headers"];
    assert_eq!(h["x-flotilla-user-id"], "user-1", "{h}");
    assert!(h.get("x-flotilla-user-issuer").is_none(), "{h}");
    assert!(h.get("x_flotilla_user_issuer").is_none(), "{h}");

    // A route of both takes both, and `user-1` of each is a user of its
    // own under `1/h per user`: one request each passes, the second of
    // each is refused.
    for (token, id) in [(&own_token, "user-1"), (&staff_token, "staff:user-1")] {
        let reply = get(&client, "/both/x", Some(token), &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{id}: {reply:?}");
        assert_eq!(reply.json()["headers"]["x-flotilla-user-id"], id);
    }
    for token in [&own_token, &staff_token] {
        let reply = get(&client, "/both/x", Some(token), &[]).await;
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{reply:?}");
    }
    gateway.shutdown(T).await;
}

/// A token in an `HttpOnly` cookie (`jwt.cookie`), as a browser app keeps
/// it: taken when there is no `Authorization`, but on a request that could
/// change something only from this site or an origin the CORS policy
/// admits with credentials. Another site's page, which the browser sends
/// the cookie from all the same, gets 403 `cross_site_request` on a `jwt`
/// route and is anonymous on an `optional` one.
#[tokio::test]
async fn a_token_in_a_cookie_acts_only_for_this_site() {
    let key = Signer::ed25519("cookie-1");
    let registry = Registry::new();
    let up = Upstream::start("cookies-0").await;
    registry.set("cookies", vec![up.endpoint()]);
    let keys = JwksServer::start(jwks(&[&key])).await;
    let mut api = route("cookies", "/api/**", &[], T);
    api.auth = RouteAuth::jwt();
    let mut feed = route("cookies", "/feed/**", &[], T);
    feed.auth = RouteAuth::Optional;
    let mut cfg = config(vec![api, feed]);
    let mut jwt = jwt_config(&keys);
    jwt.cookie = Some("at".into());
    cfg.jwt = vec![jwt];
    cfg.cors = Some(flotilla_gateway::CorsConfig {
        origins: vec!["https://app.example".into()],
        credentials: true,
        ..Default::default()
    });
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);
    let own = format!("http://{}", gateway.local_addr());
    let token = key.sign(&claims());
    let cookie = format!("theme=dark; at={token}");
    let send = |method: Method, path: &'static str, fields: Vec<(&'static str, String)>| {
        let client = &client;
        async move {
            let fields: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
            client.request(method, path, &fields, Bytes::new()).await
        }
    };
    let with_cookie = |more: &[(&'static str, &str)]| {
        let mut fields = vec![("cookie", cookie.clone())];
        fields.extend(more.iter().map(|(n, v)| (*n, v.to_string())));
        fields
    };

    // A read, from anywhere: the cookie's user.
    let reply = send(Method::GET, "/api/orders", with_cookie(&[])).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.json()["headers"]["x-flotilla-user-id"], "user-1");
    // A change from this site, or from the front end CORS trusts with
    // credentials, or typed by the user (no `Origin`, `Sec-Fetch-Site:
    // none`): the cookie's user.
    for more in [
        vec![("origin", own.as_str())],
        vec![("origin", "https://app.example")],
        vec![("sec-fetch-site", "none")],
    ] {
        let reply = send(Method::POST, "/api/orders", with_cookie(&more)).await;
        assert_eq!(reply.status, StatusCode::OK, "{more:?}: {reply:?}");
        assert_eq!(reply.json()["headers"]["x-flotilla-user-id"], "user-1");
    }
    // A change from another site's page, or with nothing to say where it
    // comes from: refused before the service.
    for more in [
        vec![("origin", "https://evil.example")],
        vec![("origin", "null")],
        vec![("sec-fetch-site", "cross-site")],
        vec![],
    ] {
        let hits = up.hits();
        let reply = send(Method::POST, "/api/orders", with_cookie(&more)).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{more:?}: {reply:?}");
        assert_eq!(reply.json()["error"]["code"], "cross_site_request");
        assert_eq!(up.hits(), hits, "{more:?}: a refused request came");
        // On an optional route the caller is anonymous instead.
        let reply = send(Method::POST, "/feed/like", with_cookie(&more)).await;
        assert_eq!(reply.status, StatusCode::OK, "{more:?}: {reply:?}");
        assert!(reply.json()["headers"].get("x-flotilla-user-id").is_none());
    }
    // The same request with the token in `Authorization`: no other site
    // can put it there, so it passes whatever the origin.
    let bearer = format!("Bearer {token}");
    let fields = vec![
        ("origin", "https://evil.example".to_string()),
        ("authorization", bearer.clone()),
    ];
    let reply = send(Method::POST, "/api/orders", fields).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    // A bad cookie: 401 on a jwt route, anonymous on an optional one; and
    // `Authorization`, when there is one, is the token, not the cookie.
    let stale = key.sign(&with(claims(), "exp", json!(now() - 120)));
    let fields = vec![("cookie", format!("at={stale}"))];
    let reply = send(Method::GET, "/api/orders", fields.clone()).await;
    assert_invalid_token(&reply, "an expired token in the cookie");
    let reply = send(Method::GET, "/feed/today", fields.clone()).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert!(reply.json()["headers"].get("x-flotilla-user-id").is_none());
    let mut both = fields;
    both.push(("authorization", bearer));
    let reply = send(Method::GET, "/api/orders", both).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    // Two different tokens under the cookie's name (a sibling host can set
    // one for the parent domain, which the browser sends first): neither
    // is taken. The same one twice is one token.
    let planted = key.sign(&with(claims(), "sub", json!("user-2")));
    let two = format!("at={planted}; theme=dark; at={token}");
    let reply = send(Method::GET, "/api/orders", vec![("cookie", two.clone())]).await;
    assert_invalid_token(&reply, "two tokens in the cookie");
    let reply = send(Method::GET, "/feed/today", vec![("cookie", two)]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert!(reply.json()["headers"].get("x-flotilla-user-id").is_none());
    let twice = vec![
        ("cookie", format!("at={token}")),
        ("cookie", format!("at={token}")),
    ];
    let reply = send(Method::GET, "/api/orders", twice).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.json()["headers"]["x-flotilla-user-id"], "user-1");
    gateway.shutdown(T).await;
}

/// The access log says who called (`user`) and, for a refusal, its code
/// and the reason the client is never told (for a token, what was wrong;
/// for a 429, which limit): what an operator needs to answer "why was I
/// refused?" without a debug log.
#[tokio::test]
async fn the_access_log_names_the_caller_and_why_a_request_was_refused() {
    let key = Signer::ed25519("log-1");
    let dir = TestDir::new();
    let log = path_buf(&dir, "access.log");
    let registry = Registry::new();
    let up = Upstream::start("logged-0").await;
    registry.set("logged", vec![up.endpoint()]);
    let keys = JwksServer::start(jwks(&[&key])).await;
    let mut api = route("logged", "/api/**", &[], T);
    api.auth = RouteAuth::jwt();
    // Two limits: the log names the one that refused.
    api.rate_limits = ["100/s per user", "1/h per user"]
        .map(|l| ok(flotilla_gateway::RateLimit::parse(l), "rate limit"))
        .to_vec();
    let mut cfg = config(vec![api]);
    cfg.jwt = vec![jwt_config(&keys)];
    cfg.access_log = Some(log.clone());
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);

    let good = key.sign(&claims());
    let expired = key.sign(&with(claims(), "exp", json!(now() - 120)));
    for (token, status) in [
        (Some(good.as_str()), StatusCode::OK),
        (Some(expired.as_str()), StatusCode::UNAUTHORIZED),
        (None, StatusCode::UNAUTHORIZED),
        (Some(good.as_str()), StatusCode::TOO_MANY_REQUESTS),
    ] {
        let reply = get(&client, "/api/orders", token, &[]).await;
        assert_eq!(reply.status, status, "{reply:?}");
    }
    // Lines are written after the bodies: shut down to flush them all.
    gateway.shutdown(T).await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| ok(serde_json::from_str(l), "an access-log line"))
        .collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert_eq!(lines[0]["user"], "user-1", "{text}");
    assert!(lines[0].get("error").is_none(), "{text}");
    assert_eq!(lines[1]["error"], "invalid_token", "{text}");
    assert_eq!(lines[1]["reason"], "expired", "{text}");
    assert!(lines[1].get("user").is_none(), "{text}");
    assert_eq!(lines[2]["error"], "missing_token", "{text}");
    assert_eq!(lines[2]["reason"], "missing", "{text}");
    assert_eq!(lines[3]["error"], "rate_limited", "{text}");
    assert_eq!(lines[3]["reason"], "h-user", "{text}");
    assert_eq!(lines[3]["user"], "user-1", "{text}");
    // No token is ever written down.
    assert!(!text.contains(&good) && !text.contains(&expired), "{text}");
}

/// Keys from a file (`jwks_file`, Envoy's `local_jwks`): read at start,
/// and again for a token whose `kid` it did not have, so a key rotated
/// into the file is taken without a restart. And an issuer's own
/// `leeway` for its clock.
#[tokio::test]
async fn keys_come_from_a_file_which_is_read_again_for_an_unknown_kid() {
    let old = Signer::ed25519("file-1");
    let new = Signer::p256("file-2");
    let dir = TestDir::new();
    let file = path_buf(&dir, "jwks.json");
    ok(
        std::fs::write(&file, jwks(&[&old]).to_string()),
        "write jwks",
    );
    let registry = Registry::new();
    let up = Upstream::start("filed-0").await;
    registry.set("filed", vec![up.endpoint()]);
    let mut api = route("filed", "/api/**", &[], T);
    api.auth = RouteAuth::jwt();
    let mut cfg = config(vec![api]);
    let mut jwt = JwtConfig::new(ISSUER, vec!["shop".into()], JwksSource::File(file.clone()));
    jwt.refetch_min_interval = Duration::ZERO;
    jwt.leeway = Duration::from_secs(120);
    cfg.jwt = vec![jwt];
    let gateway = start(cfg, &registry).await;
    let client = Client::new(&gateway);

    let reply = get(&client, "/api/x", Some(&old.sign(&claims())), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    // Expired 90 s ago: within this issuer's 120 s, past the default 60.
    let late = old.sign(&with(claims(), "exp", json!(now() - 90)));
    let reply = get(&client, "/api/x", Some(&late), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let later = old.sign(&with(claims(), "exp", json!(now() - 150)));
    assert_invalid_token(
        &get(&client, "/api/x", Some(&later), &[]).await,
        "past the leeway",
    );

    // The new key, before it is in the file: refused; once it is: taken.
    let token = new.sign(&claims());
    assert_invalid_token(
        &get(&client, "/api/x", Some(&token), &[]).await,
        "not yet in the file",
    );
    ok(
        std::fs::write(&file, jwks(&[&old, &new]).to_string()),
        "rotate",
    );
    let reply = get(&client, "/api/x", Some(&token), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    // A file that goes bad keeps the last good keys.
    ok(std::fs::write(&file, "{not json"), "break");
    let reply = get(
        &client,
        "/api/x",
        Some(&Signer::ed25519("file-3").sign(&claims())),
        &[],
    )
    .await;
    assert_invalid_token(&reply, "a kid the broken file cannot have");
    // (A token not seen before: checked with the keys, not the cache.)
    let fresh = old.sign(&with(claims(), "tenant", json!("t2")));
    let reply = get(&client, "/api/x", Some(&fresh), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    gateway.shutdown(T).await;
}

/// A `jwks_ca` file renewed in place (a company CA rotated) is taken at
/// the next reload of the same settings (`flotilla up` reloads when the
/// file changes): the verifier is kept across reloads only while its CA
/// file is the one it read.
#[tokio::test]
async fn a_renewed_jwks_ca_file_is_taken_at_the_next_reload() {
    let key = Signer::ed25519("web-ca-1");
    let cert = server_cert("idp-ca", &["localhost"]);
    let old = server_cert("retired-ca", &["localhost"]);
    let jwks = JwksServer::start_tls(jwks(&[&key]), &cert).await;
    let dir = TestDir::new();
    let registry = Registry::new();
    let up = Upstream::start("jwt-ca-renewed-0").await;
    registry.set("jwt-ca-renewed", vec![up.endpoint()]);
    let mut api = route("jwt-ca-renewed", "/api/**", &[], T);
    api.auth = RouteAuth::jwt();
    let mut cfg = config(vec![api]);
    let ca = path_buf(&dir, "corp-ca.pem");
    ok(std::fs::write(&ca, &old.ca_pem), "write the retired CA");
    let mut jwt = JwtConfig::new(
        ISSUER,
        vec!["shop".into()],
        ok(JwksSource::parse(&jwks.url_at("localhost")), "jwks url"),
    );
    jwt.jwks_ca = Some(ca.clone());
    cfg.jwt = vec![jwt];
    let gateway = start(cfg.clone(), &registry).await;
    let client = Client::new(&gateway);
    let token = key.sign(&claims());

    // The server's certificate is not the retired CA's: never read.
    let reply = get(&client, "/api/orders", Some(&token), &[]).await;
    assert_invalid_token(&reply, "a JWKS server the CA file does not vouch for");
    assert_eq!(jwks.fetches(), 0);
    // The same settings again, before the file changed: the verifier
    // is kept (and so is what it trusts).
    ok(gateway.reload(cfg.clone()), "reload");
    assert_invalid_token(
        &get(&client, "/api/orders", Some(&token), &[]).await,
        "kept",
    );
    // The file renewed, then the reload its change brings.
    ok(std::fs::write(&ca, &cert.ca_pem), "renew the CA");
    ok(gateway.reload(cfg), "reload");
    let reply = get(&client, "/api/orders", Some(&token), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert!(jwks.fetches() >= 1);
    gateway.shutdown(T).await;
}

/// A key taken out of a `jwks_file` (it leaked) stops verifying at the
/// reload the file's change brings (`flotilla up` watches the file), not
/// at the next refresh minutes later: tokens it signed, cached as
/// verified, are refused from then on.
#[tokio::test]
async fn a_key_taken_out_of_a_jwks_file_stops_verifying_at_the_next_reload() {
    let leaked = Signer::ed25519("leaked-1");
    let kept = Signer::ed25519("kept-1");
    let dir = TestDir::new();
    let file = path_buf(&dir, "jwks.json");
    ok(
        std::fs::write(&file, jwks(&[&leaked, &kept]).to_string()),
        "write jwks",
    );
    let registry = Registry::new();
    let up = Upstream::start("revoked-0").await;
    registry.set("revoked", vec![up.endpoint()]);
    let mut api = route("revoked", "/api/**", &[], T);
    api.auth = RouteAuth::jwt();
    let mut cfg = config(vec![api]);
    cfg.jwt = vec![JwtConfig::new(
        ISSUER,
        vec!["shop".into()],
        JwksSource::File(file.clone()),
    )];
    let gateway = start(cfg.clone(), &registry).await;
    let client = Client::new(&gateway);
    let stolen = leaked.sign(&claims());
    let good = kept.sign(&claims());
    for token in [&stolen, &good] {
        let reply = get(&client, "/api/x", Some(token), &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }

    ok(
        std::fs::write(&file, jwks(&[&kept]).to_string()),
        "take the key out",
    );
    ok(gateway.reload(cfg.clone()), "reload");
    // The file is read again in the background: refused within a moment.
    until_refused(&client, &stolen, "a token of the removed key").await;
    let reply = get(&client, "/api/x", Some(&good), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");

    // The last key taken out too: a set of none is a set, and no token
    // passes (a file that is not a JWKS would keep the last good keys).
    ok(
        std::fs::write(&file, r#"{"keys": []}"#),
        "take every key out",
    );
    ok(gateway.reload(cfg), "reload");
    until_refused(&client, &good, "a token of the last key, taken out").await;
    gateway.shutdown(T).await;
}

/// Behind a trusted proxy that rewrites `Host` (to an internal name), the
/// site is the name its client asked for, its `X-Forwarded-Host`: a cookie
/// token is acted on for a request from there, and still not for another
/// site, nor on the word of a proxy the gateway does not trust.
#[tokio::test]
async fn a_cookie_token_behind_a_trusted_proxy_is_for_the_site_it_names() {
    let key = Signer::ed25519("proxied-1");
    let token = key.sign(&claims());
    for trusted in [true, false] {
        let registry = Registry::new();
        let up = Upstream::start("proxied-0").await;
        registry.set("proxied", vec![up.endpoint()]);
        let keys = JwksServer::start(jwks(&[&key])).await;
        let mut api = route("proxied", "/api/**", &[], T);
        api.auth = RouteAuth::jwt();
        let mut cfg = config(vec![api]);
        let mut jwt = jwt_config(&keys);
        jwt.cookie = Some("at".into());
        cfg.jwt = vec![jwt];
        if trusted {
            cfg.ip = Some(flotilla_gateway::IpConfig {
                trusted_proxies: ok(flotilla_gateway::parse_nets(&["127.0.0.0/8"]), "nets"),
                ..Default::default()
            });
        }
        let gateway = start(cfg, &registry).await;
        let client = Client::new(&gateway);
        let cookie = format!("at={token}");
        for (origin, expected) in [
            (
                "https://shop.example",
                if trusted {
                    StatusCode::OK
                } else {
                    StatusCode::FORBIDDEN
                },
            ),
            ("https://evil.example", StatusCode::FORBIDDEN),
        ] {
            let fields = [
                ("cookie", cookie.as_str()),
                ("origin", origin),
                ("x-forwarded-host", "shop.example"),
            ];
            let reply = client
                .request(Method::POST, "/api/orders", &fields, Bytes::new())
                .await;
            assert_eq!(
                reply.status, expected,
                "trusted {trusted}, {origin}: {reply:?}"
            );
        }
        gateway.shutdown(T).await;
    }
}
