//! Root rotation with overlap: at every step, peers that trust only the
//! bundle they were given keep talking.

use flotilla_mesh::{Ca, CaConfig, ExpectedPeer, Identity, RotationState, client_config};

use crate::support::{Client, HOUR, Scratch, Server, call};

async fn talks(server: &Server, client: &Identity) -> Result<(), String> {
    call(client, ExpectedPeer::service("catalog"), server.addr, "x")
        .await
        .map(|_| ())
}

fn roots_in(pem: &str) -> usize {
    pem.matches("BEGIN CERTIFICATE").count()
}

#[tokio::test]
async fn root_rotation_keeps_every_step_working() {
    let scratch = Scratch::new();
    let ca_dir = scratch.path().join("ca");
    let mut ca = Ca::open(&ca_dir, CaConfig::new("shop")).unwrap();
    let catalog = scratch.identity(&ca, "catalog", "catalog");
    let orders = scratch.identity(&ca, "orders", "orders");
    let server = Server::echo(&catalog).await;
    talks(&server, &orders).await.unwrap();
    let old_bundle = ca.trust_bundle_pem();
    let old_leaf = ca.issue_leaf("orders", HOUR).unwrap();

    // Step 1: the new root is trusted everywhere before it signs anything.
    ca.begin_root_rotation().unwrap();
    assert_eq!(ca.rotation(), RotationState::Begun);
    assert_eq!(roots_in(&ca.trust_bundle_pem()), 2);
    for identity in [&catalog, &orders] {
        ca.write_bundle(identity.files()).unwrap();
        assert!(identity.reload_if_changed().unwrap());
    }
    talks(&server, &orders).await.unwrap();
    // Still signing with the old root: a peer that has not received the
    // new bundle yet is unaffected.
    let straggler = scratch.identity(&ca, "straggler", "orders");
    std::fs::write(&straggler.files().ca, &old_bundle).unwrap();
    straggler.reload().unwrap();
    talks(&server, &straggler).await.unwrap();

    // Step 2: sign with the new root (a restart of the CA sees the same).
    ca.commit_root_rotation().unwrap();
    let mut ca = Ca::open(&ca_dir, CaConfig::new("shop")).unwrap();
    assert_eq!(ca.rotation(), RotationState::Committed);
    // Re-issue the server first: the client still has an old-root leaf.
    ca.issue_leaf("catalog", HOUR)
        .unwrap()
        .write(catalog.files())
        .unwrap();
    assert!(catalog.reload_if_changed().unwrap());
    talks(&server, &orders).await.unwrap();
    ca.issue_leaf("orders", HOUR)
        .unwrap()
        .write(orders.files())
        .unwrap();
    assert!(orders.reload_if_changed().unwrap());
    talks(&server, &orders).await.unwrap();
    // This is why step 1 comes first: a peer trusting only the old root
    // cannot verify a new-root leaf.
    let err = talks(&server, &straggler).await.unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    // An old-root leaf is still accepted while both roots are trusted.
    let old = scratch.install("old-orders", &old_leaf);
    ca.write_bundle(&old).unwrap();
    let old_orders = Identity::load(old).unwrap();
    talks(&server, &old_orders).await.unwrap();
    // One config reused for later connections, as a pooled client would.
    let old_config = client_config(&old_orders, ExpectedPeer::service("catalog")).unwrap();
    let mut client = Client::connect_with(old_config.clone(), server.addr)
        .await
        .unwrap();
    client.request("x").await.unwrap();

    // Step 3: every leaf is re-issued; drop the old root.
    ca.finish_root_rotation().unwrap();
    assert_eq!(ca.rotation(), RotationState::Idle);
    assert_eq!(roots_in(&ca.trust_bundle_pem()), 1);
    assert!(!ca.trust_bundle_pem().contains(old_bundle.trim()));
    for identity in [&catalog, &orders, &old_orders] {
        ca.write_bundle(identity.files()).unwrap();
        assert!(identity.reload_if_changed().unwrap());
    }
    talks(&server, &orders).await.unwrap();
    // A leaf of the retired root is no longer trusted, also not through a
    // client that connected before (no session resumption around the
    // check). Its connection from before is left alone.
    let err = talks(&server, &old_orders).await;
    assert!(err.is_err());
    let refused = match Client::connect_with(old_config, server.addr).await {
        Ok(mut again) => again.request("x").await.is_err(),
        Err(_) => true,
    };
    assert!(refused);
    client.request("still open").await.unwrap();
    let fresh = scratch.identity(&ca, "fresh", "orders");
    talks(&server, &fresh).await.unwrap();

    // The old generation's keys are gone from the CA directory.
    assert!(!ca_dir.join("gen-1").exists());
    assert!(ca_dir.join("gen-2/intermediate.key").exists());
}
