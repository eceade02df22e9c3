//! A player's WebSocket as both session kinds (`/ws`, `/stomp`) write to it: frames are fed
//! into the socket's write buffer and flushed once per turn of the session's loop (a burst
//! of a room's messages leaves in one `sendto`), every write is bounded by
//! [`WRITE_TIMEOUT`] (a player who does not read is a slow reader, closed 4001), and a close
//! is a handshake ([`PlayerSocket::send_close`], then [`PlayerSocket::await_close_answer`]).

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::{FutureExt, SinkExt};

use super::read_error;
use crate::metrics::Metrics;

/// A write the player does not take within this time closes the connection as a slow reader.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long closing may take: sending our Close, then waiting for the player's.
pub const CLOSE_HANDSHAKE: Duration = Duration::from_secs(1);

/// Why a write failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFailed {
    /// The connection is gone.
    Closed,
    /// The player took nothing for [`WRITE_TIMEOUT`]: a slow reader.
    TimedOut,
}

/// What a read from the player's socket gave.
pub enum Received {
    Message(Message),
    /// The connection went away (closed, reset, EOF): nobody to tell.
    Ended,
    /// A read that broke the protocol or the limits: close with this code and reason.
    Broken(u16, &'static str),
}

/// A session's socket and whether anything waits in its write buffer.
pub struct PlayerSocket {
    socket: WebSocket,
    /// Frames fed into the socket since the last flush.
    unflushed: bool,
}

impl PlayerSocket {
    pub fn new(socket: WebSocket) -> PlayerSocket {
        PlayerSocket {
            socket,
            unflushed: false,
        }
    }

    /// Feeds one message into the write buffer; [`PlayerSocket::flush`] sends it (the buffer
    /// writes by itself once it holds more than the gateway's write buffer size).
    pub async fn feed(&mut self, msg: Message) -> Result<(), WriteFailed> {
        written(within_write_timeout(self.socket.feed(msg)).await)?;
        self.unflushed = true;
        Ok(())
    }

    /// Writes what was fed since the last flush.
    pub async fn flush(&mut self) -> Result<(), WriteFailed> {
        if !self.unflushed {
            return Ok(());
        }
        written(within_write_timeout(self.socket.flush()).await)?;
        self.unflushed = false;
        Ok(())
    }

    /// The player's next message, or how the connection ended: a read that failed in a way
    /// the player should be told about ([`read_error::classify`]) is counted in
    /// `dtfed_connections_closed_total` and answered with its close code.
    pub async fn recv(&mut self, metrics: &Metrics) -> Received {
        match self.socket.recv().await {
            Some(Ok(msg)) => Received::Message(msg),
            None => Received::Ended,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "read failed");
                match read_error::classify(&e) {
                    Some(f) => {
                        metrics.closed(f.metric);
                        Received::Broken(f.code, f.reason)
                    }
                    None => Received::Ended,
                }
            }
        }
    }

    /// Sends our Close within [`CLOSE_HANDSHAKE`]; true if it went out.
    pub async fn send_close(&mut self, code: u16, reason: &'static str) -> bool {
        tokio::time::timeout(CLOSE_HANDSHAKE, self.socket.send(close(code, reason)))
            .await
            .is_ok_and(|sent| sent.is_ok())
    }

    /// The closing handshake's second half: reads (and drops) what the player still sends
    /// until its Close answers ours, within [`CLOSE_HANDSHAKE`]. Dropping the socket with
    /// unread bytes in the kernel's receive buffer would reset the connection, and the
    /// player would see 1006 instead of the close code that says why (a flooder's frames,
    /// for instance).
    pub async fn await_close_answer(&mut self) {
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE, async {
            while let Some(Ok(msg)) = self.socket.recv().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// A Close frame with `code` and `reason`.
pub fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

fn written(
    r: Result<Result<(), axum::Error>, tokio::time::error::Elapsed>,
) -> Result<(), WriteFailed> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(WriteFailed::Closed),
        Err(_) => Err(WriteFailed::TimedOut),
    }
}

/// `write` bounded by [`WRITE_TIMEOUT`]. A write that completes at once (the socket had room,
/// the common case) costs no timer: the timer is armed only when the write has to wait.
async fn within_write_timeout<F, T>(write: F) -> Result<T, tokio::time::error::Elapsed>
where
    F: std::future::Future<Output = T>,
{
    tokio::pin!(write);
    if let Some(done) = (&mut write).now_or_never() {
        return Ok(done);
    }
    tokio::time::timeout(WRITE_TIMEOUT, write).await
}
