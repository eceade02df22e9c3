//! This daemon's room subscriptions: which local sessions listen to which room, reference
//! counted against the bus (the first local subscriber subscribes the room, the last one
//! unsubscribes it), and the dispatcher that hands each bus event to those sessions.
//!
//! Every session has a bounded outbound queue. The dispatcher never waits on a session: a
//! session whose queue is full is a reader too slow to keep up, and it is told to close
//! (its memory stays bounded, and so does the daemon's).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::extract::ws::Utf8Bytes;
use dtfed_proto::{MsgFrame, RoomId};
use tokio::sync::{mpsc, Mutex};
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
    /// Live delivery of this room may have lost messages: backfill from history.
    Resync(RoomId),
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
    /// Serializes subscribe/unsubscribe against the bus, so an unsubscribe of a room's last
    /// session can never overtake the subscribe of its next first session.
    changes: Mutex<()>,
    metrics: Arc<Metrics>,
}

impl LocalRooms {
    pub fn new(bus: Arc<dyn Bus>, metrics: Arc<Metrics>) -> Arc<LocalRooms> {
        Arc::new(LocalRooms {
            bus,
            rooms: RwLock::new(HashMap::new()),
            changes: Mutex::new(()),
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
        let _serial = self.changes.lock().await;
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

    /// Removes `session` from `room`; the last one out unsubscribes the room.
    pub async fn leave(&self, room: &RoomId, id: SessionId) {
        let _serial = self.changes.lock().await;
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

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
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
