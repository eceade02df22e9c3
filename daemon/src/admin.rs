//! The operator's HTTP surface (loopback by default): `/healthz` (the process is up),
//! `/readyz` (Kafka groups joined, bus reachable, not draining), `/metrics` (Prometheus),
//! `/status` (JSON, what `dtfed status` prints), and for failover drills
//! `POST /peers/<region>/pause`, `POST /peers/<region>/resume` and `POST /drain` (the
//! daemon drains as on SIGTERM, handing its partitions and mirror tasks over, and exits).
//!
//! Who may ask what: the probes (`/healthz`, `/readyz`) are always open, since a kubelet or
//! a load balancer carries no credentials. When `admin.token` is set, `/status` and
//! `/metrics` need it as a bearer token (they name rooms' partitions, peers and load);
//! without a token they are open, which the config allows only on a loopback listener.
//! The drill endpoints change state, so they need the token and are disabled without one.
//!
//! The divergence check's reading endpoints, `/admin/rooms/{room}/watermarks` and
//! `/admin/rooms/{room}/digest`, are in `crate::verify::endpoints`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::fanout::{FanoutOwner, FanoutStatus};
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::mirror::{Federation, LinkView, MirrorView};
use crate::verify::endpoints as verify;
use crate::verify::reader::RoomDigests;

/// What the admin endpoints look at.
pub struct AdminState {
    pub region: String,
    pub node: String,
    pub metrics: Arc<Metrics>,
    pub gateway: Arc<Gateway>,
    pub bus: Arc<dyn Bus>,
    pub fanout: Arc<Mutex<Option<FanoutOwner>>>,
    /// Cancelled once the daemon drains.
    pub draining: CancellationToken,
    /// Bearer token for endpoints that change state; empty disables them.
    pub admin_token: String,
    pub federation: Option<Arc<Federation>>,
    /// Cancelled by `POST /drain`; `None` where a drain cannot be asked for (the demo).
    pub drain_requested: Option<CancellationToken>,
    /// Digests of the logs this region holds (`dtfed verify`).
    pub digests: Arc<RoomDigests>,
}

/// `/status` as JSON.
#[derive(Debug, Serialize)]
pub struct Status {
    pub region: String,
    pub node: String,
    pub draining: bool,
    pub clients: usize,
    pub rooms: usize,
    pub fanout: FanoutStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub links: Option<Vec<LinkView>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Vec<MirrorView>>,
}

impl AdminState {
    fn fanout_status(&self) -> FanoutStatus {
        self.fanout
            .lock()
            .ok()
            .and_then(|f| f.as_ref().map(FanoutOwner::status))
            .unwrap_or_default()
    }
}

pub async fn serve(state: Arc<AdminState>, listener: TcpListener, stop: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/peers/{region}/pause", post(pause_peer))
        .route("/peers/{region}/resume", post(resume_peer))
        .route("/drain", post(drain))
        .route("/admin/rooms/{room}/watermarks", get(verify::watermarks))
        .route("/admin/rooms/{room}/digest", get(verify::digest))
        .with_state(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "admin listener failed");
    }
}

async fn readyz(State(s): State<Arc<AdminState>>) -> Response {
    let mut problems = Vec::new();
    if s.draining.is_cancelled() {
        problems.push("draining".to_owned());
    }
    if !s.fanout_status().joined {
        problems.push("fan-out group not joined yet".to_owned());
    }
    if s.federation.as_ref().is_some_and(|f| !f.joined()) {
        problems.push("mirror task group not joined yet".to_owned());
    }
    match tokio::time::timeout(Duration::from_secs(2), s.bus.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => problems.push(format!("bus: {e}")),
        Err(_) => problems.push("bus: no answer within 2 s".to_owned()),
    }
    if problems.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    if let Err(denied) = may_read(&s, &headers) {
        return denied.into_response();
    }
    let mut text = s.metrics.encode();
    if let Some(f) = &s.federation {
        crate::mirror::metrics::append(&mut text, &s.region, &f.links(), &f.mirror());
        f.digest_checks.append(&mut text, &s.region);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn status(State(s): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    if let Err(denied) = may_read(&s, &headers) {
        return denied.into_response();
    }
    Json(Status {
        region: s.region.clone(),
        node: s.node.clone(),
        draining: s.draining.is_cancelled(),
        clients: s.gateway.connections(),
        rooms: s.gateway.rooms.room_count(),
        fanout: s.fanout_status(),
        links: s.federation.as_ref().map(|f| f.links()),
        mirror: s.federation.as_ref().map(|f| f.mirror()),
    })
    .into_response()
}

/// Why a state-changing request is refused.
pub(crate) enum Denied {
    NoToken,
    BadToken,
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        match self {
            Denied::NoToken => (
                StatusCode::FORBIDDEN,
                "admin.token is not set: state-changing endpoints are disabled\n",
            )
                .into_response(),
            Denied::BadToken => {
                (StatusCode::UNAUTHORIZED, "bad or missing bearer token\n").into_response()
            }
        }
    }
}

/// Reading endpoints: open without a token (loopback only, see the config), else bearer.
pub(crate) fn may_read(s: &AdminState, headers: &HeaderMap) -> Result<(), Denied> {
    if s.admin_token.is_empty() {
        Ok(())
    } else {
        authorized(s, headers)
    }
}

fn authorized(s: &AdminState, headers: &HeaderMap) -> Result<(), Denied> {
    if s.admin_token.is_empty() {
        return Err(Denied::NoToken);
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compare in constant time: the token guards failover drills.
    let ok = given.is_some_and(|g| {
        g.len() == s.admin_token.len()
            && g.bytes()
                .zip(s.admin_token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if ok {
        Ok(())
    } else {
        Err(Denied::BadToken)
    }
}

async fn drain(State(s): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    if let Err(denied) = authorized(&s, &headers) {
        return denied.into_response();
    }
    let Some(drain) = &s.drain_requested else {
        return (
            StatusCode::NOT_FOUND,
            "this daemon cannot be drained on its own (it is part of a demo)\n",
        )
            .into_response();
    };
    tracing::warn!("drain asked for by an operator");
    drain.cancel();
    (
        StatusCode::ACCEPTED,
        "draining: partitions and mirror tasks move to the region's other daemons, then this one exits\n",
    )
        .into_response()
}

async fn pause_peer(
    State(s): State<Arc<AdminState>>,
    Path(region): Path<String>,
    headers: HeaderMap,
) -> Response {
    peer_switch(&s, &region, &headers, true)
}

async fn resume_peer(
    State(s): State<Arc<AdminState>>,
    Path(region): Path<String>,
    headers: HeaderMap,
) -> Response {
    peer_switch(&s, &region, &headers, false)
}

fn peer_switch(s: &AdminState, region: &str, headers: &HeaderMap, pause: bool) -> Response {
    if let Err(denied) = authorized(s, headers) {
        return denied.into_response();
    }
    let Some(f) = &s.federation else {
        return (StatusCode::NOT_FOUND, "this daemon is not federated\n").into_response();
    };
    let known = if pause {
        f.pause_peer(region)
    } else {
        f.resume_peer(region)
    };
    if !known {
        return (StatusCode::NOT_FOUND, format!("no peer region {region}\n")).into_response();
    }
    let what = if pause { "paused" } else { "resumed" };
    tracing::warn!(peer = region, "peer link {what} by an operator");
    (StatusCode::OK, format!("{region} {what}\n")).into_response()
}
