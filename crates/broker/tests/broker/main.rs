//! The broker's integration tests: one conformance suite run against both
//! engines (the NATS run needs `FLOTILLA_TEST_NATS_URL`), plus the embedded
//! engine's durability and fault tests.

mod support;

mod faults;
mod http_api;
mod push;
mod queues;
mod streams;
mod topics;
