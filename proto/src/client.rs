//! Client protocol v1: JSON text frames over WebSocket. See `docs/PROTOCOL.md`.
//!
//! Decoding is two-step so that every bad frame gets the most precise answer the player can
//! act on: a frame that is JSON but names an unknown op is `unknown_op`, a bad room id is
//! `bad_room`, anything else malformed is `bad_frame`; the frame's `ref`, when it can be read,
//! is echoed in the error.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::cursor::Cursor;
use crate::room::RoomId;

/// Longest `ref` a client may attach to a publish, in bytes.
pub const MAX_REF_LEN: usize = 128;

/// An opaque JSON value carried through untouched (a message body).
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Body(pub Box<RawValue>);

impl Body {
    /// Wraps already-valid JSON text.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        RawValue::from_string(text.to_owned()).map(Body)
    }

    pub fn as_json(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for Body {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.get())
    }
}

/// A frame from a player.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientFrame {
    /// Subscribe; with `since`, replay everything after the cursor first.
    Sub {
        room: RoomId,
        since: Option<Cursor>,
    },
    /// Publish `body` to `room`; `reference` is echoed in the ack or error.
    Pub {
        room: RoomId,
        body: Body,
        reference: Option<String>,
    },
    Unsub {
        room: RoomId,
    },
    Ping,
}

/// Error codes of protocol v1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadFrame,
    TooLarge,
    BadRoom,
    UnknownOp,
    Unauthorized,
    Forbidden,
    RateLimited,
    Unavailable,
    NotSubscribed,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::BadFrame,
        ErrorCode::TooLarge,
        ErrorCode::BadRoom,
        ErrorCode::UnknownOp,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::NotSubscribed,
    ];

    /// The code as it appears on the wire (`"bad_frame"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::BadRoom => "bad_room",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::NotSubscribed => "not_subscribed",
        }
    }
}

/// A frame the client sent that cannot be acted on, with what to tell it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    pub reference: Option<String>,
}

impl FrameError {
    fn new(code: ErrorCode, message: impl Into<String>, reference: Option<String>) -> Self {
        FrameError {
            code,
            message: message.into(),
            reference,
        }
    }
}

#[derive(Deserialize)]
struct LooseFrame<'a> {
    #[serde(borrow, default)]
    op: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    room: Option<&'a RawValue>,
    #[serde(default, deserialize_with = "crate::cursor::deserialize_bounded")]
    since: Option<Cursor>,
    #[serde(default)]
    body: Option<Box<RawValue>>,
    #[serde(rename = "ref", default)]
    reference: Option<String>,
}

/// Decodes one client text frame. Never panics, whatever the input.
pub fn decode_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let loose: LooseFrame<'_> = serde_json::from_str(text)
        .map_err(|e| FrameError::new(ErrorCode::BadFrame, format!("not a frame: {e}"), None))?;
    let reference = loose.reference;
    if let Some(r) = &reference {
        if r.len() > MAX_REF_LEN {
            return Err(FrameError::new(
                ErrorCode::BadFrame,
                format!("ref is {} bytes, the limit is {MAX_REF_LEN}", r.len()),
                None,
            ));
        }
    }
    let Some(op) = loose.op else {
        return Err(FrameError::new(
            ErrorCode::BadFrame,
            "frame has no \"op\"",
            reference,
        ));
    };
    let room = || -> Result<RoomId, FrameError> {
        let raw = loose.room.ok_or_else(|| {
            FrameError::new(
                ErrorCode::BadFrame,
                format!("\"{op}\" needs a \"room\""),
                reference.clone(),
            )
        })?;
        let s: Cow<'_, str> = serde_json::from_str(raw.get()).map_err(|_| {
            FrameError::new(
                ErrorCode::BadRoom,
                "room must be a string",
                reference.clone(),
            )
        })?;
        RoomId::parse(&s)
            .map_err(|e| FrameError::new(ErrorCode::BadRoom, e.to_string(), reference.clone()))
    };
    match op.as_ref() {
        "sub" => Ok(ClientFrame::Sub {
            room: room()?,
            since: loose.since,
        }),
        "pub" => {
            let room = room()?;
            match loose.body {
                Some(body) if body.get() != "null" => Ok(ClientFrame::Pub {
                    room,
                    body: Body(body),
                    reference,
                }),
                _ => Err(FrameError::new(
                    ErrorCode::BadFrame,
                    "\"pub\" needs a non-null \"body\"",
                    reference,
                )),
            }
        }
        "unsub" => Ok(ClientFrame::Unsub { room: room()? }),
        "ping" => Ok(ClientFrame::Ping),
        other => Err(FrameError::new(
            ErrorCode::UnknownOp,
            format!("unknown op {other:?}; v1 knows sub, pub, unsub, ping"),
            reference,
        )),
    }
}

/// Encodes a client frame (used by clients, tests and the load generator).
pub fn encode_client_frame(frame: &ClientFrame) -> String {
    #[derive(Serialize)]
    #[serde(tag = "op", rename_all = "lowercase")]
    enum Wire<'a> {
        Sub {
            room: &'a RoomId,
            #[serde(skip_serializing_if = "Option::is_none")]
            since: &'a Option<Cursor>,
        },
        Pub {
            room: &'a RoomId,
            body: &'a Body,
            #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
            reference: &'a Option<String>,
        },
        Unsub {
            room: &'a RoomId,
        },
        Ping,
    }
    let wire = match frame {
        ClientFrame::Sub { room, since } => Wire::Sub { room, since },
        ClientFrame::Pub {
            room,
            body,
            reference,
        } => Wire::Pub {
            room,
            body,
            reference,
        },
        ClientFrame::Unsub { room } => Wire::Unsub { room },
        ClientFrame::Ping => Wire::Ping,
    };
    // Serializing these plain structs cannot fail: every map key is a string.
    serde_json::to_string(&wire).unwrap_or_default()
}

/// One chat message as delivered to a player.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MsgFrame {
    pub room: RoomId,
    pub origin: String,
    pub offset: i64,
    /// Offset of the previous message of this room from this origin; `None` for the first.
    pub prev: Option<i64>,
    /// Origin append time, milliseconds since the Unix epoch.
    pub ts: i64,
    pub from: String,
    pub body: Body,
}

/// How far the serving region holds one origin region's log for a room, and whether it is
/// receiving it now: a value of `synced`'s and `wm`'s `origins` (see `docs/PROTOCOL.md`,
/// "Replication watermarks").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginMark {
    /// The next origin offset of the room's partition this region does not hold yet: every
    /// message of the room from this origin below it is here (or was a `gap`).
    pub offset: i64,
    /// This region is receiving the origin's partition now (its stream is up and the
    /// origin was heard from within a few seconds).
    pub live: bool,
    /// How far behind this region's copy may be, in ms: 0 when live and caught up; else
    /// the age of what it last knew complete (`null` when unknown).
    pub lag_ms: Option<i64>,
    /// When `live` last changed, ms since the epoch, as this region saw it (`null` when
    /// unknown).
    #[serde(default)]
    pub since: Option<i64>,
}

/// Per origin region: its [`OriginMark`] for one room.
pub type OriginMarks = BTreeMap<String, OriginMark>;

/// A frame to a player.
///
/// Serialized with an `op` tag. Decoding goes through [`decode_server_frame`]: serde's tagged
/// enums buffer their content, which a raw JSON `body` cannot pass through.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum ServerFrame {
    Msg(MsgFrame),
    Ack {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        room: RoomId,
        origin: String,
        offset: i64,
    },
    Synced {
        room: RoomId,
        cursor: Cursor,
        /// Per remote origin region, how far this region holds it (additive; absent when
        /// the region mirrors nothing).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        origins: OriginMarks,
    },
    /// The replication watermark of `room` changed for some origins (additive): only the
    /// origins that changed are listed.
    Wm {
        room: RoomId,
        origins: OriginMarks,
    },
    Gap {
        room: RoomId,
        origin: String,
        from: i64,
        to: i64,
    },
    /// The replay of `room` stopped before its end (a replay is answered in pieces), or a
    /// backfill could not be completed: the connection is not subscribed to `room`, and a
    /// `sub` with `since: cursor` continues where this left off.
    More {
        room: RoomId,
        cursor: Cursor,
    },
    Pong,
    Error {
        code: ErrorCode,
        message: String,
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
}

impl ServerFrame {
    /// The frame as JSON text.
    pub fn to_json(&self) -> String {
        // Every field serializes to plain JSON; failure would be a bug in this module.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn error(code: ErrorCode, message: impl Into<String>, reference: Option<String>) -> Self {
        ServerFrame::Error {
            code,
            message: message.into(),
            reference,
        }
    }
}

impl From<FrameError> for ServerFrame {
    fn from(e: FrameError) -> Self {
        ServerFrame::Error {
            code: e.code,
            message: e.message,
            reference: e.reference,
        }
    }
}

impl MsgFrame {
    /// The frame as it goes on the wire: `{"op":"msg",...}`.
    pub fn to_json(&self) -> String {
        ServerFrame::Msg(self.clone()).to_json()
    }
}

/// Decodes a server frame (used by clients, tests and the load generator).
pub fn decode_server_frame(text: &str) -> Result<ServerFrame, serde_json::Error> {
    #[derive(Deserialize)]
    struct Op<'a> {
        #[serde(borrow)]
        op: Cow<'a, str>,
    }
    let op: Op<'_> = serde_json::from_str(text)?;
    if op.op == "msg" {
        return serde_json::from_str::<MsgFrame>(text).map(ServerFrame::Msg);
    }
    // Frames other than `msg` carry no raw JSON, so the tagged enum can buffer them.
    serde_json::from_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn code(text: &str) -> ErrorCode {
        decode_client_frame(text)
            .expect_err("should be refused")
            .code
    }

    #[test]
    fn decodes_the_documented_frames() {
        assert_eq!(
            decode_client_frame(r#"{"op":"sub","room":"r1"}"#),
            Ok(ClientFrame::Sub {
                room: RoomId::parse("r1").unwrap(),
                since: None
            })
        );
        let f = decode_client_frame(r#"{"op":"sub","room":"r1","since":{"seoul":4}}"#).unwrap();
        let ClientFrame::Sub { since: Some(c), .. } = f else {
            panic!("{f:?}")
        };
        assert_eq!(c.get("seoul"), Some(4));
        let f = decode_client_frame(r#"{"op":"pub","room":"r1","body":{"t":"hi"},"ref":"a1"}"#)
            .unwrap();
        assert_eq!(
            f,
            ClientFrame::Pub {
                room: RoomId::parse("r1").unwrap(),
                body: Body::from_json(r#"{"t":"hi"}"#).unwrap(),
                reference: Some("a1".into())
            }
        );
        assert_eq!(
            decode_client_frame(r#"{"op":"ping"}"#),
            Ok(ClientFrame::Ping)
        );
    }

    #[test]
    fn refuses_with_precise_codes() {
        assert_eq!(code("not json"), ErrorCode::BadFrame);
        assert_eq!(code("[1,2]"), ErrorCode::BadFrame);
        assert_eq!(code(r#"{"room":"r"}"#), ErrorCode::BadFrame);
        assert_eq!(code(r#"{"op":"dance"}"#), ErrorCode::UnknownOp);
        assert_eq!(code(r#"{"op":"sub","room":"a b"}"#), ErrorCode::BadRoom);
        assert_eq!(code(r#"{"op":"sub","room":7}"#), ErrorCode::BadRoom);
        assert_eq!(code(r#"{"op":"sub"}"#), ErrorCode::BadFrame);
        assert_eq!(code(r#"{"op":"pub","room":"r"}"#), ErrorCode::BadFrame);
        assert_eq!(
            code(r#"{"op":"pub","room":"r","body":null}"#),
            ErrorCode::BadFrame
        );
        let e = decode_client_frame(r#"{"op":"pub","room":"","body":1,"ref":"x9"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRoom);
        assert_eq!(e.reference.as_deref(), Some("x9"));
    }

    #[test]
    fn server_frames_match_the_protocol_text() {
        let msg = MsgFrame {
            room: RoomId::parse("r").unwrap(),
            origin: "seoul".into(),
            offset: 7,
            prev: None,
            ts: 1,
            from: "ann".into(),
            body: Body::from_json("\"hi\"").unwrap(),
        };
        assert_eq!(
            msg.to_json(),
            r#"{"op":"msg","room":"r","origin":"seoul","offset":7,"prev":null,"ts":1,"from":"ann","body":"hi"}"#
        );
        let err = ServerFrame::error(ErrorCode::RateLimited, "slow down", None);
        assert_eq!(
            err.to_json(),
            r#"{"op":"error","code":"rate_limited","message":"slow down"}"#
        );
    }

    fn room() -> impl Strategy<Value = RoomId> {
        "[A-Za-z0-9._:-]{1,128}".prop_map(|s| RoomId::parse(&s).expect("valid"))
    }

    fn body() -> impl Strategy<Value = Body> {
        prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            "[a-z ]{0,20}".prop_map(|s| serde_json::to_string(&s).expect("string")),
            ("[a-z]{1,5}", any::<bool>()).prop_map(|(k, v)| format!("{{\"{k}\":{v}}}")),
        ]
        .prop_map(|t| Body::from_json(&t).expect("json"))
    }

    fn cursor() -> impl Strategy<Value = Cursor> {
        proptest::collection::btree_map("[a-z]{1,8}", 0i64..1 << 50, 0..4).prop_map(Cursor)
    }

    fn origin_marks() -> impl Strategy<Value = OriginMarks> {
        let mark = (
            0i64..1 << 50,
            any::<bool>(),
            proptest::option::of(0i64..1 << 40),
            proptest::option::of(0i64..1 << 45),
        )
            .prop_map(|(offset, live, lag_ms, since)| OriginMark {
                offset,
                live,
                lag_ms,
                since,
            });
        proptest::collection::btree_map("[a-z]{1,8}", mark, 0..3)
    }

    fn client_frame() -> impl Strategy<Value = ClientFrame> {
        prop_oneof![
            (room(), proptest::option::of(cursor()))
                .prop_map(|(room, since)| ClientFrame::Sub { room, since }),
            (room(), body(), proptest::option::of("[a-z0-9]{0,16}")).prop_map(
                |(room, body, reference)| ClientFrame::Pub {
                    room,
                    body,
                    reference
                }
            ),
            room().prop_map(|room| ClientFrame::Unsub { room }),
            Just(ClientFrame::Ping),
        ]
    }

    fn server_frame() -> impl Strategy<Value = ServerFrame> {
        prop_oneof![
            (
                room(),
                "[a-z]{1,8}",
                0i64..1 << 50,
                proptest::option::of(0i64..1 << 50),
                any::<i64>(),
                "[a-z]{0,8}",
                body()
            )
                .prop_map(|(room, origin, offset, prev, ts, from, body)| {
                    ServerFrame::Msg(MsgFrame {
                        room,
                        origin,
                        offset,
                        prev,
                        ts,
                        from,
                        body,
                    })
                }),
            (
                room(),
                "[a-z]{1,8}",
                0i64..1 << 50,
                proptest::option::of("[a-z0-9]{0,16}")
            )
                .prop_map(|(room, origin, offset, reference)| ServerFrame::Ack {
                    reference,
                    room,
                    origin,
                    offset
                }),
            (room(), cursor(), origin_marks()).prop_map(|(room, cursor, origins)| {
                ServerFrame::Synced {
                    room,
                    cursor,
                    origins,
                }
            }),
            (room(), origin_marks()).prop_map(|(room, origins)| ServerFrame::Wm { room, origins }),
            (room(), cursor()).prop_map(|(room, cursor)| ServerFrame::More { room, cursor }),
            (room(), "[a-z]{1,8}", 0i64..1000, 0i64..1000).prop_map(|(room, origin, from, to)| {
                ServerFrame::Gap {
                    room,
                    origin,
                    from,
                    to,
                }
            }),
            Just(ServerFrame::Pong),
            (
                proptest::sample::select(ErrorCode::ALL.to_vec()),
                ".{0,20}",
                proptest::option::of("[a-z]{0,8}")
            )
                .prop_map(|(code, message, reference)| ServerFrame::Error {
                    code,
                    message,
                    reference
                }),
        ]
    }

    #[test]
    fn watermark_frames_match_the_protocol_text() {
        let origins: OriginMarks = [(
            "seoul".to_owned(),
            OriginMark {
                offset: 42,
                live: false,
                lag_ms: Some(3000),
                since: Some(1_700_000_000_000),
            },
        )]
        .into_iter()
        .collect();
        let wm = ServerFrame::Wm {
            room: RoomId::parse("r").unwrap(),
            origins: origins.clone(),
        };
        assert_eq!(
            wm.to_json(),
            r#"{"op":"wm","room":"r","origins":{"seoul":{"offset":42,"live":false,"lag_ms":3000,"since":1700000000000}}}"#
        );
        // Without origins, `synced` is the frame v1 always sent.
        let synced = ServerFrame::Synced {
            room: RoomId::parse("r").unwrap(),
            cursor: Cursor::default(),
            origins: OriginMarks::new(),
        };
        assert_eq!(
            synced.to_json(),
            r#"{"op":"synced","room":"r","cursor":{}}"#
        );
        let synced = ServerFrame::Synced {
            room: RoomId::parse("r").unwrap(),
            cursor: Cursor::default(),
            origins,
        };
        assert_eq!(
            synced.to_json(),
            r#"{"op":"synced","room":"r","cursor":{},"origins":{"seoul":{"offset":42,"live":false,"lag_ms":3000,"since":1700000000000}}}"#
        );
    }

    #[test]
    fn more_frame_matches_the_protocol_text() {
        let more = ServerFrame::More {
            room: RoomId::parse("r").unwrap(),
            cursor: Cursor([("seoul".to_owned(), 4)].into_iter().collect()),
        };
        assert_eq!(
            more.to_json(),
            r#"{"op":"more","room":"r","cursor":{"seoul":4}}"#
        );
    }

    proptest! {
        #[test]
        fn client_frames_round_trip(f in client_frame()) {
            let text = encode_client_frame(&f);
            prop_assert_eq!(decode_client_frame(&text), Ok(f));
        }

        #[test]
        fn server_frames_round_trip(f in server_frame()) {
            let text = f.to_json();
            prop_assert_eq!(decode_server_frame(&text).expect("decodes"), f);
        }

        #[test]
        fn decoder_never_panics(s in ".{0,200}") {
            let _ = decode_client_frame(&s);
        }
    }
}
