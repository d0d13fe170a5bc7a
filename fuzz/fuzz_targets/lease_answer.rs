#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| api_guardlease_answer::fuzzing::(data));
