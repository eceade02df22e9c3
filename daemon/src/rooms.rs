//! This daemon's room subscriptions: which local sessions listen to which room, reference
//! counted against the bus (the first local subscriber subscribes the room, the last one
//! unsubscribes it), and the dispatcher that hands each bus event to those sessions.
//!
//! Every session has a bounded outbound queue. The dispatcher never waits on a session: a
//! session whose queue is full is a reader too slow to keep up, and it is told to close
//! (its memory stays bounded, and so does the daemon's).
//!
//! Joins and leaves are serialized per room (not daemon-wide): a room whose bus subscribe is
//! slow (a Redis round trip that stalls) holds up only the players joining that room.

use dtfed_proto::record::now_ms;
use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex, RwLock};

use axum::extract::ws::Utf8Bytes;
use dtfed_proto::{MsgFrame, RoomId};
use tokio::sync::{mpsc, Mutex, OwnedMutexGuard};
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError, BusEvent, BusEvents};
use crate::metrics::Metrics;

/// Identifies one WebSocket session of this daemon.
pub type SessionId = u64;

/// A live message with its wire text, encoded once for every session that gets it.
#[derive(Debug)]
pub struct LiveMsg {
    pub frame: Arc<MsgFrame>,
    pub text: Utf8Bytes,
    /// When the dispatcher queued it (for `hop_session_write_seconds`).
    pub queued: std::time::Instant,
}

/// What the dispatcher puts in a session's outbound queue.
#[derive(Clone, Debug)]
pub enum Outbound {
    /// A live message of a room the session subscribes to.
    Msg(Arc<LiveMsg>),
    /// Live delivery of this room may have lost messages: backfill from history. (Behind an
    /// `Arc` like `Msg`: an item is then two words, and every session's queue allocates room
    /// for 32 of them up front, idle or not.)
    Resync(Arc<RoomId>),
}

/// A session's end of the dispatcher: its queue, and the token that closes it when the
/// queue overflows.
#[derive(Clone)]
pub struct SessionSink {
    pub queue: mpsc::Sender<Outbound>,
    pub slow: CancellationToken,
}

type RoomTable = HashMap<RoomId, HashMap<SessionId, SessionSink>>;

/// Local room subscriptions of one daemon.
pub struct LocalRooms {
    bus: Arc<dyn Bus>,
    rooms: RwLock<RoomTable>,
    /// Serializes subscribe/unsubscribe of each room against the bus, so an unsubscribe of a
    /// room's last session can never overtake the subscribe of its next first session.
    changes: RoomLocks,
    metrics: Arc<Metrics>,
}

impl LocalRooms {
    pub fn new(bus: Arc<dyn Bus>, metrics: Arc<Metrics>) -> Arc<LocalRooms> {
        Arc::new(LocalRooms {
            bus,
            rooms: RwLock::new(HashMap::new()),
            changes: RoomLocks::default(),
            metrics,
        })
    }

    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }

    /// Adds `session` to `room`; returns once live delivery of the room is active.
    pub async fn join(
        &self,
        room: &RoomId,
        id: SessionId,
        sink: SessionSink,
    ) -> Result<(), BusError> {
        let _serial = self.changes.lock(room).await;
        let first = {
            let mut rooms = self.write();
            let sessions = rooms.entry(room.clone()).or_default();
            sessions.insert(id, sink);
            sessions.len() == 1
        };
        if first {
            if let Err(e) = self.bus.subscribe(room).await {
                let mut rooms = self.write();
                if let Some(sessions) = rooms.get_mut(room) {
                    sessions.remove(&id);
                    if sessions.is_empty() {
                        rooms.remove(room);
                    }
                }
                return Err(e);
            }
            self.metrics.rooms_subscribed.inc();
        }
        Ok(())
    }

    /// Removes `session` from `room`; the last one out unsubscribes the room. A no-op for a
    /// session that is not in the room.
    pub async fn leave(&self, room: &RoomId, id: SessionId) {
        let _serial = self.changes.lock(room).await;
        let last = {
            let mut rooms = self.write();
            match rooms.get_mut(room) {
                Some(sessions) => {
                    sessions.remove(&id);
                    if sessions.is_empty() {
                        rooms.remove(room);
                        true
                    } else {
                        false
                    }
                }
                None => false,
            }
        };
        if last {
            self.metrics.rooms_subscribed.dec();
            if let Err(e) = self.bus.unsubscribe(room).await {
                tracing::warn!(%room, error = %e, "unsubscribe failed; the bus drops the room on its next reconnect");
            }
        }
    }

    /// Number of rooms with local sessions.
    pub fn room_count(&self) -> usize {
        self.read().len()
    }

    /// Hands bus events to sessions until `events` ends or `shutdown` fires.
    pub async fn dispatch(self: Arc<Self>, mut events: BusEvents, shutdown: CancellationToken) {
        let stop = shutdown.cancelled();
        tokio::pin!(stop);
        loop {
            let event = tokio::select! {
                _ = &mut stop => return,
                ev = events.recv() => match ev {
                    Some(ev) => ev,
                    None => return,
                },
            };
            match event {
                BusEvent::Msg(frame) => {
                    let delay_ms = now_ms().saturating_sub(frame.ts).max(0);
                    self.metrics
                        .hop_publish_to_gateway
                        .observe(delay_ms as f64 / 1000.0);
                    let rooms = self.read();
                    if let Some(sessions) = rooms.get(&frame.room) {
                        let live = Arc::new(LiveMsg {
                            text: Utf8Bytes::from(frame.to_json()),
                            frame,
                            queued: std::time::Instant::now(),
                        });
                        for sink in sessions.values() {
                            offer(sink, Outbound::Msg(live.clone()), &self.metrics);
                        }
                    }
                }
                BusEvent::Resync => {
                    self.metrics.bus_resyncs.inc();
                    let rooms = self.read();
                    tracing::info!(
                        rooms = rooms.len(),
                        "bus resynced; sessions backfill from history"
                    );
                    for (room, sessions) in rooms.iter() {
                        let room = Arc::new(room.clone());
                        for sink in sessions.values() {
                            offer(sink, Outbound::Resync(room.clone()), &self.metrics);
                        }
                    }
                }
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, RoomTable> {
        self.rooms
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, RoomTable> {
        self.rooms
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One lock per room with a join or leave under way; a room's lock goes when nobody holds or
/// awaits it, so the table holds at most the rooms being changed right now.
#[derive(Default)]
struct RoomLocks(StdMutex<HashMap<RoomId, Arc<Mutex<()>>>>);

/// Holds one room's lock; dropping it releases the lock and forgets it if nobody waits.
struct RoomLockGuard<'a> {
    locks: &'a RoomLocks,
    room: RoomId,
    lock: Arc<Mutex<()>>,
    held: Option<OwnedMutexGuard<()>>,
}

impl RoomLocks {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<RoomId, Arc<Mutex<()>>>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn lock(&self, room: &RoomId) -> RoomLockGuard<'_> {
        let lock = self.table().entry(room.clone()).or_default().clone();
        let mut guard = RoomLockGuard {
            locks: self,
            room: room.clone(),
            lock: lock.clone(),
            held: None,
        };
        // Assigned after the await: a join cancelled while waiting still drops `guard`,
        // which forgets the room's lock if it was the last one to want it.
        guard.held = Some(lock.lock_owned().await);
        guard
    }

    /// Rooms with a lock in the table (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table().len()
    }
}

impl Drop for RoomLockGuard<'_> {
    fn drop(&mut self) {
        self.held = None;
        let mut table = self.locks.table();
        // The table's Arc and ours: nobody else holds or awaits this room's lock. New
        // waiters clone it under the table's lock, which we hold.
        if Arc::strong_count(&self.lock) == 2 {
            table.remove(&self.room);
        }
    }
}

fn offer(sink: &SessionSink, item: Outbound, metrics: &Metrics) {
    if sink.slow.is_cancelled() {
        return;
    }
    match sink.queue.try_send(item) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            metrics.closed("slow_reader");
            sink.slow.cancel();
        }
        // The session is gone and will leave its rooms shortly.
        Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::memory::MemoryBus;
    use crate::bus::{PublishClaim, PublishKey, PublishOutcome};
    use crate::config::HistoryConfig;
    use async_trait::async_trait;
    use dtfed_proto::{Cursor, LogRecord};
    use std::time::Duration;
    use tokio::sync::Notify;

    /// The in-memory bus, except that subscribing to `stalled` waits until `release` fires
    /// (a Redis round trip that hangs).
    struct StallingBus {
        inner: MemoryBus,
        stalled: RoomId,
        release: Arc<Notify>,
    }

    #[async_trait]
    impl Bus for StallingBus {
        async fn apply(&self, rec: &LogRecord) -> Result<Option<MsgFrame>, BusError> {
            self.inner.apply(rec).await
        }
        async fn history(&self, room: &RoomId) -> Result<Vec<MsgFrame>, BusError> {
            self.inner.history(room).await
        }
        async fn tails(&self, room: &RoomId) -> Result<Cursor, BusError> {
            self.inner.tails(room).await
        }
        async fn subscribe(&self, room: &RoomId) -> Result<(), BusError> {
            if *room == self.stalled {
                self.release.notified().await;
            }
            self.inner.subscribe(room).await
        }
        async fn unsubscribe(&self, room: &RoomId) -> Result<(), BusError> {
            self.inner.unsubscribe(room).await
        }
        async fn ping(&self) -> Result<(), BusError> {
            self.inner.ping().await
        }
        async fn claim_publish(
            &self,
            key: &PublishKey,
            now_ms: i64,
            stale_ms: i64,
            window_ms: i64,
        ) -> Result<PublishClaim, BusError> {
            self.inner
                .claim_publish(key, now_ms, stale_ms, window_ms)
                .await
        }
        async fn settle_publish(
            &self,
            key: &PublishKey,
            outcome: PublishOutcome,
            window_ms: i64,
        ) -> Result<(), BusError> {
            self.inner.settle_publish(key, outcome, window_ms).await
        }
        async fn put_watermarks(
            &self,
            marks: &[crate::bus::PartitionMark],
            ttl_ms: i64,
        ) -> Result<(), BusError> {
            self.inner.put_watermarks(marks, ttl_ms).await
        }
        async fn watermarks(
            &self,
            keys: &[(String, i32)],
        ) -> Result<Vec<Option<dtfed_proto::OriginMark>>, BusError> {
            self.inner.watermarks(keys).await
        }
    }

    fn sink() -> SessionSink {
        let (queue, _rx) = mpsc::channel(16);
        SessionSink {
            queue,
            slow: CancellationToken::new(),
        }
    }

    fn room(s: &str) -> RoomId {
        RoomId::parse(s).expect("room id")
    }

    #[tokio::test]
    async fn a_stalled_subscribe_blocks_only_its_own_room() {
        let (inner, _events) = MemoryBus::new(&HistoryConfig::default());
        let release = Arc::new(Notify::new());
        let bus = Arc::new(StallingBus {
            inner,
            stalled: room("stuck"),
            release: release.clone(),
        });
        let rooms = LocalRooms::new(bus, Arc::new(Metrics::new("seoul")));

        let stuck = tokio::spawn({
            let rooms = rooms.clone();
            async move { rooms.join(&room("stuck"), 1, sink()).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!stuck.is_finished(), "the stalled subscribe returned");

        // Other rooms join and leave while the stalled one waits on the bus.
        for (i, name) in ["lobby", "table-1", "table-2"].into_iter().enumerate() {
            let id = 10 + i as u64;
            tokio::time::timeout(Duration::from_secs(2), rooms.join(&room(name), id, sink()))
                .await
                .unwrap_or_else(|_| panic!("join to {name} waited for another room's subscribe"))
                .expect("join");
            tokio::time::timeout(Duration::from_secs(2), rooms.leave(&room(name), id))
                .await
                .unwrap_or_else(|_| panic!("leave of {name} waited for another room's subscribe"));
        }
        // A second join to the stalled room waits its turn behind the first.
        let second = tokio::spawn({
            let rooms = rooms.clone();
            async move { rooms.join(&room("stuck"), 2, sink()).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished());

        release.notify_one();
        stuck.await.expect("task").expect("join");
        second.await.expect("task").expect("join");
        assert_eq!(rooms.room_count(), 1);
        // Only rooms being changed right now have a lock.
        assert_eq!(rooms.changes.len(), 0);
    }
}
