//! In-process stand-in for Redis, for `dtfed demo` without a Redis URL. Same semantics as
//! [`super::redis::RedisBus`] inside one process.
//!
//! All daemons of a demo region share one history: [`MemoryBus::new`] makes the region's
//! bus and the first daemon's handle, and [`MemoryBus::attach`] makes one more handle (for
//! the next daemon) on the same history and tails, with its own room subscriptions and its
//! own [`BusEvents`] stream, exactly as several daemons share one Redis with one Pub/Sub
//! connection each. A handle is cheap to clone (an `Arc` inside); clones share subscriptions
//! and events. When the last clone of a handle is dropped its subscriptions go and its
//! events stream ends.
//!
//! Semantics mirrored from the Redis bus: `apply` skips offsets at or below the room's tail
//! for the origin, stamps `prev` from the tail, appends to the history, trims it to
//! `max_messages`, drops expired entries from its head, and delivers to the subscribed
//! handles, all under one lock, so every handle sees a room's messages in apply order.
//! `history` filters by age as well. Tails are never trimmed. A handle whose events channel
//! is full misses live messages (they are in the history) and gets [`BusEvent::Resync`] as
//! soon as it has room again, before any later message.

use dtfed_proto::record::now_ms;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use dtfed_proto::{Cursor, LogRecord, MsgFrame, OriginMark, RoomId};
use tokio::sync::mpsc;

use super::{
    claim_value, mark_value, parse_claim, parse_mark, Bus, BusError, BusEvent, BusEvents,
    PartitionMark, PublishClaim, PublishKey, PublishOutcome,
};
use crate::config::HistoryConfig;

/// Capacity of each handle's events channel.
pub const EVENTS_CAPACITY: usize = 65_536;

/// One handle on an in-process region bus. See the module docs.
#[derive(Clone)]
pub struct MemoryBus {
    member: Arc<Member>,
}

/// The region's state, shared by every handle.
struct Shared {
    max_messages: usize,
    max_age_ms: i64,
    state: Mutex<State>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct State {
    rooms: HashMap<RoomId, RoomState>,
    /// Room → subscribed handles.
    subs: HashMap<RoomId, HashMap<u64, Arc<Sink>>>,
    /// Publish claims: value and expiry (ms).
    publishes: HashMap<PublishKey, (String, i64)>,
    /// Replication watermarks by (origin, partition): stored form and expiry (ms).
    watermarks: HashMap<(String, i32), (String, i64)>,
}

/// Expired publish claims are swept when there are more than this many.
const PUBLISH_SWEEP_AT: usize = 4096;

/// A room's hot history (oldest first) and tails.
#[derive(Default)]
struct RoomState {
    history: VecDeque<Arc<MsgFrame>>,
    tails: Cursor,
}

/// A handle's delivery end.
struct Sink {
    tx: mpsc::Sender<BusEvent>,
    /// Set when a message was dropped for a full channel; cleared once Resync is queued.
    resync_pending: AtomicBool,
}

/// A handle; removes its subscriptions when the last clone goes.
struct Member {
    id: u64,
    shared: Arc<Shared>,
    sink: Arc<Sink>,
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.subs.retain(|_, handles| {
            handles.remove(&self.id);
            !handles.is_empty()
        });
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn member(self: &Arc<Self>) -> (MemoryBus, BusEvents) {
        let (tx, rx) = mpsc::channel(EVENTS_CAPACITY);
        let member = Member {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            shared: self.clone(),
            sink: Arc::new(Sink {
                tx,
                resync_pending: AtomicBool::new(false),
            }),
        };
        (
            MemoryBus {
                member: Arc::new(member),
            },
            rx,
        )
    }
}

impl MemoryBus {
    /// A new region bus with empty history, and its first handle.
    pub fn new(history: &HistoryConfig) -> (MemoryBus, BusEvents) {
        let shared = Arc::new(Shared {
            max_messages: history.max_messages,
            max_age_ms: i64::try_from(history.max_age_secs.saturating_mul(1000))
                .unwrap_or(i64::MAX),
            state: Mutex::new(State::default()),
            next_id: AtomicU64::new(0),
        });
        shared.member()
    }

    /// Another handle on the same region bus (same history and tails), with its own
    /// subscriptions and events: one per daemon of the region.
    pub fn attach(&self) -> (MemoryBus, BusEvents) {
        self.member.shared.member()
    }

    fn cutoff(&self) -> i64 {
        now_ms().saturating_sub(self.member.shared.max_age_ms)
    }
}

impl Sink {
    /// Queues `frame` without waiting. Called with the state lock held.
    fn offer(self: &Arc<Self>, frame: &Arc<MsgFrame>, shared: &Arc<Shared>) {
        if self.resync_pending.load(Ordering::Acquire) {
            // In the history already; the pending Resync makes the gateway backfill it.
            return;
        }
        match self.tx.try_send(BusEvent::Msg(frame.clone())) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(
                    room = %frame.room,
                    capacity = EVENTS_CAPACITY,
                    "gateway cannot keep up with the bus; dropping live messages until it does, then resync"
                );
                self.resync_pending.store(true, Ordering::Release);
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    tracing::error!(room = %frame.room, "no tokio runtime to deliver the resync");
                    return;
                };
                let sink = self.clone();
                let shared = shared.clone();
                runtime.spawn(async move {
                    if let Ok(permit) = sink.tx.reserve().await {
                        // Under the lock: every apply is either before the Resync (and in
                        // the history the gateway backfills from) or delivered after it.
                        let _st = shared.lock();
                        permit.send(BusEvent::Resync);
                        sink.resync_pending.store(false, Ordering::Release);
                    }
                });
            }
            // The handle is gone; its subscriptions go with it.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn apply(&self, rec: &LogRecord) -> Result<Option<MsgFrame>, BusError> {
        let shared = &self.member.shared;
        let cutoff = self.cutoff();
        let mut st = shared.lock();
        let State { rooms, subs, .. } = &mut *st;
        let room = rooms.entry(rec.room.clone()).or_default();
        let last = room.tails.get(&rec.origin);
        if last.is_some_and(|last| rec.offset <= last) {
            return Ok(None);
        }
        room.tails.advance(&rec.origin, rec.offset);
        let msg = rec.to_msg(last);
        let frame = Arc::new(msg.clone());
        room.history.push_back(frame.clone());
        while room.history.len() > shared.max_messages {
            room.history.pop_front();
        }
        while room.history.front().is_some_and(|m| m.ts < cutoff) {
            room.history.pop_front();
        }
        if let Some(handles) = subs.get(&rec.room) {
            for sink in handles.values() {
                sink.offer(&frame, shared);
            }
        }
        Ok(Some(msg))
    }

    async fn history(&self, room: &RoomId) -> Result<Vec<MsgFrame>, BusError> {
        let cutoff = self.cutoff();
        let st = self.member.shared.lock();
        Ok(st
            .rooms
            .get(room)
            .map(|r| {
                r.history
                    .iter()
                    .filter(|m| m.ts >= cutoff)
                    .map(|m| MsgFrame::clone(m))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn tails(&self, room: &RoomId) -> Result<Cursor, BusError> {
        let st = self.member.shared.lock();
        Ok(st
            .rooms
            .get(room)
            .map(|r| r.tails.clone())
            .unwrap_or_default())
    }

    async fn subscribe(&self, room: &RoomId) -> Result<(), BusError> {
        let m = &self.member;
        if m.sink.tx.is_closed() {
            return Err(BusError::Closed);
        }
        m.shared
            .lock()
            .subs
            .entry(room.clone())
            .or_default()
            .insert(m.id, m.sink.clone());
        Ok(())
    }

    async fn unsubscribe(&self, room: &RoomId) -> Result<(), BusError> {
        let m = &self.member;
        let mut st = m.shared.lock();
        if let Some(handles) = st.subs.get_mut(room) {
            handles.remove(&m.id);
            if handles.is_empty() {
                st.subs.remove(room);
            }
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), BusError> {
        Ok(())
    }

    async fn claim_publish(
        &self,
        key: &PublishKey,
        now_ms: i64,
        stale_ms: i64,
        window_ms: i64,
    ) -> Result<PublishClaim, BusError> {
        let mut st = self.member.shared.lock();
        if st.publishes.len() > PUBLISH_SWEEP_AT {
            st.publishes.retain(|_, (_, expires)| *expires > now_ms);
        }
        let previous = st
            .publishes
            .get(key)
            .filter(|(_, expires)| *expires > now_ms)
            .map(|(v, _)| v.as_str());
        let claim = parse_claim(previous, now_ms, stale_ms);
        if matches!(claim, PublishClaim::Fresh | PublishClaim::Unknown { .. }) {
            let pending = format!("p{now_ms}");
            st.publishes
                .insert(key.clone(), (pending, now_ms.saturating_add(window_ms)));
        }
        Ok(claim)
    }

    async fn settle_publish(
        &self,
        key: &PublishKey,
        outcome: PublishOutcome,
        window_ms: i64,
    ) -> Result<(), BusError> {
        let mut st = self.member.shared.lock();
        match claim_value(outcome) {
            Some(v) => {
                let expires = now_ms().saturating_add(window_ms);
                st.publishes.insert(key.clone(), (v, expires));
            }
            None => {
                st.publishes.remove(key);
            }
        }
        Ok(())
    }

    async fn put_watermarks(&self, marks: &[PartitionMark], ttl_ms: i64) -> Result<(), BusError> {
        let expires = now_ms().saturating_add(ttl_ms.max(1));
        let mut st = self.member.shared.lock();
        for m in marks {
            st.watermarks.insert(
                (m.origin.clone(), m.partition),
                (mark_value(&m.mark), expires),
            );
        }
        Ok(())
    }

    async fn watermarks(
        &self,
        keys: &[(String, i32)],
    ) -> Result<Vec<Option<OriginMark>>, BusError> {
        let now = now_ms();
        let mut st = self.member.shared.lock();
        // Bounded by the region's mirror partitions; expired ones go as in Redis.
        st.watermarks.retain(|_, (_, expires)| *expires > now);
        Ok(keys
            .iter()
            .map(|k| st.watermarks.get(k).and_then(|(v, _)| parse_mark(v)))
            .collect())
    }
}
