//! Sans-IO state machines for one mirror stream: [`MirrorPull`] on the receiving region,
//! [`MirrorServe`] on the origin. No sockets, no clocks, no tasks: the caller moves bytes
//! (through [`super::codec`]) and time in, and takes frames and events out.
//!
//! Driving either session, in a loop:
//!
//! 1. frames decoded from the stream go to `handle_frame(now, frame)`;
//! 2. `poll_event()` until `None`, acting on each event;
//! 3. `poll_transmit()` until `None`, encoding and writing each frame;
//! 4. sleep until `poll_timeout()` (or the next read), then call `handle_timeout(now)`.
//!
//! `now` is any monotonic clock expressed as a [`Duration`] since a fixed start (the daemon
//! passes `Instant::now() - start`; tests pass virtual time). When `handle_frame` returns an
//! error the session is closed: drain `poll_transmit` (it ends with an `Error` frame telling
//! the peer why), then close the stream. Once [`MirrorPull::is_closed`] /
//! [`MirrorServe::is_closed`] holds, no further frame is produced after what is queued.

use std::collections::VecDeque;
use std::time::Duration;

use super::codec::{record_len_bound, BATCH_OVERHEAD_BOUND, MAX_RECORD_BYTES};
use super::frame::{LinkErrorCode, LinkFrame, LinkRecord, CODEC_VERSION, MAGIC, PROTOCOL_VERSION};

/// Default budget for one `Batch` frame's payload.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 256 * 1024;

/// Heartbeat and dead-peer timers of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkTimers {
    /// A `Heartbeat` is sent this often once the Hellos are exchanged.
    pub heartbeat_interval: Duration,
    /// The peer is declared dead after this long without any frame from it (also bounds the
    /// handshake). Should be several heartbeat intervals.
    pub idle_timeout: Duration,
}

impl Default for LinkTimers {
    fn default() -> Self {
        LinkTimers {
            heartbeat_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a session refused a frame or a call. Errors caused by the peer close the session
/// and queue an `Error` frame with [`SessionError::code`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("peer's hello has magic {0:?}, expected {MAGIC:?}")]
    BadMagic([u8; 4]),
    #[error(
        "peer speaks protocol {protocol} codec {codec}; \
         this side speaks protocol {PROTOCOL_VERSION} codec {CODEC_VERSION}"
    )]
    VersionMismatch { protocol: u16, codec: u16 },
    #[error("peer says it is region {got:?}, expected {expected:?}")]
    WrongRegion { expected: String, got: String },
    #[error("region {0:?} may not mirror from this region")]
    Forbidden(String),
    #[error("topic {0:?} is not served here")]
    UnknownTopic(String),
    #[error("partition {0} does not exist")]
    UnknownPartition(i32),
    #[error("{frame} frame not allowed {state}")]
    Unexpected {
        frame: &'static str,
        state: &'static str,
    },
    #[error("frame for partition {got} on the stream of partition {expected}")]
    WrongPartition { expected: i32, got: i32 },
    #[error("invalid frame: {0}")]
    Invalid(String),
    #[error("record at offset {offset} needs up to {bytes} bytes, over the frame limit")]
    RecordTooLarge { offset: i64, bytes: usize },
    #[error("no subscription is being served yet")]
    NotServing,
    #[error("session is closed")]
    Closed,
}

impl SessionError {
    /// The code to tell the peer.
    pub fn code(&self) -> LinkErrorCode {
        match self {
            SessionError::BadMagic(_) => LinkErrorCode::BadMagic,
            SessionError::VersionMismatch { .. } => LinkErrorCode::VersionMismatch,
            SessionError::WrongRegion { .. } | SessionError::Forbidden(_) => {
                LinkErrorCode::Forbidden
            }
            SessionError::UnknownTopic(_) => LinkErrorCode::UnknownTopic,
            SessionError::UnknownPartition(_) => LinkErrorCode::UnknownPartition,
            SessionError::Unexpected { .. }
            | SessionError::WrongPartition { .. }
            | SessionError::Invalid(_) => LinkErrorCode::ProtocolViolation,
            SessionError::RecordTooLarge { .. }
            | SessionError::NotServing
            | SessionError::Closed => LinkErrorCode::Internal,
        }
    }
}

/// Checks a peer's `Hello` against this build: magic, then exact versions.
///
/// Versioning rule: the pull side proposes its versions, the serve side accepts them only if
/// it speaks exactly those (today: protocol 1, codec 1) and echoes them in its own `Hello`;
/// otherwise it answers `Error { VersionMismatch }` and closes. The pull side accepts only
/// an echo of what it proposed. A later build may serve several versions (upgrade origins
/// first, then receivers) without adding a round trip.
pub(crate) fn check_hello(
    magic: [u8; 4],
    protocol_version: u16,
    codec_version: u16,
) -> Result<(), SessionError> {
    if magic != MAGIC {
        return Err(SessionError::BadMagic(magic));
    }
    if protocol_version != PROTOCOL_VERSION || codec_version != CODEC_VERSION {
        return Err(SessionError::VersionMismatch {
            protocol: protocol_version,
            codec: codec_version,
        });
    }
    Ok(())
}

/// Dead-peer and heartbeat timers on the caller's clock.
#[derive(Debug)]
struct Clock {
    timers: LinkTimers,
    last_recv: Duration,
    /// `None` until the Hellos are exchanged: no heartbeat may precede a Hello.
    next_heartbeat: Option<Duration>,
}

/// What a timer said when it fired.
enum Tick {
    Nothing,
    Heartbeat(i64),
    PeerSilent,
}

impl Clock {
    fn new(timers: LinkTimers, now: Duration) -> Self {
        Clock {
            timers,
            last_recv: now,
            next_heartbeat: None,
        }
    }

    fn start_heartbeats(&mut self, now: Duration) {
        self.next_heartbeat = Some(now.saturating_add(self.timers.heartbeat_interval));
    }

    fn idle_deadline(&self) -> Duration {
        self.last_recv.saturating_add(self.timers.idle_timeout)
    }

    fn poll_timeout(&self) -> Duration {
        match self.next_heartbeat {
            Some(hb) => hb.min(self.idle_deadline()),
            None => self.idle_deadline(),
        }
    }

    fn tick(&mut self, now: Duration) -> Tick {
        if now >= self.idle_deadline() {
            return Tick::PeerSilent;
        }
        match self.next_heartbeat {
            Some(hb) if now >= hb => {
                self.next_heartbeat = Some(now.saturating_add(self.timers.heartbeat_interval));
                Tick::Heartbeat(i64::try_from(now.as_millis()).unwrap_or(i64::MAX))
            }
            _ => Tick::Nothing,
        }
    }
}

/// What a [`MirrorPull`] is set up to fetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PullConfig {
    /// This (receiving) region's name, sent in our `Hello`.
    pub local_region: String,
    /// The origin region: the region whose records (and offsets) are pulled.
    pub origin: String,
    /// The region answering the stream when it is not the origin: a relay serving its
    /// mirror of the origin (`topic` is then `dtfed.mirror.<origin>`). The answering
    /// `Hello` must name `via` if set, else `origin`.
    pub via: Option<String>,
    /// The topic subscribed: the origin's local topic (e.g. `dtfed.local`), or a relay's
    /// mirror topic of the origin.
    pub topic: String,
    /// The partition, in the origin's local topic and in the mirror topic alike.
    pub partition: i32,
    /// First origin offset wanted: the last origin offset in the mirror partition, plus one
    /// (0 when it is empty).
    pub resume_from: i64,
    /// Heartbeat and dead-peer timers.
    pub timers: LinkTimers,
}

impl PullConfig {
    /// A config with default timers.
    pub fn new(
        local_region: impl Into<String>,
        origin: impl Into<String>,
        topic: impl Into<String>,
        partition: i32,
        resume_from: i64,
    ) -> Self {
        PullConfig {
            local_region: local_region.into(),
            origin: origin.into(),
            via: None,
            topic: topic.into(),
            partition,
            resume_from,
            timers: LinkTimers::default(),
        }
    }
}

/// What a [`MirrorPull`] tells its caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PullEvent {
    /// The origin answered the handshake; records will follow.
    Ready,
    /// New records, in strictly increasing offset order, never seen before on this session
    /// (nor below `resume_from`). Write them to the mirror partition in this order, then
    /// call [`MirrorPull::handle_written`].
    Records(Vec<LinkRecord>),
    /// The origin's high watermark changed: lag is `high_watermark - next_offset()`.
    Lag { high_watermark: i64 },
    /// Origin offsets `from..=to` are gone (retention passed) and will never be mirrored:
    /// report them, then open a new session with `resume_from = to + 1`. The session is
    /// closed.
    Gap { from: i64, to: i64 },
    /// The origin refused or ended the stream. The session is closed; retry with backoff if
    /// `code.is_transient()`, otherwise alert.
    PeerError {
        /// The peer's error code.
        code: LinkErrorCode,
        message: String,
    },
    /// No frame from the origin for `idle_timeout`: the session is closed; reset the stream
    /// and reconnect.
    PeerSilent,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PullState {
    /// Hello and Subscribe queued or sent; waiting for the origin's Hello.
    Handshaking,
    Streaming,
    Closed,
}

/// The receiving side of one mirrored partition: subscribes, dedupes, reports progress.
///
/// Ordering and dedupe rule: offsets delivered by one session strictly increase. A record
/// whose offset is below [`MirrorPull::next_offset`] (everything delivered so far, and
/// everything below `resume_from`) is a duplicate and is dropped. A record above it is
/// accepted even if offsets were skipped: Kafka offsets are sparse (compaction, transaction
/// markers), so a hole is not a loss; real losses arrive as [`PullEvent::Gap`].
#[derive(Debug)]
pub struct MirrorPull {
    cfg: PullConfig,
    state: PullState,
    /// Next offset wanted: one past the last delivered record.
    next_offset: i64,
    /// Highest `next_offset` the caller reported durably written.
    written: i64,
    /// A `Progress` not yet sent (coalesced: only the latest matters).
    pending_progress: Option<i64>,
    high_watermark: Option<i64>,
    duplicates: u64,
    transmit: VecDeque<LinkFrame>,
    events: VecDeque<PullEvent>,
    clock: Clock,
}

impl MirrorPull {
    /// A session about to send `Hello` then `Subscribe { from_offset: cfg.resume_from }`.
    pub fn new(cfg: PullConfig, now: Duration) -> Self {
        let mut transmit = VecDeque::with_capacity(4);
        transmit.push_back(LinkFrame::hello(cfg.local_region.clone()));
        transmit.push_back(LinkFrame::Subscribe {
            topic: cfg.topic.clone(),
            partition: cfg.partition,
            from_offset: cfg.resume_from,
        });
        MirrorPull {
            state: PullState::Handshaking,
            next_offset: cfg.resume_from,
            written: cfg.resume_from,
            pending_progress: None,
            high_watermark: None,
            duplicates: 0,
            transmit,
            events: VecDeque::new(),
            clock: Clock::new(cfg.timers, now),
            cfg,
        }
    }

    /// The next frame to send, if any.
    pub fn poll_transmit(&mut self) -> Option<LinkFrame> {
        if let Some(f) = self.transmit.pop_front() {
            return Some(f);
        }
        let next_offset = self.pending_progress.take()?;
        Some(LinkFrame::Progress {
            partition: self.cfg.partition,
            next_offset,
        })
    }

    /// The next event for the caller, if any.
    pub fn poll_event(&mut self) -> Option<PullEvent> {
        self.events.pop_front()
    }

    /// Takes one frame from the origin, received at `now`.
    pub fn handle_frame(&mut self, now: Duration, frame: LinkFrame) -> Result<(), SessionError> {
        if self.state == PullState::Closed {
            return Err(SessionError::Closed);
        }
        self.clock.last_recv = now;
        let res = match (self.state, frame) {
            (_, LinkFrame::Error { code, message }) => {
                self.on_peer_error(code, message);
                Ok(())
            }
            (
                PullState::Handshaking,
                LinkFrame::Hello {
                    magic,
                    protocol_version,
                    region,
                    codec_version,
                },
            ) => self.on_hello(now, magic, protocol_version, region, codec_version),
            (
                PullState::Streaming,
                LinkFrame::Batch {
                    partition,
                    records,
                    high_watermark,
                },
            ) => self.on_batch(partition, records, high_watermark),
            (PullState::Streaming, LinkFrame::Heartbeat { .. }) => Ok(()),
            (state, other) => Err(SessionError::Unexpected {
                frame: other.kind(),
                state: match state {
                    PullState::Handshaking => "before the origin's hello",
                    _ => "from the origin",
                },
            }),
        };
        res.map_err(|e| self.fail(e))
    }

    /// Everything below `next_offset` is durably written to the mirror partition; queues a
    /// `Progress` for the origin. Values at or below an earlier report are ignored.
    pub fn handle_written(&mut self, next_offset: i64) {
        if next_offset <= self.written {
            return;
        }
        self.written = next_offset;
        if self.state == PullState::Streaming {
            self.pending_progress = Some(next_offset);
        }
    }

    /// Fires due timers: queues a heartbeat, or declares the origin silent.
    pub fn handle_timeout(&mut self, now: Duration) {
        if self.state == PullState::Closed {
            return;
        }
        match self.clock.tick(now) {
            Tick::Nothing => {}
            Tick::Heartbeat(now_ms) => self.transmit.push_back(LinkFrame::Heartbeat { now_ms }),
            Tick::PeerSilent => {
                self.state = PullState::Closed;
                self.pending_progress = None;
                self.transmit.clear();
                self.events.push_back(PullEvent::PeerSilent);
            }
        }
    }

    /// When [`MirrorPull::handle_timeout`] must next be called; `None` once closed.
    pub fn poll_timeout(&self) -> Option<Duration> {
        (self.state != PullState::Closed).then(|| self.clock.poll_timeout())
    }

    /// Ends the session from this side: queues `Error { code, message }` for the origin.
    /// Use it for local failures (a codec error on the stream, the mirror topic unwritable).
    pub fn close(&mut self, code: LinkErrorCode, message: impl Into<String>) {
        if self.state != PullState::Closed {
            self.close_with(LinkFrame::error(code, message));
        }
    }

    /// One past the last offset delivered (or `resume_from` if none yet; `to + 1` after a
    /// gap): where a new session should resume if everything delivered gets written.
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    /// The highest `next_offset` reported through [`MirrorPull::handle_written`].
    pub fn written_offset(&self) -> i64 {
        self.written
    }

    /// The origin's last reported high watermark.
    pub fn high_watermark(&self) -> Option<i64> {
        self.high_watermark
    }

    /// Records the origin has that this session has not delivered yet.
    pub fn lag(&self) -> Option<i64> {
        self.high_watermark
            .map(|hw| hw.saturating_sub(self.next_offset).max(0))
    }

    /// Records dropped as duplicates (offset below `next_offset`) so far.
    pub fn duplicates_dropped(&self) -> u64 {
        self.duplicates
    }

    /// True once the handshake is done and the session is not closed.
    pub fn is_ready(&self) -> bool {
        self.state == PullState::Streaming
    }

    /// True once the session ended (refused, failed, closed, timed out, or the peer's
    /// `Error`): only already-queued frames and events remain.
    pub fn is_closed(&self) -> bool {
        self.state == PullState::Closed
    }

    /// What this session was created with.
    pub fn config(&self) -> &PullConfig {
        &self.cfg
    }

    fn on_hello(
        &mut self,
        now: Duration,
        magic: [u8; 4],
        protocol_version: u16,
        region: String,
        codec_version: u16,
    ) -> Result<(), SessionError> {
        check_hello(magic, protocol_version, codec_version)?;
        let expected = self.cfg.via.as_ref().unwrap_or(&self.cfg.origin);
        if region != *expected {
            return Err(SessionError::WrongRegion {
                expected: expected.clone(),
                got: region,
            });
        }
        self.state = PullState::Streaming;
        self.clock.start_heartbeats(now);
        self.events.push_back(PullEvent::Ready);
        Ok(())
    }

    fn on_batch(
        &mut self,
        partition: i32,
        records: Vec<LinkRecord>,
        high_watermark: i64,
    ) -> Result<(), SessionError> {
        if partition != self.cfg.partition {
            return Err(SessionError::WrongPartition {
                expected: self.cfg.partition,
                got: partition,
            });
        }
        // Nothing changes unless the whole batch is valid.
        let mut next_offset = self.next_offset;
        let mut duplicates = 0;
        let mut fresh = Vec::with_capacity(records.len());
        for r in records {
            if r.offset < next_offset {
                duplicates += 1;
                continue;
            }
            let Some(next) = r.offset.checked_add(1) else {
                return Err(SessionError::Invalid(format!("record offset {}", r.offset)));
            };
            next_offset = next;
            fresh.push(r);
        }
        self.next_offset = next_offset;
        self.duplicates += duplicates;
        if !fresh.is_empty() {
            self.push_records(fresh);
        }
        if self.high_watermark != Some(high_watermark) {
            self.high_watermark = Some(high_watermark);
            self.events.push_back(PullEvent::Lag { high_watermark });
        }
        Ok(())
    }

    /// Queues `fresh` records, joining them to the `Records` event already waiting if
    /// only `Lag` events came after it.
    ///
    /// Why: the origin sends small batches when records trickle in (it does not hold a
    /// lone chat message back), and the caller appends each `Records` event with one
    /// acknowledged write. Without joining, a receiver that read many small frames while
    /// its previous append was in flight would write them one acknowledged append each, so
    /// a partition could mirror no faster than one batch per append round trip (at
    /// 1,000 msg/s over 8 partitions: a batch every ~8 ms). Joined, one append takes
    /// everything that arrived meanwhile, and the batch grows with the backlog. Bounded by
    /// what the caller feeds in before it polls events again (the daemon reads at most
    /// `READ_BUDGET` bytes in between).
    fn push_records(&mut self, mut fresh: Vec<LinkRecord>) {
        for event in self.events.iter_mut().rev() {
            match event {
                PullEvent::Lag { .. } => continue,
                PullEvent::Records(waiting) => {
                    waiting.append(&mut fresh);
                    return;
                }
                _ => break,
            }
        }
        self.events.push_back(PullEvent::Records(fresh));
    }

    fn on_peer_error(&mut self, code: LinkErrorCode, message: String) {
        // The origin has closed the stream: nothing more is worth sending.
        self.state = PullState::Closed;
        self.pending_progress = None;
        self.transmit.clear();
        match code {
            LinkErrorCode::OffsetOutOfRange { earliest } if earliest > self.next_offset => {
                self.events.push_back(PullEvent::Gap {
                    from: self.next_offset,
                    to: earliest - 1,
                });
                self.next_offset = earliest;
            }
            _ => self
                .events
                .push_back(PullEvent::PeerError { code, message }),
        }
    }

    fn fail(&mut self, e: SessionError) -> SessionError {
        self.close_with(LinkFrame::error(e.code(), e.to_string()));
        e
    }

    /// Flushes a pending `Progress`, queues `last`, and closes.
    fn close_with(&mut self, last: LinkFrame) {
        if let Some(next_offset) = self.pending_progress.take() {
            self.transmit.push_back(LinkFrame::Progress {
                partition: self.cfg.partition,
                next_offset,
            });
        }
        self.transmit.push_back(last);
        self.state = PullState::Closed;
    }
}

/// What a [`MirrorServe`] serves and to whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeConfig {
    /// This (origin) region's name, sent in our `Hello`. A peer claiming it is refused.
    pub local_region: String,
    /// The local topic, served to every peer.
    pub topic: String,
    /// Mirror topics of other regions served too (`dtfed.mirror.<O>`, relaying: see
    /// `docs/PROTOCOL.md`, "Relays"); empty unless this region serves relays. The caller
    /// decides, on [`ServeEvent::Subscribe`], whether this peer may have that one.
    pub relayed_topics: Vec<String>,
    /// The region the transport authenticated (the peer certificate's name), if any: a
    /// `Hello` naming another region is refused with `Forbidden`.
    pub peer_region: Option<String>,
    /// Budget for one `Batch` payload; a record larger than the budget goes alone in its
    /// batch. Capped so a batch always fits in one frame.
    pub max_batch_bytes: usize,
    /// Heartbeat and dead-peer timers.
    pub timers: LinkTimers,
}

impl ServeConfig {
    /// A config with default timers and batch budget, and no authenticated peer region.
    pub fn new(local_region: impl Into<String>, topic: impl Into<String>) -> Self {
        ServeConfig {
            local_region: local_region.into(),
            topic: topic.into(),
            relayed_topics: Vec::new(),
            peer_region: None,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            timers: LinkTimers::default(),
        }
    }
}

/// What a [`MirrorServe`] tells its caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServeEvent {
    /// Start reading `topic`/`partition` from `from_offset` and pass what is read to
    /// [`MirrorServe::queue_records`]. If the partition does not exist or the offset is not
    /// retained, answer with [`MirrorServe::close`] (`UnknownPartition`,
    /// `OffsetOutOfRange { earliest }`).
    Subscribe {
        topic: String,
        partition: i32,
        from_offset: i64,
    },
    /// The receiver asks how many partitions `topic` (the served topic) has: answer with
    /// [`MirrorServe::describe`] (or [`MirrorServe::close`] if it cannot be told).
    Describe { topic: String },
    /// The receiver asks for the digest of `partition` over offsets `[from_offset,
    /// to_offset)`: answer with [`MirrorServe::digested`] (or [`MirrorServe::close`]).
    Digest {
        partition: i32,
        from_offset: i64,
        to_offset: i64,
    },
    /// The receiver durably holds everything below `next_offset` (for lag metrics).
    Progress { next_offset: i64 },
    /// The receiver ended the stream. The session is closed.
    PeerError {
        /// The peer's error code.
        code: LinkErrorCode,
        message: String,
    },
    /// No frame from the receiver for `idle_timeout`. The session is closed.
    PeerSilent,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServeState {
    AwaitHello,
    AwaitSubscribe,
    Serving {
        partition: i32,
    },
    /// A `Describe` was received; waiting for [`MirrorServe::describe`].
    Describing,
    /// A `Digest` was received; waiting for [`MirrorServe::digested`].
    Digesting {
        partition: i32,
        from_offset: i64,
        to_offset: i64,
    },
    Closed,
}

/// The serving side of one mirror stream: checks the handshake, then turns records read
/// from the local log into `Batch` frames. Stateless beyond the stream: any daemon of the
/// origin can serve any partition.
#[derive(Debug)]
pub struct MirrorServe {
    cfg: ServeConfig,
    state: ServeState,
    peer_region: Option<String>,
    /// The topic a `Describe` asked about, until answered.
    described: Option<String>,
    last_high_watermark: Option<i64>,
    /// Frames to send, with their estimated payload size.
    transmit: VecDeque<(LinkFrame, usize)>,
    queued_bytes: usize,
    events: VecDeque<ServeEvent>,
    clock: Clock,
}

impl MirrorServe {
    /// A session waiting for the receiver's `Hello`.
    pub fn new(cfg: ServeConfig, now: Duration) -> Self {
        MirrorServe {
            state: ServeState::AwaitHello,
            peer_region: None,
            described: None,
            last_high_watermark: None,
            transmit: VecDeque::new(),
            queued_bytes: 0,
            events: VecDeque::new(),
            clock: Clock::new(cfg.timers, now),
            cfg,
        }
    }

    /// The next frame to send, if any.
    pub fn poll_transmit(&mut self) -> Option<LinkFrame> {
        let (frame, size) = self.transmit.pop_front()?;
        self.queued_bytes = self.queued_bytes.saturating_sub(size);
        Some(frame)
    }

    /// The next event for the caller, if any.
    pub fn poll_event(&mut self) -> Option<ServeEvent> {
        self.events.pop_front()
    }

    /// Takes one frame from the receiver, received at `now`.
    pub fn handle_frame(&mut self, now: Duration, frame: LinkFrame) -> Result<(), SessionError> {
        if self.state == ServeState::Closed {
            return Err(SessionError::Closed);
        }
        self.clock.last_recv = now;
        let res = match (self.state, frame) {
            (_, LinkFrame::Error { code, message }) => {
                self.state = ServeState::Closed;
                self.transmit.clear();
                self.queued_bytes = 0;
                self.events
                    .push_back(ServeEvent::PeerError { code, message });
                Ok(())
            }
            (
                ServeState::AwaitHello,
                LinkFrame::Hello {
                    magic,
                    protocol_version,
                    region,
                    codec_version,
                },
            ) => self.on_hello(now, magic, protocol_version, region, codec_version),
            (
                ServeState::AwaitSubscribe,
                LinkFrame::Subscribe {
                    topic,
                    partition,
                    from_offset,
                },
            ) => self.on_subscribe(topic, partition, from_offset),
            (ServeState::AwaitSubscribe, LinkFrame::Describe { topic }) => {
                if self.serves(&topic) {
                    self.state = ServeState::Describing;
                    self.described = Some(topic.clone());
                    self.events.push_back(ServeEvent::Describe { topic });
                    Ok(())
                } else {
                    Err(SessionError::UnknownTopic(topic))
                }
            }
            (
                ServeState::AwaitSubscribe,
                LinkFrame::Digest {
                    topic,
                    partition,
                    from_offset,
                    to_offset,
                },
            ) => self.on_digest(topic, partition, from_offset, to_offset),
            (
                ServeState::Serving { partition: ours },
                LinkFrame::Progress {
                    partition,
                    next_offset,
                },
            ) => {
                if partition == ours {
                    self.events.push_back(ServeEvent::Progress { next_offset });
                    Ok(())
                } else {
                    Err(SessionError::WrongPartition {
                        expected: ours,
                        got: partition,
                    })
                }
            }
            (
                ServeState::AwaitSubscribe
                | ServeState::Serving { .. }
                | ServeState::Describing
                | ServeState::Digesting { .. },
                LinkFrame::Heartbeat { .. },
            ) => Ok(()),
            (state, other) => Err(SessionError::Unexpected {
                frame: other.kind(),
                state: match state {
                    ServeState::AwaitHello => "before hello",
                    ServeState::AwaitSubscribe => "before subscribe",
                    _ => "after subscribe",
                },
            }),
        };
        res.map_err(|e| self.fail(e))
    }

    /// Queues `records` (read in order from the subscribed partition) as `Batch` frames of
    /// at most `max_batch_bytes` each, all carrying `high_watermark`. With no records, sends
    /// an empty `Batch` only if the high watermark changed since the last one sent.
    ///
    /// A record too large for any frame closes the session with `Internal` (it cannot be
    /// mirrored, and is never skipped silently) and is returned as an error.
    pub fn queue_records(
        &mut self,
        records: Vec<LinkRecord>,
        high_watermark: i64,
    ) -> Result<(), SessionError> {
        let partition = match self.state {
            ServeState::Serving { partition } => partition,
            ServeState::Closed => return Err(SessionError::Closed),
            _ => return Err(SessionError::NotServing),
        };
        let frame_budget = MAX_RECORD_BYTES;
        if let Some((offset, bytes)) = records
            .iter()
            .map(|r| (r.offset, record_len_bound(r)))
            .find(|&(_, n)| n > frame_budget)
        {
            return Err(self.fail(SessionError::RecordTooLarge { offset, bytes }));
        }
        if records.is_empty() {
            if self.last_high_watermark != Some(high_watermark) {
                self.last_high_watermark = Some(high_watermark);
                self.push_batch(partition, Vec::new(), 0, high_watermark);
            }
            return Ok(());
        }
        self.last_high_watermark = Some(high_watermark);
        let budget = self.cfg.max_batch_bytes.clamp(1, frame_budget);
        let mut batch = Vec::new();
        let mut size = 0;
        for r in records {
            let n = record_len_bound(&r);
            if !batch.is_empty() && size + n > budget {
                self.push_batch(partition, std::mem::take(&mut batch), size, high_watermark);
                size = 0;
            }
            size += n;
            batch.push(r);
        }
        self.push_batch(partition, batch, size, high_watermark);
        Ok(())
    }

    /// Answers a [`ServeEvent::Describe`]: the served topic has `partitions` partitions.
    /// The session ends after the answer.
    pub fn describe(&mut self, partitions: i32) -> Result<(), SessionError> {
        match self.state {
            ServeState::Describing => {}
            ServeState::Closed => return Err(SessionError::Closed),
            _ => return Err(SessionError::NotServing),
        }
        let frame = LinkFrame::Described {
            topic: self
                .described
                .take()
                .unwrap_or_else(|| self.cfg.topic.clone()),
            partitions,
        };
        self.push(frame, 0);
        self.state = ServeState::Closed;
        Ok(())
    }

    fn on_digest(
        &mut self,
        topic: String,
        partition: i32,
        from_offset: i64,
        to_offset: i64,
    ) -> Result<(), SessionError> {
        if topic != self.cfg.topic {
            return Err(SessionError::UnknownTopic(topic));
        }
        if partition < 0 || from_offset < 0 || to_offset < from_offset {
            return Err(SessionError::Invalid(format!(
                "digest of partition {partition} over [{from_offset}, {to_offset})"
            )));
        }
        self.state = ServeState::Digesting {
            partition,
            from_offset,
            to_offset,
        };
        self.events.push_back(ServeEvent::Digest {
            partition,
            from_offset,
            to_offset,
        });
        Ok(())
    }

    /// Answers a [`ServeEvent::Digest`]: the range holds `count` records whose digest is
    /// `sha256`. The session ends after the answer.
    pub fn digested(&mut self, count: u64, sha256: [u8; 32]) -> Result<(), SessionError> {
        let (partition, from_offset, to_offset) = match self.state {
            ServeState::Digesting {
                partition,
                from_offset,
                to_offset,
            } => (partition, from_offset, to_offset),
            ServeState::Closed => return Err(SessionError::Closed),
            _ => return Err(SessionError::NotServing),
        };
        self.push(
            LinkFrame::Digested {
                partition,
                from_offset,
                to_offset,
                count,
                sha256,
            },
            0,
        );
        self.state = ServeState::Closed;
        Ok(())
    }

    /// Fires due timers: queues a heartbeat, or declares the receiver silent.
    pub fn handle_timeout(&mut self, now: Duration) {
        if self.state == ServeState::Closed {
            return;
        }
        match self.clock.tick(now) {
            Tick::Nothing => {}
            Tick::Heartbeat(now_ms) => self.push(LinkFrame::Heartbeat { now_ms }, 16),
            Tick::PeerSilent => {
                self.state = ServeState::Closed;
                self.transmit.clear();
                self.queued_bytes = 0;
                self.events.push_back(ServeEvent::PeerSilent);
            }
        }
    }

    /// When [`MirrorServe::handle_timeout`] must next be called; `None` once closed.
    pub fn poll_timeout(&self) -> Option<Duration> {
        (self.state != ServeState::Closed).then(|| self.clock.poll_timeout())
    }

    /// Ends the session from this side with `Error { code, message }`, sent after what is
    /// already queued. Use it to answer a [`ServeEvent::Subscribe`] that cannot be served
    /// (`UnknownPartition`, `OffsetOutOfRange { earliest }`, `Unavailable`).
    pub fn close(&mut self, code: LinkErrorCode, message: impl Into<String>) {
        if self.state != ServeState::Closed {
            self.push(LinkFrame::error(code, message), 0);
            self.state = ServeState::Closed;
        }
    }

    /// Estimated bytes queued in [`MirrorServe::poll_transmit`]: stop reading the log while
    /// this is above what the stream can absorb.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// The receiver's region, once its `Hello` was accepted.
    pub fn peer_region(&self) -> Option<&str> {
        self.peer_region.as_deref()
    }

    /// The partition being served, once subscribed.
    pub fn partition(&self) -> Option<i32> {
        match self.state {
            ServeState::Serving { partition } => Some(partition),
            _ => None,
        }
    }

    /// True once the session ended (refused, failed, closed, timed out, or the peer's
    /// `Error`): only already-queued frames and events remain.
    pub fn is_closed(&self) -> bool {
        self.state == ServeState::Closed
    }

    /// What this session was created with.
    pub fn config(&self) -> &ServeConfig {
        &self.cfg
    }

    fn on_hello(
        &mut self,
        now: Duration,
        magic: [u8; 4],
        protocol_version: u16,
        region: String,
        codec_version: u16,
    ) -> Result<(), SessionError> {
        check_hello(magic, protocol_version, codec_version)?;
        if region.is_empty() {
            return Err(SessionError::Invalid("empty region in hello".into()));
        }
        if region == self.cfg.local_region {
            return Err(SessionError::Forbidden(region));
        }
        if let Some(expected) = &self.cfg.peer_region {
            if *expected != region {
                return Err(SessionError::WrongRegion {
                    expected: expected.clone(),
                    got: region,
                });
            }
        }
        // The versions were checked equal to ours: echo them.
        self.push(LinkFrame::hello(self.cfg.local_region.clone()), 0);
        self.peer_region = Some(region);
        self.state = ServeState::AwaitSubscribe;
        self.clock.start_heartbeats(now);
        Ok(())
    }

    /// The local topic, or one of the relayed mirror topics.
    fn serves(&self, topic: &str) -> bool {
        topic == self.cfg.topic || self.cfg.relayed_topics.iter().any(|t| t == topic)
    }

    fn on_subscribe(
        &mut self,
        topic: String,
        partition: i32,
        from_offset: i64,
    ) -> Result<(), SessionError> {
        if !self.serves(&topic) {
            return Err(SessionError::UnknownTopic(topic));
        }
        if partition < 0 {
            return Err(SessionError::UnknownPartition(partition));
        }
        if from_offset < 0 {
            return Err(SessionError::Invalid(format!("from_offset {from_offset}")));
        }
        self.state = ServeState::Serving { partition };
        self.events.push_back(ServeEvent::Subscribe {
            topic,
            partition,
            from_offset,
        });
        Ok(())
    }

    fn push_batch(
        &mut self,
        partition: i32,
        records: Vec<LinkRecord>,
        size: usize,
        high_watermark: i64,
    ) {
        self.push(
            LinkFrame::Batch {
                partition,
                records,
                high_watermark,
            },
            size + BATCH_OVERHEAD_BOUND,
        );
    }

    fn push(&mut self, frame: LinkFrame, size: usize) {
        self.queued_bytes += size;
        self.transmit.push_back((frame, size));
    }

    fn fail(&mut self, e: SessionError) -> SessionError {
        self.close(e.code(), e.to_string());
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::codec::{encode, FrameDecoder, MAX_FRAME_BYTES};

    const SEC: Duration = Duration::from_secs(1);
    const TOPIC: &str = "dtfed.local";

    /// splitmix64: a small deterministic generator for the simulated network and origin.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in `lo..=hi`.
        fn range(&mut self, lo: usize, hi: usize) -> usize {
            lo + (self.next() % (hi - lo + 1) as u64) as usize
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.next() % 100 < percent
        }
    }

    fn record(offset: i64) -> LinkRecord {
        LinkRecord {
            offset,
            timestamp_ms: 1_700_000_000_000_i64.wrapping_add(offset),
            key: format!("room-{}", offset % 7).into_bytes(),
            headers: vec![("dtfed-origin".into(), b"seoul".to_vec())],
            value: format!("{{\"from\":\"p\",\"ts\":0,\"body\":{offset}}}").into_bytes(),
        }
    }

    fn pull_at(resume_from: i64) -> MirrorPull {
        MirrorPull::new(
            PullConfig::new("tokyo", "seoul", TOPIC, 3, resume_from),
            Duration::ZERO,
        )
    }

    fn serve() -> MirrorServe {
        MirrorServe::new(ServeConfig::new("seoul", TOPIC), Duration::ZERO)
    }

    /// Moves every frame `from` transmits into `to`, through the codec.
    fn pump<F, G>(mut from: F, mut to: G) -> Vec<Result<(), SessionError>>
    where
        F: FnMut() -> Option<LinkFrame>,
        G: FnMut(LinkFrame) -> Result<(), SessionError>,
    {
        let mut wire = Vec::new();
        while let Some(f) = from() {
            encode(&f, &mut wire).expect("encode");
        }
        let mut dec = FrameDecoder::new();
        dec.extend(&wire);
        let mut out = Vec::new();
        while let Some(f) = dec.next_frame().expect("decode") {
            out.push(to(f));
        }
        out
    }

    fn drain<T>(mut poll: impl FnMut() -> Option<T>) -> Vec<T> {
        std::iter::from_fn(&mut poll).collect()
    }

    /// Pull and serve sessions joined through the codec: handshake done, subscribed.
    fn connected(resume_from: i64) -> (MirrorPull, MirrorServe) {
        let (mut p, mut s) = (pull_at(resume_from), serve());
        let now = Duration::ZERO;
        for r in pump(|| p.poll_transmit(), |f| s.handle_frame(now, f)) {
            r.expect("serve accepts hello and subscribe");
        }
        for r in pump(|| s.poll_transmit(), |f| p.handle_frame(now, f)) {
            r.expect("pull accepts hello");
        }
        assert_eq!(drain(|| p.poll_event()), [PullEvent::Ready]);
        assert_eq!(
            drain(|| s.poll_event()),
            [ServeEvent::Subscribe {
                topic: TOPIC.into(),
                partition: 3,
                from_offset: resume_from
            }]
        );
        assert_eq!(s.peer_region(), Some("tokyo"));
        (p, s)
    }

    /// One simulated link run: an origin of 1000 records with sparse offsets, served in
    /// random batch sizes with re-sent (duplicate) ranges, bytes cut at random points,
    /// connections cut at random and resumed from the mirror's tail.
    fn mirror_through_flaky_link(seed: u64) -> (usize, usize) {
        let mut rng = Rng(seed);
        let mut origin = Vec::new();
        let mut offset = rng.range(0, 5) as i64;
        for _ in 0..1000 {
            origin.push(record(offset));
            offset += rng.range(1, 3) as i64;
        }
        let high_watermark = offset;
        let mut mirror: Vec<LinkRecord> = Vec::new();
        let mut now = Duration::ZERO;
        let mut connections = 0;
        let mut duplicates = 0;

        while mirror.len() < origin.len() {
            connections += 1;
            assert!(connections < 200, "seed {seed}: no progress");
            let resume = mirror.last().map_or(0, |r| r.offset + 1);
            let mut p = MirrorPull::new(PullConfig::new("tokyo", "seoul", TOPIC, 3, resume), now);
            let mut s = MirrorServe::new(
                ServeConfig {
                    max_batch_bytes: rng.range(100, 4000),
                    ..ServeConfig::new("seoul", TOPIC)
                },
                now,
            );
            let (mut to_serve, mut to_pull) = (Vec::new(), Vec::new());
            let (mut serve_dec, mut pull_dec) = (FrameDecoder::new(), FrameDecoder::new());
            let mut reader: Option<usize> = None;

            for _ in 0..400 {
                while let Some(f) = p.poll_transmit() {
                    encode(&f, &mut to_serve).expect("encode");
                }
                let n = rng.range(0, to_serve.len());
                serve_dec.extend(&to_serve[..n]);
                to_serve.drain(..n);
                while let Some(f) = serve_dec.next_frame().expect("serve decodes") {
                    s.handle_frame(now, f).expect("serve accepts");
                }
                while let Some(ev) = s.poll_event() {
                    if let ServeEvent::Subscribe { from_offset, .. } = ev {
                        assert_eq!(from_offset, resume);
                        let at = origin.partition_point(|r| r.offset < from_offset);
                        // Sometimes start early: the pull side must drop what it has.
                        reader = Some(at.saturating_sub(rng.range(0, 3)));
                    }
                }
                if let Some(pos) = reader.as_mut() {
                    if rng.chance(20) {
                        *pos = pos.saturating_sub(rng.range(1, 20)); // re-send a range
                    }
                    let n = rng.range(0, 50).min(origin.len() - *pos);
                    let batch = origin[*pos..*pos + n].to_vec();
                    duplicates += batch
                        .iter()
                        .filter(|r| mirror.last().is_some_and(|m| r.offset <= m.offset))
                        .count();
                    *pos += n;
                    s.queue_records(batch, high_watermark).expect("queue");
                }
                while let Some(f) = s.poll_transmit() {
                    encode(&f, &mut to_pull).expect("encode");
                }
                let n = rng.range(0, to_pull.len());
                pull_dec.extend(&to_pull[..n]);
                to_pull.drain(..n);
                while let Some(f) = pull_dec.next_frame().expect("pull decodes") {
                    p.handle_frame(now, f).expect("pull accepts");
                }
                while let Some(ev) = p.poll_event() {
                    match ev {
                        PullEvent::Records(rs) => {
                            for r in rs {
                                if let Some(last) = mirror.last() {
                                    assert!(r.offset > last.offset, "seed {seed}: order/dup");
                                }
                                mirror.push(r);
                            }
                            p.handle_written(mirror.last().map_or(0, |r| r.offset + 1));
                        }
                        PullEvent::Ready | PullEvent::Lag { .. } => {}
                        other => panic!("seed {seed}: unexpected {other:?}"),
                    }
                }
                now += Duration::from_millis(100);
                p.handle_timeout(now);
                s.handle_timeout(now);
                if mirror.len() == origin.len() || rng.chance(4) {
                    break; // done, or the link is cut: bytes in flight are lost
                }
            }
        }
        assert_eq!(mirror, origin, "seed {seed}");
        (connections, duplicates)
    }

    #[test]
    fn a_thousand_records_arrive_exactly_once_in_order() {
        let (mut connections, mut duplicates) = (0, 0);
        for seed in 1..=20 {
            let (c, d) = mirror_through_flaky_link(seed);
            connections += c;
            duplicates += d;
        }
        // The runs did exercise reconnects and re-sent records.
        assert!(connections > 40, "{connections} connections");
        assert!(duplicates > 100, "{duplicates} duplicates");
    }

    #[test]
    fn duplicates_and_sparse_offsets_within_one_session() {
        let (mut p, mut s) = connected(10);
        let recs = |offs: &[i64]| offs.iter().map(|&o| record(o)).collect::<Vec<_>>();
        s.queue_records(recs(&[8, 9, 10, 12]), 20).expect("queue");
        s.queue_records(recs(&[10, 12, 15, 15, 14, 19]), 20)
            .expect("queue");
        for r in pump(|| s.poll_transmit(), |f| p.handle_frame(SEC, f)) {
            r.expect("accepted");
        }
        // Records not yet taken are joined into one event (one append), across `Lag`.
        assert_eq!(
            drain(|| p.poll_event()),
            [
                PullEvent::Records(recs(&[10, 12, 15, 19])),
                PullEvent::Lag { high_watermark: 20 },
            ]
        );
        assert_eq!(p.next_offset(), 20);
        assert_eq!(p.lag(), Some(0));
        assert_eq!(p.duplicates_dropped(), 6);
    }

    #[test]
    fn records_are_joined_until_taken_but_never_across_other_events() {
        let recs = |offs: &[i64]| offs.iter().map(|&o| record(o)).collect::<Vec<_>>();
        let (mut p, mut s) = connected(0);
        // Many one-record batches (a trickling origin) arrive while the caller is busy.
        for o in 0..50 {
            s.queue_records(recs(&[o]), o + 1).expect("queue");
        }
        for r in pump(|| s.poll_transmit(), |f| p.handle_frame(SEC, f)) {
            r.expect("accepted");
        }
        let events = drain(|| p.poll_event());
        let records: Vec<&PullEvent> = events
            .iter()
            .filter(|e| matches!(e, PullEvent::Records(_)))
            .collect();
        assert_eq!(
            records,
            [&PullEvent::Records(recs(&(0..50).collect::<Vec<_>>()))]
        );
        assert_eq!(events.last(), Some(&PullEvent::Lag { high_watermark: 50 }));

        // Once taken, the next records start a new event.
        s.queue_records(recs(&[50, 51]), 52).expect("queue");
        for r in pump(|| s.poll_transmit(), |f| p.handle_frame(SEC, f)) {
            r.expect("accepted");
        }
        assert_eq!(
            drain(|| p.poll_event()),
            [
                PullEvent::Records(recs(&[50, 51])),
                PullEvent::Lag { high_watermark: 52 }
            ]
        );

        // Never joined across an event that ends or changes the stream.
        let (mut p, _) = connected(0);
        p.handle_frame(
            SEC,
            LinkFrame::Batch {
                partition: 3,
                records: recs(&[0, 1]),
                high_watermark: 5,
            },
        )
        .expect("batch");
        p.handle_frame(SEC, LinkFrame::error(LinkErrorCode::Unavailable, "bye"))
            .expect("error frame");
        let events = drain(|| p.poll_event());
        assert!(matches!(events.last(), Some(PullEvent::PeerError { .. })));
        assert_eq!(events[0], PullEvent::Records(recs(&[0, 1])));
    }

    #[test]
    fn progress_is_coalesced_and_reaches_the_server() {
        let (mut p, mut s) = connected(0);
        p.handle_written(5);
        p.handle_written(9);
        p.handle_written(7); // older: ignored
        assert_eq!(
            drain(|| p.poll_transmit()),
            [LinkFrame::Progress {
                partition: 3,
                next_offset: 9
            }]
        );
        s.handle_frame(
            SEC,
            LinkFrame::Progress {
                partition: 3,
                next_offset: 9,
            },
        )
        .expect("progress");
        assert_eq!(
            drain(|| s.poll_event()),
            [ServeEvent::Progress { next_offset: 9 }]
        );
        assert_eq!(p.written_offset(), 9);
    }

    #[test]
    fn batches_respect_the_byte_budget() {
        let mut s = MirrorServe::new(
            ServeConfig {
                max_batch_bytes: 1000,
                ..ServeConfig::new("seoul", TOPIC)
            },
            Duration::ZERO,
        );
        s.handle_frame(Duration::ZERO, LinkFrame::hello("tokyo"))
            .expect("hello");
        s.handle_frame(
            Duration::ZERO,
            LinkFrame::Subscribe {
                topic: TOPIC.into(),
                partition: 0,
                from_offset: 0,
            },
        )
        .expect("subscribe");
        let mut big = record(50);
        big.value = vec![b'x'; 5000];
        let mut recs: Vec<_> = (0..50).map(record).collect();
        recs.push(big);
        s.queue_records(recs, 51).expect("queue");
        assert!(s.queued_bytes() > 5000);
        let frames = drain(|| s.poll_transmit());
        assert_eq!(s.queued_bytes(), 0);
        assert!(matches!(frames[0], LinkFrame::Hello { .. }));
        let mut offsets = Vec::new();
        for f in &frames[1..] {
            let LinkFrame::Batch { records, .. } = f else {
                panic!("{f:?}")
            };
            let bytes = crate::link::codec::encode_to_vec(f).expect("encode").len();
            assert!(bytes <= 1000 + 4 || records.len() == 1, "{bytes}");
            offsets.extend(records.iter().map(|r| r.offset));
        }
        assert!(frames.len() > 3);
        assert_eq!(offsets, (0..=50).collect::<Vec<_>>());
    }

    #[test]
    fn empty_batches_only_report_a_new_high_watermark() {
        let (_, mut s) = connected(0);
        s.queue_records(Vec::new(), 7).expect("queue");
        s.queue_records(Vec::new(), 7).expect("queue");
        s.queue_records(vec![record(7)], 8).expect("queue");
        s.queue_records(Vec::new(), 8).expect("queue");
        assert_eq!(
            drain(|| s.poll_transmit()),
            [
                LinkFrame::Batch {
                    partition: 3,
                    records: vec![],
                    high_watermark: 7
                },
                LinkFrame::Batch {
                    partition: 3,
                    records: vec![record(7)],
                    high_watermark: 8
                },
            ]
        );
    }

    #[test]
    fn oversize_record_closes_with_internal_error() {
        let (_, mut s) = connected(0);
        let mut huge = record(0);
        huge.value = vec![0; MAX_FRAME_BYTES];
        assert!(matches!(
            s.queue_records(vec![huge], 1),
            Err(SessionError::RecordTooLarge { offset: 0, .. })
        ));
        assert!(s.is_closed());
        let frames = drain(|| s.poll_transmit());
        assert!(matches!(
            frames.as_slice(),
            [LinkFrame::Error {
                code: LinkErrorCode::Internal,
                ..
            }]
        ));
    }

    /// Feeds `frame` to a fresh serve session and returns its error and what it sent back.
    fn serve_refuses(frames: Vec<LinkFrame>) -> (SessionError, Vec<LinkFrame>) {
        let mut s = serve();
        let mut err = None;
        let results = pump(
            {
                let mut it = frames.into_iter();
                move || it.next()
            },
            |f| s.handle_frame(Duration::ZERO, f),
        );
        for r in results {
            if let Err(e) = r {
                err.get_or_insert(e);
            }
        }
        assert!(s.is_closed());
        (err.expect("refused"), drain(|| s.poll_transmit()))
    }

    fn last_error_code(frames: &[LinkFrame]) -> LinkErrorCode {
        match frames.last() {
            Some(LinkFrame::Error { code, .. }) => *code,
            other => panic!("expected an error frame last, got {other:?}"),
        }
    }

    #[test]
    fn serve_refuses_bad_handshakes() {
        let hello = |magic: [u8; 4], pv: u16, region: &str, cv: u16| LinkFrame::Hello {
            magic,
            protocol_version: pv,
            region: region.into(),
            codec_version: cv,
        };
        let (e, out) = serve_refuses(vec![hello(*b"HTTP", 1, "tokyo", 1)]);
        assert_eq!(e, SessionError::BadMagic(*b"HTTP"));
        assert_eq!(out.len(), 1);
        assert_eq!(last_error_code(&out), LinkErrorCode::BadMagic);

        let (e, out) = serve_refuses(vec![hello(MAGIC, 2, "tokyo", 1)]);
        assert_eq!(
            e,
            SessionError::VersionMismatch {
                protocol: 2,
                codec: 1
            }
        );
        assert_eq!(last_error_code(&out), LinkErrorCode::VersionMismatch);
        let (_, out) = serve_refuses(vec![hello(MAGIC, 1, "tokyo", 9)]);
        assert_eq!(last_error_code(&out), LinkErrorCode::VersionMismatch);

        // A region mirroring itself would loop.
        let (e, out) = serve_refuses(vec![LinkFrame::hello("seoul")]);
        assert_eq!(e, SessionError::Forbidden("seoul".into()));
        assert_eq!(last_error_code(&out), LinkErrorCode::Forbidden);

        let (_, out) = serve_refuses(vec![LinkFrame::hello("")]);
        assert_eq!(last_error_code(&out), LinkErrorCode::ProtocolViolation);

        // Subscribe (or anything) before Hello.
        let sub = |topic: &str, partition: i32, from_offset: i64| LinkFrame::Subscribe {
            topic: topic.into(),
            partition,
            from_offset,
        };
        let (e, out) = serve_refuses(vec![sub(TOPIC, 0, 0)]);
        assert!(matches!(e, SessionError::Unexpected { .. }), "{e}");
        assert_eq!(out.len(), 1, "no hello sent back");
        assert_eq!(last_error_code(&out), LinkErrorCode::ProtocolViolation);
        let (_, out) = serve_refuses(vec![LinkFrame::Heartbeat { now_ms: 0 }]);
        assert_eq!(last_error_code(&out), LinkErrorCode::ProtocolViolation);

        // Mirror topics are not served unless configured as relayed.
        let (e, out) = serve_refuses(vec![
            LinkFrame::hello("tokyo"),
            sub("dtfed.mirror.tokyo", 0, 0),
        ]);
        assert_eq!(e, SessionError::UnknownTopic("dtfed.mirror.tokyo".into()));
        assert!(matches!(out[0], LinkFrame::Hello { .. }));
        assert_eq!(last_error_code(&out), LinkErrorCode::UnknownTopic);

        let (_, out) = serve_refuses(vec![LinkFrame::hello("tokyo"), sub(TOPIC, -1, 0)]);
        assert_eq!(last_error_code(&out), LinkErrorCode::UnknownPartition);
        let (_, out) = serve_refuses(vec![LinkFrame::hello("tokyo"), sub(TOPIC, 0, -5)]);
        assert_eq!(last_error_code(&out), LinkErrorCode::ProtocolViolation);

        // One subscription per stream.
        let (e, out) = serve_refuses(vec![
            LinkFrame::hello("tokyo"),
            sub(TOPIC, 0, 0),
            sub(TOPIC, 1, 0),
        ]);
        assert!(matches!(e, SessionError::Unexpected { .. }), "{e}");
        assert_eq!(last_error_code(&out), LinkErrorCode::ProtocolViolation);

        // Progress for another partition.
        let (e, _) = serve_refuses(vec![
            LinkFrame::hello("tokyo"),
            sub(TOPIC, 0, 0),
            LinkFrame::Progress {
                partition: 1,
                next_offset: 0,
            },
        ]);
        assert_eq!(
            e,
            SessionError::WrongPartition {
                expected: 0,
                got: 1
            }
        );
    }

    #[test]
    fn serve_checks_the_authenticated_region() {
        let mut s = MirrorServe::new(
            ServeConfig {
                peer_region: Some("tokyo".into()),
                ..ServeConfig::new("seoul", TOPIC)
            },
            Duration::ZERO,
        );
        let e = s
            .handle_frame(Duration::ZERO, LinkFrame::hello("paris"))
            .expect_err("refused");
        assert_eq!(
            e,
            SessionError::WrongRegion {
                expected: "tokyo".into(),
                got: "paris".into()
            }
        );
        assert_eq!(
            last_error_code(&drain(|| s.poll_transmit())),
            LinkErrorCode::Forbidden
        );
        assert_eq!(
            s.handle_frame(Duration::ZERO, LinkFrame::hello("tokyo")),
            Err(SessionError::Closed)
        );
    }

    #[test]
    fn pull_refuses_bad_handshakes() {
        // The origin answers as another region.
        let mut p = pull_at(0);
        drain(|| p.poll_transmit());
        let res = pump(
            {
                let mut f = Some(LinkFrame::hello("paris"));
                move || f.take()
            },
            |f| p.handle_frame(SEC, f),
        );
        assert_eq!(
            res,
            [Err(SessionError::WrongRegion {
                expected: "seoul".into(),
                got: "paris".into()
            })]
        );
        assert!(p.is_closed());
        assert_eq!(
            last_error_code(&drain(|| p.poll_transmit())),
            LinkErrorCode::Forbidden
        );

        let mut p = pull_at(0);
        drain(|| p.poll_transmit());
        let e = p
            .handle_frame(
                SEC,
                LinkFrame::Hello {
                    magic: *b"DTFX",
                    protocol_version: 1,
                    region: "seoul".into(),
                    codec_version: 1,
                },
            )
            .expect_err("bad magic");
        assert_eq!(e, SessionError::BadMagic(*b"DTFX"));

        let mut p = pull_at(0);
        let e = p
            .handle_frame(
                SEC,
                LinkFrame::Hello {
                    magic: MAGIC,
                    protocol_version: 1,
                    region: "seoul".into(),
                    codec_version: 2,
                },
            )
            .expect_err("version");
        assert_eq!(
            e,
            SessionError::VersionMismatch {
                protocol: 1,
                codec: 2
            }
        );
        // Hello and Subscribe were still queued: they go out before the refusal.
        let out = drain(|| p.poll_transmit());
        assert_eq!(out.len(), 3);
        assert_eq!(last_error_code(&out), LinkErrorCode::VersionMismatch);

        // A batch before the origin's hello.
        let mut p = pull_at(0);
        let e = p
            .handle_frame(
                SEC,
                LinkFrame::Batch {
                    partition: 3,
                    records: vec![],
                    high_watermark: 0,
                },
            )
            .expect_err("batch before hello");
        assert!(matches!(e, SessionError::Unexpected { .. }));
    }

    #[test]
    fn version_mismatch_reaches_the_pull_side_as_a_peer_error() {
        let mut p = MirrorPull::new(
            PullConfig::new("tokyo", "seoul", TOPIC, 3, 0),
            Duration::ZERO,
        );
        let mut s = serve();
        // Pretend the pull side is a future version.
        let mut frames = drain(|| p.poll_transmit());
        if let LinkFrame::Hello {
            protocol_version, ..
        } = &mut frames[0]
        {
            *protocol_version = 2;
        }
        let res = pump(
            {
                let mut it = frames.into_iter();
                move || it.next()
            },
            |f| s.handle_frame(Duration::ZERO, f),
        );
        assert!(res[0].is_err());
        assert_eq!(res[1], Err(SessionError::Closed), "subscribe after refusal");
        for r in pump(|| s.poll_transmit(), |f| p.handle_frame(SEC, f)) {
            r.expect("an error frame is a legal answer");
        }
        let events = drain(|| p.poll_event());
        assert!(matches!(
            events.as_slice(),
            [PullEvent::PeerError {
                code: LinkErrorCode::VersionMismatch,
                ..
            }]
        ));
        assert!(p.is_closed());
        assert_eq!(p.poll_transmit(), None);
    }

    #[test]
    fn pull_refuses_foreign_partitions_and_overflowing_offsets() {
        let (mut p, _) = connected(0);
        let e = p
            .handle_frame(
                SEC,
                LinkFrame::Batch {
                    partition: 4,
                    records: vec![record(0)],
                    high_watermark: 1,
                },
            )
            .expect_err("wrong partition");
        assert_eq!(
            e,
            SessionError::WrongPartition {
                expected: 3,
                got: 4
            }
        );
        assert_eq!(drain(|| p.poll_event()), []);

        let (mut p, _) = connected(0);
        let e = p
            .handle_frame(
                SEC,
                LinkFrame::Batch {
                    partition: 3,
                    records: vec![record(5), record(i64::MAX)],
                    high_watermark: 1,
                },
            )
            .expect_err("overflow");
        assert!(matches!(e, SessionError::Invalid(_)));
        assert_eq!(p.next_offset(), 0, "a refused batch changes nothing");
        assert_eq!(drain(|| p.poll_event()), []);
        for frame in [
            LinkFrame::hello("seoul"),
            LinkFrame::Heartbeat { now_ms: 0 },
        ] {
            let (mut p, _) = connected(0);
            let r = p.handle_frame(SEC, frame.clone());
            assert_eq!(r.is_err(), matches!(frame, LinkFrame::Hello { .. }));
        }
    }

    #[test]
    fn offset_out_of_range_becomes_a_gap() {
        let (mut p, mut s) = connected(100);
        p.handle_written(100);
        s.close(
            LinkErrorCode::OffsetOutOfRange { earliest: 250 },
            "retention",
        );
        assert!(s.is_closed());
        for r in pump(|| s.poll_transmit(), |f| p.handle_frame(SEC, f)) {
            r.expect("accepted");
        }
        assert_eq!(
            drain(|| p.poll_event()),
            [PullEvent::Gap { from: 100, to: 249 }]
        );
        assert!(p.is_closed());
        assert_eq!(p.next_offset(), 250);
        assert_eq!(p.poll_timeout(), None);

        // Earliest at or below what was asked: not a gap (the origin's log went backwards).
        let (mut p, _) = connected(100);
        p.handle_frame(
            SEC,
            LinkFrame::error(LinkErrorCode::OffsetOutOfRange { earliest: 0 }, "reset"),
        )
        .expect("accepted");
        assert!(matches!(
            drain(|| p.poll_event()).as_slice(),
            [PullEvent::PeerError {
                code: LinkErrorCode::OffsetOutOfRange { earliest: 0 },
                ..
            }]
        ));
    }

    #[test]
    fn heartbeats_flow_and_a_silent_peer_is_declared_dead() {
        let timers = LinkTimers::default();
        let (mut p, mut s) = connected(0);
        assert_eq!(p.poll_timeout(), Some(timers.heartbeat_interval));
        assert_eq!(s.poll_timeout(), Some(timers.heartbeat_interval));
        let mut now = Duration::ZERO;
        // Both sides heartbeat on an idle stream and keep each other alive, well past the
        // idle timeout.
        for _ in 0..20 {
            now = s
                .poll_timeout()
                .expect("open")
                .min(p.poll_timeout().expect("open"));
            s.handle_timeout(now);
            p.handle_timeout(now);
            let hb = LinkFrame::Heartbeat {
                now_ms: now.as_millis() as i64,
            };
            assert_eq!(drain(|| s.poll_transmit()), std::slice::from_ref(&hb));
            assert_eq!(drain(|| p.poll_transmit()), std::slice::from_ref(&hb));
            p.handle_frame(now, hb.clone()).expect("heartbeat");
            s.handle_frame(now, hb).expect("heartbeat");
        }
        assert_eq!(now, 20 * timers.heartbeat_interval);
        assert!(now > timers.idle_timeout);
        assert_eq!(drain(|| p.poll_event()), []);
        assert_eq!(drain(|| s.poll_event()), []);

        // Now the link goes dead both ways: each side gives up idle_timeout after it last
        // heard from the other, having kept heartbeating until then.
        let last_heard = now;
        let mut sent = 0;
        while let Some(t) = p.poll_timeout() {
            assert!(t > now, "timers move forward");
            now = t;
            p.handle_timeout(now);
            sent += drain(|| p.poll_transmit()).len();
        }
        assert_eq!(now, last_heard + timers.idle_timeout);
        assert_eq!(sent, 5, "heartbeats at +5s .. +25s");
        assert_eq!(drain(|| p.poll_event()), [PullEvent::PeerSilent]);
        assert!(p.is_closed());
        assert_eq!(
            p.handle_frame(now, LinkFrame::Heartbeat { now_ms: 0 }),
            Err(SessionError::Closed)
        );
        s.handle_timeout(last_heard + timers.idle_timeout - Duration::from_millis(1));
        assert_eq!(drain(|| s.poll_event()), []);
        s.handle_timeout(last_heard + timers.idle_timeout);
        assert_eq!(drain(|| s.poll_event()), [ServeEvent::PeerSilent]);
        assert!(s.is_closed());
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn handshake_times_out_without_heartbeats() {
        let mut p = pull_at(0);
        drain(|| p.poll_transmit());
        let idle = LinkTimers::default().idle_timeout;
        assert_eq!(p.poll_timeout(), Some(idle));
        p.handle_timeout(idle - Duration::from_millis(1));
        assert_eq!(p.poll_transmit(), None, "no heartbeat before the hellos");
        p.handle_timeout(idle);
        assert_eq!(drain(|| p.poll_event()), [PullEvent::PeerSilent]);

        let mut s = serve();
        s.handle_timeout(idle);
        assert_eq!(drain(|| s.poll_event()), [ServeEvent::PeerSilent]);
        assert_eq!(s.poll_transmit(), None);
    }

    #[test]
    fn queue_records_needs_a_subscription() {
        let mut s = serve();
        assert_eq!(
            s.queue_records(vec![record(0)], 1),
            Err(SessionError::NotServing)
        );
        assert!(!s.is_closed(), "local misuse does not close the stream");
        let (_, mut s) = connected(0);
        s.handle_frame(SEC, LinkFrame::error(LinkErrorCode::Internal, "bye"))
            .expect("error frame");
        assert_eq!(
            s.queue_records(vec![record(0)], 1),
            Err(SessionError::Closed)
        );
        assert_eq!(s.partition(), None);
    }

    #[test]
    fn local_close_flushes_progress_then_the_error() {
        let (mut p, _) = connected(0);
        p.handle_written(4);
        p.close(LinkErrorCode::ProtocolViolation, "garbage on the stream");
        p.close(LinkErrorCode::Internal, "twice");
        assert_eq!(
            drain(|| p.poll_transmit()),
            [
                LinkFrame::Progress {
                    partition: 3,
                    next_offset: 4
                },
                LinkFrame::error(LinkErrorCode::ProtocolViolation, "garbage on the stream"),
            ]
        );
        p.handle_written(9);
        assert_eq!(p.poll_transmit(), None);
    }

    #[test]
    fn a_relay_serves_its_mirror_topics_only_when_configured() {
        const MIRROR: &str = "dtfed.mirror.seoul";
        // Frankfurt relays seoul's mirror topic to tokyo; tokyo expects frankfurt's hello.
        let relay_cfg = ServeConfig {
            relayed_topics: vec![MIRROR.into()],
            ..ServeConfig::new("frankfurt", TOPIC)
        };
        let mut s = MirrorServe::new(relay_cfg, Duration::ZERO);
        let mut p = MirrorPull::new(
            PullConfig {
                via: Some("frankfurt".into()),
                ..PullConfig::new("tokyo", "seoul", MIRROR, 3, 7)
            },
            Duration::ZERO,
        );
        for r in pump(|| p.poll_transmit(), |f| s.handle_frame(Duration::ZERO, f)) {
            r.expect("relay accepts hello and subscribe");
        }
        for r in pump(|| s.poll_transmit(), |f| p.handle_frame(Duration::ZERO, f)) {
            r.expect("puller accepts the relay's hello");
        }
        assert_eq!(drain(|| p.poll_event()), [PullEvent::Ready]);
        assert_eq!(
            drain(|| s.poll_event()),
            [ServeEvent::Subscribe {
                topic: MIRROR.into(),
                partition: 3,
                from_offset: 7
            }]
        );

        // A region without relaying refuses the mirror topic.
        let mut plain = serve();
        let mut p = MirrorPull::new(
            PullConfig::new("tokyo", "seoul", MIRROR, 3, 7),
            Duration::ZERO,
        );
        let results = pump(
            || p.poll_transmit(),
            |f| plain.handle_frame(Duration::ZERO, f),
        );
        assert_eq!(
            results.last(),
            Some(&Err(SessionError::UnknownTopic(MIRROR.into())))
        );

        // Without `via`, a relay's hello is another region than the origin: refused.
        let mut s = MirrorServe::new(
            ServeConfig {
                relayed_topics: vec![MIRROR.into()],
                ..ServeConfig::new("frankfurt", TOPIC)
            },
            Duration::ZERO,
        );
        let mut p = MirrorPull::new(
            PullConfig::new("tokyo", "seoul", MIRROR, 3, 7),
            Duration::ZERO,
        );
        let _ = pump(|| p.poll_transmit(), |f| s.handle_frame(Duration::ZERO, f));
        let results = pump(|| s.poll_transmit(), |f| p.handle_frame(Duration::ZERO, f));
        assert!(matches!(
            results.first(),
            Some(Err(SessionError::WrongRegion { .. }))
        ));
    }

    #[test]
    fn describe_names_the_topic_asked_about() {
        let mut s = MirrorServe::new(
            ServeConfig {
                relayed_topics: vec!["dtfed.mirror.seoul".into()],
                ..ServeConfig::new("frankfurt", TOPIC)
            },
            Duration::ZERO,
        );
        s.handle_frame(Duration::ZERO, LinkFrame::hello("tokyo"))
            .expect("hello");
        s.handle_frame(
            Duration::ZERO,
            LinkFrame::Describe {
                topic: "dtfed.mirror.seoul".into(),
            },
        )
        .expect("describe");
        s.describe(4).expect("answer");
        let frames = drain(|| s.poll_transmit());
        assert_eq!(
            frames.last(),
            Some(&LinkFrame::Described {
                topic: "dtfed.mirror.seoul".into(),
                partitions: 4
            })
        );
    }
}
