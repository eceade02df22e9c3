//! One player's WebSocket connection, from upgrade to close.
//!
//! A session is one task that owns its socket: it reads client frames, writes server frames,
//! and drains its outbound queue of live messages (filled by [`crate::rooms`]). Publishes go
//! through [`super::publish`] concurrently (queued for Kafka in the order sent) and are
//! acknowledged as Kafka confirms them. A `sub` with `since` answers one piece of a long
//! replay, then `more`; a room joined for a `sub` is left on every way out that does not
//! end subscribed. Per room, the session keeps
//! a cursor and drops every live message at or below it, so replays after an owner change or
//! a backfill never reach the player twice; a live message whose `prev` is beyond the cursor
//! makes the session backfill first, so nothing is skipped either.
//!
//! # Writes
//!
//! Frames are fed into the socket's write buffer and flushed once per turn of the loop:
//! after a live message, the session takes whatever else is already queued (up to
//! [`WRITE_BATCH`] items, acks likewise), so a burst of a room's messages costs one
//! `sendto` instead of one per frame. A write (feed or flush) the player does not take
//! within [`WRITE_TIMEOUT`](super::socket::WRITE_TIMEOUT) closes the connection as a slow reader.
//!
//! # Replication watermarks
//!
//! When the region mirrors other regions, `synced` carries the room's `origins` (how far
//! this region holds each origin's log for the room, and whether it receives it now), and
//! whenever the region's table of marks changes (at most once a second, see
//! `mirror::watermarks`) the session sends a `wm` frame per subscribed room with the
//! origins whose mark changed since the last one it sent; nothing when nothing changed.
//! What was last sent is kept per subscribed room only (bounded by [`MAX_SUBSCRIPTIONS`]).
//!
//! # Liveness
//!
//! The session sends a WebSocket Ping every `client.ping_interval_ms` and closes (4003) a
//! connection from which nothing (no frame, no Pong) arrived for `client.idle_timeout_ms`.
//! A JWT session closes (1008) when its token expires.

use dtfed_proto::record::now_ms;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use dtfed_proto::client::decode_client_frame;
use dtfed_proto::record::LogValue;
use dtfed_proto::{ClientFrame, Cursor, ErrorCode, OriginMarks, RoomId, ServerFrame};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::auth::{AuthError, Player};
use super::limits::TokenBucket;
use super::publish::{publish, PublishError, Turn};
use super::resume::{is_hole, replay, Replay, ResumeError};
use super::{Gateway, CLOSE_FLOOD, CLOSE_GOING_AWAY, CLOSE_IDLE, CLOSE_POLICY, CLOSE_SLOW_READER};
use crate::gateway::socket::{close, PlayerSocket, Received, WriteFailed};
use crate::mirror::watermarks::{changed, MarksWatch};
use crate::rooms::{Outbound, SessionId, SessionSink};

/// Rooms one connection may subscribe to at once.
pub const MAX_SUBSCRIPTIONS: usize = 256;
/// Publishes one connection may have waiting for Kafka at once; beyond it the session stops
/// reading until acks come back (TCP backpressure on the player).
pub(super) const MAX_IN_FLIGHT: usize = 256;
/// Queued live messages (or ready acks) written before one flush.
const WRITE_BATCH: usize = 64;
/// `sub`s with `since` that read the log, per second and in a burst, per connection (the
/// hot history alone costs nothing and is not counted).
pub(super) const LOG_REPLAYS_PER_SEC: u32 = 4;
pub(super) const LOG_REPLAY_BURST: u32 = 16;

type PendingAck = Pin<Box<dyn std::future::Future<Output = AckResult> + Send>>;

struct AckResult {
    reference: Option<String>,
    room: RoomId,
    started: Instant,
    /// The offset stored at.
    result: Result<i64, PublishError>,
}

/// Why a session ends.
enum End {
    ClientClosed,
    Close(u16, &'static str),
}

struct Session {
    gw: Arc<Gateway>,
    id: SessionId,
    player: Player,
    socket: PlayerSocket,
    /// Rooms subscribed, with the player's cursor in each (at most [`MAX_SUBSCRIPTIONS`];
    /// looked up for every live message, so with a fast seeded hash).
    subs: HashMap<RoomId, Cursor, foldhash::fast::RandomState>,
    queue: mpsc::Sender<Outbound>,
    slow: CancellationToken,
    publishes: TokenBucket,
    frames: TokenBucket,
    log_replays: TokenBucket,
    pending: FuturesUnordered<PendingAck>,
    /// Fires once the latest publish is queued for Kafka: the next one waits for it, so a
    /// player's messages are stored in the order sent.
    last_publish: Option<oneshot::Receiver<()>>,
    /// The region's replication watermarks (federated only).
    marks: Option<MarksWatch>,
    /// Per subscribed room, the origins' marks as last sent (`synced`, then `wm`).
    marks_sent: HashMap<RoomId, OriginMarks, foldhash::fast::RandomState>,
}

/// Runs one connection to its end.
pub async fn run(
    gw: Arc<Gateway>,
    id: SessionId,
    mut socket: WebSocket,
    player: Result<Player, AuthError>,
) {
    gw.metrics.connections.inc();
    let player = match player {
        Ok(p) => p,
        Err(e) => {
            gw.metrics.error(ErrorCode::Unauthorized);
            let frame = ServerFrame::error(ErrorCode::Unauthorized, e.to_string(), None);
            let _ = socket.send(Message::Text(frame.to_json().into())).await;
            let _ = socket.send(close(CLOSE_POLICY, "unauthorized")).await;
            gw.metrics.closed("unauthorized");
            gw.metrics.connections.dec();
            return;
        }
    };
    let span =
        tracing::debug_span!("session", region = %gw.region, session = id, player = %player.name);
    serve_player(gw.clone(), id, socket, player)
        .instrument(span)
        .await;
    gw.metrics.connections.dec();
}

async fn serve_player(gw: Arc<Gateway>, id: SessionId, socket: WebSocket, player: Player) {
    let (queue, mut outbound) = mpsc::channel(gw.cfg.outbound_queue);
    let cfg = &gw.cfg;
    let mut s = Session {
        publishes: TokenBucket::new(cfg.publish_rate_per_sec, cfg.publish_burst),
        frames: TokenBucket::new(
            cfg.publish_rate_per_sec
                .saturating_mul(4)
                .saturating_add(20),
            cfg.publish_burst.saturating_mul(4).saturating_add(20),
        ),
        log_replays: TokenBucket::new(LOG_REPLAYS_PER_SEC, LOG_REPLAY_BURST),
        gw: gw.clone(),
        id,
        player,
        socket: PlayerSocket::new(socket),
        subs: HashMap::default(),
        queue,
        slow: CancellationToken::new(),
        pending: FuturesUnordered::new(),
        last_publish: None,
        marks: gw.watermarks.clone(),
        marks_sent: HashMap::default(),
    };
    let end = s.serve(&mut outbound).await;
    Box::pin(s.finish(end)).await;
}

impl Session {
    async fn serve(&mut self, outbound: &mut mpsc::Receiver<Outbound>) -> Result<End, End> {
        let closing_token = self.gw.closing.clone();
        let slow_token = self.slow.clone();
        // Made once: a `cancelled()` future registers with the token (a mutex and a waiter
        // list) when first polled, so one per turn of the loop would cost that per message.
        let slow = slow_token.cancelled();
        let closing = closing_token.cancelled();
        let ping_every = Duration::from_millis(self.gw.cfg.ping_interval_ms);
        let idle_after = Duration::from_millis(self.gw.cfg.idle_timeout_ms);
        // One timer for pings, the idle close and the token's expiry (an idle connection
        // pays for one, not three), re-armed lazily: a frame only stamps `heard`; when the
        // timer fires it does what is due and moves to the next deadline.
        let start = tokio::time::Instant::now();
        let mut heard = start;
        let mut next_ping = start + ping_every;
        let expires = token_deadline(self.player.expires_at);
        let deadline = |heard: tokio::time::Instant, next_ping: tokio::time::Instant| {
            let d = next_ping.min(heard + idle_after);
            expires.map_or(d, |e| d.min(e))
        };
        let liveness = tokio::time::sleep_until(deadline(heard, next_ping));
        tokio::pin!(slow, closing, liveness);
        loop {
            tokio::select! {
                biased;
                _ = &mut slow => return Err(End::Close(CLOSE_SLOW_READER, "slow reader: outbound queue full")),
                _ = &mut closing => return Ok(End::Close(CLOSE_GOING_AWAY, "server shutting down")),
                _ = &mut liveness => {
                    let now = tokio::time::Instant::now();
                    if expires.is_some_and(|e| now >= e) {
                        self.gw.metrics.closed("token_expired");
                        return Err(End::Close(CLOSE_POLICY, "token expired"));
                    }
                    if heard + idle_after <= now {
                        // Not reading (publishes in flight at the limit) is our silence, not
                        // theirs.
                        if self.pending.len() < MAX_IN_FLIGHT {
                            self.gw.metrics.closed("idle");
                            return Err(End::Close(CLOSE_IDLE, "idle: nothing received within the idle timeout"));
                        }
                        heard = now;
                    }
                    if now >= next_ping {
                        self.socket.feed(Message::Ping(Default::default())).await.map_err(|e| self.write_failed(e))?;
                        next_ping = now + ping_every;
                    }
                    liveness.as_mut().reset(deadline(heard, next_ping));
                }
                Some(ack) = self.pending.next(), if !self.pending.is_empty() => {
                    self.acked(ack).await?;
                    for _ in 1..WRITE_BATCH {
                        match self.pending.next().now_or_never() {
                            Some(Some(ack)) => self.acked(ack).await?,
                            _ => break,
                        }
                    }
                }
                Some(item) = outbound.recv() => {
                    self.live(item).await?;
                    for _ in 1..WRITE_BATCH {
                        match outbound.try_recv() {
                            Ok(item) => self.live(item).await?,
                            Err(_) => break,
                        }
                    }
                }
                more = marks_changed(&mut self.marks), if !self.subs.is_empty() => {
                    if more {
                        self.send_watermarks().await?;
                    } else {
                        self.marks = None;
                    }
                }
                incoming = self.socket.recv(&self.gw.metrics), if self.pending.len() < MAX_IN_FLIGHT => match incoming {
                    Received::Ended => return Ok(End::ClientClosed),
                    Received::Message(msg) => {
                        heard = tokio::time::Instant::now();
                        Box::pin(self.incoming(msg)).await?
                    }
                    Received::Broken(code, reason) => return Err(End::Close(code, reason)),
                },
            }
            self.flush().await?;
        }
    }

    async fn finish(&mut self, end: Result<End, End>) {
        let end = match end {
            Ok(e) | Err(e) => e,
        };
        if let End::Close(code, _) = &end {
            if *code == CLOSE_GOING_AWAY {
                // Drain: every publish already handed to Kafka gets its ack or error.
                let deadline = self.gw.drain_timeout;
                let _ = tokio::time::timeout(deadline, async {
                    while let Some(ack) = self.pending.next().await {
                        if self.acked(ack).await.is_err() {
                            break;
                        }
                    }
                })
                .await;
            }
        }
        let closing = match end {
            End::Close(code, reason) => self.socket.send_close(code, reason).await,
            End::ClientClosed => false,
        };
        let rooms: Vec<RoomId> = self.subs.drain().map(|(r, _)| r).collect();
        for room in rooms {
            self.gw.rooms.leave(&room, self.id).await;
        }
        if closing {
            self.socket.await_close_answer().await;
        }
    }

    async fn send(&mut self, frame: &ServerFrame) -> Result<(), End> {
        self.send_text(frame.to_json().into()).await
    }

    /// Feeds one frame into the write buffer; [`Session::flush`] sends it.
    async fn send_text(&mut self, text: Utf8Bytes) -> Result<(), End> {
        self.socket
            .feed(Message::Text(text))
            .await
            .map_err(|e| self.write_failed(e))?;
        self.gw.metrics.frames_out.inc();
        Ok(())
    }

    /// Writes what was fed since the last flush.
    async fn flush(&mut self) -> Result<(), End> {
        self.socket.flush().await.map_err(|e| self.write_failed(e))
    }

    fn write_failed(&self, e: WriteFailed) -> End {
        match e {
            WriteFailed::Closed => End::ClientClosed,
            WriteFailed::TimedOut => {
                self.gw.metrics.closed("slow_reader");
                End::Close(CLOSE_SLOW_READER, "slow reader: write timed out")
            }
        }
    }

    async fn error(
        &mut self,
        code: ErrorCode,
        message: impl Into<String>,
        reference: Option<String>,
    ) -> Result<(), End> {
        self.gw.metrics.error(code);
        self.send(&ServerFrame::error(code, message, reference))
            .await
    }

    async fn incoming(&mut self, msg: Message) -> Result<(), End> {
        self.gw.metrics.frames_in.inc();
        if !self.frames.take(Instant::now()) {
            self.gw.metrics.closed("flood");
            return Err(End::Close(CLOSE_FLOOD, "flood: too many frames"));
        }
        let text = match msg {
            Message::Text(t) => t,
            Message::Binary(_) => {
                return self
                    .error(
                        ErrorCode::BadFrame,
                        "binary frames are not part of protocol v1; send JSON text",
                        None,
                    )
                    .await
            }
            Message::Close(_) => return Err(End::ClientClosed),
            Message::Ping(_) | Message::Pong(_) => return Ok(()),
        };
        if text.len() > self.gw.cfg.max_frame_bytes {
            let limit = self.gw.cfg.max_frame_bytes;
            return self
                .error(
                    ErrorCode::TooLarge,
                    format!("frame is {} bytes, the limit is {limit}", text.len()),
                    None,
                )
                .await;
        }
        match decode_client_frame(text.as_str()) {
            Err(e) => {
                self.gw.metrics.error(e.code);
                self.send(&ServerFrame::from(e)).await
            }
            Ok(ClientFrame::Ping) => self.send(&ServerFrame::Pong).await,
            Ok(ClientFrame::Pub {
                room,
                body,
                reference,
            }) => {
                if !self.player.may_use(room.as_str()) {
                    return self
                        .error(
                            ErrorCode::Forbidden,
                            format!("you may not publish in {room}"),
                            reference,
                        )
                        .await;
                }
                if !self.publishes.take(Instant::now()) {
                    let rate = self.gw.cfg.publish_rate_per_sec;
                    return self
                        .error(
                            ErrorCode::RateLimited,
                            format!("over {rate} publishes per second; slow down"),
                            reference,
                        )
                        .await;
                }
                let value = LogValue {
                    from: self.player.name.clone(),
                    ts: now_ms(),
                    body,
                };
                let gw = self.gw.clone();
                let (turn, next) = Turn::after(self.last_publish.take());
                self.last_publish = Some(next);
                self.pending.push(Box::pin(async move {
                    let started = Instant::now();
                    let result = publish(&gw, &room, &value, reference.as_deref(), turn).await;
                    AckResult {
                        reference,
                        room,
                        started,
                        result,
                    }
                }));
                Ok(())
            }
            // Boxed, like the other rare paths (backfill, finish): a session's task is as
            // large as its largest state, and an idle player should not pay for a replay.
            Ok(ClientFrame::Sub { room, since }) => match self.gw.foreign_origin(since.as_ref()) {
                Some(why) => self.error(ErrorCode::BadFrame, why, None).await,
                None => Box::pin(self.subscribe(room, since)).await,
            },
            Ok(ClientFrame::Unsub { room }) => {
                if self.subs.remove(&room).is_some() {
                    self.gw.rooms.leave(&room, self.id).await;
                    Ok(())
                } else {
                    self.error(
                        ErrorCode::NotSubscribed,
                        format!("not subscribed to {room}"),
                        None,
                    )
                    .await
                }
            }
        }
    }

    async fn subscribe(&mut self, room: RoomId, since: Option<Cursor>) -> Result<(), End> {
        if !self.player.may_use(room.as_str()) {
            return self
                .error(
                    ErrorCode::Forbidden,
                    format!("you may not subscribe to {room}"),
                    None,
                )
                .await;
        }
        if let Some(cursor) = self.subs.get(&room) {
            // Already live in this room: say where the player stands.
            let origins = self.gw.room_marks(&room);
            let frame = ServerFrame::Synced {
                room: room.clone(),
                cursor: cursor.clone(),
                origins: origins.clone(),
            };
            self.remember_marks(room, origins);
            return self.send(&frame).await;
        }
        if self.subs.len() >= MAX_SUBSCRIPTIONS {
            return self
                .error(
                    ErrorCode::Forbidden,
                    format!("a connection may subscribe to at most {MAX_SUBSCRIPTIONS} rooms"),
                    None,
                )
                .await;
        }
        let sink = SessionSink {
            queue: self.queue.clone(),
            slow: self.slow.clone(),
        };
        // Live delivery starts first (into the queue), then the replay or the tail snapshot:
        // whatever is published in between is in both, and the cursor drops the second copy.
        if let Err(e) = self.gw.rooms.join(&room, self.id, sink).await {
            tracing::warn!(%room, error = %e, "subscribing a room on the bus failed");
            return self
                .error(
                    ErrorCode::Unavailable,
                    format!("cannot subscribe to {room} right now; try again"),
                    None,
                )
                .await;
        }
        // Joined: from here every way out either records the room in `subs` or leaves it,
        // so a player who hangs up (or is closed) mid-replay leaves no subscription behind.
        match self.catch_up(&room, since).await {
            Ok(Some(cursor)) => {
                self.subs.insert(room.clone(), cursor.clone());
                let origins = self.gw.room_marks(&room);
                self.remember_marks(room.clone(), origins.clone());
                self.send(&ServerFrame::Synced {
                    room,
                    cursor,
                    origins,
                })
                .await
            }
            Ok(None) => Ok(()),
            Err(end) => {
                self.gw.rooms.leave(&room, self.id).await;
                Err(end)
            }
        }
    }

    /// Sends what `room` holds after `since` (or finds the room's tail); the cursor to go
    /// live with, or `None` when the room was left and the player told why.
    async fn catch_up(
        &mut self,
        room: &RoomId,
        since: Option<Cursor>,
    ) -> Result<Option<Cursor>, End> {
        let cursor = match since {
            Some(mut cursor) => {
                let bucket = &mut self.log_replays;
                let mut may_read_log = || bucket.take(Instant::now());
                match replay(&self.gw, room, &mut cursor, &mut may_read_log).await {
                    Ok(Replay { frames, complete }) => {
                        for frame in &frames {
                            self.send(frame).await?;
                        }
                        if !complete {
                            // One piece per `sub`: the player asks for the next one, so a
                            // long replay shares the log with everyone else's.
                            self.gw.rooms.leave(room, self.id).await;
                            let more = ServerFrame::More {
                                room: room.clone(),
                                cursor,
                            };
                            self.send(&more).await?;
                            return Ok(None);
                        }
                        cursor
                    }
                    Err(ResumeError::RateLimited) => {
                        self.gw.rooms.leave(room, self.id).await;
                        let per_sec = LOG_REPLAYS_PER_SEC;
                        self.error(
                            ErrorCode::RateLimited,
                            format!("over {per_sec} replays from the log per second; retry {room} in a second"),
                            None,
                        )
                        .await?;
                        return Ok(None);
                    }
                    Err(e) => return self.sub_failed(room, e.to_string()).await.map(|()| None),
                }
            }
            None => match self.gw.rooms.bus().tails(room).await {
                Ok(tails) => tails,
                Err(e) => return self.sub_failed(room, e.to_string()).await.map(|()| None),
            },
        };
        Ok(Some(cursor))
    }

    /// Leaves `room` and tells the player to try again; `why` (Kafka's or Redis's own
    /// words) goes to the log, not to the player.
    async fn sub_failed(&mut self, room: &RoomId, why: String) -> Result<(), End> {
        tracing::warn!(%room, error = %why, "subscribe failed");
        self.gw.rooms.leave(room, self.id).await;
        self.error(
            ErrorCode::Unavailable,
            format!("cannot subscribe to {room} right now; try again"),
            None,
        )
        .await
    }

    async fn acked(&mut self, ack: AckResult) -> Result<(), End> {
        match ack.result {
            Ok(offset) => {
                self.gw
                    .metrics
                    .publish_latency
                    .observe(ack.started.elapsed().as_secs_f64());
                let frame = ServerFrame::Ack {
                    reference: ack.reference,
                    room: ack.room,
                    origin: self.gw.region.clone(),
                    offset,
                };
                self.send(&frame).await
            }
            Err(e) => {
                tracing::warn!(room = %ack.room, error = %e, "publish not acknowledged by Kafka");
                self.error(ErrorCode::Unavailable, e.for_player(), ack.reference)
                    .await
            }
        }
    }

    async fn live(&mut self, item: Outbound) -> Result<(), End> {
        match item {
            Outbound::Msg(live) => {
                let m = &live.frame;
                let Some(cursor) = self.subs.get(&m.room) else {
                    return Ok(());
                };
                if cursor.has_seen(&m.origin, m.offset) {
                    return Ok(());
                }
                if is_hole(cursor, m) {
                    Box::pin(self.backfill(&m.room.clone())).await?;
                }
                let Some(cursor) = self.subs.get_mut(&m.room) else {
                    return Ok(());
                };
                if cursor.has_seen(&m.origin, m.offset) {
                    return Ok(());
                }
                cursor.advance(&m.origin, m.offset);
                self.send_text(live.text.clone()).await?;
                self.gw
                    .metrics
                    .hop_session_write
                    .observe(live.queued.elapsed().as_secs_f64());
                Ok(())
            }
            Outbound::Resync(room) => Box::pin(self.backfill(&room)).await,
        }
    }

    /// Sends everything of `room` after the session's cursor that live delivery missed.
    async fn backfill(&mut self, room: &RoomId) -> Result<(), End> {
        let Some(cursor) = self.subs.get(room) else {
            return Ok(());
        };
        let mut cursor = cursor.clone();
        match replay(&self.gw, room, &mut cursor, &mut || true).await {
            Ok(Replay { frames, complete }) => {
                for frame in &frames {
                    if matches!(frame, ServerFrame::Msg(_)) {
                        self.gw.metrics.backfilled.inc();
                    }
                    self.send(frame).await?;
                }
                if complete {
                    if let Some(c) = self.subs.get_mut(room) {
                        *c = cursor;
                    }
                    Ok(())
                } else {
                    self.stop_live(room, cursor).await
                }
            }
            // The log is busy: live delivery cannot go on past the hole without skipping
            // what is in it, so the player resumes from its cursor (and retries).
            Err(ResumeError::LogBusy(e)) => {
                tracing::warn!(%room, error = %e, "backfill from the log failed; the player resumes");
                // From the cursor as it was: nothing of this replay was sent.
                let Some(before) = self.subs.get(room).cloned() else {
                    return Ok(());
                };
                self.stop_live(room, before).await
            }
            Err(e) => {
                // The bus is unreachable: live delivery is down too, and the next resync retries.
                tracing::warn!(%room, error = %e, "backfill failed");
                Ok(())
            }
        }
    }

    /// Keeps the origins' marks just sent for `room`. Nothing is kept for a room without
    /// any (a region that mirrors nobody): an idle connection costs no table for them.
    fn remember_marks(&mut self, room: RoomId, origins: OriginMarks) {
        if origins.is_empty() {
            self.marks_sent.remove(&room);
        } else {
            self.marks_sent.insert(room, origins);
        }
    }

    /// Sends a `wm` frame for every subscribed room whose origins' marks changed since the
    /// last ones sent for it.
    async fn send_watermarks(&mut self) -> Result<(), End> {
        let Some(marks) = self.marks.as_mut() else {
            return Ok(());
        };
        let table = marks.borrow_and_update().clone();
        let subs = &self.subs;
        self.marks_sent.retain(|room, _| subs.contains_key(room));
        let mut frames = Vec::new();
        let none = OriginMarks::new();
        for room in self.subs.keys() {
            let now = table.for_room(room);
            let diff = changed(self.marks_sent.get(room).unwrap_or(&none), &now);
            if !diff.is_empty() {
                self.marks_sent.insert(room.clone(), now);
                frames.push(ServerFrame::Wm {
                    room: room.clone(),
                    origins: diff,
                });
            }
        }
        for frame in &frames {
            self.send(frame).await?;
        }
        Ok(())
    }

    /// Takes the connection out of `room` and tells the player to resume from `cursor`.
    async fn stop_live(&mut self, room: &RoomId, cursor: Cursor) -> Result<(), End> {
        if self.subs.remove(room).is_some() {
            self.gw.rooms.leave(room, self.id).await;
        }
        let more = ServerFrame::More {
            room: room.clone(),
            cursor,
        };
        self.send(&more).await
    }
}

/// Resolves when the region's watermarks changed (true), or never without them; false when
/// their sender is gone (the daemon is stopping).
async fn marks_changed(marks: &mut Option<MarksWatch>) -> bool {
    match marks {
        Some(m) => m.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// When the player's token expires, on the runtime's clock; `None` without one.
pub(super) fn token_deadline(
    expires_at: Option<std::time::SystemTime>,
) -> Option<tokio::time::Instant> {
    let at = expires_at?;
    let left = at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Some(tokio::time::Instant::now() + left)
}
