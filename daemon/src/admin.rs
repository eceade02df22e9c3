//! The operator's HTTP surface (loopback by default): `/healthz` (the process is up),
//! `/readyz` (Kafka group joined, bus reachable, not draining), `/metrics` (Prometheus) and
//! `/status` (JSON, what `dtfed status` prints).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::fanout::{FanoutOwner, FanoutStatus};
use crate::gateway::Gateway;
use crate::metrics::Metrics;

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

async fn metrics(State(s): State<Arc<AdminState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

async fn status(State(s): State<Arc<AdminState>>) -> Json<Status> {
    Json(Status {
        region: s.region.clone(),
        node: s.node.clone(),
        draining: s.draining.is_cancelled(),
        clients: s.gateway.connections(),
        rooms: s.gateway.rooms.room_count(),
        fanout: s.fanout_status(),
    })
}
