//! Where a message's time went, from the daemon's own `/metrics`: the `hop_*` histograms
//! (and `publish_latency_seconds`) are read before and after the measured window, and each
//! hop's p50/p99 is computed from the difference, so warm-up and earlier runs do not count.
//!
//! Quantiles come from Prometheus buckets (linear inside a bucket, as `histogram_quantile`
//! does): read them as "within this bucket", not to the microsecond.

use std::collections::BTreeMap;

/// The histograms the bench reports, in data-flow order, with a short name for the table.
pub const HOPS: &[(&str, &str)] = &[
    ("dtfed_publish_latency_seconds", "pub → Kafka ack"),
    ("dtfed_hop_fanout_fetch_seconds", "append → fan-out has it"),
    ("dtfed_hop_bus_apply_seconds", "bus step (per batch)"),
    (
        "dtfed_hop_publish_to_gateway_seconds",
        "pub → gateway has it",
    ),
    ("dtfed_hop_session_write_seconds", "gateway → socket"),
];

/// One histogram: cumulative bucket counts by upper bound, and the total count.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hist {
    /// (le, cumulative count), ascending by `le`; `+Inf` is `f64::INFINITY`.
    pub buckets: Vec<(f64, f64)>,
    pub count: f64,
}

/// Every `<name>_bucket` and `<name>_count` series of a Prometheus text exposition, summed
/// over their other labels.
pub fn parse(text: &str) -> BTreeMap<String, Hist> {
    let mut buckets: BTreeMap<String, BTreeMap<u64, (f64, f64)>> = BTreeMap::new();
    let mut counts: BTreeMap<String, f64> = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if let Some(base) = name.strip_suffix("_bucket") {
            let Some(le) = labels.split(',').find_map(|kv| kv.strip_prefix("le=")) else {
                continue;
            };
            let le = le.trim_matches('"');
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                match le.parse::<f64>() {
                    Ok(v) => v,
                    Err(_) => continue,
                }
            };
            let e = buckets
                .entry(base.to_owned())
                .or_default()
                .entry(le.to_bits())
                .or_insert((le, 0.0));
            e.1 += value;
        } else if let Some(base) = name.strip_suffix("_count") {
            *counts.entry(base.to_owned()).or_default() += value;
        }
    }
    buckets
        .into_iter()
        .map(|(name, b)| {
            let mut buckets: Vec<(f64, f64)> = b.into_values().collect();
            buckets.sort_by(|x, y| x.0.total_cmp(&y.0));
            let count = counts.get(&name).copied().unwrap_or_default();
            (name, Hist { buckets, count })
        })
        .collect()
}

impl Hist {
    /// `self - before`, bucket by bucket (the window between two scrapes).
    pub fn minus(&self, before: Option<&Hist>) -> Hist {
        let Some(before) = before else {
            return self.clone();
        };
        let buckets = self
            .buckets
            .iter()
            .map(|&(le, n)| {
                let was = before
                    .buckets
                    .iter()
                    .find(|(l, _)| *l == le)
                    .map(|(_, c)| *c)
                    .unwrap_or(0.0);
                (le, (n - was).max(0.0))
            })
            .collect();
        Hist {
            buckets,
            count: (self.count - before.count).max(0.0),
        }
    }

    /// The `q` quantile in seconds, `None` without observations. Beyond the last finite
    /// bucket the answer is that bucket's bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last().map(|b| b.1).unwrap_or(0.0);
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut lower = 0.0;
        let mut below = 0.0;
        for &(le, n) in &self.buckets {
            if n >= rank {
                if le.is_infinite() {
                    return Some(lower);
                }
                let inside = n - below;
                let frac = if inside > 0.0 {
                    (rank - below) / inside
                } else {
                    1.0
                };
                return Some(lower + (le - lower) * frac);
            }
            lower = if le.is_finite() { le } else { lower };
            below = n;
        }
        Some(lower)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# HELP dtfed_hop_bus_apply_seconds x
dtfed_hop_bus_apply_seconds_sum{region="r"} 0.5
dtfed_hop_bus_apply_seconds_count{region="r"} 10
dtfed_hop_bus_apply_seconds_bucket{le="0.001",region="r"} 5
dtfed_hop_bus_apply_seconds_bucket{le="0.002",region="r"} 10
dtfed_hop_bus_apply_seconds_bucket{le="+Inf",region="r"} 10
"#;
    const AFTER: &str = r#"dtfed_hop_bus_apply_seconds_count{region="r"} 110
dtfed_hop_bus_apply_seconds_bucket{le="0.001",region="r"} 5
dtfed_hop_bus_apply_seconds_bucket{le="0.002",region="r"} 60
dtfed_hop_bus_apply_seconds_bucket{le="+Inf",region="r"} 110
"#;

    #[test]
    fn quantiles_of_the_window_between_two_scrapes() {
        let before = parse(BEFORE);
        let after = parse(AFTER);
        let h =
            after["dtfed_hop_bus_apply_seconds"].minus(before.get("dtfed_hop_bus_apply_seconds"));
        assert_eq!(h.count, 100.0);
        // 50 of 100 in (1 ms, 2 ms]: the median is the top of that bucket.
        let p50 = h.quantile(0.5).unwrap();
        assert!((p50 - 0.002).abs() < 1e-9, "{p50}");
        // 25th percentile: half-way through the (1, 2] bucket.
        let p25 = h.quantile(0.25).unwrap();
        assert!((p25 - 0.0015).abs() < 1e-9, "{p25}");
        // Beyond the last finite bucket: its bound.
        assert_eq!(h.quantile(0.99), Some(0.002));
        assert_eq!(Hist::default().quantile(0.5), None);
    }
}
