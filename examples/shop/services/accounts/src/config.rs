//! The service's own settings (`ACCOUNTS_*`), read once at start and
//! validated; a bad value stops the service with the variable's name and
//! the fix.

use std::time::Duration;

use crate::jwt::ACCESS_TTL_SECONDS;
use crate::keys::schedule::Schedule;
use crate::refresh::Lifetime;

/// `Cache-Control: max-age` of the JWKS.
pub const JWKS_MAX_AGE_SECONDS: i64 = 60;
/// How often each replica re-reads the keys and applies the schedule.
pub const KEY_RELOAD_EVERY: Duration = Duration::from_secs(10);
/// The clock skew verifiers allow on `exp` (the gateway's leeway).
pub const VERIFIER_LEEWAY_SECONDS: i64 = 60;
/// The gateway's default JWKS refresh interval.
pub const GATEWAY_JWKS_REFRESH_SECONDS: i64 = 300;

/// Defaults.
pub const DEFAULT_ISSUER: &str = "shop-accounts";
pub const DEFAULT_AUDIENCE: &str = "shop";
pub const DEFAULT_KEY_ROTATION: &str = "24h";
/// Covers the JWKS cache (60 s), one full gateway refresh interval (5 min)
/// and the replicas' key reload (10 s), with room for one failed gateway
/// fetch: a gateway then knows the key before the first token it signs.
pub const DEFAULT_PUBLISH_DELAY: &str = "10m";
pub const DEFAULT_REFRESH_TTL: &str = "30d";
pub const DEFAULT_SESSION_MAX: &str = "90d";
/// Long enough for a client to retry a refresh whose answer it lost, short
/// enough that a replayed token is soon reuse again.
pub const DEFAULT_REFRESH_REUSE_GRACE: &str = "10s";
/// Okta's longest grace period.
pub const MAX_REFRESH_REUSE_GRACE_SECONDS: i64 = 60;

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("environment variable {var}={value:?} is invalid: {reason}; {fix}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub reason: String,
    pub fix: String,
}

/// The validated settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `iss` of access tokens (`ACCOUNTS_ISSUER`).
    pub issuer: String,
    /// `aud` of access tokens (`ACCOUNTS_AUDIENCE`).
    pub audience: String,
    /// Key publication, rotation and retirement (`ACCOUNTS_KEY_ROTATION`,
    /// `ACCOUNTS_KEY_PUBLISH_DELAY`).
    pub keys: Schedule,
    /// Refresh-token lifetime in seconds (`ACCOUNTS_REFRESH_TTL`).
    pub refresh_ttl: i64,
    /// How long a session lasts from its login, however often it is
    /// refreshed, in seconds (`ACCOUNTS_SESSION_MAX`).
    pub session_max: i64,
    /// How long after a refresh its token, presented again, is a retry
    /// rather than reuse, in seconds (`ACCOUNTS_REFRESH_REUSE_GRACE`).
    pub refresh_reuse_grace: i64,
}

impl Config {
    /// From the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// From any lookup, for tests.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let var = |name: &'static str, default: &str| {
            let value = get(name).filter(|v| !v.trim().is_empty());
            (name, value.unwrap_or_else(|| default.to_owned()))
        };
        let (name, issuer) = var("ACCOUNTS_ISSUER", DEFAULT_ISSUER);
        let issuer = identifier(name, issuer)?;
        let (name, audience) = var("ACCOUNTS_AUDIENCE", DEFAULT_AUDIENCE);
        let audience = identifier(name, audience)?;

        let (name, raw) = var("ACCOUNTS_KEY_PUBLISH_DELAY", DEFAULT_PUBLISH_DELAY);
        let publish_delay = seconds(name, &raw)?;
        let floor = JWKS_MAX_AGE_SECONDS + KEY_RELOAD_EVERY.as_secs() as i64;
        if publish_delay < floor {
            return Err(ConfigError {
                var: name,
                value: raw,
                reason: format!(
                    "a new key must stay published at least {floor} s (the JWKS max-age plus the key reload) before it signs"
                ),
                fix: format!(
                    "use at least {}s plus the gateway's JWKS refresh interval, e.g. {DEFAULT_PUBLISH_DELAY}",
                    floor
                ),
            });
        }
        if publish_delay < floor + GATEWAY_JWKS_REFRESH_SECONDS {
            tracing::warn!(
                publish_delay,
                "ACCOUNTS_KEY_PUBLISH_DELAY is shorter than the JWKS max-age plus the gateway's default refresh interval; a gateway may meet a new key's tokens before its JWKS lists it (it then refetches)"
            );
        }

        let (name, raw) = var("ACCOUNTS_KEY_ROTATION", DEFAULT_KEY_ROTATION);
        let rotation = if raw.trim().eq_ignore_ascii_case("off") {
            None
        } else {
            let every = seconds(name, &raw)?;
            if every <= publish_delay {
                return Err(ConfigError {
                    var: name,
                    value: raw,
                    reason: format!(
                        "a key must sign for longer than the publish delay ({publish_delay} s)"
                    ),
                    fix: "use a longer period, e.g. 24h, or `off` to never rotate".into(),
                });
            }
            Some(every)
        };

        let (name, raw) = var("ACCOUNTS_REFRESH_TTL", DEFAULT_REFRESH_TTL);
        let refresh_ttl = seconds(name, &raw)?;
        if refresh_ttl <= ACCESS_TTL_SECONDS {
            return Err(ConfigError {
                var: name,
                value: raw,
                reason: "a refresh token must outlive the 15 min access token".into(),
                fix: "use e.g. 30d".into(),
            });
        }

        let (name, raw) = var("ACCOUNTS_SESSION_MAX", DEFAULT_SESSION_MAX);
        let session_max = seconds(name, &raw)?;
        if session_max < refresh_ttl {
            return Err(ConfigError {
                var: name,
                value: raw,
                reason: format!(
                    "a session must last at least as long as one refresh token ({refresh_ttl} s, ACCOUNTS_REFRESH_TTL)"
                ),
                fix: "use e.g. 90d, or shorten ACCOUNTS_REFRESH_TTL".into(),
            });
        }

        let (name, raw) = var("ACCOUNTS_REFRESH_REUSE_GRACE", DEFAULT_REFRESH_REUSE_GRACE);
        let refresh_reuse_grace = humantime::parse_duration(raw.trim())
            .ok()
            .and_then(|d| i64::try_from(d.as_secs()).ok())
            .filter(|s| *s <= MAX_REFRESH_REUSE_GRACE_SECONDS)
            .ok_or_else(|| ConfigError {
                var: name,
                value: raw.clone(),
                reason: format!(
                    "must be a duration of at most {MAX_REFRESH_REUSE_GRACE_SECONDS} s"
                ),
                fix: "use e.g. 10s, or 0s to take every second use of a refresh token as reuse"
                    .into(),
            })?;

        Ok(Config {
            issuer,
            audience,
            keys: Schedule {
                publish_delay,
                rotation,
                retire_grace: ACCESS_TTL_SECONDS + VERIFIER_LEEWAY_SECONDS,
            },
            refresh_ttl,
            session_max,
            refresh_reuse_grace,
        })
    }

    /// How long refresh tokens and their families live.
    pub fn refresh_lifetime(&self) -> Lifetime {
        Lifetime {
            ttl: self.refresh_ttl,
            max: self.session_max,
            reuse_grace: self.refresh_reuse_grace,
        }
    }
}

fn identifier(var: &'static str, value: String) -> Result<String, ConfigError> {
    let value = value.trim().to_owned();
    if value.len() > 256 || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError {
            var,
            value,
            reason: "must be at most 256 characters without spaces".into(),
            fix: "use a name or URL such as shop-accounts".into(),
        });
    }
    Ok(value)
}

fn seconds(var: &'static str, raw: &str) -> Result<i64, ConfigError> {
    let invalid = |reason: String| ConfigError {
        var,
        value: raw.to_owned(),
        reason,
        fix: "write a duration such as 90s, 10m, 24h or 30d".into(),
    };
    let d = humantime::parse_duration(raw.trim()).map_err(|e| invalid(e.to_string()))?;
    let secs = i64::try_from(d.as_secs()).map_err(|_| invalid("too long".into()))?;
    // Ten years: longer is a typo, and keeps timestamp arithmetic far from
    // overflow.
    if secs == 0 || secs > 10 * 365 * 86_400 {
        return Err(invalid("must be between 1 s and 10 years".into()));
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults() {
        let c = config(&[]).unwrap();
        assert_eq!(c.issuer, "shop-accounts");
        assert_eq!(c.audience, "shop");
        assert_eq!(c.keys.publish_delay, 600);
        assert_eq!(c.keys.rotation, Some(86_400));
        assert_eq!(c.keys.retire_grace, 960);
        assert_eq!(c.refresh_ttl, 30 * 86_400);
        assert_eq!(c.session_max, 90 * 86_400);
        assert_eq!(c.refresh_reuse_grace, 10);
        // The invariant the default exists for.
        assert!(
            c.keys.publish_delay
                >= JWKS_MAX_AGE_SECONDS
                    + GATEWAY_JWKS_REFRESH_SECONDS
                    + KEY_RELOAD_EVERY.as_secs() as i64
        );
    }

    #[test]
    fn settings_and_their_errors() {
        let c = config(&[
            ("ACCOUNTS_ISSUER", "https://shop.example/accounts"),
            ("ACCOUNTS_AUDIENCE", "shop-api"),
            ("ACCOUNTS_KEY_ROTATION", "off"),
            ("ACCOUNTS_KEY_PUBLISH_DELAY", "6m"),
            ("ACCOUNTS_REFRESH_TTL", "7d"),
            ("ACCOUNTS_SESSION_MAX", "7d"),
            ("ACCOUNTS_REFRESH_REUSE_GRACE", "0s"),
        ])
        .unwrap();
        assert_eq!(c.refresh_reuse_grace, 0);
        assert_eq!(c.issuer, "https://shop.example/accounts");
        assert_eq!(c.audience, "shop-api");
        assert_eq!(c.keys.rotation, None);
        assert_eq!(c.keys.publish_delay, 360);
        assert_eq!(c.refresh_ttl, 7 * 86_400);
        assert_eq!(c.session_max, 7 * 86_400);

        for (var, value, says) in [
            ("ACCOUNTS_KEY_ROTATION", "soon", "duration"),
            ("ACCOUNTS_KEY_ROTATION", "5m", "publish delay"),
            ("ACCOUNTS_KEY_PUBLISH_DELAY", "30s", "max-age"),
            ("ACCOUNTS_REFRESH_TTL", "10m", "outlive"),
            ("ACCOUNTS_SESSION_MAX", "29d", "at least as long"),
            ("ACCOUNTS_ISSUER", "shop accounts", "spaces"),
            ("ACCOUNTS_REFRESH_REUSE_GRACE", "2m", "at most 60 s"),
            ("ACCOUNTS_REFRESH_REUSE_GRACE", "soon", "at most 60 s"),
        ] {
            let err = config(&[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(var), "{err}");
            assert!(err.contains(says), "{err}");
        }
    }
}
