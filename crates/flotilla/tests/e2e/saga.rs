//! The shop's order saga end to end: orders → (outbox) → broker → inventory
//! → payments → orders, with notifications (a pull consumer) and analytics
//! (a stream consumer group) watching, every hop over the mesh.

use std::time::{Duration, Instant};

use flotilla_testkit::System;
use serde_json::{Value, json};

use crate::support::{client, shop_manifest, sign_in};

const GOOD_CARD: &str = "4242 4242 4242 4242";
const DECLINED_CARD: &str = "4000 0000 0000 0002";
/// How long a saga may take end to end on a busy 2-core machine.
const SAGA: Duration = Duration::from_secs(60);

struct Shop {
    system: System,
    http: reqwest::Client,
    token: String,
}

impl Shop {
    async fn start(user: &str) -> Shop {
        let system = System::start(shop_manifest()).await.expect("shop starts");
        let http = client();
        let token = sign_in(&http, system.gateway_url(), user).await;
        Shop {
            system,
            http,
            token,
        }
    }

    async fn get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(self.system.url(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        r.json().await.unwrap()
    }

    /// Places an order; returns its id after checking it starts `placed`.
    async fn order(&self, sku: &str, quantity: u32, card: &str) -> String {
        let r = self
            .http
            .post(self.system.url("/api/orders"))
            .bearer_auth(&self.token)
            .json(&json!({
                "items": [{"sku": sku, "quantity": quantity}],
                "payment": {"card": card},
            }))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 201, "place order: {body}");
        assert_eq!(body["status"], "placed", "{body}");
        assert!(
            !body.to_string().contains(&card.replace(' ', "")),
            "the card number never comes back: {body}"
        );
        body["id"].as_str().expect("order id").to_string()
    }

    /// Waits until `f` returns `Some` on the JSON at `path`, polling.
    async fn until<T>(&self, what: &str, path: &str, f: impl Fn(&Value) -> Option<T>) -> T {
        let deadline = Instant::now() + SAGA;
        loop {
            let v = self.get(path).await;
            if let Some(t) = f(&v) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last {path}: {v}; logs in {}",
                self.system.data_dir().display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the order to leave `placed`; its final state.
    async fn settled(&self, id: &str) -> Value {
        self.until(
            &format!("order {id} to settle"),
            &format!("/api/orders/{id}"),
            |o| (o["status"] != "placed").then(|| o.clone()),
        )
        .await
    }

    async fn available(&self, sku: &str) -> i64 {
        self.get(&format!("/api/inventory/{sku}")).await["available"]
            .as_i64()
            .expect("available")
    }

    /// The pid of `service`'s instance, once it runs: one killed a moment
    /// ago may still be restarting.
    async fn pid(&self, service: &str) -> i32 {
        let running = |s: &flotilla_runtime::Status| {
            s.services
                .iter()
                .find(|s| s.name == service)
                .and_then(|s| s.instances.first())
                .and_then(|i| i.pid)
        };
        let status = self
            .system
            .wait_for(&format!("{service} to run"), SAGA, |s| running(s).is_some())
            .await;
        running(&status).expect("running") as i32
    }
}

fn notifications(v: &Value) -> Vec<Value> {
    v.as_array()
        .or_else(|| v["notifications"].as_array())
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_saga_confirms_cancels_and_compensates() {
    let shop = Shop::start("saga@example.com").await;

    // Happy path: reserved, charged, confirmed; the customer is notified
    // and the sale shows up in analytics.
    let mugs = shop.available("sku-mug").await;
    let id = shop.order("sku-mug", 2, GOOD_CARD).await;
    let order = shop.settled(&id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(shop.available("sku-mug").await, mugs - 2);
    // The catalog's stock figure follows inventory's events (queue
    // catalog-stock).
    shop.until(
        "the catalog's mug stock to follow inventory",
        "/api/catalog/products/sku-mug",
        |p| (p["stock"].as_i64() == Some(mugs - 2)).then_some(()),
    )
    .await;
    shop.until("the confirmation notice", "/api/notifications", |v| {
        notifications(v)
            .iter()
            .any(|n| n.to_string().contains(&id) && n.to_string().contains("confirmed"))
            .then_some(())
    })
    .await;
    shop.until("the sale in analytics", "/api/analytics/sales", |v| {
        v.to_string().contains("sku-mug").then_some(())
    })
    .await;
    // The same figures for a partner's system, with its API key only.
    let partner = shop.system.url("/partner/api/analytics/sales");
    let keyed = shop
        .http
        .get(&partner)
        .header("x-api-key", "flk_shop-demo-partner")
        .send()
        .await
        .unwrap();
    assert_eq!(keyed.status(), 200);
    assert!(keyed.text().await.unwrap().contains("sku-mug"));
    let anonymous = shop.http.get(&partner).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);

    // A declined card: cancelled, and the reserved stock is released again.
    let kettles = shop.available("sku-kettle").await;
    let id = shop.order("sku-kettle", 1, DECLINED_CARD).await;
    let order = shop.settled(&id).await;
    assert_eq!(order["status"], "cancelled", "{order}");
    assert_eq!(order["reason"], "payment_declined", "{order}");
    shop.until(
        "the kettle to be released",
        "/api/inventory/sku-kettle",
        |v| (v["available"].as_i64() == Some(kettles)).then_some(()),
    )
    .await;
    // The catalog's figure is back too, and from the release itself (the
    // version inventory is at), not from before the reservation.
    let version = shop.get("/api/inventory/sku-kettle").await["version"]
        .as_i64()
        .expect("version");
    assert!(version >= 2, "reserved and released: version {version}");
    shop.until(
        "the catalog's kettle stock to be back",
        "/api/catalog/products/sku-kettle",
        |p| {
            (p["stock"].as_i64() == Some(kettles) && p["stock_version"].as_i64() == Some(version))
                .then_some(())
        },
    )
    .await;
    shop.until("the cancellation notice", "/api/notifications", |v| {
        notifications(v)
            .iter()
            .any(|n| n.to_string().contains(&id) && n.to_string().contains("cancelled"))
            .then_some(())
    })
    .await;

    // Out of stock (the chai is sold out): cancelled, nothing charged or
    // reserved.
    let id = shop.order("sku-chai", 1, GOOD_CARD).await;
    let order = shop.settled(&id).await;
    assert_eq!(order["status"], "cancelled", "{order}");
    assert_eq!(order["reason"], "out_of_stock", "{order}");
    assert_eq!(shop.available("sku-chai").await, 0);

    shop.system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_completes_when_a_consumer_is_killed_mid_saga() {
    let shop = Shop::start("crash@example.com").await;
    let croissants = shop.available("sku-croissant").await;

    // kill -9 payments and inventory while orders are in flight: the
    // broker redelivers what they had not acknowledged once the runtime has
    // restarted them, and their inboxes drop what they had already done.
    let mut ids = Vec::new();
    for round in 0..3 {
        ids.push(shop.order("sku-croissant", 1, GOOD_CARD).await);
        let victim = if round % 2 == 0 {
            "payments"
        } else {
            "inventory"
        };
        let pid = shop.pid(victim).await;
        // SAFETY: kill(2) on a pid the runtime reported for this test's
        // instance.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        ids.push(shop.order("sku-croissant", 1, GOOD_CARD).await);
    }
    for id in &ids {
        let order = shop.settled(id).await;
        assert_eq!(order["status"], "confirmed", "{order}");
    }
    // Exactly once in effect: stock went down by one per order, and one
    // notice per order.
    assert_eq!(
        shop.available("sku-croissant").await,
        croissants - ids.len() as i64
    );
    let all = shop
        .until("a notice per order", "/api/notifications", |v| {
            let n = notifications(v);
            ids.iter()
                .all(|id| n.iter().any(|m| m.to_string().contains(id.as_str())))
                .then_some(n)
        })
        .await;
    for id in &ids {
        let count = all
            .iter()
            .filter(|m| m.to_string().contains(id.as_str()))
            .count();
        assert_eq!(count, 1, "one notice for {id}: {all:?}");
    }

    shop.system.stop().await;
}
