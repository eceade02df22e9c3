//! Who runs which mirror task in the receiving region.
//!
//! A region mirrors partition p of origin O's local topic into partition p of its mirror
//! topic `dtfed.mirror.<O>` (see `docs/ARCHITECTURE.md`, "Federation: the mirror flow"). Exactly one
//! daemon of the region should write a given mirror partition, and a dead daemon's
//! partitions should move. Kafka's group membership gives that for free: the region's
//! daemons join a consumer group of their own over the mirror topics (not the fan-out
//! group), and the daemon the group assigns `(dtfed.mirror.<O>, p)` to runs the task
//! mirroring `(O, p)` ([`MirrorTaskRunner::run`], implemented over
//! `MirrorClient::run_partition`).
//!
//! # The consumer is a lease, not a reader
//!
//! The group's consumer never reads the mirror topics (the fan-out group does that).
//! Every partition it is assigned is paused in the assignment callback, before the
//! callback returns to librdkafka, and `auto.offset.reset=latest` with nothing ever
//! committed means that even a fetch that slipped in would start at the end. Anything
//! handed out anyway is dropped. It is still polled every [`POLL_EVERY`] on a thread of its
//! own, which serves the rebalance callbacks and keeps it in the group (heartbeats are
//! librdkafka's own thread; `max.poll.interval.ms` is the only limit on not polling).
//!
//! Group settings: `partition.assignment.strategy=cooperative-sticky` (a daemon joining or
//! leaving moves only the partitions that must move; the others keep mirroring through the
//! rebalance), `session.timeout.ms = kafka.session_timeout_ms` (how long a dead daemon's
//! tasks stay unowned), `heartbeat.interval.ms` a third of it.
//!
//! # No two writers of one mirror partition
//!
//! The guarantee: **while every member of the group is alive and reaches Kafka, a daemon
//! starts the task for a mirror partition only after the previous owner's task for it has
//! ended** (its runner future has returned), so at most one task of the region writes a
//! mirror partition at any time. How:
//!
//! - The rebalance callbacks run on this module's poll thread, synchronously. On a
//!   revocation the callback cancels the revoked partitions' tasks and *blocks* until each
//!   task has ended, and only then calls `incremental_unassign` and returns. (Blocking here
//!   is fine: it is a dedicated OS thread, not the async runtime, and the tasks run on the
//!   runtime.)
//! - With the cooperative protocol (KIP-429) a partition never goes straight from one
//!   member to another within one rebalance: the leader's assignor leaves a partition still
//!   owned by A out of everyone's assignment, A is told to revoke it, and only once A has
//!   revoked it does A rejoin, which triggers a second rebalance that gives it to B.
//!   librdkafka rejoins only after the application's `incremental_unassign`, i.e. after
//!   our callback returned, i.e. after A's task ended. So B's assignment callback (which
//!   starts B's task) happens-after A's task end. The same holds within one daemon: a
//!   partition revoked and later assigned back starts a new task only after the old one
//!   ended (and [`MirrorTasks`] never runs two tasks for one partition).
//! - On shutdown ([`MirrorTasks::join`]) every task is stopped and awaited *while the
//!   daemon is still in the group*; only then does the consumer unsubscribe and leave, so
//!   the partitions move after the tasks ended.
//!
//! What "ended" covers is up to the runner: `MirrorClient::run_partition` lets an append
//! already under way finish (up to its `append_grace`, 10 s) before it returns, so its
//! writes are acknowledged before the next owner reads the tail. An append it had to
//! abandon after that grace may still land later, after the next owner's tail read: a
//! duplicate, never a loss.
//!
//! Where the guarantee does not hold, and what happens then:
//!
//! - **A daemon cut off from the group coordinator but alive.** The coordinator expels it
//!   `session.timeout.ms` after its last heartbeat and gives its partitions to others; the
//!   expelled daemon finds out on its own at about the same time (librdkafka revokes its
//!   assignment as *lost*), and stops its tasks then, but nothing orders that stop before
//!   the new owner's start. For that window (about a heartbeat interval plus the time the
//!   task takes to stop) two tasks may write one mirror partition. Mirroring writes are
//!   idempotent by the tail only per writer (each re-reads the tail when it (re)starts),
//!   so interleaved writers can write origin offsets **twice**, and the partition may hold
//!   an origin offset lower than one before it; they cannot lose any (each writer writes a
//!   contiguous run starting at or below the tail it read plus one). Readers of mirror
//!   topics therefore key on the origin offset: the fan-out's bus apply is idempotent per
//!   (room, origin, origin offset). This window is closed below the lease, in
//!   the mirror log: every append is a Kafka transaction of the mirror partition's own
//!   `transactional.id`, and a task's tail read fences every earlier writer of it (see
//!   `sink`, *One writer per mirror partition*), so the expelled daemon's appends
//!   are refused and nothing is written twice.
//! - **A task that will not stop.** The revocation waits for it (logging every
//!   [`STOP_WAIT_LOG_EVERY`]); if it takes longer than `max.poll.interval.ms`
//!   ([`MAX_POLL_INTERVAL_MS`](crate::kafka::settings::MAX_POLL_INTERVAL_MS)) librdkafka considers this daemon stuck and leaves the
//!   group, and the partition moves while the task still runs. A runner must stop within
//!   that bound (`MirrorClient` stops within its append and close graces, ~11 s).
//!
//! # Task supervision
//!
//! A runner is expected to run until its token is cancelled. If it returns early or
//! panics while the lease is held, it is logged and started again after a backoff
//! ([`RESTART_FIRST`] doubling to [`RESTART_MAX`]); the lease is not given up (the group
//! would most likely hand the partition straight back).

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::FutureExt;
use rdkafka::client::ClientContext;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::TopicPartitionList;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::lock;
use crate::config::KafkaConfig;
use crate::kafka::settings::mirror_lease_config;
use crate::kafka::{tpl_names, ErrorLog, TracingContext};

/// How long one poll of the lease consumer waits; also how quickly shutdown is noticed.
pub const POLL_EVERY: Duration = Duration::from_millis(100);
/// While a revocation or shutdown waits for a task to stop, it says so this often.
pub const STOP_WAIT_LOG_EVERY: Duration = Duration::from_secs(5);
/// First wait before restarting a task whose runner returned or panicked early.
pub const RESTART_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between restarts.
pub const RESTART_MAX: Duration = Duration::from_secs(30);
/// A run that lasted this long resets the restart backoff.
const RESTART_RESET_AFTER: Duration = Duration::from_secs(60);

/// One mirror topic of this region and what it mirrors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorTopic {
    /// The origin region (`O`).
    pub origin: String,
    /// This region's mirror topic of `O` (`dtfed.mirror.O`): the group's lease topic.
    pub mirror_topic: String,
    /// `O`'s local topic, as the mirror client asks `O` for it.
    pub origin_topic: String,
}

/// Runs one mirror task. The lead's implementation calls `MirrorClient::run_partition`.
#[async_trait]
pub trait MirrorTaskRunner: Send + Sync + 'static {
    /// Mirrors `origin_topic`/`partition` of `origin` until `stop` is cancelled, then
    /// returns once nothing of it is still writing (see the module docs for why that
    /// matters). It should not return before `stop` is cancelled; if it does (or panics),
    /// it is started again after a backoff.
    async fn run(
        &self,
        origin: String,
        origin_topic: String,
        partition: i32,
        stop: CancellationToken,
    );
}

/// What this daemon owns, for `/status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MirrorTasksStatus {
    /// True once the group gave this daemon an assignment (possibly empty).
    pub joined: bool,
    /// (origin, partition) of every task this daemon holds the lease of, sorted.
    pub owned: Vec<(String, i32)>,
}

#[derive(Debug, thiserror::Error)]
pub enum MirrorTasksError {
    #[error("mirror tasks: {0}")]
    Setup(String),
}

/// A running task, as the poll thread sees it.
struct Task {
    origin: String,
    stop: CancellationToken,
    /// Disconnected (never sent on) once the task's future is gone.
    done: mpsc::Receiver<()>,
}

/// State shared by the poll thread, the consumer context's callbacks and `status()`.
struct Shared {
    region: String,
    node: String,
    group: String,
    /// By mirror topic.
    topics: HashMap<String, MirrorTopic>,
    runner: Arc<dyn MirrorTaskRunner>,
    rt: tokio::runtime::Handle,
    /// Cancelled on shutdown (child of the caller's token) or when [`MirrorTasks`] goes.
    stop: CancellationToken,
    joined: AtomicBool,
    /// By (mirror topic, partition).
    tasks: Mutex<BTreeMap<(String, i32), Task>>,
}

impl Shared {
    /// Starts a task for every partition of `tpl` not running yet.
    fn start_tasks(&self, tpl: &TopicPartitionList) {
        let mut tasks = lock(&self.tasks);
        for e in tpl.elements() {
            let partition = e.partition();
            let Some(mt) = self.topics.get(e.topic()) else {
                tracing::warn!(region = %self.region, topic = e.topic(), partition, "mirror tasks: assigned a partition of a topic that is not a mirror topic; ignored");
                continue;
            };
            if self.stop.is_cancelled() {
                tracing::debug!(region = %self.region, origin = %mt.origin, partition, "mirror tasks: shutting down; not starting a task");
                continue;
            }
            let key = (mt.mirror_topic.clone(), partition);
            if tasks.contains_key(&key) {
                // Cannot happen (a partition is assigned again only after its revocation
                // removed the task); never run two.
                tracing::warn!(region = %self.region, origin = %mt.origin, partition, "mirror tasks: partition assigned twice; its task keeps running");
                continue;
            }
            let stop = self.stop.child_token();
            let (done_tx, done) = mpsc::channel();
            let span = tracing::info_span!(
                "mirror_task",
                region = %self.region,
                origin = %mt.origin,
                partition
            );
            let fut = supervise(
                Arc::clone(&self.runner),
                mt.origin.clone(),
                mt.origin_topic.clone(),
                partition,
                stop.clone(),
                done_tx,
            )
            .instrument(span);
            // Detached: the task is followed through `done`, and ends when `stop` fires.
            drop(self.rt.spawn(fut));
            tracing::info!(region = %self.region, node = %self.node, origin = %mt.origin, partition, "mirror tasks: lease taken; task started");
            tasks.insert(
                key,
                Task {
                    origin: mt.origin.clone(),
                    stop,
                    done,
                },
            );
        }
    }

    /// Stops the tasks of `keys` (all of them at once) and waits until each has ended.
    /// Blocking: only for the poll thread.
    fn stop_tasks(&self, keys: impl IntoIterator<Item = (String, i32)>, why: &str) {
        let stopping: Vec<((String, i32), Task)> = {
            let mut tasks = lock(&self.tasks);
            keys.into_iter()
                .filter_map(|k| tasks.remove(&k).map(|t| (k, t)))
                .collect()
        };
        for (_, t) in &stopping {
            t.stop.cancel();
        }
        let started = Instant::now();
        for ((_, partition), t) in stopping {
            loop {
                match t.done.recv_timeout(STOP_WAIT_LOG_EVERY) {
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                    Err(RecvTimeoutError::Timeout) => tracing::warn!(
                        region = %self.region,
                        origin = %t.origin,
                        partition,
                        waited = ?started.elapsed(),
                        "mirror tasks: still waiting for a task to stop before giving its lease up"
                    ),
                }
            }
            tracing::info!(region = %self.region, node = %self.node, origin = %t.origin, partition, reason = why, took = ?started.elapsed(), "mirror tasks: task stopped; lease given up");
        }
    }

    fn stop_all(&self, why: &str) {
        let keys: Vec<(String, i32)> = lock(&self.tasks).keys().cloned().collect();
        self.stop_tasks(keys, why);
    }
}

fn tpl_keys(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

/// Runs a task until `stop`, restarting a runner that returns or panics early. `done` is
/// dropped (disconnecting the poll thread's receiver) only after the runner's future is.
async fn supervise(
    runner: Arc<dyn MirrorTaskRunner>,
    origin: String,
    origin_topic: String,
    partition: i32,
    stop: CancellationToken,
    done: mpsc::Sender<()>,
) {
    // Declared first, so dropped last, even if the task is dropped mid-run.
    let _done = done;
    let mut backoff = RESTART_FIRST;
    loop {
        let started = Instant::now();
        let run = AssertUnwindSafe(runner.run(
            origin.clone(),
            origin_topic.clone(),
            partition,
            stop.clone(),
        ))
        .catch_unwind()
        .await;
        if let Err(panic) = &run {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "?".into());
            tracing::error!(panic = %what, "mirror task panicked");
        }
        if stop.is_cancelled() {
            break;
        }
        if started.elapsed() >= RESTART_RESET_AFTER {
            backoff = RESTART_FIRST;
        }
        tracing::warn!(retry_in = ?backoff, "mirror task ended while its lease is held; restarting it");
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RESTART_MAX);
    }
}

/// The lease consumer's context: librdkafka logs to tracing, and the rebalance callbacks
/// that start and stop tasks.
struct LeaseContext {
    log: TracingContext,
    shared: Arc<Shared>,
}

impl ClientContext for LeaseContext {
    crate::kafka::log_to_tracing!(log);
}

impl ConsumerContext for LeaseContext {
    // Runs on the poll thread, inside `poll` (or inside the consumer's close). It replaces
    // rdkafka's default so that the assign/unassign calls sit exactly where the guarantee
    // needs them: tasks start after the assignment is taken, and are stopped and awaited
    // before the revocation is handed back to librdkafka (see the module docs).
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let sh = &self.shared;
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = assigned {
                    tracing::error!(region = %sh.region, partitions = %tpl_names(tpl), error = %e, "mirror tasks: cannot take the assignment; no task started");
                    return;
                }
                // A lease only: never fetch from these partitions.
                if tpl.count() > 0 {
                    if let Err(e) = consumer.pause(tpl) {
                        tracing::warn!(region = %sh.region, error = %e, "mirror tasks: cannot pause the leased partitions (whatever is fetched is dropped)");
                    }
                }
                tracing::info!(region = %sh.region, node = %sh.node, group = %sh.group, partitions = %tpl_names(tpl), "mirror tasks: partitions assigned");
                sh.start_tasks(tpl);
                sh.joined.store(true, Ordering::Release);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let lost = consumer.assignment_lost();
                if lost {
                    tracing::warn!(region = %sh.region, node = %sh.node, partitions = %tpl_names(tpl), "mirror tasks: leases lost (session timed out or fenced); another daemon may already run these tasks");
                } else {
                    tracing::info!(region = %sh.region, node = %sh.node, partitions = %tpl_names(tpl), "mirror tasks: partitions revoked");
                }
                sh.stop_tasks(tpl_keys(tpl), if lost { "lost" } else { "revoked" });
                let unassigned = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = unassigned {
                    tracing::warn!(region = %sh.region, error = %e, "mirror tasks: unassign failed");
                }
            }
            other => {
                // What rdkafka's default does with an error: give the partitions up.
                tracing::warn!(region = %sh.region, error = ?other, partitions = %tpl_names(tpl), "mirror tasks: rebalance error; giving these partitions up");
                sh.stop_tasks(tpl_keys(tpl), "rebalance error");
                let unassigned = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = unassigned {
                    tracing::warn!(region = %sh.region, error = %e, "mirror tasks: unassign failed");
                }
            }
        }
    }
}

type Lease = BaseConsumer<LeaseContext>;

fn new_lease(shared: &Arc<Shared>, config: &rdkafka::ClientConfig) -> Result<Lease, String> {
    let ctx = LeaseContext {
        log: TracingContext::for_config(config),
        shared: Arc::clone(shared),
    };
    let consumer: Lease = BaseConsumer::from_config_and_context(config, ctx)
        .map_err(|e| format!("cannot create the consumer: {e}"))?;
    let names: Vec<&str> = shared.topics.keys().map(String::as_str).collect();
    consumer
        .subscribe(&names)
        .map_err(|e| format!("cannot subscribe to {}: {e}", names.join(",")))?;
    Ok(consumer)
}

/// This daemon's share of the region's mirror tasks; see the module docs.
pub struct MirrorTasks {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Closed when the poll thread ends.
    ended: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl std::fmt::Debug for MirrorTasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorTasks")
            .field("region", &self.shared.region)
            .field("group", &self.shared.group)
            .finish_non_exhaustive()
    }
}

impl MirrorTasks {
    /// Joins consumer group `group` over the mirror topics of `topics` and runs, with
    /// `runner`, the task of every mirror partition the group assigns to this daemon, until
    /// `shutdown` is cancelled (then see [`join`](Self::join)).
    ///
    /// The mirror topics must exist (`ensure_mirror_topic`). Must be called inside a tokio
    /// runtime: tasks are spawned on it.
    pub fn start(
        cfg: &KafkaConfig,
        region: &str,
        node: &str,
        group: String,
        topics: Vec<MirrorTopic>,
        runner: Arc<dyn MirrorTaskRunner>,
        shutdown: CancellationToken,
    ) -> Result<MirrorTasks, MirrorTasksError> {
        if topics.is_empty() {
            return Err(MirrorTasksError::Setup("no mirror topics".into()));
        }
        if group.is_empty() {
            return Err(MirrorTasksError::Setup("empty group id".into()));
        }
        let rt = tokio::runtime::Handle::try_current().map_err(|_| {
            MirrorTasksError::Setup(
                "MirrorTasks::start must be called inside a tokio runtime".into(),
            )
        })?;
        let mut by_topic = HashMap::new();
        for t in topics {
            if by_topic.contains_key(&t.mirror_topic) {
                return Err(MirrorTasksError::Setup(format!(
                    "mirror topic {} listed twice",
                    t.mirror_topic
                )));
            }
            by_topic.insert(t.mirror_topic.clone(), t);
        }
        let mut names: Vec<&str> = by_topic.keys().map(String::as_str).collect();
        names.sort_unstable();
        let names = names.join(",");
        let shared = Arc::new(Shared {
            region: region.to_owned(),
            node: node.to_owned(),
            group: group.clone(),
            topics: by_topic,
            runner,
            rt,
            stop: shutdown.child_token(),
            joined: AtomicBool::new(false),
            tasks: Mutex::new(BTreeMap::new()),
        });
        let config = mirror_lease_config(cfg, region, node, &group);
        let consumer = new_lease(&shared, &config).map_err(MirrorTasksError::Setup)?;
        tracing::info!(region, node, group = %group, topics = %names, "mirror tasks: joining the group");
        let (ended_tx, ended) = tokio::sync::oneshot::channel();
        let run = {
            let shared = Arc::clone(&shared);
            move || {
                poll_loop(consumer, &config, &shared);
                drop(ended_tx);
            }
        };
        let thread = match std::thread::Builder::new()
            .name("mirror-tasks".into())
            .spawn(run)
        {
            Ok(t) => t,
            Err(e) => {
                shared.stop.cancel();
                return Err(MirrorTasksError::Setup(format!(
                    "cannot start the poll thread: {e}"
                )));
            }
        };
        Ok(MirrorTasks {
            shared,
            thread: Some(thread),
            ended: Some(ended),
        })
    }

    pub fn status(&self) -> MirrorTasksStatus {
        let tasks = lock(&self.shared.tasks);
        let mut owned: Vec<(String, i32)> = tasks
            .iter()
            .map(|((_, p), t)| (t.origin.clone(), *p))
            .collect();
        owned.sort();
        MirrorTasksStatus {
            joined: self.shared.joined.load(Ordering::Acquire),
            owned,
        }
    }

    /// Stops every task (waiting for each to end), then leaves the group, and returns when
    /// all that is done. Meant for after `shutdown` was cancelled; it also stops on its own.
    pub async fn join(mut self) {
        self.shared.stop.cancel();
        if let Some(ended) = self.ended.take() {
            let _ = ended.await;
        }
        if let Some(thread) = self.thread.take() {
            // The thread has finished its work; joining it only collects it.
            match tokio::task::spawn_blocking(move || thread.join()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    tracing::error!(region = %self.shared.region, "mirror tasks: the poll thread panicked")
                }
                Err(e) => {
                    tracing::error!(region = %self.shared.region, error = %e, "mirror tasks: joining the poll thread failed")
                }
            }
        }
    }
}

impl Drop for MirrorTasks {
    /// Dropped without [`join`](MirrorTasks::join): the poll thread still stops every task
    /// and leaves the group, in the background.
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

/// The poll thread: keeps the lease consumer in the group (its callbacks start and stop
/// tasks) until shutdown, then stops every task and only then leaves the group.
fn poll_loop(mut consumer: Lease, config: &rdkafka::ClientConfig, shared: &Arc<Shared>) {
    let mut errors = ErrorLog::default();
    let mut dropped: u64 = 0;
    while !shared.stop.is_cancelled() {
        match consumer.poll(POLL_EVERY) {
            None => {}
            Some(Ok(m)) => {
                // Paused partitions deliver nothing; a record fetched before the pause
                // took effect is not ours to read.
                dropped += 1;
                if dropped == 1 || dropped.is_power_of_two() {
                    tracing::debug!(region = %shared.region, topic = m.topic(), partition = m.partition(), dropped, "mirror tasks: dropped a record the lease consumer fetched");
                }
            }
            Some(Err(e)) => {
                if let Some(suppressed) = errors.note(&e) {
                    tracing::warn!(region = %shared.region, error = %e, suppressed, "mirror tasks: consumer error (repeats are logged every 10 s)");
                }
                if matches!(e, KafkaError::MessageConsumptionFatal(_)) {
                    // A fatal consumer never recovers: its leases are gone. Stop the tasks
                    // first (the group may already have given them away), then rejoin.
                    tracing::error!(region = %shared.region, error = %e, "mirror tasks: consumer is in a fatal state; stopping its tasks and rejoining");
                    shared.stop_all("consumer fatal");
                    match replace_consumer(consumer, config, shared) {
                        Some(c) => consumer = c,
                        None => return,
                    }
                }
            }
        }
    }
    // Shutdown: stop and await every task while this daemon still holds their leases, so no
    // other daemon can start them before they ended; then leave (close serves the, by now
    // empty, revocation and sends LeaveGroup so the partitions move at once).
    shared.stop_all("shutdown");
    consumer.unsubscribe();
    drop(consumer);
    tracing::info!(region = %shared.region, node = %shared.node, group = %shared.group, "mirror tasks: left the group");
}

/// Drops `old` and builds a new subscribed consumer, retrying every second until it works
/// or shutdown (`None`).
fn replace_consumer(
    old: Lease,
    config: &rdkafka::ClientConfig,
    shared: &Arc<Shared>,
) -> Option<Lease> {
    drop(old);
    loop {
        match new_lease(shared, config) {
            Ok(c) => return Some(c),
            Err(e) => {
                tracing::error!(region = %shared.region, error = %e, "mirror tasks: cannot rejoin; retrying in 1 s");
            }
        }
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            if shared.stop.is_cancelled() {
                return None;
            }
            std::thread::sleep(POLL_EVERY);
        }
    }
}
