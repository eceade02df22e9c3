//! Short reads of mirror partitions, shared by the sink (its tail, before it appends) and by
//! replay of remote origins (a room's records after a cursor): a pool of group-less
//! consumers ([`ProbePool`]), each read on a blocking thread within a deadline, and the
//! reads themselves ([`PartitionReads`]): watermarks, the last readable record, the first
//! record after an origin offset (binary search), and forward range reads.
//!
//! Also the mirror headers (`dtfed-origin`, `dtfed-origin-offset`) as read from a record,
//! and a consumed record turned into what the region link carries ([`link_record`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dtfed_proto::link::LinkRecord;
use dtfed_proto::record::{HEADER_ORIGIN, HEADER_ORIGIN_OFFSET};
use dtfed_regions::mirror::log::LogError;
use rdkafka::admin::AdminClient;
use rdkafka::client::ClientContext;
use rdkafka::config::{FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::Semaphore;

use crate::config::KafkaConfig;
use crate::kafka::settings::mirror_probe_config;
use crate::kafka::{
    drop_off_runtime, is_transient_consumer_error, is_unknown_partition, OffRuntime, TracingContext,
};
use crate::mirror::lock;

/// Probe reads that may run at once per pool (a tail or a replay each); the others wait.
pub const MAX_CONCURRENT_PROBES: usize = 4;

/// Bound on a whole probe read (waiting for a slot included).
pub const PROBE_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on one metadata or watermark request (partition count, open, out-of-range check).
pub const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// How far [`KafkaMirrorLog::tail`] looks back from the high watermark for a readable
/// record, in widening windows (the record at `high - 1` is readable unless something else
/// than dtfed wrote control records there).
pub(crate) const TAIL_WINDOWS: [i64; 4] = [1, 16, 256, 4096];

/// Errors of a watermark query that a leader election or a broker restart causes: asking
/// again shortly succeeds.
pub(crate) fn is_retriable_query_error(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::ReplicaNotAvailable
                | RDKafkaErrorCode::BrokerNotAvailable
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::NetworkException
                | RDKafkaErrorCode::FencedLeaderEpoch
                | RDKafkaErrorCode::UnknownLeaderEpoch
                | RDKafkaErrorCode::OffsetNotAvailable
                | RDKafkaErrorCode::KafkaStorageError
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::OperationTimedOut
        )
    )
}

/// `query(timeout)` (a watermark query), asked again after errors
/// [`is_retriable_query_error`] accepts, until `deadline`. Blocking.
pub(crate) fn query_until(
    deadline: Instant,
    query: impl Fn(Duration) -> Result<(i64, i64), KafkaError>,
) -> Result<(i64, i64), KafkaError> {
    let mut backoff = Duration::from_millis(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match query(left.clamp(Duration::from_millis(100), METADATA_TIMEOUT)) {
            Err(e) if is_retriable_query_error(&e) && Instant::now() + backoff < deadline => {
                tracing::debug!(error = %e, "watermark query failed; asking again");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            result => return result,
        }
    }
}

/// The value of the last header named `name` (the mirror headers put dtfed's own last).
pub(crate) fn last_header<'a>(m: &'a BorrowedMessage<'_>, name: &str) -> Option<&'a [u8]> {
    m.headers()?
        .iter()
        .filter(|h| h.key == name)
        .last()
        .and_then(|h| h.value)
}

/// The first `dtfed-origin` header of `m` naming another region than `origin`, if any.
pub(crate) fn other_origin(m: &BorrowedMessage<'_>, origin: &str) -> Option<String> {
    m.headers()?
        .iter()
        .filter(|h| h.key == HEADER_ORIGIN)
        .map(|h| h.value.unwrap_or_default())
        .find(|v| *v != origin.as_bytes())
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The origin offset a mirror record carries in its `dtfed-origin-offset` header.
pub(crate) fn origin_offset(m: &BorrowedMessage<'_>) -> Option<i64> {
    last_header(m, HEADER_ORIGIN_OFFSET)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|o| *o >= 0)
}

/// A consumed record as the link carries it: every header kept, in order (a header with a
/// null value becomes an empty one; a null key or value an empty one).
pub(crate) fn link_record(m: &BorrowedMessage<'_>) -> LinkRecord {
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    LinkRecord {
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis().unwrap_or(-1),
        key: m.key().map(<[u8]>::to_vec).unwrap_or_default(),
        headers,
        value: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
    }
}

pub(crate) type Meta = OffRuntime<AdminClient<TracingContext>>;

pub(crate) type Probe = BaseConsumer<ProbeContext>;

/// [`TracingContext`], except that reaching the end of a partition is not a warning: these
/// reads ask for partition-EOF signals and meet one on most reads. (librdkafka hands each
/// signal to the error callback too when a real broker sends it.)
pub(crate) struct ProbeContext(TracingContext);

impl ClientContext for ProbeContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.0.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(error, KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF);
        if eof {
            tracing::trace!(target: "librdkafka", client = %self.0.client_id, "{reason}");
        } else {
            self.0.error(error, reason);
        }
    }
}

impl ConsumerContext for ProbeContext {}

/// Why a read of a mirror partition failed.
#[derive(Debug)]
pub(crate) enum ReadError {
    Unavailable(String),
    UnknownPartition(i32),
    /// A record that should not be there (no valid origin offset header).
    Corrupt(String),
    Other(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Unavailable(s) | ReadError::Corrupt(s) | ReadError::Other(s) => {
                f.write_str(s)
            }
            ReadError::UnknownPartition(p) => write!(f, "partition {p} does not exist"),
        }
    }
}

impl From<ReadError> for LogError {
    fn from(e: ReadError) -> LogError {
        match e {
            ReadError::Unavailable(s) => LogError::Unavailable(s),
            ReadError::UnknownPartition(p) => LogError::UnknownPartition(p),
            ReadError::Corrupt(s) | ReadError::Other(s) => LogError::Other(s),
        }
    }
}

/// Group-less consumers for short reads of mirror partitions, pooled (each is a librdkafka
/// instance) and limited to [`MAX_CONCURRENT_PROBES`] reads at once, each on a blocking
/// thread, each bounded by a deadline.
pub(crate) struct ProbePool {
    config: ClientConfig,
    idle: Mutex<Vec<Probe>>,
    slots: Arc<Semaphore>,
}

impl ProbePool {
    /// Settings: [`mirror_probe_config`].
    pub(crate) fn new(cfg: &KafkaConfig, region: &str, node: &str) -> Result<ProbePool, String> {
        let config = mirror_probe_config(cfg, region, node);
        let first = Self::build(&config)?;
        Ok(ProbePool {
            config,
            idle: Mutex::new(vec![first]),
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT_PROBES)),
        })
    }

    pub(crate) fn build(config: &ClientConfig) -> Result<Probe, String> {
        BaseConsumer::from_config_and_context(
            config,
            ProbeContext(TracingContext::for_config(config)),
        )
        .map_err(|e| format!("cannot create a mirror reader: {e}"))
    }

    /// Runs `job` on a pooled consumer on a blocking thread, within `timeout` overall.
    pub(crate) async fn run<T, F>(
        &self,
        what: &str,
        timeout: Duration,
        job: F,
    ) -> Result<T, ReadError>
    where
        T: Send + 'static,
        F: FnOnce(&Probe, Instant) -> Result<T, ReadError> + Send + 'static,
    {
        let deadline = Instant::now() + timeout;
        let timed_out = || ReadError::Unavailable(format!("{what} timed out after {timeout:?}"));
        let slot =
            tokio::time::timeout_at(deadline.into(), Arc::clone(&self.slots).acquire_owned())
                .await
                .map_err(|_| timed_out())?
                .map_err(|_| ReadError::Other("the mirror reader is closed".into()))?;
        let pooled = lock(&self.idle).pop();
        let consumer = match pooled {
            Some(c) => c,
            None => Self::build(&self.config).map_err(ReadError::Other)?,
        };
        let handle = tokio::task::spawn_blocking(move || {
            // Events queued while the consumer sat idle (a broker that went away and came
            // back) say nothing about this read.
            drain(&consumer);
            let result = job(&consumer, deadline);
            forget_assignment(&consumer);
            drop(slot);
            (OffRuntime::new(consumer), result)
        });
        // The job stops by itself at the deadline; the guard is for a librdkafka call that
        // overruns its own timeout.
        let guard = (deadline + Duration::from_secs(2)).into();
        match tokio::time::timeout_at(guard, handle).await {
            Ok(Ok((consumer, Ok(v)))) => {
                if let Some(c) = consumer.into_inner() {
                    lock(&self.idle).push(c);
                }
                Ok(v)
            }
            // Don't reuse a consumer in an unknown state (dropped off the runtime).
            Ok(Ok((_consumer, Err(e)))) => Err(e),
            Ok(Err(e)) => Err(ReadError::Other(format!("{what}: read task failed: {e}"))),
            Err(_) => Err(timed_out()),
        }
    }
}

impl Drop for ProbePool {
    fn drop(&mut self) {
        let idle = std::mem::take(&mut *lock(&self.idle));
        if !idle.is_empty() {
            drop_off_runtime(idle);
        }
    }
}

/// Leaves nothing of the last read behind for the next one on this consumer.
pub(crate) fn forget_assignment(c: &Probe) {
    let _ = c.unassign();
    drain(c);
}

/// Serves whatever the consumer has queued (messages, errors, logs), without waiting.
pub(crate) fn drain(c: &Probe) {
    for _ in 0..100_000 {
        if c.poll(Duration::ZERO).is_none() {
            break;
        }
    }
}

/// Reads of one mirror partition on one consumer, on a blocking thread, until `deadline`.
pub(crate) struct PartitionReads<'a> {
    pub(crate) consumer: &'a Probe,
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    pub(crate) deadline: Instant,
}

impl PartitionReads<'_> {
    pub(crate) fn left(&self) -> Result<Duration, ReadError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(ReadError::Unavailable(format!(
                "reading {}/{} timed out",
                self.topic, self.partition
            )))
        } else {
            Ok(left)
        }
    }

    pub(crate) fn kafka_err(&self, what: &str, e: &KafkaError) -> ReadError {
        if is_unknown_partition(e) {
            ReadError::UnknownPartition(self.partition)
        } else {
            ReadError::Unavailable(format!("{what} {}/{}: {e}", self.topic, self.partition))
        }
    }

    pub(crate) fn watermarks(&self) -> Result<(i64, i64), ReadError> {
        self.left()?;
        query_until(self.deadline, |timeout| {
            self.consumer
                .fetch_watermarks(self.topic, self.partition, timeout)
        })
        .map_err(|e| self.kafka_err("watermarks of", &e))
    }

    pub(crate) fn corrupt(&self, offset: i64) -> ReadError {
        ReadError::Corrupt(format!(
            "mirror record {}/{} at offset {offset} has no valid {HEADER_ORIGIN_OFFSET} header",
            self.topic, self.partition
        ))
    }

    /// The consumer's position in the partition (the offset after the last one consumed,
    /// including offsets that hold no record), if known.
    pub(crate) fn position(&self) -> Option<i64> {
        let tpl = self.consumer.position().ok()?;
        match tpl.find_partition(self.topic, self.partition)?.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }
    }

    /// Reads the records at offsets `start..limit` in order, giving each to `f` until it
    /// returns `false`. Offsets in the range that hold no record (deleted by retention, or
    /// control records) are passed over.
    pub(crate) fn read(
        &self,
        start: i64,
        limit: i64,
        f: &mut dyn FnMut(&BorrowedMessage<'_>) -> Result<bool, ReadError>,
    ) -> Result<(), ReadError> {
        if start >= limit {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(self.topic, self.partition, Offset::Offset(start))
            .map_err(|e| ReadError::Other(format!("offset {start}: {e}")))?;
        self.consumer
            .assign(&tpl)
            .map_err(|e| self.kafka_err("assigning", &e))?;
        // The last offset handed to `f`: each record at most once, in offset order,
        // whatever the consumer's queue still holds from an earlier read.
        let mut last = start - 1;
        loop {
            let wait = self.left()?.min(Duration::from_millis(100));
            match self.consumer.poll(wait) {
                None => continue,
                Some(Ok(m)) => {
                    if m.topic() != self.topic || m.partition() != self.partition {
                        continue;
                    }
                    let o = m.offset();
                    if o <= last {
                        continue;
                    }
                    if o >= limit {
                        return Ok(());
                    }
                    last = o;
                    if !f(&m)? || o >= limit - 1 {
                        return Ok(());
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) if p == self.partition => {
                    // The consumer reached the end of the partition as the broker saw it at
                    // that fetch (signals of an earlier assignment are discarded by
                    // librdkafka). Its position counts offsets that hold no record
                    // (transaction markers), which `last` cannot; the watermarks guard
                    // against a position that is not meaningful.
                    let (low, high) = self.watermarks()?;
                    let reached = self
                        .position()
                        .filter(|p| *p >= start)
                        .unwrap_or(start)
                        .max(last + 1)
                        .max(low);
                    if reached >= limit.min(high) {
                        return Ok(());
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) if is_transient_consumer_error(&e) => {
                    tracing::debug!(topic = %self.topic, partition = self.partition, error = %e, "mirror read: transient consumer error");
                }
                Some(Err(e)) => return Err(self.kafka_err("reading", &e)),
            }
        }
    }

    /// The first record at an offset in `at..limit`: its offset and origin offset.
    pub(crate) fn first_at(&self, at: i64, limit: i64) -> Result<Option<(i64, i64)>, ReadError> {
        let mut found = None;
        self.read(at, limit, &mut |m| {
            let o = origin_offset(m).ok_or_else(|| self.corrupt(m.offset()))?;
            found = Some((m.offset(), o));
            Ok(false)
        })?;
        Ok(found)
    }

    /// The origin offset of the last record of the partition, `None` if it holds none.
    pub(crate) fn tail(&self) -> Result<Option<i64>, ReadError> {
        let (low, high) = self.watermarks()?;
        if high <= low {
            return Ok(None);
        }
        for window in TAIL_WINDOWS {
            let start = high.saturating_sub(window).max(low);
            let mut last = None;
            self.read(start, high, &mut |m| {
                last = Some((m.offset(), origin_offset(m)));
                Ok(true)
            })?;
            if let Some((offset, origin)) = last {
                return origin.map(Some).ok_or_else(|| self.corrupt(offset));
            }
            if start == low {
                // Every offset from the low watermark up holds only what `read_committed`
                // skips: records of aborted transactions and transaction markers (a writer
                // that died in its first transaction, fenced by this tail's writer before
                // the read). Nothing was ever mirrored here: the partition is empty.
                return Ok(None);
            }
        }
        Err(ReadError::Other(format!(
            "no readable record in the last {} offsets of mirror partition {}/{} (offsets \
             {low}..{high})",
            TAIL_WINDOWS[TAIL_WINDOWS.len() - 1],
            self.topic,
            self.partition
        )))
    }

    /// The first mirror offset at or after `lo` from which reading finds every record with
    /// an origin offset above `after`. `lo_origin` is the origin offset of the record right
    /// before `lo` (at most `after`); `high` the high watermark.
    ///
    /// Origin offsets grow along the partition by at least one per record, so the answer is
    /// at most `lo + (after - lo_origin)`, which is exact when every origin record was
    /// mirrored: the first probe checks that bound, then it is a plain binary search. A
    /// re-sent stretch (the same origin offsets twice, after a purged append landed late)
    /// only ever moves the answer earlier, which reading forward with deduplication
    /// tolerates.
    pub(crate) fn search(
        &self,
        mut lo: i64,
        mut lo_origin: i64,
        after: i64,
        high: i64,
    ) -> Result<i64, ReadError> {
        let mut hi = high;
        let mut probes = 0u32;
        while lo < hi {
            hi = hi.min(lo.saturating_add(after.saturating_sub(lo_origin)));
            if lo >= hi {
                break;
            }
            let mid = if probes == 0 {
                hi - 1
            } else {
                lo + (hi - lo) / 2
            };
            probes += 1;
            match self.first_at(mid, hi)? {
                Some((m, o)) if o <= after => {
                    lo = m + 1;
                    lo_origin = o;
                }
                _ => hi = mid,
            }
        }
        tracing::trace!(topic = %self.topic, partition = self.partition, after, start = lo, probes, "mirror replay: binary search done");
        Ok(lo)
    }
}
