//! The admin endpoints `dtfed verify` asks every region (reading endpoints: the bearer
//! token when `admin.token` is set, as `/status`):
//!
//! - `GET /admin/rooms/{room}/watermarks`: per origin this region holds (itself included),
//!   the room's partition and the range of origin offsets held, `[earliest, end)`.
//! - `GET /admin/rooms/{room}/digest?origin=O&from=A&to=B`: the [`RoomDigest`] of the room's
//!   records from `O` with origin offsets in `[A, B)`.
//!
//! Bad input is a 400 saying what is wrong; an origin this region does not hold a 404; a
//! read that failed or overran its deadline a 503.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use dtfed_proto::RoomId;
use serde::Serialize;

use crate::admin::{may_read, AdminState};
use crate::verify::digest::RoomDigest;
use crate::verify::reader::{DigestError, OriginWatermark};

/// The answer of `/admin/rooms/{room}/watermarks`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Watermarks {
    pub region: String,
    pub room: String,
    pub origins: Vec<OriginWatermark>,
}

/// A request refused: the status and what to say.
struct Refused(StatusCode, String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        (self.0, format!("{}\n", self.1)).into_response()
    }
}

fn bad(msg: impl std::fmt::Display) -> Refused {
    Refused(StatusCode::BAD_REQUEST, msg.to_string())
}

impl From<DigestError> for Refused {
    fn from(e: DigestError) -> Refused {
        let code = match e {
            DigestError::UnknownOrigin(_) => StatusCode::NOT_FOUND,
            DigestError::BadRange(_) => StatusCode::BAD_REQUEST,
            DigestError::Read(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Refused(code, e.to_string())
    }
}

/// The checks every request goes through: the token, a valid room.
fn prepare(s: &AdminState, headers: &HeaderMap, room: &str) -> Result<RoomId, Box<Response>> {
    may_read(s, headers).map_err(|denied| Box::new(denied.into_response()))?;
    RoomId::parse(room).map_err(|e| Box::new(bad(format!("room {room:?}: {e}")).into_response()))
}

pub async fn watermarks(
    State(s): State<Arc<AdminState>>,
    Path(room): Path<String>,
    headers: HeaderMap,
) -> Response {
    let room = match prepare(&s, &headers, &room) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    match s.digests.watermarks(&room).await {
        Ok(origins) => Json(Watermarks {
            region: s.digests.region().to_owned(),
            room: room.as_str().to_owned(),
            origins,
        })
        .into_response(),
        Err(e) => Refused::from(e).into_response(),
    }
}

pub async fn digest(
    State(s): State<Arc<AdminState>>,
    Path(room): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let room = match prepare(&s, &headers, &room) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    match digest_of(&s, &room, &query).await {
        Ok(d) => Json(d).into_response(),
        Err(r) => r.into_response(),
    }
}

async fn digest_of(
    s: &AdminState,
    room: &RoomId,
    query: &HashMap<String, String>,
) -> Result<RoomDigest, Refused> {
    if let Some(k) = query
        .keys()
        .find(|k| !["origin", "from", "to"].contains(&k.as_str()))
    {
        return Err(bad(format!(
            "unknown parameter {k:?}: expected origin, from and to"
        )));
    }
    let origin = query
        .get("origin")
        .ok_or_else(|| bad("missing parameter origin (a region name)"))?;
    let offset = |name: &str| -> Result<i64, Refused> {
        let v = query
            .get(name)
            .ok_or_else(|| bad(format!("missing parameter {name} (an origin offset)")))?;
        v.parse::<i64>()
            .ok()
            .filter(|o| *o >= 0)
            .ok_or_else(|| bad(format!("{name}={v:?} is not an offset (0 or more)")))
    };
    let (from, to) = (offset("from")?, offset("to")?);
    Ok(s.digests.digest(room, origin, from, to).await?)
}
