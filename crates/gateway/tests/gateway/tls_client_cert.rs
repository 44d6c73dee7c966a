//! Client certificates at the HTTPS gateway (`TlsConfig::client_ca`): a
//! verified one told to instances in `X-Forwarded-Client-Cert` (and a
//! client's own copy of that header never passed on), routes that need
//! one, certificates of other CAs refused, `client_auth = required`, and
//! the CA file renewed on disk. Real handshakes from rustls clients that
//! present certificates an rcgen CA signed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use flotilla_gateway::{ClientAuth, Gateway, TlsConfig};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

use super::support::*;
use super::tls::handshake as connect;

/// A CA that signs client certificates.
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = ok(rcgen::KeyPair::generate(), "CA key");
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = ok(params.self_signed(&key), "CA certificate");
    Ca {
        pem: cert.pem(),
        issuer: rcgen::Issuer::new(params, key),
    }
}

/// A client certificate `ca` signed, for `cn` with these subjectAltNames.
struct ClientCert {
    der: CertificateDer<'static>,
    key: Vec<u8>,
}

fn client_cert(ca: &Ca, cn: &str, sans: &[rcgen::SanType]) -> ClientCert {
    signed(ca, cn, |p| p.subject_alt_names = sans.to_vec())
}

/// A client certificate `ca` signed with this serial number.
fn client_cert_numbered(ca: &Ca, cn: &str, serial: u8) -> ClientCert {
    signed(ca, cn, |p| {
        p.serial_number = Some(rcgen::SerialNumber::from(vec![serial]));
    })
}

/// A client certificate `ca` signed that expires at `not_after`.
fn client_cert_until(ca: &Ca, cn: &str, not_after: SystemTime) -> ClientCert {
    signed(ca, cn, |p| p.not_after = not_after.into())
}

/// A client certificate for `cn` that `ca` signed, with what `edit` sets.
fn signed(ca: &Ca, cn: &str, edit: impl FnOnce(&mut rcgen::CertificateParams)) -> ClientCert {
    let key = ok(rcgen::KeyPair::generate(), "client key");
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    edit(&mut params);
    let cert = ok(params.signed_by(&key, &ca.issuer), "client certificate");
    ClientCert {
        der: cert.der().clone(),
        key: key.serialize_der(),
    }
}

/// A CRL of `ca` revoking these serial numbers (`number`: the CRL's own).
fn crl(ca: &Ca, number: u8, revoked: &[u8]) -> String {
    let params = rcgen::CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(2025, 1, 1),
        next_update: rcgen::date_time_ymd(2100, 1, 1),
        crl_number: rcgen::SerialNumber::from(vec![number]),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|&serial| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from(vec![serial]),
                revocation_time: rcgen::date_time_ymd(2025, 1, 2),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    ok(
        ok(params.signed_by(&ca.issuer), "sign the CRL").pem(),
        "CRL PEM",
    )
}

/// The gateway's own certificate, for `localhost`.
struct Server {
    der: CertificateDer<'static>,
}

fn write(dir: &TestDir, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    let tmp = dir.path().join(format!("{name}.tmp"));
    ok(std::fs::write(&tmp, text), "write pem");
    ok(std::fs::rename(&tmp, &path), "rename pem");
    path
}

fn server(dir: &TestDir) -> Server {
    let made = ok(
        rcgen::generate_simple_self_signed(vec!["localhost".into()]),
        "server certificate",
    );
    write(dir, "cert.pem", &made.cert.pem());
    write(dir, "key.pem", &made.signing_key.serialize_pem());
    Server {
        der: made.cert.der().clone(),
    }
}

fn tls(dir: &TestDir, ca: &Ca, client_auth: ClientAuth) -> TlsConfig {
    let client_ca = write(dir, "clients-ca.pem", &ca.pem);
    TlsConfig {
        client_ca: Some(client_ca),
        client_auth,
        reload_every: Duration::from_millis(50),
        ..TlsConfig::new(dir.path().join("cert.pem"), dir.path().join("key.pem"))
    }
}

/// `/api/**` for anyone, `/partner/**` for clients with a certificate.
async fn gateway(tls: TlsConfig) -> (Gateway, Upstream) {
    let upstream = Upstream::start("a").await;
    let registry = Registry::new();
    registry.set("svc", vec![upstream.endpoint()]);
    let mut partner = route("svc", "/partner/**", &["GET"], Duration::from_secs(5));
    partner.client_cert = true;
    let mut cfg = config(vec![
        route("svc", "/api/**", &["GET"], Duration::from_secs(5)),
        partner,
    ]);
    cfg.tls = Some(tls);
    (start(cfg, &registry).await, upstream)
}

fn client(server: &Server, cert: Option<&ClientCert>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    ok(roots.add(server.der.clone()), "trust the gateway");
    let builder = ok(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions(),
        "client versions",
    )
    .with_root_certificates(roots);
    let mut config = match cert {
        Some(c) => ok(
            builder.with_client_auth_cert(
                vec![c.der.clone()],
                PrivateKeyDer::Pkcs8(c.key.clone().into()),
            ),
            "client certificate",
        ),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// One HTTP/1.1 request on a new connection; the whole answer, or the
/// error that ended the connection (a refused certificate surfaces at the
/// client's first read in TLS 1.3).
async fn get(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    path: &str,
    extra: &str,
) -> std::io::Result<String> {
    let mut stream = connect(addr, config).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n{extra}connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut got))
        .await
        .map_err(|_| std::io::Error::other("read timed out"))??;
    if got.is_empty() {
        return Err(std::io::Error::other("closed without an answer"));
    }
    Ok(String::from_utf8_lossy(&got).into_owned())
}

fn status(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn echoed(answer: &str) -> serde_json::Value {
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    ok(serde_json::from_str(body), "JSON body")
}

fn sha256_hex(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

#[tokio::test]
async fn a_verified_client_certificate_is_told_to_instances_and_opens_its_routes() {
    let dir = TestDir::new();
    let server = server(&dir);
    let partners = ca("Partners CA");
    let (gw, _upstream) = gateway(tls(&dir, &partners, ClientAuth::Optional)).await;
    let addr = gw.local_addr();
    let cert = client_cert(
        &partners,
        "partner-a",
        &[
            rcgen::SanType::URI(ok("spiffe://partners.example/a".try_into(), "uri")),
            rcgen::SanType::DnsName(ok("a.partners.example".try_into(), "dns")),
        ],
    );
    let want = format!(
        "Hash={};Subject=\"CN=partner-a\";URI=spiffe://partners.example/a;DNS=a.partners.example",
        sha256_hex(&cert.der)
    );
    let forged = "x-forwarded-client-cert: Hash=forged;Subject=\"CN=admin\"\r\n";

    // With the certificate: the route that needs one, and what the instance
    // is told (the client's own copy of the header dropped).
    let with = client(&server, Some(&cert), &[]);
    let answer = ok(
        get(addr, Arc::clone(&with), "/partner/orders", forged).await,
        "GET",
    );
    assert_eq!(status(&answer), 200, "{answer}");
    assert_eq!(
        echoed(&answer)["headers"]["x-forwarded-client-cert"],
        want.as_str(),
        "{answer}"
    );
    let answer = ok(get(addr, with, "/api/x", "").await, "GET");
    assert_eq!(
        echoed(&answer)["headers"]["x-forwarded-client-cert"],
        want.as_str(),
        "told on every route: {answer}"
    );

    // Without one: public routes serve, with no such header even when the
    // client sends it; the route that needs one refuses.
    let without = client(&server, None, &[]);
    let answer = ok(
        get(addr, Arc::clone(&without), "/api/x", forged).await,
        "GET",
    );
    assert_eq!(status(&answer), 200, "{answer}");
    assert!(
        echoed(&answer)["headers"]
            .get("x-forwarded-client-cert")
            .is_none(),
        "a forged header reaches the instance: {answer}"
    );
    let refused = || {
        metric_sum(&[
            "flotilla_gateway_auth_failures_total",
            "route=\"/partner/**\"",
            "reason=\"client_certificate_required\"",
        ])
    };
    let before = refused();
    let answer = ok(get(addr, without, "/partner/orders", "").await, "GET");
    assert_eq!(status(&answer), 403, "{answer}");
    assert!(answer.contains("client_certificate_required"), "{answer}");
    assert!(refused() > before, "the refusal is counted");

    // Over HTTP/2 as well.
    let tls = ok(
        connect(addr, client(&server, Some(&cert), &[b"h2"])).await,
        "h2 handshake",
    );
    let (mut sender, conn) = ok(
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await,
        "h2",
    );
    tokio::spawn(conn);
    let req = ok(
        Request::builder()
            .uri("https://localhost/partner/h2")
            .header("x-forwarded-client-cert", "Hash=forged")
            .body(Empty::<Bytes>::new()),
        "request",
    );
    let res = ok(sender.send_request(req).await, "h2 request");
    assert_eq!(res.status(), StatusCode::OK);
    let body = ok(res.into_body().collect().await, "body").to_bytes();
    let echo: serde_json::Value = ok(serde_json::from_slice(&body), "JSON");
    assert_eq!(echo["headers"]["x-forwarded-client-cert"], want.as_str());
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_certificate_of_another_ca_is_refused_and_required_refuses_none() {
    let dir = TestDir::new();
    let server = server(&dir);
    let partners = ca("Partners CA");
    let stranger = ca("Some other CA");
    let (gw, _upstream) = gateway(tls(&dir, &partners, ClientAuth::Required)).await;
    let addr = gw.local_addr();

    let good = client_cert(&partners, "partner-a", &[]);
    let answer = ok(
        get(addr, client(&server, Some(&good), &[]), "/api/x", "").await,
        "a partner's certificate",
    );
    assert_eq!(status(&answer), 200, "{answer}");

    let bad = client_cert(&stranger, "partner-a", &[]);
    assert!(
        get(addr, client(&server, Some(&bad), &[]), "/api/x", "")
            .await
            .is_err(),
        "a certificate of another CA is refused"
    );
    assert!(
        get(addr, client(&server, None, &[]), "/api/x", "")
            .await
            .is_err(),
        "no certificate is refused with client_auth = required"
    );
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_renewed_client_ca_is_taken_without_a_restart() {
    let dir = TestDir::new();
    let server = server(&dir);
    let old = ca("Partners CA 2025");
    let (gw, _upstream) = gateway(tls(&dir, &old, ClientAuth::Required)).await;
    let addr = gw.local_addr();
    let old_client = client(&server, Some(&client_cert(&old, "p", &[])), &[]);
    ok(
        get(addr, Arc::clone(&old_client), "/api/x", "").await,
        "GET",
    );

    let new = ca("Partners CA 2026");
    let new_client = client(&server, Some(&client_cert(&new, "p", &[])), &[]);
    write(&dir, "clients-ca.pem", &new.pem);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while get(addr, Arc::clone(&new_client), "/api/x", "")
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewed CA was never taken"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        get(addr, old_client, "/api/x", "").await.is_err(),
        "the old CA's clients are refused once it is gone"
    );
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_client_ca_file_without_a_certificate_stops_the_start() {
    let dir = TestDir::new();
    server(&dir);
    let mut tls = tls(&dir, &ca("x"), ClientAuth::Optional);
    tls.client_ca = Some(write(&dir, "clients-ca.pem", "not a certificate"));
    let mut cfg = config(Vec::new());
    cfg.tls = Some(tls);
    let source = start_error(cfg, "no client CA").await;
    assert!(
        source.contains("clients-ca.pem") && source.contains("no PEM certificate"),
        "{source}"
    );
}

#[tokio::test]
async fn a_revoked_client_certificate_is_refused_and_a_new_crl_is_taken() {
    let dir = TestDir::new();
    let server = server(&dir);
    let partners = ca("Partners CA");
    let mut tls = tls(&dir, &partners, ClientAuth::Required);
    tls.client_crl = Some(write(&dir, "clients-crl.pem", &crl(&partners, 1, &[1])));
    let (gw, _upstream) = gateway(tls).await;
    let addr = gw.local_addr();
    let revoked = client(&server, Some(&client_cert_numbered(&partners, "a", 1)), &[]);
    let kept = client(&server, Some(&client_cert_numbered(&partners, "b", 2)), &[]);

    assert!(
        get(addr, Arc::clone(&revoked), "/api/x", "").await.is_err(),
        "a revoked certificate is refused"
    );
    let answer = ok(get(addr, Arc::clone(&kept), "/api/x", "").await, "GET");
    assert_eq!(status(&answer), 200, "{answer}");

    // The next CRL revokes the second one too; its session ends with the
    // old CRL, and it is refused.
    write(&dir, "clients-crl.pem", &crl(&partners, 2, &[1, 2]));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while get(addr, Arc::clone(&kept), "/api/x", "").await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new CRL was never taken"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_crl_of_another_ca_stops_the_start() {
    let dir = TestDir::new();
    server(&dir);
    let partners = ca("Partners CA");
    let mut tls = tls(&dir, &partners, ClientAuth::Optional);
    tls.client_crl = Some(write(
        &dir,
        "clients-crl.pem",
        &crl(&ca("Some other CA"), 1, &[1]),
    ));
    let mut cfg = config(Vec::new());
    cfg.tls = Some(tls);
    let source = start_error(cfg, "a CRL that revokes nothing").await;
    assert!(
        source.contains("clients-crl.pem") && source.contains("not one of the client CAs"),
        "{source}"
    );
}

#[tokio::test]
async fn a_resumed_session_ends_when_its_client_certificate_expires() {
    let dir = TestDir::new();
    let server = server(&dir);
    let partners = ca("Partners CA");
    let (gw, _upstream) = gateway(tls(&dir, &partners, ClientAuth::Required)).await;
    let addr = gw.local_addr();
    // Valid for a few seconds (certificates count whole seconds): long
    // enough for a full handshake and a resumed one.
    let expires = SystemTime::now() + Duration::from_secs(3);
    let config = client(
        &server,
        Some(&client_cert_until(&partners, "brief", expires)),
        &[],
    );
    let answer = ok(get(addr, Arc::clone(&config), "/api/x", "").await, "GET");
    assert_eq!(status(&answer), 200, "{answer}");
    // The next connection resumes that session (so the test below is
    // about resumption, not a full handshake's own check).
    let mut resumed = ok(connect(addr, Arc::clone(&config)).await, "resume");
    assert_eq!(
        resumed.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    ok(
        resumed
            .write_all(b"GET /api/x HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .await,
        "write",
    );
    let mut got = Vec::new();
    ok(
        resumed.read_to_end(&mut got).await,
        "read, and the new tickets",
    );
    assert_eq!(status(&String::from_utf8_lossy(&got)), 200);

    // Past its notAfter (and the second it names), the session it made
    // opens nothing.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while SystemTime::now() < expires + Duration::from_secs(1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the clock stood still"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expired = || {
        metric_sum(&[
            "flotilla_gateway_tls_handshake_failures_total",
            "reason=\"certificate_expired\"",
        ])
    };
    let before = expired();
    assert!(
        get(addr, Arc::clone(&config), "/api/x", "").await.is_err(),
        "an expired certificate's session was resumed"
    );
    assert!(
        expired() > before,
        "refused as a resumption of an expired one"
    );
    // The client renews its certificate but keeps its sessions (as a
    // client whose certificates a resolver renews does): the tickets the
    // refused resumption handed it must not be taken again, or it would
    // never make the full handshake that shows the new one.
    let renewed = client_cert(&partners, "brief", &[]);
    let mut renewed = Arc::unwrap_or_clone(client(&server, Some(&renewed), &[]));
    renewed.resumption = config.resumption.clone();
    let answer = ok(get(addr, Arc::new(renewed), "/api/x", "").await, "GET");
    assert_eq!(status(&answer), 200, "{answer}");
    gw.shutdown(Duration::from_secs(1)).await;
}
