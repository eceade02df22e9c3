//! The publish path's durable step: append a player's message to the region's local topic
//! (idempotent producer, `acks=all`, key = room, Java-compatible partitioner) and wait for
//! Kafka's acknowledgement.
//!
//! STUB: signatures fixed by the lead; bodies to be written.
#![allow(clippy::unused_async, unused_variables)]

use std::time::Duration;

use dtfed_proto::{record::LogValue, RoomId};

use crate::config::KafkaConfig;

/// Where Kafka stored an appended message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Kafka did not acknowledge the record (down, timed out, refused): nothing is durable.
    #[error("kafka did not acknowledge the message: {0}")]
    Unavailable(String),
    #[error("kafka producer: {0}")]
    Setup(String),
}

pub struct KafkaAppender {}

impl KafkaAppender {
    pub fn new(cfg: &KafkaConfig, region: &str) -> Result<KafkaAppender, AppendError> {
        unimplemented!()
    }

    /// Appends one message; resolves once Kafka acknowledged it (or did not, within
    /// `kafka.publish_timeout_ms`).
    pub async fn append(&self, room: &RoomId, value: &LogValue) -> Result<Appended, AppendError> {
        unimplemented!()
    }

    /// Waits up to `timeout` for every in-flight message to be acknowledged.
    pub fn flush(&self, timeout: Duration) -> Result<(), AppendError> {
        unimplemented!()
    }
}
