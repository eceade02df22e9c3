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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::Statistics;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::config::KafkaConfig;
use crate::fanout::run::Run;
use crate::kafka::settings::fanout_consumer_config;
use crate::kafka::{tpl_names, TracingContext};
use crate::metrics::{Metrics, PartitionLabel, ReasonLabel};

mod decode;
mod run;

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
