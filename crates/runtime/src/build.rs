//! Builds every cargo-run service with one `cargo build`, so shared
//! dependencies compile once and cargo's own parallelism is used, and finds
//! each binary from cargo's JSON messages rather than guessing paths under
//! `target/` (which differ with `CARGO_TARGET_DIR`, profiles and targets).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use flotilla_manifest::{Manifest, Run};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

/// Which cargo profile services are built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `--release`: what `flotilla up` uses.
    Release,
    /// The dev profile: what tests use, to share artifacts with `cargo test`.
    Dev,
}

/// Why the build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "cannot run `{cargo}`: {source}; install Rust (https://rustup.rs) or set CARGO to cargo's path"
    )]
    Spawn {
        cargo: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`cargo build` failed for {packages}:\n{output}")]
    Failed { packages: String, output: String },
    #[error(
        "`cargo build` produced no binary `{bin}` for package `{package}`; check `run = {{ cargo = \"{package}\" }}` names a package with that binary (set `bin` if it has another name)"
    )]
    MissingBinary { package: String, bin: String },
}

/// The executables of the cargo-run services, by `(package, bin)`.
pub(crate) type Binaries = BTreeMap<(String, String), PathBuf>;

#[derive(Deserialize)]
struct Message {
    reason: String,
    package_id: Option<String>,
    target: Option<Target>,
    executable: Option<PathBuf>,
}

#[derive(Deserialize)]
struct Target {
    name: String,
}

/// The binary name a `Run::Cargo` resolves to.
pub(crate) fn bin_name(package: &str, bin: Option<&str>) -> String {
    bin.unwrap_or(package).to_string()
}

/// Whether `name` is one of the variables `cargo run` and `cargo test` set
/// for the program they start (flotilla's own manifest dir, package name
/// and version, ...), which the services' build must not inherit. Build
/// scripts read some of them and ask cargo to rerun when they change (ring
/// reads `CARGO_MANIFEST_DIR` and `CARGO_PKG_NAME`); cargo compares them
/// in its own environment. So a build inheriting flotilla's values and the
/// user's next `cargo run`, which has none, each found the other's stale:
/// every `flotilla up` rebuilt ring and all above it in the services (four
/// minutes here, with fat LTO), and the next `cargo run -- status` rebuilt
/// flotilla (three). The user's own settings (`CARGO_HOME`,
/// `CARGO_TARGET_DIR`, `CARGO_PROFILE_*`, ...) are kept.
fn set_for_the_running_package(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_BIN_EXE_")
        || matches!(
            name,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
        )
}

/// `cargo build` with JSON messages, without the running package's
/// variables ([`set_for_the_running_package`]).
fn cargo_build(cargo: &str) -> Command {
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--message-format=json-render-diagnostics");
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(set_for_the_running_package) {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Builds all cargo-run services of `manifest`.
pub(crate) async fn build(
    manifest: &Manifest,
    profile: Profile,
    show_progress: bool,
) -> Result<Binaries, BuildError> {
    let wanted: Vec<(String, String)> = manifest
        .services
        .values()
        .filter_map(|s| match &s.run {
            Run::Cargo { package, bin } => {
                Some((package.clone(), bin_name(package, bin.as_deref())))
            }
            Run::Command { .. } => None,
        })
        .collect();
    if wanted.is_empty() {
        return Ok(Binaries::new());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = cargo_build(&cargo);
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    let mut packages: Vec<&str> = wanted.iter().map(|(p, _)| p.as_str()).collect();
    packages.dedup();
    for p in &packages {
        cmd.arg("-p").arg(p);
    }
    cmd.current_dir(&manifest.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| BuildError::Spawn {
        cargo: cargo.clone(),
        source,
    })?;

    let bar = show_progress.then(|| {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} building {msg} [{elapsed}]")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    });

    // Drain stderr concurrently so cargo never blocks on a full pipe.
    let mut stderr = child.stderr.take();
    let stderr_task = tokio::spawn(async move {
        let mut out = String::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_string(&mut out).await;
        }
        out
    });

    let mut found = Binaries::new();
    let mut compiled = 0usize;
    if let Some(stdout) = child.stdout.take() {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let Ok(msg) = serde_json::from_str::<Message>(&line) else {
                continue;
            };
            if msg.reason != "compiler-artifact" {
                continue;
            }
            compiled += 1;
            if let (Some(bar), Some(t)) = (&bar, &msg.target) {
                bar.set_message(format!("{} ({compiled} crates)", t.name));
            }
            let (Some(exe), Some(target), Some(id)) = (msg.executable, msg.target, msg.package_id)
            else {
                continue;
            };
            for (package, bin) in &wanted {
                if &target.name == bin && package_id_names(&id, package) {
                    found.insert((package.clone(), bin.clone()), exe.clone());
                }
            }
        }
    }
    let status = child.wait().await;
    let output = stderr_task.await.unwrap_or_default();
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let ok = matches!(status, Ok(s) if s.success());
    if !ok {
        return Err(BuildError::Failed {
            packages: packages.join(", "),
            output: tail(&output, 60),
        });
    }
    for (package, bin) in &wanted {
        if !found.contains_key(&(package.clone(), bin.clone())) {
            return Err(BuildError::MissingBinary {
                package: package.clone(),
                bin: bin.clone(),
            });
        }
    }
    Ok(found)
}

/// Whether cargo's package id (`path+file:///…#name@0.1.0`, or the older
/// `name 0.1.0 (path+file:///…)`) is the package `name`.
fn package_id_names(id: &str, name: &str) -> bool {
    if let Some((_, frag)) = id.rsplit_once('#') {
        let pkg = frag.split('@').next().unwrap_or(frag);
        // `#0.1.0` alone means the name is the path's last segment.
        if pkg.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            return id
                .split('#')
                .next()
                .and_then(|u| Path::new(u).file_name())
                .is_some_and(|f| f == name);
        }
        return pkg == name;
    }
    id.split(' ').next() == Some(name)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_package_s_variables_are_not_passed_on_and_settings_are() {
        for name in [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_BIN_EXE_flotilla",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
        ] {
            assert!(set_for_the_running_package(name), "{name}");
        }
        for name in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_PROFILE_RELEASE_LTO",
            "CARGO_BUILD_JOBS",
            "CARGO_INCREMENTAL",
            "CARGO_NET_OFFLINE",
            "CARGO_REGISTRIES_CRATES_IO_PROTOCOL",
            "RUSTFLAGS",
        ] {
            assert!(!set_for_the_running_package(name), "{name}");
        }
    }

    /// `cargo test` runs this with the package's variables set, as `cargo
    /// run` runs `flotilla`: the build's command takes them away.
    #[test]
    fn the_build_runs_without_the_running_package_s_variables() {
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
        let cmd = cargo_build("cargo");
        let removed: Vec<_> = cmd
            .as_std()
            .get_envs()
            .filter(|(_, value)| value.is_none())
            .filter_map(|(name, _)| name.to_str())
            .collect();
        assert!(removed.contains(&"CARGO_MANIFEST_DIR"), "{removed:?}");
        assert!(removed.contains(&"CARGO_PKG_NAME"), "{removed:?}");
        assert!(!removed.contains(&"CARGO"), "{removed:?}");
    }

    #[test]
    fn package_ids() {
        assert!(package_id_names(
            "path+file:///w/shop/catalog#shop-catalog@0.1.0",
            "shop-catalog"
        ));
        assert!(!package_id_names(
            "path+file:///w/shop/catalog#shop-catalog@0.1.0",
            "shop"
        ));
        assert!(package_id_names(
            "path+file:///w/shop-pricing#0.1.0",
            "shop-pricing"
        ));
        assert!(package_id_names(
            "shop-orders 0.1.0 (path+file:///w)",
            "shop-orders"
        ));
    }
}
