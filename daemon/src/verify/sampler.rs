//! The background divergence check: every `federation.verify_every_secs`, each daemon takes
//! the next few of the mirror partitions it writes (round robin, so each is checked in
//! turn), and compares its digest of the most recent [`RECENT_OFFSETS`] origin offsets
//! it holds with the origin's own digest of that range, asked over the region link
//! ([`crate::mirror::Federation::digest_origin`]). On a mismatch it bisects, over the link
//! too, to the first differing origin offset and logs it; every check is counted in
//! `dtfed_mirror_digest_checks_total{origin, result}` (`match`, `mismatch`, `unsupported`
//! for an origin too old to answer, `error` when a digest could not be had).
//!
//! Partition digests (every record, every room) over a range of origin offsets; the
//! room-level comparison across all regions is `dtfed verify`.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dtfed_proto::link::{DigestAnswer, LinkErrorCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::mirror::{lock, Federation};
use crate::verify::compare::{first_difference, DigestSource};
use crate::verify::digest::{hex, RoomDigest};

/// Mirror partitions checked per round.
pub const CHECKED_PER_ROUND: usize = 4;
/// How many of the most recent origin offsets a check covers.
pub const RECENT_OFFSETS: i64 = 1000;
/// Bound on one digest asked over the link.
pub const LINK_DIGEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabel {
    origin: String,
    result: String,
}

/// What one check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckResult {
    Match,
    Mismatch,
    /// The origin does not know the `Digest` frame (an older dtfed).
    Unsupported,
    /// A digest could not be computed here or asked of the origin.
    Error,
}

impl CheckResult {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckResult::Match => "match",
            CheckResult::Mismatch => "mismatch",
            CheckResult::Unsupported => "unsupported",
            CheckResult::Error => "error",
        }
    }
}

/// The counts of checks, per origin and result, and the round-robin position.
#[derive(Default)]
pub struct DigestChecks {
    counts: Family<CheckLabel, Counter>,
    next: Mutex<usize>,
}

impl DigestChecks {
    fn count(&self, origin: &str, result: CheckResult) {
        self.counts
            .get_or_create(&CheckLabel {
                origin: origin.to_owned(),
                result: result.as_str().to_owned(),
            })
            .inc();
    }

    /// Adds `dtfed_mirror_digest_checks_total` of `region` to `exposition` (OpenMetrics
    /// text ending in `# EOF`), before its end marker.
    pub fn append(&self, exposition: &mut String, region: &str) {
        let mut registry = Registry::with_prefix_and_labels(
            "dtfed",
            [(Cow::Borrowed("region"), Cow::Owned(region.to_owned()))].into_iter(),
        );
        registry.register(
            "mirror_digest_checks",
            "Background divergence checks of mirror partitions against their origin, by result",
            self.counts.clone(),
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
}

/// Runs a round every `every` until `stop`.
pub async fn run(fed: Arc<Federation>, every: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => round(&fed, &stop).await,
        }
    }
}

/// Checks the next [`CHECKED_PER_ROUND`] mirror partitions this daemon writes.
async fn round(fed: &Federation, stop: &CancellationToken) {
    let tasks: Vec<(String, i32)> = fed
        .mirror()
        .into_iter()
        .map(|t| (t.origin, t.partition))
        .collect();
    if tasks.is_empty() {
        return;
    }
    let turn = next_turn(&mut lock(&fed.digest_checks.next), tasks.len());
    for i in turn {
        if stop.is_cancelled() {
            return;
        }
        let Some((origin, partition)) = tasks.get(i) else {
            continue;
        };
        if let Some(result) = check(fed, origin, *partition).await {
            fed.digest_checks.count(origin, result);
        }
    }
}

/// The indexes, among `n` tasks, of the next [`CHECKED_PER_ROUND`] to check, from the
/// round-robin position `next` (advanced): every task in turn, whatever `n` becomes.
fn next_turn(next: &mut usize, n: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let start = *next % n;
    let count = CHECKED_PER_ROUND.min(n);
    *next = start + count;
    (0..count).map(|i| (start + i) % n).collect()
}

/// Compares this region's mirror of `origin`'s `partition` with the origin, over the most
/// recent origin offsets mirrored; `None` when nothing is mirrored yet.
pub async fn check(fed: &Federation, origin: &str, partition: i32) -> Option<CheckResult> {
    let (earliest, end) = match fed.digests.held_range(origin, partition).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(origin, partition, error = %e, "digest check: cannot read the mirror partition");
            return Some(CheckResult::Error);
        }
    };
    if end <= earliest {
        return None;
    }
    let mut from = earliest.max(end.saturating_sub(RECENT_OFFSETS));
    let pair = LinkPair {
        fed,
        origin,
        partition,
    };
    let mut answer = pair.ask(from, end).await;
    if let Ok(DigestAnswer::Refused {
        code: LinkErrorCode::OffsetOutOfRange { earliest },
        ..
    }) = answer
    {
        // The origin's retention deleted the start of the range: what is left of it.
        if earliest >= end || earliest <= from {
            tracing::debug!(
                origin,
                partition,
                from,
                to = end,
                earliest,
                "digest check: the origin no longer holds the range"
            );
            return None;
        }
        from = earliest;
        answer = pair.ask(from, end).await;
    }
    let here = fed.digests.region().to_owned();
    let ours = match pair.digest(&here, origin, from, end).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(origin, partition, error = %e, "digest check: cannot digest the mirror partition");
            return Some(CheckResult::Error);
        }
    };
    let theirs = match answer {
        Ok(DigestAnswer::Digested { count, sha256 }) => {
            digest_of(origin, partition, from, end, count, &sha256)
        }
        Ok(DigestAnswer::NotSupported) => {
            tracing::debug!(
                origin,
                partition,
                "digest check: the origin does not answer digests (older dtfed)"
            );
            return Some(CheckResult::Unsupported);
        }
        Ok(DigestAnswer::Refused { code, message }) => {
            tracing::info!(origin, partition, %code, message, "digest check: the origin refused");
            return Some(CheckResult::Error);
        }
        Err(e) => {
            tracing::info!(origin, partition, error = %e, "digest check: no digest from the origin");
            return Some(CheckResult::Error);
        }
    };
    if ours.same_records(&theirs) {
        tracing::debug!(
            origin,
            partition,
            from,
            to = end,
            count = ours.count,
            "digest check: mirror matches the origin"
        );
        return Some(CheckResult::Match);
    }
    match first_difference(&pair, origin, &here, origin, from, end).await {
        Ok(at) => tracing::error!(
            origin,
            partition,
            from,
            to = end,
            count = ours.count,
            origin_count = theirs.count,
            first_differing_offset = at,
            "digest check: this region's mirror differs from the origin"
        ),
        Err(e) => tracing::error!(
            origin,
            partition,
            from,
            to = end,
            count = ours.count,
            origin_count = theirs.count,
            error = %e,
            "digest check: this region's mirror differs from the origin (first differing offset not found)"
        ),
    }
    Some(CheckResult::Mismatch)
}

fn digest_of(
    origin: &str,
    partition: i32,
    from: i64,
    to: i64,
    count: u64,
    sha256: &[u8],
) -> RoomDigest {
    RoomDigest {
        origin: origin.to_owned(),
        partition,
        from,
        to,
        count,
        hash: hex(sha256),
        first: None,
        last: None,
    }
}

/// One mirror partition here and its origin, as a [`DigestSource`] for the bisection:
/// "region" this region reads its mirror, any other the origin over the link.
struct LinkPair<'a> {
    fed: &'a Federation,
    origin: &'a str,
    partition: i32,
}

impl LinkPair<'_> {
    async fn ask(&self, from: i64, to: i64) -> Result<DigestAnswer, String> {
        self.fed
            .digest_origin(self.origin, self.partition, from, to, LINK_DIGEST_TIMEOUT)
            .await
    }
}

#[async_trait]
impl DigestSource for LinkPair<'_> {
    async fn digest(
        &self,
        region: &str,
        origin: &str,
        from: i64,
        to: i64,
    ) -> anyhow::Result<RoomDigest> {
        if region == self.fed.digests.region() {
            return Ok(self
                .fed
                .digests
                .partition_digest(origin, self.partition, None, from, to)
                .await?);
        }
        match self.ask(from, to).await.map_err(anyhow::Error::msg)? {
            DigestAnswer::Digested { count, sha256 } => {
                Ok(digest_of(origin, self.partition, from, to, count, &sha256))
            }
            other => anyhow::bail!("the origin gave no digest: {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_is_checked_in_turn() {
        for n in [1usize, 3, 4, 8, 10] {
            let mut next = 0;
            let rounds = n.div_ceil(CHECKED_PER_ROUND);
            let mut seen: Vec<usize> = (0..rounds).flat_map(|_| next_turn(&mut next, n)).collect();
            assert!(seen.len() >= n, "{n}: {seen:?}");
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "{n}");
        }
        // Fewer tasks than before (a rebalance): the position wraps, nothing panics.
        let mut next = 7;
        assert_eq!(next_turn(&mut next, 2), vec![1, 0]);
        assert_eq!(next_turn(&mut next, 0), Vec::<usize>::new());
    }
}
