//! The local control plane: everything `flotilla up` does on one machine.
//!
//! Given a validated [`Manifest`], [`System::start`] builds the cargo-run
//! services once, opens one stable loopback *service address* per service,
//! starts each service's instances with the runtime contract's environment,
//! routes to an instance only once its `/readyz` answers, restarts crashed
//! instances with exponential backoff, scales functions from zero on demand
//! and back to zero when idle, and puts the gateway in front. It writes
//! `endpoints.json` into the data dir and serves a loopback control API that
//! `flotilla status` and `flotilla down` talk to.
//!
//! It also owns the system's identities (the `mesh` module): the CA in
//! `<data-dir>/ca`, a certificate and an ACL for every instance before it
//! starts, re-issued at 70 % of their life, and certificates of its own for
//! the gateway (mTLS to instances), its health checks and the operator's
//! CLI (the only identity the control API answers).
//!
//! Processes are tied to the runtime's life: each child gets
//! `PR_SET_PDEATHSIG`, so even a `kill -9` of `flotilla` leaves no orphans.

mod address;
mod broker;
mod build;
mod console;
mod control;
mod dirlock;
mod endpoints;
mod mesh;
mod pool;
mod process;
mod reload;
mod system;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use broker::{BrokerError, check as check_broker};
pub use build::Profile;
pub use console::{LineWriter, Lines};
pub use control::{ControlClient, ControlError, QueueStats};
pub use endpoints::{Endpoints, InstanceEndpoint, ServiceEndpoint};
pub use mesh::{ENV_ACL_FILE, MeshError};
pub use pool::{InstanceState, InstanceStatus, ReloadStatus, ServiceStatus, Status};
pub use system::System;

/// How to run a system.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where logs, databases and `endpoints.json` go.
    pub data_dir: PathBuf,
    /// Overrides the gateway's listen address from the manifest.
    pub listen: Option<SocketAddr>,
    /// Which cargo profile to build services with.
    pub profile: Profile,
    /// Print each instance's output, prefixed with its id, to stdout.
    pub echo_logs: bool,
    /// Show a progress display while building and the table when ready.
    pub interactive: bool,
    /// Watch the manifest and reload the gateway's routes and policies
    /// when it changes (what `flotilla up` does).
    pub watch: bool,
    /// When the manifest was read: the clock taken just before
    /// `Manifest::load`. With `watch`, a watched file changed since (while
    /// the services build and start) is applied once the system is up.
    /// `None`: when [`System::start`] is called.
    pub manifest_read_at: Option<std::time::SystemTime>,
    /// Overrides the manifest's `[mesh] leaf_lifetime` (tests of rotation).
    pub leaf_lifetime: Option<std::time::Duration>,
    /// Overrides the manifest's `[mesh] mode` (tests of audit mode).
    pub mesh_mode: Option<flotilla_manifest::MeshMode>,
}

impl Options {
    /// Defaults for `data_dir`: release builds, quiet.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Options {
            data_dir: data_dir.into(),
            listen: None,
            profile: Profile::Release,
            echo_logs: false,
            interactive: false,
            watch: false,
            manifest_read_at: None,
            leaf_lifetime: None,
            mesh_mode: None,
        }
    }
}

/// Why a system could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot use data dir {}", path.display())]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "a system is already running from data dir {} (control API {url}); stop it with `flotilla down --data-dir {}` or pick another --data-dir",
        data_dir.display(),
        data_dir.display()
    )]
    AlreadyRunning { data_dir: PathBuf, url: String },
    #[error(
        "data dir {} is in use by another `flotilla up` (pid {pid}); stop it with `flotilla down --data-dir {}` or pick another --data-dir",
        data_dir.display(),
        data_dir.display()
    )]
    DataDirInUse { data_dir: PathBuf, pid: String },
    #[error(transparent)]
    Build(#[from] build::BuildError),
    #[error("cannot listen on {addr} for {what}: {reason}")]
    Listen {
        what: String,
        addr: SocketAddr,
        reason: String,
    },
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("gateway failed to start")]
    Gateway(#[source] flotilla_gateway::Error),
    #[error("cannot set up the system's identities (mutual TLS)")]
    Mesh(#[from] MeshError),
}
