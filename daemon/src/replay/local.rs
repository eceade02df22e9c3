//! Replay of this region's own messages: a room's records of the local topic from an offset
//! on, read by pooled group-less consumers; says what retention has already deleted.
//!

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dtfed_proto::client::Body;
use dtfed_proto::record::{LogValue, HEADER_FROM, HEADER_REF};
use dtfed_proto::RoomId;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::Semaphore;

use crate::config::KafkaConfig;
use crate::kafka::settings::replay_reader_config;
use crate::kafka::{default_node_name, drop_off_runtime, partition_for, TracingContext};
use crate::replay::{
    ReadLimit, ReplayError, RoomRead, RoomRecords, MAX_CONCURRENT_READS, READ_LIMIT, READ_TIMEOUT,
};

type Reader = BaseConsumer<TracingContext>;

pub struct RoomLogReader {
    topic: String,
    region: String,
    partitions: i32,
    config: ClientConfig,
    idle: Mutex<Vec<Reader>>,
    slots: Arc<Semaphore>,
    timeout: Duration,
    limit: ReadLimit,
}

impl std::fmt::Debug for RoomLogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomLogReader")
            .field("topic", &self.topic)
            .field("partitions", &self.partitions)
            .finish()
    }
}

impl RoomLogReader {
    pub fn new(
        cfg: &KafkaConfig,
        region: &str,
        partitions: i32,
    ) -> Result<RoomLogReader, ReplayError> {
        Self::with_node(cfg, region, &default_node_name(), partitions)
    }

    /// Like [`RoomLogReader::new`] with this daemon's node name in `client.id`.
    pub fn with_node(
        cfg: &KafkaConfig,
        region: &str,
        node: &str,
        partitions: i32,
    ) -> Result<RoomLogReader, ReplayError> {
        if partitions < 1 {
            return Err(ReplayError::Kafka(format!(
                "topic {} has {partitions} partitions",
                cfg.local_topic
            )));
        }
        let config = replay_reader_config(cfg, region, node);
        // Build one now so a bad configuration fails at start, not at the first resume.
        let first = build(&config)?;
        Ok(RoomLogReader {
            topic: cfg.local_topic.clone(),
            region: region.to_owned(),
            partitions,
            config,
            idle: Mutex::new(vec![first]),
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT_READS)),
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

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Reader>> {
        match self.idle.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The records of `room` from the local topic with `after < offset < before`.
    /// `after = None` reads from the earliest retained offset; `before = None` up to the
    /// high watermark at the time of the call.
    pub async fn read_room(
        &self,
        room: &RoomId,
        after: Option<i64>,
        before: Option<i64>,
    ) -> Result<RoomRead, ReplayError> {
        let what = format!("reading room {room} from {}", self.topic);
        let job = Job {
            topic: self.topic.clone(),
            region: self.region.clone(),
            partition: partition_for(room, self.partitions),
            room: room.clone(),
            after,
            before,
            deadline: Instant::now() + self.timeout,
            limit: self.limit,
        };
        self.run(&what, job.deadline, move |reader| job.run(reader))
            .await
    }

    /// The offset at which `from`'s publish of `body` with `reference` in `room` was stored, looking
    /// at the records of the room's partition appended from `since_ms` (producer time, ms)
    /// on; `None` when it is not there. The scan stops at the partition's end, or at the
    /// first record stamped later than `until_ms`.
    pub async fn find_publish(
        &self,
        room: &RoomId,
        from: &str,
        reference: &str,
        body: &Body,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Option<i64>, ReplayError> {
        let what = format!("looking for a publish in room {room} in {}", self.topic);
        let find = FindPublish {
            job: Job {
                topic: self.topic.clone(),
                region: self.region.clone(),
                partition: partition_for(room, self.partitions),
                room: room.clone(),
                after: None,
                before: None,
                deadline: Instant::now() + self.timeout,
                limit: self.limit,
            },
            from: from.to_owned(),
            reference: reference.to_owned(),
            body: body.as_json().to_owned(),
            since_ms,
            until_ms,
        };
        let deadline = find.job.deadline;
        self.run(&what, deadline, move |reader| find.run(reader))
            .await
    }

    /// Runs `job` on a pooled consumer on a blocking thread once a read slot is free, all
    /// within `deadline`.
    async fn run<T, F>(&self, what: &str, deadline: Instant, job: F) -> Result<T, ReplayError>
    where
        T: Send + 'static,
        F: FnOnce(&Reader) -> Result<T, ReplayError> + Send + 'static,
    {
        let timed_out = || ReplayError::Kafka(format!("{what} timed out after {:?}", self.timeout));
        let slot =
            tokio::time::timeout_at(deadline.into(), Arc::clone(&self.slots).acquire_owned())
                .await
                .map_err(|_| timed_out())?
                .map_err(|_| ReplayError::Kafka("the replay reader is closed".into()))?;
        let reader = match self.idle().pop() {
            Some(r) => r,
            None => build(&self.config)?,
        };
        // The slot goes with the blocking read: if the caller gives up, the read still
        // counts until it ends.
        let handle = tokio::task::spawn_blocking(move || {
            let result = job(&reader);
            // Leave nothing of this read behind for the next one on this consumer.
            let _ = reader.unassign();
            for _ in 0..100_000 {
                if reader.poll(Duration::ZERO).is_none() {
                    break;
                }
            }
            drop(slot);
            (reader, result)
        });
        // The blocking read stops by itself at the deadline; the guard is for a librdkafka
        // call that overruns its own timeout.
        let guard = (deadline + Duration::from_secs(2)).into();
        match tokio::time::timeout_at(guard, handle).await {
            Ok(Ok((reader, Ok(read)))) => {
                self.idle().push(reader);
                Ok(read)
            }
            Ok(Ok((reader, Err(e)))) => {
                // Don't reuse a consumer in an unknown state.
                drop_off_runtime(reader);
                Err(e)
            }
            Ok(Err(e)) => Err(ReplayError::Kafka(format!("replay task failed: {e}"))),
            Err(_) => Err(timed_out()),
        }
    }
}

impl Drop for RoomLogReader {
    fn drop(&mut self) {
        // Closing a consumer blocks briefly; keep that off the async runtime.
        let idle = std::mem::take(&mut *self.idle());
        if idle.is_empty() {
            return;
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            drop(tokio::task::spawn_blocking(move || drop(idle)));
        }
    }
}

fn build(config: &ClientConfig) -> Result<Reader, ReplayError> {
    BaseConsumer::from_config_and_context(config, TracingContext::for_config(config))
        .map_err(|e| ReplayError::Kafka(format!("cannot create a replay consumer: {e}")))
}

/// One read, run on a blocking thread.
struct Job {
    topic: String,
    region: String,
    partition: i32,
    room: RoomId,
    after: Option<i64>,
    before: Option<i64>,
    deadline: Instant,
    limit: ReadLimit,
}

impl Job {
    fn left(&self) -> Result<Duration, ReplayError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(ReplayError::Kafka(format!(
                "reading room {} from {}/{} timed out",
                self.room, self.topic, self.partition
            )))
        } else {
            Ok(left)
        }
    }

    fn err(&self, what: &str, e: &KafkaError) -> ReplayError {
        ReplayError::Kafka(format!(
            "{what} {}/{} (room {}): {e}",
            self.topic, self.partition, self.room
        ))
    }

    fn run(&self, reader: &Reader) -> Result<RoomRead, ReplayError> {
        let p = self.partition;
        let (low, high) = reader
            .fetch_watermarks(&self.topic, p, self.left()?)
            .map_err(|e| self.err("watermarks of", &e))?;
        let start = match self.after {
            Some(a) => a.saturating_add(1).max(low),
            None => low,
        };
        let end = match self.before {
            Some(b) => b.min(high),
            None => high,
        };
        if start >= end {
            return Ok(RoomRead {
                partition: p,
                earliest: low,
                records: Vec::new(),
                stopped_at: None,
            });
        }
        let mut found = RoomRecords::default();
        let mut stopped_at = None;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, p, Offset::Offset(start))
            .map_err(|e| self.err("offset for", &e))?;
        reader.assign(&tpl).map_err(|e| self.err("assigning", &e))?;
        let room = self.room.as_str().as_bytes();
        // The last offset handed out; the log is immutable, so a record is taken at most
        // once and only in offset order whatever the consumer queue holds.
        let mut last = start - 1;
        while last < end - 1 {
            let wait = self.left()?.min(Duration::from_millis(200));
            let m = match reader.poll(wait) {
                None => continue,
                Some(Ok(m)) => m,
                Some(Err(KafkaError::PartitionEOF(ep))) if ep == p => {
                    // End of the partition: everything below the high watermark was handed
                    // out, unless this is a stale signal; the position tells.
                    if self.position(reader)? >= end {
                        break;
                    }
                    continue;
                }
                Some(Err(KafkaError::PartitionEOF(_))) => continue,
                Some(Err(e)) => return Err(self.err("reading", &e)),
            };
            if m.topic() != self.topic || m.partition() != p {
                continue;
            }
            let o = m.offset();
            if o <= last || o < start {
                continue;
            }
            if o >= end {
                break;
            }
            last = o;
            if m.key() == Some(room) {
                found.keep(m.payload(), &self.room, &self.region, p, o);
            }
            if o < end - 1 && found.reached(&self.limit, o - start + 1) {
                stopped_at = Some(o);
                break;
            }
        }
        Ok(RoomRead {
            partition: p,
            earliest: low,
            records: found.records,
            stopped_at,
        })
    }

    fn position(&self, reader: &Reader) -> Result<i64, ReplayError> {
        let pos = reader.position().map_err(|e| self.err("position of", &e))?;
        Ok(pos
            .find_partition(&self.topic, self.partition)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
            .unwrap_or(-1))
    }
}

/// A search for one publish, run on a blocking thread.
struct FindPublish {
    /// Topic, partition, room and deadline (its range fields are unused).
    job: Job,
    from: String,
    reference: String,
    /// The body's JSON text.
    body: String,
    since_ms: i64,
    until_ms: i64,
}

impl FindPublish {
    fn run(&self, reader: &Reader) -> Result<Option<i64>, ReplayError> {
        let job = &self.job;
        let p = job.partition;
        let (_, high) = reader
            .fetch_watermarks(&job.topic, p, job.left()?)
            .map_err(|e| job.err("watermarks of", &e))?;
        let mut by_time = TopicPartitionList::new();
        by_time
            .add_partition_offset(&job.topic, p, Offset::Offset(self.since_ms.max(0)))
            .map_err(|e| job.err("time for", &e))?;
        let found = reader
            .offsets_for_times(by_time, job.left()?)
            .map_err(|e| job.err("offsets by time of", &e))?;
        let start = match found.find_partition(&job.topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            // Nothing stamped at or after `since_ms`.
            _ => return Ok(None),
        };
        if start >= high {
            return Ok(None);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&job.topic, p, Offset::Offset(start))
            .map_err(|e| job.err("offset for", &e))?;
        reader.assign(&tpl).map_err(|e| job.err("assigning", &e))?;
        let room = job.room.as_str().as_bytes();
        let mut last = start - 1;
        while last < high - 1 {
            let wait = job.left()?.min(Duration::from_millis(200));
            let m = match reader.poll(wait) {
                None => continue,
                Some(Ok(m)) => m,
                Some(Err(KafkaError::PartitionEOF(ep))) if ep == p => {
                    if job.position(reader)? >= high {
                        break;
                    }
                    continue;
                }
                Some(Err(KafkaError::PartitionEOF(_))) => continue,
                Some(Err(e)) => return Err(job.err("reading", &e)),
            };
            if m.topic() != job.topic || m.partition() != p {
                continue;
            }
            let o = m.offset();
            if o <= last || o < start {
                continue;
            }
            if o >= high {
                break;
            }
            last = o;
            if m.timestamp().to_millis().is_some_and(|t| t > self.until_ms) {
                break;
            }
            if m.key() == Some(room)
                && header(&m, HEADER_REF) == Some(self.reference.as_bytes())
                && header(&m, HEADER_FROM) == Some(self.from.as_bytes())
                && m.payload()
                    .and_then(|p| LogValue::from_json(p).ok())
                    .is_some_and(|v| v.body.as_json() == self.body)
            {
                return Ok(Some(o));
            }
        }
        Ok(None)
    }
}

fn header<'a, M: Message>(m: &'a M, key: &str) -> Option<&'a [u8]> {
    m.headers()?
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
}
