#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_gateway::fuzz::chunked_body(data));
