//! libFuzzer entry point; the checks are in `latchkey_fuzz::envelope_open`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| latchkey_fuzz::envelope_open(data));
