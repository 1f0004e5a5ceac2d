//! libFuzzer entry point; the checks are in `latchkey_fuzz::record_decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| latchkey_fuzz::record_decode(data));
