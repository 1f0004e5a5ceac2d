//! libFuzzer entry point; the checks are in `latchkey_fuzz::config_parse`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| latchkey_fuzz::config_parse(data));
