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

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flotilla_gateway::{Config as GatewayConfig, Gateway};
use flotilla_manifest::{Manifest, Service};
use tokio::sync::watch;

use crate::console::Console;

/// How often the manifest's modification time is checked.
const POLL: Duration = Duration::from_millis(500);

/// What the running system was started with, to compare a new file against.
pub(crate) struct Watched {
    pub manifest: Manifest,
    /// The gateway config the system runs, whose runtime-owned fields
    /// (listen address, access log, upstream TLS) every reload keeps.
    pub base: GatewayConfig,
}

/// Polls the manifest, and the files it names that the gateway reads,
/// until `stop`, reloading the gateway when one of them changes.
pub(crate) async fn watch_manifest(
    mut watched: Watched,
    gateway: Arc<Gateway>,
    console: Arc<Console>,
    mut stop: watch::Receiver<bool>,
) {
    let mut files = watched_files(&watched.manifest);
    let mut seen = stamps(&files);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.changed() => return,
        }
        let now = stamps(&files);
        if now == seen {
            continue;
        }
        let changed: Vec<String> = files
            .iter()
            .zip(seen.iter().zip(&now))
            .filter(|(_, (before, after))| before != after)
            .map(|(path, _)| path.display().to_string())
            .collect();
        let changed = changed.join(", ");
        seen = now;
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
                    "{changed} changed: gateway reloaded ({} routes)",
                    config.routes.len()
                ));
                // The new manifest may name other list files.
                files = watched_files(&manifest);
                seen = stamps(&files);
                watched = Watched {
                    manifest,
                    base: config,
                };
            }
            Err(why) => console.warn(&format!(
                "{changed} changed but was not applied; the running configuration stays:\n{why}"
            )),
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

fn stamps(files: &[PathBuf]) -> Vec<Option<SystemTime>> {
    files.iter().map(|f| modified(f)).collect()
}

fn modified(file: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(file).and_then(|m| m.modified()).ok()
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
