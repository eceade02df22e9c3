//! TLS and QUIC configuration of region links: mutual TLS 1.3 under the federation CA, and
//! the transport tuning of a mirroring link.
//!
//! - **Trust.** The only trust anchor is the federation CA. Both sides present their region
//!   certificate (see [`crate::certs`]) and both verify the other's with rustls' WebPKI
//!   verifiers (ring provider, TLS 1.3 only, ALPN [`ALPN`]).
//! - **Who is the peer.** The dialling side knows which region it wants, so it verifies
//!   the server's certificate against the TLS server name `<region>.dtfed.region`
//!   ([`FederationServerVerifier`]). The accepting side cannot know in advance; it
//!   accepts any certificate of the federation CA during the handshake and then reads the
//!   region from the certificate's SAN ([`region_from_certificate`]); the endpoint refuses
//!   regions that are not allowed peers ([`crate::endpoint`]).
//! - **No 0-RTT, no resumption.** Early data is replayable, and a resumed session skips the
//!   certificate check we want on every link; links are long-lived, so a full handshake per
//!   connection costs nothing worth saving.
//!
//! [`LinkTuning`] holds the transport numbers (keep-alive, idle timeout, flow-control
//! windows, stream limits), sized for mirroring; see its field docs for the reasoning.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};

use crate::certs::{region_dns_name, region_from_dns_name};
use crate::error::LinkError;
use crate::topology::{valid_region_name, FederationConfig};

/// ALPN protocol id of the region link. Bump with the link protocol's major version.
pub const ALPN: &[u8] = b"dtfed-link/1";

/// Transport numbers of a region link.
///
/// Defaults are sized for the mirroring workload: up to [`LinkTuning::PARTITIONS`]
/// partition streams per link, batches up to [`LinkTuning::MAX_BATCH`], WAN RTTs up to a
/// few hundred milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkTuning {
    /// Interval of QUIC PINGs on an otherwise quiet link (2 s). Well below
    /// `idle_timeout`, so a few lost keep-alives do not kill a healthy link, and frequent
    /// enough to keep NAT/firewall UDP state alive.
    pub keep_alive_interval: Duration,
    /// A link with nothing received for this long is dead (10 s): the mirror client then
    /// reconnects, to another address of the region if it has one. Five keep-alive
    /// intervals.
    pub idle_timeout: Duration,
    /// Longest time for the whole link setup: QUIC + TLS handshake and the welcome (10 s).
    pub handshake_timeout: Duration,
    /// Per-stream receive window (8 MiB = one whole maximum batch).
    ///
    /// **Where the per-stream limit lives.** Flow control caps one partition's stream at
    /// `stream_receive_window / RTT`: ~15 MB/s at a 540 ms RTT (270 ms one way), ~30 MB/s
    /// at 270 ms, and the whole link at `receive_window / RTT` (~62 MB/s at 540 ms). The
    /// ~1.1 MB/s per stream (4.4 MB/s per 4-stream link) measured at 540 ms was far below
    /// both, did not move with the batch size, and was not flow control: ~5 % of the
    /// datagrams were dropped at full 208 KiB UDP receive buffers (`RcvbufErrors`), and on
    /// a long link each loss costs the congestion controller (BBR) a recovery and the
    /// stream a head-of-line wait of about one RTT. With [`LinkTuning::socket_buffer_bytes`]
    /// the same 101 MB link test went from 17,930 to 33,630 records/s (docs/BENCHMARKS.md,
    /// section 2); what remains is BBR's start-up (it doubles per round trip from a 240 KB
    /// initial window) and the CPU of a shared two-core host.
    pub stream_receive_window: u32,
    /// Per-connection receive window (32 MiB = four maximum batches): bounds what a link
    /// buffers on the receiving side across all partitions (memory per peer), while still
    /// allowing ~60 MB/s per link at a 540 ms RTT when catching up after a cut. With more
    /// than four busy partitions per link, streams whose receivers are slow can hold the
    /// whole connection window and the others get data only as those drain (the mirror
    /// server then waits, which is why it judges a stall by progress, not by completion).
    pub receive_window: u32,
    /// Bytes sent but not yet acknowledged, across all streams (32 MiB, matching the peer's
    /// receive window: more could not be in flight anyway).
    pub send_window: u64,
    /// Concurrent bidirectional streams the peer may open (128): one per partition (64)
    /// plus as many again for streams being replaced while a partition resumes.
    pub max_concurrent_bidi_streams: u32,
    /// Concurrent unidirectional streams the peer may open (8): the link welcome and
    /// room for control streams.
    pub max_concurrent_uni_streams: u32,
    /// Handshakes in progress at once on the accepting side (64); more are refused, so a
    /// flood of half-open connections cannot pile up.
    pub max_pending_handshakes: usize,
    /// `SO_RCVBUF` / `SO_SNDBUF` asked for the endpoint's UDP socket (4 MiB; the kernel caps
    /// it at `net.core.rmem_max` / `wmem_max`, and the endpoint logs what it got). The
    /// default 208 KiB overflowed when a busy host did not drain the socket for a few
    /// milliseconds: in the 270 ms link test ~5 % of datagrams were dropped there
    /// (`/proc/net/snmp` `RcvbufErrors`), and every loss costs the congestion controller a
    /// recovery on a long link.
    pub socket_buffer_bytes: usize,
}

impl LinkTuning {
    /// Partitions per link the defaults are sized for.
    pub const PARTITIONS: u32 = 64;
    /// Largest mirror batch the defaults are sized for.
    pub const MAX_BATCH: u32 = 8 * 1024 * 1024;
}

impl Default for LinkTuning {
    fn default() -> Self {
        LinkTuning {
            keep_alive_interval: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            stream_receive_window: Self::MAX_BATCH,
            receive_window: 4 * Self::MAX_BATCH,
            send_window: 4 * u64::from(Self::MAX_BATCH),
            max_concurrent_bidi_streams: 2 * Self::PARTITIONS,
            max_concurrent_uni_streams: 8,
            max_pending_handshakes: 64,
            socket_buffer_bytes: 4 * 1024 * 1024,
        }
    }
}

impl LinkTuning {
    /// The quinn transport config for these numbers.
    pub fn transport_config(&self) -> Result<TransportConfig, LinkError> {
        if self.keep_alive_interval >= self.idle_timeout {
            return Err(LinkError::Config(format!(
                "keep-alive interval {:?} must be below the idle timeout {:?}",
                self.keep_alive_interval, self.idle_timeout
            )));
        }
        let idle = IdleTimeout::try_from(self.idle_timeout)
            .map_err(|e| LinkError::Config(format!("idle timeout: {e}")))?;
        let mut t = TransportConfig::default();
        t.keep_alive_interval(Some(self.keep_alive_interval))
            .max_idle_timeout(Some(idle))
            .stream_receive_window(VarInt::from_u32(self.stream_receive_window))
            .receive_window(VarInt::from_u32(self.receive_window))
            .send_window(self.send_window)
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_bidi_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(self.max_concurrent_uni_streams))
            // The link uses streams only.
            .datagram_receive_buffer_size(None)
            // BBR paces by measured bandwidth and RTT instead of backing off on every loss:
            // on long links (hundreds of ms) Cubic's window grows one packet per RTT and a
            // catch-up after a cut crawls.
            .congestion_controller_factory(std::sync::Arc::new(
                quinn::congestion::BbrConfig::default(),
            ));
        Ok(t)
    }
}

/// Asks for `bytes` of receive and send buffer on a UDP socket; returns what the kernel
/// granted (receive, send), which may be less (`net.core.rmem_max`, `wmem_max`). Only the
/// buffer sizes change (no GRO or other option a plain `recv` would mishandle).
pub fn set_udp_buffers<S>(socket: &S, bytes: usize) -> std::io::Result<(usize, usize)>
where
    for<'a> socket2::SockRef<'a>: From<&'a S>,
{
    let sock = socket2::SockRef::from(socket);
    // Best effort: a smaller buffer still works, the caller logs what it got.
    let _ = sock.set_recv_buffer_size(bytes);
    let _ = sock.set_send_buffer_size(bytes);
    Ok((sock.recv_buffer_size()?, sock.send_buffer_size()?))
}

/// A region's credentials on the links: its name, the federation CA, its certificate and
/// private key.
pub struct RegionIdentity {
    /// This region's name; the certificate must name it.
    pub region: String,
    /// The federation CA certificate: the only trust anchor.
    pub ca: CertificateDer<'static>,
    /// This region's certificate, issued directly by the CA.
    pub cert: CertificateDer<'static>,
    /// This region's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for RegionIdentity {
    fn clone(&self) -> Self {
        RegionIdentity {
            region: self.region.clone(),
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl std::fmt::Debug for RegionIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionIdentity")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl RegionIdentity {
    /// An identity from PEM texts.
    pub fn from_pem(
        region: &str,
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<RegionIdentity, LinkError> {
        let first_cert = |pem: &str, what: &str| {
            rustls_pemfile::certs(&mut pem.as_bytes())
                .next()
                .and_then(Result::ok)
                .ok_or_else(|| LinkError::Identity(format!("no PEM certificate in the {what}")))
        };
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .ok()
            .flatten()
            .ok_or_else(|| LinkError::Identity("no PEM private key in the key file".into()))?;
        Ok(RegionIdentity {
            region: region.to_owned(),
            ca: first_cert(ca_pem, "CA file")?,
            cert: first_cert(cert_pem, "certificate file")?,
            key,
        })
    }

    /// An identity from the PEM files named by a [`FederationConfig`].
    pub fn load(region: &str, config: &FederationConfig) -> Result<RegionIdentity, LinkError> {
        let read = |path: &std::path::Path| {
            std::fs::read_to_string(path).map_err(|source| LinkError::File {
                path: path.to_owned(),
                source,
            })
        };
        RegionIdentity::from_pem(
            region,
            &read(&config.ca_cert)?,
            &read(&config.cert)?,
            &read(&config.key)?,
        )
    }

    /// Checks the identity is usable: valid region name, certificate issued by the CA, valid
    /// now, naming this region, and the key is the certificate's.
    pub fn check(&self) -> Result<(), LinkError> {
        if !valid_region_name(&self.region) {
            return Err(LinkError::InvalidRegionName(self.region.clone()));
        }
        let named = region_from_certificate(&self.cert)
            .map_err(|e| LinkError::Identity(format!("our certificate: {e}")))?;
        if named != self.region {
            return Err(LinkError::Identity(format!(
                "our certificate names region {named}, but this region is {}",
                self.region
            )));
        }
        let roots = Arc::new(root_store(&self.ca)?);
        let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| LinkError::Config(e.to_string()))?;
        let name = server_name(&self.region)?;
        verifier
            .verify_server_cert(&self.cert, &[], &name, &[], UnixTime::now())
            .map_err(|e| {
                LinkError::Identity(format!(
                    "our certificate does not verify under the federation CA: {e}"
                ))
            })?;
        // Building a config checks the key matches the certificate.
        rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| LinkError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], self.key.clone_key())
            .map_err(|e| LinkError::Identity(format!("our key: {e}")))?;
        Ok(())
    }
}

/// The crypto provider of the links: *ring*.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn root_store(ca: &CertificateDer<'static>) -> Result<RootCertStore, LinkError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| LinkError::Identity(format!("federation CA certificate: {e}")))?;
    Ok(roots)
}

fn server_name(region: &str) -> Result<ServerName<'static>, LinkError> {
    ServerName::try_from(region_dns_name(region))
        .map_err(|_| LinkError::InvalidRegionName(region.to_owned()))
}

/// The region a certificate names: its single SAN DNS name of the form
/// `<region>.dtfed.region`. Does not check the signature: use on certificates rustls has
/// verified.
pub fn region_from_certificate(cert: &CertificateDer<'_>) -> Result<String, LinkError> {
    let (_, x509) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| LinkError::BadCertificate {
            detail: format!("cannot parse: {e}"),
        })?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| LinkError::BadCertificate {
            detail: format!("bad subjectAltName: {e}"),
        })?;
    let mut regions = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => region_from_dns_name(dns),
            _ => None,
        });
    match (regions.next(), regions.next()) {
        (Some(region), None) => Ok(region.to_owned()),
        (None, _) => Err(LinkError::NoRegionInCertificate),
        (Some(a), Some(b)) => Err(LinkError::BadCertificate {
            detail: format!("names several regions ({a}, {b}, ...)"),
        }),
    }
}

/// The region named by the certificate a QUIC peer presented.
pub(crate) fn peer_region(conn: &quinn::Connection) -> Result<String, LinkError> {
    let chain = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| LinkError::BadCertificate {
            detail: "peer presented no certificate".into(),
        })?;
    let leaf = chain.first().ok_or_else(|| LinkError::BadCertificate {
        detail: "peer presented no certificate".into(),
    })?;
    region_from_certificate(leaf)
}

/// Builds the QUIC server config: TLS 1.3, ALPN, client certificate required and verified
/// against the federation CA, no 0-RTT, no session resumption.
pub(crate) fn server_config(
    identity: &RegionIdentity,
    transport: Arc<TransportConfig>,
) -> Result<quinn::ServerConfig, LinkError> {
    let roots = Arc::new(root_store(&identity.ca)?);
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| LinkError::Config(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| LinkError::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::new(FederationClientVerifier { inner }))
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())
        .map_err(|e| LinkError::Identity(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    tls.send_tls13_tickets = 0;
    tls.session_storage = Arc::new(NoServerSessionStorage {});
    let quic = QuicServerConfig::try_from(tls).map_err(|e| LinkError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport);
    Ok(config)
}

/// What a failed server-certificate check found, for [`LinkError`] (rustls only carries a
/// string through QUIC).
pub(crate) type Verdict = Arc<Mutex<Option<LinkError>>>;

/// Takes the recorded verdict, if any.
pub(crate) fn take_verdict(verdict: &Verdict) -> Option<LinkError> {
    verdict
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
}

/// Builds the QUIC client config for one connection to region `expected`: verifies the
/// server against the CA and the name `<expected>.dtfed.region`, presents our certificate,
/// records why verification failed in `verdict`.
pub(crate) fn client_config(
    identity: &RegionIdentity,
    server_verifier: Arc<WebPkiServerVerifier>,
    expected: &str,
    verdict: Verdict,
    transport: Arc<TransportConfig>,
) -> Result<quinn::ClientConfig, LinkError> {
    let verifier = FederationServerVerifier {
        inner: server_verifier,
        expected: expected.to_owned(),
        verdict,
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| LinkError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(vec![identity.cert.clone()], identity.key.clone_key())
        .map_err(|e| LinkError::Identity(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    tls.resumption = Resumption::disabled();
    let quic = QuicClientConfig::try_from(tls).map_err(|e| LinkError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport);
    Ok(config)
}

/// The WebPKI server verifier for the federation CA, shared by all outgoing connections.
pub(crate) fn server_verifier(
    identity: &RegionIdentity,
) -> Result<Arc<WebPkiServerVerifier>, LinkError> {
    let roots = Arc::new(root_store(&identity.ca)?);
    WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| LinkError::Config(e.to_string()))
}

/// The TLS server name to dial region `region` with.
pub(crate) fn dial_name(region: &str) -> Result<String, LinkError> {
    server_name(region).map(|_| region_dns_name(region))
}

/// Verifies a server certificate with the stock WebPKI verifier (chain to the CA, validity,
/// serverAuth, name `<expected>.dtfed.region`), and records a typed reason when it fails
/// (only a string would make it through QUIC's connection error).
#[derive(Debug)]
struct FederationServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expected: String,
    verdict: Verdict,
}

impl FederationServerVerifier {
    fn record(&self, err: LinkError) {
        *self.verdict.lock().unwrap_or_else(PoisonError::into_inner) = Some(err);
    }
}

impl ServerCertVerifier for FederationServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        if let Err(rustls::Error::InvalidCertificate(err)) = &result {
            self.record(match err {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    LinkError::NotSignedByCa {
                        detail: format!("{err:?}"),
                    }
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    match region_from_certificate(end_entity) {
                        Ok(found) => LinkError::WrongRegion {
                            expected: self.expected.clone(),
                            found,
                        },
                        Err(e) => e,
                    }
                }
                other => LinkError::BadCertificate {
                    detail: other.to_string(),
                },
            });
        }
        result.map_err(same_ca_name_as_unknown_issuer)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A certificate issued by another CA that happens to have our CA's subject name fails
/// WebPKI with `BadSignature` (alert `decrypt_error`) rather than `UnknownIssuer`; report
/// both as `UnknownIssuer` (alert `unknown_ca`), which is what it means here. (The
/// handshake signature is checked separately, by `verify_tls13_signature`.)
fn same_ca_name_as_unknown_issuer(err: rustls::Error) -> rustls::Error {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        }
        other => other,
    }
}

/// The stock WebPKI client verifier, with client authentication mandatory and a
/// certificate from another CA reported as such (see [`same_ca_name_as_unknown_issuer`]).
#[derive(Debug)]
struct FederationClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for FederationClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(same_ca_name_as_unknown_issuer)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::FederationCa;

    fn identity(ca: &FederationCa, cert_region: &str, region: &str) -> RegionIdentity {
        let issued = ca.issue_region(cert_region).expect("issue");
        RegionIdentity::from_pem(region, ca.cert_pem(), &issued.cert_pem, &issued.key_pem)
            .expect("identity")
    }

    #[test]
    fn default_tuning_builds() {
        let tuning = LinkTuning::default();
        assert!(tuning.keep_alive_interval < tuning.idle_timeout);
        tuning.transport_config().expect("transport config");
        let bad = LinkTuning {
            keep_alive_interval: Duration::from_secs(20),
            ..LinkTuning::default()
        };
        assert!(matches!(bad.transport_config(), Err(LinkError::Config(_))));
    }

    #[test]
    fn identity_checks() {
        let ca = FederationCa::generate("test").expect("ca");
        identity(&ca, "seoul", "seoul").check().expect("valid");
        assert!(matches!(
            identity(&ca, "seoul", "tokyo").check(),
            Err(LinkError::Identity(_))
        ));
        let other = FederationCa::generate("test").expect("ca");
        let mut foreign = identity(&other, "seoul", "seoul");
        foreign.ca = ca.cert_der().clone();
        assert!(matches!(foreign.check(), Err(LinkError::Identity(_))));
        let mut wrong_key = identity(&ca, "seoul", "seoul");
        wrong_key.key = identity(&ca, "seoul", "seoul").key;
        assert!(matches!(wrong_key.check(), Err(LinkError::Identity(_))));
    }

    #[test]
    fn region_is_read_from_the_san() {
        let ca = FederationCa::generate("test").expect("ca");
        let id = identity(&ca, "frankfurt", "frankfurt");
        assert_eq!(
            region_from_certificate(&id.cert).expect("region"),
            "frankfurt"
        );
        assert!(matches!(
            region_from_certificate(ca.cert_der()),
            Err(LinkError::NoRegionInCertificate)
        ));
    }
}
