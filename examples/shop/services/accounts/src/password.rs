//! Password hashing with argon2id (RustCrypto `argon2`), off the async
//! runtime and with bounded concurrency.
//!
//! Parameters are the crate's defaults, which are OWASP's recommendation
//! for argon2id: 19 MiB of memory, 2 passes, 1 lane. Each hash stores its
//! own parameters (PHC string), so raising them later only affects new
//! hashes. Verification recomputes the hash and compares in constant time
//! (the crate's `PasswordVerifier`).
//!
//! A hash takes tens of milliseconds of one core and 19 MiB: it runs on the
//! blocking pool, and at most one per core at a time (more would only queue
//! in the pool while multiplying memory). A request that cannot get a turn
//! within [`QUEUE_WAIT`] is turned away as busy rather than waiting without
//! bound: sign-in floods must not take the service's memory with them.
//!
//! Unknown users are checked against a dummy hash made at start with the
//! same parameters, so "no such user" costs what "wrong password" costs.

use std::sync::Arc;
use std::time::Duration;

use argon2::{Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier};
use tokio::sync::Semaphore;

/// How long a request waits for a hashing slot before it is refused.
pub const QUEUE_WAIT: Duration = Duration::from_secs(5);

/// Why a hash or check could not be done. Never carries the password.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("all password-hashing slots stayed busy for {0:?}")]
    Busy(Duration),
    #[error("argon2 failed")]
    Argon2(#[source] argon2::password_hash::Error),
    #[error("the stored password hash is not a valid PHC string")]
    StoredHash(#[source] argon2::password_hash::phc::Error),
    #[error("the hashing task did not complete")]
    Task(#[from] tokio::task::JoinError),
}

/// Hashes and checks passwords.
#[derive(Clone)]
pub struct Passwords {
    params: Params,
    slots: Arc<Semaphore>,
    queue_wait: Duration,
    dummy: Arc<str>,
    /// Passwords checked (argon2 run), with the dummy or a stored hash.
    checked: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passwords")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl Passwords {
    /// With OWASP's parameters and one slot per core.
    pub async fn new() -> Result<Passwords, PasswordError> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_params(Params::default(), cores).await
    }

    /// With the given parameters and slots; tests use cheap parameters.
    pub async fn with_params(params: Params, slots: usize) -> Result<Passwords, PasswordError> {
        let mut passwords = Passwords {
            params,
            slots: Arc::new(Semaphore::new(slots.max(1))),
            queue_wait: QUEUE_WAIT,
            dummy: Arc::from(""),
            checked: Arc::default(),
        };
        // A random password nobody knows: the dummy must never match.
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| PasswordError::Argon2(argon2::password_hash::Error::RngFailure))?;
        let dummy = passwords.hash(secret.to_vec()).await?;
        passwords.dummy = Arc::from(dummy);
        Ok(passwords)
    }

    fn hasher(params: Params) -> Argon2<'static> {
        Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
    }

    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PasswordError> {
        let wait = self.queue_wait;
        let permit = tokio::time::timeout(wait, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| PasswordError::Busy(wait))?
            // The semaphore is never closed.
            .map_err(|_| PasswordError::Busy(wait))?;
        let out = tokio::task::spawn_blocking(move || {
            let out = job();
            drop(permit);
            out
        })
        .await?;
        Ok(out)
    }

    /// An argon2id PHC string for `password`, with a fresh random salt.
    pub async fn hash(&self, password: Vec<u8>) -> Result<String, PasswordError> {
        let params = self.params.clone();
        self.run(move || Self::hasher(params).hash_password(&password))
            .await?
            .map(|h| h.to_string())
            .map_err(PasswordError::Argon2)
    }

    /// Whether `password` matches `stored`; with `None` (no such user) it
    /// checks against the dummy hash, taking as long, and answers false.
    pub async fn verify(
        &self,
        password: Vec<u8>,
        stored: Option<String>,
    ) -> Result<bool, PasswordError> {
        let known = stored.is_some();
        let stored = stored.unwrap_or_else(|| self.dummy.to_string());
        let params = self.params.clone();
        let checked = Arc::clone(&self.checked);
        let matched = self
            .run(move || {
                checked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let parsed = PasswordHash::new(&stored).map_err(PasswordError::StoredHash)?;
                // The stored hash's own parameters are used, not `params`.
                match Self::hasher(params).verify_password(&password, &parsed) {
                    Ok(()) => Ok(true),
                    Err(argon2::password_hash::Error::PasswordInvalid) => Ok(false),
                    Err(e) => Err(PasswordError::Argon2(e)),
                }
            })
            .await??;
        Ok(matched && known)
    }

    /// How many passwords were checked (argon2 run) so far: a login for
    /// an unknown address must cost one as a known one does.
    #[cfg(test)]
    pub(crate) fn checked(&self) -> u64 {
        self.checked.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The cheapest argon2id parameters: the algorithm is the same, the
    /// cost is not, so handler tests stay fast in debug builds.
    pub(crate) async fn cheap() -> Passwords {
        Passwords::with_params(Params::new(8, 1, 1, None).unwrap(), 2)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn hashes_are_argon2id_salted_and_verify() {
        let p = cheap().await;
        let a = p.hash(b"correct horse".to_vec()).await.unwrap();
        let b = p.hash(b"correct horse".to_vec()).await.unwrap();
        assert!(a.starts_with("$argon2id$v=19$"), "{a}");
        assert_ne!(a, b, "a fresh salt each time");
        assert!(!a.contains("correct horse"));
        assert!(
            p.verify(b"correct horse".to_vec(), Some(a.clone()))
                .await
                .unwrap()
        );
        assert!(
            !p.verify(b"correct horsf".to_vec(), Some(a.clone()))
                .await
                .unwrap()
        );
        // Unknown user: checked against the dummy, never a match.
        assert!(!p.verify(b"correct horse".to_vec(), None).await.unwrap());
        assert!(!p.verify(Vec::new(), None).await.unwrap());
        // Garbage in the table is an error, not a match.
        assert!(p.verify(b"x".to_vec(), Some("nope".into())).await.is_err());
    }

    #[tokio::test]
    async fn default_parameters_are_owasps() {
        let p = Params::default();
        assert_eq!((p.m_cost(), p.t_cost(), p.p_cost()), (19 * 1024, 2, 1));
    }

    #[tokio::test]
    async fn a_full_queue_is_busy_not_unbounded() {
        let mut p = cheap().await;
        p.queue_wait = Duration::from_millis(50);
        // Hold every slot.
        let held = p.slots.clone().acquire_many_owned(2).await.unwrap();
        let err = p.hash(b"password123".to_vec()).await.unwrap_err();
        assert!(matches!(err, PasswordError::Busy(_)), "{err}");
        drop(held);
    }
}
