//! Handler tests: the router on an in-memory database, called with
//! `oneshot`, tokens checked the way a verifier checks them.

use axum::body::{Body, to_bytes};
use axum::http::Request;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;
use crate::keys;

async fn state_with(config: Config) -> AppState {
    let db = flotilla_chassis::open_sqlite("sqlite::memory:", &crate::MIGRATOR)
        .await
        .unwrap();
    let ring = keys::maintain(&db, config.keys, unix_now()).await.unwrap();
    AppState {
        db,
        passwords: crate::password::tests::cheap().await,
        keys: Keys::new(ring),
        config: Arc::new(config),
    }
}

async fn app() -> (Router, AppState) {
    let state = state_with(Config::from_lookup(|_| None).unwrap()).await;
    (router(state.clone()), state)
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

async fn send(app: &Router, req: Request<Body>) -> Answer {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = to_bytes(res.into_body(), 1 << 20).await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    Answer {
        status,
        headers,
        body,
    }
}

async fn post(app: &Router, path: &str, body: Value) -> Answer {
    send(
        app,
        Request::post(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap(),
    )
    .await
}

async fn get(app: &Router, path: &str, user: Option<&str>) -> Answer {
    let mut req = Request::get(path);
    if let Some(user) = user {
        req = req.header("x-flotilla-user-id", user);
    }
    send(app, req.body(Body::empty()).unwrap()).await
}

fn fields(a: &Answer) -> Vec<String> {
    a.body["error"]["fields"]
        .as_array()
        .map(|f| {
            f.iter()
                .map(|e| e["field"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn register(app: &Router, email: &str, password: &str) -> Answer {
    post(
        app,
        "/api/accounts/register",
        json!({"email": email, "password": password}),
    )
    .await
}

async fn login(app: &Router, email: &str, password: &str) -> Answer {
    post(
        app,
        "/api/accounts/login",
        json!({"email": email, "password": password}),
    )
    .await
}

/// Verifies `token` against the service's own JWKS, as the gateway does,
/// and returns its claims.
async fn verified_claims(app: &Router, token: &str) -> Value {
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    let jwks = get(app, "/.well-known/jwks.json", None).await.body;
    let key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .expect("the token's kid is in the JWKS")
        .clone();
    let public = URL_SAFE_NO_PAD.decode(key["x"].as_str().unwrap()).unwrap();
    let (h, claims) = crate::jwt::tests::verify(token, &public);
    assert_eq!(h["alg"], "EdDSA");
    claims
}

#[tokio::test]
async fn registration_validates_fields() {
    let (app, _) = app().await;
    let a = post(&app, "/api/accounts/register", json!({})).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.body["error"]["code"], "invalid_request");
    assert_eq!(fields(&a), ["email", "password"]);

    let a = post(
        &app,
        "/api/accounts/register",
        json!({"email": "not-an-email", "password": "short", "name": "x".repeat(101)}),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(fields(&a), ["email", "password", "name"]);

    let a = register(&app, "bob@example.com", "BOB@example.com").await;
    assert_eq!(fields(&a), ["password"]);
    assert_eq!(
        a.body["error"]["message"],
        "password: must not be your e-mail address"
    );

    let a = register(&app, "bob@example.com", &"p".repeat(1025)).await;
    assert_eq!(fields(&a), ["password"]);

    // Not JSON, or the wrong JSON types: the platform's error shape.
    let a = send(
        &app,
        Request::post("/api/accounts/register")
            .header("content-type", "application/json")
            .body(Body::from("{\"email\": 5}"))
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(a.body["error"]["code"], "invalid_json");

    // Bodies are small; a huge one is refused before it is parsed.
    let huge = json!({"email": "a@example.com", "password": "p".repeat(20_000)});
    let a = post(&app, "/api/accounts/register", huge).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn registration_stores_an_argon2id_hash_and_refuses_a_taken_email() {
    let (app, state) = app().await;
    let a = post(
        &app,
        "/api/accounts/register",
        json!({"email": "  Alice@Example.com ", "password": "correct horse battery", "name": " Alice "}),
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    assert_eq!(a.body["email"], "alice@example.com");
    assert_eq!(a.body["name"], "Alice");
    assert_eq!(a.body["id"].as_str().unwrap().len(), 36);
    assert!(a.body["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(a.body.get("password").is_none() && a.body.get("password_hash").is_none());

    let stored: String = sqlx::query_scalar("SELECT password_hash FROM users")
        .fetch_one(&state.db)
        .await
        .unwrap();
    assert!(stored.starts_with("$argon2id$"), "{stored}");
    assert!(!stored.contains("correct horse"));

    // Case-insensitive: the same address in capitals is taken.
    let a = register(&app, "ALICE@EXAMPLE.COM", "another password").await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert_eq!(a.body["error"]["code"], "email_taken");
    assert_eq!(fields(&a), ["email"]);
}

#[tokio::test]
async fn login_issues_a_verifiable_access_token_and_a_refresh_token() {
    let (app, _) = app().await;
    let user = register(&app, "carol@example.com", "a long passphrase")
        .await
        .body;
    let a = login(&app, "Carol@Example.com", "a long passphrase").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.headers["cache-control"], "no-store");
    assert_eq!(a.body["token_type"], "Bearer");
    assert_eq!(a.body["expires_in"], 900);
    assert_eq!(a.body["refresh_token"].as_str().unwrap().len(), 43);

    let claims = verified_claims(&app, a.body["access_token"].as_str().unwrap()).await;
    assert_eq!(claims["iss"], "shop-accounts");
    assert_eq!(claims["aud"], "shop");
    assert_eq!(claims["sub"], user["id"]);
    assert_eq!(claims["email"], "carol@example.com");
    assert_eq!(claims["scope"], "orders:read orders:write");
    let iat = claims["iat"].as_i64().unwrap();
    assert_eq!(claims["nbf"].as_i64(), Some(iat));
    assert_eq!(claims["exp"].as_i64(), Some(iat + 900));
    assert!((iat - unix_now()).abs() < 60);
    assert!(claims["jti"].is_string());
}

#[tokio::test]
async fn issuer_and_audience_come_from_the_settings() {
    let config = Config::from_lookup(|name| match name {
        "ACCOUNTS_ISSUER" => Some("https://id.example".into()),
        "ACCOUNTS_AUDIENCE" => Some("shop-api".into()),
        _ => None,
    })
    .unwrap();
    let app = router(state_with(config).await);
    register(&app, "dan@example.com", "a long passphrase").await;
    let a = login(&app, "dan@example.com", "a long passphrase").await;
    let claims = verified_claims(&app, a.body["access_token"].as_str().unwrap()).await;
    assert_eq!(claims["iss"], "https://id.example");
    assert_eq!(claims["aud"], "shop-api");
}

#[tokio::test]
async fn wrong_password_and_unknown_email_get_the_same_answer() {
    let (app, state) = app().await;
    register(&app, "erin@example.com", "a long passphrase").await;
    let before = state.passwords.checked();
    let wrong = login(&app, "erin@example.com", "a long passphrasf").await;
    assert_eq!(state.passwords.checked(), before + 1);
    let unknown = login(&app, "nobody@example.com", "a long passphrase").await;
    // An unknown address costs an argon2 check as a known one does: its
    // answer takes as long.
    assert_eq!(state.passwords.checked(), before + 2, "no timing oracle");
    for a in [&wrong, &unknown] {
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        assert_eq!(a.body["error"]["code"], "invalid_credentials");
    }
    assert_eq!(wrong.body, unknown.body, "no account oracle");

    let a = post(
        &app,
        "/api/accounts/login",
        json!({"email": "erin@example.com"}),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(fields(&a), ["password"]);
}

#[tokio::test]
async fn failed_sign_ins_throttle_the_address_alike_whether_it_has_an_account() {
    let (app, _) = app().await;
    register(&app, "erin@example.com", "a long passphrase").await;
    let mut answers = Vec::new();
    for email in ["erin@example.com", "nobody@example.com"] {
        for _ in 0..crate::throttle::FREE_FAILURES {
            let a = login(&app, email, "a wrong guess").await;
            assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        }
        // Now even the right password waits: it is not checked.
        let a = login(&app, email, "a long passphrase").await;
        assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
        assert_eq!(a.body["error"]["code"], "too_many_attempts");
        let wait: i64 = a.headers[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=crate::throttle::FIRST_WAIT_SECONDS).contains(&wait));
        answers.push(a.body);
    }
    // No account oracle: the same words for both.
    let said = |b: &Value| b["error"]["code"].clone();
    assert_eq!(said(&answers[0]), said(&answers[1]));

    // Another address signs in as before, and a success clears the count.
    register(&app, "finn@example.com", "a long passphrase").await;
    for _ in 0..crate::throttle::FREE_FAILURES - 1 {
        login(&app, "finn@example.com", "a wrong guess").await;
    }
    let a = login(&app, "finn@example.com", "a long passphrase").await;
    assert_eq!(a.status, StatusCode::OK);
    for _ in 0..crate::throttle::FREE_FAILURES - 1 {
        login(&app, "finn@example.com", "a wrong guess").await;
    }
    let a = login(&app, "finn@example.com", "a long passphrase").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_family() {
    let (app, _) = app().await;
    register(&app, "fay@example.com", "a long passphrase").await;
    let first = login(&app, "fay@example.com", "a long passphrase")
        .await
        .body;
    let r1 = first["refresh_token"].as_str().unwrap();

    let a = post(&app, "/api/accounts/refresh", json!({"refresh_token": r1})).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.headers["cache-control"], "no-store");
    let r2 = a.body["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(r2, r1, "a new refresh token every time");
    let claims = verified_claims(&app, a.body["access_token"].as_str().unwrap()).await;
    assert_eq!(claims["email"], "fay@example.com");

    // Its answer lost, the spent token is presented again at once (within
    // the reuse grace): new tokens, and r2 is superseded.
    let a = post(&app, "/api/accounts/refresh", json!({"refresh_token": r1})).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let r2b = a.body["refresh_token"].as_str().unwrap().to_owned();
    assert!(r2b != r2 && r2b != r1);
    let a = post(&app, "/api/accounts/refresh", json!({"refresh_token": r2b})).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let r3 = a.body["refresh_token"].as_str().unwrap().to_owned();

    // r1 again now that its successor was used: reuse, and the family is
    // gone.
    let a = post(&app, "/api/accounts/refresh", json!({"refresh_token": r1})).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.body["error"]["code"], "refresh_token_reused");
    let a = post(&app, "/api/accounts/refresh", json!({"refresh_token": r3})).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.body["error"]["code"], "invalid_refresh_token");
    // The superseded r2 is reuse too.
    let a = post(&app, "/api/accounts/refresh", json!({"refresh_token": r2})).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.body["error"]["code"], "refresh_token_reused");

    // Unknown and missing tokens.
    let a = post(
        &app,
        "/api/accounts/refresh",
        json!({"refresh_token": "A".repeat(43)}),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.body["error"]["code"], "invalid_refresh_token");
    let a = post(&app, "/api/accounts/refresh", json!({})).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(fields(&a), ["refresh_token"]);
}

#[tokio::test]
async fn logout_revokes_the_family() {
    let (app, _) = app().await;
    register(&app, "gus@example.com", "a long passphrase").await;
    let t = login(&app, "gus@example.com", "a long passphrase")
        .await
        .body;
    let r1 = t["refresh_token"].as_str().unwrap();
    let r2 = post(&app, "/api/accounts/refresh", json!({"refresh_token": r1}))
        .await
        .body["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    // A second session of the same user survives the first one's logout.
    let other = login(&app, "gus@example.com", "a long passphrase")
        .await
        .body;

    let a = post(&app, "/api/accounts/logout", json!({"refresh_token": r2})).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    let a = post(&app, "/api/accounts/refresh", json!({"refresh_token": r2})).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    // Idempotent, and says nothing about unknown tokens.
    let a = post(&app, "/api/accounts/logout", json!({"refresh_token": r2})).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    let a = post(
        &app,
        "/api/accounts/logout",
        json!({"refresh_token": "nope"}),
    )
    .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    let a = post(&app, "/api/accounts/logout", json!({})).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);

    let a = post(
        &app,
        "/api/accounts/refresh",
        json!({"refresh_token": other["refresh_token"]}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
}

/// `name`'s value among a response's `Set-Cookie` fields, with its
/// attributes.
fn set_cookie<'a>(a: &'a Answer, name: &str) -> Option<&'a str> {
    a.headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
}

/// The value `set_cookie` gives `name`.
fn cookie_value(a: &Answer, name: &str) -> String {
    let field = set_cookie(a, name).unwrap_or_else(|| panic!("no {name} cookie: {:?}", a.headers));
    field[name.len() + 1..]
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

/// A POST with the `Cookie` field and, optionally, the forwarded scheme.
async fn post_with_cookie(app: &Router, path: &str, body: Value, cookie: &str) -> Answer {
    send(
        app,
        Request::post(path)
            .header("content-type", "application/json")
            .header("cookie", cookie)
            .body(Body::from(body.to_string()))
            .unwrap(),
    )
    .await
}

/// Two refresh cookies (ours, and one a sibling host set for the parent
/// domain): neither is spent nor cleared, and a logout ends both.
#[tokio::test]
async fn two_refresh_cookies_refresh_nothing_and_a_logout_ends_both() {
    let (app, _) = app().await;
    let mut rts = Vec::new();
    for email in ["ivy@example.com", "mallory@example.com"] {
        register(&app, email, "a long passphrase").await;
        let body = json!({"email": email, "password": "a long passphrase", "session": "cookie"});
        let a = post(&app, "/api/accounts/login", body).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        rts.push(cookie_value(&a, "shop_rt"));
    }
    let (ivy, mallory) = (&rts[0], &rts[1]);
    // The planted one first, as a browser sends a longer path's first.
    let both = format!("shop_rt={mallory}; shop_session=1; shop_rt={ivy}");
    let a = post_with_cookie(&app, "/api/accounts/refresh", json!({}), &both).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.body);
    assert_eq!(a.body["error"]["code"], "ambiguous_session");
    assert!(a.headers.get_all("set-cookie").iter().next().is_none());
    // Neither was spent: each alone still refreshes.
    let mut next = Vec::new();
    for rt in [ivy, mallory] {
        let cookie = format!("shop_rt={rt}");
        let a = post_with_cookie(&app, "/api/accounts/refresh", json!({}), &cookie).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        next.push(cookie_value(&a, "shop_rt"));
    }
    // A logout with both ends both sessions.
    let both = format!("shop_rt={}; shop_rt={}", next[1], next[0]);
    let a = post_with_cookie(&app, "/api/accounts/logout", json!({}), &both).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT, "{}", a.body);
    for rt in &next {
        let a = post(&app, "/api/accounts/refresh", json!({"refresh_token": rt})).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.body);
    }
    // Hundreds of them (each a hash and a lookup) are refused unread.
    let many: Vec<String> = (0..300).map(|n| format!("shop_rt={n:0>43}")).collect();
    let a = post_with_cookie(&app, "/api/accounts/logout", json!({}), &many.join("; ")).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert_eq!(a.body["error"]["code"], "too_many_sessions");
}

/// A browser's session: the tokens only in `HttpOnly` cookies, the
/// refresh token read from its cookie and rotated there, a reused one
/// ending the session in the browser too, and logout clearing them.
#[tokio::test]
async fn a_cookie_session_keeps_both_tokens_out_of_the_page() {
    let (app, _) = app().await;
    register(&app, "ivy@example.com", "a long passphrase").await;
    let credentials = json!({"email": "ivy@example.com", "password": "a long passphrase"});
    let mut body = credentials.clone();
    body["session"] = json!("cookies");
    let a = post(&app, "/api/accounts/login", body.clone()).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(fields(&a), ["session"]);

    body["session"] = json!("cookie");
    let a = post(&app, "/api/accounts/login", body.clone()).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body, json!({"session": "cookie", "expires_in": 900}));
    assert_eq!(a.headers["cache-control"], "no-store");
    let at = set_cookie(&a, "shop_at").unwrap();
    assert!(at.contains("HttpOnly") && at.contains("Path=/api;") && at.ends_with("Max-Age=900"));
    assert!(!at.contains("Secure"), "plain HTTP: {at}");
    let rt = set_cookie(&a, "shop_rt").unwrap();
    assert!(
        rt.contains("HttpOnly")
            && rt.contains("SameSite=Strict")
            && rt.contains("Path=/api/accounts;")
    );
    let session = set_cookie(&a, "shop_session").unwrap();
    assert!(
        !session.contains("HttpOnly"),
        "the page reads when it expires"
    );
    let expires: i64 = cookie_value(&a, "shop_session").parse().unwrap();
    let claims = verified_claims(&app, &cookie_value(&a, "shop_at")).await;
    assert_eq!(claims["email"], "ivy@example.com");
    assert_eq!(claims["exp"], expires);

    // The refresh token from its cookie, rotated in the cookies.
    let r1 = cookie_value(&a, "shop_rt");
    let cookie = format!("shop_session={expires}; shop_rt={r1}");
    let a = post_with_cookie(&app, "/api/accounts/refresh", json!({}), &cookie).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert!(a.body.get("refresh_token").is_none() && a.body.get("access_token").is_none());
    let r2 = cookie_value(&a, "shop_rt");
    assert_ne!(r2, r1);
    // A token in the body is the token, whatever the cookie.
    let a = post_with_cookie(
        &app,
        "/api/accounts/refresh",
        json!({"refresh_token": r2}),
        "shop_rt=unknown",
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert!(
        set_cookie(&a, "shop_rt").is_none(),
        "a body session stays one"
    );
    let r3 = a.body["refresh_token"].as_str().unwrap().to_owned();

    // The spent cookie again: the family is revoked, and the browser is
    // told to forget its cookies.
    let a = post_with_cookie(
        &app,
        "/api/accounts/refresh",
        json!({}),
        &format!("shop_rt={r1}"),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.body["error"]["code"], "refresh_token_reused");
    for name in ["shop_at", "shop_rt", "shop_session"] {
        assert!(
            set_cookie(&a, name).is_some_and(|c| c.contains("Max-Age=0")),
            "{name}"
        );
    }
    let a = post(&app, "/api/accounts/refresh", json!({"refresh_token": r3})).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);

    // Over HTTPS the cookies are `Secure`; logout by cookie clears them.
    let a = send(
        &app,
        Request::post("/api/accounts/login")
            .header("content-type", "application/json")
            .header("x-forwarded-proto", "https")
            .body(Body::from(body.to_string()))
            .unwrap(),
    )
    .await;
    assert!(set_cookie(&a, "shop_rt").unwrap().contains("Secure"));
    let rt = cookie_value(&a, "shop_rt");
    let a = post_with_cookie(
        &app,
        "/api/accounts/logout",
        json!({}),
        &format!("shop_rt={rt}"),
    )
    .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    assert!(set_cookie(&a, "shop_rt").is_some_and(|c| c.contains("Max-Age=0")));
    let a = post_with_cookie(
        &app,
        "/api/accounts/refresh",
        json!({}),
        &format!("shop_rt={rt}"),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    // Neither a body token nor a cookie: the field error says where.
    let a = post_with_cookie(&app, "/api/accounts/refresh", json!({}), "other=1").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(fields(&a), ["refresh_token"]);
}

#[tokio::test]
async fn me_reads_the_gateway_header() {
    let (app, _) = app().await;
    let user = post(
        &app,
        "/api/accounts/register",
        json!({"email": "hal@example.com", "password": "a long passphrase", "name": "Hal"}),
    )
    .await
    .body;
    let id = user["id"].as_str().unwrap();
    let a = get(&app, "/api/accounts/me", Some(id)).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.body,
        json!({"id": id, "email": "hal@example.com", "name": "Hal"})
    );

    for who in [None, Some(""), Some("no-such-user")] {
        let a = get(&app, "/api/accounts/me", who).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{who:?}");
        assert_eq!(a.body["error"]["code"], "unauthenticated");
    }
}

#[tokio::test]
async fn jwks_has_the_okp_shape_and_a_cache_lifetime() {
    let (app, _) = app().await;
    let a = get(&app, "/.well-known/jwks.json", None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(
        a.headers["cache-control"]
            .to_str()
            .unwrap()
            .contains("max-age=60")
    );
    let keys = a.body["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    let k = keys[0].as_object().unwrap();
    let mut members: Vec<&str> = k.keys().map(String::as_str).collect();
    members.sort_unstable();
    assert_eq!(
        members,
        ["alg", "crv", "kid", "kty", "use", "x"],
        "no private member"
    );
    assert_eq!(k["kty"], "OKP");
    assert_eq!(k["crv"], "Ed25519");
    assert_eq!(k["alg"], "EdDSA");
    assert_eq!(k["use"], "sig");
    let x = URL_SAFE_NO_PAD.decode(k["x"].as_str().unwrap()).unwrap();
    assert_eq!(x.len(), 32);
    assert_eq!(k["kid"], keys::thumbprint(&x).as_str());
}

#[tokio::test]
async fn unknown_routes_get_the_platform_404() {
    let (app, _) = app().await;
    let a = get(&app, "/api/accounts/admin/rotate-keys", None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.body["error"]["code"], "not_found");
}

/// A refresh, login or logout by cookie from a page of another origin (a
/// sibling host is the same site, so `SameSite` lets the cookie go) is
/// refused before anything is spent.
#[tokio::test]
async fn a_cookie_session_is_used_only_from_this_origin() {
    let (app, _) = app().await;
    register(&app, "jon@example.com", "a long passphrase").await;
    let body =
        json!({"email": "jon@example.com", "password": "a long passphrase", "session": "cookie"});
    let login = |site: &'static str| {
        Request::post("/api/accounts/login")
            .header("content-type", "application/json")
            .header("host", "shop.example")
            .header("sec-fetch-site", site)
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let a = send(&app, login("same-site")).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
    assert_eq!(a.body["error"]["code"], "cross_origin_request");
    assert!(set_cookie(&a, "shop_rt").is_none());
    let a = send(&app, login("same-origin")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let rt = cookie_value(&a, "shop_rt");
    let refresh = |origin: &'static str| {
        Request::post("/api/accounts/refresh")
            .header("content-type", "application/json")
            .header("host", "shop.example")
            .header("origin", origin)
            .header("cookie", format!("shop_rt={rt}"))
            .body(Body::from("{}"))
            .unwrap()
    };
    let a = send(&app, refresh("http://promo.shop.example")).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
    // Not spent: the shop's own page refreshes with it after.
    let a = send(&app, refresh("http://shop.example")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    // A token in the body is an API client's, whatever the page.
    let t = login_tokens(&app).await;
    let a = send(
        &app,
        Request::post("/api/accounts/refresh")
            .header("content-type", "application/json")
            .header("origin", "http://evil.example")
            .body(Body::from(json!({"refresh_token": t}).to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
}

async fn login_tokens(app: &Router) -> String {
    login(app, "jon@example.com", "a long passphrase")
        .await
        .body["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned()
}
