//! Wire types and codecs for dtfed. Sans-IO: no tokio, no sockets, nothing that blocks.
//!
//! Start reading at [`client`]: the client protocol v1 that players speak over WebSocket
//! (JSON text frames). [`room`] validates room ids, [`cursor`] is a player's position in a
//! room (`{origin: last offset seen}`), and [`record`] is the shape of one chat message in the
//! region's Kafka log. [`link`] is the region-to-region mirror protocol (bincode frames
//! behind one codec module) and its sans-IO session state machine. [`stomp`] is the STOMP
//! frame codec for STOMP clients over WebSocket.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod client;
pub mod cursor;
pub mod link;
pub mod record;
pub mod room;
pub mod stomp;

pub use client::{ClientFrame, ErrorCode, MsgFrame, OriginMark, OriginMarks, ServerFrame};
pub use cursor::Cursor;
pub use record::LogRecord;
pub use room::RoomId;
