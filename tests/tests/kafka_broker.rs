//! The daemon's Kafka code (append, fan-out owner, replay) as a library against a real
//! broker started by the harness (`deploy/kafka.sh`), where the unit tests in `daemon/tests`
//! use librdkafka's mock cluster: the end-to-end path on one broker, and a broker restart
//! in the middle of a stream of appends.

#[path = "../../daemon/tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fake_bus::FakeBus;
use common::{init_tracing, room};
use dtfed::append::KafkaAppender;
use dtfed::config::KafkaConfig;
use dtfed::fanout::FanoutOwner;
use dtfed::kafka::{ensure_topic, partition_for};
use dtfed::metrics::Metrics;
use dtfed::replay::RoomLogReader;
use dtfed_proto::client::Body;
use dtfed_proto::record::LogValue;
use dtfed_tests::harness::KafkaBroker;
use tokio_util::sync::CancellationToken;

fn brokers() -> String {
    KafkaBroker::shared().expect("kafka").bootstrap()
}

fn cfg(topic: &str, partitions: i32) -> KafkaConfig {
    KafkaConfig {
        brokers: brokers(),
        local_topic: topic.into(),
        partitions,
        replication_factor: 1,
        publish_timeout_ms: 5000,
        fanout_group: format!("g-{topic}"),
        session_timeout_ms: 6000,
        ..KafkaConfig::default()
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}.{:08x}", rand::random::<u32>())
}

fn value(i: usize) -> LogValue {
    LogValue {
        from: format!("p{i}"),
        ts: 1_700_000_000_000 + i as i64,
        body: Body::from_json(&format!("{{\"n\":{i},\"text\":\"roll for initiative\"}}"))
            .expect("json"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_fanout_and_replay_on_a_real_broker() {
    init_tracing();
    let topic = unique("dtfed.test");
    let cfg = cfg(&topic, 6);
    let t0 = Instant::now();
    assert_eq!(ensure_topic(&cfg, &topic, 6).await.expect("create"), 6);
    eprintln!("ensure_topic (create) took {:?}", t0.elapsed());
    assert_eq!(ensure_topic(&cfg, &topic, 12).await.expect("exists"), 6);
    // A replication factor the cluster cannot give fails clearly, after the grace during
    // which `ensure_topic` takes InvalidReplicationFactor for brokers still registering
    // (10 s).
    let t0 = Instant::now();
    let bad = KafkaConfig {
        replication_factor: 3,
        ..cfg.clone()
    };
    let err = ensure_topic(&bad, &unique("dtfed.rf"), 1)
        .await
        .expect_err("one broker");
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    assert!(err.to_string().contains("replication"), "{err}");

    let app = KafkaAppender::with_node(&cfg, "seoul", "n1").expect("appender");
    let mut sent = Vec::new();
    let mut lat = Vec::new();
    for i in 0..300 {
        let r = room(i % 17);
        let t = Instant::now();
        let a = app.append(&r, &value(i)).await.expect("append");
        lat.push(t.elapsed());
        assert_eq!(a.partition, partition_for(&r, 6), "room {r}");
        sent.push((r, a.partition, a.offset));
    }
    lat.sort();
    eprintln!(
        "sequential append latency: p50 {:?} p99 {:?}",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100]
    );

    // Fan-out: two owners, then one leaves.
    let bus = Arc::new(FakeBus::default());
    let start = |node: &str, stop: &CancellationToken| {
        FanoutOwner::start(
            &cfg,
            "seoul",
            node,
            vec![topic.clone()],
            bus.clone(),
            Arc::new(Metrics::new("seoul")),
            stop.clone(),
        )
        .expect("start")
    };
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let t0 = Instant::now();
    let a = start("a", &stop_a);
    let b = start("b", &stop_b);
    let want: BTreeSet<(i32, i64)> = sent.iter().map(|(_, p, o)| (*p, *o)).collect();
    let seen = || -> BTreeSet<(i32, i64)> {
        bus.applied()
            .iter()
            .map(|r| (r.partition, r.offset))
            .collect()
    };
    let settled = || {
        let (sa, sb) = (a.status(), b.status());
        want.is_subset(&seen())
            && sa.partitions.len() + sb.partitions.len() == 6
            && !sa.partitions.is_empty()
            && !sb.partitions.is_empty()
    };
    while !settled() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "group never settled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "two owners joined and applied everything in {:?}",
        t0.elapsed()
    );

    let t0 = Instant::now();
    stop_a.cancel();
    a.join().await;
    eprintln!("owner a closed in {:?}", t0.elapsed());
    while b.status().partitions.len() < 6 {
        assert!(t0.elapsed() < Duration::from_secs(60), "b never took over");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("hand-over after a clean leave: {:?}", t0.elapsed());
    // Published after the hand-over: b applies it.
    let r = room(1);
    let t1 = Instant::now();
    let a9 = app.append(&r, &value(999)).await.expect("append");
    while !seen().contains(&(a9.partition, a9.offset)) {
        assert!(t1.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    eprintln!("append -> bus apply: {:?}", t1.elapsed());
    stop_b.cancel();
    b.join().await;

    // Replay.
    let reader = RoomLogReader::with_node(&cfg, "seoul", "n1", 6).expect("reader");
    for i in 0..17 {
        let r = room(i);
        let want: Vec<i64> = sent
            .iter()
            .filter(|(x, _, _)| *x == r)
            .map(|(_, _, o)| *o)
            .collect();
        let t = Instant::now();
        let read = reader.read_room(&r, None, None).await.expect("read");
        let got: Vec<i64> = read.records.iter().map(|x| x.offset).collect();
        let want: Vec<i64> = if i == 1 {
            want.into_iter().chain([a9.offset]).collect()
        } else {
            want
        };
        assert_eq!(got, want, "room {r}");
        if i < 3 {
            eprintln!("replay of {r}: {} records in {:?}", got.len(), t.elapsed());
        }
    }
}

/// Appends every 100 ms while an owner applies, and restarts the broker (stop, then start on
/// the same port and data) in the middle. Appends succeed before and after; every one that
/// failed failed within the publish timeout; every acknowledged append reaches the bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_no_acknowledged_append() {
    init_tracing();
    let broker = Arc::new(Mutex::new(KafkaBroker::start().expect("kafka")));
    let topic = unique("dtfed.outage");
    let mut cfg = cfg(&topic, 3);
    cfg.brokers = broker.lock().expect("lock").bootstrap();
    cfg.publish_timeout_ms = 2000;
    ensure_topic(&cfg, &topic, 3).await.expect("create");
    let app = KafkaAppender::with_node(&cfg, "seoul", "n1").expect("appender");
    let bus = Arc::new(FakeBus::default());
    let stop = CancellationToken::new();
    let owner = FanoutOwner::start(
        &cfg,
        "seoul",
        "n1",
        vec![topic.clone()],
        bus.clone(),
        Arc::new(Metrics::new("seoul")),
        stop.clone(),
    )
    .expect("owner");
    let secs: u64 = 25;
    let t0 = Instant::now();
    let restarter = {
        let broker = broker.clone();
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_secs(4));
            let mut b = broker.lock().expect("lock");
            b.restart().expect("restart the broker");
            eprintln!("broker restarted");
        })
    };
    let mut acked_after_restart = 0;
    let mut acked = Vec::new();
    let (mut ok, mut failed) = (0, 0);
    let mut last_ok = true;
    let mut i = 0;
    while t0.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        match app.append(&room(i % 5), &value(i)).await {
            Ok(a) => {
                if !last_ok {
                    eprintln!(
                        "{:>5.1}s: appends succeed again",
                        t0.elapsed().as_secs_f64()
                    );
                }
                last_ok = true;
                ok += 1;
                if restarter.is_finished() {
                    acked_after_restart += 1;
                }
                acked.push((a.partition, a.offset));
            }
            Err(e) => {
                if last_ok {
                    eprintln!("{:>5.1}s: append failed: {e}", t0.elapsed().as_secs_f64());
                }
                last_ok = false;
                failed += 1;
                assert!(t.elapsed() < cfg.publish_timeout() + Duration::from_secs(2));
            }
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("{ok} acknowledged, {failed} unavailable");
    restarter.await.expect("restart task");
    assert!(
        acked_after_restart > 10,
        "appends did not succeed again after the broker restart ({acked_after_restart} acknowledged after it)"
    );
    let want: BTreeSet<(i32, i64)> = acked.into_iter().collect();
    let t1 = Instant::now();
    loop {
        let seen: BTreeSet<(i32, i64)> = bus
            .applied()
            .iter()
            .map(|r| (r.partition, r.offset))
            .collect();
        let missing = want.difference(&seen).count();
        if missing == 0 {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(30),
            "{missing} acknowledged messages never reached the bus"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("every acknowledged message reached the bus");
    stop.cancel();
    owner.join().await;
}
