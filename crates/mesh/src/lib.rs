//! Identities and zero-trust plumbing for a Flotilla system.
//!
//! Every process in a system (each service instance, the gateway, the
//! runtime, the broker and object store, the operator's CLI) has an X.509
//! identity `spiffe://<system>.flotilla/ns/<env>/svc/<service>`, every
//! connection between two of them is mutual TLS 1.3, and every call is
//! checked against a default-deny ACL the manifest implies. This crate is
//! all of that as a library; the runtime, gateway and chassis wire it in.
//! It exists so the user never configures a certificate: the platform
//! issues, distributes, rotates and checks them.
//!
//! | module | what it is for |
//! |---|---|
//! | [`identity`] | [`SpiffeId`]: parse, format, read from a certificate |
//! | [`ca`] | the per-system CA ([`Ca`]): root, intermediate, leaf issue, root rotation |
//! | [`tls`] | rustls configs from identity files, reloaded on rotation; peer identity; handshake deadlines |
//! | [`acl`] | [`Policy`]: default-deny ACL, path normalisation, the 403 |
//! | [`exposure`] | [`Grants`]: may this caller touch this topic, queue, stream or bucket |
//! | [`user`] | drop `x-flotilla-user-*` headers not sent by the gateway |
//!
//! `docs/security.md` describes the files, lifetimes and the rotation
//! procedures for people.
//!
//! # How the platform uses it
//!
//! **Runtime** (owns the CA and the instances' files):
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use flotilla_mesh::{Ca, CaConfig, IdentityFiles, ca::DEFAULT_LEAF_LIFETIME};
//! # let data_dir = std::path::Path::new(".flotilla");
//! let ca = Ca::open(data_dir.join("ca"), CaConfig::new("shop"))?;
//! // Per instance: issue, write (cert chain, key 0600, bundle), and set
//! // FLOTILLA_TLS_CERT/KEY/CA from `files.env()`.
//! let files = IdentityFiles::in_dir(&data_dir.join("instances/catalog-1"));
//! let leaf = ca.issue_leaf("catalog", DEFAULT_LEAF_LIFETIME)?;
//! leaf.write(&files)?;
//! // Schedule a re-issue at `leaf.renew_at()`: issue again, `write` again.
//! // The instance reloads the files by itself; nothing restarts.
//! # Ok(()) }
//! ```
//!
//! The runtime's own identity (service [`identity::RUNTIME`]) is a leaf
//! like any other, used with [`client_config`] and
//! [`ExpectedPeer::service`] (the instance's own service) for health
//! checks. For each callee it
//! derives a [`PolicySpec`] from the manifest (`callers` from the other
//! services' `calls`, the gateway's routes, its own identity) and hands it
//! to the instance (e.g. as JSON), and builds [`Grants`] for the broker and
//! object store. A root rotation is `begin_root_rotation` → write the new
//! bundle to every instance ([`Ca::write_bundle`]) → `commit_root_rotation`
//! → re-issue every leaf → `finish_root_rotation` → write the bundle again.
//! (No part of `flotilla` drives a rotation yet; a running runtime holds
//! its CA in memory and would not see one made beside it.)
//!
//! **Chassis** (inside each Rust service):
//!
//! ```no_run
//! # async fn serve(policy_json: &str) -> Result<(), Box<dyn std::error::Error>> {
//! use flotilla_mesh::{ExpectedPeer, Identity, IdentityFiles, Policy, PolicySpec, tls};
//! let identity = Identity::load(IdentityFiles::from_env()?)?;
//! let _reloader = identity.spawn_reloader(std::time::Duration::from_secs(1));
//! let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&identity)?);
//! let policy = Policy::from_spec(&serde_json::from_str::<PolicySpec>(policy_json)?)?;
//! // Per connection: a stalled handshake frees the slot after the deadline.
//! # let stream = tokio::net::TcpStream::connect("127.0.0.1:1").await?;
//! let (tls_stream, caller) =
//!     tls::accept_with_timeout(&acceptor, stream, std::time::Duration::from_secs(10)).await?;
//! // Per request: `policy.check(&caller, &method, path)`; on Err answer
//! // `denied.to_response()` (403, code `acl_denied`); on Ok serve
//! // `decision.path`. Then `user::strip_untrusted_user_headers`.
//! // Outgoing calls to a dependency:
//! let connector = tokio_rustls::TlsConnector::from(tls::client_config(
//!     &identity,
//!     ExpectedPeer::service("pricing"),
//! )?);
//! # let _ = (tls_stream, caller, policy, connector);
//! # Ok(()) }
//! ```
//!
//! **Gateway**: loads its own identity (service [`identity::GATEWAY`]) the
//! same way and keeps one [`client_config`] per upstream service with
//! [`ExpectedPeer::service`], so it can only ever reach the service a
//! route names; it is the only identity services accept `x-flotilla-user-*`
//! headers from.
//!
//! **Broker and object store**: serve with [`server_config`], take the
//! caller from [`accept_with_timeout`], and ask [`Grants::check`] before
//! every operation.

pub mod acl;
pub mod ca;
pub mod exposure;
pub mod identity;
pub mod tls;
pub mod user;

pub use acl::{Decision, Denied, Mode, Policy, PolicySpec, ReasonCode, normalize_path};
pub use ca::{Ca, CaConfig, Leaf, RotationState, renew_at};
pub use exposure::{Action, Declared, Grants, ResourceKind};
pub use identity::SpiffeId;
pub use tls::{
    ExpectedPeer, Identity, IdentityFiles, accept_with_timeout, client_config,
    connect_with_timeout, peer_identity, server_config,
};
pub use user::strip_untrusted_user_headers;
