//! The server API: HTTP for game servers and bots on the client listener, behind API keys
//! (`docs/PROTOCOL.md`, "Server API").
//!
//! - `POST /api/v1/rooms/{room}/messages` ([`publish`]): `{"from","body"}`, stored through
//!   the same path as a player's `pub` (append, then fan-out to every player of the room),
//!   answered `{"room","origin","offset"}` only after Kafka acknowledged it. An
//!   `Idempotency-Key` makes retries safe, through the gateway's `ref` machinery.
//! - `GET /api/v1/rooms/{room}/messages?since=<cursor>&limit=N` and `?last=N` ([`read`]):
//!   a room's messages through the replay that serves players' resumes.
//!
//! Start at [`routes`]; [`keys`] is the `[api]` config and the key lookup. Every refusal is
//! JSON `{"code","message"}` with a v1 error code and its HTTP status ([`ApiError`]).

pub mod keys;
pub mod publish;
pub mod read;

use std::sync::Arc;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use dtfed_proto::{ErrorCode, RoomId};

pub use keys::{ApiConfig, ApiKey, ApiKeys};

use super::Gateway;

/// The API's routes, served with the gateway's state.
pub fn routes() -> Router<Arc<Gateway>> {
    Router::new().route(
        "/api/v1/rooms/{room}/messages",
        get(read::messages).post(publish::message),
    )
}

/// A refusal: a v1 error code, its HTTP status, and what to do about it.
#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self.code {
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::BadFrame
            | ErrorCode::BadRoom
            | ErrorCode::UnknownOp
            | ErrorCode::NotSubscribed => StatusCode::BAD_REQUEST,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::json!({"code": self.code.as_str(), "message": self.message});
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match self.code {
            ErrorCode::Unauthorized => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"dtfed\""),
                );
            }
            ErrorCode::RateLimited | ErrorCode::Unavailable => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

/// The key behind the request's `Authorization: Bearer <secret>`, allowed to use `room`
/// (parsed from the path). Counts every refusal in the error metrics.
pub fn admit<'g>(
    gw: &'g Gateway,
    headers: &HeaderMap,
    room: &str,
) -> Result<(&'g ApiKey, RoomId), ApiError> {
    let result = admit_uncounted(gw, headers, room);
    if let Err(e) = &result {
        gw.metrics.error(e.code);
    }
    result
}

fn admit_uncounted<'g>(
    gw: &'g Gateway,
    headers: &HeaderMap,
    room: &str,
) -> Result<(&'g ApiKey, RoomId), ApiError> {
    let Some(keys) = &gw.api else {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "this daemon has no [api] keys",
        ));
    };
    let secret = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                "send the API key as `Authorization: Bearer <key>`",
            )
        })?;
    let key = keys
        .find(secret)
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "unknown API key"))?;
    let room = RoomId::parse(room).map_err(|e| ApiError::new(ErrorCode::BadRoom, e.to_string()))?;
    if !key.may_use(room.as_str()) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("API key {:?} may not use room {room}", key.name),
        ));
    }
    Ok((key, room))
}

/// Counts `e` in the error metrics and returns it.
pub fn refuse(gw: &Gateway, e: ApiError) -> ApiError {
    gw.metrics.error(e.code);
    e
}
