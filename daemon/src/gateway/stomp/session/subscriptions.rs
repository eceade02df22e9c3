//! The subscription side of a STOMP session: `SUBSCRIBE` (join the room, replay from
//! `dtfed-since` in full, go live), `UNSUBSCRIBE`, live delivery with the per-room cursor
//! (drop what was seen, backfill a hole first) and backfills. The same steps as the v1
//! session's `sub`, on [`crate::rooms`] and [`crate::gateway::resume`].

use std::time::{Duration, Instant};

use dtfed_proto::{Cursor, ErrorCode, RoomId, ServerFrame};

use super::super::destinations::DestinationUse;
use super::super::frame::{Frame, Version};
use super::super::translate::{gap_frame, message_frame};
use super::{required, sub_failed, End, Session, Subscription, CLOSE_NORMAL, MAX_ID_LEN};
use crate::gateway::resume::{is_hole, replay, Replay, ResumeError};
use crate::gateway::session::{LOG_REPLAYS_PER_SEC, MAX_SUBSCRIPTIONS};
use crate::rooms::{Outbound, SessionSink};

impl Session {
    pub(super) async fn subscribe(&mut self, frame: &Frame) -> Result<(), End> {
        let destination = required(frame, "destination")?;
        let id = match (frame.header("id"), self.version) {
            (Some(id), _) if id.len() > MAX_ID_LEN => {
                return Err(End::error(
                    ErrorCode::BadFrame,
                    format!("subscription id is longer than {MAX_ID_LEN} bytes"),
                ))
            }
            (Some(id), _) => id.to_owned(),
            (None, Version::V10) => destination.to_owned(),
            (None, _) => {
                return Err(End::error(
                    ErrorCode::BadFrame,
                    "SUBSCRIBE needs an id header",
                ))
            }
        };
        if let Some(ack) = frame.header("ack") {
            if ack != "auto" {
                return Err(End::error(
                    ErrorCode::BadFrame,
                    format!("ack:{ack} is not supported; subscriptions are ack:auto"),
                ));
            }
        }
        let room = self
            .stomp
            .table
            .resolve(destination, DestinationUse::Subscribe)
            .map_err(|e| End::error(ErrorCode::BadRoom, e.to_string()))?;
        if !self.may_use(&room) {
            return Err(End::error(
                ErrorCode::Forbidden,
                format!("you may not subscribe to {room}"),
            ));
        }
        if self.ids.contains_key(&id) {
            return Err(End::error(
                ErrorCode::BadFrame,
                format!("subscription id {id:?} is already in use"),
            ));
        }
        if let Some(sub) = self.subs.get(&room) {
            return Err(End::error(
                ErrorCode::BadFrame,
                format!(
                    "room {room} is already subscribed (subscription {:?})",
                    sub.id
                ),
            ));
        }
        if self.subs.len() >= MAX_SUBSCRIPTIONS {
            return Err(End::error(
                ErrorCode::Forbidden,
                format!("a connection may subscribe to at most {MAX_SUBSCRIPTIONS} rooms"),
            ));
        }
        let since = match frame.header("dtfed-since") {
            None => None,
            Some(text) => {
                let mut de = serde_json::Deserializer::from_str(text);
                let cursor = dtfed_proto::cursor::deserialize_bounded(&mut de)
                    .and_then(|c| de.end().map(|()| c))
                    .map_err(|e| {
                        End::error(
                            ErrorCode::BadFrame,
                            format!("dtfed-since is not a cursor: {e}"),
                        )
                    })?;
                if let Some(why) = self.gw.foreign_origin(cursor.as_ref()) {
                    return Err(End::error(ErrorCode::BadFrame, why));
                }
                cursor
            }
        };
        let sink = SessionSink {
            queue: self.queue.clone(),
            slow: self.slow.clone(),
        };
        // Live delivery first, then the replay or the tail: the cursor drops the overlap.
        if let Err(e) = self.gw.rooms.join(&room, self.id, sink).await {
            tracing::warn!(%room, error = %e, "subscribing a room on the bus failed");
            return Err(End::error(
                ErrorCode::Unavailable,
                format!("cannot subscribe to {room} right now; try again"),
            ));
        }
        let sub = Subscription {
            id: id.clone(),
            destination: destination.to_owned(),
            cursor: Cursor::new(),
        };
        match self.catch_up(&room, &sub, since).await {
            Ok(cursor) => {
                tracing::debug!(%room, subscription = %id, "STOMP subscribed");
                self.ids.insert(id, room.clone());
                self.subs.insert(room, Subscription { cursor, ..sub });
                Ok(())
            }
            Err(end) => {
                self.gw.rooms.leave(&room, self.id).await;
                Err(end)
            }
        }
    }

    /// Replays `room` after `since` in full (piece after piece: a STOMP client cannot ask
    /// for the next one), or finds its tail; the cursor to go live with.
    pub(super) async fn catch_up(
        &mut self,
        room: &RoomId,
        sub: &Subscription,
        since: Option<Cursor>,
    ) -> Result<Cursor, End> {
        let Some(mut cursor) = since else {
            return match self.gw.rooms.bus().tails(room).await {
                Ok(tails) => Ok(tails),
                Err(e) => Err(sub_failed(room, e.to_string())),
            };
        };
        let mut first = true;
        loop {
            let bucket = &mut self.log_replays;
            let mut may_read_log = || !first || bucket.take(Instant::now());
            match replay(&self.gw, room, &mut cursor, &mut may_read_log).await {
                Ok(Replay { frames, complete }) => {
                    self.send_replayed(sub, &frames).await?;
                    if complete {
                        return Ok(cursor);
                    }
                    // The next piece shares the log with everyone else's replays: it waits
                    // for the connection's replay rate like a v1 client's next `sub`.
                    self.flush().await?;
                    while !self.log_replays.take(Instant::now()) {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    first = false;
                }
                Err(ResumeError::RateLimited) => {
                    return Err(End::error(
                        ErrorCode::RateLimited,
                        format!("over {LOG_REPLAYS_PER_SEC} replays from the log per second; subscribe to {room} again in a second"),
                    ))
                }
                Err(e) => return Err(sub_failed(room, e.to_string())),
            }
        }
    }

    pub(super) async fn send_replayed(
        &mut self,
        sub: &Subscription,
        frames: &[ServerFrame],
    ) -> Result<(), End> {
        for frame in frames {
            let out = match frame {
                ServerFrame::Msg(m) => message_frame(&sub.id, &sub.destination, m),
                ServerFrame::Gap {
                    origin, from, to, ..
                } => gap_frame(&sub.id, &sub.destination, origin, *from, *to),
                _ => continue,
            };
            self.send_frame(&out).await?;
        }
        Ok(())
    }

    pub(super) async fn unsubscribe(&mut self, frame: &Frame) -> Result<(), End> {
        let id = match (frame.header("id"), self.version) {
            (Some(id), _) => id,
            (None, Version::V10) => required(frame, "destination")?,
            (None, _) => {
                return Err(End::error(
                    ErrorCode::BadFrame,
                    "UNSUBSCRIBE needs an id header",
                ))
            }
        };
        let Some(room) = self.ids.remove(id) else {
            return Err(End::error(
                ErrorCode::NotSubscribed,
                format!("no subscription {id:?}"),
            ));
        };
        self.subs.remove(&room);
        self.gw.rooms.leave(&room, self.id).await;
        Ok(())
    }

    pub(super) async fn live(&mut self, item: Outbound) -> Result<(), End> {
        let (room, m) = match item {
            Outbound::Msg(live) => (live.frame.room.clone(), live.frame.clone()),
            Outbound::Resync(room) => return Box::pin(self.backfill(&room)).await,
        };
        let Some(sub) = self.subs.get(&room) else {
            return Ok(());
        };
        if sub.cursor.has_seen(&m.origin, m.offset) {
            return Ok(());
        }
        if is_hole(&sub.cursor, &m) {
            Box::pin(self.backfill(&room)).await?;
        }
        let Some(sub) = self.subs.get_mut(&room) else {
            return Ok(());
        };
        if sub.cursor.has_seen(&m.origin, m.offset) {
            return Ok(());
        }
        sub.cursor.advance(&m.origin, m.offset);
        let out = message_frame(&sub.id, &sub.destination, &m);
        self.send_frame(&out).await
    }

    /// Sends everything of `room` after the subscription's cursor that live delivery
    /// missed; a hole the log cannot fill now ends the session with the cursor to resume.
    pub(super) async fn backfill(&mut self, room: &RoomId) -> Result<(), End> {
        let Some(sub) = self.subs.get(room) else {
            return Ok(());
        };
        let mut cursor = sub.cursor.clone();
        let view = Subscription {
            id: sub.id.clone(),
            destination: sub.destination.clone(),
            cursor: Cursor::new(),
        };
        let resume_from = match replay(&self.gw, room, &mut cursor, &mut || true).await {
            Ok(Replay { frames, complete }) => {
                for f in &frames {
                    if matches!(f, ServerFrame::Msg(_)) {
                        self.gw.metrics.backfilled.inc();
                    }
                }
                self.send_replayed(&view, &frames).await?;
                if complete {
                    if let Some(s) = self.subs.get_mut(room) {
                        s.cursor = cursor;
                    }
                    return Ok(());
                }
                cursor
            }
            Err(ResumeError::LogBusy(e)) => {
                tracing::warn!(%room, error = %e, "backfill from the log failed; the client resumes");
                self.subs
                    .get(room)
                    .map(|s| s.cursor.clone())
                    .unwrap_or_default()
            }
            Err(e) => {
                tracing::warn!(%room, error = %e, "backfill failed");
                return Ok(());
            }
        };
        let cursor_json = serde_json::to_string(&resume_from).unwrap_or_default();
        Err(End::Error {
            code: ErrorCode::Unavailable,
            message: format!("live delivery of {room} missed messages that cannot be read right now; reconnect and subscribe with dtfed-since"),
            receipt: None,
            headers: vec![("dtfed-cursor", cursor_json), ("subscription", view.id)],
            close: CLOSE_NORMAL,
        })
    }
}
