//! The Redis bus: Lua for the atomic fan-out step, Pub/Sub for live delivery.
//!
//! # Keys
//!
//! Every key of a room carries the room in a hash tag, so a room's keys live in one Redis
//! Cluster slot and one script can touch them all:
//!
//! | key | type | what |
//! | --- | --- | --- |
//! | `<prefix>:{<room>}:h` | list | hot history: each entry is the `msg` frame exactly as it goes on the wire ([`MsgFrame::to_json`]), oldest first |
//! | `<prefix>:{<room>}:t` | hash | origin → last offset applied (the room's tails; no TTL, never trimmed) |
//! | `<prefix>:{<room>}:c` | channel | live `msg` frames |
//!
//! # The apply script
//!
//! One `EVALSHA` applies one room's records, in order (the script is loaded on `NOSCRIPT`,
//! e.g. after a Redis restart). Rust serializes each frame once with `"prev":null` and splits
//! it around the `null`; the script only splices `prev` in, so Lua never decodes or
//! re-encodes a body and the stored and published text is byte-identical to
//! [`MsgFrame::to_json`]. Atomically, for each record of the call, the script:
//!
//! 1. reads `last = HGET t origin`; if `offset <= last` the record was applied before (a new
//!    owner replaying) and its result is `"x"`: nothing written, nothing published;
//! 2. `HSET t origin offset`;
//! 3. `RPUSH h frame` (frame = prefix .. (last or "null") .. suffix), `LTRIM` to the last
//!    `max_messages` when the list is longer;
//! 4. `PUBLISH c frame`; its result is `last` (`""` when there was none);
//!
//! then, once per call, trims by age from the head (below) and `PEXPIRE h max_age`.
//!
//! [`Bus::apply_batch`] (the fan-out owner's hot path) groups a batch by room and sends one
//! such call per room, all in **one pipeline**: one write and one read for the whole batch
//! instead of a round trip per record. Measured at 5,000 msg/s over 100 rooms this is what
//! keeps the bus step off the delivery latency (docs/BENCHMARKS.md). A room's records are in
//! one script, so whatever fails, what was applied of a room is a prefix of its records, as
//! the trait's contract asks.
//!
//! # Age trimming
//!
//! No second structure: the list entries are the wire frames, and `"ts":` is the sixth field,
//! after `op`, `room`, `origin`, `offset` and `prev`, none of which can contain an unescaped
//! `"ts":` (room ids have no quotes; the origin is a JSON-escaped string). So the script reads
//! the head's timestamp with `string.match(head, '"ts":(%-?%d+)')`, which stops within the
//! first ~200 bytes, and `LPOP`s while the head is older than `now - max_age` (an unreadable
//! head is dropped too). In the common case that is one `LINDEX` per apply. Trimming from the
//! head only is exact when timestamps grow along the list; an older message behind a newer
//! head (a lagging mirror) stays until the head passes, so [`Bus::history`] also filters by
//! age when it reads. `PEXPIRE h max_age` after each write drops the list of a room that has
//! been quiet for `max_age` altogether. `t` has no TTL: tails survive every trimming.
//!
//! # Live delivery
//!
//! One dedicated Pub/Sub connection per bus, split into its sink (SUBSCRIBE/UNSUBSCRIBE,
//! awaited until Redis confirms) and its stream (read by one subscriber task). The bus keeps
//! the set of rooms it should be subscribed to. When the connection fails (stream ends, or a
//! keepalive PING every 5 s gets no answer within 3 s) the task reconnects with backoff
//! (50 ms doubling to 2 s), SUBSCRIBEs every recorded room, installs the new connection and
//! THEN emits [`BusEvent::Resync`]. A [`Bus::subscribe`] while disconnected records the room
//! and waits (up to 5 s) for that reconnect; an [`Bus::unsubscribe`] while disconnected only
//! records it.
//!
//! The events channel is bounded ([`EVENTS_CAPACITY`]). The subscriber never waits on it: the
//! redis crate buffers Pub/Sub messages in an unbounded queue, so blocking there would only
//! move an unbounded backlog into memory. When the channel is full the subscriber drops live
//! messages (they are in the hot history already: PUBLISH comes after RPUSH in the same
//! script), and as soon as there is room it emits [`BusEvent::Resync`] before anything else,
//! exactly as after a lost connection: sessions backfill from history, nothing is lost
//! silently.
//!
//! # Shutdown
//!
//! The subscriber task ends when [`RedisBus::shutdown`] is called, when the token given to
//! [`RedisBus::connect_with_shutdown`] fires, when the last clone of the bus is dropped, or
//! when the [`BusEvents`] receiver is dropped; its end closes the events channel. Commands
//! (`apply`, `history`, `tails`, `ping`) keep working after shutdown, so fan-out owners can
//! drain; `subscribe` and `unsubscribe` return [`BusError::Closed`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use dtfed_proto::record::now_ms;
use dtfed_proto::{Cursor, LogRecord, MsgFrame, OriginMark, RoomId};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use redis::{ErrorKind, RedisError, ServerErrorKind};
use tokio::sync::{mpsc, watch};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::{
    claim_value, mark_value, parse_claim, parse_mark, Bus, BusError, BusEvents, PartitionMark,
    PublishClaim, PublishKey, PublishOutcome,
};
use crate::bus::redis::frame::encode_frame;
use crate::bus::redis::subscriber::{open_pubsub, run_subscriber};
use crate::config::{HistoryConfig, RedisConfig};

mod frame;
mod subscriber;

/// Capacity of the events channel handed out by [`RedisBus::connect`].
pub const EVENTS_CAPACITY: usize = 65_536;

/// How long `subscribe` waits for the Pub/Sub connection to come back.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(5);
/// Reconnect backoff of the subscriber.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Opening a connection (TCP + handshake).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A command's reply.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// The subscriber pings its connection this often, so a silently dead link is noticed.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);
/// Channels per SUBSCRIBE when re-subscribing after a reconnect.
const RESUBSCRIBE_CHUNK: usize = 1000;
/// Longest `max_age` handed to Redis, in ms (PEXPIRE refuses values that overflow).
const MAX_AGE_CAP_MS: i64 = 1 << 52;

/// The atomic fan-out step for one room's records, in order. See the module docs.
///
/// KEYS: 1 = history list, 2 = tails hash.
/// ARGV: 1 = channel, 2 = max_messages, 3 = max_age_ms, 4 = cutoff_ms (now - max_age),
///       then per record 4 values: origin, offset, frame text before prev, after prev.
/// Returns one string per record: `"x"` (applied before), `""` (no prev) or prev.
/// Offsets are compared as Lua numbers (doubles): exact up to 2^53, which a Kafka offset
/// does not reach (285 years at a million records a second).
const APPLY_LUA: &str = r#"
local max = tonumber(ARGV[2])
local out = {}
local wrote = false
for b = 5, #ARGV, 4 do
  local last = redis.call('HGET', KEYS[2], ARGV[b])
  if last and tonumber(ARGV[b + 1]) <= tonumber(last) then
    out[#out + 1] = 'x'
  else
    redis.call('HSET', KEYS[2], ARGV[b], ARGV[b + 1])
    local frame = ARGV[b + 2] .. (last or 'null') .. ARGV[b + 3]
    local len = redis.call('RPUSH', KEYS[1], frame)
    if len > max then
      redis.call('LTRIM', KEYS[1], len - max, -1)
    end
    redis.call('PUBLISH', ARGV[1], frame)
    out[#out + 1] = last or ''
    wrote = true
  end
end
if wrote then
  local cutoff = tonumber(ARGV[4])
  while true do
    local head = redis.call('LINDEX', KEYS[1], 0)
    if not head then break end
    local ts = tonumber(string.match(head, '"ts":(%-?%d+)'))
    if ts and ts >= cutoff then break end
    redis.call('LPOP', KEYS[1])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return out
"#;

/// Claims an idempotent publish (see [`Bus::claim_publish`]).
///
/// KEYS: 1 = the claim. ARGV: 1 = now_ms, 2 = stale_ms, 3 = window_ms.
/// Returns what was there (`""` for nothing): `a<offset>` stored, `p<ms>` pending since, or
/// `"i"` for a pending claim younger than stale_ms (left as it is).
const CLAIM_LUA: &str = r#"
local v = redis.call('GET', KEYS[1])
if v then
  local kind = string.sub(v, 1, 1)
  local n = tonumber(string.sub(v, 2))
  if kind == 'a' and n then return v end
  if kind == 'p' and n and tonumber(ARGV[1]) - n < tonumber(ARGV[2]) then return 'i' end
end
redis.call('SET', KEYS[1], 'p' .. ARGV[1], 'PX', ARGV[3])
return v or ''
"#;

/// Records per script call at most (a hot room's share of a batch is split over several
/// calls of the same pipeline, which keeps each Lua run short).
const RECORDS_PER_CALL: usize = 64;

/// Key and channel names of rooms.
#[derive(Clone, Debug)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn history(&self, room: &RoomId) -> String {
        format!("{}:{{{}}}:h", self.prefix, room)
    }

    fn tails(&self, room: &RoomId) -> String {
        format!("{}:{{{}}}:t", self.prefix, room)
    }

    fn channel(&self, room: &RoomId) -> String {
        format!("{}:{{{}}}:c", self.prefix, room)
    }

    /// A publish claim: the player's name is length-prefixed, so no name and ref pair can
    /// spell another's key.
    fn publish(&self, key: &PublishKey) -> String {
        format!(
            "{}:{{{}}}:p:{:016x}:{}:{}:{}",
            self.prefix,
            key.room,
            key.body,
            key.player.len(),
            key.player,
            key.reference
        )
    }

    /// A mirror partition's replication watermark. All under one hash tag, so one `MGET`
    /// reads them all on a cluster too.
    fn watermark(&self, origin: &str, partition: i32) -> String {
        format!("{}:{{wm}}:{}:{}", self.prefix, origin, partition)
    }

    /// The room part of a channel name, for logs.
    fn room_of_channel<'a>(&self, channel: &'a str) -> &'a str {
        channel
            .strip_prefix(self.prefix.as_str())
            .and_then(|c| c.strip_prefix(":{"))
            .and_then(|c| c.strip_suffix("}:c"))
            .unwrap_or(channel)
    }
}

/// The production bus. Cheap to clone; the subscriber task stops when the last clone is
/// dropped (or on [`RedisBus::shutdown`]).
#[derive(Clone)]
pub struct RedisBus {
    inner: Arc<Inner>,
}

struct Inner {
    con: ConnectionManager,
    keys: Keys,
    script: redis::Script,
    claim: redis::Script,
    max_messages: usize,
    max_age_ms: i64,
    sub: Arc<SubShared>,
    shutdown: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What the bus handle and the subscriber task share.
struct SubShared {
    state: Mutex<SubState>,
    /// Generation of the installed Pub/Sub connection; bumped after every room recorded in
    /// `state.rooms` at that moment is subscribed on it.
    installed: watch::Sender<u64>,
}

struct SubState {
    /// Channels this bus should be subscribed to.
    channels: HashSet<String>,
    /// The live connection's sink, `None` while reconnecting.
    sink: Option<PubSubSink>,
    generation: u64,
}

impl SubShared {
    fn lock(&self) -> MutexGuard<'_, SubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RedisBus {
    /// Connects the command connection and the Pub/Sub connection and starts the subscriber.
    /// Fails when Redis cannot be reached now; after that, both connections reconnect by
    /// themselves.
    pub async fn connect(
        cfg: &RedisConfig,
        history: &HistoryConfig,
    ) -> Result<(RedisBus, BusEvents), BusError> {
        Self::connect_with_shutdown(cfg, history, CancellationToken::new()).await
    }

    /// [`RedisBus::connect`], with live delivery stopping when `shutdown` fires.
    pub async fn connect_with_shutdown(
        cfg: &RedisConfig,
        history: &HistoryConfig,
        shutdown: CancellationToken,
    ) -> Result<(RedisBus, BusEvents), BusError> {
        let client = redis::Client::open(cfg.url.as_str())
            .map_err(|e| BusError::Redis(format!("redis url {:?}: {e}", cfg.url_redacted())))?;
        let manager_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_max_delay(BACKOFF_MAX);
        let con = client
            .get_connection_manager_with_config(manager_cfg)
            .await
            .map_err(|e| redis_err("connecting", e))?;
        let keys = Keys {
            prefix: cfg.key_prefix.clone(),
        };
        let (tx, rx) = mpsc::channel(EVENTS_CAPACITY);
        let (installed, _) = watch::channel(0);
        let sub = Arc::new(SubShared {
            state: Mutex::new(SubState {
                channels: HashSet::new(),
                sink: None,
                generation: 0,
            }),
            installed,
        });
        let first = open_pubsub(&client, &sub)
            .await
            .map_err(|e| BusError::Redis(format!("pub/sub connection: {e}")))?;
        let shutdown = shutdown.child_token();
        tokio::spawn(run_subscriber(
            client,
            sub.clone(),
            keys.clone(),
            tx,
            shutdown.clone(),
            first,
        ));
        let max_age_ms = i64::try_from(history.max_age_secs.saturating_mul(1000))
            .unwrap_or(i64::MAX)
            .min(MAX_AGE_CAP_MS);
        let bus = RedisBus {
            inner: Arc::new(Inner {
                con,
                keys,
                script: redis::Script::new(APPLY_LUA),
                claim: redis::Script::new(CLAIM_LUA),
                max_messages: history.max_messages,
                max_age_ms,
                sub,
                shutdown,
            }),
        };
        Ok((bus, rx))
    }

    /// Stops live delivery: the subscriber task ends and the events channel closes. Commands
    /// keep working (fan-out owners drain after shutdown).
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    fn cutoff(&self) -> i64 {
        now_ms().saturating_sub(self.inner.max_age_ms)
    }

    /// Runs the pipeline of apply calls; loads the script once if Redis lost it.
    async fn eval_apply(&self, pipe: &redis::Pipeline) -> Result<Vec<Vec<String>>, RedisError> {
        let mut con = self.inner.con.clone();
        match pipe.query_async(&mut con).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.inner.script.load_async(&mut con).await?;
                pipe.query_async(&mut con).await
            }
            other => other,
        }
    }

    /// One script call's arguments for `recs` (all of one room, in order).
    fn apply_call(&self, room: &RoomId, recs: &[&LogRecord]) -> Result<redis::Cmd, BusError> {
        let inner = &*self.inner;
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(inner.script.get_hash())
            .arg(2)
            .arg(inner.keys.history(room))
            .arg(inner.keys.tails(room))
            .arg(inner.keys.channel(room))
            .arg(inner.max_messages)
            .arg(inner.max_age_ms)
            .arg(self.cutoff());
        for rec in recs {
            let frame = encode_frame(rec).map_err(|e| BusError::Corrupt {
                room: rec.room.to_string(),
                detail: format!("cannot encode the message: {e}"),
            })?;
            let (before, after) = frame.split();
            cmd.arg(&rec.origin).arg(rec.offset).arg(before).arg(after);
        }
        Ok(cmd)
    }
}

/// What the script said for one record: `None` applied before, else the message as
/// published with its `prev`.
fn applied(rec: &LogRecord, reply: &str) -> Result<Option<MsgFrame>, BusError> {
    match reply {
        "x" => Ok(None),
        "" => Ok(Some(rec.to_msg(None))),
        prev => {
            let prev = prev.parse::<i64>().map_err(|_| BusError::Corrupt {
                room: rec.room.to_string(),
                detail: format!("tail of origin {:?} is {prev:?}", rec.origin),
            })?;
            Ok(Some(rec.to_msg(Some(prev))))
        }
    }
}

#[async_trait]
impl Bus for RedisBus {
    async fn apply(&self, rec: &LogRecord) -> Result<Option<MsgFrame>, BusError> {
        let mut out = self.apply_batch(std::slice::from_ref(rec)).await?;
        out.pop().ok_or_else(|| BusError::Corrupt {
            room: rec.room.to_string(),
            detail: "the apply script returned nothing".into(),
        })
    }

    async fn apply_batch(&self, recs: &[LogRecord]) -> Result<Vec<Option<MsgFrame>>, BusError> {
        if recs.is_empty() {
            return Ok(Vec::new());
        }
        // Group by room, keeping each room's records in the order given; remember where
        // each record's answer lands.
        let mut by_room: Vec<(&RoomId, Vec<usize>)> = Vec::new();
        let mut slot: HashMap<&RoomId, usize> = HashMap::new();
        for (i, rec) in recs.iter().enumerate() {
            let k = *slot.entry(&rec.room).or_insert_with(|| {
                by_room.push((&rec.room, Vec::new()));
                by_room.len() - 1
            });
            by_room[k].1.push(i);
        }
        let mut pipe = redis::pipe();
        let mut calls: Vec<&[usize]> = Vec::new();
        for (room, idx) in &by_room {
            for chunk in idx.chunks(RECORDS_PER_CALL) {
                let chunk_recs: Vec<&LogRecord> = chunk.iter().map(|&i| &recs[i]).collect();
                pipe.add_command(self.apply_call(room, &chunk_recs)?);
                calls.push(chunk);
            }
        }
        let replies = self.eval_apply(&pipe).await.map_err(|e| {
            tracing::debug!(records = recs.len(), rooms = by_room.len(), error = %e, "apply failed");
            redis_err(&format!("apply of {} records", recs.len()), e)
        })?;
        if replies.len() != calls.len() {
            return Err(BusError::Redis(format!(
                "apply: {} replies to {} script calls",
                replies.len(),
                calls.len()
            )));
        }
        let mut out: Vec<Option<MsgFrame>> = vec![None; recs.len()];
        for (chunk, reply) in calls.iter().zip(&replies) {
            if reply.len() != chunk.len() {
                return Err(BusError::Redis(format!(
                    "apply: {} results for {} records of one room",
                    reply.len(),
                    chunk.len()
                )));
            }
            for (&i, r) in chunk.iter().zip(reply) {
                out[i] = applied(&recs[i], r)?;
            }
        }
        Ok(out)
    }

    async fn history(&self, room: &RoomId) -> Result<Vec<MsgFrame>, BusError> {
        let mut con = self.inner.con.clone();
        let entries: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(self.inner.keys.history(room))
            .arg(0)
            .arg(-1)
            .query_async(&mut con)
            .await
            .map_err(|e| redis_err(&format!("history of room {room}"), e))?;
        let cutoff = self.cutoff();
        let mut out = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let msg: MsgFrame = serde_json::from_slice(entry).map_err(|e| {
                tracing::error!(%room, index = i, error = %e, "corrupt hot history entry");
                BusError::Corrupt {
                    room: room.to_string(),
                    detail: format!("entry {i}: {e}"),
                }
            })?;
            if msg.room != *room {
                return Err(BusError::Corrupt {
                    room: room.to_string(),
                    detail: format!("entry {i} belongs to room {}", msg.room),
                });
            }
            if msg.ts >= cutoff {
                out.push(msg);
            }
        }
        Ok(out)
    }

    async fn tails(&self, room: &RoomId) -> Result<Cursor, BusError> {
        let mut con = self.inner.con.clone();
        let raw: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.inner.keys.tails(room))
            .query_async(&mut con)
            .await
            .map_err(|e| redis_err(&format!("tails of room {room}"), e))?;
        let mut tails = BTreeMap::new();
        for (origin, offset) in raw {
            let offset = offset.parse::<i64>().map_err(|_| BusError::Corrupt {
                room: room.to_string(),
                detail: format!("tail of origin {origin:?} is {offset:?}"),
            })?;
            tails.insert(origin, offset);
        }
        Ok(Cursor(tails))
    }

    async fn subscribe(&self, room: &RoomId) -> Result<(), BusError> {
        let inner = &*self.inner;
        if inner.shutdown.is_cancelled() {
            return Err(BusError::Closed);
        }
        let deadline = Instant::now() + SUBSCRIBE_WAIT;
        let channel = inner.keys.channel(room);
        // Subscribe to `installed` before reading the generation, so no install is missed.
        let mut installed = inner.sub.installed.subscribe();
        let (sink, generation) = {
            let mut st = inner.sub.lock();
            st.channels.insert(channel.clone());
            (st.sink.clone(), st.generation)
        };
        if let Some(mut sink) = sink {
            match tokio::time::timeout_at(deadline, sink.subscribe(&channel)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => {
                    tracing::debug!(%room, error = %e, "subscribe failed; waiting for the pub/sub reconnect");
                }
                Err(_) => {
                    tracing::debug!(%room, "subscribe unanswered; waiting for the pub/sub reconnect");
                }
            }
        }
        // The subscriber subscribes every recorded channel before it installs a connection,
        // so any installation after the one we saw covers this room.
        let waited = tokio::select! {
            _ = inner.shutdown.cancelled() => return Err(BusError::Closed),
            r = tokio::time::timeout_at(deadline, async {
                installed.wait_for(|g| *g > generation).await.map(|_| ())
            }) => r,
        };
        match waited {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(BusError::Closed),
            Err(_) => {
                inner.sub.lock().channels.remove(&channel);
                tracing::warn!(%room, "subscribe gave up: no pub/sub connection to Redis");
                Err(BusError::Redis(format!(
                    "subscribe to room {room}: not connected to Redis within {}s",
                    SUBSCRIBE_WAIT.as_secs()
                )))
            }
        }
    }

    async fn unsubscribe(&self, room: &RoomId) -> Result<(), BusError> {
        let inner = &*self.inner;
        if inner.shutdown.is_cancelled() {
            return Err(BusError::Closed);
        }
        let channel = inner.keys.channel(room);
        let sink = {
            let mut st = inner.sub.lock();
            st.channels.remove(&channel);
            st.sink.clone()
        };
        // Disconnected or failing: the reconnect will not subscribe the room again.
        if let Some(mut sink) = sink {
            match timeout(COMMAND_TIMEOUT, sink.unsubscribe(&channel)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%room, error = %e, "unsubscribe failed; dropped on reconnect");
                }
                Err(_) => tracing::debug!(%room, "unsubscribe unanswered; dropped on reconnect"),
            }
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), BusError> {
        let mut con = self.inner.con.clone();
        let _: redis::Value = redis::cmd("PING")
            .query_async(&mut con)
            .await
            .map_err(|e| redis_err("ping", e))?;
        Ok(())
    }

    async fn claim_publish(
        &self,
        key: &PublishKey,
        now_ms: i64,
        stale_ms: i64,
        window_ms: i64,
    ) -> Result<PublishClaim, BusError> {
        let mut con = self.inner.con.clone();
        let previous: String = self
            .inner
            .claim
            .key(self.inner.keys.publish(key))
            .arg(now_ms)
            .arg(stale_ms)
            .arg(window_ms.max(1))
            .invoke_async(&mut con)
            .await
            .map_err(|e| redis_err(&format!("claiming a publish in room {}", key.room), e))?;
        Ok(match previous.as_str() {
            "" => PublishClaim::Fresh,
            "i" => PublishClaim::InFlight,
            v => parse_claim(Some(v), now_ms, stale_ms),
        })
    }

    async fn settle_publish(
        &self,
        key: &PublishKey,
        outcome: PublishOutcome,
        window_ms: i64,
    ) -> Result<(), BusError> {
        let mut con = self.inner.con.clone();
        let name = self.inner.keys.publish(key);
        let done: Result<(), RedisError> = match claim_value(outcome) {
            Some(v) => {
                redis::cmd("SET")
                    .arg(&name)
                    .arg(v)
                    .arg("PX")
                    .arg(window_ms.max(1))
                    .query_async(&mut con)
                    .await
            }
            None => redis::cmd("DEL").arg(&name).query_async(&mut con).await,
        };
        done.map_err(|e| redis_err(&format!("settling a publish in room {}", key.room), e))
    }

    async fn put_watermarks(&self, marks: &[PartitionMark], ttl_ms: i64) -> Result<(), BusError> {
        if marks.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for m in marks {
            pipe.cmd("SET")
                .arg(self.inner.keys.watermark(&m.origin, m.partition))
                .arg(mark_value(&m.mark))
                .arg("PX")
                .arg(ttl_ms.max(1))
                .ignore();
        }
        let mut con = self.inner.con.clone();
        pipe.query_async::<()>(&mut con)
            .await
            .map_err(|e| redis_err("publishing replication watermarks", e))
    }

    async fn watermarks(
        &self,
        keys: &[(String, i32)],
    ) -> Result<Vec<Option<OriginMark>>, BusError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<String> = keys
            .iter()
            .map(|(o, p)| self.inner.keys.watermark(o, *p))
            .collect();
        let mut con = self.inner.con.clone();
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&names)
            .query_async(&mut con)
            .await
            .map_err(|e| redis_err("reading replication watermarks", e))?;
        Ok(values
            .iter()
            .map(|v| v.as_deref().and_then(parse_mark))
            .collect())
    }
}

fn redis_err(context: &str, e: RedisError) -> BusError {
    if refused(&e) {
        BusError::Refused(format!("{context}: {e}"))
    } else {
        BusError::Redis(format!("{context}: {e}"))
    }
}

/// Whether Redis ran the call and refused it in a way retrying will not change: the apply
/// script failing on a room's data (e.g. its tails hash holding garbage), a key of the
/// wrong type, a reply of the wrong shape. Not: anything about the connection, or
/// conditions of the whole server (`OOM`, `BUSY`, `LOADING`, `READONLY`, `NOPERM`, `ERR
/// max number of clients`, ...), which would refuse every room alike and pass.
fn refused(e: &RedisError) -> bool {
    match e.kind() {
        ErrorKind::Server(ServerErrorKind::ResponseError) => e.to_string().contains("script"),
        ErrorKind::UnexpectedReturnType => true,
        ErrorKind::Extension => e.code() == Some("WRONGTYPE"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dtfed_proto::client::Body;
    use dtfed_proto::record::LogValue;

    fn rec(room: &str, origin: &str, offset: i64, ts: i64, from: &str, body: &str) -> LogRecord {
        LogRecord {
            room: RoomId::parse(room).unwrap(),
            origin: origin.into(),
            partition: 0,
            offset,
            value: LogValue {
                from: from.into(),
                ts,
                body: Body::from_json(body).unwrap(),
            },
        }
    }

    #[test]
    fn bus_encoded_frame_is_byte_identical_to_msg_frame_json() {
        let cases = [
            rec("r", "seoul", 7, 1, "ann", "\"hi\""),
            rec(
                "table-1:goblins_den.v2",
                "tokyo-2",
                0,
                -5,
                "b\"o\\b\u{1}\u{7f}é😀</script>",
                r#"{"z":1, "a" : [1.50, 1e10, -0, "\u00e9"], "prev":null,"ts":9}"#,
            ),
            rec(
                "x",
                "o\"ts\":1,\"prev\":null",
                i64::MAX,
                i64::MIN,
                "",
                "null",
            ),
        ];
        for r in cases {
            let enc = encode_frame(&r).unwrap();
            let (before, after) = enc.split();
            for prev in [None, Some(0), Some(41), Some(i64::MAX)] {
                let prev_text = prev.map_or("null".to_owned(), |p| p.to_string());
                let mut spliced = before.to_vec();
                spliced.extend_from_slice(prev_text.as_bytes());
                spliced.extend_from_slice(after);
                assert_eq!(
                    String::from_utf8(spliced).unwrap(),
                    r.to_msg(prev).to_json(),
                    "{r:?}"
                );
            }
        }
    }

    #[test]
    fn bus_lua_ts_pattern_finds_the_field() {
        // The script's pattern, in Rust: the first `"ts":` is the field.
        let r = rec(
            "r",
            "o\"ts\":1",
            3,
            1_700_000_000_123,
            "\"ts\":5",
            "{\"ts\":6}",
        );
        let json = r.to_msg(Some(2)).to_json();
        let at = json.find("\"ts\":").unwrap() + 5;
        assert!(json[at..].starts_with("1700000000123,"), "{json}");
    }

    #[test]
    fn bus_channel_names_give_back_the_room() {
        let keys = Keys {
            prefix: "dtfed:eu".into(),
        };
        let room = RoomId::parse("a:b").unwrap();
        assert_eq!(keys.history(&room), "dtfed:eu:{a:b}:h");
        assert_eq!(keys.tails(&room), "dtfed:eu:{a:b}:t");
        let c = keys.channel(&room);
        assert_eq!(c, "dtfed:eu:{a:b}:c");
        assert_eq!(keys.room_of_channel(&c), "a:b");
        assert_eq!(keys.room_of_channel("other"), "other");
    }
}
