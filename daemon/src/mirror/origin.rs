//! The serving side of mirroring: this region's local topic, read for peer regions.
//!
//! [`KafkaOriginLog`] implements [`OriginLog`] for the mirror server
//! (`dtfed_regions::mirror::server`): it reads partition p of the local topic from an offset
//! on, with one group-less consumer per served stream ([`KafkaOriginReader`]), and answers
//! watermark questions from one shared admin client. Start at [`KafkaOriginLog::open`].

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dtfed_proto::link::codec::record_len_bound;
use dtfed_proto::link::LinkRecord;
use dtfed_regions::mirror::log::{LogError, OriginBatch, OriginLog, OriginReader};
use rdkafka::admin::AdminClient;
use rdkafka::client::ClientContext;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::lock;
use crate::config::KafkaConfig;
use crate::kafka::settings::{admin_config, origin_reader_config};
use crate::kafka::{
    default_node_name, is_transient_consumer_error, is_unknown_partition, KafkaSetupError,
    OffRuntime, TracingContext,
};
use crate::mirror::reads::{link_record, query_until, Meta, METADATA_TIMEOUT};

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
    /// The readers' settings ([`origin_reader_config`], or a relay's).
    reader_config: fn(&KafkaConfig, &str, &str) -> rdkafka::ClientConfig,
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
        let cc = admin_config(cfg, region, &format!("{node}-mirror-meta"));
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
            reader_config: origin_reader_config,
        })
    }

    /// Builds the readers with `settings` instead of [`origin_reader_config`] (a relay's
    /// mirror topic reader: `crate::kafka::settings::relay_reader_config`).
    pub fn with_reader_config(
        mut self,
        settings: fn(&KafkaConfig, &str, &str) -> rdkafka::ClientConfig,
    ) -> KafkaOriginLog {
        self.reader_config = settings;
        self
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
        let config = (self.reader_config)(&self.cfg, &self.region, &self.node);
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
    crate::kafka::log_to_tracing!(log);

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
