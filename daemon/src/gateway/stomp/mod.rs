//! STOMP 1.0–1.2 over WebSocket at `/stomp` (`docs/PROTOCOL.md`, "STOMP"), for clients
//! that speak STOMP (`@stomp/stompjs`, Spring's clients) rather than client protocol v1.
//!
//! [`frame`] is the wire format (`dtfed_proto::stomp`: a bounded, sans-IO decoder and the
//! encoder),
//! [`destinations`] the `[stomp]` config and its destination → room table, [`translate`]
//! messages to frames and back, and [`session`] one connection, driving the same rooms, publish, resume and limits as the v1 session.
//! Admission (Origin allowlist, connection limit) is the v1 upgrade's; authentication comes
//! with the `CONNECT` frame.

pub mod destinations;
pub mod session;
pub mod translate;

/// The frame codec lives with the other wire formats, sans IO, in `dtfed-proto`.
pub use dtfed_proto::stomp as frame;

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use super::Gateway;
pub use destinations::{DestinationTable, StompConfig};

/// The WebSocket subprotocols a STOMP client may ask for, best first.
pub const SUBPROTOCOLS: [&str; 3] = ["v12.stomp", "v11.stomp", "v10.stomp"];

/// What STOMP sessions share: the config and its table.
#[derive(Debug)]
pub struct Stomp {
    pub config: StompConfig,
    pub table: DestinationTable,
}

impl Stomp {
    pub fn new(config: StompConfig) -> Arc<Stomp> {
        Arc::new(Stomp {
            table: config.table(),
            config,
        })
    }
}

/// `GET /stomp`: admits the connection like `/ws`, then runs a STOMP session.
pub async fn upgrade(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let slot = match gw.admit(&headers) {
        Ok(slot) => slot,
        Err(refused) => return refused.into_response(),
    };
    let stomp = gw.stomp.clone();
    gw.upgrade_socket(
        ws.protocols(SUBPROTOCOLS),
        move |gw, id, socket| async move {
            let _slot = slot;
            session::run(gw, stomp, id, socket).await;
        },
    )
}
