//! The runtime over real processes and sockets, with the stdlib-Python
//! fixture service (no cargo build involved): service addresses and
//! activation, autoscaling, idle scale-down, supervision, endpoints.json,
//! identities, mutual TLS and certificate rotation.

mod broker;
mod mesh;
mod reload;
mod scaling;
mod supervision;
mod support;
