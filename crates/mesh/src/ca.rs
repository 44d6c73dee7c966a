//! The per-system certificate authority: a root, an intermediate that signs
//! leaves, leaf issue, and root rotation with overlap.
//!
//! Everything lives in one directory the caller chooses (the runtime uses
//! `<data-dir>/ca`):
//!
//! ```text
//! ca/state                     which generations are trusted and which signs
//! ca/bundle.pem                the trust bundle: the roots of the trusted generations
//! ca/gen-<n>/root.key          ECDSA P-256, 0600
//! ca/gen-<n>/root.crt
//! ca/gen-<n>/intermediate.key  ECDSA P-256, 0600
//! ca/gen-<n>/intermediate.crt
//! ```
//!
//! The root only ever signs its intermediate, at creation; the intermediate
//! signs every leaf. Keeping the generations in their own directories and
//! flipping between them by rewriting one small `state` file (atomically)
//! makes every rotation step crash-safe: a step either happened or it did
//! not, there is no half-renamed mix of old and new files.
//!
//! Root rotation is three explicit steps because a new root must be trusted
//! everywhere before anything is signed with it (see `docs/security.md`):
//! [`Ca::begin_root_rotation`] (bundle = old + new, still signing with old),
//! [`Ca::commit_root_rotation`] (sign with new), [`Ca::finish_root_rotation`]
//! (bundle = new only, old keys deleted).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use time::OffsetDateTime;

use crate::identity::{IdentityError, SpiffeId, check_name};
use crate::tls::IdentityFiles;

/// A leaf's lifetime unless the manifest says otherwise.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// A root's lifetime. Long, because replacing it is a three-step procedure.
pub const DEFAULT_ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// An intermediate's lifetime (clamped to its root's).
pub const DEFAULT_INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(5 * 365 * 24 * 60 * 60);
/// How far `not_before` is set in the past, so that a peer whose clock is
/// up to this much behind ours still accepts a certificate issued just now.
pub const CLOCK_SKEW_TOLERANCE: Duration = Duration::from_secs(60);
/// The fraction of its life after which a leaf is renewed.
pub const RENEW_FRACTION: f64 = 0.7;

const STATE_FILE: &str = "state";
const BUNDLE_FILE: &str = "bundle.pem";
const STATE_FORMAT: &str = "1";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What can go wrong with the CA and the files it writes.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file or directory could not be read or written.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done (`read`, `write`, `create`, ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A CA file is damaged, missing or inconsistent with the others.
    #[error(
        "the CA file {} {problem}; restore the CA directory {} from a backup, or move it away to create a new CA on the next start (every instance then gets a new certificate and the old ones stop being trusted)",
        path.display(),
        dir.display()
    )]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// The CA directory.
        dir: PathBuf,
        /// What is wrong with it.
        problem: String,
        /// The parser's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// The directory holds another system's CA.
    #[error(
        "the CA in {} belongs to system `{found}`, not `{expected}`; give each system its own CA directory",
        dir.display()
    )]
    WrongSystem {
        /// The CA directory.
        dir: PathBuf,
        /// The system recorded in it.
        found: String,
        /// The system asked for.
        expected: String,
    },
    /// A system, environment or service name is not a valid identity name.
    #[error("cannot name the certificate's identity")]
    Identity {
        /// Why the name is invalid.
        #[source]
        source: IdentityError,
    },
    /// The requested validity is empty (e.g. a zero lifetime, or an issuer
    /// that expires before the leaf would start).
    #[error(
        "a certificate for `{service}` would be valid for no time at all (not before {not_before}s, not after {not_after}s, UNIX); ask for a positive lifetime, or rotate the root if the issuer has expired"
    )]
    EmptyValidity {
        /// The service the leaf was for.
        service: String,
        /// Start, UNIX seconds.
        not_before: u64,
        /// End, UNIX seconds (after clamping to the issuer).
        not_after: u64,
    },
    /// A time before 1970 or too far in the future to encode.
    #[error("time {what} cannot be written into a certificate")]
    BadTime {
        /// Which time.
        what: &'static str,
    },
    /// Key generation or signing failed.
    #[error("cannot generate or sign a certificate")]
    Generate {
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// A rotation step was called out of order.
    #[error(
        "cannot {step} the root rotation while it is {state}; the steps are begin, commit, finish, in that order"
    )]
    RotationOrder {
        /// The step attempted.
        step: &'static str,
        /// Where the rotation is.
        state: RotationState,
    },
}

/// How to create (or check, when opening) a CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaConfig {
    /// The system the CA belongs to; also the trust domain `<system>.flotilla`.
    pub system: String,
    /// The environment put into leaf identities.
    pub env: String,
    /// Lifetime of a new root.
    pub root_lifetime: Duration,
    /// Lifetime of a new intermediate (clamped to the root's).
    pub intermediate_lifetime: Duration,
}

impl CaConfig {
    /// Defaults for `system` in the default environment.
    pub fn new(system: &str) -> Self {
        CaConfig {
            system: system.to_string(),
            env: crate::identity::DEFAULT_ENV.to_string(),
            root_lifetime: DEFAULT_ROOT_LIFETIME,
            intermediate_lifetime: DEFAULT_INTERMEDIATE_LIFETIME,
        }
    }

    /// The same, for another environment.
    pub fn with_env(mut self, env: &str) -> Self {
        self.env = env.to_string();
        self
    }
}

/// Where a root rotation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationState {
    /// One root, trusted and signing.
    Idle,
    /// Two roots trusted, the old one still signs.
    Begun,
    /// Two roots trusted, the new one signs.
    Committed,
}

impl fmt::Display for RotationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RotationState::Idle => "idle (no rotation in progress)",
            RotationState::Begun => "begun",
            RotationState::Committed => "committed",
        })
    }
}

/// A freshly issued leaf: everything an instance needs, as PEM.
#[derive(Clone)]
pub struct Leaf {
    /// Whose certificate it is.
    pub id: SpiffeId,
    /// The leaf certificate alone.
    pub cert_pem: String,
    /// The leaf followed by its intermediate: what the instance presents,
    /// and what goes into `FLOTILLA_TLS_CERT`.
    pub chain_pem: String,
    /// The leaf's private key (PKCS#8); goes into `FLOTILLA_TLS_KEY`, 0600.
    pub key_pem: String,
    /// The trust bundle at issue time; goes into `FLOTILLA_TLS_CA`.
    pub bundle_pem: String,
    /// Start of validity, backdated by [`CLOCK_SKEW_TOLERANCE`].
    pub not_before: SystemTime,
    /// When it was issued (the start of its life for renewal).
    pub issued_at: SystemTime,
    /// End of validity; never after the issuer's.
    pub not_after: SystemTime,
}

impl fmt::Debug for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("Leaf")
            .field("id", &self.id.to_string())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Leaf {
    /// When to renew: [`renew_at`].
    pub fn renew_at(&self) -> SystemTime {
        renew_at(self)
    }

    /// Writes the leaf into an instance's files, each atomically (temporary
    /// file + rename, so a reader sees the old file or the new one, never a
    /// torn one): the bundle first, then the key (0600), then the chain.
    /// That order means a reader that sees the new chain also sees the
    /// bundle that trusts it; a reader that catches the new key with the
    /// old chain sees a mismatch and keeps its previous identity (see
    /// [`crate::tls::Identity::reload`]).
    pub fn write(&self, files: &IdentityFiles) -> Result<(), CaError> {
        for path in [&files.ca, &files.key, &files.cert] {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(|source| CaError::Io {
                    action: "create",
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
        }
        write_file(&files.ca, self.bundle_pem.as_bytes(), 0o644)?;
        write_file(&files.key, self.key_pem.as_bytes(), 0o600)?;
        write_file(&files.cert, self.chain_pem.as_bytes(), 0o644)
    }
}

/// When a leaf should be renewed: its issue time plus 70 % of its life
/// (issue to `not_after`). The clock-skew backdating is not counted as
/// life, so short test lifetimes renew when expected.
pub fn renew_at(leaf: &Leaf) -> SystemTime {
    let life = leaf
        .not_after
        .duration_since(leaf.issued_at)
        .unwrap_or(Duration::ZERO);
    leaf.issued_at + life.mul_f64(RENEW_FRACTION)
}

/// One root with its intermediate, loaded.
struct Generation {
    root_pem: String,
    intermediate_pem: String,
    issuer: Issuer<'static, KeyPair>,
    issuer_not_after: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    system: String,
    /// Ascending; one or two generations.
    trusted: Vec<u32>,
    signing: u32,
}

impl State {
    fn rotation(&self) -> RotationState {
        match self.trusted.as_slice() {
            [_] => RotationState::Idle,
            [_, new] if self.signing == *new => RotationState::Committed,
            _ => RotationState::Begun,
        }
    }

    fn render(&self) -> String {
        let trusted: Vec<String> = self.trusted.iter().map(u32::to_string).collect();
        format!(
            "# Flotilla CA state, written by flotilla-mesh; do not edit.\nformat = {STATE_FORMAT}\nsystem = {}\ntrusted = {}\nsigning = {}\n",
            self.system,
            trusted.join(" "),
            self.signing
        )
    }

    fn parse(text: &str) -> Result<State, String> {
        let mut fields = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| format!("has a line without `=`: `{line}`"))?;
            fields.insert(key.trim(), value.trim());
        }
        let field = |key: &str| {
            fields
                .get(key)
                .copied()
                .ok_or_else(|| format!("has no `{key}` line (it is truncated)"))
        };
        if field("format")? != STATE_FORMAT {
            return Err(format!("has an unknown format `{}`", field("format")?));
        }
        let system = field("system")?.to_string();
        check_name("system", &system).map_err(|e| e.to_string())?;
        let number = |s: &str| {
            s.parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("has `{s}` where a generation number belongs"))
        };
        let trusted = field("trusted")?
            .split_whitespace()
            .map(number)
            .collect::<Result<Vec<u32>, String>>()?;
        let signing = number(field("signing")?)?;
        let well_formed = match trusted.as_slice() {
            [one] => signing == *one,
            [old, new] => old < new && (signing == *old || signing == *new),
            _ => false,
        };
        if !well_formed {
            return Err("names an impossible set of generations".to_string());
        }
        Ok(State {
            system,
            trusted,
            signing,
        })
    }
}

/// The certificate authority of one system.
pub struct Ca {
    dir: PathBuf,
    config: CaConfig,
    state: State,
    generations: BTreeMap<u32, Generation>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .field("system", &self.config.system)
            .field("env", &self.config.env)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Opens the CA in `dir`, creating it (root, intermediate, state and
    /// bundle) when the directory holds none yet. Every file is checked:
    /// a damaged, truncated or mismatched one is an error that names it
    /// and says how to recover.
    pub fn open(dir: impl Into<PathBuf>, config: CaConfig) -> Result<Ca, CaError> {
        let dir = dir.into();
        check_name("system", &config.system).map_err(|source| CaError::Identity { source })?;
        check_name("env", &config.env).map_err(|source| CaError::Identity { source })?;
        let state_path = dir.join(STATE_FILE);
        let state = match fs::read_to_string(&state_path) {
            Ok(text) => State::parse(&text).map_err(|problem| CaError::Corrupt {
                path: state_path.clone(),
                dir: dir.clone(),
                problem,
                source: None,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if has_generations(&dir)? {
                    return Err(CaError::Corrupt {
                        path: state_path,
                        dir: dir.clone(),
                        problem: "is missing while key files are present".to_string(),
                        source: None,
                    });
                }
                create_dir_private(&dir)?;
                create_generation(&dir, 1, &config)?;
                let state = State {
                    system: config.system.clone(),
                    trusted: vec![1],
                    signing: 1,
                };
                write_file(&state_path, state.render().as_bytes(), 0o644)?;
                tracing::info!(dir = %dir.display(), system = %config.system, "created a new CA");
                state
            }
            Err(source) => {
                return Err(CaError::Io {
                    action: "read",
                    path: state_path,
                    source,
                });
            }
        };
        if state.system != config.system {
            return Err(CaError::WrongSystem {
                dir,
                found: state.system,
                expected: config.system,
            });
        }
        let mut generations = BTreeMap::new();
        for n in &state.trusted {
            generations.insert(*n, load_generation(&dir, *n)?);
        }
        let ca = Ca {
            dir,
            config,
            state,
            generations,
        };
        ca.write_own_bundle()?;
        Ok(ca)
    }

    /// The CA directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The system's name.
    pub fn system(&self) -> &str {
        &self.config.system
    }

    /// The environment leaves are issued in.
    pub fn env(&self) -> &str {
        &self.config.env
    }

    /// The identity a leaf for `service` carries.
    pub fn id_for(&self, service: &str) -> Result<SpiffeId, CaError> {
        SpiffeId::new(&self.config.system, &self.config.env, service)
            .map_err(|source| CaError::Identity { source })
    }

    /// Where a root rotation is.
    pub fn rotation(&self) -> RotationState {
        self.state.rotation()
    }

    /// The trust bundle: the roots of every trusted generation, oldest
    /// first. This is what goes into every instance's `FLOTILLA_TLS_CA`.
    pub fn trust_bundle_pem(&self) -> String {
        self.generations
            .values()
            .map(|g| g.root_pem.as_str())
            .collect()
    }

    /// Path of the bundle file the CA keeps in its directory.
    pub fn bundle_path(&self) -> PathBuf {
        self.dir.join(BUNDLE_FILE)
    }

    /// Writes the current trust bundle into an instance's CA file
    /// (atomically), leaving its certificate and key alone: how a new root
    /// is distributed during rotation.
    pub fn write_bundle(&self, files: &IdentityFiles) -> Result<(), CaError> {
        write_file(&files.ca, self.trust_bundle_pem().as_bytes(), 0o644)
    }

    /// When the signing intermediate expires; no leaf outlives it.
    pub fn issuer_not_after(&self) -> SystemTime {
        self.signing()
            .map_or(UNIX_EPOCH, |generation| generation.issuer_not_after)
    }

    /// Issues a leaf for `service` valid from now (backdated by
    /// [`CLOCK_SKEW_TOLERANCE`]) for `lifetime`, clamped to the issuer's
    /// own validity. A fresh P-256 key is generated for every leaf.
    pub fn issue_leaf(&self, service: &str, lifetime: Duration) -> Result<Leaf, CaError> {
        let now = SystemTime::now();
        let not_before = now.checked_sub(CLOCK_SKEW_TOLERANCE).unwrap_or(now);
        self.issue(service, not_before, now, now + lifetime)
    }

    /// Issues a leaf with an explicit validity window, still clamped to the
    /// issuer. For tests and tools: an expired certificate, one not valid
    /// yet (to show how clock skew is refused).
    pub fn issue_leaf_with_validity(
        &self,
        service: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Leaf, CaError> {
        self.issue(service, not_before, not_before, not_after)
    }

    fn issue(
        &self,
        service: &str,
        not_before: SystemTime,
        issued_at: SystemTime,
        not_after: SystemTime,
    ) -> Result<Leaf, CaError> {
        let id = self.id_for(service)?;
        let generation = self.signing()?;
        let not_after = not_after.min(generation.issuer_not_after);
        let nb = unix_seconds(not_before, "not_before")?;
        let na = unix_seconds(not_after, "not_after")?;
        if na <= nb {
            return Err(CaError::EmptyValidity {
                service: service.to_string(),
                not_before: nb,
                not_after: na,
            });
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|source| CaError::Generate { source })?;
        let mut params = CertificateParams::default();
        params.not_before = odt(nb, "not_before")?;
        params.not_after = odt(na, "not_after")?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::OrganizationName,
            format!("flotilla {}", id.system()),
        );
        dn.push(DnType::CommonName, service);
        params.distinguished_name = dn;
        let uri = id
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Generate { source: e })?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Every instance is both a server (to its callers) and a client
        // (to its dependencies) with the same certificate.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &generation.issuer)
            .map_err(|source| CaError::Generate { source })?;
        let cert_pem = cert.pem();
        Ok(Leaf {
            chain_pem: format!("{cert_pem}{}", generation.intermediate_pem),
            cert_pem,
            key_pem: key.serialize_pem(),
            bundle_pem: self.trust_bundle_pem(),
            id,
            not_before: UNIX_EPOCH + Duration::from_secs(nb),
            issued_at,
            not_after: UNIX_EPOCH + Duration::from_secs(na),
        })
    }

    /// Step 1 of a root rotation: creates a new root and intermediate and
    /// adds the new root to the trust bundle. Leaves are still signed by
    /// the old intermediate. Distribute the new bundle to every instance
    /// ([`Ca::write_bundle`]) before committing.
    pub fn begin_root_rotation(&mut self) -> Result<(), CaError> {
        let state = self.rotation();
        if state != RotationState::Idle {
            return Err(CaError::RotationOrder {
                step: "begin",
                state,
            });
        }
        let old = self.state.signing;
        let new = old + 1;
        let generation = create_generation(&self.dir, new, &self.config)?;
        let next = State {
            system: self.config.system.clone(),
            trusted: vec![old, new],
            signing: old,
        };
        self.save_state(next)?;
        self.generations.insert(new, generation);
        self.write_own_bundle()?;
        tracing::info!(dir = %self.dir.display(), generation = new, "root rotation begun: new root trusted, not yet signing");
        Ok(())
    }

    /// Step 2: leaves are signed by the new intermediate from now on. Both
    /// roots stay trusted, so old and new leaves interoperate. Re-issue
    /// every leaf before finishing.
    pub fn commit_root_rotation(&mut self) -> Result<(), CaError> {
        let state = self.rotation();
        let RotationState::Begun = state else {
            return Err(CaError::RotationOrder {
                step: "commit",
                state,
            });
        };
        let new = self.state.trusted[1];
        let next = State {
            signing: new,
            ..self.state.clone()
        };
        self.save_state(next)?;
        tracing::info!(dir = %self.dir.display(), generation = new, "root rotation committed: signing with the new root");
        Ok(())
    }

    /// Step 3: drops the old root from the bundle and deletes its keys.
    /// Only call this once every leaf has been re-issued by the new
    /// intermediate (at the latest one leaf lifetime after the commit);
    /// a leaf still signed by the old root stops being trusted now.
    pub fn finish_root_rotation(&mut self) -> Result<(), CaError> {
        let state = self.rotation();
        let RotationState::Committed = state else {
            return Err(CaError::RotationOrder {
                step: "finish",
                state,
            });
        };
        let old = self.state.trusted[0];
        let new = self.state.trusted[1];
        let next = State {
            system: self.config.system.clone(),
            trusted: vec![new],
            signing: new,
        };
        self.save_state(next)?;
        self.generations.remove(&old);
        self.write_own_bundle()?;
        let old_dir = generation_dir(&self.dir, old);
        if let Err(error) = fs::remove_dir_all(&old_dir) {
            // The state no longer refers to it; a leftover directory is
            // harmless and removed by the next rotation.
            tracing::warn!(dir = %old_dir.display(), %error, "could not delete the retired root's files");
        }
        tracing::info!(dir = %self.dir.display(), generation = new, "root rotation finished: old root retired");
        Ok(())
    }

    fn signing(&self) -> Result<&Generation, CaError> {
        // `open` loads every trusted generation and `signing` is always one
        // of them (checked by `State::parse`, kept by the steps); this is
        // an error rather than a panic all the same.
        self.generations
            .get(&self.state.signing)
            .ok_or_else(|| CaError::Corrupt {
                path: self.dir.join(STATE_FILE),
                dir: self.dir.clone(),
                problem: "names a signing generation that is not loaded".to_string(),
                source: None,
            })
    }

    fn save_state(&mut self, next: State) -> Result<(), CaError> {
        write_file(&self.dir.join(STATE_FILE), next.render().as_bytes(), 0o644)?;
        self.state = next;
        Ok(())
    }

    fn write_own_bundle(&self) -> Result<(), CaError> {
        let path = self.bundle_path();
        let bundle = self.trust_bundle_pem();
        if fs::read_to_string(&path).ok().as_deref() == Some(bundle.as_str()) {
            return Ok(());
        }
        write_file(&path, bundle.as_bytes(), 0o644)
    }
}

fn generation_dir(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("gen-{n}"))
}

fn has_generations(dir: &Path) -> Result<bool, CaError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(CaError::Io {
                action: "list",
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    Ok(entries
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with("gen-")))
}

fn create_generation(dir: &Path, n: u32, config: &CaConfig) -> Result<Generation, CaError> {
    let gdir = generation_dir(dir, n);
    // Not referenced by the state (callers only create the next number):
    // a leftover from an interrupted `begin` is safe to replace.
    if gdir.exists() {
        fs::remove_dir_all(&gdir).map_err(|source| CaError::Io {
            action: "remove",
            path: gdir.clone(),
            source,
        })?;
    }
    create_dir_private(&gdir)?;
    let now = SystemTime::now();
    let start = unix_seconds(now, "now")?.saturating_sub(CLOCK_SKEW_TOLERANCE.as_secs());
    let root_end = unix_seconds(now + config.root_lifetime, "root not_after")?;
    let int_end =
        unix_seconds(now + config.intermediate_lifetime, "intermediate not_after")?.min(root_end);

    let generate = |source| CaError::Generate { source };
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
    let mut root = CertificateParams::default();
    root.distinguished_name = ca_name(&config.system, "root", n, &root, &root_key);
    root.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    root.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    root.not_before = odt(start, "not_before")?;
    root.not_after = odt(root_end, "root not_after")?;
    let root_cert = root.self_signed(&root_key).map_err(generate)?;
    let root_key_pem = root_key.serialize_pem();
    let root_issuer = Issuer::new(root, root_key);

    let int_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
    let mut int = CertificateParams::default();
    int.distinguished_name = ca_name(&config.system, "intermediate", n, &int, &int_key);
    int.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    int.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    int.use_authority_key_identifier_extension = true;
    int.not_before = odt(start, "not_before")?;
    int.not_after = odt(int_end, "intermediate not_after")?;
    let int_cert = int.signed_by(&int_key, &root_issuer).map_err(generate)?;

    write_file(&gdir.join("root.key"), root_key_pem.as_bytes(), 0o600)?;
    write_file(&gdir.join("root.crt"), root_cert.pem().as_bytes(), 0o644)?;
    write_file(
        &gdir.join("intermediate.key"),
        int_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(
        &gdir.join("intermediate.crt"),
        int_cert.pem().as_bytes(),
        0o644,
    )?;
    // Load back what was written, so a fresh CA goes through the same
    // checks as one opened from disk.
    load_generation(dir, n)
}

/// A CA's name carries a short fingerprint of its key, so that two CAs of
/// the same system (a re-created one, an impostor) never share a subject:
/// a peer then reports the clear "unknown issuer" rather than a signature
/// mismatch, and an operator can tell them apart.
fn ca_name(
    system: &str,
    role: &str,
    n: u32,
    params: &CertificateParams,
    key: &KeyPair,
) -> DistinguishedName {
    let id: String = params
        .key_identifier(key)
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, format!("flotilla {system}"));
    dn.push(
        DnType::CommonName,
        format!("Flotilla {role} CA, system {system}, generation {n}, key {id}"),
    );
    dn
}

/// A certificate and its key, read and checked against each other.
struct KeyedCert {
    pem: String,
    der: CertificateDer<'static>,
    key: KeyPair,
}

fn load_generation(dir: &Path, n: u32) -> Result<Generation, CaError> {
    let gdir = generation_dir(dir, n);
    let root = load_keyed_cert(dir, &gdir, "root")?;
    let int = load_keyed_cert(dir, &gdir, "intermediate")?;
    let int_path = gdir.join("intermediate.crt");
    let root_path = gdir.join("root.crt");
    let corrupt = |path: &Path, problem: String, source: Option<BoxError>| CaError::Corrupt {
        path: path.to_path_buf(),
        dir: dir.to_path_buf(),
        problem,
        source,
    };

    let (_, root_x509) = x509_parser::parse_x509_certificate(&root.der).map_err(|e| {
        corrupt(
            &root_path,
            "is not a valid certificate".into(),
            Some(e.into()),
        )
    })?;
    let (_, int_x509) = x509_parser::parse_x509_certificate(&int.der).map_err(|e| {
        corrupt(
            &int_path,
            "is not a valid certificate".into(),
            Some(e.into()),
        )
    })?;
    if !root_x509.is_ca() {
        return Err(corrupt(&root_path, "is not a CA certificate".into(), None));
    }
    if !int_x509.is_ca() {
        return Err(corrupt(&int_path, "is not a CA certificate".into(), None));
    }
    int_x509
        .verify_signature(Some(root_x509.public_key()))
        .map_err(|e| {
            corrupt(
                &int_path,
                format!("is not signed by {}", root_path.display()),
                Some(e.into()),
            )
        })?;
    let int_end = int_x509.validity().not_after.timestamp();
    let issuer_not_after = u64::try_from(int_end)
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
        .map_err(|_| corrupt(&int_path, "has an impossible expiry date".into(), None))?;
    let issuer = Issuer::from_ca_cert_der(&int.der, int.key).map_err(|e| {
        corrupt(
            &int_path,
            "cannot be used as an issuer".into(),
            Some(e.into()),
        )
    })?;
    Ok(Generation {
        root_pem: root.pem,
        intermediate_pem: int.pem,
        issuer,
        issuer_not_after,
    })
}

fn load_keyed_cert(dir: &Path, gdir: &Path, name: &str) -> Result<KeyedCert, CaError> {
    let cert_path = gdir.join(format!("{name}.crt"));
    let key_path = gdir.join(format!("{name}.key"));
    let corrupt = |path: &Path, problem: String, source: Option<BoxError>| CaError::Corrupt {
        path: path.to_path_buf(),
        dir: dir.to_path_buf(),
        problem,
        source,
    };
    let pem = read_ca_file(dir, &cert_path)?;
    let key_pem = read_ca_file(dir, &key_path)?;
    let mut certs = CertificateDer::pem_slice_iter(pem.as_bytes());
    let der = match (certs.next(), certs.next()) {
        (Some(Ok(der)), None) => der,
        (None, _) => {
            return Err(corrupt(
                &cert_path,
                "holds no PEM certificate (it is empty or truncated)".into(),
                None,
            ));
        }
        (Some(Err(e)), _) => {
            return Err(corrupt(
                &cert_path,
                "is not a valid PEM certificate (it is damaged or truncated)".into(),
                Some(e.into()),
            ));
        }
        (Some(Ok(_)), Some(_)) => {
            return Err(corrupt(
                &cert_path,
                "holds more than one certificate".into(),
                None,
            ));
        }
    };
    let key = KeyPair::from_pem(&key_pem).map_err(|e| {
        corrupt(
            &key_path,
            "is not a valid PEM private key (it is damaged or truncated)".into(),
            Some(e.into()),
        )
    })?;
    let (_, x509) = x509_parser::parse_x509_certificate(&der).map_err(|e| {
        corrupt(
            &cert_path,
            "is not a valid certificate (it is damaged or truncated)".into(),
            Some(e.into()),
        )
    })?;
    if x509.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(corrupt(
            &key_path,
            format!("is not the key of {}", cert_path.display()),
            None,
        ));
    }
    Ok(KeyedCert { pem, der, key })
}

fn read_ca_file(dir: &Path, path: &Path) -> Result<String, CaError> {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|e| CaError::Corrupt {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            problem: "is not text (PEM)".to_string(),
            source: Some(e.into()),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(CaError::Corrupt {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            problem: "is missing".to_string(),
            source: None,
        }),
        Err(source) => Err(CaError::Io {
            action: "read",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn create_dir_private(dir: &Path) -> Result<(), CaError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| CaError::Io {
        action: "create",
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes `contents` to `path` atomically: a temporary file in the same
/// directory, created with `mode`, flushed to disk, then renamed over the
/// target. Readers see either the old file or the new one.
pub(crate) fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let io_err = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| CaError::Io {
            action,
            path,
            source,
        }
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let result = (|| {
        let mut file = options.open(&tmp).map_err(io_err("create", &tmp))?;
        file.write_all(contents).map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("write", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("replace", path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn unix_seconds(t: SystemTime, what: &'static str) -> Result<u64, CaError> {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| CaError::BadTime { what })
}

fn odt(secs: u64, what: &'static str) -> Result<OffsetDateTime, CaError> {
    i64::try_from(secs)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .ok_or(CaError::BadTime { what })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Ca {
        Ca::open(dir.join("ca"), CaConfig::new("shop")).unwrap()
    }

    #[test]
    fn creates_then_loads_the_same_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = open(tmp.path());
        let bundle = ca.trust_bundle_pem();
        let again = open(tmp.path());
        assert_eq!(again.trust_bundle_pem(), bundle);
        assert_eq!(
            fs::read_to_string(tmp.path().join("ca/bundle.pem")).unwrap(),
            bundle
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in ["root.key", "intermediate.key"] {
                let mode = fs::metadata(tmp.path().join("ca/gen-1").join(f))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{f}");
            }
        }
    }

    #[test]
    fn leaf_carries_its_spiffe_id_and_lifetime() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = open(tmp.path());
        let leaf = ca.issue_leaf("catalog", DEFAULT_LEAF_LIFETIME).unwrap();
        let der = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap();
        let id = SpiffeId::from_cert_der(&der).unwrap();
        assert_eq!(
            id.to_string(),
            "spiffe://shop.flotilla/ns/local/svc/catalog"
        );
        assert_eq!(id, leaf.id);
        let life = leaf.not_after.duration_since(leaf.issued_at).unwrap();
        assert!(
            life <= DEFAULT_LEAF_LIFETIME && life > DEFAULT_LEAF_LIFETIME - Duration::from_secs(2)
        );
        let skew = leaf.issued_at.duration_since(leaf.not_before).unwrap();
        assert!(
            skew >= CLOCK_SKEW_TOLERANCE && skew < CLOCK_SKEW_TOLERANCE + Duration::from_secs(1)
        );
        let renew = leaf.renew_at().duration_since(leaf.issued_at).unwrap();
        let expected = life.mul_f64(0.7);
        assert!(renew.abs_diff(expected) < Duration::from_millis(10));
        assert_eq!(
            CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes()).count(),
            2
        );
    }

    #[test]
    fn leaf_files_are_replaced_whole_with_a_private_key() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = open(tmp.path());
        let files = IdentityFiles::in_dir(&tmp.path().join("instances/catalog-1"));
        let first = ca.issue_leaf("catalog", DEFAULT_LEAF_LIFETIME).unwrap();
        first.write(&files).unwrap();
        let second = ca.issue_leaf("catalog", DEFAULT_LEAF_LIFETIME).unwrap();
        second.write(&files).unwrap();
        assert_eq!(fs::read_to_string(&files.cert).unwrap(), second.chain_pem);
        assert_eq!(fs::read_to_string(&files.key).unwrap(), second.key_pem);
        assert_eq!(
            fs::read_to_string(&files.ca).unwrap(),
            ca.trust_bundle_pem()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&files.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(files.cert.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(!format!("{first:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn a_leaf_never_outlives_its_issuer() {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = CaConfig::new("shop");
        config.intermediate_lifetime = Duration::from_secs(3600);
        let ca = Ca::open(tmp.path().join("ca"), config).unwrap();
        let leaf = ca
            .issue_leaf("catalog", Duration::from_secs(100 * 24 * 3600))
            .unwrap();
        assert!(leaf.not_after <= ca.issuer_not_after());
        assert!(leaf.not_after > SystemTime::now() + Duration::from_secs(3500));
    }

    #[test]
    fn empty_validity_and_bad_names_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = open(tmp.path());
        let now = SystemTime::now();
        assert!(matches!(
            ca.issue_leaf_with_validity("catalog", now, now),
            Err(CaError::EmptyValidity { .. })
        ));
        assert!(matches!(
            ca.issue_leaf("Catalog", DEFAULT_LEAF_LIFETIME),
            Err(CaError::Identity { .. })
        ));
        assert!(matches!(
            Ca::open(tmp.path().join("x"), CaConfig::new("Shop")),
            Err(CaError::Identity { .. })
        ));
    }

    #[test]
    fn another_system_cannot_open_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        open(tmp.path());
        let err = Ca::open(tmp.path().join("ca"), CaConfig::new("bank")).unwrap_err();
        assert!(matches!(err, CaError::WrongSystem { .. }), "{err}");
    }

    #[test]
    fn rotation_steps_must_come_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let mut ca = open(tmp.path());
        assert!(matches!(
            ca.commit_root_rotation(),
            Err(CaError::RotationOrder { .. })
        ));
        assert!(matches!(
            ca.finish_root_rotation(),
            Err(CaError::RotationOrder { .. })
        ));
        ca.begin_root_rotation().unwrap();
        assert_eq!(ca.rotation(), RotationState::Begun);
        assert!(ca.begin_root_rotation().is_err());
        assert!(ca.finish_root_rotation().is_err());
        // The state survives a restart at every step.
        let ca2 = open(tmp.path());
        assert_eq!(ca2.rotation(), RotationState::Begun);
        ca.commit_root_rotation().unwrap();
        assert_eq!(open(tmp.path()).rotation(), RotationState::Committed);
        ca.finish_root_rotation().unwrap();
        let ca3 = open(tmp.path());
        assert_eq!(ca3.rotation(), RotationState::Idle);
        assert!(!tmp.path().join("ca/gen-1").exists());
        assert_eq!(ca3.trust_bundle_pem(), ca.trust_bundle_pem());
    }

    #[test]
    fn state_file_parsing_is_strict() {
        for bad in [
            "",
            "format = 1\nsystem = shop\ntrusted = 1\n",
            "format = 2\nsystem = shop\ntrusted = 1\nsigning = 1\n",
            "format = 1\nsystem = shop\ntrusted = 1\nsigning = 2\n",
            "format = 1\nsystem = shop\ntrusted = 2 1\nsigning = 2\n",
            "format = 1\nsystem = shop\ntrusted = 1 2 3\nsigning = 2\n",
            "format = 1\nsystem = shop\ntrusted = x\nsigning = 1\n",
            "format = 1\nsystem = shop\ntrusted = 0\nsigning = 0\n",
            "garbage",
        ] {
            assert!(State::parse(bad).is_err(), "{bad:?}");
        }
        let ok = State {
            system: "shop".into(),
            trusted: vec![3, 4],
            signing: 3,
        };
        assert_eq!(State::parse(&ok.render()).unwrap(), ok);
    }
}
