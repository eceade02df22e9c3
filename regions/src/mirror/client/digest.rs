//! [`MirrorClient::digest_origin`]: asks an origin, on the live link to it, for the digest of
//! a range of one partition of its local topic ([`MirrorDigest`], a stream of its own), so
//! that the receiving region can compare it with its mirror of the range. The link is not
//! dialled for it: a check waits for the mirror to have a link.

use std::time::Duration;

use dtfed_proto::link::{DigestAnswer, MirrorDigest};
use tokio::time::timeout;

use super::ask::ask_on_stream;
use super::MirrorClient;
use crate::mirror::MirrorError;

impl MirrorClient {
    /// The origin's digest of `topic`/`partition` over offsets `[from, to)`, asked on the
    /// link to `origin` within `limit`. `Err` when there is no live link, the exchange
    /// failed, or the origin broke the protocol; an origin too old to answer gives
    /// [`DigestAnswer::NotSupported`].
    pub async fn digest_origin(
        &self,
        origin: &str,
        topic: &str,
        partition: i32,
        from: i64,
        to: i64,
        limit: Duration,
    ) -> Result<DigestAnswer, String> {
        let peer = self
            .inner
            .peers
            .get(origin)
            .ok_or_else(|| MirrorError::UnknownPeer(origin.to_owned()).to_string())?;
        if *peer.paused.borrow() {
            return Err(format!("the link to {origin} is paused"));
        }
        let conn = peer
            .live()
            .ok_or_else(|| format!("no live link to {origin}"))?;
        let ask = MirrorDigest::new(
            self.inner.endpoint.region(),
            origin,
            topic,
            partition,
            from,
            to,
        );
        timeout(limit, ask_on_stream(&conn, ask))
            .await
            .map_err(|_| format!("no answer from {origin} within {limit:?}"))?
    }
}
