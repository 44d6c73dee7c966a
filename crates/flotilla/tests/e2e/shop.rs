//! The reference shop through the gateway: browse, quote (a function's cold
//! start from zero), order, survive an instance's kill -9 and a restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use flotilla_testkit::{InstanceState, System};
use serde_json::{Value, json};

use crate::browser::Browser;
use crate::support::{client, flotilla, products, shop_manifest, sign_in};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browse_quote_and_order() {
    let system = System::start(shop_manifest()).await.expect("shop starts");
    let http = client();

    // Browse: the list, a search, one product, an unknown one.
    let list: Value = http
        .get(system.url("/api/catalog/products"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let all = products(&list);
    assert!(all.len() >= 10, "seeded catalog: {list}");
    let first = &all[0];
    let id = first["id"].as_str().expect("product id").to_string();
    let one = http
        .get(system.url(&format!("/api/catalog/products/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);
    assert_security_headers(&one);
    let missing = http
        .get(system.url("/api/catalog/products/no-such-sku"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let word = first["name"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_lowercase();
    let found: Value = http
        .get(system.url(&format!("/api/catalog/products?q={word}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        products(&found).iter().any(|p| p["id"] == first["id"]),
        "search `{word}`: {found}"
    );

    // Both replicas serve: the gateway balances over them.
    let mut served_by = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let r = http
            .get(system.url("/api/catalog/products?limit=1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        if let Some(v) = r.headers().get("x-served-by") {
            served_by.insert(v.to_str().unwrap().to_string());
        }
    }
    assert_eq!(
        served_by.len(),
        2,
        "both catalog replicas answer: {served_by:?}"
    );

    // Quote: pricing is a function, at zero until this request.
    let pricing = system
        .status()
        .services
        .into_iter()
        .find(|s| s.name == "pricing")
        .unwrap();
    assert_eq!(
        pricing.instances.len(),
        0,
        "pricing starts at zero: {pricing:?}"
    );
    let price = first["price_cents"].as_i64().expect("price_cents");
    let quote = http
        .post(system.url("/api/pricing/quote"))
        .json(&json!({"items": [{"sku": id, "quantity": 3, "unit_price_cents": price}], "currency": "EUR"}))
        .send().await.unwrap();
    assert_eq!(
        quote.status(),
        200,
        "quote held during cold start, not refused"
    );
    let quote: Value = quote.json().await.unwrap();
    assert!(quote["total_cents"].as_i64().unwrap() > 0, "{quote}");
    let pricing = system
        .status()
        .services
        .into_iter()
        .find(|s| s.name == "pricing")
        .unwrap();
    assert_eq!(pricing.ready, 1, "pricing scaled to one: {pricing:?}");

    // Orders need a signed-in user: without a token the gateway answers 401.
    let anonymous = http
        .post(system.url("/api/orders"))
        .json(&json!({"items": [{"sku": id, "quantity": 2}], "payment": {"card": "4242 4242 4242 4242"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    assert!(
        anonymous.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );

    // Sign up and in with the accounts service, order, read it back. The
    // order is placed in a trace of the client's.
    let token = sign_in(&http, system.gateway_url(), "e2e@example.com").await;
    let trace_id = "5c0ffee0e2e0000000000000000000a1";
    let placed = http
        .post(system.url("/api/orders"))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&json!({"items": [{"sku": id, "quantity": 2}], "payment": {"card": "4242 4242 4242 4242"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status(), 201);
    let order: Value = placed.json().await.unwrap();
    let order_id = order["id"].as_str().expect("order id");
    // One trace id joins the request's lines in every log: the gateway's
    // access log, the orders service's while it placed the order, and the
    // inventory service's while it handled the event that order published.
    for (log, line_of) in [
        ("gateway-access", "/api/orders"),
        ("orders-", "order placed"),
        ("inventory-", "order.placed handled"),
    ] {
        let found = logged_in_trace(system.data_dir(), log, trace_id, line_of).await;
        assert!(
            found,
            "no {log}* log line `{line_of}` with trace_id {trace_id}"
        );
    }
    assert!(order["total_cents"].as_i64().unwrap_or(0) > 0, "{order}");
    let back: Value = http
        .get(system.url(&format!("/api/orders/{order_id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(back["id"], order["id"]);
    let mine: Value = http
        .get(system.url("/api/orders"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mine = mine
        .as_array()
        .cloned()
        .or_else(|| mine["orders"].as_array().cloned())
        .unwrap_or_default();
    assert!(mine.iter().any(|o| o["id"] == order["id"]), "{mine:?}");

    // Another user cannot read it, even with a forged user header: the
    // gateway strips it and the token decides who you are.
    let other = sign_in(&http, system.gateway_url(), "other@example.com").await;
    for forge in [false, true] {
        let mut req = http
            .get(system.url(&format!("/api/orders/{order_id}")))
            .bearer_auth(&other);
        if forge {
            req = req.header("x-flotilla-user-id", order["customer"].as_str().unwrap());
        }
        assert_eq!(req.send().await.unwrap().status(), 404, "forged: {forge}");
    }

    // An unknown sku is refused by orders with a clear error.
    let bad = http
        .post(system.url("/api/orders"))
        .bearer_auth(&token)
        .json(&json!({"items": [{"sku": "no-such-sku", "quantity": 1}], "payment": {"card": "4242 4242 4242 4242"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);

    // Undeclared paths: JSON 404 from the gateway.
    let nothing = http
        .get(system.url("/api/nothing-here"))
        .send()
        .await
        .unwrap();
    assert_eq!(nothing.status(), 404);
    assert_security_headers(&nothing);
    let body: Value = nothing.json().await.unwrap();
    assert!(body["error"]["code"].is_string(), "{body}");

    // The web UI is served by the gateway.
    let page = http.get(system.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_security_headers(&page);
    assert!(page.text().await.unwrap().contains("<html"));

    // `[gateway] compression` in the shop's manifest: a browser's request
    // for the UI's script gets it gzipped, and the catalog's JSON too.
    for path in ["/app.js", "/api/catalog/products"] {
        let res = http
            .get(system.url(path))
            .header("accept-encoding", "gzip, deflate, br")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
        assert_eq!(
            res.headers()
                .get("content-encoding")
                .and_then(|v| v.to_str().ok()),
            Some("gzip"),
            "{path}"
        );
        assert_security_headers(&res);
        let zipped = res.bytes().await.unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&zipped[..]), &mut text)
            .unwrap();
        assert!(
            zipped.len() < text.len() / 2,
            "{path}: {} of {}",
            zipped.len(),
            text.len()
        );
        if path == "/app.js" {
            assert_eq!(
                text,
                std::fs::read_to_string(shop_manifest().with_file_name("web/app.js")).unwrap()
            );
        } else {
            let list: Value = serde_json::from_str(&text).unwrap();
            assert!(!products(&list).is_empty(), "{text}");
        }
    }

    system.stop().await;
}

/// `[gateway] response_headers` in the shop's manifest, on every response.
/// Whether, within a few seconds, a JSON line of a log in `data_dir`'s
/// `logs` whose file name starts with `log` has `trace_id` and names
/// `text` (its message, or the path of an access-log line).
async fn logged_in_trace(
    data_dir: &std::path::Path,
    log: &str,
    trace_id: &str,
    text: &str,
) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let logs = data_dir.join("logs");
    while std::time::Instant::now() < deadline {
        let files = std::fs::read_dir(&logs).into_iter().flatten().flatten();
        for file in files.filter(|f| f.file_name().to_string_lossy().starts_with(log)) {
            let text_of = std::fs::read_to_string(file.path()).unwrap_or_default();
            let found = text_of
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .any(|l| l["trace_id"] == trace_id && (l["message"] == text || l["path"] == text));
            if found {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn assert_security_headers(res: &reqwest::Response) {
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "same-origin"),
    ] {
        assert_eq!(
            res.headers().get(name).and_then(|v| v.to_str().ok()),
            Some(value),
            "{name} on {}",
            res.url()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_of_a_replica_loses_no_request() {
    let system = System::start(shop_manifest()).await.expect("shop starts");
    let http = client();
    let catalog = system
        .status()
        .services
        .into_iter()
        .find(|s| s.name == "catalog")
        .unwrap();
    assert_eq!(catalog.ready, 2);
    let victim = catalog.instances[0].clone();
    let pid = victim.pid.expect("pid") as i32;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failures, http, url) = (
            stop.clone(),
            ok.clone(),
            failures.clone(),
            http.clone(),
            system.url("/api/catalog/products?limit=2"),
        );
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match http.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => failures.lock().unwrap().push(format!("error {e}")),
                }
            }
        }));
    }
    // Let traffic flow, then kill -9 one replica mid-stream.
    let before = ok.load(Ordering::Relaxed);
    system
        .wait_for("traffic to flow", Duration::from_secs(10), |_| {
            ok.load(Ordering::Relaxed) > before + 50
        })
        .await;
    // SAFETY: kill(2) on a pid the runtime reported for this test's instance.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);

    let status = system
        .wait_for(
            "the killed replica to be restarted and ready",
            Duration::from_secs(30),
            |s| {
                let c = s.services.iter().find(|s| s.name == "catalog").unwrap();
                c.restarts >= 1
                    && c.ready == 2
                    && c.instances
                        .iter()
                        .all(|i| i.state == InstanceState::Ready && i.pid != Some(pid as u32))
            },
        )
        .await;
    let after = ok.load(Ordering::Relaxed);
    system
        .wait_for(
            "traffic on the restarted pool",
            Duration::from_secs(10),
            |_| ok.load(Ordering::Relaxed) > after + 50,
        )
        .await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} requests failed: {failures:?}",
        failures.len()
    );
    assert!(ok.load(Ordering::Relaxed) > 100);
    let restarted = status
        .services
        .iter()
        .find(|s| s.name == "catalog")
        .unwrap();
    assert!(restarted.instances.iter().any(|i| i.restarts >= 1));

    // The restart shows in `flotilla status`.
    let out = flotilla()
        .args(["status", "--json", "--data-dir"])
        .arg(system.data_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    let catalog = shown["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "catalog")
        .unwrap();
    assert!(catalog["restarts"].as_u64().unwrap() >= 1, "{catalog}");
    let out = flotilla()
        .args(["status", "--data-dir"])
        .arg(system.data_dir())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("catalog") && table.contains("restarts 1"),
        "{table}"
    );

    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_survive_down_then_up() {
    let system = System::start(shop_manifest()).await.expect("shop starts");
    let http = client();
    let list: Value = http
        .get(system.url("/api/catalog/products"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sku = products(&list)[1]["id"].as_str().unwrap().to_string();
    let token = sign_in(&http, system.gateway_url(), "durable@example.com").await;
    let placed: Value = http
        .post(system.url("/api/orders"))
        .bearer_auth(&token)
        .json(&json!({"items": [{"sku": sku, "quantity": 1}], "payment": {"card": "4242 4242 4242 4242"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = placed["id"].as_str().expect("order id").to_string();

    let system = system
        .restart()
        .await
        .expect("restarts on the same data dir");
    // The same token works after the restart: accounts kept its signing
    // key, and the new gateway fetched the key set again.
    let back = http
        .get(system.url(&format!("/api/orders/{id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(back.status(), 200);
    let back: Value = back.json().await.unwrap();
    assert_eq!(back["id"].as_str(), Some(id.as_str()));
    system.stop().await;
}

/// The web UI in a real browser: headless Chromium loads the page from the
/// gateway, runs its JavaScript (which calls the catalog through the
/// gateway) and the rendered DOM lists the products.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_lists_products_in_a_real_browser() {
    let Some(chromium) = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            std::process::Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
    else {
        flotilla_testkit::skip("no chromium on this machine", "apt-get install -y chromium");
        return;
    };
    let system = System::start(shop_manifest()).await.expect("shop starts");
    let list: Value = client()
        .get(system.url("/api/catalog/products"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<String> = products(&list)
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    let profile = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
        ])
        .args([
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(system.url("/"))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("chromium finishes")
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    let shown = names.iter().filter(|n| dom.contains(n.as_str())).count();
    assert!(
        shown >= 10,
        "the page shows {shown} of {} products; DOM:\n{dom}",
        names.len()
    );
    system.stop().await;
}

/// The shop as a customer uses it, in a real browser: create an account in
/// the UI (which signs in), put a product in the basket, wait for the quote,
/// place the order, and find it under "My orders", which lists the signed-in
/// user's orders (the gateway takes the user from the token, which is in an
/// HttpOnly cookie no script sees); reload and still be signed in; sign out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_signs_up_and_orders_in_a_real_browser() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let system = System::start(shop_manifest()).await.expect("shop starts");
    browser.goto(&system.url("/")).await;
    browser
        .wait_for(
            "the product list",
            "return document.querySelectorAll('#products .add-btn').length",
        )
        .await;

    // Lists whose answers come back out of order: the one asked for last
    // is shown. The page's fetch is wrapped so that a search's answer is
    // held until the list asked for after it has been shown.
    browser
        .eval(
            "const real = window.fetch;
             let release;
             const held = new Promise((resolve) => { release = resolve; });
             window.releaseStale = () => { window.fetch = real; release(); };
             window.fetch = async (url, init) => {
               const res = await real(url, init);
               if (!String(url).includes('q=mug')) return res;
               await held;
               const text = res.text.bind(res);
               res.text = async () => {
                 const body = await text();
                 // Runs after the page's own promise jobs for this answer.
                 setTimeout(() => { window.staleHandled = true; }, 0);
                 return body;
               };
               return res;
             };
             const q = document.getElementById('q');
             const search = document.getElementById('search');
             q.value = 'mug';
             search.requestSubmit();
             q.value = '';
             search.requestSubmit();
             return true",
        )
        .await;
    let latest = browser
        .wait_for(
            "the list asked for last",
            "return document.getElementById('catalog-status').textContent === ''
                 && document.getElementById('page-info').textContent",
        )
        .await;
    browser.eval("window.releaseStale(); return true").await;
    browser
        .wait_for(
            "the earlier search's answer, handled",
            "return window.staleHandled === true",
        )
        .await;
    let shown = browser
        .eval("return document.getElementById('page-info').textContent")
        .await;
    assert_eq!(
        shown, latest,
        "the earlier search's answer replaced the later list"
    );

    browser.click("#tab-sign-up").await;
    browser.type_into("#su-name", "Browser Customer").await;
    browser.type_into("#su-email", "browser@example.com").await;
    browser
        .type_into("#su-password", "correct horse battery staple")
        .await;
    browser.click("#su-submit").await;
    let who = browser
        .wait_for(
            "signed in",
            "return !document.getElementById('signed-in').hidden && document.getElementById('who').textContent",
        )
        .await;
    assert_eq!(who, "browser@example.com");

    browser.click("#products .add-btn").await;
    browser
        .wait_for(
            "a quote that enables the order button",
            "return !document.getElementById('place').disabled",
        )
        .await;
    // A change to the coupon (or the basket) makes that quote another
    // order's: placing is held until the quote of the order as it is now
    // comes back, or its total would be refused as price_changed. Back as
    // it was, the quote is the order's again.
    let held = browser
        .eval(
            "const coupon = document.getElementById('coupon');
             const place = document.getElementById('place');
             coupon.value = 'WELCOME10';
             coupon.dispatchEvent(new Event('input'));
             const changed = place.disabled;
             coupon.value = '';
             coupon.dispatchEvent(new Event('input'));
             return [changed, place.disabled]",
        )
        .await;
    assert_eq!(
        held,
        json!([true, false]),
        "Place order while the coupon changes"
    );
    browser.click("#place").await;
    let placed = browser
        .wait_for(
            "the order's confirmation",
            "const ok = document.getElementById('order-ok');
             const err = document.getElementById('order-error');
             if (!err.hidden) return 'error: ' + err.textContent;
             return !ok.hidden && ok.textContent",
        )
        .await;
    let placed = placed.as_str().unwrap_or_default().to_string();
    assert!(placed.starts_with("Thank you! Order "), "{placed}");
    let short_id = placed
        .trim_start_matches("Thank you! Order ")
        .split(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(short_id.len(), 8, "{placed}");

    // Placing refreshes "My orders"; the order is there, under this user.
    let mine = browser
        .wait_for(
            "the order under My orders",
            "return document.getElementById('orders').innerText",
        )
        .await;
    let mine = mine.as_str().unwrap_or_default();
    assert!(mine.contains(&short_id), "{short_id} not in:\n{mine}");

    // Review the product: signed in, the form is there; the review posted
    // (by the cookie's token) is read back at once through the gateway's
    // cached list.
    browser.click("#products .reviews summary").await;
    browser
        .wait_for(
            "the review form",
            "const c = document.querySelector('#products .card');
             const said = c.querySelector('.reviews-summary').textContent;
             return !c.querySelector('.review-form').hidden && said !== '' && said !== 'Loading…'",
        )
        .await;
    browser
        .type_into("#products .review-author", "Browser Customer")
        .await;
    browser
        .type_into("#products .review-text", "Arrived quickly, as ordered.")
        .await;
    browser.click("#products .review-submit").await;
    let reviews = browser
        .wait_for(
            "the posted review in the list",
            "const c = document.querySelector('#products .card');
             const err = c.querySelector('.review-error');
             if (!err.hidden) return 'error: ' + err.textContent;
             const t = c.querySelector('.review-list').innerText;
             return t.includes('Arrived quickly') && t",
        )
        .await;
    let reviews = reviews.as_str().unwrap_or_default();
    assert!(
        reviews.contains("Browser Customer: Arrived quickly, as ordered."),
        "{reviews}"
    );

    // The tokens are in HttpOnly cookies, out of any script's reach: the
    // page sees only when its session expires.
    let visible = browser
        .eval("return [document.cookie, JSON.stringify(sessionStorage), JSON.stringify(localStorage)].join(' | ')")
        .await;
    let visible = visible.as_str().unwrap_or_default().to_string();
    assert!(visible.contains("shop_session="), "{visible}");
    for secret in ["shop_at", "shop_rt", "eyJ", "refresh"] {
        assert!(
            !visible.contains(secret),
            "{secret} in what the page sees: {visible}"
        );
    }
    // A reload resumes the session from its cookies.
    browser.goto(&system.url("/")).await;
    let who = browser
        .wait_for(
            "signed in after a reload",
            "return !document.getElementById('signed-in').hidden && document.getElementById('who').textContent",
        )
        .await;
    assert_eq!(who, "browser@example.com");
    // The token cookies, seen where they are sent (WebDriver shows the
    // current page's): HttpOnly, and only from this site. The access
    // token authenticates a plain navigation too.
    browser.goto(&system.url("/api/accounts/me")).await;
    let me = browser.eval("return document.body.innerText").await;
    assert!(
        me.as_str()
            .unwrap_or_default()
            .contains("browser@example.com"),
        "{me}"
    );
    for name in ["shop_at", "shop_rt"] {
        let cookie = browser.cookie(name).await;
        assert_eq!(cookie["httpOnly"], true, "{cookie}");
        assert_eq!(cookie["sameSite"], "Strict", "{cookie}");
    }
    // The access token gone (as after its 15 minutes): the page's refused
    // call refreshes the session from the refresh token's cookie.
    browser.delete_cookie("shop_at").await;
    browser.goto(&system.url("/")).await;
    let who = browser
        .wait_for(
            "signed in again through a refresh",
            "return !document.getElementById('signed-in').hidden && document.getElementById('who').textContent",
        )
        .await;
    assert_eq!(who, "browser@example.com");
    browser.click("#refresh-orders").await;
    let mine = browser
        .wait_for(
            "My orders after the refresh",
            "const err = document.getElementById('orders-error');
             if (!err.hidden) return 'error: ' + err.textContent;
             const t = document.getElementById('orders').innerText; return t.length > 0 && t",
        )
        .await;
    let mine = mine.as_str().unwrap_or_default();
    assert!(mine.contains(&short_id), "{short_id} not in:\n{mine}");
    // A basket kept from before a price change (unit prices the catalog
    // no longer has): the order is refused as price_changed, and the page
    // re-reads every line from the catalog, all at once and without their
    // reviews (which would cost the catalog a call to reviews each), then
    // quotes it again.
    browser
        .eval(
            "localStorage.setItem('flotilla-shop-basket', JSON.stringify([
               {sku: 'sku-mug', name: 'Mug', unit_price_cents: 1, currency: 'EUR', stock: 5, quantity: 1},
               {sku: 'sku-kettle', name: 'Kettle', unit_price_cents: 1, currency: 'EUR', stock: 5, quantity: 1}]));
             return true",
        )
        .await;
    browser.goto(&system.url("/")).await;
    browser
        .wait_for(
            "the kept basket quoted",
            "return !document.getElementById('signed-in').hidden
                 && !document.getElementById('place').disabled",
        )
        .await;
    browser
        .eval(
            "const real = window.fetch;
             let open = 0;
             window.catalogReads = [];
             window.catalogAtOnce = 0;
             window.fetch = async (url, init) => {
               if (!String(url).startsWith('api/catalog/products/')) return real(url, init);
               window.catalogReads.push(String(url));
               open += 1;
               window.catalogAtOnce = Math.max(window.catalogAtOnce, open);
               try {
                 return await real(url, init);
               } finally {
                 open -= 1;
               }
             };
             return true",
        )
        .await;
    browser.click("#place").await;
    let refused = browser
        .wait_for(
            "price_changed, then the basket quoted again",
            "const err = document.getElementById('order-error');
             return !err.hidden && !document.getElementById('place').disabled
                 && window.catalogReads.length === 2 && err.textContent",
        )
        .await;
    assert!(
        refused
            .as_str()
            .is_some_and(|t| t.contains("the total is now")),
        "{refused}"
    );
    let reads = browser
        .eval("return [window.catalogReads, window.catalogAtOnce]")
        .await;
    assert_eq!(
        reads,
        json!([
            [
                "api/catalog/products/sku-mug?reviews=false",
                "api/catalog/products/sku-kettle?reviews=false"
            ],
            2
        ]),
        "the basket's lines read from the catalog, and how many at once"
    );
    // Signing out clears the cookies: a reload finds no session.
    browser.click("#sign-out").await;
    browser
        .wait_for(
            "the session cookie cleared",
            "return !document.getElementById('signed-out').hidden && !document.cookie.includes('shop_session')",
        )
        .await;
    browser.goto(&system.url("/")).await;
    browser
        .wait_for(
            "the product list after signing out",
            "return document.querySelectorAll('#products .add-btn').length",
        )
        .await;
    let state = browser
        .eval("return document.getElementById('signed-in').hidden")
        .await;
    assert_eq!(state, true, "signed out after a reload");

    browser.close().await;
    system.stop().await;
}
