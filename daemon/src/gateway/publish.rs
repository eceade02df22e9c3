//! Idempotent publishes: a player's publish with a `ref` is stored at most once per
//! (player, room, `ref`, body) within [`WINDOW`], however often the player retries it, from
//! whichever connection or daemon of the region. The body is part of it so that a client
//! that reuses `ref`s (a counter that restarts with each connection) loses no message: the
//! same `ref` with another body is another message.
//!
//! Why: a publish Kafka did not acknowledge in time may still be stored (the write can
//! happen after the producer gave up on it), and an `ack` can be lost with the connection.
//! A player whose client simply retries with the same `ref` must not say the same thing
//! twice.
//!
//! How: before appending, the publish claims its key in the bus (one atomic step in Redis):
//!
//! - nothing there: claimed ("pending since now"), appended; on the ack the key records the
//!   offset, on a certain failure (never sent) it is released, on an unknown outcome
//!   (timeout after sending) it stays pending;
//! - an offset: stored already, answered with an `ack` of that offset, nothing appended;
//! - pending for less than the publish timeout and a margin ([`stale_after`]): another
//!   attempt is in flight, answered `unavailable` (retry shortly);
//! - pending for longer: that attempt's outcome is unknown. The log decides: the records of
//!   the room's partition from that time on are searched for the player's `ref` (the
//!   [`dtfed_proto::record::HEADER_REF`] header). Found: `ack` with its offset. Not found:
//!   appended now.
//!
//! A connection's publishes are stored in the order it sent them: claims run concurrently,
//! but each publish enters the producer's queue only after the one before it did
//! ([`Turn`]).
//!
//! While the bus is unreachable the claim cannot be made; the publish is appended without
//! it (Kafka stays the one dependency of publishing), and a retry in that time may be
//! stored twice. Publishes without a `ref` are appended as they come.

use dtfed_proto::record::now_ms;
use std::time::Duration;

use dtfed_proto::record::LogValue;
use dtfed_proto::RoomId;
use tokio::sync::oneshot;

use super::Gateway;
use crate::append::AppendError;
use crate::bus::{PublishClaim, PublishKey, PublishOutcome};

/// How long a (player, room, `ref`) is remembered: a retry later than this is a new message.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Clock difference allowed between the daemons of a region when the log is searched by
/// time (record timestamps are the producing daemon's clock).
const CLOCK_SKEW_MS: i64 = 5_000;

/// Why a publish was not acknowledged. Every case means "retry with the same `ref`".
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Not stored.
    #[error("message not stored, try again: {0}")]
    NotStored(String),
    /// Handed to Kafka, not acknowledged: maybe stored.
    #[error("message not acknowledged in time, it may still be stored; retry with the same ref (it is never stored twice): {0}")]
    Unknown(String),
    /// Another attempt with this `ref` is still in flight.
    #[error(
        "an earlier publish with this ref is still in flight; retry with the same ref in a moment"
    )]
    InFlight,
}

impl PublishError {
    /// What the player is told: what to do, without the Kafka or Redis detail behind it
    /// (that is logged).
    pub fn for_player(&self) -> &'static str {
        match self {
            PublishError::NotStored(_) => "message not stored, try again",
            PublishError::Unknown(_) => "message not acknowledged in time, it may still be stored; retry with the same ref (it is never stored twice)",
            PublishError::InFlight => "an earlier publish with this ref is still in flight; retry with the same ref in a moment",
        }
    }
}

/// A publish's place in its connection's order: it is queued for Kafka after `after`
/// fired (or was dropped), and drops `done` once it is queued itself (or will never be).
#[derive(Debug)]
pub struct Turn {
    pub after: Option<oneshot::Receiver<()>>,
    pub done: oneshot::Sender<()>,
}

impl Turn {
    /// The turn of the publish after `previous` (the receiver of the one before).
    pub fn after(previous: Option<oneshot::Receiver<()>>) -> (Turn, oneshot::Receiver<()>) {
        let (done, next) = oneshot::channel();
        (
            Turn {
                after: previous,
                done,
            },
            next,
        )
    }
}

/// A pending claim older than this belongs to an attempt that has ended, one way or the
/// other: the append's own bound (publish timeout plus its guard) and a margin.
fn stale_after(gw: &Gateway) -> Duration {
    gw.appender.publish_timeout() + Duration::from_secs(3)
}

/// Publishes `value` in `room` as `reference` (see the module docs); the offset it was
/// stored at.
pub async fn publish(
    gw: &Gateway,
    room: &RoomId,
    value: &LogValue,
    reference: Option<&str>,
    turn: Turn,
) -> Result<i64, PublishError> {
    let Some(reference) = reference else {
        return append(gw, room, value, None, turn).await;
    };
    let key = PublishKey {
        room: room.clone(),
        player: value.from.clone(),
        reference: reference.to_owned(),
        body: digest(value.body.as_json().as_bytes()),
    };
    let bus = gw.rooms.bus();
    let now = now_ms();
    let stale = millis(stale_after(gw));
    let window = millis(WINDOW);
    match bus.claim_publish(&key, now, stale, window).await {
        Err(e) => {
            tracing::warn!(%room, error = %e, "cannot claim a publish in the bus; appending it without the retry check");
            return append(gw, room, value, Some(reference), turn).await;
        }
        Ok(PublishClaim::Stored(offset)) => return Ok(offset),
        Ok(PublishClaim::InFlight) => return Err(PublishError::InFlight),
        Ok(PublishClaim::Unknown { since }) => {
            let found = gw
                .replay
                .find_publish(
                    room,
                    &value.from,
                    reference,
                    &value.body,
                    since.saturating_sub(CLOCK_SKEW_MS),
                    since.saturating_add(stale).saturating_add(CLOCK_SKEW_MS),
                )
                .await;
            match found {
                Ok(Some(offset)) => {
                    tracing::info!(%room, offset, "a retried publish was stored already; acknowledged, not appended again");
                    settle(gw, key, PublishOutcome::Stored(offset));
                    return Ok(offset);
                }
                Ok(None) => {}
                Err(e) => {
                    // Still unknown: the next retry searches again.
                    settle(gw, key, PublishOutcome::Unknown { since });
                    return Err(PublishError::Unknown(format!(
                        "cannot tell yet whether an earlier attempt was stored: {e}"
                    )));
                }
            }
        }
        Ok(PublishClaim::Fresh) => {}
    }
    let result = append(gw, room, value, Some(reference), turn).await;
    let outcome = match &result {
        Ok(offset) => PublishOutcome::Stored(*offset),
        Err(PublishError::NotStored(_)) => PublishOutcome::NotStored,
        Err(_) => PublishOutcome::Unknown { since: now },
    };
    settle(gw, key, outcome);
    result
}

async fn append(
    gw: &Gateway,
    room: &RoomId,
    value: &LogValue,
    reference: Option<&str>,
    turn: Turn,
) -> Result<i64, PublishError> {
    if let Some(after) = turn.after {
        // Fired or dropped: either way the publish before this one is queued or never will be.
        let _ = after.await;
    }
    let queued = Some(turn.done);
    let started = now_ms();
    match gw
        .appender
        .append_publish(room, value, reference, queued)
        .await
    {
        Ok(a) => Ok(a.offset),
        Err(e @ AppendError::StoredAtUnknownOffset { .. }) => {
            // Stored once, somewhere in the room's partition: a publish with a ref can be
            // found there (its `dtfed-ref` header); one without can only be called unknown.
            let Some(reference) = reference else {
                return Err(PublishError::Unknown(e.to_string()));
            };
            let until = now_ms().saturating_add(CLOCK_SKEW_MS);
            match gw
                .replay
                .find_publish(
                    room,
                    &value.from,
                    reference,
                    &value.body,
                    started.saturating_sub(CLOCK_SKEW_MS),
                    until,
                )
                .await
            {
                Ok(Some(offset)) => {
                    tracing::info!(%room, offset, "Kafka stored a publish without saying where; found it in the log");
                    Ok(offset)
                }
                Ok(None) => Err(PublishError::Unknown(format!(
                    "{e}, and it is not in the log yet"
                ))),
                Err(read) => Err(PublishError::Unknown(format!(
                    "{e}, and the log could not be read: {read}"
                ))),
            }
        }
        Err(e @ AppendError::MaybeStored(_)) => Err(PublishError::Unknown(e.to_string())),
        Err(e) => Err(PublishError::NotStored(e.to_string())),
    }
}

/// Records the outcome off the publish's path: the `ack` does not wait for it. Until it
/// lands the claim reads as in flight, which a retry is told to wait out.
fn settle(gw: &Gateway, key: PublishKey, outcome: PublishOutcome) {
    let bus = gw.rooms.bus().clone();
    let window = millis(WINDOW);
    tokio::spawn(async move {
        if let Err(e) = bus.settle_publish(&key, outcome, window).await {
            tracing::warn!(room = %key.room, error = %e, "cannot record a publish's outcome; a retry waits for its claim to go stale");
        }
    });
}

/// FNV-1a, 64 bits: the same on every daemon and version (a claim is shared by the
/// region's daemons), and plenty to tell one player's messages under one `ref` apart.
fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::digest;

    #[test]
    fn digest_is_fnv1a() {
        // Reference values of FNV-1a 64.
        assert_eq!(digest(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(digest(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(digest(br#"{"text":"hi"}"#), digest(br#"{"text":"ho"}"#));
    }
}
