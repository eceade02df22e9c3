//! Divergence checks over the region link, origin side: a receiver asks for the digest of
//! a range of one partition of the local topic (`Digest` frame, see
//! [`dtfed_proto::link::MirrorDigest`]) to compare it with its own mirror of the range. The
//! digest itself is computed by whoever reads the log ([`OriginDigests`], implemented by the
//! daemon over Kafka); `answer_digest` is what a serving stream does with the request.
//! The pull side is [`crate::mirror::MirrorClient::digest_origin`].

use std::time::Duration;

use async_trait::async_trait;
use dtfed_proto::link::{LinkErrorCode, MirrorServe};
use tokio::time::timeout;
use tracing::{debug, warn};

use super::log::LogError;

/// Longest time an origin spends on one digest before it answers `unavailable`.
pub const DIGEST_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The digest of a range of the local topic: how many records, and the SHA-256 of their
/// (offset, value) pairs in offset order (docs/PROTOCOL.md, "Digests").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeDigest {
    pub count: u64,
    pub sha256: [u8; 32],
}

/// Computes digests of the origin's local topic.
#[async_trait]
pub trait OriginDigests: Send + Sync + 'static {
    /// The digest of every record of `partition` with offsets in `[from, to)`; fails with
    /// [`LogError::OffsetOutOfRange`] when offsets from `from` on are no longer all retained.
    async fn digest(&self, partition: i32, from: i64, to: i64) -> Result<RangeDigest, LogError>;
}

/// Answers a `Digest` request on `session` (bounded by [`DIGEST_ANSWER_TIMEOUT`]): the
/// digest, or an error frame saying why not (`unavailable` when this origin computes no
/// digests or its log cannot be read, `unknown_partition`, `offset_out_of_range {
/// earliest }` when retention deleted the start of the range).
pub(crate) async fn answer_digest(
    digests: Option<&dyn OriginDigests>,
    session: &mut MirrorServe,
    partition: i32,
    from: i64,
    to: i64,
) {
    let Some(digests) = digests else {
        session.close(
            LinkErrorCode::Unavailable,
            "this origin does not compute digests",
        );
        return;
    };
    match timeout(DIGEST_ANSWER_TIMEOUT, digests.digest(partition, from, to)).await {
        Ok(Ok(d)) => {
            debug!(partition, from, to, count = d.count, "digest answered");
            if let Err(e) = session.digested(d.count, d.sha256) {
                debug!(error = %e, "digest not answered");
            }
        }
        Ok(Err(e)) => {
            warn!(partition, from, to, error = %e, "cannot compute a digest");
            let code = match e {
                LogError::UnknownPartition(_) => LinkErrorCode::UnknownPartition,
                LogError::OffsetOutOfRange { earliest } => {
                    LinkErrorCode::OffsetOutOfRange { earliest }
                }
                _ => LinkErrorCode::Unavailable,
            };
            session.close(code, e.to_string());
        }
        Err(_) => {
            warn!(partition, from, to, "digest timed out");
            session.close(
                LinkErrorCode::Unavailable,
                format!("digest not computed within {DIGEST_ANSWER_TIMEOUT:?}"),
            );
        }
    }
}
