//! In-memory implementations of the mirror's log traits ([`OriginLog`], [`MirrorLog`]) for
//! the mirror tests: everything kept in memory, with faults to inject (fail appends, move
//! retention, make the log unavailable). Test doubles, not product code.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use dtfed_proto::link::codec::record_len_bound;
use dtfed_proto::link::LinkRecord;
use dtfed_proto::record::{now_ms, HEADER_ORIGIN_OFFSET, HEADER_ORIGIN_TS};
use dtfed_regions::mirror::log::{LogError, MirrorLog, OriginBatch, OriginLog, OriginReader};
use tokio::sync::watch;
use tokio::time::Instant;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------
// In-memory origin log
// ---------------------------------------------------------------------------------------

/// How long a [`MemoryOriginLog`] reader waits for new records before returning an empty
/// batch, by default.
pub const MEMORY_POLL_WAIT: Duration = Duration::from_millis(200);

/// An in-memory origin local topic: partitions of records with (possibly sparse) offsets,
/// a movable earliest retained offset, and an "unavailable" switch. Cheap to clone (shared).
#[derive(Clone)]
pub struct MemoryOriginLog {
    inner: Arc<OriginShared>,
}

struct OriginShared {
    topic: String,
    poll_wait: Duration,
    state: Mutex<OriginState>,
    /// Bumped on every change, to wake waiting readers.
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct OriginState {
    partitions: Vec<MemoryPartition>,
    unavailable: bool,
    opens: u64,
}

#[derive(Default)]
struct MemoryPartition {
    /// Retained records, offsets strictly increasing.
    records: Vec<LinkRecord>,
    earliest: i64,
    high_watermark: i64,
}

impl std::fmt::Debug for MemoryOriginLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryOriginLog")
            .field("topic", &self.inner.topic)
            .finish_non_exhaustive()
    }
}

impl MemoryOriginLog {
    /// An empty topic with `partitions` partitions (at least one).
    pub fn new(topic: impl Into<String>, partitions: i32) -> MemoryOriginLog {
        MemoryOriginLog::with_poll_wait(topic, partitions, MEMORY_POLL_WAIT)
    }

    /// [`new`](Self::new), with readers waiting up to `poll_wait` on an idle partition.
    pub fn with_poll_wait(
        topic: impl Into<String>,
        partitions: i32,
        poll_wait: Duration,
    ) -> MemoryOriginLog {
        let n = usize::try_from(partitions.max(1)).unwrap_or(1);
        let state = OriginState {
            partitions: (0..n).map(|_| MemoryPartition::default()).collect(),
            ..OriginState::default()
        };
        MemoryOriginLog {
            inner: Arc::new(OriginShared {
                topic: topic.into(),
                poll_wait,
                state: Mutex::new(state),
                changed: watch::channel(0).0,
            }),
        }
    }

    fn notify(&self) {
        self.inner.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn with_partition<T>(
        &self,
        partition: i32,
        f: impl FnOnce(&mut MemoryPartition) -> T,
    ) -> Result<T, LogError> {
        let mut state = lock(&self.inner.state);
        let p = usize::try_from(partition)
            .ok()
            .and_then(|i| state.partitions.get_mut(i))
            .ok_or(LogError::UnknownPartition(partition))?;
        Ok(f(p))
    }

    /// Appends `record` as is (its offset must be at or above the high watermark, so gaps
    /// in offsets are allowed, as in Kafka); the high watermark becomes `offset + 1`.
    pub fn push(&self, partition: i32, record: LinkRecord) -> Result<i64, LogError> {
        let offset = record.offset;
        self.with_partition(partition, |p| {
            if offset < p.high_watermark {
                return Err(LogError::Other(format!(
                    "offset {offset} is below the high watermark {}",
                    p.high_watermark
                )));
            }
            p.high_watermark = offset.saturating_add(1);
            p.records.push(record);
            Ok(offset)
        })??;
        self.notify();
        Ok(offset)
    }

    /// Appends a record at the high watermark, timestamped now; returns its offset.
    pub fn append(
        &self,
        partition: i32,
        key: &[u8],
        value: &[u8],
        headers: Vec<(String, Vec<u8>)>,
    ) -> Result<i64, LogError> {
        let offset = self.with_partition(partition, |p| p.high_watermark)?;
        self.push(
            partition,
            LinkRecord {
                offset,
                timestamp_ms: now_ms(),
                key: key.to_vec(),
                headers,
                value: value.to_vec(),
            },
        )
    }

    /// The retained records of `partition` (empty for an unknown partition).
    pub fn records(&self, partition: i32) -> Vec<LinkRecord> {
        self.with_partition(partition, |p| p.records.clone())
            .unwrap_or_default()
    }

    /// The high watermark of `partition`.
    pub fn high_watermark(&self, partition: i32) -> Result<i64, LogError> {
        self.with_partition(partition, |p| p.high_watermark)
    }

    /// The earliest retained offset of `partition`.
    pub fn earliest(&self, partition: i32) -> Result<i64, LogError> {
        self.with_partition(partition, |p| p.earliest)
    }

    /// Retention: drops every record below `offset` (capped at the high watermark) and
    /// makes it the earliest retained offset. Never moves backwards.
    pub fn set_earliest(&self, partition: i32, offset: i64) -> Result<(), LogError> {
        self.with_partition(partition, |p| {
            let earliest = offset.min(p.high_watermark).max(p.earliest);
            p.earliest = earliest;
            let keep_from = p.records.partition_point(|r| r.offset < earliest);
            p.records.drain(..keep_from);
        })?;
        self.notify();
        Ok(())
    }

    /// While `true`, `partitions`, `open` and `next_batch` fail with
    /// [`LogError::Unavailable`] (a broker outage).
    pub fn set_unavailable(&self, unavailable: bool) {
        lock(&self.inner.state).unavailable = unavailable;
        self.notify();
    }

    /// Adds `n` empty partitions (an operator growing the topic).
    pub fn add_partitions(&self, n: usize) {
        lock(&self.inner.state)
            .partitions
            .extend((0..n).map(|_| MemoryPartition::default()));
        self.notify();
    }

    /// Readers opened so far.
    pub fn opens(&self) -> u64 {
        lock(&self.inner.state).opens
    }
}

#[async_trait]
impl OriginLog for MemoryOriginLog {
    fn topic(&self) -> &str {
        &self.inner.topic
    }

    async fn partitions(&self) -> Result<i32, LogError> {
        let state = lock(&self.inner.state);
        if state.unavailable {
            return Err(LogError::Unavailable("memory origin log is down".into()));
        }
        Ok(i32::try_from(state.partitions.len()).unwrap_or(i32::MAX))
    }

    async fn open(
        &self,
        partition: i32,
        from_offset: i64,
    ) -> Result<Box<dyn OriginReader>, LogError> {
        let index = {
            let mut state = lock(&self.inner.state);
            if state.unavailable {
                return Err(LogError::Unavailable("memory origin log is down".into()));
            }
            let index = usize::try_from(partition)
                .ok()
                .filter(|&i| i < state.partitions.len())
                .ok_or(LogError::UnknownPartition(partition))?;
            let p = &state.partitions[index];
            if from_offset < p.earliest || from_offset > p.high_watermark {
                return Err(LogError::OffsetOutOfRange {
                    earliest: p.earliest,
                });
            }
            state.opens += 1;
            index
        };
        Ok(Box::new(MemoryOriginReader {
            shared: self.inner.clone(),
            changed: self.inner.changed.subscribe(),
            index,
            next: from_offset,
        }))
    }
}

/// A reader of a [`MemoryOriginLog`] partition.
struct MemoryOriginReader {
    shared: Arc<OriginShared>,
    changed: watch::Receiver<u64>,
    index: usize,
    next: i64,
}

impl MemoryOriginReader {
    fn read_now(&mut self, max_bytes: usize) -> Result<OriginBatch, LogError> {
        let state = lock(&self.shared.state);
        if state.unavailable {
            return Err(LogError::Unavailable("memory origin log is down".into()));
        }
        let Some(p) = state.partitions.get(self.index) else {
            return Err(LogError::Other("partition vanished".into()));
        };
        if self.next < p.earliest {
            return Err(LogError::OffsetOutOfRange {
                earliest: p.earliest,
            });
        }
        let start = p.records.partition_point(|r| r.offset < self.next);
        let mut records = Vec::new();
        let mut bytes = 0;
        for r in &p.records[start..] {
            let n = record_len_bound(r);
            if !records.is_empty() && bytes + n > max_bytes {
                break;
            }
            bytes += n;
            records.push(r.clone());
        }
        if let Some(last) = records.last() {
            self.next = last.offset.saturating_add(1);
        }
        Ok(OriginBatch {
            records,
            high_watermark: p.high_watermark,
        })
    }
}

#[async_trait]
impl OriginReader for MemoryOriginReader {
    async fn next_batch(&mut self, max_bytes: usize) -> Result<OriginBatch, LogError> {
        let deadline = Instant::now() + self.shared.poll_wait;
        loop {
            // Mark the current version seen before looking, so no append is missed.
            self.changed.borrow_and_update();
            let batch = self.read_now(max_bytes)?;
            if !batch.records.is_empty() {
                return Ok(batch);
            }
            match tokio::time::timeout_at(deadline, self.changed.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return Ok(batch),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// In-memory mirror log
// ---------------------------------------------------------------------------------------

/// One record as written to a mirror partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirroredRecord {
    /// Offset in the mirror partition.
    pub offset: i64,
    /// The origin's append time (kept as the record timestamp).
    pub timestamp_ms: i64,
    pub key: Vec<u8>,
    /// The origin record's headers with `dtfed-origin` (the link's origin region),
    /// `dtfed-origin-offset` and `dtfed-origin-ts` set ([`LinkRecord::mirror_headers`]).
    pub headers: Vec<(String, Vec<u8>)>,
    pub value: Vec<u8>,
}

impl MirroredRecord {
    fn header_i64(&self, name: &str) -> Option<i64> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .and_then(|s| s.parse().ok())
    }

    /// The origin offset, from the `dtfed-origin-offset` header.
    pub fn origin_offset(&self) -> Option<i64> {
        self.header_i64(HEADER_ORIGIN_OFFSET)
    }

    /// The origin timestamp, from the `dtfed-origin-ts` header.
    pub fn origin_timestamp_ms(&self) -> Option<i64> {
        self.header_i64(HEADER_ORIGIN_TS)
    }
}

/// A gap reported through [`MirrorLog::record_gap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorGap {
    pub origin: String,
    pub partition: i32,
    pub from: i64,
    pub to: i64,
}

/// In-memory mirror topics, one partition per `(origin, partition)`, with fault injection.
/// Cheap to clone (shared). Like Kafka it does not refuse duplicates: tests check the
/// origin offsets it holds strictly increase.
#[derive(Clone, Default)]
pub struct MemoryMirrorLog {
    inner: Arc<Mutex<MirrorState>>,
}

#[derive(Default)]
struct MirrorState {
    partitions: HashMap<(String, i32), Vec<MirroredRecord>>,
    gaps: Vec<MirrorGap>,
    fail_appends: u32,
    fail_appends_partially: u32,
    failed_appends: u64,
    appends: u64,
    unavailable: bool,
    /// Mirror topics may grow ([`MemoryMirrorLog::growing`]): origin → count grown to.
    growth: Option<HashMap<String, i32>>,
}

impl std::fmt::Debug for MemoryMirrorLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryMirrorLog").finish_non_exhaustive()
    }
}

impl MemoryMirrorLog {
    /// Empty mirror topics.
    pub fn new() -> MemoryMirrorLog {
        MemoryMirrorLog::default()
    }

    /// Empty mirror topics that [`MirrorLog::grow_partitions`] grows (the daemon's do).
    pub fn growing() -> MemoryMirrorLog {
        let log = MemoryMirrorLog::default();
        lock(&log.inner).growth = Some(HashMap::new());
        log
    }

    /// The partition count the mirror topic of `origin` was grown to, if it was.
    pub fn grown_to(&self, origin: &str) -> Option<i32> {
        lock(&self.inner).growth.as_ref()?.get(origin).copied()
    }

    /// What mirror partition `partition` of `origin` holds.
    pub fn records(&self, origin: &str, partition: i32) -> Vec<MirroredRecord> {
        lock(&self.inner)
            .partitions
            .get(&(origin.to_owned(), partition))
            .cloned()
            .unwrap_or_default()
    }

    /// Records in mirror partition `partition` of `origin`.
    pub fn len(&self, origin: &str, partition: i32) -> usize {
        lock(&self.inner)
            .partitions
            .get(&(origin.to_owned(), partition))
            .map_or(0, Vec::len)
    }

    /// Whether mirror partition `partition` of `origin` is empty.
    pub fn is_empty(&self, origin: &str, partition: i32) -> bool {
        self.len(origin, partition) == 0
    }

    /// The next `n` appends fail with [`LogError::Unavailable`], writing nothing.
    pub fn fail_next_appends(&self, n: u32) {
        lock(&self.inner).fail_appends = n;
    }

    /// The next `n` appends of more than one record write the first half of their records,
    /// then fail with [`LogError::Unavailable`] (a batch partly acknowledged).
    pub fn fail_next_appends_partially(&self, n: u32) {
        lock(&self.inner).fail_appends_partially = n;
    }

    /// Appends that failed (injected) so far.
    pub fn failed_appends(&self) -> u64 {
        lock(&self.inner).failed_appends
    }

    /// Appends that succeeded so far.
    pub fn appends(&self) -> u64 {
        lock(&self.inner).appends
    }

    /// While `true`, `tail` and `append` fail with [`LogError::Unavailable`].
    pub fn set_unavailable(&self, unavailable: bool) {
        lock(&self.inner).unavailable = unavailable;
    }

    /// Gaps reported so far.
    pub fn gaps(&self) -> Vec<MirrorGap> {
        lock(&self.inner).gaps.clone()
    }

    fn write(part: &mut Vec<MirroredRecord>, origin: &str, records: &[LinkRecord]) {
        for r in records {
            let offset = i64::try_from(part.len()).unwrap_or(i64::MAX);
            part.push(MirroredRecord {
                offset,
                timestamp_ms: r.timestamp_ms,
                key: r.key.clone(),
                headers: r.mirror_headers(origin),
                value: r.value.clone(),
            });
        }
    }
}

#[async_trait]
impl MirrorLog for MemoryMirrorLog {
    async fn grow_partitions(&self, origin: &str, partitions: i32) -> Result<i32, LogError> {
        let mut state = lock(&self.inner);
        let Some(growth) = state.growth.as_mut() else {
            return Err(LogError::Other(format!(
                "this mirror log cannot add partitions to the mirror topic of {origin}"
            )));
        };
        let n = growth.entry(origin.to_owned()).or_insert(partitions);
        *n = (*n).max(partitions);
        Ok(*n)
    }

    async fn tail(&self, origin: &str, partition: i32) -> Result<Option<i64>, LogError> {
        let state = lock(&self.inner);
        if state.unavailable {
            return Err(LogError::Unavailable("memory mirror log is down".into()));
        }
        let Some(last) = state
            .partitions
            .get(&(origin.to_owned(), partition))
            .and_then(|p| p.last())
        else {
            return Ok(None);
        };
        last.origin_offset().map(Some).ok_or_else(|| {
            LogError::Other(format!(
                "mirror record at offset {} has no valid {HEADER_ORIGIN_OFFSET} header",
                last.offset
            ))
        })
    }

    async fn append(
        &self,
        origin: &str,
        partition: i32,
        records: &[LinkRecord],
    ) -> Result<(), LogError> {
        let mut state = lock(&self.inner);
        if state.unavailable {
            return Err(LogError::Unavailable("memory mirror log is down".into()));
        }
        if state.fail_appends > 0 {
            state.fail_appends -= 1;
            state.failed_appends += 1;
            return Err(LogError::Unavailable("injected append failure".into()));
        }
        let partial = records.len() > 1 && state.fail_appends_partially > 0;
        if partial {
            state.fail_appends_partially -= 1;
            state.failed_appends += 1;
        } else {
            state.appends += 1;
        }
        let part = state
            .partitions
            .entry((origin.to_owned(), partition))
            .or_default();
        if partial {
            MemoryMirrorLog::write(part, origin, &records[..records.len() / 2]);
            return Err(LogError::Unavailable(
                "injected append failure after a partial write".into(),
            ));
        }
        MemoryMirrorLog::write(part, origin, records);
        Ok(())
    }

    async fn record_gap(
        &self,
        origin: &str,
        partition: i32,
        from: i64,
        to: i64,
    ) -> Result<(), LogError> {
        lock(&self.inner).gaps.push(MirrorGap {
            origin: origin.to_owned(),
            partition,
            from,
            to,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(offset: i64) -> LinkRecord {
        LinkRecord {
            offset,
            timestamp_ms: 1_000 + offset,
            key: b"room".to_vec(),
            headers: vec![],
            value: vec![b'v'; 10],
        }
    }

    #[tokio::test]
    async fn origin_reads_in_order_and_honours_retention() {
        let log = MemoryOriginLog::with_poll_wait("t", 1, Duration::from_millis(10));
        for o in [0, 2, 3, 7] {
            log.push(0, rec(o)).unwrap();
        }
        assert!(log.push(0, rec(5)).is_err(), "offsets only grow");
        let mut r = log.open(0, 1).await.unwrap();
        let b = r.next_batch(1).await.unwrap();
        assert_eq!(b.records.iter().map(|r| r.offset).collect::<Vec<_>>(), [2]);
        assert_eq!(b.high_watermark, 8);
        let b = r.next_batch(1 << 20).await.unwrap();
        assert_eq!(
            b.records.iter().map(|r| r.offset).collect::<Vec<_>>(),
            [3, 7]
        );
        assert!(r.next_batch(1 << 20).await.unwrap().records.is_empty());
        assert_eq!(
            log.open(0, 9).await.err(),
            Some(LogError::OffsetOutOfRange { earliest: 0 })
        );
        assert_eq!(
            log.open(1, 0).await.err(),
            Some(LogError::UnknownPartition(1))
        );

        log.set_earliest(0, 3).unwrap();
        assert_eq!(
            log.open(0, 2).await.err(),
            Some(LogError::OffsetOutOfRange { earliest: 3 })
        );
        let mut slow = log.open(0, 3).await.unwrap();
        log.set_earliest(0, 8).unwrap();
        assert_eq!(
            slow.next_batch(1 << 20).await.err(),
            Some(LogError::OffsetOutOfRange { earliest: 8 })
        );
    }

    #[tokio::test]
    async fn origin_reader_wakes_on_append() {
        let log = MemoryOriginLog::with_poll_wait("t", 1, Duration::from_secs(30));
        let mut r = log.open(0, 0).await.unwrap();
        let writer = log.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            writer.append(0, b"k", b"v", vec![]).unwrap();
        });
        let b = tokio::time::timeout(Duration::from_secs(10), r.next_batch(100))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b.records.len(), 1);
    }

    #[tokio::test]
    async fn mirror_tail_and_injected_failures() {
        let log = MemoryMirrorLog::new();
        assert_eq!(log.tail("o", 0).await.unwrap(), None);
        log.append("o", 0, &[rec(4), rec(6)]).await.unwrap();
        assert_eq!(log.tail("o", 0).await.unwrap(), Some(6));
        log.fail_next_appends(1);
        assert!(log.append("o", 0, &[rec(7)]).await.is_err());
        log.fail_next_appends_partially(1);
        assert!(log.append("o", 0, &[rec(7), rec(8)]).await.is_err());
        assert_eq!(log.tail("o", 0).await.unwrap(), Some(7));
        let recs = log.records("o", 0);
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[2].offset, 2);
        assert_eq!(recs[2].origin_timestamp_ms(), Some(1_007));
        assert_eq!(log.failed_appends(), 2);
    }
}
