//! Integration tests: a real gateway on 127.0.0.1:0 in front of real HTTP
//! upstreams, with a test [`Upstreams`](flotilla_gateway::Upstreams) that
//! plays the runtime.

mod activation;
mod authz;
mod balancing;
mod cache;
mod compression;
mod h1;
mod header_changes;
mod lifecycle;
mod limits;
mod mirror;
mod ratelimits;
mod reload;
mod resilience;
mod routing;
mod security_edge;
mod security_jwt;
mod security_keys;
mod static_files;
mod support;
mod tls;
mod tls_client_cert;
mod tls_sni;
mod websocket;
