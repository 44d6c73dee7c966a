//! Client certificates at the edge (`TlsConfig::client_ca`): the CAs they
//! are verified against, renewed on disk as the gateway's own certificates
//! are, and what instances are told of a verified one.
//!
//! With a client CA the gateway asks every client for a certificate
//! (`CertificateRequest`) and rustls's WebPKI verifier checks any it gets:
//! the chain to one of the CAs, validity and the client-auth key usage. A
//! client without one still connects unless `client_auth` is `required`;
//! routes with `client_cert = true` then refuse its requests (403
//! `client_certificate_required`), so one gateway can serve partners with
//! certificates beside browsers without.
//!
//! With `client_crl`, certificates those CAs revoked are refused too: the
//! CRLs are checked for the client's own certificate (the one a CA
//! revokes a partner by), and a certificate of a CA with no CRL in the
//! file is not refused for want of one; a CRL whose issuer is not among
//! the CAs is an error, as it would revoke nothing.
//!
//! A client that resumes a TLS session is not asked for its certificate
//! again: the session carries the one verified when it was made. So a
//! renewed CA file also ends every session made before it (`Sessions`):
//! a CA taken out must not keep letting its clients in until they drop
//! out of the cache.
//!
//! Instances learn who the client is from `X-Forwarded-Client-Cert`, in
//! Envoy's format (`Hash=…;Subject="…";URI=…;DNS=…`), the header Envoy,
//! Istio and Linkerd users already parse. Like `x-flotilla-user-*`, only the
//! gateway may set it: a copy a client sends is removed on every route.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use flotilla_mesh::tls::FileStamp;
use http::HeaderValue;
use http::header::HeaderName;
use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::server::{
    ServerSessionMemoryCache, StoresServerSessions, WebPkiClientVerifier,
};
use tokio_rustls::rustls::{
    self, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};

use crate::tls::TlsError;

/// `X-Forwarded-Client-Cert`.
pub(crate) static XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// The CAs client certificates are verified against, as last loaded.
#[derive(Debug)]
pub(crate) struct ClientCas {
    file: PathBuf,
    crl: Option<PathBuf>,
    required: bool,
    provider: Arc<CryptoProvider>,
    current: RwLock<(Stamps, Arc<dyn ClientCertVerifier>)>,
    /// Counts the CA files taken; a session is resumed only in the one it
    /// was made in.
    generation: AtomicU64,
    /// When the files were last taken again, if ever.
    changed: Mutex<Option<Instant>>,
}

/// How long after the CA or CRL files change no session is kept for
/// resumption: the longest a handshake may take (`header_timeout`'s
/// ceiling). A handshake that checked a certificate with the files before
/// the change may store its session after it, under the new generation;
/// resumed, that session would skip the check for good (a revoked client
/// kept in, found by the CRL test failing one run in six). Its clients
/// make full handshakes meanwhile, checked with the new files.
const NO_SESSIONS_AFTER_A_CHANGE: Duration = Duration::from_secs(5 * 60);

impl ClientCas {
    /// Loads `file` now: a gateway that cannot verify clients does not start.
    pub(crate) fn new(
        file: &Path,
        crl: Option<&Path>,
        required: bool,
        provider: Arc<CryptoProvider>,
    ) -> Result<ClientCas, TlsError> {
        let loaded = load(file, crl, required, &provider)?;
        Ok(ClientCas {
            file: file.to_path_buf(),
            crl: crl.map(Path::to_path_buf),
            required,
            provider,
            current: RwLock::new(loaded),
            generation: AtomicU64::new(0),
            changed: Mutex::new(None),
        })
    }

    /// Whether sessions stored now could have been verified with files
    /// taken over since.
    fn changed_lately(&self) -> bool {
        self.changed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_some_and(|at| at.elapsed() < NO_SESSIONS_AFTER_A_CHANGE)
    }

    fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        let current = self
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Arc::clone(&current.1)
    }

    /// Takes the files again if either changed; `Ok(true)` when they did.
    pub(crate) fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let seen = stamps(&self.file, self.crl.as_deref());
        {
            let current = self
                .current
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if seen == current.0 {
                return Ok(false);
            }
        }
        let loaded = load(
            &self.file,
            self.crl.as_deref(),
            self.required,
            &self.provider,
        )?;
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = loaded;
        *self
            .changed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Instant::now());
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(true)
    }

    pub(crate) fn file(&self) -> &Path {
        &self.file
    }
}

/// What the CA file and the CRL file looked like.
type Stamps = (FileStamp, Option<FileStamp>);

fn stamps(file: &Path, crl: Option<&Path>) -> Stamps {
    (FileStamp::of(file), crl.map(FileStamp::of))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn load(
    file: &Path,
    crl: Option<&Path>,
    required: bool,
    provider: &Arc<CryptoProvider>,
) -> Result<(Stamps, Arc<dyn ClientCertVerifier>), TlsError> {
    let stamps = stamps(file, crl);
    let pem = read(file)?;
    let bad = |path: &Path, reason: String| TlsError::ClientCa {
        path: path.to_path_buf(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    // Each CA's subject, as DER: a CRL must be issued by one of them.
    let mut subjects: Vec<Vec<u8>> = Vec::new();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(file, e.to_string()))?;
        if let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) {
            subjects.push(parsed.subject().as_raw().to_vec());
        }
        roots.add(cert).map_err(|e| bad(file, e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCertificate {
            path: file.to_path_buf(),
        });
    }
    let mut crls: Vec<CertificateRevocationListDer<'static>> = Vec::new();
    if let Some(crl_file) = crl {
        let pem = read(crl_file)?;
        for crl in CertificateRevocationListDer::pem_slice_iter(&pem) {
            let crl = crl.map_err(|e| bad(crl_file, e.to_string()))?;
            let (_, parsed) = x509_parser::parse_x509_crl(crl.as_ref())
                .map_err(|e| bad(crl_file, e.to_string()))?;
            if !subjects.iter().any(|s| s == parsed.issuer().as_raw()) {
                return Err(bad(
                    crl_file,
                    format!(
                        "a CRL is issued by `{}`, which is not one of the client CAs: it would revoke nothing",
                        parsed.issuer()
                    ),
                ));
            }
            crls.push(crl);
        }
        if crls.is_empty() {
            return Err(bad(
                crl_file,
                "it holds no PEM CRL (`-----BEGIN X509 CRL-----`)".into(),
            ));
        }
    }
    let builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    let builder = if required {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    let verifier = builder.build().map_err(|e| bad(file, e.to_string()))?;
    Ok((stamps, verifier))
}

/// Delegates to the verifier of the CAs last loaded, so that a renewed CA
/// file applies to the next handshake.
impl ClientCertVerifier for ClientCas {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.required
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The CAs can change under a borrow; without hints a client sends
        // the certificate it has, which is what API clients do anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.verifier().supported_verify_schemes()
    }
}

/// rustls's session cache (resumption by session id and by TLS 1.3
/// ticket), keyed also by the CA generation, so that sessions made under
/// CAs since renewed are never resumed.
#[derive(Debug)]
pub(crate) struct Sessions {
    inner: Arc<ServerSessionMemoryCache>,
    cas: Arc<ClientCas>,
}

impl Sessions {
    /// As many sessions as rustls keeps by default.
    pub(crate) fn new(cas: Arc<ClientCas>) -> Sessions {
        Sessions {
            inner: ServerSessionMemoryCache::new(256),
            cas,
        }
    }

    fn key(&self, key: &[u8]) -> Vec<u8> {
        let generation = self.cas.generation.load(Ordering::Acquire);
        let mut keyed = Vec::with_capacity(8 + key.len());
        keyed.extend_from_slice(&generation.to_be_bytes());
        keyed.extend_from_slice(key);
        keyed
    }
}

impl StoresServerSessions for Sessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        if self.cas.changed_lately() {
            return false;
        }
        self.inner.put(self.key(&key), value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.get(&self.key(key))
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.take(&self.key(key))
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// `Hash=` and 64 hex digits.
const HASH_FIELD_LEN: usize = 5 + 64;

/// A client certificate the handshake verified, as instances are told of
/// it. Made once per connection.
#[derive(Debug)]
pub(crate) struct ClientCert {
    pub xfcc: HeaderValue,
    /// Its validity (Unix seconds, `notBefore` and `notAfter`), when it
    /// could be read here.
    validity: Option<(i64, i64)>,
}

impl ClientCert {
    /// `leaf` is the client's own certificate, already verified.
    pub(crate) fn new(leaf: &CertificateDer<'_>) -> ClientCert {
        let hash = ring::digest::digest(&ring::digest::SHA256, leaf.as_ref());
        let mut xfcc = format!("Hash={}", hex::encode(hash));
        let mut validity = None;
        // It parsed for the verifier; should it not here, the hash alone
        // still names it.
        if let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) {
            let v = cert.validity();
            validity = Some((v.not_before.timestamp(), v.not_after.timestamp()));
            xfcc.push_str(";Subject=");
            quoted(&mut xfcc, &rfc4514(cert.subject()));
            if let Ok(Some(san)) = cert.subject_alternative_name() {
                use x509_parser::extensions::GeneralName;
                for name in &san.value.general_names {
                    let (key, value) = match name {
                        GeneralName::URI(uri) => ("URI", *uri),
                        GeneralName::DNSName(dns) => ("DNS", *dns),
                        _ => continue,
                    };
                    xfcc.push(';');
                    xfcc.push_str(key);
                    xfcc.push('=');
                    value_of(&mut xfcc, value);
                }
            }
        }
        // `printable` leaves nothing a header value refuses; were there
        // something, the hash (ASCII) alone would still name the client.
        let xfcc = HeaderValue::from_str(&xfcc)
            .or_else(|_| HeaderValue::from_str(&xfcc[..HASH_FIELD_LEN]))
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        ClientCert { xfcc, validity }
    }

    /// Whether it is within its validity at `now` (Unix seconds). The
    /// verifier checked that in a full handshake; a resumed one copies the
    /// certificate from the session without checking it again (rustls),
    /// and each resumption hands out new tickets, so without this a
    /// short-lived certificate would open connections long after it
    /// expired. One it could not read is taken as the verifier took it.
    pub(crate) fn in_date(&self, now: i64) -> bool {
        self.validity
            .is_none_or(|(not_before, not_after)| not_before <= now && now <= not_after)
    }
}

/// A distinguished name as RFC 4514 writes it, as Envoy's `Subject` is:
/// the last RDN first, `,` between RDNs and `+` within one, short names
/// (`CN`, `O`) where the OID has one, and a value that is not a string as
/// `#` and its hex.
fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let rdns: Vec<String> = name
        .iter_rdn()
        .map(|rdn| {
            let attrs: Vec<String> = rdn
                .iter()
                .map(|attr| {
                    let key = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                        .map(str::to_owned)
                        .unwrap_or_else(|_| attr.attr_type().to_id_string());
                    let value = match attr.as_str() {
                        Ok(text) => escape_dn_value(text),
                        Err(_) => format!("#{}", hex::encode(attr.as_slice())),
                    };
                    format!("{key}={value}")
                })
                .collect();
            attrs.join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

/// RFC 4514 §2.4: `"+,;<>\` anywhere, `#` or a space first, a space last.
fn escape_dn_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, '"' | '+' | ',' | ';' | '<' | '>' | '\\')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Envoy quotes a value that holds `,`, `;` or `=` (and the subject always),
/// escaping `"` and `\` inside.
fn value_of(out: &mut String, value: &str) {
    if value.contains([',', ';', '=', '"', ' ']) {
        quoted(out, value);
    } else {
        out.push_str(&printable(value));
    }
}

fn quoted(out: &mut String, value: &str) {
    out.push('"');
    for c in printable(value).chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// A header value cannot carry control characters; a CA could sign a name
/// with one.
fn printable(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_written_as_rfc_4514_writes_them() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Acme, Inc.");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, " billing+eu");
        let cert = params.self_signed(&key).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
        assert_eq!(
            rfc4514(parsed.subject()),
            "CN=\\ billing\\+eu,O=Acme\\, Inc."
        );
        let xfcc = ClientCert::new(cert.der()).xfcc;
        let xfcc = xfcc.to_str().unwrap();
        assert!(
            xfcc.ends_with(";Subject=\"CN=\\\\ billing\\\\+eu,O=Acme\\\\, Inc.\""),
            "{xfcc}"
        );
    }

    #[test]
    fn no_session_is_kept_for_resumption_just_after_the_cas_change() {
        let dir = tempfile::tempdir().unwrap();
        let ca = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.self_signed(&key).unwrap().pem()
        };
        // Written as a renewal is: a new file renamed over the old one.
        let write = |pem: String| {
            let tmp = dir.path().join("ca.pem.tmp");
            std::fs::write(&tmp, pem).unwrap();
            std::fs::rename(&tmp, dir.path().join("ca.pem")).unwrap();
        };
        write(ca("first"));
        let file = dir.path().join("ca.pem");
        let cas = Arc::new(
            ClientCas::new(&file, None, true, flotilla_mesh::tls::crypto_provider()).unwrap(),
        );
        let sessions = Sessions::new(Arc::clone(&cas));
        assert!(sessions.put(b"a".to_vec(), b"made under the first CA".to_vec()));
        assert!(sessions.get(b"a").is_some());

        write(ca("second"));
        assert!(cas.reload_if_changed().unwrap());
        // A session made under the first CA is not resumed; one stored now
        // may have been verified with it, by a handshake under way as the
        // file changed, and is not kept.
        assert!(sessions.get(b"a").is_none());
        assert!(!sessions.put(b"b".to_vec(), b"maybe the first CA's".to_vec()));
        assert!(sessions.get(b"b").is_none());
    }

    #[test]
    fn values_are_quoted_as_envoy_quotes_them() {
        let mut out = String::new();
        value_of(&mut out, "spiffe://partner.example/ns/a");
        assert_eq!(out, "spiffe://partner.example/ns/a");
        let mut out = String::new();
        value_of(&mut out, "a;b=\"c\"");
        assert_eq!(out, "\"a;b=\\\"c\\\"\"");
        let mut out = String::new();
        quoted(&mut out, "CN=x\u{7}\\");
        assert_eq!(out, "\"CN=x?\\\\\"");
    }
}
