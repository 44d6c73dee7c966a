//! End-to-end tests: the real shop, started by the testkit, driven through
//! the gateway over real sockets; and the `flotilla` binary itself.

mod bad_input;
mod browser;
mod cli;
mod mesh;
mod saga;
mod shop;
mod support;
