//! [`MirrorClient`]: the receiving side of mirroring. For each (origin, partition) it is
//! told to run, it reads the tail of the mirror partition, subscribes to the origin from
//! the tail plus one over a QUIC stream, and appends what arrives to the mirror partition,
//! in order, one batch at a time.
//!
//! - **One connection per peer region**, shared by all its partition tasks, dialled lazily
//!   to any of the peer's addresses (random order). When it drops, the next task that needs
//!   it redials after a jittered exponential backoff (100 ms doubling to 5 s, reset on
//!   success); the other tasks wait for that dial instead of dialling too.
//! - **Resume from the tail, always.** Any failure (stream error, silent origin, refused
//!   subscription, append failure, link cut) drops the stream and, after the task's own
//!   jittered backoff (same numbers, reset once a stream wrote something), starts over by
//!   reading the tail again. A crash is the same thing with an empty memory. So nothing is
//!   lost (the tail is what is durably written) and nothing is written twice (the session
//!   drops offsets at or below where it resumed, and [`MirrorClient::run_partition`] checks
//!   again right before every append).
//! - **Gaps.** If the origin no longer retains the offset asked for, the gap is logged at
//!   warn, counted, given to [`MirrorLog::record_gap`], and mirroring continues from the
//!   earliest retained offset.
//! - **Flow control.** Each batch is appended (and acknowledged) before the stream is read
//!   further, so a slow mirror topic slows the origin down through QUIC flow control rather
//!   than buffering here.
//! - **Ops.** [`MirrorClient::status`] (per task: state, offsets, lag, gaps),
//!   [`MirrorClient::links`] (per peer), and [`MirrorClient::pause_peer`] /
//!   [`MirrorClient::resume_peer`] for drills.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use dtfed_proto::link::{
    encode, FrameDecoder, LinkErrorCode, LinkRecord, LinkTimers, MirrorPull, PullConfig, PullEvent,
};
use quinn::{RecvStream, SendStream};
use rand::seq::SliceRandom;
use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::log::MirrorLog;
use super::{Backoff, STREAM_ABANDONED};
use crate::endpoint::{PeerConnection, RegionEndpoint};
use crate::topology::PeerRegion;

/// Bytes read from a stream at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Numbers of a [`MirrorClient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorClientConfig {
    /// Heartbeat and dead-peer timers of each stream's session.
    pub timers: LinkTimers,
    /// First delay of the reconnect and retry backoffs (100 ms).
    pub backoff_min: Duration,
    /// Longest delay of the reconnect and retry backoffs (5 s).
    pub backoff_max: Duration,
    /// On shutdown, how long an append already under way may still take (10 s). It is not
    /// dropped at once: a Kafka produce abandoned mid-flight could still land after the next
    /// owner of the partition read the tail, and be written twice.
    pub append_grace: Duration,
    /// How long the goodbye (`Error` frame) may take to write when a stream is closed on
    /// purpose (shutdown, pause, local failure) (1 s).
    pub close_grace: Duration,
}

impl Default for MirrorClientConfig {
    fn default() -> Self {
        MirrorClientConfig {
            timers: LinkTimers::default(),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            append_grace: Duration::from_secs(10),
            close_grace: Duration::from_secs(1),
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
                        backoff: Backoff::new(config.backoff_min, config.backoff_max),
                        retry_at: None,
                    }),
                    current: Mutex::new(None),
                    info: Mutex::new(LinkInfo::default()),
                    paused: watch::channel(false).0,
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

    /// Closes every peer connection with `reason` (after the tasks were shut down; a task
    /// still running would redial).
    pub fn close(&self, reason: &str) {
        for peer in self.inner.peers.values() {
            if let Some(conn) = lock(&peer.current).take() {
                conn.close(reason);
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
}

struct Redial {
    backoff: Backoff,
    /// No dial before this.
    retry_at: Option<Instant>,
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

    /// The connection, dialling (after the backoff) if there is none.
    async fn connection(&self, endpoint: &RegionEndpoint) -> Result<PeerConnection, String> {
        if let Some(conn) = self.live() {
            return Ok(conn);
        }
        let mut redial = self.dial.lock().await;
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
            let delay = redial.backoff.next_delay();
            info!(peer = %self.region, reason = %reason, redial_in = ?delay, "mirror link lost");
            redial.retry_at = Some(Instant::now() + delay);
        }
        if let Some(at) = redial.retry_at {
            sleep_until(at).await;
        }
        match self.dial_any(endpoint).await {
            Ok(conn) => {
                redial.backoff.reset();
                redial.retry_at = None;
                info!(
                    peer = %self.region,
                    addr = %conn.remote_address(),
                    rtt_ms = u64::try_from(conn.rtt().as_millis()).unwrap_or(u64::MAX),
                    "mirror link up"
                );
                *lock(&self.current) = Some(conn.clone());
                let mut info = lock(&self.info);
                info.connects += 1;
                info.last_error = None;
                Ok(conn)
            }
            Err(e) => {
                let delay = redial.backoff.next_delay();
                redial.retry_at = Some(Instant::now() + delay);
                warn!(peer = %self.region, error = %e, redial_in = ?delay, "cannot reach peer region");
                lock(&self.info).last_error = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Tries the peer's addresses in random order.
    async fn dial_any(&self, endpoint: &RegionEndpoint) -> Result<PeerConnection, String> {
        let mut addrs = self.addrs.clone();
        addrs.shuffle(&mut rand::rng());
        let mut last = format!("region {} has no addresses", self.region);
        for addr in &addrs {
            let resolved: Vec<SocketAddr> = match tokio::net::lookup_host(addr.as_str()).await {
                Ok(found) => found.collect(),
                Err(e) => {
                    last = format!("cannot resolve {addr}: {e}");
                    continue;
                }
            };
            for sa in resolved {
                match endpoint.connect(sa, &self.region).await {
                    Ok(conn) => return Ok(conn),
                    Err(e) => last = format!("{addr} ({sa}): {e}"),
                }
            }
        }
        Err(last)
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
        let conn = tokio::select! {
            () = shutdown.cancelled() => return Outcome::Shutdown,
            () = until_paused(paused) => return Outcome::Paused,
            conn = peer.connection(&self.inner.endpoint) => conn,
        };
        let conn = match conn {
            Ok(conn) => conn,
            Err(e) => return Outcome::NoLink(format!("no link to {}: {e}", self.origin)),
        };
        let span = info_span!("stream", peer = %conn.remote_address());
        self.subscribe(conn, shutdown, paused)
            .instrument(span)
            .await
    }

    /// Tail, stream, session, on `conn`.
    async fn subscribe(
        &mut self,
        conn: PeerConnection,
        shutdown: &CancellationToken,
        paused: &mut watch::Receiver<bool>,
    ) -> Outcome {
        // The tail, read right before subscribing: it is what is durably written.
        let log = self.inner.log.clone();
        let tail = tokio::select! {
            () = shutdown.cancelled() => return Outcome::Shutdown,
            tail = log.tail(&self.origin, self.partition) => tail,
        };
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
        self.stream(send, recv, resume_from, shutdown, paused).await
    }

    /// Runs one [`MirrorPull`] session on a fresh stream.
    async fn stream(
        &mut self,
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
                        decoder.extend(buf.get(..n).unwrap_or_default());
                        loop {
                            match decoder.next_frame() {
                                Ok(Some(frame)) => {
                                    if let Err(e) = session.handle_frame(epoch.elapsed(), frame) {
                                        warn!(error = %e, "refusing the origin's frame");
                                        end = Some(Outcome::Failed {
                                            reason: format!("origin broke the protocol: {e}"),
                                            transient: e.code().is_transient(),
                                            progressed,
                                        });
                                        break;
                                    }
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    warn!(error = %e, "undecodable input from the origin");
                                    session.close(LinkErrorCode::ProtocolViolation, e.to_string());
                                    end = Some(Outcome::Failed {
                                        reason: format!("undecodable input from the origin: {e}"),
                                        transient: false,
                                        progressed,
                                    });
                                    break;
                                }
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
        self.written = Some(last_offset);
        self.update_offsets();
        self.update(|s| {
            s.last_record_ts_ms = Some(last_ts);
            s.records_mirrored += count as u64;
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
