//! libFuzzer entry point; the checks are in `latchkey_fuzz::forwarded_for`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| latchkey_fuzz::forwarded_for(data));
