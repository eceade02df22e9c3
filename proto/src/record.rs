//! One chat message as stored in a region's Kafka log.
//!
//! Key: the room id. Value: JSON `{"from":P,"ts":MS,"body":ANY}`, readable by any Kafka tool.
//! Headers: [`HEADER_ORIGIN`] (the region that accepted it), [`HEADER_FROM`] (the player) and
//! [`HEADER_REF`] (the publish's `ref`, if any),
//! so operators can filter with `kafka-console-consumer --property print.headers=true`.

use serde::{Deserialize, Serialize};

use crate::client::{Body, MsgFrame};
use crate::room::RoomId;

/// The wall clock in milliseconds since the Unix epoch, the unit of a record's `ts` and of
/// every latency dtfed measures between machines (0 if the clock is before the epoch).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Header naming the region whose gateway accepted the message.
pub const HEADER_ORIGIN: &str = "dtfed-origin";
/// Header naming the player who sent it.
pub const HEADER_FROM: &str = "dtfed-from";
/// Header holding the publish's `ref`, when it had one: with [`HEADER_FROM`] and the room,
/// what tells whether a publish whose outcome was unknown was stored.
pub const HEADER_REF: &str = "dtfed-ref";
/// On mirror topics: the message's offset in its origin's local topic (decimal text).
pub const HEADER_ORIGIN_OFFSET: &str = "dtfed-origin-offset";
/// On mirror topics: the origin append time, ms since the epoch (decimal text).
pub const HEADER_ORIGIN_TS: &str = "dtfed-origin-ts";

/// The JSON value of a log record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogValue {
    pub from: String,
    pub ts: i64,
    pub body: Body,
}

/// A record read back from the log, with where it sits.
#[derive(Clone, Debug, PartialEq)]
pub struct LogRecord {
    pub room: RoomId,
    /// Region that accepted the message.
    pub origin: String,
    /// Partition in the origin's local topic.
    pub partition: i32,
    /// Offset in the origin's local topic.
    pub offset: i64,
    pub value: LogValue,
}

impl LogValue {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

impl LogRecord {
    /// The message as a player sees it, given the previous offset of this room and origin.
    pub fn to_msg(&self, prev: Option<i64>) -> MsgFrame {
        MsgFrame {
            room: self.room.clone(),
            origin: self.origin.clone(),
            offset: self.offset,
            prev,
            ts: self.value.ts,
            from: self.value.from.clone(),
            body: self.value.body.clone(),
        }
    }
}
