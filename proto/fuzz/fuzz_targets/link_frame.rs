//! Region link codec: arbitrary bytes into a `FrameDecoder`, fed in chunks. It must never
//! panic nor buffer past one frame plus one chunk, and every frame it yields must survive
//! encode -> decode unchanged.
#![no_main]

use dtfed_proto::link::codec::{decode_payload, encode, FrameDecoder, LENGTH_PREFIX_BYTES};
use dtfed_proto::link::MAX_FRAME_BYTES;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
});
