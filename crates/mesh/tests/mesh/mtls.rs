//! Mutual TLS over real sockets: what succeeds, and everything that must
//! be refused.

use flotilla_mesh::tls::{CERT_EXPIRY_METRIC, error_chain};
use flotilla_mesh::{ExpectedPeer, Identity, IdentityFiles};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{
    Client, DEADLINE, HOUR, Scratch, Server, ago, call, id, raw_client, raw_client_with_cert,
};

#[tokio::test]
async fn mutual_tls_with_the_right_identities() {
    let scratch = Scratch::new();
    let ca = scratch.ca("ca", "shop");
    let catalog = scratch.identity(&ca, "catalog", "catalog");
    let orders = scratch.identity(&ca, "orders", "orders");
    let server = Server::echo(&catalog).await;

    let mut client = Client::connect(&orders, ExpectedPeer::service("catalog"), server.addr)
        .await
        .unwrap();
    assert_eq!(client.server, id("catalog"));
    // The server sees the caller's verified identity.
    assert_eq!(
        client.request("ping").await.unwrap(),
        "spiffe://shop.flotilla/ns/local/svc/orders ping"
    );
    assert_eq!(
        client.request("again").await.unwrap(),
        "spiffe://shop.flotilla/ns/local/svc/orders again"
    );
    // The other expectations accept the same server.
    for expected in [
        ExpectedPeer::exact(id("catalog")),
        ExpectedPeer::AnyService,
        ExpectedPeer::matching("catalog or pricing", |p| {
            ["catalog", "pricing"].contains(&p.service())
        }),
    ] {
        call(&orders, expected, server.addr, "x").await.unwrap();
    }
}

#[tokio::test]
async fn plaintext_is_refused() {
    let scratch = Scratch::new();
    let ca = scratch.ca("ca", "shop");
    let catalog = scratch.identity(&ca, "catalog", "catalog");
    let mut server = Server::echo(&catalog).await;

    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: catalog\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut answer))
        .await
        .expect("the server closes a plaintext connection");
    // At most a TLS alert record (content type 21), never HTTP.
    assert!(answer.is_empty() || answer[0] == 21, "{answer:?}");
    let error = server.next_error().await;
    assert!(error.contains("handshake failed"), "{error}");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let scratch = Scratch::new();
    let ca = scratch.ca("ca", "shop");
    let catalog = scratch.identity(&ca, "catalog", "catalog");
    let mut server = Server::echo(&catalog).await;

    let config = raw_client(&[&rustls::version::TLS13]);
    // TLS 1.3: the client finishes first, the refusal comes on the read.
    if let Ok(mut client) = Client::connect_with(config, server.addr).await {
        assert!(client.request("ping").await.is_err());
    }
    let error = server.next_error().await;
    assert!(error.contains("handshake failed"), "{error}");
}

#[tokio::test]
async fn tls_1_2_is_refused() {
    let scratch = Scratch::new();
    let ca = scratch.ca("ca", "shop");
    let catalog = scratch.identity(&ca, "catalog", "catalog");
    let mut server = Server::echo(&catalog).await;

    let config = raw_client(&[&rustls::version::TLS12]);
    let err = Client::connect_with(config, server.addr)
        .await
        .err()
        .expect("a TLS 1.2-only client cannot connect");
    assert!(error_chain(&err).contains("handshake failed"), "{err}");
    let error = server.next_error().await;
    assert!(error.contains("Tls12NotOfferedOrEnabled"), "{error}");
}

#[tokio::test]
async fn a_certificate_from_a_foreign_ca_is_refused_both_ways() {
    let scratch = Scratch::new();
    let ca = scratch.ca("ca", "shop");
    // Same system name, different CA: an attacker's look-alike.
    let impostor_ca = scratch.ca("impostor-ca", "shop");
    let catalog = scratch.identity(&ca, "catalog", "catalog");
    let orders = scratch.identity(&ca, "orders", "orders");

    // A client holding the real bundle but the impostor's certificate.
    let files = IdentityFiles::in_dir(&scratch.path().join("fake-orders"));
    impostor_ca
        .issue_leaf("orders", HOUR)
        .unwrap()
        .write(&files)
        .unwrap();
    ca.write_bundle(&files).unwrap();
    let fake_orders = Identity::load(files).unwrap();
    let mut server = Server::echo(&catalog).await;
    assert!(
        call(
            &fake_orders,
            ExpectedPeer::service("catalog"),
            server.addr,
            "x"
        )
        .await
        .is_err()
    );
    let error = server.next_error().await;
    assert!(error.contains("UnknownIssuer"), "{error}");

    // A server with the impostor's certificate.
    let fake_catalog = scratch.identity(&impostor_ca, "fake-catalog", "catalog");
    let fake_server = Server::echo(&fake_catalog).await;
    let err = call(
        &orders,
        ExpectedPeer::service("catalog"),
        fake_server.addr,
        "x",
    )
    .await
    .unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn an_expired_certificate_is_refused_both_ways() {
    let scratch = Scratch::new();
    let ca = scratch.ca("ca", "shop");
    let catalog = scratch.identity(&ca, "catalog", "catalog");
    let orders = scratch.identity(&ca, "orders", "orders");
    let expired = ca
        .issue_leaf_with_validity("orders", ago(2 * HOUR), ago(HOUR))
        .unwrap();
    let expired_orders = Identity::load(scratch.install("expired-orders", &expired)).unwrap();
    let expired = ca
        .issue_leaf_with_validity("catalog", ago(2 * HOUR), ago(HOUR))
        .unwrap();
    let expired_catalog = Identity::load(scratch.install("expired-catalog", &expired)).unwrap();

    let mut server = Server::echo(&catalog).await;
    assert!(
        call(
            &expired_orders,
            ExpectedPeer::service("catalog"),
            server.addr,
            "x"
        )
        .await
        .is_err()
    );
    let error = server.next_error().await;
    assert!(error.contains("expired"), "{error}");

    let stale_server = Server::echo(&expired_catalog).await;
    let err = call(
        &orders,
        ExpectedPeer::service("catalog"),
        stale_server.addr,
        "x",
    )
    .await
    .unwrap_err();
    assert!(err.contains("expired"), "{err}");
}

#[tokio::test]
async fn a_peer_with_the_wrong_identity_is_refused() {
    let scratch = Scratch::new();
    let ca = scratch.ca("ca", "shop");
    let catalog = scratch.identity(&ca, "catalog", "catalog");
    let orders = scratch.identity(&ca, "orders", "orders");
    let server = Server::echo(&catalog).await;

    let err = call(&orders, ExpectedPeer::service("pricing"), server.addr, "x")
        .await
        .unwrap_err();
    assert!(
        err.contains(
            "expected the peer to be spiffe://shop.flotilla/ns/local/svc/pricing, but it is spiffe://shop.flotilla/ns/local/svc/catalog"
        ),
        "{err}"
    );
    let err = call(
        &orders,
        ExpectedPeer::exact(flotilla_mesh::SpiffeId::new("shop", "prod", "catalog").unwrap()),
        server.addr,
        "x",
    )
    .await
    .unwrap_err();
    assert!(err.contains("expected the peer to be"), "{err}");
    let err = call(
        &orders,
        ExpectedPeer::matching("the gateway", |p| p.service() == "gateway"),
        server.addr,
        "x",
    )
    .await
    .unwrap_err();
    assert!(err.contains("expected the peer to be the gateway"), "{err}");
}

#[tokio::test]
async fn a_certificate_for_another_system_is_refused_even_if_its_ca_is_trusted() {
    let scratch = Scratch::new();
    let shop_ca = scratch.ca("shop-ca", "shop");
    let bank_ca = scratch.ca("bank-ca", "bank");
    // Both sides trust both roots (say an operator merged the bundles):
    // the chain is fine, the trust domain is not.
    let both = format!(
        "{}{}",
        shop_ca.trust_bundle_pem(),
        bank_ca.trust_bundle_pem()
    );
    let install = |dir: &str, leaf: flotilla_mesh::Leaf| {
        let files = scratch.install(dir, &leaf);
        std::fs::write(&files.ca, &both).unwrap();
        Identity::load(files).unwrap()
    };
    let catalog = install("catalog", shop_ca.issue_leaf("catalog", HOUR).unwrap());
    let bank_orders = install("bank-orders", bank_ca.issue_leaf("orders", HOUR).unwrap());
    let bank_catalog = install("bank-catalog", bank_ca.issue_leaf("catalog", HOUR).unwrap());
    let shop_orders = install("shop-orders", shop_ca.issue_leaf("orders", HOUR).unwrap());

    let mut server = Server::echo(&catalog).await;
    // Our own client would refuse the shop server first; a raw client that
    // accepts any server shows what the server does with a bank client.
    let raw = raw_client_with_cert(bank_orders.files());
    if let Ok(mut client) = Client::connect_with(raw, server.addr).await {
        assert!(client.request("x").await.is_err());
    }
    let error = server.next_error().await;
    assert!(
        error.contains(
            "the peer spiffe://bank.flotilla/ns/local/svc/orders belongs to another system"
        ),
        "{error}"
    );

    let bank_server = Server::echo(&bank_catalog).await;
    let err = call(
        &shop_orders,
        ExpectedPeer::AnyService,
        bank_server.addr,
        "x",
    )
    .await
    .unwrap_err();
    assert!(err.contains("belongs to another system"), "{err}");
    // Even naming the foreign id exactly does not help.
    let err = call(
        &shop_orders,
        ExpectedPeer::exact(flotilla_mesh::SpiffeId::local("bank", "catalog").unwrap()),
        bank_server.addr,
        "x",
    )
    .await
    .unwrap_err();
    assert!(err.contains("belongs to another system"), "{err}");
}

#[tokio::test]
async fn loading_a_certificate_sets_the_expiry_metric() {
    let scratch = Scratch::new();
    let ca = scratch.ca("ca", "shop");
    let leaf = ca.issue_leaf("catalog", HOUR).unwrap();
    let files = scratch.install("catalog", &leaf);
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let identity = metrics::with_local_recorder(&recorder, || Identity::load(files)).unwrap();
    let expiry = leaf
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let text = handle.render();
    let line = format!("{CERT_EXPIRY_METRIC}{{service=\"catalog\"}} {expiry}");
    assert!(text.contains(&line), "{line} not in:\n{text}");

    // A reload records the new expiry.
    let next = ca.issue_leaf("catalog", 2 * HOUR).unwrap();
    next.write(identity.files()).unwrap();
    metrics::with_local_recorder(&recorder, || identity.reload()).unwrap();
    let expiry = next
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let line = format!("{CERT_EXPIRY_METRIC}{{service=\"catalog\"}} {expiry}");
    assert!(handle.render().contains(&line));
    assert_eq!(identity.not_after(), next.not_after);
}
