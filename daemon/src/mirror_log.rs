//! The Kafka side of mirroring between regions: rdkafka implementations of the traits in
//! [`dtfed_regions::mirror::log`], and replay of a remote origin's messages to players from
//! this region's mirror topic.
//!
//! - [`KafkaOriginLog`] ([`OriginLog`]): the serving side reads this region's local topic
//!   from an offset on, one group-less consumer per served stream.
//! - [`KafkaMirrorLog`] ([`MirrorLog`]): the receiving side reads the tail of mirror partition
//!   `dtfed.mirror.<origin>`/p and appends to it, explicitly to partition p
//!   (partition-preserving), each record carrying its origin offset and origin timestamp in
//!   headers. Every append is a Kafka transaction of the partition's own transactional id
//!   (see *One writer per mirror partition* below).
//! - [`MirrorRoomReader`]: a room's messages from a remote origin, for players resuming with
//!   a cursor: origin offsets grow along a mirror partition, so the first record after the
//!   cursor is found by binary search on single-record reads, then the partition is read
//!   forward.
//! - [`ensure_mirror_topic`]: creates `dtfed.mirror.<origin>` with the origin's partition
//!   count, and refuses an existing one whose count differs.
//!
//! # Ordering and failures of mirror appends
//!
//! The contract of [`MirrorLog::append`] is "on error, a prefix may be written; the caller
//! re-reads the tail". An idempotent producer keeps order and never duplicates within one
//! producer epoch, but librdkafka documents two ways to write a *non*-prefix (a hole
//! followed by later records): messages timing out in the local queue while later ones are
//! still sent after an epoch bump, and a permanent error on one batch while later in-flight
//! batches are retried. So the producer runs with `message.timeout.ms=0` (librdkafka never
//! times messages out by itself) and `enable.gapless.guarantee=true` (a permanent error on a
//! batch turns the producer fatal, failing everything queued after it, instead of writing
//! past the hole). Boundedness comes from this module instead: an append not acknowledged
//! within [`APPEND_TIMEOUT`] purges the producer's queue and in-flight requests, waits for
//! the purged deliveries to report (bounded too), and fails with [`LogError::Unavailable`].
//! A fatal producer is replaced by a fresh one. An in-flight request that was purged can
//! still land on the broker before the caller's next tail read; then the mirror partition
//! holds some records twice (a prefix again, then a re-send): readers must, and
//! [`MirrorRoomReader`] does, drop origin offsets at or below the last one taken.
//!
//! Should a hole ever be written anyway, [`KafkaMirrorLog::append`] says so at error level
//! and returns [`LogError::Other`] naming it rather than letting it pass as a plain retry.
//!
//! # One writer per mirror partition
//!
//! A daemon stopped (SIGSTOP, a long GC-like stall, a VM pause) past its group session
//! timeout loses its mirror tasks to another daemon of the region, but does not know it
//! until it runs again; for that moment both would append to the same mirror partition and
//! could write origin offsets twice. So each mirror partition has a writer of its own: a
//! transactional producer whose `transactional.id` is the partition's,
//! `dtfed-mirror.<region>.<origin>.<p>`, the same on every daemon of the region.
//! [`KafkaMirrorLog::tail`] (which a mirror task calls before it streams) first starts a
//! fresh writer with `init_transactions`: Kafka then *fences* every earlier producer of
//! that id (their next send or commit fails) and aborts their open transaction, so the tail
//! read after it sees every committed append and nothing a fenced writer can still add.
//! Each [`KafkaMirrorLog::append`] is one transaction: all of it or none of it becomes
//! visible (readers use `read_committed`, librdkafka's default). A fenced writer's append
//! fails with [`LogError::Other`] naming it, and its writer is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dtfed_proto::link::codec::record_len_bound;
use dtfed_proto::link::LinkRecord;
use dtfed_proto::record::{LogValue, HEADER_ORIGIN, HEADER_ORIGIN_OFFSET};
use dtfed_proto::room::valid_region_name;
use dtfed_proto::{LogRecord, RoomId};
use dtfed_regions::mirror::log::{LogError, MirrorLog, OriginBatch, OriginLog, OriginReader};
use rdkafka::admin::AdminClient;
use rdkafka::client::ClientContext;
use rdkafka::config::{FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::Semaphore;

use crate::append::producer_config;
use crate::config::KafkaConfig;
use crate::kafka::{
    client_config, default_node_name, ensure_topic, partition_for, KafkaSetupError, TracingContext,
};
use crate::replay::{
    reader_config, ReadLimit, ReplayError, RoomRead, MAX_CONCURRENT_READS, READ_LIMIT, READ_TIMEOUT,
};

/// Mirror topics are named `<prefix><origin region>`.
pub const MIRROR_TOPIC_PREFIX: &str = "dtfed.mirror.";

/// The mirror topic of `origin`: `dtfed.mirror.<origin>`.
pub fn mirror_topic(origin: &str) -> String {
    format!("{MIRROR_TOPIC_PREFIX}{origin}")
}

/// Bound on one metadata or watermark request (partition count, open, out-of-range check).
pub const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// An append not acknowledged within this time is purged and fails with
/// [`LogError::Unavailable`]. Kept below the mirror client's `append_grace` (10 s) together
/// with [`PURGE_GRACE`], so a shutdown never abandons an append still under way.
pub const APPEND_TIMEOUT: Duration = Duration::from_secs(5);

/// After a purge, how long the purged deliveries may take to report.
pub const PURGE_GRACE: Duration = Duration::from_secs(3);

/// Bound on starting a mirror partition's writer (`init_transactions`: finding the
/// transaction coordinator, fencing the writer before).
pub const WRITER_INIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on committing an append's transaction.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on aborting a failed append's transaction.
pub const ABORT_TIMEOUT: Duration = Duration::from_secs(1);

/// How far [`KafkaMirrorLog::tail`] looks back from the high watermark for a readable
/// record, in widening windows (the record at `high - 1` is readable unless something else
/// than dtfed wrote control records there).
const TAIL_WINDOWS: [i64; 4] = [1, 16, 256, 4096];

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Drops `value` on a blocking thread when inside a tokio runtime: librdkafka handles block
/// while they shut down (threads joined, queues purged).
fn drop_off_runtime<T: Send + 'static>(value: T) {
    if tokio::runtime::Handle::try_current().is_ok() {
        drop(tokio::task::spawn_blocking(move || drop(value)));
    } else {
        drop(value);
    }
}

fn is_unknown_partition(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::UnknownTopic
        )
    )
}

/// Errors of a watermark query that a leader election or a broker restart causes: asking
/// again shortly succeeds.
fn is_retriable_query_error(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::ReplicaNotAvailable
                | RDKafkaErrorCode::BrokerNotAvailable
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::NetworkException
                | RDKafkaErrorCode::FencedLeaderEpoch
                | RDKafkaErrorCode::UnknownLeaderEpoch
                | RDKafkaErrorCode::OffsetNotAvailable
                | RDKafkaErrorCode::KafkaStorageError
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::OperationTimedOut
        )
    )
}

/// `query(timeout)` (a watermark query), asked again after errors
/// [`is_retriable_query_error`] accepts, until `deadline`. Blocking.
fn query_until(
    deadline: Instant,
    query: impl Fn(Duration) -> Result<(i64, i64), KafkaError>,
) -> Result<(i64, i64), KafkaError> {
    let mut backoff = Duration::from_millis(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match query(left.clamp(Duration::from_millis(100), METADATA_TIMEOUT)) {
            Err(e) if is_retriable_query_error(&e) && Instant::now() + backoff < deadline => {
                tracing::debug!(error = %e, "watermark query failed; asking again");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            result => return result,
        }
    }
}

/// Consumer errors librdkafka recovers from by itself (a dropped idle connection, a name
/// that did not resolve this time): reading just goes on.
fn is_transient_consumer_error(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::Resolve
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NetworkException
        )
    ) && !matches!(e, KafkaError::MessageConsumptionFatal(_))
}

/// The value of the last header named `name` (the mirror headers put dtfed's own last).
fn last_header<'a>(m: &'a BorrowedMessage<'_>, name: &str) -> Option<&'a [u8]> {
    m.headers()?
        .iter()
        .filter(|h| h.key == name)
        .last()
        .and_then(|h| h.value)
}

/// The first `dtfed-origin` header of `m` naming another region than `origin`, if any.
fn other_origin(m: &BorrowedMessage<'_>, origin: &str) -> Option<String> {
    m.headers()?
        .iter()
        .filter(|h| h.key == HEADER_ORIGIN)
        .map(|h| h.value.unwrap_or_default())
        .find(|v| *v != origin.as_bytes())
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The origin offset a mirror record carries in its `dtfed-origin-offset` header.
fn origin_offset(m: &BorrowedMessage<'_>) -> Option<i64> {
    last_header(m, HEADER_ORIGIN_OFFSET)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|o| *o >= 0)
}

/// A consumed record as the link carries it: every header kept, in order (a header with a
/// null value becomes an empty one; a null key or value an empty one).
fn link_record(m: &BorrowedMessage<'_>) -> LinkRecord {
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    LinkRecord {
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis().unwrap_or(-1),
        key: m.key().map(<[u8]>::to_vec).unwrap_or_default(),
        headers,
        value: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
    }
}

// ---------------------------------------------------------------------------------------
// Origin side
// ---------------------------------------------------------------------------------------

/// Timing of [`KafkaOriginReader::next_batch`](OriginReader::next_batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginReaderTuning {
    /// With nothing to read, how long a call waits before returning an empty batch (200 ms).
    pub idle_wait: Duration,
    /// Once a batch has records, how long to wait for one more before returning it (1 ms):
    /// records already fetched are taken at once, a lone chat message is not held back.
    pub linger: Duration,
    /// Once a batch has records, the longest it keeps collecting (50 ms), even if records
    /// keep coming faster than `linger`.
    pub max_collect: Duration,
}

impl Default for OriginReaderTuning {
    fn default() -> Self {
        OriginReaderTuning {
            idle_wait: Duration::from_millis(200),
            linger: Duration::from_millis(1),
            max_collect: Duration::from_millis(50),
        }
    }
}

/// Settings of an origin reader, on top of [`client_config`]: a group-less consumer (a
/// unique dummy `group.id`, manual `assign`, nothing committed) tuned for low latency.
///
/// - `auto.offset.reset=error`: when retention passes the position, the reader says so
///   ([`LogError::OffsetOutOfRange`]) instead of silently jumping.
/// - `fetch.wait.max.ms=50`: an idle partition is polled by the broker's long-poll; a record
///   appended is fetched at once (fetch.min.bytes is 1), the 50 ms only bounds idle fetches.
/// - `max.partition.fetch.bytes` 1 MiB (4 default link batches), `fetch.max.bytes` 4 MiB,
///   `queued.max.messages.kbytes` 4 MiB: a reader prefetches a few batches, not librdkafka's
///   64 MiB default, since a daemon serves many streams. `fetch.queue.backoff.ms=20` so a
///   full prefetch queue does not stall the stream for librdkafka's default second.
/// - `statistics.interval.ms=1000`: the partition's high watermark for empty batches comes
///   from the statistics (and from the records themselves), no extra request.
pub fn origin_reader_config(cfg: &KafkaConfig, region: &str, node: &str) -> ClientConfig {
    let mut c = client_config(cfg, region, &format!("{node}-mirror-serve"));
    let dummy = format!(
        "dtfed-mirror-serve-{region}-{node}-{:016x}",
        rand::random::<u64>()
    );
    c.set("group.id", dummy)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "error")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "50")
        .set("fetch.min.bytes", "1")
        .set("max.partition.fetch.bytes", "1048576")
        .set("fetch.max.bytes", "4194304")
        .set("queued.max.messages.kbytes", "4096")
        .set("fetch.queue.backoff.ms", "20")
        .set("statistics.interval.ms", "1000")
        .set("allow.auto.create.topics", "false");
    c
}

type Meta = OffRuntime<AdminClient<TracingContext>>;

/// Owns a librdkafka handle whose drop blocks; drops it off the async runtime.
struct OffRuntime<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> std::ops::Deref for OffRuntime<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // Only `drop` takes the value out.
        match &self.0 {
            Some(v) => v,
            None => unreachable!("OffRuntime emptied before drop"),
        }
    }
}

impl<T: Send + 'static> OffRuntime<T> {
    fn new(value: T) -> OffRuntime<T> {
        OffRuntime(Some(value))
    }

    /// The value back, to be dropped (or kept) by the caller.
    fn into_inner(mut self) -> Option<T> {
        self.0.take()
    }
}

impl<T: Send + 'static> Drop for OffRuntime<T> {
    fn drop(&mut self) {
        if let Some(v) = self.0.take() {
            drop_off_runtime(v);
        }
    }
}

/// The region's local topic, read for peers by the mirror server ([`OriginLog`]).
///
/// Holds one admin client for metadata and watermarks; every [`open`](OriginLog::open)
/// builds a consumer of its own (a librdkafka instance: threads, one connection per
/// broker), dropped with the reader.
pub struct KafkaOriginLog {
    topic: String,
    region: String,
    node: String,
    cfg: KafkaConfig,
    meta: Arc<Meta>,
    /// Partition count and when it was read.
    partitions: Mutex<Option<(i32, Instant)>>,
    tuning: OriginReaderTuning,
}

/// How long a partition count read from metadata is reused.
const PARTITIONS_TTL: Duration = Duration::from_secs(10);

impl std::fmt::Debug for KafkaOriginLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaOriginLog")
            .field("topic", &self.topic)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl KafkaOriginLog {
    /// Serves `topic` (normally `kafka.local_topic`) of the cluster in `cfg`.
    pub fn new(
        cfg: &KafkaConfig,
        region: &str,
        topic: String,
    ) -> Result<KafkaOriginLog, KafkaSetupError> {
        Self::with_node(cfg, region, &default_node_name(), topic)
    }

    /// Like [`KafkaOriginLog::new`] with this daemon's node name in `client.id`.
    pub fn with_node(
        cfg: &KafkaConfig,
        region: &str,
        node: &str,
        topic: String,
    ) -> Result<KafkaOriginLog, KafkaSetupError> {
        let mut cc = client_config(cfg, region, &format!("{node}-mirror-meta"));
        cc.set("allow.auto.create.topics", "false");
        let meta = AdminClient::from_config_and_context(&cc, TracingContext::for_config(&cc))
            .map_err(|e| KafkaSetupError::Unreachable {
                brokers: cfg.brokers.clone(),
                detail: format!("cannot create a metadata client for {topic}: {e}"),
            })?;
        Ok(KafkaOriginLog {
            topic,
            region: region.to_owned(),
            node: node.to_owned(),
            cfg: cfg.clone(),
            meta: Arc::new(OffRuntime::new(meta)),
            partitions: Mutex::new(None),
            tuning: OriginReaderTuning::default(),
        })
    }

    /// Overrides the readers' timing (tests, tuning).
    pub fn with_tuning(mut self, tuning: OriginReaderTuning) -> KafkaOriginLog {
        self.tuning = tuning;
        self
    }

    async fn fetch_partitions(&self) -> Result<i32, LogError> {
        let meta = Arc::clone(&self.meta);
        let topic = self.topic.clone();
        let read = tokio::task::spawn_blocking(move || {
            let md = meta
                .inner()
                .fetch_metadata(Some(&topic), METADATA_TIMEOUT)
                .map_err(|e| LogError::Unavailable(format!("metadata of {topic}: {e}")))?;
            let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
                return Err(LogError::Unavailable(format!(
                    "metadata of {topic}: topic not listed"
                )));
            };
            if let Some(err) = t.error() {
                let code = RDKafkaErrorCode::from(err);
                return Err(match code {
                    RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic => {
                        LogError::Other(format!("topic {topic} does not exist"))
                    }
                    _ => LogError::Unavailable(format!("metadata of {topic}: {code}")),
                });
            }
            i32::try_from(t.partitions().len())
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| LogError::Unavailable(format!("topic {topic} has no partitions")))
        })
        .await
        .map_err(|e| LogError::Other(format!("metadata task failed: {e}")))?;
        read
    }

    async fn watermarks(&self, partition: i32) -> Result<(i64, i64), LogError> {
        watermarks(&self.meta, &self.topic, partition).await
    }
}

/// The low and high watermarks of `topic`/`partition`, off the runtime, bounded.
async fn watermarks(meta: &Arc<Meta>, topic: &str, partition: i32) -> Result<(i64, i64), LogError> {
    let meta = Arc::clone(meta);
    let t = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + METADATA_TIMEOUT;
        query_until(deadline, |timeout| {
            meta.inner().fetch_watermarks(&t, partition, timeout)
        })
        .map_err(|e| {
            if is_unknown_partition(&e) {
                LogError::UnknownPartition(partition)
            } else {
                LogError::Unavailable(format!("watermarks of {t}/{partition}: {e}"))
            }
        })
    })
    .await
    .map_err(|e| LogError::Other(format!("watermark task failed: {e}")))?
}

#[async_trait]
impl OriginLog for KafkaOriginLog {
    fn topic(&self) -> &str {
        &self.topic
    }

    async fn partitions(&self) -> Result<i32, LogError> {
        if let Some((n, at)) = *lock(&self.partitions) {
            if at.elapsed() < PARTITIONS_TTL {
                return Ok(n);
            }
        }
        let n = self.fetch_partitions().await?;
        *lock(&self.partitions) = Some((n, Instant::now()));
        Ok(n)
    }

    async fn open(
        &self,
        partition: i32,
        from_offset: i64,
    ) -> Result<Box<dyn OriginReader>, LogError> {
        let n = self.partitions().await?;
        if !(0..n).contains(&partition) {
            return Err(LogError::UnknownPartition(partition));
        }
        let (low, high) = self.watermarks(partition).await?;
        if from_offset < low || from_offset > high {
            tracing::debug!(topic = %self.topic, partition, from_offset, low, high, "mirror serve: offset out of range");
            return Err(LogError::OffsetOutOfRange { earliest: low });
        }
        let high_cell = Arc::new(AtomicI64::new(high));
        let config = origin_reader_config(&self.cfg, &self.region, &self.node);
        let ctx = ReaderContext {
            log: TracingContext::for_config(&config),
            topic: self.topic.clone(),
            partition,
            high: Arc::clone(&high_cell),
        };
        let topic = self.topic.clone();
        // Wrapped at once: should this call be dropped, the consumer still goes off the
        // runtime.
        let consumer =
            tokio::task::spawn_blocking(move || -> Result<OffRuntime<OriginConsumer>, LogError> {
                let consumer: OriginConsumer =
                    StreamConsumer::from_config_and_context(&config, ctx)
                        .map_err(|e| LogError::Other(format!("cannot create a consumer: {e}")))?;
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&topic, partition, Offset::Offset(from_offset))
                    .map_err(|e| LogError::Other(format!("offset for {topic}/{partition}: {e}")))?;
                if let Err(e) = consumer.assign(&tpl) {
                    drop(consumer);
                    return Err(LogError::Unavailable(format!(
                        "assigning {topic}/{partition}: {e}"
                    )));
                }
                Ok(OffRuntime::new(consumer))
            })
            .await
            .map_err(|e| LogError::Other(format!("open task failed: {e}")))??;
        tracing::debug!(topic = %self.topic, partition, from_offset, high, "mirror serve: reader opened");
        Ok(Box::new(KafkaOriginReader {
            topic: self.topic.clone(),
            partition,
            consumer: Arc::new(consumer),
            meta: Arc::clone(&self.meta),
            high: high_cell,
            next: from_offset,
            pending: None,
            failed: None,
            tuning: self.tuning,
        }))
    }
}

/// A reader's client context: librdkafka logs to `tracing`, and the partition's high
/// watermark from the statistics.
struct ReaderContext {
    log: TracingContext,
    topic: String,
    partition: i32,
    high: Arc<AtomicI64>,
}

impl ClientContext for ReaderContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.log.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.log.error(error, reason);
    }

    fn stats(&self, stats: Statistics) {
        let hi = stats
            .topics
            .get(&self.topic)
            .and_then(|t| t.partitions.get(&self.partition))
            .map_or(-1, |p| p.hi_offset);
        if hi >= 0 {
            self.high.fetch_max(hi, Ordering::Relaxed);
        }
    }
}

impl ConsumerContext for ReaderContext {}

type OriginConsumer = StreamConsumer<ReaderContext>;

/// A position in one partition of the local topic ([`OriginReader`]).
pub struct KafkaOriginReader {
    topic: String,
    partition: i32,
    consumer: Arc<OffRuntime<OriginConsumer>>,
    meta: Arc<Meta>,
    /// The partition's high watermark as last known (statistics, records, open).
    high: Arc<AtomicI64>,
    /// The offset after the last record handed out (or taken into `pending`).
    next: i64,
    /// A record read but left for the next batch (it did not fit).
    pending: Option<LinkRecord>,
    /// An error met after records were collected; returned by the next call.
    failed: Option<LogError>,
    tuning: OriginReaderTuning,
}

impl std::fmt::Debug for KafkaOriginReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaOriginReader")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

/// What one poll of the reader's consumer gave, owned (nothing borrowed across an await).
enum Polled {
    Record(LinkRecord),
    Skip,
    Error(KafkaError),
    TimedOut,
}

impl KafkaOriginReader {
    fn high_watermark(&self) -> i64 {
        self.high.load(Ordering::Relaxed).max(self.next)
    }

    /// What a consumer error means for this reader: `None` to read on.
    async fn on_error(&self, e: KafkaError) -> Option<LogError> {
        let (topic, partition) = (&self.topic, self.partition);
        match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange) => {
                let earliest = match watermarks(&self.meta, topic, partition).await {
                    Ok((low, _)) => low,
                    Err(e) => return Some(e),
                };
                tracing::info!(%topic, partition, next = self.next, earliest, "mirror serve: retention passed the reader's position");
                Some(LogError::OffsetOutOfRange { earliest })
            }
            _ if is_unknown_partition(&e) => Some(LogError::UnknownPartition(partition)),
            Some(RDKafkaErrorCode::AllBrokersDown) => Some(LogError::Unavailable(format!(
                "reading {topic}/{partition}: {e}"
            ))),
            _ if is_transient_consumer_error(&e) => {
                tracing::debug!(%topic, partition, error = %e, "mirror serve: transient consumer error");
                None
            }
            _ => Some(LogError::Unavailable(format!(
                "reading {topic}/{partition}: {e}"
            ))),
        }
    }
}

#[async_trait]
impl OriginReader for KafkaOriginReader {
    async fn next_batch(&mut self, max_bytes: usize) -> Result<OriginBatch, LogError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let consumer = Arc::clone(&self.consumer);
        let started = tokio::time::Instant::now();
        let idle_deadline = started + self.tuning.idle_wait;
        let mut records = Vec::new();
        let mut bytes = 0usize;
        let mut collect_deadline = None;
        if let Some(r) = self.pending.take() {
            bytes += record_len_bound(&r);
            records.push(r);
            collect_deadline = Some(started + self.tuning.max_collect);
        }
        loop {
            if !records.is_empty() && bytes >= max_bytes {
                break;
            }
            let wait_until = match collect_deadline {
                None => idle_deadline,
                Some(cd) => cd.min(tokio::time::Instant::now() + self.tuning.linger),
            };
            let polled = match tokio::time::timeout_at(wait_until, consumer.recv()).await {
                Err(_) => Polled::TimedOut,
                Ok(Err(e)) => Polled::Error(e),
                Ok(Ok(m)) => {
                    if m.partition() != self.partition
                        || m.topic() != self.topic
                        || m.offset() < self.next
                    {
                        Polled::Skip
                    } else {
                        Polled::Record(link_record(&m))
                    }
                }
            };
            match polled {
                Polled::TimedOut => break,
                Polled::Skip => continue,
                Polled::Error(e) => match self.on_error(e).await {
                    None => continue,
                    Some(err) if records.is_empty() => return Err(err),
                    Some(err) => {
                        // Hand out what was read; the error comes with the next call.
                        self.failed = Some(err);
                        break;
                    }
                },
                Polled::Record(r) => {
                    self.next = r.offset.saturating_add(1);
                    self.high.fetch_max(self.next, Ordering::Relaxed);
                    let n = record_len_bound(&r);
                    if !records.is_empty() && bytes + n > max_bytes {
                        self.pending = Some(r);
                        break;
                    }
                    bytes += n;
                    records.push(r);
                    if collect_deadline.is_none() {
                        collect_deadline =
                            Some(tokio::time::Instant::now() + self.tuning.max_collect);
                    }
                }
            }
        }
        Ok(OriginBatch {
            records,
            high_watermark: self.high_watermark(),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Single-record and range reads of mirror partitions (tail, room replay)
// ---------------------------------------------------------------------------------------

type Probe = BaseConsumer<ProbeContext>;

/// [`TracingContext`], except that reaching the end of a partition is not a warning: these
/// reads ask for partition-EOF signals and meet one on most reads. (librdkafka hands each
/// signal to the error callback too when a real broker sends it.)
struct ProbeContext(TracingContext);

impl ClientContext for ProbeContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.0.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(error, KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF);
        if eof {
            tracing::trace!(target: "librdkafka", client = %self.0.client_id, "{reason}");
        } else {
            self.0.error(error, reason);
        }
    }
}

impl ConsumerContext for ProbeContext {}

/// Why a read of a mirror partition failed.
#[derive(Debug)]
enum ReadError {
    Unavailable(String),
    UnknownPartition(i32),
    /// A record that should not be there (no valid origin offset header).
    Corrupt(String),
    Other(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Unavailable(s) | ReadError::Corrupt(s) | ReadError::Other(s) => {
                f.write_str(s)
            }
            ReadError::UnknownPartition(p) => write!(f, "partition {p} does not exist"),
        }
    }
}

impl From<ReadError> for LogError {
    fn from(e: ReadError) -> LogError {
        match e {
            ReadError::Unavailable(s) => LogError::Unavailable(s),
            ReadError::UnknownPartition(p) => LogError::UnknownPartition(p),
            ReadError::Corrupt(s) | ReadError::Other(s) => LogError::Other(s),
        }
    }
}

/// Group-less consumers for short reads of mirror partitions, pooled (each is a librdkafka
/// instance) and limited to [`MAX_CONCURRENT_READS`] reads at once, each on a blocking
/// thread, each bounded by a deadline.
struct ProbePool {
    config: ClientConfig,
    idle: Mutex<Vec<Probe>>,
    slots: Arc<Semaphore>,
}

impl ProbePool {
    /// Settings: [`reader_config`] (replay's consumer settings), with smaller fetches: a
    /// probe wants one record, a range read is bounded anyway.
    fn new(cfg: &KafkaConfig, region: &str, node: &str) -> Result<ProbePool, String> {
        let mut config = reader_config(cfg, region, &format!("{node}-mirror"));
        config.set("max.partition.fetch.bytes", "262144");
        let first = Self::build(&config)?;
        Ok(ProbePool {
            config,
            idle: Mutex::new(vec![first]),
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT_READS)),
        })
    }

    fn build(config: &ClientConfig) -> Result<Probe, String> {
        BaseConsumer::from_config_and_context(
            config,
            ProbeContext(TracingContext::for_config(config)),
        )
        .map_err(|e| format!("cannot create a mirror reader: {e}"))
    }

    /// Runs `job` on a pooled consumer on a blocking thread, within `timeout` overall.
    async fn run<T, F>(&self, what: &str, timeout: Duration, job: F) -> Result<T, ReadError>
    where
        T: Send + 'static,
        F: FnOnce(&Probe, Instant) -> Result<T, ReadError> + Send + 'static,
    {
        let deadline = Instant::now() + timeout;
        let timed_out = || ReadError::Unavailable(format!("{what} timed out after {timeout:?}"));
        let slot =
            tokio::time::timeout_at(deadline.into(), Arc::clone(&self.slots).acquire_owned())
                .await
                .map_err(|_| timed_out())?
                .map_err(|_| ReadError::Other("the mirror reader is closed".into()))?;
        let pooled = lock(&self.idle).pop();
        let consumer = match pooled {
            Some(c) => c,
            None => Self::build(&self.config).map_err(ReadError::Other)?,
        };
        let handle = tokio::task::spawn_blocking(move || {
            // Events queued while the consumer sat idle (a broker that went away and came
            // back) say nothing about this read.
            drain(&consumer);
            let result = job(&consumer, deadline);
            forget_assignment(&consumer);
            drop(slot);
            (OffRuntime::new(consumer), result)
        });
        // The job stops by itself at the deadline; the guard is for a librdkafka call that
        // overruns its own timeout.
        let guard = (deadline + Duration::from_secs(2)).into();
        match tokio::time::timeout_at(guard, handle).await {
            Ok(Ok((consumer, Ok(v)))) => {
                if let Some(c) = consumer.into_inner() {
                    lock(&self.idle).push(c);
                }
                Ok(v)
            }
            // Don't reuse a consumer in an unknown state (dropped off the runtime).
            Ok(Ok((_consumer, Err(e)))) => Err(e),
            Ok(Err(e)) => Err(ReadError::Other(format!("{what}: read task failed: {e}"))),
            Err(_) => Err(timed_out()),
        }
    }
}

impl Drop for ProbePool {
    fn drop(&mut self) {
        let idle = std::mem::take(&mut *lock(&self.idle));
        if !idle.is_empty() {
            drop_off_runtime(idle);
        }
    }
}

/// Leaves nothing of the last read behind for the next one on this consumer.
fn forget_assignment(c: &Probe) {
    let _ = c.unassign();
    drain(c);
}

/// Serves whatever the consumer has queued (messages, errors, logs), without waiting.
fn drain(c: &Probe) {
    for _ in 0..100_000 {
        if c.poll(Duration::ZERO).is_none() {
            break;
        }
    }
}

/// Reads of one mirror partition on one consumer, on a blocking thread, until `deadline`.
struct PartitionReads<'a> {
    consumer: &'a Probe,
    topic: &'a str,
    partition: i32,
    deadline: Instant,
}

impl PartitionReads<'_> {
    fn left(&self) -> Result<Duration, ReadError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(ReadError::Unavailable(format!(
                "reading {}/{} timed out",
                self.topic, self.partition
            )))
        } else {
            Ok(left)
        }
    }

    fn kafka_err(&self, what: &str, e: &KafkaError) -> ReadError {
        if is_unknown_partition(e) {
            ReadError::UnknownPartition(self.partition)
        } else {
            ReadError::Unavailable(format!("{what} {}/{}: {e}", self.topic, self.partition))
        }
    }

    fn watermarks(&self) -> Result<(i64, i64), ReadError> {
        self.left()?;
        query_until(self.deadline, |timeout| {
            self.consumer
                .fetch_watermarks(self.topic, self.partition, timeout)
        })
        .map_err(|e| self.kafka_err("watermarks of", &e))
    }

    fn corrupt(&self, offset: i64) -> ReadError {
        ReadError::Corrupt(format!(
            "mirror record {}/{} at offset {offset} has no valid {HEADER_ORIGIN_OFFSET} header",
            self.topic, self.partition
        ))
    }

    /// The consumer's position in the partition (the offset after the last one consumed,
    /// including offsets that hold no record), if known.
    fn position(&self) -> Option<i64> {
        let tpl = self.consumer.position().ok()?;
        match tpl.find_partition(self.topic, self.partition)?.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }
    }

    /// Reads the records at offsets `start..limit` in order, giving each to `f` until it
    /// returns `false`. Offsets in the range that hold no record (deleted by retention, or
    /// control records) are passed over.
    fn read(
        &self,
        start: i64,
        limit: i64,
        f: &mut dyn FnMut(&BorrowedMessage<'_>) -> Result<bool, ReadError>,
    ) -> Result<(), ReadError> {
        if start >= limit {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(self.topic, self.partition, Offset::Offset(start))
            .map_err(|e| ReadError::Other(format!("offset {start}: {e}")))?;
        self.consumer
            .assign(&tpl)
            .map_err(|e| self.kafka_err("assigning", &e))?;
        // The last offset handed to `f`: each record at most once, in offset order,
        // whatever the consumer's queue still holds from an earlier read.
        let mut last = start - 1;
        loop {
            let wait = self.left()?.min(Duration::from_millis(100));
            match self.consumer.poll(wait) {
                None => continue,
                Some(Ok(m)) => {
                    if m.topic() != self.topic || m.partition() != self.partition {
                        continue;
                    }
                    let o = m.offset();
                    if o <= last {
                        continue;
                    }
                    if o >= limit {
                        return Ok(());
                    }
                    last = o;
                    if !f(&m)? || o >= limit - 1 {
                        return Ok(());
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) if p == self.partition => {
                    // The consumer reached the end of the partition as the broker saw it at
                    // that fetch (signals of an earlier assignment are discarded by
                    // librdkafka). Its position counts offsets that hold no record
                    // (transaction markers), which `last` cannot; the watermarks guard
                    // against a position that is not meaningful.
                    let (low, high) = self.watermarks()?;
                    let reached = self
                        .position()
                        .filter(|p| *p >= start)
                        .unwrap_or(start)
                        .max(last + 1)
                        .max(low);
                    if reached >= limit.min(high) {
                        return Ok(());
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) if is_transient_consumer_error(&e) => {
                    tracing::debug!(topic = %self.topic, partition = self.partition, error = %e, "mirror read: transient consumer error");
                }
                Some(Err(e)) => return Err(self.kafka_err("reading", &e)),
            }
        }
    }

    /// The first record at an offset in `at..limit`: its offset and origin offset.
    fn first_at(&self, at: i64, limit: i64) -> Result<Option<(i64, i64)>, ReadError> {
        let mut found = None;
        self.read(at, limit, &mut |m| {
            let o = origin_offset(m).ok_or_else(|| self.corrupt(m.offset()))?;
            found = Some((m.offset(), o));
            Ok(false)
        })?;
        Ok(found)
    }

    /// The origin offset of the last record of the partition, `None` if it holds none.
    fn tail(&self) -> Result<Option<i64>, ReadError> {
        let (low, high) = self.watermarks()?;
        if high <= low {
            return Ok(None);
        }
        for window in TAIL_WINDOWS {
            let start = high.saturating_sub(window).max(low);
            let mut last = None;
            self.read(start, high, &mut |m| {
                last = Some((m.offset(), origin_offset(m)));
                Ok(true)
            })?;
            if let Some((offset, origin)) = last {
                return origin.map(Some).ok_or_else(|| self.corrupt(offset));
            }
            if start == low {
                break;
            }
        }
        Err(ReadError::Other(format!(
            "no readable record in mirror partition {}/{} (offsets {low}..{high})",
            self.topic, self.partition
        )))
    }

    /// The first mirror offset at or after `lo` from which reading finds every record with
    /// an origin offset above `after`. `lo_origin` is the origin offset of the record right
    /// before `lo` (at most `after`); `high` the high watermark.
    ///
    /// Origin offsets grow along the partition by at least one per record, so the answer is
    /// at most `lo + (after - lo_origin)`, which is exact when every origin record was
    /// mirrored: the first probe checks that bound, then it is a plain binary search. A
    /// re-sent stretch (the same origin offsets twice, after a purged append landed late)
    /// only ever moves the answer earlier, which reading forward with deduplication
    /// tolerates.
    fn search(
        &self,
        mut lo: i64,
        mut lo_origin: i64,
        after: i64,
        high: i64,
    ) -> Result<i64, ReadError> {
        let mut hi = high;
        let mut probes = 0u32;
        while lo < hi {
            hi = hi.min(lo.saturating_add(after.saturating_sub(lo_origin)));
            if lo >= hi {
                break;
            }
            let mid = if probes == 0 {
                hi - 1
            } else {
                lo + (hi - lo) / 2
            };
            probes += 1;
            match self.first_at(mid, hi)? {
                Some((m, o)) if o <= after => {
                    lo = m + 1;
                    lo_origin = o;
                }
                _ => hi = mid,
            }
        }
        tracing::trace!(topic = %self.topic, partition = self.partition, after, start = lo, probes, "mirror replay: binary search done");
        Ok(lo)
    }
}

// ---------------------------------------------------------------------------------------
// Mirror side
// ---------------------------------------------------------------------------------------

/// Settings of the mirror producer: [`producer_config`] (idempotent, `acks=all`) with
///
/// - `max.in.flight.requests.per.connection=5`: the most an idempotent producer allows
///   while keeping order;
/// - `linger.ms=1`: a mirror append hands the producer a whole batch at once (the mirror
///   client joins everything that arrived during its previous append), so lingering buys
///   no bigger requests; it only delays every remote message (it was 5 ms, paid on every
///   append of every partition);
/// - `message.timeout.ms=0` and `enable.gapless.guarantee=true`: see the module docs
///   (appends are bounded by [`APPEND_TIMEOUT`] and a purge instead);
/// - `partitioner` irrelevant: every record names its partition.
pub fn mirror_producer_config(cfg: &KafkaConfig, region: &str, node: &str) -> ClientConfig {
    let mut c = producer_config(cfg, region, &format!("{node}-mirror"));
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .set("linger.ms", "1")
        .set("message.timeout.ms", "0")
        .set("enable.gapless.guarantee", "true");
    c
}

/// The writer of mirror partition `origin`/`partition`: [`mirror_producer_config`] made
/// transactional under the partition's own id (shared by the region's daemons, so a new
/// writer fences the one before). Transactions bound a message's life themselves
/// (`message.timeout.ms` must not exceed `transaction.timeout.ms`), and a failed append is
/// aborted whole, so the gapless guarantee has nothing left to do.
pub fn mirror_writer_config(
    base: &ClientConfig,
    region: &str,
    origin: &str,
    partition: i32,
) -> ClientConfig {
    let mut c = base.clone();
    c.remove("enable.gapless.guarantee");
    c.set(
        "transactional.id",
        format!("dtfed-mirror.{region}.{origin}.{partition}"),
    )
    .set("transaction.timeout.ms", "60000")
    .set("message.timeout.ms", "30000");
    c
}

type Prod = FutureProducer<TracingContext>;

/// This region's mirror topics ([`MirrorLog`]): tails read with pooled group-less
/// consumers, appends by each mirror partition's own transactional writer.
pub struct KafkaMirrorLog {
    region: String,
    config: ClientConfig,
    /// Each mirror partition's writer, started by [`MirrorLog::tail`]; dropped when fenced.
    writers: Mutex<HashMap<(String, i32), Arc<Prod>>>,
    reads: ProbePool,
    append_timeout: Duration,
    read_timeout: Duration,
}

impl std::fmt::Debug for KafkaMirrorLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaMirrorLog")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl Drop for KafkaMirrorLog {
    fn drop(&mut self) {
        for (_, w) in lock(&self.writers).drain() {
            drop_off_runtime(w);
        }
    }
}

fn build_producer(config: &ClientConfig) -> Result<Prod, String> {
    FutureProducer::from_config_and_context(config, TracingContext::for_config(config))
        .map_err(|e| format!("cannot create the mirror producer: {e}"))
}

/// How an append's transaction ended.
enum TransactionEnd {
    Committed,
    /// The records failed (the append's error) and the transaction was aborted.
    Aborted(LogError),
    /// Committing or aborting failed.
    Failed {
        step: &'static str,
        error: KafkaError,
        append: Option<LogError>,
    },
}

/// One append's delivery results, in record order.
#[derive(Default)]
struct Outcome {
    /// The first record that failed: its origin offset and why.
    first_failure: Option<(i64, String)>,
    /// Origin offsets acknowledged after the first failure (a hole if any).
    written_after_failure: Vec<i64>,
}

impl Outcome {
    fn fail(&mut self, origin_offset: i64, why: String) {
        if self.first_failure.is_none() {
            self.first_failure = Some((origin_offset, why));
        }
    }
}

impl KafkaMirrorLog {
    pub fn new(cfg: &KafkaConfig, region: &str) -> Result<KafkaMirrorLog, KafkaSetupError> {
        Self::with_node(cfg, region, &default_node_name())
    }

    /// Like [`KafkaMirrorLog::new`] with this daemon's node name in `client.id`.
    pub fn with_node(
        cfg: &KafkaConfig,
        region: &str,
        node: &str,
    ) -> Result<KafkaMirrorLog, KafkaSetupError> {
        let setup = |detail: String| KafkaSetupError::Unreachable {
            brokers: cfg.brokers.clone(),
            detail,
        };
        let config = mirror_producer_config(cfg, region, node);
        // Checks the settings now rather than at the first append.
        drop_off_runtime(build_producer(&config).map_err(setup)?);
        let reads = ProbePool::new(cfg, region, node).map_err(setup)?;
        Ok(KafkaMirrorLog {
            region: region.to_owned(),
            config,
            writers: Mutex::new(HashMap::new()),
            reads,
            append_timeout: APPEND_TIMEOUT,
            read_timeout: READ_TIMEOUT,
        })
    }

    /// Overrides [`APPEND_TIMEOUT`] (tests).
    pub fn set_append_timeout(&mut self, timeout: Duration) {
        self.append_timeout = timeout;
    }

    /// Overrides the bound on a tail read ([`READ_TIMEOUT`]) (tests).
    pub fn set_read_timeout(&mut self, timeout: Duration) {
        self.read_timeout = timeout;
    }

    /// Starts a fresh writer for `origin`/`partition`, fencing every earlier one (here or
    /// on another daemon of the region), and keeps it for the appends that follow.
    async fn claim(&self, origin: &str, partition: i32) -> Result<(), LogError> {
        let config = mirror_writer_config(&self.config, &self.region, origin, partition);
        // Part of the tail read, and bounded with it.
        let timeout = WRITER_INIT_TIMEOUT.min(self.read_timeout);
        let writer = tokio::task::spawn_blocking(move || -> Result<Prod, String> {
            let p = build_producer(&config)?;
            if let Err(e) = p.init_transactions(timeout) {
                drop(p);
                return Err(format!("cannot start the mirror partition's writer: {e}"));
            }
            Ok(p)
        })
        .await
        .map_err(|e| LogError::Unavailable(format!("mirror writer start-up task: {e}")))?
        .map_err(LogError::Unavailable)?;
        let old = lock(&self.writers).insert((origin.to_owned(), partition), Arc::new(writer));
        if let Some(old) = old {
            drop_off_runtime(old);
        }
        tracing::debug!(
            origin,
            partition,
            "mirror partition writer started (earlier writers fenced)"
        );
        Ok(())
    }

    fn writer(&self, origin: &str, partition: i32) -> Result<Arc<Prod>, LogError> {
        lock(&self.writers)
            .get(&(origin.to_owned(), partition))
            .cloned()
            .ok_or_else(|| {
                LogError::Unavailable(format!(
                    "no writer for {}/{partition}: the tail is read first",
                    mirror_topic(origin)
                ))
            })
    }

    /// Forgets `writer` (fenced or fatal): the next tail read starts a new one.
    fn drop_writer(&self, origin: &str, partition: i32, writer: &Arc<Prod>) {
        let mut writers = lock(&self.writers);
        let key = (origin.to_owned(), partition);
        if writers.get(&key).is_some_and(|w| Arc::ptr_eq(w, writer)) {
            if let Some(w) = writers.remove(&key) {
                drop(writers);
                drop_off_runtime(w);
            }
        }
    }

    /// One append as one transaction of the partition's writer.
    async fn append_in_transaction(
        &self,
        origin: &str,
        partition: i32,
        records: &[LinkRecord],
    ) -> Result<(), LogError> {
        let writer = self.writer(origin, partition)?;
        if let Err(e) = writer.begin_transaction() {
            return Err(self.transaction_failed(origin, partition, &writer, "begin", &e));
        }
        let appended = self.append_with(&writer, origin, partition, records).await;
        let w = Arc::clone(&writer);
        let ended = tokio::task::spawn_blocking(move || match appended {
            Ok(()) => match w.commit_transaction(COMMIT_TIMEOUT) {
                Ok(()) => TransactionEnd::Committed,
                Err(error) => TransactionEnd::Failed {
                    step: "commit",
                    error,
                    append: None,
                },
            },
            Err(failed) => match w.abort_transaction(ABORT_TIMEOUT) {
                Ok(()) => TransactionEnd::Aborted(failed),
                Err(error) => TransactionEnd::Failed {
                    step: "abort",
                    error,
                    append: Some(failed),
                },
            },
        })
        .await
        .map_err(|e| LogError::Unavailable(format!("mirror transaction task: {e}")))?;
        match ended {
            TransactionEnd::Committed => Ok(()),
            // The records failed and the transaction was aborted: nothing of it is visible.
            TransactionEnd::Aborted(failed) => Err(failed),
            TransactionEnd::Failed {
                step,
                error,
                append,
            } => {
                // A fenced writer says so, whatever else failed with it.
                match (
                    self.transaction_failed(origin, partition, &writer, step, &error),
                    append,
                ) {
                    (fenced @ LogError::Other(_), _) => Err(fenced),
                    (_, Some(failed)) => Err(failed),
                    (err, None) => Err(err),
                }
            }
        }
    }

    /// Turns a transaction error into the append's error; a fenced or fatal writer is
    /// dropped (another daemon writes this partition now, or the producer is unusable).
    fn transaction_failed(
        &self,
        origin: &str,
        partition: i32,
        writer: &Arc<Prod>,
        step: &str,
        e: &KafkaError,
    ) -> LogError {
        let fenced = matches!(
            e.rdkafka_error_code(),
            Some(RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch)
        );
        let fatal = writer.client().fatal_error().is_some()
            || matches!(e, KafkaError::Transaction(t) if t.is_fatal());
        if fenced || fatal {
            self.drop_writer(origin, partition, writer);
        }
        if fenced {
            tracing::warn!(origin, partition, step, "mirror writer fenced: another daemon of the region writes this mirror partition now");
            LogError::Other(format!(
                "mirror writer of {}/{partition} fenced: another daemon writes it now",
                mirror_topic(origin)
            ))
        } else {
            tracing::warn!(origin, partition, step, error = %e, fatal, "mirror transaction failed");
            LogError::Unavailable(format!(
                "mirror transaction on {}/{partition} ({step}): {e}",
                mirror_topic(origin)
            ))
        }
    }

    /// Fails every queued and in-flight message of `producer` (they report at once).
    async fn purge(producer: &Arc<Prod>) {
        let p = Arc::clone(producer);
        let purged = tokio::task::spawn_blocking(move || {
            p.purge(PurgeConfig::default().queue().inflight());
        })
        .await;
        if let Err(e) = purged {
            tracing::error!(error = %e, "mirror producer purge task failed");
        }
    }

    async fn append_with(
        &self,
        producer: &Arc<Prod>,
        origin: &str,
        partition: i32,
        records: &[LinkRecord],
    ) -> Result<(), LogError> {
        let topic = mirror_topic(origin);
        let mut outcome = Outcome::default();
        let mut deliveries = Vec::with_capacity(records.len());
        for r in records {
            let mut headers = OwnedHeaders::new_with_capacity(r.headers.len() + 2);
            for (k, v) in r.mirror_headers(origin) {
                headers = headers.insert(Header {
                    key: k.as_str(),
                    value: Some(v.as_slice()),
                });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic)
                .partition(partition)
                .payload(r.value.as_slice())
                .headers(headers);
            if !r.key.is_empty() {
                record = record.key(r.key.as_slice());
            }
            if r.timestamp_ms >= 0 {
                record = record.timestamp(r.timestamp_ms);
            }
            match producer.send_result(record) {
                Ok(d) => deliveries.push((r.offset, d)),
                Err((e, _)) => {
                    // Nothing after a record that could not be queued is queued: what is
                    // written stays a prefix.
                    outcome.fail(r.offset, format!("cannot queue: {e}"));
                    break;
                }
            }
        }
        let deadline = tokio::time::Instant::now() + self.append_timeout;
        let mut purged = false;
        for (origin_offset, mut delivery) in deliveries {
            let result = match tokio::time::timeout_at(deadline, &mut delivery).await {
                Ok(r) => r,
                Err(_) => {
                    if !purged {
                        purged = true;
                        tracing::warn!(origin, partition, timeout = ?self.append_timeout, "mirror append not acknowledged in time; purging the producer");
                        Self::purge(producer).await;
                    }
                    match tokio::time::timeout(PURGE_GRACE, &mut delivery).await {
                        Ok(r) => r,
                        Err(_) => {
                            outcome.fail(
                                origin_offset,
                                "no delivery report even after a purge".into(),
                            );
                            continue;
                        }
                    }
                }
            };
            match result {
                Ok(Ok(d)) if d.partition == partition => {
                    if outcome.first_failure.is_some() {
                        outcome.written_after_failure.push(origin_offset);
                    }
                }
                Ok(Ok(d)) => {
                    // Cannot happen (the partition is explicit), and would break everything.
                    outcome.fail(
                        origin_offset,
                        format!(
                            "written to partition {} instead of {partition}",
                            d.partition
                        ),
                    );
                }
                Ok(Err((e, _))) => outcome.fail(origin_offset, e.to_string()),
                Err(_canceled) => outcome.fail(origin_offset, "the producer went away".into()),
            }
        }
        let Some((failed_at, why)) = outcome.first_failure else {
            return Ok(());
        };
        if let (Some(first), Some(last)) = (
            outcome.written_after_failure.first(),
            outcome.written_after_failure.last(),
        ) {
            tracing::error!(
                origin,
                partition,
                failed_at,
                written_from = first,
                written_to = last,
                error = %why,
                "mirror append wrote records after one that failed: the mirror partition has a hole"
            );
            return Err(LogError::Other(format!(
                "mirror append to {topic}/{partition}: origin offset {failed_at} failed ({why}) but \
                 {} later records were written (origin offsets {first}..={last}): a hole",
                outcome.written_after_failure.len()
            )));
        }
        tracing::warn!(origin, partition, failed_at, error = %why, "mirror append failed");
        Err(LogError::Unavailable(format!(
            "mirror append to {topic}/{partition} failed at origin offset {failed_at}: {why}"
        )))
    }
}

#[async_trait]
impl MirrorLog for KafkaMirrorLog {
    async fn tail(&self, origin: &str, partition: i32) -> Result<Option<i64>, LogError> {
        // The writer first: once it is started, no earlier writer can add anything, and
        // the tail read below sees every committed append.
        self.claim(origin, partition).await?;
        let topic = mirror_topic(origin);
        let what = format!("reading the tail of {topic}/{partition}");
        let t = topic.clone();
        let tail = self
            .reads
            .run(&what, self.read_timeout, move |consumer, deadline| {
                PartitionReads {
                    consumer,
                    topic: &t,
                    partition,
                    deadline,
                }
                .tail()
            })
            .await;
        match &tail {
            Ok(t) => tracing::debug!(origin, partition, tail = ?t, "mirror tail read"),
            Err(e) => tracing::warn!(origin, partition, error = %e, "cannot read the mirror tail"),
        }
        Ok(tail?)
    }

    async fn append(
        &self,
        origin: &str,
        partition: i32,
        records: &[LinkRecord],
    ) -> Result<(), LogError> {
        if records.is_empty() {
            return Ok(());
        }
        self.append_in_transaction(origin, partition, records).await
    }
}

/// Creates the mirror topic of `origin` (`dtfed.mirror.<origin>`) with `partitions`
/// partitions, the origin's local topic's count, if it does not exist (with
/// [`ensure_topic`]: retried while the cluster starts). Returns the topic's name.
///
/// Fails if the topic exists with another partition count: mirroring is
/// partition-preserving (origin partition p goes to mirror partition p, and
/// [`partition_for`] must find a room in the same partition number on both sides).
pub async fn ensure_mirror_topic(
    cfg: &KafkaConfig,
    origin: &str,
    partitions: i32,
) -> Result<String, KafkaSetupError> {
    let topic = mirror_topic(origin);
    if !valid_region_name(origin) {
        return Err(KafkaSetupError::Topic {
            topic,
            detail: format!("{origin:?} is not a valid region name"),
        });
    }
    let n = ensure_topic(cfg, &topic, partitions).await?;
    if n != partitions {
        return Err(KafkaSetupError::Topic {
            topic,
            detail: format!(
                "has {n} partitions but origin {origin}'s local topic has {partitions}; \
                 mirroring is partition-preserving and needs the same count: add partitions \
                 to the mirror topic (or recreate it) to match"
            ),
        });
    }
    Ok(topic)
}

// ---------------------------------------------------------------------------------------
// Replay of remote origins
// ---------------------------------------------------------------------------------------

/// Reads a room's messages from another region (an origin) out of this region's mirror
/// topic `dtfed.mirror.<origin>`, for players resuming with a cursor.
///
/// Like [`crate::replay::RoomLogReader`], a read is a scan of one partition range whose
/// other rooms' records are dropped here; finding where the range starts costs a binary
/// search of single-record reads (a couple of reads when every origin record was mirrored).
pub struct MirrorRoomReader {
    region: String,
    reads: ProbePool,
    timeout: Duration,
    limit: ReadLimit,
}

impl std::fmt::Debug for MirrorRoomReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorRoomReader")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl MirrorRoomReader {
    pub fn new(cfg: &KafkaConfig, region: &str) -> Result<MirrorRoomReader, ReplayError> {
        Self::with_node(cfg, region, &default_node_name())
    }

    /// Like [`MirrorRoomReader::new`] with this daemon's node name in `client.id`.
    pub fn with_node(
        cfg: &KafkaConfig,
        region: &str,
        node: &str,
    ) -> Result<MirrorRoomReader, ReplayError> {
        Ok(MirrorRoomReader {
            region: region.to_owned(),
            reads: ProbePool::new(cfg, region, node).map_err(ReplayError::Kafka)?,
            timeout: READ_TIMEOUT,
            limit: READ_LIMIT,
        })
    }

    /// Overrides [`READ_TIMEOUT`] (tests).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Overrides [`READ_LIMIT`] (tests).
    pub fn set_limit(&mut self, limit: ReadLimit) {
        self.limit = limit;
    }

    /// The records of `room` from `origin` with `after < origin offset < before`, read from
    /// this region's mirror of `origin`, whose local topic has `partitions` partitions.
    /// `after = None` reads from the oldest mirrored record; `before = None` up to the
    /// mirror partition's end at the time of the call.
    ///
    /// [`RoomRead::earliest`] is the origin offset of the oldest record this region still
    /// holds in that mirror partition: a cursor below `earliest - 1` has lost
    /// `cursor+1 ..= earliest-1` from this region's point of view. For a mirror partition
    /// holding nothing it is `after + 1` (0 without `after`): no gap can be named.
    pub async fn read_room(
        &self,
        origin: &str,
        room: &RoomId,
        partitions: i32,
        after: Option<i64>,
        before: Option<i64>,
    ) -> Result<RoomRead, ReplayError> {
        if partitions < 1 {
            return Err(ReplayError::Kafka(format!(
                "origin {origin} has {partitions} partitions"
            )));
        }
        let topic = mirror_topic(origin);
        let partition = partition_for(room, partitions);
        let what = format!("reading room {room} of {origin} from {topic}/{partition}");
        let job = RoomJob {
            topic,
            origin: origin.to_owned(),
            room: room.clone(),
            partition,
            after,
            before,
            limit: self.limit,
        };
        self.reads
            .run(&what, self.timeout, move |consumer, deadline| {
                job.run(&PartitionReads {
                    consumer,
                    topic: &job.topic,
                    partition,
                    deadline,
                })
            })
            .await
            .map_err(|e| {
                tracing::warn!(origin, partition, %room, error = %e, "mirror replay failed");
                ReplayError::Kafka(e.to_string())
            })
    }
}

/// One room read, run on a blocking thread.
struct RoomJob {
    topic: String,
    origin: String,
    room: RoomId,
    partition: i32,
    after: Option<i64>,
    before: Option<i64>,
    limit: ReadLimit,
}

impl RoomJob {
    fn run(&self, reads: &PartitionReads<'_>) -> Result<RoomRead, ReadError> {
        let p = self.partition;
        let empty = |earliest: i64| RoomRead {
            partition: p,
            earliest,
            records: Vec::new(),
            stopped_at: None,
        };
        let nothing_held = self.after.map_or(0, |a| a.saturating_add(1)).max(0);
        let (low, high) = reads.watermarks()?;
        let Some((first, earliest)) = reads.first_at(low, high)? else {
            if high > low {
                tracing::warn!(origin = %self.origin, partition = p, low, high, "mirror replay: no readable record in the mirror partition");
            }
            return Ok(empty(nothing_held));
        };
        if self.before.is_some_and(|b| earliest >= b) {
            return Ok(empty(earliest));
        }
        let start = match self.after {
            Some(a) if earliest <= a => reads.search(first + 1, earliest, a, high)?,
            _ => first,
        };
        let room = self.room.as_str().as_bytes();
        let mut last = self.after.unwrap_or(i64::MIN);
        let mut records = Vec::new();
        let (mut bytes, mut scanned, mut stopped_at) = (0usize, 0i64, None);
        reads.read(start, high, &mut |m| {
            let o = origin_offset(m).ok_or_else(|| reads.corrupt(m.offset()))?;
            if self.before.is_some_and(|b| o >= b) {
                return Ok(false);
            }
            if o <= last {
                // Before the range, or a record mirrored twice.
                return Ok(true);
            }
            last = o;
            scanned += 1;
            if m.key() == Some(room) {
                if let Some(claimed) = other_origin(m, &self.origin) {
                    // As the fan-out does: a record of this topic is this origin's or nobody's.
                    tracing::warn!(origin = %self.origin, partition = p, offset = o, claimed = %claimed, "mirror replay: skipping a record labelled with another origin");
                    return Ok(true);
                }
                match m.payload().map(LogValue::from_json) {
                    Some(Ok(value)) => {
                        bytes = bytes.saturating_add(m.payload_len());
                        records.push(LogRecord {
                            room: self.room.clone(),
                            origin: self.origin.clone(),
                            partition: p,
                            offset: o,
                            value,
                        });
                    }
                    Some(Err(e)) => {
                        tracing::warn!(origin = %self.origin, partition = p, offset = o, error = %e, "mirror replay: skipping a record that is not a chat message");
                    }
                    None => {
                        tracing::warn!(origin = %self.origin, partition = p, offset = o, "mirror replay: skipping a record without a value");
                    }
                }
            }
            if self.limit.reached(records.len(), bytes, scanned) {
                // The end of the range may be right here; then the next read finds nothing.
                stopped_at = Some(o);
                return Ok(false);
            }
            Ok(true)
        })?;
        Ok(RoomRead {
            partition: p,
            earliest,
            records,
            stopped_at,
        })
    }
}
