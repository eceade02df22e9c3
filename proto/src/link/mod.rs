//! The region link: how one region mirrors another's Kafka partitions over QUIC. Sans-IO.
//!
//! Where to start reading:
//!
//! 1. [`frame`]: the frames ([`LinkFrame`]) and who sends which, in what order.
//! 2. [`session`]: the two state machines. [`MirrorPull`] runs on the receiving region, one
//!    per (origin, partition); [`MirrorServe`] runs on the origin, one per stream. Their
//!    module doc says how to drive them (`handle_*` in, `poll_*` out, time passed in).
//! 3. [`codec`]: frames to bytes (4-byte big-endian length + bincode payload) and the
//!    streaming [`FrameDecoder`]. The only place bincode is used.
//!
//! The QUIC endpoints, certificates, Kafka reads and writes live in the `regions` crate; it
//! opens one bidirectional stream per mirrored partition, feeds stream bytes to a
//! [`FrameDecoder`] and the frames to a session, and writes what the session transmits.
//!
//! # Handshake and versions
//!
//! The pull side opens the stream and sends `Hello` (magic `DTFL`, its protocol and codec
//! versions, its region) then, without waiting, `Subscribe`. The serve side checks the
//! magic (`BadMagic`), the versions (`VersionMismatch`) and the region (`Forbidden`: not
//! the peer's certificate region, or its own), and answers with its own `Hello` echoing the
//! versions, or with an `Error` frame and closes. **Versions must match exactly**
//! (protocol 1, codec 1 today): the pull side proposes, the serve side accepts only versions
//! it speaks and echoes them, and the pull side accepts only the echo. A future build can
//! serve several versions at once, so origins upgrade first and receivers after, with no
//! extra round trip. `Hello` and `Error` keep their position and layout in every version,
//! so a peer can always read why it was refused.
//!
//! # Delivery guarantees
//!
//! Per stream, the pull side delivers records with strictly increasing origin offsets,
//! dropping any at or below what it already delivered (or below where it resumed), so a
//! serving side that re-sends (a retry, a re-read after a rebalance) never causes a
//! duplicate. A reconnect resumes from the mirror partition's tail plus one. Offsets the
//! origin no longer retains are reported as a [`PullEvent::Gap`], never skipped silently.

pub mod codec;
pub mod describe;
pub mod digest;
pub mod frame;
pub mod question;
pub mod session;

pub use codec::{
    decode_payload, encode, CodecError, FrameDecoder, MAX_FRAME_BYTES, MAX_RECORD_BYTES,
};
pub use describe::{DescribeAnswer, MirrorDescribe};
pub use digest::{DigestAnswer, MirrorDigest};
pub use frame::{LinkErrorCode, LinkFrame, LinkRecord, CODEC_VERSION, MAGIC, PROTOCOL_VERSION};
pub use question::StreamQuestion;
pub use session::{
    LinkTimers, MirrorPull, MirrorServe, PullConfig, PullEvent, ServeConfig, ServeEvent,
    SessionError,
};
