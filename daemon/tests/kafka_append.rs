//! The publish path against librdkafka's mock cluster: partitioning, acknowledgements,
//! and a Kafka outage turning into `Unavailable` and back.

mod common;

fn cfg(mock: &MockKafka, topic: &str, partitions: i32) -> KafkaConfig {
    KafkaConfig {
        publish_timeout_ms: 1500,
        ..common::mock_kafka(mock, topic, partitions)
    }
}

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{init_tracing, value};
use dtfed::append::{AppendError, KafkaAppender};
use dtfed::config::KafkaConfig;
use dtfed::kafka::{ensure_topic, ensure_topic_within, partition_for, KafkaSetupError, MockKafka};
use dtfed_proto::RoomId;

fn room(s: &str) -> RoomId {
    RoomId::parse(s).expect("room")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produced_partition_matches_partition_for_and_offsets_increase() {
    init_tracing();
    let mock = MockKafka::start(1).expect("mock");
    mock.create_topic("t.part", 7).expect("topic");
    let cfg = cfg(&mock, "t.part", 7);
    assert_eq!(ensure_topic(&cfg, "t.part", 7).await.expect("ensure"), 7);
    let app = KafkaAppender::with_node(&cfg, "seoul", "n1").expect("appender");
    let mut last: HashMap<i32, i64> = HashMap::new();
    let rooms: Vec<RoomId> = (0..60)
        .map(|i| room(&format!("room-{i}:{}", "x".repeat(i % 9))))
        .chain(
            [
                "21",
                "foobar",
                "abc",
                "a",
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            ]
            .map(room),
        )
        .collect();
    for (i, r) in rooms.iter().enumerate() {
        for k in 0..2 {
            let a = app.append(r, &value(i * 2 + k)).await.expect("append");
            assert_eq!(
                a.partition,
                partition_for(r, 7),
                "room {r}: librdkafka murmur2_random and partition_for disagree"
            );
            if let Some(prev) = last.get(&a.partition) {
                assert!(a.offset > *prev, "offsets must increase per partition");
            }
            last.insert(a.partition, a.offset);
        }
    }
    // Several partitions were used.
    assert!(last.len() >= 5, "{last:?}");
    app.flush(Duration::from_secs(2)).expect("flush");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_is_unavailable_within_the_timeout_then_recovers() {
    init_tracing();
    let mock = MockKafka::start(1).expect("mock");
    mock.create_topic("t.outage", 2).expect("topic");
    let cfg = cfg(&mock, "t.outage", 2);
    let app = KafkaAppender::with_node(&cfg, "seoul", "n1").expect("appender");
    let r = room("room-1");
    let first = app.append(&r, &value(0)).await.expect("append while up");

    mock.broker_down(-1).expect("down");
    let t0 = Instant::now();
    let err = app
        .append(&r, &value(1))
        .await
        .expect_err("must not succeed while Kafka is down");
    let took = t0.elapsed();
    assert!(
        matches!(
            err,
            AppendError::Unavailable(_) | AppendError::MaybeStored(_)
        ),
        "{err}"
    );
    assert!(
        took <= cfg.publish_timeout() + Duration::from_millis(1500),
        "took {took:?}"
    );
    // Several more while down: each answers, none hangs.
    for i in 2..5 {
        let t0 = Instant::now();
        assert!(app.append(&r, &value(i)).await.is_err());
        assert!(t0.elapsed() <= cfg.publish_timeout() + Duration::from_millis(1500));
    }

    mock.broker_up(-1).expect("up");
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        match app.append(&r, &value(9)).await {
            Ok(a) => break a,
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("Kafka is back but appends still fail: {e}"),
        }
    };
    assert_eq!(after.partition, first.partition);
    assert!(after.offset > first.offset);
    // And keep succeeding.
    let again = app
        .append(&r, &value(10))
        .await
        .expect("append after recovery");
    assert!(again.offset > after.offset);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_topic_reports_the_real_count_and_fails_clearly() {
    init_tracing();
    let mock = MockKafka::start(1).expect("mock");
    mock.create_topic("t.exists", 3).expect("topic");
    let c = cfg(&mock, "t.exists", 8);
    // The mock does not implement CreateTopics; an existing topic is still fine, with its
    // real partition count.
    assert_eq!(ensure_topic(&c, "t.exists", 8).await.expect("ensure"), 3);
    // A missing topic is created through the mock's own API.
    let t0 = Instant::now();
    assert_eq!(ensure_topic(&c, "t.missing", 5).await.expect("create"), 5);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(ensure_topic(&c, "t.missing", 9).await.expect("again"), 5);

    // Nothing listening: a clear "unreachable" within the deadline.
    let dead = KafkaConfig {
        brokers: "127.0.0.1:1".into(),
        ..c.clone()
    };
    let t0 = Instant::now();
    let err = ensure_topic_within(&dead, "t", 1, Duration::from_secs(2))
        .await
        .expect_err("no broker");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert!(matches!(err, KafkaSetupError::Unreachable { .. }), "{err}");
    eprintln!("{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_producer_is_replaced_transparently() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    init_tracing();
    let mock = MockKafka::start(1).expect("mock");
    mock.create_topic("t.fatal", 1).expect("topic");
    let cfg = cfg(&mock, "t.fatal", 1);
    let app = KafkaAppender::with_node(&cfg, "seoul", "n1").expect("appender");
    let r = room("room-1");
    let first = app.append(&r, &value(0)).await.expect("append");
    // The broker claims the head-of-line request is out of sequence: librdkafka's
    // idempotent producer can no longer vouch for ordering and turns fatal.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
    )
    .expect("inject");
    let err = app.append(&r, &value(1)).await.expect_err("refused");
    assert!(
        matches!(
            err,
            AppendError::Unavailable(_) | AppendError::MaybeStored(_)
        ),
        "{err}"
    );
    eprintln!("while fatal: {err}");
    // The next append goes through a fresh producer.
    let next = app.append(&r, &value(2)).await.expect("append after fatal");
    assert!(next.offset > first.offset);
}
