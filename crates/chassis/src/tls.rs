//! Where the instance's identity files are.
//!
//! The runtime hands every instance its identity as PEM files
//! (`FLOTILLA_TLS_CERT`, `FLOTILLA_TLS_KEY`, `FLOTILLA_TLS_CA`) and
//! `https` dependency URLs. This module reads and validates the variables
//! (all three or none); the server and client builders load the files
//! (see `Service::serve` and `Service::client`).

use std::path::PathBuf;

use crate::Error;
use crate::config::Env;

const VARS: [&str; 3] = ["FLOTILLA_TLS_CERT", "FLOTILLA_TLS_KEY", "FLOTILLA_TLS_CA"];

/// An instance's identity files, as the runtime provides them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain of this instance.
    pub cert: PathBuf,
    /// PEM private key of this instance.
    pub key: PathBuf,
    /// PEM bundle of the CA that issues the system's identities.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// All three variables, or none; a partial set is a misconfiguration.
    pub(crate) fn from_env(env: &Env) -> Result<Option<Self>, Error> {
        let values: Vec<Option<&String>> = VARS
            .iter()
            .map(|var| env.get(*var).filter(|v| !v.trim().is_empty()))
            .collect();
        match values.as_slice() {
            [Some(cert), Some(key), Some(ca)] => Ok(Some(TlsFiles {
                cert: PathBuf::from(cert.as_str()),
                key: PathBuf::from(key.as_str()),
                ca: PathBuf::from(ca.as_str()),
            })),
            [None, None, None] => Ok(None),
            _ => {
                let missing = VARS
                    .iter()
                    .zip(&values)
                    .find(|(_, v)| v.is_none())
                    .map(|(var, _)| *var)
                    .unwrap_or(VARS[0]);
                Err(Error::InvalidEnv {
                    var: missing.to_owned(),
                    value: String::new(),
                    reason: "the other FLOTILLA_TLS_* variables are set but this one is not".into(),
                    fix: "set all of FLOTILLA_TLS_CERT, FLOTILLA_TLS_KEY and FLOTILLA_TLS_CA, or none"
                        .into(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::env_of;

    #[test]
    fn none_or_all() {
        assert_eq!(TlsFiles::from_env(&env_of(&[])).unwrap(), None);
        let all = TlsFiles::from_env(&env_of(&[
            ("FLOTILLA_TLS_CERT", "/c.pem"),
            ("FLOTILLA_TLS_KEY", "/k.pem"),
            ("FLOTILLA_TLS_CA", "/ca.pem"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(all.key, PathBuf::from("/k.pem"));
        let err = TlsFiles::from_env(&env_of(&[("FLOTILLA_TLS_CERT", "/c.pem")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("FLOTILLA_TLS_KEY"), "{err}");
    }
}
