//! [`WsClient`]: a test player speaking client protocol v1 (JSON text frames over
//! WebSocket, see `docs/PROTOCOL.md`) with tokio-tungstenite, `TCP_NODELAY` set.
//!
//! Frames the test has not asked for yet are never dropped: [`WsClient::recv_until`] (and
//! the helpers built on it: [`sub`](WsClient::sub), [`publish`](WsClient::publish),
//! [`ping`](WsClient::ping)) put the frames it skips into a backlog, which
//! [`recv_json`](WsClient::recv_json) and `recv_until` read first. So
//! `publish` then `recv_until(msg)` works whichever of the ack and the message arrived
//! first. [`backlog`](WsClient::backlog) shows what is waiting.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The answer to a [`WsClient::sub`]: the replayed frames (`msg` and `gap`, in order) and
/// the `synced` frame.
#[derive(Debug, Clone)]
pub struct Subscribed {
    /// `msg` and `gap` frames of the room received before `synced`.
    pub frames: Vec<Value>,
    /// The `synced` frame itself (`cursor` is in it).
    pub synced: Value,
}

impl Subscribed {
    /// Only the `msg` frames.
    pub fn messages(&self) -> Vec<&Value> {
        self.frames.iter().filter(|f| f["op"] == "msg").collect()
    }

    /// The cursor from `synced`.
    pub fn cursor(&self) -> &Value {
        &self.synced["cursor"]
    }
}

enum Incoming {
    Json(Value),
    Closed(u16, String),
    TimedOut,
}

/// Numbers this process's connections, for their `ref`s.
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// A WebSocket client for protocol v1.
pub struct WsClient {
    ws: WebSocketStream<TcpStream>,
    url: String,
    backlog: VecDeque<Value>,
    closed: Option<(u16, String)>,
    next_ref: u64,
}

impl std::fmt::Debug for WsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsClient")
            .field("url", &self.url)
            .field("backlog", &self.backlog.len())
            .field("closed", &self.closed)
            .finish()
    }
}

impl WsClient {
    /// Connect to `url` (`ws://host:port/ws?name=...`).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with_headers(url, &[]).await
    }

    /// Connect with extra request headers (e.g. `("Origin", "https://example.com")`).
    /// A refused upgrade is an error naming the HTTP status; see
    /// [`handshake_status`](Self::handshake_status) to assert on it.
    pub async fn connect_with_headers(url: &str, headers: &[(&str, &str)]) -> Result<Self> {
        match Self::handshake(url, headers).await? {
            Ok(client) => Ok(client),
            Err((status, body)) => anyhow::bail!(
                "WebSocket upgrade to {url} refused: HTTP {status} {}",
                body.trim()
            ),
        }
    }

    /// The HTTP status of the upgrade: 101 if it succeeded (the connection is then closed
    /// again), else the refusal's status (401, 403, 503, ...).
    pub async fn handshake_status(url: &str, headers: &[(&str, &str)]) -> Result<u16> {
        match Self::handshake(url, headers).await? {
            Ok(client) => {
                client.close().await;
                Ok(101)
            }
            Err((status, _)) => Ok(status),
        }
    }

    async fn handshake(
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<std::result::Result<Self, (u16, String)>> {
        let mut req = url
            .into_client_request()
            .with_context(|| format!("bad WebSocket URL {url}"))?;
        for (k, v) in headers {
            req.headers_mut().insert(
                HeaderName::from_bytes(k.as_bytes()).with_context(|| format!("header name {k}"))?,
                HeaderValue::from_str(v).with_context(|| format!("header value {v}"))?,
            );
        }
        let host = req.uri().host().context("URL without host")?.to_string();
        let port = req.uri().port_u16().unwrap_or(80);
        let stream =
            tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host.as_str(), port)))
                .await
                .with_context(|| format!("TCP connect to {host}:{port} timed out"))?
                .with_context(|| format!("TCP connect to {host}:{port}"))?;
        stream.set_nodelay(true).context("set TCP_NODELAY")?;
        let handshake = tokio_tungstenite::client_async(req, stream);
        match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
            Err(_) => anyhow::bail!("WebSocket handshake with {url} timed out"),
            Ok(Ok((ws, _response))) => Ok(Ok(WsClient {
                ws,
                url: url.to_string(),
                backlog: VecDeque::new(),
                closed: None,
                // Unique across the process's connections: a `ref` is a player's idempotency
                // key, so a reconnecting client must not start its refs over.
                next_ref: NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed) << 32,
            })),
            Ok(Err(WsError::Http(resp))) => {
                let body = resp
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                Ok(Err((resp.status().as_u16(), body)))
            }
            Ok(Err(e)) => Err(e).with_context(|| format!("WebSocket handshake with {url}")),
        }
    }

    /// The URL this client connected to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Send a JSON value as one text frame.
    pub async fn send_json(&mut self, frame: &Value) -> Result<()> {
        self.send_text(&frame.to_string()).await
    }

    /// Send one text frame as is (for malformed-frame tests).
    pub async fn send_text(&mut self, text: &str) -> Result<()> {
        self.send_message(Message::text(text)).await
    }

    /// Send any WebSocket message (binary, ping, close, ...).
    pub async fn send_message(&mut self, msg: Message) -> Result<()> {
        self.ws
            .send(msg)
            .await
            .with_context(|| format!("send on {}", self.url))
    }

    /// The next JSON frame (backlog first). Error on timeout, on a non-JSON or binary
    /// frame, or if the server closed the connection (the error names code and reason).
    pub async fn recv_json(&mut self, timeout: Duration) -> Result<Value> {
        if let Some(v) = self.backlog.pop_front() {
            return Ok(v);
        }
        let deadline = Instant::now() + timeout;
        match self.next_incoming(deadline).await? {
            Incoming::Json(v) => Ok(v),
            Incoming::Closed(code, reason) => anyhow::bail!(
                "{}: connection closed by the server (code {code}, reason {reason:?})",
                self.url
            ),
            Incoming::TimedOut => anyhow::bail!("{}: no frame within {timeout:?}", self.url),
        }
    }

    /// The first frame (backlog first) for which `pred` is true; frames before it are kept
    /// in the backlog. Error on timeout (naming the frames seen) or close.
    pub async fn recv_until(
        &mut self,
        mut pred: impl FnMut(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value> {
        if let Some(i) = self.backlog.iter().position(&mut pred) {
            return Ok(self.backlog.remove(i).expect("index from position"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_incoming(deadline).await? {
                Incoming::Json(v) if pred(&v) => return Ok(v),
                Incoming::Json(v) => self.backlog.push_back(v),
                Incoming::Closed(code, reason) => anyhow::bail!(
                    "{}: connection closed by the server (code {code}, reason {reason:?}) before the expected frame; unmatched frames: {}",
                    self.url,
                    self.backlog_summary()
                ),
                Incoming::TimedOut => anyhow::bail!(
                    "{}: expected frame not received within {timeout:?}; unmatched frames: {}",
                    self.url,
                    self.backlog_summary()
                ),
            }
        }
    }

    /// Wait for the server to close the connection; returns its close code and reason
    /// (1006 and a note if the connection ended without a close frame). Frames before the
    /// close go to the backlog.
    pub async fn expect_close(&mut self, timeout: Duration) -> Result<(u16, String)> {
        if let Some(c) = &self.closed {
            return Ok(c.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_incoming(deadline).await? {
                Incoming::Json(v) => self.backlog.push_back(v),
                Incoming::Closed(code, reason) => return Ok((code, reason)),
                Incoming::TimedOut => anyhow::bail!(
                    "{}: connection not closed within {timeout:?}; frames received: {}",
                    self.url,
                    self.backlog_summary()
                ),
            }
        }
    }

    /// Assert that nothing but replication watermarks (`wm` frames: how far the region
    /// holds each origin, news whenever a link's state or a mark moves) arrives for
    /// `duration`, and nothing else is waiting in the backlog. The watermarks are dropped.
    pub async fn expect_silence(&mut self, duration: Duration) -> Result<()> {
        self.backlog.retain(|f| !is_watermark(f));
        let deadline = Instant::now() + duration;
        loop {
            self.expect_no_frames_until(deadline).await?;
            match self.backlog.pop_front() {
                None => return Ok(()),
                Some(f) if is_watermark(&f) => {}
                Some(f) => anyhow::bail!("{}: unexpected frame {f}", self.url),
            }
        }
    }

    /// Assert that no frame at all arrives for `duration` (and none is waiting in the
    /// backlog), replication watermarks included.
    pub async fn expect_no_frames(&mut self, duration: Duration) -> Result<()> {
        self.expect_no_frames_until(Instant::now() + duration)
            .await?;
        match self.backlog.pop_front() {
            None => Ok(()),
            Some(f) => anyhow::bail!("{}: unexpected frame {f}", self.url),
        }
    }

    /// Waits until `deadline` for a frame: `Ok` with the backlog empty when none came, or
    /// with the frame that came in the backlog. Error when frames were already waiting or
    /// the connection closed.
    async fn expect_no_frames_until(&mut self, deadline: Instant) -> Result<()> {
        anyhow::ensure!(
            self.backlog.is_empty(),
            "{}: frames already waiting: {}",
            self.url,
            self.backlog_summary()
        );
        match self.next_incoming(deadline).await? {
            Incoming::TimedOut => Ok(()),
            Incoming::Json(v) => {
                self.backlog.push_back(v);
                Ok(())
            }
            Incoming::Closed(code, reason) => anyhow::bail!(
                "{}: connection closed (code {code}, reason {reason:?})",
                self.url
            ),
        }
    }

    /// Frames received but not yet consumed.
    pub fn backlog(&self) -> &VecDeque<Value> {
        &self.backlog
    }

    /// Take all frames received but not yet consumed.
    pub fn drain_backlog(&mut self) -> Vec<Value> {
        self.backlog.drain(..).collect()
    }

    /// Subscribe to `room` (`since`: `None` = live only, or a cursor object) and wait for
    /// `synced`, collecting the room's `msg`/`gap` frames before it (a replay answered in
    /// pieces is continued from each `more` cursor). An `error` frame
    /// without `ref` (or naming this room) while waiting is an error.
    pub async fn sub(
        &mut self,
        room: &str,
        since: Option<Value>,
        timeout: Duration,
    ) -> Result<Subscribed> {
        let mut frame = json!({"op": "sub", "room": room});
        if let Some(since) = since {
            frame["since"] = since;
        }
        self.send_json(&frame).await?;
        let mut frames = Vec::new();
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let f = self
                .recv_until(
                    |f| {
                        let op = f["op"].as_str().unwrap_or("");
                        (f["room"] == room && matches!(op, "msg" | "gap" | "synced" | "more"))
                            || (op == "error"
                                && (f.get("ref").is_none_or(Value::is_null) || f["room"] == room))
                    },
                    remaining,
                )
                .await
                .with_context(|| format!("sub {room}: waiting for synced"))?;
            match f["op"].as_str() {
                Some("synced") => return Ok(Subscribed { frames, synced: f }),
                // A replay in pieces: continue from where this one ended, as clients do.
                Some("more") => {
                    let next = json!({"op": "sub", "room": room, "since": f["cursor"]});
                    self.send_json(&next).await?;
                }
                Some("error") => anyhow::bail!("sub {room}: server answered {f}"),
                _ => frames.push(f),
            }
        }
    }

    /// `unsub` (no answer is expected by the protocol).
    pub async fn unsub(&mut self, room: &str) -> Result<()> {
        self.send_json(&json!({"op": "unsub", "room": room})).await
    }

    /// Publish `body` to `room` with a fresh `ref` and return the frame answering it:
    /// the `ack`, or the `error` with that ref.
    pub async fn publish_result(
        &mut self,
        room: &str,
        body: Value,
        timeout: Duration,
    ) -> Result<Value> {
        self.next_ref += 1;
        let r = format!("t{}", self.next_ref);
        self.send_json(&json!({"op": "pub", "room": room, "body": body, "ref": r}))
            .await?;
        self.recv_until(
            |f| f["ref"] == r.as_str() && matches!(f["op"].as_str(), Some("ack" | "error")),
            timeout,
        )
        .await
        .with_context(|| format!("pub to {room} (ref {r}): waiting for the ack"))
    }

    /// Publish and expect an `ack`; returns it (`origin`, `offset` are in it). An `error`
    /// answer is an error naming its code.
    pub async fn publish(&mut self, room: &str, body: Value, timeout: Duration) -> Result<Value> {
        let f = self.publish_result(room, body, timeout).await?;
        anyhow::ensure!(f["op"] == "ack", "pub to {room} refused: {f}");
        Ok(f)
    }

    /// Send `ping` and wait for `pong`.
    pub async fn ping(&mut self, timeout: Duration) -> Result<()> {
        self.send_json(&json!({"op": "ping"})).await?;
        self.recv_until(|f| f["op"] == "pong", timeout).await?;
        Ok(())
    }

    /// Close the connection politely (close frame, then wait briefly for the server's).
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }

    async fn next_incoming(&mut self, deadline: Instant) -> Result<Incoming> {
        if let Some((code, reason)) = &self.closed {
            return Ok(Incoming::Closed(*code, reason.clone()));
        }
        loop {
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Ok(Incoming::TimedOut),
                Ok(next) => next,
            };
            let closed = |code: u16, reason: String| (code, reason);
            let c = match next {
                None => closed(1006, "connection ended without a close frame".into()),
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
                    closed(1006, "connection closed".into())
                }
                Some(Err(WsError::Protocol(e))) => closed(1006, format!("protocol: {e}")),
                Some(Err(WsError::Io(e))) => closed(1006, format!("io: {e}")),
                Some(Err(e)) => return Err(e).with_context(|| format!("receive on {}", self.url)),
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).with_context(|| {
                        let text: String = t.as_str().chars().take(300).collect();
                        format!("{}: text frame is not JSON: {text}", self.url)
                    })?;
                    return Ok(Incoming::Json(v));
                }
                Some(Ok(Message::Binary(b))) => {
                    anyhow::bail!("{}: unexpected binary frame ({} bytes)", self.url, b.len())
                }
                Some(Ok(Message::Close(frame))) => match frame {
                    Some(f) => closed(u16::from(f.code), f.reason.as_str().to_string()),
                    None => closed(1005, String::new()),
                },
                Some(Ok(_)) => continue, // ping / pong / raw frame
            };
            self.closed = Some(c.clone());
            return Ok(Incoming::Closed(c.0, c.1));
        }
    }

    fn backlog_summary(&self) -> String {
        if self.backlog.is_empty() {
            return "none".into();
        }
        let mut s: Vec<String> = self.backlog.iter().take(10).map(short).collect();
        if self.backlog.len() > 10 {
            s.push(format!("... and {} more", self.backlog.len() - 10));
        }
        s.join(", ")
    }
}

/// A frame as text, cut to 200 characters.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() <= 200 {
        return s;
    }
    let mut cut: String = s.chars().take(200).collect();
    cut.push_str("...");
    cut
}

/// A replication watermark frame (`{"op":"wm",...}`, docs/PROTOCOL.md).
pub fn is_watermark(frame: &Value) -> bool {
    frame["op"] == "wm"
}
