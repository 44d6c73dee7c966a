#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_gateway::fuzz::request_head(data));
