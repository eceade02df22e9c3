//! The chat page served at `/` when `chat_page` is on (the demo turns it on): one static
//! HTML file that speaks client protocol v1 to `/ws` of the region that served it.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

use super::Gateway;

/// The page itself, compiled into the binary.
pub const CHAT_PAGE: &str = include_str!("chat.html");

/// `GET /`: the page, or a pointer to `/ws` when the page is off.
pub(super) async fn serve(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.chat_page {
        Html(CHAT_PAGE).into_response()
    } else {
        (StatusCode::NOT_FOUND, "dtfed: WebSocket endpoint is /ws\n").into_response()
    }
}
