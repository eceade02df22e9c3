//! A room message as the Redis bus publishes it: the `msg` frame serialized once, with the
//! place of its `prev` kept, so the apply script can fill in `prev` without re-serializing.

use dtfed_proto::client::Body;
use dtfed_proto::{LogRecord, RoomId};
use serde::Serialize;

/// A `msg` frame serialized with `"prev":null`, and where that `null` is.
pub(super) struct EncodedFrame {
    pub(super) text: Vec<u8>,
    pub(super) null_at: usize,
}

impl EncodedFrame {
    /// The frame text before and after the `prev` value.
    pub(super) fn split(&self) -> (&[u8], &[u8]) {
        let (before, rest) = self.text.split_at(self.null_at);
        (before, rest.get(4..).unwrap_or_default())
    }
}

/// Serializes `rec` as [`MsgFrame::to_json`] does (same serde derive order, same escaping;
/// checked by tests), without cloning the body.
pub(super) fn encode_frame(rec: &LogRecord) -> Result<EncodedFrame, serde_json::Error> {
    #[derive(Serialize)]
    struct Wire<'a> {
        op: &'static str,
        room: &'a RoomId,
        origin: &'a str,
        offset: i64,
        prev: Option<i64>,
        ts: i64,
        from: &'a str,
        body: &'a Body,
    }
    let text = serde_json::to_vec(&Wire {
        op: "msg",
        room: &rec.room,
        origin: &rec.origin,
        offset: rec.offset,
        prev: None,
        ts: rec.value.ts,
        from: &rec.value.from,
        body: &rec.value.body,
    })?;
    // The first `,"prev":` is the field: nothing before it can hold an unescaped quote
    // followed by `prev":` (room ids have no quotes, the origin is an escaped string).
    const MARK: &[u8] = b",\"prev\":";
    let null_at = text
        .windows(MARK.len())
        .position(|w| w == MARK)
        .map(|i| i + MARK.len())
        .filter(|&i| text.get(i..i + 4) == Some(b"null".as_slice()))
        .ok_or_else(|| {
            <serde_json::Error as serde::ser::Error>::custom(
                "no \"prev\":null in the encoded frame",
            )
        })?;
    Ok(EncodedFrame { text, null_at })
}
