//! The daemon's Kafka mirror logs (`dtfed::mirror::{origin, sink}`,
//! `dtfed::replay::remote`) against librdkafka's mock cluster, and the same checks (plus
//! what the mock cannot do: DeleteRecords, transaction markers) against the real broker the
//! harness starts (`deploy/kafka.sh`), one broker shared by this file's tests.

#[path = "../../daemon/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{init_tracing, room, value};
use dtfed::append::KafkaAppender;
use dtfed::config::KafkaConfig;
use dtfed::kafka::{ensure_topic, partition_for, MockKafka};
use dtfed::mirror::mirror_topic;
use dtfed::mirror::origin::{KafkaOriginLog, OriginReaderTuning};
use dtfed::mirror::sink::{ensure_mirror_topic, KafkaMirrorLog};
use dtfed::replay::{MirrorRoomReader, ReadLimit};
use dtfed_proto::link::codec::record_len_bound;
use dtfed_proto::link::LinkRecord;
use dtfed_proto::record::now_ms;
use dtfed_proto::record::{LogValue, HEADER_FROM, HEADER_ORIGIN};
use dtfed_proto::RoomId;
use dtfed_regions::mirror::log::{LogError, MirrorLog, OriginLog};
use dtfed_tests::harness::KafkaBroker;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::config::FromClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// A check as two tests: on librdkafka's mock cluster, and on the harness's real broker.
macro_rules! on_both_clusters {
    ($mock:ident, $real:ident, $check:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $mock() {
            $check(&Cluster::mock()).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $real() {
            $check(&Cluster::real()).await;
        }
    };
}

/// Where a test runs: librdkafka's mock cluster, or the harness's real broker (shared by
/// this file's tests).
enum Cluster {
    Mock(MockKafka),
    Real(String),
}

impl Cluster {
    fn mock() -> Cluster {
        init_tracing();
        Cluster::Mock(MockKafka::start(1).expect("mock"))
    }

    fn real() -> Cluster {
        init_tracing();
        Cluster::Real(KafkaBroker::shared().expect("kafka").bootstrap())
    }

    fn cfg(&self, local_topic: &str) -> KafkaConfig {
        KafkaConfig {
            brokers: match self {
                Cluster::Mock(m) => m.bootstrap(),
                Cluster::Real(b) => b.clone(),
            },
            local_topic: local_topic.into(),
            partitions: 3,
            publish_timeout_ms: 5000,
            ..KafkaConfig::default()
        }
    }

    /// `base`, made unique on a real broker (topics outlive a run there).
    fn name(&self, base: &str) -> String {
        match self {
            Cluster::Mock(_) => base.to_owned(),
            Cluster::Real(_) => format!("{base}-{:06x}", rand::random::<u32>() & 0xff_ffff),
        }
    }

    async fn create_topic(&self, topic: &str, partitions: i32) {
        match self {
            Cluster::Mock(m) => m.create_topic(topic, partitions).expect("topic"),
            Cluster::Real(_) => {
                let n = ensure_topic(&self.cfg("unused"), topic, partitions)
                    .await
                    .expect("topic");
                assert_eq!(n, partitions);
            }
        }
    }

    fn mock_kafka(&self) -> &MockKafka {
        match self {
            Cluster::Mock(m) => m,
            Cluster::Real(_) => panic!("a mock-only test"),
        }
    }
}

/// Origin timestamps of the records written here: recent, so a real broker's time-based
/// retention leaves them alone.
fn ts_base() -> i64 {
    static BASE: OnceLock<i64> = OnceLock::new();
    *BASE.get_or_init(|| now_ms() - 3_600_000)
}

/// An origin record as the mirror client would hand it over.
fn link(offset: i64, room: &RoomId, v: &LogValue) -> LinkRecord {
    LinkRecord {
        offset,
        timestamp_ms: ts_base() + offset,
        key: room.as_str().as_bytes().to_vec(),
        headers: vec![
            (HEADER_ORIGIN.to_owned(), b"tokyo".to_vec()),
            (HEADER_FROM.to_owned(), v.from.as_bytes().to_vec()),
        ],
        value: v.to_json().into_bytes(),
    }
}

fn watermarks(cfg: &KafkaConfig, topic: &str, partition: i32) -> (i64, i64) {
    let mut cc = rdkafka::ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.brokers);
    let c: BaseConsumer = BaseConsumer::from_config(&cc).expect("consumer");
    c.fetch_watermarks(topic, partition, Duration::from_secs(5))
        .expect("watermarks")
}

async fn watermarks_async(cfg: &KafkaConfig, topic: &str, partition: i32) -> (i64, i64) {
    let (cfg, topic) = (cfg.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || watermarks(&cfg, &topic, partition))
        .await
        .expect("task")
}

/// Reads `partition` of `log` from `from` until offset `end` (exclusive) is passed, in
/// batches of at most `max_bytes` (or one record), checking each batch's shape.
async fn read_all(
    log: &KafkaOriginLog,
    partition: i32,
    from: i64,
    end: i64,
    max_bytes: usize,
) -> Vec<LinkRecord> {
    let mut reader = log.open(partition, from).await.expect("open");
    let mut out: Vec<LinkRecord> = Vec::new();
    let started = Instant::now();
    while out.last().map_or(from, |r| r.offset + 1) < end {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "reading {partition} from {from}: stuck at {:?}",
            out.last().map(|r| r.offset)
        );
        let batch = reader.next_batch(max_bytes).await.expect("batch");
        if batch.records.len() > 1 {
            let bytes: usize = batch.records.iter().map(record_len_bound).sum();
            assert!(bytes <= max_bytes, "batch of {bytes} bytes > {max_bytes}");
        }
        for w in batch.records.windows(2) {
            assert!(w[0].offset < w[1].offset);
        }
        if let (Some(prev), Some(first)) = (out.last(), batch.records.first()) {
            assert!(prev.offset < first.offset);
        }
        if let Some(last) = batch.records.last() {
            assert!(batch.high_watermark > last.offset);
        }
        out.extend(batch.records);
    }
    out
}

/// Reads `partition` of `log` from its start until `n` records arrived (what is past them
/// may be commit markers, which readers never see).
async fn read_count(log: &KafkaOriginLog, partition: i32, n: usize) -> Vec<LinkRecord> {
    let mut reader = log.open(partition, 0).await.expect("open");
    let mut out: Vec<LinkRecord> = Vec::new();
    let started = Instant::now();
    while out.len() < n {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "reading {partition}: {} of {n} records",
            out.len()
        );
        out.extend(reader.next_batch(64 * 1024).await.expect("batch").records);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Mirror appends and tails
// ---------------------------------------------------------------------------------------

async fn check_append_tail_read_back(c: &Cluster) {
    let origin = c.name("tokyo");
    let topic = mirror_topic(&origin);
    assert_eq!(topic, format!("dtfed.mirror.{origin}"));
    c.create_topic(&topic, 4).await;
    let cfg = c.cfg("dtfed.local");
    assert_eq!(
        ensure_mirror_topic(&cfg, &origin, 4).await.expect("ensure"),
        (topic.clone(), 4)
    );
    // An existing mirror topic keeps its count (the mirror client checks it against the
    // origin's on every link).
    assert_eq!(
        ensure_mirror_topic(&cfg, &origin, 3).await.expect("ensure"),
        (topic.clone(), 4)
    );
    assert!(ensure_mirror_topic(&cfg, "Not A Region", 3).await.is_err());

    let log = KafkaMirrorLog::with_node(&cfg, "seoul", "n1").expect("mirror log");
    for p in 0..4 {
        assert_eq!(log.tail(&origin, p).await.expect("tail"), None);
    }

    // 1000 records with sparse origin offsets over partitions 0..3; partition 3 stays empty.
    let mut rng = StdRng::seed_from_u64(7);
    let mut sent: BTreeMap<i32, Vec<LinkRecord>> = BTreeMap::new();
    let mut next = [0i64; 3];
    let mut i = 0usize;
    while i < 1000 {
        let p = rng.random_range(0..3i32);
        let n = rng.random_range(1..=60usize).min(1000 - i);
        let mut batch = Vec::with_capacity(n);
        for _ in 0..n {
            let o = &mut next[p as usize];
            *o += rng.random_range(1..=5i64);
            batch.push(link(*o, &room(i % 11), &value(i)));
            i += 1;
        }
        log.append(&origin, p, &batch).await.expect("append");
        sent.entry(p).or_default().extend(batch);
    }
    for p in 0..3 {
        let want = sent[&p].last().map(|r| r.offset);
        assert_eq!(
            log.tail(&origin, p).await.expect("tail"),
            want,
            "partition {p}"
        );
    }
    assert_eq!(log.tail(&origin, 3).await.expect("tail"), None);
    assert_eq!(log.append(&origin, 0, &[]).await, Ok(()));

    // What the mirror partitions hold, read with the origin-side reader: every record, in
    // order, with the mirror headers and the origin timestamp. (Each append is a
    // transaction: its commit marker takes a mirror offset of its own, so mirror offsets
    // grow but are not dense.)
    let mirror = KafkaOriginLog::with_node(&cfg, "seoul", "n1", topic.clone()).expect("reader");
    assert_eq!(mirror.partitions().await.expect("partitions"), 4);
    for p in 0..3 {
        let want = &sent[&p];
        let got = read_count(&mirror, p, want.len()).await;
        assert_eq!(got.len(), want.len());
        for w in got.windows(2) {
            assert!(w[0].offset < w[1].offset);
        }
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.key, w.key);
            assert_eq!(g.value, w.value);
            assert_eq!(g.headers, w.mirror_headers(&origin));
            assert_eq!(g.timestamp_ms, w.timestamp_ms);
        }
    }
}

on_both_clusters!(
    mirror_append_then_tail_and_read_back,
    real_mirror_append_then_tail_and_read_back,
    check_append_tail_read_back
);

// ---------------------------------------------------------------------------------------
// Origin reader
// ---------------------------------------------------------------------------------------

async fn check_origin_reader(c: &Cluster) {
    let topic = c.name("o.local");
    c.create_topic(&topic, 3).await;
    let cfg = c.cfg(&topic);
    let app = KafkaAppender::with_node(&cfg, "tokyo", "n1").expect("appender");
    let before = now_ms();
    let mut sent: BTreeMap<i32, Vec<(i64, RoomId, LogValue)>> = BTreeMap::new();
    for i in 0..300 {
        let r = room(i % 7);
        let v = value(i);
        let a = app.append(&r, &v).await.expect("append");
        sent.entry(a.partition).or_default().push((a.offset, r, v));
    }
    let after = now_ms();

    let log = KafkaOriginLog::with_node(&cfg, "tokyo", "n1", topic.clone()).expect("log");
    assert_eq!(log.topic(), topic);
    assert_eq!(log.partitions().await.expect("partitions"), 3);
    for (&p, want) in &sent {
        let end = want.last().expect("records").0 + 1;
        let all = read_all(&log, p, 0, end, 256 * 1024).await;
        assert_eq!(all.len(), want.len());
        for (g, (o, r, v)) in all.iter().zip(want) {
            assert_eq!(g.offset, *o);
            assert_eq!(g.key, r.as_str().as_bytes());
            assert_eq!(LogValue::from_json(&g.value).expect("json"), *v);
            assert_eq!(g.header(HEADER_ORIGIN), Some(&b"tokyo"[..]));
            assert_eq!(g.header(HEADER_FROM), Some(v.from.as_bytes()));
            assert_eq!(g.headers.len(), 3, "origin, from, content-type");
            assert!((before - 1000..=after + 1000).contains(&g.timestamp_ms));
        }
        // From any offset, in small and large batches: exactly the suffix.
        for (i, from) in [0, 1, all.len() / 2, all.len() - 1, all.len()]
            .into_iter()
            .enumerate()
        {
            let from_offset = all.get(from).map_or(end, |r| r.offset);
            for max_bytes in [1usize, 700, 1 << 20] {
                let got = read_all(&log, p, from_offset, end, max_bytes).await;
                assert_eq!(got, all[from..].to_vec(), "p{p} case {i}");
            }
        }
        // Past the end, and an unknown partition.
        assert_eq!(
            log.open(p, end + 1).await.err(),
            Some(LogError::OffsetOutOfRange { earliest: 0 })
        );
    }
    assert_eq!(
        log.open(3, 0).await.err(),
        Some(LogError::UnknownPartition(3))
    );

    // An idle reader returns empty batches with the high watermark, and new records soon
    // after they are appended.
    let (&p, want) = sent.iter().next().expect("a partition");
    let end = want.last().expect("records").0 + 1;
    let mut reader = log.open(p, end).await.expect("open at the end");
    let t = Instant::now();
    let b = reader.next_batch(1 << 20).await.expect("batch");
    assert!(b.records.is_empty());
    assert_eq!(b.high_watermark, end);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let a = app.append(&want[0].1, &value(999)).await.expect("append");
    assert_eq!((a.partition, a.offset), (p, end));
    let t = Instant::now();
    let mut got = Vec::new();
    while got.is_empty() {
        assert!(t.elapsed() < Duration::from_secs(5));
        got = reader.next_batch(1 << 20).await.expect("batch").records;
    }
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].offset, end);
    tracing::info!(latency = ?t.elapsed(), "new record read");
}

on_both_clusters!(
    origin_reader_reads_back_from_any_offset,
    real_origin_reader_reads_back_from_any_offset,
    check_origin_reader
);

/// Writes `n` records of `size` bytes to partition 0 of `topic`, one produce request each.
async fn produce_big(cfg: &KafkaConfig, topic: &str, n: usize, size: usize) {
    let mut cc = rdkafka::ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.brokers)
        .set("linger.ms", "0")
        .set("message.timeout.ms", "10000");
    let producer: FutureProducer = FutureProducer::from_config(&cc).expect("producer");
    let payload = vec![b'x'; size];
    for i in 0..n {
        let key = format!("k{i}");
        producer
            .send(
                FutureRecord::to(topic)
                    .partition(0)
                    .key(&key)
                    .payload(&payload),
                Duration::from_secs(5),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("produce");
    }
}

/// Retention: `from` below the earliest offset is refused, and a reader that retention
/// overtakes hands out a contiguous run, then says where the log now starts.
/// `truncate(cfg, topic)` must move the earliest offset past everything written so far.
async fn check_retention<F, Fut>(c: &Cluster, size: usize, truncate: F)
where
    F: Fn(KafkaConfig, String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let topic = c.name("o.ret");
    c.create_topic(&topic, 1).await;
    let cfg = c.cfg(&topic);
    produce_big(&cfg, &topic, 70, size).await;
    truncate(cfg.clone(), topic.clone()).await;
    let (low, high) = watermarks_async(&cfg, &topic, 0).await;
    assert!(low > 0, "retention dropped nothing (low {low})");

    let log = KafkaOriginLog::with_node(&cfg, "tokyo", "n1", topic.clone()).expect("log");
    for from in [0, low - 1] {
        assert_eq!(
            log.open(0, from).await.err(),
            Some(LogError::OffsetOutOfRange { earliest: low }),
            "from {from}"
        );
    }
    let got = read_all(&log, 0, low, high, 3 * size).await;
    assert_eq!(
        got.iter().map(|r| r.offset).collect::<Vec<_>>(),
        (low..high).collect::<Vec<_>>()
    );

    let mut reader = log.open(0, low).await.expect("open");
    let first = reader.next_batch(1).await.expect("batch");
    assert_eq!(first.records.len(), 1);
    assert_eq!(first.records[0].offset, low);
    produce_big(&cfg, &topic, 70, size).await;
    truncate(cfg.clone(), topic.clone()).await;
    let (low2, _) = watermarks_async(&cfg, &topic, 0).await;
    assert!(
        low2 > high,
        "retention did not pass the reader (low {low2})"
    );
    let mut next = low + 1;
    let started = Instant::now();
    let earliest = loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no out-of-range"
        );
        match reader.next_batch(size).await {
            Ok(b) => {
                for r in b.records {
                    assert_eq!(r.offset, next, "a record was skipped");
                    next += 1;
                }
            }
            Err(LogError::OffsetOutOfRange { earliest }) => break earliest,
            Err(e) => panic!("unexpected error: {e}"),
        }
    };
    assert_eq!(earliest, low2);
    assert!(next < earliest);
}

/// The mock cluster keeps at most 5 MB per partition and drops the oldest message sets
/// beyond that: retention without DeleteRecords (which the mock lacks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_reader_reports_retention() {
    check_retention(&Cluster::mock(), 100_000, |_, _| async {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_origin_reader_reports_retention() {
    check_retention(&Cluster::real(), 100_000, |cfg, topic| async move {
        use rdkafka::admin::{AdminClient, AdminOptions};
        use rdkafka::client::DefaultClientContext;
        let (_, high) = watermarks_async(&cfg, &topic, 0).await;
        let mut cc = rdkafka::ClientConfig::new();
        cc.set("bootstrap.servers", &cfg.brokers);
        let admin: AdminClient<DefaultClientContext> =
            AdminClient::from_config(&cc).expect("admin");
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Offset(high - 5))
            .expect("tpl");
        let res = admin
            .delete_records(&tpl, &AdminOptions::new())
            .await
            .expect("delete records");
        for e in res.elements() {
            assert!(e.error().is_ok(), "{:?}", e.error());
        }
        tokio::task::spawn_blocking(move || drop(admin))
            .await
            .expect("drop");
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Room replay from mirror topics
// ---------------------------------------------------------------------------------------

/// A mirror partition as appended, per room: origin offset → value.
type Expected = BTreeMap<RoomId, Vec<(i64, LogValue)>>;

fn expect_range(want: &[(i64, LogValue)], after: Option<i64>, before: Option<i64>) -> Vec<i64> {
    want.iter()
        .map(|(o, _)| *o)
        .filter(|o| after.is_none_or(|a| *o > a) && before.is_none_or(|b| *o < b))
        .collect()
}

async fn check_room_reader(c: &Cluster) {
    // Dense: every origin record mirrored (origin offsets dense per partition, starting at
    // 500 as if the origin's older records had expired before mirroring began).
    // Sparse: origin offsets with holes (compaction, transaction markers, gaps).
    let dense = c.name("osaka");
    let sparse = c.name("tokyo");
    c.create_topic(&mirror_topic(&dense), 3).await;
    c.create_topic(&mirror_topic(&sparse), 3).await;
    let cfg = c.cfg("dtfed.local");
    let log = KafkaMirrorLog::with_node(&cfg, "seoul", "n1").expect("mirror log");
    let mut rng = StdRng::seed_from_u64(11);
    let mut expected: BTreeMap<String, Expected> = BTreeMap::new();
    let mut first_origin: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for origin in [&dense, &sparse] {
        let mut next = [499i64; 3];
        let mut batches: BTreeMap<i32, Vec<LinkRecord>> = BTreeMap::new();
        for i in 0..600 {
            let r = room(i % 9);
            let p = partition_for(&r, 3);
            let step = if *origin == dense {
                1
            } else {
                rng.random_range(1..=7)
            };
            next[p as usize] += step;
            let o = next[p as usize];
            first_origin.entry((origin.clone(), p)).or_insert(o);
            let v = value(i);
            batches.entry(p).or_default().push(link(o, &r, &v));
            expected
                .entry(origin.clone())
                .or_default()
                .entry(r)
                .or_default()
                .push((o, v));
        }
        for (p, records) in batches {
            // A mirror partition's writer starts with its tail read.
            log.tail(origin, p).await.expect("tail");
            for chunk in records.chunks(37) {
                log.append(origin, p, chunk).await.expect("append");
            }
        }
    }

    let reader = MirrorRoomReader::with_node(&cfg, "seoul", "n1").expect("reader");
    let mut slowest = Duration::ZERO;
    for (origin, rooms) in &expected {
        for (r, want) in rooms {
            let p = partition_for(r, 3);
            let offsets: Vec<i64> = want.iter().map(|(o, _)| *o).collect();
            let (first, last) = (offsets[0], *offsets.last().expect("records"));
            let mid = offsets[offsets.len() / 2];
            let mut afters = vec![
                None,
                Some(-1),
                Some(0),
                Some(first - 1),
                Some(first),
                Some(mid - 1),
                Some(mid),
                Some(mid + 1),
                Some(last - 1),
                Some(last),
                Some(last + 1000),
            ];
            afters.extend((0..4).map(|_| Some(rng.random_range(first..=last))));
            let befores = [None, Some(mid), Some(mid + 1), Some(first), Some(last + 1)];
            for after in &afters {
                for before in befores {
                    let t = Instant::now();
                    let read = reader
                        .read_room(origin, r, 3, *after, before)
                        .await
                        .expect("read");
                    slowest = slowest.max(t.elapsed());
                    assert_eq!(read.partition, p);
                    assert_eq!(read.earliest, first_origin[&(origin.clone(), p)]);
                    let got: Vec<i64> = read.records.iter().map(|x| x.offset).collect();
                    assert_eq!(
                        got,
                        expect_range(want, *after, before),
                        "{origin} room {r} after {after:?} before {before:?}"
                    );
                    for x in &read.records {
                        assert_eq!(&x.room, r);
                        assert_eq!(&x.origin, origin);
                        assert_eq!(x.partition, p);
                        let v = &want.iter().find(|(o, _)| *o == x.offset).expect("sent").1;
                        assert_eq!(&x.value, v);
                    }
                }
            }
        }
    }
    tracing::info!(?slowest, "slowest room read");
    assert!(slowest < Duration::from_secs(5), "a read took {slowest:?}");

    // Reads stop at their limit and say where: continued from there, they give the room's
    // records exactly once.
    for limit in [
        ReadLimit {
            messages: 5,
            bytes: usize::MAX,
            scanned: i64::MAX,
        },
        ReadLimit {
            messages: usize::MAX,
            bytes: usize::MAX,
            scanned: 25,
        },
        ReadLimit {
            messages: usize::MAX,
            bytes: 200,
            scanned: i64::MAX,
        },
    ] {
        let mut limited = MirrorRoomReader::with_node(&cfg, "seoul", "n1").expect("reader");
        limited.set_limit(limit);
        for (origin, rooms) in &expected {
            let (r, want) = rooms.iter().next().expect("a room");
            let mut after = None;
            let mut got = Vec::new();
            let mut pieces = 0;
            loop {
                let read = limited
                    .read_room(origin, r, 3, after, None)
                    .await
                    .expect("read");
                pieces += 1;
                assert!(pieces < 1000, "{origin} {r}: no end with {limit:?}");
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
            assert!(pieces > 1, "{origin} {r}: one piece with {limit:?}");
            let offsets: Vec<i64> = want.iter().map(|(o, _)| *o).collect();
            assert_eq!(got, offsets, "{origin} {r} in pieces with {limit:?}");
        }
    }

    // A partition holding nothing: no records, no gap claimed.
    let empty = c.name("kyoto");
    c.create_topic(&mirror_topic(&empty), 3).await;
    let read = reader
        .read_room(&empty, &room(1), 3, Some(41), None)
        .await
        .expect("read");
    assert!(read.records.is_empty());
    assert_eq!(read.earliest, 42);
}

on_both_clusters!(
    mirror_room_reader_finds_ranges,
    real_mirror_room_reader_finds_ranges,
    check_room_reader
);

/// A re-sent stretch (a purged append that still landed, then the retry from the tail):
/// the mirror partition holds origin offsets 1..=10, 6..=20; readers see each once.
async fn check_resent(c: &Cluster) {
    let origin = c.name("tokyo");
    c.create_topic(&mirror_topic(&origin), 1).await;
    let cfg = c.cfg("dtfed.local");
    let log = KafkaMirrorLog::with_node(&cfg, "seoul", "n1").expect("mirror log");
    let r = room(3);
    let first: Vec<LinkRecord> = (1..=10).map(|o| link(o, &r, &value(o as usize))).collect();
    let again: Vec<LinkRecord> = (6..=20).map(|o| link(o, &r, &value(o as usize))).collect();
    assert_eq!(log.tail(&origin, 0).await.expect("tail"), None);
    log.append(&origin, 0, &first).await.expect("append");
    log.append(&origin, 0, &again).await.expect("append");
    assert_eq!(log.tail(&origin, 0).await.expect("tail"), Some(20));
    let reader = MirrorRoomReader::with_node(&cfg, "seoul", "n1").expect("reader");
    for after in [
        None,
        Some(0),
        Some(3),
        Some(5),
        Some(6),
        Some(8),
        Some(10),
        Some(12),
        Some(19),
    ] {
        let read = reader
            .read_room(&origin, &r, 1, after, None)
            .await
            .expect("read");
        let got: Vec<i64> = read.records.iter().map(|x| x.offset).collect();
        let want: Vec<i64> = (after.map_or(1, |a| a + 1).max(1)..=20).collect();
        assert_eq!(got, want, "after {after:?}");
        assert_eq!(read.earliest, 1);
    }
}

/// A record in `dtfed.mirror.<origin>` labelled with another origin (not written by the
/// mirror client) is not replayed as anyone's: the fan-out skips it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_room_reader_skips_records_labelled_with_another_origin() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let c = Cluster::mock();
    let origin = c.name("tokyo");
    let topic = mirror_topic(&origin);
    c.create_topic(&topic, 1).await;
    let cfg = c.cfg("dtfed.local");
    let log = KafkaMirrorLog::with_node(&cfg, "seoul", "n1").expect("mirror log");
    let r = room(4);
    let recs: Vec<LinkRecord> = (1..=10).map(|o| link(o, &r, &value(o as usize))).collect();
    assert_eq!(log.tail(&origin, 0).await.expect("tail"), None);
    log.append(&origin, 0, &recs[..5]).await.expect("append");
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .create()
        .expect("producer");
    let forged = value(99).to_json();
    producer
        .send(
            FutureRecord::to(&topic)
                .partition(0)
                .key(r.as_str())
                .payload(&forged)
                .headers(
                    OwnedHeaders::new()
                        .insert(Header {
                            key: HEADER_ORIGIN,
                            value: Some("seoul"),
                        })
                        .insert(Header {
                            key: "dtfed-origin-offset",
                            value: Some("6"),
                        }),
                ),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("forged record written");
    log.append(&origin, 0, &recs[6..]).await.expect("append");
    let reader = MirrorRoomReader::with_node(&cfg, "seoul", "n1").expect("reader");
    let read = reader
        .read_room(&origin, &r, 1, None, None)
        .await
        .expect("read");
    let got: Vec<i64> = read.records.iter().map(|x| x.offset).collect();
    assert_eq!(got, [1, 2, 3, 4, 5, 7, 8, 9, 10]);
}

on_both_clusters!(
    mirror_room_reader_drops_records_mirrored_twice,
    real_mirror_room_reader_drops_records_mirrored_twice,
    check_resent
);

// ---------------------------------------------------------------------------------------
// Failures
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_and_unavailable_while_kafka_is_down() {
    let c = Cluster::mock();
    let mock = c.mock_kafka();
    c.create_topic("o.down", 1).await;
    c.create_topic(&mirror_topic("tokyo"), 1).await;
    let cfg = c.cfg("o.down");
    let mut log = KafkaMirrorLog::with_node(&cfg, "seoul", "n1").expect("mirror log");
    log.set_append_timeout(Duration::from_secs(1));
    log.set_read_timeout(Duration::from_secs(2));
    let r = room(1);
    let recs: Vec<LinkRecord> = (0..5).map(|o| link(o, &r, &value(o as usize))).collect();
    assert_eq!(log.tail("tokyo", 0).await.expect("tail"), None);
    log.append("tokyo", 0, &recs[..2]).await.expect("append");
    let origin = KafkaOriginLog::with_node(&cfg, "tokyo", "n1", "o.down".into())
        .expect("log")
        .with_tuning(OriginReaderTuning {
            idle_wait: Duration::from_millis(100),
            ..OriginReaderTuning::default()
        });
    let mut reader = origin.open(0, 0).await.expect("open");

    mock.broker_down(1).expect("down");
    let t = Instant::now();
    let e = log.append("tokyo", 0, &recs[2..]).await.expect_err("down");
    assert!(matches!(e, LogError::Unavailable(_)), "{e}");
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    let t = Instant::now();
    let e = log.tail("tokyo", 0).await.expect_err("down");
    assert!(matches!(e, LogError::Unavailable(_)), "{e}");
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    let t = Instant::now();
    let e = origin.open(0, 0).await.err().expect("down");
    assert!(matches!(e, LogError::Unavailable(_)), "{e}");
    assert!(t.elapsed() < Duration::from_secs(7), "{:?}", t.elapsed());
    // The origin reader never hangs: empty batches or Unavailable, each call bounded.
    for _ in 0..5 {
        let t = Instant::now();
        match reader.next_batch(1 << 20).await {
            Ok(b) => assert!(b.records.is_empty()),
            Err(e) => assert!(matches!(e, LogError::Unavailable(_)), "{e}"),
        }
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    mock.broker_up(1).expect("up");
    // After the outage: the tail says what was written (a prefix), and appending after it
    // works again.
    let started = Instant::now();
    let tail = loop {
        match log.tail("tokyo", 0).await {
            Ok(t) => break t,
            Err(e) => {
                assert!(started.elapsed() < Duration::from_secs(30), "{e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let tail = tail.expect("written before the outage");
    assert!((1..=4).contains(&tail), "tail {tail}");
    let rest = &recs[(tail + 1) as usize..];
    let started = Instant::now();
    loop {
        match log.append("tokyo", 0, rest).await {
            Ok(()) => break,
            Err(e) => {
                assert!(started.elapsed() < Duration::from_secs(30), "{e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    assert_eq!(log.tail("tokyo", 0).await.expect("tail"), Some(4));
}

/// A mirror writer that died in its first transaction leaves an aborted record and the abort
/// marker (written when the next writer of its transactional id fences it): the tail sees
/// an empty partition, not an unreadable one, and mirroring starts from the beginning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_tail_of_a_partition_holding_only_an_aborted_first_transaction_is_empty() {
    let c = Cluster::real();
    let origin = c.name("tokyo");
    let topic = mirror_topic(&origin);
    c.create_topic(&topic, 1).await;
    let cfg = c.cfg("dtfed.local");
    let (brokers, t, from) = (cfg.brokers.clone(), topic.clone(), origin.clone());
    let r = room(3);
    let dead_room = r.clone();
    // The dead writer: the partition's own transactional id, one record sent, no commit.
    tokio::task::spawn_blocking(move || {
        use rdkafka::producer::Producer;
        let p = txn_producer(&brokers, &format!("dtfed-mirror.seoul.{from}.0"));
        p.begin_transaction().expect("begin");
        send_mirror_record(&p, &t, &link(0, &dead_room, &value(0)), &from);
        p.flush(Duration::from_secs(30)).expect("flush");
        // Dropped here without a commit, as by a crash: the transaction stays open.
    })
    .await
    .expect("task");
    let log = KafkaMirrorLog::with_node(&cfg, "seoul", "n2").expect("mirror log");
    // The tail fences the dead writer (Kafka writes the abort marker), then reads.
    assert_eq!(log.tail(&origin, 0).await.expect("tail"), None);
    let (_, high) = watermarks_async(&cfg, &topic, 0).await;
    assert_eq!(high, 2, "the aborted record and its abort marker");
    log.append(
        &origin,
        0,
        &[link(0, &r, &value(0)), link(1, &r, &value(1))],
    )
    .await
    .expect("append");
    assert_eq!(log.tail(&origin, 0).await.expect("tail"), Some(1));
}

/// An origin with more partitions than its mirror topic here: `grow_partitions` adds them
/// (once, whoever asks), records the origin's count for room lookups, and the new
/// partitions take appends. A log not set up to grow refuses, naming the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_mirror_topic_grows_to_the_origins_partition_count() {
    let c = Cluster::real();
    let origin = c.name("tokyo");
    let topic = mirror_topic(&origin);
    let cfg = c.cfg("dtfed.local");
    assert_eq!(
        ensure_mirror_topic(&cfg, &origin, 2).await.expect("ensure"),
        (topic.clone(), 2)
    );
    let fixed = KafkaMirrorLog::with_node(&cfg, "seoul", "n1").expect("mirror log");
    let err = fixed
        .grow_partitions(&origin, 5)
        .await
        .expect_err("a log without growth");
    assert!(err.to_string().contains(&origin), "{err}");

    let origins = std::sync::Arc::new(dtfed::mirror::OriginPartitions::default());
    origins.raise(&origin, 2);
    let log = KafkaMirrorLog::with_node(&cfg, "seoul", "n2")
        .expect("mirror log")
        .growing(&cfg, origins.clone());
    // Two tasks of the origin learn the count at once.
    let (a, b) = tokio::join!(
        log.grow_partitions(&origin, 5),
        log.grow_partitions(&origin, 5)
    );
    assert_eq!((a.expect("grow"), b.expect("grow")), (5, 5));
    assert_eq!(origins.get(&origin), Some(5));
    // Never shrinks: a smaller count asked later leaves it alone.
    assert_eq!(log.grow_partitions(&origin, 3).await.expect("grow"), 5);
    assert_eq!(
        ensure_mirror_topic(&cfg, &origin, 2).await.expect("ensure"),
        (topic.clone(), 5)
    );
    let r = room(4);
    assert_eq!(log.tail(&origin, 4).await.expect("tail"), None);
    log.append(&origin, 4, &[link(7, &r, &value(7))])
        .await
        .expect("append to a new partition");
    assert_eq!(log.tail(&origin, 4).await.expect("tail"), Some(7));
}

/// Something else than dtfed wrote to a mirror partition with a transactional producer:
/// the last offset is a commit marker, not a record; the tail walks back to the record,
/// and room reads pass over the markers. (The mock writes no markers: real broker only.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_tail_walks_back_over_control_records() {
    let c = Cluster::real();
    let origin = c.name("tokyo");
    let topic = mirror_topic(&origin);
    c.create_topic(&topic, 1).await;
    let cfg = c.cfg("dtfed.local");
    let log = KafkaMirrorLog::with_node(&cfg, "seoul", "n1").expect("mirror log");
    let r = room(2);
    assert_eq!(log.tail(&origin, 0).await.expect("tail"), None);
    log.append(&origin, 0, &[link(7, &r, &value(7))])
        .await
        .expect("append");
    let (brokers, t, txn_room, from) = (
        cfg.brokers.clone(),
        topic.clone(),
        r.clone(),
        origin.clone(),
    );
    tokio::task::spawn_blocking(move || {
        use rdkafka::producer::Producer;
        let p = txn_producer(&brokers, &format!("test-txn-{t}"));
        for batch in [[9i64, 12], [15, 16]] {
            p.begin_transaction().expect("begin");
            for o in batch {
                send_mirror_record(&p, &t, &link(o, &txn_room, &value(o as usize)), &from);
            }
            p.commit_transaction(Duration::from_secs(30))
                .expect("commit");
        }
    })
    .await
    .expect("task");
    let (_, high) = watermarks_async(&cfg, &topic, 0).await;
    assert_eq!(
        high, 8,
        "1 record + its commit marker, 2 × (2 records + a commit marker)"
    );
    assert_eq!(log.tail(&origin, 0).await.expect("tail"), Some(16));
    let reader = MirrorRoomReader::with_node(&cfg, "seoul", "n1").expect("reader");
    for (after, want) in [
        (None, vec![7, 9, 12, 15, 16]),
        (Some(7), vec![9, 12, 15, 16]),
        (Some(12), vec![15, 16]),
        (Some(13), vec![15, 16]),
        (Some(16), vec![]),
    ] {
        let read = reader
            .read_room(&origin, &r, 1, after, None)
            .await
            .expect("read");
        let got: Vec<i64> = read.records.iter().map(|x| x.offset).collect();
        assert_eq!(got, want, "after {after:?}");
    }
    // A mirror client appending after foreign records: still works.
    log.append(&origin, 0, &[link(20, &r, &value(20))])
        .await
        .expect("append");
    assert_eq!(log.tail(&origin, 0).await.expect("tail"), Some(20));
}

/// A transactional producer with id `transactional_id`, its transactions initialised
/// (blocking): a writer that is not dtfed's, or one of dtfed's ids written by hand.
fn txn_producer(brokers: &str, transactional_id: &str) -> rdkafka::producer::BaseProducer {
    use rdkafka::producer::Producer;
    let mut cc = rdkafka::ClientConfig::new();
    cc.set("bootstrap.servers", brokers)
        .set("transactional.id", transactional_id);
    let p: rdkafka::producer::BaseProducer = cc.create().expect("producer");
    p.init_transactions(Duration::from_secs(30)).expect("init");
    p
}

/// Sends `lr` to partition 0 of `topic` with `origin`'s mirror headers, as the mirror sink
/// writes it (blocking; inside the producer's open transaction).
fn send_mirror_record(
    p: &rdkafka::producer::BaseProducer,
    topic: &str,
    lr: &LinkRecord,
    origin: &str,
) {
    use rdkafka::message::{Header, OwnedHeaders};
    let mut headers = OwnedHeaders::new();
    for (k, v) in lr.mirror_headers(origin) {
        headers = headers.insert(Header {
            key: &k,
            value: Some(&v),
        });
    }
    p.send(
        rdkafka::producer::BaseRecord::to(topic)
            .partition(0)
            .key(&lr.key)
            .payload(&lr.value)
            .headers(headers),
    )
    .map_err(|(e, _)| e)
    .expect("send");
}
