//! Replay from Kafka for cursors older than a room's hot history: read the room's partition
//! of the local topic from an offset, keep the room's records, and say what retention has
//! already deleted.
//!
//! STUB: signatures fixed by the lead; bodies to be written.
#![allow(clippy::unused_async, unused_variables)]

use dtfed_proto::{LogRecord, RoomId};

use crate::config::KafkaConfig;

/// The room's records found in one partition range.
#[derive(Debug)]
pub struct RoomRead {
    pub partition: i32,
    /// The partition's earliest retained offset (low watermark) when read: a cursor below
    /// `earliest - 1` has lost `cursor+1 ..= earliest-1` to retention.
    pub earliest: i64,
    /// The room's records, in offset order.
    pub records: Vec<LogRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("kafka replay: {0}")]
    Kafka(String),
}

pub struct RoomLogReader {}

impl RoomLogReader {
    pub fn new(
        cfg: &KafkaConfig,
        region: &str,
        partitions: i32,
    ) -> Result<RoomLogReader, ReplayError> {
        unimplemented!()
    }

    /// The records of `room` from the local topic with `after < offset < before`.
    /// `after = None` reads from the earliest retained offset; `before = None` up to the
    /// high watermark at the time of the call.
    pub async fn read_room(
        &self,
        room: &RoomId,
        after: Option<i64>,
        before: Option<i64>,
    ) -> Result<RoomRead, ReplayError> {
        unimplemented!()
    }
}
