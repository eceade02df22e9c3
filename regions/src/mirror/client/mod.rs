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
//!   partitions its topic has ([`MirrorDescribe`]). More than the mirror topic's count
//!   ([`PeerRegion::partitions`] at first): the mirror topic is grown to match
//!   ([`MirrorLog::grow_partitions`]); fewer, or growing failed: nothing of that origin is
//!   mirrored and every task says why (an origin partition beyond the mirror topic's would
//!   never be mirrored, silently). While streaming, partition 0's task asks again every
//!   `partitions_recheck` (60 s), so a topic grown at run time is followed too.
//! - **Gaps.** If the origin no longer retains the offset asked for, the gap is logged at
//!   warn, counted, given to [`MirrorLog::record_gap`], and mirroring continues from the
//!   earliest retained offset.
//! - **Flow control.** Everything already received on the stream (up to 1 MiB) is taken
//!   and appended as one batch, and acknowledged, before the stream is read further, so a
//!   slow mirror topic slows the origin down through QUIC flow control rather than
//!   buffering here, while a fast one is never held to one append per origin batch.
//! - **Routes (relaying).** A partition is pulled from its origin directly, or, when the
//!   direct link has been down for `relay_after` (dials failing, or nothing received on the
//!   connection) or the origin is configured `direct = false`, through a peer configured
//!   `relay = true` that mirrors the origin: it serves its `dtfed.mirror.<origin>` with the
//!   origin's offsets. The resume point is the mirror partition's tail either way, and the
//!   task is the partition's only writer, so switching routes at any moment loses,
//!   duplicates or reorders nothing. While relayed, the task keeps dialling the origin and
//!   switches back as soon as its link is heard from again. The route is in
//!   [`MirrorTaskStatus::route`]; each switch is logged.
//! - **Ops.** [`MirrorClient::status`] (per task: state, offsets, lag, gaps),
//!   [`MirrorClient::links`] (per peer), and [`MirrorClient::pause_peer`] /
//!   [`MirrorClient::resume_peer`] for drills.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::AtomicI32;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use dtfed_proto::link::LinkTimers;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, Instrument};

use crate::endpoint::{PeerConnection, RegionEndpoint};
use crate::mirror::latency::AgeHistogram;
use crate::mirror::log::MirrorLog;
use crate::mirror::Backoff;
use crate::topology::PeerRegion;

mod ask;
mod digest;
mod link;
mod pull;
mod task;

use link::{LinkInfo, PeerLink, Redial, UNCHECKED};
use task::PartitionTask;

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
    /// How long a direct link must be down or silent before a relay is used (3 s).
    pub relay_after: Duration,
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
            relay_after: Duration::from_millis(crate::topology::DEFAULT_RELAY_AFTER_MS),
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
    /// Where the task pulls from (or last tried): `"direct"` or `"via <relay region>"`.
    pub route: String,
    /// Route changes since the task started (direct → relay, relay → direct, ...).
    pub route_switches: u64,
}

/// [`MirrorTaskStatus::route`] of a direct pull.
pub const ROUTE_DIRECT: &str = "direct";

impl MirrorTaskStatus {
    /// The region this task pulls from: the relay of a `via <relay>` route, else the
    /// origin itself.
    pub fn streams_from(&self) -> &str {
        self.route.strip_prefix("via ").unwrap_or(&self.origin)
    }

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
    /// UDP datagrams received on the current connection so far: while it grows the peer is
    /// heard from (QUIC keep-alives make a healthy link receive every few seconds, idle or
    /// not), which tells a cut path sooner than the connection's idle timeout.
    pub rx_datagrams: Option<u64>,
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
                    expected_partitions: AtomicI32::new(p.partitions.unwrap_or(UNCHECKED)),
                    relay: p.relay,
                    direct: p.direct,
                    heard: Mutex::new(None),
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
                    route: ROUTE_DIRECT.to_owned(),
                    route_switches: 0,
                },
            );
        }
        let _guard = TaskGuard {
            inner: self.inner.clone(),
            key: key.clone(),
        };
        let span = info_span!("mirror_pull", origin = %origin, partition);
        let mut relays: Vec<Arc<PeerLink>> = self
            .inner
            .peers
            .values()
            .filter(|p| p.relay && p.region != origin)
            .cloned()
            .collect();
        relays.sort_by(|a, b| a.region.cmp(&b.region));
        let mut task = PartitionTask {
            inner: self.inner.clone(),
            relays,
            direct_down_since: None,
            relay_cooldown: HashMap::new(),
            streamed_route: None,
            direct_probe: None,
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
                    rx_datagrams: conn
                        .as_ref()
                        .map(|c| c.connection().stats().udp_rx.datagrams),
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
