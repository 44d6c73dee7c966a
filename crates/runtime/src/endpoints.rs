//! `<data-dir>/endpoints.json`: where everything of a running system is, for
//! scripts, tests and the CLI's `status`/`down`. Written atomically (temp
//! file + rename) so a reader never sees half a file.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file's name inside the data dir.
pub const FILE_NAME: &str = "endpoints.json";

/// The contents of `endpoints.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Endpoints {
    pub system: String,
    /// Process id of the `flotilla up` that owns the system.
    pub pid: u32,
    /// Base URL of the gateway.
    pub gateway: String,
    /// Base URL of the read-only console page (plain loopback HTTP).
    pub console: String,
    /// Base URL of the control API.
    pub control: String,
    /// Bearer token the control API requires for changes (the file is 0600).
    pub control_token: String,
    /// Base URL of the event broker (mutual TLS), when the system has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    pub services: BTreeMap<String, ServiceEndpoint>,
}

/// One service's stable address and current instances.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceEndpoint {
    /// The service address (`FLOTILLA_URL_<NAME>` of its callers).
    pub address: String,
    pub shape: String,
    pub instances: Vec<InstanceEndpoint>,
}

/// One ready instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceEndpoint {
    pub id: String,
    pub address: String,
    pub pid: u32,
}

impl Endpoints {
    /// The path of the file in `data_dir`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(FILE_NAME)
    }

    /// Reads the file of a running (or crashed) system.
    pub fn read(data_dir: &Path) -> io::Result<Endpoints> {
        let text = std::fs::read_to_string(Self::path(data_dir))?;
        serde_json::from_str(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Writes atomically with mode 0600 (it holds the control token).
    pub(crate) fn write(&self, data_dir: &Path) -> io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = data_dir.join(format!(".{FILE_NAME}.tmp"));
        let json = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        std::fs::rename(&tmp, Self::path(data_dir))
    }
}
