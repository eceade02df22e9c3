//! The region link's frame types: what one region says to another on a mirror stream.
//!
//! These are plain data with serde derives; [`super::codec`] turns them into bytes.
//!
//! **The order of variants and fields is the wire format.** The codec encodes an enum variant
//! by its index and a struct by its fields in declaration order, so: never reorder, rename
//! into another position or remove a variant or field; add new frame kinds and error codes
//! only at the end, and only with a protocol version bump (an older peer cannot decode
//! them). [`LinkFrame::Hello`] and [`LinkFrame::Error`] are frozen forever, in position and
//! layout, so that peers of any two versions can always read each other's handshake and
//! refusal.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::record::{HEADER_ORIGIN, HEADER_ORIGIN_OFFSET, HEADER_ORIGIN_TS};

/// The four bytes every [`LinkFrame::Hello`] starts with: "DTfed Link".
pub const MAGIC: [u8; 4] = *b"DTFL";

/// The link protocol version this build speaks (frame kinds and their meaning).
pub const PROTOCOL_VERSION: u16 = 1;

/// The codec version this build speaks: bincode 2 `standard()` (little-endian, varint
/// integers) behind a 4-byte big-endian length prefix. See [`super::codec`].
pub const CODEC_VERSION: u16 = 1;

/// One frame of the region link.
///
/// Who sends what, in order, on one QUIC stream (one stream per mirrored partition):
///
/// ```text
/// pull side (receiving region)            serve side (origin region)
///   Hello ─────────────────────────────────▶
///   Subscribe ─────────────────────────────▶   (may be sent before the answer: pipelined)
///            ◀───────────────────────────────── Hello  (or Error, then close)
///            ◀───────────────────────────────── Batch, Batch, ...  (or Error, then close)
///   Progress ──────────────────────────────▶   (after durable writes; optional)
///   Heartbeat ◀───────────────────────────────▶ Heartbeat  (both ways, after the Hellos)
/// ```
///
/// An `Error` is always the last frame its sender sends on the stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkFrame {
    /// First frame each way. The pull side proposes its versions; the serve side answers
    /// with a `Hello` carrying the same versions if it speaks them, else with
    /// `Error { code: VersionMismatch }`.
    Hello {
        /// Always [`MAGIC`]; anything else is not a dtfed link peer.
        magic: [u8; 4],
        /// [`PROTOCOL_VERSION`] of the sender (pull side) or the version agreed (serve side).
        protocol_version: u16,
        /// The sender's region name.
        #[serde(deserialize_with = "text::deserialize")]
        region: String,
        /// [`CODEC_VERSION`] of the sender (pull side) or the version agreed (serve side).
        codec_version: u16,
    },
    /// A refusal or failure; the sender closes the stream after it.
    Error {
        /// What went wrong, for the receiver to act on.
        code: LinkErrorCode,
        /// Human-readable detail, for logs.
        #[serde(deserialize_with = "text::deserialize")]
        message: String,
    },
    /// Pull side to serve side, once per stream: send every record of `topic`/`partition`
    /// from `from_offset` (inclusive) on.
    Subscribe {
        /// The origin's local topic (e.g. `dtfed.local`), or, to a relay, its mirror topic of
        /// the origin (`dtfed.mirror.<origin>`, served with the origin's offsets; see
        /// `docs/PROTOCOL.md`, "Relays").
        #[serde(deserialize_with = "text::deserialize")]
        topic: String,
        partition: i32,
        /// First origin offset wanted: the last offset the pull side holds, plus one.
        from_offset: i64,
    },
    /// Serve side to pull side: records of the subscribed partition, in offset order.
    /// May be empty, to report a new high watermark only.
    Batch {
        partition: i32,
        records: Vec<LinkRecord>,
        /// The partition's high watermark when the batch was read: the offset the next
        /// record appended to the origin's partition will get. `high_watermark - next
        /// offset wanted` is the pull side's lag.
        high_watermark: i64,
    },
    /// Pull side to serve side: every origin offset below `next_offset` is durably written
    /// in the receiving region. Informational (lag metrics on the origin); never required.
    Progress {
        /// The subscribed partition.
        partition: i32,
        /// One past the last origin offset written.
        next_offset: i64,
    },
    /// Either way, every heartbeat interval once the Hellos are exchanged, so that a dead
    /// peer is noticed on an idle stream. Only its arrival matters to the receiver.
    Heartbeat {
        /// The sender's session clock in milliseconds (the monotonic time its session was
        /// given). Informational: lets logs show the peer's timers are running.
        now_ms: i64,
    },
    /// Pull side to serve side, instead of `Subscribe`, on a stream of its own: how many
    /// partitions does `topic` have? Answered by `Described`, then the stream ends. (An
    /// origin older than this frame answers `Error { protocol_violation }`.)
    Describe {
        /// The origin's local topic.
        #[serde(deserialize_with = "text::deserialize")]
        topic: String,
    },
    /// Serve side to pull side: the answer to `Describe`.
    Described {
        #[serde(deserialize_with = "text::deserialize")]
        topic: String,
        /// The topic's partition count: the receiver mirrors exactly these partitions.
        partitions: i32,
    },
    /// Pull side to serve side, instead of `Subscribe`, on a stream of its own: the digest
    /// of every record of `topic`/`partition` with offsets in `[from_offset, to_offset)`,
    /// to compare with the receiver's mirror of them. Answered by `Digested`, then the
    /// stream ends. (An origin older than this frame answers `Error { protocol_violation }`.)
    Digest {
        /// The origin's local topic.
        #[serde(deserialize_with = "text::deserialize")]
        topic: String,
        partition: i32,
        from_offset: i64,
        to_offset: i64,
    },
    /// Serve side to pull side: the answer to `Digest`: how many records the range holds
    /// and the SHA-256 of their (offset, value) pairs, in offset order (docs/PROTOCOL.md
    /// defines the bytes hashed).
    Digested {
        partition: i32,
        from_offset: i64,
        to_offset: i64,
        count: u64,
        sha256: [u8; 32],
    },
}

/// Why a peer refused or ended a stream. Carried in [`LinkFrame::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LinkErrorCode {
    /// The `Hello` did not start with [`MAGIC`].
    BadMagic,
    /// The peer proposed a protocol or codec version this side does not speak.
    VersionMismatch,
    /// The peer's region is not allowed here (wrong certificate name, or itself).
    Forbidden,
    /// The subscribed topic is not served here: neither the local topic nor, on a relay,
    /// the mirror topic of one of its peers.
    UnknownTopic,
    /// The subscribed partition does not exist.
    UnknownPartition,
    /// `from_offset` is not in the log. When it is below `earliest` (the earliest offset
    /// still retained) the pull side reports a gap and resumes from `earliest`; when it is
    /// above the log end, the origin lost data and operators must look.
    OffsetOutOfRange { earliest: i64 },
    /// The serving side cannot read its log right now (Kafka down); retry with backoff.
    Unavailable,
    /// A bug or unexpected failure on the sending side.
    Internal,
    /// The peer broke the protocol: a frame out of place, a malformed field, an undecodable
    /// or oversize frame.
    ProtocolViolation,
}

impl LinkErrorCode {
    /// The code's name for logs and metrics: `"version_mismatch"`, `"bad_magic"`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            LinkErrorCode::BadMagic => "bad_magic",
            LinkErrorCode::VersionMismatch => "version_mismatch",
            LinkErrorCode::Forbidden => "forbidden",
            LinkErrorCode::UnknownTopic => "unknown_topic",
            LinkErrorCode::UnknownPartition => "unknown_partition",
            LinkErrorCode::OffsetOutOfRange { .. } => "offset_out_of_range",
            LinkErrorCode::Unavailable => "unavailable",
            LinkErrorCode::Internal => "internal",
            LinkErrorCode::ProtocolViolation => "protocol_violation",
        }
    }

    /// True when retrying later, on a new stream, can succeed without anyone changing
    /// configuration or code.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            LinkErrorCode::Unavailable
                | LinkErrorCode::Internal
                | LinkErrorCode::OffsetOutOfRange { .. }
        )
    }
}

impl fmt::Display for LinkErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkErrorCode::OffsetOutOfRange { earliest } => {
                write!(f, "offset_out_of_range (earliest {earliest})")
            }
            other => f.write_str(other.as_str()),
        }
    }
}

/// One Kafka record of the origin's local topic, as mirrored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRecord {
    /// Offset in the origin's partition.
    pub offset: i64,
    /// The origin's append time, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// The record key (the room id).
    #[serde(with = "bytes")]
    pub key: Vec<u8>,
    /// The record's Kafka headers, in order (names may repeat, as in Kafka).
    #[serde(with = "headers")]
    pub headers: Vec<(String, Vec<u8>)>,
    /// The record value (see [`crate::record::LogValue`]).
    #[serde(with = "bytes")]
    pub value: Vec<u8>,
}

impl LinkRecord {
    /// The headers to write on the mirror topic of `origin`: the record's own headers, less
    /// any [`HEADER_ORIGIN`]/[`HEADER_ORIGIN_OFFSET`]/[`HEADER_ORIGIN_TS`] it carried, plus
    /// those three set to `origin` and this record's origin offset and timestamp (decimal
    /// text).
    ///
    /// `origin` is the region the link authenticated (the peer certificate's name), never
    /// what the record says: whoever writes the origin's local topic controls its headers.
    pub fn mirror_headers(&self, origin: &str) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = self
            .headers
            .iter()
            .filter(|(k, _)| {
                k != HEADER_ORIGIN && k != HEADER_ORIGIN_OFFSET && k != HEADER_ORIGIN_TS
            })
            .cloned()
            .collect();
        out.push((HEADER_ORIGIN.to_owned(), origin.as_bytes().to_vec()));
        out.push((
            HEADER_ORIGIN_OFFSET.to_owned(),
            self.offset.to_string().into_bytes(),
        ));
        out.push((
            HEADER_ORIGIN_TS.to_owned(),
            self.timestamp_ms.to_string().into_bytes(),
        ));
        out
    }

    /// The first header named `name`, if any.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

impl LinkFrame {
    /// This build's `Hello` for `region`.
    pub fn hello(region: impl Into<String>) -> Self {
        LinkFrame::Hello {
            magic: MAGIC,
            protocol_version: PROTOCOL_VERSION,
            region: region.into(),
            codec_version: CODEC_VERSION,
        }
    }

    /// An `Error` frame.
    pub fn error(code: LinkErrorCode, message: impl Into<String>) -> Self {
        LinkFrame::Error {
            code,
            message: message.into(),
        }
    }

    /// The frame kind's name, for logs and error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            LinkFrame::Hello { .. } => "hello",
            LinkFrame::Error { .. } => "error",
            LinkFrame::Subscribe { .. } => "subscribe",
            LinkFrame::Batch { .. } => "batch",
            LinkFrame::Progress { .. } => "progress",
            LinkFrame::Heartbeat { .. } => "heartbeat",
            LinkFrame::Describe { .. } => "describe",
            LinkFrame::Described { .. } => "described",
            LinkFrame::Digest { .. } => "digest",
            LinkFrame::Digested { .. } => "digested",
        }
    }
}

/// Serde for `Vec<u8>` as one byte string (`serialize_bytes`/`deserialize_bytes`) rather
/// than a sequence of numbers: same bytes on the bincode wire (length + raw bytes), but
/// decoded with one copy instead of one call per byte. Deserializing through
/// `deserialize_bytes` lets a decoder that reads from a slice hand out a borrowed slice,
/// so a length prefix can never make it allocate more than the input holds.
mod bytes {
    use std::fmt;

    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_bytes(ByteBufVisitor)
    }

    struct ByteBufVisitor;

    impl<'de> Visitor<'de> for ByteBufVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_str<E: Error>(self, v: &str) -> Result<Vec<u8>, E> {
            Ok(v.as_bytes().to_vec())
        }

        // Self-describing formats (JSON) give bytes as a sequence of numbers.
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }

    /// A borrowed byte string that serializes with [`serialize`].
    pub struct AsBytes<'a>(pub &'a [u8]);

    impl serde::Serialize for AsBytes<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            serialize(self.0, s)
        }
    }

    /// An owned byte string that deserializes with [`deserialize`].
    pub struct ByteBuf(pub Vec<u8>);

    impl<'de> serde::Deserialize<'de> for ByteBuf {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            deserialize(d).map(ByteBuf)
        }
    }
}

/// Deserializes a `String` through `deserialize_str`, so that a decoder reading from a
/// slice borrows it (bounded by the input) before the one copy, instead of allocating from
/// a length prefix it has not checked against the input yet.
mod text {
    use std::fmt;

    use serde::de::{Error, Visitor};
    use serde::Deserializer;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        d.deserialize_str(TextVisitor)
    }

    struct TextVisitor;

    impl Visitor<'_> for TextVisitor {
        type Value = String;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }

        fn visit_str<E: Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }

        fn visit_string<E: Error>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
    }

    /// An owned string that deserializes with [`deserialize`].
    pub struct Text(pub String);

    impl<'de> serde::Deserialize<'de> for Text {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            deserialize(d).map(Text)
        }
    }
}

/// Serde for Kafka headers: a sequence of `(name, value)` pairs, values as byte strings.
mod headers {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::bytes::{AsBytes, ByteBuf};
    use super::text::Text;

    pub fn serialize<S: Serializer>(v: &[(String, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|(k, v)| (k, AsBytes(v))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(String, Vec<u8>)>, D::Error> {
        let pairs = Vec::<(Text, ByteBuf)>::deserialize(d)?;
        Ok(pairs.into_iter().map(|(k, v)| (k.0, v.0)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_have_snake_case_names() {
        assert_eq!(LinkErrorCode::VersionMismatch.as_str(), "version_mismatch");
        assert_eq!(LinkErrorCode::BadMagic.as_str(), "bad_magic");
        assert_eq!(
            LinkErrorCode::OffsetOutOfRange { earliest: 7 }.to_string(),
            "offset_out_of_range (earliest 7)"
        );
        assert!(LinkErrorCode::Unavailable.is_transient());
        assert!(!LinkErrorCode::Forbidden.is_transient());
    }

    #[test]
    fn mirror_headers_replace_origin_position() {
        let r = LinkRecord {
            offset: 42,
            timestamp_ms: 1_700_000_000_000,
            key: b"room".to_vec(),
            headers: vec![
                ("dtfed-origin".into(), b"tokyo".to_vec()),
                ("dtfed-from".into(), b"p".to_vec()),
                (HEADER_ORIGIN_OFFSET.into(), b"1".to_vec()),
                ("dtfed-origin".into(), b"seoul".to_vec()),
            ],
            value: b"{}".to_vec(),
        };
        // The origin is the link's, whatever the record claims.
        let h = r.mirror_headers("seoul");
        assert_eq!(
            h,
            vec![
                ("dtfed-from".to_owned(), b"p".to_vec()),
                ("dtfed-origin".to_owned(), b"seoul".to_vec()),
                (HEADER_ORIGIN_OFFSET.to_owned(), b"42".to_vec()),
                (HEADER_ORIGIN_TS.to_owned(), b"1700000000000".to_vec()),
            ]
        );
        assert_eq!(r.header("dtfed-origin"), Some(&b"tokyo"[..]));
        assert_eq!(r.header("nope"), None);
    }

    #[test]
    fn bytes_fields_also_work_in_json() {
        // Not the wire format; checks the byte-string visitor's sequence path.
        let r = LinkRecord {
            offset: 1,
            timestamp_ms: 2,
            key: vec![0, 255],
            headers: vec![("h".into(), vec![9])],
            value: vec![],
        };
        let json = serde_json::to_string(&r).expect("serialize");
        let back: LinkRecord = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, r);
    }
}
