//! Several certificates at one HTTPS gateway (`TlsConfig::certificates`):
//! which one a client is served for the name it asks for (SNI), exact
//! names, wildcards and no name at all; which one of two for the same
//! name, by the signature schemes the client can verify; each renewed on
//! its own; and a further certificate that names nothing refused at start.
//!
//! The client here accepts any certificate and reports which one it was
//! served: what is served is the question, not whether a client trusts it
//! (the tests in `tls.rs` verify against the test's own roots).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flotilla_gateway::{Config, Gateway, TlsCertificate, TlsConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{
    CryptoProvider, verify_tls12_signature, verify_tls13_signature,
};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{self, ClientConfig, DigitallySignedStruct, SignatureScheme};

use super::support::*;

/// A self-signed certificate for `names`, signed with `alg`.
struct Made {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

fn made(names: &[&str], alg: &'static rcgen::SignatureAlgorithm) -> Made {
    let key = ok(rcgen::KeyPair::generate_for(alg), "make a key");
    let params = ok(
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()),
        "certificate names",
    );
    let cert = ok(params.self_signed(&key), "sign the certificate");
    Made {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().to_vec(),
    }
}

fn p256(names: &[&str]) -> Made {
    made(names, &rcgen::PKCS_ECDSA_P256_SHA256)
}

/// Writes `name.pem` and `name-key.pem` in `dir` (by rename, as a renewal
/// would) and returns the pair's paths.
fn write(dir: &TestDir, name: &str, made: &Made) -> TlsCertificate {
    let mut paths = Vec::new();
    for (file, text) in [
        (format!("{name}.pem"), &made.cert_pem),
        (format!("{name}-key.pem"), &made.key_pem),
    ] {
        let path = dir.path().join(&file);
        let tmp = dir.path().join(format!("{file}.tmp"));
        ok(std::fs::write(&tmp, text), "write pem");
        ok(std::fs::rename(&tmp, &path), "rename pem");
        paths.push(path);
    }
    let key = paths.pop().unwrap_or_default();
    let cert = paths.pop().unwrap_or_default();
    TlsCertificate { cert, key }
}

/// A TLS config serving `first` to whoever no other covers, and `more`.
fn tls(first: &TlsCertificate, more: &[&TlsCertificate]) -> TlsConfig {
    TlsConfig {
        certificates: more.iter().map(|&c| c.clone()).collect(),
        reload_every: Duration::from_millis(50),
        ..TlsConfig::new(&first.cert, &first.key)
    }
}

async fn https_gateway(tls: TlsConfig) -> (Gateway, Upstream) {
    let upstream = Upstream::start("a").await;
    let registry = Registry::new();
    registry.set("svc", vec![upstream.endpoint()]);
    let mut cfg: Config = config(vec![route(
        "svc",
        "/api/**",
        &["GET"],
        Duration::from_secs(5),
    )]);
    cfg.tls = Some(tls);
    (start(cfg, &registry).await, upstream)
}

/// Takes whatever certificate it is served (its signature over the
/// handshake is still checked), offering to verify `schemes` only.
#[derive(Debug)]
struct AnyCertificate {
    schemes: Vec<SignatureScheme>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.clone()
    }
}

fn any_certificate(schemes: &[SignatureScheme]) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = AnyCertificate {
        schemes: schemes.to_vec(),
        provider: Arc::clone(&provider),
    };
    let config = ok(
        ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions(),
        "client versions",
    )
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(verifier))
    .with_no_client_auth();
    Arc::new(config)
}

const ALL_SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ED25519,
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PKCS1_SHA256,
];

/// Connects asking for `name` (a DNS name is sent as SNI, an IP address
/// sends none).
async fn connect_as(
    addr: SocketAddr,
    name: &str,
    config: Arc<ClientConfig>,
) -> TlsStream<TcpStream> {
    let tcp = ok(TcpStream::connect(addr).await, "connect");
    let name = ok(ServerName::try_from(name.to_string()), "server name");
    ok(
        ok(
            tokio::time::timeout(PATIENCE, TlsConnector::from(config).connect(name, tcp)).await,
            "handshake timed out",
        ),
        "TLS handshake",
    )
}

fn served(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| leaf.to_vec())
        .unwrap_or_default()
}

/// The certificate served to a client asking for `name`.
async fn served_for(addr: SocketAddr, name: &str, schemes: &[SignatureScheme]) -> Vec<u8> {
    served(&connect_as(addr, name, any_certificate(schemes)).await)
}

#[tokio::test]
async fn each_client_is_served_the_certificate_for_the_name_it_asks_for() {
    let dir = TestDir::new();
    let default = p256(&["localhost", "127.0.0.1"]);
    let api = p256(&["api.example.test"]);
    let shop = p256(&["*.shop.example.test", "shop.example.test"]);
    let first = write(&dir, "default", &default);
    let api_files = write(&dir, "api", &api);
    let shop_files = write(&dir, "shop", &shop);
    let (gw, _upstream) = https_gateway(tls(&first, &[&api_files, &shop_files])).await;
    let addr = gw.local_addr();

    for (name, want, which) in [
        ("api.example.test", &api.der, "the exact name"),
        ("API.Example.TEST", &api.der, "the exact name, in capitals"),
        ("eu.shop.example.test", &shop.der, "the wildcard"),
        (
            "shop.example.test",
            &shop.der,
            "the name beside the wildcard",
        ),
        (
            "a.eu.shop.example.test",
            &default.der,
            "two labels under the wildcard",
        ),
        ("example.test", &default.der, "a name no certificate has"),
        (
            "localhost",
            &default.der,
            "the first certificate's own name",
        ),
        ("127.0.0.1", &default.der, "no SNI (an IP address)"),
    ] {
        assert!(
            served_for(addr, name, ALL_SCHEMES).await == *want,
            "{which} ({name}) was served the wrong certificate"
        );
    }

    // What is behind the handshake is the same gateway.
    let mut stream = connect_as(addr, "api.example.test", any_certificate(ALL_SCHEMES)).await;
    ok(
        stream
            .write_all(
                b"GET /api/x HTTP/1.1\r\nhost: api.example.test\r\nconnection: close\r\n\r\n",
            )
            .await,
        "write",
    );
    let mut answer = Vec::new();
    ok(
        ok(
            tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer)).await,
            "read timed out",
        ),
        "read",
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Each certificate's expiry, by its file.
    for files in [&first, &api_files, &shop_files] {
        let cert = files.cert.display().to_string();
        assert_eq!(
            metric_lines(&[
                "flotilla_gateway_tls_certificate_expiry_timestamp_seconds",
                &format!("cert=\"{cert}\""),
            ])
            .len(),
            1,
            "the expiry of {cert} is exported"
        );
    }
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn of_two_certificates_for_a_name_the_first_the_client_can_verify_is_served() {
    let dir = TestDir::new();
    let default = p256(&["localhost"]);
    let ed = made(&["dual.example.test"], &rcgen::PKCS_ED25519);
    let ec = p256(&["dual.example.test"]);
    let first = write(&dir, "default", &default);
    let ed_files = write(&dir, "ed", &ed);
    let ec_files = write(&dir, "ec", &ec);
    let (gw, _upstream) = https_gateway(tls(&first, &[&ed_files, &ec_files])).await;
    let addr = gw.local_addr();

    assert!(
        served_for(addr, "dual.example.test", ALL_SCHEMES).await == ed.der,
        "a client that verifies both is served the first listed"
    );
    assert!(
        served_for(
            addr,
            "dual.example.test",
            &[SignatureScheme::ECDSA_NISTP256_SHA256]
        )
        .await
            == ec.der,
        "a client without Ed25519 is served the ECDSA certificate"
    );
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_further_certificate_is_renewed_on_its_own() {
    let dir = TestDir::new();
    let default = p256(&["localhost"]);
    let api = p256(&["api.example.test"]);
    let first = write(&dir, "default", &default);
    let api_files = write(&dir, "api", &api);
    let (gw, _upstream) = https_gateway(tls(&first, &[&api_files])).await;
    let addr = gw.local_addr();
    assert!(served_for(addr, "api.example.test", ALL_SCHEMES).await == api.der);

    let renewed = p256(&["api.example.test"]);
    write(&dir, "api", &renewed);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while served_for(addr, "api.example.test", ALL_SCHEMES).await != renewed.der {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewed api certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        served_for(addr, "localhost", ALL_SCHEMES).await == default.der,
        "the other certificate is not touched"
    );

    // A renewal that lost its names is refused; the current one stays.
    let failed = || {
        metric_sum(&[
            "flotilla_gateway_tls_certificate_reloads_total",
            "result=\"error\"",
        ])
    };
    let failed_before = failed();
    write(&dir, "api", &p256(&["10.0.0.1"]));
    wait_until("the nameless renewal refused", || failed() > failed_before).await;
    assert!(served_for(addr, "api.example.test", ALL_SCHEMES).await == renewed.der);
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_further_certificate_without_a_dns_name_stops_the_start() {
    let dir = TestDir::new();
    let first = write(&dir, "default", &p256(&["localhost"]));
    let nameless = write(&dir, "nameless", &p256(&["10.0.0.1"]));
    let mut cfg = config(Vec::new());
    cfg.tls = Some(tls(&first, &[&nameless]));
    let source = start_error(cfg, "a certificate no client could be served").await;
    assert!(
        source.contains("nameless.pem") && source.contains("names no DNS name"),
        "{source}"
    );
}
