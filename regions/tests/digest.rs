//! Digests asked over a real QUIC link with mutual TLS on loopback
//! (`MirrorClient::digest_origin` → `MirrorServer` → `OriginDigests`): the range asked
//! reaches the origin intact and its answer comes back; retention, an origin without
//! digests, and no live link are answered as such, not as digests.

mod common;
#[path = "common/memory_log.rs"]
mod memory_log;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::{identity, init_tracing, loopback};
use dtfed_proto::link::{DigestAnswer, LinkErrorCode, LinkRecord};
use dtfed_regions::mirror::{LogError, MirrorClient, MirrorServer, OriginDigests, RangeDigest};
use dtfed_regions::{FederationCa, PeerRegion, RegionEndpoint};
use memory_log::{MemoryMirrorLog, MemoryOriginLog};
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "dtfed.local";
const LIMIT: Duration = Duration::from_secs(20);

/// Digests of a [`MemoryOriginLog`]: the count of records in the range, and the range's
/// own bytes in place of a hash (what arrives must be what was computed for the range
/// asked). Offsets below `earliest` are gone, as after retention.
struct CountingDigests {
    log: MemoryOriginLog,
    earliest: i64,
    asked: Mutex<Vec<(i32, i64, i64)>>,
}

#[async_trait]
impl OriginDigests for CountingDigests {
    async fn digest(&self, partition: i32, from: i64, to: i64) -> Result<RangeDigest, LogError> {
        self.asked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((partition, from, to));
        if from < self.earliest {
            return Err(LogError::OffsetOutOfRange {
                earliest: self.earliest,
            });
        }
        let count = self
            .log
            .records(partition)
            .iter()
            .filter(|r| (from..to).contains(&r.offset))
            .count() as u64;
        let mut sha256 = [0u8; 32];
        sha256[..8].copy_from_slice(&from.to_be_bytes());
        sha256[8..16].copy_from_slice(&to.to_be_bytes());
        Ok(RangeDigest { count, sha256 })
    }
}

fn record(offset: i64) -> LinkRecord {
    LinkRecord {
        offset,
        timestamp_ms: 1_700_000_000_000 + offset,
        key: b"room-1".to_vec(),
        headers: Vec::new(),
        value: format!("{{\"n\":{offset}}}").into_bytes(),
    }
}

/// An origin (seoul) serving `log`, with `digests` or without, and a receiver (tokyo)
/// mirroring partition 0 so that the link is up.
struct Pair {
    origin: Arc<RegionEndpoint>,
    receiver: Arc<RegionEndpoint>,
    client: MirrorClient,
    stop: CancellationToken,
}

impl Pair {
    async fn start(log: &MemoryOriginLog, digests: Option<Arc<dyn OriginDigests>>) -> Pair {
        let ca = FederationCa::generate("test federation").expect("ca");
        let origin = Arc::new(
            RegionEndpoint::bind(loopback(), identity(&ca, "seoul"), vec!["tokyo".into()])
                .expect("bind"),
        );
        let mut server = MirrorServer::new(origin.clone(), Arc::new(log.clone()));
        if let Some(d) = digests {
            server = server.with_digests(d);
        }
        let stop = CancellationToken::new();
        tokio::spawn(server.run(stop.clone()));
        let receiver = Arc::new(
            RegionEndpoint::bind(loopback(), identity(&ca, "tokyo"), vec!["seoul".into()])
                .expect("bind"),
        );
        let peers = vec![PeerRegion {
            name: "seoul".into(),
            addrs: vec![origin.local_addr().expect("addr").to_string()],
            partitions: None,
            topic: None,
            relay: false,
            direct: true,
        }];
        let client = MirrorClient::new(receiver.clone(), Arc::new(MemoryMirrorLog::new()), peers);
        // Before any link: no digest, and no dial for one.
        let none = client
            .digest_origin("seoul", TOPIC, 0, 0, 10, LIMIT)
            .await
            .expect_err("no link yet");
        assert!(none.contains("no live link"), "{none}");
        let task = client.clone();
        let task_stop = stop.clone();
        tokio::spawn(async move { task.run_partition("seoul", TOPIC, 0, task_stop).await });
        let deadline = Instant::now() + LIMIT;
        while !client.links().iter().any(|l| l.connected) {
            assert!(Instant::now() < deadline, "the link did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Pair {
            origin,
            receiver,
            client,
            stop,
        }
    }

    fn close(self) {
        self.stop.cancel();
        self.client.close("test over");
        self.receiver.close();
        self.origin.close();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_answers_the_range_asked() {
    init_tracing();
    let log = MemoryOriginLog::new(TOPIC, 2);
    for o in 0..50 {
        log.push(1, record(o)).expect("push");
    }
    let digests = Arc::new(CountingDigests {
        log: log.clone(),
        earliest: 5,
        asked: Mutex::new(Vec::new()),
    });
    let pair = Pair::start(&log, Some(digests.clone())).await;

    let answer = pair
        .client
        .digest_origin("seoul", TOPIC, 1, 10, 30, LIMIT)
        .await
        .expect("answered");
    let mut sha256 = [0u8; 32];
    sha256[..8].copy_from_slice(&10i64.to_be_bytes());
    sha256[8..16].copy_from_slice(&30i64.to_be_bytes());
    assert_eq!(answer, DigestAnswer::Digested { count: 20, sha256 });

    // Retention passed the start of the range: the origin says from where it holds.
    let answer = pair
        .client
        .digest_origin("seoul", TOPIC, 1, 0, 30, LIMIT)
        .await
        .expect("answered");
    assert!(
        matches!(
            answer,
            DigestAnswer::Refused {
                code: LinkErrorCode::OffsetOutOfRange { earliest: 5 },
                ..
            }
        ),
        "{answer:?}"
    );
    // A range upside down never reaches the digests: the origin's session refuses it.
    let answer = pair
        .client
        .digest_origin("seoul", TOPIC, 1, 30, 10, LIMIT)
        .await
        .expect("answered");
    assert!(
        matches!(
            answer,
            DigestAnswer::NotSupported
                | DigestAnswer::Refused {
                    code: LinkErrorCode::ProtocolViolation,
                    ..
                }
        ),
        "{answer:?}"
    );
    assert_eq!(
        *digests
            .asked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
        vec![(1, 10, 30), (1, 0, 30)]
    );
    // Only peers are asked.
    let e = pair
        .client
        .digest_origin("paris", TOPIC, 1, 10, 30, LIMIT)
        .await
        .expect_err("not a peer");
    assert!(e.contains("paris"), "{e}");
    pair.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_without_digests_says_so() {
    init_tracing();
    let log = MemoryOriginLog::new(TOPIC, 1);
    log.push(0, record(0)).expect("push");
    let pair = Pair::start(&log, None).await;
    let answer = pair
        .client
        .digest_origin("seoul", TOPIC, 0, 0, 1, LIMIT)
        .await
        .expect("answered");
    assert!(
        matches!(
            answer,
            DigestAnswer::Refused {
                code: LinkErrorCode::Unavailable,
                ..
            }
        ),
        "{answer:?}"
    );
    // A paused link is not used for digests either.
    assert!(pair.client.pause_peer("seoul"));
    let e = pair
        .client
        .digest_origin("seoul", TOPIC, 0, 0, 1, LIMIT)
        .await
        .expect_err("paused");
    assert!(e.contains("paused"), "{e}");
    pair.close();
}
