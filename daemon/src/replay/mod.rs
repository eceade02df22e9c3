//! Replay for players: a room's messages after a cursor, read from Kafka when the hot
//! history in the bus no longer holds them. [`local`] reads this region's own messages from
//! the local topic ([`RoomLogReader`]); [`remote`] reads other regions' messages from this
//! region's mirror topics ([`MirrorRoomReader`]). Both answer with a [`RoomRead`] bounded by
//! a [`ReadLimit`], or a [`ReplayError`]; `gateway::resume` puts them together with the
//! bus's history for a player's `sub`.
//!
//! # Cost and concurrency
//!
//! A read is a tail scan of one partition: every record of the partition in the range is
//! fetched and the other rooms' records are dropped here, so the cost grows with the range,
//! not with the room's share of it. Readers are plain librdkafka consumers with no group
//! (a unique dummy `group.id`, manual `assign`, nothing ever committed). Each consumer is a
//! librdkafka instance with its own threads and broker connections (a few MB and one TCP
//! connection per broker), so they are pooled and reused rather than created per read,
//! and at most [`MAX_CONCURRENT_READS`] reads run at once (each on a blocking thread): when
//! many players resume together the rest queue (first come, first served), within the
//! overall [`READ_TIMEOUT`]; a read that could not get a slot in time is an error, which the
//! player sees as `unavailable` (retry), never as a gap.
//!
//! Every read stops at a [`ReadLimit`] ([`READ_LIMIT`]: messages, bytes, and records scanned)
//! and says where ([`RoomRead::stopped_at`]): memory per read is bounded, and so is the time
//! one read holds a slot, so slots pass from player to player instead of one resume of a
//! large partition holding one for its whole scan. The player continues from there with
//! another `sub`.

use std::time::Duration;

use dtfed_proto::record::LogValue;
use dtfed_proto::{LogRecord, RoomId};

pub mod local;
pub mod remote;

pub use local::RoomLogReader;
pub use remote::{MirrorReplay, MirrorRoomReader};

/// Reads that may run at once; the others wait for a slot.
pub const MAX_CONCURRENT_READS: usize = 4;
/// A whole read (waiting for a slot included) that takes longer fails.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How much one read takes before it stops (and says where).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadLimit {
    /// The room's messages returned.
    pub messages: usize,
    /// Bytes of the room's messages returned (their values as stored).
    pub bytes: usize,
    /// Records of the partition examined, the room's or not: the cost of the scan.
    pub scanned: i64,
}

/// The limit of every replay read: about a megabyte per answer, and a scan of a fraction of
/// a second.
pub const READ_LIMIT: ReadLimit = ReadLimit {
    messages: 1000,
    bytes: 1 << 20,
    scanned: 100_000,
};

impl ReadLimit {
    /// True once a read holding `messages` of `bytes` after examining `scanned` records
    /// must stop.
    pub fn reached(&self, messages: usize, bytes: usize, scanned: i64) -> bool {
        messages >= self.messages || bytes >= self.bytes || scanned >= self.scanned
    }
}

/// The room's records found in one partition range.
#[derive(Debug)]
pub struct RoomRead {
    pub partition: i32,
    /// The partition's earliest retained offset (low watermark) when read: a cursor below
    /// `earliest - 1` has lost `cursor+1 ..= earliest-1` to retention.
    pub earliest: i64,
    /// The room's records, in offset order.
    pub records: Vec<LogRecord>,
    /// `Some(o)` when the read stopped at its [`ReadLimit`] before the end of the range:
    /// every record of the room up to offset `o` is in `records`, nothing after `o` was read.
    pub stopped_at: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("kafka replay: {0}")]
    Kafka(String),
}

/// A room's records as one read collects them, with the bytes they hold (for the
/// [`ReadLimit`]). Shared by the local and the remote replay.
#[derive(Debug, Default)]
pub(crate) struct RoomRecords {
    pub(crate) records: Vec<LogRecord>,
    pub(crate) bytes: usize,
}

impl RoomRecords {
    /// Keeps the record at `offset` of `partition` (origin `origin`), a record of `room`
    /// whose value is `payload`, if that value is a chat message; logs and skips it if not.
    pub(crate) fn keep(
        &mut self,
        payload: Option<&[u8]>,
        room: &RoomId,
        origin: &str,
        partition: i32,
        offset: i64,
    ) {
        match payload.map(|v| (v.len(), LogValue::from_json(v))) {
            Some((len, Ok(value))) => {
                self.bytes = self.bytes.saturating_add(len);
                self.records.push(LogRecord {
                    room: room.clone(),
                    origin: origin.to_owned(),
                    partition,
                    offset,
                    value,
                });
            }
            Some((_, Err(e))) => {
                tracing::warn!(origin, partition, offset, error = %e, "replay: skipping a record that is not a chat message");
            }
            None => {
                tracing::warn!(
                    origin,
                    partition,
                    offset,
                    "replay: skipping a record without a value"
                );
            }
        }
    }

    /// Whether a read that holds these records after examining `scanned` must stop.
    pub(crate) fn reached(&self, limit: &ReadLimit, scanned: i64) -> bool {
        limit.reached(self.records.len(), self.bytes, scanned)
    }
}
