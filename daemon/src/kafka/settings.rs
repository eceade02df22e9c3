//! Every Kafka client configuration dtfed builds, in one place, each setting with the reason
//! it has its value. Every client starts from [`client_config`] (brokers, `client.id`,
//! reconnects, log level); the publish producer, the fan-out group, replay readers, the
//! mirror server's origin readers, the mirror writers and the mirror lease add their own
//! settings on top. The code that builds a client calls one of these functions and never
//! sets a property itself.

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};

use crate::config::KafkaConfig;

/// `max.poll.interval.ms` of the lease consumer: the longest a revocation may wait for its
/// tasks before librdkafka gives the lease up on its own (librdkafka's default).
pub const MAX_POLL_INTERVAL_MS: u64 = 300_000;

/// Settings every dtfed Kafka client shares: where the brokers are, who we are, and how
/// eagerly to reconnect. Producers, consumers and admin clients add their own on top.
///
/// `client.id` is `dtfed-<region>-<node>` so a broker's request logs and quotas name the
/// daemon.
pub fn client_config(cfg: &KafkaConfig, region: &str, node: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", format!("dtfed-{region}-{node}"))
        // Dead peers behind a NAT or a silently dropped connection are found by TCP.
        .set("socket.keepalive.enable", "true")
        // A broker that restarts is found again within a second, not librdkafka's 10 s.
        .set("reconnect.backoff.ms", "50")
        .set("reconnect.backoff.max.ms", "1000")
        // Metadata (leaders, partition counts) refreshed often enough to follow a broker
        // restart quickly; the default is 5 minutes.
        .set("topic.metadata.refresh.interval.ms", "30000");
    c.set_log_level(librdkafka_log_level());
    c
}

/// The librdkafka log level matching what `tracing` will show for target `librdkafka`:
/// notices and above normally, informational lines when debug logging is on.
fn librdkafka_log_level() -> RDKafkaLogLevel {
    if tracing::enabled!(target: "librdkafka", tracing::Level::DEBUG) {
        RDKafkaLogLevel::Info
    } else {
        RDKafkaLogLevel::Notice
    }
}

/// The producer settings, on top of [`client_config`].
///
/// - `enable.idempotence` + `acks=all`: an acknowledged message is on every in-sync replica,
///   and librdkafka's internal retries never duplicate or reorder within a partition.
/// - `partitioner=murmur2_random`: the Java client's partitioner, so
///   [`crate::kafka::partition_for`] (replay, mirrors) agrees with where records land.
/// - `linger.ms = kafka.linger_ms` (0 by default): measured on a local Kafka 4.3 broker (2 cores, loaded),
///   a lone publish is acknowledged in ~0.3 ms p50 with 0 and ~1.5 ms with any non-zero
///   linger (librdkafka's timers tick in milliseconds, so 0.2 behaves like 1); 5 ms costs
///   ~6 ms. Under load, batching still happens with 0: records queue up behind the (up to
///   5) requests in flight. With 32 concurrent publishers linger 1 batched better
///   (≈2 ms p50 either way, higher throughput with 1), so raise it if a region's publish
///   rate, not the single player's ack time, becomes the limit.
/// - `compression.type=none`: values are a hundred-odd bytes of JSON and batches at low
///   linger hold few records; lz4 showed no gain in the same measurement.
/// - `message.timeout.ms = publish_timeout_ms`: a message not acknowledged by then fails
///   with a delivery error, which the player sees as `unavailable` — never a silent drop.
/// - `request.timeout.ms` half of that, so a request lost to a dying broker is retried once
///   within the message timeout instead of eating all of it.
/// - `queue.buffering.max.kbytes` bounds memory while Kafka is away; a full queue is an
///   immediate `unavailable`.
pub fn producer_config(cfg: &KafkaConfig, region: &str, node: &str) -> ClientConfig {
    let mut c = client_config(cfg, region, node);
    let timeout = cfg.publish_timeout_ms.max(100);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("compression.type", "none")
        .set("message.timeout.ms", timeout.to_string())
        .set("request.timeout.ms", (timeout / 2).max(50).to_string())
        .set("queue.buffering.max.kbytes", "65536");
    c
}

/// The consumer settings, on top of [`client_config`]; see the module docs for why.
pub fn fanout_consumer_config(
    cfg: &KafkaConfig,
    region: &str,
    node: &str,
) -> rdkafka::ClientConfig {
    let mut c = client_config(cfg, region, node);
    let session = cfg.session_timeout_ms;
    c.set("group.id", format!("{}.{region}", cfg.fanout_group))
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.commit.interval.ms", "500")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", session.to_string())
        .set(
            "heartbeat.interval.ms",
            (session / 3).clamp(100, 1000).to_string(),
        )
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("fetch.wait.max.ms", "10")
        .set("enable.partition.eof", "false")
        .set("statistics.interval.ms", "1000");
    c
}

/// Settings of a replay consumer, on top of [`client_config`].
pub fn replay_reader_config(cfg: &KafkaConfig, region: &str, node: &str) -> ClientConfig {
    let mut c = client_config(cfg, region, &format!("{node}-replay"));
    // librdkafka wants a group.id for a consumer's queue plumbing; this one is never
    // joined (manual assign) and never committed to.
    let dummy = format!(
        "dtfed-replay-{region}-{node}-{:016x}",
        rand::random::<u64>()
    );
    c.set("group.id", dummy)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Say when the partition's end is reached, so a range whose last offsets are not
        // records still ends.
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "10")
        // A read needs a bounded range: don't prefetch 64 MB per partition.
        .set("queued.max.messages.kbytes", "8192")
        .set("allow.auto.create.topics", "false");
    c
}

/// Settings of a metadata and admin client (partition counts, watermarks, topic creation),
/// on top of [`client_config`]: `allow.auto.create.topics=false`, so that a metadata request
/// never creates a topic with the broker's defaults.
pub fn admin_config(cfg: &KafkaConfig, region: &str, node: &str) -> ClientConfig {
    let mut c = client_config(cfg, region, node);
    c.set("allow.auto.create.topics", "false");
    c
}

/// Settings of the pooled consumers that read mirror partitions (a tail before appending, a
/// room's records for a replay): [`replay_reader_config`], with smaller fetches
/// (`max.partition.fetch.bytes` 256 KiB): a probe wants one record, a range read is bounded
/// anyway.
pub fn mirror_probe_config(cfg: &KafkaConfig, region: &str, node: &str) -> ClientConfig {
    let mut c = replay_reader_config(cfg, region, &format!("{node}-mirror"));
    c.set("max.partition.fetch.bytes", "262144");
    c
}

/// Settings of an origin reader, on top of [`client_config`]: a group-less consumer (a
/// unique dummy `group.id`, manual `assign`, nothing committed) tuned for low latency.
///
/// - `auto.offset.reset=error`: when retention passes the position, the reader says so
///   ([`LogError::OffsetOutOfRange`]) instead of silently jumping.
/// - `fetch.wait.max.ms=50`: an idle partition is polled by the broker's long-poll; a record
///   appended is fetched at once (fetch.min.bytes is 1), the 50 ms only bounds idle fetches.
/// - `max.partition.fetch.bytes` 1 MiB (4 default link batches), `fetch.max.bytes` 4 MiB,
///   `queued.max.messages.kbytes` 4 MiB: a reader prefetches a few batches, not librdkafka's
///   64 MiB default, since a daemon serves many streams. `fetch.queue.backoff.ms=20` so a
///   full prefetch queue does not stall the stream for librdkafka's default second.
/// - `statistics.interval.ms=1000`: the partition's high watermark for empty batches comes
///   from the statistics (and from the records themselves), no extra request.
pub fn origin_reader_config(cfg: &KafkaConfig, region: &str, node: &str) -> ClientConfig {
    let mut c = client_config(cfg, region, &format!("{node}-mirror-serve"));
    let dummy = format!(
        "dtfed-mirror-serve-{region}-{node}-{:016x}",
        rand::random::<u64>()
    );
    c.set("group.id", dummy)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "error")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "50")
        .set("fetch.min.bytes", "1")
        .set("max.partition.fetch.bytes", "1048576")
        .set("fetch.max.bytes", "4194304")
        .set("queued.max.messages.kbytes", "4096")
        .set("fetch.queue.backoff.ms", "20")
        .set("statistics.interval.ms", "1000")
        .set("allow.auto.create.topics", "false");
    c
}

/// Settings of a relay's reader of a mirror topic (`dtfed.mirror.<O>`, served with O's
/// offsets to another peer, `crate::mirror::relay`): [`origin_reader_config`] (a record
/// the relay lacks must be said, not skipped, so `auto.offset.reset=error` still holds),
/// plus `isolation.level=read_committed` stated rather than inherited from librdkafka's
/// default: mirror appends are transactions, and a fenced writer's aborted append must
/// never be relayed.
pub fn relay_reader_config(cfg: &KafkaConfig, region: &str, node: &str) -> ClientConfig {
    let mut c = origin_reader_config(cfg, region, &format!("{node}-relay"));
    c.set("isolation.level", "read_committed");
    c
}

/// Settings of the mirror producer: [`producer_config`] (idempotent, `acks=all`) with
///
/// - `max.in.flight.requests.per.connection=5`: the most an idempotent producer allows
///   while keeping order;
/// - `linger.ms=1`: a mirror append hands the producer a whole batch at once (the mirror
///   client joins everything that arrived during its previous append), so lingering buys
///   no bigger requests; it only delays every remote message (it was 5 ms, paid on every
///   append of every partition);
/// - `message.timeout.ms=0` and `enable.gapless.guarantee=true`: see the module docs
///   (appends are bounded by [`APPEND_TIMEOUT`] and a purge instead);
/// - `partitioner` irrelevant: every record names its partition.
pub fn mirror_producer_config(cfg: &KafkaConfig, region: &str, node: &str) -> ClientConfig {
    let mut c = producer_config(cfg, region, &format!("{node}-mirror"));
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .set("linger.ms", "1")
        .set("message.timeout.ms", "0")
        .set("enable.gapless.guarantee", "true");
    c
}

/// The writer of mirror partition `origin`/`partition`: [`mirror_producer_config`] made
/// transactional under the partition's own id (shared by the region's daemons, so a new
/// writer fences the one before). Transactions bound a message's life themselves
/// (`message.timeout.ms` must not exceed `transaction.timeout.ms`), and a failed append is
/// aborted whole, so the gapless guarantee has nothing left to do.
pub fn mirror_writer_config(
    base: &ClientConfig,
    region: &str,
    origin: &str,
    partition: i32,
) -> ClientConfig {
    let mut c = base.clone();
    c.remove("enable.gapless.guarantee");
    c.set(
        "transactional.id",
        format!("dtfed-mirror.{region}.{origin}.{partition}"),
    )
    .set("transaction.timeout.ms", "60000")
    .set("message.timeout.ms", "30000");
    c
}

/// The lease consumer's settings, on top of [`client_config`]; see the module docs.
pub fn mirror_lease_config(
    cfg: &KafkaConfig,
    region: &str,
    node: &str,
    group: &str,
) -> rdkafka::ClientConfig {
    let mut c = client_config(cfg, region, node);
    let session = cfg.session_timeout_ms;
    c.set("client.id", format!("dtfed-{region}-{node}-mirror-tasks"))
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "latest")
        .set("session.timeout.ms", session.to_string())
        .set(
            "heartbeat.interval.ms",
            (session / 3).clamp(100, 1000).to_string(),
        )
        .set(
            "max.poll.interval.ms",
            MAX_POLL_INTERVAL_MS.max(session).to_string(),
        )
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.partition.eof", "false")
        // Nothing is meant to be fetched; if anything is, keep it small.
        .set("queued.max.messages.kbytes", "1024");
    c
}
