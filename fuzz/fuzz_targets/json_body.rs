#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| api_guard::fuzzing::json_body(data));
