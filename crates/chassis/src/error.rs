//! The chassis' one error type: configuration, start-up and dependency-call
//! failures, each with the setting it concerns and what to do about it.
//!
//! HTTP mapping lives in [`crate::api`] (`impl From<Error> for ApiError`), not
//! here, so that there is exactly one place deciding status codes.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;

/// Everything the chassis can fail at.
///
/// Variants are structured so callers can branch on them (for example
/// [`Error::Status`] carries the dependency's HTTP status) and so that their
/// messages name the environment variable or manifest key to fix. A variant's
/// message never repeats its `#[source]`'s; print the chain to see both.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A variable of the runtime contract is absent.
    #[error("environment variable {var} is not set: {fix}")]
    MissingEnv {
        /// The variable's name.
        var: &'static str,
        /// What to do about it.
        fix: &'static str,
    },

    /// A variable of the runtime contract is present but unusable.
    #[error("environment variable {var}={value:?} is invalid: {reason}; {fix}")]
    InvalidEnv {
        /// The variable's name.
        var: String,
        /// The value found (never a secret: the chassis reads none).
        value: String,
        /// Why it was rejected.
        reason: String,
        /// What to write instead.
        fix: String,
    },

    /// [`crate::Service::client`] was asked for a dependency the runtime gave
    /// no URL for.
    #[error(
        "no URL for dependency `{dep}`: {var} is not set; add \"{dep}\" to `calls` of service `{service}` in flotilla.toml"
    )]
    UndeclaredDependency {
        /// The dependency asked for.
        dep: String,
        /// The variable that would hold its URL.
        var: String,
        /// The calling service.
        service: String,
    },

    /// [`crate::Service::database`] was called but the service has no database.
    #[error(
        "environment variable DATABASE_URL is not set; add `data = \"sqlite\"` to service `{service}` in flotilla.toml"
    )]
    NoDatabase {
        /// The calling service.
        service: String,
    },

    /// `DATABASE_URL` names an engine this chassis cannot open yet.
    #[error(
        "DATABASE_URL uses the `{scheme}` scheme, which this chassis does not support; use a sqlite:// URL (data = \"sqlite\")"
    )]
    UnsupportedDatabase {
        /// The URL's scheme (the rest is withheld: it may carry a password).
        scheme: String,
    },

    /// Opening or configuring the database failed.
    #[error("could not open the SQLite database {path}")]
    Database {
        /// The database file (or `:memory:`).
        path: String,
        /// What SQLite said.
        #[source]
        source: sqlx::Error,
    },

    /// Running the service's migrations failed.
    #[error("migrations failed on the SQLite database {path}")]
    Migrate {
        /// The database file (or `:memory:`).
        path: String,
        /// What the migrator said.
        #[source]
        source: sqlx::migrate::MigrateError,
    },

    /// A migration left rows whose foreign keys point at no row (foreign
    /// keys are off while migrations run, and checked before committing);
    /// nothing was applied.
    #[error(
        "migrations on the SQLite database {path} were rolled back: {violations}; fix the migration so every reference still holds"
    )]
    MigrateForeignKeys {
        /// The database file (or `:memory:`).
        path: String,
        /// Which tables hold such rows, and which tables they point at.
        violations: String,
    },

    /// The listen address could not be bound.
    #[error("could not bind {addr}; set FLOTILLA_LISTEN to a free address")]
    Bind {
        /// The address from `FLOTILLA_LISTEN`/`PORT`.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The server stopped with an I/O error.
    #[error("the HTTP server on {addr} failed")]
    Serve {
        /// The bound address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A shutdown signal handler could not be installed.
    #[error("could not install the {signal} handler")]
    Signal {
        /// `SIGTERM` or `SIGINT`.
        signal: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The instance's identity files (`FLOTILLA_TLS_*`) are unusable.
    #[error(
        "cannot use this instance's identity (FLOTILLA_TLS_CERT, FLOTILLA_TLS_KEY, FLOTILLA_TLS_CA)"
    )]
    Identity {
        /// What is wrong with which file.
        #[source]
        source: flotilla_mesh::tls::TlsError,
    },

    /// The ACL file (`FLOTILLA_ACL_FILE`) is unusable.
    #[error("the ACL file {} (FLOTILLA_ACL_FILE) {problem}", path.display())]
    Acl {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        problem: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// The HTTP client for a dependency could not be built.
    #[error("could not build the HTTP client for dependency `{dep}`")]
    ClientBuild {
        /// The dependency.
        dep: String,
        /// What reqwest said.
        #[source]
        source: reqwest::Error,
    },

    /// A dependency could not be reached (connection refused, reset, DNS…).
    #[error("dependency `{dep}` is unreachable at {url}")]
    Unreachable {
        /// The dependency.
        dep: String,
        /// The URL called.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },

    /// A dependency did not answer in time.
    #[error("dependency `{dep}` did not answer {url} within {timeout:?}")]
    Timeout {
        /// The dependency.
        dep: String,
        /// The URL called.
        url: String,
        /// The total timeout that expired.
        timeout: Duration,
    },

    /// A dependency answered with a non-2xx status.
    #[error("dependency `{dep}` answered {url} with {status}: {body}")]
    Status {
        /// The dependency.
        dep: String,
        /// The URL called.
        url: String,
        /// Its status.
        status: StatusCode,
        /// The start of its body (at most a few KiB, lossy UTF-8).
        body: String,
    },

    /// A dependency answered 2xx with a body that is not the expected JSON.
    #[error("dependency `{dep}` answered {url} with a body that is not the expected JSON")]
    BadJson {
        /// The dependency.
        dep: String,
        /// The URL called.
        url: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },

    /// A dependency answered with a body larger than the client accepts.
    #[error("dependency `{dep}` answered {url} with a body larger than {limit} bytes")]
    TooLarge {
        /// The dependency.
        dep: String,
        /// The URL called.
        url: String,
        /// The limit in bytes.
        limit: usize,
    },

    /// An event does not follow the CloudEvents rules the broker enforces
    /// (see [`crate::Event::validate`]).
    #[error("invalid CloudEvent: {reason}")]
    InvalidEvent {
        /// What is wrong, naming the attribute.
        reason: String,
    },

    /// An event's `data` could not be serialized as JSON.
    #[error("could not encode the data of a `{ty}` event as JSON")]
    EventEncode {
        /// The event's type.
        ty: String,
        /// The encoding error.
        #[source]
        source: serde_json::Error,
    },

    /// An event's `data` is not the type the consumer expected
    /// ([`crate::Event::data_as`]).
    #[error("the data of event {id} (type `{ty}`) is not what this consumer expects")]
    EventData {
        /// The event's id.
        id: String,
        /// The event's type.
        ty: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },

    /// [`crate::Service::broker`] was called but the runtime gave no broker.
    #[error(
        "environment variable FLOTILLA_BROKER_URL is not set; declare `publishes` or `consumes` for service `{service}` in flotilla.toml"
    )]
    NoBroker {
        /// The calling service.
        service: String,
    },

    /// A topic, queue, stream, group or consumer name that the broker would
    /// not accept (and that must not be spliced into a URL).
    #[error(
        "{kind} name `{name}` is invalid: use 1-80 ASCII letters, digits and hyphens, as declared in flotilla.toml"
    )]
    BrokerName {
        /// `topic`, `queue`, `stream`, `group` or `consumer`.
        kind: &'static str,
        /// The name given.
        name: String,
    },

    /// The broker answered with an error. Unreachable and timeout are
    /// [`Error::Unreachable`] and [`Error::Timeout`] with dependency
    /// `broker`.
    #[error("the broker answered {url} with {status} {code}: {message}")]
    Broker {
        /// The URL called.
        url: String,
        /// Its status, e.g. 409 for `stale_receipt`.
        status: StatusCode,
        /// The broker's stable error code, e.g. `stale_receipt`,
        /// `unknown_topic`, `lease_lost` (see docs/broker.md, "Errors");
        /// `unexpected_response` when the body was not the broker's.
        code: String,
        /// The broker's message.
        message: String,
    },

    /// A statement on the service's database failed (outbox, inbox).
    #[error("could not {what}")]
    Sql {
        /// What was being done, e.g. `write the event to the outbox`.
        what: &'static str,
        /// What SQLite said.
        #[source]
        source: sqlx::Error,
    },

    /// A request body could not be encoded as JSON.
    #[error("could not encode the JSON body for {url}")]
    Encode {
        /// The URL that would have been called.
        url: String,
        /// The encoding error.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// True for failures of a call to another service or the broker
    /// (unreachable, timeout, non-2xx, bad or oversized body): the ones a
    /// handler usually turns into a 502/503.
    pub fn is_dependency_failure(&self) -> bool {
        matches!(
            self,
            Error::Unreachable { .. }
                | Error::Timeout { .. }
                | Error::Status { .. }
                | Error::Broker { .. }
                | Error::BadJson { .. }
                | Error::TooLarge { .. }
        )
    }

    /// The dependency's (or the broker's) HTTP status, when it answered
    /// with a non-2xx one.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Status { status, .. } | Error::Broker { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The broker's error code (`stale_receipt`, `unknown_topic`,
    /// `lease_lost`, …), when the broker answered with an error.
    pub fn broker_code(&self) -> Option<&str> {
        match self {
            Error::Broker { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The dependency's error body parsed as JSON, when it answered non-2xx
    /// with a JSON body (for example a chassis `ApiError`).
    pub fn body_json(&self) -> Option<serde_json::Value> {
        match self {
            Error::Status { body, .. } => serde_json::from_str(body).ok(),
            _ => None,
        }
    }
}

/// Formats an error with its whole `source()` chain, `outer: inner: root`,
/// for logs.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(source) = next {
        out.push_str(": ");
        out.push_str(&source.to_string());
        next = source.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_variable_and_the_fix() {
        let err = Error::UndeclaredDependency {
            dep: "pricing".into(),
            var: "FLOTILLA_URL_PRICING".into(),
            service: "orders".into(),
        };
        let msg = err.to_string();
        assert!(msg.contains("FLOTILLA_URL_PRICING"), "{msg}");
        assert!(msg.contains("calls"), "{msg}");
        assert!(msg.contains("flotilla.toml"), "{msg}");

        let msg = Error::NoDatabase {
            service: "catalog".into(),
        }
        .to_string();
        assert!(msg.contains("DATABASE_URL"), "{msg}");
        assert!(msg.contains("data = \"sqlite\""), "{msg}");
    }

    #[test]
    fn chain_joins_sources() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "address in use");
        let err = Error::Bind {
            addr: "127.0.0.1:1".parse().unwrap(),
            source: io,
        };
        let chain = error_chain(&err);
        assert!(chain.starts_with("could not bind 127.0.0.1:1"), "{chain}");
        assert!(chain.ends_with(": address in use"), "{chain}");
    }

    #[test]
    fn body_json_parses_status_bodies_only() {
        let err = Error::Status {
            dep: "pricing".into(),
            url: "http://x/".into(),
            status: StatusCode::BAD_REQUEST,
            body: r#"{"error":{"code":"invalid_request"}}"#.into(),
        };
        assert_eq!(err.status(), Some(StatusCode::BAD_REQUEST));
        assert_eq!(err.body_json().unwrap()["error"]["code"], "invalid_request");
        assert!(err.is_dependency_failure());
        assert!(
            !Error::NoDatabase {
                service: "x".into()
            }
            .is_dependency_failure()
        );
    }
}
