#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| api_guard_quota::fuzzing::rls_request(data));
