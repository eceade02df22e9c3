//! [`LinkError`]: everything that can go wrong setting up a region link, with messages an
//! operator can act on, and the mapping from QUIC/TLS connection errors to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use quinn::{ConnectionError, TransportErrorCode, VarInt};

/// Application close code: normal shutdown of a link or endpoint.
pub const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(0);
/// Application close code: the peer's region is not an allowed peer of ours.
pub const CLOSE_REGION_NOT_ALLOWED: VarInt = VarInt::from_u32(0x100);
/// Application close code: the peer is not the region we dialled.
pub const CLOSE_WRONG_REGION: VarInt = VarInt::from_u32(0x101);
/// Application close code: the peer's certificate names no usable region.
pub const CLOSE_BAD_CERTIFICATE: VarInt = VarInt::from_u32(0x102);
/// Application close code: the peer broke the link setup protocol.
pub const CLOSE_PROTOCOL: VarInt = VarInt::from_u32(0x103);

/// Whether an application close code is one of the link-setup refusals above.
pub(crate) fn is_refusal(code: VarInt) -> bool {
    (0x100..=0x103).contains(&code.into_inner())
}

/// Why a region link could not be set up (or was refused).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The peer's certificate does not chain to the federation CA we trust.
    #[error("peer certificate is not signed by the federation CA ({detail})")]
    NotSignedByCa { detail: String },
    /// The peer's certificate chains to the CA but is unusable (expired, wrong key usage,
    /// malformed, several regions, ...).
    #[error("peer certificate is invalid: {detail}")]
    BadCertificate { detail: String },
    /// The peer's certificate has no `<region>.dtfed.region` name.
    #[error("peer certificate names no region (expected a DNS name `<region>.dtfed.region`)")]
    NoRegionInCertificate,
    /// The peer's certificate is valid but names a region that is not one of our peers.
    #[error("peer certificate names region {region}, which is not an allowed peer")]
    RegionNotAllowed { region: String },
    /// We dialled region `expected` and reached a (valid) region with another name.
    #[error("expected region {expected}, peer certificate names {found}")]
    WrongRegion { expected: String, found: String },
    /// The peer's TLS stack rejected our certificate (different CA, expired, ...).
    #[error("the peer rejected our certificate: {detail}")]
    OurCertificateRejected { detail: String },
    /// The peer completed TLS but refused the link (typically: our region is not one of its
    /// peers).
    #[error("the peer refused the link: {reason}")]
    RefusedByPeer { code: u64, reason: String },
    /// The peer does not speak the region-link protocol (ALPN or welcome mismatch).
    #[error("region link protocol error: {0}")]
    Protocol(String),
    /// A region name that cannot be one (see [`crate::topology::valid_region_name`]).
    #[error("`{0}` is not a valid region name")]
    InvalidRegionName(String),
    /// Link setup (QUIC + TLS handshake and the welcome) took too long.
    #[error("link setup with {peer} timed out after {after:?}")]
    Timeout { peer: SocketAddr, after: Duration },
    /// Our own identity (CA, certificate, key) is unusable.
    #[error("local identity: {0}")]
    Identity(String),
    /// A file of our identity could not be read.
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TLS or QUIC configuration could not be built.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The QUIC endpoint could not start a connection.
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The QUIC connection failed for a reason not covered above.
    #[error("connection failed: {0}")]
    Connection(ConnectionError),
    /// A stream failed during link setup.
    #[error("link setup stream failed: {0}")]
    Stream(String),
    /// Binding the UDP socket failed.
    #[error("cannot bind the QUIC endpoint: {0}")]
    Bind(#[source] std::io::Error),
    /// The endpoint was closed.
    #[error("the region endpoint is closed")]
    Closed,
}

/// TLS alert codes (RFC 8446 §6) that QUIC reports as `CRYPTO_ERROR (0x100 + alert)`.
mod alert {
    pub const BAD_CERTIFICATE: u8 = 42;
    pub const UNSUPPORTED_CERTIFICATE: u8 = 43;
    pub const CERTIFICATE_EXPIRED: u8 = 45;
    pub const CERTIFICATE_UNKNOWN: u8 = 46;
    pub const UNKNOWN_CA: u8 = 48;
    pub const ACCESS_DENIED: u8 = 49;
    pub const DECRYPT_ERROR: u8 = 51;
    pub const CERTIFICATE_REQUIRED: u8 = 116;
    pub const NO_APPLICATION_PROTOCOL: u8 = 120;
}

/// The TLS alert inside a QUIC `CRYPTO_ERROR` code.
fn tls_alert(code: TransportErrorCode) -> Option<u8> {
    let raw = u64::from(code);
    (0x100..=0x1ff)
        .contains(&raw)
        .then(|| u8::try_from(raw - 0x100).ok())
        .flatten()
}

impl LinkError {
    /// Classifies a failed QUIC connection: our own TLS verdict on the peer's certificate
    /// (local `TransportError`), the peer's verdict on ours (remote `ConnectionClosed`), or
    /// a refusal by the peer's link layer (`ApplicationClosed` with one of our close codes).
    pub(crate) fn from_connection(err: ConnectionError) -> LinkError {
        match &err {
            ConnectionError::TransportError(te) => match tls_alert(te.code) {
                Some(alert::UNKNOWN_CA) => LinkError::NotSignedByCa {
                    detail: te.reason.clone(),
                },
                Some(alert::NO_APPLICATION_PROTOCOL) => {
                    LinkError::Protocol(format!("peer does not speak the region link: {te}"))
                }
                Some(
                    alert::BAD_CERTIFICATE
                    | alert::UNSUPPORTED_CERTIFICATE
                    | alert::CERTIFICATE_EXPIRED
                    | alert::CERTIFICATE_UNKNOWN
                    | alert::DECRYPT_ERROR
                    | alert::CERTIFICATE_REQUIRED,
                ) => LinkError::BadCertificate {
                    detail: te.reason.clone(),
                },
                _ => LinkError::Connection(err),
            },
            ConnectionError::ConnectionClosed(close) => match tls_alert(close.error_code) {
                Some(alert::NO_APPLICATION_PROTOCOL) => {
                    LinkError::Protocol(format!("peer does not speak the region link: {close}"))
                }
                Some(
                    alert::UNKNOWN_CA
                    | alert::BAD_CERTIFICATE
                    | alert::UNSUPPORTED_CERTIFICATE
                    | alert::CERTIFICATE_EXPIRED
                    | alert::CERTIFICATE_UNKNOWN
                    | alert::ACCESS_DENIED
                    | alert::DECRYPT_ERROR
                    | alert::CERTIFICATE_REQUIRED,
                ) => LinkError::OurCertificateRejected {
                    detail: close.to_string(),
                },
                _ => LinkError::Connection(err),
            },
            ConnectionError::ApplicationClosed(close) if is_refusal(close.error_code) => {
                LinkError::RefusedByPeer {
                    code: close.error_code.into_inner(),
                    reason: String::from_utf8_lossy(&close.reason).into_owned(),
                }
            }
            ConnectionError::LocallyClosed => LinkError::Closed,
            _ => LinkError::Connection(err),
        }
    }

    /// Whether this error is about identities (certificates, regions) rather than the
    /// network: retrying will not help until someone fixes a certificate or the topology.
    pub fn is_identity_error(&self) -> bool {
        matches!(
            self,
            LinkError::NotSignedByCa { .. }
                | LinkError::BadCertificate { .. }
                | LinkError::NoRegionInCertificate
                | LinkError::RegionNotAllowed { .. }
                | LinkError::WrongRegion { .. }
                | LinkError::OurCertificateRejected { .. }
                | LinkError::RefusedByPeer { .. }
                | LinkError::InvalidRegionName(_)
                | LinkError::Identity(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_are_read_from_crypto_codes() {
        assert_eq!(tls_alert(TransportErrorCode::crypto(48)), Some(48));
        assert_eq!(tls_alert(TransportErrorCode::PROTOCOL_VIOLATION), None);
    }
}
