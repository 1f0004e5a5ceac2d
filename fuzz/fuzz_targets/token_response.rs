//! libFuzzer entry point; the checks are in `latchkey_fuzz::token_response`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| latchkey_fuzz::token_response(data));
