//! Relaying through a third region at the link level, over real QUIC with mutual TLS on loopback and in-memory
//! logs: tokyo mirrors seoul directly through a cuttable WAN relay; frankfurt serves its
//! mirror of seoul (with seoul's offsets) as a relay. A cut moves tokyo's partitions to
//! frankfurt, the heal moves them back, and the mirror holds every record exactly once, in
//! order. A region asking a relay for its own records is refused.

mod common;
#[path = "common/memory_log.rs"]
mod memory_log;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{identity, init_tracing, loopback};
use dtfed_proto::link::{LinkRecord, LinkTimers};
use dtfed_proto::record::HEADER_ORIGIN;
use dtfed_regions::mirror::{
    mirror_topic, MirrorClient, MirrorClientConfig, MirrorServer, MirrorServerConfig,
    MirrorTaskState, MirrorTaskStatus, ServerStatus,
};
use dtfed_regions::{FederationCa, LinkTuning, PeerRegion, RegionEndpoint, WanProfile, WanRelay};
use memory_log::{MemoryMirrorLog, MemoryOriginLog, MirroredRecord};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "dtfed.local";
const PARTITIONS: i32 = 2;
const WAIT: Duration = Duration::from_secs(120);

/// Short QUIC timers: a cut kills the connection in 1.5 s.
fn tuning() -> LinkTuning {
    LinkTuning {
        keep_alive_interval: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(1500),
        ..LinkTuning::default()
    }
}

fn timers() -> LinkTimers {
    LinkTimers {
        heartbeat_interval: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(5),
    }
}

fn bind(ca: &FederationCa, region: &str, peers: &[&str]) -> Arc<RegionEndpoint> {
    Arc::new(
        RegionEndpoint::bind_with(
            loopback(),
            identity(ca, region),
            peers.iter().map(|p| p.to_string()).collect(),
            tuning(),
        )
        .expect("bind"),
    )
}

fn serve(
    endpoint: &Arc<RegionEndpoint>,
    local: &MemoryOriginLog,
    relayed: Option<(&str, &MemoryOriginLog)>,
    stop: &CancellationToken,
) -> ServerStatus {
    let mut server = MirrorServer::new(endpoint.clone(), Arc::new(local.clone())).with_config(
        MirrorServerConfig {
            timers: timers(),
            ..MirrorServerConfig::default()
        },
    );
    if let Some((origin, log)) = relayed {
        server = server.with_relayed(origin, Arc::new(log.clone()));
    }
    let status = server.status();
    tokio::spawn(server.run(stop.clone()));
    status
}

fn peer(name: &str, addr: String, relay: bool, direct: bool) -> PeerRegion {
    PeerRegion {
        name: name.to_owned(),
        addrs: vec![addr],
        partitions: None,
        topic: None,
        relay,
        direct,
    }
}

fn client_config() -> MirrorClientConfig {
    MirrorClientConfig {
        timers: timers(),
        relay_after: Duration::from_secs(1),
        ..MirrorClientConfig::default()
    }
}

fn record(offset: i64) -> LinkRecord {
    LinkRecord {
        offset,
        timestamp_ms: 1_700_000_000_000 + offset,
        key: format!("room-{}", offset % 5).into_bytes(),
        headers: vec![(HEADER_ORIGIN.to_owned(), b"seoul".to_vec())],
        value: format!(r#"{{"from":"p","ts":{offset},"body":{offset}}}"#).into_bytes(),
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn routes(client: &MirrorClient) -> Vec<MirrorTaskStatus> {
    client
        .status()
        .into_iter()
        .filter(|s| s.origin == "seoul")
        .collect()
}

fn all_streaming(client: &MirrorClient, route: &str) -> bool {
    let tasks = routes(client);
    tasks.len() == PARTITIONS as usize
        && tasks
            .iter()
            .all(|s| s.route == route && s.state == MirrorTaskState::Streaming)
}

fn mirrored_offsets(mirror: &MemoryMirrorLog, partition: i32) -> Vec<i64> {
    mirror
        .records("seoul", partition)
        .iter()
        .filter_map(MirroredRecord::origin_offset)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_moves_partitions_to_the_relay_and_the_heal_moves_them_back() {
    init_tracing();
    let ca = FederationCa::generate("relay test").expect("ca");
    let stop = CancellationToken::new();
    // seoul: the origin. frankfurt: mirrors seoul (its mirror topic, with seoul's offsets,
    // kept here as an in-memory log equal to seoul's) and relays it.
    let seoul_log = MemoryOriginLog::new(TOPIC, PARTITIONS);
    let frankfurt_mirror = MemoryOriginLog::new(mirror_topic("seoul"), PARTITIONS);
    let seoul = bind(&ca, "seoul", &["tokyo", "frankfurt"]);
    serve(&seoul, &seoul_log, None, &stop);
    let frankfurt = bind(&ca, "frankfurt", &["tokyo", "seoul"]);
    serve(
        &frankfurt,
        &MemoryOriginLog::new(TOPIC, PARTITIONS),
        Some(("seoul", &frankfurt_mirror)),
        &stop,
    );
    let wan = WanRelay::start(
        loopback(),
        seoul.local_addr().expect("addr"),
        WanProfile::with_delay(Duration::from_millis(1)),
    )
    .await
    .expect("wan relay");

    let mirror = MemoryMirrorLog::new();
    let tokyo = bind(&ca, "tokyo", &["seoul", "frankfurt"]);
    let client = MirrorClient::with_config(
        tokyo.clone(),
        Arc::new(mirror.clone()),
        vec![
            peer("seoul", wan.local_addr().to_string(), false, true),
            peer(
                "frankfurt",
                frankfurt.local_addr().expect("addr").to_string(),
                true,
                true,
            ),
        ],
        client_config(),
    );
    let mut tasks = JoinSet::new();
    for p in 0..PARTITIONS {
        let (client, stop) = (client.clone(), stop.clone());
        tasks.spawn(async move { client.run_partition("seoul", TOPIC, p, stop).await });
    }

    // Records keep arriving at seoul, and frankfurt mirrors them.
    let appending = CancellationToken::new();
    let appender = {
        let (seoul_log, frankfurt_mirror, appending) = (
            seoul_log.clone(),
            frankfurt_mirror.clone(),
            appending.clone(),
        );
        tokio::spawn(async move {
            let mut next = [0i64; PARTITIONS as usize];
            while !appending.is_cancelled() {
                for p in 0..PARTITIONS {
                    let i = p as usize;
                    for _ in 0..5 {
                        seoul_log.push(p, record(next[i])).expect("push");
                        frankfurt_mirror.push(p, record(next[i])).expect("push");
                        // Sparse offsets, as Kafka's can be.
                        next[i] += 1 + i64::from(next[i] % 50 == 49);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    wait_until("direct streaming", || all_streaming(&client, "direct")).await;

    wan.cut();
    let cut_at = Instant::now();
    wait_until("the relay to carry seoul's partitions", || {
        all_streaming(&client, "via frankfurt")
    })
    .await;
    let rerouted = cut_at.elapsed();
    // Records appended during the cut reach tokyo while it lasts.
    let during: Vec<i64> = (0..PARTITIONS)
        .map(|p| seoul_log.high_watermark(p).expect("hw"))
        .collect();
    wait_until("records appended during the cut to arrive", || {
        (0..PARTITIONS).all(|p| {
            mirrored_offsets(&mirror, p)
                .last()
                .is_some_and(|o| *o >= during[p as usize] - 1)
        })
    })
    .await;
    // Past QUIC's idle timeout: the direct connection is gone, not merely quiet.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        all_streaming(&client, "via frankfurt"),
        "{:?}",
        routes(&client)
    );

    // An operator pausing the relay stops what it carries; resuming brings it back.
    client.pause_peer("frankfurt");
    wait_until("pausing the relay to end its streams", || {
        routes(&client)
            .iter()
            .all(|s| s.state != MirrorTaskState::Streaming)
    })
    .await;
    client.resume_peer("frankfurt");
    wait_until("the relay to carry them again", || {
        all_streaming(&client, "via frankfurt")
    })
    .await;

    wan.heal();
    let healed_at = Instant::now();
    wait_until("the direct link to carry them again", || {
        all_streaming(&client, "direct")
    })
    .await;
    let back = healed_at.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    appending.cancel();
    appender.await.expect("appender");
    wait_until("the mirror to catch up", || {
        (0..PARTITIONS).all(|p| {
            mirrored_offsets(&mirror, p).last().copied()
                == seoul_log.records(p).last().map(|r| r.offset)
        })
    })
    .await;
    for p in 0..PARTITIONS {
        let want: Vec<i64> = seoul_log.records(p).iter().map(|r| r.offset).collect();
        let got = mirrored_offsets(&mirror, p);
        let first_difference = got.iter().zip(&want).position(|(g, w)| g != w);
        assert!(
            got.len() == want.len() && first_difference.is_none(),
            "partition {p}: mirror holds {} records, seoul {}; first difference at index \
             {first_difference:?} (lost, duplicated or reordered)",
            got.len(),
            want.len()
        );
        for (got, want) in mirror.records("seoul", p).iter().zip(seoul_log.records(p)) {
            assert_eq!(got.value, want.value);
            assert_eq!(got.headers, want.mirror_headers("seoul"));
        }
    }
    assert!(
        routes(&client).iter().all(|s| s.route_switches >= 2),
        "{:?}",
        routes(&client)
    );
    assert!(frankfurt_mirror.opens() >= PARTITIONS as u64);
    eprintln!("rerouted {rerouted:?} after the cut, direct again {back:?} after the heal");
    stop.cancel();
    while let Some(done) = tasks.join_next().await {
        done.expect("task").expect("ran");
    }
    client.close("test over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_never_serves_a_region_its_own_records() {
    init_tracing();
    let ca = FederationCa::generate("relay refusal").expect("ca");
    let stop = CancellationToken::new();
    let frankfurt_mirror = MemoryOriginLog::new(mirror_topic("seoul"), PARTITIONS);
    for o in 0..10 {
        frankfurt_mirror.push(0, record(o)).expect("push");
    }
    let frankfurt = bind(&ca, "frankfurt", &["seoul"]);
    serve(
        &frankfurt,
        &MemoryOriginLog::new(TOPIC, PARTITIONS),
        Some(("seoul", &frankfurt_mirror)),
        &stop,
    );
    // seoul (say, restored from an empty disk) tries to pull its own partition through
    // frankfurt: the relay refuses, and opens no reader.
    let mirror = MemoryMirrorLog::new();
    let seoul = bind(&ca, "seoul", &["frankfurt"]);
    let client = MirrorClient::with_config(
        seoul.clone(),
        Arc::new(mirror.clone()),
        vec![
            peer("seoul", "127.0.0.1:9".into(), false, false),
            peer(
                "frankfurt",
                frankfurt.local_addr().expect("addr").to_string(),
                true,
                true,
            ),
        ],
        client_config(),
    );
    let task = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move { client.run_partition("seoul", TOPIC, 0, stop).await })
    };
    wait_until("the relay's refusal", || {
        client.status().iter().any(|s| {
            matches!(&s.state, MirrorTaskState::Backoff(why)
                if why.contains("relay frankfurt ended the stream: forbidden")
                    && why.contains("never served back to seoul"))
        })
    })
    .await;
    assert!(mirror.is_empty("seoul", 0));
    assert_eq!(frankfurt_mirror.opens(), 0, "no reader was opened");
    stop.cancel();
    task.await.expect("task").expect("ran");
    client.close("test over");
}

/// `direct = false`: the origin is never dialled, its partitions always come through the
/// relay; a peer that does not relay answers `unknown_topic` and is not asked again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_marked_not_direct_is_pulled_through_a_relay_only() {
    init_tracing();
    let ca = FederationCa::generate("relay only").expect("ca");
    let servers = CancellationToken::new();
    let stop = CancellationToken::new();
    let frankfurt_mirror = MemoryOriginLog::new(mirror_topic("seoul"), PARTITIONS);
    for o in 0..200 {
        frankfurt_mirror.push(0, record(o)).expect("push");
    }
    let frankfurt = bind(&ca, "frankfurt", &["tokyo"]);
    serve(
        &frankfurt,
        &MemoryOriginLog::new(TOPIC, PARTITIONS),
        Some(("seoul", &frankfurt_mirror)),
        &servers,
    );
    // A peer that does not relay (no mirror topics served).
    let london = bind(&ca, "london", &["tokyo"]);
    serve(
        &london,
        &MemoryOriginLog::new(TOPIC, PARTITIONS),
        None,
        &servers,
    );
    // seoul is up (with nothing to serve): a direct pull would find it, and mirror nothing.
    let seoul = bind(&ca, "seoul", &["tokyo"]);
    let seoul_status = serve(
        &seoul,
        &MemoryOriginLog::new(TOPIC, PARTITIONS),
        None,
        &servers,
    );
    let seoul_addr = seoul.local_addr().expect("addr").to_string();

    let mirror = MemoryMirrorLog::new();
    let tokyo = bind(&ca, "tokyo", &["seoul", "frankfurt", "london"]);
    let client = MirrorClient::with_config(
        tokyo.clone(),
        Arc::new(mirror.clone()),
        vec![
            peer("seoul", seoul_addr, false, false),
            peer(
                "frankfurt",
                frankfurt.local_addr().expect("addr").to_string(),
                true,
                true,
            ),
            peer(
                "london",
                london.local_addr().expect("addr").to_string(),
                true,
                true,
            ),
        ],
        client_config(),
    );
    let task = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move { client.run_partition("seoul", TOPIC, 0, stop).await })
    };
    wait_until("every record through the relay", || {
        mirrored_offsets(&mirror, 0).len() == 200
    })
    .await;
    assert_eq!(mirrored_offsets(&mirror, 0), (0..200).collect::<Vec<_>>());
    let status = routes(&client);
    assert_eq!(status[0].route, "via frankfurt", "{status:?}");
    assert_eq!(status[0].state, MirrorTaskState::Streaming);
    assert!(
        seoul_status.peer_usage().is_empty(),
        "seoul was dialled: {:?}",
        seoul_status.peer_usage()
    );
    stop.cancel();
    task.await.expect("task").expect("ran");

    // Only london to pull through: it refuses (it does not relay), and says why.
    let mirror = MemoryMirrorLog::new();
    let stop = CancellationToken::new();
    let client = MirrorClient::with_config(
        tokyo.clone(),
        Arc::new(mirror.clone()),
        vec![
            peer("seoul", "127.0.0.1:9".into(), false, false),
            peer(
                "london",
                london.local_addr().expect("addr").to_string(),
                true,
                true,
            ),
        ],
        client_config(),
    );
    let task = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move { client.run_partition("seoul", TOPIC, 0, stop).await })
    };
    wait_until("london's refusal", || {
        client.status().iter().any(|s| {
            matches!(&s.state, MirrorTaskState::Backoff(why)
                if why.contains("relay london ended the stream: unknown_topic"))
        })
    })
    .await;
    // Then it is not asked again for a while: the task says no relay is reachable.
    wait_until("london cooling down", || {
        client.status().iter().any(|s| {
            matches!(&s.state, MirrorTaskState::Backoff(why) if why.contains("no route to seoul"))
        })
    })
    .await;
    assert!(mirror.is_empty("seoul", 0));
    stop.cancel();
    task.await.expect("task").expect("ran");
    client.close("test over");
    servers.cancel();
}
