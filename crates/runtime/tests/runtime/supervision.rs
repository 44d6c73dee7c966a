//! Restarts with backoff, crash loops, endpoints.json, one system per data dir.

use std::time::Duration;

use flotilla_manifest::Manifest;
use flotilla_runtime::{Endpoints, Error, InstanceState, Options, System};

use crate::support::{client, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_service_backs_off_and_is_reported_as_a_crash_loop() {
    // Each start appends the time it began, in nanoseconds.
    let record = tempfile::tempdir().unwrap();
    let starts = record.path().join("starts");
    let h = start(&format!(
        r#"[services.flaky]
run = {{ command = ["sh", "-c", "date +%s%N >> {}; echo starting; exit 1"] }}
routes = [{{ path = "/flaky/**" }}]
[services.ok]
run = {{ command = ["python3", "HELLO"] }}
"#,
        starts.display()
    ))
    .await;
    h.wait(
        "a crash loop to be reported",
        Duration::from_secs(20),
        |h| h.service("flaky").crash_loop,
    )
    .await;
    let flaky = h.service("flaky");
    assert!(flaky.restarts >= 5, "{flaky:?}");
    assert!(
        flaky
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("exit code 1"),
        "{flaky:?}"
    );
    // Backoff: the wait before the n-th restart is at least 100 ms ×
    // 2^(n-1), so each gap between starts is at least that (lower bounds
    // only: a loaded machine only makes the gaps longer).
    let stamps: Vec<u128> = std::fs::read_to_string(&starts)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert!(stamps.len() >= 5, "{stamps:?}");
    for (n, pair) in stamps.windows(2).take(4).enumerate() {
        let gap = Duration::from_nanos((pair[1] - pair[0]) as u64);
        let backoff = Duration::from_millis(100 << n);
        assert!(
            gap >= backoff,
            "restart {} came {gap:?} after the start before it, not after a backoff of at least {backoff:?}: {stamps:?}",
            n + 1
        );
    }
    assert_eq!(
        h.service("ok").ready,
        1,
        "the healthy service is unaffected"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_whose_instances_all_fail_readiness_answers_503_at_once() {
    let flags = tempfile::tempdir().unwrap();
    let unready = flags.path().join("unready");
    let h = start(&format!(
        r#"[services.hello]
run = {{ command = ["python3", "HELLO"] }}
env = {{ UNREADY_FILE = "{}" }}
routes = [{{ path = "/hello/**", timeout = "5m" }}]
"#,
        unready.display()
    ))
    .await;
    let http = client();
    let url = format!("{}/hello/x", h.gateway());
    assert_eq!(http.get(&url).send().await.unwrap().status(), 200);

    // Its only instance keeps running but fails /readyz: out of rotation.
    std::fs::write(&unready, "").unwrap();
    h.wait(
        "the instance to be out of rotation",
        Duration::from_secs(15),
        |h| {
            let s = h.service("hello");
            s.instances.len() == 1 && s.instances[0].state == InstanceState::Unready
        },
    )
    .await;
    // Answered 503, not held for the route's five minutes (the client
    // gives up after 20 s).
    let refused = http
        .get(&url)
        .send()
        .await
        .expect("answered, not held until the route's timeout");
    assert_eq!(refused.status(), 503);
    let body: serde_json::Value = serde_json::from_str(&refused.text().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "no_ready_instance", "{body}");

    // Back in rotation once it answers again.
    std::fs::remove_file(&unready).unwrap();
    h.wait(
        "the instance back in rotation",
        Duration::from_secs(15),
        |h| h.service("hello").ready == 1,
    )
    .await;
    assert_eq!(http.get(&url).send().await.unwrap().status(), 200);
    h.stop().await;
}

/// Whether process `pid` runs (a zombie does not).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name's closing parenthesis.
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// What a crashed instance started in its process group (a master's
/// workers, a wrapper's helpers) goes with it, as systemd stops what is
/// left of a unit: it would keep its files, and print under the old name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_crashed_instance_started_goes_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let helper = dir.path().join("helper.pid");
    let h = start(&format!(
        r#"[services.parent]
run = {{ command = ["sh", "-c", "sleep 600 & echo $! > {}; exec python3 HELLO"] }}
"#,
        helper.display()
    ))
    .await;
    let pid = h.service("parent").instances[0].pid.expect("its pid");
    let helper_pid: u32 = std::fs::read_to_string(&helper)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(running(helper_pid), "the helper runs");
    // SAFETY: kill(2) of the instance's own process, as a crash.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
    h.wait("the crash seen", Duration::from_secs(20), |h| {
        h.service("parent").restarts >= 1
    })
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while running(helper_pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the crashed instance's helper {helper_pid} still runs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.stop().await;
}

/// A wrapper (`sh -c`, `npm start`) exits at once on SIGTERM; the server
/// it started still gets the service's `drain` to finish, not a SIGKILL
/// as soon as the wrapper is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapped_server_gets_its_drain_when_the_wrapper_exits_first() {
    let dir = tempfile::tempdir().unwrap();
    let drained = dir.path().join("drained");
    let h = start(&format!(
        r#"[services.wrapped]
run = {{ command = ["sh", "-c", "python3 HELLO & wait"] }}
env = {{ DRAIN_MS = "700", DRAINED_FILE = "{}" }}
drain = "20s"
"#,
        drained.display()
    ))
    .await;
    assert_eq!(h.service("wrapped").ready, 1);
    h.stop().await;
    assert!(
        drained.exists(),
        "the server was killed before it finished draining"
    );
}

/// A program that crashes three seconds after each start is ready every time:
/// its failures still count in a row (until a run lasts 10 s), so its
/// restarts back off and it is reported as a crash loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_crashes_soon_after_it_is_ready_is_a_crash_loop() {
    let h = start(
        r#"[services.brief]
run = { command = ["sh", "-c", "python3 HELLO & p=$!; sleep 3; kill $p; wait $p; exit 3"] }
routes = [{ path = "/brief/**" }]
"#,
    )
    .await;
    h.wait(
        "a crash loop to be reported",
        Duration::from_secs(60),
        |h| h.service("brief").crash_loop,
    )
    .await;
    let brief = h.service("brief");
    assert!(brief.restarts >= 5, "{brief:?}");
    let why = brief.last_error.as_deref().unwrap_or("");
    // Each run was ready (not "exited during start"), then crashed.
    assert!(
        why.contains("exit code 3") && !why.contains("during start"),
        "{brief:?}"
    );
    h.stop().await;
}

/// A process that hangs (a deadlock) neither exits nor recovers: once it
/// has failed `/readyz` and `/healthz` for its `liveness_timeout` it is
/// restarted, as by Kubernetes' liveness probe. One that fails only
/// `/readyz` (waiting for its database, say) is alive, and kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_instance_is_restarted_and_a_merely_unready_one_is_kept() {
    let flags = tempfile::tempdir().unwrap();
    let hung = flags.path().join("hung");
    let unready = flags.path().join("unready");
    let h = start(&format!(
        r#"[services.stuck]
run = {{ command = ["python3", "HELLO"] }}
env = {{ HUNG_FILE = "{}" }}
liveness_timeout = "3s"
routes = [{{ path = "/stuck/**" }}]
[services.waiting]
run = {{ command = ["python3", "HELLO"] }}
env = {{ UNREADY_FILE = "{}" }}
liveness_timeout = "3s"
"#,
        hung.display(),
        unready.display()
    ))
    .await;
    let http = client();
    let url = format!("{}/stuck/x", h.gateway());
    assert_eq!(http.get(&url).send().await.unwrap().status(), 200);

    std::fs::write(&unready, "").unwrap();
    std::fs::write(&hung, "").unwrap();
    h.wait(
        "the hung instance restarted",
        Duration::from_secs(60),
        |h| h.service("stuck").restarts >= 1,
    )
    .await;
    let stuck = h.service("stuck");
    let why = stuck.last_error.as_deref().unwrap_or("");
    assert!(
        why.contains("hung") && why.contains("/healthz") && why.contains("liveness_timeout"),
        "{stuck:?}"
    );
    // Failing /readyz as long, but answering /healthz: kept.
    let waiting = h.service("waiting");
    assert_eq!(waiting.restarts, 0, "{waiting:?}");
    assert_eq!(
        waiting.instances[0].state,
        InstanceState::Unready,
        "{waiting:?}"
    );

    // The new instance serves once it answers.
    std::fs::remove_file(&hung).unwrap();
    h.wait(
        "the restarted instance ready",
        Duration::from_secs(30),
        |h| h.service("stuck").ready == 1,
    )
    .await;
    assert_eq!(http.get(&url).send().await.unwrap().status(), 200);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_whose_last_start_failed_answers_503_while_it_starts_again() {
    // Three starts exit, then one that never becomes ready and is given
    // five minutes to.
    let counter = tempfile::tempdir().unwrap();
    let count = counter.path().join("starts");
    let h = start(&format!(
        r#"[services.hello]
run = {{ command = ["sh", "-c", "n=$(cat {count} 2>/dev/null || echo 0); echo $((n + 1)) > {count}; [ $n -ge 3 ] && exec python3 HELLO; echo cannot start; exit 1"] }}
env = {{ NEVER_READY = "1" }}
ready_timeout = "5m"
routes = [{{ path = "/hello/**", timeout = "5m" }}]
"#,
        count = count.display()
    ))
    .await;
    h.wait("the fourth start to run", Duration::from_secs(20), |h| {
        let s = h.service("hello");
        s.restarts >= 3
            && s.instances.len() == 1
            && s.instances[0].state == InstanceState::Starting
            && s.instances[0].pid.is_some()
    })
    .await;
    let refused = client()
        .get(format!("{}/hello/x", h.gateway()))
        .send()
        .await
        .expect("answered, not held until the route's timeout");
    assert_eq!(refused.status(), 503);
    let body: serde_json::Value = serde_json::from_str(&refused.text().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "no_ready_instance", "{body}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_for_a_crashed_instance_to_start_again() {
    let h = start(
        r#"[services.hello]
run = { command = ["python3", "HELLO"] }
routes = [{ path = "/hello/**" }]
"#,
    )
    .await;
    let pid = h.service("hello").instances[0].pid.unwrap();
    // SAFETY: kill(2) on a pid this test's runtime reported.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    h.wait(
        "the runtime to see the crash",
        Duration::from_secs(15),
        |h| h.service("hello").restarts >= 1,
    )
    .await;
    // Its only instance was ready before it crashed: the request waits
    // for it to start again rather than being refused.
    let r = client()
        .get(format!("{}/hello/x", h.gateway()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_json_tracks_instances_and_a_second_system_is_refused() {
    let h = start(
        r#"[services.hello]
run = { command = ["python3", "HELLO"] }
replicas = 2
routes = [{ path = "/**" }]
"#,
    )
    .await;
    let data = h.system().data_dir().to_path_buf();
    let endpoints = Endpoints::read(&data).unwrap();
    assert_eq!(endpoints.system, "rt");
    assert_eq!(endpoints.services["hello"].instances.len(), 2);
    assert_eq!(endpoints.gateway, h.gateway());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(Endpoints::path(&data))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "it holds the control token");
    let mode = std::fs::metadata(&data).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "the data dir is its owner's alone");

    // Requests reach both replicas.
    let http = client();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let r = http.get(format!("{}/x", h.gateway())).send().await.unwrap();
        seen.insert(r.headers()["x-served-by"].to_str().unwrap().to_string());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // A second system on the same data dir is refused by name, by the
    // data dir's lock, before it touches anything.
    let manifest = Manifest::load(&h.dir.path().join("flotilla.toml")).unwrap();
    let mut options = Options::new(&data);
    options.listen = Some(([127, 0, 0, 1], 0).into());
    match System::start(manifest, options).await {
        Err(e @ Error::DataDirInUse { .. }) => {
            let e = e.to_string();
            assert!(e.contains("flotilla down"), "{e}");
            assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("a second system started on a running data dir"),
    }

    // Killing an instance: endpoints.json drops it, then has it back.
    let pid = endpoints.services["hello"].instances[0].pid as i32;
    // SAFETY: kill(2) on a pid this test's runtime reported.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    h.wait(
        "the instance to be restarted",
        Duration::from_secs(15),
        |h| {
            let s = h.service("hello");
            s.ready == 2 && s.restarts >= 1
        },
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = Endpoints::read(&data).unwrap();
        let pids: Vec<u32> = now.services["hello"]
            .instances
            .iter()
            .map(|i| i.pid)
            .collect();
        if pids.len() == 2 && !pids.contains(&(pid as u32)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "endpoints.json not updated: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The data dir outlives the stop: it is the harness's temp dir.
    let dir = h.stop_keeping_dir().await;
    assert!(data.starts_with(dir.path()), "{}", data.display());
    if Endpoints::path(&data).exists() || !data.exists() {
        let kept = dir.keep();
        panic!(
            "endpoints.json is not removed (or the data dir is) on a clean stop; kept at {}",
            kept.display()
        );
    }
}
