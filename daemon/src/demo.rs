//! `dtfed demo`: regions with no outside services, in one process. librdkafka's mock cluster
//! keeps the real Kafka code path (idempotent producer, consumer group, replay); the
//! in-process bus stands in for Redis unless `--redis` is given. With more than one region
//! (the default is `seoul,tokyo,frankfurt`), the regions are federated over real QUIC links
//! on loopback with mutual TLS, from a federation CA made on the fly. Prints one line per
//! region, `region <name> ws://<addr>/ws`, and serves a chat page at `http://<addr>/`.
//! With `DTFED_API_KEY` set (16 bytes or more), the server API is on too, under that key
//! (key name `demo`, every room).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::bus::memory::MemoryBus;
use crate::bus::Bus;
use crate::config::{Config, HistoryConfig, KafkaConfig, RedisConfig};
use crate::drill::topology::{RegionEntry, Topology};
use crate::gateway::api::keys::ApiKeyConfig;
use crate::gateway::api::ApiConfig;
use crate::kafka::MockKafka;
use crate::node::{Node, NodeOptions};

/// The environment variable that turns the demo's server API on, and holds its key.
pub const DEMO_API_KEY_ENV: &str = "DTFED_API_KEY";

/// Partitions of every demo region's local topic.
const DEMO_PARTITIONS: i32 = 4;

#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Regions to run, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "seoul,tokyo,frankfurt")]
    pub regions: Vec<String>,
    /// Client port of the first region; the next regions take the ports after it (0: any).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Address to listen on (loopback by default).
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub bind: IpAddr,
    /// Use this Redis instead of the in-process bus.
    #[arg(long)]
    pub redis: Option<String>,
    /// Write the regions' URLs (and a fresh admin token, which the demo then requires) to
    /// this file, for `dtfed drill --topology`.
    #[arg(long)]
    pub write_topology: Option<std::path::PathBuf>,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs {
            regions: vec!["seoul".into(), "tokyo".into(), "frankfurt".into()],
            port: 8080,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            redis: None,
            write_topology: None,
        }
    }
}

/// Runs the demo until SIGINT or SIGTERM.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let mut running = Vec::new();
    let federation = if args.regions.len() > 1 {
        Some(DemoFederation::make(&args.regions)?)
    } else {
        None
    };
    // With a topology file the drill endpoints are on, behind a token made for this run.
    let admin_token = args
        .write_topology
        .as_ref()
        .map(|_| format!("demo-{:032x}", rand::random::<u128>()));
    let mut topology = Vec::new();
    for (i, region) in args.regions.iter().enumerate() {
        let mock =
            MockKafka::start(1).with_context(|| format!("starting the mock Kafka of {region}"))?;
        let port = if args.port == 0 {
            0
        } else {
            args.port.saturating_add(i as u16)
        };
        let cfg = demo_config(
            region,
            &mock,
            SocketAddr::new(args.bind, port),
            args.redis.as_deref(),
        );
        let mut cfg = cfg;
        if let Some(token) = &admin_token {
            cfg.admin.token = token.clone();
        }
        if let Some(f) = &federation {
            cfg.federation = Some(f.config_for(region));
        }
        cfg.api = demo_api(|k| std::env::var(k).ok());
        let errs = cfg.validate();
        anyhow::ensure!(
            errs.is_empty(),
            "demo config for {region}: {}",
            errs.join("; ")
        );
        let bus = match &args.redis {
            Some(_) => None,
            None => {
                let (bus, events) = MemoryBus::new(&cfg.history);
                Some((Arc::new(bus) as Arc<dyn Bus>, events))
            }
        };
        let cfg_api = cfg.api.clone();
        let node = Node::start(
            cfg,
            NodeOptions {
                chat_page: true,
                bus,
                drain_endpoint: false,
            },
        )
        .await
        .with_context(|| format!("starting region {region}"))?;
        println!("region {region} ws://{}/ws", node.client_addr);
        eprintln!(
            "  chat page http://{}/   admin http://{}/status",
            node.client_addr, node.admin_addr
        );
        if i == 0 && cfg_api.is_some() {
            eprintln!("{}", api_usage(node.client_addr));
        }
        topology.push(RegionEntry {
            name: region.clone(),
            ws: vec![format!("ws://{}/ws", node.client_addr)],
            admin: vec![format!("http://{}", node.admin_addr)],
            admin_token: admin_token.clone().unwrap_or_default(),
            stop: None,
            start: None,
            kill: None,
        });
        running.push((node, mock));
    }
    if let Some(path) = &args.write_topology {
        let text = Topology { regions: topology }.to_toml();
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("  topology written to {}", path.display());
    }
    let mut signals = crate::signals::StopSignals::install()?;
    let sig = signals.next().await;
    tracing::info!("{sig}: stopping the demo");
    for (node, mock) in running {
        node.shutdown(Duration::from_secs(5)).await;
        drop(mock);
    }
    if let Some(f) = federation {
        let _ = std::fs::remove_dir_all(&f.dir);
    }
    Ok(())
}

/// The demo's `[api]`: one key named `demo` for every room, when `DTFED_API_KEY` is set.
fn demo_api(env: impl Fn(&str) -> Option<String>) -> Option<ApiConfig> {
    env(DEMO_API_KEY_ENV)?;
    let mut api = ApiConfig {
        keys: vec![ApiKeyConfig {
            name: "demo".into(),
            secret_env: DEMO_API_KEY_ENV.into(),
            rooms: vec!["*".into()],
            publish_rate_per_sec: 50,
            publish_burst: 100,
            secret: String::new(),
        }],
    };
    api.resolve_secrets(env);
    Some(api)
}

/// How to call the API of the region at `addr` (printed at start).
fn api_usage(addr: SocketAddr) -> String {
    format!(
        "  server API on (key \"demo\" from ${DEMO_API_KEY_ENV}, every room):\n    \
         curl -H \"Authorization: Bearer ${DEMO_API_KEY_ENV}\" -H 'Content-Type: application/json' \\\n      \
         -d '{{\"from\":\"narrator\",\"body\":{{\"text\":\"The door creaks open.\"}}}}' \
         http://{addr}/api/v1/rooms/tavern/messages\n    \
         curl -H \"Authorization: Bearer ${DEMO_API_KEY_ENV}\" 'http://{addr}/api/v1/rooms/tavern/messages?last=20'"
    )
}

/// Certificates and QUIC ports of a demo federation, made on the fly.
struct DemoFederation {
    dir: std::path::PathBuf,
    ports: Vec<(String, u16)>,
}

impl DemoFederation {
    fn make(regions: &[String]) -> anyhow::Result<DemoFederation> {
        let dir = std::env::temp_dir().join(format!("dtfed-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        dtfed_regions::certs_init(&dir, true).context("making the demo federation CA")?;
        let mut ports = Vec::new();
        for r in regions {
            dtfed_regions::certs_issue(&dir, r, true)
                .with_context(|| format!("certificate for {r}"))?;
            // A free UDP port on loopback for the region's QUIC endpoint.
            let port = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
                .and_then(|s| s.local_addr())
                .context("picking a QUIC port")?
                .port();
            ports.push((r.clone(), port));
        }
        Ok(DemoFederation { dir, ports })
    }

    fn config_for(&self, region: &str) -> dtfed_regions::FederationConfig {
        let port = self
            .ports
            .iter()
            .find(|(r, _)| r == region)
            .map_or(0, |(_, p)| *p);
        dtfed_regions::FederationConfig {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            ca_cert: self.dir.join("ca.crt"),
            cert: self.dir.join(format!("{region}.crt")),
            key: self.dir.join(format!("{region}.key")),
            peers: self
                .ports
                .iter()
                .filter(|(r, _)| r != region)
                .map(|(r, p)| dtfed_regions::PeerRegion {
                    name: r.clone(),
                    addrs: vec![format!("127.0.0.1:{p}")],
                    partitions: Some(DEMO_PARTITIONS),
                    topic: None,
                    // Every demo region relays for the others: cut one link (`POST
                    // /peers/<r>/pause` does not; a firewall does) and the third carries it.
                    relay: true,
                    direct: true,
                })
                .collect(),
            max_links_per_peer: dtfed_regions::topology::DEFAULT_MAX_LINKS_PER_PEER,
            max_streams_per_peer: dtfed_regions::topology::DEFAULT_MAX_STREAMS_PER_PEER,
            serve_relay: true,
            relay_after_ms: dtfed_regions::topology::DEFAULT_RELAY_AFTER_MS,
            verify_every_secs: dtfed_regions::topology::DEFAULT_VERIFY_EVERY_SECS,
        }
    }
}

fn demo_config(region: &str, mock: &MockKafka, listen: SocketAddr, redis: Option<&str>) -> Config {
    Config {
        region: region.to_owned(),
        node: Some(format!("{region}-demo")),
        client: crate::config::ClientConfig {
            listen,
            ..Default::default()
        },
        admin: crate::config::AdminConfig {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            token: String::new(),
        },
        kafka: KafkaConfig {
            brokers: mock.bootstrap(),
            partitions: DEMO_PARTITIONS,
            session_timeout_ms: 6_000,
            ..Default::default()
        },
        redis: redis.map(|url| RedisConfig {
            url: url.to_owned(),
            key_prefix: format!("dtfed-demo-{region}"),
        }),
        history: HistoryConfig::default(),
        federation: None,
        api: None,
        stomp: Default::default(),
    }
}
