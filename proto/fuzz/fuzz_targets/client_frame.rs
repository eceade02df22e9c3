//! Client protocol v1: arbitrary UTF-8 text into the JSON frame decoders. Neither may panic,
//! and a frame the client decoder accepts must survive encode -> decode unchanged.
#![no_main]

use dtfed_proto::client::{decode_client_frame, decode_server_frame, encode_client_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
});
