//! The verdict of a drill (and of any fault test): from what publishers were acked and what
//! each subscriber received, per room, was anything lost, duplicated or reordered?
//!
//! Feed it as the run goes: [`Checker::acked`] for every publish the server acknowledged
//! (its room, origin region and offset), [`Checker::delivered`] for every `msg` a
//! subscriber received, [`Checker::gap`] for every `gap` frame. A subscriber is one player,
//! across its reconnects and region moves: it carries its cursor, so it must never see a
//! message twice nor go back within an origin, whichever region serves it.
//!
//! - **lost**: acked, and not delivered to a subscriber by the end (checked after the heal,
//!   once [`Checker::missing`] is 0 or the convergence wait ran out). Counted per
//!   (subscriber, message): one message missed by two players is 2.
//! - **duplicated**: a subscriber received the same (origin, offset) of a room again.
//! - **reordered**: a subscriber received, in a room, an offset of an origin below one it
//!   already had from that origin (and not a duplicate).
//! - **gaps**: `gap` frames received (the server saying history is gone); the acked
//!   messages inside them still count as lost.
//!
//! Every subscriber is expected to be subscribed to every room the checker hears of.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

/// What one subscriber saw of one room.
#[derive(Default, Debug)]
struct SubscriberRoom {
    /// Every message received, with when (ms on the caller's clock).
    seen: HashMap<(String, i64), u64>,
    last: HashMap<String, i64>,
    duplicated: u64,
    reordered: u64,
    gaps: u64,
}

/// Acked messages of a room, and what each subscriber saw of it.
#[derive(Default, Debug)]
struct RoomLog {
    /// Every acked message, with when it was acked.
    acked: HashMap<(String, i64), u64>,
    subscribers: HashMap<String, SubscriberRoom>,
}

/// Collects a run's events and judges them.
#[derive(Default, Debug)]
pub struct Checker {
    rooms: BTreeMap<String, RoomLog>,
    subscribers: Vec<String>,
}

/// The judgement of one room.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RoomVerdict {
    pub room: String,
    pub acked: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub gaps: u64,
    /// A few of the lost messages, to look for: `<subscriber> missed <origin>:<offset>
    /// (acked at <ms>)`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lost_examples: Vec<String>,
}

/// How many lost messages a room's verdict names.
const LOST_EXAMPLES: usize = 5;

/// The judgement of the run: every room, and the sums.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub rooms: Vec<RoomVerdict>,
    pub acked: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub gaps: u64,
}

impl Verdict {
    /// No loss, no duplicate, no reorder.
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.reordered == 0
    }
}

impl Checker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a subscriber (a player that subscribes to every room of the run).
    pub fn subscriber(&mut self, name: &str) {
        if !self.subscribers.iter().any(|s| s == name) {
            self.subscribers.push(name.to_owned());
        }
    }

    /// A publish to `room` was acknowledged as `origin`/`offset` at `at_ms` (any clock
    /// shared by every call, e.g. milliseconds since the run started).
    pub fn acked(&mut self, room: &str, origin: &str, offset: i64, at_ms: u64) {
        self.room(room)
            .acked
            .insert((origin.to_owned(), offset), at_ms);
    }

    /// `subscriber` received `origin`/`offset` in `room` at `at_ms`.
    pub fn delivered(
        &mut self,
        subscriber: &str,
        room: &str,
        origin: &str,
        offset: i64,
        at_ms: u64,
    ) {
        let s = self
            .room(room)
            .subscribers
            .entry(subscriber.to_owned())
            .or_default();
        if s.seen.insert((origin.to_owned(), offset), at_ms).is_some() {
            s.duplicated += 1;
            return;
        }
        match s.last.get_mut(origin) {
            Some(last) if offset < *last => s.reordered += 1,
            Some(last) => *last = offset,
            None => {
                s.last.insert(origin.to_owned(), offset);
            }
        }
    }

    /// `subscriber` was told that `room` has a gap.
    pub fn gap(&mut self, subscriber: &str, room: &str) {
        self.room(room)
            .subscribers
            .entry(subscriber.to_owned())
            .or_default()
            .gaps += 1;
    }

    /// Acked messages not yet delivered to every subscriber (0 once the run converged).
    pub fn missing(&self) -> u64 {
        self.rooms
            .values()
            .map(|r| {
                self.subscribers
                    .iter()
                    .map(|name| match r.subscribers.get(name) {
                        Some(s) => {
                            r.acked.keys().filter(|m| !s.seen.contains_key(*m)).count() as u64
                        }
                        None => r.acked.len() as u64,
                    })
                    .sum::<u64>()
            })
            .sum()
    }

    /// When every message acked before `before_ms` had reached every subscriber: the
    /// latest of their deliveries (`None` while one is still missing). With `before_ms` the
    /// heal, this is when the federation converged again.
    pub fn converged_at(&self, before_ms: u64) -> Option<u64> {
        let mut latest = 0;
        for r in self.rooms.values() {
            for (m, _) in r.acked.iter().filter(|(_, &at)| at < before_ms) {
                for name in &self.subscribers {
                    let at = r.subscribers.get(name)?.seen.get(m)?;
                    latest = latest.max(*at);
                }
            }
        }
        Some(latest)
    }

    /// Acked messages so far.
    pub fn acked_count(&self) -> u64 {
        self.rooms.values().map(|r| r.acked.len() as u64).sum()
    }

    /// The judgement as things stand (call it at the end).
    pub fn verdict(&self) -> Verdict {
        let mut v = Verdict::default();
        for (room, log) in &self.rooms {
            let mut rv = RoomVerdict {
                room: room.clone(),
                acked: log.acked.len() as u64,
                ..RoomVerdict::default()
            };
            for name in &self.subscribers {
                let Some(s) = log.subscribers.get(name) else {
                    rv.lost += log.acked.len() as u64;
                    rv.lost_examples
                        .push(format!("{name} received nothing of this room"));
                    continue;
                };
                rv.delivered += s.seen.len() as u64;
                let mut missed: Vec<(&(String, i64), &u64)> = log
                    .acked
                    .iter()
                    .filter(|(m, _)| !s.seen.contains_key(*m))
                    .collect();
                missed.sort();
                rv.lost += missed.len() as u64;
                for ((origin, offset), at) in missed {
                    if rv.lost_examples.len() < LOST_EXAMPLES {
                        rv.lost_examples.push(format!(
                            "{name} missed {origin}:{offset} (acked at {at} ms)"
                        ));
                    }
                }
                rv.duplicated += s.duplicated;
                rv.reordered += s.reordered;
                rv.gaps += s.gaps;
            }
            v.acked += rv.acked;
            v.lost += rv.lost;
            v.duplicated += rv.duplicated;
            v.reordered += rv.reordered;
            v.gaps += rv.gaps;
            v.rooms.push(rv);
        }
        v
    }

    fn room(&mut self, room: &str) -> &mut RoomLog {
        self.rooms.entry(room.to_owned()).or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_players() -> Checker {
        let mut c = Checker::new();
        c.subscriber("ann");
        c.subscriber("bob");
        c
    }

    #[test]
    fn everything_delivered_once_in_order_passes() {
        let mut c = two_players();
        for o in 0..3 {
            c.acked("hall", "seoul", o, 0);
            c.acked("hall", "tokyo", o + 10, 0);
        }
        assert_eq!(c.missing(), 12);
        for p in ["ann", "bob"] {
            for o in 0..3 {
                c.delivered(p, "hall", "tokyo", o + 10, 1);
                c.delivered(p, "hall", "seoul", o, 1);
            }
        }
        assert_eq!(c.missing(), 0);
        let v = c.verdict();
        assert!(v.passed(), "{v:?}");
        assert_eq!((v.acked, v.lost), (6, 0));
        assert_eq!(v.rooms[0].delivered, 12);
    }

    #[test]
    fn a_message_one_player_never_got_is_lost() {
        let mut c = two_players();
        c.acked("hall", "seoul", 1, 0);
        c.acked("hall", "seoul", 2, 0);
        for o in [1, 2] {
            c.delivered("ann", "hall", "seoul", o, 1);
        }
        c.delivered("bob", "hall", "seoul", 2, 1);
        let v = c.verdict();
        assert_eq!(v.lost, 1);
        assert!(!v.passed());
    }

    #[test]
    fn a_player_who_got_nothing_lost_everything() {
        let mut c = two_players();
        c.acked("hall", "seoul", 1, 0);
        c.delivered("ann", "hall", "seoul", 1, 1);
        assert_eq!(c.verdict().lost, 1);
        assert_eq!(c.missing(), 1);
    }

    #[test]
    fn duplicates_and_reorders_are_told_apart() {
        let mut c = two_players();
        for o in 1..=3 {
            c.acked("hall", "seoul", o, 0);
        }
        for p in ["ann", "bob"] {
            c.delivered(p, "hall", "seoul", 1, 1);
        }
        c.delivered("ann", "hall", "seoul", 3, 1);
        c.delivered("ann", "hall", "seoul", 2, 1); // went back: reordered
        c.delivered("ann", "hall", "seoul", 3, 1); // again: duplicated
        c.delivered("bob", "hall", "seoul", 2, 1);
        c.delivered("bob", "hall", "seoul", 3, 1);
        let v = c.verdict();
        assert_eq!((v.lost, v.duplicated, v.reordered), (0, 1, 1), "{v:?}");
        assert!(!v.passed());
    }

    #[test]
    fn order_is_per_origin_and_room() {
        let mut c = two_players();
        c.acked("a", "seoul", 5, 0);
        c.acked("a", "tokyo", 1, 0);
        c.acked("b", "seoul", 1, 0);
        for p in ["ann", "bob"] {
            c.delivered(p, "a", "seoul", 5, 1);
            c.delivered(p, "a", "tokyo", 1, 1);
            c.delivered(p, "b", "seoul", 1, 1);
        }
        assert!(c.verdict().passed());
        assert_eq!(c.verdict().rooms.len(), 2);
    }

    #[test]
    fn convergence_is_the_last_delivery_of_what_was_acked_before() {
        let mut c = two_players();
        c.acked("hall", "seoul", 1, 100);
        c.acked("hall", "seoul", 2, 300);
        c.delivered("ann", "hall", "seoul", 1, 150);
        assert_eq!(c.converged_at(200), None, "bob has not got it yet");
        c.delivered("bob", "hall", "seoul", 1, 250);
        assert_eq!(c.converged_at(200), Some(250));
        assert_eq!(c.converged_at(400), None);
    }

    #[test]
    fn gaps_are_counted_and_what_they_skip_is_lost() {
        let mut c = two_players();
        c.acked("hall", "seoul", 1, 0);
        c.acked("hall", "seoul", 2, 0);
        for p in ["ann", "bob"] {
            c.delivered(p, "hall", "seoul", 2, 1);
        }
        c.gap("ann", "hall");
        let v = c.verdict();
        assert_eq!((v.gaps, v.lost), (1, 2));
    }
}
