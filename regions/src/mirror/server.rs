//! [`MirrorServer`]: the origin side of mirroring. Accepts links from peer regions (already
//! authenticated by the [`RegionEndpoint`]) and serves every bidirectional stream they open
//! with one [`MirrorServe`] session: one stream per mirrored partition.
//!
//! Per stream, one task:
//!
//! - bytes from the [`quinn::RecvStream`] go through a [`FrameDecoder`] into the session
//!   (the peer region is the certificate's, so a `Hello` naming another is refused);
//! - on `Subscribe`, a reader task opens the [`OriginLog`] at the asked offset and reads
//!   batches of up to `max_batch_bytes` into a channel of one: besides the batch being
//!   written, at most two wait (one in the channel, one in the reader's hands);
//! - each batch goes to [`MirrorServe::queue_records`] and the frames it makes are
//!   written. Awaiting the write *is* the backpressure: when the receiver's QUIC
//!   window is full the write waits, the channel fills, and the reader stops reading.
//! - heartbeats and the dead-peer check come from the session's timers; a write that makes
//!   no progress at all (not one byte accepted) for `write_stall_timeout` abandons the
//!   stream.
//!
//! **Relaying** ([`MirrorServer::with_relayed`]): a region that mirrors origin O may also
//! serve its mirror topic `dtfed.mirror.O` to its other peers, with O's own offsets (the
//! [`OriginLog`] given translates). Never to O itself (`forbidden`), and only topics of
//! origins the daemon was given, i.e. its configured peers.
//!
//! A failure on the origin side (retention passed the offset, unknown partition, Kafka
//! down) becomes an `Error` frame with the matching code, then the stream is finished; the
//! receiver retries with backoff. Nothing is kept between streams: any daemon of the
//! origin region serves any partition.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dtfed_proto::link::session::DEFAULT_MAX_BATCH_BYTES;
use dtfed_proto::link::{encode, LinkErrorCode, LinkTimers, MirrorServe, ServeConfig, ServeEvent};
use futures::FutureExt;
use quinn::{RecvStream, SendStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, trace, warn, Instrument, Span};

use super::digest::{answer_digest, OriginDigests};
use super::log::{LogError, OriginBatch, OriginLog};
use super::stream::{PeerInput, StreamDriver, StreamSide};
use super::STREAM_ABANDONED;
use crate::endpoint::{PeerConnection, RegionEndpoint};

/// Budget of the first batch read for a new subscription (then doubling per batch up to
/// `max_batch_bytes`).
const FIRST_BATCH_BYTES: usize = 16 * 1024;

/// Longest wait for the local topic's partition count when a receiver asks for it.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes read from a stream at a time (the receiver only sends small frames).
const READ_CHUNK: usize = 16 * 1024;

/// Numbers of a [`MirrorServer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorServerConfig {
    /// Heartbeat and dead-peer timers of each stream's session.
    pub timers: LinkTimers,
    /// Bytes read from the log per batch, and budget of one `Batch` frame (256 KiB).
    pub max_batch_bytes: usize,
    /// A write that makes no progress (no byte accepted) for this long means the receiver
    /// stopped reading: the stream is abandoned (30 s, the session's idle timeout).
    pub write_stall_timeout: Duration,
    /// On shutdown, how long streams get to send their `Error` frame before the
    /// connections are closed (2 s).
    pub shutdown_grace: Duration,
    /// Links one peer region may hold at once; more are closed with
    /// [`CLOSE_TOO_MANY_LINKS`] and a reason (64).
    pub max_links_per_peer: usize,
    /// Streams one peer region may hold at once over all its links; more are answered
    /// with an `unavailable` error naming the limit, without opening a log reader (128).
    pub max_streams_per_peer: usize,
}

/// Application close code of a link refused because its peer region holds
/// [`MirrorServerConfig::max_links_per_peer`] links already.
pub const CLOSE_TOO_MANY_LINKS: quinn::VarInt = quinn::VarInt::from_u32(0x110);

impl Default for MirrorServerConfig {
    fn default() -> Self {
        let timers = LinkTimers::default();
        MirrorServerConfig {
            timers,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            write_stall_timeout: timers.idle_timeout,
            shutdown_grace: Duration::from_secs(2),
            max_links_per_peer: crate::topology::DEFAULT_MAX_LINKS_PER_PEER,
            max_streams_per_peer: crate::topology::DEFAULT_MAX_STREAMS_PER_PEER,
        }
    }
}

/// One stream being served, for ops (`dtfed status` on the origin side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedStream {
    /// The receiving region.
    pub peer: String,
    /// The partition, once subscribed.
    pub partition: Option<i32>,
    /// Where the receiver asked to start.
    pub from_offset: Option<i64>,
    /// One past the last record sent.
    pub sent_next_offset: Option<i64>,
    /// What the receiver last reported durably written (`Progress`).
    pub receiver_next_offset: Option<i64>,
    /// The partition's high watermark at the last read.
    pub high_watermark: Option<i64>,
}

/// A handle on what a [`MirrorServer`] is serving; stays valid after `run` took the server.
#[derive(Debug, Clone, Default)]
pub struct ServerStatus {
    streams: Arc<Mutex<HashMap<u64, ServedStream>>>,
    next_id: Arc<AtomicU64>,
    /// Per peer region: links and streams held, and what was refused over the limits.
    usage: Arc<Mutex<HashMap<String, PeerUsage>>>,
}

/// What one peer region holds on a [`MirrorServer`], and what it was refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerUsage {
    /// Links open now.
    pub links: usize,
    /// Streams open now (being served, or being refused).
    pub streams: usize,
    /// Links closed since start because the peer held the most allowed.
    pub refused_links: u64,
    /// Streams refused since start because the peer held the most allowed.
    pub refused_streams: u64,
}

/// Which per-peer count a [`UsageSlot`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Link,
    Stream,
}

/// One link or stream counted against its peer region; released on drop.
struct UsageSlot {
    usage: Arc<Mutex<HashMap<String, PeerUsage>>>,
    peer: String,
    held: Held,
}

impl Drop for UsageSlot {
    fn drop(&mut self) {
        let mut usage = self.usage.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(u) = usage.get_mut(&self.peer) {
            match self.held {
                Held::Link => u.links = u.links.saturating_sub(1),
                Held::Stream => u.streams = u.streams.saturating_sub(1),
            }
        }
    }
}

impl ServerStatus {
    /// Every stream being served, by peer then partition.
    pub fn streams(&self) -> Vec<ServedStream> {
        let mut out: Vec<ServedStream> = self
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        out.sort_by(|a, b| (&a.peer, a.partition).cmp(&(&b.peer, b.partition)));
        out
    }

    /// Per peer region, what it holds and what it was refused.
    pub fn peer_usage(&self) -> Vec<(String, PeerUsage)> {
        let mut out: Vec<(String, PeerUsage)> = self
            .usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Counts one more link or stream of `peer` if it holds fewer than `limit`; else
    /// counts the refusal and returns how many refusals of that kind there were.
    fn acquire(&self, peer: &str, held: Held, limit: usize) -> Result<UsageSlot, u64> {
        let mut usage = self.usage.lock().unwrap_or_else(PoisonError::into_inner);
        let u = usage.entry(peer.to_owned()).or_default();
        let (count, refused) = match held {
            Held::Link => (&mut u.links, &mut u.refused_links),
            Held::Stream => (&mut u.streams, &mut u.refused_streams),
        };
        if *count >= limit {
            *refused += 1;
            return Err(*refused);
        }
        *count += 1;
        Ok(UsageSlot {
            usage: self.usage.clone(),
            peer: peer.to_owned(),
            held,
        })
    }

    fn register(&self, peer: &str) -> StreamSlot {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id,
                ServedStream {
                    peer: peer.to_owned(),
                    partition: None,
                    from_offset: None,
                    sent_next_offset: None,
                    receiver_next_offset: None,
                    high_watermark: None,
                },
            );
        StreamSlot {
            status: self.clone(),
            id,
        }
    }
}

/// A stream's entry in [`ServerStatus`], removed on drop.
struct StreamSlot {
    status: ServerStatus,
    id: u64,
}

impl StreamSlot {
    fn update(&self, f: impl FnOnce(&mut ServedStream)) {
        if let Some(s) = self
            .status
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&self.id)
        {
            f(s);
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.status
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// The origin side of mirroring: serves this region's local topic to peer regions.
pub struct MirrorServer {
    endpoint: Arc<RegionEndpoint>,
    log: Arc<dyn OriginLog>,
    /// Mirror topic → (its origin, a reader of it with the origin's offsets).
    relayed: HashMap<String, (String, Arc<dyn OriginLog>)>,
    config: MirrorServerConfig,
    status: ServerStatus,
    digests: Option<Arc<dyn OriginDigests>>,
}

impl std::fmt::Debug for MirrorServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorServer")
            .field("region", &self.endpoint.region())
            .field("topic", &self.log.topic())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What every connection and stream task of a server shares.
struct Shared {
    local_region: String,
    log: Arc<dyn OriginLog>,
    relayed: HashMap<String, (String, Arc<dyn OriginLog>)>,
    config: MirrorServerConfig,
    status: ServerStatus,
    digests: Option<Arc<dyn OriginDigests>>,
}

impl MirrorServer {
    /// A server of `log` (the local topic) on `endpoint`, with default numbers.
    pub fn new(endpoint: Arc<RegionEndpoint>, log: Arc<dyn OriginLog>) -> MirrorServer {
        MirrorServer {
            endpoint,
            log,
            relayed: HashMap::new(),
            config: MirrorServerConfig::default(),
            status: ServerStatus::default(),
            digests: None,
        }
    }

    /// Also serves `log`, this region's mirror of `origin` (its `topic()`, normally
    /// `dtfed.mirror.<origin>`), read with `origin`'s offsets, to every peer but `origin`.
    /// Call it only for origins this region mirrors from a configured peer.
    pub fn with_relayed(mut self, origin: impl Into<String>, log: Arc<dyn OriginLog>) -> Self {
        self.relayed
            .insert(log.topic().to_owned(), (origin.into(), log));
        self
    }

    /// Answers receivers' `Digest` requests with `digests` (without: `unavailable`).
    pub fn with_digests(mut self, digests: Arc<dyn OriginDigests>) -> MirrorServer {
        self.digests = Some(digests);
        self
    }

    /// Replaces the numbers.
    pub fn with_config(mut self, config: MirrorServerConfig) -> MirrorServer {
        self.config = config;
        self
    }

    /// A handle on the streams being served.
    pub fn status(&self) -> ServerStatus {
        self.status.clone()
    }

    /// Accepts links and serves their streams until `shutdown` is cancelled or the
    /// endpoint is closed. On shutdown every stream gets an `Error { Unavailable }` (so
    /// receivers retry at once, elsewhere if they can), then every accepted connection is
    /// closed with a reason. The endpoint itself is left open (the mirror client shares it).
    pub async fn run(self, shutdown: CancellationToken) {
        let shared = Arc::new(Shared {
            local_region: self.endpoint.region().to_owned(),
            log: self.log.clone(),
            relayed: self.relayed.clone(),
            config: self.config.clone(),
            status: self.status.clone(),
            digests: self.digests.clone(),
        });
        let span = info_span!("mirror_server", origin = %shared.local_region);
        async {
            let relayed: Vec<&String> = shared.relayed.keys().collect();
            info!(topic = %shared.log.topic(), ?relayed, "mirror server up");
            // Cancelled on shutdown and when the endpoint closes: stops every connection.
            let stop = shutdown.child_token();
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    Some(done) = connections.join_next(), if !connections.is_empty() => {
                        if let Err(e) = done {
                            if e.is_panic() {
                                error!(error = %e, "mirror link task panicked");
                            }
                        }
                    }
                    accepted = self.endpoint.accept() => match accepted {
                        None => {
                            info!("region endpoint closed");
                            break;
                        }
                        // The endpoint logged the refusal already.
                        Some(Err(e)) => debug!(error = %e, "incoming link not set up"),
                        Some(Ok(peer)) => {
                            let limit = shared.config.max_links_per_peer;
                            match shared.status.acquire(peer.region(), Held::Link, limit) {
                                Ok(slot) => {
                                    let task = serve_connection(shared.clone(), peer, stop.child_token());
                                    connections.spawn(task.map(move |()| drop(slot)));
                                }
                                Err(refused) => refuse_link(&peer, limit, refused),
                            }
                        }
                    },
                }
            }
            stop.cancel();
            let grace = shared.config.shutdown_grace + Duration::from_secs(1);
            let drained = timeout(grace, async {
                while connections.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                warn!(
                    remaining = connections.len(),
                    "mirror links did not stop in time; aborting them"
                );
                connections.shutdown().await;
            }
            info!("mirror server stopped");
        }
        .instrument(span)
        .await;
    }
}

/// Closes a link its peer region is not allowed to hold (over `limit`).
fn refuse_link(peer: &PeerConnection, limit: usize, refused: u64) {
    let reason = format!(
        "too many mirror links from region {}: at most {limit} at once (mirror server \
         max_links_per_peer)",
        peer.region()
    );
    if refused == 1 || refused % 100 == 0 {
        warn!(peer = %peer.region(), addr = %peer.remote_address(), limit, refused, "refusing a mirror link: the peer region holds the most allowed");
    }
    peer.connection()
        .close(CLOSE_TOO_MANY_LINKS, reason.as_bytes());
}

/// Answers a stream its peer region is not allowed to open (over `limit`) with an
/// `unavailable` error naming the limit, then ends it. No session, no log reader.
async fn refuse_stream(mut send: SendStream, mut recv: RecvStream, peer: String, limit: usize) {
    let frame = dtfed_proto::link::LinkFrame::error(
        LinkErrorCode::Unavailable,
        format!(
            "too many mirror streams from region {peer}: at most {limit} at once (mirror \
             server max_streams_per_peer)"
        ),
    );
    let mut out = Vec::new();
    if encode(&frame, &mut out).is_ok() {
        let _ = timeout(Duration::from_secs(5), send.write_all(&out)).await;
    }
    let _ = send.finish();
    let _ = recv.stop(STREAM_ABANDONED);
    let _ = timeout(Duration::from_secs(5), send.stopped()).await;
}

/// Serves one accepted link: one task per bidirectional stream the peer opens.
async fn serve_connection(shared: Arc<Shared>, peer: PeerConnection, cancel: CancellationToken) {
    let region = peer.region().to_owned();
    let span = info_span!(
        "mirror_link",
        origin = %shared.local_region,
        peer = %region,
        addr = %peer.remote_address(),
    );
    async {
        info!("serving mirror link");
        let mut streams = JoinSet::new();
        let lost = loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break None,
                Some(done) = streams.join_next(), if !streams.is_empty() => {
                    if let Err(e) = done {
                        if e.is_panic() {
                            error!(error = %e, "mirror stream task panicked");
                        }
                    }
                }
                bi = peer.connection().accept_bi() => match bi {
                    Ok((send, recv)) => {
                        let limit = shared.config.max_streams_per_peer;
                        let slot = match shared.status.acquire(&region, Held::Stream, limit) {
                            Ok(slot) => slot,
                            Err(refused) => {
                                if refused == 1 || refused % 100 == 0 {
                                    warn!(limit, refused, "refusing a mirror stream: the peer region holds the most allowed");
                                }
                                // Counted while it is answered, so a flood of refusals is
                                // bounded by QUIC's stream limit per link.
                                if let Ok(held) = shared.status.acquire(&region, Held::Stream, usize::MAX) {
                                    streams.spawn(refuse_stream(send, recv, region.clone(), limit).map(move |()| drop(held)));
                                }
                                continue;
                            }
                        };
                        let stream_span = info_span!(
                            "mirror_serve",
                            origin = %shared.local_region,
                            peer = %region,
                            partition = tracing::field::Empty,
                        );
                        let run = StreamServer::run(shared.clone(), region.clone(), send, recv, cancel.child_token())
                            .map(move |()| drop(slot));
                        streams.spawn(run.instrument(stream_span));
                    }
                    Err(e) => break Some(e),
                },
            }
        };
        match lost {
            Some(reason) => {
                info!(reason = %reason, "mirror link closed");
                streams.shutdown().await;
            }
            None => {
                // The streams saw the cancellation too: let them say goodbye, then close.
                let grace = shared.config.shutdown_grace;
                let drained = timeout(grace, async {
                    while streams.join_next().await.is_some() {}
                })
                .await;
                if drained.is_err() {
                    streams.shutdown().await;
                }
                peer.close("mirror server shutting down");
                info!("mirror link closed (shutdown)");
            }
        }
    }
    .instrument(span)
    .await;
}

/// The origin's side of one stream: a [`MirrorServe`] session fed from the origin log, run
/// by a [`StreamDriver`].
struct StreamServer {
    shared: Arc<Shared>,
    /// The receiving region (the certificate's).
    peer: String,
    cancel: CancellationToken,
    /// The log reader of the subscription (at most one), aborted on drop.
    reader: JoinSet<()>,
    batches: Option<mpsc::Receiver<Result<OriginBatch, LogError>>>,
    slot: StreamSlot,
}

impl StreamServer {
    /// Serves one stream of `peer` until it ends or `cancel` fires.
    async fn run(
        shared: Arc<Shared>,
        peer: String,
        send: SendStream,
        recv: RecvStream,
        cancel: CancellationToken,
    ) {
        let cfg = ServeConfig {
            local_region: shared.local_region.clone(),
            topic: shared.log.topic().to_owned(),
            relayed_topics: shared.relayed.keys().cloned().collect(),
            peer_region: Some(peer.clone()),
            max_batch_bytes: shared.config.max_batch_bytes,
            timers: shared.config.timers,
        };
        let slot = shared.status.register(&peer);
        let peer = peer.clone();
        let side = StreamServer {
            shared,
            peer,
            cancel,
            reader: JoinSet::new(),
            batches: None,
            slot,
        };
        let session = MirrorServe::new(cfg, Duration::ZERO);
        debug!("mirror stream opened");
        StreamDriver::new(side, session, send, recv, READ_CHUNK, READ_CHUNK)
            .run()
            .await;
    }

    /// The log serving `topic` to this stream's peer: the local topic, or a relayed mirror
    /// topic of another region than the peer. Else the refusal to send.
    fn log_for(&self, topic: &str) -> Result<Arc<dyn OriginLog>, (LinkErrorCode, String)> {
        if topic == self.shared.log.topic() {
            return Ok(self.shared.log.clone());
        }
        match self.shared.relayed.get(topic) {
            Some((origin, _)) if *origin == self.peer => Err((
                LinkErrorCode::Forbidden,
                format!("{topic} holds {origin}'s own records: never served back to {origin}"),
            )),
            Some((_, log)) => Ok(log.clone()),
            None => Err((
                LinkErrorCode::UnknownTopic,
                format!("topic {topic:?} is not served here"),
            )),
        }
    }

    /// Answers a `Describe` with the topic's partition count (bounded wait).
    async fn answer_describe(&mut self, session: &mut MirrorServe, topic: &str) {
        let log = match self.log_for(topic) {
            Ok(log) => log,
            Err((code, why)) => {
                warn!(topic, code = %code, reason = %why, "refusing a describe");
                session.close(code, why);
                return;
            }
        };
        let counted = timeout(DESCRIBE_TIMEOUT, log.partitions()).await;
        match counted {
            Ok(Ok(n)) => {
                if let Err(e) = session.describe(n) {
                    debug!(error = %e, "describe not answered");
                }
            }
            Ok(Err(e)) => {
                warn!(error = %e, "cannot count the local topic's partitions");
                session.close(LinkErrorCode::Unavailable, e.to_string());
            }
            Err(_) => {
                warn!("counting the local topic's partitions timed out");
                session.close(
                    LinkErrorCode::Unavailable,
                    format!("the local topic's partitions not counted within {DESCRIBE_TIMEOUT:?}"),
                );
            }
        }
    }

    fn on_batch(&mut self, session: &mut MirrorServe, batch: Result<OriginBatch, LogError>) {
        match batch {
            Ok(batch) => {
                let next = batch.records.last().map(|r| r.offset.saturating_add(1));
                let hw = batch.high_watermark;
                self.slot.update(|s| {
                    s.high_watermark = Some(hw);
                    if next.is_some() {
                        s.sent_next_offset = next;
                    }
                });
                match session.queue_records(batch.records, hw) {
                    Ok(()) | Err(dtfed_proto::link::SessionError::Closed) => {}
                    Err(e) => error!(error = %e, "cannot serve the partition"),
                }
            }
            Err(e) => {
                let code = match &e {
                    LogError::OffsetOutOfRange { earliest } => LinkErrorCode::OffsetOutOfRange {
                        earliest: *earliest,
                    },
                    LogError::UnknownPartition(_) => LinkErrorCode::UnknownPartition,
                    LogError::Unavailable(_) => LinkErrorCode::Unavailable,
                    LogError::Other(_) => LinkErrorCode::Internal,
                };
                warn!(error = %e, code = %code, "cannot read the local topic; ending the stream");
                self.batches = None;
                session.close(code, e.to_string());
            }
        }
    }
}

impl StreamSide for StreamServer {
    type Session = MirrorServe;
    /// A stream ends when the session closes or the receiver finishes its half: nothing to
    /// report.
    type End = ();
    type Stop = ();
    type Wake = Option<Result<OriginBatch, LogError>>;

    async fn handle_events(&mut self, session: &mut MirrorServe, _end: &mut Option<()>) {
        while let Some(event) = session.poll_event() {
            match event {
                ServeEvent::Subscribe {
                    topic,
                    partition,
                    from_offset,
                } => {
                    Span::current().record("partition", partition);
                    let log = match self.log_for(&topic) {
                        Ok(log) => log,
                        Err((code, why)) => {
                            warn!(topic = %topic, code = %code, reason = %why, "refusing a subscription");
                            session.close(code, why);
                            continue;
                        }
                    };
                    info!(topic = %topic, from_offset, relayed = topic != self.shared.log.topic(), "serving partition");
                    self.slot.update(|s| {
                        s.partition = Some(partition);
                        s.from_offset = Some(from_offset);
                    });
                    let (tx, rx) = mpsc::channel(1);
                    let max_bytes = self.shared.config.max_batch_bytes;
                    self.reader.spawn(
                        read_origin(log, partition, from_offset, max_bytes, tx)
                            .instrument(Span::current()),
                    );
                    self.batches = Some(rx);
                }
                ServeEvent::Describe { topic } => {
                    debug!(topic = %topic, "receiver asks for the partition count");
                    self.answer_describe(session, &topic).await;
                }
                ServeEvent::Digest {
                    partition,
                    from_offset,
                    to_offset,
                } => {
                    debug!(
                        partition,
                        from_offset, to_offset, "receiver asks for a digest"
                    );
                    let digests = self.shared.digests.clone();
                    answer_digest(
                        digests.as_deref(),
                        session,
                        partition,
                        from_offset,
                        to_offset,
                    )
                    .await;
                }
                ServeEvent::Progress { next_offset } => {
                    trace!(next_offset, "receiver progress");
                    self.slot
                        .update(|s| s.receiver_next_offset = Some(next_offset));
                }
                ServeEvent::PeerError { code, message } => {
                    if code == LinkErrorCode::Unavailable {
                        debug!(code = %code, message = %message, "receiver ended the stream");
                    } else {
                        info!(code = %code, message = %message, "receiver ended the stream");
                    }
                }
                ServeEvent::PeerSilent => {
                    warn!("receiver silent too long; ending the stream");
                }
            }
        }
    }

    fn write_limit(&self, _closing: bool) -> Duration {
        // A stream closing on its own (the log failed) still gets the full stall limit;
        // only a shutdown hurries the goodbye.
        if self.cancel.is_cancelled() {
            self.shared.config.shutdown_grace
        } else {
            self.shared.config.write_stall_timeout
        }
    }

    fn stop(&self) -> impl Future<Output = ()> + Send + 'static {
        self.cancel.clone().cancelled_owned()
    }

    fn on_stop(&mut self, session: &mut MirrorServe, (): ()) -> Option<()> {
        session.close(
            LinkErrorCode::Unavailable,
            "the origin daemon is shutting down",
        );
        None
    }

    async fn wake(&mut self) -> Option<Result<OriginBatch, LogError>> {
        next_batch(&mut self.batches).await
    }

    async fn on_wake(
        &mut self,
        session: &mut MirrorServe,
        batch: Option<Result<OriginBatch, LogError>>,
    ) -> Option<()> {
        match batch {
            Some(batch) => self.on_batch(session, batch),
            // The reader ended; it always sends its error first.
            None => self.batches = None,
        }
        None
    }

    fn on_peer(&mut self, _session: &mut MirrorServe, input: PeerInput) -> Option<()> {
        match input {
            PeerInput::Finished => {
                debug!("receiver finished its side of the stream");
                Some(())
            }
            PeerInput::ReadFailed(e) => {
                debug!(error = %e, "mirror stream read failed");
                Some(())
            }
            PeerInput::Undecodable(e) => {
                warn!(error = %e, "undecodable input from the receiver; ending the stream");
                None
            }
            PeerInput::Refused(e) => {
                if e != dtfed_proto::link::SessionError::Closed {
                    warn!(error = %e, "refusing the receiver's frame; ending the stream");
                }
                None
            }
        }
    }

    fn abandoned(&mut self, _end: Option<()>, why: String) {
        if why.starts_with("no write progress") && !self.cancel.is_cancelled() {
            warn!(reason = %why, "receiver is not reading; abandoning the stream");
        } else {
            debug!(reason = %why, "mirror stream abandoned");
        }
    }

    async fn finished(&mut self, _end: Option<()>, send: &mut SendStream) {
        if self.cancel.is_cancelled() {
            // Let the peer receive the goodbye before the connection closes.
            let _ = timeout(self.shared.config.shutdown_grace, send.stopped()).await;
        }
        debug!("mirror stream finished");
    }
}

/// The next batch from the reader task, or never if there is none.
async fn next_batch(
    batches: &mut Option<mpsc::Receiver<Result<OriginBatch, LogError>>>,
) -> Option<Result<OriginBatch, LogError>> {
    match batches {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Reads `partition` from `from_offset` into `tx` until the stream goes away; sends the
/// first error, then stops.
async fn read_origin(
    log: Arc<dyn OriginLog>,
    partition: i32,
    from_offset: i64,
    max_bytes: usize,
    tx: mpsc::Sender<Result<OriginBatch, LogError>>,
) {
    let opened = async {
        let partitions = log.partitions().await?;
        if partition >= partitions {
            return Err(LogError::UnknownPartition(partition));
        }
        log.open(partition, from_offset).await
    }
    .await;
    let mut reader = match opened {
        Ok(reader) => reader,
        Err(e) => {
            let _ = tx.send(Err(e)).await;
            return;
        }
    };
    // Batch sizes start small and double up to `max_bytes`: the receiver can decode a
    // batch only once all of it arrived, and a stream (re)opened after a cut, on a fresh
    // connection whose congestion window starts at ~240 KB shared by every partition, took
    // several round trips to deliver one whole 256 KiB batch (at 540 ms RTT, seconds before
    // the first record of a backlog was mirrored). Small first batches arrive in one round
    // trip; by the time the window has grown, so have the batches.
    let mut budget = FIRST_BATCH_BYTES.min(max_bytes).max(1);
    loop {
        let batch = reader.next_batch(budget).await;
        let failed = batch.is_err();
        if tx.send(batch).await.is_err() || failed {
            return;
        }
        budget = budget.saturating_mul(2).min(max_bytes);
    }
}
