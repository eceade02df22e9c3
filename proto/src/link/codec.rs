//! The region link codec: [`LinkFrame`]s to bytes and back. **The only file that uses
//! bincode**, so that moving to another bincode-compatible encoder (wincode) touches this
//! file alone.
//!
//! Wire format of one frame (codec version 1, [`super::frame::CODEC_VERSION`]):
//!
//! ```text
//! +----------------------+--------------------------------------------------+
//! | length: u32 big-end. | payload: bincode 2, config::standard()            |
//! | (payload bytes only) | (little-endian, varint integers, enum = variant   |
//! |  <= MAX_FRAME_BYTES  |  index, struct = fields in order, bytes = len+raw) |
//! +----------------------+--------------------------------------------------+
//! ```
//!
//! Limits are enforced on both sides: [`encode`] refuses a frame whose payload would exceed
//! [`MAX_FRAME_BYTES`] (and stops writing as soon as it does), and [`FrameDecoder`] refuses
//! a length prefix above it before buffering the payload. Inside a frame, byte strings and
//! strings are borrowed from the payload before being copied, so no length field can make
//! the decoder allocate more than the frame holds; bincode's own limit is a backstop.

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use bincode::enc::write::Writer;
use bincode::error::EncodeError;

use super::frame::{LinkFrame, LinkRecord};

/// Largest payload of one frame, in bytes (the 4-byte length prefix not counted).
pub const MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;

/// Bytes of the length prefix in front of every frame.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// An upper bound on what a [`LinkFrame::Batch`] costs on the wire beyond its records
/// (frame tag, partition, record count, high watermark).
pub const BATCH_OVERHEAD_BOUND: usize = 32;

/// The largest record (as [`record_len_bound`] counts it) that can be mirrored: one that
/// fills a `Batch` frame alone. A larger record can never cross the link, so whatever
/// writes the local topic must keep its records below this (the daemon's config checks
/// `client.max_frame_bytes` against it).
pub const MAX_RECORD_BYTES: usize = MAX_FRAME_BYTES - BATCH_OVERHEAD_BOUND;

/// Once this many consumed bytes sit at the front of a [`FrameDecoder`]'s buffer, they are
/// dropped (shifting the rest), so the buffer does not grow with the stream's history.
const COMPACT_AT: usize = 64 * 1024;

/// Longest varint for a 64-bit integer in bincode's standard config (tag byte + 8).
const VARINT_MAX: usize = 9;

/// Why a frame could not be encoded or decoded. Any decode error ends the stream: answer
/// with [`super::frame::LinkErrorCode::ProtocolViolation`] and close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A length prefix announced a payload above [`MAX_FRAME_BYTES`].
    #[error("frame of {len} bytes announced, the limit is {MAX_FRAME_BYTES}")]
    FrameTooLarge { len: u64 },
    /// A frame given to [`encode`] would exceed [`MAX_FRAME_BYTES`].
    #[error("frame encodes to more than {MAX_FRAME_BYTES} bytes")]
    EncodeTooLarge,
    /// The payload is not a valid frame.
    #[error("undecodable frame: {reason}")]
    Decode { reason: String },
    /// The payload held a valid frame followed by bytes that belong to no frame.
    #[error("frame payload has {trailing} trailing bytes")]
    TrailingBytes { trailing: usize },
    /// The encoder failed for another reason (a bug: every frame type is encodable).
    #[error("cannot encode frame: {reason}")]
    Encode { reason: String },
    /// The decoder already failed on this stream; framing is lost, close the stream.
    #[error("decoder failed earlier on this stream")]
    Failed,
}

/// bincode's decode limit. bincode charges each integer its in-memory size (8 bytes for an
/// `i64` that took 1 byte on the wire), so a valid frame can be charged up to 8 times its
/// length; the limit admits that and still caps what any length field can make bincode
/// allocate. (Byte strings and strings are borrowed from the input before being copied,
/// see `frame.rs`, so in practice allocations are bounded by the frame itself.)
const DECODE_LIMIT: usize = 8 * MAX_FRAME_BYTES;

type WireConfig = Configuration<LittleEndian, Varint, Limit<DECODE_LIMIT>>;

/// Codec version 1: bincode's standard config, with a decode limit.
fn wire_config() -> WireConfig {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Appends `frame` to `out` as one length-prefixed frame. On error, `out` is left as it was.
pub fn encode(frame: &LinkFrame, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let start = out.len();
    out.extend_from_slice(&[0; LENGTH_PREFIX_BYTES]);
    let mut writer = BoundedWriter {
        out,
        remaining: MAX_FRAME_BYTES,
        overflowed: false,
    };
    let res = bincode::serde::encode_into_writer(frame, &mut writer, wire_config());
    let overflowed = writer.overflowed;
    if let Err(e) = res {
        out.truncate(start);
        return Err(if overflowed {
            CodecError::EncodeTooLarge
        } else {
            CodecError::Encode {
                reason: e.to_string(),
            }
        });
    }
    let payload_len = out.len() - start - LENGTH_PREFIX_BYTES;
    // The writer stops at MAX_FRAME_BYTES, which fits in a u32.
    let Ok(len) = u32::try_from(payload_len) else {
        out.truncate(start);
        return Err(CodecError::EncodeTooLarge);
    };
    if let Some(prefix) = out.get_mut(start..start + LENGTH_PREFIX_BYTES) {
        prefix.copy_from_slice(&len.to_be_bytes());
    }
    Ok(())
}

/// Encodes `frame` into a new buffer (prefix included).
pub fn encode_to_vec(frame: &LinkFrame) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    encode(frame, &mut out)?;
    Ok(out)
}

/// Decodes one frame payload (without its length prefix): the whole of `payload` must be
/// exactly one frame.
pub fn decode_payload(payload: &[u8]) -> Result<LinkFrame, CodecError> {
    if payload.len() > MAX_FRAME_BYTES {
        return Err(CodecError::FrameTooLarge {
            len: payload.len() as u64,
        });
    }
    let (frame, used) = bincode::serde::decode_from_slice::<LinkFrame, _>(payload, wire_config())
        .map_err(|e| CodecError::Decode {
        reason: e.to_string(),
    })?;
    if used != payload.len() {
        return Err(CodecError::TrailingBytes {
            trailing: payload.len().saturating_sub(used),
        });
    }
    Ok(frame)
}

/// An upper bound on the bytes `record` takes inside a [`LinkFrame::Batch`] payload. Used to
/// cut batches below a byte budget without encoding twice.
pub fn record_len_bound(record: &LinkRecord) -> usize {
    let header_bytes: usize = record
        .headers
        .iter()
        .map(|(k, v)| 2 * VARINT_MAX + k.len() + v.len())
        .sum();
    // offset, timestamp, key length, header count, value length: one varint each.
    5 * VARINT_MAX + record.key.len() + header_bytes + record.value.len()
}

/// A `Vec` writer that refuses to grow past a budget, so encoding an oversize frame stops
/// early instead of building it whole.
struct BoundedWriter<'a> {
    out: &'a mut Vec<u8>,
    remaining: usize,
    overflowed: bool,
}

impl Writer for BoundedWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        if bytes.len() > self.remaining {
            self.overflowed = true;
            return Err(EncodeError::Other("frame exceeds MAX_FRAME_BYTES"));
        }
        self.remaining -= bytes.len();
        self.out.extend_from_slice(bytes);
        Ok(())
    }
}

/// Turns a byte stream into frames: feed it what the stream gives ([`FrameDecoder::extend`]),
/// then call [`FrameDecoder::next_frame`] until it returns `Ok(None)`.
///
/// Handles frames split across reads and several frames per read. Memory is bounded by one
/// frame ([`MAX_FRAME_BYTES`] + prefix) plus one read: a length prefix above the limit is an
/// error before any of its payload is kept. After any error the decoder stays failed (the
/// stream's framing can no longer be trusted) and drops further input.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    pos: usize,
    failed: bool,
}

impl FrameDecoder {
    /// An empty decoder for a new stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream. Dropped if the decoder has failed, or if the
    /// pending frame's length prefix is already known to be over the limit.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.failed
            || self
                .pending_len()
                .is_some_and(|len| len > MAX_FRAME_BYTES as u64)
        {
            return;
        }
        if self.pos > 0 && (self.pos == self.buf.len() || self.pos >= COMPACT_AT) {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or an error (after which
    /// every call returns [`CodecError::Failed`]).
    pub fn next_frame(&mut self) -> Result<Option<LinkFrame>, CodecError> {
        if self.failed {
            return Err(CodecError::Failed);
        }
        let Some(len) = self.pending_len() else {
            return Ok(None);
        };
        if len > MAX_FRAME_BYTES as u64 {
            return Err(self.fail(CodecError::FrameTooLarge { len }));
        }
        // len <= MAX_FRAME_BYTES, so this neither truncates nor overflows.
        let start = self.pos + LENGTH_PREFIX_BYTES;
        let end = start + len as usize;
        let Some(payload) = self.buf.get(start..end) else {
            return Ok(None);
        };
        match decode_payload(payload) {
            Ok(frame) => {
                self.pos = end;
                if self.pos == self.buf.len() {
                    self.buf.clear();
                    self.pos = 0;
                }
                Ok(Some(frame))
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered_len(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// True once an error was returned; the stream must be closed.
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// The payload length announced by the pending frame's prefix, once all 4 bytes are in.
    fn pending_len(&self) -> Option<u64> {
        let prefix = self.buf.get(self.pos..self.pos + LENGTH_PREFIX_BYTES)?;
        let prefix: [u8; LENGTH_PREFIX_BYTES] = prefix.try_into().ok()?;
        Some(u64::from(u32::from_be_bytes(prefix)))
    }

    fn fail(&mut self, e: CodecError) -> CodecError {
        self.failed = true;
        self.buf = Vec::new();
        self.pos = 0;
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::frame::{LinkErrorCode, CODEC_VERSION, MAGIC, PROTOCOL_VERSION};
    use proptest::prelude::*;

    fn record(offset: i64, value_len: usize) -> LinkRecord {
        LinkRecord {
            offset,
            timestamp_ms: 1_700_000_000_000_i64.wrapping_add(offset),
            key: b"room-1".to_vec(),
            headers: vec![("dtfed-origin".into(), b"seoul".to_vec())],
            value: vec![b'x'; value_len],
        }
    }

    #[test]
    fn hello_layout_is_frozen() {
        // Tag 0, magic raw, version varint, region len + bytes, codec version varint.
        let bytes = encode_to_vec(&LinkFrame::hello("seoul")).expect("encode");
        assert_eq!(
            bytes,
            [&[0, 0, 0, 13][..], &[0], b"DTFL", &[1, 5], b"seoul", &[1]].concat()
        );
        assert_eq!(MAGIC, *b"DTFL");
        assert_eq!((PROTOCOL_VERSION, CODEC_VERSION), (1, 1));
    }

    #[test]
    fn error_layout_is_frozen() {
        let bytes =
            encode_to_vec(&LinkFrame::error(LinkErrorCode::VersionMismatch, "v")).expect("encode");
        assert_eq!(bytes, [0, 0, 0, 4, 1, 1, 1, b'v']);
    }

    #[test]
    fn bytes_fields_are_length_plus_raw_bytes() {
        let f = LinkFrame::Batch {
            partition: 0,
            records: vec![LinkRecord {
                offset: 0,
                timestamp_ms: 0,
                key: vec![7, 8],
                headers: vec![],
                value: vec![9],
            }],
            high_watermark: 1,
        };
        let bytes = encode_to_vec(&f).expect("encode");
        // prefix, tag 3, partition 0, 1 record, offset 0, ts 0, key [7,8], 0 headers,
        // value [9], high watermark 1 (zigzag 2).
        assert_eq!(bytes, [0, 0, 0, 12, 3, 0, 1, 0, 0, 2, 7, 8, 0, 1, 9, 2]);
    }

    #[test]
    fn decodes_frames_split_and_concatenated() {
        let frames = vec![
            LinkFrame::hello("seoul"),
            LinkFrame::Subscribe {
                topic: "dtfed.local".into(),
                partition: 3,
                from_offset: 17,
            },
            LinkFrame::Heartbeat { now_ms: 5000 },
        ];
        let mut wire = Vec::new();
        for f in &frames {
            encode(f, &mut wire).expect("encode");
        }
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for b in &wire {
            dec.extend(std::slice::from_ref(b));
            while let Some(f) = dec.next_frame().expect("decode") {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
        assert_eq!(dec.buffered_len(), 0);
    }

    #[test]
    fn refuses_oversize_prefix_without_buffering() {
        let mut dec = FrameDecoder::new();
        let too_big = (MAX_FRAME_BYTES as u32 + 1).to_be_bytes();
        dec.extend(&too_big);
        dec.extend(&[0; 1024]);
        assert_eq!(
            dec.buffered_len(),
            4,
            "payload of an oversize frame not kept"
        );
        assert_eq!(
            dec.next_frame(),
            Err(CodecError::FrameTooLarge {
                len: MAX_FRAME_BYTES as u64 + 1
            })
        );
        assert_eq!(dec.next_frame(), Err(CodecError::Failed));
        dec.extend(&[0; 16]);
        assert_eq!(dec.buffered_len(), 0);
        assert!(dec.is_failed());
    }

    #[test]
    fn max_size_frame_is_accepted_and_one_more_byte_is_not() {
        // Find the value length that makes the payload exactly MAX_FRAME_BYTES.
        let batch = |n: usize| LinkFrame::Batch {
            partition: 0,
            records: vec![record(0, n)],
            high_watermark: 1,
        };
        let probe = encode_to_vec(&batch(MAX_FRAME_BYTES - 100)).expect("encode");
        let overhead = probe.len() - LENGTH_PREFIX_BYTES - (MAX_FRAME_BYTES - 100);
        let exact = batch(MAX_FRAME_BYTES - overhead);
        let bytes = encode_to_vec(&exact).expect("exactly at the limit");
        assert_eq!(bytes.len(), LENGTH_PREFIX_BYTES + MAX_FRAME_BYTES);
        let mut dec = FrameDecoder::new();
        dec.extend(&bytes);
        assert_eq!(dec.next_frame().expect("decode"), Some(exact));

        let mut out = vec![1, 2, 3];
        assert_eq!(
            encode(&batch(MAX_FRAME_BYTES - overhead + 1), &mut out),
            Err(CodecError::EncodeTooLarge)
        );
        assert_eq!(out, [1, 2, 3], "output untouched on error");
    }

    #[test]
    fn inner_length_cannot_force_a_large_allocation() {
        // A Batch whose key claims 2^62 bytes: refused before allocating.
        let mut payload = vec![3, 0, 1, 0, 0];
        payload.extend_from_slice(&[253]);
        payload.extend_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(matches!(
            decode_payload(&payload),
            Err(CodecError::Decode { .. })
        ));
        // A Subscribe whose topic claims 60 MiB (under bincode's own limit): refused too.
        let mut payload = vec![2, 253];
        payload.extend_from_slice(&(60u64 << 20).to_le_bytes());
        payload.extend_from_slice(b"dtfed.local");
        assert!(matches!(
            decode_payload(&payload),
            Err(CodecError::Decode { .. })
        ));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode_to_vec(&LinkFrame::Heartbeat { now_ms: 1 }).expect("encode");
        let payload = bytes.split_off(LENGTH_PREFIX_BYTES);
        let mut padded = payload.clone();
        padded.push(0);
        assert_eq!(
            decode_payload(&padded),
            Err(CodecError::TrailingBytes { trailing: 1 })
        );
        assert_eq!(
            decode_payload(&payload),
            Ok(LinkFrame::Heartbeat { now_ms: 1 })
        );
    }

    #[test]
    fn record_len_bound_is_an_upper_bound() {
        for n in [0, 1, 250, 251, 70_000] {
            let r = record(i64::MAX - 1, n);
            let one = LinkFrame::Batch {
                partition: i32::MAX,
                records: vec![r.clone()],
                high_watermark: i64::MIN,
            };
            let bytes = encode_to_vec(&one).expect("encode");
            assert!(
                bytes.len() - LENGTH_PREFIX_BYTES <= BATCH_OVERHEAD_BOUND + record_len_bound(&r)
            );
        }
    }

    pub(crate) fn link_record() -> impl Strategy<Value = LinkRecord> {
        (
            any::<i64>(),
            any::<i64>(),
            proptest::collection::vec(any::<u8>(), 0..40),
            proptest::collection::vec(
                (".{0,12}", proptest::collection::vec(any::<u8>(), 0..20)),
                0..4,
            ),
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(offset, timestamp_ms, key, headers, value)| LinkRecord {
                offset,
                timestamp_ms,
                key,
                headers,
                value,
            })
    }

    fn error_code() -> impl Strategy<Value = LinkErrorCode> {
        prop_oneof![
            Just(LinkErrorCode::BadMagic),
            Just(LinkErrorCode::VersionMismatch),
            Just(LinkErrorCode::Forbidden),
            Just(LinkErrorCode::UnknownTopic),
            Just(LinkErrorCode::UnknownPartition),
            any::<i64>().prop_map(|earliest| LinkErrorCode::OffsetOutOfRange { earliest }),
            Just(LinkErrorCode::Unavailable),
            Just(LinkErrorCode::Internal),
            Just(LinkErrorCode::ProtocolViolation),
        ]
    }

    pub(crate) fn link_frame() -> impl Strategy<Value = LinkFrame> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>(), ".{0,20}", any::<u16>()).prop_map(
                |(magic, protocol_version, region, codec_version)| LinkFrame::Hello {
                    magic,
                    protocol_version,
                    region,
                    codec_version
                }
            ),
            (error_code(), ".{0,40}")
                .prop_map(|(code, message)| LinkFrame::Error { code, message }),
            (".{0,20}", any::<i32>(), any::<i64>()).prop_map(|(topic, partition, from_offset)| {
                LinkFrame::Subscribe {
                    topic,
                    partition,
                    from_offset,
                }
            }),
            (
                any::<i32>(),
                proptest::collection::vec(link_record(), 0..6),
                any::<i64>()
            )
                .prop_map(|(partition, records, high_watermark)| LinkFrame::Batch {
                    partition,
                    records,
                    high_watermark
                }),
            (any::<i32>(), any::<i64>()).prop_map(|(partition, next_offset)| {
                LinkFrame::Progress {
                    partition,
                    next_offset,
                }
            }),
            any::<i64>().prop_map(|now_ms| LinkFrame::Heartbeat { now_ms }),
            (".{0,20}", any::<i32>(), any::<i64>(), any::<i64>()).prop_map(
                |(topic, partition, from_offset, to_offset)| LinkFrame::Digest {
                    topic,
                    partition,
                    from_offset,
                    to_offset
                }
            ),
            (
                any::<i32>(),
                any::<i64>(),
                any::<i64>(),
                any::<u64>(),
                any::<[u8; 32]>()
            )
                .prop_map(|(partition, from_offset, to_offset, count, sha256)| {
                    LinkFrame::Digested {
                        partition,
                        from_offset,
                        to_offset,
                        count,
                        sha256,
                    }
                }),
        ]
    }

    proptest! {
        #[test]
        fn every_frame_round_trips(f in link_frame()) {
            let bytes = encode_to_vec(&f).expect("encode");
            let mut dec = FrameDecoder::new();
            dec.extend(&bytes);
            prop_assert_eq!(dec.next_frame().expect("decode"), Some(f));
            prop_assert_eq!(dec.next_frame().expect("empty"), None);
        }

        #[test]
        fn concatenated_frames_round_trip_across_arbitrary_splits(
            frames in proptest::collection::vec(link_frame(), 1..8),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let mut wire = Vec::new();
            for f in &frames {
                encode(f, &mut wire).expect("encode");
            }
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
            cuts.push(0);
            cuts.push(wire.len());
            cuts.sort_unstable();
            let mut dec = FrameDecoder::new();
            let mut got = Vec::new();
            for w in cuts.windows(2) {
                dec.extend(&wire[w[0]..w[1]]);
                while let Some(f) = dec.next_frame().expect("decode") {
                    got.push(f);
                }
            }
            prop_assert_eq!(got, frames);
            prop_assert_eq!(dec.buffered_len(), 0);
        }

        #[test]
        fn random_bytes_never_panic_the_decoder(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8)
        ) {
            let mut dec = FrameDecoder::new();
            for c in &chunks {
                dec.extend(c);
                while let Ok(Some(_)) = dec.next_frame() {}
            }
            prop_assert!(dec.buffered_len() <= chunks.iter().map(Vec::len).sum::<usize>());
        }

        #[test]
        fn random_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_payload(&payload);
        }

        #[test]
        fn small_prefix_with_random_payload_never_panics(
            payload in proptest::collection::vec(any::<u8>(), 0..256)
        ) {
            let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(&payload);
            let mut dec = FrameDecoder::new();
            dec.extend(&bytes);
            let _ = dec.next_frame();
        }

        #[test]
        fn oversize_prefixes_are_refused(len in (MAX_FRAME_BYTES as u32 + 1)..=u32::MAX) {
            let mut dec = FrameDecoder::new();
            dec.extend(&len.to_be_bytes());
            dec.extend(&[0; 64]);
            prop_assert_eq!(dec.next_frame(), Err(CodecError::FrameTooLarge { len: u64::from(len) }));
            prop_assert!(dec.buffered_len() <= LENGTH_PREFIX_BYTES + 64);
        }
    }
}
