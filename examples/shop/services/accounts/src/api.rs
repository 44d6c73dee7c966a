//! The accounts HTTP API: register, log in, refresh, log out, who am I,
//! and the JWKS that verifiers use to check access tokens.
//!
//! Passwords and tokens are never logged: log lines name users by id.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use flotilla_chassis::{ApiError, ApiJson, FieldError, VerifiedUser};
use serde::{Deserialize, Serialize};
use sqlx::SqlitePool;

use crate::config::{Config, JWKS_MAX_AGE_SECONDS};
use crate::jwt::{self, ACCESS_TTL_SECONDS, Claims};
use crate::keys::{KeyError, Keys};
use crate::password::{PasswordError, Passwords};
use crate::refresh::{self, RefreshError, Rotation};
use crate::session::{self, Delivery};
use crate::throttle::{self, Attempt};
use crate::users::{self, User};
use crate::validate;

/// The JWKS may be cached this long; key publication waits for it
/// (see `config::DEFAULT_PUBLISH_DELAY`).
const JWKS_CACHE_CONTROL: &str = "public, max-age=60";
const _: () = assert!(JWKS_MAX_AGE_SECONDS == 60, "update JWKS_CACHE_CONTROL");

/// Request bodies are a few hundred bytes; a password is at most 1 KiB.
const MAX_BODY_BYTES: usize = 16 * 1024;

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    pub db: SqlitePool,
    pub passwords: Passwords,
    pub keys: Keys,
    pub config: Arc<Config>,
}

/// The routes. `/.well-known/jwks.json` is for verifiers (the gateway
/// fetches it as `accounts:/.well-known/jwks.json`).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/accounts/register", post(register))
        .route("/api/accounts/login", post(login))
        .route("/api/accounts/refresh", post(refresh_tokens))
        .route("/api/accounts/logout", post(logout))
        .route("/api/accounts/me", get(me))
        .route("/.well-known/jwks.json", get(jwks))
        .fallback(flotilla_chassis::not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Seconds since the epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

// ---- Errors → HTTP: the one place ------------------------------------------

fn invalid_credentials() -> ApiError {
    // One message for unknown e-mail and wrong password: no account oracle.
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
        "the e-mail address or password is wrong",
    )
}

/// 429 for an address whose recent sign-ins failed too often
/// ([`throttle`]); said alike whether or not it has an account.
fn too_many_attempts(wait: i64) -> Response {
    let mut res = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_attempts",
        format!("too many failed sign-ins for this e-mail address; try again in {wait} s"),
    )
    .into_response();
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(wait.max(1)));
    res
}

fn invalid_refresh_token() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_refresh_token",
        "the refresh token is unknown, expired or revoked; sign in again",
    )
}

/// Most refresh-token cookies one request may carry (a browser has one, or
/// two with a planted one).
const MAX_SESSION_COOKIES: usize = 4;

fn ambiguous_session() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "ambiguous_session",
        "the request carries more than one session cookie (another site may have set one for this domain); nothing was refreshed",
    )
}

fn cross_origin() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "cross_origin_request",
        "a session in cookies is used only from the shop's own pages; an API client sends its tokens in the body instead",
    )
}

fn refresh_token_reused() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "refresh_token_reused",
        "this refresh token was already used, so the session was ended for safety; sign in again",
    )
}

impl From<PasswordError> for ApiError {
    fn from(err: PasswordError) -> Self {
        match err {
            PasswordError::Busy(_) => {
                tracing::warn!(error = %err, "password hashing saturated");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "busy",
                    "too many sign-ins at once; try again in a few seconds",
                )
            }
            other => ApiError::internal(&other),
        }
    }
}

impl From<RefreshError> for ApiError {
    fn from(err: RefreshError) -> Self {
        ApiError::internal(&err)
    }
}

impl From<KeyError> for ApiError {
    fn from(err: KeyError) -> Self {
        ApiError::internal(&err)
    }
}

/// No key signs right now: only possible if the key table was emptied
/// under a running service (the upkeep task recreates one within seconds).
fn no_signing_key() -> ApiError {
    tracing::error!("no active signing key; the key upkeep will create one");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "signing_unavailable",
        "sign-in is briefly unavailable; try again shortly",
    )
}

fn collect<T>(errors: &mut Vec<FieldError>, r: Result<T, FieldError>) -> Option<T> {
    r.map_err(|e| errors.push(e)).ok()
}

// ---- Register ----------------------------------------------------------------

/// `POST /api/accounts/register` body; optional at the JSON level so that a
/// missing field is a field error, not a parse error.
#[derive(Debug, Default, Deserialize)]
pub struct Register {
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

async fn register(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Register>,
) -> Result<Response, ApiError> {
    let mut errors = Vec::new();
    let email = collect(&mut errors, validate::email("email", body.email.as_deref()));
    let typed_email = body.email.as_deref().map(str::trim);
    let password = collect(
        &mut errors,
        validate::new_password(body.password.as_deref(), typed_email),
    );
    let name = collect(&mut errors, validate::name(body.name.as_deref()));
    let (Some(email), Some(password), Some(name)) = (email, password, name) else {
        return Err(ApiError::validation(errors));
    };
    // Hash before looking for the address, so a taken one answers no
    // faster than a free one.
    let hash = state.passwords.hash(password.into_bytes()).await?;
    let user = User {
        id: uuid::Uuid::new_v4().to_string(),
        email,
        name,
        created_at: flotilla_chassis::now_rfc3339(),
    };
    if !users::insert(&state.db, &user, &hash).await? {
        return Err(ApiError::conflict(
            "email_taken",
            "an account with this e-mail address already exists; sign in instead",
        )
        .with_field("email", "is already registered"));
    }
    metrics::counter!("accounts_registrations_total").increment(1);
    tracing::info!(user = %user.id, "account registered");
    Ok((StatusCode::CREATED, axum::Json(user)).into_response())
}

// ---- Tokens ------------------------------------------------------------------

/// The token response (RFC 6749 §5.1).
#[derive(Debug, Serialize)]
struct Tokens {
    access_token: String,
    token_type: &'static str,
    expires_in: i64,
    refresh_token: String,
}

/// A session delivered in cookies: the tokens are in `Set-Cookie` only.
#[derive(Debug, Serialize)]
struct CookieSession {
    session: &'static str,
    expires_in: i64,
}

/// How a new session leaves: where it was asked for (`delivery`), and
/// whether the client's connection was HTTPS (`secure`, for the cookies).
#[derive(Debug, Clone, Copy)]
struct Reply {
    delivery: Delivery,
    secure: bool,
}

impl Reply {
    /// The tokens, in the body or in cookies. Neither may be cached by
    /// anything in between (RFC 6749 §5.1).
    fn tokens(self, access_token: String, refresh_token: String, ttl: i64) -> Response {
        let mut res = match self.delivery {
            Delivery::Body => axum::Json(Tokens {
                access_token,
                token_type: "Bearer",
                expires_in: ACCESS_TTL_SECONDS,
                refresh_token,
            })
            .into_response(),
            Delivery::Cookie => {
                let mut res = axum::Json(CookieSession {
                    session: "cookie",
                    expires_in: ACCESS_TTL_SECONDS,
                })
                .into_response();
                session::set(
                    res.headers_mut(),
                    &access_token,
                    ACCESS_TTL_SECONDS,
                    unix_now() + ACCESS_TTL_SECONDS,
                    &refresh_token,
                    ttl,
                    self.secure,
                );
                res
            }
        };
        let headers = res.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        res
    }

    /// `err`, and for a cookie session, cookies that end it in the browser
    /// (a revoked or unknown refresh token is of no more use there).
    fn ended(self, err: ApiError) -> Response {
        let mut res = err.into_response();
        if self.delivery == Delivery::Cookie {
            session::clear(res.headers_mut(), self.secure);
        }
        res
    }
}

/// `POST /api/accounts/login` body.
#[derive(Debug, Default, Deserialize)]
pub struct Login {
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    password: Option<String>,
    /// `"token"` (the default: tokens in the body) or `"cookie"` (see
    /// [`session`]).
    #[serde(default)]
    session: Option<String>,
}

async fn login(
    State(state): State<AppState>,
    request: HeaderMap,
    ApiJson(body): ApiJson<Login>,
) -> Result<Response, ApiError> {
    let mut errors = Vec::new();
    let email = collect(&mut errors, validate::email("email", body.email.as_deref()));
    let password = collect(
        &mut errors,
        validate::login_password(body.password.as_deref()),
    );
    let delivery = Delivery::parse(body.session.as_deref());
    if delivery.is_none() {
        errors.push(FieldError::new(
            "session",
            "must be \"token\" or \"cookie\"",
        ));
    }
    let (Some(email), Some(password), Some(delivery)) = (email, password, delivery) else {
        return Err(ApiError::validation(errors));
    };
    // A page of another origin must not sign the browser in (login CSRF).
    if delivery == Delivery::Cookie && !session::from_this_origin(&request) {
        return Err(cross_origin());
    }
    let reply = Reply {
        delivery,
        secure: session::secure(&request),
    };
    // Before the (costly) password check, and counted as a failure until
    // it turns out right: see `throttle`.
    if let Attempt::Wait(wait) = throttle::attempt(&state.db, &email, unix_now()).await? {
        metrics::counter!("accounts_logins_total", "outcome" => "throttled").increment(1);
        tracing::info!("login refused: throttled");
        return Ok(too_many_attempts(wait));
    }
    let checked = async {
        let (user, stored) = match users::by_email(&state.db, &email).await? {
            Some((user, hash)) => (Some(user), Some(hash)),
            None => (None, None),
        };
        // An unknown user is checked against a dummy hash: same work, same
        // time.
        let matched = state
            .passwords
            .verify(password.into_bytes(), stored)
            .await?;
        Ok::<_, ApiError>(user.filter(|_| matched))
    };
    let user = match checked.await {
        Ok(user) => user,
        Err(e) => {
            // No verdict (a 503 when hashing is saturated, say): not a
            // failed guess.
            throttle::undecided(&state.db, &email).await?;
            return Err(e);
        }
    };
    let Some(user) = user else {
        metrics::counter!("accounts_logins_total", "outcome" => "invalid_credentials").increment(1);
        tracing::info!("login refused: invalid credentials");
        return Err(invalid_credentials());
    };
    throttle::succeeded(&state.db, &email).await?;
    let now = unix_now();
    let ring = state.keys.current();
    let signer = ring.signer(now).ok_or_else(no_signing_key)?;
    let life = state.config.refresh_lifetime();
    let refresh_token = refresh::start_family(&state.db, &user.id, now, life).await?;
    let claims = Claims::access(
        &state.config.issuer,
        &state.config.audience,
        &user.id,
        &user.email,
        now,
    );
    metrics::counter!("accounts_logins_total", "outcome" => "success").increment(1);
    tracing::info!(user = %user.id, kid = %signer.kid, "logged in");
    Ok(reply.tokens(jwt::sign(signer, &claims), refresh_token, life.ttl))
}

/// `POST /api/accounts/refresh` and `/logout` body. Without a token, the
/// session's cookie is the token.
#[derive(Debug, Default, Deserialize)]
pub struct RefreshBody {
    #[serde(default)]
    refresh_token: Option<String>,
}

/// The refresh tokens presented, and how the session they belong to is
/// delivered: the body's, else the cookie's (more than one when another
/// site set one too: see [`session::refresh_tokens`]).
fn presented_tokens(
    body: RefreshBody,
    request: &HeaderMap,
) -> Result<(Vec<String>, Reply), ApiError> {
    let secure = session::secure(request);
    if let Some(token) = body.refresh_token.filter(|t| !t.is_empty()) {
        let delivery = Delivery::Body;
        return Ok((vec![token], Reply { delivery, secure }));
    }
    let tokens = session::refresh_tokens(request);
    // Ours and a planted one are two; each costs a hash and a lookup, so a
    // client sending hundreds is refused before any.
    if tokens.len() > MAX_SESSION_COOKIES {
        return Err(ApiError::bad_request(
            "too_many_sessions",
            format!("the request carries more than {MAX_SESSION_COOKIES} session cookies"),
        ));
    }
    if tokens.is_empty() {
        return Err(ApiError::validation(vec![FieldError::new(
            "refresh_token",
            "is required (in the body, or in the session's cookie)",
        )]));
    }
    if !session::from_this_origin(request) {
        return Err(cross_origin());
    }
    let delivery = Delivery::Cookie;
    Ok((tokens, Reply { delivery, secure }))
}

async fn refresh_tokens(
    State(state): State<AppState>,
    request: HeaderMap,
    ApiJson(body): ApiJson<RefreshBody>,
) -> Result<Response, ApiError> {
    let (presented, reply) = presented_tokens(body, &request)?;
    // Two session cookies: ours and one another site set for the domain.
    // Neither is spent: the first may be the planter's own, which would
    // sign this browser in as them. The cookies are left as they are:
    // cleared, ours would go and the planted one stay, alone and taken.
    let [presented] = <[String; 1]>::try_from(presented).map_err(|_| ambiguous_session())?;
    let now = unix_now();
    let ring = state.keys.current();
    // Before spending the token: failing after would lose the session.
    let signer = ring.signer(now).ok_or_else(no_signing_key)?;
    let life = state.config.refresh_lifetime();
    match refresh::rotate(&state.db, &presented, now, life).await? {
        Rotation::Rotated {
            user_id,
            token,
            expires_in,
            retry,
        } => {
            // The family cascades away with its user, so the user exists.
            let user = users::by_id(&state.db, &user_id)
                .await?
                .ok_or_else(invalid_refresh_token)?;
            let claims = Claims::access(
                &state.config.issuer,
                &state.config.audience,
                &user.id,
                &user.email,
                now,
            );
            let outcome = if retry { "retried" } else { "rotated" };
            metrics::counter!("accounts_refreshes_total", "outcome" => outcome).increment(1);
            Ok(reply.tokens(jwt::sign(signer, &claims), token, expires_in))
        }
        Rotation::Reused { user_id } => {
            metrics::counter!("accounts_refreshes_total", "outcome" => "reused").increment(1);
            tracing::warn!(user = %user_id, "refresh token reused; its family is revoked");
            Ok(reply.ended(refresh_token_reused()))
        }
        Rotation::Invalid => {
            metrics::counter!("accounts_refreshes_total", "outcome" => "invalid").increment(1);
            Ok(reply.ended(invalid_refresh_token()))
        }
    }
}

/// Always 204 for a well-formed request: whether the token was known is
/// nobody's business, and logging out twice is not an error. A cookie
/// session's cookies are cleared.
async fn logout(
    State(state): State<AppState>,
    request: HeaderMap,
    ApiJson(body): ApiJson<RefreshBody>,
) -> Result<Response, ApiError> {
    let (presented, reply) = presented_tokens(body, &request)?;
    // Each session the browser holds is ended, a planted one's too: the
    // user asked to be signed out of whatever this browser is signed in as.
    for token in &presented {
        if refresh::logout(&state.db, token, unix_now()).await? {
            metrics::counter!("accounts_logouts_total").increment(1);
        }
    }
    let mut res = StatusCode::NO_CONTENT.into_response();
    if reply.delivery == Delivery::Cookie {
        session::clear(res.headers_mut(), reply.secure);
    }
    Ok(res)
}

// ---- Me and JWKS -------------------------------------------------------------

#[derive(Debug, Serialize)]
struct Me {
    id: String,
    email: String,
    name: Option<String>,
}

async fn me(
    State(state): State<AppState>,
    caller: VerifiedUser,
) -> Result<axum::Json<Me>, ApiError> {
    let user = users::by_id(&state.db, caller.as_str())
        .await?
        .ok_or_else(VerifiedUser::unauthenticated)?;
    Ok(axum::Json(Me {
        id: user.id,
        email: user.email,
        name: user.name,
    }))
}

async fn jwks(State(state): State<AppState>) -> Response {
    let doc = state.keys.current().jwks(unix_now());
    let mut res = axum::Json(doc).into_response();
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(JWKS_CACHE_CONTROL),
    );
    res
}

#[cfg(test)]
mod tests;
