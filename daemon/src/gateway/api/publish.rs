//! `POST /api/v1/rooms/{room}/messages`: a game server says something in a room.
//!
//! The request is `{"from": NAME, "body": ANY}` (`from` as a player name, 1-64 bytes without
//! control characters; `body` any JSON value but `null`), at most `client.max_frame_bytes`.
//! It goes through [`crate::gateway::publish::publish`], the path of a player's `pub`: the
//! Kafka append, then the fan-out to every player in the room, in every region. The answer
//! `{"room","origin","offset"}` is sent only once Kafka acknowledged the append.
//!
//! `Idempotency-Key` (1-128 bytes of visible ASCII) becomes the publish's `ref`, namespaced
//! by the key's name (`api:<key name>:<Idempotency-Key>`): the same key, room, `from`, body
//! and `Idempotency-Key` within the `ref` window ([`crate::gateway::publish::WINDOW`]) is
//! stored once, whichever daemon of the region the retry reaches, and answered with the
//! offset of the first.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body as HttpBody;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use dtfed_proto::client::Body;
use dtfed_proto::record::LogValue;
use dtfed_proto::ErrorCode;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{admit, refuse, ApiError};
use crate::gateway::auth::{valid_player_name, MAX_PLAYER_LEN};
use crate::gateway::publish::{publish, PublishError, Turn};
use crate::gateway::Gateway;

/// A request body not received within this time is refused: a caller trickling its body
/// would otherwise hold the request open for good.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Longest `Idempotency-Key`, in bytes (as a player's `ref`).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;

#[derive(Deserialize)]
struct PublishRequest {
    from: Option<String>,
    body: Option<Box<RawValue>>,
}

pub async fn message(
    State(gw): State<Arc<Gateway>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    request: HttpBody,
) -> Response {
    match store(&gw, &room, &headers, request).await {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn store(
    gw: &Gateway,
    room: &str,
    headers: &HeaderMap,
    request: HttpBody,
) -> Result<serde_json::Value, ApiError> {
    let (key, room) = admit(gw, headers, room)?;
    let limit = gw.cfg.max_frame_bytes;
    // Read at most the limit: a larger body is refused without being buffered.
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, read_body(request, limit)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(BodyError::TooLarge)) => {
            return Err(refuse(
                gw,
                ApiError::new(
                    ErrorCode::TooLarge,
                    format!("the request body is over {limit} bytes (client.max_frame_bytes)"),
                ),
            ))
        }
        Ok(Err(BodyError::Broken(e))) => {
            return Err(refuse(
                gw,
                ApiError::new(
                    ErrorCode::BadFrame,
                    format!("the request body broke off: {e}"),
                ),
            ))
        }
        Err(_) => {
            return Err(refuse(
                gw,
                ApiError::new(
                    ErrorCode::BadFrame,
                    format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
                ),
            ))
        }
    };
    let bad = |message: String| refuse(gw, ApiError::new(ErrorCode::BadFrame, message));
    let request: PublishRequest = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("the body must be JSON {{\"from\", \"body\"}}: {e}")))?;
    let from = request
        .from
        .filter(|f| valid_player_name(f))
        .ok_or_else(|| {
            bad(format!(
                "\"from\" must be a name of 1-{MAX_PLAYER_LEN} bytes without control characters"
            ))
        })?;
    let body = match request.body {
        Some(b) if b.get() != "null" => Body(b),
        _ => return Err(bad("\"body\" must be present and not null".to_owned())),
    };
    let idempotency = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let k = v
                .to_str()
                .ok()
                .filter(|k| {
                    (1..=MAX_IDEMPOTENCY_KEY_LEN).contains(&k.len())
                        && k.bytes().all(|b| b.is_ascii_graphic())
                })
                .ok_or_else(|| {
                    bad(format!(
                        "Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_LEN} bytes of visible ASCII"
                    ))
                })?;
            Some(format!("api:{}:{k}", key.name))
        }
    };
    if !key.take_publish() {
        return Err(refuse(
            gw,
            ApiError::new(
                ErrorCode::RateLimited,
                format!(
                    "API key {:?} is over {} publishes per second; slow down",
                    key.name, key.publish_rate_per_sec
                ),
            ),
        ));
    }
    let value = LogValue {
        from,
        ts: now_ms(),
        body,
    };
    let started = Instant::now();
    let (turn, _next) = Turn::after(None);
    match publish(gw, &room, &value, idempotency.as_deref(), turn).await {
        Ok(offset) => {
            gw.metrics
                .publish_latency
                .observe(started.elapsed().as_secs_f64());
            tracing::debug!(region = %gw.region, %room, key = %key.name, offset, "server API publish stored");
            Ok(serde_json::json!({"room": room, "origin": gw.region, "offset": offset}))
        }
        Err(e) => {
            tracing::warn!(region = %gw.region, %room, key = %key.name, error = %e, "server API publish not acknowledged");
            let message = match e {
                PublishError::NotStored(_) => "message not stored, try again",
                PublishError::Unknown(_) => "message not acknowledged in time, it may still be stored; retry with the same Idempotency-Key (it is never stored twice)",
                PublishError::InFlight => "an earlier request with this Idempotency-Key is still in flight; retry it in a moment",
            };
            Err(refuse(gw, ApiError::new(ErrorCode::Unavailable, message)))
        }
    }
}

enum BodyError {
    TooLarge,
    Broken(axum::Error),
}

/// The request body, if it is at most `limit` bytes; reading stops at the first byte over.
async fn read_body(request: HttpBody, limit: usize) -> Result<Vec<u8>, BodyError> {
    use futures::StreamExt;
    let mut stream = request.into_data_stream();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(BodyError::Broken)?;
        if out.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
