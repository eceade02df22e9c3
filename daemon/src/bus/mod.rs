//! The region's bus: per-room hot history and live delivery to every gateway of the region.
//!
//! The fan-out owner of a partition calls [`Bus::apply`] for each record, in partition order:
//! one atomic step appends the message to the room's hot history (bounded by count and age),
//! stamps it with `prev` (the previous offset of the same room from the same origin, kept
//! beside the history so it survives owner changes) and publishes it on the room's channel.
//! A record at or below the room's last offset for its origin was applied already (a new owner
//! replaying after a crash) and is skipped, so `apply` is idempotent.
//!
//! Gateways [`Bus::subscribe`] to the rooms that have local players and receive
//! [`BusEvent`]s. Live delivery is fire-and-forget (Redis Pub/Sub), so the subscriber says
//! [`BusEvent::Resync`] whenever its connection was re-established: anything may have been
//! missed, and each session backfills from [`Bus::history`].
//!
//! [`redis::RedisBus`] is the production bus; [`memory::MemoryBus`] stands in for it in
//! `dtfed demo` when no Redis is given.

pub mod memory;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use dtfed_proto::{Cursor, LogRecord, MsgFrame, RoomId};
use tokio::sync::mpsc;

/// What the bus delivers to the gateway's room dispatcher.
#[derive(Clone, Debug)]
pub enum BusEvent {
    /// A message published on a room this daemon subscribes to.
    Msg(Arc<MsgFrame>),
    /// The subscriber reconnected and is subscribed again to every room: messages published
    /// while it was away were not delivered and must be backfilled from history.
    Resync,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Redis could not be used (down, timeout, busy, out of memory, failing over, ...):
    /// retrying the same call later may work.
    #[error("redis: {0}")]
    Redis(String),
    /// Redis ran the call and refused it (a script error, a key of the wrong type): the
    /// same records will most likely be refused again, whatever the wait.
    #[error("redis refused: {0}")]
    Refused(String),
    #[error("corrupt history entry in room {room}: {detail}")]
    Corrupt { room: String, detail: String },
    #[error("the bus is shut down")]
    Closed,
}

impl BusError {
    /// Whether retrying the same records cannot be expected to help: the bus refused them
    /// ([`BusError::Refused`]) or holds something it cannot read ([`BusError::Corrupt`]).
    /// Such a failure is the failing room's, not the bus's: see [`Bus::apply_batch`].
    pub fn is_permanent(&self) -> bool {
        matches!(self, BusError::Refused(_) | BusError::Corrupt { .. })
    }
}

/// Receiver of [`BusEvent`]s, handed out once when the bus is built.
pub type BusEvents = mpsc::Receiver<BusEvent>;

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Appends `rec` to its room's history and publishes it, atomically. Returns the message
    /// as published (with `prev`), or `None` when the record was applied before (replay).
    async fn apply(&self, rec: &LogRecord) -> Result<Option<MsgFrame>, BusError>;

    /// Applies several records as [`Bus::apply`] would, one after the other, and returns
    /// their results in the same order. This is the fan-out owner's hot path: an
    /// implementation should make it one round trip (Redis: one pipeline).
    ///
    /// Contract: the records of one room (of one origin) must be given in offset order, and
    /// they are applied in that order. On `Err` nothing is said about which records were
    /// applied, except that **for each room, what was applied is a prefix** of that room's
    /// records in `recs`: never a later record without the earlier ones (an applied later
    /// record would make the bus skip the earlier one forever). The caller retries the whole
    /// batch; records applied the first time are skipped as already applied.
    ///
    /// A room that fails does not stop the others: their records are applied all the same
    /// (one failing room in a Redis pipeline fails only its own script). When the error
    /// [`is_permanent`](BusError::is_permanent), retrying the whole batch would fail again
    /// forever; the fan-out owner then applies room by room, record by record, and
    /// quarantines (skips and counts) a record the bus keeps refusing.
    async fn apply_batch(&self, recs: &[LogRecord]) -> Result<Vec<Option<MsgFrame>>, BusError> {
        let mut out = Vec::with_capacity(recs.len());
        for rec in recs {
            out.push(self.apply(rec).await?);
        }
        Ok(out)
    }

    /// The room's hot history, oldest first.
    async fn history(&self, room: &RoomId) -> Result<Vec<MsgFrame>, BusError>;

    /// The last offset applied per origin for `room` (not trimmed with the history).
    async fn tails(&self, room: &RoomId) -> Result<Cursor, BusError>;

    /// Starts live delivery of `room`; returns once the subscription is active, so nothing
    /// published after this returns is missed (short of a [`BusEvent::Resync`]).
    async fn subscribe(&self, room: &RoomId) -> Result<(), BusError>;

    /// Stops live delivery of `room`.
    async fn unsubscribe(&self, room: &RoomId) -> Result<(), BusError>;

    /// Checks the bus is reachable (for `/readyz`).
    async fn ping(&self) -> Result<(), BusError>;
}
