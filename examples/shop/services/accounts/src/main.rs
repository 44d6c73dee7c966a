//! `shop-accounts`: the shop's users, their sign-in, and the keys that
//! sign their access tokens.
//!
//! Owns users, refresh-token families and Ed25519 signing keys in its own
//! SQLite database. Access tokens are EdDSA JWTs for 15 minutes, verified
//! by the gateway against `/.well-known/jwks.json`; refresh tokens rotate on
//! every use. Settings: see [`config`].

mod api;
mod config;
mod jwt;
mod keys;
mod openapi;
mod password;
mod refresh;
mod session;
mod throttle;
mod users;
mod validate;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use flotilla_chassis::{Service, error_chain};
use sqlx::SqlitePool;

use crate::config::{Config, ConfigError, KEY_RELOAD_EVERY};
use crate::keys::schedule::Schedule;
use crate::keys::{KeyError, Keys};
use crate::password::{PasswordError, Passwords};

/// The accounts schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How often expired refresh tokens are deleted.
const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// What stops the service at start.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Chassis(#[from] flotilla_chassis::Error),
    #[error("could not load or create the signing keys")]
    Keys(#[from] KeyError),
    #[error("could not prepare password hashing")]
    Passwords(#[from] PasswordError),
}

#[tokio::main]
async fn main() -> ExitCode {
    flotilla_chassis::run_main("shop-accounts", run()).await
}

async fn run() -> Result<(), StartError> {
    let service = Service::from_env()?.with_openapi(openapi::document());
    let config = Config::from_env()?;
    tracing::info!(
        issuer = %config.issuer,
        audience = %config.audience,
        key_rotation_seconds = config.keys.rotation.unwrap_or(0),
        key_publish_delay_seconds = config.keys.publish_delay,
        "accounts configured"
    );
    let db = service.database(&MIGRATOR).await?;
    let ring = keys::maintain(&db, config.keys, api::unix_now()).await?;
    let signer = ring.signer(api::unix_now()).map(|k| k.kid.clone());
    tracing::info!(
        kid = signer.as_deref().unwrap_or("none"),
        "signing keys loaded"
    );
    let keys = Keys::new(ring);
    let passwords = Passwords::new().await?;
    let upkeep = tokio::spawn(upkeep(db.clone(), keys.clone(), config.keys, signer));
    let state = api::AppState {
        db: db.clone(),
        passwords,
        keys,
        config: Arc::new(config),
    };
    let served = service.serve(api::router(state)).await;
    upkeep.abort();
    // Closing checkpoints the WAL, leaving a single tidy file behind.
    db.close().await;
    Ok(served?)
}

/// Applies the key schedule every [`KEY_RELOAD_EVERY`] (picking up keys
/// other replicas created) and purges expired refresh tokens and stale
/// sign-in failure counts hourly. A failed round keeps the current keys
/// and is retried next tick.
async fn upkeep(db: SqlitePool, keys: Keys, schedule: Schedule, mut signer: Option<String>) {
    let mut tick = tokio::time::interval(KEY_RELOAD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_purge = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let now = api::unix_now();
        match keys::maintain(&db, schedule, now).await {
            Ok(ring) => {
                let current = ring.signer(now).map(|k| k.kid.clone());
                if current != signer {
                    tracing::info!(
                        kid = current.as_deref().unwrap_or("none"),
                        previous = signer.as_deref().unwrap_or("none"),
                        "signing key switched"
                    );
                    signer = current;
                }
                keys.replace(ring);
            }
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "key upkeep failed; keeping the current keys")
            }
        }
        if last_purge.elapsed() >= PURGE_EVERY {
            last_purge = tokio::time::Instant::now();
            match refresh::purge_expired(&db, now).await {
                Ok(n) => tracing::info!(purged = n, "expired refresh tokens deleted"),
                Err(e) => tracing::error!(error = %error_chain(&e), "refresh-token purge failed"),
            }
            match throttle::purge(&db, now).await {
                Ok(n) => tracing::info!(purged = n, "stale sign-in failure counts deleted"),
                Err(e) => tracing::error!(error = %error_chain(&e), "sign-in count purge failed"),
            }
        }
    }
}
