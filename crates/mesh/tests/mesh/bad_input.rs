//! Bad input gets a clear error, never a panic: damaged files, clock skew,
//! a peer that stalls the handshake.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use flotilla_mesh::ca::CaError;
use flotilla_mesh::tls::{TlsError, error_chain};
use flotilla_mesh::{Ca, CaConfig, ExpectedPeer, Identity};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::support::{DEADLINE, HOUR, Scratch, Server, call, echo, from_now};

fn truncate(path: &Path) {
    let bytes = fs::read(path).unwrap();
    fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
}

#[test]
fn damaged_identity_files_are_clear_errors() {
    let scratch = Scratch::new();
    let ca = scratch.ca("ca", "shop");
    let leaf = ca.issue_leaf("catalog", HOUR).unwrap();
    let other = ca.issue_leaf("catalog", HOUR).unwrap();

    type Damage = fn(&flotilla_mesh::IdentityFiles, &flotilla_mesh::Leaf);
    let cases: [(&str, Damage, &str); 9] = [
        ("truncated key", |f, _| truncate(&f.key), "key file"),
        (
            "empty key",
            |f, _| fs::write(&f.key, "").unwrap(),
            "holds no key",
        ),
        (
            "truncated cert",
            |f, _| truncate(&f.cert),
            "certificate file",
        ),
        (
            "empty cert",
            |f, _| fs::write(&f.cert, "").unwrap(),
            "holds no certificate",
        ),
        (
            "garbage in a PEM cert",
            |f, _| {
                fs::write(
                    &f.cert,
                    "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
                )
                .unwrap()
            },
            "is not a Flotilla identity",
        ),
        (
            "truncated bundle",
            |f, _| truncate(&f.ca),
            "trust bundle file",
        ),
        (
            "empty bundle",
            |f, _| fs::write(&f.ca, "").unwrap(),
            "holds no trust bundle",
        ),
        (
            "key of another certificate",
            |f, other| fs::write(&f.key, &other.key_pem).unwrap(),
            "does not belong to the certificate",
        ),
        (
            "missing key",
            |f, _| fs::remove_file(&f.key).unwrap(),
            "cannot read the key file",
        ),
    ];
    for (i, (what, damage, expected)) in cases.into_iter().enumerate() {
        let files = scratch.install(&format!("case-{i}"), &leaf);
        damage(&files, &other);
        let err = Identity::load(files.clone()).expect_err(what);
        let text = error_chain(&err);
        assert!(text.contains(expected), "{what}: {text}");
        // Every message names the file it is about.
        let named = [&files.cert, &files.key, &files.ca]
            .iter()
            .any(|p| text.contains(&p.display().to_string()));
        assert!(named, "{what}: {text}");
    }
}

#[tokio::test]
async fn a_bad_rotation_keeps_the_working_identity() {
    let scratch = Scratch::new();
    let ca = scratch.ca("ca", "shop");
    let catalog = scratch.identity(&ca, "catalog", "catalog");
    let orders = scratch.identity(&ca, "orders", "orders");
    let server = Server::echo(&catalog).await;

    truncate(&catalog.files().cert);
    assert!(matches!(catalog.reload(), Err(TlsError::BadPem { .. })));
    assert!(catalog.reload_if_changed().is_err());
    call(&orders, ExpectedPeer::service("catalog"), server.addr, "x")
        .await
        .unwrap();

    // Files for a different service are refused too.
    ca.issue_leaf("pricing", HOUR)
        .unwrap()
        .write(catalog.files())
        .unwrap();
    let err = catalog.reload().unwrap_err();
    assert!(matches!(err, TlsError::IdentityChanged { .. }), "{err}");
    call(&orders, ExpectedPeer::service("catalog"), server.addr, "x")
        .await
        .unwrap();

    ca.issue_leaf("catalog", HOUR)
        .unwrap()
        .write(catalog.files())
        .unwrap();
    assert!(catalog.reload_if_changed().unwrap());
    assert!(!catalog.reload_if_changed().unwrap());
    assert_eq!(catalog.loads(), 2);
    call(&orders, ExpectedPeer::service("catalog"), server.addr, "x")
        .await
        .unwrap();
}

#[test]
fn damaged_ca_files_are_clear_errors() {
    let scratch = Scratch::new();
    let config = CaConfig::new("shop");
    let dir = scratch.path().join("ca");
    Ca::open(&dir, config.clone()).unwrap();
    let pristine = scratch.path().join("pristine");
    copy_dir(&dir, &pristine);

    type Damage = fn(&Path);
    let cases: [(&str, Damage, &str); 8] = [
        ("gen-1/root.key", truncate, "is not a valid PEM private key"),
        ("gen-1/root.crt", truncate, "certificate"),
        (
            "gen-1/intermediate.key",
            truncate,
            "is not a valid PEM private key",
        ),
        ("gen-1/intermediate.crt", truncate, "certificate"),
        ("state", truncate, "truncated"),
        (
            "state",
            |p| fs::remove_file(p).unwrap(),
            "is missing while key files are present",
        ),
        (
            "gen-1/root.key",
            |p| fs::remove_file(p).unwrap(),
            "is missing",
        ),
        (
            "gen-1/intermediate.key",
            |p| {
                let root_key = p.with_file_name("root.key");
                fs::copy(root_key, p).unwrap();
            },
            "is not the key of",
        ),
    ];
    for (file, damage, expected) in cases {
        fs::remove_dir_all(&dir).unwrap();
        copy_dir(&pristine, &dir);
        let path = dir.join(file);
        damage(&path);
        let err = Ca::open(&dir, config.clone()).expect_err(file);
        assert!(matches!(err, CaError::Corrupt { .. }), "{file}: {err}");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{file}: {text}");
        assert!(text.contains(expected), "{file}: {text}");
        assert!(text.contains("restore the CA directory"), "{file}: {text}");
    }

    // An intermediate signed by another root is caught too.
    fs::remove_dir_all(&dir).unwrap();
    copy_dir(&pristine, &dir);
    let other = scratch.path().join("other");
    Ca::open(&other, config.clone()).unwrap();
    for f in ["intermediate.crt", "intermediate.key"] {
        fs::copy(other.join("gen-1").join(f), dir.join("gen-1").join(f)).unwrap();
    }
    let err = Ca::open(&dir, config).unwrap_err();
    assert!(err.to_string().contains("is not signed by"), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test]
async fn a_certificate_not_yet_valid_is_refused_with_a_clear_error() {
    // Clock skew beyond the tolerance: the issuer's clock is ten minutes
    // ahead of ours, so the certificate starts in the future. (Within the
    // tolerance a leaf is accepted: `not_before` is backdated by
    // CLOCK_SKEW_TOLERANCE at issue.)
    let scratch = Scratch::new();
    let ca = scratch.ca("ca", "shop");
    let catalog = scratch.identity(&ca, "catalog", "catalog");
    let orders = scratch.identity(&ca, "orders", "orders");
    let future = ca
        .issue_leaf_with_validity("orders", from_now(Duration::from_secs(600)), from_now(HOUR))
        .unwrap();
    let skewed_orders = Identity::load(scratch.install("skewed-orders", &future)).unwrap();
    let future = ca
        .issue_leaf_with_validity(
            "catalog",
            from_now(Duration::from_secs(600)),
            from_now(HOUR),
        )
        .unwrap();
    let skewed_catalog = Identity::load(scratch.install("skewed-catalog", &future)).unwrap();

    let mut server = Server::echo(&catalog).await;
    assert!(
        call(
            &skewed_orders,
            ExpectedPeer::service("catalog"),
            server.addr,
            "x"
        )
        .await
        .is_err()
    );
    let error = server.next_error().await;
    assert!(error.contains("certificate not valid yet"), "{error}");
    assert!(error.contains("seconds in future"), "{error}");

    let skewed_server = Server::echo(&skewed_catalog).await;
    let err = call(
        &orders,
        ExpectedPeer::service("catalog"),
        skewed_server.addr,
        "x",
    )
    .await
    .unwrap_err();
    assert!(err.contains("certificate not valid yet"), "{err}");
}

#[tokio::test]
async fn a_stalled_handshake_is_dropped_after_the_timeout() {
    let scratch = Scratch::new();
    let ca = scratch.ca("ca", "shop");
    let catalog = scratch.identity(&ca, "catalog", "catalog");
    let orders = scratch.identity(&ca, "orders", "orders");
    let timeout = Duration::from_millis(300);
    let mut server = Server::start(&catalog, timeout, echo()).await;

    let started = Instant::now();
    let mut staller = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 64];
    // Connect, send nothing: the server closes the socket after the
    // handshake deadline.
    let read = tokio::time::timeout(DEADLINE, staller.read(&mut buf))
        .await
        .expect("the server dropped the stalled connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() >= timeout);
    let error = server.next_error().await;
    assert!(error.contains("did not finish within 300ms"), "{error}");

    // The server still serves others.
    call(&orders, ExpectedPeer::service("catalog"), server.addr, "x")
        .await
        .unwrap();
}
