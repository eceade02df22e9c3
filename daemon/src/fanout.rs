//! Fan-out owners: the region's daemons form one consumer group over the local topic (and,
//! with federation, the mirror topics). The owner of a partition reads it in order, hands
//! each record to [`Bus::apply`](crate::bus::Bus::apply), and commits only what the bus
//! holds. On a rebalance or shutdown it drains and commits before giving a partition up.
//!
//! # Delivery guarantee
//!
//! At least once into the bus, in partition order, nothing skipped silently: an offset is
//! stored for commit (`enable.auto.offset.store=false`, `store_offset` by hand) only after
//! the bus accepted the record or it was stepped over as below. Every record that is ready
//! (up to [`MAX_BATCH`]) goes to the bus in one [`Bus::apply_batch`] call, one Redis round
//! trip for the whole batch: per record, the round trips of a busy region add up to
//! milliseconds on every message's delivery. A batch that failed because Redis could not be
//! used is retried whole with backoff (what was applied is skipped the second time) until
//! it succeeds or the daemon shuts down. A new owner resumes from the last committed offset
//! and may apply a few records again; [`Bus::apply`] is idempotent per (room, origin,
//! offset), so players see no duplicates.
//!
//! Stepped over, logged with topic/partition/offset and counted in
//! [`FanoutStatus::skipped`] and the `fanout_skipped{reason}` metric, so that one bad record
//! cannot stall a partition (and every room on it) forever:
//!
//! - `not_a_message`: no room key, a key that is not a room id, a value that is not a
//!   [`LogValue`], a mirror record without its origin offset header;
//! - `origin_mismatch`: a mirror record whose `dtfed-origin` header disagrees with its
//!   topic (see [`topic_origin`]);
//! - `quarantined`: a record the bus refuses for good ([`BusError::is_permanent`], e.g. its
//!   room's Redis keys hold garbage). Retrying the whole batch would stall every partition
//!   in it, so after such a failure the batch is applied room by room and the refused
//!   record, after [`QUARANTINE_AFTER`] tries, is skipped (it stays in the log). Only this
//!   slow path pays for the isolation; the hot path is still one call per batch.

//! # Group settings
//!
//! - `partition.assignment.strategy=cooperative-sticky`: when a daemon joins or leaves, only
//!   the partitions that must move are revoked; every other partition keeps flowing through
//!   the rebalance (the eager `range` protocol stops every owner of the group for the
//!   duration of each rebalance, which makes every room of the region go quiet). Sticky
//!   assignment also keeps a partition on its owner across rebalances.
//! - `session.timeout.ms = kafka.session_timeout_ms` (6 s by default) bounds how long a
//!   dead daemon's partitions stay unowned; `heartbeat.interval.ms` is a third of it.
//! - `fetch.wait.max.ms=10`: a new record is fetched within ~10 ms instead of the default
//!   500 ms long-poll, which would sit on the publish → delivery latency.
//! - `statistics.interval.ms=1000`: librdkafka's statistics carry the high watermark and
//!   committed offset per partition for free; they feed [`FanoutOwner::status`] and the
//!   `fanout_lag` metric without extra broker round trips.
//! - Offsets are committed by librdkafka's auto-commit every 500 ms (from the stored
//!   offsets only), synchronously before any partition is revoked, and at shutdown.

use dtfed_proto::record::now_ms;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dtfed_proto::record::{LogValue, HEADER_ORIGIN, HEADER_ORIGIN_OFFSET};
use dtfed_proto::room::valid_region_name;
use dtfed_proto::{LogRecord, RoomId};
use futures::FutureExt;
use rdkafka::client::ClientContext;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::Statistics;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::bus::{Bus, BusError};
use crate::config::KafkaConfig;
use crate::kafka::settings::fanout_consumer_config;
use crate::kafka::TracingContext;
use crate::metrics::{Metrics, PartitionLabel, ReasonLabel};
use crate::mirror::MIRROR_TOPIC_PREFIX;

/// One partition this daemon owns, for `/status`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OwnedPartition {
    pub topic: String,
    pub partition: i32,
    /// Next offset to apply (`-1` until known).
    pub position: i64,
    /// `-1` until known.
    pub high_watermark: i64,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct FanoutStatus {
    /// True once the group gave this daemon an assignment (possibly empty).
    pub joined: bool,
    pub partitions: Vec<OwnedPartition>,
    /// Poison records stepped over since start (see the module docs).
    pub skipped: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FanoutError {
    #[error("fan-out consumer: {0}")]
    Setup(String),
}

/// Bus retry backoff: first and longest wait.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Records taken from the consumer in one go (all that is ready, up to this many) and
/// applied in one bus call.
const MAX_BATCH: usize = 512;
/// Refusals in a row after which a record is quarantined (see [`Run::apply_room`]).
const QUARANTINE_AFTER: u32 = 3;
/// How long a bus apply in progress may still run after shutdown was asked.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// State shared by the owner task, the consumer context's callbacks and `status()`.
struct Shared {
    region: String,
    node: String,
    joined: AtomicBool,
    owned: Mutex<BTreeMap<(String, i32), OwnedPartition>>,
    skipped: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn owned(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, i32), OwnedPartition>> {
        match self.owned.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn set_lag(&self, p: &OwnedPartition) {
        if p.position >= 0 && p.high_watermark >= 0 {
            self.metrics
                .fanout_lag
                .get_or_create(&PartitionLabel {
                    topic: p.topic.clone(),
                    partition: p.partition,
                })
                .set((p.high_watermark - p.position).max(0));
        }
    }

    /// Counts one record stepped over (status and metric).
    fn skipped(&self, reason: &'static str) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .fanout_skipped
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Records that `offset` of `topic`/`partition` was applied (or skipped).
    fn advanced(&self, topic: &str, partition: i32, offset: i64) {
        let mut owned = self.owned();
        if let Some(p) = owned.get_mut(&(topic.to_owned(), partition)) {
            p.position = offset + 1;
            if p.high_watermark < p.position {
                p.high_watermark = p.position;
            }
            self.set_lag(p);
        }
    }
}

/// The consumer's context: librdkafka logs to tracing, statistics to status and metrics,
/// and the rebalance callbacks.
struct OwnerContext {
    log: TracingContext,
    shared: Arc<Shared>,
}

impl ClientContext for OwnerContext {
    crate::kafka::log_to_tracing!(log);

    fn stats(&self, stats: Statistics) {
        let mut owned = self.shared.owned();
        for ((topic, partition), p) in owned.iter_mut() {
            let Some(s) = stats
                .topics
                .get(topic)
                .and_then(|t| t.partitions.get(partition))
            else {
                continue;
            };
            if s.hi_offset >= 0 {
                p.high_watermark = s.hi_offset;
            }
            if p.position < 0 {
                // Nothing applied yet by this owner: the next offset is the committed one,
                // or with none, the earliest retained (auto.offset.reset=earliest).
                if s.committed_offset >= 0 {
                    p.position = s.committed_offset;
                } else if s.lo_offset >= 0 && s.hi_offset >= 0 {
                    p.position = s.lo_offset;
                }
            }
            self.shared.set_lag(p);
        }
    }
}

impl ConsumerContext for OwnerContext {
    // These callbacks run inside `recv()`, i.e. on the owner task, between two batches or
    // while a batch is being gathered (never while one is applied): the task applies a batch
    // (partitions side by side, each in order), stores its offsets, and only then polls
    // again. So when a revocation arrives nothing is being applied: every record of earlier
    // batches is applied and its offset stored, and committing the stored offsets here
    // commits exactly what the bus holds before the partition goes to another owner. Records
    // of the batch being gathered that belong to revoked partitions are dropped unapplied.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let parts = tpl_names(tpl);
                tracing::info!(region = %self.shared.region, node = %self.shared.node, partitions = %parts, "fan-out: partitions revoked; committing");
                match consumer.commit_consumer_state(CommitMode::Sync) {
                    Ok(()) => {}
                    Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
                    Err(e) => tracing::warn!(
                        region = %self.shared.region,
                        error = %e,
                        "fan-out: commit before revocation failed; the next owner re-applies from the last commit"
                    ),
                }
                let mut owned = self.shared.owned();
                for e in tpl.elements() {
                    owned.remove(&(e.topic().to_owned(), e.partition()));
                    self.shared.metrics.fanout_lag.remove(&PartitionLabel {
                        topic: e.topic().to_owned(),
                        partition: e.partition(),
                    });
                }
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(region = %self.shared.region, error = %e, "fan-out: rebalance error");
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(region = %self.shared.region, node = %self.shared.node, partitions = %tpl_names(tpl), "fan-out: partitions assigned");
            {
                let mut owned = self.shared.owned();
                for e in tpl.elements() {
                    owned
                        .entry((e.topic().to_owned(), e.partition()))
                        .or_insert_with(|| OwnedPartition {
                            topic: e.topic().to_owned(),
                            partition: e.partition(),
                            position: -1,
                            high_watermark: -1,
                        });
                }
            }
            self.shared.joined.store(true, Ordering::Release);
        }
    }
}

fn tpl_names(tpl: &rdkafka::TopicPartitionList) -> String {
    let v: Vec<String> = tpl
        .elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(",")
    }
}

type Owner = StreamConsumer<OwnerContext>;

pub struct FanoutOwner {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for FanoutOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FanoutOwner")
            .field("region", &self.shared.region)
            .finish()
    }
}

impl FanoutOwner {
    /// Joins the group `<kafka.fanout_group>.<region>` over `topics` and starts owning.
    ///
    /// Records of `kafka.local_topic` have origin `region` and their own offset; records of
    /// a mirror topic `dtfed.mirror.<origin>` have origin `<origin>` (from the topic name,
    /// never from a header: a record whose `dtfed-origin` header names another region is
    /// skipped and counted) and their origin offset in the `dtfed-origin-offset` header.
    ///
    /// Must be called inside a tokio runtime.
    pub fn start(
        cfg: &KafkaConfig,
        region: &str,
        node: &str,
        topics: Vec<String>,
        bus: Arc<dyn Bus>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<FanoutOwner, FanoutError> {
        if topics.is_empty() {
            return Err(FanoutError::Setup("no topics to own".into()));
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(FanoutError::Setup(
                "FanoutOwner::start must be called inside a tokio runtime".into(),
            ));
        }
        let shared = Arc::new(Shared {
            region: region.to_owned(),
            node: node.to_owned(),
            joined: AtomicBool::new(false),
            owned: Mutex::new(BTreeMap::new()),
            skipped: AtomicU64::new(0),
            metrics,
        });
        let config = fanout_consumer_config(cfg, region, node);
        let ctx = OwnerContext {
            log: TracingContext::for_config(&config),
            shared: Arc::clone(&shared),
        };
        let consumer: Owner = StreamConsumer::from_config_and_context(&config, ctx)
            .map_err(|e| FanoutError::Setup(format!("cannot create the consumer: {e}")))?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).map_err(|e| {
            FanoutError::Setup(format!("cannot subscribe to {}: {e}", topics.join(",")))
        })?;
        tracing::info!(
            region,
            node,
            group = %format!("{}.{region}", cfg.fanout_group),
            topics = %topics.join(","),
            "fan-out owner joining its group"
        );
        let run = Run {
            consumer,
            config,
            topics,
            shared: Arc::clone(&shared),
            bus,
            local_topic: cfg.local_topic.clone(),
            region: region.to_owned(),
            shutdown,
        };
        let task = tokio::spawn(run.run());
        Ok(FanoutOwner { shared, task })
    }

    pub fn status(&self) -> FanoutStatus {
        FanoutStatus {
            joined: self.shared.joined.load(Ordering::Acquire),
            partitions: self.shared.owned().values().cloned().collect(),
            skipped: self.shared.skipped.load(Ordering::Relaxed),
        }
    }

    /// Waits until the owner stopped (after `shutdown`): drained, committed, left the group.
    pub async fn join(self) {
        if let Err(e) = self.task.await {
            tracing::error!(region = %self.shared.region, error = %e, "fan-out owner task failed");
        }
    }
}

/// The owner task.
struct Run {
    consumer: Owner,
    /// To build a new consumer if this one turns fatal.
    config: rdkafka::ClientConfig,
    topics: Vec<String>,
    shared: Arc<Shared>,
    bus: Arc<dyn Bus>,
    local_topic: String,
    region: String,
    shutdown: CancellationToken,
}

/// Says a repeated consumer error (every poll while Kafka is down) once per
/// [`ERROR_LOG_EVERY`], with how many times it repeated.
#[derive(Default)]
struct ErrorLog {
    last: Option<(String, std::time::Instant)>,
    repeats: u64,
}

const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

impl ErrorLog {
    /// `Some(times it was suppressed since last said)` if `e` should be logged now.
    fn note(&mut self, e: &KafkaError) -> Option<u64> {
        let text = e.to_string();
        let now = std::time::Instant::now();
        match &self.last {
            Some((t, at)) if *t == text && now.duration_since(*at) < ERROR_LOG_EVERY => {
                self.repeats += 1;
                None
            }
            _ => {
                self.last = Some((text, now));
                Some(std::mem::take(&mut self.repeats))
            }
        }
    }
}

/// What one consumed record turned into, decoded before any await so that the borrowed
/// librdkafka message is released at once.
enum Item {
    Record(LogRecord),
    Poison(Skip),
}

impl Run {
    async fn run(mut self) {
        let mut errors = ErrorLog::default();
        loop {
            let next = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                m = self.consumer.recv() => m,
            };
            let mut batch: Vec<(String, i32, i64, Item)> = Vec::new();
            match next {
                Ok(m) => {
                    let item = self.decode(&m);
                    batch.push((m.topic().to_owned(), m.partition(), m.offset(), item));
                }
                Err(e) => {
                    if let Some(suppressed) = errors.note(&e) {
                        tracing::warn!(
                            region = %self.region,
                            error = %e,
                            suppressed,
                            "fan-out consumer error (repeats are logged every 10 s)"
                        );
                    }
                    if matches!(e, KafkaError::MessageConsumptionFatal(_)) {
                        // Only static group membership (not used here) is documented to end
                        // like this; whatever the cause, a fatal consumer never recovers,
                        // so rejoin with a new one.
                        tracing::error!(region = %self.region, error = %e, "fan-out consumer is in a fatal state; rejoining with a new consumer");
                        if !self.replace_consumer().await {
                            break;
                        }
                        continue;
                    }
                    // Errors come from polling, not from a record; don't spin on them.
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                    continue;
                }
            }
            // Take whatever else is ready without waiting, so that partitions are applied
            // side by side: one bus round trip per record and partition would cap the region
            // at 1 / RTT messages per second.
            while batch.len() < MAX_BATCH {
                match self.consumer.recv().now_or_never() {
                    Some(Ok(m)) => {
                        let item = self.decode(&m);
                        batch.push((m.topic().to_owned(), m.partition(), m.offset(), item));
                    }
                    Some(Err(_)) | None => break,
                }
            }
            // A rebalance served while draining may have revoked partitions: their records
            // are the next owner's (it replays them from the commit made on revocation).
            // Applying them here could race the new owner and break the room's order.
            let mut groups: BTreeMap<(String, i32), Vec<(i64, Item)>> = BTreeMap::new();
            {
                let owned = self.shared.owned();
                for (topic, partition, offset, item) in batch {
                    if owned.contains_key(&(topic.clone(), partition)) {
                        groups
                            .entry((topic, partition))
                            .or_default()
                            .push((offset, item));
                    }
                }
            }
            // Poison records are stepped over; the rest go to the bus in one call, each
            // partition's records in offset order (a room lives on one partition per topic,
            // so that is each room's order too).
            let mut records = Vec::new();
            let mut last_of: Vec<((String, i32), i64)> = Vec::with_capacity(groups.len());
            for ((topic, partition), items) in groups {
                let Some(&(last, _)) = items.last() else {
                    continue;
                };
                for (offset, item) in items {
                    match item {
                        Item::Poison(skip) => {
                            tracing::warn!(
                                region = %self.region,
                                topic,
                                partition,
                                offset,
                                reason = skip.reason,
                                detail = %skip.detail,
                                "fan-out: skipping a record that is not a chat message of this topic's origin"
                            );
                            self.shared.skipped(skip.reason);
                        }
                        Item::Record(rec) => records.push(rec),
                    }
                }
                last_of.push(((topic, partition), last));
            }
            if !records.is_empty() {
                let span =
                    tracing::info_span!("fanout", region = %self.region, records = records.len());
                if !self.apply(&records).instrument(span).await {
                    break; // Shutdown while the bus was failing: nothing more stored.
                }
            }
            for ((topic, partition), offset) in last_of {
                if let Err(e) = self.consumer.store_offset(&topic, partition, offset) {
                    // The partition was revoked meanwhile (max.poll.interval exceeded while
                    // the bus was down): the next owner re-applies it, which the bus tolerates.
                    tracing::debug!(region = %self.region, topic, partition, offset, error = %e, "fan-out: offset not stored");
                }
                self.shared.advanced(&topic, partition, offset);
            }
        }
        self.close().await;
    }

    /// Swaps the consumer for a new one subscribed to the same topics; false if that
    /// failed (the owner then stops, which `status()` shows as no partitions).
    async fn replace_consumer(&mut self) -> bool {
        let ctx = OwnerContext {
            log: TracingContext::for_config(&self.config),
            shared: Arc::clone(&self.shared),
        };
        let fresh: Owner = match StreamConsumer::from_config_and_context(&self.config, ctx) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(region = %self.region, error = %e, "fan-out: cannot create a new consumer");
                return false;
            }
        };
        let names: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        if let Err(e) = fresh.subscribe(&names) {
            tracing::error!(region = %self.region, error = %e, "fan-out: cannot subscribe the new consumer");
            return false;
        }
        let old = std::mem::replace(&mut self.consumer, fresh);
        // Whatever the old consumer owned is gone with it.
        {
            let mut owned = self.shared.owned();
            for (topic, partition) in std::mem::take(&mut *owned).into_keys() {
                self.shared
                    .metrics
                    .fanout_lag
                    .remove(&PartitionLabel { topic, partition });
            }
        }
        drop(tokio::task::spawn_blocking(move || drop(old)));
        true
    }

    fn decode(&self, m: &BorrowedMessage<'_>) -> Item {
        if m.topic() == self.local_topic {
            if let Some(ts) = m.timestamp().to_millis() {
                let delay_ms = now_ms().saturating_sub(ts).max(0);
                self.shared
                    .metrics
                    .hop_fanout_fetch
                    .observe(delay_ms as f64 / 1000.0);
            }
        }
        match decode_record(m, &self.local_topic, &self.region) {
            Ok(r) => Item::Record(r),
            Err(why) => Item::Poison(why),
        }
    }

    /// Applies `records` until the bus took (or quarantined) every one; false if shutdown
    /// came first.
    ///
    /// The hot path is one [`Bus::apply_batch`] for the whole batch. A failure that may pass
    /// (Redis unreachable, busy, out of memory: every room alike) retries the whole batch
    /// with backoff, the partitions waiting together. A permanent one
    /// ([`BusError::is_permanent`]: a room's script failing, a key of the wrong type) is a
    /// room's, and retrying the batch would fail forever and stall every partition in it:
    /// the batch is then applied room by room ([`Run::apply_room`]).
    async fn apply(&self, records: &[LogRecord]) -> bool {
        let mut backoff = RETRY_FIRST;
        let mut failures: u64 = 0;
        loop {
            let e = match self.try_apply(records).await {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(
                            records = records.len(),
                            failures,
                            "bus apply succeeded after retries"
                        );
                    }
                    return true;
                }
                Err(None) => return false,
                Err(Some(e)) => e,
            };
            if e.is_permanent() {
                tracing::warn!(
                    region = %self.region,
                    records = records.len(),
                    error = %e,
                    "the bus refused part of a batch; applying it room by room"
                );
                return self.apply_by_room(records).await;
            }
            failures += 1;
            if failures <= 3 || failures % 30 == 0 {
                let first = records.first();
                tracing::warn!(
                    region = %self.region,
                    records = records.len(),
                    first_room = %first.map(|r| r.room.as_str()).unwrap_or("-"),
                    first_offset = first.map(|r| r.offset).unwrap_or(-1),
                    error = %e,
                    failures,
                    retry_in = ?backoff,
                    "bus apply failed; retrying (the partition waits)"
                );
            }
            if !self.pause(backoff).await {
                return false;
            }
            backoff = (backoff * 2).min(RETRY_MAX);
        }
    }

    /// One bus call for `records`: `Err(None)` if shutdown came first (after the grace).
    async fn try_apply(&self, records: &[LogRecord]) -> Result<(), Option<BusError>> {
        let started = std::time::Instant::now();
        let attempt = tokio::select! {
            r = self.bus.apply_batch(records) => r,
            _ = async {
                self.shutdown.cancelled().await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => return Err(None),
        };
        let published = attempt.map_err(Some)?;
        let metrics = &self.shared.metrics;
        metrics
            .hop_bus_apply
            .observe(started.elapsed().as_secs_f64());
        let n = published.iter().filter(|p| p.is_some()).count();
        metrics.fanout_applied.inc_by(n as u64);
        Ok(())
    }

    /// Waits `delay`; false if shutdown came first.
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    /// The slow path of [`Run::apply`]: each room's records on their own, in order, so that
    /// one room the bus refuses holds up no other (rooms are independent; partition order
    /// is only ever room order).
    async fn apply_by_room(&self, records: &[LogRecord]) -> bool {
        let mut rooms: Vec<(&RoomId, Vec<LogRecord>)> = Vec::new();
        for rec in records {
            match rooms.iter_mut().find(|(room, _)| **room == rec.room) {
                Some((_, recs)) => recs.push(rec.clone()),
                None => rooms.push((&rec.room, vec![rec.clone()])),
            }
        }
        for (_, recs) in rooms {
            if !self.apply_room(&recs).await {
                return false;
            }
        }
        true
    }

    /// Applies one room's records (in offset order): all at once, and after a permanent
    /// failure one at a time. A record the bus refuses [`QUARANTINE_AFTER`] times in a row
    /// is quarantined: logged at error, counted (`fanout_skipped{reason="quarantined"}`),
    /// and stepped over; it stays in the log. After one quarantine the room's next records
    /// get one try each. Transient failures are retried with backoff, as on the hot path.
    async fn apply_room(&self, recs: &[LogRecord]) -> bool {
        let mut next = 0;
        let mut one_by_one = false;
        let mut room_refused = false;
        let mut refusals = 0u32;
        let mut backoff = RETRY_FIRST;
        while let Some(rest) = recs.get(next..).filter(|r| !r.is_empty()) {
            let take = if one_by_one { &rest[..1] } else { rest };
            let e = match self.try_apply(take).await {
                Ok(()) => {
                    next += take.len();
                    refusals = 0;
                    backoff = RETRY_FIRST;
                    continue;
                }
                Err(None) => return false,
                Err(Some(e)) => e,
            };
            if !e.is_permanent() {
                tracing::warn!(region = %self.region, room = %rest[0].room, error = %e, retry_in = ?backoff, "bus apply failed; retrying");
                if !self.pause(backoff).await {
                    return false;
                }
                backoff = (backoff * 2).min(RETRY_MAX);
                continue;
            }
            if !one_by_one {
                // What was applied is a prefix of the room's records: find the one refused.
                one_by_one = true;
                continue;
            }
            refusals += 1;
            let rec = &rest[0];
            if refusals < QUARANTINE_AFTER && !room_refused {
                if !self.pause(backoff).await {
                    return false;
                }
                backoff = (backoff * 2).min(RETRY_MAX);
                continue;
            }
            tracing::error!(
                region = %self.region,
                room = %rec.room,
                origin = %rec.origin,
                partition = rec.partition,
                offset = rec.offset,
                attempts = refusals,
                error = %e,
                "fan-out: the bus keeps refusing this record; quarantined (skipped, still in the log)"
            );
            self.shared.skipped(SKIP_QUARANTINED);
            room_refused = true;
            refusals = 0;
            backoff = RETRY_FIRST;
            next += 1;
        }
        true
    }

    /// Stops owning: commit what the bus holds, leave the group so the partitions move at
    /// once, and close the consumer. librdkafka's close blocks (it serves the revocation
    /// callback and waits for LeaveGroup), so it runs off the async runtime.
    async fn close(self) {
        let Run {
            consumer,
            region,
            shared,
            ..
        } = self;
        let node = shared.node.clone();
        let done = tokio::task::spawn_blocking(move || {
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
                Err(e) => {
                    tracing::warn!(region = %region, error = %e, "fan-out: final commit failed")
                }
            }
            consumer.unsubscribe();
            drop(consumer);
            tracing::info!(region = %region, node = %node, "fan-out owner left its group");
        })
        .await;
        if let Err(e) = done {
            tracing::error!(error = %e, "fan-out: closing the consumer failed");
        }
    }
}

fn header<'a>(m: &'a BorrowedMessage<'_>, key: &str) -> Option<&'a [u8]> {
    let headers = m.headers()?;
    headers
        .iter()
        .filter(|h| h.key == key)
        .last()
        .and_then(|h| h.value)
}

/// Why a consumed record was stepped over instead of applied.
#[derive(Debug)]
struct Skip {
    /// Metric label (`fanout_skipped{reason}`).
    reason: &'static str,
    detail: String,
}

impl Skip {
    fn not_a_message(detail: impl Into<String>) -> Skip {
        Skip {
            reason: SKIP_NOT_A_MESSAGE,
            detail: detail.into(),
        }
    }
}

/// `fanout_skipped` reasons.
const SKIP_NOT_A_MESSAGE: &str = "not_a_message";
const SKIP_ORIGIN_MISMATCH: &str = "origin_mismatch";
const SKIP_QUARANTINED: &str = "quarantined";

/// The origin region whose records topic `topic` holds: this region for the local topic,
/// `O` for the mirror topic `dtfed.mirror.<O>`. Never a record's own say: a peer (or
/// anyone who can write its local topic) controls the record's headers, and an origin
/// taken from them could name another region, or this one, with offsets that would make
/// the bus step drop that origin's genuine messages as already applied.
fn topic_origin<'a>(topic: &'a str, local_topic: &str, region: &'a str) -> Option<&'a str> {
    if topic == local_topic {
        return Some(region);
    }
    topic
        .strip_prefix(MIRROR_TOPIC_PREFIX)
        .filter(|o| valid_region_name(o) && *o != region)
}

/// Turns one consumed record into a [`LogRecord`], or says why it is not one.
fn decode_record(
    m: &BorrowedMessage<'_>,
    local_topic: &str,
    region: &str,
) -> Result<LogRecord, Skip> {
    let origin = topic_origin(m.topic(), local_topic, region)
        .ok_or_else(|| Skip::not_a_message(format!("topic {} names no origin", m.topic())))?;
    let key = m
        .key()
        .ok_or_else(|| Skip::not_a_message("no key (a room id is required)"))?;
    let key = std::str::from_utf8(key).map_err(|_| Skip::not_a_message("key is not UTF-8"))?;
    let room = RoomId::parse(key).map_err(|e| Skip::not_a_message(format!("key {key:?}: {e}")))?;
    let payload = m.payload().ok_or_else(|| Skip::not_a_message("no value"))?;
    let value =
        LogValue::from_json(payload).map_err(|e| Skip::not_a_message(format!("value: {e}")))?;
    let offset = if m.topic() == local_topic {
        m.offset()
    } else {
        // The mirror client writes the origin header from the peer's certificate region; a
        // record saying otherwise was not written by it (or was written before that rule)
        // and is not trusted with any origin.
        let claims = m.headers().into_iter().flat_map(|h| h.iter());
        for claimed in claims.filter(|h| h.key == HEADER_ORIGIN).map(|h| h.value) {
            let claimed = claimed.unwrap_or_default();
            if claimed != origin.as_bytes() {
                return Err(Skip {
                    reason: SKIP_ORIGIN_MISMATCH,
                    detail: format!(
                        "dtfed-origin {:?} in the mirror topic of {origin}",
                        String::from_utf8_lossy(claimed)
                    ),
                });
            }
        }
        header(m, HEADER_ORIGIN_OFFSET)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<i64>().ok())
            .filter(|o| *o >= 0)
            .ok_or_else(|| {
                Skip::not_a_message("mirror record without a valid dtfed-origin-offset")
            })?
    };
    Ok(LogRecord {
        room,
        origin: origin.to_owned(),
        partition: m.partition(),
        offset,
        value,
    })
}
