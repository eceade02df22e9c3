//! Replaying a room from a cursor: the hot history in the bus first, Kafka for what the hot
//! history no longer holds, and a `gap` frame for what Kafka no longer holds either.
//!
//! The same routine serves a `sub` with `since` and a session's backfill after it noticed a
//! hole in live delivery (a `prev` beyond its cursor, or a bus resync): in both cases the
//! session asks "everything of this room after my cursor", and the cursor drops anything it
//! already has.
//!
//! Whether the hot history alone is enough for an origin follows from `prev`: the first
//! history entry of an origin says which offset came before it. If the cursor is at or past
//! that `prev`, nothing is missing; if not (or the history holds nothing of an origin whose
//! tail is beyond the cursor), the log must fill the hole.

use std::collections::{BTreeMap, BTreeSet};

use dtfed_proto::{Cursor, MsgFrame, RoomId, ServerFrame};

use super::Gateway;
use crate::bus::BusError;

/// What one replay answers.
#[derive(Debug)]
pub struct Replay {
    /// Frames to send, in order.
    pub frames: Vec<ServerFrame>,
    /// False when a log read stopped at its limit ([`crate::replay::READ_LIMIT`]): the
    /// cursor names how far the frames go, and the rest needs another replay from there.
    pub complete: bool,
}

/// Why a replay could not be answered. None of these says anything about the data: the
/// player keeps its cursor and asks again.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The log could not be read now (all read slots busy past the read timeout, or Kafka
    /// unreachable): retry.
    #[error("the log cannot be read right now, retry: {0}")]
    LogBusy(String),
    /// The caller refused the log read (the player's replay rate limit).
    #[error("too many replays from the log; retry in a second")]
    RateLimited,
}

/// Everything of `room` after `cursor` as frames to send in order, advancing `cursor` past
/// what it returns: all of it, or as far as one read's limit goes (then
/// [`Replay::complete`] is false). An origin missing from the cursor is replayed from its
/// oldest retained message. `may_read_log` is asked once, before the first log read.
pub async fn replay(
    gw: &Gateway,
    room: &RoomId,
    cursor: &mut Cursor,
    may_read_log: &mut (dyn FnMut() -> bool + Send),
) -> Result<Replay, ResumeError> {
    let bus = gw.rooms.bus();
    let history = bus.history(room).await?;
    let tails = bus.tails(room).await?;
    let mut frames = Vec::new();

    let origins: BTreeSet<String> = cursor
        .origins()
        .map(|(o, _)| o.to_owned())
        .chain(history.iter().map(|m| m.origin.clone()))
        .chain(tails.origins().map(|(o, _)| o.to_owned()))
        .collect();

    // Per origin read from the log: the offset of the last message before the history's
    // first one, which that message's `prev` should name (a bus that lost its data stamped
    // it `null`).
    let mut log_prev: BTreeMap<&str, Option<i64>> = BTreeMap::new();
    let mut asked = false;
    for origin in &origins {
        let after = cursor.get(origin);
        let first = history.iter().find(|m| &m.origin == origin);
        let readable = origin == &gw.region
            || gw
                .mirror_replay
                .as_ref()
                .is_some_and(|m| m.origins.contains(origin));
        let (hole, before) = match first {
            // The history proves continuity only through `prev`: a first entry with no
            // `prev` after a cursor that has seen this origin means the bus lost its state
            // (Redis restarted without persistence, or was flushed), not that nothing came
            // before.
            Some(m) => (
                match m.prev {
                    Some(p) => after.is_none_or(|a| a < p),
                    None => after.is_some_and(|a| a < m.offset),
                },
                Some(m.offset),
            ),
            None => match tails.get(origin) {
                Some(t) => (after.is_none_or(|a| a < t), Some(t + 1)),
                // The bus knows nothing of an origin the player has seen: it lost its
                // state, and only the log can say what came after the cursor.
                None => (after.is_some() && readable, None),
            },
        };
        // Nothing can lie strictly between two adjacent offsets: no read needed (the first
        // message after a bus restart, for a session that has everything before it).
        let adjacent = matches!((after, before), (Some(a), Some(b)) if a.saturating_add(1) >= b);
        if !hole || adjacent {
            continue;
        }
        if !readable {
            // An origin this region does not mirror: named, not skipped.
            frames.push(gap(room, origin, after, before));
            continue;
        }
        if !asked {
            asked = true;
            if !may_read_log() {
                return Err(ResumeError::RateLimited);
            }
        }
        let read = if origin == &gw.region {
            Some(gw.replay.read_room(room, after, before).await)
        } else {
            match &gw.mirror_replay {
                Some(mirror) => match mirror.origins.get(origin) {
                    Some(partitions) => Some(
                        mirror
                            .reader
                            .read_room(origin, room, partitions, after, before)
                            .await,
                    ),
                    None => None,
                },
                None => None,
            }
        };
        match read {
            Some(Ok(read)) => {
                let mut prev = after;
                if let Some(a) = after {
                    if a + 1 < read.earliest {
                        frames.push(ServerFrame::Gap {
                            room: room.clone(),
                            origin: origin.clone(),
                            from: a + 1,
                            to: read.earliest - 1,
                        });
                        prev = None;
                    }
                }
                for rec in read.records {
                    if cursor.has_seen(origin, rec.offset) {
                        continue;
                    }
                    let msg = rec.to_msg(prev);
                    prev = Some(rec.offset);
                    cursor.advance(origin, rec.offset);
                    frames.push(ServerFrame::Msg(msg));
                }
                log_prev.insert(origin.as_str(), prev);
                if let Some(stop) = read.stopped_at {
                    // The rest of this origin (and the hot history, which comes after it)
                    // is for the next replay, from here.
                    cursor.advance(origin, stop);
                    return Ok(Replay {
                        frames,
                        complete: false,
                    });
                }
            }
            // Only busy or unreachable: a gap would move the player's cursor past messages
            // that exist. A gap means retention passed, nothing else.
            Some(Err(e)) => {
                tracing::warn!(%room, origin, error = %e, "replay from Kafka failed; the player is asked to retry");
                return Err(ResumeError::LogBusy(e.to_string()));
            }
            None => frames.push(gap(room, origin, after, before)),
        }
    }

    for mut m in history {
        if !cursor.has_seen(&m.origin, m.offset) {
            if m.prev.is_none() {
                if let Some(&p) = log_prev.get(m.origin.as_str()) {
                    m.prev = p;
                }
            }
            log_prev.remove(m.origin.as_str());
            cursor.advance(&m.origin, m.offset);
            frames.push(ServerFrame::Msg(m));
        }
    }
    Ok(Replay {
        frames,
        complete: true,
    })
}

fn gap(room: &RoomId, origin: &str, after: Option<i64>, before: Option<i64>) -> ServerFrame {
    ServerFrame::Gap {
        room: room.clone(),
        origin: origin.to_owned(),
        from: after.map_or(0, |a| a + 1),
        to: before.map_or(0, |b| b - 1),
    }
}

/// True when live message `m` does not follow on from `cursor`: something between them was
/// not delivered, and the session must backfill before delivering `m`.
/// A message without `prev` after the cursor has seen its origin is a hole too: the bus lost
/// its state and restarted the chain.
pub fn is_hole(cursor: &Cursor, m: &MsgFrame) -> bool {
    match m.prev {
        None => cursor.get(&m.origin).is_some_and(|c| c < m.offset),
        Some(p) => cursor.get(&m.origin).is_none_or(|c| p > c),
    }
}
