//! The two sides of Kafka the mirror needs, as small async traits.
//!
//! - [`OriginLog`] / [`OriginReader`]: the serving side reads the origin's local topic
//!   (`dtfed.local`) from an offset on.
//! - [`MirrorLog`]: the receiving side reads the tail of a mirror partition
//!   (`dtfed.mirror.<origin>`, partition p) and appends to it.
//!
//! The daemon implements them with rdkafka (`dtfed::mirror::{origin, sink}`); the tests of
//! this crate use in-memory implementations that can inject faults
//! (`regions/tests/common/memory_log.rs`).

use async_trait::async_trait;
use dtfed_proto::link::LinkRecord;

/// Why a log operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    /// The offset asked for is not in the log: below `earliest` (retention passed it), or
    /// above the log end.
    #[error("offset out of range (earliest retained offset {earliest})")]
    OffsetOutOfRange { earliest: i64 },
    /// The partition does not exist.
    #[error("partition {0} does not exist")]
    UnknownPartition(i32),
    /// The log cannot be used right now (broker down, timeout, ...): retry later.
    #[error("log unavailable: {0}")]
    Unavailable(String),
    /// The log holds something it should not (e.g. a mirror record without its origin
    /// offset header), or another failure that retrying will not fix by itself.
    #[error("log error: {0}")]
    Other(String),
}

/// Records read from an origin partition, in offset order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginBatch {
    /// Records in strictly increasing offset order; may be empty (idle partition).
    pub records: Vec<LinkRecord>,
    /// The partition's high watermark when read: the offset the next appended record gets.
    pub high_watermark: i64,
}

/// The origin's local topic, as the mirror server reads it.
#[async_trait]
pub trait OriginLog: Send + Sync + 'static {
    /// The local topic's name (e.g. `dtfed.local`): the only topic served.
    fn topic(&self) -> &str;

    /// How many partitions the local topic has.
    async fn partitions(&self) -> Result<i32, LogError>;

    /// A reader of `partition` starting at `from_offset` (inclusive).
    ///
    /// Fails with [`LogError::OffsetOutOfRange`] when `from_offset` is below the earliest
    /// retained offset (or above the log end), [`LogError::UnknownPartition`],
    /// or [`LogError::Unavailable`].
    async fn open(
        &self,
        partition: i32,
        from_offset: i64,
    ) -> Result<Box<dyn OriginReader>, LogError>;
}

/// A position in one origin partition, reading forward.
#[async_trait]
pub trait OriginReader: Send {
    /// The next records, up to about `max_bytes` (at least one record when any is
    /// available, even if it alone is larger), in strictly increasing offset order,
    /// continuing exactly where the previous batch ended and never skipping a retained
    /// record.
    ///
    /// When nothing is available it waits a bounded time (the implementation decides; a
    /// few hundred milliseconds) and may then return an empty batch with the current high
    /// watermark. Fails with [`LogError::OffsetOutOfRange`] when retention passed the
    /// reader's position.
    ///
    /// The mirror server never cancels a pending call except by dropping the reader.
    async fn next_batch(&mut self, max_bytes: usize) -> Result<OriginBatch, LogError>;
}

/// The mirror topics of the receiving region (`dtfed.mirror.<origin>`), as the mirror
/// client writes them.
#[async_trait]
pub trait MirrorLog: Send + Sync + 'static {
    /// The origin offset of the last record in mirror partition `partition` of `origin`
    /// (read from its `dtfed-origin-offset` header), or `None` when the partition is empty.
    async fn tail(&self, origin: &str, partition: i32) -> Result<Option<i64>, LogError>;

    /// Durably writes `records` (origin records, in order) to mirror partition `partition`
    /// of `origin`, in that order, each with [`LinkRecord::mirror_headers`]. Returns once
    /// every record is acknowledged. On error any prefix of `records` may have been
    /// written: the caller re-reads [`tail`](Self::tail) before writing again.
    async fn append(
        &self,
        origin: &str,
        partition: i32,
        records: &[LinkRecord],
    ) -> Result<(), LogError>;

    /// The origin's local topic has `partitions` partitions, more than the mirror topic of
    /// `origin` here: add partitions to the mirror topic so that it has as many (mirroring
    /// is partition-preserving, so origin partition p needs mirror partition p). Returns the
    /// mirror topic's partition count afterwards. Idempotent: concurrent callers for one
    /// origin all end with the count grown once. Mirror topics never shrink: an origin
    /// with fewer partitions than its mirror topic is refused by the caller, not here.
    ///
    /// The default cannot grow anything and says so; the caller then refuses to mirror
    /// from that origin with the mismatch as the reason.
    async fn grow_partitions(&self, origin: &str, partitions: i32) -> Result<i32, LogError> {
        let _ = partitions;
        Err(LogError::Other(format!(
            "this mirror log cannot add partitions to the mirror topic of {origin}"
        )))
    }

    /// Origin offsets `from..=to` of `origin`'s `partition` can never be mirrored (the
    /// origin's retention passed them). Called once per gap found, before anything after
    /// the gap is appended; the default does nothing (the client logs and counts gaps
    /// anyway). An implementation may persist it so that resumes can name the gap. At least
    /// once: after a restart before anything past the gap was appended, the same gap is
    /// reported again. An error fails the attempt (retried), so a gap is never passed
    /// without being recorded.
    async fn record_gap(
        &self,
        origin: &str,
        partition: i32,
        from: i64,
        to: i64,
    ) -> Result<(), LogError> {
        let _ = (origin, partition, from, to);
        Ok(())
    }
}
