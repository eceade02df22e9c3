//! `redis-relay`: the baseline dtfed replaces — a chat relay built on Redis Pub/Sub alone.
//!
//! It speaks the subset of client protocol v1 a load generator needs:
//! - `sub`   → SUBSCRIBE the room's channel (one shared Pub/Sub connection per process),
//!   then `synced` with an empty cursor;
//! - `pub`   → PUBLISH a `msg` frame (`origin` = `relay`, `offset` = a per-process counter,
//!   `prev` = null) on the room's channel, then `ack` with that offset;
//! - `unsub`, `ping`.
//!
//! No durability, no history, no order check, no resume: the classic design. A subscriber
//! connection blip loses messages silently; here a lost Pub/Sub connection ends the process
//! (non-zero), so a benchmark sees it instead of measuring a half-dead relay.
//!
//! Publishing goes through one task that takes whatever publishes are queued, numbers them
//! and sends them as one pipeline on one multiplexed connection. One writer keeps the counter
//! and the order of PUBLISHes the same (so per-room offsets strictly increase, as the
//! benchmark checks), and batching is what any serious relay would do: the baseline should be
//! a fair one.
//!
//! ```text
//! redis-relay --listen 127.0.0.1:0 --redis redis://127.0.0.1:6379 --prefix bench
//! ```
//! prints `listening client=<addr>` on stdout once bound.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::Parser;
use dtfed_proto::client::{decode_client_frame, Body};
use dtfed_proto::{ClientFrame, Cursor, ErrorCode, MsgFrame, RoomId, ServerFrame};
use futures::{SinkExt as _, StreamExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// A Redis-Pub/Sub-only WebSocket chat relay (the benchmark baseline).
#[derive(Parser, Debug)]
#[command(name = "redis-relay", version)]
struct Args {
    /// Client WebSocket listener (any path is accepted; `?name=` names the player).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Redis URL.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Channel prefix: room R is published on `<prefix>:room:<R>`.
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// Frames queued per connection before a client too slow to read is closed (4001).
    #[arg(long, default_value_t = 4096)]
    outbound_queue: usize,
    /// Largest client frame accepted, in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    max_frame_bytes: usize,
}

/// Where a session's outbound frames go, and how to tell it it is too slow.
#[derive(Clone)]
struct SessionHandle {
    tx: mpsc::Sender<Message>,
    slow: Arc<Notify>,
}

impl SessionHandle {
    /// Queues a frame without waiting; a full queue marks the session as a slow reader.
    fn offer(&self, msg: Message) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(msg) {
            self.slow.notify_one();
        }
    }
}

type SubResult = Option<Result<(), String>>;

struct Room {
    sessions: HashMap<u64, SessionHandle>,
    /// `None` until the SUBSCRIBE for this channel was confirmed (or failed).
    ready: watch::Receiver<SubResult>,
}

/// SUBSCRIBE / UNSUBSCRIBE, executed in order by one task so that a channel that is left
/// and joined again in quick succession ends up subscribed.
enum Control {
    Subscribe(String, watch::Sender<SubResult>),
    Unsubscribe(String),
}

/// Channel → local sessions. Plain mutex: held only for map operations and `try_send`s.
struct Registry {
    rooms: Mutex<HashMap<String, Room>>,
    control: mpsc::UnboundedSender<Control>,
}

impl Registry {
    fn join(&self, channel: &str, id: u64, handle: SessionHandle) -> watch::Receiver<SubResult> {
        let mut rooms = self.rooms.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(room) = rooms.get_mut(channel) {
            room.sessions.insert(id, handle);
            return room.ready.clone();
        }
        let (tx, rx) = watch::channel(None);
        // Sent under the lock: the control task sees joins and leaves in registry order.
        let _ = self
            .control
            .send(Control::Subscribe(channel.to_owned(), tx));
        rooms.insert(
            channel.to_owned(),
            Room {
                sessions: HashMap::from([(id, handle)]),
                ready: rx.clone(),
            },
        );
        rx
    }

    fn leave(&self, channel: &str, id: u64) {
        let mut rooms = self.rooms.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(room) = rooms.get_mut(channel) {
            room.sessions.remove(&id);
            if room.sessions.is_empty() {
                rooms.remove(channel);
                let _ = self.control.send(Control::Unsubscribe(channel.to_owned()));
            }
        }
    }

    fn dispatch(&self, channel: &str, text: Utf8Bytes) {
        let rooms = self.rooms.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(room) = rooms.get(channel) {
            for s in room.sessions.values() {
                s.offer(Message::Text(text.clone()));
            }
        }
    }
}

/// One publish on its way to Redis.
struct PubReq {
    channel: String,
    room: RoomId,
    from: Arc<str>,
    body: Body,
    reference: Option<String>,
    reply: SessionHandle,
}

struct Shared {
    registry: Registry,
    publish: mpsc::Sender<PubReq>,
    prefix: String,
    outbound_queue: usize,
    ws_config: WebSocketConfig,
    next_session: AtomicU64,
}

impl Shared {
    fn channel(&self, room: &RoomId) -> String {
        format!("{}:room:{}", self.prefix, room)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.outbound_queue == 0 {
        bail!("--outbound-queue must be at least 1");
    }
    let client = redis::Client::open(args.redis.as_str())
        .with_context(|| format!("bad --redis URL {:?}", args.redis))?;
    let pubsub = tokio::time::timeout(Duration::from_secs(10), client.get_async_pubsub())
        .await
        .with_context(|| format!("timed out connecting to Redis at {}", args.redis))?
        .with_context(|| format!("cannot open a Pub/Sub connection to {}", args.redis))?;
    let (mut sub_sink, mut sub_stream) = pubsub.split();
    let mut pub_conn = tokio::time::timeout(
        Duration::from_secs(10),
        client.get_multiplexed_async_connection(),
    )
    .await
    .with_context(|| format!("timed out connecting to Redis at {}", args.redis))?
    .with_context(|| format!("cannot connect to Redis at {}", args.redis))?;

    let (control_tx, mut control_rx) = mpsc::unbounded_channel::<Control>();
    let (publish_tx, mut publish_rx) = mpsc::channel::<PubReq>(65_536);
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(8 * 1024)
        .max_write_buffer_size(1024 * 1024)
        .max_message_size(Some(2 * args.max_frame_bytes))
        .max_frame_size(Some(2 * args.max_frame_bytes));
    let shared = Arc::new(Shared {
        registry: Registry {
            rooms: Mutex::new(HashMap::new()),
            control: control_tx,
        },
        publish: publish_tx,
        prefix: args.prefix.clone(),
        outbound_queue: args.outbound_queue,
        ws_config,
        next_session: AtomicU64::new(1),
    });

    // SUBSCRIBE / UNSUBSCRIBE in registry order.
    let control = tokio::spawn(async move {
        while let Some(cmd) = control_rx.recv().await {
            match cmd {
                Control::Subscribe(ch, done) => {
                    let r = sub_sink.subscribe(&ch).await.map_err(|e| e.to_string());
                    let _ = done.send(Some(r));
                }
                Control::Unsubscribe(ch) => {
                    if let Err(e) = sub_sink.unsubscribe(&ch).await {
                        eprintln!("redis-relay: UNSUBSCRIBE {ch} failed: {e}");
                    }
                }
            }
        }
    });

    // Pub/Sub messages → sessions.
    let dispatch_shared = shared.clone();
    let mut dispatcher = tokio::spawn(async move {
        while let Some(msg) = sub_stream.next().await {
            let Ok(text) = Utf8Bytes::try_from(msg.get_payload_bytes().to_vec()) else {
                continue;
            };
            dispatch_shared
                .registry
                .dispatch(msg.get_channel_name(), text);
        }
    });

    // Publishes → numbered, pipelined PUBLISHes → acks.
    let mut publisher = tokio::spawn(async move {
        let mut offset: i64 = 0;
        let mut batch = Vec::with_capacity(512);
        loop {
            if publish_rx.recv_many(&mut batch, 512).await == 0 {
                return;
            }
            let mut pipe = redis::pipe();
            let mut acks = Vec::with_capacity(batch.len());
            let ts = unix_ms();
            for req in batch.drain(..) {
                offset += 1;
                let msg = MsgFrame {
                    room: req.room.clone(),
                    origin: "relay".into(),
                    offset,
                    prev: None,
                    ts,
                    from: req.from.to_string(),
                    body: req.body,
                };
                pipe.publish(&req.channel, msg.to_json()).ignore();
                acks.push((req.reply, req.room, req.reference, offset));
            }
            let result: redis::RedisResult<()> = pipe.query_async(&mut pub_conn).await;
            for (reply, room, reference, offset) in acks {
                let frame = match &result {
                    Ok(()) => ServerFrame::Ack {
                        reference,
                        room,
                        origin: "relay".into(),
                        offset,
                    },
                    Err(e) => ServerFrame::error(
                        ErrorCode::Unavailable,
                        format!("redis PUBLISH failed: {e}"),
                        reference,
                    ),
                };
                reply.offer(Message::Text(frame.to_json().into()));
            }
        }
    });

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr().context("listener has no address")?;
    println!("listening client={addr}");
    std::io::stdout().flush().ok();
    eprintln!(
        "redis-relay: {addr} → Redis {} (channels {}:room:<room>)",
        args.redis, args.prefix
    );

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let result = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        if let Err(e) = session(shared, stream).await {
                            // Handshake failures and resets are routine under load; keep quiet
                            // unless asked.
                            if std::env::var_os("RELAY_DEBUG").is_some() {
                                eprintln!("redis-relay: session {peer}: {e:#}");
                            }
                        }
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    eprintln!("redis-relay: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut dispatcher => break Err(anyhow::anyhow!("the Redis Pub/Sub connection closed: messages would be lost silently; exiting")),
            _ = &mut publisher => break Err(anyhow::anyhow!("the publisher task ended unexpectedly")),
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
        }
    };
    control.abort();
    result
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `name` from a `?name=...&...` query, without percent-decoding (bench names are plain).
fn name_from_query(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("name="))
        .filter(|n| !n.is_empty() && n.len() <= 64)
        .map(str::to_owned)
}

// The handshake callback's signature (a large `ErrorResponse`) is tungstenite's.
#[allow(clippy::result_large_err)]
async fn session(shared: Arc<Shared>, stream: TcpStream) -> anyhow::Result<()> {
    stream.set_nodelay(true).context("TCP_NODELAY")?;
    let mut name = None;
    let ws = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        |req: &Request, resp: Response| {
            name = name_from_query(req.uri().query());
            Ok(resp)
        },
        Some(shared.ws_config),
    );
    let ws = tokio::time::timeout(Duration::from_secs(10), ws)
        .await
        .context("WebSocket handshake timed out")?
        .context("WebSocket handshake")?;
    let from: Arc<str> = name.unwrap_or_else(|| "guest".into()).into();
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(shared.outbound_queue);
    let handle = SessionHandle {
        tx,
        slow: Arc::new(Notify::new()),
    };

    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let mut last = matches!(msg, Message::Close(_));
            if sink.feed(msg).await.is_err() {
                return;
            }
            while !last {
                let Ok(more) = rx.try_recv() else { break };
                last = matches!(more, Message::Close(_));
                if sink.feed(more).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() || last {
                return;
            }
        }
        let _ = sink.close().await;
    });

    let mut rooms: HashSet<RoomId> = HashSet::new();
    let reply = |frame: ServerFrame| handle.offer(Message::Text(frame.to_json().into()));
    loop {
        let msg = tokio::select! {
            _ = handle.slow.notified() => {
                let close = CloseFrame {
                    code: CloseCode::Library(4001),
                    reason: "slow reader: outbound queue full".into(),
                };
                // The queue is full: wait a moment for room rather than dropping the reason.
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    handle.tx.send(Message::Close(Some(close))),
                )
                .await;
                break;
            }
            msg = stream.next() => msg,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(_))) => {
                reply(ServerFrame::error(
                    ErrorCode::BadFrame,
                    "binary frames are not part of protocol v1",
                    None,
                ));
                continue;
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => continue,
        };
        let frame = match decode_client_frame(&text) {
            Ok(f) => f,
            Err(e) => {
                reply(e.into());
                continue;
            }
        };
        match frame {
            ClientFrame::Sub { room, .. } => {
                if !rooms.contains(&room) {
                    let channel = shared.channel(&room);
                    let mut ready = shared.registry.join(&channel, id, handle.clone());
                    let outcome = tokio::time::timeout(
                        Duration::from_secs(10),
                        ready.wait_for(Option::is_some),
                    )
                    .await;
                    let err = match outcome {
                        Ok(Ok(v)) => match &*v {
                            Some(Ok(())) => None,
                            Some(Err(e)) => Some(format!("redis SUBSCRIBE failed: {e}")),
                            None => Some("redis SUBSCRIBE did not complete".to_owned()),
                        },
                        Ok(Err(_)) => Some("the relay is shutting down".to_owned()),
                        Err(_) => Some("redis SUBSCRIBE timed out".to_owned()),
                    };
                    if let Some(message) = err {
                        shared.registry.leave(&channel, id);
                        reply(ServerFrame::error(ErrorCode::Unavailable, message, None));
                        continue;
                    }
                    rooms.insert(room.clone());
                }
                reply(ServerFrame::Synced {
                    room,
                    cursor: Cursor::new(),
                    origins: Default::default(),
                });
            }
            ClientFrame::Pub {
                room,
                body,
                reference,
            } => {
                let req = PubReq {
                    channel: shared.channel(&room),
                    room,
                    from: from.clone(),
                    body,
                    reference,
                    reply: handle.clone(),
                };
                if let Err(
                    mpsc::error::TrySendError::Full(req) | mpsc::error::TrySendError::Closed(req),
                ) = shared.publish.try_send(req)
                {
                    reply(ServerFrame::error(
                        ErrorCode::Unavailable,
                        "publish queue full",
                        req.reference,
                    ));
                }
            }
            ClientFrame::Unsub { room } => {
                if rooms.remove(&room) {
                    shared.registry.leave(&shared.channel(&room), id);
                } else {
                    reply(ServerFrame::error(
                        ErrorCode::NotSubscribed,
                        format!("not subscribed to {room}"),
                        None,
                    ));
                }
            }
            ClientFrame::Ping => reply(ServerFrame::Pong),
        }
    }
    for room in &rooms {
        shared.registry.leave(&shared.channel(room), id);
    }
    drop(handle);
    // The writer ends once every handle (registry, in-flight publishes) is gone; do not wait
    // for in-flight publishes of a dead connection longer than needed.
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    Ok(())
}
