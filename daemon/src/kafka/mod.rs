//! Kafka plumbing shared by the publish path, the fan-out owners, replay and mirroring:
//! every client's settings ([`settings`]), topic creation and validation, the
//! Java-compatible room → partition mapping, librdkafka handles dropped off the async
//! runtime, and librdkafka's mock cluster for `dtfed demo` ([`mock`]).
//!
//! Every client this daemon builds starts from [`client_config`] and uses a
//! [`TracingContext`] (or a context that delegates to one), so librdkafka's own log lines and
//! global errors reach `tracing` under the target `librdkafka`, whatever `log` bridge is or is
//! not installed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dtfed_proto::RoomId;
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;

pub mod mock;
pub mod settings;

use mock::create_on_mock;
pub use mock::MockKafka;
pub use settings::client_config;

#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("kafka at {brokers}: {detail}")]
    Unreachable { brokers: String, detail: String },
    #[error("topic {topic}: {detail}")]
    Topic { topic: String, detail: String },
}

/// How long [`ensure_topic`] keeps trying a cluster that is still starting.
pub const ENSURE_TOPIC_DEADLINE: Duration = Duration::from_secs(30);

/// A librdkafka client context that sends librdkafka's log lines and global errors to
/// `tracing` (target `librdkafka`), tagged with the client id.
#[derive(Debug)]
pub struct TracingContext {
    pub client_id: String,
    last_error: Mutex<Option<(String, Instant)>>,
}

impl TracingContext {
    pub fn new(client_id: impl Into<String>) -> Self {
        TracingContext {
            client_id: client_id.into(),
            last_error: Mutex::new(None),
        }
    }

    /// The context for a client built from `cfg` (reads its `client.id`).
    pub fn for_config(cfg: &ClientConfig) -> Self {
        TracingContext::new(cfg.get("client.id").unwrap_or("dtfed"))
    }
}

impl ClientContext for TracingContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        let client = self.client_id.as_str();
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                tracing::error!(target: "librdkafka", client, fac, "{log_message}")
            }
            // librdkafka says "error" for transient trouble it retries (a refused connection);
            // what a failure means is decided by the code that owns the client.
            RDKafkaLogLevel::Error | RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", client, fac, "{log_message}")
            }
            RDKafkaLogLevel::Notice => {
                tracing::info!(target: "librdkafka", client, fac, "{log_message}")
            }
            RDKafkaLogLevel::Info => {
                tracing::debug!(target: "librdkafka", client, fac, "{log_message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::trace!(target: "librdkafka", client, fac, "{log_message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Global errors (all brokers down, authentication, ...) are transient in librdkafka
        // unless fatal; the code that owns the client decides what a failure means.
        // A refused or dropped connection was logged already (librdkafka's FAIL log line).
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::BrokerTransportFailure) {
            tracing::debug!(target: "librdkafka", client = %self.client_id, %error, "{reason}");
            return;
        }
        // rdkafka hands a producer's error events to this callback twice; say it once.
        let now = Instant::now();
        {
            let mut last = match self.last_error.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            if let Some((text, at)) = last.as_ref() {
                if text == reason && now.duration_since(*at) < Duration::from_millis(100) {
                    return;
                }
            }
            *last = Some((reason.to_owned(), now));
        }
        tracing::warn!(target: "librdkafka", client = %self.client_id, %error, "{reason}");
    }

    fn stats(&self, _statistics: rdkafka::Statistics) {
        // Statistics are only enabled where a context overrides this.
    }
}

impl rdkafka::consumer::ConsumerContext for TracingContext {}

/// Inside `impl ClientContext for X`: hands librdkafka's log lines and global errors to the
/// [`TracingContext`] in field `$field` of a context that adds hooks of its own (statistics,
/// rebalances).
macro_rules! log_to_tracing {
    ($field:ident) => {
        fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
            self.$field.log(level, fac, log_message);
        }

        fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
            self.$field.error(error, reason);
        }
    };
}
pub(crate) use log_to_tracing;

/// Says a repeated consumer error (every poll while Kafka is down) once per
/// [`ERROR_LOG_EVERY`], with how many times it repeated (the fan-out owner and the mirror
/// lease both poll through outages).
#[derive(Default)]
pub struct ErrorLog {
    last: Option<(String, Instant)>,
    repeats: u64,
}

/// How often [`ErrorLog`] repeats the same error.
pub const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

impl ErrorLog {
    /// `Some(times it was suppressed since last said)` if `e` should be logged now.
    pub fn note(&mut self, e: &KafkaError) -> Option<u64> {
        let text = e.to_string();
        let now = Instant::now();
        match &self.last {
            Some((t, at)) if *t == text && now.duration_since(*at) < ERROR_LOG_EVERY => {
                self.repeats += 1;
                None
            }
            _ => {
                self.last = Some((text, now));
                Some(std::mem::take(&mut self.repeats))
            }
        }
    }
}

/// `topic/partition,...` of a partition list, for logs (`none` when empty).
pub fn tpl_names(tpl: &rdkafka::TopicPartitionList) -> String {
    let v: Vec<String> = tpl
        .elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(",")
    }
}

/// A node name for clients created without one: `<hostname>-<pid>`.
pub fn default_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "node".into());
    format!("{host}-{}", std::process::id())
}

/// Error codes after which creating the topic again cannot succeed.
/// How long `InvalidReplicationFactor` counts as "the broker is still registering".
const REPLICATION_FACTOR_GRACE: Duration = Duration::from_secs(10);

fn permanent_create_error(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::InvalidReplicationFactor
            | RDKafkaErrorCode::InvalidPartitions
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::InvalidReplicaAssignment
            | RDKafkaErrorCode::InvalidConfig
            | RDKafkaErrorCode::PolicyViolation
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
    )
}

/// Creates `topic` with `partitions` partitions if it does not exist; returns the partition
/// count the topic actually has.
///
/// Tolerates a topic that exists already (whatever its partition count: the count returned
/// is the real one) and a cluster that is still starting: transient failures are retried for
/// up to [`ENSURE_TOPIC_DEADLINE`]. On a [`MockKafka`] of this process (which does not
/// implement CreateTopics) the topic is created through the mock's own API; any other
/// cluster without CreateTopics works as long as the topic exists.
pub async fn ensure_topic(
    cfg: &KafkaConfig,
    topic: &str,
    partitions: i32,
) -> Result<i32, KafkaSetupError> {
    ensure_topic_within(cfg, topic, partitions, ENSURE_TOPIC_DEADLINE).await
}

/// [`ensure_topic`] with an explicit deadline.
pub async fn ensure_topic_within(
    cfg: &KafkaConfig,
    topic: &str,
    partitions: i32,
    deadline: Duration,
) -> Result<i32, KafkaSetupError> {
    // An in-process mock cluster (`dtfed demo`, tests) gets its topic directly.
    let on_mock = match create_on_mock(&cfg.brokers, topic, partitions) {
        Some(Ok(())) => true,
        Some(Err(e)) => {
            return Err(KafkaSetupError::Topic {
                topic: topic.to_owned(),
                detail: format!("creating on the mock cluster: {e}"),
            })
        }
        None => false,
    };
    let admin = admin_client(cfg)?;
    let result = ensure_with(&admin, cfg, topic, partitions, deadline, on_mock).await;
    drop_off_runtime(admin);
    result
}

/// A short-lived admin client of `cfg`'s cluster (topic creation and growth).
fn admin_client(cfg: &KafkaConfig) -> Result<Arc<AdminClient<TracingContext>>, KafkaSetupError> {
    let cc = settings::admin_config(cfg, "admin", &default_node_name());
    let ctx = TracingContext::for_config(&cc);
    AdminClient::from_config_and_context(&cc, ctx)
        .map(Arc::new)
        .map_err(|e| KafkaSetupError::Unreachable {
            brokers: cfg.brokers.clone(),
            detail: format!("cannot create an admin client: {e}"),
        })
}

/// Why a try of [`ensure_with`] failed.
struct NotReady {
    code: Option<RDKafkaErrorCode>,
    text: String,
}

impl NotReady {
    fn new(code: Option<RDKafkaErrorCode>, text: String) -> Self {
        NotReady { code, text }
    }

    /// The cluster could not be reached at all (as opposed to answering "no").
    fn unreachable(&self) -> bool {
        matches!(
            self.code,
            Some(
                RDKafkaErrorCode::BrokerTransportFailure
                    | RDKafkaErrorCode::AllBrokersDown
                    | RDKafkaErrorCode::OperationTimedOut
                    | RDKafkaErrorCode::RequestTimedOut
                    | RDKafkaErrorCode::Resolve
            )
        )
    }
}

async fn ensure_with(
    admin: &Arc<AdminClient<TracingContext>>,
    cfg: &KafkaConfig,
    topic: &str,
    partitions: i32,
    deadline: Duration,
    on_mock: bool,
) -> Result<i32, KafkaSetupError> {
    let started = Instant::now();
    let left = || {
        deadline
            .saturating_sub(started.elapsed())
            .clamp(Duration::from_millis(100), Duration::from_secs(5))
    };
    let mut backoff = Duration::from_millis(200);
    loop {
        // 1. Create (a topic that exists already is fine).
        let mut create_failure = None;
        if !on_mock {
            let opts = AdminOptions::new()
                .request_timeout(Some(left()))
                .operation_timeout(Some(left()));
            let new_topic = NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(cfg.replication_factor),
            );
            match admin.create_topics([&new_topic], &opts).await {
                Ok(results) => match results.into_iter().next() {
                    Some(Ok(_)) => tracing::info!(topic, partitions, "created Kafka topic"),
                    Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => {}
                    // A broker that has just started is not registered yet and answers
                    // InvalidReplicationFactor for a moment: retry that one for a while.
                    Some(Err((_, code)))
                        if permanent_create_error(code)
                            && !(code == RDKafkaErrorCode::InvalidReplicationFactor
                                && started.elapsed() < REPLICATION_FACTOR_GRACE) =>
                    {
                        return Err(KafkaSetupError::Topic {
                            topic: topic.to_owned(),
                            detail: format!(
                                "cannot create it with {partitions} partitions and replication factor {}: {code}",
                                cfg.replication_factor
                            ),
                        });
                    }
                    Some(Err((_, code))) => {
                        create_failure = Some(NotReady::new(Some(code), format!("create: {code}")))
                    }
                    None => create_failure = Some(NotReady::new(None, "create: no answer".into())),
                },
                Err(e) => {
                    create_failure = Some(NotReady::new(
                        e.rdkafka_error_code(),
                        format!("create: {e}"),
                    ))
                }
            }
        }
        // 2. Whether or not creating worked (a cluster may not implement CreateTopics), the
        //    metadata tells the truth.
        let meta = {
            let admin = Arc::clone(admin);
            let (t, timeout) = (topic.to_owned(), left());
            tokio::task::spawn_blocking(move || partition_count(&admin, &t, timeout)).await
        };
        let failure = match meta {
            Ok(Ok(n)) => {
                if n != partitions {
                    tracing::info!(
                        topic,
                        partitions = n,
                        requested = partitions,
                        "topic exists with a different partition count; using the real one"
                    );
                }
                return Ok(n);
            }
            Ok(Err(m)) => match create_failure {
                Some(c) => NotReady::new(c.code.or(m.code), format!("{}; {}", c.text, m.text)),
                None => m,
            },
            Err(e) => NotReady::new(None, format!("metadata task: {e}")),
        };
        if started.elapsed() + backoff >= deadline {
            let detail = format!(
                "not ready after {:.1}s: {}",
                started.elapsed().as_secs_f64(),
                failure.text
            );
            return Err(if failure.unreachable() {
                KafkaSetupError::Unreachable {
                    brokers: cfg.brokers.clone(),
                    detail: format!("topic {topic} {detail}"),
                }
            } else {
                KafkaSetupError::Topic {
                    topic: topic.to_owned(),
                    detail,
                }
            });
        }
        tracing::debug!(topic, error = %failure.text, "Kafka topic not ready yet, retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Adds partitions to `topic` until it has `partitions` (a topic with as many or more is
/// left alone); returns its count afterwards. Used for mirror topics, whose partition count
/// follows the origin's (`mirror::sink`). Not on the mock cluster (the demo's regions all
/// have the same count).
pub async fn grow_topic(
    cfg: &KafkaConfig,
    topic: &str,
    partitions: i32,
) -> Result<i32, KafkaSetupError> {
    let admin = admin_client(cfg)?;
    let result = grow_with(&admin, topic, partitions).await;
    drop_off_runtime(admin);
    result
}

async fn grow_with(
    admin: &Arc<AdminClient<TracingContext>>,
    topic: &str,
    partitions: i32,
) -> Result<i32, KafkaSetupError> {
    let failed = |detail: String| KafkaSetupError::Topic {
        topic: topic.to_owned(),
        detail,
    };
    let timeout = Duration::from_secs(10);
    let count = |admin: &Arc<AdminClient<TracingContext>>| {
        let (admin, t) = (Arc::clone(admin), topic.to_owned());
        async move {
            tokio::task::spawn_blocking(move || partition_count(&admin, &t, timeout))
                .await
                .map_err(|e| format!("metadata task: {e}"))?
                .map_err(|e| e.text)
        }
    };
    let now = count(admin).await.map_err(failed)?;
    if now >= partitions {
        return Ok(now);
    }
    let opts = AdminOptions::new()
        .request_timeout(Some(timeout))
        .operation_timeout(Some(timeout));
    let grow = NewPartitions::new(topic, usize::try_from(partitions).unwrap_or(0));
    match admin.create_partitions([&grow], &opts).await {
        Ok(results) => match results.into_iter().next() {
            Some(Ok(_)) => {
                tracing::info!(
                    topic,
                    partitions,
                    was = now,
                    "added partitions to Kafka topic"
                )
            }
            // Another daemon of the region grew it meanwhile.
            Some(Err((_, RDKafkaErrorCode::InvalidPartitions))) => {}
            Some(Err((_, code))) => {
                return Err(failed(format!(
                    "cannot grow it from {now} to {partitions} partitions: {code}"
                )))
            }
            None => return Err(failed("add partitions: no answer".into())),
        },
        Err(e) => return Err(failed(format!("add partitions: {e}"))),
    }
    // The metadata tells the truth (it may lag the creation by a moment).
    let mut after = now;
    for _ in 0..20 {
        after = count(admin).await.map_err(failed)?;
        if after >= partitions {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(after)
}

/// The partition count of `topic`, or why it cannot be known yet. Blocking.
fn partition_count(
    admin: &AdminClient<TracingContext>,
    topic: &str,
    timeout: Duration,
) -> Result<i32, NotReady> {
    let md = admin
        .inner()
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| NotReady::new(e.rdkafka_error_code(), format!("metadata: {e}")))?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Err(NotReady::new(None, "metadata: topic not listed".into()));
    };
    if let Some(err) = t.error() {
        let code = RDKafkaErrorCode::from(err);
        return Err(NotReady::new(Some(code), format!("metadata: {code}")));
    }
    let n = t.partitions().len();
    if n == 0 {
        return Err(NotReady::new(
            None,
            "metadata: topic has no partitions yet".into(),
        ));
    }
    i32::try_from(n).map_err(|_| NotReady::new(None, format!("metadata: {n} partitions")))
}

/// Kafka's `Utils.murmur2` (the Java client's default partitioner hash), bit for bit.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    // Java uses the int length; keys here are far below 2^31 bytes.
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default (Java) partitioner picks for key `room`:
/// `toPositive(murmur2(key)) % partitions`.
///
/// librdkafka's `murmur2_random` partitioner (which [`crate::append`] uses) computes the
/// same for non-empty keys, so a room's partition is the same whichever client wrote it.
pub fn partition_for(room: &RoomId, partitions: i32) -> i32 {
    if partitions <= 1 {
        return 0;
    }
    (murmur2(room.as_str().as_bytes()) & 0x7fff_ffff) % partitions
}

/// Drops `value` on a blocking thread when inside a tokio runtime: librdkafka handles block
/// while they shut down (threads joined, queues purged).
pub fn drop_off_runtime<T: Send + 'static>(value: T) {
    if tokio::runtime::Handle::try_current().is_ok() {
        drop(tokio::task::spawn_blocking(move || drop(value)));
    } else {
        drop(value);
    }
}

/// Owns a librdkafka handle whose drop blocks; drops it off the async runtime.
pub struct OffRuntime<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> std::ops::Deref for OffRuntime<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // Only `drop` takes the value out.
        match &self.0 {
            Some(v) => v,
            None => unreachable!("OffRuntime emptied before drop"),
        }
    }
}

impl<T: Send + 'static> OffRuntime<T> {
    pub fn new(value: T) -> OffRuntime<T> {
        OffRuntime(Some(value))
    }

    /// The value back, to be dropped (or kept) by the caller.
    pub fn into_inner(mut self) -> Option<T> {
        self.0.take()
    }
}

impl<T: Send + 'static> Drop for OffRuntime<T> {
    fn drop(&mut self) {
        if let Some(v) = self.0.take() {
            drop_off_runtime(v);
        }
    }
}

/// The topic or partition does not exist (yet, or any more).
pub fn is_unknown_partition(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::UnknownTopic
        )
    )
}

/// Consumer errors librdkafka recovers from by itself (a dropped idle connection, a name
/// that did not resolve this time): reading just goes on.
pub fn is_transient_consumer_error(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::Resolve
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NetworkException
        )
    ) && !matches!(e, KafkaError::MessageConsumptionFatal(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(s: &str) -> RoomId {
        RoomId::parse(s).expect("valid room")
    }

    /// The vectors of Kafka's `UtilsTest.testMurmur2`.
    #[test]
    fn murmur2_matches_kafka_java() {
        let cases: [(&str, i32); 6] = [
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            ("abc", 479470107),
        ];
        for (key, want) in cases {
            assert_eq!(murmur2(key.as_bytes()), want, "murmur2({key:?})");
        }
        // Every tail length (0..=3 leftover bytes) is covered above: 2, 6, 24, 26, 48, 3.
        assert_eq!(murmur2(b""), 275646681);
    }

    #[test]
    fn partition_for_is_in_range_and_stable() {
        for n in [1, 2, 3, 8, 12, 100] {
            for i in 0..200 {
                let r = room(&format!("room-{i}"));
                let p = partition_for(&r, n);
                assert!((0..n).contains(&p), "{r} -> {p} of {n}");
                assert_eq!(p, partition_for(&r, n));
            }
        }
        // toPositive(murmur2("foobar")) % 8 computed by hand: -790332482 & 0x7fffffff.
        assert_eq!(
            partition_for(&room("foobar"), 8),
            (-790332482i32 & 0x7fff_ffff) % 8
        );
    }

    #[test]
    fn mock_kafka_starts_and_stops() {
        let mock = MockKafka::start(1).expect("mock");
        assert!(!mock.bootstrap().is_empty());
        mock.create_topic("t", 3).expect("create");
        mock.broker_down(1).expect("down");
        mock.broker_up(1).expect("up");
        drop(mock);
    }
}
