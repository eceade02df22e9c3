//! The region's bus: per-room hot history and live delivery to every gateway of the region.
//!
//! The fan-out owner of a partition calls [`Bus::apply`] for each record, in partition order:
//! one atomic step appends the message to the room's hot history (bounded by count and age),
//! stamps it with `prev` (the previous offset of the same room from the same origin, kept
//! beside the history so it survives owner changes) and publishes it on the room's channel.
//! A record at or below the room's last offset for its origin was applied already (a new owner
//! replaying after a crash) and is skipped, so `apply` is idempotent.
//!
//! The bus also keeps the claims that make a publish with a `ref` idempotent
//! ([`Bus::claim_publish`], [`Bus::settle_publish`]; see `gateway::publish`), and the
//! region's replication watermarks, each published by the daemon running that mirror
//! partition's task and read by every daemon ([`Bus::put_watermarks`],
//! [`Bus::watermarks`]; see `mirror::watermarks`).
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
use dtfed_proto::{Cursor, LogRecord, MsgFrame, OriginMark, RoomId};
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

/// One idempotent publish: a player's `ref` in a room, for one body (see
/// `gateway::publish`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PublishKey {
    pub room: RoomId,
    pub player: String,
    pub reference: String,
    /// A digest of the body's JSON text: a `ref` reused for another message is not a retry.
    pub body: u64,
}

/// What [`Bus::claim_publish`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishClaim {
    /// Not seen within the window: claimed, pending since now.
    Fresh,
    /// Stored at this offset of the local topic.
    Stored(i64),
    /// Claimed by another attempt less than `stale_ms` ago, which may still be in flight.
    InFlight,
    /// Claimed at `since` (ms) by an attempt whose outcome is unknown; claimed again now.
    Unknown { since: i64 },
}

/// What became of a claimed publish, for [`Bus::settle_publish`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishOutcome {
    Stored(i64),
    /// Certainly not stored: the claim is released.
    NotStored,
    /// Maybe stored; the attempt began at `since` (ms).
    Unknown {
        since: i64,
    },
}

/// The replication watermark of one mirror partition, (origin, partition), as the daemon
/// running its mirror task publishes it (see `mirror::watermarks`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionMark {
    pub origin: String,
    pub partition: i32,
    pub mark: OriginMark,
}

/// A watermark's stored form: the mark's JSON.
fn mark_value(mark: &OriginMark) -> String {
    // A plain struct of numbers and booleans: serializing cannot fail.
    serde_json::to_string(mark).unwrap_or_default()
}

/// Reads a stored watermark; `None` for anything unreadable (logged by the caller's view:
/// a missing mark reads as "not live").
fn parse_mark(v: &str) -> Option<OriginMark> {
    serde_json::from_str(v).ok()
}

/// A claim's stored form: `a<offset>` (stored) or `p<ms>` (pending since).
fn claim_value(outcome: PublishOutcome) -> Option<String> {
    match outcome {
        PublishOutcome::Stored(o) => Some(format!("a{o}")),
        PublishOutcome::NotStored => None,
        PublishOutcome::Unknown { since } => Some(format!("p{since}")),
    }
}

/// Reads what a claim held before this attempt (`None`: nothing); `stale_ms` decides
/// between in flight and unknown. Unreadable values count as nothing.
fn parse_claim(previous: Option<&str>, now_ms: i64, stale_ms: i64) -> PublishClaim {
    let Some(v) = previous else {
        return PublishClaim::Fresh;
    };
    let number = v.get(1..).and_then(|n| n.parse::<i64>().ok());
    match (v.as_bytes().first(), number) {
        (Some(b'a'), Some(o)) => PublishClaim::Stored(o),
        (Some(b'p'), Some(t)) if now_ms.saturating_sub(t) < stale_ms => PublishClaim::InFlight,
        (Some(b'p'), Some(t)) => PublishClaim::Unknown { since: t },
        _ => PublishClaim::Fresh,
    }
}

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

    /// Claims publish `key` for `window_ms`, atomically: nothing or a stale pending claim
    /// (older than `stale_ms`) is replaced by "pending since `now_ms`"; a stored one or a
    /// fresh pending one is left as it is. Says what was there.
    async fn claim_publish(
        &self,
        key: &PublishKey,
        now_ms: i64,
        stale_ms: i64,
        window_ms: i64,
    ) -> Result<PublishClaim, BusError>;

    /// Records what became of a claimed publish (kept for `window_ms`).
    async fn settle_publish(
        &self,
        key: &PublishKey,
        outcome: PublishOutcome,
        window_ms: i64,
    ) -> Result<(), BusError>;

    /// Publishes the watermarks of the mirror partitions this daemon runs, replacing what
    /// was there for them, each readable for `ttl_ms` only: a daemon that stops publishing
    /// (dead, or its task moved) leaves nothing behind once that passes.
    async fn put_watermarks(&self, marks: &[PartitionMark], ttl_ms: i64) -> Result<(), BusError>;

    /// The watermarks of `keys` ((origin, partition)) as last published and not expired, in
    /// the order of `keys` (`None`: nothing, or nothing readable).
    async fn watermarks(&self, keys: &[(String, i32)])
        -> Result<Vec<Option<OriginMark>>, BusError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_claims_read_back_as_written() {
        let stale = 5_000;
        assert_eq!(parse_claim(None, 10_000, stale), PublishClaim::Fresh);
        let stored = claim_value(PublishOutcome::Stored(42));
        assert_eq!(
            parse_claim(stored.as_deref(), 10_000, stale),
            PublishClaim::Stored(42)
        );
        let pending = claim_value(PublishOutcome::Unknown { since: 9_000 });
        assert_eq!(
            parse_claim(pending.as_deref(), 10_000, stale),
            PublishClaim::InFlight
        );
        assert_eq!(
            parse_claim(pending.as_deref(), 14_000, stale),
            PublishClaim::Unknown { since: 9_000 }
        );
        assert_eq!(claim_value(PublishOutcome::NotStored), None);
        assert_eq!(parse_claim(Some("zz"), 10_000, stale), PublishClaim::Fresh);
    }
}
