//! Mirror server and client over real QUIC links with mutual TLS on loopback, with in-memory
//! origin and mirror logs: steady state, link cuts, crashes, failing appends, retention gaps,
//! WAN delay, pause/resume, and a second origin daemon taking over.

mod common;
#[path = "common/memory_log.rs"]
mod memory_log;

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{identity, init_tracing, loopback};
use dtfed_proto::link::{LinkRecord, LinkTimers};
use dtfed_proto::record::{HEADER_FROM, HEADER_ORIGIN, HEADER_ORIGIN_OFFSET};
use dtfed_regions::mirror::{
    MirrorClient, MirrorClientConfig, MirrorError, MirrorLog, MirrorServer, MirrorServerConfig,
    MirrorTaskState, ServerStatus,
};
use dtfed_regions::{FederationCa, LinkTuning, PeerRegion, RegionEndpoint, WanProfile, WanRelay};
use memory_log::{MemoryMirrorLog, MemoryOriginLog, MirrorGap, MirroredRecord};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "dtfed.local";
const ORIGIN: &str = "seoul";
const LOCAL: &str = "tokyo";
/// Generous: the machine may be loaded.
const WAIT: Duration = Duration::from_secs(180);

// ----------------------------------------------------------------------------------------
// Fixtures
// ----------------------------------------------------------------------------------------

/// Short QUIC timers so that a cut of a few seconds kills the connection.
fn quick_tuning() -> LinkTuning {
    LinkTuning {
        keep_alive_interval: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(1500),
        handshake_timeout: Duration::from_secs(10),
        ..LinkTuning::default()
    }
}

fn quick_timers() -> LinkTimers {
    LinkTimers {
        heartbeat_interval: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(5),
    }
}

fn bind(ca: &FederationCa, region: &str, peer: &str, tuning: &LinkTuning) -> Arc<RegionEndpoint> {
    Arc::new(
        RegionEndpoint::bind_with(
            loopback(),
            identity(ca, region),
            vec![peer.to_owned()],
            tuning.clone(),
        )
        .expect("bind"),
    )
}

/// One origin daemon: an endpoint and a mirror server on the shared origin log.
struct OriginDaemon {
    endpoint: Arc<RegionEndpoint>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    status: ServerStatus,
}

impl OriginDaemon {
    fn start(
        ca: &FederationCa,
        log: &MemoryOriginLog,
        tuning: &LinkTuning,
        config: MirrorServerConfig,
    ) -> OriginDaemon {
        let endpoint = bind(ca, ORIGIN, LOCAL, tuning);
        let server = MirrorServer::new(endpoint.clone(), Arc::new(log.clone())).with_config(config);
        let status = server.status();
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.run(stop.clone()));
        OriginDaemon {
            endpoint,
            stop,
            task,
            status,
        }
    }

    fn addr(&self) -> String {
        self.endpoint.local_addr().expect("addr").to_string()
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("server stops")
            .expect("server task");
        self.endpoint.close();
    }
}

/// The receiving region: an endpoint and a mirror client writing to `mirror`.
fn receiver(
    ca: &FederationCa,
    mirror: &MemoryMirrorLog,
    addrs: Vec<String>,
    tuning: &LinkTuning,
    config: MirrorClientConfig,
) -> (Arc<RegionEndpoint>, MirrorClient) {
    receiver_with_partitions(ca, mirror, addrs, tuning, config, None)
}

/// [`receiver`] whose mirror topic has `partitions` partitions (`None`: not checked).
fn receiver_with_partitions(
    ca: &FederationCa,
    mirror: &MemoryMirrorLog,
    addrs: Vec<String>,
    tuning: &LinkTuning,
    config: MirrorClientConfig,
    partitions: Option<i32>,
) -> (Arc<RegionEndpoint>, MirrorClient) {
    let endpoint = bind(ca, LOCAL, ORIGIN, tuning);
    let peers = vec![PeerRegion {
        name: ORIGIN.to_owned(),
        addrs,
        partitions,
        topic: None,
        relay: false,
        direct: true,
    }];
    let client =
        MirrorClient::with_config(endpoint.clone(), Arc::new(mirror.clone()), peers, config);
    (endpoint, client)
}

fn client_config() -> MirrorClientConfig {
    MirrorClientConfig {
        timers: quick_timers(),
        ..MirrorClientConfig::default()
    }
}

fn server_config() -> MirrorServerConfig {
    MirrorServerConfig {
        timers: quick_timers(),
        ..MirrorServerConfig::default()
    }
}

/// Runs partition tasks `parts` of `client` until `stop`.
fn run_partitions(
    client: &MirrorClient,
    parts: Range<i32>,
    stop: &CancellationToken,
) -> JoinSet<Result<(), MirrorError>> {
    let mut set = JoinSet::new();
    for p in parts {
        let client = client.clone();
        let stop = stop.clone();
        set.spawn(async move { client.run_partition(ORIGIN, TOPIC, p, stop).await });
    }
    set
}

async fn stop_partitions(stop: &CancellationToken, mut set: JoinSet<Result<(), MirrorError>>) {
    stop.cancel();
    tokio::time::timeout(WAIT, async {
        while let Some(done) = set.join_next().await {
            done.expect("task").expect("partition task ran");
        }
    })
    .await
    .expect("partition tasks stop");
}

/// A chat-like record at `offset`: a room key, a JSON-ish value of varying size, the
/// origin's headers, and sometimes a stale `dtfed-origin-offset` the mirror must replace.
fn record(rng: &mut StdRng, offset: i64) -> LinkRecord {
    let room = rng.random_range(0..20);
    let player = rng.random_range(0..50);
    let len = rng.random_range(10..400);
    let body: String = (0..len)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect();
    let mut headers = vec![
        (HEADER_ORIGIN.to_owned(), ORIGIN.as_bytes().to_vec()),
        (
            HEADER_FROM.to_owned(),
            format!("player-{player}").into_bytes(),
        ),
    ];
    if rng.random_bool(0.1) {
        headers.push((HEADER_ORIGIN_OFFSET.to_owned(), b"999999".to_vec()));
    }
    LinkRecord {
        offset,
        timestamp_ms: 1_700_000_000_000 + offset,
        key: format!("room-{room}").into_bytes(),
        headers,
        value: format!(r#"{{"from":"player-{player}","ts":{offset},"body":"{body}"}}"#)
            .into_bytes(),
    }
}

/// Appends `n` records to `partition`, offsets advancing by 1 to 3 (sparse, as when a
/// partition carries transaction markers or compaction holes).
fn fill(log: &MemoryOriginLog, rng: &mut StdRng, partition: i32, n: usize) {
    for _ in 0..n {
        let offset = log.high_watermark(partition).expect("partition") + rng.random_range(0..3);
        let r = record(rng, offset);
        log.push(partition, r).expect("push");
    }
}

/// Keeps appending to every partition in `parts`: `per_partition` records each, in small
/// bursts, over roughly `over`.
fn spawn_appender(
    log: &MemoryOriginLog,
    parts: Range<i32>,
    per_partition: usize,
    over: Duration,
    seed: u64,
) -> tokio::task::JoinHandle<()> {
    let log = log.clone();
    tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(seed);
        let burst = 10;
        let rounds = per_partition.div_ceil(burst);
        let pause = over / u32::try_from(rounds.max(1)).unwrap_or(1);
        let mut left = per_partition;
        while left > 0 {
            let n = burst.min(left);
            for p in parts.clone() {
                fill(&log, &mut rng, p, n);
            }
            left -= n;
            tokio::time::sleep(pause).await;
        }
    })
}

/// Keeps appending a burst of 10 records to every partition in `parts` every 10 ms until
/// `stop` is cancelled; returns how many bursts it appended.
fn spawn_live_appender(
    log: &MemoryOriginLog,
    parts: Range<i32>,
    stop: CancellationToken,
    seed: u64,
) -> tokio::task::JoinHandle<usize> {
    let log = log.clone();
    tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut bursts = 0;
        while !stop.is_cancelled() {
            for p in parts.clone() {
                fill(&log, &mut rng, p, 10);
            }
            bursts += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bursts
    })
}

fn origin_offsets(records: &[MirroredRecord]) -> Vec<i64> {
    records
        .iter()
        .map(|r| r.origin_offset().expect("origin offset header"))
        .collect()
}

/// No duplicates, in order: origin offsets strictly increase along the mirror partition,
/// and mirror offsets are dense.
fn assert_strictly_increasing(mirror: &MemoryMirrorLog, partition: i32) {
    let records = mirror.records(ORIGIN, partition);
    let offsets = origin_offsets(&records);
    for w in offsets.windows(2) {
        assert!(
            w[0] < w[1],
            "partition {partition}: origin offset {} followed by {} (duplicate or reorder)",
            w[0],
            w[1]
        );
    }
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.offset, i as i64, "mirror offsets are dense");
    }
}

/// The mirror partition holds exactly `want` (origin records), as mirrored.
fn assert_mirror_equals(mirror: &MemoryMirrorLog, partition: i32, want: &[LinkRecord]) {
    assert_strictly_increasing(mirror, partition);
    let got = mirror.records(ORIGIN, partition);
    assert_eq!(
        got.len(),
        want.len(),
        "partition {partition}: mirror has {} records, origin {}",
        got.len(),
        want.len()
    );
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.origin_offset(), Some(w.offset), "partition {partition}");
        assert_eq!(g.origin_timestamp_ms(), Some(w.timestamp_ms));
        assert_eq!(g.timestamp_ms, w.timestamp_ms);
        assert_eq!(g.key, w.key);
        assert_eq!(g.value, w.value);
        assert_eq!(g.headers, w.mirror_headers(ORIGIN));
    }
}

/// The mirror holds the origin's last record (offsets only grow along a mirror partition,
/// which the assertions check).
fn caught_up(origin: &MemoryOriginLog, mirror: &MemoryMirrorLog, partition: i32) -> bool {
    let want = origin.records(partition).last().map(|r| r.offset);
    let got = mirror
        .records(ORIGIN, partition)
        .last()
        .and_then(MirroredRecord::origin_offset);
    want.is_some() && got == want
}

/// Polls `cond` until it holds; panics after [`WAIT`].
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < WAIT,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn wait_caught_up(origin: &MemoryOriginLog, mirror: &MemoryMirrorLog, parts: Range<i32>) {
    wait_until("the mirror to catch up", || {
        parts.clone().all(|p| caught_up(origin, mirror, p))
    })
    .await;
}

/// Waits until the mirror caught up on `parts`, then checks that each of them holds exactly
/// the origin's records, in order.
async fn assert_mirror_holds_everything(
    origin: &MemoryOriginLog,
    mirror: &MemoryMirrorLog,
    parts: Range<i32>,
) {
    wait_caught_up(origin, mirror, parts.clone()).await;
    for p in parts {
        assert_mirror_equals(mirror, p, &origin.records(p));
    }
}

// ----------------------------------------------------------------------------------------
// Tests
// ----------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_mirrors_every_partition_exactly() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let tuning = LinkTuning::default();
    let origin = MemoryOriginLog::new(TOPIC, 4);
    let mirror = MemoryMirrorLog::new();
    let mut rng = StdRng::seed_from_u64(1);
    for p in 0..4 {
        fill(&origin, &mut rng, p, 1_000);
    }
    // Default timers: exactly one stream per partition is asserted below.
    let daemon = OriginDaemon::start(&ca, &origin, &tuning, MirrorServerConfig::default());
    let (local, client) = receiver(
        &ca,
        &mirror,
        vec![daemon.addr()],
        &tuning,
        MirrorClientConfig::default(),
    );
    let stop = CancellationToken::new();
    let tasks = run_partitions(&client, 0..4, &stop);
    // Half was there before; the other half arrives live.
    let appender = spawn_appender(&origin, 0..4, 1_000, Duration::from_secs(2), 2);
    appender.await.expect("appender");
    wait_caught_up(&origin, &mirror, 0..4).await;

    for p in 0..4 {
        let want = origin.records(p);
        assert_eq!(want.len(), 2_000);
        assert_mirror_equals(&mirror, p, &want);
    }
    // Ops view: streaming, no lag, one link, the origin saw our progress.
    wait_until("statuses to settle", || {
        let status = client.status();
        status.len() == 4
            && status.iter().all(|s| {
                s.state == MirrorTaskState::Streaming
                    && s.lag_records == Some(0)
                    && s.mirrored_offset == origin.records(s.partition).last().map(|r| r.offset)
            })
    })
    .await;
    for s in client.status() {
        let last = origin
            .records(s.partition)
            .last()
            .cloned()
            .expect("records");
        assert_eq!(s.last_record_ts_ms, Some(last.timestamp_ms));
        assert_eq!(s.lag_ms(last.timestamp_ms + 10_000), Some(0));
        assert_eq!(s.gaps, 0);
        assert_eq!(s.streams_opened, 1, "{s:?}");
        assert_eq!(s.records_mirrored, 2_000);
    }
    let links = client.links();
    assert_eq!(links.len(), 1);
    assert!(links[0].connected && links[0].connects == 1, "{links:?}");
    assert_eq!(
        links[0].addr,
        Some(daemon.endpoint.local_addr().expect("addr"))
    );
    assert!(links[0].rtt_ms.is_some());
    wait_until("the origin to see progress on every stream", || {
        let streams = daemon.status.streams();
        streams.len() == 4
            && streams.iter().all(|s| {
                let p = s.partition.expect("subscribed");
                let next = origin.high_watermark(p).expect("hw");
                s.peer == LOCAL && s.receiver_next_offset == Some(next)
            })
    })
    .await;
    // A second task for a running partition is refused.
    assert_eq!(
        client
            .run_partition(ORIGIN, TOPIC, 0, CancellationToken::new())
            .await,
        Err(MirrorError::AlreadyRunning {
            origin: ORIGIN.into(),
            partition: 0
        })
    );
    assert!(matches!(
        client
            .run_partition("paris", TOPIC, 0, CancellationToken::new())
            .await,
        Err(MirrorError::UnknownPeer(_))
    ));

    stop_partitions(&stop, tasks).await;
    assert!(client.status().is_empty());
    client.close("test over");
    daemon.stop().await;
    local.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cut_converges_without_duplicates() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let tuning = quick_tuning();
    let origin = MemoryOriginLog::new(TOPIC, 4);
    let mirror = MemoryMirrorLog::new();
    let mut rng = StdRng::seed_from_u64(3);
    for p in 0..4 {
        fill(&origin, &mut rng, p, 500);
    }
    let daemon = OriginDaemon::start(&ca, &origin, &tuning, server_config());
    let relay = WanRelay::start(
        loopback(),
        daemon.endpoint.local_addr().expect("addr"),
        WanProfile::with_delay(Duration::from_millis(2)),
    )
    .await
    .expect("relay");
    let (local, client) = receiver(
        &ca,
        &mirror,
        vec![relay.local_addr().to_string()],
        &tuning,
        client_config(),
    );
    let stop = CancellationToken::new();
    let tasks = run_partitions(&client, 0..4, &stop);
    wait_caught_up(&origin, &mirror, 0..4).await;

    // The origin keeps appending through a 3 s cut (twice the QUIC idle timeout: the
    // connection dies on both sides), and after it.
    let appending = CancellationToken::new();
    let appender = spawn_live_appender(&origin, 0..4, appending.clone(), 4);
    let before_cut = mirror.len(ORIGIN, 0);
    wait_until("live records to be mirrored", || {
        mirror.len(ORIGIN, 0) >= before_cut + 100
    })
    .await;
    relay.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    relay.heal();
    let after_heal = origin.records(0).len();
    wait_until("records appended after the cut to be mirrored", || {
        mirror.len(ORIGIN, 0) >= after_heal + 100
    })
    .await;
    appending.cancel();
    appender.await.expect("appender");
    assert_mirror_holds_everything(&origin, &mirror, 0..4).await;
    let links = client.links();
    assert!(
        links[0].connects >= 2,
        "the link was redialled after the cut: {links:?}"
    );
    assert!(relay.stats().dropped_cut > 0);
    println!(
        "cut: {} packets dropped, {} link connects, streams opened {:?}",
        relay.stats().dropped_cut,
        links[0].connects,
        client
            .status()
            .iter()
            .map(|s| s.streams_opened)
            .collect::<Vec<_>>()
    );

    stop_partitions(&stop, tasks).await;
    client.close("test over");
    daemon.stop().await;
    local.close();
    relay.shutdown().await;
}

/// A dial made during a cut must not hold up the link after the heal: the old client waited
/// for it (the 10 s handshake timeout, its Initial retransmissions backing off to seconds
/// apart) before trying again, so records flowed 5-11 s after a heal. Now attempts overlap
/// every `redial_max` (500 ms), so the link is back within that plus one handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_during_a_cut_does_not_delay_the_link_after_the_heal() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    // QUIC idle timeout 1.5 s: the connection dies early in the cut, so dials happen during
    // it. The handshake timeout stays at its 10 s default: that is what used to block.
    let tuning = quick_tuning();
    assert_eq!(tuning.handshake_timeout, Duration::from_secs(10));
    let delay = Duration::from_millis(50);
    let origin = MemoryOriginLog::new(TOPIC, 2);
    let mirror = MemoryMirrorLog::new();
    let daemon = OriginDaemon::start(&ca, &origin, &tuning, server_config());
    let relay = WanRelay::start(
        loopback(),
        daemon.endpoint.local_addr().expect("addr"),
        WanProfile::with_delay(delay),
    )
    .await
    .expect("relay");
    let config = client_config();
    let redial_max = config.redial_max;
    let (local, client) = receiver(
        &ca,
        &mirror,
        vec![relay.local_addr().to_string()],
        &tuning,
        config,
    );
    let stop = CancellationToken::new();
    let tasks = run_partitions(&client, 0..2, &stop);
    let appending = CancellationToken::new();
    let appender = spawn_live_appender(&origin, 0..2, appending.clone(), 21);
    wait_until("live records to be mirrored", || {
        mirror.len(ORIGIN, 0) >= 100
    })
    .await;

    relay.cut();
    wait_until("the link to drop during the cut", || {
        !client.links()[0].connected
    })
    .await;
    // Dials go out (and get nowhere) for a while: several rounds of attempts.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let dropped_during_cut = relay.stats().dropped_cut;
    assert!(
        client.links()[0].last_error.is_some(),
        "{:?}",
        client.links()
    );
    let mirrored_at_heal = mirror.len(ORIGIN, 0);
    let healed = Instant::now();
    relay.heal();
    wait_until("the link to come back", || client.links()[0].connected).await;
    let link_back = healed.elapsed();
    wait_until("records to flow again", || {
        mirror.len(ORIGIN, 0) > mirrored_at_heal
    })
    .await;
    let flowing = healed.elapsed();
    let rtt = 2 * delay;
    println!(
        "heal → link up {link_back:?}, → first record mirrored {flowing:?} (rtt {rtt:?}, \
         {dropped_during_cut} packets dropped during the cut)"
    );
    // The next attempt starts within `redial_max` of the heal and needs a handshake and
    // the welcome (two round trips); some slack for a loaded machine (the tests poll every
    // 25 ms). Before overlapping dials this took 5-11 s.
    let slack = Duration::from_millis(400);
    assert!(
        link_back <= redial_max + 2 * rtt + slack,
        "link back {link_back:?} after the heal"
    );
    // Then the tail, the subscription and the backlog of the cut (~1 MB per partition) on a
    // fresh connection whose congestion window starts small: a few more round trips.
    assert!(
        flowing <= Duration::from_secs(1) + 3 * rtt + slack,
        "records flowing {flowing:?} after the heal"
    );

    appending.cancel();
    appender.await.expect("appender");
    assert_mirror_holds_everything(&origin, &mirror, 0..2).await;
    stop_partitions(&stop, tasks).await;
    client.close("test over");
    daemon.stop().await;
    local.close();
    relay.shutdown().await;
}

/// A mirror log whose every append takes `per_append` (a busy Kafka).
struct SlowMirror {
    inner: MemoryMirrorLog,
    per_append: Duration,
}

#[async_trait::async_trait]
impl MirrorLog for SlowMirror {
    async fn tail(
        &self,
        origin: &str,
        partition: i32,
    ) -> Result<Option<i64>, dtfed_regions::mirror::LogError> {
        self.inner.tail(origin, partition).await
    }

    async fn append(
        &self,
        origin: &str,
        partition: i32,
        records: &[LinkRecord],
    ) -> Result<(), dtfed_regions::mirror::LogError> {
        tokio::time::sleep(self.per_append).await;
        self.inner.append(origin, partition, records).await
    }
}

/// The 30 s read stalls under load: the origin sends small batches, the receiver's stream
/// window is full, and QUIC returns credit only in steps of 1/8 of the window. A receiver
/// that appended one origin batch at a time (each append slow) took longer than the
/// origin's stall timeout to free one step, and the origin abandoned the stream again and
/// again. Appending everything received at once, the receiver frees the window at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_mirror_log_with_small_origin_batches_is_not_abandoned() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let origin = MemoryOriginLog::new(TOPIC, 1);
    let mut rng = StdRng::seed_from_u64(77);
    fill(&origin, &mut rng, 0, 12_000); // ~3 MB, three times the stream window
    let tuning = LinkTuning::default();
    let daemon = OriginDaemon::start(
        &ca,
        &origin,
        &tuning,
        MirrorServerConfig {
            // ~8 records per frame, as when records trickle in.
            max_batch_bytes: 2 * 1024,
            write_stall_timeout: Duration::from_secs(3),
            ..server_config()
        },
    );
    // 1 MiB stream window on the receiving side: credit comes back 128 KiB at a time,
    // i.e. after ~64 origin batches. One append each at 100 ms: 6.4 s, over the 3 s stall
    // limit.
    let receiving = LinkTuning {
        stream_receive_window: 1024 * 1024,
        ..LinkTuning::default()
    };
    let mirror = MemoryMirrorLog::new();
    let slow = SlowMirror {
        inner: mirror.clone(),
        per_append: Duration::from_millis(100),
    };
    let endpoint = bind(&ca, LOCAL, ORIGIN, &receiving);
    let client = MirrorClient::with_config(
        endpoint.clone(),
        Arc::new(slow),
        vec![PeerRegion {
            name: ORIGIN.to_owned(),
            addrs: vec![daemon.addr()],
            partitions: None,
            topic: None,
            relay: false,
            direct: true,
        }],
        client_config(),
    );
    let started = Instant::now();
    let stop = CancellationToken::new();
    let tasks = run_partitions(&client, 0..1, &stop);
    wait_caught_up(&origin, &mirror, 0..1).await;
    let took = started.elapsed();
    assert_mirror_equals(&mirror, 0, &origin.records(0));
    let status = client.status();
    println!(
        "12,000 records in 2 KiB origin batches through a 1 MiB window, 100 ms appends: \
         {took:?}, {} appends, streams opened {:?}",
        mirror.appends(),
        status.iter().map(|s| s.streams_opened).collect::<Vec<_>>()
    );
    assert_eq!(
        status[0].streams_opened, 1,
        "the stream was never abandoned"
    );
    assert!(
        mirror.appends() < 200,
        "appends take what arrived together, not one origin batch each: {}",
        mirror.appends()
    );

    stop_partitions(&stop, tasks).await;
    client.close("test over");
    daemon.stop().await;
    endpoint.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_and_restart_resumes_from_the_tail() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let tuning = LinkTuning::default();
    let origin = MemoryOriginLog::new(TOPIC, 4);
    let mirror = MemoryMirrorLog::new();
    let mut rng = StdRng::seed_from_u64(5);
    for p in 0..4 {
        fill(&origin, &mut rng, p, 200);
    }
    let daemon = OriginDaemon::start(&ca, &origin, &tuning, server_config());
    let appending = CancellationToken::new();
    let appender = spawn_live_appender(&origin, 0..4, appending.clone(), 6);

    // First incarnation: partitions 0-1 shut down by their token, 2-3 aborted outright,
    // while the origin keeps appending.
    let (local_a, client_a) = receiver(&ca, &mirror, vec![daemon.addr()], &tuning, client_config());
    let stop_a = CancellationToken::new();
    let graceful = run_partitions(&client_a, 0..2, &stop_a);
    let mut hard = run_partitions(&client_a, 2..4, &CancellationToken::new());
    wait_until("mirroring to be under way", || {
        (0..4).all(|p| mirror.len(ORIGIN, p) >= 400)
    })
    .await;
    hard.abort_all();
    while hard.join_next().await.is_some() {}
    stop_partitions(&stop_a, graceful).await;
    client_a.close("crash");
    local_a.close();
    let at_crash: Vec<usize> = (0..4).map(|p| mirror.len(ORIGIN, p)).collect();

    // Second incarnation: a new process, same mirror topic.
    let (local_b, client_b) = receiver(&ca, &mirror, vec![daemon.addr()], &tuning, client_config());
    let stop_b = CancellationToken::new();
    let tasks = run_partitions(&client_b, 0..4, &stop_b);
    wait_until("the new client to resume from the tails", || {
        let status = client_b.status();
        status.len() == 4 && status.iter().all(|s| s.records_mirrored >= 100)
    })
    .await;
    appending.cancel();
    appender.await.expect("appender");
    assert_mirror_holds_everything(&origin, &mirror, 0..4).await;
    let total: u64 = client_b.status().iter().map(|s| s.records_mirrored).sum();
    let expected: usize = (0..4)
        .map(|p| origin.records(p).len() - at_crash[p as usize])
        .sum();
    assert_eq!(
        total, expected as u64,
        "the new client wrote exactly the rest"
    );

    stop_partitions(&stop_b, tasks).await;
    client_b.close("test over");
    daemon.stop().await;
    local_b.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_mirror_appends_are_retried_from_the_tail() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let tuning = LinkTuning::default();
    let origin = MemoryOriginLog::new(TOPIC, 4);
    let mirror = MemoryMirrorLog::new();
    let mut rng = StdRng::seed_from_u64(7);
    for p in 0..4 {
        fill(&origin, &mut rng, p, 2_000);
    }
    // Small batches, so there are many appends to fail.
    let daemon = OriginDaemon::start(
        &ca,
        &origin,
        &tuning,
        MirrorServerConfig {
            max_batch_bytes: 8 * 1024,
            ..server_config()
        },
    );
    let (local, client) = receiver(&ca, &mirror, vec![daemon.addr()], &tuning, client_config());

    // The mirror topic is down at first: tasks back off on the tail read.
    mirror.set_unavailable(true);
    let stop = CancellationToken::new();
    let tasks = run_partitions(&client, 0..4, &stop);
    wait_until("tasks to back off", || {
        let status = client.status();
        status.len() == 4
            && status
                .iter()
                .all(|s| matches!(&s.state, MirrorTaskState::Backoff(why) if why.contains("tail")))
    })
    .await;
    mirror.fail_next_appends(3);
    mirror.fail_next_appends_partially(3);
    mirror.set_unavailable(false);

    assert_mirror_holds_everything(&origin, &mirror, 0..4).await;
    assert_eq!(mirror.failed_appends(), 6);
    let retried: u64 = client
        .status()
        .iter()
        .map(|s| s.streams_opened.saturating_sub(1))
        .sum();
    assert!(
        retried >= 6,
        "every failed append ends its stream: {retried}"
    );

    stop_partitions(&stop, tasks).await;
    client.close("test over");
    daemon.stop().await;
    local.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_past_the_tail_is_reported_as_a_gap() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let tuning = LinkTuning::default();
    let origin = MemoryOriginLog::new(TOPIC, 2);
    let mirror = MemoryMirrorLog::new();
    let mut rng = StdRng::seed_from_u64(9);
    for p in 0..2 {
        fill(&origin, &mut rng, p, 1_000);
    }
    // Partition 0: nothing mirrored yet, the origin dropped everything below 400.
    origin.set_earliest(0, 400).expect("retention");
    // Partition 1: the first 100 records mirrored earlier, then the origin dropped below 600.
    let early = origin.records(1)[..100].to_vec();
    let tail = early.last().expect("records").offset;
    mirror.append(ORIGIN, 1, &early).await.expect("append");
    origin.set_earliest(1, 600).expect("retention");

    let daemon = OriginDaemon::start(&ca, &origin, &tuning, server_config());
    let (local, client) = receiver(&ca, &mirror, vec![daemon.addr()], &tuning, client_config());
    let stop = CancellationToken::new();
    let tasks = run_partitions(&client, 0..2, &stop);
    // Live records after the gap arrive too.
    let appender = spawn_appender(&origin, 0..2, 200, Duration::from_millis(500), 10);
    appender.await.expect("appender");
    wait_caught_up(&origin, &mirror, 0..2).await;

    assert_mirror_equals(&mirror, 0, &origin.records(0));
    let mut want = early.clone();
    want.extend(origin.records(1));
    assert_mirror_equals(&mirror, 1, &want);
    let mut gaps = mirror.gaps();
    gaps.sort_by_key(|g| g.partition);
    assert_eq!(
        gaps,
        [
            MirrorGap {
                origin: ORIGIN.into(),
                partition: 0,
                from: 0,
                to: 399
            },
            MirrorGap {
                origin: ORIGIN.into(),
                partition: 1,
                from: tail + 1,
                to: 599
            },
        ]
    );
    let status = client.status();
    assert_eq!(status[0].gaps, 1);
    assert_eq!(status[0].last_gap, Some((0, 399)));
    assert_eq!(status[1].gaps, 1);
    assert_eq!(status[1].last_gap, Some((tail + 1, 599)));

    stop_partitions(&stop, tasks).await;
    client.close("test over");
    daemon.stop().await;
    local.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_20k_records_through_a_35ms_link() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let tuning = LinkTuning::default();
    let origin = MemoryOriginLog::new(TOPIC, 4);
    let mirror = MemoryMirrorLog::new();
    let mut rng = StdRng::seed_from_u64(11);
    // Experiments: DTFED_MIRROR_TEST_DELAY_MS and DTFED_MIRROR_TEST_RECORDS change the link
    // and the load (default 35 ms, 5,000 records per partition).
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let delay_ms = env("DTFED_MIRROR_TEST_DELAY_MS", 35);
    let per_partition = env("DTFED_MIRROR_TEST_RECORDS", 5_000) as usize;
    for p in 0..4 {
        fill(&origin, &mut rng, p, per_partition);
    }
    let bytes: usize = (0..4)
        .flat_map(|p| origin.records(p))
        .map(|r| r.value.len() + r.key.len())
        .sum();
    let daemon = OriginDaemon::start(&ca, &origin, &tuning, server_config());
    let relay = WanRelay::start(
        loopback(),
        daemon.endpoint.local_addr().expect("addr"),
        WanProfile {
            limit: env(
                "DTFED_MIRROR_TEST_RELAY_LIMIT",
                WanProfile::default().limit as u64,
            ) as usize,
            ..WanProfile::with_delay(Duration::from_millis(delay_ms))
        },
    )
    .await
    .expect("relay");
    let (local, client) = receiver(
        &ca,
        &mirror,
        vec![relay.local_addr().to_string()],
        &tuning,
        client_config(),
    );
    let started = Instant::now();
    let stop = CancellationToken::new();
    let tasks = run_partitions(&client, 0..4, &stop);
    wait_caught_up(&origin, &mirror, 0..4).await;
    let took = started.elapsed();
    for p in 0..4 {
        assert_mirror_equals(&mirror, p, &origin.records(p));
    }
    let rtt = client.links()[0].rtt_ms;
    let total = 4 * per_partition;
    println!(
        "{delay_ms} ms one way (rtt {rtt:?} ms): {total} records ({:.1} MB of keys+values) in {took:?}: \
         {:.0} records/s, including the QUIC+TLS handshake",
        bytes as f64 / 1e6,
        total as f64 / took.as_secs_f64()
    );

    stop_partitions(&stop, tasks).await;
    client.close("test over");
    daemon.stop().await;
    local.close();
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_closes_streams_and_resume_catches_up() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let tuning = LinkTuning::default();
    let origin = MemoryOriginLog::new(TOPIC, 2);
    let mirror = MemoryMirrorLog::new();
    let mut rng = StdRng::seed_from_u64(13);
    for p in 0..2 {
        fill(&origin, &mut rng, p, 300);
    }
    let daemon = OriginDaemon::start(&ca, &origin, &tuning, server_config());
    let (local, client) = receiver(&ca, &mirror, vec![daemon.addr()], &tuning, client_config());
    let stop = CancellationToken::new();
    let tasks = run_partitions(&client, 0..2, &stop);
    wait_caught_up(&origin, &mirror, 0..2).await;

    assert!(client.pause_peer(ORIGIN));
    assert!(!client.pause_peer("paris"));
    wait_until("tasks to pause and the origin to stop serving", || {
        client
            .status()
            .iter()
            .all(|s| s.state == MirrorTaskState::Paused)
            && daemon.status.streams().is_empty()
    })
    .await;
    assert!(client.links()[0].paused);
    let before: Vec<usize> = (0..2).map(|p| mirror.len(ORIGIN, p)).collect();
    for p in 0..2 {
        fill(&origin, &mut rng, p, 100);
    }
    // A negative check needs a little time to be meaningful.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paused: Vec<usize> = (0..2).map(|p| mirror.len(ORIGIN, p)).collect();
    assert_eq!(before, paused, "nothing mirrored while paused");

    assert!(client.resume_peer(ORIGIN));
    assert_mirror_holds_everything(&origin, &mirror, 0..2).await;

    stop_partitions(&stop, tasks).await;
    client.close("test over");
    daemon.stop().await;
    local.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_origin_daemon_takes_over_when_one_stops() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let tuning = quick_tuning();
    let origin = MemoryOriginLog::new(TOPIC, 2);
    let mirror = MemoryMirrorLog::new();
    let mut rng = StdRng::seed_from_u64(15);
    for p in 0..2 {
        fill(&origin, &mut rng, p, 300);
    }
    // Two daemons of the origin region, one log (one Kafka cluster).
    let first = OriginDaemon::start(&ca, &origin, &tuning, server_config());
    let second = OriginDaemon::start(&ca, &origin, &tuning, server_config());
    let (local, client) = receiver(
        &ca,
        &mirror,
        vec![first.addr(), second.addr()],
        &tuning,
        client_config(),
    );
    let stop = CancellationToken::new();
    let tasks = run_partitions(&client, 0..2, &stop);
    wait_caught_up(&origin, &mirror, 0..2).await;
    let serving = client.links()[0].addr.expect("connected");
    let (gone, remaining) = if serving == first.endpoint.local_addr().expect("addr") {
        (first, second)
    } else {
        (second, first)
    };
    let appender = spawn_appender(&origin, 0..2, 500, Duration::from_secs(2), 16);
    gone.stop().await;
    appender.await.expect("appender");
    assert_mirror_holds_everything(&origin, &mirror, 0..2).await;
    let link = &client.links()[0];
    assert_eq!(
        link.addr,
        Some(remaining.endpoint.local_addr().expect("addr")),
        "{link:?}"
    );
    assert!(link.connects >= 2);

    stop_partitions(&stop, tasks).await;
    client.close("test over");
    remaining.stop().await;
    local.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_log_behind_the_mirror_is_retried_not_written() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let tuning = LinkTuning::default();
    let origin = MemoryOriginLog::new(TOPIC, 1);
    let mirror = MemoryMirrorLog::new();
    let mut rng = StdRng::seed_from_u64(17);
    fill(&origin, &mut rng, 0, 100);
    // The mirror already holds origin offset 1000: the origin lost data, or was recreated.
    let ahead = record(&mut rng, 1_000);
    mirror
        .append(ORIGIN, 0, std::slice::from_ref(&ahead))
        .await
        .expect("append");
    let daemon = OriginDaemon::start(&ca, &origin, &tuning, server_config());
    let (local, client) = receiver(
        &ca,
        &mirror,
        vec![daemon.addr()],
        &tuning,
        MirrorClientConfig {
            backoff_max: Duration::from_millis(500),
            ..client_config()
        },
    );
    let stop = CancellationToken::new();
    let tasks = run_partitions(&client, 0..1, &stop);
    wait_until("the task to report the origin behind", || {
        client.status().iter().any(|s| {
            matches!(&s.state, MirrorTaskState::Backoff(why) if why.contains("ends before offset 1001"))
        })
    })
    .await;
    assert_eq!(mirror.len(ORIGIN, 0), 1, "nothing written");
    assert!(mirror.gaps().is_empty(), "not a gap");

    // Once the origin's log passes the mirror's tail, mirroring goes on from there.
    while origin.high_watermark(0).expect("hw") <= 1_001 {
        fill(&origin, &mut rng, 0, 50);
    }
    fill(&origin, &mut rng, 0, 50);
    wait_caught_up(&origin, &mirror, 0..1).await;
    let mut want = vec![ahead];
    want.extend(origin.records(0).into_iter().filter(|r| r.offset > 1_000));
    assert_mirror_equals(&mirror, 0, &want);

    stop_partitions(&stop, tasks).await;
    client.close("test over");
    daemon.stop().await;
    local.close();
}

/// A peer (or anyone who can write its local topic) labels records with a third region, or
/// with the receiver's own name: the mirror writes every one of them as the peer's own
/// (the origin is the region the link authenticated), so no label can pass for another
/// region's messages downstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_labelled_with_another_region_are_mirrored_as_the_peers_own() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let tuning = LinkTuning::default();
    let origin = MemoryOriginLog::new(TOPIC, 1);
    let mirror = MemoryMirrorLog::new();
    let mut rng = StdRng::seed_from_u64(9);
    for (i, claim) in ["frankfurt", LOCAL, ORIGIN, "frankfurt", LOCAL]
        .iter()
        .enumerate()
    {
        let mut r = record(&mut rng, i as i64);
        r.headers.retain(|(k, _)| k != HEADER_ORIGIN);
        r.headers
            .push((HEADER_ORIGIN.to_owned(), claim.as_bytes().to_vec()));
        if i == 4 {
            // Two labels, the peer's first: still only the peer's name comes out.
            r.headers
                .insert(0, (HEADER_ORIGIN.to_owned(), ORIGIN.as_bytes().to_vec()));
        }
        origin.push(0, r).expect("push");
    }
    let daemon = OriginDaemon::start(&ca, &origin, &tuning, server_config());
    let (local, client) = receiver(&ca, &mirror, vec![daemon.addr()], &tuning, client_config());
    let stop = CancellationToken::new();
    let tasks = run_partitions(&client, 0..1, &stop);
    wait_caught_up(&origin, &mirror, 0..1).await;
    let got = mirror.records(ORIGIN, 0);
    assert_eq!(origin_offsets(&got), [0, 1, 2, 3, 4]);
    for r in &got {
        let origins: Vec<&[u8]> = r
            .headers
            .iter()
            .filter(|(k, _)| k == HEADER_ORIGIN)
            .map(|(_, v)| v.as_slice())
            .collect();
        assert_eq!(origins, [ORIGIN.as_bytes()], "{r:?}");
    }
    stop_partitions(&stop, tasks).await;
    client.close("test over");
    daemon.stop().await;
    local.close();
}

/// A peer region may hold at most `max_streams_per_peer` streams and `max_links_per_peer`
/// links: one more stream is refused with an `unavailable` error naming the limit (the
/// receiving task shows and logs it, and retries), one more link is closed with a reason;
/// what is within the limits keeps mirroring, and a freed stream is taken up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_links_beyond_the_per_peer_limits_are_refused() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let tuning = LinkTuning::default();
    let origin = MemoryOriginLog::new(TOPIC, 3);
    let mirror = MemoryMirrorLog::new();
    let mut rng = StdRng::seed_from_u64(5);
    for p in 0..3 {
        fill(&origin, &mut rng, p, 50);
    }
    let daemon = OriginDaemon::start(
        &ca,
        &origin,
        &tuning,
        MirrorServerConfig {
            max_streams_per_peer: 2,
            max_links_per_peer: 1,
            ..server_config()
        },
    );
    let (local, client) = receiver(&ca, &mirror, vec![daemon.addr()], &tuning, client_config());
    let stop_two = CancellationToken::new();
    let two = run_partitions(&client, 0..2, &stop_two);
    wait_caught_up(&origin, &mirror, 0..2).await;
    let stop_third = CancellationToken::new();
    let third = run_partitions(&client, 2..3, &stop_third);
    wait_until(
        "the third stream to be refused, with the limit named",
        || {
            client.status().iter().any(|s| {
                s.partition == 2
                    && matches!(&s.state, MirrorTaskState::Backoff(why)
                    if why.contains("too many mirror streams from region tokyo: at most 2"))
            })
        },
    )
    .await;
    assert!(mirror.is_empty(ORIGIN, 2));
    // A refused stream counts while its refusal is answered (the client can read the
    // answer before the server's side of it ends): then the count is back at the limit.
    wait_until("the refused stream to be answered and let go", || {
        daemon
            .status
            .peer_usage()
            .first()
            .is_some_and(|(_, u)| u.streams <= 2)
    })
    .await;
    let usage = daemon.status.peer_usage();
    assert_eq!(usage.len(), 1, "{usage:?}");
    assert_eq!(usage[0].0, LOCAL);
    assert!(usage[0].1.refused_streams >= 1, "{usage:?}");
    assert!(usage[0].1.streams <= 2, "{usage:?}");
    // The refused stream never opened a reader of the origin log.
    assert_eq!(origin.opens(), 2);

    // A second daemon of the receiving region: its link is one too many.
    let (other_local, other) =
        receiver(&ca, &mirror, vec![daemon.addr()], &tuning, client_config());
    let stop_other = CancellationToken::new();
    let mut other_task = {
        let other = other.clone();
        let stop = stop_other.clone();
        tokio::spawn(async move { other.run_partition(ORIGIN, TOPIC, 2, stop).await })
    };
    wait_until(
        "the second link to be refused, with the limit named",
        || {
            other.status().iter().any(|s| {
                matches!(&s.state, MirrorTaskState::Backoff(why)
                if why.contains("too many mirror links from region tokyo: at most 1"))
            })
        },
    )
    .await;
    assert!(daemon.status.peer_usage()[0].1.refused_links >= 1);
    stop_other.cancel();
    tokio::time::timeout(WAIT, &mut other_task)
        .await
        .expect("stops")
        .expect("task")
        .expect("ran");
    other.close("test over");
    other_local.close();

    // One stream freed: the third partition gets in and catches up.
    stop_partitions(&stop_two, two).await;
    wait_caught_up(&origin, &mirror, 2..3).await;
    assert_mirror_equals(&mirror, 2, &origin.records(2));
    stop_partitions(&stop_third, third).await;
    client.close("test over");
    daemon.stop().await;
    local.close();
}

/// The same origin against a mirror log that can grow its topics (the daemon's): the count
/// is learned from the origin. Every task of the origin grows the mirror topic to the
/// origin's count (once) and mirrors; when the origin grows while streaming, partition 0's
/// re-check grows the mirror topic again and nothing stops; the new partitions mirror too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_with_more_partitions_has_the_mirror_topic_grown_to_match() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let tuning = LinkTuning::default();
    let origin = MemoryOriginLog::new(TOPIC, 4);
    let mut rng = StdRng::seed_from_u64(4);
    for p in 0..4 {
        fill(&origin, &mut rng, p, 20);
    }
    let daemon = OriginDaemon::start(&ca, &origin, &tuning, server_config());
    let mirror = MemoryMirrorLog::growing();
    let (local, client) = receiver_with_partitions(
        &ca,
        &mirror,
        vec![daemon.addr()],
        &tuning,
        MirrorClientConfig {
            partitions_recheck: Duration::from_millis(300),
            ..client_config()
        },
        Some(2),
    );
    let stop = CancellationToken::new();
    let mut tasks = run_partitions(&client, 0..4, &stop);
    assert_mirror_holds_everything(&origin, &mirror, 0..4).await;
    assert_eq!(mirror.grown_to(ORIGIN), Some(4));
    assert!(client.links()[0].last_error.is_none());

    origin.add_partitions(2);
    for p in 4..6 {
        fill(&origin, &mut rng, p, 20);
    }
    fill(&origin, &mut rng, 0, 20);
    wait_until("the re-check to grow the mirror topic", || {
        mirror.grown_to(ORIGIN) == Some(6)
    })
    .await;
    for p in 4..6 {
        let (client, stop) = (client.clone(), stop.clone());
        tasks.spawn(async move { client.run_partition(ORIGIN, TOPIC, p, stop).await });
    }
    assert_mirror_holds_everything(&origin, &mirror, 0..6).await;
    assert!(
        client
            .status()
            .iter()
            .all(|s| s.state == MirrorTaskState::Streaming),
        "{:?}",
        client.status()
    );
    stop_partitions(&stop, tasks).await;
    client.close("test over");
    daemon.stop().await;
    local.close();
}

/// The origin's local topic has more partitions than the mirror topic here (it grew, or
/// the count was configured wrong): the receiver learns the origin's count on the link and
/// refuses to mirror, saying why in every task's state, the link's last error and the logs,
/// instead of silently never mirroring the extra partitions. With matching counts, it
/// mirrors as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_count_mismatch_with_the_origin_is_refused_loudly() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let tuning = LinkTuning::default();
    let origin = MemoryOriginLog::new(TOPIC, 4);
    let mut rng = StdRng::seed_from_u64(3);
    for p in 0..4 {
        fill(&origin, &mut rng, p, 20);
    }
    let daemon = OriginDaemon::start(&ca, &origin, &tuning, server_config());

    let mirror = MemoryMirrorLog::new();
    let (local, client) = receiver_with_partitions(
        &ca,
        &mirror,
        vec![daemon.addr()],
        &tuning,
        client_config(),
        Some(2),
    );
    let stop = CancellationToken::new();
    let tasks = run_partitions(&client, 0..2, &stop);
    let want = "partition count mismatch: seoul's topic dtfed.local has 4 partitions, \
                the mirror topic here has 2";
    wait_until("both tasks to refuse, saying why", || {
        let status = client.status();
        status.len() == 2
            && status
                .iter()
                .all(|s| matches!(&s.state, MirrorTaskState::Backoff(why) if why.contains(want)))
    })
    .await;
    let links = client.links();
    assert!(
        links[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains(want)),
        "{links:?}"
    );
    assert!(mirror.is_empty(ORIGIN, 0) && mirror.is_empty(ORIGIN, 1));
    assert_eq!(origin.opens(), 0, "nothing was streamed");
    stop_partitions(&stop, tasks).await;
    client.close("test over");
    local.close();

    // The same origin with a mirror topic of 4 partitions: mirrored.
    let (local, client) = receiver_with_partitions(
        &ca,
        &mirror,
        vec![daemon.addr()],
        &tuning,
        client_config(),
        Some(4),
    );
    let stop = CancellationToken::new();
    let tasks = run_partitions(&client, 0..4, &stop);
    assert_mirror_holds_everything(&origin, &mirror, 0..4).await;
    assert!(client.links()[0].last_error.is_none());
    stop_partitions(&stop, tasks).await;
    client.close("test over");
    local.close();

    // While streaming, the origin grows to 6 partitions: the task of partition 0 finds out
    // on its next check and refuses, saying so.
    let (local, client) = receiver_with_partitions(
        &ca,
        &mirror,
        vec![daemon.addr()],
        &tuning,
        MirrorClientConfig {
            partitions_recheck: Duration::from_millis(300),
            ..client_config()
        },
        Some(4),
    );
    let stop = CancellationToken::new();
    let tasks = run_partitions(&client, 0..4, &stop);
    wait_until("streaming", || {
        client
            .status()
            .iter()
            .any(|s| s.partition == 0 && s.state == MirrorTaskState::Streaming)
    })
    .await;
    origin.add_partitions(2);
    let grown = "seoul's topic dtfed.local has 6 partitions, the mirror topic here has 4";
    wait_until("the growth to show", || {
        client.status().iter().any(|s| {
            s.partition == 0
                && matches!(&s.state, MirrorTaskState::Backoff(why) if why.contains(grown))
        }) && client.links()[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains(grown))
    })
    .await;
    stop_partitions(&stop, tasks).await;
    client.close("test over");
    daemon.stop().await;
    local.close();
}
