//! Integration tests: real chassis servers on port 0, talked to over TCP.

mod client;
mod events;
mod mtls;
mod server;
mod shutdown;
mod support;
