//! Prometheus metrics, as typed fields: every event the daemon counts has one place here.
//!
//! # Where a message's time goes (the `hop_*` histograms)
//!
//! One message, in one region, and the histogram that times each step of it:
//!
//! | step | histogram | clock |
//! | --- | --- | --- |
//! | `pub` frame read → Kafka acknowledged it → `ack` queued | `publish_latency_seconds` | monotonic, µs |
//! | produced (Kafka record timestamp) → the fan-out owner holds it | `hop_fanout_fetch_seconds` | wall, ms: only meaningful from ~2 ms up |
//! | the fan-out owner's bus step (one Redis round trip per batch) | `hop_bus_apply_seconds` | monotonic, µs |
//! | published by the player (`ts`) → the gateway's dispatcher has it from the bus | `hop_publish_to_gateway_seconds` | wall, ms |
//! | the dispatcher queued it for a session → the session fed it to the socket (flushed in the same turn) | `hop_session_write_seconds` | monotonic, µs |
//!
//! `dtfed-bench --metrics <admin>/metrics` reads them before and after its measured window
//! and prints each step's p50/p99 beside its own end-to-end figures.

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
    /// Connections closed by the server, by reason (`slow_reader`, `flood`, `too_large`,
    /// `bad_utf8`, `protocol_error`, `idle`, `token_expired`, ...).
    pub closes: Family<ReasonLabel, Counter>,
    /// Records the fan-out owners wrote to the bus.
    pub fanout_applied: Counter,
    /// Records the fan-out owners stepped over unapplied, by reason (`not_a_message`,
    /// `origin_mismatch`, `quarantined`).
    pub fanout_skipped: Family<ReasonLabel, Counter>,
    /// Records behind the partition's high watermark, per owned partition.
    pub fanout_lag: Family<PartitionLabel, Gauge>,
    /// Times the bus subscriber reconnected and gateways backfilled.
    pub bus_resyncs: Counter,
    /// Messages a gateway recovered from the hot history after a `prev` mismatch.
    pub backfilled: Counter,
    /// Rooms with at least one local subscriber.
    pub rooms_subscribed: Gauge,
    /// Per-hop latency of the in-region path; see the module docs.
    pub hop_fanout_fetch: Histogram,
    pub hop_bus_apply: Histogram,
    pub hop_publish_to_gateway: Histogram,
    pub hop_session_write: Histogram,
}

/// Buckets of the latency histograms, seconds: fine below 25 ms, where the targets are.
fn latency_buckets() -> Histogram {
    Histogram::new([
        0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25,
        0.5, 1.0, 2.5, 5.0, 10.0,
    ])
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
            publish_latency: latency_buckets(),
            errors: Family::default(),
            closes: Family::default(),
            fanout_applied: Counter::default(),
            fanout_skipped: Family::default(),
            fanout_lag: Family::default(),
            bus_resyncs: Counter::default(),
            backfilled: Counter::default(),
            rooms_subscribed: Gauge::default(),
            hop_fanout_fetch: latency_buckets(),
            hop_bus_apply: latency_buckets(),
            hop_publish_to_gateway: latency_buckets(),
            hop_session_write: latency_buckets(),
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
            "fanout_skipped",
            "Records fan-out owners stepped over unapplied, by reason",
            m.fanout_skipped.clone(),
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
        root.register(
            "hop_fanout_fetch_seconds",
            "Kafka record timestamp to the fan-out owner holding the record (ms clock)",
            m.hop_fanout_fetch.clone(),
        );
        root.register(
            "hop_bus_apply_seconds",
            "Duration of the fan-out owner's bus step for a batch, per record",
            m.hop_bus_apply.clone(),
        );
        root.register(
            "hop_publish_to_gateway_seconds",
            "Message ts to the gateway's dispatcher receiving it from the bus (ms clock)",
            m.hop_publish_to_gateway.clone(),
        );
        root.register(
            "hop_session_write_seconds",
            "Dispatcher queueing a live message to the session writing it to the socket",
            m.hop_session_write.clone(),
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
