//! Client protocol v1: arbitrary UTF-8 text into the JSON frame decoders. Neither may panic,
//! and a frame the client decoder accepts must survive encode -> decode unchanged.
//!
//! The body of the `client_frame` fuzz target, shared by the libFuzzer target
//! (`fuzz_targets/client_frame.rs`, nightly) and the stable-toolchain run over the corpus and
//! generated inputs (`proto/tests/fuzz_stable.rs`, part of the test suite).

use dtfed_proto::client::{decode_client_frame, decode_server_frame, encode_client_frame};

/// One input; panics on a violated property.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(frame) = decode_client_frame(text) {
        let again = encode_client_frame(&frame);
        assert_eq!(
            decode_client_frame(&again),
            Ok(frame),
            "re-encoded: {again}"
        );
    }
    let _ = decode_server_frame(text);
}
