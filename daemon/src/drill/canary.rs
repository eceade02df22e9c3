//! A canary player: one WebSocket connection that subscribes to every room of the drill,
//! publishes numbered messages into them round-robin, and tells the [`Checker`] what was
//! acked and what arrived. When its connection fails it moves to the next URL on its list
//! (the other daemons of its region, then the other regions) and resubscribes every room
//! with its cursor, as a real client does; the time from losing the connection to every
//! room being `synced` again is its *resume time*.
//!
//! Driving: [`Canary::run`] until `stop` is cancelled; publishing stops when `publishing`
//! is cancelled (the drill then waits for the last messages to arrive).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::checker::Checker;

/// Pause between two connection attempts.
const RETRY: Duration = Duration::from_millis(250);
/// A connection attempt that takes longer has failed.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// Subscribing every room may take this long, plus [`SYNC_PER_ROOM`] per room.
const SYNC_BASE: Duration = Duration::from_secs(5);
const SYNC_PER_ROOM: Duration = Duration::from_millis(50);
/// How long the first connection may take to succeed (the federation may still be
/// settling when a drill starts).
const FIRST_CONNECT: Duration = Duration::from_secs(60);

/// What a canary reports when it stops.
#[derive(Debug, Default)]
pub struct CanaryReport {
    pub name: String,
    pub published: u64,
    pub acked: u64,
    /// `error` answers to publishes, by code.
    pub publish_errors: BTreeMap<String, u64>,
    /// Resume times (connection lost → every room synced again), milliseconds.
    pub resumes_ms: Vec<u64>,
    /// The URL it was on at the end.
    pub last_url: String,
    /// Publish → delivery time of every drill message it received (ms; all canaries share
    /// the drill's clock, so other regions' messages count too).
    pub delivery_ms: Vec<u64>,
}

/// One canary player.
pub struct Canary {
    pub name: String,
    /// Its region's URLs first, then the other regions'.
    pub urls: Vec<String>,
    pub rooms: Vec<String>,
    /// Publishes per second.
    pub rate: f64,
    pub run_id: String,
    /// Milliseconds since the drill started, for the checker's clock.
    pub epoch: Instant,
    pub checker: Arc<Mutex<Checker>>,
    /// Publishes sent and not answered yet, over every canary: the drill judges only once
    /// this is 0, or a late ack would name a message nobody waited for.
    pub in_flight: Arc<AtomicI64>,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl Canary {
    /// Connects and subscribes; resolves when every room is synced the first time, then
    /// keeps running in the returned task, which publishes once `go` is cancelled (when
    /// every canary is subscribed: a message published before a canary subscribed would
    /// never reach it, and count as lost).
    pub async fn start(
        self,
        go: CancellationToken,
        publishing: CancellationToken,
        stop: CancellationToken,
    ) -> anyhow::Result<tokio::task::JoinHandle<CanaryReport>> {
        let mut cursors: HashMap<String, Value> = HashMap::new();
        let mut url_idx = 0;
        let started = Instant::now();
        let ws = loop {
            match self.connect_and_sync(&mut url_idx, &mut cursors).await {
                Ok(ws) => break ws,
                Err(e) if started.elapsed() < FIRST_CONNECT => {
                    tracing::info!(canary = %self.name, error = %e, "not connected yet; retrying");
                    tokio::time::sleep(RETRY).await;
                }
                Err(e) => anyhow::bail!("canary {}: {e:#}", self.name),
            }
        };
        Ok(tokio::spawn(
            self.run(ws, url_idx, cursors, go, publishing, stop),
        ))
    }

    async fn run(
        self,
        mut ws: Ws,
        mut url_idx: usize,
        mut cursors: HashMap<String, Value>,
        go: CancellationToken,
        publishing: CancellationToken,
        stop: CancellationToken,
    ) -> CanaryReport {
        let mut report = CanaryReport {
            name: self.name.clone(),
            ..CanaryReport::default()
        };
        // Nobody publishes before every canary listens (no frames arrive meanwhile).
        tokio::select! {
            () = go.cancelled() => {}
            () = stop.cancelled() => {}
        }
        let period = Duration::from_secs_f64(1.0 / self.rate.max(0.1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq: u64 = 0;
        let mut pending: HashMap<String, String> = HashMap::new();
        'connection: loop {
            loop {
                tokio::select! {
                    () = stop.cancelled() => break 'connection,
                    _ = tick.tick(), if !publishing.is_cancelled() => {
                        let room = &self.rooms[(seq as usize) % self.rooms.len()];
                        let reference = format!("{}", seq);
                        let frame = json!({
                            "op": "pub", "room": room, "ref": reference,
                            "body": {
                                "drill": self.run_id, "from": self.name, "seq": seq,
                                "t": self.epoch.elapsed().as_millis() as u64,
                            },
                        });
                        seq += 1;
                        if ws.send(Message::text(frame.to_string())).await.is_err() {
                            break;
                        }
                        report.published += 1;
                        self.in_flight.fetch_add(1, Ordering::SeqCst);
                        pending.insert(reference, room.clone());
                    }
                    incoming = ws.next() => match incoming {
                        Some(Ok(Message::Text(text))) => {
                            let Ok(f) = serde_json::from_str::<Value>(&text) else { continue };
                            self.on_frame(&f, &mut cursors, &mut pending, &mut report);
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    },
                }
            }
            // The connection is gone: what was in flight will never be answered here.
            self.in_flight
                .fetch_sub(pending.len() as i64, Ordering::SeqCst);
            pending.clear();
            let lost_at = Instant::now();
            tracing::info!(canary = %self.name, url = %self.urls[url_idx], "connection lost; moving on");
            url_idx = (url_idx + 1) % self.urls.len();
            loop {
                if stop.is_cancelled() {
                    break 'connection;
                }
                match self.connect_and_sync(&mut url_idx, &mut cursors).await {
                    Ok(new) => {
                        ws = new;
                        report.resumes_ms.push(lost_at.elapsed().as_millis() as u64);
                        tracing::info!(canary = %self.name, url = %self.urls[url_idx], "resumed");
                        continue 'connection;
                    }
                    Err(e) => {
                        tracing::debug!(canary = %self.name, error = %e, "reconnect failed");
                        url_idx = (url_idx + 1) % self.urls.len();
                        tokio::time::sleep(RETRY).await;
                    }
                }
            }
        }
        self.in_flight
            .fetch_sub(pending.len() as i64, Ordering::SeqCst);
        let _ = ws.close(None).await;
        report.last_url = self.urls[url_idx].clone();
        report
    }

    /// Connects to `urls[*url_idx]` and subscribes every room from its cursor (live only the
    /// first time), feeding the checker what the replays bring.
    async fn connect_and_sync(
        &self,
        url_idx: &mut usize,
        cursors: &mut HashMap<String, Value>,
    ) -> anyhow::Result<Ws> {
        let url = format!("{}?name={}", self.urls[*url_idx], self.name);
        let (mut ws, _) =
            tokio::time::timeout(STEP_TIMEOUT, tokio_tungstenite::connect_async(&url))
                .await
                .map_err(|_| anyhow::anyhow!("{url}: no connection within {STEP_TIMEOUT:?}"))??;
        for room in &self.rooms {
            let mut sub = json!({"op": "sub", "room": room});
            if let Some(c) = cursors.get(room) {
                sub["since"] = c.clone();
            }
            ws.send(Message::text(sub.to_string())).await?;
        }
        let mut waiting: std::collections::HashSet<&str> =
            self.rooms.iter().map(String::as_str).collect();
        let sync_for = SYNC_BASE + SYNC_PER_ROOM * self.rooms.len() as u32;
        let deadline = Instant::now() + sync_for;
        let mut unused = HashMap::new();
        let mut report = CanaryReport::default();
        while !waiting.is_empty() {
            let next = tokio::time::timeout_at(deadline, ws.next())
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "{url}: {} rooms not synced within {STEP_TIMEOUT:?}",
                        waiting.len()
                    )
                })?;
            let text = match next {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => anyhow::bail!("{url}: closed while subscribing"),
            };
            let Ok(f) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            match f["op"].as_str() {
                Some("synced") => {
                    let room = f["room"].as_str().unwrap_or_default();
                    if let Some(r) = waiting.take(room) {
                        cursors.insert(r.to_owned(), f["cursor"].clone());
                    }
                }
                Some("more") => {
                    // A long replay comes in pieces: ask for the next one from where it
                    // stopped.
                    let room = f["room"].as_str().unwrap_or_default();
                    cursors.insert(room.to_owned(), f["cursor"].clone());
                    let sub = json!({"op": "sub", "room": room, "since": f["cursor"]});
                    ws.send(Message::text(sub.to_string())).await?;
                }
                Some("error") if f.get("ref").is_none_or(Value::is_null) => {
                    anyhow::bail!("{url}: {f}");
                }
                _ => self.on_frame(&f, cursors, &mut unused, &mut report),
            }
        }
        Ok(ws)
    }

    fn on_frame(
        &self,
        f: &Value,
        cursors: &mut HashMap<String, Value>,
        pending: &mut HashMap<String, String>,
        report: &mut CanaryReport,
    ) {
        let at = self.epoch.elapsed().as_millis() as u64;
        let room = f["room"].as_str().unwrap_or_default();
        let mut checker = self.checker.lock().unwrap_or_else(PoisonError::into_inner);
        match f["op"].as_str() {
            Some("msg") => {
                let (Some(origin), Some(offset)) = (f["origin"].as_str(), f["offset"].as_i64())
                else {
                    return;
                };
                checker.delivered(&self.name, room, origin, offset, at);
                advance(cursors, room, origin, offset);
                if f["body"]["drill"] == self.run_id.as_str() {
                    if let Some(sent) = f["body"]["t"].as_u64() {
                        report.delivery_ms.push(at.saturating_sub(sent));
                    }
                }
            }
            Some("gap") => {
                checker.gap(&self.name, room);
                if let (Some(origin), Some(to)) = (f["origin"].as_str(), f["to"].as_i64()) {
                    advance(cursors, room, origin, to);
                }
            }
            Some("ack") => {
                let reference = f["ref"].as_str().unwrap_or_default();
                let Some(room) = pending.remove(reference) else {
                    return;
                };
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                if let (Some(origin), Some(offset)) = (f["origin"].as_str(), f["offset"].as_i64()) {
                    checker.acked(&room, origin, offset, at);
                    report.acked += 1;
                }
            }
            Some("error") => {
                if let Some(reference) = f["ref"].as_str() {
                    if pending.remove(reference).is_some() {
                        self.in_flight.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let code = f["code"].as_str().unwrap_or("?").to_owned();
                *report.publish_errors.entry(code).or_default() += 1;
            }
            _ => {}
        }
    }
}

/// Moves `room`'s cursor for `origin` up to `offset`.
fn advance(cursors: &mut HashMap<String, Value>, room: &str, origin: &str, offset: i64) {
    let cursor = cursors.entry(room.to_owned()).or_insert_with(|| json!({}));
    if !cursor.is_object() {
        *cursor = json!({});
    }
    let cur = cursor[origin].as_i64();
    if cur.is_none_or(|c| c < offset) {
        cursor[origin] = json!(offset);
    }
}
