//! Hot reload: `flotilla up` watches `flotilla.toml` (and the files it
//! names that the gateway reads: the IP lists' `allow_file` and
//! `deny_file`, the JWT issuers' `jwks_ca` and `jwks_file`) and applies
//! what the gateway owns — each route's auth, scopes, claims, rate limit,
//! CORS, IP list, body limit, header changes, timeout, cache,
//! `max_in_flight`, `affinity`, `match_headers` and `authz`, and the
//! gateway's JWT, API keys, CORS, IP, rate-limit, header-change, retry and
//! outlier detection settings, and how it asks `[gateway.authz]` —
//! without dropping a request or a kept-alive connection.
//!
//! Everything else needs a restart, and a change that touches it is refused
//! as a whole (the running configuration stays) with a message saying so:
//! services and how they run, and what the gateway may call on each
//! service (its routes' paths and methods, a JWKS it fetches from it, the
//! checks `[gateway.authz]` sends it), because every instance's ACL lets
//! the gateway reach exactly what it could at start. An invalid file is
//! refused the same way, with the manifest's own diagnostics.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_gateway::{Config as GatewayConfig, Gateway};
use flotilla_manifest::{Manifest, Service};
use tokio::sync::watch;

use crate::console::Console;
use crate::pool::ReloadStatus;

/// How often the watched files are looked at.
const POLL: Duration = Duration::from_millis(500);
/// How long a changed file must look the same before it is read: an
/// editor that truncates a file and then writes it, or a script writing
/// an IP list in pieces, is not read half-way.
const SETTLE: Duration = Duration::from_millis(100);

/// What the running system was started with, to compare a new file against.
pub(crate) struct Watched {
    pub manifest: Manifest,
    /// The gateway config the system runs, whose runtime-owned fields
    /// (listen address, access log, upstream TLS) every reload keeps.
    pub base: GatewayConfig,
    /// When `manifest` was read (the clock just before `Manifest::load`):
    /// a watched file changed since, while the services built and
    /// started, is applied at the watcher's first look.
    pub read_at: SystemTime,
}

/// Polls the manifest, and the files it names that the gateway reads,
/// until `stop`, reloading the gateway when one of them changes.
pub(crate) async fn watch_manifest(
    mut watched: Watched,
    gateway: Arc<Gateway>,
    console: Arc<Console>,
    reloads: Arc<Mutex<ReloadStatus>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut files = Files::new(watched_files(&watched.manifest), watched.read_at);
    while let Some(change) = files.changed(&mut stop).await {
        // Read off the runtime: the manifest and its files (IP lists of up
        // to 64 MiB, CA bundles) are read with blocking calls.
        let file = watched.manifest.file.clone();
        let next = match tokio::task::spawn_blocking(move || Manifest::load(&file)).await {
            Ok(loaded) => loaded.map_err(|e| e.to_string()),
            Err(e) => Err(format!("the manifest could not be read: {e}")),
        };
        match next.and_then(|next| apply(&watched, next, &gateway)) {
            Ok((manifest, config)) => {
                console.event(&format!(
                    "{} changed: gateway reloaded ({} routes)",
                    change.names,
                    config.routes.len()
                ));
                {
                    let mut reloads = reloads.lock().unwrap();
                    reloads.applied += 1;
                    reloads.last_refusal = None;
                }
                let read_at = change.read_at;
                // The new manifest may name other list files.
                files.reloaded(change, watched_files(&manifest));
                watched = Watched {
                    manifest,
                    base: config,
                    read_at,
                };
            }
            Err(why) => {
                console.warn(&format!(
                    "{} changed but was not applied; the running configuration stays:\n{why}",
                    change.names
                ));
                {
                    let mut reloads = reloads.lock().unwrap();
                    reloads.refused += 1;
                    reloads.last_refusal = Some(why);
                }
                files.refused(change);
            }
        }
    }
}

/// The manifest, then the files it names that the gateway reads
/// (`Manifest::gateway_files`).
fn watched_files(manifest: &Manifest) -> Vec<PathBuf> {
    let mut files = vec![manifest.file.clone()];
    files.extend(manifest.gateway_files());
    files
}

/// The watched files, and how each looked when the running configuration
/// was read from it.
struct Files {
    paths: Vec<PathBuf>,
    seen: Vec<Stamp>,
}

/// A change to apply: how the files looked just before they were read
/// again, and when that was.
struct Change {
    /// The changed files, for messages.
    names: String,
    stamps: Vec<Stamp>,
    read_at: SystemTime,
}

impl Files {
    /// `paths` as a configuration read at `read_at` left them: one changed
    /// since counts as unapplied.
    fn new(paths: Vec<PathBuf>, read_at: SystemTime) -> Files {
        let seen = paths.iter().map(|p| Stamp::since(p, read_at)).collect();
        Files { paths, seen }
    }

    /// Waits for a file to look different from what was applied, and then
    /// to look the same for `SETTLE`; `None` once `stop` changes.
    async fn changed(&self, stop: &mut watch::Receiver<bool>) -> Option<Change> {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = stop.changed() => return None,
            }
            let mut now = stamps(&self.paths);
            if now == self.seen {
                continue;
            }
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(SETTLE) => {}
                    _ = stop.changed() => return None,
                }
                let again = stamps(&self.paths);
                if again == now {
                    break;
                }
                now = again;
            }
            // Written back as it was (a file put back in place).
            if now == self.seen {
                continue;
            }
            let names: Vec<String> = self
                .paths
                .iter()
                .zip(self.seen.iter().zip(&now))
                .filter(|(_, (before, after))| before != after)
                .map(|(path, _)| path.display().to_string())
                .collect();
            return Some(Change {
                names: names.join(", "),
                stamps: now,
                read_at: SystemTime::now(),
            });
        }
    }

    /// `change` was applied, and the new configuration names `paths`.
    /// Each file is taken as it looked *before* it was read: one written
    /// while it was read or applied is changed again at the next look.
    /// A file named for the first time is looked at now, and counts as
    /// unapplied if it changed after the read began.
    fn reloaded(&mut self, change: Change, paths: Vec<PathBuf>) {
        let before = |path: &PathBuf| {
            self.paths
                .iter()
                .position(|p| p == path)
                .map(|i| change.stamps[i])
        };
        self.seen = paths
            .iter()
            .map(|p| before(p).unwrap_or_else(|| Stamp::since(p, change.read_at)))
            .collect();
        self.paths = paths;
    }

    /// `change` was refused: it is not looked at again until the files
    /// change once more.
    fn refused(&mut self, change: Change) {
        self.seen = change.stamps;
    }
}

/// How a file looks: its identity, size and times, so that a rewrite in
/// place within one tick of the file system's clock (same mtime, another
/// size or ctime) or a file replaced by another (an editor's rename) is a
/// change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stamp {
    Missing,
    File {
        dev: u64,
        ino: u64,
        len: u64,
        mtime: (i64, i64),
        ctime: (i64, i64),
    },
    /// Changed after the running configuration was read: unlike any look
    /// at a file, so the next poll reloads.
    Unapplied,
}

fn stamps(files: &[PathBuf]) -> Vec<Stamp> {
    files.iter().map(|f| Stamp::of(f)).collect()
}

impl Stamp {
    fn of(file: &std::path::Path) -> Stamp {
        match std::fs::metadata(file) {
            Ok(m) => Stamp::File {
                dev: m.dev(),
                ino: m.ino(),
                len: m.len(),
                mtime: (m.mtime(), m.mtime_nsec()),
                ctime: (m.ctime(), m.ctime_nsec()),
            },
            Err(_) => Stamp::Missing,
        }
    }

    /// How `file` looks, or `Unapplied` if it changed at or after
    /// `read_at` (allowing for the file system's clock: see `lag`).
    fn since(file: &std::path::Path, read_at: SystemTime) -> Stamp {
        let stamp = Stamp::of(file);
        let Stamp::File { mtime, ctime, .. } = stamp else {
            return stamp;
        };
        // ctime too: a copy that keeps its mtime (`cp -p`, `touch -d`)
        // still sets it.
        let last = time(mtime).max(time(ctime));
        if last + lag(last) >= read_at {
            Stamp::Unapplied
        } else {
            stamp
        }
    }
}

fn time((secs, nanos): (i64, i64)) -> SystemTime {
    let secs = u64::try_from(secs).unwrap_or(0);
    let nanos = u32::try_from(nanos).unwrap_or(0);
    UNIX_EPOCH + Duration::new(secs, nanos)
}

/// How far a file's time may be behind the clock when it was written.
/// Linux stamps files with a clock updated once a kernel tick (at most
/// 10 ms behind); a file system that keeps whole seconds (or two, FAT)
/// truncates further. Erring long only costs a reload of what is running.
fn lag(stamped: SystemTime) -> Duration {
    let whole_seconds = stamped
        .duration_since(UNIX_EPOCH)
        .is_ok_and(|d| d.subsec_nanos() == 0);
    if whole_seconds {
        Duration::from_secs(2)
    } else {
        Duration::from_millis(50)
    }
}

/// Checks the change to `next`, the file as loaded again, is one the
/// gateway alone can take, and swaps the gateway's configuration.
fn apply(
    watched: &Watched,
    next: Manifest,
    gateway: &Gateway,
) -> Result<(Manifest, GatewayConfig), String> {
    restart_needed(&watched.manifest, &next)?;
    let mut config = GatewayConfig::from_manifest(&next);
    config.listen = watched.base.listen;
    config.access_log = watched.base.access_log.clone();
    config.upstream_tls = watched.base.upstream_tls.clone();
    config.tls = watched.base.tls.clone();
    config.limits = reloadable_limits(&watched.base.limits, &config.limits);
    gateway.reload(config.clone()).map_err(|e| e.to_string())?;
    Ok((next, config))
}

/// The limits the gateway started with, but the retry and outlier
/// detection settings of `fresh` (the new file's): those the gateway takes
/// without a restart.
fn reloadable_limits(
    base: &flotilla_gateway::Limits,
    fresh: &flotilla_gateway::Limits,
) -> flotilla_gateway::Limits {
    flotilla_gateway::Limits {
        max_retries: fresh.max_retries,
        retry_budget_ratio: fresh.retry_budget_ratio,
        retry_budget_min_per_second: fresh.retry_budget_min_per_second,
        outlier_consecutive_failures: fresh.outlier_consecutive_failures,
        outlier_base_ejection: fresh.outlier_base_ejection,
        outlier_max_ejection: fresh.outlier_max_ejection,
        ..base.clone()
    }
}

/// Why `next` cannot be applied to a system running `current`, if it can't.
fn restart_needed(current: &Manifest, next: &Manifest) -> Result<(), String> {
    if next.name != current.name {
        return Err(format!(
            "the system's name changed (`{}` → `{}`): restart to apply",
            current.name, next.name
        ));
    }
    if next.gateway.listen != current.gateway.listen
        || next.gateway.static_dir != current.gateway.static_dir
    {
        return Err("the gateway's `listen` or `static` changed: restart to apply".into());
    }
    // The certificate files themselves are looked at by the gateway, which
    // takes a renewed pair by itself; which files, and the versions, are
    // the listener's.
    if next.gateway.tls != current.gateway.tls {
        return Err("the gateway's `[gateway.tls]` changed: restart to apply (a renewed certificate written over the same files is taken without one)".into());
    }
    // Read by the listener and the workers, made once at start. (The
    // retry and outlier detection settings are changed in place.)
    if next.gateway.limits != current.gateway.limits {
        return Err("`[gateway.limits]` changed: restart to apply".into());
    }
    let names = |m: &Manifest| m.services.keys().cloned().collect::<Vec<_>>();
    if names(next) != names(current) {
        return Err(format!(
            "services were added or removed ({:?} → {:?}): restart to apply",
            names(current),
            names(next)
        ));
    }
    for (name, now) in &next.services {
        let was = &current.services[name];
        if without_routes(now) != without_routes(was) {
            return Err(format!(
                "service `{name}` changed in more than its routes: restart to apply"
            ));
        }
    }
    if next.broker != current.broker
        || next.topics != current.topics
        || next.queues != current.queues
        || next.streams != current.streams
    {
        return Err(
            "`[broker]`, `[topics]`, `[queues]` or `[streams]` changed: restart to apply".into(),
        );
    }
    if next.mesh != current.mesh {
        return Err("`[mesh]` changed: restart to apply".into());
    }
    // What the gateway may call on each service (its routes' paths and
    // methods, a JWKS, authz checks) is in that service's instances' ACLs,
    // made at start: the gateway may need less after a reload, never more.
    // Hosts, headers and everything else about how it calls are its own.
    for name in next.services.keys() {
        let allowed = crate::mesh::gateway_routes(current, name);
        let more: Vec<String> = crate::mesh::gateway_routes(next, name)
            .into_iter()
            .filter(|r| !allowed.contains(r))
            .map(|r| match r.methods.as_slice() {
                [] => format!("`{}` (any method)", r.path),
                methods => format!("`{} {}`", methods.join(","), r.path),
            })
            .collect();
        if !more.is_empty() {
            return Err(format!(
                "the gateway would call service `{name}` at {}, which its instances' ACLs, made at start, do not allow: restart to apply",
                more.join(", ")
            ));
        }
    }
    Ok(())
}

fn without_routes(s: &Service) -> Service {
    let mut s = s.clone();
    s.routes.clear();
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const BASE: &str = r#"name = "x"
[services.a]
run = { command = ["true"] }
routes = [{ path = "/a/**", methods = ["GET"] }]
"#;

    fn m(src: &str) -> Manifest {
        Manifest::parse(src, Path::new("flotilla.toml")).unwrap()
    }

    /// `paths` as they look now, applied.
    fn applied(paths: &[PathBuf]) -> Files {
        Files {
            paths: paths.to_vec(),
            seen: stamps(paths),
        }
    }

    /// The next change `files` reports, within a few polls (of paused
    /// time: nothing waits for real).
    async fn next_change(files: &Files) -> Option<Change> {
        let (_tx, mut stop) = watch::channel(false);
        tokio::time::timeout(POLL * 4, files.changed(&mut stop))
            .await
            .ok()
            .flatten()
    }

    #[test]
    fn a_rewrite_that_keeps_the_mtime_is_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("allow.txt");
        std::fs::write(&list, "10.0.0.0/8\n").unwrap();
        let before = Stamp::of(&list);
        let mtime = std::fs::metadata(&list).unwrap().modified().unwrap();
        // Written again within the same tick of the file system's clock.
        std::fs::write(&list, "10.0.0.0/8\n192.168.0.0/16\n").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&list)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(std::fs::metadata(&list).unwrap().modified().unwrap(), mtime);
        assert_ne!(Stamp::of(&list), before);
        // Replaced by another file (an editor's save by rename).
        let before = Stamp::of(&list);
        let other = dir.path().join("allow.txt.new");
        std::fs::write(&other, "10.0.0.0/8\n192.168.0.0/16\n").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&other)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        std::fs::rename(&other, &list).unwrap();
        assert_ne!(Stamp::of(&list), before);
    }

    #[tokio::test(start_paused = true)]
    async fn a_file_is_read_once_it_has_settled() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("allow.txt");
        std::fs::write(&list, "10.0.0.0/8\n").unwrap();
        let files = applied(std::slice::from_ref(&list));
        // An editor truncates the file, and has not written it yet when
        // the watcher looks.
        std::fs::write(&list, "").unwrap();
        let (_tx, mut stop) = watch::channel(false);
        let change = files.changed(&mut stop);
        tokio::pin!(change);
        tokio::select! {
            biased;
            _ = &mut change => panic!("the half-written file was taken"),
            _ = tokio::time::sleep(POLL + SETTLE / 2) => {}
        }
        std::fs::write(&list, "10.0.0.0/8\n192.168.0.0/16\n").unwrap();
        let change = tokio::time::timeout(POLL * 4, change)
            .await
            .expect("the written file is taken")
            .unwrap();
        assert_eq!(change.stamps, stamps(&files.paths), "as written in full");
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_during_a_reload_is_reloaded_too() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("flotilla.toml");
        let list = dir.path().join("allow.txt");
        std::fs::write(&manifest, "name = \"x\"\n").unwrap();
        std::fs::write(&list, "10.0.0.0/8\n").unwrap();
        let paths = vec![manifest, list.clone()];
        let mut files = applied(&paths);
        std::fs::write(&list, "10.0.0.0/8\n172.16.0.0/12\n").unwrap();
        let change = next_change(&files).await.expect("the edit is seen");
        // Written again while the manifest is loaded and applied.
        std::fs::write(&list, "10.0.0.0/8\n172.16.0.0/12\n192.168.0.0/16\n").unwrap();
        files.reloaded(change, paths);
        let again = next_change(&files)
            .await
            .expect("the write during the reload is applied");
        assert_eq!(again.names, list.display().to_string());
        // Applied: nothing more to do.
        files.reloaded(again, files.paths.clone());
        assert!(next_change(&files).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_file_first_named_by_a_reload_and_written_meanwhile_is_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("flotilla.toml");
        let list = dir.path().join("deny.txt");
        std::fs::write(&manifest, "name = \"x\"\n").unwrap();
        let mut files = applied(std::slice::from_ref(&manifest));
        std::fs::write(&manifest, "name = \"x\"\n# deny.txt\n").unwrap();
        let change = next_change(&files).await.expect("the edit is seen");
        // Written after the manifest that names it was read.
        std::fs::write(&list, "10.0.0.0/8\n").unwrap();
        files.reloaded(change, vec![manifest, list.clone()]);
        let again = next_change(&files)
            .await
            .expect("the list as written is applied");
        assert_eq!(again.names, list.display().to_string());
    }

    #[tokio::test(start_paused = true)]
    async fn a_file_saved_after_the_manifest_was_read_is_applied_at_the_first_look() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("flotilla.toml");
        std::fs::write(&manifest, "name = \"x\"\n").unwrap();
        let read_at = SystemTime::now();
        // Saved while the services build, before the watcher starts.
        std::fs::write(&manifest, "name = \"x\"\n# edited\n").unwrap();
        let files = Files::new(vec![manifest.clone()], read_at);
        let change = next_change(&files).await.expect("the save is applied");
        assert_eq!(change.names, manifest.display().to_string());
    }

    #[test]
    fn gateway_policies_reload_the_rest_needs_a_restart() {
        let base = m(BASE);
        let limited = BASE.replace(
            r#"methods = ["GET"] }"#,
            r#"methods = ["GET"], rate_limit = "5/s", timeout = "2s", affinity = "cookie:s" }"#,
        );
        assert!(restart_needed(&base, &m(&limited)).is_ok());
        let new_path = BASE.replace("/a/**", "/b/**");
        assert!(
            restart_needed(&base, &m(&new_path))
                .unwrap_err()
                .contains("the gateway would call service `a` at `GET,HEAD /b/**`")
        );
        let replicas = BASE.replace("routes =", "replicas = 2\nroutes =");
        assert!(
            restart_needed(&base, &m(&replicas))
                .unwrap_err()
                .contains("more than its routes")
        );
        // Hosts are the gateway's alone: a path already exposed, for
        // another host, is no new path for the instances' ACLs.
        let hosts = BASE.replace(
            r#"routes = [{ path = "/a/**", methods = ["GET"] }]"#,
            r#"routes = [{ path = "/a/**", methods = ["GET"], hosts = ["a.example.com"] }, { path = "/a/**", methods = ["GET"] }]"#,
        );
        assert!(restart_needed(&base, &m(&hosts)).is_ok());
        // So are a route's headers, its bulkhead and its API keys.
        let canary = BASE.replace(
            r#"routes = [{ path = "/a/**", methods = ["GET"] }]"#,
            r#"routes = [{ path = "/a/**", methods = ["GET"], match_headers = { x-canary = "1" }, max_in_flight = 8 }, { path = "/a/**", methods = ["GET"] }]"#,
        );
        assert!(restart_needed(&base, &m(&canary)).is_ok());
        // How the gateway asks its authorization service reloads; whom, and
        // where, is in that service's ACL.
        let authz = |settings: &str| {
            m(&format!(
                "{}[services.p]\nrun = {{ command = [\"true\"] }}\n[gateway.authz]\nservice = \"p\"\n{settings}\n",
                BASE.replace(
                    r#"methods = ["GET"] }"#,
                    r#"methods = ["GET"], authz = true }"#
                )
            ))
        };
        assert!(
            restart_needed(&authz(""), &authz("timeout = \"2s\"\nfailure = \"allow\"")).is_ok()
        );
        assert!(
            restart_needed(&authz(""), &authz("path_prefix = \"/check\""))
                .unwrap_err()
                .contains("would call service `p` at `/check/**` (any method)")
        );
        // So is where keys are fetched from a service: a new source is
        // refused, a dropped one is not.
        let jwt = |sources: &[&str]| {
            let issuers: String = sources
                .iter()
                .enumerate()
                .map(|(i, jwks)| {
                    format!("[[gateway.jwt]]\nname = \"i{i}\"\nissuer = \"i{i}\"\naudiences = [\"x\"]\njwks = \"{jwks}\"\n")
                })
                .collect();
            m(&format!("{BASE}{issuers}"))
        };
        let one = jwt(&["a:/jwks.json"]);
        assert!(
            restart_needed(
                &one,
                &jwt(&["a:/jwks.json", "https://id.example/jwks.json"])
            )
            .is_ok()
        );
        assert!(
            restart_needed(&one, &jwt(&["a:/keys.json"]))
                .unwrap_err()
                .contains("would call service `a` at `GET,HEAD /keys.json`")
        );
        assert!(restart_needed(&jwt(&["a:/jwks.json", "a:/other.json"]), &one).is_ok());
        let keys = format!(
            "{}[gateway.api_keys]\nconsumers = {{ p = [\"sha256:{}\"] }}\n",
            BASE.replace(
                r#"methods = ["GET"] }"#,
                r#"methods = ["GET"], auth = "key" }"#
            ),
            "ab".repeat(32)
        );
        assert!(restart_needed(&base, &m(&keys)).is_ok());
        // A canary's share moves without a restart; a new canary needs one
        // (its instances' ACLs must let the gateway in).
        let two = format!("{BASE}[services.b]\nrun = {{ command = [\"true\"] }}\n");
        let share = |p: u32| {
            m(&two.replace(
                r#"methods = ["GET"] }"#,
                &format!(r#"methods = ["GET"], split = {{ b = {p} }} }}"#),
            ))
        };
        assert!(restart_needed(&share(0), &share(50)).is_ok());
        assert!(
            restart_needed(&m(&two), &share(5))
                .unwrap_err()
                .contains("would call service `b` at `GET,HEAD /a/**`")
        );
        // Stripping changes the paths instances see, and so their ACLs.
        let stripped = BASE.replace(
            r#"methods = ["GET"] }"#,
            r#"methods = ["GET"], strip_prefix = "/a" }"#,
        );
        assert!(
            restart_needed(&base, &m(&stripped))
                .unwrap_err()
                .contains("would call service `a` at `GET,HEAD /**`")
        );
        let added = format!("{BASE}[services.b]\nrun = {{ command = [\"true\"] }}\n");
        assert!(
            restart_needed(&base, &m(&added))
                .unwrap_err()
                .contains("added or removed")
        );
    }

    #[test]
    fn changed_gateway_limits_need_a_restart_retries_and_ejection_do_not() {
        let base = m(BASE);
        let with = |table: &str| {
            m(&format!(
                "name = \"x\"\n[gateway.{table}\n{}",
                BASE.trim_start_matches("name = \"x\"\n")
            ))
        };
        let limits = "limits]\nmax_in_flight = 500";
        let why = restart_needed(&base, &with(limits)).unwrap_err();
        assert!(why.contains("`[gateway.limits]` changed"), "{why}");
        assert!(restart_needed(&with(limits), &with(limits)).is_ok());
        for table in [
            "retries]\nattempts = 0",
            "outlier_detection]\nbase_ejection = \"10s\"",
        ] {
            assert!(restart_needed(&base, &with(table)).is_ok(), "{table}");
        }
    }

    #[test]
    fn a_reload_takes_the_new_retry_and_ejection_settings_and_keeps_the_rest() {
        let base = flotilla_gateway::Limits::default();
        let fresh = flotilla_gateway::Limits {
            max_in_flight: 7,
            workers: 3,
            max_retries: 0,
            retry_budget_ratio: 0.5,
            retry_budget_min_per_second: 9,
            outlier_consecutive_failures: 2,
            outlier_base_ejection: Duration::from_secs(1),
            outlier_max_ejection: Duration::from_secs(2),
            ..base.clone()
        };
        let applied = reloadable_limits(&base, &fresh);
        assert_eq!(
            (applied.max_in_flight, applied.workers),
            (base.max_in_flight, base.workers)
        );
        assert_eq!(
            (
                applied.max_retries,
                applied.retry_budget_ratio,
                applied.retry_budget_min_per_second,
                applied.outlier_consecutive_failures,
                applied.outlier_base_ejection,
                applied.outlier_max_ejection,
            ),
            (0, 0.5, 9, 2, Duration::from_secs(1), Duration::from_secs(2))
        );
    }

    #[test]
    fn a_changed_tls_section_needs_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["a.pem", "a-key.pem", "b.pem"] {
            std::fs::write(dir.path().join(f), "pem").unwrap();
        }
        let with = |cert: &str, version: &str| {
            let d = dir.path().display();
            m(&format!(
                "name = \"x\"\n[gateway.tls]\ncert = \"{d}/{cert}\"\nkey = \"{d}/a-key.pem\"\nmin_version = \"{version}\"\n{}",
                BASE.trim_start_matches("name = \"x\"\n")
            ))
        };
        let base = with("a.pem", "1.2");
        assert!(restart_needed(&base, &with("a.pem", "1.2")).is_ok());
        for next in [with("b.pem", "1.2"), with("a.pem", "1.3"), m(BASE)] {
            let why = restart_needed(&base, &next).unwrap_err();
            assert!(why.contains("[gateway.tls]"), "{why}");
        }
    }
}
