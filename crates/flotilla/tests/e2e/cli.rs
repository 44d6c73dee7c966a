//! The `flotilla` binary: `check`'s messages, `up`/`status`/`down` on a real
//! system, HTTPS at its gateway, a port already in use, and no orphans
//! after `kill -9 flotilla`.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{flotilla, shop_manifest};

fn check(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.toml");
    std::fs::write(&path, text).unwrap();
    let out = flotilla().arg("check").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).replace(
        &format!("{}/", dir.path().canonicalize().unwrap().display()),
        "",
    );
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn check_accepts_the_shop() {
    let out = flotilla()
        .arg("check")
        .arg(shop_manifest())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "ok — system `shop` with 9 services and 16 routes; 3 topics, 16 queues, 1 stream"
        ),
        "{stdout}"
    );
}

/// The messages docs/manifest.md shows, exactly.
#[test]
fn check_prints_the_documented_messages() {
    let docs = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/manifest.md"),
    )
    .unwrap();
    let cases = [
        (
            "name = \"shop\"\n[services.catalog]\nrun = { cargo = \"shop-catalog\" }\nreplica = 2\n",
            "error: unknown key `replica`\n  --> flotilla.toml:4:1\n  |\n4 | replica = 2\n  | ^^^^^^^\n  = help: did you mean `replicas`?\n\n1 error in manifest",
        ),
        (
            "name = \"shop\"\n[services.orders]\nrun = { cargo = \"shop-orders\" }\ncalls = [\"pricng\"]\n[services.pricing]\nrun = { cargo = \"shop-pricing\" }\n",
            "error: `orders` calls `pricng`, which is not a service of this system\n  --> flotilla.toml:4:10\n  |\n4 | calls = [\"pricng\"]\n  |          ^^^^^^^^\n  = help: did you mean `pricing`?\n\n1 error in manifest",
        ),
        (
            "name = \"shop\"\n[services.a]\nrun = { cargo = \"a\" }\nroutes = [{ path = \"/api/**\" }]\n[services.b]\nrun = { cargo = \"b\" }\nroutes = [{ path = \"/api/**\", methods = [\"GET\"] }]\n",
            "error: route `/api/**` is also declared by service `a` for the same methods\n  --> flotilla.toml:7:20\n  |\n7 | routes = [{ path = \"/api/**\", methods = [\"GET\"] }]\n  |                    ^^^^^^^^^\n  = help: give each route its own path or hosts, or split the methods between them\n\n1 error in manifest",
        ),
        (
            "name = \"shop\"\n[services.catalog]\nrun = { cargo = \"shop-catalog\" }\nacl = [{ caller = \"ordres\", path = \"/api/catalog/**\", methods = [\"GET\"] }]\n[services.orders]\nrun = { cargo = \"shop-orders\" }\ncalls = [\"catalog\"]\n",
            "error: ACL rule names `ordres`, which is not a service of this system\n  --> flotilla.toml:4:19\n  |\n4 | acl = [{ caller = \"ordres\", path = \"/api/catalog/**\", methods = [\"GET\"] }]\n  |                   ^^^^^^^^\n  = help: did you mean `orders`?\n\n1 error in manifest",
        ),
        (
            "name = \"shop\"\n[services.pricing]\nshape = \"fucntion\"\nrun = { cargo = \"shop-pricing\" }\n",
            "error: unknown shape `fucntion`\n  --> flotilla.toml:3:9\n  |\n3 | shape = \"fucntion\"\n  |         ^^^^^^^^^^\n  = help: did you mean `shape = \"function\"`?\n\n1 error in manifest",
        ),
        (
            "name = \"shop\"\n[services.catalog]\nrun = { cargo = \"shop-catalog\" }\nreplicas = 0\n",
            "error: `replicas = 0` is out of range\n  --> flotilla.toml:4:12\n  |\n4 | replicas = 0\n  |            ^\n  = help: use a whole number from 1 to 64\n\n1 error in manifest",
        ),
        (
            "name = \"shop\"\n[topics.orders]\n[services.orders]\nrun = { cargo = \"shop-orders\" }\npublishes = [\"order\"]\n",
            "error: `orders` publishes to `order`, which is not a topic of this system\n  --> flotilla.toml:5:14\n  |\n5 | publishes = [\"order\"]\n  |              ^^^^^^^\n  = help: did you mean `orders`?\n\n1 error in manifest",
        ),
        (
            "name = \"shop\"\n[topics.orders]\n[queues.inventory-orders]\nsubscribe = { topic = \"orders\" }\ndeliver = { to = \"inventory\", path = \"/events/orders\" }\n[services.inventory]\nrun = { cargo = \"shop-inventory\" }\n[services.reports]\nrun = { cargo = \"shop-reports\" }\nconsumes = [\"inventory-orders\"]\n",
            "error: `reports` consumes queue `inventory-orders`, whose `deliver` pushes it to `inventory`\n  --> flotilla.toml:10:13\n   |\n10 | consumes = [\"inventory-orders\"]\n   |             ^^^^^^^^^^^^^^^^^^\n  = help: a queue is either pushed (`deliver`) or pulled (`consumes`): remove one, or give `reports` a queue of its own subscribed to the same topic\n\n1 error in manifest",
        ),
        (
            "name = \"shop\"\n[topics.orders]\n[queues.inventory-orders]\nsubscribe = { topic = \"orders\", filter = { type = \"order.placed\" } }\ndeliver = { to = \"inventory\", path = \"/events/orders\" }\n[services.inventory]\nrun = { cargo = \"shop-inventory\" }\n",
            "error: the filter on `type` must be an array of conditions, not a string\n  --> flotilla.toml:4:51\n  |\n4 | subscribe = { topic = \"orders\", filter = { type = \"order.placed\" } }\n  |                                                   ^^^^^^^^^^^^^^\n  = help: wrap it in an array: `type = [\"order.placed\"]`\n\n1 error in manifest",
        ),
        (
            "name = \"shop\n",
            "error: invalid basic string, expected `\"`\n  --> flotilla.toml:1:13\n  |\n1 | name = \"shop\n  |             ^\n\n1 error in manifest",
        ),
    ];
    for (input, expected) in cases {
        let (code, stderr) = check(input);
        assert_eq!(code, 2, "{input}");
        assert_eq!(stderr.trim_end(), expected, "for input:\n{input}");
        assert!(
            docs.contains(expected),
            "docs/manifest.md must show this message:\n{expected}"
        );
    }
}

#[test]
fn check_reports_a_missing_file() {
    let out = flotilla()
        .args(["check", "/nonexistent/flotilla.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read manifest /nonexistent/flotilla.toml"),
        "{stderr}"
    );
}

#[test]
fn api_key_prints_a_key_and_the_digest_the_manifest_takes() {
    let out = flotilla().args(["api-key", "partner-a"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = stdout.lines().map(str::trim).collect();
    let key = lines[1];
    assert!(key.starts_with("flk_") && key.len() == 47, "{stdout}");
    // The printed table, as it is, with a route that takes the key.
    let manifest = format!(
        "name = \"x\"\n{}\n{}\n[services.a]\nrun = {{ cargo = \"a\" }}\nroutes = [{{ path = \"/a/**\", auth = \"key\" }}]\n",
        lines[3], lines[4]
    );
    let parsed = flotilla_manifest::Manifest::parse(&manifest, Path::new("flotilla.toml"))
        .unwrap_or_else(|e| panic!("{e}\n{manifest}"));
    let digest = &parsed.gateway.api_keys.unwrap().consumers["partner-a"][0];
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    // The digest is the key's SHA-256, as coreutils computes it.
    let sum = std::process::Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(key.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(
        String::from_utf8_lossy(&sum.stdout).starts_with(&hex),
        "{stdout}"
    );
    // Never the same key twice; a name that is no consumer's is refused.
    let again = flotilla().args(["api-key", "partner-a"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&again.stdout).contains(key));
    let bad = flotilla().args(["api-key", "a b"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

fn hello_manifest(dir: &Path, listen: &str) -> PathBuf {
    let hello = flotilla_testkit::hello_py();
    let path = dir.join("flotilla.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"cli\"\n[gateway]\nlisten = \"{listen}\"\n[services.hello]\nrun = {{ command = [\"python3\", \"{}\"] }}\nreplicas = 2\nroutes = [{{ path = \"/**\" }}, {{ path = \"/cached/**\", methods = [\"GET\"], cache = {{}} }}]\n[topics.t]\n[queues.q]\nsubscribe = {{ topic = \"t\" }}\nmax_receives = 3\ndead_letter = \"q-dlq\"\n[queues.q-dlq]\n",
            hello.display()
        ),
    )
    .unwrap();
    path
}

struct Up {
    child: Child,
    data: PathBuf,
    /// Deleted with the `Up`, unless the test is failing: then kept, with
    /// the instances' logs, and its path printed.
    dir: Option<tempfile::TempDir>,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!(
                "test failed; flotilla up's data dir (instance logs in logs/) kept at {}",
                kept.join("data").display()
            );
        }
    }
}

fn up(listen: &str) -> Up {
    let dir = tempfile::tempdir().unwrap();
    let manifest = hello_manifest(dir.path(), listen);
    up_with(dir, manifest)
}

/// `flotilla up` on `manifest`, which is in `dir`, with its data dir there.
fn up_with(dir: tempfile::TempDir, manifest: PathBuf) -> Up {
    up_configured(dir, manifest, |_| {})
}

/// Like [`up_with`], `configure` adjusting the command first.
fn up_configured(
    dir: tempfile::TempDir,
    manifest: PathBuf,
    configure: impl FnOnce(&mut std::process::Command),
) -> Up {
    let data = dir.path().join("data");
    let mut command = flotilla();
    configure(&mut command);
    let child = command
        .arg("up")
        .arg(&manifest)
        .arg("--data-dir")
        .arg(&data)
        .arg("--quiet")
        // Left in a developer's shell: no instance inherits a FLOTILLA_
        // name; a DATABASE_URL reaches those without `data`
        // (`up_status_down` looks).
        .env("DATABASE_URL", "postgres://leaked/db")
        .env("FLOTILLA_URL_LEAKED", "https://leaked:1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Up {
        child,
        data,
        dir: Some(dir),
    }
}

fn wait_for_endpoints(up: &mut Up) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(up.data.join("endpoints.json"))
            && let Ok(v) = serde_json::from_str::<Value>(&text)
        {
            return v;
        }
        if let Ok(Some(status)) = up.child.try_wait() {
            let out = up
                .child
                .stderr
                .take()
                .map(std::io::read_to_string)
                .and_then(Result::ok)
                .unwrap_or_default();
            panic!(
                "flotilla up exited ({status}) before ready (data dir {}): {out}",
                up.data.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no endpoints.json in {} after 30 s",
            up.data.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How `up` exited, within 30 s (else the test fails: it did not `what`).
fn exited(up: &mut Up, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = up.child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "flotilla up did not {what} (data dir {})",
            up.data.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn alive(pid: u32) -> bool {
    // A zombie still answers kill(0); /proc tells the real state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|state| state != "Z"))
        .unwrap_or(false)
}

fn instance_pids(endpoints: &Value) -> Vec<u32> {
    endpoints["services"]["hello"]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["pid"].as_u64().unwrap() as u32)
        .collect()
}

fn wait_until(what: &str, deadline: Duration, f: impl Fn() -> bool) {
    let until = Instant::now() + deadline;
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The whole answer to a GET of `path` from the gateway at `url`
/// (`http://ip:port`), over a plain socket.
fn get_raw(url: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

/// The `Cache-Status` of a GET of `path` from the gateway at `url`.
fn cache_status_of(url: &str, path: &str) -> String {
    let answer = get_raw(url, path);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer
        .lines()
        .find_map(|l| l.strip_prefix("cache-status: "))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn up_status_down() {
    let mut up = up("127.0.0.1:0");
    let endpoints = wait_for_endpoints(&mut up);
    let pids = instance_pids(&endpoints);
    assert_eq!(pids.len(), 2, "{endpoints}");
    for &pid in &pids {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let environ = String::from_utf8_lossy(&environ);
        let names: Vec<&str> = environ
            .split('\0')
            .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
            .collect();
        assert!(names.contains(&"FLOTILLA_SERVICE"), "{names:?}");
        assert!(
            !names.contains(&"FLOTILLA_URL_LEAKED"),
            "instance {pid} inherited FLOTILLA_URL_LEAKED"
        );
        // Not the platform's (hello has no `data`): its database elsewhere.
        assert!(names.contains(&"DATABASE_URL"), "{names:?}");
    }
    assert!(
        endpoints["gateway"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:")
    );

    let out = flotilla()
        .args(["status", "--data-dir"])
        .arg(&up.data)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.contains("hello") && table.contains("2/2"), "{table}");

    // The queues, as the broker counts them; an empty dead-letter queue
    // redrives nothing.
    let out = flotilla()
        .arg("queues")
        .arg(up.data.parent().unwrap().join("flotilla.toml"))
        .arg("--data-dir")
        .arg(&up.data)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.contains("DEAD-LETTERED"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("q-dlq ")), "{table}");
    let out = flotilla()
        .args(["redrive", "q-dlq", "--data-dir"])
        .arg(&up.data)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("moved 0 message(s) from q-dlq"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A name the operator mistyped, with characters a path cannot hold as
    // they are, is asked for as one path segment: the broker says there is
    // no such queue, not that the runtime did not answer.
    let out = flotilla()
        .args(["redrive", "q dlq/../q?x", "--data-dir"])
        .arg(&up.data)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("404"), "{said}");
    assert!(!said.contains("not answer"), "{said}");

    // The gateway keeps /cached/**: kept, then purged by the CLI, then
    // fetched again.
    let gateway = endpoints["gateway"].as_str().unwrap().to_string();
    assert!(cache_status_of(&gateway, "/cached/x").contains("fwd=uri-miss"));
    assert!(cache_status_of(&gateway, "/cached/x").contains("hit"));
    let out = flotilla()
        .args(["purge", "/cached/", "--data-dir"])
        .arg(&up.data)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with("purged 1 kept response(s), "),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(cache_status_of(&gateway, "/cached/x").contains("fwd=uri-miss"));
    let out = flotilla()
        .args(["purge", "cached", "--data-dir"])
        .arg(&up.data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a path prefix"));

    let out = flotilla()
        .args(["down", "--data-dir"])
        .arg(&up.data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopped cli"));
    // `down` returned once the runtime let go of the data dir, so an `up`
    // right after would find it free.
    let lock = std::fs::File::open(up.data.join("lock")).unwrap();
    // SAFETY: flock(2) on a descriptor `lock` owns.
    let taken = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&lock),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    assert_eq!(taken, 0, "the data dir is still locked after `down`");
    drop(lock);
    let status = up.child.wait().unwrap();
    assert!(status.success(), "flotilla up exits 0 after down: {status}");
    for pid in pids {
        assert!(!alive(pid), "instance {pid} survived `flotilla down`");
    }
    assert!(!up.data.join("endpoints.json").exists());

    let out = flotilla()
        .args(["status", "--data-dir"])
        .arg(&up.data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no system is running"));
}

#[test]
fn no_orphans_after_kill_nine() {
    let mut up = up("127.0.0.1:0");
    let endpoints = wait_for_endpoints(&mut up);
    let pids = instance_pids(&endpoints);
    // Both replicas of hello_manifest: an empty list would pass below.
    assert_eq!(pids.len(), 2, "{endpoints}");
    assert!(pids.iter().all(|p| alive(*p)));
    up.child.kill().unwrap(); // SIGKILL: no chance to clean up
    up.child.wait().unwrap();
    wait_until(
        "instances to die with their parent",
        Duration::from_secs(10),
        || pids.iter().all(|p| !alive(*p)),
    );
}

/// `flotilla up` of system `name`, whose one service is a shell wrapper
/// that starts a process of its own (`sleep 600`) and then execs the hello
/// service, with `extra` lines in its section; and that process's pid once
/// it runs.
fn up_with_a_wrapper(name: &str, extra: &str) -> (Up, u32) {
    let dir = tempfile::tempdir().unwrap();
    let helper = dir.path().join("helper.pid");
    let manifest = dir.path().join("flotilla.toml");
    std::fs::write(
        &manifest,
        format!(
            "name = \"{name}\"\n[gateway]\nlisten = \"127.0.0.1:0\"\n[services.hello]\nrun = {{ command = [\"sh\", \"-c\", \"sleep 600 & echo $! > {}; exec python3 {}\"] }}\n{extra}",
            helper.display(),
            flotilla_testkit::hello_py().display()
        ),
    )
    .unwrap();
    let up = up_with(dir, manifest);
    wait_until("the instance's helper", Duration::from_secs(30), || {
        std::fs::read_to_string(&helper).is_ok_and(|s| s.ends_with('\n'))
    });
    let helper_pid: u32 = std::fs::read_to_string(&helper)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(helper_pid));
    (up, helper_pid)
}

/// Sends `signal` to `up`; how it exited, once the wrapper's own process
/// has gone too.
fn signalled(
    up: &mut Up,
    signal: libc::c_int,
    helper_pid: u32,
    what: &str,
) -> std::process::ExitStatus {
    // SAFETY: kill(2) of the child this test started.
    unsafe {
        libc::kill(up.child.id() as libc::pid_t, signal);
    }
    let status = exited(up, what);
    wait_until(
        "what the instance started to stop",
        Duration::from_secs(10),
        || !alive(helper_pid),
    );
    status
}

/// `nohup flotilla up &` asks for hangups to be ignored: `flotilla` keeps
/// them so (listening for SIGHUP would undo it), and the system outlives
/// the session that started it.
#[test]
fn a_hangup_is_ignored_under_nohup() {
    let dir = tempfile::tempdir().unwrap();
    let unready = dir.path().join("unready");
    std::fs::write(&unready, b"").unwrap();
    let manifest = dir.path().join("flotilla.toml");
    std::fs::write(
        &manifest,
        format!(
            "name = \"nohup\"\n[gateway]\nlisten = \"127.0.0.1:0\"\n[services.hello]\nrun = {{ command = [\"python3\", \"{}\"] }}\nenv = {{ UNREADY_FILE = \"{}\" }}\nready_timeout = \"60s\"\n",
            flotilla_testkit::hello_py().display(),
            unready.display()
        ),
    )
    .unwrap();
    let mut up = up_configured(dir, manifest, |command| {
        // SAFETY: signal(2) between fork and exec, as nohup(1) does.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(command, || {
                libc::signal(libc::SIGHUP, libc::SIG_IGN);
                Ok(())
            });
        }
    });
    wait_until("the instance to start", Duration::from_secs(30), || {
        up.data.join("logs").join("hello-0.log").exists()
    });
    // While it starts: heeded, the hangup would stop it with 130.
    // SAFETY: kill(2) of the child this test started.
    unsafe {
        libc::kill(up.child.id() as libc::pid_t, libc::SIGHUP);
    }
    std::fs::remove_file(&unready).unwrap();
    wait_for_endpoints(&mut up);
    let out = flotilla()
        .args(["down", "--data-dir"])
        .arg(&up.data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = exited(&mut up, "stop on `down`");
    assert!(status.success(), "{status}");
}

/// Ctrl-C while the system starts (an instance not ready yet) stops
/// `flotilla` with 130 and takes what its instances started themselves
/// with them: without its own handler, SIGINT killed `flotilla` at once,
/// and only its direct children died with it.
#[test]
fn ctrl_c_while_starting_leaves_nothing_running() {
    let (mut up, helper_pid) = up_with_a_wrapper(
        "interrupted",
        "env = { NEVER_READY = \"1\" }\nready_timeout = \"60s\"\n",
    );
    let status = signalled(&mut up, libc::SIGINT, helper_pid, "stop on Ctrl-C");
    assert_eq!(status.code(), Some(130), "{status}");
}

/// The terminal or SSH session that ran `flotilla up` closing (SIGHUP)
/// stops the system as Ctrl-C does: by default the signal would kill
/// `flotilla` alone, and what a wrapper started would be left running.
#[test]
fn a_hangup_stops_the_system_gracefully() {
    let (mut up, helper_pid) = up_with_a_wrapper("hungup", "");
    wait_for_endpoints(&mut up);
    let status = signalled(&mut up, libc::SIGHUP, helper_pid, "stop on a hangup");
    assert!(status.success(), "{status}");
}

#[test]
fn a_port_already_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut up = up(&addr);
    let status = exited(&mut up, "exit on a taken port");
    assert!(!status.success());
    let stderr = up
        .child
        .stderr
        .take()
        .map(std::io::read_to_string)
        .unwrap()
        .unwrap();
    assert!(
        stderr.contains(&addr) && stderr.contains("already in use"),
        "{stderr}"
    );
}

/// A data directory the gateway would serve (its CA keys, its control
/// token) is refused before anything starts.
#[test]
fn a_data_dir_inside_the_static_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("web")).unwrap();
    let manifest = dir.path().join("flotilla.toml");
    std::fs::write(
        &manifest,
        "name = \"x\"\n[gateway]\nlisten = \"127.0.0.1:0\"\nstatic = \"web\"\n[services.a]\nrun = { command = [\"true\"] }\n",
    )
    .unwrap();
    let out = flotilla()
        .arg("up")
        .arg(&manifest)
        .arg("--data-dir")
        .arg(dir.path().join("web/state"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("inside the gateway's static directory"),
        "{stderr}"
    );
    assert!(!dir.path().join("web/state").exists(), "nothing was made");
}

/// `--listen` on the port of `http_redirect` is refused before anything
/// starts, as the same `listen` in the manifest is by `check`.
#[test]
fn a_listen_on_the_redirect_port_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // The manifest checks only that these exist; nothing starts to read them.
    std::fs::write(dir.path().join("cert.pem"), "").unwrap();
    std::fs::write(dir.path().join("key.pem"), "").unwrap();
    let manifest = dir.path().join("flotilla.toml");
    std::fs::write(
        &manifest,
        "name = \"x\"\n[gateway]\nlisten = \"127.0.0.1:9443\"\n[gateway.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\nhttp_redirect = \"0.0.0.0:8080\"\n[services.a]\nrun = { command = [\"true\"] }\n",
    )
    .unwrap();
    let out = flotilla()
        .arg("up")
        .arg(&manifest)
        .args(["--listen", "127.0.0.1:8080", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "error: `--listen 127.0.0.1:8080` takes the port of `[gateway.tls] http_redirect = \"0.0.0.0:8080\"`"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("help: give `--listen` another port"),
        "{stderr}"
    );
    assert!(!dir.path().join("data").exists(), "nothing was made");
}

/// A directory stands for its flotilla.toml; counts are in words.
#[test]
fn check_takes_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("flotilla.toml"),
        "name = \"x\"\n[services.a]\nrun = { command = [\"true\"] }\nroutes = [{ path = \"/a/**\" }]\n",
    )
    .unwrap();
    let out = flotilla().arg("check").arg(dir.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("flotilla.toml: ok — system `x` with 1 service and 1 route\n"),
        "{stdout}"
    );
    // A directory without one is a missing file (exit 1), not a parent's.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = flotilla().arg("check").arg(&empty).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot read manifest") && stderr.contains("empty/flotilla.toml"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_https_with_the_manifests_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let made =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::write(dir.path().join("gw.pem"), made.cert.pem()).unwrap();
    std::fs::write(
        dir.path().join("gw-key.pem"),
        made.signing_key.serialize_pem(),
    )
    .unwrap();
    // A second site on the same gateway, served by the name clients ask for.
    let api = rcgen::generate_simple_self_signed(vec!["api.example.test".into()]).unwrap();
    std::fs::write(dir.path().join("api.pem"), api.cert.pem()).unwrap();
    std::fs::write(
        dir.path().join("api-key.pem"),
        api.signing_key.serialize_pem(),
    )
    .unwrap();
    // Partners' client certificates, for a route only they may call.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.path().join("partners-ca.pem"), ca_cert.pem()).unwrap();
    let ca = rcgen::Issuer::new(ca_params, ca_key);
    let partner_key = rcgen::KeyPair::generate().unwrap();
    let mut partner_params = rcgen::CertificateParams::default();
    partner_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let partner = partner_params.signed_by(&partner_key, &ca).unwrap();
    let partner_pem = format!("{}{}", partner.pem(), partner_key.serialize_pem());

    let manifest = hello_manifest(dir.path(), "127.0.0.1:0");
    let mut text = std::fs::read_to_string(&manifest).unwrap().replace(
        "routes = [{ path = \"/**\" }",
        "routes = [{ path = \"/partner/**\", client_cert = true }, { path = \"/**\" }",
    );
    text.push_str("[gateway.tls]\ncert = \"gw.pem\"\nkey = \"gw-key.pem\"\nclient_ca = \"partners-ca.pem\"\n[[gateway.tls.certificates]]\ncert = \"api.pem\"\nkey = \"api-key.pem\"\n");
    std::fs::write(&manifest, text).unwrap();

    let mut up = up_with(dir, manifest);
    let endpoints = tokio::task::block_in_place(|| wait_for_endpoints(&mut up));
    let gateway = endpoints["gateway"].as_str().unwrap().to_string();
    assert!(gateway.starts_with("https://127.0.0.1:"), "{endpoints}");

    let _ = rustls::crypto::ring::default_provider().install_default();
    let trusted = reqwest::Certificate::from_pem(made.cert.pem().as_bytes()).unwrap();
    let https = reqwest::Client::builder()
        .add_root_certificate(trusted)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    // The instances may still be starting: the gateway answers 503 until
    // one is ready.
    let deadline = Instant::now() + Duration::from_secs(30);
    let res = loop {
        let res = https.get(format!("{gateway}/hello")).send().await.unwrap();
        if res.status().is_success() || Instant::now() > deadline {
            break res;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["server"], "flotilla");

    // A client that trusts only the second site's certificate reaches it
    // by its name.
    let addr: std::net::SocketAddr = gateway.trim_start_matches("https://").parse().unwrap();
    let api_client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(api.cert.pem().as_bytes()).unwrap())
        .resolve("api.example.test", addr)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let res = api_client
        .get(format!("https://api.example.test:{}/hello", addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // The partners' route: refused without a client certificate, served
    // with one the manifest's client CA signed.
    let res = https
        .get(format!("{gateway}/partner/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let partner_client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(made.cert.pem().as_bytes()).unwrap())
        .identity(reqwest::Identity::from_pem(partner_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let res = partner_client
        .get(format!("{gateway}/partner/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // Plain HTTP to the same port is told what to do.
    let plain = crate::support::client()
        .get(gateway.replacen("https://", "http://", 1) + "/hello")
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 400);
    let body = plain.text().await.unwrap();
    assert!(body.contains("https_required"), "{body}");
}

#[test]
fn a_quiet_up_still_says_what_an_edit_of_the_manifest_did() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = hello_manifest(dir.path(), "127.0.0.1:0");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut up = up_with(dir, manifest.clone());
    wait_for_endpoints(&mut up);
    let seen = printed(&mut up);
    let route = "routes = [{ path = \"/**\" }";

    // An edit that cannot be applied: said, though the instances' output
    // is not shown.
    std::fs::write(
        &manifest,
        text.replace(route, "routes = [{ path = \"/**\", rate_limit = \"lots\" }"),
    )
    .unwrap();
    wait_until(
        "the refused reload to be printed",
        Duration::from_secs(20),
        || seen("was not applied; the running configuration stays") && seen("lots"),
    );
    // And one that is.
    std::fs::write(
        &manifest,
        text.replace(
            route,
            "routes = [{ path = \"/**\", rate_limit = \"100/s\" }",
        ),
    )
    .unwrap();
    wait_until("the reload to be printed", Duration::from_secs(20), || {
        seen("changed: gateway reloaded (2 routes)")
    });
}

/// Whether `up --quiet` has printed a line containing the text asked
/// about, as it printed it: its stdout is read from here on.
fn printed(up: &mut Up) -> impl Fn(&str) -> bool + use<> {
    let printed = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let stdout = up.child.stdout.take().unwrap();
    let sink = std::sync::Arc::clone(&printed);
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let mut all = sink.lock().unwrap_or_else(|e| e.into_inner());
            all.push_str(&line);
            all.push('\n');
        }
    });
    move |what: &str| {
        printed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(what)
    }
}

/// The status line of a GET of `path` from the gateway at `url`.
fn status_of(url: &str, path: &str) -> String {
    get_raw(url, path)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A blocklist in a file of its own (`deny_file`), as threat feeds are
/// published: an edit of the file alone is a hot reload, as an edit of
/// the manifest is.
#[test]
fn an_edit_of_an_ip_list_file_is_applied_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = hello_manifest(dir.path(), "127.0.0.1:0");
    let list = dir.path().join("deny.txt");
    std::fs::write(&list, "# nobody yet\n").unwrap();
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replacen(
            "[gateway]\n",
            "[gateway]\nip = { deny_file = \"deny.txt\" }\n",
            1,
        ),
    )
    .unwrap();
    let mut up = up_with(dir, manifest);
    let endpoints = wait_for_endpoints(&mut up);
    let seen = printed(&mut up);
    let gateway = endpoints["gateway"].as_str().unwrap().to_string();
    wait_until(
        "the hello service to answer",
        Duration::from_secs(30),
        || status_of(&gateway, "/hello").starts_with("HTTP/1.1 200"),
    );
    // This machine on the list (Spamhaus' DROP format): refused.
    std::fs::write(&list, "203.0.113.0/24 ; SBL1\n127.0.0.0/8 ; SBL2\n").unwrap();
    wait_until(
        "the list to refuse this machine",
        Duration::from_secs(20),
        || status_of(&gateway, "/hello").starts_with("HTTP/1.1 403"),
    );
    wait_until("the reload to be printed", Duration::from_secs(20), || {
        seen("deny.txt changed: gateway reloaded")
    });
    // A broken list is not applied (said, with the line): the last good
    // one stays.
    std::fs::write(&list, "127.0.0.0/8\nnot-a-network\n").unwrap();
    wait_until(
        "the broken list to be refused",
        Duration::from_secs(20),
        || seen("was not applied") && seen("line 2: `not-a-network`"),
    );
    assert!(status_of(&gateway, "/hello").starts_with("HTTP/1.1 403"));
    // Off the list again: admitted.
    std::fs::write(&list, "203.0.113.0/24\n").unwrap();
    wait_until(
        "the list to admit this machine",
        Duration::from_secs(20),
        || status_of(&gateway, "/hello").starts_with("HTTP/1.1 200"),
    );
}
