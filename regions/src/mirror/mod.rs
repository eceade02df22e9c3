//! Mirroring between regions over the QUIC links of [`crate::endpoint`], with the sans-IO
//! link sessions of [`dtfed_proto::link`] (see `docs/ARCHITECTURE.md`, "Federation: the mirror flow").
//!
//! - [`server::MirrorServer`] runs in the origin region: it accepts links from peer
//!   regions and serves each bidirectional stream (one per mirrored partition) with a
//!   [`MirrorServe`](dtfed_proto::link::MirrorServe) session, reading the local topic through
//!   an [`OriginLog`]. Stateless: any daemon of the origin serves any partition.
//! - [`client::MirrorClient`] runs in the receiving region: one shared connection per peer
//!   region; [`MirrorClient::run_partition`] mirrors one origin partition into the mirror
//!   topic through a [`MirrorLog`], resuming from the mirror partition's tail after any
//!   failure (nothing lost, nothing written twice).
//! - [`stream`]: the one driver both sides run their session on (read, decode, events,
//!   write with backpressure, timers).
//! - [`digest`]: divergence checks over the link (origin side; the pull side is
//!   [`MirrorClient::digest_origin`]).
//! - [`log`]: the two Kafka-facing traits (the tests' in-memory implementations are in
//!   `regions/tests/common/memory_log.rs`).
//!
//! Flow control end to end: the client appends what it has received (up to 1 MiB at a
//! time) before reading the stream further, so a slow mirror topic stops the client's
//! reads; QUIC stream flow control then stops the server's writes; the server's log reader
//! is at most two batches ahead of the write. Memory per stream is a few batches (256 KiB
//! each by default) plus 1 MiB on the receiving side, and the QUIC windows of
//! [`crate::LinkTuning`].

use std::time::Duration;

use quinn::VarInt;
use rand::Rng;

pub mod client;
pub mod digest;
pub mod latency;
pub mod log;
pub mod server;
pub mod stream;

pub use client::{
    LinkStatus, MirrorClient, MirrorClientConfig, MirrorError, MirrorTaskState, MirrorTaskStatus,
    ROUTE_DIRECT,
};
pub use digest::{OriginDigests, RangeDigest};
pub use latency::{AgeHistogram, AGE_BUCKETS_MS};
pub use log::{LogError, MirrorLog, OriginBatch, OriginLog, OriginReader};
pub use server::{
    MirrorServer, MirrorServerConfig, PeerUsage, ServedStream, ServerStatus, CLOSE_TOO_MANY_LINKS,
};

/// Mirror topics are named `<prefix><origin region>`.
pub const MIRROR_TOPIC_PREFIX: &str = "dtfed.mirror.";

/// The mirror topic of `origin`: `dtfed.mirror.<origin>` (what a relay serves of it).
pub fn mirror_topic(origin: &str) -> String {
    format!("{MIRROR_TOPIC_PREFIX}{origin}")
}

/// Stream reset / stop code: the stream was abandoned mid-frame (shutdown, stalled peer,
/// undecodable input); the peer must not expect a closing `Error` frame.
pub const STREAM_ABANDONED: VarInt = VarInt::from_u32(1);

/// Jittered exponential backoff: each delay is drawn from `[d/2, d]`, where `d` doubles
/// from `min` up to `max` ("equal jitter": never hammering, never synchronised).
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        let min = min.max(Duration::from_millis(1));
        let max = max.max(min);
        Backoff {
            min,
            max,
            current: min,
        }
    }

    /// The next delay; doubles the base for the one after.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        jitter(base)
    }

    /// A delay at the maximum (for failures that retrying soon will not fix).
    pub(crate) fn max_delay(&mut self) -> Duration {
        self.current = self.max;
        jitter(self.max)
    }

    /// Back to `min` after a success.
    pub(crate) fn reset(&mut self) {
        self.current = self.min;
    }
}

fn jitter(base: Duration) -> Duration {
    let nanos = u64::try_from(base.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::rng().random_range(nanos / 2..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut bases = Vec::new();
        for _ in 0..10 {
            let d = b.next_delay();
            bases.push(d);
        }
        assert!(bases[0] >= Duration::from_millis(50) && bases[0] <= Duration::from_millis(100));
        assert!(bases[1] >= Duration::from_millis(100) && bases[1] <= Duration::from_millis(200));
        assert!(bases[9] >= Duration::from_millis(2500) && bases[9] <= Duration::from_secs(5));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
        assert!(b.max_delay() >= Duration::from_millis(2500));
    }
}
