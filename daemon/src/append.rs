//! The publish path's durable step: append a player's message to the region's local topic
//! (idempotent producer, `acks=all`, key = room, Java-compatible partitioner) and wait for
//! Kafka's acknowledgement.
//!
//! Failure model: a message is either acknowledged by Kafka (all in-sync replicas have it)
//! and [`KafkaAppender::append`] returns where it landed, or the caller gets an error within
//! `kafka.publish_timeout_ms` (plus a small margin) and tells the player:
//! [`AppendError::Unavailable`] when the message never left this daemon,
//! [`AppendError::MaybeStored`] when it was handed to Kafka and its fate is unknown (a
//! timeout can hide a write that happened; `gateway::publish` finds out from the log). Nothing waits forever: the producer's `message.timeout.ms` bounds the
//! delivery, a full local queue is an immediate error, and a guard timer backs both up.
//!
//! An idempotent producer can enter a fatal state (for example after the broker lost the
//! producer's sequence state). A fatal producer refuses everything, so the appender then
//! builds a fresh producer transparently and later appends succeed again. A message that
//! failed was not acknowledged and the player was told; the new producer id means Kafka
//! cannot deduplicate across the two producers, which is fine because nothing is resent
//! behind the player's back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dtfed_proto::record::{LogValue, HEADER_FROM, HEADER_ORIGIN, HEADER_REF};
use dtfed_proto::RoomId;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use tokio::sync::oneshot;

use crate::config::KafkaConfig;
use crate::kafka::settings::producer_config;
use crate::kafka::{default_node_name, TracingContext};

/// `content-type` header value of every record: the value is [`LogValue`] JSON.
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// Header naming the value's encoding.
pub const HEADER_CONTENT_TYPE: &str = "content-type";

/// Where Kafka stored an appended message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The record never left this daemon (local queue full, producer unusable): nothing is
    /// durable.
    #[error("kafka did not acknowledge the message: {0}")]
    Unavailable(String),
    /// The record was handed to Kafka but not acknowledged (timed out, failed after being
    /// sent, producer gone): it may or may not be stored, and may still land. The caller
    /// cannot know without reading the log.
    #[error("kafka did not acknowledge the message, which may still be stored: {0}")]
    MaybeStored(String),
    /// Kafka acknowledged the record without saying where it is: the idempotent producer
    /// re-sent a batch the broker had already written (after a leader change), and the
    /// broker answers a duplicate sequence with no offset. Stored, exactly once, in
    /// `partition`; its offset must be read from the log.
    #[error("kafka stored the message in partition {partition} but did not say at which offset")]
    StoredAtUnknownOffset { partition: i32 },
    #[error("kafka producer: {0}")]
    Setup(String),
}

type Prod = FutureProducer<TracingContext>;

pub struct KafkaAppender {
    topic: String,
    region: String,
    publish_timeout: Duration,
    config: ClientConfig,
    /// The current producer; replaced when it turns fatal. `None` only while dropping.
    producer: Mutex<Option<Arc<Prod>>>,
}

impl std::fmt::Debug for KafkaAppender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaAppender")
            .field("topic", &self.topic)
            .field("region", &self.region)
            .finish()
    }
}

impl KafkaAppender {
    pub fn new(cfg: &KafkaConfig, region: &str) -> Result<KafkaAppender, AppendError> {
        Self::with_node(cfg, region, &default_node_name())
    }

    /// Like [`KafkaAppender::new`] with this daemon's node name in `client.id`.
    pub fn with_node(
        cfg: &KafkaConfig,
        region: &str,
        node: &str,
    ) -> Result<KafkaAppender, AppendError> {
        let config = producer_config(cfg, region, node);
        let producer = build(&config)?;
        Ok(KafkaAppender {
            topic: cfg.local_topic.clone(),
            region: region.to_owned(),
            publish_timeout: cfg.publish_timeout(),
            config,
            producer: Mutex::new(Some(Arc::new(producer))),
        })
    }

    /// `kafka.publish_timeout_ms`: every append ends within it (and a one-second guard).
    pub fn publish_timeout(&self) -> Duration {
        self.publish_timeout
    }

    /// The topic this appender writes to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<Prod>>> {
        match self.producer.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn current(&self) -> Result<Arc<Prod>, AppendError> {
        self.slot()
            .as_ref()
            .map(Arc::clone)
            .ok_or_else(|| AppendError::Unavailable("the producer is shut down".into()))
    }

    /// Replaces `failed` with a new producer if it is still the current one and is in a
    /// fatal state. The old one is dropped off the async runtime (dropping blocks while it
    /// purges and joins its thread).
    fn recover_if_fatal(&self, failed: &Arc<Prod>) {
        let Some((code, reason)) = failed.client().fatal_error() else {
            return;
        };
        let mut guard = self.slot();
        match guard.as_ref() {
            Some(current) if Arc::ptr_eq(current, failed) => {}
            _ => return, // Someone else replaced it already.
        }
        match build(&self.config) {
            Ok(fresh) => {
                tracing::warn!(
                    topic = %self.topic,
                    %code,
                    reason,
                    "Kafka producer hit a fatal error; replaced it with a new one"
                );
                let old = guard.replace(Arc::new(fresh));
                drop(guard);
                if let Some(old) = old {
                    release(old);
                }
            }
            Err(e) => {
                tracing::error!(
                    topic = %self.topic,
                    %code,
                    reason,
                    error = %e,
                    "Kafka producer hit a fatal error and a new one could not be built"
                );
            }
        }
    }

    /// Appends one message; resolves once Kafka acknowledged it (or did not, within
    /// `kafka.publish_timeout_ms`).
    pub async fn append(&self, room: &RoomId, value: &LogValue) -> Result<Appended, AppendError> {
        self.append_publish(room, value, None, None).await
    }

    /// [`KafkaAppender::append`] of a player's publish with its `ref`, recorded in the
    /// [`HEADER_REF`] header so that the log can tell whether a publish was stored.
    /// `queued` is dropped as soon as the record is in the producer's queue (or refused):
    /// appends queued one after the other are stored in that order.
    pub async fn append_publish(
        &self,
        room: &RoomId,
        value: &LogValue,
        reference: Option<&str>,
        queued: Option<oneshot::Sender<()>>,
    ) -> Result<Appended, AppendError> {
        let mut producer = self.current()?;
        if producer.client().fatal_error().is_some() {
            self.recover_if_fatal(&producer);
            release(producer);
            producer = self.current()?;
        }
        let result = self
            .append_with(&producer, room, value, reference, queued)
            .await;
        release(producer);
        result
    }

    async fn append_with(
        &self,
        producer: &Arc<Prod>,
        room: &RoomId,
        value: &LogValue,
        reference: Option<&str>,
        queued: Option<oneshot::Sender<()>>,
    ) -> Result<Appended, AppendError> {
        let payload = value.to_json();
        let mut headers = OwnedHeaders::new_with_capacity(4)
            .insert(Header {
                key: HEADER_ORIGIN,
                value: Some(self.region.as_str()),
            })
            .insert(Header {
                key: HEADER_FROM,
                value: Some(value.from.as_str()),
            })
            .insert(Header {
                key: HEADER_CONTENT_TYPE,
                value: Some(CONTENT_TYPE_JSON),
            });
        if let Some(r) = reference {
            headers = headers.insert(Header {
                key: HEADER_REF,
                value: Some(r),
            });
        }
        let record = FutureRecord::to(&self.topic)
            .key(room.as_str())
            .payload(&payload)
            .headers(headers);
        let sent = producer.send_result(record);
        drop(queued);
        let delivery = match sent {
            Ok(d) => d,
            Err((e, _)) => {
                self.recover_if_fatal(producer);
                return Err(unavailable(&e));
            }
        };
        // librdkafka fails the message after message.timeout.ms; the guard only matters if
        // something below misbehaves.
        let guard = self.publish_timeout + Duration::from_secs(1);
        match tokio::time::timeout(guard, delivery).await {
            // Never acknowledge a player with an offset that is not one.
            Ok(Ok(Ok(d))) if d.offset < 0 => Err(AppendError::StoredAtUnknownOffset {
                partition: d.partition,
            }),
            Ok(Ok(Ok(d))) => Ok(Appended {
                partition: d.partition,
                offset: d.offset,
            }),
            Ok(Ok(Err((e, _)))) => {
                self.recover_if_fatal(producer);
                Err(not_acknowledged(&e))
            }
            Ok(Err(_canceled)) => Err(AppendError::MaybeStored(
                "the producer was shut down before Kafka answered".into(),
            )),
            Err(_) => Err(AppendError::MaybeStored(format!(
                "no answer from Kafka within {guard:?}"
            ))),
        }
    }

    /// Waits up to `timeout` for every in-flight message to be acknowledged.
    ///
    /// Blocking: call it from a blocking context (`spawn_blocking`) or at shutdown.
    pub fn flush(&self, timeout: Duration) -> Result<(), AppendError> {
        self.current()?
            .flush(timeout)
            .map_err(|e| AppendError::Unavailable(format!("flush: {e}")))
    }
}

impl Drop for KafkaAppender {
    fn drop(&mut self) {
        // Dropping a producer blocks (it purges what is still queued, waits up to 500 ms and
        // joins its thread): keep that off the async runtime. Call `flush` first to deliver
        // what is in flight.
        if let Some(p) = self.slot().take() {
            release(p);
        }
    }
}

fn build(config: &ClientConfig) -> Result<Prod, AppendError> {
    FutureProducer::from_config_and_context(config, TracingContext::for_config(config))
        .map_err(|e| AppendError::Setup(e.to_string()))
}

/// Drops this handle on a producer; if it was the last one (the producer was replaced while
/// this append was in flight), the blocking teardown happens off the async runtime.
fn release(p: Arc<Prod>) {
    if let Some(last) = Arc::into_inner(p) {
        crate::kafka::drop_off_runtime(last);
    }
}

/// A delivery failure: the record was queued, and may have been sent before it failed
/// (librdkafka knows whether it was, but does not say through this API), unless it was
/// purged from the queue.
fn not_acknowledged(e: &KafkaError) -> AppendError {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::PurgeQueue) => unavailable(e),
        _ => match unavailable(e) {
            AppendError::Unavailable(text) => AppendError::MaybeStored(text),
            other => other,
        },
    }
}

fn unavailable(e: &KafkaError) -> AppendError {
    let text = match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::QueueFull) => {
            "the local send queue is full (Kafka is slow or down)".to_owned()
        }
        Some(RDKafkaErrorCode::MessageTimedOut) => {
            format!("not acknowledged in time ({e})")
        }
        _ => e.to_string(),
    };
    AppendError::Unavailable(text)
}
