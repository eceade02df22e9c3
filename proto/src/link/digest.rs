//! [`MirrorDigest`]: the receiving side asks an origin for the digest of one partition of
//! its local topic over an offset range, on a stream of its own: `Hello` and `Digest` out,
//! the origin's `Hello` and `Digested` (or an `Error`) back, then the stream ends. Sans-IO,
//! like [`super::describe::MirrorDescribe`], whose shape it follows.
//!
//! The receiver compares the answer with its own digest of its mirror of that range: a
//! background divergence check. An origin older than the `Digest` frame answers
//! `protocol_violation`, which is [`DigestAnswer::NotSupported`], not a mismatch.

use super::frame::{LinkErrorCode, LinkFrame};
use super::question::{check_origin_hello, StreamQuestion};
use super::session::SessionError;

/// What the origin answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DigestAnswer {
    /// The range holds `count` records; `sha256` is their digest.
    Digested { count: u64, sha256: [u8; 32] },
    /// The origin does not know `Digest` (an older build).
    NotSupported,
    /// The origin refused or failed: its error.
    Refused {
        code: LinkErrorCode,
        message: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    AwaitHello,
    AwaitAnswer,
    Done,
}

/// The pull side of one digest exchange.
#[derive(Debug)]
pub struct MirrorDigest {
    local_region: String,
    origin: String,
    topic: String,
    partition: i32,
    from_offset: i64,
    to_offset: i64,
    state: State,
}

impl MirrorDigest {
    /// An exchange from `local_region` asking `origin` for the digest of
    /// `topic`/`partition` over `[from_offset, to_offset)`.
    pub fn new(
        local_region: impl Into<String>,
        origin: impl Into<String>,
        topic: impl Into<String>,
        partition: i32,
        from_offset: i64,
        to_offset: i64,
    ) -> Self {
        MirrorDigest {
            local_region: local_region.into(),
            origin: origin.into(),
            topic: topic.into(),
            partition,
            from_offset,
            to_offset,
            state: State::AwaitHello,
        }
    }
}

impl StreamQuestion for MirrorDigest {
    type Answer = DigestAnswer;

    /// The frames to send, in order: `Hello`, `Digest`.
    fn request(&self) -> [LinkFrame; 2] {
        [
            LinkFrame::hello(self.local_region.clone()),
            LinkFrame::Digest {
                topic: self.topic.clone(),
                partition: self.partition,
                from_offset: self.from_offset,
                to_offset: self.to_offset,
            },
        ]
    }

    /// Takes one frame from the origin: `Ok(Some(answer))` once answered, `Ok(None)` while
    /// more is expected, `Err` when the origin broke the protocol (an answer for another
    /// range than asked included).
    fn handle_frame(&mut self, frame: LinkFrame) -> Result<Option<DigestAnswer>, SessionError> {
        let answer = match (self.state, frame) {
            (State::Done, _) => return Err(SessionError::Closed),
            (_, LinkFrame::Error { code, message }) => {
                if code == LinkErrorCode::ProtocolViolation && self.state == State::AwaitAnswer {
                    DigestAnswer::NotSupported
                } else {
                    DigestAnswer::Refused { code, message }
                }
            }
            (
                State::AwaitHello,
                LinkFrame::Hello {
                    magic,
                    protocol_version,
                    region,
                    codec_version,
                },
            ) => {
                check_origin_hello(magic, protocol_version, codec_version, region, &self.origin)?;
                self.state = State::AwaitAnswer;
                return Ok(None);
            }
            (State::AwaitAnswer, LinkFrame::Heartbeat { .. }) => return Ok(None),
            (
                State::AwaitAnswer,
                LinkFrame::Digested {
                    partition,
                    from_offset,
                    to_offset,
                    count,
                    sha256,
                },
            ) => {
                if (partition, from_offset, to_offset)
                    != (self.partition, self.from_offset, self.to_offset)
                {
                    return Err(SessionError::Invalid(format!(
                        "digest of partition {partition} [{from_offset}, {to_offset}) answered \
                         for partition {} [{}, {})",
                        self.partition, self.from_offset, self.to_offset
                    )));
                }
                DigestAnswer::Digested { count, sha256 }
            }
            (state, other) => {
                return Err(SessionError::Unexpected {
                    frame: other.kind(),
                    state: match state {
                        State::AwaitHello => "before hello",
                        _ => "before the digest",
                    },
                })
            }
        };
        self.state = State::Done;
        Ok(Some(answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::codec::{decode_payload, encode};
    use crate::link::session::{MirrorServe, ServeConfig, ServeEvent};
    use std::time::Duration;

    /// The exchange end to end against a [`MirrorServe`], through the codec.
    #[test]
    fn origin_answers_a_digest() {
        let mut ask = MirrorDigest::new("tokyo", "seoul", "dtfed.local", 3, 100, 200);
        let mut serve = MirrorServe::new(ServeConfig::new("seoul", "dtfed.local"), Duration::ZERO);
        for f in ask.request() {
            let mut bytes = Vec::new();
            encode(&f, &mut bytes).expect("encodes");
            let back = decode_payload(bytes.get(4..).unwrap_or_default()).expect("decodes");
            assert_eq!(back, f);
            serve.handle_frame(Duration::ZERO, back).expect("accepted");
        }
        assert_eq!(
            serve.poll_event(),
            Some(ServeEvent::Digest {
                partition: 3,
                from_offset: 100,
                to_offset: 200
            })
        );
        serve.digested(42, [7; 32]).expect("answered");
        assert!(serve.is_closed());
        let mut answer = None;
        while let Some(f) = serve.poll_transmit() {
            if let Some(a) = ask.handle_frame(f).expect("valid") {
                answer = Some(a);
            }
        }
        assert_eq!(
            answer,
            Some(DigestAnswer::Digested {
                count: 42,
                sha256: [7; 32]
            })
        );
    }

    /// Appended after `Described` (index 7): the indexes older peers know do not move.
    #[test]
    fn the_digest_frames_come_after_every_older_frame() {
        let digest = LinkFrame::Digest {
            topic: "t".into(),
            partition: 0,
            from_offset: 0,
            to_offset: 0,
        };
        let digested = LinkFrame::Digested {
            partition: 0,
            from_offset: 0,
            to_offset: 0,
            count: 0,
            sha256: [0; 32],
        };
        for (frame, index) in [(digest, 8u8), (digested, 9)] {
            let mut bytes = Vec::new();
            encode(&frame, &mut bytes).expect("encodes");
            assert_eq!(bytes.get(4), Some(&index), "{frame:?}");
        }
    }

    #[test]
    fn bad_requests_old_origins_and_wrong_answers() {
        // Another topic, or a range upside down: refused by the origin.
        for bad in [
            LinkFrame::Digest {
                topic: "dtfed.mirror.paris".into(),
                partition: 0,
                from_offset: 0,
                to_offset: 1,
            },
            LinkFrame::Digest {
                topic: "dtfed.local".into(),
                partition: 0,
                from_offset: 5,
                to_offset: 1,
            },
            LinkFrame::Digest {
                topic: "dtfed.local".into(),
                partition: -1,
                from_offset: 0,
                to_offset: 1,
            },
        ] {
            let mut serve =
                MirrorServe::new(ServeConfig::new("seoul", "dtfed.local"), Duration::ZERO);
            serve
                .handle_frame(Duration::ZERO, LinkFrame::hello("tokyo"))
                .expect("hello");
            assert!(serve.handle_frame(Duration::ZERO, bad).is_err());
        }

        let mut ask = MirrorDigest::new("tokyo", "seoul", "dtfed.local", 0, 0, 10);
        ask.handle_frame(LinkFrame::hello("seoul")).expect("hello");
        let old = LinkFrame::error(LinkErrorCode::ProtocolViolation, "unknown frame kind");
        assert_eq!(
            ask.handle_frame(old).expect("answer"),
            Some(DigestAnswer::NotSupported)
        );

        let mut ask = MirrorDigest::new("tokyo", "seoul", "dtfed.local", 0, 0, 10);
        ask.handle_frame(LinkFrame::hello("seoul")).expect("hello");
        assert!(ask
            .handle_frame(LinkFrame::Digested {
                partition: 0,
                from_offset: 0,
                to_offset: 11,
                count: 1,
                sha256: [0; 32],
            })
            .is_err());

        let mut ask = MirrorDigest::new("tokyo", "seoul", "dtfed.local", 0, 0, 10);
        assert!(ask.handle_frame(LinkFrame::hello("paris")).is_err());
        let mut ask = MirrorDigest::new("tokyo", "seoul", "dtfed.local", 0, 0, 10);
        assert!(matches!(
            ask.handle_frame(LinkFrame::error(LinkErrorCode::Unavailable, "kafka down")),
            Ok(Some(DigestAnswer::Refused { .. }))
        ));
    }
}
