//! Integration tests of flotilla-mesh: real TLS over real sockets on
//! 127.0.0.1, real files in temporary directories (kept when a test fails).

mod acl;
mod bad_input;
mod mtls;
mod root_rotation;
mod rotation;
mod support;
