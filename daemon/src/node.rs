//! One daemon of one region, assembled: the start order, and the shutdown order that loses
//! nothing.
//!
//! Start: bind the client and admin listeners (so a port clash fails fast), make sure the
//! local topic exists, start federation (QUIC endpoint, mirror server, mirror topics, mirror
//! task group) when configured, connect the bus, start the Kafka appender and replay reader, join the
//! fan-out group, start the room dispatcher, then serve.
//!
//! Shutdown (SIGTERM): [`Node::mark_unready`] turns `/readyz` to 503 while everything
//! still serves (the caller waits out the pre-stop window, so load balancers stop sending
//! players here first); then [`Node::shutdown`]: stop accepting connections; let every
//! session finish its in-flight publishes (acked or refused, never dropped) and close with
//! 1001; flush the producer; stop federation (mirror tasks finish the append in hand, then
//! the mirror server, then the QUIC endpoint); stop the fan-out owner, which drains,
//! commits and leaves the group so its partitions move at once; stop the dispatcher and the
//! bus; stop the admin server last, so `/readyz` reports not-ready while the daemon drains.
//!
//! The whole shutdown has one deadline (`--grace`): each step gets what is left of it, and
//! the sessions leave a reserve for the steps after them, so a hung Kafka or Redis cannot
//! stretch the stop past what systemd or Kubernetes allow before their SIGKILL.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::append::KafkaAppender;
use crate::bus::redis::RedisBus;
use crate::bus::{Bus, BusEvents};
use crate::config::Config;
use crate::fanout::FanoutOwner;
use crate::gateway::{self, Gateway};
use crate::kafka;
use crate::metrics::Metrics;
use crate::mirror::{watermarks, Federation};
use crate::replay::{MirrorReplay, MirrorRoomReader, RoomLogReader};
use crate::rooms::LocalRooms;
use crate::verify::reader::RoomDigests;

/// How a daemon is embedded (the demo runs several in one process).
#[derive(Default)]
pub struct NodeOptions {
    /// Serve the chat page at `/` of the client listener.
    pub chat_page: bool,
    /// A bus to use instead of connecting to `[redis]` (the demo's in-process bus).
    pub bus: Option<(Arc<dyn Bus>, BusEvents)>,
    /// Serve `POST /drain` (the process runs this one daemon and stops with it).
    pub drain_endpoint: bool,
}

/// A running daemon.
pub struct Node {
    pub region: String,
    pub client_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The QUIC federation listener, when federated.
    pub federation_addr: Option<SocketAddr>,
    gateway: Arc<Gateway>,
    federation: Option<Arc<Federation>>,
    appender: Arc<KafkaAppender>,
    fanout: Arc<Mutex<Option<FanoutOwner>>>,
    /// Turns `/readyz` to 503 (the pre-stop window, then the drain).
    unready: CancellationToken,
    /// Cancelled when an operator asks for a drain over the admin API.
    drain_requested: CancellationToken,
    /// Stops the gateway accepting.
    stop_accepting: CancellationToken,
    /// Stops the fan-out owner and the dispatcher.
    stop_pipeline: CancellationToken,
    /// Stops the admin server.
    stop_admin: CancellationToken,
    tasks: JoinSet<()>,
    admin_task: tokio::task::JoinHandle<()>,
}

impl Node {
    pub async fn start(cfg: Config, opts: NodeOptions) -> anyhow::Result<Node> {
        let region = cfg.region.clone();
        let node = cfg.node_name();
        let client_listener = TcpListener::bind(cfg.client.listen)
            .await
            .with_context(|| format!("binding the client listener {}", cfg.client.listen))?;
        let admin_listener = TcpListener::bind(cfg.admin.listen)
            .await
            .with_context(|| format!("binding the admin listener {}", cfg.admin.listen))?;
        let client_addr = client_listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;
        let metrics = Arc::new(Metrics::new(&region));

        let partitions =
            kafka::ensure_topic(&cfg.kafka, &cfg.kafka.local_topic, cfg.kafka.partitions)
                .await
                .context("preparing the local topic")?;
        let (bus, events): (Arc<dyn Bus>, BusEvents) = match opts.bus {
            Some(b) => b,
            None => {
                let redis = cfg.redis.as_ref().context(
                    "no [redis] section: a daemon needs Redis (only the demo runs without)",
                )?;
                let (bus, events) = RedisBus::connect(redis, &cfg.history)
                    .await
                    .with_context(|| format!("connecting to Redis at {}", redis.url_redacted()))?;
                (Arc::new(bus), events)
            }
        };
        let appender = Arc::new(
            KafkaAppender::with_node(&cfg.kafka, &region, &node)
                .context("starting the Kafka producer")?,
        );
        let replay = Arc::new(
            RoomLogReader::with_node(&cfg.kafka, &region, &node, partitions)
                .context("starting the Kafka replay reader")?,
        );

        let federation = match &cfg.federation {
            Some(fed) => Some(Arc::new(
                Federation::start(&cfg, fed, &node, partitions)
                    .await
                    .context("starting federation")?,
            )),
            None => None,
        };
        let mut fanout_topics = vec![cfg.kafka.local_topic.clone()];
        if let Some(f) = &federation {
            fanout_topics.extend(f.mirror_topics.iter().cloned());
        }
        let digests = match &federation {
            Some(f) => f.digests.clone(),
            None => Arc::new(
                RoomDigests::new(&cfg.kafka, &region, &node, partitions, Default::default())
                    .context("starting the digest reader")?,
            ),
        };
        let mirror_replay = match &federation {
            Some(f) => Some(Arc::new(MirrorReplay {
                reader: MirrorRoomReader::with_node(&cfg.kafka, &region, &node)
                    .context("starting the mirror replay reader")?,
                origins: f.origins.clone(),
            })),
            None => None,
        };

        let stop_pipeline = CancellationToken::new();
        let fanout = FanoutOwner::start(
            &cfg.kafka,
            &region,
            &node,
            fanout_topics,
            bus.clone(),
            metrics.clone(),
            stop_pipeline.child_token(),
        )
        .context("joining the fan-out group")?;
        let fanout = Arc::new(Mutex::new(Some(fanout)));

        let rooms = LocalRooms::new(bus.clone(), metrics.clone());
        let mut tasks = JoinSet::new();
        tasks.spawn(rooms.clone().dispatch(events, stop_pipeline.child_token()));
        if let (Some(f), Some(fed)) = (&federation, &cfg.federation) {
            if fed.verify_every_secs > 0 {
                tasks.spawn(crate::verify::sampler::run(
                    f.clone(),
                    Duration::from_secs(fed.verify_every_secs),
                    stop_pipeline.child_token(),
                ));
            }
        }
        let watermarks = federation
            .as_ref()
            .zip(mirror_replay.as_ref())
            .map(|(f, m)| {
                let (tx, rx) = watermarks::channel(f.origins.all());
                tasks.spawn(watermarks::run(
                    region.clone(),
                    f.clone(),
                    bus.clone(),
                    m.clone(),
                    tx,
                    stop_pipeline.child_token(),
                ));
                rx
            });

        let gateway = Gateway::new(
            region.clone(),
            cfg.client.clone(),
            rooms,
            appender.clone(),
            replay,
            mirror_replay,
            metrics.clone(),
            opts.chat_page || cfg.client.chat_page,
            cfg.kafka.publish_timeout() + Duration::from_secs(1),
            cfg.api.as_ref(),
            cfg.stomp.clone(),
            watermarks,
        );
        let stop_accepting = CancellationToken::new();
        {
            let gw = gateway.clone();
            let stop = stop_accepting.clone();
            tasks.spawn(async move {
                if let Err(e) = gateway::serve(gw, client_listener, stop).await {
                    tracing::error!(error = %e, "client listener failed");
                }
            });
        }

        let stop_admin = CancellationToken::new();
        let unready = CancellationToken::new();
        let drain_requested = CancellationToken::new();
        let state = Arc::new(AdminState {
            region: region.clone(),
            node,
            metrics,
            gateway: gateway.clone(),
            bus,
            fanout: fanout.clone(),
            draining: unready.clone(),
            federation: federation.clone(),
            admin_token: cfg.admin.token.clone(),
            drain_requested: opts.drain_endpoint.then(|| drain_requested.clone()),
            digests,
        });
        let admin_task = tokio::spawn(admin::serve(state, admin_listener, stop_admin.clone()));

        tracing::info!(%region, client = %client_addr, admin = %admin_addr, partitions, "daemon started");
        Ok(Node {
            region,
            client_addr,
            admin_addr,
            federation_addr: federation.as_ref().map(|f| f.local_addr),
            gateway,
            federation,
            appender,
            fanout,
            unready,
            drain_requested,
            stop_accepting,
            stop_pipeline,
            stop_admin,
            tasks,
            admin_task,
        })
    }

    /// Resolves when an operator asks for a drain (`POST /drain`): the caller then stops
    /// the daemon as on SIGTERM.
    pub async fn drain_requested(&self) {
        self.drain_requested.cancelled().await;
    }

    /// Turns `/readyz` to 503 while the daemon keeps serving: the start of a shutdown,
    /// before the pre-stop window. [`shutdown`](Self::shutdown) does it too.
    pub fn mark_unready(&self) {
        self.unready.cancel();
    }

    /// Drains and stops, in the order stated in the module doc, within `grace`: every step
    /// is bounded by what is left of it.
    pub async fn shutdown(mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        let left = || deadline.saturating_duration_since(Instant::now());
        tracing::info!(region = %self.region, grace_secs = grace.as_secs_f64(), "draining");
        self.unready.cancel();
        self.stop_accepting.cancel();
        // Sessions finish their in-flight publishes; what comes after them (producer
        // flush, federation, fan-out commit) keeps a reserve of the grace period.
        let reserve = (grace / 2).min(Duration::from_secs(8));
        let for_sessions = left().saturating_sub(reserve);
        if tokio::time::timeout(for_sessions, self.gateway.close_sessions())
            .await
            .is_err()
        {
            tracing::warn!(
                waited_secs = for_sessions.as_secs_f64(),
                "sessions did not close in time"
            );
        }
        let appender = self.appender.clone();
        let flush_for = left().min(Duration::from_secs(5));
        let flushed = tokio::time::timeout(
            flush_for,
            tokio::task::spawn_blocking(move || appender.flush(flush_for)),
        )
        .await;
        if !matches!(flushed, Ok(Ok(Ok(())))) {
            tracing::warn!("producer flush incomplete");
        }
        if let Some(f) = &self.federation {
            if tokio::time::timeout(left(), f.shutdown()).await.is_err() {
                tracing::warn!("federation did not stop before the deadline");
            }
        }
        let owner = self.fanout.lock().ok().and_then(|mut f| f.take());
        self.stop_pipeline.cancel();
        if let Some(owner) = owner {
            if tokio::time::timeout(left(), owner.join()).await.is_err() {
                tracing::warn!("fan-out owner did not stop before the deadline");
            }
        }
        while tokio::time::timeout(left(), self.tasks.join_next())
            .await
            .ok()
            .flatten()
            .is_some()
        {}
        self.tasks.abort_all();
        self.stop_admin.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.admin_task).await;
        tracing::info!(region = %self.region, "stopped");
    }
}
