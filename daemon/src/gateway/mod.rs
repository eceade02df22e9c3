//! The WebSocket gateway: players connect to `/ws`, speak client protocol v1
//! (`docs/PROTOCOL.md`), and each connection runs one [`session`]. Admission (Origin
//! allowlist, connection limit, authentication) happens at the upgrade; [`resume`] replays a
//! room from a cursor; [`publish`] stores a publish with a `ref` at most once; [`limits`]
//! holds the rate limits. [`api`] is the server API for game servers (HTTP, API keys) on
//! the same listener.
//!
//! Close codes the gateway uses (also in `docs/PROTOCOL.md`):
//! 1001 server shutting down, 1002 WebSocket protocol error, 1007 text not UTF-8,
//! 1008 unauthorized or token expired, 1009 frame over the hard size limit,
//! 4001 slow reader (outbound queue full), 4002 flood (frames faster than the flood limit),
//! 4003 idle (nothing received, not even a Pong, within `client.idle_timeout_ms`).
//!
//! Dead connections: the session pings every `client.ping_interval_ms` and closes a
//! connection silent for `client.idle_timeout_ms`; TCP keepalive (see [`TCP_KEEPALIVE_IDLE`])
//! lets the kernel drop a peer that vanished without a FIN.

pub mod api;
pub mod auth;
pub mod chat_page;
pub mod limits;
pub mod publish;
pub mod read_error;
pub mod resume;
pub mod session;
pub mod socket;
pub mod stomp;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::append::KafkaAppender;
use crate::config::ClientConfig;
use crate::metrics::Metrics;
use crate::mirror::watermarks::MarksWatch;
use crate::replay::MirrorReplay;
use crate::replay::RoomLogReader;
use crate::rooms::LocalRooms;
use auth::Authenticator;

/// A connection's read buffer. Players' frames are a few hundred bytes; a larger one grows
/// the buffer as far as it needs (up to the frame limit). Every connection touches this
/// much memory, idle or not: with 4 KiB it was a third of an idle connection's cost.
const READ_BUFFER_BYTES: usize = 1024;

/// Frames fed to a socket are held until the session flushes (once per turn of its loop) or
/// until this many bytes are waiting: a burst of a room's messages leaves in one `sendto`.
/// With 0, tungstenite writes every frame the moment it is fed (one syscall per frame). The
/// buffer grows only as far as a burst needs, so an idle connection does not pay for it.
const WRITE_BUFFER_BYTES: usize = 8 * 1024;

/// TCP keepalive on player connections: the first probe after this much silence, then one
/// every [`TCP_KEEPALIVE_INTERVAL`]; the kernel drops the connection after
/// [`TCP_KEEPALIVE_PROBES`] unanswered probes.
pub const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const TCP_KEEPALIVE_PROBES: u32 = 6;

pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
pub const CLOSE_INVALID_DATA: u16 = 1007;
pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_SLOW_READER: u16 = 4001;
pub const CLOSE_FLOOD: u16 = 4002;
pub const CLOSE_IDLE: u16 = 4003;

/// Everything the sessions of one daemon share.
pub struct Gateway {
    pub region: String,
    pub cfg: ClientConfig,
    pub auth: Authenticator,
    pub rooms: Arc<LocalRooms>,
    pub appender: Arc<KafkaAppender>,
    pub replay: Arc<RoomLogReader>,
    /// Replays other regions' messages from this region's mirror topics (federated only).
    pub mirror_replay: Option<Arc<MirrorReplay>>,
    pub metrics: Arc<Metrics>,
    /// The server API's keys; `None` without `[api]` (then `/api/` is not served).
    pub api: Option<api::ApiKeys>,
    /// Serve the chat page at `/` and its client library at `/dtfed-client/` (demo).
    pub chat_page: bool,
    /// How long a closing session waits for its in-flight publishes.
    pub drain_timeout: Duration,
    /// STOMP at `/stomp` (`[stomp]`).
    pub stomp: Arc<stomp::Stomp>,
    /// The region's replication watermarks (federated only): `synced`'s `origins` and the
    /// `wm` frames come from it.
    pub watermarks: Option<MarksWatch>,
    connections: AtomicUsize,
    next_session: AtomicU64,
    sessions: TaskTracker,
    /// Fired at shutdown: sessions finish their in-flight publishes and close with 1001.
    closing: CancellationToken,
}

impl Gateway {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        region: String,
        cfg: ClientConfig,
        rooms: Arc<LocalRooms>,
        appender: Arc<KafkaAppender>,
        replay: Arc<RoomLogReader>,
        mirror_replay: Option<Arc<MirrorReplay>>,
        metrics: Arc<Metrics>,
        chat_page: bool,
        drain_timeout: Duration,
        api: Option<&api::ApiConfig>,
        stomp: stomp::StompConfig,
        watermarks: Option<MarksWatch>,
    ) -> Arc<Gateway> {
        Arc::new(Gateway {
            auth: Authenticator::new(&cfg),
            region,
            cfg,
            rooms,
            appender,
            replay,
            mirror_replay,
            metrics,
            api: api.map(api::ApiKeys::new),
            chat_page,
            drain_timeout,
            stomp: stomp::Stomp::new(stomp),
            watermarks,
            connections: AtomicUsize::new(0),
            next_session: AtomicU64::new(1),
            sessions: TaskTracker::new(),
            closing: CancellationToken::new(),
        })
    }

    /// Whether `region` is this region or one of its peers: the only origins a player's
    /// cursor may name.
    pub fn knows_region(&self, region: &str) -> bool {
        region == self.region
            || self
                .mirror_replay
                .as_ref()
                .is_some_and(|m| m.origins.contains(region))
    }

    /// Why a player's cursor cannot be used, if it names a region this one does not know.
    /// Made-up origins would be kept per subscription and echoed in every `synced`.
    pub fn foreign_origin(&self, cursor: Option<&dtfed_proto::Cursor>) -> Option<String> {
        let (origin, _) = cursor?.origins().find(|(o, _)| !self.knows_region(o))?;
        Some(format!(
            "cursor names region {origin:?}, which is neither {} nor one of its peers",
            self.region
        ))
    }

    /// The replication watermarks of `room`, per remote origin (empty when not federated).
    pub fn room_marks(&self, room: &dtfed_proto::RoomId) -> dtfed_proto::OriginMarks {
        self.watermarks
            .as_ref()
            .map(|w| w.borrow().for_room(room))
            .unwrap_or_default()
    }

    /// Open WebSocket connections.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Asks every session to finish its in-flight publishes and close, and waits for them.
    pub async fn close_sessions(&self) {
        self.closing.cancel();
        self.sessions.close();
        self.sessions.wait().await;
    }

    pub fn router(self: &Arc<Self>) -> Router {
        let mut router = Router::new()
            .route("/ws", get(upgrade))
            .route("/", get(chat_page::serve))
            .route("/dtfed-client/{file}", get(chat_page::serve_client));
        if self.stomp.config.enabled {
            router = router.route("/stomp", get(stomp::upgrade));
        }
        if self.api.is_some() {
            router = router.merge(api::routes());
        }
        router.with_state(self.clone())
    }

    /// Admission before any upgrade: the Origin allowlist and the connection limit. The
    /// slot is held for as long as the connection lives.
    fn admit(
        self: &Arc<Self>,
        headers: &HeaderMap,
    ) -> Result<ConnectionSlot, (StatusCode, &'static str)> {
        if !self.cfg.allowed_origins.is_empty() {
            if let Some(origin) = headers.get(header::ORIGIN) {
                let allowed = origin
                    .to_str()
                    .map(|o| self.cfg.allowed_origins.iter().any(|a| a == o))
                    .unwrap_or(false);
                if !allowed {
                    self.metrics.closed("origin");
                    return Err((StatusCode::FORBIDDEN, "origin not allowed\n"));
                }
            }
        }
        let previous = self.connections.fetch_add(1, Ordering::AcqRel);
        if previous >= self.cfg.max_connections {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            self.metrics.closed("max_connections");
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections, retry later\n",
            ));
        }
        Ok(ConnectionSlot(self.clone()))
    }

    /// Completes an admitted upgrade with the gateway's socket limits and runs `session`
    /// on it, tracked so shutdown waits for it.
    fn upgrade_socket<F, Fut>(self: &Arc<Self>, ws: WebSocketUpgrade, session: F) -> Response
    where
        F: FnOnce(Arc<Gateway>, u64, axum::extract::ws::WebSocket) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        // Frames up to max_frame_bytes are read and answered `too_large` if over it; beyond
        // the hard limit the socket cannot buffer them and the connection closes with 1009.
        let hard = self
            .cfg
            .max_frame_bytes
            .saturating_mul(2)
            .max(self.cfg.max_frame_bytes + 1024);
        let tracker = self.sessions.clone();
        let gw = self.clone();
        ws.max_message_size(hard)
            .max_frame_size(hard)
            .read_buffer_size(READ_BUFFER_BYTES)
            .write_buffer_size(WRITE_BUFFER_BYTES)
            // Above the write buffer, or tungstenite panics (it did, for every connection,
            // with a max_frame_bytes of 1 KiB or less).
            .max_write_buffer_size(hard.saturating_mul(4).max(2 * WRITE_BUFFER_BYTES))
            .on_upgrade(move |socket| tracker.track_future(session(gw, id, socket)))
    }
}

/// Serves the gateway on `listener` until `stop` fires (then stops accepting).
pub async fn serve(
    gw: Arc<Gateway>,
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        // Nagle plus delayed ACKs add ~20 ms to small frames.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(TCP_KEEPALIVE_IDLE)
            .with_interval(TCP_KEEPALIVE_INTERVAL)
            .with_retries(TCP_KEEPALIVE_PROBES);
        if let Err(e) = socket2::SockRef::from(&*tcp).set_tcp_keepalive(&keepalive) {
            tracing::debug!(error = %e, "SO_KEEPALIVE");
        }
    });
    axum::serve(
        listener,
        gw.router()
            .into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { stop.cancelled().await })
    .await
}

async fn upgrade(
    State(gw): State<Arc<Gateway>>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let slot = match gw.admit(&headers) {
        Ok(slot) => slot,
        Err(refused) => return refused.into_response(),
    };
    let player = gw.auth.authenticate(
        params.get("name").map(String::as_str),
        params.get("token").map(String::as_str),
    );
    gw.upgrade_socket(ws, move |gw, id, socket| async move {
        let _slot = slot;
        session::run(gw, id, socket, player).await;
    })
}

/// Releases a connection slot when the connection ends, however it ends.
struct ConnectionSlot(Arc<Gateway>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}
