//! Region links over real UDP on loopback: mutual TLS under the federation CA, region
//! names from certificates, allow lists.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{endpoint, identity, init_tracing, loopback, peers};
use dtfed_regions::endpoint::{CLOSE_REGION_NOT_ALLOWED, CLOSE_SHUTDOWN};
use dtfed_regions::{FederationCa, LinkError, LinkTuning, PeerConnection, RegionEndpoint};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const WAIT: Duration = Duration::from_secs(15);

async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut).await.expect("timed out")
}

/// Dials `to` from `from` while `to` accepts; returns both sides' results.
async fn link(
    from: &RegionEndpoint,
    to: &RegionEndpoint,
    expected: &str,
) -> (
    Result<PeerConnection, LinkError>,
    Result<PeerConnection, LinkError>,
) {
    let addr = to.local_addr().expect("addr");
    within(async {
        let (dialled, accepted) = tokio::join!(from.connect(addr, expected), to.accept());
        (dialled, accepted.expect("endpoint open"))
    })
    .await
}

/// Sends `msg` on a new bi stream from `a`, `b` answers `pong:<msg>`.
async fn ping_pong(a: &PeerConnection, b: &PeerConnection, msg: &[u8]) -> Vec<u8> {
    let (mut send, mut recv) = a.connection().open_bi().await.expect("open bi");
    send.write_all(msg).await.expect("write");
    send.finish().expect("finish");
    let (mut b_send, mut b_recv) = b.connection().accept_bi().await.expect("accept bi");
    let got = b_recv.read_to_end(1 << 20).await.expect("read");
    assert_eq!(got, msg);
    b_send.write_all(b"pong:").await.expect("write");
    b_send.write_all(&got).await.expect("write");
    b_send.finish().expect("finish");
    recv.read_to_end(1 << 20).await.expect("read reply")
}

#[tokio::test]
async fn two_regions_connect_both_ways_and_exchange_bytes() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let seoul = endpoint(&ca, "seoul", &["tokyo"]);
    let tokyo = endpoint(&ca, "tokyo", &["seoul"]);

    let (dialled, accepted) = link(&seoul, &tokyo, "tokyo").await;
    let (s2t, t_side) = (
        dialled.expect("seoul dials tokyo"),
        accepted.expect("tokyo accepts"),
    );
    assert_eq!(s2t.region(), "tokyo");
    assert_eq!(t_side.region(), "seoul");
    assert_eq!(
        within(ping_pong(&s2t, &t_side, b"hello tokyo")).await,
        b"pong:hello tokyo"
    );
    // The welcome stream is consumed by link setup: the first uni stream the application
    // sees is its own.
    let mut uni = t_side.connection().open_uni().await.expect("open uni");
    uni.write_all(b"from tokyo").await.expect("write");
    uni.finish().expect("finish");
    let mut got = within(s2t.connection().accept_uni())
        .await
        .expect("accept uni");
    assert_eq!(
        within(got.read_to_end(64)).await.expect("read"),
        b"from tokyo"
    );

    let (dialled, accepted) = link(&tokyo, &seoul, "seoul").await;
    let (t2s, s_side) = (
        dialled.expect("tokyo dials seoul"),
        accepted.expect("seoul accepts"),
    );
    assert_eq!(t2s.region(), "seoul");
    assert_eq!(s_side.region(), "tokyo");
    assert_eq!(
        within(ping_pong(&t2s, &s_side, b"hello seoul")).await,
        b"pong:hello seoul"
    );
    assert!(t2s.rtt() < Duration::from_secs(1));
}

#[tokio::test]
async fn server_with_a_certificate_from_another_ca_is_refused() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    // Same subject name on purpose: only the key tells the two CAs apart.
    let rogue_ca = FederationCa::generate("test federation").expect("ca");
    let seoul = endpoint(&ca, "seoul", &["tokyo"]);
    let fake_tokyo = endpoint(&rogue_ca, "tokyo", &["seoul"]);

    let (dialled, accepted) = link(&seoul, &fake_tokyo, "tokyo").await;
    let err = dialled.expect_err("seoul must refuse the fake tokyo");
    assert!(matches!(err, LinkError::NotSignedByCa { .. }), "{err:?}");
    assert_eq!(
        err.to_string().split(" (").next(),
        Some("peer certificate is not signed by the federation CA")
    );
    let err = accepted.expect_err("the fake tokyo sees the refusal");
    assert!(
        matches!(err, LinkError::OurCertificateRejected { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn client_with_a_certificate_from_another_ca_is_refused() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let rogue_ca = FederationCa::generate("test federation").expect("ca");
    let seoul = endpoint(&ca, "seoul", &["tokyo"]);

    // Through the crate's API: the rogue trusts only its own CA, so it already refuses
    // seoul's certificate...
    let fake_tokyo = endpoint(&rogue_ca, "tokyo", &["seoul"]);
    let (dialled, accepted) = link(&fake_tokyo, &seoul, "seoul").await;
    let err = dialled.expect_err("rogue cannot verify seoul");
    assert!(matches!(err, LinkError::NotSignedByCa { .. }), "{err:?}");
    let err = accepted.expect_err("seoul refuses");
    assert!(
        matches!(err, LinkError::OurCertificateRejected { .. }),
        "{err:?}"
    );

    // ...so also attack with a raw client that trusts the real CA (it is public) and
    // presents a tokyo certificate from the rogue CA: seoul's TLS must refuse it.
    let forged = identity(&rogue_ca, "tokyo");
    let config = raw_client_config(ca.cert_der(), Some((forged.cert, forged.key)));
    let (client_err, accepted) = raw_attempt(&seoul, config).await;
    let err = accepted.expect_err("seoul refuses a forged tokyo");
    assert!(matches!(err, LinkError::NotSignedByCa { .. }), "{err:?}");
    assert_crypto_alert(&client_err, 48); // unknown_ca

    // And a client with no certificate at all.
    let config = raw_client_config(ca.cert_der(), None);
    let (client_err, accepted) = raw_attempt(&seoul, config).await;
    let err = accepted.expect_err("seoul refuses an anonymous client");
    assert!(matches!(err, LinkError::BadCertificate { .. }), "{err:?}");
    assert_crypto_alert(&client_err, 116); // certificate_required
}

#[tokio::test]
async fn peer_whose_region_is_not_allowed_is_refused() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let seoul = endpoint(&ca, "seoul", &["tokyo"]);
    let osaka = endpoint(&ca, "osaka", &["seoul"]);

    let (dialled, accepted) = link(&osaka, &seoul, "seoul").await;
    let err = accepted.expect_err("seoul refuses osaka");
    assert!(
        matches!(&err, LinkError::RegionNotAllowed { region } if region == "osaka"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "peer certificate names region osaka, which is not an allowed peer"
    );
    let err = dialled.expect_err("osaka is told");
    match &err {
        LinkError::RefusedByPeer { code, reason } => {
            assert_eq!(*code, CLOSE_REGION_NOT_ALLOWED.into_inner());
            assert!(reason.contains("osaka"), "{reason}");
        }
        other => panic!("expected RefusedByPeer, got {other:?}"),
    }

    // Nor will seoul dial a region that is not its peer.
    let err = within(seoul.connect(osaka.local_addr().expect("addr"), "osaka"))
        .await
        .expect_err("not a peer");
    assert!(matches!(err, LinkError::RegionNotAllowed { .. }), "{err:?}");

    // After a topology reload that adds osaka, the same link is accepted.
    seoul
        .set_allowed_peers(peers(&["tokyo", "osaka"]))
        .expect("reload");
    let (dialled, accepted) = link(&osaka, &seoul, "seoul").await;
    assert_eq!(dialled.expect("dial").region(), "seoul");
    assert_eq!(accepted.expect("accept").region(), "osaka");
}

#[tokio::test]
async fn dialling_tokyo_but_reaching_seoul_fails() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let osaka = endpoint(&ca, "osaka", &["tokyo", "seoul"]);
    let seoul = endpoint(&ca, "seoul", &["osaka"]);

    let (dialled, accepted) = link(&osaka, &seoul, "tokyo").await;
    let err = dialled.expect_err("seoul is not tokyo");
    match &err {
        LinkError::WrongRegion { expected, found } => {
            assert_eq!((expected.as_str(), found.as_str()), ("tokyo", "seoul"));
        }
        other => panic!("expected WrongRegion, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "expected region tokyo, peer certificate names seoul"
    );
    let err = accepted.expect_err("seoul sees the abort");
    assert!(
        matches!(err, LinkError::OurCertificateRejected { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn bad_arguments_and_unreachable_peers() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let tuning = LinkTuning {
        handshake_timeout: Duration::from_millis(500),
        ..LinkTuning::default()
    };
    let seoul = RegionEndpoint::bind_with(
        loopback(),
        identity(&ca, "seoul"),
        peers(&["tokyo"]),
        tuning,
    )
    .expect("bind");

    let err = within(seoul.connect(loopback(), "Tokyo!"))
        .await
        .expect_err("bad name");
    assert!(matches!(err, LinkError::InvalidRegionName(_)), "{err:?}");

    // Nobody listens there.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let err = within(seoul.connect(silent.local_addr().expect("addr"), "tokyo"))
        .await
        .expect_err("nobody there");
    assert!(matches!(err, LinkError::Timeout { .. }), "{err:?}");

    let err = RegionEndpoint::bind(loopback(), identity(&ca, "seoul"), peers(&["seoul"]))
        .expect_err("self peer");
    assert!(matches!(err, LinkError::Config(_)), "{err:?}");
    let mut mislabelled = identity(&ca, "seoul");
    mislabelled.region = "tokyo".into();
    let err = RegionEndpoint::bind(loopback(), mislabelled, peers(&["seoul"]))
        .expect_err("certificate names another region");
    assert!(matches!(err, LinkError::Identity(_)), "{err:?}");
}

#[tokio::test]
async fn close_ends_accept_and_links() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let seoul = endpoint(&ca, "seoul", &["tokyo"]);
    let tokyo = endpoint(&ca, "tokyo", &["seoul"]);
    let (dialled, accepted) = link(&tokyo, &seoul, "seoul").await;
    let (t2s, _s_side) = (dialled.expect("dial"), accepted.expect("accept"));

    seoul.close();
    match within(t2s.closed()).await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, CLOSE_SHUTDOWN)
        }
        other => panic!("expected an application close, got {other:?}"),
    }
    assert!(within(seoul.accept()).await.is_none());
    let err = within(seoul.connect(tokyo.local_addr().expect("addr"), "tokyo"))
        .await
        .expect_err("closed");
    assert!(matches!(err, LinkError::Closed), "{err:?}");
    within(seoul.wait_idle()).await;
}

/// A client config built by hand (not through the crate), trusting `trust` and presenting
/// `identity` if any.
fn raw_client_config(
    trust: &CertificateDer<'static>,
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.clone()).expect("root");
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("tls13")
    .with_root_certificates(roots);
    let mut tls = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(vec![cert], key)
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![dtfed_regions::tls::ALPN.to_vec()];
    quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).expect("quic client config"),
    ))
}

/// Connects to `server` with a raw client; returns how the client's connection ended and
/// what `server.accept()` yielded.
async fn raw_attempt(
    server: &RegionEndpoint,
    config: quinn::ClientConfig,
) -> (quinn::ConnectionError, Result<PeerConnection, LinkError>) {
    let client = quinn::Endpoint::client(loopback()).expect("client endpoint");
    let addr = server.local_addr().expect("addr");
    let attempt = async {
        let connecting = client
            .connect_with(config, addr, "seoul.dtfed.region")
            .expect("connect");
        match connecting.await {
            // TLS 1.3: the client may finish before the server has judged its certificate.
            Ok(conn) => conn.closed().await,
            Err(e) => e,
        }
    };
    within(async {
        let (client_err, accepted) = tokio::join!(attempt, server.accept());
        (client_err, accepted.expect("endpoint open"))
    })
    .await
}

fn assert_crypto_alert(err: &quinn::ConnectionError, alert: u64) {
    match err {
        quinn::ConnectionError::ConnectionClosed(close) => {
            assert_eq!(u64::from(close.error_code), 0x100 + alert, "{err}")
        }
        other => panic!("expected a TLS alert from the server, got {other:?}"),
    }
}
