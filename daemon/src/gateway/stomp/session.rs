//! One STOMP client's WebSocket connection at `/stomp`, from upgrade to close. Start with
//! [`run`], then [`Session::serve`] (the loop) and [`Session::frame`] (one client frame);
//! `SUBSCRIBE`, live delivery and backfills are in [`subscriptions`].
//!
//! It drives the machinery the v1 session uses: [`crate::gateway::auth`] on `CONNECT`,
//! [`crate::rooms`] for live delivery, [`crate::gateway::resume::replay`] for `dtfed-since`
//! and for backfills, [`crate::gateway::publish::publish`] for `SEND` (in order, idempotent
//! with a `dtfed-ref` header), the same limits and the same write discipline. What differs
//! is the wire ([`super::frame`]), and that every error is an `ERROR` frame followed by the
//! close (STOMP has no error a connection survives): a client reconnects and resubscribes
//! with `dtfed-since`, which loses nothing.
//!
//! Liveness: STOMP heart-beats as negotiated in `CONNECT` (an EOL each way). A client that
//! sends none is pinged (WebSocket Ping) like a v1 player and closed after
//! `client.idle_timeout_ms` of silence; one that promised heart-beats is closed after twice
//! the negotiated interval without any.

use dtfed_proto::record::now_ms;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket};
use dtfed_proto::record::LogValue;
use dtfed_proto::{Cursor, ErrorCode, RoomId};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::destinations::DestinationUse;
use super::frame::{Decoded, Frame, FrameDecoder, FrameError, Limits, Version};
use super::translate::{body_of, negotiate, parse_heart_beat};
use super::Stomp;
use crate::config::AuthMode;
use crate::gateway::auth::Player;
use crate::gateway::limits::TokenBucket;
use crate::gateway::publish::{publish, PublishError, Turn};
use crate::gateway::session::{
    token_deadline, LOG_REPLAYS_PER_SEC, LOG_REPLAY_BURST, MAX_IN_FLIGHT,
};
use crate::gateway::socket::{PlayerSocket, Received, WriteFailed};
use crate::gateway::{
    Gateway, CLOSE_FLOOD, CLOSE_GOING_AWAY, CLOSE_IDLE, CLOSE_POLICY, CLOSE_SLOW_READER,
};
use crate::rooms::{Outbound, SessionId};

mod subscriptions;

/// Command line and headers of one client frame.
const MAX_HEADER_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// Queued live messages (or ready receipts) written before one flush.
const WRITE_BATCH: usize = 64;
/// The `server` header of `CONNECTED`.
const SERVER: &str = concat!("dtfed/", env!("CARGO_PKG_VERSION"));
/// Longest `receipt` or subscription `id` kept: they are held per in-flight send and per
/// subscription, so a connection's memory stays small whatever it sends.
const MAX_ID_LEN: usize = 128;
/// A normal close after `ERROR` or `DISCONNECT`.
const CLOSE_NORMAL: u16 = 1000;

type PendingReceipt = Pin<Box<dyn std::future::Future<Output = SendResult> + Send>>;

struct SendResult {
    receipt: Option<String>,
    room: RoomId,
    started: Instant,
    result: Result<i64, PublishError>,
}

/// Why a session ends.
enum End {
    ClientClosed,
    /// `ERROR` with this message (and `receipt-id`, extra headers), then close with `code`.
    Error {
        code: ErrorCode,
        message: String,
        receipt: Option<String>,
        headers: Vec<(&'static str, String)>,
        close: u16,
    },
    /// `DISCONNECT`: its receipt was sent; close.
    Disconnected,
    /// Close without a frame (slow reader, shutdown after its `ERROR`).
    Close(u16, &'static str),
}

impl End {
    fn error(code: ErrorCode, message: impl Into<String>) -> End {
        End::Error {
            code,
            message: message.into(),
            receipt: None,
            headers: Vec::new(),
            close: CLOSE_NORMAL,
        }
    }

    fn with_receipt(mut self, r: Option<&str>) -> End {
        if let End::Error { receipt, .. } = &mut self {
            *receipt = r.map(str::to_owned);
        }
        self
    }

    fn closing(mut self, code: u16) -> End {
        if let End::Error { close, .. } = &mut self {
            *close = code;
        }
        self
    }
}

/// One subscription: a room under the client's `id`, with the cursor live delivery keeps.
struct Subscription {
    id: String,
    destination: String,
    cursor: Cursor,
}

struct Session {
    gw: Arc<Gateway>,
    stomp: Arc<Stomp>,
    id: SessionId,
    socket: PlayerSocket,
    decoder: FrameDecoder,
    version: Version,
    /// Set by `CONNECT`.
    player: Option<Player>,
    subs: HashMap<RoomId, Subscription, foldhash::fast::RandomState>,
    /// Subscription id → room.
    ids: HashMap<String, RoomId, foldhash::fast::RandomState>,
    queue: mpsc::Sender<Outbound>,
    slow: CancellationToken,
    publishes: TokenBucket,
    frames: TokenBucket,
    log_replays: TokenBucket,
    pending: FuturesUnordered<PendingReceipt>,
    last_publish: Option<oneshot::Receiver<()>>,
    /// Negotiated: the server sends an EOL this often; the client promised one this often.
    send_every: Option<Duration>,
    hear_every: Option<Duration>,
}

/// Runs one connection to its end.
pub async fn run(gw: Arc<Gateway>, stomp: Arc<Stomp>, id: SessionId, socket: WebSocket) {
    gw.metrics.connections.inc();
    let span = tracing::debug_span!("stomp", region = %gw.region, session = id);
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
        decoder: FrameDecoder::new(Limits {
            max_header_bytes: MAX_HEADER_BYTES,
            max_headers: MAX_HEADERS,
            max_body_bytes: cfg.max_frame_bytes,
        }),
        version: Version::V12,
        player: None,
        gw: gw.clone(),
        stomp,
        id,
        socket: PlayerSocket::new(socket),
        subs: HashMap::default(),
        ids: HashMap::default(),
        queue,
        slow: CancellationToken::new(),
        pending: FuturesUnordered::new(),
        last_publish: None,
        send_every: None,
        hear_every: None,
    };
    async {
        let end = s.serve(&mut outbound).await;
        Box::pin(s.finish(end)).await;
    }
    .instrument(span)
    .await;
    gw.metrics.connections.dec();
}

impl Session {
    async fn serve(&mut self, outbound: &mut mpsc::Receiver<Outbound>) -> Result<End, End> {
        let closing_token = self.gw.closing.clone();
        let slow_token = self.slow.clone();
        let slow = slow_token.cancelled();
        let closing = closing_token.cancelled();
        let ping_every = Duration::from_millis(self.gw.cfg.ping_interval_ms);
        let idle_after = Duration::from_millis(self.gw.cfg.idle_timeout_ms);
        let start = tokio::time::Instant::now();
        let mut heard = start;
        let mut next_ping = start + ping_every;
        let mut next_beat: Option<tokio::time::Instant> = None;
        let mut expires: Option<tokio::time::Instant> = None;
        let liveness = tokio::time::sleep_until(start + ping_every.min(idle_after));
        tokio::pin!(slow, closing, liveness);
        loop {
            // Silence allowed: twice a promised heart-beat interval, else the idle timeout.
            let allowed = self.hear_every.map_or(idle_after, |h| h * 2);
            tokio::select! {
                biased;
                _ = &mut slow => {
                    self.gw.metrics.closed("slow_reader");
                    return Err(End::Close(CLOSE_SLOW_READER, "slow reader: outbound queue full"));
                }
                _ = &mut closing => return Ok(End::Close(CLOSE_GOING_AWAY, "server shutting down")),
                _ = &mut liveness => {
                    let now = tokio::time::Instant::now();
                    if expires.is_some_and(|e| now >= e) {
                        self.gw.metrics.closed("token_expired");
                        return Err(End::error(ErrorCode::Unauthorized, "token expired").closing(CLOSE_POLICY));
                    }
                    if self.player.is_none() && start + idle_after <= now {
                        // Heart-beats or pings do not keep an unauthenticated socket open.
                        self.gw.metrics.closed("idle");
                        return Err(End::error(
                            ErrorCode::Unauthorized,
                            format!("no CONNECT within {} ms", idle_after.as_millis()),
                        ).closing(CLOSE_IDLE));
                    }
                    if heard + allowed <= now {
                        if self.pending.len() < MAX_IN_FLIGHT {
                            self.gw.metrics.closed("idle");
                            let what = if self.hear_every.is_some() { "no heart-beat" } else { "nothing" };
                            return Err(End::error(
                                ErrorCode::BadFrame,
                                format!("idle: {what} received for {} ms", allowed.as_millis()),
                            ).closing(CLOSE_IDLE));
                        }
                        heard = now;
                    }
                    if self.hear_every.is_none() && now >= next_ping {
                        self.socket.feed(Message::Ping(Default::default())).await.map_err(|e| self.write_failed(e))?;
                        next_ping = now + ping_every;
                    }
                    if let (Some(at), Some(every)) = (next_beat, self.send_every) {
                        if now >= at {
                            self.send_raw(b"\n".to_vec()).await?;
                            next_beat = Some(now + every);
                        }
                    }
                    let mut due = heard + allowed;
                    if self.player.is_none() {
                        due = due.min(start + idle_after);
                    }
                    if self.hear_every.is_none() {
                        due = due.min(next_ping);
                    }
                    for d in [next_beat, expires].into_iter().flatten() {
                        due = due.min(d);
                    }
                    liveness.as_mut().reset(due);
                }
                Some(done) = self.pending.next(), if !self.pending.is_empty() => {
                    self.sent(done).await?;
                    for _ in 1..WRITE_BATCH {
                        match self.pending.next().now_or_never() {
                            Some(Some(done)) => self.sent(done).await?,
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
                incoming = self.socket.recv(&self.gw.metrics), if self.pending.len() < MAX_IN_FLIGHT => match incoming {
                    Received::Ended => return Ok(End::ClientClosed),
                    Received::Message(msg) => {
                        heard = tokio::time::Instant::now();
                        let was_connected = self.player.is_some();
                        Box::pin(self.incoming(msg)).await?;
                        if !was_connected && self.player.is_some() {
                            // CONNECTED went out: the negotiated timers start now.
                            let now = tokio::time::Instant::now();
                            next_beat = self.send_every.map(|e| now + e);
                            expires = self.player.as_ref().and_then(|p| token_deadline(p.expires_at));
                            let mut due = now + self.hear_every.map_or(idle_after, |h| h * 2);
                            for d in [next_beat, expires].into_iter().flatten() {
                                due = due.min(d);
                            }
                            if self.hear_every.is_none() {
                                due = due.min(next_ping);
                            }
                            liveness.as_mut().reset(due);
                        }
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
        let shutdown = matches!(end, End::Close(CLOSE_GOING_AWAY, _));
        if shutdown || matches!(end, End::Disconnected | End::Error { .. }) {
            // Every SEND already handed to Kafka gets its RECEIPT first: a client told
            // ERROR knows which of its earlier sends were stored.
            let deadline = self.gw.drain_timeout;
            let _ = tokio::time::timeout(deadline, async {
                while let Some(done) = self.pending.next().await {
                    if self.sent(done).await.is_err() {
                        break;
                    }
                }
            })
            .await;
        }
        let (code, reason): (u16, &'static str) = match end {
            End::ClientClosed => (0, ""),
            End::Disconnected => (CLOSE_NORMAL, "disconnected"),
            End::Close(code, reason) => {
                if code == CLOSE_GOING_AWAY {
                    let err = Frame::new("ERROR").header_value(
                        "message",
                        "server shutting down; reconnect (another daemon of the region serves you)",
                    );
                    let _ = self.send_frame(&err).await;
                }
                (code, reason)
            }
            End::Error {
                code,
                message,
                receipt,
                headers,
                close,
            } => {
                self.gw.metrics.error(code);
                tracing::debug!(%message, "STOMP ERROR");
                let mut err = Frame::new("ERROR")
                    .header_value("message", message.clone())
                    .header_value("dtfed-code", code.as_str());
                if let Some(r) = receipt {
                    err = err.header_value("receipt-id", r);
                }
                for (k, v) in headers {
                    err = err.header_value(k, v);
                }
                let err = err
                    .header_value("content-type", "text/plain")
                    .with_body(message.into_bytes());
                let _ = self.send_frame(&err).await;
                (close, "error")
            }
        };
        let _ = self.flush().await;
        let closing = code != 0 && self.socket.send_close(code, reason).await;
        let rooms: Vec<RoomId> = self.subs.drain().map(|(r, _)| r).collect();
        self.ids.clear();
        for room in rooms {
            self.gw.rooms.leave(&room, self.id).await;
        }
        if closing {
            self.socket.await_close_answer().await;
        }
    }

    async fn send_frame(&mut self, frame: &Frame) -> Result<(), End> {
        self.gw.metrics.frames_out.inc();
        self.send_raw(frame.encode(self.version)).await
    }

    /// Feeds bytes as one WebSocket message: text when they are UTF-8, binary otherwise.
    async fn send_raw(&mut self, bytes: Vec<u8>) -> Result<(), End> {
        let msg = match String::from_utf8(bytes) {
            Ok(text) => Message::Text(text.into()),
            Err(e) => Message::Binary(e.into_bytes().into()),
        };
        self.socket
            .feed(msg)
            .await
            .map_err(|e| self.write_failed(e))?;
        Ok(())
    }

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

    async fn incoming(&mut self, msg: Message) -> Result<(), End> {
        self.gw.metrics.frames_in.inc();
        if !self.frames.take(Instant::now()) {
            self.gw.metrics.closed("flood");
            return Err(
                End::error(ErrorCode::RateLimited, "flood: too many frames").closing(CLOSE_FLOOD)
            );
        }
        let pushed = match &msg {
            Message::Text(t) => self.decoder.push(t.as_bytes()),
            Message::Binary(b) => self.decoder.push(b),
            Message::Close(_) => return Err(End::ClientClosed),
            Message::Ping(_) | Message::Pong(_) => return Ok(()),
        };
        pushed.map_err(frame_error)?;
        while let Some(decoded) = self.decoder.next().map_err(frame_error)? {
            match decoded {
                Decoded::HeartBeat => {}
                Decoded::Frame(frame) => Box::pin(self.frame(frame)).await?,
            }
        }
        Ok(())
    }

    /// One client frame.
    async fn frame(&mut self, frame: Frame) -> Result<(), End> {
        let receipt = frame.header("receipt").map(str::to_owned);
        if receipt.as_ref().is_some_and(|r| r.len() > MAX_ID_LEN) {
            return Err(End::error(
                ErrorCode::BadFrame,
                format!("receipt is longer than {MAX_ID_LEN} bytes"),
            ));
        }
        let connected = self.player.is_some();
        let result = match frame.command.as_str() {
            "CONNECT" | "STOMP" if !connected => self.connect(&frame).await,
            "CONNECT" | "STOMP" => Err(End::error(ErrorCode::BadFrame, "already connected")),
            _ if !connected => Err(End::error(
                ErrorCode::BadFrame,
                format!("expected CONNECT, got {}", frame.command),
            )),
            "SUBSCRIBE" => Box::pin(self.subscribe(&frame)).await,
            "UNSUBSCRIBE" => self.unsubscribe(&frame).await,
            "SEND" => return self.send(frame, receipt),
            "DISCONNECT" => {
                // Everything sent before it is answered first (the drain in `finish`).
                while let Some(done) = self.pending.next().await {
                    self.sent(done).await?;
                }
                if let Some(r) = &receipt {
                    let f = Frame::new("RECEIPT").header_value("receipt-id", r.clone());
                    self.send_frame(&f).await?;
                }
                return Err(End::Disconnected);
            }
            "ACK" | "NACK" => Err(End::error(
                ErrorCode::BadFrame,
                "subscriptions are ack:auto; ACK and NACK are not used",
            )),
            "BEGIN" | "COMMIT" | "ABORT" => Err(End::error(
                ErrorCode::BadFrame,
                "transactions are not supported",
            )),
            other => Err(End::error(
                ErrorCode::BadFrame,
                format!("unknown command {other}"),
            )),
        };
        match result {
            Ok(()) => {
                if let (Some(r), true) = (
                    &receipt,
                    frame.command != "CONNECT" && frame.command != "STOMP",
                ) {
                    let f = Frame::new("RECEIPT").header_value("receipt-id", r.clone());
                    self.send_frame(&f).await?;
                }
                Ok(())
            }
            Err(end) => Err(end.with_receipt(receipt.as_deref())),
        }
    }

    async fn connect(&mut self, frame: &Frame) -> Result<(), End> {
        let offered = frame.header("accept-version").unwrap_or("1.0");
        let Some(version) = offered.split(',').filter_map(Version::parse).max() else {
            return Err(End::Error {
                code: ErrorCode::BadFrame,
                message: format!("no version in common: the client accepts {offered:?}, this server speaks 1.0, 1.1 and 1.2"),
                receipt: None,
                headers: vec![("version", "1.0,1.1,1.2".into())],
                close: CLOSE_NORMAL,
            });
        };
        let (cx, cy) = parse_heart_beat(frame.header("heart-beat"))
            .map_err(|why| End::error(ErrorCode::BadFrame, why))?;
        let token = frame.header("passcode").or_else(|| {
            frame
                .header("Authorization")
                .or_else(|| frame.header("authorization"))
                .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim())
        });
        let name = match self.gw.cfg.auth {
            AuthMode::None => frame.header("login"),
            AuthMode::Jwt => None,
        };
        let player = self.gw.auth.authenticate(name, token).map_err(|e| {
            self.gw.metrics.closed("unauthorized");
            End::error(ErrorCode::Unauthorized, format!("unauthorized: {e}")).closing(CLOSE_POLICY)
        })?;
        let [sx, sy] = self.stomp.config.heart_beat_ms;
        self.send_every = negotiate(sx, cy);
        self.hear_every = negotiate(sy, cx);
        self.version = version;
        self.decoder.set_version(version);
        tracing::debug!(player = %player.name, version = version.as_str(), "STOMP CONNECT");
        let connected = Frame::new("CONNECTED")
            .header_value("version", version.as_str())
            .header_value("heart-beat", format!("{sx},{sy}"))
            .header_value("server", SERVER)
            .header_value("session", format!("{}-{}", self.gw.region, self.id))
            .header_value("user-name", player.name.clone());
        self.player = Some(player);
        self.send_frame(&connected).await
    }

    fn may_use(&self, room: &RoomId) -> bool {
        self.player
            .as_ref()
            .is_some_and(|p| p.may_use(room.as_str()))
    }

    fn send(&mut self, frame: Frame, receipt: Option<String>) -> Result<(), End> {
        let fail = |e: End| Err(e.with_receipt(receipt.as_deref()));
        let destination = match required(&frame, "destination") {
            Ok(d) => d,
            Err(e) => return fail(e),
        };
        if frame.header("transaction").is_some() {
            return fail(End::error(
                ErrorCode::BadFrame,
                "transactions are not supported",
            ));
        }
        let room = match self.stomp.table.resolve(destination, DestinationUse::Send) {
            Ok(r) => r,
            Err(e) => return fail(End::error(ErrorCode::BadRoom, e.to_string())),
        };
        if !self.may_use(&room) {
            return fail(End::error(
                ErrorCode::Forbidden,
                format!("you may not publish in {room}"),
            ));
        }
        let reference = frame.header("dtfed-ref").map(str::to_owned);
        if reference
            .as_ref()
            .is_some_and(|r| r.len() > dtfed_proto::client::MAX_REF_LEN)
        {
            return fail(End::error(
                ErrorCode::BadFrame,
                format!(
                    "dtfed-ref is longer than {} bytes",
                    dtfed_proto::client::MAX_REF_LEN
                ),
            ));
        }
        let body = match body_of(&frame) {
            Ok(b) => b,
            Err(why) => return fail(End::error(ErrorCode::BadFrame, why)),
        };
        if !self.publishes.take(Instant::now()) {
            let rate = self.gw.cfg.publish_rate_per_sec;
            return fail(End::error(
                ErrorCode::RateLimited,
                format!("over {rate} publishes per second; slow down"),
            ));
        }
        let Some(player) = &self.player else {
            return fail(End::error(ErrorCode::BadFrame, "expected CONNECT"));
        };
        let value = LogValue {
            from: player.name.clone(),
            ts: now_ms(),
            body,
        };
        let gw = self.gw.clone();
        let (turn, next) = Turn::after(self.last_publish.take());
        self.last_publish = Some(next);
        self.pending.push(Box::pin(async move {
            let started = Instant::now();
            let result = publish(&gw, &room, &value, reference.as_deref(), turn).await;
            SendResult {
                receipt,
                room,
                started,
                result,
            }
        }));
        Ok(())
    }

    /// A `SEND` Kafka answered: `RECEIPT` (if asked for) once durable, else `ERROR`.
    async fn sent(&mut self, done: SendResult) -> Result<(), End> {
        match done.result {
            Ok(offset) => {
                self.gw
                    .metrics
                    .publish_latency
                    .observe(done.started.elapsed().as_secs_f64());
                let Some(r) = done.receipt else { return Ok(()) };
                let f = Frame::new("RECEIPT")
                    .header_value("receipt-id", r)
                    .header_value("dtfed-origin", self.gw.region.clone())
                    .header_value("dtfed-offset", offset.to_string());
                self.send_frame(&f).await
            }
            Err(e) => {
                tracing::warn!(room = %done.room, error = %e, "publish not acknowledged by Kafka");
                Err(End::error(ErrorCode::Unavailable, e.for_player())
                    .with_receipt(done.receipt.as_deref()))
            }
        }
    }
}

fn required<'a>(frame: &'a Frame, name: &str) -> Result<&'a str, End> {
    frame.header(name).ok_or_else(|| {
        End::error(
            ErrorCode::BadFrame,
            format!("{} needs a {name} header", frame.command),
        )
    })
}

fn sub_failed(room: &RoomId, why: String) -> End {
    tracing::warn!(%room, error = %why, "subscribe failed");
    End::error(
        ErrorCode::Unavailable,
        format!("cannot subscribe to {room} right now; try again"),
    )
}

fn frame_error(e: FrameError) -> End {
    match e {
        FrameError::TooLarge(m) => End::error(ErrorCode::TooLarge, m),
        FrameError::Malformed(m) => End::error(ErrorCode::BadFrame, m),
    }
}
