//! [`ask_on_stream`]: drives a [`StreamQuestion`] (`Describe`, `Digest`) over a QUIC stream
//! of its own on a peer connection — request out, the origin's frames in until the answer —
//! with the answer's size bounded.

use dtfed_proto::link::{encode, FrameDecoder, StreamQuestion};

use crate::endpoint::PeerConnection;

/// Largest answer read: a `Hello`, heartbeats and the answer or an `Error` are small.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Sends `question` on a new stream of `conn` and reads frames until its answer. The
/// caller bounds the time.
pub(super) async fn ask_on_stream<Q: StreamQuestion>(
    conn: &PeerConnection,
    mut question: Q,
) -> Result<Q::Answer, String> {
    let (mut send, mut recv) = conn
        .connection()
        .open_bi()
        .await
        .map_err(|e| format!("cannot open a stream: {e}"))?;
    let mut out = Vec::new();
    for frame in question.request() {
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
            if let Some(answer) = question
                .handle_frame(frame)
                .map_err(|e| format!("origin broke the protocol ({kind}): {e}"))?
            {
                return Ok(answer);
            }
        }
    }
}
