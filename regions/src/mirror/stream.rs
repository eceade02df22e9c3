//! One driver for a link session over a QUIC stream, for both sides of mirroring: the
//! origin's [`MirrorServe`] (in [`server`](super::server)) and the receiver's
//! [`MirrorPull`] (in [`client`](super::client)). The sessions are sans-IO state machines
//! (`dtfed_proto::link::session`); [`StreamDriver`] is the IO around them, and a
//! [`StreamSide`] is what one side adds: what to do with the session's events, and the
//! wake-ups of its own (a batch read from the origin log, an operator's pause).
//!
//! # The driving loop ([`StreamDriver::run`])
//!
//! 1. [`handle_events`](StreamSide::handle_events): the side acts on the session's events,
//!    in order (the receiver appends records here, the origin starts its log reader).
//! 2. [`flush`](StreamDriver::flush): every frame the session has to send is encoded and
//!    written. Awaiting the write *is* the backpressure: when the peer's QUIC window is full
//!    the write waits, and nothing else of this stream moves meanwhile (the origin reads no
//!    further batches, the receiver acknowledges nothing more). A write that makes no
//!    progress at all for [`write_limit`](StreamSide::write_limit) abandons the stream
//!    (both halves reset).
//! 3. Once the session is closed, or the side named how the stream ends, the send half is
//!    finished and the side says what that means ([`finished`](StreamSide::finished)).
//! 4. Otherwise wait for, in this order: the side's stop signal (shutdown, pause), the
//!    peer's bytes ([`on_bytes`](StreamDriver::on_bytes), which feeds every whole frame to
//!    the session), the session's timer (heartbeats, the dead-peer check), the side's other
//!    wake-ups. Reading comes before the timer: after a long write or append, what the peer
//!    sent in the meantime must count before the dead-peer check does.

use std::future::Future;
use std::time::Duration;

use dtfed_proto::link::{
    encode, FrameDecoder, LinkErrorCode, LinkFrame, MirrorPull, MirrorServe, SessionError,
};
use futures::FutureExt;
use quinn::{RecvStream, SendStream};
use tokio::time::{sleep, sleep_until, Instant};

use super::STREAM_ABANDONED;

/// What the driver needs from a link session; both sides' sessions have it.
pub trait LinkSession: Send {
    fn handle_frame(&mut self, now: Duration, frame: LinkFrame) -> Result<(), SessionError>;
    fn handle_timeout(&mut self, now: Duration);
    fn poll_timeout(&self) -> Option<Duration>;
    fn poll_transmit(&mut self) -> Option<LinkFrame>;
    fn close(&mut self, code: LinkErrorCode, message: String);
    fn is_closed(&self) -> bool;
}

macro_rules! link_session {
    ($t:ty) => {
        impl LinkSession for $t {
            fn handle_frame(
                &mut self,
                now: Duration,
                frame: LinkFrame,
            ) -> Result<(), SessionError> {
                <$t>::handle_frame(self, now, frame)
            }
            fn handle_timeout(&mut self, now: Duration) {
                <$t>::handle_timeout(self, now)
            }
            fn poll_timeout(&self) -> Option<Duration> {
                <$t>::poll_timeout(self)
            }
            fn poll_transmit(&mut self) -> Option<LinkFrame> {
                <$t>::poll_transmit(self)
            }
            fn close(&mut self, code: LinkErrorCode, message: String) {
                <$t>::close(self, code, message)
            }
            fn is_closed(&self) -> bool {
                <$t>::is_closed(self)
            }
        }
    };
}
link_session!(MirrorServe);
link_session!(MirrorPull);

/// What became of the peer's half of the stream, or of its input.
#[derive(Debug)]
pub enum PeerInput {
    /// The peer finished its half.
    Finished,
    /// Reading failed (the stream was reset, the connection lost).
    ReadFailed(String),
    /// Bytes that are not frames; the session is already closed with `ProtocolViolation`.
    Undecodable(String),
    /// A frame the session refused (it closed itself with the matching code).
    Refused(SessionError),
}

/// One side of a mirror stream, driven by a [`StreamDriver`]. `End` is how a stream ended,
/// for the side's caller.
pub trait StreamSide: Send {
    type Session: LinkSession;
    type End: Send;
    /// A stop signal ([`stop`](Self::stop)).
    type Stop: Send;
    /// Any other wake-up ([`wake`](Self::wake)).
    type Wake: Send;

    /// Acts on the session's events, in order; sets `end` to end the stream.
    fn handle_events(
        &mut self,
        session: &mut Self::Session,
        end: &mut Option<Self::End>,
    ) -> impl Future<Output = ()> + Send;

    /// How long a write may make no progress before the stream is abandoned; `closing`
    /// once the stream is ending (a goodbye gets less time than a live stream).
    fn write_limit(&self, closing: bool) -> Duration;

    /// Resolves when the stream must stop (shutdown, pause); never, if nothing can stop it.
    /// Also ends a write that is waiting for the peer, unless the stream is already closing.
    /// The future owns what it watches (it is made again for every wait).
    fn stop(&self) -> impl Future<Output = Self::Stop> + Send + 'static;

    /// The stream is told to stop: close the session and say how the stream ends.
    fn on_stop(&mut self, session: &mut Self::Session, stop: Self::Stop) -> Option<Self::End>;

    /// Resolves on the side's other wake-ups; never, if it has none.
    fn wake(&mut self) -> impl Future<Output = Self::Wake> + Send;

    /// Acts on a wake-up.
    fn on_wake(
        &mut self,
        session: &mut Self::Session,
        wake: Self::Wake,
    ) -> impl Future<Output = Option<Self::End>> + Send;

    /// The peer's half ended, broke, or sent what the session refused.
    fn on_peer(&mut self, session: &mut Self::Session, input: PeerInput) -> Option<Self::End>;

    /// The stream was abandoned (a write failed or stalled, or a stop came while writing);
    /// `end` is what had ended it already, if anything.
    fn abandoned(&mut self, end: Option<Self::End>, why: String) -> Self::End;

    /// The send half is finished; `end` is what ended the stream (`None`: the session
    /// closed itself).
    fn finished(
        &mut self,
        end: Option<Self::End>,
        send: &mut SendStream,
    ) -> impl Future<Output = Self::End> + Send;
}

/// A session and its side over one QUIC stream; see the module docs for the loop.
pub struct StreamDriver<S: StreamSide> {
    side: S,
    session: S::Session,
    epoch: Instant,
    send: SendStream,
    recv: RecvStream,
    decoder: FrameDecoder,
    /// Encoded frames waiting to be written.
    out: Vec<u8>,
    buf: Vec<u8>,
    /// Most bytes taken from the stream before acting on them.
    read_budget: usize,
}

impl<S: StreamSide> StreamDriver<S> {
    /// `session` was made at time zero of this driver's clock. Reads `read_chunk` bytes at a
    /// time, and takes up to `read_budget` of what has already arrived before acting on it
    /// (so that a receiver appends everything that came in during its previous append at
    /// once, instead of one acknowledged append per frame).
    pub fn new(
        side: S,
        session: S::Session,
        send: SendStream,
        recv: RecvStream,
        read_chunk: usize,
        read_budget: usize,
    ) -> StreamDriver<S> {
        StreamDriver {
            side,
            session,
            epoch: Instant::now(),
            send,
            recv,
            decoder: FrameDecoder::new(),
            out: Vec::new(),
            buf: vec![0u8; read_chunk.max(1)],
            read_budget,
        }
    }

    /// Drives the stream to its end.
    pub async fn run(mut self) -> S::End {
        let mut end: Option<S::End> = None;
        loop {
            self.side.handle_events(&mut self.session, &mut end).await;
            let closing = end.is_some() || self.session.is_closed();
            if let Err(why) = self.flush(closing).await {
                let _ = self.send.reset(STREAM_ABANDONED);
                let _ = self.recv.stop(STREAM_ABANDONED);
                return self.side.abandoned(end, why);
            }
            if closing {
                let _ = self.send.finish();
                return self.side.finished(end, &mut self.send).await;
            }
            let deadline = self
                .session
                .poll_timeout()
                .map_or_else(Instant::now, |t| self.epoch + t);
            tokio::select! {
                biased;
                stop = self.side.stop() => end = self.side.on_stop(&mut self.session, stop),
                read = self.recv.read(&mut self.buf) => end = self.on_read(read),
                () = sleep_until(deadline) => {
                    let now = self.epoch.elapsed();
                    self.session.handle_timeout(now);
                }
                wake = self.side.wake() => end = self.side.on_wake(&mut self.session, wake).await,
            }
        }
    }

    /// A read's result, and whatever else has already arrived (up to the read budget).
    fn on_read(&mut self, mut read: Result<Option<usize>, quinn::ReadError>) -> Option<S::End> {
        let mut taken = 0;
        loop {
            match read {
                Ok(Some(n)) => {
                    taken += n;
                    let end = self.on_bytes(n);
                    if end.is_some() || taken >= self.read_budget {
                        return end;
                    }
                }
                Ok(None) => return self.side.on_peer(&mut self.session, PeerInput::Finished),
                Err(e) => {
                    let input = PeerInput::ReadFailed(e.to_string());
                    return self.side.on_peer(&mut self.session, input);
                }
            }
            match self.recv.read(&mut self.buf).now_or_never() {
                Some(next) => read = next,
                // Nothing more buffered yet.
                None => return None,
            }
        }
    }

    /// Feeds the first `n` bytes of the read buffer to the session, frame by frame.
    fn on_bytes(&mut self, n: usize) -> Option<S::End> {
        self.decoder.extend(self.buf.get(..n).unwrap_or_default());
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => {
                    let now = self.epoch.elapsed();
                    if let Err(e) = self.session.handle_frame(now, frame) {
                        return self.side.on_peer(&mut self.session, PeerInput::Refused(e));
                    }
                }
                Ok(None) => return None,
                Err(e) => {
                    self.session
                        .close(LinkErrorCode::ProtocolViolation, e.to_string());
                    let input = PeerInput::Undecodable(e.to_string());
                    return self.side.on_peer(&mut self.session, input);
                }
            }
        }
    }

    /// Writes everything the session has to send. Awaiting the write is the backpressure.
    async fn flush(&mut self, closing: bool) -> Result<(), String> {
        while let Some(frame) = self.session.poll_transmit() {
            // The session bounds every frame; failing here is a bug, and skipping the frame
            // could lose records silently: abandon the stream instead.
            encode(&frame, &mut self.out).map_err(|e| {
                tracing::error!(error = %e, frame = frame.kind(), "cannot encode a frame");
                format!("cannot encode a {} frame: {e}", frame.kind())
            })?;
        }
        if self.out.is_empty() {
            return Ok(());
        }
        let limit = self.side.write_limit(closing);
        // Each `write` waits while the peer's QUIC stream window (and the connection's) is
        // full. The stall limit is on *progress* (no byte accepted for `limit`), not on the
        // whole buffer: a peer that drains slowly, or whose connection window is shared
        // with busier streams, is slow, not dead, and abandoning its stream would throw
        // away (and later re-send) everything already in its window.
        let mut written = 0;
        let result = loop {
            let Some(rest) = self.out.get(written..).filter(|r| !r.is_empty()) else {
                break Ok(());
            };
            let step = tokio::select! {
                r = self.send.write(rest) => r.map_err(|e| format!("write failed: {e}")),
                () = sleep(limit) => Err(format!("no write progress for {limit:?}")),
                _ = self.side.stop(), if !closing => Err("stopped while writing".to_owned()),
            };
            match step {
                Ok(n) => written += n,
                Err(e) => break Err(e),
            }
        };
        self.out.clear();
        result
    }
}
