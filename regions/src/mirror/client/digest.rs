//! [`MirrorClient::digest_origin`]: asks an origin, on the live link to it, for the digest of
//! a range of one partition of its local topic ([`MirrorDigest`], a stream of its own), so
//! that the receiving region can compare it with its mirror of the range. The link is not
//! dialled for it: a check waits for the mirror to have a link.

use std::time::Duration;

use dtfed_proto::link::{encode, DigestAnswer, FrameDecoder, MirrorDigest};
use tokio::time::timeout;

use super::MirrorClient;
use crate::endpoint::PeerConnection;
use crate::mirror::MirrorError;

/// Largest answer read: a `Hello`, heartbeats and a `Digested` or `Error` frame are small.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

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
        timeout(limit, exchange(&conn, ask))
            .await
            .map_err(|_| format!("no answer from {origin} within {limit:?}"))?
    }
}

/// Sends the request on a new stream and reads frames until the answer.
async fn exchange(conn: &PeerConnection, mut ask: MirrorDigest) -> Result<DigestAnswer, String> {
    let (mut send, mut recv) = conn
        .connection()
        .open_bi()
        .await
        .map_err(|e| format!("cannot open a stream: {e}"))?;
    let mut out = Vec::new();
    for frame in ask.request() {
        encode(&frame, &mut out)
            .map_err(|e| format!("cannot encode a {} frame: {e}", frame.kind()))?;
    }
    send.write_all(&out)
        .await
        .map_err(|e| format!("stream write failed: {e}"))?;
    let _ = send.finish();
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 4096];
    let mut read = 0usize;
    loop {
        let n = recv
            .read(&mut buf)
            .await
            .map_err(|e| format!("stream failed: {e}"))?
            .ok_or_else(|| "the origin ended the stream without an answer".to_owned())?;
        read = read.saturating_add(n);
        if read > MAX_ANSWER_BYTES {
            return Err(format!(
                "the origin sent more than {MAX_ANSWER_BYTES} bytes without an answer"
            ));
        }
        decoder.extend(buf.get(..n).unwrap_or_default());
        while let Some(frame) = decoder
            .next_frame()
            .map_err(|e| format!("undecodable input from the origin: {e}"))?
        {
            let kind = frame.kind();
            if let Some(answer) = ask
                .handle_frame(frame)
                .map_err(|e| format!("origin broke the protocol ({kind}): {e}"))?
            {
                return Ok(answer);
            }
        }
    }
}
