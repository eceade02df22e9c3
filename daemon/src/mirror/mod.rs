//! This daemon's part in federation, assembled: the QUIC endpoint (mutual TLS), the mirror
//! server that lets peer regions pull this region's local topic, and the mirror client that
//! pulls every peer's partitions into `dtfed.mirror.<origin>`, with the partition
//! tasks shared among the region's daemons through a consumer group ([`MirrorTasks`]).
//!
//! Along the flow, mirror origin → QUIC → mirror sink: [`origin`] serves this region's local
//! topic to peers, [`sink`] writes a peer's records into `dtfed.mirror.<origin>`, [`reads`]
//! holds the short reads of mirror partitions (tails, watermarks) that the sink and the
//! replay of remote origins (`crate::replay::remote`) share, [`relay`] serves this region's
//! mirror topics to other peers with the origins' offsets (`federation.serve_relay`),
//! [`tasks`] decides which daemon of the region runs which (origin, partition), [`metrics`]
//! exports the mirror's state to `/metrics`, and [`watermarks`] shares each partition's
//! replication watermark with the region's daemons for players. Start at
//! [`Federation::start`].
//!
//! Shutdown order: stop the mirror tasks (an append already under way finishes, so the next
//! owner reads a true tail), then the mirror server, then close the endpoint.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::Context;
use async_trait::async_trait;
use dtfed_proto::record::now_ms;
use dtfed_regions::mirror::client::{MirrorClient, MirrorClientConfig, MirrorTaskState};
use dtfed_regions::mirror::server::{MirrorServer, MirrorServerConfig};
use dtfed_regions::mirror::{AgeHistogram, AGE_BUCKETS_MS};
use dtfed_regions::{FederationConfig, PeerRegion, RegionEndpoint, RegionIdentity};
use origin::KafkaOriginLog;
use serde::Serialize;
use sink::{ensure_mirror_topic, KafkaMirrorLog};
use tasks::{MirrorTaskRunner, MirrorTasks, MirrorTopic};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::verify::reader::{LocalTopicDigests, RoomDigests};
use crate::verify::sampler::DigestChecks;
use dtfed_proto::link::DigestAnswer;

pub mod metrics;
pub mod origin;
pub mod reads;
pub mod relay;
pub mod sink;
pub mod tasks;
pub mod watermarks;

pub use dtfed_regions::mirror::{mirror_topic, MIRROR_TOPIC_PREFIX};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A peer link, for `/status`.
#[derive(Clone, Debug, Serialize)]
pub struct LinkView {
    pub region: String,
    pub state: &'static str,
    pub rtt_ms: Option<u64>,
    pub addr: Option<String>,
    pub connects: u64,
    pub last_error: Option<String>,
}

/// A mirror task this daemon runs, for `/status`.
#[derive(Clone, Debug, Serialize)]
pub struct MirrorView {
    pub origin: String,
    pub partition: i32,
    pub state: String,
    pub mirrored_offset: Option<i64>,
    pub origin_high_watermark: Option<i64>,
    pub lag_records: Option<i64>,
    pub lag_seconds: Option<f64>,
    pub gaps: u64,
    pub records_mirrored: u64,
    /// Where the partition is pulled from: `"direct"` or `"via <relay region>"`.
    pub route: String,
    /// Route changes since the task started on this daemon.
    pub route_switches: u64,
    /// Ages of this task's records (now − origin timestamp) when their mirror append was
    /// acknowledged: the cross-region hop (origin Kafka → origin reader → link → mirror
    /// append), without this region's fan-out.
    pub append_age: AgeView,
}

/// An [`AgeHistogram`] for `/status`: quantiles are bucket upper bounds (upper estimates);
/// `counts[i]` counts ages `<= le_ms[i]` and above the bound before (the last one: above
/// every bound), so a reader can take differences between two polls for a window.
#[derive(Clone, Debug, Serialize)]
pub struct AgeView {
    pub count: u64,
    pub sum_ms: u64,
    pub p50_ms: Option<u64>,
    pub p99_ms: Option<u64>,
    pub p999_ms: Option<u64>,
    pub max_ms: u64,
    pub le_ms: Vec<u64>,
    pub counts: Vec<u64>,
}

impl From<&AgeHistogram> for AgeView {
    fn from(h: &AgeHistogram) -> AgeView {
        AgeView {
            count: h.count,
            sum_ms: h.sum_ms,
            p50_ms: h.quantile_ms(0.5),
            p99_ms: h.quantile_ms(0.99),
            p999_ms: h.quantile_ms(0.999),
            max_ms: h.max_ms,
            le_ms: AGE_BUCKETS_MS.to_vec(),
            counts: h.counts.to_vec(),
        }
    }
}

/// Peer region → partition count of its local topic, as this region knows it: its mirror
/// topic's count, raised when an origin with more partitions had its mirror topic grown
/// (`sink`, [`MirrorLog::grow_partitions`](dtfed_regions::mirror::log::MirrorLog)). The
/// room → partition mapping of another region's records (`replay::remote`) reads it, so it
/// follows the origin without a restart.
#[derive(Debug, Default)]
pub struct OriginPartitions(std::sync::RwLock<BTreeMap<String, i32>>);

impl OriginPartitions {
    /// The partition count of `origin`'s local topic, if `origin` is a peer.
    pub fn get(&self, origin: &str) -> Option<i32> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(origin)
            .copied()
    }

    /// Every peer region with its count, now.
    pub fn all(&self) -> BTreeMap<String, i32> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether `origin` is a peer region.
    pub fn contains(&self, origin: &str) -> bool {
        self.get(origin).is_some()
    }

    /// Records `origin`'s count; it only ever grows (a topic never loses partitions).
    pub fn raise(&self, origin: &str, partitions: i32) {
        let mut map = self.0.write().unwrap_or_else(PoisonError::into_inner);
        let n = map.entry(origin.to_owned()).or_insert(partitions);
        *n = (*n).max(partitions);
    }
}

/// Federation of one daemon.
pub struct Federation {
    endpoint: Arc<RegionEndpoint>,
    client: MirrorClient,
    tasks: Mutex<Option<MirrorTasks>>,
    server_stop: CancellationToken,
    server_task: Mutex<Option<JoinHandle<()>>>,
    /// Peer region → partition count of its local topic (= of its mirror topic here).
    pub origins: Arc<OriginPartitions>,
    /// The mirror topics this region's fan-out owners must also consume.
    pub mirror_topics: Vec<String>,
    pub local_addr: std::net::SocketAddr,
    /// Digests of every log this region holds (`crate::verify`).
    pub digests: Arc<RoomDigests>,
    /// The background divergence check's counts (`crate::verify::sampler`).
    pub digest_checks: Arc<DigestChecks>,
}

struct ClientRunner(MirrorClient);

#[async_trait]
impl MirrorTaskRunner for ClientRunner {
    async fn run(
        &self,
        origin: String,
        origin_topic: String,
        partition: i32,
        stop: CancellationToken,
    ) {
        if let Err(e) = self
            .0
            .run_partition(&origin, &origin_topic, partition, stop)
            .await
        {
            tracing::error!(%origin, partition, error = %e, "mirror task could not start");
        }
    }
}

impl Federation {
    pub async fn start(
        cfg: &Config,
        fed: &FederationConfig,
        node: &str,
        local_partitions: i32,
    ) -> anyhow::Result<Federation> {
        let region = &cfg.region;
        let identity = RegionIdentity::load(region, fed)
            .context("loading this region's certificate and key")?;
        let endpoint = Arc::new(
            RegionEndpoint::bind(fed.listen, identity, fed.allowed_peers())
                .with_context(|| format!("binding the federation listener {}", fed.listen))?,
        );
        let local_addr = endpoint
            .local_addr()
            .context("federation listener address")?;

        let origin_log =
            KafkaOriginLog::with_node(&cfg.kafka, region, node, cfg.kafka.local_topic.clone())
                .context("starting the mirror server's Kafka reader")?;
        let origins = Arc::new(OriginPartitions::default());
        // Digests of what this region holds (peers' partition counts as learned), for
        // `dtfed verify`, the background check, and peers' `Digest` requests.
        let digests = Arc::new(
            RoomDigests::new(&cfg.kafka, region, node, local_partitions, origins.clone())
                .context("starting the digest reader")?,
        );
        let mut server = MirrorServer::new(endpoint.clone(), Arc::new(origin_log));
        if fed.serve_relay {
            // Only the mirror topics of configured peers: those are written only from
            // their own authenticated links (or from relays that checked the same).
            for peer in &fed.peers {
                let relayed = relay::RelayedOriginLog::new(&cfg.kafka, region, node, &peer.name)
                    .with_context(|| format!("starting the relay reader of {}", peer.name))?;
                server = server.with_relayed(peer.name.clone(), Arc::new(relayed));
            }
        }
        let server = server
            .with_config(MirrorServerConfig {
                max_links_per_peer: fed.max_links_per_peer,
                max_streams_per_peer: fed.max_streams_per_peer,
                ..MirrorServerConfig::default()
            })
            .with_digests(Arc::new(LocalTopicDigests(digests.clone())));
        let server_stop = CancellationToken::new();
        let server_task = tokio::spawn(server.run(server_stop.clone()));

        let mut topics = Vec::new();
        for peer in &fed.peers {
            let partitions = peer.partitions.unwrap_or(local_partitions);
            let (mirror_topic, partitions) =
                ensure_mirror_topic(&cfg.kafka, &peer.name, partitions)
                    .await
                    .with_context(|| format!("preparing the mirror topic of {}", peer.name))?;
            origins.raise(&peer.name, partitions);
            topics.push(MirrorTopic {
                origin: peer.name.clone(),
                mirror_topic,
                origin_topic: peer
                    .topic
                    .clone()
                    .unwrap_or_else(|| "dtfed.local".to_owned()),
            });
        }
        let mirror_log = KafkaMirrorLog::with_node(&cfg.kafka, region, node)
            .context("starting the mirror producer")?
            .growing(&cfg.kafka, origins.clone());
        // Each peer with the partition count of its mirror topic here: the client checks
        // the origin's own count against it before mirroring, grows the mirror topic to an
        // origin's larger count, and refuses an origin with fewer.
        let peers = fed
            .peers
            .iter()
            .map(|p| PeerRegion {
                partitions: origins.get(&p.name),
                ..p.clone()
            })
            .collect();
        let client = MirrorClient::with_config(
            endpoint.clone(),
            Arc::new(mirror_log),
            peers,
            MirrorClientConfig {
                relay_after: std::time::Duration::from_millis(fed.relay_after_ms),
                ..MirrorClientConfig::default()
            },
        );
        let mirror_topics = topics.iter().map(|t| t.mirror_topic.clone()).collect();
        let tasks = if topics.is_empty() {
            None
        } else {
            Some(
                MirrorTasks::start(
                    &cfg.kafka,
                    region,
                    node,
                    format!("{}.{region}.mirror", cfg.kafka.fanout_group),
                    topics,
                    Arc::new(ClientRunner(client.clone())),
                    CancellationToken::new(),
                )
                .context("joining the mirror task group")?,
            )
        };
        tracing::info!(%region, federation = %local_addr, peers = fed.peers.len(), "federation started");
        Ok(Federation {
            endpoint,
            client,
            tasks: Mutex::new(tasks),
            server_stop,
            server_task: Mutex::new(Some(server_task)),
            origins,
            mirror_topics,
            local_addr,
            digests,
            digest_checks: Arc::new(DigestChecks::default()),
        })
    }

    /// `origin`'s digest of `partition` over `[from, to)`, asked on the link to it (see
    /// `MirrorClient::digest_origin`); only for a partition this daemon mirrors.
    pub async fn digest_origin(
        &self,
        origin: &str,
        partition: i32,
        from: i64,
        to: i64,
        limit: std::time::Duration,
    ) -> Result<DigestAnswer, String> {
        let topic = self
            .client
            .status()
            .into_iter()
            .find(|t| t.origin == origin && t.partition == partition)
            .map(|t| t.topic)
            .ok_or_else(|| format!("this daemon does not mirror {origin}/{partition}"))?;
        self.client
            .digest_origin(origin, &topic, partition, from, to, limit)
            .await
    }

    pub fn links(&self) -> Vec<LinkView> {
        self.client
            .links()
            .into_iter()
            .map(|l| LinkView {
                state: if l.paused {
                    "paused"
                } else if l.connected {
                    "connected"
                } else {
                    "down"
                },
                region: l.region,
                rtt_ms: l.rtt_ms,
                addr: l.addr.map(|a| a.to_string()),
                connects: l.connects,
                last_error: l.last_error,
            })
            .collect()
    }

    pub fn mirror(&self) -> Vec<MirrorView> {
        let now = now_ms();
        self.client
            .status()
            .into_iter()
            .map(|t| {
                // The lag is measured against the origin's last reported end of log: only
                // while the stream is up is that current. Otherwise say "unknown", never 0.
                let streaming = t.state == MirrorTaskState::Streaming;
                MirrorView {
                    lag_seconds: t
                        .lag_ms(now)
                        .filter(|_| streaming)
                        .map(|ms| ms as f64 / 1000.0),
                    state: match &t.state {
                        MirrorTaskState::Connecting => "connecting".to_owned(),
                        MirrorTaskState::Streaming => "streaming".to_owned(),
                        MirrorTaskState::Backoff(why) => format!("backoff: {why}"),
                        MirrorTaskState::Paused => "paused".to_owned(),
                    },
                    origin: t.origin,
                    partition: t.partition,
                    mirrored_offset: t.mirrored_offset,
                    origin_high_watermark: t.origin_high_watermark,
                    lag_records: t.lag_records.filter(|_| streaming),
                    gaps: t.gaps,
                    records_mirrored: t.records_mirrored,
                    route: t.route,
                    route_switches: t.route_switches,
                    append_age: AgeView::from(&t.append_age),
                }
            })
            .collect()
    }

    /// The mirror tasks this daemon runs, as the client reports them.
    pub fn task_status(&self) -> Vec<dtfed_regions::mirror::client::MirrorTaskStatus> {
        self.client.status()
    }

    /// Every peer link, as the client reports it.
    pub fn link_status(&self) -> Vec<dtfed_regions::mirror::client::LinkStatus> {
        self.client.links()
    }

    /// The QUIC keep-alive interval of this daemon's links.
    pub fn link_keep_alive(&self) -> std::time::Duration {
        self.endpoint.tuning().keep_alive_interval
    }

    /// True when the mirror task group was joined (or there is nothing to mirror).
    pub fn joined(&self) -> bool {
        self.tasks
            .lock()
            .ok()
            .map(|t| t.as_ref().is_none_or(|t| t.status().joined))
            .unwrap_or(false)
    }

    pub fn pause_peer(&self, region: &str) -> bool {
        self.client.pause_peer(region)
    }

    pub fn resume_peer(&self, region: &str) -> bool {
        self.client.resume_peer(region)
    }

    pub async fn shutdown(&self) {
        let tasks = self.tasks.lock().ok().and_then(|mut t| t.take());
        if let Some(tasks) = tasks {
            tasks.join().await;
        }
        self.server_stop.cancel();
        let server = self.server_task.lock().ok().and_then(|mut t| t.take());
        if let Some(server) = server {
            let _ = server.await;
        }
        self.client.close("region daemon shutting down");
        self.endpoint.close();
    }
}
