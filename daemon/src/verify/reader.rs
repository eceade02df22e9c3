//! Reads what this region holds of each origin's log, for divergence checks: per origin, the
//! range of origin offsets held in a room's partition ([`RoomDigests::watermarks`]), and the
//! [`RoomDigest`] of a room's records (or of a whole partition's) over a range
//! ([`RoomDigests::digest`]). This region's own records come from its local topic (origin
//! offset = Kafka offset), every other origin's from `dtfed.mirror.<origin>` (origin offset
//! from the mirror headers).
//!
//! The reads are those of [`crate::mirror::reads`] (a pool of group-less consumers, at most
//! a few reads at once, each on a blocking thread): a digest streams the range through the
//! hash and keeps nothing, and gives up at [`DIGEST_TIMEOUT`] with an error saying so.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dtfed_proto::RoomId;
use dtfed_regions::mirror::log::LogError;
use dtfed_regions::mirror::{OriginDigests, RangeDigest};
use rdkafka::message::Message;
use serde::Serialize;

use crate::config::KafkaConfig;
use crate::kafka::partition_for;
use crate::mirror::reads::{origin_offset, other_origin, PartitionReads, ProbePool, ReadError};
use crate::mirror::{mirror_topic, OriginPartitions};
use crate::verify::digest::{DigestBuilder, RoomDigest};

/// Bound on one watermark query or digest (waiting for a read slot included).
pub const DIGEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a digest or a watermark could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("{0} is neither this region nor one of its peers")]
    UnknownOrigin(String),
    #[error("bad range: {0}")]
    BadRange(String),
    #[error("{0}")]
    Read(String),
}

/// What this region holds of one origin's partition of a room.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct OriginWatermark {
    pub origin: String,
    /// The origin's partition count as this region knows it, and the room's partition.
    pub partitions: i32,
    pub partition: i32,
    /// `local` (this region's own topic) or `mirror` (`dtfed.mirror.<origin>`).
    pub source: String,
    /// Origin offsets below this are not held here (retention, or never mirrored).
    pub earliest: i64,
    /// Every origin offset below this that this region will ever hold it holds now: the end
    /// of the local topic, or the origin offset after the last mirrored record (0 when the
    /// mirror partition holds nothing).
    pub end: i64,
}

/// Digests and watermarks of the logs this region holds, per origin.
pub struct RoomDigests {
    region: String,
    local_topic: String,
    local_partitions: i32,
    /// Every peer region → its partition count, as learned from it.
    peers: Arc<OriginPartitions>,
    reads: ProbePool,
    timeout: Duration,
}

impl std::fmt::Debug for RoomDigests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomDigests")
            .field("region", &self.region)
            .field("origins", &self.origins())
            .finish_non_exhaustive()
    }
}

impl RoomDigests {
    /// `peers`: each peer region → its partition count (= of its mirror topic here), as
    /// the mirror learns it.
    pub fn new(
        cfg: &KafkaConfig,
        region: &str,
        node: &str,
        local_partitions: i32,
        peers: Arc<OriginPartitions>,
    ) -> Result<RoomDigests, DigestError> {
        Ok(RoomDigests {
            region: region.to_owned(),
            local_topic: cfg.local_topic.clone(),
            local_partitions,
            peers,
            reads: ProbePool::new(cfg, region, &format!("{node}-verify"))
                .map_err(DigestError::Read)?,
            timeout: DIGEST_TIMEOUT,
        })
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// Every origin this region holds, itself included, with its partition count now.
    pub fn origins(&self) -> BTreeMap<String, i32> {
        let mut all = self.peers.all();
        all.insert(self.region.clone(), self.local_partitions);
        all
    }

    /// `origin`'s partition count, if this region holds `origin`.
    pub fn partitions_of(&self, origin: &str) -> Option<i32> {
        if origin == self.region {
            Some(self.local_partitions)
        } else {
            self.peers.get(origin)
        }
    }

    fn topic_of(&self, origin: &str) -> Result<(String, i32, bool), DigestError> {
        let partitions = self
            .partitions_of(origin)
            .ok_or_else(|| DigestError::UnknownOrigin(origin.to_owned()))?;
        if origin == self.region {
            Ok((self.local_topic.clone(), partitions, true))
        } else {
            Ok((mirror_topic(origin), partitions, false))
        }
    }

    /// Per origin, what this region holds of `room`'s partition.
    pub async fn watermarks(&self, room: &RoomId) -> Result<Vec<OriginWatermark>, DigestError> {
        let origins = self.origins();
        let mut out = Vec::with_capacity(origins.len());
        for (origin, partitions) in origins {
            let local = origin == self.region;
            let partition = partition_for(room, partitions);
            let (earliest, end) = self.held_range(&origin, partition).await?;
            out.push(OriginWatermark {
                origin,
                partitions,
                partition,
                source: if local { "local" } else { "mirror" }.to_owned(),
                earliest,
                end,
            });
        }
        Ok(out)
    }

    /// The range of `origin`'s offsets this region holds in `partition`: `(earliest, end)`
    /// as in [`OriginWatermark`].
    pub async fn held_range(
        &self,
        origin: &str,
        partition: i32,
    ) -> Result<(i64, i64), DigestError> {
        let (topic, _, local) = self.topic_of(origin)?;
        let what = format!("watermarks of {topic}/{partition}");
        self.reads
            .run(&what, self.timeout, move |consumer, deadline| {
                let reads = PartitionReads {
                    consumer,
                    topic: &topic,
                    partition,
                    deadline,
                };
                held_range(&reads, local)
            })
            .await
            .map_err(|e| read_error(origin, partition, e))
    }

    /// The digest of `room`'s records from `origin` with origin offsets in `[from, to)`.
    pub async fn digest(
        &self,
        room: &RoomId,
        origin: &str,
        from: i64,
        to: i64,
    ) -> Result<RoomDigest, DigestError> {
        let partitions = self
            .partitions_of(origin)
            .ok_or_else(|| DigestError::UnknownOrigin(origin.to_owned()))?;
        self.partition_digest(
            origin,
            partition_for(room, partitions),
            Some(room),
            from,
            to,
        )
        .await
    }

    /// The digest of `origin`'s `partition` over `[from, to)`: of `room`'s records only, or
    /// of every record with `room = None`.
    pub async fn partition_digest(
        &self,
        origin: &str,
        partition: i32,
        room: Option<&RoomId>,
        from: i64,
        to: i64,
    ) -> Result<RoomDigest, DigestError> {
        if from < 0 || to < from {
            return Err(DigestError::BadRange(format!(
                "from={from} to={to}: need 0 <= from <= to"
            )));
        }
        let (topic, partitions, local) = self.topic_of(origin)?;
        if !(0..partitions).contains(&partition) {
            return Err(DigestError::BadRange(format!(
                "{origin} has {partitions} partitions, not a partition {partition}"
            )));
        }
        let job = DigestJob {
            topic,
            origin: origin.to_owned(),
            partition,
            room: room.map(|r| r.as_str().as_bytes().to_vec()),
            local,
            from,
            to,
        };
        let what = format!("digest of {}/{partition} [{from}, {to})", job.topic);
        let started = std::time::Instant::now();
        let digest = self
            .reads
            .run(&what, self.timeout, move |consumer, deadline| {
                job.run(&PartitionReads {
                    consumer,
                    topic: &job.topic,
                    partition,
                    deadline,
                })
            })
            .await
            .map_err(|e| read_error(origin, partition, e))?;
        tracing::debug!(region = %self.region, origin, partition, room = ?room.map(RoomId::as_str), from, to, count = digest.count, ms = started.elapsed().as_millis() as u64, "digest computed");
        Ok(digest)
    }
}

fn read_error(origin: &str, partition: i32, e: ReadError) -> DigestError {
    tracing::warn!(origin, partition, error = %e, "digest read failed");
    DigestError::Read(format!("{origin} partition {partition}: {e}"))
}

/// `(earliest, end)` of origin offsets held in the partition `reads` reads.
fn held_range(reads: &PartitionReads<'_>, local: bool) -> Result<(i64, i64), ReadError> {
    let (low, high) = reads.watermarks()?;
    if local {
        return Ok((low, high));
    }
    let Some(last) = reads.tail()? else {
        return Ok((0, 0));
    };
    let end = last.saturating_add(1);
    let earliest = reads.first_at(low, high)?.map_or(end, |(_, o)| o);
    Ok((earliest, end))
}

/// One digest, run on a blocking thread.
struct DigestJob {
    topic: String,
    origin: String,
    partition: i32,
    room: Option<Vec<u8>>,
    local: bool,
    from: i64,
    to: i64,
}

impl DigestJob {
    fn run(&self, reads: &PartitionReads<'_>) -> Result<RoomDigest, ReadError> {
        let mut digest = DigestBuilder::default();
        let (low, high) = reads.watermarks()?;
        let start = if self.local {
            self.from.max(low)
        } else {
            match reads.first_at(low, high)? {
                None => high,
                Some((first, earliest)) if earliest < self.from => {
                    reads.search(first + 1, earliest, self.from - 1, high)?
                }
                Some((first, _)) => first,
            }
        };
        let limit = if self.local { high.min(self.to) } else { high };
        reads.read(start, limit, &mut |m| {
            let o = if self.local {
                m.offset()
            } else {
                origin_offset(m).ok_or_else(|| reads.corrupt(m.offset()))?
            };
            if o >= self.to {
                return Ok(false);
            }
            if o < self.from {
                return Ok(true);
            }
            if self.room.as_deref().is_some_and(|r| m.key() != Some(r)) {
                return Ok(true);
            }
            if !self.local {
                if let Some(claimed) = other_origin(m, &self.origin) {
                    // What players are never shown (the fan-out and replay skip it) is not
                    // held here.
                    tracing::warn!(origin = %self.origin, partition = self.partition, offset = o, %claimed, "digest: skipping a mirror record labelled with another origin");
                    return Ok(true);
                }
            }
            digest.add(o, m.payload().unwrap_or_default());
            Ok(true)
        })?;
        Ok(digest.finish(&self.origin, self.partition, self.from, self.to))
    }
}

/// This region's digests of its own local topic, as the mirror server answers peers'
/// `Digest` requests with them.
pub struct LocalTopicDigests(pub std::sync::Arc<RoomDigests>);

#[async_trait::async_trait]
impl OriginDigests for LocalTopicDigests {
    /// Fails with [`LogError::OffsetOutOfRange`] when retention already deleted the start
    /// of the range here (the receiver asks again from `earliest`: a digest of fewer
    /// records than it holds would look like a divergence).
    async fn digest(&self, partition: i32, from: i64, to: i64) -> Result<RangeDigest, LogError> {
        let region = self.0.region();
        let partitions = self.0.partitions_of(region).unwrap_or(0);
        if !(0..partitions).contains(&partition) {
            return Err(LogError::UnknownPartition(partition));
        }
        let failed = |e: DigestError| match e {
            DigestError::Read(s) => LogError::Unavailable(s),
            other => LogError::Other(other.to_string()),
        };
        let (earliest, _) = self.0.held_range(region, partition).await.map_err(failed)?;
        if from < earliest {
            return Err(LogError::OffsetOutOfRange { earliest });
        }
        let d = self
            .0
            .partition_digest(region, partition, None, from, to)
            .await
            .map_err(failed)?;
        let sha256 = d
            .sha256()
            .ok_or_else(|| LogError::Other(format!("digest hash {:?} is not hex", d.hash)))?;
        Ok(RangeDigest {
            count: d.count,
            sha256,
        })
    }
}
