//! Comparing regions' digests of one origin's records of a room, and finding where they
//! part: [`compare_origin`] asks every region for its digest of the common range, groups the
//! regions by what they hold, takes as reference the group holding what the origin holds
//! (else the largest), and for every other region bisects with range digests
//! ([`first_difference`]) down to the first origin offset at which it differs from the
//! reference. Where the digests come from is a [`DigestSource`] (HTTP for `dtfed verify`,
//! a fake in the tests below).

use async_trait::async_trait;
use serde::Serialize;

use crate::verify::digest::RoomDigest;

/// Asks a region for its digest of the room's records from `origin` over `[from, to)`.
#[async_trait]
pub trait DigestSource: Sync {
    async fn digest(
        &self,
        region: &str,
        origin: &str,
        from: i64,
        to: i64,
    ) -> anyhow::Result<RoomDigest>;
}

/// A region whose records differ from the reference's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Divergence {
    pub region: String,
    /// The region it was compared with (one of the reference group).
    pub reference: String,
    /// The first origin offset at which the two differ (a record missing on either side, or
    /// held with another value).
    pub first_differing_offset: i64,
    /// Over the whole common range: records held here, and by the reference.
    pub count: u64,
    pub reference_count: u64,
}

/// One origin's records of the room, compared across the regions holding them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OriginVerdict {
    pub origin: String,
    pub from: i64,
    pub to: i64,
    /// Records of the room in `[from, to)` as the reference group holds them.
    pub count: u64,
    pub hash: String,
    /// The regions holding the same records as the reference (the reference included).
    pub agree: Vec<String>,
    pub differ: Vec<Divergence>,
}

/// Compares `regions`' digests of `origin`'s records over `[from, to)`.
pub async fn compare_origin(
    source: &dyn DigestSource,
    origin: &str,
    regions: &[String],
    from: i64,
    to: i64,
) -> anyhow::Result<OriginVerdict> {
    anyhow::ensure!(!regions.is_empty(), "no region holds {origin}");
    let mut digests = Vec::with_capacity(regions.len());
    for r in regions {
        digests.push((r.clone(), source.digest(r, origin, from, to).await?));
    }
    // Groups of regions holding the same records, in the order first seen.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, (_, d)) in digests.iter().enumerate() {
        match groups.iter_mut().find(|g| digests[g[0]].1.same_records(d)) {
            Some(g) => g.push(i),
            None => groups.push(vec![i]),
        }
    }
    // The origin's own log is the truth; without it, the majority.
    let reference = groups
        .iter()
        .position(|g| g.iter().any(|&i| digests[i].0 == origin))
        .unwrap_or_else(|| {
            let largest = groups.iter().map(Vec::len).max().unwrap_or(0);
            groups.iter().position(|g| g.len() == largest).unwrap_or(0)
        });
    let ref_index = groups[reference]
        .iter()
        .copied()
        .find(|&i| digests[i].0 == origin)
        .unwrap_or(groups[reference][0]);
    let (ref_region, ref_digest) = &digests[ref_index];
    let mut differ = Vec::new();
    for (g, members) in groups.iter().enumerate() {
        if g == reference {
            continue;
        }
        for &i in members {
            let (region, d) = &digests[i];
            let at = first_difference(source, ref_region, region, origin, from, to).await?;
            differ.push(Divergence {
                region: region.clone(),
                reference: ref_region.clone(),
                first_differing_offset: at,
                count: d.count,
                reference_count: ref_digest.count,
            });
        }
    }
    differ.sort_by(|a, b| a.region.cmp(&b.region));
    Ok(OriginVerdict {
        origin: origin.to_owned(),
        from,
        to,
        count: ref_digest.count,
        hash: ref_digest.hash.clone(),
        agree: groups[reference]
            .iter()
            .map(|&i| digests[i].0.clone())
            .collect(),
        differ,
    })
}

/// The first origin offset in `[from, to)` at which `region`'s records differ from
/// `reference`'s, which they do somewhere in the range: a bisection on range digests, about
/// `log2(to - from)` pairs of digests of shrinking ranges.
pub async fn first_difference(
    source: &dyn DigestSource,
    reference: &str,
    region: &str,
    origin: &str,
    from: i64,
    to: i64,
) -> anyhow::Result<i64> {
    // Invariant: [from, lo) is the same on both sides, [lo, hi) differs.
    let (mut lo, mut hi) = (from, to);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        let a = source.digest(reference, origin, lo, mid).await?;
        let b = source.digest(region, origin, lo, mid).await?;
        if a.same_records(&b) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::verify::digest::DigestBuilder;

    /// Regions' logs of one origin: origin offset → value.
    struct Logs {
        logs: BTreeMap<String, BTreeMap<i64, Vec<u8>>>,
        asked: AtomicUsize,
    }

    impl Logs {
        fn new(regions: &[(&str, BTreeMap<i64, Vec<u8>>)]) -> Logs {
            Logs {
                logs: regions
                    .iter()
                    .map(|(r, l)| ((*r).to_owned(), l.clone()))
                    .collect(),
                asked: AtomicUsize::new(0),
            }
        }
    }

    #[async_trait]
    impl DigestSource for Logs {
        async fn digest(
            &self,
            region: &str,
            origin: &str,
            from: i64,
            to: i64,
        ) -> anyhow::Result<RoomDigest> {
            self.asked.fetch_add(1, Ordering::Relaxed);
            let log = self
                .logs
                .get(region)
                .ok_or_else(|| anyhow::anyhow!("no region {region}"))?;
            let mut b = DigestBuilder::default();
            for (o, v) in log.range(from..to) {
                b.add(*o, v);
            }
            Ok(b.finish(origin, 0, from, to))
        }
    }

    /// The room's records at every 7th offset of 0..1000 (other rooms in between).
    fn log() -> BTreeMap<i64, Vec<u8>> {
        (0..1000)
            .filter(|o| o % 7 == 3)
            .map(|o| (o, format!("m{o}").into_bytes()))
            .collect()
    }

    fn regions(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[tokio::test]
    async fn identical_logs_agree_without_bisecting() {
        let logs = Logs::new(&[("seoul", log()), ("tokyo", log()), ("frankfurt", log())]);
        let v = compare_origin(
            &logs,
            "seoul",
            &regions(&["seoul", "tokyo", "frankfurt"]),
            0,
            1000,
        )
        .await
        .expect("compared");
        assert!(v.differ.is_empty());
        assert_eq!(v.agree.len(), 3);
        assert_eq!(v.count, log().len() as u64);
        assert_eq!(logs.asked.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn an_altered_value_is_found_at_its_offset() {
        let mut altered = log();
        altered.insert(507, b"forged".to_vec()); // 507 % 7 == 3: a record of the room
        let logs = Logs::new(&[("seoul", log()), ("tokyo", altered), ("frankfurt", log())]);
        let v = compare_origin(
            &logs,
            "seoul",
            &regions(&["seoul", "tokyo", "frankfurt"]),
            0,
            1000,
        )
        .await
        .expect("compared");
        assert_eq!(v.agree, regions(&["seoul", "frankfurt"]));
        assert_eq!(
            v.differ,
            vec![Divergence {
                region: "tokyo".into(),
                reference: "seoul".into(),
                first_differing_offset: 507,
                count: log().len() as u64,
                reference_count: log().len() as u64,
            }]
        );
    }

    #[tokio::test]
    async fn missing_and_extra_records_are_found_at_the_first_of_them() {
        for (first, edit) in [
            (3i64, 3i64), // the very first record missing
            (997, 997),   // the last one
            (501, 501),   // an extra record where the room has none
        ] {
            let mut other = log();
            if other.remove(&edit).is_none() {
                other.insert(edit, b"extra".to_vec());
            }
            other.remove(&(edit + 7 * 3)); // a later difference does not hide the first
            let logs = Logs::new(&[("seoul", log()), ("tokyo", other)]);
            let v = compare_origin(&logs, "seoul", &regions(&["seoul", "tokyo"]), 0, 1000)
                .await
                .expect("compared");
            assert_eq!(v.differ.len(), 1, "{edit}");
            assert_eq!(v.differ[0].first_differing_offset, first, "{edit}");
        }
    }

    #[tokio::test]
    async fn without_the_origin_the_majority_is_the_reference() {
        let mut altered = log();
        altered.insert(10, b"forged".to_vec());
        let logs = Logs::new(&[("tokyo", altered), ("frankfurt", log()), ("paris", log())]);
        let v = compare_origin(
            &logs,
            "seoul",
            &regions(&["tokyo", "frankfurt", "paris"]),
            0,
            1000,
        )
        .await
        .expect("compared");
        assert_eq!(v.agree, regions(&["frankfurt", "paris"]));
        assert_eq!(v.differ.len(), 1);
        assert_eq!(v.differ[0].region, "tokyo");
        assert_eq!(v.differ[0].first_differing_offset, 10);
    }

    #[tokio::test]
    async fn a_failing_region_is_an_error_not_a_verdict() {
        let logs = Logs::new(&[("seoul", log())]);
        let e = compare_origin(&logs, "seoul", &regions(&["seoul", "tokyo"]), 0, 1000)
            .await
            .expect_err("tokyo cannot answer");
        assert!(e.to_string().contains("tokyo"), "{e}");
    }
}
