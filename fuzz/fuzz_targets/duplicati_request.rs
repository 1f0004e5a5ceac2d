//! libFuzzer entry point; the checks are in `latchkey_fuzz::duplicati_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| latchkey_fuzz::duplicati_request(data));
