//! Relaying: this region's mirror of a peer O (`dtfed.mirror.O`), served to its other peers
//! with O's own offsets, for when their direct link to O is down.
//!
//! [`RelayedOriginLog`] is an [`OriginLog`] the mirror server serves beside the local topic
//! (`MirrorServer::with_relayed`). Start at [`RelayedOriginLog::open`]: it finds the first
//! mirror record whose origin offset is at or after the one asked (the binary search of
//! `reads.rs`), then reads forward with a reader of the mirror topic (`origin.rs`,
//! `read_committed`) and turns every mirror record back into O's record: O's offset and
//! timestamp from the mirror headers, O's own headers, key and value unchanged. A record
//! at or below one already sent (a re-sent stretch of an old writer) is dropped, so offsets
//! only grow.
//!
//! What this relay does not hold is never said as retention (`offset_out_of_range` would
//! make the receiver record a gap that O may not have): it is `unavailable`, and the
//! receiver tries another route. The high watermark reported is what this region knows of
//! O: one past the last origin offset in its mirror partition.

use std::time::Duration;

use async_trait::async_trait;
use dtfed_proto::link::LinkRecord;
use dtfed_proto::record::{HEADER_ORIGIN, HEADER_ORIGIN_OFFSET, HEADER_ORIGIN_TS};
use dtfed_regions::mirror::log::{LogError, OriginBatch, OriginLog, OriginReader};

use crate::config::KafkaConfig;
use crate::kafka::settings::relay_reader_config;
use crate::kafka::KafkaSetupError;
use crate::mirror::mirror_topic;
use crate::mirror::origin::KafkaOriginLog;
use crate::mirror::reads::{PartitionReads, ProbePool, ReadError};

/// Bound on finding where a relayed stream starts (search and tail).
const POSITION_TIMEOUT: Duration = Duration::from_secs(10);

/// This region's mirror topic of `origin`, read with `origin`'s offsets ([`OriginLog`]).
pub struct RelayedOriginLog {
    origin: String,
    topic: String,
    reader: KafkaOriginLog,
    probes: ProbePool,
}

impl std::fmt::Debug for RelayedOriginLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayedOriginLog")
            .field("origin", &self.origin)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl RelayedOriginLog {
    /// Serves `dtfed.mirror.<origin>` of the cluster in `cfg`.
    pub fn new(
        cfg: &KafkaConfig,
        region: &str,
        node: &str,
        origin: &str,
    ) -> Result<RelayedOriginLog, KafkaSetupError> {
        let topic = mirror_topic(origin);
        let reader = KafkaOriginLog::with_node(cfg, region, node, topic.clone())?
            .with_reader_config(relay_reader_config);
        let probes = ProbePool::new(cfg, region, &format!("{node}-relay")).map_err(|detail| {
            KafkaSetupError::Unreachable {
                brokers: cfg.brokers.clone(),
                detail,
            }
        })?;
        Ok(RelayedOriginLog {
            origin: origin.to_owned(),
            topic,
            reader,
            probes,
        })
    }
}

/// A relay never reports retention: what it lacks, the origin may hold.
fn as_relay_error(e: LogError, topic: &str, partition: i32) -> LogError {
    match e {
        LogError::OffsetOutOfRange { earliest } => LogError::Unavailable(format!(
            "this relay's {topic}/{partition} no longer holds the position (earliest mirror \
             offset {earliest}); ask the origin"
        )),
        other => other,
    }
}

#[async_trait]
impl OriginLog for RelayedOriginLog {
    fn topic(&self) -> &str {
        &self.topic
    }

    async fn partitions(&self) -> Result<i32, LogError> {
        self.reader.partitions().await
    }

    async fn open(
        &self,
        partition: i32,
        from_offset: i64,
    ) -> Result<Box<dyn OriginReader>, LogError> {
        let n = self.partitions().await?;
        if !(0..n).contains(&partition) {
            return Err(LogError::UnknownPartition(partition));
        }
        let (topic, origin) = (self.topic.clone(), self.origin.clone());
        let (start, tail) = self
            .probes
            .run(
                "finding a relayed stream's start",
                POSITION_TIMEOUT,
                move |consumer, deadline| {
                    let reads = PartitionReads {
                        consumer,
                        topic: &topic,
                        partition,
                        deadline,
                    };
                    let (low, high) = reads.watermarks()?;
                    let Some((first, earliest)) = reads.first_at(low, high)? else {
                        // Nothing mirrored yet (an idle partition): served from the start;
                        // the reader checks the first record it meets is not past
                        // `from_offset`.
                        return Ok((low, None));
                    };
                    if earliest > from_offset {
                        return Err(ReadError::Unavailable(format!(
                            "this relay holds {origin}'s partition {partition} from origin offset \
                         {earliest} only, {from_offset} was asked; ask the origin"
                        )));
                    }
                    let start = if from_offset > earliest {
                        reads.search(first + 1, earliest, from_offset - 1, high)?
                    } else {
                        first
                    };
                    Ok((start, reads.tail()?))
                },
            )
            .await
            .map_err(LogError::from)?;
        let inner = self
            .reader
            .open(partition, start)
            .await
            .map_err(|e| as_relay_error(e, &self.topic, partition))?;
        tracing::debug!(topic = %self.topic, origin = %self.origin, partition, from_offset, start, ?tail, "relay: reader opened");
        Ok(Box::new(RelayedReader {
            origin: self.origin.clone(),
            topic: self.topic.clone(),
            partition,
            inner,
            next: from_offset,
            high: tail
                .map_or(from_offset, |t| t.saturating_add(1))
                .max(from_offset),
            // A mirror partition that holds something was checked above to reach back to
            // `from_offset`; an empty one is checked on its first record.
            checked: tail.is_some(),
            foreign: 0,
        }))
    }
}

/// A position in a mirror partition, handing out the origin's records.
struct RelayedReader {
    origin: String,
    topic: String,
    partition: i32,
    inner: Box<dyn OriginReader>,
    /// The next origin offset to hand out: anything below is dropped.
    next: i64,
    /// What this region knows of the origin's partition end.
    high: i64,
    /// The mirror partition is known to reach back to `next` (else the first record read
    /// must not be past it: this relay would lack what was asked, `unavailable`, never a
    /// silent jump).
    checked: bool,
    /// Records skipped because their `dtfed-origin` named another region.
    foreign: u64,
}

/// The value of the last header named `name` (the mirror's own come last).
fn last_header<'a>(r: &'a LinkRecord, name: &str) -> Option<&'a [u8]> {
    r.headers
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_slice())
}

fn parse_i64(v: Option<&[u8]>) -> Option<i64> {
    std::str::from_utf8(v?).ok()?.parse().ok()
}

/// `mirrored` (a record of `dtfed.mirror.<origin>`) as the origin's own record; `Err`
/// when it lacks a valid origin offset.
fn origin_record(mirrored: LinkRecord) -> Result<LinkRecord, LinkRecord> {
    let Some(offset) = parse_i64(last_header(&mirrored, HEADER_ORIGIN_OFFSET)).filter(|o| *o >= 0)
    else {
        return Err(mirrored);
    };
    let timestamp_ms =
        parse_i64(last_header(&mirrored, HEADER_ORIGIN_TS)).unwrap_or(mirrored.timestamp_ms);
    let headers = mirrored
        .headers
        .into_iter()
        .filter(|(k, _)| k != HEADER_ORIGIN && k != HEADER_ORIGIN_OFFSET && k != HEADER_ORIGIN_TS)
        .collect();
    Ok(LinkRecord {
        offset,
        timestamp_ms,
        key: mirrored.key,
        headers,
        value: mirrored.value,
    })
}

#[async_trait]
impl OriginReader for RelayedReader {
    async fn next_batch(&mut self, max_bytes: usize) -> Result<OriginBatch, LogError> {
        let batch = self
            .inner
            .next_batch(max_bytes)
            .await
            .map_err(|e| as_relay_error(e, &self.topic, self.partition))?;
        let mut records = Vec::with_capacity(batch.records.len());
        for r in batch.records {
            if last_header(&r, HEADER_ORIGIN).is_some_and(|o| o != self.origin.as_bytes()) {
                // The fan-out skips these too (`fanout_skipped{reason="origin_mismatch"}`).
                self.foreign += 1;
                if self.foreign == 1 || self.foreign % 1000 == 0 {
                    tracing::warn!(topic = %self.topic, partition = self.partition, mirror_offset = r.offset, skipped = self.foreign, "relay: mirror record names another origin; not relayed");
                }
                continue;
            }
            let record = origin_record(r).map_err(|r| {
                LogError::Other(format!(
                    "mirror record {}/{} at offset {} has no valid {HEADER_ORIGIN_OFFSET} header",
                    self.topic, self.partition, r.offset
                ))
            })?;
            if !self.checked {
                if record.offset > self.next {
                    return Err(LogError::Unavailable(format!(
                        "this relay's mirror of {}'s partition {} starts at origin offset {}, \
                         {} was asked; ask the origin",
                        self.origin, self.partition, record.offset, self.next
                    )));
                }
                self.checked = true;
            }
            if record.offset < self.next {
                continue;
            }
            self.next = record.offset.saturating_add(1);
            records.push(record);
        }
        self.high = self.high.max(self.next);
        Ok(OriginBatch {
            records,
            high_watermark: self.high,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// Hands out prepared batches of mirror records, then empty ones.
    struct Batches(VecDeque<Vec<LinkRecord>>);

    #[async_trait]
    impl OriginReader for Batches {
        async fn next_batch(&mut self, _max_bytes: usize) -> Result<OriginBatch, LogError> {
            Ok(OriginBatch {
                records: self.0.pop_front().unwrap_or_default(),
                high_watermark: 0,
            })
        }
    }

    /// Mirror record `mirror_offset` holding origin `origin`'s record `offset`.
    fn mirrored(mirror_offset: i64, origin: &str, offset: i64) -> LinkRecord {
        LinkRecord {
            offset: mirror_offset,
            timestamp_ms: 1,
            key: b"tavern".to_vec(),
            headers: vec![
                (HEADER_ORIGIN.into(), origin.as_bytes().to_vec()),
                (HEADER_ORIGIN_OFFSET.into(), offset.to_string().into_bytes()),
            ],
            value: offset.to_string().into_bytes(),
        }
    }

    fn reader(batches: Vec<Vec<LinkRecord>>, from: i64, checked: bool) -> RelayedReader {
        RelayedReader {
            origin: "seoul".into(),
            topic: "dtfed.mirror.seoul".into(),
            partition: 0,
            inner: Box::new(Batches(batches.into())),
            next: from,
            high: from,
            checked,
            foreign: 0,
        }
    }

    fn offsets(batch: &OriginBatch) -> Vec<i64> {
        batch.records.iter().map(|r| r.offset).collect()
    }

    #[tokio::test]
    async fn origin_offsets_only_grow_and_start_where_asked() {
        // A re-sent stretch (an old writer's late append) and records before the start.
        let mut r = reader(
            vec![
                vec![mirrored(10, "seoul", 4), mirrored(11, "seoul", 5)],
                vec![
                    mirrored(13, "seoul", 6),
                    mirrored(14, "seoul", 5),
                    mirrored(15, "seoul", 6),
                    mirrored(16, "seoul", 8),
                ],
            ],
            5,
            true,
        );
        let first = r.next_batch(1 << 20).await.expect("batch");
        assert_eq!(offsets(&first), vec![5]);
        let second = r.next_batch(1 << 20).await.expect("batch");
        assert_eq!(offsets(&second), vec![6, 8]);
        assert_eq!(second.high_watermark, 9);
        assert_eq!(second.records[1].value, b"8");
        // Idle: an empty batch still says how far this relay holds the origin.
        let idle = r.next_batch(1 << 20).await.expect("batch");
        assert!(idle.records.is_empty());
        assert_eq!(idle.high_watermark, 9);
    }

    #[tokio::test]
    async fn a_record_naming_another_origin_is_not_relayed() {
        let mut r = reader(
            vec![vec![mirrored(0, "tokyo", 0), mirrored(1, "seoul", 1)]],
            0,
            true,
        );
        let b = r.next_batch(1 << 20).await.expect("batch");
        assert_eq!(offsets(&b), vec![1]);
        assert_eq!(r.foreign, 1);
    }

    #[tokio::test]
    async fn an_unproven_start_past_the_asked_offset_is_unavailable_not_a_jump() {
        // An empty mirror partition at open whose first record is past what was asked:
        // this relay lacks 3..=6, the origin may not.
        let mut r = reader(vec![vec![mirrored(0, "seoul", 7)]], 3, false);
        match r.next_batch(1 << 20).await {
            Err(LogError::Unavailable(why)) => assert!(why.contains("ask the origin"), "{why}"),
            other => panic!("expected unavailable, got {other:?}"),
        }
        // Starting at or before it is fine.
        let mut r = reader(vec![vec![mirrored(0, "seoul", 3)]], 3, false);
        assert_eq!(
            offsets(&r.next_batch(1 << 20).await.expect("batch")),
            vec![3]
        );
    }

    #[test]
    fn retention_at_the_relay_is_never_a_gap() {
        let e = as_relay_error(LogError::OffsetOutOfRange { earliest: 40 }, "t", 0);
        assert!(matches!(e, LogError::Unavailable(_)), "{e:?}");
    }

    #[test]
    fn a_mirror_record_becomes_the_origins_record() {
        let mirrored = LinkRecord {
            offset: 900,
            timestamp_ms: 5,
            key: b"tavern".to_vec(),
            headers: vec![
                ("dtfed-from".into(), b"ann".to_vec()),
                (HEADER_ORIGIN.into(), b"seoul".to_vec()),
                (HEADER_ORIGIN_OFFSET.into(), b"41".to_vec()),
                (HEADER_ORIGIN_TS.into(), b"1700000000000".to_vec()),
            ],
            value: b"{}".to_vec(),
        };
        let r = origin_record(mirrored).expect("origin offset");
        assert_eq!(r.offset, 41);
        assert_eq!(r.timestamp_ms, 1_700_000_000_000);
        assert_eq!(r.headers, vec![("dtfed-from".to_owned(), b"ann".to_vec())]);
        assert_eq!(r.key, b"tavern");
        // What the receiver writes is what the origin's own link would have written.
        assert_eq!(
            r.mirror_headers("seoul"),
            vec![
                ("dtfed-from".to_owned(), b"ann".to_vec()),
                (HEADER_ORIGIN.to_owned(), b"seoul".to_vec()),
                (HEADER_ORIGIN_OFFSET.to_owned(), b"41".to_vec()),
                (HEADER_ORIGIN_TS.to_owned(), b"1700000000000".to_vec()),
            ]
        );
        let bad = LinkRecord {
            headers: vec![(HEADER_ORIGIN_OFFSET.into(), b"x".to_vec())],
            ..r
        };
        assert!(origin_record(bad).is_err());
    }
}
