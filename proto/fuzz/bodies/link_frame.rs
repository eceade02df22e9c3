//! Region link codec: arbitrary bytes into a `FrameDecoder`, fed in chunks. It must never
//! panic nor buffer past one frame plus one chunk, and every frame it yields must survive
//! encode -> decode unchanged.
//!
//! The body of the `link_frame` fuzz target, shared by the libFuzzer target
//! (`fuzz_targets/link_frame.rs`, nightly) and the stable-toolchain run over the corpus and
//! generated inputs (`proto/tests/fuzz_stable.rs`, part of the test suite).

use dtfed_proto::link::codec::{decode_payload, encode, FrameDecoder, LENGTH_PREFIX_BYTES};
use dtfed_proto::link::MAX_FRAME_BYTES;

/// One input; panics on a violated property.
pub fn run(data: &[u8]) {
    let Some((&chunk, bytes)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut dec = FrameDecoder::new();
    for piece in bytes.chunks(chunk) {
        dec.extend(piece);
        assert!(dec.buffered_len() <= LENGTH_PREFIX_BYTES + MAX_FRAME_BYTES + chunk);
        loop {
            match dec.next_frame() {
                Ok(Some(frame)) => {
                    let mut wire = Vec::new();
                    encode(&frame, &mut wire).expect("a decoded frame re-encodes");
                    let back = decode_payload(&wire[LENGTH_PREFIX_BYTES..]).expect("decodes");
                    assert_eq!(back, frame);
                }
                Ok(None) => break,
                Err(_) => {
                    assert!(dec.is_failed());
                    return;
                }
            }
        }
    }
}
