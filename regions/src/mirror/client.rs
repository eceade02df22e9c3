//! [`MirrorClient`]: the receiving side of mirroring. For each (origin, partition) it is
//! told to run, it reads the tail of the mirror partition, subscribes to the origin from
//! the tail plus one over a QUIC stream, and appends what arrives to the mirror partition,
//! in order, one batch at a time.
//!
//! - **One connection per peer region**, shared by all its partition tasks, dialled lazily
//!   to the peer's addresses (random order, rotating). When it drops, the next task that
//!   needs it redials; the other tasks wait for that dial instead of dialling too.
//! - **Dials overlap, they never queue behind a stale one.** A dial made while the path is
//!   cut cannot finish before its QUIC handshake gives up (`LinkTuning::handshake_timeout`,
//!   10 s) and its Initial retransmissions back off exponentially (1 s, 2 s, 4 s), so a dial
//!   that waited for it would start seconds after the path healed. Instead a new attempt
//!   starts every `redial_max` at most (jittered backoff from `redial_max / 2`, reset on
//!   success) while earlier ones are still in progress; the first to succeed wins and the
//!   others are dropped. At most [`MAX_DIALS_IN_FLIGHT`] run at once (the oldest, whose
//!   retransmission timer has backed off furthest, is dropped first). After a heal the link
//!   is therefore back within `redial_max` plus one handshake (two round trips).
//! - **Resume from the tail, always.** Any failure (stream error, silent origin, refused
//!   subscription, append failure, link cut) drops the stream and, after the task's own
//!   jittered backoff (same numbers, reset once a stream wrote something), starts over by
//!   reading the tail again. A crash is the same thing with an empty memory. So nothing is
//!   lost (the tail is what is durably written) and nothing is written twice (the session
//!   drops offsets at or below where it resumed, and [`MirrorClient::run_partition`] checks
//!   again right before every append).
//! - **Partition count.** Once per link, before streaming, the origin is asked how many
//!   partitions its topic has ([`MirrorDescribe`]); if that is not the mirror topic's count
//!   ([`PeerRegion::partitions`]), nothing of that origin is mirrored and every task says
//!   why (an origin partition beyond the mirror topic's would never be mirrored, silently).
//!   While streaming, partition 0's task asks again every `partitions_recheck` (60 s), so
//!   a topic grown at run time shows too.
//! - **Gaps.** If the origin no longer retains the offset asked for, the gap is logged at
//!   warn, counted, given to [`MirrorLog::record_gap`], and mirroring continues from the
//!   earliest retained offset.
//! - **Flow control.** Everything already received on the stream (up to 1 MiB) is taken
//!   and appended as one batch, and acknowledged, before the stream is read further, so a
//!   slow mirror topic slows the origin down through QUIC flow control rather than
//!   buffering here, while a fast one is never held to one append per origin batch.
//! - **Ops.** [`MirrorClient::status`] (per task: state, offsets, lag, gaps),
//!   [`MirrorClient::links`] (per peer), and [`MirrorClient::pause_peer`] /
//!   [`MirrorClient::resume_peer`] for drills.

use dtfed_proto::record::now_ms;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use dtfed_proto::link::{
    encode, DescribeAnswer, FrameDecoder, LinkErrorCode, LinkRecord, LinkTimers, MirrorDescribe,
    MirrorPull, PullConfig, PullEvent,
};
use futures::FutureExt;
use quinn::{RecvStream, SendStream};
use rand::seq::SliceRandom;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::latency::AgeHistogram;
use super::log::{LogError, MirrorLog};
use super::{Backoff, STREAM_ABANDONED};
use crate::endpoint::{PeerConnection, RegionEndpoint};
use crate::topology::PeerRegion;

/// Bytes read from a stream at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Most bytes taken from a stream before acting on them (one append): 1 MiB, four default
/// batches.
const READ_BUDGET: usize = 1024 * 1024;

/// Dial attempts to one peer region in progress at once (see the module docs).
pub const MAX_DIALS_IN_FLIGHT: usize = 4;

/// Numbers of a [`MirrorClient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorClientConfig {
    /// Heartbeat and dead-peer timers of each stream's session.
    pub timers: LinkTimers,
    /// First delay of the reconnect and retry backoffs (100 ms).
    pub backoff_min: Duration,
    /// Longest delay of the stream retry backoff (5 s).
    pub backoff_max: Duration,
    /// Longest delay between two dial attempts to a peer region (500 ms). Attempts overlap
    /// (see the module docs), so this bounds how long after a heal the next fresh attempt
    /// starts; each costs one QUIC Initial (~1.2 KB) plus its retransmissions.
    pub redial_max: Duration,
    /// On shutdown, how long an append already under way may still take (10 s). It is not
    /// dropped at once: a Kafka produce abandoned mid-flight could still land after the next
    /// owner of the partition read the tail, and be written twice.
    pub append_grace: Duration,
    /// How long the goodbye (`Error` frame) may take to write when a stream is closed on
    /// purpose (shutdown, pause, local failure) (1 s).
    pub close_grace: Duration,
    /// How often the task of partition 0 asks a streaming origin its partition count again,
    /// so a count changed at run time shows (60 s).
    pub partitions_recheck: Duration,
}

impl Default for MirrorClientConfig {
    fn default() -> Self {
        MirrorClientConfig {
            timers: LinkTimers::default(),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            redial_max: Duration::from_millis(500),
            append_grace: Duration::from_secs(10),
            close_grace: Duration::from_secs(1),
            partitions_recheck: Duration::from_secs(60),
        }
    }
}

/// Why a partition task could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MirrorError {
    /// The origin is not one of the client's peer regions.
    #[error("region {0} is not a peer region of this mirror client")]
    UnknownPeer(String),
    /// This client already runs a task for that partition.
    #[error("partition {partition} of {origin} is already being mirrored by this client")]
    AlreadyRunning { origin: String, partition: i32 },
    /// A negative partition.
    #[error("invalid partition {0}")]
    InvalidPartition(i32),
}

/// What a partition task is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorTaskState {
    /// Reading the tail, waiting for the link, or subscribing.
    Connecting,
    /// The origin accepted the subscription; records flow.
    Streaming,
    /// Waiting before a retry, and why the last attempt failed.
    Backoff(String),
    /// The peer is paused by an operator.
    Paused,
}

/// One partition task, for ops (`dtfed status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorTaskStatus {
    pub origin: String,
    pub topic: String,
    pub partition: i32,
    pub state: MirrorTaskState,
    /// Origin offset of the last record in the mirror partition (`None`: empty).
    pub mirrored_offset: Option<i64>,
    /// The origin partition's high watermark, as last reported.
    pub origin_high_watermark: Option<i64>,
    /// Origin offsets not mirrored yet: `high watermark - (mirrored + 1)`. Offsets are
    /// sparse, so this is an upper bound on records.
    pub lag_records: Option<i64>,
    /// Origin timestamp of the last record written by this task.
    pub last_record_ts_ms: Option<i64>,
    /// Gaps found (origin offsets the origin no longer retained).
    pub gaps: u64,
    /// The last gap, `(from, to)` inclusive.
    pub last_gap: Option<(i64, i64)>,
    /// Records written by this task since it started.
    pub records_mirrored: u64,
    /// Streams opened by this task since it started (1 + retries).
    pub streams_opened: u64,
    /// Ages of the records this task wrote (now − origin timestamp) when their append was
    /// acknowledged.
    pub append_age: AgeHistogram,
}

impl MirrorTaskStatus {
    /// Lag in milliseconds at `now_ms` (Unix ms): 0 when caught up, else the age of the
    /// last record written; `None` when unknown.
    pub fn lag_ms(&self, now_ms: i64) -> Option<i64> {
        match (self.lag_records, self.last_record_ts_ms) {
            (Some(0), _) => Some(0),
            (Some(_), Some(ts)) => Some(now_ms.saturating_sub(ts).max(0)),
            _ => None,
        }
    }
}

/// One peer region's link, for ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStatus {
    pub region: String,
    /// A connection is up.
    pub connected: bool,
    /// Smoothed RTT of the connection.
    pub rtt_ms: Option<u64>,
    /// The peer daemon's address the connection goes to.
    pub addr: Option<SocketAddr>,
    /// Paused by an operator.
    pub paused: bool,
    /// Connections made so far (more than one: the link dropped and was redialled).
    pub connects: u64,
    /// Why the last dial failed, until one succeeds.
    pub last_error: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The receiving side of mirroring. Cheap to clone (shared).
#[derive(Clone)]
pub struct MirrorClient {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for MirrorClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorClient")
            .field("region", &self.inner.endpoint.region())
            .field("peers", &self.inner.peers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

struct ClientInner {
    endpoint: Arc<RegionEndpoint>,
    log: Arc<dyn MirrorLog>,
    config: MirrorClientConfig,
    peers: HashMap<String, Arc<PeerLink>>,
    tasks: Mutex<HashMap<(String, i32), MirrorTaskStatus>>,
    /// Per origin: record ages when their mirror append was acknowledged.
    ages: Mutex<HashMap<String, AgeHistogram>>,
}

impl MirrorClient {
    /// A client writing to `log`, mirroring from `peers` over `endpoint`, default numbers.
    pub fn new(
        endpoint: Arc<RegionEndpoint>,
        log: Arc<dyn MirrorLog>,
        peers: Vec<PeerRegion>,
    ) -> MirrorClient {
        MirrorClient::with_config(endpoint, log, peers, MirrorClientConfig::default())
    }

    /// [`new`](Self::new) with explicit numbers.
    pub fn with_config(
        endpoint: Arc<RegionEndpoint>,
        log: Arc<dyn MirrorLog>,
        peers: Vec<PeerRegion>,
        config: MirrorClientConfig,
    ) -> MirrorClient {
        let peers = peers
            .into_iter()
            .map(|p| {
                let link = PeerLink {
                    dial: tokio::sync::Mutex::new(Redial {
                        // From half of redial_max: a handshake on a busy host takes a
                        // few hundred ms, and an attempt overlapping one that would have
                        // succeeded only costs both sides a handshake.
                        backoff: Backoff::new(
                            config.backoff_min.max(config.redial_max / 2),
                            config.redial_max,
                        ),
                        retry_at: None,
                        attempts: JoinSet::new(),
                        started: VecDeque::new(),
                        addr_order: Vec::new(),
                        dialling_since: None,
                        warned_at: None,
                    }),
                    current: Mutex::new(None),
                    info: Mutex::new(LinkInfo::default()),
                    paused: watch::channel(false).0,
                    described: tokio::sync::Mutex::new(None),
                    expected_partitions: p.partitions,
                    addrs: p.addrs,
                    region: p.name.clone(),
                };
                (p.name, Arc::new(link))
            })
            .collect();
        MirrorClient {
            inner: Arc::new(ClientInner {
                endpoint,
                log,
                config,
                peers,
                tasks: Mutex::new(HashMap::new()),
                ages: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Mirrors `origin`'s `topic`/`partition` into mirror partition `partition` until
    /// `shutdown` is cancelled, surviving every failure on the way (see the module docs).
    /// Returns an error only if the task cannot start.
    pub async fn run_partition(
        &self,
        origin: &str,
        topic: &str,
        partition: i32,
        shutdown: CancellationToken,
    ) -> Result<(), MirrorError> {
        if partition < 0 {
            return Err(MirrorError::InvalidPartition(partition));
        }
        let peer = self
            .inner
            .peers
            .get(origin)
            .cloned()
            .ok_or_else(|| MirrorError::UnknownPeer(origin.to_owned()))?;
        let key = (origin.to_owned(), partition);
        {
            let mut tasks = lock(&self.inner.tasks);
            if tasks.contains_key(&key) {
                return Err(MirrorError::AlreadyRunning {
                    origin: origin.to_owned(),
                    partition,
                });
            }
            tasks.insert(
                key.clone(),
                MirrorTaskStatus {
                    origin: origin.to_owned(),
                    topic: topic.to_owned(),
                    partition,
                    state: MirrorTaskState::Connecting,
                    mirrored_offset: None,
                    origin_high_watermark: None,
                    lag_records: None,
                    last_record_ts_ms: None,
                    gaps: 0,
                    last_gap: None,
                    records_mirrored: 0,
                    streams_opened: 0,
                    append_age: AgeHistogram::default(),
                },
            );
        }
        let _guard = TaskGuard {
            inner: self.inner.clone(),
            key: key.clone(),
        };
        let span = info_span!("mirror_pull", origin = %origin, partition);
        let mut task = PartitionTask {
            inner: self.inner.clone(),
            peer,
            origin: origin.to_owned(),
            topic: topic.to_owned(),
            partition,
            key,
            written: None,
            floor: 0,
            high_watermark: None,
        };
        task.run(shutdown).instrument(span).await;
        Ok(())
    }

    /// Every running partition task, by origin then partition.
    pub fn status(&self) -> Vec<MirrorTaskStatus> {
        let mut out: Vec<MirrorTaskStatus> = lock(&self.inner.tasks).values().cloned().collect();
        out.sort_by(|a, b| (&a.origin, a.partition).cmp(&(&b.origin, b.partition)));
        out
    }

    /// Per origin region (by name): how old records were (now − origin timestamp) when
    /// their mirror append was acknowledged, since the client started. The cross-region
    /// hop's share of the remote delivery latency: origin Kafka, origin reader, link,
    /// mirror append.
    pub fn append_ages(&self) -> Vec<(String, AgeHistogram)> {
        let mut out: Vec<(String, AgeHistogram)> = lock(&self.inner.ages)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Every peer region's link, by name.
    pub fn links(&self) -> Vec<LinkStatus> {
        let mut out: Vec<LinkStatus> = self
            .inner
            .peers
            .values()
            .map(|p| {
                let conn = p.live();
                let info = lock(&p.info);
                LinkStatus {
                    region: p.region.clone(),
                    connected: conn.is_some(),
                    rtt_ms: conn
                        .as_ref()
                        .map(|c| u64::try_from(c.rtt().as_millis()).unwrap_or(u64::MAX)),
                    addr: conn.as_ref().map(PeerConnection::remote_address),
                    paused: *p.paused.borrow(),
                    connects: info.connects,
                    last_error: info.last_error.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.region.cmp(&b.region));
        out
    }

    /// Pauses mirroring from `region`: its tasks close their streams and wait. Returns
    /// false for an unknown region.
    pub fn pause_peer(&self, region: &str) -> bool {
        let Some(peer) = self.inner.peers.get(region) else {
            return false;
        };
        if !peer.paused.send_replace(true) {
            info!(peer = %region, "mirroring paused by an operator");
        }
        true
    }

    /// Resumes mirroring from `region` (from the tails). Returns false for an unknown
    /// region.
    pub fn resume_peer(&self, region: &str) -> bool {
        let Some(peer) = self.inner.peers.get(region) else {
            return false;
        };
        if peer.paused.send_replace(false) {
            info!(peer = %region, "mirroring resumed by an operator");
        }
        true
    }

    /// Closes every peer connection with `reason` and drops dials in progress (after the
    /// tasks were shut down; a task still running would redial).
    pub fn close(&self, reason: &str) {
        for peer in self.inner.peers.values() {
            if let Some(conn) = lock(&peer.current).take() {
                conn.close(reason);
            }
            if let Ok(mut redial) = peer.dial.try_lock() {
                redial.attempts.abort_all();
                redial.started.clear();
            }
        }
    }
}

/// Removes a task's status entry when the task ends (or its future is dropped).
struct TaskGuard {
    inner: Arc<ClientInner>,
    key: (String, i32),
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        lock(&self.inner.tasks).remove(&self.key);
    }
}

/// The shared link to one peer region.
struct PeerLink {
    region: String,
    addrs: Vec<String>,
    /// Held while dialling, so only one task dials and the others wait for its result.
    dial: tokio::sync::Mutex<Redial>,
    current: Mutex<Option<PeerConnection>>,
    info: Mutex<LinkInfo>,
    paused: watch::Sender<bool>,
    /// The origin's partition count as it told it on a link: (that link's id, answer;
    /// `None` from an origin too old to tell).
    described: tokio::sync::Mutex<Option<(usize, Option<i32>)>>,
    /// The partition count of the mirror topic here ([`PeerRegion::partitions`]): the
    /// origin's must be the same. `None`: not checked.
    expected_partitions: Option<i32>,
}

struct Redial {
    /// Spacing of attempts: `redial_max / 2` (at least `backoff_min`) doubling to
    /// `redial_max`, reset on success.
    backoff: Backoff,
    /// No new attempt before this.
    retry_at: Option<Instant>,
    /// Attempts in progress. They are tasks, so they keep going between two calls of
    /// [`PeerLink::connection`] (a failed attempt returns, the others go on).
    attempts: JoinSet<Result<PeerConnection, String>>,
    /// The attempts in progress, oldest first.
    started: VecDeque<AbortHandle>,
    /// Addresses still to try in this round (a fresh random order each round, so the
    /// region's daemons spread over the peer's addresses).
    addr_order: Vec<String>,
    /// When the current run of attempts started (`None` while a link is up).
    dialling_since: Option<Instant>,
    /// When "still unreachable" was last logged at warn.
    warned_at: Option<Instant>,
}

#[derive(Default)]
struct LinkInfo {
    connects: u64,
    last_error: Option<String>,
}

impl PeerLink {
    /// The current connection, if it is up.
    fn live(&self) -> Option<PeerConnection> {
        lock(&self.current)
            .as_ref()
            .filter(|c| c.connection().close_reason().is_none())
            .cloned()
    }

    /// The connection, dialling if there is none. Returns when an attempt succeeds, or with
    /// the error of the first attempt that fails; attempts still in progress go on and the
    /// next call picks them up (see the module docs on overlapping dials).
    async fn connection(&self, endpoint: &RegionEndpoint) -> Result<PeerConnection, String> {
        if let Some(conn) = self.live() {
            return Ok(conn);
        }
        let mut guard = self.dial.lock().await;
        let redial = &mut *guard;
        // Someone else may have dialled while we waited for the lock.
        if let Some(conn) = self.live() {
            return Ok(conn);
        }
        let dropped = lock(&self.current).take();
        if let Some(dead) = dropped {
            let reason = dead
                .connection()
                .close_reason()
                .map(|e| e.to_string())
                .unwrap_or_default();
            info!(peer = %self.region, reason = %reason, "mirror link lost; redialling");
            // The first attempt goes out at once: a lost link is usually a cut or a peer
            // restart, and the backoff spaces the attempts that follow.
            redial.backoff.reset();
            redial.retry_at = None;
        }
        loop {
            let next_at = redial.retry_at.unwrap_or_else(Instant::now);
            tokio::select! {
                biased;
                Some(done) = redial.attempts.join_next_with_id(), if !redial.attempts.is_empty() => {
                    let (id, result) = match done {
                        Ok((id, result)) => (id, result),
                        // Aborted (superseded): already forgotten.
                        Err(e) if e.is_cancelled() => continue,
                        Err(e) => (e.id(), Err(format!("dial task failed: {e}"))),
                    };
                    redial.started.retain(|h| h.id() != id);
                    match result {
                        // Finished while nobody was waiting, and closed since.
                        Ok(conn) if conn.connection().close_reason().is_some() => continue,
                        Ok(conn) => {
                            // The other attempts are stale: drop them, results included (a
                            // half-open QUIC connection is closed when its handle goes).
                            redial.attempts = JoinSet::new();
                            redial.started.clear();
                            redial.backoff.reset();
                            redial.retry_at = None;
                            let dialled_for = redial.dialling_since.take().map(|t| t.elapsed());
                            redial.warned_at = None;
                            info!(
                                peer = %self.region,
                                ?dialled_for,
                                addr = %conn.remote_address(),
                                rtt_ms = u64::try_from(conn.rtt().as_millis()).unwrap_or(u64::MAX),
                                "mirror link up"
                            );
                            *lock(&self.current) = Some(conn.clone());
                            let mut info = lock(&self.info);
                            info.connects += 1;
                            info.last_error = None;
                            return Ok(conn);
                        }
                        Err(e) => {
                            self.note_failure(redial, &e);
                            return Err(e);
                        }
                    }
                }
                () = sleep_until(next_at) => {
                    let since = *redial.dialling_since.get_or_insert_with(Instant::now);
                    if redial.started.len() >= MAX_DIALS_IN_FLIGHT {
                        if let Some(oldest) = redial.started.pop_front() {
                            // Its Initial retransmissions have backed off the furthest.
                            oldest.abort();
                            let e = format!(
                                "no handshake completed in {:.1} s of dialling (path cut or peer down)",
                                since.elapsed().as_secs_f64()
                            );
                            self.note_failure(redial, &e);
                        }
                    }
                    let addr = self.pick_addr(redial);
                    let endpoint = endpoint.clone();
                    let region = self.region.clone();
                    let handle = redial
                        .attempts
                        .spawn(async move { dial_addr(&endpoint, &region, &addr).await });
                    redial.started.push_back(handle);
                    let delay = redial.backoff.next_delay();
                    debug!(
                        peer = %self.region,
                        in_progress = redial.started.len(),
                        next_attempt_in = ?delay,
                        "dialling peer region"
                    );
                    redial.retry_at = Some(Instant::now() + delay);
                }
            }
        }
    }

    /// Records why the peer is unreachable (link status), logging at warn at most every
    /// 10 s while it stays so (attempts go out every `redial_max`).
    fn note_failure(&self, redial: &mut Redial, error: &str) {
        lock(&self.info).last_error = Some(error.to_owned());
        let quiet = redial
            .warned_at
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10));
        if !quiet {
            redial.warned_at = Some(Instant::now());
            warn!(peer = %self.region, error = %error, in_progress = redial.attempts.len(), "cannot reach peer region");
        } else {
            debug!(peer = %self.region, error = %error, in_progress = redial.attempts.len(), "cannot reach peer region");
        }
    }

    /// The origin's partition count, asked once per link (see [`describe_origin`]).
    async fn origin_partitions(
        &self,
        conn: &PeerConnection,
        local_region: &str,
        topic: &str,
        limit: Duration,
        fresh: bool,
    ) -> Result<Option<i32>, String> {
        let id = conn.connection().stable_id();
        let mut described = self.described.lock().await;
        if let Some((link, answer)) = *described {
            if link == id && !fresh {
                return Ok(answer);
            }
        }
        let answer = describe_origin(conn, local_region, &self.region, topic, limit).await?;
        match answer {
            Some(n) => {
                info!(peer = %self.region, topic, partitions = n, "origin's partition count")
            }
            None if !fresh => warn!(
                peer = %self.region,
                topic,
                "the origin does not tell its partition count (an older dtfed): not checked"
            ),
            None => {}
        }
        *described = Some((id, answer));
        Ok(answer)
    }

    /// The next address to dial: the peer's addresses in a random order, round robin.
    fn pick_addr(&self, redial: &mut Redial) -> String {
        if redial.addr_order.is_empty() {
            redial.addr_order = self.addrs.clone();
            redial.addr_order.shuffle(&mut rand::rng());
        }
        redial.addr_order.pop().unwrap_or_default()
    }
}

/// One dial attempt to `addr` (resolved now), bounded by the endpoint's handshake timeout.
async fn dial_addr(
    endpoint: &RegionEndpoint,
    region: &str,
    addr: &str,
) -> Result<PeerConnection, String> {
    if addr.is_empty() {
        return Err(format!("region {region} has no addresses"));
    }
    let resolved: Vec<SocketAddr> = match tokio::net::lookup_host(addr).await {
        Ok(found) => found.collect(),
        Err(e) => return Err(format!("cannot resolve {addr}: {e}")),
    };
    let mut last = format!("{addr} resolves to no address");
    for sa in resolved {
        match endpoint.connect(sa, region).await {
            Ok(conn) => return Ok(conn),
            Err(e) => last = format!("{addr} ({sa}): {e}"),
        }
    }
    Err(last)
}

/// Asks the origin on `conn` how many partitions `topic` has, on a stream of its own
/// ([`MirrorDescribe`]), within `limit`. `Ok(None)`: the origin is too old to tell.
async fn describe_origin(
    conn: &PeerConnection,
    local_region: &str,
    origin: &str,
    topic: &str,
    limit: Duration,
) -> Result<Option<i32>, String> {
    let mut ask = MirrorDescribe::new(local_region, origin, topic);
    let exchange = async {
        let (mut send, mut recv) = conn
            .connection()
            .open_bi()
            .await
            .map_err(|e| format!("cannot open a stream: {e}"))?;
        let mut out = Vec::new();
        for frame in ask.request() {
            encode(&frame, &mut out)
                .map_err(|e| format!("cannot encode a {} frame: {e}", frame.kind()))?;
        }
        send.write_all(&out)
            .await
            .map_err(|e| format!("stream write failed: {e}"))?;
        let _ = send.finish();
        let mut decoder = FrameDecoder::new();
        let mut buf = vec![0u8; 4096];
        loop {
            let n = recv
                .read(&mut buf)
                .await
                .map_err(|e| format!("stream failed: {e}"))?
                .ok_or_else(|| "the origin ended the stream without an answer".to_owned())?;
            decoder.extend(buf.get(..n).unwrap_or_default());
            while let Some(frame) = decoder
                .next_frame()
                .map_err(|e| format!("undecodable input from the origin: {e}"))?
            {
                if let Some(answer) = ask
                    .handle_frame(frame)
                    .map_err(|e| format!("origin broke the protocol: {e}"))?
                {
                    return Ok::<DescribeAnswer, String>(answer);
                }
            }
        }
    };
    let answer = timeout(limit, exchange)
        .await
        .map_err(|_| format!("no answer within {limit:?}"))??;
    match answer {
        DescribeAnswer::Partitions(n) => Ok(Some(n)),
        DescribeAnswer::NotSupported => Ok(None),
        DescribeAnswer::Refused { code, message } => {
            Err(format!("the origin refused: {code}: {message}"))
        }
    }
}

/// Decodes `bytes` from the origin into `session`. Returns how the stream ends if the
/// origin broke the protocol.
fn feed(
    decoder: &mut FrameDecoder,
    session: &mut MirrorPull,
    epoch: Instant,
    bytes: &[u8],
    progressed: bool,
) -> Option<Outcome> {
    decoder.extend(bytes);
    loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => {
                if let Err(e) = session.handle_frame(epoch.elapsed(), frame) {
                    warn!(error = %e, "refusing the origin's frame");
                    return Some(Outcome::Failed {
                        reason: format!("origin broke the protocol: {e}"),
                        transient: e.code().is_transient(),
                        progressed,
                    });
                }
            }
            Ok(None) => return None,
            Err(e) => {
                warn!(error = %e, "undecodable input from the origin");
                session.close(LinkErrorCode::ProtocolViolation, e.to_string());
                return Some(Outcome::Failed {
                    reason: format!("undecodable input from the origin: {e}"),
                    transient: false,
                    progressed,
                });
            }
        }
    }
}

/// How one attempt (tail, link, stream) ended.
enum Outcome {
    Shutdown,
    Paused,
    /// A gap was reported; resume at once from past it.
    Gap,
    /// No link to the peer: its own backoff paces the next dial.
    NoLink(String),
    Failed {
        reason: String,
        /// Retrying soon may work (else: wait the longest backoff and alert).
        transient: bool,
        /// This attempt wrote records (resets the backoff).
        progressed: bool,
    },
}

/// Resolves once `rx` says paused.
async fn until_paused(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|paused| *paused).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resolves once `rx` says not paused.
async fn until_resumed(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|paused| !*paused).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One (origin, partition) being mirrored.
struct PartitionTask {
    inner: Arc<ClientInner>,
    peer: Arc<PeerLink>,
    origin: String,
    topic: String,
    partition: i32,
    key: (String, i32),
    /// Origin offset of the last record in the mirror partition: the tail as last read,
    /// then advanced by every append.
    written: Option<i64>,
    /// The lowest offset worth asking for (one past the last gap).
    floor: i64,
    high_watermark: Option<i64>,
}

impl PartitionTask {
    fn update(&self, f: impl FnOnce(&mut MirrorTaskStatus)) {
        if let Some(s) = lock(&self.inner.tasks).get_mut(&self.key) {
            f(s);
        }
    }

    fn set_state(&self, state: MirrorTaskState) {
        self.update(|s| s.state = state);
    }

    /// The next origin offset the mirror partition needs.
    fn next_needed(&self) -> i64 {
        self.written
            .map_or(0, |w| w.saturating_add(1))
            .max(self.floor)
    }

    fn update_offsets(&self) {
        let written = self.written;
        let hw = self.high_watermark;
        let lag = hw.map(|hw| hw.saturating_sub(self.next_needed()).max(0));
        self.update(|s| {
            s.mirrored_offset = written;
            s.origin_high_watermark = hw;
            s.lag_records = lag;
        });
    }

    async fn run(&mut self, shutdown: CancellationToken) {
        let config = &self.inner.config;
        let mut backoff = Backoff::new(config.backoff_min, config.backoff_max);
        let mut paused = self.peer.paused.subscribe();
        info!(topic = %self.topic, "mirror task started");
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let is_paused = *paused.borrow_and_update();
            if is_paused {
                self.set_state(MirrorTaskState::Paused);
                info!("mirror task paused");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = until_resumed(&mut paused) => {}
                }
                info!("mirror task resumed");
                backoff.reset();
                continue;
            }
            self.set_state(MirrorTaskState::Connecting);
            match self.attempt(&shutdown, &mut paused).await {
                Outcome::Shutdown => break,
                Outcome::Paused => {}
                Outcome::Gap => backoff.reset(),
                Outcome::NoLink(reason) => {
                    self.set_state(MirrorTaskState::Backoff(reason));
                }
                Outcome::Failed {
                    reason,
                    transient,
                    progressed,
                } => {
                    if shutdown.is_cancelled() {
                        break;
                    }
                    if progressed {
                        backoff.reset();
                    }
                    let delay = if transient {
                        let delay = backoff.next_delay();
                        warn!(reason = %reason, retry_in = ?delay, "mirror stream ended; will resume from the tail");
                        delay
                    } else {
                        let delay = backoff.max_delay();
                        error!(reason = %reason, retry_in = ?delay, "origin refused mirroring; needs an operator");
                        delay
                    };
                    self.set_state(MirrorTaskState::Backoff(reason));
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = sleep(delay) => {}
                        () = until_paused(&mut paused) => {}
                    }
                }
            }
        }
        info!("mirror task stopped");
    }

    /// Link, tail, stream: one try.
    async fn attempt(
        &mut self,
        shutdown: &CancellationToken,
        paused: &mut watch::Receiver<bool>,
    ) -> Outcome {
        let peer = self.peer.clone();
        // The tail is read while the link is set up, not after: this task is the mirror
        // partition's only writer (its lease) and appends nothing before it subscribes, so
        // a tail read alongside the dial is as current as one read after it, and after a
        // heal the link and the tail are ready together instead of one after the other.
        let log = self.inner.log.clone();
        let (conn, tail) = tokio::select! {
            () = shutdown.cancelled() => return Outcome::Shutdown,
            () = until_paused(paused) => return Outcome::Paused,
            both = async {
                tokio::join!(
                    peer.connection(&self.inner.endpoint),
                    log.tail(&self.origin, self.partition)
                )
            } => both,
        };
        let conn = match conn {
            Ok(conn) => conn,
            Err(e) => return Outcome::NoLink(format!("no link to {}: {e}", self.origin)),
        };
        if let Some(refused) = self.check_partitions(&conn, shutdown, paused).await {
            return refused;
        }
        let span = info_span!("stream", peer = %conn.remote_address());
        self.subscribe(conn, tail, shutdown, paused)
            .instrument(span)
            .await
    }

    /// Checks that the origin's partition count is the mirror topic's (once per link):
    /// partition p is mirrored into mirror partition p, so an origin partition beyond the
    /// mirror topic's would never be mirrored, and one the origin lacks would never be
    /// served. A mismatch refuses the link for every task of the origin, with a reason the
    /// operator sees in the task's state, the link's last error and the logs.
    async fn check_partitions(
        &self,
        conn: &PeerConnection,
        shutdown: &CancellationToken,
        paused: &mut watch::Receiver<bool>,
    ) -> Option<Outcome> {
        let told = tokio::select! {
            () = shutdown.cancelled() => return Some(Outcome::Shutdown),
            () = until_paused(paused) => return Some(Outcome::Paused),
            told = self.ask_partitions(conn, self.inner.config.timers.idle_timeout, false) => told?,
        };
        self.judge_partitions(told)
    }

    /// The origin's partition count (`None`: not checked for this peer); `fresh` asks again
    /// even if this link answered before.
    async fn ask_partitions(
        &self,
        conn: &PeerConnection,
        limit: Duration,
        fresh: bool,
    ) -> Option<Result<Option<i32>, String>> {
        self.peer.expected_partitions?;
        let local = self.inner.endpoint.region();
        Some(
            self.peer
                .origin_partitions(conn, local, &self.topic, limit, fresh)
                .await,
        )
    }

    /// What the origin's answer means for this task: `None` to go on.
    fn judge_partitions(&self, told: Result<Option<i32>, String>) -> Option<Outcome> {
        let expected = self.peer.expected_partitions?;
        match told {
            Ok(Some(n)) if n != expected => {
                let reason = format!(
                    "partition count mismatch: {}'s topic {} has {n} partitions, the mirror \
                     topic here has {expected}; mirroring from {} is refused until they match \
                     (set [[federation.peers]] partitions = {n} for {} and give \
                     dtfed.mirror.{} {n} partitions)",
                    self.origin, self.topic, self.origin, self.origin, self.origin
                );
                lock(&self.peer.info).last_error = Some(reason.clone());
                Some(Outcome::Failed {
                    reason,
                    transient: false,
                    progressed: false,
                })
            }
            Ok(_) => None,
            Err(e) => Some(Outcome::Failed {
                reason: format!("cannot learn the origin's partition count: {e}"),
                transient: true,
                progressed: false,
            }),
        }
    }

    /// Stream and session on `conn`, resuming after `tail` (the mirror partition's tail,
    /// as just read).
    async fn subscribe(
        &mut self,
        conn: PeerConnection,
        tail: Result<Option<i64>, LogError>,
        shutdown: &CancellationToken,
        paused: &mut watch::Receiver<bool>,
    ) -> Outcome {
        match tail {
            Ok(tail) => {
                self.written = tail;
                self.update_offsets();
            }
            Err(e) => {
                return Outcome::Failed {
                    reason: format!("cannot read the mirror tail: {e}"),
                    transient: true,
                    progressed: false,
                }
            }
        }
        let resume_from = self.next_needed();

        let opened = tokio::select! {
            () = shutdown.cancelled() => return Outcome::Shutdown,
            () = until_paused(paused) => return Outcome::Paused,
            opened = conn.connection().open_bi() => opened,
        };
        let (send, recv) = match opened {
            Ok(streams) => streams,
            Err(e) => {
                return Outcome::Failed {
                    reason: format!("cannot open a stream: {e}"),
                    transient: true,
                    progressed: false,
                }
            }
        };
        self.update(|s| s.streams_opened += 1);
        self.stream(&conn, send, recv, resume_from, shutdown, paused)
            .await
    }

    /// Runs one [`MirrorPull`] session on a fresh stream.
    async fn stream(
        &mut self,
        conn: &PeerConnection,
        mut send: SendStream,
        mut recv: RecvStream,
        resume_from: i64,
        shutdown: &CancellationToken,
        paused: &mut watch::Receiver<bool>,
    ) -> Outcome {
        let config = self.inner.config.clone();
        let cfg = PullConfig {
            local_region: self.inner.endpoint.region().to_owned(),
            origin: self.origin.clone(),
            topic: self.topic.clone(),
            partition: self.partition,
            resume_from,
            timers: config.timers,
        };
        let epoch = Instant::now();
        let mut session = MirrorPull::new(cfg, Duration::ZERO);
        let mut decoder = FrameDecoder::new();
        let mut out = Vec::new();
        let mut buf = vec![0u8; READ_CHUNK];
        let mut progressed = false;
        let mut end: Option<Outcome> = None;
        // The origin's partition count may change while streams run (an operator added
        // partitions): partition 0's task asks again now and then, so the mismatch shows.
        let recheck = self.partition == 0 && self.peer.expected_partitions.is_some();
        let mut recheck_at = Instant::now() + config.partitions_recheck;
        debug!(resume_from, "subscribing");
        loop {
            // 1. Act on events, in order: appends happen here. Records decoded before a
            //    stream failure are still written; nothing after a failed append is.
            while let Some(event) = session.poll_event() {
                let outcome = match event {
                    PullEvent::Ready => {
                        debug!(resume_from, "origin accepted the subscription");
                        self.set_state(MirrorTaskState::Streaming);
                        None
                    }
                    // Shutting down: write nothing more (the next owner resumes from the
                    // tail).
                    PullEvent::Records(_) if shutdown.is_cancelled() => {
                        session.close(
                            LinkErrorCode::Unavailable,
                            "the receiving daemon is shutting down",
                        );
                        Some(Outcome::Shutdown)
                    }
                    PullEvent::Records(records) => match self.write(records, shutdown).await {
                        Ok(Some(next)) => {
                            session.handle_written(next);
                            progressed = true;
                            None
                        }
                        Ok(None) => None,
                        Err(reason) => {
                            session.close(
                                LinkErrorCode::Unavailable,
                                "the mirror topic is not writable",
                            );
                            Some(Outcome::Failed {
                                reason,
                                transient: true,
                                progressed,
                            })
                        }
                    },
                    PullEvent::Lag { high_watermark } => {
                        self.high_watermark = Some(high_watermark);
                        self.update_offsets();
                        None
                    }
                    PullEvent::Gap { from, to } => Some(match self.on_gap(from, to).await {
                        Ok(()) => Outcome::Gap,
                        Err(reason) => Outcome::Failed {
                            reason,
                            transient: true,
                            progressed,
                        },
                    }),
                    // Out of range with nothing to skip: the origin's log ends before what
                    // the mirror already holds (origin data lost, topic recreated). Keep
                    // retrying, slowly and loudly.
                    PullEvent::PeerError {
                        code: code @ LinkErrorCode::OffsetOutOfRange { .. },
                        message,
                    } => Some(Outcome::Failed {
                        reason: format!(
                            "the origin's log ends before offset {}, which the mirror needs \
                             next: {code}: {message}",
                            session.next_offset()
                        ),
                        transient: false,
                        progressed,
                    }),
                    PullEvent::PeerError { code, message } => Some(Outcome::Failed {
                        reason: format!("origin ended the stream: {code}: {message}"),
                        transient: code.is_transient(),
                        progressed,
                    }),
                    PullEvent::PeerSilent => Some(Outcome::Failed {
                        reason: format!("origin silent for {:?}", config.timers.idle_timeout),
                        transient: true,
                        progressed,
                    }),
                };
                if let Some(outcome) = outcome {
                    // A stream failure seen while reading may already be recorded; an
                    // append failure or the origin's own word is the better reason.
                    if matches!(outcome, Outcome::Shutdown)
                        || !matches!(end, Some(Outcome::Shutdown | Outcome::Paused))
                    {
                        end = Some(outcome);
                    }
                    break;
                }
            }

            // 2. Send what the session has to say.
            let closing = end.is_some() || session.is_closed();
            let mut encoded = Ok(());
            while let Some(frame) = session.poll_transmit() {
                if let Err(e) = encode(&frame, &mut out) {
                    encoded = Err(format!("cannot encode a {} frame: {e}", frame.kind()));
                    break;
                }
            }
            let written = match encoded {
                Err(e) => Err(e),
                Ok(()) if out.is_empty() => Ok(()),
                Ok(()) => {
                    let limit = if closing {
                        config.close_grace
                    } else {
                        config.timers.idle_timeout
                    };
                    let result = tokio::select! {
                        r = send.write_all(&out) => r.map_err(|e| format!("stream write failed: {e}")),
                        () = sleep(limit) => Err(format!("no write progress for {limit:?}")),
                        () = shutdown.cancelled(), if !closing => Err("shutting down".to_owned()),
                        () = until_paused(paused), if !closing => Err("paused".to_owned()),
                    };
                    out.clear();
                    result
                }
            };
            if let Err(why) = written {
                let _ = send.reset(STREAM_ABANDONED);
                let _ = recv.stop(STREAM_ABANDONED);
                return end.unwrap_or_else(|| {
                    if shutdown.is_cancelled() {
                        Outcome::Shutdown
                    } else if *paused.borrow() {
                        Outcome::Paused
                    } else {
                        Outcome::Failed {
                            reason: why,
                            transient: true,
                            progressed,
                        }
                    }
                });
            }
            if closing {
                let _ = send.finish();
                return end.unwrap_or(Outcome::Failed {
                    reason: "the mirror session closed".to_owned(),
                    transient: true,
                    progressed,
                });
            }

            // 3. Wait for the origin, a timer, or being told to stop. Reading comes before
            //    the timer: after a long append, what the origin sent in the meantime must
            //    count before the dead-peer check does.
            let deadline = session
                .poll_timeout()
                .map_or_else(Instant::now, |t| epoch + t);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    session.close(LinkErrorCode::Unavailable, "the receiving daemon is shutting down");
                    end = Some(Outcome::Shutdown);
                }
                () = until_paused(paused) => {
                    session.close(LinkErrorCode::Unavailable, "mirroring paused by an operator");
                    end = Some(Outcome::Paused);
                }
                read = recv.read(&mut buf) => match read {
                    Ok(Some(n)) => {
                        end = feed(&mut decoder, &mut session, epoch, buf.get(..n).unwrap_or_default(), progressed);
                        // Take whatever else has already arrived (up to READ_BUDGET) before
                        // acting on it: the session joins the records into one append, so
                        // a partition writes everything that came in during its previous
                        // append at once instead of one acknowledged append per frame.
                        let mut taken = n;
                        while end.is_none() && taken < READ_BUDGET {
                            match recv.read(&mut buf).now_or_never() {
                                Some(Ok(Some(n))) => {
                                    taken += n;
                                    end = feed(&mut decoder, &mut session, epoch, buf.get(..n).unwrap_or_default(), progressed);
                                }
                                Some(Ok(None)) => {
                                    end = Some(Outcome::Failed {
                                        reason: "origin finished the stream".to_owned(),
                                        transient: true,
                                        progressed,
                                    });
                                }
                                Some(Err(e)) => {
                                    end = Some(Outcome::Failed {
                                        reason: format!("stream failed: {e}"),
                                        transient: true,
                                        progressed,
                                    });
                                }
                                // Nothing more buffered yet.
                                None => break,
                            }
                        }
                    }
                    Ok(None) => {
                        end = Some(Outcome::Failed {
                            reason: "origin finished the stream".to_owned(),
                            transient: true,
                            progressed,
                        });
                    }
                    Err(e) => {
                        end = Some(Outcome::Failed {
                            reason: format!("stream failed: {e}"),
                            transient: true,
                            progressed,
                        });
                    }
                },
                () = sleep_until(deadline) => session.handle_timeout(epoch.elapsed()),
                () = sleep_until(recheck_at), if recheck => {
                    recheck_at = Instant::now() + config.partitions_recheck;
                    // Bounded well below the dead-peer timeout: the stream is not read
                    // meanwhile.
                    let limit = config.timers.heartbeat_interval;
                    if let Some(told) = self.ask_partitions(conn, limit, true).await {
                        // A failed ask is not a mismatch: the stream goes on.
                        if let Some(refused) = told.ok().map(Ok).and_then(|t| self.judge_partitions(t)) {
                            session.close(LinkErrorCode::Unavailable, "partition count mismatch");
                            end = Some(refused);
                        }
                    }
                }
            }
        }
    }

    /// Appends `records` after the tail; returns one past the last offset written, or
    /// `None` if there was nothing new.
    async fn write(
        &mut self,
        records: Vec<LinkRecord>,
        shutdown: &CancellationToken,
    ) -> Result<Option<i64>, String> {
        // The session already dropped anything at or below where it resumed; check again at
        // the boundary that matters, against what the mirror partition holds.
        let mut last = self.written;
        let mut fresh = Vec::with_capacity(records.len());
        let mut dropped = 0usize;
        for r in records {
            if last.is_some_and(|l| r.offset <= l) {
                dropped += 1;
                continue;
            }
            last = Some(r.offset);
            fresh.push(r);
        }
        if dropped > 0 {
            warn!(dropped, tail = ?self.written, "dropped records at or below the mirror tail");
        }
        let (Some(last_record), Some(last_offset)) = (fresh.last(), last) else {
            return Ok(None);
        };
        let last_ts = last_record.timestamp_ms;
        let count = fresh.len();
        let log = self.inner.log.clone();
        let append = log.append(&self.origin, self.partition, &fresh);
        tokio::pin!(append);
        let result = tokio::select! {
            r = &mut append => r,
            () = shutdown.cancelled() => {
                // Let an append under way finish: abandoned, it could land later than the
                // next owner's tail read.
                let grace = self.inner.config.append_grace;
                match timeout(grace, &mut append).await {
                    Ok(r) => r,
                    Err(_) => {
                        error!(?grace, "mirror append still pending at shutdown; abandoning it");
                        return Err(format!("append still pending {grace:?} after shutdown"));
                    }
                }
            }
        };
        result.map_err(|e| format!("cannot append to the mirror topic: {e}"))?;
        let acked_ms = now_ms();
        let mut ages = AgeHistogram::default();
        for r in fresh.iter().filter(|r| r.timestamp_ms >= 0) {
            ages.record(acked_ms.saturating_sub(r.timestamp_ms));
        }
        lock(&self.inner.ages)
            .entry(self.origin.clone())
            .or_default()
            .merge(&ages);
        self.written = Some(last_offset);
        self.update_offsets();
        self.update(|s| {
            s.last_record_ts_ms = Some(last_ts);
            s.records_mirrored += count as u64;
            s.append_age.merge(&ages);
        });
        Ok(Some(last_offset.saturating_add(1)))
    }

    /// Reports a gap: logs, counts, records it; then resumes past it.
    async fn on_gap(&mut self, from: i64, to: i64) -> Result<(), String> {
        warn!(
            from,
            to,
            missing_offsets = to.saturating_sub(from).saturating_add(1),
            "the origin no longer retains these offsets: gap in the mirror"
        );
        self.inner
            .log
            .record_gap(&self.origin, self.partition, from, to)
            .await
            .map_err(|e| format!("cannot record gap {from}..={to}: {e}"))?;
        self.floor = self.floor.max(to.saturating_add(1));
        self.update_offsets();
        self.update(|s| {
            s.gaps += 1;
            s.last_gap = Some((from, to));
        });
        Ok(())
    }
}
