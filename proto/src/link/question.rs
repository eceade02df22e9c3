//! [`StreamQuestion`]: the shape of a question asked on a link stream of its own — the
//! receiver's `Describe` ([`MirrorDescribe`](super::MirrorDescribe)) and `Digest`
//! ([`MirrorDigest`](super::MirrorDigest)). The asker sends its `Hello` and the question,
//! then hands in the origin's frames (its `Hello`, heartbeats, the answer or an `Error`)
//! until one yields the answer; the stream then ends. Sans-IO: the regions crate's
//! `mirror::client::ask` drives one over a QUIC stream.

use super::frame::LinkFrame;
use super::session::{check_hello, SessionError};

/// One question on a stream of its own.
pub trait StreamQuestion {
    /// What the origin answered.
    type Answer;

    /// The frames to send, in order: `Hello`, then the question.
    fn request(&self) -> [LinkFrame; 2];

    /// Takes one frame from the origin: `Ok(Some(answer))` once answered, `Ok(None)` while
    /// more is expected, `Err` when the origin broke the protocol.
    fn handle_frame(&mut self, frame: LinkFrame) -> Result<Option<Self::Answer>, SessionError>;
}

/// The origin's `Hello` on a question stream: versions this side speaks, and the region
/// the question was put to.
pub(super) fn check_origin_hello(
    magic: [u8; 4],
    protocol_version: u16,
    codec_version: u16,
    region: String,
    origin: &str,
) -> Result<(), SessionError> {
    check_hello(magic, protocol_version, codec_version)?;
    if region != origin {
        return Err(SessionError::WrongRegion {
            expected: origin.to_owned(),
            got: region,
        });
    }
    Ok(())
}
