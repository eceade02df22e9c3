//! Prometheus metrics, as typed fields: every event the daemon counts has one place here.

use dtfed_proto::ErrorCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    pub topic: String,
    pub partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Every metric of one daemon.
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections: Gauge,
    /// Client frames received / server frames sent.
    pub frames_in: Counter,
    pub frames_out: Counter,
    /// Time from a `pub` frame to its `ack` (Kafka acknowledgement included), seconds.
    pub publish_latency: Histogram,
    /// Error frames sent, by code.
    pub errors: Family<CodeLabel, Counter>,
    /// Connections closed by the server, by reason (`slow_reader`, `flood`, `too_large`, ...).
    pub closes: Family<ReasonLabel, Counter>,
    /// Records the fan-out owners wrote to the bus.
    pub fanout_applied: Counter,
    /// Records behind the partition's high watermark, per owned partition.
    pub fanout_lag: Family<PartitionLabel, Gauge>,
    /// Times the bus subscriber reconnected and gateways backfilled.
    pub bus_resyncs: Counter,
    /// Messages a gateway recovered from the hot history after a `prev` mismatch.
    pub backfilled: Counter,
    /// Rooms with at least one local subscriber.
    pub rooms_subscribed: Gauge,
}

impl Metrics {
    pub fn new(region: &str) -> Metrics {
        let mut root = Registry::with_prefix_and_labels(
            "dtfed",
            [(
                std::borrow::Cow::Borrowed("region"),
                std::borrow::Cow::Owned(region.to_owned()),
            )]
            .into_iter(),
        );
        let m = Metrics {
            connections: Gauge::default(),
            frames_in: Counter::default(),
            frames_out: Counter::default(),
            publish_latency: Histogram::new([
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            errors: Family::default(),
            closes: Family::default(),
            fanout_applied: Counter::default(),
            fanout_lag: Family::default(),
            bus_resyncs: Counter::default(),
            backfilled: Counter::default(),
            rooms_subscribed: Gauge::default(),
            registry: Registry::default(),
        };
        root.register(
            "connections",
            "Open WebSocket connections",
            m.connections.clone(),
        );
        root.register("frames_in", "Client frames received", m.frames_in.clone());
        root.register("frames_out", "Server frames sent", m.frames_out.clone());
        root.register(
            "publish_latency_seconds",
            "Time from a pub frame to its ack, Kafka acknowledgement included",
            m.publish_latency.clone(),
        );
        root.register(
            "errors",
            "Error frames sent to clients, by code",
            m.errors.clone(),
        );
        root.register(
            "closes",
            "Connections closed by the server, by reason",
            m.closes.clone(),
        );
        root.register(
            "fanout_applied",
            "Records written to the bus by fan-out owners",
            m.fanout_applied.clone(),
        );
        root.register(
            "fanout_lag_records",
            "Records behind the high watermark per owned partition",
            m.fanout_lag.clone(),
        );
        root.register(
            "bus_resyncs",
            "Bus subscriber reconnects",
            m.bus_resyncs.clone(),
        );
        root.register(
            "backfilled",
            "Messages recovered from hot history after a prev mismatch",
            m.backfilled.clone(),
        );
        root.register(
            "rooms_subscribed",
            "Rooms with at least one local subscriber",
            m.rooms_subscribed.clone(),
        );
        Metrics {
            registry: root,
            ..m
        }
    }

    pub fn error(&self, code: ErrorCode) {
        self.errors
            .get_or_create(&CodeLabel {
                code: code.as_str(),
            })
            .inc();
    }

    pub fn closed(&self, reason: &'static str) {
        self.closes.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
