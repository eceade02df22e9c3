//! [`AgeHistogram`]: how old records are when a hop of the mirror flow is done with them,
//! measured against the origin's record timestamp (its append time). The receiving side
//! records, per origin, the age of every record when its mirror append was acknowledged
//! (origin append → origin Kafka → origin reader → link → mirror append, acks=all); the
//! daemon shows it in `/status`, so a benchmark can tell the link's share of the remote
//! delivery latency from the fan-out's. Both clocks must agree (NTP, or one host in tests);
//! a negative age (clock skew) counts as 0.

/// Upper bounds of the buckets, in milliseconds; one more bucket holds everything above.
pub const AGE_BUCKETS_MS: [u64; 18] = [
    1, 2, 5, 10, 15, 20, 25, 35, 50, 75, 100, 150, 250, 500, 1_000, 2_500, 10_000, 60_000,
];

/// A cumulative histogram of record ages (fixed buckets, [`AGE_BUCKETS_MS`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgeHistogram {
    /// `counts[i]`: ages in `(AGE_BUCKETS_MS[i-1], AGE_BUCKETS_MS[i]]`; the last entry
    /// counts everything above the last bound.
    pub counts: [u64; AGE_BUCKETS_MS.len() + 1],
    /// Records counted.
    pub count: u64,
    /// Sum of the ages, in milliseconds.
    pub sum_ms: u64,
    /// The largest age seen, in milliseconds.
    pub max_ms: u64,
}

impl AgeHistogram {
    /// Counts one record of age `age_ms` (negative: 0).
    pub fn record(&mut self, age_ms: i64) {
        let age = u64::try_from(age_ms).unwrap_or(0);
        let i = AGE_BUCKETS_MS.partition_point(|&b| b < age);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.count += 1;
        self.sum_ms = self.sum_ms.saturating_add(age);
        self.max_ms = self.max_ms.max(age);
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1), in milliseconds: an
    /// upper estimate. `None` when empty; [`AgeHistogram::max_ms`] for the last bucket.
    pub fn quantile_ms(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(
                    AGE_BUCKETS_MS
                        .get(i)
                        .copied()
                        .unwrap_or(self.max_ms)
                        .min(self.max_ms),
                );
            }
        }
        Some(self.max_ms)
    }

    /// Adds `other` into this one.
    pub fn merge(&mut self, other: &AgeHistogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.sum_ms = self.sum_ms.saturating_add(other.sum_ms);
        self.max_ms = self.max_ms.max(other.max_ms);
    }

    /// What was counted since `earlier` (a snapshot of this histogram), for rates over a
    /// window. `max_ms` stays the all-time maximum.
    pub fn since(&self, earlier: &AgeHistogram) -> AgeHistogram {
        let mut counts = self.counts;
        for (a, b) in counts.iter_mut().zip(earlier.counts.iter()) {
            *a = a.saturating_sub(*b);
        }
        AgeHistogram {
            counts,
            count: self.count.saturating_sub(earlier.count),
            sum_ms: self.sum_ms.saturating_sub(earlier.sum_ms),
            max_ms: self.max_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_quantiles() {
        let mut h = AgeHistogram::default();
        assert_eq!(h.quantile_ms(0.5), None);
        for age in 1..=100 {
            h.record(age);
        }
        h.record(-5); // clock skew: 0
        assert_eq!(h.count, 101);
        assert_eq!(h.max_ms, 100);
        assert_eq!(h.quantile_ms(0.5), Some(50));
        assert_eq!(h.quantile_ms(0.99), Some(100));
        assert_eq!(h.quantile_ms(0.0), Some(1));
        h.record(100_000);
        assert_eq!(h.quantile_ms(1.0), Some(100_000));
        let snapshot = h.clone();
        h.record(7);
        let window = h.since(&snapshot);
        assert_eq!(window.count, 1);
        assert_eq!(window.quantile_ms(0.5), Some(10));
        let mut m = AgeHistogram::default();
        m.merge(&h);
        assert_eq!(m, h);
    }
}
