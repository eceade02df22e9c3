//! `dtfed demo`: regions with no outside services, in one process. librdkafka's mock cluster
//! keeps the real Kafka code path (idempotent producer, consumer group, replay); the
//! in-process bus stands in for Redis unless `--redis` is given. Prints one line per region,
//! `region <name> ws://<addr>/ws`, and serves a chat page at `http://<addr>/`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::bus::memory::MemoryBus;
use crate::bus::Bus;
use crate::config::{Config, HistoryConfig, KafkaConfig, RedisConfig};
use crate::kafka::MockKafka;
use crate::node::{Node, NodeOptions};

/// The chat page served at `/` in the demo.
pub const CHAT_PAGE: &str = include_str!("demo/chat.html");

#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Regions to run, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "seoul")]
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
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs {
            regions: vec!["seoul".into()],
            port: 8080,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            redis: None,
        }
    }
}

/// Runs the demo until SIGINT or SIGTERM.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let mut running = Vec::new();
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
        let node = Node::start(
            cfg,
            NodeOptions {
                chat_page: true,
                bus,
            },
        )
        .await
        .with_context(|| format!("starting region {region}"))?;
        println!("region {region} ws://{}/ws", node.client_addr);
        eprintln!(
            "  chat page http://{}/   admin http://{}/status",
            node.client_addr, node.admin_addr
        );
        running.push((node, mock));
    }
    crate::signals::terminated().await?;
    for (node, mock) in running {
        node.shutdown(Duration::from_secs(5)).await;
        drop(mock);
    }
    Ok(())
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
            partitions: 4,
            session_timeout_ms: 6_000,
            ..Default::default()
        },
        redis: redis.map(|url| RedisConfig {
            url: url.to_owned(),
            key_prefix: format!("dtfed-demo-{region}"),
        }),
        history: HistoryConfig::default(),
        federation: None,
    }
}
