//! STOMP frames: arbitrary bytes into the bounded frame decoder. It may not panic; what it
//! holds stays within one frame's bound after every frame was taken; splitting the same
//! bytes at any point gives the same frames; a frame it decodes survives encode -> decode.
//!
//! The body of the `stomp_frame` fuzz target, shared by the libFuzzer target
//! (`fuzz_targets/stomp_frame.rs`, nightly) and the stable-toolchain run over the corpus and
//! generated inputs (`proto/tests/fuzz_stable.rs`, part of the test suite).

use dtfed_proto::stomp::{Decoded, Frame, FrameDecoder, FrameError, Limits, Version};

const LIMITS: Limits = Limits {
    max_header_bytes: 512,
    max_headers: 16,
    max_body_bytes: 1024,
};

/// For re-decoding what the encoder wrote: escaping at most doubles a header, and the
/// encoder may add `content-length`.
const ROUND_TRIP: Limits = Limits {
    max_header_bytes: 2 * LIMITS.max_header_bytes + 64,
    max_headers: LIMITS.max_headers + 1,
    max_body_bytes: LIMITS.max_body_bytes,
};

/// Everything `chunks` decode to, up to and including the first error.
fn decode(chunks: &[&[u8]]) -> (Vec<Decoded>, Option<FrameError>) {
    decode_within(LIMITS, chunks)
}

fn decode_within(limits: Limits, chunks: &[&[u8]]) -> (Vec<Decoded>, Option<FrameError>) {
    let mut dec = FrameDecoder::new(limits);
    let mut out = Vec::new();
    for chunk in chunks {
        if let Err(e) = dec.push(chunk) {
            return (out, Some(e));
        }
        loop {
            match dec.next() {
                Ok(Some(d)) => out.push(d),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
        assert!(
            dec.buffered() <= dec.max_frame_bytes(),
            "holds {} bytes, bound {}",
            dec.buffered(),
            dec.max_frame_bytes()
        );
    }
    (out, None)
}

/// One input; panics on a violated property.
pub fn run(data: &[u8]) {
    let (whole, whole_err) = decode(&[data]);
    // Past three frames' worth, one push of everything is refused by size while smaller
    // pushes are not (the daemon never pushes that much at once: its WebSocket limit is
    // lower); below it, how the bytes are split must not matter.
    let comparable = data.len() <= 3 * FrameDecoder::new(LIMITS).max_frame_bytes();
    if let (Some(&first), true) = (data.first(), comparable) {
        let at = usize::from(first) * data.len() / 256;
        let (a, b) = data.split_at(at);
        let (split, split_err) = decode(&[a, b]);
        // An error ends decoding; before it, both ways agree, and both fail or neither.
        // (A push of the whole may fail on size where smaller pushes only fail in `next`.)
        assert_eq!(
            whole_err.is_some(),
            split_err.is_some(),
            "{whole_err:?} / {split_err:?}"
        );
        if whole_err.is_none() {
            assert_eq!(whole, split);
        }
    }
    for d in whole {
        let Decoded::Frame(frame) = d else { continue };
        if frame.command == "CONNECT" || frame.command == "CONNECTED" {
            // Never escaped: what a header may hold there is what a line may hold.
            continue;
        }
        let bytes = frame.encode(Version::V12);
        let (again, err) = decode_within(ROUND_TRIP, &[&bytes]);
        assert!(err.is_none(), "re-encoded frame refused: {err:?}");
        let [Decoded::Frame(back)] = &again[..] else {
            panic!("re-encoded frame decoded as {again:?}");
        };
        assert_eq!(back.command, frame.command);
        assert_eq!(back.body, frame.body);
        let added_length = |f: &Frame| {
            f.headers
                .iter()
                .filter(|(n, _)| n != "content-length")
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(added_length(back), added_length(&frame));
    }
}
