//! The `dtfed` daemon: one daemon of one region.
//!
//! Where to start reading: [`node`] assembles a daemon and states its start and shutdown
//! order. A player's message then flows
//! [`gateway`] (WebSocket) → [`append`] (Kafka local topic, `acks=all`) → [`fanout`]
//! (partition owner, consumer group) → [`bus`] (Redis hot history + Pub/Sub) →
//! [`rooms`] (this daemon's room subscriptions) → [`gateway`] sessions → players.
//! [`replay`] serves cursors older than the hot history from Kafka. Federation is
//! [`mirror`]: serving this region's topic to peers (origin) → QUIC → writing theirs here
//! (sink), with [`mirror::tasks`] deciding which daemon writes which mirror partition. [`admin`] is the
//! operator's HTTP surface; [`demo`] runs regions with embedded stand-ins; [`verify`] finds
//! regions whose copies of a room's records diverge (`dtfed verify`).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod admin;
pub mod append;
pub mod bus;
pub mod config;
pub mod demo;
pub mod drill;
pub mod fanout;
pub mod gateway;
pub mod kafka;
pub mod metrics;
pub mod mirror;
pub mod node;
pub mod replay;
pub mod rooms;
pub mod signals;
pub mod status;
pub mod verify;
