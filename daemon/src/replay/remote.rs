//! Replay of a remote origin's messages to players: a room's records after a cursor, out of
//! this region's mirror topic `dtfed.mirror.<origin>` ([`MirrorRoomReader`]). Origin
//! offsets grow along a mirror partition, so the first record after the cursor is found by
//! binary search on single-record reads, then the partition is read forward.

use std::time::Duration;

use dtfed_proto::RoomId;
use rdkafka::message::Message;

use crate::config::KafkaConfig;
use crate::kafka::{default_node_name, partition_for};
use crate::mirror::mirror_topic;
use crate::mirror::reads::{origin_offset, other_origin, PartitionReads, ProbePool, ReadError};
use crate::replay::{ReadLimit, ReplayError, RoomRead, RoomRecords, READ_LIMIT, READ_TIMEOUT};

/// Reads a room's messages from another region (an origin) out of this region's mirror
/// topic `dtfed.mirror.<origin>`, for players resuming with a cursor.
///
/// Like [`crate::replay::RoomLogReader`], a read is a scan of one partition range whose
/// other rooms' records are dropped here; finding where the range starts costs a binary
/// search of single-record reads (a couple of reads when every origin record was mirrored).
pub struct MirrorRoomReader {
    region: String,
    reads: ProbePool,
    timeout: Duration,
    limit: ReadLimit,
}

impl std::fmt::Debug for MirrorRoomReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorRoomReader")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl MirrorRoomReader {
    pub fn new(cfg: &KafkaConfig, region: &str) -> Result<MirrorRoomReader, ReplayError> {
        Self::with_node(cfg, region, &default_node_name())
    }

    /// Like [`MirrorRoomReader::new`] with this daemon's node name in `client.id`.
    pub fn with_node(
        cfg: &KafkaConfig,
        region: &str,
        node: &str,
    ) -> Result<MirrorRoomReader, ReplayError> {
        Ok(MirrorRoomReader {
            region: region.to_owned(),
            reads: ProbePool::new(cfg, region, node).map_err(ReplayError::Kafka)?,
            timeout: READ_TIMEOUT,
            limit: READ_LIMIT,
        })
    }

    /// Overrides [`READ_TIMEOUT`] (tests).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Overrides [`READ_LIMIT`] (tests).
    pub fn set_limit(&mut self, limit: ReadLimit) {
        self.limit = limit;
    }

    /// The records of `room` from `origin` with `after < origin offset < before`, read from
    /// this region's mirror of `origin`, whose local topic has `partitions` partitions.
    /// `after = None` reads from the oldest mirrored record; `before = None` up to the
    /// mirror partition's end at the time of the call.
    ///
    /// [`RoomRead::earliest`] is the origin offset of the oldest record this region still
    /// holds in that mirror partition: a cursor below `earliest - 1` has lost
    /// `cursor+1 ..= earliest-1` from this region's point of view. For a mirror partition
    /// holding nothing it is `after + 1` (0 without `after`): no gap can be named.
    pub async fn read_room(
        &self,
        origin: &str,
        room: &RoomId,
        partitions: i32,
        after: Option<i64>,
        before: Option<i64>,
    ) -> Result<RoomRead, ReplayError> {
        if partitions < 1 {
            return Err(ReplayError::Kafka(format!(
                "origin {origin} has {partitions} partitions"
            )));
        }
        let topic = mirror_topic(origin);
        let partition = partition_for(room, partitions);
        let what = format!("reading room {room} of {origin} from {topic}/{partition}");
        let job = RoomJob {
            topic,
            origin: origin.to_owned(),
            room: room.clone(),
            partition,
            after,
            before,
            limit: self.limit,
        };
        self.reads
            .run(&what, self.timeout, move |consumer, deadline| {
                job.run(&PartitionReads {
                    consumer,
                    topic: &job.topic,
                    partition,
                    deadline,
                })
            })
            .await
            .map_err(|e| {
                tracing::warn!(origin, partition, %room, error = %e, "mirror replay failed");
                ReplayError::Kafka(e.to_string())
            })
    }

    /// The origin offset of the last record of this region's mirror of `origin`'s
    /// `partition` (`None`: it holds nothing), read without writing anything (unlike the
    /// mirror sink's tail, which fences the partition's writers first). For a replication
    /// watermark whose mirror task has not read its own tail yet.
    pub async fn mirror_tail(
        &self,
        origin: &str,
        partition: i32,
        timeout: Duration,
    ) -> Result<Option<i64>, ReplayError> {
        let topic = mirror_topic(origin);
        let what = format!("reading the tail of {topic}/{partition}");
        self.reads
            .run(&what, timeout, move |consumer, deadline| {
                PartitionReads {
                    consumer,
                    topic: &topic,
                    partition,
                    deadline,
                }
                .tail()
            })
            .await
            .map_err(|e| ReplayError::Kafka(e.to_string()))
    }
}

/// One room read, run on a blocking thread.
struct RoomJob {
    topic: String,
    origin: String,
    room: RoomId,
    partition: i32,
    after: Option<i64>,
    before: Option<i64>,
    limit: ReadLimit,
}

impl RoomJob {
    fn run(&self, reads: &PartitionReads<'_>) -> Result<RoomRead, ReadError> {
        let p = self.partition;
        let empty = |earliest: i64| RoomRead {
            partition: p,
            earliest,
            records: Vec::new(),
            stopped_at: None,
        };
        let nothing_held = self.after.map_or(0, |a| a.saturating_add(1)).max(0);
        let (low, high) = reads.watermarks()?;
        let Some((first, earliest)) = reads.first_at(low, high)? else {
            if high > low {
                tracing::warn!(origin = %self.origin, partition = p, low, high, "mirror replay: no readable record in the mirror partition");
            }
            return Ok(empty(nothing_held));
        };
        if self.before.is_some_and(|b| earliest >= b) {
            return Ok(empty(earliest));
        }
        let start = match self.after {
            Some(a) if earliest <= a => reads.search(first + 1, earliest, a, high)?,
            _ => first,
        };
        let room = self.room.as_str().as_bytes();
        let mut last = self.after.unwrap_or(i64::MIN);
        let mut found = RoomRecords::default();
        let (mut scanned, mut stopped_at) = (0i64, None);
        reads.read(start, high, &mut |m| {
            let o = origin_offset(m).ok_or_else(|| reads.corrupt(m.offset()))?;
            if self.before.is_some_and(|b| o >= b) {
                return Ok(false);
            }
            if o <= last {
                // Before the range, or a record mirrored twice.
                return Ok(true);
            }
            last = o;
            scanned += 1;
            if m.key() == Some(room) {
                if let Some(claimed) = other_origin(m, &self.origin) {
                    // As the fan-out does: a record of this topic is this origin's or nobody's.
                    tracing::warn!(origin = %self.origin, partition = p, offset = o, claimed = %claimed, "mirror replay: skipping a record labelled with another origin");
                    return Ok(true);
                }
                found.keep(m.payload(), &self.room, &self.origin, p, o);
            }
            if found.reached(&self.limit, scanned) {
                // The end of the range may be right here; then the next read finds nothing.
                stopped_at = Some(o);
                return Ok(false);
            }
            Ok(true)
        })?;
        Ok(RoomRead {
            partition: p,
            earliest,
            records: found.records,
            stopped_at,
        })
    }
}

/// Reads other regions' messages from this region's mirror topics.
pub struct MirrorReplay {
    pub reader: MirrorRoomReader,
    /// Origin region → partition count of its local topic (= its mirror topic here).
    pub origins: std::sync::Arc<crate::mirror::OriginPartitions>,
}
