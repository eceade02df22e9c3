//! The integration-test harness: real Kafka, real Redis, real `dtfed` processes, and a
//! protocol-v1 WebSocket client. See the crate documentation for the overview.

pub mod client;
pub mod config;
pub mod daemon;
pub mod federation;
pub mod http;
pub mod jwt;
pub mod kafka;
pub mod node;
pub mod redis;
pub mod sys;
pub mod util;

pub use client::{Subscribed, WsClient};
pub use config::ConfigBuilder;
pub use daemon::DtfedProcess;
pub use federation::{DrillOutcome, DrillProcess, Federation, FederationSpec};
pub use http::{http_get, http_request, HttpResponse};
pub use kafka::{KafkaBroker, KafkaCluster};
pub use node::{NodeOutput, NodeScript, RunningNode};
pub use redis::RedisServer;
pub use sys::{pid_alive, wait_pid_gone};
pub use util::{free_port, TestDir};
