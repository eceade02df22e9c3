//! [`MirrorDescribe`]: the receiving side asks an origin how many partitions its local topic
//! has, on a stream of its own: `Hello` and `Describe` out, the origin's `Hello` and
//! `Described` (or an `Error`) back, then the stream ends. Sans-IO, like the sessions.
//!
//! The receiver mirrors partition p of the origin into partition p of its mirror topic, so
//! the two counts must agree: an origin partition beyond the mirror topic's would never be
//! mirrored. The receiver checks the answer against its mirror topic before it streams.

use super::frame::{LinkErrorCode, LinkFrame};
use super::question::{check_origin_hello, StreamQuestion};
use super::session::SessionError;

/// What the origin answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DescribeAnswer {
    /// The origin's local topic has this many partitions.
    Partitions(i32),
    /// The origin does not know `Describe` (a build older than it: it answers
    /// `protocol_violation`). The count cannot be checked.
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

/// The pull side of one describe exchange.
#[derive(Debug)]
pub struct MirrorDescribe {
    local_region: String,
    origin: String,
    topic: String,
    state: State,
}

impl MirrorDescribe {
    /// An exchange from `local_region` asking `origin` about `topic`.
    pub fn new(
        local_region: impl Into<String>,
        origin: impl Into<String>,
        topic: impl Into<String>,
    ) -> Self {
        MirrorDescribe {
            local_region: local_region.into(),
            origin: origin.into(),
            topic: topic.into(),
            state: State::AwaitHello,
        }
    }
}

impl StreamQuestion for MirrorDescribe {
    type Answer = DescribeAnswer;

    /// The frames to send, in order: `Hello`, `Describe`.
    fn request(&self) -> [LinkFrame; 2] {
        [
            LinkFrame::hello(self.local_region.clone()),
            LinkFrame::Describe {
                topic: self.topic.clone(),
            },
        ]
    }

    /// Takes one frame from the origin: `Ok(Some(answer))` once answered, `Ok(None)` while
    /// more is expected, `Err` when the origin broke the protocol.
    fn handle_frame(&mut self, frame: LinkFrame) -> Result<Option<DescribeAnswer>, SessionError> {
        let answer = match (self.state, frame) {
            (State::Done, _) => return Err(SessionError::Closed),
            (_, LinkFrame::Error { code, message }) => {
                if code == LinkErrorCode::ProtocolViolation && self.state == State::AwaitAnswer {
                    DescribeAnswer::NotSupported
                } else {
                    DescribeAnswer::Refused { code, message }
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
            (State::AwaitAnswer, LinkFrame::Described { topic, partitions }) => {
                if topic != self.topic {
                    return Err(SessionError::UnknownTopic(topic));
                }
                if partitions < 1 {
                    return Err(SessionError::Invalid(format!(
                        "topic {topic} described with {partitions} partitions"
                    )));
                }
                DescribeAnswer::Partitions(partitions)
            }
            (state, other) => {
                return Err(SessionError::Unexpected {
                    frame: other.kind(),
                    state: match state {
                        State::AwaitHello => "before hello",
                        _ => "before the description",
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
    use crate::link::session::{MirrorServe, ServeConfig, ServeEvent};
    use std::time::Duration;

    /// The exchange end to end against a [`MirrorServe`].
    #[test]
    fn origin_tells_its_partition_count() {
        let mut ask = MirrorDescribe::new("tokyo", "seoul", "dtfed.local");
        let mut serve = MirrorServe::new(ServeConfig::new("seoul", "dtfed.local"), Duration::ZERO);
        for f in ask.request() {
            serve.handle_frame(Duration::ZERO, f).expect("accepted");
        }
        assert_eq!(
            serve.poll_event(),
            Some(ServeEvent::Describe {
                topic: "dtfed.local".into()
            })
        );
        serve.describe(12).expect("answered");
        assert!(serve.is_closed());
        let mut answer = None;
        while let Some(f) = serve.poll_transmit() {
            if let Some(a) = ask.handle_frame(f).expect("valid") {
                answer = Some(a);
            }
        }
        assert_eq!(answer, Some(DescribeAnswer::Partitions(12)));
    }

    #[test]
    fn other_topics_refusals_and_old_origins() {
        let mut serve = MirrorServe::new(ServeConfig::new("seoul", "dtfed.local"), Duration::ZERO);
        serve
            .handle_frame(Duration::ZERO, LinkFrame::hello("tokyo"))
            .expect("hello");
        assert!(serve
            .handle_frame(
                Duration::ZERO,
                LinkFrame::Describe {
                    topic: "dtfed.mirror.paris".into()
                }
            )
            .is_err());

        let mut ask = MirrorDescribe::new("tokyo", "seoul", "dtfed.local");
        assert!(ask
            .handle_frame(LinkFrame::hello("seoul"))
            .expect("hello")
            .is_none());
        let old = LinkFrame::error(LinkErrorCode::ProtocolViolation, "unknown frame kind");
        assert_eq!(
            ask.handle_frame(old).expect("answer"),
            Some(DescribeAnswer::NotSupported)
        );

        let mut ask = MirrorDescribe::new("tokyo", "seoul", "dtfed.local");
        assert!(matches!(
            ask.handle_frame(LinkFrame::error(LinkErrorCode::Forbidden, "no")),
            Ok(Some(DescribeAnswer::Refused { .. }))
        ));
        let mut ask = MirrorDescribe::new("tokyo", "seoul", "dtfed.local");
        assert!(ask.handle_frame(LinkFrame::hello("paris")).is_err());
        let mut ask = MirrorDescribe::new("tokyo", "seoul", "dtfed.local");
        ask.handle_frame(LinkFrame::hello("seoul")).expect("hello");
        assert!(ask
            .handle_frame(LinkFrame::Described {
                topic: "dtfed.local".into(),
                partitions: 0
            })
            .is_err());
    }
}
