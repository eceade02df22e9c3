//! The receiving side of mirroring: writing a peer's records into this region's mirror
//! topic `dtfed.mirror.<origin>`.
//!
//! [`KafkaMirrorLog`] ([`MirrorLog`]) reads the tail of mirror partition
//! `dtfed.mirror.<origin>`/p and appends to it, explicitly to partition p
//! (partition-preserving), each record carrying its origin offset and origin timestamp in
//! headers. Every append is a Kafka transaction of the partition's own transactional id
//! (see *One writer per mirror partition* below). [`ensure_mirror_topic`] creates the topic
//! with the origin's partition count and refuses an existing one whose count differs.
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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dtfed_proto::link::LinkRecord;
use dtfed_proto::room::valid_region_name;
use dtfed_regions::mirror::log::{LogError, MirrorLog};
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::config::KafkaConfig;
use crate::kafka::settings::{mirror_producer_config, mirror_writer_config};
use crate::kafka::{
    default_node_name, drop_off_runtime, ensure_topic, grow_topic, KafkaSetupError, TracingContext,
};
use crate::mirror::reads::{PartitionReads, ProbePool, PROBE_READ_TIMEOUT};
use crate::mirror::{lock, mirror_topic, OriginPartitions};

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
    /// How mirror topics grow to their origin's partition count (`None`: they do not).
    growth: Option<Growth>,
}

/// What [`MirrorLog::grow_partitions`] needs: the cluster, and the region's record of
/// origins' partition counts to raise once a mirror topic has grown.
struct Growth {
    kafka: KafkaConfig,
    origins: Arc<OriginPartitions>,
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

/// Longest [`commit_released`] waits; past it the commit's own flush takes over.
const RELEASE_WAIT: Duration = Duration::from_millis(20);

/// Commits `producer`'s transaction once it counts no message in flight (waiting briefly,
/// blocking).
///
/// Every record's delivery is awaited before the commit, but its delivery future resolves
/// inside the producer's poll thread *before* that thread releases the delivery report,
/// and librdkafka counts a message until then. rust-rdkafka's `commit_transaction` first
/// flushes, and a flush that finds a message still counted polls for a whole 100 ms
/// before looking again: a quarter of all mirror appends took 100 ms longer for that race
/// (measured on a real broker: commit 1–2 ms, or 102–105 ms). The release is microseconds
/// away, so wait for it here instead.
fn commit_released(producer: &Prod) -> Result<(), KafkaError> {
    let deadline = std::time::Instant::now() + RELEASE_WAIT;
    while producer.in_flight_count() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(100));
    }
    producer.commit_transaction(COMMIT_TIMEOUT)
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
            read_timeout: PROBE_READ_TIMEOUT,
            growth: None,
        })
    }

    /// Lets [`MirrorLog::grow_partitions`] add partitions to mirror topics on `cfg`'s
    /// cluster, recording each origin's new count in `origins`.
    pub fn growing(mut self, cfg: &KafkaConfig, origins: Arc<OriginPartitions>) -> Self {
        self.growth = Some(Growth {
            kafka: cfg.clone(),
            origins,
        });
        self
    }

    /// Overrides [`APPEND_TIMEOUT`] (tests).
    pub fn set_append_timeout(&mut self, timeout: Duration) {
        self.append_timeout = timeout;
    }

    /// Overrides the bound on a tail read ([`PROBE_READ_TIMEOUT`]) (tests).
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
            Ok(()) => match commit_released(&w) {
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
    async fn grow_partitions(&self, origin: &str, partitions: i32) -> Result<i32, LogError> {
        let Some(growth) = &self.growth else {
            return Err(LogError::Other(format!(
                "the mirror topic of {origin} is not grown by this daemon"
            )));
        };
        let n = grow_topic(&growth.kafka, &mirror_topic(origin), partitions)
            .await
            .map_err(|e| LogError::Unavailable(e.to_string()))?;
        if n >= partitions {
            growth.origins.raise(origin, partitions);
        }
        Ok(n)
    }

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
/// partitions if it does not exist (with [`ensure_topic`]: retried while the cluster
/// starts). Returns the topic's name and its real partition count.
///
/// `partitions` is a first guess (the configured count, else this region's): mirroring is
/// partition-preserving (origin partition p goes to mirror partition p, and
/// [`partition_for`] must find a room in the same partition number on both sides), so the
/// mirror client asks the origin for its count on every link and grows the topic to it
/// ([`MirrorLog::grow_partitions`]), or refuses an origin with fewer.
pub async fn ensure_mirror_topic(
    cfg: &KafkaConfig,
    origin: &str,
    partitions: i32,
) -> Result<(String, i32), KafkaSetupError> {
    let topic = mirror_topic(origin);
    if !valid_region_name(origin) {
        return Err(KafkaSetupError::Topic {
            topic,
            detail: format!("{origin:?} is not a valid region name"),
        });
    }
    // An existing topic keeps its count: the mirror client checks it against the origin's
    // on every link and grows it when the origin has more.
    let n = ensure_topic(cfg, &topic, partitions).await?;
    Ok((topic, n))
}
