//! What a failed read from a player's socket means, by the error's type: a frame beyond the
//! hard size limit (close 1009), text that is not UTF-8 (1007), a frame that breaks the
//! WebSocket protocol, such as a reserved opcode or an unmasked frame (1002), or a
//! connection that simply went away (nothing to say).

use super::{CLOSE_INVALID_DATA, CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG};
use tungstenite::error::ProtocolError;

/// How to close a connection whose read failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadFailure {
    pub code: u16,
    pub reason: &'static str,
    /// The `reason` label of `dtfed_connections_closed_total`.
    pub metric: &'static str,
}

/// The close to send for read error `e`; `None` when the connection is gone (reset, EOF,
/// closed) and there is nobody to tell.
pub fn classify(e: &axum::Error) -> Option<ReadFailure> {
    let source = std::error::Error::source(e)?;
    let ws = source.downcast_ref::<tungstenite::Error>()?;
    match ws {
        tungstenite::Error::Capacity(_) => Some(ReadFailure {
            code: CLOSE_TOO_BIG,
            reason: "frame too large",
            metric: "too_large",
        }),
        tungstenite::Error::Utf8(_) => Some(ReadFailure {
            code: CLOSE_INVALID_DATA,
            reason: "text frame is not valid UTF-8",
            metric: "bad_utf8",
        }),
        tungstenite::Error::Protocol(
            ProtocolError::ResetWithoutClosingHandshake | ProtocolError::SendAfterClosing,
        ) => None,
        tungstenite::Error::Protocol(_) | tungstenite::Error::AttackAttempt => Some(ReadFailure {
            code: CLOSE_PROTOCOL_ERROR,
            reason: "WebSocket protocol error",
            metric: "protocol_error",
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::error::CapacityError;

    fn code(e: tungstenite::Error) -> Option<u16> {
        classify(&axum::Error::new(e)).map(|f| f.code)
    }

    #[test]
    fn close_codes_follow_the_error_type() {
        assert_eq!(
            code(tungstenite::Error::Capacity(
                CapacityError::MessageTooLong {
                    size: 10,
                    max_size: 5
                }
            )),
            Some(1009)
        );
        assert_eq!(
            code(tungstenite::Error::Utf8("\u{fffd}".into())),
            Some(1007)
        );
        for p in [
            ProtocolError::InvalidOpcode(3),
            ProtocolError::UnknownDataFrameType(3),
            ProtocolError::UnknownControlFrameType(11),
            ProtocolError::NonZeroReservedBits,
            ProtocolError::UnmaskedFrameFromClient,
            ProtocolError::FragmentedControlFrame,
        ] {
            assert_eq!(
                code(tungstenite::Error::Protocol(p.clone())),
                Some(1002),
                "{p}"
            );
        }
        assert_eq!(
            code(tungstenite::Error::Protocol(
                ProtocolError::ResetWithoutClosingHandshake
            )),
            None
        );
        assert_eq!(code(tungstenite::Error::ConnectionClosed), None);
        assert_eq!(
            code(tungstenite::Error::Io(
                std::io::ErrorKind::ConnectionReset.into()
            )),
            None
        );
    }
}
