//! Shared helpers of the daemon's library tests: logs, librdkafka's mock cluster as a
//! [`KafkaConfig`], messages and rooms numbered `i`, polling for a condition, and a recording
//! [`fake_bus::FakeBus`]. The tests crate's library-level Kafka tests include this module too
//! (`#[path]`), so there is one copy.
#![allow(dead_code)]

pub mod fake_bus;

use std::time::{Duration, Instant};

use dtfed::config::KafkaConfig;
use dtfed::kafka::MockKafka;
use dtfed_proto::client::Body;
use dtfed_proto::record::LogValue;
use dtfed_proto::RoomId;

/// Test logs through the test writer: `RUST_LOG`, or warnings and dtfed's own info lines.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,dtfed=info")),
        )
        .try_init();
}

/// A region's Kafka settings on `mock`: local topic `topic` of `partitions`, replication 1,
/// publish timeout 3 s, group session timeout 6 s. Tests override fields with `..`.
pub fn mock_kafka(mock: &MockKafka, topic: &str, partitions: i32) -> KafkaConfig {
    KafkaConfig {
        brokers: mock.bootstrap(),
        local_topic: topic.into(),
        partitions,
        replication_factor: 1,
        publish_timeout_ms: 3000,
        session_timeout_ms: 6000,
        ..KafkaConfig::default()
    }
}

/// Message number `i`: from `p<i>`, body `{"n":i}`.
pub fn value(i: usize) -> LogValue {
    LogValue {
        from: format!("p{i}"),
        ts: 1_700_000_000_000 + i as i64,
        body: Body::from_json(&format!("{{\"n\":{i}}}")).expect("json"),
    }
}

/// Room `room-<i>`.
pub fn room(i: usize) -> RoomId {
    RoomId::parse(&format!("room-{i}")).expect("room")
}

/// Polls `ok` every 50 ms; fails the test naming `what` after `timeout`.
pub async fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
