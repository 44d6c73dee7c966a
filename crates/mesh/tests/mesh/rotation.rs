//! Leaf rotation without restarts: certificates that live a few seconds,
//! re-issued at 70 % of their life and reloaded from disk, under steady
//! traffic over new connections and one long-lived connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use flotilla_mesh::{Ca, ExpectedPeer, Identity, IdentityFiles, Leaf, client_config};

use crate::support::{Client, Scratch, Server};

const LIFETIME: Duration = Duration::from_secs(3);
/// Long enough for every original certificate to expire twice over.
const TRAFFIC: Duration = Duration::from_secs(8);

/// Re-issues each identity when its leaf reaches `renew_at`, until stopped.
async fn rotate(
    ca: Arc<Ca>,
    mut leaves: Vec<(String, IdentityFiles, Leaf)>,
    stop: Arc<AtomicBool>,
    rotations: Arc<AtomicU64>,
) {
    while !stop.load(Ordering::Acquire) {
        let (i, due) = leaves
            .iter()
            .enumerate()
            .map(|(i, (_, _, leaf))| (i, leaf.renew_at()))
            .min_by_key(|(_, due)| *due)
            .expect("at least one leaf");
        // A schedule, not a synchronisation: renewal is due at a time.
        let wait = due
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_millis(100));
        tokio::time::sleep(wait).await;
        if SystemTime::now() < due {
            continue;
        }
        let (service, files, leaf) = &mut leaves[i];
        let ca = ca.clone();
        let name = service.clone();
        let next = tokio::task::spawn_blocking(move || ca.issue_leaf(&name, LIFETIME))
            .await
            .unwrap()
            .unwrap();
        let files_for_write = files.clone();
        let written = next.clone();
        tokio::task::spawn_blocking(move || written.write(&files_for_write))
            .await
            .unwrap()
            .unwrap();
        *leaf = next;
        rotations.fetch_add(1, Ordering::AcqRel);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaf_rotation_under_traffic_drops_nothing() {
    let scratch = Scratch::new();
    let ca = Arc::new(scratch.ca("ca", "shop"));
    let catalog_leaf = ca.issue_leaf("catalog", LIFETIME).unwrap();
    let orders_leaf = ca.issue_leaf("orders", LIFETIME).unwrap();
    let first_expiry = catalog_leaf.not_after.min(orders_leaf.not_after);
    let catalog_files = scratch.install("catalog", &catalog_leaf);
    let orders_files = scratch.install("orders", &orders_leaf);
    let catalog = Identity::load(catalog_files.clone()).unwrap();
    let orders = Identity::load(orders_files.clone()).unwrap();
    let _catalog_reloader = catalog.spawn_reloader(Duration::from_millis(50));
    let _orders_reloader = orders.spawn_reloader(Duration::from_millis(50));

    let server = Server::echo(&catalog).await;
    let config = client_config(&orders, ExpectedPeer::service("catalog")).unwrap();
    let mut long_lived = Client::connect_with(config.clone(), server.addr)
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let rotations = Arc::new(AtomicU64::new(0));
    let rotator = tokio::spawn(rotate(
        ca.clone(),
        vec![
            ("catalog".into(), catalog_files, catalog_leaf),
            ("orders".into(), orders_files, orders_leaf),
        ],
        stop.clone(),
        rotations.clone(),
    ));

    let started = tokio::time::Instant::now();
    let (mut new_ok, mut long_ok, mut after_first_expiry) = (0u64, 0u64, 0u64);
    let mut failures = Vec::new();
    while started.elapsed() < TRAFFIC {
        match Client::connect_with(config.clone(), server.addr).await {
            Ok(mut client) => match client.request("new").await {
                Ok(_) => {
                    new_ok += 1;
                    if SystemTime::now() > first_expiry {
                        after_first_expiry += 1;
                    }
                }
                Err(e) => failures.push(format!("request on a new connection: {e}")),
            },
            Err(e) => failures.push(format!(
                "new connection: {}",
                flotilla_mesh::tls::error_chain(&e)
            )),
        }
        match long_lived.request("long").await {
            Ok(answer) => {
                assert_eq!(answer, "spiffe://shop.flotilla/ns/local/svc/orders long");
                long_ok += 1;
            }
            Err(e) => failures.push(format!("long-lived connection: {e}")),
        }
        // Steady, not flat-out: two cores are shared with other builds.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Release);
    rotator.await.unwrap();

    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        failures.first()
    );
    // Both sides rotated at least twice and picked it up from disk.
    assert!(rotations.load(Ordering::Acquire) >= 4, "{rotations:?}");
    assert!(catalog.loads() >= 3, "catalog loaded {}", catalog.loads());
    assert!(orders.loads() >= 3, "orders loaded {}", orders.loads());
    // New connections kept succeeding after the first certificates had
    // expired: they were made with the re-issued ones.
    assert!(after_first_expiry > 10, "{after_first_expiry} of {new_ok}");
    assert!(long_ok > 50, "{long_ok}");
    assert!(catalog.not_after() > first_expiry);
}
