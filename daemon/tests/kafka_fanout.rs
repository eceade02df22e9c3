//! Fan-out owners against librdkafka's mock cluster, with an in-memory bus that records
//! every apply.

mod common;

fn cfg(mock: &MockKafka, topic: &str, partitions: i32, group: &str) -> KafkaConfig {
    KafkaConfig {
        fanout_group: group.into(),
        ..common::mock_kafka(mock, topic, partitions)
    }
}

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake_bus::FakeBus;
use common::{init_tracing, room, value, wait_for};
use dtfed::append::KafkaAppender;
use dtfed::bus::Bus;
use dtfed::config::KafkaConfig;
use dtfed::fanout::FanoutOwner;
use dtfed::kafka::MockKafka;
use dtfed::metrics::Metrics;
use dtfed_proto::record::{HEADER_ORIGIN, HEADER_ORIGIN_OFFSET};
use dtfed_proto::{LogRecord, RoomId};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

/// Appends `n` messages over 13 rooms; returns (partition, offset) of each.
async fn publish(app: &KafkaAppender, from: usize, n: usize) -> Vec<(i32, i64)> {
    let mut out = Vec::new();
    for i in from..from + n {
        let a = app.append(&room(i % 13), &value(i)).await.expect("append");
        out.push((a.partition, a.offset));
    }
    out
}

/// Every partition's records reached the bus in offset order.
fn assert_in_partition_order(applied: &[LogRecord]) {
    let mut last: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for r in applied {
        let k = (r.origin.clone(), r.partition);
        if let Some(prev) = last.get(&k) {
            assert!(
                r.offset > *prev,
                "{}/{}: offset {} applied after {}",
                r.origin,
                r.partition,
                r.offset,
                prev
            );
        }
        last.insert(k, r.offset);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_every_record_in_partition_order() {
    init_tracing();
    let mock = MockKafka::start(1).expect("mock");
    mock.create_topic("f.order", 4).expect("topic");
    let cfg = cfg(&mock, "f.order", 4, "g-order");
    let app = KafkaAppender::with_node(&cfg, "seoul", "n1").expect("appender");
    let mut sent = publish(&app, 0, 120).await;

    let bus = Arc::new(FakeBus::default());
    let metrics = Arc::new(Metrics::new("seoul"));
    let stop = CancellationToken::new();
    let owner = FanoutOwner::start(
        &cfg,
        "seoul",
        "n1",
        vec!["f.order".into()],
        bus.clone(),
        metrics.clone(),
        stop.clone(),
    )
    .expect("start");
    // Records published while the owner runs are applied too.
    sent.extend(publish(&app, 120, 60).await);
    wait_for("all records", Duration::from_secs(30), || {
        bus.len() >= sent.len()
    })
    .await;
    let applied = bus.applied();
    assert_eq!(
        applied.len(),
        sent.len(),
        "each record applied exactly once"
    );
    assert_in_partition_order(&applied);
    let got: BTreeSet<(i32, i64)> = applied.iter().map(|r| (r.partition, r.offset)).collect();
    let want: BTreeSet<(i32, i64)> = sent.iter().copied().collect();
    assert_eq!(got, want);
    for r in &applied {
        assert_eq!(r.origin, "seoul");
        let i: usize = r.value.from[1..].parse().expect("index");
        assert_eq!(r.room, room(i % 13));
        assert_eq!(r.value, value(i));
    }

    let status = owner.status();
    assert!(status.joined);
    assert_eq!(status.partitions.len(), 4, "{status:?}");
    // Positions and high watermarks (from librdkafka's statistics) converge.
    wait_for("status to catch up", Duration::from_secs(10), || {
        let s = owner.status();
        s.partitions
            .iter()
            .all(|p| p.position >= 0 && p.position == p.high_watermark)
    })
    .await;
    let text = metrics.encode();
    assert!(text.contains("dtfed_fanout_applied_total"), "{text}");
    assert!(text.contains("dtfed_fanout_lag_records"), "{text}");

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), owner.join())
        .await
        .expect("owner stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_bus_is_retried_without_loss_or_reordering() {
    init_tracing();
    let mock = MockKafka::start(1).expect("mock");
    mock.create_topic("f.retry", 3).expect("topic");
    let cfg = cfg(&mock, "f.retry", 3, "g-retry");
    let app = KafkaAppender::with_node(&cfg, "seoul", "n1").expect("appender");
    let sent = publish(&app, 0, 40).await;
    let bus = FakeBus::failing(6);
    let stop = CancellationToken::new();
    let owner = FanoutOwner::start(
        &cfg,
        "seoul",
        "n1",
        vec!["f.retry".into()],
        bus.clone(),
        Arc::new(Metrics::new("seoul")),
        stop.clone(),
    )
    .expect("start");
    wait_for("all records", Duration::from_secs(40), || {
        bus.len() >= sent.len()
    })
    .await;
    assert_eq!(bus.failures.load(Ordering::SeqCst), 6);
    let applied = bus.applied();
    assert_eq!(applied.len(), sent.len());
    assert_in_partition_order(&applied);
    let got: BTreeSet<(i32, i64)> = applied.iter().map(|r| (r.partition, r.offset)).collect();
    assert_eq!(got, sent.iter().copied().collect());
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), owner.join())
        .await
        .expect("owner stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_owners_split_the_partitions_and_hand_over_without_loss() {
    init_tracing();
    let mock = MockKafka::start(1).expect("mock");
    mock.create_topic("f.group", 4).expect("topic");
    let cfg = cfg(&mock, "f.group", 4, "g-group");
    let app = KafkaAppender::with_node(&cfg, "seoul", "n1").expect("appender");
    let bus = Arc::new(FakeBus::default());
    let stop_a = CancellationToken::new();
    let stop_b = CancellationToken::new();
    let start = |node: &str, stop: &CancellationToken| {
        FanoutOwner::start(
            &cfg,
            "seoul",
            node,
            vec!["f.group".into()],
            bus.clone(),
            Arc::new(Metrics::new("seoul")),
            stop.clone(),
        )
        .expect("start")
    };
    let a = start("a", &stop_a);
    let b = start("b", &stop_b);
    let mut sent = publish(&app, 0, 40).await;
    wait_for("a split assignment", Duration::from_secs(30), || {
        let (sa, sb) = (a.status(), b.status());
        sa.joined && sb.joined && sa.partitions.len() == 2 && sb.partitions.len() == 2
    })
    .await;
    wait_for("the first records", Duration::from_secs(20), || {
        bus.len() >= sent.len()
    })
    .await;

    // Owner a leaves while messages keep coming; b must take over its partitions.
    let t0 = Instant::now();
    stop_a.cancel();
    let publisher = async {
        let mut more = Vec::new();
        for k in 0..10 {
            more.extend(publish(&app, 40 + k * 8, 8).await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        more
    };
    let (more, ()) = tokio::join!(publisher, async {
        tokio::time::timeout(Duration::from_secs(15), a.join())
            .await
            .expect("a stops");
    });
    sent.extend(more);
    wait_for("b owns every partition", Duration::from_secs(30), || {
        b.status().partitions.len() == 4
    })
    .await;
    let handover = t0.elapsed();
    let want: BTreeSet<(i32, i64)> = sent.iter().copied().collect();
    wait_for(
        "every record after the hand-over",
        Duration::from_secs(30),
        || {
            let got: BTreeSet<(i32, i64)> = bus
                .applied()
                .iter()
                .map(|r| (r.partition, r.offset))
                .collect();
            want.is_subset(&got)
        },
    )
    .await;
    eprintln!(
        "hand-over took {handover:?}; {} applies for {} records",
        bus.len(),
        want.len()
    );
    stop_b.cancel();
    tokio::time::timeout(Duration::from_secs(15), b.join())
        .await
        .expect("b stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_records_take_origin_from_headers_and_poison_is_skipped() {
    init_tracing();
    let mock = MockKafka::start(1).expect("mock");
    mock.create_topic("f.local", 1).expect("topic");
    mock.create_topic("dtfed.mirror.tokyo", 2).expect("topic");
    let cfg = cfg(&mock, "f.local", 1, "g-mirror");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap())
        .create()
        .expect("producer");
    let mirror = "dtfed.mirror.tokyo";
    let send = |key: Option<&'static str>,
                payload: String,
                headers: Option<OwnedHeaders>,
                partition: i32| {
        let producer = producer.clone();
        async move {
            let mut rec: FutureRecord<'_, str, String> = FutureRecord::to(mirror)
                .payload(&payload)
                .partition(partition);
            if let Some(k) = key {
                rec = rec.key(k);
            }
            if let Some(h) = headers {
                rec = rec.headers(h);
            }
            producer
                .send(rec, Duration::from_secs(5))
                .await
                .expect("produce");
        }
    };
    let hdr = |off: i64| {
        Some(
            OwnedHeaders::new()
                .insert(Header {
                    key: HEADER_ORIGIN,
                    value: Some("tokyo"),
                })
                .insert(Header {
                    key: HEADER_ORIGIN_OFFSET,
                    value: Some(off.to_string().as_str()),
                }),
        )
    };
    let good = |i: usize| value(i).to_json();
    send(Some("r1"), good(0), hdr(1000), 0).await;
    send(None, good(1), hdr(1001), 0).await; // no key
    send(Some("bad room"), good(2), hdr(1002), 0).await; // invalid room id
    send(Some("r1"), "{not json".into(), hdr(1003), 0).await; // bad value
    send(Some("r1"), good(4), None, 0).await; // mirror record without headers
    send(Some("r1"), good(5), hdr(1005), 0).await;
    send(Some("r2"), good(6), hdr(77), 1).await;

    let bus = Arc::new(FakeBus::default());
    let stop = CancellationToken::new();
    let owner = FanoutOwner::start(
        &cfg,
        "seoul",
        "n1",
        vec!["f.local".into(), mirror.into()],
        bus.clone(),
        Arc::new(Metrics::new("seoul")),
        stop.clone(),
    )
    .expect("start");
    wait_for("the good records", Duration::from_secs(30), || {
        bus.len() >= 3
    })
    .await;
    wait_for("the skips counted", Duration::from_secs(10), || {
        owner.status().skipped == 4
    })
    .await;
    let mut applied = bus.applied();
    applied.sort_by_key(|r| (r.partition, r.offset));
    let seen: Vec<(String, i32, i64, String)> = applied
        .iter()
        .map(|r| (r.origin.clone(), r.partition, r.offset, r.room.to_string()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("tokyo".into(), 0, 1000, "r1".into()),
            ("tokyo".into(), 0, 1005, "r1".into()),
            ("tokyo".into(), 1, 77, "r2".into()),
        ]
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), owner.join())
        .await
        .expect("owner stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_with_an_empty_assignment_is_joined() {
    init_tracing();
    let mock = MockKafka::start(1).expect("mock");
    mock.create_topic("f.one", 1).expect("topic");
    let cfg = cfg(&mock, "f.one", 1, "g-one");
    let bus = Arc::new(FakeBus::default());
    let stops = [CancellationToken::new(), CancellationToken::new()];
    let owners: Vec<FanoutOwner> = ["a", "b"]
        .iter()
        .zip(&stops)
        .map(|(node, stop)| {
            FanoutOwner::start(
                &cfg,
                "seoul",
                node,
                vec!["f.one".into()],
                bus.clone(),
                Arc::new(Metrics::new("seoul")),
                stop.clone(),
            )
            .expect("start")
        })
        .collect();
    wait_for("both joined", Duration::from_secs(30), || {
        owners.iter().all(|o| o.status().joined)
    })
    .await;
    wait_for(
        "one owner of the partition",
        Duration::from_secs(10),
        || {
            owners
                .iter()
                .map(|o| o.status().partitions.len())
                .sum::<usize>()
                == 1
        },
    )
    .await;
    for s in &stops {
        s.cancel();
    }
    for o in owners {
        tokio::time::timeout(Duration::from_secs(15), o.join())
            .await
            .expect("owner stops");
    }
}

/// A record in `dtfed.mirror.tokyo` labelled as this region (seoul) or as a third region,
/// with a huge offset: the origin of a mirror record is its topic's, so the forged labels
/// are skipped (logged, counted in `fanout_skipped{reason="origin_mismatch"}`) and every
/// genuine message of seoul and tokyo in the room still reaches the bus's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_record_labelled_as_another_origin_suppresses_nothing() {
    init_tracing();
    let mock = MockKafka::start(1).expect("mock");
    mock.create_topic("f.local", 1).expect("topic");
    let mirror = "dtfed.mirror.tokyo";
    mock.create_topic(mirror, 1).expect("topic");
    let cfg = cfg(&mock, "f.local", 1, "g-forged");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap())
        .create()
        .expect("producer");
    let send = |topic: &'static str, claim: Option<&'static str>, offset: i64, i: usize| {
        let producer = producer.clone();
        async move {
            let payload = value(i).to_json();
            let mut headers = OwnedHeaders::new();
            if let Some(claim) = claim {
                headers = headers.insert(Header {
                    key: HEADER_ORIGIN,
                    value: Some(claim),
                });
            }
            let headers = headers.insert(Header {
                key: HEADER_ORIGIN_OFFSET,
                value: Some(offset.to_string().as_str()),
            });
            let rec: FutureRecord<'_, str, String> = FutureRecord::to(topic)
                .key("r1")
                .payload(&payload)
                .partition(0)
                .headers(headers);
            producer
                .send(rec, Duration::from_secs(5))
                .await
                .expect("produce");
        }
    };
    // The values are from 2023: keep them in the history.
    let history = dtfed::config::HistoryConfig {
        max_messages: 100,
        max_age_secs: 100 * 365 * 86_400,
    };
    let (bus, _events) = dtfed::bus::memory::MemoryBus::new(&history);
    let bus = Arc::new(bus);
    let metrics = Arc::new(Metrics::new("seoul"));
    let stop = CancellationToken::new();
    let owner = FanoutOwner::start(
        &cfg,
        "seoul",
        "n1",
        vec!["f.local".into(), mirror.into()],
        bus.clone(),
        metrics.clone(),
        stop.clone(),
    )
    .expect("start");
    // The forgeries first: as the receiver itself and as a third region, far ahead.
    send(mirror, Some("seoul"), 1_000_000, 0).await;
    send(mirror, Some("frankfurt"), 1_000_000, 1).await;
    wait_for("the forgeries skipped", Duration::from_secs(30), || {
        owner.status().skipped == 2
    })
    .await;
    // Then the genuine messages: seoul's own (local topic, offset 0) and tokyo's.
    send("f.local", Some("seoul"), 0, 2).await;
    send(mirror, Some("tokyo"), 5, 3).await;
    send(mirror, None, 6, 4).await;
    let room = RoomId::parse("r1").expect("room");
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 3 && Instant::now() < deadline {
        seen = bus
            .history(&room)
            .await
            .expect("history")
            .iter()
            .map(|m| (m.origin.clone(), m.offset, m.from.clone()))
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("seoul".into(), 0, "p2".into()),
            ("tokyo".into(), 5, "p3".into()),
            ("tokyo".into(), 6, "p4".into()),
        ]
    );
    let text = metrics.encode();
    assert!(
        text.lines()
            .any(|l| l.starts_with("dtfed_fanout_skipped_total{")
                && l.contains("reason=\"origin_mismatch\"")
                && l.ends_with(" 2")),
        "{text}"
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), owner.join())
        .await
        .expect("owner stops");
}

/// A real `redis-server` on a free port, killed on drop.
struct RedisProcess {
    child: std::process::Child,
    port: u16,
}

impl RedisProcess {
    fn start() -> RedisProcess {
        for _ in 0..20 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("free port");
            let mut child = std::process::Command::new("/usr/bin/redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return RedisProcess { child, port };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not start redis-server");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One room whose Redis state refuses every apply (its tails hash holds garbage: the
/// script fails, for good) shares its partitions and batches with other rooms. Every other
/// room's messages still reach the bus, on every partition; the cursed room's records are
/// quarantined (counted in `fanout_skipped{reason="quarantined"}`), and once an operator
/// repairs the room its new messages flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_the_bus_refuses_is_quarantined_and_stalls_nothing_else() {
    init_tracing();
    let redis_server = RedisProcess::start();
    let redis_cfg = dtfed::config::RedisConfig {
        url: redis_server.url(),
        key_prefix: "q".into(),
    };
    let client = redis::Client::open(redis_server.url()).expect("client");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let cursed_tails = "q:{cursed}:t";
    let _: () = redis::cmd("HSET")
        .arg(cursed_tails)
        .arg("seoul")
        .arg("garbage")
        .query_async(&mut con)
        .await
        .expect("hset");
    let history = dtfed::config::HistoryConfig {
        max_messages: 1000,
        max_age_secs: 100 * 365 * 86_400,
    };
    let (bus, _events) = dtfed::bus::redis::RedisBus::connect(&redis_cfg, &history)
        .await
        .expect("bus");
    let bus = Arc::new(bus);

    let mock = MockKafka::start(1).expect("mock");
    mock.create_topic("f.cursed", 3).expect("topic");
    let cfg = cfg(&mock, "f.cursed", 3, "g-cursed");
    let app = KafkaAppender::with_node(&cfg, "seoul", "n1").expect("appender");
    let cursed = RoomId::parse("cursed").expect("room");
    // Interleaved: 13 ordinary rooms over every partition, and the cursed room.
    let mut last: BTreeMap<RoomId, i64> = BTreeMap::new();
    let mut cursed_sent = 0;
    for i in 0..90 {
        let r = if i % 10 == 3 {
            cursed_sent += 1;
            cursed.clone()
        } else {
            room(i % 13)
        };
        let a = app.append(&r, &value(i)).await.expect("append");
        if r != cursed {
            last.insert(r, a.offset);
        }
    }
    let partitions: BTreeSet<i32> = (0..13)
        .map(|i| dtfed::kafka::partition_for(&room(i), 3))
        .collect();
    assert!(partitions.len() > 1, "the ordinary rooms span partitions");

    let metrics = Arc::new(Metrics::new("seoul"));
    let stop = CancellationToken::new();
    let owner = FanoutOwner::start(
        &cfg,
        "seoul",
        "n1",
        vec!["f.cursed".into()],
        bus.clone(),
        metrics.clone(),
        stop.clone(),
    )
    .expect("start");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut behind = Vec::new();
        for (r, want) in &last {
            let got = bus.tails(r).await.expect("tails").get("seoul");
            if got != Some(*want) {
                behind.push((r.to_string(), got, *want));
            }
        }
        if behind.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rooms behind (room, applied, published): {behind:?}; status {:?}",
            owner.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for(
        "the cursed records quarantined",
        Duration::from_secs(30),
        || owner.status().skipped == cursed_sent,
    )
    .await;
    let text = metrics.encode();
    assert!(
        text.lines()
            .any(|l| l.starts_with("dtfed_fanout_skipped_total{")
                && l.contains("reason=\"quarantined\"")
                && l.ends_with(&format!(" {cursed_sent}"))),
        "{text}"
    );
    // The operator repairs the room: its next message is applied.
    let _: () = redis::cmd("DEL")
        .arg(cursed_tails)
        .query_async(&mut con)
        .await
        .expect("del");
    let a = app.append(&cursed, &value(1000)).await.expect("append");
    let deadline = Instant::now() + Duration::from_secs(30);
    while bus.tails(&cursed).await.expect("tails").get("seoul") != Some(a.offset) {
        assert!(Instant::now() < deadline, "the repaired room stays stuck");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), owner.join())
        .await
        .expect("owner stops");
}
