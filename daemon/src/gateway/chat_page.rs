//! The chat page served at `/` when the chat page is on (the demo turns it on, or
//! `client.chat_page`): one static HTML file that speaks client protocol v1 through
//! `@dtfed/client` (`clients/js/src/`), which is served from `/dtfed-client/<file>.js`.
//! Both are compiled into the binary.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};

use super::Gateway;

/// The page itself.
pub const CHAT_PAGE: &str = include_str!("chat.html");

/// The ES modules of `@dtfed/client`, by file name (the page imports `index.js`).
const CLIENT_FILES: [(&str, &str); 5] = [
    ("index.js", include_str!("../../../clients/js/src/index.js")),
    (
        "client.js",
        include_str!("../../../clients/js/src/client.js"),
    ),
    (
        "cursor.js",
        include_str!("../../../clients/js/src/cursor.js"),
    ),
    (
        "reconnect.js",
        include_str!("../../../clients/js/src/reconnect.js"),
    ),
    (
        "stores.js",
        include_str!("../../../clients/js/src/stores.js"),
    ),
];

/// `GET /`: the page, or a pointer to `/ws` when the page is off.
pub(super) async fn serve(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.chat_page {
        Html(CHAT_PAGE).into_response()
    } else {
        (StatusCode::NOT_FOUND, "dtfed: WebSocket endpoint is /ws\n").into_response()
    }
}

/// `GET /dtfed-client/<file>`: one module of the client library, when the page is on.
pub(super) async fn serve_client(
    State(gw): State<Arc<Gateway>>,
    Path(file): Path<String>,
) -> Response {
    match CLIENT_FILES.iter().find(|(name, _)| *name == file) {
        Some((_, text)) if gw.chat_page => (
            [
                (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *text,
        )
            .into_response(),
        _ => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}
