//! libFuzzer target; the body and its properties are in `../bodies/stomp_frame.rs`.
#![no_main]

#[path = "../bodies/stomp_frame.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
