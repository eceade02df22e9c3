//! libFuzzer target; the body and its properties are in `../bodies/link_session.rs`.
#![no_main]

#[path = "../bodies/link_session.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
