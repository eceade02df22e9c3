//! Kafka plumbing shared by the publish path, the fan-out owners and replay: client
//! settings, topic creation and validation, the Java-compatible room → partition mapping,
//! and librdkafka's mock cluster for `dtfed demo`.
//!
//! STUB: signatures fixed by the lead; bodies to be written.
#![allow(clippy::unused_async, unused_variables)]

use dtfed_proto::RoomId;

use crate::config::KafkaConfig;

#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("kafka at {brokers}: {detail}")]
    Unreachable { brokers: String, detail: String },
    #[error("topic {topic}: {detail}")]
    Topic { topic: String, detail: String },
}

/// Creates `topic` with `partitions` partitions if it does not exist; returns the partition
/// count the topic actually has.
pub async fn ensure_topic(
    cfg: &KafkaConfig,
    topic: &str,
    partitions: i32,
) -> Result<i32, KafkaSetupError> {
    unimplemented!()
}

/// The partition Kafka's default (Java) partitioner picks for key `room`:
/// `toPositive(murmur2(key)) % partitions`.
pub fn partition_for(room: &RoomId, partitions: i32) -> i32 {
    unimplemented!()
}

/// librdkafka's in-process mock cluster, for `dtfed demo`.
pub struct MockKafka {}

impl MockKafka {
    pub fn start(brokers: i32) -> Result<MockKafka, KafkaSetupError> {
        unimplemented!()
    }

    pub fn bootstrap(&self) -> String {
        unimplemented!()
    }
}
