//! [`RegionEndpoint`]: one QUIC endpoint per region daemon that both accepts links from
//! peer regions and dials them, yielding only authenticated, allowed peers.
//!
//! Link setup, on top of the mutual-TLS handshake of [`crate::tls`]:
//!
//! 1. The dialling side verifies during the handshake that the server is the region it
//!    dialled (TLS server name `<region>.dtfed.region`).
//! 2. The accepting side reads the client's region from its certificate and, when it is
//!    not an allowed peer, closes the connection with [`CLOSE_REGION_NOT_ALLOWED`] and a
//!    reason (and logs `refused peer`).
//! 3. Otherwise the accepting side opens a unidirectional stream, writes [`WELCOME`] and
//!    finishes it. The dialling side waits for it: in TLS 1.3 the client finishes its
//!    handshake before the server has looked at the client certificate, so without this
//!    step `connect` could report success for a link the peer is about to refuse. With it,
//!    `connect` returns `Ok` only once the peer has accepted us, and a refusal comes back
//!    as [`LinkError::RefusedByPeer`] or [`LinkError::OurCertificateRejected`].
//!
//! The welcome stream is consumed here; the first stream the mirror protocol sees on a
//! [`PeerConnection`] is its own. Handshakes on the accepting side run concurrently (one
//! task each, bounded by [`LinkTuning::max_pending_handshakes`]), so a slow or hostile
//! peer cannot hold up the others. Shutdown goes through a [`CancellationToken`]: on
//! [`RegionEndpoint::close`] or when the last handle is dropped.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use quinn::TransportConfig;
use rustls::client::WebPkiServerVerifier;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::error::LinkError;
use crate::tls::{self, LinkTuning, RegionIdentity, Verdict};
use crate::topology::valid_region_name;

pub use crate::error::{
    CLOSE_BAD_CERTIFICATE, CLOSE_PROTOCOL, CLOSE_REGION_NOT_ALLOWED, CLOSE_SHUTDOWN,
    CLOSE_WRONG_REGION,
};

/// What the accepting side sends on its first unidirectional stream once it has accepted
/// the peer.
pub const WELCOME: &[u8] = b"dtfed-link/1 welcome\n";

/// An established link to an authenticated, allowed peer region.
#[derive(Debug, Clone)]
pub struct PeerConnection {
    region: Arc<str>,
    connection: quinn::Connection,
}

impl PeerConnection {
    /// The peer's region, as its certificate names it.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The QUIC connection, to open and accept streams on.
    pub fn connection(&self) -> &quinn::Connection {
        &self.connection
    }

    /// The QUIC connection, taking it out.
    pub fn into_connection(self) -> quinn::Connection {
        self.connection
    }

    /// Current smoothed round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.connection.rtt()
    }

    /// The peer's UDP address.
    pub fn remote_address(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    /// Closes the link with [`CLOSE_SHUTDOWN`] and `reason`.
    pub fn close(&self, reason: &str) {
        self.connection.close(CLOSE_SHUTDOWN, reason.as_bytes());
    }

    /// Resolves when the link is closed, with why.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.connection.closed().await
    }
}

/// A region's QUIC endpoint: serves links to allowed peers and dials them. Cheap to clone;
/// shut down by [`close`](Self::close) or when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct RegionEndpoint {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    identity: RegionIdentity,
    endpoint: quinn::Endpoint,
    server_verifier: Arc<WebPkiServerVerifier>,
    transport: Arc<TransportConfig>,
    tuning: LinkTuning,
    allowed: Arc<RwLock<HashSet<String>>>,
    accepted: tokio::sync::Mutex<mpsc::Receiver<Result<PeerConnection, LinkError>>>,
    cancel: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl RegionEndpoint {
    /// Binds `listen` (UDP) with the default [`LinkTuning`]. `allowed_peers` are the region
    /// names that may link with us, both ways.
    pub fn bind(
        listen: SocketAddr,
        identity: RegionIdentity,
        allowed_peers: Vec<String>,
    ) -> Result<RegionEndpoint, LinkError> {
        RegionEndpoint::bind_with(listen, identity, allowed_peers, LinkTuning::default())
    }

    /// [`bind`](Self::bind) with explicit tuning. Must run inside a tokio runtime.
    pub fn bind_with(
        listen: SocketAddr,
        identity: RegionIdentity,
        allowed_peers: Vec<String>,
        tuning: LinkTuning,
    ) -> Result<RegionEndpoint, LinkError> {
        identity.check()?;
        let allowed = check_peers(&identity.region, allowed_peers)?;
        let transport = Arc::new(tuning.transport_config()?);
        let server_config = tls::server_config(&identity, transport.clone())?;
        let server_verifier = tls::server_verifier(&identity)?;
        let socket = std::net::UdpSocket::bind(listen).map_err(LinkError::Bind)?;
        match tls::set_udp_buffers(&socket, tuning.socket_buffer_bytes) {
            Ok((recv, send)) => debug!(
                asked = tuning.socket_buffer_bytes,
                recv, send, "region endpoint UDP socket buffers"
            ),
            Err(e) => warn!(error = %e, "cannot size the region endpoint's UDP socket buffers"),
        }
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(LinkError::Bind)?;
        let allowed = Arc::new(RwLock::new(allowed));
        let cancel = CancellationToken::new();
        // Small: accepted links wait here until the application takes them.
        let (tx, rx) = mpsc::channel(16);
        let acceptor = Acceptor {
            local_region: identity.region.clone(),
            endpoint: endpoint.clone(),
            allowed: allowed.clone(),
            handshake_timeout: tuning.handshake_timeout,
            max_pending: tuning.max_pending_handshakes,
            tx,
            cancel: cancel.clone(),
        };
        tokio::spawn(acceptor.run());
        info!(
            region = %identity.region,
            listen = %endpoint.local_addr().map_err(LinkError::Bind)?,
            "region endpoint up"
        );
        Ok(RegionEndpoint {
            inner: Arc::new(Inner {
                identity,
                endpoint,
                server_verifier,
                transport,
                tuning,
                allowed,
                accepted: tokio::sync::Mutex::new(rx),
                cancel,
            }),
        })
    }

    /// The next peer that connected to us and passed authentication and the allow list,
    /// or why one did not (the refusal is also logged); `None` once the endpoint is closed.
    /// Callers typically log errors and keep accepting.
    pub async fn accept(&self) -> Option<Result<PeerConnection, LinkError>> {
        self.inner.accepted.lock().await.recv().await
    }

    /// Dials region `expected_region` at `addr`. Returns once the peer has proved to be that
    /// region and has accepted us.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expected_region: &str,
    ) -> Result<PeerConnection, LinkError> {
        if !valid_region_name(expected_region) {
            return Err(LinkError::InvalidRegionName(expected_region.to_owned()));
        }
        if !self.is_allowed(expected_region) {
            return Err(LinkError::RegionNotAllowed {
                region: expected_region.to_owned(),
            });
        }
        if self.inner.cancel.is_cancelled() {
            return Err(LinkError::Closed);
        }
        let inner = &self.inner;
        let verdict = Verdict::default();
        let config = tls::client_config(
            &inner.identity,
            inner.server_verifier.clone(),
            expected_region,
            verdict.clone(),
            inner.transport.clone(),
        )?;
        let connecting =
            inner
                .endpoint
                .connect_with(config, addr, &tls::dial_name(expected_region)?)?;
        let setup = async {
            let connection = match connecting.await {
                Ok(c) => c,
                Err(e) => {
                    return Err(tls::take_verdict(&verdict)
                        .unwrap_or_else(|| LinkError::from_connection(e)))
                }
            };
            // The verifier checked the name already; check again on what we hand out.
            let region = match tls::peer_region(&connection) {
                Ok(region) if region == expected_region => region,
                Ok(found) => {
                    let err = LinkError::WrongRegion {
                        expected: expected_region.to_owned(),
                        found,
                    };
                    connection.close(CLOSE_WRONG_REGION, err.to_string().as_bytes());
                    return Err(err);
                }
                Err(err) => {
                    connection.close(CLOSE_BAD_CERTIFICATE, err.to_string().as_bytes());
                    return Err(err);
                }
            };
            if let Err(err) = await_welcome(&connection).await {
                if matches!(err, LinkError::Protocol(_)) {
                    connection.close(CLOSE_PROTOCOL, err.to_string().as_bytes());
                }
                return Err(err);
            }
            Ok(PeerConnection {
                region: region.into(),
                connection,
            })
        };
        let after = inner.tuning.handshake_timeout;
        let result = tokio::time::timeout(after, setup)
            .await
            .unwrap_or(Err(LinkError::Timeout { peer: addr, after }));
        match &result {
            Ok(link) => info!(
                peer = %addr,
                region = %link.region(),
                rtt_ms = link.rtt().as_millis() as u64,
                "link up (dialled)"
            ),
            Err(err) => {
                warn!(peer = %addr, region = %expected_region, error = %err, "link setup failed")
            }
        }
        result
    }

    /// This region's name.
    pub fn region(&self) -> &str {
        &self.inner.identity.region
    }

    /// The UDP address the endpoint is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.endpoint.local_addr()
    }

    /// The tuning in force.
    pub fn tuning(&self) -> &LinkTuning {
        &self.inner.tuning
    }

    /// Whether `region` is an allowed peer.
    pub fn is_allowed(&self, region: &str) -> bool {
        self.inner
            .allowed
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(region)
    }

    /// Replaces the allowed peers (topology reload). Applies to links set up from now on;
    /// established links of removed peers are left to the caller to close.
    pub fn set_allowed_peers(&self, peers: Vec<String>) -> Result<(), LinkError> {
        let peers = check_peers(&self.inner.identity.region, peers)?;
        *self
            .inner
            .allowed
            .write()
            .unwrap_or_else(PoisonError::into_inner) = peers;
        Ok(())
    }

    /// Stops accepting and closes every link with [`CLOSE_SHUTDOWN`].
    pub fn close(&self) {
        self.inner.cancel.cancel();
        self.inner
            .endpoint
            .close(CLOSE_SHUTDOWN, b"region endpoint shutting down");
    }

    /// Waits until every connection is closed and drained (after [`close`](Self::close)).
    pub async fn wait_idle(&self) {
        self.inner.endpoint.wait_idle().await;
    }
}

fn check_peers(local: &str, peers: Vec<String>) -> Result<HashSet<String>, LinkError> {
    for peer in &peers {
        if !valid_region_name(peer) {
            return Err(LinkError::InvalidRegionName(peer.clone()));
        }
        if peer == local {
            return Err(LinkError::Config(format!(
                "region {local} cannot be its own peer"
            )));
        }
    }
    Ok(peers.into_iter().collect())
}

/// Waits for the accepting side's [`WELCOME`].
async fn await_welcome(connection: &quinn::Connection) -> Result<(), LinkError> {
    let mut stream = connection
        .accept_uni()
        .await
        .map_err(LinkError::from_connection)?;
    let welcome = stream
        .read_to_end(WELCOME.len())
        .await
        .map_err(|e| match e {
            quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(e)) => {
                LinkError::from_connection(e)
            }
            quinn::ReadToEndError::TooLong => {
                LinkError::Protocol("the peer's welcome is too long".into())
            }
            other => LinkError::Stream(other.to_string()),
        })?;
    if welcome != WELCOME {
        return Err(LinkError::Protocol(
            "the peer did not send the region link welcome".into(),
        ));
    }
    Ok(())
}

/// Accepts incoming connections and runs their link setup concurrently.
struct Acceptor {
    local_region: String,
    endpoint: quinn::Endpoint,
    allowed: Arc<RwLock<HashSet<String>>>,
    handshake_timeout: Duration,
    max_pending: usize,
    tx: mpsc::Sender<Result<PeerConnection, LinkError>>,
    cancel: CancellationToken,
}

impl Acceptor {
    async fn run(self) {
        let mut handshakes = JoinSet::new();
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => break,
                Some(done) = handshakes.join_next(), if !handshakes.is_empty() => {
                    if let Err(e) = done {
                        warn!(error = %e, "link handshake task failed");
                    }
                }
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let peer = incoming.remote_address();
                    if handshakes.len() >= self.max_pending {
                        warn!(peer = %peer, pending = handshakes.len(), "too many link handshakes in progress, refusing");
                        incoming.refuse();
                        continue;
                    }
                    let admit = Admit {
                        local_region: self.local_region.clone(),
                        allowed: self.allowed.clone(),
                        handshake_timeout: self.handshake_timeout,
                    };
                    let tx = self.tx.clone();
                    let cancel = self.cancel.clone();
                    handshakes.spawn(async move {
                        let result = admit.run(incoming).await;
                        tokio::select! {
                            () = cancel.cancelled() => {}
                            _ = tx.send(result) => {}
                        }
                    });
                }
            }
        }
        debug!(region = %self.local_region, "region endpoint acceptor stopped");
    }
}

/// Link setup of one incoming connection.
struct Admit {
    local_region: String,
    allowed: Arc<RwLock<HashSet<String>>>,
    handshake_timeout: Duration,
}

impl Admit {
    async fn run(self, incoming: quinn::Incoming) -> Result<PeerConnection, LinkError> {
        let peer = incoming.remote_address();
        let after = self.handshake_timeout;
        let result = tokio::time::timeout(after, self.setup(incoming))
            .await
            .unwrap_or(Err(LinkError::Timeout { peer, after }));
        match &result {
            Ok(link) => info!(
                peer = %peer,
                region = %link.region(),
                rtt_ms = link.rtt().as_millis() as u64,
                "link up (accepted)"
            ),
            Err(LinkError::RegionNotAllowed { region }) => {
                warn!(peer = %peer, region = %region, "refused peer");
            }
            Err(
                err @ (LinkError::NotSignedByCa { .. }
                | LinkError::BadCertificate { .. }
                | LinkError::NoRegionInCertificate),
            ) => warn!(peer = %peer, error = %err, "refused peer"),
            // The dialler dropped this attempt because an overlapping one won (the mirror
            // client overlaps dials, see `mirror::client`): expected, not a fault.
            Err(LinkError::Connection(quinn::ConnectionError::ConnectionClosed(close)))
                if close.error_code == quinn::TransportErrorCode::APPLICATION_ERROR =>
            {
                debug!(peer = %peer, "incoming link abandoned by the dialler during setup");
            }
            Err(err) => warn!(peer = %peer, error = %err, "incoming link setup failed"),
        }
        result
    }

    async fn setup(&self, incoming: quinn::Incoming) -> Result<PeerConnection, LinkError> {
        let connection = incoming
            .accept()
            .map_err(LinkError::from_connection)?
            .await
            .map_err(LinkError::from_connection)?;
        let region = match tls::peer_region(&connection) {
            Ok(region) => region,
            Err(err) => {
                connection.close(CLOSE_BAD_CERTIFICATE, err.to_string().as_bytes());
                return Err(err);
            }
        };
        let allowed = self
            .allowed
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&region);
        if !allowed {
            let reason = format!(
                "region {region} is not an allowed peer of region {}",
                self.local_region
            );
            connection.close(CLOSE_REGION_NOT_ALLOWED, reason.as_bytes());
            return Err(LinkError::RegionNotAllowed { region });
        }
        let mut welcome = connection
            .open_uni()
            .await
            .map_err(LinkError::from_connection)?;
        welcome.write_all(WELCOME).await.map_err(|e| match e {
            quinn::WriteError::ConnectionLost(e) => LinkError::from_connection(e),
            other => LinkError::Stream(other.to_string()),
        })?;
        welcome
            .finish()
            .map_err(|e| LinkError::Stream(e.to_string()))?;
        Ok(PeerConnection {
            region: region.into(),
            connection,
        })
    }
}
