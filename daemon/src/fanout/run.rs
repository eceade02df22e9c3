//! The owner task of one daemon's fan-out ([`Run`]): consume, decode, apply each ready batch
//! to the bus in one call, store offsets only for what the bus holds, retry a failed batch
//! whole with backoff, and isolate a record the bus refuses for good (quarantine). See the
//! module docs of `fanout` for the guarantee.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dtfed_proto::record::now_ms;
use dtfed_proto::{LogRecord, RoomId};
use futures::FutureExt;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::RDKafkaErrorCode;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::bus::{Bus, BusError};
use crate::fanout::decode::{decode_record, Skip, SKIP_QUARANTINED};
use crate::fanout::{
    Owner, OwnerContext, Shared, MAX_BATCH, QUARANTINE_AFTER, RETRY_FIRST, RETRY_MAX,
    SHUTDOWN_GRACE,
};
use crate::kafka::{ErrorLog, TracingContext};
use crate::metrics::PartitionLabel;

/// The owner task.
pub(super) struct Run {
    pub(super) consumer: Owner,
    /// To build a new consumer if this one turns fatal.
    pub(super) config: rdkafka::ClientConfig,
    pub(super) topics: Vec<String>,
    pub(super) shared: Arc<Shared>,
    pub(super) bus: Arc<dyn Bus>,
    pub(super) local_topic: String,
    pub(super) region: String,
    pub(super) shutdown: CancellationToken,
}

/// What one consumed record turned into, decoded before any await so that the borrowed
/// librdkafka message is released at once.
pub(super) enum Item {
    Record(LogRecord),
    Poison(Skip),
}

impl Run {
    pub(super) async fn run(mut self) {
        let mut errors = ErrorLog::default();
        loop {
            let next = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                m = self.consumer.recv() => m,
            };
            let mut batch: Vec<(String, i32, i64, Item)> = Vec::new();
            match next {
                Ok(m) => {
                    let item = self.decode(&m);
                    batch.push((m.topic().to_owned(), m.partition(), m.offset(), item));
                }
                Err(e) => {
                    if let Some(suppressed) = errors.note(&e) {
                        tracing::warn!(
                            region = %self.region,
                            error = %e,
                            suppressed,
                            "fan-out consumer error (repeats are logged every 10 s)"
                        );
                    }
                    if matches!(e, KafkaError::MessageConsumptionFatal(_)) {
                        // Only static group membership (not used here) is documented to end
                        // like this; whatever the cause, a fatal consumer never recovers,
                        // so rejoin with a new one.
                        tracing::error!(region = %self.region, error = %e, "fan-out consumer is in a fatal state; rejoining with a new consumer");
                        if !self.replace_consumer().await {
                            break;
                        }
                        continue;
                    }
                    // Errors come from polling, not from a record; don't spin on them.
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                    continue;
                }
            }
            // Take whatever else is ready without waiting, so that partitions are applied
            // side by side: one bus round trip per record and partition would cap the region
            // at 1 / RTT messages per second.
            while batch.len() < MAX_BATCH {
                match self.consumer.recv().now_or_never() {
                    Some(Ok(m)) => {
                        let item = self.decode(&m);
                        batch.push((m.topic().to_owned(), m.partition(), m.offset(), item));
                    }
                    Some(Err(_)) | None => break,
                }
            }
            // A rebalance served while draining may have revoked partitions: their records
            // are the next owner's (it replays them from the commit made on revocation).
            // Applying them here could race the new owner and break the room's order.
            let mut groups: BTreeMap<(String, i32), Vec<(i64, Item)>> = BTreeMap::new();
            {
                let owned = self.shared.owned();
                for (topic, partition, offset, item) in batch {
                    if owned.contains_key(&(topic.clone(), partition)) {
                        groups
                            .entry((topic, partition))
                            .or_default()
                            .push((offset, item));
                    }
                }
            }
            // Poison records are stepped over; the rest go to the bus in one call, each
            // partition's records in offset order (a room lives on one partition per topic,
            // so that is each room's order too).
            let mut records = Vec::new();
            let mut last_of: Vec<((String, i32), i64)> = Vec::with_capacity(groups.len());
            for ((topic, partition), items) in groups {
                let Some(&(last, _)) = items.last() else {
                    continue;
                };
                for (offset, item) in items {
                    match item {
                        Item::Poison(skip) => {
                            tracing::warn!(
                                region = %self.region,
                                topic,
                                partition,
                                offset,
                                reason = skip.reason,
                                detail = %skip.detail,
                                "fan-out: skipping a record that is not a chat message of this topic's origin"
                            );
                            self.shared.skipped(skip.reason);
                        }
                        Item::Record(rec) => records.push(rec),
                    }
                }
                last_of.push(((topic, partition), last));
            }
            if !records.is_empty() {
                let span =
                    tracing::info_span!("fanout", region = %self.region, records = records.len());
                if !self.apply(&records).instrument(span).await {
                    break; // Shutdown while the bus was failing: nothing more stored.
                }
            }
            for ((topic, partition), offset) in last_of {
                if let Err(e) = self.consumer.store_offset(&topic, partition, offset) {
                    // The partition was revoked meanwhile (max.poll.interval exceeded while
                    // the bus was down): the next owner re-applies it, which the bus tolerates.
                    tracing::debug!(region = %self.region, topic, partition, offset, error = %e, "fan-out: offset not stored");
                }
                self.shared.advanced(&topic, partition, offset);
            }
        }
        self.close().await;
    }

    /// Swaps the consumer for a new one subscribed to the same topics; false if that
    /// failed (the owner then stops, which `status()` shows as no partitions).
    pub(super) async fn replace_consumer(&mut self) -> bool {
        let ctx = OwnerContext {
            log: TracingContext::for_config(&self.config),
            shared: Arc::clone(&self.shared),
        };
        let fresh: Owner = match StreamConsumer::from_config_and_context(&self.config, ctx) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(region = %self.region, error = %e, "fan-out: cannot create a new consumer");
                return false;
            }
        };
        let names: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        if let Err(e) = fresh.subscribe(&names) {
            tracing::error!(region = %self.region, error = %e, "fan-out: cannot subscribe the new consumer");
            return false;
        }
        let old = std::mem::replace(&mut self.consumer, fresh);
        // Whatever the old consumer owned is gone with it.
        {
            let mut owned = self.shared.owned();
            for (topic, partition) in std::mem::take(&mut *owned).into_keys() {
                self.shared
                    .metrics
                    .fanout_lag
                    .remove(&PartitionLabel { topic, partition });
            }
        }
        drop(tokio::task::spawn_blocking(move || drop(old)));
        true
    }

    pub(super) fn decode(&self, m: &BorrowedMessage<'_>) -> Item {
        if m.topic() == self.local_topic {
            if let Some(ts) = m.timestamp().to_millis() {
                let delay_ms = now_ms().saturating_sub(ts).max(0);
                self.shared
                    .metrics
                    .hop_fanout_fetch
                    .observe(delay_ms as f64 / 1000.0);
            }
        }
        match decode_record(m, &self.local_topic, &self.region) {
            Ok(r) => Item::Record(r),
            Err(why) => Item::Poison(why),
        }
    }

    /// Applies `records` until the bus took (or quarantined) every one; false if shutdown
    /// came first.
    ///
    /// The hot path is one [`Bus::apply_batch`] for the whole batch. A failure that may pass
    /// (Redis unreachable, busy, out of memory: every room alike) retries the whole batch
    /// with backoff, the partitions waiting together. A permanent one
    /// ([`BusError::is_permanent`]: a room's script failing, a key of the wrong type) is a
    /// room's, and retrying the batch would fail forever and stall every partition in it:
    /// the batch is then applied room by room ([`Run::apply_room`]).
    pub(super) async fn apply(&self, records: &[LogRecord]) -> bool {
        let mut backoff = RETRY_FIRST;
        let mut failures: u64 = 0;
        loop {
            let e = match self.try_apply(records).await {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(
                            records = records.len(),
                            failures,
                            "bus apply succeeded after retries"
                        );
                    }
                    return true;
                }
                Err(None) => return false,
                Err(Some(e)) => e,
            };
            if e.is_permanent() {
                tracing::warn!(
                    region = %self.region,
                    records = records.len(),
                    error = %e,
                    "the bus refused part of a batch; applying it room by room"
                );
                return self.apply_by_room(records).await;
            }
            failures += 1;
            if failures <= 3 || failures % 30 == 0 {
                let first = records.first();
                tracing::warn!(
                    region = %self.region,
                    records = records.len(),
                    first_room = %first.map(|r| r.room.as_str()).unwrap_or("-"),
                    first_offset = first.map(|r| r.offset).unwrap_or(-1),
                    error = %e,
                    failures,
                    retry_in = ?backoff,
                    "bus apply failed; retrying (the partition waits)"
                );
            }
            if !self.pause(backoff).await {
                return false;
            }
            backoff = (backoff * 2).min(RETRY_MAX);
        }
    }

    /// One bus call for `records`: `Err(None)` if shutdown came first (after the grace).
    pub(super) async fn try_apply(&self, records: &[LogRecord]) -> Result<(), Option<BusError>> {
        let started = std::time::Instant::now();
        let attempt = tokio::select! {
            r = self.bus.apply_batch(records) => r,
            _ = async {
                self.shutdown.cancelled().await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => return Err(None),
        };
        let published = attempt.map_err(Some)?;
        let metrics = &self.shared.metrics;
        metrics
            .hop_bus_apply
            .observe(started.elapsed().as_secs_f64());
        let n = published.iter().filter(|p| p.is_some()).count();
        metrics.fanout_applied.inc_by(n as u64);
        Ok(())
    }

    /// Waits `delay`; false if shutdown came first.
    pub(super) async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    /// The slow path of [`Run::apply`]: each room's records on their own, in order, so that
    /// one room the bus refuses holds up no other (rooms are independent; partition order
    /// is only ever room order).
    pub(super) async fn apply_by_room(&self, records: &[LogRecord]) -> bool {
        let mut rooms: Vec<(&RoomId, Vec<LogRecord>)> = Vec::new();
        for rec in records {
            match rooms.iter_mut().find(|(room, _)| **room == rec.room) {
                Some((_, recs)) => recs.push(rec.clone()),
                None => rooms.push((&rec.room, vec![rec.clone()])),
            }
        }
        for (_, recs) in rooms {
            if !self.apply_room(&recs).await {
                return false;
            }
        }
        true
    }

    /// Applies one room's records (in offset order): all at once, and after a permanent
    /// failure one at a time. A record the bus refuses [`QUARANTINE_AFTER`] times in a row
    /// is quarantined: logged at error, counted (`fanout_skipped{reason="quarantined"}`),
    /// and stepped over; it stays in the log. After one quarantine the room's next records
    /// get one try each. Transient failures are retried with backoff, as on the hot path.
    pub(super) async fn apply_room(&self, recs: &[LogRecord]) -> bool {
        let mut next = 0;
        let mut one_by_one = false;
        let mut room_refused = false;
        let mut refusals = 0u32;
        let mut backoff = RETRY_FIRST;
        while let Some(rest) = recs.get(next..).filter(|r| !r.is_empty()) {
            let take = if one_by_one { &rest[..1] } else { rest };
            let e = match self.try_apply(take).await {
                Ok(()) => {
                    next += take.len();
                    refusals = 0;
                    backoff = RETRY_FIRST;
                    continue;
                }
                Err(None) => return false,
                Err(Some(e)) => e,
            };
            if !e.is_permanent() {
                tracing::warn!(region = %self.region, room = %rest[0].room, error = %e, retry_in = ?backoff, "bus apply failed; retrying");
                if !self.pause(backoff).await {
                    return false;
                }
                backoff = (backoff * 2).min(RETRY_MAX);
                continue;
            }
            if !one_by_one {
                // What was applied is a prefix of the room's records: find the one refused.
                one_by_one = true;
                continue;
            }
            refusals += 1;
            let rec = &rest[0];
            if refusals < QUARANTINE_AFTER && !room_refused {
                if !self.pause(backoff).await {
                    return false;
                }
                backoff = (backoff * 2).min(RETRY_MAX);
                continue;
            }
            tracing::error!(
                region = %self.region,
                room = %rec.room,
                origin = %rec.origin,
                partition = rec.partition,
                offset = rec.offset,
                attempts = refusals,
                error = %e,
                "fan-out: the bus keeps refusing this record; quarantined (skipped, still in the log)"
            );
            self.shared.skipped(SKIP_QUARANTINED);
            room_refused = true;
            refusals = 0;
            backoff = RETRY_FIRST;
            next += 1;
        }
        true
    }

    /// Stops owning: commit what the bus holds, leave the group so the partitions move at
    /// once, and close the consumer. librdkafka's close blocks (it serves the revocation
    /// callback and waits for LeaveGroup), so it runs off the async runtime.
    pub(super) async fn close(self) {
        let Run {
            consumer,
            region,
            shared,
            ..
        } = self;
        let node = shared.node.clone();
        let done = tokio::task::spawn_blocking(move || {
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
                Err(e) => {
                    tracing::warn!(region = %region, error = %e, "fan-out: final commit failed")
                }
            }
            consumer.unsubscribe();
            drop(consumer);
            tracing::info!(region = %region, node = %node, "fan-out owner left its group");
        })
        .await;
        if let Err(e) = done {
            tracing::error!(error = %e, "fan-out: closing the consumer failed");
        }
    }
}
