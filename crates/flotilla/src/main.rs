//! The `flotilla` command line. It parses arguments and calls the library
//! crates; the logic lives there, so tests and other tools can use it too.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use flotilla_manifest::Manifest;
use flotilla_runtime::{ControlClient, Options, Profile, Status, System};

/// The gateway, broker and runtime run in this process and allocate per
/// request; mimalloc (through flotilla-alloc) cut the gateway's CPU per
/// proxied request by ~10 % and raised its throughput by 12–15 % against
/// glibc's malloc in benches/gateway (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: flotilla_alloc::Allocator = flotilla_alloc::Allocator;

/// Run a system of microservices described by one flotilla.toml.
#[derive(Parser)]
#[command(name = "flotilla", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build and run the system until Ctrl-C or `flotilla down`.
    Up {
        /// The manifest; defaults to flotilla.toml in this or a parent directory.
        manifest: Option<PathBuf>,
        /// Where logs, databases and endpoints.json go [default: .flotilla beside the manifest].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Gateway address, overriding the manifest's (`127.0.0.1:0` picks a free port).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Build services with the dev profile instead of --release.
        #[arg(long)]
        dev: bool,
        /// Do not echo instance output (it is still written to <data-dir>/logs).
        #[arg(long, short)]
        quiet: bool,
    },
    /// Validate the manifest and print every problem in it.
    Check {
        /// The manifest; defaults to flotilla.toml in this or a parent directory.
        manifest: Option<PathBuf>,
    },
    /// Show the services and instances of the running system.
    Status {
        /// Print the full status as JSON.
        #[arg(long)]
        json: bool,
        /// The running system's data dir [default: .flotilla beside the manifest].
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Show each queue's depth, in-flight and dead-lettered counts.
    Queues {
        /// The manifest naming the queues; defaults to flotilla.toml in this or a parent directory.
        manifest: Option<PathBuf>,
        /// The running system's data dir [default: .flotilla beside the manifest].
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Move messages from a dead-letter queue back to the queues they came from.
    Redrive {
        /// The dead-letter queue.
        queue: String,
        /// Move at most this many.
        #[arg(long, default_value_t = 10_000)]
        max: u64,
        /// The running system's data dir [default: .flotilla beside the manifest].
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Drop the gateway's kept responses (routes with `cache`) whose path
    /// starts with PREFIX, so the next request for each reaches its service.
    Purge {
        /// A path prefix, such as `/api/reviews/`; `/` drops every kept response.
        #[arg(default_value = "/")]
        prefix: String,
        /// The running system's data dir [default: .flotilla beside the manifest].
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Make a new API key for CONSUMER (routes with `auth = "key"`): prints
    /// the key, for the client, and the line for `[gateway.api_keys]`,
    /// which keeps only its SHA-256.
    ApiKey {
        /// The consumer's name, such as `partner-a`.
        consumer: String,
    },
    /// Stop the running system gracefully.
    Down {
        /// The running system's data dir [default: .flotilla beside the manifest].
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

/// Like `println!`, but a closed stdout (`flotilla status | head`) is not a
/// panic: the reader has what it wanted.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// Like `eprintln!`, but a stderr that cannot be written (the terminal hung
/// up, `2>&-`) is not a panic: a message lost is better than a stop cut
/// short.
macro_rules! err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// Exit code for an invalid manifest, distinct from runtime failures.
const EXIT_INVALID: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Through a queue to a thread of its own: at `FLOTILLA_LOG=info` each
    // request's access line is logged, and a stderr nobody reads (a pipe
    // to a pager) must not stop the gateway's workers that log them.
    let stderr = flotilla_runtime::Lines::spawn("flotilla-stderr", std::io::stderr());
    let logs = tracing_subscriber::fmt().with_env_filter(
        tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
    );
    match stderr.clone() {
        Some(lines) => logs.with_writer(move || lines.writer()).init(),
        // No thread for it: straight to stderr, as before.
        None => logs.with_writer(std::io::stderr).init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            err!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(cli.command));
    // Tasks still running (instances' supervisors, after a second Ctrl-C)
    // are dropped, and with them their processes and process groups;
    // nothing that blocks may hold the exit up for long.
    runtime.shutdown_timeout(Duration::from_secs(2));
    if let Some(stderr) = &stderr {
        stderr.flush(Duration::from_secs(1));
    }
    code
}

async fn run(command: Command) -> ExitCode {
    match command {
        Command::Check { manifest } => match load(manifest.as_deref()) {
            Ok(m) => {
                let events = if m.uses_broker() {
                    format!(
                        "; {}, {}, {}",
                        count(m.topics.len(), "topic"),
                        count(m.queues.len(), "queue"),
                        count(m.streams.len(), "stream")
                    )
                } else {
                    String::new()
                };
                out!(
                    "{}: ok — system `{}` with {} and {}{events}",
                    m.file.display(),
                    m.name,
                    count(m.services.len(), "service"),
                    count(m.routes().count(), "route")
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Up {
            manifest,
            data_dir,
            listen,
            dev,
            quiet,
        } => {
            // Before the file is read: the watcher applies what is saved
            // from here on, while the services build and start.
            let read_at = std::time::SystemTime::now();
            let manifest = match load(manifest.as_deref()) {
                Ok(m) => m,
                Err(code) => return code,
            };
            // `--listen` replaces the `listen` the manifest's own check
            // compared `http_redirect` with: compare again, before anything
            // is built, rather than fail to bind once the system starts.
            if let Some(listen) = listen
                && let Some(redirect) = manifest.gateway.redirect_clashes_with(listen)
            {
                err!(
                    "error: `--listen {listen}` takes the port of `[gateway.tls] http_redirect = \"{redirect}\"` in {}\n  help: give `--listen` another port, or move `http_redirect` to one of its own",
                    manifest.file.display()
                );
                return ExitCode::from(EXIT_INVALID);
            }
            let data_dir = data_dir.unwrap_or_else(|| manifest.dir.join(".flotilla"));
            if let Some(served) = serves(&manifest, &data_dir) {
                err!(
                    "error: the data directory {} is inside the gateway's static directory {}, which would serve its CA keys and control token to anyone\n  help: give `--data-dir` a place outside `static`",
                    data_dir.display(),
                    served.display()
                );
                return ExitCode::from(EXIT_INVALID);
            }
            let mut options = Options::new(data_dir);
            options.manifest_read_at = Some(read_at);
            options.listen = listen;
            options.profile = if dev { Profile::Dev } else { Profile::Release };
            options.echo_logs = !quiet;
            options.interactive = true;
            options.watch = true;
            up(manifest, options).await
        }
        Command::Status { json, data_dir } => {
            let client = match open(data_dir) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match client.status().await {
                Ok(status) if json => match serde_json::to_string_pretty(&status) {
                    Ok(text) => {
                        out!("{text}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(&e),
                },
                Ok(status) => {
                    print_status(&status, client.endpoints());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::Queues { manifest, data_dir } => {
            let manifest = match load(manifest.as_deref()) {
                Ok(m) => m,
                Err(code) => return code,
            };
            let data_dir = data_dir.unwrap_or_else(|| manifest.dir.join(".flotilla"));
            let client = match open(Some(data_dir)) {
                Ok(c) => c,
                Err(code) => return code,
            };
            out!(
                "{:<28} {:>8} {:>9} {:>8} {:>13}",
                "QUEUE",
                "READY",
                "IN-FLIGHT",
                "DELAYED",
                "DEAD-LETTERED"
            );
            for name in manifest.queues.keys() {
                match client.queue_stats(name).await {
                    Ok(q) => out!(
                        "{:<28} {:>8} {:>9} {:>8} {:>13}",
                        q.queue,
                        q.ready,
                        q.in_flight,
                        q.delayed,
                        q.dead_lettered
                    ),
                    Err(e) => return fail(&e),
                }
            }
            ExitCode::SUCCESS
        }
        Command::Redrive {
            queue,
            max,
            data_dir,
        } => {
            let client = match open(data_dir) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match client.redrive(&queue, max).await {
                Ok(moved) => {
                    out!("moved {moved} message(s) from {queue} back to where they came from");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::Purge { prefix, data_dir } => {
            if !prefix.starts_with('/') {
                err!(
                    "error: `{prefix}` is not a path prefix: give one starting with `/` (`/` alone drops every kept response)"
                );
                return ExitCode::from(EXIT_INVALID);
            }
            let client = match open(data_dir) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match client.purge_cache(&prefix).await {
                Ok(purged) => {
                    out!(
                        "purged {} kept response(s), {} bytes, under {prefix}",
                        purged.responses,
                        purged.bytes
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::ApiKey { consumer } => {
            if !flotilla_manifest::ApiKeys::is_consumer_name(&consumer) {
                err!(
                    "error: `{consumer}` is not a consumer name: use up to 64 letters, digits, `-`, `_` or `.`"
                );
                return ExitCode::from(EXIT_INVALID);
            }
            let Some(new) = flotilla_gateway::new_api_key() else {
                err!("error: the system's random number generator failed");
                return ExitCode::FAILURE;
            };
            out!("key for {consumer} (give it to the client; it is not kept anywhere):");
            out!("  {}", new.key);
            out!(
                "add to flotilla.toml (the digest lets no one in; keep one per key while rotating):"
            );
            out!("  [gateway.api_keys]");
            out!("  consumers = {{ {consumer} = [\"{}\"] }}", new.digest);
            ExitCode::SUCCESS
        }
        Command::Down { data_dir } => {
            let client = match open(data_dir) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match client.shutdown(Duration::from_secs(60)).await {
                Ok(true) => {
                    out!("stopped {}", client.endpoints().system);
                    ExitCode::SUCCESS
                }
                Ok(false) => {
                    err!(
                        "error: asked {} to stop, but it is still running after 60 s",
                        client.endpoints().system
                    );
                    ExitCode::FAILURE
                }
                Err(e) => fail(&e),
            }
        }
    }
}

async fn up(manifest: Manifest, options: Options) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    // Listened for before anything starts: Ctrl-C while the system starts
    // would otherwise kill `flotilla` at once, and what its instances had
    // started themselves (a wrapper's server) would be left running.
    // A hangup (the terminal or SSH session that ran `flotilla up` closed)
    // stops the system as SIGTERM does: its default action would kill
    // `flotilla` with no drain, and leave what wrappers started running.
    // Unless it is ignored, as `nohup flotilla up &` asks: listening for it
    // would undo that, and the system would stop at logout.
    let hangup = if hangup_ignored() {
        None
    } else {
        Some(signal(SignalKind::hangup()))
    };
    let (mut interrupt, mut sigterm, mut hangup) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        hangup.transpose(),
    ) {
        (Ok(i), Ok(t), Ok(h)) => (i, t, h),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return fail(&e),
    };
    let mut hangup = async move || match &mut hangup {
        Some(h) => h.recv().await,
        None => std::future::pending().await,
    };
    let system = tokio::select! {
        started = System::start(manifest, options) => match started {
            Ok(s) => s,
            Err(e) => return fail(&e),
        },
        _ = interrupt.recv() => return interrupted("while starting"),
        _ = sigterm.recv() => return interrupted("while starting"),
        _ = hangup() => return interrupted("while starting"),
    };
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = sigterm.recv() => {}
        _ = hangup() => {}
        _ = system.shutdown_requested() => {}
    }
    out!("stopping (Ctrl-C again to kill the instances at once)");
    tokio::select! {
        () = system.shutdown() => ExitCode::SUCCESS,
        _ = interrupt.recv() => interrupted("while stopping"),
    }
}

/// Whether SIGHUP is ignored in this process (`nohup` leaves it so).
fn hangup_ignored() -> bool {
    // SAFETY: with a null new action, sigaction(2) only writes the current
    // one into `old`, a zeroed struct of the right type.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Gives up at once: the instances (and their process groups) are killed
/// as the runtime drops their supervisors.
fn interrupted(when: &str) -> ExitCode {
    err!("interrupted {when}: killing the instances");
    ExitCode::from(130)
}

/// `1 topic`, `3 topics`.
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Finds and loads the manifest, printing errors; follows a symlinked
/// manifest so relative paths and the data dir are those of its real place.
/// A directory stands for the flotilla.toml in it (`flotilla check
/// examples/shop`), not its parents': a path given is meant exactly.
fn load(path: Option<&Path>) -> Result<Manifest, ExitCode> {
    let path = match path {
        Some(p) if p.is_dir() => p.join(flotilla_manifest::FILE_NAME),
        Some(p) => p.to_path_buf(),
        None => {
            let cwd = std::env::current_dir().map_err(|e| fail(&e))?;
            Manifest::find(&cwd).map_err(|e| fail(&e))?
        }
    };
    let path = path.canonicalize().unwrap_or(path);
    let manifest = Manifest::load(&path).map_err(|e| match e {
        flotilla_manifest::Error::Invalid { .. } => {
            err!("{e}");
            ExitCode::from(EXIT_INVALID)
        }
        other => fail(&other),
    })?;
    // What the manifest alone cannot judge: filter conditions and the
    // broker's limits, checked by the broker's own rules.
    if let Err(e) = flotilla_runtime::check_broker(&manifest) {
        err!("error: {}: {e}", path.display());
        return Err(ExitCode::from(EXIT_INVALID));
    }
    Ok(manifest)
}

/// The gateway's static directory, if `data_dir` is inside it (where it
/// need not exist yet).
fn serves<'m>(manifest: &'m Manifest, data_dir: &Path) -> Option<&'m Path> {
    let served = manifest.gateway.static_dir.as_deref()?;
    let served_at = served.canonicalize().ok()?;
    let data_at = std::path::absolute(data_dir).ok()?;
    // The data directory may not exist yet: resolve the part that does.
    let existing = data_at.ancestors().find_map(|a| {
        let real = a.canonicalize().ok()?;
        Some(real.join(data_at.strip_prefix(a).ok()?))
    })?;
    existing.starts_with(&served_at).then_some(served)
}

fn open(data_dir: Option<PathBuf>) -> Result<ControlClient, ExitCode> {
    let dir = match data_dir {
        Some(d) => d,
        None => {
            let cwd = std::env::current_dir().map_err(|e| fail(&e))?;
            match Manifest::find(&cwd) {
                Ok(p) => {
                    let p = p.canonicalize().unwrap_or(p);
                    p.parent().unwrap_or(Path::new(".")).join(".flotilla")
                }
                Err(_) => cwd.join(".flotilla"),
            }
        }
    };
    ControlClient::open(&dir).map_err(|e| fail(&e))
}

/// Prints an error with its chain of causes and returns the failure code.
fn fail(e: &dyn std::error::Error) -> ExitCode {
    let mut message = format!("error: {e}");
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    err!("{message}");
    ExitCode::FAILURE
}

fn print_status(status: &Status, endpoints: &flotilla_runtime::Endpoints) {
    out!(
        "system {}  gateway {}  console {}",
        status.system,
        status.gateway,
        endpoints.console
    );
    out!(
        "{:<16} {:<9} {:>7} {:>8}  ADDRESS",
        "SERVICE",
        "SHAPE",
        "READY",
        "RESTARTS"
    );
    for s in &status.services {
        out!(
            "{:<16} {:<9} {:>3}/{:<3} {:>8}  {}{}",
            s.name,
            s.shape,
            s.ready,
            s.max,
            s.restarts,
            s.address,
            if s.crash_loop { "  CRASH LOOP" } else { "" }
        );
        for i in &s.instances {
            out!(
                "  {:<14} {:<9} pid {:<8} {:<22} restarts {}{}",
                i.id,
                format!("{:?}", i.state).to_lowercase(),
                i.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                i.address.clone().unwrap_or_default(),
                i.restarts,
                i.last_exit
                    .as_ref()
                    .map(|e| format!("  last exit: {e}"))
                    .unwrap_or_default()
            );
        }
        if let Some(err) = &s.last_error
            && s.ready == 0
            && s.min > 0
        {
            out!("  last error: {}", err.lines().next().unwrap_or(""));
        }
    }
    if let Some(why) = &status.reloads.last_refusal {
        out!(
            "manifest edit refused (the running configuration stays): {}",
            why.lines().next().unwrap_or("")
        );
    }
}
