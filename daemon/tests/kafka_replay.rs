//! Replay reads against librdkafka's mock cluster.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{init_tracing, room, value};
use dtfed::append::KafkaAppender;
use dtfed::config::KafkaConfig;
use dtfed::kafka::{partition_for, MockKafka};
use dtfed::replay::{ReadLimit, RoomLogReader};
use dtfed_proto::RoomId;

struct Fixture {
    mock: MockKafka,
    cfg: KafkaConfig,
    /// room → offsets of its records, in order.
    sent: BTreeMap<RoomId, Vec<i64>>,
}

async fn fixture(topic: &str, partitions: i32, n: usize) -> Fixture {
    init_tracing();
    let mock = MockKafka::start(1).expect("mock");
    mock.create_topic(topic, partitions).expect("topic");
    let cfg = common::mock_kafka(&mock, topic, partitions);
    let app = KafkaAppender::with_node(&cfg, "seoul", "n1").expect("appender");
    let mut sent: BTreeMap<RoomId, Vec<i64>> = BTreeMap::new();
    for i in 0..n {
        let r = room(i % 7);
        let a = app.append(&r, &value(i)).await.expect("append");
        assert_eq!(a.partition, partition_for(&r, partitions));
        sent.entry(r).or_default().push(a.offset);
    }
    Fixture { mock, cfg, sent }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_exactly_the_rooms_records_in_a_range() {
    let f = fixture("r.range", 3, 140).await;
    let reader = RoomLogReader::with_node(&f.cfg, "seoul", "n1", 3).expect("reader");
    for (r, offsets) in &f.sent {
        let all = reader.read_room(r, None, None).await.expect("read");
        assert_eq!(all.partition, partition_for(r, 3));
        assert_eq!(all.earliest, 0);
        let got: Vec<i64> = all.records.iter().map(|x| x.offset).collect();
        assert_eq!(&got, offsets, "room {r}");
        for x in &all.records {
            assert_eq!(&x.room, r);
            assert_eq!(x.origin, "seoul");
            assert_eq!(x.partition, all.partition);
            let i: usize = x.value.from[1..].parse().expect("index");
            assert_eq!(x.value, value(i));
        }

        // A window: after < offset < before.
        let (a, b) = (offsets[3], offsets[15]);
        let win = reader.read_room(r, Some(a), Some(b)).await.expect("read");
        let got: Vec<i64> = win.records.iter().map(|x| x.offset).collect();
        let want: Vec<i64> = offsets
            .iter()
            .copied()
            .filter(|o| *o > a && *o < b)
            .collect();
        assert_eq!(got, want, "room {r} in ({a}, {b})");
        assert_eq!(got.len(), 11);

        // After the last record: nothing. Before the first: nothing.
        let last = *offsets.last().expect("records");
        assert!(reader
            .read_room(r, Some(last), None)
            .await
            .expect("read")
            .records
            .is_empty());
        assert!(reader
            .read_room(r, None, Some(offsets[0]))
            .await
            .expect("read")
            .records
            .is_empty());
        // A cursor beyond the end (a confused client) is empty too, not an error.
        assert!(reader
            .read_room(r, Some(last + 1000), None)
            .await
            .expect("read")
            .records
            .is_empty());
    }
    drop(f.mock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_stop_at_their_limit_and_continue_from_there() {
    let f = fixture("r.limit", 2, 140).await;
    for limit in [
        ReadLimit {
            messages: 3,
            bytes: usize::MAX,
            scanned: i64::MAX,
        },
        ReadLimit {
            messages: usize::MAX,
            bytes: usize::MAX,
            scanned: 10,
        },
        ReadLimit {
            messages: usize::MAX,
            bytes: 100,
            scanned: i64::MAX,
        },
    ] {
        let mut reader = RoomLogReader::with_node(&f.cfg, "seoul", "n1", 2).expect("reader");
        reader.set_limit(limit);
        for (r, offsets) in &f.sent {
            let mut after = None;
            let mut got = Vec::new();
            let mut pieces = 0;
            loop {
                let read = reader.read_room(r, after, None).await.expect("read");
                pieces += 1;
                assert!(pieces < 1000, "room {r}: no end with {limit:?}");
                assert!(read.records.len() <= limit.messages);
                got.extend(read.records.iter().map(|x| x.offset));
                match read.stopped_at {
                    Some(stop) => {
                        assert!(got.last().is_none_or(|l| *l <= stop));
                        after = Some(stop);
                    }
                    None => break,
                }
            }
            assert!(pieces > 1, "room {r}: one piece with {limit:?}");
            assert_eq!(&got, offsets, "room {r} in pieces with {limit:?}");
        }
    }
    drop(f.mock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_reads_are_all_correct() {
    let f = fixture("r.conc", 2, 70).await;
    let reader = Arc::new(RoomLogReader::with_node(&f.cfg, "seoul", "n1", 2).expect("reader"));
    let mut tasks = Vec::new();
    for round in 0..3 {
        for (r, offsets) in f.sent.clone() {
            let reader = Arc::clone(&reader);
            tasks.push(tokio::spawn(async move {
                let after = offsets.get(round).copied();
                let read = reader.read_room(&r, after, None).await.expect("read");
                let got: Vec<i64> = read.records.iter().map(|x| x.offset).collect();
                let want: Vec<i64> = offsets
                    .iter()
                    .copied()
                    .filter(|o| after.is_none_or(|a| *o > a))
                    .collect();
                assert_eq!(got, want, "room {r} after {after:?}");
            }));
        }
    }
    for t in tasks {
        t.await.expect("task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_with_kafka_down_fails_within_the_timeout() {
    let f = fixture("r.down", 1, 5).await;
    let mut reader = RoomLogReader::with_node(&f.cfg, "seoul", "n1", 1).expect("reader");
    reader.set_timeout(Duration::from_secs(2));
    f.mock.broker_down(-1).expect("down");
    let t0 = Instant::now();
    let err = reader
        .read_room(&room(0), None, None)
        .await
        .expect_err("Kafka is down");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    eprintln!("{err}");
    f.mock.broker_up(-1).expect("up");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match reader.read_room(&room(0), None, None).await {
            Ok(read) => {
                assert_eq!(read.records.len(), 1);
                break;
            }
            Err(e) if Instant::now() < deadline => eprintln!("not yet: {e}"),
            Err(e) => panic!("Kafka is back but reads fail: {e}"),
        }
    }
}
