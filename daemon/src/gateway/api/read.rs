//! `GET /api/v1/rooms/{room}/messages`: a room's messages for a game server.
//!
//! - `?since=<cursor>&limit=N`: the messages after a v1 cursor (URL-encoded JSON, e.g.
//!   `{"seoul":41}`; absent or `{}` is "from the oldest retained"), oldest first, at most
//!   `N` (1-1000, default 100). Served by [`crate::gateway::resume::replay`], the routine
//!   behind a player's `sub` with `since`: the hot history, this region's log, and other
//!   regions' messages from the mirror topics when federated; what retention deleted is a
//!   gap. The answer's `cursor` is where the next page starts; `more` says whether there is
//!   one now.
//! - `?last=N`: the newest `N` (1-1000) messages of the hot history, oldest first, for a
//!   chat's first screen, and the cursor to follow the room from with `since`.
//!
//! Answer: `{"room","messages":[{room,origin,offset,prev,ts,from,body}...],"gaps":[{origin,
//! from,to}...],"cursor":C,"more":bool}`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use dtfed_proto::{Cursor, ErrorCode, MsgFrame, RoomId, ServerFrame};
use serde::Serialize;

use super::{admit, refuse, ApiError};
use crate::gateway::resume::{replay, Replay, ResumeError};
use crate::gateway::Gateway;

/// Most messages one answer holds.
pub const MAX_PAGE: usize = 1000;
/// Messages per `since` answer when `limit` is not given.
pub const DEFAULT_PAGE: usize = 100;

#[derive(Serialize)]
struct Gap {
    origin: String,
    from: i64,
    to: i64,
}

#[derive(Serialize)]
struct Page {
    room: RoomId,
    messages: Vec<MsgFrame>,
    gaps: Vec<Gap>,
    cursor: Cursor,
    more: bool,
}

pub async fn messages(
    State(gw): State<Arc<Gateway>>,
    Path(room): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    match page(&gw, &room, &params, &headers).await {
        Ok(page) => Json(page).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn page(
    gw: &Gateway,
    room: &str,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<Page, ApiError> {
    let (key, room) = admit(gw, headers, room)?;
    let bad = |message: String| refuse(gw, ApiError::new(ErrorCode::BadFrame, message));
    if let Some(unknown) = params
        .keys()
        .find(|k| !matches!(k.as_str(), "since" | "limit" | "last"))
    {
        return Err(bad(format!(
            "unknown query parameter {unknown:?}: use since and limit, or last"
        )));
    }
    let count = |name: &str, default: usize| -> Result<usize, ApiError> {
        match params.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_PAGE).contains(n))
                .ok_or_else(|| bad(format!("{name} must be a number 1-{MAX_PAGE}"))),
        }
    };
    if params.contains_key("last") {
        if params.contains_key("since") || params.contains_key("limit") {
            return Err(bad("last cannot be combined with since or limit".to_owned()));
        }
        let n = count("last", MAX_PAGE)?;
        return last(gw, room, n).await;
    }
    let limit = count("limit", DEFAULT_PAGE)?;
    let since = match params.get("since") {
        None => Cursor::new(),
        Some(text) => parse_cursor(text).map_err(bad)?,
    };
    if let Some(why) = gw.foreign_origin(Some(&since)) {
        return Err(bad(why));
    }
    let mut cursor = since.clone();
    let mut may_read_log = || key.take_log_read();
    let Replay { frames, complete } = replay(gw, &room, &mut cursor, &mut may_read_log)
        .await
        .map_err(|e| match e {
            ResumeError::RateLimited => refuse(
                gw,
                ApiError::new(
                    ErrorCode::RateLimited,
                    format!(
                        "API key {:?} is over its reads from the log per second; retry in a second",
                        key.name
                    ),
                ),
            ),
            e => {
                tracing::warn!(region = %gw.region, %room, error = %e, "server API read failed");
                refuse(
                    gw,
                    ApiError::new(
                        ErrorCode::Unavailable,
                        format!("cannot read {room} right now; retry with the same cursor"),
                    ),
                )
            }
        })?;
    let mut page = Page {
        room,
        messages: Vec::new(),
        gaps: Vec::new(),
        cursor: since,
        more: !complete,
    };
    let mut truncated = false;
    for frame in frames {
        match frame {
            ServerFrame::Msg(m) => {
                if page.messages.len() == limit {
                    truncated = true;
                    break;
                }
                page.cursor.advance(&m.origin, m.offset);
                page.messages.push(m);
            }
            ServerFrame::Gap {
                origin, from, to, ..
            } => page.gaps.push(Gap { origin, from, to }),
            _ => {}
        }
    }
    if truncated {
        page.more = true;
    } else {
        // Everything the replay found was taken: its cursor also covers how far an
        // incomplete log read got.
        page.cursor = cursor;
    }
    Ok(page)
}

/// The newest `n` messages of the hot history, and the cursor after the newest message.
async fn last(gw: &Gateway, room: RoomId, n: usize) -> Result<Page, ApiError> {
    let unavailable = |e: crate::bus::BusError| {
        tracing::warn!(region = %gw.region, %room, error = %e, "server API read failed");
        refuse(
            gw,
            ApiError::new(
                ErrorCode::Unavailable,
                format!("cannot read {room} right now; retry"),
            ),
        )
    };
    let bus = gw.rooms.bus();
    // Tails first: whatever is applied after it is in the history read next, so the cursor
    // never names a message this answer does not cover.
    let mut cursor = bus.tails(&room).await.map_err(unavailable)?;
    let mut history = bus.history(&room).await.map_err(unavailable)?;
    for m in &history {
        cursor.advance(&m.origin, m.offset);
    }
    let skip = history.len().saturating_sub(n);
    let messages = history.split_off(skip);
    Ok(Page {
        room,
        messages,
        gaps: Vec::new(),
        cursor,
        more: false,
    })
}

/// A v1 cursor from the query string, with the bounds of a player's `since`.
fn parse_cursor(text: &str) -> Result<Cursor, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    let cursor = dtfed_proto::cursor::deserialize_bounded(&mut de)
        .and_then(|c| de.end().map(|()| c))
        .map_err(|e| {
            format!("since must be a v1 cursor, a JSON object like {{\"seoul\":41}}: {e}")
        })?;
    Ok(cursor.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::parse_cursor;

    #[test]
    fn cursors_are_bounded_json_objects() {
        let c = parse_cursor(r#"{"seoul":41,"tokyo":7}"#).expect("a cursor");
        assert_eq!((c.get("seoul"), c.get("tokyo")), (Some(41), Some(7)));
        assert!(parse_cursor("{}").expect("empty").0.is_empty());
        assert!(parse_cursor("null").expect("null").0.is_empty());
        for bad in [
            "",
            "41",
            "[1]",
            r#"{"Seoul!":1}"#,
            r#"{"seoul":"x"}"#,
            "{} x",
        ] {
            assert!(parse_cursor(bad).is_err(), "{bad}");
        }
    }
}
