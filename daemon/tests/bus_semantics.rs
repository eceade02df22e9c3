//! The bus contract, checked against a real `redis-server` (started per test on a free port)
//! and against the in-process `MemoryBus`, with the same test functions.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dtfed::bus::memory::MemoryBus;
use dtfed::bus::redis::RedisBus;
use dtfed::bus::{
    Bus, BusEvent, BusEvents, PartitionMark, PublishClaim, PublishKey, PublishOutcome,
};
use dtfed::config::{HistoryConfig, RedisConfig};
use dtfed_proto::client::Body;
use dtfed_proto::record::LogValue;
use dtfed_proto::{LogRecord, MsgFrame, OriginMark, RoomId};

const REDIS_SERVER: &str = "/usr/bin/redis-server";

/// A `redis-server` of this test; killed (by PID) when dropped, panics included.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start() -> RedisServer {
        for _ in 0..20 {
            let port = free_port();
            if let Some(s) = Self::start_on(port) {
                return s;
            }
        }
        panic!("could not start redis-server");
    }

    /// Starts on `port`; `None` if it does not accept connections within 5 s.
    fn start_on(port: u16) -> Option<RedisServer> {
        let child = Command::new(REDIS_SERVER)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let mut server = RedisServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = server.child.try_wait() {
                return None; // exited: port taken
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(server);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        server.kill();
        None
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn room(s: &str) -> RoomId {
    RoomId::parse(s).unwrap()
}

fn rec(r: &str, origin: &str, offset: i64, ts: i64, body: &str) -> LogRecord {
    LogRecord {
        room: room(r),
        origin: origin.into(),
        partition: 0,
        offset,
        value: LogValue {
            from: "ann".into(),
            ts,
            body: Body::from_json(body).unwrap(),
        },
    }
}

fn history_cfg() -> HistoryConfig {
    HistoryConfig {
        max_messages: 5,
        max_age_secs: 60,
    }
}

fn redis_cfg(server: &RedisServer) -> RedisConfig {
    RedisConfig {
        url: server.url(),
        key_prefix: format!("t{}", rand::random::<u32>()),
    }
}

async fn next_event(events: &mut BusEvents) -> BusEvent {
    tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("an event within 5 s")
        .expect("events open")
}

async fn next_msg(events: &mut BusEvents) -> Arc<MsgFrame> {
    match next_event(events).await {
        BusEvent::Msg(m) => m,
        BusEvent::Resync => panic!("unexpected resync"),
    }
}

async fn assert_quiet(events: &mut BusEvents) {
    if let Ok(ev) = tokio::time::timeout(Duration::from_millis(300), events.recv()).await {
        panic!("unexpected event {ev:?}");
    }
}

fn offsets(h: &[MsgFrame]) -> Vec<(String, i64, Option<i64>)> {
    h.iter()
        .map(|m| (m.origin.clone(), m.offset, m.prev))
        .collect()
}

/// The whole contract, on any bus configured with [`history_cfg`].
async fn semantics<B: Bus>(bus: &B, events: &mut BusEvents) {
    let now = now_ms();

    // prev chains per (room, origin), across origins and rooms.
    let a = |o: &str, off: i64| rec("chain", o, off, now, "1");
    assert_eq!(
        bus.apply(&a("seoul", 10)).await.unwrap().unwrap().prev,
        None
    );
    assert_eq!(bus.apply(&a("tokyo", 3)).await.unwrap().unwrap().prev, None);
    assert_eq!(
        bus.apply(&a("seoul", 14)).await.unwrap().unwrap().prev,
        Some(10)
    );
    assert_eq!(
        bus.apply(&rec("other", "seoul", 15, now, "1"))
            .await
            .unwrap()
            .unwrap()
            .prev,
        None
    );
    assert_eq!(
        bus.apply(&a("tokyo", 9)).await.unwrap().unwrap().prev,
        Some(3)
    );
    assert_eq!(
        bus.apply(&a("seoul", 20)).await.unwrap().unwrap().prev,
        Some(14)
    );
    // History in apply order, oldest first.
    let h = bus.history(&room("chain")).await.unwrap();
    assert_eq!(
        offsets(&h),
        vec![
            ("seoul".into(), 10, None),
            ("tokyo".into(), 3, None),
            ("seoul".into(), 14, Some(10)),
            ("tokyo".into(), 9, Some(3)),
            ("seoul".into(), 20, Some(14)),
        ]
    );
    let tails = bus.tails(&room("chain")).await.unwrap();
    assert_eq!(tails.get("seoul"), Some(20));
    assert_eq!(tails.get("tokyo"), Some(9));
    assert!(bus.tails(&room("nothing")).await.unwrap().0.is_empty());
    assert!(bus.history(&room("nothing")).await.unwrap().is_empty());

    // Live delivery: the event is the message as applied, same JSON.
    bus.subscribe(&room("live")).await.unwrap();
    let applied = bus
        .apply(&rec(
            "live",
            "seoul",
            1,
            now,
            r#"{"t":"hi \"you\" é","n":[1.50,-0]}"#,
        ))
        .await
        .unwrap()
        .unwrap();
    let got = next_msg(events).await;
    assert_eq!(*got, applied);
    assert_eq!(got.to_json(), applied.to_json());
    assert_eq!(
        bus.history(&room("live")).await.unwrap()[0].to_json(),
        applied.to_json()
    );

    // A replay (owner change) is skipped and publishes nothing.
    assert!(bus
        .apply(&rec("live", "seoul", 1, now, "2"))
        .await
        .unwrap()
        .is_none());
    assert!(bus
        .apply(&rec("live", "seoul", 0, now, "2"))
        .await
        .unwrap()
        .is_none());
    assert_quiet(events).await;
    assert_eq!(bus.history(&room("live")).await.unwrap().len(), 1);
    let m = bus
        .apply(&rec("live", "seoul", 2, now, "3"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.prev, Some(1));
    assert_eq!(next_msg(events).await.offset, 2);

    // Rooms not subscribed are not delivered; unsubscribe stops delivery.
    bus.apply(&rec("quiet", "seoul", 1, now, "1"))
        .await
        .unwrap();
    bus.unsubscribe(&room("live")).await.unwrap();
    bus.apply(&rec("live", "seoul", 3, now, "4")).await.unwrap();
    assert_quiet(events).await;

    // Trimming by count (max 5), tails untouched.
    for off in 1..=8 {
        bus.apply(&rec("count", "seoul", off, now, "1"))
            .await
            .unwrap();
    }
    let h = bus.history(&room("count")).await.unwrap();
    assert_eq!(
        h.iter().map(|m| m.offset).collect::<Vec<_>>(),
        vec![4, 5, 6, 7, 8]
    );
    assert_eq!(h[0].prev, Some(3));
    assert_eq!(
        bus.tails(&room("count")).await.unwrap().get("seoul"),
        Some(8)
    );
    // Prev survives trimming: the next message still chains to 8.
    assert_eq!(
        bus.apply(&rec("count", "seoul", 9, now, "1"))
            .await
            .unwrap()
            .unwrap()
            .prev,
        Some(8)
    );

    // Trimming by age (max 60 s): expired heads go on the next apply; an expired entry
    // behind a fresh head is filtered out when read; tails stay.
    let old = now - 120_000;
    bus.apply(&rec("age", "seoul", 1, old, "1")).await.unwrap();
    bus.apply(&rec("age", "seoul", 2, old + 1, "1"))
        .await
        .unwrap();
    bus.apply(&rec("age", "seoul", 3, now, "1")).await.unwrap();
    bus.apply(&rec("age", "tokyo", 1, old, "1")).await.unwrap();
    bus.apply(&rec("age", "seoul", 4, now, "1")).await.unwrap();
    let h = bus.history(&room("age")).await.unwrap();
    assert_eq!(
        offsets(&h),
        vec![("seoul".into(), 3, Some(2)), ("seoul".into(), 4, Some(3))]
    );
    let tails = bus.tails(&room("age")).await.unwrap();
    assert_eq!(tails.get("seoul"), Some(4));
    assert_eq!(tails.get("tokyo"), Some(1));
    // A replay of a trimmed message is still recognised.
    assert!(bus
        .apply(&rec("age", "seoul", 1, old, "1"))
        .await
        .unwrap()
        .is_none());

    assert!(bus.ping().await.is_ok());
}

#[tokio::test]
async fn bus_memory_semantics() {
    let (bus, mut events) = MemoryBus::new(&history_cfg());
    semantics(&bus, &mut events).await;
}

#[tokio::test]
async fn bus_redis_semantics() {
    let server = RedisServer::start();
    let (bus, mut events) = RedisBus::connect(&redis_cfg(&server), &history_cfg())
        .await
        .unwrap();
    semantics(&bus, &mut events).await;
}

/// `apply_batch`: several rooms and origins interleaved, a record repeated within the batch,
/// a room with more records than one script call takes; then the same batch again.
async fn batch_semantics<B: Bus>(bus: &B, events: &mut BusEvents) {
    let now = now_ms();
    for r in ["b1", "b2", "b3"] {
        bus.subscribe(&room(r)).await.unwrap();
    }
    let mut batch = vec![
        rec("b1", "seoul", 1, now, "1"),
        rec("b2", "seoul", 5, now, "2"),
        rec("b1", "seoul", 2, now, "3"),
        rec("b1", "tokyo", 7, now, "4"),
        rec("b2", "seoul", 6, now, "5"),
        rec("b1", "seoul", 2, now, "3"),
    ];
    // 150 records of one room: more than one script call's worth.
    batch.extend((10..160).map(|o| rec("b3", "seoul", o, now, "6")));
    let out = bus.apply_batch(&batch).await.unwrap();
    assert_eq!(out.len(), batch.len());
    let prevs: Vec<Option<Option<i64>>> = out.iter().map(|m| m.as_ref().map(|m| m.prev)).collect();
    assert_eq!(
        &prevs[..6],
        &[
            Some(None),
            Some(None),
            Some(Some(1)),
            Some(None),
            Some(Some(5)),
            None // the repeat of b1 seoul 2 within the batch
        ]
    );
    for (k, o) in (10..160).enumerate() {
        let expect = if o == 10 { None } else { Some(o - 1) };
        assert_eq!(prevs[6 + k], Some(expect), "b3 offset {o}");
    }
    // Live delivery: every applied record once, each room in its order.
    let mut seen: std::collections::BTreeMap<String, Vec<(String, i64)>> = Default::default();
    for _ in 0..(5 + 150) {
        let m = next_msg(events).await;
        seen.entry(m.room.to_string())
            .or_default()
            .push((m.origin.clone(), m.offset));
    }
    assert_quiet(events).await;
    assert_eq!(
        seen["b1"],
        vec![
            ("seoul".into(), 1),
            ("seoul".into(), 2),
            ("tokyo".into(), 7)
        ]
    );
    assert_eq!(seen["b2"], vec![("seoul".into(), 5), ("seoul".into(), 6)]);
    assert_eq!(
        seen["b3"],
        (10..160)
            .map(|o| ("seoul".to_owned(), o))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        offsets(&bus.history(&room("b1")).await.unwrap()),
        vec![
            ("seoul".into(), 1, None),
            ("seoul".into(), 2, Some(1)),
            ("tokyo".into(), 7, None)
        ]
    );
    // History keeps the last 5 of b3 (max_messages), tails the last offset.
    assert_eq!(
        offsets(&bus.history(&room("b3")).await.unwrap())
            .iter()
            .map(|(_, o, _)| *o)
            .collect::<Vec<_>>(),
        vec![155, 156, 157, 158, 159]
    );
    assert_eq!(
        bus.tails(&room("b3")).await.unwrap().get("seoul"),
        Some(159)
    );
    // The same batch again (a new owner replaying): nothing applied, nothing published.
    let again = bus.apply_batch(&batch).await.unwrap();
    assert!(again.iter().all(Option::is_none));
    assert_quiet(events).await;
    assert!(bus.apply_batch(&[]).await.unwrap().is_empty());
}

#[tokio::test]
async fn bus_memory_batch_semantics() {
    let (bus, mut events) = MemoryBus::new(&history_cfg());
    batch_semantics(&bus, &mut events).await;
}

#[tokio::test]
async fn bus_redis_batch_semantics() {
    let server = RedisServer::start();
    let (bus, mut events) = RedisBus::connect(&redis_cfg(&server), &history_cfg())
        .await
        .unwrap();
    batch_semantics(&bus, &mut events).await;
}

/// A room whose script fails (its tails hash holds garbage) fails the batch, and takes no
/// other room down with it: the other rooms are applied, and a retry of the whole batch
/// applies nothing twice.
#[tokio::test]
async fn bus_redis_batch_failure_stays_in_its_room() {
    let server = RedisServer::start();
    let cfg = redis_cfg(&server);
    let (bus, mut events) = RedisBus::connect(&cfg, &history_cfg()).await.unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("HSET")
        .arg(format!("{}:{{bad}}:t", cfg.key_prefix))
        .arg("seoul")
        .arg("not-a-number")
        .query_async(&mut con)
        .await
        .unwrap();
    bus.subscribe(&room("good")).await.unwrap();
    let now = now_ms();
    let batch = vec![
        rec("good", "seoul", 1, now, "1"),
        rec("bad", "seoul", 1, now, "1"),
        rec("good", "seoul", 2, now, "1"),
    ];
    let err = bus
        .apply_batch(&batch)
        .await
        .expect_err("the bad room fails");
    assert!(
        err.is_permanent(),
        "a script error is the room's, for good: {err}"
    );
    assert_eq!(next_msg(&mut events).await.offset, 1);
    assert_eq!(next_msg(&mut events).await.offset, 2);
    assert!(bus.history(&room("bad")).await.unwrap().is_empty());
    // The operator repairs the room; the retried batch applies only what was missing.
    let _: () = redis::cmd("DEL")
        .arg(format!("{}:{{bad}}:t", cfg.key_prefix))
        .query_async(&mut con)
        .await
        .unwrap();
    let out = bus.apply_batch(&batch).await.unwrap();
    assert_eq!(
        out.iter().map(Option::is_some).collect::<Vec<_>>(),
        vec![false, true, false]
    );
    assert_quiet(&mut events).await;
}

/// The contract of `apply_batch` on failure, in one room: what was applied is a prefix of
/// the room's records (never a later record without the earlier ones), and retrying the
/// whole batch applies the rest, nothing twice. Here the room's tails hash holds garbage
/// for origin tokyo only: seoul's first record goes in, tokyo's fails the script, and
/// seoul's second is not applied (it would hide nothing, but it would break the prefix).
#[tokio::test]
async fn bus_redis_batch_failure_leaves_a_prefix_of_the_room() {
    let server = RedisServer::start();
    let cfg = redis_cfg(&server);
    let (bus, mut events) = RedisBus::connect(&cfg, &history_cfg()).await.unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let tails = format!("{}:{{mixed}}:t", cfg.key_prefix);
    let _: () = redis::cmd("HSET")
        .arg(&tails)
        .arg("tokyo")
        .arg("not-a-number")
        .query_async(&mut con)
        .await
        .unwrap();
    bus.subscribe(&room("mixed")).await.unwrap();
    let now = now_ms();
    let batch = vec![
        rec("mixed", "seoul", 1, now, "1"),
        rec("mixed", "tokyo", 1, now, "1"),
        rec("mixed", "seoul", 2, now, "1"),
    ];
    let err = bus
        .apply_batch(&batch)
        .await
        .expect_err("tokyo's record fails");
    assert!(err.is_permanent(), "{err}");
    assert_eq!(
        offsets(&bus.history(&room("mixed")).await.unwrap()),
        vec![("seoul".into(), 1, None)],
        "a prefix"
    );
    assert_eq!(next_msg(&mut events).await.offset, 1);
    let _: () = redis::cmd("HDEL")
        .arg(&tails)
        .arg("tokyo")
        .query_async(&mut con)
        .await
        .unwrap();
    let out = bus.apply_batch(&batch).await.unwrap();
    assert_eq!(
        out.iter().map(Option::is_some).collect::<Vec<_>>(),
        vec![false, true, true]
    );
    assert_eq!(
        offsets(&bus.history(&room("mixed")).await.unwrap()),
        vec![
            ("seoul".into(), 1, None),
            ("tokyo".into(), 1, None),
            ("seoul".into(), 2, Some(1)),
        ]
    );
}

/// Redis gone is not a refusal: the same records will go in once it is back.
#[tokio::test]
async fn bus_redis_outage_is_not_permanent() {
    let mut server = RedisServer::start();
    let cfg = redis_cfg(&server);
    let (bus, _events) = RedisBus::connect(&cfg, &history_cfg()).await.unwrap();
    server.kill();
    let err = bus
        .apply_batch(&[rec("r", "seoul", 1, now_ms(), "1")])
        .await
        .expect_err("redis is down");
    assert!(!err.is_permanent(), "{err}");
}

/// Redis out of memory refuses every room alike, and passes: not a refusal of the records.
#[tokio::test]
async fn bus_redis_out_of_memory_is_not_permanent() {
    let server = RedisServer::start();
    let cfg = redis_cfg(&server);
    let (bus, _events) = RedisBus::connect(&cfg, &history_cfg()).await.unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query_async(&mut con)
        .await
        .unwrap();
    let err = bus
        .apply_batch(&[rec("r", "seoul", 1, now_ms(), "1")])
        .await
        .expect_err("out of memory");
    assert!(!err.is_permanent(), "{err}");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut con)
        .await
        .unwrap();
    bus.apply_batch(&[rec("r", "seoul", 1, now_ms(), "1")])
        .await
        .expect("applied once memory is back");
}

/// Several gateways of one region: shared history and tails, own subscriptions and events.
async fn two_gateways<B: Bus>(a: &B, ea: &mut BusEvents, b: &B, eb: &mut BusEvents) {
    let now = now_ms();
    a.subscribe(&room("shared")).await.unwrap();
    b.apply(&rec("shared", "seoul", 1, now, "1")).await.unwrap();
    assert_eq!(next_msg(ea).await.offset, 1);
    assert_quiet(eb).await;
    b.subscribe(&room("shared")).await.unwrap();
    let m = a
        .apply(&rec("shared", "seoul", 2, now, "1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.prev, Some(1));
    assert_eq!(next_msg(ea).await.offset, 2);
    assert_eq!(next_msg(eb).await.offset, 2);
    assert!(b
        .apply(&rec("shared", "seoul", 2, now, "1"))
        .await
        .unwrap()
        .is_none());
    assert_eq!(b.history(&room("shared")).await.unwrap().len(), 2);
    assert_eq!(
        a.tails(&room("shared")).await.unwrap().get("seoul"),
        Some(2)
    );
    a.unsubscribe(&room("shared")).await.unwrap();
    b.apply(&rec("shared", "seoul", 3, now, "1")).await.unwrap();
    assert_eq!(next_msg(eb).await.offset, 3);
    assert_quiet(ea).await;
}

#[tokio::test]
async fn bus_memory_attach_shares_history_not_subscriptions() {
    let (a, mut ea) = MemoryBus::new(&history_cfg());
    let (b, mut eb) = a.attach();
    two_gateways(&a, &mut ea, &b, &mut eb).await;
    // Dropping a handle ends its events, not the others'.
    drop(b);
    assert!(eb.recv().await.is_none());
    assert!(a.history(&room("shared")).await.unwrap().len() == 3);
}

#[tokio::test]
async fn bus_redis_two_daemons_share_one_redis() {
    let server = RedisServer::start();
    let cfg = redis_cfg(&server);
    let (a, mut ea) = RedisBus::connect(&cfg, &history_cfg()).await.unwrap();
    let (b, mut eb) = RedisBus::connect(&cfg, &history_cfg()).await.unwrap();
    two_gateways(&a, &mut ea, &b, &mut eb).await;
}

#[tokio::test]
async fn bus_redis_shutdown_and_drop_close_events() {
    let server = RedisServer::start();
    let cfg = redis_cfg(&server);
    let (a, mut ea) = RedisBus::connect(&cfg, &history_cfg()).await.unwrap();
    a.subscribe(&room("r")).await.unwrap();
    a.shutdown();
    tokio::time::timeout(Duration::from_secs(5), async {
        while ea.recv().await.is_some() {}
    })
    .await
    .expect("events close after shutdown");
    assert!(matches!(
        a.subscribe(&room("r2")).await,
        Err(dtfed::bus::BusError::Closed)
    ));
    // Commands still work after shutdown (fan-out owners drain).
    assert!(a
        .apply(&rec("r", "seoul", 1, now_ms(), "1"))
        .await
        .unwrap()
        .is_some());

    let (b, mut eb) = RedisBus::connect(&cfg, &history_cfg()).await.unwrap();
    b.subscribe(&room("r")).await.unwrap();
    drop(b);
    tokio::time::timeout(Duration::from_secs(5), async {
        while eb.recv().await.is_some() {}
    })
    .await
    .expect("events close when the bus is dropped");
}

#[tokio::test]
async fn bus_redis_connect_fails_fast_without_redis() {
    let cfg = RedisConfig {
        url: format!("redis://127.0.0.1:{}", free_port()),
        key_prefix: "x".into(),
    };
    let started = Instant::now();
    let r = RedisBus::connect(&cfg, &history_cfg()).await;
    assert!(matches!(r, Err(dtfed::bus::BusError::Redis(_))));
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn bus_redis_resyncs_after_redis_restart() {
    let mut server = RedisServer::start();
    let port = server.port;
    let cfg = redis_cfg(&server);
    let (bus, mut events) = RedisBus::connect(&cfg, &history_cfg()).await.unwrap();
    bus.subscribe(&room("r1")).await.unwrap();
    bus.apply(&rec("r1", "seoul", 1, now_ms(), "1"))
        .await
        .unwrap();
    assert_eq!(next_msg(&mut events).await.offset, 1);

    server.kill();
    // Commands fail while Redis is down; nothing is delivered.
    assert!(bus
        .apply(&rec("r1", "seoul", 2, now_ms(), "1"))
        .await
        .is_err());
    // Subscribing while disconnected waits for the reconnect (bounded); unsubscribing
    // records intent.
    let t = Instant::now();
    assert!(matches!(
        bus.subscribe(&room("gone")).await,
        Err(dtfed::bus::BusError::Redis(_))
    ));
    assert!(t.elapsed() >= Duration::from_secs(4), "{:?}", t.elapsed());
    bus.subscribe(&room("gone2")).await.ok();
    bus.unsubscribe(&room("gone2")).await.unwrap();
    let pending = {
        let bus = bus.clone();
        tokio::spawn(async move { bus.subscribe(&room("r2")).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted = Instant::now();
    server = RedisServer::start_on(port).expect("restart on the same port");

    // Resync comes once every room is subscribed again.
    match next_event(&mut events).await {
        BusEvent::Resync => {}
        BusEvent::Msg(m) => panic!("message before resync: {m:?}"),
    }
    eprintln!("resync {:?} after restart", restarted.elapsed());
    pending
        .await
        .unwrap()
        .expect("subscribe completes after the reconnect");

    // The command connection reconnects too (allow it a few tries).
    let deadline = Instant::now() + Duration::from_secs(10);
    let applied = loop {
        match bus.apply(&rec("r1", "seoul", 3, now_ms(), "1")).await {
            Ok(m) => break m.unwrap(),
            Err(e) if Instant::now() < deadline => {
                eprintln!("apply after restart: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("apply never recovered: {e}"),
        }
    };
    assert_eq!(applied.prev, None, "the restarted Redis is empty");
    assert_eq!(next_msg(&mut events).await.offset, 3);
    bus.apply(&rec("r2", "seoul", 1, now_ms(), "1"))
        .await
        .unwrap();
    assert_eq!(next_msg(&mut events).await.room, room("r2"));
    for gone in ["gone", "gone2"] {
        bus.apply(&rec(gone, "seoul", 1, now_ms(), "1"))
            .await
            .unwrap();
    }
    assert_quiet(&mut events).await;
    drop(server);
}

#[tokio::test]
async fn bus_redis_slow_gateway_gets_resync_not_a_stall() {
    // Fill the events channel (65,536) without reading it: the subscriber drops, then
    // resyncs once there is room; history has everything.
    let server = RedisServer::start();
    let cfg = redis_cfg(&server);
    let history = HistoryConfig {
        max_messages: 100_000,
        max_age_secs: 600,
    };
    let (bus, mut events) = RedisBus::connect(&cfg, &history).await.unwrap();
    bus.subscribe(&room("flood")).await.unwrap();
    let n = dtfed::bus::redis::EVENTS_CAPACITY as i64 + 500;
    let now = now_ms();
    let mut tasks = Vec::new();
    for w in 0..8i64 {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            let origin = format!("o{w}");
            let mut off = w;
            while off < n {
                bus.apply(&rec("flood", &origin, off, now, "1"))
                    .await
                    .unwrap();
                off += 8;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(bus.history(&room("flood")).await.unwrap().len() as i64, n);
    let mut msgs = 0usize;
    let mut resyncs = 0usize;
    loop {
        match tokio::time::timeout(Duration::from_secs(2), events.recv()).await {
            Ok(Some(BusEvent::Msg(_))) => msgs += 1,
            Ok(Some(BusEvent::Resync)) => resyncs += 1,
            _ => break,
        }
    }
    assert_eq!(
        resyncs, 1,
        "one resync after the overflow ({msgs} messages)"
    );
    assert!(msgs >= dtfed::bus::redis::EVENTS_CAPACITY);
    // Live again afterwards.
    bus.apply(&rec("flood", "o0", n + 1, now, "1"))
        .await
        .unwrap();
    assert_eq!(next_msg(&mut events).await.offset, n + 1);
}

#[tokio::test]
async fn bus_redis_throughput() {
    let server = RedisServer::start();
    let cfg = redis_cfg(&server);
    let history = HistoryConfig::default();
    let (bus, _events) = RedisBus::connect(&cfg, &history).await.unwrap();
    let body = r#"{"text":"the goblin swings its rusty blade and misses","roll":[3,17]}"#;
    let now = now_ms();

    let n = 5_000;
    let started = Instant::now();
    for off in 0..n {
        bus.apply(&rec("seq", "seoul", off, now, body))
            .await
            .unwrap();
    }
    let seq = n as f64 / started.elapsed().as_secs_f64();

    // Concurrent owners (partitions) share the multiplexed connection: pipelined.
    let per = 2_500;
    let owners = 8;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..owners {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            let r = format!("room-{w}");
            for off in 0..per {
                bus.apply(&rec(&r, "seoul", off, now, body)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let par = (per * owners) as f64 / started.elapsed().as_secs_f64();
    let mut con = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut con)
        .await
        .unwrap();
    let evalsha = stats
        .lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .unwrap_or("no evalsha stats");
    println!("bus_redis_throughput: sequential {seq:.0} applies/s, {owners} concurrent owners {par:.0} applies/s; redis {evalsha}");
}

/// Client ids of the server's Pub/Sub connections.
async fn pubsub_clients(url: &str) -> Vec<String> {
    let mut con = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut con)
        .await
        .unwrap();
    list.lines()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn bus_redis_keepalive_keeps_quiet_links_and_drops_dead_ones() {
    let server = RedisServer::start();
    let cfg = redis_cfg(&server);
    let (bus, mut events) = RedisBus::connect(&cfg, &history_cfg()).await.unwrap();
    bus.subscribe(&room("k")).await.unwrap();
    let before = pubsub_clients(&server.url()).await;
    assert_eq!(before.len(), 1);
    // Two keepalive rounds on a quiet link: same connection, no resync.
    if let Ok(ev) = tokio::time::timeout(Duration::from_secs(11), events.recv()).await {
        panic!("unexpected event on a quiet link: {ev:?}");
    }
    assert_eq!(pubsub_clients(&server.url()).await, before);

    // A link that is open but silent (server stopped): the keepalive gives up on it, and
    // once the server answers again the bus re-subscribes and resyncs.
    let pid = server.child.id().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .map(|s| s.success());
        assert!(matches!(ok, Ok(true)), "kill {sig} {pid}");
    };
    signal("-STOP");
    tokio::time::sleep(Duration::from_secs(9)).await;
    signal("-CONT");
    match next_event(&mut events).await {
        BusEvent::Resync => {}
        BusEvent::Msg(m) => panic!("message before resync: {m:?}"),
    }
    let after = pubsub_clients(&server.url()).await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after, before, "a new pub/sub connection");
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = bus.apply(&rec("k", "seoul", 1, now_ms(), "1")).await {
        assert!(Instant::now() < deadline, "apply never recovered: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(next_msg(&mut events).await.offset, 1);
}

#[tokio::test]
async fn bus_memory_slow_gateway_gets_resync_not_a_stall() {
    let history = HistoryConfig {
        max_messages: 100_000,
        max_age_secs: 600,
    };
    let (bus, mut events) = MemoryBus::new(&history);
    bus.subscribe(&room("flood")).await.unwrap();
    let n = dtfed::bus::memory::EVENTS_CAPACITY as i64 + 500;
    let now = now_ms();
    for off in 0..n {
        bus.apply(&rec("flood", "o", off, now, "1")).await.unwrap();
    }
    let mut msgs = 0usize;
    let mut resyncs = 0usize;
    loop {
        match tokio::time::timeout(Duration::from_millis(500), events.recv()).await {
            Ok(Some(BusEvent::Msg(m))) => {
                assert_eq!(resyncs, 0, "no message after the resync but the new ones");
                assert_eq!(m.offset, msgs as i64);
                msgs += 1;
            }
            Ok(Some(BusEvent::Resync)) => resyncs += 1,
            _ => break,
        }
    }
    assert_eq!(resyncs, 1);
    assert_eq!(msgs, dtfed::bus::memory::EVENTS_CAPACITY);
    bus.apply(&rec("flood", "o", n, now, "1")).await.unwrap();
    assert_eq!(next_msg(&mut events).await.offset, n);
}

/// Publish claims: first claim, in flight, stored, released, unknown after going stale,
/// and keys that differ only in player, room or ref are separate.
async fn publish_claim_semantics<B: Bus>(bus: &B) {
    let key = |player: &str, r: &str, reference: &str| PublishKey {
        room: room(r),
        player: player.into(),
        reference: reference.into(),
        body: 7,
    };
    let (stale, window) = (5_000, 60_000);
    let t = now_ms();
    let k = key("ann", "claims", "r1");
    assert_eq!(
        bus.claim_publish(&k, t, stale, window).await.unwrap(),
        PublishClaim::Fresh
    );
    assert_eq!(
        bus.claim_publish(&k, t + 100, stale, window).await.unwrap(),
        PublishClaim::InFlight
    );
    // The same ref of another player, in another room, or another ref: fresh.
    for other in [
        key("bob", "claims", "r1"),
        key("ann", "claims-2", "r1"),
        key("ann", "claims", "r2"),
        // Length-prefixed names: "an" + "n:r1" must not meet "ann" + "r1".
        key("an", "claims", "n:r1"),
        // Another body under the same ref: another message.
        PublishKey {
            body: 8,
            ..key("ann", "claims", "r1")
        },
    ] {
        assert_eq!(
            bus.claim_publish(&other, t, stale, window).await.unwrap(),
            PublishClaim::Fresh,
            "{other:?}"
        );
    }
    bus.settle_publish(&k, PublishOutcome::Stored(17), window)
        .await
        .unwrap();
    assert_eq!(
        bus.claim_publish(&k, t + 200, stale, window).await.unwrap(),
        PublishClaim::Stored(17)
    );
    // Released: claimable again.
    let k2 = key("ann", "claims", "r2");
    bus.settle_publish(&k2, PublishOutcome::NotStored, window)
        .await
        .unwrap();
    assert_eq!(
        bus.claim_publish(&k2, t + 300, stale, window)
            .await
            .unwrap(),
        PublishClaim::Fresh
    );
    // Unknown: in flight until stale, then unknown once, re-claimed by that caller.
    let k3 = key("ann", "claims", "r3");
    bus.settle_publish(&k3, PublishOutcome::Unknown { since: t }, window)
        .await
        .unwrap();
    assert_eq!(
        bus.claim_publish(&k3, t + stale - 1, stale, window)
            .await
            .unwrap(),
        PublishClaim::InFlight
    );
    assert_eq!(
        bus.claim_publish(&k3, t + stale, stale, window)
            .await
            .unwrap(),
        PublishClaim::Unknown { since: t }
    );
    assert_eq!(
        bus.claim_publish(&k3, t + stale + 1, stale, window)
            .await
            .unwrap(),
        PublishClaim::InFlight
    );
}

#[tokio::test]
async fn bus_memory_publish_claims() {
    let (bus, _events) = MemoryBus::new(&history_cfg());
    publish_claim_semantics(&bus).await;
}

#[tokio::test]
async fn bus_redis_publish_claims() {
    let server = RedisServer::start();
    let (bus, _events) = RedisBus::connect(&redis_cfg(&server), &history_cfg())
        .await
        .unwrap();
    publish_claim_semantics(&bus).await;
}

fn mark(origin: &str, partition: i32, offset: i64, live: bool) -> PartitionMark {
    PartitionMark {
        origin: origin.into(),
        partition,
        mark: OriginMark {
            offset,
            live,
            lag_ms: Some(if live { 0 } else { 1500 }),
            since: Some(1_700_000_000_000 + offset),
        },
    }
}

/// Replication watermarks, as the region's daemons share them: what one daemon puts, another
/// handle on the same bus reads, keyed by (origin, partition); a later put replaces; nothing
/// readable outlives its time to live (a dead task owner reads as gone).
async fn watermark_semantics<B: Bus>(writer: &B, reader: &B) {
    let keys = vec![
        ("seoul".to_owned(), 0),
        ("seoul".to_owned(), 1),
        ("tokyo".to_owned(), 0),
    ];
    assert_eq!(
        reader.watermarks(&keys).await.unwrap(),
        vec![None, None, None]
    );
    assert!(reader.watermarks(&[]).await.unwrap().is_empty());
    writer.put_watermarks(&[], 1_000).await.unwrap();
    let a = mark("seoul", 1, 41, true);
    let b = mark("tokyo", 0, 7, false);
    writer
        .put_watermarks(&[a.clone(), b.clone()], 60_000)
        .await
        .unwrap();
    assert_eq!(
        reader.watermarks(&keys).await.unwrap(),
        vec![None, Some(a.mark.clone()), Some(b.mark.clone())]
    );
    // A later put replaces the mark of its partition only.
    let a2 = mark("seoul", 1, 45, false);
    writer
        .put_watermarks(std::slice::from_ref(&a2), 60_000)
        .await
        .unwrap();
    assert_eq!(
        reader.watermarks(&keys).await.unwrap(),
        vec![None, Some(a2.mark), Some(b.mark)]
    );
    // Expiry: a mark put with a short time to live is gone after it.
    let c = mark("seoul", 0, 3, true);
    writer
        .put_watermarks(std::slice::from_ref(&c), 300)
        .await
        .unwrap();
    assert_eq!(
        reader.watermarks(&keys[..1]).await.unwrap(),
        vec![Some(c.mark)]
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(reader.watermarks(&keys[..1]).await.unwrap(), vec![None]);
}

#[tokio::test]
async fn bus_memory_watermarks() {
    let (a, _ea) = MemoryBus::new(&history_cfg());
    let (b, _eb) = a.attach();
    watermark_semantics(&a, &b).await;
}

#[tokio::test]
async fn bus_redis_watermarks() {
    let server = RedisServer::start();
    // Two daemons of one region: one Redis, one key prefix.
    let cfg = redis_cfg(&server);
    let (a, _ea) = RedisBus::connect(&cfg, &history_cfg()).await.unwrap();
    let (b, _eb) = RedisBus::connect(&cfg, &history_cfg()).await.unwrap();
    watermark_semantics(&a, &b).await;
}

#[tokio::test]
async fn bus_redis_watermark_garbage_reads_as_nothing() {
    let server = RedisServer::start();
    let cfg = redis_cfg(&server);
    let (bus, _e) = RedisBus::connect(&cfg, &history_cfg()).await.unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let prefix = cfg.key_prefix;
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}:{{wm}}:seoul:0"))
        .arg("not a mark")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(
        bus.watermarks(&[("seoul".to_owned(), 0)]).await.unwrap(),
        vec![None]
    );
}
