//! Prometheus series for the region links and mirror tasks, made at scrape time from the
//! same views `/status` shows ([`Federation::links`](super::Federation::links), [`Federation::mirror`](super::Federation::mirror)), so
//! dashboards and alerts see the mirror lag per partition without a second bookkeeping.
//!
//! Start at [`append`]: `/metrics` calls it with the daemon's own exposition. A series per
//! mirror task this daemon runs (the region's daemons share the tasks out, so each
//! (origin, partition) comes from the daemon running it): `dtfed_mirror_lag_records`,
//! `dtfed_mirror_lag_seconds`
//! (only while the task streams: an unknown lag is no sample, never 0),
//! `dtfed_mirror_streaming` (1 or 0), `dtfed_mirror_records_total`, `dtfed_mirror_gaps_total`,
//! `dtfed_mirror_relayed` (1 while pulled through a relay region) and
//! `dtfed_mirror_route_switches_total`;
//! per peer link, `dtfed_link_up` (1 connected, 0 down or paused) and `dtfed_link_rtt_seconds`.

use std::borrow::Cow;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{LinkView, MirrorView};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabel {
    origin: String,
    partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Adds the link and mirror series of `region` to `exposition` (OpenMetrics text ending in
/// `# EOF`), before its end marker.
pub fn append(exposition: &mut String, region: &str, links: &[LinkView], mirror: &[MirrorView]) {
    let mut registry = Registry::with_prefix_and_labels(
        "dtfed",
        [(Cow::Borrowed("region"), Cow::Owned(region.to_owned()))].into_iter(),
    );
    let lag_records = Family::<TaskLabel, Gauge>::default();
    let lag_seconds = Family::<TaskLabel, FloatGauge>::default();
    let streaming = Family::<TaskLabel, Gauge>::default();
    let records = Family::<TaskLabel, Counter>::default();
    let gaps = Family::<TaskLabel, Counter>::default();
    let relayed = Family::<TaskLabel, Gauge>::default();
    let switches = Family::<TaskLabel, Counter>::default();
    for t in mirror {
        let label = TaskLabel {
            origin: t.origin.clone(),
            partition: t.partition,
        };
        if let Some(l) = t.lag_records {
            lag_records.get_or_create(&label).set(l);
        }
        if let Some(s) = t.lag_seconds {
            lag_seconds.get_or_create(&label).set(s);
        }
        streaming
            .get_or_create(&label)
            .set(i64::from(t.state == "streaming"));
        records.get_or_create(&label).inc_by(t.records_mirrored);
        gaps.get_or_create(&label).inc_by(t.gaps);
        relayed
            .get_or_create(&label)
            .set(i64::from(t.route.starts_with("via ")));
        switches.get_or_create(&label).inc_by(t.route_switches);
    }
    let up = Family::<PeerLabel, Gauge>::default();
    let rtt = Family::<PeerLabel, FloatGauge>::default();
    for l in links {
        let label = PeerLabel {
            peer: l.region.clone(),
        };
        up.get_or_create(&label)
            .set(i64::from(l.state == "connected"));
        if let Some(ms) = l.rtt_ms {
            rtt.get_or_create(&label).set(ms as f64 / 1000.0);
        }
    }
    registry.register(
        "mirror_lag_records",
        "Origin records not yet mirrored, per mirror task (while streaming)",
        lag_records,
    );
    registry.register(
        "mirror_lag_seconds",
        "Age of the oldest origin record not yet mirrored, per mirror task (while streaming)",
        lag_seconds,
    );
    registry.register(
        "mirror_streaming",
        "1 while the mirror task streams from its origin",
        streaming,
    );
    registry.register(
        "mirror_records",
        "Records this daemon's mirror task appended since it started",
        records,
    );
    registry.register(
        "mirror_gaps",
        "Ranges the origin's retention deleted before they were mirrored",
        gaps,
    );
    registry.register(
        "mirror_relayed",
        "1 while the mirror task pulls through a relay region instead of its origin",
        relayed,
    );
    registry.register(
        "mirror_route_switches",
        "Route changes (direct, via a relay) of this daemon's mirror task since it started",
        switches,
    );
    registry.register(
        "link_up",
        "1 while the link to the peer region is connected",
        up,
    );
    registry.register(
        "link_rtt_seconds",
        "Round-trip time of the link to the peer region",
        rtt,
    );
    let mut extra = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut extra, &registry);
    let extra = extra.strip_suffix("# EOF\n").unwrap_or(&extra);
    match exposition.rfind("# EOF") {
        Some(at) => exposition.insert_str(at, extra),
        None => exposition.push_str(extra),
    }
}
